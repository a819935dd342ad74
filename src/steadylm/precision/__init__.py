"""FP8 training: ``FP8Linear`` (e4m3 forward, e5m2 gradients, through ``torch._scaled_mm``),
``apply_fp8`` to swap a model's linears in place, and the per-tensor counters
(``fp8_stats``, ``FP8Probe``). See ``formats.py`` for the numbers and the ``_scaled_mm`` contract."""

from steadylm.precision.apply import (
    FFN_LINEARS,
    SCOPES,
    FP8Probe,
    apply_fp8,
    fp8_modules,
    fp8_stats,
    reset_fp8_stats,
)
from steadylm.precision.backends import FP8_BACKENDS, TORCHAO_RECIPES, apply_fp8_backend
from steadylm.precision.formats import E4M3, E5M2, FP8Format, fp8_mm
from steadylm.precision.linear import ROLES, SCALINGS, FP8Linear, quantize

__all__ = [
    "E4M3",
    "E5M2",
    "FP8_BACKENDS",
    "TORCHAO_RECIPES",
    "apply_fp8_backend",
    "FFN_LINEARS",
    "FP8Format",
    "FP8Linear",
    "FP8Probe",
    "ROLES",
    "SCALINGS",
    "SCOPES",
    "apply_fp8",
    "fp8_mm",
    "fp8_modules",
    "fp8_stats",
    "quantize",
    "reset_fp8_stats",
]
