"""Run a Python script under the numerical sanitizer and report where precision is lost.

    mixprec sanitize script.py [script args] [--out DIR] [--fail-on KIND[,KIND]]
                               [--threshold-bits N] [--no-grads] [--shadow float64|float32]
                               [--dtype-hint FORMAT] [--shadow-memory MIB]
                               [--hist-format FORMAT] [--max-rows N]

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
import sys

from mixprec.cli.arguments import float_in, format_name, int_at_least, output_dir
from mixprec.cli.output import PIPE_WIDTH, output_width
from mixprec.cli.scripts import (
    ScriptOption,
    add_script_arguments,
    prepare_script,
    run_script,
    script_check,
)

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


_OPTIONS = (
    ScriptOption(
        "--out",
        "sanitize-report",
        "directory for report.json / report.txt / report.png (default: ./sanitize-report)",
        type=output_dir,
        metavar="DIR",
    ),
    ScriptOption(
        "--fail-on",
        None,
        f"exit 1 when a finding of this kind exists: {_KIND_HELP}",
        type=_fail_on,
        metavar="KIND",
    ),
    ScriptOption(
        "--threshold-bits",
        None,
        "flag ops losing more than N significand bits, 0 < N <= 53 (default: half the "
        "mantissa of each result's format)",
        type=float_in(0, 53, low_open=True),
        metavar="N",
    ),
    ScriptOption(
        "--no-grads",
        False,
        "do not shadow backward ops or collect gradient histograms",
        action="store_true",
    ),
    ScriptOption(
        "--shadow",
        "float64",
        "shadow precision (default float64)",
        choices=("float64", "float32"),
    ),
    ScriptOption(
        "--dtype-hint",
        None,
        "format float32 tensors really hold (emulated formats)",
        type=format_name,
        metavar="FORMAT",
    ),
    ScriptOption(
        "--shadow-memory",
        64,
        "MiB of float64 shadows kept as they are; beyond it, long-lived shadows are "
        "compressed to float32 residuals (default 64)",
        type=int_at_least(0),
        metavar="MIB",
    ),
    ScriptOption(
        "--hist-format",
        "float16",
        "target format of the gradient histogram (default float16)",
        type=format_name,
        metavar="FORMAT",
    ),
    ScriptOption(
        "--max-rows",
        40,
        "rows of the printed table, N >= 0 (default 40; files hold everything)",
        type=int_at_least(0),
        metavar="N",
    ),
    ScriptOption(
        "--width",
        None,
        "lay the table out for N columns (default: $COLUMNS, else the terminal's width, "
        f"else {PIPE_WIDTH} when piped)",
        type=int_at_least(1),
        metavar="N",
    ),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_script_arguments(parser, _OPTIONS)


def _prepare(args: argparse.Namespace) -> None:
    """Split off the script and its arguments and check the script; ValueError if bad."""
    prepare_script(args, _OPTIONS, "sanitize")


check = script_check(_prepare)


def run(args: argparse.Namespace) -> int:
    if not hasattr(args, "script"):  # called without check(): same checks, as ValueError
        _prepare(args)
    script, script_argv = args.script, args.script_argv
    fail_on = parse_fail_on(args.fail_on)

    from rich.console import Console

    from mixprec.sanitizer import sanitize

    width = output_width(args.width)
    console = Console(width=width, highlight=False)
    with sanitize(
        shadow=args.shadow,
        threshold_bits=args.threshold_bits,
        track_grads=not args.no_grads,
        dtype_hint=args.dtype_hint,
        shadow_memory_mib=args.shadow_memory,
    ) as report:
        status = run_script(script, script_argv)

    if sys.stdout.isatty():
        report.print(console=console, max_rows=args.max_rows, fmt=args.hist_format)
    else:  # piped: plain text, no padding to the width
        print(report.render(width, max_rows=args.max_rows, fmt=args.hist_format))
    paths = report.save(args.out, fmt=args.hist_format)
    written = f"report written to {paths['json']}, {paths['text']}, {paths['png']}"
    console.print(written, soft_wrap=True, markup=False)
    if status:
        console.print(f"[red]the script exited with status {status}[/red]")
        return status
    hit = sorted({f.kind for f in report.findings} & fail_on)
    if hit:
        console.print(f"[red]failing: found {', '.join(hit)} (--fail-on {args.fail_on})[/red]")
        return 1
    return 0
