"""The sums of |terms| that judge a sum of products (computed in float32 for the fast test), and
the normalizations whose means and gradients are such sums."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from sanitizer_helpers import only

from mixprec.formats import get_format
from mixprec.sanitizer import measurement, sanitize
from mixprec.sanitizer.terms import abs_terms, sums_of_terms, terms_lower_bound
from mixprec.sanitizer.tolerances import make_fmt_info

aten = torch.ops.aten
_F32 = make_fmt_info(get_format("float32"), None)  # float32 results, default threshold


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

    def spy(packet: str, func: Any, args: Any, kwargs: dict[str, Any], *rest: Any) -> Any:
        seen.append((func, rest[0] if rest else None))
        return sums_of_terms(packet, func, args, kwargs, *rest)

    monkeypatch.setattr(measurement, "sums_of_terms", spy)
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


# ----------------------------------------------------------------------------------------------
# normalizations: means and gradients that are sums
# ----------------------------------------------------------------------------------------------


def _norm_case(kind: str, train: bool = True) -> tuple[Any, tuple[Any, ...], torch.Tensor, Any]:
    """(backward op, its float64 arguments, |xhat| from the forward op, |w|): statistics made by
    the forward op itself, so the written-out sums are checked against an independent xhat."""
    torch.manual_seed(1)
    g, w = _f64(4, 6, 5, 5), _f64(6) + 0.5
    x = 3.0 + _f64(4, 6, 5, 5)
    mask = [True, True, True]
    if kind == "batch":
        rm, rv = _f64(6), _f64(6).abs() + 0.5
        out, mean, invstd = aten.native_batch_norm(x, None, None, rm, rv, train, 0.0, 1e-5)
        if not train:
            out = (x - rm.view(1, -1, 1, 1)) * torch.rsqrt(rv + 1e-5).view(1, -1, 1, 1)
        args = (g, x, w, rm, rv, mean, invstd, train, 1e-5, mask)
        return aten.native_batch_norm_backward.default, args, out.abs(), w.view(1, -1, 1, 1)
    if kind == "layer":
        wl = _f64(5, 5) + 0.5
        out, mean, rstd = aten.native_layer_norm(x, [5, 5], None, None, 1e-5)
        args = (g, x, [5, 5], mean, rstd, wl, _f64(5, 5), mask)
        return aten.native_layer_norm_backward.default, args, out.abs(), wl
    out, mean, rstd = aten.native_group_norm(x, None, None, 4, 6, 25, 3, 1e-5)
    args = (g, x, mean, rstd, w, 4, 6, 25, 3, mask)
    return aten.native_group_norm_backward.default, args, out.abs(), w.view(1, -1, 1, 1)


_NORMS = [("batch", True), ("batch", False), ("layer", True), ("group", True)]


@pytest.mark.parametrize(("kind", "train"), _NORMS)
def test_norm_backward_sums_of_terms_are_written_out(kind: str, train: bool) -> None:
    """The gradients of batch / layer / group norm subtract means (``g - mean(g)``,
    ``x - mean``): run on |arguments| they would cancel as before, so their sums are written
    out. Checked against sums built from the forward op's own |xhat|: grad_bias sums |g|,
    grad_weight |g| |xhat| (each bounds |the op's result|); grad_input (training statistics)
    gets its reductions' error scale ``rstd (mean|w g| + |xhat| mean|w g xhat|)`` where its
    elementwise subtraction does not cancel (nearly everywhere on random data), and nothing
    from a float32 bound (the float64 test decides)."""
    func, args, axhat, aw = _norm_case(kind, train)
    packet = func.overloadpacket.__name__
    got = sums_of_terms(packet, func, args, {}, None, _F32)
    assert got is not None and len(got) == 3
    g = args[0].abs()
    if kind == "layer":
        group, params, rstd = (2, 3), (0, 1), args[4]
    elif kind == "batch":
        group = params = (0, 2, 3)
        rstd = args[6] if train else torch.rsqrt(args[4] + 1e-5)
        rstd = rstd.view(1, -1, 1, 1)
    else:
        group, params = None, (0, 2, 3)
        rstd = args[3].repeat_interleave(2, dim=1).view(4, 6, 1, 1)

    def gm(t: torch.Tensor) -> torch.Tensor:  # the mean over each normalized group
        if group is not None:
            return t.mean(group, keepdim=True)
        return t.view(4, 3, -1).mean(-1).repeat_interleave(2, dim=1).view(4, 6, 1, 1)

    wg = g * aw.abs()
    want_in = rstd * wg if not train else rstd * (gm(wg) + axhat * gm(wg * axhat))
    want = [want_in, (g * axhat).sum(params), g.sum(params)]
    exact = func(*args)
    granted = got[0] > 0
    assert granted.double().mean() > 0.95
    torch.testing.assert_close(got[0][granted], want_in.expand_as(got[0])[granted])
    for t, w_, e in zip(got[1:], want[1:], exact[1:], strict=True):
        assert t.shape == e.shape
        torch.testing.assert_close(t, w_.reshape(e.shape), rtol=1e-9, atol=1e-12)
        assert bool((t >= e.abs() * (1 - 1e-9)).all())  # a sum of |terms| bounds the sum
    low = sums_of_terms(packet, func, args, {}, torch.float32)
    assert low is not None
    if train:
        assert not bool(low[0].any())
    for t64, t32 in zip(got, low, strict=True):
        bound = terms_lower_bound(t32)
        assert t32.dtype == torch.float32 and bound is not None
        assert bool((bound.double() <= t64).all())


def test_a_norm_backward_with_unexpected_arguments_has_no_bound() -> None:
    assert sums_of_terms("native_layer_norm_backward", None, (_f64(3),), {}, None, _F32) is None


def test_without_a_real_format_a_fused_input_gradient_is_granted_nothing() -> None:
    func, args, _, _ = _norm_case("layer")
    got = sums_of_terms("native_layer_norm_backward", func, args, {})
    assert got is not None and not bool(got[0].any()) and bool(got[2].all())


@pytest.mark.parametrize(
    "norm",
    [
        lambda: torch.nn.BatchNorm2d(8),
        lambda: torch.nn.BatchNorm2d(8).eval(),
        lambda: torch.nn.GroupNorm(2, 8),
        lambda: torch.nn.Sequential(torch.nn.Flatten(2), torch.nn.LayerNorm(36)),
    ],
    ids=["batch", "batch-eval", "group", "layer"],
)
@pytest.mark.parametrize("loss", ["sum", "mean"])
def test_a_norm_whose_gradient_cancels_exactly_is_no_finding(norm: Any, loss: str) -> None:
    """The usual smoke test after a normalization (``bn(conv(x)).sum()``, or ``.mean()`` over
    3 x 8 x 6 x 6 elements, whose 1/N is inexact): the gradient reaching the input is exactly
    zero (``g - mean(g) = 0``) and float32 gives rounding noise of its reductions (``mean(g
    xhat)``), as do the parameters' gradient sums. Backward-stable: no finding (they were
    24-bit precision losses when judged against the ~0 results)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), norm())
    x = torch.randn(3, 3, 8, 8) + 1.0
    with sanitize() as report:
        getattr(model(x), loss)().backward()
    assert report.findings == []


