"""mixprec where users already train: plugins for other training frameworks.

* ``mixprec.integrations.lightning``: :class:`MixprecPrecision`, a PyTorch Lightning precision
  plugin (``Trainer(plugins=[MixprecPrecision(opt_level="O2", compute="bfloat16")])``).

Hugging Face ``Trainer``/Accelerate users need no plugin: the public API works on their models
and in their loops (docs/integrations.md). Each integration imports its framework only when it is
first used, so neither ``import mixprec`` nor ``import mixprec.integrations`` imports one.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mixprec.integrations.lightning import MixprecPrecision

# public name -> the module defining it (imported on first access: it imports its framework)
_LAZY = {"MixprecPrecision": "mixprec.integrations.lightning"}

__all__ = [
    "MixprecPrecision",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(module), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
