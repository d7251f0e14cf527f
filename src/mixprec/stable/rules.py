"""The default rewrite rules of :func:`mixprec.stabilize` (:data:`DEFAULT_RULES`).

Each rule is a tree pattern over canonical ops (see :mod:`mixprec.stable.patterns`) plus a
builder that inserts the stable replacement; the rules are tried in list order at every node, so
a specific pattern (``log(1 + exp(x))``) comes before the general one it contains
(``log(1 + x)``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import fx

from mixprec.stable import functions as stable
from mixprec.stable.patterns import Alt, Builder, Const, Match, Op, Pattern, Rule, Var


def _x(name: str = "x") -> Var:
    return Var(name, tensor=True)


def _square(p: Pattern) -> Pattern:
    return Alt(Op("mul", p, p), Op("pow", p, Const(2)), Op("square", p))


def _call(target: Callable[..., Any], *args: Any, **kwargs: Any) -> Builder:
    """A builder calling ``target`` on bound names (strings) / literal values."""

    def build(graph: fx.Graph, m: Match) -> fx.Node:
        a = tuple(m[v] if isinstance(v, str) else v for v in args)
        k = {key: (m[v] if isinstance(v, str) else v) for key, v in kwargs.items()}
        return graph.call_function(target, a, k)

    return build


def _build_logsumexp(graph: fx.Graph, m: Match) -> fx.Node:
    p = m.params["sum"]
    return graph.call_function(
        stable.logsumexp, (m["x"],), {"dim": p["dim"], "keepdim": p["keepdim"]}
    )


def _build_log_softmax(graph: fx.Graph, m: Match) -> fx.Node:
    return graph.call_function(stable.log_softmax, (m["x"],), {"dim": m.params["sm"]["dim"]})


def _dims(d: Any) -> Any:
    return (d,) if isinstance(d, int) else (tuple(d) if isinstance(d, (list, tuple)) else d)


def _var_check(m: Match) -> bool:
    a, b = m.params["m2"], m.params["m1"]
    return (
        a["dtype"] is None
        and b["dtype"] is None
        and _dims(a["dim"]) == _dims(b["dim"])
        and a["keepdim"] == b["keepdim"]
    )


def _build_var(graph: fx.Graph, m: Match) -> fx.Node:
    p = m.params["m2"]
    kwargs: dict[str, Any] = {"correction": 0, "keepdim": p["keepdim"]}
    if p["dim"] is not None:
        kwargs["dim"] = p["dim"]
    return graph.call_function(torch.var, (m["x"],), kwargs)


def _softmax_check(m: Match) -> bool:
    # softmax normalises along one dim and keeps it: sum(..., dim=d, keepdim=True) only
    p = m.params["sum"]
    dims = _dims(p["dim"])
    return (
        p["dtype"] is None and p["keepdim"] is True and isinstance(dims, tuple) and len(dims) == 1
    )


def _build_softmax(graph: fx.Graph, m: Match) -> fx.Node:
    return graph.call_function(torch.softmax, (m["x"],), {"dim": _dims(m.params["sum"]["dim"])[0]})


_ONE_PLUS_EXP = Op("add", Const(1), Op("exp", _x()), where={"alpha": 1})

DEFAULT_RULES: list[Rule] = [
    Rule(
        "softmax",
        (Op("div", Op("exp", _x()), Op("sum", Op("exp", _x()), bind="sum")),),
        _build_softmax,
        "torch.softmax",
        "exp(x) / sum(exp(x)) overflows to inf / inf = NaN for x > 88 (float32)",
        check=_softmax_check,
    ),
    Rule(
        "softplus",
        (Op("log", _ONE_PLUS_EXP), Op("log1p", Op("exp", _x()))),
        _call(stable.softplus, "x"),
        "mixprec.stable.softplus",
        "log(1 + exp(x)) overflows to inf for x > 88 (float32) and loses all digits for x < -17",
    ),
    Rule(
        "logsumexp",
        (Op("log", Op("sum", Op("exp", _x()), bind="sum")),),
        _build_logsumexp,
        "mixprec.stable.logsumexp",
        "log(sum(exp(x))) overflows for large x and gives -inf when every exp underflows",
        check=lambda m: m.params["sum"]["dtype"] is None,
    ),
    Rule(
        "log_softmax",
        (Op("log", Op("softmax", _x(), bind="sm")),),
        _build_log_softmax,
        "mixprec.stable.log_softmax",
        "log(softmax(x)) is -inf where the probability underflows",
        check=lambda m: m.params["sm"]["dtype"] is None and m.params["sm"]["dim"] is not None,
    ),
    Rule(
        "log_sigmoid",
        (Op("log", Op("sigmoid", _x())),),
        _call(stable.log_sigmoid, "x"),
        "mixprec.stable.log_sigmoid",
        "log(sigmoid(x)) is -inf for x < -88 (float32)",
    ),
    Rule(
        "log1mexp",
        (
            Op("log", Op("sub", Const(1), Op("exp", _x()), where={"alpha": 1})),
            Op("log1p", Op("neg", Op("exp", _x()))),
        ),
        _call(stable.log1mexp, "x"),
        "mixprec.stable.log1mexp",
        "log(1 - exp(x)) loses all digits for x near 0",
    ),
    Rule(
        "logaddexp",
        (Op("log", Op("add", Op("exp", _x()), Op("exp", _x("y")), where={"alpha": 1})),),
        _call(stable.logaddexp, "x", "y"),
        "mixprec.stable.logaddexp",
        "log(exp(x) + exp(y)) overflows for large arguments",
    ),
    Rule(
        "logcosh",
        (Op("log", Op("cosh", _x())),),
        _call(stable.logcosh, "x"),
        "mixprec.stable.logcosh",
        "cosh(x) overflows for |x| > 89 (float32)",
    ),
    Rule(
        "expm1",
        (
            Op("sub", Op("exp", _x()), Const(1), where={"alpha": 1}),
            Op("add", Op("exp", _x()), Const(-1), where={"alpha": 1}),
        ),
        _call(torch.expm1, "x"),
        "torch.expm1",
        "exp(x) - 1 cancels for small x",
    ),
    Rule(
        "log1p",
        (Op("log", Op("add", Const(1), _x(), where={"alpha": 1})),),
        _call(torch.log1p, "x"),
        "torch.log1p",
        "log(1 + x) loses the digits of small x",
    ),
    Rule(
        "sigmoid",
        (
            Op("div", Const(1), Op("add", Const(1), Op("exp", Op("neg", _x())))),
            Op("reciprocal", Op("add", Const(1), Op("exp", Op("neg", _x())))),
        ),
        _call(torch.sigmoid, "x"),
        "torch.sigmoid",
        "1 / (1 + exp(-x)) overflows in exp(-x) for x < -88 (float32)",
    ),
    Rule(
        "hypot",
        (Op("sqrt", Op("add", _square(_x()), _square(_x("y")), where={"alpha": 1})),),
        _call(torch.hypot, "x", "y"),
        "torch.hypot",
        "sqrt(x*x + y*y) overflows (and underflows) in the squares",
    ),
    Rule(
        "xlog1py",
        (Op("mul", _x(), Op("log1p", _x("y"))),),
        _call(stable.xlog1py, "x", "y"),
        "mixprec.stable.xlog1py",
        "x * log1p(y) is NaN at x = 0, y = -1 (0 * -inf)",
    ),
    Rule(
        "xlogy",
        (Op("mul", _x(), Op("log", _x("y"))),),
        _call(stable.xlogy, "x", "y"),
        "mixprec.stable.xlogy",
        "x * log(y) is NaN at x = 0, y = 0 (0 * -inf) where xlogy gives 0",
    ),
    Rule(
        "var",
        (
            Op(
                "sub",
                Op("mean", _square(_x()), bind="m2"),
                _square(Op("mean", _x(), bind="m1")),
                where={"alpha": 1},
            ),
        ),
        _build_var,
        "torch.var(correction=0)",
        "mean(x*x) - mean(x)**2 cancels catastrophically when |mean| >> std",
        check=_var_check,
    ),
]
