"""Tests of mixprec.stabilize (torch.fx rewrite) and the ``mixprec stabilize`` CLI."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from mixprec import cli, stable
from mixprec.stable import DEFAULT_RULES, Alt, Const, Op, Rule, Var, stabilize

HERE = Path(__file__).resolve()


def _line_of(marker: str) -> int:
    """Line number of the source line carrying ``# <marker>`` in this file (the oracle for the
    reported source locations)."""
    lines = HERE.read_text().splitlines()
    hits = [i + 1 for i, line in enumerate(lines) if line.rstrip().endswith(f"# {marker}")]
    assert len(hits) == 1, marker
    return hits[0]


class Unstable(nn.Module):
    """One instance of every default pattern, in several spellings."""

    def __init__(self) -> None:
        super().__init__()
        self.sm = nn.Softmax(dim=-1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        a = torch.log(1 + torch.exp(x))  # L:softplus
        b = (x.exp() + 1).log()  # L:softplus2
        c = torch.log(torch.sum(torch.exp(x), dim=-1))  # L:logsumexp
        d = torch.log(F.softmax(x, dim=-1))  # L:log_softmax
        d2 = self.sm(x).log()  # L:log_softmax2
        e = torch.exp(x) - 1  # L:expm1
        f = torch.log(1 + y)  # L:log1p
        g = 1 / (1 + torch.exp(-x))  # L:sigmoid
        h = torch.sqrt(x * x + y**2)  # L:hypot
        i = x * torch.log(y)  # L:xlogy
        j = torch.mean(x * x, dim=-1) - torch.mean(x, dim=-1) ** 2  # L:var
        return a, b, c, d, d2, e, f, g, h, i, j


EXPECTED = [
    ("softplus", "L:softplus"),
    ("softplus", "L:softplus2"),
    ("logsumexp", "L:logsumexp"),
    ("log_softmax", "L:log_softmax"),
    ("log_softmax", "L:log_softmax2"),
    ("expm1", "L:expm1"),
    ("log1p", "L:log1p"),
    ("sigmoid", "L:sigmoid"),
    ("hypot", "L:hypot"),
    ("xlogy", "L:xlogy"),
    ("var", "L:var"),
]


def test_every_issue_pattern_found_with_source_line() -> None:
    gm, changes = stabilize(Unstable())
    got = [(c.rule, c.location) for c in changes]
    want = [(rule, f"{HERE}:{_line_of(marker)}") for rule, marker in EXPECTED]
    assert got == want
    for c in changes:
        assert c.code and c.code in HERE.read_text()
        assert c.replacement
    # nothing unstable is left behind
    assert stabilize(gm)[1] == []


def test_benign_inputs_unchanged() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=g)
    y = torch.rand(6, 5, generator=g) + 0.1
    model = Unstable()
    gm, _ = stabilize(model)
    for ref, out in zip(model(x, y), gm(x, y), strict=True):
        torch.testing.assert_close(out, ref, rtol=2e-6, atol=2e-6)
    # float64: equal to rounding
    for ref, out in zip(model(x.double(), y.double()), gm(x.double(), y.double()), strict=True):
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-13)


def _fixed(fn, *args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gm, changes = stabilize(fn)
    assert changes, fn.__name__
    return fn(*args), gm(*args)


def test_hostile_inputs_fixed() -> None:
    t = torch.tensor
    naive, fixed = _fixed(lambda x: torch.log(1 + torch.exp(x)), t([100.0, -100.0]))
    assert naive[0].item() == math.inf and naive[1].item() == 0.0
    assert fixed[0].item() == 100.0 and fixed[1].item() == pytest.approx(math.exp(-100), rel=1e-6)

    naive, fixed = _fixed(lambda x: torch.log(torch.exp(x).sum(-1)), t([[1000.0, 1000.0]]))
    assert naive.item() == math.inf
    assert fixed.item() == pytest.approx(1000.0 + math.log(2.0))

    naive, fixed = _fixed(lambda x: torch.log(torch.softmax(x, -1)), t([0.0, -200.0]))
    assert naive[1].item() == -math.inf and fixed[1].item() == -200.0

    naive, fixed = _fixed(lambda x: torch.exp(x) - 1, t([1e-10]))
    assert naive.item() == 0.0 and fixed.item() == pytest.approx(1e-10, rel=1e-6)

    naive, fixed = _fixed(lambda x: torch.log(1 + x), t([1e-10]))
    assert naive.item() == 0.0 and fixed.item() == pytest.approx(1e-10, rel=1e-6)

    naive, fixed = _fixed(lambda x, y: torch.sqrt(x * x + y * y), t([3e30]), t([4e30]))
    assert naive.item() == math.inf and fixed.item() == pytest.approx(5e30, rel=1e-6)

    naive, fixed = _fixed(lambda x, y: x * torch.log(y), t([0.0, 2.0]), t([0.0, 3.0]))
    assert math.isnan(naive[0].item()) and fixed[0].item() == 0.0
    assert fixed[1].item() == pytest.approx(2 * math.log(3.0))

    # one-pass variance of data far from 0: float32 cancels to garbage (even negative)
    x = 1e4 + torch.randn(1000, generator=torch.Generator().manual_seed(1))
    ref = x.double().var(unbiased=False).item()
    naive, fixed = _fixed(lambda v: torch.mean(v * v) - torch.mean(v) ** 2, x)
    assert abs(naive.item() - ref) > 0.05 * ref
    assert fixed.item() == pytest.approx(ref, rel=1e-4)


def test_hostile_gradients_fixed() -> None:
    def sig(x: torch.Tensor) -> torch.Tensor:
        return 1 / (1 + torch.exp(-x))

    gm, _ = stabilize(sig)
    x = torch.tensor([-100.0, 0.0, 100.0], requires_grad=True)
    (g_naive,) = torch.autograd.grad(sig(x).sum(), x)
    (g_fixed,) = torch.autograd.grad(gm(x).sum(), x)
    assert torch.isnan(g_naive[0])
    assert torch.isfinite(g_fixed).all()
    torch.testing.assert_close(g_fixed, torch.sigmoid(x) * torch.sigmoid(-x))


def test_chained_rewrites_and_extra_rules() -> None:
    def f(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        p = 1 / (1 + torch.exp(-x))
        return torch.log(p) + torch.log(torch.exp(x) + torch.exp(y)) + torch.log(torch.cosh(y))

    gm, changes = stabilize(f)
    assert [c.rule for c in changes] == ["sigmoid", "log_sigmoid", "logaddexp", "logcosh"]
    x = torch.tensor([-200.0, 1.0])
    y = torch.tensor([300.0, 2.0])
    out = gm(x, y)
    assert torch.isfinite(out).all() and not torch.isfinite(f(x, y)).all()
    ref = stable.log_sigmoid(x) + stable.logaddexp(x, y) + stable.logcosh(y)
    torch.testing.assert_close(out, ref)


def test_no_false_positives() -> None:
    def f(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a = torch.log(2 + torch.exp(x))  # not log(1 + exp)
        b = torch.add(1, torch.exp(x), alpha=2).log()  # 1 + 2 exp(x)
        c = torch.exp(x) - 2
        d = F.softplus(x) + torch.logsumexp(x, -1, keepdim=True) + torch.log_softmax(x, -1)
        e = torch.mean(x * x, 0) - torch.mean(x, 1) ** 2  # different dims: not a variance
        f_ = 0.5 * torch.log(y)  # constant factor: cannot be 0, plain product is right
        g = torch.sqrt(x * y + y * y)
        return a + b + c + d + e + f_ + g

    _, changes = stabilize(f)
    assert changes == []


def test_input_module_untouched_and_graphmodule_input() -> None:
    model = Unstable()
    traced = fx.symbolic_trace(model)
    code_before = traced.code
    gm, changes = stabilize(traced)
    assert traced.code == code_before
    assert len(changes) == len(EXPECTED)
    # fx.symbolic_trace records no stack traces: locations fall back to the node names
    assert all(c.location.startswith("<graph>:") for c in changes)
    assert gm is not traced


def _helper(v: torch.Tensor) -> torch.Tensor:
    return torch.log(1 + torch.exp(v))  # L:helper


def test_location_is_innermost_user_frame() -> None:
    def f(x: torch.Tensor) -> torch.Tensor:
        return _helper(x) * 2

    _, changes = stabilize(f)
    assert [c.location for c in changes] == [f"{HERE}:{_line_of('L:helper')}"]


def test_user_rules_extend_the_defaults() -> None:
    # a rule on an op the canonical table knows, whose replacement is an existing node ...
    log_exp = Rule(
        "log_exp",
        (Op("log", Op("exp", Var("x", tensor=True))),),
        lambda graph, m: m["x"],
        "x",
    )
    # ... and one on an arbitrary function object
    tanh_sig = Rule(
        "tanh_via_sigmoid",
        Op("sub", Op("mul", Const(2), Op(torch.sigmoid, Op("mul", Const(2), Var("x")))), Const(1)),
        lambda graph, m: graph.call_function(torch.tanh, (m["x"],)),
        "torch.tanh",
    )

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.log(torch.exp(x)) + (2 * torch.sigmoid(2 * x) - 1)

    gm, changes = stabilize(f, rules=[*DEFAULT_RULES, log_exp, tanh_sig])
    assert sorted(c.rule for c in changes) == ["log_exp", "tanh_via_sigmoid"]
    x = torch.tensor([200.0, 0.3])
    torch.testing.assert_close(gm(x), x + torch.tanh(x))
    assert "torch.exp" not in gm.code and "tanh" in gm.code
    # the defaults alone do not know these patterns
    assert stabilize(f)[1] == []
    # Alt: alternatives inside one pattern
    sq = Rule(
        "square",
        Alt(Op("mul", Var("x"), Var("x")), Op("pow", Var("x"), Const(2))),
        lambda graph, m: graph.call_function(torch.square, (m["x"],)),
        "torch.square",
    )
    _, changes = stabilize(lambda x: x * x + x**2, rules=[sq])
    assert [c.rule for c in changes] == ["square", "square"]


def test_bad_rules() -> None:
    with pytest.raises(ValueError, match="unknown op"):
        Op("logg", Var("x"))
    with pytest.raises(TypeError, match="Rule objects"):
        stabilize(lambda x: x, rules=[object()])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="Pattern"):
        Rule("r", ("not a pattern",), lambda g, m: m.root, "x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_passes"):
        stabilize(lambda x: x, max_passes=0)
    with pytest.raises(TypeError, match=r"nn\.Module, a GraphModule or a function"):
        stabilize(42)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# the CLI
# --------------------------------------------------------------------------------------------
MODEL_FILE = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Head(nn.Module):
        def forward(self, x):
            return torch.log(torch.sum(torch.exp(x), dim=-1))


    class NeedsArgs(nn.Module):
        def __init__(self, n):
            super().__init__()

        def forward(self, x):
            return x


    def loss(p, q):
        return (p * torch.log(q)).sum()


    def fine(x):
        return torch.nn.functional.softplus(x)
    """
)


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "model.py"
    path.write_text(MODEL_FILE)
    return path


