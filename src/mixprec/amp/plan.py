"""``initialize``'s first two steps: validate the arguments (:class:`AmpOptions`), then plan
what to change (:class:`AmpPlan`, from the options and the given models and optimizers).
Neither step touches the objects, so a failing ``initialize`` leaves nothing behind before
``lifecycle.apply_plan`` makes the changes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from mixprec.amp import opt_levels as _levels
from mixprec.amp.config import (
    LOSS_SCALE_CHOICES,
    OPT_LEVELS,
    OPTIMIZER_STATES,
    AmpConfig,
    ComputeSpec,
    KeepFp32,
    LossScaleSpec,
    OptimizerStateSpec,
    OptLevel,
    is_norm,
    keep_nothing,
)
from mixprec.amp.optimizer_check import check_divisors
from mixprec.amp.scaling import (
    DivergenceMode,
    DynamicLossScaler,
    LossScaler,
    NoOpLossScaler,
    ScalerKeywords,
    SkippedStep,
    StaticLossScaler,
    check_divergence_mode,
)
from mixprec.amp.state import ATTR, as_list
from mixprec.formats import FloatFormat
from mixprec.precision import native_is_fast, resolve_format

_UNSUPPORTED_OPTIMIZERS = {
    "LBFGS": "it re-evaluates the loss through a closure, which bypasses scale_loss",
}


# ----------------------------------------------------------------------------------------------
# validate: the arguments alone
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AmpOptions:
    """``initialize``'s arguments besides the objects, validated on construction (``ValueError``
    / ``TypeError`` naming the bad value and the valid choices); ``compute_format`` is the
    resolved format (float32 at O0, where ``compute`` is ignored), ``mx_format`` the MX format's
    name when ``compute`` names one (O1 only: ``compute_format`` is then its element format)."""

    opt_level: OptLevel = "O1"
    compute: ComputeSpec = "float16"
    loss_scale: LossScaleSpec = "dynamic"
    num_losses: int = 1
    emulate: bool | None = None
    keep_fp32: KeepFp32 | None = None
    min_loss_scale: float | None = None
    max_loss_scale: float | None = 2.0**24
    on_skip: Callable[[SkippedStep], object] | None = None
    on_divergence: DivergenceMode = "raise"
    optimizer_state: OptimizerStateSpec = "compute"
    compute_format: FloatFormat = field(init=False, repr=False)
    mx_format: str | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        _check_opt_level(self.opt_level)
        if (
            isinstance(self.num_losses, bool)
            or not isinstance(self.num_losses, int)
            or self.num_losses < 1
        ):
            raise ValueError(f"num_losses must be an int >= 1, got {self.num_losses!r}")
        if self.emulate not in (None, True, False):
            raise TypeError(f"emulate must be None, True or False, got {self.emulate!r}")
        if self.keep_fp32 is not None and not callable(self.keep_fp32):
            raise TypeError(
                f"keep_fp32 must be callable (module, fqn) -> bool, got {self.keep_fp32!r}"
            )
        check_divergence_mode(self.on_divergence)
        if self.optimizer_state not in OPTIMIZER_STATES:
            raise ValueError(
                f"optimizer_state must be one of {', '.join(map(repr, OPTIMIZER_STATES))}, got "
                f"{self.optimizer_state!r}"
            )
        _check_loss_scale(self.loss_scale, self.num_losses, self.builds_scalers_with_callbacks)
        spec = resolve_format(self.compute if self.opt_level != "O0" else "float32")
        if spec.is_mx and self.opt_level != "O1":
            raise ValueError(
                f"compute={spec.name!r} is a block-scaled MX format: at {self.opt_level} the "
                "weights (and at O3 the optimizer state) would be stored in it, which needs a "
                "shared scale per block of 32; use opt_level='O1' (MX operands, float32 weights) "
                f"or its element format compute={spec.element.name!r}"
            )
        fmt = spec.element
        if fmt.bits > 32:
            raise ValueError(
                "compute must be a format of at most 32 bits (the masters are float32), got "
                f"{fmt.name}"
            )
        object.__setattr__(self, "compute_format", fmt)
        object.__setattr__(self, "mx_format", spec.name if spec.is_mx else None)

    @property
    def builds_scalers_with_callbacks(self) -> bool:
        """``on_skip``/``on_divergence`` were set: they configure scalers initialize builds."""
        return self.on_skip is not None or self.on_divergence != "raise"

    def initialize_kwargs(self) -> dict[str, Any]:
        """The arguments these options were built from, as :func:`mixprec.initialize` takes
        them (integrations that validate early, then initialize later, pass these)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}

    def scaler_keywords(self) -> ScalerKeywords:
        return ScalerKeywords(on_skip=self.on_skip, on_divergence=self.on_divergence)


