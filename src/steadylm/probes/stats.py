"""Summary statistics of activation and gradient tensors, as the lab logs them.

Conventions (stated once, used everywhere in the probes and the report):

- **kurtosis** is *Pearson's* kurtosis, E[(x − μ)⁴] / σ⁴ with the population σ: a normal
  distribution gives 3 (excess kurtosis = kurtosis − 3). Heavy-tailed "massive activation"
  distributions give values in the tens to thousands.
- **P1 / P99** are the 1st and 99th percentiles (linear interpolation between order statistics,
  as ``torch.quantile``). When a tensor has more than ``max_quantile_elems`` elements the
  percentiles are taken over a deterministic strided subsample (every k-th element of the
  flattened tensor), so repeated runs give identical numbers; min, max, amax, kurtosis and RMS
  always use every element.
- **max/RMS** is amax / sqrt(mean(x²)): how far the largest magnitude sticks out of the bulk
  (FP8 per-tensor scaling spends its range on amax, so a large max/RMS means the bulk gets few
  bits).

Everything is computed in fp32 on the tensor's device; only the final scalars are moved to the
host, in one transfer.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

STAT_NAMES: tuple[str, ...] = ("min", "max", "p1", "p99", "amax", "kurtosis", "max_rms")

#: Percentiles are exact up to this many elements, then use a deterministic strided subsample.
DEFAULT_MAX_QUANTILE_ELEMS = 1 << 16


def _subsample(flat: torch.Tensor, max_elems: int) -> torch.Tensor:
    n = flat.numel()
    if n <= max_elems:
        return flat
    stride = -(-n // max_elems)  # ceil
    return flat[::stride]


def _quantiles(flat: torch.Tensor, qs: Sequence[float]) -> torch.Tensor:
    """Quantiles with linear interpolation (``torch.quantile`` semantics) via one sort.

    ``torch.quantile`` refuses inputs above 2**24 elements; the caller subsamples first, and a
    sort of ≤ 2**18 values is cheaper than several ``kthvalue`` calls.
    """
    n = flat.numel()
    if n == 1:
        return flat.expand(len(qs)).clone()
    srt = torch.sort(flat).values
    pos = torch.tensor(qs, dtype=torch.float64) * (n - 1)
    lo = pos.floor().long()
    hi = torch.clamp(lo + 1, max=n - 1)
    frac = (pos - lo.double()).to(flat.dtype).to(flat.device)
    lo, hi = lo.to(flat.device), hi.to(flat.device)
    return srt[lo] + (srt[hi] - srt[lo]) * frac


def tensor_stats_tensor(
    x: torch.Tensor, max_quantile_elems: int = DEFAULT_MAX_QUANTILE_ELEMS
) -> torch.Tensor:
    """The statistics of :data:`STAT_NAMES`, in that order, as a 1-D fp32 tensor on x's device.

    Non-finite elements are ignored for every statistic except min/max/amax, which then report
    the non-finite value (an inf or NaN in an activation is exactly what the probe must show).
    An empty tensor gives NaNs.
    """
    flat = x.detach().reshape(-1).float()
    if flat.numel() == 0:
        return torch.full((len(STAT_NAMES),), float("nan"), device=x.device)
    mn, mx = torch.aminmax(flat)
    amax = torch.maximum(-mn, mx)
    # max/min propagate NaN and ±inf, so a finite amax proves every element finite (one sync,
    # no extra pass over the tensor on the common path)
    if not math.isfinite(float(amax)):
        if bool(torch.isnan(flat).any()):
            mn = mx = amax = torch.tensor(float("nan"), device=flat.device)
        flat = flat[torch.isfinite(flat)]
        if flat.numel() == 0:
            out = torch.full((len(STAT_NAMES),), float("nan"), device=x.device)
            out[0], out[1], out[4] = mn, mx, amax
            return out
    mean = flat.mean()
    c2 = (flat - mean).square_()
    var = c2.mean()
    m4 = c2.square_().mean()
    nan = torch.tensor(float("nan"), device=flat.device)
    kurt = torch.where(var > 0, m4 / (var * var), nan)
    ms = var + mean * mean  # mean(x²)
    max_rms = torch.where(ms > 0, amax / ms.sqrt(), nan)
    p1, p99 = _quantiles(_subsample(flat, max_quantile_elems), (0.01, 0.99))
    return torch.stack([mn, mx, p1, p99, amax, kurt, max_rms]).float()


def tensor_stats(
    x: torch.Tensor | Iterable[torch.Tensor],
    max_quantile_elems: int = DEFAULT_MAX_QUANTILE_ELEMS,
) -> dict[str, float]:
    """min, max, p1, p99, amax, kurtosis (Pearson, normal = 3), max_rms of a tensor.

    ``x`` may also be a list of tensors (e.g. the same probe point seen by several micro-batches
    or expert calls in one step); they are pooled as one sample.
    """
    if not isinstance(x, torch.Tensor):
        parts = [t.detach().reshape(-1) for t in x]
        if not parts:
            return {k: math.nan for k in STAT_NAMES}
        x = parts[0] if len(parts) == 1 else torch.cat([p.float() for p in parts])
    values = tensor_stats_tensor(x, max_quantile_elems).tolist()
    return dict(zip(STAT_NAMES, values))


def token_l2_and_variance(h: torch.Tensor) -> tuple[float, float]:
    """Mean over tokens of the per-token L2 norm and of the per-token variance (over the last dim)."""
    hf = h.detach().float().reshape(-1, h.shape[-1])
    l2 = hf.norm(dim=-1).mean()
    var = hf.var(dim=-1, unbiased=False).mean()
    l2v, varv = torch.stack([l2, var]).tolist()
    return l2v, varv


def pearson_r(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two equally sized tensors (flattened), NaN when either is constant."""
    af = a.detach().reshape(-1).double()
    bf = b.detach().reshape(-1).double()
    if af.numel() != bf.numel():
        raise ValueError(f"pearson_r: sizes differ ({af.numel()} vs {bf.numel()})")
    if af.numel() < 2:
        return math.nan
    af = af - af.mean()
    bf = bf - bf.mean()
    den = (af.square().sum() * bf.square().sum()).sqrt()
    if float(den) == 0.0:
        return math.nan
    return float((af * bf).sum() / den)
