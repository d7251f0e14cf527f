"""Reports of ``mixprec demo``: environment, findings, summary, markdown and terminal tables.

The JSON document is the source of truth; the markdown, the terminal table and the plots
(:mod:`mixprec.demo.plots`) are all rendered from it, so a report can be re-rendered from
``report.json`` alone. Its schema is in :mod:`mixprec.demo.schema`.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping
from typing import Any

# --------------------------------------------------------------------------------------------
# environment
# --------------------------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    """Versions and machine facts that numbers in a report depend on (no host names, no paths)."""
    import numpy
    import torch

    from mixprec import __version__
    from mixprec.machine import cpu_capability
    from mixprec.quantization import has_c_kernel

    try:
        import ml_dtypes

        mld = ml_dtypes.__version__
    except ImportError:  # pragma: no cover - a runtime dependency
        mld = None
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(terse=True),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count() or 1,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "ml_dtypes": mld,
        "mixprec": __version__,
        "cpu_capability": cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "c_kernel": has_c_kernel(),
        "device": "cpu",
        "cuda_available": bool(torch.cuda.is_available()),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "byteorder": sys.byteorder,
    }


# --------------------------------------------------------------------------------------------
# findings: the paper's claims, checked against this run's numbers
# --------------------------------------------------------------------------------------------

#: O2 must land this close to fp32: accuracy in percentage points, perplexity relative.
ACCURACY_TOLERANCE_PP = 0.5
PERPLEXITY_TOLERANCE_REL = 0.01
#: a fraction of gradients flushed to zero counts as "measurable" from here on
MEASURABLE_FLUSH = 1e-3
#: O3 "hurts" when its final training loss is this much (relative) above O2's, or its validation
#: metric is worse than O2's by more than the tolerance above
TRAIN_LOSS_GAP = 0.02


def run_of(task: Mapping[str, Any], rid: str) -> Mapping[str, Any] | None:
    """The run of recipe ``rid`` in ``task`` (None when it did not run)."""
    return next((r for r in task["runs"] if r["recipe"]["id"] == rid), None)


def _pct(x: float) -> str:
    if x == 0:
        return "0%"
    if x < 1e-4:
        return f"{x * 100:.1e}%"
    return f"{x * 100:.2f}%" if x < 0.1 else f"{x * 100:.1f}%"


def _metric_str(task: Mapping[str, Any], value: float | None) -> str:
    if value is None:
        return "diverged"
    return f"{value:.2f}%" if task["metric"] == "accuracy" else f"{value:.3f}"


def _delta_str(task: Mapping[str, Any], value: float | None) -> str:
    if value is None:
        return "—"
    value = value + 0.0 if round(value, 3) != 0 else 0.0  # no "-0.00"
    return f"{value:+.2f} pp" if task["metric"] == "accuracy" else f"{value:+.3f}"


def _worse(task: Mapping[str, Any], a: float | None, b: float | None) -> float | None:
    """How much worse metric ``a`` is than ``b`` (positive = worse), in the metric's units."""
    if a is None or b is None:
        return None
    return (b - a) if task["higher_is_better"] else (a - b)


Run = Mapping[str, Any]
Finding = dict[str, Any]


def _finding(fid: str, claim: str, holds: bool | None, detail: str) -> Finding:
    return {"id": fid, "claim": claim, "holds": holds, "detail": detail}


def _close_to_fp32(task: Mapping[str, Any], base: Run, run: Run) -> tuple[bool, str]:
    """Whether ``run`` lands within the tolerance of fp32's validation metric, and the numbers."""
    b, v, rid = base["val_metric"], run["val_metric"], run["recipe"]["id"]
    if b is None or v is None:
        return False, f"{rid} or fp32 diverged"
    if task["metric"] == "accuracy":
        tol = ACCURACY_TOLERANCE_PP
        return abs(v - b) <= tol, (
            f"{rid} {v:.2f}% vs fp32 {b:.2f}% ({v - b:+.2f} pp; tolerance ±{tol} pp)"
        )
    rel = (v - b) / b
    return abs(rel) <= PERPLEXITY_TOLERANCE_REL, (
        f"{rid} perplexity {v:.3f} vs fp32 {b:.3f} ({rel * 100:+.2f}%; "
        f"tolerance ±{PERPLEXITY_TOLERANCE_REL * 100:.0f}%)"
    )


