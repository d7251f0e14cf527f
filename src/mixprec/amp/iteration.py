"""One training iteration under ``mixprec.amp``: :func:`scale_loss` around each backward, then
the wrapped ``optimizer.step()``.

``scale_loss`` sets the gradients accumulated so far aside, yields ``loss * scale``, and on exit
hands the new gradients to the loss scaler through its public seam
(:meth:`~mixprec.amp.LossScaler.unscale_grads_` per optimizer, one
:meth:`~mixprec.amp.LossScaler.read_found_infs` for all, then ``update()``), folds them into the
accumulated ones and records the overflow. ``optimizer.step`` (an instance attribute set by
``initialize``) skips the step after an overflow and otherwise keeps the model in step with the
masters.

Costs per ``scale_loss``: one fused check+unscale pass over the new gradients (O2: plus a cast or
rounding of the model gradients into float32 masters), one device sync to read the overflow
flags (as torch.amp's ``scaler.step``), one all-reduce of a few flags when ``torch.distributed``
is initialised. Per ``optimizer.step()``: O2 one copy (rounding) of the masters into the model;
O3 emulated one rounding of the parameters and the optimizer state.
"""

from __future__ import annotations

import contextlib
import types
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from mixprec.amp.masters import after_step, round_
from mixprec.amp.scaling import LossScaler
from mixprec.amp.state import AmpOptimizerState, as_list, optimizer_state

# ----------------------------------------------------------------------------------------------
# optimizer.step
# ----------------------------------------------------------------------------------------------


