"""The fused ops as ``torch.library`` custom ops: ``steadylm::<op>`` and ``steadylm::<op>_backward``.

Why custom ops: a ``torch.autograd.Function`` is traced *through* by Dynamo, so inside a
``torch.compile``'d model Inductor re-derives every kernel from the traced math — and its own
backward for a norm is a 5-pass schedule, and the hand-written CUDA backward
(:mod:`.triton_norms`) is lost. A custom op is opaque to Dynamo: the compiled model calls the very
same forward and backward kernels as eager (one generated kernel per pass, compiled once by
:func:`steadylm.kernels._compile._run`), with 0 graph breaks because each op has a fake (shape)
implementation. Each forward op's autograd (``register_autograd``) saves only the inputs and
calls the matching ``*_backward`` op, itself a custom op, so the fused backward survives
compilation too.

Flags (``has_weight`` …) are op arguments; an absent optional gradient comes back as an empty
placeholder (shape ``[0]``) that the autograd wrapper turns into ``None`` (custom-op outputs cannot
be ``None``). The implementations run on any device (CPU and CUDA from the same source) and never
read a tensor value on the host.

The public, validated entry points are in :mod:`steadylm.kernels.ops`; call those.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from steadylm.kernels import _compile, _math, triton_norms

__all__ = ["OPS"]


def _run(fn_name: str, *args: Any, **kwargs: Any) -> Any:
    # By name at call time: tests monkeypatch _math functions.
    return _compile._run(getattr(_math, fn_name), *args, **kwargs)


def _mark(*tensors: Tensor | None) -> None:
    _compile._mark_rows_dynamic(*tensors)


def _allow_upscale(eps: float) -> bool:
    return eps < _math.TINY_EPS


def _absent(like: Tensor) -> Tensor:
    """The placeholder for a gradient nobody asked for (never ``None``: see the module doc)."""
    return like.new_empty((0,))


def _or_absent(t: Tensor | None, like: Tensor) -> Tensor:
    return t if t is not None else _absent(like)


def _present(t: Tensor, wanted: bool) -> Tensor | None:
    return t if wanted else None


# --------------------------------------------------------------------------------------------
# gated activations: one forward and one backward op per activation; hyper-parameters are args
# --------------------------------------------------------------------------------------------

_CLIP_FNS = {"gptoss": "swiglu_clip_gptoss", "step": "swiglu_clip_step", "clamp": "swiglu_clip_clamp"}


def _clip_hparams(variant: str, limit: float, alpha: float) -> tuple[float, ...]:
    return (limit, alpha) if variant == "gptoss" else (limit,)


@torch.library.custom_op("steadylm::swiglu", mutates_args=())
def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    _mark(gate, up)
    return _run("swiglu_fwd", gate, up)


@torch.library.custom_op("steadylm::swiglu_backward", mutates_args=())
def swiglu_backward(gate: Tensor, up: Tensor, dy: Tensor) -> tuple[Tensor, Tensor]:
    _mark(gate, up, dy)
    return _run("swiglu_bwd", gate, up, dy)


@torch.library.custom_op("steadylm::powlu_glu", mutates_args=())
def powlu_glu(gate: Tensor, up: Tensor, m: float) -> Tensor:
    _mark(gate, up)
    return _run("powlu_glu_fwd", gate, up, m)


@torch.library.custom_op("steadylm::powlu_glu_backward", mutates_args=())
def powlu_glu_backward(gate: Tensor, up: Tensor, dy: Tensor, m: float) -> tuple[Tensor, Tensor]:
    _mark(gate, up, dy)
    return _run("powlu_glu_bwd", gate, up, dy, m)


@torch.library.custom_op("steadylm::swiglu_clip", mutates_args=())
def swiglu_clip(gate: Tensor, up: Tensor, limit: float, variant: str, alpha: float) -> Tensor:
    _mark(gate, up)
    return _run(_CLIP_FNS[variant] + "_fwd", gate, up, *_clip_hparams(variant, limit, alpha))


@torch.library.custom_op("steadylm::swiglu_clip_backward", mutates_args=())
def swiglu_clip_backward(
    gate: Tensor, up: Tensor, dy: Tensor, limit: float, variant: str, alpha: float
) -> tuple[Tensor, Tensor]:
    _mark(gate, up, dy)
    return _run(_CLIP_FNS[variant] + "_bwd", gate, up, dy, *_clip_hparams(variant, limit, alpha))


def _gated_fake(gate: Tensor, up: Tensor, *hparams: Any) -> Tensor:
    return torch.empty_like(gate)


def _gated_backward_fake(gate: Tensor, up: Tensor, dy: Tensor, *hparams: Any) -> tuple[Tensor, Tensor]:
    return torch.empty_like(gate), torch.empty_like(up)


def _gated_setup(ctx: Any, inputs: tuple, output: Tensor) -> None:
    gate, up, *hparams = inputs
    ctx.save_for_backward(gate, up)
    ctx.hparams = tuple(hparams)


def _gated_autograd(backward_op: Any) -> Any:
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        gate, up = ctx.saved_tensors
        d_gate, d_up = backward_op(gate, up, dy.contiguous(), *ctx.hparams)
        return (d_gate, d_up) + (None,) * len(ctx.hparams)

    return backward


for _fwd, _bwd in ((swiglu, swiglu_backward), (powlu_glu, powlu_glu_backward), (swiglu_clip, swiglu_clip_backward)):
    _fwd.register_fake(_gated_fake)
    _bwd.register_fake(_gated_backward_fake)
    _fwd.register_autograd(_gated_autograd(_bwd), setup_context=_gated_setup)


# --------------------------------------------------------------------------------------------
# RMSNorm
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("steadylm::rms_norm", mutates_args=())
def rms_norm(x: Tensor, weight: Tensor, eps: float, has_weight: bool) -> Tensor:
    _mark(x)
    return _run("rms_norm_fwd", x, weight, eps=eps, has_weight=has_weight, allow_upscale=_allow_upscale(eps))


@torch.library.custom_op("steadylm::rms_norm_backward", mutates_args=())
def rms_norm_backward(
    x: Tensor, weight: Tensor, dy: Tensor, eps: float, has_weight: bool, need_weight_grad: bool
) -> tuple[Tensor, Tensor]:
    flags = dict(eps=eps, has_weight=has_weight, allow_upscale=_allow_upscale(eps), need_weight_grad=need_weight_grad)
    if triton_norms.usable(x, eps):  # CUDA: one pass for dx and dγ
        dx, dw = triton_norms.rms_norm_bwd(x, weight, dy, **flags)
    else:
        _mark(x, dy)
        dx, dw = _run("rms_norm_bwd", x, weight, dy, **flags)
    return dx, _or_absent(dw, weight)


@rms_norm.register_fake
def _(x: Tensor, weight: Tensor, eps: float, has_weight: bool) -> Tensor:
    return torch.empty_like(x)


@rms_norm_backward.register_fake
def _(x: Tensor, weight: Tensor, dy: Tensor, eps: float, has_weight: bool, need_weight_grad: bool):
    return torch.empty_like(x), torch.empty_like(weight) if need_weight_grad else _absent(weight)


def _rms_setup(ctx: Any, inputs: tuple, output: Tensor) -> None:
    x, weight, ctx.eps, ctx.has_weight = inputs
    ctx.save_for_backward(x, weight)


def _rms_backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
    x, weight = ctx.saved_tensors
    need_w = ctx.has_weight and ctx.needs_input_grad[1]
    dx, dw = rms_norm_backward(x, weight, dy.contiguous(), ctx.eps, ctx.has_weight, need_w)
    return dx, _present(dw, need_w), None, None


rms_norm.register_autograd(_rms_backward, setup_context=_rms_setup)


# --------------------------------------------------------------------------------------------
# mean square (the BHyT block statistic on its own)
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("steadylm::mean_square", mutates_args=())
def mean_square(x: Tensor) -> Tensor:
    _mark(x)
    # Always rescue tiny rows: there is no ε here, so their Σx² would lose precision to underflow.
    return _run("mean_square_fwd", x, allow_upscale=True)


@torch.library.custom_op("steadylm::mean_square_backward", mutates_args=())
def mean_square_backward(x: Tensor, dv: Tensor) -> Tensor:
    _mark(x, dv)
    return _run("mean_square_bwd", x, dv)


@mean_square.register_fake
def _(x: Tensor) -> Tensor:
    return x.new_empty((x.shape[0], 1), dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)


@mean_square_backward.register_fake
def _(x: Tensor, dv: Tensor) -> Tensor:
    return torch.empty_like(x)


def _ms_setup(ctx: Any, inputs: tuple, output: Tensor) -> None:
    ctx.save_for_backward(inputs[0])


def _ms_backward(ctx: Any, dv: Tensor) -> Tensor:
    (x,) = ctx.saved_tensors
    return mean_square_backward(x, dv.contiguous())


mean_square.register_autograd(_ms_backward, setup_context=_ms_setup)


# --------------------------------------------------------------------------------------------
# DyT
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("steadylm::dyt", mutates_args=())
def dyt(x: Tensor, weight: Tensor, alpha: Tensor, bias: Tensor, has_weight: bool, has_bias: bool) -> Tensor:
    _mark(x)
    return _run("dyt_fwd", x, weight, alpha, bias, has_weight=has_weight, has_bias=has_bias)


@torch.library.custom_op("steadylm::dyt_backward", mutates_args=())
def dyt_backward(
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
    dx, dw, da, db = _run(
        "dyt_bwd",
        x,
        weight,
        alpha,
        dy,
        has_weight=has_weight,
        need_weight_grad=need_weight_grad,
        need_alpha_grad=need_alpha_grad,
        need_bias_grad=need_bias_grad,
    )
    db = db.to(bias.dtype) if db is not None else None
    return dx, _or_absent(dw, weight), _or_absent(da, alpha), _or_absent(db, bias)


@dyt.register_fake
def _(x: Tensor, weight: Tensor, alpha: Tensor, bias: Tensor, has_weight: bool, has_bias: bool) -> Tensor:
    return torch.empty_like(x)


@dyt_backward.register_fake
def _(x, weight, alpha, bias, dy, has_weight, need_weight_grad, need_alpha_grad, need_bias_grad):
    return (
        torch.empty_like(x),
        torch.empty_like(weight) if need_weight_grad else _absent(weight),
        torch.empty_like(alpha) if need_alpha_grad else _absent(alpha),
        torch.empty_like(bias) if need_bias_grad else _absent(bias),
    )


def _dyt_setup(ctx: Any, inputs: tuple, output: Tensor) -> None:
    x, weight, alpha, bias, ctx.has_weight, ctx.has_bias = inputs
    ctx.save_for_backward(x, weight, alpha, bias)


def _dyt_backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
    x, weight, alpha, bias = ctx.saved_tensors
    need = ctx.needs_input_grad
    wants = (ctx.has_weight and need[1], need[2], ctx.has_bias and need[3])
    dx, dw, da, db = dyt_backward(x, weight, alpha, bias, dy.contiguous(), ctx.has_weight, *wants)
    return dx, _present(dw, wants[0]), _present(da, wants[1]), _present(db, wants[2]), None, None


dyt.register_autograd(_dyt_backward, setup_context=_dyt_setup)


# --------------------------------------------------------------------------------------------
# BHyT (one site, own statistic or a given variance)
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("steadylm::bhyt", mutates_args=())
def bhyt(
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
    return _run(
        "bhyt_fwd",
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


@torch.library.custom_op("steadylm::bhyt_backward", mutates_args=())
def bhyt_backward(
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
    flags = dict(
        kappa=kappa,
        eps=eps,
        has_weight=has_weight,
        use_variance=use_variance,
        allow_upscale=_allow_upscale(eps),
        need_weight_grad=need_weight_grad,
        need_lam_grad=need_lam_grad,
        need_variance_grad=need_variance_grad,
    )
    if triton_norms.usable(x, eps):  # CUDA: one pass for dx, dγ, dλ (and dv)
        dx, dw, dl, dv = triton_norms.bhyt_bwd(x, weight, lam, variance, dy, **flags)
    else:
        _mark(x, dy, variance if use_variance else None)
        dx, dw, dl, dv = _run("bhyt_bwd", x, weight, lam, variance, dy, **flags)
    return dx, _or_absent(dw, weight), _or_absent(dl, lam), _or_absent(dv, variance)


@bhyt.register_fake
def _(x, weight, lam, variance, kappa, eps, has_weight, use_variance):
    return torch.empty_like(x)


@bhyt_backward.register_fake
def _(x, weight, lam, variance, dy, kappa, eps, has_weight, use_variance, need_w, need_lam, need_var):
    return (
        torch.empty_like(x),
        torch.empty_like(weight) if need_w else _absent(weight),
        torch.empty_like(lam) if need_lam else _absent(lam),
        torch.empty_like(variance) if need_var else _absent(variance),
    )


def _bhyt_setup(ctx: Any, inputs: tuple, output: Tensor) -> None:
    x, weight, lam, variance, ctx.kappa, ctx.eps, ctx.has_weight, ctx.use_variance = inputs
    ctx.save_for_backward(x, weight, lam, variance)


def _bhyt_backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
    x, weight, lam, variance = ctx.saved_tensors
    need = ctx.needs_input_grad
    wants = (ctx.has_weight and need[1], need[2], ctx.use_variance and need[3])
    dx, dw, dl, dv = bhyt_backward(
        x, weight, lam, variance, dy.contiguous(), ctx.kappa, ctx.eps, ctx.has_weight, ctx.use_variance, *wants
    )
    return (dx, _present(dw, wants[0]), _present(dl, wants[1]), _present(dv, wants[2])) + (None,) * 4


bhyt.register_autograd(_bhyt_backward, setup_context=_bhyt_setup)


# --------------------------------------------------------------------------------------------
# BHyT block, first site: output and the block statistic v from one kernel
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("steadylm::bhyt_and_mean_square", mutates_args=())
def bhyt_and_mean_square(
    x: Tensor, weight: Tensor, lam: Tensor, kappa: float, eps: float, has_weight: bool
) -> tuple[Tensor, Tensor]:
    _mark(x)
    return _run("bhyt_ms_fwd", x, weight, lam, kappa=kappa, eps=eps, has_weight=has_weight)


@torch.library.custom_op("steadylm::bhyt_and_mean_square_backward", mutates_args=())
def bhyt_and_mean_square_backward(
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
    dx, dw, dl = _run(
        "bhyt_ms_bwd",
        x,
        weight,
        lam,
        dy,
        dv,
        kappa=kappa,
        eps=eps,
        has_weight=has_weight,
        need_weight_grad=need_weight_grad,
        need_lam_grad=need_lam_grad,
        v=v,
    )
    return dx, _or_absent(dw, weight), _or_absent(dl, lam)


def _stat_like(x: Tensor) -> Tensor:
    return x.new_empty((x.shape[0], 1), dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)


@bhyt_and_mean_square.register_fake
def _(x, weight, lam, kappa, eps, has_weight):
    return torch.empty_like(x), _stat_like(x)


@bhyt_and_mean_square_backward.register_fake
def _(x, weight, lam, v, dy, dv, kappa, eps, has_weight, need_w, need_lam):
    return (
        torch.empty_like(x),
        torch.empty_like(weight) if need_w else _absent(weight),
        torch.empty_like(lam) if need_lam else _absent(lam),
    )


def _bms_setup(ctx: Any, inputs: tuple, output: tuple[Tensor, Tensor]) -> None:
    x, weight, lam, ctx.kappa, ctx.eps, ctx.has_weight = inputs
    # v is [tokens, 1]: saving it spares the backward a reduction over x.
    ctx.save_for_backward(x, weight, lam, output[1])


def _bms_backward(ctx: Any, dy: Tensor | None, dv: Tensor | None) -> tuple[Tensor | None, ...]:
    x, weight, lam, v = ctx.saved_tensors
    # An output nobody differentiated arrives as None (or zeros): both are a zero gradient.
    dy = dy.contiguous() if dy is not None else torch.zeros_like(x)
    dv = dv.contiguous() if dv is not None else _stat_like(x).zero_()
    need = ctx.needs_input_grad
    wants = (ctx.has_weight and need[1], need[2])
    dx, dw, dl = bhyt_and_mean_square_backward(x, weight, lam, v, dy, dv, ctx.kappa, ctx.eps, ctx.has_weight, *wants)
    return dx, _present(dw, wants[0]), _present(dl, wants[1]), None, None, None


bhyt_and_mean_square.register_autograd(_bms_backward, setup_context=_bms_setup)


#: public op name -> (forward custom op, backward custom op).
OPS: dict[str, tuple[Any, Any]] = {
    "swiglu": (swiglu, swiglu_backward),
    "powlu_glu": (powlu_glu, powlu_glu_backward),
    "swiglu_clip": (swiglu_clip, swiglu_clip_backward),
    "rms_norm": (rms_norm, rms_norm_backward),
    "mean_square": (mean_square, mean_square_backward),
    "dyt": (dyt, dyt_backward),
    "bhyt": (bhyt, bhyt_backward),
    "bhyt_and_mean_square": (bhyt_and_mean_square, bhyt_and_mean_square_backward),
}
