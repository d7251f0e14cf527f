"""The C kernel's fast paths must agree bit for bit with its general algorithm.

float32 formats with 1 <= M <= 22 round on the bit pattern itself, every input included
(overflow, inf/NaN, inputs below the target's smallest subnormal); every loop has AVX-512
(x86-64-v4), AVX2 (x86-64-v3) and baseline versions, chosen from the CPU at import (stochastic
rounding with intrinsics of its own); e8m0 has a closed form of its own. Each is compared with
the general algorithm (fast_lo = 0), the baseline version or the torch kernel.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from mixprec import quantize, quantize_
from mixprec.formats import get_format
from mixprec.quantization import KERNEL_ISAS, elementwise, has_c_kernel, kernel_isa
from mixprec.quantization.params import ROUNDING_CODES, ROUNDING_MODES, KernelParams, kernel_params

pytestmark = pytest.mark.skipif(not has_c_kernel(), reason="C kernel not built")
_kernels = elementwise._kernels

MODES = ["nearest", "stochastic", "toward_zero", "up", "down", "odd"]


@pytest.mark.parametrize("fmt", ["bfloat16", "float16", "float8_e4m3fn", "float8_e5m2", "e3m2"])
@pytest.mark.parametrize("rounding", MODES)
def test_fast_and_general_paths_agree(fmt: str, rounding: str) -> None:
    """Inputs below the target's smallest subnormal (their own formula inside the vector loop;
    once a per-block fallback) leave their neighbours' results and random draws unchanged."""
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(8192, generator=g) + 0.5) * torch.randn(8192, generator=g).sign()
    forced = x.clone()
    forced[::61] = 1e-30  # in every vector and every 64-element block
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
    rounding: str, dtype: torch.dtype, set_backend: Callable[[str], str]
) -> None:
    """Both kernels give the same bits for e8m0 around 2^-127 (its bottom binade and below)."""
    g = torch.Generator().manual_seed(11)
    x = torch.ldexp(torch.rand(1 << 16, generator=g, dtype=torch.float64) + 0.5,
                    torch.randint(-135, -120, (1 << 16,), generator=g))  # fmt: skip
    x = torch.cat([x, -x[:64], torch.tensor([0.0, -0.0, 1.5 * 2.0**-127, 1.25 * 2.0**-127])])
    x = x.to(dtype)
    itype = torch.int32 if dtype == torch.float32 else torch.int64
    set_backend("auto")
    c = quantize(x, "float8_e8m0fnu", rounding=rounding)
    set_backend("torch")
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
    rounding: str, dtype: torch.dtype, saturate: bool, set_backend: Callable[[str], str]
) -> None:
    """The C kernel's e8m0 path (closed form on the bits, no fallback) over the whole range:
    specials, negatives, overflow, float32 subnormals; out of place and in place."""
    x = _e8m0_bit_patterns(dtype)
    itype = torch.int32 if dtype == torch.float32 else torch.int64
    set_backend("auto")
    c = quantize(x, "float8_e8m0fnu", rounding=rounding, saturate=saturate)
    inplace = quantize_(x.clone(), "float8_e8m0fnu", rounding=rounding, saturate=saturate)
    set_backend("torch")
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


# ---------------------------------------------------------------------------------------------
# the float32 fast path (bit-pattern rounding, every input) against the general algorithm
# ---------------------------------------------------------------------------------------------

_FAST_FORMATS = ["bfloat16", "float16", "tfloat32", "float8_e4m3fn", "float8_e4m3fnuz",
                 "float8_e5m2", "float8_e5m2fnuz", "float8_e4m3", "float8_e3m4",
                 "float8_e4m3b11fnuz", "float6_e3m2fn", "float6_e2m3fn", "float4_e2m1fn",
                 "e8m22", "e2m22"]  # fmt: skip


