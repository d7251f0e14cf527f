"""Loss scalers: equality with torch.amp.GradScaler, state machine, floor/ceiling, hysteresis,
skip record, divergence, checkpoints. The oracle for trajectories is torch's own GradScaler."""

from __future__ import annotations

import collections
import inspect
import io
import itertools
import math
import pickle
import warnings

import pytest
import torch

from mixprec.amp.overflow import non_finite_check_and_unscale_
from mixprec.amp.scaling import (
    DivergenceError,
    DynamicLossScaler,
    LossScaleCollapseWarning,
    NoOpLossScaler,
    OptState,
    SkippedStep,
    StaticLossScaler,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _data(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g)) for _ in range(n)]


def _inject(model: torch.nn.Module, it: int, plan: dict[int, float]) -> None:
    """Put inf/NaN into one gradient at the iterations listed in plan."""
    if it in plan:
        model[0].weight.grad[0, 0] = plan[it]


def _run(scaler, model, opt, data, plan, *, loss_mult=1.0):
    """One training run; returns per-iteration (scale used, skipped, loss) and final params."""
    trace = []
    for it, (x, y) in enumerate(data):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y) * loss_mult
        before = [p.detach().clone() for p in model.parameters()]
        scale_used = scaler.get_scale()
        scaler.scale(loss).backward()
        _inject(model, it, plan)
        scaler.step(opt)
        scaler.update()
        skipped = all(torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
        trace.append((scale_used, skipped, loss.item()))
    return trace, [p.detach().clone() for p in model.parameters()]


PLAN = {1: math.inf, 2: -math.inf, 6: math.nan, 7: math.inf, 8: math.inf, 15: math.nan}


@pytest.mark.parametrize(
    "kw",
    [
        dict(init_scale=2.0**10, growth_interval=3),
        dict(init_scale=1000.0, growth_factor=1.7, backoff_factor=0.3, growth_interval=2),
        # natural fp32 overflow: the scaled gradients exceed float32's range at first
        dict(init_scale=2.0**127, growth_interval=4),
    ],
)
def test_trajectory_identical_to_torch_gradscaler(kw):
    data = _data(24)
    m1, m2 = _model(), _model()
    o1 = torch.optim.SGD(m1.parameters(), lr=0.05, momentum=0.9)
    o2 = torch.optim.SGD(m2.parameters(), lr=0.05, momentum=0.9)
    ref = torch.amp.GradScaler("cpu", **kw)
    ours = DynamicLossScaler(**kw, max_scale=None)
    t_ref, p_ref = _run(ref, m1, o1, data, PLAN, loss_mult=1.0)
    t_ours, p_ours = _run(ours, m2, o2, data, PLAN, loss_mult=1.0)
    assert [t[:2] for t in t_ours] == [t[:2] for t in t_ref]
    assert [t[2] for t in t_ours] == [t[2] for t in t_ref]
    for a, b in zip(p_ref, p_ours, strict=True):
        assert torch.equal(a, b)
    assert ours.get_scale() == ref.get_scale()
    assert ours._get_growth_tracker() == ref._get_growth_tracker()
    skipped = [i for i, t in enumerate(t_ref) if t[1]]
    assert ours.skipped_steps == len(skipped) and len(skipped) >= len(PLAN)
    # the scale really moved both ways in this run
    scales = [t[0] for t in t_ref]
    assert any(b > a for a, b in itertools.pairwise(scales))
    assert any(b < a for a, b in itertools.pairwise(scales))


def test_two_optimizers_match_torch():
    """Only the optimizer with the overflow is skipped; the scale backs off once."""
    data = _data(10)

    def run(scaler):
        m = _model()
        oa = torch.optim.SGD(m[0].parameters(), lr=0.1)
        ob = torch.optim.Adam(m[2].parameters(), lr=0.01)
        scales = []
        for it, (x, y) in enumerate(data):
            oa.zero_grad()
            ob.zero_grad()
            scaler.scale(torch.nn.functional.mse_loss(m(x), y)).backward()
            if it in (2, 3):
                m[2].bias.grad[0] = math.inf
            scaler.unscale_(oa)
            scaler.step(oa)
            scaler.step(ob)
            scaler.update()
            scales.append(scaler.get_scale())
        return scales, [p.detach().clone() for p in m.parameters()]

    s_ref, p_ref = run(torch.amp.GradScaler("cpu", init_scale=256.0, growth_interval=2))
    s_ours, p_ours = run(DynamicLossScaler(init_scale=256.0, growth_interval=2, max_scale=None))
    assert s_ours == s_ref
    for a, b in zip(p_ref, p_ours, strict=True):
        assert torch.equal(a, b)


def test_unscaled_gradients_equal_torch_for_clipping():
    m1, m2 = _model(), _model()
    (x, y) = _data(1)[0]
    o1, o2 = torch.optim.SGD(m1.parameters(), lr=0.1), torch.optim.SGD(m2.parameters(), lr=0.1)
    ref, ours = torch.amp.GradScaler("cpu", init_scale=3000.0), DynamicLossScaler(3000.0)
    for s, m, o in ((ref, m1, o1), (ours, m2, o2)):
        s.scale(torch.nn.functional.mse_loss(m(x), y)).backward()
        s.unscale_(o)
    for a, b in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad)


