"""Export steadylm models as Hugging Face model directories.

:func:`export_model` writes a standard HF model directory: a plain ``LlamaForCausalLM`` (or
``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM`` for the layouts imported from them) when the model is
swiglu + rmsnorm dense — loadable where steadylm is not installed — else the ``steadylm`` model
type with ``auto_map`` entries, so ``AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)`` loads it where steadylm is installed. :func:`export_run` does this for
the last checkpoint of a training run directory (``steadylm export``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from steadylm.errors import CheckpointError, ConfigError
from steadylm.models.hf_format import hf_config_fields, hf_name, plain_hf_architecture
from steadylm.models import ModelConfig, Transformer, build_model

__all__ = ["export_model", "export_run", "exported_architecture", "has_tokenizer", "plain_hf_config"]


def _rope_parameters(config: ModelConfig) -> dict[str, Any]:
    scaling = dict(config.rope_scaling or {})
    rope_type = scaling.pop("type", "default")
    return {"rope_type": rope_type, "rope_theta": config.rope_theta, **scaling}


def plain_hf_config(config: ModelConfig, arch: str = "LlamaForCausalLM") -> Any:
    """The transformers config of the plain architecture ``arch`` (Llama, Qwen2 or Qwen3) with
    ``config``'s shapes, RoPE, ε, tying and init range: what export writes for a SwiGLU + RMSNorm
    model, and the same-shape HF model the benchmarks compare with."""
    import transformers

    common = dict(hf_config_fields(config), hidden_act="silu", rope_parameters=_rope_parameters(config),
                  architectures=[arch])
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

        hf_config = plain_hf_config(config, arch)
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
        eos_token_id=eos_id, pad_token_id=eos_id, use_cache=True,
    )
    hf_model.save_pretrained(out)
    if tokenizer is not None:
        _write_tokenizer(out, tokenizer, eos_token, config.max_seq_len)
    else:  # a tokenizer left by an earlier export into out_dir would not belong to this model
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (out / name).unlink(missing_ok=True)
    return out


def _write_tokenizer(out: Path, tokenizer: Any, eos_token: str | None, max_len: int) -> None:
    tokenizer.save(str(out / "tokenizer.json"))
    settings: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
        # decoder-only generation pads on the left (generate / pipeline batches of prompts)
        "padding_side": "left",
    }
    if eos_token:
        settings.update(eos_token=eos_token, pad_token=eos_token)
    (out / "tokenizer_config.json").write_text(json.dumps(settings, indent=2), encoding="utf-8")


def export_run(run_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
               tokenizer_file: str | os.PathLike[str] | None = None) -> Path:
    """Export the last checkpoint of a steadylm run directory (``steadylm export``).

    The tokenizer is ``tokenizer_file`` if given, else ``RUN_DIR/tokenizer.json``, else the
    ``tokenizer.json`` the run spec names (``data.tokenizer``), else the cached tokenizer the run's
    data was encoded with (by its corpus fingerprint); with none of these the model is written
    without a tokenizer (:func:`has_tokenizer` tells).
    """
    from steadylm.data.tokenizer import EOS_TOKEN, load_tokenizer_file
    from steadylm.train.checkpoint import find_checkpoint
    from steadylm.train.model_dir import is_hf_dir, load_model_dir

    run = Path(run_dir).expanduser()
    if is_hf_dir(run) or find_checkpoint(run) is None:
        raise CheckpointError(f"{run} has no checkpoint to export (train with checkpoints, or pass a run directory)")
    loaded = load_model_dir(run)
    model = loaded.build()

    if tokenizer_file:
        candidate = Path(tokenizer_file).expanduser()
        if not candidate.is_file():
            raise ConfigError(f"--tokenizer {candidate} not found")
    else:
        candidate = loaded.tokenizer_file
    if candidate is not None:
        tokenizer, eos_id = load_tokenizer_file(candidate)
        eos_token = tokenizer.id_to_token(eos_id)
    else:
        # None anywhere (e.g. an imported checkpoint that shipped no tokenizer): the weights are
        # still a complete model, written without one (`steadylm export` says so: has_tokenizer).
        tokenizer = loaded.tokenizer()
        eos_token = EOS_TOKEN if tokenizer is not None else None
    return export_model(model, out_dir, tokenizer=tokenizer, eos_token=eos_token)


def has_tokenizer(out_dir: str | os.PathLike[str]) -> bool:
    """Whether an exported directory ships a tokenizer (``tokenizer.json``)."""
    return (Path(out_dir) / "tokenizer.json").is_file()


def exported_architecture(out_dir: str | os.PathLike[str]) -> str:
    """``architectures[0]`` of an exported directory's ``config.json`` (what loads it)."""
    config = json.loads((Path(out_dir) / "config.json").read_text(encoding="utf-8"))
    return str((config.get("architectures") or ["?"])[0])
