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
from steadylm.nn.norms import (
    NORM_SPECS,
    NORMS,
    SATURATION_THRESHOLD,
    NormSpec,
    BHyT,
    DyT,
    LayerNorm,
    RMSNorm,
    build_norm,
    get_norm_spec,
    register_norm,
    scalar_parameter,
    upgrade_scalar_entries,
)
from steadylm.nn.bhyt_pair import BHyTPair, full_tensor

__all__ = [
    "ACTIVATIONS",
    "IMPLS",
    "NORMS",
    "NORM_SPECS",
    "SATURATION_THRESHOLD",
    "NormSpec",
    "Activation",
    "ActivationSpec",
    "BHyT",
    "BHyTPair",
    "DyT",
    "GatedFFN",
    "LayerNorm",
    "RMSNorm",
    "build_norm",
    "check_impl",
    "full_tensor",
    "get_activation",
    "get_norm_spec",
    "register_activation",
    "register_norm",
    "resolve_op",
    "scalar_parameter",
    "upgrade_scalar_entries",
]
