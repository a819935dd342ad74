"""torchtitan ``FeedForward`` with a steadylm gated activation, and its ``@override`` factories."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed.tensor import DTensor, Partial, Replicate
from torchtitan.config import derive, override
from torchtitan.models.common.feed_forward import FeedForward

from steadylm.nn import get_activation

__all__ = ["SteadyLMFeedForward", "powlu", "swiglu_clip"]


class SteadyLMFeedForward(FeedForward):
    """``w2(act(w1 x, w3 x))`` with ``act`` a steadylm gated activation (``steadylm.nn.ACTIVATIONS``).

    A :class:`FeedForward` subclass (same ``w1``/``w2``/``w3`` children, so the same state-dict
    keys, ``param_init`` and ``sharding_config``; ``isinstance(m, FeedForward)`` checks in
    torchtitan's parallelize functions still hold). ``impl``: steadylm's fused op (one pass, recompute
    in backward) or the reference math. The activation's arguments are validated when the module
    is built (a ``ConfigError`` names the bad one).
    """

    @dataclass(kw_only=True, slots=True)
    class Config(FeedForward.Config):
        activation: str = "powlu"
        activation_kwargs: dict[str, Any] = field(default_factory=dict)
        impl: str = "fused"

    def __init__(self, config: Config):
        super().__init__(config)
        self.activation = config.activation
        self.act = get_activation(config.activation, config.impl, **config.activation_kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w1(x), self.w3(x)
        if isinstance(gate, DTensor):
            return self.w2(self._act_local(gate, up))
        return self.w2(self.act(gate, up))

    def _act_local(self, gate: DTensor, up: DTensor) -> DTensor:
        """The activation on torchtitan's tensor-parallel hidden activations (DTensor backends; the
        hidden dimension column-sharded): elementwise, so it runs on each rank's shard as it is.
        The fused ops flatten their inputs first, which on a DTensor sharded on the hidden
        dimension would all-gather it (and a steadylm custom op has no DTensor rule); on the local
        tensors nothing moves."""
        placements = [Replicate() if isinstance(p, Partial) else p for p in gate.placements]
        if tuple(placements) != tuple(gate.placements):
            gate = gate.redistribute(placements=placements)
        if tuple(up.placements) != tuple(placements):
            up = up.redistribute(placements=placements)
        out = self.act(gate.to_local(), up.to_local())
        return DTensor.from_local(out, gate.device_mesh, placements, run_check=False)


def _replace(cfg: FeedForward.Config, activation: str, impl: str, kwargs: dict[str, Any]) -> SteadyLMFeedForward.Config:
    get_activation(activation, impl, **kwargs)  # a bad argument fails while the config is built
    return derive(cfg, SteadyLMFeedForward.Config, activation=activation, activation_kwargs=dict(kwargs), impl=impl)


@override(target=FeedForward.Config, exact=True, description="steadylm PowLU in the FFN (gate w1, up w3)")
def powlu(cfg: FeedForward.Config, *, m: float | None = None, impl: str = "fused") -> SteadyLMFeedForward.Config:
    """Every matched ``FeedForward`` runs PowLU (``m``: the power; steadylm's default when omitted).
    ``exact=True``: only the stock SwiGLU FFN, not subclasses with their own forward."""
    return _replace(cfg, "powlu", impl, {} if m is None else {"m": m})


@override(target=FeedForward.Config, exact=True, description="steadylm SwiGLU-Clip in the FFN")
def swiglu_clip(cfg: FeedForward.Config, *, impl: str = "fused", **kwargs: Any) -> SteadyLMFeedForward.Config:
    """Every matched ``FeedForward`` runs SwiGLU-Clip (``limit``, ``alpha``, ``variant`` as in
    :func:`steadylm.functional.swiglu_clip`)."""
    return _replace(cfg, "swiglu_clip", impl, kwargs)
