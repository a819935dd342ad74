"""The fused ops as torch.library custom ops (steadylm.kernels.library) and inside compiled models.

* ``torch.library.opcheck`` on every forward and backward op: schema, fake (shape) function,
  autograd registration and AOT dispatch agree (cheap shapes, kernels run eagerly);
* a compiled dense and a compiled MoE model (tiny) trace with 0 graph breaks, their forward and
  backward graphs contain the fused custom ops (policy "opaque") or none of them (policy "inline":
  traced through), and the compiled training step gives the eager step's loss and gradients.

Compiled == eager tolerance: opaque, the custom ops run the same kernels in both; inline, the same
``_math`` functions run as traced ATen ops (eager runs them uncompiled here, so the same ops in the
same order). Only the code around them is re-derived by the backend, and with ``aot_eager`` that is
the same ATen ops too, so the results agree to a few fp32 roundings: rtol 1e-5 relative to each
tensor's largest element.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from steadylm import kernels as K
from steadylm.kernels import library, ops


@pytest.fixture
def eager_kernels():
    previous = K.compile_enabled()
    K.set_compile(False)
    yield
    K.set_compile(previous)


def _gated_args(n=13):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, generator=gen) * 3, torch.randn(n, generator=gen)


def _norm_args(tokens=5, d=7):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(tokens, d, generator=gen) * 2, 1.0 + 0.2 * torch.randn(d, generator=gen)


def _opcheck_cases():
    g, u = _gated_args()
    dy_g = torch.randn(g.shape)
    x, w = _norm_args()
    dy = torch.randn(x.shape)
    lam, alpha = torch.tensor(2.0), torch.tensor(0.6)
    var = x.square().mean(-1, keepdim=True) + 0.5
    dv = torch.randn(x.shape[0], 1)
    bias = 0.1 * torch.randn(x.shape[-1])
    none = x.new_zeros(())
    return [
        ("swiglu", library.swiglu, (g, u)),
        ("swiglu_backward", library.swiglu_backward, (g, u, dy_g)),
        ("powlu_glu", library.powlu_glu, (g, u, 3.0)),
        ("powlu_glu_backward", library.powlu_glu_backward, (g, u, dy_g, 3.0)),
        ("swiglu_clip", library.swiglu_clip, (g, u, 2.5, "gptoss", 1.702)),
        ("swiglu_clip_step", library.swiglu_clip, (g, u, 1.5, "step", 1.702)),
        ("swiglu_clip_backward", library.swiglu_clip_backward, (g, u, dy_g, 2.0, "clamp", 1.0)),
        ("rms_norm", library.rms_norm, (x, w, 1e-6, True)),
        ("rms_norm_no_weight", library.rms_norm, (x, none, 1e-6, False)),
        ("rms_norm_backward", library.rms_norm_backward, (x, w, dy, 1e-6, True, True)),
        ("mean_square", library.mean_square, (x,)),
        ("mean_square_backward", library.mean_square_backward, (x, dv)),
        ("dyt", library.dyt, (x, w, alpha, bias, True, True)),
        ("dyt_backward", library.dyt_backward, (x, w, alpha, bias, dy, True, True, True, True)),
        ("bhyt", library.bhyt, (x, w, lam, none, 10.0, 1e-6, True, False)),
        ("bhyt_variance", library.bhyt, (x, w, lam, var, 10.0, 1e-6, True, True)),
        ("bhyt_backward", library.bhyt_backward, (x, w, lam, var, dy, 10.0, 1e-6, True, True, True, True, True)),
        ("bhyt_and_mean_square", library.bhyt_and_mean_square, (x, w, lam, 10.0, 1e-6, True)),
        ("bhyt_and_mean_square_backward", library.bhyt_and_mean_square_backward,
         (x, w, lam, x.square().mean(-1, keepdim=True), dy, dv, 10.0, 1e-6, True, True, True)),  # fmt: skip
    ]


_CASES = _opcheck_cases()


@pytest.mark.parametrize("name,op,args", _CASES, ids=[c[0] for c in _CASES])
def test_opcheck(name, op, args, eager_kernels):
    differentiable = not name.endswith("_backward")
    args = tuple(
        a.clone().requires_grad_(differentiable and a.is_floating_point() and a.dim() > 0)
        if isinstance(a, torch.Tensor)
        else a
        for a in args
    )
    torch.library.opcheck(op, args)


def test_every_public_op_has_a_custom_op():
    assert set(library.OPS) == {
        "swiglu", "powlu_glu", "swiglu_clip", "rms_norm", "mean_square", "dyt", "bhyt", "bhyt_and_mean_square",
    }  # fmt: skip
    for fwd, bwd in library.OPS.values():
        assert fwd._qualname.startswith("steadylm::") and bwd._qualname == fwd._qualname + "_backward"


class _Census:
    """An aot_eager backend that records the steadylm custom ops in every forward / backward graph
    and counts the graphs Dynamo hands it (one per frame: graph breaks = graphs − 1)."""

    def __init__(self) -> None:
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        self.graphs = 0
        self.ops: dict[str, Counter] = {"forward": Counter(), "backward": Counter()}

        def recorder(kind: str):
            def compiler(gm: torch.fx.GraphModule, example_inputs):
                for node in gm.graph.nodes:
                    target = str(node.target)
                    if node.op == "call_function" and target.startswith("steadylm."):
                        self.ops[kind][target.split(".")[1]] += 1
                return make_boxed_func(gm.forward)

            return compiler

        self._aot = aot_autograd(fw_compiler=recorder("forward"), bw_compiler=recorder("backward"))

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return self._aot(gm, example_inputs)


def _tiny(preset_kwargs: dict, norm: str, activation: str):
    from steadylm.models import ModelConfig, build_model

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, n_kv_heads=2, ffn_dim=48, max_seq_len=16,
                      norm=norm, activation=activation, **preset_kwargs)  # fmt: skip
    return build_model(cfg)


def _step(model, tokens):
    logits = model(tokens[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
    loss.backward()
    return loss.detach()


MODELS = {
    "dense-bhyt-swiglu": ({}, "bhyt", "swiglu"),
    "dense-rmsnorm-powlu": ({}, "rmsnorm", "powlu"),
    "moe-bhyt-swiglu": ({"n_experts": 4, "moe_top_k": 2}, "bhyt", "swiglu"),
}


@pytest.mark.parametrize("policy", ["opaque", "inline"])
@pytest.mark.parametrize("name", list(MODELS))
def test_compiled_model_has_no_graph_break_keeps_the_fused_ops_and_matches_eager(name, policy, eager_kernels, monkeypatch):
    # Both policies a device can choose per op (ops.COMPILED_INLINE, a measured setting): every op
    # opaque (the custom ops in the graphs) or every op traced through (their math in the graphs).
    monkeypatch.setitem(ops.COMPILED_INLINE, "cpu", frozenset() if policy == "opaque" else frozenset(library.OPS))
    kwargs, norm, activation = MODELS[name]
    eager_model, compiled_model = _tiny(kwargs, norm, activation), _tiny(kwargs, norm, activation)
    compiled_model.load_state_dict(eager_model.state_dict())
    tokens = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(2))
    census = _Census()
    torch._dynamo.reset()
    loss_c = _step(torch.compile(compiled_model, backend=census), tokens)
    loss_e = _step(eager_model, tokens)
    assert census.graphs == 1  # 0 graph breaks in the training forward (and its backward graph)
    if policy == "inline":
        for kind in ("forward", "backward"):  # (the MoE's grouped_linear is not one of these ops)
            assert not set(census.ops[kind]) & (set(library.OPS) | {op + "_backward" for op in library.OPS}), census.ops
    else:
        _assert_fused_ops_in_graphs(census, norm, activation)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=0.0)
    for (pname, p_c), p_e in zip(compiled_model.named_parameters(), eager_model.parameters()):
        scale = p_e.grad.abs().max().item()
        assert (p_c.grad - p_e.grad).abs().max().item() <= 1e-5 * scale + 1e-12, pname


def _assert_fused_ops_in_graphs(census: _Census, norm: str, activation: str) -> None:
    first_site = "bhyt_and_mean_square" if norm == "bhyt" else "rms_norm"
    act = {"swiglu": "swiglu", "powlu": "powlu_glu"}[activation]
    for op in (first_site, act):
        assert census.ops["forward"][op] >= 2, census.ops  # one per layer
        assert census.ops["backward"][op + "_backward"] >= 2, census.ops
    if norm == "bhyt":
        assert census.ops["forward"]["bhyt"] >= 2  # the second site, reading v'
        assert "mean_square" not in census.ops["forward"]  # the statistic comes from the first site


def test_explain_reports_no_graph_break_for_dense_and_moe(eager_kernels):
    for kwargs in ({}, {"n_experts": 4, "moe_top_k": 2}):
        model = _tiny(kwargs, "bhyt", "powlu")
        tokens = torch.randint(0, 64, (2, 16))
        explanation = torch._dynamo.explain(model)(tokens)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1
