"""Numerically stable special functions, accurate in every dtype and with correct gradients.

Each function accepts float64, float32, float16 and bfloat16 tensors (integer tensors are
promoted to the default dtype, Python numbers become tensors) and returns the input's dtype.
Internally the formula runs in float64 and the result is rounded once, so for float32 and
narrower the error is at most half an ulp plus a hair (the ULP audit in ``docs/stable.md`` and
``benchmarks/ulp_audit.py`` measures it against mpmath); float64 inputs use the same careful
formulas (a few ulps). On CPU the float64 work is done in cache-sized chunks, which keeps the
functions about as fast as the naive expressions they replace (see :mod:`mixprec.stable.core`).

Gradients are analytic (``torch.autograd.Function``), evaluated in float64 from the saved inputs,
and finite wherever the true derivative is; they are themselves differentiable (double backward
works). Conventions at the edges, all of them limits of the mathematical function:

* ``logsumexp`` / ``log_softmax`` of a slice whose entries are all ``-inf`` (or all masked out)
  is ``-inf`` with a **zero** gradient (the value stays ``-inf`` under any finite perturbation);
* ``logaddexp(-inf, -inf) = -inf`` (and ``(inf, inf) -> inf``) with zero gradients;
* ``xlogy(0, y) = 0`` and ``xlog1py(0, y) = 0`` for every non-NaN ``y`` (including ``0`` and
  ``inf``), with ``d/dy = 0`` there.

Cost of every function: one read of each input and one write of the output, float64
buffers of ``CHUNK`` elements per thread on CPU. Rare cases (a result that cancels to ~0, a
``log1mexp`` argument within 2^-27 of 0, ...) are detected with one reduction per chunk (for
``logsumexp``, ``log_softmax`` and ``logcosh``: on the per-row or per-segment statistics, once
per call) and fixed up on the affected entries only. On a GPU the kernels take the branch-free
forms instead, except ``logaddexp`` and ``logsumexp``, whose cancellation check is one device
synchronisation per call.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor

from mixprec.quantization.autograd_rounding import forward_mode
from mixprec.stable.core import (
    LN2,
    WIDE,
    Workspace,
    as_float,
    check_dim,
    float_pair,
    map_elementwise,
    map_elementwise_stats,
    map_rows,
    map_rows_multi,
    rows_view,
)
from mixprec.stable.double_double import dd_add, dd_exp, dd_expm1, dd_sum_rows, two_sum
from mixprec.stable.lambert import lambertw_and_1p

# Rows whose float64 log-sum is below this are recomputed with the slower exact formula (see
# _logsumexp_fast): above it, the plain formula's absolute error (a few 2^-53) is below
# 2^-30 relative to the result, invisible after rounding to float32 or narrower.
_FAST_LSE_MIN = 2.0**-20


# --------------------------------------------------------------------------------------------
# float64 kernels (no autograd; inputs and outputs are float64 tensors, may be modified)
# Written with few comparisons/where's: on CPU those cost as much as a cheap transcendental.
# --------------------------------------------------------------------------------------------
def _softplus_k(ws: Workspace, x: Tensor, beta: float = 1.0, exact: bool = True) -> Tensor:
    if not exact:
        # torch's fused float64 softplus returns x above beta * x = 20, off by e^-20 / 20 ~ 2^-33
        # relative: invisible after rounding to float32 or narrower. One pass, in place.
        return _softplus_(x, beta)
    if beta != 1.0:
        x.mul_(beta)
    # max(x, 0) + log1p(e^-|x|): no overflow, no cancellation, exact limits at +-inf (the
    # fused softplus of a non-positive argument is exactly log1p(exp(.)))
    t = _softplus_(torch.abs(x, out=ws.f(1)).neg_())
    x.clamp_min_(0.0).add_(t)
    return x.div_(beta) if beta != 1.0 else x


def _softplus_(x: Tensor, beta: float = 1.0) -> Tensor:
    """torch's fused ``log1p(exp(beta x)) / beta`` (``x`` above ``beta x = 20``), in place."""
    return torch._C._nn.softplus(x, beta, 20.0, out=x)


def _log_sigmoid_k(ws: Workspace, x: Tensor, exact: bool = True) -> Tensor:
    if not exact:  # -softplus(-x); see _softplus_k for the threshold
        return _softplus_(x.neg_()).neg_()
    # min(x, 0) - log1p(e^-|x|)
    t = _softplus_(torch.abs(x, out=ws.f(1)).neg_())
    return x.clamp_max_(0.0).sub_(t)


def _log1mexp_k(ws: Workspace, x: Tensor, exact: bool) -> Tensor:
    """``log(1 - e^x)``.

    ``exact=True`` (float64): Maechler (2012): ``log(-expm1(x))`` is accurate for ``x > -ln 2``
    (``1 - e^x`` is small, expm1 keeps its digits), ``log1p(-exp(x))`` for ``x < -ln 2`` (``e^x``
    is small, log1p keeps it). ``exact=False`` (result rounded to float32 or narrower):
    ``log1p(-exp(x))`` everywhere. Near 0 that loses only ``eps64 / |x|`` relative in
    ``1 - e^x``, which the log damps to ``eps64 / (|x| |log|x||)``: below 2^-30 for
    ``|x| > 2^-27``. Chunks holding any ``x`` above ``-2^-27`` (found with one max-reduction)
    switch those entries to ``log(-expm1(x))``. Half the transcendentals of the two-branch form.
    """
    far = torch.exp(x, out=ws.f(1)).neg_().log1p_()
    if exact or x.device.type != "cpu":  # (the check below would be a GPU sync)
        switch = -LN2
    elif x.numel() and bool(x.max() > -(2.0**-27)):
        switch = -(2.0**-27)
    else:
        return far
    near = torch.expm1(x, out=ws.f(2)).neg_().log_()
    return torch.where(torch.gt(x, switch, out=ws.b(0)), near, far, out=far)


def _log1p_f64(y: Tensor) -> Tensor:
    # torch's float64 log1p returns 0 for negative subnormals (CPU); log1p(y) = y there
    return torch.where(y.abs() < 1e-300, y, torch.log1p(y))


