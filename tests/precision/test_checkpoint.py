"""Activation checkpointing inside emulated regions: ``mixprec.checkpoint_context``.

torch.utils.checkpoint recomputes the forward during backward, outside the region that ran it;
with ``context_fn=mixprec.checkpoint_context`` the recomputation re-enters the regions, and a
checkpointed step gives the same bits as the plain one (HF GPT-2 from the corpus, with HF's own
activation checkpointing; a hand-written block).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch.utils.checkpoint import checkpoint, noop_context_fn

import mixprec
from mixprec.precision import CheckpointPrecisionWarning, emulated
from mixprec.precision.region import _LOCAL
from mixprec.testing import corpus

FORMATS = ["bf16", "fp16", "e4m3", "mxfp8_e4m3"]


def _grads(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def _block_step(fmt: str, ckpt: bool, context_fn: object | None) -> list[torch.Tensor]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 16))
    x = torch.randn(4, 5, 32, requires_grad=True)
    kwargs = {} if context_fn is None else {"context_fn": context_fn}
    with mixprec.autocast(fmt, emulate=True):
        y = checkpoint(net, x, use_reentrant=False, **kwargs) if ckpt else net(x)
    y.square().sum().backward()
    return [y.detach(), x.grad, *_grads(net)]


@pytest.mark.parametrize("fmt", FORMATS)
def test_checkpointed_block_is_bit_exact_with_the_context(fmt: str) -> None:
    plain = _block_step(fmt, False, None)
    with_context = _block_step(fmt, True, mixprec.checkpoint_context)
    assert all(torch.equal(a, b) for a, b in zip(plain, with_context, strict=True))
    assert _LOCAL.regions == []  # every re-entry left again


def test_without_the_context_the_recomputation_runs_in_fp32() -> None:
    """Why the context exists: torch recomputes outside the region, and gradients differ:
    a CheckpointPrecisionWarning says so, and how to fix it."""
    plain = _block_step("bf16", False, None)
    with pytest.warns(
        CheckpointPrecisionWarning, match="context_fn=mixprec.checkpoint_context"
    ) as caught:
        bare = _block_step("bf16", True, None)
    assert caught[0].filename == __file__
    assert torch.equal(plain[0], bare[0])  # the forward itself ran in the region
    assert not all(torch.equal(a, b) for a, b in zip(plain[1:], bare[1:], strict=True))


def test_reentrant_checkpointing_in_a_region_warns() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    x = torch.randn(3, 8, requires_grad=True)
    with (
        pytest.warns(CheckpointPrecisionWarning, match="use_reentrant=True") as caught,
        mixprec.autocast("bf16", emulate=True),
    ):
        checkpoint(net, x, use_reentrant=True).sum().backward()
    assert caught[0].filename == __file__  # the user's line, not torch's or mixprec's


@pytest.mark.parametrize("emulate", [True, False])
def test_no_warning_with_the_context_or_outside_checkpoints(emulate: bool) -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    x = torch.randn(3, 8, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointPrecisionWarning)
        with mixprec.autocast("bf16", emulate=emulate):
            y = checkpoint(net, x, use_reentrant=False, context_fn=mixprec.checkpoint_context)
            with torch.no_grad():  # a no_grad block of the user's own
                net(x)
        y.sum().backward()
        checkpoint(net, x, use_reentrant=False).sum().backward()  # no region: nothing to say


@pytest.mark.parametrize("fmt", ["bf16", "e4m3"])
def test_hf_gradient_checkpointing_is_bit_exact_with_the_context(fmt: str) -> None:
    entry = corpus.get("gpt2")
    model, args, kwargs = entry.example(0)
    model.train()
    for m in model.modules():  # dropout draws differ between forward and recomputation
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    checkpointed, bare = copy.deepcopy(model), copy.deepcopy(model)
    checkpointed.activation_checkpointing_enable(
        activation_checkpointing_kwargs={
            "use_reentrant": False,
            "context_fn": mixprec.checkpoint_context,
        }
    )
    bare.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    results = []
    for m in (model, checkpointed, bare):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with mixprec.autocast(fmt, emulate=True):
                loss = entry.loss(m, args, kwargs)
            loss.backward()
        warned = any(w.category is CheckpointPrecisionWarning for w in caught)
        assert warned == (m is bare)  # the bare checkpoints are named, the others not
        results.append([loss.detach(), *_grads(m)])
    assert len(results[0]) == len(results[1]) > 10
    assert all(torch.equal(a, b) for a, b in zip(results[0], results[1], strict=True))
    # the layers really were recomputed: without the context, in fp32
    assert not all(torch.equal(a, b) for a, b in zip(results[0], results[2], strict=True))


def test_nested_regions_are_re_entered_outermost_first() -> None:
    seen: list[object] = []

    def fn(x: torch.Tensor) -> torch.Tensor:
        seen.append(mixprec.current_policy())
        return torch.sin(x)  # saves x: recomputed in backward

    outer, inner = mixprec.autocast("bf16", emulate=True), mixprec.autocast("fp16", emulate=True)
    x = torch.randn(3, requires_grad=True)
    with outer, inner:
        y = checkpoint(fn, x, use_reentrant=False, context_fn=mixprec.checkpoint_context)
    y.sum().backward()
    assert [p.compute for p in seen] == [inner.policy.compute] * 2  # forward, recomputation
    assert _LOCAL.regions == []


class _Checkpointed(torch.nn.Module):
    def __init__(self, context_fn: object) -> None:
        super().__init__()
        self.a = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU())
        self.b = torch.nn.Linear(64, 16)
        self.context_fn = context_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.context_fn is None:  # not checkpointed
            return self.b(self.a(x))
        h = checkpoint(self.a, x, use_reentrant=False, context_fn=self.context_fn)
        return self.b(h)


def test_initialize_o2_step_is_bit_exact_with_the_context() -> None:
    """The regions initialize enters (O2, emulated bf16) are re-entered as well: the weights
    after one step equal the unchecked step's; torch's default context_fn does not."""
    torch.manual_seed(0)
    template = _Checkpointed(None)
    x = torch.randn(4, 5, 32)
    weights = []
    for context_fn in (None, mixprec.checkpoint_context, noop_context_fn):
        model = copy.deepcopy(template)
        model.context_fn = context_fn
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model, opt = mixprec.initialize(
            model, opt, opt_level="O2", compute="bfloat16", emulate=True
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss = model(x).square().mean()
        warned = any(w.category is CheckpointPrecisionWarning for w in caught)
        assert warned == (context_fn is noop_context_fn)
        with mixprec.scale_loss(loss, opt) as scaled:
            scaled.backward()
        opt.step()
        weights.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(weights[0], weights[1], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(weights[0], weights[2], strict=True))


def _swin_step(fmt: str, ckpt: bool) -> list[torch.Tensor]:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.SwinConfig(
        image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4],
        window_size=4, num_labels=10, drop_path_rate=0.0, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.SwinForImageClassification(cfg).train()
    if ckpt:
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={
                "use_reentrant": False, "context_fn": mixprec.checkpoint_context,
            }
        )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    pixels, labels = torch.randn(2, 3, 32, 32, generator=g), torch.tensor([1, 2])
    with mixprec.autocast(fmt, emulate=True):
        loss = model(pixel_values=pixels, labels=labels).loss
    loss.backward()
    return [loss.detach(), *_grads(model)]


@pytest.mark.parametrize("fmt", ["bf16", "fp16"])
def test_nested_checkpoints_keep_formats_through_saved_tensor_hooks(fmt: str) -> None:
    """HF Swin checkpoints its stages and, inside them, their layers: the layers' inputs reach
    the recomputation through the stage checkpoint's saved-tensor hooks, as new tensor objects
    over the same storages. Without the tags kept on the storages, each recomputed layer took
    its input for float32 (its residual add then skipped the rounding) and the gradients
    differed from the plain step's (by up to 5e-4)."""
    plain = _swin_step(fmt, False)
    nested = _swin_step(fmt, True)
    assert len(plain) == len(nested) > 10
    assert all(torch.equal(a, b) for a, b in zip(plain, nested, strict=True))
    assert _LOCAL.regions == []


