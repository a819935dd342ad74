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

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from steadylm.kernels import _compile, _math, triton_norms

__all__ = ["OPS", "PARTS", "OpParts"]


def _kernel(fn_name: str, like: Tensor) -> Callable[..., Any]:
    """The compiled (or plain) ``_math`` function ``fn_name`` for inputs like ``like``; by name at
    call time, because tests monkeypatch ``_math`` functions."""
    return _compile._kernel(getattr(_math, fn_name), like)


def _forward(fn_name: str, rows: tuple[int, ...], *args: Any, **kwargs: Any) -> Any:
    """Forward kernel ``fn_name`` on ``args`` (``rows``: the positions of those whose dim 0 is the
    row count): a direct build when no gradient is wanted (:func:`steadylm.kernels._compile.forward`)."""
    return _compile.forward(getattr(_math, fn_name), rows, *args, **kwargs)


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


@dataclass(frozen=True)
class OpParts:
    """One fused op, written once (see the module doc)."""

    forward: Callable[..., Any]  # the forward custom op's body (the schema: its signature, or forward_schema)
    backward: Callable[..., Any]  # the backward custom op's body (likewise: backward_schema)
    forward_fake: Callable[..., Any]
    backward_fake: Callable[..., Any]
    setup: Callable[[Any, tuple, Any], None]  # autograd setup_context(ctx, inputs, output)
    autograd: Callable[[Callable[..., Any]], Callable[..., Any]]  # backward callable -> backward(ctx, *grads)
    forward_schema: str | None = None  # the norms: built from their _math kernels' signatures (_NormOp)
    backward_schema: str | None = None


@dataclass(frozen=True)
class _Call:
    """How a norm op's body calls its ``_math`` kernel: the op takes ``names`` (positionally), the
    kernel its positional ``tensors`` and its keyword-only ``flags``."""

    kernel: str  # looked up by name at call time (tests monkeypatch _math and triton_norms)
    names: tuple[str, ...]
    tensors: tuple[str, ...]
    flags: tuple[str, ...]
    schema: str

    @classmethod
    def of(cls, kernel: str, outputs: int, first: tuple[str, ...] = ()) -> _Call:
        """The op takes ``first`` (tensors), the kernel's other tensors, then its other keyword-only
        arguments (flags), positional, less ``allow_upscale``; it returns ``outputs`` tensors."""
        sig = inspect.signature(getattr(_math, kernel), eval_str=True).parameters
        tensors = tuple(n for n, p in sig.items() if p.kind is p.POSITIONAL_OR_KEYWORD)
        flags = tuple(n for n, p in sig.items() if p.kind is p.KEYWORD_ONLY)
        assert all(sig[n].annotation is Tensor for n in tensors), kernel
        op_tensors = first + tuple(n for n in tensors if n not in first)
        op_flags = tuple(n for n in flags if n not in op_tensors and n != "allow_upscale")
        arguments = [f"Tensor {n}" for n in op_tensors] + [f"{sig[n].annotation.__name__} {n}" for n in op_flags]
        returns = "Tensor" if outputs == 1 else "(" + ", ".join(["Tensor"] * outputs) + ")"
        return cls(kernel, op_tensors + op_flags, tensors, flags, f"({', '.join(arguments)}) -> {returns}")

    def args(self, a: dict[str, Any]) -> tuple[list[Tensor], dict[str, Any]]:
        """The kernel's arguments from the op's (``a``, by name)."""
        flags = {n: _allow_upscale(a["eps"]) if n == "allow_upscale" else a[n] for n in self.flags}
        return [a[n] for n in self.tensors], flags


#: A body's arguments, by name -> the names of its tensors besides x and dy whose dim 0 is the rows.
_Rows = Callable[[dict[str, Any]], tuple[str, ...]]


