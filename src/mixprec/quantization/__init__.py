"""Rounding tensors into formats: elementwise, block-scaled (MX), straight-through."""

from __future__ import annotations

from mixprec.quantization.blocks import (
    MX_FORMATS,
    MXFormat,
    get_mx_format,
    mx_decode,
    mx_encode,
    mx_quantize,
    mx_scale_exponents,
)
from mixprec.quantization.elementwise import (
    code_dtype,
    decode,
    encode,
    fake_quantize,
    has_c_kernel,
    quantize,
    quantize_,
)
from mixprec.quantization.params import (
    ROUNDING_MODES,
)

__all__ = [
    "MX_FORMATS",
    "ROUNDING_MODES",
    "MXFormat",
    "code_dtype",
    "decode",
    "encode",
    "fake_quantize",
    "get_mx_format",
    "has_c_kernel",
    "mx_decode",
    "mx_encode",
    "mx_quantize",
    "mx_scale_exponents",
    "quantize",
    "quantize_",
]