def _fp32_patterns() -> torch.Tensor:
    """Every kind of float32 input: random patterns (NaN payloads and inf included), values
    with few significant bits (ties, exact grid points) at every exponent, subnormals, edges;
    an odd count, so the vector loops' scalar tails run too."""
    g = torch.Generator().manual_seed(21)
    n = 1 << 17
    rand = torch.randint(-(1 << 31), 1 << 31, (n,), generator=g).to(torch.int32)
    exp = torch.randint(0, 256, (n,), generator=g, dtype=torch.int32) << 23
    mant = torch.randint(0, 1 << 23, (n,), generator=g, dtype=torch.int32)
    low = torch.randint(0, 23, (n,), generator=g, dtype=torch.int32)
    coarse = exp | (mant & ~((1 << low) - 1))  # few significant bits: ties and grid points
    sub = torch.randint(0, 1 << 23, (1 << 12,), generator=g, dtype=torch.int32)
    edges = torch.tensor([0, 1, 0x7FFFFF, 0x800000, 0x7F7FFFFF, 0x7F800000, 0x7F800001,
                          0x7FC00000, 0x7FFFFFFF], dtype=torch.int32)  # fmt: skip
    bits = torch.cat([rand, coarse, sub, edges, torch.tensor([7], dtype=torch.int32)])
    return torch.cat([bits, bits | torch.tensor(-(1 << 31), dtype=torch.int32)]).view(torch.float32)


def _raw(x: torch.Tensor, p: KernelParams, mode: str, fast_lo: int, offset: int,
         inplace: bool) -> torch.Tensor:  # fmt: skip
    """One call of the C kernel (no thread split): fast_lo = 0 forces the general path."""
    out = x.clone() if inplace else torch.empty_like(x)
    src = out if inplace else x
    _kernels.quantize(
        p.width, src.data_ptr(), out.data_ptr(), x.numel(), ROUNDING_CODES[mode],
        p.mantissa_bits, p.emin, p.max_bits, p.ovf_bits, p.minnorm_bits, p.zero_bits, p.flags,
        0x2545F4914F6CDD1D, offset, fast_lo,
    )  # fmt: skip
    return out.view(torch.int32 if p.width == 32 else torch.int64)


@pytest.fixture(scope="module")
def patterns() -> torch.Tensor:
    return _fp32_patterns()


# the level in use at import: the best this CPU runs (no test has lowered it yet)
_BEST = kernel_isa()


def _simd_levels() -> list[str]:
    """Every level this CPU runs, baseline first. From the level read at import: kernel_isa()
    names the level in use, only the baseline once a test has called kernel_isa("portable")
    (which once made these tests compare the baseline with itself)."""
    return list(KERNEL_ISAS[: KERNEL_ISAS.index(_BEST) + 1]) if _BEST else []


@pytest.mark.parametrize("fmt", _FAST_FORMATS)
@pytest.mark.parametrize("rounding", MODES)
def test_fast_path_matches_general_path_bit_for_bit(
    fmt: str, rounding: str, patterns: torch.Tensor
) -> None:
    """The fast path (no fallback since it handles overflow, inf/NaN and inputs below the
    target's smallest subnormal itself) gives the general algorithm's bits for every input,
    every option, out of place and in place; stochastic rounding draws the same random bits,
    with every SIMD version this CPU has (AVX-512, AVX2, baseline), also where the index's
    high word ticks."""
    f = get_format(fmt)
    best = kernel_isa()
    try:
        for saturate, subnormals in [(False, True), (True, True), (False, False)]:
            p = kernel_params(f, 32, saturate, subnormals, rounding)
            assert p.fast_lo != 0
            for offset in [0, (1 << 32) - 1000] if rounding == "stochastic" else [0]:
                kernel_isa("portable")
                ref = _raw(patterns, p, rounding, 0, offset, False)
                for level in _simd_levels():
                    kernel_isa(level)
                    for inplace in (False, True):
                        got = _raw(patterns, p, rounding, p.fast_lo, offset, inplace)
                        assert torch.equal(got, ref), (saturate, subnormals, offset, level)
    finally:
        kernel_isa(best)


