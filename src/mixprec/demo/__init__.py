"""The main job: the mixed-precision paper's ablation on shipped data, public API only."""

from __future__ import annotations

from mixprec.demo.recipes import (
    DEFAULT_FORMATS,
    RECIPES,
    Recipe,
    resolve_recipes,
)
from mixprec.demo.report import (
    REPORT_SCHEMA,
    SCHEMA_VERSION,
    validate_report,
)
from mixprec.demo.runner import (
    DemoConfig,
    TaskSpec,
    run_demo,
    train_run,
)

__all__ = [
    "DEFAULT_FORMATS",
    "RECIPES",
    "REPORT_SCHEMA",
    "SCHEMA_VERSION",
    "DemoConfig",
    "Recipe",
    "TaskSpec",
    "resolve_recipes",
    "run_demo",
    "train_run",
    "validate_report",
]
