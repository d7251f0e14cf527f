"""Models for ``mixprec demo``: a small MLP for 8x8 digits and a character-level transformer.

Both are plain ``torch.nn`` modules built from ``nn.Linear``/``nn.LayerNorm`` and functional ops,
so any precision emulation that intercepts ``F.linear`` and ``torch.matmul`` sees every GEMM.
Attention is written out (``q @ k^T``, softmax, ``@ v``) rather than calling
``F.scaled_dot_product_attention`` so that its two batched matmuls are rounded like the others
and its softmax stays in float32 (the paper's rule for reductions). Every GEMM is a module —
``nn.Linear`` or :class:`MatMul` (:data:`GEMM_MODULES`) — so the gradient probe can watch them
with ordinary module hooks.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class MLPConfig:
    """Fully connected classifier for 64-pixel images."""

    hidden: int = 128
    depth: int = 3  # hidden layers
    n_in: int = 64
    n_out: int = 10


class DigitsMLP(nn.Module):
    """``depth`` hidden ReLU layers; default init (Kaiming-uniform, as ``nn.Linear``)."""

    def __init__(self, cfg: MLPConfig) -> None:
        super().__init__()
        dims = [cfg.n_in] + [cfg.hidden] * cfg.depth
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(dims))
        self.out = nn.Linear(dims[-1], cfg.n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.hidden:
            x = F.relu(layer(x))
        return self.out(x)


@dataclass(frozen=True)
class TransformerConfig:
    """Pre-LayerNorm GPT-style decoder over a character vocabulary."""

    vocab_size: int
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    context: int = 64


class MatMul(nn.Module):
    """``torch.matmul(a, b)`` as a module (no parameters): a GEMM that module hooks can see."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(a, b)


#: the module types that run a GEMM in these models
GEMM_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, MatMul)


class _Block(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.n_heads = cfg.n_heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.fc_out = nn.Linear(4 * d, d)
        self.scores = MatMul()  # q @ k^T
        self.mix = MatMul()  # softmax(scores) @ v
        mask = torch.triu(torch.ones(cfg.context, cfg.context, dtype=torch.bool), diagonal=1)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.n_heads
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q = q.view(b, t, h, d // h).transpose(1, 2)
        k = k.view(b, t, h, d // h).transpose(1, 2)
        v = v.view(b, t, h, d // h).transpose(1, 2)
        att = self.scores(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(d // h))
        att = att.masked_fill(self.mask[:t, :t], float("-inf"))
        att = torch.softmax(att.float(), dim=-1)
        y = self.mix(att, v).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(y)
        return x + self.fc_out(F.gelu(self.fc(self.ln2(x))))


class CharTransformer(nn.Module):
    """Token + learned position embeddings, ``n_layers`` blocks, final LayerNorm, linear head."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        if cfg.d_model % cfg.n_heads:
            raise ValueError(
                f"d_model ({cfg.d_model}) must be divisible by n_heads ({cfg.n_heads})"
            )
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.context, cfg.d_model)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size)
        for name, p in self.named_parameters():  # GPT-2 style init: N(0, 0.02), zero biases
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.ndim >= 2:
                nn.init.normal_(p, 0.0, 0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        pos = torch.arange(t, device=idx.device)
        x = self.tok(idx) + self.pos(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))
