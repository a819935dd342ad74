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