def test_a_float32_cast_inside_a_checkpointed_segment_reads_as_float32() -> None:
    """``x.float()`` of a float32 tensor tagged bf16 returns ``x`` itself; the region hands back
    a view of it that is float32 logically. Inside a checkpointed segment tags also live on the
    storage, keyed by the view's geometry, which that view shares with ``x``: it must still read
    as float32 (it read as bf16, so the recomputed ``x.float().pow(2)`` of an RMSNorm rounded
    where the forward had not), while ``x`` keeps its tag."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 8)
    with mixprec.autocast("bf16", emulate=True), emulated.mirrored_tags():
        x = lin(torch.randn(4, 8))  # tagged, on the tensor and on its storage
        assert emulated.get_tag(x) == "bfloat16"
        y = x.float()
        assert y is not x and emulated.get_tag(y) is None
        assert emulated.get_tag(x) == "bfloat16"
        assert emulated.get_tag(y.pow(2)) is None  # float32 arithmetic: no rounding


def test_an_empty_float32_tensor_does_not_decide_a_result_format() -> None:
    """HF's caches start empty (``torch.tensor([], dtype=key.dtype)``: float32 under
    emulation) and grow by ``cat``: natively in bf16 the cache is bf16, and under emulation the
    concatenation keeps its values' format instead of falling back to float32 (an empty tensor
    holds no value). A non-empty untagged tensor still mixes."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 8)
    with mixprec.autocast("bf16", emulate=True):
        x = lin(torch.randn(2, 4, 8))
        grown = torch.cat([torch.tensor([]).reshape(2, 0, 8), x], dim=1)
        mixed = torch.cat([torch.randn(2, 1, 8), x], dim=1)
    assert emulated.get_tag(grown) == "bfloat16"
    assert emulated.get_tag(mixed) is None


