"""The hook-based stability probe the trainer calls around each step.

It implements the train ↔ probes contract of docs/ARCHITECTURE.md::

    probe.begin_step(step, model)             # before the forward: register hooks if sampling
    probe.end_step(step, model) -> dict       # after backward: remove hooks, return flat metrics

On a sampled step (step 1 and every ``every``-th) it records, per layer ``i`` (keys are flat strings):

================================================  ===============================================
``ffn_down_in/layer{i}/{stat}``                    FFN down-projection input (activation output)
``grad_gate_out/layer{i}/{stat}``                  gradient of W_gate x
``grad_up_out/layer{i}/{stat}``                    gradient of W_up x
``hidden/layer{i}/l2``, ``hidden/layer{i}/var``    block output: mean over tokens of the L2 norm
                                                   and of the variance over the hidden dim
``sat/layer{i}/{attn_norm|ffn_norm}``, ``sat/final_norm``
                                                   tanh saturation (fraction of |tanh| > 0.95),
                                                   DyT / BHyT sites only
``lam/...``, ``alpha/...``                          the BHyT λ / DyT α of the same sites
``embed_scale``                                    DyT models: the scalar on the embedding output
``bhyt/layer{i}/{v_approx|v_true|pearson_r}``      BHyT blocks: mean approximated second-site
                                                   mean square v', the true mean(h²), and their
                                                   Pearson r over the step's tokens
``moe/layer{i}/{load_max|load_min|load_cv}``       MoE layers: routed-slot load per expert
``probe/overhead_ms``                              wall time the probe itself spent this step
================================================  ===============================================

``{stat}`` is one of :data:`steadylm.probes.stats.STAT_NAMES` (kurtosis is Pearson's, normal = 3).
In MoE layers the FFN keys carry a ``/routed`` or ``/shared`` part after the layer
(``ffn_down_in/layer3/routed/p99``), so routed and shared experts are kept apart.

Probe points are the ``nn.Identity`` modules ``gate_out``, ``up_out`` and ``down_input`` of each
``GatedFFN`` (and of the vectorised routed experts); gradients are caught with tensor hooks
registered, during the forward, on the outputs of ``gate_out`` / ``up_out``. Tensors are only
referenced during the step and reduced in :meth:`StabilityProbe.end_step`, in fp32 on their
device; nothing is registered on steps that are not sampled, so those cost nothing.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from steadylm.probes import keys as K
from steadylm.probes.stats import (
    DEFAULT_MAX_QUANTILE_ELEMS,
    pearson_r,
    tensor_stats,
    token_l2_and_variance,
)

_NORM_SITES = ("attn_norm", "ffn_norm")
_FINAL_NORM_NAMES = ("final_norm", "norm_f", "norm", "ln_f")


def _first_tensor(obj: Any) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, (tuple, list)) and obj and isinstance(obj[0], torch.Tensor):
        return obj[0]
    return None


def _ffn_parts(ffn: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(part, module-with-probe-points): ("", ffn) for a dense FFN, routed/shared for an MoE."""
    experts = getattr(ffn, "experts", None)
    if experts is not None:
        if hasattr(experts, "down_input"):
            yield "routed", experts
        shared = getattr(ffn, "shared_expert", None)
        if shared is not None and hasattr(shared, "down_input"):
            yield "shared", shared
    elif hasattr(ffn, "down_input"):
        yield "", ffn


def final_norm_of(model: nn.Module) -> nn.Module | None:
    for name in _FINAL_NORM_NAMES:
        mod = getattr(model, name, None)
        if isinstance(mod, nn.Module):
            return mod
    return None


def _scalar(p: Any) -> float | None:
    if isinstance(p, torch.Tensor) and p.numel() == 1:
        return float(p.detach().float())
    if isinstance(p, (int, float)):
        return float(p)
    return None


