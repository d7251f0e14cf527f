"""Benchmark: one training step of the reference transformer under mixprec.sanitize ÷ plain fp32.

Model: the reference transformer of benchmarks/autocast.py (4 pre-norm blocks, d_model 256,
4 heads, MLP 1024), batch 16 x 64 tokens; step = forward, MSE loss, backward, SGD update.
Modes: plain float32; ``sanitize()`` (every forward and backward op shadowed in float64, gradient
histograms on); ``sanitize(track_grads=False)`` (forward only). Time: minimum wall-clock and CPU
(process) time over ``--steps`` interleaved rounds after one warm-up step, ratios from this one
run; one torch thread by default (on a shared 2-core machine, idle OpenMP threads spinning make
multi-thread timings mostly noise). Memory: each mode runs one step in a fresh subprocess; the
table shows the peak resident-set growth during that step over the process's size before it
(model, data and optimizer already built), once with glibc's default malloc settings and once
with ``MALLOC_MMAP_THRESHOLD_=131072`` (large freed blocks go back to the OS at once, so the
number is close to the tensors actually alive; the default keeps freed blocks in the heap).

Run: ``.venv/bin/python benchmarks/sanitize.py [--steps N] [--threads N] [--no-memory]``
(writes benchmarks/results/sanitize.md). Targets (issue 6): time <= 5x, memory <= 3x.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from _common import publish
from autocast import make_model  # the reference transformer
from mixprec.sanitizer import sanitize

MODES: dict[str, Callable[[], contextlib.AbstractContextManager[object]]] = {
    "plain fp32": contextlib.nullcontext,
    "sanitize()": sanitize,
    "sanitize(track_grads=False)": lambda: sanitize(track_grads=False),
}


class Runner:
    def __init__(self) -> None:
        self.model = make_model()
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(16, 64, 256, generator=g)
        self.target = torch.randn(16, 64, 256, generator=g)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3)

    def step(self) -> None:
        y = self.model(self.x)
        F.mse_loss(y, self.target).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def _status_kib(field: str) -> int:
    """VmRSS / VmHWM from /proc/self/status (VmHWM, unlike ru_maxrss, is not inherited from
    the parent process across fork + exec)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_probe(mode: str) -> None:
    """Child process: one step of ``mode``; prints {before, peak} in KiB."""
    r = Runner()
    before = _status_kib("VmRSS")
    with MODES[mode]() as report:
        r.step()
    peak = _status_kib("VmHWM")
    out = {"before": before, "peak": peak}
    if report is not None:
        out["findings"] = len(report.findings)
        out["stats"] = report.stats
    print(json.dumps(out))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3, help="timed rounds (minimum is reported)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument("--no-memory", action="store_true", help="skip the subprocess memory runs")
    ap.add_argument("--memory-probe", choices=list(MODES), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_probe:
        memory_probe(args.memory_probe)
        return 0

    runners = {name: Runner() for name in MODES}
    times: dict[str, list[float]] = {name: [] for name in MODES}
    cpu: dict[str, list[float]] = {name: [] for name in MODES}
    info: dict[str, dict] = {}
    for name, r in runners.items():  # warm-up
        with MODES[name]():
            r.step()
    for _ in range(args.steps):
        for name, r in runners.items():
            with MODES[name]() as report:
                c0, t0 = time.process_time(), time.perf_counter()
                r.step()
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
            if report is not None:
                info[name] = {"findings": len(report.findings), **report.stats}

    mem: dict[str, dict[str, float]] = {}
    if not args.no_memory:
        for env_name, extra in (("default", {}), ("mmap", {"MALLOC_MMAP_THRESHOLD_": "131072"})):
            for name in MODES:
                cmd = [sys.executable, __file__, "--memory-probe", name]
                cmd += ["--threads", str(args.threads)]
                env = {**os.environ, **extra}
                res = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
                d = json.loads(res.stdout.strip().splitlines()[-1])
                mem.setdefault(name, {})[env_name] = (d["peak"] - d["before"]) / 1024

    base_t, base_c = min(times["plain fp32"]), min(cpu["plain fp32"])
    rows = []
    for name in MODES:
        t, c = min(times[name]), min(cpu[name])
        row = [name, f"{1e3 * t:.0f}", f"{t / base_t:.2f}", f"{1e3 * c:.0f}", f"{c / base_c:.2f}"]
        if mem:
            for env_name in ("default", "mmap"):
                grow, base = mem[name][env_name], mem["plain fp32"][env_name]
                row.append(f"{grow:.0f} ({grow / base:.2f}x)")
        st = info.get(name)
        row.append("-" if st is None else f"{st['ops']} / {st['ops_shadowed']} / {st['findings']}")
        rows.append(row)
    header = ["mode", "wall (ms)", "÷ plain", "CPU (ms)", "÷ plain"]
    if mem:
        header += ["step RSS growth, MiB (÷ plain)", "same, MALLOC_MMAP_THRESHOLD_=131072"]
    header.append("ops / shadowed / findings")
    publish(
        "sanitize",
        "sanitize benchmark: one training step, reference transformer "
        "(4 blocks, d 256, 4 heads, 16x64 tokens)",
        header,
        rows,
        f"Minimum of {args.steps} interleaved rounds after a warm-up step, "
        f"{torch.get_num_threads()} torch thread(s); memory from one step per mode in a fresh "
        "process (peak RSS minus RSS before the step). Targets: time <= 5x, memory <= 3x. "
        "The machine is shared: expect noise.",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