def _xlogy_k(ws: Workspace, x: Tensor, y: Tensor, log: Callable[..., Tensor]) -> Tensor:
    """``x * log(y)`` with ``0 * log(y) = 0`` for every non-NaN ``y``.

    ``x * log(y)`` already is right except where ``x == 0`` meets ``log(y) = +-inf`` or NaN
    (``y`` = 0, inf, out of domain): those products are NaN. One sum over the chunk (NaN or
    inf if any entry is) tells whether a chunk needs the fix-up at all.
    """
    out = log(y, out=ws.f(2)).mul_(x)
    if x.device.type != "cpu" or not bool(torch.isfinite(out.sum())):
        fix = (x == 0) & ~torch.isnan(y)
        out = out.masked_fill_(fix, 0.0)
    return out


def _log1p_f64_out(y: Tensor, out: Tensor) -> Tensor:
    return torch.where(y.abs() < 1e-300, y, torch.log1p(y), out=out)


# A result below this fraction of |max| has lost more than a few float64 digits to cancellation
# (log(e^x + e^y) ~ 0): recomputed in double-double. For float32 and narrower, 2^-23 keeps the
# plain formula's error below 0.05 ulp; for float64 any cancellation shows (|out| < |m|).
_CANCEL = {True: 1.0, False: 2.0**-23}


def _may_cancel(out: Tensor, exact: bool) -> bool:
    """Cheap pre-check (one reduction): cancellation needs ``|out| < c |m|`` with ``|m|`` at
    most ~1 for two terms (``log n`` for ``n``), so ``min |out| >= c * 8`` rules it out."""
    if out.numel() == 0:
        return False
    return not bool(torch.abs(out).amin() >= _CANCEL[exact] * 8.0)  # NaN: look closer


def _cancelling(out: Tensor, m: Tensor, exact: bool, max_abs_m: float = 1.0) -> Tensor | None:
    """Boolean mask of the entries of ``out = m + log1p(...)`` that cancelled, or None if none.

    One cheap reduction decides (``|m| * c - |out| > 0`` needs ``m < 0``, and ``m > -1 - ln 2``
    as ``|out| >= |m| - ln 2``): the mask is built only for chunks that have such an entry (or a
    NaN, e.g. from -inf inputs). Only entries with ``|m| < max_abs_m`` are flagged (the
    double-double ``expm1`` series is accurate for ``|m| <= 1``).
    """
    f = m.abs().mul_(_CANCEL[exact]).sub_(out.abs())
    if f.numel() == 0 or bool(f.amax() <= 0):  # NaN compares False: take the slow look
        return None
    # |out| < 0.5 too: the double-double form log1p(e^out - 1) is for results near 0 (a float64
    # row with m = -69, out = -69.4 also has |out| < |m| but nothing cancels there)
    mask = (f > 0) & (m > -max_abs_m) & (out.abs() < 0.5)
    return mask if bool(mask.any()) else None


def _logaddexp_dd(m: Tensor, o: Tensor) -> Tensor:
    """``log(e^m + e^o)`` near 0, as ``log1p(expm1(m) + e^o)`` in double-double."""
    s = dd_add(dd_expm1(m), dd_exp(o.clamp_min(-1000.0)))
    return torch.log1p(s[0] + s[1])


def _logaddexp_k(ws: Workspace, x: Tensor, y: Tensor, exact: bool = False) -> Tensor:
    # torch's fused float64 logaddexp: max + log1p(exp(-|x - y|)), and the right limits for
    # equal infinities; then the cancelling entries (result ~ 0) are redone in double-double
    out = torch.logaddexp(x, y, out=ws.f(2))
    if _may_cancel(out, exact):
        cancel = _cancelling(out, torch.maximum(x, y), exact)
        if cancel is not None:
            idx = cancel.reshape(-1).nonzero().squeeze(1)
            mf = torch.maximum(x, y).reshape(-1)[idx]
            of = torch.minimum(x, y).reshape(-1)[idx]
            out.reshape(-1)[idx] = _logaddexp_dd(mf, of)
    return out


def _logsumexp_exact_rows(x: Tensor) -> Tensor:
    """Row-wise logsumexp of a float64 ``(r, n)`` block, result ``(r, 1)``, full accuracy.

    ``m + log1p(s')`` where ``s'`` is the sum over the row *excluding one* maximal entry: the
    dominant term's ``1`` never swamps the others, so ``logsumexp([0, -46]) = 1.05e-20`` comes
    out right (``log(1 + 1e-20)`` would be 0). The count of maximal entries minus one is added
    back exactly.
    """
    m = x.amax(dim=1, keepdim=True)
    finite = torch.isfinite(m)
    m_safe = torch.where(finite, m, 0.0)
    eq = x == m
    e = _exp_diff(x, m_safe).masked_fill_(eq, 0.0)
    s = e.sum(dim=1, keepdim=True).add_(eq.sum(dim=1, keepdim=True).sub_(1))  # (k-1) exact
    out = s.log1p_().add_(m_safe)
    return torch.where(finite, out, m)  # -inf (empty / all -inf), +inf, NaN pass through


def _exp_diff(x: Tensor, m: Tensor) -> Tensor:
    """``exp(x - m)`` with the rounding error of ``x - m`` (two-sum) added back to first order.

    For float32-and-narrower inputs ``x - m`` is exact in float64 and the correction is 0; for
    float64 inputs it saves up to ``|x - m| * 2^-53`` relative (~70 ulps of a tiny log_softmax
    at ``x - m = -100``).
    """
    d, err = two_sum(x, -m)
    return torch.exp(d).mul_(err.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0).add_(1.0))


