"""FP8Linear: accuracy against bf16/fp32 linears, counters, delayed scaling, apply_fp8.

Tolerance used for accuracy (normwise relative error ‖y − y_ref‖/‖y_ref‖ on random data):
rounding to a format with unit roundoff u (e4m3: 2^-4, e5m2: 2^-3) leaves each element with a
relative error of at most u, uniformly spread over the rounding interval, so its RMS relative error
is at most u/√3. A product y = Σ a_i b_i of independently rounded operands (errors uncorrelated with
each other and with the data) then has normwise relative error at most √(ε_a² + ε_b²), ε = u/√3:

    forward      x(e4m3) · W(e4m3)     √2 · 2^-4 / √3            = 0.0510
    grad_input   dY(e5m2) · W(e4m3)    √(2^-6 + 2^-8) / √3       = 0.0807
    grad_weight  dY(e5m2) · x(e4m3)    same                      = 0.0807

and the bf16 reference itself is off by at most √2 · 2^-8 / √3 = 0.0032 — added to each bound.
Values below the smallest normal (rounded with a coarser relative step) would break the per-element
bound, but with per-tensor current scaling a standard normal sample of this size has none of
consequence (amax/|x| > 448/2^-6 = 28672 for ~1e-4 of the elements, and those carry no weight in a
normwise error). The measured errors are ~0.037 / ~0.059 / ~0.059; they must also be clearly *larger*
than the bf16 error, or the layer is not quantising at all.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from steadylm.errors import ConfigError
from steadylm.precision import (
    E4M3,
    E5M2,
    FP8Linear,
    FP8Probe,
    apply_fp8,
    fp8_mm,
    fp8_stats,
    quantize,
)



@pytest.fixture(autouse=True)
def _one_thread():
    # These tensors are tiny: with several intra-op threads on a busy 2-core machine, thread
    # hand-offs cost more than the math (measured 50x slower steps). Restored afterwards.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


U4, U5, UBF = E4M3.unit_roundoff, E5M2.unit_roundoff, 2.0**-8
TOL_FWD = math.sqrt(2) * U4 / math.sqrt(3) + math.sqrt(2) * UBF / math.sqrt(3)
TOL_BWD = math.sqrt(U5**2 + U4**2) / math.sqrt(3) + math.sqrt(2) * UBF / math.sqrt(3)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _pair(scaling: str, bias: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    ref = nn.Linear(256, 192, bias=bias)
    fp8 = FP8Linear.from_linear(nn.Linear(256, 192, bias=bias), scaling=scaling)
    with torch.no_grad():
        fp8.weight.copy_(ref.weight)
        if bias:
            fp8.bias.copy_(ref.bias)
    return ref, fp8


def test_unit_roundoffs_and_constants():
    assert (E4M3.max, E4M3.min_normal, E4M3.min_subnormal) == (448.0, 2**-6, 2**-9)
    assert (E5M2.max, E5M2.min_normal) == (57344.0, 2**-14)
    assert torch.finfo(E4M3.dtype).max == E4M3.max and torch.finfo(E5M2.dtype).max == E5M2.max
    assert (U4, U5) == (2**-4, 2**-3)


@pytest.mark.parametrize("scaling", ["current", "delayed"])
def test_matches_bf16_linear_forward_and_backward(scaling):
    ref, fp8 = _pair(scaling, bias=True)
    torch.manual_seed(1)
    x = torch.randn(4, 128, 256)
    g = torch.randn(4, 128, 192)

    x_ref = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_bf16 = ref(x_ref)
    y_bf16.backward(g.to(torch.bfloat16))
    x32 = x.clone().requires_grad_()
    ref.zero_grad()
    y32 = nn.functional.linear(x32, ref.weight, ref.bias)
    y32.backward(g)
    gw32, gb32 = ref.weight.grad.clone(), ref.bias.grad.clone()

    x8 = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y8 = fp8(x8)
    assert y8.dtype == torch.bfloat16 and y8.shape == y32.shape
    y8.backward(g.to(torch.bfloat16))
    assert x8.grad.dtype == torch.float32 and fp8.weight.grad.dtype == torch.float32

    e_fwd, e_dx, e_dw = rel(y8, y32), rel(x8.grad, x32.grad), rel(fp8.weight.grad, gw32)
    assert e_fwd < TOL_FWD, e_fwd
    assert e_dx < TOL_BWD, e_dx
    assert e_dw < TOL_BWD, e_dw
    assert rel(fp8.bias.grad, gb32) < 1e-2  # bias gradient is a plain fp32 sum of a bf16 dY
    # ...and clearly worse than bf16: the layer really quantises.
    assert e_fwd > 3 * rel(y_bf16, y32)
    assert e_dx > 3 * rel(x_ref.grad, x32.grad)


def test_fp32_without_autocast_keeps_dtype_and_matches():
    ref, fp8 = _pair("current")
    x = torch.randn(300, 256)  # M not a multiple of 16
    y = fp8(x)
    assert y.dtype == torch.float32
    assert rel(y, ref(x)) < TOL_FWD


def test_fp8_mm_scale_semantics_and_emulation_agree():
    a, b = torch.randn(32, 64), torch.randn(64, 48)
    qa, qb = a.to(E4M3.dtype), b.to(E5M2.dtype)
    sa, sb = torch.tensor(0.5), torch.tensor(3.0)
    out = fp8_mm(qa, qb, sa, sb, torch.float32)
    emul = (qa.float() * sa) @ (qb.float() * sb)
    torch.testing.assert_close(out, emul, rtol=1e-5, atol=1e-4)


def test_current_scaling_crafted_underflow_and_no_overflow():
    # amax 1 -> s = 448. 1e-6*448 = 4.5e-4 < 2^-10 (half the smallest subnormal): flushes.
    # 3e-6*448 = 1.3e-3 rounds to 2^-9: survives. Zeros are not underflows.
    x = torch.tensor([1.0, -1.0, 1e-6, -1e-6, 3e-6, 0.0, 0.5])
    cnt = torch.zeros(9, dtype=torch.float64)
    q, inv = quantize(x, E4M3, counters=cnt)
    assert cnt[0].item() == 0  # current scaling maps amax exactly to 448: never overflows
    assert cnt[1].item() == 2
    assert cnt[6].item() == 1.0 and inv.item() == pytest.approx(1 / 448)
    assert q.float()[0].item() == 448.0
    # the count agrees with what the cast did
    flushed = ((q.float() == 0) & (x != 0)).sum().item()
    assert flushed == 2


def test_delayed_scaling_crafted_overflow_and_underflow_e4m3_and_e5m2():
    hist = torch.tensor([1.0, 0.0, 0.0, 0.0])  # history amax 1 -> s = 448
    cnt = torch.zeros(9, dtype=torch.float64)
    x = torch.tensor([2.0, -3.0, 1.0, 0.999, 1e-6, 0.0])  # |x·s| > 448 for 2 and -3
    q, _ = quantize(x, E4M3, history=hist, counters=cnt)
    assert cnt[0].item() == 2 and cnt[1].item() == 1
    assert q.float().abs().max().item() == 448.0  # saturated, not inf/NaN
    # e5m2: s = 57344; 1e-10·s = 5.7e-6 < 2^-17 flushes; 2^-16/s..: keep one that survives
    hist5 = torch.tensor([1.0])
    cnt5 = torch.zeros(9, dtype=torch.float64)
    x5 = torch.tensor([1.0, 1.5, 1e-10, 2e-9, 0.0])
    q5, _ = quantize(x5, E5M2, history=hist5, counters=cnt5)
    assert cnt5[0].item() == 1 and cnt5[1].item() == 1
    assert torch.isfinite(q5.float()).all()


def test_delayed_scaling_uses_history_then_updates_it():
    L = 3
    hist = torch.zeros(L)
    amaxes = [2.0, 8.0, 1.0, 0.5, 0.25, 4.0]
    used = []
    for a in amaxes:
        before = hist.clone()
        _, inv = quantize(torch.tensor([a, -a / 2]), E4M3, history=hist, counters=torch.zeros(9, dtype=torch.float64))
        used.append(inv.item() * 448)
        # history rolled, newest first, after use
        assert hist.tolist() == [a] + before.tolist()[:-1]
    # first call: empty history -> current amax; then max over the last L amaxes *before* this call
    expected = [2.0, 2.0, 8.0, 8.0, 8.0, 1.0]
    assert used == pytest.approx(expected)


def test_delayed_history_per_role_in_module_and_eval_does_not_touch():
    torch.manual_seed(0)
    m = FP8Linear(32, 16, bias=False, scaling="delayed", history_len=4)
    x = torch.randn(8, 32, requires_grad=True)
    m(x).sum().backward()
    h = m.amax_history
    assert h.shape == (3, 4)
    assert h[0, 0].item() == pytest.approx(x.abs().max().item())
    assert h[1, 0].item() == pytest.approx(m.weight.abs().max().item())
    assert h[2, 0].item() == pytest.approx(1.0)  # d(sum)/dy = 1
    m.eval()
    snap, cnt = h.clone(), m.fp8_counters.clone()
    with torch.no_grad():
        m(torch.randn(8, 32) * 100)
    assert torch.equal(m.amax_history, snap) and torch.equal(m.fp8_counters, cnt)


def test_state_dict_holds_weights_history_and_counters_and_round_trips():
    lin = nn.Linear(16, 8)
    f = FP8Linear.from_linear(lin, scaling="delayed", history_len=3)
    assert f.weight is lin.weight and f.bias is lin.bias
    assert set(f.state_dict()) == set(lin.state_dict()) | {"amax_history", "fp8_counters"}
    f(torch.randn(4, 16)).sum().backward()
    g = FP8Linear(16, 8, scaling="delayed", history_len=3)
    g.load_state_dict(f.state_dict())
    # the delayed-scaling state survives a checkpoint: the next step quantises identically
    x = torch.randn(4, 16) * 5
    assert torch.equal(f(x), g(x))
    assert torch.equal(f.amax_history, g.amax_history)


def test_bad_arguments_raise_config_error():
    with pytest.raises(ConfigError, match="scaling"):
        FP8Linear(4, 4, scaling="dynamic")
    with pytest.raises(ConfigError, match="history_len"):
        FP8Linear(4, 4, history_len=0)
    with pytest.raises(ConfigError, match="fp8_scope"):
        apply_fp8(nn.Sequential(nn.Linear(4, 4)), scope="attention")


class _FFN(nn.Module):
    def __init__(self, d=32, h=64):
        super().__init__()
        self.w_gate, self.w_up, self.w_down = nn.Linear(d, h, bias=False), nn.Linear(d, h, bias=False), nn.Linear(h, d, bias=False)

    def forward(self, x):
        return self.w_down(nn.functional.silu(self.w_gate(x)) * self.w_up(x))


class _Toy(nn.Module):
    def __init__(self, d=32, vocab=50):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([nn.ModuleDict({"attn_proj": nn.Linear(d, d), "ffn": _FFN(d)}) for _ in range(2)])
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, t):
        h = self.emb(t)
        for blk in self.layers:
            h = h + blk["attn_proj"](h)
            h = h + blk["ffn"](nn.functional.rms_norm(h, (h.shape[-1],)))
        return self.lm_head(h)


def test_apply_fp8_scopes():
    m = _Toy()
    names = apply_fp8(m, scope="ffn")
    assert sorted(names) == sorted(f"layers.{i}.ffn.{w}" for i in range(2) for w in ("w_gate", "w_up", "w_down"))
    assert type(m.layers[0]["attn_proj"]) is nn.Linear
    m2 = _Toy()
    names2 = apply_fp8(m2, scope="all", scaling="delayed")
    assert "lm_head" not in names2 and "layers.0.attn_proj" in names2 and len(names2) == 8
    assert apply_fp8(m2, scope="all") == []  # idempotent


def test_quick_fp8_training_run_stays_finite_and_counts():
    torch.manual_seed(0)
    m = _Toy()
    apply_fp8(m, scope="all", scaling="delayed", history_len=4)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    probe = FP8Probe(every=5)
    data = torch.randint(0, 50, (8, 17))
    losses, rows = [], []
    for step in range(20):
        probe.begin_step(step, m)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = m(data[:, :-1])
        loss = nn.functional.cross_entropy(logits.float().reshape(-1, 50), data[:, 1:].reshape(-1))
        loss.backward()
        row = probe.end_step(step, m)
        if row:
            rows.append(row)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 0.5
    assert len(rows) == 4
    last = rows[-1]
    for role in ("input", "weight", "grad_output"):
        assert math.isfinite(last[f"fp8/{role}/amax"]) and last[f"fp8/{role}/amax"] > 0
        assert 15 < last[f"fp8/{role}/snr_db"] < 45
    assert "fp8/layers.1.ffn.w_down/input/overflow" in last
    # SNR is measured on the sampled steps only (stats="sampled"): the probe switches it on and off
    assert all(not lin.snr_requested for lin in m.modules() if isinstance(lin, FP8Linear))
    # reset on read: a second read with no step in between is all zeros
    fp8_stats(m, reset=True)
    again = fp8_stats(m)
    assert again["fp8/overflow"] == 0 and again["fp8/input/underflow"] == 0


def test_apply_fp8_reaches_dense_shared_and_routed_experts_and_trains_finite():
    from steadylm.models import ModelConfig, build_model

    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("nano-moe", vocab_size=96, dim=32, n_heads=2, n_kv_heads=2, ffn_dim=64,
                                  expert_ffn_dim=16, n_experts=4, n_layers=2, max_seq_len=16,
                                  impl="reference")  # no kernel compilation in this test
    model = build_model(cfg)
    names = apply_fp8(model, scope="ffn", scaling="delayed", stats="full")
    assert "layers.0.ffn.w_down" in names  # dense first layer
    assert "layers.1.ffn.experts.w_down.3" in names  # routed expert 3
    assert "layers.1.ffn.shared_expert.w_gate" in names
    assert not any(".attn." in n for n in names)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.randint(0, 96, (4, 17))
    for _ in range(8):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(data[:, :-1])
        loss = nn.functional.cross_entropy(logits.float().reshape(-1, 96), data[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        assert math.isfinite(loss.item())
    stats = fp8_stats(model)
    assert stats["fp8/layers.1.ffn.experts.w_down.0/input/amax"] >= 0
    assert math.isfinite(stats["fp8/grad_output/snr_db"])


def test_snr_modes():
    x = torch.randn(64, 32)
    full = FP8Linear(32, 16, bias=False, stats="full")
    sampled = FP8Linear(32, 16, bias=False)  # default "sampled": only when a probe asks
    counts = FP8Linear(32, 16, bias=False, stats="counts")
    for m in (full, sampled, counts):
        m(x)
    assert 25 < full.read_fp8_stats()["input"]["snr_db"] < 40
    assert math.isnan(sampled.read_fp8_stats()["input"]["snr_db"])
    assert math.isnan(counts.read_fp8_stats()["input"]["snr_db"])
    sampled.snr_requested = counts.snr_requested = True
    sampled(x)
    counts(x)
    assert 25 < sampled.read_fp8_stats()["input"]["snr_db"] < 40
    assert math.isnan(counts.read_fp8_stats()["input"]["snr_db"])
    assert counts.read_fp8_stats()["input"]["calls"] == 2  # the other counters always run


def test_empty_input_rows_are_fine():
    m = FP8Linear(32, 16, bias=False)  # a routed expert that received no tokens
    x = torch.zeros(0, 32, requires_grad=True)
    y = m(x)
    y.sum().backward()
    assert y.shape == (0, 16) and x.grad.shape == (0, 32)
    assert torch.count_nonzero(m.weight.grad) == 0
