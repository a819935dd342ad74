"""``steadylm.nn``: parameters and init, both paths (fused default, ``impl="reference"``) against the
independent float64 references, the registries and their errors, GatedFFN probe points, saturation.

The fused path is exercised with ``torch.compile`` switched off (``kernels.set_compile(False)``: the
very same autograd Functions and math, run eagerly) so the whole matrix fits the time budget; one
test runs the compiled default end to end, and ``-m slow`` runs the matrix compiled. The compiled
kernels themselves are tested in ``test_kernels.py``.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from steadylm import functional, kernels
from steadylm.errors import ConfigError
from steadylm.nn import (
    ACTIVATIONS,
    NORMS,
    BHyT,
    DyT,
    GatedFFN,
    LayerNorm,
    RMSNorm,
    build_norm,
    get_activation,
)
from test_functional_reference import (
    F64,
    BF16_MAX,
    assert_matches_reference,
    ref_bhyt,
    ref_dyt,
    ref_layer_norm,
    ref_powlu_glu,
    ref_rms_norm,
    ref_swiglu,
    ref_swiglu_clip,
    reference_outputs,
)

FP32, BF16 = torch.float32, torch.bfloat16
IMPLS = ["fused", "reference"]


@pytest.fixture
def eager_kernels():
    """Run the fused kernels' math without torch.compile for the duration of a test."""
    before = kernels.compile_enabled()
    kernels.set_compile(False)
    yield
    kernels.set_compile(before)


# ----------------------------------------------------------------------------------------------
# parameters, shapes, init
# ----------------------------------------------------------------------------------------------


def _params(module: nn.Module) -> dict[str, tuple[tuple[int, ...], Tensor]]:
    return {name: (tuple(p.shape), p.detach()) for name, p in module.named_parameters()}


def test_rmsnorm_parameters_and_init() -> None:
    norm = RMSNorm(24)
    params = _params(norm)
    assert set(params) == {"weight"} and params["weight"][0] == (24,)
    assert torch.equal(norm.weight, torch.ones(24)) and norm.eps == 1e-6


def test_layernorm_parameters_and_init() -> None:
    norm = LayerNorm(24)
    assert set(_params(norm)) == {"weight", "bias"}
    assert torch.equal(norm.weight, torch.ones(24)) and torch.equal(norm.bias, torch.zeros(24)) and norm.eps == 1e-5


def test_dyt_parameters_and_init() -> None:
    norm = DyT(24)
    assert set(_params(norm)) == {"weight", "alpha"}
    assert norm.alpha.shape == (1,) and norm.alpha.item() == 0.5 and norm.alpha.requires_grad  # DyT paper default
    assert torch.equal(norm.weight, torch.ones(24))
    # The LLM recipe's α0 (0.8 before attention, 0.2 before the FFN) is a constructor argument.
    assert DyT(24, alpha_init=0.8).alpha.item() == pytest.approx(0.8)
    with_bias = DyT(24, alpha_init=0.2, bias=True)
    assert set(_params(with_bias)) == {"weight", "alpha", "bias"} and torch.equal(with_bias.bias, torch.zeros(24))


def test_bhyt_parameters_and_init() -> None:
    norm = BHyT(24)
    assert set(_params(norm)) == {"weight", "lam"}  # κ is fixed: not a parameter
    assert norm.lam.shape == (1,) and norm.lam.item() == 1.0 and norm.lam.requires_grad
    assert norm.kappa == 10.0 and norm.eps == 1e-6
    assert torch.equal(norm.weight, torch.ones(24))
    assert BHyT(24, lam_init=2.0).lam.item() == 2.0  # published λ0 at the attention site


def test_gated_ffn_parameters_and_probe_points() -> None:
    ffn = GatedFFN(24, 40)
    params = _params(ffn)
    assert {k: v[0] for k, v in params.items()} == {
        "w_gate.weight": (40, 24), "w_up.weight": (40, 24), "w_down.weight": (24, 40)
    }
    for probe in ("gate_out", "up_out", "down_input"):
        assert isinstance(getattr(ffn, probe), nn.Identity)


