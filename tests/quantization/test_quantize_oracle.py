"""Every rounding mode of ``mixprec.quantize`` against exact oracles written here.

Two oracles, both independent of mixprec's code:

* a *grid oracle* for formats whose values can be enumerated (every format of at most 8 bits,
  float16, bfloat16, tfloat32 and small custom formats): all representable values are listed from
  the format's definition (sign, exponent field, mantissa field, bias, special codes), and each
  input is placed between its two neighbours with a binary search (``numpy.searchsorted``). All
  values are exact in float64 and so are the midpoints, so every comparison is exact.
* a *Fraction oracle* for IEEE-style formats of any width (custom ``eXmY`` up to e11m52): the
  textbook definition of rounding, k = |x| / 2^(e - M) rounded to an integer in exact rational
  arithmetic, evaluated per element on a sample; and one for e8m0 (``round_e8m0_exact``), with a
  closed form on the bit pattern for every float32 subnormal input.

Rules encoded (docs/design.md, "Quantize"; IEEE 754 for directed modes):
  nearest: ties to even; toward_zero never overflows (gives ±max, finite inputs); up overflows to
  +inf only for positive inputs (negative ones stop at -max), down mirrors it; odd truncates and
  sets the last significand bit when inexact (so, like toward_zero, finite overflow gives ±max);
  ±inf inputs are exact infinities; saturate=True turns every overflow and ±inf into ±max; formats
  without inf overflow to NaN unless saturating; fp6/fp4 always saturate; subnormals=False flushes
  results below min_normal to signed zero; fnuz formats give +0 for -0 and negative underflow;
  e8m0 (no sign, no zero) gives NaN for negative inputs and 2^-127 where the result would be zero,
  and rounds on the powers of two in linear distance everywhere, (2^-127, 2^-126) included:
  nearest ties go up (1.25 * 2^-127 -> 2^-127, 1.5 * 2^-127 -> 2^-126). torch 2.13 and
  ml_dtypes < 0.7 round (2^-127, 2^-126) up to 2^-126 instead, so e8m0 inputs in (0, 2^-126) are
  compared with these oracles only, never with a third-party library.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from fractions import Fraction
from functools import cache

import ml_dtypes
import numpy as np
import pytest
import torch

from mixprec.quantization import encode, quantize

MODES = ("nearest", "toward_zero", "up", "down", "odd")
OPTIONS = [(False, True), (True, True), (False, False), (True, False)]  # (saturate, subnormals)


@dataclass(frozen=True)
class Spec:
    """A format as its standard defines it (OCP FP8/MX, IEEE 754, AMD/Graphcore fnuz)."""

    e: int
    m: int
    bias: int
    kind: str  # "ieee" | "fn" | "fnuz" | "finite" | "e8m0"


SPECS: dict[str, Spec] = {
    "float16": Spec(5, 10, 15, "ieee"),
    "bfloat16": Spec(8, 7, 127, "ieee"),
    "tfloat32": Spec(8, 10, 127, "ieee"),
    "float8_e4m3fn": Spec(4, 3, 7, "fn"),
    "float8_e4m3fnuz": Spec(4, 3, 8, "fnuz"),
    "float8_e5m2": Spec(5, 2, 15, "ieee"),
    "float8_e5m2fnuz": Spec(5, 2, 16, "fnuz"),
    "float8_e4m3": Spec(4, 3, 7, "ieee"),
    "float8_e3m4": Spec(3, 4, 3, "ieee"),
    "float8_e4m3b11fnuz": Spec(4, 3, 11, "fnuz"),
    "float8_e8m0fnu": Spec(8, 0, 127, "e8m0"),
    "float6_e3m2fn": Spec(3, 2, 3, "finite"),
    "float6_e2m3fn": Spec(2, 3, 1, "finite"),
    "float4_e2m1fn": Spec(2, 1, 1, "finite"),
    # custom IEEE-style formats (bias 2^(X-1) - 1)
    "e3m1": Spec(3, 1, 3, "ieee"),
    "e5m0": Spec(5, 0, 15, "ieee"),
    "e2m0": Spec(2, 0, 1, "ieee"),
    "e6m3": Spec(6, 3, 31, "ieee"),
    "e4m6": Spec(4, 6, 7, "ieee"),
}
SMALL = [n for n, s in SPECS.items() if s.e + s.m <= 7 or s.kind == "e8m0"]  # <= 8 bits
# formats whose every value (and the flushed zero) fits the half dtype, one of each kind
SUBSET_OF_HALF = {
    torch.float16: ["float8_e4m3fn", "float8_e5m2", "float8_e5m2fnuz", "float4_e2m1fn", "e5m0"],
    torch.bfloat16: ["float8_e4m3fnuz", "float8_e3m4", "float8_e8m0fnu", "float6_e2m3fn"],
}


# ----------------------------------------------------------------------------------------------
# grid oracle
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Grid:
    values: np.ndarray  # float64, ascending, non-negative, ends with `beyond` (overflow marker)
    odd: np.ndarray  # bool: the value's integral significand (in its own quantum) is odd
    max: float
    min_normal: float
    beyond: float  # max + ulp(max): the first value past the range


def _is_special(s: Spec, ef: int, mant: int) -> bool:
    top = ef == (1 << s.e) - 1
    if s.kind == "ieee":
        return top
    if s.kind == "fn":
        return top and mant == (1 << s.m) - 1
    if s.kind == "e8m0":
        return top
    return False  # fnuz: NaN is the negative-zero code; finite: no specials


def _magnitude_fraction(s: Spec, ef: int, mant: int) -> Fraction:
    if s.kind == "e8m0":
        return Fraction(2) ** (ef - s.bias)
    if ef == 0:
        return Fraction(mant, 1 << s.m) * Fraction(2) ** (1 - s.bias)
    return (1 + Fraction(mant, 1 << s.m)) * Fraction(2) ** (ef - s.bias)


def enumerate_fractions(s: Spec) -> list[Fraction]:
    """Every non-negative finite value, from the definition, in exact arithmetic."""
    return [
        _magnitude_fraction(s, ef, mant)
        for ef in range(1 << s.e)
        for mant in range(1 << s.m)
        if not _is_special(s, ef, mant)
    ]


@cache
def grid(name: str) -> Grid:
    """The rounding grid of a format (vectorised enumeration; checked against Fractions below).

    e8m0 has no zero: its grid is 0, 2^-127, 2^-126, ..., 2^127, where the 0 stands for "below
    the smallest value" and becomes 2^-127 after rounding. Every mode rounds on this one grid, in
    linear distance: 1.25 * 2^-127 is nearer to 2^-127 and gives it, 1.5 * 2^-127 is a tie and
    goes up (every e8m0 value has the odd significand 1). torch 2.13 and ml_dtypes < 0.7 round
    nearest differently there (all of (2^-127, 2^-126) up to 2^-126); ml_dtypes 0.7 agrees.
    """
    s = SPECS[name]
    ef, mant = np.meshgrid(np.arange(1 << s.e), np.arange(1 << s.m), indexing="ij")
    ef, mant = ef.ravel(), mant.ravel()
    if s.kind == "e8m0":
        keep = ef != 0xFF
        vals = np.ldexp(1.0, ef[keep] - s.bias)
        odd = np.ones_like(vals, dtype=bool)  # significand 1 (one bit of precision)
        vals, odd = np.concatenate([[0.0], vals]), np.concatenate([[False], odd])
        min_normal = vals[1]
    else:
        top = (1 << s.e) - 1
        special = {
            "ieee": ef == top,
            "fn": (ef == top) & (mant == (1 << s.m) - 1),
        }.get(s.kind, np.zeros_like(ef, dtype=bool))
        ef, mant = ef[~special], mant[~special]
        sig = np.where(ef > 0, mant + (1 << s.m), mant)
        vals = np.ldexp(sig.astype(np.float64), np.maximum(ef, 1) - s.bias - s.m)
        odd = (sig & 1) == 1
        min_normal = math.ldexp(1.0, 1 - s.bias)
    order = np.argsort(vals, kind="stable")
    vals, odd = vals[order], odd[order]
    vmax = float(vals[-1])
    # ulp(max): e8m0's next power of two is 2 * max; otherwise the quantum of max's binade
    top_field = max(int(ef[order][-1]), 1)
    ulp = vmax if s.kind == "e8m0" else math.ldexp(1.0, top_field - s.bias - s.m)
    beyond = vmax + ulp
    vals = np.append(vals, beyond)
    odd = np.append(odd, not odd[-1])  # adjacent in max's quantum: opposite parity
    return Grid(vals, odd, vmax, min_normal, beyond)


def _overflow_value(s: Spec, saturate: bool, vmax: float) -> float:
    if saturate or s.kind == "finite":
        return vmax
    return math.inf if s.kind == "ieee" else math.nan


def round_grid(
    x: np.ndarray, name: str, mode: str, saturate: bool = False, subnormals: bool = True
) -> np.ndarray:
    """Exact rounding of float64 inputs into format ``name`` (result as float64)."""
    s = SPECS[name]
    g = grid(name)
    with np.errstate(invalid="ignore"):  # signalling NaNs in float32 inputs
        x = np.asarray(x, dtype=np.float64)
    neg = np.signbit(x)
    a = np.abs(x)
    finite = np.isfinite(x)
    af = np.where(finite, a, 0.0)
    i = np.searchsorted(g.values, af, side="right") - 1  # values[i] <= a < values[i + 1]
    i = np.minimum(i, len(g.values) - 2)  # a >= beyond: neighbours (max, beyond), "above"
    lo, hi, lo_odd = g.values[i], g.values[i + 1], g.odd[i]
    exact = af == lo
    above = af >= g.beyond
    if mode == "nearest":
        mid = (lo + hi) / 2
        up = (af > mid) | ((af == mid) & lo_odd) | above
    elif mode == "toward_zero":
        up = np.zeros_like(exact)
    elif mode == "up":
        up = ~neg
    elif mode == "down":
        up = neg
    elif mode == "odd":
        up = ~lo_odd
    else:
        raise ValueError(mode)
    up = up & ~exact
    mag = np.where(up, hi, np.where(above, g.max, lo))
    if mode in ("toward_zero", "odd"):
        mag = np.minimum(mag, g.max)  # truncation never leaves the range
    ovf = _overflow_value(s, saturate, g.max)
    mag = np.where(mag >= g.beyond, ovf, mag)
    mag = np.where(np.isinf(x), ovf, mag)  # ±inf are exact infinities
    if not subnormals:
        mag = np.where(mag < g.min_normal, 0.0, mag)
    res = np.where(neg, -mag, mag)
    if s.kind == "fnuz":
        res = np.where(res == 0, 0.0, res)  # no negative zero
    if s.kind == "e8m0":
        res = np.where(mag == 0, math.ldexp(1.0, -127), res)
        res = np.where(neg & (x != 0), math.nan, res)
    return np.where(np.isnan(x), math.nan, res)


def grid_edges(name: str) -> np.ndarray:
    """float64 points around every value and midpoint of the grid (float32-exact ones)."""
    v = grid(name).values
    mids = (v[:-1] + v[1:]) / 2
    pts = np.concatenate([v, mids, [2 * v[-1], v[-1] * 1.25, v[1] / 4, v[1] / 2, v[1] * 0.75]])
    with np.errstate(over="ignore"):  # points beyond float32 are dropped here
        return pts[(pts < 2.0**128) & (pts.astype(np.float32).astype(np.float64) == pts)]


@cache
def _edge_points32(name: str) -> np.ndarray:
    """float32 grid values and midpoints with their fp32 neighbours, both signs (<= 2^16)."""
    p = grid_edges(name).astype(np.float32)
    if p.size > 1 << 12:  # fp16 / bf16 / tf32: a seeded sample (the exhaustive sets cover them)
        p = np.random.default_rng(3).choice(p, 1 << 12, replace=False)
    p = np.concatenate([p, np.nextafter(p, np.float32(np.inf)), np.nextafter(p, np.float32(0))])
    return np.concatenate([p, -p])


def _compare(q: torch.Tensor, expected: np.ndarray, x: np.ndarray, what: str, same_bits) -> None:
    same_bits(q, torch.from_numpy(expected).to(q.dtype), torch.from_numpy(x), what)


# ----------------------------------------------------------------------------------------------
# the oracle checks itself
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in SPECS if SPECS[n].e + SPECS[n].m <= 8])
def test_grid_equals_fraction_enumeration(name):
    vals = grid(name).values[:-1]
    expected = sorted(enumerate_fractions(SPECS[name]))
    if SPECS[name].kind == "e8m0":
        expected = [Fraction(0), *expected]
    assert [Fraction(float(v)) for v in vals] == expected


@pytest.mark.parametrize(
    "name", [n for n in SPECS if n.startswith(("float8", "float6", "float4", "bfloat"))]
)
def test_grid_equals_ml_dtypes_values(name):
    """The spec table above is right: the same values as ml_dtypes' own decoding."""
    nbits = 16 if name == "bfloat16" else 8
    codes = np.arange(1 << nbits, dtype=np.uint16 if nbits == 16 else np.uint8)
    with np.errstate(invalid="ignore"):  # NaN codes
        ml = codes.view(getattr(ml_dtypes, name)).astype(np.float64)
    ml = np.unique(ml[np.isfinite(ml) & (ml >= 0)])
    ours = grid(name).values[:-1]
    if SPECS[name].kind == "e8m0":
        ours = ours[1:]
    np.testing.assert_array_equal(ours, ml)


