"""Reference semantics of every steadylm op (SPEC §1–§2).

Plain, differentiable PyTorch. These functions define what the fused kernels must compute and are
the yardstick of every test; they favour clarity and numerical robustness over speed:

* all math runs in fp32 (or the input's dtype when that is wider, e.g. float64 for gradcheck) and
  the result is returned in the input dtype;
* branches are evaluated on *safe* inputs, because ``torch.where`` differentiates both branches and
  a NaN in the discarded one poisons the gradient;
* per-token statistics are taken on a power-of-two rescaled copy of the row, so that inputs near the
  bf16/fp32 maximum (whose squares overflow fp32) still normalise correctly.

Invalid hyper-parameters raise ``ValueError`` naming the parameter and its allowed range.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "SWIGLU_CLIP_VARIANTS",
    "bhyt",
    "bhyt_and_mean_square",
    "bhyt_variance_correction",
    "dyt",
    "layer_norm",
    "linear_cross_entropy",
    "mean_square",
    "powlu",
    "powlu_gate",
    "powlu_glu",
    "rms_norm",
    "swiglu",
    "swiglu_clip",
    "validate_eps",
    "validate_kappa",
    "validate_powlu_m",
    "validate_swiglu_clip",
    "validate_variance",
]

SWIGLU_CLIP_VARIANTS: tuple[str, ...] = ("gptoss", "step", "clamp")


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------


def _as_float(name: str, value: float) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number, got {value!r}") from None
    if not math.isfinite(out):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return out


def validate_powlu_m(m: float) -> float:
    """Check the PowLU exponent scale: ``0 < m < 10`` (beyond ~10.02 powlu stops being monotone)."""
    try:
        m = float(m)
    except (TypeError, ValueError):
        raise ValueError(f"m must be a real number with 0 < m < 10, got {m!r}") from None
    if not 0.0 < m < 10.0:  # also rejects nan and ±inf, with the range in the message
        raise ValueError(f"m must satisfy 0 < m < 10 (PowLU exponent scale), got {m}")
    return m


def validate_swiglu_clip(limit: float, variant: str, alpha: float) -> tuple[float, str, float]:
    """Check SwiGLU-Clip hyper-parameters: ``limit > 0``, ``alpha > 0``, a known variant."""
    limit = _as_float("limit", limit)
    if limit <= 0.0:
        raise ValueError(f"limit must be > 0 (clip bound L), got {limit}")
    alpha = _as_float("alpha", alpha)
    if alpha <= 0.0:
        raise ValueError(f"alpha must be > 0 (sigmoid sharpness), got {alpha}")
    if variant not in SWIGLU_CLIP_VARIANTS:
        raise ValueError(f"variant must be one of {list(SWIGLU_CLIP_VARIANTS)}, got {variant!r}")
    return limit, variant, alpha


def validate_eps(eps: float) -> float:
    """Check a norm epsilon: ``eps >= 0``."""
    eps = _as_float("eps", eps)
    if eps < 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    return eps


def validate_kappa(kappa: float) -> float:
    """Check the BHyT bound factor: ``kappa > 0``."""
    kappa = _as_float("kappa", kappa)
    if kappa <= 0.0:
        raise ValueError(f"kappa must be > 0 (BHyT bound factor), got {kappa}")
    return kappa


def validate_variance(variance: Tensor, x: Tensor) -> None:
    """A given BHyT variance must be per-token: shape ``x.shape[:-1] + (1,)``."""
    expected = tuple(x.shape[:-1]) + (1,)
    if tuple(variance.shape) != expected:
        raise ValueError(f"variance must have shape {expected} (per-token mean square), got {tuple(variance.shape)}")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _compute_dtype(x: Tensor) -> torch.dtype:
    """fp32 for half/bf16/fp32 inputs; keep float64 so that gradcheck sees true float64 math."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _upcast(x: Tensor) -> Tensor:
    return x.to(_compute_dtype(x))


def _row_scale(x: Tensor, eps: float = 1.0) -> Tensor:
    """A per-row power of two ``s`` that brings ``max|x|/s`` to at most 2 (detached).

    Dividing by a power of two is exact, and every normalisation here is invariant to a constant
    rescaling of the row, so the scale is detached: the result is the same function of ``x``.
    Rows are only scaled *down* (``s >= 1``) when ``eps > 0``: for small rows ε dominates the
    statistic anyway, and ``ε/s²`` must not overflow. With ``eps == 0`` small rows are scaled up
    too, so that squares of tiny values do not underflow to a zero denominator.
    """
    finfo = torch.finfo(x.dtype)
    max_exponent = math.floor(math.log2(finfo.max))  # 127 for fp32, 1023 for float64
    min_exponent = math.floor(math.log2(finfo.tiny))  # smallest normal
    amax = x.detach().abs().amax(dim=-1, keepdim=True)
    exponent = torch.ceil(torch.log2(amax.clamp_min(finfo.tiny)))
    # 2**(max_exponent+1) overflows; max|x| / 2**max_exponent < 2 keeps the squares and their mean finite.
    exponent = exponent.clamp(min=0.0 if eps > 0 else float(min_exponent), max=float(max_exponent))
    return torch.exp2(exponent)


