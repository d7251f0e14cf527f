"""``stabilize``: a torch.fx pass that replaces numerically unstable patterns by stable forms.

    >>> gm, changes = stabilize(model)          # model: nn.Module or a function of tensors
    >>> for c in changes: print(c)               # model.py:12: softplus: log(1 + exp(x)) ...

The patterns are data: :data:`DEFAULT_RULES` is a list of :class:`Rule` objects, each a tree
pattern (:class:`Op`, :class:`Var`, :class:`Const`, :class:`Alt`) plus a function that builds the
replacement nodes. Pass ``rules=[*DEFAULT_RULES, my_rule]`` to add your own.

Matching sees through the spellings torch.fx records for the same operation:
``torch.exp(x)``, ``x.exp()``, ``torch.special.expm1``, ``x + 1`` (``operator.add``),
``torch.add(x, 1)``, ``F.softmax`` / ``torch.softmax`` / ``x.softmax`` / an ``nn.Softmax``
submodule, ...; ``add`` and ``mul`` match in either operand order. Arguments are normalised by
name (``dim=``, ``keepdim=``), so ``x.sum(-1)`` and ``torch.sum(x, dim=-1)`` are the same thing.

Each replacement is recorded as a :class:`Change` with the rule's name and the user's source
line (``file:line``, from the node's recorded stack trace). Nodes of a matched pattern that have
no other users are removed; nothing else in the graph is touched.
"""

from __future__ import annotations

import copy
import math
import operator
import re
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from mixprec.stable import functions as stable

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
        name = _FUNCTIONS.get(node.target)
        args, kwargs = list(node.args), dict(node.kwargs)
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
    positional = _POSITIONAL.get(name, ())
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


# --------------------------------------------------------------------------------------------
# default rules
# --------------------------------------------------------------------------------------------
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


_ONE_PLUS_EXP = Op("add", Const(1), Op("exp", _x()), where={"alpha": 1})

DEFAULT_RULES: list[Rule] = [
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


# --------------------------------------------------------------------------------------------
# the pass
# --------------------------------------------------------------------------------------------
_FRAME = re.compile(
    r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<fn>[^\n]*)\n(?P<code>[^\n]*)'
)
_INTERNAL = (
    str(Path(torch.__file__).resolve().parent),
    str(Path(__file__).resolve().parent),
)


def _internal(filename: str) -> bool:
    return str(Path(filename).resolve()).startswith(_INTERNAL)


def source_location(node: fx.Node) -> tuple[str, str]:
    """``("file:line", "code")`` of the user's line that created ``node`` (or a fallback).

    The innermost frame outside torch and mixprec in the node's recorded stack trace: the
    line inside a helper function rather than the ``forward`` line that called the helper.
    """
    trace = node.meta.get("stack_trace")
    if trace:
        frames = list(_FRAME.finditer(trace))
        user = [f for f in frames if not _internal(f["file"])]
        for f in reversed(user or frames):
            return f"{f['file']}:{f['line']}", f["code"].strip()
    return f"<graph>:{node.name}", ""


class _Tracer(fx.Tracer):
    """fx's tracer with stack traces on, also for plain functions.

    fx keeps a node's stack only from the first frame named ``forward``, so a traced function
    would get none; we keep the frames below the tracer's own (the traced code and what it
    calls), minus torch's and ours.
    """

    def __init__(self) -> None:
        super().__init__()
        self.record_stack_traces = True

    def _filter_traceback_frames(
        self, user_stack_summary: traceback.StackSummary
    ) -> traceback.StackSummary:
        frames = list(user_stack_summary)
        start = 0
        for i, f in enumerate(frames):
            if Path(f.filename).match("torch/fx/_symbolic_trace.py"):
                start = i + 1
        return traceback.StackSummary.from_list(
            [f for f in frames[start:] if not _internal(f.filename)]
        )


def trace(module_or_fn: nn.Module | Callable[..., Any]) -> fx.GraphModule:
    """Symbolically trace a module or function, recording each node's source stack trace.

    A ``GraphModule`` is copied (its graph deep-copied), never modified in place.
    """
    if isinstance(module_or_fn, fx.GraphModule):
        gm = fx.GraphModule(module_or_fn, copy.deepcopy(module_or_fn.graph))
        gm.meta = dict(getattr(module_or_fn, "meta", {}))
        return gm
    if not (isinstance(module_or_fn, nn.Module) or callable(module_or_fn)):
        raise TypeError(
            f"stabilize expects an nn.Module, a GraphModule or a function, "
            f"got {type(module_or_fn).__name__}"
        )
    tracer = _Tracer()
    graph = tracer.trace(module_or_fn)
    name = (
        type(module_or_fn).__name__
        if isinstance(module_or_fn, nn.Module)
        else getattr(module_or_fn, "__name__", "fn")
    )
    return fx.GraphModule(tracer.root, graph, name)


def _erase_unused(graph: fx.Graph, nodes: Iterable[fx.Node], erased: set[fx.Node]) -> None:
    # reverse creation order: a node's inputs are erased after it
    order = {n: i for i, n in enumerate(graph.nodes)}
    for n in sorted(set(nodes), key=lambda n: order.get(n, -1), reverse=True):
        if n in order and not n.users and n.op in ("call_function", "call_method", "call_module"):
            graph.erase_node(n)
            erased.add(n)


def stabilize(
    module_or_fn: nn.Module | Callable[..., Any],
    *,
    rules: Sequence[Rule] | None = None,
    max_passes: int = 10,
) -> tuple[fx.GraphModule, list[Change]]:
    """Trace ``module_or_fn`` with torch.fx and replace unstable patterns by stable forms.

    Returns the rewritten ``GraphModule`` (the input is never modified) and the list of
    :class:`Change` records, in the order the changes were made. ``rules`` defaults to
    :data:`DEFAULT_RULES` and is tried in order at every node (the first match wins, so
    specific rules go first). The graph is swept until no rule matches (at most
    ``max_passes`` sweeps), so a replacement can enable another
    (``log(1 / (1 + exp(-x)))`` -> ``log(sigmoid(x))`` -> ``log_sigmoid(x)``).
    Tracing limits apply: data-dependent Python control flow cannot be traced.
    Cost: one trace plus a pattern match per node and rule; no tensor is evaluated.
    """
    rule_list = list(DEFAULT_RULES if rules is None else rules)
    for r in rule_list:
        if not isinstance(r, Rule):
            raise TypeError(f"rules must be Rule objects, got {type(r).__name__}")
    if isinstance(max_passes, bool) or not isinstance(max_passes, int) or max_passes < 1:
        raise ValueError(f"max_passes must be a positive int, got {max_passes!r}")
    gm = trace(module_or_fn)
    graph = gm.graph
    modules = dict(gm.named_modules())
    changes: list[Change] = []
    erased: set[fx.Node] = set()
    for _ in range(max_passes):
        changed = False
        for node in list(graph.nodes):
            if node in erased:
                continue
            for rule in rule_list:
                m = rule.match(node, modules)
                if m is None:
                    continue
                location, code = source_location(node)
                with graph.inserting_before(node):
                    new = rule.build(graph, m)
                new.meta.update({k: v for k, v in node.meta.items() if k == "stack_trace"})
                node.replace_all_uses_with(new)
                _erase_unused(graph, m.nodes, erased)
                changes.append(Change(rule.name, location, code, node.name, rule.replacement))
                changed = True
                break
        if not changed:
            break
    graph.lint()
    gm.recompile()
    return gm, changes