def test_grid_oracle_agrees_with_torch_on_e4m3fn_nearest(fp16_patterns, random_fp32):
    """The oracle's nearest mode reproduces torch's (saturating) cast: the oracle is right."""
    x = torch.cat([fp16_patterns, random_fp32[:65536]])
    expected = x.to(torch.float8_e4m3fn).double().numpy()
    got = round_grid(x.numpy(), "float8_e4m3fn", "nearest", saturate=True)
    np.testing.assert_array_equal(got, expected)


# ----------------------------------------------------------------------------------------------
# fp32 inputs, every mode and option, enumerable formats
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(SPECS))
def test_modes_vs_grid_oracle(
    name, mode, backend, same_bits, fp16_patterns, bf16_patterns, specials, random_fp32
):
    edges = np.concatenate([_edge_points32(name), specials.numpy()])
    # bf16 patterns: every fp32 binade; fp16 patterns: dense mantissas; random: everything else.
    # (Round-to-nearest sees all of them exhaustively in test_quantize_exact.py.)
    step = 4 if backend == "c" else 16  # the torch path is slower
    pats = [fp16_patterns[::step], bf16_patterns[1::step], random_fp32[-(1 << 16) :: step]]
    full = np.concatenate([edges, *(t.numpy() for t in pats)])
    for saturate, subnormals in OPTIONS:
        # the options only matter at the range's edges: the other combinations use those
        x = full if (saturate, subnormals) == (False, True) else edges
        q = quantize(torch.from_numpy(x), name, rounding=mode, saturate=saturate,
                     subnormals=subnormals)  # fmt: skip
        expected = round_grid(x, name, mode, saturate, subnormals)
        _compare(q, expected, x, f"{name} {mode} sat={saturate} sub={subnormals}", same_bits)


