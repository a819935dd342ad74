"""``steadylm scan MODEL_DIR --data FILE --out DIR``: the stability profile of a trained checkpoint.

MODEL_DIR is a local Hugging Face Llama-family checkpoint (Llama, Mistral, Qwen2, Qwen3, or an
exported steadylm model) or a steadylm run directory. The text of ``--data`` runs through the
model with the lab's probes; ``DIR`` gets ``report.html``, ``summary.md``, ``plots/`` and
``summary.json``: per-layer FFN down-projection outliers (max, P99, kurtosis, massive-activation
channels), hidden-state variance with depth, the attention max logit, the FP8 (e4m3, current
scaling) risk of every linear layer's input, and a what-if — the same weights with the gate
switched to PowLU or SwiGLU-Clip: how much the outliers shrink and how far the outputs move.

Weights are read from safetensors; no code from MODEL_DIR runs (no ``trust_remote_code``).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch

from steadylm.errors import CheckpointError, ConfigError, DataError

__all__ = ["add_arguments", "load_model_dir", "run", "scan", "tokenize_text"]

#: The gate switches of the what-if: activation -> keyword arguments (registry defaults).
WHAT_IF: dict[str, dict[str, Any]] = {"powlu": {}, "swiglu_clip": {}}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", metavar="MODEL_DIR",
                        help="a local HF Llama/Mistral/Qwen2/Qwen3 (or exported steadylm) model "
                        "directory, or a steadylm run directory")
    parser.add_argument("--data", required=True, metavar="FILE", help="a UTF-8 text file to run through the model")
    parser.add_argument("--out", required=True, metavar="DIR", help="report directory")
    parser.add_argument("--tokenizer", metavar="FILE", default=None,
                        help="tokenizer.json (default: MODEL_DIR/tokenizer.json, or a run's cached tokenizer)")
    parser.add_argument("--seq-len", type=int, default=256, metavar="N",
                        help="tokens per window (capped at the model's max_seq_len; default 256)")
    parser.add_argument("--max-tokens", type=int, default=16384, metavar="N",
                        help="scan at most this many tokens of the text (default 16384)")
    parser.add_argument("--batch-size", type=int, default=4, metavar="N", help="windows per forward")


# ----------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------


def load_model_dir(model_dir: str | Path, tokenizer_file: str | Path | None = None) -> tuple[Any, Any, str]:
    """``(steadylm model, tokenizers.Tokenizer or None, description)`` of an HF model directory or
    a steadylm run directory. Never executes code from the directory."""
    from tokenizers import Tokenizer

    from steadylm.models import ModelConfig, build_model

    directory = Path(model_dir).expanduser()
    config_json = directory / "config.json"
    hf_config = None
    if config_json.is_file():
        try:
            hf_config = json.loads(config_json.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise CheckpointError(f"cannot read {config_json}: {err}") from None
    tokenizer = None
    if hf_config is not None and "architectures" in hf_config:
        from steadylm.integrations.hf_format import import_hf

        config, state = import_hf(directory)
        model = build_model(config)
        model.load_state_dict(state, strict=False)  # import_hf checked the keys; c_ℓ is refreshed
        description = f"Hugging Face {hf_config['architectures'][0]} checkpoint {directory}"
    else:
        from steadylm.train.checkpoint import find_checkpoint, load_checkpoint, read_checkpoint_state

        checkpoint = find_checkpoint(directory)
        if checkpoint is None:
            raise CheckpointError(
                f"{directory} is neither a Hugging Face model directory (config.json with "
                "architectures) nor a steadylm run directory (checkpoint/)"
            )
        configs = read_checkpoint_state(checkpoint).configs
        model = build_model(ModelConfig.from_dict(configs["model"]))
        load_checkpoint(checkpoint, model, restore_rng=False)
        description = f"steadylm run {directory} ({checkpoint.name})"
        fingerprint = (configs.get("data") or {}).get("fingerprint")
        if tokenizer_file is None and not (directory / "tokenizer.json").is_file() and fingerprint:
            from steadylm.data.tokenizer import cached_tokenizer

            tokenizer = cached_tokenizer(fingerprint)
    candidate = Path(tokenizer_file).expanduser() if tokenizer_file else directory / "tokenizer.json"
    if candidate.is_file():
        try:
            tokenizer = Tokenizer.from_file(str(candidate))
        except Exception as err:  # noqa: BLE001 - tokenizers raises a bare Exception
            raise DataError(f"{candidate} is not a readable tokenizer.json") from err
    elif tokenizer_file:
        raise DataError(f"--tokenizer {candidate} not found")
    model.eval()
    return model, tokenizer, description


def tokenize_text(path: str | Path, tokenizer: Any, seq_len: int, max_tokens: int) -> torch.Tensor:
    """The text of ``path`` as ``[windows, seq_len]`` token windows (at most ``max_tokens``)."""
    file = Path(path).expanduser()
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read --data {file}: {err}") from None
    ids = tokenizer.encode(text, add_special_tokens=False).ids[:max_tokens]
    windows = len(ids) // seq_len
    if windows < 1:
        raise DataError(f"--data {file} gives {len(ids)} tokens; at least --seq-len ({seq_len}) are needed")
    return torch.tensor(ids[: windows * seq_len], dtype=torch.long).view(windows, seq_len)


# ----------------------------------------------------------------------------------------------
# the scan
# ----------------------------------------------------------------------------------------------


def scan(model: Any, tokens: torch.Tensor, batch_size: int = 4,
         switches: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Every measurement of :mod:`steadylm.scan.analysis` on ``model`` for ``tokens``."""
    from steadylm.scan import analysis as A

    switches = {k: v for k, v in (WHAT_IF if switches is None else switches).items()
                if k != model.config.activation}
    return {
        "tokens": int(tokens.numel()),
        "windows": int(tokens.shape[0]),
        "seq_len": int(tokens.shape[1]),
        "model": model.config.to_dict(),
        "params": model.num_params(),
        "metrics": A.probe_metrics(model, tokens, batch_size),
        "outlier_channels": A.outlier_channels(model, tokens, batch_size),
        "attention_max_logit": A.attention_max_logits(model, tokens, batch_size),
        "fp8": A.fp8_risk(model, tokens, batch_size),
        "what_if": A.what_if(model, tokens, switches, batch_size),
    }


def _check_positive(name: str, value: int) -> None:
    if value < 1:
        raise ConfigError(f"{name} must be >= 1, got {value}")


def run(args: argparse.Namespace) -> int:
    from steadylm.lab.report import write_all
    from steadylm.scan.report import build_report

    for name in ("seq_len", "max_tokens", "batch_size"):
        _check_positive("--" + name.replace("_", "-"), getattr(args, name))
    model, tokenizer, description = load_model_dir(args.model_dir, args.tokenizer)
    if tokenizer is None:
        raise DataError(f"no tokenizer for {args.model_dir}: pass --tokenizer FILE")
    seq_len = min(args.seq_len, model.config.max_seq_len)
    tokens = tokenize_text(args.data, tokenizer, seq_len, args.max_tokens)
    result = scan(model, tokens, args.batch_size)
    result["source"] = description
    result["data"] = str(Path(args.data).expanduser())
    paths = write_all(build_report(result), args.out, result)
    worst = max(result["outlier_channels"], key=lambda r: r["amax"] if math.isfinite(r["amax"]) else -1.0)
    print(f"{paths['report.html']}: {result['tokens']} tokens; largest activation {worst['amax']:.3g} "
          f"({worst['family']} layer {worst['layer']} channel {worst['channel']})")
    return 0
