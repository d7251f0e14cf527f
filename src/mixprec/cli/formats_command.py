"""List the floating-point formats mixprec knows: layout, range, precision, special values.

``mixprec formats`` prints one row per named format; ``--format NAME`` describes one format
(any name, alias or custom ``eXmY``) in detail; ``--json`` prints the same data as JSON.

Special-value encodings are written as ``S.EEEEE.MM`` bit patterns: ``S`` is the sign bit (either
value), a run of more than 8 equal bits is abbreviated ``1{11}``, ``M{23}≠0`` means any nonzero
mantissa.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from mixprec.cli.arguments import format_name
from mixprec.formats.float_format import ALIASES, FORMATS, FloatFormat, get_format

SCHEMA_VERSION = 1


def _run_of(bit: str, n: int) -> str:
    return bit * n if n <= 8 else f"{bit}{{{n}}}"


def inf_encoding(f: FloatFormat) -> str:
    """Bit pattern of ±inf, or ``"none"``."""
    if not f.has_infinity:
        return "none"
    return f"S.{_run_of('1', f.exponent_bits)}.{_run_of('0', f.mantissa_bits)}"


def nan_encoding(f: FloatFormat) -> str:
    """Bit pattern(s) of NaN, or ``"none"``."""
    if not f.has_nan:
        return "none"
    e, m = f.exponent_bits, f.mantissa_bits
    if f.encoding == "ieee":
        mant = "M" if m <= 8 else f"M{{{m}}}"
        return f"S.{_run_of('1', e)}.{mant * m if m <= 8 else mant}≠0"
    if f.encoding == "fn":
        return f"S.{_run_of('1', e)}.{_run_of('1', m)}"
    if f.encoding == "fnuz":
        return f"0x{1 << (f.bits - 1):0{(f.bits + 3) // 4}X}"  # the negative-zero pattern
    if f.encoding == "e8m0":
        return f"0x{(1 << f.bits) - 1:X}"
    return "none"


def hexfloat(v: float) -> str:
    """Normalised hex float without trailing zeros: ``0x1.9ap-4``, ``0x1p-1074``, ``-0x0p+0``,
    ``inf``, ``nan`` (``float.hex`` writes subnormals as ``0x0.0000000000001p-1022``)."""
    if not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    sign = "-" if math.copysign(1.0, v) < 0 else ""
    if v == 0:
        return f"{sign}0x0p+0"
    m, e = math.frexp(abs(v))  # abs(v) = m * 2^e, m in [0.5, 1), exact also for subnormals
    frac = int(m * (1 << 53)) - (1 << 52)  # the 52 bits after the leading 1
    digits = f"{frac:013x}".rstrip("0")
    return f"{sign}0x1{'.' + digits if digits else ''}p{e - 1:+d}"


def _torch_name(f: FloatFormat) -> str | None:
    dtype = f.torch_dtype  # None where this torch build lacks the dtype
    return None if dtype is None else str(dtype)


def _ml_name(f: FloatFormat) -> str | None:
    if f.ml_dtypes_name is None:
        return None
    module = "numpy" if f.ml_dtypes_name in ("float64", "float32", "float16") else "ml_dtypes"
    return f"{module}.{f.ml_dtypes_name}" if f.ml_dtype is not None else None


def describe(f: FloatFormat) -> dict[str, Any]:
    """Everything the table shows, as JSON-ready values (floats are exact binary64 values)."""
    return {
        "name": f.name,
        "aliases": sorted(a for a, n in ALIASES.items() if n == f.name),
        "bits": f.bits,
        "exponent_bits": f.exponent_bits,
        "mantissa_bits": f.mantissa_bits,
        "bias": f.bias,
        "encoding": f.encoding,
        "emin": f.emin,
        "emax": f.emax,
        "max": f.max,
        "min_normal": f.min_normal,
        "min_subnormal": f.min_subnormal,
        "eps": f.eps,
        "max_hex": hexfloat(f.max),
        "min_normal_hex": hexfloat(f.min_normal),
        "min_subnormal_hex": hexfloat(f.min_subnormal),
        "has_infinity": f.has_infinity,
        "has_nan": f.has_nan,
        "has_negative_zero": f.has_negative_zero,
        "inf_encoding": inf_encoding(f),
        "nan_encoding": nan_encoding(f),
        "torch_dtype": _torch_name(f),
        "ml_dtype": _ml_name(f),
    }


def _g(v: float) -> str:
    return f"{v:.6g}"


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


def _console() -> Any:
    from rich.console import Console

    # a wide table: when not writing to a terminal (pipes, files, tests) do not squash it to 80
    return Console(width=None if sys.stdout.isatty() else 200, highlight=False)


def run(args: argparse.Namespace) -> int:
    formats = [get_format(args.fmt)] if args.fmt else list(FORMATS.values())
    rows = [describe(f) for f in formats]
    if args.json:
        print(json.dumps({"schema_version": SCHEMA_VERSION, "formats": rows}, indent=2))
        return 0
    from rich.table import Table

    console = _console()
    if args.fmt:
        d = rows[0]
        table = Table(title=f"{d['name']}", show_header=False, title_justify="left")
        table.add_column("field", style="bold")
        table.add_column("value")
        layout = (
            f"{'sign, ' if formats[0].is_signed else ''}{d['exponent_bits']} exponent bits, "
            f"{d['mantissa_bits']} mantissa bits"
        )
        items = [
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
        for k, v in items:
            table.add_row(k, v)
        console.print(table)
        return 0
    table = Table(title="mixprec formats")
    for col, justify in (
        ("name", "left"), ("bits", "right"), ("E", "right"), ("M", "right"), ("bias", "right"),
        ("max", "right"), ("min normal", "right"), ("min subnormal", "right"), ("eps", "right"),
        ("inf", "left"), ("NaN", "left"), ("torch", "left"), ("numpy/ml_dtypes", "left"),
    ):  # fmt: skip
        table.add_column(col, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for d in rows:
        table.add_row(
            d["name"], str(d["bits"]), str(d["exponent_bits"]), str(d["mantissa_bits"]),
            str(d["bias"]), _g(d["max"]), _g(d["min_normal"]), _g(d["min_subnormal"]),
            _g(d["eps"]), d["inf_encoding"], d["nan_encoding"],
            (d["torch_dtype"] or "-").removeprefix("torch."),
            d["ml_dtype"] or "-",
        )  # fmt: skip
    console.print(table)
    console.print(
        "S = sign bit; 1{n} = n one bits; M≠0 = any nonzero mantissa. "
        "Aliases and custom eXmY formats: mixprec formats --format NAME"
    )
    return 0
