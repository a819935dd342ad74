"""The FP8 backends a run can pick (``train.fp8_backend``).

* ``steadylm``: :class:`~steadylm.precision.FP8Linear` — per-tensor current or delayed scaling, and
  the counters (overflow, underflow, amax, SNR) the lab reports.
* ``torchao``: torchao's float8 training (``convert_to_float8_training``) with one of its recipes
  (``tensorwise``, ``rowwise``, ``rowwise_with_gw_hp``) — what torchtitan uses; it composes with
  FSDP2 (tensorwise scaling all-gathers the weights in float8 when
  ``enable_fsdp_float8_all_gather`` is on, which :func:`apply_fp8_backend` sets for that recipe).
  No counters. An optional dependency (``pip install steadylm[fp8]``).

Both convert the same linears for a given ``scope`` (the FFN projections, or all but the head).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from steadylm.errors import ConfigError, check_choice
from steadylm.precision.apply import DEFAULT_EXCLUDE, _is_ffn_linear, apply_fp8

__all__ = ["FP8_BACKENDS", "TORCHAO_RECIPES", "apply_fp8_backend", "cpu_scaled_mm_takes_row_scales"]

FP8_BACKENDS = ("steadylm", "torchao")
TORCHAO_RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")


@functools.cache
def cpu_scaled_mm_takes_row_scales() -> bool:
    """Whether this torch's CPU ``torch._scaled_mm`` accepts per-row scales, which torchao's rowwise
    recipes call. torch 2.13 does; torch 2.11's CPU kernel asserts "only supports per-tensor scaling"
    (measured). Probed once with a 16×16 product rather than read off the version."""
    fp8 = torch.float8_e4m3fn
    a, b = torch.ones(16, 16).to(fp8), torch.ones(16, 16).to(fp8).t()  # b column-major, as torchao passes it
    try:
        torch._scaled_mm(a, b, scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16)
    except RuntimeError:
        return False
    return True


def _torchao_float8():
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as err:
        raise ConfigError(
            "train.fp8_backend 'torchao' needs torchao (pip install 'steadylm[fp8]' or pip install torchao); "
            f"import failed: {err}"
        ) from None
    return Float8LinearConfig, convert_to_float8_training


def apply_fp8_backend(model: nn.Module, *, backend: str = "steadylm", scope: str = "ffn",
                      scaling: str = "current", recipe: str = "tensorwise", fsdp: bool = False) -> list[str]:
    """Convert ``model``'s linears to FP8 in place with ``backend``; returns the converted names.

    ``scaling`` applies to the steadylm backend, ``recipe`` to torchao; ``fsdp`` turns on torchao's
    float8 all-gather (tensorwise only) for a model about to be sharded with FSDP2.
    """
    check_choice("train.fp8_backend", backend, FP8_BACKENDS)
    if backend == "steadylm":
        return apply_fp8(model, scope=scope, scaling=scaling)
    check_choice("train.fp8_recipe", recipe, TORCHAO_RECIPES)
    config_cls, convert = _torchao_float8()
    config = config_cls.from_recipe_name(recipe)
    if fsdp and recipe == "tensorwise":
        config = config_cls(enable_fsdp_float8_all_gather=True)
    converted: list[str] = []

    def keep(module: nn.Module, name: str) -> bool:
        if not isinstance(module, nn.Linear):
            return False
        wanted = _is_ffn_linear(name) if scope == "ffn" else name.split(".")[-1] not in DEFAULT_EXCLUDE
        # float8 matmuls need both dims divisible by 16 (torchao skips others with an error)
        wanted = wanted and module.in_features % 16 == 0 and module.out_features % 16 == 0
        if wanted:
            converted.append(name)
        return wanted

    convert(model, config=config, module_filter_fn=keep)
    return converted
