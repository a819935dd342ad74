"""torchtitan configs with steadylm's PowLU and BHyT, for ``--module steadylm.integrations.torchtitan``.

::

    torchrun --nproc_per_node=8 -m torchtitan.train --module steadylm.integrations.torchtitan \\
        --config llama3_8b_powlu_bhyt

Each function is torchtitan's own Llama-3 config with every block switched by the ``bhyt``
override (PowLU FFN + BHyT pair), the model config made a :class:`SteadyLMLlama3Model.Config`
(c_ℓ's T and the refresh interval K follow the run's final ``training.seq_len`` /
``training.steps``, command-line flags included), and the two ``ModelSpec`` hooks an override
cannot set: ``post_optimizer_build_fn`` = :func:`register_bhyt_refresh` (c_ℓ every K optimizer
steps, counted from the optimizer state) and ``state_dict_adapter`` =
:class:`SteadyLMLlama3StateDictAdapter` (HF checkpoints keep λ and c_ℓ). Every other torchtitan
flag still applies (``--training.steps``, ``--parallelism.*``, ``--compile.*``, float8 ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torchtitan.config import derive
from torchtitan.models.llama3 import config_registry as llama3
from torchtitan.models.llama3.model import Llama3Model

from steadylm.integrations.torchtitan.bhyt import (
    SteadyLMBHyTBlock,
    SteadyLMLlama3StateDictAdapter,
    bhyt,
    register_bhyt_refresh,
)
from steadylm.models.config import default_refresh_interval

__all__ = ["SteadyLMLlama3Model", "llama3_8b_powlu_bhyt", "llama3_debugmodel_powlu_bhyt", "with_powlu_bhyt"]


class SteadyLMLlama3Model(Llama3Model):
    """torchtitan's ``Llama3Model``, unchanged, whose config keeps its BHyT blocks' c_ℓ settings in
    step with the trainer's final config.

    c_ℓ = ‖W_V W_O‖_F² / (T·d) with T "the training context length" (SPEC §2, BHyT block, item 4):
    a constant of the run, not of a batch. A config function runs before torchtitan applies the
    command line, so ``--training.seq_len`` is only known in ``update_from_config`` (called by the
    ``Trainer`` before the model is built); there every :class:`SteadyLMBHyTBlock` gets
    ``context_length = training.seq_len`` and, unless ``bhyt_refresh_every`` is set,
    ``refresh_every`` = SPEC's K = ``max(1, min(1000, training.steps // 50))``. torchtitan's text
    dataloaders pack documents into rows of exactly ``training.seq_len`` tokens, so the batches'
    length is T (context parallelism splits a row across ranks; T stays the row's length)."""

    @dataclass(kw_only=True, slots=True)
    class Config(Llama3Model.Config):
        bhyt_refresh_every: int | None = None  # K; None: SPEC's default from training.steps

        def update_from_config(self, *, config: Any, **kwargs: Any) -> None:
            Llama3Model.Config.update_from_config(self, config=config, **kwargs)
            training = getattr(config, "training", None)
            if training is None:  # a non-trainer caller (only parallelism given)
                return
            refresh_every = self.bhyt_refresh_every or default_refresh_interval(training.steps)
            for layer in self.layers:
                if isinstance(layer, SteadyLMBHyTBlock.Config):
                    layer.context_length = int(training.seq_len)
                    layer.refresh_every = int(refresh_every)


def with_powlu_bhyt(config: Any, *, m: float = 3.0, refresh_every: int | None = None, impl: str = "fused") -> Any:
    """``config`` (a torchtitan ``Trainer.Config`` of a Llama-3 model) with PowLU + BHyT blocks.

    ``refresh_every``: K, c_ℓ's refresh interval in optimizer steps (None: SPEC's default from the
    run's ``training.steps``)."""
    spec = config.model_spec
    blocks = [bhyt(layer, context_length=config.training.seq_len,
                   refresh_every=refresh_every or default_refresh_interval(config.training.steps),
                   impl=impl, activation="powlu", activation_kwargs={"m": m})
              for layer in spec.model.layers]
    spec.model = derive(spec.model, SteadyLMLlama3Model.Config, bhyt_refresh_every=refresh_every)
    spec.model.layers = blocks
    spec.post_optimizer_build_fn = register_bhyt_refresh
    spec.state_dict_adapter = SteadyLMLlama3StateDictAdapter
    return config


def llama3_debugmodel_powlu_bhyt() -> Any:
    """torchtitan's ``llama3_debugmodel`` (6 × 256) with PowLU + BHyT (c_ℓ every 5 steps)."""
    return with_powlu_bhyt(llama3.llama3_debugmodel(), refresh_every=5)


def llama3_8b_powlu_bhyt() -> Any:
    """torchtitan's ``llama3_8b`` with PowLU + BHyT."""
    return with_powlu_bhyt(llama3.llama3_8b())
