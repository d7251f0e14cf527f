"""A numerical sanitizer for PyTorch: shadow float64 execution of every aten op.

``with mixprec.sanitize() as report:`` runs the user's code unchanged and, under a
``TorchDispatchMode``, every aten op (forward *and* backward) a second time on float64 shadow
copies of its inputs — LLVM's NSan idea, per tensor op instead of per scalar instruction. Each
op's real output is compared with its shadow output; where they disagree by more than a
threshold the op is re-run on the shadow inputs rounded to the real format, which separates the
error the op introduced itself (*local* error, Herbgrind's idea) from the error it inherited.
Only ops with a large local error become findings.

Definitions (all per output element, then aggregated per op call):

* relative error ``rel = |x - s| / max(|s|, 2^(-threshold_bits/2) * max|s|)`` with ``x`` the
  (local or real) result and ``s`` the shadow. The floor makes elements far below the tensor's
  largest magnitude count at the tensor's scale: a dot product's rounding error is a few ulps of
  its output's *scale*, so near-zero outputs of well-conditioned matmuls and reductions (which
  have a large relative error by pure chance) are not findings, while a result that is wrong at
  the scale of its tensor is.
  For sums of products (sum, mean, mm, addmm, convolution, ...) the denominator is at least the
  element's sum of |terms|: a reduction that cancels is judged by what a backward-stable
  evaluation can err by; elementwise add/sub are not (their cancellations are findings).
* ``bits_lost = clip(log2(rel / eps) + 1, 0, mantissa_bits + 1)``: 0 for a correctly rounded
  result, 1 for an error of one ulp, all ``mantissa_bits + 1`` significand bits for ``rel >= 1``.
* an element is flagged when its *local* bits lost exceed ``threshold_bits`` (default: half the
  real format's mantissa bits, NSan's spirit: 11.5 for float32, 5 for float16, 3.5 for bfloat16).

Kinds: ``nan`` / ``inf`` (the op produced them from finite inputs: only the first op is
reported, not everything downstream), ``overflow`` (real result infinite where the shadow is
finite), ``underflow`` (flagged element whose shadow is non-zero but below the format's smallest
normal, and whose local result is zero or subnormal), ``cancellation`` (a flagged add/sub; the
finding carries ``bits_cancelled = log2(max|operand| / |result|)``), ``precision_loss`` (any
other flagged op), ``decision_flip`` (integer / boolean results of float inputs that differ from
the shadow's: argmax/argmin/max/min/sort/topk indices — counted only where the chosen shadow
values differ — comparisons, and ``where`` masks built from flipped comparisons).

Cost: each shadowed op runs once more in float64 plus a handful of elementwise passes for the
comparison (the fast path); the local re-run happens only for suspicious ops. Shadows live in a
side table keyed by storage and are freed with the real tensors. See docs/sanitize.md.
"""

from __future__ import annotations

import io
import json
import linecache
import math
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from mixprec.formats.float_format import FloatFormat, get_format
from mixprec.sanitizer import shadow_mode as _eng

SCHEMA_VERSION = 1
KINDS: tuple[str, ...] = _eng.KINDS
PHASES: tuple[str, ...] = ("forward", "backward")
record_rounding = _eng.record_rounding


# ---------------------------------------------------------------------------------------------
# records


