"""Sums of |terms|: what a backward-stable evaluation of a sum can err by (private).

A result that is a sum (a GEMM's dot products, a reduction, a normalization's mean or its
gradient) can cancel to ~0, and its relative error is then unbounded although every term was
summed as well as the format allows. The measurement judges such a result against its sum of
|terms|, element by element: ``|r - s| <= tol * max(|s|, terms)``.

* A multilinear op (``mm``, ``convolution``, ``sum``, ...) gives its sums of |terms| when run on
  the absolute values of its inputs (:func:`abs_terms`).
* The backward ops of the normalizations, of softmax and of the fused CPU attention subtract
  a mean inside (``x - mean``, ``g - mean(g)``, ``g - sum(g y)``, ``dP - rowsum(g out)``): run
  on absolute values they cancel as before, so their error scales are written out here
  (:data:`FUSED_BACKWARD_TERMS`), from the same saved statistics the op uses. The forward
  ops' means are sums of the input and take the first rule (``native_batch_norm`` on ``|x|``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from mixprec.sanitizer.tolerances import FmtInfo
from mixprec.trees import leaves, map_tensor_kwargs, map_tensors


def abs_terms(
    func: Callable[..., Any], args: Any, kwargs: dict[str, Any], dtype: torch.dtype | None = None
) -> list[Any] | None:
    """``func`` on |args| (|alpha|, |beta|), float64 tensors first cast to ``dtype`` if given:
    for a multilinear op, the sum of the absolute values of its terms, element by element.
    None if the op refuses. Why ``dtype=torch.float32``: a float64 convolution runs 4-8x
    slower than a float32 one on CPUs (no oneDNN kernels); a bound needs no more."""

    def ab(t: torch.Tensor) -> torch.Tensor:
        if not t.is_floating_point():
            return t
        narrow = _narrow(t, dtype)
        # a fresh tensor: the caller's shadow is never written (a narrowed copy in place)
        return narrow.abs() if narrow is t else narrow.abs_()

    kw = map_tensor_kwargs(ab, kwargs)
    # scalar multipliers (addmm's alpha, beta) enter by their magnitude too
    kw.update({k: abs(v) for k, v in kwargs.items() if k in ("alpha", "beta")})
    try:
        return leaves(func(*map_tensors(ab, args), **kw))
    except Exception:
        return None


def _narrow(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``t`` in ``dtype`` where a float64 shadow is asked for narrower (rounding commutes with
    abs), else ``t`` itself."""
    if dtype is not None and dtype != t.dtype and t.dtype == torch.float64:
        return t.to(dtype)
    return t


# ----------------------------------------------------------------------------------------------
# normalization backward ops
# ----------------------------------------------------------------------------------------------
# With xhat = (x - mean) * rstd over each normalized group, w the affine weight (per channel for
# batch and group norm, per normalized element for layer norm) and g the incoming gradient:
#   grad_input  = rstd * (w g - m1 - xhat * m2),  m1 = mean(w g),  m2 = mean(w g xhat)
#   grad_weight = sum(g xhat),  grad_bias = sum(g)   (over the dims the parameters are shared)
# The parameter gradients are sums: their |terms| are sum(|g| |xhat|) and sum(|g|).
# grad_input combines two reductions elementwise. Taken apart, the reductions would be judged
# against their sums of |terms| (m2 of a gradient that is constant over a group, as after
# ``norm(x).sum()``, is rounding noise of an exact 0) and the elementwise subtraction against
# its result (its cancellation is a finding: batch norm over two values per channel). So the
# reductions' error scale, rstd (mean|w g| + |xhat| mean|w g xhat|), is granted to an element
# only where a bound of the subtraction's own error (its inputs w g, m1, xhat m2 rounded to the
# real format) stays below a quarter of the result's threshold: where it loses nothing.
# Batch norm in eval mode uses its running statistics as constants: grad_input = rstd w g, a
# product, whose |terms| are its magnitude.