def _scaled_mean_square(x: Tensor, eps: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """Return ``(y, ms_y, s)`` with ``y = x / s`` and ``ms_y = mean(y²)`` (so mean(x²) = s²·ms_y)."""
    s = _row_scale(x, eps)
    y = x / s
    return y, y.square().mean(dim=-1, keepdim=True), s


def mean_square(x: Tensor) -> Tensor:
    """Per-token ``mean(x²)`` over the last dim in fp32 (float64 kept), shape ``x.shape[:-1] + (1,)``.

    Differentiable. This is the statistic the BHyT block computes once and hands to both sites.
    Overflows to ``inf`` only when the true mean square exceeds the fp32 range.
    """
    y, ms_y, s = _scaled_mean_square(_upcast(x))
    return ms_y * s * s  # not ms_y·s²: s² = 2^128 overflows fp32 although the product may not


# --------------------------------------------------------------------------------------------
# activations (SPEC §1)
# --------------------------------------------------------------------------------------------


def _powlu_gate_math(z: Tensor, m: float) -> Tensor:
    """f_m(z) on an already upcast tensor (see :func:`powlu_gate`)."""
    positive = z > 0
    # Safe base: z <= 0 replaced by 1 so log/sqrt never see a non-positive number in either branch.
    safe = torch.where(positive, z, torch.ones_like(z))
    exponent = m / (torch.sqrt(safe) + 1.0)
    power = torch.exp(exponent * torch.log(safe))
    # F.silu, not z·σ(z): its backward is the closed form σ(1 + z(1 − σ)), whereas autograd through
    # z·σ(z) forms dL/dσ = z·(upstream) first, which overflows to inf for huge |z| and then meets
    # σ' = 0 as inf·0 = NaN (e.g. gate −1e4 with up 3e38, or the scalar powlu at −3e38).
    return torch.where(positive, power * torch.sigmoid(safe), F.silu(z))


def powlu_gate(x: Tensor, m: float = 3.0) -> Tensor:
    """The PowLU gate f_m: ``z^(m/(√z+1))·σ(z)`` for z > 0, ``silu(z)`` for z ≤ 0.

    Args:
        x: any shape, any float dtype.
        m: exponent scale, ``0 < m < 10`` (default 3).
    Returns:
        f_m(x) in the dtype of ``x`` (computed in fp32 or float64).
    """
    m = validate_powlu_m(m)
    return _powlu_gate_math(_upcast(x), m).to(x.dtype)


def powlu_glu(gate: Tensor, up: Tensor, m: float = 3.0) -> Tensor:
    """Gated PowLU, the FFN activation that replaces SwiGLU: ``f_m(gate) · up``."""
    m = validate_powlu_m(m)
    return (_powlu_gate_math(_upcast(gate), m) * _upcast(up)).to(gate.dtype)


def powlu(x: Tensor, m: float = 3.0) -> Tensor:
    """Scalar (ungated) PowLU ``x · f_m(x)``: ``x^(1+m/(√x+1))σ(x)`` for x > 0, ``x²σ(x)`` for x ≤ 0."""
    m = validate_powlu_m(m)
    z = _upcast(x)
    return (z * _powlu_gate_math(z, m)).to(x.dtype)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """SwiGLU activation ``silu(gate) · up`` (fp32 math, input dtype out)."""
    return (F.silu(_upcast(gate)) * _upcast(up)).to(gate.dtype)


def swiglu_clip(
    gate: Tensor,
    up: Tensor,
    limit: float = 7.0,
    variant: str = "gptoss",
    alpha: float = 1.702,
) -> Tensor:
    """SwiGLU with clipping, three published variants (SPEC §1).

    * ``"gptoss"``: ``g'·σ(α g')·(u' + 1)`` with ``g' = min(g, L)``, ``u' = clamp(u, −L, L)``;
    * ``"step"``: ``min(silu(g), L) · clamp(u, −L, L)``;
    * ``"clamp"``: ``silu(min(g, L)) · clamp(u, −L, L)``.

    ``alpha`` is used by ``"gptoss"`` only.
    """
    limit, variant, alpha = validate_swiglu_clip(limit, variant, alpha)
    g, u = _upcast(gate), _upcast(up)
    u_clipped = u.clamp(-limit, limit)
    if variant == "gptoss":
        # The lower clamp changes nothing representable (g·σ(αg) and its slope are below the float64
        # subnormals there) but keeps dL/dσ = g·(u'+1)·(upstream) from overflowing to inf and meeting
        # σ'(αg) = 0 as inf·0 = NaN for huge negative gates.
        g_clipped = g.clamp(min=-750.0 / alpha, max=limit)
        out = g_clipped * torch.sigmoid(alpha * g_clipped) * (u_clipped + 1.0)
    elif variant == "step":
        out = F.silu(g).clamp(max=limit) * u_clipped
    else:  # "clamp"
        out = F.silu(g.clamp(max=limit)) * u_clipped
    return out.to(gate.dtype)


# --------------------------------------------------------------------------------------------
# norms (SPEC §2)
# --------------------------------------------------------------------------------------------


def rms_norm(x: Tensor, weight: Tensor | None, eps: float = 1e-6) -> Tensor:
    """RMSNorm ``γ ⊙ x / sqrt(mean(x²) + ε)`` over the last dim."""
    eps = validate_eps(eps)
    y, ms_y, s = _scaled_mean_square(_upcast(x), eps)
    # x / sqrt(mean(x²)+ε) == y / sqrt(mean(y²) + ε/s²): exact for the power-of-two s.
    out = y * torch.rsqrt(ms_y + (eps / s) / s)
    if weight is not None:
        out = out * _upcast(weight)
    return out.to(x.dtype)


def layer_norm(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float = 1e-5
) -> Tensor:
    """LayerNorm ``γ ⊙ (x − μ)/sqrt(σ² + ε) + β`` over the last dim (biased variance)."""
    eps = validate_eps(eps)
    z = _upcast(x)
    s = _row_scale(z, eps)
    y = z / s
    mean_y = y.mean(dim=-1, keepdim=True)
    centred = y - mean_y
    var_y = centred.square().mean(dim=-1, keepdim=True)
    if eps > 0:
        # A constant row (every centred value exactly 0, var_y = 0) that is huge makes ε/s²
        # underflow, and the scaled form gives 0·rsqrt(0) = NaN. Its true output is exactly 0 with
        # gradient (I − 1/d)/√ε: the zero-valued t − t.detach() carries that gradient without any
        # s·(1/s) product that could overflow. The scaled branch gets a safe denominator so that
        # the discarded branch's backward cannot poison the gradient.
        flat = var_y == 0
        safe_denom = torch.where(flat, torch.ones_like(var_y), var_y + (eps / s) / s)
        deviation = z - (z / z.shape[-1]).sum(dim=-1, keepdim=True)
        unscaled = (deviation - deviation.detach()) * (eps**-0.5)
        out = torch.where(flat, unscaled, centred * torch.rsqrt(safe_denom))
    else:
        out = centred * torch.rsqrt(var_y)
    if weight is not None:
        out = out * _upcast(weight)
    if bias is not None:
        out = out + _upcast(bias)
    return out.to(x.dtype)


def dyt(x: Tensor, weight: Tensor | None, alpha: Tensor | float, bias: Tensor | None = None) -> Tensor:
    """Dynamic Tanh ``γ ⊙ tanh(α x) (+ β)``; ``alpha`` is a learnable scalar (0-dim tensor)."""
    z = _upcast(x)
    alpha_t = alpha.to(z.dtype) if isinstance(alpha, Tensor) else alpha
    out = torch.tanh(alpha_t * z)
    if weight is not None:
        out = out * _upcast(weight)
    if bias is not None:
        out = out + _upcast(bias)
    return out.to(x.dtype)


def bhyt(
    x: Tensor,
    weight: Tensor | None,
    lam: Tensor | float,
    kappa: float = 10.0,
    eps: float = 1e-6,
    variance: Tensor | None = None,
) -> Tensor:
    """Bounded hyperbolic tangent ``γ ⊙ tanh(λ · r · x)``, ``r = 1/(κ·sqrt(v + ε))``.

    Args:
        x: ``[..., d]``.
        weight: γ, shape ``[d]`` (or None).
        lam: λ, a learnable scalar (0-dim tensor) or float.
        kappa: κ > 0, the Chebyshev bound factor (default 10).
        eps: ε ≥ 0.
        variance: per-token mean square ``v`` (fp32, shape ``x.shape[:-1] + (1,)``) to use instead
            of ``mean(x²)`` — how the BHyT block hands the first site's statistic (or the
            approximated v') to the second site. Gradients flow into it.
    """
    kappa = validate_kappa(kappa)
    eps = validate_eps(eps)
    z = _upcast(x)
    lam_t = lam.to(z.dtype) if isinstance(lam, Tensor) else lam
    if variance is None:
        y, ms_y, s = _scaled_mean_square(z, eps)
        arg = (lam_t / kappa) * y * torch.rsqrt(ms_y + (eps / s) / s)
    else:
        validate_variance(variance, x)
        v = variance.to(torch.promote_types(variance.dtype, z.dtype))
        arg = (lam_t / kappa) * z * torch.rsqrt(v + eps)
    out = torch.tanh(arg)
    if weight is not None:
        out = out * _upcast(weight)
    return out.to(x.dtype)


def bhyt_and_mean_square(
    x: Tensor, weight: Tensor | None, lam: Tensor | float, kappa: float = 10.0, eps: float = 1e-6
) -> tuple[Tensor, Tensor]:
    """The BHyT block's first site and its statistic: ``(bhyt(x, weight, lam, kappa, eps,
    variance=v), v)`` with ``v = mean_square(x)``, the v the block hands to its second site.

    The reference of :func:`steadylm.kernels.bhyt_and_mean_square` (which computes both in one
    kernel): the same values, two steps.
    """
    v = mean_square(x)
    return bhyt(x, weight, lam, kappa, eps, variance=v), v


def bhyt_variance_correction(
    w_v: Tensor, w_o: Tensor, n_heads: int, n_kv_heads: int, seq_len: int
) -> Tensor:
    """c_ℓ = ‖W_V W_O‖_F² / (T · d), the BHyT second-site variance correction (SPEC §2 step 4).

    The value and output projections are composed as one ``d × d`` map, with the value heads
    repeated for grouped-query attention (query head ``h`` reads KV head ``h // (n_heads/n_kv)``).

    Args:
        w_v: value projection weight ``[n_kv_heads * head_dim, d]`` (``nn.Linear`` layout).
        w_o: output projection weight ``[d, n_heads * head_dim]``.
        n_heads, n_kv_heads: query and key/value head counts (``n_heads % n_kv_heads == 0``).
        seq_len: T, the training context length (> 0).
    Returns:
        A 0-dim fp32 tensor (float64 for float64 weights), without gradient.
    """
    if n_kv_heads <= 0 or n_heads <= 0:
        raise ValueError(f"n_heads and n_kv_heads must be > 0, got {n_heads} and {n_kv_heads}")
    if n_heads % n_kv_heads != 0:
        raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
    if seq_len <= 0:
        raise ValueError(f"seq_len must be > 0 (training context length T), got {seq_len}")
    if w_v.dim() != 2 or w_o.dim() != 2:
        raise ValueError("w_v and w_o must be 2-D nn.Linear weights")
    d = w_v.shape[1]
    if w_v.shape[0] % n_kv_heads != 0:
        raise ValueError(f"w_v rows ({w_v.shape[0]}) must be n_kv_heads ({n_kv_heads}) × head_dim")
    head_dim = w_v.shape[0] // n_kv_heads
    if tuple(w_o.shape) != (d, n_heads * head_dim):
        raise ValueError(
            f"w_o must have shape (d, n_heads*head_dim) = ({d}, {n_heads * head_dim}), "
            f"got {tuple(w_o.shape)}"
        )
    with torch.no_grad():
        dtype = _compute_dtype(w_v)
        per_head = w_v.to(dtype).reshape(n_kv_heads, head_dim, d)
        repeated = per_head.repeat_interleave(n_heads // n_kv_heads, dim=0).reshape(-1, d)
        composed = w_o.to(dtype) @ repeated  # [d, d]: x -> W_O (W_V x)
        return composed.square().sum() / (seq_len * d)


# --------------------------------------------------------------------------------------------
# loss
# --------------------------------------------------------------------------------------------


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token cross-entropy of the LM head ``hidden @ weight.T`` against ``targets``.

    ``hidden [..., d]``, ``weight [vocab, d]``, ``targets [...]`` (int). The logits are computed in
    the matmul's dtype (bf16 under autocast) and the softmax in fp32 (float64 kept): bf16 over the
    vocabulary would add noise that looks like instability.
    """
    logits = F.linear(hidden, weight)
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).to(dtype), targets.reshape(-1))
