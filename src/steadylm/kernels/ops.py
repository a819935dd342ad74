"""Fused fast paths: the public ops, their autograd, and how they are compiled.

Design
------
* Each op's autograd saves **only its inputs**, and its backward recomputes the intermediates
  (sigmoid, tanh, the per-token statistic) from them.
  Activation memory between forward and backward is therefore exactly the inputs, which the
  surrounding graph keeps alive anyway (they are the matmul outputs / block input).
* The forward and the backward are pure functions (:mod:`steadylm.kernels._math`), each compiled
  with ``torch.compile``: Inductor turns each into one fused loop nest per pass — C++/OpenMP on
  CPU, Triton on CUDA, from the same source.
* Norm inputs are flattened to ``[tokens, d]`` and activation inputs to ``[n]``, and the token /
  element dimension is marked dynamic, so new batch or sequence sizes reuse the compiled kernel
  instead of recompiling.
* RMSNorm's and BHyT's backward on CUDA (eager) are hand-written Triton kernels that also accumulate
  the γ gradient in the row loop (:mod:`.triton_norms`: 3 tensor passes instead of Inductor's 5).
* Every op is also a ``torch.library`` custom op (:mod:`.library`: ``steadylm::<op>`` and
  ``steadylm::<op>_backward``, with fake implementations and ``register_autograd``). Eager calls
  go through them; inside a model that is itself ``torch.compile``'d each op is chosen per device
  (:data:`COMPILED_INLINE`): either the custom op, opaque to Dynamo, so the compiled model runs the
  same fused forward and backward kernels as eager (and the Triton backward on CUDA), or an
  ``autograd.Function`` built from the custom op's own parts (:func:`_traced`), which Dynamo traces
  through so that Inductor re-derives the kernels from the same math and may fuse them with their
  neighbours. Both give 0 graph breaks. Which of the three paths a call takes (forward alone,
  traced, custom op) is decided in one place, :func:`_apply`.
* The BHyT block's first site is one op, :func:`bhyt_and_mean_square`: the site's output and the
  block statistic v from one kernel, and one backward pass that also takes the gradient flowing
  into v from the second site.

Set the environment variable ``STEADYLM_COMPILE_KERNELS=0`` (or call :func:`set_compile`) to run
the very same math eagerly, e.g. where no C++ compiler is available.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from steadylm import functional as F_ref
from steadylm.kernels import _compile, library
from steadylm.kernels._compile import compile_enabled, set_compile
from steadylm.kernels.linear_ce import linear_cross_entropy

__all__ = [
    "COMPILED_INLINE",
    "bhyt",
    "bhyt_and_mean_square",
    "compile_enabled",
    "dyt",
    "linear_cross_entropy",
    "mean_square",
    "powlu_glu",
    "rms_norm",
    "set_compile",
    "swiglu",
    "swiglu_clip",
]

#: device type -> the ops that a ``torch.compile``'d model traces through (Inductor fuses their math
#: with the neighbours) instead of calling the opaque custom op. Chosen per op by measurement inside a
#: compiled model (BENCHMARKS.md, "Fused ops inside compiled models"); devices not listed use the
#: custom ops everywhere (on CUDA they keep the hand-written Triton backward of the norms).
#: CPU: the norms that feed a matmul from the residual stream are inlined — RMSNorm and both BHyT
#: sites. Inductor fuses their math with the residual add before them: inlined / opaque compiled
#: step time 0.963 [0.90–1.00] for RMSNorm, and with the other BHyT site already inlined 0.953
#: [0.93–0.97] for the second BHyT site and 0.977 [0.97–1.00] for the first (micro, 8×256, 9–15
#: interleaved rounds, session 10; the BHyT sites were ties while the custom ops' forwards ran
#: single-threaded). The gated activations and DyT measured ties, every p20–p80 spread across 1
#: (medians: swiglu 0.986–1.033, powlu_glu 1.004–1.006, swiglu_clip 0.964–0.988, dyt 0.952–0.982),
#: so they keep their fused forward and backward as custom ops.
COMPILED_INLINE: dict[str, frozenset[str]] = {"cpu": frozenset({"rms_norm", "bhyt", "bhyt_and_mean_square"})}


def _inline(name: str, like: Tensor) -> bool:
    """Whether op ``name`` is traced through here (only while an outer ``torch.compile`` traces)."""
    return torch.compiler.is_compiling() and name in COMPILED_INLINE.get(like.device.type, frozenset())


def _forward_only(*tensors: Tensor | None) -> bool:
    """No gradient will be asked for (no grad mode, or no input requires one): then the op is its
    forward kernel alone — eager, the compiled kernel without the autograd and dispatcher layers
    (per-op overhead is most of a small decode step); under ``torch.compile``, the forward math
    traced into the graph, where Inductor fuses it with its neighbours (the custom op's reason to
    exist, the fused backward, does not apply)."""
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))


def _placeholder(like: Tensor) -> Tensor:
    """A tiny stand-in for an absent optional tensor (never read when its flag is False)."""
    return like.new_zeros(())


def _scalar_param(value: Tensor | float, like: Tensor, name: str) -> Tensor:
    """A learnable scalar as the kernels take it — a 0-dim or ``[1]`` tensor, passed as it is (the
    modules keep λ and α as ``[1]`` parameters; a reshape would cost a microsecond of every decode
    call, and the kernels return each gradient in its parameter's shape) — or a float turned into a
    constant 0-dim tensor."""
    if isinstance(value, Tensor):
        if value.dim() <= 1 and value.numel() == 1:
            return value
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar (0-dim tensor or float), got shape {tuple(value.shape)}")
        return value.reshape(())
    return torch.tensor(float(value), dtype=torch.float32, device=like.device)


def _check_same_shape(gate: Tensor, up: Tensor) -> None:
    if gate.shape != up.shape:
        raise ValueError(f"gate and up must have the same shape, got {tuple(gate.shape)} and {tuple(up.shape)}")


def _check_weight(weight: Tensor | None, d: int, name: str = "weight") -> None:
    if weight is not None and tuple(weight.shape) != (d,):
        raise ValueError(f"{name} must have shape ({d},) (the hidden size), got {tuple(weight.shape)}")


def _fresh(output: Tensor | tuple[Tensor, ...]) -> Tensor | tuple[Tensor, ...]:
    """The traced forward's outputs as new views of themselves.

    Why: every ``_math`` kernel ends in ``.to(x.dtype)``, a no-op that returns its operand when
    the dtype already matches. Under torch 2.11 (measured; 2.13 is fine), an ``autograd.Function``
    traced by Dynamo whose forward returns such a pass-through gets a wrong backward: the gradient
    of every input is off (x's by up to 40× on a tiny RMSNorm block), with no error. A view is a
    new tensor object and costs nothing in the compiled graph."""
    if isinstance(output, tuple):
        return tuple(t.view_as(t) for t in output)
    return output.view_as(output)


def _traced(name: str) -> type[torch.autograd.Function]:
    """The ``autograd.Function`` that a compiled model traces through for op ``name``: the custom
    op's own parts (:data:`.library.PARTS`), with the backward implementation called in place of
    the backward op, so Inductor sees the math of both passes."""
    parts = library.PARTS[name]
    backward = parts.autograd(parts.backward)

    class Traced(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, *inputs: Any) -> Any:
            output = _fresh(parts.forward(*inputs))
            parts.setup(ctx, inputs, output)
            return output

        @staticmethod
        def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
            return backward(ctx, *grads)

    Traced.__name__ = Traced.__qualname__ = f"_Traced_{name}"
    return Traced


_TRACED: dict[str, type[torch.autograd.Function]] = {name: _traced(name) for name in library.PARTS}


def _apply(name: str, *args: Any) -> Any:
    """Op ``name`` on ``args`` — the custom op's arguments, tensors already flattened: the forward
    kernel alone when no gradient is wanted (placeholders never require one), the traced
    ``autograd.Function`` where :data:`COMPILED_INLINE` inlines it, else the custom op. Under
    forward-mode AD the forward kernel's ATen math too: the custom op has no JVP, and the ATen ops
    carry tangents forward and gradients back (the backward is then autograd's, not the fused one)."""
    # Checked without building a tuple of the tensors first: in a decode step the op's own work is
    # a few microseconds, so its Python overhead is a measurable share of the step.
    if (
        not torch.is_grad_enabled()
        or _forward_only(*(a for a in args if isinstance(a, Tensor)))
        or _compile.forward_ad_open()
    ):
        return library.PARTS[name].forward(*args)
    if _inline(name, args[0]):
        return _TRACED[name].apply(*args)
    return library.OPS[name][0](*(a.contiguous() if isinstance(a, Tensor) else a for a in args))


# --------------------------------------------------------------------------------------------
# activations
# --------------------------------------------------------------------------------------------


def _gated(name: str, gate: Tensor, up: Tensor, *hparams: Any) -> Tensor:
    """Flatten, then op ``name`` with its hyper-parameters."""
    _check_same_shape(gate, up)
    return _apply(name, gate.reshape(-1), up.reshape(-1), *hparams).reshape_as(gate)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """Fused SwiGLU ``silu(gate) · up``; same semantics as :func:`steadylm.functional.swiglu`."""
    return _gated("swiglu", gate, up)


def powlu_glu(gate: Tensor, up: Tensor, m: float = 3.0) -> Tensor:
    """Fused gated PowLU ``f_m(gate) · up``; same semantics as :func:`steadylm.functional.powlu_glu`."""
    return _gated("powlu_glu", gate, up, F_ref.validate_powlu_m(m))


def swiglu_clip(
    gate: Tensor,
    up: Tensor,
    limit: float = 7.0,
    variant: str = "gptoss",
    alpha: float = 1.702,
) -> Tensor:
    """Fused SwiGLU-Clip; same semantics as :func:`steadylm.functional.swiglu_clip`."""
    return _gated("swiglu_clip", gate, up, *F_ref.validate_swiglu_clip(limit, variant, alpha))


# --------------------------------------------------------------------------------------------
# norms
# --------------------------------------------------------------------------------------------


def _optional(t: Tensor | None, like: Tensor) -> Tensor:
    return t if t is not None else _placeholder(like)


def rms_norm(x: Tensor, weight: Tensor | None, eps: float = 1e-6) -> Tensor:
    """Fused RMSNorm ``γ ⊙ x / sqrt(mean(x²) + ε)``; same semantics as :func:`steadylm.functional.rms_norm`."""
    eps = F_ref.validate_eps(eps)
    d = x.shape[-1]
    _check_weight(weight, d)
    return _apply("rms_norm", x.reshape(-1, d), _optional(weight, x), eps, weight is not None).reshape_as(x)


def mean_square(x: Tensor) -> Tensor:
    """Fused per-token ``mean(x²)`` (fp32, shape ``x.shape[:-1] + (1,)``): one pass forward, one
    elementwise pass backward; same semantics as :func:`steadylm.functional.mean_square` (the BHyT
    block's shared statistic). Tiny rows are always rescued (there is no ε)."""
    return _apply("mean_square", x.reshape(-1, x.shape[-1])).reshape(tuple(x.shape[:-1]) + (1,))


def dyt(x: Tensor, weight: Tensor | None, alpha: Tensor | float, bias: Tensor | None = None) -> Tensor:
    """Fused Dynamic Tanh ``γ ⊙ tanh(α x) (+ β)``; same semantics as :func:`steadylm.functional.dyt`."""
    d = x.shape[-1]
    _check_weight(weight, d)
    _check_weight(bias, d, "bias")
    alpha_t = _scalar_param(alpha, x, "alpha")
    flags = (weight is not None, bias is not None)
    out = _apply("dyt", x.reshape(-1, d), _optional(weight, x), alpha_t, _optional(bias, x), *flags)
    return out.reshape_as(x)


def bhyt(
    x: Tensor,
    weight: Tensor | None,
    lam: Tensor | float,
    kappa: float = 10.0,
    eps: float = 1e-6,
    variance: Tensor | None = None,
) -> Tensor:
    """Fused BHyT ``γ ⊙ tanh(λ·x/(κ·sqrt(v + ε)))``; same semantics as :func:`steadylm.functional.bhyt`.

    ``variance`` (per-token mean square, ``x.shape[:-1] + (1,)``) replaces ``mean(x²)`` when given
    and receives its gradient.
    """
    kappa = F_ref.validate_kappa(kappa)
    eps = F_ref.validate_eps(eps)
    d = x.shape[-1]
    _check_weight(weight, d)
    if variance is not None:
        F_ref.validate_variance(variance, x)
        v = variance.reshape(-1, 1)
    else:
        v = _placeholder(x)
    lam_t = _scalar_param(lam, x, "lam")
    flags = (kappa, eps, weight is not None, variance is not None)
    return _apply("bhyt", x.reshape(-1, d), _optional(weight, x), lam_t, v, *flags).reshape_as(x)


def bhyt_and_mean_square(
    x: Tensor, weight: Tensor | None, lam: Tensor | float, kappa: float = 10.0, eps: float = 1e-6
) -> tuple[Tensor, Tensor]:
    """The BHyT block's first site and statistic from one kernel: ``(bhyt(x, …, variance=v), v)``
    with ``v = mean_square(x)`` (fp32, shape ``x.shape[:-1] + (1,)``).

    Same values as ``v = functional.mean_square(x); functional.bhyt(x, weight, lam, kappa, eps,
    variance=v)``. The backward is one pass too: the gradient reaching ``v`` from elsewhere (the
    second site's ``variance = v + shift``) folds into ``dx`` as ``dv · 2x/d``.
    """
    kappa = F_ref.validate_kappa(kappa)
    eps = F_ref.validate_eps(eps)
    d = x.shape[-1]
    _check_weight(weight, d)
    lam_t = _scalar_param(lam, x, "lam")
    x2 = x.reshape(-1, d)
    out, v = _apply("bhyt_and_mean_square", x2, _optional(weight, x), lam_t, kappa, eps, weight is not None)
    return out.reshape_as(x), v.reshape(tuple(x.shape[:-1]) + (1,))
