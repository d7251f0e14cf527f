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

The values come from :func:`mixprec.quantize.quantize` on a float64 input. An input that float64
cannot hold exactly (0.1) is replaced by its round-to-odd float64 neighbour, which rounds exactly
like the true value into every format with at most 51 significant bits; for wider formats the
modes are decided from the exact neighbours.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import struct
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from mixprec.cli.arguments import format_name
from mixprec.cli.formats_command import _console, hexfloat
from mixprec.formats.float_format import FloatFormat, get_format

SCHEMA_VERSION = 1
DETERMINISTIC = ("nearest", "toward_zero", "up", "down", "odd")
_MAX64 = 1.7976931348623157e308
_HEX = re.compile(r"^0x([0-9a-f]*)(?:\.([0-9a-f]*))?(?:p([+-]?\d+))?$")


# ----------------------------------------------------------------------------------------------
# parsing
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Value:
    """A parsed input: ``kind`` is "finite", "inf" or "nan"; ``exact`` is the signed value."""

    text: str
    kind: str
    negative: bool
    exact: Fraction | None = None


# An input is used exactly, so its size is bounded (the exact decimals, errors and JSON strings
# grow with it): magnitudes from 1e-1000 up to below 1e1000 (every format's range, 2^-1074 ..
# 2^1024, lies far inside; beyond it every value rounds alike), at most this many significant
# digits (the exact decimal of any float64 has at most 767).
MAX_DECIMAL_EXPONENT = 1000
MAX_DIGITS = 1200
_DEC = re.compile(r"^(\d*)(?:\.(\d*))?(?:e([+-]?\d+))?$")
_RATIO = re.compile(r"^(\d+)\s*/\s*(\d+)$")
_LOW = Fraction(1, 10**MAX_DECIMAL_EXPONENT)
_HIGH = Fraction(10**MAX_DECIMAL_EXPONENT)


class _OutOfRange(Exception):
    """Too large or small (or, with ``digits``, too many significant digits) to use exactly."""

    def __init__(self, digits: str = "") -> None:
        super().__init__()
        self.digits = digits  # the limit broken, e.g. "1200 significant digits"


def _exponent(text: str | None) -> int:
    """An exponent's digits; ones too long to be in range raise _OutOfRange (no huge ints)."""
    if not text:
        return 0
    if len(text.lstrip("+-").lstrip("0")) > 7:
        raise _OutOfRange
    return int(text)


def _parse_magnitude(body: str) -> Fraction | None:
    """|VALUE| exactly, None when it is not a number; _OutOfRange beyond the bounds, checked
    before any big integer is built."""
    if not body or body[0] in "+-":
        return None
    m = _HEX.match(body)
    if m is not None:
        if not (m.group(1) or m.group(2)):
            return None
        whole, frac = m.group(1), m.group(2) or ""
        digits = (whole + frac).lstrip("0")
        if not digits:
            return Fraction(0)
        if len(digits) > MAX_DIGITS // 4:
            raise _OutOfRange(digits=f"{MAX_DIGITS // 4} hex digits")
        mant = int(digits, 16)
        shift = _exponent(m.group(3)) - 4 * len(frac)
        if not -4 * MAX_DECIMAL_EXPONENT <= mant.bit_length() + shift <= 4 * MAX_DECIMAL_EXPONENT:
            raise _OutOfRange
        return Fraction(mant) * Fraction(2) ** shift
    m = _RATIO.match(body)
    if m is not None:
        num, den = m.group(1).lstrip("0"), m.group(2).lstrip("0")
        if not den:
            return None  # n/0
        if max(len(num), len(den)) > MAX_DIGITS:
            raise _OutOfRange(digits=f"{MAX_DIGITS} significant digits")
        return Fraction(int(num or "0"), int(den))
    m = _DEC.match(body)
    if m is None or not (m.group(1) or m.group(2)):
        return None
    frac = m.group(2) or ""
    digits = (m.group(1) + frac).lstrip("0")
    significant = digits.rstrip("0")
    if not significant:
        return Fraction(0)  # 0, 0.000, 0e999999
    if len(significant) > MAX_DIGITS:
        raise _OutOfRange(digits=f"{MAX_DIGITS} significant digits")
    scale = _exponent(m.group(3)) - len(frac) + (len(digits) - len(significant))
    if not -2 * MAX_DECIMAL_EXPONENT <= len(significant) + scale <= 2 * MAX_DECIMAL_EXPONENT:
        raise _OutOfRange
    n = int(significant)
    return Fraction(n * 10**scale) if scale >= 0 else Fraction(n, 10**-scale)


