"""Quantize throughput on 16M float32 elements as ratios to a copy, measured in one run.

    python benchmarks/quantize.py [--n 16777216] [--repeat 5] [--threads N] [--no-slow]
                                  [--isa avx2,portable] [--mx-only]

The first table is ``mixprec bench --slow``'s (the timing code lives in
mixprec.cli.bench_command); the second times the pure-torch path (``MIXPREC_BACKEND=torch``)
against its torch.compile'd variant (``MIXPREC_BACKEND=torch-compiled``). Both are written to
benchmarks/results/quantize.md.

The third table times MX rounding (``mixprec.quantization.mx_round_to``, mxfp8_e4m3, the fused C
kernel) at one thread against a clone, on the same number of elements and on 128k (in cache),
with 32-element blocks along rows, down columns, and in rows of 16 (attention heads of 16), next
to the torch view path (``MIXPREC_BACKEND=torch``): benchmarks/results/quantize_mx.md.

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
from mixprec.formats import get_format
from mixprec.machine import summary
from mixprec.quantization import kernel_isa, mx_round_to, quantize_backend


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
    ap.add_argument("--mx-only", action="store_true", help="only the MX table (quantize_mx.md)")
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.mx_only:
        mx_text = mx_table(args.n, args.repeat)
        print(mx_text)
        write_result("quantize_mx", mx_text)
        return
    formats = DEFAULT_FORMATS.split(",")
    text = quantize_table(args.n, args.repeat, formats, not args.no_slow)
    if not args.no_slow:
        text += "\n" + compiled_table(args.n, args.repeat, formats)
    print(text)
    write_result("quantize", text)
    if not args.no_slow:
        mx_text = mx_table(args.n, args.repeat)
        print(mx_text)
        write_result("quantize_mx", mx_text)
    levels = [s.strip() for s in args.isa.split(",") if s.strip()]
    if levels:
        isa_text = isa_tables(args.n, args.repeat, formats, levels)
        print(isa_text)
        write_result("quantize_isa", isa_text)


def _mx_cases(n: int) -> list[tuple[str, tuple[int, int], int]]:
    """(label, 2-d shape, blocked axis) for ``n`` elements (a multiple of 4096)."""
    return [
        ("rows of 4096, blocks along them", (n // 4096, 4096), 1),
        ("4096 rows, blocks down the columns", (4096, n // 4096), 0),
        ("rows of 16 (heads of 16)", (n // 16, 16), 1),
    ]


def mx_table(n: int, repeat: int) -> str:
    """MX rounding (mxfp8_e4m3, "floor" scales) ÷ clone at one thread, for ``n`` elements and
    for 128k, blocks along rows, down columns and in rows of 16; the C kernel and the torch
    view path."""
    e4m3 = get_format("float8_e4m3fn")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # several threads: large MX operands take torch's ops
    rows = []
    try:
        for size in dict.fromkeys((n, 1 << 17)):
            reps = repeat if size == n else 20 * repeat
            for label, shape, axis in _mx_cases(size):
                x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
                t_clone = best_of(lambda x=x: x.clone(), reps)
                row = [f"{size:,}", label, f"{1e6 * t_clone:.0f}"]
                for backend in ("auto", "torch"):
                    r = _with_backend(backend, lambda x=x: mx_round_to(x, e4m3, 32, axis))
                    row.append(f"{best_of(r, reps) / t_clone:.2f}×")
                rows.append(row)
    finally:
        torch.set_num_threads(threads)
    header = ["elements", "layout", "clone (µs)", "C kernel / clone", "torch view path / clone"]
    return (
        "### MX rounding (mxfp8_e4m3) at one thread\n\n"
        f"Machine: {summary()} (timed at 1 thread); C kernel loops: {kernel_isa()}. "
        "`mx_round_to(x, e4m3, 32, axis)`: the fused C kernel (blocks along rows: one pass per "
        "block; down columns: a row of blocks at a time; rows of 16: their own loop), and the "
        "torch view path (`MIXPREC_BACKEND=torch`: the path of other devices, its element "
        "rounding ~100 small integer ops, each a pass on the CPU); best of "
        f"{repeat} ({20 * repeat} for 128k), ratios to a clone of the same tensor.\n\n"
        + markdown_table(header, rows)
        + "\n"
    )


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
