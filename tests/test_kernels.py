"""steadylm.kernels against the float64 reference (steadylm.functional), element by element.

Most tests run the fused math *eagerly* (``set_compile(False)``): it is the very source Inductor
compiles, and eager keeps the suite fast. A few tests run the compiled kernels (small shapes, one
compile per op) and one runs them inside a ``torch.compile``'d module. The Triton backward kernels
run on CPU through Triton's interpreter (``TRITON_INTERPRET=1``, set by ``conftest.py``).

Tolerances (``tests/_tolerance.py``): each element of a result must lie within

    OUT_ULPS · ulp_out(ref)  +  2^-24 · bound  +  2^-149 · underflow

of the float64 reference evaluated on exactly the (already rounded) inputs the kernel gets.
``ulp_out`` is the spacing of the result's dtype at |ref|; ``OUT_ULPS = 0.5`` is the final
round-to-nearest cast (the whole budget of a bf16 result). ``bound`` is a per-element forward-error
bound in fp32 unit roundoffs: a count of fp32 roundings (the constants below) times the magnitude of
the terms they act on. Where terms cancel, the magnitude is the sum of their absolute values (the
op's conditioning at that element), never a scale taken from the worst element of the tensor. The
derivation of each op's bound is written next to it in :data:`BOUNDS`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import torch
from torch import Tensor

from _tolerance import assert_within
from steadylm import functional as F
from steadylm import kernels as K
from steadylm.nn import BHyTPair

# --- error counts of fp32 primitives, in units of U32 = 2^-24 (one rounding = 1) -----------------
# exp / log: ≤ 2 ulp (≤ 4·U32) — Sleef's u10 functions on CPU (1 ulp), CUDA's libdevice / approximate
# ex2-based versions (≤ 2 ulp).
EXP = LOG = 4
# σ(x) = 1/(1 + exp(−x)): the exp, the add, the division.
SIGMOID = EXP + 2
#: Per device: U32 units of relative error per unit of |argument| in exp. Exps built on ex2 (CUDA's
#: fast path, which Inductor's Triton code and ours take) round a·log2(e) before ex2: an absolute
#: error of |a|·U32 in the exponent, i.e. |a|·U32 relative in exp(a). Sleef's exp on CPU reduces
#: the argument in extra precision, without that term. Measured on an H200 (torch 2.11): swiglu
#: at g ≈ −12 was 11.8·U32 off, over the CPU-only bound's 10.
EXP_ARG = {"cpu": 0.0, "cuda": 1.0}


def _sigmoid_rel(x: Tensor, device: str) -> Tensor:
    """σ(x)'s relative error in U32: SIGMOID, plus exp's argument rounding on ``device``
    (:data:`EXP_ARG`), which σ passes on scaled by its relative condition in exp(−x), 1 − σ(x)."""
    return SIGMOID + EXP_ARG[device] * x.abs() * (1 - torch.sigmoid(x))
# sqrt is correctly rounded (1); rsqrt ≤ 1 ulp (2).
SQRT, RSQRT = 1, 2
# The [13/6] rational tanh of kernels._math: measured 3.6e-7 = 6.04·U32 relative over the fp32 range
# (test_fast_tanh_and_sech2_accuracy_over_the_fp32_range pins 5e-7 = 8.4·U32), +1 for rounding its
# argument (tanh's relative condition number |a|·sech²(a)/|tanh(a)| is ≤ 1).
TANH = 9

# The float64 reference differentiates tanh as 1 − tanh²: beyond |a| ≈ 19 that is exactly 0 while
# sech²(a) is not, i.e. the reference's own absolute error on sech² is ≤ 3·2^-53 (t's rounding, twice,
# and the subtraction) — in U32 units 3·2^-29, times what multiplies sech². (The kernels compute
# sech² = 4e/(1+e)² and are accurate there; the bound must not hold them to the reference's zero.)
REF_SECH2 = 3 * 2.0**-29

#: The final cast of every result to its dtype: round to nearest, half an ulp of that dtype.
OUT_ULPS = 0.5
BF16_MAX = torch.finfo(torch.bfloat16).max
SHAPES = [(1, 1, 1), (3, 7, 257), (2, 1024, 32)]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP hand-offs that dominate on a busy 2-core box."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def eager_kernels():
    """Run the fused math without compiling (same source; restores the previous setting)."""
    previous = K.compile_enabled()
    K.set_compile(False)
    yield
    K.set_compile(previous)


# --------------------------------------------------------------------------------------------
# per-op error bounds (float64, from the inputs; units: U32 for `bound`, 2^-149 for `underflow`)
# --------------------------------------------------------------------------------------------

# Every bound function takes the float64 inputs (activations, parameters), the float64 output
# gradient and the case's hyper-parameters, and returns one (bound, underflow) pair per checked
# result, in the order: output, gradient of each activation input, gradient of each parameter.
Bound = tuple[Tensor, Tensor | float]


def _gated_underflow(g: Tensor, *factors: Tensor) -> Tensor:
    """Absolute error, in subnormal spacings, of intermediates that fell below fp32's normal range.

    Each of the ≤ 8 roundings of a gated activation's formula may land in the subnormal range (half a
    spacing) and is then multiplied by a product of some of |dy|, |u| and |g| — ≤ Π(1 + |·|). |g|
    multiplies a subnormal only through σ(g) (subnormal for −104 < g < −87), hence the cap at 104.
    """
    out = 8.0 * (1 + g.abs().clamp(max=104.0))
    for f in factors:
        out = out * (1 + f.abs())
    return out


def _gated_bounds(
    op: str, hp: dict, acts: list[Tensor], params: list[Tensor], dy: Tensor, device: str = "cpu"
) -> list[Bound]:
    g, u = acts
    if op == "swiglu":
        s = torch.sigmoid(g)
        s_rel = _sigmoid_rel(g, device)
        return [
            # y = g·σ·u: σ, then two products.
            ((s_rel + 2) * (g * s * u).abs(), _gated_underflow(g, u)),
            # dgate = dy·u·σ·(1 + g(1 − σ)): σ (s_rel) and 1 − σ (σ's absolute error, times |g|:
            # s_rel), then 5 products/sums; all relative to |dy·u|·σ·(1 + |g|), the magnitude of
            # the terms of 1 + g(1 − σ), which cancel near g ≈ −1.28 (silu's minimum).
            ((2 * s_rel + 5) * (dy * u).abs() * s * (1 + g.abs()), _gated_underflow(g, u, dy)),
            # dup = dy·g·σ.
            ((s_rel + 2) * (dy * g * s).abs(), _gated_underflow(g, dy)),
        ]
    if op == "powlu_glu":
        return _powlu_bounds(hp.get("m", 3.0), g, u, dy, device)
    return _clip_bounds(hp, g, u, dy, device)


def _powlu_bounds(m: float, g: Tensor, u: Tensor, dy: Tensor, device: str = "cpu") -> list[Bound]:
    """f_m(z) = z^p·σ(z), p = m/(√z + 1) for z > 0; silu(z) for z ≤ 0 (SPEC §1)."""
    pos = g > 0
    z = torch.where(pos, g, torch.ones_like(g))
    r = z.sqrt()
    p = m / (r + 1)
    log_z = z.log()
    big_p = (p * log_z).abs()
    s, s_neg = torch.sigmoid(g), torch.sigmoid(-g)
    f = torch.where(pos, torch.exp(p * log_z) * s, g * s)
    # z^p = exp(p·ln z): p·ln z carries sqrt, +1, division, log and product (SQRT + 2 + LOG + 1)
    # relative error, which exp turns into that times |p·ln z| relative; + exp's own, σ's, 1 product.
    # On an ex2-based exp, rounding p·ln z·log2(e) adds |p·ln z| more (EXP_ARG).
    s_rel = _sigmoid_rel(g, device)
    f_rel = torch.where(pos, (SQRT + 3 + LOG + EXP_ARG[device]) * big_p + EXP + s_rel + 1, s_rel + 1.0)
    du = dy * u
    # d gate, z > 0 (kernels._math._powlu_gate_and_grad): du·f·σ(−z) + du·f·p·F/z with
    # F = 1 − (r/(r+1))·ln z/2. Magnitudes of the two terms, F's parts taken absolutely (F cancels
    # at z ≈ e²): T1, T2. Errors: f's (f_rel) on both; σ(−z) on T1; on T2 p (SQRT + 2), F's second
    # part (SQRT + 2 for r/(r+1), LOG + 1 for ·ln z, 1 for the subtraction), the product, the
    # division by z and the final sum: 3 + 8 + 3 = 14. Where z ≤ 0: silu' as in swiglu.
    t1 = (du * f * s_neg).abs()
    t2 = (du * f * p / z).abs() * (1 + (r / (r + 1)) * log_z.abs() / 2)
    d_gate = torch.where(
        pos, (f_rel + 2) * (t1 + t2) + _sigmoid_rel(-g, device) * t1 + 14 * t2, (2 * s_rel + 5) * du.abs() * s * (1 + g.abs())
    )
    # Underflow: as for every gated activation (σ(±z), z^p for tiny z, products), and on the z > 0
    # side of d(gate) a subnormal du·f is then multiplied by p·F/z.
    slope = torch.where(pos, 1 + p * (1 + log_z.abs()) / z, torch.ones_like(g))
    return [
        (f_rel * (f * u).abs() + (f * u).abs(), _gated_underflow(g, u)),
        (d_gate, _gated_underflow(g, u, dy) * slope),
        (f_rel * (f * dy).abs() + (f * dy).abs(), _gated_underflow(g, dy)),
    ]


def _clip_bounds(hp: dict, g: Tensor, u: Tensor, dy: Tensor, device: str = "cpu") -> list[Bound]:
    """SwiGLU-Clip (SPEC §1); gradients are exactly 0 where a clamp is active (bound 0 there)."""
    limit, variant, alpha = hp["limit"], hp.get("variant", "gptoss"), hp.get("alpha", 1.702)
    uc = u.clamp(-limit, limit)
    up_live = (u >= -limit) & (u <= limit)
    if variant == "gptoss":
        gc = g.clamp(max=limit)
        s = torch.sigmoid(alpha * gc)
        # Rounding α·g' (relative 1) moves σ(α g') by |α g'|(1 − σ) relative.
        s_rel = _sigmoid_rel(alpha * gc, device) + (alpha * gc).abs() * (1 - s)
        u1 = uc.abs() + 1  # |u'| + 1: the magnitude of u' + 1, which cancels at u' = −1
        out = ((s_rel + 3) * (gc * s).abs() * u1, _gated_underflow(alpha * gc, gc, u1))
        # dgate = dy·(u' + 1)·(σ + α(g'σ)(1 − σ)): σ's error on both terms, 1 − σ's absolute error
        # times α|g'|σ, 6 products/sums, on the magnitude |dy|(|u'| + 1)·σ·(1 + α|g'|).
        mag = dy.abs() * u1 * s * (1 + alpha * gc.abs())
        d_gate = torch.where(g <= limit, (2 * s_rel + 6) * mag, 0.0)
        d_gate_uf = _gated_underflow(alpha * gc, gc, u1, dy)
        d_up = torch.where(up_live, (s_rel + 2) * (dy * gc * s).abs(), 0.0)
        return [out, (d_gate, d_gate_uf), (d_up, _gated_underflow(alpha * gc, gc, dy))]
    if variant == "step":
        s = torch.sigmoid(g)
        s_rel = _sigmoid_rel(g, device)
        silu = (g * s).clamp(max=limit)
        out = ((s_rel + 2) * (silu * uc).abs(), _gated_underflow(g, uc))
        # dgate = dy·u'·silu'(g) where silu(g) ≤ L: as swiglu's.
        d_gate = torch.where(g * s <= limit, (2 * s_rel + 5) * (dy * uc).abs() * s * (1 + g.abs()), 0.0)
        d_up = torch.where(up_live, (s_rel + 2) * (dy * silu).abs(), 0.0)
        return [out, (d_gate, _gated_underflow(g, uc, dy)), (d_up, _gated_underflow(g, dy))]
    # "clamp": swiglu of (min(g, L), clamp(u, −L, L)), gradients masked by both clamps.
    gc = g.clamp(max=limit)
    out, (d_gate, d_gate_uf), (d_up, d_up_uf) = _gated_bounds("swiglu", {}, [gc, uc], [], dy, device)
    return [out, (torch.where(g <= limit, d_gate, 0.0), d_gate_uf), (torch.where(up_live, d_up, 0.0), d_up_uf)]


def _rms_rel(d: int) -> float:
    """Relative error of the kernels' r = 1/sqrt(mean(x²) + ε), in U32.

    Σ(x·S)² over d terms: one rounding per square and ≤ d − 1 for the additions (any order); the
    division by d and the + ε: 2 more, so d + 2 on mean(x²) + ε; the square root halves it, rsqrt
    adds its own. (S is a power of two: exact.)
    """
    return (d + 2) / 2 + RSQRT


def _norm_bounds(op: str, hp: dict, acts: list[Tensor], params: list[Tensor], dy: Tensor) -> list[Bound]:
    x = acts[0]
    d = x.shape[-1]
    x2, dy2 = x.reshape(-1, d), dy.reshape(-1, d)
    tokens = x2.shape[0]
    shape = x.shape
    if op == "rms_norm":
        gamma = params[0] if params else torch.ones(d, dtype=x.dtype)
        eps = hp.get("eps", 1e-6)
        rr = _rms_rel(d)
        r = torch.rsqrt(x2.square().mean(-1, keepdim=True) + eps)
        x_hat = x2 * r
        g = dy2 * gamma
        # y = x̂·γ: r's error, the product with r and the one with γ.
        out = ((rr + 2) * (x_hat * gamma).abs()).reshape(shape)
        # dx = r·(g − x̂·mean(g·x̂)), g = dy·γ. Term r·g: g (1), the subtraction (1), ·r (1 + rr).
        # Term r·x̂·mean(g·x̂): x̂ (rr + 1), g·x̂ (1), the mean (d − 1 additions + 1 division), the
        # product with x̂ (rr + 1 + 1), the subtraction and ·r (rr + 2): 3·rr + d + 6 — on the
        # magnitude r·(|g| + |x̂|·mean|g·x̂|) of the two terms, which cancel (d = 1: completely).
        mag = r * (g.abs() + x_hat.abs() * (g * x_hat).abs().mean(-1, keepdim=True))
        dx = ((3 * rr + d + 6) * mag).reshape(shape)
        # Subnormal x̂ (rows near the fp32 maximum, subnormal rows): half a spacing, then ·γ.
        out_uf = (1 + gamma.abs()).expand(x2.shape).reshape(shape)
        grads: list[Bound] = [(out, out_uf), (dx, 0.0)]
        if params:
            # dγ = Σ_tokens dy·x̂: each term rr + 2, then ≤ tokens − 1 additions (any order).
            grads.append(((tokens + rr + 2) * (dy2 * x_hat).abs().sum(0), 0.0))
        return grads
    if op == "dyt":
        gamma, alpha = params[0], params[1]
        beta = params[2] if len(params) > 2 else torch.zeros(d, dtype=x.dtype)
        a = alpha * x2
        t, sech2 = torch.tanh(a), 1 / torch.cosh(a) ** 2
        # y = γ·tanh(αx) + β: TANH (incl. rounding αx), ·γ, +β; on |γ·t| + |β| (the sum may cancel).
        out = ((TANH + 2) * ((gamma * t).abs() + beta.abs())).reshape(shape)
        # sech² = 4e/(1+e)², e = exp(−2|a|): rounding a (relative 1) is an absolute 2|a| in the
        # exponent; exp; 1 + e, the square, the division (its relative condition in e is ≤ 1).
        sech2_rel = 2 * a.abs() + EXP + 3
        h = dy2 * gamma * sech2
        # dx = dy·γ·sech²·α: + 3 products. Underflow: sech² subnormal for |a| > 44 (4e: 2 spacings).
        dx = ((sech2_rel + 3) * (h * alpha).abs() + REF_SECH2 * (dy2 * gamma * alpha).abs()).reshape(shape)
        dx_uf = (2 * (dy2 * gamma * alpha).abs()).reshape(shape)
        # dγ = Σ_tokens dy·tanh: TANH + 1 per term, tokens − 1 additions.
        d_gamma = (tokens + TANH + 1) * (dy2 * t).abs().sum(0)
        # dα = Σ_tokens Σ_d h·x: each term sech2_rel + 3, then d − 1 and tokens − 1 additions.
        d_alpha = ((sech2_rel + 3 + d + tokens) * (h * x2).abs() + REF_SECH2 * (dy2 * gamma * x2).abs()).sum()
        d_alpha_uf = (2 * (dy2 * gamma * x2).abs()).sum()
        # Subnormal rows: α·x, and its product with γ, may each round in the subnormal range.
        out_uf = (2 * (1 + gamma.abs())).expand(x2.shape).reshape(shape)
        grads = [(out, out_uf), (dx, dx_uf), (d_gamma, 0.0), (d_alpha, d_alpha_uf)]
        if len(params) > 2:
            grads.append((tokens * dy2.abs().sum(0), 0.0))  # dβ = Σ_tokens dy: tokens − 1 additions
        return grads
    if op == "bhyt":
        return _bhyt_bounds(hp, x2, params, dy2, shape)
    raise AssertionError(op)


def _bhyt_bounds(hp: dict, x2: Tensor, params: list[Tensor], dy2: Tensor, shape: torch.Size) -> list[Bound]:
    """γ ⊙ tanh(c·x̂), c = λ/κ, x̂ = x·r, r = 1/sqrt(v + ε), v = mean(x²) or the given variance."""
    tokens, d = x2.shape
    gamma, lam = params[0], params[1]
    kappa, eps = hp.get("kappa", 10.0), hp.get("eps", 1e-6)
    use_variance = len(params) > 2
    if use_variance:
        v = params[2].reshape(-1, 1)
        rr = 1 + RSQRT  # r = rsqrt(v + ε), v given in fp32: the addition and rsqrt
    else:
        v = x2.square().mean(-1, keepdim=True)
        rr = _rms_rel(d)
    c = lam / kappa
    r = torch.rsqrt(v + eps)
    x_hat = x2 * r
    arg = c * x_hat
    t, sech2 = torch.tanh(arg), 1 / torch.cosh(arg) ** 2
    g = dy2 * gamma
    h = g * sech2
    arg_rel = rr + 3  # x·r (1), λ/κ (1), c·x̂ (1), on r's error
    # y = γ·tanh(arg): tanh's relative condition ≤ 1 passes arg's error through; TANH; ·γ.
    out = ((arg_rel + TANH + 1) * (gamma * t).abs()).reshape(shape)
    # h = g·sech²(arg): sech²'s relative condition in arg is 2|arg|·|tanh| ≤ 2|arg| times arg's
    # relative error, + its own EXP + 3, + g and the product. Underflow: sech² subnormal (2 spacings).
    h_rel = 2 * arg.abs() * arg_rel + EXP + 5
    # Subnormal x̂ or c·x̂ (tanh is the identity there): a spacing each, then ·c and ·γ.
    out_uf = (2 * (1 + c.abs()) * (1 + gamma.abs())).expand(x2.shape).reshape(shape)
    grads: list[Bound]
    if use_variance:
        # dx = (h·c)·r: + 2 products and r's error.
        dx = ((h_rel + rr + 2) * (h * c * r).abs() + REF_SECH2 * (g * c * r).abs()).reshape(shape)
        dx_uf = (2 * (g * c * r).abs()).reshape(shape)
        grads = [(out, out_uf), (dx, dx_uf)]
    else:
        # dx = c·r·(h − x̂·mean(h·x̂)): rms_norm's count with h (whose own error is h_rel, at most
        # its row maximum on the mean) in place of g, + c.
        mag = c.abs() * r * (h.abs() + x_hat.abs() * (h * x_hat).abs().mean(-1, keepdim=True))
        h_rel_row = h_rel.amax(-1, keepdim=True)
        mag_uf = 2 * c.abs() * r * (g.abs() + x_hat.abs() * (g * x_hat).abs().mean(-1, keepdim=True))
        dx = ((3 * rr + d + 7 + h_rel_row) * mag + REF_SECH2 * mag_uf).reshape(shape)
        grads = [(out, out_uf), (dx, mag_uf.reshape(shape))]
    # dγ = Σ_tokens dy·tanh(arg): per term arg_rel + TANH + 1, then tokens − 1 additions.
    grads.append(((tokens + arg_rel + TANH + 1) * (dy2 * t).abs().sum(0), 0.0))
    # dλ = Σ_tokens Σ_d h·x̂ / κ: per term h_rel + rr + 2, then d − 1 + tokens − 1 additions, /κ.
    hx = (h * x_hat).abs()
    d_lam = ((h_rel + rr + 3 + d + tokens) * hx + REF_SECH2 * (g * x_hat).abs()).sum() / kappa
    d_lam_uf = (2 * (g * x_hat).abs()).sum() / kappa
    grads.append((d_lam, d_lam_uf))
    if use_variance:
        # dv = −½·c·r·(r·Σ_d h·x̂): per term h_rel + rr + 2, d − 1 additions, then r twice and c.
        d_v = 0.5 * c.abs() * r * r * ((h_rel + 3 * rr + d + 5) * hx + REF_SECH2 * (g * x_hat).abs()).sum(-1, keepdim=True)
        d_v_uf = 0.5 * c.abs() * r * r * (2 * (g * x_hat).abs()).sum(-1, keepdim=True)
        grads.append((d_v.reshape(params[2].shape), d_v_uf.reshape(params[2].shape)))
    return grads


# --------------------------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One op configuration: how to build its inputs, call an implementation, and bound its error."""

    name: str
    op: str  # the function name in steadylm.kernels / steadylm.functional
    # (shape, dtype, generator) -> (activation-like inputs, parameter inputs); both lists of tensors
    make: Callable[[tuple[int, ...], torch.dtype, torch.Generator], tuple[list[Tensor], list[Tensor]]]
    hp: dict[str, Any] = field(default_factory=dict)  # keyword hyper-parameters

    @property
    def is_norm(self) -> bool:
        return self.op in ("rms_norm", "dyt", "bhyt")

    def call(self, impl: Any, acts: list[Tensor], params: list[Tensor]) -> Tensor:
        fn = getattr(impl, self.op)
        if not self.is_norm:
            return fn(*acts, **self.hp)
        x = acts[0]
        if self.op == "rms_norm":
            return fn(x, params[0] if params else None, **self.hp)
        if self.op == "dyt":
            return fn(x, params[0], params[1], *params[2:], **self.hp)
        return fn(x, params[0], params[1], **self.hp, **({"variance": params[2]} if len(params) > 2 else {}))

    def bounds(self, acts: list[Tensor], params: list[Tensor], dy: Tensor, device: str = "cpu") -> list[Bound]:
        """Per result, (bound, underflow) for an implementation on ``device`` (its exp, :data:`EXP_ARG`)."""
        if self.is_norm:
            return _norm_bounds(self.op, self.hp, acts, params, dy)
        return _gated_bounds(self.op, self.hp, acts, params, dy, torch.device(device).type)


