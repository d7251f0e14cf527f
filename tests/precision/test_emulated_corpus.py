"""Emulated precision on the real-model corpus (HF GPT-2, BERT, LLaMA, ResNet-18, ViT; nanoGPT):
one training step per model and format, under ``mixprec.autocast`` and under ``initialize``.

Oracle: the same step in float32 with the same dropout masks (the RNG reseeded). A step in a
low-precision format must differ from it (the roundings happened) but stay near it (random-init
losses: ~ln(classes)), with finite gradients everywhere, and leave no mode behind.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch.overrides import _get_current_function_mode_stack

import mixprec
from mixprec import amp
from mixprec.testing import corpus

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.usefixtures("one_thread")

# |emulated - fp32| / fp32 of a random-init loss: 16-bit formats move it by 1e-4..1e-2, fp8 by up
# to ~8% (the corpus ResNet's batch norms amplify e4m3's 2^-4 relative steps)
TOLERANCE = {"bf16": 2e-2, "fp16": 2e-2, "e4m3": 0.15, "mxfp8_e4m3": 0.15}


def _loss(entry: corpus.CorpusModel, model: torch.nn.Module, args, kwargs) -> torch.Tensor:
    torch.manual_seed(1)  # the same dropout masks in every run
    return entry.loss(model, args, kwargs)


def _finite_grads(model: torch.nn.Module) -> bool:
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    return bool(grads) and all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("fmt", list(TOLERANCE))
@pytest.mark.parametrize("name", corpus.available())
def test_emulated_step_on_corpus_model(name: str, fmt: str) -> None:
    entry = corpus.get(name)
    model, args, kwargs = entry.example(0)
    ref = float(_loss(entry, model, args, kwargs).detach())
    with mixprec.autocast(fmt, emulate=True):
        loss = _loss(entry, model, args, kwargs)
    loss.backward()
    got = float(loss.detach())
    assert math.isfinite(got) and got != ref
    assert abs(got - ref) <= TOLERANCE[fmt] * ref, (got, ref)
    assert _finite_grads(model)
    assert _get_current_function_mode_stack() == []


@pytest.mark.parametrize("name", corpus.available())
def test_o2_step_on_corpus_model(name: str) -> None:
    """initialize(O2, emulated bf16): after a step the lowered parameters hold bf16 values and
    the optimizer's float32 masters more bits; the loss is near the float32 one."""
    entry = corpus.get(name)
    model, args, kwargs = entry.example(0)
    ref = float(_loss(entry, model, args, kwargs).detach())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, opt = mixprec.initialize(model, opt, opt_level="O2", compute="bfloat16", emulate=True)
    loss = _loss(entry, model, args, kwargs)
    with mixprec.scale_loss(loss, opt) as scaled:
        scaled.backward()
    opt.step()
    assert abs(float(loss.detach()) - ref) <= TOLERANCE["bf16"] * ref
    assert not amp.last_step_skipped(opt)
    masters = list(amp.master_params(opt))
    assert all(m.dtype == torch.float32 for m in masters)
    own = {id(m) for m in masters}  # norm layers' parameters are updated in place (float32)
    lowered = [p for p in model.parameters() if id(p) not in own]
    copies = [m for m in masters if all(m is not p for p in model.parameters())]
    assert lowered and len(lowered) == len(copies)
    assert all(torch.equal(mixprec.quantize(p.detach(), "bf16"), p.detach()) for p in lowered)
    # the masters keep the bits the model's bf16 weights cannot
    assert any(not torch.equal(mixprec.quantize(m.detach(), "bf16"), m.detach()) for m in copies)
    assert _get_current_function_mode_stack() == []
