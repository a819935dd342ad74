"""Pure forward/backward math of the fused ops: plain PyTorch, written for Inductor.

Every function here is a side-effect-free function of the op's *inputs* (and, for backward, the
output gradient). The public wrappers in :mod:`steadylm.kernels.ops` compile them with
``torch.compile`` so that each becomes one generated kernel per pass (CPU C++/OpenMP or CUDA
Triton from the same source), and wrap them in ``torch.autograd.Function`` so that backward
*recomputes* everything it needs from the saved inputs instead of keeping intermediates.

Conventions (all shapes as seen by these functions, after the wrappers flattened the inputs):

* activations: ``gate``, ``up``, ``dy`` are 1-D ``[n]`` tensors of any float dtype;
* norms: ``x``, ``dy`` are 2-D ``[tokens, d]``; ``weight`` is ``[d]`` (never None here: the
  wrappers pass a flag instead); ``alpha``/``lam`` are 0-dim tensors; ``variance`` is
  ``[tokens, 1]``.
* math is fp32 (float64 inputs stay float64, so that gradcheck sees true float64 math); per-token
  reductions accumulate in float64. That costs nothing measurable in a bandwidth-bound kernel and
  replaces the reference's extra ``amax`` pass: squares of any fp32/bf16 value (up to 3.4e38) and
  of subnormals are representable in float64, so ``mean(x²)`` neither overflows nor underflows.
* ``1/sqrt(mean(x²)+ε)`` can fall outside the fp32 range (rows near the fp32 maximum, or tiny
  rows with ε = 0); it is therefore applied as two fp32 factors ``hi · lo`` (``hi`` a power of
  two), so that ``x · hi · lo`` stays accurate where ``x · r`` would overflow or go subnormal.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _split_scale(r: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Split a positive float64 per-row factor into ``hi · lo``, both representable in ``dtype``.

    ``hi = 2^floor(log2(r)/2)`` is exact; ``lo = r / hi`` is within a factor 2 of ``sqrt(r)``.
    Multiplying by ``hi`` then ``lo`` therefore never leaves the normal range when ``x · r`` does
    not. Non-finite or zero ``r`` (all-zero row with ε = 0) propagates as inf/NaN like the reference.
    """
    half_exponent = torch.floor(torch.log2(r) * 0.5)
    hi = torch.exp2(half_exponent)
    lo = r / hi
    return hi.to(dtype), lo.to(dtype)


def _row_mean(t: Tensor) -> Tensor:
    return t.to(torch.float64).sum(dim=-1, keepdim=True) / t.shape[-1]


# --------------------------------------------------------------------------------------------
# activations
# --------------------------------------------------------------------------------------------


def swiglu_fwd(gate: Tensor, up: Tensor) -> Tensor:
    ct = _compute_dtype(gate)
    g, u = gate.to(ct), up.to(ct)
    return (g * torch.sigmoid(g) * u).to(gate.dtype)


def swiglu_bwd(gate: Tensor, up: Tensor, dy: Tensor) -> tuple[Tensor, Tensor]:
    ct = _compute_dtype(gate)
    g, u, d = gate.to(ct), up.to(ct), dy.to(ct)
    s = torch.sigmoid(g)
    d_gate = d * u * (s * (1.0 + g * (1.0 - s)))
    d_up = d * (g * s)
    return d_gate.to(gate.dtype), d_up.to(up.dtype)


def _powlu_gate_and_slope(g: Tensor, m: float | Tensor) -> tuple[Tensor, Tensor]:
    """f_m(g) and f_m'(g) (SPEC §1), on safe bases so neither branch can produce NaN."""
    positive = g > 0
    safe = torch.where(positive, g, torch.ones_like(g))
    root = torch.sqrt(safe)
    exponent = m / (root + 1.0)
    log_z = torch.log(safe)
    power = torch.exp(exponent * log_z)
    s_pos = torch.sigmoid(safe)
    # p' = -m / (2 r (r+1)^2); (p · power) / z is ordered so that power = 0 gives 0, not 0·inf.
    d_exponent = -m / (2.0 * root * (root + 1.0) * (root + 1.0))
    slope_pos = power * s_pos * (d_exponent * log_z + 1.0 - s_pos) + s_pos * ((exponent * power) / safe)
    s = torch.sigmoid(g)
    f = torch.where(positive, power * s_pos, g * s)
    slope = torch.where(positive, slope_pos, s * (1.0 + g * (1.0 - s)))
    return f, slope


def powlu_glu_fwd(gate: Tensor, up: Tensor, m: float) -> Tensor:
    ct = _compute_dtype(gate)
    g, u = gate.to(ct), up.to(ct)
    positive = g > 0
    safe = torch.where(positive, g, torch.ones_like(g))
    power = torch.exp((m / (torch.sqrt(safe) + 1.0)) * torch.log(safe))
    f = torch.where(positive, power * torch.sigmoid(safe), g * torch.sigmoid(g))
    return (f * u).to(gate.dtype)


