"""Describe a format, and explain how one value rounds into it: exact, and without torch.

Two questions about a format, answered with integer and :class:`fractions.Fraction` arithmetic
(like the rest of :mod:`mixprec.formats`, this module needs no tensor kernel):

* What is in it? :func:`format_info` gives every derived value of a format, the bit patterns of
  its infinities and NaNs (:func:`encoding_patterns`) and the matching torch and numpy/ml_dtypes
  types; :func:`format_table` gives that row for every named format.
* What happens to one value? :func:`explain` reads the value exactly (:func:`parse_value`),
  rounds it in every mode with :func:`round_exact` and returns an :class:`Explanation`: the bit
  fields of the result (:func:`bit_pattern`), the representable neighbours, the error in ULPs,
  the two stochastic-rounding candidates with their exact probabilities, and notes on overflow,
  saturation, subnormals and underflow; ``Explanation.to_json()`` is a JSON document.

:func:`round_exact` and :func:`bit_pattern` follow :func:`mixprec.quantize` and
:func:`mixprec.encode` bit for bit (the tests compare them over every format and mode); being
exact, they also round values float64 cannot hold (``1/10``, ``1e400``) once, where a float64
input would already have been rounded. ``mixprec formats`` and ``mixprec explain`` print these
results.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Literal

from mixprec.formats.float_format import (
    ALIASES,
    FORMATS,
    ROUNDING_MODES,
    FloatFormat,
    check_flag,
    check_rounding,
    get_format,
)
from mixprec.schema import SCHEMA_VERSION

# the deterministic rounding modes, in the order explain reports them
DETERMINISTIC_MODES: tuple[str, ...] = tuple(m for m in ROUNDING_MODES if m != "stochastic")

# A value is used exactly, so its size is bounded (its exact decimals, errors and JSON strings
# grow with it): magnitudes from 1e-1000 up to below 1e1000 (every format's range, 2^-1074 ..
# 2^1024, lies far inside; beyond it every value rounds alike), at most this many significant
# digits (the exact decimal of any float64 has at most 767).
MAX_DECIMAL_EXPONENT = 1000
MAX_DIGITS = 1200
_LOW = Fraction(1, 10**MAX_DECIMAL_EXPONENT)
_HIGH = Fraction(10**MAX_DECIMAL_EXPONENT)
_HEX = re.compile(r"^0x([0-9a-f]*)(?:\.([0-9a-f]*))?(?:p([+-]?\d+))?$")
_DEC = re.compile(r"^(\d*)(?:\.(\d*))?(?:e([+-]?\d+))?$")
_RATIO = re.compile(r"^(\d+)\s*/\s*(\d+)$")


# ----------------------------------------------------------------------------------------------
# reading a value exactly
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExactValue:
    """A value read exactly: ``kind`` is "finite", "inf" or "nan"; ``exact`` the signed value
    (None unless finite); ``negative`` also tells -0 from 0 and -inf from inf."""

    text: str
    kind: Literal["finite", "inf", "nan"]
    negative: bool
    exact: Fraction | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("finite", "inf", "nan"):
            raise ValueError(f"kind {self.kind!r} is not one of 'finite', 'inf', 'nan'")
        if (self.kind == "finite") != isinstance(self.exact, Fraction):
            want = "a Fraction" if self.kind == "finite" else "None"
            raise ValueError(f"a {self.kind} value needs exact={want}, got {self.exact!r}")

    def nearest_float(self) -> float:
        """The nearest float64 (±inf past float64's range; nan and ±inf as themselves)."""
        if self.exact is None:
            special = math.nan if self.kind == "nan" else math.inf
            return -special if self.negative else special
        return -0.0 if self.exact == 0 and self.negative else _nearest64(self.exact)


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


def _parse_hex(m: re.Match[str]) -> Fraction | None:
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


def _parse_ratio(m: re.Match[str]) -> Fraction | None:
    num, den = m.group(1).lstrip("0"), m.group(2).lstrip("0")
    if not den:
        return None  # n/0
    if max(len(num), len(den)) > MAX_DIGITS:
        raise _OutOfRange(digits=f"{MAX_DIGITS} significant digits")
    return Fraction(int(num or "0"), int(den))


def _parse_decimal(m: re.Match[str]) -> Fraction | None:
    if not (m.group(1) or m.group(2)):
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


def _parse_magnitude(body: str) -> Fraction | None:
    """|VALUE| exactly, None when it is not a number; _OutOfRange beyond the bounds, checked
    before any big integer is built."""
    if not body or body[0] in "+-":
        return None
    for pattern, parse in ((_HEX, _parse_hex), (_RATIO, _parse_ratio), (_DEC, _parse_decimal)):
        m = pattern.match(body)
        if m is not None:
            return parse(m)
    return None


def _range_error(text: str, exc: _OutOfRange) -> ValueError:
    if exc.digits:
        return ValueError(
            f"VALUE {_short(text, 40)!r} has too many digits: explain uses VALUE exactly and "
            f"takes at most {exc.digits} (the exact decimal of any float64 has at most 767 "
            "significant digits)"
        )
    return ValueError(
        f"VALUE {_short(text, 40)!r} is out of range: explain uses VALUE exactly and takes "
        f"magnitudes from 1e-{MAX_DECIMAL_EXPONENT} to below 1e{MAX_DECIMAL_EXPONENT}; every "
        "format overflows above 2^1024 and underflows below 2^-1075, so a value such as "
        "1e400 or 1e-400 rounds as any larger or smaller one would; for infinity write inf"
    )


def _check_range(mag: Fraction) -> None:
    if mag != 0 and not _LOW <= mag < _HIGH:
        raise _OutOfRange


def parse_value(text: str) -> ExactValue:
    """Read a decimal (``0.1``, ``-1e-5``, ``3/4``), a hex float (``0x1.99ap-4``), ``inf`` or
    ``nan`` exactly, never through a float. ``_`` digit separators are ignored.

    Raises ValueError naming the accepted forms, or the accepted range for a finite value too
    large or small (|VALUE| from 1e-1000 to below 1e1000) or too long (1200 significant digits)
    to use exactly. Cost: linear in the length of ``text`` (the bounds are checked before any
    big integer is built).
    """
    if not isinstance(text, str):
        raise TypeError(f"expected the value as text, got {type(text).__name__}: {text!r}")
    s = text.strip().lower().replace("_", "")
    negative = s.startswith("-")
    body = s[1:] if s[:1] in "+-" and s else s
    if body in ("inf", "infinity"):
        return ExactValue(text, "inf", negative)
    if body == "nan":
        return ExactValue(text, "nan", negative)
    try:
        mag = _parse_magnitude(body)
        if mag is not None:
            _check_range(mag)
    except _OutOfRange as exc:
        raise _range_error(text, exc) from None
    if mag is None:
        raise ValueError(
            f"cannot parse VALUE {text!r}: expected a decimal (0.1, -1e-5, 3/4), a hex float "
            "(0x1.99ap-4), inf or nan"
        )
    return ExactValue(text, "finite", negative, -mag if negative else mag)


def _as_exact(value: object) -> ExactValue:
    """explain's input as an ExactValue: text is parsed, numbers are taken as they are."""
    if isinstance(value, ExactValue):
        return value
    if isinstance(value, str):
        return parse_value(value)
    if isinstance(value, float) and not math.isfinite(value):
        kind: Literal["inf", "nan"] = "nan" if math.isnan(value) else "inf"
        return ExactValue(repr(value), kind, math.copysign(1.0, value) < 0)
    if isinstance(value, (Fraction, int, float)) and not isinstance(value, bool):
        exact = Fraction(value)
        try:
            _check_range(abs(exact))
        except _OutOfRange as exc:
            raise _range_error(str(value), exc) from None
        negative = exact < 0 or (isinstance(value, float) and math.copysign(1.0, value) < 0)
        return ExactValue(str(value), "finite", negative, exact)
    raise TypeError(
        "expected the value as text, an ExactValue, int, float or Fraction, got "
        f"{type(value).__name__}: {value!r}"
    )


# ----------------------------------------------------------------------------------------------
# writing numbers exactly
# ----------------------------------------------------------------------------------------------


def exact_decimal(x: Fraction) -> str:
    """The exact decimal expansion of a dyadic rational (every binary float value is one):
    ``exact_decimal(Fraction(3, 8))`` is ``"0.375"``, ``exact_decimal(Fraction(0.1))`` has 55
    digits. ValueError for a denominator that is not a power of two (it never ends).
    """
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


def _short(s: str, limit: int = 96) -> str:
    """Cut a long string for a message (JSON keeps it whole)."""
    return s if len(s) <= limit else f"{s[: limit - 1]}…"


def _float_text(x: float) -> str:
    """repr, with ``inf``/``-inf`` for the infinities."""
    return repr(x) if math.isfinite(x) or math.isnan(x) else ("inf" if x > 0 else "-inf")


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


def _nearest64(v: Fraction) -> float:
    try:
        return float(v)
    except OverflowError:
        return math.inf if v > 0 else -math.inf


def _floor_log2(x: Fraction) -> int:
    x = abs(x)
    e = x.numerator.bit_length() - x.denominator.bit_length()
    return e - 1 if x < Fraction(2) ** e else e


# ----------------------------------------------------------------------------------------------
# rounding and encoding one value exactly
# ----------------------------------------------------------------------------------------------


def _sign_magnitude(x: object) -> tuple[bool, Fraction | float]:
    """(negative, |x|): |x| a Fraction, or math.inf / math.nan; -0.0 counts as negative."""
    if isinstance(x, bool) or not isinstance(x, (Fraction, int, float)):
        raise TypeError(f"expected an int, float or Fraction, got {type(x).__name__}: {x!r}")
    if isinstance(x, float):
        negative = math.copysign(1.0, x) < 0
        return negative, abs(Fraction(x)) if math.isfinite(x) else abs(x)
    return x < 0, abs(Fraction(x))


def _round_magnitude(a: Fraction, f: FloatFormat, mode: str, negative: bool) -> Fraction:
    """|x| rounded onto the format's grid with an unbounded exponent (overflow comes after)."""
    if a == 0:
        return a
    quantum = Fraction(2) ** (max(_floor_log2(a), f.emin) - f.mantissa_bits)
    k, rem = divmod(a, quantum)  # k integral steps, rem in [0, quantum)
    k = int(k)
    inexact = rem != 0
    if mode == "nearest":  # ties to an even k (for eXm0 and e8m0 k is 1 in a binade: ties go up)
        k += int(rem * 2 > quantum or (rem * 2 == quantum and k % 2 == 1))
    elif mode == "up":
        k += int(inexact and not negative)
    elif mode == "down":
        k += int(inexact and negative)
    elif mode == "odd":
        k |= int(inexact)
    return k * quantum


def _overflow(f: FloatFormat, mode: str, negative: bool, infinite: bool, saturate: bool) -> float:
    """|result| past max: inf (or NaN without inf) where the mode rounds away, else max."""
    if saturate or not (f.has_infinity or f.has_nan):
        return f.max  # saturation, or a format with neither inf nor NaN (it always saturates)
    away = (
        mode == "nearest"
        or infinite  # inf stays inf (or NaN) in every mode; only saturation clamps it
        or (mode == "up" and not negative)
        or (mode == "down" and negative)
    )
    if not away:
        return f.max  # IEEE 754: directed modes never overflow against their direction
    return math.inf if f.has_infinity else math.nan


def round_exact(
    x: Fraction | float | int,
    fmt: str | FloatFormat,
    rounding: str = "nearest",
    saturate: bool = False,
) -> float:
    """``x`` rounded into ``fmt`` with exact arithmetic: what :func:`mixprec.quantize` gives.

    ``x`` is used exactly (a Fraction is never rounded to float64 first); ``rounding`` is one of
    the deterministic modes (``nearest``, ``toward_zero``, ``up``, ``down``, ``odd``: ties to
    even on the significand, so for eXm0 and e8m0 ties go up); ``saturate`` clamps overflow and
    ±inf to ±max. Overflow otherwise gives ±inf where the format has it, else NaN (directed
    modes never overflow against their direction); formats with neither always saturate. NaN
    stays NaN; e8m0 (unsigned, no zero) gives NaN for negative values and 2^-127 for [0, 2^-127];
    ``fnuz`` formats have no -0. Returns a float64 (it holds every value of every format).

    Cost: a few big-integer operations on ``x``'s numerator and denominator; for one value, not
    for tensors (use quantize).
    """
    f = get_format(fmt)
    mode = check_rounding(rounding, modes=DETERMINISTIC_MODES)
    saturate = check_flag(saturate, "saturate")
    negative, a = _sign_magnitude(x)
    if isinstance(a, float) and math.isnan(a):
        return math.nan
    if f.encoding == "e8m0" and negative and a != 0:
        return math.nan  # unsigned: no negative value (and -0 is 0)
    infinite = isinstance(a, float)
    r = math.inf if infinite else _round_magnitude(Fraction(a), f, mode, negative)
    if r > f.max_exact:
        mag = _overflow(f, mode, negative, infinite, saturate)
    elif r == 0 and not f.has_zero:
        mag = f.min_normal  # e8m0: [0, 2^-127] gives its smallest value
    else:
        mag = float(r)  # exact: every value of every format is a float64 value
    if math.isnan(mag) or not f.is_signed or (mag == 0 and not f.has_negative_zero):
        return mag
    return -mag if negative else mag


def bit_pattern(x: float, fmt: str | FloatFormat) -> int | None:
    """The code (bit pattern, as a non-negative int) of ``x``, a value of ``fmt``: what
    :func:`mixprec.encode` gives. NaN gives the canonical NaN code, or None in a format without
    NaN; -0 gives +0's code in a format without -0. ValueError when ``x`` is not a value of
    ``fmt`` (round it first: :func:`round_exact`).
    """
    f = get_format(fmt)
    if isinstance(x, bool) or not isinstance(x, (float, int)):
        raise TypeError(f"expected a float, got {type(x).__name__}: {x!r}")
    if isinstance(x, int) and abs(x) >= 2**1024:
        raise ValueError(f"{_short(repr(x), 40)} is not a value of {f.name} (past float64's range)")
    x = float(x)
    if math.isnan(x):
        return f.nan_code
    if round_exact(x, f, "toward_zero") != x or (math.isinf(x) and not f.has_infinity):
        raise ValueError(f"{x!r} is not a value of {f.name}; round it first (round_exact)")
    m = f.mantissa_bits
    negative = math.copysign(1.0, x) < 0 and (x != 0 or f.has_negative_zero)
    sign = int(negative) << (f.exponent_bits + m)
    if math.isinf(x):
        return sign | (((1 << f.exponent_bits) - 1) << m)
    if x == 0:
        return sign
    a = abs(Fraction(x))
    e = _floor_log2(a)
    if f.encoding == "e8m0":
        return e + f.bias
    if e < f.emin:  # subnormal: exponent field 0, the mantissa counts the smallest quantum
        return sign | int(a / Fraction(2) ** (f.emin - m))
    mant = int(a / Fraction(2) ** (e - m)) - (1 << m)
    return sign | ((e + f.bias) << m) | mant


# ----------------------------------------------------------------------------------------------
# describing a format
# ----------------------------------------------------------------------------------------------


def _run_of(bit: str, n: int) -> str:
    return bit * n if n <= 8 else f"{bit}{{{n}}}"


def _inf_pattern(f: FloatFormat) -> str:
    if not f.has_infinity:
        return "none"
    return f"S.{_run_of('1', f.exponent_bits)}.{_run_of('0', f.mantissa_bits)}"


def _nan_pattern(f: FloatFormat) -> str:
    if not f.has_nan:
        return "none"
    e, m = f.exponent_bits, f.mantissa_bits
    if f.encoding == "ieee":
        mant = "M" if m <= 8 else f"M{{{m}}}"
        return f"S.{_run_of('1', e)}.{mant * m if m <= 8 else mant}≠0"
    if f.encoding == "fn":
        return f"S.{_run_of('1', e)}.{_run_of('1', m)}"
    return f"0x{f.nan_code:0{(f.bits + 3) // 4}X}"  # one code: fnuz's -0 pattern, e8m0's 0xFF


def encoding_patterns(fmt: str | FloatFormat) -> dict[str, str]:
    """The bit patterns of ±inf and NaN, ``{"inf": ..., "nan": ...}``, as ``S.EEEE.MMM``.

    ``S`` is the sign bit (either value), a run of more than 8 equal bits is abbreviated
    ``1{11}``, ``M≠0`` means any nonzero mantissa (``M{23}≠0`` for 23 such bits), ``0x80`` is a
    single code (the negative-zero pattern ``fnuz`` formats use for NaN), ``"none"`` means the
    format has no such value: ``encoding_patterns("bf16")`` is
    ``{"inf": "S.11111111.0000000", "nan": "S.11111111.MMMMMMM≠0"}``.
    """
    f = get_format(fmt)
    return {"inf": _inf_pattern(f), "nan": _nan_pattern(f)}


def _torch_name(f: FloatFormat) -> str | None:
    dtype = f.torch_dtype  # None where this torch build lacks the dtype
    return None if dtype is None else str(dtype)


def _ml_name(f: FloatFormat) -> str | None:
    if f.ml_dtypes_name is None:
        return None
    module = "numpy" if f.ml_dtypes_name in ("float64", "float32", "float16") else "ml_dtypes"
    return f"{module}.{f.ml_dtypes_name}" if f.ml_dtype is not None else None


def format_info(fmt: str | FloatFormat) -> dict[str, Any]:
    """Everything ``mixprec formats`` shows about one format, as JSON-ready values.

    Keys: name, aliases, bits, exponent_bits, mantissa_bits, bias, encoding, emin, emax, max,
    min_normal, min_subnormal, eps (floats: exact binary64 values), their ``*_hex`` forms,
    has_infinity, has_nan, has_negative_zero, inf_encoding and nan_encoding
    (:func:`encoding_patterns`), torch_dtype (``"torch.bfloat16"``) and ml_dtype
    (``"ml_dtypes.bfloat16"``, ``"numpy.float32"``), None where there is none. Cost: imports
    torch and ml_dtypes (once) to see which dtypes this installation has.
    """
    f = get_format(fmt)
    patterns = encoding_patterns(f)
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
        "inf_encoding": patterns["inf"],
        "nan_encoding": patterns["nan"],
        "torch_dtype": _torch_name(f),
        "ml_dtype": _ml_name(f),
    }


