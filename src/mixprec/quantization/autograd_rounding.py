"""The one rounding autograd Function: round forward with one function, the gradient with another.

Every rounding of the package that autograd must see goes through :func:`straight_through`:

* :func:`mixprec.quantize` on a tensor that requires grad: ``backward=torch.zeros_like`` (the
  true derivative of a rounding, as ``torch.round`` has it); under torch.compile the custom op
  ``mixprec::round`` carries that zero gradient itself (:mod:`mixprec.quantization.ops`);
* :func:`mixprec.fake_quantize`: ``backward=None`` (straight-through estimator) or a rounding of
  the gradient into ``grad_format``;
* the emulated precision regions (:mod:`mixprec.precision`): operand and result roundings whose
  backward rounds the incoming gradient into the policy's gradient format.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

#: A tensor-to-tensor function: a rounding, a gradient rounding, a recorder.
Rounder = Callable[[torch.Tensor], torch.Tensor]


class _StraightThrough(torch.autograd.Function):
    """forward: ``forward(x)``; backward: ``backward(grad)``, or ``grad`` itself when None.

    In torch.func's style (``setup_context`` apart from ``forward``, a generated vmap rule),
    so that ``grad``, ``vmap`` and ``jacrev`` can transform code that rounds: the rounders are
    elementwise or blockwise functions written in torch ops, which vmap batches as they are."""

    generate_vmap_rule = True

    @staticmethod
    def forward(  # type: ignore[override]
        x: torch.Tensor, forward: Rounder, backward: Rounder | None
    ) -> torch.Tensor:
        return forward(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.backward_fn = inputs[2]

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, None, None]:
        backward = ctx.backward_fn
        return (grad if backward is None or grad is None else backward(grad)), None, None


def straight_through(
    x: torch.Tensor, forward: Rounder, backward: Rounder | None = None
) -> torch.Tensor:
    """``forward(x)`` in the forward pass; in the backward pass the incoming gradient goes
    through ``backward`` (``None``: unchanged, the straight-through estimator).

    ``forward`` runs with grad mode off and must return a fresh tensor (not ``x`` or a view of
    it). The result is part of the autograd graph whenever ``x`` requires grad. Cost: one
    autograd node; no copy beyond what ``forward`` and ``backward`` do.
    """
    return _StraightThrough.apply(x, forward, backward)
