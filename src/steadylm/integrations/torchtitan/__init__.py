"""steadylm's activations inside torchtitan (PyPI ``torchtitan`` 0.3.x, Python >= 3.11), through
torchtitan's own extension point: config overrides loaded with ``--override.imports``.

::

    torchrun --nproc_per_node=8 -m torchtitan.train --module llama3 --config llama3_8b \\
        --override.imports 'steadylm.integrations.torchtitan.overrides.powlu={"m": 3.0}'

:func:`~steadylm.integrations.torchtitan.overrides.powlu` and ``overrides.swiglu_clip`` are ``@override`` factories targeting torchtitan's
``FeedForward.Config``: before the model is built, every FFN config (or those whose FQN matches
``fqns``) becomes a :class:`SteadyLMFeedForward.Config` with the same ``w1`` (gate), ``w3`` (up) and
``w2`` (down) linears — so parameter names, initialisation, FSDP/TP sharding declarations and
torchtitan's Hugging Face state-dict adapter are unchanged — and the forward runs steadylm's fused
gated op ``w2(act(w1 x, w3 x))`` instead of ``w2(silu(w1 x) * w3 x)``.

Not here yet (see the README): the BHyT block (the BHyT pair in place of the two RMSNorms with the
c_ℓ refresh after optimizer steps).
"""

from __future__ import annotations

from steadylm.integrations.torchtitan.bhyt import (
    SteadyLMBHyTBlock,
    SteadyLMLlama3StateDictAdapter,
    register_bhyt_refresh,
)
from steadylm.integrations.torchtitan.overrides import SteadyLMFeedForward, powlu, swiglu_clip

__all__ = ["SteadyLMBHyTBlock", "SteadyLMFeedForward", "SteadyLMLlama3StateDictAdapter", "powlu",
           "register_bhyt_refresh", "swiglu_clip"]
