"""The BHyT block in torchtitan's Llama-3 decoder: steadylm's BHyT pair in place of the two RMSNorms.

``bhyt`` is an ``@override`` factory for ``Llama3TransformerBlock.Config``: every block becomes a
:class:`SteadyLMBHyTBlock` with the same attention and FFN configs (so their parameter names,
initialisation and sharding declarations are torchtitan's), and its ``attention_norm`` /
``ffn_norm`` are the two sites of :class:`steadylm.nn.BHyTPair` — one per-token statistic per
block, the second site's variance from c_ℓ, the same code steadylm's own ``BHyTBlock`` and the
Hugging Face patch run. The sites are :class:`SteadyLMBHyT` — steadylm's ``BHyT`` as a torchtitan
``Module`` (the module protocol the ``Trainer`` verifies) whose λ is declared to torchtitan's
sharding plans (:func:`lam_sharding`: replicated like the gain). c_ℓ (the ``bhyt_correction``
buffer) is computed from the full W_V/W_O (all-gathered under FSDP2/TP) when the model's states are
initialised and after every ``load_state_dict``; :func:`register_bhyt_refresh`
(``ModelSpec.post_optimizer_build_fn``) refreshes it every ``refresh_every`` optimizer steps,
counting steps from the optimizer's own state so a resumed run keeps the cadence. T in c_ℓ is
``context_length``: with the config module it follows ``--training.seq_len``
(``SteadyLMLlama3Model.Config.update_from_config``); with the ``bhyt`` override, which torchtitan
applies after that, pass the run's sequence length.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torchtitan.config import derive, override
from torchtitan.models.common import RMSNorm
from torchtitan.models.llama3.model import Llama3TransformerBlock
from torchtitan.models.llama3.state_dict_adapter import Llama3StateDictAdapter
from torchtitan.protocols.module import Module
from torchtitan.protocols.sharding import ShardingConfig

from steadylm.nn import BHyT, BHyTPair, full_tensor

__all__ = ["BHYT_HF_KEYS", "SteadyLMBHyT", "SteadyLMBHyTBlock", "SteadyLMLlama3StateDictAdapter", "bhyt",
           "bhyt_blocks", "lam_sharding", "register_bhyt_refresh"]


def lam_sharding(sharding: ShardingConfig | None) -> ShardingConfig | None:
    """``sharding`` (torchtitan's declaration for a norm site) with λ declared.

    λ is one learnable scalar per site, replicated on every mesh axis exactly like the site's gain
    γ (``weight``): torchtitan declares γ ``Replicate`` over DP/CP and, on the TP axis, ``I``
    (invariant) without sequence parallelism or ``R`` with it (each TP rank then sees a slice of the
    sequence, so the gradient is reduced over TP like γ's). torchtitan's plans declare only
    ``weight`` on a norm, and ``Module.parallelize`` refuses a parameter without a placement, so
    every site adds ``lam`` with γ's layout unless it is declared already."""
    if sharding is None or "lam" in sharding.state_shardings or "weight" not in sharding.state_shardings:
        return sharding
    return replace(sharding, state_shardings={**sharding.state_shardings, "lam": sharding.state_shardings["weight"]})


class _LocalParams:
    """A BHyT site's attributes with γ and λ replaced (their local tensors), for ``BHyT.forward``."""

    def __init__(self, site: BHyT, weight: Tensor, lam: Tensor) -> None:
        self._site, self.weight, self.lam = site, weight, lam

    def __getattr__(self, name: str) -> Any:
        return getattr(self._site, name)


class SteadyLMBHyT(BHyT, Module):
    """One BHyT site as a torchtitan ``Module`` (steadylm's :class:`~steadylm.nn.BHyT`, unchanged).

    Its ``Config`` extends ``RMSNorm.Config`` (the site it replaces: same ``normalized_shape``,
    ``eps``, ``param_init``, ``sharding_config``), so torchtitan's sharding plans, which set a
    norm's ``sharding_config``, apply to it; :func:`lam_sharding` adds λ's placement when it is
    built. ``forward``'s only positional argument is ``input``, the name torchtitan's norm plans
    key their input placements by; on a DTensor input (TP) it runs on the local tensors
    (:meth:`_forward_local`). Initialisation (``init_states``): γ by ``param_init["weight"]``
    (ones when absent), λ = λ0 (unless ``param_init`` names ``lam``).
    """

    @dataclass(kw_only=True, slots=True)
    class Config(RMSNorm.Config):
        lam_init: float = 1.0
        kappa: float = 10.0
        eps: float = 1e-6
        impl: str = "fused"

        def build(self, **kwargs: Any) -> "SteadyLMBHyT":
            instance = Module.Config.build(self, **kwargs)
            instance._sharding_config = lam_sharding(self.sharding_config)
            return instance

    def __init__(self, config: Config):
        BHyT.__init__(self, config.normalized_shape, lam_init=config.lam_init, kappa=config.kappa, eps=config.eps,
                      impl=config.impl)

    def _init_self_parameters(self) -> None:
        init = self._param_init or {}
        with torch.no_grad():
            if "weight" in init:
                init["weight"](self.weight)
            else:
                self.weight.fill_(1.0)
            if "lam" in init:
                init["lam"](self.lam)
            else:
                self.lam.fill_(self.lam_init)

    # ``variance`` is keyword-only: torchtitan 0.3.0's input redistribution (Module.parallelize,
    # which runs even on one rank) rebuilds the call from every positional parameter of forward and
    # fails (KeyError) on a defaulted one the caller left out.
    def forward(self, input: Tensor, *, variance: Tensor | None = None,  # noqa: A002 - torchtitan's name
                with_mean_square: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        if isinstance(input, DTensor):
            return self._forward_local(input, variance, with_mean_square)
        return BHyT.forward(self, input, variance, with_mean_square=with_mean_square)

    def _forward_local(self, x: DTensor, variance: Tensor | None, with_mean_square: bool) -> Any:
        """The site on torchtitan's tensor-parallel activations (DTensor backends): per token, so
        it runs on each rank's tokens as they are (replicated, or sharded on a token dimension —
        sequence parallelism), with γ and λ replicated; their gradients, sums over this rank's
        tokens, are ``Partial`` when the tokens are sharded (what DTensor gives torchtitan's own
        RMSNorm). The fused ops flatten the tokens, which on a sequence-sharded DTensor would
        all-gather them; on local tensors they stay where they are."""
        last = x.ndim - 1
        if any(isinstance(p, Partial) or (isinstance(p, Shard) and p.dim % x.ndim == last) for p in x.placements):
            x = x.redistribute(placements=[Replicate() if isinstance(p, Partial) or (
                isinstance(p, Shard) and p.dim % x.ndim == last) else p for p in x.placements])
        mesh, placements = x.device_mesh, tuple(x.placements)
        grads = [Partial() if isinstance(p, Shard) else Replicate() for p in placements]

        def local(t: Tensor | None, grad: bool = False) -> Tensor | None:
            if not isinstance(t, DTensor):
                return t
            if t.placements != placements and t.ndim == x.ndim:  # the statistic v: x's layout
                t = t.redistribute(placements=placements)
            return t.to_local(grad_placements=grads) if grad else t.to_local()

        out = BHyT.forward(_LocalParams(self, local(self.weight, True), local(self.lam, True)), local(x),
                           local(variance), with_mean_square=with_mean_square)

        def wrap(t: Tensor) -> DTensor:
            return DTensor.from_local(t, mesh, placements, run_check=False)

        return (wrap(out[0]), wrap(out[1])) if with_mean_square else wrap(out)


class SteadyLMBHyTBlock(BHyTPair, Llama3TransformerBlock):
    """``h = x + attn(BHyT₁(x))``, ``out = h + ffn(BHyT₂(h; v' = v + c_ℓ·λ₁²/κ²))`` (SPEC §2)."""

    BHYT_SITES = ("attention_norm", "ffn_norm")

    @dataclass(kw_only=True, slots=True)
    class Config(Llama3TransformerBlock.Config):
        lam_attn: float = 2.0  # λ0 of the two sites (published: 2 and 1)
        lam_ffn: float = 1.0
        kappa: float = 10.0
        eps: float = 1e-6
        impl: str = "fused"
        context_length: int = 2048  # T in c_ℓ = ‖W_V W_O‖_F² / (T·d): the training sequence length
        refresh_every: int = 100  # optimizer steps between c_ℓ refreshes (register_bhyt_refresh)

    def __init__(self, config: Config):
        Llama3TransformerBlock.__init__(self, config)
        self.record_stats = False
        self.last_stats = None
        self.refresh_every = int(config.refresh_every)
        dim = config.attention_norm.normalized_shape
        # the c_ℓ buffer, its load hook and the pair's state (and two plain BHyT sites) ...
        self.init_bhyt_pair(dim, lam_attn=config.lam_attn, lam_ffn=config.lam_ffn, kappa=config.kappa,
                            eps=config.eps, impl=config.impl, context_length=config.context_length)
        # ... whose sites become torchtitan Modules (the module protocol, λ's sharding), built from
        # the block's norm configs: their param_init and sharding_config (set by torchtitan's plans)
        # with λ0/κ/ε/impl from this block's config
        for name, lam in zip(self.BHYT_SITES, (config.lam_attn, config.lam_ffn)):
            setattr(self, name, self.site_config(getattr(config, name), lam, config).build())

    @staticmethod
    def site_config(norm: RMSNorm.Config, lam_init: float, config: Config) -> SteadyLMBHyT.Config:
        """The BHyT site replacing the norm ``norm`` of a block configured by ``config``."""
        return derive(norm, SteadyLMBHyT.Config, lam_init=lam_init, kappa=config.kappa, eps=config.eps,
                      impl=config.impl)

    def bhyt_projections(self) -> tuple[Tensor, Tensor, int, int]:
        attention = self.attention
        n_heads = attention.n_heads
        n_kv_heads = getattr(attention, "n_kv_heads", None) or n_heads
        qkv = attention.qkv_linear
        w_o = full_tensor(attention.wo.weight)
        if hasattr(qkv, "wv"):  # separate q/k/v projections
            w_v = full_tensor(qkv.wv.weight)
        else:
            # fused wqkv (torchtitan's default): rows [kv head, (q heads per kv, k, v), head_dim];
            # the whole weight first (a collective when FSDP/TP shard it, on every rank alike)
            w = full_tensor(qkv.wqkv.weight)
            w_v = w.reshape(-1, qkv.r_dim, qkv.head_dim, w.shape[-1])[:, qkv.heads_per_kv + 1]
            w_v = w_v.reshape(-1, w.shape[-1])
        head_dim, dim = attention.head_dim, self.bhyt_sites[0].weight.shape[0]
        if tuple(w_v.shape) != (n_kv_heads * head_dim, dim) or tuple(w_o.shape) != (dim, n_heads * head_dim):
            # a shard that is not a DTensor (torchtitan's spmd_types backend keeps TP shards as plain
            # local tensors): c_ℓ of a slice of W_V W_O would be silently wrong
            raise RuntimeError(
                f"BHyT c_ℓ needs the whole W_V/W_O, got W_V {tuple(w_v.shape)} and W_O {tuple(w_o.shape)} "
                f"(expected {(n_kv_heads * head_dim, dim)} and {(dim, n_heads * head_dim)}): tensor-parallel "
                "shards that are not DTensors; run with --parallelism.spmd_backend partial_dtensor (or full_dtensor)")
        return w_v, w_o, n_heads, n_kv_heads

    def init_states(self, *, buffer_device: torch.device | None = None) -> None:
        # torchtitan initialises every Module child (the sites: γ = 1, λ = λ0); c_ℓ needs the
        # initialised W_V/W_O, so it comes last.
        super().init_states(buffer_device=buffer_device)
        self.refresh_bhyt_correction()

    def forward(self, x: Tensor, attention_masks: Any, positions: Tensor | None = None) -> Tensor:
        attn_in, v = self.bhyt_attn_input(x)
        h = x + self.attention(attn_in, attention_masks, positions)
        return h + self.feed_forward(self.bhyt_ffn_input(h, v))


@override(target=Llama3TransformerBlock.Config, exact=True, description="steadylm BHyT block (BHyT pair)")
def bhyt(cfg: Llama3TransformerBlock.Config, *, lam_attn: float = 2.0, lam_ffn: float = 1.0, kappa: float = 10.0,
         eps: float = 1e-6, impl: str = "fused", context_length: int = 2048, refresh_every: int = 100,
         activation: str | None = None, activation_kwargs: dict[str, Any] | None = None) -> SteadyLMBHyTBlock.Config:
    """Every Llama-3 block becomes a :class:`SteadyLMBHyTBlock` (set ``context_length`` to the
    run's ``--training.seq_len``: an override is applied after the trainer's config is final, so
    nothing updates it; ``refresh_every`` takes effect with :func:`register_bhyt_refresh`).

    ``activation`` (e.g. ``"powlu"``, with ``activation_kwargs``) also switches the block's FFN:
    torchtitan refuses an FFN override nested inside a block override, so PowLU + BHyT is this one
    override."""
    from steadylm.errors import ConfigError
    from steadylm.integrations.torchtitan.overrides import _replace

    if refresh_every < 1 or context_length < 1 or kappa <= 0 or eps <= 0:
        raise ConfigError(f"bhyt override: refresh_every and context_length must be >= 1, kappa and eps > 0 "
                          f"(got {refresh_every}, {context_length}, {kappa}, {eps})")
    block = derive(cfg, SteadyLMBHyTBlock.Config, lam_attn=lam_attn, lam_ffn=lam_ffn, kappa=kappa, eps=eps,
                   impl=impl, context_length=context_length, refresh_every=refresh_every)
    if activation is not None:
        if block.feed_forward is None:
            raise ConfigError("bhyt override: activation= needs a dense FFN (this block has none)")
        block.feed_forward = _replace(block.feed_forward, activation, impl, dict(activation_kwargs or {}))
    return block


def bhyt_blocks(model_parts: list[torch.nn.Module]) -> list[SteadyLMBHyTBlock]:
    return [m for part in model_parts for m in part.modules() if isinstance(m, SteadyLMBHyTBlock)]


def _optimizer_step(optimizer: torch.optim.Optimizer) -> int:
    """Steps taken, from the optimizer's state (AdamW keeps ``step`` per parameter), so a resumed
    run, whose optimizer state is loaded, counts on from where it stopped."""
    for state in optimizer.state.values():
        step = state.get("step")
        if step is not None:
            return int(step.item() if isinstance(step, Tensor) else step)
    return 0


def register_bhyt_refresh(optimizers: Any, model_parts: list[torch.nn.Module], parallel_dims: Any = None) -> None:
    """``ModelSpec.post_optimizer_build_fn``: after every optimizer step, refresh c_ℓ of every
    :class:`SteadyLMBHyTBlock` when the step count is a multiple of its ``refresh_every``."""
    blocks = bhyt_blocks(model_parts)
    if not blocks:
        return
    inner = getattr(optimizers, "optimizers", None) or [optimizers]

    def hook(*_args: Any, **_kwargs: Any) -> None:
        step = _optimizer_step(inner[0])
        for block in blocks:
            if step > 0 and step % block.refresh_every == 0:
                block.refresh_bhyt_correction()

    optimizers.register_step_post_hook(hook)


# ------------------------------------------------------------------------------------------------
# Hugging Face state dict: torchtitan's Llama-3 adapter plus λ and c_ℓ
# ------------------------------------------------------------------------------------------------

#: torchtitan key (layer index as {}) -> Hugging Face key of the BHyT state the stock adapter drops;
#: the HF names are those of steadylm's export (``steadylm.models.hf_format``).
BHYT_HF_KEYS: dict[str, str] = {
    "layers.{}.attention_norm.lam": "model.layers.{}.input_layernorm.lam",
    "layers.{}.ffn_norm.lam": "model.layers.{}.post_attention_layernorm.lam",
    "layers.{}.bhyt_correction": "model.layers.{}.bhyt_correction",
}


def _split(key: str) -> tuple[str, str] | None:
    """``("layers.{}.rest", "3")`` of ``"layers.3.rest"`` (None without a layer index)."""
    match = re.search(r"\.(\d+)\.", key)
    if match is None:
        return None
    return key[: match.start()] + ".{}." + key[match.end():], match.group(1)


class SteadyLMLlama3StateDictAdapter(Llama3StateDictAdapter):
    """torchtitan's Llama-3 HF adapter, keeping BHyT's λ (per site) and c_ℓ (per block), which the
    stock adapter drops (``ModelSpec.state_dict_adapter`` of a BHyT model)."""

    def to_hf(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        hf = super().to_hf(state_dict)
        for key, value in state_dict.items():
            parts = _split(key)
            if parts is not None and parts[0] in BHYT_HF_KEYS:
                hf[BHYT_HF_KEYS[parts[0]].format(parts[1])] = value
        return hf

    def from_hf(self, hf_state_dict: dict[str, Any]) -> dict[str, Any]:
        inverse = {v: k for k, v in BHYT_HF_KEYS.items()}
        rest, extra = {}, {}
        for key, value in hf_state_dict.items():
            parts = _split(key)
            if parts is not None and parts[0] in inverse:
                extra[inverse[parts[0]].format(parts[1])] = value
            else:
                rest[key] = value
        return {**super().from_hf(rest), **extra}