#: granted only where a bound of the subtraction's own error is below this share of the
#: threshold (the bound counts each rounding as at most one unit, its products' four)
_SUBTRACTION_MARGIN = 0.25
#: w g and m1 closer than this (relative) are equal but for float64's rounding of m1: a
#: gradient constant over the group, whose ``w g - m1`` rounds to an exact 0 in any format
_SAME = 2.0**-40


def _granted(
    scale: torch.Tensor, a: torch.Tensor, size: torch.Tensor, b: torch.Tensor, fi: FmtInfo
) -> torch.Tensor:
    """``scale`` where the elementwise ``a - b`` (``a`` a difference of operands of total
    magnitude ``size``, ``b`` a product of four roundings) loses nothing by itself, else 0.
    A bound of its own error, in units of the real format ``fi`` (the hinted one for float32
    containers): one per operand of ``a`` (none where they are equal), four for ``b``; the
    threshold is the one the result is judged by."""
    own = torch.where(a.abs() > _SAME * size, size, 0.0).add_(b.abs(), alpha=4.0)
    unit = fi.eps / 2
    return torch.where(own * unit <= _SUBTRACTION_MARGIN * fi.tol * (a - b).abs(), scale, 0.0)


def _grad_input_terms(
    wg: torch.Tensor,
    xhat: torch.Tensor,
    rstd: torch.Tensor,
    group: Sequence[int],
    fi: FmtInfo | None,
) -> torch.Tensor:
    """grad_input's error scale (see above); zero where the elementwise subtraction is to be
    judged on its own (always with ``fi`` None: a float32 bound grants nothing)."""
    if fi is None:
        return torch.zeros_like(wg)
    awg, axh = wg.abs(), xhat.abs()
    scale = rstd * (awg.mean(group, keepdim=True) + axh * (awg * axh).mean(group, keepdim=True))
    m1 = wg.mean(group, keepdim=True)
    b = xhat * (wg * xhat).mean(group, keepdim=True)
    return _granted(scale, wg - m1, awg + m1.abs(), b, fi)


def _norm_terms(
    g: torch.Tensor,
    xhat: torch.Tensor,
    rstd: torch.Tensor,
    wg: torch.Tensor,
    dims: tuple[Sequence[int], Sequence[int]],
    train: bool,
    fi: FmtInfo | None,
) -> list[torch.Tensor]:
    """The three results' sums of |terms| from signed g, xhat, w g (broadcast to the input's
    shape) and rstd; ``dims``: the normalized dims, and those the parameters are shared over."""
    group, params = dims
    ag, axh = g.abs(), xhat.abs()
    grad_input = _grad_input_terms(wg, xhat, rstd, group, fi) if train else rstd * wg.abs()
    return [grad_input, (ag * axh).sum(params), ag.sum(params)]


def _batch_norm_backward_terms(
    args: Sequence[Any], _kwargs: dict[str, Any], dtype: Any, fi: FmtInfo | None
) -> list[Any]:
    g, x, w, run_mean, run_var, save_mean, save_invstd, train, eps = args[:9]
    shape = [1, -1] + [1] * (x.dim() - 2)
    if train:
        mean, rstd = save_mean, save_invstd
    else:
        mean, rstd = run_mean, torch.rsqrt(run_var + eps)
    g, x = _narrow(g, dtype), _narrow(x, dtype)
    mean, rstd = _narrow(mean, dtype).reshape(shape), _narrow(rstd, dtype).reshape(shape)
    xhat = (x - mean).mul_(rstd)
    wg = g if w is None else g * _narrow(w, dtype).reshape(shape)
    dims = [d for d in range(x.dim()) if d != 1]
    return _norm_terms(g, xhat, rstd, wg, (dims, dims), bool(train), fi)


def _layer_norm_backward_terms(
    args: Sequence[Any], _kwargs: dict[str, Any], dtype: Any, fi: FmtInfo | None
) -> list[Any]:
    g, x, normalized_shape, mean, rstd, w = args[:6]
    k = len(normalized_shape)
    g, x = _narrow(g, dtype), _narrow(x, dtype)
    mean, rstd = _narrow(mean, dtype), _narrow(rstd, dtype)  # (*leading, 1, ..., 1)
    xhat = (x - mean).mul_(rstd)
    wg = g if w is None else g * _narrow(w, dtype)
    dims = (list(range(x.dim() - k, x.dim())), list(range(x.dim() - k)))
    return _norm_terms(g, xhat, rstd, wg, dims, True, fi)


