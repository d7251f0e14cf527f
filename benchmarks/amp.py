"""Benchmark: one training step at opt levels O0-O3 (mixprec.amp), and the loss scaler's cost.

Model: the reference transformer of ``benchmarks/autocast.py`` (4 pre-norm blocks, d_model 256,
4 heads, MLP 1024, batch 16 x 64 tokens); step = forward, MSE loss, ``scale_loss`` backward,
``optimizer.step()`` (SGD with momentum). Modes: O0 (float32, dynamic loss scaling), O1/O2/O3
with emulated bf16 and fp16, and native bf16 where the CPU has bf16 units. Reports the median
step time over ``--steps`` steps after a warm-up step, as a ratio to O0.

Scaler overhead, two ways: (a) O0 with ``loss_scale="dynamic"`` minus O0 with
``loss_scale="none"`` (whole steps: noisy); (b) the scaler's own work timed alone on the model's
real gradients - ``scale(loss)``, the fused check+unscale pass, the flag read-back and
``update()`` - as a fraction of the O0 step. Target: <= 5 % of a step.

Run: ``.venv/bin/python benchmarks/amp.py [--steps N]``; writes benchmarks/results/amp.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

import mixprec
from _common import machine, markdown_table, write_result
from autocast import make_model  # the reference transformer
from mixprec.amp import DynamicLossScaler
from mixprec.precision import cpu_has_fast_bf16


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 64, 256, generator=g), torch.randn(16, 64, 256, generator=g)


def time_level(level: str, compute: str, emulate: bool | None, loss_scale: Any, steps: int):
    """Median step time (s), first loss, and the (model, optimizer) for reuse."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model, opt = mixprec.initialize(
        model, opt, opt_level=level, compute=compute, emulate=emulate, loss_scale=loss_scale
    )
    x, target = _inputs()

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(model(x).float(), target)
        with mixprec.scale_loss(loss, opt) as scaled:
            scaled.backward()
        opt.step()
        return float(loss.detach())

    first = step()  # warm-up (oneDNN primitives, caches)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), first, model, opt


def scaler_alone(model: torch.nn.Module, repeat: int) -> float:
    """Median time of one iteration of the scaler's own work on real gradient tensors."""
    # the scaler only needs param_groups and step(): time the scaler, not an optimizer
    opt = SimpleNamespace(param_groups=[{"params": list(model.parameters())}], step=lambda: None)
    x, target = _inputs()
    loss = F.mse_loss(model(x).float(), target)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    scaler = DynamicLossScaler()

    def one() -> float:
        for p, g in zip(model.parameters(), grads, strict=True):
            p.grad.copy_(g)  # fresh scaled-looking gradients (not timed)
        t0 = time.perf_counter()
        scaler.scale(loss.detach())
        scaler.unscale_(opt)
        scaler.step(opt)  # reads the overflow flag back (one sync)
        scaler.update()
        return time.perf_counter() - t0

    one()
    return statistics.median(one() for _ in range(repeat))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5, help="timed steps per mode (median)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    modes: list[tuple[str, str, str, bool | None, Any]] = [
        ("O0 fp32, dynamic loss scale", "O0", "float32", None, "dynamic"),
        ("O0 fp32, no loss scale", "O0", "float32", None, "none"),
    ]
    for fmt in ("bf16", "fp16"):
        for level in ("O1", "O2", "O3"):
            modes.append((f"{level} emulated {fmt}", level, fmt, True, "dynamic"))
    if cpu_has_fast_bf16():
        for level in ("O1", "O2", "O3"):
            modes.append((f"{level} native bf16", level, "bf16", False, "dynamic"))

    results: dict[str, tuple[float, float]] = {}
    o0_model = None
    for name, level, fmt, emulate, ls in modes:
        t, loss, model, _ = time_level(level, fmt, emulate, ls, args.steps)
        results[name] = (t, loss)
        if o0_model is None:
            o0_model = model
        print(f"{name:40s} {t * 1e3:9.1f} ms", file=sys.stderr, flush=True)

    assert o0_model is not None
    mixprec.amp.deinitialize(o0_model)
    alone = scaler_alone(o0_model, 20)
    base = results["O0 fp32, dynamic loss scale"][0]
    diff = base - results["O0 fp32, no loss scale"][0]
    rows = [
        [name, f"{t * 1e3:.1f}", f"{t / base:.2f}", f"{loss:.6f}"]
        for name, (t, loss) in results.items()
    ]
    text = "\n".join(
        [
            "# amp benchmark: one training step per opt level, 4-block transformer "
            "(d 256, 4 heads, 16x64)",
            "",
            machine(),
            "",
            markdown_table(["mode", "step (ms)", "/ O0", "first loss"], rows),
            "",
            "Loss scaler overhead (DynamicLossScaler: scale, fused check+unscale, flag sync, "
            "update):",
            "",
            f"- alone, on the model's real gradients: {alone * 1e3:.2f} ms = "
            f"{alone / base * 100:.1f} % of the O0 step (target <= 5 %)",
            f"- O0 dynamic minus O0 without scaling (whole steps, noisy): {diff * 1e3:.1f} ms = "
            f"{diff / base * 100:.1f} %",
            "",
            f"Median of {args.steps} steps after one warm-up step; ratios from this one run "
            "(the machine is shared: expect noise).",
            "",
        ]
    )
    print(text)
    write_result("amp", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
