"""Gradient probe: which gradients of a model's GEMMs would flush to zero in a format.

An fp32 forward/backward pass records, through ordinary module hooks on every GEMM module
(``nn.Linear`` and the models' :class:`~mixprec.demo.models.MatMul`), the gradient flowing out of
each GEMM input, into each GEMM output, and the GEMM weights' and biases' gradients: the tensors a
mixed-precision backward pass holds in its gradient format. :meth:`GradientProbe.flushed` then
rounds them with :func:`mixprec.quantize` at a loss scale and counts nonzero -> zero.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

import mixprec
from mixprec.demo.models import GEMM_MODULES
from mixprec.formats import FloatFormat, get_format


@dataclass(frozen=True)
class GradientProbe:
    """Gradients of one fp32 forward/backward pass at loss scale 1, one tensor per GEMM operand.

    ``act``: gradients flowing into and out of every GEMM, and its weight's and bias's (the
    tensors a mixed-precision backward pass holds in its gradient format); ``weight``: every
    parameter's gradient. All flattened.
    """

    act: tuple[torch.Tensor, ...]
    weight: tuple[torch.Tensor, ...]

    def flushed(
        self, fmt: str | FloatFormat, *, scale: float = 1.0, per_tensor: bool = False
    ) -> tuple[float, float]:
        """Fractions of nonzero (activation, weight) gradients that round to zero in ``fmt``
        after multiplying by ``scale`` (then by a per-tensor power of two if ``per_tensor``)."""
        f = get_format(fmt)
        return _flushed(self.act, f, scale, per_tensor), _flushed(self.weight, f, scale, per_tensor)


def _pow2_scale(t: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """Power-of-two factor putting ``max|t|`` in the top binade of ``fmt`` (1 if t is all zero).

    A power of two makes scaling and unscaling exact; one reduction, no host sync.
    """
    amax = t.detach().abs().amax().float()
    ok = torch.isfinite(amax) & (amax > 0)
    exp = torch.floor(torch.log2(fmt.max / torch.where(ok, amax, torch.ones_like(amax))))
    return torch.where(ok, torch.exp2(exp.clamp(-126, 126)), torch.ones_like(amax)).to(t.dtype)


def _flushed(
    parts: tuple[torch.Tensor, ...], fmt: FloatFormat, scale: float, per_tensor: bool
) -> float:
    nonzero = 0
    lost = 0
    for t in parts:
        t = t.double() * scale  # float64: the scaled value itself must not underflow
        if per_tensor:
            t = t * _pow2_scale(t, fmt).double()
        nz = t != 0
        q = mixprec.quantize(t, fmt, saturate=True)
        nonzero += int(nz.sum())
        lost += int((nz & (q == 0)).sum())
    return lost / nonzero if nonzero else 0.0


def _flat(g: torch.Tensor) -> torch.Tensor:
    return g.detach().float().reshape(-1).clone()


def _record_gemm_grads(model: torch.nn.Module, acts: list[torch.Tensor]) -> list[Any]:
    """Hooks on every GEMM module that append its input and output gradients to ``acts``.

    Each floating input that requires grad is replaced by a view of itself (same values, its
    own autograd node), so its hook sees this GEMM's gradient alone even when the input feeds
    other ops too. Returns the hook handles.
    """

    def record(g: torch.Tensor) -> None:
        acts.append(_flat(g))

    def watch(t: Any) -> Any:
        if not (isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad):
            return t
        t = t.view_as(t)
        t.register_hook(record)
        return t

    def pre_hook(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(watch(a) for a in args)

    def post_hook(module: torch.nn.Module, args: tuple[Any, ...], out: Any) -> None:
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(record)

    handles = []
    for m in model.modules():
        if isinstance(m, GEMM_MODULES):
            handles += [m.register_forward_pre_hook(pre_hook), m.register_forward_hook(post_hook)]
    return handles


def probe_gradients(
    model: torch.nn.Module, loss_fn: Callable[[torch.nn.Module], torch.Tensor]
) -> GradientProbe:
    """One fp32 forward/backward of ``loss_fn(model)`` recording every GEMM's gradients.

    A GEMM module's weight and bias gradients are read from ``.grad`` after the pass (a module
    called twice in one forward contributes their sum once). The model's ``.grad`` fields are
    left as they were and the hooks removed. Cost: one extra training step in fp32.
    """
    params = list(model.parameters())
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    acts: list[torch.Tensor] = []
    handles = _record_gemm_grads(model, acts)
    try:
        loss_fn(model).float().backward()
    finally:
        for h in handles:
            h.remove()
    for m in model.modules():
        if isinstance(m, GEMM_MODULES):
            acts += [_flat(p.grad) for p in m.parameters(recurse=False) if p.grad is not None]
    weights = tuple(_flat(p.grad) for p in params if p.grad is not None)
    for p, g in zip(params, saved, strict=True):
        p.grad = g
    return GradientProbe(tuple(acts), weights)


def _log2_magnitudes(t: torch.Tensor) -> torch.Tensor:
    t = t[t != 0].abs().double()
    return torch.log2(t) if t.numel() else t


def log2_histogram(t: torch.Tensor, lo: int = -100, hi: int = 30) -> tuple[list[int], list[int]]:
    """Counts of nonzero ``|t|`` per binade [2^e, 2^(e+1)) for e in [lo, hi); zeros left out.

    Returns (edges, counts); values below 2^lo fall in the first bin, above 2^hi in the last.
    """
    e = torch.floor(_log2_magnitudes(t)).clamp(lo, hi - 1).long() - lo
    counts = torch.bincount(e, minlength=hi - lo) if e.numel() else torch.zeros(hi - lo)
    return list(range(lo, hi + 1)), [int(c) for c in counts]
