"""torch.compile traces quantize / fake_quantize through the mixprec::round custom op."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from functools import cache

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import mixprec
from mixprec.quantization import elementwise, has_c_kernel, round_to

CASES = [
    ("bf16", {}),
    ("e4m3", {"saturate": True}),
    ("e2m1", {}),
    ("e2m1", {"rounding": "toward_zero"}),
]


def _x() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 257, generator=g) * torch.logspace(-6, 6, 257)
    x[0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0])
    return x


def _quantize(x: torch.Tensor, fmt: str, saturate: bool, rounding: str) -> torch.Tensor:
    return mixprec.quantize(x, fmt, saturate=saturate, rounding=rounding)


# compiled once per module (compiling costs seconds): every test shares these
@cache
def _compiled(backend: str) -> tuple[Callable[..., torch.Tensor], CompileCounterWithBackend]:
    cnt = CompileCounterWithBackend(backend)
    return torch.compile(_quantize, backend=cnt, fullgraph=True), cnt


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Bit patterns: NaN payloads and signed zeros compared too."""
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


@pytest.mark.parametrize(("fmt", "kw"), CASES)
def test_compiled_quantize_is_bit_exact(fmt: str, kw: dict) -> None:
    counters.clear()
    f = torch.compile(lambda x: mixprec.quantize(x, fmt, **kw), backend="aot_eager", fullgraph=True)
    x = _x()
    assert torch.equal(_bits(f(x)), _bits(mixprec.quantize(x, fmt, **kw)))
    assert not counters["graph_break"]


def test_formats_are_inputs_one_compile_per_format() -> None:
    counters.clear()
    f, cnt = _compiled("aot_eager")
    x = _x()
    before = cnt.frame_count
    for _ in range(2):
        for fmt, sat, rnd in (("bf16", False, "nearest"), ("e4m3", True, "nearest")):
            assert torch.equal(_bits(f(x, fmt, sat, rnd)), _bits(_quantize(x, fmt, sat, rnd)))
    assert cnt.frame_count - before <= 2  # at most one compile per distinct format
    assert not counters["graph_break"]


# _quantize's code object is shared with the aot_eager test, and each input dtype, layout and
# format is a compile: more than dynamo's default limit of 8 per code object
@torch._dynamo.config.patch(recompile_limit=32)
def test_inductor_matches_eager() -> None:
    counters.clear()
    f, _ = _compiled("inductor")
    x = _x()
    for fmt, kw in CASES:
        sat, rnd = kw.get("saturate", False), kw.get("rounding", "nearest")
        assert torch.equal(_bits(f(x, fmt, sat, rnd)), _bits(_quantize(x, fmt, sat, rnd)))
    bf = _x().to(torch.bfloat16)
    want = _quantize(bf, "e4m3", False, "nearest")
    assert torch.equal(_bits(f(bf, "e4m3", False, "nearest")), _bits(want))
    xt = _x().t()  # not contiguous: the op's result is, as its fake says
    assert torch.equal(_bits(f(xt, "e5m2", False, "up")), _bits(_quantize(xt, "e5m2", False, "up")))
    xd = _x().double()
    want = _quantize(xd, "e4m3", False, "nearest").view(torch.int64)
    assert torch.equal(f(xd, "e4m3", False, "nearest").view(torch.int64), want)
    assert not counters["graph_break"]


def _fq(x: torch.Tensor, fmt: str) -> torch.Tensor:
    return (mixprec.fake_quantize(x, fmt, grad_format="e5m2") * x).sum()


def test_fake_quantize_gradient_through_compile_equals_eager() -> None:
    counters.clear()
    f = torch.compile(_fq, backend="aot_eager", fullgraph=True)
    for fmt in ("bf16", "e4m3"):
        a = _x().nan_to_num(0.0, 1.0, -1.0).requires_grad_()
        b = a.detach().clone().requires_grad_()
        f(a, fmt).backward()
        _fq(b, fmt).backward()
        assert torch.equal(_bits(a.grad), _bits(b.grad))
    assert not counters["graph_break"]


