"""Grouped linear layers for mixture-of-experts dispatch, without graph breaks or host syncs.

``grouped_linear(x, weight, ends)`` computes, for rows already sorted by group,
``y[rows of group e] = x[rows of group e] @ weight[e].T`` — one linear layer per expert applied to
that expert's contiguous slice. ``ends`` (``[E]``, integer, on ``x``'s device) holds the cumulative
row counts, so the slice sizes never have to be read back to the host by the caller.

Two implementations, chosen per call:

* ``torch._grouped_mm`` (one CUTLASS grouped GEMM, forward and backward) on CUDA devices of compute
  capability ≥ 9.0 for bf16 operands whose inner dimensions meet its 16-byte alignment. It takes the
  group offsets as a device tensor: no host sync, no graph break.
* elsewhere the custom op ``steadylm::grouped_linear`` (with ``steadylm::grouped_linear_wgrad`` for
  the weight gradient): one ``mm`` per non-empty group into a preallocated output. ``torch.compile``
  sees a single opaque op with a registered shape function, so a compiled MoE model has no graph
  break; inside the op the offsets are read on the host, which costs nothing for CPU tensors (and,
  on a CUDA device without grouped GEMM, is the one remaining synchronisation point).

Both give the per-group results of ``F.linear`` on each slice (the loop calls the same ``mm``), so
the numbers equal the per-expert loop's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["grouped_linear", "grouped_mm_applies", "grouped_mm_supported", "operand_dtype"]

# torch._grouped_mm needs 16-byte aligned strides: 8 bf16 elements.
_GROUPED_MM_ALIGN = 8


def grouped_mm_supported(x: Tensor, weight: Tensor) -> bool:
    """Whether ``torch._grouped_mm`` can run ``x [rows, in] @ weight[e].T`` (``weight [E, out, in]``)."""
    if weight.dtype != x.dtype:
        return False
    return grouped_mm_applies(x.device, x.dtype, weight.shape[2], weight.shape[1])


def grouped_mm_applies(device: torch.device, dtype: torch.dtype, in_features: int, out_features: int) -> bool:
    """Whether operands of ``dtype`` on ``device`` with these widths take ``torch._grouped_mm``."""
    if device.type != "cuda" or not hasattr(torch, "_grouped_mm") or dtype != torch.bfloat16:
        return False
    if torch.cuda.get_device_capability(device) < (9, 0):
        return False
    return in_features % _GROUPED_MM_ALIGN == 0 and out_features % _GROUPED_MM_ALIGN == 0


#: The loop ops read the group ends on the host (``.tolist()``), which a CUDA graph cannot capture:
#: tagged, Inductor keeps them out of the graphs of ``mode="reduce-overhead"`` (the compiled decode
#: step on CUDA) instead of failing at capture (measured on an H200 with an fp32 MoE model).
_HOST_READ_TAGS: tuple[Any, ...] = (torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe") else ()


def operand_dtype(x: Tensor) -> torch.dtype:
    """The dtype :func:`grouped_linear` computes in for input ``x`` (the autocast dtype when on)."""
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype


@torch.library.custom_op("steadylm::grouped_linear", mutates_args=(), tags=_HOST_READ_TAGS)
def _grouped_linear_loop(x: Tensor, weight: Tensor, ends: Tensor) -> Tensor:
    """``x [rows, in]``, ``weight [E, out, in]`` (any strides), ``ends [E]`` -> ``[rows, out]``."""
    out = x.new_empty(x.shape[0], weight.shape[1])
    start = 0
    for e, end in enumerate(ends.tolist()):
        if end > start:
            torch.mm(x[start:end], weight[e].t(), out=out[start:end])
        start = end
    return out


@_grouped_linear_loop.register_fake
def _(x: Tensor, weight: Tensor, ends: Tensor) -> Tensor:
    return x.new_empty(x.shape[0], weight.shape[1])


@torch.library.custom_op("steadylm::grouped_linear_wgrad", mutates_args=(), tags=_HOST_READ_TAGS)
def _grouped_linear_wgrad(dy: Tensor, x: Tensor, ends: Tensor) -> Tensor:
    """Weight gradient of :func:`_grouped_linear_loop`: ``dw[e] = dy[rows e].T @ x[rows e]``."""
    dw = dy.new_zeros(ends.shape[0], dy.shape[1], x.shape[1])
    start = 0
    for e, end in enumerate(ends.tolist()):
        if end > start:
            torch.mm(dy[start:end].t(), x[start:end], out=dw[e])
        start = end
    return dw


@_grouped_linear_wgrad.register_fake
def _(dy: Tensor, x: Tensor, ends: Tensor) -> Tensor:
    return dy.new_empty(ends.shape[0], dy.shape[1], x.shape[1])


def _setup_context(ctx: Any, inputs: tuple[Tensor, Tensor, Tensor], output: Tensor) -> None:
    x, weight, ends = inputs
    ctx.save_for_backward(x, weight, ends)


def _backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
    x, weight, ends = ctx.saved_tensors
    dy = dy.contiguous()
    dx = _grouped_linear_loop(dy, weight.transpose(1, 2), ends) if ctx.needs_input_grad[0] else None
    dw = _grouped_linear_wgrad(dy, x, ends).to(weight.dtype) if ctx.needs_input_grad[1] else None
    return dx, dw, None


_grouped_linear_loop.register_autograd(_backward, setup_context=_setup_context)


def grouped_linear(x: Tensor, weight: Tensor, ends: Tensor) -> Tensor:
    """Per-group linear layers on group-sorted rows, without host syncs where the device allows.

    Args:
        x: ``[rows, in]``, rows sorted by group.
        weight: ``[E, out, in]`` (the stacked ``nn.Linear`` weights of the groups).
        ends: ``[E]`` integer tensor, cumulative row counts (``ends[-1] == rows``), on ``x``'s device.
    Returns:
        ``[rows, out]``. Under autocast both operands are cast to the autocast dtype first, as
        ``F.linear`` would be.
    """
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, weight = x.to(dtype), weight.to(dtype)
    if grouped_mm_supported(x, weight):
        return torch._grouped_mm(x, weight.transpose(1, 2), offs=ends.to(torch.int32))
    return _grouped_linear_loop(x, weight, ends)
