"""``encode`` / ``decode``: bit codes against torch's and ml_dtypes' own, round trips, packing.

Reference codes are the bit patterns torch and ml_dtypes store for the same conversion
(``.view(uint8)``), IEEE bit patterns (numpy float16, fp32 / fp64 ``.view``), and hand-written
code tables from the format specifications.
"""

from __future__ import annotations

import math
import warnings

import ml_dtypes
import numpy as np
import pytest
import torch

from mixprec.quantization import code_dtype, decode, encode, quantize

# formats of at most 16 bits with a reference decoder: numpy scalar type and its code type
_SMALL = (
    "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e4m3",
    "float8_e3m4", "float8_e4m3b11fnuz", "float8_e8m0fnu", "float6_e3m2fn", "float6_e2m3fn",
    "float4_e2m1fn",
)  # fmt: skip
REFERENCE: dict[str, tuple[type, type]] = {
    "float16": (np.float16, np.uint16),
    "bfloat16": (ml_dtypes.bfloat16, np.uint16),
    **{name: (getattr(ml_dtypes, name), np.uint8) for name in _SMALL},  # same-named types
}
BITS = {"float16": 16, "bfloat16": 16, "float6_e3m2fn": 6, "float6_e2m3fn": 6,
        "float4_e2m1fn": 4}  # fmt: skip
NO_NAN = {"float6_e3m2fn", "float6_e2m3fn", "float4_e2m1fn"}
TORCH_NATIVE = {
    name: getattr(torch, name)
    for name in ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz",
                 "float8_e8m0fnu")
}  # fmt: skip

# canonical NaN code of every format that has one (from the specifications)
CANONICAL_NAN = {
    "float64": 0x7FF8000000000000,
    "float32": 0x7FC00000,
    "tfloat32": 0x3FE00,  # 19 bits: exponent all ones, quiet bit
    "bfloat16": 0x7FC0,
    "float16": 0x7E00,
    "float8_e4m3fn": 0x7F,  # S.1111.111 (positive)
    "float8_e4m3fnuz": 0x80,  # the negative-zero pattern
    "float8_e5m2fnuz": 0x80,
    "float8_e4m3b11fnuz": 0x80,
    "float8_e5m2": 0x7E,  # quiet NaN: exponent all ones, mantissa MSB
    "float8_e4m3": 0x7C,
    "float8_e3m4": 0x78,
    "float8_e8m0fnu": 0xFF,
    "e3m1": 0x0F,
    "e6m9": 0x7F00,
    "e11m4": 0x7FF8,
}


def _nbits(name: str) -> int:
    return BITS.get(name, 8)


def _ref_decode(name: str) -> np.ndarray:
    """float64 value of every code 0 .. 2^bits - 1, decoded by the reference library."""
    t, ct = REFERENCE[name]
    codes = np.arange(1 << _nbits(name), dtype=ct)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return codes.view(t).astype(np.float64)


def _as_unsigned(codes: torch.Tensor, bits: int) -> torch.Tensor:
    return codes.to(torch.int64) & ((1 << bits) - 1)


# ----------------------------------------------------------------------------------------------
# decode
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(REFERENCE))
def test_decode_every_code_matches_reference(name, same_bits):
    n = _nbits(name)
    expected = torch.from_numpy(_ref_decode(name))
    codes = torch.arange(1 << n, dtype=torch.int64)
    same_bits(decode(codes, name, dtype=torch.float64), expected, None, f"{name} int64 codes")
    native = codes.to(code_dtype(name))  # wraps to int16 for 16-bit formats
    same_bits(decode(native, name, dtype=torch.float64), expected, None, f"{name} native codes")
    got32 = decode(native, name)
    assert got32.dtype == torch.float32
    same_bits(got32, expected.float(), None, f"{name} as float32")
    if name in TORCH_NATIVE:
        t = codes.to(torch.uint8).view(TORCH_NATIVE[name]).double()
        same_bits(decode(native, name, dtype=torch.float64), t, None, f"{name} vs torch")


