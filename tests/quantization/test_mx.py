"""Tests for mixprec.mx (OCP Microscaling v1.0 block formats).

Two independent oracles written here, not in mixprec:

* ``ref_mx``: a slow per-block reference in ``fractions.Fraction`` that follows the spec's text
  (shared_exp = floor(log2 amax) - emax_elem, clamp at -127, element rounding over an explicit
  enumeration of the element format's values built from its bit layout), for every
  deterministic rounding mode;
* ``ref_mx_ml``: a vectorised numpy + ml_dtypes version for round-to-nearest on larger inputs
  (scales from ``np.frexp``, elements through ml_dtypes' casts after clamping to ±max).
"""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest
import torch

from mixprec.formats import MX_FORMATS, MXFormat, get_mx_format
from mixprec.quantization import mx_decode, mx_encode, mx_quantize, mx_scale_exponents

# name -> (exponent bits, mantissa bits, bias, encoding, emax_elem from the spec's table,
#          ml_dtypes type)
SPEC = {
    "mxfp8_e4m3": (4, 3, 7, "fn", 8, ml_dtypes.float8_e4m3fn),
    "mxfp8_e5m2": (5, 2, 15, "ieee", 15, ml_dtypes.float8_e5m2),
    "mxfp6_e3m2": (3, 2, 3, "finite", 4, ml_dtypes.float6_e3m2fn),
    "mxfp6_e2m3": (2, 3, 1, "finite", 2, ml_dtypes.float6_e2m3fn),
    "mxfp4_e2m1": (2, 1, 1, "finite", 2, ml_dtypes.float4_e2m1fn),
}
NAMES = list(SPEC)
DETERMINISTIC = ["nearest", "toward_zero", "up", "down", "odd"]


# ----------------------------------------------------------------------------------------------
# the Fraction oracle
# ----------------------------------------------------------------------------------------------


def element_values(name: str) -> list[Fraction]:
    """Non-negative finite values of the element format, indexed by their code."""
    e_bits, m_bits, bias, enc, _, _ = SPEC[name]
    vals = []
    for code in range(1 << (e_bits + m_bits)):
        ef, mant = code >> m_bits, code & ((1 << m_bits) - 1)
        top = ef == (1 << e_bits) - 1
        if enc == "ieee" and top:
            continue  # inf / NaN
        if enc == "fn" and top and mant == (1 << m_bits) - 1:
            continue  # NaN
        if ef == 0:
            v = Fraction(mant, 1 << m_bits) * Fraction(2) ** (1 - bias)
        else:
            v = (1 + Fraction(mant, 1 << m_bits)) * Fraction(2) ** (ef - bias)
        vals.append(v)
    assert vals == sorted(vals)
    return vals


VALUES = {n: element_values(n) for n in NAMES}


def round_element(s: Fraction, negative: bool, name: str, mode: str) -> float:
    """Round |s| (saturating at max) per mode; returns a signed float (-0.0 kept)."""
    vals = VALUES[name]
    a = min(abs(s), vals[-1])  # saturation: clamp, then round (max is representable)
    i = max(k for k, v in enumerate(vals) if v <= a)
    lo = vals[i]
    if a == lo:
        q = lo
    else:
        hi = vals[i + 1]
        if mode == "toward_zero":
            q = lo
        elif mode == "up":
            q = lo if negative else hi
        elif mode == "down":
            q = hi if negative else lo
        elif mode == "odd":
            q = lo if i % 2 else hi  # code parity = index parity
        elif mode == "nearest":
            tie_q = lo if i % 2 == 0 else hi  # ties to the even code
            q = tie_q if a - lo == hi - a else (lo if a - lo < hi - a else hi)
        else:
            raise AssertionError(mode)
    return -float(q) if negative else float(q)


def floor_log2(a: Fraction) -> int:
    e = a.numerator.bit_length() - a.denominator.bit_length()
    if a < Fraction(2) ** e:
        e -= 1
    assert Fraction(2) ** e <= a < Fraction(2) ** (e + 1)
    return e


def ceil_log2(a: Fraction) -> int:
    e = floor_log2(a)
    return e if a == Fraction(2) ** e else e + 1


def round_mantissa(a: Fraction, m_bits: int) -> Fraction:
    """``a`` rounded to ``m_bits`` fraction bits in its binade, ties to even."""
    ulp = Fraction(2) ** (floor_log2(a) - m_bits)
    q, r = divmod(a, ulp)
    if r * 2 > ulp or (r * 2 == ulp and q % 2 == 1):
        q += 1
    return q * ulp


def shared_exponent(amax: Fraction, name: str, rule: str, work: type) -> int:
    """The shared exponent of a block by a scale-rounding rule, from the rules' definitions
    (``work``: the float type the rceil quotient amax / max is rounded to)."""
    if amax == 0:
        return -127
    emax, m_bits = SPEC[name][4], SPEC[name][1]
    if rule == "floor":
        return floor_log2(amax) - emax
    if rule == "ceil":
        return ceil_log2(amax) - emax
    if rule == "even":
        return floor_log2(round_mantissa(amax, m_bits)) - emax
    assert rule == "rceil", rule
    d = Fraction(float(work(float(amax / VALUES[name][-1]))))  # float64 then float32: exact
    return -127 if d == 0 else ceil_log2(d)