def _logsumexp_dd_rows(x: Tensor) -> Tensor:
    """Row-wise logsumexp near 0: ``log1p(expm1(m) + sum of the other e^x)`` in double-double."""
    m, first = x.max(dim=1, keepdim=True)
    e = dd_exp(x.clamp_min(-1000.0))  # e^-1000 = 0: -inf entries drop out
    # e^m - 1: the series for |m| <= 1; beyond, e^m - 1 has no cancellation (n > 2 terms can
    # cancel against m down to -log(n))
    small = dd_expm1(m.clamp(-1.0, 1.0))
    big = dd_add(dd_exp(m), (torch.full_like(m, -1.0), torch.zeros_like(m)))
    near = m.abs() <= 1.0
    em1 = (torch.where(near, small[0], big[0]), torch.where(near, small[1], big[1]))
    hi = e[0].scatter(1, first, em1[0])
    lo = e[1].scatter(1, first, em1[1])
    s = dd_sum_rows((hi, lo))
    return torch.log1p(s[0] + s[1])


def _logsumexp_exact_k(ws: Workspace, x: Tensor) -> Tensor:
    """Row-wise logsumexp of a float64 block (float64 inputs; any dtype on a GPU): the log1p
    form of :func:`_logsumexp_exact_rows`, then double-double for the rows that cancelled."""
    m = x.amax(dim=1, keepdim=True)
    out = _logsumexp_exact_rows(x)
    smallest = float(out.abs().amin()) if out.numel() else math.inf
    return _lse_redo_cancelled(out, m, x.__getitem__, exact=True, smallest=smallest)


def _lse_stats_k(ws: Workspace, x: Tensor, m_dst: Tensor, s_dst: Tensor) -> None:
    """Per row of a float64 block: the maximum ``m`` into ``m_dst`` and ``sum(exp(x - m))``
    into ``s_dst`` (each ``(r, 1)``).

    Four passes over the block, in place: the log, the add and every check run once per call
    on the ``(rows, 1)`` statistics (see :func:`_logsumexp_fast`).
    """
    m = torch.amax(x, dim=1, keepdim=True, out=m_dst)
    torch.sum(x.sub_(m).exp_(), dim=1, keepdim=True, out=s_dst)


def _logsumexp_fast(x2: Tensor) -> Tensor:
    """Row-wise logsumexp of float32-and-narrower ``(rows, n)`` on CPU, as float64 ``(rows, 1)``.

    ``m + log(sum(exp(x - m)))`` is accurate to a few float64 ulps *absolute*; that is far below
    a float32 ulp of the result unless the result is tiny, so only rows with ``|result| < 2^-20``
    (or a non-finite maximum) are recomputed with the log1p form (worth it: that form costs two
    comparisons and a masked fill per element), and rows where the result cancelled against the
    maximum (``logsumexp ~ 0``) in double-double. Those checks look at the per-row results only:
    a few ops per call, on ``rows`` elements.
    """
    m, s = map_rows_multi(_lse_stats_k, x2, ((1, WIDE), (1, WIDE)))
    out = s.log_().add_(m)

    def wide_rows(rows: Tensor) -> Tensor:
        return x2[rows].to(WIDE)

    # one look at the smallest |result| decides whether any row needs more work (NaN: look)
    smallest = float(out.abs().amin()) if out.numel() else math.inf
    if not smallest >= _FAST_LSE_MIN:
        redo = ~(out.abs() >= _FAST_LSE_MIN)  # also NaN: non-finite m
        rows = redo.squeeze(1).nonzero().squeeze(1)
        out[rows] = _logsumexp_exact_rows(wide_rows(rows))
        smallest = math.nan
    return _lse_redo_cancelled(out, m, wide_rows, exact=False, smallest=smallest)


def _lse_redo_cancelled(
    out: Tensor, m: Tensor, wide_rows: Callable[[Tensor], Tensor], exact: bool, smallest: float
) -> Tensor:
    """Recompute in double-double the rows of ``out`` (``(r, 1)``, row maxima ``m``) where the
    result cancelled against the maximum; ``wide_rows(rows)`` gives those rows in float64 and
    ``smallest`` is ``min |out|`` (NaN: unknown), which usually rules the case out at once."""
    largest_m = float(m.abs().amax()) if m.numel() else 0.0
    if not smallest >= min(0.5, _CANCEL[exact] * largest_m):
        cancel = _cancelling(out, m, exact, max_abs_m=math.inf)
        if cancel is not None:
            rows = cancel.squeeze(1).nonzero().squeeze(1)
            out[rows] = _logsumexp_dd_rows(wide_rows(rows)).reshape(-1, 1)
    return out


def _log_softmax_exact_rows(x: Tensor) -> Tensor:
    """Row-wise log_softmax of a float64 ``(r, n)`` block: ``(x - m) - log1p(s')``.

    Both terms are <= 0, so nothing cancels; the maximal entry gets ``-log1p(s')`` exactly,
    which stays accurate when it is tiny (see :func:`_logsumexp_exact_rows`).
    """
    m = x.amax(dim=1, keepdim=True)
    finite = torch.isfinite(m)
    m_safe = torch.where(finite, m, 0.0)
    eq = x == m
    d = torch.sub(x, m_safe)
    e = _exp_diff(x, m_safe).masked_fill_(eq, 0.0)
    s = e.sum(dim=1, keepdim=True).add_(eq.sum(dim=1, keepdim=True).sub_(1))  # (k-1) exact
    out = d.sub_(s.log1p_())
    # all -inf (or empty): -inf everywhere; a +inf maximum: x - inf (NaN at the inf entries)
    return torch.where(finite, out, torch.where(m == -math.inf, -math.inf, x - m))


def _log_softmax_exact_k(ws: Workspace, x: Tensor) -> Tensor:
    return _log_softmax_exact_rows(x)


def _log_softmax_fast_k(ws: Workspace, x: Tensor, out_dst: Tensor, top_dst: Tensor) -> None:
    """torch's fused float64 log_softmax of a block, and each row's largest output."""
    out = torch._log_softmax(x, 1, False, out=ws.f(1).view(x.shape))
    torch.amax(out, dim=1, keepdim=True, out=top_dst)
    out_dst.copy_(out)


