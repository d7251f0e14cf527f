"""Benchmark: one training step of each corpus model under mixprec.sanitize ÷ plain fp32.

Models: ``mixprec.testing.corpus`` (HF GPT-2, BERT, LLaMA, ResNet-18 and ViT from small configs, a
nanoGPT-style GPT; random init, nothing downloaded), their example batch (2 x 16 tokens, or 2 images
of 64x64) repeated ``--repeat`` times along the batch (default 1 and 16: the corpus configs are
tiny, so at the corpus batch the step is dominated by the sanitizer's fixed cost per op, ~0.1 ms of
Python, not by arithmetic). Step = forward, the entry's loss, backward. Time: minimum process CPU
time over ``--steps`` interleaved rounds after a warm-up step, one torch thread (CPU time, not
wall-clock: the machine is shared, and a preempted step's CPU time does not grow). "dispatch only":
the same step under a pass-through ``TorchDispatchMode`` (every op forwarded unchanged), the floor
any dispatch-based checker starts from. "bare shadow": the shadow mechanism alone, in its
simplest form (``BareShadow``: every non-view op with a float32 argument run again on float64
shadows, compared with the sanitizer's C pass, its shadow kept), none of the sanitizer's
features (findings, attribution, in-place and view bookkeeping, gradient hooks) and none of its
savings (copies sharing their source's shadow, its own float64 convolutions): the cost of the
design, not a strict lower bound. "forward only": ``sanitize(track_grads=False)``, the sanitizer
with the backward pass run unchecked (no gradient shadows, no histograms). Memory: one step per
(model, mode) in a fresh subprocess after a warm-up step in the same mode, peak RSS (VmHWM) minus
RSS before the step (MiB; plain steps reuse their allocator's blocks, so their growth is near 0
and no ratio is given).

Run: ``HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/sanitize_corpus.py [--steps N]
[--repeat N ...] [--no-memory]`` (writes benchmarks/results/sanitize_corpus.md). Targets
(issue 13): time <= 3x, never above 5x.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from _common import publish
from mixprec.sanitizer import sanitize
from mixprec.sanitizer.passes import pick
from mixprec.testing import corpus


def _in(x: Any, dtype: torch.dtype) -> Any:
    """A floating input (images) in ``dtype``; token ids and other values unchanged."""
    return x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x


class Runner:
    """One corpus model with its example batch repeated ``repeat`` times."""

    def __init__(self, name: str, repeat: int, dtype: torch.dtype = torch.float32) -> None:
        self.entry = corpus.get(name)
        self.model, args, kwargs = self.entry.example(0, repeat)
        self.model.to(dtype)
        self.args = tuple(_in(a, dtype) for a in args)
        self.kwargs = {k: _in(v, dtype) for k, v in kwargs.items()}

    def step(self) -> None:
        self.entry.loss(self.model, self.args, self.kwargs).backward()
        self.model.zero_grad(set_to_none=True)


class PassThrough(TorchDispatchMode):
    """Forwards every op unchanged: the cost of dispatch through a Python mode alone."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class BareShadow(TorchDispatchMode):
    """The float64 shadow mechanism in its simplest form, and nothing else: skip view ops and
    ops without a float32 argument; look up each float32 input's shadow by its storage (a view
    of it, as the input views the storage; an upcast copy where none); run the op in float64;
    compare the result with its shadow (the sanitizer's C pass); keep the shadow of a result
    that covers its storage. Not a checker (no findings, no in-place or view bookkeeping, no
    gradient hooks): what the design costs before its features."""

    def __init__(self) -> None:
        super().__init__()
        self.shadows: dict[int, torch.Tensor] = {}
        self.views: dict[Any, bool] = {}

    def _shadow(self, a: torch.Tensor) -> torch.Tensor:
        st = a.untyped_storage()
        s = self.shadows.get(st._cdata)
        if s is None or 2 * st.nbytes() != s.untyped_storage().nbytes():
            return a.to(torch.float64)
        # stored shadows are laid out like their storage: a view's shadow is the same view
        return s.as_strided(a.shape, a.stride(), a.storage_offset())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        view = self.views.get(func)
        if view is None:
            view = self.views[func] = func.is_view or func is torch.ops.aten.detach.default
        if view:
            return func(*args, **kwargs)
        floats = [isinstance(a, torch.Tensor) and a.dtype == torch.float32 for a in args]
        if not any(floats):  # integer ops, factories: nothing to shadow
            return func(*args, **kwargs)
        sargs = [self._shadow(a) if f else a for a, f in zip(args, floats, strict=True)]
        out = func(*args, **kwargs)
        try:
            sout = func(*sargs, **kwargs)
        except Exception:  # no float64 kernel, or a list argument: unshadowed
            return out
        if (
            type(out) is torch.Tensor
            and out.dtype == torch.float32
            and type(sout) is torch.Tensor
            and sout.dtype == torch.float64
            and sout.shape == out.shape
            and out.numel()
        ):
            pick(out, sout).max_pass()
            st = out.untyped_storage()
            if out.is_contiguous() and 4 * out.numel() == st.nbytes():  # covers its storage
                self.shadows[st._cdata] = sout.contiguous()
        return out


