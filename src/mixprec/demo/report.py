"""Reports of ``mixprec demo``: JSON schema and validator, findings, markdown, rich table, plots.

The JSON document is the source of truth; the markdown, the terminal table and the plots are all
rendered from it (so a report can be re-rendered from ``report.json`` alone).
"""

from __future__ import annotations

import math
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

SCHEMA_VERSION = "1.0"

__all__ = [
    "REPORT_SCHEMA",
    "SCHEMA_VERSION",
    "environment",
    "findings",
    "render_markdown",
    "rich_tables",
    "validate_report",
    "write_plots",
]

# --------------------------------------------------------------------------------------------
# schema (a JSON Schema draft 2020-12 document; validate_report implements the subset it uses)
# --------------------------------------------------------------------------------------------

_NUM = {"type": "number"}
_NUM_OR_NULL = {"type": ["number", "null"]}
_FRACTION = {"type": "number", "minimum": 0, "maximum": 1}
_INT0 = {"type": "integer", "minimum": 0}
_STR = {"type": "string"}


def _obj(props: dict[str, Any], required: Sequence[str] | None = None, extra: bool = False):
    return {
        "type": "object",
        "properties": props,
        "required": list(props if required is None else required),
        "additionalProperties": extra,
    }


def _curve(value_schema: dict[str, Any]) -> dict[str, Any]:
    return _obj(
        {
            "step": {"type": "array", "items": _INT0},
            "value": {"type": "array", "items": value_schema},
        }
    )


_RECIPE = _obj(
    {
        "id": _STR,
        "label": _STR,
        "compute_format": _STR,
        "output_format": _STR,
        "grad_format": _STR,
        "master_weights": {"type": "boolean"},
        "loss_scale": {"enum": ["none", "dynamic"]},
        "per_tensor_scaling": {"type": "boolean"},
        "shows": _STR,
    }
)

_PROBE = _obj(
    {
        "step": _INT0,
        "loss_scale": _NUM,
        "act_flushed": _FRACTION,
        "weight_flushed": _FRACTION,
        "act_flushed_unscaled": _FRACTION,
        "weight_flushed_unscaled": _FRACTION,
    }
)

_RUN = _obj(
    {
        "recipe": _RECIPE,
        "metric": {"enum": ["accuracy", "perplexity"]},
        "final_train_loss": _NUM_OR_NULL,
        "val_metric": _NUM_OR_NULL,
        "delta_vs_fp32": _NUM_OR_NULL,
        "diverged": {"type": "boolean"},
        "steps": {"type": "integer", "minimum": 1},
        "steps_skipped": {"type": "number", "minimum": 0},  # mean over seeds
        "final_loss_scale": {"type": "number", "exclusiveMinimum": 0},
        "act_grads_flushed": _FRACTION,
        "weight_grads_flushed": _FRACTION,
        "updates_lost": _FRACTION,
        "wall_time_s": {"type": "number", "minimum": 0},
        "backend": _STR,
        "curves": _obj(
            {
                "train_loss": _curve(_NUM_OR_NULL),
                "val_metric": _curve(_NUM_OR_NULL),
                "loss_scale": _curve(_NUM),
            }
        ),
        "probes": {"type": "array", "items": _PROBE, "minItems": 1},
        "per_seed": _obj(
            {
                "seed": {"type": "array", "items": {"type": "integer"}, "minItems": 1},
                "final_train_loss": {"type": "array", "items": _NUM_OR_NULL, "minItems": 1},
                "val_metric": {"type": "array", "items": _NUM_OR_NULL, "minItems": 1},
            }
        ),
        "grad_histogram": _obj(
            {
                "log2_edges": {"type": "array", "items": {"type": "integer"}, "minItems": 2},
                "activation": {"type": "array", "items": _INT0},
                "weight": {"type": "array", "items": _INT0},
            }
        ),
    },
    required=[
        "recipe", "metric", "final_train_loss", "val_metric", "delta_vs_fp32", "diverged",
        "steps", "steps_skipped", "final_loss_scale", "act_grads_flushed",
        "weight_grads_flushed", "updates_lost", "wall_time_s", "backend", "curves", "probes",
        "per_seed",
    ],
)  # fmt: skip

