"""The Hugging Face checkpoint format of steadylm models, read without importing transformers.

Names (SPEC §6): steadylm's module names map to Hugging Face Llama names segment by segment::

    embed.weight                      model.embed_tokens.weight
    layers.3.attn.wq.weight           model.layers.3.self_attn.q_proj.weight
    layers.3.attn_norm.lam            model.layers.3.input_layernorm.lam
    layers.3.ffn.w_gate.weight        model.layers.3.mlp.gate_proj.weight
    layers.3.bhyt_correction          model.layers.3.bhyt_correction
    final_norm.weight                 model.norm.weight
    lm_head.weight                    lm_head.weight

Names without a Llama counterpart (λ, α, c_ℓ, Peri-LN post-norms, MoE routers and experts) keep
their steadylm segment under the mapped parent. :data:`SEGMENTS` is the one table both
directions and the module tree of the ``steadylm`` HF model type use.

Import: :func:`import_hf` reads a local Llama-, Mistral-, Qwen2- or Qwen3-layout checkpoint (or an
exported ``steadylm`` one) into a :class:`ModelConfig` and a steadylm state dict. It reads
``config.json`` as JSON and weights from safetensors (``torch.load(weights_only=True)`` for a
``pytorch_model.bin``); it never imports code from the checkpoint directory.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from steadylm.errors import CheckpointError, ConfigError
from steadylm.models import ModelConfig, Transformer, build_model

__all__ = [
    "CONFIG_KEYS",
    "HIDDEN_ACTS",
    "SEGMENTS",
    "ConfigKey",
    "SUPPORTED_ARCHITECTURES",
    "activation_kwargs_from_config",
    "hf_config_fields",
    "hf_config_to_model_config",
    "hf_name",
    "import_hf",
    "load_hf_model",
    "plain_hf_architecture",
    "steadylm_name",
]


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


#: Architectures :func:`import_hf` reads (``config.json`` ``architectures[0]``) -> model type.
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "SteadyLMForCausalLM": "steadylm",
}
#: ``hidden_act`` names registered with transformers -> (steadylm activation, fixed kwargs).
HIDDEN_ACTS: dict[str, tuple[str, dict[str, Any]]] = {
    "powlu": ("powlu", {}),
    "swiglu_clip": ("swiglu_clip", {"variant": "gptoss"}),
    "swiglu_clip_step": ("swiglu_clip", {"variant": "step"}),
    "swiglu_clip_clamp": ("swiglu_clip", {"variant": "clamp"}),
}
# HF config attributes read as activation hyper-parameters when present.
_CONFIG_KWARGS: dict[str, dict[str, str]] = {
    "powlu": {"powlu_m": "m"},
    "swiglu_clip": {"swiglu_clip_limit": "limit", "swiglu_clip_alpha": "alpha"},
}


def activation_kwargs_from_config(activation: str, config: Any) -> dict[str, Any]:
    """Hyper-parameters of ``activation`` found on an HF config object or ``config.json`` dict
    (``powlu_m``, ``swiglu_clip_limit``, ``swiglu_clip_alpha``)."""
    def get(attr: str) -> Any:
        return config.get(attr) if isinstance(config, dict) else getattr(config, attr, None)

    return {key: get(attr) for attr, key in _CONFIG_KWARGS.get(activation, {}).items() if get(attr) is not None}


# Stock hidden_act values that mean SwiGLU (SiLU gate).
_SILU_ACTS = ("silu", "swish")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found: not a Hugging Face model directory") from None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data


_REQUIRED = object()


def _field(cfg: dict[str, Any], name: str, kind: type, default: Any = _REQUIRED, *, minimum: float | None = None,
           positive: bool = False) -> Any:
    """``config.json`` field ``name`` as ``kind`` (int, float, bool or str): a missing required
    field or a value of the wrong type or range is one :class:`ConfigError` naming the field."""
    value = cfg.get(name)
    if value is None:
        if default is _REQUIRED:
            raise ConfigError(f"config.json has no {name!r} (required to build the model)")
        return default
    expected = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[kind]
    ok = (isinstance(value, bool) if kind is bool else
          isinstance(value, int) and not isinstance(value, bool) if kind is int else
          isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else
          isinstance(value, str))
    if not ok:
        raise ConfigError(f"config.json field {name!r} must be {expected}, got {value!r}")
    if kind is float and not math.isfinite(value):
        raise ConfigError(f"config.json field {name!r} must be finite, got {value!r}")
    if positive and value <= 0:
        raise ConfigError(f"config.json field {name!r} must be > 0, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"config.json field {name!r} must be >= {minimum}, got {value!r}")
    return kind(value)


class ConfigKey(NamedTuple):
    """A ``config.json`` key of the plain HF architectures and the :class:`ModelConfig` attribute
    that holds its value; ``kind``, ``default`` (when the file lacks it), ``minimum`` and
    ``positive`` are how import reads it (:func:`_field`)."""

    hf: str
    attr: str
    kind: type
    default: Any = _REQUIRED
    minimum: float | None = None
    positive: bool = False


#: The one mapping of HF config names to :class:`ModelConfig` names: export writes these keys
#: (:func:`hf_config_fields`: the plain Llama/Qwen config, the ``steadylm`` type's derived fields)
#: and import reads them (:func:`hf_config_to_model_config`).
CONFIG_KEYS: tuple[ConfigKey, ...] = (
    ConfigKey("vocab_size", "vocab_size", int, minimum=1),
    ConfigKey("hidden_size", "dim", int, minimum=1),
    ConfigKey("intermediate_size", "ffn_dim", int, minimum=1),
    ConfigKey("num_hidden_layers", "n_layers", int, minimum=1),
    ConfigKey("num_attention_heads", "n_heads", int, minimum=1),
    ConfigKey("num_key_value_heads", "n_kv_heads", int, None, minimum=1),  # None: n_heads
    ConfigKey("head_dim", "head_dim", int, 0, minimum=0),  # 0: dim // n_heads
    ConfigKey("max_position_embeddings", "max_seq_len", int, 2048, minimum=1),
    ConfigKey("rms_norm_eps", "norm_eps", float, 1e-6, positive=True),
    ConfigKey("tie_word_embeddings", "tie_embeddings", bool, False),
    ConfigKey("initializer_range", "init_std", float, 0.02, positive=True),
)


def hf_config_fields(config: ModelConfig) -> dict[str, Any]:
    """``config``'s values under the HF config keys of :data:`CONFIG_KEYS` (what export writes)."""
    return {key.hf: getattr(config, key.attr) for key in CONFIG_KEYS}


