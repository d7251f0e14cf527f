"""Find numerically unstable patterns (log(1+exp(x)), log(sum(exp(x))), ...) in a Python file.

``mixprec stabilize FILE.py`` imports FILE.py, captures the ``nn.Module`` subclasses and the
public functions it defines, and reports every pattern :func:`mixprec.stabilize` would rewrite,
as ``file:line: target: rule -> replacement  source``. Modules are instantiated without
arguments, or with ``--init JSON``; ``--factory [MODULE:]FUNCTION`` builds what cannot be built
that way (a function returning the model, or ``(model, args)`` / ``(model, args, kwargs)``).
With example inputs (``--input SHAPE[:DTYPE]``, or from the factory) a target is captured with
torch.export, which follows data-dependent Python (asserts on sizes, buffers sliced by the
sequence length); without, it is traced symbolically with torch.fx.

Exit status: 0; with ``--check``, 1 when any pattern is found and 3 when no target could be
checked (all skipped, or none defined), so a CI job cannot pass while checking nothing; 2 for
bad arguments. ``--target NAME`` restricts the search, ``--json`` prints a machine-readable
report, ``--show-code`` prints each stabilized forward.

Importing FILE.py runs it (and ``--factory`` runs the factory): only use this on code you trust.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from mixprec.cli.arguments import python_file
from mixprec.schema import SCHEMA_VERSION

EXIT_FOUND = 1  # --check: unstable patterns found
EXIT_NOTHING_CHECKED = 3  # --check: no target could be captured, so nothing was checked

_DTYPES = ("float32", "float64", "float16", "bfloat16", "int64", "int32")


@dataclass(frozen=True)
class InputSpec:
    """One example input: a shape and a dtype (floats are random normal, integers zero)."""

    shape: tuple[int, ...]
    dtype: str = "float32"

    def make(self, seed: int) -> Any:
        import torch

        dtype = getattr(torch, self.dtype)
        if dtype.is_floating_point:
            g = torch.Generator().manual_seed(seed)
            return torch.randn(self.shape, generator=g).to(dtype)
        return torch.zeros(self.shape, dtype=dtype)  # zeros are valid token ids / indices


def input_spec(text: str) -> InputSpec:
    """``2x16`` or ``2x16:int64`` (argparse type)."""
    shape_text, _, dtype = text.partition(":")
    dtype = dtype or "float32"
    try:
        shape = tuple(int(s) for s in shape_text.lower().split("x"))
    except ValueError:
        shape = ()
    if not shape or any(s < 0 for s in shape):
        raise argparse.ArgumentTypeError(
            f"invalid shape {text!r}: expected sizes joined by 'x', e.g. 2x16 or 2x16:int64"
        )
    if dtype not in _DTYPES:
        raise argparse.ArgumentTypeError(
            f"invalid dtype {dtype!r} in {text!r}; valid: {', '.join(_DTYPES)}"
        )
    return InputSpec(shape, dtype)


def init_arguments(text: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A JSON list (positional) or object (keyword arguments) for the constructors."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"invalid JSON {text!r}: {exc}") from None
    if isinstance(value, list):
        return tuple(value), {}
    if isinstance(value, dict):
        return (), value
    raise argparse.ArgumentTypeError(
        f"invalid constructor arguments {text!r}: expected a JSON list or object"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "file", type=python_file, help="a Python file defining modules or functions"
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help=f"exit with status {EXIT_FOUND} if any unstable pattern is found, "
        f"{EXIT_NOTHING_CHECKED} if no target could be checked",
    )
    parser.add_argument(
        "--target",
        action="append",
        default=[],
        metavar="NAME",
        help="only this nn.Module subclass or function (repeatable)",
    )
    parser.add_argument(
        "--factory",
        action="append",
        default=[],
        metavar="[MODULE:]FUNCTION",
        help="build a target by calling FUNCTION() (in FILE, or in MODULE importable from "
        "FILE's directory); it returns the model, or (model, args) or (model, args, kwargs)",
    )
    parser.add_argument(
        "--init",
        type=init_arguments,
        metavar="JSON",
        help="constructor arguments for FILE's nn.Module subclasses: a JSON list or object",
    )
    parser.add_argument(
        "--input",
        type=input_spec,
        action="append",
        default=[],
        metavar="SHAPE[:DTYPE]",
        help="an example input (repeatable, in forward's order), e.g. 2x16:int64; "
        "with inputs the targets are captured with torch.export",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--show-code", action="store_true", help="print the stabilized forward of each target"
    )


@dataclass
class TargetReport:
    name: str
    kind: str  # "module" | "function" | "factory"
    status: str  # "traced" | "skipped"
    reason: str = ""
    changes: list[dict[str, Any]] = field(default_factory=list)
    code: str = ""


def _load(path: Path) -> ModuleType:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is not a file")
    if path.suffix != ".py":
        raise ValueError(f"{path} is not a .py file")
    package = _package_name(path)
    if package is not None:
        return _load_from_package(path, *package)
    name = f"_mixprec_stabilize_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up here
    try:
        with _on_path(path.parent):  # the file's own imports of its neighbours
            spec.loader.exec_module(module)
    except Exception as exc:  # the user's file failed to import: report it as bad input
        sys.modules.pop(name, None)
        raise ValueError(f"importing {path} failed: {type(exc).__name__}: {exc}") from exc
    return module


def _package_name(path: Path) -> tuple[Path, str] | None:
    """(root folder, dotted module name) of a file inside a package (its folder holds an
    ``__init__.py``), imported as such so that its relative imports resolve (a model file of
    transformers, ``from ...modeling_utils import ...``); None for a plain script."""
    parts = [] if path.name == "__init__.py" else [path.stem]
    folder = path.resolve().parent
    while (folder / "__init__.py").is_file():
        parts.append(folder.name)
        folder = folder.parent
    if path.name != "__init__.py" and len(parts) == 1:
        return None
    return folder, ".".join(reversed(parts))


def _load_from_package(path: Path, root: Path, dotted: str) -> ModuleType:
    try:
        with _on_path(root):
            module = importlib.import_module(dotted)
    except Exception as exc:  # the user's file failed to import: report it as bad input
        raise ValueError(
            f"importing {path} (as {dotted}) failed: {type(exc).__name__}: {exc}"
        ) from exc
    found = getattr(module, "__file__", None)
    if found is None or Path(found).resolve() != path.resolve():
        raise ValueError(
            f"{path} is module {dotted} of a package, but {dotted} is imported from "
            f"{found}: run from where that package is the one you mean"
        )
    return module


@contextmanager
def _on_path(folder: Path) -> Iterator[None]:
    entry = str(folder.resolve())
    added = entry not in sys.path
    if added:
        sys.path.insert(0, entry)
    try:
        yield
    finally:
        if added and entry in sys.path:
            sys.path.remove(entry)


def _candidates(module: ModuleType) -> dict[str, tuple[str, Any]]:
    import torch.nn as nn

    found: dict[str, tuple[str, Any]] = {}
    for name, obj in vars(module).items():
        if getattr(obj, "__module__", None) != module.__name__ or name.startswith("_"):
            continue
        if inspect.isclass(obj) and issubclass(obj, nn.Module):
            found[name] = ("module", obj)
        elif inspect.isfunction(obj):
            found[name] = ("function", obj)
    return found


def _factory(spec: str, file: Path, module: ModuleType) -> Callable[..., Any]:
    mod_name, _, fn_name = spec.rpartition(":")
    if mod_name:
        try:
            with _on_path(file.parent):
                source = importlib.import_module(mod_name)
        except ImportError as exc:
            raise ValueError(f"--factory {spec}: cannot import {mod_name}: {exc}") from exc
    else:
        source = module
    fn = getattr(source, fn_name, None)
    if not callable(fn):
        where = mod_name or str(file)
        raise ValueError(f"--factory {spec}: {where} defines no function named {fn_name!r}")
    return fn


Built = tuple[Any, tuple[Any, ...], dict[str, Any]]


def _from_factory(spec: str, fn: Callable[..., Any], inputs: tuple[Any, ...]) -> Built:
    """(model, args, kwargs) from a factory's result (a model, or a tuple with its inputs)."""
    made = fn()
    if isinstance(made, tuple) and len(made) in (2, 3):
        model, args = made[0], tuple(made[1])
        kwargs = dict(made[2]) if len(made) == 3 else {}
        return model, args, kwargs
    if isinstance(made, tuple):
        raise ValueError(
            f"--factory {spec} returned a tuple of {len(made)}; expected the model, "
            "(model, args) or (model, args, kwargs)"
        )
    return made, inputs, {}


