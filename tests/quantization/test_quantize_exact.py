"""Bit-for-bit equality of ``mixprec.quantize`` with torch's and ml_dtypes' own conversions.

Round-to-nearest-even is what both libraries implement, so for every format they share with
mixprec the result must be identical bit for bit (compared as integers, NaN == NaN) over:
all 2^16 fp16 and all 2^16 bf16 bit patterns as fp32, ±0, ±inf, NaNs, fp32 subnormals, every
midpoint between neighbouring values of the target with its two fp32 neighbours, the edges of the
range (max, the overflow threshold, half the smallest subnormal, ...) and 2^22 random fp32 bit
patterns. Each case runs through both backends (C kernel and torch reference path).

Also here: float64, float16 and bfloat16 input tensors, fake_quantize, and argument errors.
"""

from __future__ import annotations

import math
import re
import warnings

import ml_dtypes
import numpy as np
import pytest
import torch

from mixprec.quantization import ROUNDING_MODES, fake_quantize, quantize, quantize_

# format -> (torch dtype, saturate setting that matches torch 2.13's fp32 -> dtype cast)
TORCH_NATIVE: dict[str, tuple[torch.dtype, bool]] = {
    "bfloat16": (torch.bfloat16, False),
    "float16": (torch.float16, False),
    "float8_e4m3fn": (torch.float8_e4m3fn, True),  # torch saturates finite overflow and inf
    "float8_e5m2": (torch.float8_e5m2, False),
    "float8_e4m3fnuz": (torch.float8_e4m3fnuz, False),
    "float8_e5m2fnuz": (torch.float8_e5m2fnuz, False),
    "float8_e8m0fnu": (torch.float8_e8m0fnu, False),
}

# format -> numpy scalar type; ml_dtypes' conversions never saturate (except fp6/fp4, which have
# neither inf nor NaN and always saturate, as mixprec does).
ML_TYPES: dict[str, type] = {
    "bfloat16": ml_dtypes.bfloat16,
    "float16": np.float16,
    "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
    "float8_e4m3fnuz": ml_dtypes.float8_e4m3fnuz,
    "float8_e5m2": ml_dtypes.float8_e5m2,
    "float8_e5m2fnuz": ml_dtypes.float8_e5m2fnuz,
    "float8_e4m3": ml_dtypes.float8_e4m3,
    "float8_e3m4": ml_dtypes.float8_e3m4,
    "float8_e4m3b11fnuz": ml_dtypes.float8_e4m3b11fnuz,
    "float8_e8m0fnu": ml_dtypes.float8_e8m0fnu,
    "float6_e3m2fn": ml_dtypes.float6_e3m2fn,
    "float6_e2m3fn": ml_dtypes.float6_e2m3fn,
    "float4_e2m1fn": ml_dtypes.float4_e2m1fn,
}

NO_NAN = {"float6_e3m2fn", "float6_e2m3fn", "float4_e2m1fn"}
RANDOM_N = {"c": 1 << 22, "torch": 1 << 20}  # the torch path is ~10x slower on CPU


def _mantissa_bits(name: str) -> int:
    return {"bfloat16": 7, "float16": 10}.get(name) or int(re.search(r"m(\d+)", name).group(1))