def _vs(task: Mapping[str, Any], run: Run, ref: Run) -> float | None:
    """``run``'s validation metric minus ``ref``'s, signed as the table shows it."""
    worse = _worse(task, run["val_metric"], ref["val_metric"])
    if worse is None:
        return None
    return -worse if task["higher_is_better"] else worse


def _noscale_finding(
    task: Mapping[str, Any], noscale: Run, o2: Run | None, base: Run | None
) -> Finding:
    f_act, f_wt = noscale["act_grads_flushed"], noscale["weight_grads_flushed"]
    ref = o2["act_grads_flushed"] if o2 is not None else 0.0
    detail = (
        f"without loss scaling {_pct(f_act)} of the nonzero activation gradients and "
        f"{_pct(f_wt)} of the weight gradients flush to zero in fp16"
    )
    if o2 is not None:
        detail += (
            f"; with the dynamic loss scale (final {o2['final_loss_scale']:g}) "
            f"{_pct(o2['act_grads_flushed'])} and {_pct(o2['weight_grads_flushed'])}"
        )
    delta = None if base is None else _vs(task, noscale, base)
    if delta is not None:
        detail += f"; its validation {task['metric']} is {_delta_str(task, delta)} vs fp32"
    return _finding(
        "noscale_flushes_gradients",
        "without loss scaling a measurable fraction of gradients flushes to zero",
        f_act >= MEASURABLE_FLUSH and f_act > ref,
        detail,
    )


def _o3_finding(task: Mapping[str, Any], o3: Run, o2: Run) -> Finding:
    lost = o3["updates_lost"]
    lw, l2 = o3["final_train_loss"], o2["final_train_loss"]
    worse = _worse(task, o3["val_metric"], o2["val_metric"])
    loss_gap = None if lw is None or l2 is None or l2 <= 0 else (lw - l2) / l2
    acc = task["metric"] == "accuracy"
    # (a diverged O2 has no metric; then ``worse`` is None and the tolerance is not used)
    tol = ACCURACY_TOLERANCE_PP if acc else PERPLEXITY_TOLERANCE_REL * (o2["val_metric"] or 0.0)
    hurts = (loss_gap is not None and loss_gap > TRAIN_LOSS_GAP) or (
        worse is not None and worse > tol
    )
    detail = (
        f"without master weights {_pct(lost)} of the weight updates were smaller than half "
        f"the fp16 spacing of their weight and were lost (with master weights: "
        f"{_pct(o2['updates_lost'])})"
    )
    if loss_gap is not None:
        detail += f"; final training loss {loss_gap * 100:+.1f}% vs O2"
    delta = _vs(task, o3, o2)
    if delta is not None:
        detail += f", validation {task['metric']} {_delta_str(task, delta)} vs O2"
    return _finding(
        "o3_loses_updates",
        "without fp32 master weights, updates smaller than the weights' spacing are lost and "
        "training suffers",
        lost >= MEASURABLE_FLUSH and hurts,
        detail,
    )


def _close_finding(task: Mapping[str, Any], base: Run, run: Run, fmt: str) -> Finding:
    """bf16 (``fmt="bf16"``) or fp8 HYBRID (``"e5m2"``) against fp32, with its flush rate."""
    holds, detail = _close_to_fp32(task, base, run)
    flushed = _pct(run["act_grads_flushed"])
    if fmt == "bf16":
        detail += (
            f"; without any loss scaling {flushed} of activation gradients flush to zero in bf16"
        )
        return _finding(
            "bf16_needs_no_scaling", "bf16 trains like fp32 without loss scaling", holds, detail
        )
    detail += f"; with per-tensor scaling {flushed} of activation gradients flush to zero in e5m2"
    return _finding(
        "fp8_hybrid_close", "fp8 HYBRID with per-tensor scaling stays close to fp32", holds, detail
    )