def _log_softmax_fast(x2: Tensor, dtype: torch.dtype) -> Tensor:
    """Row-wise log_softmax of float32-and-narrower ``(rows, n)`` on CPU, rounded to ``dtype``.

    torch's fused float64 log_softmax is ``(x - m) - log(sum(exp(x - m)))``: only the maximal
    entry can come out tiny (``-log(s)`` with ``s = 1 + tiny`` rounded), and only when
    ``log(s) < 2^-20``: such rows (and rows with a non-finite maximum) are recomputed exactly.
    ``log(s)`` is minus the row's largest output; the check runs once per call on those.
    """
    out, top = map_rows_multi(_log_softmax_fast_k, x2, ((x2.shape[1], dtype), (1, WIDE)))
    ls = top.neg_()
    redo = ~(ls >= _FAST_LSE_MIN) | ~torch.isfinite(ls)
    if bool(redo.any()):
        rows = redo.squeeze(1).nonzero().squeeze(1)
        out[rows] = _log_softmax_exact_rows(x2[rows].to(WIDE)).to(dtype)
    return out


def _logcosh_k(ws: Workspace, x: Tensor, exact: bool = True) -> Tensor:
    a = x.abs_()
    if not exact:  # (on a GPU; CPUs take _logcosh_fast_k and fix the segments afterwards)
        return _logcosh_series_where(a, _logcosh_fast(ws, a).add_(a), ws.f(2))
    # cosh(a) - 1 = E^2 / (2 (1 + E)) with E = expm1(a): no cancellation near 0, so log1p keeps
    # the x^2/2 digits. Beyond a = 20, log cosh a = log cosh 20 + (a - 20) to within 2^-57
    # relative (the neglected log1p(e^-2a) < 5e-18): clamping the argument and adding the excess
    # back avoids both the overflow of E^2 and a where(). Two transcendentals.
    ac = torch.clamp_max(a, 20.0, out=ws.f(1))
    e = torch.expm1(ac, out=ws.f(2))
    near = torch.square(e, out=ws.f(3)).div_(e.add_(1.0).mul_(2.0)).log1p_()
    return near.add_(a.sub_(ac))


# Below this |x| the float32-and-narrower logcosh takes the series (see _logcosh_fast).
_LOGCOSH_SERIES = 2.0**-9
_HALF = torch.tensor(0.5, dtype=WIDE)
# Segment length of the check for arguments below _LOGCOSH_SERIES (a divisor of CHUNK)
_SEGMENT = 128


def _logcosh_fast(ws: Workspace, a: Tensor) -> Tensor:
    """``log((1 + e^-2a) / 2)``, to which the caller adds ``a = |x|`` for ``log cosh x``.

    No overflow, and only ``exp`` and ``log``, torch's two vectorised float64 transcendentals
    (``log1p`` and the fused ``softplus`` cost 3-7x as much per element; ``log((1 + u) / 2)``
    adds ~2^-54 absolute, no more than the sum's own rounding). Near 0 the sum cancels to
    ``a^2/2`` with an absolute error of ~4 * 2^-53: from ``a = 2^-9`` on that is below 2^-31
    relative (invisible after rounding to float32 or narrower); smaller ``a`` need
    :func:`_logcosh_series_where`.
    """
    u = torch.mul(a, -2.0, out=ws.f(1)).exp_()
    return torch.add(_HALF, u, alpha=0.5, out=u).log_()


