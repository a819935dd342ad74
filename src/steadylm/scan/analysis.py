"""What ``steadylm scan`` measures on a trained checkpoint, as plain functions returning dicts.

Everything runs on a steadylm :class:`~steadylm.models.Transformer` (an HF checkpoint is imported
first, :func:`steadylm.models.hf_format.import_hf`), in eval mode without gradients:

* :func:`probe_metrics` — the lab's :class:`~steadylm.probes.StabilityProbe` over the whole text
  (one sampled "step"): per-layer FFN down-projection input statistics, hidden-state L2/variance
  after each block, tanh saturation, λ/α, BHyT v′ vs mean(h²). Keys as in the training metrics.
* :func:`outlier_channels` — per layer, the channel with the largest |value| of the FFN
  down-projection input and of the block output (the residual stream's "massive activations"),
  and how far it stands above the median channel.
* :func:`attention_max_logits` — per layer, the largest pre-softmax attention logit q·k/√d.
* :func:`fp8_risk` — every linear layer's input quantised to e4m3 with per-tensor current scaling
  (SPEC §4): overflow and underflow fractions and the quantisation SNR.
* :func:`what_if` — the same weights with the gate switched (PowLU, SwiGLU-Clip): how much the
  down-projection outliers shrink and how far the output distribution moves (KL on the text).
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from steadylm.models import Attention, Transformer
from steadylm.precision.formats import E4M3
from steadylm.precision.linear import COUNTER_FIELDS, Col, quantize
from steadylm.probes import StabilityProbe

__all__ = [
    "attention_max_logits",
    "batches",
    "fp8_risk",
    "outlier_channels",
    "probe_metrics",
    "what_if",
]


def batches(tokens: Tensor, batch_size: int) -> Iterator[Tensor]:
    """``tokens`` ``[windows, seq]`` in batches of ``batch_size`` windows."""
    for start in range(0, tokens.shape[0], batch_size):
        yield tokens[start : start + batch_size]


def _forward_with_hooks(model: nn.Module, tokens: Tensor, batch_size: int, handles: list[Any]) -> None:
    """Run the text through ``model`` (eval mode, in batches) once, then remove ``handles``
    (the hooks that took the measurement), also when the forward fails."""
    model.eval()
    try:
        for batch in batches(tokens, batch_size):
            model(batch)
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def probe_metrics(model: Transformer, tokens: Tensor, batch_size: int = 4) -> dict[str, float]:
    """The :class:`StabilityProbe` readings over every window of ``tokens`` (one pooled sample)."""
    probe = StabilityProbe(every=1, grad_stats=False, keep_samples=0)
    model.eval()
    probe.begin_step(1, model)
    try:
        for batch in batches(tokens, batch_size):
            model(batch)
    finally:
        metrics = probe.end_step(1, model)
    return metrics


def _down_inputs(model: Transformer) -> Iterator[tuple[int, str, nn.Module]]:
    for i, block in enumerate(model.layers):
        ffn = block.ffn
        experts = getattr(ffn, "experts", None)
        if experts is not None:
            yield i, "routed", experts.down_input
            if getattr(ffn, "shared_expert", None) is not None:
                yield i, "shared", ffn.shared_expert.down_input
        else:
            yield i, "", ffn.down_input


@torch.no_grad()
def outlier_channels(model: Transformer, tokens: Tensor, batch_size: int = 4) -> list[dict[str, Any]]:
    """Per layer (and MoE part): the top channel of the FFN down-projection input and of the
    block output, by max |value| over every token, with its ratio to the median channel's."""
    amax: dict[tuple[str, int, str], Tensor] = {}

    def track(key: tuple[str, int, str]):
        def hook(_module: nn.Module, _args: Any, output: Tensor) -> None:
            per_channel = output.detach().float().abs().reshape(-1, output.shape[-1]).amax(dim=0)
            amax[key] = per_channel if key not in amax else torch.maximum(amax[key], per_channel)
        return hook

    handles = [m.register_forward_hook(track(("ffn_down_in", i, part))) for i, part, m in _down_inputs(model)]
    handles += [b.register_forward_hook(track(("hidden", i, ""))) for i, b in enumerate(model.layers)]
    _forward_with_hooks(model, tokens, batch_size, handles)
    rows = []
    for (family, layer, part), values in sorted(amax.items(), key=lambda kv: (kv[0][1], kv[0][0], kv[0][2])):
        top = int(values.argmax())
        median = float(values.median())
        rows.append({
            "family": family, "layer": layer, "part": part, "channel": top,
            "amax": float(values[top]), "median_channel_amax": median,
            "ratio": float(values[top]) / median if median > 0 else math.inf,
        })
    return rows