def test_fused_and_fallback_agree():
    g = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        base = [torch.randn(n, generator=g).to(dtype) * 1e3 for n in (1, 7, 300)]
        for bad in (None, math.inf, math.nan):
            a = [t.clone() for t in base]
            b = [t.clone() for t in base]
            if bad is not None:
                a[1][3] = bad
                b[1][3] = bad
            fa, fb = torch.zeros(()), torch.zeros(())
            inv = torch.tensor(1 / 3000.0, dtype=torch.float32)
            non_finite_check_and_unscale_(a, fa, inv, fused=True)
            non_finite_check_and_unscale_(b, fb, inv, fused=False)
            assert fa.item() == fb.item() == (0.0 if bad is None else 1.0)
            for u, v in zip(a, b, strict=True):
                assert torch.equal(u.nan_to_num(), v.nan_to_num())
                assert torch.equal(u.isnan(), v.isnan())


# ---------------------------------------------------------------------------- state machine


def _one_backward(scaler, model, opt):
    x, y = _data(1)[0]
    opt.zero_grad()
    scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()


@pytest.mark.parametrize("make", [lambda: DynamicLossScaler(), lambda: StaticLossScaler(8.0)])
def test_state_machine_errors(make):
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    scaler = make()
    with pytest.raises(RuntimeError, match=r"before scaler\.scale"):
        scaler.step(opt)
    _one_backward(scaler, m, opt)
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="already been called"):
        scaler.unscale_(opt)
    scaler.step(opt)
    with pytest.raises(RuntimeError, match="step\\(\\) has already been called"):
        scaler.step(opt)
    with pytest.raises(RuntimeError, match="after step"):
        scaler.unscale_(opt)
    scaler.update()
    with pytest.raises(RuntimeError, match="No inf checks"):
        scaler.update()
    _one_backward(scaler, m, opt)
    with pytest.raises(RuntimeError, match="Closure"):
        scaler.step(opt, closure=lambda: 0.0)
    # after the full cycle a new iteration works again
    scaler.step(opt)
    scaler.update()


def test_fp16_gradients_refused_when_unscaling():
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float16))
    opt = torch.optim.SGD([p], lr=0.1)
    scaler = DynamicLossScaler(init_scale=4.0)
    scaler.scale((p.float() * 2).sum()).backward()
    with pytest.raises(ValueError, match="FP16 gradients"):
        scaler.unscale_(opt)


def test_stage_follows_torch_state_machine():
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    scaler = DynamicLossScaler()
    assert scaler.stage(opt) is OptState.READY
    _one_backward(scaler, m, opt)
    scaler.unscale_(opt)
    assert scaler.stage(opt) is OptState.UNSCALED
    scaler.step(opt)
    assert scaler.stage(opt) is OptState.STEPPED
    scaler.update()
    assert scaler.stage(opt) is OptState.READY