def _grid(name: str) -> np.ndarray:
    """Sorted non-negative finite values of a format, decoded by the reference library."""
    t = ML_TYPES[name]
    nbits = 16 if name in ("bfloat16", "float16") else 8
    codes = np.arange(1 << nbits, dtype=np.uint16 if nbits == 16 else np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vals = codes.view(t).astype(np.float64)
    vals = vals[np.isfinite(vals) & (vals >= 0)]
    return np.unique(vals)  # fp6/fp4 codes sit in a uint8 container: duplicates are removed


def _edges(name: str) -> np.ndarray:
    """fp32 test points: every value, every midpoint, the overflow threshold, +-1 fp32 ulp."""
    v = _grid(name)
    vmax = v[-1]
    ulp_max = math.ldexp(1.0, math.frexp(vmax)[1] - 1 - _mantissa_bits(name))
    beyond = vmax + ulp_max  # the next value the format would have with one more exponent
    v = np.append(v, beyond)
    mids = (v[:-1] + v[1:]) / 2
    extra = np.array([2 * beyond, vmax + ulp_max / 4, 3 * ulp_max, v[1] / 4, v[1] / 2])
    pts = np.concatenate([v, mids, extra])
    pts = pts[pts < 2.0**128]  # e8m0's 2^128 is beyond float32
    p32 = pts.astype(np.float32)
    # the construction itself must be exact, or the points are not the edges they claim to be
    assert np.array_equal(p32.astype(np.float64), pts)
    inf = np.float32(np.inf)
    p32 = np.concatenate([p32, np.nextafter(p32, inf), np.nextafter(p32, -inf)])
    return np.concatenate([p32, -p32])


def _inputs(name: str, backend: str, fp16p, bf16p, specials, random_fp32) -> torch.Tensor:
    return torch.cat(
        [
            fp16p,
            bf16p,
            specials,
            torch.from_numpy(_edges(name)),
            random_fp32[: RANDOM_N[backend]],
        ]
    )


def _ml_convert(x: np.ndarray, name: str, out_dtype: type = np.float32) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # overflow / invalid-value warnings from casts
        return x.astype(ML_TYPES[name]).astype(out_dtype)


def _e8m0_bottom(x: torch.Tensor) -> torch.Tensor:
    """Inputs with 0 < |x| < 2^-126, where e8m0 rounding differs between library versions.

    mixprec rounds them on e8m0's own grid (1.25 * 2^-127 -> 2^-127, 1.5 * 2^-127 -> 2^-126);
    torch 2.13 and ml_dtypes < 0.7 take all of (2^-127, 2^-126) up to 2^-126, ml_dtypes 0.7
    agrees with mixprec. pyproject allows all of them, so no test here compares these inputs
    with a third-party library: test_quantize_oracle.py checks them against its own oracles
    (test_e8m0_every_fp32_subnormal, test_e8m0_bottom_binade_examples, the grid-oracle sweeps).
    """
    a = x.abs()
    return (a > 0) & (a < 2.0**-126)


def _ml_mask(x: torch.Tensor, name: str) -> torch.Tensor:
    """Inputs where ml_dtypes' documented behaviour differs from docs/design.md on purpose."""
    keep = torch.ones_like(x, dtype=torch.bool)
    if name in NO_NAN:
        # ml_dtypes turns NaN into (-)0 for fp6/fp4; mixprec keeps NaN in the container
        keep &= ~torch.isnan(x)
    if name == "float8_e8m0fnu":
        # ml_dtypes gives NaN for ±0; mixprec (like torch) gives the smallest value 2^-127
        keep &= x != 0
        keep &= ~_e8m0_bottom(x)  # version-dependent in ml_dtypes (see _e8m0_bottom)
    return keep


# ----------------------------------------------------------------------------------------------
# float32 inputs against torch and ml_dtypes
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(TORCH_NATIVE))
def test_fp32_matches_torch_cast(
    name, backend, same_bits, fp16_patterns, bf16_patterns, specials, random_fp32
):
    dtype, saturate = TORCH_NATIVE[name]
    x = _inputs(name, backend, fp16_patterns, bf16_patterns, specials, random_fp32)
    if name == "float8_e8m0fnu":
        # torch maps a negative input to the e8m0 of its magnitude; docs/design.md (and ml_dtypes)
        # say NaN. Negative inputs are checked against ml_dtypes and the oracle instead; inputs
        # in (0, 2^-126), which torch 2.13 rounds up to 2^-126, against the oracle only.
        x = x[~(x < 0) & ~_e8m0_bottom(x)]
    expected = x.to(dtype).float()
    same_bits(quantize(x, name, saturate=saturate), expected, x, f"{name} vs torch")


@pytest.mark.parametrize("name", list(ML_TYPES))
def test_fp32_matches_ml_dtypes(
    name, backend, same_bits, fp16_patterns, bf16_patterns, specials, random_fp32
):
    x = _inputs(name, backend, fp16_patterns, bf16_patterns, specials, random_fp32)
    x = x[_ml_mask(x, name)]
    expected = torch.from_numpy(_ml_convert(x.numpy(), name))
    same_bits(quantize(x, name), expected, x, f"{name} vs ml_dtypes")


def test_torch_e4m3fn_cast_saturates():
    """Documents the premise of the saturate=True comparison above (torch 2.13 behaviour)."""
    x = torch.tensor([1e6, -math.inf, 464.0, 465.0])
    assert x.to(torch.float8_e4m3fn).float().tolist() == [448.0, -448.0, 448.0, 448.0]
    # and mixprec's non-saturating mode gives NaN where ml_dtypes does (464 is a tie to 448)
    q = quantize(x, "float8_e4m3fn")
    assert q[0].isnan() and q[1].isnan() and q[2] == 448.0 and q[3].isnan()