# ----------------------------------------------------------------------------------------------
# float64 inputs: the bits below float32 precision matter (no double rounding)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", [*SMALL, "float16", "bfloat16"])
def test_fp64_inputs_vs_grid_oracle(name, mode, backend, same_bits):
    p = grid_edges(name)
    p = p[p > 0]
    if p.size > 1 << 13:  # fp16 / bf16: a seeded sample
        p = np.random.default_rng(4).choice(p, 1 << 13, replace=False)
    inf = np.inf
    near = [np.nextafter(p, inf), np.nextafter(p, -inf)]
    near += [np.nextafter(near[0], inf), p * (1 + 2.0**-40), p * (1 - 2.0**-40)]
    rng = np.random.default_rng(7)
    g = grid(name)
    rnd = np.ldexp(rng.random(4096) + 0.5, rng.integers(-8, 3, 4096)) * g.max
    x = np.concatenate([p, *near, rnd, [1e300, 1e-300, 2.0**-1074, inf]])
    x = np.concatenate([x, -x])
    q = quantize(torch.from_numpy(x), name, rounding=mode)
    _compare(q, round_grid(x, name, mode), x, f"{name} {mode} float64", same_bits)


# ----------------------------------------------------------------------------------------------
# float16 / bfloat16 input tensors
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_vs_grid_oracle(dtype, mode, backend, same_bits):
    x = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(dtype)
    if backend == "torch":
        x = x[::5]  # the torch path is slower
    x64 = x.double().numpy()
    for name in SUBSET_OF_HALF[dtype]:
        q = quantize(x, name, rounding=mode)
        assert q.dtype == dtype
        expected = torch.from_numpy(round_grid(x64, name, mode)).to(dtype)
        same_bits(q, expected, x, f"{name} {mode} from {dtype}")