@pytest.mark.parametrize("module", [RMSNorm(8), LayerNorm(8), DyT(8), BHyT(8)], ids=lambda m: type(m).__name__)
def test_norms_keep_shape_and_input_dtype(module: nn.Module, eager_kernels) -> None:
    """fp32 parameters on bf16 activations (mixed precision): the output keeps the input dtype."""
    for dtype in (FP32, BF16):
        x = torch.randn(2, 3, 8).to(dtype)
        y = module(x)
        assert y.shape == x.shape and y.dtype == dtype


# ----------------------------------------------------------------------------------------------
# both paths vs the float64 references, forward and backward, every parameter
# ----------------------------------------------------------------------------------------------

NORM_MODULES = {
    # name: (constructor kwargs, float64 reference, reference kwargs, parameter names)
    "rmsnorm": ({}, ref_rms_norm, {"eps": 1e-6}, ("weight",)),
    "layernorm": ({}, ref_layer_norm, {"eps": 1e-5}, ("weight", "bias")),
    "dyt": ({"alpha_init": 0.8}, ref_dyt, {}, ("weight", "alpha")),
    "dyt_bias": ({"alpha_init": 0.2, "bias": True}, ref_dyt, {}, ("weight", "alpha", "bias")),
    "bhyt": ({"lam_init": 2.0}, ref_bhyt, {"kappa": 10.0, "eps": 1e-6}, ("weight", "lam")),
    "bhyt_kappa4": ({"lam_init": 1.0, "kappa": 4.0}, ref_bhyt, {"kappa": 4.0, "eps": 1e-6}, ("weight", "lam")),
}


def _build(name: str, dim: int, impl: str) -> nn.Module:
    kwargs = NORM_MODULES[name][0]
    module = build_norm(name.split("_")[0], dim, impl=impl, **kwargs)
    with torch.no_grad():  # move γ, β off their init so their gradients are distinguishable
        gen = torch.Generator().manual_seed(dim)
        module.weight.copy_(1 + 0.2 * torch.randn(dim, generator=gen))
        if getattr(module, "bias", None) is not None:
            module.bias.copy_(0.1 * torch.randn(dim, generator=gen))
    return module


def _norm_inputs(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=gen, dtype=F64) * 2 + 0.5).to(dtype)
    grad_out = torch.randn(*shape, generator=gen, dtype=F64).to(dtype)
    return x, grad_out


def check_norm_module(module: nn.Module, name: str, x: Tensor, grad_out: Tensor, variance: Tensor | None = None) -> Tensor:
    """Module forward/backward vs the float64 reference on the module's own parameter values."""
    _, ref_fn, ref_kwargs, param_names = NORM_MODULES[name]
    module.zero_grad()
    leaf = x.detach().clone().requires_grad_(True)
    out = module(leaf) if variance is None else module(leaf, variance)
    assert out.dtype == x.dtype and out.shape == x.shape
    out.backward(grad_out)
    tensors = {"x": x.detach().requires_grad_(True)}
    for p in param_names:
        tensors[p] = getattr(module, p).detach().requires_grad_(True)
    if variance is not None:
        tensors["variance"] = variance.detach()
    ref = reference_outputs(ref_fn, tensors, grad_out, broadcast=param_names, **ref_kwargs)
    what = f"{name} impl={getattr(module, 'impl', '?')}"
    if name == "layernorm" and module.impl == "fused":
        # PyTorch's native kernel forms x̂ = x·rstd − μ·rstd, whose fp32 error is relative to
        # |μ|·rstd (the standard layer-norm error model), not to |x̂|: it shows on near-constant
        # rows (d = 1: x̂ is 0 exactly, native gives ~1e-5). Add that term to the error scales.
        x64 = x.detach().to(F64)
        mu_rstd = x64.mean(-1, keepdim=True).abs() / torch.sqrt(x64.var(-1, unbiased=False, keepdim=True) + 1e-5)
        gamma = tensors["weight"].detach().to(F64).abs()
        ref.out_scale = ref.out_scale + (gamma * mu_rstd).amax(-1, keepdim=True)
        ref.grad_scales["weight"] = ref.grad_scales["weight"] + (grad_out.to(F64).abs() * mu_rstd).reshape(-1, x.shape[-1]).sum(0)
    assert_matches_reference(out, ref.out, ref.out_scale, f"{what} output")
    assert_matches_reference(leaf.grad, ref.grads["x"], ref.grad_scales["x"], f"{what} d/dx")
    for p in param_names:
        param = getattr(module, p)
        assert param.grad is not None and param.grad.dtype == param.dtype
        assert_matches_reference(param.grad, ref.grads[p], ref.grad_scales[p], f"{what} d/d{p}")
    return out


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", list(NORM_MODULES))
def test_norm_modules_match_float64_reference(name: str, impl: str, dtype: torch.dtype, eager_kernels) -> None:
    for shape in [(1, 1, 1), (3, 7, 257)]:
        module = _build(name, shape[-1], impl)
        x, grad_out = _norm_inputs(shape, dtype)
        check_norm_module(module, name, x, grad_out)


