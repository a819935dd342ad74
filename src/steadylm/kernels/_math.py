"""Pure forward/backward math of the fused ops: plain PyTorch, written for Inductor.

Every function here is a side-effect-free function of the op's *inputs* (and, for backward, the
output gradient). The public wrappers in :mod:`steadylm.kernels.ops` compile them with
``torch.compile`` so that each becomes one generated kernel per pass (CPU C++/OpenMP or CUDA
Triton from the same source), and wrap them in ``torch.autograd.Function`` so that backward
*recomputes* everything it needs from the saved inputs instead of keeping intermediates.

Conventions (all shapes as seen by these functions, after the wrappers flattened the inputs):

* activations: ``gate``, ``up``, ``dy`` are 1-D ``[n]`` tensors of any float dtype;
* norms: ``x``, ``dy`` are 2-D ``[tokens, d]``; ``weight`` is ``[d]`` (never None here: the
  wrappers pass a flag instead); ``alpha``/``lam`` are 0-dim or ``[1]`` tensors (each gradient
  comes back in its shape); ``variance`` is ``[tokens, 1]``.
* flags and hyper-parameters of the norms are keyword-only (``has_weight=…, need_lam_grad=…``), so
  a call site names every boolean instead of relying on its position;
* math is fp32 (float64 inputs stay float64, so that gradcheck sees true float64 math);
* per-token statistics are exact over the whole fp32 range without the reference's extra amax
  pass (see ``_row_scale_and_inv_rms``);
* results are returned in the input dtype; parameter gradients in the parameter's dtype.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _gain(t: Tensor, weight: Tensor, has_weight: bool) -> Tensor:
    """``t ⊙ γ`` in ``t``'s (compute) dtype, or ``t`` itself without a weight."""
    return t * weight.to(t.dtype) if has_weight else t


def _weight_grad(d: Tensor, normalised: Tensor, weight: Tensor, wanted: bool) -> Tensor | None:
    """γ's gradient ``Σ_tokens d ⊙ y`` for ``out = γ ⊙ y`` (in γ's dtype), or None when not wanted."""
    return (d * normalised).sum(dim=0).to(weight.dtype) if wanted else None


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


def _powlu_gate_and_grad(
    g: Tensor, du: Tensor, m: float | Tensor, exp: Callable[[Tensor], Tensor] = torch.exp,
    log: Callable[[Tensor], Tensor] = torch.log,
) -> tuple[Tensor, Tensor]:
    """``(f_m(g), du · f_m'(g))`` (SPEC §1), on safe bases so neither branch can produce NaN.

    For z > 0, with s = σ(z), r = √z, p = m/(r+1) and p' = −m/(2r(r+1)²), SPEC's
    f' = z^p·s·(p'·ln z + p/z + 1 − s) is regrouped, using p'·ln z = −(p/z)·r·ln z/(2(r+1)), as

        f' = z^p·s·( σ(−z) + (p/z)·(1 − (r/(r+1))·ln z / 2) ).

    Both changes matter for large gates. ``1 − s`` cancels to exactly 0 in fp32 once z ≳ 17, and
    for z ≳ 1e6 the small negative p'·ln z then rounded away against the 1 in ``p'·ln z + 1 − s``,
    leaving the positive p/z: the wrong sign. σ(−z) keeps the tiny tail, and the factor
    ``1 − (r/(r+1))·ln z/2`` (negative for z > e² ≈ 7.4) carries the sign without cancellation.
    Computing p'·ln z itself would also overflow ``2r(r+1)²`` in fp32 for z ≳ 1e25. The product is
    formed as ``((du·f)·(p·factor))/z`` so that a large ``du`` keeps a result that is a normal
    number even where f'(z) alone would be subnormal (z up to the fp32 maximum).

    ``exp`` and ``log`` are parameters only so that a benchmark can time other implementations
    of them in the same formula (``bench.powlu_cost``); the kernels use torch's.
    """
    positive = g > 0
    safe = torch.where(positive, g, torch.ones_like(g))
    # σ(g) and σ(−g) = 1 − σ(g) (without cancellation) from one exp: with e = exp(−|g|) ≤ 1 they
    # are 1/(1+e) and e/(1+e), in the order given by the sign of g.
    e = exp(-g.abs())
    near_one = 1.0 / (1.0 + e)
    near_zero = e * near_one
    s = torch.where(positive, near_one, near_zero)
    s_neg = torch.where(positive, near_zero, near_one)
    root = torch.sqrt(safe)
    exponent = m / (root + 1.0)
    log_z = log(safe)
    f_pos = exp(exponent * log_z) * s
    factor = 1.0 - (root / (root + 1.0)) * log_z * 0.5
    du_f = du * f_pos
    # power = 0 (tiny z) gives 0/z = 0, never 0·inf.
    grad_pos = du_f * s_neg + (du_f * (exponent * factor)) / safe
    f = torch.where(positive, f_pos, g * s)
    grad = torch.where(positive, grad_pos, du * (s * (1.0 + g * s_neg)))
    return f, grad


