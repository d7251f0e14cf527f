"""Shadow values of an op's arguments and results, kept in :class:`ShadowStore` tables (private).

An argument's shadow is its stored shadow, or the argument upcast to the shadow dtype where it
has none (it is then taken as exact). Tensors are found anywhere in the argument tree
(:mod:`.trees`); Python float constants and dtypes are replaced at the top level only, where
aten ops take scalars.
"""

from __future__ import annotations

from ctypes import c_float
from dataclasses import dataclass, field
from typing import Any

import torch

from mixprec.sanitizer.store import NONE, PARTIAL, ShadowStore
from mixprec.trees import leaves, map_pairs, map_tensor_kwargs, map_tensors, nested, tensors

LOW = (torch.float16, torch.bfloat16, torch.float32)  # real dtypes that get shadows

_F32: dict[float, float] = {}  # f32's results: a model's constants recur on every step


def f32(v: float) -> float:
    """``v`` rounded to float32 (Python scalars reach fp32/fp16/bf16 kernels as float32); a
    magnitude beyond float32's range becomes ±inf, as torch's cast makes it."""
    if v == 0.0 or v != v:
        return v  # ±0 (equal dictionary keys of different sign) and NaN as they are
    r = _F32.get(v)
    if r is None:
        r = c_float(v).value  # the C cast: rounds to nearest, overflows to ±inf
        if len(_F32) < 4096:
            _F32[v] = r
    return r


@dataclass(slots=True)
class ShadowInputs:
    """An op's positional arguments with their shadows, and what the lookup found."""

    args: list[Any] = field(default_factory=list)  # None where a lazy upcast was skipped
    any_float: bool = False  # some argument is a real tensor of a shadowed dtype
    has_shadow: bool = False  # some argument has a stored shadow (is not exact)
    err: float = 0.0  # largest error bound among the arguments' shadows
    cause: str | None = None  # label of a finding whose error an argument carries


