"""The BHyT block's fused first site, ``kernels.bhyt_and_mean_square`` (output and statistic v from
one op, one backward pass that also carries the gradient reaching v), against the float64 reference
composition ``v = functional.mean_square(x); functional.bhyt(x, …, variance=v)``.

Tolerances (per element: ``rtol·|ref| + atol·scale``), derived as in tests/test_kernels.py:

* the output and the fp32 statistic v: fp32 math with a dozen roundings of ≤ 6e-8 each plus a row
  sum of ≤ 257 squares: rtol = atol = 1e-5 (FP32); bf16 outputs are rounded once at the end
  (≤ 2^-9 relative): rtol = 2^-8 (BF16), v stays fp32 (FP32).
* dx = c·r·h + dv_total·2x/d is a sum of two terms of either sign, and dv_total = dv − ½·c·r³·Σh·x
  is itself a row sum; each piece carries fp32-level relative error of *its own* magnitude, so the
  error is bounded relative to |c·r·h| + (|dv| + ½·c·r³·Σ|h·x|)·2|x|/d (float64, from the
  reference), not to the possibly cancelling result.
* γ and λ gradients are fp32 sums (over tokens, resp. over every element) of terms of either sign;
  a sum's rounding error is relative to the sum of the terms' magnitudes, not to the (possibly
  cancelled) result: FP32 with scale Σ|d·t| per column for γ and Σ|h·x̂|/κ for λ (float64).
"""

from __future__ import annotations

import zlib

import pytest
import torch

from steadylm import functional as F
from steadylm import kernels as K

FP32 = (1e-5, 1e-5)
BF16 = (2.0**-8, 1e-5)
KAPPA, EPS = 10.0, 1e-6


@pytest.fixture
def eager_kernels():
    previous = K.compile_enabled()
    K.set_compile(False)
    yield
    K.set_compile(previous)


def _close(actual: torch.Tensor, expected: torch.Tensor, tol: tuple[float, float], what: str, scale=None) -> None:
    """|actual − expected| ≤ rtol·|expected| + atol·scale (scale: max |expected| or given per element)."""
    assert actual.shape == expected.shape, what
    a, e = actual.double(), expected.double()
    rtol, atol = tol
    if scale is None:
        scale = e.abs().max()
    allowed = rtol * e.abs() + atol * scale
    err = (a - e).abs()
    bad = ~(err <= allowed)
    assert not bad.any(), f"{what}: {int(bad.sum())} elements off, worst {err[bad].max().item():.3e}"


def _reference(x, w, lam, dy, dv):
    """The reference composition on float64 leaves; returns (out, v, dx, dγ, dλ)."""
    x64 = x.detach().double().requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True) if w is not None else None
    lam64 = lam.detach().double().requires_grad_(True)
    v = F.mean_square(x64)
    out = F.bhyt(x64, w64, lam64, KAPPA, EPS, variance=v)
    ((out * dy.double()).sum() + (v * dv.double()).sum()).backward()
    return out.detach(), v.detach(), x64.grad, (w64.grad if w64 is not None else None), lam64.grad, x64, v


def _dx_scale(x64: torch.Tensor, v: torch.Tensor, w, lam, dy, dv) -> torch.Tensor:
    """|c·r·h| + |dv_total·2x/d| per element, in float64 (see the module docstring)."""
    x = x64.detach()
    c = lam.double() / KAPPA
    r = torch.rsqrt(v + EPS)
    arg = c * x * r
    g = dy.double() * (w.double() if w is not None else 1.0)
    h = g * (1.0 - torch.tanh(arg) ** 2)
    # dv_total = dv − ½·c·r³·Σ h·x is itself a cancelling sum: its error scales with the magnitudes.
    dv_magnitude = dv.double().abs() + 0.5 * c * r**3 * (h * x).abs().sum(-1, keepdim=True)
    return (c * r * h).abs() + dv_magnitude * 2.0 * x.abs() / x.shape[-1]


