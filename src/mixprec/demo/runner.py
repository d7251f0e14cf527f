"""``mixprec demo``: the mixed-precision paper's ablation, on data that ships with the install.

Trains two small models — an MLP on scikit-learn's bundled 8x8 digits and a character-level
transformer on the standard library's own docstrings — once per precision recipe (fp32; fp16 O2
with master weights and dynamic loss scaling; fp16 without master weights; fp16 without loss
scaling; bf16; fp8 e4m3/e5m2 HYBRID with per-tensor scaling), all emulated bit-exactly on any
CPU, and writes ``report.md``, ``report.json``, ``curves.png`` and ``grad_hist.png``.

>>> from mixprec.demo.runner import DemoConfig, run_demo
>>> doc = run_demo(DemoConfig.quick(), out_dir="mixprec-report")  # doctest: +SKIP

Everything is seeded: two runs on the same machine give the same numbers (wall times aside).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mixprec.demo.data import DigitsData, TextData, load_digits, load_text
from mixprec.demo.models import CharTransformer, DigitsMLP, MLPConfig, TransformerConfig
from mixprec.demo.recipes import (
    Engine,
    MixprecEngine,
    Recipe,
    log2_histogram,
    make_engine,
    probe_gradients,
    resolve_recipes,
)
from mixprec.demo.report import SCHEMA_VERSION

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
    optimizer: str = "sgd"  # "sgd" (momentum 0.9) or "adamw"
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
    "quick": {
        "digits": TaskSpec("digits", steps=800, batch_size=64, lr=0.05),
        "text": TaskSpec("text", steps=250, batch_size=8, lr=0.1, warmup=25),
    },
    "default": {
        "digits": TaskSpec("digits", steps=1500, batch_size=64, lr=0.05, seeds=3),
        "text": TaskSpec("text", steps=1000, batch_size=16, lr=0.1, warmup=100),
    },
}  # fmt: skip


@dataclass(frozen=True)
class DemoConfig:
    """What ``run_demo`` trains: tasks x recipes, seed, and the preset's name for the report."""

    tasks: tuple[TaskSpec, ...]
    recipes: tuple[Recipe, ...] = field(default_factory=lambda: resolve_recipes(None))
    seed: int = 0
    preset: str = "custom"
    deterministic: bool = True
    backend: str = "auto"  # "mixprec" (public API), "internal" (own emulation) or "auto"

    def __post_init__(self) -> None:
        if self.backend not in ("auto", "mixprec", "internal"):
            raise ValueError(
                f"backend must be 'auto', 'mixprec' or 'internal', got {self.backend!r}"
            )

    @classmethod
    def preset_config(
        cls,
        preset: str,
        *,
        tasks: str | tuple[str, ...] | None = None,
        formats: str | tuple[str, ...] | None = None,
        seed: int = 0,
        backend: str = "auto",
    ) -> DemoConfig:
        """``"quick"`` (< 2 min on 2 cores), ``"default"`` (< 15 min) or ``"tiny"`` (tests)."""
        if preset not in _PRESETS:
            raise ValueError(f"preset must be one of {', '.join(_PRESETS)}; got {preset!r}")
        if tasks is None or tasks == "all":
            names: tuple[str, ...] = TASKS
        elif isinstance(tasks, str):
            names = tuple(t.strip() for t in tasks.split(",") if t.strip())
        else:
            names = tuple(tasks)
        for t in names:
            if t not in TASKS:
                raise ValueError(f"unknown task {t!r}; valid tasks are {', '.join(TASKS)}, all")
        return cls(
            tasks=tuple(_PRESETS[preset][t] for t in names),
            recipes=resolve_recipes(formats),
            seed=seed,
            preset=preset,
            backend=backend,
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


# --------------------------------------------------------------------------------------------
# one training run
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _deterministic(enabled: bool) -> Iterator[None]:
    """Deterministic algorithms inside, previous setting restored after (also on error)."""
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(enabled or prev, warn_only=prev_warn if prev else False)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


class _Task:
    """Data, model factory, batches and metric of one task (built once, shared by all recipes)."""

    def __init__(self, spec: TaskSpec, seed: int) -> None:
        self.spec = spec
        self.seed = seed
        self.data: DigitsData | TextData
        if spec.name == "digits":
            self.data = load_digits(seed=seed)
            self.metric = "accuracy"
        else:
            self.data = load_text(max_chars=spec.max_chars)
            self.metric = "perplexity"
            n = (len(self.data.val) - 1) // spec.context
            take = min(n, spec.val_windows)
            idx = torch.arange(take)[:, None] * spec.context + torch.arange(spec.context + 1)
            self.val_windows = self.data.val[idx]
        self.probe_batch = self._batches(torch.Generator().manual_seed(seed + 999))()

    def dataset_json(self) -> dict[str, Any]:
        d = self.data
        if isinstance(d, DigitsData):
            return {
                "name": d.source,
                "n_train": len(d.y_train),
                "n_val": len(d.y_val),
                "sha256": d.sha256,
            }
        return {
            "name": d.source,
            "n_train": len(d.train),
            "n_val": len(d.val),
            "sha256": d.sha256,
            "modules": list(d.modules),
        }

    def model(self) -> torch.nn.Module:
        s = self.spec
        if s.name == "digits":
            return DigitsMLP(MLPConfig(hidden=s.hidden, depth=s.depth))
        vocab = self.data.vocab_size  # type: ignore[union-attr]
        return CharTransformer(
            TransformerConfig(vocab, s.d_model, s.n_layers, s.n_heads, s.context)
        )

    def shadow(self, model: torch.nn.Module) -> torch.nn.Module:
        """A plain float32 copy of ``model``'s current weights, outside any precision policy.

        ``mixprec.initialize`` puts its policy on the model itself, so gradients measured on
        the trained model would already be rounded; the probe needs the unrounded ones.
        """
        with torch.random.fork_rng(devices=[]):
            copy = self.model()
        copy.load_state_dict({k: v.detach().float() for k, v in model.state_dict().items()})
        return copy

    def optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        s = self.spec
        if s.optimizer == "sgd":
            return torch.optim.SGD(
                model.parameters(), lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay
            )
        return torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)

    def _batches(self, gen: torch.Generator) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
        s = self.spec
        if isinstance(self.data, DigitsData):
            x, y = self.data.x_train, self.data.y_train
            state = {"perm": torch.randperm(len(y), generator=gen), "pos": 0}

            def next_digits() -> tuple[torch.Tensor, torch.Tensor]:
                if state["pos"] + s.batch_size > len(y):  # new epoch, new order
                    state["perm"] = torch.randperm(len(y), generator=gen)
                    state["pos"] = 0
                i = state["perm"][state["pos"] : state["pos"] + s.batch_size]
                state["pos"] += s.batch_size
                return x[i], y[i]

            return next_digits
        text = self.data.train

        def next_text() -> tuple[torch.Tensor, torch.Tensor]:
            start = torch.randint(0, len(text) - s.context - 1, (s.batch_size,), generator=gen)
            w = text[start[:, None] + torch.arange(s.context + 1)]
            return w[:, :-1], w[:, 1:]

        return next_text

    def run_seed(self, repeat: int) -> int:
        """Seed of initialisation and batch order for repeat ``repeat`` (data split fixed)."""
        return self.seed + 7919 * repeat

    def batches(self, repeat: int = 0) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
        """A fresh batch stream; every recipe sees the same batches in the same order."""
        return self._batches(torch.Generator().manual_seed(self.run_seed(repeat) + 1))

    @staticmethod
    def loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = model(x)
        # the loss is a reduction: float32, as in every recipe of the paper
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, engine: Engine | MixprecEngine) -> float:
        """Validation accuracy in % (digits) or perplexity (text), in the recipe's precision."""
        model.eval()
        try:
            with engine.autocast():
                if isinstance(self.data, DigitsData):
                    pred = model(self.data.x_val).argmax(-1)
                    return float((pred == self.data.y_val).double().mean() * 100.0)
                w = self.val_windows
                return float(torch.exp(self.loss(model, w[:, :-1], w[:, 1:]).double()))
        finally:
            model.train()


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _downsample(values: list[float], points: int = 200) -> tuple[list[int], list[float | None]]:
    """Bin means of a per-step curve (NaN/inf bins become None) and the bins' last step."""
    n = len(values)
    if n <= points:
        return list(range(1, n + 1)), [_finite_or_none(v) for v in values]
    steps, means = [], []
    for b in range(points):
        lo, hi = b * n // points, (b + 1) * n // points
        chunk = values[lo:hi]
        steps.append(hi)
        means.append(_finite_or_none(sum(chunk) / len(chunk)))
    return steps, means


