"""A corpus of real models, written by others, built from small configs with random weights.

Features are done when they work on models their users train, not only on an MLP: this module
builds Hugging Face transformers' GPT-2, BERT and LLaMA, and its ResNet-18 and ViT image
classifiers, from small configs (random init, nothing downloaded), and a nanoGPT-style GPT
(written here in nanoGPT's shape: fused qkv projection, a causal-mask buffer sliced by the
sequence length, a Python ``assert`` on it, and a manual attention path with
``masked_fill(-inf)`` then softmax). Each entry gives the model, example inputs and a training
loss, so a test or benchmark runs one step the same way on every model.

transformers is a development dependency, imported only when an HF model is built; entries whose
library is missing are left out of :func:`available`. The vision models are transformers' own
ResNet (ResNet-18's topology: basic blocks, depths 2-2-2-2, batch norm, max pooling) and ViT, not
timm's: every timm release imports torchvision, whose PyPI build cannot be imported next to the
CPU torch.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import nn

__all__ = ["CORPUS", "CorpusModel", "NanoGPT", "NanoGPTConfig", "available", "get"]

VOCAB = 256
SEQ = 16
BATCH = 2
# square RGB images of the vision models: ResNet's 32x downsampling leaves 2 x 2 positions per
# image at 64 x 64, so its last batch norms see 8 values per channel (at 32 x 32 only 2: their
# backward then cancels to rounding noise, a precision loss the sanitizer rightly reports)
IMAGE = 64
CLASSES = 10
_IMAGE_EXAMPLE = f"{IMAGE}x{IMAGE} image"


@dataclass(frozen=True)
class CorpusModel:
    """One corpus entry.

    Attributes:
        name: short name (``"gpt2"``, ``"bert"``, ``"llama"``, ``"resnet18"``, ``"vit"``,
            ``"nanogpt"``).
        requires: the module that must be importable to build it (``None``: torch only).
        build: a fresh model (random init from ``torch.manual_seed`` state), in train mode.
        inputs: ``inputs(generator) -> (args, kwargs)``: a small batch for ``model(*args,
            **kwargs)``, drawn from ``generator``.
        loss: ``loss(model, args, kwargs) -> scalar tensor``: the training loss of one step.
        unit: what one example of a batch is (``"16 tokens"``, ``"64x64 image"``), for
            tables: a batch of ``n`` is ``f"{n} x {unit}"``.
    """

    name: str
    requires: str | None
    build: Callable[[], nn.Module]
    inputs: Callable[[torch.Generator], tuple[tuple[Any, ...], dict[str, Any]]]
    loss: Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], torch.Tensor]
    unit: str = f"{SEQ} tokens"

    def batch(self, repeat: int = 1) -> str:
        """The example batch repeated ``repeat`` times, in words: ``"32 x 16 tokens"``."""
        return f"{BATCH * repeat} x {self.unit}"

    def example(
        self, seed: int = 0, repeat: int = 1
    ) -> tuple[nn.Module, tuple[Any, ...], dict[str, Any]]:
        """A model built under ``torch.manual_seed(seed)`` and its example inputs, their batch
        repeated ``repeat`` times (the batch :meth:`batch` names; benchmarks use 16)."""
        if not isinstance(repeat, int) or repeat < 1:
            raise ValueError(f"repeat must be an int >= 1, got {repeat!r}")
        torch.manual_seed(seed)
        model = self.build()
        args, kwargs = self.inputs(torch.Generator().manual_seed(seed))
        if repeat > 1:
            args, kwargs = pytree.tree_map_only(
                torch.Tensor, lambda t: _repeat_batch(t, repeat), (args, kwargs)
            )
        return model, args, kwargs


def _repeat_batch(t: torch.Tensor, k: int) -> torch.Tensor:
    """``t`` repeated ``k`` times along its first (batch) dim; a 0-dim tensor as it is."""
    return t.repeat(k, *([1] * (t.dim() - 1))) if t.dim() else t


# ----------------------------------------------------------------------------------------------
# nanoGPT-style GPT
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NanoGPTConfig:
    block_size: int = 32
    vocab_size: int = VOCAB
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    flash: bool = False  # False: the manual attention path (mask buffer, masked_fill, softmax)


class _CausalSelfAttention(nn.Module):
    def __init__(self, cfg: NanoGPTConfig) -> None:
        super().__init__()
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.n_head, self.n_embd, self.flash = cfg.n_head, cfg.n_embd, cfg.flash
        mask = torch.tril(torch.ones(cfg.block_size, cfg.block_size))
        self.register_buffer("bias", mask.view(1, 1, cfg.block_size, cfg.block_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if self.flash:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
            att = F.softmax(att, dim=-1)
            y = att @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class _MLP(nn.Module):
    def __init__(self, cfg: NanoGPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class _Block(nn.Module):
    def __init__(self, cfg: NanoGPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = _CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = _MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    """A GPT in nanoGPT's shape: ``forward(idx, targets=None) -> (logits, loss)``."""

    def __init__(self, cfg: NanoGPTConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = cfg or NanoGPTConfig()
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(cfg.vocab_size, cfg.n_embd),
                "wpe": nn.Embedding(cfg.block_size, cfg.n_embd),
                "h": nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layer)),
                "ln_f": nn.LayerNorm(cfg.n_embd),
            }
        )
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as nanoGPT does

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        _, t = idx.size()
        assert t <= self.config.block_size, f"sequence of {t} > block size"  # nanoGPT's check
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss


# ----------------------------------------------------------------------------------------------
# Hugging Face models
# ----------------------------------------------------------------------------------------------


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64,
        bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1,  # GPT-2's 50256, within the small vocab
    )  # fmt: skip
    model = GPT2LMHeadModel(cfg).train()
    # transformers infers the loss from the class name, which GPT2LMHeadModel's does not match:
    # name the causal-LM loss it falls back to, without its warning
    model.loss_type = "ForCausalLM"
    return model


def _bert() -> nn.Module:
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig(
        num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
        vocab_size=VOCAB, max_position_embeddings=64,
    )  # fmt: skip
    return BertForMaskedLM(cfg).train()


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).train()


def _resnet18() -> nn.Module:
    from transformers import ResNetConfig, ResNetForImageClassification

    # ResNet-18's topology (basic blocks, 2-2-2-2) at a quarter of its widths
    cfg = ResNetConfig(
        embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[2, 2, 2, 2],
        layer_type="basic", num_labels=CLASSES,
    )  # fmt: skip
    return ResNetForImageClassification(cfg).train()


def _vit() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(
        image_size=IMAGE, patch_size=16, num_hidden_layers=3, hidden_size=64,
        num_attention_heads=4, intermediate_size=128, num_labels=CLASSES,
    )  # fmt: skip
    return ViTForImageClassification(cfg).train()


def _images(g: torch.Generator) -> tuple[tuple[Any, ...], dict[str, Any]]:
    pixels = torch.randn(BATCH, 3, IMAGE, IMAGE, generator=g)
    return (), {"pixel_values": pixels, "labels": torch.randint(0, CLASSES, (BATCH,), generator=g)}


def _tokens(g: torch.Generator) -> tuple[tuple[Any, ...], dict[str, Any]]:
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    return (), {"input_ids": ids, "labels": ids}


def _hf_loss(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    return model(*args, **kwargs).loss


def _nano_inputs(g: torch.Generator) -> tuple[tuple[Any, ...], dict[str, Any]]:
    idx = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    return (idx[:, :-1].contiguous(), idx[:, 1:].contiguous()), {}


def _nano_loss(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    return model(*args, **kwargs)[1]


CORPUS: dict[str, CorpusModel] = {
    m.name: m
    for m in (
        CorpusModel("gpt2", "transformers", _gpt2, _tokens, _hf_loss),
        CorpusModel("bert", "transformers", _bert, _tokens, _hf_loss),
        CorpusModel("llama", "transformers", _llama, _tokens, _hf_loss),
        CorpusModel("resnet18", "transformers", _resnet18, _images, _hf_loss, _IMAGE_EXAMPLE),
        CorpusModel("vit", "transformers", _vit, _images, _hf_loss, _IMAGE_EXAMPLE),
        CorpusModel("nanogpt", None, lambda: NanoGPT().train(), _nano_inputs, _nano_loss),
    )
}


def available() -> list[str]:
    """Names of the corpus models whose library is installed."""
    return [
        name
        for name, m in CORPUS.items()
        if m.requires is None or importlib.util.find_spec(m.requires) is not None
    ]


def get(name: str) -> CorpusModel:
    """The corpus entry ``name`` (``ValueError`` naming the valid ones otherwise)."""
    if name not in CORPUS:
        raise ValueError(f"unknown corpus model {name!r}; valid: {', '.join(CORPUS)}")
    return CORPUS[name]
