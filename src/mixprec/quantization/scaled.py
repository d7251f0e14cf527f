"""Per-tensor scaled rounding: the arithmetic of fp8 current scaling.

An operand ``t`` is rounded as ``round(t * s) / s`` in its format (nearest, saturating) with
``s = fmax / max|t|`` computed as torch computes it in float32, and ``s = 1`` where that is not
a positive finite number (zeros, inf or NaN in ``t``, or an amax so small that ``s``
overflows). The data flow has one function per step, :func:`tensor_to_amax`,
:func:`amax_to_scale`, :func:`scaled_round_to`, and :func:`current_scaled_round_to` runs all
three the cheapest exact way there is where it runs:

* eager CPU code: one C call for a float32 operand (an amax pass, then one read and one write),
  else the amax and the scale as Python floats (no device to wait for);
* a compiled CPU graph: an operand of 32k elements or more (float32, laid out without gaps)
  becomes one call of the op ``mixprec::current_scaled_round``, which runs that C call; smaller
  ones stay traced tensor ops that inductor fuses with their neighbours;
* elsewhere (CUDA; a torch.func transform's wrapper, which has no memory of its own and whose
  values vmap batches: one amax per sample): tensor ops, with no device sync.

Every path gives the same bits, but one: inductor may compile the traced ``x / s`` as
``x * (1 / s)``, so a small operand in a compiled graph can land one step away in an element.
The recipes in :mod:`mixprec.precision.fp8` (margins, power-of-two scales, delayed scaling)
build on these functions.
"""

from __future__ import annotations

import math
from ctypes import c_float

import torch

from mixprec.formats.float_format import FloatFormat
from mixprec.quantization import ops
from mixprec.quantization.elementwise import (
    _gap_free,
    _is_functorch_wrapped,
    extern_when_compiled,
    fused_current_scaled_round,
    round_to,
)


def tensor_to_amax(t: torch.Tensor) -> torch.Tensor:
    """``max |t|`` as a float32 0-dim tensor (NaN if any element is NaN); no device sync."""
    amax = t.detach().abs().amax()
    return amax if amax.dtype == torch.float32 else amax.float()


def amax_to_scale(amax: torch.Tensor, fmax: float) -> torch.Tensor:
    """``fmax / amax`` where that is in (0, inf), else 1, as a tensor: four tiny ops.

    ``s`` is in (0, inf) exactly when amax is finite and positive and ``s`` does not overflow
    (amax = inf gives 0, amax = 0 gives inf, NaN stays NaN)."""
    s = fmax / amax
    return torch.where((s > 0) & (s < float("inf")), s, 1.0)


def amax_value(t: torch.Tensor) -> float:
    """``max |t|`` as a Python float (NaN if any element is NaN): one pass (aminmax), no
    temporary. Reading it is free on the CPU and a device sync elsewhere: CPU tensors only."""
    lo, hi = torch.aminmax(t.detach())
    a, b = float(lo), float(hi)
    return math.nan if a != a or b != b else max(-a, b)


def amax_to_scale_value(amax: float, fmax: float) -> float:
    """:func:`amax_to_scale` on Python floats, bit for bit: torch computes ``fmax / amax`` as
    ``reciprocal(amax) * fmax`` in float32. The double quotient rounded to float32 is the
    float32 quotient (53 >= 2 * 24 + 2 bits), and the product of that 24-bit reciprocal and an
    fmax of at most 8 significant bits is exact in double, so one rounding to float32 each
    gives torch's values; ``c_float`` rounds (overflowing to inf) without raising."""
    r = c_float(1.0 / amax).value if amax != 0.0 else math.inf
    sc = c_float(r * fmax).value
    return sc if 0.0 < sc < math.inf else 1.0


def scaled_round_to(t: torch.Tensor, s: torch.Tensor | float, fmt: FloatFormat) -> torch.Tensor:
    """``round(t * s) / s`` in ``fmt`` (nearest, saturating), in float32 arithmetic, in ``t``'s
    dtype; detached. One temporary: the product, rounded and divided in place (a 0-dim tensor
    and a Python float are both scalar operands of the float32 kernels: the same bits)."""
    work = t.detach().float() * s
    round_to(work, fmt, saturate=True, out=work)
    work.div_(s)
    return work if work.dtype == t.dtype else work.to(t.dtype)


def current_scaled_round_to(t: torch.Tensor, fmax: float, fmt: FloatFormat) -> torch.Tensor:
    """``t`` rounded to ``fmt`` through its own scale ``fmax / max|t|`` (see the module
    docstring for the paths); detached, in ``t``'s dtype. No argument checks: ``fmt`` is a
    resolved format of at most 8 bits and ``fmax`` its largest value (or less, for headroom).

    Cost: an amax pass, then one read and one write of ``t``; no device sync."""
    if torch.compiler.is_compiling():
        if t.dtype == torch.float32 and _gap_free(t) and extern_when_compiled(t):
            return ops.current_scaled_round_op(t.detach(), fmt, fmax)
    elif t.is_cpu and t.numel() and not _is_functorch_wrapped(t):
        fused = (
            fused_current_scaled_round(t.detach(), fmax, fmt) if t.dtype == torch.float32 else None
        )
        if fused is not None:
            return fused[0]
        return scaled_round_to(t, amax_to_scale_value(amax_value(t), fmax), fmt)
    return scaled_round_to(t, amax_to_scale(tensor_to_amax(t), fmax), fmt)
