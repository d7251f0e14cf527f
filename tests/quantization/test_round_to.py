"""``round_to``: the unchecked seam under ``quantize`` gives the same bits, gradient and notices."""

from __future__ import annotations

import pytest
import torch

import mixprec.quantization as q
from mixprec.formats import get_format
from mixprec.quantization import quantize, register_rounding_observer, round_to

MODES = ["nearest", "stochastic", "toward_zero", "up", "down", "odd"]
BITS = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16}


@pytest.mark.parametrize("fmt", ["bfloat16", "float8_e4m3fn", "float8_e5m2", "e3m2", "e8m0"])
@pytest.mark.parametrize("rounding", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_same_bits_as_quantize(fmt: str, rounding: str, dtype: torch.dtype) -> None:
    x = (torch.randn(257, generator=torch.Generator().manual_seed(1)) * 300).to(dtype)
    f = get_format(fmt)
    for saturate in (False, True):
        a = quantize(x, f, rounding=rounding, saturate=saturate,
                     generator=torch.Generator().manual_seed(5))  # fmt: skip
        b = round_to(x, f, rounding=rounding, saturate=saturate,
                     generator=torch.Generator().manual_seed(5))  # fmt: skip
        assert torch.equal(a.view(BITS[dtype]), b.view(BITS[dtype]))  # NaNs included


def test_out_in_place_matches_quantize() -> None:
    x = torch.randn(64, 33)[:, :32]  # not contiguous: the kernels copy
    expected = quantize(x, "e4m3", subnormals=False)
    y = x.clone()
    res = round_to(y, get_format("e4m3"), subnormals=False, out=y)
    assert res is y
    assert torch.equal(y, expected)


def test_gradient_is_zero_as_quantize() -> None:
    x = torch.randn(8, requires_grad=True)
    y = round_to(x, get_format("bf16"))
    assert y.requires_grad
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros(8))


def test_observers_are_notified() -> None:
    seen: list[tuple[torch.Tensor, torch.Tensor, str]] = []
    x = torch.randn(4)
    with register_rounding_observer(lambda s, r, f: seen.append((s, r, f.name))):
        r = round_to(x, get_format("fp16"))
    assert len(seen) == 1
    assert seen[0][0] is x and seen[0][1] is r and seen[0][2] == "float16"


def test_exported() -> None:
    assert "round_to" in q.__all__