@dataclass(frozen=True)
class Finding:
    """One problem: all occurrences of one ``kind`` at one (op, phase, module, location).

    ``bits_lost`` / ``rel_error`` are the worst *local* values over the flagged elements
    (``None`` for decision flips; all bits and ``inf`` for nan / inf / overflow);
    ``propagated_bits`` is the worst error of the real result itself (local + inherited) at those
    elements. ``count`` is the number of affected elements summed over ``occurrences`` op calls,
    ``elements`` the number of elements those calls produced. ``first_step`` counts backward
    passes completed before the first occurrence. ``real_value`` / ``shadow_value`` show the
    worst element. ``code`` is the source line at ``location``.
    """

    kind: str
    op: str
    phase: str
    module: str | None
    location: str | None
    bits_lost: float | None
    rel_error: float | None
    count: int
    first_step: int
    occurrences: int = 1
    elements: int = 0
    dtype: str = "float32"
    module_type: str | None = None
    path: str | None = None
    code: str | None = None
    propagated_bits: float | None = None
    bits_cancelled: float | None = None
    real_value: float | None = None
    shadow_value: float | None = None
    shape: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (non-finite floats become the strings "inf", "-inf", "nan")."""
        d = asdict(self)
        d["shape"] = list(self.shape)
        return {k: _enc(v) for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Finding:
        names = {f.name for f in fields(cls)}
        kw = {k: _dec(v) for k, v in d.items() if k in names}
        kw["shape"] = tuple(kw.get("shape") or ())
        return cls(**kw)

    @property
    def severity(self) -> tuple[float, int]:
        """Sort key, larger is worse: bits lost (decision flips count as all bits), count."""
        b = math.inf if self.bits_lost is None else self.bits_lost
        return (b, self.count)


def _enc(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


def _dec(v: Any) -> Any:
    if isinstance(v, str) and v in ("nan", "inf", "-inf"):
        return float(v)
    return v


@dataclass(frozen=True)
class GradHistogram:
    """log2-magnitude histograms of gradients against a target format's range.

    ``counts[kind][i]`` is the number of finite non-zero gradient values ``g`` of ``kind``
    (``"activation"``: gradients w.r.t. module outputs; ``"weight"``: gradients of leaf tensors,
    i.e. parameters) with ``floor(log2|g|) == bin_lo + i``. Values are the float64 shadows of
    the gradients where the sanitizer has them (so a float16 run shows what float16 lost).
    Fractions are of the finite non-zero values and are computed from the bins: a value flushes
    to zero when it is below ``min_subnormal / 2`` (exact except for values equal to that tie),
    is subnormal between that and ``min_normal``, overflows from ``2^(emax+1)`` up (values in
    ``[max, 2^(emax+1))`` are counted as not overflowing).
    ``recommended_loss_scale`` is the largest power of two ``S`` with ``max|g| * S <= fmt.max``
    over all kinds; ``flush_to_zero_scaled`` is the flush fraction after multiplying by it.
    """

    fmt: str
    bin_lo: int
    counts: dict[str, tuple[int, ...]]
    zeros: dict[str, int]
    nonfinite: dict[str, int]
    max_abs: dict[str, float]
    flush_to_zero: dict[str, float]
    subnormal: dict[str, float]
    overflow: dict[str, float]
    recommended_loss_scale: float | None
    flush_to_zero_scaled: dict[str, float]
    min_subnormal: float
    min_normal: float
    max: float

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(self.counts)

    def total(self, kind: str) -> int:
        return int(sum(self.counts[kind]))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["counts"] = {k: list(v) for k, v in self.counts.items()}
        return d

    def plot(self, path: str | os.PathLike[str]) -> str:
        """Write the histogram figure (one panel per kind) as a PNG; returns the path."""
        from mixprec.sanitizer.render import plot_grad_histogram

        return plot_grad_histogram(self, path)


# ---------------------------------------------------------------------------------------------
# the report


class Report:
    """What a :func:`sanitize` run found. Live while the context runs, frozen after it exits.

    ``findings`` (worst first), ``stats`` (ops seen / shadowed / ...), ``print()``, ``str()``
    (a rich table grouped by source location), ``to_json()`` / ``from_json()``, ``plot(path)``,
    ``grad_histogram(fmt)``, ``mark_step()``.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = dict(config)
        self._engine: _eng.ShadowMode | None = None
        self._findings: list[Finding] | None = None
        self._stats: dict[str, Any] = {}
        self._grads: dict[str, Any] | None = None

    # -- content ---------------------------------------------------------------------------
    @property
    def findings(self) -> list[Finding]:
        if self._engine is not None:
            return _findings_from(self._engine)
        return list(self._findings or [])

    @property
    def stats(self) -> dict[str, Any]:
        if self._engine is not None:
            return _stats_from(self._engine)
        return dict(self._stats)

    def by_kind(self, *kinds: str) -> list[Finding]:
        """Findings whose kind is one of ``kinds`` (validated)."""
        for k in kinds:
            if k not in KINDS:
                raise ValueError(f"unknown finding kind {k!r}; valid kinds are {', '.join(KINDS)}")
        return [f for f in self.findings if f.kind in kinds]

    def mark_step(self) -> None:
        """Declare a step boundary now (also automatic after every backward pass)."""
        if self._engine is None:
            raise RuntimeError("mark_step() only works while the sanitize() context is active")
        self._engine.mark_step()

    # -- gradients ---------------------------------------------------------------------------
    def _grad_data(self) -> dict[str, Any] | None:
        if self._engine is not None:
            return _grads_from(self._engine)
        return self._grads

    def grad_histogram(self, fmt: str | FloatFormat | torch.dtype = "float16") -> GradHistogram:
        """The gradient magnitude histogram against ``fmt``'s range (see :class:`GradHistogram`).

        Raises ``ValueError`` for an unknown format and ``RuntimeError`` when no gradient was
        seen (``track_grads=False``, or no backward pass ran inside the context).
        """
        if isinstance(fmt, torch.dtype):
            fmt = str(fmt).replace("torch.", "")
        f = get_format(fmt)
        data = self._grad_data()
        if not data or not data["counts"]:
            raise RuntimeError(
                "no gradients were recorded: run a backward pass inside sanitize(track_grads=True)"
            )
        return _make_histogram(data, f)

    # -- output ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        from mixprec import __version__

        grads = self._grad_data()
        return {
            "schema_version": SCHEMA_VERSION,
            "tool": "mixprec.sanitize",
            "mixprec_version": __version__,
            "torch_version": torch.__version__,
            "config": self.config,
            "stats": self.stats,
            "findings": [f.to_dict() for f in self.findings],
            "gradients": grads,
        }

    def to_json(self, indent: int | None = 2) -> str:
        """The report as JSON (``schema_version`` first); strict JSON, no NaN/Infinity."""
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> Report:
        """Rebuild a (frozen) report from :meth:`to_json` output."""
        d = json.loads(text)
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(
                f"unsupported sanitize report schema_version {version!r}; this mixprec reads "
                f"version {SCHEMA_VERSION}"
            )
        r = cls(d.get("config", {}))
        r._findings = [Finding.from_dict(x) for x in d.get("findings", [])]
        r._stats = d.get("stats", {})
        r._grads = d.get("gradients")
        return r

    def table(self, *, max_rows: int | None = None, fmt: str = "float16") -> Any:
        """The findings as a ``rich.table.Table`` (worst location first); the caption adds the
        gradient summary against ``fmt`` when gradients were recorded."""
        from mixprec.sanitizer.render import findings_table, grad_summary

        data = self._grad_data()
        hist = _make_histogram(data, get_format(fmt)) if data and data["counts"] else None
        return findings_table(self.findings, self.stats, max_rows, grad_summary(hist))

    def print(self, *, console: Any = None, max_rows: int | None = None, fmt: str = "float16"):
        """Print the table (and gradient summary) with rich."""
        from rich.console import Console

        (console or Console()).print(self.table(max_rows=max_rows, fmt=fmt))

    def __str__(self) -> str:
        from rich.console import Console

        buf = io.StringIO()
        Console(file=buf, width=140, color_system=None, force_terminal=False).print(self.table())
        return buf.getvalue().rstrip("\n")

    def __repr__(self) -> str:
        kinds: dict[str, int] = {}
        for f in self.findings:
            kinds[f.kind] = kinds.get(f.kind, 0) + 1
        return f"Report({kinds or 'no findings'})"

    def plot(self, path: str | os.PathLike[str], *, fmt: str = "float16") -> str:
        """Write a PNG: worst findings (bits lost per location) and, if gradients were seen,
        their histogram against ``fmt``. Uses matplotlib's Agg canvas (no display needed)."""
        from mixprec.sanitizer.render import plot_report

        hist = None
        data = self._grad_data()
        if data and data["counts"]:
            hist = _make_histogram(data, get_format(fmt))
        return plot_report(self.findings, hist, path)

    def save(self, directory: str | os.PathLike[str], *, fmt: str = "float16") -> dict[str, str]:
        """Write report.json, report.txt and report.png into ``directory``; returns the paths."""
        os.makedirs(directory, exist_ok=True)
        paths = {
            "json": os.path.join(directory, "report.json"),
            "text": os.path.join(directory, "report.txt"),
            "png": os.path.join(directory, "report.png"),
        }
        with open(paths["json"], "w") as fh:
            fh.write(self.to_json())
        with open(paths["text"], "w") as fh:
            fh.write(str(self) + "\n")
        self.plot(paths["png"], fmt=fmt)
        return paths

    # -- lifecycle ---------------------------------------------------------------------------
    def _freeze(self) -> None:
        eng = self._engine
        if eng is None:
            return
        self._findings = _findings_from(eng)
        self._stats = _stats_from(eng)
        self._grads = _grads_from(eng)
        self._engine = None