def _check_opt_level(opt_level: object) -> None:
    if opt_level in OPT_LEVELS:
        return
    hint = ""
    if isinstance(opt_level, str) and opt_level.upper().replace("0", "O", 1) in OPT_LEVELS:
        hint = f" (the letter O: {opt_level.upper().replace('0', 'O', 1)!r})"
    raise ValueError(f"opt_level must be one of {', '.join(OPT_LEVELS)}, got {opt_level!r}{hint}")


def _check_loss_scale(spec: object, num_losses: int, callbacks: bool) -> None:
    """``loss_scale`` against :data:`LossScaleSpec` (errors name the valid choices)."""
    if isinstance(spec, torch.amp.GradScaler):
        raise TypeError(
            "loss_scale got a torch.amp.GradScaler; pass a mixprec scaler instead (e.g. "
            "s = DynamicLossScaler(); s.load_state_dict(grad_scaler.state_dict()))"
        )
    instances = isinstance(spec, (LossScaler, list, tuple))
    if instances and callbacks:
        raise ValueError(
            "on_skip/on_divergence configure the scalers initialize builds; with scaler "
            "instances as loss_scale set them on the instances (DynamicLossScaler(on_skip=...))"
        )
    if isinstance(spec, (list, tuple)):
        if len(spec) != num_losses or not all(isinstance(s, LossScaler) for s in spec):
            raise ValueError(
                f"a list loss_scale must hold num_losses={num_losses} mixprec scalers, got "
                f"{[type(s).__name__ for s in spec]}"
            )
        if len({id(s) for s in spec}) != len(spec):
            raise ValueError("loss_scale lists the same scaler twice; use one per loss")
    elif isinstance(spec, LossScaler):
        if num_losses != 1:
            raise ValueError(
                f"one scaler instance cannot serve num_losses={num_losses} losses (each loss "
                "needs its own scale); pass a list of scalers or 'dynamic'"
            )
    elif isinstance(spec, (int, float)) and not isinstance(spec, bool):
        if not (math.isfinite(spec) and spec > 0):
            raise ValueError(f"loss_scale must be {LOSS_SCALE_CHOICES}; got the number {spec!r}")
    elif not (spec is None or (isinstance(spec, str) and spec in ("dynamic", "none"))):
        raise ValueError(f"loss_scale must be {LOSS_SCALE_CHOICES}; got {spec!r}")


def initial_loss_scale(fmt: FloatFormat) -> float:
    """The first scale of ``initialize``'s dynamic scalers for compute format ``fmt``.

    2^16, torch's and apex's default, maps a unit gradient onto float16's largest value
    (65504, about 2^16). A narrower format gets the power of two nearest its largest value,
    so that a unit gradient still fits where O2 stores gradients in it: e4m3 2^9 (largest 448),
    e3m2 2^5, e2m1 2^3; from 2^16 it would first skip steps, halving the scale each time, until
    the gradients fit (five steps for e4m3 on a small transformer). Wider formats keep 2^16.
    """
    return float(2.0 ** min(16, round(math.log2(fmt.max))))


def _clamped(scale: float, options: AmpOptions) -> float:
    """``scale`` within the user's ``min_loss_scale`` / ``max_loss_scale``: a derived default
    must not contradict bounds given explicitly."""
    if options.max_loss_scale is not None:
        scale = min(scale, options.max_loss_scale)
    if options.min_loss_scale is not None:
        scale = max(scale, options.min_loss_scale)
    return scale


def build_scalers(options: AmpOptions) -> list[LossScaler]:
    """The ``num_losses`` scalers of a validated ``loss_scale``: the given instances, or fresh
    ones."""
    spec = options.loss_scale
    if isinstance(spec, LossScaler):
        return [spec]
    if isinstance(spec, (list, tuple)):
        return list(spec)
    kw = options.scaler_keywords()
    out: list[LossScaler] = []
    for _ in range(options.num_losses):
        if spec == "dynamic":
            scaler = DynamicLossScaler(
                init_scale=_clamped(initial_loss_scale(options.compute_format), options),
                min_scale=options.min_loss_scale,
                max_scale=options.max_loss_scale,
                **kw,
            )
            out.append(scaler)
        elif spec is None or spec == "none":
            out.append(NoOpLossScaler(**kw))
        else:
            out.append(StaticLossScaler(float(spec), **kw))  # type: ignore[arg-type]
    return out