def powlu_glu_fwd(gate: Tensor, up: Tensor, m: float) -> Tensor:
    ct = _compute_dtype(gate)
    g, u = gate.to(ct), up.to(ct)
    positive = g > 0
    safe = torch.where(positive, g, torch.ones_like(g))
    power = torch.exp((m / (torch.sqrt(safe) + 1.0)) * torch.log(safe))
    s = torch.sigmoid(g)
    return (torch.where(positive, power * s, g * s) * u).to(gate.dtype)


def powlu_glu_bwd(gate: Tensor, up: Tensor, dy: Tensor, m: float) -> tuple[Tensor, Tensor]:
    ct = _compute_dtype(gate)
    g, u, d = gate.to(ct), up.to(ct), dy.to(ct)
    f, d_gate = _powlu_gate_and_grad(g, d * u, m)
    return d_gate.to(gate.dtype), (d * f).to(up.dtype)


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
    # α·(g·s) rather than (α·g)·s: for g near −fp32max, α·g overflows to −inf while g·s is 0.
    d_gate = torch.where(g_raw <= limit, d * (u + 1.0) * (s + alpha * (g * s) * (1.0 - s)), 0.0)
    d_up = torch.where((u_raw >= -limit) & (u_raw <= limit), d * (g * s), 0.0)
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
# tanh for the tanh norms
# --------------------------------------------------------------------------------------------

# Inductor's CPU code calls Sleef's 1-ulp vectorised tanh, which costs ~3× a memory pass and made
# DyT/BHyT compute-bound. A [13/6] rational approximation (the coefficients Eigen uses for fp32
# tanh) is a dozen FMAs and one division: max relative error 3.6e-7 (~3 ulp) over the fp32 range,
# and exactly odd. Its 1 − t² near saturation would inherit t's absolute error (~3e-7), so the
# backward takes sech² = 4e/(1+e)², e = exp(−2|a|), which stays accurate relative to itself.
_TANH_CLAMP = 7.90531110763549805  # beyond this the rational form rounds to ±1 in fp32
_TANH_LINEAR = 4e-4  # below this tanh(a) == a in fp32 (the cubic term is under half an ulp)
_TANH_NUM = (
    4.89352455891786e-03, 6.37261928875436e-04, 1.48572235717979e-05, 5.12229709037114e-08,
    -8.60467152213735e-11, 2.00018790482477e-13, -2.76076847742355e-16,
)  # fmt: skip
_TANH_DEN = (4.89352518554385e-03, 2.26843463243900e-03, 1.18534705686654e-04, 1.19825839466702e-06)


def _tanh(a: Tensor) -> Tensor:
    """tanh: the rational approximation for fp32 math, ``torch.tanh`` for float64 (gradcheck)."""
    if a.dtype == torch.float64:
        return torch.tanh(a)
    clamped = a.clamp(-_TANH_CLAMP, _TANH_CLAMP)
    a2 = clamped * clamped
    num = a2 * _TANH_NUM[6] + _TANH_NUM[5]
    for coefficient in reversed(_TANH_NUM[:5]):
        num = num * a2 + coefficient
    den = a2 * _TANH_DEN[3] + _TANH_DEN[2]
    for coefficient in reversed(_TANH_DEN[:2]):
        den = den * a2 + coefficient
    return torch.where(a.abs() < _TANH_LINEAR, a, clamped * num / den)


