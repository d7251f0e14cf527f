"""Mixed-precision training in three lines: opt levels O0–O3, master weights, loss scaling.

::

    model, optimizer = mixprec.initialize(model, optimizer, opt_level="O2", compute="fp16")
    ...
    with mixprec.scale_loss(loss, optimizer) as scaled:
        scaled.backward()
    optimizer.step()            # skipped (and recorded) when the gradients overflowed

Opt levels (the mixed-precision paper's recipe, apex's names):

* ``O0``: float32 everywhere (the baseline; the loss scaler still detects divergence).
* ``O1``: float32 weights; the op policy (:func:`mixprec.apply_policy`) runs the low-precision
  ops (matmul, linear, conv, attention) in ``compute`` and the fp32-list ops in float32.
* ``O2``: model weights stored in ``compute`` (norm layers kept float32), float32 *master*
  weights held by the optimizer and copied back (rounded) after each step; same op policy.
* ``O3``: everything in ``compute`` (weights, norm layers, all ops, optimizer state), no master
  weights: the paper's ablation that shows why master weights matter.

``compute`` is any format: stored natively (``torch.float16``/``bfloat16`` tensors) where the
device has it fast, otherwise emulated: float32 storage holding values exactly representable in
the format (rounded with :func:`mixprec.quantize_`). ``emulate=`` forces either.

Design (no global patching): ``initialize`` changes the objects it is given, per instance and
reversibly (:func:`deinitialize`): parameters' storage (O2/O3), the optimizer's ``param_groups``
(O2: masters), an instance attribute ``optimizer.step`` (a bound method wrapping the original:
skips the step after an overflow, copies masters back), state-dict hooks on the optimizer and the
model, and a policy handle on the model. Gradients are unscaled when ``scale_loss`` exits, so
gradient clipping, gradient accumulation and several losses (``loss_id``, one scaler each) work
on ordinary unscaled gradients between ``scale_loss`` and ``optimizer.step()``.

Costs per ``scale_loss``: one fused check+unscale pass over the new gradients (O2: plus a cast or
rounding of the model gradients into float32 masters), one device sync to read the overflow
flag (as torch.amp's ``scaler.step``), one all-reduce of a few flags when ``torch.distributed``
is initialised. Per ``optimizer.step()``: O2 one copy (rounding) of the masters into the model;
O3 emulated one rounding of the parameters and the optimizer state.
"""

from __future__ import annotations

import contextlib
import types
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mixprec.amp import opt_levels as _amp_policy
from mixprec.amp.scaling import (
    DynamicLossScaler,
    LossScaler,
    NoOpLossScaler,
    OptState,
    StaticLossScaler,
    _non_finite_check_and_unscale_,
    _OptRecord,
)
from mixprec.formats.float_format import FloatFormat, get_format
from mixprec.quantization.elementwise import quantize, quantize_

OPT_LEVELS = ("O0", "O1", "O2", "O3")
_ATTR = "_mixprec_amp"
_UNSUPPORTED_OPTIMIZERS = {
    "LBFGS": "it re-evaluates the loss through a closure, which bypasses scale_loss",
    "SparseAdam": "it needs sparse gradients, which amp does not unscale into masters",
}
_STATE_KEY = "mixprec_amp"


@dataclass(frozen=True)
class AmpConfig:
    """What :func:`initialize` set up (read it back with :func:`get_config`).

    Attributes:
        opt_level: ``"O0"``..``"O3"``.
        compute: the compute format (float32 for O0).
        emulate: weights/ops emulated (float32 storage, rounded values) rather than native.
        master_weights: the optimizer holds float32 masters (O2).
        num_losses: number of loss scalers (``loss_id`` in ``0..num_losses-1``).
    """

    opt_level: str
    compute: FloatFormat
    emulate: bool
    master_weights: bool
    num_losses: int

    def __repr__(self) -> str:
        return (
            f"AmpConfig(opt_level={self.opt_level!r}, compute={self.compute.name!r}, "
            f"emulate={self.emulate}, master_weights={self.master_weights}, "
            f"num_losses={self.num_losses})"
        )

    @property
    def storage_dtype(self) -> torch.dtype:
        """dtype of lowered weights: the native dtype, or float32 when emulated."""
        if self.emulate or self.opt_level in ("O0", "O1"):
            return torch.float32
        dt = _amp_policy.native_dtype(self.compute)
        return dt if dt is not None else torch.float32