def _randn(shape, dtype, gen, scale=1.0):
    return (torch.randn(shape, generator=gen) * scale).to(dtype)


def _gated(shape, dtype, gen):
    return [_randn(shape, dtype, gen, 3.0), _randn(shape, dtype, gen, 2.0)], []


def _norm_params(d, gen, *extra):
    return [1.0 + 0.2 * torch.randn(d, generator=gen)] + [torch.tensor(v) for v in extra]


def _x(s, dt, g):
    return [_randn(s, dt, g, 2.0)]


CASES: list[Case] = [
    Case("swiglu", "swiglu", _gated),
    Case("powlu_glu", "powlu_glu", _gated),
    Case("powlu_glu_m1.5", "powlu_glu", _gated, {"m": 1.5}),
    Case("swiglu_clip_gptoss", "swiglu_clip", _gated, {"limit": 2.5}),
    Case("swiglu_clip_step", "swiglu_clip", _gated, {"limit": 1.5, "variant": "step"}),
    Case("swiglu_clip_clamp", "swiglu_clip", _gated, {"limit": 2.0, "variant": "clamp", "alpha": 1.0}),
    Case("rms_norm", "rms_norm", lambda s, dt, g: (_x(s, dt, g), _norm_params(s[-1], g)), {"eps": 1e-6}),
    Case("rms_norm_no_weight_eps0", "rms_norm", lambda s, dt, g: (_x(s, dt, g), []), {"eps": 0.0}),
    Case("dyt", "dyt", lambda s, dt, g: (_x(s, dt, g), _norm_params(s[-1], g, 0.7))),
    Case("dyt_bias", "dyt",
         lambda s, dt, g: (_x(s, dt, g), _norm_params(s[-1], g, 0.3) + [0.1 * torch.randn(s[-1], generator=g)])),
    # α = 3: |αx| reaches 6…12, where sech² (1e-5…1e-10) is far below tanh's rounding near ±1.
    Case("dyt_saturating", "dyt", lambda s, dt, g: (_x(s, dt, g), _norm_params(s[-1], g, 3.0))),
    Case("bhyt", "bhyt", lambda s, dt, g: (_x(s, dt, g), _norm_params(s[-1], g, 2.0))),
    Case("bhyt_large_lambda", "bhyt", lambda s, dt, g: (_x(s, dt, g), _norm_params(s[-1], g, 25.0)),
         {"kappa": 4.0, "eps": 1e-3}),
    Case("bhyt_variance", "bhyt",
         lambda s, dt, g: (_x(s, dt, g),
                           _norm_params(s[-1], g, 1.0) + [4.0 * torch.rand(s[:-1] + (1,), generator=g) + 0.1])),
]  # fmt: skip
CASE_IDS = [c.name for c in CASES]
CASE_BY_NAME = {c.name: c for c in CASES}


