"""List the floating-point formats mixprec knows: layout, range, precision, special values.

``mixprec formats`` prints one row per named format; ``--format NAME`` describes one format
(any name, alias or custom ``eXmY``) in detail; ``--json`` prints the same data as JSON;
``--width N`` lays the tables out for N columns (:mod:`mixprec.cli.output`: a narrow terminal
gets the columns split between tables, never a cut value). The data comes from
:func:`mixprec.formats.format_info` and :func:`mixprec.formats.format_table`.

Special-value encodings are written as ``S.EEEEE.MM`` bit patterns: ``S`` is the sign bit (either
value), a run of more than 8 equal bits is abbreviated ``1{11}``, ``M{23}≠0`` means any nonzero
mantissa (:func:`mixprec.formats.encoding_patterns`).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from mixprec.cli.arguments import format_name
from mixprec.cli.output import Column, Printer, add_width_argument
from mixprec.formats import format_info, format_table, get_format
from mixprec.schema import SCHEMA_VERSION

# groups: where the table is split between several (a narrow terminal), each group stays in one
# table if it fits there
_COLUMNS = (
    Column("name"),
    Column("bits", "right", "layout"), Column("E", "right", "layout"),
    Column("M", "right", "layout"), Column("bias", "right", "layout"),
    Column("max", "right", "range"), Column("min normal", "right", "range"),
    Column("min subnormal", "right", "range"), Column("eps", "right", "range"),
    Column("inf", group="special values"), Column("NaN", group="special values"),
    Column("torch", group="types"), Column("numpy/ml_dtypes", group="types"),
)  # fmt: skip
_LEGEND = (
    "S = sign bit; 1{n} = n one bits; M≠0 = any nonzero mantissa. "
    "Aliases and custom eXmY formats: mixprec formats --format NAME"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--format",
        "-f",
        metavar="NAME",
        dest="fmt",
        type=format_name,
        help="describe one format (a name, an alias such as bf16 or e4m3, or a custom eXmY)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_width_argument(parser)


def _g(v: float) -> str:
    return f"{v:.6g}"


def _detail_rows(d: dict[str, Any], signed: bool) -> list[tuple[str, str]]:
    layout = (
        f"{'sign, ' if signed else ''}{d['exponent_bits']} exponent bits, "
        f"{d['mantissa_bits']} mantissa bits"
    )
    return [
        ("aliases", ", ".join(d["aliases"]) or "-"),
        ("bits", f"{d['bits']} ({layout})"),
        ("bias", str(d["bias"])),
        ("encoding family", d["encoding"]),
        ("exponent range", f"emin {d['emin']}, emax {d['emax']}"),
        ("max", f"{_g(d['max'])}  ({d['max_hex']})"),
        ("min normal", f"{_g(d['min_normal'])}  ({d['min_normal_hex']})"),
        ("min subnormal", f"{_g(d['min_subnormal'])}  ({d['min_subnormal_hex']})"),
        ("eps", f"{_g(d['eps'])}  (2^-{d['mantissa_bits']})"),
        ("inf", d["inf_encoding"]),
        ("NaN", d["nan_encoding"]),
        ("negative zero", "yes" if d["has_negative_zero"] else "no"),
        ("torch dtype", d["torch_dtype"] or "-"),
        ("numpy/ml_dtypes", d["ml_dtype"] or "-"),
    ]


def _print_one(d: dict[str, Any], signed: bool, printer: Printer) -> None:
    printer.pairs(d["name"], _detail_rows(d, signed))


def _row(d: dict[str, Any]) -> list[str]:
    return [
        d["name"], str(d["bits"]), str(d["exponent_bits"]), str(d["mantissa_bits"]),
        str(d["bias"]), _g(d["max"]), _g(d["min_normal"]), _g(d["min_subnormal"]),
        _g(d["eps"]), d["inf_encoding"], d["nan_encoding"],
        (d["torch_dtype"] or "-").removeprefix("torch."), d["ml_dtype"] or "-",
    ]  # fmt: skip


def _print_all(rows: list[dict[str, Any]], printer: Printer) -> None:
    printer.columns("mixprec formats", _COLUMNS, [_row(d) for d in rows])
    printer.text(_LEGEND)


def run(args: argparse.Namespace) -> int:
    rows = [format_info(args.fmt)] if args.fmt else format_table()
    if args.json:
        print(json.dumps({"schema_version": SCHEMA_VERSION, "formats": rows}, indent=2))
    elif args.fmt:
        _print_one(rows[0], get_format(args.fmt).is_signed, Printer.for_width(args.width))
    else:
        _print_all(rows, Printer.for_width(args.width))
    return 0