def format_table() -> list[dict[str, Any]]:
    """:func:`format_info` of every named format (``FORMATS``), in registry order."""
    return [format_info(f) for f in FORMATS.values()]


# ----------------------------------------------------------------------------------------------
# explaining one value
# ----------------------------------------------------------------------------------------------


def _ulp(v: Fraction, f: FloatFormat) -> Fraction:
    """Spacing of the format around |v| (the binade's quantum; subnormal quantum below)."""
    e = f.emin if v == 0 else min(max(_floor_log2(v), f.emin), f.emax)
    return Fraction(2) ** (e - f.mantissa_bits)


def _classify(x: float, code: int | None, f: FloatFormat) -> str:
    """How a value's fields decode: ``normal: +2^-4 × 1.1001101b (= +1.6015625 × 2^-4)``."""
    if math.isnan(x):
        return "NaN" if code is not None else "NaN (not encodable: the format has no NaN)"
    if math.isinf(x):
        return "infinity"
    if x == 0:
        return "zero"
    if f.encoding == "e8m0" or code is None:  # (code is None only for NaN, handled above)
        return f"2^{_floor_log2(Fraction(x))} (power of two)"
    m = f.mantissa_bits
    ef, mf = (code >> m) & ((1 << f.exponent_bits) - 1), code & ((1 << m) - 1)
    bits = format(mf, f"0{m}b") if m else ""
    sign = "-" if x < 0 else "+"
    if ef == 0:
        return f"subnormal: {sign}2^{1 - f.bias} × 0.{bits}b"
    mant = f"1.{bits}b" if m else "1"
    sig = 1 + Fraction(mf, 1 << m)
    return f"normal: {sign}2^{ef - f.bias} × {mant} (= {sign}{float(sig)!r} × 2^{ef - f.bias})"


