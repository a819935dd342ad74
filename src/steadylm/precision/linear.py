"""``FP8Linear``: a drop-in ``nn.Linear`` whose three matmuls run in FP8 through ``torch._scaled_mm``.

Forward ``y = x(e4m3) @ W(e4m3)^T``; backward ``dX = dY(e5m2) @ W(e4m3)`` and
``dW = dY(e5m2)^T @ x(e4m3)`` (the FP8 copies of ``x`` and ``W`` made in the forward are what the
backward uses, so FP8 also halves the activation memory kept for it). Bias, when present, is added in
the output dtype and its gradient is the fp32 sum of ``dY``.

Scaling is per tensor, one scaler per *role* (input, weight, grad_output):

- ``"current"``: ``s = fmax / amax(x)`` of the tensor being quantised;
- ``"delayed"``: ``s = fmax / max(amax_history)``; the tensor's own amax is pushed into the history
  (length ``history_len``) *after* it has been quantised with the old scale. While the history is
  still empty (all zeros: the first step), the current amax is used instead — decided on the device with ``torch.where``, no host sync.

Counters per role, accumulated on the device (no host sync in the hot path) until read with
:func:`steadylm.precision.fp8_stats`:

- ``overflow``: elements with ``|x·s| > fmax`` before saturation (computed as ``|x| > amax_used``,
  the same condition without the rounding of the product). Only delayed scaling can overflow.
- ``underflow``: nonzero elements that flush to zero (±0 in FP8);
- ``amax``: the largest ``|x|`` seen (and the last one);
- ``snr_db``: quantisation signal-to-noise ratio ``10 log10(Σx² / Σ(x − deq(q(x)))²)`` over the
  elements measured (saturation error included). Dequantising costs a full pass (e4m3 → fp32 is
  slow on CPUs), so by ``stats`` mode: ``"full"`` measures every step; ``"sampled"`` (the default)
  only the steps an :class:`~steadylm.precision.FP8Probe` samples (it sets ``snr_requested``);
  ``"counts"`` never.

The amax history and the counters are buffers saved in the ``state_dict`` (keys
``amax_history`` and ``fp8_counters`` next to ``weight``): delayed scaling is training state like
the optimizer moments, and a run resumed from a checkpoint must quantise exactly as the
uninterrupted run would. To load an FP8 checkpoint into a model without FP8 layers, call
:func:`~steadylm.precision.apply_fp8` on it first, or drop those two keys. Counters and history are
only updated in training mode (``model.eval()`` validation batches neither count nor move the
delayed-scaling history).
"""

from __future__ import annotations

import math
from enum import IntEnum

import torch
import torch.distributed as dist
from torch import nn

from steadylm.errors import ConfigError, check_choice
from steadylm.precision.formats import E4M3, E5M2, FP8Format, fp8_mm

__all__ = ["COUNTER_FIELDS", "Col", "sum_counters_over_ranks", "FP8Linear", "ROLES", "SCALINGS", "STATS_MODES", "quantize"]

ROLES = ("input", "weight", "grad_output")
ROLE_FORMATS = (E4M3, E4M3, E5M2)
SCALINGS = ("current", "delayed")
STATS_MODES = ("sampled", "full", "counts")

# columns of the per-role counter row (float64, so element counts stay exact past 2^24)
COUNTER_FIELDS = ("overflow", "underflow", "numel", "signal", "noise", "calls", "amax", "last_amax", "last_scale")



class Col(IntEnum):
    """Column of a counter row, by name (the order of ``COUNTER_FIELDS``)."""

    OVERFLOW = 0
    UNDERFLOW = 1
    NUMEL = 2
    SIGNAL = 3
    NOISE = 4
    CALLS = 5
    AMAX = 6
    LAST_AMAX = 7
    LAST_SCALE = 8


assert tuple(c.name.lower() for c in Col) == COUNTER_FIELDS
#: Columns that add up over ranks and calls (the rest are maxima or last values).
SUMMED_COLS = (Col.OVERFLOW, Col.UNDERFLOW, Col.NUMEL, Col.SIGNAL, Col.NOISE, Col.CALLS)


def _multi_rank() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def sum_counters_over_ranks(counters: torch.Tensor) -> torch.Tensor:
    """Counter rows (``[..., len(COUNTER_FIELDS)]``) with the counts summed over ranks (a copy;
    collective under torch.distributed, the input itself in one process). amax and scales are
    identical on every rank already (see :func:`_global_amax`)."""
    if not _multi_rank():
        return counters
    counters = counters.clone()
    summed = counters[..., list(SUMMED_COLS)].contiguous()
    dist.all_reduce(summed, op=dist.ReduceOp.SUM)
    counters[..., list(SUMMED_COLS)] = summed
    return counters


