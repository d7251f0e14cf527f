"""One training run of ``mixprec demo``: a task's data and model, the loop, the run's record.

:func:`train_run` trains one task once under one recipe through :class:`RecipeTrainer` (the
public API), evaluating and probing gradients at fixed steps, and returns the run's JSON record.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from mixprec.demo.config import TaskSpec
from mixprec.demo.data import DigitsData, TextData, load_digits, load_text
from mixprec.demo.models import CharTransformer, DigitsMLP, MLPConfig, TransformerConfig
from mixprec.demo.probes import GradientProbe, log2_histogram, probe_gradients
from mixprec.demo.recipes import Recipe, RecipeTrainer

Batches = Callable[[], tuple[torch.Tensor, torch.Tensor]]


class Task:
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

    def _batches(self, gen: torch.Generator) -> Batches:
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

    def batches(self, repeat: int = 0) -> Batches:
        """A fresh batch stream; every recipe sees the same batches in the same order."""
        return self._batches(torch.Generator().manual_seed(self.run_seed(repeat) + 1))

    @staticmethod
    def loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = model(x)
        # the loss is a reduction: float32, as in every recipe of the paper
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, trainer: RecipeTrainer) -> float:
        """Validation accuracy in % (digits) or perplexity (text), in the recipe's precision."""
        model.eval()
        try:
            with trainer.autocast():
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


@dataclass
class _History:
    """What one run records along the way (per-step losses, evaluations, probes, histograms)."""

    scales: list[tuple[int, float]]
    losses: list[float] = field(default_factory=list)
    evals: list[tuple[int, float]] = field(default_factory=list)
    probes: list[dict[str, Any]] = field(default_factory=list)
    hist: dict[str, Any] | None = None
    elapsed: float = 0.0


def _checkpoints(steps: int, n: int) -> set[int]:
    """``n`` steps spread evenly over ``steps``, the last one at the end."""
    return {round(steps * (i + 1) / n) for i in range(n)}


def _start(task: Task, recipe: Recipe, repeat: int) -> RecipeTrainer:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(task.run_seed(repeat))  # same initial weights for every recipe
        model = task.model()
    optimizer = task.optimizer(model)
    return RecipeTrainer(recipe, model, optimizer, growth_interval=task.spec.growth_interval)


def _train_step(task: Task, trainer: RecipeTrainer, batch: Batches, step: int) -> float:
    """One optimizer step (learning rate of ``step``); returns the loss before it."""
    for group in trainer.optimizer.param_groups:
        group["lr"] = task.spec.lr_at(step - 1)
    x, y = batch()
    with trainer.autocast():
        loss = task.loss(trainer.model, x, y)
    trainer.backward(loss)
    trainer.step()
    return float(loss.detach())


def _add_histogram(hist: dict[str, Any] | None, probe: GradientProbe) -> dict[str, Any]:
    """``hist`` plus the probe's log2-magnitude counts (activation and weight gradients)."""
    a = torch.cat(probe.act) if probe.act else torch.zeros(0)
    w = torch.cat(probe.weight) if probe.weight else torch.zeros(0)
    edges, ca = log2_histogram(a)
    _, cw = log2_histogram(w)
    if hist is not None:
        ca = [u + v for u, v in zip(hist["activation"], ca, strict=True)]
        cw = [u + v for u, v in zip(hist["weight"], cw, strict=True)]
    return {"log2_edges": edges, "activation": ca, "weight": cw}


def _probe(
    task: Task, trainer: RecipeTrainer, step: int, history: _History, histogram: bool
) -> None:
    """Probe the current weights' gradients on the fixed probe batch (in a float32 copy)."""
    recipe, scale = trainer.recipe, trainer.loss_scale
    px, py = task.probe_batch
    probe = probe_gradients(task.shadow(trainer.model), lambda m: task.loss(m, px, py))
    act, wt = probe.flushed(recipe.grad, scale=scale, per_tensor=recipe.per_tensor_scaling)
    act1, wt1 = probe.flushed(recipe.grad, scale=1.0)
    history.probes.append(
        {
            "step": step,
            "loss_scale": scale,
            "act_flushed": act,
            "weight_flushed": wt,
            "act_flushed_unscaled": act1,
            "weight_flushed_unscaled": wt1,
        }
    )
    if histogram:
        history.hist = _add_histogram(history.hist, probe)


