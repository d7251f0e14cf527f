"""Mixed-precision training: loss scalers, opt levels O0-O3, master weights, checkpoints.

Modules, one concept each: ``scaling`` (the loss scalers and their state machine), ``overflow``
(the one check+unscale+all-reduce path), ``config`` (opt levels, typed arguments, AmpConfig),
``plan`` (validate and plan ``initialize``), ``lifecycle`` (``initialize``/``deinitialize``),
``masters`` (compute-format weights, float32 masters), ``optimizer_check`` (O3: the
optimizer's ``eps`` against the format), ``iteration`` (``scale_loss`` and the
wrapped ``optimizer.step``), ``checkpoint`` (state-dict hooks), ``state`` (per-object state and
its accessors), ``opt_levels`` (each level's op policy).
"""

from __future__ import annotations

from mixprec.amp.config import (
    OPT_LEVELS,
    AmpConfig,
    KeepFp32,
    LossScaleSpec,
    OptimizerPrecisionWarning,
    OptimizerStateSpec,
    OptLevel,
    is_norm,
)
from mixprec.amp.iteration import scale_loss
from mixprec.amp.lifecycle import deinitialize, initialize
from mixprec.amp.opt_levels import level_policy
from mixprec.amp.plan import AmpOptions
from mixprec.amp.scaling import (
    SCALE_FLOOR,
    DivergenceError,
    DynamicLossScaler,
    LossScaleCollapseWarning,
    LossScaler,
    NoOpLossScaler,
    OptState,
    SkippedStep,
    StaticLossScaler,
)
from mixprec.amp.state import (
    get_config,
    get_scaler,
    last_step_skipped,
    master_params,
    skipped_steps,
)

__all__ = [
    "OPT_LEVELS",
    "SCALE_FLOOR",
    "AmpConfig",
    "AmpOptions",
    "DivergenceError",
    "DynamicLossScaler",
    "KeepFp32",
    "LossScaleCollapseWarning",
    "LossScaleSpec",
    "LossScaler",
    "NoOpLossScaler",
    "OptLevel",
    "OptState",
    "OptimizerPrecisionWarning",
    "OptimizerStateSpec",
    "SkippedStep",
    "StaticLossScaler",
    "deinitialize",
    "get_config",
    "get_scaler",
    "initialize",
    "is_norm",
    "last_step_skipped",
    "level_policy",
    "master_params",
    "scale_loss",
    "skipped_steps",
]
