"""Lambert W kernel for :func:`mixprec.stable.lambertw` (float64 tensors in, float64 out).

Two branches: ``W0`` (principal, ``z >= -1/e``, ``W >= -1``) and ``W-1`` (``-1/e <= z < 0``,
``W <= -1``). The evaluation has no data-dependent control flow, so it traces into a small fixed
graph (the failure mode seed 000 describes for XLA's while-loop LambertW):

1. an initial guess from three closed forms selected with ``torch.where``: the series in
   ``p = sqrt(2 (e z + 1))`` around the branch point, Winitzki's approximation
   ``ln(1+z) (1 - ln(1 + ln(1+z)) / (2 + ln(1+z)))`` for the rest of W0 (up to 1e308), and the
   asymptotic ``L1 - L2 + L2/L1`` with ``L1 = ln(-z), L2 = ln(-L1)`` for W-1 away from the
   branch point; the worst guess is ~11% off, which three Halley steps (cubic convergence)
   take to ~1 ulp;
2. exactly ``HALLEY_STEPS`` Halley steps on ``h(w) = w - z e^(-w)`` (the root of ``w e^w = z``
   scaled by ``e^-w`` so nothing overflows for W0); for W-1, ``z e^(-w)`` is formed as
   ``-exp(ln(-z) - w)`` so that ``z`` down to the smallest subnormal works (``e^(-w)`` alone
   would overflow below ``z ~ -1e-305``);
3. near the branch point Halley cannot be accurate (``h'(w) = 1 + w -> 0`` there, so a rounding
   error ``eps`` in ``h`` becomes ``eps / p`` in ``w``), so for small ``p`` the series itself is
   the result: 40 terms for ``p < 0.5`` when the caller needs float64 accuracy (truncation
   below 1e-19), 6 terms for ``p < 1e-3`` otherwise (truncation below 1e-19).

``1 + z/e``-style cancellation is avoided by forming ``q = z + 1/e`` with ``1/e`` split into a
float64 pair (``z + hi`` is exact near ``-1/e`` by Sterbenz's lemma).
"""

from __future__ import annotations

import math
from fractions import Fraction
from functools import cache

import torch
from torch import Tensor

from mixprec.stable.core import Workspace

__all__ = [
    "HALLEY_STEPS",
    "branch_series_coefficients",
    "lambertw_and_1p",
    "lambertw_kernel",
]

HALLEY_STEPS = 3
_INV_E = Fraction(
    # 1/e to 60 digits; the float64 pair (hi, lo) below carries ~106 bits of it
    "0.367879441171442321595523770161460867445811131031767834507837"
)
INV_E_HI = float(_INV_E)
INV_E_LO = float(_INV_E - Fraction(INV_E_HI))
TWO_E = 2.0 * math.e


@cache
def branch_series_coefficients(terms: int) -> tuple[float, ...]:
    """Coefficients ``mu_k`` of ``W0 = sum_k mu_k p^k``, ``p = sqrt(2 (e z + 1))``.

    The recurrence is Corless et al., "On the Lambert W function" (1996), eq. 4.23; exact
    rational arithmetic, rounded once. ``W-1`` is the same series in ``-p``.
    """
    mu = [Fraction(-1), Fraction(1)]
    alpha = [Fraction(2), Fraction(-1)]
    for k in range(2, terms):
        alpha.append(sum((mu[j] * mu[k + 1 - j] for j in range(2, k)), Fraction(0)))
        mu.append(
            Fraction(k - 1, k + 1) * (mu[k - 2] / 2 + alpha[k - 2] / 4)
            - alpha[k] / 2
            - mu[k - 1] / (k + 1)
        )
    return tuple(float(m) for m in mu[:terms])


def _buf(ws: Workspace | None, i: int, like: Tensor) -> Tensor:
    return ws.f(i) if ws is not None else torch.empty_like(like)


def _mask(ws: Workspace | None, i: int, like: Tensor) -> Tensor:
    return ws.b(i) if ws is not None else torch.empty_like(like, dtype=torch.bool)


def lambertw_kernel(z: Tensor, branch: int, precise: bool) -> Tensor:
    """``W_branch(z)``; see :func:`lambertw_and_1p`."""
    return lambertw_and_1p(z, branch, precise)[0]