def is_norm(module: torch.nn.Module, fqn: str = "") -> bool:
    """Default ``keep_fp32`` of O2: batch/instance/layer/group/RMS norm layers."""
    norms: tuple[type, ...] = (
        torch.nn.modules.batchnorm._NormBase,
        torch.nn.LayerNorm,
        torch.nn.GroupNorm,
        torch.nn.LocalResponseNorm,
    )
    rms = getattr(torch.nn, "RMSNorm", None)
    if rms is not None:
        norms = (*norms, rms)
    return isinstance(module, norms)


# ----------------------------------------------------------------------------------------------
# state
# ----------------------------------------------------------------------------------------------


class _NotCopied:
    """amp state is tied to the live objects: a deep copy or pickle of a model/optimizer gets
    None instead (the copy is then not initialized; call initialize on it if needed)."""

    def __deepcopy__(self, memo: dict[int, Any]) -> None:
        return None

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return type(None), ()


@dataclass(eq=False)
class _Handle(_NotCopied):
    """Shared state of one initialize() call: config, models, optimizers, scalers."""

    config: AmpConfig
    models: list[torch.nn.Module]
    optimizers: list[torch.optim.Optimizer]
    scalers: list[LossScaler]
    lowered: dict[int, torch.nn.Parameter]  # id -> model parameter stored in compute
    names: dict[int, str]  # id(model param) -> qualified name
    policy_handles: list[Any] = field(default_factory=list)
    hooks: list[Any] = field(default_factory=list)
    orig_dtypes: dict[int, torch.dtype] = field(default_factory=dict)


@dataclass(eq=False)
class _OptState(_NotCopied):
    """Per-optimizer amp state (lives in ``optimizer._mixprec_amp``)."""

    handle: _Handle
    optimizer: torch.optim.Optimizer
    had_instance_step: bool
    orig_step: Any
    master_of: dict[int, torch.nn.Parameter] = field(default_factory=dict)  # model -> master
    model_of: dict[int, torch.nn.Parameter] = field(default_factory=dict)  # master -> model
    stash: dict[int, torch.Tensor] = field(default_factory=dict)
    pending: bool = False  # a scale_loss exited since the last step()
    found: bool = False  # some gradient of this optimizer overflowed since the last step()
    window_open: bool = False  # masters' grads belong to the current accumulation window
    skipped_steps: int = 0
    last_step_skipped: bool = False
    hooks: list[Any] = field(default_factory=list)
    pending_load: dict[str, Any] | None = None

    def pairs(self) -> list[tuple[torch.nn.Parameter, torch.nn.Parameter]]:
        """(model, master) pairs in param_groups order."""
        out = []
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                m = self.model_of.get(id(p))
                if m is not None:
                    out.append((m, p))
        return out

    def direct(self) -> list[torch.Tensor]:
        """Parameters the optimizer updates in place (everything but masters)."""
        return [
            p
            for group in self.optimizer.param_groups
            for p in group["params"]
            if id(p) not in self.model_of
        ]


def _state(optimizer: Any, what: str) -> _OptState:
    st = getattr(optimizer, _ATTR, None) if optimizer is not None else None
    if not isinstance(st, _OptState):
        raise RuntimeError(
            f"{what}: the optimizer {type(optimizer).__name__} was not set up by "
            "mixprec.initialize(model, optimizer, ...)"
        )
    return st


def _as_list(x: Any, what: str, kind: type) -> tuple[list[Any], bool]:
    if isinstance(x, kind):
        return [x], False
    if isinstance(x, (list, tuple)):
        items = list(x)
        for i, item in enumerate(items):
            if not isinstance(item, kind):
                raise TypeError(
                    f"{what}[{i}] must be a {kind.__module__}.{kind.__qualname__}, got "
                    f"{type(item).__name__}"
                )
        if not items:
            raise ValueError(f"{what} is an empty list")
        return items, True
    raise TypeError(
        f"{what} must be a {kind.__qualname__} or a list of them, got {type(x).__name__}"
    )


# ----------------------------------------------------------------------------------------------
# initialize
# ----------------------------------------------------------------------------------------------


