"""The public API's shape: documented names resolve, exports are explicit, no module is named
like a function, and layers import one way."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import mixprec

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "src" / "mixprec"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# dotted names in docs, e.g. `mixprec.amp.get_config` or mixprec.stable.softplus(...)
DOTTED = re.compile(r"\bmixprec(?:\.[A-Za-z_][A-Za-z0-9_]*)+")
# subpackages in layer order: a package may import those before it, never those after it
LAYERS = ["formats", "quantization", "precision", "amp", "integrations", "demo", "cli"]
BESIDE = {"sanitizer": "precision", "stable": "precision"}  # same rank as precision
ALWAYS_OK = {
    "frames",
    "machine",
    "schema",
    "testing",
    "trees",
}  # bottom-layer utilities and test helpers


def _resolve(dotted: str) -> object:
    parts = dotted.split(".")
    obj: object = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], start=1):
        if hasattr(obj, part):
            obj = getattr(obj, part)
        else:
            obj = importlib.import_module(".".join(parts[: i + 1]))
    return obj


def _documented_names() -> list[tuple[str, str]]:
    found = {}
    for page in PAGES:
        for name in DOTTED.findall(page.read_text()):
            if name.endswith((".md", ".py", ".json", ".png")):  # file names, not API paths
                continue
            found.setdefault(name, page.name)
    return sorted(found.items())


@pytest.mark.parametrize(("name", "page"), _documented_names())
def test_documented_name_resolves(name: str, page: str) -> None:
    try:
        _resolve(name)
    except (AttributeError, ImportError) as exc:
        pytest.fail(f"{page} mentions {name}, which does not resolve: {exc}")


def _subpackages() -> list[str]:
    return [m.name for m in pkgutil.iter_modules(mixprec.__path__) if m.ispkg]


@pytest.mark.parametrize("sub", ["mixprec", *(f"mixprec.{s}" for s in _subpackages())])
def test_every_exported_name_exists(sub: str) -> None:
    module = importlib.import_module(sub)
    exported = getattr(module, "__all__", None)
    assert exported, f"{sub} lists no public names (__all__)"
    missing = [n for n in exported if not hasattr(module, n)]
    assert not missing, f"{sub}.__all__ names {missing}, which it does not define"
    assert len(set(exported)) == len(exported), f"{sub}.__all__ repeats a name"


def _modules() -> list[str]:
    return [m.name for m in pkgutil.walk_packages(mixprec.__path__, "mixprec.")]


def test_no_module_shares_its_name_with_a_public_function() -> None:
    functions = {
        name
        for sub in ["mixprec", *(f"mixprec.{s}" for s in _subpackages())]
        for name in importlib.import_module(sub).__all__
        if callable(getattr(importlib.import_module(sub), name))
        and not isinstance(getattr(importlib.import_module(sub), name), type)
    }
    clashes = [m for m in _modules() if m.rsplit(".", 1)[1] in functions]
    assert not clashes, f"modules named like public functions: {clashes}"


def _rank(sub: str) -> int:
    return LAYERS.index(BESIDE.get(sub, sub))


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mixprec"):
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.startswith("mixprec")}
    return names


def test_layers_import_one_way() -> None:
    upward = []
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG).parts
        if len(rel) < 2 or rel[0] in ALWAYS_OK:
            continue
        for target in _imports(path):
            parts = target.split(".")
            if len(parts) < 2 or parts[1] in ALWAYS_OK or parts[1] == rel[0]:
                continue
            if parts[1] in BESIDE and rel[0] in BESIDE:
                upward.append(f"{'/'.join(rel)} imports {target} (sanitizer and stable are peers)")
            elif _rank(parts[1]) > _rank(rel[0]):
                upward.append(f"{'/'.join(rel)} imports {target}")
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)


def test_no_private_names_imported_across_subpackages() -> None:
    reach_ins = []
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG).parts
        home = rel[0] if len(rel) > 1 else None
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.module):
                continue
            parts = node.module.split(".")
            if parts[0] != "mixprec" or len(parts) < 2 or parts[1] == home:
                continue
            private = [a.name for a in node.names if a.name.startswith("_")]
            private += [p for p in parts[2:] if p.startswith("_")]
            if private:
                reach_ins.append(f"{'/'.join(rel)}: from {node.module} import {private}")
    assert not reach_ins, "private names used across subpackages:\n" + "\n".join(reach_ins)
