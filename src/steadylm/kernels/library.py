"""The fused ops as ``torch.library`` custom ops: ``steadylm::<op>`` and ``steadylm::<op>_backward``.

Why custom ops: a ``torch.autograd.Function`` is traced *through* by Dynamo, so inside a
``torch.compile``'d model Inductor re-derives every kernel from the traced math — and its own
backward for a norm is a 5-pass schedule, and the hand-written CUDA backward
(:mod:`.triton_norms`) is lost. A custom op is opaque to Dynamo: the compiled model calls the very
same forward and backward kernels as eager (one generated kernel per pass, compiled once by
:func:`steadylm.kernels._compile._kernel`), with 0 graph breaks because each op has a fake (shape)
implementation. Each forward op's autograd (``register_autograd``) saves only the inputs and
calls the matching ``*_backward`` op, itself a custom op, so the fused backward survives
compilation too.

Each op is written once, as an :class:`OpParts` entry of :data:`PARTS`: the plain forward and
backward implementations (the custom ops' bodies), the autograd ``setup_context`` and the autograd
backward, which is built around *a* backward callable. The custom ops are registered from that
table, and :mod:`.ops` builds from the very same parts its forward-only fast path (the forward
implementation called directly) and the ``autograd.Function`` that a compiled model traces through
(the backward implementation instead of the backward op).

Flags (``has_weight`` …) are op arguments; an absent optional gradient comes back as an empty
placeholder (shape ``[0]``) that the autograd wrapper turns into ``None`` (custom-op outputs cannot
be ``None``). The implementations run on any device (CPU and CUDA from the same source) and never
read a tensor value on the host.

The public, validated entry points are in :mod:`steadylm.kernels.ops`; call those.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from steadylm.kernels import _compile, _math, triton_norms

__all__ = ["OPS", "PARTS", "OpParts"]


def _kernel(fn_name: str, like: Tensor) -> Callable[..., Any]:
    """The compiled (or plain) ``_math`` function ``fn_name`` for inputs like ``like``; by name at
    call time, because tests monkeypatch ``_math`` functions."""
    return _compile._kernel(getattr(_math, fn_name), like)


def _mark(*tensors: Tensor | None) -> None:
    _compile._mark_rows_dynamic(*tensors)


def _allow_upscale(eps: float) -> bool:
    # A Python bool, decided outside the compiled function so that it specialises the kernel
    # (a comparison on a traced float would add a guard per call site instead).
    return eps < _math.TINY_EPS


def _absent(like: Tensor) -> Tensor:
    """The placeholder for a gradient nobody asked for (never ``None``: see the module doc)."""
    return like.new_empty((0,))


def _or_absent(t: Tensor | None, like: Tensor) -> Tensor:
    return t if t is not None else _absent(like)


def _present(t: Tensor, wanted: bool) -> Tensor | None:
    return t if wanted else None


def _grads_like(x: Tensor, *optional: tuple[Tensor, bool]) -> tuple[Tensor, ...]:
    """Fake backward outputs: ``dx`` like ``x``, then per ``(like, wanted)`` a gradient or the placeholder."""
    return (torch.empty_like(x),) + tuple(torch.empty_like(t) if wanted else _absent(t) for t, wanted in optional)


def _stat_like(x: Tensor) -> Tensor:
    """The per-token statistic's shape and dtype: ``[tokens, 1]``, fp32 (float64 kept)."""
    return x.new_empty((x.shape[0], 1), dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)


def _norm_backward(kernel: str, x: Tensor, eps: float, args: tuple, flags: dict, marked: tuple) -> tuple:
    """A norm's backward ``kernel`` (``rms_norm_bwd``/``bhyt_bwd``) on ``args`` (``x`` first) with
    keyword ``flags``: on CUDA the one-pass Triton kernel, else the compiled ``_math`` one."""
    if triton_norms.usable(x, eps):  # CUDA: one pass for dx and the parameter gradients
        return getattr(triton_norms, kernel)(*args, **flags)
    _mark(*marked)
    return _kernel(kernel, x)(*args, **flags)


