"""Ling-style MoE: routing math against a per-token loop, probe points, load statistics, and the
auxiliary-loss-free router bias moving a skewed load towards balance."""

from __future__ import annotations

import pytest
import torch

from steadylm.errors import ConfigError
from steadylm.models import ModelConfig, build_model
from steadylm.models.moe import MoE

DIM, HIDDEN, EXPERTS, TOP_K = 16, 8, 6, 2


def _moe(**kwargs) -> MoE:
    torch.manual_seed(0)
    moe = MoE(DIM, HIDDEN, EXPERTS, TOP_K, n_shared=1, activation="powlu", impl="reference", **kwargs)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return moe


def _per_token_reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """SPEC §3 one token at a time: sigmoid scores, top-k on score + bias, weights renormalised."""
    rows = []
    for token in x.reshape(-1, DIM):
        scores = torch.sigmoid(moe.router.weight @ token)
        chosen = torch.topk(scores + moe.router.expert_bias, TOP_K).indices
        weights = scores[chosen] / scores[chosen].sum() * moe.router.routed_scale
        out = moe.shared_expert(token)
        for w, e in zip(weights, chosen.tolist()):
            gate = moe.experts.w_gate[e](token)
            up = moe.experts.w_up[e](token)
            out = out + w * moe.experts.w_down[e](moe.experts.act(gate, up))
        rows.append(out)
    return torch.stack(rows).reshape(x.shape)


@pytest.mark.parametrize("routed_scale", [1.0, 2.5])
def test_vectorised_dispatch_equals_the_per_token_loop(routed_scale):
    moe = _moe(routed_scale=routed_scale)
    with torch.no_grad():
        moe.router.expert_bias.copy_(torch.linspace(-0.3, 0.3, EXPERTS))  # bias changes selection only
    x = torch.randn(3, 7, DIM)
    torch.testing.assert_close(moe(x), _per_token_reference(moe, x), rtol=1e-5, atol=1e-6)


def test_gradients_reach_router_and_chosen_experts_only():
    moe = _moe()
    x = torch.randn(1, 1, DIM)
    moe(x).sum().backward()
    chosen = torch.topk(torch.sigmoid(moe.router.weight @ x[0, 0]), TOP_K).indices.tolist()
    assert moe.router.weight.grad.abs().sum() > 0
    for e in range(EXPERTS):
        has_grad = moe.experts.w_gate[e].weight.grad is not None and moe.experts.w_gate[e].weight.grad.abs().sum() > 0
        assert has_grad == (e in chosen)
    assert moe.router.expert_bias.grad is None and "expert_bias" not in dict(moe.named_parameters())


def test_probe_points_see_packed_routed_tensors_and_load_is_recorded():
    moe = _moe()
    seen = {}
    for name in ("gate_out", "up_out", "down_input"):
        getattr(moe.experts, name).register_forward_hook(lambda m, a, out, name=name: seen.__setitem__(name, out.shape))
    x = torch.randn(2, 5, DIM)
    moe(x)
    assert seen == {k: torch.Size([10 * TOP_K, HIDDEN]) for k in ("gate_out", "up_out", "down_input")}
    assert moe.last_load.shape == (EXPERTS,)
    torch.testing.assert_close(moe.last_load.sum(), torch.tensor(1.0))
    assert torch.equal(moe.load_accum.sum(), torch.tensor(float(10 * TOP_K)))
    moe.eval()
    moe(x)  # evaluation forwards do not count towards balancing
    assert torch.equal(moe.load_accum.sum(), torch.tensor(float(10 * TOP_K)))


def test_router_bias_moves_a_skewed_load_towards_balance():
    cfg = ModelConfig(vocab_size=64, dim=DIM, n_layers=2, n_heads=2, ffn_dim=32, max_seq_len=16,
                      n_experts=EXPERTS, moe_top_k=TOP_K, expert_ffn_dim=HIDDEN, router_bias_update_rate=0.01,
                      impl="reference")
    model = build_model(cfg)
    moe = model.layers[1].ffn
    # Skew: the inputs lean along a direction u, and experts 0 and 1 align with u.
    g = torch.Generator().manual_seed(0)
    u = torch.randn(DIM, generator=g)
    u = u / u.norm()
    with torch.no_grad():
        moe.router.weight.copy_(0.2 * torch.randn(EXPERTS, DIM, generator=g))
        moe.router.weight[0] += 2.0 * u
        moe.router.weight[1] += 1.5 * u
    x = torch.randn(8, 16, DIM, generator=g) + 2.0 * u

    def imbalance() -> float:  # max load over mean load; 1 = balanced, EXPERTS / TOP_K = 3 at worst
        return float(moe.last_load.max() / moe.last_load.mean())

    moe.eval()
    moe(x)
    start = imbalance()
    assert start > 2.5  # ~90% of the routed slots go to experts 0 and 1
    moe.train()
    history = []
    for step in range(1, 81):
        moe(x)  # a training forward counts the load ...
        model.after_optimizer_step(step, total_steps=80)  # ... the model method applies the update
        history.append(imbalance())
    assert moe.load_accum.sum() == 0  # consumed by the update
    # Sign updates settle into a small jitter around balance (±rate each step), hence the average.
    settled = sum(history[-20:]) / 20
    assert settled < 1.5 < start
    bias = moe.router.expert_bias
    assert bool((bias[:2].max() < bias[2:].min()))  # the overloaded experts' bias went down


