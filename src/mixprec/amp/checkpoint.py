"""Checkpoints under ``mixprec.amp``: the optimizer's ``state_dict()`` carries the amp state
(float32 masters, every scaler's state, the skip record) under ``"mixprec_amp"``, and loading
either the model or the optimizer keeps masters and model storage consistent, whichever is
loaded first. Everything goes through torch's per-instance state-dict hooks (removable).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch

from mixprec.amp.masters import adopt_model_values, after_step, round_
from mixprec.amp.state import AmpHandle, AmpOptimizerState

STATE_KEY = "mixprec_amp"


def _master_index(st: AmpOptimizerState) -> list[int]:
    """Positions of the masters in the optimizer's flat parameter list (to match a checkpoint
    against this optimizer's layout)."""
    index = {id(p): i for i, p in enumerate(st.params())}
    return [index[id(master)] for _, master in st.pairs()]


def _amp_state(st: AmpOptimizerState) -> dict[str, Any]:
    cfg = st.handle.config
    return {
        "opt_level": cfg.opt_level,
        "compute": cfg.compute.name,
        "emulate": cfg.emulate,
        "scalers": [s.state_dict() for s in st.handle.scalers],
        "master_index": _master_index(st),
        "masters": [master.detach().clone() for _, master in st.pairs()],
        "skipped_steps": st.skipped_steps,
        "last_step_skipped": st.last_step_skipped,
    }


def install_state_dict_hooks(st: AmpOptimizerState) -> None:
    """Save the amp state with the optimizer's state dict; restore it on load."""
    opt = st.optimizer

    def save_hook(optimizer: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
        state_dict[STATE_KEY] = _amp_state(st)
        return state_dict

    def load_pre_hook(optimizer: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
        state_dict = dict(state_dict)
        st.pending_load = state_dict.pop(STATE_KEY, None)
        return state_dict

    def load_post_hook(optimizer: Any) -> None:
        saved, st.pending_load = st.pending_load, None
        if saved is None:
            if st.handle.config.master_weights:
                warnings.warn(
                    "optimizer.load_state_dict: the state dict has no 'mixprec_amp' entry (saved "
                    "without mixprec.amp?), so the float32 master weights were not restored; they "
                    "keep their current values",
                    RuntimeWarning,
                    stacklevel=3,
                )
            return
        _load_amp_state(st, saved)

    st.hooks.append(opt.register_state_dict_post_hook(save_hook))
    st.hooks.append(opt.register_load_state_dict_pre_hook(load_pre_hook))
    st.hooks.append(opt.register_load_state_dict_post_hook(load_post_hook))


def _load_amp_state(st: AmpOptimizerState, saved: Mapping[str, Any]) -> None:
    cfg = st.handle.config
    if saved.get("opt_level") != cfg.opt_level or saved.get("compute") != cfg.compute.name:
        raise ValueError(
            f"checkpoint was saved at opt_level={saved.get('opt_level')!r}, "
            f"compute={saved.get('compute')!r} but this optimizer runs at "
            f"opt_level={cfg.opt_level!r}, compute={cfg.compute.name!r}"
        )
    scalers = saved.get("scalers", [])
    if len(scalers) != len(st.handle.scalers):
        raise ValueError(
            f"checkpoint has {len(scalers)} loss scalers, this setup has "
            f"{len(st.handle.scalers)} (num_losses)"
        )
    for scaler, sd in zip(st.handle.scalers, scalers, strict=True):
        scaler.load_state_dict(sd)
    if list(saved.get("master_index", [])) != _master_index(st):
        raise ValueError(
            "checkpoint's master weights do not match this optimizer's parameters (different "
            "model or param groups)"
        )
    with torch.no_grad():
        for (_, master), value in zip(st.pairs(), saved.get("masters", []), strict=True):
            master.copy_(value)
    st.skipped_steps = int(saved.get("skipped_steps", 0))
    st.last_step_skipped = bool(saved.get("last_step_skipped", False))
    after_step(st)  # the model weights become round(master), whatever was loaded before


def model_load_hook(handle: AmpHandle) -> Callable[..., None]:
    """After model.load_state_dict at O2/O3: keep masters and storage consistent with what was
    loaded, whichever of model/optimizer is loaded first."""

    def hook(module: torch.nn.Module, incompatible: Any) -> None:
        cfg = handle.config
        with torch.no_grad():
            if cfg.master_weights:
                adopt_model_values(handle.optimizer_states())
            if cfg.emulate:  # loaded values may not be representable in compute
                for p in handle.lowered.values():
                    round_(p.data, cfg.compute)

    return hook
