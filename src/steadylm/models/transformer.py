"""The decoder: embeddings → blocks → final norm → LM head, plus the hooks the trainer calls.

``build_model(config)`` returns a :class:`Transformer`. Contract (docs/ARCHITECTURE.md):
``forward(tokens) -> logits [batch, seq, vocab]`` (``forward(tokens, targets=t) -> mean loss``), ``after_optimizer_step(step, total_steps)``,
``param_groups(weight_decay)``, ``num_params()``, ``layers``, ``generate(...)``,
``refresh_bhyt_correction()``; ``load_state_dict`` refreshes c_ℓ (post-load hooks on the blocks).
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from steadylm.errors import ConfigError
from steadylm.models.attention import KVCache, RotaryEmbedding
from steadylm.models.blocks import BHyTBlock, build_block
from steadylm.models.config import ModelConfig
from steadylm.models.forms import norm_kwargs
from steadylm.models.generate import generate
from steadylm.models.moe import MoE, Router
from steadylm.nn import build_norm, resolve_op, scalar_parameter, upgrade_scalar_entries

__all__ = ["Transformer", "build_model", "takes_targets"]


def _build_final_norm(config: ModelConfig) -> nn.Module:
    kind = config.final_norm_type
    return build_norm(kind, config.dim, impl=config.impl, **norm_kwargs(kind, config, "final"))


class Transformer(nn.Module):
    """A dense (Llama-style) or Ling-style MoE decoder built from a :class:`ModelConfig`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        # DyT LLM recipe: a learnable scalar on the embedding output, initialised to sqrt(d).
        # Shape [1] like every learnable scalar (FSDP2 refuses 0-dim parameters); 0-dim values
        # in older checkpoints are reshaped by the load pre-hook below.
        self.embed_scale: nn.Parameter | None = (
            scalar_parameter(math.sqrt(config.dim)) if config.block_form.embed_scale else None
        )
        self.rope = RotaryEmbedding(config.rotary_dim, config.max_seq_len, config.rope_theta, config.rope_scaling)
        self.layers = nn.ModuleList(build_block(config, i) for i in range(config.n_layers))
        self.final_norm = _build_final_norm(config)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self._linear_cross_entropy = resolve_op(config.impl, "linear_cross_entropy")
        self.register_load_state_dict_pre_hook(_upgrade_embed_scale)
        self.reset_parameters()

    # ------------------------------------------------------------------------------------------
    # init and BHyT bookkeeping
    # ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """N(0, init_std) for every projection, the embedding and the routers; norms at their
        defaults (gains 1, biases 0, α/λ at α0/λ0); then c_ℓ from the fresh weights."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding, Router)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        self.refresh_bhyt_correction()

    def refresh_bhyt_correction(self) -> None:
        """Recompute c_ℓ of every BHyT block from its current W_V, W_O (no-op for other norms)."""
        for block in self.layers:
            if isinstance(block, BHyTBlock):
                block.refresh_bhyt_correction()

    def set_bhyt_refresh_on_load(self, enabled: bool) -> None:
        """Whether ``load_state_dict`` recomputes c_ℓ from the loaded weights (default, SPEC §2.4)
        or keeps the saved buffer (bit-exact resume between two scheduled refreshes)."""
        for block in self.layers:
            if isinstance(block, BHyTBlock):
                block.refresh_on_load = bool(enabled)

    def moe_layers(self) -> list[MoE]:
        return [block.ffn for block in self.layers if isinstance(block.ffn, MoE)]

    @torch.no_grad()
    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """Call after every optimizer step (``step`` = steps completed so far, 1-based).

        Updates each MoE router bias from the load counted since the previous call, and every
        K = ``config.refresh_interval(total_steps)`` steps recomputes c_ℓ of the BHyT blocks.
        """
        for moe in self.moe_layers():
            moe.update_router_bias()
        if step % self.config.refresh_interval(total_steps) == 0:
            self.refresh_bhyt_correction()

    # ------------------------------------------------------------------------------------------
    # forward
    # ------------------------------------------------------------------------------------------

    def forward(self, tokens: Tensor, kv_cache: KVCache | None = None, targets: Tensor | None = None) -> Tensor:
        """``tokens`` ``[batch, seq]`` (int) -> logits ``[batch, seq, vocab]``; with ``targets``
        (``[batch, seq]`` int, ``-100`` ignored) the mean cross-entropy against them instead.

        The loss goes through ``linear_cross_entropy`` of the model's ``impl``: the fused one never
        stores the logits (:mod:`steadylm.kernels.linear_ce`). A head that is not a plain
        ``nn.Linear`` (e.g. converted to FP8) keeps its own forward, followed by the cross-entropy.
        With ``kv_cache`` (``KVCache`` or ``generate.StaticKVCache``) the tokens continue the cached
        sequence: the cache supplies their RoPE rows, stores keys/values and advances.
        """
        hidden = self.hidden(tokens, kv_cache)
        if targets is None:
            return self.lm_head(hidden)
        if type(self.lm_head) is nn.Linear and self.lm_head.bias is None:
            return self._linear_cross_entropy(hidden, self.lm_head.weight, targets)
        logits = self.lm_head(hidden)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def hidden(self, tokens: Tensor, kv_cache: KVCache | None = None) -> Tensor:
        """The final-norm output ``[batch, seq, dim]`` for ``tokens`` (the LM head's input).

        With ``kv_cache`` (``KVCache`` or ``generate.StaticKVCache``) the tokens continue the cached
        sequence: the cache supplies their RoPE rows, stores keys/values and advances.
        """
        if tokens.dim() != 2:
            raise ConfigError(f"tokens must be [batch, seq], got shape {tuple(tokens.shape)}")
        seq = tokens.shape[1]
        if kv_cache is None:
            if seq > self.config.max_seq_len:
                raise ConfigError(f"sequence of {seq} tokens exceeds max_seq_len ({self.config.max_seq_len})")
            cos, sin = self.rope(0, seq)
        else:
            cos, sin = kv_cache.begin_forward(self.rope, seq)
        x = self.embed(tokens)
        if self.embed_scale is not None:
            x = x * self.embed_scale
        for block in self.layers:
            x = block(x, cos, sin, kv_cache)
        if kv_cache is not None:
            kv_cache.end_forward(seq)
        return self.final_norm(x)

    # ------------------------------------------------------------------------------------------
    # generation
    # ------------------------------------------------------------------------------------------

    def new_kv_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        c = self.config
        return KVCache(c.n_layers, batch_size, max_len or c.max_seq_len, c.n_kv_heads, c.head_dim)

    #: ``model.generate(tokens, max_new_tokens, temperature=1.0, top_k=None, generator=None,
    #: return_logits=False, decode="compiled")``: :func:`steadylm.models.generate.generate`, bound.
    generate = generate

    # ------------------------------------------------------------------------------------------
    # optimizer groups, counts, statistics
    # ------------------------------------------------------------------------------------------

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW groups: matrices (projections, embeddings, routers) decay; norm gains, α, λ,
        the DyT embedding scale and every bias (all parameters with fewer than 2 dims) do not."""
        decay: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
        for _, param in self.named_parameters():  # tied weights are listed once
            if not param.requires_grad:
                continue
            (decay if param.dim() >= 2 else no_decay).append(param)
        groups = [
            {"params": decay, "weight_decay": float(weight_decay), "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
        ]
        return [g for g in groups if g["params"]]

    def num_params(self) -> dict[str, int]:
        """``total``: unique parameters; ``active``: used per token (routed experts × k/E);
        ``embedding``: the token embedding plus an untied LM head."""
        total = sum(p.numel() for p in self.parameters())
        inactive = 0
        for moe in self.moe_layers():
            routed = sum(p.numel() for p in moe.experts.parameters())
            inactive += routed * (moe.n_experts - moe.top_k) // moe.n_experts
        embedding = self.embed.weight.numel()
        if self.lm_head.weight is not self.embed.weight:
            embedding += self.lm_head.weight.numel()
        return {"total": total, "active": total - inactive, "embedding": embedding}

    @torch.no_grad()
    def moe_load_stats(self) -> dict[str, float]:
        """Per MoE layer, from the last forward: max and min expert load relative to the mean
        (1.0 = balanced) and the spread of the balancing bias."""
        stats: dict[str, float] = {}
        for block in self.layers:
            if isinstance(block.ffn, MoE):
                load = block.ffn.last_load.float()
                mean = load.mean().clamp_min(1e-12)
                bias = block.ffn.router.expert_bias
                prefix = f"moe/layer{block.layer_index}"
                stats[f"{prefix}/load_max_over_mean"] = float(load.max() / mean)
                stats[f"{prefix}/load_min_over_mean"] = float(load.min() / mean)
                stats[f"{prefix}/bias_range"] = float(bias.max() - bias.min())
        return stats

    def set_activation(self, name: str, **kwargs: Any) -> None:
        """Swap the activation of every FFN and expert, keeping the weights (mid-training switch)."""
        new_config = self.config.replace(activation=name, activation_kwargs=kwargs, layer_activation_kwargs=None)
        for block in self.layers:
            block.ffn.set_activation(name, **kwargs)
        self.config = new_config


def _upgrade_embed_scale(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    upgrade_scalar_entries(state_dict, prefix, ("embed_scale",))


def build_model(config: ModelConfig, device: torch.device | str | None = None) -> Transformer:
    """Build and initialise the decoder of ``config`` (optionally directly on ``device``)."""
    if not isinstance(config, ModelConfig):
        raise ConfigError(f"build_model needs a ModelConfig, got {type(config).__name__}")
    config.validate()
    if device is None:
        return Transformer(config)
    with torch.device(device):
        return Transformer(config)


def takes_targets(model: nn.Module) -> bool:
    """Whether ``model(tokens, targets=t)`` returns the model's own mean loss (a steadylm
    :class:`Transformer` does) rather than only ``model(tokens) -> logits``."""
    return _forward_takes_targets(type(model))


@functools.cache
def _forward_takes_targets(model_type: type) -> bool:
    return "targets" in inspect.signature(model_type.forward).parameters
