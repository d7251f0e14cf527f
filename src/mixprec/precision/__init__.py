"""Precision policies and the regions that execute them (native or emulated)."""

from __future__ import annotations

from mixprec.precision.accumulate import (
    DEFAULT_ACCUMULATE_BLOCK,
    Accumulate,
)
from mixprec.precision.executor import (
    Executor,
)
from mixprec.precision.fp8 import (
    DEFAULT_RECIPE,
    CurrentScaling,
    DelayedScaling,
    Fp8Recipe,
    coerce_recipe,
    default_recipe,
)
from mixprec.precision.native import (
    cpu_has_fast_bf16,
    native_is_fast,
)
from mixprec.precision.policy import (
    DEFAULT_FOLLOW,
    DEFAULT_FP32,
    DEFAULT_LOW,
    REASONS,
    FormatSpec,
    OpLists,
    Policy,
    policy_format_names,
    resolve_format,
)
from mixprec.precision.region import (
    Autocast,
    CheckpointPrecisionWarning,
    PolicyHandle,
    apply_policy,
    autocast,
    checkpoint_context,
    current_policy,
    is_emulating,
)

__all__ = [
    "DEFAULT_ACCUMULATE_BLOCK",
    "DEFAULT_FOLLOW",
    "DEFAULT_FP32",
    "DEFAULT_LOW",
    "DEFAULT_RECIPE",
    "REASONS",
    "Accumulate",
    "Autocast",
    "CheckpointPrecisionWarning",
    "CurrentScaling",
    "DelayedScaling",
    "Executor",
    "FormatSpec",
    "Fp8Recipe",
    "OpLists",
    "Policy",
    "PolicyHandle",
    "apply_policy",
    "autocast",
    "checkpoint_context",
    "coerce_recipe",
    "cpu_has_fast_bf16",
    "current_policy",
    "default_recipe",
    "is_emulating",
    "native_is_fast",
    "policy_format_names",
    "resolve_format",
]
