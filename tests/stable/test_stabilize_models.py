"""stabilize() on real models: capture with example inputs (torch.export), the corpus, planted
unstable forms inside a transformer block, and every rule checked with the sanitizer."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

from mixprec import sanitize, stabilize
from mixprec.stable.capture import CaptureError
from mixprec.testing import corpus

HERE = Path(__file__).resolve()


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _line_of(marker: str) -> int:
    lines = HERE.read_text().splitlines()
    hits = [i + 1 for i, line in enumerate(lines) if line.rstrip().endswith(f"# {marker}")]
    assert len(hits) == 1, marker
    return hits[0]


def _smaller(t: torch.Tensor) -> torch.Tensor:
    """One example; token sequences (batch x length) also cut to 8 tokens."""
    return t[:1, :8] if t.dim() == 2 else t[:1]


def _tensors(out: object) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


# --------------------------------------------------------------------------------------------
# the corpus: captured with example inputs, outputs unchanged, nothing rewritten
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", corpus.available())
def test_corpus_model_captured_unchanged(name: str) -> None:
    model, args, kwargs = corpus.get(name).example(0)
    model.eval()  # no dropout: outputs comparable bit for bit
    with pytest.raises(CaptureError, match=rf"{type(model).__name__}.*example inputs"):
        stabilize(model)
    gm, changes = stabilize(model, args, kwargs)
    assert changes == []  # no false rewrite in a model without unstable forms
    assert list(gm.state_dict()) == list(model.state_dict()) or set(gm.state_dict()) == set(
        model.state_dict()
    )
    own = dict(model.named_parameters(remove_duplicate=False))
    assert all(p is own[k] for k, p in gm.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        ref, out = model(*args, **kwargs), gm(*args, **kwargs)
    assert type(out) is type(ref)
    for a, b in zip(_tensors(ref), _tensors(out), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    # other batch size (and sequence length): the capture is not specialised to the example
    short_args = tuple(_smaller(a) for a in args)
    short_kwargs = {k: _smaller(v) for k, v in kwargs.items()}
    with torch.no_grad():
        ref, out = model(*short_args, **short_kwargs), gm(*short_args, **short_kwargs)
    for a, b in zip(_tensors(ref), _tensors(out), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


class _CheckedLabels(nn.Module):
    """transformers' CTC heads check their labels with a Python branch on a tensor's value."""

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if labels.max() >= 10:  # <value branch>
            raise ValueError("label out of range")
        return x.exp().sum()


def test_a_branch_on_a_tensor_value_is_named_with_the_fix() -> None:
    """torch.export cannot capture a Python branch on a tensor's value (wav2vec2 and HuBERT
    check their labels so): the error names the line and says how to capture around it."""
    x, labels = torch.randn(2, 4), torch.tensor([1, 2])
    with pytest.raises(CaptureError) as info:
        stabilize(_CheckedLabels(), (x, labels))
    msg = str(info.value)
    assert f"{HERE.name}:{_line_of('<value branch>')}" in msg
    assert "branches on a tensor's value" in msg and "no labels" in msg


def test_a_hybrid_cache_error_says_use_cache_false() -> None:
    """HF Jamba returns a hybrid (Mamba + attention) cache that transformers' pytree helper
    refuses: the error says to pass use_cache=False, and with it the model is captured."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.JambaConfig(
        hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        intermediate_size=64, vocab_size=64, num_experts=2, num_experts_per_tok=1,
        attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
        mamba_d_state=4,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.JambaForCausalLM(cfg).eval()
    kwargs = {"input_ids": torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))}
    with pytest.raises(CaptureError, match="pass use_cache=False in example_kwargs"):
        stabilize(model, (), kwargs)
    gm, changes = stabilize(model, (), {**kwargs, "use_cache": False})
    assert changes == []
    with torch.no_grad():
        ref, out = model(**kwargs, use_cache=False), gm(**kwargs, use_cache=False)
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=0)


