"""Decoder behaviour: every activation × norm on dense and MoE, causality, KV-cache generation,
the BHyT block against a hand computation of SPEC §2, c_ℓ, state-dict round trips, compile."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

from steadylm import kernels
from steadylm.errors import ConfigError
from steadylm.models import BHyTBlock, ModelConfig, build_model
from steadylm.models.config import BLOCK_NORMS

TINY = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=16)
TINY_MOE = dict(TINY, n_experts=4, moe_top_k=2, expert_ffn_dim=16, qk_norm=True, rope_fraction=0.5)
ACTIVATIONS = [("swiglu", {}), ("powlu", {"m": 3.0}), ("swiglu_clip", {"limit": 7.0})]


@pytest.fixture
def eager_kernels():
    """Run the fused kernels' autograd Functions without torch.compile: the same math and the same
    integration (variance hand-off, custom backward), without paying Inductor compile time here —
    the kernels' own tests cover compilation."""
    previous = kernels.compile_enabled()
    kernels.set_compile(False)
    yield
    kernels.set_compile(previous)


def _tokens(batch: int, seq: int, vocab: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _loss(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


# ------------------------------------------------------------------------------------------------
# every activation x norm, dense and MoE
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dense", "moe"])
@pytest.mark.parametrize("norm", BLOCK_NORMS)
@pytest.mark.parametrize("activation, kwargs", ACTIVATIONS, ids=[a for a, _ in ACTIVATIONS])
def test_forward_and_backward_are_finite(activation, kwargs, norm, kind, device):
    torch.manual_seed(0)
    base = TINY if kind == "dense" else TINY_MOE
    cfg = ModelConfig(**base, activation=activation, activation_kwargs=kwargs, norm=norm, impl="reference")
    model = build_model(cfg, device=device)
    tokens = _tokens(2, 13).to(device)
    logits = model(tokens)
    assert logits.shape == (2, 13, 64)
    assert torch.isfinite(logits).all()
    _loss(model, tokens).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), name
    # Every MoE layer received gradient in its router and in some routed expert.
    for moe in model.moe_layers():
        assert moe.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["dense", "moe"])
@pytest.mark.parametrize("norm", BLOCK_NORMS)
def test_fused_path_matches_reference_path(norm, kind, device, eager_kernels):
    base = TINY if kind == "dense" else TINY_MOE
    reference = build_model(ModelConfig(**base, activation="powlu", norm=norm, impl="reference"), device=device)
    fused = build_model(ModelConfig(**base, activation="powlu", norm=norm, impl="fused"), device=device)
    fused.load_state_dict(reference.state_dict())
    tokens = _tokens(2, 16).to(device)
    # fp32 both ways; the fused kernels reorder a few reductions, hence a few ulp of slack.
    torch.testing.assert_close(fused(tokens), reference(tokens), rtol=1e-5, atol=1e-5)
    _loss(fused, tokens).backward()
    _loss(reference, tokens).backward()
    for (name, p_fused), (_, p_ref) in zip(fused.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p_fused.grad, p_ref.grad, rtol=1e-4, atol=1e-6, msg=name)


# ------------------------------------------------------------------------------------------------
# causality and the KV cache
# ------------------------------------------------------------------------------------------------

CAUSAL_CASES = {
    "dense-rmsnorm": dict(TINY, norm="rmsnorm"),
    "dense-bhyt-gqa-partial-rope": dict(TINY, norm="bhyt", rope_fraction=0.5, qk_norm=True),
    "moe-bhyt_star": dict(TINY_MOE, norm="bhyt_star"),
    "moe-peri_ln": dict(TINY_MOE, norm="peri_ln", activation="powlu"),
}


@pytest.mark.parametrize("case", list(CAUSAL_CASES))
def test_changing_a_future_token_never_changes_an_earlier_logit(case):
    torch.manual_seed(1)
    model = build_model(ModelConfig(**CAUSAL_CASES[case], impl="reference"))
    tokens = _tokens(2, 16)
    base = model(tokens)
    for t in (1, 7, 15):
        changed = tokens.clone()
        changed[:, t] = (changed[:, t] + 1 + torch.arange(2)) % 64
        out = model(changed)
        if model.config.is_moe:
            # Re-routing the changed token changes the per-expert matmul sizes, and the BLAS
            # blocking with them: earlier rows may move by an ulp (~3e-8 here), never by more.
            torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0.0, atol=1e-6)
        else:
            # Masked positions contribute exactly 0, so earlier logits are bit-identical ...
            assert torch.equal(out[:, :t], base[:, :t]), f"position < {t} changed"
        # ... while the changed position itself does see the change.
        assert not torch.equal(out[:, t], base[:, t])


