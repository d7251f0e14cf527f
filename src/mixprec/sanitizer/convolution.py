"""Float64 shadows of 2-d convolutions at GEMM speed (private to the sanitizer).

torch's CPU convolution in float64 has no oneDNN kernel: it lays out each image's patches
(im2col) element by element, which costs 3-10x the GEMM that follows, and writes them into
fresh memory (page faults) on every call. On a ResNet the float64 shadows of the convolutions,
forward and backward, took more than half of a sanitized step.

Here the patches are copied with the channels innermost (a padded channels-last copy of the
input, then one strided copy whose contiguous runs are ``kernel_width * channels`` long) into
a buffer of about 2 MiB that every group of images reuses, and each group is one GEMM. The
input gradient is the same correlation of the output gradient with the flipped, transposed
weight (stride 1), or the windows' gradients added back into the input (larger strides). A
float64 sum in another order: the shadow stays float64-accurate, which is all a shadow
promises (the measurements allow for it).

Served: CPU float64 2-d convolutions, not transposed, one group, no dilation, kernels larger
than 1x1 (torch's 1x1 path is a plain GEMM already), with 128k window elements or more. Every
other call runs torch's op.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

aten = torch.ops.aten

#: Elements of the patch buffer (float64: 2 MiB, cache-sized); a group of images fills it.
_CHUNK = 1 << 18
#: Calls with fewer window elements run torch's op: its per-image im2col stays in cache there,
#: and this module's fixed cost (~0.1 ms of small ops) would exceed what it saves (ResNet
#: layers: 73k elements 0.07 ms in torch, 0.10 here; 150k-300k, 0.6-1.5 ms against 0.3-0.7).
_MIN_PATCHES = 1 << 17


def _served(
    x: torch.Tensor, w: torch.Tensor, stride: Sequence[int], padding: Sequence[int],
    dilation: Sequence[int], transposed: bool, groups: int,
) -> bool:  # fmt: skip
    return (
        x.dtype == torch.float64
        and w.dtype == torch.float64
        and x.is_cpu
        and x.dim() == 4
        and w.dim() == 4
        and not transposed
        and groups == 1
        and len(stride) == 2
        and len(padding) == 2
        and all(d == 1 for d in dilation)
        and w.shape[2] * w.shape[3] > 1
        and _patch_elements(x, w, stride, padding) >= _MIN_PATCHES
    )


def _patch_elements(
    x: torch.Tensor, w: torch.Tensor, stride: Sequence[int], padding: Sequence[int]
) -> int:
    """Elements of all the call's windows (output pixels x kh * kw * C): what im2col copies."""
    n, c, h, wd = x.shape
    _, _, kh, kw = w.shape
    ho = (h + 2 * padding[0] - kh) // stride[0] + 1
    wo = (wd + 2 * padding[1] - kw) // stride[1] + 1
    return n * max(ho, 0) * max(wo, 0) * kh * kw * c


def _padded_nhwc(x: torch.Tensor, pads: tuple[int, int, int, int]) -> torch.Tensor:
    """``x`` (N, C, H, W) as channels-last rows (N, H', W', C), zero-padded by ``pads`` =
    (top, bottom, left, right)."""
    top, bottom, left, right = pads
    n, c, h, w = x.shape
    xp = x.new_zeros(n, h + top + bottom, w + left + right, c)
    xp[:, top : top + h, left : left + w] = x.permute(0, 2, 3, 1)
    return xp


def _windows(
    x: torch.Tensor, kernel: tuple[int, int], stride: Sequence[int], pads: tuple[int, int, int, int]
) -> tuple[torch.Tensor, int, int]:
    """Every output pixel's input window, a view (N, Ho, Wo, kh, kw * C) of the padded
    channels-last input (a window row's kw pixels of C channels are contiguous), and Ho, Wo."""
    xp = _padded_nhwc(x, pads)
    n, hp, wp, c = xp.shape
    kh, kw = kernel
    ho, wo = (hp - kh) // stride[0] + 1, (wp - kw) // stride[1] + 1
    sn, sh, sw, _ = xp.stride()
    shape = (n, ho, wo, kh, kw * c)
    return xp.as_strided(shape, (sn, stride[0] * sh, stride[1] * sw, sh, 1)), ho, wo


def _patch_groups(win: torch.Tensor) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(first image, images, patch rows): the windows of a group of images copied into one
    reused buffer (rows: output pixels; columns: kh * kw * C)."""
    n, ho, wo, kh, row = win.shape
    per_image = ho * wo * kh * row
    per = max(1, _CHUNK // per_image)
    buf = win.new_empty(min(per, n) * ho * wo, kh * row)
    for n0 in range(0, n, per):
        m = min(per, n - n0)
        cols = buf[: m * ho * wo]
        cols.view(m, ho, wo, kh, row).copy_(win[n0 : n0 + m])
        yield n0, m, cols


def _correlate(
    x: torch.Tensor, w: torch.Tensor, stride: Sequence[int], pads: tuple[int, int, int, int]
) -> torch.Tensor:
    """Cross-correlation of ``x`` (N, C, H, W) with ``w`` (O, C, kh, kw) (what torch calls a
    convolution), as channels-last output rows (N, Ho, Wo, O)."""
    o = w.shape[0]
    win, ho, wo = _windows(x, (w.shape[2], w.shape[3]), stride, pads)
    wm = w.permute(2, 3, 1, 0).reshape(-1, o)  # (kh * kw * C, O): the window's order
    out = x.new_empty(x.shape[0] * ho * wo, o)
    rows = ho * wo
    for n0, m, cols in _patch_groups(win):
        torch.mm(cols, wm, out=out[n0 * rows : (n0 + m) * rows])
    return out.view(x.shape[0], ho, wo, o)


def convolution(
    x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, stride: Sequence[int],
    padding: Sequence[int], dilation: Sequence[int], transposed: bool,
    output_padding: Sequence[int], groups: int,
) -> torch.Tensor:  # fmt: skip
    """``aten.convolution``'s values; served calls (module docstring) at GEMM speed, with the
    result in the layout torch's op gives."""
    if not _served(x, w, stride, padding, dilation, transposed, groups):
        return aten.convolution.default(
            x, w, bias, stride, padding, dilation, transposed, output_padding, groups
        )
    ph, pw = padding
    out = _correlate(x, w, stride, (ph, ph, pw, pw))
    if bias is not None:
        out += bias
    return _like_torch(out.permute(0, 3, 1, 2), x)


