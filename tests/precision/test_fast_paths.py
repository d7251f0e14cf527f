"""The emulated regions' fast paths give the same bits as the general code they replace.

Oracles: the general path of :func:`mixprec.mx_quantize` (MX blocks, against its block-view
path), ``_scale_from_amax`` (fp8 current scaling),
:func:`mixprec.quantization.straight_through` (the autograd Function the in-handler rounding
of operands avoids), and whole training steps against fixed reference losses.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import pytest
import torch

from mixprec import autocast, decode, get_format, mx_quantize, quantize
from mixprec.machine import cpu_capability, cpu_vendor
from mixprec.precision.emulated import (
    element_rounder,
    round_result,
    spec_rounder,
    ste,
    ste_in_handler,
)
from mixprec.precision.fp8 import (
    CurrentScaling,
    _scale_from_amax,
)
from mixprec.precision.policy import resolve_format
from mixprec.quantization import (
    KERNEL_ISAS,
    blocks,
    elementwise,
    get_mx_format,
    has_c_kernel,
    kernel_isa,
    mx_round_to,
    register_rounding_observer,
)
from mixprec.quantization.scaled import (
    amax_to_scale,
    amax_to_scale_value,
    amax_value,
    scaled_round_to,
    tensor_to_amax,
)

ELEMENTS = ["float8_e4m3fn", "float8_e5m2", "e3m2", "e2m3", "e2m1"]
SHAPES_AXES = [
    ((64, 64), -1),
    ((64, 64), 0),
    ((2, 16, 64), -1),
    ((2, 4, 16, 16), -2),
    ((2, 3, 64, 8), 1),
    ((3, 40), -1),  # ragged: mx_quantize itself
    ((96, 5), 0),
    ((40, 24), 0),  # ragged along a non-last axis: a block of 32 rows and one of 8
    ((7,), 0),  # one short block
]


def _special(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Values over ~70 binades with zeros, -0, subnormals, inf and NaN sprinkled in."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp(torch.randn(shape, generator=g) * 8)
    flat = x.view(-1)
    flat[::17] = 0.0
    flat[11::61] = -0.0
    flat[3::53] = 1e-40
    flat[5::97] = float("inf")
    flat[7::131] = float("nan")
    return x


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def _bits_any_nan(t: torch.Tensor) -> torch.Tensor:
    """:func:`_bits` with every NaN as torch's default NaN (payload and sign dropped)."""
    return _bits(torch.where(t.isnan(), float("nan"), t))


@pytest.mark.parametrize("element", ELEMENTS)
@pytest.mark.parametrize(("shape", "axis"), SHAPES_AXES)
def test_mx_block_views_are_the_general_path_bit_for_bit(
    element: str, shape: tuple, axis: int
) -> None:
    """mx_quantize's block-view path (float32, the defaults) against its general path, which
    moves the axis last (the oracle the other MX tests check against the spec)."""
    f = get_format(element)
    mx = get_mx_format(f)
    x = _special(shape, len(shape) * 7 + axis)
    for t in (x, x.t()) if x.dim() == 2 else (x,):  # a transposed (non-contiguous) operand too
        ax = axis % t.dim()
        want = blocks._quantize_blocks(t, mx, 32, ax, "nearest", True, True, None, "floor")
        for got in (mx_round_to(t, f, 32, axis), mx_quantize(t, f, block_size=32, axis=axis)):
            assert got.shape == t.shape
            assert torch.equal(_bits(got), _bits(want))  # NaN bits included


