"""What a floating-point format is: FloatFormat, the name registry (no torch kernels)."""

from __future__ import annotations

from mixprec.formats.float_format import (
    ALIASES,
    FORMATS,
    FloatFormat,
    format_names,
    get_format,
)

__all__ = [
    "ALIASES",
    "FORMATS",
    "FloatFormat",
    "format_names",
    "get_format",
]
