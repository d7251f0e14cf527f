"""Explain how a number rounds into a format: bit fields, neighbours, error, every rounding mode.

``mixprec explain VALUE --format NAME`` takes VALUE exactly: a decimal (``0.1``, ``-1e-5``,
``3/4``), a hex float (``0x1.99ap-4``), ``inf`` or ``nan``. A VALUE that starts with ``-`` and
is not a plain number (``-inf``, ``-1e-5``, ``-0x1p-3``) goes after ``--``:
``mixprec explain --format e4m3 -- -inf``. A finite VALUE is used exactly, so it is bounded:
|VALUE| from 1e-1000 to below 1e1000 (every format's range lies far inside, and beyond it every
value rounds alike), at most 1200 significant digits. It prints the bit
fields of the rounded value, its exact decimal and hex values, the two representable values
bracketing the input, the rounding error in ULPs and relative terms, and what each rounding mode
gives (stochastic: both candidates and their probabilities), with overflow and underflow notes.

The analysis is :func:`mixprec.formats.explain`, in exact rational arithmetic that follows
:func:`mixprec.quantize` bit for bit; this command parses, calls it and prints the tables (or
``Explanation.to_json()`` with ``--json``).
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from mixprec.cli.arguments import format_name
from mixprec.cli.output import table_console
from mixprec.formats import ExactValue, Explanation, exact_decimal, explain, hexfloat, parse_value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from mixprec.quantization import ROUNDING_MODES

    parser.add_argument(
        "value", metavar="VALUE", type=_value_arg,
        help="0.1, -1e-5, 3/4, 0x1.99ap-4, inf, nan (finite: |VALUE| from 1e-1000 to below 1e1000)",
    )  # fmt: skip
    parser.add_argument(
        "--format", "-f", dest="fmt", metavar="NAME", required=True, type=format_name,
        help="target format: a name, an alias (bf16, e4m3, fp4, ...) or a custom eXmY",
    )  # fmt: skip
    parser.add_argument(
        "--rounding", "-r", default="nearest", choices=ROUNDING_MODES,
        help="the mode whose result is detailed at the top (default nearest; for stochastic: "
        "nearest, with both candidates in the table, which shows every mode)",
    )  # fmt: skip
    parser.add_argument(
        "--saturate", action="store_true", help="clamp overflow to ±max (quantize's saturate=True)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")


def _value_arg(text: str) -> ExactValue:
    try:
        return parse_value(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# ----------------------------------------------------------------------------------------------
# text for table cells
# ----------------------------------------------------------------------------------------------


def _short(s: str, limit: int = 96) -> str:
    """Cut a long string for a table cell (the JSON output keeps it whole)."""
    return s if len(s) <= limit else f"{s[: limit - 1]}…"


def _fmt_num(x: float | None) -> str:
    if x is None:
        return "none"
    return repr(x) if math.isfinite(x) or math.isnan(x) else ("inf" if x > 0 else "-inf")


def _spec(x: float | str, spec: str) -> str:
    """``format(x, spec)`` for a number; JSON's "inf"/"-inf" (an error past float64's range:
    the input is used exactly, so 1e-1000 rounded up is 1e676 times too large) as text."""
    if isinstance(x, str):
        return f"+{x}" if spec.startswith("+") and not x.startswith("-") else x
    return format(x, spec)


def _fmt_err(err: dict[str, Any]) -> tuple[str, str]:
    if err["ulps"] is None:
        return "-", "-"
    rel = "-" if err["relative"] is None else _spec(err["relative"], "+.3e")
    return _spec(err["ulps"], "+.6g"), rel


def _input_text(v: ExactValue) -> str:
    """The input as read: exact decimal, or the fraction and its nearest float64."""
    if v.exact is None:
        return v.kind if not v.negative else f"-{v.kind}"
    if v.exact == 0:
        return "-0" if v.negative else "0"
    if v.exact.denominator & (v.exact.denominator - 1) == 0:
        return _short(exact_decimal(v.exact), 96)
    as_text = str(v.exact) if len(str(v.exact)) <= 40 else v.text.strip()
    near = v.nearest_float()
    return _short(
        f"{as_text} exactly (not a binary fraction; nearest float64 {_fmt_num(near)} = "
        f"{hexfloat(near)})",
        96,
    )


def _error_text(err: dict[str, Any]) -> str:
    relative = "-" if err["relative"] is None else _spec(err["relative"], "+.6g")
    return (
        f"{_spec(err['absolute'], '+.6g')} = {_spec(err['ulps'], '+.6g')} ulp "
        f"(ulp {_spec(err['ulp'], '.6g')}), relative {relative}"
    )


# ----------------------------------------------------------------------------------------------
# tables
# ----------------------------------------------------------------------------------------------


def _result_rows(e: Explanation, d: dict[str, Any]) -> list[tuple[str, str]]:
    """Rows about the rounded value: bits, decoding, exact decimal and hex, neighbours, error."""
    r = d["result"]
    mode = e.rounding if e.rounding != "stochastic" else "nearest"
    rows = [(f"rounded ({mode})", _fmt_num(e.result))]
    if "code" in r:
        sign = f"{r['sign']} | " if r["sign"] is not None else ""
        mant = f" | {r['mantissa']}" if r["mantissa"] else ""
        rows.append(
            (
                "bits (sign | exponent | mantissa)",
                f"{sign}{r['exponent']}{mant}   code {r['code_hex']}",
            )
        )
    rows.append(("decoded", r["class"]))
    if math.isfinite(e.result):
        dec = r["decimal"]
        ndig = len(dec.lstrip("-0.").replace(".", ""))
        rows.append(("exact decimal", dec if len(dec) <= 96 else f"{_short(dec)} ({ndig} digits)"))
        rows.append(("hex", r["hex"]))
    for key, x in (("below", e.below), ("above", e.above)):
        nb = d["neighbours"][key]
        text = _fmt_num(x)
        if nb is not None and "code_hex" in nb and nb["hex"] not in ("inf", "-inf", "nan"):
            text += f"   ({nb['hex']}, code {nb['code_hex']})"
        rows.append((f"neighbour {key}", text))
    if r["error"]["ulps"] is not None:
        rows.append(("rounding error", _error_text(r["error"])))
    return rows


def _head_table(e: Explanation, d: dict[str, Any]) -> Any:
    from rich.table import Table

    head = Table(title=f"{e.value.text} in {e.fmt.name}", show_header=False, title_justify="left")
    head.add_column("field", style="bold")
    head.add_column("value", overflow="fold")
    head.add_row("input", _input_text(e.value))
    for label, text in _result_rows(e, d):
        head.add_row(label, text)
    return head


def _modes_table(e: Explanation, d: dict[str, Any]) -> Any:
    from rich.table import Table

    modes = Table(title="rounding modes", title_justify="left")
    for col in ("mode", "result", "hex", "code", "error (ulp)", "relative error"):
        modes.add_column(col, justify="left" if col in ("mode", "hex") else "right")
    for m, x in e.results.items():
        md = d["modes"][m]
        ulps, rel = _fmt_err(md["error"])
        modes.add_row(m, _fmt_num(x), md["hex"], md.get("code_hex", "-"), ulps, rel)
    for x, p in e.stochastic:
        md = e.value_info(x) or {}
        ulps, rel = _fmt_err(e.error(x))
        modes.add_row(
            f"stochastic (p={float(p):.6g})", _fmt_num(x), md.get("hex", "-"),
            md.get("code_hex", "-"), ulps, rel,
        )  # fmt: skip
    return modes


def render(e: Explanation) -> None:
    """Print an explanation as two tables (the value, then every rounding mode) and its notes."""
    d = e.to_json()
    console = table_console()
    console.print(_head_table(e, d))
    console.print(_modes_table(e, d))
    for note in e.notes:
        console.print(f"note: {note}")


def run(args: argparse.Namespace) -> int:
    e = explain(args.value, args.fmt, args.rounding, args.saturate)
    if args.json:
        print(json.dumps(e.to_json(), indent=2))
    else:
        render(e)
    return 0