def _sech2(a: Tensor) -> Tensor:
    """1 − tanh²(a) = 4e/(1+e)², e = exp(−2|a|): no cancellation near saturation."""
    e = torch.exp(-2.0 * a.abs())
    one_plus = 1.0 + e
    return 4.0 * e / (one_plus * one_plus)


def _tanh_site(arg: Tensor, d: Tensor, weight: Tensor, has_weight: bool) -> tuple[Tensor, Tensor]:
    """A tanh norm's site ``γ ⊙ tanh(arg)`` given its output gradient ``d``: ``tanh(arg)`` and
    ``h = dL/d(arg) = (d ⊙ γ)·sech²(arg)``."""
    t = _tanh(arg)
    return t, _gain(d, weight, has_weight) * _sech2(arg)


# --------------------------------------------------------------------------------------------
# norms
# --------------------------------------------------------------------------------------------

# The per-token statistic mean(x²) overflows fp32 for rows near the fp32/bf16 maximum and loses
# everything to underflow for tiny rows when ε = 0. The reference fixes that with an extra amax pass
# and a power-of-two rescale; here the same row loop accumulates three sums of squares — of x, of
# x·2^-72 and of x·2^90 — and each row picks the one that is in range. Every row is then normalised
# as (x·S)·r_S with S ∈ {1, 2^-72, 2^90} and r_S = 1/sqrt(mean((x·S)²) + ε·S²), both factors in the
# normal fp32 range, so x̂ = x·r is accurate across the whole fp32 range. Three fp32 FMAs per element
# cost nothing next to the memory traffic (a float64 accumulator would be simpler, but Inductor's
# CPU code for bf16→float64 conversion is not vectorised and made the bf16 kernel 3× slower).
_SCALE_DOWN = 2.0**-72  # (3.4e38·2^-72)² · 16384 < fp32 max: no overflow for hidden sizes ≤ 16384
# Rows with Σx² < 2^-60 ("tiny") are rescaled by 2^90: then Σ(x·S)² < 2^120 cannot overflow, and the
# smallest subnormal 2^-149 becomes 2^-59, whose square 2^-118 is still a normal fp32 number.
_SCALE_UP = 2.0**90
_OVERFLOW_SUM = 3.0e38  # Σx² at/above this is treated as overflowed (compares, not isinf: Inductor
#                          compiles C++ with -ffinite-math-only, which may fold isinf away)
_UNDERFLOW_SUM = 2.0**-60  # below this Σx² has lost precision to underflow (matters only if ε is tiny)
TINY_EPS = 2.0**-60  # ε below this: tiny rows must be rescaled up (see allow_upscale)


def _row_scale_and_inv_rms(xc: Tensor, eps: float, allow_upscale: bool) -> tuple[Tensor, Tensor]:
    """Per-row ``S`` (power of two) and ``r_S = 1/sqrt(mean((x·S)²) + ε·S²)``, shapes ``[tokens, 1]``.

    ``allow_upscale`` is ``eps < TINY_EPS``: with a larger ε, tiny rows are dominated by ε and the
    underflowed Σx² is harmless (and ε·2^180 would overflow).
    """
    d = xc.shape[-1]
    sum_sq = xc.square().sum(dim=-1, keepdim=True)
    sum_sq_down = (xc * _SCALE_DOWN).square().sum(dim=-1, keepdim=True)
    big = sum_sq >= _OVERFLOW_SUM
    scale = torch.where(big, _SCALE_DOWN, 1.0)
    chosen = torch.where(big, sum_sq_down, sum_sq)
    # ε·S² is formed in Python (double) precision, never as S·S in fp32 (2^180 would overflow).
    eps_scaled = torch.where(big, eps * (_SCALE_DOWN * _SCALE_DOWN), eps)
    if allow_upscale:
        sum_sq_up = (xc * _SCALE_UP).square().sum(dim=-1, keepdim=True)
        tiny = sum_sq < _UNDERFLOW_SUM
        scale = torch.where(tiny, _SCALE_UP, scale)
        chosen = torch.where(tiny, sum_sq_up, chosen)
        eps_scaled = torch.where(tiny, eps * (_SCALE_UP * _SCALE_UP), eps_scaled)
    scale = scale.to(xc.dtype)
    inv_rms_scaled = torch.rsqrt(chosen / d + eps_scaled.to(xc.dtype))
    return scale, inv_rms_scaled