def _mode(sanitized: bool) -> contextlib.AbstractContextManager[Any]:
    return sanitize() if sanitized else contextlib.nullcontext()


_MODES: dict[str, Any] = {
    "plain": contextlib.nullcontext,
    "float64": contextlib.nullcontext,  # the same step with a float64 model
    "dispatch": PassThrough,
    "bare": BareShadow,
    "sanitize": sanitize,
    "forward": lambda: sanitize(track_grads=False),
}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_probe(name: str, repeat: int, sanitized: bool) -> None:
    """Child process: one step; prints {before, peak} in KiB."""
    r = Runner(name, repeat)
    with _mode(sanitized):  # warm-up in the same mode: lazy imports and inits are not per step
        r.step()
    before = _status_kib("VmRSS")
    with _mode(sanitized):
        r.step()
    print(json.dumps({"before": before, "peak": _status_kib("VmHWM")}))


def _memory(name: str, repeat: int, sanitized: bool) -> float:
    cmd = [sys.executable, __file__, "--probe", name, str(repeat), str(int(sanitized))]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    d = json.loads(res.stdout.strip().splitlines()[-1])
    return (d["peak"] - d["before"]) / 1024


def times(
    name: str, repeat: int, steps: int, modes: dict[str, Any] = _MODES
) -> tuple[dict[str, float], dict[str, Any]]:
    """(CPU seconds per mode, the sanitized run's stats and finding count): one runner per mode
    (mode "float64": the model in float64), the modes interleaved in each round, the minimum
    of ``steps`` rounds after a warm-up one."""
    runs = {
        mode: Runner(name, repeat, torch.float64 if mode == "float64" else torch.float32)
        for mode in modes
    }
    best = dict.fromkeys(modes, float("inf"))
    info: dict[str, Any] = {}
    for i in range(steps + 1):  # round 0 warms up
        for mode, r in runs.items():
            with modes[mode]() as report:
                t0 = time.process_time()
                r.step()
                dt = time.process_time() - t0
            if i:
                best[mode] = min(best[mode], dt)
            if mode == "sanitize":
                info = {"findings": len(report.findings), **report.stats}
    return best, info


def _row(name: str, repeat: int, steps: int, memory: bool) -> list[str]:
    t, info = times(name, repeat, steps)
    plain, san = t["plain"], t["sanitize"]
    row = [
        name,
        corpus.get(name).batch(repeat),
        f"{1e3 * plain:.1f}",
        f"{1e3 * san:.1f}",
        f"{san / plain:.1f}",
        f"{t['dispatch'] / plain:.1f}",
        f"{t['bare'] / plain:.1f}",
        f"{t['float64'] / plain:.1f}",
        f"{t['forward'] / plain:.1f}",
    ]
    if memory:
        mp, ms = _memory(name, repeat, False), _memory(name, repeat, True)
        row.append(f"{mp:.1f} / {ms:.1f}")
    row.append(
        f"{info['ops']} / {info['ops_shadowed']} / {info['ops_slow_path']} / {info['findings']}"
    )
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5, help="timed rounds (minimum is reported)")
    ap.add_argument("--repeat", type=int, nargs="+", default=[1, 16], help="batch repeats")
    ap.add_argument("--no-memory", action="store_true", help="skip the subprocess memory runs")
    ap.add_argument("--probe", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.probe:
        memory_probe(args.probe[0], int(args.probe[1]), bool(int(args.probe[2])))
        return 0
    rows = [
        _row(name, k, args.steps, not args.no_memory)
        for k in args.repeat
        for name in corpus.available()
    ]
    header = ["model", "batch", "plain (ms)", "sanitize (ms)", "÷ plain", "dispatch only ÷ plain"]
    header.append("bare shadow ÷ plain")
    header.append("float64 step ÷ plain")
    header.append("forward only ÷ plain")
    if not args.no_memory:
        header.append("step RSS growth MiB, plain / sanitize")
    header.append("ops / shadowed / slow path / findings")
    title = "sanitize on the corpus models: one training step, sanitize() ÷ plain fp32"
    note = (
        f"CPU time, minimum of {args.steps} interleaved rounds after a warm-up, 1 torch thread; "
        "dispatch only: a pass-through TorchDispatchMode (the floor of any dispatch-based "
        "checker); bare shadow: a mode that only runs every non-view op with a float32 argument "
        "again on float64 shadows, compares and keeps them (BareShadow: the shadow mechanism "
        "alone, without the sanitizer's features or savings); float64 step: the same step "
        "with the model in float64, the arithmetic a float64 shadow of every op repeats (so 1 "
        "+ that ratio, times the dispatch cost, is the floor of shadow execution); forward only: "
        "sanitize(track_grads=False), the backward run unchecked; memory "
        "from one step per (model, mode) in a fresh process after a warm-up step. Target "
        "(issue 13): <= 3x, never above 5x. The machine is shared: expect noise."
    )
    publish("sanitize_corpus", title, header, rows, note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