def _fields(code: int, f: FloatFormat) -> dict[str, Any]:
    m, e = f.mantissa_bits, f.exponent_bits
    sign = (code >> (e + m)) & 1 if f.is_signed else None
    return {
        "code": code,
        "code_hex": f"0x{code:0{(f.bits + 3) // 4}X}",
        "sign": None if sign is None else format(sign, "b"),
        "exponent": format((code >> m) & ((1 << e) - 1), f"0{e}b"),
        "mantissa": format(code & ((1 << m) - 1), f"0{m}b") if m else "",
    }


@dataclass(frozen=True)
class Explanation:
    """How one value rounds into one format (what ``mixprec explain`` prints); see :func:`explain`.

    ``results`` maps each deterministic mode (``DETERMINISTIC_MODES``) to its rounded value;
    ``stochastic`` holds the candidates of stochastic rounding with their exact probabilities;
    ``below`` / ``above`` are the representable neighbours of the input (±inf count; None where
    there is none); ``notes`` say what is special (overflow, subnormal range, exactness, ...).
    Values are floats: every value of every format is a float64 value.
    """

    fmt: FloatFormat
    value: ExactValue
    rounding: str
    saturate: bool
    results: Mapping[str, float]
    stochastic: tuple[tuple[float, Fraction], ...]
    below: float | None
    above: float | None
    notes: tuple[str, ...]

    @property
    def result(self) -> float:
        """The value in the chosen mode (for ``stochastic``: nearest, the candidates' mean)."""
        return self.results["nearest" if self.rounding == "stochastic" else self.rounding]

    def value_info(self, x: float | None) -> dict[str, Any] | None:
        """A value of the format, JSON-ready: value, exact decimal, hex, how its fields decode
        and, where it has a code, the code and its sign / exponent / mantissa bits."""
        if x is None:
            return None
        code = bit_pattern(x, self.fmt)
        out: dict[str, Any] = {
            "value": _jnum(x),
            "decimal": _float_decimal(x),
            "hex": hexfloat(x),
            "class": _classify(x, code, self.fmt),
        }
        if code is not None:
            out.update(_fields(code, self.fmt))
        return out

    def error(self, x: float) -> dict[str, Any]:
        """The error of ``x`` against the input: absolute (also exact, as a fraction string), in
        ULPs of the format at the input, relative; None for a non-finite input or ``x``."""
        v = self.value.exact
        if v is None or not math.isfinite(x):
            return {"absolute": None, "ulps": None, "relative": None}
        err = Fraction(x) - v
        ulp = _ulp(v, self.fmt)
        return {
            "absolute": _jnum(_nearest64(err)),
            "absolute_exact": str(err),
            "ulp": _jnum(_nearest64(ulp)),
            "ulps": _jnum(_nearest64(err / ulp)),
            "relative": None if v == 0 else _jnum(_nearest64(err / abs(v))),
        }

    def to_json(self) -> dict[str, Any]:
        """The JSON document of ``mixprec explain --json`` (schema_version, format, input,
        rounding, saturate, result, neighbours, modes, notes); NaN and ±inf as strings."""
        v = self.value
        inp: dict[str, Any] = {"text": v.text, "kind": v.kind}
        if v.exact is not None:
            inp["exact"] = str(v.exact)
            inp["float64"] = _jnum(_nearest64(v.exact))
        modes: dict[str, Any] = {
            m: {**(self.value_info(x) or {}), "error": self.error(x)}
            for m, x in self.results.items()
        }
        modes["stochastic"] = [
            {**(self.value_info(x) or {}), "probability": float(p), "probability_exact": str(p)}
            for x, p in self.stochastic
        ]
        return {
            "schema_version": SCHEMA_VERSION,
            "format": self.fmt.name,
            "input": inp,
            "rounding": self.rounding,
            "saturate": self.saturate,
            "result": {**(self.value_info(self.result) or {}), "error": self.error(self.result)},
            "neighbours": {
                "below": self.value_info(self.below),
                "above": self.value_info(self.above),
            },
            "modes": modes,
            "notes": list(self.notes),
        }


