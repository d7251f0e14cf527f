"""The float64 kernels the sanitizer runs on shadows instead of the ops themselves (private).

* Convolutions (:mod:`.convolution`): torch has float64 kernels, but slow ones.
* ``aten._grouped_mm`` (the mixture-of-experts GEMM transformers uses in bf16: one GEMM per
  expert over its slice of the tokens) has no float64 kernel at all, so without one its calls
  ran unshadowed: not checked, and their results taken as exact downstream. Here each group is
  one float64 ``mm``.
"""

from __future__ import annotations

from typing import Any

import torch

from mixprec.sanitizer.convolution import convolution, convolution_backward

aten = torch.ops.aten


def grouped_mm(
    a: torch.Tensor,
    b: torch.Tensor,
    offs: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out_dtype: Any = None,
) -> torch.Tensor:
    """``aten._grouped_mm``'s values in ``a``'s dtype (``out_dtype`` is the real result's:
    shadows stay float64). ``offs`` holds the groups' cumulative end offsets along the
    dimension the 2-d operands share out: the rows of ``a`` (2-d x 3-d), the columns of ``b``
    (3-d x 2-d), the reduction (2-d x 2-d, one result per group); 3-d x 3-d is a batched
    GEMM. Cost: one sync (the offsets), one GEMM per group."""
    if bias is not None:
        raise NotImplementedError("a grouped GEMM with bias has no float64 kernel here")
    if a.dim() == 3 and b.dim() == 3:
        return torch.bmm(a, b)
    if offs is None:
        raise ValueError("a grouped GEMM of a 2-d operand needs its offsets")
    ends = offs.tolist()
    spans = list(zip([0, *ends[:-1]], ends, strict=True))
    if a.dim() == 2 and b.dim() == 3:
        out = a.new_zeros(a.shape[0], b.shape[-1])
        for g, (s, e) in enumerate(spans):
            torch.mm(a[s:e], b[g], out=out[s:e])
        return out
    if a.dim() == 3 and b.dim() == 2:
        out = a.new_zeros(a.shape[1], b.shape[-1])
        for g, (s, e) in enumerate(spans):
            out[:, s:e] = a[g] @ b[:, s:e]
        return out
    out = a.new_zeros(len(spans), a.shape[0], b.shape[-1])
    for g, (s, e) in enumerate(spans):
        torch.mm(a[:, s:e], b[s:e], out=out[g])
    return out


SHADOW_KERNELS = {
    aten.convolution.default: convolution,
    aten.convolution_backward.default: convolution_backward,
    aten._grouped_mm.default: grouped_mm,
}