@pytest.mark.skipif(not has_c_kernel(), reason="C kernel not built")
@pytest.mark.parametrize("element", ELEMENTS)
def test_fused_mx_kernel_is_the_view_path_at_every_simd_level(
    element: str, monkeypatch: pytest.MonkeyPatch, set_backend: Callable[[str], str]
) -> None:
    """The C kernel's fused MX blocks (mx_round_to's default on the CPU) at every SIMD level
    and the torch view path (MIXPREC_BACKEND=torch, a rounding observer, torch.compile) give
    the general path's bits, specials included, for every axis layout (blocks contiguous or
    one per inner column, ragged and short)."""
    f = get_format(element)
    mx = get_mx_format(f)
    best = kernel_isa()
    levels = KERNEL_ISAS[: KERNEL_ISAS.index(best) + 1]
    calls: list[int] = []
    kernel = elementwise._kernels.mx_floor
    monkeypatch.setattr(
        elementwise._kernels, "mx_floor", lambda *a: calls.append(1) or kernel(*a), raising=False
    )
    try:
        payloads = torch.randn(5, 64)  # NaNs with payloads, a negative and a signalling one
        bits = payloads.view(torch.int32)
        bits[0, 3], bits[1, 10], bits[2, 50] = 0x7FC00123, -0x3FF, 0x7F800001
        payloads[3] = 0.0  # all-zero blocks, and blocks of subnormals: the smallest scale
        payloads[4] = torch.randn(64) * 1e-39
        cases = [(_special(shape, 100 + i), axis) for i, (shape, axis) in enumerate(SHAPES_AXES)]
        for x, axis in [*cases, (payloads, -1), (payloads, 0)]:
            # an input NaN's payload survives torch's scalar kernels (ATEN_CPU_CAPABILITY=
            # default) and not its vector ones, so NaNs compare as NaN there; elsewhere bits
            bits = _bits if x is not payloads else _bits_any_nan
            ax = axis % x.dim()
            want = blocks._quantize_blocks(x, mx, 32, ax, "nearest", True, True, None, "floor")
            for level in levels:
                kernel_isa(level)
                n = len(calls)
                assert torch.equal(bits(mx_round_to(x, f, 32, axis)), bits(want)), level
                assert len(calls) == n + 1  # the kernel served
            set_backend("torch")
            n = len(calls)
            assert torch.equal(bits(mx_round_to(x, f, 32, axis)), bits(want))
            assert len(calls) == n  # the torch view path served
            set_backend("auto")
    finally:
        kernel_isa(best)


