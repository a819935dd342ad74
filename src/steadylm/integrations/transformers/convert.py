"""Checkpoints both ways between steadylm and Hugging Face transformers.

* :func:`import_hf` reads a local Llama-, Mistral-, Qwen2- or Qwen3-layout checkpoint (or an
  exported ``steadylm`` one) into a :class:`ModelConfig` and a steadylm state dict. It reads
  ``config.json`` as JSON and weights from safetensors (``torch.load(weights_only=True)`` for a
  ``pytorch_model.bin``); it never imports code from the checkpoint directory.
* :func:`export_model` writes a standard HF model directory: a plain ``LlamaForCausalLM`` (or
  ``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM`` for the layouts imported from them) when the model
  is swiglu + rmsnorm dense, else the ``steadylm`` model type with ``auto_map`` entries, so
  ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` loads it where steadylm
  is installed. :func:`export_run` does this for a training run directory.

Neither function needs transformers to read; :func:`export_model` imports it to write.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from steadylm.errors import CheckpointError, ConfigError
from steadylm.integrations.transformers.layout import hf_name, steadylm_name
from steadylm.models import ModelConfig, Transformer, build_model

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "export_model",
    "export_run",
    "hf_config_to_model_config",
    "import_hf",
    "load_hf_model",
    "plain_hf_architecture",
]

#: Architectures :func:`import_hf` reads (``config.json`` ``architectures[0]``) -> model type.
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "SteadyLMForCausalLM": "steadylm",
}
# hidden_act values of HF configs -> steadylm activation (SiLU-gated = SwiGLU).
_HF_ACTIVATIONS = {"silu": "swiglu", "swish": "swiglu", "powlu": "powlu", "swiglu_clip": "swiglu_clip"}


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


def _rope_theta(cfg: dict[str, Any]) -> float:
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or params.get("type") or scaling.get("rope_type") or scaling.get("type")
    if rope_type not in (None, "default"):
        raise ConfigError(
            f"config.json rope type {rope_type!r} is not supported (steadylm has plain RoPE: 'default')"
        )
    return float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def hf_config_to_model_config(cfg: dict[str, Any], *, max_seq_len: int | None = None) -> ModelConfig:
    """The :class:`ModelConfig` of an HF ``config.json`` (a dict) of a supported architecture.

    ``max_seq_len`` (the training context T, also c_ℓ's T) defaults to ``max_position_embeddings``.
    Raises:
        ConfigError: unsupported architecture (naming it and the supported ones) or a feature
            steadylm does not have (named).
    """
    architectures = cfg.get("architectures") or []
    arch = architectures[0] if architectures else None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(
            f"architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    family = SUPPORTED_ARCHITECTURES[arch]
    if family == "steadylm":
        mc = ModelConfig.from_dict(cfg["steadylm"])
        return mc if max_seq_len is None else mc.replace(max_seq_len=max_seq_len)
    act_name = cfg.get("hidden_act", "silu")
    if act_name not in _HF_ACTIVATIONS:
        raise ConfigError(f"config.json hidden_act {act_name!r} is not supported; supported: {sorted(_HF_ACTIVATIONS)}")
    if cfg.get("mlp_bias"):
        raise ConfigError("config.json mlp_bias=true is not supported (steadylm FFNs have no biases)")
    if family in ("llama", "mistral", "qwen3") and cfg.get("attention_bias"):
        raise ConfigError(f"config.json attention_bias=true ({arch}) is not supported")
    dim, n_heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    head_dim = cfg.get("head_dim") or dim // n_heads
    seq = int(max_seq_len if max_seq_len is not None else cfg.get("max_position_embeddings", 2048))
    window = cfg.get("sliding_window")
    uses_window = family == "mistral" or cfg.get("use_sliding_window", False)
    if uses_window and window is not None and int(window) < seq:
        raise ConfigError(
            f"config.json sliding_window ({window}) is shorter than max_seq_len ({seq}); steadylm has "
            "full causal attention only (pass a max_seq_len <= the window)"
        )
    activation_kwargs: dict[str, Any] = {}
    if act_name == "powlu" and "powlu_m" in cfg:
        activation_kwargs["m"] = float(cfg["powlu_m"])
    return ModelConfig(
        vocab_size=int(cfg["vocab_size"]),
        dim=dim,
        n_layers=int(cfg["num_hidden_layers"]),
        n_heads=n_heads,
        n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
        ffn_dim=int(cfg["intermediate_size"]),
        max_seq_len=seq,
        head_size=None if head_dim * n_heads == dim else int(head_dim),
        qkv_bias=family == "qwen2",
        qk_norm=family == "qwen3",
        activation=_HF_ACTIVATIONS[act_name],
        activation_kwargs=activation_kwargs,
        norm="rmsnorm",
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=_rope_theta(cfg),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        init_std=float(cfg.get("initializer_range", 0.02)),
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


def import_hf(hf_dir: str | os.PathLike[str], *, max_seq_len: int | None = None) -> tuple[ModelConfig, dict[str, Tensor]]:
    """``(ModelConfig, steadylm state dict)`` of a local HF checkpoint directory.

    The state dict loads strictly into ``build_model(config)`` (tied heads filled in, HF RoPE
    buffers dropped). ``max_seq_len`` sets the training context T (default: the checkpoint's
    ``max_position_embeddings``).
    """
    directory = Path(hf_dir).expanduser()
    config = hf_config_to_model_config(_read_json(directory / "config.json"), max_seq_len=max_seq_len)
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


# ----------------------------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------------------------


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
    if config.qk_norm:
        return "Qwen3ForCausalLM"
    if config.qkv_bias:
        return "Qwen2ForCausalLM"
    return "LlamaForCausalLM"


def _plain_hf_config(config: ModelConfig, arch: str) -> Any:
    import transformers

    common = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.dim,
        intermediate_size=config.ffn_dim,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_seq_len,
        hidden_act="silu",
        rms_norm_eps=config.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        tie_word_embeddings=config.tie_embeddings,
        initializer_range=config.init_std,
        architectures=[arch],
    )
    if arch == "LlamaForCausalLM":
        return transformers.LlamaConfig(**common)
    if arch == "Qwen2ForCausalLM":
        return transformers.Qwen2Config(**common, use_sliding_window=False)
    return transformers.Qwen3Config(**common, use_sliding_window=False)


_SHIM = (
    '"""Loads steadylm\'s Hugging Face classes (steadylm must be installed: pip install steadylm[hf])."""\n'
    "from steadylm.integrations.transformers.modeling import SteadyLMConfig, SteadyLMForCausalLM  # noqa: F401\n"
)