def _make_scalers(
    loss_scale: Any,
    num_losses: int,
    min_loss_scale: float | None,
    max_loss_scale: float | None,
    scaler_kwargs: Mapping[str, Any],
) -> list[LossScaler]:
    if isinstance(loss_scale, (LossScaler, list, tuple)) and (
        scaler_kwargs.get("on_skip") is not None or scaler_kwargs.get("on_divergence") != "raise"
    ):
        raise ValueError(
            "on_skip/on_divergence configure the scalers initialize builds; with scaler "
            "instances as loss_scale set them on the instances (DynamicLossScaler(on_skip=...))"
        )
    if isinstance(loss_scale, (list, tuple)):
        if len(loss_scale) != num_losses or not all(isinstance(s, LossScaler) for s in loss_scale):
            raise ValueError(
                f"a list loss_scale must hold num_losses={num_losses} mixprec scalers, got "
                f"{[type(s).__name__ for s in loss_scale]}"
            )
        if len({id(s) for s in loss_scale}) != len(loss_scale):
            raise ValueError("loss_scale lists the same scaler twice; use one per loss")
        return list(loss_scale)
    if isinstance(loss_scale, LossScaler):
        if num_losses != 1:
            raise ValueError(
                f"one scaler instance cannot serve num_losses={num_losses} losses (each loss "
                "needs its own scale); pass a list of scalers or 'dynamic'"
            )
        return [loss_scale]
    if isinstance(loss_scale, torch.amp.GradScaler):
        raise TypeError(
            "loss_scale got a torch.amp.GradScaler; pass a mixprec scaler instead (e.g. "
            "s = DynamicLossScaler(); s.load_state_dict(grad_scaler.state_dict()))"
        )
    out: list[LossScaler] = []
    for _ in range(num_losses):
        if loss_scale == "dynamic":
            out.append(
                DynamicLossScaler(
                    min_scale=min_loss_scale, max_scale=max_loss_scale, **scaler_kwargs
                )
            )
        elif loss_scale is None or loss_scale == "none":
            out.append(NoOpLossScaler(**scaler_kwargs))
        elif isinstance(loss_scale, (int, float)) and not isinstance(loss_scale, bool):
            out.append(StaticLossScaler(float(loss_scale), **scaler_kwargs))
        else:
            raise ValueError(
                f"loss_scale must be 'dynamic', 'none'/None, a number > 0 or a mixprec loss "
                f"scaler (NoOpLossScaler, StaticLossScaler, DynamicLossScaler), got {loss_scale!r}"
            )
    return out


def _check_optimizer(opt: torch.optim.Optimizer, i: int) -> None:
    name = type(opt).__name__
    if name in _UNSUPPORTED_OPTIMIZERS:
        raise TypeError(
            f"optimizer {name} is not supported by mixprec.initialize: "
            f"{_UNSUPPORTED_OPTIMIZERS[name]}. Use a first-order optimizer (SGD, Adam, AdamW, "
            "...) or drive mixprec.scaling.DynamicLossScaler by hand."
        )
    if getattr(opt, _ATTR, None) is not None:
        raise RuntimeError(
            f"optimizers[{i}] ({name}) was already set up by mixprec.initialize "
            f"(opt_level={opt._mixprec_amp.handle.config.opt_level}); call "  # type: ignore[attr-defined]
            "mixprec.amp.deinitialize(...) first, or build a fresh optimizer"
        )


def _lowered_params(
    models: Sequence[torch.nn.Module],
    keep_fp32: Callable[[torch.nn.Module, str], bool],
) -> dict[int, torch.nn.Parameter]:
    """Model parameters to store in the compute format (a parameter shared with a kept-fp32
    module stays float32)."""
    lowered: dict[int, torch.nn.Parameter] = {}
    kept: set[int] = set()
    for model in models:
        for fqn, module in model.named_modules(remove_duplicate=False):
            keep = bool(keep_fp32(module, fqn))
            for p in module.parameters(recurse=False):
                if keep:
                    kept.add(id(p))
                else:
                    lowered[id(p)] = p
    for k in kept:
        lowered.pop(k, None)
    return lowered


