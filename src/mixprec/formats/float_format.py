"""Floating-point formats: what a format *is*, independent of any tensor kernel.

A binary floating-point format is described by its exponent and mantissa widths, its exponent
bias and its encoding of special values. Four encoding families exist among the formats used in
deep learning (the suffixes follow ml_dtypes / LLVM's APFloat naming):

* ``ieee``  - IEEE 754 style: the all-ones exponent encodes inf (mantissa 0) and NaN (otherwise).
              ``float64``, ``float32``, ``tfloat32``, ``bfloat16``, ``float16``, ``float8_e5m2``,
              ``float8_e4m3``, ``float8_e3m4`` and every custom ``eXmY``.
* ``fn``    - "finite": no inf; only the all-ones exponent *and* mantissa encodes NaN, so the top
              binade holds normal numbers (``float8_e4m3fn``: max 448 instead of 240).
* ``fnuz``  - finite, NaN is the negative-zero pattern ``0x80``, so there is no -0
              (``float8_e4m3fnuz``, ``float8_e5m2fnuz``, ``float8_e4m3b11fnuz``).
* ``finite``- no inf, no NaN at all: every code is a number (OCP MX element formats
              ``float6_e3m2fn``, ``float6_e2m3fn``, ``float4_e2m1fn``).
* ``e8m0``  - unsigned powers of two, no zero, ``0xFF`` is NaN (the OCP MX scale format
              ``float8_e8m0fnu``).

Every derived number (``max``, ``min_normal``, ...) is computed with integer arithmetic and
``fractions.Fraction`` so it is exact, then converted to a Python float (binary64), which holds
every value of every supported format exactly.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from fractions import Fraction
from functools import cached_property
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

# close_matches, did_you_mean, find_format, suggest_format_names: shared by the name checks of
# the package (module-level helpers, not re-exported)

Encoding = Literal["ieee", "fn", "fnuz", "finite", "e8m0"]
_ENCODINGS = ("ieee", "fn", "fnuz", "finite", "e8m0")

#: The rounding directions of a conversion into a format (IEEE 754's four, stochastic rounding
#: and round-to-odd): the vocabulary of quantize and of the exact reference in ``describe``.
ROUNDING_MODES: tuple[str, ...] = ("nearest", "stochastic", "toward_zero", "up", "down", "odd")


def _pow2(exponent: int) -> float:
    """Exact 2**exponent as a Python float (binary64), for exponents binary64 can hold
    (``ldexp`` scales by a power of two exactly; ~25x faster than a Fraction power)."""
    return math.ldexp(1.0, exponent)


@dataclass(frozen=True)
class FloatFormat:
    """A binary floating-point format.

    Bit layout (most significant first): ``[sign (1 bit, absent for e8m0)] [exponent_bits]
    [mantissa_bits]``. A normal number is ``(-1)^s * 2^(E - bias) * (1 + M / 2^mantissa_bits)``;
    a subnormal (exponent field 0) is ``(-1)^s * 2^(1 - bias) * (M / 2^mantissa_bits)``.

    Instances are immutable and hashable; obtain them with :func:`get_format`.
    """

    name: str
    exponent_bits: int
    mantissa_bits: int
    bias: int
    encoding: Encoding = "ieee"
    torch_dtype_name: str | None = field(default=None, compare=False)
    ml_dtypes_name: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.encoding not in _ENCODINGS:
            raise ValueError(f"encoding {self.encoding!r} is not one of {_ENCODINGS}")
        if not 1 <= self.exponent_bits <= 11:
            raise ValueError(f"exponent_bits={self.exponent_bits} must be in 1..11")
        if not 0 <= self.mantissa_bits <= 52:
            raise ValueError(f"mantissa_bits={self.mantissa_bits} must be in 0..52")
        if self.encoding == "e8m0" and self.mantissa_bits != 0:
            raise ValueError("the e8m0 encoding has no mantissa bits")

    # -- special values -------------------------------------------------------------------
    @property
    def has_infinity(self) -> bool:
        return self.encoding == "ieee"

    @property
    def has_nan(self) -> bool:
        # an IEEE-style eXm0 has no mantissa bits to tell NaN from inf: its top code is inf only
        return self.encoding != "finite" and not (
            self.encoding == "ieee" and self.mantissa_bits == 0
        )

    @property
    def nan_code(self) -> int | None:
        """The canonical NaN's code (None without NaN): a quiet NaN (top mantissa bit set, sign
        clear) for IEEE-style formats, all ones but the sign for ``fn``, the negative-zero
        pattern for ``fnuz``, ``0xFF`` for e8m0. What ``encode`` gives for every NaN."""
        if not self.has_nan:
            return None
        magnitude_bits = self.exponent_bits + self.mantissa_bits
        if self.encoding == "ieee":
            return (((1 << self.exponent_bits) - 1) << self.mantissa_bits) | (
                1 << (self.mantissa_bits - 1)
            )
        return {"fn": (1 << magnitude_bits) - 1, "fnuz": 1 << magnitude_bits, "e8m0": 0xFF}[
            self.encoding
        ]

    @property
    def has_negative_zero(self) -> bool:
        return self.encoding in ("ieee", "fn", "finite")

    @property
    def has_zero(self) -> bool:
        return self.encoding != "e8m0"

    @property
    def is_signed(self) -> bool:
        return self.encoding != "e8m0"

    @property
    def has_subnormals(self) -> bool:
        return self.encoding != "e8m0" and self.mantissa_bits > 0

    # -- sizes and exponent range ---------------------------------------------------------
    @property
    def bits(self) -> int:
        return int(self.is_signed) + self.exponent_bits + self.mantissa_bits

    @property
    def emax(self) -> int:
        """Unbiased exponent of the largest finite binade."""
        top_field = (1 << self.exponent_bits) - 1
        if self.encoding == "ieee":
            top_field -= 1  # the all-ones exponent is inf/NaN
        elif self.encoding == "e8m0" or (self.encoding == "fn" and self.mantissa_bits == 0):
            top_field -= 1  # the all-ones code is NaN and the binade holds nothing else
        return top_field - self.bias

    @property
    def emin(self) -> int:
        """Unbiased exponent of the smallest normal binade."""
        if self.encoding == "e8m0":
            return -self.bias  # code 0 is 2^-bias: there is no zero and no subnormal
        return 1 - self.bias

    # -- derived values (exact) -----------------------------------------------------------
    @cached_property
    def max_exact(self) -> Fraction:
        m = self.mantissa_bits
        top_mantissa = (1 << m) - 1
        if self.encoding == "fn" and m > 0:
            top_mantissa -= 1  # all-ones exponent and mantissa is NaN
        return Fraction(2) ** self.emax * (1 + Fraction(top_mantissa, 1 << m))

    @property
    def max(self) -> float:
        """Largest finite value."""
        return float(self.max_exact)

    @property
    def min_normal(self) -> float:
        """Smallest positive normal value (for e8m0: the smallest value, 2^-127)."""
        return _pow2(self.emin)

    @property
    def min_subnormal(self) -> float:
        """Smallest positive value (equals ``min_normal`` for formats without subnormals)."""
        if not self.has_subnormals:
            return self.min_normal
        return _pow2(self.emin - self.mantissa_bits)

    @property
    def eps(self) -> float:
        """Distance from 1.0 to the next larger value, 2^-mantissa_bits."""
        return _pow2(-self.mantissa_bits)

    @property
    def precision(self) -> int:
        """Significand precision in bits, the implicit leading bit included."""
        return self.mantissa_bits + 1

    @property
    def num_codes(self) -> int:
        return 1 << self.bits

    # -- library dtypes -------------------------------------------------------------------
    @property
    def torch_dtype(self) -> torch.dtype | None:
        """The matching ``torch.dtype``, or None where this torch build has none."""
        if self.torch_dtype_name is None:
            return None
        import torch

        return getattr(torch, self.torch_dtype_name, None)

    @property
    def ml_dtype(self) -> object | None:
        """The matching numpy/ml_dtypes scalar type, or None."""
        if self.ml_dtypes_name is None:
            return None
        import numpy as np

        if hasattr(np, self.ml_dtypes_name) and self.ml_dtypes_name in (
            "float64",
            "float32",
            "float16",
        ):
            return getattr(np, self.ml_dtypes_name)
        import ml_dtypes

        return getattr(ml_dtypes, self.ml_dtypes_name, None)

    def describe(self) -> str:
        specials = []
        if self.has_infinity:
            specials.append("inf")
        if self.has_nan:
            specials.append("NaN")
        return (
            f"{self.name}: {self.bits} bits (e{self.exponent_bits}m{self.mantissa_bits}, "
            f"bias {self.bias}), max {self.max:.6g}, min normal {self.min_normal:.6g}, "
            f"eps {self.eps:.6g}, specials: {', '.join(specials) or 'none'}"
        )

    def __str__(self) -> str:
        return self.name


def _fmt(
    name: str,
    e: int,
    m: int,
    bias: int,
    encoding: Encoding = "ieee",
    torch_name: str | None = None,
    ml_name: str | None = None,
) -> FloatFormat:
    return FloatFormat(name, e, m, bias, encoding, torch_name, ml_name)


#: Every named format, keyed by its canonical (ml_dtypes / torch) name.
FORMATS: dict[str, FloatFormat] = {
    f.name: f
    for f in (
        # IEEE 754 binary64 / binary32 / binary16 and friends
        _fmt("float64", 11, 52, 1023, "ieee", "float64", "float64"),
        _fmt("float32", 8, 23, 127, "ieee", "float32", "float32"),
        _fmt("tfloat32", 8, 10, 127, "ieee"),  # NVIDIA TF32: fp32 range, fp16 precision
        _fmt("bfloat16", 8, 7, 127, "ieee", "bfloat16", "bfloat16"),
        _fmt("float16", 5, 10, 15, "ieee", "float16", "float16"),
        # 8-bit formats (OCP FP8, AMD/Graphcore fnuz, IEEE-style extensions)
        _fmt("float8_e4m3fn", 4, 3, 7, "fn", "float8_e4m3fn", "float8_e4m3fn"),
        _fmt("float8_e4m3fnuz", 4, 3, 8, "fnuz", "float8_e4m3fnuz", "float8_e4m3fnuz"),
        _fmt("float8_e5m2", 5, 2, 15, "ieee", "float8_e5m2", "float8_e5m2"),
        _fmt("float8_e5m2fnuz", 5, 2, 16, "fnuz", "float8_e5m2fnuz", "float8_e5m2fnuz"),
        _fmt("float8_e4m3", 4, 3, 7, "ieee", None, "float8_e4m3"),
        _fmt("float8_e3m4", 3, 4, 3, "ieee", None, "float8_e3m4"),
        _fmt("float8_e4m3b11fnuz", 4, 3, 11, "fnuz", None, "float8_e4m3b11fnuz"),
        _fmt("float8_e8m0fnu", 8, 0, 127, "e8m0", "float8_e8m0fnu", "float8_e8m0fnu"),
        # OCP MX element formats
        _fmt("float6_e3m2fn", 3, 2, 3, "finite", None, "float6_e3m2fn"),
        _fmt("float6_e2m3fn", 2, 3, 1, "finite", None, "float6_e2m3fn"),
        _fmt("float4_e2m1fn", 2, 1, 1, "finite", None, "float4_e2m1fn"),
    )
}

#: Short names. An alias wins over the ``eXmY`` rule: ``e4m3``, ``e2m1``, ``e3m2``, ``e2m3`` and
#: ``e8m0`` name the OCP formats (as Transformer Engine and the MX spec use them), not IEEE-style
#: custom formats; the IEEE-style 8-bit e4m3 is ``float8_e4m3``.
ALIASES: dict[str, str] = {
    "fp64": "float64", "f64": "float64", "double": "float64",
    "fp32": "float32", "f32": "float32", "float": "float32", "single": "float32",
    "tf32": "tfloat32",
    "bf16": "bfloat16",
    "fp16": "float16", "f16": "float16", "half": "float16",
    "e4m3": "float8_e4m3fn", "e4m3fn": "float8_e4m3fn", "fp8_e4m3": "float8_e4m3fn",
    "fp8_e4m3fn": "float8_e4m3fn",
    "e4m3fnuz": "float8_e4m3fnuz", "fp8_e4m3fnuz": "float8_e4m3fnuz",
    "e5m2": "float8_e5m2", "fp8_e5m2": "float8_e5m2",
    "e5m2fnuz": "float8_e5m2fnuz", "fp8_e5m2fnuz": "float8_e5m2fnuz",
    "e4m3b11fnuz": "float8_e4m3b11fnuz",
    "e3m4": "float8_e3m4",
    "e8m0": "float8_e8m0fnu", "e8m0fnu": "float8_e8m0fnu",
    "e3m2": "float6_e3m2fn", "e3m2fn": "float6_e3m2fn", "fp6_e3m2": "float6_e3m2fn",
    "e2m3": "float6_e2m3fn", "e2m3fn": "float6_e2m3fn", "fp6_e2m3": "float6_e2m3fn",
    "e2m1": "float4_e2m1fn", "e2m1fn": "float4_e2m1fn", "fp4": "float4_e2m1fn",
    "fp4_e2m1": "float4_e2m1fn",
}  # fmt: skip

_CUSTOM = re.compile(r"e([0-9]+)m([0-9]+)")
_SIZED = re.compile(r"float[0-9]+_(e[0-9]+m[0-9]+[a-z0-9]*)")  # floatN_eXmY... near-misses
_LIST_HINT = (
    "`mixprec formats` lists the names; eXmY (X in 2..11, Y in 0..52) is an IEEE-style "
    "custom format"
)


def format_names() -> list[str]:
    """Every accepted name: canonical names, then aliases."""
    return [*FORMATS, *ALIASES]


def close_matches(bad: str, choices: Iterable[str]) -> list[str]:
    """The choices closest to ``bad`` (difflib): the best one and any nearly as close, at most 3."""
    choices = list(dict.fromkeys(choices))
    scored = sorted(
        ((difflib.SequenceMatcher(None, bad, c).ratio(), c) for c in choices),
        key=lambda rc: -rc[0],
    )
    if not scored or scored[0][0] < 0.6:
        return []
    best = scored[0][0]
    return [c for r, c in scored[:3] if r >= max(0.6, best - 0.05)]


def did_you_mean(suggestions: list[str]) -> str:
    """``"; did you mean 'a' or 'b'?"`` for a non-empty list, else ``""``."""
    if not suggestions:
        return ""
    quoted = [repr(s) for s in suggestions]
    text = quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"
    return f"; did you mean {text}?"


def check_rounding(
    rounding: object, what: str = "rounding", modes: tuple[str, ...] = ROUNDING_MODES
) -> str:
    """``rounding`` if it is one of ``modes``; ``TypeError``/``ValueError`` (with a suggestion)
    naming the bad value and the valid modes otherwise."""
    if not isinstance(rounding, str):
        raise TypeError(
            f"{what} must be a str, one of {', '.join(modes)}; got "
            f"{type(rounding).__name__}: {rounding!r}"
        )
    if rounding not in modes:
        hint = did_you_mean(close_matches(rounding, modes))
        raise ValueError(f"unknown {what} mode {rounding!r}{hint} (valid: {', '.join(modes)})")
    return rounding


def check_flag(value: object, what: str) -> bool:
    """A bool option (``numpy.bool_`` too): ``saturate="no"`` would otherwise be silently true."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return bool(value)
    raise TypeError(f"{what} must be a bool, got {type(value).__name__}: {value!r}")


