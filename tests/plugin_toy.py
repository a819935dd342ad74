"""A third-party plug-in for tests/test_plugins.py: one norm and one activation, registered the way
an outside package would (only public steadylm API, nothing in src/ names them).

``toynorm``: ``y = s · w ⊙ x / sqrt(mean(x²) + ε)`` with a learnable gain ``w`` and a learnable
scalar ``s`` (so its parameter count, ``dim + 1``, differs from RMSNorm's); ``ε`` comes from
``ModelConfig.norm_eps`` and ``s0`` differs between the attention and the FFN site.
``toyact``: ``act(gate, up) = tanh(β · gate) · up``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from steadylm.nn import ActivationSpec, register_activation, register_norm, scalar_parameter

#: s0 at the pre-attention site and elsewhere: the per-site constructor arguments a norm carries.
SCALE_ATTN, SCALE_OTHER = 0.5, 1.5


class ToyNorm(nn.Module):
    def __init__(self, dim: int, impl: str = "fused", eps: float = 1e-6, scale_init: float = 1.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.scale = scalar_parameter(scale_init)
        self.eps = eps
        self.impl = impl  # one implementation: the reference math below

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float() * self.scale.float()).to(x.dtype)


def _toy_site_kwargs(config, site):
    return {"eps": config.norm_eps, "scale_init": SCALE_ATTN if site == "attn" else SCALE_OTHER}


def toy_tanh_glu(gate: Tensor, up: Tensor, beta: float = 1.0) -> Tensor:
    math_dtype = torch.promote_types(gate.dtype, torch.float32)  # fp32 math, float64 stays float64
    return (torch.tanh(beta * gate.to(math_dtype)) * up.to(math_dtype)).to(gate.dtype)


def _validate(beta: float) -> None:
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")


register_norm("toynorm", ToyNorm, param_count=lambda dim: dim + 1, site_kwargs=_toy_site_kwargs)
register_activation(ActivationSpec("toyact", "toy_tanh_glu", {"beta": 1.0}, _validate, reference=toy_tanh_glu))
