"""Shared helpers for the benchmark scripts.

Timing and tables live in mixprec.cli.bench_command.
"""

from __future__ import annotations

from pathlib import Path

from mixprec.cli.bench_command import best_of, markdown_table
from mixprec.machine import summary as machine

__all__ = ["RESULTS", "best_of", "machine", "markdown_table", "publish", "write_result"]

RESULTS = Path(__file__).resolve().parent / "results"


def write_result(name: str, text: str) -> Path:
    """Write a benchmark's latest table to benchmarks/results/NAME.md."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.md"
    path.write_text(text)
    return path


def publish(name: str, title: str, header: list[str], rows: list[list[str]], *notes: str) -> str:
    """Print a benchmark's table (title, this machine, the table, then notes as paragraphs) and
    write it to benchmarks/results/NAME.md; returns the text."""
    text = "\n\n".join((f"# {title}", machine(), markdown_table(header, rows), *notes)) + "\n"
    print(text)
    write_result(name, text)
    return text
