"""The pattern language of :func:`mixprec.stabilize`: canonical ops, patterns, rules, changes.

Matching sees through the spellings a graph records for the same operation: torch.fx's
``torch.exp(x)``, ``x.exp()``, ``torch.special.expm1``, ``x + 1`` (``operator.add``),
``torch.add(x, 1)``, ``F.softmax`` / ``torch.softmax`` / ``x.softmax`` / an ``nn.Softmax``
submodule, and the ATen overloads torch.export records for them (``aten.exp.default``,
``aten.add.Tensor``, ``aten.rsub.Scalar`` for ``1 - x``, ``aten.softmax.int``, ...); ``add`` and
``mul`` match in either operand order. Arguments are normalised by name (``dim=``,
``keepdim=``), so ``x.sum(-1)`` and ``torch.sum(x, dim=-1)`` are the same thing.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

# --------------------------------------------------------------------------------------------
# canonical operations: the many spellings of one op, and its argument names
# --------------------------------------------------------------------------------------------
_UNARY = (
    "exp", "log", "log1p", "expm1", "sqrt", "neg", "sigmoid", "reciprocal", "square", "cosh",
    "abs",
)  # fmt: skip
# op name -> (tensor-input parameter names, {other parameter: default})
_SIGNATURES: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    **{u: (("input",), {}) for u in _UNARY},
    "add": (("input", "other"), {"alpha": 1}),
    "sub": (("input", "other"), {"alpha": 1}),
    "mul": (("input", "other"), {}),
    "div": (("input", "other"), {"rounding_mode": None}),
    "pow": (("input", "exponent"), {}),
    "sum": (("input",), {"dim": None, "keepdim": False, "dtype": None}),
    "mean": (("input",), {"dim": None, "keepdim": False, "dtype": None}),
    "softmax": (("input",), {"dim": None, "dtype": None}),
}
_ALIASES = {"axis": "dim", "self": "input"}
# positional parameter order of each target family (after the tensor inputs)
_POSITIONAL: dict[str, tuple[str, ...]] = {
    "sum": ("dim", "keepdim"),
    "mean": ("dim", "keepdim"),
    "softmax": ("dim",),  # F.softmax(x, dim, _stacklevel, dtype): only dim is positional here
}
_FUNCTIONS: dict[Any, str] = {
    operator.add: "add",
    operator.sub: "sub",
    operator.mul: "mul",
    operator.truediv: "div",
    operator.pow: "pow",
    operator.neg: "neg",
    torch.add: "add",
    torch.sub: "sub",
    torch.subtract: "sub",
    torch.mul: "mul",
    torch.multiply: "mul",
    torch.div: "div",
    torch.divide: "div",
    torch.true_divide: "div",
    torch.pow: "pow",
    torch.neg: "neg",
    torch.negative: "neg",
    torch.exp: "exp",
    torch.log: "log",
    torch.log1p: "log1p",
    torch.special.log1p: "log1p",
    torch.expm1: "expm1",
    torch.special.expm1: "expm1",
    torch.sqrt: "sqrt",
    torch.sigmoid: "sigmoid",
    torch.special.expit: "sigmoid",
    F.sigmoid: "sigmoid",
    torch.reciprocal: "reciprocal",
    torch.square: "square",
    torch.cosh: "cosh",
    torch.abs: "abs",
    torch.sum: "sum",
    torch.mean: "mean",
    torch.softmax: "softmax",
    torch.special.softmax: "softmax",
    F.softmax: "softmax",
}
_METHODS = {
    **{u: u for u in _UNARY},
    "add": "add", "sub": "sub", "subtract": "sub", "mul": "mul", "multiply": "mul",
    "div": "div", "divide": "div", "true_divide": "div", "pow": "pow", "negative": "neg",
    "sum": "sum", "mean": "mean", "softmax": "softmax",
}  # fmt: skip
_MODULES: dict[type, tuple[str, Callable[[nn.Module], dict[str, Any]]]] = {
    nn.Softmax: ("softmax", lambda m: {"dim": m.dim}),
    nn.Sigmoid: ("sigmoid", lambda m: {}),
}


_aten = torch.ops.aten
# the ATen overloads torch.export records (argument order as in the torch-level calls)
_FUNCTIONS.update(
    {
        **{getattr(_aten, u).default: u for u in _UNARY},
        _aten.special_expm1.default: "expm1",
        _aten.special_log1p.default: "log1p",
        _aten.special_expit.default: "sigmoid",
        _aten.add.Tensor: "add",
        _aten.add.Scalar: "add",
        _aten.sub.Tensor: "sub",
        _aten.sub.Scalar: "sub",
        _aten.mul.Tensor: "mul",
        _aten.mul.Scalar: "mul",
        _aten.div.Tensor: "div",
        _aten.div.Scalar: "div",
        _aten.div.Tensor_mode: "div",
        _aten.pow.Tensor_Scalar: "pow",
        _aten.pow.Tensor_Tensor: "pow",
        _aten.pow.Scalar: "pow",
        _aten.sum.dim_IntList: "sum",
        _aten.sum.default: "sum",
        _aten.mean.dim: "mean",
        _aten.mean.default: "mean",
        _aten.softmax.int: "softmax",
    }
)
# targets whose positional parameters differ from their family's (aten.softmax.int takes dtype)
_TARGET_POSITIONAL: dict[Any, tuple[str, ...]] = {_aten.softmax.int: ("dim", "dtype")}
# rsub(x, c, alpha) is c - alpha * x (how export records ``1 - x``): a sub with swapped operands
_SWAPPED: dict[Any, str] = {_aten.rsub.Scalar: "sub", _aten.rsub.Tensor: "sub"}


@dataclass(frozen=True)
class Canonical:
    """A node seen as ``op(*inputs, **params)`` with every parameter present (defaults filled)."""

    op: str | Callable[..., Any]
    inputs: tuple[Any, ...]
    params: dict[str, Any]


def canonical_op(node: fx.Node, modules: dict[str, nn.Module] | None = None) -> Canonical | None:
    """The canonical form of ``node``, or None when it is not an operation the rules know.

    Also None when the node uses an argument the canonical form cannot express (an unknown
    keyword, ``out=``): such calls are left alone rather than risk changing their meaning.
    """
    if node.op == "call_function":
        name = _FUNCTIONS.get(node.target) or _SWAPPED.get(node.target)
        args, kwargs = list(node.args), dict(node.kwargs)
        if node.target in _SWAPPED:
            if len(args) < 2:
                return None
            args[0], args[1] = args[1], args[0]
    elif node.op == "call_method":
        name = _METHODS.get(str(node.target))
        args, kwargs = list(node.args), dict(node.kwargs)
    elif node.op == "call_module" and modules is not None:
        sub = modules.get(str(node.target))
        entry = _MODULES.get(type(sub)) if sub is not None else None
        if entry is None or len(node.args) != 1 or node.kwargs:
            return None
        name = entry[0]
        args, kwargs = list(node.args), dict(entry[1](sub))
    else:
        return None
    if not name:
        return None
    inputs_names, defaults = _SIGNATURES[name]
    kwargs = {_ALIASES.get(k, k): v for k, v in kwargs.items()}
    kwargs.pop("_stacklevel", None)
    n_in = len(inputs_names)
    inputs = list(args[:n_in])
    for pname in inputs_names[len(inputs) :]:
        if pname not in kwargs:
            return None
        inputs.append(kwargs.pop(pname))
    extra = args[n_in:]
    positional = _TARGET_POSITIONAL.get(node.target) or _POSITIONAL.get(name, ())
    if len(extra) > len(positional):
        return None
    params = dict(defaults)
    for pname, value in zip(positional, extra, strict=False):
        params[pname] = value
    for k, v in kwargs.items():
        if k not in params:
            return None  # out=, memory_format=, ...: not ours to rewrite
        params[k] = v
    return Canonical(name, tuple(inputs), params)


# --------------------------------------------------------------------------------------------
# patterns
# --------------------------------------------------------------------------------------------
@dataclass
class Match:
    """The result of matching a pattern at ``root``.

    ``bindings``: :class:`Var` names (and ``Op(bind=...)`` names) -> the matched node/value;
    ``params``: ``Op(bind=...)`` names -> the canonical parameters (``dim``, ``keepdim``...);
    ``nodes``: the operation nodes the pattern covered, root first.
    """

    root: fx.Node
    bindings: dict[str, Any] = field(default_factory=dict)
    params: dict[str, dict[str, Any]] = field(default_factory=dict)
    nodes: list[fx.Node] = field(default_factory=list)

    def copy(self) -> Match:
        return Match(self.root, dict(self.bindings), dict(self.params), list(self.nodes))

    def __getitem__(self, name: str) -> Any:
        return self.bindings[name]


class Pattern:
    """Base class of the pattern language (see :class:`Op`, :class:`Var`, :class:`Const`)."""

    def match(self, value: Any, m: Match, modules: dict[str, nn.Module]) -> bool:
        raise NotImplementedError


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, fx.Node) or isinstance(b, fx.Node):
        return a is b
    return type(a) is type(b) and a == b


@dataclass(frozen=True)
class Var(Pattern):
    """Any argument (a node or a constant); the same name twice must be the same node.

    ``tensor=True`` accepts only graph nodes (values computed at run time), not constants.
    """

    name: str
    tensor: bool = False

    def match(self, value: Any, m: Match, modules: dict[str, nn.Module]) -> bool:
        if self.tensor and not isinstance(value, fx.Node):
            return False
        if self.name in m.bindings:
            return _same(m.bindings[self.name], value)
        m.bindings[self.name] = value
        return True


@dataclass(frozen=True)
class Const(Pattern):
    """A Python number equal to ``value`` (``1`` matches ``1`` and ``1.0``, not ``True``)."""

    value: float

    def match(self, value: Any, m: Match, modules: dict[str, nn.Module]) -> bool:
        return (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and math.isclose(value, self.value, rel_tol=0.0, abs_tol=0.0)
        )


@dataclass(frozen=True)
class Alt(Pattern):
    """The first of several alternative patterns that matches."""

    options: tuple[Pattern, ...]

    def __init__(self, *options: Pattern) -> None:
        object.__setattr__(self, "options", tuple(options))

    def match(self, value: Any, m: Match, modules: dict[str, nn.Module]) -> bool:
        for opt in self.options:
            trial = m.copy()
            if opt.match(value, trial, modules):
                m.__dict__.update(trial.__dict__)
                return True
        return False


_COMMUTATIVE = frozenset({"add", "mul"})


@dataclass(frozen=True)
class Op(Pattern):
    """An operation (canonical name, see :func:`canonical_op`) applied to sub-patterns.

    ``op`` may also be a function object (``torch.tanh``, your own helper): it then matches
    ``call_function`` nodes of exactly that target, with their positional arguments as inputs
    and keyword arguments as parameters.

    ``args`` match the operation's tensor inputs in order (either order for ``add``/``mul``).
    ``where``: required parameter values (e.g. ``{"alpha": 1}``). ``bind``: a name under which
    the node itself and its parameters are recorded in the :class:`Match` (binding the same
    name twice requires the same node, so ``Op("mul", p, p)`` with a bound ``p`` is a square).
    ``single_use``: the node must have no users outside the pattern (default False: a shared
    intermediate is kept for its other users and the root is still replaced).
    """

    op: str | Callable[..., Any]
    args: tuple[Pattern, ...]
    where: tuple[tuple[str, Any], ...] = ()
    bind: str | None = None

    def __init__(
        self,
        op: str | Callable[..., Any],
        *args: Pattern,
        where: dict[str, Any] | None = None,
        bind: str | None = None,
    ) -> None:
        if isinstance(op, str) and op not in _SIGNATURES:
            raise ValueError(
                f"unknown op {op!r}; valid names: {sorted(_SIGNATURES)} (or pass the function "
                "itself, e.g. Op(torch.tanh, Var('x')))"
            )
        if not isinstance(op, str) and not callable(op):
            raise TypeError(f"op must be an op name or a callable, got {op!r}")
        object.__setattr__(self, "op", op)
        object.__setattr__(self, "args", tuple(args))
        object.__setattr__(self, "where", tuple(sorted((where or {}).items())))
        object.__setattr__(self, "bind", bind)

    def match(self, value: Any, m: Match, modules: dict[str, nn.Module]) -> bool:
        if not isinstance(value, fx.Node):
            return False
        if self.bind is not None and self.bind in m.bindings:
            return m.bindings[self.bind] is value
        c = canonical_op(value, modules) if isinstance(self.op, str) else _raw_call(value, self.op)
        if c is None or c.op != self.op or len(c.inputs) != len(self.args):
            return False
        for k, v in self.where:
            if not _same(c.params.get(k), v):
                return False
        orders = [c.inputs]
        if self.op in _COMMUTATIVE and len(c.inputs) == 2:
            orders.append(c.inputs[::-1])
        for inputs in orders:
            trial = m.copy()
            trial.nodes.append(value)
            if self.bind is not None:
                trial.bindings[self.bind] = value
                trial.params[self.bind] = c.params
            if all(p.match(v, trial, modules) for p, v in zip(self.args, inputs, strict=True)):
                m.__dict__.update(trial.__dict__)
                return True
        return False


def _raw_call(node: fx.Node, target: Callable[..., Any]) -> Canonical | None:
    """A ``call_function`` of exactly ``target``: positional args are the inputs, keyword
    arguments the parameters (for user rules on ops the canonical table does not know)."""
    if node.op != "call_function" or node.target is not target:
        return None
    return Canonical(target, tuple(node.args), dict(node.kwargs))


Builder = Callable[[fx.Graph, Match], fx.Node]


@dataclass(frozen=True)
class Rule:
    """A rewrite: when any of ``patterns`` matches at a node, ``build`` makes its replacement.

    ``build(graph, match)`` inserts the new nodes (the graph's insertion point is already just
    before ``match.root``) and returns the node that replaces the root. ``check(match)`` can
    veto a match (e.g. when parameters do not fit the replacement). ``replacement`` names the
    stable form for the report.
    """

    name: str
    patterns: tuple[Pattern, ...]
    build: Builder
    replacement: str
    description: str = ""
    check: Callable[[Match], bool] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.patterns, Pattern):  # a single pattern is fine too
            object.__setattr__(self, "patterns", (self.patterns,))
        if not self.patterns or not all(isinstance(p, Pattern) for p in self.patterns):
            raise TypeError(f"rule {self.name!r}: patterns must be Pattern objects")

    def match(self, node: fx.Node, modules: dict[str, nn.Module]) -> Match | None:
        for pattern in self.patterns:
            m = Match(node)
            if pattern.match(node, m, modules) and (self.check is None or self.check(m)):
                return m
        return None


@dataclass(frozen=True)
class Change:
    """One replacement made by :func:`stabilize`."""

    rule: str
    location: str  # "path/to/file.py:12", or "<graph>:node" when no stack trace was recorded
    code: str  # the source line, stripped ("" when unknown)
    node: str  # the replaced node's name in the original graph
    replacement: str
    target: str = ""  # the traced module/function (set by the CLI)

    def __str__(self) -> str:
        code = f": {self.code}" if self.code else ""
        return f"{self.location}: {self.rule} -> {self.replacement}{code}"
