"""Start a training run from existing weights: an HF checkpoint or a steadylm run directory.

This is what ``steadylm train --init-from DIR`` needs, as one object::

    init = init_from("llama-dir", activation="powlu")     # switch the activation, keep the weights
    trainer = Trainer(init.config, train_config, data, out, model_factory=init.factory)

``init.tokenizer_file`` is the source's ``tokenizer.json`` (the run's data must be encoded with it,
so its vocabulary matches the embedding). The directory is read by
:func:`steadylm.train.model_dir.load_model_dir`; no code from it runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from steadylm.errors import ConfigError
from steadylm.models import ModelConfig, Transformer, build_model
from steadylm.train.model_dir import load_model_dir, load_weights

__all__ = ["SHAPE_NEUTRAL", "InitFrom", "init_from"]

#: Changes that keep every imported tensor's shape (the mid-training switch, and run settings).
SHAPE_NEUTRAL = frozenset({
    "activation", "activation_kwargs", "layer_activation_kwargs", "norm", "final_norm", "impl",
    "max_seq_len", "bhyt_kappa", "bhyt_lambda_attn", "bhyt_lambda_ffn", "bhyt_refresh_every",
    "dyt_alpha_attn", "dyt_alpha_other", "norm_eps", "router_bias_update_rate", "init_std",
})


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
        return load_weights(build_model(config), self.state_dict, Path(f"--init-from {self.source}"))


def init_from(source: str | os.PathLike[str], **changes: Any) -> InitFrom:
    """Read an HF model directory (Llama, Mistral, Qwen2, Qwen3, exported steadylm) or a steadylm
    run directory (e.g. from ``steadylm import``) and apply shape-neutral config ``changes``.

    Raises:
        ConfigError: a change that would alter tensor shapes (naming the field), or an
            unsupported architecture.
    """
    shaped = sorted(set(changes) - SHAPE_NEUTRAL)
    if shaped:
        raise ConfigError(f"--init-from cannot change {shaped}: they change the shapes of the imported "
                          f"weights; allowed: {sorted(SHAPE_NEUTRAL)}")
    loaded = load_model_dir(source)
    config = loaded.config.replace(**changes) if changes else loaded.config
    return InitFrom(config, loaded.state_dict, loaded.tokenizer_file, loaded.source)