def mean_square_fwd(x: Tensor, *, allow_upscale: bool) -> Tensor:
    """Per-row ``mean(x²)`` (``[tokens, 1]``, fp32; float64 kept) in one pass, exact over the fp32 range.

    Same three sums as :func:`_row_scale_and_inv_rms`; the row's mean square is then
    ``Σ(x·S)²/d`` times ``S⁻¹·S⁻¹`` (two factors: S⁻² itself would overflow fp32). The result
    overflows to inf only when the true mean square exceeds the fp32 range, and for tiny rows
    (``allow_upscale``) it keeps full relative precision down to where it is itself subnormal.
    """
    ct = _compute_dtype(x)
    xc = x.to(ct)
    d = xc.shape[-1]
    sum_sq = xc.square().sum(dim=-1, keepdim=True)
    sum_sq_down = (xc * _SCALE_DOWN).square().sum(dim=-1, keepdim=True)
    out = torch.where(
        sum_sq >= _OVERFLOW_SUM, ((sum_sq_down / d) * (1.0 / _SCALE_DOWN)) * (1.0 / _SCALE_DOWN), sum_sq / d
    )
    if allow_upscale:
        sum_sq_up = (xc * _SCALE_UP).square().sum(dim=-1, keepdim=True)
        out = torch.where(sum_sq < _UNDERFLOW_SUM, ((sum_sq_up / d) * (1.0 / _SCALE_UP)) * (1.0 / _SCALE_UP), out)
    return out


def mean_square_bwd(x: Tensor, dv: Tensor) -> Tensor:
    """Gradient of :func:`mean_square_fwd`: ``dx = dv · 2x / d`` (in the input dtype)."""
    ct = _compute_dtype(x)
    xc = x.to(ct)
    return (dv.to(ct) * (2.0 / xc.shape[-1]) * xc).to(x.dtype)


def rms_norm_fwd(x: Tensor, weight: Tensor, *, eps: float, has_weight: bool, allow_upscale: bool) -> Tensor:
    ct = _compute_dtype(x)
    xc = x.to(ct)
    scale, inv = _row_scale_and_inv_rms(xc, eps, allow_upscale)
    return _gain((xc * scale) * inv, weight, has_weight).to(x.dtype)


def rms_norm_bwd(
    x: Tensor,
    weight: Tensor,
    dy: Tensor,
    *,
    eps: float,
    has_weight: bool,
    allow_upscale: bool,
    need_weight_grad: bool,
) -> tuple[Tensor, Tensor | None]:
    ct = _compute_dtype(x)
    xc, d = x.to(ct), dy.to(ct)
    g = _gain(d, weight, has_weight)
    scale, inv = _row_scale_and_inv_rms(xc, eps, allow_upscale)
    x_hat = (xc * scale) * inv
    # dx = r·(g − x̂·mean(g·x̂)), with r = S·r_S applied as two factors.
    dx = ((g - x_hat * (g * x_hat).mean(dim=-1, keepdim=True)) * scale) * inv
    d_weight = _weight_grad(d, x_hat, weight, need_weight_grad)
    return dx.to(x.dtype), d_weight


def dyt_fwd(
    x: Tensor, weight: Tensor, alpha: Tensor, bias: Tensor, *, has_weight: bool, has_bias: bool
) -> Tensor:
    ct = _compute_dtype(x)
    out = _gain(_tanh(alpha.to(ct) * x.to(ct)), weight, has_weight)
    if has_bias:
        out = out + bias.to(ct)
    return out.to(x.dtype)