def initialize(
    models: torch.nn.Module | Sequence[torch.nn.Module],
    optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
    opt_level: str = "O1",
    compute: str | FloatFormat | torch.dtype = "float16",
    loss_scale: Any = "dynamic",
    *,
    num_losses: int = 1,
    emulate: bool | None = None,
    keep_fp32: Callable[[torch.nn.Module, str], bool] | None = None,
    min_loss_scale: float | None = None,
    max_loss_scale: float | None = 2.0**24,
    on_skip: Callable[..., Any] | None = None,
    on_divergence: str = "raise",
) -> Any:
    """Set up models and optimizers for mixed-precision training at ``opt_level``.

    Args:
        models: a module or a list of modules (changed in place and returned).
        optimizers: an optimizer, a list, or None (inference: models only). Their parameters
            must belong to ``models`` (other parameters are updated as they are).
        opt_level: ``"O0"`` (fp32), ``"O1"`` (op policy, fp32 weights), ``"O2"`` (weights in
            ``compute`` except norms, fp32 masters), ``"O3"`` (everything in ``compute``).
        compute: the low-precision format (any mixprec format name, FloatFormat or dtype).
        loss_scale: ``"dynamic"`` (:class:`~mixprec.scaling.DynamicLossScaler`), a number
            (static), ``"none"``/None (no scaling, no checks), a mixprec scaler instance, or a
            list of ``num_losses`` instances.
        num_losses: losses with their own scaler (``scale_loss(..., loss_id=k)``).
        emulate: None = native where fast (CUDA fp16/bf16, CPU bf16 with AVX-512-BF16/AMX),
            True/False to force. Emulated weights are float32 tensors holding values exactly
            representable in ``compute``.
        keep_fp32: ``(module, fqn) -> bool``: modules whose parameters stay float32 (and run
            outside the low-precision policy); default :func:`is_norm` for O2, none for O3.
        min_loss_scale, max_loss_scale: floor and ceiling of the dynamic scale.
        on_skip: callback for every overflowing ``scale_loss`` (a
            :class:`~mixprec.scaling.SkippedStep`; the following ``optimizer.step()`` is skipped).
        on_divergence: ``"raise"`` (default), ``"warn"`` or ``"ignore"`` for a NaN/inf loss at
            a loss scale <= 1.

    Returns ``(models, optimizers)`` shaped as given (just ``models`` if ``optimizers`` is None).

    Raises ``ValueError`` for an unknown opt level/format/loss_scale, ``TypeError`` for
    non-float parameters (or non-float32 ones at O2/O3), an unsupported optimizer (LBFGS,
    SparseAdam) or wrong argument types, ``RuntimeError`` when a model or optimizer was already
    initialized. Cost: O2 one float32 copy of the lowered parameters (the masters).
    """
    model_list, models_is_list = _as_list(models, "models", torch.nn.Module)
    if optimizers is None:
        opt_list: list[torch.optim.Optimizer] = []
        opts_is_list = False
    else:
        opt_list, opts_is_list = _as_list(optimizers, "optimizers", torch.optim.Optimizer)
    if opt_level not in OPT_LEVELS:
        hint = ""
        if isinstance(opt_level, str) and opt_level.upper().replace("0", "O", 1) in OPT_LEVELS:
            hint = f" (the letter O: {opt_level.upper().replace('0', 'O', 1)!r})"
        raise ValueError(
            f"opt_level must be one of {', '.join(OPT_LEVELS)}, got {opt_level!r}{hint}"
        )
    if isinstance(num_losses, bool) or not isinstance(num_losses, int) or num_losses < 1:
        raise ValueError(f"num_losses must be an int >= 1, got {num_losses!r}")
    if emulate not in (None, True, False):
        raise TypeError(f"emulate must be None, True or False, got {emulate!r}")
    if keep_fp32 is not None and not callable(keep_fp32):
        raise TypeError(f"keep_fp32 must be callable (module, fqn) -> bool, got {keep_fp32!r}")
    fmt = get_format(compute) if opt_level != "O0" else get_format("float32")
    if fmt.bits > 32:
        raise ValueError(
            f"compute must be a format of at most 32 bits (the masters are float32), got {fmt.name}"
        )
    for i, model in enumerate(model_list):
        if getattr(model, _ATTR, None) is not None:
            raise RuntimeError(
                f"models[{i}] ({type(model).__name__}) was already set up by mixprec.initialize; "
                "call mixprec.amp.deinitialize(model, optimizer) first, or build a fresh model"
            )
    if len({id(m) for m in model_list}) != len(model_list):
        raise ValueError("models lists the same module twice")
    if len({id(o) for o in opt_list}) != len(opt_list):
        raise ValueError("optimizers lists the same optimizer twice")
    for i, opt in enumerate(opt_list):
        _check_optimizer(opt, i)

    names: dict[int, str] = {}
    for mi, model in enumerate(model_list):
        prefix = f"models[{mi}]." if len(model_list) > 1 else ""
        for n, p in model.named_parameters(remove_duplicate=True):
            names.setdefault(id(p), prefix + n)
            if not p.dtype.is_floating_point:
                raise TypeError(
                    f"parameter {prefix + n!r} has dtype {p.dtype}; mixprec.initialize needs "
                    "floating-point parameters (keep integer state in a buffer)"
                )
    owner: dict[int, int] = {}
    for oi, opt in enumerate(opt_list):
        for gi, group in enumerate(opt.param_groups):
            for pi, p in enumerate(group["params"]):
                prev = owner.setdefault(id(p), oi)
                if prev != oi:
                    where = names.get(id(p), f"optimizers[{oi}].param_groups[{gi}][{pi}]")
                    raise ValueError(
                        f"parameter {where!r} is in optimizers[{prev}] and optimizers[{oi}]; "
                        "each parameter may belong to one optimizer only (its gradient is "
                        "unscaled once per backward)"
                    )
                if not p.dtype.is_floating_point:
                    where = names.get(id(p), f"optimizers[{oi}].param_groups[{gi}][{pi}]")
                    raise TypeError(
                        f"parameter {where!r} has dtype {p.dtype}; mixprec.initialize needs "
                        "floating-point parameters"
                    )

    # native vs emulated
    device_type = "cpu"
    for model in model_list:
        p = next(model.parameters(), None)
        if p is not None:
            device_type = p.device.type
            break
    native_dt = _amp_policy.native_dtype(fmt)
    if emulate is None:
        emulate = not _amp_policy.native_is_fast(fmt, device_type)
    elif emulate is False and native_dt is None:
        raise ValueError(
            f"emulate=False: {fmt.name} has no native torch execution (only float16, bfloat16, "
            "float32, float64); use emulate=None or True"
        )
    if fmt.name in ("float32", "float64"):
        emulate = False
    lower = opt_level in ("O2", "O3")
    keep_fp32_given = keep_fp32 is not None
    if lower:
        if keep_fp32 is None:
            keep_fp32 = is_norm if opt_level == "O2" else (lambda m, fqn: False)
        for model in model_list:
            for n, p in model.named_parameters():
                if p.dtype != torch.float32:
                    raise TypeError(
                        f"{opt_level} needs a float32 model to lower; parameter {n!r} is "
                        f"{p.dtype} (call model.float() before mixprec.initialize)"
                    )
    config = AmpConfig(
        opt_level=opt_level,
        compute=fmt,
        emulate=bool(emulate),
        master_weights=opt_level == "O2",
        num_losses=num_losses,
    )
    scaler_kwargs: dict[str, Any] = {"on_skip": on_skip, "on_divergence": on_divergence}
    scalers = _make_scalers(loss_scale, num_losses, min_loss_scale, max_loss_scale, scaler_kwargs)

    lowered = _lowered_params(model_list, keep_fp32) if lower else {}
    handle = _Handle(
        config=config,
        models=model_list,
        optimizers=opt_list,
        scalers=scalers,
        lowered=lowered,
        names=names,
    )

    # masters first (from the unrounded float32 values), then lower the model's storage
    states = []
    for opt in opt_list:
        st = _OptState(
            handle=handle,
            optimizer=opt,
            had_instance_step="step" in vars(opt),
            orig_step=opt.step,
        )
        if config.master_weights:
            _install_masters(st, lowered)
        states.append(st)
    with torch.no_grad():
        for p in lowered.values():
            handle.orig_dtypes[id(p)] = p.dtype
            _lower_(p, config)
    for st in states:
        if opt_level == "O3":
            _round_optimizer_state(st, lowered)
        _install_step(st)
        _install_state_dict_hooks(st)
        setattr(st.optimizer, _ATTR, st)
    for scaler in scalers:
        _register_names(scaler, handle, states)
    for model in model_list:
        if lower:
            handle.hooks.append(
                model.register_load_state_dict_post_hook(_make_model_load_hook(handle))
            )
        setattr(model, _ATTR, handle)
    try:
        # the default keep_fp32 (norms) needs no policy of its own: norms are fp32-list ops
        explicit_keep = keep_fp32 if keep_fp32_given else None
        for model in model_list:
            handle.policy_handles.extend(
                _amp_policy.attach_policy(
                    model, opt_level, fmt, config.emulate, explicit_keep, device_type
                )
            )
    except Exception:
        _deinitialize(handle)
        raise

    ret_models: Any = model_list if models_is_list else model_list[0]
    if optimizers is None:
        return ret_models
    ret_opts: Any = opt_list if opts_is_list else opt_list[0]
    return ret_models, ret_opts


