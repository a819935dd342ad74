"""steadylm.kernels against the float64 reference (steadylm.functional).

Most tests run the fused math *eagerly* (``set_compile(False)``): it is the very source Inductor
compiles, and eager keeps the suite fast. A few tests run the compiled kernels (small shapes, one
compile per op) and one runs them inside a ``torch.compile``'d module.

Tolerances (max error allowed per element: ``rtol·|ref| + atol·max|ref|``), and why:

* fp32 inputs: rtol = atol = 1e-5. The kernels do fp32 math; each intermediate carries ≤ 6e-8
  relative rounding, a dozen of them plus fp32 row/column sums (≤ 1024 terms here) stay well below
  1e-5; atol covers cancellation in ``g − x̂·mean(g·x̂)``-type gradients, which is relative to the
  row's scale, not the element's.
* bf16 inputs: outputs and input gradients are rounded to bf16 once at the end (8 significant
  bits: ≤ 2^-9 relative), so rtol = 2^-8 (twice that, for the fp32 math before the rounding) and
  atol = 1e-5. Parameter gradients (γ, α, λ, β, the fp32 variance) are fp32 and get the fp32
  tolerance: they are computed in fp32 from the same bf16 values the reference sees.

The reference is evaluated in float64 on exactly the (already rounded) values the kernel gets.
Where the float64 answer itself is ill-conditioned in fp32 — e.g. RMSNorm's input gradient at
d = 1 is r·g·(1 − x̂²) with x̂² = 1 − ε/x², all cancellation — no fp32 computation can meet a
tolerance relative to the (tiny) result, so each check also allows 4× the error of the reference
itself run in the input dtype (fp32 math): "at least as accurate as the reference, or within tol".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch

from steadylm import functional as F
from steadylm import kernels as K

FP32_TOL = (1e-5, 1e-5)
BF16_TOL = (2.0**-8, 1e-5)
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


@dataclass
class Case:
    """One op configuration: how to build its inputs and call both implementations."""

    name: str
    kernel: Callable[..., torch.Tensor]
    reference: Callable[..., torch.Tensor]
    # (shape, dtype, generator) -> (activation-like inputs, parameter inputs); both lists of tensors
    make: Callable[[tuple[int, ...], torch.dtype, torch.Generator], tuple[list[torch.Tensor], list[torch.Tensor]]]
    call: Callable[[Callable[..., torch.Tensor], list[torch.Tensor], list[torch.Tensor]], torch.Tensor]
    is_norm: bool


def _randn(shape, dtype, gen, scale=1.0):
    return (torch.randn(shape, generator=gen) * scale).to(dtype)


def _gated(shape, dtype, gen):
    return [_randn(shape, dtype, gen, 3.0), _randn(shape, dtype, gen, 2.0)], []


def _norm_params(d, gen, *extra):
    return [1.0 + 0.2 * torch.randn(d, generator=gen)] + [torch.tensor(v) for v in extra]


CASES: list[Case] = [
    Case("swiglu", K.swiglu, F.swiglu, _gated, lambda f, a, p: f(*a), False),
    Case("powlu_glu", K.powlu_glu, F.powlu_glu, _gated, lambda f, a, p: f(*a), False),
    Case("powlu_glu_m1.5", K.powlu_glu, F.powlu_glu, _gated, lambda f, a, p: f(*a, m=1.5), False),
    Case("swiglu_clip_gptoss", K.swiglu_clip, F.swiglu_clip, _gated, lambda f, a, p: f(*a, limit=2.5), False),
    Case("swiglu_clip_step", K.swiglu_clip, F.swiglu_clip, _gated,
         lambda f, a, p: f(*a, limit=1.5, variant="step"), False),  # fmt: skip
    Case("swiglu_clip_clamp", K.swiglu_clip, F.swiglu_clip, _gated,
         lambda f, a, p: f(*a, limit=2.0, variant="clamp", alpha=1.0), False),  # fmt: skip
    Case("rms_norm", K.rms_norm, F.rms_norm,
         lambda s, dt, g: ([_randn(s, dt, g, 2.0)], _norm_params(s[-1], g)),
         lambda f, a, p: f(a[0], p[0], eps=1e-6), True),  # fmt: skip
    Case("rms_norm_no_weight_eps0", K.rms_norm, F.rms_norm,
         lambda s, dt, g: ([_randn(s, dt, g, 2.0)], []),
         lambda f, a, p: f(a[0], None, eps=0.0), True),  # fmt: skip
    Case("dyt", K.dyt, F.dyt,
         lambda s, dt, g: ([_randn(s, dt, g, 2.0)], _norm_params(s[-1], g, 0.7)),
         lambda f, a, p: f(a[0], p[0], p[1]), True),  # fmt: skip
    Case("dyt_bias", K.dyt, F.dyt,
         lambda s, dt, g: ([_randn(s, dt, g, 2.0)], _norm_params(s[-1], g, 0.3) + [0.1 * torch.randn(s[-1], generator=g)]),
         lambda f, a, p: f(a[0], p[0], p[1], p[2]), True),  # fmt: skip
    Case("bhyt", K.bhyt, F.bhyt,
         lambda s, dt, g: ([_randn(s, dt, g, 2.0)], _norm_params(s[-1], g, 2.0)),
         lambda f, a, p: f(a[0], p[0], p[1]), True),  # fmt: skip
    Case("bhyt_large_lambda", K.bhyt, F.bhyt,
         lambda s, dt, g: ([_randn(s, dt, g, 2.0)], _norm_params(s[-1], g, 25.0)),
         lambda f, a, p: f(a[0], p[0], p[1], kappa=4.0, eps=1e-3), True),  # fmt: skip
    Case("bhyt_variance", K.bhyt, F.bhyt,
         lambda s, dt, g: (
             [_randn(s, dt, g, 2.0)],
             _norm_params(s[-1], g, 1.0) + [4.0 * torch.rand(s[:-1] + (1,), generator=g) + 0.1],
         ),
         lambda f, a, p: f(a[0], p[0], p[1], variance=p[2]), True),  # fmt: skip
]
CASE_IDS = [c.name for c in CASES]


def _assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    tol: tuple[float, float],
    what: str,
    same_precision_ref: torch.Tensor | None = None,
) -> None:
    assert actual.shape == expected.shape, what
    rtol, atol = tol
    natural_scale = 0.0
    if isinstance(expected, _WithScale):
        natural_scale = expected.natural_scale
        expected = expected.as_subclass(torch.Tensor)
    a, e = actual.double(), expected
    both_nonfinite = ~torch.isfinite(a) & ~torch.isfinite(e)
    finite = torch.isfinite(e)
    scale = e[finite].abs().max().item() if finite.any() else 0.0
    scale = max(scale, natural_scale)
    allowed = rtol * e.abs() + atol * scale
    if same_precision_ref is not None:
        ref_err = (same_precision_ref.double() - e).abs()[finite & torch.isfinite(same_precision_ref.double())]
        if ref_err.numel():
            allowed = allowed + 4.0 * ref_err.max()
    err = (a - e).abs()
    bad = ~(both_nonfinite & ((a == e) | (torch.isnan(a) & torch.isnan(e)))) & ~(err <= allowed)
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} of {bad.numel()} elements off; worst |err| {err[bad].max().item():.3e} "
        f"vs allowed {allowed[bad].min().item():.3e} (ref scale {scale:.3e})"
    )


def _run_both(
    case: Case, acts: list[torch.Tensor], params: list[torch.Tensor], grad_out_seed: int = 0, device: str = "cpu"
):
    """Forward + backward of kernel (given dtypes, on ``device``) and reference (float64, CPU);
    returns both sides (the kernel's output on ``device``, its leaves' gradients there too)."""
    k_acts = [t.to(device).requires_grad_(True) if device != "cpu" else t.clone().requires_grad_(True) for t in acts]
    k_params = [t.to(device).requires_grad_(True) if device != "cpu" else t.clone().requires_grad_(True) for t in params]
    r_acts = [t.detach().double().requires_grad_(True) for t in acts]
    r_params = [t.detach().double().requires_grad_(True) for t in params]
    out_k = case.call(case.kernel, k_acts, k_params)
    out_r = case.call(case.reference, r_acts, r_params)
    gen = torch.Generator().manual_seed(grad_out_seed)
    grad_out = torch.randn(out_r.shape, generator=gen).to(out_k.dtype)
    out_k.backward(grad_out.to(out_k.device))
    out_r.backward(grad_out.double())
    return out_k, out_r, k_acts, r_acts, k_params, r_params


class _WithScale(torch.Tensor):
    """A float64 expected tensor that carries the scale its absolute tolerance refers to."""

    natural_scale: float

    @staticmethod
    def __new__(cls, data: torch.Tensor, natural_scale: float):
        out = data.as_subclass(cls)
        out.natural_scale = natural_scale
        return out


def _natural_grad_scale(case: Case, x: torch.Tensor, params: list[torch.Tensor]) -> float:
    """max |dy·γ| · max_row 1/rms(x) (times λ/κ for BHyT): the magnitude of r·g."""
    x64 = x.double()
    inv_rms = torch.rsqrt(x64.square().mean(-1) + 1e-6)
    inv_rms = inv_rms[torch.isfinite(inv_rms)]
    gamma = params[0].abs().max().item() if params and params[0].dim() == 1 else 1.0
    factor = 1.0
    if case.kernel is K.bhyt:
        factor = params[1].abs().item() / (4.0 if "large_lambda" in case.name else 10.0)
    return float(4.0 * gamma * factor * (inv_rms.max().item() if inv_rms.numel() else 1.0))  # |dy| ≤ ~4


def _reference_in_input_dtype(case: Case, acts, params):
    """The reference run on the kernel's own dtypes (its fp32 math): the achievable accuracy."""
    r_acts = [t.detach().clone().requires_grad_(True) for t in acts]
    r_params = [t.detach().clone().requires_grad_(True) for t in params]
    out = case.call(case.reference, r_acts, r_params)
    gen = torch.Generator().manual_seed(0)  # the same grad_out as _run_both
    out.backward(torch.randn(out.shape, generator=gen).to(out.dtype))
    return out.detach(), [t.grad for t in r_acts], [t.grad for t in r_params]