def export_model(
    model: Transformer,
    out_dir: str | os.PathLike[str],
    *,
    tokenizer: Any | None = None,
    eos_token: str | None = None,
) -> Path:
    """Write ``model`` as a Hugging Face model directory; returns its path.

    Args:
        model: a steadylm :class:`Transformer` (weights on any device; written as fp32 as held).
        out_dir: created if missing; existing files of the same names are replaced.
        tokenizer: a ``tokenizers.Tokenizer``; written as ``tokenizer.json`` + ``tokenizer_config.json``.
        eos_token: its end-of-text token (``generation_config.eos_token_id``, the tokenizer's eos).
    """
    from transformers import GenerationConfig

    from steadylm.integrations.transformers.modeling import SteadyLMConfig, SteadyLMForCausalLM

    config: ModelConfig = model.config
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    state = {hf_name(k): v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    arch = plain_hf_architecture(config)
    if arch is not None:
        import transformers

        hf_config = _plain_hf_config(config, arch)
        hf_model = getattr(transformers, arch)(hf_config)
    else:
        hf_config = SteadyLMConfig(steadylm=config.to_dict(), architectures=["SteadyLMForCausalLM"])
        hf_config.auto_map = {
            "AutoConfig": "configuration_steadylm.SteadyLMConfig",
            "AutoModelForCausalLM": "modeling_steadylm.SteadyLMForCausalLM",
        }
        hf_model = SteadyLMForCausalLM(hf_config)
        for name in ("configuration_steadylm.py", "modeling_steadylm.py"):
            (out / name).write_text(_SHIM, encoding="utf-8")
    result = hf_model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:  # pragma: no cover - layout bug
        raise CheckpointError(f"export layout mismatch: missing {result.missing_keys[:5]}, "
                              f"unexpected {result.unexpected_keys[:5]}")
    if isinstance(hf_model, SteadyLMForCausalLM):
        hf_model.steadylm_after_load()
    eos_id = tokenizer.token_to_id(eos_token) if (tokenizer is not None and eos_token) else None
    hf_model.generation_config = GenerationConfig(
        eos_token_id=eos_id, pad_token_id=eos_id, use_cache=arch is not None,
        max_length=config.max_seq_len,
    )
    hf_model.save_pretrained(out)
    if tokenizer is not None:
        _write_tokenizer(out, tokenizer, eos_token, config.max_seq_len)
    return out


def _write_tokenizer(out: Path, tokenizer: Any, eos_token: str | None, max_len: int) -> None:
    tokenizer.save(str(out / "tokenizer.json"))
    settings: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
    }
    if eos_token:
        settings.update(eos_token=eos_token, pad_token=eos_token)
    (out / "tokenizer_config.json").write_text(json.dumps(settings, indent=2), encoding="utf-8")


def export_run(run_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
               tokenizer_file: str | os.PathLike[str] | None = None) -> Path:
    """Export the last checkpoint of a steadylm run directory (``steadylm export``).

    The tokenizer is ``tokenizer_file`` if given, else ``RUN_DIR/tokenizer.json``, else the cached
    tokenizer the run's data was encoded with (by its corpus fingerprint).
    """
    from steadylm.data.tokenizer import EOS_TOKEN, cached_tokenizer, load_tokenizer_file
    from steadylm.train.checkpoint import find_checkpoint, load_checkpoint, read_checkpoint_state

    run = Path(run_dir).expanduser()
    checkpoint = find_checkpoint(run)
    if checkpoint is None:
        raise CheckpointError(f"{run} has no checkpoint to export (train with checkpoints, or pass a run directory)")
    configs = read_checkpoint_state(checkpoint).configs
    if "model" not in configs:
        raise CheckpointError(f"{checkpoint}: state.json records no model config")
    model = build_model(ModelConfig.from_dict(configs["model"]))
    load_checkpoint(checkpoint, model, restore_rng=False)

    tokenizer, eos_token = None, None
    candidate = Path(tokenizer_file).expanduser() if tokenizer_file else run / "tokenizer.json"
    if candidate.is_file():
        tokenizer, eos_id = load_tokenizer_file(candidate)
        eos_token = tokenizer.id_to_token(eos_id)
    elif tokenizer_file:
        raise ConfigError(f"--tokenizer {candidate} not found")
    else:
        fingerprint = (configs.get("data") or {}).get("fingerprint")
        tokenizer = cached_tokenizer(fingerprint) if fingerprint else None
        if tokenizer is None:
            raise CheckpointError(
                f"no tokenizer for {run}: not in the run directory and not in the tokenizer cache "
                f"(fingerprint {fingerprint}); pass --tokenizer FILE"
            )
        eos_token = EOS_TOKEN
    return export_model(model, out_dir, tokenizer=tokenizer, eos_token=eos_token)
