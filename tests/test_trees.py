"""Tests for the sanitizer's argument-tree walking (mixprec.trees) and for shadows
carried through ops whose tensors sit inside list arguments."""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_leaves, tree_map_only

from mixprec import trees
from mixprec.sanitizer import sanitize

T = [torch.full((2,), float(i)) for i in range(4)]
TREES = [
    T[0],
    (T[0], None, T[1]),
    [T[0], 2.5, [3, 4], torch.float16],  # a shape list holds no tensor: one leaf
    [T[0], [T[1], None, T[2]], (T[3],)],  # Tensor[] / Tensor?[] arguments
    (T[0], {"a": T[1], "b": [T[2]]}),
]


def same(a: object, b: object) -> bool:
    return all(x is y for x, y in zip(tree_leaves(a), tree_leaves(b), strict=True))


def test_tensors_in_order_as_pytree_finds_them() -> None:
    for tree in TREES:
        expected = [x for x in tree_leaves(tree) if isinstance(x, torch.Tensor)]
        assert [id(t) for t in trees.tensors(tree)] == [id(t) for t in expected]
    assert trees.leaves((T[0], None)) == [T[0], None]  # a result tuple keeps its holes


def test_iter_tensors_finds_positional_and_keyword_tensors_in_order() -> None:
    """The flat loop and the tree walk give pytree's tensors, in order, keywords last."""
    for tree in TREES:
        args = tree if isinstance(tree, tuple) else (tree,)
        for kwargs in ({}, {"out": T[3], "dim": -1}, {"xs": [T[2], 1], "n": [1, 2]}):
            expected = [
                x for x in tree_leaves([*args, *kwargs.values()]) if isinstance(x, torch.Tensor)
            ]
            got = trees.iter_tensors(args, kwargs)
            assert [id(t) for t in got] == [id(t) for t in expected], (tree, kwargs)


def test_map_tensors_equals_pytree_map() -> None:
    def double(t: torch.Tensor) -> torch.Tensor:
        return t * 2

    for tree in TREES[1:]:
        got = trees.map_tensors(double, tree)
        want = tree_map_only(torch.Tensor, double, list(tree))
        assert isinstance(got, list)
        got_leaves, want_leaves = tree_leaves(got), tree_leaves(want)
        assert len(got_leaves) == len(want_leaves)
        for g, w in zip(got_leaves, want_leaves, strict=True):
            assert torch.equal(g, w) if isinstance(w, torch.Tensor) else g == w
    kw = {"weight": T[1], "alpha": 0.5, "out": [T[2]]}
    mapped = trees.map_tensor_kwargs(double, kw)
    assert list(mapped) == ["weight", "alpha", "out"] and mapped["alpha"] == 0.5
    assert torch.equal(mapped["out"][0], T[2] * 2)


def test_map_pairs_pairs_leaves_even_when_containers_change_type() -> None:
    reals = [T[0], torch.Size([2, 3]), [T[1], None]]
    shadows = trees.map_tensors(lambda t: t.double(), reals)  # torch.Size comes back as a tuple

    def pick(real: object, shadow: object) -> object:
        return ("real", real) if isinstance(real, torch.Tensor) else shadow

    out = trees.map_pairs(pick, reals, shadows)
    assert out[0] == ("real", T[0]) and tuple(out[1]) == (2, 3)
    assert out[2][0] == ("real", T[1]) and out[2][1] is None
    kw = trees.map_pair_kwargs(pick, {"a": T[3], "b": 1.5}, {"a": None, "b": 2.0})
    assert kw == {"a": ("real", T[3]), "b": 2.0}
    assert same(trees.map_pairs(lambda r, s: s, (T[0], T[1]), [T[2], T[3]]), [T[2], T[3]])


def test_shadows_flow_through_tensor_list_arguments() -> None:
    x = torch.full((64,), 3.0) + torch.linspace(0, 1e-3, 64)
    with sanitize() as report:
        both = torch.cat([x * 1.1, x * 1.1000001])  # Tensor[] argument: shadows carried
        stacked = torch.stack([both[:64], both[64:]])
        stacked[0] - stacked[1]  # <list-args>
    found = [f for f in report.findings if f.kind == "cancellation"]
    assert len(found) == 1 and found[0].code == "stacked[0] - stacked[1]  # <list-args>"
    assert found[0].op == "aten.sub.Tensor" and found[0].count > 0


def test_one_level_of_lists_keeps_its_containers_and_order() -> None:
    """cat / stack arguments (plain lists or tuples of leaves) take the comprehension path:
    the same leaves and container types as pytree, deeper nesting included."""
    for tree in ([T[0], (T[1], None), [T[2]], 3], [T[0], [[T[1]], T[2]]], [(T[3],), {"a": T[0]}]):
        got = trees.map_tensors(lambda t: t + 1, tree)
        want = tree_map_only(torch.Tensor, lambda t: t + 1, list(tree))
        assert [type(x) for x in got] == [type(x) for x in want]
        assert all(
            torch.equal(g, w) if isinstance(w, torch.Tensor) else g == w
            for g, w in zip(tree_leaves(got), tree_leaves(want), strict=True)
        )
        assert [id(t) for t in trees.tensors(tree)] == [
            id(t) for t in tree_leaves(tree) if isinstance(t, torch.Tensor)
        ]
        paired = trees.map_pairs(lambda r, s: s, tree, got)
        assert [type(x) for x in paired] == [type(x) for x in want]
