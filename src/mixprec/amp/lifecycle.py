"""Mixed-precision training in three lines: :func:`initialize` sets models and optimizers up,
:func:`deinitialize` takes everything back out.

::

    model, optimizer = mixprec.initialize(model, optimizer, opt_level="O2", compute="fp16")
    ...
    with mixprec.scale_loss(loss, optimizer) as scaled:
        scaled.backward()
    optimizer.step()            # skipped (and recorded) when the gradients overflowed

``compute`` is any format: stored natively (``torch.float16``/``bfloat16`` tensors) where the
device has it fast, otherwise emulated: float32 storage holding values exactly representable in
the format (rounded with :func:`mixprec.quantize_`). ``emulate=`` forces either.

``initialize`` runs in three steps: validate the arguments (``plan.AmpOptions``), plan the
changes (``plan.AmpPlan``, nothing touched yet), apply the plan. It changes the objects it is
given, per instance and reversibly (no global patching): parameters' storage (O2/O3), the
optimizer's ``param_groups`` (O2: masters), an instance attribute ``optimizer.step`` (a bound
method wrapping the original), state-dict hooks on the optimizer and the model, and a policy
handle on the model. Gradients are unscaled when ``scale_loss`` exits, so gradient clipping,
gradient accumulation and several losses (``loss_id``, one scaler each) work on ordinary
unscaled gradients between ``scale_loss`` and ``optimizer.step()``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch

from mixprec.amp import opt_levels as _levels
from mixprec.amp.checkpoint import install_state_dict_hooks, model_load_hook
from mixprec.amp.config import ComputeSpec, KeepFp32, LossScaleSpec, OptimizerStateSpec, OptLevel
from mixprec.amp.iteration import install_step
from mixprec.amp.masters import install_masters, lower_, remove_masters, round_optimizer_state
from mixprec.amp.plan import AmpOptions, AmpPlan, plan_amp
from mixprec.amp.scaling import DivergenceMode, LossScaler, SkippedStep
from mixprec.amp.state import ATTR, AmpHandle, AmpOptimizerState, handle_of


def initialize(
    models: torch.nn.Module | Sequence[torch.nn.Module],
    optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
    opt_level: OptLevel = "O1",
    compute: ComputeSpec = "float16",
    loss_scale: LossScaleSpec = "dynamic",
    *,
    num_losses: int = 1,
    emulate: bool | None = None,
    keep_fp32: KeepFp32 | None = None,
    min_loss_scale: float | None = None,
    max_loss_scale: float | None = 2.0**24,
    on_skip: Callable[[SkippedStep], object] | None = None,
    on_divergence: DivergenceMode = "raise",
    optimizer_state: OptimizerStateSpec = "compute",
) -> Any:
    """Set up models and optimizers for mixed-precision training at ``opt_level``.

    Args:
        models: a module or a list of modules (changed in place and returned).
        optimizers: an optimizer, a list, or None (inference: models only). Their parameters
            must belong to ``models`` (other parameters are updated as they are).
        opt_level: ``"O0"`` (fp32), ``"O1"`` (op policy, fp32 weights), ``"O2"`` (weights in
            ``compute`` except norms, fp32 masters), ``"O3"`` (everything in ``compute``).
        compute: the low-precision format (any mixprec format name, FloatFormat or dtype).
        loss_scale: ``"dynamic"`` (:class:`~mixprec.amp.DynamicLossScaler`), a number
            (static), ``"none"``/None (no scaling, no checks), a mixprec scaler instance, or a
            list of ``num_losses`` instances (:data:`~mixprec.amp.LossScaleSpec`).
        num_losses: losses with their own scaler (``scale_loss(..., loss_id=k)``).
        emulate: None = native where fast (CUDA fp16/bf16, CPU bf16 with AVX-512-BF16/AMX),
            True/False to force. Emulated weights are float32 tensors holding values exactly
            representable in ``compute``.
        keep_fp32: ``(module, fqn) -> bool``: modules whose parameters stay float32 (and run
            outside the low-precision policy); default :func:`is_norm` for O2, none for O3.
        min_loss_scale, max_loss_scale: floor and ceiling of the dynamic scale.
        on_skip: callback for every overflowing ``scale_loss`` (a
            :class:`~mixprec.amp.SkippedStep`; the following ``optimizer.step()`` is skipped).
        on_divergence: ``"raise"`` (default), ``"warn"`` or ``"ignore"`` for a loss that
            stays NaN/inf (at a loss scale <= 1, or 16 skipped iterations in a row).
        optimizer_state: where O3 keeps the optimizer state: ``"compute"`` (default, rounded
            like the weights) or ``"float32"`` (emulated O3 only). With ``"compute"`` an
            ``eps`` below the format's smallest normal number (AdamW's 1e-8 in float16) warns
            (:class:`~mixprec.amp.OptimizerPrecisionWarning`) with a value that works.

    Returns ``(models, optimizers)`` shaped as given (just ``models`` if ``optimizers`` is None).

    Raises ``ValueError`` for an unknown opt level/format/loss_scale, ``TypeError`` for
    non-float parameters (or non-float32 ones at O2/O3), an unsupported optimizer (LBFGS)
    or wrong argument types, ``RuntimeError`` when a model or optimizer was already
    initialized; nothing is changed then. Cost: O2 one float32 copy of the lowered parameters.
    """
    options = AmpOptions(
        opt_level=opt_level, compute=compute, loss_scale=loss_scale, num_losses=num_losses,
        emulate=emulate, keep_fp32=keep_fp32, min_loss_scale=min_loss_scale,
        max_loss_scale=max_loss_scale, on_skip=on_skip, on_divergence=on_divergence,
        optimizer_state=optimizer_state,
    )  # fmt: skip
    plan = plan_amp(models, optimizers, options)
    apply_plan(plan)
    return plan.result()


def apply_plan(plan: AmpPlan) -> AmpHandle:
    """Make the planned changes; a failure while attaching the policy undoes them all."""
    config = plan.config
    handle = AmpHandle(
        config=config,
        models=list(plan.models),
        optimizers=list(plan.optimizers),
        scalers=list(plan.scalers),
        lowered=dict(plan.lowered),
        names=dict(plan.names),
    )
    states = [_new_optimizer_state(handle, opt) for opt in plan.optimizers]
    if config.master_weights:  # masters first: they copy the unrounded float32 values
        for st in states:
            install_masters(st, handle.lowered)
    with torch.no_grad():
        for p in handle.lowered.values():
            handle.orig_dtypes[id(p)] = p.dtype
            lower_(p, config)
    for st in states:
        if config.opt_level == "O3":
            round_optimizer_state(st, handle.lowered)
        install_step(st)
        install_state_dict_hooks(st)
        setattr(st.optimizer, ATTR, st)
    for scaler in handle.scalers:
        _register_names(scaler, handle, states)
    for model in handle.models:
        if config.lowers_weights:
            handle.hooks.append(model.register_load_state_dict_post_hook(model_load_hook(handle)))
        setattr(model, ATTR, handle)
    try:
        for model in handle.models:
            handle.policy_handles.extend(
                _levels.attach_policy(
                    model,
                    config.opt_level,
                    config.policy_compute,
                    config.emulate,
                    plan.policy_keep_fp32,
                    plan.device_type,
                )
            )
    except Exception:
        _deinitialize(handle)
        raise
    return handle


def _new_optimizer_state(handle: AmpHandle, opt: torch.optim.Optimizer) -> AmpOptimizerState:
    return AmpOptimizerState(
        handle=handle, optimizer=opt, had_instance_step="step" in vars(opt), orig_step=opt.step
    )


def _register_names(
    scaler: LossScaler, handle: AmpHandle, states: Sequence[AmpOptimizerState]
) -> None:
    """Give the scaler the models' parameter names; masters as ``"name (master)"``."""
    pairs: list[tuple[str, torch.Tensor]] = []
    for model in handle.models:
        for n, p in model.named_parameters():
            pairs.append((handle.names.get(id(p), n), p))
    for st in states:
        for model_p, master in st.pairs():
            pairs.append((handle.names.get(id(model_p), "?") + " (master)", master))
    scaler.register_names(pairs)


