"""Quantize throughput on 16M float32 elements, as ratios to a copy, measured in one run.

    python benchmarks/quantize.py [--n 16777216] [--repeat 5]

Columns (best of N after warm-up, ratio to the reference in brackets):
  oop nearest / clone      mixprec.quantize (fresh output) ÷ torch.clone
  in-place nearest / copy_ mixprec.quantize_ ÷ out.copy_(x) into a preallocated tensor
  stochastic / clone       quantize(rounding="stochastic") ÷ clone
  torch cast pair / clone  x.to(dtype).to(float32) where torch has the dtype
  ml_dtypes / clone        numpy astype(ml_dtype).astype(float32)
  torch path / clone       mixprec's device-agnostic fallback (MIXPREC_BACKEND=torch)
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch

from _common import best_of, machine, markdown_table, write_result
from mixprec import get_format, quantize, quantize_

FORMATS = ["bfloat16", "float16", "float8_e4m3fn", "float8_e5m2", "float6_e3m2fn",
           "float4_e2m1fn", "float8_e8m0fnu"]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1 << 24)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-slow", action="store_true", help="skip ml_dtypes and the torch path")
    args = ap.parse_args()
    x = torch.randn(args.n, generator=torch.Generator().manual_seed(0)) * 4
    xn = x.numpy()
    buf = torch.empty_like(x)
    r = args.repeat
    t_clone = best_of(lambda: x.clone(), r)
    t_copy = best_of(lambda: buf.copy_(x), r)
    rows = []
    for name in FORMATS:
        f = get_format(name)
        sat = name == "float8_e4m3fn"
        t_oop = best_of(lambda: quantize(x, f, saturate=sat), r)
        t_inp = best_of(lambda: quantize_(buf.copy_(x), f, saturate=sat), r) - t_copy
        t_sr = best_of(lambda: quantize(x, f, rounding="stochastic"), r)
        dt = f.torch_dtype
        t_native = best_of(lambda: x.to(dt).to(torch.float32), r) if dt is not None else None
        t_ml = t_torch = None
        if not args.no_slow:
            mt = f.ml_dtype
            if mt is not None:
                with np.errstate(all="ignore"):
                    t_ml = best_of(lambda: xn.astype(mt).astype(np.float32), 2)
            os.environ["MIXPREC_BACKEND"] = "torch"
            t_torch = best_of(lambda: quantize(x, f, saturate=sat), 2)
            os.environ.pop("MIXPREC_BACKEND")

        def ratio(t: float | None, ref: float) -> str:
            return "—" if t is None else f"{t / ref:.2f}×"

        rows.append([
            name, ratio(t_oop, t_clone), ratio(max(t_inp, 0.0), t_copy), ratio(t_sr, t_clone),
            ratio(t_native, t_clone), ratio(t_ml, t_clone), ratio(t_torch, t_clone),
        ])  # fmt: skip
    header = ["format", "oop nearest / clone", "in-place nearest / copy_", "stochastic / clone",
              "torch cast pair / clone", "ml_dtypes / clone", "torch path / clone"]  # fmt: skip
    text = (
        f"### quantize: {args.n:,} float32 elements, best of {r}\n\n"
        f"Machine: {machine()}\n\n"
        f"Anchors: clone {t_clone * 1e3:.2f} ms, copy_ into a preallocated tensor "
        f"{t_copy * 1e3:.2f} ms.\n\n" + markdown_table(header, rows) + "\n"
    )
    print(text)
    write_result("quantize", text)


if __name__ == "__main__":
    main()