_FINDING = _obj(
    {
        "id": _STR,
        "claim": _STR,
        "holds": {"type": ["boolean", "null"]},
        "detail": _STR,
    }
)

_TASK = _obj(
    {
        "name": {"enum": ["digits", "text"]},
        "metric": {"enum": ["accuracy", "perplexity"]},
        "metric_unit": _STR,
        "higher_is_better": {"type": "boolean"},
        "dataset": {"type": "object", "required": ["name", "n_train", "n_val", "sha256"]},
        "model": {"type": "object", "required": ["kind", "parameters"]},
        "training": {"type": "object", "required": ["steps", "batch_size", "lr", "optimizer"]},
        "runs": {"type": "array", "items": _RUN, "minItems": 1},
        "findings": {"type": "array", "items": _FINDING},
        "summary": _STR,
    }
)

_ENV = {
    "type": "object",
    "required": [
        "python", "platform", "machine", "torch", "numpy", "mixprec", "cpu_capability",
        "torch_threads", "cpu_count", "c_kernel", "device", "deterministic_algorithms",
    ],
    "additionalProperties": True,
}  # fmt: skip

REPORT_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "mixprec demo report",
    **_obj(
        {
            "schema_version": {"const": SCHEMA_VERSION},
            "tool": {"const": "mixprec demo"},
            "preset": _STR,
            "config": {"type": "object", "required": ["seed", "recipes", "tasks", "threads"]},
            "environment": _ENV,
            "tasks": {"type": "array", "items": _TASK, "minItems": 1},
            "wall_time_s": {"type": "number", "minimum": 0},
            "created_utc": _STR,
        }
    ),
}

_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list, tuple),
    "string": (str,),
    "boolean": (bool,),
    "null": (type(None),),
}


def _type_ok(value: Any, name: str) -> bool:
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(value)  # JSON has no NaN/inf; a report never contains them
        )
    return isinstance(value, _TYPES[name])


def _validate(value: Any, schema: Mapping[str, Any], path: str, errors: list[str]) -> None:
    if "type" in schema:
        names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_type_ok(value, n) for n in names):
            errors.append(f"{path}: expected {' or '.join(names)}, got {value!r:.60}")
            return
    if "const" in schema and value != schema["const"]:
        errors.append(f"{path}: expected {schema['const']!r}, got {value!r:.60}")
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r:.60} is not one of {schema['enum']}")
    if _type_ok(value, "number"):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{path}: {value} < minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(f"{path}: {value} > maximum {schema['maximum']}")
        if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
            errors.append(f"{path}: {value} <= exclusive minimum {schema['exclusiveMinimum']}")
    if isinstance(value, dict):
        for key in schema.get("required", ()):
            if key not in value:
                errors.append(f"{path}: missing required key {key!r}")
        props = schema.get("properties", {})
        for key, item in value.items():
            if key in props:
                _validate(item, props[key], f"{path}.{key}", errors)
            elif schema.get("additionalProperties", True) is False:
                errors.append(f"{path}: unexpected key {key!r}")
    if isinstance(value, list | tuple):
        if len(value) < schema.get("minItems", 0):
            errors.append(f"{path}: needs at least {schema['minItems']} items, has {len(value)}")
        if "items" in schema:
            for i, item in enumerate(value):
                _validate(item, schema["items"], f"{path}[{i}]", errors)


