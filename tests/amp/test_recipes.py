"""AMP as real training uses it (issue #16): O3 with fp16 and AdamW, a loss that stays NaN,
optimizers that unscale by themselves (``_step_supports_amp_scaling``), the scale's floor and
ceiling. The oracle for the scaler contract is torch.amp.GradScaler on CPU."""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch

import mixprec
from mixprec import amp
from mixprec.amp import DivergenceError, DynamicLossScaler
from mixprec.testing import corpus

pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _batch(it: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(it)
    return torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g)


# ---------------------------------------------------------------------------- O3, fp16, AdamW


def test_o3_fp16_adamw_default_eps_warns_with_a_safe_value():
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # eps=1e-8: 0 in float16
    with pytest.warns(amp.OptimizerPrecisionWarning) as record:
        mixprec.initialize(model, opt, opt_level="O3", compute="float16")
    assert len(record) == 1
    msg = str(record[0].message)
    assert "AdamW" in msg and "eps=1e-08" in msg and "it is 0" in msg
    assert "Pass eps=0.0001" in msg and "optimizer_state='float32'" in msg
    assert record[0].filename == __file__  # points at the initialize call


@pytest.mark.parametrize(
    ("opt_level", "compute", "eps", "state"),
    [
        ("O3", "float16", 1e-4, "compute"),  # the suggested value
        ("O3", "float16", 1e-8, "float32"),  # state kept in float32
        ("O3", "bfloat16", 1e-8, "compute"),  # bf16's range holds 1e-8
        ("O2", "float16", 1e-8, "compute"),  # float32 masters and state
        ("O1", "float16", 1e-8, "compute"),
    ],
)
def test_representable_eps_does_not_warn(opt_level, compute, eps, state):
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, eps=eps)
    with warnings.catch_warnings():
        warnings.simplefilter("error", amp.OptimizerPrecisionWarning)
        mixprec.initialize(
            model, opt, opt_level=opt_level, compute=compute, emulate=True, optimizer_state=state
        )


def _train_nanogpt(steps: int, **init_kw):
    entry = corpus.get("nanogpt")
    model, args, kwargs = entry.example(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=init_kw.pop("eps", 1e-8))
    model, opt = mixprec.initialize(model, opt, opt_level="O3", compute="float16", **init_kw)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = entry.loss(model, args, kwargs)
        with mixprec.scale_loss(loss, opt) as scaled:
            scaled.backward()
        opt.step()
        losses.append(loss.item())
    return model, opt, losses


def test_o3_fp16_adamw_at_suggested_eps_trains_nanogpt():
    with warnings.catch_warnings():
        warnings.simplefilter("error", amp.OptimizerPrecisionWarning)
        _, opt, losses = _train_nanogpt(20, eps=1e-4)
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.6 * losses[0]
    assert sum(b < a for a, b in itertools.pairwise(losses)) >= 15
    assert amp.skipped_steps(opt) <= 2


def test_o3_optimizer_state_float32_trains_and_is_not_rounded():
    model, opt, losses = _train_nanogpt(12, optimizer_state="float32")
    assert amp.get_config(model).optimizer_state == "float32"
    assert "optimizer_state='float32'" in repr(amp.get_config(model))
    assert losses[-1] < 0.8 * losses[0]
    # the weights are float16 values, the moments are not rounded
    p = next(model.parameters())
    assert torch.equal(mixprec.quantize(p.detach(), "float16"), p.detach())
    v = opt.state[p]["exp_avg_sq"]
    assert v.dtype == torch.float32
    assert not torch.equal(mixprec.quantize(v, "float16"), v)


def test_optimizer_state_option_errors():
    with pytest.raises(ValueError, match=r"optimizer_state must be one of 'compute', 'float32'"):
        mixprec.initialize(_mlp(), opt_level="O3", optimizer_state="fp32")
    model = _mlp()
    opt = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match=r"optimizer_state='float32' at O3 needs emulated"):
        mixprec.initialize(
            model, opt, opt_level="O3", compute="float16", emulate=False, optimizer_state="float32"
        )
    assert getattr(model, "_mixprec_amp", None) is None  # nothing changed


# ---------------------------------------------------------------------------- divergence