# --------------------------------------------------------------------------------------------
# the check
# --------------------------------------------------------------------------------------------


def run_both(case: Case, acts: list[Tensor], params: list[Tensor], device: str = "cpu", impl: Any = K,
             grad_out_seed: int = 0):  # fmt: skip
    """Forward + backward of ``impl`` (given dtypes, on ``device``) and of the reference (float64,
    CPU) with the same output gradient. Returns ``(results, references, grad_out64)``: the output,
    then every activation gradient, then every parameter gradient."""
    k_acts = [t.to(device, copy=True).requires_grad_(True) for t in acts]
    k_params = [t.to(device, copy=True).requires_grad_(True) for t in params]
    r_acts = [t.detach().double().requires_grad_(True) for t in acts]
    r_params = [t.detach().double().requires_grad_(True) for t in params]
    out_k = case.call(impl, k_acts, k_params)
    out_r = case.call(F, r_acts, r_params)
    gen = torch.Generator().manual_seed(grad_out_seed)
    grad_out = torch.randn(out_r.shape, generator=gen).to(out_k.dtype)
    out_k.backward(grad_out.to(device))
    out_r.backward(grad_out.double())
    got = [out_k.detach()] + [t.grad for t in k_acts] + [t.grad for t in k_params]
    ref = [out_r.detach()] + [t.grad for t in r_acts] + [t.grad for t in r_params]
    return got, ref, grad_out.double()