def _check_case(case: Case, acts, params, dtype: torch.dtype, device: str = "cpu") -> None:
    """The kernel on ``device`` against the float64 CPU reference, forward and every gradient."""
    tol = FP32_TOL if dtype == torch.float32 else BF16_TOL
    out_k, out_r, k_acts, r_acts, k_params, r_params = _run_both(case, acts, params, device=device)
    out_k = out_k.cpu()
    same_out, same_act_grads, same_param_grads = _reference_in_input_dtype(case, acts, params)
    assert out_k.dtype == acts[0].dtype
    _assert_close(out_k, out_r, tol, f"{case.name} forward", same_out)
    for i, (k, r) in enumerate(zip(k_acts, r_acts)):
        assert k.grad is not None and k.grad.dtype == k.dtype
        k_grad = k.grad.cpu()
        expected = r.grad
        if case.is_norm:
            # Norm input gradients are r·(g − x̂·mean(g·x̂))-shaped: judge them at the scale of
            # r·g, the terms that cancel, not of their (possibly tiny) difference.
            expected = _WithScale(r.grad, _natural_grad_scale(case, acts[0], params))
        _assert_close(k_grad, expected, tol, f"{case.name} d(input {i})", same_act_grads[i])
    for i, (k, r) in enumerate(zip(k_params, r_params)):
        assert k.grad is not None and k.grad.dtype == k.dtype and k.grad.shape == k.shape
        _assert_close(k.grad.cpu(), r.grad, FP32_TOL, f"{case.name} d(param {i})", same_param_grads[i])


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_forward_and_every_gradient_match_float64_reference(case, dtype, shape, device, eager_kernels):
    gen = torch.Generator().manual_seed(hash((case.name, str(dtype), shape)) % 2**31)
    acts, params = case.make(shape, dtype, gen)
    _check_case(case, acts, params, dtype, device)


