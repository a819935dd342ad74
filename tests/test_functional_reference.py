"""Float64 references for every op, written directly from SPEC.md §1–§2, and tests of the references.

Nothing here imports ``steadylm``: these formulas are the independent yardstick the tests of
``steadylm.functional`` and ``steadylm.nn`` compare against. The module also holds the comparison
harness (:func:`reference_outputs`, :func:`assert_matches_reference`) and the per-dtype tolerances
with their reasons, so that every test file judges results the same way.

The tests at the bottom check the references themselves — against the SPEC's closed-form
derivative, finite differences, and explicit per-head loops — so that a wrong reference cannot
silently bless a wrong implementation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
import pytest
import torch
from torch import Tensor

F64 = torch.float64
BF16_MAX = torch.finfo(torch.bfloat16).max  # ≈ 3.39e38; its square overflows fp32

# ----------------------------------------------------------------------------------------------
# SPEC §1 activations, float64
# ----------------------------------------------------------------------------------------------


def ref_silu(z: Tensor) -> Tensor:
    return z * torch.sigmoid(z)


def ref_powlu_gate(x: Tensor, m: float) -> Tensor:
    """f_m(z) = z^(m/(√z+1))·σ(z) for z > 0, silu(z) for z ≤ 0 (differentiable: safe base)."""
    positive = x > 0
    base = torch.where(positive, x, torch.ones_like(x))
    exponent = m / (torch.sqrt(base) + 1.0)
    return torch.where(positive, torch.exp(exponent * torch.log(base)) * torch.sigmoid(x), ref_silu(x))


def ref_powlu_gate_derivative(z: Tensor, m: float) -> Tensor:
    """SPEC §1 closed form: f'(z) = z^p·s·(p' ln z + p/z + 1 − s) for z > 0, s(1 + z(1 − s)) for z ≤ 0.

    Written in the product form z^p·(p/z) = p·z^(p−1) so that float64 never forms p/z for tiny z.
    """
    s = torch.sigmoid(z)
    positive = z > 0
    base = torch.where(positive, z, torch.ones_like(z))
    r = torch.sqrt(base)
    p = m / (r + 1.0)
    dp = -m / (2.0 * r * (r + 1.0) ** 2)
    log_z = torch.log(base)
    z_p = torch.exp(p * log_z)
    positive_branch = s * (z_p * (dp * log_z + 1.0 - s) + p * torch.exp((p - 1.0) * log_z))
    return torch.where(positive, positive_branch, s * (1.0 + z * (1.0 - s)))


def ref_swiglu(gate: Tensor, up: Tensor) -> Tensor:
    return ref_silu(gate) * up


def ref_powlu_glu(gate: Tensor, up: Tensor, m: float = 3.0) -> Tensor:
    return ref_powlu_gate(gate, m) * up


def ref_powlu(x: Tensor, m: float = 3.0) -> Tensor:
    return x * ref_powlu_gate(x, m)


def ref_swiglu_clip(
    gate: Tensor, up: Tensor, limit: float = 7.0, variant: str = "gptoss", alpha: float = 1.702
) -> Tensor:
    u = up.clamp(-limit, limit)
    if variant == "gptoss":
        g = gate.clamp(max=limit)
        return g * torch.sigmoid(alpha * g) * (u + 1.0)
    if variant == "step":
        return ref_silu(gate).clamp(max=limit) * u
    if variant == "clamp":
        return ref_silu(gate.clamp(max=limit)) * u
    raise AssertionError(f"no reference for variant {variant!r}")


# ----------------------------------------------------------------------------------------------
# SPEC §2 norms, float64 (float64 holds the square of any fp32/bf16 value, so no rescaling)
# ----------------------------------------------------------------------------------------------

_DETACH_STATISTICS = False  # set by reference_outputs to split d/dx into its two terms


def _statistic(t: Tensor) -> Tensor:
    """A per-token statistic; detached when measuring the 'direct' part of d/dx (see Tolerance)."""
    return t.detach() if _DETACH_STATISTICS else t



def ref_rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    return weight * x / _statistic(torch.sqrt((x * x).mean(-1, keepdim=True) + eps))


def ref_layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    centred = x - _statistic(x.mean(-1, keepdim=True))
    return weight * centred / _statistic(torch.sqrt((centred * centred).mean(-1, keepdim=True) + eps)) + bias


def ref_dyt(x: Tensor, weight: Tensor, alpha: Tensor, bias: Tensor | None = None) -> Tensor:
    out = weight * torch.tanh(alpha * x)
    return out if bias is None else out + bias


def ref_bhyt(
    x: Tensor,
    weight: Tensor,
    lam: Tensor,
    kappa: float = 10.0,
    eps: float = 1e-6,
    variance: Tensor | None = None,
) -> Tensor:
    v = _statistic((x * x).mean(-1, keepdim=True)) if variance is None else variance
    r = 1.0 / (kappa * torch.sqrt(v + eps))
    return weight * torch.tanh(lam * r * x)


def ref_bhyt_variance_correction(
    w_v: Tensor, w_o: Tensor, n_heads: int, n_kv_heads: int, seq_len: int
) -> float:
    """c = ‖W_O·R·W_V‖_F² / (T·d), composed head by head: query head h reads KV head h // group."""
    d = w_v.shape[1]
    head_dim = w_v.shape[0] // n_kv_heads
    group = n_heads // n_kv_heads
    composed = torch.zeros(d, d, dtype=F64)
    for h in range(n_heads):
        kv = h // group
        w_o_h = w_o[:, h * head_dim : (h + 1) * head_dim].to(F64)
        w_v_h = w_v[kv * head_dim : (kv + 1) * head_dim, :].to(F64)
        composed += w_o_h @ w_v_h
    return float((composed**2).sum()) / (seq_len * d)


