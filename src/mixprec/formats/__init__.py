"""What a floating-point format is: FloatFormat, the name registry (no torch kernels)."""

from __future__ import annotations

from mixprec.formats.describe import (
    ExactValue,
    Explanation,
    bit_pattern,
    encoding_patterns,
    exact_decimal,
    explain,
    format_info,
    format_table,
    hexfloat,
    parse_value,
    round_exact,
)
from mixprec.formats.float_format import (
    ALIASES,
    FORMATS,
    ROUNDING_MODES,
    FloatFormat,
    format_names,
    get_format,
)
from mixprec.formats.mx_format import (
    MX_ALIASES,
    MX_FORMATS,
    MXFormat,
    get_mx_format,
    mx_format_names,
)

__all__ = [
    "ALIASES",
    "FORMATS",
    "MX_ALIASES",
    "MX_FORMATS",
    "ROUNDING_MODES",
    "ExactValue",
    "Explanation",
    "FloatFormat",
    "MXFormat",
    "bit_pattern",
    "encoding_patterns",
    "exact_decimal",
    "explain",
    "format_info",
    "format_names",
    "format_table",
    "get_format",
    "get_mx_format",
    "hexfloat",
    "mx_format_names",
    "parse_value",
    "round_exact",
]
