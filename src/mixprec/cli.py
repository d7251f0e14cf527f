"""The ``mixprec`` command line: formats, explain, demo, sanitize, stabilize, bench.

Each subcommand lives in its own module ``mixprec._cli_NAME`` exposing ``add_arguments(parser)``
and ``run(args) -> int``; this file only dispatches, so a subcommand's imports (torch, matplotlib)
are paid only when it runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib import import_module
from types import ModuleType

COMMANDS: tuple[str, ...] = ("formats", "explain", "demo", "sanitize", "stabilize", "bench")


def _load(name: str) -> ModuleType | None:
    try:
        return import_module(f"mixprec._cli_{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"mixprec._cli_{name}":
            return None
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mixprec",
        description="Low- and mixed-precision deep learning: formats, emulation, diagnosis.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = _load(name)
        if module is None:
            continue
        doc = (module.__doc__ or name).strip().splitlines()[0]
        p = sub.add_parser(name, help=doc, description=(module.__doc__ or doc).strip())
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except BrokenPipeError:  # `mixprec formats | head`: the reader left; not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"mixprec {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