def test_quantize_gradient_is_zero_under_compile() -> None:
    f = torch.compile(lambda x: (mixprec.quantize(x, "e4m3") * 2).sum(), backend="aot_eager")
    x = torch.randn(64).requires_grad_()
    f(x).backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_round_to_out_under_compile() -> None:
    fmt = mixprec.get_format("e5m2")

    def g(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        round_to(x, fmt, out=out)
        return out

    f = torch.compile(g, backend="aot_eager", fullgraph=True)
    x, out = _x(), torch.empty(4, 257)
    assert f(x, out) is out
    assert torch.equal(_bits(out), _bits(mixprec.quantize(x, fmt)))


def test_stochastic_under_compile_uses_default_generator() -> None:
    f = torch.compile(
        lambda x: mixprec.quantize(x, "e4m3", rounding="stochastic"),
        backend="aot_eager",
        fullgraph=True,
    )
    x = torch.full((4096,), 1.0625)  # between e4m3's 1.0 and 1.125
    torch.manual_seed(0)
    a = f(x)
    torch.manual_seed(0)
    assert torch.equal(f(x), a)  # reproducible through torch.manual_seed
    assert set(a.unique().tolist()) == {1.0, 1.125}


def test_generator_under_compile_is_refused_in_fullgraph() -> None:
    g = torch.Generator().manual_seed(0)
    f = torch.compile(
        lambda x: mixprec.quantize(x, "e4m3", rounding="stochastic", generator=g),
        backend="aot_eager",
        fullgraph=True,
    )
    with pytest.raises(Exception, match=r"generator is not supported under torch\.compile"):
        f(torch.randn(8))


# dynamo warns that it cannot trace the C kernel: that is the expected graph break
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_generator_without_fullgraph_falls_back_to_eager() -> None:
    f = torch.compile(
        lambda x, g: mixprec.quantize(x, "e4m3", rounding="stochastic", generator=g),
        backend="aot_eager",
    )
    x = torch.randn(64)
    a = f(x, torch.Generator().manual_seed(1))
    b = mixprec.quantize(
        x, "e4m3", rounding="stochastic", generator=torch.Generator().manual_seed(1)
    )
    assert torch.equal(_bits(a), _bits(b))  # the graph break runs it eagerly, generator and all


def _rounding_cases() -> torch.Tensor:
    """float32 patterns: every bf16 pattern with a low half of zero, a tie (0x8000), just above
    (0x8001) and just below one (0x7FFF); every pattern of the top 12 bits with fp8's ties and
    their neighbours below; random patterns. NaN payloads, subnormals, overflow and ties to
    even are all in."""
    hi = torch.arange(1 << 16, dtype=torch.int32) << 16
    top = torch.arange(1 << 12, dtype=torch.int32) << 20
    g = torch.Generator().manual_seed(0)
    pats = [hi | low for low in (0, 0x7FFF, 0x8000, 0x8001)]
    pats += [top | low for low in (0x08_0000, 0x07_FFFF, 0x04_0000, 0x03_FFFF, 0x0C_0000)]
    pats.append(torch.randint(-(2**31), 2**31 - 1, (1 << 18,), dtype=torch.int32, generator=g))
    return torch.cat(pats).view(torch.float32)


# (format, saturate, fused): the roundings inductor compiles to a clamp and cast pair, and
# some it must leave to the mixprec::round call (no torch dtype, or fp8 overflowing unsaturated)
FUSED_CASES = [
    ("bf16", False, True), ("fp16", True, True), ("e4m3", True, True), ("e5m2", True, True),
    ("e4m3", False, False), ("e3m2", True, False),
]  # fmt: skip


def _neighbours(x: torch.Tensor) -> list[torch.Tensor]:
    # float32 ops on both sides: inductor fuses each rounding between them into one kernel
    return [mixprec.quantize(x * 1.0, f, saturate=s) + 0.0 for f, s, _ in FUSED_CASES]


@pytest.mark.parametrize("simdlen", [None, 256, 1], ids=["native", "avx2", "scalar"])
def test_inductor_fuses_cast_roundings_bit_exact(simdlen: int | None) -> None:
    """Roundings with a torch dtype compile to fused casts (no mixprec::round call left in the
    generated code) with the eager kernels' bits, NaN payloads included; the others keep the
    call. ``simdlen`` 256 is inductor's AVX2 code, 1 its scalar code."""
    from torch._inductor import config as inductor_config
    from torch._inductor.utils import run_and_get_code

    x = _rounding_cases()
    torch._dynamo.reset()
    f = torch.compile(_neighbours, fullgraph=True, options={"cpp.simdlen": simdlen})
    with inductor_config.patch(force_disable_caches=True):
        got, code = run_and_get_code(f, x)
    for (fmt, sat, _), g, want in zip(FUSED_CASES, got, _neighbours(x), strict=True):
        assert torch.equal(_bits(g), _bits(want)), (fmt, sat)
    calls = "\n".join(code).count("= torch.ops.mixprec.round.default(")
    assert calls == sum(not fused for *_, fused in FUSED_CASES)


# -- MX blocks: mixprec::mx_round ----------------------------------------------------------------

_MX_ELEMENTS = ("e4m3", "e5m2", "e3m2", "e2m3", "e2m1")
needs_c = pytest.mark.skipif(not has_c_kernel(), reason="no C kernel: the torch ops are traced")


def _mx_cases() -> list[tuple[torch.Tensor, int]]:
    """(operand, axis): channels-last activations blocked along channels, rows along the last
    axis and down the first, a transposed operand, a ragged (48) axis, a strided slice, heads
    of a fused projection (gapped, permuted; short blocks), and blocks holding NaN, inf, zeros
    and subnormals."""
    g = torch.Generator().manual_seed(1)
    act = torch.randn(2, 64, 5, 3, generator=g).contiguous(memory_format=torch.channels_last)
    rows = torch.randn(6, 96, generator=g) * torch.logspace(-40, 30, 96)
    rows[0, :3] = torch.tensor([float("nan"), float("inf"), -0.0])
    rows[1, :32] = 0.0
    rows[2, 32:64] = 1e-42  # a block of subnormals
    ragged = torch.randn(4, 48, generator=g)
    sliced = torch.randn(8, 64, generator=g)[::2]
    # attention heads split out of a fused QKV projection: gapped and permuted
    heads = torch.randn(2, 16, 96, generator=g)[..., 32:64].unflatten(-1, (2, 16)).transpose(1, 2)
    return [(act, 1), (rows, -1), (rows.t(), 0), (rows.t(), 1), (ragged, -1), (sliced, 0),
            (heads, -1), (heads, 2)]  # fmt: skip


def _mx_round_all(xs: list[torch.Tensor], elem: str, rule: str) -> list[torch.Tensor]:
    from mixprec.quantization import mx_round_to

    return [mx_round_to(x, elem, 32, axis, rule) for x, axis in zip(xs, _AXES, strict=True)]


_AXES = [axis for _, axis in _mx_cases()]


def _graph_ops(backend: str) -> tuple[Callable[..., object], list[str]]:
    """A backend that notes the ops of every graph it is given, then runs ``backend``."""
    seen: list[str] = []

    def note(gm: torch.fx.GraphModule, example: list[torch.Tensor]) -> Callable[..., object]:
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op.startswith("call_"))
        return torch._dynamo.lookup_backend(backend)(gm, example)

    return note, seen


