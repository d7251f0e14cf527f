"""Tests of mixprec.stable: ULP accuracy against mpmath, gradients, edge semantics, chunking.

The ULP tests run the audit of ``benchmarks/ulp_audit.py`` on its small ("ci") grid: every
binade of each dtype (one random mantissa each, every 24th binade for float64), dense samples
around each function's switch points, 2-D grids for the binary functions and row batches for
logsumexp/log_softmax. References are mpmath at 50 digits, computed here (a few thousand points
per function and dtype).
"""

from __future__ import annotations

import math
import threading

import mpmath as mp
import numpy as np
import pytest
import torch

from mixprec import stable
from mixprec.stable.core import CHUNK, map_elementwise_stats
from mixprec.testing import ulp as audit

ALL_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
LOW = [torch.float32, torch.float16, torch.bfloat16]

# float64 has no target in the issue; these are the measured maxima on the ci grid, rounded up,
# so that a regression shows. Where they are large the cause is documented in docs/stable.md:
# logaddexp's value at its zero crossing (cancellation beyond double-double), log_softmax's
# gradient (the vector-Jacobian product w - p * sum(w) cancels).
FLOAT64_BOUND = {
    ("logaddexp", "value"): 10,
    ("log_softmax", "grad"): 100,
}
FLOAT64_DEFAULT = 5


def _bound(name: str, dtype: torch.dtype, quantity: str) -> float:
    if dtype == torch.float64:
        return FLOAT64_BOUND.get((name, quantity.split("_")[0]), FLOAT64_DEFAULT)
    return audit.TARGET_ULP[dtype]


def _check(rows: list[audit.AuditRow], name: str, dtype: torch.dtype) -> None:
    stable_rows = [r for r in rows if r.variant == "stable"]
    assert {r.quantity for r in stable_rows} >= {"value"}
    assert any(r.quantity.startswith("grad") for r in stable_rows)
    for r in stable_rows:
        bound = _bound(name, dtype, r.quantity)
        assert r.bad == 0, f"{name} {r.dtype} {r.quantity}: non-finite mismatch at {r.worst}"
        assert r.max_ulp <= bound, (
            f"{name} {r.dtype} {r.quantity}: {r.max_ulp:.3g} ulp > {bound} at {r.worst}"
        )


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("name", audit.ELEMENTWISE)
def test_ulp_elementwise(name: str, dtype: torch.dtype) -> None:
    _check(audit.audit_elementwise(name, dtype, "ci"), name, dtype)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("name", audit.ROWWISE)
def test_ulp_rowwise(name: str, dtype: torch.dtype) -> None:
    _check(audit.audit_rows(name, dtype, "ci"), name, dtype)


def test_audit_sees_naive_failures() -> None:
    # the audit must be able to fail: the naive softplus overflows, torch's float64 softplus
    # switches to x at 20 (wrong by 2e-9 there)
    rows = audit.audit_elementwise("softplus", torch.float64, "ci")
    by = {(r.variant, r.quantity): r for r in rows}
    assert by[("naive", "value")].bad > 0
    assert by[("builtin", "value")].max_ulp > 1e4


# --------------------------------------------------------------------------------------------
# the ULP metric itself
# --------------------------------------------------------------------------------------------
def test_ulp_metric_definition() -> None:
    one = torch.tensor([1.0])
    # spacing above 1 in float32 is 2^-23
    e = audit.ulp_error(torch.tensor([1.0 + 2**-23]), one, torch.zeros(1), torch.float32)
    assert e.item() == pytest.approx(1.0)
    # y just below 2: ulp(y) = 2^-23 too (binade [1, 2))
    y = torch.tensor([2.0])
    e = audit.ulp_error(torch.tensor([2.0]), y, torch.tensor([-(2.0**-40)]), torch.float32)
    assert e.item() == pytest.approx(2.0**-40 / 2.0**-23)
    # subnormal range: ulp is the smallest subnormal
    tiny = torch.tensor([2.0**-140])
    e = audit.ulp_error(torch.tensor([2.0**-140 + 2.0**-149]), tiny, torch.zeros(1), torch.float32)
    assert e.item() == pytest.approx(1.0)
    # bfloat16 has 7 mantissa bits
    e = audit.ulp_error(torch.tensor([1.0 + 2**-7]), one, torch.zeros(1), torch.bfloat16)
    assert e.item() == pytest.approx(1.0)
    # overflow: an exact value beyond max + ulp/2 is inf; a finite result is then inf ulps off
    big = torch.tensor([3.5e38])
    assert audit.ulp_error(torch.tensor([math.inf]), big, torch.zeros(1), torch.float32) == 0
    assert audit.ulp_error(torch.tensor([3.4e38]), big, torch.zeros(1), torch.float32) == math.inf
    nan = torch.tensor([math.nan])
    assert audit.ulp_error(nan, nan, torch.zeros(1), torch.float32) == 0
    assert audit.ulp_error(one, nan, torch.zeros(1), torch.float32) == math.inf