def findings(task: Mapping[str, Any]) -> list[Finding]:
    """The paper's claims for one task, each with ``holds`` True/False; a claim whose recipes
    did not run is left out."""
    base = run_of(task, "fp32")
    o2, o3, noscale = run_of(task, "fp16-O2"), run_of(task, "fp16-O3"), run_of(task, "fp16-noscale")
    bf16, fp8 = run_of(task, "bf16-O2"), run_of(task, "fp8-hybrid")
    out: list[Finding] = []
    if base is not None and o2 is not None:
        holds, detail = _close_to_fp32(task, base, o2)
        claim = "fp16 with fp32 master weights and dynamic loss scaling matches fp32"
        out.append(_finding("o2_matches_fp32", claim, holds, detail))
    if noscale is not None:
        out.append(_noscale_finding(task, noscale, o2, base))
    if o3 is not None and o2 is not None:
        out.append(_o3_finding(task, o3, o2))
    if bf16 is not None and base is not None:
        out.append(_close_finding(task, base, bf16, "bf16"))
    if fp8 is not None and base is not None:
        out.append(_close_finding(task, base, fp8, "e5m2"))
    return out


def summary(task: Mapping[str, Any]) -> str:
    """A paragraph that reads the task's table: which claims held, with numbers, and which not."""
    fs = task["findings"]
    if not fs:
        return "Only the fp32 baseline ran; nothing to compare."
    held = [f for f in fs if f["holds"]]
    failed = [f for f in fs if f["holds"] is False]
    parts = []
    for f in fs:
        mark = "holds" if f["holds"] else ("does NOT hold" if f["holds"] is False else "n/a")
        parts.append(f"*{f['claim']}* — {mark}: {f['detail']}.")
    text = " ".join(parts)
    base = run_of(task, "fp32")
    if base is not None and len(base["per_seed"]["val_metric"]) > 1:
        vals = [v for v in base["per_seed"]["val_metric"] if v is not None]
        if vals:
            text += (
                f" For scale: fp32 alone varies from {_metric_str(task, min(vals))} to "
                f"{_metric_str(task, max(vals))} across its {len(vals)} seeds."
            )
    if failed:
        text += (
            f" {len(failed)} of {len(fs)} expectations did not show in this run"
            + (
                " (a --quick run is short; the default preset trains longer)"
                if task.get("preset") == "quick"
                else ""
            )
            + "; the numbers above are reported as measured."
        )
    elif held:
        text += " Every expectation checked here held."
    return text


# --------------------------------------------------------------------------------------------
# markdown and terminal tables
# --------------------------------------------------------------------------------------------

COLUMNS = (
    "Recipe",
    "Train loss",
    "Val",
    "Δ vs fp32",
    "Skipped",
    "Loss scale",
    "Act. grads → 0",
    "Weight grads → 0",
    "Updates lost",
    "Time (s)",
)