def powlu_glu_bwd(gate: Tensor, up: Tensor, dy: Tensor, m: float) -> tuple[Tensor, Tensor]:
    ct = _compute_dtype(gate)
    g, u, d = gate.to(ct), up.to(ct), dy.to(ct)
    f, slope = _powlu_gate_and_slope(g, m)
    return (d * u * slope).to(gate.dtype), (d * f).to(up.dtype)


# swiglu_clip: one function per variant, so each compiles to its own branch-free kernel.
# Clamp masks are inclusive (x == L passes gradient), matching torch.clamp's backward.


def swiglu_clip_gptoss_fwd(gate: Tensor, up: Tensor, limit: float, alpha: float) -> Tensor:
    ct = _compute_dtype(gate)
    g = gate.to(ct).clamp(max=limit)
    u = up.to(ct).clamp(-limit, limit)
    return (g * torch.sigmoid(alpha * g) * (u + 1.0)).to(gate.dtype)


def swiglu_clip_gptoss_bwd(
    gate: Tensor, up: Tensor, dy: Tensor, limit: float, alpha: float
) -> tuple[Tensor, Tensor]:
    ct = _compute_dtype(gate)
    g_raw, u_raw, d = gate.to(ct), up.to(ct), dy.to(ct)
    g = g_raw.clamp(max=limit)
    u = u_raw.clamp(-limit, limit)
    s = torch.sigmoid(alpha * g)
    d_gate = torch.where(g_raw <= limit, d * (u + 1.0) * (s + alpha * g * s * (1.0 - s)), 0.0)
    d_up = torch.where((u_raw >= -limit) & (u_raw <= limit), d * g * s, 0.0)
    return d_gate.to(gate.dtype), d_up.to(up.dtype)


def swiglu_clip_step_fwd(gate: Tensor, up: Tensor, limit: float) -> Tensor:
    ct = _compute_dtype(gate)
    g = gate.to(ct)
    u = up.to(ct).clamp(-limit, limit)
    return ((g * torch.sigmoid(g)).clamp(max=limit) * u).to(gate.dtype)


def swiglu_clip_step_bwd(gate: Tensor, up: Tensor, dy: Tensor, limit: float) -> tuple[Tensor, Tensor]:
    ct = _compute_dtype(gate)
    g, u_raw, d = gate.to(ct), up.to(ct), dy.to(ct)
    u = u_raw.clamp(-limit, limit)
    s = torch.sigmoid(g)
    silu = g * s
    d_gate = torch.where(silu <= limit, d * u * (s * (1.0 + g * (1.0 - s))), 0.0)
    d_up = torch.where((u_raw >= -limit) & (u_raw <= limit), d * silu.clamp(max=limit), 0.0)
    return d_gate.to(gate.dtype), d_up.to(up.dtype)


def swiglu_clip_clamp_fwd(gate: Tensor, up: Tensor, limit: float) -> Tensor:
    ct = _compute_dtype(gate)
    g = gate.to(ct).clamp(max=limit)
    u = up.to(ct).clamp(-limit, limit)
    return (g * torch.sigmoid(g) * u).to(gate.dtype)


def swiglu_clip_clamp_bwd(gate: Tensor, up: Tensor, dy: Tensor, limit: float) -> tuple[Tensor, Tensor]:
    ct = _compute_dtype(gate)
    g_raw, u_raw, d = gate.to(ct), up.to(ct), dy.to(ct)
    g = g_raw.clamp(max=limit)
    u = u_raw.clamp(-limit, limit)
    s = torch.sigmoid(g)
    d_gate = torch.where(g_raw <= limit, d * u * (s * (1.0 + g * (1.0 - s))), 0.0)
    d_up = torch.where((u_raw >= -limit) & (u_raw <= limit), d * (g * s), 0.0)
    return d_gate.to(gate.dtype), d_up.to(up.dtype)


# --------------------------------------------------------------------------------------------
# norms
# --------------------------------------------------------------------------------------------


def _inv_rms(xc: Tensor, eps: float) -> Tensor:
    """float64 ``1/sqrt(mean(x²) + ε)`` per row, ``[tokens, 1]``."""
    return torch.rsqrt(_row_mean(xc.to(torch.float64).square()) + eps)


def rms_norm_fwd(x: Tensor, weight: Tensor, eps: float, has_weight: bool) -> Tensor:
    ct = _compute_dtype(x)
    xc = x.to(ct)
    hi, lo = _split_scale(_inv_rms(xc, eps), ct)
    out = xc * hi * lo
    if has_weight:
        out = out * weight.to(ct)
    return out.to(x.dtype)