class Shadows:
    """The shadow table of a run (``store``) and the table of flipped boolean results
    (``decisions``: masks whose shadow differs, for ``where``). Shadows of real tensors of
    the ``shadowable`` dtypes are kept in ``dtype``."""

    def __init__(self, dtype: torch.dtype, memory: float = float("inf")) -> None:
        self.dtype = dtype
        # fp32 shadows only make sense for 16-bit reals
        self.shadowable = (torch.float16, torch.bfloat16) if dtype == torch.float32 else LOW
        self.store = ShadowStore(dtype, budget=memory)  # bytes kept uncompressed
        self.decisions = ShadowStore(None)

    def clear(self) -> None:
        self.store.clear()
        self.decisions.clear()

    def drop(self, tree: Any) -> None:
        """Forget the shadows of the tensors of ``tree`` (results we could not shadow)."""
        for t in tensors(tree):
            self.store.invalidate(t)

    def forget(self, tree: Any) -> None:
        """Take every tensor of ``tree`` as exact from now on (after an unshadowed mutation)."""
        for t in tensors(tree):
            self.store.invalidate(t)
            self.decisions.invalidate(t)

    def _scalar(self, v: Any, compute: bool) -> Any:
        if isinstance(v, torch.dtype) and v in self.shadowable:
            return self.dtype  # e.g. _softmax_backward_data's input_dtype
        if compute and type(v) is float:
            return f32(v)  # constants enter at the real precision (as in NSan)
        return v

    def inputs(self, args: tuple[Any, ...], *, lazy: bool, compute: bool) -> ShadowInputs:
        """Shadows of ``args``. ``lazy``: leave None for exact tensors (see :meth:`fill`);
        ``compute``: the op rounds, so float constants enter as float32.

        Cost: one table lookup per tensor; an upcast copy per exact tensor unless ``lazy``.
        """
        found = ShadowInputs()
        if nested(args):  # a Tensor[] argument (cat, stack, einsum): the tree walk
            mapped = map_tensors(lambda t: self._shadow(t, found, lazy), args)
            found.args = [self._scalar(a, compute) for a in mapped]
            return found
        # flat (almost every op): one loop, no tree walk (~1 us less)
        scalar, shadow = self._scalar, self._shadow
        found.args = [
            shadow(a, found, lazy) if isinstance(a, torch.Tensor) else scalar(a, compute)
            for a in args
        ]
        return found

    def _shadow(self, t: torch.Tensor, found: ShadowInputs, lazy: bool) -> Any:
        """``t``'s shadow (None where ``lazy`` and ``t`` is exact); notes what it found."""
        if t.dtype not in self.shadowable:
            return t
        found.any_float = True
        ent = self.store.lookup(t)
        if ent is None:
            return None if lazy else t.to(self.dtype)
        found.has_shadow = True
        found.cause = found.cause or ent[2]
        if not ent[1] <= found.err:  # (a NaN bound replaces the maximum)
            found.err = ent[1]
        return ent[0]

    def fill(self, args: tuple[Any, ...], sargs: list[Any]) -> list[Any]:
        """``sargs`` with the upcasts that :meth:`inputs` skipped (``lazy``) filled in."""

        def upcast(a: Any, s: Any) -> Any:
            return a.to(self.dtype) if s is None and isinstance(a, torch.Tensor) else s

        return map_pairs(upcast, args, sargs)

    def kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Shadows of keyword arguments (float constants enter as float32)."""
        if not kwargs:
            return kwargs

        def shadow(t: torch.Tensor) -> torch.Tensor:
            if t.dtype not in self.shadowable:
                return t
            ent = self.store.get(t)
            return ent[0] if ent is not None else t.to(self.dtype)

        mapped = map_tensor_kwargs(shadow, kwargs)
        return {k: self._scalar(v, True) for k, v in mapped.items()}

    def put(
        self,
        reals: list[Any],
        shadows: list[Any],
        err: float,
        *,
        only_missing: bool = False,
        cause: str | None = None,
    ) -> None:
        """Record the shadows of results that need no measuring (exact ops, views);
        ``only_missing``: keep the shadows that results already have."""
        for r, s in zip(reals, shadows, strict=False):
            if (
                isinstance(r, torch.Tensor)
                and isinstance(s, torch.Tensor)
                and r.dtype in self.shadowable
                and not (only_missing and self.store.get(r) is not None)
            ):
                self.store.put(r, s, err, cause=cause)

    def aliased(self, base: torch.Tensor, out: Any) -> bool:
        """Do the outputs of a view of ``base`` need nothing from us: ``base`` is not of a
        shadowed dtype, its storage has no shadow, or a whole shadow that they share (same
        storage and dtype)? Cost: one table probe, no shadow materialized."""
        if base.dtype not in self.shadowable:
            return True
        state = self.store.state(base)
        if state == NONE:
            return True  # no shadow to view: the views are exact too
        if state == PARTIAL:
            return False
        st = base.untyped_storage()._cdata
        outs = (out,) if isinstance(out, torch.Tensor) else tensors(out)
        return all(o.dtype == base.dtype and o.untyped_storage()._cdata == st for o in outs)

    def views(
        self,
        func: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        inputs: ShadowInputs,
        out: Any,
    ) -> None:
        """Shadows of a view op's outputs. They alias an input's storage, so their shadows are
        views of its flat shadow, derived on lookup; only a partially shadowed storage needs
        the op re-run on the shadows. (A dtype-reinterpreting view has no shadow.)"""
        base = args[0] if args and isinstance(args[0], torch.Tensor) else None
        missing = [
            o for o in tensors(out) if o.dtype in self.shadowable and self.store.get(o) is None
        ]
        if not missing or base is None or any(o.dtype != base.dtype for o in missing):
            return
        sargs = self.fill(args, inputs.args)
        try:
            sout = func(*sargs, **self.kwargs(kwargs))
        except Exception:
            return
        self.put(leaves(out), leaves(sout), inputs.err, only_missing=True, cause=inputs.cause)