class StabilityProbe:
    """Samples the stability statistics of SPEC §5 every ``every`` steps.

    Parameters
    ----------
    every:
        sample on step 1 (the first, at initialisation) and on steps with ``step % every == 0``.
    grad_stats:
        also record the gate/up output gradients (needs a backward between begin and end).
    max_quantile_elems:
        percentiles above this many elements use a deterministic strided subsample.
    keep_samples:
        on each sampled step, keep up to this many (v_approx, v_true) token pairs per BHyT
        layer in :attr:`samples` (the last sampled step wins) for scatter plots.
    """

    def __init__(
        self,
        every: int = 10,
        grad_stats: bool = True,
        max_quantile_elems: int = DEFAULT_MAX_QUANTILE_ELEMS,
        keep_samples: int = 512,
    ) -> None:
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an integer >= 1, got {every!r}")
        self.every = every
        self.grad_stats = grad_stats
        self.max_quantile_elems = max_quantile_elems
        self.keep_samples = keep_samples
        self.samples: dict[str, dict[str, list[float]]] = {}
        self.sampled_steps: list[int] = []
        self.total_overhead_s = 0.0
        self._handles: list[Any] = []
        # (family, layer, part) -> tensors seen this step
        self._bufs: dict[tuple[str, int, str], list[torch.Tensor]] = defaultdict(list)
        self._sat: dict[str, list[torch.Tensor]] = defaultdict(list)
        self._active = False
        self._overhead = 0.0
        self._bhyt_blocks: list[tuple[int, nn.Module]] = []

    # -- contract ---------------------------------------------------------------------------
    def should_sample(self, step: int) -> bool:
        # step 1 (the trainer's first) too, so every run has a reading at initialisation
        return step == 1 or step % self.every == 0

    def begin_step(self, step: int, model: nn.Module) -> None:
        self._clear()
        if not self.should_sample(step):
            return
        t0 = time.perf_counter()
        self._active = True
        for i, block in enumerate(self._layers(model)):
            self._hook_block(i, block)
        final = final_norm_of(model)
        if final is not None and hasattr(final, "saturation"):
            self._hook_norm(K.site_key(K.SAT, K.FINAL_SITE), final)
        self._overhead += time.perf_counter() - t0

    def end_step(self, step: int, model: nn.Module) -> dict[str, float]:
        if not self._active:
            self._clear()
            return {}
        t0 = time.perf_counter()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        out: dict[str, float] = {}
        with torch.no_grad():
            for (family, layer, part), tensors in self._bufs.items():
                if family == K.HIDDEN:
                    l2s, vars_ = zip(*(token_l2_and_variance(t) for t in tensors))
                    out[K.layer_key(family, layer, "l2")] = sum(l2s) / len(l2s)
                    out[K.layer_key(family, layer, "var")] = sum(vars_) / len(vars_)
                else:
                    for stat, value in tensor_stats(tensors, self.max_quantile_elems).items():
                        out[K.layer_key(family, layer, stat, part)] = value
            for key, vals in self._sat.items():
                out[key] = float(torch.stack([v.float() for v in vals]).mean())
            out.update(self._norm_params(model))
            out.update(self._bhyt_stats())
            out.update(self._moe_load(model))
        self._overhead += time.perf_counter() - t0
        out[K.PROBE_OVERHEAD] = 1000.0 * self._overhead
        self.total_overhead_s += self._overhead
        self.sampled_steps.append(step)
        self._clear()
        return out

    # -- hooks --------------------------------------------------------------------------------
    @staticmethod
    def _layers(model: nn.Module) -> list[nn.Module]:
        layers = getattr(model, "layers", None)
        if layers is None:
            raise TypeError("StabilityProbe needs a model with a `.layers` list of blocks")
        return list(layers)

    def _store(self, key: tuple[str, int, str]):
        def hook(_mod, _args, output):
            t = _first_tensor(output)
            if t is not None:
                self._bufs[key].append(t.detach())

        return hook

    def _grad_hook(self, key: tuple[str, int, str]):
        def fwd_hook(_mod, _args, output):
            t = _first_tensor(output)
            if t is None or not t.requires_grad:
                return

            def on_grad(g: torch.Tensor) -> None:
                self._bufs[key].append(g.detach())

            self._handles.append(t.register_hook(on_grad))

        return fwd_hook

    def _hook_norm(self, key: str, norm: nn.Module) -> None:
        def hook(mod, args, kwargs, _output):
            t0 = time.perf_counter()
            x = args[0] if args else kwargs.get("x")
            variance = kwargs.get("variance", args[1] if len(args) > 1 else None)
            if x is not None:
                with torch.no_grad():
                    sat = mod.saturation(x.detach(), variance)
                self._sat[key].append(sat.detach())
            self._overhead += time.perf_counter() - t0

        self._handles.append(norm.register_forward_hook(hook, with_kwargs=True))

    def _hook_block(self, i: int, block: nn.Module) -> None:
        reg = self._handles.append
        reg(block.register_forward_hook(self._store((K.HIDDEN, i, ""))))
        ffn = getattr(block, "ffn", None)
        if ffn is not None:
            for tag, part in _ffn_parts(ffn):
                reg(part.down_input.register_forward_hook(self._store((K.DOWN_IN, i, tag))))
                if self.grad_stats:
                    for point, family in (("gate_out", K.GRAD_GATE), ("up_out", K.GRAD_UP)):
                        mod = getattr(part, point, None)
                        if mod is not None:
                            reg(mod.register_forward_hook(self._grad_hook((family, i, tag))))
        for site in _NORM_SITES:
            norm = getattr(block, site, None)
            if norm is not None and hasattr(norm, "saturation"):
                self._hook_norm(K.site_key(K.SAT, site, i), norm)
        if hasattr(block, "record_stats"):
            block.record_stats = True
            block.last_stats = None
            self._bhyt_blocks.append((i, block))

    # -- readings that need no hooks ----------------------------------------------------------
    @staticmethod
    def _norm_params(model: nn.Module) -> dict[str, float]:
        out: dict[str, float] = {}
        sites: list[tuple[str, int | None, nn.Module]] = []
        for i, block in enumerate(StabilityProbe._layers(model)):
            for site in _NORM_SITES:
                norm = getattr(block, site, None)
                if norm is not None:
                    sites.append((site, i, norm))
        final = final_norm_of(model)
        if final is not None:
            sites.append((K.FINAL_SITE, None, final))
        for site, layer, norm in sites:
            for pname, family in (("lam", K.LAM), ("alpha", K.ALPHA)):
                v = _scalar(getattr(norm, pname, None))
                if v is not None:
                    out[K.site_key(family, site, layer)] = v
        # the DyT recipe's learnable scalar on the embedding output (initialised to sqrt(d))
        scale = _scalar(getattr(model, "embed_scale", None))
        if scale is not None:
            out[K.EMBED_SCALE] = scale
        return out

    def _bhyt_stats(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for i, block in self._bhyt_blocks:
            stats = getattr(block, "last_stats", None)
            block.record_stats = False
            if not stats:
                continue
            va = stats["v_approx"].detach().float().reshape(-1)
            vt = stats["v_true"].detach().float().reshape(-1)
            out[K.layer_key(K.BHYT, i, "v_approx")] = float(va.mean())
            out[K.layer_key(K.BHYT, i, "v_true")] = float(vt.mean())
            out[K.layer_key(K.BHYT, i, "pearson_r")] = pearson_r(va, vt)
            if self.keep_samples > 0:
                stride = max(1, -(-va.numel() // self.keep_samples))
                self.samples[f"layer{i}"] = {
                    "v_approx": va[::stride].tolist(),
                    "v_true": vt[::stride].tolist(),
                }
        return out

    @staticmethod
    def _moe_load(model: nn.Module) -> dict[str, float]:
        out: dict[str, float] = {}
        for i, block in enumerate(StabilityProbe._layers(model)):
            load = getattr(getattr(block, "ffn", None), "last_load", None)
            if isinstance(load, torch.Tensor) and load.numel() > 0:
                lf = load.detach().float().reshape(-1)
                mean = float(lf.mean())
                out[K.layer_key(K.MOE, i, "load_max")] = float(lf.max())
                out[K.layer_key(K.MOE, i, "load_min")] = float(lf.min())
                out[K.layer_key(K.MOE, i, "load_cv")] = float(lf.std(unbiased=False)) / mean if mean > 0 else math.nan
        return out

    def _clear(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for _, block in self._bhyt_blocks:
            block.record_stats = False
        self._bhyt_blocks.clear()
        self._bufs.clear()
        self._sat.clear()
        self._active = False
        self._overhead = 0.0
