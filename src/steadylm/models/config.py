"""``ModelConfig``: one validated, serialisable description of every decoder steadylm builds.

A config covers both testbeds of SPEC §3 — the Llama-style dense decoder (BHyT paper) and the
Ling-style MoE decoder (PowLU paper) — and any activation × norm (block form) combination, so an
experiment is a config value, never a code edit. Presets span ~1M to ~100M parameters; dense ones
are named by size (``nano``, ``micro``, ``small``, ``base``), Ling-style MoE ones carry a ``-moe``
suffix.

:func:`count_parameters` counts parameters from the config alone (a closed-form count that shares
no code with the modules), which is what ``steadylm params`` prints and what the tests compare
against the built model.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from steadylm.errors import ConfigError, check_choice
from steadylm.models.forms import (
    BLOCK_FORMS,
    FINAL_NORM_CHOICES,
    BlockForm,
    block_form_names,
    final_norm_names,
    get_block_form,
    norm_param_count,
)
from steadylm.nn import ACTIVATIONS, NORM_SPECS, get_activation
from steadylm.nn import IMPLS as NN_IMPLS
from steadylm.plugins import is_plugin_module, load_plugins

__all__ = [
    "BLOCK_NORMS",
    "FINAL_NORMS",
    "IMPLS",
    "PLUGINS_KEY",
    "PRESETS",
    "ModelConfig",
    "ParamCount",
    "count_parameters",
    "default_refresh_interval",
]

#: Block norm forms (SPEC §2) built in: the keys of :data:`steadylm.models.forms.BLOCK_FORMS` at
#: import. With plug-ins, :func:`steadylm.models.forms.block_form_names` is the current list.
BLOCK_NORMS: tuple[str, ...] = tuple(BLOCK_FORMS)
#: Built-in norms allowed after the last block (plug-ins: :func:`~steadylm.models.forms.final_norm_names`).
FINAL_NORMS: tuple[str, ...] = FINAL_NORM_CHOICES
#: Key of :meth:`ModelConfig.to_dict` that lists the plug-in modules the config's names come from.
PLUGINS_KEY = "plugins"
#: Implementations of the nn modules: the fused kernels or the float64-checkable reference math.
IMPLS: tuple[str, ...] = NN_IMPLS


def default_refresh_interval(total_steps: int) -> int:
    """K, the BHyT c_ℓ refresh interval: ``max(1, min(1000, total_steps // 50))`` (SPEC §2.4)."""
    return max(1, min(1000, int(total_steps) // 50))


@dataclass
class ModelConfig:
    """Architecture of a dense (Llama-style) or Ling-style MoE decoder.

    Defaults are the ``nano`` preset (the nanoGPT CPU-demo scale). ``n_experts == 0`` means dense;
    ``n_experts > 0`` makes layers ``n_dense_layers..n_layers-1`` MoE layers.
    """

    # --- shape -----------------------------------------------------------------------------
    vocab_size: int = 4096
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: same as n_heads (multi-head attention)
    ffn_dim: int = 384  # hidden width of the dense gated FFN
    max_seq_len: int = 256  # training context length T (also c_ℓ's T and the RoPE table size)
    head_size: int | None = None  # per-head width; None: dim // n_heads (Qwen3 sets it explicitly)
    qkv_bias: bool = False  # biases on the query/key/value projections (Qwen2)

    # --- activation (SPEC §1) ----------------------------------------------------------------
    activation: str = "swiglu"
    activation_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. {"m": 3} or {"limit": 7}
    # Optional per-layer overrides merged over activation_kwargs (length n_layers), e.g. the
    # per-layer clip limits of the "step" SwiGLU-Clip variant.
    layer_activation_kwargs: list[dict[str, Any]] | None = None

    # --- norms (SPEC §2) ---------------------------------------------------------------------
    norm: str = "rmsnorm"
    final_norm: str | None = None  # None: implied by ``norm`` (RMSNorm for bhyt, lns, peri_ln)
    norm_eps: float = 1e-6
    bhyt_kappa: float = 10.0
    bhyt_lambda_attn: float = 2.0  # published λ0, attention side
    bhyt_lambda_ffn: float = 1.0  # published λ0, FFN side (also the final BHyT* norm)
    bhyt_refresh_every: int | None = None  # K; None: max(1, min(1000, total_steps // 50))
    dyt_alpha_attn: float = 0.8  # DyT LLM recipe: α0 before attention
    dyt_alpha_other: float = 0.2  # ... before the FFN and at the final norm

    # --- embeddings, attention, init ---------------------------------------------------------
    tie_embeddings: bool = True
    init_std: float = 0.02
    qk_norm: bool = False
    rope_theta: float = 10000.0
    rope_fraction: float = 1.0  # share of each head's dims that are rotated (Ling: 0.5)
    # RoPE frequency scaling of imported checkpoints: None, {"type": "linear", "factor": f} or
    # {"type": "llama3", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}.
    rope_scaling: dict[str, Any] | None = None
    impl: str = "fused"  # nn implementation: "fused" kernels or the "reference" math

    # --- Ling-style MoE (SPEC §3) ------------------------------------------------------------
    n_experts: int = 0  # routed experts; 0 = dense model
    moe_top_k: int = 2
    n_shared_experts: int = 1
    n_dense_layers: int = 1  # leading layers that keep a dense FFN
    expert_ffn_dim: int | None = None  # hidden width of one expert; None: ffn_dim
    router_bias_update_rate: float = 1e-3  # aux-loss-free balancing step size
    moe_routed_scale: float = 1.0  # multiplies the renormalised top-k weights (Ling ships 2.5)

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        self.activation_kwargs = dict(self.activation_kwargs or {})
        if self.layer_activation_kwargs is not None:
            self.layer_activation_kwargs = [dict(kw or {}) for kw in self.layer_activation_kwargs]
        self.validate()

    # ------------------------------------------------------------------------------------------
    # derived values
    # ------------------------------------------------------------------------------------------

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads if self.head_size is None else self.head_size

    @property
    def rotary_dim(self) -> int:
        """Rotated dims per head (the first ``rotary_dim`` of each head; the rest pass through)."""
        return int(round(self.head_dim * self.rope_fraction))

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    @property
    def expert_hidden(self) -> int:
        return self.ffn_dim if self.expert_ffn_dim is None else self.expert_ffn_dim

    @property
    def block_form(self) -> BlockForm:
        """The :class:`~steadylm.models.forms.BlockForm` registered under ``norm``."""
        return get_block_form(self.norm)

    @property
    def final_norm_type(self) -> str:
        return self.block_form.final_norm if self.final_norm is None else self.final_norm

    def layer_is_moe(self, layer: int) -> bool:
        return self.is_moe and layer >= self.n_dense_layers

    def layer_activation(self, layer: int) -> dict[str, Any]:
        """The activation kwargs of layer ``layer`` (0-based): global ones, then its override."""
        kwargs = dict(self.activation_kwargs)
        if self.layer_activation_kwargs is not None:
            kwargs.update(self.layer_activation_kwargs[layer])
        return kwargs

    def refresh_interval(self, total_steps: int) -> int:
        """K for a run of ``total_steps`` optimizer steps."""
        if self.bhyt_refresh_every is not None:
            return self.bhyt_refresh_every
        return default_refresh_interval(total_steps)

    # ------------------------------------------------------------------------------------------
    # validation
    # ------------------------------------------------------------------------------------------

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid field and its allowed range."""
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            _check_int(name, getattr(self, name), minimum=1)
        if self.head_size is not None:
            _check_int("head_size", self.head_size, minimum=1)
        elif self.dim % self.n_heads != 0:
            raise ConfigError(
                f"ModelConfig.dim ({self.dim}) must be divisible by n_heads ({self.n_heads}) "
                "unless head_size is set"
            )
        if self.n_heads % self.n_kv_heads != 0:
            raise ConfigError(
                f"ModelConfig.n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads}) "
                "(grouped-query attention)"
            )
        _check_real("rope_fraction", self.rope_fraction, low=0.0, high=1.0)
        if self.rotary_dim % 2 != 0:
            raise ConfigError(
                f"ModelConfig.rope_fraction ({self.rope_fraction}) gives {self.rotary_dim} rotated "
                f"dims of head_dim {self.head_dim}; the rotated dims must be even"
            )
        _check_real("rope_theta", self.rope_theta, low=0.0, low_open=True)
        self._validate_rope_scaling()
        _check_real("init_std", self.init_std, low=0.0, low_open=True)
        _check_bool("tie_embeddings", self.tie_embeddings)
        _check_bool("qk_norm", self.qk_norm)
        _check_bool("qkv_bias", self.qkv_bias)
        check_choice("ModelConfig.impl", self.impl, IMPLS)

        check_choice("ModelConfig.norm", self.norm, block_form_names())
        if self.final_norm is not None:
            check_choice("ModelConfig.final_norm", self.final_norm, final_norm_names())
        _check_real("norm_eps", self.norm_eps, low=0.0)
        _check_real("bhyt_kappa", self.bhyt_kappa, low=0.0, low_open=True)
        _check_real("bhyt_lambda_attn", self.bhyt_lambda_attn, low=0.0, low_open=True)
        _check_real("bhyt_lambda_ffn", self.bhyt_lambda_ffn, low=0.0, low_open=True)
        if self.bhyt_refresh_every is not None:
            _check_int("bhyt_refresh_every", self.bhyt_refresh_every, minimum=1)
        _check_real("dyt_alpha_attn", self.dyt_alpha_attn, low=0.0, low_open=True)
        _check_real("dyt_alpha_other", self.dyt_alpha_other, low=0.0, low_open=True)

        _check_int("n_experts", self.n_experts, minimum=0)
        if self.is_moe:
            _check_int("moe_top_k", self.moe_top_k, minimum=1)
            if self.moe_top_k > self.n_experts:
                raise ConfigError(
                    f"ModelConfig.moe_top_k ({self.moe_top_k}) must be <= n_experts ({self.n_experts})"
                )
            _check_int("n_shared_experts", self.n_shared_experts, minimum=0)
            _check_int("n_dense_layers", self.n_dense_layers, minimum=0)
            if self.n_dense_layers >= self.n_layers:
                raise ConfigError(
                    f"ModelConfig.n_dense_layers ({self.n_dense_layers}) must be < n_layers "
                    f"({self.n_layers}) when n_experts > 0 (otherwise no layer is MoE)"
                )
            if self.expert_ffn_dim is not None:
                _check_int("expert_ffn_dim", self.expert_ffn_dim, minimum=1)
            _check_real("router_bias_update_rate", self.router_bias_update_rate, low=0.0)
            _check_real("moe_routed_scale", self.moe_routed_scale, low=0.0, low_open=True)

        self._validate_activation()

    def _validate_rope_scaling(self) -> None:
        scaling = self.rope_scaling
        if scaling is None:
            return
        required = {"linear": ("factor",),
                    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
        kind = scaling.get("type") if isinstance(scaling, dict) else None
        if kind not in required:
            raise ConfigError(f"ModelConfig.rope_scaling must be None or a dict with type in {sorted(required)}, "
                              f"got {scaling!r}")
        for key in required[kind]:
            value = scaling.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"ModelConfig.rope_scaling[{key!r}] must be a number > 0 for type {kind!r}, "
                                  f"got {value!r}")
        if kind == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
            raise ConfigError("ModelConfig.rope_scaling high_freq_factor must be > low_freq_factor")

    def _validate_activation(self) -> None:
        # The nn registry owns the activation names and their hyper-parameter checks.
        check_choice("ModelConfig.activation", self.activation, sorted(ACTIVATIONS))
        if not isinstance(self.activation_kwargs, dict):
            raise ConfigError("ModelConfig.activation_kwargs must be a dict of keyword arguments")
        if self.layer_activation_kwargs is not None and len(self.layer_activation_kwargs) != self.n_layers:
            raise ConfigError(
                f"ModelConfig.layer_activation_kwargs must have one entry per layer "
                f"({self.n_layers}), got {len(self.layer_activation_kwargs)}"
            )
        n_checked = 1 if self.layer_activation_kwargs is None else self.n_layers
        for layer in range(n_checked):
            kwargs = self.layer_activation(layer)
            where = "activation_kwargs" if self.layer_activation_kwargs is None else (
                f"layer_activation_kwargs[{layer}] (merged over activation_kwargs)"
            )
            try:
                get_activation(self.activation, self.impl, **kwargs)
            except (TypeError, ValueError) as err:
                keys = ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) or "none"
                raise ConfigError(
                    f"ModelConfig.{where} invalid for activation {self.activation!r} "
                    f"({keys}): {err}"
                ) from None

    # ------------------------------------------------------------------------------------------
    # presets and serialisation
    # ------------------------------------------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named preset (see :data:`PRESETS`) with ``overrides`` applied, validated."""
        check_choice("model preset", name, PRESETS)
        unknown = sorted(set(overrides) - _field_names())
        if unknown:
            raise ConfigError(f"unknown ModelConfig field(s) {unknown}; fields are {sorted(_field_names())}")
        return cls(**{**PRESETS[name], **overrides})

    def replace(self, **changes: Any) -> ModelConfig:
        """A validated copy with ``changes`` applied."""
        unknown = sorted(set(changes) - _field_names())
        if unknown:
            raise ConfigError(f"unknown ModelConfig field(s) {unknown}")
        return dataclasses.replace(self, **changes)

    def plugin_modules(self) -> list[str]:
        """The plug-in modules that define this config's activation and norms (empty for
        steadylm's own), so that loading the config can import them first."""
        modules = {ACTIVATIONS[self.activation].module}
        for norm in (self.block_form.norm, self.final_norm_type):
            if norm in NORM_SPECS:
                modules.add(NORM_SPECS[norm].module)
        return sorted(m for m in modules if is_plugin_module(m))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-compatible dict (what checkpoints store); with ``"plugins"`` only when the
        config uses a plug-in's names."""
        out = json.loads(json.dumps(dataclasses.asdict(self)))
        plugins = self.plugin_modules()
        if plugins:
            out[PLUGINS_KEY] = plugins
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """The config of a :meth:`to_dict` dict (its plug-in modules imported first)."""
        if not isinstance(data, dict):
            raise ConfigError(f"a ModelConfig dict is required, got {type(data).__name__}")
        if PLUGINS_KEY in data:
            data = dict(data)
            load_plugins(data.pop(PLUGINS_KEY) or ())
        unknown = sorted(set(data) - _field_names())
        if unknown:
            raise ConfigError(f"unknown ModelConfig field(s) {unknown}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"ModelConfig JSON is malformed: {err}") from None
        return cls.from_dict(data)


def _field_names() -> set[str]:
    return {f.name for f in dataclasses.fields(ModelConfig)}


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"ModelConfig.{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ConfigError(f"ModelConfig.{name} must be >= {minimum}, got {value}")


def _check_real(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"ModelConfig.{name} must be a finite real number, got {value!r}")
    if low is not None and (value < low or (low_open and value == low)):
        bound = f"> {low}" if low_open else f">= {low}"
        raise ConfigError(f"ModelConfig.{name} must be {bound}, got {value}")
    if high is not None and value > high:
        raise ConfigError(f"ModelConfig.{name} must be <= {high}, got {value}")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"ModelConfig.{name} must be true or false, got {value!r}")


# ----------------------------------------------------------------------------------------------
# presets
# ----------------------------------------------------------------------------------------------

# Ling-style MoE settings shared by the -moe presets: first layer dense, one shared expert,
# QK-norm, RoPE on half of each head (SPEC §3).
_LING = dict(n_shared_experts=1, n_dense_layers=1, qk_norm=True, rope_fraction=0.5)

def _moe(dense: dict[str, Any], n_experts: int, moe_top_k: int, expert_ffn_dim: int) -> dict[str, Any]:
    """A -moe preset: its dense preset's fields, routed experts and the Ling settings."""
    return dict(dense, n_experts=n_experts, moe_top_k=moe_top_k, expert_ffn_dim=expert_ffn_dim, **_LING)


_NANO = dict(vocab_size=4096, dim=128, n_layers=4, n_heads=4, n_kv_heads=4, ffn_dim=384, max_seq_len=256,
             tie_embeddings=True)
_MICRO = dict(vocab_size=8192, dim=256, n_layers=6, n_heads=4, n_kv_heads=2, ffn_dim=704, max_seq_len=512,
              tie_embeddings=True)
_SMALL = dict(vocab_size=16384, dim=512, n_layers=8, n_heads=8, n_kv_heads=4, ffn_dim=1408, max_seq_len=1024,
              tie_embeddings=True)

#: name -> ModelConfig fields. Parameter counts: ``steadylm params``.
PRESETS: dict[str, dict[str, Any]] = {
    # nanoGPT CPU-demo scale: 4 layers x 128 wide; vocab_size is set by the tokenizer.
    "nano": _NANO,
    "micro": _MICRO,
    "small": _SMALL,
    "base": dict(vocab_size=32768, dim=768, n_layers=12, n_heads=12, n_kv_heads=4, ffn_dim=2048,
                 max_seq_len=1024, tie_embeddings=True),
    "nano-moe": _moe(_NANO, n_experts=8, moe_top_k=2, expert_ffn_dim=128),
    "micro-moe": _moe(_MICRO, n_experts=16, moe_top_k=2, expert_ffn_dim=192),
    "small-moe": _moe(_SMALL, n_experts=16, moe_top_k=2, expert_ffn_dim=256),
    "base-moe": dict(vocab_size=32768, dim=512, n_layers=12, n_heads=8, n_kv_heads=2, ffn_dim=1408,
                     max_seq_len=1024, tie_embeddings=True, n_experts=32, moe_top_k=4,
                     expert_ffn_dim=128, **_LING),
}


# ----------------------------------------------------------------------------------------------
# closed-form parameter count
# ----------------------------------------------------------------------------------------------


class ParamCount(NamedTuple):
    total: int
    active: int  # parameters used per token: routed experts counted top_k / n_experts
    embedding: int  # token embedding (+ untied output head)


def count_parameters(config: ModelConfig) -> ParamCount:
    """Total and active parameter counts, computed from the config alone.

    Buffers (RoPE tables, c_ℓ, router biases) are not parameters and are not counted.
    """
    d, hd = config.dim, config.head_dim
    attention = d * config.n_heads * hd * 2 + d * config.n_kv_heads * hd * 2
    if config.qkv_bias:
        attention += (config.n_heads + 2 * config.n_kv_heads) * hd
    if config.qk_norm:
        attention += 2 * hd  # RMSNorm gains on q and k (per head_dim, shared across heads)

    block_norm = config.block_form.block_param_count(d)

    total = 0
    inactive = 0
    for layer in range(config.n_layers):
        total += attention + block_norm
        if config.layer_is_moe(layer):
            e = config.expert_hidden
            routed = config.n_experts * 3 * d * e
            total += d * config.n_experts  # router
            total += routed
            total += 3 * d * e * config.n_shared_experts  # shared expert(s), one wide FFN
            inactive += routed * (config.n_experts - config.moe_top_k) // config.n_experts
        else:
            total += 3 * d * config.ffn_dim

    embedding = config.vocab_size * d * (1 if config.tie_embeddings else 2)
    total += embedding
    total += norm_param_count(config.final_norm_type, d)
    if config.block_form.embed_scale:
        total += 1  # learnable scalar on the embedding output
    return ParamCount(total=total, active=total - inactive, embedding=embedding)