def _special_notes(value: ExactValue, f: FloatFormat) -> list[str]:
    if value.kind == "inf" and value.negative and not f.is_signed:
        return [f"{f.name} is unsigned (a scale format): negative inputs give NaN"]
    if value.kind == "inf" and not f.has_infinity:
        becomes = (
            "NaN without saturation, ±max with --saturate"
            if f.has_nan
            else "±max (it always saturates)"
        )
        return [f"{f.name} has no infinity: inf gives {becomes}"]
    if value.kind == "nan" and not f.has_nan:
        return [
            f"{f.name} has no NaN encoding: quantize keeps NaN in the container tensor, "
            "encode raises"
        ]
    return []


def _special_neighbours(value: ExactValue, f: FloatFormat) -> tuple[float | None, float | None]:
    """±inf is its own neighbour where the format has it; else ±max is the one on its side
    (an unsigned format has none for -inf, as for any negative value)."""
    if value.kind != "inf" or (value.negative and not f.is_signed):
        return None, None
    x = -math.inf if value.negative else math.inf
    if f.has_infinity:
        return x, x
    return (None, -f.max) if value.negative else (f.max, None)


def _neighbours(v: Fraction, f: FloatFormat) -> tuple[float | None, float | None]:
    """Largest representable value <= v and smallest >= v (±inf count; None where none)."""
    below = round_exact(v, f, "down")
    above = round_exact(v, f, "up")
    if math.isnan(below) or (not math.isinf(below) and Fraction(below) > v):
        below = None  # NaN past -max, or e8m0's 2^-127 above a smaller v
    if math.isnan(above) or (not math.isinf(above) and Fraction(above) < v):
        above = None  # NaN past max (or below 0 in e8m0), or max where the format saturates
    return below, above


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or (
        a == b and math.copysign(1, a) == math.copysign(1, b)
    )


