"""steadylm inside torchtitan (PyPI ``torchtitan`` 0.3.x, Python >= 3.11), through torchtitan's own
extension points.

* FFN only — config overrides on torchtitan's ``FeedForward.Config``
  (:mod:`~steadylm.integrations.torchtitan.overrides`)::

      torchrun --nproc_per_node=8 -m torchtitan.train --module llama3 --config llama3_8b \\
          --override.imports 'steadylm.integrations.torchtitan.overrides.powlu={"m": 3.0}'

  every FFN keeps its ``w1`` (gate), ``w3`` (up), ``w2`` (down) — parameter names, initialisation,
  sharding declarations and the HF adapter are torchtitan's — and runs steadylm's fused gated op.
* PowLU + the BHyT block — a config module (:mod:`~steadylm.integrations.torchtitan.config_registry`)::

      torchrun --nproc_per_node=8 -m torchtitan.train --module steadylm.integrations.torchtitan \\
          --config llama3_8b_powlu_bhyt

  torchtitan's Llama-3 blocks become :class:`SteadyLMBHyTBlock` (the BHyT pair in place of the two
  RMSNorms, one statistic per block; each site a :class:`SteadyLMBHyT`, a torchtitan ``Module``
  whose λ is declared to torchtitan's sharding plans) with c_ℓ refreshed after optimizer steps
  (``ModelSpec.post_optimizer_build_fn`` = :func:`register_bhyt_refresh`; T and the interval follow
  ``--training.seq_len`` / ``--training.steps``) and an HF state-dict adapter that keeps λ and c_ℓ
  (:class:`SteadyLMLlama3StateDictAdapter`). The ``bhyt`` override
  (:mod:`~steadylm.integrations.torchtitan.bhyt`) is the same block switch for
  ``--override.imports``, without those two ``ModelSpec`` hooks (pass ``context_length``).
"""

from __future__ import annotations

from steadylm.integrations.torchtitan.bhyt import (
    SteadyLMBHyT,
    SteadyLMBHyTBlock,
    SteadyLMLlama3StateDictAdapter,
    register_bhyt_refresh,
)
from steadylm.integrations.torchtitan.overrides import SteadyLMFeedForward, powlu, swiglu_clip

__all__ = ["SteadyLMBHyT", "SteadyLMBHyTBlock", "SteadyLMFeedForward", "SteadyLMLlama3StateDictAdapter", "powlu",
           "register_bhyt_refresh", "swiglu_clip"]