# ----------------------------------------------------------------------------------------------
# Fraction oracle: IEEE-style formats of any width
# ----------------------------------------------------------------------------------------------


def round_exact(x: float, e: int, m: int, mode: str, saturate: bool, subnormals: bool) -> float:
    """Round one float (binary64-exact) into IEEE-style eXmY by the textbook definition.

    |x| = n / 2^t exactly (``float.as_integer_ratio``); the quantum at |x| is 2^(max(E, emin) -
    m) with E = floor(log2 |x|); k = |x| / quantum is split into integer part and remainder with
    integer arithmetic, so nothing is ever rounded except by the rule being tested.
    """
    bias = (1 << (e - 1)) - 1
    emin, emax = 1 - bias, (1 << e) - 2 - bias
    vmax = (2 - Fraction(1, 1 << m)) * Fraction(2) ** emax
    if math.isnan(x):
        return math.nan
    if math.isinf(x):
        return math.copysign(float(vmax), x) if saturate else x
    if x == 0:
        return x
    neg = x < 0
    n, d = abs(x).as_integer_ratio()  # d is a power of two
    t = d.bit_length() - 1
    big_e = n.bit_length() - 1 - t  # floor(log2 |x|)
    qe = max(big_e, emin) - m  # quantum 2^qe
    shift = t + qe  # k = n / 2^shift
    if shift <= 0:
        k, twice_rem, unit = n << -shift, 0, 1
    else:
        k, rem = divmod(n, 1 << shift)
        twice_rem, unit = 2 * rem, 1 << shift  # remainder and quantum, both in units of 2^-t
    inexact = twice_rem != 0
    away = {
        "nearest": twice_rem > unit or (twice_rem == unit and k % 2 == 1),
        "toward_zero": False,
        "up": inexact and not neg,
        "down": inexact and neg,
        "odd": inexact and k % 2 == 0,
    }[mode]
    r = (k + int(away)) * Fraction(2) ** qe
    if r > vmax:
        grows = mode == "nearest" or (mode == "up" and not neg) or (mode == "down" and neg)
        if grows and not saturate:
            return -math.inf if neg else math.inf
        r = vmax
    if not subnormals and r < Fraction(2) ** emin:
        r = Fraction(0)
    return -float(r) if neg else float(r)


WIDE = {  # name -> (e, m, input dtype)
    "float16": (5, 10, torch.float32),
    "bfloat16": (8, 7, torch.float32),
    "tfloat32": (8, 10, torch.float32),
    "e5m10": (5, 10, torch.float32),
    "e8m23": (8, 23, torch.float64),
    "e11m52": (11, 52, torch.float64),
    "e9m30": (9, 30, torch.float64),
    "e11m5": (11, 5, torch.float64),
    "e3m20": (3, 20, torch.float32),
    "e7m16": (7, 16, torch.float32),
}


@cache
def _wide_sample(name: str) -> np.ndarray:
    """Inputs concentrated where rounding is interesting: near the format's own grid."""
    e, m, dtype = WIDE[name]
    bias = (1 << (e - 1)) - 1
    emin, emax = 1 - bias, (1 << e) - 2 - bias
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    n = 100
    lo_exp = max(emin - m - 3, -1074 if dtype == torch.float64 else -149)
    hi_exp = min(emax + 2, 1023 if dtype == torch.float64 else 127)
    exps = rng.integers(lo_exp, hi_exp + 1, n)
    # grid points and midpoints of the target (k + 0.5) * 2^(e - m), nudged by tiny offsets
    k = rng.integers(1 << m, 1 << (m + 1), n, dtype=np.uint64).astype(np.float64)
    base = np.ldexp(k + 0.5 * rng.integers(0, 2, n), exps - m)
    pts = [base, np.ldexp(rng.random(n) + 1, exps)]
    ftype = np.float64 if dtype == torch.float64 else np.float32
    out = np.concatenate(pts).astype(ftype)
    out = np.concatenate([out, np.nextafter(out, ftype(np.inf)), np.nextafter(out, ftype(0))])
    vmax = float((2 - Fraction(1, 1 << m)) * Fraction(2) ** emax)
    edges = [vmax, math.ldexp(1.0, emin), math.ldexp(1.0, emin - m), math.ldexp(1.0, emin - m - 1)]
    edges = np.array([v for v in edges if v <= np.finfo(ftype).max], dtype=ftype)
    with np.errstate(over="ignore"):  # nextafter(max of float64) is inf: fine, a case too
        edges = np.concatenate([edges, np.nextafter(edges, ftype(np.inf)), np.nextafter(edges, 0)])
    out = np.concatenate([out, edges, np.array([0.0, math.inf, math.nan], dtype=ftype)])
    return np.concatenate([out, -out]).astype(ftype)


@cache
def _fraction_expected(name: str, mode: str, saturate: bool, subnormals: bool) -> np.ndarray:
    e, m, _ = WIDE[name]
    x = _wide_sample(name)
    return np.array(
        [round_exact(float(v), e, m, mode, saturate, subnormals) for v in x], dtype=np.float64
    )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(WIDE))