def _custom_format(key: str, shown: str) -> FloatFormat | None:
    """The IEEE-style custom format of a plain ``eXmY`` name (no leading zeros), else None.

    ``shown`` is the name as the caller spelled it, for the error message.
    """
    match = _CUSTOM.fullmatch(key)
    if match is None or any(len(g) > 1 and g[0] == "0" for g in match.groups()):
        return None
    e, m = int(match.group(1)), int(match.group(2))
    if not (2 <= e <= 11 and 0 <= m <= 52):
        raise ValueError(
            f"custom format {shown!r}: exponent bits must be in 2..11 and mantissa bits in "
            f"0..52 (got e{e}m{m})"
        )
    return FloatFormat(f"e{e}m{m}", e, m, (1 << (e - 1)) - 1, "ieee")


def _resolve(key: str, shown: str) -> FloatFormat | None:
    name = ALIASES.get(key, key)
    if name in FORMATS:
        return FORMATS[name]
    return _custom_format(key, shown)


def _prefixed(key: str, names: dict[str, str]) -> list[str]:
    """Names that extend ``key`` by ``_...`` (``fp8`` -> ``fp8_e4m3``, ...), one per target."""
    found: dict[str, str] = {}
    for name, target in names.items():
        if name.startswith(key + "_"):
            found.setdefault(target, name)
    return list(found.values())[:4]