def test_cli_check_reports_and_fails(model_file: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["stabilize", str(model_file), "--check"]) == 1
    out = capsys.readouterr().out
    lines = MODEL_FILE.splitlines()
    lse_line = next(i + 1 for i, s in enumerate(lines) if "torch.sum(torch.exp" in s)
    xlogy_line = next(i + 1 for i, s in enumerate(lines) if "torch.log(q)" in s)
    assert f"{model_file}:{lse_line}: Head: logsumexp" in out
    assert f"{model_file}:{xlogy_line}: loss: xlogy" in out
    assert "NeedsArgs: skipped" in out
    assert "2 unstable patterns found in 3 traced targets" in out


def test_cli_clean_target_and_json(model_file: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["stabilize", str(model_file), "--check", "--target", "fine"]) == 0
    assert "0 unstable patterns" in capsys.readouterr().out
    # without --check the exit status is 0 even with findings
    assert cli.main(["stabilize", str(model_file), "--json", "--target", "Head"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["schema_version"] == 1 and doc["unstable_patterns"] == 1
    (target,) = doc["targets"]
    assert target["name"] == "Head" and target["changes"][0]["rule"] == "logsumexp"
    assert cli.main(["stabilize", str(model_file), "--show-code", "--target", "loss"]) == 0
    assert "mixprec_stable_xlogy" in capsys.readouterr().out


def test_cli_errors(model_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["stabilize", str(model_file), "--target", "nope"]) == 2
    err = capsys.readouterr().err
    assert "no nn.Module subclass or function named nope" in err and "Head" in err
    assert cli.main(["stabilize", str(tmp_path / "missing.py")]) == 2
    assert "is not a file" in capsys.readouterr().err
    broken = tmp_path / "broken.py"
    broken.write_text("def f(:\n")
    assert cli.main(["stabilize", str(broken)]) == 2
    assert "importing" in capsys.readouterr().err