# each element format and rule is a compile of _mx_round_all (strings are guarded constants)
@needs_c
@torch._dynamo.config.patch(recompile_limit=64)
@pytest.mark.parametrize("rule", ["floor", "ceil", "even", "rceil"])
def test_compiled_mx_blocks_are_the_eager_bits_in_one_op(rule: str, monkeypatch) -> None:
    """On CPU an MX rounding traces to one ``mixprec::mx_round`` call (the C kernel at run
    time) with eager's bits, in ``x``'s layout, for every element format and scale rule (every
    operand here: large ones only by default)."""

    monkeypatch.setattr(elementwise, "EXTERN_MIN", 1)
    torch._dynamo.reset()  # _mx_round_all's compiles of other tests
    counters.clear()
    xs = [x for x, _ in _mx_cases()]
    backend, seen = _graph_ops("aot_eager")
    f = torch.compile(_mx_round_all, backend=backend, fullgraph=True)
    for elem in _MX_ELEMENTS:
        for x, got, want in zip(xs, f(xs, elem, rule), _mx_round_all(xs, elem, rule), strict=True):
            assert torch.equal(_bits(got), _bits(want)), (elem, rule)
            assert got.stride() == torch.empty_like(x).stride()  # x's, where x is dense
    assert seen.count("mixprec.mx_round.default") == len(xs) * len(_MX_ELEMENTS)
    assert not counters["graph_break"]


@needs_c
def test_inductor_runs_mx_blocks_as_the_eager_kernel(monkeypatch) -> None:

    monkeypatch.setattr(elementwise, "EXTERN_MIN", 1)
    torch._dynamo.reset()
    counters.clear()
    xs = [x for x, _ in _mx_cases()]
    f = torch.compile(_mx_round_all, fullgraph=True)
    for got, want in zip(f(xs, "e4m3", "floor"), _mx_round_all(xs, "e4m3", "floor"), strict=True):
        assert torch.equal(_bits(got), _bits(want))
    assert not counters["graph_break"]