# ----------------------------------------------------------------------------------------------
# plan: what to change on the given objects
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AmpPlan:
    """Everything ``initialize`` will change, decided before anything is touched.

    Attributes:
        config: the resulting :class:`AmpConfig`.
        models, optimizers: the objects to set up.
        scalers: one loss scaler per loss.
        names: ``id(parameter) -> qualified name`` (``models[i].`` prefixed for several models).
        lowered: ``id -> parameter`` of the model parameters to store in ``compute`` (O2/O3).
        device_type: where the models live (decides native vs emulated execution).
        policy_keep_fp32: modules that get a float32 policy of their own (an explicit
            ``keep_fp32`` only: the default norms are fp32-list ops already).
        models_is_list, optimizers_is_list, has_optimizers: the shape of the return value.
    """

    config: AmpConfig
    models: tuple[torch.nn.Module, ...]
    optimizers: tuple[torch.optim.Optimizer, ...]
    scalers: tuple[LossScaler, ...]
    names: Mapping[int, str]
    lowered: Mapping[int, torch.nn.Parameter]
    device_type: str
    policy_keep_fp32: KeepFp32 | None
    models_is_list: bool
    optimizers_is_list: bool
    has_optimizers: bool

    def result(self) -> Any:
        """``(models, optimizers)`` shaped as given, or just the models without optimizers."""
        models: Any = list(self.models) if self.models_is_list else self.models[0]
        if not self.has_optimizers:
            return models
        opts: Any = list(self.optimizers) if self.optimizers_is_list else self.optimizers[0]
        return models, opts


def plan_amp(
    models: torch.nn.Module | Sequence[torch.nn.Module],
    optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None,
    options: AmpOptions,
) -> AmpPlan:
    """Check the objects against ``options`` and decide what ``initialize`` changes."""
    model_list, models_is_list = as_list(models, "models", torch.nn.Module)
    opt_list: list[torch.optim.Optimizer] = []
    opts_is_list = False
    if optimizers is not None:
        opt_list, opts_is_list = as_list(optimizers, "optimizers", torch.optim.Optimizer)
    _check_fresh(model_list, opt_list)
    names = _parameter_names(model_list)
    _check_optimizer_params(opt_list, names)
    device_type = _device_type(model_list)
    config = AmpConfig(
        opt_level=options.opt_level,
        compute=options.compute_format,
        emulate=_resolve_emulate(options, device_type),
        master_weights=options.opt_level == "O2",
        num_losses=options.num_losses,
        optimizer_state=options.optimizer_state,
        mx_format=options.mx_format,
        device_type=device_type,
    )
    _check_optimizer_state(config)
    check_divisors(opt_list, config, stacklevel=4)  # warn -> check_divisors -> plan -> init
    lowered: dict[int, torch.nn.Parameter] = {}
    if config.lowers_weights:
        _check_float32(model_list, config.opt_level)
        keep = options.keep_fp32
        if keep is None:
            keep = is_norm if config.opt_level == "O2" else keep_nothing
        lowered = _lowered_params(model_list, keep)
    return AmpPlan(
        config=config,
        models=tuple(model_list),
        optimizers=tuple(opt_list),
        scalers=tuple(build_scalers(options)),
        names=names,
        lowered=lowered,
        device_type=device_type,
        policy_keep_fp32=options.keep_fp32,
        models_is_list=models_is_list,
        optimizers_is_list=opts_is_list,
        has_optimizers=optimizers is not None,
    )


def _check_optimizer_state(config: AmpConfig) -> None:
    """``optimizer_state="float32"`` at O3 needs emulation: natively the optimizer creates its
    state in the parameters' dtype and cannot mix it with float32 state."""
    if (
        config.opt_level == "O3"
        and config.optimizer_state == "float32"
        and not (config.emulate or config.compute.name == "float32")
    ):
        raise ValueError(
            f"optimizer_state='float32' at O3 needs emulated {config.compute.name} "
            "(emulate=True): natively, torch optimizers create their state in the parameters' "
            "dtype; use emulate=True, or opt_level='O2' (float32 masters and state)"
        )