def _group_norm_backward_terms(
    args: Sequence[Any], _kwargs: dict[str, Any], dtype: Any, fi: FmtInfo | None
) -> list[Any]:
    g, x, mean, rstd, w, n, c, _hxw, groups = args[:9]
    # (N, C, *) viewed as (N, groups, C / groups, rest): statistics per (N, group)
    shape = (int(n), int(groups), int(c) // int(groups), -1)
    g, x = _narrow(g, dtype).reshape(shape), _narrow(x, dtype).reshape(shape)
    mean = _narrow(mean, dtype).reshape(*shape[:2], 1, 1)
    rstd = _narrow(rstd, dtype).reshape(*shape[:2], 1, 1)
    xhat = (x - mean).mul_(rstd)
    wg = g if w is None else g * _narrow(w, dtype).reshape(1, *shape[1:3], 1)
    gi, gw, gb = _norm_terms(g, xhat, rstd, wg, ((2, 3), (0, 3)), True, fi)
    return [gi.reshape(args[1].shape), gw.reshape(-1), gb.reshape(-1)]


def _softmax_backward_terms(
    args: Sequence[Any], _kwargs: dict[str, Any], dtype: Any, fi: FmtInfo | None
) -> list[Any]:
    """``_softmax_backward_data``: grad_input = y (g - m), m = sum(g y) along ``dim``; as a
    norm's grad_input, the reduction's error scale |y| sum|g y| where ``g - m`` does not cancel
    by itself (a gradient constant along the row, as after ``softmax(x).sum()``, is exact)."""
    g, y, dim = _narrow(args[0], dtype), _narrow(args[1], dtype), args[2]
    if fi is None:
        return [torch.zeros_like(g)]
    ay = y.abs()
    scale = ay * (g.abs() * ay).sum(dim, keepdim=True)
    m = (g * y).sum(dim, keepdim=True)
    return [_granted(scale, g - m, g.abs() + m.abs(), torch.zeros_like(g), fi)]


# ----------------------------------------------------------------------------------------------
# fused attention backward (the CPU flash kernel)
# ----------------------------------------------------------------------------------------------
# With S = scale q k^T (+ mask), P = exp(S - lse) and O = P v, the kernel computes
#   dP = g v^T,  D = rowsum(g O),  dS = P (dP - D),
#   grad_query = scale dS k,  grad_key = scale dS^T q,  grad_value = P^T g.
# dS is softmax's backward inside the kernel: a row whose gradient is constant over the keys it
# attends (a single attended key, as in a causal mask's first row; or no gradient through the
# scores at all) has dS = 0 exactly and float32 leaves the rounding noise of D. As for
# _softmax_backward_data, dS gets the error scale of its reductions, P (|g| |v|^T +
# rowsum|g O|), where dP - D does not cancel by itself; the GEMMs around it add their |terms|.


def _attention_probabilities(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    mask: torch.Tensor | None,
    causal: bool,
    scale: float,
) -> torch.Tensor:
    """P = exp(scale q k^T + mask - lse), 0 where a key is masked out (a fully masked row's
    lse is -inf: its P is 0, not NaN). The kernel takes additive masks only (SDPA converts a
    boolean one before)."""
    s = torch.matmul(q, k.transpose(-2, -1)).mul_(scale)
    if mask is not None:
        s = s + mask
    if causal:  # top-left aligned, as torch's is_causal
        keep = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril_()
        s = s.masked_fill(~keep, -math.inf)
    return torch.exp(s - lse.unsqueeze(-1)).nan_to_num_(nan=0.0)


def _attention_backward_terms(
    args: Sequence[Any], kwargs: dict[str, Any], dtype: Any, fi: FmtInfo | None
) -> list[Any]:
    """``_scaled_dot_product_flash_attention_for_cpu_backward``'s three results (see above)."""
    g, q, k, v, out, lse, dropout_p, causal = args[:8]
    if dropout_p or q.shape[:-2] != k.shape[:-2]:
        raise ValueError("dropout or grouped heads: no written-out bound")
    g, q, k, v, out, lse = (_narrow(t, dtype) for t in (g, q, k, v, out, lse))
    mask = kwargs.get("attn_mask")
    mask = _narrow(mask, dtype) if isinstance(mask, torch.Tensor) else None
    scale = kwargs.get("scale")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    p = _attention_probabilities(q, k, lse, mask, bool(causal), scale)
    ag = g.abs()
    dp = torch.matmul(g, v.transpose(-2, -1))
    d = (g * out).sum(-1, keepdim=True)
    diff = dp - d
    e_s = p * diff.abs()  # |dS|: the GEMMs' terms
    if fi is not None:
        err = torch.matmul(ag, v.abs().transpose(-2, -1)).add_((ag * out.abs()).sum(-1, True))
        e_s += _granted(p * err, diff, dp.abs() + d.abs(), torch.zeros_like(dp), fi)
    grad_q = torch.matmul(e_s, k.abs()).mul_(abs(scale))
    grad_k = torch.matmul(e_s.transpose(-2, -1), q.abs()).mul_(abs(scale))
    return [grad_q, grad_k, torch.matmul(p.transpose(-2, -1), ag)]


#: backward packet -> its results' error scales from its (shadow) arguments and keyword
#: arguments, the dtype to compute them in (None: as they are) and the real result's format
#: (None: a float32 bound)
FUSED_BACKWARD_TERMS: dict[str, Callable[[Sequence[Any], dict[str, Any], Any, Any], list[Any]]] = {
    "native_batch_norm_backward": _batch_norm_backward_terms,
    "native_layer_norm_backward": _layer_norm_backward_terms,
    "native_group_norm_backward": _group_norm_backward_terms,
    "_softmax_backward_data": _softmax_backward_terms,
    "_scaled_dot_product_flash_attention_for_cpu_backward": _attention_backward_terms,
}


def sums_of_terms(
    packet: str,
    func: Callable[..., Any],
    args: Sequence[Any],
    kwargs: dict[str, Any],
    dtype: torch.dtype | None = None,
    fi: FmtInfo | None = None,
) -> list[Any] | None:
    """The results' sums of |terms| of op ``packet`` (``func`` run on the shadow ``args``):
    the written-out rule of a fused backward (normalizations, softmax, attention), else
    :func:`abs_terms`. ``dtype``: compute them in it (float32: a lower bound for the fast
    test); ``fi``: the format the real results are judged in (a fused op's reductions get
    their error scale only with it). None where neither applies (the op refuses, or
    arguments are missing)."""
    rule = FUSED_BACKWARD_TERMS.get(packet)
    if rule is None:
        return abs_terms(func, args, kwargs, dtype)
    try:
        return rule(args, kwargs, dtype, None if dtype is not None else fi)
    except Exception:  # an unexpected argument layout: no bound, the plain test decides
        return None


#: A float32 sum of K non-negative terms errs by at most ~(K + 2) * 2^-24 relative to the exact
#: sum of the float64 terms (inputs rounded to float32 included; far less in torch's pairwise
#: sums and blocked GEMMs), ~2^-8 where float32 GEMMs run through bf16: below 1/2 for any
#: K < 2^23. Halved, the float32 sums bound the exact ones from below, so the fast test that
#: uses them stays sufficient: it can only send more results to the slow path, where the
#: float64 sums decide. Underflow and flushed subnormals only make the bound smaller.
_TERMS32_MARGIN = 0.5


def terms_lower_bound(t32: torch.Tensor | None) -> torch.Tensor | None:
    """Float32 sums of |terms| (:func:`abs_terms`) made a lower bound of the float64 sums
    (times :data:`_TERMS32_MARGIN`); None where they are not all finite (a product or a sum
    beyond float32's range: the float64 sums must decide)."""
    if t32 is None or (t32.numel() and not math.isfinite(float(t32.amax()))):
        return None
    return t32 * _TERMS32_MARGIN
