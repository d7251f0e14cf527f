"""``round_to``: the unchecked seam under ``quantize`` gives the same bits, gradient and notices."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

import pytest
import torch

import mixprec.quantization as q
from mixprec.formats import FORMATS, get_format
from mixprec.quantization import elementwise, quantize, register_rounding_observer, round_to
from mixprec.quantization.elementwise import round_data_

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


def _specials(n: int, seed: int) -> torch.Tensor:
    """Random float32 bit patterns (NaN payloads, subnormals, both zeros, infinities) plus
    values over every binade, in one contiguous tensor."""
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(-(1 << 31), 1 << 31, (n,), generator=g, dtype=torch.int64)
    pats = bits.to(torch.int32).view(torch.float32)
    spread = torch.randn(n, generator=g) * torch.exp2(torch.randint(-150, 128, (n,), generator=g))
    edges = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-45, -1e-45])
    return torch.cat([pats, spread, edges])


def _c_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the C kernel's element-rounding calls."""
    calls: list[int] = []
    kernel = q.elementwise._kernels.quantize
    monkeypatch.setattr(
        q.elementwise._kernels, "quantize", lambda *a: calls.append(1) or kernel(*a)
    )
    return calls


@pytest.mark.skipif(not q.has_c_kernel(), reason="C kernel not built")
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_one_call_lane_is_the_general_path_bit_for_bit(
    fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """round_to's eager lane (float32, nearest, one C call) and round_data_ give the general
    path's bits (``_round``: checks, work buffers, ``_run_c``) for every format, saturating or
    not, specials included; one kernel call each, no version bump for round_data_."""
    f = get_format(fmt)
    x = _specials(3000, 11)
    calls = _c_calls(monkeypatch)
    for saturate in (False, True):
        want = elementwise._round(x, f, "nearest", saturate, True, None, None)
        n = len(calls)
        got = round_to(x, f, saturate=saturate)
        assert len(calls) == n + 1 and got is not x
        assert torch.equal(got.view(torch.int32), want.view(torch.int32))
        w = x.clone().requires_grad_()
        version = w._version
        round_data_(w, f, saturate=saturate)
        assert w._version == version  # a straight-through write: autograd does not see it
        assert torch.equal(w.detach().view(torch.int32), want.view(torch.int32))


def test_one_call_lane_steps_aside(
    monkeypatch: pytest.MonkeyPatch, set_backend: Callable[[str], str]
) -> None:
    """Observed roundings, the torch backend, non-contiguous tensors and other dtypes take the
    general path, with the same values."""
    f = get_format("e4m3")
    x = torch.randn(64, 33)
    want = quantize(x, f)
    seen: list[str] = []
    with register_rounding_observer(lambda s, r, fmt: seen.append(fmt.name)):
        assert torch.equal(round_to(x, f), want)
        y = x.clone()
        round_data_(y, f)
        assert torch.equal(y, want)
    assert seen == ["float8_e4m3fn", "float8_e4m3fn"]
    cols = x[:, :32]  # not contiguous: a temporary
    z = x.clone()
    round_data_(z[:, :32], f)
    assert torch.equal(z[:, :32], want[:, :32]) and torch.equal(z[:, 32], x[:, 32])
    assert torch.equal(round_to(cols, f), want[:, :32])
    assert torch.equal(round_to(x.double(), f), want.double())
    set_backend("torch")
    calls = _c_calls(monkeypatch) if elementwise._kernels is not None else []
    assert torch.equal(round_to(x, f), want)
    assert calls == []


def test_quantize_backend_switches_and_refuses_bad_names(set_backend: Callable[[str], str]) -> None:
    assert q.quantize_backend() in q.QUANTIZE_BACKENDS
    assert set_backend("torch") == "torch" and not q.has_c_kernel()
    assert set_backend("auto") == "auto"
    assert q.has_c_kernel() == (elementwise._kernels is not None)
    with pytest.raises(ValueError, match=r"unknown quantize backend 'c'; valid: 'auto', 'torch'"):
        q.quantize_backend("c")
    with pytest.raises(TypeError, match="backend must be a string or None, got int"):
        q.quantize_backend(1)  # type: ignore[arg-type]
    assert q.quantize_backend() == "auto"  # a refused name changes nothing


@pytest.mark.parametrize(
    ("env", "expected"), [("torch", "torch"), ("bogus", "auto"), (None, "auto")]
)
def test_environment_variable_sets_the_backend_at_import(env: str | None, expected: str) -> None:
    environ = {k: v for k, v in os.environ.items() if k != "MIXPREC_BACKEND"}
    if env is not None:
        environ["MIXPREC_BACKEND"] = env
    code = "import mixprec.quantization as q; print(q.quantize_backend())"
    out = subprocess.run(
        [sys.executable, "-c", code], env=environ, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == expected


@pytest.mark.skipif(not q.has_c_kernel(), reason="C kernel not built")
def test_round_data_runs_over_a_permuted_layout_in_one_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A permutation of a contiguous layout (a transpose, heads split by view + transpose), also
    inside a larger storage, is rounded in place in one kernel call over its span, with the
    general path's bits; a strided view with gaps takes the general path. Neither touches
    memory outside the view."""
    f = get_format("e4m3")
    shape = (4, 2, 3, 5, 7)
    big = _specials(420, 13)[: 4 * 2 * 3 * 5 * 7].view(shape)
    flat_index = torch.arange(big.numel()).view(shape)
    calls = _c_calls(monkeypatch)
    views = [
        big[1].permute(2, 0, 3, 1),
        big.transpose(1, 3),
        big.view(-1)[30:54].as_strided((1, 4, 6), (999, 1, 4)),  # a size-1 dim's stride is moot
        big[2, :, 1].transpose(0, 2),
    ]
    assert [elementwise._gap_free(v) for v in views] == [True, True, True, False]
    for v in views:
        want = elementwise._round(v, f, "nearest", False, True, None, None)
        before = big.clone()
        n = len(calls)
        round_data_(v, f)
        if elementwise._gap_free(v):
            assert len(calls) == n + 1  # one call over the span
        assert torch.equal(v.view(torch.int32), want.view(torch.int32))
        inside = torch.zeros(big.numel(), dtype=torch.bool)
        inside[flat_index.as_strided(v.shape, v.stride(), v.storage_offset()).reshape(-1)] = True
        changed = (big.view(torch.int32) != before.view(torch.int32)).reshape(-1)
        assert bool(changed.any()) and not bool((changed & ~inside).any())
        big.copy_(before)
