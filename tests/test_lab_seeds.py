"""Spread over seeds (``steadylm compare --seeds``): the statistics against numpy, the marking rule,
and a tiny two-seed comparison end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from steadylm.cli import main
from steadylm.errors import ConfigError
from steadylm.lab.seeds import SEED_METRICS, SeedStats, exceeds_spread, seed_stats, seed_table, validate_seeds
from steadylm.train.metrics import read_metrics

TINY_FLAGS = [
    "--steps", "4", "--batch-size", "2", "--seq-len", "16", "--set", "train.probe_every=2",
    "--set", "train.eval_every=2", "--set", "model.dim=32", "--set", "model.n_layers=2",
    "--set", "model.n_heads=2", "--set", "model.n_kv_heads=2", "--set", "model.ffn_dim=48",
    "--impl", "reference", "--vocab-size", "300", "--set", "probes.spike_window=2",
]


def test_seed_stats_match_numpy() -> None:
    values = (4.71, 4.69, 4.75, math.nan)
    s = SeedStats(values)
    finite = np.array(values[:3])
    assert s.n == 3 and s.n_nonfinite == 1
    assert s.mean == pytest.approx(float(finite.mean()), rel=1e-15)
    assert s.sd == pytest.approx(float(finite.std(ddof=1)), rel=1e-12)
    assert (s.low, s.high) == (float(finite.min()), float(finite.max()))
    assert math.isnan(SeedStats((1.0,)).sd)
    assert math.isnan(SeedStats((math.inf,)).mean)


def test_exceeds_spread_is_disjoint_ranges() -> None:
    base = SeedStats((1.0, 1.2, 1.1))
    assert exceeds_spread(SeedStats((1.3, 1.4)), base)
    assert exceeds_spread(SeedStats((0.5, 0.9)), base)
    assert not exceeds_spread(SeedStats((1.15, 1.5)), base)  # overlaps at the top
    assert not exceeds_spread(SeedStats((0.9, 1.0)), base)  # touches: not disjoint
    assert not exceeds_spread(SeedStats((5.0,)), base)  # one seed: no spread to compare with


def test_seed_table_marks_only_differences_beyond_the_spread() -> None:
    def summary(val: float) -> SimpleNamespace:
        return SimpleNamespace(**{key: val for key, _, _ in SEED_METRICS})

    stats = seed_stats({"swiglu+rmsnorm": [summary(v) for v in (4.70, 4.72, 4.71)],
                        "near": [summary(v) for v in (4.715, 4.75, 4.73)],
                        "far": [summary(v) for v in (4.90, 4.95, 4.93)]})
    table = seed_table(stats, "swiglu+rmsnorm")
    lines = {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}
    assert "†" not in lines["swiglu+rmsnorm"] and "†" not in lines["near"]
    assert lines["far"].count("†") == len(SEED_METRICS)
    assert "4.710 ± 0.010 [4.700, 4.720]" in lines["swiglu+rmsnorm"]


@pytest.mark.parametrize("bad", [[], [0, 0], [-1, 2]])
def test_bad_seed_lists_are_config_errors(bad: list[int]) -> None:
    with pytest.raises(ConfigError, match="--seeds"):
        validate_seeds(bad)
    assert validate_seeds(None) is None


def test_compare_with_two_seeds_reports_the_spread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from steadylm.data import load_kjv

    monkeypatch.setenv("STEADYLM_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "genesis.txt"
    corpus.write_text("\n".join(load_kjv()[:300]), encoding="utf-8")
    out = tmp_path / "out"
    assert main(["compare", "--out", str(out), "--data", str(corpus), "--variants",
                 "swiglu+rmsnorm,swiglu+bhyt", "--seeds", "3,5", *TINY_FLAGS]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"]["seeds"] == [3, 5]
    for variant in ("swiglu+rmsnorm", "swiglu+bhyt"):
        # the statistics are of the runs on disk: each seed's last validation loss, re-read
        vals = []
        for seed in (3, 5):
            rows = read_metrics(out / f"seed{seed}" / variant / "metrics.jsonl")
            assert json.loads((out / f"seed{seed}" / variant / "config.json").read_text())["train"]["seed"] == seed
            vals.append([r["val_loss"] for r in rows if "val_loss" in r][-1])
        assert vals[0] != vals[1]  # the seed really changed the run
        stats = summary["seeds"]["variants"][variant]["final_val_loss"]
        assert stats["values"] == pytest.approx(vals, rel=0, abs=0)
        assert stats["sd"] == pytest.approx(float(np.std(vals, ddof=1)), rel=1e-12)
    md = (out / "summary.md").read_text()
    assert "## Spread over seeds" in md and "[min, max]" in md


def test_depth_ladder_with_two_seeds_reports_the_spread_per_point(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from steadylm.data import load_kjv

    monkeypatch.setenv("STEADYLM_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "genesis.txt"
    corpus.write_text("\n".join(load_kjv()[:300]), encoding="utf-8")
    out = tmp_path / "depth"
    assert main(["ladder", "--axis", "depth", "--depths", "1,2", "--depth-width", "16", "--steps", "4",
                 "--seeds", "0,1", "--set", "train.probe_every=2", "--set", "train.eval_every=2",
                 "--set", "train.warmup_steps=1", "--variants", "swiglu+rmsnorm,swiglu+bhyt", "--out", str(out),
                 "--data", str(corpus), "--vocab-size", "300", "--seq-len", "16", "--batch-size", "4",
                 "--impl", "reference", "--set", "train.eval_batches=1", "--set", "train.threads=1"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    for depth in ("1", "2"):
        for variant in ("swiglu+rmsnorm", "swiglu+bhyt"):
            got = summary["seeds"]["points"][depth][variant]["final_val_loss"]
            want = [r["summary"]["final_val_loss"] for r in summary["runs"]
                    if str(r["depth"]) == depth and r["variant"] == variant]
            assert len(want) == 2 and got["values"] == want
            assert got["mean"] == pytest.approx(float(np.mean(want)), rel=1e-15)
    assert "## Spread over seeds" in (out / "summary.md").read_text()


def _result(name: str, norm: str, **fields: float) -> SimpleNamespace:
    numbers = {"down_in_amax_last": 30.0, "down_in_kurtosis_last": 100.0, "last_layer_hidden_var": 10.0,
               "final_val_loss": 4.7, "bhyt_pearson_r_min": math.nan, "tanh_saturation_max": math.nan,
               "spikes": 0, "spike_steps": [], "divergence": None, "dead": None,
               "bhyt_pearson_r_layer_means": math.nan, "tanh_saturation_worst_site": "layer0/ffn_norm"}
    numbers.update(fields)
    return SimpleNamespace(name=name, summary=SimpleNamespace(norm=norm, **numbers))


def test_findings_over_seeds_quote_means_and_say_whether_the_spread_is_exceeded() -> None:
    from steadylm.lab.compare import findings

    maxima = {"swiglu+rmsnorm": (32.8, 20.9, 25.0), "powlu+rmsnorm": (22.0, 27.5, 24.0),
              "swiglu_clip+rmsnorm": (10.0, 11.0, 12.0), "swiglu+bhyt": (15.0, 14.0, 16.0)}
    variance = {"swiglu+rmsnorm": (11.9, 20.1, 14.0), "powlu+rmsnorm": (12.0, 13.0, 14.0),
                "swiglu_clip+rmsnorm": (12.0, 13.0, 14.0), "swiglu+bhyt": (4.4, 3.0, 2.0)}
    per_seed = {name: [SimpleNamespace(final_val_loss=4.7 + 0.01 * k, final_train_loss=4.7,
                                       down_in_amax_last=maxima[name][k], last_layer_hidden_var=variance[name][k])
                       for k in range(3)] for name in maxima}
    stats = seed_stats(per_seed)
    # seed 0's runs: PowLU's maximum looks 1.49x smaller than SwiGLU's in this seed alone
    results = [_result(name, "bhyt" if "bhyt" in name else "rmsnorm", down_in_amax_last=maxima[name][0],
                       last_layer_hidden_var=variance[name][0], tanh_saturation_max=0.001 if "bhyt" in name else math.nan)
               for name in maxima]
    lines = findings(results, stats, curves_seed=0)
    powlu = next(line for line in lines if line.startswith("**powlu+rmsnorm** vs"))
    clip = next(line for line in lines if line.startswith("**swiglu_clip+rmsnorm** vs"))
    bhyt = next(line for line in lines if line.startswith("**swiglu+bhyt** vs"))
    assert f"{stats['powlu+rmsnorm']['down_in_amax_last'].mean:.3g} vs {stats['swiglu+rmsnorm']['down_in_amax_last'].mean:.3g}" in powlu
    assert "within the seed spread" in powlu and "means over 3 seeds" in powlu
    assert "beyond the seed spread" in clip and "beyond the seed spread" in bhyt
    assert "kurtosis ratio 1.00× (seed 0)" in powlu  # no spread for it: labelled as one seed's
    assert any(line.startswith("**swiglu+bhyt** (seed 0): worst tanh saturation") for line in lines)
    # one seed: seed 0's numbers, no claim about a spread
    single = findings(results)
    powlu_single = next(line for line in single if line.startswith("**powlu+rmsnorm** vs"))
    assert "22 vs 32.8 (1.49× — smaller)" in powlu_single and "spread" not in powlu_single
