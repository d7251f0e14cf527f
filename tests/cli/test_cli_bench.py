"""`mixprec bench`: prints a table with one row per format and a ratio per column."""

from __future__ import annotations

import re

import pytest

from mixprec.cli import main


def test_bench_prints_one_row_per_format(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--n", "4096", "--repeat", "1", "--formats", "bf16,e2m1"]) == 0
    out = capsys.readouterr().out
    assert "capability" in out
    rows = [line for line in out.splitlines() if re.match(r"\| (bfloat|float)", line)]
    assert [r.split("|")[1].strip() for r in rows] == ["bfloat16", "float4_e2m1fn"]
    # every measured cell is a ratio; fp4 has no torch dtype, so its native column is a dash
    assert all(re.fullmatch(r"\d+\.\d\d×", c.strip()) for c in rows[0].split("|")[2:6])
    assert rows[1].split("|")[5].strip() == "—"


@pytest.mark.parametrize("args", [["--n", "0"], ["--repeat", "-1"], ["--formats", "fp7"]])
def test_bench_bad_arguments_exit_2(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--n", "64", *args]) == 2
    assert "error" in capsys.readouterr().err
