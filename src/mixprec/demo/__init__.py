"""The main job: the mixed-precision paper's ablation on shipped data, public API only.

Modules: ``config`` (what to train), ``data`` and ``models`` (the two tasks), ``recipes`` (the
precision recipes and their adapter onto mixprec's public API), ``probes`` (which gradients
flush to zero), ``training`` (one run), ``runner`` (the whole demo), ``progress`` (bars on a
terminal, plain lines in a log), ``schema``, ``report`` and ``plots`` (its outputs).
"""

from __future__ import annotations

from mixprec.demo.config import (
    TASKS,
    DemoConfig,
    TaskSpec,
    resolve_tasks,
)
from mixprec.demo.recipes import (
    DEFAULT_FORMATS,
    RECIPES,
    Recipe,
    RecipeTrainer,
    resolve_recipes,
)
from mixprec.demo.runner import (
    run_demo,
)
from mixprec.demo.schema import (
    REPORT_SCHEMA,
    SCHEMA_VERSION,
    validate_report,
)
from mixprec.demo.training import (
    Task,
    train_run,
)

__all__ = [
    "DEFAULT_FORMATS",
    "RECIPES",
    "REPORT_SCHEMA",
    "SCHEMA_VERSION",
    "TASKS",
    "DemoConfig",
    "Recipe",
    "RecipeTrainer",
    "Task",
    "TaskSpec",
    "resolve_recipes",
    "resolve_tasks",
    "run_demo",
    "train_run",
    "validate_report",
]
