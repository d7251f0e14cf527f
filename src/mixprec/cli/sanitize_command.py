"""Run a Python script under the numerical sanitizer and report where precision is lost.

    mixprec sanitize script.py [script args] [--out DIR] [--fail-on KIND[,KIND]]
                               [--threshold-bits N] [--no-grads] [--shadow float64|float32]
                               [--dtype-hint FORMAT] [--hist-format FORMAT] [--max-rows N]

The script runs as ``__main__`` (like ``python script.py``) inside ``mixprec.sanitize()``. The
findings table is printed; report.json, report.txt and report.png are written to ``--out``
(default ``./sanitize-report``). mixprec's own options may appear before or after the script
path; everything else after the script path goes to the script, and everything after a bare
``--`` goes to the script verbatim (use it for script options named like mixprec's).

Every option is checked before the script starts (formats exist, kinds are known, numbers are
in range, the script is a file): a bad one is a usage error, ``mixprec sanitize: error: ...``
with exit status 2, and the script does not run.

The script ends as under ``python script.py``: ``sys.exit(N)`` gives status N, ``sys.exit()``
and ``sys.exit(None)`` give 0, ``sys.exit("message")`` (any non-integer) prints the message to
stderr and gives 1, an uncaught exception prints its traceback (from the script's own frames
on, as python shows it; a ``SyntaxError`` without one) and gives 1, and Ctrl-C
(``KeyboardInterrupt``) prints its traceback and gives 130. Whichever way it ends, the findings
of what ran are still printed and written to ``--out`` (a crash is often what one is
investigating); a script that failed is then named with its status.

Exit status: the script's own nonzero status if it had one, else 1 when ``--fail-on`` names a
kind that was found (``any`` = every kind), else 0; 2 for a bad command line.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, NoReturn

from mixprec.cli.arguments import float_in, format_name, int_at_least, output_dir

_KIND_HELP = (
    "nan, inf, overflow, underflow, cancellation, precision_loss, decision_flip, or any; "
    "comma-separated"
)


def parse_fail_on(value: str | None) -> set[str]:
    """``"nan,inf"`` -> {"nan", "inf"}; ``"any"`` -> every kind. Unknown kinds: ValueError."""
    from mixprec.sanitizer import KINDS

    if not value:
        return set()
    kinds: set[str] = set()
    for part in value.split(","):
        k = part.strip()
        if k in ("any", "all"):
            kinds.update(KINDS)
        elif k in KINDS:
            kinds.add(k)
        elif k:
            raise ValueError(f"unknown finding kind {k!r}; valid kinds are {', '.join(KINDS)}, any")
    return kinds


def _fail_on(text: str) -> str:
    try:
        parse_fail_on(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


@dataclass(frozen=True)
class _Option:
    """One of mixprec's own options (accepted before and after the script path)."""

    flag: str
    default: Any
    help: str
    type: Callable[[str], Any] | None = None
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    action: str | None = None

    def add_to(self, p: argparse.ArgumentParser, *, defaults: bool) -> None:
        # without defaults (the late parser): options not given stay as the first parse set them
        kw: dict[str, Any] = {"default": self.default if defaults else argparse.SUPPRESS}
        for name in ("type", "metavar", "choices", "action"):
            if getattr(self, name) is not None:
                kw[name] = getattr(self, name)
        p.add_argument(self.flag, help=self.help, **kw)


_OPTIONS = (
    _Option(
        "--out",
        "sanitize-report",
        "directory for report.json / report.txt / report.png (default: ./sanitize-report)",
        type=output_dir,
        metavar="DIR",
    ),
    _Option(
        "--fail-on",
        None,
        f"exit 1 when a finding of this kind exists: {_KIND_HELP}",
        type=_fail_on,
        metavar="KIND",
    ),
    _Option(
        "--threshold-bits",
        None,
        "flag ops losing more than N significand bits, 0 < N <= 53 (default: half the "
        "mantissa of each result's format)",
        type=float_in(0, 53, low_open=True),
        metavar="N",
    ),
    _Option(
        "--no-grads",
        False,
        "do not shadow backward ops or collect gradient histograms",
        action="store_true",
    ),
    _Option(
        "--shadow",
        "float64",
        "shadow precision (default float64)",
        choices=("float64", "float32"),
    ),
    _Option(
        "--dtype-hint",
        None,
        "format float32 tensors really hold (emulated formats)",
        type=format_name,
        metavar="FORMAT",
    ),
    _Option(
        "--hist-format",
        "float16",
        "target format of the gradient histogram (default float16)",
        type=format_name,
        metavar="FORMAT",
    ),
    _Option(
        "--max-rows",
        40,
        "rows of the printed table, N >= 0 (default 40; files hold everything)",
        type=int_at_least(0),
        metavar="N",
    ),
)