@pytest.mark.parametrize("impl", IMPLS)
def test_bhyt_module_with_handed_variance(impl: str, eager_kernels) -> None:
    """forward(x, variance=v): the block's once-per-block statistic, fp32, [..., 1]."""
    module = _build("bhyt", 65, impl)
    for dtype in (FP32, BF16):
        x, grad_out = _norm_inputs((2, 9, 65), dtype, seed=1)
        variance = functional.mean_square(x).detach() * 1.7  # a v' that is not mean(x²)
        check_norm_module(module, "bhyt", x, grad_out, variance)


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_norm_modules_on_huge_rows(impl: str, eager_kernels) -> None:
    """Rows whose squares overflow fp32 still normalise (the SPEC's RMS of huge inputs).

    LayerNorm's fused path is PyTorch's native kernel, which does not rescale rows (documented in
    nn/norms.py), so only its reference path is held to this."""
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(2), dtype=F64)
    x[0, :2] = torch.tensor([BF16_MAX, -BF16_MAX])
    x[1] = BF16_MAX
    x = x.to(BF16)
    grad_out = torch.ones_like(x)
    for name in NORM_MODULES:
        if name == "layernorm" and impl == "fused":
            continue
        check_norm_module(_build(name, 16, impl), name, x, grad_out)


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(NORM_MODULES))
def test_fused_and_reference_paths_agree(name: str, dtype: torch.dtype, eager_kernels) -> None:
    """Same weights, both paths: each is within the tolerance of the float64 truth, so they differ
    by at most twice it — for bf16 that is one ulp (2^-7 relative) of the output."""
    fused, reference = _build(name, 65, "fused"), _build(name, 65, "reference")
    reference.load_state_dict(fused.state_dict())
    x, _ = _norm_inputs((4, 33, 65), dtype, seed=12)
    a, b = fused(x).double(), reference(x).double()
    rtol = 2 * (2.0**-8 + 3e-5) if dtype == BF16 else 2 * 3e-5
    torch.testing.assert_close(a, b, rtol=rtol, atol=2 * 3e-5 * b.abs().amax(-1, keepdim=True).max().item())


# ----------------------------------------------------------------------------------------------
# GatedFFN
# ----------------------------------------------------------------------------------------------

FFN_ACTIVATIONS = {
    # id: (activation name, kwargs, float64 reference of act(gate, up))
    "swiglu": ("swiglu", {}, ref_swiglu),
    "powlu": ("powlu", {}, lambda gate, up: ref_powlu_glu(gate, up, 3.0)),
    "powlu_m2.5": ("powlu", {"m": 2.5}, lambda gate, up: ref_powlu_glu(gate, up, 2.5)),
    "clip_gptoss": ("swiglu_clip", {}, lambda gate, up: ref_swiglu_clip(gate, up, 7.0, "gptoss", 1.702)),
    "clip_step_L3": ("swiglu_clip", {"limit": 3.0, "variant": "step"}, lambda gate, up: ref_swiglu_clip(gate, up, 3.0, "step")),
    "clip_clamp_L2": ("swiglu_clip", {"limit": 2.0, "variant": "clamp"}, lambda gate, up: ref_swiglu_clip(gate, up, 2.0, "clamp")),
}