def test_update_rate_zero_freezes_the_bias():
    moe = _moe(bias_update_rate=0.0)
    moe(torch.randn(2, 4, DIM))
    moe.update_router_bias()
    assert torch.equal(moe.router.expert_bias, torch.zeros(EXPERTS))


def test_moe_load_stats_and_activation_swap_cover_every_expert():
    model = build_model(ModelConfig.from_preset("nano-moe", vocab_size=64, dim=32, n_heads=2, n_kv_heads=2,
                                                impl="reference"))
    model(torch.randint(0, 64, (2, 8)))
    stats = model.moe_load_stats()
    assert set(stats) == {f"moe/layer{i}/{k}" for i in (1, 2, 3)
                          for k in ("load_max_over_mean", "load_min_over_mean", "bias_range")}
    assert all(v >= 1.0 for k, v in stats.items() if k.endswith("max_over_mean"))
    model.set_activation("swiglu_clip", limit=5.0, variant="step")
    assert model.config.activation == "swiglu_clip"
    for block in model.layers:
        ffns = [block.ffn] if not isinstance(block.ffn, MoE) else [block.ffn.experts, block.ffn.shared_expert]
        for ffn in ffns:
            assert ffn.act.name == "swiglu_clip" and ffn.act.kwargs["limit"] == 5.0


def _router_bias_rank(rank: int, world: int, init_file: str, local_loads: list[list[float]], out: str) -> None:
    """One rank of the distributed router-bias test: each rank counted a different local load."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        moe = MoE(DIM, HIDDEN, len(local_loads[0]), TOP_K, n_shared=0, activation="swiglu", impl="reference")
        moe.load_accum.copy_(torch.tensor(local_loads[rank]))
        moe.update_router_bias()
        torch.save(moe.router.expert_bias.clone(), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_router_bias_update_uses_the_global_load_under_torch_distributed(tmp_path):
    """SPEC §6: the bias update reads the load summed over ranks, so every rank holds the same biases.

    The local loads are chosen so that each rank's *local* sign differs from the global one
    (rank 0 alone would raise expert 1; globally experts 0 and 1 are both over-loaded)."""
    import torch.multiprocessing as mp

    local_loads = [[6.0, 0.0, 2.0, 0.0], [0.0, 6.0, 0.0, 2.0]]
    out = str(tmp_path / "bias")
    mp.spawn(_router_bias_rank, args=(2, str(tmp_path / "init"), local_loads, out), nprocs=2, join=True)
    rate = MoE(DIM, HIDDEN, 4, TOP_K, n_shared=0, activation="swiglu").bias_update_rate
    global_load = torch.tensor(local_loads).sum(0)  # [6, 6, 2, 2], mean 4
    expected = torch.sign(global_load.mean() - global_load) * rate  # [-1, -1, +1, +1] · rate
    for rank in range(2):
        assert torch.equal(torch.load(f"{out}.{rank}"), expected)


def test_router_bias_update_is_a_no_op_when_nothing_was_routed():
    moe = _moe()
    moe.update_router_bias()
    assert torch.equal(moe.router.expert_bias, torch.zeros(EXPERTS))


def test_grouped_dispatch_equals_the_per_expert_loop_forward_and_backward():
    """The sync-free grouped path against today's per-expert module loop, forward and every gradient.

    Both run the same ``mm`` per expert slice in fp32; only the order of fp32 sums in the
    backward's scatter/concatenation can differ, hence fp32 round-off tolerances (1e-6 relative)."""
    moe = _moe()
    x = torch.randn(3, 9, DIM, requires_grad=True)
    moe.experts.dispatch = "grouped"
    moe(x).square().sum().backward()
    grads = {n: p.grad.clone() for n, p in moe.named_parameters()}
    dx = x.grad.clone()
    moe.zero_grad()
    x.grad = None
    moe.experts.dispatch = "loop"  # the per-expert loop on the same module
    moe(x).square().sum().backward()
    torch.testing.assert_close(x.grad, dx, rtol=1e-6, atol=1e-7)
    for name, p in moe.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_linear_matches_float64_reference_with_empty_groups(dtype, device):
    """grouped_linear against a float64 per-group matmul; groups 0 and 3 are empty. On a CUDA
    device of compute capability >= 9.0 the bf16 case runs torch._grouped_mm.

    Tolerance: fp32 sums of 16 products (rtol 1e-5); bf16 output rounding (2^-8 relative)."""
    from steadylm.kernels.grouped import grouped_linear

    g = torch.Generator().manual_seed(0)
    counts = torch.tensor([0, 5, 2, 0, 4])
    x = torch.randn(int(counts.sum()), 16, generator=g).to(dtype).requires_grad_(True)
    w = torch.randn(5, 8, 16, generator=g).to(dtype).requires_grad_(True)
    dy = torch.randn(x.shape[0], 8, generator=g).to(dtype)
    xd, wd = x.detach().to(device).requires_grad_(True), w.detach().to(device).requires_grad_(True)
    y = grouped_linear(xd, wd, counts.cumsum(0).to(device))
    y.backward(dy.to(device))
    x.grad, w.grad = xd.grad.cpu(), wd.grad.cpu()
    y = y.detach().cpu()
    x64, w64 = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    groups = torch.repeat_interleave(torch.arange(5), counts)
    y64 = torch.einsum("ri,roi->ro", x64, w64[groups])
    y64.backward(dy.double())
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2.0**-8, atol=1e-2)
    torch.testing.assert_close(y.double(), y64, **tol)
    torch.testing.assert_close(x.grad.double(), x64.grad, **tol)
    torch.testing.assert_close(w.grad.double(), w64.grad, **tol)
    assert torch.equal(w.grad[0], torch.zeros_like(w.grad[0]))  # an empty group gets a zero gradient


