"""Benchmark: ``mixprec.stabilize`` capture + rewrite time on the real-model corpus.

Models: ``mixprec.testing.corpus`` (Hugging Face GPT-2, BERT, LLaMA, ResNet-18 and ViT from small
configs, and a nanoGPT-style GPT with the manual attention path), each with its example batch. Time:
one call of ``stabilize(model, args, kwargs)`` (torch.export capture, non-strict, dims offered as
dynamic, then the rule sweep), split into the capture (``export_graph`` alone) and the rewrite
(``stabilize`` on the captured ``GraphModule``: a graph copy plus the sweep); minimum wall-clock and
CPU (process) time over ``--rounds`` rounds, each on a freshly built model, after one warm-up call
per model (the first export in a process pays torch's one-time imports and caches, reported
separately). One torch thread by default. Aim (issue 14): a few seconds each.

Run: ``HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/stabilize.py [--rounds N] [--threads N]``
(writes benchmarks/results/stabilize.md).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from _common import publish
from mixprec.stable import stabilize
from mixprec.stable.capture import export_graph
from mixprec.testing import corpus


def _timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def measure(name: str, rounds: int) -> dict[str, Any]:
    """Warm-up time, and minimum times of the capture and of the rule sweep, for one model."""
    entry = corpus.get(name)
    model, args, kwargs = entry.example(0)
    (_, changes), first, _ = _timed(lambda: stabilize(model, args, kwargs))
    capture: list[tuple[float, float]] = []
    rewrite: list[tuple[float, float]] = []
    nodes = 0
    for seed in range(rounds):
        model, args, kwargs = entry.example(seed)
        gm, wall, cpu = _timed(lambda m=model, a=args, k=kwargs: export_graph(m, a, k))
        capture.append((wall, cpu))
        nodes = len(gm.graph.nodes)
        # stabilize on a GraphModule: a graph copy plus the sweep, no capture
        _, wall, cpu = _timed(lambda g=gm: stabilize(g))
        rewrite.append((wall, cpu))
    return {
        "first": first,
        "capture": min(capture),
        "rewrite": min(rewrite),
        "nodes": nodes,
        "changes": len(changes),
        "params": sum(p.numel() for p in model.parameters()),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds (minimum is reported)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name in corpus.available():
        r = measure(name, args.rounds)
        (cap_w, cap_c), (rw_w, rw_c) = r["capture"], r["rewrite"]
        rows.append(
            [
                name,
                f"{r['params'] / 1e3:.0f}k",
                str(r["nodes"]),
                f"{r['first']:.2f}",
                f"{cap_w:.2f}",
                f"{rw_w:.3f}",
                f"{cap_w + rw_w:.2f}",
                f"{cap_c + rw_c:.2f}",
                str(r["changes"]),
            ]
        )
    header = [
        "model", "params", "graph nodes", "first call (s)", "capture (s)", "rewrite (s)",
        "capture + rewrite, wall (s)", "same, CPU (s)", "rewrites",
    ]  # fmt: skip
    missing = sorted(set(corpus.CORPUS) - set(corpus.available()))
    publish(
        "stabilize",
        "stabilize benchmark: torch.export capture + rule sweep on the model corpus",
        header,
        rows,
        f"Minimum of {args.rounds} rounds on freshly built models after one warm-up call per "
        f"model (first call: the warm-up, including torch's one-time costs), "
        f"{torch.get_num_threads()} torch thread(s). Capture: torch.export alone; rewrite: "
        "`stabilize` on the captured graph (a graph copy plus the rule sweep). "
        "The corpus models contain no unstable form, so 0 rewrites is the right answer. "
        "Aim (issue 14): a few seconds each. The machine is shared: expect noise."
        + (f" Not measured (library missing): {', '.join(missing)}." if missing else ""),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