def _param_grad_scales(x64: torch.Tensor, v: torch.Tensor, w, lam, dy) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_tokens |dy·t| per column (γ) and Σ |h·x̂|/κ (λ), in float64 (see the module docstring)."""
    x = x64.detach().reshape(-1, x64.shape[-1])
    d = dy.double().reshape(x.shape)
    r = torch.rsqrt(v.reshape(-1, 1) + EPS)
    arg = (lam.double() / KAPPA) * x * r
    t = torch.tanh(arg)
    h = d * (w.double() if w is not None else 1.0) * (1.0 - t**2)
    return (d * t).abs().sum(0), (h * x * r).abs().sum() / KAPPA


def _run_fused(x, w, lam, dy, dv, device):
    xk = x.to(device).requires_grad_(True)
    wk = w.to(device).requires_grad_(True) if w is not None else None
    lk = lam.to(device).requires_grad_(True)
    out, v = K.bhyt_and_mean_square(xk, wk, lk, KAPPA, EPS)
    ((out * dy.to(device, out.dtype)).sum() + (v * dv.to(device)).sum()).backward()
    return out.detach().cpu(), v.detach().cpu(), xk.grad.cpu(), (wk.grad.cpu() if wk is not None else None), lk.grad.cpu()


def _inputs(shape, dtype, seed, has_weight=True):
    gen = torch.Generator().manual_seed(seed)
    x = (2.0 * torch.randn(shape, generator=gen)).to(dtype)
    w = 1.0 + 0.2 * torch.randn(shape[-1], generator=gen) if has_weight else None
    lam = torch.tensor(2.0)
    dy = torch.randn(shape, generator=gen).to(dtype)
    dv = 0.3 * torch.randn(shape[:-1] + (1,), generator=gen)  # what the second site sends into v
    return x, w, lam, dy, dv


def _check(x, w, lam, dy, dv, dtype, device):
    tol = FP32 if dtype == torch.float32 else BF16
    out, v, dx, dw, dl = _run_fused(x, w, lam, dy, dv, device)
    ref_out, ref_v, ref_dx, ref_dw, ref_dl, x64, v64 = _reference(x, w, lam, dy, dv)
    assert out.dtype == dtype and v.dtype == torch.float32 and dx.dtype == dtype
    _close(out, ref_out, tol, "output")
    _close(v, ref_v, FP32, "v")
    _close(dx, ref_dx, tol, "dx", scale=_dx_scale(x64, v64, w, lam, dy, dv))
    w_scale, lam_scale = _param_grad_scales(x64, v64, w, lam, dy)
    if w is not None:
        _close(dw, ref_dw, FP32, "dγ", scale=w_scale)
    _close(dl, ref_dl.reshape(dl.shape), FP32, "dλ", scale=lam_scale)


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 7, 257), (2, 5, 64)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("has_weight", [True, False], ids=["weight", "no_weight"])
def test_forward_and_backward_incl_the_v_path_match_float64(shape, dtype, has_weight, device, eager_kernels):
    seed = zlib.crc32(repr((shape, str(dtype), has_weight)).encode())  # stable across processes
    _check(*_inputs(shape, dtype, seed, has_weight), dtype, device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_extreme_rows_match_float64_and_overflow_rows_are_zero_not_nan(dtype, device, eager_kernels):
    """Rows of ±1e4, zeros, subnormals and huge-but-representable values against float64; rows whose
    mean square overflows fp32 (bf16-max magnitudes) behave as the reference composition does in the
    input dtype: v = inf, output 0, and every gradient finite (0 through the site and v)."""
    d = 64
    gen = torch.Generator().manual_seed(5)
    ordinary = torch.randn(4, d, generator=gen)
    rows = torch.stack(
        [
            torch.where(torch.rand(d, generator=gen) < 0.5, -1e4, 1e4),
            torch.zeros(d),
            ordinary[0] * (torch.finfo(torch.float32).tiny / 64),  # subnormal
            ordinary[1] * 3e18,  # Σx² overflows fp32, mean(x²) does not
            torch.cat([torch.zeros(d // 2), ordinary[2, : d // 2]]),
        ]
    ).to(dtype)
    _, w, lam, _, _ = _inputs((5, d), dtype, 11)
    dy = torch.randn(5, d, generator=gen).to(dtype)
    dv = 0.3 * torch.randn(5, 1, generator=gen)
    _check(rows, w, lam, dy, dv, dtype, device)

    big = (torch.full((2, d), torch.finfo(torch.bfloat16).max) * torch.sign(ordinary[3])).to(dtype)
    out, v, dx, dw, dl = _run_fused(big, w, lam, dy[:2], torch.zeros(2, 1), device)
    assert torch.isinf(v).all() and (out == 0).all()
    assert torch.isfinite(dx).all() and (dx == 0).all() and torch.isfinite(dw).all() and torch.isfinite(dl).all()


def test_float64_gradcheck_of_both_outputs(eager_kernels):
    """float64 math end to end (torch.tanh, exact sech²): gradcheck of output and v w.r.t. x, γ, λ."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 2, 9, generator=gen, dtype=torch.float64, requires_grad=True)
    w = (1.0 + 0.2 * torch.randn(9, generator=gen, dtype=torch.float64)).requires_grad_(True)
    lam = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: K.bhyt_and_mean_square(a, b, c, KAPPA, EPS), (x, w, lam))