def rms_norm_bwd(
    x: Tensor, weight: Tensor, dy: Tensor, eps: float, has_weight: bool, need_weight_grad: bool
) -> tuple[Tensor, Tensor | None]:
    ct = _compute_dtype(x)
    xc, d = x.to(ct), dy.to(ct)
    g = d * weight.to(ct) if has_weight else d
    r = _inv_rms(xc, eps)
    hi, lo = _split_scale(r, ct)
    x_hat = xc * hi * lo
    # dx = r·g − x̂ · r²·mean(g·x): the per-row coefficient r·(r·mean(g·x)) is formed in float64.
    coeff = (r * (r * _row_mean(g.to(torch.float64) * xc.to(torch.float64)))).to(ct)
    dx = g * hi * lo - x_hat * coeff
    d_weight = (d * x_hat).sum(dim=0).to(weight.dtype) if need_weight_grad else None
    return dx.to(x.dtype), d_weight


def dyt_fwd(
    x: Tensor, weight: Tensor, alpha: Tensor, bias: Tensor, has_weight: bool, has_bias: bool
) -> Tensor:
    ct = _compute_dtype(x)
    out = torch.tanh(alpha.to(ct) * x.to(ct))
    if has_weight:
        out = out * weight.to(ct)
    if has_bias:
        out = out + bias.to(ct)
    return out.to(x.dtype)


def dyt_bwd(
    x: Tensor,
    weight: Tensor,
    alpha: Tensor,
    dy: Tensor,
    has_weight: bool,
    need_weight_grad: bool,
    need_alpha_grad: bool,
    need_bias_grad: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    ct = _compute_dtype(x)
    xc, d = x.to(ct), dy.to(ct)
    a = alpha.to(ct)
    t = torch.tanh(a * xc)
    g = d * weight.to(ct) if has_weight else d
    h = g * (1.0 - t * t)  # dL/d(αx)
    dx = (h * a).to(x.dtype)
    d_weight = (d * t).sum(dim=0).to(weight.dtype) if need_weight_grad else None
    d_alpha = (h.to(torch.float64) * xc.to(torch.float64)).sum().to(alpha.dtype) if need_alpha_grad else None
    d_bias = d.sum(dim=0) if need_bias_grad else None
    return dx, d_weight, d_alpha, d_bias


def _bhyt_scale(
    xc: Tensor, variance: Tensor, eps: float, use_variance: bool
) -> Tensor:
    """float64 ``1/sqrt(v + ε)`` per row, v the given variance or mean(x²)."""
    if use_variance:
        return torch.rsqrt(variance.to(torch.float64) + eps)
    return _inv_rms(xc, eps)


def bhyt_fwd(
    x: Tensor,
    weight: Tensor,
    lam: Tensor,
    variance: Tensor,
    kappa: float,
    eps: float,
    has_weight: bool,
    use_variance: bool,
) -> Tensor:
    ct = _compute_dtype(x)
    xc = x.to(ct)
    hi, lo = _split_scale(_bhyt_scale(xc, variance, eps, use_variance), ct)
    out = torch.tanh((lam.to(ct) / kappa) * (xc * hi * lo))
    if has_weight:
        out = out * weight.to(ct)
    return out.to(x.dtype)


def bhyt_bwd(
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
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    ct = _compute_dtype(x)
    xc, d = x.to(ct), dy.to(ct)
    c = lam.to(ct) / kappa
    r = _bhyt_scale(xc, variance, eps, use_variance)
    hi, lo = _split_scale(r, ct)
    x_hat = xc * hi * lo  # x·r
    t = torch.tanh(c * x_hat)
    g = d * weight.to(ct) if has_weight else d
    h = g * (1.0 - t * t)  # dL/d(arg), arg = c·x·r
    # Σ_row h·x̂ feeds the statistic's gradient (through mean(x²) or through the given variance).
    row_hx = (h.to(torch.float64) * x_hat.to(torch.float64)).sum(dim=-1, keepdim=True)
    if use_variance:
        dx = h * (c * hi * lo)
        # ∂arg/∂v = −½·arg·r²  ⇒  dv = −½·c·r·(r·Σ h·x̂)... with x̂ = x·r: −½·c·r²·Σ h·x̂.
        d_variance = (
            (-0.5 * c.to(torch.float64) * (r * (r * row_hx))).to(variance.dtype) if need_variance_grad else None
        )
    else:
        # arg = c·x·r(x) with r = (mean(x²)+ε)^-½: dx = c·r·(h − x̂·(Σ h·x̂)/d).
        dx = (h - x_hat * (row_hx / x.shape[-1]).to(ct)) * (c * hi * lo)
        d_variance = None
    d_weight = (d * t).sum(dim=0).to(weight.dtype) if need_weight_grad else None
    d_lam = (row_hx.sum() / kappa).to(lam.dtype) if need_lam_grad else None
    return dx.to(x.dtype), d_weight, d_lam, d_variance