def result_names(case: Case, n_acts: int, n_params: int) -> list[str]:
    """``forward``, ``backward d(input i)``, ``backward d(param i)``: the labels of the results."""
    return (["forward"] + [f"backward d(input {i})" for i in range(n_acts)]
            + [f"backward d(param {i})" for i in range(n_params)])  # fmt: skip


def check_case(case: Case, acts: list[Tensor], params: list[Tensor], dtype: torch.dtype, device: str = "cpu",
               out_ulps: float = OUT_ULPS, impl: Any = K) -> None:  # fmt: skip
    """The kernel on ``device`` against the float64 CPU reference: the output and every gradient,
    each element within ``out_ulps`` ulp of its dtype + the case's bound. Raises AssertionError
    naming the case, the result (``forward`` / ``backward d(…)``) and the dtype."""
    got, ref, dy64 = run_both(case, acts, params, device, impl)
    assert got[0].dtype == acts[0].dtype
    acts64 = [t.double() for t in acts]
    params64 = [t.double() for t in params]
    bounds = case.bounds(acts64, params64, dy64, device)
    names = result_names(case, len(acts), len(params))
    assert len(bounds) == len(got) == len(names)
    for i, (k, r, (bound, underflow), name) in enumerate(zip(got, ref, bounds, names)):
        assert k is not None, f"{case.name}: no {name}"
        expected_dtype = acts[0].dtype if i <= len(acts) else params[i - 1 - len(acts)].dtype
        assert k.dtype == expected_dtype and k.shape == r.shape, f"{case.name} {name}: {k.dtype} {tuple(k.shape)}"
        assert_within(k, r, f"{case.name} {name} [{str(dtype).replace('torch.', '')}]", ulps=out_ulps,
                      bound=bound, underflow=underflow)  # fmt: skip


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_forward_and_every_gradient_match_float64_reference(case, dtype, shape, device, eager_kernels):
    gen = torch.Generator().manual_seed(hash((case.name, str(dtype), shape)) % 2**31)
    acts, params = case.make(shape, dtype, gen)
    check_case(case, acts, params, dtype, device)


def small_rows(case: Case, dtype: torch.dtype, gen: torch.Generator):
    """Norm rows with mean(x²) ≈ ε (x ~ 1e-3): where ε's place in the formula shows."""
    acts, params = case.make((5, 48), dtype, gen)
    acts = [(acts[0].float() * 1e-3).to(dtype)]
    if case.name == "bhyt_variance":
        params[2] = acts[0].double().square().mean(-1, keepdim=True).float()
    return acts, params