def test_grouped_linear_custom_op_registration():
    """torch.library.opcheck: schema, fake (meta) function and autograd registration agree."""
    from steadylm.kernels import grouped

    x = torch.randn(7, 16, requires_grad=True)
    w = torch.randn(3, 8, 16, requires_grad=True)
    ends = torch.tensor([2, 2, 7])
    torch.library.opcheck(grouped._grouped_linear_loop, (x, w, ends))


def test_compiled_nano_moe_has_no_graph_breaks(device):
    """Sync-free dispatch: Dynamo captures a whole nano-moe training forward as one graph."""
    cfg = ModelConfig.from_preset("nano-moe", vocab_size=64, dim=32, n_heads=2, n_kv_heads=2)
    model = build_model(cfg, device=device)
    tokens = torch.randint(0, 64, (2, 16), device=device)
    explanation = torch._dynamo.explain(model)(tokens)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_grouped_dispatch_under_bf16_autocast_matches_the_per_expert_loop(device):
    """Under bf16 autocast (on CUDA sm90+: torch._grouped_mm) the routed output equals the loop's.

    Tolerance: both round every matmul to bf16 (2^-8 relative); accumulation order may differ."""
    moe = _moe().to(device)
    x = torch.randn(4, 8, DIM, device=device)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        moe.experts.dispatch = "grouped"
        grouped = moe(x)
        moe.experts.dispatch = "loop"
        looped = moe(x)
    assert grouped.dtype == looped.dtype
    torch.testing.assert_close(grouped.float(), looped.float(), rtol=2.0**-7, atol=1e-2)


def test_dispatch_auto_takes_the_loop_in_eager_cpu_and_grouped_when_compiling():
    """"auto": the loop where a host read is free (eager CPU), grouped under torch.compile; a bad
    value or "grouped" on non-Linear experts is a ConfigError."""
    moe = _moe()
    x = torch.randn(5, DIM)
    assert moe.experts.dispatch == "auto" and not moe.experts.uses_grouped(x)
    seen = []
    compiled = torch.compile(lambda t: seen.append(moe.experts.uses_grouped(t)) or t + 1, fullgraph=True)
    compiled(x)
    assert seen == [True]
    torch._dynamo.reset()
    moe.experts.dispatch = "fastest"
    with pytest.raises(ConfigError, match="dispatch"):
        moe.experts.uses_grouped(x)
