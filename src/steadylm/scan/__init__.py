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

__all__ = ["add_arguments", "open_model_dir", "run", "scan", "tokenize_text"]

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


def open_model_dir(model_dir: str | Path, tokenizer_file: str | Path | None = None) -> tuple[Any, Any, str]:
    """``(steadylm model in eval mode, tokenizers.Tokenizer or None, description)`` of an HF model
    directory or a steadylm run directory, read by :func:`steadylm.train.model_dir.load_model_dir`
    (never executes code from the directory). ``tokenizer_file`` replaces the directory's tokenizer."""
    from steadylm.train.model_dir import load_model_dir

    loaded = load_model_dir(model_dir)
    if tokenizer_file and not Path(tokenizer_file).expanduser().is_file():
        raise DataError(f"--tokenizer {tokenizer_file} not found")
    tokenizer = loaded.tokenizer(tokenizer_file)
    model = loaded.build()
    model.eval()
    return model, tokenizer, loaded.description


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
    model, tokenizer, description = open_model_dir(args.model_dir, args.tokenizer)
    if tokenizer is None:
        raise DataError(f"no tokenizer for {args.model_dir}: pass --tokenizer FILE")
    seq_len = min(args.seq_len, model.config.max_seq_len)
    tokens = tokenize_text(args.data, tokenizer, seq_len, args.max_tokens)
    if int(tokens.max()) >= model.config.vocab_size:
        raise DataError(f"the tokenizer gives token id {int(tokens.max())} but the model's vocabulary has "
                        f"{model.config.vocab_size} ids: pass the model's own tokenizer (--tokenizer FILE)")
    result = scan(model, tokens, args.batch_size)
    result["source"] = description
    result["data"] = str(Path(args.data).expanduser())
    paths = write_all(build_report(result), args.out, result)
    worst = max(result["outlier_channels"], key=lambda r: r["amax"] if math.isfinite(r["amax"]) else -1.0)
    print(f"{paths['report.html']}: {result['tokens']} tokens; largest activation {worst['amax']:.3g} "
          f"({worst['family']} layer {worst['layer']} channel {worst['channel']})")
    return 0
