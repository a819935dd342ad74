"""``steadylm.functional`` against the independent float64 references of ``test_functional_reference``.

Every op, forward and backward (inputs and every parameter), for fp32 and bf16 inputs (and bf16
activations with fp32 parameters, the mixed-precision case the nn modules hit), on odd shapes and on
extreme values; gradcheck in float64; the SPEC §1 facts about f_m and powlu; BHyT ≈ (λ/κ)·RMSNorm in
the linear regime; c_ℓ; every documented ValueError. Tolerances: ``TOLERANCES`` in the reference
module, each with its reason.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
from torch import Tensor

from steadylm import functional
from test_functional_reference import (
    BF16_MAX,
    F64,
    TOLERANCES,
    min_powlu_slope,
    ref_bhyt,
    ref_bhyt_variance_correction,
    ref_dyt,
    ref_layer_norm,
    ref_powlu,
    ref_powlu_gate,
    ref_powlu_gate_derivative,
    ref_powlu_glu,
    ref_rms_norm,
    ref_swiglu,
    ref_swiglu_clip,
    reference_outputs,
    run_and_compare,
)

FP32, BF16 = torch.float32, torch.bfloat16
SHAPES = [(1, 1, 1), (3, 7, 257), (2, 1024, 65)]  # (2, 1024, ·): 2048 tokens summed into every parameter gradient


# ----------------------------------------------------------------------------------------------
# The op table
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpCase:
    """One op configuration: how to call it, its reference, and how to draw its inputs."""

    id: str
    op: str  # attribute of steadylm.functional (and of steadylm.kernels for the fused ones)
    ref: Callable[..., Tensor]
    kind: str  # "gated" (gate, up), "pointwise" (x) or "norm" (x + parameters)
    kwargs: dict = field(default_factory=dict)
    params: tuple[str, ...] = ()  # norm parameters, broadcast over tokens
    gate_scale: float = 3.0
    up_scale: float = 2.0
    kinks: tuple[str, ...] = ()  # clip boundaries to keep inputs away from (either side is right)
    variant: bool = False  # a second hyper-parameter setting of an op: tested on the mid shape only


CLIP_L = 7.0
ACTIVATION_CASES = [
    OpCase("swiglu", "swiglu", ref_swiglu, "gated"),
    OpCase("powlu_glu", "powlu_glu", ref_powlu_glu, "gated"),
    OpCase("powlu_glu_m0.7", "powlu_glu", ref_powlu_glu, "gated", {"m": 0.7}, variant=True),
    OpCase("powlu_glu_m9.5", "powlu_glu", ref_powlu_glu, "gated", {"m": 9.5}, variant=True),
    OpCase("powlu_gate", "powlu_gate", ref_powlu_gate, "pointwise", {"m": 3.0}, gate_scale=6.0),
    OpCase("powlu", "powlu", ref_powlu, "pointwise", {"m": 3.0}, gate_scale=6.0),
    OpCase("clip_gptoss", "swiglu_clip", ref_swiglu_clip, "gated", {"limit": CLIP_L, "variant": "gptoss", "alpha": 1.702},
           gate_scale=5.0, up_scale=5.0, kinks=("gate", "up")),
    OpCase("clip_step", "swiglu_clip", ref_swiglu_clip, "gated", {"limit": CLIP_L, "variant": "step"},
           gate_scale=5.0, up_scale=5.0, kinks=("silu", "up")),
    OpCase("clip_clamp_L3", "swiglu_clip", ref_swiglu_clip, "gated", {"limit": 3.0, "variant": "clamp"},
           gate_scale=5.0, up_scale=5.0, kinks=("gate", "up")),
]
NORM_CASES = [
    OpCase("rms_norm", "rms_norm", ref_rms_norm, "norm", {"eps": 1e-6}, ("weight",)),
    OpCase("layer_norm", "layer_norm", ref_layer_norm, "norm", {"eps": 1e-5}, ("weight", "bias")),
    OpCase("dyt", "dyt", ref_dyt, "norm", {}, ("weight", "alpha")),
    OpCase("dyt_bias", "dyt", ref_dyt, "norm", {}, ("weight", "alpha", "bias")),
    OpCase("bhyt", "bhyt", ref_bhyt, "norm", {"kappa": 10.0, "eps": 1e-6}, ("weight", "lam")),
    OpCase("bhyt_kappa4", "bhyt", ref_bhyt, "norm", {"kappa": 4.0, "eps": 1e-6}, ("weight", "lam"), variant=True),
    OpCase("bhyt_variance", "bhyt", ref_bhyt, "norm", {"kappa": 10.0, "eps": 1e-6}, ("weight", "lam", "variance")),
]
ALL_CASES = ACTIVATION_CASES + NORM_CASES

# (input dtype, parameter dtype): bf16 activations with fp32 parameters is what a module sees under
# mixed precision, so the norms are tested that way too.
ACTIVATION_DTYPES = [(FP32, FP32), (BF16, BF16)]
NORM_DTYPES = [(FP32, FP32), (BF16, BF16), (BF16, FP32)]


def _away_from_kinks(case: OpCase, gate: Tensor, up: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Move inputs that sit within 1e-3 of a clip boundary: there the two one-sided derivatives
    differ and fp32 rounding may pick the other (equally valid) side than the float64 reference."""
    limit = case.kwargs.get("limit", CLIP_L)
    g64, u64 = gate.to(F64), up.to(F64)
    near = torch.zeros_like(g64, dtype=torch.bool)
    if "gate" in case.kinks:
        near |= (g64 - limit).abs() < 1e-3
    if "silu" in case.kinks:
        near |= (g64 * torch.sigmoid(g64) - limit).abs() < 1e-3
    if "up" in case.kinks:
        near_up = (u64.abs() - limit).abs() < 1e-3
        up = torch.where(near_up, torch.full_like(up, 0.5), up)
    return torch.where(near, torch.full_like(gate, 0.5), gate).to(dtype), up.to(dtype)


