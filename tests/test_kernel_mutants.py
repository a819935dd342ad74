"""Mutation test of the kernel checks: deliberately broken fused math must be rejected.

Each mutant replaces one function of :mod:`steadylm.kernels._math` (or, for the BHyT block's
second-site shift, :meth:`steadylm.nn.BHyTPair.variance_shift`) by module attribute, so the public
ops really run it: the custom ops of :mod:`steadylm.kernels.library` look ``_math`` functions up by
name at call time, and ``_math``'s own helpers are module globals. The mutant is then judged by the
very checks of ``tests/test_kernels.py`` (:func:`check_case`, :func:`check_mean_square`,
:func:`check_powlu_huge_gates`, …), which must fail — with the failure in the result the mutant
breaks (``forward`` or ``backward d(…)``). Every mutant runs in fp32 and bf16, eager and compiled.
"Compiled" swaps in ``torch.compile(mutant)`` (Inductor's generated C++ on CPU) while the rest of
the op runs eagerly: one small graph per mutant and dtype, which keeps this file cheap (compiling
each op's whole forward and backward per mutant costs several times more), and the test asserts
that Dynamo holds compiled code for the mutant afterwards. The bf16-internal mutant cuts its
intermediates to bf16's precision with a bit mask, not with casts: Inductor computes a fused kernel's
bf16 intermediates in fp32, which would make a cast-based mutant the correct code once compiled
(``emulate_precision_casts`` kept the casts in torch 2.13, not in 2.11: measured).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from torch import Tensor, nn
from torch._dynamo.eval_frame import _debug_get_cache_entry_list

from steadylm import kernels as K
from steadylm.kernels import _math
from steadylm.nn import BHyTPair
from test_kernels import (
    CASE_BY_NAME,
    check_bhyt_and_mean_square,
    check_bhyt_second_site,
    check_case,
    check_mean_square,
    check_powlu_huge_gates,
    extreme_inputs,
    small_rows,
)

DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# --------------------------------------------------------------------------------------------
# the mutants (each built from the original function, so it tracks the current code)
# --------------------------------------------------------------------------------------------


def _bf16_precision(t: Tensor) -> Tensor:
    """fp32 ``t`` cut to bf16's 8 significant bits (truncated): what bf16 arithmetic would keep,
    written as a bit mask so that no compiler can compute it in fp32 instead."""
    return (t.view(torch.int32) & -65536).view(torch.float32)


def swiglu_bf16_internal(orig: Callable) -> Callable:
    """swiglu forward with every intermediate at bf16 precision instead of fp32."""

    def swiglu_fwd(gate: Tensor, up: Tensor) -> Tensor:
        g, u = _bf16_precision(gate.float()), _bf16_precision(up.float())
        gs = _bf16_precision(g * _bf16_precision(torch.sigmoid(g)))
        return _bf16_precision(gs * u).to(gate.dtype)

    return swiglu_fwd


def rms_norm_zero_grad_on_overflow_rows(orig: Callable) -> Callable:
    """rms_norm backward returning dx = 0 for every row whose Σx² overflows fp32."""

    def rms_norm_bwd(x: Tensor, weight: Tensor, dy: Tensor, **kw):
        dx, dw = orig(x, weight, dy, **kw)
        overflow = x.float().square().sum(-1, keepdim=True) >= _math._OVERFLOW_SUM
        return torch.where(overflow, torch.zeros_like(dx), dx), dw

    return rms_norm_bwd


def statistic_without_rescale(orig: Callable) -> Callable:
    """The per-row statistic of rms_norm / BHyT without the overflow-safe rescale (S = 1 always)."""

    def _row_scale_and_inv_rms(xc: Tensor, eps: float, allow_upscale: bool):
        inv = torch.rsqrt(xc.square().sum(dim=-1, keepdim=True) / xc.shape[-1] + eps)
        return torch.ones_like(inv), inv

    return _row_scale_and_inv_rms


def mean_square_without_rescale(orig: Callable) -> Callable:
    """mean_square forward as a plain fp32 mean(x²): overflows / underflows where the true one does not."""

    def mean_square_fwd(x: Tensor, *, allow_upscale: bool) -> Tensor:
        return x.float().square().mean(dim=-1, keepdim=True)

    return mean_square_fwd


def eps_outside_sqrt(orig: Callable) -> Callable:
    """r = 1/(sqrt(mean(x²)) + ε) instead of 1/sqrt(mean(x²) + ε) (rescale kept)."""

    def _row_scale_and_inv_rms(xc: Tensor, eps: float, allow_upscale: bool):
        scale, inv = orig(xc, 0.0, allow_upscale)  # r_S of mean((x·S)²) alone
        eps_scaled = eps * scale * scale
        return scale, 1.0 / (1.0 / inv + eps_scaled)

    return _row_scale_and_inv_rms


def powlu_one_minus_sigmoid(orig: Callable) -> Callable:
    """PowLU's d(gate) for z > 0 as SPEC's unregrouped f·(p'·ln z + p/z + 1 − σ(z)), i.e. with
    1 − σ(z) in place of σ(−z). (Swapping σ(−z) for 1 − σ(z) *inside* the regrouped form is an
    equivalent mutant within rounding: measured over z ∈ (0, 40] it moves d(gate) by at most a third
    of the derived bound — many ulps only near z ≈ 12.9, where d(gate) crosses zero and the bound
    is set by the cancelling terms — because the regrouped factor carries the sign and σ(−z) only
    adds a tail. The mutant that matters is the derivative that needs 1 − σ to be accurate: the
    unregrouped form, which the regrouping fixed.)"""

    def _powlu_gate_and_grad(g: Tensor, du: Tensor, m):
        positive = g > 0
        safe = torch.where(positive, g, torch.ones_like(g))
        s = torch.sigmoid(g)
        root = torch.sqrt(safe)
        p = m / (root + 1.0)
        dp = -m / (2.0 * root * (root + 1.0) ** 2)
        log_z = torch.log(safe)
        f_pos = torch.exp(p * log_z) * s
        grad_pos = du * f_pos * (dp * log_z + p / safe + 1.0 - s)
        f = torch.where(positive, f_pos, g * s)
        grad = torch.where(positive, grad_pos, du * (s * (1.0 + g * (1.0 - s))))
        return f, grad

    return _powlu_gate_and_grad


def gamma_grad_first_row_only(orig: Callable) -> Callable:
    """rms_norm's γ-gradient from the first token only (not reduced over rows)."""

    def rms_norm_bwd(x: Tensor, weight: Tensor, dy: Tensor, **kw):
        dx, _ = orig(x, weight, dy, **kw)
        _, dw_first = orig(x[:1], weight, dy[:1], **kw)
        return dx, dw_first

    return rms_norm_bwd


def clip_not_applied_to_up(orig: Callable) -> Callable:
    """gpt-oss SwiGLU-Clip forward without clamping ``up``."""

    def swiglu_clip_gptoss_fwd(gate: Tensor, up: Tensor, limit: float, alpha: float) -> Tensor:
        g = gate.float().clamp(max=limit)
        u = up.float()
        return (g * torch.sigmoid(alpha * g) * (u + 1.0)).to(gate.dtype)

    return swiglu_clip_gptoss_fwd


def powlu_negative_branch_sign(orig: Callable) -> Callable:
    """PowLU forward with the z ≤ 0 branch's sign flipped (−silu(z))."""

    def powlu_glu_fwd(gate: Tensor, up: Tensor, m: float) -> Tensor:
        out = orig(gate, up, m)
        return torch.where(gate > 0, out, -out)

    return powlu_glu_fwd


def powlu_negative_branch_slope_sign(orig: Callable) -> Callable:
    """PowLU's d(gate) for z ≤ 0 with the sign inside silu' flipped: σ(1 − zσ(−z))."""

    def _powlu_gate_and_grad(g: Tensor, du: Tensor, m):
        f, grad = orig(g, du, m)
        s = torch.sigmoid(g)
        return f, torch.where(g > 0, grad, du * (s * (1.0 - g * torch.sigmoid(-g))))

    return _powlu_gate_and_grad


def sech2_as_one_minus_tanh2(orig: Callable) -> Callable:
    """The tanh norms' sech² as 1 − tanh² (cancels near saturation)."""

    def _sech2(a: Tensor) -> Tensor:
        t = _math._tanh(a)
        return 1.0 - t * t

    return _sech2


def bhyt_dx_without_statistic_term(orig: Callable) -> Callable:
    """BHyT* backward without the gradient through mean(x²): dx = c·r·h."""

    def bhyt_bwd(x: Tensor, weight: Tensor, lam: Tensor, variance: Tensor, dy: Tensor, **kw):
        dx, dw, dl, dv = orig(x, weight, lam, variance, dy, **kw)
        if kw["use_variance"]:
            return dx, dw, dl, dv
        xc, d = x.float(), dy.float()
        c = lam.float() / kw["kappa"]
        scale, inv = _math._row_scale_and_inv_rms(xc, kw["eps"], kw["allow_upscale"])
        x_hat = (xc * scale) * inv
        g = d * weight.float() if kw["has_weight"] else d
        h = g * _math._sech2(c * x_hat)
        return (((h * c) * scale) * inv).to(x.dtype), dw, dl, dv

    return bhyt_bwd


def mean_square_grad_without_2(orig: Callable) -> Callable:
    """mean_square backward as dv·x/d (the factor 2 of d(x²) dropped)."""

    def mean_square_bwd(x: Tensor, dv: Tensor) -> Tensor:
        return (dv.float() * x.float() / x.shape[-1]).to(x.dtype)

    return mean_square_bwd


def block_statistic_drops_dv(orig: Callable) -> Callable:
    """The fused BHyT block statistic's backward ignoring the gradient that reaches v from the
    second site (dv)."""

    def bhyt_ms_bwd(x: Tensor, weight: Tensor, lam: Tensor, dy: Tensor, dv: Tensor, **kw):
        return orig(x, weight, lam, dy, torch.zeros_like(dv), **kw)

    return bhyt_ms_bwd


def shift_with_lambda_not_squared(orig: Callable) -> Callable:
    """The BHyT second-site shift c·λ₁/κ² instead of c·λ₁²/κ²."""

    def variance_shift(self: BHyTPair) -> Tensor:
        lam = self.bhyt_sites[0].lam.detach().float()
        return self.bhyt_correction.float() * lam / (self.bhyt_kappa * self.bhyt_kappa)

    return variance_shift


# --------------------------------------------------------------------------------------------
# which check each mutant must fail
# --------------------------------------------------------------------------------------------


def _case_check(name: str, inputs: str = "ordinary") -> Callable[[torch.dtype], None]:
    """The kernel check of test_kernels on case ``name``: ordinary, extreme or small-row inputs."""

    def run(dtype: torch.dtype) -> None:
        case = CASE_BY_NAME[name]
        gen = torch.Generator().manual_seed(101)
        if inputs == "ordinary":
            acts, params = case.make((4, 33), dtype, gen)
        elif inputs == "extreme":
            acts, params = extreme_inputs(case, dtype, gen)
        else:
            acts, params = small_rows(case, dtype, gen)
        check_case(case, acts, params, dtype)

    return run


@dataclass
class Mutant:
    name: str
    owner: object  # the module (or class) whose attribute is replaced
    attribute: str
    make: Callable[[Callable], Callable]
    check: Callable[[torch.dtype], None]
    breaks: str  # the result the check must name in its failure: "forward" / "backward d(...)" / ...


MUTANTS = [
    Mutant("swiglu_bf16_internal", _math, "swiglu_fwd", swiglu_bf16_internal, _case_check("swiglu"), "forward"),
    Mutant("rms_norm_zero_grad_overflow_rows", _math, "rms_norm_bwd", rms_norm_zero_grad_on_overflow_rows,
           _case_check("rms_norm", "extreme"), "backward d(input 0)"),
    Mutant("norm_statistic_no_rescale", _math, "_row_scale_and_inv_rms", statistic_without_rescale,
           _case_check("rms_norm", "extreme"), "forward"),
    Mutant("mean_square_no_rescale", _math, "mean_square_fwd", mean_square_without_rescale,
           lambda dt: check_mean_square(dt, "cpu", torch.Generator().manual_seed(5), which=("extreme",)),
           "mean_square forward"),
    Mutant("eps_outside_sqrt", _math, "_row_scale_and_inv_rms", eps_outside_sqrt,
           _case_check("rms_norm", "small"), "forward"),
    Mutant("powlu_one_minus_sigmoid", _math, "_powlu_gate_and_grad", powlu_one_minus_sigmoid,
           lambda dt: check_powlu_huge_gates(3.0, "cpu", dt), "powlu d(gate)"),
    Mutant("gamma_grad_not_reduced_over_rows", _math, "rms_norm_bwd", gamma_grad_first_row_only,
           _case_check("rms_norm"), "backward d(param 0)"),
    Mutant("clip_not_applied_to_up", _math, "swiglu_clip_gptoss_fwd", clip_not_applied_to_up,
           _case_check("swiglu_clip_gptoss"), "forward"),
    Mutant("bhyt_shift_lambda_not_squared", BHyTPair, "variance_shift", shift_with_lambda_not_squared,
           lambda dt: check_bhyt_second_site(dt), "second-site variance"),
    Mutant("powlu_negative_branch_sign", _math, "powlu_glu_fwd", powlu_negative_branch_sign,
           _case_check("powlu_glu"), "forward"),
    Mutant("powlu_negative_slope_sign", _math, "_powlu_gate_and_grad", powlu_negative_branch_slope_sign,
           _case_check("powlu_glu"), "backward d(input 0)"),
    Mutant("sech2_as_one_minus_tanh2", _math, "_sech2", sech2_as_one_minus_tanh2, _case_check("dyt_saturating"),
           "backward d(input 0)"),
    Mutant("bhyt_dx_without_statistic_term", _math, "bhyt_bwd", bhyt_dx_without_statistic_term,
           _case_check("bhyt"), "backward d(input 0)"),
    Mutant("mean_square_grad_without_2", _math, "mean_square_bwd", mean_square_grad_without_2,
           lambda dt: check_mean_square(dt, "cpu", torch.Generator().manual_seed(5), which=("ordinary",)),
           "mean_square backward"),
    Mutant("block_statistic_drops_dv", _math, "bhyt_ms_bwd", block_statistic_drops_dv,
           lambda dt: check_bhyt_and_mean_square(dt, "cpu", torch.Generator().manual_seed(5), which=("ordinary",)),
           "backward d(input 0)"),
]  # fmt: skip


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.name for m in MUTANTS])
def test_kernel_checks_reject_the_mutant(mutant, dtype, compiled, monkeypatch):
    # The checks pass on the real code (test_kernels.py runs them); here the same check must fail.
    broken = raw = mutant.make(getattr(mutant.owner, mutant.attribute))
    if compiled:
        broken = torch.compile(broken)
    monkeypatch.setattr(mutant.owner, mutant.attribute, broken)
    previous = K.compile_enabled()
    K.set_compile(False)  # the rest of the op eagerly: only the mutant is (or is not) compiled
    try:
        with pytest.raises(AssertionError) as caught:
            mutant.check(dtype)
    finally:
        K.set_compile(previous)
    assert mutant.breaks in str(caught.value).splitlines()[0], str(caught.value)
    if compiled:
        # Dynamo holds compiled code for the mutant (compiled here, or for the other dtype when the
        # mutant's own inputs are fp32 either way, e.g. _sech2's argument).
        assert _debug_get_cache_entry_list(raw.__code__), "the mutant was not compiled"
