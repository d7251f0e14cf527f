"""Progress of ``mixprec demo``: rich bars on a terminal, plain flushed lines anywhere else.

A terminal gets one live rich bar per run. When stdout is a pipe or a file (CI logs,
``| tee``) a live display would show nothing until the end, so :class:`PlainLines` prints a
line per run every ``interval_s`` seconds and when the run ends::

    [text · fp16-O2 8/12] step 120/250 loss 2.4100 eta 12s
    [text · fp16-O2 8/12] done 250/250 loss 2.3012 in 24.1s

Both print through the run's ``rich.console.Console`` (which flushes after every print).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Protocol

OnStep = Callable[[int, float], None]
"""``on_step(done, loss)``: ``done`` counts a run's steps from 1 to its total."""


class Progress(Protocol):
    """Where a demo reports its runs; a context manager around the whole demo."""

    def run(self, name: str, total: int) -> OnStep:
        """Start run ``name`` of ``total`` steps; returns the callback for each of its steps."""
        ...

    def __enter__(self) -> Progress: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class _Quiet:
    """Context-manager plumbing shared by the implementations; reports nothing."""

    def run(self, name: str, total: int) -> OnStep:
        return lambda done, loss: None

    def __enter__(self) -> _Quiet:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class NoProgress(_Quiet):
    """``--no-progress``: nothing until the tables."""


class PlainLines(_Quiet):
    """One plain line per run every ``interval_s`` seconds and one when it ends.

    ``runs``: how many runs the demo has (each line says which one this is). ``clock`` is
    injectable for tests. Cost: one clock read per step.
    """

    def __init__(
        self,
        console: Any,
        runs: int,
        *,
        interval_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval_s < 0:
            raise ValueError(f"interval_s must be >= 0; got {interval_s!r}")
        self.console = console
        self.runs = runs
        self.interval_s = interval_s
        self.clock = clock
        self.started = 0

    def run(self, name: str, total: int) -> OnStep:
        self.started += 1
        tag = f"[{name} {self.started}/{self.runs}]"
        start = last = self.clock()

        def on_step(done: int, loss: float) -> None:
            nonlocal last
            now = self.clock()
            if done >= total:
                self._line(f"{tag} done {done}/{total} loss {loss:.4f} in {now - start:.1f}s")
            elif now - last >= self.interval_s:
                eta = (now - start) / done * (total - done)
                self._line(f"{tag} step {done}/{total} loss {loss:.4f} eta {eta:.0f}s")
            else:
                return
            last = now

        return on_step

    def _line(self, text: str) -> None:
        self.console.out(text, highlight=False)


class RichBars(_Quiet):
    """One rich progress bar per run (task · recipe, steps, loss, elapsed, remaining)."""

    def __init__(self, console: Any) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as RichProgress

        self.bars = RichProgress(
            TextColumn("{task.description:<28}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:>8}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )

    def run(self, name: str, total: int) -> OnStep:
        bar = self.bars.add_task(name, total=total, loss="")

        def on_step(done: int, loss: float) -> None:
            if done % 10 == 0 or done == total:  # a redraw per step would cost more than the step
                self.bars.update(bar, completed=done, loss=f"{loss:.4f}")

        return on_step

    def __enter__(self) -> RichBars:
        self.bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bars.stop()


def make_progress(console: Any, enabled: bool, runs: int) -> Progress:
    """Rich bars when ``console`` is a terminal, else plain lines; nothing unless ``enabled``."""
    if not enabled:
        return NoProgress()
    if console.is_terminal:
        return RichBars(console)
    return PlainLines(console, runs)
