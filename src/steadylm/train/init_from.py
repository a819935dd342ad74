"""Start a training run from existing weights: an HF checkpoint or a steadylm run directory.

This is what ``steadylm train --init-from DIR`` needs, as one object::

    init = init_from("llama-dir", activation="powlu")     # switch the activation, keep the weights
    trainer = Trainer(init.config, train_config, data, out, model_factory=init.factory)

``init.tokenizer_file`` is the source's ``tokenizer.json`` (the run's data must be encoded with it,
so its vocabulary matches the embedding). No code from the directory runs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from steadylm.errors import CheckpointError, ConfigError
from steadylm.models import ModelConfig, Transformer, build_model

__all__ = ["InitFrom", "init_from"]

# Changes that keep every imported tensor's shape (the mid-training switch, and run settings).
_SHAPE_NEUTRAL = {
    "activation", "activation_kwargs", "layer_activation_kwargs", "norm", "final_norm", "impl",
    "max_seq_len", "bhyt_kappa", "bhyt_lambda_attn", "bhyt_lambda_ffn", "bhyt_refresh_every",
    "dyt_alpha_attn", "dyt_alpha_other", "norm_eps", "router_bias_update_rate", "init_std",
}


@dataclass
class InitFrom:
    """Imported weights and the config to train them with."""

    config: ModelConfig
    state_dict: dict[str, Tensor]
    tokenizer_file: Path | None
    source: Path

    def factory(self, config: ModelConfig) -> Transformer:
        """``build_model(config)`` with the imported weights (a ``Trainer`` model factory).

        Parameters the source lacks (λ of a switched-in BHyT, α of DyT, LayerNorm biases) keep
        their initial values; c_ℓ is recomputed from the loaded W_V/W_O.
        """
        model = build_model(config)
        result = model.load_state_dict(self.state_dict, strict=False)
        if result.unexpected_keys:
            raise CheckpointError(f"--init-from {self.source}: weights the model does not have: "
                                  f"{result.unexpected_keys[:5]}")
        weights = [k for k in result.missing_keys if k.endswith(".weight") and "norm" not in k]
        if weights:
            raise CheckpointError(f"--init-from {self.source}: missing weights {weights[:5]}")
        return model


def init_from(source: str | os.PathLike[str], **changes: Any) -> InitFrom:
    """Read an HF model directory (Llama, Mistral, Qwen2, Qwen3, exported steadylm) or a steadylm
    run directory (e.g. from ``steadylm import``) and apply shape-neutral config ``changes``.

    Raises:
        ConfigError: a change that would alter tensor shapes (naming the field), or an
            unsupported architecture.
    """
    directory = Path(source).expanduser()
    shaped = sorted(set(changes) - _SHAPE_NEUTRAL)
    if shaped:
        raise ConfigError(f"--init-from cannot change {shaped}: they change the shapes of the imported "
                          f"weights; allowed: {sorted(_SHAPE_NEUTRAL)}")
    config_json = directory / "config.json"
    hf = False
    if config_json.is_file():
        try:
            hf = "architectures" in json.loads(config_json.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise CheckpointError(f"cannot read {config_json}: {err}") from None
    if hf:
        from steadylm.integrations.hf_format import import_hf

        config, state = import_hf(directory)
    else:
        from steadylm.train.checkpoint import find_checkpoint, load_checkpoint, read_checkpoint_state

        checkpoint = find_checkpoint(directory)
        if checkpoint is None:
            raise CheckpointError(f"--init-from {directory}: neither a Hugging Face model directory "
                                  "nor a steadylm run directory with a checkpoint")
        config = ModelConfig.from_dict(read_checkpoint_state(checkpoint).configs["model"])
        model = build_model(config)
        load_checkpoint(checkpoint, model, restore_rng=False)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if changes:
        config = config.replace(**changes)
    tokenizer = directory / "tokenizer.json"
    return InitFrom(config, state, tokenizer if tokenizer.is_file() else None, directory)