def _extreme_inputs(case: Case, dtype: torch.dtype, gen: torch.Generator):
    """Rows of ±1e4, exact zeros, bf16-max magnitudes, subnormals, mixed with ordinary values."""
    d = 64
    ordinary = torch.randn(6, d, generator=gen)
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
            ]
        )
        acts, params = case.make((6, d), dtype, gen)
        acts = [rows.to(dtype)]
        if case.name == "bhyt_variance":
            params[2] = rows.to(dtype).double().square().mean(-1, keepdim=True).float().clamp_max(3e38)
        return acts, params
    values = torch.tensor([1e4, -1e4, 0.0, BF16_MAX, -BF16_MAX, subnormal, -subnormal, 1.0, -1.0, 7.0, 2.5])
    gate = values.repeat_interleave(len(values))
    up = values.repeat(len(values)).clamp(-1.0, 1.0)  # |up| ≤ 1 keeps f(gate)·up inside the range
    return [gate.to(dtype), up.to(dtype)], []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_extreme_values(case, dtype, eager_kernels):
    if case.name == "rms_norm_no_weight_eps0":
        pytest.skip("ε = 0 with an all-zero row is 0/0 by definition; covered by test_eps0_tiny_rows")
    gen = torch.Generator().manual_seed(7)
    acts, params = _extreme_inputs(case, dtype, gen)
    _check_case(case, acts, params, dtype)