@dataclass(frozen=True)
class OpParts:
    """One fused op, written once (see the module doc)."""

    forward: Callable[..., Any]  # the forward custom op's body (its signature is the op's schema)
    backward: Callable[..., Any]  # the backward custom op's body
    forward_fake: Callable[..., Any]
    backward_fake: Callable[..., Any]
    setup: Callable[[Any, tuple, Any], None]  # autograd setup_context(ctx, inputs, output)
    autograd: Callable[[Callable[..., Any]], Callable[..., Any]]  # backward callable -> backward(ctx, *grads)


def _norm_parts(
    forward: Callable[..., Any],
    backward: Callable[..., Any],
    forward_fake: Callable[..., Any],
    backward_fake: Callable[..., Any],
    gates: tuple[int | None, ...],
    passed: tuple[int, ...],
) -> OpParts:
    """A norm whose inputs are its tensors (``x``, then its parameters) and then its flags, and
    whose backward op takes the saved tensors, ``dy``, the flags at indices ``passed`` and, per
    parameter, whether its gradient is wanted: its input needs one and its flag (the index in
    ``gates``; None: none) is set."""

    def setup(ctx: Any, inputs: tuple, output: Tensor) -> None:
        n_tensors = len(gates) + 1
        ctx.save_for_backward(*inputs[:n_tensors])
        ctx.flags = tuple(inputs[n_tensors:])

    def autograd(backward_op: Callable[..., Any]) -> Callable[..., Any]:
        def backward_fn(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
            saved, need, flags = ctx.saved_tensors, ctx.needs_input_grad, ctx.flags
            wants = tuple((gate is None or flags[gate]) and need[i + 1] for i, gate in enumerate(gates))
            dx, *grads = backward_op(*saved, dy.contiguous(), *(flags[i] for i in passed), *wants)
            return (dx, *(_present(g, wanted) for g, wanted in zip(grads, wants))) + (None,) * len(flags)

        return backward_fn

    return OpParts(forward, backward, forward_fake, backward_fake, setup, autograd)


# --------------------------------------------------------------------------------------------
# gated activations: one forward and one backward op per activation; hyper-parameters are args
# --------------------------------------------------------------------------------------------

_CLIP_FNS = {"gptoss": "swiglu_clip_gptoss", "step": "swiglu_clip_step", "clamp": "swiglu_clip_clamp"}


def _clip_hparams(variant: str, limit: float, alpha: float) -> tuple[float, ...]:
    return (limit, alpha) if variant == "gptoss" else (limit,)


def _swiglu(gate: Tensor, up: Tensor) -> Tensor:
    _mark(gate, up)
    return _kernel("swiglu_fwd", gate)(gate, up)


def _swiglu_backward(gate: Tensor, up: Tensor, dy: Tensor) -> tuple[Tensor, Tensor]:
    _mark(gate, up, dy)
    return _kernel("swiglu_bwd", gate)(gate, up, dy)


def _powlu_glu(gate: Tensor, up: Tensor, m: float) -> Tensor:
    _mark(gate, up)
    return _kernel("powlu_glu_fwd", gate)(gate, up, m)


def _powlu_glu_backward(gate: Tensor, up: Tensor, dy: Tensor, m: float) -> tuple[Tensor, Tensor]:
    _mark(gate, up, dy)
    return _kernel("powlu_glu_bwd", gate)(gate, up, dy, m)


def _swiglu_clip(gate: Tensor, up: Tensor, limit: float, variant: str, alpha: float) -> Tensor:
    _mark(gate, up)
    return _kernel(_CLIP_FNS[variant] + "_fwd", gate)(gate, up, *_clip_hparams(variant, limit, alpha))


def _swiglu_clip_backward(
    gate: Tensor, up: Tensor, dy: Tensor, limit: float, variant: str, alpha: float
) -> tuple[Tensor, Tensor]:
    _mark(gate, up, dy)
    return _kernel(_CLIP_FNS[variant] + "_bwd", gate)(gate, up, dy, *_clip_hparams(variant, limit, alpha))


def _gated_fake(gate: Tensor, up: Tensor, *hparams: Any) -> Tensor:
    return torch.empty_like(gate)


def _gated_backward_fake(gate: Tensor, up: Tensor, dy: Tensor, *hparams: Any) -> tuple[Tensor, Tensor]:
    return torch.empty_like(gate), torch.empty_like(up)


def _gated_setup(ctx: Any, inputs: tuple, output: Tensor) -> None:
    gate, up, *hparams = inputs
    ctx.save_for_backward(gate, up)
    ctx.hparams = tuple(hparams)


def _gated_autograd(backward_op: Callable[..., Any]) -> Callable[..., Any]:
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        gate, up = ctx.saved_tensors
        d_gate, d_up = backward_op(gate, up, dy.contiguous(), *ctx.hparams)
        return (d_gate, d_up) + (None,) * len(ctx.hparams)

    return backward


def _gated(forward: Callable[..., Any], backward: Callable[..., Any]) -> OpParts:
    return OpParts(forward, backward, _gated_fake, _gated_backward_fake, _gated_setup, _gated_autograd)


# --------------------------------------------------------------------------------------------
# RMSNorm
# --------------------------------------------------------------------------------------------


def _rms_norm(x: Tensor, weight: Tensor, eps: float, has_weight: bool) -> Tensor:
    _mark(x)
    return _kernel("rms_norm_fwd", x)(x, weight, eps=eps, has_weight=has_weight, allow_upscale=_allow_upscale(eps))


def _rms_norm_backward(
    x: Tensor, weight: Tensor, dy: Tensor, eps: float, has_weight: bool, need_weight_grad: bool
) -> tuple[Tensor, Tensor]:
    flags = dict(eps=eps, has_weight=has_weight, allow_upscale=_allow_upscale(eps), need_weight_grad=need_weight_grad)
    dx, dw = _norm_backward("rms_norm_bwd", x, eps, (x, weight, dy), flags, (x, dy))
    return dx, _or_absent(dw, weight)


def _rms_norm_fake(x: Tensor, weight: Tensor, eps: float, has_weight: bool) -> Tensor:
    return torch.empty_like(x)


def _rms_norm_backward_fake(x, weight, dy, eps, has_weight, need_weight_grad):
    return _grads_like(x, (weight, need_weight_grad))


# --------------------------------------------------------------------------------------------
# mean square (the BHyT block statistic on its own)
# --------------------------------------------------------------------------------------------


def _mean_square(x: Tensor) -> Tensor:
    _mark(x)
    # Always rescue tiny rows: there is no ε here, so their Σx² would lose precision to underflow.
    return _kernel("mean_square_fwd", x)(x, allow_upscale=True)


def _mean_square_backward(x: Tensor, dv: Tensor) -> Tensor:
    _mark(x, dv)
    return _kernel("mean_square_bwd", x)(x, dv)


def _mean_square_fake(x: Tensor) -> Tensor:
    return _stat_like(x)


def _mean_square_backward_fake(x: Tensor, dv: Tensor) -> Tensor:
    return torch.empty_like(x)


def _ms_setup(ctx: Any, inputs: tuple, output: Tensor) -> None:
    ctx.save_for_backward(inputs[0])


def _ms_autograd(backward_op: Callable[..., Any]) -> Callable[..., Any]:
    def backward(ctx: Any, dv: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return backward_op(x, dv.contiguous())

    return backward


# --------------------------------------------------------------------------------------------
# DyT
# --------------------------------------------------------------------------------------------


def _dyt(x: Tensor, weight: Tensor, alpha: Tensor, bias: Tensor, has_weight: bool, has_bias: bool) -> Tensor:
    _mark(x)
    return _kernel("dyt_fwd", x)(x, weight, alpha, bias, has_weight=has_weight, has_bias=has_bias)


def _dyt_backward(
    x: Tensor,
    weight: Tensor,
    alpha: Tensor,
    bias: Tensor,
    dy: Tensor,
    has_weight: bool,
    need_weight_grad: bool,
    need_alpha_grad: bool,
    need_bias_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _mark(x, dy)
    dx, dw, da, db = _kernel("dyt_bwd", x)(x, weight, alpha, dy, has_weight=has_weight, need_weight_grad=need_weight_grad,
                          need_alpha_grad=need_alpha_grad, need_bias_grad=need_bias_grad)
    db = db.to(bias.dtype) if db is not None else None
    return dx, _or_absent(dw, weight), _or_absent(da, alpha), _or_absent(db, bias)


def _dyt_fake(x, weight, alpha, bias, has_weight, has_bias):
    return torch.empty_like(x)


def _dyt_backward_fake(x, weight, alpha, bias, dy, has_weight, need_w, need_alpha, need_bias):
    return _grads_like(x, (weight, need_w), (alpha, need_alpha), (bias, need_bias))


# --------------------------------------------------------------------------------------------
# BHyT (one site, own statistic or a given variance)
# --------------------------------------------------------------------------------------------


def _bhyt(
    x: Tensor,
    weight: Tensor,
    lam: Tensor,
    variance: Tensor,
    kappa: float,
    eps: float,
    has_weight: bool,
    use_variance: bool,
) -> Tensor:
    _mark(x, variance if use_variance else None)
    return _kernel("bhyt_fwd", x)(x, weight, lam, variance, kappa=kappa, eps=eps, has_weight=has_weight,
                use_variance=use_variance, allow_upscale=_allow_upscale(eps))


def _bhyt_backward(
    x: Tensor,
    weight: Tensor,
    lam: Tensor,
    variance: Tensor,
    dy: Tensor,
    kappa: float,
    eps: float,
    has_weight: bool,
    use_variance: bool,
    need_weight_grad: bool,
    need_lam_grad: bool,
    need_variance_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    flags = dict(kappa=kappa, eps=eps, has_weight=has_weight, use_variance=use_variance, allow_upscale=_allow_upscale(eps),
                 need_weight_grad=need_weight_grad, need_lam_grad=need_lam_grad, need_variance_grad=need_variance_grad)
    marked = (x, dy, variance if use_variance else None)
    dx, dw, dl, dv = _norm_backward("bhyt_bwd", x, eps, (x, weight, lam, variance, dy), flags, marked)
    return dx, _or_absent(dw, weight), _or_absent(dl, lam), _or_absent(dv, variance)


def _bhyt_fake(x, weight, lam, variance, kappa, eps, has_weight, use_variance):
    return torch.empty_like(x)


def _bhyt_backward_fake(x, weight, lam, variance, dy, kappa, eps, has_weight, use_variance, need_w, need_lam, need_var):
    return _grads_like(x, (weight, need_w), (lam, need_lam), (variance, need_var))


# --------------------------------------------------------------------------------------------
# BHyT block, first site: output and the block statistic v from one kernel
# --------------------------------------------------------------------------------------------


def _bhyt_and_mean_square(
    x: Tensor, weight: Tensor, lam: Tensor, kappa: float, eps: float, has_weight: bool
) -> tuple[Tensor, Tensor]:
    _mark(x)
    return _kernel("bhyt_ms_fwd", x)(x, weight, lam, kappa=kappa, eps=eps, has_weight=has_weight)


def _bhyt_and_mean_square_backward(
    x: Tensor,
    weight: Tensor,
    lam: Tensor,
    v: Tensor,
    dy: Tensor,
    dv: Tensor,
    kappa: float,
    eps: float,
    has_weight: bool,
    need_weight_grad: bool,
    need_lam_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    _mark(x, v, dy, dv)
    dx, dw, dl = _kernel("bhyt_ms_bwd", x)(x, weight, lam, dy, dv, kappa=kappa, eps=eps, has_weight=has_weight,
                      need_weight_grad=need_weight_grad, need_lam_grad=need_lam_grad, v=v)
    return dx, _or_absent(dw, weight), _or_absent(dl, lam)


def _bms_fake(x, weight, lam, kappa, eps, has_weight):
    return torch.empty_like(x), _stat_like(x)


def _bms_backward_fake(x, weight, lam, v, dy, dv, kappa, eps, has_weight, need_w, need_lam):
    return _grads_like(x, (weight, need_w), (lam, need_lam))


def _bms_setup(ctx: Any, inputs: tuple, output: tuple[Tensor, Tensor]) -> None:
    x, weight, lam, ctx.kappa, ctx.eps, ctx.has_weight = inputs
    # v is [tokens, 1]: saving it spares the backward a reduction over x.
    ctx.save_for_backward(x, weight, lam, output[1])


def _bms_autograd(backward_op: Callable[..., Any]) -> Callable[..., Any]:
    def backward(ctx: Any, dy: Tensor | None, dv: Tensor | None) -> tuple[Tensor | None, ...]:
        x, weight, lam, v = ctx.saved_tensors
        # An output nobody differentiated arrives as None (or zeros): both are a zero gradient.
        dy = dy.contiguous() if dy is not None else torch.zeros_like(x)
        dv = dv.contiguous() if dv is not None else _stat_like(x).zero_()
        need = ctx.needs_input_grad
        wants = (ctx.has_weight and need[1], need[2])
        dx, dw, dl = backward_op(x, weight, lam, v, dy, dv, ctx.kappa, ctx.eps, ctx.has_weight, *wants)
        return dx, _present(dw, wants[0]), _present(dl, wants[1]), None, None, None

    return backward


# --------------------------------------------------------------------------------------------
# the table, and the custom ops registered from it
# --------------------------------------------------------------------------------------------

#: public op name -> its parts.
PARTS: dict[str, OpParts] = {
    "swiglu": _gated(_swiglu, _swiglu_backward),
    "powlu_glu": _gated(_powlu_glu, _powlu_glu_backward),
    "swiglu_clip": _gated(_swiglu_clip, _swiglu_clip_backward),
    # flags: (eps, has_weight); γ's gradient needs has_weight.
    "rms_norm": _norm_parts(_rms_norm, _rms_norm_backward, _rms_norm_fake, _rms_norm_backward_fake, (1,), (0, 1)),
    "mean_square": OpParts(
        _mean_square, _mean_square_backward, _mean_square_fake, _mean_square_backward_fake, _ms_setup, _ms_autograd
    ),
    # flags: (has_weight, has_bias); parameters γ, α, β.
    "dyt": _norm_parts(_dyt, _dyt_backward, _dyt_fake, _dyt_backward_fake, (0, None, 1), (0,)),
    # flags: (kappa, eps, has_weight, use_variance); parameters γ, λ and the given variance.
    "bhyt": _norm_parts(_bhyt, _bhyt_backward, _bhyt_fake, _bhyt_backward_fake, (2, None, 3), (0, 1, 2, 3)),
    "bhyt_and_mean_square": OpParts(
        _bhyt_and_mean_square, _bhyt_and_mean_square_backward, _bms_fake, _bms_backward_fake, _bms_setup, _bms_autograd
    ),
}


def _register(name: str) -> tuple[Any, Any]:
    """``steadylm::<name>`` and ``steadylm::<name>_backward`` from ``PARTS[name]``, fakes and autograd."""
    parts = PARTS[name]
    forward = torch.library.custom_op(f"steadylm::{name}", parts.forward, mutates_args=())
    backward = torch.library.custom_op(f"steadylm::{name}_backward", parts.backward, mutates_args=())
    forward.register_fake(parts.forward_fake)
    backward.register_fake(parts.backward_fake)
    forward.register_autograd(parts.autograd(backward), setup_context=parts.setup)
    return forward, backward


#: public op name -> (forward custom op, backward custom op).
OPS: dict[str, tuple[Any, Any]] = {name: _register(name) for name in PARTS}

swiglu, swiglu_backward = OPS["swiglu"]
powlu_glu, powlu_glu_backward = OPS["powlu_glu"]
swiglu_clip, swiglu_clip_backward = OPS["swiglu_clip"]
rms_norm, rms_norm_backward = OPS["rms_norm"]
mean_square, mean_square_backward = OPS["mean_square"]
dyt, dyt_backward = OPS["dyt"]
bhyt, bhyt_backward = OPS["bhyt"]
bhyt_and_mean_square, bhyt_and_mean_square_backward = OPS["bhyt_and_mean_square"]
