"""Probes: statistics against numpy/scipy, spike/divergence detection, the hook-based probe on
real (tiny) models — dense, BHyT, DyT and MoE."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats as sps

from steadylm.models import ModelConfig, build_model
from steadylm.probes import (
    STAT_NAMES,
    StabilityProbe,
    detect_divergence,
    detect_spikes,
    pearson_r,
    rolling_zscores,
    tensor_stats,
    token_l2_and_variance,
)

# fp32 statistics of values of order 1: relative error ~1e-6 per op, a few ops deep.
RTOL = 1e-4


# ---------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------


def test_tensor_stats_match_numpy_and_scipy() -> None:
    torch.manual_seed(0)
    x = torch.distributions.StudentT(4.0).sample((64, 300)).to(torch.float32)
    s = tensor_stats(x)
    a = x.double().numpy().ravel()
    assert set(s) == set(STAT_NAMES)
    assert s["min"] == pytest.approx(a.min(), rel=RTOL)
    assert s["max"] == pytest.approx(a.max(), rel=RTOL)
    assert s["amax"] == pytest.approx(np.abs(a).max(), rel=RTOL)
    assert s["p1"] == pytest.approx(np.percentile(a, 1), rel=RTOL)
    assert s["p99"] == pytest.approx(np.percentile(a, 99), rel=RTOL)
    # Pearson kurtosis (normal = 3) = scipy's with fisher=False
    assert s["kurtosis"] == pytest.approx(sps.kurtosis(a, fisher=False), rel=RTOL)
    assert s["max_rms"] == pytest.approx(np.abs(a).max() / np.sqrt(np.mean(a**2)), rel=RTOL)


def test_kurtosis_convention_normal_is_three() -> None:
    x = torch.randn(1_000_000, generator=torch.Generator().manual_seed(1))
    # sampling error of the kurtosis of n normals: sqrt(24/n) ≈ 0.005
    assert tensor_stats(x)["kurtosis"] == pytest.approx(3.0, abs=0.03)


def test_percentiles_of_a_big_tensor_use_a_deterministic_subsample() -> None:
    x = torch.randn(3_000_000, generator=torch.Generator().manual_seed(2)) * 2.0
    a, b = tensor_stats(x), tensor_stats(x.clone())
    assert a == b
    # min/max/amax use every element; the subsample's percentiles are close to the exact ones
    assert a["max"] == float(x.max()) and a["min"] == float(x.min())
    exact = np.percentile(x.numpy(), [1, 99])
    # a 1-in-46 strided subsample of 65k normals (σ = 2): the standard error of a P1/P99
    # estimate is sqrt(p(1-p)/n) / pdf(q) = 0.0004 / 0.0134 ≈ 0.03; allow 3.4 standard errors
    assert a["p1"] == pytest.approx(exact[0], abs=0.1)
    assert a["p99"] == pytest.approx(exact[1], abs=0.1)


def test_small_subsample_cap_and_pooling_of_several_tensors() -> None:
    x = torch.arange(1000, dtype=torch.float32)
    s = tensor_stats(x, max_quantile_elems=100)
    assert s["min"] == 0 and s["max"] == 999
    parts = [torch.arange(500, dtype=torch.float32), torch.arange(500, 1000, dtype=torch.float32)]
    assert tensor_stats(parts) == tensor_stats(x)


def test_non_finite_values_are_reported_not_hidden() -> None:
    x = torch.tensor([1.0, 2.0, float("inf"), -3.0])
    s = tensor_stats(x)
    assert s["max"] == math.inf and s["amax"] == math.inf
    assert math.isfinite(s["p99"]) and math.isfinite(s["kurtosis"])
    s = tensor_stats(torch.tensor([1.0, float("nan")]))
    assert math.isnan(s["max"]) and math.isnan(s["amax"])
    assert all(math.isnan(v) for v in tensor_stats(torch.empty(0)).values())


def test_constant_tensor_has_nan_kurtosis_and_finite_range() -> None:
    s = tensor_stats(torch.full((10,), 2.0))
    assert math.isnan(s["kurtosis"])
    assert s["p1"] == s["p99"] == 2.0
    assert s["max_rms"] == 1.0


def test_token_l2_and_variance() -> None:
    h = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(3))
    l2, var = token_l2_and_variance(h)
    assert l2 == pytest.approx(float(h.norm(dim=-1).mean()), rel=RTOL)
    assert var == pytest.approx(float(h.var(dim=-1, unbiased=False).mean()), rel=RTOL)


def test_pearson_r() -> None:
    a = torch.randn(200, generator=torch.Generator().manual_seed(4))
    b = 0.5 * a + 0.3 * torch.randn(200, generator=torch.Generator().manual_seed(5))
    assert pearson_r(a, b) == pytest.approx(np.corrcoef(a.numpy(), b.numpy())[0, 1], rel=1e-9)
    assert math.isnan(pearson_r(torch.ones(5), a[:5]))
    with pytest.raises(ValueError, match="sizes differ"):
        pearson_r(a, b[:10])


# ---------------------------------------------------------------------------------------------
# spikes and divergence
# ---------------------------------------------------------------------------------------------


def _noisy_decay(n: int, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    return list(8.0 * np.exp(-np.arange(n) / 80) + 3.0 + 0.02 * rng.standard_normal(n))


def test_spike_is_found_where_it_was_injected() -> None:
    losses = _noisy_decay(300)
    assert detect_spikes(losses, window=20, threshold=4.0) == []
    losses[150] += 1.0
    spikes = detect_spikes(losses, window=20, threshold=4.0)
    assert [s.index for s in spikes] == [150]
    assert spikes[0].zscore > 4.0 and spikes[0].loss == losses[150]


def test_zscore_is_against_the_preceding_window_only() -> None:
    losses = [1.0, 2.0, 3.0, 4.0, 10.0]
    zs = rolling_zscores(losses, window=4)
    assert all(math.isnan(z) for z in zs[:4])
    w = np.array(losses[:4])
    assert zs[4] == pytest.approx((10.0 - w.mean()) / w.std())


@given(st.lists(st.floats(-5, 5), min_size=6, max_size=40), st.integers(2, 5))
def test_rolling_zscores_match_a_direct_computation(losses: list[float], window: int) -> None:
    zs = rolling_zscores(losses, window)
    for i, z in enumerate(zs):
        if i < window:
            assert math.isnan(z)
            continue
        w = np.array(losses[i - window : i])
        if w.std() < 1e-8:
            assert math.isnan(z)
        else:
            assert z == pytest.approx((losses[i] - w.mean()) / w.std(), rel=1e-6, abs=1e-6)


def test_nan_losses_are_skipped_by_the_window_and_never_spikes() -> None:
    losses = _noisy_decay(60)
    losses[30] = float("nan")
    zs = rolling_zscores(losses, window=10)
    assert math.isnan(zs[30]) and math.isfinite(zs[31])
    assert all(s.index != 30 for s in detect_spikes(losses, 10, 3.0))


@pytest.mark.parametrize(("window", "threshold"), [(1, 3.0), (0, 3.0), (5, 0.0), (5, -1.0), (5, math.inf)])
def test_spike_parameters_are_validated(window: int, threshold: float) -> None:
    with pytest.raises(ValueError, match="window|threshold"):
        detect_spikes([1.0] * 10, window, threshold)


def test_divergence() -> None:
    assert detect_divergence(_noisy_decay(100)) is None
    d = detect_divergence([5.0, 4.0, float("nan"), 3.0])
    assert (d.index, d.reason) == (2, "non-finite")
    d = detect_divergence([5.0, 4.0, 4.5, 5.2, 3.0])
    assert (d.index, d.reason) == (3, "above-start")
    assert detect_divergence([5.0, 5.05, 4.0]) is None  # within the default margin of 0.1
    assert detect_divergence([5.0, 5.05], margin=0.0).index == 1
    assert detect_divergence([float("inf")]).reason == "non-finite"
    with pytest.raises(ValueError, match="margin"):
        detect_divergence([1.0], margin=-1)


# ---------------------------------------------------------------------------------------------
# the probe on real models
# ---------------------------------------------------------------------------------------------

TINY = dict(vocab_size=64, dim=32, n_layers=2, n_heads=2, n_kv_heads=2, ffn_dim=48, max_seq_len=16,
            impl="reference")


def _model(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig.from_preset("nano", **{**TINY, **kw}))


def _step(probe: StabilityProbe, model: torch.nn.Module, step: int) -> dict[str, float]:
    tokens = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(step))
    probe.begin_step(step, model)
    logits = model(tokens[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), tokens[:, 1:].reshape(-1))
    loss.backward()
    out = probe.end_step(step, model)
    model.zero_grad(set_to_none=True)
    return out


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_probe_samples_on_schedule_and_leaves_no_hooks() -> None:
    model = _model()
    probe = StabilityProbe(every=3)
    before = _hook_count(model)
    got = {step: _step(probe, model, step) for step in range(1, 8)}
    assert [s for s, m in got.items() if m] == [1, 3, 6]
    assert _hook_count(model) == before
    assert probe.sampled_steps == [1, 3, 6]
    m = got[3]
    for i in range(2):
        for prefix in ("ffn_down_in", "grad_gate_out", "grad_up_out"):
            for stat in STAT_NAMES:
                assert math.isfinite(m[f"{prefix}/layer{i}/{stat}"]), (prefix, i, stat)
        assert m[f"hidden/layer{i}/l2"] > 0 and m[f"hidden/layer{i}/var"] > 0
    assert m["probe/overhead_ms"] > 0
    assert not any(k.startswith(("sat/", "lam/", "alpha/", "bhyt/", "moe/")) for k in m)


def test_probe_numbers_equal_a_direct_computation() -> None:
    model = _model(activation="powlu")
    seen: dict[str, torch.Tensor] = {}
    ffn = model.layers[1].ffn
    ffn.down_input.register_forward_hook(lambda m, a, o: seen.__setitem__("down", o.detach()))

    def keep_grad(m, a, o):
        o.register_hook(lambda g: seen.__setitem__("grad_gate", g.detach()))

    ffn.gate_out.register_forward_hook(keep_grad)
    model.layers[1].register_forward_hook(lambda m, a, o: seen.__setitem__("hidden", o.detach()))
    m = _step(StabilityProbe(every=1), model, 1)
    for stat, value in tensor_stats(seen["down"]).items():
        assert m[f"ffn_down_in/layer1/{stat}"] == value
    for stat, value in tensor_stats(seen["grad_gate"]).items():
        assert m[f"grad_gate_out/layer1/{stat}"] == value
    l2, var = token_l2_and_variance(seen["hidden"])
    assert (m["hidden/layer1/l2"], m["hidden/layer1/var"]) == (l2, var)


def test_probe_on_bhyt_records_variance_approximation_saturation_and_lambda() -> None:
    model = _model(norm="bhyt")
    probe = StabilityProbe(every=1, keep_samples=8)
    m = _step(probe, model, 1)
    for i in range(2):
        assert m[f"bhyt/layer{i}/v_approx"] > 0 and m[f"bhyt/layer{i}/v_true"] > 0
        assert -1.0 <= m[f"bhyt/layer{i}/pearson_r"] <= 1.0
        for site in ("attn_norm", "ffn_norm"):
            assert 0.0 <= m[f"sat/layer{i}/{site}"] <= 1.0
        assert m[f"lam/layer{i}/attn_norm"] == pytest.approx(2.0)  # published λ0 before any update
        assert m[f"lam/layer{i}/ffn_norm"] == pytest.approx(1.0)
        assert len(probe.samples[f"layer{i}"]["v_true"]) <= 8
    assert all(not b.record_stats for b in model.layers)  # switched off again after the step


def test_probe_on_dyt_records_alpha_and_final_norm_saturation() -> None:
    m = _step(StabilityProbe(every=1), _model(norm="dyt"), 1)
    assert m["alpha/layer0/attn_norm"] == pytest.approx(0.8)
    assert m["alpha/layer0/ffn_norm"] == pytest.approx(0.2)
    assert "alpha/final_norm" in m and 0.0 <= m["sat/final_norm"] <= 1.0
    assert m["embed_scale"] == pytest.approx(math.sqrt(32))  # DyT recipe: sqrt(d) at init


def test_probe_on_moe_keeps_routed_and_shared_experts_apart() -> None:
    model = _model(n_experts=4, moe_top_k=2, n_dense_layers=1, expert_ffn_dim=16, n_shared_experts=1)
    m = _step(StabilityProbe(every=1), model, 1)
    assert math.isfinite(m["ffn_down_in/layer0/p99"])  # the dense first layer
    for part in ("routed", "shared"):
        assert math.isfinite(m[f"ffn_down_in/layer1/{part}/amax"])
        assert math.isfinite(m[f"grad_up_out/layer1/{part}/kurtosis"])
    assert m["moe/layer1/load_max"] >= m["moe/layer1/load_min"] >= 0.0


def test_probe_every_is_validated() -> None:
    with pytest.raises(ValueError, match="every"):
        StabilityProbe(every=0)


def test_bhyt_pearson_r_and_means_equal_a_direct_numpy_computation() -> None:
    """The BHyT probe's v_approx / v_true means and their Pearson r against numpy, from the block
    input x and mid-point h captured here: v_true = mean(h²), v_approx = mean(x²) + c_ℓ·λ₁²/κ²."""
    model = _model(norm="bhyt")
    with torch.no_grad():  # a c_ℓ that matters (at init it is ~1e-5 of mean(x²))
        for block in model.layers:
            block.attn.wv.weight.mul_(10.0)
            block.attn.wo.weight.mul_(10.0)
    model.refresh_bhyt_correction()
    seen: dict[int, dict[str, np.ndarray]] = {}
    for i, block in enumerate(model.layers):
        def pre(m, args, i=i):
            seen.setdefault(i, {})["x"] = args[0].detach().double().numpy()

        def attn_out(m, args, out, i=i):
            seen[i]["a"] = out.detach().double().numpy()

        block.register_forward_pre_hook(pre)
        block.attn.register_forward_hook(attn_out)
    m = _step(StabilityProbe(every=1), model, 1)
    for i, block in enumerate(model.layers):
        x, h = seen[i]["x"], seen[i]["x"] + seen[i]["a"]
        lam1, kappa = float(block.attn_norm.lam), block.bhyt_kappa
        v_true = (h**2).mean(-1).reshape(-1)
        v_approx = ((x**2).mean(-1) + float(block.bhyt_correction) * lam1**2 / kappa**2).reshape(-1)
        # fp32 statistics over d = 32 against float64: a few fp32 ulps (2^-24 = 6e-8) relative
        assert m[f"bhyt/layer{i}/v_true"] == pytest.approx(v_true.mean(), rel=1e-5)
        assert m[f"bhyt/layer{i}/v_approx"] == pytest.approx(v_approx.mean(), rel=1e-5)
        r = np.corrcoef(v_approx, v_true)[0, 1]
        assert v_approx.std() > 0 and v_true.std() > 0 and abs(r) < 0.9999  # not degenerate, not trivially 1
        # r from fp32 moments of 32 tokens: relative error ~ 32 x 6e-8 per sum, 1e-5 absolute
        assert m[f"bhyt/layer{i}/pearson_r"] == pytest.approx(r, abs=1e-5)


def test_block_cosine_equals_a_direct_numpy_computation() -> None:
    from steadylm.probes.block_cosine import BlockCosineProbe

    model = _model()
    pairs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for i, block in enumerate(model.layers):
        block.register_forward_hook(
            lambda m, args, out, i=i: pairs.__setitem__(i, (args[0].detach().double().numpy(),
                                                            out.detach().double().numpy())))
    probe = BlockCosineProbe(every=2)
    m = _step(probe, model, 1)  # type: ignore[arg-type]
    assert set(m) == {"depth/layer0/cos", "depth/layer1/cos"}
    for i, (x, y) in pairs.items():
        cos = (x * y).sum(-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1))
        assert 0.0 < cos.mean() < 0.9999
        # fp32 dot products and norms over d = 32: ~32 x 2^-24 relative each, 1e-5 absolute
        assert m[f"depth/layer{i}/cos"] == pytest.approx(cos.mean(), abs=1e-5)
    assert _step(probe, model, 3) == {}  # not a sampled step  # type: ignore[arg-type]
