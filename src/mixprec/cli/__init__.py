"""The ``mixprec`` command line: one thin module per subcommand (parse, call, print)."""

from __future__ import annotations

from mixprec.cli.app import (
    main,
)

__all__ = [
    "main",
]
