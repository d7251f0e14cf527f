"""The sanitizer on real models (issue #13): the corpus of models written by others.

Clean training steps must give zero findings; problems planted in them (the causal-mask
patterns of every decoder: ``masked_fill(-inf)`` then exp / softmax) must be found at the op and
source line that produced them, element by element, with root causes linked.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from sanitizer_helpers import marker_line, only
from torch import nn

from mixprec.sanitizer import Finding, Report, sanitize
from mixprec.testing import corpus

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def line_of(marker: str) -> str:
    """'test_corpus.py:LINE' of the source line carrying ``# <marker>``."""
    return marker_line(__file__, marker)


@pytest.mark.parametrize("name", corpus.available())
def test_clean_training_step_has_no_findings(name: str) -> None:
    entry = corpus.get(name)
    model, args, kwargs = entry.example(0)
    with sanitize() as report:
        entry.loss(model, args, kwargs).backward()
    assert report.findings == [], [f.label for f in report.findings]
    assert report.stats["ops_shadowed"] > 100
    assert report.stats["internal_errors"] == {}


# -- planted problems in nanoGPT's attention --------------------------------------------------


class _PlantedAttention(nn.Module):
    """nanoGPT's attention (corpus weights) with one planted problem, chosen by ``plant``."""

    def __init__(self, orig: nn.Module, plant: str) -> None:
        super().__init__()
        self.c_attn, self.c_proj, self.n_head = orig.c_attn, orig.c_proj, orig.n_head
        self.register_buffer("bias", orig.bias)
        self.plant = plant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = (
            t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
            for t in self.c_attn(x).split(C, dim=2)
        )
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = getattr(self, "_" + self.plant)(att, self.bias[:, :, :T, :T] == 0)
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)

    @staticmethod
    def _naive_inf(att: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        att = att.masked_fill(masked, float("-inf"))
        att[..., -1, 0] = 100.0  # one score overflows exp, next to the -inf of the mask
        e = att.exp()  # <naive-inf-exp>
        return e / e.sum(-1, keepdim=True)  # <naive-inf-div>

    @staticmethod
    def _naive_finite(att: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        att = att.masked_fill(masked, -1e9)
        att[..., -1, 0] = 100.0
        e = att.exp()  # <naive-finite-exp>
        return e / e.sum(-1, keepdim=True)

    @staticmethod
    def _full_row(att: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        masked = masked.clone()
        masked[..., 0, :] = True  # a fully masked query row
        att = att.masked_fill(masked, float("-inf"))
        return F.softmax(att, dim=-1).nan_to_num(0.0)  # <full-row-softmax>

    @staticmethod
    def _lse_row(att: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        masked = masked.clone()
        masked[..., 0, :] = True
        att = att.masked_fill(masked, float("-inf"))
        lse = torch.logsumexp(att, -1, keepdim=True)  # <lse-row>
        return (att - lse.clamp(min=-1e4)).exp()  # the NaN is born in logsumexp's backward


def _planted_step(plant: str, track_grads: bool = True) -> list[Finding]:
    entry = corpus.get("nanogpt")
    model, args, kwargs = entry.example(0)
    block = model.transformer.h[0]
    block.attn = _PlantedAttention(block.attn, plant)
    with sanitize(track_grads=track_grads) as report:
        entry.loss(model, args, kwargs).backward()
    return report.findings


def test_overflow_next_to_minus_inf_is_found_at_exp() -> None:
    fs = _planted_step("naive_inf")
    over = only(fs, kind="overflow", phase="forward", location=line_of("naive-inf-exp"))
    assert over and over[0].count == 2 * 4  # the planted element, in every batch and head
    assert over[0].module == "transformer.h.0.attn"
    # inf / inf: a NaN born at the division, caused by the overflow
    nan = only(fs, kind="nan", phase="forward", location=line_of("naive-inf-div"))
    assert nan and nan[0].cause == over[0].label


def test_overflow_with_a_finite_mask_is_found_at_exp() -> None:
    fs = _planted_step("naive_finite")
    assert only(fs, kind="overflow", phase="forward", location=line_of("naive-finite-exp"))


def test_fully_masked_row_nan_is_found_at_softmax() -> None:
    fs = _planted_step("full_row")
    nan = only(fs, kind="nan", phase="forward", location=line_of("full-row-softmax"))
    assert nan and nan[0].op == "aten._softmax.default"
    assert nan[0].count == 2 * 4 * 16  # one row of 16 per batch and head


def test_nan_born_in_backward_is_found_at_its_forward_line() -> None:
    fs = _planted_step("lse_row")
    back = only(fs, kind="nan", phase="backward", location=line_of("lse-row"))
    assert back, [f.label for f in fs]
    # the forward -inf of a fully masked row is inherited from the mask: no finding
    assert not only(fs, phase="forward", location=line_of("lse-row"))


# -- forward only: the cheaper check ------------------------------------------------------------


def _step_grads(
    name: str, track_grads: bool | None
) -> tuple[dict[str, torch.Tensor], Report | None]:
    """One training step of a fresh corpus model (plain where ``track_grads`` is None): its
    parameters' gradients and the report."""
    entry = corpus.get(name)
    model, args, kwargs = entry.example(0)
    torch.manual_seed(1)  # the same dropout masks in both runs
    if track_grads is None:
        entry.loss(model, args, kwargs).backward()
        report = None
    else:
        with sanitize(track_grads=track_grads) as report:
            entry.loss(model, args, kwargs).backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, report


@pytest.mark.parametrize("name", corpus.available())
def test_forward_only_checks_the_forward_and_leaves_the_backward_alone(name: str) -> None:
    """``sanitize(track_grads=False)``, the cheaper check the docs offer: the forward's ops are
    shadowed and checked, the backward runs as in a plain step (the same gradients, bit for
    bit), and no gradient statistics are kept."""
    plain, _ = _step_grads(name, None)
    grads, report = _step_grads(name, False)
    assert report is not None
    assert report.findings == [], [f.label for f in report.findings]
    assert report.stats["ops_shadowed"] > 30
    assert report.stats["internal_errors"] == {}
    assert report.stats["backward_passes"] == 0
    assert grads.keys() == plain.keys()
    for n, g in grads.items():
        assert torch.equal(g.view(torch.int32), plain[n].view(torch.int32)), n
    with pytest.raises(RuntimeError, match="no gradients were recorded"):
        report.grad_histogram("float16")


def test_forward_only_still_finds_the_forward_problem_but_not_the_backward_one() -> None:
    fs = _planted_step("naive_inf", track_grads=False)
    assert only(fs, kind="overflow", phase="forward", location=line_of("naive-inf-exp"))
    # the NaN born in logsumexp's backward is out of a forward-only check's sight
    assert _planted_step("lse_row", track_grads=False) == []


# -- elementwise rules, in-place views, root causes ---------------------------------------------


def test_non_finite_input_does_not_hide_other_elements() -> None:
    with sanitize() as report:
        torch.exp(torch.tensor([1.0, 100.0, -math.inf]))  # <exp-minus-inf>
        torch.exp(torch.tensor([math.inf, 1.0, math.nan]))  # <exp-propagates>
    over = only(report.findings, kind="overflow", location=line_of("exp-minus-inf"))
    assert over and over[0].count == 1
    assert not only(report.findings, location=line_of("exp-propagates"))


def test_nan_born_from_inf_inside_a_gemm_is_new_and_names_its_cause() -> None:
    # a product sum holding +inf and -inf terms gives NaN where no NaN input reaches: new, as
    # at an elementwise op, although the GEMM's inputs carry an infinite inherited error
    x = torch.tensor([[100.0, 100.0], [1.0, 2.0]])
    w = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    with sanitize() as report:
        y = torch.exp(x)  # <gemm-exp>
        torch.mm(y, w)  # <gemm-nan>
    over = only(report.findings, kind="overflow", location=line_of("gemm-exp"))
    nan = only(report.findings, kind="nan", location=line_of("gemm-nan"))
    assert over and nan, [f.label for f in report.findings]
    assert nan[0].count == 1  # row 0, column 1: inf - inf; column 0's inf is inherited
    assert nan[0].cause == over[0].label
    assert not only(report.findings, kind="overflow", location=line_of("gemm-nan"))


def test_in_place_on_a_view_keeps_the_base_shadow() -> None:
    a = torch.randn(2, 8, generator=torch.Generator().manual_seed(0))
    with sanitize() as report:
        b = a * 1.0
        v = b[:, :4]
        v.mul_(1e30)
        v.exp_()  # <view-exp>
        c = a * 1.0
        w = c[:, 2:5]
        w.mul_(1e30)
        d = c * 1e-30  # stale base shadow would make this a precision loss
    kinds = {f.kind for f in report.findings}
    assert kinds == {"inf"}, [f.label for f in report.findings]
    (f,) = report.findings
    assert f.location == line_of("view-exp") and f.count == int((a[:, :4] > 0).sum())
    assert torch.equal(d[:, 2:5], (a[:, 2:5] * 1e30) * 1e-30)


def test_views_carry_shadows_without_a_shadow_run() -> None:
    """Views (and ``_unsafe_view``, an alias not marked as a view) of a tensor with a whole
    shadow get views of that shadow: not re-run, not measured, and findings still seen."""
    x = torch.full((4, 64), 3.0) + torch.linspace(0, 1e-3, 256).reshape(4, 64)
    with sanitize() as report:
        a, b = x * 1.1, x * 1.1000001
        a.t()[1:] - b.t()[1:]  # <view-sub>
        torch.ops.aten._unsafe_view(a, [256]) - b.reshape(256)  # <alias-sub>
    for marker in ("view-sub", "alias-sub"):
        (f,) = only(report.findings, location=line_of(marker))
        assert f.kind == "cancellation" and f.op == "aten.sub.Tensor"
    assert report.stats["ops_shadowed"] == 4  # the two mul and the two sub


def test_copies_share_their_source_shadow_and_copy_on_write() -> None:
    """A clone's shadow is its source's (no float64 copy); a partial in-place write to either
    copies first, so neither sees the other's update."""
    from mixprec.sanitizer.mode import active_engine

    x = torch.full((4, 64), 3.0) + torch.linspace(0, 1e-3, 256).reshape(4, 64)
    exact = x.double() * float(torch.tensor(1.1, dtype=torch.float32))
    with sanitize() as report:
        a = x * 1.1
        c = a.clone()
        store = active_engine().shadows.store
        shared = store.lookup(c)[0].untyped_storage()._cdata
        assert shared == store.lookup(a)[0].untyped_storage()._cdata
        c[0].mul_(2.0)  # written into c's shadow only
        assert torch.equal(store.lookup(a)[0], exact)
        assert torch.equal(store.lookup(c)[0][0], 2 * exact[0])
        assert torch.equal(store.lookup(c)[0][1:], exact[1:])
    assert report.stats["ops_shadowed"] == 3 and report.findings == []


def test_view_of_a_partly_shadowed_storage_is_run_on_the_shadow() -> None:
    """A storage shadowed only in part keeps per-view shadows: a view of that part needs the
    view op run on the shadow (the one case where a view costs a shadow run)."""
    x = torch.full((4,), 3.0) + torch.tensor([0.0, 1e-4, 2e-4, 3e-4])
    with sanitize() as report:
        buf = torch.zeros(8)
        buf[:4].copy_(x * 1.1)
        buf[:4].view(2, 2) - (x * 1.1000001).view(2, 2)  # <partial-view-sub>
    (f,) = report.findings
    assert f.kind == "cancellation" and f.location == line_of("partial-view-sub")


def test_fused_cpu_attention_is_checked_when_it_has_no_dropout() -> None:
    """``F.scaled_dot_product_attention`` on the CPU (LLaMA's attention) is one fused aten op
    tagged random for its dropout: without dropout it is shadowed like any compute op, so a
    score overflow inside it is found at its line (with dropout, torch decomposes it into ops
    that are checked one by one)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 4, 8, generator=g) for _ in range(3))
    with sanitize() as report:
        F.scaled_dot_product_attention(q * 1e20, k * 1e20, v)  # <sdpa-overflow>
    fs = only(report.findings, location=line_of("sdpa-overflow"))
    assert {f.op for f in fs} == {"aten._scaled_dot_product_flash_attention_for_cpu.default"}
    # the output (its logsumexp result loses bits too). What torch's float32 kernel makes of
    # the overflowing scores depends on the CPU: NaN (inf - inf) on some, all zeros on others
    # (an AMD EPYC at AVX512); the float64 shadow is finite and nonzero either way
    real = F.scaled_dot_product_attention(q * 1e20, k * 1e20, v)
    assert bool(real.isnan().any()) or bool((real == 0).all())
    assert ("nan" if real.isnan().any() else "precision_loss") in {f.kind for f in fs}


def test_log_of_underflowed_softmax_names_its_cause() -> None:
    entry = corpus.get("nanogpt")
    model, (idx, _targets), _ = entry.example(0)
    with sanitize() as report:
        logits, _ = model(idx)
        p = F.softmax(logits * 1e3, dim=-1)  # <underflowing-softmax>
        loss = -torch.log(p).mean()  # <log-of-zero>
    over = only(report.findings, kind="overflow", location=line_of("log-of-zero"))
    under = only(report.findings, kind="underflow", location=line_of("underflowing-softmax"))
    assert over and under
    assert under[0].op == "aten._softmax.default" and under[0].cause is None
    assert over[0].cause == under[0].label
    assert [f.label for f in report.chain(over[0])] == [under[0].label, over[0].label]
    assert "caused by (root cause first)" in str(report)
    # JSON: the additive field round-trips, schema_version stays 1
    again = Report.from_json(report.to_json())
    assert [f.cause for f in again.findings] == [f.cause for f in report.findings]
    assert json.loads(report.to_json())["schema_version"] == 1
    assert math.isinf(float(loss.detach()))


# -- reports fit the terminal; torch.compile'd modules -----------------------------------------


def _chained_report():
    with sanitize() as report:
        x = torch.tensor([[0.0, -200.0, 1.0]], requires_grad=True)
        torch.log(torch.softmax(x, -1)).sum().backward()
    return report


def test_report_reads_at_80_columns_without_padding() -> None:
    report = _chained_report()
    text = report.render(80)
    lines = text.splitlines()
    table = [ln for ln in lines if ln[:1] in "┏┃┡│└"]
    assert table and max(len(ln) for ln in table) <= 80
    assert all(ln == ln.rstrip() for ln in lines)
    assert "rel err" not in text and "_softmax" in text and "(backward)" in text
    wide = report.render(200)
    assert "rel err" in wide and "aten._softmax.default" in wide
    # notes are never hard-wrapped: each cause label stays on one line
    assert any(ln.strip() == f"-> {report.findings[-1].label}" for ln in wide.splitlines()) or (
        "caused by (root cause first):" in wide
    )
    assert str(report) == report.render(120)


def test_cli_width_and_piped_output(tmp_path) -> None:
    import subprocess
    import sys

    script = tmp_path / "s.py"
    script.write_text(
        "import torch\nx = torch.tensor([[0.0, -200.0, 1.0]])\ntorch.log(torch.softmax(x, -1))\n"
    )
    cmd = [sys.executable, "-m", "mixprec", "sanitize", "--out", str(tmp_path / "r")]
    out = subprocess.run([*cmd, "--width", "80", str(script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert all(ln == ln.rstrip() for ln in lines)
    assert max(len(ln) for ln in lines if ln[:1] in "┏┃┡│└") <= 80
    assert "-> overflow at aten.log.default (forward, s.py:3)" in out.stdout


def test_compiled_module_runs_eagerly_and_is_checked() -> None:
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.exp(self.lin(x) + 100.0)  # <compiled-exp>

    torch.manual_seed(0)
    model = torch.compile(Scaled(), backend="eager")
    x = torch.randn(2, 4)
    model(x)  # compiled outside the sanitizer
    with sanitize() as report:
        model(x)
    assert only(report.findings, kind="overflow", location=line_of("compiled-exp"))
    assert report.stats["compiled_run_eagerly"] == ["(root)"]
    assert "run eagerly to be checked" in report.render(100)
    assert "compiled_run_eagerly" not in _chained_report().stats


_FRESH = """
import sys, torch
from mixprec.sanitizer import sanitize
torch.manual_seed(0)
lin = torch.nn.Linear(4, 4)
with sanitize() as first:
    lin(torch.randn(2, 4)).sum().backward()
print("dynamo after a sanitized step:", "torch._dynamo" in sys.modules)

def f(x):
    y = torch.exp(lin(x) + 100.0)
    print("graph break")
    return y.sum()

# each feature of opposite signs in the two rows: the weight gradient sums +inf and -inf
x = torch.tensor([[1.0, -2.0, 0.5, -1.0], [-1.0, 2.0, -0.5, 1.0]])
with sanitize() as report:  # torch.compile first used inside the region
    torch.compile(f, backend="eager")(x).backward()
print(sorted({(x.op, x.kind, x.location.split(":")[0]) for x in report.findings}))
"""


def test_fresh_process_sanitizes_without_dynamo_and_checks_code_compiled_inside() -> None:
    """A process that never compiles pays nothing for dynamo (torch's own wrapper of
    __torch_dispatch__ would import it, ~1.5 s, at the first sanitized op); torch.compile
    first used inside a region still runs eagerly and is checked."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _FRESH], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "dynamo after a sanitized step: False" in out.stdout
    # the overflow, and the NaN its inf makes in the weight gradient (inf - inf in the GEMM;
    # with random inputs of the same sign in a column, 1 run in 16 had no NaN)
    found = "[('aten.exp.default', 'overflow', '<string>'), ('aten.mm.default', 'nan', '<string>')]"
    assert found in out.stdout, out.stdout


def test_layer_norm_of_centred_rows_is_no_finding() -> None:
    # the saved row means cancel to ~0: judged against the mean of |x|, as a sum is (a BERT
    # step with some dropout masks hit this)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=g) * 3
    x = x - x.mean(-1, keepdim=True)
    with sanitize() as report:
        F.layer_norm(x, (64,))
    assert report.findings == []


def test_bert_steps_with_fresh_dropout_masks_have_no_findings() -> None:
    if "bert" not in corpus.available():
        pytest.skip("transformers is not installed")
    entry = corpus.get("bert")
    model, args, kwargs = entry.example(0)
    torch.manual_seed(5)  # dropout masks of the step that hit the layer-norm mean
    for _ in range(8):
        with sanitize() as report:
            entry.loss(model, args, kwargs).backward()
        model.zero_grad(set_to_none=True)
        assert report.findings == [], [f.label for f in report.findings]


def test_resnet_batch_norm_over_two_values_is_found_in_its_backward() -> None:
    """A true positive in a real model: at 32 x 32 the corpus ResNet-18's last stage has one
    position per image, so with a batch of 2 its batch norms normalise 2 values per channel.
    Their gradient w.r.t. the input is then (g1 - g2)(1 - x̂²)/σ with x̂² = d²/(d² + eps): it
    cancels to a few ulps of g in float32, which the float64 shadow shows as bits lost."""
    if "resnet18" not in corpus.available():
        pytest.skip("transformers is not installed")
    entry = corpus.get("resnet18")
    torch.manual_seed(0)
    model = entry.build()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 3, 32, 32, generator=g), torch.tensor([1, 2])
    with sanitize() as report:
        model(pixel_values=x, labels=y).loss.backward()
    # (how many of the stage's batch norms cross the threshold depends on the CPU's kernels)
    found = only(report.findings, kind="precision_loss", phase="backward")
    assert found and found == report.findings
    for f in found:
        assert f.op == "aten.native_batch_norm_backward.default"
        assert f.module.startswith("resnet.encoder.stages.3.") and f.shape[1:] == (128, 1, 1)
    assert max(f.bits_lost for f in found) > 8
    # the same step at 64 x 64 (2 x 2 positions: 8 values per channel) is clean
    model.zero_grad(set_to_none=True)
    with sanitize() as clean:
        entry.loss(model, *entry.inputs(torch.Generator().manual_seed(0))).backward()
    assert clean.findings == []


def test_clip_step_has_no_findings() -> None:
    """HF CLIP from a small config (random init, no download): its text encoder's attention
    gets a score gradient that is exactly 0 (the contrastive loss reads one position), and the
    CPU flash kernel's backward leaves rounding noise in the query and key gradients, judged
    against the kernel's reductions (24-bit precision losses before)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    text = {
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "vocab_size": 256,
        "max_position_embeddings": 64,
    }
    vision = {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
              "intermediate_size": 128, "image_size": 32, "patch_size": 8}  # fmt: skip
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)
    model = transformers.CLIPModel(config).train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (2, 16), generator=g)
    pixels = torch.randn(2, 3, 32, 32, generator=g)
    with sanitize() as report:
        model(input_ids=ids, pixel_values=pixels, return_loss=True).loss.backward()
    assert report.findings == [], [f.label for f in report.findings]
    assert report.stats["internal_errors"] == {}


def _ctc_step(input_len: int) -> list[Finding]:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(20, 2, 8, generator=g, requires_grad=True)
    targets = torch.randint(1, 8, (2, 6), generator=g)
    with sanitize() as report:
        loss = F.ctc_loss(
            logits.log_softmax(-1), targets, torch.tensor([input_len, 20]), torch.tensor([6, 5])
        )
        if math.isfinite(float(loss)):
            loss.backward()
    assert report.stats["internal_errors"] == {}
    return report.findings


def test_ctc_loss_alignment_table_is_no_finding() -> None:
    """CTC's second result, log_alpha, is the op's own state for its backward: log 0 = -inf for
    every alignment state no path reaches, on every step, exactly as in float64 (wav2vec2 and
    HuBERT reported an ``inf`` at their loss before), and for a target shorter than the longest
    its last states are never written (uninitialized memory: a 2^200 "precision loss" before).
    It is not judged; the loss and the backward are checked as before."""
    assert [f for f in _ctc_step(20) if f.phase == "forward"] == []


def test_an_infeasible_ctc_target_is_still_found() -> None:
    """An input shorter than its target has no alignment: the loss itself is inf (no
    ``zero_infinity``), a finite input producing inf, at the loss's line."""
    found = only(_ctc_step(4), kind="inf")
    assert [f.op for f in found] == ["aten._ctc_loss.Tensor"]
    assert found[0].shape == (2,)  # the loss per sample, not the alignment table