def test_decode_wide_formats(same_bits):
    g = torch.Generator().manual_seed(2)
    c32 = torch.randint(-(1 << 31), 1 << 31, (1 << 16,), generator=g, dtype=torch.int64)
    c32 = c32.to(torch.int32)
    d = decode(c32, "float32")
    ok = ~torch.isnan(d)
    assert torch.equal(d.view(torch.int32)[ok], c32[ok]) and bool(torch.isnan(c32.view(
        torch.float32)[~ok]).all())  # fmt: skip
    c64 = torch.randint(-(1 << 62), 1 << 62, (1 << 14,), generator=g, dtype=torch.int64) * 2
    d = decode(c64, "float64", dtype=torch.float64)
    ok = ~torch.isnan(d)
    assert torch.equal(d.view(torch.int64)[ok], c64[ok])
    # tfloat32 codes are the top 19 bits of the fp32 pattern
    tf = torch.arange(1 << 19, dtype=torch.int32)
    same_bits(decode(tf, "tfloat32"), (tf << 13).view(torch.float32), None, "tfloat32")


@pytest.mark.parametrize(("custom", "ref"), [("e5m10", "float16"), ("e8m7", "bfloat16")])
def test_custom_codes_equal_standard_ones(custom, ref):
    codes = torch.arange(1 << 16, dtype=torch.int64).to(torch.int16)
    a = decode(codes, custom, dtype=torch.float64)
    b = torch.from_numpy(_ref_decode(ref))
    assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a[~a.isnan()], b[~b.isnan()])


# ----------------------------------------------------------------------------------------------
# encode
# ----------------------------------------------------------------------------------------------


def _e8m0_bottom(x: torch.Tensor) -> torch.Tensor:
    """0 < |x| < 2^-126: e8m0 codes there differ between torch 2.13, ml_dtypes < 0.7 and >= 0.7.

    mixprec rounds on e8m0's own grid (1.25 * 2^-127 -> code 0, 1.5 * 2^-127 -> code 1), as
    ml_dtypes 0.7 does; torch 2.13 and older ml_dtypes give code 1 for all of (2^-127, 2^-126).
    These inputs are checked against mixprec's own rule in test_encode_e8m0_bottom_binade.
    """
    a = x.abs()
    return (a > 0) & (a < 2.0**-126)


def _inputs(fp16_patterns, bf16_patterns, specials, random_fp32) -> torch.Tensor:
    return torch.cat([fp16_patterns, bf16_patterns, specials, random_fp32[: 1 << 18]])