def test_e8m0_negative_inputs_are_nan(backend):
    x = torch.tensor([-1.0, -(2.0**-130), -math.inf, -3e38, -0.0, 0.0])
    q = quantize(x, "float8_e8m0fnu")
    assert torch.isnan(q[:4]).all()
    assert q[4:].tolist() == [2.0**-127, 2.0**-127]  # ±0: no zero in e8m0, smallest value


# ----------------------------------------------------------------------------------------------
# float64 inputs
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ML_TYPES))
def test_fp64_matches_ml_dtypes(
    name, backend, same_bits, fp16_patterns, bf16_patterns, specials, random_fp32
):
    """float64 inputs that are exactly float32 values, against ml_dtypes from float64.

    ml_dtypes converts float64 through float32 (double rounding: 1 + 2^-4 + 2^-40 becomes 1.0 in
    e4m3fn, not 1.125), so only float32-exact float64 inputs can be compared with it; inputs that
    need all 53 bits are checked against the exact oracle in test_quantize_oracle.py.
    """
    x32 = torch.cat(
        [
            fp16_patterns,
            bf16_patterns,
            specials,
            torch.from_numpy(_edges(name)),
            random_fp32[:65536],
        ]
    )
    x = x32.double()
    x = x[_ml_mask(x, name)]
    expected = torch.from_numpy(_ml_convert(x.numpy(), name, np.float64))
    same_bits(quantize(x, name), expected, x, f"{name} (float64) vs ml_dtypes")


def test_fp64_big_and_tiny(backend, same_bits):
    """float64 values far outside float32's range round like any other overflow / underflow."""
    x = torch.tensor(
        [1e300, -1e300, 1e-300, -1e-300, 2.0**-1074, 2.0**1023, 3.4e38, 2.0**-149, 2.0**-150],
        dtype=torch.float64,
    )
    expected = torch.tensor(
        [math.inf, -math.inf, 0.0, -0.0, 0.0, math.inf, math.inf, 0.0, 0.0], dtype=torch.float64
    )
    same_bits(quantize(x, "float16"), expected, x, "float16 from float64")
    # float32 as a target from float64 equals torch's own (correctly rounded) narrowing
    g = torch.Generator().manual_seed(5)
    n = 1 << 16
    mant = torch.randint(0, 1 << 52, (n,), generator=g, dtype=torch.int64)
    expo = torch.randint(1023 - 160, 1023 + 140, (n,), generator=g, dtype=torch.int64)
    r = ((expo << 52) | mant).view(torch.float64)
    r = torch.cat([r, -r, x])
    same_bits(quantize(r, "float32"), r.float().double(), r, "float32 from float64")


# ----------------------------------------------------------------------------------------------
# float16 / bfloat16 input tensors: result dtype is the input dtype
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("in_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", list(ML_TYPES))
def test_half_inputs(name, in_dtype, backend, same_bits):
    x = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(in_dtype)
    q = quantize(x, name)
    assert q.dtype == in_dtype and q.shape == x.shape
    if name in TORCH_NATIVE:
        dtype, saturate = TORCH_NATIVE[name]
        sel = torch.ones_like(x, dtype=torch.bool)
        if name == "float8_e8m0fnu":  # as in test_fp32_matches_torch_cast
            sel = ~(x < 0) & ~_e8m0_bottom(x.float())
        expected = x[sel].to(dtype).to(in_dtype)
        same_bits(quantize(x[sel], name, saturate=saturate), expected, x[sel], name)
    keep = _ml_mask(x.float(), name)
    expected = torch.from_numpy(_ml_convert(x[keep].float().numpy(), name)).to(in_dtype)
    same_bits(q[keep], expected, x[keep], f"{name} ({in_dtype}) vs ml_dtypes")


# ----------------------------------------------------------------------------------------------
# shapes, strides, out=, in-place
# ----------------------------------------------------------------------------------------------


def test_shapes_and_strides(backend, same_bits):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(6, 7, 5, generator=g) * 300
    ref = base.to(torch.float8_e5m2).float()
    for x in (base, base.transpose(0, 2), base[:, ::2, 1:], base[..., 0], base.reshape(-1)[:0]):
        q = quantize(x, "float8_e5m2")
        assert q.shape == x.shape and q.dtype == x.dtype
        same_bits(q, x.to(torch.float8_e5m2).float(), x, "strided")
    scalar = torch.tensor(1.0 + 2.0**-3)
    assert quantize(scalar, "float8_e5m2").item() == 1.0  # tie to even, 0-dim tensor
    same_bits(quantize(base, "e5m2"), ref, base, "alias")


