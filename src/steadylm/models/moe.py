"""Ling-style mixture-of-experts feed-forward (SPEC §3).

* Router: sigmoid scores ``σ(W_r x)`` in fp32; the top-k experts are *selected* on
  ``score + bias`` but *weighted* by the plain scores, renormalised to sum to 1 over the chosen k
  (then multiplied by ``routed_scale``) — DeepSeek-V3 / Ling 2.0 routing.
* Auxiliary-loss-free balancing: a per-expert bias (a buffer, outside autograd) is nudged by
  ``rate · sign(mean load − load)`` after each optimizer step, using the token-slots counted over the
  training forwards since the previous update (:meth:`MoE.update_router_bias`).
* One shared expert (a :class:`~steadylm.nn.GatedFFN` of width ``n_shared · expert_hidden``) sees
  every token. The activation is applied in every routed and shared expert.

Dispatch is vectorised: token-slots are sorted by expert once and results are scattered back with
one ``index_add_``; in between, ``RoutedExperts.dispatch`` picks how the experts run:

* ``"grouped"``: the per-expert slice ends stay on the device as a cumulative count and each
  projection is one grouped linear layer over the sorted slots
  (:func:`steadylm.kernels.grouped.grouped_linear`: ``torch._grouped_mm`` on CUDA where available,
  a single custom op elsewhere). No host sync where ``torch._grouped_mm`` runs, and no graph break
  anywhere: a compiled MoE model is one graph.
* ``"loop"``: one module call per expert on its slice, the slice sizes read to the host once per
  layer (a graph break when compiled). Works for any expert layer type (e.g. after FP8 conversion).
* ``"auto"`` (default): grouped when compiling or when ``torch._grouped_mm`` applies, else the loop
  — in eager mode on a CPU the host read is free and the loop avoids stacking the expert weights
  (measured ~15% faster on nano-moe, BENCHMARKS.md). Experts that are not plain ``nn.Linear``
  always take the loop. Both give the same numbers (the same ``mm`` per slice).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from steadylm.errors import ConfigError, check_choice
from steadylm.kernels.grouped import grouped_linear, grouped_mm_applies, operand_dtype
from steadylm.nn import GatedFFN
from steadylm.nn.activations import Activation

__all__ = ["MoE", "RoutedExperts", "Router"]


class Router(nn.Module):
    """Sigmoid top-k router with a balancing bias.

    ``weight`` is a plain parameter (not an ``nn.Linear``) so that low-precision passes that swap
    linear layers leave routing in full precision, where Ling keeps it.
    """

    def __init__(self, dim: int, n_experts: int, top_k: int, routed_scale: float = 1.0) -> None:
        super().__init__()
        self.n_experts = n_experts
        self.top_k = top_k
        self.routed_scale = routed_scale
        self.weight = nn.Parameter(torch.empty(n_experts, dim))
        # Selection-only bias of the auxiliary-loss-free balancing; saved so a resumed run keeps it.
        self.register_buffer("expert_bias", torch.zeros(n_experts))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Route ``x`` ([tokens, dim]); return ``(expert_index, weight)``, both ``[tokens, top_k]``."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            scores = torch.sigmoid(F.linear(x.float(), self.weight.float()))
        selection = scores.detach() + self.expert_bias.float()
        expert_index = torch.topk(selection, self.top_k, dim=-1).indices
        weight = scores.gather(-1, expert_index)
        weight = weight / weight.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        return expert_index, weight * self.routed_scale

    def extra_repr(self) -> str:
        return f"experts={self.n_experts}, top_k={self.top_k}, routed_scale={self.routed_scale}"


class RoutedExperts(nn.Module):
    """``E`` gated FFNs applied to token-slots already sorted by expert.

    Probe points match :class:`~steadylm.nn.GatedFFN` and see the packed ``[token_slots, hidden]``
    tensors of all experts: ``gate_out``, ``up_out``, ``down_input``.
    """

    def __init__(self, dim: int, hidden: int, n_experts: int, activation: str, impl: str, **kwargs: Any) -> None:
        super().__init__()
        self.n_experts = n_experts
        # One nn.Linear per expert (rather than a stacked tensor) so that layer-swapping passes
        # such as FP8 conversion reach the experts like any other projection.
        self.w_gate = nn.ModuleList(nn.Linear(dim, hidden, bias=False) for _ in range(n_experts))
        self.w_up = nn.ModuleList(nn.Linear(dim, hidden, bias=False) for _ in range(n_experts))
        self.w_down = nn.ModuleList(nn.Linear(hidden, dim, bias=False) for _ in range(n_experts))
        self.gate_out = nn.Identity()
        self.up_out = nn.Identity()
        self.down_input = nn.Identity()
        self.act = Activation(activation, impl, **kwargs)
        self.dispatch = "auto"  # "auto" | "grouped" | "loop" (see the module docstring)

    def set_activation(self, name: str, impl: str | None = None, **kwargs: Any) -> None:
        self.act = Activation(name, impl or self.act.impl, **kwargs)

    def groupable(self) -> bool:
        """Whether every projection is a plain bias-free ``nn.Linear`` (the grouped path can run)."""
        return all(
            type(layer) is nn.Linear and layer.bias is None
            for layers in (self.w_gate, self.w_up, self.w_down)
            for layer in layers
        )

    def uses_grouped(self, x: Tensor) -> bool:
        """Whether this forward takes the grouped path (``dispatch`` resolved for input ``x``)."""
        check_choice("RoutedExperts.dispatch", self.dispatch, ("auto", "grouped", "loop"))
        if self.dispatch == "loop" or not self.groupable():
            if self.dispatch == "grouped":
                raise ConfigError("RoutedExperts.dispatch='grouped' needs plain bias-free nn.Linear experts")
            return False
        if self.dispatch == "grouped" or torch.compiler.is_compiling():
            return True
        hidden, dim = self.w_gate[0].weight.shape
        return grouped_mm_applies(x.device, operand_dtype(x), dim, hidden)

    def forward(self, x_sorted: Tensor, counts: Tensor) -> Tensor:
        """``x_sorted``: ``[slots, dim]`` grouped by expert; ``counts`` (``[E]``, integer, on the
        device) holds the number of slots of each expert."""
        if not self.uses_grouped(x_sorted):
            return self._forward_per_expert(x_sorted, counts.tolist())
        ends = counts.cumsum(0)
        gate = self.gate_out(grouped_linear(x_sorted, _stack(self.w_gate), ends))
        up = self.up_out(grouped_linear(x_sorted, _stack(self.w_up), ends))
        hidden = self.down_input(self.act(gate, up))
        return grouped_linear(hidden, _stack(self.w_down), ends)

    def _forward_per_expert(self, x_sorted: Tensor, counts: list[int]) -> Tensor:
        """One module call per expert (works for any layer type; breaks a compiled graph)."""
        chunks = x_sorted.split(counts)
        gate = self.gate_out(torch.cat([self.w_gate[e](chunks[e]) for e in range(self.n_experts)]))
        up = self.up_out(torch.cat([self.w_up[e](chunks[e]) for e in range(self.n_experts)]))
        hidden = self.down_input(self.act(gate, up)).split(counts)
        return torch.cat([self.w_down[e](hidden[e]) for e in range(self.n_experts)])


def _stack(layers: nn.ModuleList) -> Tensor:
    """The experts' weights as one ``[E, out, in]`` tensor (differentiable)."""
    return torch.stack([layer.weight for layer in layers])


