"""``mixprec formats`` and ``mixprec explain`` at a fixed terminal width: every line fits, no value
is cut, and a wide terminal gets the one-table layout.

The width comes from COLUMNS (set here as a terminal would export it) or ``--width``; with
neither, stdout being captured (a pipe), the tables are laid out for 200 columns. Expected values
are rebuilt from the library's data (:func:`mixprec.formats.format_table`,
:func:`mixprec.formats.explain`), not from the command's own helpers.
"""

from __future__ import annotations

import io
import math
import os
import re
from collections import defaultdict

import pytest
from rich.cells import cell_len

from mixprec.cli import main
from mixprec.cli.output import PIPE_WIDTH, output_width, pack_columns
from mixprec.formats import explain, format_table

WIDTHS = [60, 80, 100, 120, 200, None]  # None: no COLUMNS, stdout a pipe
BOX = "│┃┌┐└┘├┤┬┴┼━─┏┓┗┛┡┩╇┳┻╋"


def run_at(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, width: int | None,
    *argv: str,
) -> str:  # fmt: skip
    if width is None:
        monkeypatch.delenv("COLUMNS", raising=False)
    else:
        monkeypatch.setenv("COLUMNS", str(width))
    assert main(list(argv)) == 0
    return capsys.readouterr().out


def check_lines(out: str, width: int | None) -> None:
    """Every line fits, none ends in padding, nothing is cut to an ellipsis."""
    assert "…" not in out
    for line in out.splitlines():
        assert cell_len(line) <= (width or PIPE_WIDTH), line
        assert line == line.rstrip(), repr(line)


def squash(text: str) -> str:
    """The text without whitespace and box drawing: a value folded over lines reads whole."""
    return re.sub(rf"[\s{BOX}]", "", text)


def table_rows(out: str) -> list[list[str]]:
    """The cells of every body row (``│ a │ b │``) of every table in ``out``."""
    return [
        [c.strip() for c in line.split("│")[1:-1]]
        for line in out.splitlines()
        if line.startswith("│")
    ]


def text(x: float) -> str:
    """A float as the tables print it: repr, ``inf``/``-inf``."""
    return repr(x) if math.isfinite(x) or math.isnan(x) else ("inf" if x > 0 else "-inf")


# ----------------------------------------------------------------------------------------------
# mixprec formats
# ----------------------------------------------------------------------------------------------


def format_values(d: dict) -> list[str]:
    """The values one row of ``mixprec formats`` shows, from format_table()."""
    return [
        str(d["bits"]), str(d["exponent_bits"]), str(d["mantissa_bits"]), str(d["bias"]),
        *(f"{d[k]:.6g}" for k in ("max", "min_normal", "min_subnormal", "eps")),
        d["inf_encoding"], d["nan_encoding"],
        (d["torch_dtype"] or "-").removeprefix("torch."), d["ml_dtype"] or "-",
    ]  # fmt: skip