def _lower_(p: torch.nn.Parameter, config: AmpConfig) -> None:
    """Store a parameter in the compute format (native dtype, or rounded float32)."""
    if config.compute.name == "float32":
        return
    dt = config.storage_dtype
    if dt != torch.float32:
        p.data = p.data.to(dt)
    else:
        quantize_(p.data, config.compute)


def _install_masters(st: _OptState, lowered: Mapping[int, torch.nn.Parameter]) -> None:
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


def _round_optimizer_state(st: _OptState, lowered: Mapping[int, torch.nn.Parameter]) -> None:
    """O3: optimizer state tensors shaped like their (lowered) parameter live in compute."""
    cfg = st.handle.config
    with torch.no_grad():
        for p in st.direct():
            if id(p) not in lowered:
                continue
            for key, v in st.optimizer.state.get(p, {}).items():
                if isinstance(v, torch.Tensor) and v.shape == p.shape and key != "step":
                    if v.dtype != p.dtype:
                        st.optimizer.state[p][key] = v.to(p.dtype)
                    if cfg.emulate and v.dtype.is_floating_point:
                        quantize_(st.optimizer.state[p][key], cfg.compute)


def _register_names(scaler: LossScaler, handle: _Handle, states: Sequence[_OptState]) -> None:
    pairs: list[tuple[str, torch.Tensor]] = []
    for model in handle.models:
        for n, p in model.named_parameters():
            pairs.append((handle.names.get(id(p), n), p))
    for st in states:
        for master_id, model_p in st.model_of.items():
            master = st.master_of[id(model_p)]
            assert id(master) == master_id
            pairs.append((handle.names.get(id(model_p), "?") + " (master)", master))
    scaler.register_names(pairs)


