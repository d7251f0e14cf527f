"""Rounding tensors into formats: elementwise, block-scaled (MX), straight-through."""

from __future__ import annotations

from mixprec.formats.mx_format import (  # MX names live in formats; re-exported as before
    MX_FORMATS,
    MXFormat,
    get_mx_format,
)
from mixprec.quantization.autograd_rounding import (
    GradientRounding,
    round_gradient,
    straight_through,
)
from mixprec.quantization.blocks import (
    mx_decode,
    mx_encode,
    mx_quantize,
    mx_round_to,
    mx_scale_exponents,
)
from mixprec.quantization.elementwise import (
    KERNEL_ISAS,
    QUANTIZE_BACKENDS,
    code_dtype,
    decode,
    encode,
    fake_quantize,
    has_c_kernel,
    kernel_isa,
    quantize,
    quantize_,
    quantize_backend,
    round_to,
)
from mixprec.quantization.observers import (
    register_rounding_observer,
)
from mixprec.quantization.params import (
    ROUNDING_MODES,
)

__all__ = [
    "KERNEL_ISAS",
    "MX_FORMATS",
    "QUANTIZE_BACKENDS",
    "ROUNDING_MODES",
    "GradientRounding",
    "MXFormat",
    "code_dtype",
    "decode",
    "encode",
    "fake_quantize",
    "get_mx_format",
    "has_c_kernel",
    "kernel_isa",
    "mx_decode",
    "mx_encode",
    "mx_quantize",
    "mx_round_to",
    "mx_scale_exponents",
    "quantize",
    "quantize_",
    "quantize_backend",
    "register_rounding_observer",
    "round_gradient",
    "round_to",
    "straight_through",
]
