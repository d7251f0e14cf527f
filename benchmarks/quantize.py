"""Quantize throughput on 16M float32 elements as ratios to a copy, measured in one run.

    python benchmarks/quantize.py [--n 16777216] [--repeat 5] [--threads N] [--no-slow]
                                  [--isa avx2,portable]

The first table is ``mixprec bench --slow``'s (the timing code lives in
mixprec.cli.bench_command); the second times the pure-torch path (``MIXPREC_BACKEND=torch``)
against its torch.compile'd variant (``MIXPREC_BACKEND=torch-compiled``). Both are written to
benchmarks/results/quantize.md.

``--isa`` adds, in the same run, the C kernel's table at lower instruction-set levels
(:func:`mixprec.quantization.kernel_isa`): the AVX2 (x86-64-v3) loops timed on an AVX-512
machine, written to benchmarks/results/quantize_isa.md. The clone and copy_ anchors are torch's
own (memory-bound); ``ATEN_CPU_CAPABILITY=avx2`` lowers torch's kernels as well.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from _common import write_result
from mixprec import quantize
from mixprec.cli.bench_command import DEFAULT_FORMATS, best_of, markdown_table, quantize_table
from mixprec.quantization import kernel_isa, quantize_backend


def _with_backend(backend: str, fn: Callable[[], object]) -> Callable[[], object]:
    """fn run with the quantize backend ``backend`` (restored afterwards)."""

    def run() -> object:
        previous = quantize_backend()
        quantize_backend(backend)
        try:
            return fn()
        finally:
            quantize_backend(previous)

    return run


def compiled_table(n: int, repeat: int, formats: list[str]) -> str:
    """The torch path eager and compiled, as ratios to clone, nearest and stochastic."""
    x = torch.randn(n, generator=torch.Generator().manual_seed(0)) * 4
    t_clone = best_of(lambda: x.clone(), repeat)
    t0 = time.perf_counter()
    for rounding in ("nearest", "stochastic"):  # the two graphs float32 needs
        _with_backend("torch-compiled", lambda: quantize(x[:4096], "e4m3", rounding=rounding))()
    t_compile = time.perf_counter() - t0
    rows = []
    for name in formats:
        row = [name]
        for rounding in ("nearest", "stochastic"):
            for backend, reps in (("torch", min(repeat, 2)), ("torch-compiled", repeat)):
                q = _with_backend(backend, lambda: quantize(x, name, rounding=rounding))
                row.append(f"{best_of(q, reps) / t_clone:.2f}×")
        rows.append(row)
    header = ["format", "nearest eager / clone", "nearest compiled / clone",
              "stochastic eager / clone", "stochastic compiled / clone"]  # fmt: skip
    return (
        "### torch path (CUDA, or no C compiler), here on CPU: eager vs torch.compile'd\n\n"
        f"Same tensor; MIXPREC_BACKEND=torch vs torch-compiled. Compiling the two float32 graphs "
        f"(deterministic modes, stochastic) took {t_compile:.1f} s (torch's compile cache may "
        "shorten it), once for every format.\n\n" + markdown_table(header, rows) + "\n"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1 << 24)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads first")
    ap.add_argument("--no-slow", action="store_true", help="skip ml_dtypes and the torch path")
    ap.add_argument("--isa", default="", help="also these C kernel levels, e.g. avx2,portable")
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    formats = DEFAULT_FORMATS.split(",")
    text = quantize_table(args.n, args.repeat, formats, not args.no_slow)
    if not args.no_slow:
        text += "\n" + compiled_table(args.n, args.repeat, formats)
    print(text)
    write_result("quantize", text)
    levels = [s.strip() for s in args.isa.split(",") if s.strip()]
    if levels:
        isa_text = isa_tables(args.n, args.repeat, formats, levels)
        print(isa_text)
        write_result("quantize_isa", isa_text)


def isa_tables(n: int, repeat: int, formats: list[str], levels: list[str]) -> str:
    """quantize_table's C kernel columns at each level in ``levels`` (restored afterwards)."""
    best = kernel_isa()
    parts = [
        f"The same run as quantize.md: the C kernel's loops lowered from {best} with "
        "`mixprec.quantization.kernel_isa(level)` (same bits at every level); torch's clone "
        "and copy_ anchors unchanged.\n"
    ]
    try:
        for level in levels:
            kernel_isa(level)
            parts.append(quantize_table(n, repeat, formats, slow=False))
    finally:
        kernel_isa(best)
    return "\n".join(parts)


if __name__ == "__main__":
    main()