def parse_value(text: str) -> Value:
    """Parse VALUE exactly (no float rounding). Raises ValueError naming the accepted forms, or
    the accepted range for a finite value too large or small (or long) to use exactly."""
    s = text.strip().lower().replace("_", "")
    negative = s.startswith("-")
    body = s[1:] if s[:1] in "+-" and s else s
    if body in ("inf", "infinity"):
        return Value(text, "inf", negative)
    if body == "nan":
        return Value(text, "nan", negative)
    try:
        mag = _parse_magnitude(body)
        if mag is not None and mag != 0 and not _LOW <= mag < _HIGH:
            raise _OutOfRange
    except _OutOfRange as exc:
        if exc.digits:
            raise ValueError(
                f"VALUE {_short(text, 40)!r} has too many digits: explain uses VALUE exactly and "
                f"takes at most {exc.digits} (the exact decimal of any float64 has at most 767 "
                "significant digits)"
            ) from None
        raise ValueError(
            f"VALUE {_short(text, 40)!r} is out of range: explain uses VALUE exactly and takes "
            f"magnitudes from 1e-{MAX_DECIMAL_EXPONENT} to below 1e{MAX_DECIMAL_EXPONENT}; every "
            "format overflows above 2^1024 and underflows below 2^-1075, so a value such as "
            "1e400 or 1e-400 rounds as any larger or smaller one would; for infinity write inf"
        ) from None
    if mag is None:
        raise ValueError(
            f"cannot parse VALUE {text!r}: expected a decimal (0.1, -1e-5, 3/4), a hex float "
            "(0x1.99ap-4), inf or nan"
        )
    return Value(text, "finite", negative, -mag if negative else mag)


# ----------------------------------------------------------------------------------------------
# exact helpers
# ----------------------------------------------------------------------------------------------


def exact_decimal(x: Fraction) -> str:
    """Exact decimal expansion of a dyadic rational (every binary float value is one)."""
    n, d = abs(x.numerator), x.denominator
    k = d.bit_length() - 1
    if d != 1 << k:
        raise ValueError(f"{x} is not a binary fraction")
    digits = str(n * 5**k)
    if k:
        digits = digits.rjust(k + 1, "0")
        whole, frac = digits[:-k], digits[-k:].rstrip("0")
        digits = f"{whole}.{frac}" if frac else whole
    return ("-" if x < 0 else "") + digits


def _short(s: str, limit: int = 96) -> str:
    """Cut a long string for a table cell (the JSON output keeps it whole)."""
    return s if len(s) <= limit else f"{s[: limit - 1]}…"


def _bits64(v: float) -> int:
    return struct.unpack("<Q", struct.pack("<d", v))[0]


def _float64_bracket(v: Fraction) -> tuple[float, float]:
    """Neighbouring float64 values lo <= v <= hi (equal when v is a float64; ±inf past max)."""
    f = _nearest64(v)
    if math.isinf(f):
        return (_MAX64, math.inf) if f > 0 else (-math.inf, -_MAX64)
    if Fraction(f) == v:
        return f, f
    if Fraction(f) < v:
        return f, math.nextafter(f, math.inf)
    return math.nextafter(f, -math.inf), f


def _nearest64(v: Fraction) -> float:
    try:
        return float(v)
    except OverflowError:
        return math.inf if v > 0 else -math.inf


def _round_to_odd64(v: Fraction) -> float:
    lo, hi = _float64_bracket(v)
    if lo == hi:
        return lo
    if math.isinf(hi):
        return lo
    if math.isinf(lo):
        return hi
    return lo if _bits64(lo) & 1 else hi


def _floor_log2(x: Fraction) -> int:
    x = abs(x)
    e = x.numerator.bit_length() - x.denominator.bit_length()
    return e - 1 if x < Fraction(2) ** e else e


# ----------------------------------------------------------------------------------------------
# rounding through mixprec.quantize
# ----------------------------------------------------------------------------------------------


def _q(x: float, f: FloatFormat, mode: str, saturate: bool) -> float:
    import torch

    from mixprec.quantization.elementwise import quantize

    t = torch.tensor([x], dtype=torch.float64)
    return float(quantize(t, f, rounding=mode, saturate=saturate)[0])


