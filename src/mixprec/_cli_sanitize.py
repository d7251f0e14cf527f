"""Run a Python script under the numerical sanitizer and report where precision is lost.

    mixprec sanitize script.py [script args] [--out DIR] [--fail-on KIND[,KIND]]
                               [--threshold-bits N] [--no-grads] [--shadow float64|float32]
                               [--dtype-hint FORMAT] [--hist-format FORMAT] [--max-rows N]

The script runs as ``__main__`` (like ``python script.py``) inside ``mixprec.sanitize()``. The
findings table is printed; report.json, report.txt and report.png are written to ``--out``
(default ``./sanitize-report``). mixprec's own options may appear before or after the script
path; everything else after the script path goes to the script, and everything after a bare
``--`` goes to the script verbatim (use it for script options named like mixprec's).

Exit status: the script's own failure status if it failed (1 for an uncaught exception), else 1
when ``--fail-on`` names a kind that was found (``any`` = every kind), else 0.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
import traceback

_KIND_HELP = (
    "nan, inf, overflow, underflow, cancellation, precision_loss, decision_flip, or any; "
    "comma-separated"
)


def _add_options(p: argparse.ArgumentParser, *, defaults: bool) -> None:
    d = (lambda v: v) if defaults else (lambda v: argparse.SUPPRESS)
    p.add_argument(
        "--out",
        metavar="DIR",
        default=d("sanitize-report"),
        help="directory for report.json / report.txt / report.png (default: ./sanitize-report)",
    )
    p.add_argument(
        "--fail-on",
        metavar="KIND",
        default=d(None),
        help=f"exit 1 when a finding of this kind exists: {_KIND_HELP}",
    )
    p.add_argument(
        "--threshold-bits",
        type=float,
        metavar="N",
        default=d(None),
        help="flag ops losing more than N significand bits (default: half the "
        "mantissa of each result's format)",
    )
    p.add_argument(
        "--no-grads",
        action="store_true",
        default=d(False),
        help="do not shadow backward ops or collect gradient histograms",
    )
    p.add_argument(
        "--shadow",
        default=d("float64"),
        choices=["float64", "float32"],
        help="shadow precision (default float64)",
    )
    p.add_argument(
        "--dtype-hint",
        metavar="FORMAT",
        default=d(None),
        help="format float32 tensors really hold (emulated formats)",
    )
    p.add_argument(
        "--hist-format",
        metavar="FORMAT",
        default=d("float16"),
        help="target format of the gradient histogram (default float16)",
    )
    p.add_argument(
        "--max-rows",
        type=int,
        metavar="N",
        default=d(40),
        help="rows of the printed table (default 40; files hold everything)",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter  # keep the usage block
    _add_options(parser, defaults=True)
    # one REMAINDER positional (not script + REMAINDER): argparse then keeps a "--" that
    # follows the script path, which _split_script_args needs to see
    parser.add_argument(
        "command",
        nargs=argparse.REMAINDER,
        metavar="script.py [args]",
        help="the script and its arguments (mixprec options may follow)",
    )


def parse_fail_on(value: str | None) -> set[str]:
    """``"nan,inf"`` -> {"nan", "inf"}; ``"any"`` -> every kind. Unknown kinds: ValueError."""
    from .sanitize import KINDS

    if not value:
        return set()
    kinds: set[str] = set()
    for part in value.split(","):
        k = part.strip()
        if k in ("any", "all"):
            kinds.update(KINDS)
        elif k in KINDS:
            kinds.add(k)
        else:
            raise ValueError(
                f"--fail-on: unknown finding kind {k!r}; valid kinds are {', '.join(KINDS)}, any"
            )
    return kinds


def _split_script_args(args: argparse.Namespace) -> tuple[str, list[str]]:
    """(script, its argv): mixprec options after the script path (up to a bare --) are ours."""
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise ValueError("missing the script to run: mixprec sanitize script.py [args]")
    script, rest = command[0], command[1:]
    verbatim: list[str] = []
    if "--" in rest:
        i = rest.index("--")
        rest, verbatim = rest[:i], rest[i + 1 :]
    late = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    _add_options(late, defaults=False)
    ns, unknown = late.parse_known_args(rest)
    for k, v in vars(ns).items():
        setattr(args, k, v)
    return script, unknown + verbatim


def run(args: argparse.Namespace) -> int:
    script, script_argv = _split_script_args(args)
    fail_on = parse_fail_on(args.fail_on)
    if not os.path.isfile(script):
        raise FileNotFoundError(f"no such script: {script}")

    from rich.console import Console

    from .sanitize import sanitize

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
            except SystemExit as exc:
                code = exc.code
                status = code if isinstance(code, int) else (0 if code is None else 1)
            except Exception:
                traceback.print_exc()
                status = 1
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