def test_unscale_grads_public_seam():
    """Given tensors are unscaled on an optimizer's behalf; flags of several optimizers are
    read (and would be all-reduced) together; update() ends the iteration."""
    pa, pb = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    oa, ob = torch.optim.SGD([pa], lr=0.1), torch.optim.SGD([pb], lr=0.1)
    events: list[SkippedStep] = []
    scaler = DynamicLossScaler(init_scale=8.0, on_skip=events.append)
    assert scaler.inv_scale() == 0.125
    scaler.scale(pa.sum() + pb.sum())
    ga, gb = torch.full((2,), 8.0), torch.tensor([8.0, math.inf])
    found = scaler.unscale_grads_(oa, [ga], all_reduce=False)
    assert isinstance(found, torch.Tensor) and found.item() == 0.0
    scaler.unscale_grads_(ob, [gb], all_reduce=False)
    assert torch.equal(ga, torch.ones(2)) and gb[0].item() == 1.0
    assert scaler.stage(oa) is scaler.stage(ob) is OptState.UNSCALED
    with pytest.raises(RuntimeError, match="already been called"):
        scaler.unscale_grads_(oa, [ga])
    with pytest.raises(RuntimeError, match="was not unscaled"):
        scaler.read_found_infs([torch.optim.SGD([torch.nn.Parameter(torch.ones(1))])])
    assert scaler.read_found_infs([oa, ob]) == [False, True]
    scaler.update()
    assert scaler.last_step_skipped and scaler.get_scale() == 4.0
    assert events[0].optimizers == (id(ob),)
    assert scaler.stage(oa) is OptState.READY


def test_inv_scale_is_torchs_reciprocal():
    for scale in (3000.0, 2.0**16, 1.7e-3):
        ref = torch.amp.GradScaler("cpu", init_scale=scale)
        ref._lazy_init_scale_growth_tracker(torch.device("cpu"))
        expected = ref._scale.double().reciprocal().float().item()
        assert DynamicLossScaler(init_scale=scale, max_scale=None).inv_scale() == expected


def test_scale_walks_nested_outputs():
    scaler = StaticLossScaler(4.0)
    t = torch.ones(())
    Pair = collections.namedtuple("Pair", "a b")
    out = scaler.scale({"x": [t, (t,)], "y": Pair(t, t)})
    assert out["x"][0].item() == out["x"][1][0].item() == out["y"].b.item() == 4.0
    assert isinstance(out["y"], Pair)
    lazy = scaler.scale(v for v in (t, t))  # other iterables: a lazy map, as torch's
    assert [v.item() for v in lazy] == [4.0, 4.0]
    with pytest.raises(ValueError, match="iterable of Tensors"):
        scaler.scale([t, None])


def test_update_warnings_point_at_the_caller():
    """The collapse warning (DynamicLossScaler) and the divergence warning (NoOpLossScaler, whose
    update() wraps the base one) both name the line that called update()."""
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=0.0)
    collapsing = DynamicLossScaler(init_scale=4.0, min_scale=2.0)
    diverging = NoOpLossScaler(check_finite=True, on_divergence="warn")
    for scaler, loss_factor in ((collapsing, 1.0), (diverging, math.inf)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                p.grad = None
                scaler.scale((p * loss_factor).sum()).backward()
                p.grad[0] = math.inf
                scaler.step(opt)
                line = inspect.currentframe().f_lineno + 1
                scaler.update()
        assert caught, type(scaler).__name__
        assert {(w.filename, w.lineno) for w in caught} == {(__file__, line)}


# ---------------------------------------------------------------------------- policies


def _drive(scaler, overflows):
    """Drive a scaler with a sequence of overflow flags; return the scale after each update."""
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=0.0)
    out = []
    for bad in overflows:
        opt.zero_grad()
        scaler.scale(p.sum()).backward()
        if bad:
            p.grad[0] = math.inf
        scaler.step(opt)
        scaler.update()
        out.append(scaler.get_scale())
    return out


def test_ceiling_and_floor():
    s = DynamicLossScaler(init_scale=8.0, growth_interval=1, max_scale=32.0)
    assert _drive(s, [0, 0, 0, 0]) == [16.0, 32.0, 32.0, 32.0]
    s = DynamicLossScaler(init_scale=8.0, min_scale=2.0, growth_interval=100)
    with pytest.warns(LossScaleCollapseWarning, match=r"min_scale=2.*Non-finite gradients in"):
        assert _drive(s, [1, 1, 1, 1]) == [4.0, 2.0, 2.0, 2.0]


def test_collapse_warning_names_parameters():
    m = _model()
    opt = torch.optim.SGD(m.named_parameters(), lr=0.1)
    s = DynamicLossScaler(init_scale=4.0, min_scale=2.0)
    caught = []
    for _ in range(3):
        _one_backward(s, m, opt)
        m[2].bias.grad[0] = math.nan
        s.step(opt)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            s.update()
        caught += [x for x in w if issubclass(x.category, LossScaleCollapseWarning)]
    assert len(caught) == 1  # once per run of overflows
    assert "2.bias" in str(caught[0].message) and "0.weight" not in str(caught[0].message)