# The eager decode loop here (fast enough to run for every case); tests/test_generate.py checks
# the compiled decode against it.
@pytest.mark.parametrize("case", list(CAUSAL_CASES))
def test_kv_cache_generation_gives_the_full_forward_logits(case):
    torch.manual_seed(2)
    model = build_model(ModelConfig(**CAUSAL_CASES[case], impl="reference"))
    prompt = _tokens(2, 5)
    sequence, logits = model.generate(prompt, max_new_tokens=8, temperature=0.0, return_logits=True, decode="eager")
    assert sequence.shape == (2, 13) and logits.shape == (2, 8, 64)
    assert torch.equal(sequence[:, :5], prompt)
    full = model(sequence[:, :-1])
    # Cached attention sums the same terms in a different order: fp32 rounding only.
    torch.testing.assert_close(logits, full[:, 4:], rtol=1e-5, atol=1e-5)
    assert torch.equal(sequence[:, 5:], logits.argmax(-1))  # temperature 0 is greedy


def test_generation_past_the_context_crops_like_a_full_forward_on_the_window():
    torch.manual_seed(3)
    model = build_model(ModelConfig(**TINY, norm="bhyt", impl="reference"))
    context = model.config.max_seq_len
    prompt = _tokens(1, 20)  # already longer than the context
    sequence, logits = model.generate(prompt, max_new_tokens=6, temperature=0.0, return_logits=True, decode="eager")
    for i in range(6):
        window = sequence[:, : 20 + i][:, -context:]
        torch.testing.assert_close(logits[:, i], model(window)[:, -1], rtol=1e-5, atol=1e-5)


def test_sampling_options():
    model = build_model(ModelConfig(**TINY, impl="reference"))
    prompt = _tokens(3, 4)
    a = model.generate(prompt, 5, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(7), decode="eager")
    b = model.generate(prompt, 5, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(7), decode="eager")
    assert torch.equal(a, b)
    greedy = model.generate(prompt, 5, temperature=0.0, decode="eager")
    assert torch.equal(model.generate(prompt, 5, temperature=1.3, top_k=1, decode="eager"), greedy)
    assert torch.equal(model.generate(prompt, 0), prompt)
    assert model.training  # generate restores the training mode
    for field, bad in (("temperature", dict(temperature=-1.0)), ("top_k", dict(top_k=0)),
                       ("max_new_tokens", dict(max_new_tokens=-1))):
        with pytest.raises(ConfigError, match=field):
            model.generate(prompt, **{"max_new_tokens": 2, "decode": "eager", **bad})
    with pytest.raises(ConfigError, match="max_seq_len"):
        model(_tokens(1, 17))


def test_generation_precomputes_bhyt_scalars_once_per_call(monkeypatch):
    model = build_model(ModelConfig(**TINY, norm="bhyt", impl="reference"))
    calls = {"n": 0}
    original = BHyTBlock.begin_inference

    def counting(self):
        calls["n"] += 1
        original(self)

    monkeypatch.setattr(BHyTBlock, "begin_inference", counting)
    model.generate(_tokens(1, 3), 6, decode="eager")
    assert calls["n"] == model.config.n_layers  # once per layer, not once per token
    assert all(block._inference_shift is None for block in model.layers)  # cleared afterwards


# ------------------------------------------------------------------------------------------------
# the BHyT block against SPEC §2 by hand
# ------------------------------------------------------------------------------------------------


def _hand_rope(x: torch.Tensor, rotary_dim: int, theta: float) -> torch.Tensor:
    """x [T, heads, hd]: rotate pairs (i, i + r/2), i < r/2, by angle pos · θ^(-2i/r)."""
    out = x.clone()
    half = rotary_dim // 2
    for pos in range(x.shape[0]):
        for i in range(half):
            angle = pos * theta ** (-2.0 * i / rotary_dim)
            c, s = math.cos(angle), math.sin(angle)
            a, b = x[pos, :, i], x[pos, :, i + half]
            out[pos, :, i] = a * c - b * s
            out[pos, :, i + half] = b * c + a * s
    return out


def _hand_correction(w_v: torch.Tensor, w_o: torch.Tensor, n_heads: int, n_kv: int, seq_len: int) -> torch.Tensor:
    """‖W_V W_O‖_F² / (T d) with query head h reading value head h // (n_heads / n_kv), head by head."""
    d = w_v.shape[1]
    hd = w_v.shape[0] // n_kv
    composed = torch.zeros(d, d, dtype=torch.float64)
    for h in range(n_heads):
        g = h // (n_heads // n_kv)
        composed += w_o[:, h * hd : (h + 1) * hd].double() @ w_v[g * hd : (g + 1) * hd].double()
    return composed.square().sum() / (seq_len * d)