def _like_torch(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``t`` (channels-last) in the layout torch's op gives for input ``x``: channels-last for
    a channels-last input, else contiguous. The shadows' later ops then run the kernels the
    real ones run (float64 batch norm over channels-last data costs several times more)."""
    if x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
        return t.contiguous()
    return t


def _rows(g: torch.Tensor) -> torch.Tensor:
    """The output gradient (N, O, Ho, Wo) as channels-last rows (N * Ho * Wo, O): a copy."""
    return g.permute(0, 2, 3, 1).reshape(-1, g.shape[1])


def _input_grad(
    g: torch.Tensor, g_rows: torch.Tensor | None, w: torch.Tensor, size: Sequence[int],
    stride: Sequence[int], padding: Sequence[int],
) -> torch.Tensor | None:  # fmt: skip
    """The gradient of a served convolution's input (N, C, H, W) from its output gradient.

    Stride 1: the correlation of ``g`` with the weight flipped in space and transposed (O and
    C swapped), padded to the input's size (None where the padding exceeds the kernel: no such
    correlation). Larger strides: each output pixel's window gradient (a GEMM) added into the
    padded input, one strided add per kernel offset (a correlation would first dilate ``g``
    with zeros: stride^2 times the GEMM); ``g_rows``: :func:`_rows` of ``g``, if made already."""
    o, c, kh, kw = w.shape
    (sh, sw), (ph, pw) = stride, padding
    n, _, ho, wo = g.shape
    if sh == 1 and sw == 1:
        if ph > kh - 1 or pw > kw - 1:
            return None
        # output y gathers g at y + p - i: left pad k - 1 - p, the right pad makes the size H
        pads = (kh - 1 - ph, size[2] - ho + ph, kw - 1 - pw, size[3] - wo + pw)
        gi = _correlate(g, w.flip(2, 3).transpose(0, 1), stride, pads)
        return _like_torch(gi.permute(0, 3, 1, 2), g)
    g_rows = _rows(g) if g_rows is None else g_rows
    win_grads = (g_rows @ w.permute(0, 2, 3, 1).reshape(o, -1)).view(n, ho, wo, kh, kw, c)
    h, wd = size[2], size[3]
    gp = g.new_zeros(n, h + 2 * ph, wd + 2 * pw, c)  # padded, channels-last
    for i in range(kh):
        for j in range(kw):
            rows, cols = slice(i, i + sh * (ho - 1) + 1, sh), slice(j, j + sw * (wo - 1) + 1, sw)
            gp[:, rows, cols] += win_grads[:, :, :, i, j]
    return _like_torch(gp[:, ph : ph + h, pw : pw + wd].permute(0, 3, 1, 2), g)


def _weight_grad(
    g_rows: torch.Tensor, x: torch.Tensor, w: torch.Tensor, stride: Sequence[int],
    padding: Sequence[int],
) -> torch.Tensor:  # fmt: skip
    """The gradient of a served convolution's weight: the output gradient's channels-last rows
    (:func:`_rows`) times the input windows, summed over the image groups."""
    o, c, kh, kw = w.shape
    ph, pw = padding
    win, ho, wo = _windows(x, (kh, kw), stride, (ph, ph, pw, pw))
    rows = ho * wo
    gw = x.new_zeros(o, kh * kw * c)
    for n0, m, cols in _patch_groups(win):
        gw.addmm_(g_rows[n0 * rows : (n0 + m) * rows].t(), cols)
    return _like_torch(gw.view(o, kh, kw, c).permute(0, 3, 1, 2), w)


def convolution_backward(
    g: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias_sizes: Sequence[int] | None,
    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], transposed: bool,
    output_padding: Sequence[int], groups: int, output_mask: Sequence[bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:  # fmt: skip
    """``aten.convolution_backward``'s values; served calls at GEMM speed."""
    gi = None
    served = _served(x, w, stride, padding, dilation, transposed, groups)
    # the output gradient as rows, made once where both gradients use it
    g_rows = _rows(g) if served and output_mask[1] else None
    if served and output_mask[0]:
        gi = _input_grad(g, g_rows, w, x.shape, stride, padding)
        served = gi is not None
    if not served:
        return aten.convolution_backward.default(
            g, x, w, bias_sizes, stride, padding, dilation, transposed, output_padding, groups,
            output_mask,
        )  # fmt: skip
    gw = _weight_grad(g_rows, x, w, stride, padding) if g_rows is not None else None
    gb = g.sum((0, 2, 3)) if output_mask[2] else None
    return gi, gw, gb
