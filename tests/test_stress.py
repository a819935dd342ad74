"""Stress protocols: the switch keeps everything but the activation, the metrics mean what they
say, and each command writes its report. Tiny model, tiny corpus, reference math (no kernel
compilation), one thread."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from steadylm.cli import main
from steadylm.errors import ConfigError
from steadylm.lab import stress
from steadylm.train.metrics import read_metrics

TINY = ["--set", "dim=32", "--set", "n_layers=2", "--set", "n_heads=2", "--set", "n_kv_heads=2",
        "--set", "ffn_dim=64", "--impl", "reference", "--vocab-size", "300",
        "--batch-size", "2", "--seq-len", "16", "--threads", "1", "--spike-window", "4"]


@pytest.fixture(autouse=True)
def _restore_threads(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("STEADYLM_CACHE", str(tmp_path_factory.getbasetemp() / "steadylm-cache"))
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    rng = random.Random(0)
    words = ("the light of day and night upon the waters were many good things in the land "
             "he said unto them go forth and bring bread wine oil for all people").split()
    text = "\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(600))
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    return str(path)


def _rows(run_dir: Path) -> list[dict]:
    return read_metrics(run_dir / "metrics.jsonl")


def test_switch_metrics_on_a_synthetic_series():
    k = 10
    pre = [{"step": s, "loss": 3.0 + (0.01 if s % 2 else -0.01)} for s in range(1, k + 1)]
    # jump to 4.0 for 5 steps, then back to 2.5 from step 16 on
    after = [{"step": s, "loss": 4.0 if s <= 15 else 2.5} for s in range(k + 1, 31)]
    control = pre + [{"step": s, "loss": 2.8} for s in range(k + 1, 31)]
    m = stress.switch_metrics(pre + after, control, k, window=4, threshold=3.0)
    assert m["pre_switch_loss"] == pytest.approx(3.0 - 0.01 / 5)  # steps 6..10: two odd (+), three even (-)
    assert m["jump"] == pytest.approx(1.0 + 0.01 / 5)
    # 5-step running mean of steps 16..20 = 2.5 <= 3.0 first at step 19: (4+2.5*4)/5 = 2.8 at 19
    assert m["recovery_steps"] == 19 - k
    assert m["loss_gap"] == pytest.approx(2.5 - 2.8)
    assert m["spikes_after"] == 1 and m["spike_steps_after"] == [11]
    never = stress.switch_metrics(pre + [{"step": s, "loss": 3.5} for s in range(k + 1, 31)], control, k, 4, 3.0)
    assert never["recovery_steps"] is None


def test_switch_control_branch_equals_an_uninterrupted_run(corpus, tmp_path):
    out = tmp_path / "sw"
    args = ["stress", "switch", "--out", str(out), "--data", corpus, "--steps", "10", "--switch-step", "4",
            "--to", "powlu", "--probe-every", "5", *TINY]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["branches"]) == {"stay swiglu", "switch to powlu"}
    assert (out / "report.html").is_file() and (out / "plots" / "switch_losses.png").is_file()

    # the control, resumed from the step-4 checkpoint, is bit-identical to one uninterrupted run
    opts = stress.options_from_args(_parse(["stress", "switch", "--out", str(tmp_path / "whole"), "--data",
                                            corpus, "--steps", "10", "--probe-every", "5", *TINY]))
    data = stress._prepare(opts)
    whole = stress.train_run(opts, "swiglu", tmp_path / "whole", data, lr=opts.setting.lr,
                             precision=opts.setting.precision)
    stay = _rows(out / "stay-swiglu")
    assert [r["loss"] for r in stay] == [r["loss"] for r in whole.rows]
    assert len(stay) == 10
    # the switched branch shares steps 1..4 and differs afterwards, with PowLU in its config
    sw = _rows(out / "switch-powlu")
    assert [r["loss"] for r in sw[:4]] == [r["loss"] for r in stay[:4]]
    assert sw[4]["loss"] != stay[4]["loss"]
    cfg = json.loads((out / "switch-powlu" / "config.json").read_text())
    assert cfg["model"]["activation"] == "powlu" and cfg["train"]["precision"] == "fp8"
    # the FP8 probe logged counters in both phases
    assert any("fp8/input/snr_db" in r for r in sw if r["step"] > 4)


def _parse(argv):
    import argparse

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    stress.add_arguments(sub.add_parser("stress"))
    return parser.parse_args(argv)


def test_lr_sweep_and_fp8_protocols_write_their_reports(corpus, tmp_path):
    out = tmp_path / "lr"
    assert main(["stress", "lr-sweep", "--out", str(out), "--data", corpus, "--steps", "6",
                 "--activations", "swiglu,powlu", "--multipliers", "1,100", "--precision", "bf16",
                 "--probe-every", "3", *TINY]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert set(s["runs"]) == {"swiglu", "powlu"} and set(s["runs"]["swiglu"]) == {"1", "100"}
    run = s["runs"]["powlu"]["100"]
    assert run["lr"] == pytest.approx(100 * stress.STRESS.lr) and run["precision"] == "bf16"
    assert (out / "plots" / "lr_sensitivity.png").is_file()
    assert (out / "x100" / "powlu+rmsnorm" / "metrics.jsonl").is_file()
    # --resume re-reads finished runs (no training) and rebuilds the same summary
    (out / "summary.json").unlink()
    assert main(["stress", "lr-sweep", "--out", str(out), "--data", corpus, "--steps", "6",
                 "--activations", "swiglu,powlu", "--multipliers", "1,100", "--precision", "bf16",
                 "--probe-every", "3", "--resume", *TINY]) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["runs"]["powlu"]["100"]["final_train_loss"] == run["final_train_loss"]

    out8 = tmp_path / "fp8"
    assert main(["stress", "fp8", "--out", str(out8), "--data", corpus, "--steps", "6", "--stable",
                 "--activations", "swiglu,swiglu_clip", "--probe-every", "3", *TINY]) == 0
    s8 = json.loads((out8 / "summary.json").read_text())
    v = s8["variants"]["swiglu"]
    assert v["bf16"]["precision"] == "bf16" and v["fp8"]["precision"] == "fp8"
    assert "fp8_input_snr_db_median" in v["fp8"] and "fp8_input_snr_db_median" not in v["bf16"]
    assert 20 < v["fp8"]["fp8_input_snr_db_median"] < 40  # e4m3 with current scaling: ~31 dB
    assert v["fp8"]["fp8_input_overflow"] == 0  # current scaling cannot overflow
    md = (out8 / "summary.md").read_text()
    assert "swiglu/swiglu_clip" in md and "FP8 counters" in md
    rows = _rows(out8 / "fp8" / "swiglu+rmsnorm")
    assert any("fp8/layers.1.ffn.w_down/input/snr_db" in r for r in rows)  # per-tensor counters


@pytest.mark.parametrize("argv, field", [
    (["switch", "--steps", "10", "--switch-step", "10"], "--switch-step"),
    (["lr-sweep", "--multipliers", "1,-2"], "--multipliers"),
    (["fp8", "--activations", "swiglu,relu9"], "relu9"),
    (["fp8", "--warmup-steps", "50", "--steps", "10"], "--warmup-steps"),
    (["fp8", "--set", "qk_norm=true"], "--qk-norm"),
])
def test_bad_options_name_the_field(argv, field):
    with pytest.raises(ConfigError, match=field.replace("-", r"\-")):
        stress.options_from_args(_parse(["stress", *argv]))


def test_setting_descriptions_are_plain():
    text = stress.STRESS.describe()
    assert "no gradient clipping" in text and "delayed" in text and math.isfinite(stress.STRESS.lr)


def test_divergence_verdict_separates_transient_excursions_from_divergence():
    rows = [{"step": i + 1, "loss": v} for i, v in enumerate([5.0, 5.5, 4.0, 3.0])]
    transient = {"diverged": {"step": 2, "reason": "above-start"}, "final_train_loss": 3.5, "error": None}
    assert stress._divergence(transient, rows) == {"divergence": None, "excursion": 2, "peak_above_start": 0.5}
    ended = {"diverged": {"step": 2, "reason": "above-start"}, "final_train_loss": 5.2, "error": None}
    assert stress._divergence(ended, rows)["divergence"]["reason"] == "ended above its starting loss"
    stopped = {"diverged": None, "final_train_loss": 3.0, "error": "non-finite loss (nan)", "diverged_at": 7}
    v = stress._divergence(stopped, rows)
    assert v["divergence"] == {"step": 7, "reason": "non-finite loss (nan)"}
    assert stress._status(v) == "diverged at step 7: non-finite loss (nan)"
