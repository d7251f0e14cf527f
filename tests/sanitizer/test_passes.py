"""The sanitizer's comparison passes: the C kernel computes exactly what the torch ops compute."""

from __future__ import annotations

import math

import pytest
import torch

from mixprec.sanitizer import gradients
from mixprec.sanitizer import passes as P

needs_c = pytest.mark.skipif(not P.has_c_passes(), reason="C kernel not built: torch passes only")


def _pairs() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(real, shadow) pairs: noise at every scale, ties, subnormals, zeros, lengths around the
    kernel's 16 lanes, and non-finite values in either tensor."""
    g = torch.Generator().manual_seed(0)
    out = []
    for n in (1, 7, 16, 17, 33, 1000, 4099):
        s = torch.randn(n, generator=g, dtype=torch.float64) * 2.0 ** torch.randint(
            -140, 120, (n,), generator=g
        )
        r = s.float() * (1 + torch.randn(n, generator=g) * 2.0**-10)
        out.append((r, s))
        out.append((r.bfloat16(), s))
        out.append((s.float(), s))  # exact up to the float32 rounding
    z = torch.zeros(40, dtype=torch.float64)
    out.append((z.float(), z))
    tiny = torch.full((40,), 2.0**-1070, dtype=torch.float64)  # zero in float32, not in float64
    out.append((tiny.float(), tiny))
    for bad in (math.inf, -math.inf, math.nan, 1e300):
        s = torch.randn(50, dtype=torch.float64)
        s[17] = bad
        out.append((s.float(), s))
        r = torch.ones(50)
        r[3] = bad if abs(bad) > 1e300 or math.isnan(bad) else math.inf
        out.append((r, torch.ones(50, dtype=torch.float64)))
    big = torch.full((20,), 3.0e38, dtype=torch.float64)
    out.append((-big.float(), big))  # the float32 difference overflows
    return out


def _both(r: torch.Tensor, s: torch.Tensor) -> tuple[P.Passes, P.Passes]:
    """The kernel's passes (asserted to serve) and the torch ones over one pair."""
    c = P.pick(r, s)
    assert isinstance(c, P.CPasses)
    return c, P.TorchPasses(r, s)


@needs_c
@pytest.mark.parametrize("i", range(len(_pairs())))
def test_c_passes_equal_torch_passes(i: int) -> None:
    c, t = _both(*_pairs()[i])
    cm, tm = c.max_pass(), t.max_pass()
    assert cm[2:] == tm[2:]  # (non-finite?, non-zero?)
    if cm[2]:  # the max values are meaningless there (the torch path leaves the fast test)
        return
    assert cm[:2] == tm[:2]
    for floor in (1e-30, 2.0**-12 * max(cm[1], 1e-30), 1.0):
        assert c.ratio32(floor) == t.ratio32(floor)
    for frac in (2.0**-6, 2.0**-20):
        assert c.ratio64(frac, 2.0**-1022) == t.ratio64(frac, 2.0**-1022)


def _nonfinite_pairs() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(real, shadow) pairs holding inf or NaN: agreeing (the same inf, both NaN), disagreeing
    (an inf or NaN against a finite value, +inf against -inf, a NaN against an inf), an
    overflowed float32 real, in float32 and bfloat16, with finite noise around them."""
    g = torch.Generator().manual_seed(1)
    cases = [
        (math.inf, math.inf), (-math.inf, -math.inf), (math.nan, math.nan),
        (math.inf, 3.0), (math.nan, 3.0), (3.0, math.nan), (math.inf, -math.inf),
        (math.nan, math.inf), (math.inf, 1e300),
    ]  # fmt: skip
    out = []
    for n in (5, 16, 37):
        for rv, sv in cases:
            s = torch.randn(n, generator=g, dtype=torch.float64)
            s[n // 2] = sv
            r = (s * (1 + 2.0**-9)).float()
            r[n // 2] = rv
            out += [(r, s), (r.bfloat16(), s)]
        s = torch.randn(n, generator=g, dtype=torch.float64)
        r = s.float()
        r[0], s[0] = -math.inf, -math.inf  # an agreeing -inf (a mask) beside a finite error
        r[1] = r[1] * (1 + 2.0**-5)
        out += [(r, s), (r.bfloat16(), s)]
    return out


def _same(a: tuple, b: tuple) -> bool:
    return all(x == y or (x != x and y != y) for x, y in zip(a, b, strict=True))


@needs_c
@pytest.mark.parametrize("i", range(len(_nonfinite_pairs())))
def test_c_non_finite_pass_equals_the_torch_one(i: int) -> None:
    c, t = _both(*_nonfinite_pairs()[i])
    assert c.max_pass()[2]  # the results that take this pass
    for frac in (2.0**-6, 2.0**-20):
        got, want = c.nonfinite(frac, 2.0**-1022), t.nonfinite(frac, 2.0**-1022)
        assert _same(got, want), (got, want)


def test_permuted_results_take_the_kernel_when_laid_out_alike() -> None:
    """A transposed result and a shadow with the same strides pair up in memory order."""
    s = torch.randn(5, 6, 7, dtype=torch.float64).permute(2, 0, 1)
    r = (s * (1 + 2.0**-12)).float()  # keeps the permuted layout
    assert r.stride() == s.stride() and not r.is_contiguous()
    c, t = _both(r, s)
    assert c.max_pass() == t.max_pass()
    assert c.ratio32(1e-3) == t.ratio32(1e-3) and c.ratio64(1e-3, 1e-300) == t.ratio64(1e-3, 1e-300)


def test_torch_passes_serve_what_the_kernel_does_not_take() -> None:
    s = torch.randn(4, 6, dtype=torch.float64)
    column_major = s.float().t().contiguous().t()  # same shape as s, other strides
    assert isinstance(P.pick(column_major, s), P.TorchPasses)
    assert isinstance(P.pick(s.float()[:, ::2], s[:, ::2]), P.TorchPasses)  # not dense
    assert isinstance(P.pick(s.half(), s), P.TorchPasses)  # float16: torch
    assert isinstance(P.pick(s.float(), s.float()), P.TorchPasses)  # float32 shadow


def _grad(dtype: torch.dtype) -> torch.Tensor:
    g = torch.randn(70_000, dtype=torch.float64) * 2.0 ** torch.randint(-1000, 1000, (70_000,))
    g = g.to(dtype)
    g[::97] = 0.0
    g[5], g[6], g[7] = math.inf, math.nan, -math.inf
    return g


@needs_c
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_c_gradient_histogram_equals_the_torch_one(dtype: torch.dtype) -> None:
    """The kernel's counts (over a strided sample) and maximum (over every finite element)
    equal the torch path's, for sampled, small and all-non-finite gradients."""
    g = _grad(dtype)
    for grad, smax in ((g, None), (g[:1000], None), (g[5:8], None), (g[:1000], 7.0)):
        c, t = gradients.GradCollector(1 << 14), gradients.GradCollector(1 << 14)
        assert c.add_fast("weight", grad, smax)
        t._add_torch("weight", grad, smax)
        assert c.max_abs == t.max_abs and c.tensors == t.tensors and c.sampled == t.sampled
        assert c._raw.keys() == t._raw.keys()
        assert all(torch.equal(c._raw[k], t._raw[k]) for k in c._raw)