def _amp_step(optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
    """``optimizer.step`` under mixprec.amp: skip after an overflow, copy masters back."""
    st = optimizer_state(optimizer, "optimizer.step()")
    if "closure" in kwargs or (args and callable(args[0])):
        raise RuntimeError(
            "optimizer.step(closure) is not supported under mixprec.amp: the closure's "
            "backward would bypass scale_loss. Compute the loss, use scale_loss, then step()."
        )
    if not st.pending:
        raise RuntimeError(
            "optimizer.step() called without a `with mixprec.scale_loss(loss, optimizer)` "
            "backward since the last step (step called twice?). Under mixprec.amp every step "
            "needs gradients that went through scale_loss."
        )
    skip = st.found
    st.pending = False
    st.found = False
    st.window_open = False
    st.last_step_skipped = skip
    if skip:
        st.skipped_steps += 1
        return None
    ret = st.orig_step(*args, **kwargs)
    after_step(st)
    return ret


def install_step(st: AmpOptimizerState) -> None:
    """Wrap ``optimizer.step`` per instance (a bound method; nothing global is patched)."""
    st.optimizer.step = types.MethodType(_amp_step, st.optimizer)  # type: ignore[method-assign]


# ----------------------------------------------------------------------------------------------
# scale_loss
# ----------------------------------------------------------------------------------------------


def _begin(st: AmpOptimizerState) -> None:
    """Before a backward: set accumulated (already unscaled) gradients aside. After
    ``delay_unscale`` blocks nothing moves: their gradients stay in ``.grad``, scaled, and the
    new ones add to them (what DDP's ``no_sync`` accumulation needs)."""
    if st.delayed:
        return
    cfg = st.handle.config
    with torch.no_grad():
        if cfg.master_weights:
            pairs = st.pairs()
            if not st.window_open:
                # a new accumulation window: the masters' gradients start from zero, whatever
                # zero_grad the user called (model or optimizer)
                for _, master in pairs:
                    master.grad = None
                st.window_open = True
            for model_p, master in pairs:
                g = model_p.grad
                if g is not None:  # an unscaled backward outside scale_loss: keep it
                    g32 = g.detach().to(torch.float32)
                    master.grad = g32.clone() if master.grad is None else master.grad.add_(g32)
                    model_p.grad = None
        for p in st.direct():
            if p.grad is not None:
                st.stash[id(p)] = p.grad
                p.grad = None


def _abort(st: AmpOptimizerState) -> None:
    """The backward raised: put the set-aside gradients back, drop partial ones."""
    for p in st.direct():
        old = st.stash.pop(id(p), None)
        if old is not None:
            p.grad = old
    st.stash.clear()
    for model_p, _ in st.pairs():
        model_p.grad = None


def _direct_grads(st: AmpOptimizerState, direct: list[torch.Tensor]) -> list[torch.Tensor]:
    """The new gradients of ``direct``, the parameters the optimizer updates in place (dense
    tensors to unscale: a sparse gradient is coalesced and unscaled through its values)."""
    cfg = st.handle.config
    grads = []
    for p in direct:
        g = p.grad
        if g is None:
            continue
        if g.is_sparse:
            p.grad = g = g.coalesce()
            g = _to_unscale(g)
        if cfg.emulate and cfg.opt_level == "O3" and id(p) in st.handle.lowered:
            round_(g, cfg.compute)  # the gradient is stored in compute, like the weight
        grads.append(g)
    return grads


def _master_grads(st: AmpOptimizerState) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """O2: the model's new gradients, stored in compute like the weights and then as float32,
    taken off the model: ``(master, float32 gradient)`` pairs, still scaled. A sparse gradient
    (``nn.Embedding(sparse=True)``) is coalesced in its own dtype first (duplicate rows summed
    where the model keeps them, as torch's GradScaler does for float16 before its check) and
    stays sparse: the master's gradient is a float32 sparse tensor."""
    cfg = st.handle.config
    out = []
    for model_p, master in st.pairs():
        g = model_p.grad
        if g is None:
            continue
        if g.is_sparse:
            g32 = g.detach().coalesce().to(torch.float32, copy=True)
            dense = g32._values()
        else:
            g32 = dense = g.detach().to(torch.float32, copy=True)
        if cfg.emulate:
            round_(dense, cfg.compute)  # stored in compute, like the weight
        model_p.grad = None
        out.append((master, g32))
    return out


def _to_unscale(g: torch.Tensor) -> torch.Tensor:
    """The dense tensor holding ``g``'s values: a coalesced sparse gradient's values."""
    return g._values() if g.is_sparse else g


def _unscale_new(st: AmpOptimizerState, scaler: LossScaler) -> None:
    """After a backward: unscale+check the new gradients (through the scaler, flag left local
    for one all-reduce over all optimizers), then fold them into the accumulated ones."""
    with torch.no_grad():
        direct = st.direct()
        new = _direct_grads(st, direct)
        masters_new = _master_grads(st)
        master_vals = [_to_unscale(g) for _, g in masters_new]
        scaler.unscale_grads_(st.optimizer, new + master_vals, all_reduce=False)
        for master, g32 in masters_new:
            if master.grad is None:
                master.grad = g32
            else:
                master.grad.add_(g32)
        stashed = [(p, st.stash.pop(id(p))) for p in direct if id(p) in st.stash]
        for p, old in stashed:
            if p.grad is None:
                p.grad = old
            else:
                p.grad.add_(old)
        st.stash.clear()


def _loss_states(
    loss: torch.Tensor,
    optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
    loss_id: int,
) -> tuple[list[AmpOptimizerState], LossScaler]:
    """Validate ``scale_loss``'s arguments; the optimizers' states and the scaler to use."""
    opt_list, _ = as_list(optimizers, "optimizers", torch.optim.Optimizer)
    unique = list({id(o): o for o in opt_list}.values())  # each optimizer is unscaled once
    states = [optimizer_state(o, "scale_loss") for o in unique]
    handle = states[0].handle
    if any(st.handle is not handle for st in states):
        raise ValueError(
            "scale_loss got optimizers from different mixprec.initialize calls; pass them to "
            "one initialize (optimizers=[...]) to share loss scalers"
        )
    n = handle.config.num_losses
    if isinstance(loss_id, bool) or not isinstance(loss_id, int) or not 0 <= loss_id < n:
        raise ValueError(f"loss_id must be an int in [0, {n}) (num_losses={n}), got {loss_id!r}")
    if not isinstance(loss, torch.Tensor) or not loss.dtype.is_floating_point:
        raise TypeError(
            f"loss must be a floating-point tensor, got {type(loss).__name__}"
            + (f" of dtype {loss.dtype}" if isinstance(loss, torch.Tensor) else "")
        )
    return states, handle.scalers[loss_id]


def _store_delayed(st: AmpOptimizerState) -> None:
    """After a ``delay_unscale`` block, emulated: the lowered parameters' gradients (scaled)
    are stored in compute, as a native model's ``.grad`` of that dtype holds them while they
    accumulate."""
    cfg = st.handle.config
    if not cfg.emulate or cfg.opt_level not in ("O2", "O3"):
        return
    with torch.no_grad():
        if cfg.master_weights:
            grads = [m.grad for m, _ in st.pairs()]
        else:
            grads = [p.grad for p in st.direct() if id(p) in st.handle.lowered]
        for g in grads:
            if g is not None and not g.is_sparse:
                round_(g, cfg.compute)


def _sharded(st: AmpOptimizerState) -> bool:
    """Are the optimizer's parameters DTensor shards (FSDP2)?"""
    params = st.optimizer.param_groups[0]["params"] if st.optimizer.param_groups else []
    return bool(params) and hasattr(params[0], "to_local")


def _warn_distributed_accumulation(states: list[AmpOptimizerState]) -> None:
    """Once per optimizer: accumulation under torch.distributed without ``delay_unscale``
    (DDP's ``no_sync`` blocks would leave their gradients unreduced: ranks diverge)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    for st in states:
        # a second block before the step; sharded (FSDP2) parameters get their gradients
        # only from the last backward's reduce-scatter, which covers the window
        if st.pending and not st.warned_sync and not _sharded(st):
            st.warned_sync = True
            warnings.warn(
                "gradient accumulation with mixprec.scale_loss under torch.distributed: each "
                "scale_loss unscales its own backward's gradients, so gradients of micro-batches "
                "run under DistributedDataParallel.no_sync() are never all-reduced and the ranks "
                "diverge. Pass delay_unscale=True to every scale_loss of the window but the "
                "last (their gradients then accumulate scaled, and the last backward's "
                "all-reduce covers them), or delay_unscale=False where every backward syncs.",
                UserWarning,
                stacklevel=4,
            )


@contextlib.contextmanager
def scale_loss(
    loss: torch.Tensor,
    optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
    loss_id: int = 0,
    *,
    delay_unscale: bool | None = None,
) -> Iterator[torch.Tensor]:
    """Context manager yielding ``loss * scale``; call ``.backward()`` on it inside.

    On exit the new gradients of every given optimizer are unscaled (into the float32 masters
    at O2) and checked for NaN/inf, folded into gradients accumulated by earlier ``scale_loss``
    blocks since the last step (gradient accumulation, several losses), the overflow flag is
    all-reduced across ranks when ``torch.distributed`` is initialised, and scaler ``loss_id``
    is updated. An overflow makes the next ``optimizer.step()`` of the optimizers whose
    gradients overflowed a no-op (recorded in :func:`last_step_skipped`).

    ``delay_unscale=True`` (apex's name) leaves the backward's gradients in ``.grad``, scaled,
    and does nothing on exit (no check, no unscale, no scale update): the next ``scale_loss``
    without it adds its gradients to them and unscales and checks them all. Use it for every
    micro-batch of an accumulation window but the last when they run under DDP's ``no_sync()``:
    the last backward's all-reduce then covers the whole window. (Without it each block is
    unscaled on its own and the ``no_sync`` gradients never reach the all-reduce; under
    torch.distributed, accumulating with the default ``None`` warns once.)

    Raises :class:`~mixprec.amp.DivergenceError` on exit for a NaN/inf loss at scale <= 1
    (after recording the skip). Cost: one fused pass over the new gradients and one device sync.
    """
    if delay_unscale is not None and not isinstance(delay_unscale, bool):
        raise TypeError(f"delay_unscale must be a bool or None, got {delay_unscale!r}")
    states, scaler = _loss_states(loss, optimizers, loss_id)
    if delay_unscale is None:
        _warn_distributed_accumulation(states)
    for st in states:
        _begin(st)
    try:
        yield scaler.scale(loss)
    except BaseException:
        for st in states:
            _abort(st)
        raise
    if delay_unscale:
        for st in states:
            st.delayed = True
            _store_delayed(st)
        return
    for st in states:
        st.delayed = False
        _unscale_new(st, scaler)
    flags = scaler.read_found_infs([st.optimizer for st in states])
    for st, found in zip(states, flags, strict=True):
        st.pending = True
        st.found = st.found or found
    # warnings point at the user's `with`: scale_loss <- contextlib __exit__ <- the user
    scaler.update(stacklevel=3)