def _add_options(p: argparse.ArgumentParser, *, defaults: bool) -> None:
    for option in _OPTIONS:
        option.add_to(p, defaults=defaults)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter  # keep the usage block
    _add_options(parser, defaults=True)
    # one REMAINDER positional (not script + REMAINDER): argparse then keeps a "--" that
    # follows the script path, which _split_script_args needs to see. Its dest may not be
    # "command", the subparsers' dest: it would replace the subcommand's name.
    parser.add_argument(
        "script_command",
        nargs=argparse.REMAINDER,
        metavar="script.py [args]",
        help="the script and its arguments (mixprec options may follow)",
    )


class _LateOptionError(Exception):
    """A bad mixprec option after the script path (reported through the real parser)."""


class _LateParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _LateOptionError(message)


def _split_script_args(args: argparse.Namespace) -> tuple[str, list[str]]:
    """(script, its argv): mixprec options after the script path (up to a bare --) are ours.
    A bad one raises ValueError with argparse's message."""
    command = list(args.script_command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise ValueError("missing the script to run: mixprec sanitize script.py [args]")
    script, rest = command[0], command[1:]
    verbatim: list[str] = []
    if "--" in rest:
        i = rest.index("--")
        rest, verbatim = rest[:i], rest[i + 1 :]
    late = _LateParser(prog="mixprec sanitize", add_help=False, allow_abbrev=False)
    _add_options(late, defaults=False)
    try:
        ns, unknown = late.parse_known_args(rest)
    except _LateOptionError as exc:
        raise ValueError(str(exc)) from None
    for k, v in vars(ns).items():
        setattr(args, k, v)
    return script, unknown + verbatim


def _prepare(args: argparse.Namespace) -> None:
    """Split off the script and its arguments and check the script; ValueError if bad."""
    script, script_argv = _split_script_args(args)
    if not os.path.exists(script):
        raise ValueError(f"cannot run script {script!r}: no such file or directory")
    if not os.path.isfile(script):
        raise ValueError(f"cannot run script {script!r}: it is not a regular file")
    args.script, args.script_argv = script, script_argv


def check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Every option, also those after the script path, before anything runs (usage errors)."""
    try:
        _prepare(args)
    except ValueError as exc:
        parser.error(str(exc))


def _script_frames(tb: TracebackType | None, script: str) -> TracebackType | None:
    """The traceback from the script's first frame on (python shows no runpy/mixprec frames)."""
    target = os.path.abspath(script)
    while tb is not None and os.path.abspath(tb.tb_frame.f_code.co_filename) != target:
        tb = tb.tb_next
    return tb


def _report_exit(exc: BaseException, script: str) -> int:
    """Print what python prints when a script ends with ``exc``; return python's exit status."""
    sys.stdout.flush()
    if isinstance(exc, SystemExit):
        code = exc.code
        if code is None:
            return 0
        if isinstance(code, int):
            return int(code)  # sys.exit(True) is status 1
        print(code, file=sys.stderr)  # sys.exit("message"): the message, status 1
        return 1
    traceback.print_exception(type(exc), exc, _script_frames(exc.__traceback__, script))
    sys.stderr.flush()
    return 130 if isinstance(exc, KeyboardInterrupt) else 1


def run(args: argparse.Namespace) -> int:
    if not hasattr(args, "script"):  # called without check(): same checks, as ValueError
        _prepare(args)
    script, script_argv = args.script, args.script_argv
    fail_on = parse_fail_on(args.fail_on)

    from rich.console import Console

    from mixprec.sanitizer import sanitize

    console = Console(width=None if sys.stdout.isatty() else 150)
    old_argv, old_path = sys.argv, list(sys.path)
    sys.argv = [script, *script_argv]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))  # as `python script.py` does
    status = 0
    try:
        with sanitize(
            shadow=args.shadow,
            threshold_bits=args.threshold_bits,
            track_grads=not args.no_grads,
            dtype_hint=args.dtype_hint,
        ) as report:
            try:
                runpy.run_path(script, run_name="__main__")
            except (SystemExit, KeyboardInterrupt, Exception) as exc:
                status = _report_exit(exc, script)
    finally:
        sys.argv = old_argv
        sys.path[:] = old_path

    report.print(console=console, max_rows=args.max_rows, fmt=args.hist_format)
    paths = report.save(args.out, fmt=args.hist_format)
    console.print(f"report written to {paths['json']}, {paths['text']}, {paths['png']}")
    if status:
        console.print(f"[red]the script exited with status {status}[/red]")
        return status
    hit = sorted({f.kind for f in report.findings} & fail_on)
    if hit:
        console.print(f"[red]failing: found {', '.join(hit)} (--fail-on {args.fail_on})[/red]")
        return 1
    return 0