# --------------------------------------------------------------------------------------------
# gradients
# --------------------------------------------------------------------------------------------
def _f64(*vals: float) -> torch.Tensor:
    return torch.tensor(vals, dtype=torch.float64, requires_grad=True)


GRADCHECK_CASES = {
    "softplus": (lambda x: stable.softplus(x), (_f64(-30.0, -1.5, 0.0, 0.3, 2.0, 40.0),)),
    "softplus_beta": (lambda x: stable.softplus(x, beta=2.5), (_f64(-3.0, 0.1, 4.0),)),
    "log_sigmoid": (stable.log_sigmoid, (_f64(-40.0, -1.0, 0.0, 2.0, 35.0),)),
    "log1mexp": (stable.log1mexp, (_f64(-50.0, -3.0, -0.7, -0.6, -0.01),)),
    "logaddexp": (stable.logaddexp, (_f64(-3.0, 0.5, 10.0), _f64(-3.0, -2.0, 12.0))),
    "logsumexp": (
        lambda x: stable.logsumexp(x, dim=-1),
        (torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
         .mul(5).requires_grad_(),),
    ),
    "log_softmax": (
        lambda x: stable.log_softmax(x, dim=0),
        (torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
         .mul(3).requires_grad_(),),
    ),
    "xlogy": (stable.xlogy, (_f64(-2.0, 0.5, 3.0), _f64(0.3, 2.0, 7.0))),
    "xlog1py": (stable.xlog1py, (_f64(-2.0, 0.5, 3.0), _f64(-0.5, 0.0, 7.0))),
    "logcosh": (stable.logcosh, (_f64(-30.0, -0.5, 1e-3, 0.9, 1.5, 25.0),)),
    "lambertw": (stable.lambertw, (_f64(-0.3, -0.01, 0.5, 3.0, 1e4),)),
    "lambertw_m1": (lambda z: stable.lambertw(z, branch=-1), (_f64(-0.3, -0.1, -1e-3),)),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(GRADCHECK_CASES))
def test_gradcheck_float64(name: str) -> None:
    fn, args = GRADCHECK_CASES[name]
    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("name", ["softplus", "logsumexp", "log_softmax", "lambertw", "logaddexp"])
def test_gradgradcheck_float64(name: str) -> None:
    fn, args = GRADCHECK_CASES[name]
    assert torch.autograd.gradgradcheck(fn, args)


@pytest.mark.parametrize("name", sorted(GRADCHECK_CASES))
def test_forward_mode_and_batched_gradcheck_float64(name: str) -> None:
    # forward mode (the jvp rules) and the vmap rules, against finite differences: the
    # Functions are in torch.func's style, so jvp, forward_ad, vmap and hessian take them
    fn, args = GRADCHECK_CASES[name]
    assert torch.autograd.gradcheck(
        fn, args, check_forward_ad=True, check_batched_grad=True,
        check_batched_forward_grad=True,
    )  # fmt: skip


TORCH_TWINS = {
    "softplus": (stable.softplus, lambda t: torch.nn.functional.softplus(t, threshold=100.0)),
    "log_sigmoid": (stable.log_sigmoid, torch.nn.functional.logsigmoid),
    "logcosh": (stable.logcosh, lambda t: torch.log(torch.cosh(t))),
    "logaddexp": (
        lambda t: stable.logaddexp(t, t[0].cos()), lambda t: torch.logaddexp(t, t[0].cos())
    ),
    "xlogy": (lambda t: stable.xlogy(t, t.abs() + 0.5), lambda t: torch.xlogy(t, t.abs() + 0.5)),
    "logsumexp": (lambda t: stable.logsumexp(t, dim=-1), lambda t: torch.logsumexp(t, dim=-1)),
    "log_softmax": (lambda t: stable.log_softmax(t, 0), lambda t: torch.log_softmax(t, 0)),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(TORCH_TWINS))