class MoE(nn.Module):
    """Routed experts + shared expert, with auxiliary-loss-free load balancing.

    Buffers: ``router.expert_bias`` (saved), ``last_load`` (fraction of routed token-slots per
    expert in the last forward, sums to 1) and ``load_accum`` (token-slots per expert summed over
    training forwards since the last :meth:`update_router_bias`).
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        n_experts: int,
        top_k: int,
        n_shared: int,
        activation: str,
        impl: str = "fused",
        bias_update_rate: float = 1e-3,
        routed_scale: float = 1.0,
        **activation_kwargs: Any,
    ) -> None:
        super().__init__()
        self.n_experts = n_experts
        self.top_k = top_k
        self.bias_update_rate = bias_update_rate
        self.router = Router(dim, n_experts, top_k, routed_scale)
        self.experts = RoutedExperts(dim, hidden, n_experts, activation, impl, **activation_kwargs)
        self.shared_expert: GatedFFN | None = (
            GatedFFN(dim, hidden * n_shared, activation, impl, **activation_kwargs) if n_shared > 0 else None
        )
        self.register_buffer("last_load", torch.zeros(n_experts), persistent=False)
        self.register_buffer("load_accum", torch.zeros(n_experts), persistent=False)

    def set_activation(self, name: str, impl: str | None = None, **kwargs: Any) -> None:
        """Swap the activation of every routed and shared expert, keeping the weights."""
        self.experts.set_activation(name, impl, **kwargs)
        if self.shared_expert is not None:
            self.shared_expert.set_activation(name, impl, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x_flat = x.reshape(-1, shape[-1])
        expert_index, weight = self.router(x_flat)

        # Sort token-slots by expert so each expert reads one contiguous slice.
        flat_expert = expert_index.reshape(-1)
        order = torch.argsort(flat_expert, stable=True)
        token_of_slot = order // self.top_k
        counts = torch.zeros(self.n_experts, device=x.device, dtype=torch.long)
        counts.scatter_add_(0, flat_expert, torch.ones_like(flat_expert))
        with torch.no_grad():
            load = counts.float()
            self.last_load.copy_(load / load.sum().clamp_min(1.0))
            if self.training:
                self.load_accum.add_(load)

        routed = self.experts(x_flat.index_select(0, token_of_slot), counts)
        slot_weight = weight.reshape(-1).index_select(0, order).unsqueeze(-1)
        out = torch.zeros(x_flat.shape, device=x.device, dtype=torch.float32)
        out.index_add_(0, token_of_slot, routed.float() * slot_weight)
        out = out.to(routed.dtype)
        if self.shared_expert is not None:
            out = out + self.shared_expert(x_flat)
        return out.reshape(shape[:-1] + (out.shape[-1],))

    @torch.no_grad()
    def update_router_bias(self) -> None:
        """One balancing step: raise the bias of under-loaded experts, lower over-loaded ones.

        Uses the load counted since the previous call (all training forwards, so gradient
        accumulation counts every micro-batch), then clears it. When ``torch.distributed`` is
        initialised the per-expert counts are first summed over all ranks, so every rank applies the
        same update from the *global* load and the biases stay identical (SPEC §6); every rank must
        call this at the same step (a collective). No-op if nothing was routed: all counts are then
        zero and so is the sign of the load error. No host synchronisation.
        """
        load = self.load_accum
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            load = load.clone()
            torch.distributed.all_reduce(load, op=torch.distributed.ReduceOp.SUM)
        if self.bias_update_rate > 0:
            error = load.mean() - load
            self.router.expert_bias.add_(torch.sign(error), alpha=self.bias_update_rate)
        self.load_accum.zero_()

    def extra_repr(self) -> str:
        return f"experts={self.n_experts}, top_k={self.top_k}, bias_update_rate={self.bias_update_rate}"
