"""The run directory's checks: what a fresh run clears, and what a resumed run must match.

Used by :class:`steadylm.train.trainer.Trainer` on rank 0 before the first step: ``config.json``
(the run's configs) is written; a resume is refused with every difference named (model config,
seed, data fingerprint, precision) rather than continuing another run's checkpoint.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from steadylm.errors import CheckpointError, ConfigError, SteadyLMError
from steadylm.train.atomic import atomic_write_text
from steadylm.train.checkpoint_layout import CHECKPOINT_DIRNAME, find_checkpoint, read_checkpoint_state

__all__ = ["config_dict", "normalized_model_dict", "prepare_run_dir"]


def config_dict(config: Any) -> dict[str, Any]:
    """A model config as ``config.json`` stores it (``to_dict()``, or a plain dataclass as JSON)."""
    if hasattr(config, "to_dict"):
        return config.to_dict()
    if is_dataclass(config):
        return json.loads(json.dumps(asdict(config), default=str))
    raise ConfigError(f"model_config must be a ModelConfig (with to_dict), got {type(config).__name__}")


def prepare_run_dir(out_dir: Path, configs: dict[str, Any], resume: bool | str, metrics: Any, *,
                    model_config: Any, seed: int, precision: str) -> Path | None:
    """Set up ``out_dir`` for a run whose ``config.json`` is ``configs`` (rank 0 calls it).

    Fresh (``resume`` False, or ``"auto"`` without a checkpoint): an earlier run's checkpoint and
    metrics are cleared. Resume: the checkpoint must exist and have been written for the same
    model config, seed, data and precision, else :class:`CheckpointError` lists every difference.
    Returns the checkpoint to resume from (None for a fresh run).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    if resume == "auto":
        resume = find_checkpoint(out_dir) is not None
    if not resume:
        for name in (CHECKPOINT_DIRNAME, CHECKPOINT_DIRNAME + ".old"):
            shutil.rmtree(out_dir / name, ignore_errors=True)
        metrics.reset()
        atomic_write_text(out_dir / "config.json", json.dumps(configs, indent=2, default=str))
        return None
    checkpoint = find_checkpoint(out_dir)
    if checkpoint is None:
        raise CheckpointError(f"cannot resume: no checkpoint in {out_dir}")
    saved = read_checkpoint_state(checkpoint).configs
    saved_model = normalized_model_dict(model_config, saved.get("model", {}))
    problems = []
    differing = sorted(
        k for k in set(saved_model) | set(configs["model"]) if saved_model.get(k) != configs["model"].get(k)
    )
    if differing:
        problems.append(f"model config differs in {differing}")
    if saved.get("train", {}).get("seed") != seed:
        problems.append(f"seed differs (checkpoint {saved.get('train', {}).get('seed')}, now {seed})")
    saved_fp = saved.get("data", {}).get("fingerprint")
    if saved_fp and saved_fp != configs["data"].get("fingerprint"):
        problems.append("the data (corpus, tokenizer or split) differs")
    if saved.get("train", {}).get("precision") != precision:
        problems.append("precision differs")
    if problems:
        raise CheckpointError(f"cannot resume from {checkpoint}: " + "; ".join(problems))
    atomic_write_text(out_dir / "config.json", json.dumps(configs, indent=2, default=str))
    return checkpoint


def normalized_model_dict(model_config: Any, saved: dict[str, Any]) -> dict[str, Any]:
    """A saved model config as this version writes it: fields added since (with their
    defaults) do not make an older run look like another model."""
    from_dict = getattr(type(model_config), "from_dict", None)
    if from_dict is None or not saved:
        return saved
    try:
        return config_dict(from_dict(saved))
    except (SteadyLMError, TypeError, ValueError):
        return saved  # reported field by field below
