"""The C kernel's fast path (normal-range blocks) and general path must agree bit for bit.

The kernel rounds each block of elements with a cheap bit-pattern formula when every element is
a normal number whose result is normal, and redoes the block with the general algorithm
otherwise; planting one tiny value per block forces the general path for the rest of the block.
"""

from __future__ import annotations

import math

import pytest
import torch

from mixprec import quantize, quantize_
from mixprec.formats import get_format
from mixprec.quantization import has_c_kernel
from mixprec.quantization.params import ROUNDING_MODES, kernel_params

pytestmark = pytest.mark.skipif(not has_c_kernel(), reason="C kernel not built")

MODES = ["nearest", "stochastic", "toward_zero", "up", "down", "odd"]


@pytest.mark.parametrize("fmt", ["bfloat16", "float16", "float8_e4m3fn", "float8_e5m2", "e3m2"])
@pytest.mark.parametrize("rounding", MODES)
def test_fast_and_general_paths_agree(fmt: str, rounding: str) -> None:
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(8192, generator=g) + 0.5) * torch.randn(8192, generator=g).sign()
    forced = x.clone()
    forced[::61] = 1e-30  # every 64-element block gets an element the fast path rejects
    keep = torch.ones_like(x, dtype=torch.bool)
    keep[::61] = False
    a = quantize(x, fmt, rounding=rounding, generator=torch.Generator().manual_seed(7))
    b = quantize(forced, fmt, rounding=rounding, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a[keep].view(torch.int32), b[keep].view(torch.int32))


def test_threaded_split_matches_single_call() -> None:
    # > 256K elements are split over threads; the stochastic stream is indexed globally
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1 << 19, generator=g)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        whole = quantize(
            x, "bf16", rounding="stochastic", generator=torch.Generator().manual_seed(5)
        )
        torch.set_num_threads(1)
        single = quantize(
            x, "bf16", rounding="stochastic", generator=torch.Generator().manual_seed(5)
        )
    finally:
        torch.set_num_threads(before)
    assert torch.equal(whole, single)


def test_e8m0_params_same_grid_for_every_mode() -> None:
    """e8m0 rounds on its own grid (2^-127 .. 2^127) whatever the mode: nearest included."""
    f = get_format("float8_e8m0fnu")
    for width in (32, 64):
        params = {kernel_params(f, width, False, True, mode) for mode in ROUNDING_MODES}
        assert len(params) == 1
        (p,) = params
        assert p.emin == -127 and p.mantissa_bits == 0 and p.fast_lo == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rounding", [m for m in MODES if m != "stochastic"])
def test_e8m0_c_and_torch_kernels_agree(
    rounding: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both kernels give the same bits for e8m0 around 2^-127 (its bottom binade and below)."""
    g = torch.Generator().manual_seed(11)
    x = torch.ldexp(torch.rand(1 << 16, generator=g, dtype=torch.float64) + 0.5,
                    torch.randint(-135, -120, (1 << 16,), generator=g))  # fmt: skip
    x = torch.cat([x, -x[:64], torch.tensor([0.0, -0.0, 1.5 * 2.0**-127, 1.25 * 2.0**-127])])
    x = x.to(dtype)
    itype = torch.int32 if dtype == torch.float32 else torch.int64
    monkeypatch.delenv("MIXPREC_BACKEND", raising=False)
    c = quantize(x, "float8_e8m0fnu", rounding=rounding)
    monkeypatch.setenv("MIXPREC_BACKEND", "torch")
    t = quantize(x, "float8_e8m0fnu", rounding=rounding)
    assert torch.equal(c.view(itype), t.view(itype))


def _e8m0_bit_patterns(dtype: torch.dtype) -> torch.Tensor:
    """Random bit patterns (every sign, NaN payload, subnormal) plus e8m0's edges in ``dtype``."""
    g = torch.Generator().manual_seed(5)
    if dtype == torch.float32:
        rand = torch.randint(-(1 << 31), 1 << 31, (1 << 16,), generator=g).to(torch.int32)
        sub = torch.randint(0, 0x800000, (1 << 14,), generator=g, dtype=torch.int32)
        edges = [0, 1, 0x3FFFFF, 0x400000, 0x400001, 0x5FFFFF, 0x600000, 0x7FFFFF, 0x800000,
                 0xBFFFFF, 0xC00000, 0x7F000000, 0x7F3FFFFF, 0x7F400000, 0x7F7FFFFF, 0x7F800000,
                 0x7F800001, 0x7FC00000]  # fmt: skip
        bits = torch.cat([rand, sub, torch.tensor(edges, dtype=torch.int32)])
        return torch.cat([bits, bits | torch.tensor(-(1 << 31), dtype=torch.int32)]).view(dtype)
    rand = torch.randint(-(1 << 62), 1 << 62, (1 << 16,), generator=g) * 2
    near = _e8m0_bit_patterns(torch.float32).to(torch.float64)
    scaled = [near * (1 + 2.0**-40), near * 2.0**-100, near * 2.0**100]
    return torch.cat([rand.view(dtype), near, *scaled])


@pytest.mark.parametrize("saturate", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rounding", [m for m in MODES if m != "stochastic"])
def test_e8m0_fast_path_matches_torch_kernel_everywhere(
    rounding: str, dtype: torch.dtype, saturate: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The C kernel's e8m0 path (closed form on the bits, no fallback) over the whole range:
    specials, negatives, overflow, float32 subnormals; out of place and in place."""
    x = _e8m0_bit_patterns(dtype)
    itype = torch.int32 if dtype == torch.float32 else torch.int64
    monkeypatch.delenv("MIXPREC_BACKEND", raising=False)
    c = quantize(x, "float8_e8m0fnu", rounding=rounding, saturate=saturate)
    inplace = quantize_(x.clone(), "float8_e8m0fnu", rounding=rounding, saturate=saturate)
    monkeypatch.setenv("MIXPREC_BACKEND", "torch")
    t = quantize(x, "float8_e8m0fnu", rounding=rounding, saturate=saturate)
    assert torch.equal(c.view(itype), t.view(itype))
    assert torch.equal(inplace.view(itype), t.view(itype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("x0", [1.25, 1.25 * 2.0**-127, 1.75 * 2.0**100])
def test_e8m0_fast_path_stochastic_brackets_and_is_unbiased(x0: float, dtype: torch.dtype) -> None:
    """Stochastic e8m0 in the C kernel: each result is one of the two bracketing powers of two,
    up with probability (x - 2^e) / 2^e, including float32's subnormal bottom binade."""
    n = 1 << 18
    x = torch.full((n,), x0, dtype=torch.float64).to(dtype)
    g = torch.Generator().manual_seed(2)
    q = quantize(x, "float8_e8m0fnu", rounding="stochastic", generator=g)
    lo = 2.0 ** math.floor(math.log2(x0))
    up = (q.to(torch.float64) == 2 * lo).to(torch.float64)
    assert bool(((q.to(torch.float64) == lo) | (up == 1)).all())
    p = x0 / lo - 1
    assert abs(up.mean().item() - p) < 5 * math.sqrt(p * (1 - p) / n)