def _findings_from(eng: _eng.ShadowMode) -> list[Finding]:
    out = []
    for a in eng.aggs.values():
        code = None
        if a.path and a.location:
            line = int(a.location.rsplit(":", 1)[1])
            code = linecache.getline(a.path, line).strip() or None
        out.append(
            Finding(
                kind=a.kind,
                op=a.op,
                phase=a.phase,
                module=a.module,
                location=a.location,
                bits_lost=a.bits_lost,
                rel_error=a.rel_error,
                count=a.count,
                first_step=a.first_step,
                occurrences=a.occurrences,
                elements=a.elements,
                dtype=a.dtype,
                module_type=a.module_type,
                path=a.path,
                code=code,
                propagated_bits=a.propagated_bits,
                bits_cancelled=a.bits_cancelled,
                real_value=a.real_value,
                shadow_value=a.shadow_value,
                shape=a.shape,
            )
        )
    out.sort(key=lambda f: f.severity, reverse=True)
    return out


def _stats_from(eng: _eng.ShadowMode) -> dict[str, Any]:
    s = eng.stats
    return {
        "ops": s.ops,
        "ops_shadowed": s.ops_shadowed,
        "ops_slow_path": s.ops_slow_path,
        "ops_unshadowed": dict(s.ops_unshadowed),
        "internal_errors": dict(s.internal_errors),
        "last_internal_error": s.last_internal_error,
        "steps": eng.step,
        "backward_passes": eng.backward_passes,
    }


