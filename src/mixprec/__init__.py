"""mixprec: low- and mixed-precision deep learning for PyTorch.

Train in any floating-point format (natively where the hardware has it, bit-exactly emulated
where it does not), see where precision is lost, and fix it. See README.md for a tour.

Public names are imported lazily (PEP 562), so ``import mixprec`` stays cheap and a layer is
loaded only when used.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# public name -> defining module (layers of DESIGN.md, top to bottom)
_EXPORTS: dict[str, str] = {
    "FloatFormat": "formats",
    "FORMATS": "formats",
    "get_format": "formats",
    "quantize": "quantize",
    "quantize_": "quantize",
    "encode": "quantize",
    "decode": "quantize",
    "fake_quantize": "quantize",
    "ROUNDING_MODES": "quantize",
    "mx_quantize": "mx",
    "mx_encode": "mx",
    "mx_decode": "mx",
    "Policy": "policy",
    "OpLists": "policy",
    "autocast": "autocast",
    "apply_policy": "autocast",
    "NoOpLossScaler": "scaling",
    "StaticLossScaler": "scaling",
    "DynamicLossScaler": "scaling",
    "initialize": "amp",
    "scale_loss": "amp",
    "master_params": "amp",
    "sanitize": "sanitize",
    "Report": "sanitize",
    "stabilize": "rewrite",
}
_SUBMODULES = {
    "formats", "quantize", "mx", "policy", "autocast", "scaling", "amp", "sanitize", "stable",
    "rewrite", "cli", "demo",
}  # fmt: skip

__all__ = [
    "FORMATS",
    "ROUNDING_MODES",
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


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(import_module(f".{module}", __name__), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return import_module(f".{name}", __name__)
    raise AttributeError(f"module 'mixprec' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS, *_SUBMODULES})


# Functions that share their module's name are bound eagerly: importing a submodule sets the
# package attribute to the module, which would otherwise shadow the function of the same name.
from .autocast import apply_policy, autocast  # noqa: E402
from .formats import FORMATS, FloatFormat, get_format  # noqa: E402
from .quantize import ROUNDING_MODES, decode, encode, fake_quantize, quantize, quantize_  # noqa: E402
from .sanitize import Report, sanitize  # noqa: E402
