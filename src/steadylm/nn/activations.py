"""Gated-FFN activations: the registry and the ``GatedFFN`` module.

An activation is ``act(gate, up)`` inside ``W_down(act(W_gate x, W_up x))``. Adding one is a single
:func:`register_activation` call naming the op (same name in ``functional`` and ``kernels``), its
keyword defaults and a validator.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import Tensor, nn

from steadylm import functional
from steadylm.errors import ConfigError
from steadylm.nn._impl import check_impl, resolve_op

__all__ = ["ACTIVATIONS", "Activation", "ActivationSpec", "GatedFFN", "get_activation", "register_activation"]


@dataclass(frozen=True)
class ActivationSpec:
    """How to build one gated activation.

    Attributes:
        name: registry key (the config value).
        op: function name, identical in ``steadylm.functional`` and ``steadylm.kernels``.
        defaults: keyword arguments the op accepts, with their defaults.
        validate: called with the merged keyword arguments; raises ``ValueError`` on bad values.
        reference: for an activation outside steadylm (a plug-in): ``act(gate, up, **kwargs)``
            itself, used for ``impl="reference"`` (and for ``"fused"`` when ``fused`` is None);
            ``op`` is then only its name.
        fused: a plug-in's fast path with the same signature (optional).
    """

    name: str
    op: str
    defaults: dict[str, Any] = field(default_factory=dict)
    validate: Callable[..., Any] = lambda **_: None
    reference: Callable[..., Tensor] | None = None
    fused: Callable[..., Tensor] | None = None

    def resolve(self, impl: str) -> Callable[..., Tensor]:
        """The op for ``impl``: a plug-in's own functions, or ``op`` in kernels / functional."""
        if self.reference is None:
            return resolve_op(impl, self.op)
        return self.fused if (impl == "fused" and self.fused is not None) else self.reference

    @property
    def module(self) -> str:
        """The Python module that defines the activation (a plug-in's, for a third-party one)."""
        return self.reference.__module__ if self.reference is not None else "steadylm.functional"


ACTIVATIONS: dict[str, ActivationSpec] = {}


def register_activation(spec: ActivationSpec) -> ActivationSpec:
    """Add an activation to :data:`ACTIVATIONS` (the only step a new activation needs)."""
    ACTIVATIONS[spec.name] = spec
    return spec


register_activation(ActivationSpec("swiglu", "swiglu"))
register_activation(
    ActivationSpec("powlu", "powlu_glu", {"m": 3.0}, lambda m: functional.validate_powlu_m(m))
)
register_activation(
    ActivationSpec(
        "swiglu_clip",
        "swiglu_clip",
        {"limit": 7.0, "variant": "gptoss", "alpha": 1.702},
        functional.validate_swiglu_clip,
    )
)


def _spec(name: str) -> ActivationSpec:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ConfigError(
            f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}"
        ) from None


def _merged_kwargs(spec: ActivationSpec, kwargs: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(kwargs) - set(spec.defaults))
    if unknown:
        allowed = sorted(spec.defaults) or "none"
        raise ConfigError(
            f"activation {spec.name!r} got unknown argument(s) {unknown}; allowed: {allowed}"
        )
    merged = {**spec.defaults, **kwargs}
    try:
        spec.validate(**merged)
    except ValueError as err:
        raise ConfigError(f"activation {spec.name!r}: {err}") from None
    return merged


def get_activation(name: str, impl: str = "fused", **kwargs: Any) -> Callable[[Tensor, Tensor], Tensor]:
    """``act(gate, up)`` for a registered activation, with its keyword arguments bound.

    Raises:
        ConfigError: unknown name (the message lists the known ones), unknown keyword, or a
            hyper-parameter out of range.
    """
    spec = _spec(name)
    merged = _merged_kwargs(spec, kwargs)
    return functools.partial(spec.resolve(check_impl(impl)), **merged)


class Activation(nn.Module):
    """A registered gated activation as a module (so ``print(model)`` shows name and arguments)."""

    def __init__(self, name: str, impl: str = "fused", **kwargs: Any) -> None:
        super().__init__()
        spec = _spec(name)
        self.name = name
        self.impl = check_impl(impl)
        self.kwargs = _merged_kwargs(spec, kwargs)
        self._fn = get_activation(name, impl, **kwargs)

    def forward(self, gate: Tensor, up: Tensor) -> Tensor:
        return self._fn(gate, up)

    def extra_repr(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        return f"{self.name}, impl={self.impl}" + (f", {args}" if args else "")


class GatedFFN(nn.Module):
    """``W_down(act(W_gate x, W_up x))`` — the Llama/Ling feed-forward with a pluggable activation.

    Probe points (``nn.Identity``, so forward hooks see the tensors without changing the math):
    ``gate_out`` (W_gate x), ``up_out`` (W_up x) and ``down_input`` (the activation output, the
    FFN down-projection input whose outliers the stability measurements track).

    Args:
        dim: model width.
        hidden: FFN width.
        activation: a name in :data:`ACTIVATIONS` (``swiglu``, ``powlu``, ``swiglu_clip``, ...).
        impl: ``"fused"`` (default) or ``"reference"``.
        bias: add biases to the three projections (Llama/Ling use none).
        **activation_kwargs: e.g. ``m=3.0`` for powlu, ``limit=7.0, variant="step"`` for swiglu_clip.
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        activation: str = "powlu",
        impl: str = "fused",
        bias: bool = False,
        **activation_kwargs: Any,
    ) -> None:
        super().__init__()
        if dim <= 0 or hidden <= 0:
            raise ConfigError(f"GatedFFN dim and hidden must be > 0, got dim={dim}, hidden={hidden}")
        self.w_gate = nn.Linear(dim, hidden, bias=bias)
        self.w_up = nn.Linear(dim, hidden, bias=bias)
        self.w_down = nn.Linear(hidden, dim, bias=bias)
        self.gate_out = nn.Identity()
        self.up_out = nn.Identity()
        self.down_input = nn.Identity()
        self.act = Activation(activation, impl, **activation_kwargs)

    def set_activation(self, name: str, impl: str | None = None, **kwargs: Any) -> None:
        """Swap the activation in place, keeping the weights (the mid-training switch)."""
        self.act = Activation(name, impl or self.act.impl, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        gate = self.gate_out(self.w_gate(x))
        up = self.up_out(self.w_up(x))
        return self.w_down(self.down_input(self.act(gate, up)))