def _grads_from(eng: _eng.ShadowMode) -> dict[str, Any] | None:
    g = eng.grads
    if not g.counts:
        return {"counts": {}} if eng.track_grads else None
    nonzero = [i for c in g.counts.values() for i in c.nonzero().reshape(-1).tolist()]
    lo, hi = min(nonzero), max(nonzero)
    return {
        "bin_lo": lo - _eng.HIST_OFFSET,
        "counts": {k: c[lo : hi + 1].tolist() for k, c in g.counts.items()},
        "zeros": dict(g.zeros),
        "nonfinite": dict(g.nonfinite),
        "max_abs": dict(g.max_abs),
        "tensors": dict(g.tensors),
        "sampled": dict(g.sampled),
    }


def _make_histogram(data: dict[str, Any], f: FloatFormat) -> GradHistogram:
    lo = int(data["bin_lo"])
    counts = {k: tuple(int(x) for x in v) for k, v in data["counts"].items()}
    # bin e holds [2^e, 2^(e+1)); min_subnormal = 2^m
    m = round(math.log2(f.min_subnormal))
    n = round(math.log2(f.min_normal))
    emax = math.floor(math.log2(f.max))

    def frac(c: tuple[int, ...], pred: Callable[[int], bool], shift: int = 0) -> float:
        tot = sum(c)
        if tot == 0:
            return 0.0
        return sum(x for i, x in enumerate(c) if pred(lo + i + shift)) / tot

    def flush(e: int) -> bool:
        return e <= m - 2  # whole bin below min_subnormal / 2

    max_all = max(data["max_abs"].values(), default=0.0)
    scale = None
    if max_all > 0 and math.isfinite(max_all):
        k = math.floor(math.log2(f.max / max_all))
        while max_all * 2.0**k > f.max:  # guard log2 rounding
            k -= 1
        scale = 2.0**k
    kscale = 0 if scale is None else round(math.log2(scale))
    return GradHistogram(
        fmt=f.name,
        bin_lo=lo,
        counts=counts,
        zeros={k: int(v) for k, v in data.get("zeros", {}).items()},
        nonfinite={k: int(v) for k, v in data.get("nonfinite", {}).items()},
        max_abs={k: float(v) for k, v in data.get("max_abs", {}).items()},
        flush_to_zero={k: frac(c, flush) for k, c in counts.items()},
        subnormal={k: frac(c, lambda e: m - 1 <= e < n) for k, c in counts.items()},
        overflow={k: frac(c, lambda e: e > emax) for k, c in counts.items()},
        recommended_loss_scale=scale,
        flush_to_zero_scaled={k: frac(c, flush, kscale) for k, c in counts.items()},
        min_subnormal=f.min_subnormal,
        min_normal=f.min_normal,
        max=f.max,
    )


# ---------------------------------------------------------------------------------------------
# the context manager