def test_wide_formats_vs_fraction_oracle(name, mode, backend, same_bits):
    x = _wide_sample(name)
    xt = torch.from_numpy(x)
    for saturate, subnormals in OPTIONS:
        expected = _fraction_expected(name, mode, saturate, subnormals).astype(x.dtype)
        q = quantize(xt, name, rounding=mode, saturate=saturate, subnormals=subnormals)
        _compare(q, expected, x, f"{name} {mode} sat={saturate} sub={subnormals}", same_bits)


@pytest.mark.parametrize("name", ["float16", "bfloat16", "float8_e5m2", "e3m1", "e6m3"])
def test_fraction_oracle_agrees_with_grid_oracle(name):
    """The two oracles, written differently, agree (IEEE formats, all modes and options)."""
    s = SPECS[name]
    pts = grid_edges(name)
    pts = np.random.default_rng(5).choice(pts, min(256, pts.size), replace=False)
    x = np.concatenate([pts, [math.inf, 1e30, 1e-30]])
    x = np.concatenate([x, np.nextafter(x, np.inf), -x])
    for mode in MODES:
        for saturate, subnormals in OPTIONS:
            a = round_grid(x, name, mode, saturate, subnormals)
            b = np.array([round_exact(v, s.e, s.m, mode, saturate, subnormals) for v in x])
            np.testing.assert_array_equal(a, b, err_msg=f"{mode} {saturate} {subnormals}")


# ----------------------------------------------------------------------------------------------
# e8m0 at the bottom of its range: a Fraction oracle, examples, and every fp32 subnormal
# ----------------------------------------------------------------------------------------------

E8M0 = "float8_e8m0fnu"
E8M0_MIN, E8M0_MAX = Fraction(2) ** -127, Fraction(2) ** 127


def round_e8m0_exact(x: float, mode: str, saturate: bool = False) -> float:
    """Round one float (binary64-exact) into float8_e8m0fnu by the definition, in Fractions.

    The values are the powers of two 2^-127 .. 2^127. A positive x with lo = 2^E <= x < hi =
    2^(E + 1) goes to the nearer of the two in linear distance (x - lo against hi - x; a tie goes
    up, the significand 1 of every value being odd), to lo for toward_zero / down / odd, and to hi
    for up. Everything up to 2^-127, ±0 included, gives 2^-127; negative inputs and NaN give NaN;
    +inf and results past 2^127 give NaN (toward_zero / down / odd of a finite input stop at
    2^127), or 2^127 with ``saturate``.
    """
    if math.isnan(x) or x < 0:  # -0.0 < 0 is False: -0 is a zero, not a negative input
        return math.nan
    if math.isinf(x):
        return float(E8M0_MAX) if saturate else math.nan
    a = Fraction(x)
    if a <= E8M0_MIN:
        return float(E8M0_MIN)
    big_e = a.numerator.bit_length() - a.denominator.bit_length()  # floor(log2 a): d = 2^t
    lo = Fraction(2) ** big_e
    hi = 2 * lo
    away = {
        "nearest": a - lo >= hi - a,
        "toward_zero": False,
        "up": a != lo,
        "down": False,
        "odd": False,
    }[mode]
    r = hi if away else lo
    if r > E8M0_MAX:
        if mode in ("nearest", "up") and not saturate:
            return math.nan
        r = E8M0_MAX
    return float(r)


def _e8m0_probe_points() -> np.ndarray:
    """float64 points around every e8m0 value and midpoint, dense in (0, 2^-126), specials."""
    p = grid_edges(E8M0)
    bottom = np.ldexp([0.25, 0.5, 0.75, 1.0, 1.25, 1.4, 1.4999, 1.5, 1.5001, 1.9, 2.0], -127)
    p = np.concatenate([p, bottom, [2.0**-149, 2.0**-1074, 1e-300, 1e300, 2.0**128]])
    near = [np.nextafter(p, np.inf), np.nextafter(p, 0), p * (1 + 2.0**-40), p * (1 - 2.0**-40)]
    p32 = p[p < 2.0**127].astype(np.float32)
    p = np.concatenate([p, *near, np.nextafter(p32, np.float32(np.inf))])
    return np.concatenate([p, -p, [0.0, -0.0, math.inf, -math.inf, math.nan]])