@dataclass(frozen=True)
class _NormOp:
    """A norm's forward and backward op bodies and fakes, their parameter lists read off its
    ``_math`` kernels ``<name>_fwd`` and ``<name>_bwd``.

    Why: a kernel's signature is where that list is written (the Triton drop-in of
    :mod:`.triton_norms` keeps the same contract); restating it here as each body's signature, for
    ``custom_op`` to infer the schema from, was one more copy to keep in step by hand. So the
    schemas are built from the kernels' signatures (:meth:`_Call.of`) and the bodies take their
    arguments generically, by name: the forward op the forward kernel's tensors, then its flags;
    the backward op ``x``, each parameter it returns a gradient for (as named by the kernel's
    ``need_<param>_grad`` flags; DyT's ``bias`` too, which its kernel does not read), ``dy``, then
    its flags (the BHyT block's op also takes its forward's statistic ``v`` before ``dy``: ``saved``).
    Flags are positional in the schema and never include ``allow_upscale``, which is derived from
    ``eps`` (:func:`_allow_upscale`).
    """

    fwd: _Call
    bwd: _Call
    params: tuple[str, ...]  # the inputs besides x whose gradients the backward op returns
    rows: _Rows  # names of the tensors besides x and dy whose dim 0 is the rows (dynamic in the builds)
    #: forward flag values -> (row positions, the kernel's keyword flags): see :meth:`forward`.
    prepared: dict[tuple, tuple[tuple[int, ...], dict[str, Any]]] = field(
        default_factory=dict, compare=False, repr=False
    )

    @classmethod
    def of(cls, name: str, rows: _Rows = lambda a: (), saved: tuple[str, ...] = (), outputs: int = 1) -> _NormOp:
        """Kernels ``<name>_fwd`` (returning ``outputs`` tensors) and ``<name>_bwd``."""
        flags = inspect.signature(getattr(_math, f"{name}_bwd")).parameters
        params = tuple(n[len("need_") : -len("_grad")] for n in flags if n.startswith("need_") and n.endswith("_grad"))
        bwd = _Call.of(f"{name}_bwd", 1 + len(params), first=("x", *params, *saved))
        return cls(_Call.of(f"{name}_fwd", outputs), bwd, params, rows)

    def forward(self, *args: Any) -> Tensor | tuple[Tensor, ...]:
        # The forward op's arguments are its kernel's tensors, then its flags, in the kernel's order
        # (:meth:`_Call.of` with no ``first``): no mapping by name on this path, which is every
        # decode step's (its Python is a measurable share of a small call). The kernel's keyword
        # flags and row positions depend on the flags alone, so they are worked out once per flag
        # values (a model has a handful: its ε, κ, whether a gain or a given variance is used).
        call = self.fwd
        n = len(call.tensors)
        prepared = self.prepared.get(args[n:])
        if prepared is None:
            flags = dict(zip(call.names[n:], args[n:]))
            if "allow_upscale" in call.flags:
                flags["allow_upscale"] = _allow_upscale(flags["eps"])
            rows = (0,) + tuple(map(call.tensors.index, self.rows(flags)))  # x is the kernel's first tensor
            prepared = self.prepared[args[n:]] = (rows, flags)
        rows, flags = prepared
        return _compile.forward(getattr(_math, call.kernel), rows, *args[:n], **flags)

    def backward(self, *args: Any) -> tuple[Tensor, ...]:
        a = dict(zip(self.bwd.names, args))
        tensors, flags = self.bwd.args(a)
        if hasattr(triton_norms, self.bwd.kernel) and triton_norms.usable(a["x"], a["eps"]):
            # CUDA: the one-pass Triton drop-in, dx and the parameter gradients together.
            dx, *grads = getattr(triton_norms, self.bwd.kernel)(*tensors, **flags)
        else:
            _mark(a["x"], a["dy"], *(a[n] for n in self.rows(a)))
            dx, *grads = _kernel(self.bwd.kernel, a["x"])(*tensors, **flags)
        # Each gradient in its parameter's dtype (DyT's kernel never sees β: its dβ is fp32).
        return (dx, *(_or_absent(g if g is None else g.to(a[p].dtype), a[p]) for p, g in zip(self.params, grads)))

    def forward_fake(self, *args: Any) -> Tensor:
        return torch.empty_like(args[0])

    def backward_fake(self, *args: Any) -> tuple[Tensor, ...]:
        a = dict(zip(self.bwd.names, args))
        return _grads_like(a["x"], *((a[p], a[f"need_{p}_grad"]) for p in self.params))


def _norm_parts(op: _NormOp, gates: tuple[int | None, ...], passed: tuple[int, ...]) -> OpParts:
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

    parts = (op.forward, op.backward, op.forward_fake, op.backward_fake, setup, autograd)
    return OpParts(*parts, forward_schema=op.fwd.schema, backward_schema=op.bwd.schema)