def validate_report(doc: Any, schema: Mapping[str, Any] | None = None) -> None:
    """Check a demo report against :data:`REPORT_SCHEMA`; raise ``ValueError`` listing problems.

    Implements the JSON Schema keywords the schema uses (type, const, enum, minimum, maximum,
    exclusiveMinimum, properties, required, additionalProperties, items, minItems); numbers must
    be finite. Also checks what a schema cannot say: every task has the fp32 baseline first,
    curves' step and value arrays have equal lengths, and the schema version is the one this
    code writes.
    """
    errors: list[str] = []
    _validate(doc, REPORT_SCHEMA if schema is None else schema, "$", errors)
    if not errors:
        for ti, task in enumerate(doc["tasks"]):
            runs = task["runs"]
            if runs[0]["recipe"]["id"] != "fp32":
                errors.append(f"$.tasks[{ti}].runs[0]: the fp32 baseline must come first")
            for ri, run in enumerate(runs):
                if run["metric"] != task["metric"]:
                    errors.append(f"$.tasks[{ti}].runs[{ri}].metric differs from the task's")
                for name, curve in run["curves"].items():
                    if len(curve["step"]) != len(curve["value"]):
                        errors.append(
                            f"$.tasks[{ti}].runs[{ri}].curves.{name}: step and value lengths "
                            f"differ ({len(curve['step'])} vs {len(curve['value'])})"
                        )
    if errors:
        shown = "\n  ".join(errors[:20])
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise ValueError(f"report does not match schema {SCHEMA_VERSION}:\n  {shown}{more}")


# --------------------------------------------------------------------------------------------
# environment
# --------------------------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    """Versions and machine facts that numbers in a report depend on (no host names, no paths)."""
    import numpy
    import torch

    from mixprec import __version__
    from mixprec.quantization.elementwise import has_c_kernel

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
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
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


def _run(task: Mapping[str, Any], rid: str) -> Mapping[str, Any] | None:
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