def make_inputs(
    case: OpCase, shape: tuple[int, ...], dtype: torch.dtype, param_dtype: torch.dtype, seed: int = 0
) -> tuple[dict[str, Tensor], Tensor]:
    """Random inputs (already rounded to ``dtype``), all requiring grad, and a ``grad_out``."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*size: int) -> Tensor:
        return torch.randn(*size, generator=gen, dtype=F64)

    if case.kind in ("gated", "pointwise"):
        gate = (randn(*shape) * case.gate_scale).to(dtype)
        up = (randn(*shape) * case.up_scale).to(dtype)
        if case.kinks:
            gate, up = _away_from_kinks(case, gate, up, dtype)
        tensors = {"gate": gate, "up": up} if case.kind == "gated" else {"x": gate}
    else:
        d = shape[-1]
        x = (randn(*shape) * 2.0 + 0.5).to(dtype)
        tensors = {"x": x, "weight": (1.0 + 0.2 * randn(d)).to(param_dtype)}
        if "bias" in case.params:
            tensors["bias"] = (0.1 * randn(d)).to(param_dtype)
        if "alpha" in case.params:
            tensors["alpha"] = torch.tensor(0.8, dtype=param_dtype)
        if "lam" in case.params:
            tensors["lam"] = torch.tensor(2.0, dtype=param_dtype)
        if "variance" in case.params:
            # The block hands over an fp32 mean square that differs from mean(x²) (v' ≠ v).
            v_dtype = F64 if dtype == F64 else FP32
            ms = x.to(v_dtype).square().mean(-1, keepdim=True)
            tensors["variance"] = ms * (0.5 + torch.rand(ms.shape, generator=gen, dtype=F64)).to(v_dtype)
    for t in tensors.values():
        t.requires_grad_(True)
    out_shape = shape
    grad_out = torch.randn(*out_shape, generator=gen, dtype=F64).to(dtype)
    return tensors, grad_out


def check_op(case: OpCase, tensors: dict[str, Tensor], grad_out: Tensor, what: str, module=functional) -> Tensor:
    impl = getattr(module, case.op)
    return run_and_compare(
        impl, case.ref, tensors, grad_out, broadcast=case.params, what=what,
        impl_kwargs=case.kwargs, ref_kwargs=case.kwargs,
    )


def _dtype_id(pair: tuple[torch.dtype, torch.dtype]) -> str:
    x, p = (str(t).removeprefix("torch.").replace("bfloat16", "bf16").replace("float", "fp") for t in pair)
    return x if x == p else f"{x}-params_{p}"


# ----------------------------------------------------------------------------------------------
# forward + backward vs float64, odd shapes
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case,dtypes,shape",
    [
        pytest.param(case, dt, shape, id=f"{case.id}-{_dtype_id(dt)}-{'x'.join(map(str, shape))}")
        for case in ALL_CASES
        for dt in (ACTIVATION_DTYPES if case.kind != "norm" else NORM_DTYPES)
        for shape in ([SHAPES[1]] if case.variant else SHAPES)  # variants: mid shape (time budget)
    ],
)
def test_matches_float64_reference(case: OpCase, dtypes, shape) -> None:
    dtype, param_dtype = dtypes
    tensors, grad_out = make_inputs(case, shape, dtype, param_dtype)
    check_op(case, tensors, grad_out, f"{case.id} {shape}")


# ----------------------------------------------------------------------------------------------
# extreme values: ±1e4, exact 0, bf16 max, subnormals
# ----------------------------------------------------------------------------------------------

SUBNORMALS = [1e-40, -1e-40, 3e-39, 1.5e-39]  # subnormal in fp32 and bf16 (bf16 min normal 1.2e-38)
# (12.9, where f_m' = 0, is deliberately absent: a cancellation point, covered by the random tests.)
EXTREME_GATES = [0.0, 1e4, -1e4, BF16_MAX, -BF16_MAX, 1e-30, -1e-30, 1.0, -2.0, 150.0, *SUBNORMALS]
EXTREME_UPS = [0.0, 1e4, -1e4, 0.75, -1.0, 1e-40, -3e-39, BF16_MAX]


def _extreme_activation_inputs(case: OpCase, dtype: torch.dtype) -> tuple[dict[str, Tensor], Tensor]:
    """All (gate, up) pairs whose true output and gradients are representable, one per row.

    One element per row makes the tolerance purely relative to each element's own value."""
    pairs = [(g, u) for g in EXTREME_GATES for u in EXTREME_UPS]
    if case.kind == "pointwise":
        pairs = [(g, 0.0) for g in EXTREME_GATES]
    gate = torch.tensor([p[0] for p in pairs], dtype=F64).to(dtype).reshape(-1, 1)
    up = torch.tensor([p[1] for p in pairs], dtype=F64).to(dtype).reshape(-1, 1)
    tensors = {"gate": gate, "up": up} if case.kind == "gated" else {"x": gate}
    for t in tensors.values():
        t.requires_grad_(True)
    grad_out = torch.ones_like(gate)
    ref = reference_outputs(case.ref, tensors, grad_out.to(F64), **case.kwargs)
    representable = ref.out.abs() < 1e38
    for g in ref.grads.values():
        representable &= g.abs() < 1e38
    if case.kind == "gated":
        # fp32 math cannot hold a factor below the fp32 normal range (f_m'(1e-30) ≈ 1e-60, a
        # subnormal up): a product of such a factor with a huge one (f_m'(1e-40) ≈ 1e20, up ≈ 3e38)
        # is exact in float64 but underflows in fp32 if the tiny partial product is formed first, as
        # autograd's chain rule does. Such pairs ask for more than "fp32 math"; they are left out.
        unit_up = {"gate": gate, "up": torch.ones_like(up).requires_grad_(True)}
        unit = reference_outputs(case.ref, unit_up, grad_out.to(F64), **case.kwargs)
        fp32_tiny, floor = torch.finfo(FP32).tiny, TOLERANCES[dtype].floor
        up64 = up.to(F64)

        def underflows(t: Tensor) -> Tensor:
            return (t != 0) & (t.abs() < fp32_tiny)

        for act_factor in (unit.out, unit.grads["gate"]):
            lost = (underflows(act_factor) | underflows(up64)) & ((act_factor * up64).abs() > floor)
            representable &= ~lost
    keep = representable.reshape(-1)
    assert keep.sum() >= 0.45 * keep.numel(), f"only {int(keep.sum())}/{keep.numel()} extreme pairs kept"
    kept = {k: v.detach()[keep].requires_grad_(True) for k, v in tensors.items()}
    return kept, grad_out[keep]


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", ACTIVATION_CASES, ids=lambda c: c.id)
def test_activation_extreme_values(case: OpCase, dtype: torch.dtype) -> None:
    tensors, grad_out = _extreme_activation_inputs(case, dtype)
    check_op(case, tensors, grad_out, f"{case.id} extremes")