def _logcosh_fast_k(ws: Workspace, out: Tensor, mins: Tensor, x: Tensor) -> None:
    """:func:`_logcosh_fast` of a CPU chunk, rounded into ``out``, and into ``mins`` the minimum
    of ``|x|`` per 128-element segment (one reduction), from which
    :func:`_logcosh_fix_near_zero` finds the few segments to fix."""
    a = x.abs_()
    whole = a.numel() - a.numel() % _SEGMENT
    if whole == a.numel():  # (every chunk but the last: no slicing, each slice is an op)
        torch.amin(a.view(-1, _SEGMENT), dim=1, out=mins)
    else:
        torch.amin(a[:whole].view(-1, _SEGMENT), dim=1, out=mins[: whole // _SEGMENT])
        torch.amin(a[whole:], dim=0, keepdim=True, out=mins[-1:])
    torch.add(_logcosh_fast(ws, a), a, out=out)


def _logcosh_series_where(a: Tensor, fast: Tensor, out: Tensor | None = None) -> Tensor:
    """``fast``, with :func:`_logcosh_series` where ``a < 2^-9``."""
    return torch.where(a < _LOGCOSH_SERIES, _logcosh_series(a), fast, out=out)


def _logcosh_series(a: Tensor) -> Tensor:
    """``a^2/2 - a^4/12``: for ``a < 2^-9`` its next term ``a^6/45`` is 2^-40 relative."""
    a2 = torch.square(a)
    return torch.mul(a2, 0.5).addcmul_(a2, a2, value=-1.0 / 12.0)


def _logcosh_fix_near_zero(x: Tensor, out: Tensor, mins: Tensor) -> None:
    """Put the series into ``out = logcosh(x)`` (``x``'s dtype) where ``|x| < 2^-9``, looking
    only into the 128-element segments whose minimum ``|x|`` in ``mins`` says they hold one.

    The check is a few ops on ``numel / 128`` minima, once per call; then one comparison over
    the flagged segments (a few per chunk for data spread over +-10) finds the entries, and
    only those are recomputed (in float64) and put back.
    """
    segs = torch.ge(mins, _LOGCOSH_SERIES).logical_not_().nonzero().view(-1)  # NaN: flagged
    if segs.numel() == 0:
        return
    xf, of = x.reshape(-1), out.view(-1)
    whole = xf.numel() // _SEGMENT
    full = segs[segs < whole]
    near = xf[: whole * _SEGMENT].view(whole, _SEGMENT).index_select(0, full).abs_()
    seg, col = (near < _LOGCOSH_SERIES).nonzero().unbind(1)
    flat = [full.index_select(0, seg).mul_(_SEGMENT).add_(col)]
    if int(segs[-1]) == whole:  # the short last segment
        tail = xf[whole * _SEGMENT :].abs() < _LOGCOSH_SERIES
        flat.append(tail.nonzero().view(-1).add_(whole * _SEGMENT))
    idx = torch.cat(flat)
    of[idx] = _logcosh_series(xf[idx].to(WIDE).abs_()).to(out.dtype)


def _lambertw_k(ws: Workspace, z: Tensor, branch: int, precise: bool) -> Tensor:
    return lambertw_and_1p(z, branch, precise, ws)[0]


# --------------------------------------------------------------------------------------------
# autograd Functions: forward = kernel via the chunked engine, backward = float64 torch ops on
# the saved inputs (so double backward works through them)
# --------------------------------------------------------------------------------------------
# In torch.func's style (``setup_context`` apart from ``forward``), with vmap rules of their
# own (the chunked kernels take plain tensors: an elementwise function maps a batched tensor
# as it is, a reduction shifts its dims past the batch dim), so ``grad``, ``vmap``, ``jacrev``
# and ``hessian`` transform them. Forward mode (``jvp``, forward_ad) takes a subclass with a
# ``jvp`` rule (``_Stable.with_tangent``; dynamo refuses Functions that define one): the
# tangent through the derivative the backward uses.


def _save(ctx: Any, *tensors: Tensor) -> None:
    ctx.save_for_backward(*tensors)
    ctx.save_for_forward(*tensors)


class _Stable(torch.autograd.Function):
    """The stable functions' base: ``forward(*args)`` on tensors first (two where ``binary``,
    broadcast against each other, else one) then constants; elementwise unless a subclass
    says otherwise (its own ``setup_context``, ``tangent`` and ``vmap``)."""

    binary = False

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        tensors = [a for a in inputs if isinstance(a, Tensor)]
        _save(ctx, *tensors)
        ctx.args = inputs

    @classmethod
    def tangent(cls, ctx: Any, *tangents: Any) -> Tensor:
        """The jvp: each tensor input's tangent through its partial derivative (the backward's
        formula with the tangent as the incoming gradient; elementwise, so no transpose)."""
        if not cls.binary:
            out = cls.backward(ctx, tangents[0])
            return out[0] if isinstance(out, tuple) else out
        total = None
        for i, t in enumerate(tangents[:2]):
            if t is not None:
                part = cls.backward(ctx, t)[i]
                total = part if total is None else total + part
        return total

    @classmethod
    def vmap(cls, info: Any, in_dims: tuple[Any, ...], *args: Any) -> tuple[Tensor, int | None]:
        if not cls.binary:
            return _apply(cls, *args), in_dims[0]
        x, y = args[0], args[1]
        rank = max(_logical_rank(x, in_dims[0]), _logical_rank(y, in_dims[1]))
        xb, yb = _batch_first(x, in_dims[0], rank), _batch_first(y, in_dims[1], rank)
        return _apply(cls, xb, yb, *args[2:]), 0


def _logical_rank(t: Tensor, bdim: int | None) -> int:
    return t.dim() - (bdim is not None)


def _batch_first(t: Tensor, bdim: int | None, rank: int) -> Tensor:
    """``t`` with its vmapped dim first (size 1 if unbatched) and its logical dims padded on the
    left to ``rank`` (right-aligned broadcasting, as the unbatched call would)."""
    t = t.unsqueeze(0) if bdim is None else t.movedim(bdim, 0)
    return t.reshape(t.shape[0], *([1] * (rank + 1 - t.dim())), *t.shape[1:])


_TANGENT_CLASSES: dict[type, type] = {}


def _with_tangent(cls: type) -> type:
    """``cls`` with a ``jvp`` rule (made once per class)."""
    sub = _TANGENT_CLASSES.get(cls)
    if sub is None:
        sub = type(cls.__name__ + "Tangent", (cls,), {"jvp": staticmethod(cls.tangent)})
        _TANGENT_CLASSES[cls] = sub
    return sub


def _apply(cls: Any, *args: Any) -> Tensor:
    """``cls.apply(*args)``; in forward mode through its subclass with a ``jvp``, binary
    functions with their tensors broadcast first (the jvp adds partials of the output's
    shape)."""
    if not forward_mode():
        return cls.apply(*args)
    if cls.binary:
        args = (*torch.broadcast_tensors(args[0], args[1]), *args[2:])
    return _with_tangent(cls).apply(*args)


def _wide(t: Tensor) -> Tensor:
    return t.to(WIDE)


def _sigmoid_f64(x: Tensor) -> Tensor:
    """sigmoid, differentiable, keeping the subnormal results of ``x < -709`` (``e^x / (1 + e^x)``
    there; torch's ``1 / (1 + e^-x)`` overflows in ``e^-x`` and returns 0)."""
    e = torch.exp(x.clamp_max(0.0))
    return torch.where(x >= 0, 1.0 / (1.0 + torch.exp(-x.clamp_min(0.0))), e / (1.0 + e))


class _Softplus(_Stable):
    @staticmethod
    def forward(x: Tensor, beta: float) -> Tensor:
        kernel = partial(_softplus_k, beta=beta, exact=x.dtype == torch.float64)
        return map_elementwise(kernel, (x,), x.dtype)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:
        (x,) = ctx.saved_tensors
        return (_wide(g) * _sigmoid_f64(_wide(x) * ctx.args[1])).to(x.dtype), None


class _LogSigmoid(_Stable):
    @staticmethod
    def forward(x: Tensor) -> Tensor:
        kernel = partial(_log_sigmoid_k, exact=x.dtype == torch.float64)
        return map_elementwise(kernel, (x,), x.dtype)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return (_wide(g) * _sigmoid_f64(-_wide(x))).to(x.dtype)


class _Log1mexp(_Stable):
    @staticmethod
    def forward(x: Tensor) -> Tensor:
        kernel = partial(_log1mexp_k, exact=x.dtype == torch.float64)
        return map_elementwise(kernel, (x,), x.dtype)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        # d/dx log(1 - e^x) = -e^x / (1 - e^x) = -1 / expm1(-x): -> 0 at -inf; at x = 0 the
        # (left) derivative is -inf whatever the sign of the zero
        xw = _wide(x)
        # below -1 as e^x / expm1(x), which keeps e^x's subnormal digits (x < -709)
        far = torch.exp(xw.clamp_max(-1.0)) / torch.expm1(xw.clamp_max(-1.0))
        near = torch.expm1(-xw.clamp_min(-1.0)).reciprocal().neg()
        d = torch.where(xw == 0, -math.inf, torch.where(xw < -1.0, far, near))
        return (_wide(g) * d).to(x.dtype)


class _LogAddExp(_Stable):
    binary = True

    @staticmethod
    def forward(x: Tensor, y: Tensor) -> Tensor:
        kernel = partial(_logaddexp_k, exact=x.dtype == torch.float64)
        return map_elementwise(kernel, (x, y), x.dtype)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, Tensor]:
        x, y = ctx.saved_tensors
        xw, yw = _wide(x), _wide(y)
        # x = y = +-inf: the value is constant (+-inf) nearby, so both partials are 0
        same_inf = (xw == yw) & torch.isinf(xw)
        d = torch.where(same_inf, 0.0, xw - yw)
        # the rounding error of x - y (two-sum), added back to first order as a constant:
        # sigmoid(d + err) ~ sigmoid(d) + sigmoid(d) sigmoid(-d) err
        err = torch.nan_to_num(
            two_sum(xw.detach(), -yw.detach())[1], nan=0.0, posinf=0.0, neginf=0.0
        )
        err = torch.where(same_inf, 0.0, err)
        sx, sy = _sigmoid_f64(d), _sigmoid_f64(-d)
        corr = (sx * sy * err).detach()
        gw = _wide(g)
        gx = torch.where(same_inf, 0.0, gw * (sx + corr))
        gy = torch.where(same_inf, 0.0, gw * (sy - corr))
        return gx.to(x.dtype).sum_to_size(x.shape), gy.to(y.dtype).sum_to_size(y.shape)


def _reduce_shape(shape: Sequence[int], dims: tuple[int, ...], keepdim: bool) -> list[int]:
    if keepdim:
        return [1 if i in dims else s for i, s in enumerate(shape)]
    return [s for i, s in enumerate(shape) if i not in dims]


def _lse_forward(x: Tensor, dims: tuple[int, ...], keepdim: bool) -> Tensor:
    ndim = x.dim()
    rest = [i for i in range(ndim) if i not in dims]
    moved = x.permute(*rest, *dims) if ndim else x.reshape(1)
    n = 1
    for d in dims:
        n *= x.shape[d]
    x2 = moved.reshape(-1, n)
    if n == 0:
        out = torch.full((x2.shape[0], 1), -math.inf, dtype=x.dtype, device=x.device)
    elif x.dtype == torch.float64 or x.device.type != "cpu":
        out = map_rows(_logsumexp_exact_k, x2, 1, x.dtype)
    else:
        out = _logsumexp_fast(x2).to(x.dtype)
    return out.reshape(_reduce_shape(x.shape, dims, keepdim))


def _softmax_f64(xw: Tensor, dims: int | tuple[int, ...]) -> Tensor:
    """softmax over ``dims`` (differentiable), to a few ulps also for float64 inputs.

    ``exp(x - m)`` with ``x - m`` rounded loses ``|x - m| * 2^-53`` relative (~100 ulps at
    ``x - m = -300``); the rounding error of the subtraction (two-sum) is added back to first
    order. The correction is a detached constant: values are the accurate ones, derivatives
    those of the plain softmax. Entries of all ``-inf`` slices get 0. Non-finite maxima: NaN.
    """
    m = xw.detach().amax(dim=dims, keepdim=True)
    dead = m == -math.inf
    m = torch.where(dead, 0.0, m)
    _, err = two_sum(xw.detach(), -m)
    err = torch.nan_to_num(err, nan=0.0, posinf=0.0, neginf=0.0)
    e = torch.exp(xw - m)
    e = e + (e.detach() * err)  # exp(d + err) ~ exp(d) (1 + err)
    p = e / e.sum(dim=dims, keepdim=True)
    return torch.where(dead, 0.0, p)


class _LogSumExp(_Stable):
    @staticmethod
    def forward(x: Tensor, dims: tuple[int, ...], keepdim: bool) -> Tensor:
        return _lse_forward(x, dims, keepdim)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        _save(ctx, inputs[0])
        ctx.dims, ctx.keepdim = inputs[1], inputs[2]

    @staticmethod
    def tangent(ctx: Any, x_t: Tensor, *_: Any) -> Tensor:
        (x,) = ctx.saved_tensors
        dims = ctx.dims
        if not dims:
            return x_t
        p = _softmax_f64(_wide(x), dims)
        return (p * _wide(x_t)).sum(dim=dims, keepdim=ctx.keepdim).to(x.dtype)

    @staticmethod
    def vmap(
        info: Any, in_dims: tuple[Any, ...], x: Tensor, dims: tuple[int, ...], keepdim: bool
    ) -> tuple[Tensor, int | None]:
        if in_dims[0] is None:
            return _apply(_LogSumExp, x, dims, keepdim), None
        moved = x.movedim(in_dims[0], 0)
        return _apply(_LogSumExp, moved, tuple(d + 1 for d in dims), keepdim), 0

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None, None]:
        (x,) = ctx.saved_tensors
        dims = ctx.dims
        xw = _wide(x)
        p = _softmax_f64(xw, dims) if dims else torch.ones_like(xw)
        gw = _wide(g).reshape(_reduce_shape(x.shape, dims, True))
        return (gw * p).to(x.dtype), None, None