def test_batch_norm_of_channels_with_an_exactly_zero_mean_is_no_finding() -> None:
    """MobileViT's pattern: a 1x1 convolution of batch-normed channels (each of mean 0, so the
    mixture is of mean 0 too) with small weights, normed again. The saved batch mean is
    rounding noise (~1e-15 against a shadow ~1e-24) but ~2^-24 of the mean |x|: no finding."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3), torch.nn.BatchNorm2d(16),
        torch.nn.Conv2d(16, 32, 1, bias=False), torch.nn.BatchNorm2d(32),
    )  # fmt: skip
    with torch.no_grad():
        model[2].weight.mul_(1e-6)
    x = torch.randn(2, 3, 16, 16)
    with sanitize(track_grads=False) as report:
        model(x)
    assert report.findings == []


@pytest.mark.parametrize("loss", ["sum", "mean"])
def test_a_softmax_whose_gradient_cancels_exactly_is_no_finding(loss: str) -> None:
    """``softmax(x).sum()``: the gradient is y (g - sum(g y)) with g constant along each row,
    exactly 0; float32 gives the rounding noise of the reduction (sum(y) = 1 to an ulp): no
    finding (a 24-bit precision loss when judged against the ~0 result)."""
    torch.manual_seed(0)
    x = torch.randn(6, 50, requires_grad=True)
    with sanitize() as report:
        getattr(torch.softmax(3 * x, -1), loss)().backward()
    assert report.findings == []


def test_a_softmax_gradient_that_cancels_elementwise_is_found() -> None:
    """The same gradient where ``g - sum(g y)`` cancels by itself: g = 1 + 1e-6 noise, whose
    float32 values carry ~3 significant bits of the noise. The subtraction loses the rest: a
    finding at the softmax (its backward), however cheap the reduction's error is."""
    torch.manual_seed(0)
    x = torch.randn(6, 50, requires_grad=True)
    g = 1.0 + 1e-6 * torch.randn(6, 50)
    with sanitize() as report:
        torch.softmax(3 * x, -1).backward(g)
    found = only(report.findings, kind="precision_loss", phase="backward")
    assert [f.op for f in found] == ["aten._softmax_backward_data.default"]
    assert found[0].bits_lost > 15


