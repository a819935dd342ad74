"""The ``steadylm`` model type for Hugging Face transformers: any steadylm decoder as an HF model.

:class:`SteadyLMForCausalLM` builds steadylm's own :class:`~steadylm.models.Transformer` (so the
math is steadylm's, block for block) and presents its modules under the Hugging Face layout
(:data:`~steadylm.models.hf_format.SEGMENTS`): ``model.embed_tokens``,
``model.layers.i.self_attn.q_proj`` ... ``lm_head``. The steadylm attribute names stay readable as
aliases, so the steadylm forward code runs unchanged.

Generation recomputes the whole prefix every step (no KV cache through HF; steadylm's own
``Transformer.generate`` has one). Padded batches (an attention mask with zeros) are refused.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor, nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from steadylm.errors import ConfigError
from steadylm.models.hf_format import SEGMENTS
from steadylm.models import ModelConfig, MoE, RotaryEmbedding, Transformer

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
    use_cache: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        mc = self.model_config()
        self.steadylm = mc.to_dict()
        self.vocab_size = mc.vocab_size
        self.hidden_size = mc.dim
        self.intermediate_size = mc.ffn_dim
        self.num_hidden_layers = mc.n_layers
        self.num_attention_heads = mc.n_heads
        self.num_key_value_heads = int(mc.n_kv_heads or mc.n_heads)
        self.head_dim = mc.head_dim
        self.max_position_embeddings = mc.max_seq_len
        self.hidden_act = mc.activation
        self.rms_norm_eps = mc.norm_eps
        self.rope_theta = mc.rope_theta
        self.tie_word_embeddings = mc.tie_embeddings
        self.initializer_range = mc.init_std
        self.use_cache = False  # no KV cache through HF (see the module docstring)
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

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        if input_ids is None:
            raise ConfigError("SteadyLMForCausalLM needs input_ids (inputs_embeds is not supported)")
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ConfigError("SteadyLMForCausalLM does not support padded batches (attention_mask with zeros)")
        hidden = self.model.hidden(input_ids)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                                      **kwargs: Any) -> dict[str, Any]:
        # No KV cache: the whole prefix is recomputed each step.
        return {"input_ids": input_ids, "attention_mask": attention_mask}
