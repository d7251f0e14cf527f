"""The ``mixprec`` command line: formats, explain, demo, sanitize, run, stabilize, bench.

Each subcommand lives in its own module ``mixprec.cli.NAME_command`` exposing
``add_arguments(parser)`` and ``run(args) -> int``, and optionally ``check(args, parser)`` for
checks that need several options at once (it reports problems with ``parser.error``); this
file only dispatches, so a subcommand's imports (torch, matplotlib) are paid only when it runs.

Every option is checked before a subcommand runs anything (``type=`` callables from
``mixprec.cli.arguments``, then ``check``). Exit status: 2 for a bad command line (argparse's
``usage: mixprec CMD ...`` and ``mixprec CMD: error: ...`` on stderr) and for a ``ValueError`` or
``TypeError`` the library raises while validating what it was given (``mixprec CMD: error:
MESSAGE``, no traceback); 1 when the command fails on an ``OSError`` (a file that cannot be read
or written); otherwise what the subcommand returns. ``main(argv)`` returns the status instead of
exiting, also for argparse's errors and ``--help``.
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib import import_module
from types import ModuleType

COMMANDS: tuple[str, ...] = ("formats", "explain", "demo", "sanitize", "run", "stabilize", "bench")


def _load(name: str) -> ModuleType | None:
    try:
        return import_module(f"mixprec.cli.{name}_command")
    except ModuleNotFoundError as exc:
        if exc.name == f"mixprec.cli.{name}_command":
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
        # private keys: a subcommand's own options may not shadow them (sanitize has a
        # positional named like the subparsers' dest once did)
        p.set_defaults(
            _run=module.run, _check=getattr(module, "check", None), _name=name, _parser=p
        )
    return parser


def _exit_code(exc: SystemExit) -> int:
    code = exc.code
    if code is None:
        return 0
    return code if isinstance(code, int) else 1


def main(argv: list[str] | None = None) -> int:
    """Run ``mixprec`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if getattr(args, "_run", None) is None:
            parser.print_help()
            return 2
        if args._check is not None:
            args._check(args, args._parser)
    except SystemExit as exc:  # argparse: a usage error (2) or --help (0)
        return _exit_code(exc)
    name = args._name
    try:
        return int(args._run(args) or 0)
    except BrokenPipeError:  # `mixprec formats | head`: the reader left; not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except (ValueError, TypeError) as exc:
        print(f"mixprec {name}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"mixprec {name}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