def dyt_bwd(
    x: Tensor,
    weight: Tensor,
    alpha: Tensor,
    dy: Tensor,
    *,
    has_weight: bool,
    need_weight_grad: bool,
    need_alpha_grad: bool,
    need_bias_grad: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    ct = _compute_dtype(x)
    xc, d = x.to(ct), dy.to(ct)
    a = alpha.to(ct)
    arg = a * xc
    t, h = _tanh_site(arg, d, weight, has_weight)  # h = dL/d(αx)
    dx = (h * a).to(x.dtype)
    d_weight = _weight_grad(d, t, weight, need_weight_grad)
    # Row sums first, then their sum: keeps the fp32 accumulation chains short (d, then tokens).
    d_alpha = (h * xc).sum(dim=-1).sum().reshape(alpha.shape).to(alpha.dtype) if need_alpha_grad else None
    d_bias = d.sum(dim=0) if need_bias_grad else None
    return dx, d_weight, d_alpha, d_bias


def _bhyt_normalise(
    xc: Tensor, variance: Tensor, *, eps: float, use_variance: bool, allow_upscale: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """``(x̂, S, r_S)`` with x̂ = x·r, r = S·r_S = 1/sqrt(v + ε), v the given variance or mean(x²).

    A given variance is used as the reference does (fp32 ``rsqrt(v + ε)``, S = 1).
    """
    if use_variance:
        inv = torch.rsqrt(variance.to(xc.dtype) + eps)
        return xc * inv, torch.ones_like(inv), inv
    scale, inv = _row_scale_and_inv_rms(xc, eps, allow_upscale)
    return (xc * scale) * inv, scale, inv


def bhyt_fwd(
    x: Tensor,
    weight: Tensor,
    lam: Tensor,
    variance: Tensor,
    *,
    kappa: float,
    eps: float,
    has_weight: bool,
    use_variance: bool,
    allow_upscale: bool,
) -> Tensor:
    ct = _compute_dtype(x)
    xc = x.to(ct)
    x_hat, _, _ = _bhyt_normalise(xc, variance, eps=eps, use_variance=use_variance, allow_upscale=allow_upscale)
    return _gain(_tanh((lam.to(ct) / kappa) * x_hat), weight, has_weight).to(x.dtype)


def bhyt_bwd(
    x: Tensor,
    weight: Tensor,
    lam: Tensor,
    variance: Tensor,
    dy: Tensor,
    *,
    kappa: float,
    eps: float,
    has_weight: bool,
    use_variance: bool,
    allow_upscale: bool,
    need_weight_grad: bool,
    need_lam_grad: bool,
    need_variance_grad: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    ct = _compute_dtype(x)
    xc, d = x.to(ct), dy.to(ct)
    c = lam.to(ct) / kappa
    x_hat, scale, inv = _bhyt_normalise(
        xc, variance, eps=eps, use_variance=use_variance, allow_upscale=allow_upscale
    )
    arg = c * x_hat
    t, h = _tanh_site(arg, d, weight, has_weight)  # h = dL/d(arg), arg = c·x̂
    # Σ_row h·x̂ carries the gradient of the statistic (mean(x²) or the given variance) and of λ.
    row_hx = (h * x_hat).sum(dim=-1, keepdim=True)
    if use_variance:
        dx = (h * c) * inv
        # ∂arg/∂v = −½·arg·r²  ⇒  dv = −½·c·r·(r·Σ h·x̂).
        d_variance = ((-0.5 * c) * inv * (inv * row_hx)).to(variance.dtype) if need_variance_grad else None
    else:
        # arg = c·x·r(x), r = (mean(x²)+ε)^-½  ⇒  dx = c·r·(h − x̂·mean(h·x̂)).
        dx = (((h - x_hat * (row_hx / x.shape[-1])) * c) * scale) * inv
        d_variance = None
    d_weight = _weight_grad(d, t, weight, need_weight_grad)
    d_lam = (row_hx.sum() / kappa).reshape(lam.shape).to(lam.dtype) if need_lam_grad else None
    return dx.to(x.dtype), d_weight, d_lam, d_variance


# --------------------------------------------------------------------------------------------
# the BHyT block's first site: statistic and output in one kernel
# --------------------------------------------------------------------------------------------


def bhyt_ms_fwd(
    x: Tensor, weight: Tensor, lam: Tensor, *, kappa: float, eps: float, has_weight: bool
) -> tuple[Tensor, Tensor]:
    """``(γ ⊙ tanh(λ x/(κ √(v + ε))), v)`` with ``v = mean(x²)`` computed in the same row loop.

    Exactly the composition the block's reference path runs — ``v = mean_square(x)`` (the
    rescaled one-pass statistic, tiny rows always rescued: v has no ε) and then BHyT with the
    given variance (fp32 ``rsqrt(v + ε)``, S = 1) — so fused and reference agree row by row,
    including rows whose mean square overflows fp32 (v = inf, output 0). Inductor turns it into one
    kernel: per row one reduction over x, then the elementwise output from the row still in cache.
    """
    v = mean_square_fwd(x, allow_upscale=True)
    out = bhyt_fwd(
        x, weight, lam, v, kappa=kappa, eps=eps, has_weight=has_weight, use_variance=True, allow_upscale=False
    )
    return out, v


def bhyt_ms_bwd(
    x: Tensor,
    weight: Tensor,
    lam: Tensor,
    dy: Tensor,
    dv: Tensor,
    *,
    kappa: float,
    eps: float,
    has_weight: bool,
    need_weight_grad: bool,
    need_lam_grad: bool,
    v: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Gradient of :func:`bhyt_ms_fwd` given ``dy`` (for the output) and ``dv`` (for v).

    ``v``: the forward's statistic (its second output, ``[tokens, 1]`` fp32), saved by the autograd
    wrappers so that the backward does not reduce over x again; None recomputes it (same formula).

    ``dv`` is everything else the block sends into v — the second site's variance gradient — so the
    whole statistic's backward is this one pass: with r = (v + ε)^-½, x̂ = x·r, arg = c·x̂ (c = λ/κ)
    and h = dL/d(arg),

        dv_total = dv − ½·c·r·(r·Σ h·x̂),    dx = c·r·h + dv_total · 2x/d.

    Rows whose v overflowed fp32 have r = 0, x̂ = 0: their site term and dv contribution are 0,
    not 0·inf.
    """
    ct = _compute_dtype(x)
    xc, d = x.to(ct), dy.to(ct)
    c = lam.to(ct) / kappa
    v = mean_square_fwd(xc, allow_upscale=True) if v is None else v.to(ct)
    inv = torch.rsqrt(v + eps)
    x_hat = xc * inv
    arg = c * x_hat
    t, h = _tanh_site(arg, d, weight, has_weight)
    row_hx = (h * x_hat).sum(dim=-1, keepdim=True)
    dv_total = dv.to(ct) + (-0.5 * c) * inv * (inv * row_hx)
    dx = (h * c) * inv + (dv_total * (2.0 / x.shape[-1])) * xc
    d_weight = _weight_grad(d, t, weight, need_weight_grad)
    d_lam = (row_hx.sum() / kappa).reshape(lam.shape).to(lam.dtype) if need_lam_grad else None
    return dx.to(x.dtype), d_weight, d_lam


# --------------------------------------------------------------------------------------------
# cross-entropy of one chunk of logits (the fused LM head + loss, kernels/linear_ce.py)
# --------------------------------------------------------------------------------------------


def cross_entropy_chunk(
    logits: Tensor, targets: Tensor, valid: Tensor, grad_scale: Tensor, *, need_grad: bool, grad_dtype: torch.dtype
) -> tuple[Tensor, ...]:
    """Loss terms and logits gradient of one chunk: ``(Σ over valid rows of lse − logit[target],)``
    and, with ``need_grad``, ``(softmax − one-hot(target))·grad_scale`` on valid rows (0 elsewhere)
    in ``grad_dtype``.

    ``logits [rows, vocab]`` (any float dtype; the softmax runs in fp32, float64 kept),
    ``targets [rows, 1]`` int64 (in range on every row), ``valid [rows]`` bool, ``grad_scale``
    0-dim (1 / the number of valid targets). Shifted by the row max first, as ``log_softmax``
    does, so that the probabilities near the max are exact for large logits. Inductor makes this
    the row max pass, the exp-sum pass and one elementwise pass writing the gradient; eager it was
    eight separate passes over the chunk.
    """
    ct = torch.float64 if logits.dtype == torch.float64 else torch.float32
    lc = logits.to(ct)
    shifted = lc - lc.amax(dim=-1, keepdim=True)
    lse = torch.log(torch.exp(shifted).sum(dim=-1, keepdim=True))
    picked = shifted.gather(1, targets)
    loss = torch.where(valid[:, None], lse - picked, 0.0).sum()
    if not need_grad:
        return (loss,)
    one_hot = torch.arange(lc.shape[-1], device=lc.device)[None, :] == targets
    probs = torch.exp(shifted - lse)
    scale = torch.where(valid[:, None], grad_scale.to(ct), 0.0)
    return loss, ((probs - one_hot.to(ct)) * scale).to(grad_dtype)
