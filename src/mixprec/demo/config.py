"""What ``mixprec demo`` trains: :class:`TaskSpec` per task, the presets, :class:`DemoConfig`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from mixprec.demo.recipes import Recipe, resolve_recipes

TASKS: tuple[str, ...] = ("digits", "text")


@dataclass(frozen=True)
class TaskSpec:
    """One task's data, model and optimisation settings.

    ``lr`` follows a linear warm-up over ``warmup`` steps then a cosine decay to
    ``lr * final_lr_fraction``: late updates become small, which is where weights stored without
    an fp32 master copy stop moving.
    """

    name: str  # "digits" or "text"
    steps: int
    batch_size: int
    lr: float
    optimizer: str = "sgd"  # "sgd" (with ``momentum``) or "adamw"
    momentum: float = 0.9
    weight_decay: float = 0.0
    warmup: int = 0
    final_lr_fraction: float = 0.1
    seeds: int = 1  # independent repeats (initialisation and batch order); metrics are means
    evals: int = 10  # validation points along the run (the last one is at the end)
    probes: int = 4  # gradient probes along the run (the last one is at the end)
    growth_interval: int = 2000  # dynamic loss scale: good steps before doubling
    # digits model
    hidden: int = 128
    depth: int = 3
    # text model and data
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    context: int = 64
    max_chars: int = 300_000
    val_windows: int = 64

    def __post_init__(self) -> None:
        if self.name not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}; got {self.name!r}")
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw'; got {self.optimizer!r}")
        for what in ("steps", "batch_size", "evals", "probes", "seeds"):
            if getattr(self, what) < 1:
                raise ValueError(f"{what} must be >= 1; got {getattr(self, what)!r}")

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        t = (step - self.warmup) / max(1, self.steps - self.warmup)
        lo = self.lr * self.final_lr_fraction
        return lo + (self.lr - lo) * 0.5 * (1.0 + math.cos(math.pi * t))

    def model_json(self) -> dict[str, Any]:
        if self.name == "digits":
            return {"kind": "mlp", "hidden": self.hidden, "depth": self.depth}
        return {
            "kind": "char-transformer",
            "d_model": self.d_model,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "context": self.context,
        }


_PRESETS: dict[str, dict[str, TaskSpec]] = {
    "tiny": {  # the test's configuration: seconds, not a result
        "digits": TaskSpec("digits", steps=24, batch_size=32, lr=0.05, evals=2, probes=2,
                           hidden=32, depth=2),
        "text": TaskSpec("text", steps=8, batch_size=4, lr=0.1, evals=2,
                         probes=2, d_model=32, n_layers=1, n_heads=2, context=16,
                         max_chars=20_000, val_windows=8),
    },
    # quick: the default's models, optimiser, peak lr and batch sizes, fewer steps. Digits keeps a
    # second seed (one validation image is 0.22 pp: a single seed's noise alone can exceed the
    # 0.5 pp tolerance); text keeps batch 16 and a 50-step warm-up (with batch 8 and 25 steps
    # the low-precision runs took loss spikes fp32 did not, and had not recovered by step 250).
    # Text trains with plain SGD (no momentum) at lr 0.025 decaying to 1% of it: steps about 40x
    # smaller than momentum 0.9 at lr 0.1 take, so that 40-55% of the updates fall below half
    # an fp16 spacing of their weight and the paper's master-weight effect shows (with momentum
    # 0.9 only ~15% did and O3 trained as well as O2; docs/demo.md has the search).
    "quick": {
        "digits": TaskSpec("digits", steps=800, batch_size=64, lr=0.05, seeds=2),
        "text": TaskSpec("text", steps=250, batch_size=16, lr=0.025, momentum=0.0, warmup=50,
                         final_lr_fraction=0.01),
    },
    "default": {
        "digits": TaskSpec("digits", steps=1500, batch_size=64, lr=0.05, seeds=3),
        "text": TaskSpec("text", steps=1000, batch_size=16, lr=0.025, momentum=0.0,
                         warmup=100, final_lr_fraction=0.01),
    },
}  # fmt: skip


def resolve_tasks(tasks: str | tuple[str, ...] | list[str] | None) -> tuple[str, ...]:
    """Task names for a ``--task`` value: ``None`` or ``"all"`` (anywhere in a comma-separated
    list) gives every task in :data:`TASKS` order; otherwise the names as given."""
    if tasks is None:
        return TASKS
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    names = tuple(tasks)
    if not names:
        raise ValueError(f"no task given: expected {', '.join(TASKS)} or all (comma-separated)")
    for t in names:
        if t != "all" and t not in TASKS:
            raise ValueError(f"unknown task {t!r}; valid tasks are {', '.join(TASKS)}, all")
    return TASKS if "all" in names else names


@dataclass(frozen=True)
class DemoConfig:
    """What ``run_demo`` trains: tasks x recipes, seed, and the preset's name for the report."""

    tasks: tuple[TaskSpec, ...]
    recipes: tuple[Recipe, ...] = field(default_factory=lambda: resolve_recipes(None))
    seed: int = 0
    preset: str = "custom"
    deterministic: bool = True

    @classmethod
    def preset_config(
        cls,
        preset: str,
        *,
        tasks: str | tuple[str, ...] | None = None,
        formats: str | tuple[str, ...] | None = None,
        seed: int = 0,
    ) -> DemoConfig:
        """``"quick"`` (< 2 min on 2 cores), ``"default"`` (< 15 min) or ``"tiny"`` (tests)."""
        if preset not in _PRESETS:
            raise ValueError(f"preset must be one of {', '.join(_PRESETS)}; got {preset!r}")
        return cls(
            tasks=tuple(_PRESETS[preset][t] for t in resolve_tasks(tasks)),
            recipes=resolve_recipes(formats),
            seed=seed,
            preset=preset,
        )

    @classmethod
    def quick(cls, **kw: Any) -> DemoConfig:
        return cls.preset_config("quick", **kw)

    @classmethod
    def default(cls, **kw: Any) -> DemoConfig:
        return cls.preset_config("default", **kw)

    @classmethod
    def tiny(cls, **kw: Any) -> DemoConfig:
        return cls.preset_config("tiny", **kw)
