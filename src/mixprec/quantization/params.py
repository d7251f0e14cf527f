"""Kernel parameters: a format and options reduced to the integers both kernels consume.

Computed once per (format, container dtype, saturate, subnormals) and cached, so a call to
``quantize`` costs a dictionary look-up here, not a recomputation.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache

from mixprec.formats.float_format import ROUNDING_MODES, FloatFormat

ROUNDING_CODES: dict[str, int] = {name: code for code, name in enumerate(ROUNDING_MODES)}

F_FLUSH = 1
F_NO_NEGZERO = 2
F_NEG_NAN = 4


@dataclass(frozen=True)
class Container:
    """A binary float container (float32 or float64) described by its bit layout."""

    width: int
    mantissa_bits: int
    bias: int

    @property
    def emin(self) -> int:
        return 1 - self.bias

    @property
    def inf_bits(self) -> int:
        return ((1 << (self.width - 1 - self.mantissa_bits)) - 1) << self.mantissa_bits

    @property
    def nan_bits(self) -> int:
        return self.inf_bits | (1 << (self.mantissa_bits - 1))

    @property
    def max_bits(self) -> int:
        return self.inf_bits - 1

    def bits_of(self, value: Fraction) -> int:
        """Bit pattern of the largest container value <= value (value >= 0, finite)."""
        if value == 0:
            return 0
        fmt = "<f" if self.width == 32 else "<d"
        ifmt = "<I" if self.width == 32 else "<Q"
        try:
            packed = struct.pack(fmt, float(value))
        except OverflowError:
            return self.max_bits
        bits = struct.unpack(ifmt, packed)[0]
        bits = min(bits, self.max_bits)
        # struct rounds to nearest; step down if that rounded up past the value
        while bits > 0 and _value_of(self, bits) > value:
            bits -= 1
        return bits


def _value_of(c: Container, bits: int) -> Fraction:
    e_field = bits >> c.mantissa_bits
    mant = bits & ((1 << c.mantissa_bits) - 1)
    if e_field == 0:
        return Fraction(mant) * Fraction(2) ** (c.emin - c.mantissa_bits)
    return (1 + Fraction(mant, 1 << c.mantissa_bits)) * Fraction(2) ** (e_field - c.bias)


FLOAT32 = Container(32, 23, 127)
FLOAT64 = Container(64, 52, 1023)


@dataclass(frozen=True)
class KernelParams:
    """Integers describing one quantization target inside one container type."""

    width: int
    mantissa_bits: int
    emin: int
    max_bits: int
    ovf_bits: int
    minnorm_bits: int
    zero_bits: int
    flags: int
    fast_lo: int  # float32 fast path: bits of the target's min normal, 0 when not applicable


def _largest_held(fmt: FloatFormat, c: Container) -> Fraction:
    """The largest value of ``fmt`` that container ``c`` holds: the format's max, or, for a
    format whose range passes the container's (e9m2, float64 in float32), the top of the
    container's last binade on the format's grid, (2 - 2^-min(m, c.m)) * 2^c.emax. Not the
    container's max itself, which a format with fewer mantissa bits cannot represent."""
    held = _value_of(c, c.max_bits)
    if fmt.max_exact <= held:
        return fmt.max_exact
    m = min(fmt.mantissa_bits, c.mantissa_bits)
    return (2 - Fraction(1, 1 << m)) * Fraction(2) ** c.bias


@lru_cache(maxsize=1024)
def kernel_params(
    fmt: FloatFormat, width: int, saturate: bool, subnormals: bool, rounding: str = "nearest"
) -> KernelParams:
    c = FLOAT32 if width == 32 else FLOAT64
    two = Fraction(2)
    max_bits = c.bits_of(_largest_held(fmt, c))
    emin = fmt.emin  # the same grid for every rounding mode (``rounding`` is part of the key only)
    if fmt.encoding == "e8m0":
        # e8m0 rounds on its own grid, the powers of two 2^-127 .. 2^127, in every mode: linear
        # distance, so nearest ties go up (1.5 * 2^-127 -> 2^-126, 1.25 * 2^-127 -> 2^-127), and
        # the directed modes pick the power of two below / above. Below 2^-127 the grid's 0 stands
        # for "no value" and becomes 2^-127 (zero_bits), so all of [0, 2^-127] gives 2^-127.
        # torch 2.13 (and ml_dtypes < 0.7) round nearest on the grid of an e8m0 with a subnormal
        # instead, taking all of (2^-127, 2^-126) up to 2^-126; ml_dtypes >= 0.7 agrees with us.
        zero_bits = c.bits_of(two**fmt.emin)
        flags = F_NEG_NAN
    else:
        zero_bits = 0
        flags = 0 if fmt.has_negative_zero else F_NO_NEGZERO
    if saturate:
        ovf_bits = max_bits
    elif fmt.has_infinity:
        ovf_bits = c.inf_bits
    elif fmt.has_nan:
        ovf_bits = c.nan_bits
    else:
        ovf_bits = max_bits  # neither inf nor NaN (fp6, fp4): always saturate
    minnorm_bits = 0
    if not subnormals and fmt.has_subnormals:
        flags |= F_FLUSH
        # smallest container value >= min_normal: min_normal is a power of two, so it is exact
        # whenever it is inside the container's range; below that nothing can be flushed.
        mn = two**fmt.emin
        if mn >= two ** (c.emin - c.mantissa_bits):
            minnorm_bits = c.bits_of(mn)
    fast_lo = 0
    # No fast path for M = 0 (custom eXm0): its bit trick takes the exponent field's last bit as
    # the parity for ties-to-even and round-to-odd, while the general path (as e8m0 needs)
    # treats the one-bit significand as odd: ties go up, odd truncates. e8m0 itself is not slow
    # for that: the C kernel recognises its parameters and rounds it with a closed form of its own.
    if width == 32 and fmt.encoding != "e8m0" and 0 < fmt.mantissa_bits < 23 and emin >= c.emin:
        fast_lo = c.bits_of(two**emin)
    return KernelParams(
        width, fmt.mantissa_bits, emin, max_bits, ovf_bits, minnorm_bits, zero_bits, flags,
        fast_lo,
    )  # fmt: skip
