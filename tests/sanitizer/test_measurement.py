"""The sums of |terms| that judge a sum of products, computed in float32 for the fast test."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from mixprec.sanitizer import measurement, sanitize
from mixprec.sanitizer.measurement import abs_terms, terms_lower_bound

aten = torch.ops.aten


def _f64(*shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64) * scale


def _ops(scale: float) -> list[tuple[Any, tuple[Any, ...], dict[str, Any]]]:
    """Multilinear aten ops and reductions on float64 arguments (the sanitizer's shadows)."""
    x, w = _f64(4, 3, 9, 9, scale=scale), _f64(5, 3, 3, 3, scale=scale)
    g = _f64(4, 5, 5, 5, scale=scale)
    return [
        (aten.mm.default, (_f64(7, 300, scale=scale), _f64(300, 5, scale=scale)), {}),
        (
            aten.addmm.default,
            (_f64(5, scale=scale), _f64(7, 30, scale=scale), _f64(30, 5, scale=scale)),
            {"beta": -0.5, "alpha": -2.0},
        ),
        (aten.bmm.default, (_f64(3, 6, 40, scale=scale), _f64(3, 40, 2, scale=scale)), {}),
        (aten.convolution.default, (x, w, None, [2, 2], [1, 1], [1, 1], False, [0, 0], 1), {}),
        (
            aten.convolution_backward.default,
            (g, x, w, [5], [2, 2], [1, 1], [1, 1], False, [0, 0], 1, [True, True, True]),
            {},
        ),
        (aten.sum.dim_IntList, (_f64(6, 500, scale=scale), [1]), {}),
    ]


@pytest.mark.parametrize("k", range(6))
def test_float32_sums_of_terms_bound_the_float64_sums_from_below(k: int) -> None:
    torch.manual_seed(k)
    func, args, kwargs = _ops(1.0)[k]
    exact = abs_terms(func, args, kwargs)
    approx = abs_terms(func, args, kwargs, torch.float32)
    assert exact is not None and approx is not None
    for e, a in zip(exact, approx, strict=True):
        if not isinstance(e, torch.Tensor):
            continue
        assert e.dtype == torch.float64 and a.dtype == torch.float32
        bound = terms_lower_bound(a)
        assert bound is not None
        assert bool((bound.double() <= e).all())
        # and not a useless bound: half the exact sums up to float32's error
        assert bool((bound.double() >= 0.5 * e * (1 - 2.0**-12)).all())
        # the float64 sums are of |terms|: they bound the op's own result
        assert bool((e >= 0).all())


@pytest.mark.parametrize("dtype", [None, torch.float32, torch.float64])
def test_sums_of_terms_leave_the_shadows_alone_and_take_exact_magnitudes(
    dtype: torch.dtype | None,
) -> None:
    """The |arguments| are fresh tensors whatever ``dtype`` asks (narrowed before abs: the
    same values, rounding commutes with abs), so the shadows passed in keep their signs."""
    x = _f64(6, 7)
    before = x.clone()
    seen: list[torch.Tensor] = []
    out = abs_terms(lambda t: seen.append(t) or t, (x,), {}, dtype)
    assert out is not None and seen[0] is not x
    assert torch.equal(x, before)
    want = x.abs() if dtype in (None, torch.float64) else x.abs().to(dtype)
    assert torch.equal(seen[0], want)


def test_float64_sums_beyond_float32_range_are_not_bounded_in_float32() -> None:
    torch.manual_seed(0)
    func, args, kwargs = _ops(1e25)[0]  # products ~1e50: past float32's max
    approx = abs_terms(func, args, kwargs, torch.float32)
    assert approx is not None
    assert terms_lower_bound(approx[0]) is None  # the float64 sums decide
    assert terms_lower_bound(torch.tensor([1.0, float("nan")])) is None
    assert terms_lower_bound(torch.zeros(0)) is not None


def test_an_op_refusing_float32_arguments_gives_none() -> None:
    def only_float64(t: torch.Tensor) -> torch.Tensor:
        if t.dtype != torch.float64:
            raise TypeError("float64 only")
        return t

    assert abs_terms(only_float64, (_f64(3),), {}, torch.float32) is None
    out = abs_terms(only_float64, (-_f64(3).abs(),), {})
    assert out is not None and bool((out[0] >= 0).all())


def _spy_on_sums_of_terms(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, Any]]:
    """The (op, dtype) of every sums-of-|terms| computation the sanitizer makes from now on."""
    seen: list[tuple[Any, Any]] = []

    def spy(func: Any, args: Any, kwargs: dict[str, Any], dtype: Any = None) -> Any:
        seen.append((func, dtype))
        return abs_terms(func, args, kwargs, dtype)

    monkeypatch.setattr(measurement, "abs_terms", spy)
    return seen


def test_a_cancelling_convolution_is_judged_on_the_fast_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Outputs that cancel to ~0 (inputs near 100, kernels of +1 and -1) fail the cheap test
    but are fine against their sums of |terms|; float32 sums decide that for the forward
    convolution (no float64 sums, no slow path) and nothing is reported."""
    seen = _spy_on_sums_of_terms(monkeypatch)
    torch.manual_seed(0)
    x = 100.0 + 1e-3 * torch.randn(2, 4, 12, 12)
    w = torch.ones(6, 4, 3, 3)
    w[:, :2] = -1.0
    w.requires_grad_(True)
    with sanitize() as report:
        F.conv2d(x, w).square().sum().backward()
    assert report.findings == []
    assert [d for f, d in seen if f is aten.convolution.default] == [torch.float32]
    assert (aten.convolution_backward.default, torch.float32) in seen


def test_an_inherited_error_is_not_judged_against_sums_of_terms(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A GEMM whose error is the one its input brought (a cancelling subtraction before it) is
    no finding of its own, whatever its sums of |terms|: they are never computed for it (the op
    once more, in float32), only the subtraction is reported."""
    seen = _spy_on_sums_of_terms(monkeypatch)
    torch.manual_seed(0)
    x = 1e-3 * torch.rand(16, 32)
    w = torch.randn(32, 8)
    with sanitize() as report:
        u = (x + 1e4) - 1e4  # keeps ~4 of x's 24 bits
        torch.mm(u, w)
    assert [f.op for f in report.findings] == ["aten.sub.Tensor"]
    assert report.stats["ops_shadowed"] == 3
    assert aten.mm.default not in [f for f, _ in seen]
