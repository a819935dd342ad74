"""Fused fast paths: the public ops, their autograd, and how they are compiled.

Design
------
* Each op is a ``torch.autograd.Function`` whose ``forward`` saves **only its inputs** and whose
  ``backward`` recomputes the intermediates (sigmoid, tanh, the per-token statistic) from them.
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
  same fused forward and backward kernels as eager (and the Triton backward on CUDA), or the
  ``autograd.Function`` below, which Dynamo traces through so that Inductor re-derives the kernels
  from the same math and may fuse them with their neighbours. Both give 0 graph breaks.
* The BHyT block's first site is one op, :func:`bhyt_and_mean_square`: the site's output and the
  block statistic v from one kernel, and one backward pass that also takes the gradient flowing
  into v from the second site.

Set the environment variable ``STEADYLM_COMPILE_KERNELS=0`` (or call :func:`set_compile`) to run
the very same math eagerly, e.g. where no C++ compiler is available.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from steadylm import functional as F_ref
from steadylm.kernels import _math, library, triton_norms
from steadylm.kernels._compile import _mark_rows_dynamic, _run, compile_enabled, set_compile

__all__ = [
    "COMPILED_INLINE",
    "bhyt",
    "bhyt_and_mean_square",
    "compile_enabled",
    "dyt",
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
#: CPU: RMSNorm inlined — Inductor's own fusion (with the residual add before it and the matmul
#: epilogue after it) measured 0.81–0.85× the opaque op's step time in two runs; every other op
#: measured ≥ 1 or a tie, so it keeps its fused forward and backward as a custom op.
COMPILED_INLINE: dict[str, frozenset[str]] = {"cpu": frozenset({"rms_norm"})}


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


def _allow_upscale(eps: float) -> bool:
    # A Python bool, decided outside the compiled function so that it specialises the kernel
    # (a comparison on a traced float would add a guard per call site instead).
    return eps < _math.TINY_EPS


def _placeholder(like: Tensor) -> Tensor:
    """A tiny stand-in for an absent optional tensor (never read when its flag is False)."""
    return like.new_zeros(())


def _scalar_param(value: Tensor | float, like: Tensor, name: str) -> Tensor:
    """A learnable scalar (0-dim tensor) or a float turned into a constant 0-dim tensor."""
    if isinstance(value, Tensor):
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


# --------------------------------------------------------------------------------------------
# activations
# --------------------------------------------------------------------------------------------


class _GatedActivation(torch.autograd.Function):
    """Elementwise ``act(gate, up)`` on flat tensors; saves gate and up only."""

    @staticmethod
    def forward(ctx: Any, gate: Tensor, up: Tensor, fwd: Callable, bwd: Callable, hparams: tuple) -> Tensor:
        ctx.save_for_backward(gate, up)
        ctx.bwd = bwd
        ctx.hparams = hparams
        return _run(fwd, gate, up, *hparams)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        gate, up = ctx.saved_tensors
        _mark_rows_dynamic(gate, up, dy)
        d_gate, d_up = _run(ctx.bwd, gate, up, dy.contiguous(), *ctx.hparams)
        return d_gate, d_up, None, None, None


def _gated(name: str, gate: Tensor, up: Tensor, kernels: str, hparams: tuple, op_args: tuple) -> Tensor:
    """Flatten, then the custom op ``name`` (``op_args``) or, inlined under compile, the traced
    ``_math.<kernels>_fwd/_bwd`` (``hparams``; looked up by name at call time)."""
    _check_same_shape(gate, up)
    shape = gate.shape
    g, u = gate.reshape(-1), up.reshape(-1)
    if _forward_only(g, u):
        _mark_rows_dynamic(g, u)
        return _run(getattr(_math, kernels + "_fwd"), g, u, *hparams).reshape(shape)
    if _inline(name, g):
        fwd, bwd = getattr(_math, kernels + "_fwd"), getattr(_math, kernels + "_bwd")
        return _GatedActivation.apply(g, u, fwd, bwd, hparams).reshape(shape)
    return library.OPS[name][0](g.contiguous(), u.contiguous(), *op_args).reshape(shape)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """Fused SwiGLU ``silu(gate) · up``; same semantics as :func:`steadylm.functional.swiglu`."""
    return _gated("swiglu", gate, up, "swiglu", (), ())


def powlu_glu(gate: Tensor, up: Tensor, m: float = 3.0) -> Tensor:
    """Fused gated PowLU ``f_m(gate) · up``; same semantics as :func:`steadylm.functional.powlu_glu`."""
    m = F_ref.validate_powlu_m(m)
    return _gated("powlu_glu", gate, up, "powlu_glu", (m,), (m,))




def swiglu_clip(
    gate: Tensor,
    up: Tensor,
    limit: float = 7.0,
    variant: str = "gptoss",
    alpha: float = 1.702,
) -> Tensor:
    """Fused SwiGLU-Clip; same semantics as :func:`steadylm.functional.swiglu_clip`."""
    limit, variant, alpha = F_ref.validate_swiglu_clip(limit, variant, alpha)
    hparams = (limit, alpha) if variant == "gptoss" else (limit,)
    return _gated("swiglu_clip", gate, up, f"swiglu_clip_{variant}", hparams, (limit, variant, alpha))


# --------------------------------------------------------------------------------------------
# norms
# --------------------------------------------------------------------------------------------


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, eps: float, has_weight: bool) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.eps, ctx.has_weight = eps, has_weight
        return _run(_math.rms_norm_fwd, x, weight, eps=eps, has_weight=has_weight, allow_upscale=_allow_upscale(eps))

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        need_w = ctx.has_weight and ctx.needs_input_grad[1]
        if triton_norms.usable(x, ctx.eps):  # CUDA, eager: one pass for dx and dγ
            dx, dw = triton_norms.rms_norm_bwd(
                x,
                weight,
                dy,
                eps=ctx.eps,
                has_weight=ctx.has_weight,
                allow_upscale=_allow_upscale(ctx.eps),
                need_weight_grad=need_w,
            )
            return dx, dw, None, None
        _mark_rows_dynamic(x, dy)
        dx, dw = _run(
            _math.rms_norm_bwd,
            x,
            weight,
            dy.contiguous(),
            eps=ctx.eps,
            has_weight=ctx.has_weight,
            allow_upscale=_allow_upscale(ctx.eps),
            need_weight_grad=need_w,
        )
        return dx, dw, None, None


def rms_norm(x: Tensor, weight: Tensor | None, eps: float = 1e-6) -> Tensor:
    """Fused RMSNorm ``γ ⊙ x / sqrt(mean(x²) + ε)``; same semantics as :func:`steadylm.functional.rms_norm`."""
    eps = F_ref.validate_eps(eps)
    d = x.shape[-1]
    _check_weight(weight, d)
    x2 = x.reshape(-1, d)
    w = weight if weight is not None else _placeholder(x)
    if _forward_only(x2, weight):
        _mark_rows_dynamic(x2)
        out = _run(_math.rms_norm_fwd, x2, w, eps=eps, has_weight=weight is not None, allow_upscale=_allow_upscale(eps))
        return out.reshape(x.shape)
    if _inline("rms_norm", x2):
        return _RMSNorm.apply(x2, w, eps, weight is not None).reshape(x.shape)
    return library.rms_norm(x2.contiguous(), w, eps, weight is not None).reshape(x.shape)


class _MeanSquare(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, allow_upscale: bool) -> Tensor:
        ctx.save_for_backward(x)
        return _run(_math.mean_square_fwd, x, allow_upscale=allow_upscale)

    @staticmethod
    def backward(ctx: Any, dv: Tensor) -> tuple[Tensor | None, ...]:
        (x,) = ctx.saved_tensors
        _mark_rows_dynamic(x, dv)
        return _run(_math.mean_square_bwd, x, dv.contiguous()), None


def mean_square(x: Tensor) -> Tensor:
    """Fused per-token ``mean(x²)`` (fp32, shape ``x.shape[:-1] + (1,)``): one pass forward, one
    elementwise pass backward; same semantics as :func:`steadylm.functional.mean_square` (the BHyT
    block's shared statistic)."""
    d = x.shape[-1]
    x2 = x.reshape(-1, d)
    shape = tuple(x.shape[:-1]) + (1,)
    if _forward_only(x2):
        _mark_rows_dynamic(x2)
        return _run(_math.mean_square_fwd, x2, allow_upscale=True).reshape(shape)
    if _inline("mean_square", x2):
        # Always rescue tiny rows: there is no ε here, so their Σx² would lose precision to underflow.
        return _MeanSquare.apply(x2, True).reshape(shape)
    return library.mean_square(x2.contiguous()).reshape(shape)


class _DyT(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor, alpha: Tensor, bias: Tensor, has_weight: bool, has_bias: bool
    ) -> Tensor:
        ctx.save_for_backward(x, weight, alpha)
        ctx.has_weight, ctx.has_bias = has_weight, has_bias
        ctx.bias_dtype = bias.dtype
        return _run(_math.dyt_fwd, x, weight, alpha, bias, has_weight=has_weight, has_bias=has_bias)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, alpha = ctx.saved_tensors
        need = ctx.needs_input_grad
        _mark_rows_dynamic(x, dy)
        dx, dw, da, db = _run(
            _math.dyt_bwd,
            x,
            weight,
            alpha,
            dy.contiguous(),
            has_weight=ctx.has_weight,
            need_weight_grad=ctx.has_weight and need[1],
            need_alpha_grad=need[2],
            need_bias_grad=ctx.has_bias and need[3],
        )
        if db is not None:
            db = db.to(ctx.bias_dtype)
        return dx, dw, da, db, None, None


def dyt(x: Tensor, weight: Tensor | None, alpha: Tensor | float, bias: Tensor | None = None) -> Tensor:
    """Fused Dynamic Tanh ``γ ⊙ tanh(α x) (+ β)``; same semantics as :func:`steadylm.functional.dyt`."""
    d = x.shape[-1]
    _check_weight(weight, d)
    _check_weight(bias, d, "bias")
    x2 = x.reshape(-1, d)
    alpha_t = _scalar_param(alpha, x, "alpha")
    w = weight if weight is not None else _placeholder(x)
    b = bias if bias is not None else _placeholder(x)
    if _forward_only(x2, weight, alpha_t, bias):
        _mark_rows_dynamic(x2)
        out = _run(_math.dyt_fwd, x2, w, alpha_t, b, has_weight=weight is not None, has_bias=bias is not None)
        return out.reshape(x.shape)
    if _inline("dyt", x2):
        return _DyT.apply(x2, w, alpha_t, b, weight is not None, bias is not None).reshape(x.shape)
    return library.dyt(x2.contiguous(), w, alpha_t, b, weight is not None, bias is not None).reshape(x.shape)


class _BHyT(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        lam: Tensor,
        variance: Tensor,
        kappa: float,
        eps: float,
        has_weight: bool,
        use_variance: bool,
    ) -> Tensor:
        ctx.save_for_backward(x, weight, lam, variance)
        ctx.kappa, ctx.eps, ctx.has_weight, ctx.use_variance = kappa, eps, has_weight, use_variance
        return _run(
            _math.bhyt_fwd,
            x,
            weight,
            lam,
            variance,
            kappa=kappa,
            eps=eps,
            has_weight=has_weight,
            use_variance=use_variance,
            allow_upscale=_allow_upscale(eps),
        )

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, lam, variance = ctx.saved_tensors
        need = ctx.needs_input_grad
        if triton_norms.usable(x, ctx.eps):  # CUDA, eager: one pass for dx, dγ, dλ (and dv)
            dx, dw, dl, dv = triton_norms.bhyt_bwd(
                x,
                weight,
                lam,
                variance,
                dy,
                kappa=ctx.kappa,
                eps=ctx.eps,
                has_weight=ctx.has_weight,
                use_variance=ctx.use_variance,
                allow_upscale=_allow_upscale(ctx.eps),
                need_weight_grad=ctx.has_weight and need[1],
                need_lam_grad=need[2],
                need_variance_grad=ctx.use_variance and need[3],
            )
            return dx, dw, dl, dv, None, None, None, None
        _mark_rows_dynamic(x, dy, variance if ctx.use_variance else None)
        dx, dw, dl, dv = _run(
            _math.bhyt_bwd,
            x,
            weight,
            lam,
            variance,
            dy.contiguous(),
            kappa=ctx.kappa,
            eps=ctx.eps,
            has_weight=ctx.has_weight,
            use_variance=ctx.use_variance,
            allow_upscale=_allow_upscale(ctx.eps),
            need_weight_grad=ctx.has_weight and need[1],
            need_lam_grad=need[2],
            need_variance_grad=ctx.use_variance and need[3],
        )
        return dx, dw, dl, dv, None, None, None, None


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
    x2 = x.reshape(-1, d)
    if variance is not None:
        expected = tuple(x.shape[:-1]) + (1,)
        if tuple(variance.shape) != expected:
            raise ValueError(
                f"variance must have shape {expected} (per-token mean square), got {tuple(variance.shape)}"
            )
        v = variance.reshape(-1, 1)
    else:
        v = _placeholder(x)
    lam_t = _scalar_param(lam, x, "lam")
    w = weight if weight is not None else _placeholder(x)
    if _forward_only(x2, weight, lam_t, variance):
        _mark_rows_dynamic(x2, v if variance is not None else None)
        out = _run(_math.bhyt_fwd, x2, w, lam_t, v, kappa=kappa, eps=eps, has_weight=weight is not None,
                   use_variance=variance is not None, allow_upscale=_allow_upscale(eps))  # fmt: skip
        return out.reshape(x.shape)
    if _inline("bhyt", x2):
        out = _BHyT.apply(x2, w, lam_t, v, kappa, eps, weight is not None, variance is not None)
    else:
        out = library.bhyt(x2.contiguous(), w, lam_t, v.contiguous(), kappa, eps, weight is not None, variance is not None)
    return out.reshape(x.shape)


class _BHyTMeanSquare(torch.autograd.Function):
    """The traced (inlined) form of ``steadylm::bhyt_and_mean_square``."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor, lam: Tensor, kappa: float, eps: float, has_weight: bool
    ) -> tuple[Tensor, Tensor]:
        ctx.kappa, ctx.eps, ctx.has_weight = kappa, eps, has_weight
        out, v = _run(_math.bhyt_ms_fwd, x, weight, lam, kappa=kappa, eps=eps, has_weight=has_weight)
        ctx.save_for_backward(x, weight, lam, v)
        return out, v

    @staticmethod
    def backward(ctx: Any, dy: Tensor, dv: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, lam, v = ctx.saved_tensors
        need = ctx.needs_input_grad
        _mark_rows_dynamic(x, dy, dv)
        dx, dw, dl = _run(
            _math.bhyt_ms_bwd,
            x,
            weight,
            lam,
            dy.contiguous(),
            dv.contiguous(),
            kappa=ctx.kappa,
            eps=ctx.eps,
            has_weight=ctx.has_weight,
            need_weight_grad=ctx.has_weight and need[1],
            need_lam_grad=need[2],
            v=v,
        )
        return dx, dw, dl, None, None, None


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
    x2 = x.reshape(-1, d)
    lam_t = _scalar_param(lam, x, "lam")
    w = weight if weight is not None else _placeholder(x)
    if _forward_only(x2, weight, lam_t):
        _mark_rows_dynamic(x2)
        out, v = _run(_math.bhyt_ms_fwd, x2, w, lam_t, kappa=kappa, eps=eps, has_weight=weight is not None)
    elif _inline("bhyt_and_mean_square", x2):
        out, v = _BHyTMeanSquare.apply(x2, w, lam_t, kappa, eps, weight is not None)
    else:
        out, v = library.bhyt_and_mean_square(x2.contiguous(), w, lam_t, kappa, eps, weight is not None)
    return out.reshape(x.shape), v.reshape(tuple(x.shape[:-1]) + (1,))
