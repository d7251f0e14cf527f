"""Where the subcommands print their rich tables."""

from __future__ import annotations

import sys
from typing import Any


def table_console(pipe_width: int = 200) -> Any:
    """A rich Console for wide tables: the terminal's width in a terminal; ``pipe_width``
    columns when stdout is a pipe or file (tests, ``| less``), where rich would squash the
    tables to 80. No highlighting: numbers print as they are."""
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else pipe_width, highlight=False)