def test_softmax_backward_error_scale_is_written_out() -> None:
    """|y| sum|g y| along the row where the subtraction does not cancel (random data:
    everywhere), nothing from a float32 bound."""
    torch.manual_seed(0)
    y = torch.softmax(_f64(5, 40), -1)
    g = _f64(5, 40)
    args = (g, y, -1, torch.float64)
    got = sums_of_terms("_softmax_backward_data", None, args, {}, None, _F32)
    assert got is not None
    want = y * (g.abs() * y).sum(-1, keepdim=True)
    granted = got[0] > 0
    assert granted.double().mean() > 0.95
    torch.testing.assert_close(got[0][granted], want[granted])
    low = sums_of_terms("_softmax_backward_data", None, args, {}, torch.float32)
    assert low is not None and not bool(low[0].any())


# -- fused attention (the CPU flash kernel) ------------------------------------------------------


def _attention_case(mask: str) -> tuple[tuple[Any, ...], dict[str, Any], torch.Tensor]:
    """Float64 arguments of the CPU flash attention backward, as the sanitizer's shadows, and
    the attention probabilities built independently (softmax of the masked scores)."""
    torch.manual_seed(0)
    q, k, v, g = (_f64(2, 3, 6, 8) for _ in range(4))
    scale = 0.3
    kwargs: dict[str, Any] = {"scale": scale}
    scores = scale * q @ k.transpose(-2, -1)
    causal = mask == "causal"
    if mask == "float":
        kwargs["attn_mask"] = torch.where(torch.rand(6, 6) < 0.3, -1e9, 0.0).double()
        scores = scores + kwargs["attn_mask"]
    elif mask == "rows":  # additive -inf, the first query row fully masked
        kwargs["attn_mask"] = torch.zeros(6, 6, dtype=torch.float64)
        kwargs["attn_mask"][0] = -math.inf
        scores = scores + kwargs["attn_mask"]
    elif causal:
        scores = scores.masked_fill(~torch.ones(6, 6, dtype=torch.bool).tril(), -math.inf)
    out, lse = aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, causal, attn_mask=kwargs.get("attn_mask"), scale=scale
    )
    return (g, q, k, v, out, lse, 0.0, causal), kwargs, torch.softmax(scores, -1).nan_to_num(0.0)


