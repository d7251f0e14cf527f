"""Benchmark: what emulated bf16 would cost with its per-op path in C++ (an experiment).

``benchmarks/cxx/floors.cpp`` (mode ROUND_BF16) does the emulation's rounding work as a C++
dispatcher fallback below autograd: every float32 argument not known to hold bf16 values is
rounded out of place, every float32 result of such an op in place, gradients included (backward
ops are ops too); no op policy, no straight-through bookkeeping. This script compiles it against
the installed torch (as ``sanitize_cxx_floor.py`` does) and times one training step of each
corpus model (CPU time, minimum of ``--steps`` interleaved rounds after a warm-up, one torch
thread): fp32; a pass-through Python ``TorchFunctionMode`` (the floor of mixprec's regions); the
same fallback forwarding every op; the C++ rounding; and ``mixprec.autocast("bf16",
emulate=True)``. mixprec has no C++ build against torch's headers (see docs/design.md); this
measures what one would buy.

Run: ``HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/autocast_cxx_floor.py [--steps N]
[--repeat N ...]`` (writes benchmarks/results/autocast_cxx_floor.md).
"""

from __future__ import annotations

import os
import sys
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _common import publish
from autocast_corpus import MODES, Ctx, Runner, interleave
from mixprec.testing import corpus
from sanitize_cxx_floor import cxx_mode, experiment_note, start


def _row(name: str, repeat: int, steps: int, ext: Any) -> list[str]:
    forward: dict[str, Ctx] = {m: MODES[m] for m in ("fp32", "function mode only", "bf16")}
    whole = {"C++ pass": cxx_mode(ext, ext.PASS), "C++ bf16": cxx_mode(ext, ext.ROUND_BF16)}
    runs = {m: Runner(name, repeat, ctx) for m, ctx in forward.items()}
    # a dispatcher fallback sees the backward's ops only where its key is included then
    runs |= {m: Runner(name, repeat, ctx, ctx) for m, ctx in whole.items()}
    best = {m: run.best for m, run in interleave(runs, steps).items()}
    base = best["fp32"]
    order = ("function mode only", "C++ pass", "C++ bf16", "bf16")
    return [name, corpus.get(name).batch(repeat), f"{1e3 * base:.1f}"] + [
        f"{best[m] / base:.2f}" for m in order
    ]


def main(argv: list[str] | None = None) -> int:
    args, ext, built = start(__doc__, argv)
    rows = [_row(n, k, args.steps, ext) for k in args.repeat for n in corpus.available()]
    header = [
        "model", "batch", "fp32 (ms)", "function mode only ÷ fp32", "C++ pass ÷ fp32",
        "C++ bf16 rounding ÷ fp32", "mixprec bf16 ÷ fp32",
    ]  # fmt: skip
    note = (
        f"CPU time, minimum of {args.steps} interleaved rounds after a warm-up, 1 torch thread. "
        "function mode only: a pass-through TorchFunctionMode around the forward; C++ pass: "
        "the fallback of benchmarks/cxx/floors.cpp forwarding every op of the step, backward "
        "included; C++ bf16 rounding: the same fallback rounding every float32 argument not "
        "yet in bf16 (out of place) and the float32 results of such ops (in place), no op "
        'policy; mixprec bf16: `mixprec.autocast("bf16", emulate=True)` around the forward '
        "(its gradient roundings run in the backward). " + experiment_note(built, 15)
    )
    title = "emulated bf16 with its per-op path in C++: one training step ÷ fp32"
    publish("autocast_cxx_floor", title, header, rows, note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