def _code(x: float, f: FloatFormat) -> int | None:
    """The bit pattern of a representable value, or None (NaN in a format without NaN)."""
    import torch

    from mixprec.quantization.elementwise import encode

    if math.isnan(x) and not f.has_nan:
        return None
    if f.bits == 64:  # float64's own layout (float64, e11m52); encode's int64 path cannot hold it
        return 0x7FF8000000000000 if math.isnan(x) else _bits64(x)
    return int(encode(torch.tensor([x], dtype=torch.float64), f)[0]) & ((1 << f.bits) - 1)


def _fields(code: int, f: FloatFormat) -> dict[str, Any]:
    m, e = f.mantissa_bits, f.exponent_bits
    sign = (code >> (e + m)) & 1 if f.is_signed else None
    exp = (code >> m) & ((1 << e) - 1)
    mant = code & ((1 << m) - 1)
    return {
        "code": code,
        "code_hex": f"0x{code:0{(f.bits + 3) // 4}X}",
        "sign": None if sign is None else format(sign, "b"),
        "exponent": format(exp, f"0{e}b"),
        "mantissa": format(mant, f"0{m}b") if m else "",
        "exponent_field": exp,
        "mantissa_field": mant,
    }


def _classify(x: float, code: int | None, f: FloatFormat) -> str:
    if math.isnan(x):
        return "NaN" if code is not None else "NaN (not encodable: the format has no NaN)"
    if math.isinf(x):
        return "infinity"
    if x == 0:
        return "zero"
    if f.encoding == "e8m0":
        return f"2^{_floor_log2(Fraction(x))} (power of two)"
    assert code is not None
    fl = _fields(code, f)
    ef, mf, m = fl["exponent_field"], fl["mantissa_field"], f.mantissa_bits
    sign = "-" if x < 0 else "+"
    if ef == 0:
        return f"subnormal: {sign}2^{1 - f.bias} × 0.{fl['mantissa']}b"
    mant = f"1.{fl['mantissa']}b" if m else "1"
    sig = 1 + Fraction(mf, 1 << m)
    return f"normal: {sign}2^{ef - f.bias} × {mant} (= {sign}{float(sig)!r} × 2^{ef - f.bias})"


def _ulp(v: Fraction, f: FloatFormat) -> Fraction:
    """Spacing of the format around |v| (the binade's quantum; subnormal quantum below)."""
    e = f.emin if v == 0 else min(max(_floor_log2(v), f.emin), f.emax)
    return Fraction(2) ** (e - f.mantissa_bits)


@dataclass(frozen=True)
class Explanation:
    fmt: FloatFormat
    value: Value
    rounding: str
    saturate: bool
    results: dict[str, float]
    stochastic: list[tuple[float, Fraction]]
    below: float | None
    above: float | None
    notes: list[str]


def _neighbours(v: Fraction, f: FloatFormat) -> tuple[float | None, float | None]:
    """Largest representable value <= v and smallest >= v (±inf count; None where none)."""
    lo64, hi64 = _float64_bracket(v)
    # every format's values are float64 values, so rounding the float64 neighbours is exact
    below = _q(lo64, f, "down", False)
    above = _q(hi64, f, "up", False)
    if math.isnan(below) or (not math.isinf(below) and Fraction(below) > v):
        below = None
    if math.isnan(above) or (not math.isinf(above) and Fraction(above) < v):
        above = None
    return below, above


def _wide_results(
    v: Fraction, f: FloatFormat, below: float | None, above: float | None, saturate: bool
) -> dict[str, float]:
    """Mode results for an inexact v in a format of 52-53 significant bits (IEEE-style only),
    where a float64 proxy would round twice: decided from the exact neighbours."""
    assert below is not None and above is not None  # IEEE formats have ±inf
    top = Fraction(2) ** (f.emax + 1)  # the first value past max with an unbounded exponent
    lo_f = Fraction(below) if math.isfinite(below) else -top
    hi_f = Fraction(above) if math.isfinite(above) else top

    def even(x: float) -> bool:
        code = _code(x, f) if math.isfinite(x) else 0  # the value past max has mantissa 0
        return code is not None and code & 1 == 0

    d_lo, d_hi = v - lo_f, hi_f - v
    nearest = below if d_lo < d_hi else above if d_lo > d_hi else (below if even(below) else above)
    finite = [x for x in (below, above) if math.isfinite(x)]
    odd = finite[0] if len(finite) == 1 else (below if not even(below) else above)
    res = {
        "nearest": nearest,
        "toward_zero": below if v > 0 else above,
        "up": above,
        "down": below,
        "odd": odd,
    }
    if saturate:
        res = {k: max(-f.max, min(f.max, x)) for k, x in res.items()}
    return res