def suggest_format_names(key: str) -> list[str]:
    """Element names the user may have meant: the eXmY of ``floatN_eXmY``, ``key_...``, difflib.

    ``key`` is the lower-cased name. Used by every element-name error of the package.
    """
    sized = _SIZED.fullmatch(key)
    if sized is not None:
        try:
            guess = _resolve(sized.group(1), sized.group(1))
        except ValueError:
            guess = None
        if guess is not None:
            return [guess.name]
    names = {n: n for n in FORMATS} | dict(ALIASES)
    return _prefixed(key, names) or close_matches(key, names)


def _unknown_format_message(fmt: str, key: str) -> str:
    if key.startswith("mx"):
        # lazy: the MX registry is built from this module's FORMATS
        from mixprec.formats.mx_format import not_an_element_message

        return not_an_element_message(fmt, key)
    return f"unknown format {fmt!r}{did_you_mean(suggest_format_names(key))} ({_LIST_HINT})"


def find_format(name: str) -> FloatFormat | None:
    """The format of a canonical name, alias or plain ``eXmY`` (case and blanks ignored).

    None for an unknown name; ``ValueError`` for an ``eXmY`` whose widths are out of range.
    """
    return _resolve(name.strip().lower(), name)


def get_format(fmt: str | FloatFormat | torch.dtype) -> FloatFormat:
    """Return the :class:`FloatFormat` for a name, alias, ``eXmY`` string or ``torch.dtype``.

    Names are matched case-insensitively (surrounding blanks ignored) against the canonical
    names, the aliases and plain ``eXmY`` (X in 2..11, Y in 0..52, no leading zeros); anything
    else, near-misses such as ``"float4_e2m1"`` (the format is ``float4_e2m1fn``) included,
    raises ``ValueError`` naming the bad value with the closest valid names. ``TypeError`` for
    anything that is not a string, a FloatFormat or a ``torch.dtype``.
    """
    if isinstance(fmt, FloatFormat):
        return fmt
    if isinstance(fmt, str):
        found = find_format(fmt)
        if found is None:
            raise ValueError(_unknown_format_message(fmt, fmt.strip().lower()))
        return found
    import torch

    if isinstance(fmt, torch.dtype):
        for f in FORMATS.values():
            if f.torch_dtype_name is not None and getattr(torch, f.torch_dtype_name, None) == fmt:
                return f
        raise ValueError(f"torch dtype {fmt} is not a floating-point format mixprec knows")
    raise TypeError(
        f"expected a format name, FloatFormat or torch.dtype, got {type(fmt).__name__}: {fmt!r}"
    )