def test_eps0_tiny_rows_normalise_exactly(eager_kernels):
    # Σx² of subnormal rows underflows to 0 in fp32; the kernel rescales such rows by 2^90.
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(3)) * 1e-40
    for k_fn, r_fn in ((K.rms_norm, F.rms_norm), (lambda a, w, eps: K.bhyt(a, w, 5.0, eps=eps),
                                                   lambda a, w, eps: F.bhyt(a, w, 5.0, eps=eps))):  # fmt: skip
        out = k_fn(x, None, eps=0.0)
        ref = r_fn(x.double(), None, eps=0.0)
        _assert_close(out, ref, FP32_TOL, "eps=0 subnormal rows")


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("m", [3.0, 1.5, 9.5])
def test_powlu_gate_gradient_sign_and_value_for_huge_gates(m, compiled, device):
    """d(gate) for gates 1 … 1e30 against the float64 reference, in sign and in value.

    f_m'(z) < 0 for large z (f decays to 1), but ``1 − σ(z)`` is exactly 0 in fp32 and the old
    ``p'·ln z + 1 − σ`` rounded the small negative term away, leaving a positive gradient from
    z ≈ 1e6 on. Two output-gradient scales: 1 (f'(1e30) ≈ −1e-43 is then an fp32 *subnormal*, whose
    spacing 2^-149 bounds the absolute error) and 1e20 (every result a normal number, so the plain
    fp32 relative tolerance applies). Tolerance: FP32_TOL — about ten fp32 roundings, see above.
    """
    previous = K.compile_enabled()
    K.set_compile(compiled)
    try:
        gate = torch.logspace(0, 30, 121, dtype=torch.float32)
        up = torch.linspace(0.5, 2.0, 121)
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
            assert torch.equal(torch.sign(got)[~flushed], torch.sign(ref)[~flushed]), (m, dy_scale)
            err = torch.where(flushed, 0.0, (got - ref).abs())
            allowed = FP32_TOL[0] * ref.abs() + 4 * 2.0**-149  # a few subnormal spacings
            assert bool((err <= allowed).all()), (m, dy_scale, float((err / ref.abs()).max()))
    finally:
        K.set_compile(previous)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_float64_gradcheck(case, eager_kernels):
    # float64 inputs keep float64 math in the kernels, so gradcheck verifies the hand-derived backward.
    gen = torch.Generator().manual_seed(11)
    acts, params = case.make((2, 3, 5), torch.float64, gen)
    acts = [a.double().requires_grad_(True) for a in acts]
    params = [p.double().requires_grad_(True) for p in params]
    n = len(acts)
    assert torch.autograd.gradcheck(
        lambda *ts: case.call(case.kernel, list(ts[:n]), list(ts[n:])), (*acts, *params), eps=1e-6, atol=1e-7
    )


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_only_inputs_are_saved_for_backward(case, eager_kernels):
    gen = torch.Generator().manual_seed(5)
    acts, params = case.make((4, 32), torch.float32, gen)
    inputs = [t.requires_grad_(True) for t in acts + params]
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        case.call(case.kernel, inputs[: len(acts)], inputs[len(acts) :])
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
    for k, r in ((K.dyt(x, w, 0.5), F.dyt(x, w, 0.5)), (K.bhyt(x, w, 2.0), F.bhyt(x, w, 2.0))):
        _assert_close(k, r.double(), FP32_TOL, "float scalar parameter")
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
    case = next(c for c in CASES if c.name == name)
    gen = torch.Generator().manual_seed(13)
    acts, params = _extreme_inputs(case, torch.float32, gen)
    _check_case(case, acts, params, torch.float32, device)


