"""Plots of ``mixprec demo``: ``curves.png`` and ``grad_hist.png``, rendered from report.json.

Uses matplotlib's Agg canvas directly (no pyplot state, no display needed).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mixprec.demo.report import run_of

# the baseline underneath, thick and grey-black, so recipes that match it stay visible
_BASELINE_STYLE = {"lw": 3.0, "color": "black", "alpha": 0.35, "zorder": 1}


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


def _points(curve: Mapping[str, Any]) -> list[tuple[int, float]]:
    """A curve's (step, value) pairs, diverged (None) points left out."""
    return [(s, v) for s, v in zip(curve["step"], curve["value"], strict=True) if v is not None]


def _curve_axes(ax_l: Any, ax_v: Any, task: Mapping[str, Any], color: dict[str, Any]) -> None:
    """One task's row: smoothed training loss (log scale) and validation metric per recipe."""
    for run in task["runs"]:
        rid = run["recipe"]["id"]
        kw = {"color": color[rid], "lw": 1.2, "zorder": 2}
        if rid == "fp32":
            kw.update(_BASELINE_STYLE)
        pts = _points(run["curves"]["train_loss"])
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax_l.plot(xs, _smooth(list(ys), max(1, len(ys) // 40)), label=rid, **kw)
        pts = _points(run["curves"]["val_metric"])
        if pts:
            ax_v.plot(*zip(*pts, strict=True), marker="o", ms=3, label=rid, **kw)
    ax_l.set_yscale("log")
    ax_l.set_title(f"{task['name']}: training loss (moving average)")
    ax_l.grid(alpha=0.3, which="both")
    metric = "accuracy (%)" if task["metric"] == "accuracy" else "perplexity"
    ax_v.set_title(f"{task['name']}: validation {metric}")
    ax_v.grid(alpha=0.3)
    for ax in (ax_l, ax_v):
        ax.set_xlabel("step")
        ax.legend(fontsize=8)


def _write_curves(doc: Mapping[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure

    tasks = doc["tasks"]
    ids = list(dict.fromkeys(r["recipe"]["id"] for t in tasks for r in t["runs"]))
    color = dict(zip(ids, _colors(len(ids)), strict=True))
    fig = Figure(figsize=(12, 4.2 * len(tasks)), layout="constrained")
    axes = fig.subplots(len(tasks), 2, squeeze=False)
    for row, task in enumerate(tasks):
        _curve_axes(axes[row][0], axes[row][1], task, color)
    fig.savefig(path, dpi=110)


def _loss_scale_shift(
    ax: Any, hist: Mapping[str, Any], shift: float, used: list[int]
) -> tuple[float, float]:
    """The activation histogram moved right by ``shift`` binades (fp16-O2's final loss scale),
    with an arrow at its peak; returns the x range it needs."""
    edges, act = hist["log2_edges"], hist["activation"]
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
    return edges[used[0]] + shift - 4, edges[used[-1] + 1] + shift + 4


def _format_ranges(ax: Any, lo: float, hi: float) -> None:
    """Shade fp16's zero / subnormal / normal / overflow regions and draw bf16's range."""
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


def _hist_axis(ax: Any, task: Mapping[str, Any]) -> None:
    """One task's gradient histogram (fp32 run) against the formats' ranges."""
    base = run_of(task, "fp32")
    hist = None if base is None else base.get("grad_histogram")
    if hist is None:
        ax.text(0.5, 0.5, "no fp32 histogram", ha="center", transform=ax.transAxes)
        return
    edges, act, wt = hist["log2_edges"], hist["activation"], hist["weight"]
    used = [i for i, (a, w) in enumerate(zip(act, wt, strict=True)) if a or w]
    lo = min(edges[used[0]] - 4, -30) if used else edges[0]
    hi = max(edges[used[-1] + 1] + 4, 18) if used else edges[-1]
    ax.stairs(act, edges, fill=True, alpha=0.55, color="tab:blue", label="activation grads")
    ax.stairs(wt, edges, fill=False, lw=1.5, color="tab:green", label="weight grads")
    o2 = run_of(task, "fp16-O2")
    if o2 is not None and o2["final_loss_scale"] != 1 and used:
        s_lo, s_hi = _loss_scale_shift(ax, hist, math.log2(o2["final_loss_scale"]), used)
        lo, hi = min(lo, s_lo), max(hi, s_hi)
    _format_ranges(ax, lo, hi)
    ax.set_yscale("symlog", linthresh=1)
    ax.set_xlim(lo, hi)
    ax.set_ylim(0, max([*act, *wt, 1]) * 8)
    ax.set_xlabel("log2 |gradient|")
    ax.set_ylabel("count (all probes)")
    ax.set_title(f"{task['name']}: gradient magnitudes in the fp32 run")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def _write_grad_hist(doc: Mapping[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure

    tasks = doc["tasks"]
    fig = Figure(figsize=(11, 3.8 * len(tasks)), layout="constrained")
    axes = fig.subplots(len(tasks), 1, squeeze=False)
    for row, task in enumerate(tasks):
        _hist_axis(axes[row][0], task)
    fig.savefig(path, dpi=110)


def write_plots(doc: Mapping[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """``curves.png`` (training loss and validation metric per recipe, one row per task) and
    ``grad_hist.png`` (log2 gradient magnitudes with fp16/bf16 ranges and the loss-scale shift).

    Cost: two matplotlib figures (about a second).
    """
    curves, hist = out_dir / "curves.png", out_dir / "grad_hist.png"
    _write_curves(doc, curves)
    _write_grad_hist(doc, hist)
    return curves, hist