def deinitialize(*objs: torch.nn.Module | torch.optim.Optimizer) -> None:
    """Undo the :func:`initialize` call that set up any of ``objs`` (models or optimizers):
    all of that call's models and optimizers are restored.

    Removes the policy, the hooks and the ``step`` wrapper; O2 copies the float32 masters back
    into the model (whose parameters become float32 again) and puts the model's parameters back
    into the optimizer (optimizer state carried over); O3 makes parameters float32 again (their
    values stay rounded). Afterwards ``initialize`` may be called again. ``RuntimeError`` for
    an object that was not initialized.
    """
    handles = {id(h): h for h in map(handle_of, objs)}
    for handle in handles.values():
        _deinitialize(handle)


def _deinitialize(handle: AmpHandle) -> None:
    for st in handle.optimizer_states():
        _detach_optimizer(st)
    for removable in (*handle.policy_handles, *handle.hooks):
        removable.remove()
    handle.policy_handles.clear()
    handle.hooks.clear()
    with torch.no_grad():
        for p in handle.lowered.values():
            orig = handle.orig_dtypes.get(id(p), torch.float32)
            if p.dtype != orig:
                p.data = p.data.to(orig)
    for m in handle.models:
        if getattr(m, ATTR, None) is handle:
            delattr(m, ATTR)


def _detach_optimizer(st: AmpOptimizerState) -> None:
    """Hooks off, the original ``step`` back, masters out of ``param_groups``."""
    opt = st.optimizer
    for h in st.hooks:
        h.remove()
    if st.had_instance_step:
        opt.step = st.orig_step  # type: ignore[method-assign]
    else:
        with contextlib.suppress(AttributeError):
            del opt.step
    remove_masters(st)
    delattr(opt, ATTR)
