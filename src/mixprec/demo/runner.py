"""``mixprec demo``: the mixed-precision paper's ablation, on data that ships with the install.

Trains two small models — an MLP on the UCI 8x8 handwritten digits (shipped with mixprec) and
a character-level transformer on the standard library's own docstrings — once per precision
recipe (fp32; fp16 O2 with master weights and dynamic loss scaling; fp16 without master
weights; fp16 without loss scaling; bf16; fp8 e4m3/e5m2 HYBRID with per-tensor scaling), all
emulated bit-exactly on any CPU through mixprec's public API, and writes ``report.md``,
``report.json``, ``curves.png`` and ``grad_hist.png``.

>>> from mixprec.demo import DemoConfig, run_demo
>>> doc = run_demo(DemoConfig.quick(), out_dir="mixprec-report")  # doctest: +SKIP

Everything is seeded: two runs on the same machine give the same numbers (wall times aside).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from mixprec.demo import report as rep
from mixprec.demo.config import TASKS, DemoConfig, TaskSpec
from mixprec.demo.plots import write_plots
from mixprec.demo.progress import OnStep, Progress, make_progress
from mixprec.demo.schema import SCHEMA_VERSION, validate_report
from mixprec.demo.training import Task, merge_repeats, train_run

_FILES = "report.md, report.json, curves.png, grad_hist.png"


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


def _task_json(task: Task, preset: str) -> dict[str, Any]:
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


def _offset(on_step: OnStep, steps: int, repeat: int) -> OnStep:
    """``on_step`` for repeat ``repeat`` of a run: its steps continue the previous repeats'."""
    return lambda step, loss: on_step(repeat * steps + step, loss)


def _run_task(spec: TaskSpec, config: DemoConfig, progress: Progress) -> dict[str, Any]:
    """Every recipe of ``config`` on one task (all seeds); the task's report section."""
    task = Task(spec, config.seed)
    tj = _task_json(task, config.preset)
    for recipe in config.recipes:
        on_step = progress.run(f"{spec.name} · {recipe.id}", spec.steps * spec.seeds)
        records = [
            train_run(
                task,
                recipe,
                on_step=_offset(on_step, spec.steps, k),
                histogram=recipe.id == "fp32" and k == 0,
                repeat=k,
            )
            for k in range(spec.seeds)
        ]
        tj["runs"].append(merge_repeats(task, records))
    base = tj["runs"][0]["val_metric"]
    for run in tj["runs"]:
        v = run["val_metric"]
        run["delta_vs_fp32"] = None if v is None or base is None else v - base
    tj["findings"] = rep.findings(tj)
    tj["summary"] = rep.summary(tj)  # reads "preset" (a quick run says so), then it goes
    del tj["preset"]
    return tj


def _new_doc(config: DemoConfig, threads: int | None) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": "mixprec demo",
        "preset": config.preset,
        "config": {
            "seed": config.seed,
            "deterministic": config.deterministic,
            "backend": "mixprec public API: initialize + scale_loss, autocast(fp8_recipe=...)",
            "threads": threads,
            "recipes": [r.id for r in config.recipes],
            "tasks": [t.name for t in config.tasks],
        },
        "environment": {},
        "tasks": [],
        "wall_time_s": 0.0,
        "created_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def _check(config: DemoConfig) -> None:
    if not config.tasks:
        raise ValueError("DemoConfig.tasks is empty; choose at least one of " + ", ".join(TASKS))
    if not config.recipes or config.recipes[0].id != "fp32":
        raise ValueError("DemoConfig.recipes must start with the fp32 baseline (RECIPES['fp32'])")


def _default_console() -> Any:
    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # a log file: no reason to squeeze the table into 80 columns
        console = Console(width=150)
    return console


def _write(doc: dict[str, Any], out: Path) -> None:
    validate_report(doc)
    (out / "report.json").write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
    write_plots(doc, out)
    (out / "report.md").write_text(rep.render_markdown(doc))


def _print_results(console: Any, doc: dict[str, Any], out: Path) -> None:
    for table in rep.rich_tables(doc):
        console.print(table)
    for tj in doc["tasks"]:
        console.print(f"[bold]{tj['name']}[/bold]")
        for f in tj["findings"]:
            mark = {True: "[green]✓[/green]", False: "[red]✗[/red]", None: "-"}[f["holds"]]
            console.print(f"  {mark} {f['claim']}: {f['detail']}", highlight=False)
    console.print(f"report written to {out}/ ({_FILES})")


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
    progress and the final table (default: stdout). Progress is a rich bar per run on a terminal
    and, when the console is not one (a pipe, a log file), a plain line per run every 5 s and at
    its end (:mod:`mixprec.demo.progress`); ``progress=False`` prints neither.
    ``threads``: torch CPU threads during training (default 1: the models are small, one thread is
    as fast on two cores, immune to a busy machine, and makes the numbers independent of the
    core count; ``None`` keeps the current setting). Everything is restored on return.
    Cost: about 70 s of CPU for ``DemoConfig.quick()``, 6 minutes for ``.default()``.
    """
    _check(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    console = console if console is not None else _default_console()
    t_start = time.perf_counter()
    doc = _new_doc(config, threads)
    with _threads(threads), _deterministic(config.deterministic):
        doc["environment"] = rep.environment()
        runs = len(config.tasks) * len(config.recipes)
        with make_progress(console, progress, runs) as shown:
            doc["tasks"] = [_run_task(spec, config, shown) for spec in config.tasks]
    doc["wall_time_s"] = time.perf_counter() - t_start
    _write(doc, out)
    _print_results(console, doc, out)
    return doc