def _stochastic(
    v: Fraction, f: FloatFormat, results: Mapping[str, float], below: float | None,
    above: float | None,
) -> tuple[tuple[float, Fraction], ...]:  # fmt: skip
    """The candidates of stochastic rounding and their exact probabilities: the value rounded
    down and up, up with P = (v - lo) / (hi - lo) (so the mean is v)."""
    top = Fraction(2) ** (f.emax + 1)  # past ±max, the bracket's outer end is ±2^(emax+1)
    vmax = f.max_exact
    lo: Fraction | None = None
    hi: Fraction | None = None
    if below is not None and math.isfinite(below):
        lo = Fraction(below)
    elif v < -vmax:
        lo = -top
    if above is not None and math.isfinite(above):
        hi = Fraction(above)
    elif v > vmax:
        hi = top
    if (below is not None and below == above) or lo is None or hi is None:
        return ((results["nearest"], Fraction(1)),)
    # the candidates are the directed modes' results (with their overflow and saturation)
    cand_lo, cand_hi = results["down"], results["up"]
    if _same(cand_lo, cand_hi):
        return ((cand_lo, Fraction(1)),)
    p_hi = min(max((v - lo) / (hi - lo), Fraction(0)), Fraction(1))
    return tuple((c, p) for c, p in ((cand_lo, 1 - p_hi), (cand_hi, p_hi)) if p > 0)


