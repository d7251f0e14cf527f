"""Every SIMD level of the C kernel gives the portable loops' bits, for every float32 pattern kind.

The levels this CPU runs are listed once, at import, before any test lowers the level (a list
taken after ``kernel_isa("portable")`` holds the baseline only). Inputs: every high half of a
float32 pattern (sign, exponent, top mantissa bits: zeros, subnormals, values below a format's
smallest subnormal, ties, overflow, inf, NaN) with a few low halves, in order (blocks of one
binade) and shuffled (blocks mixing values below 2^q with others, as the AVX2 stochastic loop's
block test sees them); then, per format, values of at least 1 with one input below 2^q (up to
2^q's predecessor) every 67 elements, so it sits in each vector of a 64-element block in turn,
often the block's only one. An odd count, so the scalar tails run too. Compared as int32.
"""

from __future__ import annotations

import pytest
import torch

from mixprec.formats import get_format
from mixprec.quantization import KERNEL_ISAS, elementwise, has_c_kernel, kernel_isa
from mixprec.quantization.params import ROUNDING_CODES, kernel_params

pytestmark = pytest.mark.skipif(not has_c_kernel(), reason="C kernel not built")

_BEST = kernel_isa()
_LEVELS = list(KERNEL_ISAS[: KERNEL_ISAS.index(_BEST) + 1]) if _BEST else []
_FORMATS = ["float6_e3m2fn", "float6_e2m3fn", "float4_e2m1fn", "float8_e8m0fnu", "bfloat16",
            "float8_e4m3fn", "float8_e5m2fnuz"]  # fmt: skip
_MODES = ["nearest", "stochastic", "toward_zero", "up", "down", "odd"]


@pytest.fixture(scope="module")
def patterns() -> torch.Tensor:
    high = torch.arange(1 << 16, dtype=torch.int32) << 16
    low = torch.tensor([0, 1, 0x7FFF, 0x8000, 0xFFFF], dtype=torch.int32)
    bits = (high[:, None] | low[None, :]).reshape(-1)
    shuffled = bits[torch.randperm(bits.numel(), generator=torch.Generator().manual_seed(5))]
    return torch.cat([bits, shuffled, bits[:7]]).view(torch.float32)


def _sparse_tiny(fmt: str) -> torch.Tensor:
    """Magnitudes >= 1 (never below 2^q) with an input below 2^q at every 67th place."""
    g = torch.Generator().manual_seed(9)
    n = 1 << 15
    big = torch.randint(0x3F800000, 0x7F800000, (n,), generator=g, dtype=torch.int64)
    f = get_format(fmt)
    q = torch.tensor(2.0 ** (f.emin - f.mantissa_bits)).view(torch.int32).to(torch.int64)
    k = torch.arange(13, n, 67)
    below = q - torch.randint(1, 1 << 20, (k.numel(),), generator=g).clamp(max=q)
    below[::3] = q - 1  # 2^q's predecessor, the largest input below it
    big[k] = below
    sign = torch.randint(0, 2, (n,), generator=g) << 31
    return (big | sign).to(torch.int32).view(torch.float32)


def _run(x: torch.Tensor, fmt: str, mode: str, saturate: bool, offset: int,
         inplace: bool) -> torch.Tensor:  # fmt: skip
    """One kernel call over all of x (no thread split), the result's bits."""
    p = kernel_params(get_format(fmt), 32, saturate, True, mode)
    out = x.clone() if inplace else torch.empty_like(x)
    src = out if inplace else x
    elementwise._kernels.quantize(
        32, src.data_ptr(), out.data_ptr(), x.numel(), ROUNDING_CODES[mode], p.mantissa_bits,
        p.emin, p.max_bits, p.ovf_bits, p.minnorm_bits, p.zero_bits, p.flags,
        0x2545F4914F6CDD1D, offset, p.fast_lo,
    )  # fmt: skip
    return out.view(torch.int32)


def test_levels_listed_before_lowering() -> None:
    assert _LEVELS[0] == "portable" and _LEVELS[-1] == _BEST


@pytest.mark.parametrize("fmt", _FORMATS)
@pytest.mark.parametrize("mode", _MODES)
def test_every_level_gives_the_portable_bits(fmt: str, mode: str, patterns: torch.Tensor) -> None:
    x = torch.cat([patterns, _sparse_tiny(fmt)])
    offsets = [0, (1 << 32) - 1000] if mode == "stochastic" else [0]  # the index's high word ticks
    try:
        for saturate in (False, True):
            for offset in offsets:
                kernel_isa("portable")
                ref = _run(x, fmt, mode, saturate, offset, False)
                for level in _LEVELS:
                    kernel_isa(level)
                    for inplace in (False, True):
                        got = _run(x, fmt, mode, saturate, offset, inplace)
                        bad = (got != ref).nonzero()
                        assert bad.numel() == 0, (
                            f"{level} inplace={inplace} saturate={saturate} offset={offset}: "
                            f"{bad.numel()} differ, first input "
                            f"{x.view(torch.int32)[bad[0, 0]].item() & 0xFFFFFFFF:#010x}"
                        )
    finally:
        kernel_isa(_BEST)
