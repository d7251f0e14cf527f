"""quantize_backend("torch-compiled"): the torch.compile'd generic torch kernel.

One compiled function serves every format, rounding mode and size (format and mode are tensor
inputs, shapes are dynamic); it must give the eager torch kernel's bits (random bits included)
and the C kernel's (deterministic modes). Compiling costs seconds, once per test session (per
xdist worker): these tests are marked slow.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch._dynamo.utils import counters

from mixprec import quantize
from mixprec.formats import get_format
from mixprec.quantization import elementwise, torch_kernel
from mixprec.quantization.params import ROUNDING_CODES, ROUNDING_MODES, kernel_params

FORMATS = ["bfloat16", "float16", "tfloat32", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2",
           "float8_e5m2fnuz", "float8_e4m3b11fnuz", "float8_e8m0fnu", "float6_e3m2fn",
           "float6_e2m3fn", "float4_e2m1fn", "e3m0", "e5m30"]  # fmt: skip
OPTIONS = [{}, {"saturate": True}, {"subnormals": False}]
_ITYPE = {torch.float32: torch.int32, torch.float64: torch.int64}
C_BUILT = elementwise._kernels is not None


def _inputs(dtype: torch.dtype) -> torch.Tensor:
    """Random bit patterns (NaN payloads, inf, subnormals), values with few significant bits
    (ties and grid points of every format, at every exponent), ±0, ±inf, NaN."""
    g = torch.Generator().manual_seed(4)
    n = 1 << 13
    itype = _ITYPE[dtype]
    width = 64 if dtype == torch.float64 else 32
    half = 1 << (min(width, 63) - 1)  # int64 patterns: two draws' bits
    rand = torch.randint(-half, half, (n,), generator=g)
    if width == 64:
        rand = rand * 2 + torch.randint(0, 2, (n,), generator=g)
    rand = rand.to(itype)
    coarse = torch.randn(n, generator=g, dtype=torch.float64) * torch.exp2(
        torch.randint(-160, 140, (n,), generator=g).double()
    )
    keep = torch.randint(0, 6, (n,), generator=g)  # significant bits kept: ties at every M
    coarse = torch.ldexp(torch.round(torch.ldexp(coarse, keep - torch.frexp(coarse)[1])),
                         torch.frexp(coarse)[1] - keep)  # fmt: skip
    specials = [0.0, -0.0, float("inf"), -float("inf"), float("nan"), 2.0**-149, -(2.0**-149),
                2.0**-127, 1.5 * 2.0**-127]  # fmt: skip
    return torch.cat([rand.view(dtype), coarse.to(dtype), torch.tensor(specials, dtype=dtype)])


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_ITYPE[t.dtype])


def _run(set_backend: Callable[[str], str], backend: str, x: torch.Tensor, fmt: str,
         rounding: str, options: dict[str, bool]) -> torch.Tensor:  # fmt: skip
    set_backend(backend)
    gen = torch.Generator().manual_seed(9) if rounding == "stochastic" else None
    return quantize(x, fmt, rounding=rounding, generator=gen, **options)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rounding", ROUNDING_MODES)
def test_compiled_kernel_bits_match_eager_and_c(
    rounding: str, dtype: torch.dtype, set_backend: Callable[[str], str]
) -> None:
    x = _inputs(dtype)
    for fmt in FORMATS:
        for options in OPTIONS:
            got = _run(set_backend, "torch-compiled", x, fmt, rounding, options)
            eager = _run(set_backend, "torch", x, fmt, rounding, options)
            assert torch.equal(_bits(got), _bits(eager)), (fmt, options)
            if rounding != "stochastic" and C_BUILT:  # the C kernel's stream differs
                c = _run(set_backend, "auto", x, fmt, rounding, options)
                assert torch.equal(_bits(got), _bits(c)), (fmt, options)


@pytest.mark.slow
def test_no_recompile_across_formats_modes_and_sizes(set_backend: Callable[[str], str]) -> None:
    """After one call per dtype and per kind (deterministic / stochastic), every format, mode,
    option and size reuses those graphs."""
    set_backend("torch-compiled")
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    for dtype in (torch.float32, torch.float64):
        for rounding in ("nearest", "stochastic"):
            quantize(x.to(dtype), "bfloat16", rounding=rounding)  # warm: compiles at most 4
    before = counters["stats"]["unique_graphs"]
    for dtype in (torch.float32, torch.float64):
        for n in (3, 517, 4096):
            xs = x[:n].to(dtype)
            for fmt in FORMATS:
                for rounding in ROUNDING_MODES:
                    quantize(xs, fmt, rounding=rounding, saturate=fmt == "float8_e4m3fn")
    assert counters["stats"]["unique_graphs"] == before
    assert not torch_kernel.compiled_kernel.failed


def test_compile_failure_falls_back_to_eager(
    monkeypatch: pytest.MonkeyPatch, set_backend: Callable[[str], str]
) -> None:
    """A compiler failure warns once; the eager kernel's bits come out, then and after."""

    def broken(*args: object) -> torch.Tensor:
        raise RuntimeError("no C++ compiler")

    kernel = torch_kernel._CompiledKernel()
    kernel.fn = broken
    monkeypatch.setattr(torch_kernel, "compiled_kernel", kernel)
    x = _inputs(torch.float32)
    with pytest.warns(RuntimeWarning, match="torch.compile of the quantize kernel failed"):
        first = _run(set_backend, "torch-compiled", x, "e4m3", "stochastic", {})
    second = _run(set_backend, "torch-compiled", x, "e2m1", "up", {})
    assert kernel.failed
    assert torch.equal(_bits(first), _bits(_run(set_backend, "torch", x, "e4m3", "stochastic", {})))
    assert torch.equal(_bits(second), _bits(_run(set_backend, "torch", x, "e2m1", "up", {})))


@pytest.mark.slow
@pytest.mark.parametrize("simdlen", [None, 256])
def test_compiled_kernel_bits_with_avx2_code(simdlen: int | None) -> None:
    """The generic function compiled with inductor's default vector code and with its AVX2 code
    (``cpp.simdlen`` 256, what an AVX2-only CPU gets) gives the eager kernel's bits. With
    ``torch.where`` selects, inductor's AVX2 code returned wrong values for most inputs."""
    x = _inputs(torch.float32).contiguous()
    options = {} if simdlen is None else {"cpp.simdlen": simdlen}
    fn = torch.compile(
        torch_kernel.quantize_bits_generic, dynamic=True, fullgraph=True, options=options
    )
    for fmt in ("bfloat16", "float8_e4m3fn", "float4_e2m1fn", "float8_e8m0fnu"):
        for rounding in ("nearest", "toward_zero", "up", "odd"):
            p = kernel_params(get_format(fmt), 32, False, True, rounding)
            prm = torch_kernel._param_tensor(p, ROUNDING_CODES[rounding], x.device)
            want = torch_kernel.quantize_bits(x, p, rounding, None)
            assert torch.equal(_bits(fn(x, prm, None)), _bits(want)), (fmt, rounding)
