"""ULP audit and speed of ``mixprec.stable``.

Accuracy: for every function and dtype (float64, float32, float16, bfloat16), the max and mean
error in ulps against mpmath at 50 digits, for the value and the gradient, side by side with the
naive expression and torch's built-in (where one exists). Grids: every finite float16/bfloat16
value; for float32/float64 every binade (subnormals included) with 24 random mantissas each plus
dense uniform samples and the 64 neighbours of each switch point; 2-D grids for the binary
functions; row batches (dominant entries, ties, -inf, huge values) for logsumexp/log_softmax.
Definition of the ulp and of the grids: ``src/mixprec/testing/ulp.py`` and ``docs/stable.md``.

Speed: each stable function against the naive expression on 16M elements (float32 unless
``--dtypes`` says more), wall time (best of ``--repeat``) with torch's default thread count and
CPU time single-threaded (the steadier number on a shared machine). Target: <= 1.5x.

    python benchmarks/ulp_audit.py                    # full audit + timing, writes the table
    python benchmarks/ulp_audit.py --level ci --no-time   # the test-sized grid, seconds
    python benchmarks/ulp_audit.py --only softplus,lambertw --time-only
    python benchmarks/ulp_audit.py --time-only        # re-time all, keep the accuracy section

The full audit takes several minutes (mpmath is slow: ~1M reference values). The table goes to
``benchmarks/results/ulp.md``.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from mixprec import stable
from mixprec.testing import ulp as audit

RESULTS = Path(__file__).resolve().parent / "results" / "ulp.md"
DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


# --------------------------------------------------------------------------------------------
# accuracy
# --------------------------------------------------------------------------------------------
def _fmt(v: float) -> str:
    if math.isnan(v):
        return "n/a"
    if math.isinf(v):
        return "inf"
    if v >= 1e4:
        return f"{v:.1e}"
    return f"{v:.3g}"


def run_audit(names: list[str], dtypes: list[torch.dtype], level: str) -> list[audit.AuditRow]:
    rows: list[audit.AuditRow] = []
    for name in names:
        for dt in dtypes:
            t0 = time.perf_counter()
            if name in audit.ROWWISE:
                got = audit.audit_rows(name, dt, level)
            else:
                got = audit.audit_elementwise(name, dt, level)
            rows.extend(got)
            st = [r for r in got if r.variant == "stable"]
            summary = ", ".join(f"{r.quantity} {_fmt(r.max_ulp)}" for r in st)
            print(
                f"{name:12s} {str(dt)[6:]:9s} n={st[0].points:7d} stable max ulp: {summary}"
                f"  [{time.perf_counter() - t0:.1f}s]",
                flush=True,
            )
    return rows


def _meets(r: audit.AuditRow) -> str:
    target = audit.TARGET_ULP.get(getattr(torch, r.dtype))
    if target is None:
        return "-"
    return "yes" if r.max_ulp <= target and r.bad == 0 else "**no**"


def accuracy_table(rows: list[audit.AuditRow]) -> str:
    """One line per (function, dtype, quantity): stable / naive / builtin side by side."""
    key = {}
    for r in rows:
        key.setdefault((r.function, r.dtype, r.quantity), {})[r.variant] = r
    lines = [
        "| function | dtype | quantity | points | stable max | stable mean | meets target "
        "| naive max | naive non-finite | torch max | torch non-finite |",
        "|---|---|---|---:|---:|---:|:---:|---:|---:|---:|---:|",
    ]
    for (fn, dt, q), v in key.items():
        s, n, b = v.get("stable"), v.get("naive"), v.get("builtin")
        if s is None:
            continue
        lines.append(
            f"| {fn} | {dt} | {q} | {s.points} | {_fmt(s.max_ulp)} | {_fmt(s.mean_ulp)} "
            f"| {_meets(s)} | {_fmt(n.max_ulp) if n else '-'} | {n.bad if n else '-'} "
            f"| {_fmt(b.max_ulp) if b else '-'} | {b.bad if b else '-'} |"
        )
    return "\n".join(lines)


def worst_table(rows: list[audit.AuditRow]) -> str:
    lines = [
        "| function | dtype | quantity | stable max ulp | at input |",
        "|---|---|---|---:|---|",
    ]
    for r in rows:
        if r.variant == "stable":
            lines.append(
                f"| {r.function} | {r.dtype} | {r.quantity} | {_fmt(r.max_ulp)} | {r.worst} |"
            )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# speed
# --------------------------------------------------------------------------------------------
def _inputs(dtype: torch.dtype, n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(n, generator=g) * 10).to(dtype)
    y = (torch.randn(n, generator=g) * 10).to(dtype)
    side = math.isqrt(n)
    return {
        "x": x,
        "y": y,
        "neg": (-(torch.randn(n, generator=g).abs() * 10) - 1e-3).to(dtype),
        "pos": (torch.rand(n, generator=g) * 10 + 1e-3).to(dtype),
        "rows": x[: side * side].reshape(side, side),
        "z": (torch.rand(n, generator=g) * 10).to(dtype),
        "zm1": (-torch.rand(n, generator=g) * 0.36).to(dtype),
    }


def speed_cases(
    t: dict[str, torch.Tensor],
) -> dict[str, tuple[Callable[[], object], Callable[[], object]]]:
    x, y, neg, pos, rows, z, zm1 = (t[k] for k in ("x", "y", "neg", "pos", "rows", "z", "zm1"))
    naive_w0, naive_wm1 = audit.get_spec("lambertw").naive, audit.get_spec("lambertw_m1").naive
    return {
        "softplus": (lambda: torch.log(1 + torch.exp(x)), lambda: stable.softplus(x)),
        "log_sigmoid": (lambda: torch.log(torch.sigmoid(x)), lambda: stable.log_sigmoid(x)),
        "log1pexp": (lambda: torch.log(1 + torch.exp(x)), lambda: stable.log1pexp(x)),
        "log1mexp": (lambda: torch.log(1 - torch.exp(neg)), lambda: stable.log1mexp(neg)),
        "logaddexp": (
            lambda: torch.log(torch.exp(x) + torch.exp(y)),
            lambda: stable.logaddexp(x, y),
        ),
        "logsumexp": (
            lambda: torch.log(torch.exp(rows).sum(-1)),
            lambda: stable.logsumexp(rows, -1),
        ),
        "log_softmax": (
            lambda: torch.log(torch.softmax(rows, -1)),
            lambda: stable.log_softmax(rows, -1),
        ),
        "xlogy": (lambda: x * torch.log(pos), lambda: stable.xlogy(x, pos)),
        "xlog1py": (lambda: x * torch.log(1 + pos), lambda: stable.xlog1py(x, pos)),
        "logcosh": (lambda: torch.log(torch.cosh(x)), lambda: stable.logcosh(x)),
        "lambertw": (lambda: naive_w0(z), lambda: stable.lambertw(z)),
        "lambertw_m1": (lambda: naive_wm1(zm1), lambda: stable.lambertw(zm1, -1)),
    }


def _once(fn: Callable[[], object], clock: Callable[[], float]) -> float:
    t0 = clock()
    fn()
    return clock() - t0


def run_speed(names: list[str], dtypes: list[torch.dtype], n: int, repeat: int) -> list[tuple]:
    out = []
    threads = torch.get_num_threads()
    for dt in dtypes:
        cases = speed_cases(_inputs(dt, n))
        for name in names:
            if name not in cases:
                continue
            naive, st = cases[name]
            naive(), st()  # warm-up (allocator, thread pool)
            # interleave naive and stable so that load changes hit both alike
            wall_n = wall_s = cpu_n = cpu_s = math.inf
            for _ in range(repeat):
                torch.set_num_threads(threads)
                wall_n = min(wall_n, _once(naive, time.perf_counter))
                wall_s = min(wall_s, _once(st, time.perf_counter))
                torch.set_num_threads(1)
                cpu_n = min(cpu_n, _once(naive, time.process_time))
                cpu_s = min(cpu_s, _once(st, time.process_time))
            torch.set_num_threads(threads)
            row = (name, str(dt)[6:], wall_n * 1e3, wall_s * 1e3, cpu_n * 1e3, cpu_s * 1e3)
            out.append(row)
            print(
                f"{name:12s} {row[1]:9s} naive {row[2]:8.1f} ms  stable {row[3]:8.1f} ms  "
                f"wall ratio {row[3] / row[2]:5.2f}   1-thread cpu ratio {row[5] / row[4]:5.2f}",
                flush=True,
            )
    return out


def speed_table(rows: list[tuple], n: int) -> str:
    lines = [
        "| function | dtype | naive ms | stable ms | wall ratio | 1-thread CPU ratio | <= 1.5x |",
        "|---|---|---:|---:|---:|---:|:---:|",
    ]
    for name, dt, wn, ws, cn, cs in rows:
        wall_ok, cpu_ok = ws / wn <= 1.5, cs / cn <= 1.5
        ok = "yes" if wall_ok and cpu_ok else ("CPU only" if cpu_ok else "**no**")
        lines.append(
            f"| {name} | {dt} | {wn:.1f} | {ws:.1f} | {ws / wn:.2f} | {cs / cn:.2f} | {ok} |"
        )
    return "\n".join(lines)


def _load() -> str:
    """The 1-minute load average against the core count, as a sentence (empty where unknown)."""
    try:
        one_minute = os.getloadavg()[0]
    except (AttributeError, OSError):
        return ""
    return f"Load average when the timing started: {one_minute:.1f} on {os.cpu_count()} cores. "


def _section(path: Path, title: str) -> str | None:
    """The ``## {title}...`` section of an earlier results file (up to the next ``## ``)."""
    if not path.exists():
        return None
    text = path.read_text()
    start = text.find(f"\n## {title}")
    if start < 0:
        return None
    end = text.find("\n## ", start + 1)
    return text[start + 1 : end if end >= 0 else len(text)].rstrip("\n") + "\n"


