"""The sanitizer's own float64 convolutions (the shadows of large 2-d convolutions).

Oracle: torch's float64 ``aten.convolution`` and ``aten.convolution_backward`` on the same
arguments. A shadow is a float64 sum in another order, so the values agree to float64 rounding
of the sums of |terms|, not bit for bit; shapes and layouts agree exactly, and every call the
module does not serve returns torch's own result.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from mixprec.sanitizer import convolution as conv
from mixprec.sanitizer import sanitize
from mixprec.sanitizer.ops import classify

aten = torch.ops.aten


def _rand(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=g)


def _layout(t: torch.Tensor) -> list[int]:
    """Strides of the dimensions longer than 1 (a length-1 dimension's stride is arbitrary)."""
    return [st for st, n in zip(t.stride(), t.shape, strict=True) if n > 1]


def _close(got: torch.Tensor, want: torch.Tensor, terms: torch.Tensor) -> None:
    """Equal to float64 rounding: within 2^-45 of the sums of |terms| (sums of up to a few
    hundred terms, each rounding by 2^-53 relative)."""
    assert got.shape == want.shape and _layout(got) == _layout(want)
    assert bool(((got - want).abs() <= 2.0**-45 * terms).all())


_SHAPES = list(
    itertools.product(
        [1, 3],  # images
        [1, 4],  # input channels
        [(5, 7), (8, 6)],  # input height, width
        [(2, 3), (3, 3), (5, 4)],  # kernel
        [(1, 1), (2, 2), (2, 3), (3, 1)],  # stride
        [(0, 0), (1, 1), (2, 1)],  # padding
    )
)


@pytest.mark.parametrize(("n", "c", "hw", "k", "stride", "pad"), _SHAPES)
def test_served_convolutions_match_torch(
    n: int, c: int, hw: tuple[int, int], k: tuple[int, int], stride: tuple[int, int],
    pad: tuple[int, int], monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setattr(conv, "_MIN_PATCHES", 0)  # serve every size here
    if hw[0] + 2 * pad[0] < k[0] or hw[1] + 2 * pad[1] < k[1]:
        pytest.skip("kernel larger than the padded input")
    g = torch.Generator().manual_seed(n * 1000 + c * 100 + k[0] * 10 + stride[1])
    x, w, b = _rand(g, n, c, *hw), _rand(g, 5, c, *k), _rand(g, 5)
    rest: tuple[Any, ...] = (list(stride), list(pad), [1, 1], False, [0, 0], 1)
    want = aten.convolution.default(x, w, b, *rest)
    terms = aten.convolution.default(x.abs(), w.abs(), b.abs(), *rest)
    _close(conv.convolution(x, w, b, *rest), want, terms)
    gout = _rand(g, *want.shape)
    for mask in ([True, True, True], [True, False, False], [False, True, False]):
        wants = aten.convolution_backward.default(gout, x, w, [5], *rest, mask)
        tw = aten.convolution_backward.default(gout.abs(), x.abs(), w.abs(), [5], *rest, mask)
        gots = conv.convolution_backward(gout, x, w, [5], *rest, mask)
        for got, want_i, t in zip(gots, wants, tw, strict=True):
            assert (got is None) == (want_i is None)
            if got is not None:
                _close(got, want_i, t)


def test_channels_last_inputs_keep_torchs_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(conv, "_MIN_PATCHES", 0)
    g = torch.Generator().manual_seed(1)
    x = _rand(g, 2, 3, 9, 9).contiguous(memory_format=torch.channels_last)
    w = _rand(g, 4, 3, 3, 3)
    rest: tuple[Any, ...] = ([1, 1], [1, 1], [1, 1], False, [0, 0], 1)
    want = aten.convolution.default(x, w, None, *rest)
    got = conv.convolution(x, w, None, *rest)
    assert got.is_contiguous(memory_format=torch.channels_last)
    _close(got, want, aten.convolution.default(x.abs(), w.abs(), None, *rest))


@pytest.mark.parametrize(
    "case",
    ["float32", "groups", "dilation", "transposed", "1x1", "conv1d", "small", "padding > kernel"],
)
def test_calls_it_does_not_serve_are_torchs_own(case: str) -> None:
    """Outside the served cases the result is torch's, bit for bit (it is torch's call); an
    input gradient whose padding exceeds the kernel has no correlation form: the whole backward
    call is torch's."""
    g = torch.Generator().manual_seed(2)
    x, w = _rand(g, 8, 4, 24, 24), _rand(g, 6, 4, 3, 3)
    stride, pad, dil, transposed, groups = [1, 1], [1, 1], [1, 1], False, 1
    if case == "float32":
        x, w = x.float(), w.float()
    elif case == "groups":
        w, groups = _rand(g, 6, 2, 3, 3), 2
    elif case == "dilation":
        dil = [2, 2]
    elif case == "transposed":
        w, transposed = _rand(g, 4, 6, 3, 3), True
    elif case == "1x1":
        w, pad = _rand(g, 6, 4, 1, 1), [0, 0]
    elif case == "conv1d":
        x, w, stride, pad, dil = x[:, :, 0], w[:, :, 0], [1], [1], [1]
    elif case == "small":
        x = x[:1, :, :8, :8]
    elif case == "padding > kernel":
        pad = [3, 3]
    rest: tuple[Any, ...] = (stride, pad, dil, transposed, [0] * len(stride), groups)
    want = aten.convolution.default(x, w, None, *rest)
    if case != "padding > kernel":  # its forward is served; the input gradient is not
        assert torch.equal(conv.convolution(x, w, None, *rest), want)
    gout = torch.randn(want.shape, dtype=want.dtype, generator=g)
    mask = [True, True, False]
    wants = aten.convolution_backward.default(gout, x, w, None, *rest, mask)
    gots = conv.convolution_backward(gout, x, w, None, *rest, mask)
    assert all(torch.equal(a, b) for a, b in zip(gots[:2], wants[:2], strict=True))


def test_the_sanitizer_runs_them_on_shadows() -> None:
    assert classify(aten.convolution.default).shadow_op is conv.convolution
    assert classify(aten.convolution_backward.default).shadow_op is conv.convolution_backward


def test_an_overflowing_half_convolution_is_found_with_its_float64_value() -> None:
    """A float16 convolution whose sums pass 65504: every output is inf, the finding names the
    convolution, and its shadow value is the exact sum (a served size: 295k window elements)."""
    x = torch.full((4, 8, 32, 32), 200.0, dtype=torch.float16)
    w = torch.full((8, 8, 3, 3), 30.0, dtype=torch.float16)
    with sanitize() as report:
        y = F.conv2d(x, w)
    assert bool(torch.isinf(y).all())
    (f,) = [f for f in report.findings if f.op == "aten.convolution.default"]
    assert f.kind == "overflow" and f.count == y.numel()
    assert f.shadow_value == 8 * 9 * 200.0 * 30.0  # exact: integers far below 2^53