def _extreme_norm_rows(d: int, dtype: torch.dtype) -> Tensor:
    gen = torch.Generator().manual_seed(3)
    rows = torch.randn(9, d, generator=gen, dtype=F64)
    rows[0, :3] = torch.tensor([BF16_MAX, -BF16_MAX, BF16_MAX], dtype=F64)  # squares overflow fp32
    rows[1] = BF16_MAX  # constant huge row: zero variance, x − μ = 0
    rows[2] = 0.0  # exact zeros: the ε-only denominator
    rows[3] = torch.tensor(SUBNORMALS * (d // len(SUBNORMALS) + 1), dtype=F64)[:d]  # all subnormal
    rows[4, ::2] = 1e4  # ±1e4 next to O(1) values
    rows[4, 1::4] = -1e4
    rows[5] = 0.0
    rows[5, d // 2] = 1e4  # a single spike
    rows[6] *= 1e-30  # tiny but normal
    rows[7, 0], rows[7, 1:5] = BF16_MAX, 1e-40  # huge next to subnormal
    rows[8] = 1.0  # constant O(1) row
    return rows.to(dtype)


@pytest.mark.parametrize("dtypes", NORM_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("case", NORM_CASES, ids=lambda c: c.id)
def test_norm_extreme_values(case: OpCase, dtypes) -> None:
    dtype, param_dtype = dtypes
    tensors, _ = make_inputs(case, (9, 16), dtype, param_dtype, seed=5)
    x = _extreme_norm_rows(16, dtype)
    if "variance" in case.params:
        # An fp32 mean square cannot hold the statistic of rows whose square overflows fp32.
        x = x[2:7]
        ms = x.float().square().mean(-1, keepdim=True)
        tensors["variance"] = ms.detach().requires_grad_(True)
    tensors["x"] = x.requires_grad_(True)
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(6), dtype=F64).to(dtype)
    out = check_op(case, tensors, grad_out, f"{case.id} extremes")
    assert torch.isfinite(out).all()


def test_rms_of_huge_rows_is_the_rms_not_inf() -> None:
    """bf16 max squared overflows fp32: the row must be rescaled; here rms = |x|, so the output is ±1."""
    x = torch.tensor([[BF16_MAX, -BF16_MAX]], dtype=BF16)
    torch.testing.assert_close(functional.rms_norm(x, None).float(), torch.tensor([[1.0, -1.0]]))
    ms = functional.mean_square(x)
    assert ms.dtype == FP32 and ms.shape == (1, 1)
    assert math.isinf(ms.item())  # true mean square 1.15e77 exceeds fp32: overflow is the right answer
    ms_ok = functional.mean_square(torch.tensor([[1e19, -1e19, 0.0, 0.0]]))
    # The rescaled row has s = 2^64 and s² = 2^128 overflows fp32, but the mean square 5e37 does not.
    assert ms_ok.item() == pytest.approx(5e37, rel=1e-6)


# ----------------------------------------------------------------------------------------------
# mean_square (the BHyT block statistic)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=["fp32", "bf16"])
def test_mean_square_matches_reference(dtype: torch.dtype) -> None:
    x = torch.randn(3, 7, 257, generator=torch.Generator().manual_seed(2), dtype=F64).to(dtype)
    x[0, 0, :4] = torch.tensor([1e4, -1e4, 0.0, 1e-40])
    leaf = x.clone().requires_grad_(True)
    ms = functional.mean_square(leaf)
    assert ms.dtype == FP32 and ms.shape == (3, 7, 1)
    ms.sum().backward()
    x64 = x.to(F64)
    torch.testing.assert_close(ms.to(F64), x64.square().mean(-1, keepdim=True), rtol=3e-6, atol=0)
    # d mean(x²)/dx = 2x/d, rounded once to the input dtype.
    rtol = 2.0**-8 if dtype == BF16 else 3e-6
    torch.testing.assert_close(leaf.grad.to(F64), 2 * x64 / 257, rtol=rtol, atol=2.0**-133)


# ----------------------------------------------------------------------------------------------
# gradcheck in float64
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ALL_CASES, ids=lambda c: c.id)
def test_gradcheck_float64(case: OpCase) -> None:
    tensors, _ = make_inputs(case, (2, 3, 5), F64, F64, seed=11)
    if case.kind != "norm":
        # Finite differences need a smooth neighbourhood: keep off the kink of f_m at 0.
        tensors = {k: torch.where(v.abs() < 0.05, v + 0.2, v).detach().requires_grad_(True) for k, v in tensors.items()}
    names = list(tensors)
    fn = getattr(functional, case.op)

    def call(*args: Tensor) -> Tensor:
        out = fn(**dict(zip(names, args)), **case.kwargs)
        assert out.dtype == F64
        return out

    assert torch.autograd.gradcheck(call, tuple(tensors.values()), eps=1e-6, atol=1e-8, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# SPEC §1 facts about f_m and powlu (m = 3 unless stated)
# ----------------------------------------------------------------------------------------------


def _gate64(z: Tensor | float, m: float = 3.0) -> Tensor:
    return functional.powlu_gate(torch.as_tensor(z, dtype=F64), m)


def test_gate_at_4_equals_silu_at_m3() -> None:
    """p = 3/(√4 + 1) = 1, so f(4) = 4·σ(4) = silu(4)."""
    silu4 = 4.0 / (1.0 + math.exp(-4.0))
    assert _gate64(4.0).item() == pytest.approx(silu4, rel=1e-15)
    # fp32: exp(1·ln 4) is within an ulp or two of 4; bf16: one final rounding.
    assert functional.powlu_gate(torch.tensor(4.0), 3.0).item() == pytest.approx(silu4, rel=3e-7)
    assert functional.powlu_gate(torch.tensor(4.0, dtype=BF16), 3.0).item() == pytest.approx(silu4, rel=2**-8)


def test_gate_maximum_and_decay_to_one() -> None:
    z = torch.linspace(0.01, 200.0, 200_000, dtype=F64)
    f = _gate64(z)
    i = int(f.argmax())
    assert f[i].item() == pytest.approx(5.32, abs=0.005)
    assert z[i].item() == pytest.approx(12.9, abs=0.05)
    tail = _gate64(torch.logspace(math.log10(13.0), 12, 2000, dtype=F64))
    assert (tail.diff() < 0).all(), "f decreases after its maximum"
    assert (tail > 1).all() and tail[-1].item() == pytest.approx(1.0, abs=1e-4), "f decays to 1 from above"


def test_gate_one_sided_derivatives_at_zero() -> None:
    z = torch.tensor([-1e-9, 0.0, 1e-9], dtype=F64, requires_grad=True)
    (grad,) = torch.autograd.grad(functional.powlu_gate(z, 3.0).sum(), z)
    assert grad[0].item() == pytest.approx(0.5, abs=1e-8)  # f'(0⁻) = silu'(0) = 1/2
    assert grad[1].item() == 0.5  # z = 0 belongs to the silu branch (SPEC: z ≤ 0)
    assert abs(grad[2].item()) < 1e-8  # f'(0⁺) = 0
    # The same one-sided limits from the SPEC's closed form (independent of autograd).
    closed = ref_powlu_gate_derivative(torch.tensor([-1e-12, 1e-12], dtype=F64), 3.0)
    assert closed[0].item() == pytest.approx(0.5, abs=1e-9) and abs(closed[1].item()) < 1e-9


def test_gate_gradient_matches_spec_closed_form() -> None:
    z = torch.cat([-torch.logspace(-8, 3, 300, dtype=F64), torch.logspace(-30, 5, 600, dtype=F64)])
    for m in (0.5, 3.0, 9.9):
        leaf = z.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(functional.powlu_gate(leaf, m).sum(), leaf)
        torch.testing.assert_close(grad, ref_powlu_gate_derivative(z, m), rtol=1e-9, atol=1e-14)


def test_scalar_powlu_is_c1_at_zero_with_zero_slope() -> None:
    x = torch.tensor([-1e-6, 0.0, 1e-6], dtype=F64, requires_grad=True)
    y = functional.powlu(x, 3.0)
    (grad,) = torch.autograd.grad(y.sum(), x)
    assert y[1].item() == 0.0 and grad[1].item() == 0.0
    assert abs(grad[0].item()) < 1e-5 and abs(grad[2].item()) < 1e-5  # both one-sided slopes → 0


@pytest.mark.parametrize("m", [0.1, 1.0, 3.0, 6.0, 9.0, 9.99])
def test_scalar_powlu_monotone_on_positive_axis_for_valid_m(m: float) -> None:
    x = torch.logspace(-3, math.log10(2000.0), 20_001, dtype=F64, requires_grad=True)
    (slope,) = torch.autograd.grad(functional.powlu(x, m).sum(), x)
    assert (slope > 0).all(), f"m={m}: slope min {slope.min().item()} at x={x[slope.argmin()].item()}"
    # and the implementation's slope is the SPEC closed form f + x·f'
    ref_slope = ref_powlu_gate(x.detach(), m) + x.detach() * ref_powlu_gate_derivative(x.detach(), m)
    torch.testing.assert_close(slope, ref_slope, rtol=1e-9, atol=1e-15)


def test_scalar_powlu_not_monotone_beyond_m_10() -> None:
    """functional rejects m ≥ 10, so the m = 10.5 facts are checked on the float64 formula itself."""
    slope, where = min_powlu_slope(10.5)
    assert slope < 0 and 50 < where < 300, (slope, where)
    # The SPEC's threshold: first non-monotone at m ≈ 10.02, near x ≈ 120 (bisection on the min slope).
    lo, hi = 9.9, 10.5
    for _ in range(12):  # 0.6 / 2^12 < 2e-4
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if min_powlu_slope(mid)[0] < 0 else (mid, hi)
    assert hi == pytest.approx(10.02, abs=0.01)
    assert min_powlu_slope(hi)[1] == pytest.approx(120.0, rel=0.15)
    assert min_powlu_slope(9.99)[0] > 0


def test_scalar_powlu_over_x_tends_to_one() -> None:
    x = torch.tensor([1e3, 1e6, 1e12], dtype=F64)
    ratio = functional.powlu(x, 3.0) / x
    assert (ratio > 1).all() and (ratio.diff() < 0).all()
    assert ratio[-1].item() == pytest.approx(1.0, abs=1e-4)


# ----------------------------------------------------------------------------------------------
# BHyT: linear regime, the variance argument
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lam", [0.5, 0.05, 1e-3])
def test_bhyt_is_lambda_over_kappa_rmsnorm_in_linear_regime(lam: float) -> None:
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(4, 64, 257, generator=gen, dtype=F64).float()
    w = (1 + 0.1 * torch.randn(257, generator=gen, dtype=F64)).float()
    kappa = 10.0
    b = functional.bhyt(x, w, torch.tensor(lam), kappa).double()
    linear = (lam / kappa) * functional.rms_norm(x, w, 1e-6).double()
    # tanh(a) = a − a³/3 + …: the gap is at most |a|³/3 (times |γ|) plus fp32 rounding.
    arg = (lam / kappa) * functional.rms_norm(x, None, 1e-6).double()
    bound = arg.abs() ** 3 / 3 * w.double().abs() + 3e-5 * linear.abs() + 1e-12
    assert ((b - linear).abs() <= bound).all()
    rel_gap = ((b - linear).abs().max() / linear.abs().max()).item()
    assert rel_gap <= (3.0 * 4.5 * lam / kappa) ** 2 / 3 + 1e-6  # |x̂| < 4.5 on these rows


def test_bhyt_variance_equal_to_mean_square_equals_exact_form() -> None:
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(8))
    w, lam = torch.rand(64) + 0.5, torch.tensor(1.7)
    exact = functional.bhyt(x, w, lam)
    handed = functional.bhyt(x, w, lam, variance=functional.mean_square(x))
    torch.testing.assert_close(handed, exact, rtol=3e-6, atol=1e-7)


def test_bhyt_variance_gradient_reaches_the_block_input() -> None:
    """In the block v = mean(x²) carries gradient into x (SPEC §2 step 1, 'like RMSNorm')."""
    x = torch.randn(2, 3, 32, dtype=F64, generator=torch.Generator().manual_seed(9), requires_grad=True)
    w, lam = torch.ones(32, dtype=F64), torch.tensor(2.0, dtype=F64)
    via_variance = torch.autograd.grad(functional.bhyt(x, w, lam, variance=functional.mean_square(x)).sum(), x)[0]
    exact = torch.autograd.grad(functional.bhyt(x, w, lam).sum(), x)[0]
    torch.testing.assert_close(via_variance, exact, rtol=1e-12, atol=1e-14)


def test_bhyt_rejects_variance_of_wrong_shape() -> None:
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="variance"):
        functional.bhyt(x, None, torch.tensor(1.0), variance=torch.ones(2, 3))


# ----------------------------------------------------------------------------------------------
# c_ℓ
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_heads,n_kv", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("dtype", [FP32, BF16, F64], ids=["fp32", "bf16", "fp64"])
def test_variance_correction_matches_reference(n_heads: int, n_kv: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(n_heads * 10 + n_kv)
    d, hd, T = 24, 4, 128
    w_v = (torch.randn(n_kv * hd, d, generator=gen, dtype=F64) * 0.2).to(dtype)
    w_o = (torch.randn(d, n_heads * hd, generator=gen, dtype=F64) * 0.2).to(dtype)
    c = functional.bhyt_variance_correction(w_v, w_o, n_heads, n_kv, T)
    assert c.dim() == 0 and not c.requires_grad
    assert c.dtype == (F64 if dtype == F64 else FP32)
    assert c.item() == pytest.approx(ref_bhyt_variance_correction(w_v, w_o, n_heads, n_kv, T), rel=1e-5)


def test_variance_correction_uses_interleaved_gqa_heads() -> None:
    """Query head h reads KV head h // (n_heads/n_kv) (Llama repeat_kv); a tiled order differs."""
    d, hd, n_heads, n_kv = 8, 2, 4, 2
    w_v = torch.zeros(n_kv * hd, d)
    w_v[:hd, :hd] = torch.eye(hd)  # only KV head 0 is non-zero
    w_o = torch.zeros(d, n_heads * hd)
    w_o[:hd, hd : 2 * hd] = torch.eye(hd)  # only query head 1 is read out
    # Interleaved: head 1 reads KV head 0 → non-zero map; tiled (h % n_kv) would read KV head 1 → 0.
    assert functional.bhyt_variance_correction(w_v, w_o, n_heads, n_kv, 1).item() == pytest.approx(hd / d)


def test_variance_correction_is_the_attention_output_variance_under_uniform_attention() -> None:
    """The meaning of c_ℓ: with unit-variance, independent tokens and uniform attention over T
    tokens, mean(attn_out²) = ‖W_O W_V‖_F²/(T·d)."""
    gen = torch.Generator().manual_seed(12)
    d, hd, n_heads, n_kv, T = 16, 4, 4, 2, 32
    w_v = torch.randn(n_kv * hd, d, generator=gen, dtype=F64) * 0.3
    w_o = torch.randn(d, n_heads * hd, generator=gen, dtype=F64) * 0.3
    tokens = torch.randn(20_000, T, d, generator=gen, dtype=F64)
    values = (tokens @ w_v.T).reshape(20_000, T, n_kv, hd).repeat_interleave(n_heads // n_kv, dim=2)
    attn_out = values.mean(dim=1).reshape(20_000, n_heads * hd) @ w_o.T  # uniform attention
    c = functional.bhyt_variance_correction(w_v, w_o, n_heads, n_kv, T).item()
    assert attn_out.square().mean().item() == pytest.approx(c, rel=0.03)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"n_heads": 6, "n_kv_heads": 4}, "n_kv_heads"),
        ({"n_heads": 0, "n_kv_heads": 0}, "n_heads"),
        ({"seq_len": 0}, "seq_len"),
    ],
)
def test_variance_correction_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    args = {"w_v": torch.randn(8, 8), "w_o": torch.randn(8, 8), "n_heads": 4, "n_kv_heads": 4, "seq_len": 16}
    with pytest.raises(ValueError, match=match):
        functional.bhyt_variance_correction(**{**args, **kwargs})


