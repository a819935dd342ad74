"""Normalisation modules and their registry (SPEC §2).

Per-module swaps only; the BHyT *block* form (statistics once per block, approximated second-site
variance) is assembled by the models, which pass ``variance=`` to :class:`BHyT`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from steadylm import functional
from steadylm.errors import ConfigError
from steadylm.nn._impl import check_impl, resolve_op

__all__ = [
    "NORMS",
    "NORM_SPECS",
    "NormSpec",
    "BHyT",
    "DyT",
    "LayerNorm",
    "RMSNorm",
    "build_norm",
    "get_norm_spec",
    "register_norm",
    "scalar_parameter",
    "upgrade_scalar_entries",
]

#: |tanh| above this counts as saturated (SPEC §5).
SATURATION_THRESHOLD = 0.95


def _check_dim(dim: int) -> int:
    if dim <= 0:
        raise ConfigError(f"norm dim must be > 0, got {dim}")
    return dim


def scalar_parameter(value: float) -> nn.Parameter:
    """A learnable scalar as a shape-``[1]`` parameter (λ, α, the DyT embedding scale).

    Shape ``[1]`` rather than 0-dim: FSDP2's ``fully_shard`` refuses 0-dim parameters, and a
    ``[1]`` tensor broadcasts exactly like a scalar against ``[..., d]`` activations.
    """
    return nn.Parameter(torch.full((1,), float(value)))


def upgrade_scalar_entries(state_dict: dict[str, Any], prefix: str, names: tuple[str, ...]) -> None:
    """Reshape 0-dim entries ``prefix + name`` of a state dict to ``[1]`` in place.

    Checkpoints written before learnable scalars became ``[1]`` hold them 0-dim; call this from a
    ``load_state_dict`` pre-hook so those checkpoints still load.
    """
    for name in names:
        key = prefix + name
        value = state_dict.get(key)
        if isinstance(value, Tensor) and value.dim() == 0:
            state_dict[key] = value.reshape(1)


def _upgrade_scalars_pre_hook(
    names: tuple[str, ...], module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any
) -> None:
    upgrade_scalar_entries(state_dict, prefix, names)


def _upgrade_hook(names: tuple[str, ...]) -> Any:
    # A partial of a module-level function (not a closure), so modules stay picklable.
    return functools.partial(_upgrade_scalars_pre_hook, names)


def _checked(fn, *args: Any) -> Any:
    try:
        return fn(*args)
    except ValueError as err:
        raise ConfigError(str(err)) from None


class _GainNorm(nn.Module):
    """What every norm here has: its ``impl`` and a per-channel gain γ (``weight``, initialised to 1)."""

    def __init__(self, dim: int, impl: str) -> None:
        super().__init__()
        self.impl = check_impl(impl)
        self.weight = nn.Parameter(torch.ones(_check_dim(dim)))


class _EpsNorm(_GainNorm):
    """A gain norm with a fixed ε (RMSNorm, LayerNorm)."""

    def __init__(self, dim: int, eps: float, impl: str) -> None:
        eps = _checked(functional.validate_eps, eps)
        super().__init__(dim, impl)
        self.eps = eps

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, impl={self.impl}"


class RMSNorm(_EpsNorm):
    """``γ ⊙ x / sqrt(mean(x²) + ε)``, γ initialised to 1."""

    def __init__(self, dim: int, eps: float = 1e-6, impl: str = "fused") -> None:
        super().__init__(dim, eps, impl)
        self._op = resolve_op(self.impl, "rms_norm")

    def forward(self, x: Tensor) -> Tensor:
        return self._op(x, self.weight, self.eps)


class LayerNorm(_EpsNorm):
    """``γ ⊙ (x − μ)/sqrt(σ² + ε) + β``; the fused path is PyTorch's native layer_norm kernel."""

    def __init__(self, dim: int, eps: float = 1e-5, impl: str = "fused") -> None:
        super().__init__(dim, eps, impl)
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        if self.impl == "reference":
            return functional.layer_norm(x, self.weight, self.bias, self.eps)
        # Native kernel: fp32 statistics inside for half inputs already. It does not rescale rows,
        # so inputs whose squares overflow fp32 (|x| ≳ 1e19) give inf/NaN here, unlike the reference.
        # Run it in fp32 (as autocast does) and round the output once: casting γ, β to bf16 rounds
        # them a second time, and the native bf16/mixed CPU backward returns γ/β gradients with
        # bf16-level error (measured: 0.4% on dγ, 0.07 absolute on dβ for 21×257 tokens).
        compute = torch.promote_types(x.dtype, torch.float32)
        weight, bias = self.weight.to(compute), self.bias.to(compute)
        return F.layer_norm(x.to(compute), (x.shape[-1],), weight, bias, self.eps).to(x.dtype)