def ref_block(
    values: list[float], name: str, mode: str, rule: str = "floor", work: type = float
) -> tuple[int | None, list[float]]:
    """(shared exponent or None for the NaN scale, element values times scale) of one block."""
    if any(not math.isfinite(v) for v in values):
        return None, [math.nan] * len(values)
    amax = max(abs(Fraction(v)) for v in values)
    shared = shared_exponent(amax, name, rule, work)
    if shared > 127:
        return None, [math.nan] * len(values)
    shared = max(shared, -127)
    scale = Fraction(2) ** shared
    out = []
    for v in values:
        neg = math.copysign(1.0, v) < 0
        q = round_element(Fraction(v) / scale, neg, name, mode)
        out.append(math.copysign(float(abs(Fraction(q)) * scale), q))
    return shared, out


def ref_mx(
    x: torch.Tensor, name: str, mode: str, block_size: int, axis: int, rule: str = "floor"
) -> torch.Tensor:
    """Apply ref_block to consecutive chunks along axis (the last chunk may be short)."""
    work = float if x.dtype == torch.float64 else np.float32
    a = np.moveaxis(x.double().numpy(), axis, -1)
    out = np.empty_like(a)
    for idx in np.ndindex(*a.shape[:-1]):
        row = a[idx].tolist()
        res: list[float] = []
        for start in range(0, len(row), block_size):
            res.extend(ref_block(row[start : start + block_size], name, mode, rule, work)[1])
        out[idx] = res
    return torch.from_numpy(np.moveaxis(out, -1, axis).copy())