def test_compiled_kernels_match_float64(device):
    """The same op with its kernels compiled by Inductor (one shape: one compile per pass)."""
    assert K.compile_enabled()
    _check(*_inputs((3, 7, 64), torch.float32, 17), torch.float32, device)


def _tiny_bhyt_model(impl: str, exact: bool = False):
    from steadylm.models import ModelConfig, build_model

    cfg = ModelConfig(
        vocab_size=64, dim=32, n_layers=2, n_heads=2, n_kv_heads=2, ffn_dim=48, max_seq_len=16,
        norm="bhyt_star" if exact else "bhyt", impl=impl,
    )  # fmt: skip
    torch.manual_seed(0)
    return build_model(cfg)


def test_fused_block_takes_its_statistic_from_the_one_op(eager_kernels, monkeypatch):
    """In the fused block form the first site's op produces v: the reference statistic is never
    called, and the fused op runs once per block, forward and backward."""
    from steadylm.kernels import library

    model = _tiny_bhyt_model("fused")
    calls = {"fwd": 0, "bwd": 0}
    fwd, bwd = library.OPS["bhyt_and_mean_square"]

    def no_reference(*args, **kwargs):
        raise AssertionError("functional.mean_square called in the fused block form")

    monkeypatch.setattr(F, "mean_square", no_reference)
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.steadylm.bhyt_and_mean_square.default:
                calls["fwd"] += 1
            if func is torch.ops.steadylm.bhyt_and_mean_square_backward.default:
                calls["bwd"] += 1
            return func(*args, **(kwargs or {}))

    seen = []  # forward hooks (probes, profiler labels) must still see both sites of every block
    for block in model.layers:
        for site in block.bhyt_sites:
            site.register_forward_hook(lambda mod, args, out: seen.append(mod))
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with Count():
        model(tokens).float().square().mean().backward()
    assert calls == {"fwd": 2, "bwd": 2}, calls
    assert fwd is not None and bwd is not None
    assert len(seen) == 4 and len({id(m) for m in seen}) == 4


def test_fused_block_model_equals_the_reference_block_model(eager_kernels):
    """A 2-layer BHyT model: fused and reference impls (same weights) give the same loss and
    gradients. Both fp32; the reference is its own fp32 math (amax rescale, torch.tanh), so the
    allowance is the two fp32 computations' combined error through 2 layers of matmuls: relative
    1e-4 on the loss and each gradient tensor's largest element (measured ~1e-6)."""
    fused, ref = _tiny_bhyt_model("fused"), _tiny_bhyt_model("reference")
    ref.load_state_dict(fused.state_dict())
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    losses = []
    for model in (fused, ref):
        logits = model(tokens)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten())
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=0.0)
    for (name, p_f), p_r in zip(fused.named_parameters(), ref.parameters()):
        scale = p_r.grad.abs().max().item()
        assert (p_f.grad - p_r.grad).abs().max().item() <= 1e-4 * scale + 1e-12, name
