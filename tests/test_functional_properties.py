"""Hypothesis property: finite inputs never give NaN/inf in the output or in any gradient.

Ranges (the "sensible" domain where the true results are representable):

* activations: gate and up in [−1e4, 1e4] as fp32 (zeros and subnormals included), so every true
  output and gradient is at most ~1e8·(grad_out ≤ 1e2); m in [1, 9.95]; limit in [0.1, 50]; fp32
  and bf16 inputs. m < 1 is valid but excluded here: f_m(z) ≈ z^m/2 near 0⁺, so f_m'(0⁺) = ∞ and a
  subnormal positive gate has a true gradient beyond fp32 (m = 0.05, z = 1e-45: f' ≈ 1e41).
* norms: x anywhere in the finite fp32 range (|x| up to 3.4e38, whose squares overflow fp32) for
  rms_norm, layer_norm and bhyt; γ, β in [−10, 10]; λ in [−10, 10]; κ in [0.1, 100]; ε in
  [1e-10, 1e-2] (ε = 0 with an all-zero row is 0/0 and excluded on purpose).
* dyt: |x| ≤ 1e4 and α in [−10, 10]: dL/dα = Σ x·(1 − tanh²(αx))·γ·go is truly ~|x| when αx is
  small, so huge x with small α has a gradient beyond fp32.
* bhyt with a given variance: mean(x²)·c with c in [1/4, 4] (the block's v or v' is a mean square
  of the same order; an unrelated variance, e.g. 0 for x = 3e37, makes dL/dλ truly overflow), and
  finite: rows with rms ≳ 1.8e19 have no fp32 mean square to hand over.

Gradients are taken with grad_out in [−100, 100].
"""

from __future__ import annotations

import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from steadylm import functional

FP32_MAX = float(torch.finfo(torch.float32).max)
DTYPES = st.sampled_from([torch.float32, torch.bfloat16])


def _floats(bound: float) -> st.SearchStrategy[float]:
    return st.floats(-bound, bound, allow_nan=False, allow_infinity=False, allow_subnormal=True, width=32)


@st.composite
def _matrices(draw, bound: float, max_rows: int = 3, max_cols: int = 17) -> torch.Tensor:
    rows = draw(st.integers(1, max_rows))
    cols = draw(st.integers(1, max_cols))
    values = draw(st.lists(_floats(bound), min_size=rows * cols, max_size=rows * cols))
    return torch.tensor(values, dtype=torch.float32).reshape(rows, cols)


def _finite_in(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype`` without rounding past the dtype's max (fp32 3.4e38 → bf16 would be inf)."""
    bound = torch.finfo(dtype).max
    return t.clamp(-bound, bound).to(dtype)


def _assert_finite_forward_backward(fn, tensors: dict[str, torch.Tensor], grad_scale: float) -> None:
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in tensors.items()}
    out = fn(**leaves)
    assert torch.isfinite(out).all(), f"non-finite output for {tensors}"
    grad_out = torch.full_like(out, grad_scale)
    out.backward(grad_out)
    for name, leaf in leaves.items():
        assert leaf.grad is not None and torch.isfinite(leaf.grad).all(), f"non-finite d/d{name} for {tensors}"


@given(
    gate=_matrices(1e4),
    data=st.data(),
    dtype=DTYPES,
    op=st.sampled_from(["swiglu", "powlu_glu", "gptoss", "step", "clamp"]),
    m=st.floats(1.0, 9.95),
    limit=st.floats(0.1, 50.0),
    grad_scale=st.floats(-100.0, 100.0),
)
def test_gated_activations_finite(gate, data, dtype, op, m, limit, grad_scale) -> None:
    up = torch.tensor(
        data.draw(st.lists(_floats(1e4), min_size=gate.numel(), max_size=gate.numel())), dtype=torch.float32
    ).reshape(gate.shape)
    tensors = {"gate": gate.to(dtype), "up": up.to(dtype)}
    if op == "swiglu":
        fn = functional.swiglu
    elif op == "powlu_glu":
        fn = lambda gate, up: functional.powlu_glu(gate, up, m)  # noqa: E731
    else:
        fn = lambda gate, up: functional.swiglu_clip(gate, up, limit, op)  # noqa: E731
    _assert_finite_forward_backward(fn, tensors, grad_scale)


@given(x=_matrices(1e4), dtype=DTYPES, m=st.floats(1.0, 9.95), scalar=st.booleans(), grad_scale=st.floats(-100.0, 100.0))
def test_powlu_gate_and_scalar_powlu_finite(x, dtype, m, scalar, grad_scale) -> None:
    fn = (lambda x: functional.powlu(x, m)) if scalar else (lambda x: functional.powlu_gate(x, m))
    _assert_finite_forward_backward(fn, {"x": x.to(dtype)}, grad_scale)


@given(
    x=_matrices(FP32_MAX),
    data=st.data(),
    dtype=DTYPES,
    op=st.sampled_from(["rms_norm", "layer_norm", "dyt", "bhyt", "bhyt_variance"]),
    eps=st.floats(1e-10, 1e-2),
    kappa=st.floats(0.1, 100.0),
    scalar=st.floats(-10.0, 10.0),
    grad_scale=st.floats(-100.0, 100.0),
)
def test_norms_finite_over_the_whole_fp32_range(x, data, dtype, op, eps, kappa, scalar, grad_scale) -> None:
    d = x.shape[-1]
    weight = torch.tensor(data.draw(st.lists(st.floats(-10, 10), min_size=d, max_size=d)), dtype=torch.float32)
    bias = torch.tensor(data.draw(st.lists(st.floats(-10, 10), min_size=d, max_size=d)), dtype=torch.float32)
    tensors = {"x": _finite_in(x, dtype), "weight": weight.to(dtype)}
    param = torch.tensor(scalar, dtype=dtype)
    if op == "rms_norm":
        fn = lambda x, weight: functional.rms_norm(x, weight, eps)  # noqa: E731
    elif op == "layer_norm":
        tensors["bias"] = bias.to(dtype)
        fn = lambda x, weight, bias: functional.layer_norm(x, weight, bias, eps)  # noqa: E731
    elif op == "dyt":
        tensors.update(x=x.clamp(-1e4, 1e4).to(dtype), alpha=param, bias=bias.to(dtype))
        fn = functional.dyt
    elif op == "bhyt":
        tensors["lam"] = param
        fn = lambda x, weight, lam: functional.bhyt(x, weight, lam, kappa, eps)  # noqa: E731
    else:
        factor = data.draw(st.floats(0.25, 4.0))
        variance = (functional.mean_square(tensors["x"]) * factor).detach()
        # Rows with rms ≳ 1.8e19 have a mean square beyond fp32: no finite variance to hand over.
        assume(bool(torch.isfinite(variance).all()))
        tensors.update(lam=param, variance=variance)
        fn = lambda x, weight, lam, variance: functional.bhyt(x, weight, lam, kappa, eps, variance)  # noqa: E731
    _assert_finite_forward_backward(fn, tensors, grad_scale)
