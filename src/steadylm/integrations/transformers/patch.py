"""PowLU, SwiGLU-Clip, fused RMSNorm and the BHyT block inside Hugging Face Llama-family models.

In the manner of Liger-Kernel's ``apply_liger_kernel_to_llama``, :func:`apply_steadylm` patches
either the classes (models built afterwards) or a live model instance in place, keeping its
weights:

* the MLP (``down_proj(act_fn(gate_proj x) * up_proj x)``) runs steadylm's fused gated op for the
  chosen activation (PowLU, SwiGLU-Clip, or SwiGLU);
* RMSNorms become steadylm's fused RMSNorm (same math);
* ``norm="bhyt"`` / ``"bhyt_star"`` turns each decoder layer into the BHyT block form through
  :class:`steadylm.nn.BHyTPair` — the same code steadylm's own block runs: statistics once per
  layer, v′ fed to the second norm, the c_ℓ buffer ``bhyt_correction`` (γ taken from the RMSNorm
  gains being replaced, λ0 as in steadylm: 2 and 1).

:class:`SteadyLMCallback` keeps c_ℓ right under ``transformers.Trainer`` (refresh every K optimizer
steps; a layer loaded by ``from_pretrained`` refreshes on its first forward, since HF's loader does
not run ``load_state_dict`` post-hooks).
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from steadylm import functional
from steadylm.errors import ConfigError, check_choice
from steadylm.models.hf_format import HIDDEN_ACTS, activation_kwargs_from_config
from steadylm.models import default_refresh_interval
from steadylm.nn import ACTIVATIONS, Activation, BHyT, BHyTPair, DyT, RMSNorm

__all__ = [
    "FAMILIES",
    "HIDDEN_ACTS",
    "PATCH_NORMS",
    "SteadyLMGate",
    "apply_steadylm",
    "refresh_bhyt",
]

#: Hugging Face model families the patch knows: family -> class-name prefix.
FAMILIES: dict[str, str] = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
#: ``norm`` values :func:`apply_steadylm` accepts (the block forms that fit an HF decoder layer).
PATCH_NORMS: tuple[str, ...] = ("rmsnorm", "bhyt", "bhyt_star")

# ----------------------------------------------------------------------------------------------
# hidden_act modules
# ----------------------------------------------------------------------------------------------


class _GatedProduct:
    """``act_fn(gate)`` of a SwiGLU-Clip gate: multiplying it by ``up`` runs the exact gated op
    (the clip forms also transform ``up``, which ``act(gate) * up`` cannot express otherwise)."""

    __slots__ = ("gate", "owner")

    def __init__(self, gate: Tensor, owner: SteadyLMGate) -> None:
        self.gate, self.owner = gate, owner

    def __mul__(self, up: Tensor) -> Tensor:
        return self.owner.gated(self.gate, up)

    __rmul__ = __mul__


class SteadyLMGate(nn.Module):
    """The module transformers builds for ``hidden_act`` in :data:`HIDDEN_ACTS`.

    ``forward(gate)``: for PowLU the gate factor f_m(gate) (so ``act(gate) * up`` is PowLU-GLU
    exactly); for SwiGLU-Clip a product-pending object whose ``* up`` gives the gated op.
    ``gated(gate, up)`` is the fused gated op itself (what patched MLPs call).
    """

    def __init__(self, activation: str = "powlu", impl: str = "fused", **kwargs: Any) -> None:
        super().__init__()
        self.fixed = dict(kwargs)
        self.configure_gate(activation, impl)

    def configure_gate(self, activation: str, impl: str = "fused", **kwargs: Any) -> None:
        """(Re)build with hyper-parameters (e.g. from the model config: ``m``, ``limit``)."""
        self.act = Activation(activation, impl, **{**self.fixed, **kwargs})

    def gated(self, gate: Tensor, up: Tensor) -> Tensor:
        return self.act(gate, up)

    def forward(self, gate: Tensor) -> Tensor | _GatedProduct:
        if self.act.name == "powlu":
            return functional.powlu_gate(gate, self.act.kwargs["m"])
        return _GatedProduct(gate, self)


# ----------------------------------------------------------------------------------------------
# patched modules
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    activation: str | None
    activation_kwargs: tuple[tuple[str, Any], ...]
    norm: str | None
    fused: bool
    lam_attn: float = 2.0
    lam_ffn: float = 1.0
    kappa: float = 10.0
    context_length: int | None = None

    @property
    def impl(self) -> str:
        return "fused" if self.fused else "reference"


class _SteadyMLP:
    """Mixin for an HF gated MLP: ``down_proj(act(gate_proj x, up_proj x))`` with steadylm's op."""

    steadylm_act: Activation

    def steadylm_setup(self, spec: _Spec, config: Any) -> None:
        name, base = spec.activation, {}
        current = getattr(self, "act_fn", None)
        if name is None:  # keep the model's activation, run it through the fused gated path
            name = current.act.name if isinstance(current, SteadyLMGate) else "swiglu"
            base = dict(current.act.kwargs) if isinstance(current, SteadyLMGate) else {}
        kwargs = {**base, **activation_kwargs_from_config(name, config), **dict(spec.activation_kwargs)}
        self.steadylm_act = Activation(name, spec.impl, **kwargs)  # type: ignore[misc]

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.steadylm_act(self.gate_proj(x), self.up_proj(x)))  # type: ignore[attr-defined]