def ref_mx_ml(x: np.ndarray, name: str, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Round-to-nearest reference via ml_dtypes on a 2-D float32/64 array, axis -1.

    Returns (values as float64, E8M0 scale codes).
    """
    _, _, _, _, emax, ml = SPEC[name]
    rows, n = x.shape
    nb = -(-n // block_size)
    padded = np.zeros((rows, nb * block_size), dtype=np.float64)
    padded[:, :n] = x
    b = padded.reshape(rows, nb, block_size)
    with np.errstate(invalid="ignore"):
        amax = np.abs(b).max(-1)
    _, e = np.frexp(amax)
    shared = np.where(amax == 0, -127, e.astype(np.int64) - 1 - emax)
    bad = ~np.isfinite(amax) | (shared > 127)
    shared = np.clip(shared, -127, 127)
    scale = np.ldexp(1.0, shared)
    maxv = float(ml_dtypes.finfo(ml).max)
    with np.errstate(invalid="ignore"):
        s = np.clip(b / scale[..., None], -maxv, maxv)
    q = s.astype(ml).astype(np.float64) * scale[..., None]
    q[bad] = np.nan
    codes = np.where(bad, 255, shared + 127).astype(np.uint8)
    return q.reshape(rows, -1)[:, :n], codes


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit-level equality as float64: NaN matches NaN, and the sign of zero must match."""
    a = actual.double()
    b = expected.double()
    assert a.shape == b.shape, (a.shape, b.shape)
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    bad = (nan_a != nan_b) | (~nan_a & (a.view(torch.int64) != b.view(torch.int64)))
    if bad.any():
        i = int(bad.nonzero()[0][0]) if a.dim() == 1 else bad.nonzero()[0].tolist()
        raise AssertionError(
            f"{int(bad.sum())} mismatches; first at {i}: got {a[bad][0].item()!r}, "
            f"expected {b[bad][0].item()!r}"
        )


def varied_blocks(rows: int, n: int, seed: int, lo: int, hi: int) -> torch.Tensor:
    """Normal samples whose rows have magnitudes 2^k, k in [lo, hi]: many different scales."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(lo, hi + 1, (rows, 1), generator=g).double()
    x = torch.randn(rows, n, generator=g, dtype=torch.float64) * torch.exp2(k)
    return x


def crafted_blocks(name: str, seed: int) -> torch.Tensor:
    """Blocks of 32 holding the element max (so scale = 2^k exactly), exact element values and
    exact midpoints (ties) between neighbours, times 2^k."""
    g = np.random.default_rng(seed)
    vals = VALUES[name]
    mids = [(a + b) / 2 for a, b in itertools.pairwise(vals)]
    rows = []
    for k in (-120, -3, 0, 5, 100):
        pool = [*vals, *mids]
        picks = [pool[i] for i in g.integers(0, len(pool), 31)]
        signs = g.choice([-1, 1], 32)
        row = [vals[-1], *picks]
        rows.append([float(s * v * Fraction(2) ** k) for s, v in zip(signs, row, strict=True)])
    return torch.tensor(rows, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# formats
# ----------------------------------------------------------------------------------------------


def test_format_table() -> None:
    assert list(MX_FORMATS) == NAMES
    for name, (e, m, _bias, _enc, emax, ml) in SPEC.items():
        f = get_mx_format(name)
        assert isinstance(f, MXFormat)
        assert f.block_size == 32
        assert (f.element.exponent_bits, f.element.mantissa_bits) == (e, m)
        assert f.emax_elem == emax
        assert f.element.max == float(ml_dtypes.finfo(ml).max)
        assert f.bits_per_element == 1 + e + m + 8 / 32
    with pytest.raises(AttributeError):
        get_mx_format("mxfp8_e4m3").block_size = 16  # type: ignore[misc]


@pytest.mark.parametrize(
    ("alias", "name"),
    [
        ("float8_e4m3fn", "mxfp8_e4m3"), ("e4m3", "mxfp8_e4m3"), ("MXFP8_E4M3", "mxfp8_e4m3"),
        ("float8_e5m2", "mxfp8_e5m2"), ("e5m2", "mxfp8_e5m2"), ("e3m2", "mxfp6_e3m2"),
        ("float6_e2m3fn", "mxfp6_e2m3"), ("fp4", "mxfp4_e2m1"), ("mxfp4", "mxfp4_e2m1"),
        ("e2m1", "mxfp4_e2m1"), ("mxfp8", "mxfp8_e4m3"), ("MXFP6", "mxfp6_e2m3"),
    ],
)  # fmt: skip
def test_names(alias: str, name: str) -> None:
    assert get_mx_format(alias).name == name


@pytest.mark.parametrize("bad", ["bf16", "float8_e4m3fnuz", "e4m4", "mxfp9", "nope"])
def test_unknown_format(bad: str) -> None:
    with pytest.raises(ValueError, match="mxfp8_e4m3") as info:
        mx_quantize(torch.ones(4), bad)
    assert "mxfp4_e2m1" in str(info.value)


def test_bad_format_type() -> None:
    with pytest.raises(TypeError, match="int"):
        get_mx_format(8)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("short", "name"), [("mxfp8", "mxfp8_e4m3"), ("mxfp6", "mxfp6_e2m3"), ("mxfp4", "mxfp4_e2m1")]
)
def test_short_names_in_every_kernel(short: str, name: str) -> None:
    """One MX registry: mx_quantize, mx_encode and mx_decode take the short names too."""
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(7))
    expected = mx_quantize(x, name)
    assert torch.equal(mx_quantize(x, short), expected)
    scales, codes = mx_encode(x, short)
    assert torch.equal(mx_decode(scales, codes, short), expected)


# ----------------------------------------------------------------------------------------------
# values against the oracles
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_nearest_matches_ml_dtypes(name: str) -> None:
    # 256 rows x 96 = 768 blocks, scales spanning nearly all of float32's range
    x = varied_blocks(256, 96, seed=1, lo=-135, hi=120).float()
    expected, codes = ref_mx_ml(x.numpy(), name, 32)
    assert_same(mx_quantize(x, name), torch.from_numpy(expected))
    scales, _ = mx_encode(x, name)
    assert torch.equal(scales, torch.from_numpy(codes))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("mode", DETERMINISTIC)
def test_rounding_modes_match_fraction_oracle(name: str, mode: str) -> None:
    x = torch.cat([crafted_blocks(name, seed=3), varied_blocks(3, 32, 4, -20, 20).float()])
    assert_same(mx_quantize(x, name, rounding=mode), ref_mx(x, name, mode, 32, -1))


@pytest.mark.parametrize("mode", DETERMINISTIC)
def test_float64_input(mode: str) -> None:
    x = varied_blocks(6, 40, seed=5, lo=-1070, hi=200)
    x[0, 3] = 2.0**-1074  # tiny element next to a big one: x / X underflows float64
    x[0, 0] = 2.0**100
    x[1, 0] = 2.0**300  # shared exponent > 127: NaN scale
    for name in ("mxfp8_e5m2", "mxfp4_e2m1"):
        got = mx_quantize(x, name, rounding=mode)
        assert got.dtype == torch.float64
        assert_same(got, ref_mx(x, name, mode, 32, -1))


@pytest.mark.parametrize("mode", ["up", "down", "odd", "toward_zero", "nearest"])
def test_element_far_below_block_max(mode: str) -> None:
    """x / X underflows float32 (2^-149 / 2^120): up/down/odd must still see a nonzero."""
    x = torch.zeros(32)
    x[0] = 2.0**127
    x[1] = 2.0**-149
    x[2] = -(2.0**-149)
    x[3] = -0.0
    for name in NAMES:
        assert_same(mx_quantize(x, name, rounding=mode), ref_mx(x, name, mode, 32, -1))
    got = mx_quantize(x, "mxfp8_e4m3", rounding="up")
    assert got[1].item() == 2.0 ** (127 - 8 - 9)  # scale 2^119 times e4m3's min subnormal 2^-9


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(dtype: torch.dtype) -> None:
    hi = 14 if dtype == torch.float16 else 120
    x = varied_blocks(8, 64, seed=6, lo=-20, hi=hi).to(dtype)
    for name in ("mxfp8_e4m3", "mxfp6_e2m3", "mxfp4_e2m1"):
        got = mx_quantize(x, name)
        assert got.dtype == dtype and got.shape == x.shape
        # exact values rounded once into the half dtype
        assert_same(got, ref_mx(x.double(), name, "nearest", 32, -1).to(dtype))


def test_values_are_scale_times_element() -> None:
    x = varied_blocks(4, 64, seed=7, lo=-5, hi=5).float()
    for name in NAMES:
        q = mx_quantize(x, name).double().reshape(4, 2, 32)
        scales, _ = mx_encode(x, name)
        s = torch.exp2(scales.double() - 127).unsqueeze(-1)
        elems = q / s
        allowed = torch.tensor([float(v) for v in VALUES[name]], dtype=torch.float64)
        assert torch.isin(elems.abs(), allowed).all()


# ----------------------------------------------------------------------------------------------
# special values and edge cases
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_special_blocks(name: str) -> None:
    x = torch.ones(6, 32)
    x[0] = 0.0
    x[0, 5] = -0.0
    x[1, 7] = math.nan
    x[2, 0] = math.inf
    x[3, 31] = -math.inf
    x[4] = torch.linspace(-(2.0**-130), 2.0**-130, 32)  # float32 subnormals: scale clamps
    x[5, :16] = -0.0
    q = mx_quantize(x, name)
    assert_same(q[0], x[0])  # zeros, signs kept
    assert torch.isnan(q[1:4]).all()  # NaN / inf anywhere -> whole block NaN
    assert_same(q[4], ref_mx(x[4:5], name, "nearest", 32, -1)[0])
    scales, codes = mx_encode(x, name)
    emax = SPEC[name][4]
    assert scales[:, 0].tolist() == [0, 255, 255, 255, 0, 127 - emax]  # ones: 2^(0 - emax)
    assert (codes[1:4] == 0).all()  # ignored elements of NaN-scale blocks
    assert_same(mx_decode(scales, codes, name), q)


def test_subnormal_block_with_directed_rounding() -> None:
    x = torch.full((32,), 2.0**-140)
    # scale clamps to 2^-127 (floor(log2) - emax = -148 for e4m3); 2^-13 rounds up to 2^-9
    got = mx_quantize(x, "mxfp8_e4m3", rounding="up")
    assert (got == 2.0 ** (-127 - 9)).all()
    assert (mx_quantize(x, "mxfp8_e4m3") == 0).all()
    assert_same(got, ref_mx(x, "mxfp8_e4m3", "up", 32, -1))


def test_float64_scale_overflow_is_nan() -> None:
    x = torch.tensor([2.0**200, 1.0, 2.0**130, 0.5], dtype=torch.float64)
    # block 0 amax 2^200: shared 185 > 127; block 1 amax 2^130: shared 122 (e4m3)
    got = mx_quantize(x, "mxfp8_e4m3", block_size=2)
    assert torch.isnan(got[:2]).all()
    assert got[2].item() == 2.0**130 and got[3].item() == 0.0
    scales, _ = mx_encode(x, "mxfp8_e4m3", block_size=2)
    assert scales.tolist() == [255, 122 + 127]


def test_saturation() -> None:
    # e4m3: block max 480 -> scale 2^0 (floor(log2 480) = 8 = emax) -> 480 rounds to 512
    x = torch.tensor([480.0, 1.0, -480.0, 0.0])
    assert mx_quantize(x, "mxfp8_e4m3", block_size=4).tolist() == [448.0, 1.0, -448.0, 0.0]
    ns = mx_quantize(x, "mxfp8_e4m3", block_size=4, saturate=False)
    assert torch.isnan(ns[[0, 2]]).all() and ns[1].item() == 1.0
    # e5m2: 64512 = 1.96875 * 2^15 rounds to 2^16 > max 57344
    y = torch.tensor([64512.0, -64512.0])
    assert mx_quantize(y, "mxfp8_e5m2", block_size=2).tolist() == [57344.0, -57344.0]
    assert mx_quantize(y, "mxfp8_e5m2", block_size=2, saturate=False).tolist() == [
        math.inf,
        -math.inf,
    ]
    s, c = mx_encode(y, "mxfp8_e5m2", block_size=2, saturate=False)
    assert c.tolist() == [0x7C, 0xFC]
    assert mx_decode(s, c, "mxfp8_e5m2", block_size=2).tolist() == [math.inf, -math.inf]
    # fp4 cannot overflow into anything but max: 7.5 -> 6 either way
    z = torch.tensor([7.5, 1.0])
    for sat in (True, False):
        assert mx_quantize(z, "mxfp4_e2m1", block_size=2, saturate=sat).tolist() == [6.0, 1.0]


@pytest.mark.parametrize("axis", [0, 1, -2, 2])
def test_axis_and_padding(axis: int) -> None:
    x = varied_blocks(12, 35, seed=8, lo=-8, hi=8).float().reshape(3, 4, 35)
    for name in ("mxfp8_e4m3", "mxfp4_e2m1"):
        for bs in (4, 7, 32):
            got = mx_quantize(x, name, block_size=bs, axis=axis)
            assert got.shape == x.shape and got.is_contiguous()
            assert_same(got, ref_mx(x, name, "nearest", bs, axis))
            s, c = mx_encode(x, name, block_size=bs, axis=axis)
            nb = -(-x.shape[axis] // bs)
            shape = list(x.shape)
            shape[axis] = nb
            assert list(s.shape) == shape and c.shape == x.shape
            assert_same(mx_decode(s, c, name, block_size=bs, axis=axis), got)


def test_padding_equals_explicit_zero_padding() -> None:
    x = varied_blocks(3, 50, seed=9, lo=-3, hi=3).float()
    padded = torch.cat([x, torch.zeros(3, 14)], dim=1)
    for name in NAMES:
        assert_same(mx_quantize(x, name), mx_quantize(padded, name)[:, :50])


def test_non_contiguous_input() -> None:
    base = varied_blocks(64, 64, seed=10, lo=-4, hi=4).float()
    x = base.t()[::2]
    assert not x.is_contiguous()
    assert_same(mx_quantize(x, "mxfp6_e3m2"), mx_quantize(x.contiguous(), "mxfp6_e3m2"))


def test_scalar_and_empty() -> None:
    assert mx_quantize(torch.tensor(3.3), "mxfp4_e2m1").item() == 3.0  # 3.3 / 2^-1 = 6.6 -> 6
    assert mx_quantize(torch.tensor(3.3), "mxfp4_e2m1").shape == ()
    s, c = mx_encode(torch.tensor(3.3), "mxfp4_e2m1")
    assert s.tolist() == [126] and c.shape == ()
    assert mx_decode(s, c, "mxfp4_e2m1").item() == 3.0
    for shape in [(0,), (3, 0), (0, 40)]:
        e = torch.zeros(shape)
        assert mx_quantize(e, "mxfp8_e4m3").shape == shape
        s, c = mx_encode(e, "mxfp8_e4m3")
        assert c.shape == shape
        assert mx_decode(s, c, "mxfp8_e4m3").shape == shape


def test_input_not_modified() -> None:
    x = varied_blocks(4, 32, seed=11, lo=-2, hi=2).float()
    before = x.clone()
    mx_quantize(x, "mxfp4_e2m1", rounding="up")
    mx_encode(x, "mxfp4_e2m1")
    assert torch.equal(x, before)


# ----------------------------------------------------------------------------------------------
# encode / decode
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_codes_match_ml_dtypes(name: str) -> None:
    x = varied_blocks(16, 64, seed=12, lo=-40, hi=40).float()
    scales, codes = mx_encode(x, name)
    ml = SPEC[name][5]
    expected, _ = ref_mx_ml(x.numpy(), name, 32)
    scale = np.repeat(np.ldexp(1.0, scales.numpy().astype(np.int64) - 127), 32, axis=1)
    elems = (expected / scale).astype(ml)
    assert np.array_equal(codes.numpy(), elems.view(np.uint8))
    assert codes.dtype == torch.uint8 and scales.dtype == torch.uint8


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_decode_encode_roundtrip(name: str, dtype: torch.dtype) -> None:
    x = varied_blocks(8, 70, seed=13, lo=-30, hi=30).to(dtype)
    x[0, 3] = math.nan
    for mode in ("nearest", "odd"):
        s, c = mx_encode(x, name, rounding=mode)
        assert_same(mx_decode(s, c, name, dtype=dtype), mx_quantize(x, name, rounding=mode))


def test_stochastic_roundtrip_and_reproducible() -> None:
    x = varied_blocks(8, 64, seed=14, lo=-3, hi=3).float()
    for name in NAMES:
        a = mx_quantize(x, name, rounding="stochastic", generator=torch.Generator().manual_seed(1))
        b = mx_quantize(x, name, rounding="stochastic", generator=torch.Generator().manual_seed(1))
        assert_same(a, b)
        s, c = mx_encode(x, name, rounding="stochastic", generator=torch.Generator().manual_seed(1))
        assert_same(mx_decode(s, c, name), a)


def test_stochastic_unbiased_and_bracketed() -> None:
    g = torch.Generator().manual_seed(15)
    row = torch.randn(32, generator=g)
    row[0] = 2.9  # fixes the scale: floor(log2 2.9) = 1 -> 2^(1-2) for e2m1
    n = 4000
    x = row.repeat(n, 1)  # n independent blocks with the same values
    got = mx_quantize(x, "mxfp4_e2m1", rounding="stochastic", generator=g).double()
    lo = ref_mx(row[None], "mxfp4_e2m1", "down", 32, -1)[0]
    hi = ref_mx(row[None], "mxfp4_e2m1", "up", 32, -1)[0]
    assert ((got == lo) | (got == hi)).all()
    width = hi - lo
    p = torch.where(width > 0, (row.double() - lo) / width.clamp(min=1e-300), 0)
    p_hat = torch.where(width > 0, (got.mean(0) - lo) / width.clamp(min=1e-300), 0)
    bound = 5 * torch.sqrt(p * (1 - p) / n) + 1e-9
    assert ((p_hat - p).abs() <= bound).all(), (p_hat - p).abs().max()


def test_pack_fp4() -> None:
    x = torch.tensor([[0.5, 6.0, -6.0, -0.0, 1.0, 1.5]])  # amax 6 -> scale 2^0
    s, c = mx_encode(x, "mxfp4_e2m1")
    assert c.tolist() == [[1, 7, 15, 8, 2, 3]]
    s2, p = mx_encode(x, "mxfp4_e2m1", pack=True)
    assert torch.equal(s, s2)
    assert p.tolist() == [[0x71, 0x8F, 0x32]]  # first element in the low nibble
    assert_same(mx_decode(s, p, "mxfp4_e2m1", packed=True), x)
    with pytest.raises(ValueError, match="even"):
        mx_encode(torch.ones(3), "mxfp4_e2m1", pack=True)
    with pytest.raises(ValueError, match="4-bit"):
        mx_encode(torch.ones(4), "mxfp8_e4m3", pack=True)
    with pytest.raises(ValueError, match="4-bit"):
        mx_decode(s, c, "mxfp8_e4m3", packed=True)


def test_decode_padded_codes_with_shape() -> None:
    x = varied_blocks(2, 40, seed=16, lo=-2, hi=2).float()
    s, c = mx_encode(x, "mxfp8_e4m3")
    padded = torch.cat([c, torch.zeros(2, 24, dtype=torch.uint8)], dim=1)
    got = mx_decode(s, padded, "mxfp8_e4m3", shape=(2, 40))
    assert_same(got, mx_quantize(x, "mxfp8_e4m3"))
    with pytest.raises(ValueError, match="elements along axis"):
        mx_decode(s, c[:, :30], "mxfp8_e4m3", shape=(2, 40))
    with pytest.raises(ValueError, match="scales have shape"):
        mx_decode(s[:, :1], c, "mxfp8_e4m3")
    with pytest.raises(ValueError, match="may differ only along axis"):
        mx_decode(s, c, "mxfp8_e4m3", shape=(3, 40))


def test_decode_dtype() -> None:
    s = torch.tensor([127 + 3, 0xFF], dtype=torch.uint8)
    c = torch.tensor([0x38, 0x38], dtype=torch.uint8)  # e4m3 1.0 twice
    got = mx_decode(s, c, "mxfp8_e4m3", block_size=1, dtype=torch.float64)
    assert got.dtype == torch.float64
    assert got[0].item() == 8.0 and math.isnan(got[1].item())
    with pytest.raises(TypeError, match="integer"):
        mx_decode(s.float(), c, "mxfp8_e4m3", block_size=1)
    with pytest.raises(TypeError, match="floating"):
        mx_decode(s, c, "mxfp8_e4m3", block_size=1, dtype=torch.int32)


# ----------------------------------------------------------------------------------------------
# argument errors
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bs", [0, -32, 2.5, True, "32"])
def test_bad_block_size(bs: object) -> None:
    with pytest.raises(ValueError, match="block_size"):
        mx_quantize(torch.ones(8), block_size=bs)  # type: ignore[arg-type]


def test_bad_axis_rounding_and_dtype() -> None:
    with pytest.raises(ValueError, match="axis 2 is out of range"):
        mx_quantize(torch.ones(2, 8), axis=2)
    with pytest.raises(TypeError, match="axis"):
        mx_quantize(torch.ones(2, 8), axis=1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="stochastic"):
        mx_quantize(torch.ones(8), rounding="nearest_even")
    with pytest.raises(TypeError, match="int32"):
        mx_quantize(torch.ones(8, dtype=torch.int32))
    with pytest.raises(TypeError, match="Tensor"):
        mx_encode([1.0, 2.0])  # type: ignore[arg-type]


@pytest.mark.parametrize("fn", [mx_quantize, mx_encode, mx_scale_exponents])
def test_sparse_input_is_refused_like_quantize(fn: object) -> None:
    # the element checks are quantize's: dense (strided) tensors only
    with pytest.raises(TypeError, match=r"layout torch\.sparse_coo"):
        fn(torch.ones(4, 32).to_sparse())  # type: ignore[operator]


# ----------------------------------------------------------------------------------------------
# names and silent-wrong-answer guards (issue "no silent wrong answers")
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "meant"),
    [("mxfp8_e4m2", "mxfp8_e4m3"), ("mxfp8_e4m2", "mxfp8_e5m2"), ("mxfp6_e3m3", "mxfp6_e3m2"),
     ("mxfp4_e2m2", "mxfp4_e2m1"), ("float4_e2m1", "float4_e2m1fn")],
)  # fmt: skip
def test_unknown_format_suggests_and_stays_short(bad: str, meant: str) -> None:
    with pytest.raises(ValueError) as info:
        get_mx_format(bad)
    message = str(info.value)
    assert message.startswith(f"unknown MX format {bad!r}; did you mean ")
    assert repr(meant) in message.split("?")[0]
    assert len(message) < 250, message


@pytest.mark.parametrize("fn", [mx_quantize, mx_encode])
def test_bad_options_refused_even_for_empty_input(fn) -> None:
    """Validated before the empty-tensor shortcut: a typo never passes silently."""
    empty = torch.ones(0, 32)
    with pytest.raises(TypeError, match=r"torch\.Generator"):
        fn(empty, generator=3)
    with pytest.raises(TypeError, match="saturate must be a bool"):
        fn(empty, saturate="no")
    with pytest.raises(TypeError, match="rounding must be a str"):
        fn(empty, rounding=None)
    with pytest.raises(ValueError, match="did you mean 'nearest'"):
        fn(empty, rounding="nearst")
    with pytest.raises(ValueError, match=r"scale_rounding must be one of \('floor'"):
        fn(empty, scale_rounding="round")
    with pytest.raises(TypeError, match="scale_rounding must be a str"):
        fn(empty, scale_rounding=None)


def test_generator_on_another_device() -> None:
    with pytest.raises(ValueError, match="generator is on device cpu but x is on meta"):
        mx_quantize(
            torch.ones(32, device="meta"), rounding="stochastic", generator=torch.Generator()
        )


def test_decode_refuses_out_of_range_scales_and_codes() -> None:
    """They used to be masked to their low bits: 256 + 127 decoded as the scale 2^0."""
    c = torch.full((32,), 0x38, dtype=torch.uint8)  # e4m3 1.0
    ok = mx_decode(torch.tensor([127]), c, "mxfp8_e4m3")
    assert ok.eq(1.0).all()
    with pytest.raises(ValueError, match=r"scales\[0\] = 383 is out of range .*-128\.\.255"):
        mx_decode(torch.tensor([256 + 127]), c, "mxfp8_e4m3")
    assert mx_decode(torch.tensor([127], dtype=torch.int8), c, "mxfp8_e4m3").eq(1.0).all()
    with pytest.raises(ValueError, match=r"codes\[3\] = 16 is out of range for float4_e2m1fn"):
        mx_decode(torch.tensor([127]), torch.tensor([0, 1, 2, 16] + [0] * 28), "mxfp4")
    with pytest.raises(ValueError, match=r"codes\[1\] = -1000 is out of range for packed"):
        mx_decode(torch.tensor([127]), torch.tensor([0, -1000] + [0] * 14), "mxfp4", packed=True)
    with pytest.raises(TypeError, match="packed must be a bool"):
        mx_decode(torch.tensor([127]), c, "mxfp8_e4m3", packed="no")


# ----------------------------------------------------------------------------------------------
# scale rounding (floor / rceil / ceil / even)
# ----------------------------------------------------------------------------------------------

RULES = ["floor", "rceil", "ceil", "even"]


def edge_blocks(name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Blocks whose maximum sits where the rules differ: powers of two and one ulp above, the
    element max and one ulp above, and the even rule's carry threshold (exact tie) with its
    neighbours; times 2^k for several k; the other elements random below the maximum."""
    _, m_bits, _, _, emax, _ = SPEC[name]
    top = float(VALUES[name][-1])
    carry = 2.0**emax * (2 - 2.0 ** -(m_bits + 1))  # rounds up to the next binade (a tie)
    ulp = 2.0**-23 if dtype == torch.float32 else 2.0**-52
    maxima = [2.0**emax, 2.0**emax * (1 + ulp), top, top * (1 + ulp), carry, carry * (1 - ulp)]
    maxima += [carry * (1 + ulp), 2.0**emax * (2 - ulp)]
    g = torch.Generator().manual_seed(len(name))
    rows = []
    for k in (-100, -7, 0, 3, 60):
        for m in maxima:
            row = torch.rand(32, generator=g, dtype=torch.float64) * 2 - 1
            row[int(torch.randint(32, (1,), generator=g))] = -m
            rows.append(row * 2.0**k)
    return torch.stack(rows).to(dtype)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scale_rounding_matches_fraction_oracle(name: str, rule: str, dtype: torch.dtype) -> None:
    x = torch.cat([edge_blocks(name, dtype), varied_blocks(12, 32, 3, -30, 30).to(dtype)])
    for mode in ("nearest", "toward_zero"):
        expected = ref_mx(x, name, mode, 32, -1, rule)
        assert_same(mx_quantize(x, name, rounding=mode, scale_rounding=rule), expected)
    work = float if dtype == torch.float64 else np.float32
    scales, _ = mx_encode(x, name, scale_rounding=rule)
    for r, row in enumerate(x.double().tolist()):
        for b in range(len(row) // 32):
            shared = ref_block(row[32 * b : 32 * b + 32], name, "nearest", rule, work)[0]
            assert int(scales[r, b]) == max(shared, -127) + 127, (r, b, rule)


@pytest.mark.parametrize("name", NAMES)
def test_scale_rounding_rules_on_known_maxima(name: str) -> None:
    """Spot values: amax = 2^emax, just above, the element max, and the even rule's tie."""
    _, m_bits, _, _, emax, _ = SPEC[name]
    top = float(VALUES[name][-1])
    carry = 2.0**emax * (2 - 2.0 ** -(m_bits + 1))
    cases = {  # amax -> {rule: shared exponent}
        2.0**emax: {"floor": 0, "ceil": 0, "even": 0, "rceil": 0},
        2.0**emax * (1 + 2**-23): {"floor": 0, "ceil": 1, "even": 0, "rceil": 0},
        top: {"floor": 0, "ceil": 1 if top > 2**emax else 0, "even": 0, "rceil": 0},
        carry: {"floor": 0, "ceil": 1, "even": 1, "rceil": 1 if carry > top else 0},
    }
    for amax, want in cases.items():
        x = torch.zeros(1, 32)
        x[0, 5] = amax
        for rule, shared in want.items():
            got = mx_scale_exponents(x, name, scale_rounding=rule)
            assert got.item() == shared, (name, amax, rule)


@pytest.mark.parametrize("rule", RULES)
def test_scale_rounding_keeps_the_specials(rule: str) -> None:
    """NaN/inf blocks get the NaN scale, all-zero blocks 2^-127, under every rule."""
    x = torch.zeros(3, 32)
    x[0, 1] = float("inf")
    x[1, 2] = float("nan")
    scales, _ = mx_encode(x, "mxfp8", scale_rounding=rule)
    assert scales[:, 0].tolist() == [255, 255, 0]
    q = mx_quantize(x, "mxfp8", scale_rounding=rule)
    assert torch.isnan(q[:2]).all() and torch.equal(q[2], x[2])


@pytest.mark.parametrize("rule", RULES)
def test_scale_rounding_encode_decode_roundtrip(rule: str) -> None:
    x = varied_blocks(8, 96, 5, -20, 20).float()
    for name in NAMES:
        s, c = mx_encode(x, name, scale_rounding=rule)
        assert_same(mx_decode(s, c, name), mx_quantize(x, name, scale_rounding=rule))


def test_rceil_never_clamps_and_floor_can() -> None:
    """rceil picks the smallest scale with amax / X <= max; floor can put amax above max."""
    x = torch.zeros(1, 32)
    x[0, 0] = 470.0  # e4m3: floor gives X = 1, 470 clamps to 448; rceil gives X = 2
    assert mx_quantize(x, "mxfp8", scale_rounding="floor")[0, 0].item() == 448.0
    assert mx_quantize(x, "mxfp8", scale_rounding="rceil")[0, 0].item() == 480.0


# ----------------------------------------------------------------------------------------------
# torchao's to_mx (when importable): same bits on ordinary blocks, documented departures
# ----------------------------------------------------------------------------------------------


def _torchao() -> tuple[object, object, dict[str, object]]:
    mx_tensor = pytest.importorskip(
        "torchao.prototype.mx_formats.mx_tensor",
        reason="torchao is not installed (optional: compared against when present)",
    )
    from torchao.prototype.mx_formats import constants, kernels
    from torchao.prototype.mx_formats.config import ScaleCalculationMode

    decoders = {
        "mxfp8_e4m3": (torch.float8_e4m3fn, lambda d: d.float()),
        "mxfp8_e5m2": (torch.float8_e5m2, lambda d: d.float()),
        "mxfp6_e2m3": (constants.DTYPE_FP6_E2M3, kernels.f6_e2m3_unpacked_to_f32),
        "mxfp6_e3m2": (constants.DTYPE_FP6_E3M2, kernels.f6_e3m2_unpacked_to_f32),
        "mxfp4_e2m1": (
            torch.float4_e2m1fn_x2,
            lambda d: kernels.f4_unpacked_to_f32(kernels.unpack_uint4(d)),
        ),
    }
    return mx_tensor.to_mx, ScaleCalculationMode, decoders


def _torchao_mx(x: torch.Tensor, name: str, rule: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(E8M0 codes, dequantized values) of torchao's to_mx."""
    to_mx, mode, decoders = _torchao()
    dtype, decode_elements = decoders[name]
    scales, data = to_mx(x, dtype, 32, scaling_mode=mode(rule))  # type: ignore[operator]
    codes = scales.view(torch.uint8)
    elements = decode_elements(data).reshape(x.shape)
    scale = torch.exp2(codes.float() - 127).repeat_interleave(32, -1)
    return codes, elements * scale


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_torchao_on_ordinary_blocks(name: str, rule: str, dtype: torch.dtype) -> None:
    x = torch.cat([edge_blocks(name), varied_blocks(128, 32, 7, -40, 40).float()]).to(dtype)
    if rule == "rceil":  # leave out departure (3): d = amax / max just above a power of two
        m, _ = torch.frexp(x.float().abs().amax(-1) / float(VALUES[name][-1]))
        x = x[(m == 0.5) | (m > 0.5 * (1 + 2.0**-18))]
    codes, values = _torchao_mx(x, name, rule)
    scales, _ = mx_encode(x, name, scale_rounding=rule)
    assert torch.equal(scales, codes)
    assert_same(mx_quantize(x.float(), name, scale_rounding=rule), values)


@pytest.mark.parametrize("rule", RULES)
def test_torchao_departs_on_smallest_scale_blocks(rule: str) -> None:
    """A block with scale 2^-127: mixprec multiplies by 2^127 (the spec's V_i / X); torchao
    divides by 2^-126 (floor/ceil/even) or multiplies by 1 (rceil)."""
    x = torch.zeros(1, 32)
    x[0, :2] = torch.tensor([2.0**-130, 2.0**-131])  # shared exponent below -127: clamped
    codes, values = _torchao_mx(x, "mxfp8_e4m3", rule)
    scales, _ = mx_encode(x, "mxfp8_e4m3", scale_rounding=rule)
    assert scales.tolist() == codes.tolist() == [[0]]
    ours = mx_quantize(x, "mxfp8_e4m3", scale_rounding=rule)
    assert_same(ours, ref_mx(x, "mxfp8_e4m3", "nearest", 32, -1, rule))
    assert ours[0, 0].item() == 2.0**-130  # 2^-130 / 2^-127 = 2^-3 is an e4m3 value
    assert not torch.equal(values, ours)


@pytest.mark.parametrize("rule", RULES)
def test_torchao_departs_on_inf_blocks(rule: str) -> None:
    """±inf in a block: the spec (and mixprec) give the NaN scale; torchao a finite code."""
    x = torch.ones(1, 32)
    x[0, 3] = float("-inf")
    codes, _ = _torchao_mx(x, "mxfp8_e4m3", rule)
    scales, _ = mx_encode(x, "mxfp8_e4m3", scale_rounding=rule)
    assert scales.tolist() == [[255]] and codes.item() != 255


def test_torchao_rceil_log2_rounding() -> None:
    """torchao's eager rceil takes ceil(log2(d)) in float32, which misses d = 2^10 (1 + 2^-23);
    mixprec decides from d's bits (as cvt.rp.satfinite.ue8m0 does): the next power of two."""
    x = torch.zeros(1, 32)
    x[0, 0] = torch.tensor(448.0 * 2**10).nextafter(torch.tensor(float("inf")))
    codes, _ = _torchao_mx(x, "mxfp8_e4m3", "rceil")
    scales, _ = mx_encode(x, "mxfp8_e4m3", scale_rounding="rceil")
    assert scales.item() == 127 + 11 and codes.item() == 127 + 10