@pytest.mark.parametrize("saturate", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_e8m0_fraction_oracle_agrees_with_grid_oracle(mode, saturate):
    """The two e8m0 oracles, written differently, agree (linear distance, ties up)."""
    x = _e8m0_probe_points()
    a = round_grid(x, E8M0, mode, saturate)
    b = np.array([round_e8m0_exact(float(v), mode, saturate) for v in x])
    np.testing.assert_array_equal(a, b, err_msg=f"{mode} saturate={saturate}")


T127 = 2.0**-127
# x -> (nearest, up, toward_zero = down = odd); NaN for negative inputs in every mode
E8M0_BOTTOM_CASES = [
    (1.25 * T127, T127, 2 * T127, T127),  # nearer to 2^-127 (torch 2.13 gives 2^-126)
    (1.4 * T127, T127, 2 * T127, T127),
    (1.4999 * T127, T127, 2 * T127, T127),
    (1.5 * T127, 2 * T127, 2 * T127, T127),  # the tie goes up
    (1.9 * T127, 2 * T127, 2 * T127, T127),
    (T127, T127, T127, T127),  # exact
    (T127 * (1 + 2.0**-22), T127, 2 * T127, T127),  # the next float32 above 2^-127
    (2.0**-126, 2.0**-126, 2.0**-126, 2.0**-126),
    (3 * 2.0**-127, 4 * T127, 4 * T127, 2 * T127),  # 1.5 * 2^-126: a tie, up
    (0.75 * T127, T127, T127, T127),  # below 2^-127: always 2^-127
    (2.0**-128, T127, T127, T127),
    (2.0**-149, T127, T127, T127),
    (0.0, T127, T127, T127),  # e8m0 has no zero
    (-0.0, T127, T127, T127),
    (-1.25 * T127, math.nan, math.nan, math.nan),
    (-(2.0**-149), math.nan, math.nan, math.nan),
    (math.nan, math.nan, math.nan, math.nan),
]
# float64 only: closer to the tie than float32 can express
E8M0_BOTTOM_CASES64 = [
    (1.5 * T127 * (1 - 2.0**-40), T127, 2 * T127, T127),
    (1.5 * T127 * (1 + 2.0**-40), 2 * T127, 2 * T127, T127),
    (T127 * (1 + 2.0**-52), T127, 2 * T127, T127),
    (T127 * (1 - 2.0**-53), T127, T127, T127),
    (2.0**-1074, T127, T127, T127),
]


def _bottom_expected(case: tuple[float, float, float, float], mode: str) -> float:
    _, nearest, up, trunc = case
    return {"nearest": nearest, "up": up}.get(mode, trunc)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", MODES)
def test_e8m0_bottom_binade_examples(mode, dtype, backend):
    """(0, 2^-126) rounds on e8m0's own grid, bit for bit, in both containers and backends."""
    cases = E8M0_BOTTOM_CASES + (E8M0_BOTTOM_CASES64 if dtype == torch.float64 else [])
    x = torch.tensor([c[0] for c in cases], dtype=torch.float64).to(dtype)
    expected = torch.tensor([_bottom_expected(c, mode) for c in cases], dtype=dtype)
    # the table is the Fraction oracle's rule too
    oracle = torch.tensor([round_e8m0_exact(float(v), mode) for v in x], dtype=dtype)
    itype = torch.int32 if dtype == torch.float32 else torch.int64
    assert torch.equal(oracle.view(itype), expected.view(itype))
    q = quantize(x, E8M0, rounding=mode)
    bad = q.view(itype) != expected.view(itype)
    assert not bad.any(), f"{mode}: x={x[bad].tolist()} got={q[bad].tolist()}"
    # and encode stores those powers of two 2^(code - 127): codes 0, 1, 2, and 0xFF for NaN
    codes = encode(x, E8M0, rounding=mode).to(torch.int64)
    exponent = torch.log2(expected.double().nan_to_num(1.0)).long()  # exact: powers of two
    assert torch.equal(codes, torch.where(expected.isnan(), 0xFF, exponent + 127))


def _subnormal_patterns32() -> torch.Tensor:
    """Every positive float32 subnormal bit pattern b (value b * 2^-149), as int32."""
    return torch.arange(1, 1 << 23, dtype=torch.int32)


@pytest.mark.parametrize("mode", MODES)
def test_e8m0_every_fp32_subnormal(mode, backend):
    """All 2^23 - 1 positive float32 subnormals against the oracle in closed form.

    x = b * 2^-149, 2^-127 = 2^22 * 2^-149, the tie 1.5 * 2^-127 = 3 * 2^21 * 2^-149: nearest
    gives 2^-126 exactly for b >= 3 * 2^21, up for b > 2^22, the truncating modes never. The
    same values as float64 inputs (exact) give the same powers of two; negative ones give NaN.
    """
    b = _subnormal_patterns32()
    x = b.view(torch.float32)
    if mode == "nearest":
        goes_up = b >= 3 << 21
    elif mode == "up":
        goes_up = b > 1 << 22
    else:
        goes_up = torch.zeros_like(b, dtype=torch.bool)
    expected = torch.where(goes_up, 0x00800000, 0x00400000).to(torch.int32)  # 2^-126, 2^-127
    got = quantize(x, E8M0, rounding=mode).view(torch.int32)
    bad = got != expected
    assert not bad.any(), (
        f"{int(bad.sum())} differ, e.g. bits={b[bad][:4].tolist()} got={got[bad][:4].tolist()}"
    )
    lo64, hi64 = (1023 - 127) << 52, (1023 - 126) << 52
    expected64 = torch.where(goes_up, hi64, lo64).to(torch.int64)
    assert torch.equal(quantize(x.double(), E8M0, rounding=mode).view(torch.int64), expected64)
    # negative subnormals (a sample): NaN, the canonical quiet NaN of each container
    neg = -x[::97]
    assert bool((quantize(neg, E8M0, rounding=mode).view(torch.int32) == 0x7FC00000).all())
    # the closed form is the Fraction oracle's rule (spot check, every 4099th pattern)
    edges = [1, (1 << 22) - 1, 1 << 22, (1 << 22) + 1, (3 << 21) - 1, 3 << 21, (1 << 23) - 1]
    for bits in [*b[::4099].tolist(), *edges]:
        v = float(bits) * 2.0**-149
        up = bits >= 3 << 21 if mode == "nearest" else (bits > 1 << 22 if mode == "up" else False)
        assert round_e8m0_exact(v, mode) == (2.0**-126 if up else T127), (mode, bits)


def test_e8m0_every_fp32_subnormal_stochastic(backend):
    """Stochastic rounding of all 2^23 - 1 subnormals: one of the two neighbours, unbiased."""
    b = _subnormal_patterns32()
    x = b.view(torch.float32)
    q = quantize(x, E8M0, rounding="stochastic", generator=torch.Generator().manual_seed(2))
    got = q.view(torch.int32)
    # at most 2^-127: always 2^-127; in (2^-127, 2^-126): 2^-127 or 2^-126
    low = b <= 1 << 22
    assert bool((got[low] == 0x00400000).all())
    assert bool(((got[~low] == 0x00400000) | (got[~low] == 0x00800000)).all())
    # P(up) = (x - 2^-127) / 2^-127 = (b - 2^22) / 2^22: the count of ups in each of 16 buckets
    # of consecutive inputs is within 6 standard deviations of the sum of those probabilities
    n = (1 << 22) - 16  # of the 2^22 - 1 inputs in (2^-127, 2^-126), whole buckets only
    p = ((b[~low][:n].to(torch.int64) - (1 << 22)).double() / (1 << 22)).reshape(16, -1)
    k = (got[~low][:n] == 0x00800000).double().reshape(16, -1).sum(1)
    mean, sd = p.sum(1), (p * (1 - p)).sum(1).sqrt()
    assert bool(((k - mean).abs() <= 6 * sd + 1).all()), ((k - mean) / sd).tolist()


# ----------------------------------------------------------------------------------------------
# the rules, as readable examples (each also covered by the sweeps above)
# ----------------------------------------------------------------------------------------------

INF, NAN = math.inf, math.nan


@pytest.mark.parametrize(
    ("name", "mode", "saturate", "subnormals", "x", "expected"),
    [
        # IEEE overflow: toward_zero never reaches inf; up only for positive, down only negative
        ("float16", "toward_zero", False, True, [1e6, -1e6, INF], [65504, -65504, INF]),
        ("float16", "up", False, True, [1e6, -1e6, -INF], [INF, -65504, -INF]),
        ("float16", "down", False, True, [1e6, -1e6, INF], [65504, -INF, INF]),
        ("float16", "nearest", False, True, [65519.99, 65520.0], [65504, INF]),
        ("float16", "nearest", True, True, [1e6, -INF, NAN], [65504, -65504, NAN]),
        ("float16", "odd", False, True, [1e6, 65505.0], [65504, 65504]),
        # formats without inf: NaN unless saturating; fp6 / fp4 always saturate
        ("float8_e4m3fn", "up", False, True, [449.0, -449.0, INF], [NAN, -448, NAN]),
        ("float8_e4m3fn", "nearest", False, True, [464.0, 464.1], [448, NAN]),
        ("float8_e5m2fnuz", "nearest", True, True, [1e9, -INF], [57344, -57344]),
        ("float4_e2m1fn", "up", False, True, [100.0, -INF, 5.0], [6, -6, 6]),
        ("float6_e3m2fn", "nearest", False, True, [INF, 30.0], [28, 28]),
        # subnormals=False flushes results (after rounding) to signed zero
        ("float16", "nearest", False, False, [2.0**-20, -(2.0**-20), 2.0**-14 * 0.9999],
         [0, -0.0, 2.0**-14]),
        ("float8_e4m3fn", "up", False, False, [2.0**-12, -(2.0**-7)], [0, -0.0]),
        # fnuz: no negative zero
        ("float8_e4m3fnuz", "nearest", False, True, [-0.0, -(2.0**-20), -(2.0**-12)], [0, 0, 0]),
        ("float8_e5m2fnuz", "toward_zero", False, False, [-(2.0**-16)], [0]),
        # e8m0: powers of two, ties up, no zero, negative -> NaN
        ("float8_e8m0fnu", "nearest", False, True, [3.0, 2.9, 0.0, 2.0**-140, -1.0],
         [4, 2, 2.0**-127, 2.0**-127, NAN]),
        ("float8_e8m0fnu", "up", False, True, [2.0**-127, 2.0**-128, 3.0],
         [2.0**-127, 2.0**-127, 4]),
        ("float8_e8m0fnu", "toward_zero", False, True, [3.9, 2.0**128 * 0.99], [2, 2.0**127]),
        ("float8_e8m0fnu", "nearest", False, True, [1.5 * 2.0**127, INF], [NAN, NAN]),
        ("float8_e8m0fnu", "nearest", True, True, [1.5 * 2.0**127, INF], [2.0**127, 2.0**127]),
        # round to odd: inexact results get an odd last bit
        ("float8_e5m2", "odd", False, True, [1.01, 1.3, 1.25, -1.01], [1.25, 1.25, 1.25, -1.25]),
    ],
)  # fmt: skip
def test_rules_examples(name, mode, saturate, subnormals, x, expected, backend, same_bits):
    xt = torch.tensor(x, dtype=torch.float64)
    q = quantize(xt, name, rounding=mode, saturate=saturate, subnormals=subnormals)
    same_bits(q, torch.tensor(expected, dtype=torch.float64), xt, f"{name} {mode}")
    q32 = quantize(xt.float(), name, rounding=mode, saturate=saturate, subnormals=subnormals)
    same_bits(q32, torch.tensor(expected, dtype=torch.float64).float(), xt.float(), "float32")


# ----------------------------------------------------------------------------------------------
# stochastic rounding
# ----------------------------------------------------------------------------------------------

SR_FORMATS = [
    "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2", "float4_e2m1fn", "e3m1",
    "float8_e8m0fnu",
]  # fmt: skip


def _neighbours(x: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    return round_grid(x, name, "down"), round_grid(x, name, "up")


def _binomial_ok(k: np.ndarray, n: int, p: np.ndarray, z: float = 6.0) -> np.ndarray:
    """|k - n p| within z standard deviations (+1 for the discreteness at tiny n p)."""
    return np.abs(k - n * p) <= z * np.sqrt(n * p * (1 - p)) + 1


@pytest.mark.parametrize("name", SR_FORMATS)
def test_stochastic_neighbours_and_mean(name, backend):
    g = grid(name)
    rng = np.random.default_rng(11)
    vals = g.values[1:-1]
    # inputs strictly between neighbours (both signs) and exact values, some in the subnormals
    a = rng.choice(vals, 48)
    b = np.minimum(g.values[np.searchsorted(g.values, a) + 1], g.max)
    t = rng.random(48)
    x = np.concatenate([a + (b - a) * t, a, [g.max]])
    if SPECS[name].kind != "e8m0":  # e8m0 has no zero, and negative inputs give NaN
        x = np.concatenate([x, [0.0], -x])
    else:  # the bottom binade, [2^-127, 2^-126)
        bottom = [1.0, 1.0 + 2.0**-20, 1.25, 1.4, 1.5, 1.875]  # [2^-127, 2^-126)
        x = np.concatenate([x, np.ldexp(bottom, -127)])
    x = x.astype(np.float32).astype(np.float64)
    lo, hi = _neighbours(x, name)
    n = 4000
    xt = torch.from_numpy(x).float()
    draws = quantize(
        xt.repeat(n), name, rounding="stochastic", generator=torch.Generator().manual_seed(1)
    ).reshape(n, -1)
    d = draws.double().numpy()
    assert np.all((d == lo) | (d == hi)), "a stochastic result is not one of the two neighbours"
    p_up = np.where(hi > lo, (x - lo) / np.where(hi > lo, hi - lo, 1), 0.0)
    k_up = (d == hi).sum(0) * (hi > lo)
    ok = _binomial_ok(k_up, n, p_up)
    assert ok.all(), f"biased: x={x[~ok]} p={p_up[~ok]} k/n={k_up[~ok] / n}"
    # the mean is within the binomial bound of the input itself
    mean = d.mean(0)
    bound = 6 * (hi - lo) * np.sqrt(p_up * (1 - p_up) / n) + (hi - lo) / n
    assert np.all(np.abs(mean - x) <= bound)


@pytest.mark.parametrize(
    ("name", "x", "quantum"),
    [
        ("float16", 2.0**-40, 2.0**-24),  # P(up) = 2^-16, far below the smallest subnormal
        ("float16", -(2.0**-34), 2.0**-24),  # P = 2^-10, negative
        ("bfloat16", 1 + 2.0**-20, 2.0**-7),  # P = 2^-13 above a normal value
        ("float8_e4m3fn", 2.0**-18, 2.0**-9),  # P = 2^-9
    ],
)
def test_stochastic_tiny_probability(name, x, quantum, backend):
    """Many draws of a small tensor: P(round away) = distance / quantum even when tiny."""
    lo = math.floor(abs(x) / quantum) * quantum
    p = (abs(x) - lo) / quantum
    small = torch.full((4096,), x)
    calls = 128 if backend == "c" else 32  # seeds must change between calls (default generator)
    torch.manual_seed(123)
    ups = 0
    for _ in range(calls):
        q = quantize(small, name, rounding="stochastic").double().abs()
        assert torch.all((q == lo) | (q == lo + quantum))
        ups += int((q != lo).sum())
    n = calls * small.numel()
    big = quantize(
        torch.full((1 << 20,), x), name, rounding="stochastic",
        generator=torch.Generator().manual_seed(9),
    ).double().abs()  # fmt: skip
    ups_big = int((big != lo).sum())
    assert _binomial_ok(np.array([ups, ups_big]), np.array([n, 1 << 20]), p).all(), (
        ups / n, ups_big / (1 << 20), p,
    )  # fmt: skip
    assert ups + ups_big > 0  # the event is rare, not impossible


def test_stochastic_reproducible(backend, same_bits):
    x = torch.linspace(-3, 3, 10001)

    def sr(seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return quantize(x, "float8_e4m3fn", rounding="stochastic", generator=g)

    a, b, c = sr(42), sr(42), sr(43)
    same_bits(a, b, x, "same seed, same result")
    assert not torch.equal(a, c), "different seeds gave identical results"
    g = torch.Generator().manual_seed(42)
    first = quantize(x, "float8_e4m3fn", rounding="stochastic", generator=g)
    second = quantize(x, "float8_e4m3fn", rounding="stochastic", generator=g)
    same_bits(first, a, x, "first draw of a generator")
    assert not torch.equal(first, second), "the generator's state did not advance"


def test_stochastic_specials(backend, same_bits):
    x = torch.tensor([math.nan, math.inf, -math.inf, 0.0, -0.0, 1e9, -1e9, 448.0])
    q = quantize(x, "float8_e4m3fn", rounding="stochastic", generator=torch.Generator())
    expected = torch.tensor([NAN, NAN, NAN, 0.0, -0.0, NAN, NAN, 448.0])
    same_bits(q, expected, x, "e4m3fn")
    q = quantize(x, "float8_e4m3fn", rounding="stochastic", saturate=True)
    same_bits(q, torch.tensor([NAN, 448, -448, 0.0, -0.0, 448, -448, 448]), x, "saturate")
    q = quantize(x, "float16", rounding="stochastic")
    same_bits(q, torch.tensor([NAN, INF, -INF, 0.0, -0.0, INF, -INF, 448]), x, "fp16")