def test_an_encoder_decoder_model_with_its_cache_is_captured() -> None:
    """T5 returns an EncoderDecoderCache (two DynamicCaches), which transformers does not
    register as a pytree node: torch.export refused the output until stabilize registered it.
    The captured model gives the same loss and cache tensors."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.T5Config(
        d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, vocab_size=64,
        decoder_start_token_id=0, dropout_rate=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(0)
    kwargs = {
        "input_ids": torch.randint(0, 64, (2, 8), generator=g),
        "labels": torch.randint(0, 64, (2, 4), generator=g),
    }
    gm, changes = stabilize(model, (), kwargs)
    assert changes == []
    with torch.no_grad():
        ref, out = model(**kwargs), gm(**kwargs)
    assert type(out.past_key_values) is type(ref.past_key_values)
    refs, outs = _tensors(ref), _tensors(out)
    assert len(outs) == len(refs) > 2  # the loss, the logits and the cached keys and values
    for a, b in zip(refs, outs, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_captured_model_trains_the_original_parameters() -> None:
    entry = corpus.get("nanogpt")
    model, args, kwargs = entry.example(0)
    gm, _ = stabilize(model, args, kwargs)
    loss_ref = entry.loss(model, args, kwargs)
    grads_ref = torch.autograd.grad(loss_ref, list(model.parameters()))
    loss = entry.loss(gm, args, kwargs)
    torch.testing.assert_close(loss, loss_ref, rtol=0, atol=0)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    for a, b in zip(grads_ref, grads, strict=True):
        torch.testing.assert_close(b, a)
    # one optimizer step over the stabilized module moves the original's weights
    before = model.lm_head.weight.detach().clone()
    opt = torch.optim.SGD(gm.parameters(), lr=0.1)
    entry.loss(gm, args, kwargs).backward()
    opt.step()
    assert not torch.equal(model.lm_head.weight, before)


# --------------------------------------------------------------------------------------------
# planted unstable forms inside a transformer block (nanoGPT-style, data-dependent shapes)
# --------------------------------------------------------------------------------------------
class PlantedBlock(nn.Module):
    """nanoGPT's manual attention with hand-written unstable forms; not symbolically traceable
    (an assert on a size, a buffer sliced by the sequence length)."""

    def __init__(self, d: int = 16, block_size: int = 32) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)))
        self.block_size = block_size

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        _, t, d = x.size()
        assert t <= self.block_size, "sequence too long"
        q, k, v = self.qkv(x).split(d, dim=2)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(d)
        att = att.masked_fill(self.bias[:t, :t] == 0, -1e4)
        att = att.exp() / att.exp().sum(dim=-1, keepdim=True)  # P:softmax
        y = self.proj(att @ v)
        logp = torch.log(F.softmax(y, dim=-1))  # P:log_softmax
        sp = torch.log(1 + torch.exp(y))  # P:softplus
        ls = torch.sigmoid(y).log()  # P:log_sigmoid
        l1m = torch.log(1 - torch.exp(-sp - 1))  # P:log1mexp
        em = y.exp() - 1  # P:expm1
        lp = torch.log(1 + att)  # P:log1p
        sg = 1 / (1 + torch.exp(-y))  # P:sigmoid
        lse = torch.log(torch.sum(torch.exp(y), dim=-1))  # P:logsumexp
        hy = torch.sqrt(q * q + k**2)  # P:hypot
        a = v.abs()
        xl = a * torch.log(a)  # P:xlogy
        var = (y * y).mean(-1) - y.mean(-1) ** 2  # P:var
        return logp, sp, ls, l1m, em, lp, sg, lse, hy, xl, var


PLANTED = [
    "softmax", "log_softmax", "softplus", "log_sigmoid", "log1mexp", "expm1", "log1p", "sigmoid",
    "logsumexp", "hypot", "xlogy", "var",
]  # fmt: skip


def test_planted_forms_in_a_block_are_each_rewritten() -> None:
    torch.manual_seed(0)
    block = PlantedBlock().eval()
    x = torch.randn(2, 8, 16)
    with pytest.raises(CaptureError, match="PlantedBlock"):
        stabilize(block)
    gm, changes = stabilize(block, (x,))
    got = sorted((c.rule, c.location) for c in changes)
    want = sorted((rule, f"{HERE}:{_line_of(f'P:{rule}')}") for rule in PLANTED)
    assert got == want
    assert all(c.code and c.code in HERE.read_text() for c in changes)
    for x_ in (x, torch.randn(3, 5, 16)):  # benign inputs, also another shape
        with torch.no_grad():
            for ref, out in zip(block(x_), gm(x_), strict=True):
                torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert set(gm.state_dict()) == set(block.state_dict())
    # nothing unstable is left behind
    assert stabilize(gm)[1] == []


def test_capture_errors_name_module_reason_and_fix() -> None:
    block = PlantedBlock()
    with pytest.raises(CaptureError) as info:
        stabilize(block)
    msg = str(info.value)
    assert "PlantedBlock" in msg and "TraceError" in msg and "example_args" in msg
    assert "co_varnames" not in msg
    with pytest.raises(CaptureError, match=r"torch\.export could not capture PlantedBlock"):
        stabilize(block, (torch.randn(2, 8, 5),))  # wrong feature size
    with pytest.raises(TypeError, match="example_args must be a tuple"):
        stabilize(block, torch.randn(2, 8, 16))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="example_kwargs must be a dict"):
        stabilize(block, (), [1])  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# every rule on hostile inputs: the sanitizer flags the original and not the rewrite
# --------------------------------------------------------------------------------------------
def _t(*v: float) -> torch.Tensor:
    return torch.tensor(v)


HOSTILE: dict[str, tuple[Callable[..., torch.Tensor], tuple[torch.Tensor, ...]]] = {
    "softmax": (lambda x: torch.exp(x) / torch.exp(x).sum(-1, keepdim=True), (_t(1e3, 0, -5),)),
    "log_softmax": (lambda x: torch.log(F.softmax(x, dim=-1)), (_t(0.0, -200.0),)),
    "softplus": (lambda x: torch.log(1 + torch.exp(x)), (_t(100.0, -100.0),)),
    "log_sigmoid": (lambda x: torch.log(torch.sigmoid(x)), (_t(-200.0, 1.0),)),
    "log1mexp": (lambda x: torch.log(1 - torch.exp(x)), (_t(-1e-10, -1.0),)),
    "expm1": (lambda x: torch.exp(x) - 1, (_t(1e-10),)),
    "log1p": (lambda x: torch.log(1 + x), (_t(1e-10),)),
    "sigmoid": (lambda x: 1 / (1 + torch.exp(-x)), (_t(-100.0, 0.5),)),
    "logsumexp": (lambda x: torch.log(torch.exp(x).sum(-1)), (_t(1000.0, 1000.0),)),
    "hypot": (lambda x, y: torch.sqrt(x * x + y**2), (_t(3e30), _t(4e30))),
    "xlogy": (lambda x, y: x * torch.log(y), (_t(0.0, 2.0), _t(0.0, 3.0))),
    "var": (
        lambda v: torch.mean(v * v) - torch.mean(v) ** 2,
        (1e4 + torch.randn(1000, generator=torch.Generator().manual_seed(1)),),
    ),
}


@pytest.mark.parametrize("capture", ["symbolic", "export"])
@pytest.mark.parametrize("rule", list(HOSTILE))
def test_rule_fixes_what_the_sanitizer_flags(rule: str, capture: str) -> None:
    fn, args = HOSTILE[rule]
    gm, changes = stabilize(fn) if capture == "symbolic" else stabilize(fn, args)
    assert [c.rule for c in changes] == [rule]
    with sanitize() as before:
        fn(*args)
    with sanitize() as after:
        gm(*args)
    assert before.findings, rule
    assert not after.findings, [f.kind for f in after.findings]
    benign = tuple(torch.rand(a.shape, generator=torch.Generator().manual_seed(2)) + 0.5
                   for a in args)  # fmt: skip
    if rule == "log1mexp":
        benign = (-benign[0],)
    torch.testing.assert_close(gm(*benign), fn(*benign), rtol=2e-6, atol=2e-6)


def test_softmax_rule_needs_one_kept_dim() -> None:
    def not_softmax(x: torch.Tensor) -> torch.Tensor:
        return torch.exp(x) / torch.exp(x).sum()  # normalised over everything, dim dropped

    def other_input(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.exp(x) / torch.exp(y).sum(-1, keepdim=True)

    assert stabilize(not_softmax)[1] == []
    assert stabilize(other_input)[1] == []
    x = torch.randn(3, 4)
    assert stabilize(not_softmax, (x,))[1] == []
