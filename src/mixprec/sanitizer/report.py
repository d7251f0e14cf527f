"""What a :func:`~mixprec.sanitize` run found: the :class:`Report`, its JSON and its views."""

from __future__ import annotations

import io
import json
import os
from typing import Any, Protocol

import torch

from mixprec.formats import FloatFormat, get_format
from mixprec.sanitizer.findings import KINDS, Finding
from mixprec.sanitizer.gradients import GradHistogram, make_histogram
from mixprec.schema import SCHEMA_VERSION


class LiveRun(Protocol):
    """What a report reads from a running sanitizer (the dispatch mode)."""

    def report_findings(self) -> list[Finding]: ...

    def report_stats(self) -> dict[str, Any]: ...

    def report_gradients(self) -> dict[str, Any] | None: ...

    def mark_step(self) -> None: ...


class Report:
    """What a :func:`sanitize` run found. Live while the context runs, frozen after it exits.

    ``findings`` (worst first), ``stats`` (ops seen / shadowed / ...), ``print()``, ``str()``
    (a rich table grouped by source location), ``to_json()`` / ``from_json()``, ``plot(path)``,
    ``grad_histogram(fmt)``, ``mark_step()``.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = dict(config)
        self._live: LiveRun | None = None
        self._findings: list[Finding] | None = None
        self._stats: dict[str, Any] = {}
        self._grads: dict[str, Any] | None = None

    # -- content -------------------------------------------------------------------------------
    @property
    def findings(self) -> list[Finding]:
        if self._live is not None:
            return self._live.report_findings()
        return list(self._findings or [])

    @property
    def stats(self) -> dict[str, Any]:
        if self._live is not None:
            return self._live.report_stats()
        return dict(self._stats)

    def chain(self, finding: Finding) -> list[Finding]:
        """``finding`` and the findings its :attr:`~Finding.cause` links lead to, root cause
        first (a cause missing from the report ends the chain)."""
        by_label = {f.label: f for f in self.findings}
        out = [finding]
        while out[-1].cause is not None and out[-1].cause in by_label:
            nxt = by_label[out[-1].cause]
            if nxt in out:  # a cycle (a loop's op fed by its own later result): stop
                break
            out.append(nxt)
        return out[::-1]

    def by_kind(self, *kinds: str) -> list[Finding]:
        """Findings whose kind is one of ``kinds`` (validated)."""
        for k in kinds:
            if k not in KINDS:
                raise ValueError(f"unknown finding kind {k!r}; valid kinds are {', '.join(KINDS)}")
        return [f for f in self.findings if f.kind in kinds]

    def mark_step(self) -> None:
        """Declare a step boundary now (also automatic after every backward pass)."""
        if self._live is None:
            raise RuntimeError("mark_step() only works while the sanitize() context is active")
        self._live.mark_step()

    # -- gradients -----------------------------------------------------------------------------
    def _grad_data(self) -> dict[str, Any] | None:
        if self._live is not None:
            return self._live.report_gradients()
        return self._grads

    def _histogram(self, fmt: str | FloatFormat) -> GradHistogram | None:
        """The gradient histogram against ``fmt``, or None when no gradient was recorded."""
        data = self._grad_data()
        if not data or not data["counts"]:
            return None
        return make_histogram(data, get_format(fmt))

    def grad_histogram(self, fmt: str | FloatFormat | torch.dtype = "float16") -> GradHistogram:
        """The gradient magnitude histogram against ``fmt``'s range (see :class:`GradHistogram`).

        Raises ``ValueError`` for an unknown format and ``RuntimeError`` when no gradient was
        seen (``track_grads=False``, or no backward pass ran inside the context).
        """
        if isinstance(fmt, torch.dtype):
            fmt = str(fmt).replace("torch.", "")
        f = get_format(fmt)  # an unknown format is an error even without gradients
        hist = self._histogram(f)
        if hist is None:
            raise RuntimeError(
                "no gradients were recorded: run a backward pass inside sanitize(track_grads=True)"
            )
        return hist

    # -- output --------------------------------------------------------------------------------
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

    def table(
        self, *, max_rows: int | None = None, fmt: str = "float16", width: int | None = None
    ) -> Any:
        """The findings as a ``rich.table.Table`` (worst location first), laid out for
        ``width`` columns (None: the full layout). The notes under it (gradient summary against
        ``fmt``, cause chains, ...) are in :meth:`notes`."""
        from mixprec.sanitizer.render import findings_table

        del fmt  # kept for callers of the old signature: the gradient summary is a note now
        return findings_table(self.findings, self.stats, max_rows, width)

    def notes(self, *, fmt: str = "float16") -> list[str]:
        """The lines printed under the table: unshadowed ops, sanitizer errors, compiled
        modules run eagerly, the gradient summary against ``fmt``, chains of causes."""
        from mixprec.sanitizer.render import grad_summary, report_notes

        return report_notes(self.findings, self.stats, grad_summary(self._histogram(fmt)))

    def print(
        self,
        *,
        console: Any = None,
        max_rows: int | None = None,
        fmt: str = "float16",
        width: int | None = None,
    ) -> None:
        """Print the table and its notes with rich, for ``width`` columns (default: the
        console's width). Notes are soft-wrapped: the terminal wraps them, rich does not."""
        from rich.console import Console

        console = console or Console(width=width)
        width = console.width if width is None else width
        console.print(self.table(max_rows=max_rows, fmt=fmt, width=width))
        for line in self.notes(fmt=fmt):
            console.print(line, soft_wrap=True, highlight=False, markup=False)

    def render(self, width: int = 120, *, max_rows: int | None = None, fmt: str = "float16") -> str:
        """The printed report as plain text for ``width`` columns, without trailing spaces."""
        from rich.console import Console

        buf = io.StringIO()
        console = Console(file=buf, width=width, color_system=None, force_terminal=False)
        self.print(console=console, max_rows=max_rows, fmt=fmt, width=width)
        return "\n".join(line.rstrip() for line in buf.getvalue().rstrip("\n").splitlines())

    def __str__(self) -> str:
        return self.render()

    def __repr__(self) -> str:
        kinds: dict[str, int] = {}
        for f in self.findings:
            kinds[f.kind] = kinds.get(f.kind, 0) + 1
        return f"Report({kinds or 'no findings'})"

    def plot(self, path: str | os.PathLike[str], *, fmt: str = "float16") -> str:
        """Write a PNG: worst findings (bits lost per location) and, if gradients were seen,
        their histogram against ``fmt``. Uses matplotlib's Agg canvas (no display needed)."""
        from mixprec.sanitizer.render import plot_report

        return plot_report(self.findings, self._histogram(fmt), path)

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

    # -- lifecycle (used by sanitize()) --------------------------------------------------------
    def _attach(self, live: LiveRun) -> None:
        self._live = live

    def _freeze(self) -> None:
        live = self._live
        if live is None:
            return
        self._findings = live.report_findings()
        self._stats = live.report_stats()
        self._grads = live.report_gradients()
        self._live = None