# ----------------------------------------------------------------------------------------------
# Plain-float scalar PowLU for the SPEC §1 facts (any m, including m ≥ 10 that functional rejects)
# ----------------------------------------------------------------------------------------------


def scalar_powlu_derivative(x: np.ndarray, m: float) -> np.ndarray:
    """d/dx [x·f_m(x)] = f_m(x) + x·f_m'(x) for x > 0, in float64 numpy (closed form from SPEC §1)."""
    x = np.asarray(x, dtype=np.float64)
    s = 1.0 / (1.0 + np.exp(-x))
    r = np.sqrt(x)
    p = m / (r + 1.0)
    dp = -m / (2.0 * r * (r + 1.0) ** 2)
    z_p = np.exp(p * np.log(x))
    f = z_p * s
    df = z_p * s * (dp * np.log(x) + p / x + 1.0 - s)
    return f + x * df


def min_powlu_slope(m: float, x_max: float = 2000.0) -> tuple[float, float]:
    """(min over x in (0, x_max] of d powlu/dx, the x where it is reached), on a fine log grid."""
    x = np.geomspace(1e-3, x_max, 400_001)
    slope = scalar_powlu_derivative(x, m)
    i = int(np.argmin(slope))
    return float(slope[i]), float(x[i])


# ----------------------------------------------------------------------------------------------
# Tolerances
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tolerance:
    """``|actual − ref| ≤ rtol·|ref| + internal·scale + floor`` elementwise.

    ``scale`` is the size of the terms the implementation combined to get that element, because
    fp32 error is relative to those terms, not to a result they cancel down to:

    * outputs and input gradients: the row's largest reference value (reductions and cancellations
      such as x − μ or silu'(g) near g ≈ −1.28 err relative to the row);
    * for norms, d/dx is a direct term γ·go·r plus a term through the per-token statistic that
      nearly cancels it in small rows (d = 1: the sum is ε/(x²+ε)^{3/2}): the scale is the row max
      of each of the two terms;
    * gradients of broadcast parameters (γ, β, α, λ, variance) are sums over many tokens whose
      terms cancel: the scale is the sum of the |per-element contributions|.
    """

    rtol: float
    internal: float
    floor: float
    why: str


