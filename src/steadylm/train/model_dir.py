"""One reader for "a model in a directory": a Hugging Face model directory or a steadylm run directory.

::

    loaded = load_model_dir("llama-dir")          # or a run directory (train / import output)
    model = loaded.build()                        # or loaded.build(activation="powlu")
    tokenizer = loaded.tokenizer()                # tokenizers.Tokenizer or None

``steadylm train --init-from``, ``steadylm scan``, ``steadylm export`` and ``steadylm import`` all
read through :func:`load_model_dir`, so they agree on what a directory is:

* a Hugging Face directory is one whose ``config.json`` names ``architectures`` (read by
  :func:`steadylm.models.hf_format.import_hf`: safetensors, never code from the directory);
* anything else must be a steadylm run directory with a checkpoint (format 1 or 2).

The tokenizer is the directory's ``tokenizer.json``; for a run directory without one, the
``tokenizer.json`` its run spec names (``data.tokenizer``), else the cached byte-level BPE its data
was encoded with (by the corpus fingerprint).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch import Tensor

from steadylm.errors import CheckpointError, DataError
from steadylm.models import ModelConfig, Transformer, build_model

__all__ = ["ModelDir", "is_hf_dir", "load_model_dir", "load_weights", "tokenizer_file_of"]


def is_hf_dir(directory: str | os.PathLike[str]) -> bool:
    """Whether ``directory`` holds a Hugging Face model (``config.json`` with ``architectures``)."""
    config_json = Path(directory) / "config.json"
    if not config_json.is_file():
        return False
    try:
        data = json.loads(config_json.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {config_json}: {err}") from None
    return isinstance(data, dict) and "architectures" in data


@dataclass
class ModelDir:
    """A model read from a directory: its config, its weights (steadylm names) and its tokenizer."""

    config: ModelConfig
    state_dict: dict[str, Tensor]
    source: Path
    kind: Literal["hf", "run"]
    description: str  # for reports: "Hugging Face LlamaForCausalLM checkpoint DIR" / "steadylm run DIR (checkpoint)"
    tokenizer_file: Path | None = None
    tokenizer_fingerprint: str | None = None  # a run's cached BPE, when there is no tokenizer file
    configs: dict[str, Any] = field(default_factory=dict)  # a run checkpoint's configs (empty for HF)

    def build(self, **changes: Any) -> Transformer:
        """``build_model`` of the config (with shape-neutral ``changes``) holding the weights.

        Parameters the weights lack (λ of a switched-in BHyT, α of DyT) keep their initial values;
        c_ℓ is recomputed from the loaded W_V/W_O (``load_state_dict`` refreshes it), except for an
        unchanged run checkpoint, whose buffers come back exactly as saved (c_ℓ of the last refresh).
        """
        config = self.config.replace(**changes) if changes else self.config
        model = load_weights(build_model(config), self.state_dict, self.source)
        if self.kind == "run" and not changes:
            from steadylm.train.checkpoint import restore_buffers

            restore_buffers(model, self.state_dict)
        return model

    def tokenizer(self, override: str | os.PathLike[str] | None = None) -> Any:
        """The ``tokenizers.Tokenizer`` of this model (``override``: a tokenizer.json to use
        instead), or None when neither a file nor the cache has it."""
        path = Path(override).expanduser() if override else self.tokenizer_file
        if path is not None:
            if not path.is_file():
                raise DataError(f"tokenizer {path} not found")
            from tokenizers import Tokenizer

            try:
                return Tokenizer.from_file(str(path))
            except Exception as err:  # noqa: BLE001 - tokenizers raises a bare Exception
                raise DataError(f"{path} is not a readable tokenizer.json") from err
        if self.tokenizer_fingerprint:
            from steadylm.data.tokenizer import cached_tokenizer

            return cached_tokenizer(self.tokenizer_fingerprint)
        return None


def load_weights(model: Transformer, state_dict: dict[str, Tensor], source: Path) -> Transformer:
    """Load ``state_dict`` into ``model``: every weight the model has must be there, nothing extra."""
    result = model.load_state_dict(state_dict, strict=False)
    if result.unexpected_keys:
        raise CheckpointError(f"{source}: weights the model does not have: {result.unexpected_keys[:5]}")
    weights = [k for k in result.missing_keys if k.endswith(".weight") and "norm" not in k]
    if weights:
        raise CheckpointError(f"{source}: missing weights {weights[:5]}")
    return model


def _run_tokenizer_file(directory: Path, configs: dict[str, Any]) -> Path | None:
    own = directory / "tokenizer.json"
    if own.is_file():
        return own
    named = ((configs.get("run_spec") or {}).get("data") or {}).get("tokenizer")
    path = Path(named).expanduser() if named else None
    return path if path is not None and path.is_file() else None


def tokenizer_file_of(path: str | os.PathLike[str]) -> Path | None:
    """The ``tokenizer.json`` of the model in ``path`` (see the module docstring), without reading
    any weights; None where there is none (a run whose BPE is only in the cache)."""
    directory = Path(path).expanduser()
    if is_hf_dir(directory):
        own = directory / "tokenizer.json"
        return own if own.is_file() else None
    from steadylm.train.checkpoint import find_checkpoint, read_checkpoint_state

    checkpoint = find_checkpoint(directory)
    configs = read_checkpoint_state(checkpoint).configs if checkpoint is not None else {}
    return _run_tokenizer_file(directory, configs)


def load_model_dir(path: str | os.PathLike[str], *, max_seq_len: int | None = None) -> ModelDir:
    """Read the model in ``path`` (see the module docstring). ``max_seq_len`` sets an HF
    checkpoint's training context (default: its ``max_position_embeddings``)."""
    directory = Path(path).expanduser()
    if is_hf_dir(directory):
        from steadylm.models.hf_format import import_hf

        config, state = import_hf(directory, max_seq_len=max_seq_len)
        arch = json.loads((directory / "config.json").read_text(encoding="utf-8"))["architectures"][0]
        tokenizer = directory / "tokenizer.json"
        return ModelDir(config, state, directory, "hf", f"Hugging Face {arch} checkpoint {directory}",
                        tokenizer_file=tokenizer if tokenizer.is_file() else None)
    from steadylm.train.checkpoint import find_checkpoint, load_checkpoint, read_checkpoint_state

    checkpoint = find_checkpoint(directory)
    if checkpoint is None:
        raise CheckpointError(
            f"{directory} is neither a Hugging Face model directory (config.json with architectures) "
            "nor a steadylm run directory with a checkpoint")
    configs = read_checkpoint_state(checkpoint).configs
    if "model" not in configs:
        raise CheckpointError(f"{checkpoint}: state.json records no model config")
    config = ModelConfig.from_dict(configs["model"])
    model = build_model(config)
    load_checkpoint(checkpoint, model, restore_rng=False)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return ModelDir(config, state, directory, "run", f"steadylm run {directory} ({checkpoint.name})",
                    tokenizer_file=_run_tokenizer_file(directory, configs),
                    tokenizer_fingerprint=(configs.get("data") or {}).get("fingerprint"), configs=configs)
