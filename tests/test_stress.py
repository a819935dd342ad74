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
from steadylm.lab import stress
from steadylm.lab.switch import switch_metrics
from steadylm.train.metrics import read_metrics

TINY = ["--set", "model.dim=32", "--set", "model.n_layers=2", "--set", "model.n_heads=2",
        "--set", "model.n_kv_heads=2", "--set", "model.ffn_dim=64", "--impl", "reference",
        "--vocab-size", "300", "--batch-size", "2", "--seq-len", "16", "--set", "train.threads=1",
        "--set", "probes.spike_window=4"]


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
    m = switch_metrics(pre + after, control, k, window=4, threshold=3.0)
    assert m["pre_switch_loss"] == pytest.approx(3.0 - 0.01 / 5)  # steps 6..10: two odd (+), three even (-)
    assert m["jump"] == pytest.approx(1.0 + 0.01 / 5)
    # 5-step running mean of steps 16..20 = 2.5 <= 3.0 first at step 19: (4+2.5*4)/5 = 2.8 at 19
    assert m["recovery_steps"] == 19 - k
    assert m["loss_gap"] == pytest.approx(2.5 - 2.8)
    assert m["spikes_after"] == 1 and m["spike_steps_after"] == [11]
    never = switch_metrics(pre + [{"step": s, "loss": 3.5} for s in range(k + 1, 31)], control, k, 4, 3.0)
    assert never["recovery_steps"] is None


def test_switch_control_branch_equals_an_uninterrupted_run(corpus, tmp_path):
    out = tmp_path / "sw"
    args = ["stress", "switch", "--out", str(out), "--data", corpus, "--steps", "10", "--switch-step", "4",
            "--to", "powlu", "--set", "train.probe_every=5", *TINY]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["branches"]) == {"stay swiglu", "switch to powlu"}
    assert (out / "report.html").is_file() and (out / "plots" / "switch_losses.png").is_file()

    # the control, forked at the step-4 checkpoint, is bit-identical to one uninterrupted run (the
    # LR sweep's 1x run has the same spec: the stress setting, swiglu+rmsnorm, FP8)
    whole = tmp_path / "whole"
    assert main(["stress", "lr-sweep", "--out", str(whole), "--data", corpus, "--steps", "10",
                 "--activations", "swiglu", "--multipliers", "1", "--set", "train.probe_every=5", *TINY]) == 0
    stay = _rows(out / "stay-swiglu")
    assert [r["loss"] for r in stay] == [r["loss"] for r in _rows(whole / "x1" / "swiglu+rmsnorm")]
    assert len(stay) == 10
    # the switched branch shares steps 1..4 and differs afterwards, with PowLU in its config
    sw = _rows(out / "switch-powlu")
    assert [r["loss"] for r in sw[:4]] == [r["loss"] for r in stay[:4]]
    assert sw[4]["loss"] != stay[4]["loss"]
    cfg = json.loads((out / "switch-powlu" / "config.json").read_text())
    assert cfg["model"]["activation"] == "powlu" and cfg["train"]["precision"] == "fp8"
    # the FP8 probe logged counters in both phases
    assert any("fp8/input/snr_db" in r for r in sw if r["step"] > 4)


def test_lr_sweep_and_fp8_protocols_write_their_reports(corpus, tmp_path):
    out = tmp_path / "lr"
    sweep = ["stress", "lr-sweep", "--out", str(out), "--data", corpus, "--steps", "6",
             "--activations", "swiglu,powlu", "--multipliers", "1,100", "--precision", "bf16",
             "--set", "train.probe_every=3", *TINY]
    assert main(sweep) == 0
    s = json.loads((out / "summary.json").read_text())
    assert set(s["runs"]) == {"swiglu+rmsnorm", "powlu+rmsnorm"} and set(s["runs"]["swiglu+rmsnorm"]) == {"1", "100"}
    run = s["runs"]["powlu+rmsnorm"]["100"]
    assert run["lr"] == pytest.approx(100 * stress.STRESS_SPEC.train.lr) and run["precision"] == "bf16"
    assert (out / "plots" / "lr_sensitivity.png").is_file()
    assert (out / "x100" / "powlu+rmsnorm" / "metrics.jsonl").is_file()
    # --resume re-reads finished runs (no training: the metrics files are not rewritten)
    (out / "summary.json").unlink()
    metrics = out / "x100" / "powlu+rmsnorm" / "metrics.jsonl"
    before = metrics.stat().st_mtime_ns
    assert main([*sweep, "--resume"]) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["runs"]["powlu+rmsnorm"]["100"]["final_train_loss"] == run["final_train_loss"]
    assert metrics.stat().st_mtime_ns == before

    out8 = tmp_path / "fp8"
    assert main(["stress", "fp8", "--out", str(out8), "--data", corpus, "--steps", "6", "--stable",
                 "--activations", "swiglu,swiglu_clip", "--set", "train.probe_every=3", *TINY]) == 0
    s8 = json.loads((out8 / "summary.json").read_text())
    v = s8["variants"]["swiglu+rmsnorm"]
    assert v["bf16"]["precision"] == "bf16" and v["fp8"]["precision"] == "fp8"
    assert v["fp8"]["fp8"] and not v["bf16"]["fp8"]
    assert 20 < v["fp8"]["fp8"]["input"]["snr_db_median"] < 40  # e4m3 with current scaling: ~31 dB
    assert v["fp8"]["fp8"]["input"]["overflow"] == 0  # current scaling cannot overflow
    md = (out8 / "summary.md").read_text()
    assert "swiglu+rmsnorm/swiglu_clip+rmsnorm" in md and "FP8 counters" in md
    rows = _rows(out8 / "fp8" / "swiglu+rmsnorm")
    assert any("fp8/layers.1.ffn.w_down/input/snr_db" in r for r in rows)  # per-tensor counters


@pytest.mark.parametrize("argv, needle", [
    (["switch", "--steps", "10", "--switch-step", "10"], "--switch-step"),
    (["switch", "--variants", "swiglu+rmsnorm"], "--from"),
    (["lr-sweep", "--multipliers", "1,-2"], "--multipliers"),
    (["fp8", "--activations", "swiglu,relu9"], "relu9"),
    (["fp8", "--set", "train.warmup_steps=50", "--steps", "10"], "warmup_steps"),
    (["fp8", "--set", "parallel.mode=fsdp"], "one process"),
])
def test_bad_options_name_the_field(argv, needle, tmp_path, capsys):
    assert main(["stress", *argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and needle in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_setting_descriptions_are_plain():
    text = stress.describe(stress.STRESS_SPEC)
    assert "no gradient clipping" in text and "delayed" in text and math.isfinite(stress.STRESS_SPEC.train.lr)
    assert "clipping at 1" in stress.describe(stress.STABLE_SPEC)
