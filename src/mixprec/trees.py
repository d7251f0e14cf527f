"""Walking the argument and result trees of ops: the one tree walker of mixprec.

Tensors may sit anywhere in an op's arguments (``Tensor[]`` lists, ``Tensor?[]`` with holes,
``einsum``'s operands) and results (tuples, named tuples, lists, dicts); ``torch.utils._pytree``
walks them. Almost every call is flat, though (a few tensors and scalars), and pytree's
flatten / unflatten costs ~10 µs a call against ~1.5 µs for a comprehension, on every op the
sanitizer and the precision regions see: sequences whose elements hold no tensors take the
comprehension (a shape list stays one leaf: it holds no tensor), one level of plain lists
(``cat``'s ``Tensor[]``) a nested comprehension, anything deeper takes pytree. Tensors come out
in the same order either way. Used by :mod:`mixprec.precision` (op arguments
and outputs inside a region) and :mod:`mixprec.sanitizer` (real and shadow arguments).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten

_CONTAINERS = (list, tuple, dict)
_LEAF_OR_CONTAINER = (torch.Tensor, *_CONTAINERS)
_PLAIN_SEQS = (list, tuple)  # exact types: subclasses (named tuples) keep pytree


def _deep(x: Any) -> bool:
    """A container holding tensors or containers (not a plain list of ints, e.g. a shape)."""
    # plain loops, not any(generator): these run on every op of a region or the sanitizer
    for y in x.values() if isinstance(x, dict) else x:
        if isinstance(y, _LEAF_OR_CONTAINER):
            return True
    return False


def nested(seq: Sequence[Any]) -> bool:
    """Does ``seq`` need pytree: does any element hold tensors or containers? (False: a flat
    argument list, which callers may walk with a plain loop.)"""
    for x in seq:  # noqa: SIM110 (a loop: no generator object per call, see _deep)
        if isinstance(x, _CONTAINERS) and _deep(x):
            return True
    return False


def _shallow(seq: Sequence[Any]) -> bool:
    """Is ``seq``'s nesting one level of plain lists / tuples of leaves (a ``Tensor[]``
    argument: ``cat``, ``stack``, ``_foreach_*``)? Those skip pytree too (same leaves, same
    containers); anything deeper, dicts and tuple subclasses take it."""
    for x in seq:
        if isinstance(x, _CONTAINERS):
            if type(x) not in _PLAIN_SEQS:
                return False
            for y in x:
                if isinstance(y, _CONTAINERS):
                    return False
    return True


def leaves(tree: Any) -> list[Any]:
    """The leaves of a result or argument tree, in order (a lone tensor: itself)."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, (list, tuple)):
        if not nested(tree):
            return list(tree)
        if _shallow(tree):
            return [y for x in tree for y in (x if type(x) in _PLAIN_SEQS else (x,))]
    return tree_leaves(tree)


def tensors(tree: Any) -> list[torch.Tensor]:
    """The tensors of a result or argument tree, in order."""
    return [x for x in leaves(tree) if isinstance(x, torch.Tensor)]


def map_tensors(fn: Callable[[torch.Tensor], Any], args: Sequence[Any]) -> list[Any]:
    """``args`` as a list, with every tensor in it (nested ones too) replaced by ``fn(tensor)``.
    Tensors are visited in order."""
    if not nested(args):
        return [fn(x) if isinstance(x, torch.Tensor) else x for x in args]

    def one(x: Any) -> Any:
        return fn(x) if isinstance(x, torch.Tensor) else x

    if _shallow(args):
        return [type(x)(map(one, x)) if type(x) in _PLAIN_SEQS else one(x) for x in args]
    flat, spec = tree_flatten(list(args))
    return tree_unflatten([one(x) for x in flat], spec)


def map_tensor_kwargs(fn: Callable[[torch.Tensor], Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """:func:`map_tensors` over the values of keyword arguments."""
    return dict(zip(kwargs, map_tensors(fn, list(kwargs.values())), strict=True))


def map_pairs(fn: Callable[[Any, Any], Any], reals: Sequence[Any], shadows: list[Any]) -> list[Any]:
    """``shadows`` (an argument list) with each leaf replaced by ``fn(real leaf, shadow leaf)``.

    ``shadows`` comes from ``reals`` through :func:`map_tensors`, so the leaves pair up one to
    one; only container types may differ (a ``torch.Size`` becomes a tuple), which
    ``tree_map`` over both trees would refuse.
    """
    if not nested(shadows):
        return [fn(r, s) for r, s in zip(reals, shadows, strict=True)]
    if _shallow(shadows):
        return [
            type(s)(fn(x, y) for x, y in zip(r, s, strict=True))
            if type(s) in _PLAIN_SEQS
            else fn(r, s)
            for r, s in zip(reals, shadows, strict=True)
        ]
    flat, spec = tree_flatten(shadows)
    pairs = zip(tree_leaves(list(reals)), flat, strict=True)
    return tree_unflatten([fn(r, s) for r, s in pairs], spec)


def map_pair_kwargs(
    fn: Callable[[Any, Any], Any], reals: dict[str, Any], shadows: dict[str, Any]
) -> dict[str, Any]:
    """:func:`map_pairs` over the values of keyword arguments (same keys, same order)."""
    paired = map_pairs(fn, list(reals.values()), list(shadows.values()))
    return dict(zip(shadows, paired, strict=True))


def iter_tensors(args: Sequence[Any], kwargs: dict[str, Any]) -> list[torch.Tensor]:
    """Every tensor among positional and keyword arguments, at any depth, in order. A flat
    argument list (tensors, numbers, shape lists: almost every op) is walked in one loop, 2-4x
    faster than building the leaf list; anything holding tensors or containers deeper takes
    :func:`tensors`."""
    found: list[torch.Tensor] = []
    for a in (*args, *kwargs.values()) if kwargs else args:
        if isinstance(a, torch.Tensor):
            found.append(a)
        elif isinstance(a, _CONTAINERS) and _deep(a):
            return tensors([*args, *kwargs.values()])
    return found


def map_args(
    fn: Callable[[torch.Tensor], Any], args: Sequence[Any], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` with every tensor, at any depth, replaced by ``fn(tensor)``."""
    return tuple(map_tensors(fn, args)), map_tensor_kwargs(fn, kwargs)


def map_outputs(fn: Callable[[torch.Tensor], Any], out: Any) -> Any:
    """An op's or module's result with every tensor replaced by ``fn(tensor)``; containers keep
    their types (named tuples such as ``torch.return_types.max``, dicts), and a container type
    pytree does not know is a leaf, left as it is. A single tensor skips the walk."""
    if isinstance(out, torch.Tensor):
        return fn(out)
    return map_tensors(fn, [out])[0]