@pytest.mark.parametrize("rounding", MODES)
@pytest.mark.parametrize("width", [32, 64])
def test_every_simd_level_gives_the_baseline_bits(
    width: int, rounding: str, patterns: torch.Tensor
) -> None:
    """Every loop is built for x86-64-v4, x86-64-v3 and the baseline, one picked at import:
    each level this CPU runs gives the baseline's bits for the general algorithm (fast_lo = 0),
    e8m0's closed form and, for float32, the fast path; both widths, out of place and in
    place. (On an AVX-512 machine this tests the AVX2 code too.)"""
    x = patterns if width == 32 else _e8m0_bit_patterns(torch.float64)
    cases = [(fmt, fast) for fmt in ("bfloat16", "float8_e5m2", "float4_e2m1fn")
             for fast in ((False, True) if width == 32 else (False,))]  # fmt: skip
    cases.append(("float8_e8m0fnu", False))
    best = kernel_isa()
    try:
        for fmt, fast in cases:
            p = kernel_params(get_format(fmt), width, False, True, rounding)
            lo = p.fast_lo if fast else 0
            kernel_isa("portable")
            ref = _raw(x, p, rounding, lo, 7, False)
            for level in _simd_levels()[1:]:
                kernel_isa(level)
                for inplace in (False, True):
                    got = _raw(x, p, rounding, lo, 7, inplace)
                    assert torch.equal(got, ref), (fmt, fast, level, inplace)
    finally:
        kernel_isa(best)


def _normal_range_patterns(p: KernelParams) -> torch.Tensor:
    """float32 values between the target's smallest normal and its max (both included): random
    patterns and few-significant-bit ones (ties, grid points), both signs; then the same with an
    out-of-range value (tiny, zero, above max, inf, NaN) in every 61st place; an odd count."""
    g = torch.Generator().manual_seed(3)
    lo, hi, n = p.fast_lo, p.max_bits, 1 << 15
    rand = torch.randint(lo, hi + 1, (n,), generator=g, dtype=torch.int64)
    low = torch.randint(0, 23, (n,), generator=g)
    coarse = (rand & ~((1 << low) - 1)) | ((1 << low) >> 1)  # the bit below the kept ones: ties
    bits = torch.cat([rand, coarse.clamp(lo, hi), torch.tensor([lo, hi, lo + 1, hi - 1])])
    sign = torch.randint(0, 2, bits.shape, generator=g) << 31
    inside = (bits | sign).to(torch.int32)
    odd = torch.tensor([1, lo - 1, 0, hi + 1, 0x7F800000, 0x7FC00001], dtype=torch.int32)
    mixed = inside.clone()
    mixed[::61] = odd[torch.arange(mixed[::61].numel()) % odd.numel()]
    return torch.cat([inside, mixed, inside[:5]]).view(torch.float32)


@pytest.mark.parametrize("fmt", _FAST_FORMATS)
def test_nearest_blocks_of_target_normals_match_the_general_path(fmt: str) -> None:
    """Round to nearest takes a short path for 64-element blocks of target normals (formats
    whose normal range is wide): such blocks, blocks with one element outside, and the tail give
    the general algorithm's bits at every SIMD level, out of place and in place."""
    best = kernel_isa()
    try:
        for saturate, subnormals in [(False, True), (True, True), (False, False)]:
            p = kernel_params(get_format(fmt), 32, saturate, subnormals, "nearest")
            x = _normal_range_patterns(p)
            kernel_isa("portable")
            ref = _raw(x, p, "nearest", 0, 0, False)
            for level in _simd_levels():
                kernel_isa(level)
                for inplace in (False, True):
                    got = _raw(x, p, "nearest", p.fast_lo, 0, inplace)
                    assert torch.equal(got, ref), (saturate, subnormals, level, inplace)
    finally:
        kernel_isa(best)


def test_kernel_isa_selects_levels_and_refuses_bad_ones() -> None:
    best = kernel_isa()
    assert best in KERNEL_ISAS
    try:
        assert kernel_isa("portable") == "portable" == kernel_isa()
    finally:
        assert kernel_isa(best) == best
    with pytest.raises(ValueError, match=r"unknown isa 'sse9'; valid: 'portable', 'avx2'"):
        kernel_isa("sse9")
    with pytest.raises(TypeError, match="isa must be a string or None, got int"):
        kernel_isa(2)  # type: ignore[arg-type]
    above = KERNEL_ISAS[KERNEL_ISAS.index(best) + 1 :]
    for level in above:  # levels this CPU lacks (none on an AVX-512 machine)
        with pytest.raises(ValueError, match="not available on this CPU"):
            kernel_isa(level)
    assert kernel_isa() == best


def test_kernel_isa_without_the_c_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(elementwise, "_kernels", None)
    assert kernel_isa() is None
    with pytest.raises(ValueError, match="the C kernel is not built"):
        kernel_isa("avx2")