def explain(
    value: Value, f: FloatFormat, rounding: str = "nearest", saturate: bool = False
) -> Explanation:
    """Everything ``mixprec explain`` shows, computed exactly (no float rounding of the input)."""
    notes: list[str] = []
    stochastic: list[tuple[float, Fraction]]
    below: float | None
    above: float | None
    if value.kind != "finite":
        x = math.nan if value.kind == "nan" else (-math.inf if value.negative else math.inf)
        results = {m: _q(x, f, m, saturate) for m in DETERMINISTIC}
        stochastic = [(_q(x, f, "stochastic", saturate), Fraction(1))]
        below = above = None
        if value.kind == "inf":
            edge = -f.max if value.negative else f.max
            if f.has_infinity:
                below = above = x
            elif value.negative:
                above = edge
            else:
                below = edge
            if not f.has_infinity:
                becomes = (
                    "NaN without saturation, ±max with --saturate"
                    if f.has_nan
                    else "±max (it always saturates)"
                )
                notes.append(f"{f.name} has no infinity: inf gives {becomes}")
        elif not f.has_nan:
            notes.append(
                f"{f.name} has no NaN encoding: quantize keeps NaN in the container tensor, "
                "encode raises"
            )
        return Explanation(f, value, rounding, saturate, results, stochastic, below, above, notes)

    v = value.exact
    assert v is not None
    proxy = _round_to_odd64(v)
    if v == 0 and value.negative:
        proxy = -0.0
    below, above = _neighbours(v, f)
    exact = below is not None and below == above
    if exact or f.precision <= 51:
        results = {m: _q(proxy, f, m, saturate) for m in DETERMINISTIC}
    else:
        results = _wide_results(v, f, below, above, saturate)

    # stochastic: the two candidates and P(up) = (v - lo) / (hi - lo), exactly
    vmax = Fraction(f.max)
    top = Fraction(2) ** (f.emax + 1)
    # past ±max, the bracket's outer end is ±2^(emax+1), the next value of an unbounded range
    lo_f = hi_f = None
    if below is not None and math.isfinite(below):
        lo_f = Fraction(below)
    elif v < -vmax:
        lo_f = -top
    if above is not None and math.isfinite(above):
        hi_f = Fraction(above)
    elif v > vmax:
        hi_f = top
    if exact or lo_f is None or hi_f is None:
        stochastic = [(results["nearest"], Fraction(1))]
    else:
        lo64, hi64 = _float64_bracket(v)
        cand_lo = _q(lo64, f, "down", saturate)
        cand_hi = _q(hi64, f, "up", saturate)
        p_hi = min(max((v - lo_f) / (hi_f - lo_f), Fraction(0)), Fraction(1))
        stochastic = [(c, p) for c, p in ((cand_lo, 1 - p_hi), (cand_hi, p_hi)) if p > 0]
        if _same(cand_lo, cand_hi):
            stochastic = [(cand_lo, Fraction(1))]

    # notes on range
    a = abs(v)
    if v < 0 and not f.is_signed:
        notes.append(f"{f.name} is unsigned (a scale format): negative inputs give NaN")
    elif a > vmax:
        if not f.has_nan and not f.has_infinity:
            notes.append(
                f"|value| > max {f.max!r}: {f.name} has no inf or NaN, so it always saturates "
                "to ±max"
            )
        else:
            special = "±inf" if f.has_infinity else "NaN"
            notes.append(
                f"|value| > max {f.max!r}: round-to-nearest overflows to {special} unless it "
                "saturates (--saturate, quantize(..., saturate=True)) to ±max; toward_zero never "
                "overflows, up/down only in their own direction"
            )
    elif f.encoding == "e8m0" and a < Fraction(f.min_normal):
        notes.append(f"{f.name} has no zero: values below 2^-127 give 2^-127")
    elif 0 < a < Fraction(f.min_normal):
        bits = _floor_log2(a) - (f.emin - f.mantissa_bits) + 1
        if bits > 0:
            notes.append(
                f"subnormal range (below min normal {f.min_normal!r}): at most {bits} "
                f"significant bit(s) instead of {f.precision}"
            )
        if a < Fraction(f.min_subnormal) / 2:
            notes.append(
                f"below half the smallest subnormal {f.min_subnormal!r}: round-to-nearest "
                "underflows to zero"
            )
    if v == 0 and value.negative and not f.has_negative_zero:
        notes.append(f"{f.name} has no negative zero: -0 becomes +0")
    if exact:
        notes.append(f"exactly representable in {f.name}")
    if Fraction(proxy) != v:
        notes.append(
            f"the input is not a float64 value (nearest float64: {_fmt_num(_nearest64(v))}); "
            "it is used exactly"
        )
    return Explanation(f, value, rounding, saturate, results, stochastic, below, above, notes)


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or (
        a == b and math.copysign(1, a) == math.copysign(1, b)
    )


