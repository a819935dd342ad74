"""The LM head and its cross-entropy as one op, chunked over rows: the logits are never stored.

``hidden [rows, d] @ weight.T`` is computed a chunk of rows at a time; each chunk's logits (fp32,
sized to stay in cache: :data:`CHUNK_ELEMENTS`) give that chunk's loss terms and, when a gradient
will be asked for, right away its share of the gradients: ``d hidden`` for its rows and its
contribution to ``d weight``. So the forward does the three matmuls the unfused forward and
backward do (logits, ``d hidden``, ``d weight``) and the backward only scales the saved gradients
by the incoming one. Unfused, the logits (rows × vocab fp32) are written, read back by the softmax,
their gradient written, then read by two matmuls: on the micro preset (8×256 tokens, vocabulary
8192) that is 67 MB per pass.

Saved between forward and backward: the two gradients (``hidden``'s size and ``weight``'s), not the
logits. ``steadylm::linear_cross_entropy`` is a custom op, so a compiled model keeps it whole (0
graph breaks) and runs it eagerly; its Python loop over chunks costs microseconds per chunk.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from steadylm.kernels import _compile, _math

__all__ = ["CHUNK_ELEMENTS", "IGNORE_INDEX", "chunk_rows", "linear_cross_entropy"]

#: fp32 logits per chunk: 8 MiB, which stays in a CPU's L2/L3 between the matmul that writes them,
#: the softmax and the two gradient matmuls that read them (measured on the micro preset: +4.6%
#: compiled training step with 256-row chunks, BENCHMARKS.md).
CHUNK_ELEMENTS = 2**21

#: Targets with this value add nothing to the loss and its mean, as in ``F.cross_entropy``.
IGNORE_INDEX = -100


def chunk_rows(vocab: int) -> int:
    """Rows per chunk for a vocabulary of ``vocab``."""
    return max(1, CHUNK_ELEMENTS // vocab)


def _loss_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if compute_dtype == torch.float64 else torch.float32


@torch.library.custom_op("steadylm::linear_cross_entropy", mutates_args=())
def _linear_ce(
    hidden: Tensor, weight: Tensor, targets: Tensor, compute_dtype: torch.dtype, need_grad: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """(mean loss, d loss/d hidden, d loss/d weight); the gradients are empty unless ``need_grad``.

    The matmuls run in ``compute_dtype`` (the autocast dtype, or the inputs'), the softmax in fp32
    (float64 kept); ``d weight`` is accumulated over chunks in that loss dtype.
    """
    loss_dtype = _loss_dtype(compute_dtype)
    with torch.autocast(hidden.device.type, enabled=False):  # the dtypes are explicit here
        h_all, w = hidden.to(compute_dtype), weight.to(compute_dtype)
        valid_all = targets != IGNORE_INDEX
        # Divided by the count of valid targets as a tensor: no host sync.
        count = valid_all.sum().to(loss_dtype)  # 0 when every target is ignored: NaN, as F.cross_entropy
        total = torch.zeros((), dtype=loss_dtype, device=hidden.device)
        d_hidden = torch.empty_like(h_all) if need_grad else hidden.new_empty(0)
        d_weight = torch.zeros(weight.shape, dtype=loss_dtype, device=weight.device) if need_grad else weight.new_empty(0)
        # 1/count for the valid rows' gradients (inf when there are none, and then never used).
        grad_scale = 1.0 / count
        targets_all = torch.where(valid_all, targets, 0)[:, None]
        # d weight accumulates in place (no chunk-sized temporary) when the matmuls run in its dtype.
        accumulate_in_place = compute_dtype == loss_dtype
        step = chunk_rows(weight.shape[0])
        for start in range(0, hidden.shape[0], step):
            h = h_all[start : start + step]
            logits = h @ w.t()
            # The softmax math of the chunk, compiled (by name: tests substitute mutants).
            out = _compile.forward(
                _math.cross_entropy_chunk, (0, 1, 2),
                logits, targets_all[start : start + step], valid_all[start : start + step], grad_scale,
                need_grad=need_grad, grad_dtype=compute_dtype,
            )  # fmt: skip
            total = total + out[0]
            if need_grad:
                grad = out[1]
                torch.mm(grad, w, out=d_hidden[start : start + step])
                if accumulate_in_place:
                    d_weight.addmm_(grad.t(), h)
                else:
                    d_weight += (grad.t() @ h).to(loss_dtype)
        return total / count, d_hidden, d_weight


@_linear_ce.register_fake
def _(hidden: Tensor, weight: Tensor, targets: Tensor, compute_dtype: torch.dtype, need_grad: bool):
    loss_dtype = _loss_dtype(compute_dtype)
    loss = hidden.new_empty((), dtype=loss_dtype)
    if not need_grad:
        return loss, hidden.new_empty(0), weight.new_empty(0)
    return loss, hidden.new_empty(hidden.shape, dtype=compute_dtype), weight.new_empty(weight.shape, dtype=loss_dtype)


def _setup_context(ctx: Any, inputs: tuple, output: tuple[Tensor, Tensor, Tensor]) -> None:
    hidden, weight = inputs[:2]
    _, d_hidden, d_weight = output
    ctx.mark_non_differentiable(d_hidden, d_weight)
    ctx.save_for_backward(d_hidden, d_weight)
    ctx.dtypes = (hidden.dtype, weight.dtype)


def _backward(ctx: Any, d_loss: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:
    # need_grad was True: it is False only when grad mode is off or nothing requires grad, and then
    # autograd records no node to come back to.
    d_hidden, d_weight = ctx.saved_tensors
    need = ctx.needs_input_grad
    return (
        (d_hidden * d_loss).to(ctx.dtypes[0]) if need[0] else None,
        (d_weight * d_loss).to(ctx.dtypes[1]) if need[1] else None,
        None,
        None,
        None,
    )


_linear_ce.register_autograd(_backward, setup_context=_setup_context)


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets``, as
    :func:`steadylm.functional.linear_cross_entropy`, without storing the logits.

    ``hidden [..., d]``, ``weight [vocab, d]``, ``targets [...]`` (int; :data:`IGNORE_INDEX` rows
    are skipped). Under autocast the matmuls run in its dtype, as ``F.linear`` would.
    """
    d = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != d:
        raise ValueError(f"weight must have shape (vocab, {d}), got {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets must have shape {tuple(hidden.shape[:-1])} (hidden without its last dim), "
                         f"got {tuple(targets.shape)}")
    device = hidden.device.type
    compute = torch.promote_types(hidden.dtype, weight.dtype)
    if torch.is_autocast_enabled(device) and compute in (torch.float32, torch.float16, torch.bfloat16):
        compute = torch.get_autocast_dtype(device)
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    loss, _, _ = _linear_ce(hidden.reshape(-1, d), weight, targets.reshape(-1), compute, need_grad)
    return loss