def _narrow_range_rows(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Rows whose 32-element blocks span at most 4 binades, so that every scaled element of most
    blocks is a normal of an fp8 element format or above its largest (the kernel's cheaper
    rounding for such blocks), with mantissa tails at and around every rounding tie, both
    signs, and a few blocks spoiled by a zero, a subnormal, an inf or a NaN."""
    g = torch.Generator().manual_seed(seed)
    n = rows * cols
    sign = torch.randint(0, 2, (n,), generator=g, dtype=torch.int32) << 31
    binade = torch.randint(0, 5, (n,), generator=g, dtype=torch.int32)
    offset = torch.randint(-60, 60, (rows, 1), generator=g, dtype=torch.int32)  # per row
    exponent = (127 + binade.view(rows, cols) + offset).view(-1) << 23
    tails = torch.tensor(
        [0, 1, 0x7FFFF, 0x80000, 0x80001, 0xFFFFF, 0x3FFFF, 0x40000, 0x1FFFF, 0x20000],
        dtype=torch.int32,
    )
    pick = torch.randint(0, len(tails) + 1, (n,), generator=g)
    tail = torch.where(
        pick < len(tails),
        tails[pick.clamp(max=len(tails) - 1)],
        torch.randint(0, 1 << 20, (n,), generator=g, dtype=torch.int32),
    )
    top = torch.randint(0, 8, (n,), generator=g, dtype=torch.int32) << 20
    x = (sign | exponent | top | tail).view(torch.float32)
    for k, v in zip((37, 101, 170, 233), (0.0, 1e-40, float("inf"), float("nan")), strict=True):
        x[k % n] = v
    return x.view(rows, cols)


@pytest.mark.skipif(not has_c_kernel(), reason="C kernel not built")
@pytest.mark.parametrize("element", ELEMENTS)
def test_fused_mx_rows_in_one_pass_are_the_general_path(element: str) -> None:
    """Blocks along the last axis run in one pass per block (each block's maximum, scale,
    division, rounding and multiplication in registers), with a cheaper rounding where every
    scaled element is a normal of the element format or above it: the general path's bits at
    every SIMD level, ties, saturation and ragged or short rows included (a row's last block
    of 16, attention heads', has its own loop; other short blocks are padded with a copy of
    their first element). Blocks down 16 or more columns take the same steps a row of blocks
    at a time, the columns in the vector lanes."""
    f = get_format(element)
    mx = get_mx_format(f)
    best = kernel_isa()
    try:
        for cols in (256, 200, 48, 47, 31, 17, 16, 15, 1):
            # rows of blocks; and the same blocks down the columns of its transpose (16 columns
            # or more: the blocks of a row of blocks share the vector lanes)
            x = _narrow_range_rows(24, cols, cols)
            for t, axis in ((x, 1), (x.t().contiguous(), 0)):
                want = blocks._quantize_blocks(
                    t, mx, 32, axis, "nearest", True, True, None, "floor"
                )
                for level in KERNEL_ISAS[: KERNEL_ISAS.index(best) + 1]:
                    kernel_isa(level)
                    got = elementwise.fused_mx_floor(t, f, 32, axis, 2.0**-mx.emax_elem, 2.0**-127)
                    assert got is not None
                    assert torch.equal(_bits(got), _bits(want)), (level, cols, axis)
    finally:
        kernel_isa(best)


@pytest.mark.skipif(not has_c_kernel(), reason="C kernel not built")
@pytest.mark.parametrize(
    ("shape", "axis", "calls"),
    [
        ((6, 200), 1, 2),  # slabs of outer: 3 rows each
        ((5, 40, 24), 1, 2),  # slabs, blocks down 24 columns
        ((1, 1000), 1, 2),  # one slab: whole blocks along it (the last one ragged)
        ((1000, 17), 0, 2),  # one slab blocked down 17 columns
        ((1, 40), 1, 2),  # two blocks (the second ragged): one call each
        ((1, 32), 1, 1),  # a single block is never split
    ],
)
def test_large_mx_operands_split_among_threads_give_one_calls_bits(
    shape: tuple[int, ...], axis: int, calls: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With several torch threads a large operand's MX blocks are split among the shared
    pool's threads (whole slabs, or whole blocks of a single slab; none straddles two calls):
    the general path's bits, a kernel call per part. (The threshold is lowered here; it is 2M
    elements.)"""
    f = get_format("float8_e4m3fn")
    mx = get_mx_format(f)
    x = _special(shape, sum(shape))
    seen: list[tuple[int, ...]] = []
    kernel = elementwise._kernels.mx_floor
    monkeypatch.setattr(
        elementwise._kernels, "mx_floor", lambda *a: seen.append(a[2:4]) or kernel(*a)
    )
    monkeypatch.setattr(elementwise, "_FUSED_PARALLEL_MIN", 16)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = mx_round_to(x, f, 32, axis)
    finally:
        torch.set_num_threads(threads)
    want = blocks._quantize_blocks(x, mx, 32, axis, "nearest", True, True, None, "floor")
    assert torch.equal(_bits(got), _bits(want))
    assert len(seen) == calls
    outer = math.prod(shape[:axis])
    if outer > 1:  # (outer, n) of each call: slabs covering outer once
        assert sum(k for k, _ in seen) == outer and all(n == shape[axis] for _, n in seen)
    else:  # whole blocks along n, covering it once
        assert sum(n for _, n in seen) == shape[axis]
        assert all(n % 32 == 0 for _, n in seen[:-1])


@pytest.mark.skipif(not has_c_kernel(), reason="C kernel not built")
@pytest.mark.parametrize("special", ["none", "inf", "nan", "zeros"])
@pytest.mark.parametrize("n", [1000, 4096, 4099])
def test_large_current_scaling_split_among_threads_gives_one_calls_bits(
    n: int, special: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fp8 current scaling of a large tensor with several threads: each part's largest
    magnitude on the pool's threads, then each part rounded with the whole tensor's scale: the
    scale and bits of one call, an inf or NaN in the last part included (the scale is then 1,
    as for an all-zero tensor)."""
    f = get_format("float8_e4m3fn")
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 300
    if special == "zeros":
        x.zero_()
    elif special != "none":
        x[-3] = float(special)
    want, want_scale = elementwise.fused_current_scaled_round(x, 448.0, f)
    parts: list[int] = []
    kernel = elementwise._kernels.scaled_round_amax
    monkeypatch.setattr(
        elementwise._kernels, "scaled_round_amax", lambda *a: parts.append(a[2]) or kernel(*a)
    )
    monkeypatch.setattr(elementwise, "_FUSED_PARALLEL_MIN", 256)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got, scale = elementwise.fused_current_scaled_round(x, 448.0, f)
    finally:
        torch.set_num_threads(threads)
    assert len(parts) == 2 and sum(parts) == n
    assert scale == want_scale and (scale == 1.0) == (special != "none")
    assert torch.equal(_bits_any_nan(got), _bits_any_nan(want))


def _layouts() -> list[tuple[torch.Tensor, bool]]:
    """(x, is x a permutation of a contiguous layout) for the fused kernels' layout tests."""
    heads = _special((2, 17, 4, 64), 7).transpose(1, 2)  # attention heads: view + transpose
    return [
        (_special((64, 96), 5).t(), True),  # a transposed weight
        (heads, True),
        (heads.transpose(-2, -1), True),  # k^T of a manual attention
        (_special((1, 64, 1, 40), 8).permute(2, 3, 0, 1), True),  # size-1 dimensions
        (_special((64, 96), 9)[:, ::2], False),  # strided: a copy first
    ]


@pytest.mark.skipif(not has_c_kernel(), reason="C kernel not built")
def test_fused_mx_kernel_keeps_a_permuted_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    """mx_round_to (the emulated operands' MX rounding) runs the fused kernel over a permuted
    operand in memory order: the general path's bits along every axis, at every SIMD level, in
    the operand's own layout (no transposing copy), the input untouched; a strided operand is
    copied first. mx_quantize keeps returning contiguous tensors."""
    calls: list[int] = []
    kernel = elementwise._kernels.mx_floor
    monkeypatch.setattr(
        elementwise._kernels, "mx_floor", lambda *a: calls.append(1) or kernel(*a), raising=False
    )
    best = kernel_isa()
    f = get_format("float8_e4m3fn")
    mx = get_mx_format(f)
    try:
        for level in KERNEL_ISAS[: KERNEL_ISAS.index(best) + 1]:
            kernel_isa(level)
            for x, permuted in _layouts():
                before = x.clone()
                for axis in range(x.dim()):
                    want = blocks._quantize_blocks(
                        x, mx, 32, axis, "nearest", True, True, None, "floor"
                    )
                    n = len(calls)
                    got = mx_round_to(x, f, 32, axis)
                    assert len(calls) == n + 1  # the kernel served
                    assert torch.equal(_bits(got), _bits(want)), (level, x.shape, axis)
                    assert got.stride() == (x.stride() if permuted else want.stride())
                    assert mx_quantize(x, f, axis=axis).is_contiguous()
                assert torch.equal(_bits(x), _bits(before))
    finally:
        kernel_isa(best)


def test_fused_scaled_rounding_keeps_a_permuted_layout() -> None:
    """fp8 current scaling's fused rounding of a permuted float32 operand gives the torch
    ops' bits in the torch ops' layout (the operand's own); a strided one is copied first."""
    recipe = CurrentScaling("E4M3")
    for fmt in (get_format("float8_e4m3fn"), get_format("float8_e5m2")):
        for x, permuted in _layouts():
            want = scaled_round_to(x, amax_to_scale(tensor_to_amax(x), float(fmt.max)), fmt)
            got = recipe.quantize(x, fmt, None)
            assert torch.equal(_bits(got), _bits(want)), (fmt.name, x.shape)
            if permuted:
                assert got.stride() == want.stride() == x.stride()


def test_fused_kernels_leave_observed_roundings_to_the_torch_path() -> None:
    """With a rounding observer registered (the sanitizer's), MX blocks and fp8 scaled
    roundings go through quantize, so the observer sees the element rounding; the values are
    the fused kernels'."""
    seen: list[str] = []
    x = torch.randn(4, 64)
    recipe = CurrentScaling("E4M3")
    e2m1, e4m3 = get_format("e2m1"), get_format("e4m3")
    with register_rounding_observer(lambda src, dst, fmt: seen.append(fmt.name)):
        y = mx_round_to(x, e2m1, 32, -1)
        z = recipe.quantize(x, e4m3, None)
    assert seen == ["float4_e2m1fn", "float8_e4m3fn"]
    assert torch.equal(y, mx_round_to(x, e2m1, 32, -1))
    assert torch.equal(z, recipe.quantize(x, e4m3, None))


@pytest.mark.parametrize("rule", ["rceil", "ceil", "even"])
def test_mx_round_to_other_scale_rules_and_dtypes_take_the_general_path(rule: str) -> None:
    f = get_format("float8_e4m3fn")
    x = _special((4, 64), 3)
    assert torch.equal(
        _bits(mx_round_to(x, f, 32, -1, rule)),
        _bits(mx_quantize(x, f, block_size=32, axis=-1, scale_rounding=rule)),
    )
    h = torch.randn(4, 64, dtype=torch.bfloat16)
    assert torch.equal(mx_round_to(h, f, 32, -1), mx_quantize(h, f, block_size=32))


def test_plain_scale_matches_the_general_scale() -> None:
    amax = torch.tensor(
        [0.0, -0.0, 1e-45, 1e-40, 5e-39, 1e-38, 1e-30, 1.0, 448.0, 3.4e38,
         float("inf"), float("nan")]
    )  # fmt: skip
    for fmax in (448.0, 57344.0):
        for a in amax:
            want = _scale_from_amax(a, fmax, 0, torch.ones_like(a), False)
            assert torch.equal(_bits(amax_to_scale(a, fmax)), _bits(want)), a


def test_float_scale_matches_the_tensor_scale() -> None:
    """The eager CPU recipe's Python-float scale equals torch's float32 one bit for bit, over
    every binade of amax (subnormal amaxes overflow the reciprocal) and the specials."""
    binades = torch.arange(-149, 128, dtype=torch.float64)
    mant = torch.rand(
        binades.numel(), generator=torch.Generator().manual_seed(3), dtype=torch.float64
    )
    amax = ((1 + mant) * 2.0**binades).float()
    specials = torch.tensor(
        [0.0, -0.0, 1e-45, 3.4e38, torch.finfo().max, float("inf"), float("nan")]
    )
    for fmt in ("float8_e4m3fn", "float8_e5m2", "e3m2", "e2m3", "e2m1"):
        fmax = float(get_format(fmt).max)
        for a in torch.cat((amax, specials)):
            want = float(amax_to_scale(a, fmax))
            got = amax_to_scale_value(float(a), fmax)
            assert got == want or (got != got and want != want), (fmt, float(a))


@pytest.mark.skipif(not has_c_kernel(), reason="C kernel not built")
def test_fused_current_scaling_computes_the_float_scale() -> None:
    """The C kernel's amax and scale are amax_to_scale_value's (torch's float32 scale) bit for
    bit, over every binade of amax and the specials (zero, inf and NaN amaxes: scale 1), at
    every SIMD level; the amax is the largest magnitude whatever the sign or the position."""
    binades = torch.arange(-149, 128, dtype=torch.float64)
    mant = torch.rand(
        binades.numel(), generator=torch.Generator().manual_seed(5), dtype=torch.float64
    )
    amaxes = [float(a) for a in ((1 + mant) * 2.0**binades).float()]
    amaxes += [0.0, 1e-45, torch.finfo().max, math.inf, math.nan]
    best = kernel_isa()
    try:
        for level in KERNEL_ISAS[: KERNEL_ISAS.index(best) + 1]:
            kernel_isa(level)
            for k, a in enumerate(amaxes):
                x = torch.tensor([a / 4, 0.0, -a, a / 2] * (k % 7 + 1))  # -a: the sign drops
                for name in ("float8_e4m3fn", "float8_e5m2", "e2m1"):
                    fmt = get_format(name)
                    fmax = float(fmt.max)
                    got = elementwise.fused_current_scaled_round(x, fmax, fmt)
                    assert got is not None
                    want = amax_to_scale_value(amax_value(x), fmax)
                    assert got[1] == want, (level, a, name)
    finally:
        kernel_isa(best)


def test_quotients_of_narrow_values_need_no_division() -> None:
    """Why the scaled-rounding kernel may unscale without dividing: for every value q of a
    format with at most 3 mantissa bits (all fp8, fp6 and fp4 values) and float32 scales s
    across every binade, q / s in float32 equals q * (1 / s) computed in double and rounded to
    float32 (the kernel's comment has the proof, which needs values of at most 4 significant
    bits; wider formats keep the division)."""
    gen = torch.Generator().manual_seed(11)
    binades = torch.arange(-149, 128, dtype=torch.float64).repeat_interleave(160)
    mant = torch.rand(binades.numel(), generator=gen, dtype=torch.float64)
    s = ((1 + mant) * 2.0**binades).float()
    s = torch.cat((s, torch.tensor([1e-45, 2.0**-126, 1.0, torch.finfo().max])))
    for name in ("float8_e4m3fn", "float8_e5m2", "e3m2", "e2m3", "e2m1"):
        q = decode(torch.arange(256, dtype=torch.int32) % 2 ** get_format(name).bits, name)
        q = q[torch.isfinite(q)].unique()
        want = q[:, None] / s[None, :]
        got = (q.double()[:, None] * (1.0 / s.double())[None, :]).float()
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_eager_current_scaling_equals_the_tensor_path(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CurrentScaling.quantize on the CPU (scale as a Python float; a float32 operand scaled,
    rounded and unscaled in one C call, at every SIMD level) gives the bits of the tensor path
    that GPUs and compiled graphs take, from tiny to huge tensors and with zeros, infs and
    NaNs."""
    recipe = CurrentScaling("E4M3")
    calls: list[int] = []
    if has_c_kernel():
        kernel = elementwise._kernels.current_scaled_round
        monkeypatch.setattr(
            elementwise._kernels, "current_scaled_round", lambda *a: calls.append(1) or kernel(*a)
        )
    best = kernel_isa()
    levels = KERNEL_ISAS[: KERNEL_ISAS.index(best) + 1] if best else [None]
    try:
        for level in levels:
            if level is not None:
                kernel_isa(level)
            for seed, exp in enumerate(range(-140, 128, 9)):
                x = _special((8, 33), seed) if exp == -5 else torch.randn(8, 33) * 2.0**exp
                x = x.to(dtype)
                for name in ("float8_e4m3fn", "float8_e5m2", "e2m1"):
                    fmt = get_format(name)
                    want = scaled_round_to(x, amax_to_scale(tensor_to_amax(x), float(fmt.max)), fmt)
                    got = recipe.quantize(x, fmt, None)
                    assert got.dtype == want.dtype == dtype
                    assert torch.equal(
                        got.float().view(torch.int32), want.float().view(torch.int32)
                    ), (level, exp, name)
    finally:
        if best is not None:
            kernel_isa(best)
    fused = dtype == torch.float32 and has_c_kernel()
    assert bool(calls) == fused  # float32 took the kernel; 16-bit operands the torch ops
    nan = torch.tensor([1.0, float("nan"), 3.0])
    assert torch.equal(recipe.quantize(nan, fmt, None).isnan(), nan.isnan())


def test_in_handler_recipe_and_mx_roundings_equal_the_straight_through_function() -> None:
    """fp8 recipe and MX operand roundings in the handler (their result as the data of an
    autograd-visible copy, the gradient rounded by a hook) give the Function's values and
    gradients."""
    recipe = CurrentScaling("HYBRID")
    e4m3, e5m2 = recipe.forward_format, recipe.backward_format
    rounders = [
        (lambda x: recipe.quantize(x, e4m3, None), lambda g: recipe.quantize(g, e5m2, None)),
        (spec_rounder(resolve_format("mxfp8_e4m3"), -1), element_rounder(get_format("bf16"))),
        (spec_rounder(resolve_format("mxfp4"), 0), None),
    ]
    x = torch.randn(8, 64, requires_grad=True)
    up = torch.randn(8, 64) * 1e-3
    for fwd, bwd in rounders:
        ys = [f(x, fwd, bwd) for f in (ste, ste_in_handler)]
        grads = [torch.autograd.grad(y, x, up)[0] for y in ys]
        assert ys[1].grad_fn is not None  # autograd-visible, its own storage: x unchanged
        assert ys[1].untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
        assert torch.equal(ys[0], ys[1]) and not torch.equal(ys[1], x)
        assert torch.equal(grads[0], grads[1])


def test_in_handler_rounding_equals_the_straight_through_function() -> None:
    """Values and gradients of the Function, for contiguous, permuted and strided operands; a
    permuted operand's rounding keeps its layout (one pass, no copy), a strided one's is
    contiguous (as a clone of it would be)."""
    r = element_rounder(get_format("bf16"))
    g16 = element_rounder(get_format("fp16"))
    leaf = torch.randn(8, 66, requires_grad=True)
    for x, layout in (
        (leaf[:, :33] * 1.0, "contiguous"),
        (leaf.t() * 1.0, "permuted"),  # a transposed non-leaf keeps the transpose's strides
        (leaf[:, ::2], "strided"),
    ):
        before = x.detach().clone()
        up = torch.randn(x.shape) * 1e3
        ys = [f(x, r, g16) for f in (ste, ste_in_handler)]
        grads = [torch.autograd.grad(y, leaf, up, retain_graph=True)[0] for y in ys]
        assert torch.equal(ys[0], ys[1]) and not torch.equal(ys[1], x), layout
        assert torch.equal(grads[0], grads[1]), layout
        assert torch.equal(x, before)  # the operand untouched
        want = x.stride() if layout != "strided" else ys[0].contiguous().stride()
        assert ys[1].stride() == want, layout
    assert not torch.equal(grads[0], torch.zeros_like(leaf))
    assert not torch.equal(grads[0][:, ::2], up)  # the gradient was rounded (to fp16)


def test_results_viewing_a_temporary_round_in_place_and_views_of_inputs_do_not() -> None:
    """F.linear's result for a 3-d input (with a bias) views its 2-d addmm result, which
    nothing else holds: it is rounded in place (no copy), with the values and gradient of the
    copying path. A result viewing an input's storage is rounded out of place: the input keeps
    its values."""
    bf16, fp16 = get_format("bf16"), element_rounder(get_format("fp16"))
    x = torch.randn(2, 5, 8, requires_grad=True)
    w, b = torch.randn(6, 8, requires_grad=True), torch.randn(6)
    up = torch.randn(2, 5, 6) * 1e3
    y = torch.nn.functional.linear(x, w, b)
    assert y._base is not None  # the case at hand
    temp = y._base
    r = round_result(y, bf16, fp16, [x, w])
    assert r is y and r._base is temp  # rounded where it lies
    ref = ste(torch.nn.functional.linear(x, w, b), element_rounder(bf16), fp16)
    assert torch.equal(r, ref)
    assert torch.equal(torch.autograd.grad(r, x, up)[0], torch.autograd.grad(ref, x, up)[0])
    base = torch.randn(4, 8)
    before = base.clone()
    view = base[:, :4]
    out = round_result(view, bf16, None, [base])
    assert torch.equal(base, before)  # the input untouched
    assert torch.equal(out, quantize(before[:, :4], "bf16"))


def test_a_returned_copy_rounds_its_gradient_before_user_hooks() -> None:
    """A rounded copy handed to user code (a result viewing an input) rounds its gradient in
    a tensor hook, so the user's hooks and retain_grad see the rounded gradient; operand copies
    (node pre-hooks) round it as well."""
    x = torch.randn(4, 8, requires_grad=True)
    out = round_result(x[:, :4], get_format("bf16"), element_rounder(get_format("fp16")), [x])
    out.retain_grad()
    seen: list[torch.Tensor] = []
    out.register_hook(seen.append)
    up = torch.randn(4, 4) * 1e3 + 1e-4  # not fp16 values
    out.backward(up)
    want = quantize(up, "fp16")
    assert not torch.equal(want, up)
    assert torch.equal(out.grad, want) and torch.equal(seen[0], want)
    assert torch.equal(x.grad[:, :4], want)
    w = torch.randn(4, 4, requires_grad=True)
    op = ste_in_handler(w, element_rounder(get_format("bf16")), element_rounder(get_format("fp16")))
    op.backward(up)
    assert torch.equal(w.grad, want)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("weight_grad", [True, False])
@pytest.mark.parametrize("fmt", [None, "bf16", "e4m3", "mxfp8_e4m3"])
def test_in_place_change_after_the_op_errs_exactly_where_fp32_does(
    fmt: str | None, weight_grad: bool, transposed: bool
) -> None:
    """An emulated operand is a view of the operand (its version counter shared): changing the
    operand in place after the op saved it fails in backward as in fp32, and where fp32's op
    did not save it (no weight gradient needs it) it does not fail either. A transposed
    operand too (rounded in its own layout, no copy)."""
    x0 = torch.randn(32, 4) if transposed else torch.randn(4, 32)
    x0.requires_grad_(True)
    w = torch.randn(8, 32, requires_grad=weight_grad)
    region = autocast(fmt, emulate=True) if fmt else contextlib.nullcontext()
    with region:
        x = x0 * 1.0  # a non-leaf: in-place changes allowed
        x = x.t() if transposed else x
        y = torch.nn.functional.linear(x, w)
    x.mul_(2.0)
    if weight_grad:
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()
    else:
        y.sum().backward()
        assert x0.grad is not None


def test_a_returned_rounding_changed_in_place_leaves_its_input_alone() -> None:
    """A rounded result handed to user code that aliased an input is a copy, not a view: the
    user changing it in place changes neither the input nor the input's gradient."""
    x0 = torch.randn(4, 8, requires_grad=True)
    x = x0 * 1.0
    before = x.detach().clone()
    out = round_result(x, get_format("bf16"), None, [x])  # the op returned its input
    out.mul_(2.0)
    assert torch.equal(x, before)
    ((x * 3).sum() + out.sum()).backward()
    assert torch.equal(x0.grad, torch.full_like(x0, 5.0))


# One nanoGPT training step (corpus example batch repeated 4x): the loss and the sum of |grad|
# over the parameters, recorded (float.hex, 1 thread) before the fast paths existed, on an Intel
# CPU whose torch capability is AVX512. Other CPUs' float32 kernels sum GEMMs in another order
# (AVX2: the 8th digit of a bf16 gradient sum moves, the 4th of an fp8 one, whose roundings
# amplify it; an AMD CPU at AVX512: MKL's kernels for it): there the values are compared to 1e-3.
RECORDED_ON = ("AVX512", "GenuineIntel")
REFERENCE = {
    "bf16": ("0x1.74b3320000000p+2", "0x1.1e69077792578p+8"),
    "fp16": ("0x1.74ad3c0000000p+2", "0x1.1e744f29a5340p+8"),
    "e4m3": ("0x1.74d23a0000000p+2", "0x1.1eb7e86a62ef4p+8"),
    "mxfp8_e4m3": ("0x1.73954a0000000p+2", "0x1.e6910b2f09dd0p+7"),
    "mxfp4_e2m1": ("0x1.72d10e0000000p+2", "0x1.701c25c113cb0p+7"),
}


@pytest.mark.parametrize("fmt", sorted(REFERENCE))
def test_training_step_bits_unchanged(fmt: str) -> None:
    from mixprec.testing import corpus

    entry = corpus.get("nanogpt")
    model, args, kwargs = entry.example(0)
    args = tuple(a.repeat(4, 1) for a in args)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # recorded at 1 thread: GEMM sums depend on the thread count
    try:
        with autocast(fmt, emulate=True):
            loss = entry.loss(model, args, kwargs)
        loss.backward()
    finally:
        torch.set_num_threads(threads)
    grads = sum(float(p.grad.double().abs().sum()) for p in model.parameters())
    if (cpu_capability(), cpu_vendor()) == RECORDED_ON:
        assert (float(loss.detach()).hex(), grads.hex()) == REFERENCE[fmt]
    else:
        want = [float.fromhex(v) for v in REFERENCE[fmt]]
        assert [float(loss.detach()), grads] == pytest.approx(want, rel=1e-3)