# ----------------------------------------------------------------------------------------------
# optimizer.step
# ----------------------------------------------------------------------------------------------


def _amp_step(optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
    """``optimizer.step`` under mixprec.amp: skip after an overflow, copy masters back."""
    st = _state(optimizer, "optimizer.step()")
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
    _after_step(st)
    return ret


def _after_step(st: _OptState) -> None:
    cfg = st.handle.config
    with torch.no_grad():
        if cfg.master_weights:
            pairs = st.pairs()
            if not pairs:
                return
            if cfg.emulate:
                for model_p, master in pairs:
                    quantize(master.data, cfg.compute, out=model_p.data)
            else:
                torch._foreach_copy_([m.data for m, _ in pairs], [p.data for _, p in pairs])
        elif cfg.opt_level == "O3" and cfg.emulate:
            lowered = st.handle.lowered
            params = [p for p in st.direct() if id(p) in lowered]
            for p in params:
                quantize_(p.data, cfg.compute)
            _round_optimizer_state(st, lowered)


def _install_step(st: _OptState) -> None:
    st.optimizer.step = types.MethodType(_amp_step, st.optimizer)  # type: ignore[method-assign]


# ----------------------------------------------------------------------------------------------
# scale_loss
# ----------------------------------------------------------------------------------------------


def _begin(st: _OptState) -> None:
    """Before a backward: set accumulated (already unscaled) gradients aside."""
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


def _abort(st: _OptState) -> None:
    """The backward raised: put the set-aside gradients back, drop partial ones."""
    for p in st.direct():
        old = st.stash.pop(id(p), None)
        if old is not None:
            p.grad = old
    st.stash.clear()
    for model_p, _ in st.pairs():
        model_p.grad = None


def _unscale_new(st: _OptState, scaler: LossScaler) -> torch.Tensor:
    """After a backward: unscale+check the new gradients, fold them into the accumulated ones.

    Returns this optimizer's found_inf flag (float32 scalar tensor, no sync).
    """
    cfg = st.handle.config
    lowered = st.handle.lowered
    inv = scaler._inv_scale()
    per_device: dict[torch.device, list[torch.Tensor]] = {}
    masters_new: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    with torch.no_grad():
        direct = st.direct()
        for p in direct:
            g = p.grad
            if g is None:
                continue
            if g.is_sparse:
                g = g.coalesce()
                p.grad = g
                g = g._values()
            elif cfg.emulate and cfg.opt_level == "O3" and id(p) in lowered:
                quantize_(g, cfg.compute)  # the gradient is stored in compute, like the weight
            per_device.setdefault(g.device, []).append(g)
        for model_p, master in st.pairs():
            g = model_p.grad
            if g is None:
                continue
            if cfg.emulate:
                g32 = quantize(g.detach(), cfg.compute)  # stored in compute, like the weight
            else:
                g32 = g.detach().to(torch.float32, copy=True)
            model_p.grad = None
            masters_new.append((master, g32))
            per_device.setdefault(g32.device, []).append(g32)
        home = next(iter(per_device), torch.device("cpu"))
        found = torch.zeros((), dtype=torch.float32, device=home)
        if scaler.check_finite or inv != 1.0:
            for device, grads in per_device.items():
                f = found if device == home else torch.zeros((), device=device)
                inv_t = torch.full((), inv, dtype=torch.float32, device=device)
                _non_finite_check_and_unscale_(grads, f, inv_t)
                if f is not found:
                    found += f.to(home)
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
    return found


@contextlib.contextmanager
def scale_loss(
    loss: torch.Tensor,
    optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
    loss_id: int = 0,
) -> Iterator[torch.Tensor]:
    """Context manager yielding ``loss * scale``; call ``.backward()`` on it inside.

    On exit the new gradients of every given optimizer are unscaled (into the float32 masters
    at O2) and checked for NaN/inf, folded into gradients accumulated by earlier ``scale_loss``
    blocks since the last step (gradient accumulation, several losses), the overflow flag is
    all-reduced across ranks when ``torch.distributed`` is initialised, and scaler ``loss_id``
    is updated. An overflow makes the next ``optimizer.step()`` of the optimizers whose
    gradients overflowed a no-op (recorded in :func:`last_step_skipped`).

    Raises :class:`~mixprec.scaling.DivergenceError` on exit for a NaN/inf loss at scale <= 1
    (after recording the skip). Cost: one fused pass over the new gradients and one device sync.
    """
    opt_list, _ = _as_list(optimizers, "optimizers", torch.optim.Optimizer)
    states = [_state(o, "scale_loss") for o in opt_list]
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
    scaler = handle.scalers[loss_id]
    for st in states:
        _begin(st)
    try:
        yield scaler.scale(loss)
    except BaseException:
        for st in states:
            _abort(st)
        raise
    founds = [_unscale_new(st, scaler) for st in states]
    flags = _sync_flags(founds, scaler)
    records = []
    for st, f in zip(states, flags, strict=True):
        st.pending = True
        st.found = st.found or f
        records.append(_OptRecord(stage=OptState.UNSCALED, found=f, optimizer=st.optimizer))
    if not scaler.check_finite:
        flags = [False] * len(flags)
    # frames: _finish_iteration <- scale_loss <- contextlib __exit__ <- the user's with
    scaler._finish_iteration(any(flags), records, stacklevel=4)


def _sync_flags(founds: Sequence[torch.Tensor], scaler: LossScaler) -> list[bool]:
    """Read the per-optimizer overflow flags back in one sync (one all-reduce if distributed)."""
    if not scaler.check_finite:
        return [False] * len(founds)
    home = founds[0].device
    vec = torch.stack([f.to(home) for f in founds])
    from mixprec.amp.scaling import _is_distributed

    if _is_distributed(scaler.distributed):
        torch.distributed.all_reduce(
            vec, op=torch.distributed.ReduceOp.MAX, group=scaler.process_group
        )
    return [bool(v) for v in vec.tolist()]


# ----------------------------------------------------------------------------------------------
# queries
# ----------------------------------------------------------------------------------------------


def master_params(optimizer: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
    """Yield the parameters the optimizer updates: the float32 masters at O2, the model's own
    parameters otherwise (also for an optimizer never passed to initialize). Use it for
    gradient clipping: ``clip_grad_norm_(mixprec.master_params(opt), 1.0)`` after scale_loss."""
    for group in optimizer.param_groups:
        yield from group["params"]


def get_config(obj: torch.nn.Module | torch.optim.Optimizer) -> AmpConfig:
    """The :class:`AmpConfig` of an initialized model or optimizer."""
    h = getattr(obj, _ATTR, None)
    if isinstance(h, _OptState):
        return h.handle.config
    if isinstance(h, _Handle):
        return h.config
    raise RuntimeError(f"{type(obj).__name__} was not set up by mixprec.initialize")


def get_scaler(optimizer: torch.optim.Optimizer, loss_id: int = 0) -> LossScaler:
    """The loss scaler of ``loss_id`` (its scale, skip record, state)."""
    handle = _state(optimizer, "get_scaler").handle
    if not 0 <= loss_id < len(handle.scalers):
        raise ValueError(f"loss_id must be in [0, {len(handle.scalers)}), got {loss_id!r}")
    return handle.scalers[loss_id]


def last_step_skipped(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer's last ``step()`` was skipped because of an overflow (e.g. to hold
    back an LR scheduler: ``if not mixprec.amp.last_step_skipped(opt): sched.step()``)."""
    return _state(optimizer, "last_step_skipped").last_step_skipped


def skipped_steps(optimizer: torch.optim.Optimizer) -> int:
    """How many of the optimizer's ``step()`` calls were skipped so far."""
    return _state(optimizer, "skipped_steps").skipped_steps


# ----------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------


def _amp_state(st: _OptState) -> dict[str, Any]:
    cfg = st.handle.config
    pairs = st.pairs()
    flat = [p for g in st.optimizer.param_groups for p in g["params"]]
    index = {id(p): i for i, p in enumerate(flat)}
    return {
        "opt_level": cfg.opt_level,
        "compute": cfg.compute.name,
        "emulate": cfg.emulate,
        "scalers": [s.state_dict() for s in st.handle.scalers],
        "master_index": [index[id(master)] for _, master in pairs],
        "masters": [master.detach().clone() for _, master in pairs],
        "skipped_steps": st.skipped_steps,
        "last_step_skipped": st.last_step_skipped,
    }


def _install_state_dict_hooks(st: _OptState) -> None:
    opt = st.optimizer

    def save_hook(optimizer: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
        state_dict[_STATE_KEY] = _amp_state(st)
        return state_dict

    def load_pre_hook(optimizer: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
        state_dict = dict(state_dict)
        st.pending_load = state_dict.pop(_STATE_KEY, None)
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


def _load_amp_state(st: _OptState, saved: Mapping[str, Any]) -> None:
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
    pairs = st.pairs()
    flat = [p for g in st.optimizer.param_groups for p in g["params"]]
    index = {id(p): i for i, p in enumerate(flat)}
    if list(saved.get("master_index", [])) != [index[id(m)] for _, m in pairs]:
        raise ValueError(
            "checkpoint's master weights do not match this optimizer's parameters (different "
            "model or param groups)"
        )
    with torch.no_grad():
        for (_, master), value in zip(pairs, saved.get("masters", []), strict=True):
            master.copy_(value)
    st.skipped_steps = int(saved.get("skipped_steps", 0))
    st.last_step_skipped = bool(saved.get("last_step_skipped", False))
    _after_step(st)  # the model weights become round(master), whatever was loaded before


def _make_model_load_hook(handle: _Handle) -> Callable[..., None]:
    """After model.load_state_dict at O2/O3: keep masters and storage consistent with what was
    loaded, whichever of model/optimizer is loaded first."""

    def hook(module: torch.nn.Module, incompatible: Any) -> None:
        cfg = handle.config
        with torch.no_grad():
            if cfg.emulate:  # loaded values may not be representable in compute
                lowered = list(handle.lowered.values())
                if cfg.master_weights:
                    _adopt_loaded(handle)
                for p in lowered:
                    quantize_(p.data, cfg.compute)
            elif cfg.master_weights:
                _adopt_loaded(handle)

    return hook


def _adopt_loaded(handle: _Handle) -> None:
    """Masters take the model's values where the model no longer equals round(master)."""
    cfg = handle.config
    for opt in handle.optimizers:
        st = getattr(opt, _ATTR, None)
        if not isinstance(st, _OptState):
            continue
        for model_p, master in st.pairs():
            if cfg.emulate:
                expect = quantize(master.detach(), cfg.compute)
            else:
                expect = master.detach().to(model_p.dtype)
            if not torch.equal(expect, model_p.detach()):
                master.data.copy_(model_p.detach().to(torch.float32))


# ----------------------------------------------------------------------------------------------
# deinitialize
# ----------------------------------------------------------------------------------------------


def deinitialize(*objs: torch.nn.Module | torch.optim.Optimizer) -> None:
    """Undo the :func:`initialize` call that set up any of ``objs`` (models or optimizers):
    all of that call's models and optimizers are restored.

    Removes the policy, the hooks and the ``step`` wrapper; O2 copies the float32 masters back
    into the model (whose parameters become float32 again) and puts the model's parameters back
    into the optimizer (optimizer state carried over); O3 makes parameters float32 again (their
    values stay rounded). Afterwards ``initialize`` may be called again. ``RuntimeError`` for
    an object that was not initialized.
    """
    handles: dict[int, _Handle] = {}
    for obj in objs:
        h = getattr(obj, _ATTR, None)
        if isinstance(h, _OptState):
            h = h.handle
        if not isinstance(h, _Handle):
            raise RuntimeError(f"{type(obj).__name__} was not set up by mixprec.initialize")
        handles[id(h)] = h
    for handle in handles.values():
        _deinitialize(handle)


def _deinitialize(handle: _Handle) -> None:
    for opt in handle.optimizers:
        st = getattr(opt, _ATTR, None)
        if not isinstance(st, _OptState):
            continue
        for h in st.hooks:
            h.remove()
        if st.had_instance_step:
            opt.step = st.orig_step  # type: ignore[method-assign]
        else:
            with contextlib.suppress(AttributeError):
                del opt.step
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
        delattr(opt, _ATTR)
    for ph in handle.policy_handles:
        ph.remove()
    handle.policy_handles.clear()
    for h in handle.hooks:
        h.remove()
    handle.hooks.clear()
    with torch.no_grad():
        for p in handle.lowered.values():
            orig = handle.orig_dtypes.get(id(p), torch.float32)
            if p.dtype != orig:
                p.data = p.data.to(orig)
    for m in handle.models:
        if getattr(m, _ATTR, None) is handle:
            delattr(m, _ATTR)
