"""The small-row matmul pass (steadylm.kernels.small_mm): what it rewrites, that the rewritten
product is a matmul (against float64, fp32 and bf16, with and without a bias), that broken
rewrites are caught, and that a compiled decode step runs through it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from steadylm.kernels import small_mm
from steadylm.kernels.small_mm import SmallRowMatmulPass
from steadylm.models import ModelConfig, build_model

@pytest.fixture(autouse=True)
def _compile_afresh():
    """Counting rewrites needs the pass to run: no graph served from Inductor's on-disk caches, and
    no earlier test's entries for the same code object in Dynamo's cache (nor its recompile limit)."""
    torch._dynamo.reset()
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(
        enable_autograd_cache=False
    ):
        yield


U32 = 2.0**-24
U16 = 2.0**-8  # bf16 unit roundoff


def _compiled_linear(pass_: SmallRowMatmulPass):
    # A fresh function per call, so each test compiles its own graph with its own pass.
    def linear(x, w, b):
        return F.linear(x, w, b)

    return torch.compile(linear, fullgraph=True, dynamic=False, options={"post_grad_custom_post_pass": pass_})


def _operands(rows: int, k: int, n: int, dtype: torch.dtype, bias: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return x, w, b


def _bound(x, w, b, dtype):
    """|error| allowed per output: fp32 sums of k products in any order, (k + 1)·u32·Σ|x||w| (the
    standard worst case for a recursive or blocked sum), plus one rounding of the result to the
    output dtype (and of the bias add)."""
    k = x.shape[1]
    magnitude = x.double().abs() @ w.double().abs().T
    if b is not None:
        magnitude = magnitude + b.double().abs()
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())
    rounding = 0.0 if dtype == torch.float32 else U16 * exact.abs()
    return exact, (k + 2) * U32 * magnitude + rounding


def _check(pass_: SmallRowMatmulPass, rows: int, k: int, n: int, dtype: torch.dtype, bias: bool) -> None:
    x, w, b = _operands(rows, k, n, dtype, bias)
    out = _compiled_linear(pass_)(x, w, b)
    assert out.dtype == dtype and out.shape == (rows, n)
    exact, bound = _bound(x, w, b, dtype)
    error = (out.double() - exact).abs()
    assert bool((error <= bound).all()), f"max error / bound {float((error / bound).max()):.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bias", [False, True], ids=["mm", "addmm"])
@pytest.mark.parametrize("rows", [1, 16])  # one row (batch-1 decoding) and the limit
def test_rewritten_matmul_is_a_matmul(rows, bias, dtype):
    pass_ = SmallRowMatmulPass()
    _check(pass_, rows, 70, 37, dtype, bias)  # odd sizes: no vector-width multiple
    assert pass_.rewritten == 1


def test_more_rows_than_the_limit_are_left_to_blas():
    pass_ = SmallRowMatmulPass(max_rows=4)
    _check(pass_, 5, 32, 8, torch.float32, bias=False)
    assert pass_.rewritten == 0
    _check(pass_, 4, 32, 8, torch.float32, bias=False)
    assert pass_.rewritten == 1


def test_extreme_values_stay_finite_and_accurate():
    """Large and tiny magnitudes in one product: the fp32 reduction neither overflows early nor
    loses the small terms beyond the summation bound."""
    pass_ = SmallRowMatmulPass()
    x, w, b = _operands(2, 64, 16, torch.float32, bias=True)
    x[0, :8] *= 1e18
    x[1, 8:] *= 1e-20
    out = _compiled_linear(pass_)(x, w, b)
    exact, bound = _bound(x, w, b, torch.float32)
    assert torch.isfinite(out).all()
    assert bool(((out.double() - exact).abs() <= bound).all())


def test_max_rows_is_validated():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_rows"):
            SmallRowMatmulPass(bad)


class _DropsBias(SmallRowMatmulPass):
    def __call__(self, graph):
        for node in graph.nodes:
            if node.target is torch.ops.aten.addmm.default:
                node.target = torch.ops.aten.mm.default
                node.args = node.args[1:]
        super().__call__(graph)


class _TransposedWeight(SmallRowMatmulPass):
    """Multiplies by the weight read the wrong way round (a layout mistake)."""

    def __call__(self, graph):
        for node in list(graph.nodes):
            if node.target in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
                b = node.args[-1]
                with graph.inserting_before(node):
                    transposed = graph.call_function(torch.ops.aten.permute.default, (b, [1, 0]))
                    with b.meta["val"].fake_mode:
                        transposed.meta["val"] = torch.ops.aten.permute.default(b.meta["val"], [1, 0])
                node.args = (*node.args[:-1], transposed)
        super().__call__(graph)


@pytest.mark.parametrize("mutant", [_DropsBias, _TransposedWeight])
def test_broken_rewrites_are_rejected(mutant):
    with pytest.raises(AssertionError):
        _check(mutant(), 3, 24, 24, torch.float32, bias=True)


def test_compiled_decode_step_uses_the_pass(monkeypatch):
    """The CPU decode step is compiled with the pass, it rewrites the step's matmuls (4 projections
    + 3 FFN + LM head per layer pair here), and greedy tokens equal the eager loop's."""
    used: list[SmallRowMatmulPass] = []

    def options(device):
        opts = small_mm.decode_compile_options(device)
        used.append(opts["post_grad_custom_post_pass"])
        return opts

    monkeypatch.setattr("steadylm.models.generate.decode_compile_options", options)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=24)
    model = build_model(cfg)
    prompt = torch.randint(0, 64, (3, 5), generator=torch.Generator().manual_seed(1))
    eager, eager_logits = model.generate(prompt, 6, temperature=0.0, return_logits=True, decode="eager")
    compiled, compiled_logits = model.generate(prompt, 6, temperature=0.0, return_logits=True)
    assert len(used) == 1 and used[0].rewritten == 2 * 7 + 1
    assert torch.equal(compiled, eager)
    # fp32 sums in another order than the eager loop's BLAS calls (as test_generate's bound).
    torch.testing.assert_close(compiled_logits, eager_logits, rtol=1e-5, atol=1e-5)


def test_no_pass_off_cpu():
    assert small_mm.decode_compile_options(torch.device("meta")) is None