class SteadyRMSNorm(RMSNorm):
    """steadylm's fused RMSNorm with the HF constructor ``(hidden_size, eps)``."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, impl: str = "fused") -> None:
        super().__init__(hidden_size, eps=eps, impl=impl)

    @property
    def variance_epsilon(self) -> float:
        return self.eps


class _SteadyBHyTLayer(BHyTPair):
    """Mixin for an HF decoder layer in the BHyT block form (sites: the layer's two RMSNorms)."""

    BHYT_SITES = ("input_layernorm", "post_attention_layernorm")
    _bhyt_heads: tuple[int, int]
    _bhyt_stale: bool
    _forward_params: tuple[str, ...] = ()

    def steadylm_setup(self, spec: _Spec, config: Any) -> None:
        attn = self.self_attn  # type: ignore[attr-defined]
        self._bhyt_heads = (int(config.num_attention_heads),
                            int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads))
        old = [getattr(self, name) for name in self.BHYT_SITES]
        gains = tuple(None if n.weight.device.type == "meta" else n.weight for n in old)
        self.init_bhyt_pair(
            int(config.hidden_size),
            lam_attn=spec.lam_attn,
            lam_ffn=spec.lam_ffn,
            kappa=spec.kappa,
            eps=float(getattr(config, "rms_norm_eps", 1e-6)),
            impl=spec.impl,
            context_length=int(spec.context_length or config.max_position_embeddings),
            exact=spec.norm == "bhyt_star",
            gains=gains,  # type: ignore[arg-type]
        )
        for norm in self.bhyt_sites:
            norm.to(device=attn.o_proj.weight.device, dtype=attn.o_proj.weight.dtype)
        self.bhyt_correction.data = self.bhyt_correction.to(attn.o_proj.weight.device)
        # Built on the meta device (from_pretrained): c_ℓ is computed from the loaded weights at
        # the first forward.
        self._bhyt_stale = attn.o_proj.weight.device.type == "meta"

    def bhyt_projections(self) -> tuple[Tensor, Tensor, int, int]:
        attn = self.self_attn  # type: ignore[attr-defined]
        return attn.v_proj.weight, attn.o_proj.weight, *self._bhyt_heads

    def refresh_bhyt_correction(self) -> None:
        super().refresh_bhyt_correction()
        self._bhyt_stale = False

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if args:  # HF calls decoder layers with keywords; map stray positionals by name
            kwargs.update(zip(self._forward_params, args))
        if self._bhyt_stale:
            self.refresh_bhyt_correction()
        attn_in, v = self.bhyt_attn_input(hidden_states)
        attn_out, _ = self.self_attn(hidden_states=attn_in, **kwargs)  # type: ignore[attr-defined]
        h = hidden_states + attn_out
        return h + self.mlp(self.bhyt_ffn_input(h, v))  # type: ignore[attr-defined]


_CLASS_CACHE: dict[tuple[type, type, _Spec], type] = {}


def _patched_class(base: type[nn.Module], mixin: type, spec: _Spec) -> type[nn.Module]:
    """``class SteadyLM<Base>(mixin, base)`` whose ``__init__`` runs the base init then the setup."""
    key = (base, mixin, spec)
    if key in _CLASS_CACHE:
        return _CLASS_CACHE[key]

    def __init__(self: Any, config: Any, *args: Any, **kwargs: Any) -> None:
        base.__init__(self, config, *args, **kwargs)
        self.steadylm_setup(spec, config)

    namespace: dict[str, Any] = {"__init__": __init__, "_steadylm_spec": spec, "__module__": base.__module__}
    if mixin is _SteadyBHyTLayer:
        params = list(inspect.signature(base.forward).parameters)[2:]  # after self, hidden_states
        namespace["_forward_params"] = tuple(p for p in params if p not in ("args", "kwargs"))
    cls = type(f"SteadyLM{base.__name__}", (mixin, base), namespace)
    _CLASS_CACHE[key] = cls
    return cls


# ----------------------------------------------------------------------------------------------
# apply_steadylm
# ----------------------------------------------------------------------------------------------