def _check_fresh(models: Sequence[torch.nn.Module], opts: Sequence[torch.optim.Optimizer]) -> None:
    """No object initialized already, none listed twice, no unsupported optimizer."""
    for i, model in enumerate(models):
        if getattr(model, ATTR, None) is not None:
            raise RuntimeError(
                f"models[{i}] ({type(model).__name__}) was already set up by mixprec.initialize; "
                "call mixprec.amp.deinitialize(model, optimizer) first, or build a fresh model"
            )
    if len({id(m) for m in models}) != len(models):
        raise ValueError("models lists the same module twice")
    if len({id(o) for o in opts}) != len(opts):
        raise ValueError("optimizers lists the same optimizer twice")
    for i, opt in enumerate(opts):
        _check_optimizer(opt, i)


def _check_optimizer(opt: torch.optim.Optimizer, i: int) -> None:
    name = type(opt).__name__
    if name in _UNSUPPORTED_OPTIMIZERS:
        raise TypeError(
            f"optimizer {name} is not supported by mixprec.initialize: "
            f"{_UNSUPPORTED_OPTIMIZERS[name]}. Use a first-order optimizer (SGD, Adam, AdamW, "
            "...) or drive mixprec.amp.DynamicLossScaler by hand."
        )
    state = getattr(opt, ATTR, None)
    if state is not None:
        raise RuntimeError(
            f"optimizers[{i}] ({name}) was already set up by mixprec.initialize "
            f"(opt_level={state.handle.config.opt_level}); call "
            "mixprec.amp.deinitialize(...) first, or build a fresh optimizer"
        )


def _parameter_names(models: Sequence[torch.nn.Module]) -> dict[int, str]:
    """``id -> qualified name`` of every model parameter; ``TypeError`` for a non-float one."""
    names: dict[int, str] = {}
    for mi, model in enumerate(models):
        prefix = f"models[{mi}]." if len(models) > 1 else ""
        for n, p in model.named_parameters(remove_duplicate=True):
            names.setdefault(id(p), prefix + n)
            if not p.dtype.is_floating_point:
                raise TypeError(
                    f"parameter {prefix + n!r} has dtype {p.dtype}; mixprec.initialize needs "
                    "floating-point parameters (keep integer state in a buffer)"
                )
    return names


def _check_optimizer_params(
    opts: Sequence[torch.optim.Optimizer], names: Mapping[int, str]
) -> None:
    """Each parameter in one optimizer only (its gradient is unscaled once), all floating."""
    owner: dict[int, int] = {}
    for oi, opt in enumerate(opts):
        for gi, group in enumerate(opt.param_groups):
            for pi, p in enumerate(group["params"]):
                prev = owner.setdefault(id(p), oi)
                if prev == oi and p.dtype.is_floating_point:
                    continue
                where = names.get(id(p), f"optimizers[{oi}].param_groups[{gi}][{pi}]")
                if prev != oi:
                    raise ValueError(
                        f"parameter {where!r} is in optimizers[{prev}] and optimizers[{oi}]; "
                        "each parameter may belong to one optimizer only (its gradient is "
                        "unscaled once per backward)"
                    )
                raise TypeError(
                    f"parameter {where!r} has dtype {p.dtype}; mixprec.initialize needs "
                    "floating-point parameters"
                )


def _device_type(models: Sequence[torch.nn.Module]) -> str:
    """The device type of the first model parameter found (``"cpu"`` for parameterless models)."""
    for model in models:
        p = next(model.parameters(), None)
        if p is not None:
            return p.device.type
    return "cpu"


def _resolve_emulate(options: AmpOptions, device_type: str) -> bool:
    """``emulate=None`` becomes native where fast; float32/float64 always run natively."""
    fmt = options.compute_format
    emulate = options.emulate
    if emulate is None:
        emulate = not native_is_fast(fmt, device_type)
    elif emulate is False and _levels.native_dtype(fmt) is None:
        raise ValueError(
            f"emulate=False: {fmt.name} has no native torch execution (only float16, bfloat16, "
            "float32, float64); use emulate=None or True"
        )
    return False if fmt.name in ("float32", "float64") else bool(emulate)


def _check_float32(models: Sequence[torch.nn.Module], opt_level: str) -> None:
    for model in models:
        for n, p in model.named_parameters():
            if p.dtype != torch.float32:
                raise TypeError(
                    f"{opt_level} needs a float32 model to lower; parameter {n!r} is "
                    f"{p.dtype} (call model.float() before mixprec.initialize)"
                )


def _lowered_params(
    models: Sequence[torch.nn.Module], keep_fp32: KeepFp32
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