def _analyse(name: str, kind: str, build: Callable[[], Built], cli_inputs: bool) -> TargetReport:
    from mixprec.stable import stabilize

    report = TargetReport(name, kind, "skipped")
    try:
        obj, args, kwargs = build()
    except Exception as exc:  # the constructor needs arguments, or fails
        report.reason = (
            f"cannot build {name}: {type(exc).__name__}: {exc} "
            "(give --init JSON constructor arguments or --factory [MODULE:]FUNCTION)"
        )
        return report
    try:
        gm, changes = stabilize(obj, args, kwargs)
    except Exception as exc:  # torch.fx / torch.export could not capture it
        hint = "" if (args or kwargs or cli_inputs) else " (give example inputs: --input SHAPE)"
        report.reason = f"could not capture {name}: {type(exc).__name__}: {exc}{hint}"
        return report
    report.status = "traced"
    report.changes = [{**asdict(c), "target": name} for c in changes]
    report.code = gm.code
    return report


def _no_inputs(name: str) -> Callable[[], Built]:
    def build() -> Built:
        # a function of nothing computes nothing from tensors: tracing it would check nothing
        raise TypeError(f"{name}() takes no inputs (if it builds a model: --factory {name})")

    return build


def _plans(args: argparse.Namespace, module: ModuleType) -> list[tuple[str, str, Any]]:
    """(name, kind, build) for every target: factories, then FILE's classes and functions."""
    inputs = tuple(s.make(i) for i, s in enumerate(args.input))
    init_args, init_kwargs = args.init or ((), {})
    plans: list[tuple[str, str, Any]] = []
    for spec in args.factory:
        fn = _factory(spec, args.file, module)
        plans.append((spec, "factory", lambda s=spec, f=fn: _from_factory(s, f, inputs)))
    found = _candidates(module)
    if args.target:
        missing = [t for t in args.target if t not in found]
        if missing:
            raise ValueError(
                f"{args.file} defines no nn.Module subclass or function named "
                f"{', '.join(missing)}; found: {', '.join(sorted(found)) or 'none'}"
            )
        found = {t: found[t] for t in args.target}
    elif args.factory:
        found = {}  # the factories say what to check
    for name, (kind, obj) in found.items():
        if kind == "module":
            build = lambda o=obj: (o(*init_args, **init_kwargs), inputs, {})  # noqa: E731
        elif not inspect.signature(obj).parameters:
            build = _no_inputs(name)
        else:
            build = lambda o=obj: (o, inputs, {})  # noqa: E731
        plans.append((name, kind, build))
    return plans