def _global_amax(amax: torch.Tensor) -> torch.Tensor:
    """The amax over every rank's shard of the batch (SPEC §6): N ranks then quantise exactly as
    one process with the whole batch would, and the delayed-scaling histories stay identical.
    A no-op (and no collective) in one process."""
    if _multi_rank():
        amax = amax.clone()
        dist.all_reduce(amax, op=dist.ReduceOp.MAX)
    return amax
_TINY = 1e-30  # floor for amax so an all-zero tensor gets a finite scale


def _snr_db(signal: float, noise: float) -> float:
    if noise <= 0:
        return float("inf") if signal > 0 else float("nan")
    return 10.0 * math.log10(signal / noise) if signal > 0 else float("-inf")


@torch.no_grad()
def quantize(
    x: torch.Tensor,
    fmt: FP8Format,
    history: torch.Tensor | None = None,
    counters: torch.Tensor | None = None,
    measure_snr: bool = True,
    update_history: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise ``x`` to ``fmt`` with a per-tensor scale; return ``(q, inverse_scale)``.

    ``history`` (1-D fp32, updated in place) selects delayed scaling; ``None`` is current scaling.
    ``counters`` (1-D float64 row laid out as ``COUNTER_FIELDS``) is updated in place when given.
    ``update_history=False`` uses the history without pushing this tensor's amax (eval mode).
    """
    xf = x.float()
    ax = xf.abs()
    amax_now = _global_amax(ax.amax() if xf.numel() else xf.new_zeros(()))
    if history is None:
        amax_used = amax_now
    else:
        hist_max = history.amax()
        amax_used = torch.where(hist_max > 0, hist_max, amax_now)
        if update_history:
            history.copy_(torch.roll(history, 1))
            history[0] = amax_now
    amax_used = amax_used.clamp(min=_TINY)
    scale = fmt.max / amax_used
    q = (xf * scale).clamp_(-fmt.max, fmt.max).to(fmt.dtype)
    inv_scale = amax_used / fmt.max
    if counters is not None:
        # Current scaling maps amax exactly onto fmax, so only a history-derived scale can overflow.
        overflow = (ax > amax_used).sum() if history is not None else ax.new_zeros(())
        # 0 quantises to ±0 and a nonzero FP8 value needs a nonzero input, so the flushed count
        # is nnz(x) - nnz(q); the FP8 zero test masks the sign bit (0x00 / 0x80 in both formats).
        underflow = torch.count_nonzero(xf) - torch.count_nonzero(q.view(torch.uint8) & 0x7F)
        if measure_snr:
            flat = xf.reshape(-1)
            err = flat - q.reshape(-1).float() * inv_scale
            signal, noise = torch.dot(flat, flat), torch.dot(err, err)
        else:
            signal = noise = xf.new_zeros(())
        one = xf.new_ones(())
        increments = {Col.OVERFLOW: overflow.float(), Col.UNDERFLOW: underflow.float(),
                      Col.NUMEL: one * xf.numel(), Col.SIGNAL: signal, Col.NOISE: noise, Col.CALLS: one}
        counters[list(increments)] += torch.stack(list(increments.values())).to(counters.dtype)
        counters[Col.AMAX] = torch.maximum(counters[Col.AMAX], amax_now.to(counters.dtype))
        counters[Col.LAST_AMAX] = amax_now
        counters[Col.LAST_SCALE] = scale
    return q, inv_scale


def _row(t: torch.Tensor | None, i: int) -> torch.Tensor | None:
    return None if t is None else t[i]


class _FP8LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, module: "FP8Linear", out_dtype: torch.dtype):
        record = module.training
        snr = module.measures_snr
        hist = module.amax_history if module.scaling == "delayed" else None
        cnt = module.fp8_counters if record else None
        x2 = x.reshape(-1, x.shape[-1])
        qx, sx = quantize(x2, E4M3, _row(hist, 0), _row(cnt, 0), snr, record)
        qw, sw = quantize(weight, E4M3, _row(hist, 1), _row(cnt, 1), snr, record)
        # W is [out, in] row-major, so W^T is the column-major [in, out] operand _scaled_mm wants.
        y = fp8_mm(qx, qw.t(), sx, sw, out_dtype)
        if bias is not None:
            y = y + bias.to(out_dtype)
        ctx.save_for_backward(qx, sx, qw, sw)
        ctx.module = module
        ctx.record = record
        ctx.x_shape, ctx.x_dtype, ctx.has_bias = x.shape, x.dtype, bias is not None
        ctx.w_dtype = weight.dtype
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        qx, sx, qw, sw = ctx.saved_tensors
        module = ctx.module
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        hist = module.amax_history[2] if module.scaling == "delayed" else None
        cnt = module.fp8_counters[2] if ctx.record else None
        qg, sg = quantize(g2, E5M2, hist, cnt, module.measures_snr, ctx.record)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = fp8_mm(qg, qw, sg, sw, torch.float32).to(ctx.x_dtype).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            grad_w = fp8_mm(qg.t(), qx, sg, sx, torch.float32).to(ctx.w_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2.float().sum(0).to(ctx.w_dtype)
        return grad_x, grad_w, grad_b, None, None


class FP8Linear(nn.Linear):
    """``nn.Linear`` with FP8 matmuls (e4m3 forward operands, e5m2 gradients) and per-tensor counters.

    Same constructor and call signature as ``nn.Linear`` plus keyword-only ``scaling``
    (``"current"`` | ``"delayed"``), ``history_len`` (delayed-scaling amax history length, >= 1) and
    ``stats`` (when the quantisation SNR is measured: ``"sampled"`` on probe-sampled steps,
    ``"full"`` every step, ``"counts"`` never; the other counters always run). Under autocast
    the output has the autocast dtype, otherwise the input's dtype.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        scaling: str = "current",
        history_len: int = 16,
        stats: str = "sampled",
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        check_choice("scaling", scaling, SCALINGS)
        check_choice("stats", stats, STATS_MODES)
        if not isinstance(history_len, int) or isinstance(history_len, bool) or history_len < 1:
            raise ConfigError(f"history_len must be an integer >= 1, got {history_len!r}")
        self.scaling = scaling
        self.history_len = history_len
        self.stats = stats
        self.snr_requested = False  # set by FP8Probe for the steps it samples (stats="sampled")
        buf_device = self.weight.device if self.weight.device.type != "meta" else None
        self.register_buffer(
            "amax_history", torch.zeros(len(ROLES), history_len, device=buf_device)
        )
        self.register_buffer(
            "fp8_counters",
            torch.zeros(len(ROLES), len(COUNTER_FIELDS), dtype=torch.float64, device=buf_device),
        )

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, scaling: str = "current", history_len: int = 16, stats: str = "sampled"
    ) -> "FP8Linear":
        """Wrap an existing ``nn.Linear``, sharing its ``weight``/``bias`` Parameters (an optimizer
        built before the swap keeps working)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        new = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            device="meta",
            scaling=scaling,
            history_len=history_len,
            stats=stats,
        )
        new.weight = linear.weight
        new.bias = linear.bias
        dev = linear.weight.device
        new.amax_history = torch.zeros(len(ROLES), history_len, device=dev)
        new.fp8_counters = torch.zeros(len(ROLES), len(COUNTER_FIELDS), dtype=torch.float64, device=dev)
        new.train(linear.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dev = x.device.type
        if torch.is_autocast_enabled(dev):
            out_dtype = torch.get_autocast_dtype(dev)
        else:
            out_dtype = x.dtype
        with torch.autocast(dev, enabled=False):
            return _FP8LinearFn.apply(x, self.weight, self.bias, self, out_dtype)

    @property
    def measures_snr(self) -> bool:
        return self.stats == "full" or (self.stats == "sampled" and self.snr_requested)

    def reset_fp8_stats(self) -> None:
        self.fp8_counters.zero_()

    def read_fp8_stats(self, reset: bool = False) -> dict[str, dict[str, float]]:
        """Counters per role as Python floats (one host sync); optionally zero them afterwards.

        Under torch.distributed this is collective (every rank must call it): the counts are
        summed over ranks, so they describe the whole global batch. amax and scales are already
        identical on every rank (the amax is reduced with max before quantising).
        """
        rows = sum_counters_over_ranks(self.fp8_counters.detach()).cpu().tolist()
        if reset:
            self.reset_fp8_stats()
        out = {}
        for role, r in zip(ROLES, rows):
            numel = r[Col.NUMEL]
            out[role] = {
                "overflow": r[Col.OVERFLOW],
                "underflow": r[Col.UNDERFLOW],
                "overflow_frac": r[Col.OVERFLOW] / numel if numel else 0.0,
                "underflow_frac": r[Col.UNDERFLOW] / numel if numel else 0.0,
                "amax": r[Col.AMAX],
                "last_amax": r[Col.LAST_AMAX],
                "last_scale": r[Col.LAST_SCALE],
                "snr_db": _snr_db(r[Col.SIGNAL], r[Col.NOISE]),  # NaN when not measured
                "calls": r[Col.CALLS],
            }
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scaling={self.scaling}, history_len={self.history_len}, stats={self.stats}"