def _read_config_keys(cfg: dict[str, Any], *, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The :data:`CONFIG_KEYS` values of a ``config.json`` by :class:`ModelConfig` attribute, each
    checked (one :class:`ConfigError` naming the field); attributes in ``skip`` are not read."""
    return {key.attr: _field(cfg, key.hf, key.kind, key.default, minimum=key.minimum, positive=key.positive)
            for key in CONFIG_KEYS if key.attr not in skip}


_ROPE_SCALING_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def _rope(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """``(rope_theta, ModelConfig.rope_scaling)`` of a ``config.json`` (v5 ``rope_parameters`` or the
    older ``rope_theta`` + ``rope_scaling``)."""
    params: dict[str, Any] = {}
    for name in ("rope_scaling", "rope_parameters"):
        section = cfg.get(name) or {}
        if not isinstance(section, dict):
            raise ConfigError(f"config.json field {name!r} must be an object, got {section!r}")
        params.update(section)
    rope_type = params.get("rope_type") or params.get("type") or "default"
    theta = _field({"rope_theta": params.get("rope_theta", cfg.get("rope_theta"))}, "rope_theta", float,
                   10000.0, positive=True)
    if rope_type == "default":
        return theta, None
    if rope_type not in _ROPE_SCALING_KEYS:
        raise ConfigError(f"config.json rope type {rope_type!r} is not supported; supported: "
                          f"{['default', *_ROPE_SCALING_KEYS]}")
    missing = [k for k in _ROPE_SCALING_KEYS[rope_type] if k not in params]
    if missing:
        raise ConfigError(f"config.json rope type {rope_type!r} lacks {missing}")
    return theta, {"type": rope_type, **{k: params[k] for k in _ROPE_SCALING_KEYS[rope_type]}}


def hf_config_to_model_config(cfg: dict[str, Any], *, max_seq_len: int | None = None) -> ModelConfig:
    """The :class:`ModelConfig` of an HF ``config.json`` (a dict) of a supported architecture.

    ``max_seq_len`` (the training context T, also c_ℓ's T) defaults to ``max_position_embeddings``.
    Raises:
        ConfigError: unsupported architecture (naming it and the supported ones) or a feature
            steadylm does not have (named).
    """
    architectures = cfg.get("architectures") or []
    if not isinstance(architectures, list):
        raise ConfigError(f"config.json field 'architectures' must be a list, got {architectures!r}")
    arch = architectures[0] if architectures else None
    if not isinstance(arch, str) or arch not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(
            f"architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    family = SUPPORTED_ARCHITECTURES[arch]
    if family == "steadylm":
        if not isinstance(cfg.get("steadylm"), dict):
            raise ConfigError("config.json of a SteadyLMForCausalLM has no 'steadylm' object (the model config)")
        mc = ModelConfig.from_dict(cfg["steadylm"])
        return mc if max_seq_len is None else mc.replace(max_seq_len=max_seq_len)
    act_name = _field(cfg, "hidden_act", str, "silu")
    if act_name not in _SILU_ACTS and act_name not in HIDDEN_ACTS:
        raise ConfigError(f"config.json hidden_act {act_name!r} is not supported; "
                          f"supported: {sorted(_SILU_ACTS + tuple(HIDDEN_ACTS))}")
    if cfg.get("mlp_bias"):
        raise ConfigError("config.json mlp_bias=true is not supported (steadylm FFNs have no biases)")
    if family in ("llama", "mistral", "qwen3") and cfg.get("attention_bias"):
        raise ConfigError(f"config.json attention_bias=true ({arch}) is not supported")
    values = _read_config_keys(cfg, skip=("max_seq_len",) if max_seq_len is not None else ())
    if max_seq_len is not None:
        values["max_seq_len"] = int(max_seq_len)
    dim, n_heads, seq = values["dim"], values["n_heads"], values["max_seq_len"]
    head_dim = values.pop("head_dim") or dim // n_heads
    window = _field(cfg, "sliding_window", int, None, minimum=1)
    uses_window = family == "mistral" or _field(cfg, "use_sliding_window", bool, False)
    if uses_window and window is not None and int(window) < seq:
        raise ConfigError(
            f"config.json sliding_window ({window}) is shorter than max_seq_len ({seq}); steadylm has "
            "full causal attention only (pass a max_seq_len <= the window)"
        )
    rope_theta, rope_scaling = _rope(cfg)
    activation, fixed = HIDDEN_ACTS.get(act_name, ("swiglu", {}))
    activation_kwargs = {**fixed, **activation_kwargs_from_config(activation, cfg)}
    return ModelConfig(
        **values,
        head_size=None if head_dim * n_heads == dim else int(head_dim),
        qkv_bias=family == "qwen2",
        qk_norm=family == "qwen3",
        activation=activation,
        activation_kwargs=activation_kwargs,
        norm="rmsnorm",
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
    )


def _read_weights(hf_dir: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    single, index = hf_dir / "model.safetensors", hf_dir / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        weight_map = _read_json(index).get("weight_map", {})
        files = [hf_dir / name for name in sorted(set(weight_map.values()))]
    elif (hf_dir / "pytorch_model.bin").is_file():
        try:
            return torch.load(hf_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - unpickling refused or corrupt file
            raise CheckpointError(f"cannot read {hf_dir / 'pytorch_model.bin'} safely: {err}") from None
    else:
        raise CheckpointError(f"{hf_dir} has no model.safetensors (or index, or pytorch_model.bin)")
    tensors: dict[str, Tensor] = {}
    for file in files:
        try:
            tensors.update(load_file(str(file)))
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
            raise CheckpointError(f"cannot read {file}: {err}") from None
    return tensors


def import_hf(
    hf_dir: str | os.PathLike[str], *, max_seq_len: int | None = None
) -> tuple[ModelConfig, dict[str, Tensor]]:
    """``(ModelConfig, steadylm state dict)`` of a local HF checkpoint directory.

    The state dict loads strictly into ``build_model(config)`` (tied heads filled in, HF RoPE
    buffers dropped). ``max_seq_len`` sets the training context T (default: the checkpoint's
    ``max_position_embeddings``).
    """
    directory = Path(hf_dir).expanduser()
    try:
        config = hf_config_to_model_config(_read_json(directory / "config.json"), max_seq_len=max_seq_len)
    except ConfigError as err:
        raise ConfigError(f"{directory}: {err}") from None
    state = {steadylm_name(k): v for k, v in _read_weights(directory).items() if "rotary_emb" not in k}
    if config.tie_embeddings:
        state.setdefault("lm_head.weight", state.get("embed.weight"))  # type: ignore[arg-type]
    expected = build_model(config, device="meta").state_dict()
    missing = sorted(set(expected) - set(k for k, v in state.items() if v is not None))
    # c_ℓ is recomputed from the weights on load; an HF checkpoint without it is complete.
    missing = [k for k in missing if not k.endswith("bhyt_correction")]
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{directory}: weights do not match the {config.n_layers}-layer model "
            f"(missing: {missing[:5]}, unexpected: {unexpected[:5]})"
        )
    return config, state


def load_hf_model(hf_dir: str | os.PathLike[str], *, max_seq_len: int | None = None,
                  **config_changes: Any) -> Transformer:
    """A steadylm :class:`Transformer` with the weights of a local HF checkpoint.

    ``config_changes`` (e.g. ``activation="powlu"``) are applied to the imported config before the
    model is built — the mid-training switch on a real checkpoint; they must not change shapes.
    """
    config, state = import_hf(hf_dir, max_seq_len=max_seq_len)
    if config_changes:
        config = config.replace(**config_changes)
    model = build_model(config)
    model.load_state_dict(state, strict=False)  # strict on weights (checked above); c_ℓ refreshed
    return model



def plain_hf_architecture(config: ModelConfig) -> str | None:
    """The stock HF class that holds ``config`` exactly (no steadylm needed to load it), or None.

    swiglu + rmsnorm dense decoders with full RoPE and an RMSNorm final norm are Llama; with QKV
    biases Qwen2; with QK-norm Qwen3.
    """
    plain = (
        config.activation == "swiglu"
        and config.norm == "rmsnorm"
        and config.final_norm_type == "rmsnorm"
        and not config.is_moe
        and config.rope_fraction == 1.0
        and config.layer_activation_kwargs is None
    )
    if not plain or (config.qkv_bias and config.qk_norm):
        return None
    if config.rope_scaling is not None and (config.qkv_bias or config.qk_norm):
        return None  # keep to the layout the scaling came with (Llama)
    if config.qk_norm:
        return "Qwen3ForCausalLM"
    if config.qkv_bias:
        return "Qwen2ForCausalLM"
    return "LlamaForCausalLM"