class _LogSoftmax(_Stable):
    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        _save(ctx, inputs[0])
        ctx.dim = inputs[1]

    @staticmethod
    def tangent(ctx: Any, x_t: Tensor, *_: Any) -> Tensor:
        (x,) = ctx.saved_tensors
        dim = ctx.dim
        xw, tw = _wide(x), _wide(x_t)
        dead = (xw == -math.inf).all(dim=dim, keepdim=True)
        t = tw - (_softmax_f64(xw, dim) * tw).sum(dim=dim, keepdim=True)
        return torch.where(dead, 0.0, t).to(x.dtype)

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], x: Tensor, dim: int) -> tuple[Tensor, int | None]:
        if in_dims[0] is None:
            return _apply(_LogSoftmax, x, dim), None
        return _apply(_LogSoftmax, x.movedim(in_dims[0], 0), dim + 1), 0

    @staticmethod
    def forward(x: Tensor, dim: int) -> Tensor:
        x2, moved_shape = rows_view(x, dim)
        if x2.numel() == 0:
            return torch.empty_like(x)
        if x.dtype == torch.float64 or x.device.type != "cpu":
            out = map_rows(_log_softmax_exact_k, x2, x2.shape[1], x.dtype)
        else:
            out = _log_softmax_fast(x2, x.dtype)
        return out.reshape(moved_shape).movedim(-1, dim).contiguous()

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:
        (x,) = ctx.saved_tensors
        dim = ctx.dim
        xw = _wide(x)
        dead = (xw == -math.inf).all(dim=dim, keepdim=True)
        gw = _wide(g)
        grad = gw - _softmax_f64(xw, dim) * gw.sum(dim=dim, keepdim=True)
        return torch.where(dead, 0.0, grad).to(x.dtype), None


