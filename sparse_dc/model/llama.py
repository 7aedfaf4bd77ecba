"""Llama decoder: token embedding, pre-norm blocks (RMSNorm, RoPE causal attention via SDPA, SwiGLU), untied head.

The seven projections of each block (q, k, v, o, gate, up, down) are built by a `linear_factory(name, in_features,
out_features, std)` so that `sparse_dc.sparsity` can substitute SparseLinear; this module knows nothing about
sparsity. Projections have no bias (Llama).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sparse_dc.model.config import ModelConfig, ModelShape

LinearFactory = Callable[[str, int, int, float], nn.Module]


def dense_linear(name: str, in_features: int, out_features: int, std: float) -> nn.Module:
    """The default factory: a bias-free nn.Linear with a normal(0, std) init."""
    linear = nn.Linear(in_features, out_features, bias=False)
    nn.init.normal_(linear.weight, std=std)
    return linear


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32 for bf16 stability, cast back (as in Llama's reference code)
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_cache(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables of shape (max_seq_len, head_dim // 2) for rotating (even, odd) pairs."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, nh, T, hd) pairwise by position; cos/sin are (T, hd // 2)."""
    x1, x2 = x.float()[..., 0::2], x.float()[..., 1::2]
    cos, sin = cos.float(), sin.float()  # the tables may have been cast to bf16 with the model
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return out.type_as(x)


class Attention(nn.Module):
    def __init__(self, name: str, shape: ModelShape, factory: LinearFactory, std: float, out_std: float):
        super().__init__()
        d = shape.hidden_size
        self.n_heads = shape.n_heads
        self.q = factory(f"{name}.q", d, d, std)
        self.k = factory(f"{name}.k", d, d, std)
        self.v = factory(f"{name}.v", d, d, std)
        self.o = factory(f"{name}.o", d, d, out_std)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        # (B, T, d) -> (B, nh, T, hd)
        q, k, v = (proj(x).view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2)
                   for proj in (self.q, self.k, self.v))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, d))


class SwiGLU(nn.Module):
    def __init__(self, name: str, shape: ModelShape, factory: LinearFactory, std: float, out_std: float):
        super().__init__()
        d, f = shape.hidden_size, shape.intermediate_size
        self.gate = factory(f"{name}.gate", d, f, std)
        self.up = factory(f"{name}.up", d, f, std)
        self.down = factory(f"{name}.down", f, d, out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, index: int, cfg: ModelConfig, shape: ModelShape, factory: LinearFactory):
        super().__init__()
        std = cfg.init_std
        out_std = std / math.sqrt(2 * shape.n_layers) if cfg.init == "scaled_residual" else std
        self.attn_norm = RMSNorm(shape.hidden_size, cfg.norm_eps)
        self.attn = Attention(f"layers.{index}.attn", shape, factory, std, out_std)
        self.mlp_norm = RMSNorm(shape.hidden_size, cfg.norm_eps)
        self.mlp = SwiGLU(f"layers.{index}.mlp", shape, factory, std, out_std)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    """Decoder-only LM. forward(tokens (B, T) int64) -> logits (B, T, vocab) in the compute dtype."""

    def __init__(self, cfg: ModelConfig, shape: ModelShape, vocab_size: int,
                 linear_factory: LinearFactory = dense_linear):
        super().__init__()
        self.cfg, self.shape, self.vocab_size = cfg, shape, vocab_size
        d = shape.hidden_size
        self.embed = nn.Embedding(vocab_size, d)
        self.layers = nn.ModuleList(Block(i, cfg, shape, linear_factory) for i in range(shape.n_layers))
        self.norm = RMSNorm(d, cfg.norm_eps)
        self.head = nn.Linear(d, vocab_size, bias=False)  # untied from the embedding, as in Llama
        nn.init.normal_(self.embed.weight, std=cfg.init_std)
        nn.init.normal_(self.head.weight, std=cfg.init_std)
        cos, sin = rope_cache(d // shape.n_heads, cfg.max_seq_len, cfg.rope_theta)
        # not persistent: recomputed from the config, so checkpoints do not carry them
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        if t > self.rope_cos.shape[0]:
            raise ValueError(f"sequence length {t} exceeds model.max_seq_len={self.rope_cos.shape[0]}")
        cos, sin = self.rope_cos[:t], self.rope_sin[:t]
        x = self.embed(tokens)
        for block in self.layers:
            x = block(x, cos, sin)
        return self.head(self.norm(x))