@pytest.mark.parametrize("name", list(REFERENCE))
def test_encode_matches_reference_codes(
    name, backend, fp16_patterns, bf16_patterns, specials, random_fp32
):
    x = _inputs(fp16_patterns, bf16_patterns, specials, random_fp32)
    if name in NO_NAN:
        x = x[~torch.isnan(x)]  # no NaN code (and ml_dtypes turns NaN into 0)
    if name == "float8_e8m0fnu":
        x = x[x != 0]  # ml_dtypes gives NaN for 0; mixprec, like torch, gives 2^-127
        x = x[~_e8m0_bottom(x)]  # version-dependent in ml_dtypes
    t, ct = REFERENCE[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = x.numpy().astype(t)
    ref_nan = torch.from_numpy(np.isnan(ref.astype(np.float32)))
    ref_codes = torch.from_numpy(ref.view(ct).astype(np.int64))
    if name in CANONICAL_NAN:
        ref_codes[ref_nan] = CANONICAL_NAN[name]
    codes = encode(x, name)
    assert codes.dtype == code_dtype(name) and codes.shape == x.shape
    got = _as_unsigned(codes, _nbits(name))
    bad = got != ref_codes
    assert not bad.any(), (
        f"{int(bad.sum())} codes differ, e.g. x={x[bad][:4].tolist()} "
        f"got={got[bad][:4].tolist()} expected={ref_codes[bad][:4].tolist()}"
    )


@pytest.mark.parametrize("name", list(TORCH_NATIVE))
def test_encode_matches_torch_codes(name, backend, fp16_patterns, bf16_patterns, specials):
    x = torch.cat([fp16_patterns, bf16_patterns, specials])
    x = x[~torch.isnan(x)]  # torch keeps the sign of a NaN; mixprec's NaN code is canonical
    if name == "float8_e8m0fnu":
        x = x[~(x < 0)]  # torch maps negatives to their magnitude, docs/design.md says NaN
        x = x[~_e8m0_bottom(x)]  # torch 2.13 rounds all of (2^-127, 2^-126) up
    saturate = name == "float8_e4m3fn"  # torch 2.13's e4m3fn cast saturates
    ref = x.to(TORCH_NATIVE[name])
    ref_codes = ref.view(torch.uint8).to(torch.int64)
    ref_codes[torch.isnan(ref.float())] = CANONICAL_NAN[name]
    got = encode(x, name, saturate=saturate).to(torch.int64)
    assert torch.equal(got, ref_codes)


def test_encode_e8m0_bottom_binade(backend, same_bits):
    """Codes of every float32 subnormal, ±0 and their float64 / bfloat16 forms: own grid.

    x = b * 2^-149 is nearer to 2^-127 (code 0) than to 2^-126 (code 1) for b < 3 * 2^21
    (1.5 * 2^-127, the tie, goes up); negative inputs give the NaN code 0xFF; ±0 give code 0.
    """
    b = torch.arange(1, 1 << 23, dtype=torch.int32)
    x = torch.cat([torch.tensor([0.0, -0.0]), b.view(torch.float32), -b[::101].view(torch.float32)])
    # the float32 pattern of each input, negated for a negative input
    bits = torch.cat([torch.zeros(2, dtype=torch.int64), b.to(torch.int64), -b[::101].long()])
    expected = torch.where(bits >= 3 << 21, 1, 0)
    expected = torch.where(bits < 0, 0xFF, expected)
    for t in (x, x.double()):
        codes = encode(t, "float8_e8m0fnu")
        got = codes.to(torch.int64)
        bad = got != expected
        assert not bad.any(), f"{t.dtype}: bits={bits[bad][:4].tolist()} got={got[bad][:4]}"
        back = decode(codes, "float8_e8m0fnu", dtype=t.dtype)
        same_bits(back, quantize(t, "float8_e8m0fnu"), t, f"decode(encode) {t.dtype}")
    xb = x.to(torch.bfloat16)  # bfloat16 subnormals (exact in float32): the same rule
    got = encode(xb, "float8_e8m0fnu").to(torch.int64)
    xbits = xb.float().view(torch.int32).to(torch.int64)
    exp_b = torch.where(xbits >= 3 << 21, 1, 0)
    assert torch.equal(got, torch.where(xb < 0, 0xFF, exp_b))


def test_encode_ieee_containers(fp16_patterns, bf16_patterns, random_fp32):
    x = torch.cat([fp16_patterns, bf16_patterns, random_fp32[: 1 << 16]])
    nan = torch.isnan(x)
    c = encode(x, "float32")
    assert c.dtype == torch.int32
    assert torch.equal(c[~nan], x.view(torch.int32)[~nan])
    assert bool((c[nan] == CANONICAL_NAN["float32"]).all())
    c = encode(x.double(), "float64")
    assert c.dtype == torch.int64
    assert torch.equal(c[~nan], x.double().view(torch.int64)[~nan])
    # bf16 and fp16 values are tfloat32 values: their code is the fp32 pattern's top 19 bits
    y = torch.cat([fp16_patterns, bf16_patterns])
    y = y[~torch.isnan(y)]
    c = encode(y, "tfloat32")
    assert c.dtype == torch.int32
    assert torch.equal(c.to(torch.int64), (y.view(torch.int32).to(torch.int64) & 0xFFFFFFFF) >> 13)


@pytest.mark.parametrize("name", list(CANONICAL_NAN))
def test_canonical_nan_codes(name, backend):
    dtype = torch.float64 if name == "float64" else torch.float32
    ints = torch.tensor([0x7FC00000, -0x400000, 0x7F800001, 0x7FC12345], dtype=torch.int32)
    x = torch.cat([ints.view(torch.float32).to(dtype), torch.tensor([math.nan], dtype=dtype)])
    codes = _as_unsigned(encode(x, name), {"float64": 64, "float32": 32, "tfloat32": 19,
                                          "bfloat16": 16, "float16": 16, "e6m9": 16,
                                          "e11m4": 16}.get(name, 8))  # fmt: skip
    assert codes.tolist() == [CANONICAL_NAN[name]] * 5
    assert bool(decode(encode(x, name), name, dtype=dtype).isnan().all())


def test_overflow_nan_and_inf_codes(backend):
    x = torch.tensor([1e6, -1e6, math.inf])
    assert encode(x, "float8_e4m3fn").tolist() == [0x7F, 0x7F, 0x7F]
    assert encode(x, "float8_e4m3fn", saturate=True).tolist() == [0x7E, 0xFE, 0x7E]
    assert encode(x, "float8_e5m2").tolist() == [0x7C, 0xFC, 0x7C]  # ±inf
    assert encode(x, "float8_e5m2fnuz").tolist() == [0x80, 0x80, 0x80]
    assert encode(x, "float4_e2m1fn").tolist() == [0x7, 0xF, 0x7]  # always saturates
    assert encode(torch.tensor([-0.0, 0.0]), "float8_e4m3fnuz").tolist() == [0, 0]
    assert encode(torch.tensor([-0.0, -1.0]), "float8_e4m3fn").tolist() == [0x80, 0xB8]


@pytest.mark.parametrize("name", ["float4_e2m1fn", "float6_e3m2fn", "float6_e2m3fn", "e5m0"])
def test_encode_nan_without_nan_code_raises(name):
    with pytest.raises(ValueError, match="NaN"):
        encode(torch.tensor([1.0, math.nan]), name)


def test_code_dtypes():
    expected = {
        torch.uint8: ["float8_e4m3fn", "float8_e5m2", "float8_e8m0fnu", "float6_e3m2fn",
                      "float4_e2m1fn", "e3m1", "e4m3b11fnuz"],
        torch.int16: ["float16", "bfloat16", "e6m9"],
        torch.int32: ["float32", "tfloat32", "e8m20"],
        torch.int64: ["float64", "e11m40"],
    }  # fmt: skip
    for dtype, names in expected.items():
        for name in names:
            assert code_dtype(name) == dtype, name
            assert encode(torch.ones(3), name).dtype == dtype, name


# ----------------------------------------------------------------------------------------------
# round trips
# ----------------------------------------------------------------------------------------------

ROUND_TRIP = [*REFERENCE, "tfloat32", "e3m1", "e5m0", "e6m9", "e11m4", "e2m0"]


@pytest.mark.parametrize("name", ROUND_TRIP)
def test_round_trip_every_code(name, backend):
    """encode(decode(c)) == c for every code (NaN codes give the canonical NaN)."""
    n = {"tfloat32": 19, "e6m9": 16, "e11m4": 16, "e3m1": 5, "e5m0": 6, "e2m0": 3}.get(
        name, _nbits(name)
    )
    codes = torch.arange(1 << n, dtype=torch.int64)
    # e11m4's range is beyond float32's
    for dtype in (torch.float64,) if name == "e11m4" else (torch.float64, torch.float32):
        values = decode(codes, name, dtype=dtype)
        back = _as_unsigned(encode(values, name), n)
        nan = torch.isnan(values)
        assert torch.equal(back[~nan], codes[~nan]), (name, dtype)
        if nan.any():
            assert bool((back[nan] == CANONICAL_NAN.get(name, -1)).all()), name
        # and the decoded values are fixed points of quantize
        q = quantize(values, name)
        assert torch.equal(q[~nan], values[~nan]) and bool(q[nan].isnan().all())


def test_round_trip_wide(backend, random_fp32):
    x = random_fp32[: 1 << 16]
    nan = torch.isnan(x)
    for name, dtype in (("float32", torch.float32), ("float64", torch.float64)):
        c = encode(x.to(dtype), name)
        back = decode(c, name, dtype=dtype)
        assert torch.equal(back[~nan], x.to(dtype)[~nan]) and bool(back[nan].isnan().all())


def test_stochastic_encode_is_reproducible(backend):
    x = torch.linspace(-5, 5, 4097)
    a = encode(x, "e4m3", rounding="stochastic", generator=torch.Generator().manual_seed(8))
    b = encode(x, "e4m3", rounding="stochastic", generator=torch.Generator().manual_seed(8))
    q = quantize(x, "e4m3", rounding="stochastic", generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert torch.equal(decode(a, "e4m3"), q)


# ----------------------------------------------------------------------------------------------
# fp4 packing: two codes per byte, first element in the low nibble
# ----------------------------------------------------------------------------------------------

# float4_e2m1fn codes (OCP MX spec table): magnitude code -> value
FP4_VALUES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def test_pack_by_hand(backend):
    x = torch.tensor([[0.5, -6.0, 1.0, 3.0], [0.0, -0.0, 4.0, -1.5]])
    packed = encode(x, "float4_e2m1fn", pack=True)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 2)
    assert packed.tolist() == [[0xF1, 0x52], [0x80, 0xB6]]
    assert torch.equal(decode(packed, "float4_e2m1fn", packed=True), x)


def test_pack_all_codes_round_trip(backend):
    codes = torch.arange(16, dtype=torch.int64)
    values = torch.tensor(FP4_VALUES + [-v for v in FP4_VALUES])
    assert torch.equal(decode(codes, "float4_e2m1fn"), values)
    packed = encode(values.reshape(2, 8), "e2m1", pack=True)
    expected = [[lo | (lo + 1) << 4 for lo in range(0, 8, 2)],
                [lo | (lo + 1) << 4 for lo in range(8, 16, 2)]]  # fmt: skip
    assert packed.tolist() == expected
    unpacked = decode(packed, "e2m1", packed=True)
    assert unpacked.shape == (2, 8)
    assert torch.equal(unpacked.reshape(-1).view(torch.int32), values.view(torch.int32))
    # random shapes: the round trip is quantize
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 6, generator=g) * 4
    assert torch.equal(decode(encode(x, "fp4", pack=True), "fp4", packed=True),
                       quantize(x, "fp4"))  # fmt: skip


def test_pack_errors():
    with pytest.raises(ValueError, match="even"):
        encode(torch.ones(3, 5), "float4_e2m1fn", pack=True)
    with pytest.raises(ValueError):
        encode(torch.tensor(1.0), "float4_e2m1fn", pack=True)
    with pytest.raises(ValueError, match="4 bits"):
        encode(torch.ones(4), "float8_e4m3fn", pack=True)
    with pytest.raises(ValueError, match="4 bits"):
        decode(torch.ones(4, dtype=torch.uint8), "float8_e4m3fn", packed=True)


def test_decode_errors():
    with pytest.raises(TypeError):
        decode(torch.ones(3), "e4m3")
    with pytest.raises(TypeError):
        decode(torch.ones(3, dtype=torch.bool), "e4m3")
    with pytest.raises(TypeError):
        decode([1, 2], "e4m3")
    with pytest.raises(ValueError, match="unknown format 'nope'"):
        decode(torch.ones(3, dtype=torch.uint8), "nope")
    with pytest.raises(TypeError):
        encode(torch.ones(3, dtype=torch.int32), "e4m3")
