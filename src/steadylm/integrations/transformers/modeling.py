"""The ``steadylm`` model type for Hugging Face transformers: any steadylm decoder as an HF model.

:class:`SteadyLMForCausalLM` builds steadylm's own :class:`~steadylm.models.Transformer` (so the
math is steadylm's, block for block) and presents its modules under the Hugging Face layout
(:data:`~steadylm.models.hf_format.SEGMENTS`): ``model.embed_tokens``,
``model.layers.i.self_attn.q_proj`` ... ``lm_head``. The steadylm attribute names stay readable as
aliases, so the steadylm forward code runs unchanged.

Generation uses transformers' cache (``cache`` / the older name ``past_key_values``, a
``DynamicCache`` by default, ``use_cache``) and padded batches (``attention_mask`` with zeros, left
padding as ``generate`` and ``pipeline`` make it; RoPE positions from the mask, or
``position_ids``): :class:`_HFKVCache` drives steadylm's forward through the same
``begin_forward`` / ``attend`` / ``end_forward`` interface as its own ``KVCache``, so the math is
the one ``Transformer.generate`` runs.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from steadylm.errors import ConfigError
from steadylm.models.hf_format import SEGMENTS, hf_config_fields
from steadylm.models import ModelConfig, MoE, RotaryEmbedding, Transformer
from steadylm.nn import BHyTPair

__all__ = ["SteadyLMConfig", "SteadyLMForCausalLM", "to_hf_module_tree"]

MODEL_TYPE = "steadylm"


class SteadyLMConfig(PretrainedConfig):
    """Hugging Face config of a steadylm decoder: ``steadylm`` holds the :class:`ModelConfig` dict;
    the usual HF fields (``hidden_size``, ``num_hidden_layers`` ...) are derived from it for tools
    that read them."""

    model_type = MODEL_TYPE

    steadylm: dict | None = None
    vocab_size: int = 4096
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    head_dim: int = 32
    max_position_embeddings: int = 256
    hidden_act: str = "swiglu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    use_cache: bool = True

    def __post_init__(self, **kwargs: Any) -> None:
        mc = self.model_config()
        self.steadylm = mc.to_dict()
        for key, value in hf_config_fields(mc).items():
            setattr(self, key, value)
        self.hidden_act = mc.activation
        self.rope_theta = mc.rope_theta
        super().__post_init__(**kwargs)

    def model_config(self) -> ModelConfig:
        """The steadylm :class:`ModelConfig` this config describes."""
        return ModelConfig.from_dict(dict(self.steadylm)) if self.steadylm else ModelConfig()


def _alias_class(cls: type[nn.Module], aliases: dict[str, str]) -> type[nn.Module]:
    """A subclass of ``cls`` whose old attribute names read the renamed child modules."""
    key = (cls, tuple(sorted(aliases.items())))
    cached = _ALIAS_CLASSES.get(key)
    if cached is None:
        namespace: dict[str, Any] = {
            old: property(lambda self, _new=new: self._modules[_new]) for old, new in aliases.items()
        }
        namespace["__module__"] = cls.__module__
        namespace["__qualname__"] = cls.__qualname__
        cached = _ALIAS_CLASSES[key] = type(cls.__name__, (cls,), namespace)
    return cached


_ALIAS_CLASSES: dict[tuple[type, tuple[tuple[str, str], ...]], type[nn.Module]] = {}


def to_hf_module_tree(module: nn.Module) -> nn.Module:
    """Rename the child modules of a steadylm model in place to the Hugging Face layout.

    Each module with a child named in :data:`SEGMENTS` gets the HF name for it in ``_modules``
    (so ``state_dict``/``named_parameters`` give HF names) and becomes an alias subclass that
    still answers the steadylm name (so its forward runs unchanged).
    """
    for sub in list(module.modules()):
        renames = {name: SEGMENTS[name] for name in sub._modules if name in SEGMENTS}
        if renames:
            sub._modules = OrderedDict((SEGMENTS.get(k, k), v) for k, v in sub._modules.items())
            sub.__class__ = _alias_class(type(sub), renames)
    return module


class SteadyLMPreTrainedModel(PreTrainedModel):
    config_class = SteadyLMConfig
    config: SteadyLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["DecoderBlock", "BHyTBlock"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # steadylm initialises its own weights at construction; HF calls this only for modules it
        # did not load. Non-persistent buffers (RoPE tables, MoE load counters) are rebuilt.
        if isinstance(module, RotaryEmbedding):
            _rebuild_rope(module)
        elif isinstance(module, MoE):
            for name in ("last_load", "load_accum"):
                getattr(module, name).zero_()


def _rebuild_rope(rope: RotaryEmbedding) -> None:
    device = rope.cos.device
    if device.type == "meta":
        return
    cos, sin = RotaryEmbedding._tables(rope.rotary_dim, rope.max_seq_len, rope.theta, device,
                                       getattr(rope, "scaling", None))
    rope.cos, rope.sin = cos, sin


class SteadyLMForCausalLM(SteadyLMPreTrainedModel, GenerationMixin):
    """Any steadylm decoder (dense or MoE, every activation and block form) as an HF causal LM."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: SteadyLMConfig) -> None:
        super().__init__(config)
        inner = Transformer(config.model_config())
        lm_head = inner._modules.pop("lm_head")
        to_hf_module_tree(inner)
        object.__setattr__(inner, "lm_head", lm_head)  # steadylm's name, not registered twice
        self.model = inner
        self.lm_head = lm_head
        self.post_init()

    @property
    def steadylm_config(self) -> ModelConfig:
        return self.model.config

    def get_input_embeddings(self) -> nn.Module:
        return self.model._modules["embed_tokens"]

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    @torch.no_grad()
    def steadylm_after_load(self) -> None:
        """Rebuild what loading does not restore: RoPE tables, MoE load counters, and c_ℓ from the
        loaded W_V/W_O (HF's loader does not run ``load_state_dict`` post-hooks)."""
        for module in self.modules():
            self._init_weights(module)
        self.model.refresh_bhyt_correction()

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> SteadyLMForCausalLM:  # type: ignore[override]
        model = super().from_pretrained(*args, **kwargs)
        model.steadylm_after_load()
        return model

    def generate(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """``GenerationMixin.generate`` with each BHyT block's per-layer shift computed once for the
        call (as ``Transformer.generate`` does; the weights do not change while generating)."""
        blocks = [block for block in self.model.layers if isinstance(block, BHyTPair)]
        for block in blocks:
            block.begin_inference()
        try:
            return super().generate(*args, **kwargs)
        finally:
            for block in blocks:
                block.end_inference()

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: Any = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        past_key_values: Any = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Logits of ``input_ids`` (continuing ``cache`` when given).

        ``attention_mask`` ``[batch, past + seq]`` (1 = token, 0 = padding) masks padded keys;
        ``position_ids`` ``[batch, seq]`` default to the count of real tokens before each one (so a
        left-padded row has the positions of the same row unpadded). ``use_cache`` (default
        ``config.use_cache``) creates a ``DynamicCache`` when none is given and returns it.
        """
        if input_ids is None or inputs_embeds is not None:
            raise ConfigError("SteadyLMForCausalLM needs input_ids (inputs_embeds is not supported)")
        cache = cache if cache is not None else past_key_values  # transformers < 5.2x name
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            from transformers import DynamicCache

            cache = DynamicCache(config=self.config)
        driver = _HFKVCache(cache, input_ids, attention_mask, position_ids)
        hidden = self.model.hidden(input_ids, driver)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_OUTPUT_CACHE: cache if use_cache else None})


# The output field of the cache: ``cache`` in recent transformers, ``past_key_values`` before.
_OUTPUT_CACHE = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class _HFKVCache:
    """One forward of :class:`SteadyLMForCausalLM`: a transformers ``Cache`` (or none) and the
    padding mask, behind the interface steadylm's attention drives (``begin_forward(rope, seq)``
    -> RoPE rows, ``attend(layer, q, k, v)``, ``end_forward(seq)``; see ``models.attention.KVCache``).

    Without padding the attention is what ``KVCache`` runs (causal SDPA for a prompt, unmasked for
    one new token), so HF generation computes what ``Transformer.generate`` does. With padding a
    boolean mask ``[batch, 1, seq, past + seq]`` keeps keys that are causal and not padding; a
    padded query also keeps its own key (a row with no key would be NaN in SDPA; padded positions'
    outputs are never read, as every later query masks them).
    """

    def __init__(self, cache: Any, input_ids: Tensor, attention_mask: Tensor | None,
                 position_ids: Tensor | None) -> None:
        self.cache = cache
        batch, seq = input_ids.shape
        self.past = int(cache.get_seq_length()) if cache is not None else 0
        total = self.past + seq
        device = input_ids.device
        padded = attention_mask is not None and not bool(attention_mask.bool().all())
        if attention_mask is not None and tuple(attention_mask.shape) != (batch, total):
            raise ConfigError(f"attention_mask must be [batch, past + seq] = {[batch, total]}, "
                              f"got {list(attention_mask.shape)}")
        if position_ids is None and padded:
            assert attention_mask is not None
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq:]
        self.position_ids = position_ids
        self.mask: Tensor | None = None
        if padded:
            assert attention_mask is not None
            q_idx = torch.arange(self.past, total, device=device).view(1, 1, seq, 1)
            k_idx = torch.arange(total, device=device).view(1, 1, 1, total)
            keep = attention_mask.bool().view(batch, 1, 1, total)
            self.mask = ((k_idx <= q_idx) & keep) | (k_idx == q_idx)

    def begin_forward(self, rope: Any, seq: int) -> tuple[Tensor, Tensor]:
        end = self.past + seq  # positions are <= the number of tokens so far: one bound, no sync
        if end > rope.max_seq_len:
            raise ConfigError(f"sequence of {end} tokens exceeds max_seq_len ({rope.max_seq_len})")
        if self.position_ids is None:
            return rope(self.past, seq)
        # per-row positions: [batch, 1, seq, rotary] rows of the tables, broadcast over the heads
        ids = self.position_ids.to(rope.cos.device)
        return rope.cos[ids].unsqueeze(1), rope.sin[ids].unsqueeze(1)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if self.cache is not None:
            k, v = self.cache.update(k, v, layer)
        grouped = q.shape[1] != k.shape[1]
        if self.mask is not None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, enable_gqa=grouped)
        seq = q.shape[2]
        if seq == 1:  # one new token sees every earlier position
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=grouped)
        if self.past == 0:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=grouped)
        q_pos = torch.arange(self.past, self.past + seq, device=q.device).unsqueeze(1)
        k_pos = torch.arange(k.shape[2], device=q.device).unsqueeze(0)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=k_pos <= q_pos, enable_gqa=grouped)

    def end_forward(self, seq: int) -> None:
        """The transformers cache counts its own length."""
