"""Quantize throughput on 16M float32 elements as ratios to a copy, measured in one run.

    python benchmarks/quantize.py [--n 16777216] [--repeat 5]

Same table as ``mixprec bench --slow`` (the timing code lives in mixprec.cli.bench_command);
this script also writes it to benchmarks/results/quantize.md.
"""

from __future__ import annotations

import argparse

from _common import write_result
from mixprec.cli.bench_command import DEFAULT_FORMATS, quantize_table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1 << 24)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-slow", action="store_true", help="skip ml_dtypes and the torch path")
    args = ap.parse_args()
    text = quantize_table(args.n, args.repeat, DEFAULT_FORMATS.split(","), not args.no_slow)
    print(text)
    write_result("quantize", text)


if __name__ == "__main__":
    main()