def _ffn(activation_id: str, impl: str, dim: int = 32, hidden: int = 48) -> tuple[GatedFFN, object]:
    name, kwargs, ref_act = FFN_ACTIVATIONS[activation_id]
    torch.manual_seed(0)
    ffn = GatedFFN(dim, hidden, name, impl=impl, **kwargs)
    with torch.no_grad():  # large enough weights that gates cross the clip limits and f_m's maximum
        for lin in (ffn.w_gate, ffn.w_up):
            lin.weight.mul_(6.0)
    return ffn, ref_act


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("activation_id", list(FFN_ACTIVATIONS))
def test_gated_ffn_probe_points_and_activation(activation_id: str, impl: str, dtype: torch.dtype, eager_kernels) -> None:
    """Forward hooks on the probe points see W_gate x, W_up x and act(gate, up); the output is
    W_down(down_input); and the activation (forward and backward) matches its float64 reference
    on exactly the tensors the hooks saw."""
    ffn, ref_act = _ffn(activation_id, impl)
    ffn.to(dtype)
    seen: dict[str, Tensor] = {}
    for probe in ("gate_out", "up_out", "down_input"):
        getattr(ffn, probe).register_forward_hook(lambda mod, inp, out, probe=probe: seen.__setitem__(probe, out))
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(1)).to(dtype)
    out = ffn(x)
    assert out.shape == x.shape and out.dtype == dtype
    torch.testing.assert_close(seen["gate_out"], F.linear(x, ffn.w_gate.weight), rtol=0, atol=0)
    torch.testing.assert_close(seen["up_out"], F.linear(x, ffn.w_up.weight), rtol=0, atol=0)
    torch.testing.assert_close(out, F.linear(seen["down_input"], ffn.w_down.weight), rtol=0, atol=0)
    # The activation itself, forward and backward, vs float64 on the probed gate/up.
    gate = seen["gate_out"].detach().requires_grad_(True)
    up = seen["up_out"].detach().requires_grad_(True)
    act_out = ffn.act(gate, up)
    grad_out = torch.randn(act_out.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    act_out.backward(grad_out)
    ref = reference_outputs(ref_act, {"gate": gate, "up": up}, grad_out)
    assert_matches_reference(seen["down_input"].detach(), ref.out, ref.out_scale, f"{activation_id} down_input")
    assert_matches_reference(gate.grad, ref.grads["gate"], ref.grad_scales["gate"], f"{activation_id} d/dgate")
    assert_matches_reference(up.grad, ref.grads["up"], ref.grad_scales["up"], f"{activation_id} d/dup")


@pytest.mark.parametrize("activation_id", list(FFN_ACTIVATIONS))
def test_gated_ffn_end_to_end_gradients(activation_id: str, eager_kernels) -> None:
    """Every weight's gradient through the whole FFN, fused and reference, vs a float64 FFN.

    Tolerance: fp32 matmuls sum 32–48 products, so their error is relative to the sum of |terms|
    (≈ the tensor's scale), not to each element: rtol 1e-4 with atol 1e-4·max|ref|."""
    x = torch.randn(4, 6, 32, generator=torch.Generator().manual_seed(3))
    grad_out = torch.randn(4, 6, 32, generator=torch.Generator().manual_seed(4))
    results = {}
    for impl in IMPLS:
        ffn, ref_act = _ffn(activation_id, impl)
        leaf = x.clone().requires_grad_(True)
        ffn(leaf).backward(grad_out)
        results[impl] = {"x": leaf.grad, **{n: p.grad for n, p in ffn.named_parameters()}}
    w = {n: p.detach().to(F64).requires_grad_(True) for n, p in ffn.named_parameters()}
    x64 = x.to(F64).requires_grad_(True)
    out64 = F.linear(ref_act(F.linear(x64, w["w_gate.weight"]), F.linear(x64, w["w_up.weight"])), w["w_down.weight"])
    out64.backward(grad_out.to(F64))
    expected = {"x": x64.grad, **{n: t.grad for n, t in w.items()}}
    for impl, grads in results.items():
        for n, g in grads.items():
            torch.testing.assert_close(
                g.to(F64), expected[n], rtol=1e-4, atol=1e-4 * expected[n].abs().max().item(),
                msg=lambda m, impl=impl, n=n: f"{activation_id} impl={impl} d/d{n}: {m}",
            )


def test_gated_ffn_default_is_powlu_m3_fused() -> None:
    ffn = GatedFFN(8, 16)
    assert ffn.act.name == "powlu" and ffn.act.impl == "fused" and ffn.act.kwargs == {"m": 3.0}


def test_compiled_default_path_matches_reference() -> None:
    """The default (compiled) fused path, end to end, for one module (compiling costs ~10 s each)."""
    if not kernels.compile_enabled():
        pytest.skip("STEADYLM_COMPILE_KERNELS=0 in this environment")
    x, grad_out = _norm_inputs((3, 7, 257), FP32, seed=5)
    check_norm_module(_build("rmsnorm", 257, "fused"), "rmsnorm", x, grad_out)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [FP32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(NORM_MODULES))
def test_compiled_norm_modules_match_float64_reference(name: str, dtype: torch.dtype) -> None:
    x, grad_out = _norm_inputs((3, 7, 257), dtype, seed=6)
    check_norm_module(_build(name, 257, "fused"), name, x, grad_out)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [FP32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("activation_id", list(FFN_ACTIVATIONS))
def test_compiled_gated_ffn_matches_float64_reference(activation_id: str, dtype: torch.dtype) -> None:
    ffn, ref_act = _ffn(activation_id, "fused")
    ffn.to(dtype)
    gate = (torch.randn(3, 5, 48, generator=torch.Generator().manual_seed(7)) * 4).to(dtype).requires_grad_(True)
    up = (torch.randn(3, 5, 48, generator=torch.Generator().manual_seed(8)) * 4).to(dtype).requires_grad_(True)
    out = ffn.act(gate, up)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(dtype)
    out.backward(grad_out)
    ref = reference_outputs(ref_act, {"gate": gate, "up": up}, grad_out)
    assert_matches_reference(out, ref.out, ref.out_scale, f"{activation_id} compiled output")
    assert_matches_reference(gate.grad, ref.grads["gate"], ref.grad_scales["gate"], f"{activation_id} compiled d/dgate")
    assert_matches_reference(up.grad, ref.grads["up"], ref.grad_scales["up"], f"{activation_id} compiled d/dup")


# ----------------------------------------------------------------------------------------------
# saturation
# ----------------------------------------------------------------------------------------------


def test_dyt_saturation_is_fraction_of_tanh_beyond_095() -> None:
    norm = DyT(100, alpha_init=0.5)
    x = torch.linspace(-10, 10, 100).expand(3, 100).clone()  # |0.5·x| > atanh(0.95) ≈ 1.832 ⇔ |x| > 3.664
    sat = norm.saturation(x)
    assert sat.dim() == 0
    expected = (torch.tanh(0.5 * x.double()).abs() > 0.95).double().mean().item()
    assert sat.item() == pytest.approx(expected) and 0.5 < expected < 0.8


def test_bhyt_saturation_uses_the_site_argument_and_variance() -> None:
    norm = BHyT(64, lam_init=20.0)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(10))
    one = torch.ones(64, dtype=F64)
    lam = torch.tensor(20.0, dtype=F64)

    def expected(variance: Tensor | None) -> float:
        t = ref_bhyt(x.double(), one, lam, 10.0, 1e-6, None if variance is None else variance.double())
        return (t.abs() > 0.95).double().mean().item()

    assert norm.saturation(x).item() == pytest.approx(expected(None))
    small_v = functional.mean_square(x) * 0.05  # a smaller handed variance saturates more
    assert norm.saturation(x, small_v).item() == pytest.approx(expected(small_v))
    assert norm.saturation(x, small_v).item() > norm.saturation(x).item()
    assert BHyT(64).saturation(x).item() == 0.0  # λ/κ = 0.1: the linear regime never saturates


# ----------------------------------------------------------------------------------------------
# registries and errors
# ----------------------------------------------------------------------------------------------


def test_registries_name_the_spec_components() -> None:
    assert {"swiglu", "powlu", "swiglu_clip"} <= set(ACTIVATIONS)
    assert {"rmsnorm": RMSNorm, "layernorm": LayerNorm, "dyt": DyT, "bhyt": BHyT}.items() <= NORMS.items()
    assert NORMS["bhyt_star"] is BHyT


@pytest.mark.parametrize("name", ["rmsnorm", "layernorm", "dyt", "bhyt", "bhyt_star"])
def test_build_norm_builds_the_registered_class(name: str) -> None:
    module = build_norm(name, 12, impl="reference")
    assert type(module) is NORMS[name] and module.weight.shape == (12,) and module.impl == "reference"
    assert build_norm(name, 12).impl == "fused"


def test_build_norm_passes_keyword_arguments() -> None:
    assert build_norm("rmsnorm", 8, eps=1e-5).eps == 1e-5
    assert build_norm("bhyt", 8, lam_init=2.0, kappa=5.0).kappa == 5.0
    assert build_norm("dyt", 8, alpha_init=0.2).alpha.item() == pytest.approx(0.2)


@pytest.mark.parametrize("impl", IMPLS)
def test_get_activation_binds_keyword_arguments(impl: str, eager_kernels) -> None:
    gate, up = torch.randn(4, 9) * 4, torch.randn(4, 9) * 4
    act = get_activation("powlu", impl, m=2.0)
    torch.testing.assert_close(act(gate, up), functional.powlu_glu(gate, up, 2.0), rtol=3e-5, atol=1e-6)
    step = get_activation("swiglu_clip", impl, limit=1.5, variant="step")
    torch.testing.assert_close(step(gate, up), functional.swiglu_clip(gate, up, 1.5, "step"), rtol=3e-5, atol=1e-6)


def _lists_all(message: str, names) -> bool:
    return all(re.search(rf"\b{re.escape(n)}\b", message) for n in names)


@pytest.mark.parametrize(
    "call,known",
    [
        pytest.param(lambda: get_activation("gelu"), lambda: ACTIVATIONS, id="get_activation"),
        pytest.param(lambda: GatedFFN(8, 16, activation="relu2"), lambda: ACTIVATIONS, id="GatedFFN"),
        pytest.param(lambda: build_norm("batchnorm", 8), lambda: NORMS, id="build_norm"),
        pytest.param(lambda: RMSNorm(8, impl="triton"), lambda: ("fused", "reference"), id="impl"),
        pytest.param(lambda: GatedFFN(8, 16, impl="cuda"), lambda: ("fused", "reference"), id="ffn-impl"),
    ],
)
def test_unknown_name_lists_the_known_ones(call, known) -> None:
    with pytest.raises(ValueError) as info:
        call()
    assert isinstance(info.value, ConfigError)
    assert _lists_all(str(info.value), known()), str(info.value)


@pytest.mark.parametrize(
    "call,name",
    [
        pytest.param(lambda: GatedFFN(8, 16, "powlu", m=12.0), "m", id="powlu-m"),
        pytest.param(lambda: GatedFFN(8, 16, "powlu", m=0.0), "m", id="powlu-m0"),
        pytest.param(lambda: GatedFFN(8, 16, "swiglu_clip", limit=0.0), "limit", id="clip-limit"),
        pytest.param(lambda: GatedFFN(8, 16, "swiglu_clip", variant="soft"), "variant", id="clip-variant"),
        pytest.param(lambda: GatedFFN(8, 16, "swiglu", m=3.0), "m", id="swiglu-unknown-kwarg"),
        pytest.param(lambda: BHyT(8, kappa=0.0), "kappa", id="bhyt-kappa"),
        pytest.param(lambda: RMSNorm(8, eps=-1e-6), "eps", id="rms-eps"),
        pytest.param(lambda: LayerNorm(8, eps=-1.0), "eps", id="ln-eps"),
        pytest.param(lambda: BHyT(8, eps=-1e-6), "eps", id="bhyt-eps"),
        pytest.param(lambda: RMSNorm(0), "dim", id="dim"),
        pytest.param(lambda: GatedFFN(8, 0), "hidden", id="hidden"),
    ],
)
def test_invalid_module_arguments_raise_at_construction(call, name: str) -> None:
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        call()
