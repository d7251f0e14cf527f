"""Mixed-precision training: loss scalers, opt levels O0-O3, master weights, checkpoints."""

from __future__ import annotations

from mixprec.amp.scaling import (
    DivergenceError,
    DynamicLossScaler,
    LossScaleCollapseWarning,
    LossScaler,
    NoOpLossScaler,
    OptState,
    SkippedStep,
    StaticLossScaler,
)
from mixprec.amp.training import (
    OPT_LEVELS,
    AmpConfig,
    deinitialize,
    get_config,
    get_scaler,
    initialize,
    is_norm,
    last_step_skipped,
    master_params,
    scale_loss,
    skipped_steps,
)

__all__ = [
    "OPT_LEVELS",
    "AmpConfig",
    "DivergenceError",
    "DynamicLossScaler",
    "LossScaleCollapseWarning",
    "LossScaler",
    "NoOpLossScaler",
    "OptState",
    "SkippedStep",
    "StaticLossScaler",
    "deinitialize",
    "get_config",
    "get_scaler",
    "initialize",
    "is_norm",
    "last_step_skipped",
    "master_params",
    "scale_loss",
    "skipped_steps",
]
