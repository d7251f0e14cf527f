"""Weights in the compute format and float32 master weights (O2), rounded weights and optimizer
state (O3): put in place by ``initialize``, kept consistent after every step, taken back out by
``deinitialize``.

At O2 the optimizer's ``param_groups`` hold float32 masters instead of the model's lowered
parameters; the model holds ``round(master)`` after every step. Emulated storage is float32
holding values exactly representable in ``compute``; native storage is the torch dtype.

Parameters sharded by FSDP2 (``fully_shard``: DTensors) work too: rounding runs on each rank's
local shard (:func:`local`), and masters built from sharded parameters are shards themselves.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from mixprec.amp.config import AmpConfig
from mixprec.amp.state import AmpOptimizerState
from mixprec.formats import FloatFormat
from mixprec.quantization import quantize, quantize_


def local(t: torch.Tensor) -> torch.Tensor:
    """The plain tensor holding ``t``'s values on this rank: a DTensor's local shard (same
    storage) or ``t`` itself. mixprec's rounding kernels take plain tensors only."""
    to_local = getattr(t, "to_local", None)
    return t if to_local is None else to_local()


def round_(t: torch.Tensor, fmt: FloatFormat) -> None:
    """Round ``t`` into ``fmt`` in place (its local shard when sharded)."""
    quantize_(local(t), fmt)


def rounded_copy_(dst: torch.Tensor, src: torch.Tensor, fmt: FloatFormat) -> None:
    """``dst = round(src)``: one pass for plain tensors; copy then round for shards."""
    if local(dst) is dst and local(src) is src:
        quantize(src, fmt, out=dst)
    else:
        dst.copy_(src)
        round_(dst, fmt)


def lower_(p: torch.nn.Parameter, config: AmpConfig) -> None:
    """Store a parameter in the compute format (native dtype, or rounded float32)."""
    if config.compute.name == "float32":
        return
    dt = config.storage_dtype
    if dt != torch.float32:
        p.data = p.data.to(dt)
    else:
        round_(p.data, config.compute)


def install_masters(st: AmpOptimizerState, lowered: Mapping[int, torch.nn.Parameter]) -> None:
    """Replace the lowered parameters in the optimizer's ``param_groups`` by float32 masters
    (copies of their current, unrounded values; existing optimizer state moves along).
    Cost: one float32 copy of every lowered parameter."""
    opt = st.optimizer
    for group in opt.param_groups:
        new_params = []
        for p in group["params"]:
            if id(p) in lowered:
                master = st.master_of.get(id(p))
                if master is None:
                    master = torch.nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
                    st.master_of[id(p)] = master
                    st.model_of[id(master)] = p
                    if p in opt.state:  # carry existing optimizer state over
                        opt.state[master] = opt.state.pop(p)
                new_params.append(master)
            else:
                new_params.append(p)
        group["params"] = new_params


def remove_masters(st: AmpOptimizerState) -> None:
    """Undo :func:`install_masters`: the model's parameters take the masters' values (float32
    again), gradients and optimizer state, and go back into ``param_groups``."""
    opt = st.optimizer
    with torch.no_grad():
        for group in opt.param_groups:
            new = []
            for p in group["params"]:
                model_p = st.model_of.get(id(p))
                if model_p is None:
                    new.append(p)
                    continue
                model_p.data = p.detach().clone()
                model_p.grad = None if p.grad is None else p.grad.clone()
                if p in opt.state:
                    opt.state[model_p] = opt.state.pop(p)
                new.append(model_p)
            group["params"] = new


def round_optimizer_state(st: AmpOptimizerState, lowered: Mapping[int, torch.nn.Parameter]) -> None:
    """O3: optimizer state tensors shaped like their (lowered) parameter live in compute
    (nothing with ``optimizer_state="float32"``)."""
    cfg = st.handle.config
    if not cfg.rounds_optimizer_state:
        return
    with torch.no_grad():
        for p in st.direct():
            if id(p) not in lowered:
                continue
            for key, v in st.optimizer.state.get(p, {}).items():
                if isinstance(v, torch.Tensor) and v.shape == p.shape and key != "step":
                    if v.dtype != p.dtype:
                        st.optimizer.state[p][key] = v.to(p.dtype)
                    if cfg.emulate and v.dtype.is_floating_point:
                        round_(st.optimizer.state[p][key], cfg.compute)


def after_step(st: AmpOptimizerState) -> None:
    """After the optimizer updated: O2 copies the masters into the model (rounded into
    ``compute``); emulated O3 rounds the parameters and the optimizer state.
    Cost: O2 one copy of the masters; emulated O3 one rounding pass."""
    cfg = st.handle.config
    with torch.no_grad():
        if cfg.master_weights:
            pairs = st.pairs()
            if not pairs:
                return
            if cfg.emulate:
                for model_p, master in pairs:
                    rounded_copy_(model_p.data, master.data, cfg.compute)
            else:
                _copy_all([m.data for m, _ in pairs], [p.data for _, p in pairs])
        elif cfg.opt_level == "O3" and cfg.emulate:
            lowered = st.handle.lowered
            params = [p for p in st.direct() if id(p) in lowered]
            for p in params:
                round_(p.data, cfg.compute)
            round_optimizer_state(st, lowered)


def _copy_all(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    """``dst[i].copy_(src[i])``: one foreach call for plain tensors; per tensor for tensor
    subclasses (FSDP2's DTensor shards have no sharding rule for the foreach op)."""
    if all(type(t) is torch.Tensor for t in (*dst, *src)):
        torch._foreach_copy_(dst, src)
        return
    for d, s in zip(dst, src, strict=True):
        d.copy_(s)


def adopt_model_values(states: list[AmpOptimizerState]) -> None:
    """Masters take the model's values where the model no longer equals round(master) (it was
    loaded or assigned since the last step)."""
    for st in states:
        cfg = st.handle.config
        for model_p, master in st.pairs():
            master_v, model_v = local(master.detach()), local(model_p.detach())
            expect = quantize(master_v, cfg.compute) if cfg.emulate else master_v.to(model_v.dtype)
            if not torch.equal(expect, model_v):
                master.data.copy_(model_p.detach().to(torch.float32))
