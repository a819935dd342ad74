"""Compiled decode (static KV cache, one compiled step) against the eager decode loop; zero
recompiles after warm-up; no host sync per token on CUDA; the sync-free sampler's distribution."""

from __future__ import annotations

import pytest
import torch

from steadylm.errors import ConfigError
from steadylm.models import ModelConfig, build_model
from steadylm.models.generate import sample_next

# GQA (4 query heads on 2 KV heads), partial RoPE, QK-norm, the BHyT block (frozen per-layer shift)
# and a MoE layer: everything the decode step has to carry.
CFG = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=24,
           norm="bhyt", qk_norm=True, rope_fraction=0.5, n_experts=4, moe_top_k=2, expert_ffn_dim=16)  # fmt: skip


def _tokens(batch: int, seq: int, seed: int, device: str) -> torch.Tensor:
    return torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(seed)).to(device)


def test_compiled_decode_matches_eager_and_never_recompiles(device):
    """One compile per model; then new prompts, sampling options and crossing the context window
    reuse it. Tolerance of the logits: the compiled step sums the same fp32 terms in a different
    order (Inductor fusion, masked attention over the static cache) — fp32 rounding, 1e-5."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(**CFG), device=device)
    prompt = _tokens(2, 5, 0, device)
    eager, eager_logits = model.generate(prompt, 8, temperature=0.0, return_logits=True, decode="eager")
    compiled, compiled_logits = model.generate(prompt, 8, temperature=0.0, return_logits=True)
    assert torch.equal(compiled, eager)
    torch.testing.assert_close(compiled_logits, eager_logits, rtol=1e-5, atol=1e-5)

    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        # another prompt length, sampling with top-k, and a run past the 24-token context
        # (steps, then a re-filled window per token): all on the warmed-up step.
        gen = torch.Generator(device=device).manual_seed(3)
        sampled = model.generate(_tokens(2, 9, 1, device), 6, temperature=0.8, top_k=5, generator=gen)
        assert sampled.shape == (2, 15)
        long_prompt = _tokens(2, 20, 2, device)
        crossed, crossed_logits = model.generate(long_prompt, 8, temperature=0.0, return_logits=True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # nothing new was compiled
    reference, reference_logits = model.generate(long_prompt, 8, temperature=0.0, return_logits=True, decode="eager")
    assert torch.equal(crossed, reference)
    torch.testing.assert_close(crossed_logits, reference_logits, rtol=1e-5, atol=1e-5)
    assert model.training  # generate restores the training mode


def test_decode_mode_is_validated():
    model = build_model(ModelConfig(**CFG))
    with pytest.raises(ConfigError, match="decode"):
        model.generate(_tokens(1, 3, 0, "cpu"), 2, decode="fast")


def test_sampler_draws_from_the_softmax_distribution():
    """argmax(p/E), E ~ Exp(1), is an exact draw from p. 40 000 seeded draws (deterministic): each
    frequency within 5 binomial standard deviations (≤ 0.0013 here) of p; a zero-probability token
    (logit −inf, or outside the top-k) is never drawn."""
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05, 0.0]])).expand(40_000, 5)
    gen = torch.Generator().manual_seed(0)
    draws = sample_next(logits, 1.0, None, gen).squeeze(1)
    freq = torch.bincount(draws, minlength=5).double() / draws.numel()
    p = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0], dtype=torch.float64)
    sigma = (p * (1 - p) / draws.numel()).sqrt()
    assert bool(((freq - p).abs() <= 5 * sigma + 1e-12).all()), freq
    top2 = sample_next(logits, 1.0, 2, gen).squeeze(1)
    assert set(top2.unique().tolist()) == {0, 1}
    assert torch.equal(sample_next(logits[:3], 0.0, None, None).squeeze(1), torch.zeros(3, dtype=torch.long))


def test_compiled_decode_makes_no_host_sync_on_cuda(device):
    """After warm-up a whole generate call (prefill, decode steps, sampling) runs under
    ``torch.cuda.set_sync_debug_mode("error")``: any device-to-host synchronisation raises. Dense
    model: an fp32 MoE layer reads its expert counts on the host (only bf16 on sm90+ has
    ``torch._grouped_mm``)."""
    if device != "cuda":
        pytest.skip("host synchronisation is a CUDA notion")
    dense = {k: v for k, v in CFG.items() if k not in ("n_experts", "moe_top_k", "expert_ffn_dim")}
    model = build_model(ModelConfig(**dense), device=device)
    prompt = _tokens(2, 5, 0, device)
    gen = torch.Generator(device=device).manual_seed(5)
    model.generate(prompt, 8, temperature=0.7, top_k=5, generator=gen)  # compiles, warms the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = model.generate(prompt, 8, temperature=0.7, top_k=5, generator=gen)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.shape == (2, 13)