@torch.no_grad()
def attention_max_logits(model: Transformer, tokens: Tensor, batch_size: int = 4) -> dict[int, float]:
    """Per layer, the largest causal attention logit ``q·k / √head_dim`` over the text."""
    result: dict[int, float] = defaultdict(lambda: -math.inf)

    def track(layer: int):
        def hook(attn: Attention, args: tuple[Any, ...], _output: Any) -> None:
            x, cos, sin = args[:3]
            result[layer] = max(result[layer], float(attn.causal_logits(x, cos, sin).max()))
        return hook

    handles = [block.attn.register_forward_hook(track(i)) for i, block in enumerate(model.layers)]
    _forward_with_hooks(model, tokens, batch_size, handles)
    return dict(sorted(result.items()))


@torch.no_grad()
def fp8_risk(model: Transformer, tokens: Tensor, batch_size: int = 4) -> list[dict[str, Any]]:
    """Every ``nn.Linear`` input quantised to e4m3 with per-tensor current scaling (scale =
    448/amax per call): overflow and underflow fractions (of all elements), SNR in dB, amax."""
    counters: dict[str, Tensor] = {}

    def track(name: str):
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            row = counters.setdefault(name, torch.zeros(len(COUNTER_FIELDS), dtype=torch.float64))
            quantize(args[0].detach().reshape(-1, args[0].shape[-1]), E4M3, None, row, measure_snr=True)
        return hook

    handles = [m.register_forward_pre_hook(track(name)) for name, m in model.named_modules()
               if isinstance(m, nn.Linear)]
    _forward_with_hooks(model, tokens, batch_size, handles)
    rows = []
    for name, r in counters.items():
        numel = float(r[Col.NUMEL])
        signal, noise = float(r[Col.SIGNAL]), float(r[Col.NOISE])
        rows.append({
            "module": name,
            "overflow_frac": float(r[Col.OVERFLOW]) / numel if numel else 0.0,
            "underflow_frac": float(r[Col.UNDERFLOW]) / numel if numel else 0.0,
            "snr_db": 10 * math.log10(signal / noise) if noise > 0 and signal > 0 else math.inf,
            "amax": float(r[Col.AMAX]),
        })
    return rows


@torch.no_grad()
def _log_probs(model: Transformer, tokens: Tensor, batch_size: int) -> Tensor:
    return torch.cat([F.log_softmax(model(b).float(), dim=-1) for b in batches(tokens, batch_size)])


@torch.no_grad()
def what_if(model: Transformer, tokens: Tensor, switches: dict[str, dict[str, Any]],
            batch_size: int = 4) -> dict[str, dict[str, Any]]:
    """For each ``{activation: kwargs}``: the model with every FFN gate switched (same weights).

    Returns per switch: ``metrics`` (the :func:`probe_metrics` of the switched model), ``kl``
    (mean over tokens of KL(p_original ‖ p_switched), nats), ``top1_agree`` (share of tokens
    whose most likely next token is unchanged).
    """
    model.eval()
    base = _log_probs(model, tokens, batch_size)
    out: dict[str, dict[str, Any]] = {}
    for activation, kwargs in switches.items():
        switched = copy.deepcopy(model)
        switched.set_activation(activation, **kwargs)
        logp = _log_probs(switched, tokens, batch_size)
        kl = (base.exp() * (base - logp)).sum(-1).mean()
        agree = (base.argmax(-1) == logp.argmax(-1)).float().mean()
        out[activation] = {
            "kwargs": dict(kwargs),
            "metrics": probe_metrics(switched, tokens, batch_size),
            "kl": float(kl),
            "top1_agree": float(agree),
        }
    return out
