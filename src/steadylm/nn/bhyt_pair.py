"""The BHyT pair: the two BHyT sites of one decoder block and their shared statistics (SPEC §2).

A block that uses the BHyT block form owns two :class:`~steadylm.nn.BHyT` norms (before attention
and before the FFN) and one buffer, ``bhyt_correction`` = c_ℓ = ‖W_V W_O‖_F² / (T·d). The first
site computes the per-token mean square v once; the second site reuses it as
``v' = v + c_ℓ · stopgrad(λ₁)² / κ²`` instead of reducing over the attention output.

:class:`BHyTPair` is a mixin for an ``nn.Module`` decoder layer. It is shared by steadylm's own
:class:`steadylm.models.BHyTBlock` (sites ``attn_norm`` / ``ffn_norm``) and the Hugging Face
decoder-layer patch in :mod:`steadylm.integrations.transformers` (sites ``input_layernorm`` /
``post_attention_layernorm``): the subclass names its two site attributes and says where its value
and output projections are; everything else (building the norms, the buffer, refreshing c_ℓ,
the second-site variance, the per-token statistics a probe reads) lives here once.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from steadylm import functional
from steadylm.nn.norms import BHyT

__all__ = ["BHyTPair", "full_tensor"]


def full_tensor(tensor: Tensor) -> Tensor:
    """The whole value of a possibly sharded tensor.

    FSDP2 (``fully_shard``) turns parameters into ``torch.distributed.tensor.DTensor`` shards;
    ``full_tensor()`` all-gathers them (a collective: every rank must call it). Plain tensors are
    returned unchanged.
    """
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch builds without distributed
        return tensor
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


class BHyTPair:
    """Mixin giving an ``nn.Module`` decoder layer the BHyT block form.

    Subclasses set :attr:`BHYT_SITES` (the attribute names of the pre-attention and pre-FFN norm)
    and implement :meth:`bhyt_projections`; they call :meth:`init_bhyt_pair` in ``__init__`` (or
    on an existing layer being patched) and use :meth:`bhyt_attn_input` / :meth:`bhyt_ffn_input`
    in their forward.

    State: the two :class:`BHyT` norms, the ``bhyt_correction`` buffer (0-dim fp32, saved in the
    state dict, no gradient), ``record_stats`` / ``last_stats`` (``{"v_approx", "v_true"}`` per
    token, detached fp32) and ``refresh_on_load`` (``load_state_dict`` recomputes c_ℓ, SPEC §2.4).
    """

    #: attribute names of the (pre-attention, pre-FFN) norms.
    BHYT_SITES: ClassVar[tuple[str, str]] = ("attn_norm", "ffn_norm")

    bhyt_correction: Tensor
    bhyt_kappa: float
    bhyt_exact: bool
    bhyt_context_length: int
    record_stats: bool
    last_stats: dict[str, Tensor] | None
    refresh_on_load: bool

    def init_bhyt_pair(
        self,
        dim: int,
        *,
        lam_attn: float,
        lam_ffn: float,
        kappa: float,
        eps: float,
        impl: str,
        context_length: int,
        exact: bool = False,
        gains: tuple[Tensor | None, Tensor | None] = (None, None),
    ) -> None:
        """Create both BHyT sites and the c_ℓ buffer, then compute c_ℓ from the weights.

        Args:
            dim: model width d.
            lam_attn, lam_ffn: λ0 at the two sites (published: 2 and 1).
            kappa, eps: κ and ε of both sites.
            impl: ``"fused"`` or ``"reference"``.
            context_length: T in c_ℓ (the training context length).
            exact: BHyT* (exact statistics at both sites) instead of the block approximation.
            gains: optional initial γ for the two sites (e.g. the RMSNorm gains of a layer being
                patched), copied into the new norms.
        """
        module = self._as_module()
        sites = (
            BHyT(dim, lam_init=lam_attn, kappa=kappa, eps=eps, impl=impl),
            BHyT(dim, lam_init=lam_ffn, kappa=kappa, eps=eps, impl=impl),
        )
        for name, norm, gain in zip(self.BHYT_SITES, sites, gains):
            if gain is not None:
                with torch.no_grad():
                    norm.weight.copy_(gain.detach().to(norm.weight.dtype))
            setattr(module, name, norm)
        self.bhyt_kappa = float(kappa)
        self.bhyt_exact = bool(exact)
        self.bhyt_context_length = int(context_length)
        device = sites[0].weight.device
        if "bhyt_correction" not in module._buffers:
            module.register_buffer("bhyt_correction", torch.zeros((), device=device))
            module.register_load_state_dict_post_hook(_refresh_after_load)
        # Set by begin_inference(): the per-layer shift, computed once per generate call.
        self._inference_shift: Tensor | None = None
        self.refresh_on_load = True
        self.record_stats = False
        self.last_stats = None
        if device.type != "meta":
            self.refresh_bhyt_correction()

    # ------------------------------------------------------------------------------------------
    # what the subclass provides
    # ------------------------------------------------------------------------------------------

    def bhyt_projections(self) -> tuple[Tensor, Tensor, int, int]:
        """``(W_V, W_O, n_heads, n_kv_heads)`` of this layer's attention (``nn.Linear`` layout)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------
    # c_ℓ
    # ------------------------------------------------------------------------------------------

    @property
    def bhyt_sites(self) -> tuple[BHyT, BHyT]:
        module = self._as_module()
        return getattr(module, self.BHYT_SITES[0]), getattr(module, self.BHYT_SITES[1])

    @torch.no_grad()
    def refresh_bhyt_correction(self) -> None:
        """Recompute c_ℓ from the current W_V, W_O (GQA-aware; full tensors under FSDP2, so every
        rank computes the single-process value)."""
        w_v, w_o, n_heads, n_kv_heads = self.bhyt_projections()
        c = functional.bhyt_variance_correction(
            full_tensor(w_v), full_tensor(w_o), n_heads, n_kv_heads, self.bhyt_context_length
        )
        self.bhyt_correction.copy_(c)

    def variance_shift(self) -> Tensor:
        """``c_ℓ · λ₁² / κ²`` with λ₁ detached: the second site's variance increment (fp32)."""
        if self._inference_shift is not None:
            return self._inference_shift
        lam = self.bhyt_sites[0].lam.detach().float()
        return self.bhyt_correction.float() * lam * lam / (self.bhyt_kappa * self.bhyt_kappa)

    @torch.no_grad()
    def begin_inference(self) -> None:
        """Freeze the per-layer shift for a generation call (weights do not change during it)."""
        self._inference_shift = None
        self._inference_shift = self.variance_shift().clone()

    def end_inference(self) -> None:
        self._inference_shift = None

    # ------------------------------------------------------------------------------------------
    # forward pieces
    # ------------------------------------------------------------------------------------------

    def bhyt_attn_input(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """The attention input ``γ₁ ⊙ tanh(λ₁ x / (κ √(v + ε)))`` and v = mean(x²) (fp32).

        The block form takes both from one op (one reduction over x; fused: one kernel, whose
        backward also carries the second site's gradient into x). BHyT* (exact) needs v only for
        the recorded statistics: it is computed (without gradient) only while ``record_stats`` is
        on, else ``None``.
        """
        attn_norm = getattr(self, self.BHYT_SITES[0])
        if not self.bhyt_exact:
            return attn_norm(x, with_mean_square=True)
        v = None
        if self.record_stats:
            with torch.no_grad():
                v = functional.mean_square(x)
        return attn_norm(x), v

    def bhyt_ffn_input(self, h: Tensor, v: Tensor | None) -> Tensor:
        """The FFN input from the block's mid-point ``h`` and the first site's ``v``."""
        ffn_norm = getattr(self, self.BHYT_SITES[1])
        if self.bhyt_exact:
            out = ffn_norm(h)
            if self.record_stats and v is not None:
                with torch.no_grad():
                    self._store_stats(v + self.variance_shift(), h)
            return out
        if v is None:  # pragma: no cover - programming error
            raise ValueError("the BHyT block form needs the first site's statistic v")
        v_approx = v + self.variance_shift()
        if self.record_stats:
            self._store_stats(v_approx, h)
        return ffn_norm(h, variance=v_approx)

    @torch.no_grad()
    def _store_stats(self, v_approx: Tensor, h: Tensor) -> None:
        self.last_stats = {
            "v_approx": v_approx.detach().float().squeeze(-1),
            "v_true": functional.mean_square(h.detach()).squeeze(-1),
        }

    def _as_module(self) -> nn.Module:
        if not isinstance(self, nn.Module):  # pragma: no cover - programming error
            raise TypeError("BHyTPair is a mixin for nn.Module subclasses")
        return self


def _refresh_after_load(module: Any, incompatible_keys: object) -> None:
    # Runs after the layer's own tensors and its children's weights have been loaded.
    if module.refresh_on_load:
        module.refresh_bhyt_correction()
