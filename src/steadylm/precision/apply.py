"""Swap a model's linears for :class:`FP8Linear` and read their counters.

- :func:`apply_fp8` — in place, returns the converted module names;
- :func:`fp8_stats` — every FP8 tensor's counters as flat ``dict[str, float]`` (one host sync);
- :class:`FP8Probe` — the same numbers through the trainer's probe contract
  (``begin_step``/``end_step``, docs/ARCHITECTURE.md).
"""

from __future__ import annotations


import torch
from torch import nn

from steadylm.errors import ConfigError, check_choice
from steadylm.precision.linear import (
    ROLES,
    SCALINGS,
    STATS_MODES,
    Col,
    FP8Linear,
    _snr_db,
    sum_counters_over_ranks,
)

__all__ = ["apply_fp8", "fp8_modules", "fp8_stats", "reset_fp8_stats", "FP8Probe", "SCOPES", "FFN_LINEARS"]

SCOPES = ("ffn", "all")
# The gated-FFN projections (steadylm.nn.GatedFFN: dense FFNs and MoE shared experts).
FFN_LINEARS = ("w_gate", "w_up", "w_down")
# Linears left in high precision under scope="all": the output head (vocab logits), which
# torchtitan's float8 recipe also keeps out (the MoE router is a plain Parameter, not a Linear).
DEFAULT_EXCLUDE = ("lm_head",)


def _is_ffn_linear(qualified_name: str) -> bool:
    """``...ffn.w_down`` (a GatedFFN or shared expert) or ``...experts.w_down.3`` (routed expert 3,
    one ``nn.Linear`` per expert in an ``nn.ModuleList``)."""
    parts = qualified_name.split(".")
    if parts[-1] in FFN_LINEARS:
        return True
    return len(parts) >= 2 and parts[-1].isdigit() and parts[-2] in FFN_LINEARS


def apply_fp8(
    model: nn.Module,
    scope: str = "ffn",
    scaling: str = "current",
    history_len: int = 16,
    stats: str = "sampled",
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE,
) -> list[str]:
    """Replace ``nn.Linear`` modules of ``model`` by :class:`FP8Linear` in place.

    ``scope="ffn"``: the ``w_gate``/``w_up``/``w_down`` projections of every gated FFN — dense
    layers, MoE shared experts and routed experts (one ``nn.Linear`` per expert). Attention and the
    output head stay in bf16. ``scope="all"``: every ``nn.Linear`` except those whose own name is in
    ``exclude`` (default: the output head; the MoE router is a plain parameter, never converted).
    Weights are shared, not copied. Returns the converted module names.
    """
    check_choice("fp8_scope", scope, SCOPES)
    check_choice("fp8_scaling", scaling, SCALINGS)
    check_choice("fp8 stats", stats, STATS_MODES)
    targets: list[tuple[nn.Module, str, str]] = []
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            if type(child) is not nn.Linear:  # FP8Linear (already converted) and other subclasses skip
                continue
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if scope == "ffn" and not _is_ffn_linear(full):
                continue
            if scope == "all" and child_name in exclude:
                continue
            targets.append((parent, child_name, full))
    if not targets and not any(isinstance(m, FP8Linear) for m in model.modules()):
        raise ConfigError(f"fp8_scope={scope!r} matched no nn.Linear in {type(model).__name__}")
    for parent, child_name, _ in targets:
        setattr(
            parent,
            child_name,
            FP8Linear.from_linear(getattr(parent, child_name), scaling=scaling, history_len=history_len, stats=stats),
        )
    return [full for _, _, full in targets]


def fp8_modules(model: nn.Module) -> list[tuple[str, FP8Linear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, FP8Linear)]


def reset_fp8_stats(model: nn.Module) -> None:
    for _, m in fp8_modules(model):
        m.reset_fp8_stats()


def fp8_stats(model: nn.Module, reset: bool = False, per_module: bool = True) -> dict[str, float]:
    """Counters of every FP8 tensor of ``model`` since the last reset, as flat metric keys.

    Per module and role (``input``/``weight``/``grad_output``), when ``per_module``:
    ``fp8/<module>/<role>/{overflow,underflow,amax,snr_db}``. Always, per role over all modules:
    ``fp8/<role>/{numel,overflow,underflow,overflow_frac,underflow_frac,amax,snr_db}`` (snr over all
    elements: Σsignal/Σnoise; amax the maximum), and ``fp8/overflow``, ``fp8/underflow`` totals.
    An empty dict for a model without FP8 layers. One device-to-host copy. Under
    torch.distributed the counts cover every rank's shard of the batch (collective: call it on
    every rank).
    """
    mods = fp8_modules(model)
    if not mods:
        return {}
    # [modules, roles, fields]
    table = sum_counters_over_ranks(torch.stack([m.fp8_counters.detach() for _, m in mods])).cpu()
    if reset:
        reset_fp8_stats(model)
    out: dict[str, float] = {}
    rows = table.tolist()
    if per_module:
        for (name, m), mod_rows in zip(mods, rows):
            for role, r in zip(ROLES, mod_rows):
                key = f"fp8/{name}/{role}"
                out[f"{key}/overflow"] = r[Col.OVERFLOW]
                out[f"{key}/underflow"] = r[Col.UNDERFLOW]
                out[f"{key}/amax"] = r[Col.AMAX]
                out[f"{key}/snr_db"] = _snr_db(r[Col.SIGNAL], r[Col.NOISE])
    tot = table.sum(0)  # [roles, fields]
    amax = table[:, :, Col.AMAX].amax(0)
    for ri, role in enumerate(ROLES):
        t = tot[ri].tolist()
        numel = t[Col.NUMEL]
        out[f"fp8/{role}/numel"] = numel  # elements quantised: what the counts are out of
        out[f"fp8/{role}/overflow"] = t[Col.OVERFLOW]
        out[f"fp8/{role}/underflow"] = t[Col.UNDERFLOW]
        out[f"fp8/{role}/overflow_frac"] = t[Col.OVERFLOW] / numel if numel else 0.0
        out[f"fp8/{role}/underflow_frac"] = t[Col.UNDERFLOW] / numel if numel else 0.0
        out[f"fp8/{role}/amax"] = float(amax[ri])
        out[f"fp8/{role}/snr_db"] = _snr_db(t[Col.SIGNAL], t[Col.NOISE])
    out["fp8/overflow"] = float(tot[:, Col.OVERFLOW].sum())
    out["fp8/underflow"] = float(tot[:, Col.UNDERFLOW].sum())
    return out


class FP8Probe:
    """Probe (docs/ARCHITECTURE.md contract) that logs :func:`fp8_stats` every ``every`` steps.

    Overflow/underflow/amax counters accumulate over every training step in between (nothing is
    lost between samples) and are reset when read, so each logged row covers the steps since the
    previous one. The quantisation SNR of ``stats="sampled"`` layers is measured on the sampled
    step only (the probe asks for it in ``begin_step``).
    """

    def __init__(self, every: int = 1, per_module: bool = True) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ConfigError(f"FP8Probe every must be an integer >= 1, got {every!r}")
        self.every = every
        self.per_module = per_module

    def begin_step(self, step: int, model: nn.Module) -> None:
        if step % self.every == 0:
            for _, m in fp8_modules(model):
                m.snr_requested = True

    def end_step(self, step: int, model: nn.Module) -> dict[str, float]:
        if step % self.every:
            return {}
        for _, m in fp8_modules(model):
            m.snr_requested = False
        return fp8_stats(model, reset=True, per_module=self.per_module)