def test_compiled_kernels_match_reference_bf16_with_extremes(device):
    case = next(c for c in CASES if c.name == "rms_norm")
    acts, params = _extreme_inputs(case, torch.bfloat16, torch.Generator().manual_seed(17))
    _check_case(case, acts, params, torch.bfloat16, device)


@pytest.mark.slow
@pytest.mark.parametrize("name, dtype", COMPILED_SLOW, ids=lambda v: str(v).replace("torch.", ""))
def test_compiled_kernels_more_extremes(name, dtype):
    case = next(c for c in CASES if c.name == name)
    acts, params = _extreme_inputs(case, dtype, torch.Generator().manual_seed(23))
    _check_case(case, acts, params, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_compiled_kernels_every_case_and_shape(case, dtype, device):
    for shape in SHAPES:
        gen = torch.Generator().manual_seed(19)
        acts, params = case.make(shape, dtype, gen)
        _check_case(case, acts, params, dtype, device)


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("has_weight", [True, False], ids=["weight", "no_weight"])
def test_triton_rms_norm_backward_matches_float64_reference(has_weight, dtype, device):
    """The one-pass Triton backward (dx and γ's gradient together) against the float64 reference,
    ordinary and extreme rows (±1e4, zeros, bf16-max, subnormals). Runs on CUDA with Triton, and on
    CPU only under Triton's interpreter (``TRITON_INTERPRET=1`` set before the import). Tolerances:
    those of the other kernel tests (same math, same fp32 roundings)."""
    from steadylm.kernels import triton_norms

    if not triton_norms.available():
        pytest.skip("triton is not installed")
    eps = 1e-6
    if not triton_norms.usable(torch.empty(1, 1, dtype=dtype, device=device), eps):
        pytest.skip("the Triton kernel does not run on this device (CPU needs TRITON_INTERPRET=1)")
    if device == "cpu" and dtype == torch.bfloat16:
        # Measured: the interpreter rounds fp32 -> bf16 toward zero (1 ulp low on ~half the
        # elements); GPUs round to nearest. bf16 is checked by the CUDA variant.
        pytest.skip("Triton's CPU interpreter truncates fp32 -> bf16")
    case = next(c for c in CASES if c.name == "rms_norm")
    gen = torch.Generator().manual_seed(29)
    for acts, params in (case.make((37, 96), dtype, gen), _extreme_inputs(case, dtype, gen)):
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
        tol = FP32_TOL if dtype == torch.float32 else BF16_TOL
        scale = _natural_grad_scale(case, x, [w] if w is not None else [])
        _assert_close(dx.cpu(), _WithScale(x64.grad, scale), tol, "triton dx")
        if w is not None:
            _assert_close(dw.cpu(), w64.grad, FP32_TOL, "triton dγ")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["rms_norm", "bhyt", "bhyt_large_lambda", "bhyt_variance"])