# ----------------------------------------------------------------------------------------------
# rendering
# ----------------------------------------------------------------------------------------------


def _jnum(x: float) -> float | str:
    """JSON has no NaN/inf: those become strings "nan", "inf", "-inf"."""
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def _float_decimal(x: float) -> str:
    """Exact decimal of a float, "-0" for negative zero, "inf"/"-inf"/"nan" for specials."""
    if not math.isfinite(x):
        return str(_jnum(x))
    if x == 0:
        return "-0" if math.copysign(1.0, x) < 0 else "0"
    return exact_decimal(Fraction(x))


def _describe_value(x: float | None, f: FloatFormat) -> dict[str, Any] | None:
    if x is None:
        return None
    code = _code(x, f)
    out: dict[str, Any] = {
        "value": _jnum(x),
        "decimal": _float_decimal(x),
        "hex": hexfloat(x),
        "class": _classify(x, code, f),
    }
    if code is not None:
        out.update({k: v for k, v in _fields(code, f).items() if not k.endswith("_field")})
    return out


def _error(x: float, e: Explanation) -> dict[str, Any]:
    v = e.value.exact
    if v is None or not math.isfinite(x):
        return {"absolute": None, "ulps": None, "relative": None}
    err = Fraction(x) - v
    ulp = _ulp(v, e.fmt)
    return {
        "absolute": _jnum(_nearest64(err)),
        "absolute_exact": str(err),
        "ulp": _jnum(_nearest64(ulp)),
        "ulps": _jnum(_nearest64(err / ulp)),
        "relative": None if v == 0 else _jnum(_nearest64(err / abs(v))),
    }


def to_json(e: Explanation) -> dict[str, Any]:
    v = e.value
    inp: dict[str, Any] = {"text": v.text, "kind": v.kind}
    if v.exact is not None:
        inp["exact"] = str(v.exact)
        inp["float64"] = _jnum(_nearest64(v.exact))
    chosen = e.results[e.rounding] if e.rounding != "stochastic" else e.results["nearest"]
    modes: dict[str, Any] = {
        m: {**(_describe_value(x, e.fmt) or {}), "error": _error(x, e)}
        for m, x in e.results.items()
    }
    modes["stochastic"] = [
        {**(_describe_value(x, e.fmt) or {}), "probability": float(p), "probability_exact": str(p)}
        for x, p in e.stochastic
    ]
    return {
        "schema_version": SCHEMA_VERSION,
        "format": e.fmt.name,
        "input": inp,
        "rounding": e.rounding,
        "saturate": e.saturate,
        "result": {**(_describe_value(chosen, e.fmt) or {}), "error": _error(chosen, e)},
        "neighbours": {
            "below": _describe_value(e.below, e.fmt),
            "above": _describe_value(e.above, e.fmt),
        },
        "modes": modes,
        "notes": e.notes,
    }


def _fmt_num(x: float | None) -> str:
    if x is None:
        return "none"
    return repr(x) if math.isfinite(x) or math.isnan(x) else ("inf" if x > 0 else "-inf")


def _spec(x: float | str, spec: str) -> str:
    """``format(x, spec)`` for a number; _jnum's "inf"/"-inf" (an error past float64's range:
    the input is used exactly, so 1e-1000 rounded up is 1e676 times too large) as text."""
    if isinstance(x, str):
        return f"+{x}" if spec.startswith("+") and not x.startswith("-") else x
    return format(x, spec)