# fp32 math: exp(p·ln z) turns the ~1 ulp error of ln z and p into a relative error of |p ln z|
# ulps, and |p ln z| reaches ~87 before f underflows; 87·(3 roundings)·2^-24 ≈ 1.6e-5, so 3e-5.
# Chains of ~10 roundings and pairwise sums of ≤1e6 terms stay far below that.
FP32_MATH = 3e-5
TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float32: Tolerance(
        FP32_MATH, FP32_MATH, 2.0**-148,
        "fp32 math: ≤ 3e-5 (conditioning of exp(p·ln z)); floor = two fp32 subnormal steps",
    ),
    torch.bfloat16: Tolerance(
        2.0**-8 + FP32_MATH, FP32_MATH, 2.0**-133,
        "fp32 math then ONE rounding to bf16: ≤ 2^-8 relative (half an ulp) + the fp32 error; "
        "floor = one bf16 subnormal step (2^-133); reference uses the same bf16-rounded inputs",
    ),
    torch.float64: Tolerance(1e-12, 1e-12, 1e-300, "float64 math throughout"),
}


# ----------------------------------------------------------------------------------------------
# Harness: float64 reference values, gradients and error scales; the comparison
# ----------------------------------------------------------------------------------------------


def _sum_to_shape(t: Tensor, shape: torch.Size) -> Tensor:
    """Sum a broadcast result back to a parameter's shape (leading dims and size-1 dims)."""
    lead = t.dim() - len(shape)
    t = t.sum(dim=tuple(range(lead))) if lead > 0 else t
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and t.shape[i] != 1)
    return t.sum(dim=dims, keepdim=True) if dims else t


def _row_scale(t: Tensor) -> Tensor:
    if t.dim() == 0:
        return t.abs()
    return t.abs().amax(dim=-1, keepdim=True).expand_as(t)


@dataclass
class Reference:
    out: Tensor
    out_scale: Tensor
    grads: dict[str, Tensor]
    grad_scales: dict[str, Tensor]


def reference_outputs(
    ref_fn: Callable[..., Tensor],
    tensors: Mapping[str, Tensor],
    grad_out: Tensor,
    broadcast: tuple[str, ...] = (),
    **kwargs,
) -> Reference:
    """Run ``ref_fn`` in float64 on the exact values of ``tensors`` (already rounded to the tested
    dtype) and backpropagate ``grad_out``.

    Tensors named in ``broadcast`` (parameters shared across tokens) are expanded to the output's
    shape first, so autograd yields each element's contribution; their gradient is the sum of the
    contributions and their error scale the sum of the |contributions|.
    """
    leaves: dict[str, Tensor] = {}
    args: dict[str, Tensor] = {}
    out_shape = grad_out.shape
    for name, t in tensors.items():
        t64 = t.detach().to(F64)
        if name in broadcast:
            t64 = t64.expand(out_shape).clone()
        leaves[name] = t64.requires_grad_(t.requires_grad)
        args[name] = leaves[name]
    out = ref_fn(**args, **kwargs)
    out.backward(grad_out.detach().to(F64))
    direct = _direct_input_gradients(ref_fn, tensors, leaves, grad_out, **kwargs)
    grads, scales = {}, {}
    for name, t in tensors.items():
        if not t.requires_grad:
            continue
        g = leaves[name].grad
        if name in broadcast:
            grads[name] = _sum_to_shape(g, t.shape).reshape(t.shape)
            scales[name] = _sum_to_shape(g.abs(), t.shape).reshape(t.shape)
        else:
            grads[name] = g
            scales[name] = _row_scale(g)
            if name in direct:
                scales[name] = _row_scale(direct[name]) + _row_scale(g - direct[name])
    return Reference(out.detach(), _row_scale(out.detach()), grads, scales)


def _direct_input_gradients(ref_fn, tensors, leaves, grad_out, **kwargs) -> dict[str, Tensor]:
    """d/d(input) with the per-token statistics detached (empty for ops without statistics)."""
    global _DETACH_STATISTICS
    fresh = {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in leaves.items()}
    _DETACH_STATISTICS = True
    try:
        out = ref_fn(**fresh, **kwargs)
    finally:
        _DETACH_STATISTICS = False
    inputs = [k for k in ("x",) if k in fresh and fresh[k].requires_grad]
    if not inputs or not out.requires_grad:
        return {}
    grads = torch.autograd.grad(out, [fresh[k] for k in inputs], grad_out.detach().to(F64), allow_unused=True)
    return {k: g for k, g in zip(inputs, grads) if g is not None}