def _nan_loss_run(scaler, *, break_params: bool, steps: int = 200):
    """Iterations with a NaN loss (NaN weights, or a NaN input) until DivergenceError."""
    model = _mlp()
    opt = torch.optim.SGD(model.named_parameters(), lr=0.1)
    if break_params:
        with torch.no_grad():
            model[0].weight[0, 0] = math.nan
    for it in range(steps):
        opt.zero_grad()
        x, y = _batch(it)
        if not break_params:
            x[0, 0] = math.nan
        scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
        scaler.step(opt)
        try:
            scaler.update()
        except DivergenceError as err:
            return it + 1, str(err)
    raise AssertionError("no DivergenceError")


@pytest.mark.parametrize(
    "scaler_kw",
    [
        dict(),  # 2**16
        dict(init_scale=2.0**24),
        dict(init_scale=1e38, max_scale=None),
        dict(init_scale=2.0**10, hysteresis=1000),  # the scale does not even move
    ],
)
def test_persistent_nan_loss_raises_after_bounded_skips(scaler_kw):
    scaler = DynamicLossScaler(**scaler_kw)
    iterations, msg = _nan_loss_run(scaler, break_params=True)
    assert iterations <= scaler.max_nonfinite_losses == 16
    assert scaler.skipped_steps == iterations
    assert "loss itself is NaN/inf" in msg
    assert "already hold NaN/inf" in msg and "0.weight" in msg
    assert "intact" not in msg


def test_divergence_message_says_intact_only_when_parameters_are_finite():
    iterations, msg = _nan_loss_run(amp.StaticLossScaler(2.0**8), break_params=False)
    assert iterations == 16
    assert "16 skipped iterations in a row" in msg and "loss scale 256" in msg
    assert "parameters are intact (all finite)" in msg
    _, msg = _nan_loss_run(amp.StaticLossScaler(2.0**8, max_nonfinite_losses=3), break_params=False)
    assert "3 skipped iterations in a row" in msg


def test_clean_iteration_resets_the_nonfinite_count():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = amp.StaticLossScaler(8.0, max_nonfinite_losses=2)
    for it, bad in enumerate([True, False, True, False, True]):
        opt.zero_grad()
        x, y = _batch(it)
        if bad:
            x[0, 0] = math.nan
        scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
        scaler.step(opt)
        scaler.update()  # never two non-finite losses in a row: no error
        assert scaler.nonfinite_losses == int(bad)


@pytest.mark.parametrize(("value", "exc"), [(0, ValueError), (2.5, TypeError), (True, TypeError)])
def test_max_nonfinite_losses_validation(value, exc):
    with pytest.raises(exc, match="max_nonfinite_losses"):
        DynamicLossScaler(max_nonfinite_losses=value)


# ---------------------------------------------------------------------------- scale bounds


def test_init_scale_above_max_scale_names_the_fix():
    with pytest.raises(ValueError, match=r"pass max_scale=1e\+38 \(or max_scale=None"):
        DynamicLossScaler(init_scale=1e38)
    DynamicLossScaler(init_scale=1e38, max_scale=1e38)  # the fix works
    with pytest.raises(ValueError, match=r"pass min_scale=2\.0 \(or None\)"):
        DynamicLossScaler(init_scale=2.0, min_scale=4.0)


def test_scale_floor_keeps_the_scale_above_zero():
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=1.0)
    scaler = DynamicLossScaler(init_scale=2.0**-120, growth_interval=1000)
    with pytest.warns(amp.LossScaleCollapseWarning, match=r"floor SCALE_FLOOR=1\.17549e-38"):
        for _ in range(20):  # gradients overflow whatever the scale
            opt.zero_grad()
            scaler.scale(p.sum()).backward()
            p.grad[0] = math.inf
            scaler.step(opt)
            scaler.update()
    assert scaler.get_scale() == amp.SCALE_FLOOR == 2.0**-126
    assert math.isfinite(scaler.inv_scale())
    opt.zero_grad()  # a clean step at the floor is applied with finite gradients
    scaler.scale(p.sum()).backward()
    scaler.step(opt)
    scaler.update()
    assert not scaler.last_step_skipped
    assert torch.equal(p.detach(), torch.zeros(2))


# ------------------------------------------------------------ _step_supports_amp_scaling