def _add(a: list[int], b: list[int]) -> list[int]:
    return [u + v for u, v in zip(a, b, strict=True)]


def train_run(
    task: _Task,
    recipe: Recipe,
    *,
    on_step: Callable[[int, float], None] | None = None,
    histogram: bool = False,
    repeat: int = 0,
    backend: str = "auto",
) -> dict[str, Any]:
    """Train ``task``'s model once under ``recipe``; returns the run's JSON record.

    ``repeat`` selects the initialisation and batch order (``task.run_seed(repeat)``).

    ``on_step(step, loss)`` is called after every step (progress bars). With ``histogram`` the
    gradient probes' log2-magnitude histograms are included (the report plots the baseline's).
    """
    spec = task.spec
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(task.run_seed(repeat))  # same initial weights for every recipe
        model = task.model()
    optimizer = task.optimizer(model)
    engine = make_engine(
        recipe, model, optimizer, backend=backend, growth_interval=spec.growth_interval
    )
    model, optimizer = engine.model, engine.optimizer
    next_batch = task.batches(repeat)
    eval_at = {round(spec.steps * (i + 1) / spec.evals) for i in range(spec.evals)}
    probe_at = {round(spec.steps * (i + 1) / spec.probes) for i in range(spec.probes)}
    losses: list[float] = []
    evals: list[tuple[int, float]] = []
    scales: list[tuple[int, float]] = [(0, engine.loss_scale)]
    probes: list[dict[str, Any]] = []
    hist_act = hist_wt = None
    px, py = task.probe_batch
    elapsed = 0.0
    for step in range(1, spec.steps + 1):
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = spec.lr_at(step - 1)
        x, y = next_batch()
        with engine.autocast():
            loss = task.loss(model, x, y)
        engine.backward(loss)
        engine.step()
        loss_value = float(loss.detach())
        losses.append(loss_value)
        if engine.loss_scale != scales[-1][1]:
            scales.append((step, engine.loss_scale))
        if step in eval_at:
            evals.append((step, task.evaluate(model, engine)))
        elapsed += time.perf_counter() - t0
        if step in probe_at:  # measurement, not training: outside the timed region
            probe = probe_gradients(task.shadow(model), lambda m: task.loss(m, px, py))
            act, wt = probe.flushed(
                recipe.grad, scale=engine.loss_scale, per_tensor=recipe.per_tensor_scaling
            )
            act1, wt1 = probe.flushed(recipe.grad, scale=1.0)
            probes.append(
                {
                    "step": step,
                    "loss_scale": engine.loss_scale,
                    "act_flushed": act,
                    "weight_flushed": wt,
                    "act_flushed_unscaled": act1,
                    "weight_flushed_unscaled": wt1,
                }
            )
            if histogram:
                a = torch.cat(probe.act) if probe.act else torch.zeros(0)
                w = torch.cat(probe.weight) if probe.weight else torch.zeros(0)
                edges, ca = log2_histogram(a)
                _, cw = log2_histogram(w)
                hist_act = ca if hist_act is None else _add(hist_act, ca)
                hist_wt = cw if hist_wt is None else _add(hist_wt, cw)
        if on_step is not None:
            on_step(step, loss_value)
    tail = losses[-max(1, spec.steps // 10) :]
    final_loss = sum(tail) / len(tail)
    steps_json, curve = _downsample(losses)
    record: dict[str, Any] = {
        "recipe": recipe.to_json(),
        "final_train_loss": _finite_or_none(final_loss),
        "val_metric": _finite_or_none(evals[-1][1]),
        "metric": task.metric,
        "diverged": not all(math.isfinite(v) for v in (final_loss, evals[-1][1])),
        "steps": spec.steps,
        "steps_skipped": engine.skipped,
        "final_loss_scale": engine.loss_scale,
        "act_grads_flushed": sum(p["act_flushed"] for p in probes) / len(probes),
        "weight_grads_flushed": sum(p["weight_flushed"] for p in probes) / len(probes),
        "updates_lost": engine.updates_lost / engine.updates if engine.updates else 0.0,
        "wall_time_s": elapsed,
        "backend": engine.backend,
        "curves": {
            "train_loss": {"step": steps_json, "value": curve},
            "val_metric": {
                "step": [s for s, _ in evals],
                "value": [_finite_or_none(v) for _, v in evals],
            },
            "loss_scale": {"step": [s for s, _ in scales], "value": [v for _, v in scales]},
        },
        "probes": probes,
    }
    if histogram and hist_act is not None:
        record["grad_histogram"] = {"log2_edges": edges, "activation": hist_act, "weight": hist_wt}
    return record


def _bar_callback(bars: Any, bar: Any, steps: int, repeat: int) -> Callable[[int, float], None]:
    def on_step(step: int, loss: float) -> None:
        if step % 10 == 0 or step == steps:  # a redraw per step would cost more than the step
            bars.update(bar, completed=repeat * steps + step, loss=f"{loss:.4f}")

    return on_step


def _mean(values: list[float | None]) -> float | None:
    if any(v is None for v in values):
        return None
    return sum(values) / len(values)  # type: ignore[arg-type]


def _merge_repeats(task: _Task, records: list[dict[str, Any]]) -> dict[str, Any]:
    """One record for a recipe's repeats: means of the metrics, per-seed values kept; curves,
    probes and histogram from the first repeat; wall time summed."""
    out = dict(records[0])
    for key in ("final_train_loss", "val_metric"):
        out[key] = _mean([r[key] for r in records])
    for key in ("act_grads_flushed", "weight_grads_flushed", "updates_lost", "steps_skipped"):
        out[key] = sum(r[key] for r in records) / len(records)
    if len(records) > 1:
        out["steps_skipped"] = float(out["steps_skipped"])
    out["diverged"] = any(r["diverged"] for r in records)
    out["wall_time_s"] = sum(r["wall_time_s"] for r in records)
    out["per_seed"] = {
        "seed": [task.run_seed(k) for k in range(len(records))],
        "final_train_loss": [r["final_train_loss"] for r in records],
        "val_metric": [r["val_metric"] for r in records],
    }
    return out


# --------------------------------------------------------------------------------------------
# the whole demo
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """``torch.set_num_threads(n)`` inside, the previous count restored after."""
    prev = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _task_json(task: _Task, preset: str) -> dict[str, Any]:
    s = task.spec
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(task.seed)
        n = _n_params(task.model())
    training = {
        "steps": s.steps,
        "seeds": s.seeds,
        "batch_size": s.batch_size,
        "lr": s.lr,
        "optimizer": s.optimizer,
        "momentum": s.momentum if s.optimizer == "sgd" else None,
        "weight_decay": s.weight_decay,
        "warmup": s.warmup,
        "schedule": "linear warm-up, cosine decay",
        "growth_interval": s.growth_interval,
        "evals": s.evals,
        "probes": s.probes,
    }
    if s.name == "text":
        training["context"] = s.context
    return {
        "name": s.name,
        "metric": task.metric,
        "metric_unit": "%" if task.metric == "accuracy" else "",
        "higher_is_better": task.metric == "accuracy",
        "dataset": task.dataset_json(),
        "model": {**s.model_json(), "parameters": n},
        "training": training,
        "runs": [],
        "findings": [],
        "summary": "",
        "preset": preset,
    }


def _progress(console: Any, enabled: bool) -> Any:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("{task.description:<28}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:>8}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
        transient=False,
    )


def run_demo(
    config: DemoConfig,
    out_dir: str | Path = "mixprec-report",
    *,
    console: Any = None,
    progress: bool = True,
    threads: int | None = 1,
) -> dict[str, Any]:
    """Train every task under every recipe of ``config``; write the report into ``out_dir``.

    Writes ``report.md``, ``report.json``, ``curves.png``, ``grad_hist.png`` (creating
    ``out_dir``) and returns the JSON document. ``console``: a ``rich.console.Console`` for the
    progress bars and the final table (default: stdout); ``progress=False`` hides the bars.
    ``threads``: torch CPU threads during training (default 1: the models are small, one thread is
    as fast on two cores, immune to a busy machine, and makes the numbers independent of the
    core count; ``None`` keeps the current setting). Everything is restored on return.
    """
    import datetime
    import json

    from rich.console import Console

    from mixprec.demo import report as rep

    if not config.tasks:
        raise ValueError("DemoConfig.tasks is empty; choose at least one of " + ", ".join(TASKS))
    if not config.recipes or config.recipes[0].id != "fp32":
        raise ValueError("DemoConfig.recipes must start with the fp32 baseline (RECIPES['fp32'])")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if console is None:
        console = Console()
        if not console.is_terminal:  # a log file: no reason to squeeze the table into 80 columns
            console = Console(width=150)
    t_start = time.perf_counter()
    doc: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "tool": "mixprec demo",
        "preset": config.preset,
        "config": {
            "seed": config.seed,
            "deterministic": config.deterministic,
            "backend": config.backend,
            "threads": threads,
            "recipes": [r.id for r in config.recipes],
            "tasks": [t.name for t in config.tasks],
        },
        "environment": {},
        "tasks": [],
        "wall_time_s": 0.0,
        "created_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    with _threads(threads), _deterministic(config.deterministic):
        doc["environment"] = rep.environment()
        with _progress(console, progress) as bars:
            for spec in config.tasks:
                task = _Task(spec, config.seed)
                tj = _task_json(task, config.preset)
                for recipe in config.recipes:
                    total = spec.steps * spec.seeds
                    bar = bars.add_task(f"{spec.name} · {recipe.id}", total=total, loss="")
                    records = []
                    for k in range(spec.seeds):
                        on_step = _bar_callback(bars, bar, spec.steps, k)
                        records.append(
                            train_run(
                                task,
                                recipe,
                                on_step=on_step,
                                histogram=recipe.id == "fp32" and k == 0,
                                repeat=k,
                                backend=config.backend,
                            )
                        )
                    tj["runs"].append(_merge_repeats(task, records))
                base = tj["runs"][0]["val_metric"]
                for run in tj["runs"]:
                    v = run["val_metric"]
                    run["delta_vs_fp32"] = None if v is None or base is None else v - base
                tj["findings"] = rep.findings(tj)
                tj["summary"] = rep.summary(tj)
                del tj["preset"]
                doc["tasks"].append(tj)
    doc["wall_time_s"] = time.perf_counter() - t_start
    rep.validate_report(doc)
    (out / "report.json").write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
    rep.write_plots(doc, out)
    (out / "report.md").write_text(rep.render_markdown(doc))
    for table in rep.rich_tables(doc):
        console.print(table)
    for tj in doc["tasks"]:
        console.print(f"[bold]{tj['name']}[/bold]")
        for f in tj["findings"]:
            mark = {True: "[green]✓[/green]", False: "[red]✗[/red]", None: "-"}[f["holds"]]
            console.print(f"  {mark} {f['claim']}: {f['detail']}", highlight=False)
    console.print(f"report written to {out}/ (report.md, report.json, curves.png, grad_hist.png)")
    return doc