def assert_matches_reference(actual: Tensor, expected: Tensor, scale: Tensor, what: str) -> None:
    """Elementwise check against the float64 reference with the tolerance of ``actual.dtype``.

    NaN/inf in ``actual`` always fail unless the reference has the same infinity (a true overflow).
    """
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    tol = TOLERANCES[actual.dtype]
    a = actual.detach().to(F64)
    error = (a - expected).abs()
    bound = tol.rtol * expected.abs() + tol.internal * scale + tol.floor
    ok = (error <= bound) | (a == expected)  # a == expected covers matching infinities
    if bool(ok.all()):
        return
    bad = (~ok).nonzero()
    ratio = torch.where(ok, torch.zeros_like(error), error / bound)
    flat_i = int(ratio.reshape(-1).nan_to_num(nan=math.inf).argmax())
    raise AssertionError(
        f"{what} ({actual.dtype}): {len(bad)}/{a.numel()} elements outside tolerance ({tol.why}). "
        f"Worst at flat index {flat_i}: actual={a.reshape(-1)[flat_i].item()!r} "
        f"reference={expected.reshape(-1)[flat_i].item()!r} bound={bound.reshape(-1)[flat_i].item():.3g}; "
        f"first bad indices {bad[:5].tolist()}"
    )


def run_and_compare(
    impl_fn: Callable[..., Tensor],
    ref_fn: Callable[..., Tensor],
    tensors: Mapping[str, Tensor],
    grad_out: Tensor,
    broadcast: tuple[str, ...] = (),
    what: str = "",
    impl_kwargs: Mapping | None = None,
    ref_kwargs: Mapping | None = None,
) -> Tensor:
    """Forward + backward of ``impl_fn`` vs the float64 reference: output dtype and shape, output
    values, and the gradient of every tensor that requires grad. Returns the output."""
    leaves = {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in tensors.items()}
    out = impl_fn(**leaves, **(impl_kwargs or {}))
    first = next(iter(tensors.values()))
    assert out.dtype == first.dtype, f"{what}: output dtype {out.dtype}, input dtype {first.dtype}"
    out.backward(grad_out)
    ref = reference_outputs(ref_fn, tensors, grad_out, broadcast, **(ref_kwargs or {}))
    assert_matches_reference(out, ref.out, ref.out_scale, f"{what} output")
    for name, t in leaves.items():
        if not t.requires_grad:
            continue
        assert t.grad is not None, f"{what}: no gradient reached {name}"
        assert t.grad.dtype == t.dtype, f"{what}: grad of {name} is {t.grad.dtype}, tensor is {t.dtype}"
        assert_matches_reference(t.grad, ref.grads[name], ref.grad_scales[name], f"{what} d/d{name}")
    return out


# ----------------------------------------------------------------------------------------------
# Tests of the references themselves
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("m", [0.5, 3.0, 9.9])
def test_reference_gate_derivative_matches_spec_closed_form(m: float) -> None:
    z = torch.cat([-torch.logspace(-6, 3, 200, dtype=F64), torch.logspace(-30, 6, 400, dtype=F64)])
    z.requires_grad_(True)
    (autograd,) = torch.autograd.grad(ref_powlu_gate(z, m).sum(), z)
    closed = ref_powlu_gate_derivative(z.detach(), m)
    # f' is a sum of terms that cancel (f' = 0 at the maximum, f' → 0 as z → ∞): float64 error is
    # relative to the terms' size, z^p·σ·(|p' ln z| + p/z + 1 − σ), not to f' itself; and 1 − σ(z)
    # carries an absolute error of ~1e-16 (times z^p·σ) once σ(z) is close to 1.
    zp = z.detach().clamp(min=1e-300)
    r, s = zp.sqrt(), torch.sigmoid(zp)
    p = m / (r + 1)
    terms = zp**p * s * (m * zp.log().abs() / (2 * r * (r + 1) ** 2) + p / zp + 1 - s)
    bound = torch.where(z > 0, 1e-12 * terms + 4e-16 * zp**p * s, 1e-12 * (1 + z.abs()))
    assert ((autograd - closed).abs() <= 1e-13 * closed.abs() + bound).all()


