"""Benchmark: what the sanitizer's floor would be with its per-op path in C++ (an experiment).

``benchmarks/cxx/floors.cpp`` (mode SHADOW) is the benchmark's ``BareShadow`` (see
``sanitize_corpus.py``: every non-view op with a float32 argument run again on float64 shadows
looked up by storage, compared, its shadow kept) written as a C++ dispatcher fallback. This
script compiles it against the installed torch (``torch.utils.cpp_extension``: a C++ compiler
and ninja, about a minute the first time, then cached) and times one training step of each
corpus model, in CPU time, minimum of ``--steps`` interleaved rounds after a warm-up, one torch
thread: plain; a pass-through mode in Python (``TorchDispatchMode``) and in C++ (the fallback
forwarding every op); the bare shadow in Python and in C++; and ``sanitize()``. mixprec itself
has no C++ build against torch's headers (see docs/design.md); this measures what one would buy.

Run: ``HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/sanitize_cxx_floor.py [--steps N]
[--repeat N ...]`` (writes benchmarks/results/sanitize_cxx_floor.md).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from _common import publish
from mixprec.sanitizer import sanitize
from mixprec.testing import corpus
from sanitize_corpus import BareShadow, PassThrough, times

SOURCE = Path(__file__).resolve().parent / "cxx" / "floors.cpp"


def load_extension() -> Any:
    """The compiled fallback (cached by torch between runs); SystemExit where it cannot build."""
    from torch.utils import cpp_extension

    if shutil.which("ninja") is None or shutil.which(os.environ.get("CXX", "c++")) is None:
        raise SystemExit("the C++ floor benchmarks need a C++ compiler and ninja on PATH")
    flags = ["-O3", "-ffast-math"] + (["-march=native"] if sys.platform == "linux" else [])
    return cpp_extension.load("mixprec_cxx_floors", [str(SOURCE)], extra_cflags=flags)


def start(doc: str | None, argv: list[str] | None) -> tuple[argparse.Namespace, Any, float]:
    """The C++ floor benchmarks' start: their command line (``--steps``, ``--repeat``), one
    torch thread, the extension, and the seconds its loading took."""
    ap = argparse.ArgumentParser(description=(doc or "").partition("\n")[0])
    ap.add_argument("--steps", type=int, default=7, help="timed rounds (minimum is reported)")
    ap.add_argument("--repeat", type=int, nargs="+", default=[1, 16], help="batch repeats")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    ext = load_extension()
    return args, ext, time.time() - t0


def experiment_note(built: float, issue: int) -> str:
    """The closing sentences of a C++ floor table's note."""
    return (
        f"Loading the extension took {built:.0f} s (a first build compiles it, about a "
        "minute). An experiment, not part of mixprec: it measures what moving the per-op "
        f"path out of Python would buy (issue {issue}). The machine is shared: expect noise."
    )


def cxx_mode(ext: Any, mode: int) -> Callable[[], contextlib.AbstractContextManager[None]]:
    """A context manager factory: ``ext``'s fallback in ``mode`` (ext.PASS, ext.SHADOW,
    ext.ROUND_BF16) for the ops of this thread inside it."""

    @contextlib.contextmanager
    def region() -> Iterator[None]:
        ext.enable(True, mode)
        try:
            yield
        finally:
            ext.enable(False, mode)

    return region


def _modes(ext: Any) -> dict[str, Callable[[], Any]]:
    return {
        "plain": contextlib.nullcontext,
        "dispatch, Python": PassThrough,
        "dispatch, C++": cxx_mode(ext, ext.PASS),
        "bare shadow, Python": BareShadow,
        "bare shadow, C++": cxx_mode(ext, ext.SHADOW),
        "sanitize": sanitize,
    }


def _row(name: str, repeat: int, steps: int, modes: dict[str, Callable[[], Any]]) -> list[str]:
    best, _ = times(name, repeat, steps, modes)
    plain = best["plain"]
    ratios = [f"{best[m] / plain:.2f}" for m in modes if m != "plain"]
    return [name, corpus.get(name).batch(repeat), f"{1e3 * plain:.1f}", *ratios]


def main(argv: list[str] | None = None) -> int:
    args, ext, built = start(__doc__, argv)
    modes = _modes(ext)
    rows = [_row(n, k, args.steps, modes) for k in args.repeat for n in corpus.available()]
    header = ["model", "batch", "plain (ms)", *(f"{m} ÷ plain" for m in modes if m != "plain")]
    note = (
        f"CPU time, minimum of {args.steps} interleaved rounds after a warm-up, 1 torch thread. "
        "dispatch: every op forwarded unchanged, by a TorchDispatchMode (Python) or by the "
        "C++ fallback; bare shadow: every non-view op with a float32 argument run again on "
        "float64 shadows looked up by storage, compared with its result and kept, by "
        "sanitize_corpus.py's BareShadow (Python, comparing in the sanitizer's C pass) or by "
        "benchmarks/cxx/floors.cpp (a C++ dispatcher fallback on a borrowed dispatch "
        "key, its own vectorised comparison loop); neither has the sanitizer's features. "
        + experiment_note(built, 13)
    )
    title = "the sanitizer's floor with its per-op path in C++: one training step ÷ plain fp32"
    publish("sanitize_cxx_floor", title, header, rows, note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