# --------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--level", choices=sorted(audit.LEVELS), default="full")
    ap.add_argument("--only", default="", help="comma-separated function names")
    ap.add_argument("--dtypes", default="float64,float32,float16,bfloat16")
    ap.add_argument("--time-dtypes", default="float32")
    ap.add_argument("--no-time", action="store_true")
    ap.add_argument("--time-only", action="store_true", help="keeps the file's accuracy section")
    ap.add_argument("--n", type=int, default=1 << 24, help="elements for the timing")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS)
    return ap


def accuracy_sections(names: list[str], dtypes: list[torch.dtype], level: str) -> list[str]:
    t0 = time.perf_counter()
    rows = run_audit(names, dtypes, level)
    return [
        f"## Accuracy ({level} grid, {time.perf_counter() - t0:.0f} s)\n\n"
        "Max and mean error in ulps of the dtype against mpmath at 50 digits (`ulp(y) = "
        "2^(max(floor(log2|y|), emin) - mantissa_bits)`); *non-finite* counts points where "
        "the exact value is finite (or rounds to a finite number) but the result is not, or "
        "NaN where it should not be. Targets: float32 <= 2, float16/bfloat16 <= 1 "
        "(float64: reported, no target). `grad` is the derivative with upstream gradient 1 "
        "(log_softmax: a random upstream vector).\n\n" + accuracy_table(rows) + "\n",
        "### Where the stable versions are worst\n\n" + worst_table(rows) + "\n",
    ]