def _overflow_note(f: FloatFormat) -> str:
    if not f.has_nan and not f.has_infinity:
        return (
            f"|value| > max {f.max!r}: {f.name} has no inf or NaN, so it always saturates to ±max"
        )
    special = "±inf" if f.has_infinity else "NaN"
    return (
        f"|value| > max {f.max!r}: round-to-nearest overflows to {special} unless it "
        "saturates (--saturate, quantize(..., saturate=True)) to ±max; toward_zero never "
        "overflows, up/down only in their own direction"
    )


def _small_notes(a: Fraction, f: FloatFormat) -> list[str]:
    """Notes for 0 < a < min normal: fewer significant bits, underflow to zero."""
    notes = []
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
    return notes


def _range_notes(v: Fraction, f: FloatFormat) -> list[str]:
    a = abs(v)
    if v < 0 and not f.is_signed:
        return [f"{f.name} is unsigned (a scale format): negative inputs give NaN"]
    if a > f.max_exact:
        return [_overflow_note(f)]
    if f.encoding == "e8m0" and a < Fraction(f.min_normal):
        return [f"{f.name} has no zero: values below 2^-127 give 2^-127"]
    if 0 < a < Fraction(f.min_normal):
        return _small_notes(a, f)
    return []


def _is_float64(v: Fraction) -> bool:
    f = _nearest64(v)
    return math.isfinite(f) and Fraction(f) == v