def table_rows(task: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for run in task["runs"]:
        loss = run["final_train_loss"]
        rows.append(
            [
                run["recipe"]["id"],
                "diverged" if loss is None else f"{loss:.4f}",
                _metric_str(task, run["val_metric"]),
                "—" if run["recipe"]["id"] == "fp32" else _delta_str(task, run["delta_vs_fp32"]),
                f"{run['steps_skipped']:g}",
                f"{run['final_loss_scale']:g}" if run["recipe"]["loss_scale"] != "none" else "—",
                _pct(run["act_grads_flushed"]),
                _pct(run["weight_grads_flushed"]),
                _pct(run["updates_lost"]),
                f"{run['wall_time_s']:.1f}",
            ]
        )
    return rows


def _val_header(task: Mapping[str, Any]) -> str:
    return "Val acc." if task["metric"] == "accuracy" else "Val ppl."


_COLUMNS_TEXT = (
    "Columns: final train loss (mean of the last 10% of steps); validation metric in the "
    "recipe's own precision and its difference to fp32; steps skipped by the dynamic loss "
    "scaler and its final scale; the fraction of nonzero activation and weight gradients "
    "that flush to zero in the recipe's gradient format at its loss scale (measured on a "
    "fixed probe batch, mean of the probes along the run); the fraction of weight "
    "updates lost because they were below half the stored weight's spacing; training wall "
    "time (machine shared, indicative only)."
)

_HISTOGRAM_TEXT = (
    "Activation and weight gradients of the fp32 run (all probes), by binade, with the "
    "ranges fp16 and bf16 can represent. Everything left of fp16's smallest subnormal "
    "(2^-24) becomes zero in an fp16 backward pass; the loss scale shifts the whole "
    "histogram right by log2(scale) binades."
)


def _intro_lines(doc: Mapping[str, Any]) -> list[str]:
    env = doc["environment"]
    return [
        "# mixprec demo: the mixed-precision ablation on shipped data",
        "",
        f"Preset `{doc['preset']}`, seed {doc['config']['seed']}, {env['torch_threads']} torch "
        f"thread(s), torch {env['torch']}, Python {env['python']}, {env['machine']} "
        f"({env['cpu_capability']}); every format emulated bit-exactly on the CPU. "
        f"Total wall time {doc['wall_time_s']:.0f} s.",
        "",
        _COLUMNS_TEXT,
        "",
        "![training curves](curves.png)",
        "",
    ]


def _optimizer(training: Mapping[str, Any]) -> str:
    """The optimizer as the report names it: ``sgd (momentum 0.9)``, ``sgd (no momentum)``."""
    momentum = training.get("momentum")
    if training["optimizer"] != "sgd" or momentum is None:
        return str(training["optimizer"])
    return f"sgd (momentum {momentum:g})" if momentum else "sgd (no momentum)"


def _task_lines(task: Mapping[str, Any]) -> list[str]:
    ds, model, tr = task["dataset"], task["model"], task["training"]
    seeds = f" × {tr['seeds']} seeds (table: means)" if tr.get("seeds", 1) > 1 else ""
    unit = "images" if task["name"] == "digits" else "characters"
    header = [*COLUMNS]
    header[2] = _val_header(task)
    lines = [
        f"## {task['name']}: {ds['name']}",
        "",
        f"Model {model['kind']} ({model['parameters']:,} parameters), {_optimizer(tr)} "
        f"lr {tr['lr']:g}, batch {tr['batch_size']}, {tr['steps']} steps{seeds}; "
        f"{ds['n_train']:,} training / {ds['n_val']:,} validation {unit}.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(task)]
    lines += ["", "Recipes:", ""]
    lines += [f"- `{r['recipe']['id']}`: {r['recipe']['label']}" for r in task["runs"]]
    return [*lines, "", "**Reading the table.** " + task["summary"], ""]


def render_markdown(doc: Mapping[str, Any]) -> str:
    """report.md: the setup, one table with its reading per task, the histogram, the machine."""
    lines = _intro_lines(doc)
    for task in doc["tasks"]:
        lines += _task_lines(task)
    lines += [
        "## Gradient magnitudes",
        "",
        "![gradient histogram](grad_hist.png)",
        "",
        _HISTOGRAM_TEXT,
        "",
        "## Environment",
        "",
        "| | |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in doc["environment"].items()]
    return "\n".join(lines) + "\n"


TERMINAL_COLUMNS = (
    "Recipe", "Loss", "Val", "Δ fp32", "Skip", "Scale", "Act→0", "Wgrad→0", "Upd. lost", "s",
)  # fmt: skip


def rich_tables(doc: Mapping[str, Any]) -> list[Any]:
    """One ``rich.table.Table`` per task (the markdown's rows under shorter headers)."""
    from rich.table import Table

    tables = []
    for task in doc["tasks"]:
        t = Table(title=f"{task['name']} ({task['dataset']['name']})", title_justify="left")
        header = [*TERMINAL_COLUMNS]
        header[2] = "Acc." if task["metric"] == "accuracy" else "PPL"
        for i, h in enumerate(header):
            t.add_column(h, justify="left" if i == 0 else "right", no_wrap=i == 0)
        for row in table_rows(task):
            t.add_row(*row)
        tables.append(t)
    return tables