@needs_c
def test_c_gradient_histogram_bins_dense_tensors_in_memory_order() -> None:
    """A transposed or permuted gradient (dense, not contiguous) takes the kernel: the same
    counts and maximum as the torch path on the same elements (unsampled: order is free)."""
    g = _grad(torch.float64)[:6000]
    for dense in (g.reshape(60, 100).t(), g.reshape(10, 20, 30).permute(2, 0, 1)):
        assert not dense.is_contiguous()
        c, t = gradients.GradCollector(), gradients.GradCollector()
        assert c.add_fast("weight", dense)
        t._add_torch("weight", dense, None)
        assert c.max_abs == t.max_abs and c.tensors == t.tensors
        assert all(torch.equal(c._raw[k], t._raw[k]) for k in c._raw)


@needs_c
def test_strided_gradients_are_copied_for_the_kernel_with_the_torch_paths_counts() -> None:
    """A strided, non-dense gradient (a module output such as ``x[:, 0]``) is binned by the
    kernel after one copy: the same sample, counts and maximum as the torch path."""
    g = _grad(torch.float64)[:60_000].reshape(300, 200)
    for strided in (g[:, ::2], g[::3, 1:]):  # sampled (max_elems 4096) and not
        for max_elems in (4096, 1 << 16):
            c, t = gradients.GradCollector(max_elems), gradients.GradCollector(max_elems)
            assert not c.add_fast("activation", strided)
            c._add_torch = None  # type: ignore[method-assign]  # the kernel must serve
            c.add("activation", strided)
            t._add_torch("activation", strided, None)
            assert c.max_abs == t.max_abs and c.sampled == t.sampled and c.tensors == t.tensors
            assert all(torch.equal(c._raw[k], t._raw[k]) for k in c._raw)


def test_gradient_histogram_takes_torch_where_the_kernel_does_not_apply() -> None:
    col = gradients.GradCollector()
    strided, expanded = torch.ones(4, 8)[:, ::2], torch.ones(1).expand(8)
    for g in (strided, torch.ones(4, dtype=torch.float16), expanded):
        assert not col.add_fast("activation", g)
        col.add("activation", g)  # a copy for the kernel, or the torch path
    assert col.tensors == {"activation": 3} and col.max_abs == {"activation": 1.0}


def test_python_constants_round_to_float32_as_torch_casts_them() -> None:
    """``f32`` (the value a Python float has inside a float32 kernel) equals torch's cast, sign
    of zero and overflow to inf included, on first use and from its cache."""
    from mixprec.sanitizer.shadows import f32

    values = [0.1, -0.1, 1 / 3, 3.4028235e38, 3.4028236e38, 1e39, -1e39, 1e-45, 1e-46, 0.0, -0.0]
    values += [math.inf, -math.inf, 2.0**-149 * 1.5, 65504.0001]
    for _ in range(2):  # the second round reads the cache
        for v in values:
            want = torch.tensor(v, dtype=torch.float64).float().item()
            got = f32(v)
            assert got == want and math.copysign(1, got) == math.copysign(1, want), v
    assert math.isnan(f32(math.nan))