def test_hysteresis():
    # back off only on the 3rd overflow in a row; further overflows in the run back off again;
    # a clean step resets the count
    s = DynamicLossScaler(init_scale=64.0, hysteresis=3, growth_interval=1000)
    got = _drive(s, [1, 1, 1, 1, 0, 1, 1, 0, 1, 1, 1])
    assert got == [64.0, 64.0, 32.0, 16.0, 16.0, 16.0, 16.0, 16.0, 16.0, 16.0, 8.0]
    assert s.skipped_steps == 9


def test_growth_never_reaches_inf():
    s = DynamicLossScaler(init_scale=2.0**127, growth_interval=1, max_scale=None)
    assert _drive(s, [0, 0]) == [2.0**127, 2.0**127]


def test_static_and_noop():
    s = StaticLossScaler(128.0)
    assert _drive(s, [0, 1, 0, 1]) == [128.0] * 4
    assert s.skipped_steps == 2 and s.last_step_skipped
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=1.0)
    n = NoOpLossScaler()
    loss = p.sum()
    assert n.scale(loss) is loss
    loss.backward()
    p.grad[0] = math.inf  # not checked: NoOp does nothing but step
    n.step(opt)
    n.update()
    assert p[0].item() == -math.inf and not n.last_step_skipped and n.get_scale() == 1.0


# ---------------------------------------------------------------------------- skip record


def test_skip_record_and_lr_scheduler():
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (k + 1))
    events: list[SkippedStep] = []
    scaler = DynamicLossScaler(init_scale=2.0**8, growth_interval=100, on_skip=events.append)
    plan = {0: math.inf, 3: math.nan, 4: math.inf}
    for it, (x, y) in enumerate(_data(8)):
        opt.zero_grad()
        scaler.scale(torch.nn.functional.mse_loss(m(x), y)).backward()
        _inject(m, it, plan)
        with warnings.catch_warnings():
            # the scheduler warns when the very first optimizer.step() was skipped
            warnings.simplefilter("ignore", UserWarning)
            scaler.step(opt)
            scaler.update()
            if not scaler.last_step_skipped:
                sched.step()
        assert scaler.last_step_skipped == (it in plan)
    assert [e.iteration for e in events] == [0, 3, 4]
    assert [e.scale for e in events] == [256.0, 128.0, 64.0]
    assert [e.new_scale for e in events] == [128.0, 64.0, 32.0]
    assert [e.consecutive for e in events] == [1, 1, 2]
    assert events[-1].skipped_steps == 3 == scaler.skipped_steps
    assert events[0].optimizers == (id(opt),)
    # 8 iterations, 3 skipped: the scheduler advanced exactly 5 times
    assert sched.last_epoch == 5
    assert opt.param_groups[0]["lr"] == pytest.approx(1.0 / 6)


# ---------------------------------------------------------------------------- divergence


def test_nan_loss_at_scale_one_raises_divergence():
    m = _model()
    opt = torch.optim.SGD(m.named_parameters(), lr=0.1)
    scaler = StaticLossScaler(1.0)
    x, y = _data(1)[0]
    x[0, 0] = math.nan
    before = [p.detach().clone() for p in m.parameters()]
    scaler.scale(torch.nn.functional.mse_loss(m(x), y)).backward()
    scaler.step(opt)
    with pytest.raises(DivergenceError, match=r"loss itself is NaN/inf.*0\.weight"):
        scaler.update()
    assert all(torch.equal(b, p) for b, p in zip(before, m.parameters(), strict=True))
    assert scaler.skipped_steps == 1  # state advanced before raising
    # warn mode reports and carries on
    scaler.on_divergence = "warn"
    scaler.scale(torch.nn.functional.mse_loss(m(x), y)).backward()
    scaler.step(opt)
    with pytest.warns(RuntimeWarning, match="diverged"):
        scaler.update()