def _hand_bhyt_block(block: BHyTBlock, x: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """SPEC §2 steps 1–4 for one sequence x [T, d], float64, with loops instead of the model's ops."""
    kappa, eps = cfg.bhyt_kappa, cfg.norm_eps
    H, G, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    attn = block.attn
    lam1, gamma1 = block.attn_norm.lam.item(), block.attn_norm.weight.double()
    lam2, gamma2 = block.ffn_norm.lam.item(), block.ffn_norm.weight.double()
    T = x.shape[0]

    v = (x * x).mean(-1, keepdim=True)  # step 1: once per block
    a = gamma1 * torch.tanh(lam1 * x / (kappa * torch.sqrt(v + eps)))  # step 2
    q = _hand_rope((a @ attn.wq.weight.double().T).view(T, H, hd), cfg.rotary_dim, cfg.rope_theta)
    k = _hand_rope((a @ attn.wk.weight.double().T).view(T, G, hd), cfg.rotary_dim, cfg.rope_theta)
    val = (a @ attn.wv.weight.double().T).view(T, G, hd)
    heads = []
    for h in range(H):
        g = h // (H // G)
        scores = q[:, h] @ k[:, g].T / math.sqrt(hd)
        scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
        heads.append(torch.softmax(scores, dim=-1) @ val[:, g])
    h_state = x + torch.cat(heads, dim=-1) @ attn.wo.weight.double().T

    c = _hand_correction(attn.wv.weight, attn.wo.weight, H, G, cfg.max_seq_len)  # step 4
    v_prime = v + c * lam1**2 / kappa**2  # step 3: no reduction over h
    b = gamma2 * torch.tanh(lam2 * h_state / (kappa * torch.sqrt(v_prime + eps)))
    ffn = block.ffn
    gate, up = b @ ffn.w_gate.weight.double().T, b @ ffn.w_up.weight.double().T
    return h_state + (gate * torch.sigmoid(gate) * up) @ ffn.w_down.weight.double().T


def _randomise_bhyt_scalars(model: torch.nn.Module) -> None:
    """Move γ, λ off their initial values so the hand computation checks that each is used."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for block in model.layers:
            for norm, lam in ((block.attn_norm, 1.7), (block.ffn_norm, 0.6)):
                norm.lam.fill_(lam)
                norm.weight.copy_(1.0 + 0.3 * torch.randn(norm.weight.shape, generator=g))


def test_bhyt_block_equals_the_hand_computation_of_spec_section_2(eager_kernels):
    cfg = ModelConfig(**{**TINY, "n_layers": 1, "rope_fraction": 0.5}, norm="bhyt", impl="reference")
    torch.manual_seed(4)
    model = build_model(cfg).double()
    _randomise_bhyt_scalars(model)
    model.refresh_bhyt_correction()
    block = model.layers[0]
    x = 3.0 * torch.randn(1, 12, cfg.dim, dtype=torch.float64)  # large enough for tanh to bend
    cos, sin = model.rope(0, 12)
    expected = _hand_bhyt_block(block, x[0], cfg)
    torch.testing.assert_close(block(x, cos.double(), sin.double())[0], expected, rtol=1e-10, atol=1e-10)

    # The fused path in fp32 on the same weights: fp32 rounding of a float64 reference.
    fused = build_model(cfg.replace(impl="fused"))
    fused.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    cos32, sin32 = fused.rope(0, 12)
    got = fused.layers[0](x.float(), cos32, sin32)[0]
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_bhyt_star_uses_exact_statistics_at_both_sites():
    cfg = ModelConfig(**{**TINY, "n_layers": 1}, norm="bhyt_star", impl="reference")
    model = build_model(cfg).double()
    _randomise_bhyt_scalars(model)
    block = model.layers[0]
    x = 3.0 * torch.randn(2, 10, cfg.dim, dtype=torch.float64)
    cos, sin = (t.double() for t in model.rope(0, 10))

    def exact_bhyt(norm, z):
        r = 1.0 / (cfg.bhyt_kappa * torch.sqrt((z * z).mean(-1, keepdim=True) + cfg.norm_eps))
        return norm.weight * torch.tanh(norm.lam * r * z)

    h = x + block.attn(exact_bhyt(block.attn_norm, x), cos, sin)
    expected = h + block.ffn(exact_bhyt(block.ffn_norm, h))
    torch.testing.assert_close(block(x, cos, sin), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n_heads, n_kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_c_l_equals_composed_value_output_norm_with_gqa(n_heads, n_kv_heads):
    cfg = ModelConfig(**{**TINY, "n_heads": n_heads, "n_kv_heads": n_kv_heads}, norm="bhyt", impl="reference")
    model = build_model(cfg)
    for block in model.layers:
        expected = _hand_correction(block.attn.wv.weight, block.attn.wo.weight, n_heads, n_kv_heads, cfg.max_seq_len)
        assert block.bhyt_correction.requires_grad is False
        torch.testing.assert_close(block.bhyt_correction.double(), expected, rtol=1e-5, atol=0.0)
    assert "layers.0.bhyt_correction" in model.state_dict()  # saved in checkpoints


def test_c_l_is_refreshed_every_k_optimizer_steps():
    cfg = ModelConfig(**TINY, norm="bhyt", impl="reference")
    model = build_model(cfg)
    block = model.layers[0]
    total_steps = 500  # K = max(1, min(1000, 500 // 50)) = 10
    assert cfg.refresh_interval(total_steps) == 10
    before = block.bhyt_correction.clone()
    with torch.no_grad():
        block.attn.wv.weight.mul_(2.0)  # c_l scales by 4
    model.after_optimizer_step(9, total_steps)
    assert torch.equal(block.bhyt_correction, before)  # not a multiple of K: stale on purpose
    model.after_optimizer_step(10, total_steps)
    torch.testing.assert_close(block.bhyt_correction, 4.0 * before)
    assert cfg.replace(bhyt_refresh_every=3).refresh_interval(total_steps) == 3
    assert cfg.refresh_interval(10) == 1 and cfg.refresh_interval(10**9) == 1000


def test_bhyt_blocks_record_first_and_second_site_statistics():
    model = build_model(ModelConfig(**TINY, norm="bhyt", impl="reference"))
    block = model.layers[1]
    seen = {}
    block.ffn_norm.register_forward_hook(lambda m, args, out: seen.setdefault("h", args[0].detach()))
    block.record_stats = True
    model(_tokens(2, 9))
    stats = block.last_stats
    assert set(stats) == {"v_approx", "v_true"}
    for t in stats.values():
        assert t.shape == (2, 9) and t.dtype == torch.float32 and not t.requires_grad
    torch.testing.assert_close(stats["v_true"], seen["h"].float().pow(2).mean(-1))
    assert model.layers[0].last_stats is None  # only where asked


# ------------------------------------------------------------------------------------------------
# state dict round trip
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("base", [dict(TINY, norm="bhyt"), dict(TINY_MOE, norm="bhyt", activation="powlu")],
                         ids=["dense", "moe"])
def test_state_dict_round_trip_reproduces_outputs_exactly_and_refreshes_c_l(base):
    cfg = ModelConfig(**base, impl="reference")
    torch.manual_seed(6)
    source = build_model(cfg)
    for moe in source.moe_layers():  # a non-trivial balancing state travels too
        moe.router.expert_bias.copy_(torch.linspace(-0.1, 0.1, moe.n_experts))
    tokens = _tokens(2, 16)
    expected = source(tokens)

    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    torch.manual_seed(99)  # a differently initialised target
    target = build_model(ModelConfig.from_dict(cfg.to_dict()))
    target.load_state_dict(torch.load(buffer))
    assert torch.equal(target(tokens), expected)

    # A stale c_l in the saved state is recomputed from the loaded weights.
    with torch.no_grad():
        source.layers[0].attn.wo.weight.mul_(3.0)  # source's c_l is now stale (x9 off)
    stale = source.layers[0].bhyt_correction.clone()
    target.load_state_dict(source.state_dict())
    fresh = _hand_correction(target.layers[0].attn.wv.weight, target.layers[0].attn.wo.weight,
                             cfg.n_heads, cfg.n_kv_heads, cfg.max_seq_len)
    torch.testing.assert_close(target.layers[0].bhyt_correction.double(), fresh, rtol=1e-5, atol=0.0)
    torch.testing.assert_close(target.layers[0].bhyt_correction, 9.0 * stale, rtol=1e-5, atol=0.0)

    # Opt-out for a bit-exact resume: the saved (stale) buffer is kept as is.
    target.set_bhyt_refresh_on_load(False)
    target.load_state_dict(source.state_dict())
    assert torch.equal(target.layers[0].bhyt_correction, stale)


# ------------------------------------------------------------------------------------------------
# torch.compile
# ------------------------------------------------------------------------------------------------


def test_dense_fused_forward_has_no_graph_breaks():
    model = build_model(ModelConfig(**TINY, norm="bhyt", activation="powlu", qk_norm=True, rope_fraction=0.5))
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(_tokens(2, 16))
    torch._dynamo.reset()  # leave no traced state behind for other tests
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1