def test_torch_func_transforms_match_torch(name: str) -> None:
    from torch.func import grad, hessian, jacrev, jvp, vmap

    f, ref = TORCH_TWINS[name]
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def loss(fn):
        return lambda t: fn(t).sum()

    def close(a: torch.Tensor, b: torch.Tensor) -> bool:
        return torch.allclose(a, b, rtol=1e-10, atol=1e-13)

    assert close(grad(loss(f))(x), grad(loss(ref))(x))
    assert close(vmap(f)(x), torch.stack([f(r) for r in x]))  # each row on its own
    assert close(vmap(grad(loss(f)))(x), vmap(grad(loss(ref)))(x))
    v = torch.randn_like(x)
    assert close(jvp(f, (x,), (v,))[1], jvp(ref, (x,), (v,))[1])
    assert close(jacrev(f)(x[0]), jacrev(ref)(x[0]))
    assert close(hessian(loss(f))(x[0]), hessian(loss(ref))(x[0]))


def test_gradients_finite_where_true_gradient_is() -> None:
    big = _f64(-1e4, -800.0, 800.0, 1e4)
    for fn in (stable.softplus, stable.log_sigmoid, stable.logcosh):
        (g,) = torch.autograd.grad(fn(big).sum(), big)
        assert torch.isfinite(g).all(), fn.__name__
    x32 = torch.tensor([-200.0, 100.0, 1e30], requires_grad=True)
    (g,) = torch.autograd.grad(stable.softplus(x32).sum(), x32)
    assert g.tolist() == [0.0, 1.0, 1.0]
    # lambertw at 0 (branch 0): W'(0) = 1, where W / (z (1 + W)) would be 0/0
    z = torch.tensor([0.0, 1e-300], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(stable.lambertw(z).sum(), z)
    assert g.tolist() == [1.0, 1.0]
    # branch -1 near 0-: W ~ -695, the derivative ~ 1/z is finite although 1/(z (1 + W))
    # underflows in its denominator (z (1 + W) ~ 7e-298 is fine, but z * e^W is not)
    z = torch.tensor([-1e-300], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(stable.lambertw(z, -1).sum(), z)
    with mp.workdps(50):
        w = mp.lambertw(mp.mpf(-1e-300), -1).real
        ref = float(w / (mp.mpf(-1e-300) * (1 + w)))
    assert g.item() == pytest.approx(ref, rel=1e-14)


# --------------------------------------------------------------------------------------------
# values at the edges (oracles: mpmath, closed forms)
# --------------------------------------------------------------------------------------------
def test_hostile_values() -> None:
    assert stable.softplus(torch.tensor(100.0)).item() == 100.0
    assert stable.softplus(torch.tensor(-100.0)).item() == pytest.approx(math.exp(-100.0), rel=1e-6)
    assert stable.log_sigmoid(torch.tensor(-100.0)).item() == -100.0
    assert stable.logcosh(torch.tensor(1000.0)).item() == pytest.approx(1000.0 - math.log(2))
    x = torch.tensor([0.0, -46.0], dtype=torch.float64)
    with mp.workdps(50):
        ref = float(mp.log1p(mp.exp(-46)))
    assert stable.logsumexp(x, 0).item() == pytest.approx(ref, rel=1e-15)
    assert stable.log1mexp(torch.tensor(-1e-20, dtype=torch.float64)).item() == pytest.approx(
        math.log(1e-20), rel=1e-15
    )
    big = torch.tensor([1e30, 1e30], dtype=torch.float32)
    assert stable.logsumexp(big, 0).item() == pytest.approx(1e30, rel=1e-7)
    # float64 rows far below 0 (|result| < |max| there too, yet nothing cancels)
    for row in ([-75.11486855, -69.42235863], [-64.85392062, -25.14138025, -50.14116455]):
        with mp.workdps(50):
            ref = float(mp.log(mp.fsum(mp.exp(mp.mpf(v)) for v in row)))
        got = stable.logsumexp(torch.tensor(row, dtype=torch.float64), 0).item()
        assert got == pytest.approx(ref, rel=1e-15)
    # xlogy's d/dy at y = -0.0 is that at +0 (sign(x) inf)
    x = torch.tensor([-2.0, 3.0], requires_grad=True)
    y = torch.tensor([-0.0, -0.0], requires_grad=True)
    (_, gy) = torch.autograd.grad(stable.xlogy(x, y).sum(), (x, y))
    assert gy.tolist() == [-math.inf, math.inf]


def test_logaddexp_zero_crossing_float32() -> None:
    # pairs with e^x + e^y ~ 1: the float64 formula cancels; the double-double path fixes it
    rng = np.random.default_rng(5)
    xs = -np.exp(rng.uniform(-20, math.log(0.69), 400))
    x = torch.tensor(xs, dtype=torch.float32)
    y = torch.tensor(np.log(-np.expm1(xs)), dtype=torch.float32)
    got = stable.logaddexp(x, y)
    hi, lo = audit.reference_elementwise(
        lambda m, a, b: m.log(m.exp(a) + m.exp(b)), x.double().numpy(), y.double().numpy()
    )
    err = audit.ulp_error(got, hi, lo, torch.float32)
    assert err.max().item() <= 1.0
    rows = torch.stack([x, y], 1)
    err = audit.ulp_error(stable.logsumexp(rows, -1), hi, lo, torch.float32)
    assert err.max().item() <= 1.0


@pytest.mark.parametrize("dtype", LOW, ids=lambda d: str(d)[6:])
def test_logcosh_near_series_switch(dtype: torch.dtype) -> None:
    # below |x| = 2^-9 the float32-and-narrower kernel takes the series, found per 128-element
    # segment: points around the switch and far below it, spread over several chunks (one next
    # to a NaN in its segment, some in the short last segment), against mpmath
    rng = np.random.default_rng(11)
    t = 2.0**-9
    near = t * (1 + np.arange(-64, 65) * 2.0**-23)
    xs = np.concatenate([np.exp2(rng.uniform(-30, -5, 1500)), near])
    x = torch.tensor(np.concatenate([xs, -xs])).to(dtype)
    hi, lo = audit.reference_elementwise(lambda m, a: m.log(m.cosh(a)), x.double().numpy())
    n = 3 * CHUNK + 77
    big = (torch.randn(n, generator=torch.Generator().manual_seed(6)) * 10).to(dtype)
    pos = torch.cat([torch.arange(x.numel() - 40) * 23, torch.arange(n - 40, n)])
    big[pos] = x
    beside = int(pos[int(x.abs().float().argmin())]) ^ 1  # same segment as the smallest |x|
    big[beside] = math.nan
    got = stable.logcosh(big)
    assert math.isnan(got[beside].item())
    for out in (got[pos], stable.logcosh(x)):
        assert audit.ulp_error(out, hi, lo, dtype).max().item() <= 0.51


def test_special_values() -> None:
    inf, nan = math.inf, math.nan
    t = torch.tensor
    assert stable.softplus(t([inf, -inf])).tolist() == [inf, 0.0]
    assert stable.log1mexp(t([0.0, -inf])).tolist() == [-inf, 0.0]
    assert math.isnan(stable.log1mexp(t(0.5)).item())
    assert stable.logaddexp(t(-inf), t(-inf)).item() == -inf
    assert stable.logaddexp(t(inf), t(inf)).item() == inf
    assert stable.xlogy(t([0.0, 0.0, 0.0]), t([0.0, inf, -1.0])).tolist() == [0.0, 0.0, 0.0]
    assert math.isnan(stable.xlogy(t(0.0), t(nan)).item())
    assert stable.xlog1py(t(0.0), t(-1.0)).item() == 0.0
    assert stable.lambertw(t([0.0, inf, -1 / math.e + 1e-7])).tolist()[:2] == [0.0, inf]
    w = stable.lambertw(t([-0.5, 1.0]), branch=-1)
    assert math.isnan(w[0].item()) and math.isnan(w[1].item())
    assert stable.lambertw(t(0.0), branch=-1).item() == -inf
    assert math.isnan(stable.lambertw(t(-0.5)).item())
    for fn in (stable.softplus, stable.log_sigmoid, stable.logcosh, stable.log1mexp):
        assert math.isnan(fn(t(nan)).item())


def test_lambertw_identity_and_branch_point() -> None:
    z = torch.linspace(-0.36, 50.0, 1001, dtype=torch.float64)
    w = stable.lambertw(z)
    torch.testing.assert_close(w * torch.exp(w), z, rtol=4e-15, atol=1e-17)
    zm = torch.linspace(-0.3678, -1e-6, 1001, dtype=torch.float64)
    wm = stable.lambertw(zm, -1)
    torch.testing.assert_close(wm * torch.exp(wm), zm, rtol=1e-14, atol=0.0)
    assert (wm <= -1).all() and (w >= -1).all()
    # the float64 number nearest -1/e lies inside the domain or just outside it
    e_inv = -1 / math.e
    with mp.workdps(50):
        inside = mp.mpf(e_inv) >= -1 / mp.e
        ref = float(mp.lambertw(mp.mpf(e_inv))) if inside else math.nan
    got = stable.lambertw(torch.tensor(e_inv, dtype=torch.float64)).item()
    assert (math.isnan(got) and math.isnan(ref)) or got == pytest.approx(ref, abs=1e-15)


def test_lambertw_is_a_fixed_graph() -> None:
    # no data-dependent Python control flow: torch.fx traces the whole kernel into a fixed graph
    from mixprec.stable.lambert import lambertw_kernel

    def make(branch: int, precise: bool):
        def kernel(z: torch.Tensor) -> torch.Tensor:
            return lambertw_kernel(z, branch, precise)

        return kernel

    for branch in (0, -1):
        for precise in (False, True):
            gm = torch.fx.symbolic_trace(make(branch, precise))
            n_ops = sum(n.op.startswith("call") for n in gm.graph.nodes)
            assert n_ops < (220 if precise else 150)
            z = torch.tensor([-0.2, 0.5, 3.0], dtype=torch.float64)
            if branch == -1:
                z = -z.abs() / 10
            torch.testing.assert_close(gm(z), lambertw_kernel(z, branch, precise))


def test_logsumexp_all_neg_inf_and_masks() -> None:
    x = torch.tensor([[-math.inf, -math.inf], [0.0, 1.0]], requires_grad=True)
    out = stable.logsumexp(x, dim=1)
    assert out[0].item() == -math.inf
    assert out[1].item() == pytest.approx(math.log(1 + math.e))
    (g,) = torch.autograd.grad(out.sum(), x)
    assert g[0].tolist() == [0.0, 0.0]
    assert torch.isfinite(g).all()
    # masked-out entries are ignored even when NaN/inf, and get zero gradient
    y = torch.tensor([[math.nan, 2.0, math.inf], [1.0, -3.0, 5.0]], requires_grad=True)
    mask = torch.tensor([[False, True, False], [True, True, False]])
    out = stable.logsumexp(y, dim=-1, mask=mask)
    assert out[0].item() == pytest.approx(2.0)
    assert out[1].item() == pytest.approx(math.log(math.exp(1) + math.exp(-3)))
    (g,) = torch.autograd.grad(out.sum(), y)
    assert g[0].tolist() == [0.0, 1.0, 0.0]
    assert g[1, 2].item() == 0.0 and g[1, :2].sum().item() == pytest.approx(1.0)
    # everything masked: -inf, zero gradient
    out = stable.logsumexp(y, dim=-1, mask=torch.zeros(2, 3, dtype=torch.bool))
    assert out.tolist() == [-math.inf, -math.inf]
    (g,) = torch.autograd.grad(out.sum(), y)
    assert (g == 0).all()
    # broadcast mask, keepdim, tuple dims, dim=None
    z = torch.randn(2, 3, 4, dtype=torch.float64)
    m = torch.rand(3, 4) > 0.3
    ref = torch.logsumexp(z.masked_fill(~m, -math.inf), dim=(1, 2), keepdim=True)
    torch.testing.assert_close(stable.logsumexp(z, (1, 2), True, mask=m), ref)
    torch.testing.assert_close(stable.logsumexp(z), torch.logsumexp(z, dim=(0, 1, 2)))


def test_log_softmax_masks_and_dead_rows() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0], [-math.inf, -math.inf, -math.inf]], requires_grad=True)
    mask = torch.tensor([[True, False, True], [True, True, True]])
    out = stable.log_softmax(x, dim=1, mask=mask)
    ref = torch.log_softmax(torch.tensor([1.0, 3.0]), 0)
    assert out[0, 1].item() == -math.inf
    torch.testing.assert_close(out[0, [0, 2]], ref)
    assert out[1].tolist() == [-math.inf] * 3
    (g,) = torch.autograd.grad(out[0, 0] + out[1, 0], x)
    assert g[1].tolist() == [0.0, 0.0, 0.0] and g[0, 1].item() == 0.0
    torch.testing.assert_close(g[0, [0, 2]], torch.tensor([1.0, 0.0]) - ref.exp())


