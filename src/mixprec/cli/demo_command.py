"""Reproduce the mixed-precision paper's ablation on shipped data (report.md, report.json, plots).

Trains an MLP on the UCI 8x8 handwritten digits (shipped with mixprec) and a character-level
transformer on the standard library's docstrings under each precision recipe: fp32; fp16 with
fp32 master weights and dynamic loss scaling (O2); fp16 without master weights (O3); fp16
without loss scaling; bf16; fp8 e4m3/e5m2 HYBRID with per-tensor scaling, each through
mixprec's public API (initialize/scale_loss, autocast). Every format is emulated bit-exactly on
the CPU. Writes report.md, report.json, curves.png and grad_hist.png into --out. Seeded and
deterministic. Progress: a bar per run on a terminal, a plain line per run every 5 s (and at
its end) when stdout is a pipe or a file.

examples:
  mixprec demo --quick                      # about 75 s on 2 cores
  mixprec demo                              # the full run (about 10 minutes on 2 cores)
  mixprec demo --task text --formats fp16,e3m4 --out report-text
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from mixprec.cli.arguments import checked_by, int_at_least, output_dir


def _checked_by(resolver: str) -> Callable[[str], str]:
    """``mixprec.demo.<resolver>`` judges the value (imported when used: ``mixprec --help``
    stays light)."""

    def check(text: str) -> object:
        import mixprec.demo

        return getattr(mixprec.demo, resolver)(text)

    return checked_by(check, resolver)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "--out",
        type=output_dir,
        default="mixprec-report",
        metavar="DIR",
        help="directory for report.md, report.json, curves.png, grad_hist.png "
        "(default: ./mixprec-report/)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="short training (< 2 minutes on 2 CPU cores)"
    )
    parser.add_argument(
        "--formats",
        type=_checked_by("resolve_recipes"),
        default="fp16,bf16,fp8",
        metavar="LIST",
        help="comma-separated: fp16 (the three fp16 ablations), bf16, fp8 (e4m3/e5m2 hybrid), "
        "recipe ids (fp16-O2, fp16-O3, fp16-noscale, bf16-O2, fp8-hybrid) or any format name "
        "(e3m4, float6_e3m2fn, e6m9: an O2 recipe in it); fp32 always runs "
        "(default: fp16,bf16,fp8)",
    )
    parser.add_argument(
        "--task",
        type=_checked_by("resolve_tasks"),
        default="all",
        metavar="TASK",
        help="digits, text or all (default: all); a comma-separated list works too",
    )
    parser.add_argument(
        "--seed",
        type=int_at_least(0, 2**32 - 1),
        default=0,
        help="random seed, 0 to 2^32-1 (default: 0)",
    )
    parser.add_argument(
        "--threads",
        type=int_at_least(0),
        default=1,
        help="torch CPU threads while training, >= 0 (default: 1; 0 keeps torch's setting)",
    )
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bars or lines (the tables are still printed)",
    )
    parser.add_argument("--preset", choices=("tiny", "quick", "default"), help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    from mixprec.demo import DemoConfig, run_demo

    preset = args.preset or ("quick" if args.quick else "default")
    config = DemoConfig.preset_config(preset, tasks=args.task, formats=args.formats, seed=args.seed)
    run_demo(config, args.out, progress=not args.no_progress, threads=args.threads or None)
    return 0
