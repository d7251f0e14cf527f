"""Findings: the kinds, the public :class:`Finding` record, and their aggregation in a run."""

from __future__ import annotations

import linecache
import math
from dataclasses import asdict, dataclass, field, fields, replace
from types import CodeType
from typing import Any, NamedTuple

from mixprec.sanitizer.attribution import format_location

KINDS: tuple[str, ...] = (
    "nan",
    "inf",
    "overflow",
    "decision_flip",
    "underflow",
    "cancellation",
    "precision_loss",
)
PHASES: tuple[str, ...] = ("forward", "backward")
# kinds whose values (inf, NaN, flushed zeros) feed later findings: their labels become causes
CAUSE_KINDS = frozenset({"nan", "inf", "overflow", "underflow"})


def finding_label(kind: str, op: str, phase: str, module: str | None, location: str | None) -> str:
    """A finding's label, ``"underflow at aten._softmax.default (forward, attn, f.py:12)"``:
    what :attr:`Finding.cause` holds."""
    where = ", ".join(x for x in (phase, module or None, location) if x)
    return f"{kind} at {op} ({where})"


@dataclass(frozen=True)
class Finding:
    """One problem: all occurrences of one ``kind`` at one (op, phase, module, location).

    ``bits_lost`` / ``rel_error`` are the worst *local* values over the flagged elements
    (``None`` for decision flips; all bits and ``inf`` for nan / inf / overflow);
    ``propagated_bits`` is the worst error of the real result itself (local + inherited) at those
    elements. ``count`` is the number of affected elements summed over ``occurrences`` op calls,
    ``elements`` the number of elements those calls produced. ``first_step`` counts backward
    passes completed before the first occurrence. ``real_value`` / ``shadow_value`` show the
    worst element. ``code`` is the source line at ``location``. ``cause``: the :attr:`label`
    of an earlier nan / inf / overflow / underflow finding whose values fed this op's inputs
    (its root cause, or the next link of a chain; see :meth:`Report.chain`), else None.
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
    cause: str | None = None

    @property
    def label(self) -> str:
        """``"<kind> at <op> (<phase>, <module>, <location>)"``: what another finding's
        ``cause`` names this one by."""
        return finding_label(self.kind, self.op, self.phase, self.module, self.location)

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


# ---------------------------------------------------------------------------------------------
# aggregation during a run


class Site(NamedTuple):
    """Where an op ran: module (fully qualified name, class name), user source frame. A
    backward op has the site of the forward op that made its autograd node. (A named tuple:
    one is made per checked op, ~5x faster than a frozen dataclass.)"""

    module: str | None
    module_type: str | None
    where: tuple[CodeType, int] | None


@dataclass(frozen=True)
class Hit:
    """What one op call contributes to a finding (worst element's values where measured)."""

    kind: str
    dtype: str
    count: int
    elements: int
    shape: tuple[int, ...]
    bits: float | None = None
    rel: float | None = None
    propagated: float | None = None
    cancelled: float | None = None
    example: tuple[float, float] | None = None  # (real, shadow) of the worst element
    cause: str | None = None  # label of the finding that fed the op's inputs


@dataclass
class _Accumulator:
    """Mutable accumulator for one (kind, op, phase, module, location) key; Finding's fields."""

    kind: str
    op: str
    phase: str
    module: str | None
    module_type: str | None
    location: str | None
    path: str | None
    dtype: str
    cause: str | None = None  # the first linked cause among the hits
    bits_lost: float | None = None
    rel_error: float | None = None
    count: int = 0
    occurrences: int = 0
    first_step: int = 0
    elements: int = 0
    propagated_bits: float | None = None
    bits_cancelled: float | None = None
    real_value: float | None = None
    shadow_value: float | None = None
    shape: tuple[int, ...] = ()

    def add(self, hit: Hit) -> None:
        self.count += hit.count
        self.cause = self.cause or hit.cause
        self.elements += hit.elements
        self.occurrences += 1
        if hit.bits is not None and (self.bits_lost is None or hit.bits > self.bits_lost):
            self.bits_lost, self.rel_error = hit.bits, hit.rel
            if hit.example is not None:
                self.real_value, self.shadow_value = hit.example
        elif self.rel_error is None:
            self.rel_error = hit.rel
        self.propagated_bits = _maxopt(self.propagated_bits, hit.propagated)
        self.bits_cancelled = _maxopt(self.bits_cancelled, hit.cancelled)

    def finding(self) -> Finding:
        code = None
        if self.path and self.location:
            line = int(self.location.rsplit(":", 1)[1])
            code = linecache.getline(self.path, line).strip() or None
        return Finding(**vars(self), code=code)


def _maxopt(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)


@dataclass
class FindingLog:
    """Findings of a run, aggregated per (kind, op, phase, module, location) as they come."""

    step: int = 0  # the current step: a new key's first_step
    _accs: dict[tuple[Any, ...], _Accumulator] = field(default_factory=dict)

    def add(self, op: str, phase: str, site: Site, hit: Hit) -> str:
        """Count ``hit`` in its finding; returns the finding's label."""
        location, path = format_location(site.where)
        label = finding_label(hit.kind, op, phase, site.module, location)
        if hit.cause == label:  # a loop feeding an op its own earlier output: no self-link
            hit = replace(hit, cause=None)
        key = (hit.kind, op, phase, site.module, location)
        acc = self._accs.get(key)
        if acc is None:
            acc = self._accs[key] = _Accumulator(
                kind=hit.kind,
                op=op,
                phase=phase,
                module=site.module,
                module_type=site.module_type,
                location=location,
                path=path,
                dtype=hit.dtype,
                first_step=self.step,
                shape=hit.shape,
            )
        acc.add(hit)
        return label

    def findings(self) -> list[Finding]:
        """The findings, worst first (ties in order of first occurrence)."""
        out = [acc.finding() for acc in self._accs.values()]
        out.sort(key=lambda f: f.severity, reverse=True)
        return out


@dataclass
class Stats:
    """Counts of what the mode saw (the report's ``stats`` with the step counters)."""

    ops: int = 0
    ops_shadowed: int = 0
    ops_slow_path: int = 0
    ops_unshadowed: dict[str, int] = field(default_factory=dict)
    internal_errors: dict[str, int] = field(default_factory=dict)
    last_internal_error: str | None = None

    def to_dict(self, steps: int, backward_passes: int) -> dict[str, Any]:
        return {
            "ops": self.ops,
            "ops_shadowed": self.ops_shadowed,
            "ops_slow_path": self.ops_slow_path,
            "ops_unshadowed": dict(self.ops_unshadowed),
            "internal_errors": dict(self.internal_errors),
            "last_internal_error": self.last_internal_error,
            "steps": steps,
            "backward_passes": backward_passes,
        }

    @staticmethod
    def count(table: dict[str, int], name: str) -> None:
        table[name] = table.get(name, 0) + 1
