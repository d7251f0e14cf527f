"""Time quantize against a copy and against torch / ml_dtypes casts on this machine.

Prints ratios measured in one run (best of N after a warm-up): mixprec.quantize out of place ÷
torch.clone, in-place quantize_ ÷ copy_ into a preallocated tensor, stochastic rounding ÷ clone,
torch's own cast pair x.to(dtype).float() ÷ clone and ml_dtypes' astype pair ÷ clone.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from mixprec.cli.arguments import format_list, int_at_least
from mixprec.machine import summary

if TYPE_CHECKING:
    import torch

    from mixprec.formats import FloatFormat

DEFAULT_FORMATS = (
    "bfloat16,float16,float8_e4m3fn,float8_e5m2,float6_e3m2fn,float4_e2m1fn,float8_e8m0fnu"
)


def best_of(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> float:
    """Best wall time in seconds over ``repeat`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def quantize_table(n: int, repeat: int, formats: Sequence[str], slow: bool) -> str:
    """Markdown report of quantize throughput on ``n`` float32 elements."""
    import torch

    from mixprec.formats import get_format

    x = torch.randn(n, generator=torch.Generator().manual_seed(0)) * 4
    buf = torch.empty_like(x)
    t_clone = best_of(lambda: x.clone(), repeat)
    t_copy = best_of(lambda: buf.copy_(x), repeat)

    rows = [
        _format_row(get_format(name), x, buf, t_clone, t_copy, repeat, slow) for name in formats
    ]
    header = ["format", "oop nearest / clone", "in-place nearest / copy_", "stochastic / clone",
              "torch cast pair / clone", "ml_dtypes / clone", "torch path / clone"]  # fmt: skip
    from mixprec.quantization import kernel_isa

    return (
        f"### quantize: {n:,} float32 elements, best of {repeat}\n\n"
        f"Machine: {summary()}; C kernel loops: {kernel_isa() or 'not built'}\n\n"
        f"Anchors: clone {t_clone * 1e3:.2f} ms, copy_ into a preallocated tensor "
        f"{t_copy * 1e3:.2f} ms.\n\n" + markdown_table(header, rows) + "\n"
    )


def _ratio(t: float | None, ref: float) -> str:
    return "—" if t is None else f"{t / ref:.2f}×"


def _format_row(
    f: FloatFormat, x: torch.Tensor, buf: torch.Tensor, t_clone: float, t_copy: float,
    repeat: int, slow: bool,
) -> list[str]:  # fmt: skip
    import numpy as np
    import torch

    from mixprec.quantization import quantize, quantize_, quantize_backend

    sat = f.name == "float8_e4m3fn"  # torch's e4m3fn cast saturates
    t_oop = best_of(lambda: quantize(x, f, saturate=sat), repeat)
    buf.copy_(x)
    # rounding already-rounded data takes the same path per element as fresh data
    t_inp = best_of(lambda: quantize_(buf, f, saturate=sat), repeat)
    t_sr = best_of(lambda: quantize(x, f, rounding="stochastic"), repeat)
    dt = f.torch_dtype
    t_native = best_of(lambda: x.to(dt).to(torch.float32), repeat) if dt else None
    t_ml = t_torch = None
    if slow:
        mt, xn = f.ml_dtype, x.numpy()
        if mt is not None:
            with np.errstate(all="ignore"):
                t_ml = best_of(lambda: xn.astype(mt).astype(np.float32), 2)
        previous = quantize_backend()
        quantize_backend("torch")
        try:
            t_torch = best_of(lambda: quantize(x, f, saturate=sat), 2)
        finally:
            quantize_backend(previous)
    return [
        f.name, _ratio(t_oop, t_clone), _ratio(t_inp, t_copy), _ratio(t_sr, t_clone),
        _ratio(t_native, t_clone), _ratio(t_ml, t_clone), _ratio(t_torch, t_clone),
    ]  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--n", type=int_at_least(1), default=1 << 24, help="elements, >= 1 (default 16M)"
    )
    parser.add_argument(
        "--repeat", type=int_at_least(1), default=5, help="timed runs per cell, >= 1 (best kept)"
    )
    parser.add_argument(
        "--formats", type=format_list, default=DEFAULT_FORMATS, help="comma-separated formats"
    )
    parser.add_argument(
        "--slow", action="store_true", help="also time ml_dtypes and mixprec's torch fallback"
    )


def run(args: argparse.Namespace) -> int:
    if args.n <= 0 or args.repeat <= 0:
        raise ValueError(f"--n and --repeat must be positive, got {args.n} and {args.repeat}")
    formats = [s.strip() for s in args.formats.split(",") if s.strip()]
    print(quantize_table(args.n, args.repeat, formats, args.slow))
    return 0
