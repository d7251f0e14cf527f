"""mixprec: low- and mixed-precision deep learning for PyTorch.

Train in any floating-point format (natively where the hardware has it, bit-exactly emulated
where it does not), see where precision is lost, and fix it. See README.md for a tour and
docs/design.md for the layers.

The public API is re-exported here explicitly. Subpackages, one per concept, import one way
(top to bottom): ``formats`` -> ``quantization`` -> ``precision`` -> ``amp``; ``sanitizer``
and ``stable`` sit beside ``precision``; ``demo`` and ``cli`` use only the public API.
"""

from __future__ import annotations

__version__ = "0.1.0"

from mixprec import stable
from mixprec.amp import (
    DivergenceError,
    DynamicLossScaler,
    NoOpLossScaler,
    StaticLossScaler,
    initialize,
    master_params,
    scale_loss,
)
from mixprec.formats import FORMATS, FloatFormat, get_format
from mixprec.precision import (
    OpLists,
    Policy,
    apply_policy,
    autocast,
    checkpoint_context,
    current_policy,
)
from mixprec.quantization import (
    ROUNDING_MODES,
    decode,
    encode,
    fake_quantize,
    mx_decode,
    mx_encode,
    mx_quantize,
    quantize,
    quantize_,
)
from mixprec.sanitizer import Report, sanitize
from mixprec.stable import stabilize

__all__ = [
    "FORMATS",
    "ROUNDING_MODES",
    "DivergenceError",
    "DynamicLossScaler",
    "FloatFormat",
    "NoOpLossScaler",
    "OpLists",
    "Policy",
    "Report",
    "StaticLossScaler",
    "__version__",
    "apply_policy",
    "autocast",
    "checkpoint_context",
    "current_policy",
    "decode",
    "encode",
    "fake_quantize",
    "get_format",
    "initialize",
    "master_params",
    "mx_decode",
    "mx_encode",
    "mx_quantize",
    "quantize",
    "quantize_",
    "sanitize",
    "scale_loss",
    "stabilize",
    "stable",
]