def _layout(t: torch.Tensor) -> tuple[int, ...]:
    """The strides that matter: those of dimensions longer than one."""
    return tuple(st for st, n in zip(t.stride(), t.shape, strict=True) if n != 1)


@pytest.mark.parametrize("threads", [1, 2])
def test_a_permuted_input_keeps_its_layout(backend, same_bits, threads):
    """A permutation of a contiguous layout (a transpose, attention heads split by a view and a
    transpose) comes back in its own layout, as torch's casts give it, on both backends and
    with the kernel's threads; stochastic rounding draws in logical order, so its bits do not
    depend on the layout; other strided inputs come back contiguous."""
    g = torch.Generator().manual_seed(5)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        big = torch.randn(600, 700, generator=g) * 100  # past the kernel's threading threshold
        heads = torch.randn(2, 17, 4, 64, generator=g).transpose(1, 2)
        for x in (big.t(), heads, heads.transpose(-2, -1), big[:, None].permute(2, 1, 0)):
            for mode in ("nearest", "toward_zero", "up", "odd"):
                q = quantize(x, "float8_e5m2", rounding=mode)
                assert _layout(q) == _layout(x), (backend, mode)
                same_bits(q, quantize(x.contiguous(), "float8_e5m2", rounding=mode), x, mode)
            want = x.to(torch.bfloat16)
            q = quantize(x, "bf16")
            assert _layout(q) == _layout(want) == _layout(x)
            same_bits(q, want.float(), x, "bf16 cast")
            s1 = quantize(
                x, "e4m3", rounding="stochastic", generator=torch.Generator().manual_seed(1)
            )
            s2 = quantize(
                x.contiguous(),
                "e4m3",
                rounding="stochastic",
                generator=torch.Generator().manual_seed(1),
            )
            same_bits(s1, s2, x, "stochastic")
        stepped = big[:, ::2]
        assert quantize(stepped, "bf16").is_contiguous()
    finally:
        torch.set_num_threads(before)


def test_out_and_inplace(backend, same_bits):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1000, generator=g, dtype=torch.float64) * 1000
    expected = x.float().to(torch.float8_e4m3fn).double()  # |x| < 448 * 10: saturate
    out = torch.empty_like(x)
    r = quantize(x, "float8_e4m3fn", saturate=True, out=out)
    assert r is out
    same_bits(out, expected, x, "out=")
    # non-contiguous out
    big = torch.zeros(2000, dtype=torch.float64)
    r = quantize(x, "float8_e4m3fn", saturate=True, out=big[::2])
    same_bits(big[::2], expected, x, "strided out=")
    assert (big[1::2] == 0).all()
    # half input with out=
    xh = x.to(torch.bfloat16)
    outh = torch.empty_like(xh)
    quantize(xh, "float8_e4m3fn", saturate=True, out=outh)
    same_bits(outh, xh.to(torch.float8_e4m3fn).to(torch.bfloat16), xh, "bf16 out=")
    # in place, contiguous and strided
    y = x.clone()
    assert quantize_(y, "float8_e4m3fn", saturate=True) is y
    same_bits(y, expected, x, "quantize_")
    z = torch.stack([x, x], 1)
    quantize_(z[:, 1], "float8_e4m3fn", saturate=True)
    same_bits(z[:, 1].contiguous(), expected, x, "strided quantize_")
    same_bits(z[:, 0].contiguous(), x, x, "neighbouring column untouched")


# ----------------------------------------------------------------------------------------------
# fake_quantize
# ----------------------------------------------------------------------------------------------


def test_fake_quantize_forward_and_straight_through(backend, same_bits):
    g = torch.Generator().manual_seed(6)
    x = (torch.randn(257, generator=g) * 100).requires_grad_()
    y = fake_quantize(x, "float8_e4m3fn", saturate=True)
    same_bits(y.detach(), x.detach().to(torch.float8_e4m3fn).float(), x.detach(), "forward")
    w = torch.randn(257, generator=g)
    (y * w).sum().backward()
    same_bits(x.grad, w, w, "straight-through gradient")


