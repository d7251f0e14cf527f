"""Find numerically unstable patterns (log(1+exp(x)), log(sum(exp(x))), ...) in a Python file.

``mixprec stabilize FILE.py`` imports FILE.py, traces the ``nn.Module`` subclasses (instantiated
without arguments) and the public functions it defines with torch.fx, and reports every pattern
:func:`mixprec.stabilize` would rewrite, with its source line. ``--check`` exits with status 1
when any is found (for CI); ``--target NAME`` restricts the search; ``--json`` prints a
machine-readable report; ``--show-code`` prints each stabilized forward.

Importing FILE.py runs it: only use this on code you trust.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from mixprec.cli.arguments import python_file
from mixprec.schema import SCHEMA_VERSION


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "file", type=python_file, help="a Python file defining modules or functions"
    )
    parser.add_argument(
        "--check", action="store_true", help="exit with status 1 if any unstable pattern is found"
    )
    parser.add_argument(
        "--target",
        action="append",
        default=[],
        metavar="NAME",
        help="only this nn.Module subclass or function (repeatable)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--show-code", action="store_true", help="print the stabilized forward of each target"
    )


@dataclass
class TargetReport:
    name: str
    kind: str  # "module" | "function"
    status: str  # "traced" | "skipped"
    reason: str = ""
    changes: list[dict[str, Any]] = field(default_factory=list)
    code: str = ""


def _load(path: Path) -> ModuleType:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is not a file")
    if path.suffix != ".py":
        raise ValueError(f"{path} is not a .py file")
    name = f"_mixprec_stabilize_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up here
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # the user's file failed to import: report it as bad input
        sys.modules.pop(name, None)
        raise ValueError(f"importing {path} failed: {type(exc).__name__}: {exc}") from exc
    return module


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


def _analyse(name: str, kind: str, obj: Any) -> TargetReport:
    from mixprec.stable import stabilize

    report = TargetReport(name, kind, "skipped")
    if kind == "module":
        try:
            obj = obj()
        except Exception as exc:  # the constructor needs arguments, or fails
            report.reason = f"cannot instantiate {name}() without arguments: {exc}"
            return report
    try:
        gm, changes = stabilize(obj)
    except Exception as exc:  # torch.fx cannot trace data-dependent control flow etc.
        report.reason = f"torch.fx could not trace it: {type(exc).__name__}: {exc}"
        return report
    report.status = "traced"
    report.changes = [{**asdict(c), "target": name} for c in changes]
    report.code = gm.code
    return report


def run(args: argparse.Namespace) -> int:
    module = _load(args.file)
    found = _candidates(module)
    if args.target:
        missing = [t for t in args.target if t not in found]
        if missing:
            raise ValueError(
                f"{args.file} defines no nn.Module subclass or function named "
                f"{', '.join(missing)}; found: {', '.join(sorted(found)) or 'none'}"
            )
        found = {t: found[t] for t in args.target}
    reports = [_analyse(name, kind, obj) for name, (kind, obj) in found.items()]
    n_changes = sum(len(r.changes) for r in reports)
    if args.json:
        doc = {
            "schema_version": SCHEMA_VERSION,
            "file": str(args.file),
            "unstable_patterns": n_changes,
            "targets": [
                {k: v for k, v in asdict(r).items() if k != "code" or args.show_code}
                for r in reports
            ],
        }
        print(json.dumps(doc, indent=2))
    else:
        _print_text(args, reports, n_changes)
    return 1 if args.check and n_changes else 0


def _print_text(args: argparse.Namespace, reports: list[TargetReport], n_changes: int) -> None:
    for r in reports:
        if r.status == "skipped":
            print(f"{r.name}: skipped ({r.reason})")
            continue
        for c in r.changes:
            code = f"  {c['code']}" if c["code"] else ""
            print(f"{c['location']}: {r.name}: {c['rule']} -> {c['replacement']}{code}")
        if args.show_code:
            print(f"# stabilized {r.name}:{r.code}")
    traced = sum(r.status == "traced" for r in reports)
    print(
        f"{n_changes} unstable pattern{'s' if n_changes != 1 else ''} found in {traced} traced "
        f"target{'s' if traced != 1 else ''} of {args.file}"
        + (f" ({len(reports) - traced} skipped)" if traced != len(reports) else "")
    )