@pytest.mark.parametrize("width", WIDTHS)
def test_formats_fits_and_shows_every_value(
    width: int | None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = run_at(capsys, monkeypatch, width, "formats")
    check_lines(out, width)
    cells: dict[str, list[str]] = defaultdict(list)
    for row in table_rows(out):
        cells[row[0]] += row[1:]
    rows = format_table()
    assert set(cells) == {d["name"] for d in rows}
    for d in rows:  # each value once, in order, a whole cell
        assert cells[d["name"]] == format_values(d), d["name"]
    assert "Aliases and custom eXmY formats" in " ".join(out.split())


@pytest.mark.parametrize(("width", "tables"), [(200, 1), (None, 1), (120, 2), (100, 3), (80, 4)])
def test_formats_uses_the_width_it_has(
    width: int | None, tables: int, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    out = run_at(capsys, monkeypatch, width, "formats")
    tops = [line for line in out.splitlines() if line.startswith("┏")]
    assert len(tops) == tables
    if tables == 1:  # today's table: one header line, every column
        header = next(line for line in out.splitlines() if line.startswith("┃"))
        assert [c.strip() for c in header.split("┃")[1:-1]] == [
            "name", "bits", "E", "M", "bias", "max", "min normal", "min subnormal", "eps",
            "inf", "NaN", "torch", "numpy/ml_dtypes",
        ]  # fmt: skip
        assert out.splitlines()[0] == "mixprec formats"
    else:
        titles = [line for line in out.splitlines() if line.startswith("mixprec formats (")]
        assert titles == [f"mixprec formats ({i}/{tables})" for i in range(1, tables + 1)]
    # the widest table takes most of the room: nothing is split that did not have to be
    assert max(cell_len(t) for t in tops) > (width or PIPE_WIDTH) * 0.6


def test_formats_narrow_is_one_block_per_format(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # at 50 columns a name and numpy/ml_dtypes (28 wide) no longer fit side by side
    out = run_at(capsys, monkeypatch, 50, "formats")
    check_lines(out, 50)
    blocks = re.split(r"^mixprec formats: (\S+)$", out, flags=re.M)[1:]
    names = blocks[::2]
    assert names == [d["name"] for d in format_table()]
    for d, body in zip(format_table(), blocks[1::2], strict=True):
        values = [row[1] for row in table_rows(body)]
        assert values == format_values(d), d["name"]


def test_formats_width_option_and_detail(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert run_at(capsys, monkeypatch, 80, "formats") == run_at(
        capsys, monkeypatch, 200, "formats", "--width", "80"
    )
    for width in (60, 80):
        out = run_at(capsys, monkeypatch, width, "formats", "--format", "e4m3")
        check_lines(out, width)
        assert "8 (sign, 4 exponent bits, 3 mantissa bits)" in squash_spaces(out)
        assert "ml_dtypes.float8_e4m3fn" in out and "0.00195312  (0x1p-9)" in out


def squash_spaces(out: str) -> str:
    """The value column's text with wrapped lines joined by one space."""
    values = [row[1] for row in table_rows(out)]
    return " ".join(v for v in values if v)


def test_width_option_is_checked(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["formats", "--width", "0"]) == 2
    assert "expected an integer >= 1" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# mixprec explain
# ----------------------------------------------------------------------------------------------

CASES = [
    ("0.1", "bf16"),
    ("0.1", "fp64"),
    ("-1e-9", "fp16"),
    ("1000", "e4m3"),
    ("5e-324", "fp64"),  # a 751-digit exact decimal
    ("nan", "fp4"),
    ("0." + "123456789" * 30, "fp64"),  # a 270-digit input, once cut to 96 characters
]


def head_values(value: str, fmt: str) -> list[str]:
    """What the first table shows about the rounded value, from explain(...).to_json()."""
    e = explain(value, fmt)
    d = e.to_json()
    r = d["result"]
    shown = [text(e.result), r["class"]]
    if "code" in r:
        shown += [r["exponent"], r["mantissa"], r["code_hex"]]
    if math.isfinite(e.result):
        shown += [r["decimal"], r["hex"]]
    for nb in d["neighbours"].values():
        if nb is not None and "code_hex" in nb:
            shown += [nb["hex"], nb["code_hex"]]
    exact = d["input"].get("exact")
    if exact is not None and "/" in exact:
        shown += [exact if len(exact) <= 40 else value]
    return [s for s in shown if s]


def mode_values(value: str, fmt: str) -> dict[str, list[str]]:
    """The rounding-modes table per mode: result, hex, code (errors are checked by squash)."""
    e = explain(value, fmt)
    d = e.to_json()
    rows = {m: [text(x), d["modes"][m]["hex"]] for m, x in e.results.items()}
    for m, md in ((m, d["modes"][m]) for m in e.results):
        if "code_hex" in md:
            rows[m].append(md["code_hex"])
    return rows


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize(("value", "fmt"), CASES)
def test_explain_fits_and_shows_every_value(
    value: str, fmt: str, width: int | None, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = run_at(capsys, monkeypatch, width, "explain", "-f", fmt, "--", value)
    check_lines(out, width)
    flat = squash(out)
    for v in head_values(value, fmt):
        assert squash(v) in flat, v
    cells: dict[str, list[str]] = defaultdict(list)
    for row in table_rows(out):
        cells[row[0]] += row[1:]
    for mode, values in mode_values(value, fmt).items():
        for v in values:  # modes-table cells are never wrapped: each value is a whole cell
            assert v in cells[mode], (mode, v)
    for note in explain(value, fmt).notes:
        assert squash(note) in flat


@pytest.mark.parametrize(("width", "tables"), [(200, 1), (None, 1), (80, 2), (60, 4)])
def test_explain_modes_use_the_width_they_have(
    width: int | None, tables: int, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = run_at(capsys, monkeypatch, width, "explain", "0.1", "-f", "fp64")
    assert sum(line.startswith("┏") for line in out.splitlines()) == tables
    if tables == 1:  # wide: the exact decimal and the bit fields on one line each
        lines = out.splitlines()
        assert any("0.1000000000000000055511151231257827021181583404541015625" in s for s in lines)
        assert any("0 | 01111111011 | 1001100110011001100110011001100110011001100110011010" in s
                   for s in lines)  # fmt: skip


def test_explain_long_input_is_whole(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    digits = "0." + "123456789" * 30
    out = run_at(capsys, monkeypatch, 200, "explain", digits, "-f", "bf16")
    input_row = "".join(row[1] for row in table_rows(out.split("rounding modes")[0])[:3])
    assert digits in input_row  # folded over lines of the value column, every digit kept
    out = run_at(capsys, monkeypatch, 200, "explain", "5e-324", "-f", "fp64")
    decimal = explain("5e-324", "fp64").to_json()["result"]["decimal"]
    assert squash(decimal) + "(751digits)" in squash(out)


# ----------------------------------------------------------------------------------------------
# the pieces: width detection, column packing
# ----------------------------------------------------------------------------------------------


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True

    def fileno(self) -> int:
        return 1


def test_output_width(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "90")
    assert output_width() == 90 and output_width(70) == 70
    for junk in ("", "0", "wide", "-5"):
        monkeypatch.setenv("COLUMNS", junk)
        assert output_width() == PIPE_WIDTH  # captured stdout: a pipe
    monkeypatch.delenv("COLUMNS")
    monkeypatch.setattr("sys.stdout", _Terminal())
    monkeypatch.setattr(os, "get_terminal_size", lambda fd: os.terminal_size((132, 40)))
    assert output_width() == 132
    monkeypatch.setattr(os, "get_terminal_size", lambda fd: os.terminal_size((0, 0)))
    assert output_width() == PIPE_WIDTH  # a terminal that reports no size


def test_pack_columns() -> None:
    # table width: 1 + sum(column + 3); the key column (10) takes 14 of it
    assert pack_columns([10, 5, 5], ["", "a", "a"], 30) == [[0, 1, 2]]
    # 2 tables needed; cutting between the groups beats the equally wide cut inside "a"
    assert pack_columns([10, 5, 5, 5], ["", "a", "a", "b"], 30) == [[0, 1, 2], [0, 3]]
    assert pack_columns([10, 5, 5, 5], ["", "a", "b", "b"], 30) == [[0, 1], [0, 2, 3]]
    # no group to keep: the most even split
    assert pack_columns([10, 2, 2, 8], ["", "", "", ""], 30) == [[0, 1, 2], [0, 3]]
    # a column that does not fit beside the key: no split works
    assert pack_columns([10, 20], ["", ""], 30) == []
