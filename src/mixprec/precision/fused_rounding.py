"""bf16 / fp16 roundings inductor can fuse, for regions torch.compile traces.

Under torch.compile a rounding is normally the custom op ``mixprec::round``: exact, but an
opaque call per rounding that inductor cannot fuse (a dispatcher call and a memory pass each).
For the two 16-bit formats the float32 round trip ``x.to(bf16).to(float32)`` rounds exactly
as :func:`mixprec.quantization.round_to` does (round to nearest even, overflow to inf,
subnormals kept) and fuses into the kernels around it, but inductor's CPU code generator
elides such a downcast-upcast pair inside a fused kernel unless
``torch._inductor.config.emulate_precision_casts`` is on (its CSE cache maps the upcast back
to the unrounded value; bit views and integer bit tricks are elided or left unvectorized too).
So the round trip is used only when that setting is on while dynamo traces; otherwise the
custom op keeps every rounding.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

from mixprec.formats.float_format import FloatFormat, get_format
from mixprec.precision._tracing import constant_under_compile, trace_cache

_DTYPES = (torch.bfloat16, torch.float16)


def inductor_keeps_casts() -> bool:
    """``torch._inductor.config.emulate_precision_casts`` (False when inductor is not loaded).
    Read at trace time (a constant of the graph): set it before compiling."""
    config = sys.modules.get("torch._inductor.config")
    return bool(getattr(config, "emulate_precision_casts", False))


constant_under_compile(inductor_keeps_casts)


@trace_cache(maxsize=64)
def cast_dtype(fmt: FloatFormat, saturate: bool) -> torch.dtype | None:
    """The torch dtype whose float32 round trip rounds exactly as ``round_to(x, fmt,
    saturate=saturate)`` (IEEE bf16 and fp16, not saturating), else None."""
    if saturate:
        return None
    for dtype in _DTYPES:
        if fmt == get_format(dtype):
            return dtype
    return None


def fused_rounder(
    fmt: FloatFormat, saturate: bool
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The fusable float32 round trip for ``fmt`` while tracing with casts kept, else None."""
    dtype = cast_dtype(fmt, saturate)
    if dtype is None or not inductor_keeps_casts():
        return None
    return lambda t: t.to(dtype).to(torch.float32)