def extreme_inputs(case: Case, dtype: torch.dtype, gen: torch.Generator):
    """Rows of ±1e4, exact zeros, bf16-max magnitudes, Σx² beyond fp32 with finite squares (±3e18),
    subnormals, x ~ 1e-3, mixed with ordinary values; for the activations every pair of
    ±1e4, 0, ±bf16-max, ±subnormal, ±1, 7, 2.5, −1.28 (silu's minimum) gates and (clamped) ups."""
    d = 64
    ordinary = torch.randn(8, d, generator=gen)
    subnormal = torch.finfo(torch.float32).tiny / 64  # 2^-132: subnormal in fp32 and in bf16
    if case.is_norm:
        rows = torch.stack(
            [
                torch.where(torch.rand(d, generator=gen) < 0.5, -1e4, 1e4),
                torch.zeros(d),
                torch.full((d,), BF16_MAX) * torch.sign(ordinary[0]),
                ordinary[1] * (BF16_MAX / 8),
                ordinary[2] * subnormal,
                torch.cat([torch.zeros(d // 2), ordinary[3, : d // 2]]),
                torch.sign(ordinary[4]) * 3e18,  # squares finite, Σx² = 5.8e38 > fp32 max
                ordinary[5] * 1e-3,  # mean(x²) ≈ ε
            ]
        )
        acts, params = case.make((rows.shape[0], d), dtype, gen)
        acts = [rows.to(dtype)]
        if case.name == "bhyt_variance":
            params[2] = rows.to(dtype).double().square().mean(-1, keepdim=True).float().clamp_max(3e38)
        return acts, params
    values = torch.tensor([1e4, -1e4, 0.0, BF16_MAX, -BF16_MAX, subnormal, -subnormal, 1.0, -1.0, 7.0, 2.5, -1.28])
    gate = values.repeat_interleave(len(values))
    up = values.repeat(len(values)).clamp(-1.0, 1.0)  # |up| ≤ 1 keeps f(gate)·up inside the range
    return [gate.to(dtype), up.to(dtype)], []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_extreme_values(case, dtype, device, eager_kernels):
    if case.name == "rms_norm_no_weight_eps0":
        pytest.skip("ε = 0 with an all-zero row is 0/0 by definition; covered by test_eps0_tiny_rows")
    gen = torch.Generator().manual_seed(7)
    check_case(case, *extreme_inputs(case, dtype, gen), dtype, device)
    if case.is_norm:
        check_case(case, *small_rows(case, dtype, gen), dtype, device)


def test_eps0_tiny_rows_normalise_exactly(eager_kernels):
    # Σx² of subnormal rows underflows to 0 in fp32; the kernel rescales such rows by 2^90. Output
    # bound: rms_norm's (r's error + 2 roundings), BHyT's (+ c, the tanh, no γ).
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(3)) * 1e-40
    for case in (CASE_BY_NAME["rms_norm_no_weight_eps0"], Case("bhyt_eps0", "bhyt", _gated, {"eps": 0.0})):
        params = [] if case.op == "rms_norm" else [torch.ones(64), torch.tensor(5.0)]
        out = case.call(K, [x], params)
        ref = case.call(F, [x.double()], [p.double() for p in params])
        bound, _ = case.bounds([x.double()], [p.double() for p in params], torch.zeros_like(ref))[0]
        assert_within(out, ref, f"{case.name} eps=0 subnormal rows", ulps=OUT_ULPS, bound=bound)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("m", [3.0, 1.5, 9.5])
def test_powlu_gate_gradient_sign_and_value_for_huge_gates(m, compiled, device):
    """d(gate) for gates 1 … 1e30 against the float64 reference, in sign and in value.

    f_m'(z) < 0 for large z (f decays to 1), but ``1 − σ(z)`` is exactly 0 in fp32 and the old
    ``p'·ln z + 1 − σ`` rounded the small negative term away, leaving a positive gradient from
    z ≈ 1e6 on. Two output-gradient scales: 1 (f'(1e30) ≈ −1e-43 is then an fp32 *subnormal*: the
    ulp of the result is the subnormal spacing) and 1e20 (every result a normal number). Bound:
    PowLU's d(gate) bound (see _powlu_bounds).
    """
    previous = K.compile_enabled()
    K.set_compile(compiled)
    try:
        check_powlu_huge_gates(m, device, torch.float32)
        check_powlu_huge_gates(m, device, torch.bfloat16)
    finally:
        K.set_compile(previous)


def check_powlu_huge_gates(m: float, device: str, dtype: torch.dtype) -> None:
    """PowLU's d(gate) for gates 1 … 1e30 (in ``dtype``) against float64, sign and value."""
    gate = torch.logspace(0, 30, 121, dtype=torch.float32).to(dtype)
    up = torch.linspace(0.5, 2.0, 121).to(dtype)
    for dy_scale in (1.0, 1e20):
        dy = torch.full_like(gate, dy_scale)
        g = gate.to(device, copy=True).requires_grad_(True)
        K.powlu_glu(g, up.to(device), m=m).backward(dy.to(device))
        g64 = gate.double().requires_grad_(True)
        F.powlu_glu(g64, up.double(), m=m).backward(dy.double())
        ref = g64.grad
        got = g.grad.cpu().double()
        # CUDA kernels may flush subnormal results to zero (FTZ): there a 0 is allowed for a
        # reference below the smallest normal fp32 number, and only there.
        flushed = (got == 0) & (ref.abs() < torch.finfo(torch.float32).tiny) & (device == "cuda")
        what = f"powlu d(gate) m={m} dy={dy_scale:g} [{str(dtype).replace('torch.', '')}]"
        # (The sign is checked where the reference does not round to 0 in ``dtype``: bf16's
        # smallest subnormal is 2^-133, above f'(1e30) at dy = 1.)
        signed = ~flushed & (ref.to(dtype) != 0)
        assert torch.equal(torch.sign(got)[signed], torch.sign(ref)[signed]), f"{what}: wrong sign"
        bound, underflow = _powlu_bounds(m, gate.double(), up.double(), dy.double())[1]
        assert_within(torch.where(flushed, ref, got).to(dtype), ref, what, ulps=OUT_ULPS, bound=bound,
                      underflow=underflow)  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_float64_gradcheck(case, eager_kernels):
    # float64 inputs keep float64 math in the kernels, so gradcheck verifies the hand-derived backward.
    gen = torch.Generator().manual_seed(11)
    acts, params = case.make((2, 3, 5), torch.float64, gen)
    acts = [a.double().requires_grad_(True) for a in acts]
    params = [p.double().requires_grad_(True) for p in params]
    n = len(acts)
    assert torch.autograd.gradcheck(
        lambda *ts: case.call(K, list(ts[:n]), list(ts[n:])), (*acts, *params), eps=1e-6, atol=1e-7
    )


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_only_inputs_are_saved_for_backward(case, eager_kernels):
    gen = torch.Generator().manual_seed(5)
    acts, params = case.make((4, 32), torch.float32, gen)
    inputs = [t.requires_grad_(True) for t in acts + params]
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        case.call(K, inputs[: len(acts)], inputs[len(acts) :])
    input_storages = {t.untyped_storage().data_ptr() for t in inputs}
    for t in saved:
        assert t.numel() <= 1 or t.untyped_storage().data_ptr() in input_storages, (
            f"{case.name} saved a tensor of shape {tuple(t.shape)} that is not an input"
        )
    big_saved = sum(t.numel() for t in saved if t.numel() > 1)
    assert big_saved <= sum(t.numel() for t in inputs)


def test_scalar_params_as_floats_and_frozen(eager_kernels):
    x = torch.randn(3, 16, requires_grad=True)
    w = torch.ones(16)
    for case, alpha_or_lam in ((CASE_BY_NAME["dyt"], 0.5), (CASE_BY_NAME["bhyt"], 2.0)):
        out = getattr(K, case.op)(x, w, alpha_or_lam)
        params64 = [w.double(), torch.tensor(alpha_or_lam, dtype=torch.float64)]
        ref = case.call(F, [x.detach().double()], params64)
        bound, _ = case.bounds([x.detach().double()], params64, torch.zeros_like(ref))[0]
        assert_within(out, ref, f"{case.name} with a float scalar parameter", ulps=OUT_ULPS, bound=bound)
    lam = torch.tensor(2.0)  # does not require grad: backward must not produce one
    K.bhyt(x, w, lam).sum().backward()
    assert lam.grad is None and x.grad is not None


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda x: K.powlu_glu(x, x, m=10.0), "m must satisfy"),
        (lambda x: K.powlu_glu(x, x, m=0.0), "m must satisfy"),
        (lambda x: K.swiglu_clip(x, x, limit=0.0), "limit must be > 0"),
        (lambda x: K.swiglu_clip(x, x, variant="relu"), "variant must be one of"),
        (lambda x: K.swiglu_clip(x, x, alpha=-1.0), "alpha must be > 0"),
        (lambda x: K.rms_norm(x, None, eps=-1.0), "eps must be >= 0"),
        (lambda x: K.bhyt(x, None, 1.0, kappa=0.0), "kappa must be > 0"),
        (lambda x: K.bhyt(x, None, 1.0, variance=torch.ones(3, 4)), "variance must have shape"),
        (lambda x: K.rms_norm(x, torch.ones(5)), "weight must have shape"),
        (lambda x: K.swiglu(x, x[:, :2]), "same shape"),
        (lambda x: K.dyt(x, None, torch.ones(2)), "alpha must be a scalar"),
    ],
)
def test_invalid_arguments_raise_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call(torch.randn(3, 4))