def test_bad_arguments() -> None:
    x = torch.randn(3)
    with pytest.raises(ValueError, match="branch must be 0 or -1"):
        stable.lambertw(x, branch=1)
    with pytest.raises(ValueError, match="beta"):
        stable.softplus(x, beta=0.0)
    with pytest.raises(TypeError, match="complex"):
        stable.softplus(torch.randn(3, dtype=torch.complex64))
    with pytest.raises(TypeError, match="float8"):
        stable.softplus(torch.zeros(3, dtype=torch.float8_e4m3fn))
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        stable.logsumexp(x, 0, mask=torch.ones(3))
    with pytest.raises(ValueError, match="does not broadcast"):
        stable.logsumexp(x, 0, mask=torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="out of range"):
        stable.log_softmax(x, dim=2)
    with pytest.raises(TypeError, match="tensor or a real number"):
        stable.logaddexp(x, "1")
    with pytest.raises(ValueError, match="positive divisor of CHUNK"):
        map_elementwise_stats(lambda *a: None, (x,), x.dtype, 1000)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: str(d)[6:])
def test_dtypes_preserved_and_promotion(dtype: torch.dtype) -> None:
    x = torch.linspace(-3, 0.0, 7).to(dtype)
    for out in (
        stable.softplus(x), stable.log_sigmoid(x), stable.log1mexp(x), stable.logcosh(x),
        stable.lambertw(x.abs()), stable.logaddexp(x, x), stable.xlogy(x, x.abs()),
        stable.xlog1py(x, x.abs()), stable.logsumexp(x, 0), stable.log_softmax(x, 0),
    ):  # fmt: skip
        assert out.dtype == dtype
    assert stable.logaddexp(x, 1.0).dtype == dtype  # a Python number takes the tensor's dtype
    assert stable.softplus(torch.arange(3)).dtype == torch.get_default_dtype()
    assert (
        stable.logaddexp(torch.ones(2, dtype=torch.float16), torch.ones(2)).dtype == torch.float32
    )


