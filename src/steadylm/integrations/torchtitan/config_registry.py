"""torchtitan configs with steadylm's PowLU and BHyT, for ``--module steadylm.integrations.torchtitan``.

::

    torchrun --nproc_per_node=8 -m torchtitan.train --module steadylm.integrations.torchtitan \\
        --config llama3_8b_powlu_bhyt

Each function is torchtitan's own Llama-3 config with every block switched by the ``bhyt``
override (PowLU FFN + BHyT pair, c_ℓ's T = ``training.seq_len``), and the two ``ModelSpec``
hooks an override cannot set: ``post_optimizer_build_fn`` = :func:`register_bhyt_refresh` (c_ℓ every
``refresh_every`` optimizer steps, counted from the optimizer state) and ``state_dict_adapter`` =
:class:`SteadyLMLlama3StateDictAdapter` (HF checkpoints keep λ and c_ℓ). Every other torchtitan
flag still applies (``--training.steps``, ``--parallelism.*``, ``--compile.*``, float8 ...).
"""

from __future__ import annotations

from typing import Any

from torchtitan.models.llama3 import config_registry as llama3

from steadylm.integrations.torchtitan.bhyt import SteadyLMLlama3StateDictAdapter, bhyt, register_bhyt_refresh

__all__ = ["llama3_8b_powlu_bhyt", "llama3_debugmodel_powlu_bhyt", "with_powlu_bhyt"]


def with_powlu_bhyt(config: Any, *, m: float = 3.0, refresh_every: int = 100, impl: str = "fused") -> Any:
    """``config`` (a torchtitan ``Trainer.Config`` of a Llama-3 model) with PowLU + BHyT blocks."""
    spec = config.model_spec
    spec.model.layers = [bhyt(layer, context_length=config.training.seq_len, refresh_every=refresh_every,
                              impl=impl, activation="powlu", activation_kwargs={"m": m})
                         for layer in spec.model.layers]
    spec.post_optimizer_build_fn = register_bhyt_refresh
    spec.state_dict_adapter = SteadyLMLlama3StateDictAdapter
    return config


def llama3_debugmodel_powlu_bhyt() -> Any:
    """torchtitan's ``llama3_debugmodel`` (6 × 256) with PowLU + BHyT."""
    return with_powlu_bhyt(llama3.llama3_debugmodel(), refresh_every=5)


def llama3_8b_powlu_bhyt() -> Any:
    """torchtitan's ``llama3_8b`` with PowLU + BHyT."""
    return with_powlu_bhyt(llama3.llama3_8b())