def test_same_names_and_signatures_as_functional():
    import inspect

    for name in ("swiglu", "powlu_glu", "swiglu_clip", "rms_norm", "dyt", "bhyt"):
        k_sig = inspect.signature(getattr(K, name))
        r_sig = inspect.signature(getattr(F, name))
        assert [(p.name, p.default) for p in k_sig.parameters.values()] == [
            (p.name, p.default) for p in r_sig.parameters.values()
        ], name


def test_triton_backwards_keep_the_math_kernels_signatures():
    """The Triton backwards are drop-ins for the ``_math`` kernels of the same name: the library's
    norm ops call either with the arguments it reads off the ``_math`` signature."""
    import inspect

    from steadylm.kernels import _math, triton_norms

    for name in ("rms_norm_bwd", "bhyt_bwd"):
        assert inspect.signature(getattr(triton_norms, name)) == inspect.signature(getattr(_math, name)), name


# --------------------------------------------------------------------------------------------
# compiled kernels (one small shape per op, so each op compiles once forward + once backward)
# --------------------------------------------------------------------------------------------

# Every op also runs compiled (fp32) inside test_fused_ops_inside_a_compiled_module_fullgraph; these
# add the standalone compiled kernels on the extreme-value inputs, where generated code could differ
# (vectorised transcendental functions, fast-math flags). All cases: the slow test below.
COMPILED_FP32 = ["powlu_glu", "rms_norm"]
COMPILED_SLOW = [("bhyt", torch.float32), ("bhyt_variance", torch.float32), ("dyt_bias", torch.float32),
                 ("powlu_glu", torch.bfloat16), ("bhyt", torch.bfloat16)]  # fmt: skip


@pytest.mark.parametrize("name", COMPILED_FP32)
def test_compiled_kernels_match_reference_fp32_with_extremes(name, device):
    assert K.compile_enabled()
    case = CASE_BY_NAME[name]
    check_case(case, *extreme_inputs(case, torch.float32, torch.Generator().manual_seed(13)), torch.float32, device)


def test_compiled_kernels_match_reference_bf16_with_extremes(device):
    case = CASE_BY_NAME["rms_norm"]
    check_case(case, *extreme_inputs(case, torch.bfloat16, torch.Generator().manual_seed(17)), torch.bfloat16, device)


@pytest.mark.slow
@pytest.mark.parametrize("name, dtype", COMPILED_SLOW, ids=lambda v: str(v).replace("torch.", ""))
def test_compiled_kernels_more_extremes(name, dtype):
    case = CASE_BY_NAME[name]
    check_case(case, *extreme_inputs(case, dtype, torch.Generator().manual_seed(23)), dtype)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_compiled_kernels_every_case_and_shape(case, dtype, device):
    for shape in SHAPES:
        gen = torch.Generator().manual_seed(19)
        check_case(case, *case.make(shape, dtype, gen), dtype, device)


def test_new_token_counts_do_not_recompile():
    from torch._dynamo.utils import counters

    d = 64  # the hidden size of the extreme-value tests above: their kernels are reused
    w = torch.ones(d, requires_grad=True)  # same specialisation (γ needs a gradient) as above
    K.rms_norm(torch.randn(5, d, requires_grad=True), w).sum().backward()  # compiles or reuses
    K.rms_norm(torch.randn(2, 9, d, requires_grad=True), w).sum().backward()
    before = counters["stats"]["unique_graphs"]
    for tokens in (3, 17, 64, 100):
        K.rms_norm(torch.randn(tokens, d, requires_grad=True), w).sum().backward()
    assert counters["stats"]["unique_graphs"] == before