def run(args: argparse.Namespace) -> int:
    module = _load(args.file)
    plans = _plans(args, module)
    reports = [_analyse(name, kind, build, bool(args.input)) for name, kind, build in plans]
    n_changes = sum(len(r.changes) for r in reports)
    traced = sum(r.status == "traced" for r in reports)
    if args.json:
        doc = {
            "schema_version": SCHEMA_VERSION,
            "file": str(args.file),
            "unstable_patterns": n_changes,
            "checked_targets": traced,
            "targets": [
                {k: v for k, v in asdict(r).items() if k != "code" or args.show_code}
                for r in reports
            ],
        }
        print(json.dumps(doc, indent=2))
    else:
        _print_text(args, reports, n_changes, traced)
    if not args.check:
        return 0
    if traced == 0:
        return EXIT_NOTHING_CHECKED
    return EXIT_FOUND if n_changes else 0


def _print_text(
    args: argparse.Namespace, reports: list[TargetReport], n_changes: int, traced: int
) -> None:
    for r in reports:
        if r.status == "skipped":
            print(f"{r.name}: skipped ({r.reason})")
            continue
        for c in r.changes:
            code = f"  {c['code']}" if c["code"] else ""
            print(f"{c['location']}: {r.name}: {c['rule']} -> {c['replacement']}{code}")
        if args.show_code:
            print(f"# stabilized {r.name}:{r.code}")
    print(
        f"{n_changes} unstable pattern{'s' if n_changes != 1 else ''} found in {traced} traced "
        f"target{'s' if traced != 1 else ''} of {args.file}"
        + (f" ({len(reports) - traced} skipped)" if traced != len(reports) else "")
    )
    if traced == 0:
        print(
            "nothing was checked: give --factory, --init or --input so that the targets can "
            "be built and captured"
            + (f" (--check exits with status {EXIT_NOTHING_CHECKED})" if args.check else ""),
            file=sys.stderr,
        )
