"""Rounding observers: a public seam for tools that must see every ``quantize``.

``quantize`` and ``quantize_`` round with a C kernel that writes raw storage, which tools working
at the aten dispatch level (``TorchDispatchMode``, e.g. ``mixprec.sanitize``) cannot see. A tool
that needs to know which tensors hold an emulated format registers an observer here, as torch's
hooks are registered, and removes it through the returned handle. Higher layers depend on this
module; it depends on nothing above ``formats``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch.utils.hooks import RemovableHandle

from mixprec.formats import FloatFormat

RoundingObserver = Callable[[torch.Tensor, torch.Tensor, FloatFormat], None]

# handle id -> observer; an OrderedDict (not a dict) because RemovableHandle keeps a weak
# reference to it, and observers run in registration order
_OBSERVERS: OrderedDict[int, RoundingObserver] = OrderedDict()


def register_rounding_observer(fn: RoundingObserver) -> RemovableHandle:
    """Call ``fn(src, result, fmt)`` after every ``quantize`` / ``quantize_``.

    ``src`` is the input tensor, ``result`` the rounded tensor (``src`` itself for
    ``quantize_``, ``out`` when given), ``fmt`` the resolved :class:`~mixprec.FloatFormat`.
    Observers run synchronously, in registration order, on the thread that called ``quantize``;
    an exception raised by one propagates out of ``quantize``.

    Returns a ``torch.utils.hooks.RemovableHandle``: ``handle.remove()`` unregisters ``fn``
    (idempotent), and ``with handle:`` removes it on exit, also on an exception.

    Cost: with no observer registered, ``quantize`` pays one emptiness check; otherwise each
    ``quantize`` call pays the observers' own cost.

    Raises ``TypeError`` when ``fn`` is not callable.
    """
    if not callable(fn):
        raise TypeError(
            "register_rounding_observer() takes a callable fn(src, result, fmt); "
            f"got {type(fn).__name__}"
        )
    handle = RemovableHandle(_OBSERVERS)
    _OBSERVERS[handle.id] = fn
    return handle


def has_rounding_observers() -> bool:
    """Is any observer registered? (A fused kernel that rounds without calling ``quantize``
    for every step, such as the MX block kernel, runs only when none is: they must see every
    element rounding.)"""
    return bool(_OBSERVERS)


def notify_rounding(src: torch.Tensor, result: torch.Tensor, fmt: FloatFormat) -> None:
    """Tell every registered observer that ``result`` holds ``src`` rounded to ``fmt``."""
    if not _OBSERVERS:
        return
    # a copy: an observer may remove itself (or others) while we iterate
    for observe in tuple(_OBSERVERS.values()):
        observe(src, result, fmt)