class _TinyBlock(torch.nn.Module):
    """Every fused op inside one module, to be compiled as a whole."""

    def __init__(self, impl: Any, d: int = 24) -> None:
        super().__init__()
        self.impl = impl
        self.w_norm = torch.nn.Parameter(1.0 + 0.1 * torch.randn(d))
        self.alpha = torch.nn.Parameter(torch.tensor(0.6))
        self.lam = torch.nn.Parameter(torch.tensor(2.0))
        self.proj = torch.nn.Linear(d, 2 * d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x.float().square().mean(-1, keepdim=True)
        h = self.impl.rms_norm(x, self.w_norm) + self.impl.dyt(x, self.w_norm, self.alpha)
        h = h + self.impl.bhyt(x, self.w_norm, self.lam) + self.impl.bhyt(x, None, self.lam, variance=v)
        gate, up = self.proj(h).chunk(2, dim=-1)
        act = self.impl.powlu_glu(gate, up) + self.impl.swiglu(gate, up) + self.impl.swiglu_clip(gate, up)
        return act.square().mean()


def test_fused_ops_inside_a_compiled_module_fullgraph(device):
    torch.manual_seed(0)
    fused_block = _TinyBlock(K).to(device)
    ref_block = _TinyBlock(F).to(device)
    ref_block.load_state_dict(fused_block.state_dict())
    compiled = torch.compile(fused_block, fullgraph=True)  # fullgraph: any graph break fails the test
    x = torch.randn(2, 5, 24, device=device)
    x_k, x_r = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    loss_k = compiled(x_k)
    loss_r = ref_block(x_r)
    loss_k.backward()
    loss_r.backward()
    torch.testing.assert_close(loss_k, loss_r, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x_k.grad, x_r.grad, rtol=1e-4, atol=1e-6)
    for (name, p_k), p_r in zip(fused_block.named_parameters(), ref_block.parameters()):
        torch.testing.assert_close(p_k.grad, p_r.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_fast_tanh_and_sech2_accuracy_over_the_fp32_range():
    from steadylm.kernels import _math

    a = torch.cat([torch.linspace(-20, 20, 400_001), torch.logspace(-30, 1.5, 20_001)])
    a = torch.cat([a, -a, torch.tensor([0.0, float("inf"), -float("inf")])]).float()
    exact = torch.tanh(a.double())
    t = _math._tanh(a).double()
    # 3.6e-7 measured (~3 ulp): the [13/6] rational form; 5e-7 leaves rounding slack, not more.
    assert ((t - exact).abs() <= 5e-7 * exact.abs()).all()
    assert torch.equal(_math._tanh(-a), -_math._tanh(a))  # exactly odd
    sech2 = _math._sech2(a).double()
    exact_sech2 = 1.0 / torch.cosh(a.double()) ** 2
    finite = exact_sech2 > 1e-37  # below this the fp32 result is subnormal or zero
    assert ((sech2 - exact_sech2).abs()[finite] <= 1e-6 * exact_sech2[finite]).all()


def _triton_out_ulps(device: str, dtype: torch.dtype) -> float:
    """The final-cast allowance of the Triton kernels' results.

    GPUs round fp32 → bf16 to nearest: half an ulp. Triton's CPU interpreter (3.7) casts by
    truncating the mantissa (``triton/runtime/interpreter.py``: ``cast_impl`` → ``_convert_float``
    without a rounding mode; ``fp_downcast_rounding="rtne"`` changes nothing there), i.e. toward
    zero: less than one ulp, never more — so one ulp for bf16 results on CPU, and the results are
    also checked to lie on the zero side of the float64 reference's fp32 value
    (:func:`_assert_truncated_toward_zero`).
    """
    return 1.0 if device == "cpu" and dtype == torch.bfloat16 else OUT_ULPS


#: Rows of extreme_inputs() for norms whose inputs and results stay in bf16's normal range: ±1e4,
#: zeros, half zeros, ±3e18 (Σx² beyond fp32), x ~ 1e-3. The bf16-max rows have subnormal input
#: gradients (r·g ≈ 3e-39) and the subnormal row subnormal inputs.
NORMAL_RANGE_ROWS = [0, 1, 5, 6, 7]


def _interpreter_inputs(case: Case, acts: list[Tensor], params: list[Tensor], device: str, dtype: torch.dtype):
    """The extreme inputs a bf16 check can use on ``device``.

    Triton 3.7's CPU interpreter converts *subnormal* values between fp32 and bf16 wrongly, in
    both directions (``_convert_float`` normalises a subnormal significand and then drops the
    shift back: bf16 1e-39 loads as 4.4e-39, fp32 3e-40 stores as −7.4e-39), so under the
    interpreter bf16 runs on the rows whose values stay normal (:data:`NORMAL_RANGE_ROWS`); the
    CUDA variant checks every row. fp32 needs no conversion and runs on all rows.
    """
    if not (device == "cpu" and dtype == torch.bfloat16):
        return acts, params
    rows = torch.tensor(NORMAL_RANGE_ROWS)
    acts = [acts[0][rows]]
    if case.name == "bhyt_variance":
        params = params[:2] + [params[2][rows]]
    return acts, params


def _assert_truncated_toward_zero(got: Tensor, ref: Tensor, bound: Tensor, what: str) -> None:
    """bf16 from the interpreter: |got| ≤ |ref| + the fp32 error bound (truncation never rounds up)."""
    from _tolerance import U32

    g, r = got.detach().cpu().double(), ref.detach().double()
    finite = torch.isfinite(r)
    assert bool((g.abs()[finite] <= r.abs()[finite] + U32 * bound[finite]).all()), f"{what}: rounded away from zero"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("has_weight", [True, False], ids=["weight", "no_weight"])
def test_triton_rms_norm_backward_matches_float64_reference(has_weight, dtype, device, triton_on_cpu):
    """The one-pass Triton backward (dx and γ's gradient together) against the float64 reference,
    ordinary and extreme rows. Runs on CUDA, and on CPU through Triton's interpreter. Bounds: the
    rms_norm bounds of the other kernel tests (same math, same fp32 roundings), with the final-cast
    allowance of :func:`_triton_out_ulps`."""
    from steadylm.kernels import triton_norms

    if not triton_on_cpu and device == "cpu":
        pytest.skip("triton is not installed, or TRITON_INTERPRET=1 was not set before it was imported")
    eps = 1e-6
    assert triton_norms.usable(torch.empty(1, 1, dtype=dtype, device=device), eps)
    case = CASE_BY_NAME["rms_norm"]
    gen = torch.Generator().manual_seed(29)
    extreme = _interpreter_inputs(case, *extreme_inputs(case, dtype, gen), device, dtype)
    for acts, params in (case.make((37, 96), dtype, gen), extreme):
        x, w = acts[0], (params[0] if has_weight else None)
        dy = torch.randn(x.shape, generator=gen).to(dtype)
        weight = (w if w is not None else torch.ones(x.shape[-1])).to(device)
        dx, dw = triton_norms.rms_norm_bwd(
            x.to(device), weight, dy.to(device), eps=eps, has_weight=has_weight,
            allow_upscale=False, need_weight_grad=has_weight,
        )  # fmt: skip
        x64 = x.double().requires_grad_(True)
        w64 = w.double().requires_grad_(True) if w is not None else None
        F.rms_norm(x64, w64, eps=eps).backward(dy.double())
        params64 = [w.double()] if w is not None else []
        bounds = _norm_bounds("rms_norm", {"eps": eps}, [x.double()], params64, dy.double())
        ulps = _triton_out_ulps(device, dtype)
        assert_within(dx, x64.grad, f"triton dx [{dtype}]", ulps=ulps, bound=bounds[1][0])
        if ulps > OUT_ULPS:
            _assert_truncated_toward_zero(dx, x64.grad, bounds[1][0], "triton dx")
        if w is not None:
            assert_within(dw, w64.grad, "triton dγ", ulps=OUT_ULPS, bound=bounds[2][0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["rms_norm", "bhyt", "bhyt_large_lambda", "bhyt_variance"])
def test_triton_backward_through_the_public_ops(name, dtype, device, eager_kernels, triton_on_cpu, monkeypatch):
    """The ops' autograd with the Triton backward against the float64 reference, forward and every
    gradient (γ, λ, the given variance), ordinary and extreme rows; a spy checks that the Triton
    kernel really ran. Same bounds as the other kernel tests (final cast: _triton_out_ulps)."""
    from steadylm.kernels import triton_norms

    if not triton_on_cpu and device == "cpu":
        pytest.skip("triton is not installed, or TRITON_INTERPRET=1 was not set before it was imported")
    assert triton_norms.usable(torch.empty(1, 1, dtype=dtype, device=device), 1e-6)
    calls = {"n": 0}
    kernel = triton_norms.rms_norm_bwd if name == "rms_norm" else triton_norms.bhyt_bwd

    def spy(*args, **kwargs):
        calls["n"] += 1
        return kernel(*args, **kwargs)

    monkeypatch.setattr(triton_norms, kernel.__name__, spy)
    case = CASE_BY_NAME[name]
    gen = torch.Generator().manual_seed(31)
    ulps = _triton_out_ulps(device, dtype)
    check_case(case, *case.make((3, 7, 257), dtype, gen), dtype, device, out_ulps=ulps)
    check_case(case, *_interpreter_inputs(case, *extreme_inputs(case, dtype, gen), device, dtype), dtype, device,
               out_ulps=ulps)  # fmt: skip
    assert calls["n"] == 2


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_mean_square_matches_float64_reference(dtype, compiled, device):
    """kernels.mean_square (BHyT's shared statistic, one pass) against the float64 reference,
    forward and backward, ordinary and extreme rows (±1e4, zeros, bf16-max, subnormals, Σx² beyond
    fp32 with finite squares). The output is fp32 for both input dtypes; a true mean square beyond
    the fp32 range must be inf (tests/_tolerance.py)."""
    previous = K.compile_enabled()
    K.set_compile(compiled)
    try:
        check_mean_square(dtype, device, torch.Generator().manual_seed(37))
    finally:
        K.set_compile(previous)


def check_mean_square(dtype: torch.dtype, device: str, gen: torch.Generator, impl: Any = K,
                      which: tuple[str, ...] = ("ordinary", "extreme")) -> None:  # fmt: skip
    """``impl.mean_square`` forward and backward against float64 (raises AssertionError)."""
    case = CASE_BY_NAME["rms_norm"]
    makers = {"ordinary": lambda: case.make((9, 64), dtype, gen), "extreme": lambda: extreme_inputs(case, dtype, gen)}
    for x in (makers[w]()[0][0] for w in which):
        d = x.shape[-1]
        xk = x.to(device, copy=True).requires_grad_(True)
        out = impl.mean_square(xk)
        x64 = x.double().requires_grad_(True)
        ref = F.mean_square(x64)
        assert out.dtype == torch.float32 and out.shape == ref.shape
        # Σ(x·S)²: d squares and d − 1 additions, then /d; the power-of-two rescaling back is exact
        # (a subnormal result: one rounding, inside the half ulp).
        assert_within(out, ref, f"mean_square forward [{dtype}]", ulps=OUT_ULPS, bound=(d + 1) * ref.detach().abs())
        dv = torch.rand(ref.shape, generator=gen)
        out.backward(dv.to(device))
        ref.backward(dv.double())
        # dx = dv·(2/d)·x: the constant 2/d in fp32 and two products.
        assert_within(xk.grad, x64.grad, f"mean_square backward [{dtype}]", ulps=OUT_ULPS,
                      bound=3 * x64.grad.abs())  # fmt: skip


# --------------------------------------------------------------------------------------------
# the BHyT block: first site + statistic in one op, and the second site's statistic
# --------------------------------------------------------------------------------------------


def check_bhyt_and_mean_square(dtype: torch.dtype, device: str, gen: torch.Generator, impl: Any = K,
                               which: tuple[str, ...] = ("ordinary", "extreme", "small")) -> None:  # fmt: skip
    """``bhyt_and_mean_square`` (output and v from one kernel; one backward carrying the gradient
    that reaches v from elsewhere) against ``F.mean_square`` + ``F.bhyt(variance=v)`` in float64,
    ordinary, extreme and small rows; the loss is Σ out·dy + Σ v·dv, so dx carries both."""
    case = CASE_BY_NAME["bhyt"]
    kappa, eps = 10.0, 1e-6
    makers = {"ordinary": lambda: case.make((6, 40), dtype, gen), "extreme": lambda: extreme_inputs(case, dtype, gen),
              "small": lambda: small_rows(case, dtype, gen)}  # fmt: skip
    for acts, params in (makers[w]() for w in which):
        x, gamma, lam = acts[0], params[0], params[1]
        leaves = [t.to(device, copy=True).requires_grad_(True) for t in (x, gamma, lam)]
        out, v = impl.bhyt_and_mean_square(*leaves, kappa=kappa, eps=eps)
        leaves64 = [t.detach().double().requires_grad_(True) for t in (x, gamma, lam)]
        v64 = F.mean_square(leaves64[0])
        # The block's statistic is fp32 by definition (SPEC §2: v in fp32, the op's output): the
        # site uses v rounded to fp32 — inf for rows whose mean square exceeds fp32 (output 0) —
        # with the gradient passing the rounding unchanged.
        v_fp32 = v64 + (v64.detach().float().double() - v64.detach())
        out64 = F.bhyt(leaves64[0], leaves64[1], leaves64[2], kappa=kappa, eps=eps, variance=v_fp32)
        dy = torch.randn(out64.shape, generator=gen).to(dtype).double()
        dv = torch.randn(v64.shape, generator=gen).double()
        ((out * dy.to(device, out.dtype)).sum() + (v * dv.to(device, v.dtype)).sum()).backward()
        ((out64 * dy).sum() + (v64 * dv).sum()).backward()
        # out: BHyT with the statistic computed (R = _rms_rel(d), as for BHyT*); v: mean_square's.
        x64, gamma64, lam64 = (t.detach() for t in leaves64)
        b = _bhyt_bounds({"kappa": kappa, "eps": eps}, x64, [gamma64, lam64], dy, x64.shape)
        d = x.shape[-1]
        tag = f"[{str(dtype).replace('torch.', '')}]"
        assert_within(out, out64, f"bhyt_and_mean_square forward {tag}", ulps=OUT_ULPS, bound=b[0][0],
                      underflow=b[0][1])  # fmt: skip
        assert_within(v, v64, f"bhyt_and_mean_square forward v {tag}", ulps=OUT_ULPS,
                      bound=(d + 1) * v64.detach().abs())  # fmt: skip
        # dx = c·r·h + dv_total·2x/d, dv_total = dv − ½·c·r²·Σ h·x̂ (kernels._math.bhyt_ms_bwd): BHyT's
        # count for the first term (r's error 3 times, h's, the row sum) on the magnitude of all
        # terms, which cancel: c·r·|h| + (2|x|/d)·(|dv| + ½·c·r²·Σ|h·x̂|).
        c = (lam64 / kappa).abs()
        v_true = x64.square().mean(-1, keepdim=True)
        r = torch.rsqrt(v_true + eps)
        x_hat = x64 * r
        arg = c * x_hat
        h = dy * gamma64 / torch.cosh(arg) ** 2
        rr = _rms_rel(d)
        h_rel = (2 * arg.abs() * (rr + 3) + EXP + 5).amax(-1, keepdim=True)
        mag = c * r * h.abs() + (2 * x64.abs() / d) * (dv.abs() + 0.5 * c * r * r * (h * x_hat).abs().sum(-1, keepdim=True))
        assert_within(leaves[0].grad, leaves64[0].grad, f"bhyt_and_mean_square backward d(input 0) {tag}",
                      ulps=OUT_ULPS, bound=(3 * rr + d + 10 + h_rel) * mag, underflow=b[1][1])  # fmt: skip
        assert_within(leaves[1].grad, leaves64[1].grad, f"bhyt_and_mean_square backward d(param 0) {tag}",
                      ulps=OUT_ULPS, bound=b[2][0])  # fmt: skip
        assert_within(leaves[2].grad, leaves64[2].grad, f"bhyt_and_mean_square backward d(param 1) {tag}",
                      ulps=OUT_ULPS, bound=b[3][0], underflow=b[3][1])  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_bhyt_and_mean_square_matches_float64_reference(dtype, device, eager_kernels):
    check_bhyt_and_mean_square(dtype, device, torch.Generator().manual_seed(41))


def test_reference_bhyt_and_mean_square_passes_the_same_check_on_ordinary_fp32_rows():
    # functional.bhyt_and_mean_square is what reference-impl BHyT blocks run (mean_square, then
    # bhyt with variance=v), mirroring the fused op's name and signature. Ordinary fp32 rows only:
    # unfused, subnormal outputs lose bits in v's rounding and bf16 dx is the sum of two rounded
    # gradients (measured: outside the fused bounds there) — the fused op's reason to exist.
    check_bhyt_and_mean_square(torch.float32, "cpu", torch.Generator().manual_seed(41), impl=F, which=("ordinary",))


class _BHyTLayer(torch.nn.Module, BHyTPair):
    """The smallest layer with the BHyT block form: value and output projections, two sites."""

    def __init__(self, d: int = 16, heads: int = 4, kv_heads: int = 2, context: int = 32) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(43)
        head_dim = d // heads
        self.w_v = torch.nn.Parameter(0.3 * torch.randn(kv_heads * head_dim, d, generator=gen))
        self.w_o = torch.nn.Parameter(0.3 * torch.randn(d, heads * head_dim, generator=gen))
        self.heads, self.kv_heads = heads, kv_heads
        self.init_bhyt_pair(d, lam_attn=2.0, lam_ffn=1.0, kappa=10.0, eps=1e-6, impl="fused", context_length=context)

    def bhyt_projections(self) -> tuple[Tensor, Tensor, int, int]:
        return self.w_v, self.w_o, self.heads, self.kv_heads


def check_bhyt_second_site(dtype: torch.dtype) -> None:
    """The FFN site's statistic v' = v + c_ℓ·λ₁²/κ² (SPEC §2 step 3) of a BHyT block layer against
    the SPEC formula in float64 (c_ℓ = ‖W_O·W_V‖²/(T·d), value heads repeated for GQA)."""
    layer = _BHyTLayer()
    with torch.no_grad():
        layer.bhyt_sites[0].lam.fill_(2.5)  # λ₁ ≠ λ₁²: the shift depends on which is used
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(47)).to(dtype)

    def statistic(x: Tensor) -> Tensor:
        _, v = layer.bhyt_attn_input(x)
        return v + layer.variance_shift()

    with torch.no_grad():
        got = statistic(x)
    w_v, w_o = layer.w_v.detach().double(), layer.w_o.detach().double()
    d, head_dim = 16, 4
    w_v_rep = w_v.reshape(2, head_dim, d).repeat_interleave(2, dim=0).reshape(-1, d)
    c = (w_o @ w_v_rep).square().sum() / (32 * d)
    lam1, kappa = 2.5, 10.0
    shift = c * lam1**2 / kappa**2
    v64 = x.double().square().mean(-1, keepdim=True)
    expected = v64 + shift
    # v: mean_square's d + 1; c_ℓ in fp32: the d×d product (d − 1 additions + 1 per entry), the
    # squares and their d² − 1 additions, the division (d + d² + 2); ·λ², /κ²: 4; the final sum: 1.
    bound = (d + 2) * v64 + (d + d * d + 7) * shift
    assert_within(got, expected, f"BHyT second-site variance [{str(dtype).replace('torch.', '')}]",
                  ulps=OUT_ULPS, bound=bound)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_bhyt_second_site_statistic_matches_spec(dtype, eager_kernels):
    check_bhyt_second_site(dtype)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the compiled Triton kernels are tested instead")
def test_triton_interpreter_is_on_wherever_triton_is_installed(triton_on_cpu):
    """The Triton tests above skip when the interpreter is off; where triton is installed (the dev
    extra) that would be a set-up bug — TRITON_INTERPRET set after Triton was imported, as once
    happened when tests/conftest.py imported steadylm.kernels first — so it fails here instead."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (it is in the dev extra)")
    assert triton_on_cpu, "triton is installed but its interpreter is off: TRITON_INTERPRET came too late"