def _fmt_err(err: dict[str, Any]) -> tuple[str, str]:
    if err["ulps"] is None:
        return "-", "-"
    rel = "-" if err["relative"] is None else _spec(err["relative"], "+.3e")
    return _spec(err["ulps"], "+.6g"), rel


def render(e: Explanation) -> None:
    from rich.table import Table

    d = to_json(e)
    console = _console()
    f = e.fmt
    v = e.value
    head = Table(title=f"{v.text} in {f.name}", show_header=False, title_justify="left")
    head.add_column("field", style="bold")
    head.add_column("value", overflow="fold")
    if v.exact is not None:
        if v.exact.denominator & (v.exact.denominator - 1) == 0:
            exact_in = exact_decimal(v.exact)
        else:
            as_text = str(v.exact) if len(str(v.exact)) <= 40 else v.text.strip()
            near = _nearest64(v.exact)
            exact_in = (
                f"{as_text} exactly (not a binary fraction; nearest float64 {_fmt_num(near)} = "
                f"{hexfloat(near)})"
            )
        if v.exact == 0 and v.negative:
            exact_in = "-0"
        head.add_row("input", _short(exact_in, 96))
    else:
        head.add_row("input", v.kind if not v.negative else f"-{v.kind}")
    r = d["result"]
    mode = e.rounding if e.rounding != "stochastic" else "nearest"
    head.add_row(f"rounded ({mode})", f"{_fmt_num(e.results[mode])}")
    if "code" in r:
        sign = f"{r['sign']} | " if r["sign"] is not None else ""
        mant = f" | {r['mantissa']}" if r["mantissa"] else ""
        head.add_row(
            "bits (sign | exponent | mantissa)",
            f"{sign}{r['exponent']}{mant}   code {r['code_hex']}",
        )
    head.add_row("decoded", r["class"])
    if math.isfinite(e.results[mode]):
        dec = r["decimal"]
        ndig = len(dec.lstrip("-0.").replace(".", ""))
        head.add_row("exact decimal", dec if len(dec) <= 96 else f"{_short(dec)} ({ndig} digits)")
        head.add_row("hex", r["hex"])
    for label, key in (("neighbour below", "below"), ("neighbour above", "above")):
        nb = d["neighbours"][key]
        text = _fmt_num(e.below if key == "below" else e.above)
        if nb is not None and "code_hex" in nb and nb["hex"] not in ("inf", "-inf", "nan"):
            text += f"   ({nb['hex']}, code {nb['code_hex']})"
        head.add_row(label, text)
    err = r["error"]
    if err["ulps"] is not None:
        head.add_row(
            "rounding error",
            f"{_spec(err['absolute'], '+.6g')} = {_spec(err['ulps'], '+.6g')} ulp "
            f"(ulp {_spec(err['ulp'], '.6g')}), "
            + (
                "relative -"
                if err["relative"] is None
                else f"relative {_spec(err['relative'], '+.6g')}"
            ),
        )
    console.print(head)

    modes = Table(title="rounding modes", title_justify="left")
    for col in ("mode", "result", "hex", "code", "error (ulp)", "relative error"):
        modes.add_column(col, justify="left" if col in ("mode", "hex") else "right")
    for m in DETERMINISTIC:
        md = d["modes"][m]
        ulps, rel = _fmt_err(md["error"])
        modes.add_row(m, _fmt_num(e.results[m]), md["hex"], md.get("code_hex", "-"), ulps, rel)
    for x, p in e.stochastic:
        md = _describe_value(x, f) or {}
        ulps, rel = _fmt_err(_error(x, e))
        modes.add_row(
            f"stochastic (p={float(p):.6g})", _fmt_num(x), md.get("hex", "-"),
            md.get("code_hex", "-"), ulps, rel,
        )  # fmt: skip
    console.print(modes)
    for note in e.notes:
        console.print(f"note: {note}")


# ----------------------------------------------------------------------------------------------
# command
# ----------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from mixprec.quantization.params import ROUNDING_MODES

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


def _value_arg(text: str) -> Value:
    try:
        return parse_value(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    f = get_format(args.fmt)
    value = args.value if isinstance(args.value, Value) else parse_value(args.value)
    e = explain(value, f, args.rounding, args.saturate)
    if args.json:
        print(json.dumps(to_json(e), indent=2))
    else:
        render(e)
    return 0
