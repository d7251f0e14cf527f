"""The one rounding autograd Function: round forward with one function, the gradient with another.

Every rounding of the package that autograd must see goes through :func:`straight_through`:

* :func:`mixprec.quantize` on a tensor that requires grad: ``backward=torch.zeros_like`` (the
  true derivative of a rounding, as ``torch.round`` has it); under torch.compile the custom op
  ``mixprec::round`` carries that zero gradient itself (:mod:`mixprec.quantization.ops`);
* :func:`mixprec.fake_quantize`: ``backward=None`` (straight-through estimator) or a rounding of
  the gradient into ``grad_format``;
* the emulated precision regions (:mod:`mixprec.precision`): operand and result roundings whose
  backward rounds the incoming gradient into the policy's gradient format.

A gradient is rounded on its way back through :func:`round_gradient` (the Function's backward,
and the regions' hooks as :class:`GradientRounding`): under ``create_graph=True`` that rounding
is itself straight-through, so higher orders keep their path. In forward mode (torch.func
transforms, forward_ad: :func:`forward_mode`) the Function's subclass with a ``jvp`` rule
serves, the tangent taking the gradient's rule.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.autograd.forward_ad as forward_ad

#: A tensor-to-tensor function: a rounding, a gradient rounding, a recorder.
Rounder = Callable[[torch.Tensor], torch.Tensor]


class _StraightThrough(torch.autograd.Function):
    """forward: ``forward(x)``; backward: ``backward(grad)``, or ``grad`` itself when None.

    In torch.func's style (``setup_context`` apart from ``forward``, a generated vmap rule), so
    that ``grad``, ``vmap`` and ``jacrev`` can transform code that rounds: the rounders are
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
        return (
            (grad if backward is None or grad is None else round_gradient(grad, backward)),
            None,
            None,
        )


class _StraightThroughTangent(_StraightThrough):
    """:class:`_StraightThrough` with a forward-mode rule (``torch.func.jvp``, forward_ad): the
    tangent takes the backward's rule (straight through, rounded, or zero for quantize), as
    the gradient would. Used only in forward mode: dynamo refuses Functions with a ``jvp``."""

    @staticmethod
    def jvp(ctx: Any, x_t: torch.Tensor, *_: Any) -> torch.Tensor:
        backward = ctx.backward_fn
        return x_t if backward is None else backward(x_t)


def forward_mode() -> bool:
    """Is forward-mode differentiation possible here: inside a torch.func transform
    (``jvp``, and ``grad``/``vmap``, which nest), or with forward_ad's dual level on? Cost: two
    flag reads."""
    return _transforms_active() or forward_ad._current_level >= 0


_transforms_active = torch._C._are_functorch_transforms_active


def straight_through(
    x: torch.Tensor, forward: Rounder, backward: Rounder | None = None
) -> torch.Tensor:
    """``forward(x)`` in the forward pass; in the backward pass the incoming gradient goes
    through ``backward`` (``None``: unchanged, the straight-through estimator).

    ``forward`` runs with grad mode off and must return a fresh tensor (not ``x`` or a view of
    it). The result is part of the autograd graph whenever ``x`` requires grad. Cost: one
    autograd node; no copy beyond what ``forward`` and ``backward`` do.
    """
    if forward_mode():
        return _StraightThroughTangent.apply(x, forward, backward)
    return _StraightThrough.apply(x, forward, backward)


def round_gradient(grad: torch.Tensor, rounder: Rounder) -> torch.Tensor:
    """``rounder(grad)``: a gradient rounded on its way back (a hook, a backward).

    Where the backward builds a graph of its own (``create_graph=True``: gradient penalties,
    Hessian-vector products, second-order meta-learning), ``grad`` requires grad, and a plain
    rounding would cut that graph (a rounding's derivative is zero). There the rounding is
    straight-through too, and what flows back through it in the next order is rounded by the
    same ``rounder``: every order sees its gradients rounded, none loses its path. Cost: one
    autograd node, only under ``create_graph=True``."""
    if grad.requires_grad and torch.is_grad_enabled():
        return straight_through(grad, rounder, rounder)
    return rounder(grad)


class GradientRounding:
    """``round_gradient`` as a tensor hook (``t.register_hook(GradientRounding(r))``) or, with
    ``node=True``, as an autograd node's pre-hook (its one incoming gradient rounded)."""

    __slots__ = ("node", "rounder")

    def __init__(self, rounder: Rounder, *, node: bool = False) -> None:
        self.rounder = rounder
        self.node = node

    def __call__(self, grad: Any) -> Any:
        if self.node:
            g = grad[0]
            return None if g is None else (round_gradient(g, self.rounder),)
        if grad.requires_grad and torch.is_grad_enabled():  # (round_gradient, inlined)
            return straight_through(grad, self.rounder, self.rounder)
        return self.rounder(grad)