def _bhyt_rows(a: dict[str, Any]) -> tuple[str, ...]:
    """BHyT's rows besides x (and dy): a given variance is ``[tokens, 1]``."""
    return ("variance",) if a["use_variance"] else ()


# --------------------------------------------------------------------------------------------
# gated activations: one forward and one backward op per activation; hyper-parameters are args
# --------------------------------------------------------------------------------------------

_CLIP_FNS = {"gptoss": "swiglu_clip_gptoss", "step": "swiglu_clip_step", "clamp": "swiglu_clip_clamp"}


def _clip_hparams(variant: str, limit: float, alpha: float) -> tuple[float, ...]:
    return (limit, alpha) if variant == "gptoss" else (limit,)


def _swiglu(gate: Tensor, up: Tensor) -> Tensor:
    return _forward("swiglu_fwd", (0, 1), gate, up)


def _swiglu_backward(gate: Tensor, up: Tensor, dy: Tensor) -> tuple[Tensor, Tensor]:
    _mark(gate, up, dy)
    return _kernel("swiglu_bwd", gate)(gate, up, dy)


def _powlu_glu(gate: Tensor, up: Tensor, m: float) -> Tensor:
    return _forward("powlu_glu_fwd", (0, 1), gate, up, m)


def _powlu_glu_backward(gate: Tensor, up: Tensor, dy: Tensor, m: float) -> tuple[Tensor, Tensor]:
    _mark(gate, up, dy)
    return _kernel("powlu_glu_bwd", gate)(gate, up, dy, m)


def _swiglu_clip(gate: Tensor, up: Tensor, limit: float, variant: str, alpha: float) -> Tensor:
    return _forward(_CLIP_FNS[variant] + "_fwd", (0, 1), gate, up, *_clip_hparams(variant, limit, alpha))


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
# mean square (the BHyT block statistic on its own)
# --------------------------------------------------------------------------------------------


def _mean_square(x: Tensor) -> Tensor:
    # Always rescue tiny rows: there is no ε here, so their Σx² would lose precision to underflow.
    return _forward("mean_square_fwd", (0,), x, allow_upscale=True)


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
# BHyT block, first site: output and the block statistic v from one kernel
# --------------------------------------------------------------------------------------------


#: v is the forward's second output, saved for the backward; the block's backward takes it and its
#: gradient dv (``[tokens, 1]``, like v).
_BMS = _NormOp.of("bhyt_ms", lambda a: ("v", "dv") if "dv" in a else (), saved=("v",), outputs=2)


def _bms_fake(x: Tensor, *flags: Any) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x), _stat_like(x)


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
    "rms_norm": _norm_parts(_NormOp.of("rms_norm"), (1,), (0, 1)),
    "mean_square": OpParts(
        _mean_square, _mean_square_backward, _mean_square_fake, _mean_square_backward_fake, _ms_setup, _ms_autograd
    ),
    # flags: (has_weight, has_bias); parameters γ, α, β.
    "dyt": _norm_parts(_NormOp.of("dyt"), (0, None, 1), (0,)),
    # flags: (kappa, eps, has_weight, use_variance); parameters γ, λ and the given variance.
    "bhyt": _norm_parts(_NormOp.of("bhyt", _bhyt_rows), (2, None, 3), (0, 1, 2, 3)),
    "bhyt_and_mean_square": OpParts(
        _BMS.forward, _BMS.backward, _bms_fake, _BMS.backward_fake, _bms_setup, _bms_autograd,
        forward_schema=_BMS.fwd.schema, backward_schema=_BMS.bwd.schema,
    ),
}


def _register(name: str) -> tuple[Any, Any]:
    """``steadylm::<name>`` and ``steadylm::<name>_backward`` from ``PARTS[name]``, fakes and autograd."""
    parts = PARTS[name]
    forward = torch.library.custom_op(f"steadylm::{name}", parts.forward, mutates_args=(), schema=parts.forward_schema)
    backward = torch.library.custom_op(
        f"steadylm::{name}_backward", parts.backward, mutates_args=(), schema=parts.backward_schema
    )
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