def lambertw_and_1p(
    z: Tensor, branch: int, precise: bool, ws: Workspace | None = None
) -> tuple[Tensor, Tensor]:
    """``(W_branch(z), 1 + W_branch(z))`` for a float64 tensor ``z`` (no autograd).

    ``1 + W`` comes from the branch-point series without its constant term where ``W ~ -1``, so
    it keeps its relative accuracy there (the derivative ``W / (z (1 + W))`` needs it).
    ``precise=True`` asks for float64-level accuracy near the branch point (40-term series);
    ``precise=False`` is enough when the result is rounded to float32 or narrower.
    Outside the domain the result is NaN; ``W0(0) = 0`` (sign kept), ``W0(inf) = inf``,
    ``W-1(0) = -inf``. ``z`` is not modified. With a :class:`Workspace` (flat ``z``) every
    temporary lives in its buffers 1-11 (no allocation); without, ops allocate (and the
    function traces with torch.fx).
    """
    q = torch.add(z, INV_E_HI, out=_buf(ws, 1, z)).add_(INV_E_LO)  # z + 1/e, accurate near -1/e
    p = torch.mul(q, TWO_E, out=_buf(ws, 2, z)).sqrt_()  # NaN below -1/e
    # float32-and-narrower results need the series only as a guess (p < 1) and as the result
    # for p < 1e-3, where 6 terms leave 2e-20; float64 results use it up to p = 0.5 (40 terms)
    terms, p_final = (40, 0.5) if precise else (6, 1e-3)
    coeffs = branch_series_coefficients(terms)
    ps = p if branch == 0 else torch.neg(p, out=_buf(ws, 3, z))
    series1p = _buf(ws, 4, z).fill_(coeffs[-1])  # 1 + W without the cancellation
    for c in reversed(coeffs[1:-1]):
        series1p.mul_(ps).add_(c)
    series1p.mul_(ps)
    series = torch.sub(series1p, 1.0, out=_buf(ws, 5, z))
    if branch == 0:
        lg = torch.log1p(z, out=_buf(ws, 6, z))
        winitzki = torch.log1p(lg, out=_buf(ws, 7, z))
        winitzki.div_(torch.add(lg, 2.0, out=_buf(ws, 8, z))).neg_().add_(1.0).mul_(lg)
        w = torch.where(torch.lt(p, 0.5, out=_mask(ws, 0, z)), series, winitzki, out=lg)
        for _ in range(HALLEY_STEPS):
            t = torch.neg(w, out=_buf(ws, 7, z)).exp_().mul_(z)
            _halley_step(w, t, ws, 8)
    else:
        lz = torch.neg(z, out=_buf(ws, 6, z)).log_()
        l2 = torch.neg(lz, out=_buf(ws, 7, z)).log_()
        asym = torch.div(l2, lz, out=_buf(ws, 8, z)).add_(lz).sub_(l2)
        w = torch.where(torch.lt(p, 1.0, out=_mask(ws, 0, z)), series, asym, out=l2)
        for _ in range(HALLEY_STEPS):
            t = torch.sub(lz, w, out=_buf(ws, 8, z)).exp_().neg_()
            _halley_step(w, t, ws, 9)
    near = torch.lt(p, p_final, out=_mask(ws, 1, z))
    w = torch.where(near, series, w, out=w)
    flag = _mask(ws, 2, z)
    w.masked_fill_(torch.lt(q, 0.0, out=flag), math.nan)  # below -1/e: no real solution
    if branch == 0:
        w = torch.where(torch.eq(z, 0.0, out=flag), z, w, out=w)  # keeps the sign of -0
        w.masked_fill_(torch.eq(z, math.inf, out=flag), math.inf)
    else:
        w.masked_fill_(torch.eq(z, 0.0, out=flag), -math.inf)
        w.masked_fill_(torch.gt(z, 0.0, out=flag), math.nan)
    u = torch.where(near, series1p, torch.add(w, 1.0, out=series), out=series)
    return w, u


def _halley_step(w: Tensor, t: Tensor, ws: Workspace | None, first: int) -> None:
    """One Halley step, in place on ``w``, for ``h(w) = w - t`` with ``t = z e^-w``:
    ``h' = 1 + t``, ``h'' = -t``, so ``w -= 2 h h' / (2 h'^2 - h h'') = h d / (d^2 + h t / 2)``
    with ``d = 1 + t``. Temporaries in workspace buffers ``first .. first + 2``."""
    h = torch.sub(w, t, out=_buf(ws, first, w))
    d = torch.add(t, 1.0, out=_buf(ws, first + 1, w))
    den = torch.mul(d, d, out=_buf(ws, first + 2, w)).addcmul_(h, t, value=0.5)
    w.sub_(h.mul_(d).div_(den))