def train_run(
    task: Task,
    recipe: Recipe,
    *,
    on_step: Callable[[int, float], None] | None = None,
    histogram: bool = False,
    repeat: int = 0,
) -> dict[str, Any]:
    """Train ``task``'s model once under ``recipe``; returns the run's JSON record.

    ``repeat`` selects the initialisation and batch order (``task.run_seed(repeat)``).

    ``on_step(step, loss)`` is called after every step (progress bars). With ``histogram`` the
    gradient probes' log2-magnitude histograms are included (the report plots the baseline's).
    Cost: ``spec.steps`` training steps, ``spec.evals`` evaluations and ``spec.probes`` extra
    fp32 forward/backward passes (the probes are left out of the run's wall time).
    """
    spec = task.spec
    trainer = _start(task, recipe, repeat)
    batch = task.batches(repeat)
    eval_at, probe_at = _checkpoints(spec.steps, spec.evals), _checkpoints(spec.steps, spec.probes)
    history = _History(scales=[(0, trainer.loss_scale)])
    for step in range(1, spec.steps + 1):
        t0 = time.perf_counter()
        loss = _train_step(task, trainer, batch, step)
        history.losses.append(loss)
        if trainer.loss_scale != history.scales[-1][1]:
            history.scales.append((step, trainer.loss_scale))
        if step in eval_at:
            history.evals.append((step, task.evaluate(trainer.model, trainer)))
        history.elapsed += time.perf_counter() - t0
        if step in probe_at:  # measurement, not training: outside the timed region
            _probe(task, trainer, step, history, histogram)
        if on_step is not None:
            on_step(step, loss)
    return _run_record(task, trainer, history)


def _curves(history: _History) -> dict[str, Any]:
    steps, curve = _downsample(history.losses)
    return {
        "train_loss": {"step": steps, "value": curve},
        "val_metric": {
            "step": [s for s, _ in history.evals],
            "value": [_finite_or_none(v) for _, v in history.evals],
        },
        "loss_scale": {
            "step": [s for s, _ in history.scales],
            "value": [v for _, v in history.scales],
        },
    }


def _run_record(task: Task, trainer: RecipeTrainer, history: _History) -> dict[str, Any]:
    """The run's JSON record (schema: ``REPORT_SCHEMA``'s run, without ``delta_vs_fp32`` and
    ``per_seed``, which need the other runs)."""
    tail = history.losses[-max(1, task.spec.steps // 10) :]
    final_loss = sum(tail) / len(tail)
    val = history.evals[-1][1]
    probes = history.probes
    record: dict[str, Any] = {
        "recipe": trainer.recipe.to_json(),
        "final_train_loss": _finite_or_none(final_loss),
        "val_metric": _finite_or_none(val),
        "metric": task.metric,
        "diverged": not all(math.isfinite(v) for v in (final_loss, val)),
        "steps": task.spec.steps,
        "steps_skipped": trainer.skipped,
        "final_loss_scale": trainer.loss_scale,
        "act_grads_flushed": sum(p["act_flushed"] for p in probes) / len(probes),
        "weight_grads_flushed": sum(p["weight_flushed"] for p in probes) / len(probes),
        "updates_lost": trainer.updates_lost / trainer.updates if trainer.updates else 0.0,
        "wall_time_s": history.elapsed,
        "backend": trainer.api_call,
        "curves": _curves(history),
        "probes": probes,
    }
    if history.hist is not None:
        record["grad_histogram"] = history.hist
    return record


def _mean(values: list[float | None]) -> float | None:
    if any(v is None for v in values):
        return None
    return sum(values) / len(values)  # type: ignore[arg-type]


def merge_repeats(task: Task, records: list[dict[str, Any]]) -> dict[str, Any]:
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