class _XLogY(_Stable):
    binary = True

    @staticmethod
    def forward(x: Tensor, y: Tensor) -> Tensor:
        return map_elementwise(partial(_xlogy_k, log=torch.log), (x, y), x.dtype)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, Tensor]:
        x, y = ctx.saved_tensors
        xw, yw = _wide(x), _wide(y) + 0.0  # -0 + 0 = +0: x / y at y = -0 is x / (+0)
        gw = _wide(g)
        gx = gw * torch.log(yw)
        # f(0, y) = 0 for all y: d/dy = 0 there (also at y = 0); NaN outside the domain
        zero = xw == 0
        gy = gw * xw / torch.where(zero | (yw < 0), 1.0, yw)
        gy = torch.where(zero, 0.0, torch.where(yw < 0, math.nan, gy))
        return gx.to(x.dtype).sum_to_size(x.shape), gy.to(y.dtype).sum_to_size(y.shape)


class _XLog1pY(_Stable):
    binary = True

    @staticmethod
    def forward(x: Tensor, y: Tensor) -> Tensor:
        log1p = _log1p_f64_out if x.dtype == torch.float64 else torch.log1p
        return map_elementwise(partial(_xlogy_k, log=log1p), (x, y), x.dtype)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, Tensor]:
        x, y = ctx.saved_tensors
        xw, yw = _wide(x), _wide(y)
        gw = _wide(g)
        gx = gw * _log1p_f64(yw)
        zero = xw == 0
        gy = gw * xw / torch.where(zero | (yw < -1), 1.0, 1.0 + yw)
        gy = torch.where(zero, 0.0, torch.where(yw < -1, math.nan, gy))
        return gx.to(x.dtype).sum_to_size(x.shape), gy.to(y.dtype).sum_to_size(y.shape)


class _LogCosh(_Stable):
    @staticmethod
    def forward(x: Tensor) -> Tensor:
        if x.dtype == torch.float64 or x.device.type != "cpu":
            kernel = partial(_logcosh_k, exact=x.dtype == torch.float64)
            return map_elementwise(kernel, (x,), x.dtype)
        out, mins = map_elementwise_stats(_logcosh_fast_k, (x,), x.dtype, _SEGMENT)
        _logcosh_fix_near_zero(x, out, mins)
        return out

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return (_wide(g) * torch.tanh(_wide(x))).to(x.dtype)


class _LambertW(_Stable):
    @staticmethod
    def forward(z: Tensor, branch: int) -> Tensor:
        kernel = partial(_lambertw_k, branch=branch, precise=z.dtype == torch.float64)
        return map_elementwise(kernel, (z,), z.dtype)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:
        (z,) = ctx.saved_tensors
        branch = ctx.args[1]
        zw = _wide(z)
        w = _apply(_LambertW, zw, branch)  # float64 recompute, differentiable
        # 1 + W to full relative accuracy near the branch point (value from the series, gradient
        # that of W, so double backward stays right)
        with torch.no_grad():
            u_acc = _apply(_LambertW1p, zw.detach(), branch)
        u = (1.0 + w) + (u_acc - (1.0 + w)).detach()
        # W' = W / (z (1 + W)), evaluated as (W / (1 + W)) / z so that W-1 near 0- (z ~ 1e-323,
        # W ~ -745) neither overflows nor underflows; limits: W0'(0) = 1, W0'(inf) = 0,
        # W-1'(0-) = -inf.
        special = (zw == 0) | torch.isinf(zw)
        z_safe = torch.where(special, 1.0, zw)
        w_safe = torch.where(special, 1.0, w)
        u_safe = torch.where(special, 2.0, u)
        d = (w_safe / u_safe) / z_safe
        at_zero = 1.0 if branch == 0 else -math.inf
        d = torch.where(zw == 0, at_zero, torch.where(torch.isinf(zw), 0.0, d))
        return (_wide(g) * d).to(z.dtype), None


class _LambertW1p(_Stable):
    """``1 + W(z)`` to full relative accuracy near the branch point, for :class:`_LambertW`'s
    backward (used detached; a Function for its vmap rule: the kernel writes into buffers)."""

    @staticmethod
    def forward(z: Tensor, branch: int) -> Tensor:
        return lambertw_and_1p(z, branch, precise=True)[1]

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[None, None]:
        return None, None


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
def softplus(x: Tensor, beta: float = 1.0) -> Tensor:
    """``log(1 + exp(beta * x)) / beta``, accurate everywhere (no threshold switch).

    Unlike ``torch.nn.functional.softplus`` there is no ``threshold`` above which ``x`` is
    returned: the switch to the identity happens only where it is exact in float64 (x > 37),
    so float64 results are right between 20 and 37 too. Gradient: ``sigmoid(beta * x)``.
    """
    x = as_float(x, "x")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta > 0:
        raise ValueError(f"beta must be a positive number, got {beta!r}")
    if not math.isfinite(beta):
        raise ValueError(f"beta must be finite, got {beta!r}")
    return _apply(_Softplus, x, float(beta))


def log1pexp(x: Tensor) -> Tensor:
    """``log(1 + exp(x))`` (Maechler's name for :func:`softplus` with ``beta=1``)."""
    return softplus(x)