def _spec(activation: str | None, norm: str | None, fused: bool, kwargs: dict[str, Any]) -> _Spec:
    if activation is not None:
        check_choice("apply_steadylm activation", activation, sorted(ACTIVATIONS))
    if norm is not None:
        check_choice("apply_steadylm norm", norm, PATCH_NORMS, hint="the forms that fit an HF decoder layer; "
                     "dyt, lns, peri_ln and MoE need an exported steadylm model")
    block_keys = {"lam_attn", "lam_ffn", "kappa", "context_length"}
    block = {k: kwargs.pop(k) for k in list(kwargs) if k in block_keys}
    if activation is not None:
        Activation(activation, **kwargs)  # validates the hyper-parameters (ConfigError names them)
    elif kwargs:
        raise ConfigError(f"apply_steadylm got unknown argument(s) {sorted(kwargs)}")
    return _Spec(activation, tuple(sorted(kwargs.items())), norm, bool(fused), **block)


def _is_gated_mlp(module: nn.Module) -> bool:
    return all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn"))


def _is_decoder_layer(module: nn.Module) -> bool:
    attn = getattr(module, "self_attn", None)
    return (hasattr(module, "input_layernorm") and hasattr(module, "post_attention_layernorm")
            and hasattr(module, "mlp") and attn is not None and hasattr(attn, "v_proj") and hasattr(attn, "o_proj"))


def _is_hf_rmsnorm(module: nn.Module) -> bool:
    name = type(module).__name__
    return any(name == f"{prefix}RMSNorm" for prefix in FAMILIES.values())