def test_nan_loss_above_scale_one_is_an_overflow():
    """At scale > 1 a non-finite step is skipped and backs off, as torch (no error)."""
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    scaler = DynamicLossScaler(init_scale=4.0)
    x, y = _data(1)[0]
    x[0, 0] = math.nan
    for expected in (2.0, 1.0):
        opt.zero_grad()
        scaler.scale(torch.nn.functional.mse_loss(m(x), y)).backward()
        scaler.step(opt)
        scaler.update()
        assert scaler.get_scale() == expected
    # now at scale 1: a NaN loss is a divergence
    opt.zero_grad()
    scaler.scale(torch.nn.functional.mse_loss(m(x), y)).backward()
    scaler.step(opt)
    with pytest.raises(DivergenceError):
        scaler.update()


def test_large_gradients_below_scale_one_are_not_divergence():
    """Finite loss, overflowing gradients at scale <= 1: torch lets the scale drop, so do we."""
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=0.0)
    scaler = DynamicLossScaler(init_scale=1.0)
    scaler.scale(p.sum()).backward()
    p.grad[0] = math.inf
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 0.5 and scaler.last_step_skipped


# ---------------------------------------------------------------------------- checkpoints


def test_checkpoint_resume_same_trajectory():
    data = _data(20)
    plan = {2: math.inf, 9: math.nan, 10: math.inf}
    kw = dict(init_scale=2.0**6, growth_interval=3, hysteresis=2, min_scale=1.0)
    m = _model()
    opt = torch.optim.Adam(m.parameters(), lr=0.01)
    full, p_full = _run(DynamicLossScaler(**kw), m, opt, data, plan)

    m = _model()
    opt = torch.optim.Adam(m.parameters(), lr=0.01)
    scaler = DynamicLossScaler(**kw)
    first, _ = _run(scaler, m, opt, data[:10], plan)
    buf = io.BytesIO()
    torch.save({"m": m.state_dict(), "o": opt.state_dict(), "s": scaler.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf)
    m2 = _model(seed=5)
    m2.load_state_dict(ck["m"])
    opt2 = torch.optim.Adam(m2.parameters(), lr=0.01)
    opt2.load_state_dict(ck["o"])
    scaler2 = DynamicLossScaler()
    scaler2.load_state_dict(ck["s"])
    shifted = {k - 10: v for k, v in plan.items() if k >= 10}
    second, p_second = _run(scaler2, m2, opt2, data[10:], shifted)
    assert first + second == full
    for a, b in zip(p_full, p_second, strict=True):
        assert torch.equal(a, b)
    assert scaler2.skipped_steps == sum(t[1] for t in full)


def test_state_dict_compatible_with_torch():
    ours = DynamicLossScaler(init_scale=512.0, growth_interval=7)
    _drive(ours, [0, 1, 0, 0])
    ref = torch.amp.GradScaler("cpu")
    ref.load_state_dict(ours.state_dict())
    assert ref.get_scale() == ours.get_scale() == 256.0
    assert ref._get_growth_tracker() == 2 and ref.get_growth_interval() == 7
    back = DynamicLossScaler()
    back.load_state_dict(ref.state_dict())
    assert back.get_scale() == 256.0 and back._get_growth_tracker() == 2


def test_pickle_between_iterations():
    s = DynamicLossScaler(init_scale=32.0)
    _drive(s, [1, 0])
    s2 = pickle.loads(pickle.dumps(s))
    assert s2.get_scale() == 16.0 and s2.skipped_steps == 1
    assert _drive(s2, [1]) == [8.0]


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kw, exc",
    [
        (dict(growth_factor=1.0), ValueError),
        (dict(backoff_factor=1.5), ValueError),
        (dict(backoff_factor=0.0), ValueError),
        (dict(growth_interval=0), ValueError),
        (dict(growth_interval=2.5), TypeError),
        (dict(hysteresis=0), ValueError),
        (dict(init_scale=math.inf), ValueError),
        (dict(init_scale="big"), TypeError),
        (dict(min_scale=8.0, max_scale=4.0, init_scale=4.0), ValueError),
        (dict(init_scale=2.0**30), ValueError),  # above the default max_scale
        (dict(on_divergence="explode"), ValueError),
        (dict(on_skip=3), TypeError),
    ],
)
def test_bad_arguments(kw, exc):
    with pytest.raises(exc):
        DynamicLossScaler(**kw)


def test_static_bad_scale():
    with pytest.raises(ValueError, match="scale must be a finite number > 0"):
        StaticLossScaler(0.0)
