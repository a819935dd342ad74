"""``bench model`` rows of the ``steadylm`` Hugging Face model type: HF ``generate`` tokens/s of
:class:`~steadylm.integrations.transformers.modeling.SteadyLMForCausalLM` (transformers' dynamic KV
cache, greedy) against the same-shape plain ``LlamaForCausalLM`` (the ``hf-llama`` row).

Two rows per dense preset, generation only (HF's eager path, as the ``hf-llama`` row):

* ``hf-steadylm:swiglu+rmsnorm`` — the same math as Llama, so its ratio to ``hf-llama`` is the cost
  of the wrapper (steadylm's modules driven through HF's cache);
* ``hf-steadylm:VARIANT`` for the other variants of the run that are PowLU or BHyT
  (``powlu+bhyt`` by default): the exported model type users run.

:func:`hf_generate_comparisons` adds the ratios to ``hf-llama`` (issue 17 asks >= 0.9 at batch 1
and 4) to the bench's comparisons.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["HF_STEADYLM", "build_hf_steadylm", "hf_generate_comparisons", "hf_steadylm_variants"]

#: Prefix of the rows' variant names: ``hf-steadylm:<activation>+<norm>``.
HF_STEADYLM = "hf-steadylm"


def hf_steadylm_variants(variants: Sequence[str], baseline: str) -> list[str]:
    """The variants that get an ``hf-steadylm`` row: the baseline (the wrapper's own cost) and
    ``powlu+bhyt`` when the run has it."""
    return [v for v in (baseline, "powlu+bhyt") if v in variants]


def build_hf_steadylm(preset: str, variant: str, device: torch.device, seed: int) -> nn.Module | None:
    """``SteadyLMForCausalLM`` of ``preset`` with ``variant``'s activation and norm (None when
    transformers is missing or the preset is MoE, for which there is no Llama row to compare with)."""
    from steadylm.models import ModelConfig

    activation, norm = variant.split("+")
    config = ModelConfig.from_preset(preset, activation=activation, norm=norm)
    if config.n_experts:
        return None
    try:
        from steadylm.integrations.transformers.modeling import SteadyLMConfig, SteadyLMForCausalLM
    except ImportError:
        return None
    torch.manual_seed(seed)
    model = SteadyLMForCausalLM(SteadyLMConfig(steadylm=config.to_dict())).to(device).eval()
    model.steadylm_after_load()  # RoPE tables on the device, c_ℓ from the weights
    return model


def hf_generate_comparisons(
    result: Any, paired_ratio: Callable[[Any, tuple[str, ...], tuple[str, ...]], list[float] | None],
    hf_llama: str,
) -> list[tuple[str, list[float]]]:
    """``(description, per-round ratios)`` of every ``hf-steadylm`` generate row over the
    ``hf-llama`` row of the same preset and batch (> 1: faster than plain Llama)."""
    out: list[tuple[str, list[float]]] = []
    variants = sorted({row.variant for row in result.rows if row.variant.startswith(HF_STEADYLM + ":")})
    for preset in result.config.presets:
        for b in result.config.gen_batches:
            m = f"generate-b{b}"
            for variant in variants:
                r = paired_ratio(result, (preset, variant, "eager", m), (preset, hf_llama, "eager", m))
                if r:
                    out.append((f"[{preset}] {m}: HF generate {variant} / {hf_llama} (target >= 0.9)", r))
    return out