def log_sigmoid(x: Tensor) -> Tensor:
    """``log(sigmoid(x)) = -softplus(-x)``: ``x`` for very negative ``x``, ``-e^-x`` for large.

    Gradient ``sigmoid(-x)``.
    """
    return _apply(_LogSigmoid, as_float(x, "x"))


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, with Maechler's switch at ``x = -ln 2``.

    ``log(-expm1(x))`` for ``-ln 2 < x <= 0`` and ``log1p(-exp(x))`` below. ``log1mexp(0) =
    -inf``, ``log1mexp(-inf) = 0``, NaN for ``x > 0``. Note the convention: the argument is the
    (non-positive) exponent itself; Maechler's R function and TFP's ``log1mexp`` take ``a = -x``
    (``log(1 - exp(-|a|))``). Gradient ``-1 / expm1(-x)``.
    """
    return _apply(_Log1mexp, as_float(x, "x"))


def logaddexp(x: Tensor | float, y: Tensor | float) -> Tensor:
    """``log(exp(x) + exp(y))`` as ``max + log1p(exp(-|x - y|))``, broadcasting.

    ``logaddexp(-inf, -inf) = -inf`` and ``logaddexp(inf, inf) = inf`` with zero gradients (not
    NaN). Gradients ``sigmoid(x - y)`` and ``sigmoid(y - x)``.
    """
    xt, yt = float_pair(x, y)
    return _apply(_LogAddExp, xt, yt)


def _normalise_dims(dim: int | Sequence[int] | None, ndim: int) -> tuple[int, ...]:
    if dim is None:
        return tuple(range(ndim))
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    out = tuple(sorted({check_dim(d, ndim) for d in dims}))
    if len(out) != len(dims):
        raise ValueError(f"dim {dim!r} names a dimension twice")
    return out


def _apply_mask(x: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return x
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise TypeError(f"mask must be a bool tensor (True = keep), got {got}")
    try:
        torch.broadcast_shapes(mask.shape, x.shape)
    except RuntimeError:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to x's shape {tuple(x.shape)}"
        ) from None
    if torch.broadcast_shapes(mask.shape, x.shape) != x.shape:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} would broadcast x's shape {tuple(x.shape)} "
            "to a larger one"
        )
    # masked_fill's gradient is 0 at masked entries, whatever (even NaN) they hold
    return x.masked_fill(~mask.to(x.device), -math.inf)


def logsumexp(
    x: Tensor,
    dim: int | Sequence[int] | None = None,
    keepdim: bool = False,
    *,
    mask: Tensor | None = None,
) -> Tensor:
    """``log(sum(exp(x), dim))``, accurate also when one term dominates.

    ``dim=None`` reduces over all dimensions. ``mask`` (bool, broadcastable to ``x``, True =
    keep) excludes entries as if they were ``-inf``: their gradient is 0 even when they hold
    NaN or inf. A slice with no entries, only ``-inf`` entries or only masked-out entries gives
    ``-inf`` with a zero gradient. Gradient: ``softmax(x)`` over ``dim``.
    Extra cost of ``mask``: one masked copy of ``x`` in its own dtype.
    """
    x = as_float(x, "x")
    dims = _normalise_dims(dim, x.dim())
    return _apply(_LogSumExp, _apply_mask(x, mask), dims, bool(keepdim))


def log_softmax(x: Tensor, dim: int = -1, *, mask: Tensor | None = None) -> Tensor:
    """``x - logsumexp(x, dim)``, computed as ``(x - max) - log1p(s')`` with nothing cancelling.

    ``mask`` as in :func:`logsumexp`: masked-out entries give ``-inf`` and get zero gradient; a
    slice that is entirely ``-inf``/masked gives ``-inf`` everywhere with zero gradient.
    """
    x = as_float(x, "x")
    d = check_dim(dim, x.dim())
    xm = _apply_mask(x, mask)
    if x.dim() == 0:
        return _apply(_LogSoftmax, xm.reshape(1), 0).reshape(())
    return _apply(_LogSoftmax, xm, d)


def xlogy(x: Tensor | float, y: Tensor | float) -> Tensor:
    """``x * log(y)``, defined as 0 where ``x == 0`` (unless ``y`` is NaN), broadcasting.

    Partial derivatives ``log(y)`` and ``x / y`` (0 where ``x == 0``).
    """
    xt, yt = float_pair(x, y)
    return _apply(_XLogY, xt, yt)


def xlog1py(x: Tensor | float, y: Tensor | float) -> Tensor:
    """``x * log1p(y)``, defined as 0 where ``x == 0`` (unless ``y`` is NaN), broadcasting.

    Partial derivatives ``log1p(y)`` and ``x / (1 + y)`` (0 where ``x == 0``).
    """
    xt, yt = float_pair(x, y)
    return _apply(_XLog1pY, xt, yt)


def logcosh(x: Tensor) -> Tensor:
    """``log(cosh(x))`` without overflow (``|x| - ln 2`` for large ``|x|``) or cancellation
    (``x^2 / 2`` digits kept near 0). Gradient ``tanh(x)``.
    """
    return _apply(_LogCosh, as_float(x, "x"))


def lambertw(z: Tensor, branch: int = 0) -> Tensor:
    """Lambert W: the solution ``w`` of ``w * exp(w) = z`` on branch 0 or -1.

    ``branch=0`` (principal): ``z >= -1/e``, ``w >= -1``; ``branch=-1``: ``-1/e <= z < 0``,
    ``w <= -1``. NaN outside the domain. Evaluated with a fixed number of Halley steps from a
    piecewise closed-form guess (no data-dependent loop; see :mod:`mixprec.stable.lambert`).
    Gradient ``W / (z (1 + W))`` (1 at ``z = 0`` on branch 0). Cost: about 30 float64
    elementwise ops (70 more for float64 inputs, which use a 40-term series near ``-1/e``).
    """
    if isinstance(branch, bool) or branch not in (0, -1):
        raise ValueError(f"branch must be 0 or -1, got {branch!r}")
    return _apply(_LambertW, as_float(z, "z"), int(branch))
