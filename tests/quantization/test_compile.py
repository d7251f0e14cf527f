"""torch.compile traces quantize / fake_quantize through the mixprec::round custom op."""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import mixprec
from mixprec.quantization import round_to

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
