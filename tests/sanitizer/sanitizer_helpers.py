"""Helpers shared by the sanitizer tests: source lines of markers, finding filters."""

from __future__ import annotations

import os

from mixprec.sanitizer import Finding


def marker_line(path: str, marker: str) -> str:
    """'FILE.py:LINE' of the line of ``path`` carrying ``# <marker>`` (a finding's location)."""
    with open(path) as fh:
        for i, line in enumerate(fh, 1):
            if line.rstrip().endswith(f"# <{marker}>"):
                return f"{os.path.basename(path)}:{i}"
    raise AssertionError(f"marker {marker} not found in {path}")


def only(findings: list[Finding], **match: object) -> list[Finding]:
    """The findings whose fields equal ``match``."""
    return [f for f in findings if all(getattr(f, k) == v for k, v in match.items())]
