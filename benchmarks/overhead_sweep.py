"""Benchmark: how the overheads of emulation and of the sanitizer fall as the step grows.

Each corpus model (``mixprec.testing.corpus``: HF GPT-2, BERT, LLaMA, ResNet-18, ViT from small
configs, a nanoGPT-style GPT) with its example batch repeated 1, 2, 4, ... ``--max-repeat``
times: the plain fp32 training step (forward, the entry's loss, backward), the same step inside
``mixprec.autocast("bf16", emulate=True)``, and inside ``mixprec.sanitize()``. One torch thread,
process CPU time, minimum of ``--steps`` interleaved rounds after a warm-up round.

Both overheads have a part per op (the Python of a function or dispatch mode, the same at every
batch) and a part per element (rounding passes; the float64 re-execution and its checks), so the
ratio falls from its per-op-bound value at the corpus batch towards its per-element value as the
step grows. The figure plots each ratio against the fp32 step's time, one line per model, with
the targets of issues 13 (sanitizer: <= 3x, never above 5x) and 15 (emulation: <= 1.3x).

Run: ``HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/overhead_sweep.py [--steps N]
[--max-repeat N] [--models ...]`` (writes benchmarks/results/overhead_sweep.md and .png).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

import mixprec
from _common import RESULTS, publish
from mixprec.sanitizer import sanitize
from mixprec.testing import corpus
from sanitize_corpus import Runner

MODES: dict[str, Callable[[], contextlib.AbstractContextManager[Any]]] = {
    "fp32": contextlib.nullcontext,
    "emulated bf16": lambda: mixprec.autocast("bf16", emulate=True),
    "sanitize": sanitize,
}


def measure(name: str, repeat: int, steps: int) -> dict[str, float]:
    """Best CPU seconds per mode, interleaved rounds after a warm-up round."""
    run = Runner(name, repeat)  # its step: forward, loss, backward, zero_grad
    best = dict.fromkeys(MODES, float("inf"))
    for i in range(steps + 1):
        for mode, ctx in MODES.items():
            with ctx():
                t0 = time.process_time()
                run.step()
                dt = time.process_time() - t0
            if i:
                best[mode] = min(best[mode], dt)
    return best


def plot(points: dict[str, list[tuple[float, float, float]]], path: str) -> None:
    """Two panels, ratio against the fp32 step (ms, log scale), one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    panels = (
        (axes[0], 1, "emulated bf16 ÷ fp32 step", ((1.3, "target 1.3x"),)),
        (axes[1], 2, "sanitize() ÷ fp32 step", ((3.0, "aim 3x"), (5.0, "limit 5x"))),
    )
    for ax, k, title, targets in panels:
        for name, pts in points.items():
            ax.plot([p[0] for p in pts], [p[k] for p in pts], marker="o", label=name)
        for y, label in targets:
            ax.axhline(y, color="grey", linestyle="--", linewidth=1)
            ax.annotate(label, (1.0, y), xycoords=("axes fraction", "data"), ha="right",
                        va="bottom", color="grey", fontsize=8)  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("fp32 step (ms, one thread)")
        ax.set_ylabel("ratio")
        ax.set_title(title)
        ax.set_ylim(bottom=1.0)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5, help="timed rounds (minimum is reported)")
    ap.add_argument("--max-repeat", type=int, default=64, help="largest batch repeat (power of 2)")
    ap.add_argument("--models", nargs="+", default=None, help="corpus models (default: all)")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.max_repeat < 1:
        ap.error(f"--steps and --max-repeat must be >= 1, got {args.steps} and {args.max_repeat}")
    torch.set_num_threads(1)
    repeats = [2**k for k in range(args.max_repeat.bit_length()) if 2**k <= args.max_repeat]
    rows, points = [], {}
    for name in args.models or corpus.available():
        for repeat in repeats:
            t = measure(name, repeat, args.steps)
            emu, san = t["emulated bf16"] / t["fp32"], t["sanitize"] / t["fp32"]
            rows.append([name, corpus.get(name).batch(repeat), f"{1e3 * t['fp32']:.1f}",
                         f"{emu:.2f}", f"{san:.1f}"])  # fmt: skip
            points.setdefault(name, []).append((1e3 * t["fp32"], emu, san))
            print(f"{name} x{repeat}: {rows[-1][2:]}", file=sys.stderr, flush=True)
    RESULTS.mkdir(exist_ok=True)
    plot(points, str(RESULTS / "overhead_sweep.png"))
    header = ["model", "batch", "fp32 (ms)", "emulated bf16 ÷ fp32", "sanitize ÷ fp32"]
    note = (
        f"One torch thread, process CPU time, minimum of {args.steps} interleaved rounds after a "
        "warm-up round; step = forward, loss, backward, all inside the mode. Emulated bf16 = "
        '`mixprec.autocast("bf16", emulate=True)`; sanitize = `mixprec.sanitize()` (float64 '
        "shadows, gradients tracked). Plot: ![overhead against step size](results/"
        "overhead_sweep.png). Targets: issue 15, emulation <= 1.3x; issue 13, sanitizer <= 3x, "
        "never above 5x. The machine is shared: expect noise."
    )
    title = "Overhead against step size: emulated bf16 and sanitize() ÷ fp32 on the corpus"
    publish("overhead_sweep", title, header, rows, note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
