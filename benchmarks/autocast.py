"""Benchmark: one training step of a small transformer under each precision mode (CPU).

Model: 4 pre-norm transformer blocks, d_model 256, 4 heads, MLP 1024, batch 16 x 64 tokens;
step = forward, MSE loss, backward, SGD update. Modes: fp32; mixprec emulation of bf16, fp16
and fp8 (e4m3 operands / e5m2 gradients, plain and with delayed per-tensor scaling, and MXFP8);
torch.autocast bf16 and fp16; and ``mixprec.autocast(fmt)`` with ``emulate=None`` (automatic
choice). Reports the minimum step time over ``--steps`` interleaved rounds (after one warm-up
step), the ratio to fp32 and, for emulated formats torch.autocast also runs, the speed-up over it.

Run: ``.venv/bin/python benchmarks/autocast.py [--steps N] [--out FILE]`` (default output:
``benchmarks/results/autocast.md``)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

# idle OpenMP threads sleep instead of spinning, so multi-thread CPU time counts work (as in
# benchmarks/autocast_corpus.py); set OMP_WAIT_POLICY to override
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
import torch.nn as nn
import torch.nn.functional as F

import mixprec
from mixprec.machine import cpu_flags
from mixprec.precision import DelayedScaling
from mixprec.precision.native import cpu_has_fast_bf16


class Block(nn.Module):
    def __init__(self, d: int = 256, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        qkv = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(*[Block() for _ in range(4)])


class Runner:
    """One mode: its own model, data and optimizer (identical initial state for every mode)."""

    def __init__(self, ctx: Callable[[], contextlib.AbstractContextManager[object]]) -> None:
        self.ctx = ctx
        self.model = make_model()
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(16, 64, 256, generator=g)
        self.target = torch.randn(16, 64, 256, generator=g)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3)
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.first_loss = self.step()  # warm-up (oneDNN primitive creation, caches)

    def step(self) -> float:
        with self.ctx():
            y = self.model(self.x)
            loss = F.mse_loss(y.float(), self.target)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    def timed_step(self) -> None:
        c0, t0 = time.process_time(), time.perf_counter()
        self.step()
        self.times.append(time.perf_counter() - t0)
        self.cpu_times.append(time.process_time() - c0)


Mode = tuple[str, Callable[[], contextlib.AbstractContextManager[object]], int]


def modes_for(steps: int, slow_steps: int) -> list[Mode]:
    delayed = DelayedScaling()
    return [
        ("fp32", contextlib.nullcontext, steps),
        ("emulated bf16", lambda: mixprec.autocast("bf16", emulate=True), steps),
        ("emulated fp16", lambda: mixprec.autocast("fp16", emulate=True), steps),
        (
            "emulated fp8 (c=e4m3, g=e5m2, unscaled)",
            lambda: mixprec.autocast("p=f32,c=e4m3,o=f32,g=e5m2", emulate=True, fp8_recipe=None),
            steps,
        ),
        (
            "emulated fp8 (c=e4m3, g=e5m2, current scaling: the default)",
            lambda: mixprec.autocast("p=f32,c=e4m3,o=f32,g=e5m2", emulate=True),
            steps,
        ),
        (
            "emulated fp8 HYBRID, delayed scaling, bf16 results",
            lambda: mixprec.autocast("bf16", emulate=True, fp8_recipe=delayed),
            steps,
        ),
        ("emulated mxfp8_e4m3", lambda: mixprec.autocast("mxfp8_e4m3"), steps),
        ("torch.autocast bf16", lambda: torch.autocast("cpu", torch.bfloat16), steps),
        ("torch.autocast fp16", lambda: torch.autocast("cpu", torch.float16), slow_steps),
        ("mixprec.autocast bf16 (emulate=None)", lambda: mixprec.autocast("bf16"), steps),
        ("mixprec.autocast fp16 (emulate=None)", lambda: mixprec.autocast("fp16"), steps),
    ]


def run_table(threads: int, steps: int, slow_steps: int) -> list[str]:
    """Time every mode with ``threads`` torch threads; the markdown table lines."""
    torch.set_num_threads(threads)
    modes = modes_for(steps, slow_steps)
    runners = {name: Runner(ctx) for name, ctx, _ in modes}
    rounds = max(n for _, _, n in modes)
    # interleaved rounds: every mode sees the same machine load (it is shared and noisy)
    for r in range(rounds):
        for name, _, n in modes:
            if r < n:
                runners[name].timed_step()
        print(f"{threads} thread(s): round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    # the minimum over rounds: the least disturbed measurement of each mode
    wall = {n: min(run.times) for n, run in runners.items()}
    cpu = {n: min(run.cpu_times) for n, run in runners.items()}
    auto_choice = {
        fmt: "emulated" if mixprec.autocast(fmt, device_type="cpu").emulated else "native"
        for fmt in ("bf16", "fp16")
    }
    lines = [
        f"### {threads} thread(s)",
        "",
        "| mode | step (ms) | / fp32 | CPU time (ms) | / fp32 | note |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, run in runners.items():
        t, c = wall[name], cpu[name]
        note = f"first loss {run.first_loss:.6f}"
        for fmt in ("bf16", "fp16"):
            nat_w, nat_c = wall[f"torch.autocast {fmt}"], cpu[f"torch.autocast {fmt}"]
            if name == f"emulated {fmt}":
                note += (
                    f"; speed-up over torch.autocast {fmt}: {nat_w / t:.1f}x (CPU time "
                    f"{nat_c / c:.1f}x)"
                )
            if name == f"mixprec.autocast {fmt} (emulate=None)":
                best = min(nat_w, wall[f"emulated {fmt}"])
                best_c = min(nat_c, cpu[f"emulated {fmt}"])
                note += (
                    f"; chose {auto_choice[fmt]}; {t / best:.2f}x the better of native and "
                    f"emulated (CPU time {c / best_c:.2f}x)"
                )
        lines.append(
            f"| {name} | {t * 1e3:.1f} | {t / wall['fp32']:.2f} | {c * 1e3:.1f} | "
            f"{c / cpu['fp32']:.2f} | {note} |"
        )
    lines += [
        "",
        f"Minimum over {steps} interleaved rounds ({slow_steps} for torch.autocast fp16) after "
        "one warm-up step per mode.",
        "",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5, help="timed steps per mode (minimum)")
    ap.add_argument("--slow-steps", type=int, default=1, help="timed steps for torch fp16")
    ap.add_argument(
        "--threads", default=None, help="comma-separated torch thread counts (default: torch's)"
    )
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "autocast.md")
    args = ap.parse_args(argv)
    threads = (
        [int(t) for t in args.threads.split(",")] if args.threads else [torch.get_num_threads()]
    )
    cap = torch.backends.cpu.get_cpu_capability()
    flags = sorted(f for f in cpu_flags() if f.startswith(("avx512", "amx", "avx2", "fma")))
    lines = [
        "# autocast benchmark: one training step, 4-block transformer (d 256, 4 heads, 16x64)",
        "",
        f"torch {torch.__version__}, `torch.backends.cpu.get_cpu_capability()` = `{cap}`, "
        f"bf16 units (avx512_bf16/amx_bf16): {cpu_has_fast_bf16()}",
        "",
        f"CPU flags: {' '.join(flags) or 'n/a'}",
        "",
    ]
    for n in threads:
        lines += run_table(n, args.steps, args.slow_steps)
    lines += [
        "Ratios are from this one run on a shared machine: expect noise. CPU time = process time "
        "of the step over all threads; it is less sensitive to other people's load than wall "
        f"time; OpenMP wait policy {os.environ['OMP_WAIT_POLICY']} (PASSIVE: waiting threads "
        "sleep and do not count).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
