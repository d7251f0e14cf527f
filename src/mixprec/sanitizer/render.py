"""Rendering of sanitizer reports: the rich table and the matplotlib figures (private).

Figures are drawn on matplotlib's Agg canvas directly (``Figure`` + ``FigureCanvasAgg``), so no
display is needed and the global pyplot backend is left alone.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mixprec.sanitizer.findings import Finding
    from mixprec.sanitizer.gradients import GradHistogram

_KIND_STYLE = {
    "nan": "bold red",
    "inf": "bold red",
    "overflow": "red",
    "decision_flip": "magenta",
    "underflow": "yellow",
    "cancellation": "cyan",
    "precision_loss": "blue",
}
_KIND_COLOR = {
    "nan": "#b2182b",
    "inf": "#d6604d",
    "overflow": "#f4a582",
    "decision_flip": "#8073ac",
    "underflow": "#e0b040",
    "cancellation": "#4393c3",
    "precision_loss": "#2166ac",
}


def _fmt_float(v: float | None, spec: str = ".3g") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return format(v, spec)


def group_by_location(findings: Sequence[Finding]) -> list[tuple[str | None, list[Finding]]]:
    """Findings grouped by source location; groups ordered by their worst finding."""
    groups: dict[str | None, list[Finding]] = {}
    for f in findings:  # findings arrive worst first
        groups.setdefault(f.location, []).append(f)
    return list(groups.items())


def grad_summary(hist: GradHistogram | None) -> str:
    """One line: gradient counts, float16-style flush fractions, recommended loss scale."""
    if hist is None:
        return ""
    parts = []
    for kind in hist.kinds:
        parts.append(
            f"{kind} {100 * hist.flush_to_zero[kind]:.2f}%"
            + (f" (sub-normal {100 * hist.subnormal[kind]:.2f}%)" if hist.subnormal[kind] else "")
        )
    line = f"gradients flushing to zero in {hist.fmt}: " + ", ".join(parts)
    if hist.recommended_loss_scale is not None:
        k = round(math.log2(hist.recommended_loss_scale))
        line += f"; largest loss scale without overflow: 2^{k}"
    return line


_COLUMNS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("location", {"overflow": "fold", "min_width": 12, "max_width": 44}),
    ("kind", {"no_wrap": True}),
    ("op", {"no_wrap": True}),
    ("phase", {"no_wrap": True}),
    ("module", {"overflow": "fold", "max_width": 24}),
    ("bits lost", {"justify": "right", "no_wrap": True}),
    ("rel err", {"justify": "right", "no_wrap": True}),
    ("count", {"justify": "right"}),
    ("step", {"justify": "right"}),
)


def _title(findings: Sequence[Finding], stats: dict[str, Any]) -> str:
    return (
        f"mixprec sanitize: {len(findings)} finding{'s' * (len(findings) != 1)} "
        f"({stats.get('ops', 0)} ops, {stats.get('ops_shadowed', 0)} shadowed, "
        f"{stats.get('backward_passes', 0)} backward passes)"
    )


def report_notes(findings: Sequence[Finding], stats: dict[str, Any], grad_line: str) -> list[str]:
    """Notes printed under the table (one line each, never hard-wrapped): unshadowed ops,
    sanitizer errors, ``torch.compile``d modules run eagerly, the gradient summary, and the
    chains of findings linked by ``cause``."""
    notes = []
    if stats.get("ops_unshadowed"):
        ops = ", ".join(f"{k} x{v}" for k, v in sorted(stats["ops_unshadowed"].items()))
        notes.append(f"not shadowed (no float64 kernel): {ops}")
    if stats.get("internal_errors"):
        notes.append(f"sanitizer errors (results incomplete): {stats.get('last_internal_error')}")
    if stats.get("compiled_run_eagerly"):
        names = ", ".join(stats["compiled_run_eagerly"])
        notes.append(f"torch.compile'd, run eagerly to be checked: {names}")
    if grad_line:
        notes.append(grad_line)
    notes.extend(cause_chains(findings))
    return notes


def cause_chains(findings: Sequence[Finding]) -> list[str]:
    """Lines showing each chain of findings linked by ``cause``, root cause first."""
    by_label = {f.label: f for f in findings}
    causes = {f.cause for f in findings if f.cause is not None}
    lines: list[str] = []
    for f in findings:
        if f.cause is None or f.label in causes:
            continue  # not linked, or not the end of its chain
        chain = [f]
        while chain[-1].cause in by_label and by_label[chain[-1].cause] not in chain:
            chain.append(by_label[chain[-1].cause])
        labels = [link.label for link in reversed(chain)]
        if chain[-1].cause is not None:  # a cause not in the report (e.g. a filtered run)
            labels.insert(0, chain[-1].cause)
        lines.append("  " + labels[0])
        lines.extend("  -> " + label for label in labels[1:])
    return ["caused by (root cause first):", *lines] if lines else []


COMPACT_BELOW = 110  # narrower tables drop the rel err and step columns, fold op names
_COMPACT = (0, 1, 2, 4, 5, 7)  # the _COLUMNS kept in a compact table (phase joins kind)
_COMPACT_KW: dict[str, dict[str, Any]] = {
    "location": {"overflow": "fold", "min_width": 12, "max_width": 30},
    "op": {"overflow": "fold", "min_width": 8},
    "module": {"overflow": "fold", "max_width": 16},
}


def _row(f: Finding, first: bool, compact: bool = False) -> list[Any]:
    """The cells of one finding; the first of its location group shows the location and code."""
    from rich.text import Text

    where: Any = ""
    if first:
        where = Text(f.location or "(unknown)")
        if f.code:
            code = f.code if len(f.code) <= 60 else f.code[:57] + "..."
            where.append("\n" + code, style="dim")
    bits = _fmt_float(f.bits_lost, ".1f")
    if f.kind == "cancellation" and f.bits_cancelled is not None:
        bits += f" ({_fmt_float(f.bits_cancelled, '.0f')} canc.)"
    module = f.module if f.module is not None else "-"
    if module == "":
        module = f"({f.module_type or 'root'})"
    kind = Text(f.kind, style=_KIND_STYLE.get(f.kind, ""))
    rel = _fmt_float(f.rel_error, ".2e")
    cells = [where, kind, f.op, f.phase, module, bits, rel, f"{f.count}", f"{f.first_step}"]
    if not compact:
        return cells
    if f.phase != "forward":
        kind.append(f"\n({f.phase})", style="dim")
    cells[2] = f.op.removeprefix("aten.").removesuffix(".default")  # "aten.log.default": log
    return [cells[i] for i in _COMPACT]


def _add_rows(table: Any, findings: Sequence[Finding], max_rows: int | None, compact: bool) -> None:
    """One row per finding, grouped by location (a rule between groups), up to ``max_rows``."""
    rows = 0
    blanks = [""] * (len(table.columns) - 2)
    groups = group_by_location(findings)
    for gi, (_, items) in enumerate(groups):
        for i, f in enumerate(items):
            if max_rows is not None and rows >= max_rows:
                table.add_row("...", f"{len(findings) - rows} more", *blanks)
                return
            last_of_group = i == len(items) - 1 and gi < len(groups) - 1
            table.add_row(*_row(f, i == 0, compact), end_section=last_of_group)
            rows += 1


def findings_table(
    findings: Sequence[Finding],
    stats: dict[str, Any],
    max_rows: int | None,
    width: int | None = None,
):
    """The rich table of a report: findings grouped by location, worst location first.

    ``width``: the columns it will be printed in; below :data:`COMPACT_BELOW` the table drops
    the rel err and step columns and folds op names, so that it reads at 80 columns. The notes
    (:func:`report_notes`) are printed under it, not as a caption: a caption is hard-wrapped at
    the table's width."""
    from rich.table import Table
    from rich.text import Text

    compact = width is not None and width < COMPACT_BELOW
    table = Table(title=_title(findings, stats), show_lines=False, title_justify="left")
    columns = [_COLUMNS[i] for i in _COMPACT] if compact else list(_COLUMNS)
    for col, kw in columns:
        table.add_column(col, **(_COMPACT_KW.get(col, kw) if compact else kw))
    if not findings:
        table.add_row("-", Text("no findings", style="green"), *[""] * (len(columns) - 2))
    else:
        _add_rows(table, findings, max_rows, compact)
    return table


