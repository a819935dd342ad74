"""Decoder blocks for every norm form of SPEC §2.

* ``rmsnorm`` / ``layernorm`` / ``dyt``: pre-norm, ``h = x + Attn(N₁(x))``, ``out = h + FFN(N₂(h))``
  (DyT with the LLM recipe α0 = 0.8 before attention, 0.2 before the FFN).
* ``lns`` (LayerNorm-Scaling): RMSNorm pre-norm whose output is scaled by ``1/√ℓ``, ℓ the 1-based
  layer index.
* ``peri_ln``: RMSNorm before *and* after each sublayer, ``h = x + N₁'(Attn(N₁(x)))``.
* ``bhyt``: the BHyT block — one mean-square reduction per block, the FFN site fed the
  approximation ``v' = v + c_ℓ·λ₁²/κ²`` (:class:`BHyTBlock`).
* ``bhyt_star``: BHyT at both sites with exact statistics.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from steadylm import functional
from steadylm.models.attention import Attention, KVCache
from steadylm.models.config import ModelConfig
from steadylm.models.moe import MoE
from steadylm.nn import BHyT, DyT, GatedFFN, LayerNorm, RMSNorm

__all__ = ["BHyTBlock", "DecoderBlock", "build_block"]


def _build_ffn(config: ModelConfig, layer: int) -> nn.Module:
    kwargs = config.layer_activation(layer)
    if config.layer_is_moe(layer):
        return MoE(
            config.dim,
            config.expert_hidden,
            config.n_experts,
            config.moe_top_k,
            config.n_shared_experts,
            config.activation,
            config.impl,
            bias_update_rate=config.router_bias_update_rate,
            routed_scale=config.moe_routed_scale,
            **kwargs,
        )
    return GatedFFN(config.dim, config.ffn_dim, config.activation, config.impl, **kwargs)


class DecoderBlock(nn.Module):
    """Attention + FFN sublayers with the pre-norm family (rmsnorm, layernorm, dyt, lns, peri_ln).

    Attributes used by the trainer and probes: ``attn``, ``ffn``, ``attn_norm``, ``ffn_norm``
    (and ``attn_post_norm`` / ``ffn_post_norm`` for Peri-LN), ``layer_index`` (0-based),
    ``record_stats`` / ``last_stats`` (filled by BHyT blocks only).
    """

    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.norm_type = config.norm
        self.attn = Attention(config)
        self.ffn = _build_ffn(config, layer_index)
        d, eps, impl = config.dim, config.norm_eps, config.impl
        self.attn_post_norm: nn.Module | None = None
        self.ffn_post_norm: nn.Module | None = None
        # LayerNorm-Scaling multiplies the pre-norm output by 1/sqrt(layer number).
        self.norm_output_scale = 1.0 / math.sqrt(layer_index + 1) if config.norm == "lns" else 1.0
        if config.norm in ("rmsnorm", "lns", "peri_ln"):
            self.attn_norm: nn.Module = RMSNorm(d, eps=eps, impl=impl)
            self.ffn_norm: nn.Module = RMSNorm(d, eps=eps, impl=impl)
            if config.norm == "peri_ln":
                self.attn_post_norm = RMSNorm(d, eps=eps, impl=impl)
                self.ffn_post_norm = RMSNorm(d, eps=eps, impl=impl)
        elif config.norm == "layernorm":
            self.attn_norm = LayerNorm(d, eps=eps, impl=impl)
            self.ffn_norm = LayerNorm(d, eps=eps, impl=impl)
        elif config.norm == "dyt":
            self.attn_norm = DyT(d, alpha_init=config.dyt_alpha_attn, impl=impl)
            self.ffn_norm = DyT(d, alpha_init=config.dyt_alpha_other, impl=impl)
        elif config.norm in ("bhyt", "bhyt_star"):
            self.attn_norm = BHyT(d, lam_init=config.bhyt_lambda_attn, kappa=config.bhyt_kappa, eps=eps, impl=impl)
            self.ffn_norm = BHyT(d, lam_init=config.bhyt_lambda_ffn, kappa=config.bhyt_kappa, eps=eps, impl=impl)
        else:  # pragma: no cover - ModelConfig.validate rejects other names
            raise AssertionError(config.norm)
        self.record_stats = False
        self.last_stats: dict[str, Tensor] | None = None

    def _sublayer_input(self, norm: nn.Module, x: Tensor) -> Tensor:
        y = norm(x)
        return y * self.norm_output_scale if self.norm_output_scale != 1.0 else y

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kv_cache: KVCache | None = None) -> Tensor:
        a = self.attn(self._sublayer_input(self.attn_norm, x), cos, sin, kv_cache, self.layer_index)
        if self.attn_post_norm is not None:
            a = self.attn_post_norm(a)
        h = x + a
        f = self.ffn(self._sublayer_input(self.ffn_norm, h))
        if self.ffn_post_norm is not None:
            f = self.ffn_post_norm(f)
        return h + f


class BHyTBlock(DecoderBlock):
    """The BHyT block of SPEC §2 (``exact=False``), or BHyT* at both sites (``exact=True``).

    Block form, for input x:
        v  = mean(x²) (fp32, with gradient, once per block)
        h  = x + Attn(γ₁ ⊙ tanh(λ₁ x / (κ √(v + ε))))
        v' = v + c_ℓ · stopgrad(λ₁)² / κ²            (no reduction over h)
        out = h + FFN(γ₂ ⊙ tanh(λ₂ h / (κ √(v' + ε))))

    ``bhyt_correction`` is c_ℓ = ‖W_V W_O‖_F² / (T·d), a saved buffer without gradient, refreshed
    from the weights by :meth:`refresh_bhyt_correction` (at build, after every ``load_state_dict``
    through a post-load hook, and every K optimizer steps by the model).
    """

    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__(config, layer_index)
        self.exact = config.norm == "bhyt_star"
        self.kappa = float(config.bhyt_kappa)
        self.context_length = config.max_seq_len
        self.register_buffer("bhyt_correction", torch.zeros(()))
        # Set by begin_inference(): the per-layer shift c_ℓ·λ₁²/κ², computed once per generate call.
        self._inference_shift: Tensor | None = None
        # SPEC §2.4: c_ℓ is recomputed at load time. A trainer that wants a bit-exact resume of a
        # run checkpointed between two refreshes may turn this off and keep the saved c_ℓ.
        self.refresh_on_load = True
        self.register_load_state_dict_post_hook(_refresh_after_load)

    @torch.no_grad()
    def refresh_bhyt_correction(self) -> None:
        """Recompute c_ℓ from the current value and output projections (GQA-aware)."""
        c = functional.bhyt_variance_correction(
            self.attn.wv.weight, self.attn.wo.weight, self.attn.n_heads, self.attn.n_kv_heads,
            self.context_length,
        )
        self.bhyt_correction.copy_(c)

    def variance_shift(self) -> Tensor:
        """``c_ℓ · λ₁² / κ²`` with λ₁ detached: the second site's variance increment (0-dim, fp32)."""
        if self._inference_shift is not None:
            return self._inference_shift
        lam = self.attn_norm.lam.detach().float()
        return self.bhyt_correction.float() * lam * lam / (self.kappa * self.kappa)

    @torch.no_grad()
    def begin_inference(self) -> None:
        """Freeze the per-layer scalar for a generation call (weights do not change during it)."""
        self._inference_shift = None
        self._inference_shift = self.variance_shift().clone()

    def end_inference(self) -> None:
        self._inference_shift = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kv_cache: KVCache | None = None) -> Tensor:
        if self.exact:
            h = x + self.attn(self.attn_norm(x), cos, sin, kv_cache, self.layer_index)
            out = h + self.ffn(self.ffn_norm(h))
            if self.record_stats:
                with torch.no_grad():
                    v_approx = functional.mean_square(x) + self.variance_shift()
                    self._store_stats(v_approx, h)
            return out

        v = functional.mean_square(x)
        h = x + self.attn(self.attn_norm(x, variance=v), cos, sin, kv_cache, self.layer_index)
        v_approx = v + self.variance_shift()
        out = h + self.ffn(self.ffn_norm(h, variance=v_approx))
        if self.record_stats:
            self._store_stats(v_approx, h)
        return out

    @torch.no_grad()
    def _store_stats(self, v_approx: Tensor, h: Tensor) -> None:
        self.last_stats = {
            "v_approx": v_approx.detach().float().squeeze(-1),
            "v_true": functional.mean_square(h.detach()).squeeze(-1),
        }


def _refresh_after_load(module: nn.Module, incompatible_keys: object) -> None:
    # Runs after the block's own tensors and its children's weights have been loaded.
    if module.refresh_on_load:
        module.refresh_bhyt_correction()  # type: ignore[operator]


def build_block(config: ModelConfig, layer_index: int) -> DecoderBlock:
    if config.norm in ("bhyt", "bhyt_star"):
        return BHyTBlock(config, layer_index)
    return DecoderBlock(config, layer_index)
