"""The one run summary: divergence vs excursion, dead variants (synthetic rows and a real run),
and the metric-key module it reads with."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from steadylm.cli import main
from steadylm.lab.summary import DEAD_SATURATION, dead_reason, status, summarize
from steadylm.probes import keys as K


def _summ(rows, stopped=None):
    return summarize(rows, variant="v", activation="swiglu", norm="rmsnorm", spike_window=3,
                     spike_threshold=4.0, stopped=stopped)


def _loss_rows(values):
    return [{"step": i + 1, "loss": v} for i, v in enumerate(values)]


def test_divergence_is_separated_from_a_transient_excursion():
    transient = _summ(_loss_rows([5.0, 5.5, 4.0, 3.0]))
    assert transient.divergence is None and transient.excursion == 2
    assert transient.peak_above_start == pytest.approx(0.5) and status(transient).startswith("ok (transient")
    ended = _summ(_loss_rows([5.0, 5.5, 5.2, 5.3]))
    assert ended.divergence == {"step": 2, "reason": "ended above its starting loss"}
    stopped = _summ(_loss_rows([5.0, 4.0, 3.0]), stopped=(7, "non-finite loss (nan)"))
    assert stopped.divergence == {"step": 7, "reason": "non-finite loss (nan)"}
    assert status(stopped) == "diverged at step 7: non-finite loss (nan)"
    assert _summ(_loss_rows([5.0, 4.0, 3.0])).divergence is None


def _probe_row(step, gate, up, sat=None):
    row = {"step": step, "loss": 5.0, "grad_norm": 0.5}
    for i, (g, u) in enumerate(zip(gate, up)):
        row[K.layer_key(K.GRAD_GATE, i, "amax")] = g
        row[K.layer_key(K.GRAD_UP, i, "amax")] = u
        row[K.layer_key(K.DOWN_IN, i, "amax")] = 1.0
    for site, value in (sat or {}).items():
        row[K.site_key(K.SAT, site, 0)] = value
    return row


def test_dead_reasons_from_synthetic_rows():
    live = [_probe_row(10, [1e-3, 1e-4], [1e-3, 2e-4], {"attn_norm": 0.01})]
    assert dead_reason(live) is None
    vanished = [_probe_row(10, [1e-3, 1e-43], [1e-3, 3e-40])]
    reason = dead_reason(vanished)
    assert reason.startswith("vanishing gradients") and "layer 1" in reason and "1e-43" in reason
    saturated = [_probe_row(10, [1e-3], [1e-3], {"attn_norm": 0.2, "ffn_norm": DEAD_SATURATION + 0.4})]
    reason = dead_reason(saturated)
    assert reason.startswith("saturated tanh") and "sat/layer0/ffn_norm" in reason
    flat = [{"step": s, "loss": 5.0, "grad_norm": 1e-12} for s in range(1, 30)]
    assert dead_reason(flat).startswith("vanishing gradients: global gradient norm")
    s = _summ(saturated + _loss_rows([5.0]))
    assert s.dead and status(s).startswith("dead")


def test_metric_keys_round_trip():
    assert K.layer_key(K.DOWN_IN, 3, "p99") == "ffn_down_in/layer3/p99"
    assert K.layer_key(K.DOWN_IN, 3, "p99", "routed") == "ffn_down_in/layer3/routed/p99"
    assert K.parse_key("ffn_down_in/layer3/routed/p99") == K.LayerKey(K.DOWN_IN, 3, "p99", "routed")
    assert K.parse_key("sat/final_norm") == K.LayerKey(K.SAT, None, "final_norm")
    assert str(K.parse_key("lam/layer2/attn_norm")) == "lam/layer2/attn_norm"
    assert K.parse_key("loss") is None and K.parse_key("fp8/input/amax") is None
    assert K.parse_fp8_key("fp8/layers.1.ffn.w_down/input/snr_db") == K.Fp8Key("layers.1.ffn.w_down", "input", "snr_db")
    assert K.parse_fp8_key(K.fp8_key("overflow")) == K.Fp8Key(None, None, "overflow")
    row = {"ffn_down_in/layer0/amax": 2.0, "ffn_down_in/layer1/routed/amax": 5.0,
           "ffn_down_in/layer1/shared/amax": 3.0, "ffn_down_in/layer1/p99": 1.0}
    assert K.layer_values(row, K.DOWN_IN, "amax") == {0: 2.0, 1: 5.0}
    assert K.layer_values(row, K.DOWN_IN, "amax", part="shared") == {1: 3.0}
    assert K.max_over_layers(row, K.DOWN_IN, "amax") == 5.0 and math.isnan(K.max_over_layers(row, K.HIDDEN, "var"))
    assert K.layer_count([row], K.DOWN_IN) == 2


def test_a_saturated_dyt_variant_is_reported_dead(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path_factory: pytest.TempPathFactory):
    """DyT with α0 = 50 at every site: tanh(50·x) is a sign function from the first step."""
    from steadylm.data import load_kjv

    monkeypatch.setenv("STEADYLM_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(load_kjv()[:500]), encoding="utf-8")
    out = tmp_path / "out"
    assert main(["compare", "--out", str(out), "--data", str(corpus), "--variants", "swiglu+rmsnorm,swiglu+dyt",
                 "--steps", "4", "--batch-size", "2", "--seq-len", "16", "--set", "train.probe_every=2",
                 "--set", "model.dim=32", "--set", "model.n_layers=2", "--set", "model.n_heads=2", "--set", "model.n_kv_heads=2",
                 "--set", "model.ffn_dim=48", "--set", "model.dyt_alpha_attn=50.0",
                 "--set", "model.dyt_alpha_other=50.0", "--impl", "reference", "--vocab-size", "300"]) == 0
    by = {v["variant"]: v for v in json.loads((out / "summary.json").read_text())["variants"]}
    assert by["swiglu+rmsnorm"]["dead"] is None
    assert by["swiglu+dyt"]["dead"].startswith("saturated tanh"), by["swiglu+dyt"]["dead"]
    md = (out / "summary.md").read_text()
    assert "dead — saturated tanh" in md