# ----------------------------------------------------------------------------------------------
# ValueErrors naming the parameter and its allowed range
# ----------------------------------------------------------------------------------------------

_g, _u = torch.randn(3, 4), torch.randn(3, 4)
_w, _b = torch.ones(4), torch.zeros(4)
BAD_HYPERPARAMETERS = [
    # (id, call, parameter name, words of the allowed range that the message must contain)
    *[(f"powlu_gate-m={m}", lambda m=m: functional.powlu_gate(_g, m), "m", ("0", "10")) for m in (0.0, -1.0, 10.0, 10.5, math.nan, math.inf)],
    *[(f"powlu_glu-m={m}", lambda m=m: functional.powlu_glu(_g, _u, m), "m", ("0", "10")) for m in (0.0, 10.0)],
    *[(f"powlu-m={m}", lambda m=m: functional.powlu(_g, m), "m", ("0", "10")) for m in (-0.5, 12.0)],
    *[(f"clip-limit={lim}-{v}", lambda lim=lim, v=v: functional.swiglu_clip(_g, _u, limit=lim, variant=v), "limit", ("0",))
      for lim in (0.0, -7.0) for v in ("gptoss", "step", "clamp")],
    ("clip-limit=nan", lambda: functional.swiglu_clip(_g, _u, limit=math.nan), "limit", ()),
    ("clip-variant", lambda: functional.swiglu_clip(_g, _u, variant="relu"), "variant", ("gptoss", "step", "clamp")),
    *[(f"bhyt-kappa={k}", lambda k=k: functional.bhyt(_g, _w, torch.tensor(1.0), kappa=k), "kappa", ("0",)) for k in (0.0, -10.0)],
    ("rms_norm-eps", lambda: functional.rms_norm(_g, _w, eps=-1e-6), "eps", ("0",)),
    ("layer_norm-eps", lambda: functional.layer_norm(_g, _w, _b, eps=-1e-5), "eps", ("0",)),
    ("bhyt-eps", lambda: functional.bhyt(_g, _w, torch.tensor(1.0), eps=-1e-6), "eps", ("0",)),
]