# --------------------------------------------------------------------------------------------
# the chunked CPU engine gives the same bits as the one-shot path
# --------------------------------------------------------------------------------------------
def _pieces(fn, *args: torch.Tensor, step: int = 1000) -> torch.Tensor:
    n = args[0].shape[0]
    return torch.cat([fn(*(a[i : i + step] for a in args)) for i in range(0, n, step)])


def test_chunked_equals_unchunked() -> None:
    g = torch.Generator().manual_seed(3)
    n = 3 * CHUNK + 123  # several chunks and a ragged tail
    x = torch.randn(n, generator=g) * 30
    y = torch.randn(n, generator=g) * 30
    x[::997] = -x[::997].abs() * 1e-9  # log1mexp's near-zero fix-up path in some chunks
    neg = -x.abs()
    for fn, args in (
        (stable.softplus, (x,)), (stable.log_sigmoid, (x,)), (stable.logcosh, (x,)),
        (stable.log1mexp, (neg,)), (stable.logaddexp, (x, y)), (stable.xlogy, (x, y.abs())),
        (stable.xlog1py, (x, y.abs())), (stable.lambertw, (x.abs(),)),
    ):  # fmt: skip
        torch.testing.assert_close(fn(*args), _pieces(fn, *args), rtol=0, atol=0)
    rows = x[: 300 * 300].reshape(300, 300).clone()  # > CHUNK: the row-block path
    rows[5] = rows[5] - rows[5].max()  # a row whose result needs the exact path
    for fn in (lambda r: stable.logsumexp(r, -1), lambda r: stable.log_softmax(r, -1)):
        torch.testing.assert_close(fn(rows), _pieces(fn, rows, step=7), rtol=0, atol=0)


def test_thread_count_does_not_change_results() -> None:
    x = torch.randn(4 * CHUNK, generator=torch.Generator().manual_seed(4)) * 20
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = stable.logaddexp(x, x.flip(0))
        torch.set_num_threads(max(2, before))
        many = stable.logaddexp(x, x.flip(0))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, many)


def test_grad_mode_off_in_worker_threads() -> None:
    # the chunk workers run torch ops in their own threads; the result must not carry a graph
    x = torch.randn(3 * CHUNK, requires_grad=True)
    out = stable.softplus(x)
    assert out.grad_fn is not None  # from the autograd.Function, not from worker ops
    (g,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(g, torch.sigmoid(x.detach()))
    assert threading.active_count() >= 1