def speed_section(names: list[str], dtypes: list[torch.dtype], n: int, repeat: int) -> str:
    load = _load()  # other processes' share of the cores shapes the wall ratios
    srows = run_speed(names, dtypes, n, repeat)
    return (
        f"## Speed ({n} elements; logsumexp/log_softmax on a square matrix, last dim)\n\n"
        "Naive expression vs stable function, interleaved. Wall time: best of "
        f"{repeat}, {torch.get_num_threads()} threads; CPU time: single thread, best "
        f"of {repeat} (steadier on a shared machine). {load}lambertw's naive baseline "
        "is Newton's iteration with a data-dependent stopping test.\n\n"
        + speed_table(srows, n)
        + "\n"
    )


def main(argv: list[str] | None = None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    names = [*audit.ELEMENTWISE, *audit.ROWWISE]
    if args.only:
        names = [n for n in args.only.split(",") if n]
        bad = [n for n in names if n not in audit.ELEMENTWISE + audit.ROWWISE]
        if bad:
            ap.error(f"unknown function(s) {bad}; valid: {audit.ELEMENTWISE + audit.ROWWISE}")
    cap = torch.backends.cpu.get_cpu_capability()
    header = (
        f"torch {torch.__version__}, CPU capability {cap}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}, python {sys.version.split()[0]}"
    )
    print(header)

    parts = [f"# mixprec.stable: ULP audit and speed\n\n{header}\n"]
    if not args.time_only:
        dtypes = [DTYPES[d] for d in args.dtypes.split(",")]
        parts.extend(accuracy_sections(names, dtypes, args.level))
    if not args.no_time:
        tdt = [DTYPES[d] for d in args.time_dtypes.split(",")]
        parts.append(speed_section(names, tdt, args.n, args.repeat))
    if args.only or args.level != "full":
        print("\n".join(parts))
        print(f"(partial run: not writing {args.out})")
        return 0
    # a speed-only (accuracy-only) run keeps the other section of the existing table
    kept = _section(args.out, "Accuracy" if args.time_only else "Speed")
    if kept is not None and (args.time_only or args.no_time):
        parts.insert(1 if args.time_only else len(parts), kept)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(parts))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
