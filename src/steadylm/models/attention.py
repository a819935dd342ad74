"""Causal self-attention: grouped-query heads, (partial) RoPE, optional QK-norm, and a KV cache.

Layout follows Llama / Hugging Face: ``wq, wk, wv, wo`` are bias-free ``nn.Linear`` layers, query
head ``h`` reads key/value head ``h // (n_heads / n_kv_heads)`` (``repeat_interleave`` order, the
same one :func:`steadylm.functional.bhyt_variance_correction` assumes), and RoPE rotates the
first ``rotary_dim`` dims of each head in the "rotate half" convention, leaving the rest as is
(Ling: half of each head).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from steadylm.errors import ConfigError
from steadylm.models.config import ModelConfig
from steadylm.nn import RMSNorm

__all__ = ["Attention", "KVCache", "RotaryEmbedding", "apply_rotary", "rope_inv_freq"]


def rope_inv_freq(
    rotary_dim: int, theta: float, scaling: dict[str, Any] | None = None, device: torch.device | None = None
) -> Tensor:
    """RoPE inverse frequencies (float64), optionally rescaled as Hugging Face does for imported
    checkpoints: ``{"type": "linear", "factor": f}`` divides every frequency by f;
    ``{"type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    "original_max_position_embeddings"}`` is Llama 3.1's wavelength-dependent scaling."""
    inv_freq = 1.0 / theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64, device=device) / rotary_dim)
    if not scaling:
        return inv_freq
    factor = float(scaling["factor"])
    if scaling["type"] == "linear":
        return inv_freq / factor
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_context = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions ``0..max_seq_len-1`` (fp32, not saved in state dicts)."""

    def __init__(
        self, rotary_dim: int, max_seq_len: int, theta: float = 10000.0, scaling: dict[str, Any] | None = None
    ) -> None:
        super().__init__()
        self.rotary_dim = rotary_dim
        self.max_seq_len = max_seq_len
        self.theta = theta
        self.scaling = scaling
        cos, sin = self._tables(rotary_dim, max_seq_len, theta, None, scaling)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @staticmethod
    def _tables(
        rotary_dim: int, length: int, theta: float, device: torch.device | None,
        scaling: dict[str, Any] | None = None,
    ) -> tuple[Tensor, Tensor]:
        if rotary_dim == 0:
            empty = torch.zeros(length, 0, device=device)
            return empty, empty
        inv_freq = rope_inv_freq(rotary_dim, theta, scaling, device)
        positions = torch.arange(length, dtype=torch.float64, device=device)
        angles = torch.outer(positions, inv_freq)
        angles = torch.cat([angles, angles], dim=-1)  # "rotate half" layout
        return angles.cos().float(), angles.sin().float()

    def forward(self, start: int, length: int) -> tuple[Tensor, Tensor]:
        return self.cos[start : start + length], self.sin[start : start + length]


def _rotate_half(x: Tensor) -> Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first ``cos.shape[-1]`` dims of ``x`` ([batch, heads, seq, head_dim]).

    The rotation runs in fp32 and returns ``x``'s dtype; the remaining dims pass through.
    """
    rotary_dim = cos.shape[-1]
    if rotary_dim == 0:
        return x
    rotated, passed = x[..., :rotary_dim], x[..., rotary_dim:]
    r = rotated.float()
    r = (r * cos + _rotate_half(r) * sin).to(x.dtype)
    return torch.cat([r, passed], dim=-1) if passed.shape[-1] else r


