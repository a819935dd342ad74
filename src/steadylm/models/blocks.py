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

from torch import Tensor, nn

from steadylm.models.attention import Attention, KVCache
from steadylm.models.config import ModelConfig
from steadylm.models.forms import norm_kwargs
from steadylm.models.moe import MoE
from steadylm.nn import BHyTPair, GatedFFN, build_norm

__all__ = ["BLOCK_CLASSES", "BHyTBlock", "DecoderBlock", "build_block"]


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

    The norms come from the config's :class:`~steadylm.models.forms.BlockForm`: its per-token
    norm at both sites (built through :func:`steadylm.nn.build_norm` with the form's per-site
    arguments), RMSNorm post-norms for Peri-LN, and the ``1/√ℓ`` output scale for LNS.

    Attributes used by the trainer and probes: ``attn``, ``ffn``, ``attn_norm``, ``ffn_norm``
    (and ``attn_post_norm`` / ``ffn_post_norm`` for Peri-LN), ``layer_index`` (0-based),
    ``record_stats`` / ``last_stats`` (filled by BHyT blocks only).
    """

    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.norm_type = config.norm
        form = config.block_form
        self.attn = Attention(config)
        self.ffn = _build_ffn(config, layer_index)
        d, impl = config.dim, config.impl
        self.attn_post_norm: nn.Module | None = None
        self.ffn_post_norm: nn.Module | None = None
        # LayerNorm-Scaling multiplies the pre-norm output by 1/sqrt(layer number).
        self.norm_output_scale = 1.0 / math.sqrt(layer_index + 1) if form.layer_scale else 1.0
        if form.block == "prenorm":
            attn_kwargs, ffn_kwargs = form.site_kwargs(config)
            self.attn_norm: nn.Module = build_norm(form.norm, d, impl=impl, **attn_kwargs)
            self.ffn_norm: nn.Module = build_norm(form.norm, d, impl=impl, **ffn_kwargs)
        if form.post_norms:
            post_kwargs = norm_kwargs("rmsnorm", config, "ffn")
            self.attn_post_norm = build_norm("rmsnorm", d, impl=impl, **post_kwargs)
            self.ffn_post_norm = build_norm("rmsnorm", d, impl=impl, **post_kwargs)
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


class BHyTBlock(BHyTPair, DecoderBlock):
    """The BHyT block of SPEC §2 (``exact=False``), or BHyT* at both sites (``exact=True``).

    Block form, for input x:
        v  = mean(x²) (fp32, with gradient, once per block)
        h  = x + Attn(γ₁ ⊙ tanh(λ₁ x / (κ √(v + ε))))
        v' = v + c_ℓ · stopgrad(λ₁)² / κ²            (no reduction over h)
        out = h + FFN(γ₂ ⊙ tanh(λ₂ h / (κ √(v' + ε))))

    The two norms, ``bhyt_correction`` (c_ℓ = ‖W_V W_O‖_F² / (T·d), a saved buffer without
    gradient) and its refresh (at build, after every ``load_state_dict`` through a post-load hook,
    every K optimizer steps by the model) come from :class:`steadylm.nn.BHyTPair`, which the
    Hugging Face decoder-layer patch shares.
    """

    BHYT_SITES = ("attn_norm", "ffn_norm")

    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__(config, layer_index)
        self.init_bhyt_pair(
            config.dim,
            lam_attn=config.bhyt_lambda_attn,
            lam_ffn=config.bhyt_lambda_ffn,
            kappa=config.bhyt_kappa,
            eps=config.norm_eps,
            impl=config.impl,
            context_length=config.max_seq_len,
            exact=config.block_form.exact,
        )

    @property
    def exact(self) -> bool:
        return self.bhyt_exact

    def bhyt_projections(self) -> tuple[Tensor, Tensor, int, int]:
        return self.attn.wv.weight, self.attn.wo.weight, self.attn.n_heads, self.attn.n_kv_heads

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kv_cache: KVCache | None = None) -> Tensor:
        attn_in, v = self.bhyt_attn_input(x)
        h = x + self.attn(attn_in, cos, sin, kv_cache, self.layer_index)
        return h + self.ffn(self.bhyt_ffn_input(h, v))


#: ``BlockForm.block`` -> block class.
BLOCK_CLASSES: dict[str, type[DecoderBlock]] = {"prenorm": DecoderBlock, "bhyt": BHyTBlock}


def build_block(config: ModelConfig, layer_index: int) -> DecoderBlock:
    """The block of layer ``layer_index`` for ``config.norm``'s block form."""
    return BLOCK_CLASSES[config.block_form.block](config, layer_index)
