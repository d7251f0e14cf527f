"""Float64 shadow execution that names the op that lost precision, and its reports."""

from __future__ import annotations

from mixprec.sanitizer.session import (
    KINDS,
    PHASES,
    SCHEMA_VERSION,
    Finding,
    GradHistogram,
    Report,
    record_rounding,
    sanitize,
)

__all__ = [
    "KINDS",
    "PHASES",
    "SCHEMA_VERSION",
    "Finding",
    "GradHistogram",
    "Report",
    "record_rounding",
    "sanitize",
]
