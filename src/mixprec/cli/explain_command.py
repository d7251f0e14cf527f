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
``Explanation.to_json()`` with ``--json``), laid out for the terminal's width or ``--width N``
(:mod:`mixprec.cli.output`): long values wrap, whole, and are never cut.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from mixprec.cli.arguments import format_name
from mixprec.cli.output import Column, Printer, add_width_argument
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
    add_width_argument(parser)


def _value_arg(text: str) -> ExactValue:
    try:
        return parse_value(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# ----------------------------------------------------------------------------------------------
# text for table cells
# ----------------------------------------------------------------------------------------------


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
        return exact_decimal(v.exact)
    as_text = str(v.exact) if len(str(v.exact)) <= 40 else v.text.strip()
    near = v.nearest_float()
    return (
        f"{as_text} exactly (not a binary fraction; nearest float64 {_fmt_num(near)} = "
        f"{hexfloat(near)})"
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
        ndig = len(dec.lstrip("-0.").replace(".", ""))  # a long one wraps: say how long it is
        rows.append(("exact decimal", dec if len(dec) <= 96 else f"{dec} ({ndig} digits)"))
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


_MODE_COLUMNS = (
    Column("mode"), Column("result", "right", "value"), Column("hex", group="value"),
    Column("code", "right", "value"), Column("error (ulp)", "right", "error"),
    Column("relative error", "right", "error"),
)  # fmt: skip


def _head_rows(e: Explanation, d: dict[str, Any]) -> list[tuple[str, str]]:
    return [("input", _input_text(e.value)), *_result_rows(e, d)]


def _mode_rows(e: Explanation, d: dict[str, Any]) -> list[list[str]]:
    rows = []
    for m, x in e.results.items():
        md = d["modes"][m]
        rows.append([m, _fmt_num(x), md["hex"], md.get("code_hex", "-"), *_fmt_err(md["error"])])
    for x, p in e.stochastic:
        md = e.value_info(x) or {}
        rows.append([
            f"stochastic (p={float(p):.6g})", _fmt_num(x), md.get("hex", "-"),
            md.get("code_hex", "-"), *_fmt_err(e.error(x)),
        ])  # fmt: skip
    return rows


def render(e: Explanation, width: int | None = None) -> None:
    """Print an explanation as tables (the value, then every rounding mode) and its notes, laid
    out for ``width`` columns (default :func:`mixprec.cli.output.output_width`)."""
    d = e.to_json()
    printer = Printer.for_width(width)
    printer.pairs(f"{e.value.text} in {e.fmt.name}", _head_rows(e, d))
    printer.columns("rounding modes", _MODE_COLUMNS, _mode_rows(e, d))
    for note in e.notes:
        printer.text(f"note: {note}")


def run(args: argparse.Namespace) -> int:
    e = explain(args.value, args.fmt, args.rounding, args.saturate)
    if args.json:
        print(json.dumps(e.to_json(), indent=2))
    else:
        render(e, args.width)
    return 0
