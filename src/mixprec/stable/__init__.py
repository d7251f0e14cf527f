"""Numerically stable special functions and the graph rewrite that puts them in place."""

from __future__ import annotations

from mixprec.stable.capture import CaptureError
from mixprec.stable.functions import (
    lambertw,
    log1mexp,
    log1pexp,
    log_sigmoid,
    log_softmax,
    logaddexp,
    logcosh,
    logsumexp,
    softplus,
    xlog1py,
    xlogy,
)
from mixprec.stable.rewrite import (
    DEFAULT_RULES,
    Alt,
    Change,
    Const,
    Match,
    Op,
    Rule,
    Var,
    canonical_op,
    stabilize,
    trace,
)

__all__ = [
    "DEFAULT_RULES",
    "Alt",
    "CaptureError",
    "Change",
    "Const",
    "Match",
    "Op",
    "Rule",
    "Var",
    "canonical_op",
    "lambertw",
    "log1mexp",
    "log1pexp",
    "log_sigmoid",
    "log_softmax",
    "logaddexp",
    "logcosh",
    "logsumexp",
    "softplus",
    "stabilize",
    "trace",
    "xlog1py",
    "xlogy",
]

# Public functions report this package as their home, so that their qualified names (shown in
# tracebacks, docs and the code that ``stabilize`` generates) are the documented ones.
for _name in __all__:
    if callable(_obj := globals()[_name]) and not isinstance(_obj, type):
        _obj.__module__ = __name__
del _name, _obj