def _hf_causal_lm(name: str) -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if name == "mamba":
        cfg = transformers.MambaConfig(
            hidden_size=32, num_hidden_layers=2, vocab_size=64, state_size=4, expand=2
        )
        return transformers.MambaForCausalLM(cfg).train()
    cfg = transformers.Gemma2Config(
        hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        num_hidden_layers=2, intermediate_size=64, vocab_size=64, max_position_embeddings=32,
        attention_dropout=0.0,
    )  # fmt: skip
    return transformers.Gemma2ForCausalLM(cfg).train()


@pytest.mark.parametrize("name", ["mamba", "gemma2"])
def test_hf_checkpointing_is_exact_where_models_cast_to_float32(name: str) -> None:
    """HF Mamba and Gemma2 (small configs, random init) with and without HF's gradient
    checkpointing under emulated bf16: the same loss and gradients. Their norms compute in
    ``hidden.float()`` (the float32 cast above: the gradients differed by up to 6e-4), and
    Gemma2 without checkpointing grows a cache from an empty tensor (the second rule: its
    keys and values were float32 there and bf16 when checkpointed, HF's cache being off)."""
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    steps = []
    for ckpt in (False, True):
        model = _hf_causal_lm(name)
        if ckpt:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={
                    "use_reentrant": False, "context_fn": mixprec.checkpoint_context,
                }
            )  # fmt: skip
        with mixprec.autocast("bf16", emulate=True):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        steps.append([loss.detach(), *_grads(model)])
    assert len(steps[0]) == len(steps[1]) > 10
    assert all(torch.equal(a, b) for a, b in zip(*steps, strict=True))