class ScaleAwareSGD(torch.optim.Optimizer):
    """A custom optimizer on torch's contract: it unscales and skips by itself."""

    _step_supports_amp_scaling = True

    def __init__(self, params, lr: float) -> None:
        super().__init__(params, {"lr": lr})
        self.seen: list[tuple[float | None, float]] = []

    @torch.no_grad()
    def step(self, closure=None):
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        self.seen.append(
            (
                None if grad_scale is None else float(grad_scale),
                -1.0 if found_inf is None else float(found_inf),
            )
        )
        if found_inf is not None and float(found_inf) > 0:
            return None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    g = p.grad if grad_scale is None else p.grad / grad_scale
                    p.add_(g, alpha=-group["lr"])
        return None


PLAN = {2: math.inf, 3: math.nan, 7: math.inf}


def _contract_run(scaler, make_opt, *, unscale_at=(), steps=12):
    model = _mlp()
    opt = make_opt(model.parameters())
    scales = []
    for it in range(steps):
        opt.zero_grad()
        x, y = _batch(it)
        scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
        if it in PLAN:
            model[0].weight.grad[0, 0] = PLAN[it]
        if it in unscale_at:
            scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
    return scales, [p.detach().clone() for p in model.parameters()], opt


def _fused_adam(params):
    return torch.optim.Adam(params, lr=1e-2, fused=True)


def _fused_supported() -> bool:
    try:
        p = torch.nn.Parameter(torch.ones(2))
        p.grad = torch.ones(2)
        _fused_adam([p]).step()
    except (RuntimeError, NotImplementedError):
        return False
    return True


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: ScaleAwareSGD(ps, lr=0.1),
        pytest.param(
            _fused_adam,
            marks=pytest.mark.skipif(not _fused_supported(), reason="no fused Adam on CPU"),
        ),
    ],
    ids=["custom", "fused-adam"],
)
@pytest.mark.parametrize("unscale_at", [(), (1, 3, 5)], ids=["step", "unscale+step"])
def test_step_supports_amp_scaling_bit_identical_to_torch(make_opt, unscale_at):
    kw = dict(init_scale=2.0**10, growth_interval=3)
    ref = _contract_run(torch.amp.GradScaler("cpu", **kw), make_opt, unscale_at=unscale_at)
    ours = _contract_run(DynamicLossScaler(**kw, max_scale=None), make_opt, unscale_at=unscale_at)
    assert ours[0] == ref[0]
    for a, b in zip(ref[1], ours[1], strict=True):
        assert torch.equal(a, b)
    if isinstance(ref[2], ScaleAwareSGD):
        assert ours[2].seen == ref[2].seen  # same grad_scale / found_inf handed over
        # the run covers both handovers: still scaled (grad_scale) and unscaled already (None)
        assert ref[2].seen[1][0] == (None if unscale_at else 2.0**10)
        assert ref[2].seen[2][1] == 1.0  # and an overflow flagged to the optimizer
        assert not hasattr(ours[2], "grad_scale") and not hasattr(ours[2], "found_inf")


def test_step_supports_amp_scaling_records_skips_and_keeps_fp16_grads_unscaled():
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float16))
    opt = ScaleAwareSGD([p], lr=1.0)
    scaler = DynamicLossScaler(init_scale=8.0)
    scaler.scale(p.float().sum()).backward()
    scaler.step(opt)  # float16 gradients are fine: only checked, the optimizer unscales
    scaler.update()
    assert opt.seen == [(8.0, 0.0)] and torch.equal(p.detach(), torch.zeros(3, dtype=p.dtype))
    scaler.scale(p.float().sum()).backward()
    p.grad[0] = math.inf
    scaler.step(opt)
    scaler.update()
    assert scaler.last_step_skipped and scaler.get_scale() == 4.0


def test_deprecated_grad_scaler_keyword_is_refused_with_the_fix():
    class Old(ScaleAwareSGD):
        def step(self, closure=None, grad_scaler=None):
            return None

    p = torch.nn.Parameter(torch.ones(2))
    opt = Old([p], lr=0.1)
    scaler = DynamicLossScaler()
    scaler.scale(p.sum()).backward()
    with pytest.raises(TypeError, match=r"grad_scaler=.*optimizer\.grad_scale"):
        scaler.step(opt)


def test_step_supports_amp_scaling_before_scale_raises():
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.ones(2)
    with pytest.raises(RuntimeError, match=r"before scaler\.scale\(loss\)"):
        DynamicLossScaler().step(ScaleAwareSGD([p], lr=0.1))