def test_compiled_mx_blocks_without_the_c_kernel_trace_the_torch_ops(monkeypatch) -> None:
    """Where the C kernel does not serve (CUDA, the torch backend) the torch ops are traced
    and compiled: the same bits (run here on the CPU by hiding the kernel)."""

    monkeypatch.setattr(elementwise, "has_c_kernel", lambda: False)
    torch._dynamo.reset()
    xs = [x for x, _ in _mx_cases()]
    backend, seen = _graph_ops("inductor")
    f = torch.compile(_mx_round_all, backend=backend, fullgraph=True)
    for got, want in zip(f(xs, "e4m3", "floor"), _mx_round_all(xs, "e4m3", "floor"), strict=True):
        assert torch.equal(_bits(got), _bits(want))
    assert "mixprec.mx_round.default" not in seen and any("amax" in op for op in seen)
    torch._dynamo.reset()  # the next compile of _mx_round_all sees the kernel again


@needs_c
def test_compiled_graphs_round_only_large_mx_operands_by_the_kernel() -> None:
    """Small operands keep the traced torch ops (inductor fuses them; an extern call costs
    more than they do), from 32k elements the C kernel rounds them: the same bits."""
    from mixprec.quantization import mx_round_to

    def two(small: torch.Tensor, large: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return mx_round_to(small, "e4m3", 32, -1), mx_round_to(large, "e4m3", 32, 0)

    g = torch.Generator().manual_seed(2)
    small, large = torch.randn(64, 64, generator=g), torch.randn(1024, 40, generator=g)
    backend, seen = _graph_ops("inductor")
    got = torch.compile(two, backend=backend, fullgraph=True)(small, large)
    for a, b in zip(got, two(small, large), strict=True):
        assert torch.equal(_bits(a), _bits(b))
    assert seen.count("mixprec.mx_round.default") == 1


def test_compiled_mx_rounding_is_detached_as_eager() -> None:
    """``mx_round_to`` leaves gradients to its callers: its result needs none, compiled as in
    eager code (the kernel's result), and compiling it warns of no missing autograd formula."""
    from mixprec.quantization import mx_round_to

    x = torch.randn(512, 64).requires_grad_()  # 32k elements: the op where the kernel is built
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = torch.compile(lambda t: mx_round_to(t, "e4m3", 32, -1), fullgraph=True)(x)
    want = mx_round_to(x, "e4m3", 32, -1)
    assert not got.requires_grad and not want.requires_grad
    assert torch.equal(_bits(got), _bits(want))


def _mx_quantize_ragged(xs: list[torch.Tensor], rule: str) -> list[torch.Tensor]:
    axes = (-1, -1, 0, -1)
    return [
        mixprec.mx_quantize(x, "mxfp8_e4m3", axis=a, scale_rounding=rule)
        for x, a in zip(xs, axes, strict=True)
    ] + list(mixprec.mx_encode(xs[1], "mxfp8_e4m3", scale_rounding=rule))


def test_mx_quantize_compiles_in_one_graph_with_eager_bits_on_ragged_axes() -> None:
    """The public MX rounding (and fp8 encoding) traces whole (the in-place element rounding
    is the custom op): ragged axes (whole blocks and a short last block), a single short
    block, every scale rule, the eager bits. Inductor had returned garbage past the data for
    a ragged axis."""
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(s, generator=g) * 100 for s in ((4, 48), (3, 70), (70, 3), (5, 20))]
    torch._dynamo.reset()
    counters.clear()
    f = torch.compile(_mx_quantize_ragged, fullgraph=True)
    for rule in ("floor", "ceil", "even", "rceil"):
        for got, want in zip(f(xs, rule), _mx_quantize_ragged(xs, rule), strict=True):
            if want.is_floating_point():
                got, want = _bits(got), _bits(want)
            assert torch.equal(got, want), (tuple(want.shape), rule)  # codes and scales: uint8
    assert not counters["graph_break"]


def test_in_place_quantize_compiles_in_one_graph() -> None:
    def f(x: torch.Tensor) -> torch.Tensor:
        y = x * 3
        return mixprec.quantize_(y, "e5m2", rounding="toward_zero")

    counters.clear()
    x = _x()
    assert torch.equal(_bits(torch.compile(f, fullgraph=True)(x)), _bits(f(x)))
    assert not counters["graph_break"]


# ----------------------------------------------------------------------------------------------
# fp8 current scaling: mixprec::current_scaled_round
# ----------------------------------------------------------------------------------------------


def _scaled_cases() -> list[torch.Tensor]:
    """Operands of per-tensor scaling: a wide range of magnitudes, a transposed (gap-free)
    one, all zeros (scale 1), an inf and a NaN (scale 1), an amax whose scale overflows (scale
    1), subnormal results, and a strided slice (gaps: traced, never the op)."""
    g = torch.Generator().manual_seed(3)
    wide = torch.randn(24, 40, generator=g) * torch.logspace(-30, 30, 40)
    tiny = torch.full((8, 8), 1e-44)
    with_inf, with_nan = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    with_inf[2, 3], with_nan[5, 1] = float("inf"), float("nan")
    sub = torch.randn(16, 16, generator=g)
    sub[0, 0] = 1e4  # the rest lands near the format's subnormals after scaling
    sliced = torch.randn(16, 40, generator=g)[:, ::2]
    return [wide, wide.t(), torch.zeros(4, 8), with_inf, with_nan, tiny, sub, sliced]


