"""The elementwise passes that compare a real result with its float64 shadow (private).

:meth:`Measurer._suspicious <mixprec.sanitizer.measurement.Measurer>` asks three questions of a
result ``r`` and its shadow ``s``; each is one pass here:

* :meth:`Passes.max_pass`: ``max|f32(s) - r|`` and ``max|f32(s)|`` (float32), whether any of
  those differences is not finite, whether any ``s`` is non-zero;
* :meth:`Passes.ratio32`: ``max |f32(s) - r| / max(|f32(s)|, floor)`` in float32;
* :meth:`Passes.ratio64`: the same in float64 with ``floor = max(max|s| * frac, tiny)``;

and, for the rare result where ``r`` or ``s`` holds inf or NaN, :meth:`Passes.nonfinite`: the
float64 differences with the non-finite values that agree (the same inf, or both NaN) taken as
exact.

Two implementations compute the same numbers: the C kernel ``mixprec.sanitizer._checks`` (one
fused pass each, no temporaries; float32/bfloat16 CPU results laid out like their shadows) and
torch (any device, layout and dtype: four to six elementwise passes with temporaries). The
kernel also bins gradients for the histograms (:func:`grad_stats`).
"""

from __future__ import annotations

import math

import torch

try:
    from mixprec.sanitizer import _checks
except ImportError:  # built without a C compiler: the torch passes serve
    _checks = None

_C_KINDS = {torch.float32: 0, torch.bfloat16: 1}
# tensors whose data_ptr is their data (not wrapper subclasses: DTensor, fake, functional)
_PLAIN = (torch.Tensor, torch.nn.Parameter)
# ... nor torch.func's wrappers (grad, vmap), which are of the plain type but hold no memory
is_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def _plain(t: torch.Tensor) -> bool:
    return type(t) in _PLAIN and not is_functorch_wrapped(t)