@pytest.mark.parametrize("saturate", [False, True])
def test_e8m0_stochastic_same_bits_at_every_simd_level(saturate: bool) -> None:
    """e8m0's stochastic loop (AVX-512 / AVX2 intrinsics, portable C) gives the same bits and
    random draws whatever the instruction set, also where the index's high word ticks."""
    x = _e8m0_bit_patterns(torch.float32)
    p = kernel_params(get_format("float8_e8m0fnu"), 32, saturate, True, "stochastic")
    best = kernel_isa()
    try:
        for offset in [0, (1 << 32) - 1000]:
            kernel_isa("portable")
            ref = _raw(x, p, "stochastic", 0, offset, False)
            for level in _simd_levels():
                kernel_isa(level)
                for inplace in (False, True):
                    got = _raw(x, p, "stochastic", 0, offset, inplace)
                    assert torch.equal(got, ref), (offset, level, inplace)
    finally:
        kernel_isa(best)


def _below_normal_patterns(f: str) -> torch.Tensor:
    """float32 values where round to nearest works on the target's subnormal grid: every
    multiple of half its smallest subnormal 2^q below its smallest normal (grid points and
    ties), their float32 neighbours, random patterns in that range and float32 subnormals, both
    signs, in 64-element blocks with and without normals among them."""
    fmt = get_format(f)
    q = fmt.emin - fmt.mantissa_bits
    k = torch.arange(0, 1 << (fmt.mantissa_bits + 2), dtype=torch.float64)
    grid = (k * 2.0 ** (q - 1)).float()
    bits = grid.view(torch.int32)
    near = torch.cat([bits, bits + 1, (bits - 1).clamp_min(0)])
    g = torch.Generator().manual_seed(5)
    top = int(torch.tensor(2.0**fmt.emin).view(torch.int32))
    rand = torch.randint(0, top, (1 << 14,), generator=g, dtype=torch.int64).to(torch.int32)
    sub = torch.randint(0, 1 << 23, (256,), generator=g, dtype=torch.int32)
    pats = torch.cat([near, rand, sub])
    pats = torch.cat([pats, pats | torch.tensor(-(1 << 31), dtype=torch.int32)])
    normals = torch.full((128,), float(2.0**fmt.emin)).view(torch.int32)  # a block of normals
    return torch.cat([normals, pats, normals, pats[:77]]).view(torch.float32)


@pytest.mark.parametrize("fmt", ["float8_e4m3fn", "float8_e5m2", "float8_e3m4", "float16",
                                 "float6_e3m2fn", "float6_e2m3fn", "float4_e2m1fn",
                                 "float8_e4m3fnuz", "bfloat16"])  # fmt: skip
@pytest.mark.parametrize("flush_denormal", [False, True])
def test_nearest_below_the_smallest_normal_matches_the_general_path(
    fmt: str, flush_denormal: bool
) -> None:
    """Round to nearest rounds values below the target's smallest normal by a float sum on the
    subnormal grid (formats with subnormals and -0 whose half-subnormal is a float32 normal):
    every grid point and tie there, its neighbours and random values give the general
    algorithm's bits at every SIMD level, also with the CPU flushing float32 subnormals
    (``torch.set_flush_denormal``), which the float sum must not notice. (fnuz formats, without
    -0, and bf16, whose subnormal grid is float32's own, keep the integer path: the same bits.)"""
    if flush_denormal and not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush float32 subnormals")
    torch.set_flush_denormal(False)
    x = _below_normal_patterns(fmt)
    best = kernel_isa()
    try:
        for saturate, subnormals in [(False, True), (True, True), (False, False)]:
            p = kernel_params(get_format(fmt), 32, saturate, subnormals, "nearest")
            kernel_isa("portable")
            ref = _raw(x, p, "nearest", 0, 0, False)
            torch.set_flush_denormal(flush_denormal)
            for level in _simd_levels():
                kernel_isa(level)
                for inplace in (False, True):
                    got = _raw(x, p, "nearest", p.fast_lo, 0, inplace)
                    assert torch.equal(got, ref), (saturate, subnormals, level, inplace)
            torch.set_flush_denormal(False)
    finally:
        torch.set_flush_denormal(False)
        kernel_isa(best)
