"""Which stack frames are the user's: those outside torch and mixprec.

One predicate, :func:`is_internal`, for everything that reports a source line: the sanitizer's
attribution of ops (:func:`user_frame`) and the precision regions' warnings (their
``stacklevel``). Frames of all of mixprec count as internal, not only the reporting concern's: a
rounding reported from ``mixprec.quantize`` belongs to the line that called it. Frozen modules
(``<frozen runpy>``, which runs ``mixprec run``'s scripts) are internal too.
"""

from __future__ import annotations

import os
import sys
from types import CodeType

import torch

__all__ = ["Where", "is_internal", "user_frame"]

_MIXPREC_DIR = os.path.dirname(os.path.abspath(__file__))
_INTERNAL_DIRS = (os.path.dirname(os.path.abspath(torch.__file__)) + os.sep, _MIXPREC_DIR + os.sep)
#: source file name -> not the user's? Keyed by the name, whose hash Python caches, not by the
#: code object, whose hash is recomputed from its bytecode and constants on every lookup
#: (0.1-0.4 us for a model's forward, ~10 frames an op).
_file_internal: dict[str, bool] = {}

#: A source line: the frame's code object and its line number.
Where = tuple[CodeType, int]


def is_internal(filename: str) -> bool:
    """Is a frame of source file ``filename`` torch's, mixprec's or a frozen module's?"""
    v = _file_internal.get(filename)
    if v is None:
        v = filename.startswith(_INTERNAL_DIRS) or filename.startswith("<frozen")
        _file_internal[filename] = v
    return v


def user_frame() -> Where | None:
    """(code, line) of the innermost stack frame outside torch and mixprec. Cost: a few µs."""
    f = sys._getframe(1)
    known = _file_internal.get  # the cache inline: a call less per frame (~10 frames an op)
    while f is not None:
        code = f.f_code
        internal = known(code.co_filename)
        if internal is None:
            internal = is_internal(code.co_filename)
        if not internal:
            return code, f.f_lineno
        f = f.f_back
    return None