def test_triton_backward_through_the_public_ops(name, dtype, device, eager_kernels, monkeypatch):
    """The ops' autograd with the Triton backward (where it runs) against the float64 reference,
    forward and every gradient (γ, λ, the given variance), ordinary and extreme rows; a spy checks
    that the Triton kernel really ran. Same tolerances as the other kernel tests."""
    from steadylm.kernels import triton_norms

    if not triton_norms.available():
        pytest.skip("triton is not installed")
    if not triton_norms.usable(torch.empty(1, 1, dtype=dtype, device=device), 1e-6):
        pytest.skip("the Triton kernel does not run on this device (CPU needs TRITON_INTERPRET=1)")
    if device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton's CPU interpreter truncates fp32 -> bf16")  # see the test above
    calls = {"n": 0}
    kernel = triton_norms.rms_norm_bwd if name == "rms_norm" else triton_norms.bhyt_bwd

    def spy(*args, **kwargs):
        calls["n"] += 1
        return kernel(*args, **kwargs)

    monkeypatch.setattr(triton_norms, kernel.__name__, spy)
    case = next(c for c in CASES if c.name == name)
    gen = torch.Generator().manual_seed(31)
    _check_case(case, *case.make((3, 7, 257), dtype, gen), dtype, device)
    _check_case(case, *_extreme_inputs(case, dtype, gen), dtype, device)
    assert calls["n"] == 2


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_mean_square_matches_float64_reference(dtype, compiled, device):
    """kernels.mean_square (BHyT's shared statistic, one pass) against the float64 reference,
    forward and backward, ordinary and extreme rows (±1e4, zeros, bf16-max, subnormals). The output
    is fp32 for both input dtypes (FP32_TOL: a sum of 64 squares in fp32 plus the final scaling);
    dx = dv·2x/d is rounded once to the input dtype (FP32_TOL / BF16_TOL). A mean square whose true
    value is itself subnormal in fp32 can only be exact to its absolute spacing 2^-149."""
    previous = K.compile_enabled()
    K.set_compile(compiled)
    try:
        case = next(c for c in CASES if c.name == "rms_norm")
        gen = torch.Generator().manual_seed(37)
        # + rows whose Σx² overflows fp32 while mean(x²) ≈ 9e36 does not (the 2^-72 rescaled sum)
        big = (torch.randn(2, 64, generator=gen).sign() * 3e18).to(dtype)
        rows = [case.make((9, 64), dtype, gen)[0][0], _extreme_inputs(case, dtype, gen)[0][0], big]
        for x in rows:
            xk = x.to(device, copy=True).requires_grad_(True)
            out = K.mean_square(xk)
            x64 = x.double().requires_grad_(True)
            ref = F.mean_square(x64)
            assert out.dtype == torch.float32 and out.shape == ref.shape
            # fp32 output: a true mean square beyond the fp32 range (bf16-max rows) must be inf.
            overflow = ~torch.isfinite(ref.detach().float())
            got = out.detach().cpu().double()
            assert torch.equal(torch.isinf(got), overflow)
            err = (got - ref.detach()).abs()[~overflow]
            allowed = (FP32_TOL[0] * ref.detach().abs() + 4 * 2.0**-149)[~overflow]
            assert bool((err <= allowed).all()), float(err.max())
            dv = torch.rand(ref.shape, generator=gen)
            out.backward(dv.to(device))
            ref.backward(dv.double())
            tol = FP32_TOL if dtype == torch.float32 else BF16_TOL
            _assert_close(xk.grad.cpu(), x64.grad, tol, "mean_square dx")
    finally:
        K.set_compile(previous)