# read before tracing: FloatFormat.max is a cached_property, whose lock dynamo cannot trace
_FMAX = {n: float(mixprec.get_format(n).max) for n in ("float8_e4m3fn", "float8_e5m2")}


def _scaled_all(xs: list[torch.Tensor], fmt: str) -> list[torch.Tensor]:
    from mixprec.quantization.scaled import current_scaled_round_to

    f = mixprec.get_format(fmt)
    return [current_scaled_round_to(x, _FMAX[f.name], f) for x in xs]


def _scaled_by_definition(xs: list[torch.Tensor], fmt: str) -> list[torch.Tensor]:
    """The oracle: amax, scale and scaled rounding as eager torch ops (no fused C call)."""
    from mixprec.quantization.scaled import amax_to_scale, scaled_round_to, tensor_to_amax

    f = mixprec.get_format(fmt)
    return [scaled_round_to(x, amax_to_scale(tensor_to_amax(x), _FMAX[f.name]), f) for x in xs]


@needs_c
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_current_scaling_is_the_eager_kernel_in_one_op(backend: str, monkeypatch) -> None:
    """Every gap-free float32 operand traces to one ``mixprec::current_scaled_round`` call (all
    sizes here) with eager's bits in ``x``'s layout, whatever the scale comes out as; a strided
    operand keeps the traced ops. No graph break."""
    monkeypatch.setattr(elementwise, "EXTERN_MIN", 1)
    torch._dynamo.reset()
    counters.clear()
    xs = _scaled_cases()
    note, seen = _graph_ops(backend)
    f = torch.compile(_scaled_all, backend=note, fullgraph=True)
    for fmt in ("float8_e4m3fn", "float8_e5m2"):
        for x, got, want in zip(xs, f(xs, fmt), _scaled_by_definition(xs, fmt), strict=True):
            assert torch.equal(_bits(got), _bits(want)), (fmt, x.shape, x.stride())
            assert got.stride() == torch.empty_like(x).stride()
    assert seen.count("mixprec.current_scaled_round.default") == 2 * (len(xs) - 1)
    assert not counters["graph_break"]


@needs_c
def test_compiled_current_scaling_op_takes_the_threaded_path_when_eager_would(
    monkeypatch,
) -> None:
    """With several threads and an operand large enough to split, the op runs what eager code
    runs there (the parts' maxima, then each part rounded with the whole's scale on the pool's
    threads): the same bits."""
    monkeypatch.setattr(elementwise, "EXTERN_MIN", 1)
    monkeypatch.setattr(elementwise, "_FUSED_PARALLEL_MIN", 64)
    calls: list[int] = []
    kernel = elementwise._kernels.scaled_round_amax
    monkeypatch.setattr(
        elementwise._kernels, "scaled_round_amax", lambda *a: calls.append(a[2]) or kernel(*a)
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = torch.randn(64, 96, generator=torch.Generator().manual_seed(4)) * 1e-3
        e4m3 = "float8_e4m3fn"
        got = torch.compile(_scaled_all, backend="aot_eager", fullgraph=True)([x], e4m3)
        assert torch.equal(_bits(got[0]), _bits(_scaled_by_definition([x], e4m3)[0]))
        assert sorted(calls) == [x.numel() // 2] * 2  # two parts, one per thread
    finally:
        torch.set_num_threads(threads)


@needs_c
def test_compiled_graphs_scale_only_large_fp8_operands_by_the_kernel() -> None:
    """Below 32k elements the traced ops stay (inductor fuses them into the kernel making the
    operand); from 32k, the op."""

    def two(small: torch.Tensor, large: torch.Tensor) -> list[torch.Tensor]:
        return _scaled_all([small, large], "float8_e4m3fn")

    g = torch.Generator().manual_seed(5)
    small, large = torch.randn(64, 64, generator=g), torch.randn(512, 64, generator=g)
    torch._dynamo.reset()
    note, seen = _graph_ops("inductor")
    got = torch.compile(two, backend=note, fullgraph=True)(small, large)
    want = _scaled_by_definition([small, large], "float8_e4m3fn")
    assert torch.equal(_bits(got[1]), _bits(want[1]))
    assert seen.count("mixprec.current_scaled_round.default") == 1