@pytest.mark.parametrize(
    ("grad_format", "upstream", "expected"),
    [
        # fp16: min subnormal 2^-24; 2^-25 is a tie (to even: 0), 3 * 2^-26 rounds up to 2^-24
        ("float16", [2.0**-30, 2.0**-25, 3 * 2.0**-26, 1 + 2.0**-12, 1e5],
         [0, 0, 2.0**-24, 1, math.inf]),
        # e5m2: min subnormal 2^-16, 3 bits of precision
        ("float8_e5m2", [2.0**-18, 1e-9, 2.0**-16, 1.2, -7.5], [0, 0, 2.0**-16, 1.25, -8.0]),
    ],
)  # fmt: skip
def test_fake_quantize_grad_format(grad_format, upstream, expected, backend):
    x = torch.ones(len(upstream), requires_grad=True)
    y = fake_quantize(x, "bfloat16", grad_format=grad_format)
    y.backward(torch.tensor(upstream))
    assert x.grad.tolist() == expected
    assert math.copysign(1.0, x.grad[0].item()) == 1.0


def test_fake_quantize_grad_rounding(backend):
    x = torch.ones(2, requires_grad=True)
    fake_quantize(x, "float16", grad_format="float16", grad_rounding="up").backward(
        torch.tensor([2.0**-30, -(2.0**-30)])
    )
    assert x.grad.tolist() == [2.0**-24, 0.0]


def test_fake_quantize_gradient_rounding_is_straight_through_in_the_next_order(backend):
    # L = sum(g * x) with g = dL1/dx built under create_graph: g = round(2y), y = fq(x).
    # dL/dx = g + x * dg/dx, and the rounding of g is straight-through in that order, the
    # gradient reaching it rounded alike: g + 2 round(x). A plain rounding would cut that
    # path (derivative zero): g alone.
    x = torch.tensor([0.3, -1.7, 2.5], requires_grad=True)
    y = fake_quantize(x, "bfloat16", grad_format="bfloat16")
    (g,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)
    assert torch.equal(g, (2 * y).detach().bfloat16().float())
    (h,) = torch.autograd.grad((g * x).sum(), x)
    want = g.detach() + 2 * x.detach().bfloat16().float()
    assert torch.equal(h, want)
    # quantize's rounding has derivative zero in every order
    q = quantize(x, "bfloat16")
    (gq,) = torch.autograd.grad((q * x).sum(), x, create_graph=True)
    (hq,) = torch.autograd.grad((gq * x).sum(), x)
    assert torch.equal(hq, gq.detach())


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "x", [torch.arange(4), torch.ones(3, dtype=torch.bool), torch.ones(2, dtype=torch.int8),
          torch.ones(2, dtype=torch.complex64), [1.0, 2.0], 1.5],
)  # fmt: skip
def test_non_float_inputs_raise_type_error(x):
    with pytest.raises(TypeError):
        quantize(x, "bf16")
    with pytest.raises(TypeError):
        fake_quantize(x, "bf16")


def test_unknown_format_suggests_choices():
    with pytest.raises(ValueError, match=r"did you mean 'float'\?") as info:
        quantize(torch.ones(2), "float7")
    assert str(info.value).startswith("unknown format 'float7'")
    assert "mixprec formats" in str(info.value)


def test_unknown_rounding_lists_choices():
    for fn in (quantize, fake_quantize):
        with pytest.raises(ValueError) as info:
            fn(torch.ones(2), "bf16", rounding="nearest_even")
        message = str(info.value)
        assert "nearest_even" in message
        assert all(mode in message for mode in ROUNDING_MODES)
    assert set(ROUNDING_MODES) == {"nearest", "stochastic", "toward_zero", "up", "down", "odd"}
    with pytest.raises(ValueError, match="sideways"):
        fake_quantize(torch.ones(2), "bf16", grad_format="fp16", grad_rounding="sideways")


@pytest.mark.parametrize(
    "out",
    [torch.empty(4, dtype=torch.float64), torch.empty(5), torch.empty(2, 2),
     torch.empty(4, dtype=torch.float16)],
)  # fmt: skip
def test_bad_out_raises_value_error(out):
    with pytest.raises(ValueError, match="out"):
        quantize(torch.ones(4), "bf16", out=out)


def test_int_out_raises_type_error():
    with pytest.raises(TypeError):
        quantize(torch.ones(4), "bf16", out=torch.empty(4, dtype=torch.int32))