def _new_figure(figsize: tuple[float, float], ncols: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def _draw_findings(ax: Any, findings: Sequence[Finding], top: int = 15) -> None:
    items = list(findings)[:top]
    if not items:
        ax.text(0.5, 0.5, "no findings", ha="center", va="center", fontsize=14, color="green")
        ax.set_axis_off()
        return
    labels, values, colors = [], [], []
    for f in reversed(items):
        loc = f.location or "?"
        labels.append(f"{loc}  {f.op.replace('aten.', '')} ({f.phase[0]})")
        b = f.bits_lost
        values.append(24.0 if b is None else (b if math.isfinite(b) else 24.0))
        colors.append(_KIND_COLOR.get(f.kind, "gray"))
    ax.barh(range(len(items)), values, color=colors)
    ax.set_yticks(range(len(items)), labels, fontsize=8)
    ax.set_xlabel("bits lost locally (decision flips drawn full length)")
    ax.set_title("worst findings (f = forward, b = backward)")
    from matplotlib.patches import Patch

    kinds = list(dict.fromkeys(f.kind for f in items))
    ax.legend(
        handles=[Patch(color=_KIND_COLOR[k], label=k) for k in kinds], fontsize=8, loc="lower right"
    )


def _draw_histogram(ax: Any, hist: GradHistogram, kind: str) -> None:
    counts = hist.counts[kind]
    total = sum(counts) or 1
    xs = [hist.bin_lo + i for i in range(len(counts))]
    ys = [100.0 * c / total for c in counts]
    m = round(math.log2(hist.min_subnormal))
    n = round(math.log2(hist.min_normal))
    top = math.log2(hist.max)
    lo = min(xs[0], m - 4) - 1
    hi = max(xs[-1], math.ceil(top)) + 2
    ax.axvspan(lo, m - 1, color="#f4cccc", label=f"flush to zero in {hist.fmt}")
    ax.axvspan(m - 1, n, color="#fce5cd", label=f"{hist.fmt} subnormal")
    ax.axvspan(n, top, color="#d9ead3", label=f"{hist.fmt} normal")
    ax.axvspan(top, hi, color="#dddddd", label="overflow")
    ax.bar([x + 0.5 for x in xs], ys, width=1.0, color="#3d5a80", edgecolor="none")
    ax.set_xlim(lo, hi)
    ax.set_xlabel("log2(|gradient|)")
    ax.set_ylabel("% of non-zero values")
    zeros = hist.zeros.get(kind, 0)
    frac_zero = zeros / (zeros + sum(counts)) if zeros + sum(counts) else 0.0
    text = (
        f"{kind} gradients: {sum(counts)} non-zero, {100 * frac_zero:.1f}% exact zeros\n"
        f"flush to zero in {hist.fmt}: {100 * hist.flush_to_zero[kind]:.2f}%"
    )
    if hist.recommended_loss_scale is not None:
        s = hist.recommended_loss_scale
        text += (
            f"\nloss scale 2^{round(math.log2(s))}: "
            f"{100 * hist.flush_to_zero_scaled[kind]:.2f}% flush"
        )
    ax.set_title(text, fontsize=9, loc="left")
    ax.legend(fontsize=7, loc="upper right")


def plot_grad_histogram(hist: GradHistogram, path: str | os.PathLike[str]) -> str:
    kinds = list(hist.kinds)
    fig, axes = _new_figure((6.5 * len(kinds), 4.5), len(kinds))
    for ax, kind in zip(axes, kinds, strict=True):
        _draw_histogram(ax, hist, kind)
    fig.savefig(path, dpi=100)
    return os.fspath(path)


def plot_report(
    findings: Sequence[Finding], hist: GradHistogram | None, path: str | os.PathLike[str]
) -> str:
    kinds = list(hist.kinds) if hist is not None else []
    fig, axes = _new_figure((7.5 + 6.0 * len(kinds), 5.0), 1 + len(kinds))
    _draw_findings(axes[0], findings)
    for ax, kind in zip(axes[1:], kinds, strict=True):
        _draw_histogram(ax, hist, kind)  # type: ignore[arg-type]
    fig.savefig(path, dpi=100)
    return os.fspath(path)