def _finite_notes(value: ExactValue, v: Fraction, f: FloatFormat, exact: bool) -> list[str]:
    notes = _range_notes(v, f)
    if v == 0 and value.negative and not f.has_negative_zero:
        notes.append(f"{f.name} has no negative zero: -0 becomes +0")
    if exact:
        notes.append(f"exactly representable in {f.name}")
    if not _is_float64(v):
        notes.append(
            f"the input is not a float64 value (nearest float64: {_float_text(_nearest64(v))}); "
            "it is used exactly"
        )
    return notes


def explain(
    value: ExactValue | str | Fraction | float | int,
    fmt: str | FloatFormat,
    rounding: str = "nearest",
    saturate: bool = False,
) -> Explanation:
    """How ``value`` rounds into ``fmt``: every mode, neighbours, errors, notes; exactly.

    ``value`` is text read by :func:`parse_value` (``"0.1"`` is one tenth, not the float64
    nearest to it), an :class:`ExactValue`, or a number used as it is (a float is its exact
    binary value; ``-0.0``, ``inf`` and ``nan`` included). ``rounding`` (any of quantize's
    modes) picks :attr:`Explanation.result`; ``saturate`` is quantize's. Raises ValueError for
    an unparsable or out-of-range value (magnitudes from 1e-1000 to below 1e1000) or an unknown
    mode, TypeError for a value of another type. Cost: exact big-integer arithmetic on the
    value, a few milliseconds; ``mixprec explain`` prints the result.
    """
    f = get_format(fmt)
    v = _as_exact(value)
    rounding = check_rounding(rounding, modes=ROUNDING_MODES)
    saturate = check_flag(saturate, "saturate")
    if v.exact is None:
        x = v.nearest_float()
        results = {m: round_exact(x, f, m, saturate) for m in DETERMINISTIC_MODES}
        below, above = _special_neighbours(v, f)
        stochastic = ((results["nearest"], Fraction(1)),)  # stochastic rounds specials as nearest
        notes = _special_notes(v, f)
    else:
        x = v.nearest_float() if v.exact == 0 else v.exact  # -0 keeps its sign into rounding
        results = {m: round_exact(x, f, m, saturate) for m in DETERMINISTIC_MODES}
        below, above = _neighbours(v.exact, f)
        stochastic = _stochastic(v.exact, f, results, below, above)
        exact = below is not None and below == above
        notes = _finite_notes(v, v.exact, f, exact)
    return Explanation(f, v, rounding, saturate, results, stochastic, below, above, tuple(notes))
