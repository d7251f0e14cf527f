"""Gather every benchmark's latest table (benchmarks/results/*.md) into benchmarks/README.md.

    python benchmarks/collect.py

Each table was measured in one run of its own script on the machine it names; compare figures
only within one table.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = [
    "quantize", "quantize_isa", "quantize_mx", "autocast", "autocast_corpus", "autocast_compile",
    "autocast_drift", "autocast_cxx_floor", "overhead_sweep", "amp", "sanitize", "sanitize_corpus",
    "sanitize_cxx_floor", "ulp", "stable_speed", "stabilize",
]  # fmt: skip

INTRO = """# Benchmarks

Every table below was produced by the script named in its section, in one run, on the machine
its header line names (`torch.backends.cpu.get_cpu_capability()` and CPU flags included). Ratios
are the point: absolute times vary between sessions and machines, and figures from different
tables were measured at different times. Regenerate a table with its script, then run
`python benchmarks/collect.py` to rebuild this page. Benchmarks are never asserted in tests.

| script | what it measures |
|---|---|
| `benchmarks/quantize.py`, `mixprec bench --slow` | quantize ÷ clone or copy_, torch, ml_dtypes |
| `benchmarks/quantize.py --mx-only` | MX rounding (fused C kernel, torch path) ÷ clone |
| `benchmarks/autocast.py` | transformer training step: fp32, emulated, torch.autocast |
| `benchmarks/autocast_corpus.py` | emulated ÷ fp32 step on the corpus; `--compile`, `--drift` |
| `benchmarks/autocast_cxx_floor.py` | experiment: bf16 rounding as a C++ fallback vs Python |
| `benchmarks/overhead_sweep.py` | emulated bf16 and sanitize() ÷ fp32 against step size (plot) |
| `benchmarks/amp.py` | O0–O3 step times and the loss scaler's overhead |
| `benchmarks/sanitize.py` | a training step under the float64 shadow sanitizer ÷ plain step |
| `benchmarks/sanitize_corpus.py` | the same on the real-model corpus (HF models, nanoGPT) |
| `benchmarks/sanitize_cxx_floor.py` | experiment: dispatch and bare shadow in C++ vs Python |
| `benchmarks/ulp_audit.py` | ULP errors of the stable functions vs mpmath, and their speed |
| `benchmarks/stabilize.py` | stabilize: capture + rewrite time on the real-model corpus |
"""


def main() -> None:
    results = HERE / "results"
    found = {p.stem: p for p in sorted(results.glob("*.md"))}
    names = [n for n in ORDER if n in found] + [n for n in found if n not in ORDER]
    parts = [INTRO]
    for name in names:
        parts.append(f"## {name}\n\n" + found[name].read_text().strip() + "\n")
    (HERE / "README.md").write_text("\n".join(parts))
    print(f"wrote {HERE / 'README.md'} from {len(names)} result files")


if __name__ == "__main__":
    main()