@pytest.mark.parametrize("mask", ["none", "causal", "float", "rows"])
def test_attention_backward_error_scales_are_written_out(mask: str) -> None:
    """grad_value's sums are P^T |g|; grad_query and grad_key sum |dS| |k| and |dS^T| |q|
    (times the scale) plus, where dP - D does not cancel by itself (random data: nearly
    everywhere), the error scale of the kernel's reductions P (|g| |v|^T + rowsum|g out|); a
    float32 bound grants nothing and stays below the float64 sums."""
    args, kwargs, p = _attention_case(mask)
    g, q, k, v, out = args[:5]
    func = aten._scaled_dot_product_flash_attention_for_cpu_backward.default
    packet = "_scaled_dot_product_flash_attention_for_cpu_backward"
    got = sums_of_terms(packet, func, args, kwargs, None, _F32)
    assert got is not None and len(got) == 3
    dp, d = g @ v.transpose(-2, -1), (g * out).sum(-1, keepdim=True)
    plain = p * (dp - d).abs()
    err = p * (g.abs() @ v.abs().transpose(-2, -1) + (g.abs() * out.abs()).sum(-1, keepdim=True))
    torch.testing.assert_close(got[2], p.transpose(-2, -1) @ g.abs())
    lo_q, hi_q = 0.3 * plain @ k.abs(), 0.3 * (plain + err) @ k.abs()
    lo_k = 0.3 * plain.transpose(-2, -1) @ q.abs()
    hi_k = 0.3 * (plain + err).transpose(-2, -1) @ q.abs()
    for t, lo, hi in ((got[0], lo_q, hi_q), (got[1], lo_k, hi_k)):
        assert bool((t >= lo * (1 - 1e-9)).all() and (t <= hi * (1 + 1e-9)).all())
        assert torch.isclose(t, hi, rtol=1e-9).double().mean() > 0.9  # granted nearly everywhere
    exact = func(*args, **kwargs)
    for t, e in zip(got, exact, strict=True):
        assert t.shape == e.shape and bool((t >= e.abs() * (1 - 1e-9)).all())
    low = sums_of_terms(packet, func, args, kwargs, torch.float32)
    assert low is not None
    torch.testing.assert_close(low[0].double(), lo_q, rtol=1e-5, atol=1e-6)
    for t64, t32 in zip(got, low, strict=True):
        bound = terms_lower_bound(t32)
        assert t32.dtype == torch.float32 and bound is not None
        assert bool((bound.double() <= t64).all())


def test_attention_backward_with_dropout_has_no_written_out_bound() -> None:
    args, kwargs, _ = _attention_case("none")
    args = (*args[:6], 0.1, args[7])
    packet = "_scaled_dot_product_flash_attention_for_cpu_backward"
    assert sums_of_terms(packet, None, args, kwargs, None, _F32) is None


@pytest.mark.parametrize("causal", [False, True])
def test_an_attention_whose_score_gradient_cancels_exactly_is_no_finding(causal: bool) -> None:
    """Attention over identical values (each position's value vector the same): the gradient
    reaching the scores, dS = P (dP - D), is exactly 0 in every row (dP constant over the keys,
    D its P-weighted mean) and float32 gives the rounding noise of D, which the query and key
    gradients carry (24-bit precision losses when judged against their ~0 shadows). As for
    softmax: no finding. HF CLIP's text attention meets this at random init."""
    torch.manual_seed(0)
    q, k = (torch.randn(2, 4, 16, 16, requires_grad=True) for _ in range(2))
    v = torch.randn(2, 4, 1, 16).expand(2, 4, 16, 16).clone().requires_grad_()
    with sanitize() as report:
        F.scaled_dot_product_attention(q, k, v, is_causal=causal).sum().backward()
    assert report.findings == []


def test_an_attention_gradient_that_cancels_elementwise_is_found() -> None:
    """The same with values differing by 1e-6: dP - D now cancels by itself (20 bits), and the
    float32 values carry ~3 significant bits of the differences: a finding at the attention's
    backward, however cheap its reductions' error is."""
    torch.manual_seed(0)
    q, k = (torch.randn(2, 4, 16, 16, requires_grad=True) for _ in range(2))
    base = torch.randn(2, 4, 1, 16).expand(2, 4, 16, 16)
    v = (base * (1 + 1e-6 * torch.randn(2, 4, 16, 16))).requires_grad_()
    with sanitize() as report:
        F.scaled_dot_product_attention(q, k, v).sum().backward()
    found = only(report.findings, kind="precision_loss", phase="backward")
    assert [f.op for f in found] == [
        "aten._scaled_dot_product_flash_attention_for_cpu_backward.default"
    ]
    assert found[0].bits_lost > 15