def test_reference_ops_pass_gradcheck() -> None:
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(4, 6, generator=gen, dtype=F64) * 3
    g = torch.where(g.abs() < 0.05, g + 0.2, g)  # keep finite differences off the kink at 0
    u = torch.randn(4, 6, generator=gen, dtype=F64)
    x = torch.randn(4, 6, generator=gen, dtype=F64) + 0.3
    w = torch.randn(6, generator=gen, dtype=F64)
    scalar = torch.tensor(0.7, dtype=F64)
    for t in (g, u, x, w, scalar):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: ref_powlu_glu(a, b, 3.0), (g, u))
    assert torch.autograd.gradcheck(lambda a, b: ref_swiglu_clip(a, b, 2.0, "gptoss"), (g, u))
    assert torch.autograd.gradcheck(ref_rms_norm, (x, w))
    assert torch.autograd.gradcheck(ref_bhyt, (x, w, scalar))


def test_reference_variance_correction_loop_equals_matrix_form() -> None:
    """The per-head loop equals W_O·(W_V with KV heads repeat-interleaved), and MHA is plain W_O·W_V."""
    gen = torch.Generator().manual_seed(1)
    d, hd, n_heads, n_kv, T = 12, 3, 4, 2, 16
    w_v = torch.randn(n_kv * hd, d, generator=gen, dtype=F64)
    w_o = torch.randn(d, n_heads * hd, generator=gen, dtype=F64)
    repeated = w_v.reshape(n_kv, hd, d).repeat_interleave(n_heads // n_kv, dim=0).reshape(-1, d)
    expected = float(((w_o @ repeated) ** 2).sum()) / (T * d)
    assert ref_bhyt_variance_correction(w_v, w_o, n_heads, n_kv, T) == pytest.approx(expected, rel=1e-12)
    w_v_mha = torch.randn(n_heads * hd, d, generator=gen, dtype=F64)
    expected_mha = float(((w_o @ w_v_mha) ** 2).sum()) / (T * d)
    assert ref_bhyt_variance_correction(w_v_mha, w_o, n_heads, n_heads, T) == pytest.approx(expected_mha, rel=1e-12)


def test_scalar_powlu_slope_matches_finite_differences() -> None:
    x = np.geomspace(1e-2, 500.0, 50)
    for m in (3.0, 10.5):
        h = 1e-6 * x
        fd = ((x + h) * _np_gate(x + h, m) - (x - h) * _np_gate(x - h, m)) / (2 * h)
        np.testing.assert_allclose(scalar_powlu_derivative(x, m), fd, rtol=1e-6)


def _np_gate(x: np.ndarray, m: float) -> np.ndarray:
    return np.exp(m / (np.sqrt(x) + 1.0) * np.log(x)) / (1.0 + np.exp(-x))


def test_harness_rejects_an_error_of_two_bf16_ulps() -> None:
    """The bf16 tolerance admits one rounding, not a second one (e.g. γ applied after rounding)."""
    expected = torch.tensor([1.0 + 2.0**-7], dtype=F64)  # exactly representable in bf16
    two_ulps_off = torch.tensor([1.0 + 3 * 2.0**-7], dtype=torch.bfloat16)
    with pytest.raises(AssertionError, match="outside tolerance"):
        assert_matches_reference(two_ulps_off, expected, expected.abs(), "probe")
    assert_matches_reference(torch.tensor([1.0 + 2.0**-7], dtype=torch.bfloat16), expected, expected.abs(), "probe")
    with pytest.raises(AssertionError, match="outside tolerance"):
        assert_matches_reference(torch.tensor([math.nan]), expected, expected.abs(), "probe")