def _swap_rmsnorm(parent: nn.Module, name: str, old: nn.Module, impl: str) -> None:
    new = SteadyRMSNorm(old.weight.shape[0], eps=float(old.variance_epsilon), impl=impl)
    new.to(device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(old.weight)
    setattr(parent, name, new)


def _patch_instance(model: nn.Module, spec: _Spec) -> nn.Module:
    config = getattr(model, "config", None)
    if config is None:
        raise ConfigError("apply_steadylm(model) needs a transformers PreTrainedModel (with .config)")
    layers = [m for m in model.modules() if _is_decoder_layer(m)]
    mlps = [m for m in model.modules() if _is_gated_mlp(m)]
    if not layers or not mlps:
        raise ConfigError(
            f"apply_steadylm: {type(model).__name__} has no Llama-style decoder layers / gated MLPs; "
            f"supported families: {', '.join(FAMILIES)}"
        )
    if spec.activation is not None or spec.fused:
        for mlp in mlps:
            if not isinstance(mlp, _SteadyMLP):
                mlp.__class__ = _patched_class(type(mlp), _SteadyMLP, spec)
            mlp.steadylm_setup(spec, config)  # type: ignore[attr-defined]
    if spec.norm in ("bhyt", "bhyt_star"):
        for layer in layers:
            if not isinstance(layer, _SteadyBHyTLayer):
                layer.__class__ = _patched_class(type(layer), _SteadyBHyTLayer, spec)
            layer.steadylm_setup(spec, config)  # type: ignore[attr-defined]
    if spec.fused or spec.norm is not None:
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if _is_hf_rmsnorm(child):
                    _swap_rmsnorm(parent, name, child, spec.impl)
    return model


def _patch_classes(spec: _Spec) -> list[str]:
    """Replace the families' MLP / RMSNorm / decoder-layer classes for models built afterwards."""
    replacements: dict[str, type[nn.Module]] = {}
    for family, prefix in FAMILIES.items():
        try:
            module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
        except ImportError:  # pragma: no cover - family missing from this transformers
            continue
        if spec.activation is not None or spec.fused:
            base = getattr(module, f"{prefix}MLP")
            replacements[f"{prefix}MLP"] = _patched_class(_unpatched(base), _SteadyMLP, spec)
        if spec.fused or spec.norm is not None:
            impl = spec.impl
            replacements[f"{prefix}RMSNorm"] = type(
                f"SteadyLM{prefix}RMSNorm", (SteadyRMSNorm,),
                {"__init__": lambda self, hidden_size, eps=1e-6, _impl=impl: SteadyRMSNorm.__init__(
                    self, hidden_size, eps, _impl)},
            )
        if spec.norm in ("bhyt", "bhyt_star"):
            base = getattr(module, f"{prefix}DecoderLayer")
            replacements[f"{prefix}DecoderLayer"] = _patched_class(_unpatched(base), _SteadyBHyTLayer, spec)
        for name, cls in replacements.items():
            if name.startswith(prefix) and not _has_patch_mapping():
                setattr(module, name, cls)  # older transformers: Liger-style module attributes
    if _has_patch_mapping():
        from transformers.monkey_patching import register_patch_mapping

        register_patch_mapping(replacements, overwrite=True)
    return sorted(replacements)


def _unpatched(cls: type) -> type:
    """The stock transformers class under a (possibly already) patched one."""
    return next(c for c in cls.__mro__ if not issubclass(c, (_SteadyMLP, BHyTPair)))


def _has_patch_mapping() -> bool:
    try:
        from transformers.monkey_patching import register_patch_mapping  # noqa: F401
    except ImportError:
        return False
    return True


def apply_steadylm(
    model: nn.Module | None = None,
    *,
    activation: str | None = None,
    norm: str | None = None,
    fused: bool = True,
    **kwargs: Any,
) -> nn.Module | list[str]:
    """Put PowLU / SwiGLU-Clip, fused RMSNorm and the BHyT block into HF Llama-family models.

    Args:
        model: an HF model instance to patch in place (weights kept); ``None`` patches the
            Llama, Mistral, Qwen2 and Qwen3 classes for models built afterwards (through
            ``transformers.monkey_patching.register_patch_mapping``: ``from_pretrained`` and
            ``from_config``, or any construction inside ``apply_patches()``).
        activation: a steadylm activation (``powlu``, ``swiglu_clip``, ``swiglu``); None keeps the
            model's (run through the fused gated path when ``fused``).
        norm: ``"rmsnorm"`` (fused RMSNorm), ``"bhyt"`` or ``"bhyt_star"`` (the block form); None
            keeps the norms (fused RMSNorm when ``fused``).
        fused: steadylm's fused kernels (True) or its float64-checkable reference math.
        **kwargs: activation hyper-parameters (``m``, ``limit``, ``variant``, ``alpha``) and BHyT
            ones (``lam_attn=2``, ``lam_ffn=1``, ``kappa=10``, ``context_length`` = T in c_ℓ,
            default the config's ``max_position_embeddings``).

    Returns:
        The patched model, or (class patching) the names of the replaced classes.
    """
    spec = _spec(activation, norm, fused, dict(kwargs))
    if model is None:
        return _patch_classes(spec)
    return _patch_instance(model, spec)


# ----------------------------------------------------------------------------------------------
# c_ℓ under Trainer, and HF's loader
# ----------------------------------------------------------------------------------------------


def refresh_bhyt(model: nn.Module) -> int:
    """Recompute c_ℓ of every BHyT layer (steadylm's or a patched HF one); returns how many."""
    layers = [m for m in model.modules() if isinstance(m, BHyTPair)]
    for layer in layers:
        layer.refresh_bhyt_correction()
    return len(layers)


def _make_callback_class() -> type:
    from transformers import TrainerCallback

    class SteadyLMCallback(TrainerCallback):
        """Keeps steadylm state right under ``transformers.Trainer``.

        c_ℓ is recomputed at the start of training and every K optimizer steps (K =
        ``refresh_every``, default ``max(1, min(1000, max_steps // 50))``, SPEC §2.4); a steadylm
        model's MoE router biases are updated after every step.
        """

        def __init__(self, refresh_every: int | None = None) -> None:
            if refresh_every is not None and (isinstance(refresh_every, bool) or int(refresh_every) < 1):
                raise ConfigError(f"SteadyLMCallback refresh_every must be an integer >= 1, got {refresh_every!r}")
            self.refresh_every = refresh_every
            self.refreshes = 0

        def interval(self, max_steps: int) -> int:
            return self.refresh_every or default_refresh_interval(max_steps)

        def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                           **kwargs: Any) -> None:
            if model is not None:
                refresh_bhyt(model)

        def on_step_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                        **kwargs: Any) -> None:
            if model is None:
                return
            with torch.no_grad():
                inner = getattr(model, "model", None)
                if hasattr(inner, "moe_layers"):
                    for moe in inner.moe_layers():
                        moe.update_router_bias()
                if state.global_step % self.interval(state.max_steps) == 0:
                    if refresh_bhyt(model):
                        self.refreshes += 1

    return SteadyLMCallback


@torch.no_grad()
def _init_steadylm_module(module: nn.Module) -> None:
    """Initialise steadylm modules HF's loader left uninitialised (missing from a checkpoint)."""
    # Only parameters the loader did not fill (HF flags loaded ones with _is_hf_initialized).
    if isinstance(module, (BHyT, DyT)):
        scalar, value = (module.lam, module.lam_init) if isinstance(module, BHyT) else (module.alpha, module.alpha_init)
        for param, init in ((module.weight, 1.0), (scalar, value)):
            if not getattr(param, "_is_hf_initialized", False):
                param.fill_(init)
    if isinstance(module, _SteadyBHyTLayer):
        module._bhyt_stale = True  # c_ℓ from the loaded weights at the first forward
