"""The Hugging Face parameter layout of a steadylm model (SPEC §6), without importing transformers.

steadylm's module names map to Hugging Face Llama names segment by segment::

    embed.weight                      model.embed_tokens.weight
    layers.3.attn.wq.weight           model.layers.3.self_attn.q_proj.weight
    layers.3.attn_norm.lam            model.layers.3.input_layernorm.lam
    layers.3.ffn.w_gate.weight        model.layers.3.mlp.gate_proj.weight
    layers.3.bhyt_correction          model.layers.3.bhyt_correction
    final_norm.weight                 model.norm.weight
    lm_head.weight                    lm_head.weight

Names without a Llama counterpart (λ, α, c_ℓ, Peri-LN post-norms, MoE routers and experts) keep
their steadylm segment under the mapped parent. :data:`SEGMENTS` is the one table both
directions and the Hugging Face module tree of the ``steadylm`` model type use.
"""

from __future__ import annotations

__all__ = ["SEGMENTS", "hf_name", "steadylm_name"]

#: steadylm module name -> Hugging Face module name (a bijection on path segments).
SEGMENTS: dict[str, str] = {
    "embed": "embed_tokens",
    "final_norm": "norm",
    "attn": "self_attn",
    "wq": "q_proj",
    "wk": "k_proj",
    "wv": "v_proj",
    "wo": "o_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn": "mlp",
    "w_gate": "gate_proj",
    "w_up": "up_proj",
    "w_down": "down_proj",
}
_INVERSE: dict[str, str] = {v: k for k, v in SEGMENTS.items()}
assert len(_INVERSE) == len(SEGMENTS), "SEGMENTS must be a bijection"


def hf_name(name: str) -> str:
    """The Hugging Face name of a steadylm state-dict key (``lm_head`` stays top-level)."""
    parts = [SEGMENTS.get(p, p) for p in name.split(".")]
    return ".".join(parts) if parts[0] == "lm_head" else "model." + ".".join(parts)


def steadylm_name(name: str) -> str:
    """The steadylm state-dict key of a Hugging Face name (inverse of :func:`hf_name`)."""
    parts = name.split(".")
    if parts[0] == "model":
        parts = parts[1:]
    return ".".join(_INVERSE.get(p, p) for p in parts)