def unwrap_functorch(t: torch.Tensor) -> torch.Tensor:
    """The tensor under torch.func's wrappers of ``t`` (``t`` itself when unwrapped): under
    ``vmap`` the whole batch, values the gradient statistics can read without a per-sample
    ``.item()`` (which vmap refuses)."""
    while is_functorch_wrapped(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t


def has_c_passes() -> bool:
    """Was the sanitizer's C kernel built (else every pass runs as torch ops)?"""
    return _checks is not None


class Passes:
    """The comparison passes over one (real, shadow) pair; see the module docstring."""

    def max_pass(self) -> tuple[float, float, bool, bool]:
        raise NotImplementedError

    def ratio32(self, floor: float) -> float:
        raise NotImplementedError

    def ratio64(self, frac: float, tiny: float) -> float:
        raise NotImplementedError

    def nonfinite(self, frac: float, tiny: float) -> tuple[float, float, float, bool]:
        """(``max d``, ``max |s|`` over finite ``s``, ``max d / max(|s|, floor)``, every ``r``
        finite?) with ``d = |r - s|`` in float64, 0 where ``r`` and ``s`` agree (equal, or both
        NaN), and ``floor = max(max|s| * frac, tiny)``. The two maxima of ``d`` are NaN where
        some ``d`` is (one of ``r``, ``s`` NaN), as torch's ``amax`` makes them."""
        raise NotImplementedError


class CPasses(Passes):
    """The passes in the C kernel: each one call, one pass over ``r`` and ``s``, no sync."""

    __slots__ = ("args", "s")

    def __init__(self, r: torch.Tensor, s: torch.Tensor) -> None:
        self.args = (r.data_ptr(), _C_KINDS[r.dtype], s.data_ptr(), r.numel())
        self.s = s

    def max_pass(self) -> tuple[float, float, bool, bool]:
        dm, sm, bad = _checks.max_pass(*self.args)
        # any s != 0 matters only where float32(s) is all zero (rare): then one torch pass
        return dm, sm, bad, sm != 0 or bad or bool(self.s.any())

    def ratio32(self, floor: float) -> float:
        return _checks.ratio32(*self.args, floor)

    def ratio64(self, frac: float, tiny: float) -> float:
        return _checks.ratio64(*self.args, frac, tiny)

    def nonfinite(self, frac: float, tiny: float) -> tuple[float, float, float, bool]:
        return _checks.nonfinite(*self.args, frac, tiny)


class TorchPasses(Passes):
    """The passes as torch ops (any device and layout). ``max_pass`` keeps ``f32(s) - r`` for
    ``ratio32``; each pass ends in one host sync."""

    def __init__(self, r: torch.Tensor, s: torch.Tensor) -> None:
        self.r, self.s = r, s
        self.d32: torch.Tensor | None = None

    def max_pass(self) -> tuple[float, float, bool, bool]:
        r, s = self.r, self.s
        s32 = s.float()
        smin, smax = torch.aminmax(s32)
        self.d32 = s32.sub_(r if r.dtype == torch.float32 else r.float())  # one temporary
        dmin, dmax = torch.aminmax(self.d32)
        dn, dx, sn, sx = torch.stack((dmin, dmax, smin, smax)).tolist()
        dm, sm = max(-dn, dx), max(-sn, sx)
        bad = not (math.isfinite(dm) and math.isfinite(sm))
        nonzero = bool(s.any()) if sm == 0 else True
        return dm, sm, bad, nonzero

    def ratio32(self, floor: float) -> float:
        if self.d32 is None:
            self.max_pass()
        den = self.s.float().abs_().clamp_(min=floor)
        return float(torch.abs(self.d32).div_(den).amax())

    def ratio64(self, frac: float, tiny: float) -> float:
        a = self.s.abs()
        floor = (a.amax() * frac).clamp_(min=tiny)
        return float(torch.sub(self.r, self.s).abs_().div_(a.clamp_(min=floor)).amax())

    def nonfinite(self, frac: float, tiny: float) -> tuple[float, float, float, bool]:
        r, s = self.r, self.s
        rs = r.to(s.dtype)
        same = (rs == s) | (torch.isnan(rs) & torch.isnan(s))
        a = torch.where(torch.isfinite(s), s.abs(), 0.0)
        sm = float(a.amax())
        d = torch.where(same, 0.0, torch.sub(rs, s).abs_())
        dm = float(d.amax())
        floor = torch.tensor(max(sm * frac, tiny), dtype=a.dtype, device=a.device)
        rmax = float(d.div_(torch.maximum(a, floor)).amax())
        return dm, sm, rmax, bool(torch.isfinite(r).all())


def pick(r: torch.Tensor, s: torch.Tensor) -> Passes:
    """The C passes where they apply (float32/bfloat16 ``r`` and float64 ``s`` of one shape on
    the CPU, plain tensors, both contiguous or both :func:`dense` with the same strides), else
    the torch ones."""
    if (
        _checks is not None
        and _plain(r)
        and _plain(s)
        and r.dtype in _C_KINDS
        and s.dtype == torch.float64
        and r.is_cpu
        and s.is_cpu
        and r.layout == torch.strided
        and s.layout == torch.strided
        and r.shape == s.shape
        and ((r.is_contiguous() and s.is_contiguous()) or (r.stride() == s.stride() and dense(r)))
    ):
        return CPasses(r, s)
    return TorchPasses(r, s)


def dense(t: torch.Tensor) -> bool:
    """Do ``t``'s elements fill ``t.numel()`` consecutive memory slots from ``t.data_ptr()``
    (contiguous up to a permutation of its dimensions: a transposed or permuted result)? Two
    such tensors with the same strides pair up element by element in memory order."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted(zip(t.stride(), t.shape, strict=True)):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def grad_stats(g: torch.Tensor, counts: torch.Tensor, step: int) -> float | None:
    """Add the biased-exponent counts of every ``step``-th element of float32 / float64 ``g``
    (contiguous or :func:`dense`: taken in memory order) into the int64 ``counts`` and return
    the largest finite ``|g|`` (0.0: none), in one C pass and without any torch op (so no
    dispatch: safe in a gradient hook under the sanitizer's mode). None (nothing done) where
    the kernel does not apply."""
    if not (
        _checks is not None
        and _plain(g)
        and g.dtype in (torch.float32, torch.float64)
        and g.is_cpu
        and counts.is_cpu
        and g.layout == torch.strided
        and dense(g)  # its elements fill [data_ptr, data_ptr + numel): all strides positive
        and counts.is_contiguous()
        and counts.dtype == torch.int64
        and counts.numel() == (2048 if g.dtype == torch.float64 else 256)
    ):
        return None
    width = 64 if g.dtype == torch.float64 else 32
    return _checks.grad_stats(g.data_ptr(), width, g.numel(), step, counts.data_ptr())