class DyT(_GainNorm):
    """Dynamic Tanh ``γ ⊙ tanh(α x) (+ β)`` with a learnable scalar α (shape ``[1]``; 0-dim
    values in old state dicts are reshaped on load)."""

    def __init__(self, dim: int, alpha_init: float = 0.5, bias: bool = False, impl: str = "fused") -> None:
        super().__init__(dim, impl)
        self.alpha_init = float(alpha_init)  # α0, for re-initialisation (e.g. by HF's loader)
        self.alpha = scalar_parameter(alpha_init)
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None
        self._op = resolve_op(self.impl, "dyt")
        self.register_load_state_dict_pre_hook(_upgrade_hook(("alpha",)))

    def forward(self, x: Tensor) -> Tensor:
        return self._op(x, self.weight, self.alpha, self.bias)

    @torch.no_grad()
    def saturation(self, x: Tensor, variance: Tensor | None = None) -> Tensor:
        """Fraction of elements with ``|tanh(α x)| > 0.95`` (``variance`` is ignored)."""
        return (functional.dyt(x, None, self.alpha).abs() > SATURATION_THRESHOLD).float().mean()

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, bias={self.bias is not None}, impl={self.impl}"


class BHyT(_GainNorm):
    """Bounded tanh ``γ ⊙ tanh(λ x / (κ sqrt(v + ε)))``, λ a learnable scalar, κ fixed.

    λ has shape ``[1]`` (0-dim values in old state dicts are reshaped on load).

    ``forward(x, variance=None)``: with ``variance`` (per-token mean square, fp32,
    ``x.shape[:-1] + (1,)``) the statistic is taken from it instead of being recomputed — the
    BHyT block's once-per-block reduction. Without it this is BHyT* (exact statistics).
    """

    def __init__(
        self, dim: int, lam_init: float = 1.0, kappa: float = 10.0, eps: float = 1e-6, impl: str = "fused"
    ) -> None:
        kappa = _checked(functional.validate_kappa, kappa)
        eps = _checked(functional.validate_eps, eps)
        super().__init__(dim, impl)
        self.kappa, self.eps = kappa, eps
        self.lam_init = float(lam_init)  # λ0, for re-initialisation (e.g. by HF's loader)
        self.lam = scalar_parameter(lam_init)
        self._op = resolve_op(self.impl, "bhyt")
        self._op_with_mean_square = resolve_op(self.impl, "bhyt_and_mean_square")
        self.register_load_state_dict_pre_hook(_upgrade_hook(("lam",)))

    def forward(
        self, x: Tensor, variance: Tensor | None = None, *, with_mean_square: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """The site's output; with ``with_mean_square=True`` the pair ``(output, v)`` where
        ``v = mean(x²)`` (fp32, ``x.shape[:-1] + (1,)``) is this site's statistic — the BHyT
        block's first site, which hands v on to the second site (``variance`` must then be None).

        Fused, one op computes both (one reduction over x) and its backward folds the gradient
        reaching v from elsewhere into the same pass; reference, ``functional.mean_square`` and
        then this site with ``variance=v`` (the same values, unfused). Called through the module
        (not a helper method) so that forward hooks — probes, profiler labels — see both sites.
        """
        if not with_mean_square:
            return self._op(x, self.weight, self.lam, self.kappa, self.eps, variance)
        if variance is not None:
            raise ConfigError("BHyT: with_mean_square computes v itself; pass variance=None")
        return self._op_with_mean_square(x, self.weight, self.lam, self.kappa, self.eps)

    @torch.no_grad()
    def saturation(self, x: Tensor, variance: Tensor | None = None) -> Tensor:
        """Fraction of elements with ``|tanh(λ r x)| > 0.95`` at this site."""
        out = functional.bhyt(x, None, self.lam, self.kappa, self.eps, variance)
        return (out.abs() > SATURATION_THRESHOLD).float().mean()

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, kappa={self.kappa}, eps={self.eps}, impl={self.impl}"


Site = Literal["attn", "ffn", "final"]


@dataclass(frozen=True)
class NormSpec:
    """Everything a model needs to know about one per-token norm.

    Attributes:
        name: registry key (a ``BlockForm.norm`` / ``ModelConfig.final_norm`` value).
        cls: the module class, constructed as ``cls(dim, impl=..., **site_kwargs(config, site))``.
        param_count: parameters of one norm of width ``dim`` (closed form, so ``steadylm params``
            and the models' parameter counts never build a module).
        site_kwargs: constructor arguments at ``site`` ("attn": before attention, "ffn": before the
            FFN, "final": after the last block) of a model built from ``config`` (a
            ``ModelConfig``; read by attribute, so this layer does not import models).
    """

    name: str
    cls: type[nn.Module]
    param_count: Callable[[int], int]
    site_kwargs: Callable[[Any, Site], dict[str, Any]]

    @property
    def module(self) -> str:
        """The Python module that defines the norm (a plug-in's, for a third-party norm)."""
        return self.cls.__module__


#: name -> module class. ``bhyt_star`` is the per-module (exact statistics) BHyT.
NORMS: dict[str, type[nn.Module]] = {}
#: name -> :class:`NormSpec` (the same keys as :data:`NORMS`).
NORM_SPECS: dict[str, NormSpec] = {}


def _no_site_kwargs(config: Any, site: Site) -> dict[str, Any]:
    return {}


def _counted_on_meta(cls: type[nn.Module]) -> Callable[[int], int]:
    def count(dim: int) -> int:
        with torch.device("meta"):
            return sum(p.numel() for p in cls(dim).parameters())

    return count


def register_norm(
    name: str,
    cls: type[nn.Module],
    *,
    param_count: Callable[[int], int] | None = None,
    site_kwargs: Callable[[Any, Site], dict[str, Any]] | None = None,
) -> type[nn.Module]:
    """Add a per-token norm: the only step a new norm needs (see :class:`NormSpec`).

    ``param_count`` defaults to counting the parameters of ``cls(dim)`` built on the meta device;
    ``site_kwargs`` to no arguments. A registered norm is also a block form of the same name (a
    pre-norm block with it at both sites, :func:`steadylm.models.forms.get_block_form`), so
    ``--norm NAME`` works at once.
    """
    if not isinstance(name, str) or not name or not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise ConfigError(f"register_norm needs a name and an nn.Module class, got {name!r}, {cls!r}")
    NORMS[name] = cls
    NORM_SPECS[name] = NormSpec(name, cls, param_count or _counted_on_meta(cls), site_kwargs or _no_site_kwargs)
    return cls


def _eps(config: Any, site: Site) -> dict[str, Any]:
    return {"eps": config.norm_eps}


def _dyt_kwargs(config: Any, site: Site) -> dict[str, Any]:
    # α0 = dyt_alpha_attn before attention, dyt_alpha_other elsewhere (the LLM recipe)
    return {"alpha_init": config.dyt_alpha_attn if site == "attn" else config.dyt_alpha_other}


def _bhyt_kwargs(config: Any, site: Site) -> dict[str, Any]:
    # λ0 = bhyt_lambda_attn before attention, bhyt_lambda_ffn elsewhere; κ and ε from the config
    lam = config.bhyt_lambda_attn if site == "attn" else config.bhyt_lambda_ffn
    return {"lam_init": lam, "kappa": config.bhyt_kappa, "eps": config.norm_eps}


register_norm("rmsnorm", RMSNorm, param_count=lambda d: d, site_kwargs=_eps)
register_norm("layernorm", LayerNorm, param_count=lambda d: 2 * d, site_kwargs=_eps)  # gain + bias
register_norm("dyt", DyT, param_count=lambda d: d + 1, site_kwargs=_dyt_kwargs)  # gain + α
register_norm("bhyt", BHyT, param_count=lambda d: d + 1, site_kwargs=_bhyt_kwargs)  # gain + λ
register_norm("bhyt_star", BHyT, param_count=lambda d: d + 1, site_kwargs=_bhyt_kwargs)


def get_norm_spec(name: str) -> NormSpec:
    """The :class:`NormSpec` of ``name``; unknown names raise ``ConfigError`` listing the known ones."""
    try:
        return NORM_SPECS[name]
    except KeyError:
        raise ConfigError(f"norm must be one of {sorted(NORMS)}, got {name!r}") from None


def build_norm(name: str, dim: int, **kwargs: Any) -> nn.Module:
    """Instantiate a registered norm; unknown names raise ``ConfigError`` listing the known ones."""
    cls = get_norm_spec(name).cls
    try:
        return cls(dim, **kwargs)
    except TypeError as err:
        raise ConfigError(f"norm {name!r}: {err}") from None