@pytest.mark.parametrize("call,name,range_words", [pytest.param(*c[1:], id=c[0]) for c in BAD_HYPERPARAMETERS])
def test_invalid_hyperparameter_raises_value_error(call, name: str, range_words: tuple[str, ...]) -> None:
    with pytest.raises(ValueError) as info:
        call()
    message = str(info.value)
    assert re.search(rf"\b{name}\b", message), f"parameter {name!r} not named in: {message}"
    for word in range_words:
        assert word in message, f"range {word!r} missing from: {message}"


def test_boundary_hyperparameters_are_accepted() -> None:
    """Values at the edge of each allowed range run, and give what the formula says there."""
    for m in (9.999, 1e-3):
        out = functional.powlu_gate(_g, m)
        assert out.shape == _g.shape and torch.isfinite(out).all(), m
    # eps = 0: plain x / rms(x) · w (no row of _g is all zero)
    expected = _g / _g.pow(2).mean(-1, keepdim=True).sqrt() * _w
    torch.testing.assert_close(functional.rms_norm(_g, _w, eps=0.0), expected)
    clipped = functional.swiglu_clip(_g, _u, limit=1e-3, variant="step")
    # min(silu(g), L) lies in [min silu = −0.27846…, L] and clamp(u) in [−L, L]
    assert torch.isfinite(clipped).all() and clipped.abs().max() <= 0.2785 * 1e-3
