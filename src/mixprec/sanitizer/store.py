"""The sanitizer's shadow side table, kept per *storage* (private).

Keys are storages, not Python tensors: autograd hands saved tensors back to backward ops as
fresh Python objects (often fresh views) over the same storage, and those must find their
shadows. A weak storage reference per entry (what torch's ``StorageWeakRef`` holds) keeps
the storage's C++ object (not its memory) allocated, so its address cannot be reused by
another storage while the entry exists: the address is a safe key. Entries of dead storages
are dropped by :meth:`ShadowStore.sweep`.

When a shadow covers a whole storage (the usual case: an op's output), it is kept as one
float64 tensor laid out like the storage (possibly shared: a copy's shadow is its source's,
copied on the first partial write), and the shadow of *any* view of that storage is a view
of it (``as_strided`` with the real view's geometry): view ops cost nothing and in-place updates
of a view write into the flat shadow. Otherwise (a shadow for a part of a storage only) it is
kept per exact view geometry.

Memory: while the flat float64 shadows together hold more than ``budget`` bytes, a flat shadow
that stays alive for ``compress_after`` insertions (typically an activation saved for backward)
is compressed to a float32 *residual* ``shadow - real``: the shadow is rebuilt as
``real + residual`` in float64 when next used. Below the budget nothing is compressed: a
compression and its rebuild cost three passes over the tensor, about a third of a small
model's sanitized step. The residual holds 24 bits of
the difference, so the rebuilt shadow keeps ~24 bits more than the real value (~48 bits for
float32 data) while costing 4 instead of 8 bytes per element. Entries with a large or
non-finite error, or tiny magnitudes (residual underflow), stay in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from mixprec.sanitizer.passes import dense

_COMPRESS_MAX_ERR = 2.0**20  # error bound (floor units) above which we keep float64
_COMPRESS_MIN_MAG = 2.0**-90  # below this max|shadow| the residual could underflow float32
_NEVER = 1 << 62  # ``born`` of an entry that is never compressed
NONE, WHOLE, PARTIAL = 0, 1, 2  # what a storage's entry holds (ShadowStore.state)
# torch's StorageWeakRef, without its Python object per entry: a weak reference is an int
_expired = torch.UntypedStorage._expired  # type: ignore[attr-defined]
_free_weak_ref = torch.UntypedStorage._free_weak_ref  # type: ignore[attr-defined]


def _covers(t: torch.Tensor, n: int) -> bool:
    """Does ``t`` address every element of its ``n``-element storage exactly once?"""
    return t.storage_offset() == 0 and t.numel() == n and dense(t)


@dataclass(slots=True)
class _Entry:
    wref: int  # a weak reference to the storage (torch's StorageWeakRef.cdata), freed in __del__
    dtype: torch.dtype
    n: int  # storage length in elements of dtype
    flat: torch.Tensor | None = None  # float64, n elements in storage, laid out like the real
    resid: torch.Tensor | None = None  # float32 residual instead of flat (compressed)
    err: float = 0.0
    smax: float | None = None  # max |shadow| over the storage (float32-rounded, rounded up)
    born: int = 0
    cause: str | None = None  # label of the finding whose error this storage carries
    origin: Any = None  # the op call that computed it (for root causes found after the fact)
    # partial shadows by view geometry (None: none; most entries are whole-storage ones)
    views: dict[tuple, tuple[torch.Tensor, float]] | None = None

    def __del__(self, _free: Any = _free_weak_ref) -> None:  # bound early: safe at shutdown
        _free(self.wref)


class ShadowStore:
    """Shadow side table; see the module docstring. Every method is O(1) but ``sweep``."""

    def __init__(
        self,
        shadow_dtype: torch.dtype | None = torch.float64,
        compress_after: int = 4,
        sweep_every: int = 8,
        budget: float = 0.0,
    ) -> None:
        # shadow_dtype None: keep shadows as given (boolean decision shadows), never compress
        self.shadow_dtype = shadow_dtype
        self.compress_after = compress_after
        self.sweep_every = sweep_every
        self.budget = budget  # bytes of flat float64 shadows kept before compressing any
        self._map: dict[int, _Entry] = {}
        self._puts = 0
        self._swept = 0  # _puts at the last sweep
        self.compressed = 0  # statistics
        self.rebuilt = 0

    # -- helpers -------------------------------------------------------------------------
    @staticmethod
    def _storage(t: torch.Tensor) -> torch.UntypedStorage | None:
        try:
            return t.untyped_storage()
        except (RuntimeError, NotImplementedError, TypeError):  # sparse, nested, no storage
            return None

    def _real_flat(self, e: _Entry) -> torch.Tensor | None:
        st = torch.UntypedStorage._new_with_weak_ptr(e.wref)
        if st is None:
            return None
        return torch.empty(0, dtype=e.dtype, device=st.device).set_(st, 0, (e.n,), (1,))

    def _materialize(self, e: _Entry) -> torch.Tensor | None:
        """The flat float64 shadow of a full entry (rebuilt from the residual if compressed)."""
        if e.flat is None and e.resid is not None:
            real = self._real_flat(e)
            if real is None:
                return None
            e.flat = real.to(self.shadow_dtype).add_(e.resid)
            e.resid = None
            e.born = self._puts  # recently used: do not recompress at once
            self.rebuilt += 1
        return e.flat

    # -- API -----------------------------------------------------------------------------
    def get(self, t: torch.Tensor) -> tuple[torch.Tensor, float] | None:
        """(shadow, error bound) of ``t``, or None when ``t`` is taken as exact."""
        found = self.lookup(t)
        return None if found is None else (found[0], found[1])

    def lookup(self, t: torch.Tensor) -> tuple[torch.Tensor, float, str | None] | None:
        """(shadow, error bound, cause) of ``t``; ``cause`` labels the finding whose error
        ``t``'s storage carries (None: none). None when ``t`` is taken as exact."""
        st = self._storage(t)
        if st is None:
            return None
        e = self._map.get(st._cdata)
        if e is None or e.dtype != t.dtype:
            return None
        flat = e.flat
        if (
            flat is not None
            and t.storage_offset() == 0
            and flat.shape == t.shape
            and flat.stride() == t.stride()
        ):
            return flat, e.err, e.cause  # the op's own shadow output, kept as it was
        if flat is not None or e.resid is not None:
            flat = self._materialize(e)
            if flat is None:
                return None
            return flat.as_strided(t.shape, t.stride(), t.storage_offset()), e.err, e.cause
        v = e.views.get((t.storage_offset(), t.shape, t.stride())) if e.views else None
        return None if v is None else (v[0], v[1], e.cause)

    def state(self, t: torch.Tensor) -> int:
        """What ``t``'s storage has: ``NONE`` (no shadow of ``t``'s dtype), ``WHOLE`` (a shadow
        of the whole storage: every view has one, derived on lookup) or ``PARTIAL``. Cheap: no
        shadow is materialized."""
        st = self._storage(t)
        e = None if st is None else self._map.get(st._cdata)
        if e is None or e.dtype != t.dtype:
            return NONE
        return WHOLE if e.flat is not None or e.resid is not None else PARTIAL

    def origin(self, t: torch.Tensor) -> Any:
        """What :meth:`put` was given as ``origin`` for ``t``'s storage (None: unknown)."""
        st = self._storage(t)
        e = None if st is None else self._map.get(st._cdata)
        return None if e is None or e.dtype != t.dtype else e.origin

    def set_cause(self, t: torch.Tensor, cause: str) -> None:
        """``t``'s storage now carries the error of the finding labelled ``cause``."""
        st = self._storage(t)
        e = None if st is None else self._map.get(st._cdata)
        if e is not None:
            e.cause = cause

    def whole(self, t: torch.Tensor) -> tuple[torch.Tensor, float | None] | None:
        """(flat shadow, max |shadow| if known) of ``t``'s storage where ``t`` covers all of it
        (offset 0, every element once, in any order): the same values as ``t``'s shadow, in
        storage order. For order-free uses (a histogram): no view is built, so no torch op runs
        (a compressed shadow is rebuilt, as on any lookup). None otherwise."""
        st = self._storage(t)
        e = None if st is None else self._map.get(st._cdata)
        if e is None or e.dtype != t.dtype or not _covers(t, e.n):
            return None
        flat = self._materialize(e)
        return None if flat is None else (flat, e.smax)

    def _flat(self, t: torch.Tensor, shadow: torch.Tensor, n: int) -> torch.Tensor:
        """``shadow`` of ``t`` (which covers its ``n``-element storage) laid out like ``t``'s
        storage: offset 0, ``t``'s strides, ``n`` elements in its storage."""
        if self.shadow_dtype is not None and shadow.dtype != self.shadow_dtype:
            shadow = shadow.to(self.shadow_dtype)
        if (
            shadow.stride() == t.stride()
            and shadow.storage_offset() == 0
            and shadow.untyped_storage().nbytes() == n * shadow.element_size()
        ):
            # same layout: keep it as it is, no copy (any shape: every use goes through
            # as_strided on its storage)
            return shadow
        flat = torch.empty(n, dtype=shadow.dtype, device=shadow.device)
        flat.as_strided(t.shape, t.stride(), 0).copy_(shadow)
        return flat

    def put(
        self,
        t: torch.Tensor,
        shadow: torch.Tensor,
        err: float = 0.0,
        smax: float | None = None,
        cause: str | None = None,
        origin: Any = None,
    ) -> None:
        """Record ``shadow`` for ``t``. ``err`` bounds ``max|t - shadow|`` in units of the
        tensor's noise floor; ``smax`` is ``max|shadow|`` if known; ``cause`` labels the
        finding whose error ``t`` carries (kept by a partial update that has none)."""
        st = self._storage(t)
        if st is None:
            return
        cd = st._cdata
        itemsize = t.element_size()
        n = st.nbytes() // itemsize if itemsize else 0
        e = self._map.get(cd)
        if e is not None and (e.dtype != t.dtype or e.n != n or _expired(e.wref)):
            e = None
        if _covers(t, n):
            flat = self._flat(t, shadow, n)
            if e is None:  # the usual case, an op's fresh output: one constructor call
                self._map[cd] = _Entry(
                    st._weak_ref(), t.dtype, n, flat, None, err, smax, self._puts, cause, origin
                )
            else:
                e.flat, e.resid, e.err, e.smax, e.born = flat, None, err, smax, self._puts
                e.cause, e.origin = cause, origin
                e.views = None
        elif e is not None and (e.flat is not None or e.resid is not None):
            flat = self._materialize(e)
            if flat is None:
                return
            # copy on write: a flat shadow's storage may be shared (a copy's shadow is its
            # source's); 2 = e.flat + this call's storage object
            if torch._C._storage_Use_Count(flat.untyped_storage()._cdata) > 2:
                flat = e.flat = flat.clone()
            flat.as_strided(t.shape, t.stride(), t.storage_offset()).copy_(shadow)
            e.err = max(e.err, err)
            e.cause = e.cause or cause
            e.origin = origin or e.origin
            e.smax = None if smax is None or e.smax is None else max(e.smax, smax)
        else:
            if e is None:
                e = self._map[cd] = _Entry(st._weak_ref(), t.dtype, n)
            # a partial shadow: other partial shadows of this storage may overlap, drop them
            e.views = {(t.storage_offset(), t.shape, t.stride()): (shadow, err)}
            e.cause, e.origin = cause, origin
        self._puts += 1
        # amortized O(1) per put: a sweep walks every entry, so sweep once per len/4 puts (dead
        # entries keep their shadows at most that much longer)
        if self._puts - self._swept >= max(self.sweep_every, len(self._map) >> 2):
            self.sweep()

    def invalidate(self, t: torch.Tensor) -> None:
        """Forget every shadow of ``t``'s storage (after a mutation we could not shadow)."""
        st = self._storage(t)
        if st is not None:
            self._map.pop(st._cdata, None)

    def sweep(self) -> None:
        """Drop entries of dead storages; while the flat shadows exceed the budget, compress
        those older than compress_after (oldest first)."""
        self._swept = self._puts
        m = self._map
        for cd in [cd for cd, e in m.items() if _expired(e.wref)]:
            del m[cd]
        if self.budget == math.inf or self.shadow_dtype != torch.float64:
            return
        # elements of the flat shadows (float64 when compressing is possible)
        flat_n = sum(e.n for e in m.values() if e.flat is not None)
        old = self._puts - self.compress_after
        for e in list(m.values()):  # insertion order: oldest storages first
            if flat_n * 8 <= self.budget:
                break
            if e.born <= old and e.flat is not None and self._compress(e):
                flat_n -= e.n

    def _compress(self, e: _Entry) -> bool:
        """Replace ``e``'s flat shadow by its float32 residual; False where it must stay."""
        if not (e.err <= _COMPRESS_MAX_ERR) or e.smax is None:
            # for good: a partial update only raises err and keeps smax None (a whole new
            # shadow resets born); skipping it saves a check per sweep
            e.born = _NEVER
            return False
        if not (e.smax >= _COMPRESS_MIN_MAG and math.isfinite(e.smax)):
            return False
        flat = e.flat
        # 2 = the flat tensor itself + the temporary storage object of this call
        if flat is None or torch._C._storage_Use_Count(flat.untyped_storage()._cdata) > 2:
            return False  # someone else (an op's shadow output still in use) shares it: keep
        real = self._real_flat(e)
        if real is None:
            return False
        e.resid = torch.empty(e.n, dtype=torch.float32, device=flat.device)
        # computed in float64, stored as float32
        torch.sub(flat.as_strided((e.n,), (1,), 0), real, out=e.resid)
        e.flat = None
        self.compressed += 1
        return True

    def clear(self) -> None:
        self._map.clear()

    def __len__(self) -> int:
        return len(self._map)
