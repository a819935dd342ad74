"""Modules: the gated FFN with a pluggable activation, and the norms, each behind a registry.

Every module runs the fused kernels by default and the float64-checkable reference math with
``impl="reference"``.
"""

from steadylm.nn._impl import IMPLS, check_impl, resolve_op
from steadylm.nn.activations import (
    ACTIVATIONS,
    Activation,
    ActivationSpec,
    GatedFFN,
    get_activation,
    register_activation,
)
from steadylm.nn.norms import NORMS, SATURATION_THRESHOLD, BHyT, DyT, LayerNorm, RMSNorm, build_norm, register_norm

__all__ = [
    "ACTIVATIONS",
    "IMPLS",
    "NORMS",
    "SATURATION_THRESHOLD",
    "Activation",
    "ActivationSpec",
    "BHyT",
    "DyT",
    "GatedFFN",
    "LayerNorm",
    "RMSNorm",
    "build_norm",
    "check_impl",
    "get_activation",
    "register_activation",
    "register_norm",
    "resolve_op",
]