class KVCache:
    """Per-layer key/value tensors ``[batch, n_kv_heads, max_len, head_dim]`` for eager generation.

    A cache is driven by the model's forward through three methods (the same interface as
    :class:`steadylm.models.generate.StaticKVCache`): ``begin_forward(rope, seq)`` returns the RoPE
    rows of the new positions, ``attend(layer, q, k, v)`` stores keys/values and returns the
    attention output, ``end_forward(seq)`` advances.

    Storage is allocated on the first write of each layer, on the device and in the dtype of the
    keys it receives (so the cache follows the model to any device and autocast dtype). Keys are
    stored after RoPE. ``pos`` is the number of positions already written; the model's forward
    advances it after all layers have run.
    """

    def __init__(self, n_layers: int, batch_size: int, max_len: int, n_kv_heads: int, head_dim: int) -> None:
        self.shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.keys: list[Tensor | None] = [None] * n_layers
        self.values: list[Tensor | None] = [None] * n_layers
        self.max_len = max_len
        self.pos = 0

    def reset(self) -> None:
        """Start over at position 0 (storage is kept and overwritten)."""
        self.pos = 0

    def begin_forward(self, rope: RotaryEmbedding, seq: int) -> tuple[Tensor, Tensor]:
        """Check that ``seq`` more positions fit the RoPE table; return its rows for them."""
        end = self.pos + seq
        if end > rope.max_seq_len:
            raise ConfigError(f"sequence of {end} tokens exceeds max_seq_len ({rope.max_seq_len})")
        return rope(self.pos, seq)

    def end_forward(self, seq: int) -> None:
        """Advance past the ``seq`` positions the forward wrote (after all layers have run)."""
        self.pos += seq

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Append ``k, v`` at ``pos`` and attend ``q`` ([batch, heads, seq, head_dim]) causally."""
        start, seq = self.pos, q.shape[2]
        k, v = self.update(layer, k, v)
        grouped = q.shape[1] != k.shape[1]
        if seq == 1:
            # One new query attends to every cached position: no mask needed.
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=grouped)
        if start == 0:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=grouped)
        # A chunk appended to a non-empty cache: query i (position start+i) sees keys <= it.
        q_pos = torch.arange(start, start + seq, device=q.device).unsqueeze(1)
        k_pos = torch.arange(k.shape[2], device=q.device).unsqueeze(0)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=k_pos <= q_pos, enable_gqa=grouped)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write ``k, v`` ([batch, kv_heads, n, head_dim]) at ``pos``; return keys/values so far."""
        end = self.pos + k.shape[2]
        if end > self.max_len:
            raise ConfigError(f"KV cache holds {self.max_len} positions; writing up to {end}")
        if tuple(k.shape[:2]) + (k.shape[3],) != self.shape[:2] + (self.shape[3],):
            raise ConfigError(f"KV cache is for shape {self.shape}, got keys of shape {tuple(k.shape)}")
        keys, values = self.keys[layer], self.values[layer]
        if keys is None or values is None:
            keys = self.keys[layer] = k.new_zeros(self.shape)
            values = self.values[layer] = v.new_zeros(self.shape)
        keys[:, :, self.pos : end] = k.to(keys.dtype)
        values[:, :, self.pos : end] = v.to(values.dtype)
        return keys[:, :, :end], values[:, :, :end]


class Attention(nn.Module):
    """Causal multi-head attention with grouped-query heads, partial RoPE and optional QK-norm."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        d = config.dim
        qkv_bias = config.qkv_bias  # Qwen2 layout; Llama/Mistral/Qwen3 have none
        self.wq = nn.Linear(d, self.n_heads * self.head_dim, bias=qkv_bias)
        self.wk = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.wv = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.wo = nn.Linear(self.n_heads * self.head_dim, d, bias=False)
        if config.qk_norm:
            # Per-head RMSNorm of queries and keys before RoPE (Ling / OLMo-2 style).
            self.q_norm: nn.Module | None = RMSNorm(self.head_dim, eps=config.norm_eps, impl=config.impl)
            self.k_norm: nn.Module | None = RMSNorm(self.head_dim, eps=config.norm_eps, impl=config.impl)
        else:
            self.q_norm = None
            self.k_norm = None

    def queries_and_keys(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """``q`` ``[batch, n_heads, seq, head_dim]`` and ``k`` ``[batch, n_kv_heads, seq, head_dim]``
        as attention uses them: projected, QK-normed (when configured), rotated."""
        batch, seq, _ = x.shape
        q = self.wq(x).view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None and self.k_norm is not None:
            q = self.q_norm(q)
            k = self.k_norm(k)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    def causal_logits(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """The pre-softmax logits ``q·k / √head_dim`` that :meth:`forward` attends with, in fp32,
        ``[batch, n_heads, seq, seq]``, future positions −inf (for inspection, e.g. ``steadylm
        scan``; the forward itself leaves them inside ``scaled_dot_product_attention``)."""
        seq = x.shape[1]
        q, k = self.queries_and_keys(x, cos, sin)
        q, k = q.float(), k.float().repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        logits = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        causal = torch.ones(seq, seq, dtype=torch.bool, device=x.device).tril()
        return logits.masked_fill(~causal, -math.inf)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        kv_cache: KVCache | None = None,
        layer_index: int = 0,
    ) -> Tensor:
        batch, seq, _ = x.shape
        q, k = self.queries_and_keys(x, cos, sin)
        v = self.wv(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if kv_cache is None:
            grouped = self.n_kv_heads != self.n_heads
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=grouped)
        else:
            # The cache stores k, v and attends (KVCache, or generate.StaticKVCache).
            out = kv_cache.attend(layer_index, q, k, v)
        out = out.transpose(1, 2).reshape(batch, seq, self.n_heads * self.head_dim)
        return self.wo(out)
