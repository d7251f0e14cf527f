"""``stabilize``: a graph pass that replaces numerically unstable patterns by stable forms.

    >>> gm, changes = stabilize(model)                       # symbolic trace (torch.fx)
    >>> gm, changes = stabilize(model, (idx,), {"labels": y}) # capture with torch.export
    >>> for c in changes: print(c)        # model.py:12: softplus -> ...: log(1 + exp(x)) ...

The patterns are data: :data:`DEFAULT_RULES` (in :mod:`mixprec.stable.rules`) is a list of
:class:`Rule` objects, each a tree pattern (:class:`Op`, :class:`Var`, :class:`Const`,
:class:`Alt`, in :mod:`mixprec.stable.patterns`) plus a function that builds the replacement
nodes. Pass ``rules=[*DEFAULT_RULES, my_rule]`` to add your own. Capture (symbolic tracing or
torch.export) lives in :mod:`mixprec.stable.capture`.

Each replacement is recorded as a :class:`Change` with the rule's name and the user's source
line (``file:line``, from the node's recorded stack trace). Nodes of a matched pattern that have
no other users are removed; nothing else in the graph is touched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from torch import fx, nn

from mixprec.stable.capture import CaptureError, export_graph, source_location, trace
from mixprec.stable.patterns import (
    Alt,
    Canonical,
    Change,
    Const,
    Match,
    Op,
    Pattern,
    Rule,
    Var,
    canonical_op,
)
from mixprec.stable.rules import DEFAULT_RULES

# the names this module has always offered (mixprec.stable imports them from here)
_REEXPORTED = (Alt, Canonical, CaptureError, Const, Match, Op, Pattern, Var, canonical_op)


def _erase_unused(graph: fx.Graph, nodes: Iterable[fx.Node], erased: set[fx.Node]) -> None:
    # reverse creation order: a node's inputs are erased after it
    order = {n: i for i, n in enumerate(graph.nodes)}
    for n in sorted(set(nodes), key=lambda n: order.get(n, -1), reverse=True):
        if n in order and not n.users and n.op in ("call_function", "call_method", "call_module"):
            graph.erase_node(n)
            erased.add(n)


def _check_options(rules: Sequence[Rule] | None, max_passes: int) -> list[Rule]:
    rule_list = list(DEFAULT_RULES if rules is None else rules)
    for r in rule_list:
        if not isinstance(r, Rule):
            raise TypeError(f"rules must be Rule objects, got {type(r).__name__}")
    if isinstance(max_passes, bool) or not isinstance(max_passes, int) or max_passes < 1:
        raise ValueError(f"max_passes must be a positive int, got {max_passes!r}")
    return rule_list


def _capture(
    module_or_fn: nn.Module | Callable[..., Any],
    example_args: Sequence[Any],
    example_kwargs: Mapping[str, Any] | None,
) -> fx.GraphModule:
    if not isinstance(example_args, (tuple, list)):
        raise TypeError(
            f"example_args must be a tuple of inputs, got {type(example_args).__name__} "
            "(one input x: example_args=(x,))"
        )
    if example_kwargs is not None and not isinstance(example_kwargs, Mapping):
        raise TypeError(f"example_kwargs must be a dict, got {type(example_kwargs).__name__}")
    if isinstance(module_or_fn, fx.GraphModule) or not (example_args or example_kwargs):
        return trace(module_or_fn)
    return export_graph(module_or_fn, tuple(example_args), dict(example_kwargs or {}))


def _sweep(
    graph: fx.Graph, rules: list[Rule], modules: dict[str, nn.Module], erased: set[fx.Node]
) -> list[Change]:
    """One pass over the graph: at each node the first matching rule is applied."""
    changes: list[Change] = []
    for node in list(graph.nodes):
        if node in erased:
            continue
        for rule in rules:
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
            break
    return changes


def stabilize(
    module_or_fn: nn.Module | Callable[..., Any],
    example_args: Sequence[Any] = (),
    example_kwargs: Mapping[str, Any] | None = None,
    *,
    rules: Sequence[Rule] | None = None,
    max_passes: int = 10,
) -> tuple[fx.GraphModule, list[Change]]:
    """Capture ``module_or_fn`` as a graph and replace unstable patterns by stable forms.

    Without example inputs the model is traced symbolically with torch.fx (no tensor is
    evaluated; data-dependent Python such as ``assert t <= block_size`` cannot be traced, and
    the :class:`CaptureError` says so). With ``example_args`` / ``example_kwargs`` it is captured
    by torch.export (non-strict, dims symbolic where the code allows), which handles such code
    and transformers' models; the result then has the original's parameters (the same
    ``Parameter`` objects, so an optimizer over either trains both) under the original's
    ``state_dict`` keys, and takes the same arguments.

    Returns the rewritten ``GraphModule`` (the input is never modified) and the list of
    :class:`Change` records, in the order the changes were made. ``rules`` defaults to
    :data:`DEFAULT_RULES` and is tried in order at every node (the first match wins, so
    specific rules go first). The graph is swept until no rule matches (at most
    ``max_passes`` sweeps), so a replacement can enable another
    (``log(1 / (1 + exp(-x)))`` -> ``log(sigmoid(x))`` -> ``log_sigmoid(x)``).
    Cost: one capture (a symbolic trace, or one or two fake-tensor runs of the forward) plus a
    pattern match per node and rule.
    """
    rule_list = _check_options(rules, max_passes)
    gm = _capture(module_or_fn, example_args, example_kwargs)
    graph = gm.graph
    modules = dict(gm.named_modules())
    changes: list[Change] = []
    erased: set[fx.Node] = set()
    for _ in range(max_passes):
        found = _sweep(graph, rule_list, modules, erased)
        changes += found
        if not found:
            break
    graph.lint()
    gm.recompile()
    return gm, changes