def findings(task: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The paper's claims for one task, each with ``holds`` True/False (None: recipe not run)."""
    base = _run(task, "fp32")
    o2, o3, noscale = _run(task, "fp16-O2"), _run(task, "fp16-O3"), _run(task, "fp16-noscale")
    bf16, fp8 = _run(task, "bf16-O2"), _run(task, "fp8-hybrid")
    out: list[dict[str, Any]] = []
    acc = task["metric"] == "accuracy"

    def add(fid: str, claim: str, holds: bool | None, detail: str) -> None:
        out.append({"id": fid, "claim": claim, "holds": holds, "detail": detail})

    def close_to_fp32(run: Mapping[str, Any]) -> tuple[bool | None, str]:
        assert base is not None
        b, v = base["val_metric"], run["val_metric"]
        if b is None or v is None:
            return False, f"{run['recipe']['id']} or fp32 diverged"
        if acc:
            tol = ACCURACY_TOLERANCE_PP
            ok = abs(v - b) <= tol
            return ok, (
                f"{run['recipe']['id']} {v:.2f}% vs fp32 {b:.2f}% "
                f"({v - b:+.2f} pp; tolerance ±{tol} pp)"
            )
        rel = (v - b) / b
        ok = abs(rel) <= PERPLEXITY_TOLERANCE_REL
        return ok, (
            f"{run['recipe']['id']} perplexity {v:.3f} vs fp32 {b:.3f} ({rel * 100:+.2f}%; "
            f"tolerance ±{PERPLEXITY_TOLERANCE_REL * 100:.0f}%)"
        )

    if base is not None and o2 is not None:
        holds, detail = close_to_fp32(o2)
        add(
            "o2_matches_fp32",
            "fp16 with fp32 master weights and dynamic loss scaling matches fp32",
            holds,
            detail,
        )
    if noscale is not None:
        f_act, f_wt = noscale["act_grads_flushed"], noscale["weight_grads_flushed"]
        ref = o2["act_grads_flushed"] if o2 is not None else 0.0
        holds = f_act >= MEASURABLE_FLUSH and f_act > ref
        detail = (
            f"without loss scaling {_pct(f_act)} of the nonzero activation gradients and "
            f"{_pct(f_wt)} of the weight gradients flush to zero in fp16"
        )
        if o2 is not None:
            detail += (
                f"; with the dynamic loss scale (final {o2['final_loss_scale']:g}) "
                f"{_pct(o2['act_grads_flushed'])} and {_pct(o2['weight_grads_flushed'])}"
            )
        if base is not None:
            worse = _worse(task, noscale["val_metric"], base["val_metric"])
            if worse is not None:
                detail += (
                    f"; its validation {task['metric']} is "
                    f"{_delta_str(task, -worse if task['higher_is_better'] else worse)} vs fp32"
                )
        add(
            "noscale_flushes_gradients",
            "without loss scaling a measurable fraction of gradients flushes to zero",
            holds,
            detail,
        )
    if o3 is not None and o2 is not None:
        lost = o3["updates_lost"]
        lw, l2 = o3["final_train_loss"], o2["final_train_loss"]
        worse = _worse(task, o3["val_metric"], o2["val_metric"])
        loss_gap = None if lw is None or l2 is None or l2 <= 0 else (lw - l2) / l2
        tol = ACCURACY_TOLERANCE_PP if acc else PERPLEXITY_TOLERANCE_REL * o2["val_metric"]
        hurts = (loss_gap is not None and loss_gap > TRAIN_LOSS_GAP) or (
            worse is not None and worse > tol
        )
        holds = lost >= MEASURABLE_FLUSH and hurts
        detail = (
            f"without master weights {_pct(lost)} of the weight updates were smaller than half "
            f"the fp16 spacing of their weight and were lost (with master weights: "
            f"{_pct(o2['updates_lost'])})"
        )
        if loss_gap is not None:
            detail += f"; final training loss {loss_gap * 100:+.1f}% vs O2"
        if worse is not None:
            detail += (
                f", validation {task['metric']} "
                f"{_delta_str(task, -worse if task['higher_is_better'] else worse)} vs O2"
            )
        add(
            "o3_loses_updates",
            "without fp32 master weights, updates smaller than the weights' spacing are lost and "
            "training suffers",
            holds,
            detail,
        )
    if bf16 is not None and base is not None:
        holds, detail = close_to_fp32(bf16)
        detail += (
            f"; without any loss scaling {_pct(bf16['act_grads_flushed'])} of activation "
            "gradients flush to zero in bf16"
        )
        add("bf16_needs_no_scaling", "bf16 trains like fp32 without loss scaling", holds, detail)
    if fp8 is not None and base is not None:
        holds, detail = close_to_fp32(fp8)
        detail += (
            f"; with per-tensor scaling {_pct(fp8['act_grads_flushed'])} of activation gradients "
            "flush to zero in e5m2"
        )
        add("fp8_hybrid_close", "fp8 HYBRID with per-tensor scaling stays close to fp32", holds,
            detail)  # fmt: skip
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
    base = _run(task, "fp32")
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


def render_markdown(doc: Mapping[str, Any]) -> str:
    env = doc["environment"]
    lines = [
        "# mixprec demo: the mixed-precision ablation on shipped data",
        "",
        f"Preset `{doc['preset']}`, seed {doc['config']['seed']}, {env['torch_threads']} torch "
        f"thread(s), torch {env['torch']}, Python {env['python']}, {env['machine']} "
        f"({env['cpu_capability']}); every format emulated bit-exactly on the CPU. "
        f"Total wall time {doc['wall_time_s']:.0f} s.",
        "",
        "Columns: final train loss (mean of the last 10% of steps); validation metric in the "
        "recipe's own precision and its difference to fp32; steps skipped by the dynamic loss "
        "scaler and its final scale; the fraction of nonzero activation and weight gradients "
        "that flush to zero in the recipe's gradient format at its loss scale (measured on a "
        "fixed probe batch, mean of the probes along the run); the fraction of weight "
        "updates lost because they were below half the stored weight's spacing; training wall "
        "time (machine shared, indicative only).",
        "",
        "![training curves](curves.png)",
        "",
    ]
    for task in doc["tasks"]:
        ds, model, tr = task["dataset"], task["model"], task["training"]
        lines += [
            f"## {task['name']}: {ds['name']}",
            "",
            f"Model {model['kind']} ({model['parameters']:,} parameters), {tr['optimizer']} "
            f"lr {tr['lr']:g}, batch {tr['batch_size']}, {tr['steps']} steps"
            + (f" × {tr['seeds']} seeds (table: means)" if tr.get("seeds", 1) > 1 else "")
            + "; "
            f"{ds['n_train']:,} training / {ds['n_val']:,} validation "
            f"{'images' if task['name'] == 'digits' else 'characters'}.",
            "",
        ]
        header = [*COLUMNS]
        header[2] = _val_header(task)
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
        for row in table_rows(task):
            lines.append("| " + " | ".join(row) + " |")
        lines += ["", "Recipes:", ""]
        for run in task["runs"]:
            lines.append(f"- `{run['recipe']['id']}`: {run['recipe']['label']}")
        lines += ["", "**Reading the table.** " + task["summary"], ""]
    lines += [
        "## Gradient magnitudes",
        "",
        "![gradient histogram](grad_hist.png)",
        "",
        "Activation and weight gradients of the fp32 run (all probes), by binade, with the "
        "ranges fp16 and bf16 can represent. Everything left of fp16's smallest subnormal "
        "(2^-24) becomes zero in an fp16 backward pass; the loss scale shifts the whole "
        "histogram right by log2(scale) binades.",
        "",
        "## Environment",
        "",
        "| | |",
        "|---|---|",
    ]
    for k, v in env.items():
        lines.append(f"| {k} | {v} |")
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


# --------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------


def _colors(n: int) -> list[Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def _smooth(values: list[float], half: int) -> list[float]:
    """Centred moving average over ``2 * half + 1`` points (shorter at the ends)."""
    out = []
    for i in range(len(values)):
        window = values[max(0, i - half) : i + half + 1]
        out.append(sum(window) / len(window))
    return out


def write_plots(doc: Mapping[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """``curves.png`` (training loss and validation metric per recipe, one row per task) and
    ``grad_hist.png`` (log2 gradient magnitudes with fp16/bf16 ranges and the loss-scale shift).

    Uses matplotlib's Agg canvas directly (no pyplot state, no display needed).
    """
    from matplotlib.figure import Figure

    tasks = doc["tasks"]
    ids = list(dict.fromkeys(r["recipe"]["id"] for t in tasks for r in t["runs"]))
    color = dict(zip(ids, _colors(len(ids)), strict=True))
    # the baseline underneath, thick and grey-black, so recipes that match it stay visible
    style = {"fp32": {"lw": 3.0, "color": "black", "alpha": 0.35, "zorder": 1}}

    fig = Figure(figsize=(12, 4.2 * len(tasks)), layout="constrained")
    axes = fig.subplots(len(tasks), 2, squeeze=False)
    for row, task in enumerate(tasks):
        ax_l, ax_v = axes[row]
        for run in task["runs"]:
            rid = run["recipe"]["id"]
            kw = {"color": color[rid], "lw": 1.2, "zorder": 2, **style.get(rid, {})}
            c = run["curves"]["train_loss"]
            pts = [(s, v) for s, v in zip(c["step"], c["value"], strict=True) if v is not None]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax_l.plot(xs, _smooth(list(ys), max(1, len(ys) // 40)), label=rid, **kw)
            c = run["curves"]["val_metric"]
            pts = [(s, v) for s, v in zip(c["step"], c["value"], strict=True) if v is not None]
            if pts:
                ax_v.plot(*zip(*pts, strict=True), marker="o", ms=3, label=rid, **kw)
        ax_l.set_yscale("log")
        ax_l.set_title(f"{task['name']}: training loss (moving average)")
        ax_l.set_xlabel("step")
        ax_l.grid(alpha=0.3, which="both")
        ax_l.legend(fontsize=8)
        ax_v.set_title(
            f"{task['name']}: validation "
            + ("accuracy (%)" if task["metric"] == "accuracy" else "perplexity")
        )
        ax_v.set_xlabel("step")
        ax_v.grid(alpha=0.3)
        ax_v.legend(fontsize=8)
    curves = out_dir / "curves.png"
    fig.savefig(curves, dpi=110)

    fig = Figure(figsize=(11, 3.8 * len(tasks)), layout="constrained")
    axes = fig.subplots(len(tasks), 1, squeeze=False)
    for row, task in enumerate(tasks):
        ax = axes[row][0]
        base = _run(task, "fp32")
        hist = None if base is None else base.get("grad_histogram")
        if hist is None:
            ax.text(0.5, 0.5, "no fp32 histogram", ha="center", transform=ax.transAxes)
            continue
        edges = hist["log2_edges"]
        act, wt = hist["activation"], hist["weight"]
        used = [i for i, (a, w) in enumerate(zip(act, wt, strict=True)) if a or w]
        lo = min(edges[used[0]] - 4, -30) if used else edges[0]
        hi = max(edges[used[-1] + 1] + 4, 18) if used else edges[-1]
        ax.stairs(act, edges, fill=True, alpha=0.55, color="tab:blue", label="activation grads")
        ax.stairs(wt, edges, fill=False, lw=1.5, color="tab:green", label="weight grads")
        o2 = _run(task, "fp16-O2")
        if o2 is not None and o2["final_loss_scale"] != 1 and used:
            shift = math.log2(o2["final_loss_scale"])
            shifted = [e + shift for e in edges]
            label = f"activation grads × fp16-O2's final loss scale 2^{shift:g}"
            ax.stairs(act, shifted, lw=1.4, ls="--", color="tab:purple", label=label)
            peak = max(range(len(act)), key=act.__getitem__)
            y = act[peak] * 2.0
            ax.annotate(
                "", xy=(edges[peak] + 0.5 + shift, y), xytext=(edges[peak] + 0.5, y),
                arrowprops={"arrowstyle": "->", "color": "tab:purple", "lw": 1.5},
            )  # fmt: skip
            ax.text(edges[peak] + 0.5 + shift / 2, y * 1.5, f"× 2^{shift:g}", ha="center",
                    color="tab:purple", fontsize=8)  # fmt: skip
            hi = max(hi, edges[used[-1] + 1] + shift + 4)
            lo = min(lo, edges[used[0]] + shift - 4)
        # fp16: subnormals from 2^-24 (half of that rounds up to it), normals from 2^-14, max
        # 65504 < 2^16; bf16 keeps fp32's exponent range (subnormals to 2^-133, max < 2^128)
        ax.axvspan(lo, -25, color="tab:red", alpha=0.10, label="fp16: becomes 0")
        ax.axvspan(-25, -14, color="tab:orange", alpha=0.12, label="fp16: subnormal")
        ax.axvspan(-14, 16, color="tab:gray", alpha=0.10, label="fp16: normal")
        if hi > 16:
            ax.axvspan(16, hi, color="tab:red", alpha=0.22, label="fp16: overflows to inf")
        bf_lo, bf_hi = max(lo, -133), min(hi, 128)
        beyond = ", beyond the axis" if lo > -133 else ""
        label = f"bf16 range (2^-133 … 2^128{beyond})"
        ax.plot([bf_lo, bf_hi], [0.5, 0.5], color="black", lw=3, solid_capstyle="butt", label=label)
        ax.set_yscale("symlog", linthresh=1)
        ax.set_xlim(lo, hi)
        ax.set_ylim(0, max([*act, *wt, 1]) * 8)
        ax.set_xlabel("log2 |gradient|")
        ax.set_ylabel("count (all probes)")
        ax.set_title(f"{task['name']}: gradient magnitudes in the fp32 run")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    hist_path = out_dir / "grad_hist.png"
    fig.savefig(hist_path, dpi=110)
    return curves, hist_path