_SHADOWS = {
    "float64": torch.float64,
    "fp64": torch.float64,
    "double": torch.float64,
    "float32": torch.float32,
    "fp32": torch.float32,
}


def _check_modules(modules: Any) -> Any:
    if modules is None or isinstance(modules, torch.nn.Module) or callable(modules):
        return modules
    if isinstance(modules, Iterable) and not isinstance(modules, (str, bytes)):
        return list(modules)
    raise TypeError(
        "modules= takes None, an nn.Module, an iterable of nn.Module or a callable "
        f"(module, fqn) -> bool; got {type(modules).__name__}"
    )


@contextmanager
def sanitize(
    *,
    shadow: str | torch.dtype = "float64",
    threshold_bits: float | None = None,
    track_grads: bool = True,
    modules: torch.nn.Module | Iterable[torch.nn.Module] | Callable[..., bool] | None = None,
    dtype_hint: str | FloatFormat | torch.dtype | None = None,
) -> Iterator[Report]:
    """Run the enclosed code under the numerical sanitizer; yields a live :class:`Report`.

    Args:
        shadow: shadow precision, ``"float64"`` (default) or ``"float32"`` (cheaper; only
            shadows float16/bfloat16 tensors).
        threshold_bits: flag an op when it loses more than this many significand bits locally.
            ``None``: half the mantissa bits of each result's format.
        track_grads: also shadow backward ops and collect gradient histograms.
        modules: restrict checking to these modules (and their submodules): an ``nn.Module``
            (fully qualified names are then taken from it), an iterable of modules, or a
            ``filter_fn(module, fqn) -> bool``. Ops outside them run unshadowed, and tensors
            entering a watched module are taken as exact.
        dtype_hint: the format float32 tensors really hold (emulated formats, e.g. inside
            ``mixprec.autocast(..., emulate=True)``): thresholds, range checks and the rounding
            of local-error inputs then use it. Code that rounds with non-aten kernels should
            also call :func:`record_rounding`.

    Cost: every aten op that rounds runs twice (once in float64) plus four float32 passes over
    each result; suspicious ops run a third time; views cost nothing. A shadow costs a float64
    copy while young and a float32 residual once it has lived a few ops (two passes to compress,
    two to rebuild when used); shadows are freed with the real tensors. One ``.tolist()`` sync
    per op output (CPU: free; CUDA: a host sync per op). Measured on the reference transformer's
    training step: ~4.5x the time, ~2.2x the live memory (benchmarks/sanitize.py).
    """
    if isinstance(shadow, torch.dtype):
        sdt = shadow if shadow in (torch.float64, torch.float32) else None
    else:
        sdt = _SHADOWS.get(str(shadow).lower())
    if sdt is None:
        raise ValueError(f"shadow={shadow!r} is not supported; valid choices are float64, float32")
    if threshold_bits is not None:
        if isinstance(threshold_bits, bool) or not isinstance(threshold_bits, (int, float)):
            raise TypeError(f"threshold_bits must be a number or None, got {threshold_bits!r}")
        if not 0 < threshold_bits <= 53:
            raise ValueError(f"threshold_bits={threshold_bits} must be in (0, 53] or None")
    if not isinstance(track_grads, bool):
        raise TypeError(f"track_grads must be True or False, got {track_grads!r}")
    modules = _check_modules(modules)
    hint = None
    if dtype_hint is not None:
        hint = get_format(
            str(dtype_hint).replace("torch.", "")
            if isinstance(dtype_hint, torch.dtype)
            else dtype_hint
        )
    config = {
        "shadow": str(sdt).replace("torch.", ""),
        "threshold_bits": threshold_bits,
        "track_grads": track_grads,
        "modules": None if modules is None else _describe_modules(modules),
        "dtype_hint": None if hint is None else hint.name,
    }
    tracker = _eng.ModuleTracker(modules)
    engine = _eng.ShadowMode(
        shadow_dtype=sdt,
        threshold_bits=threshold_bits,
        track_grads=track_grads,
        tracker=tracker,
        dtype_hint=hint,
    )
    report = Report(config)
    engine.start()
    report._engine = engine
    try:
        yield report
    finally:
        engine.stop()
        report._freeze()


def _describe_modules(modules: Any) -> str:
    if isinstance(modules, torch.nn.Module):
        return type(modules).__name__
    if callable(modules):
        return getattr(modules, "__name__", "filter_fn")
    return ",".join(type(m).__name__ for m in modules)
