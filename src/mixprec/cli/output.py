"""How the subcommands print their tables: laid out for the width they have, never cutting a value.

The width (:func:`output_width`): ``--width N``, else ``$COLUMNS``, else the terminal's width,
else :data:`PIPE_WIDTH` when stdout is a pipe or file (so piped output does not depend on where
it runs).

Layout (:func:`column_tables`, :func:`pairs_table`): a table whose values fit is printed whole;
a narrower width first wraps the headers (never the values), then splits the columns between
several tables that each repeat the first column, keeping a group of related columns in one
table where it can; a width where even that does not fit prints one small field/value table per
row. Field/value tables shrink the field column first and wrap long values at spaces; a single
token wider than a whole column (a decimal with hundreds of digits) folds onto the next line,
whole. No cell ever ends in ``…``. Titles and prose are plain lines wrapped with :mod:`textwrap`,
so no line ends in padding.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations, pairwise
from typing import Any, Literal

PIPE_WIDTH = 200  # the width when stdout is not a terminal (the widest table, formats, is 199)

# rich's box: a table's left border, then per column one space each side and a right border
_TABLE_EDGE = 1
_COLUMN_EDGE = 3


def output_width(requested: int | None = None, pipe_width: int = PIPE_WIDTH) -> int:
    """``requested`` (``--width``), else ``$COLUMNS`` (a positive integer; other values are
    ignored), else the terminal's width when stdout is one, else ``pipe_width``."""
    if requested is not None:
        return requested
    env = os.environ.get("COLUMNS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    stdout = sys.stdout
    if stdout is not None and getattr(stdout, "isatty", lambda: False)():
        try:
            columns = os.get_terminal_size(stdout.fileno()).columns
        except (OSError, ValueError, AttributeError):  # not a real file descriptor
            columns = 0
        if columns > 0:
            return columns
    return pipe_width


def add_width_argument(parser: argparse.ArgumentParser) -> None:
    """``--width N``: the columns to lay the tables out for (default: :func:`output_width`)."""
    from mixprec.cli.arguments import int_at_least

    parser.add_argument(
        "--width", type=int_at_least(1), metavar="N",
        help="lay the tables out for N columns (default: $COLUMNS, else the terminal's width, "
        f"else {PIPE_WIDTH} when piped)",
    )  # fmt: skip


def table_console(width: int) -> Any:
    """A rich Console exactly ``width`` columns wide, whatever stdout is. No highlighting:
    numbers print as they are."""
    from rich.console import Console

    return Console(width=width, highlight=False)


def cell_width(text: str) -> int:
    """Columns ``text`` takes in a terminal (its widest line)."""
    from rich.cells import cell_len

    return max((cell_len(line) for line in text.splitlines()), default=0)


def _longest_word(text: str) -> int:
    return max((cell_width(w) for w in text.split()), default=0)


def table_width(widths: Sequence[int]) -> int:
    """Columns a boxed rich table takes with these column widths (padding and borders added)."""
    return _TABLE_EDGE + sum(w + _COLUMN_EDGE for w in widths)


# ----------------------------------------------------------------------------------------------
# what gets printed
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    """One column of :func:`column_tables`: neighbouring columns that share a ``group`` stay in
    one table when the columns are split between tables and the group fits in one."""

    header: str
    justify: Literal["left", "right"] = "left"
    group: str = ""


@dataclass(frozen=True)
class Block:
    """A rich table, the title printed above it, and the columns it takes."""

    title: str
    table: Any
    width: int


@dataclass(frozen=True)
class Printer:
    """Prints blocks and prose for ``width`` columns. A block wider than that (only when one
    value is) is printed at its own width: the terminal wraps the line, nothing is cut."""

    width: int

    @classmethod
    def for_width(cls, requested: int | None = None) -> Printer:
        """A printer for ``--width`` when given, else :func:`output_width`'s width."""
        return cls(output_width(requested))

    def pairs(self, title: str, rows: Sequence[tuple[str, str]]) -> None:
        """A titled field/value table (:func:`pairs_table`)."""
        self.block(Block(title, *pairs_table(rows, self.width)))

    def columns(self, title: str, columns: Sequence[Column], rows: Sequence[Sequence[str]]) -> None:
        """A titled table with a header row, split if need be (:func:`column_tables`)."""
        self.blocks(column_tables(title, columns, rows, self.width))

    def block(self, block: Block) -> None:
        if block.title:
            self.text(block.title, style="italic")
        table_console(max(self.width, block.width)).print(block.table)

    def blocks(self, blocks: Sequence[Block]) -> None:
        for b in blocks:
            self.block(b)

    def text(self, text: str, style: str = "") -> None:
        """Prose wrapped at spaces (a word longer than a line folds onto the next, whole)."""
        from rich.text import Text

        console = table_console(self.width)
        for line in textwrap.wrap(text, max(self.width, 1), break_on_hyphens=False) or [""]:
            console.print(Text(line, style=style), soft_wrap=True)


# ----------------------------------------------------------------------------------------------
# field/value tables
# ----------------------------------------------------------------------------------------------


def _wrapped_lines(text: str, width: int) -> int:
    """About how many lines ``text`` takes wrapped at spaces in ``width`` columns."""
    return sum(max(1, len(textwrap.wrap(p, max(width, 1)))) for p in text.splitlines() or [""])


def _field_width(rows: Sequence[tuple[str, str]], width: int) -> int:
    """The field column's width for a table too wide for ``width``: from the fields' longest
    word up to their whole width, and no wider than leaves the longest unbreakable part of a
    value room (parts too long for any field width fold anyway and are left out), the width that
    gives the fewest lines, the widest of those. Cost: a text wrap per cell and candidate width
    (a few hundred for a dozen rows)."""
    fields = max((cell_width(f) for f, _ in rows), default=0)
    narrowest = max((_longest_word(f) for f, _ in rows), default=1)
    most = width - table_width([narrowest, 0])  # the widest the value column gets
    fits = {i for i, (_, v) in enumerate(rows) if _longest_word(v) <= most}
    token = max((_longest_word(rows[i][1]) for i in fits), default=0)
    widest = max(narrowest, min(fields, width - table_width([0, token])))

    def lines(field_w: int) -> int:
        value_w = width - table_width([field_w, 0])
        return sum(
            max(_wrapped_lines(f, field_w), _wrapped_lines(v, value_w) if i in fits else 0)
            for i, (f, v) in enumerate(rows)
        )

    return min(range(widest, narrowest - 1, -1), key=lines)


def pairs_table(rows: Sequence[tuple[str, str]], width: int) -> tuple[Any, int]:
    """A table of (field, value) rows, without a header, that fits ``width``: as wide as its
    cells when they fit; else the field column wraps at spaces (:func:`_field_width`) and the
    values take the rest, wrapped at spaces. Returns the table and the columns it takes."""
    from rich.table import Table

    fields = max((cell_width(f) for f, _ in rows), default=0)
    values = max((cell_width(v) for _, v in rows), default=0)
    if table_width([fields, values]) <= width:
        widths = [fields, values]
    else:
        field_w = _field_width(rows, width)
        widths = [field_w, max(1, width - table_width([field_w, 0]))]
    table = Table(show_header=False)
    table.add_column("field", style="bold", width=widths[0], overflow="fold")
    table.add_column("value", width=widths[1], overflow="fold")
    for field, value in rows:
        table.add_row(field, value)
    return table, table_width(widths)


# ----------------------------------------------------------------------------------------------
# tables with a header row
# ----------------------------------------------------------------------------------------------


def _column_widths(columns: Sequence[Column], rows: Sequence[Sequence[str]]) -> list[int]:
    return [max((cell_width(r[i]) for r in rows), default=0) for i in range(len(columns))]


def _split_groups(cuts: Sequence[int], groups: Sequence[str]) -> int:
    """How many cuts (a cut ``c`` falls between columns ``c`` and ``c + 1``) split a group."""
    return sum(1 for c in cuts if groups[c] and groups[c] == groups[c + 1])


def pack_columns(widths: Sequence[int], groups: Sequence[str], width: int) -> list[list[int]]:
    """Split columns 1.. between as few tables as fit ``width``, each table led by column 0.

    Returns the column indices of each table, in order; among the fewest tables, the split that
    cuts the fewest groups, then the one whose widest table is narrowest. Empty when one column
    does not fit next to column 0. Cost: every way to cut n columns into k runs, C(n-1, k-1)
    (at most a few hundred for a dozen columns).
    """
    room = width - table_width(widths[:1])
    sizes = [w + _COLUMN_EDGE for w in widths[1:]]
    if not sizes or max(sizes) > room:
        return [[0]] if not sizes and room >= 0 else []
    for k in range(1, len(sizes) + 1):
        best: tuple[tuple[int, int], tuple[int, ...]] | None = None
        for cuts in combinations(range(1, len(sizes)), k - 1):
            bounds = (0, *cuts, len(sizes))
            totals = [sum(sizes[a:b]) for a, b in pairwise(bounds)]
            if max(totals) <= room:
                score = (_split_groups(cuts, groups), max(totals))
                best = min(best, (score, bounds)) if best else (score, bounds)
        if best is not None:
            return [[0, *range(a + 1, b + 1)] for a, b in pairwise(best[1])]
    return []


def _grid(
    columns: Sequence[Column], rows: Sequence[Sequence[str]], keep: Sequence[int], width: int
) -> tuple[Any, int]:
    """The table of columns ``keep``: headers on one line when that fits ``width``, else wrapped
    at spaces; values on one line always."""
    from rich.table import Table

    values = _column_widths(columns, rows)
    natural = [max(values[i], cell_width(columns[i].header)) for i in keep]
    wrapped = [max(values[i], _longest_word(columns[i].header)) for i in keep]
    widths = natural if table_width(natural) <= width else wrapped
    table = Table()
    for i, w in zip(keep, widths, strict=True):
        table.add_column(columns[i].header, justify=columns[i].justify, width=w)
    for r in rows:
        table.add_row(*(r[i] for i in keep))
    return table, table_width(widths)


def column_tables(
    title: str, columns: Sequence[Column], rows: Sequence[Sequence[str]], width: int
) -> list[Block]:
    """``rows`` under ``columns`` as one table that fits ``width``, else as several that each
    start with the first column (titled ``title (i/n)``), else one field/value table per row
    (titled ``title: first cell``). Values are never cut, nor wrapped but in that last layout."""
    values = _column_widths(columns, rows)
    wrapped = [max(v, _longest_word(c.header)) for v, c in zip(values, columns, strict=True)]
    parts = pack_columns(wrapped, [c.group for c in columns], width)
    if len(parts) == 1:
        return [Block(title, *_grid(columns, rows, parts[0], width))]
    if parts:
        n = len(parts)
        return [
            Block(f"{title} ({i}/{n})", *_grid(columns, rows, keep, width))
            for i, keep in enumerate(parts, 1)
        ]
    blocks = []
    for r in rows:
        pairs = [(c.header, v) for c, v in zip(columns[1:], r[1:], strict=True)]
        blocks.append(Block(f"{title}: {r[0]}" if title else r[0], *pairs_table(pairs, width)))
    return blocks
