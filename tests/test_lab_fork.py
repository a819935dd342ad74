"""``steadylm.train.fork.fork_run``: a fork continues the source run exactly, with a new model
config, and leaves the source untouched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from steadylm.errors import CheckpointError
from steadylm.train import Trainer, TrainConfig, read_checkpoint_state
from steadylm.train.fork import fork_run
from steadylm.train.metrics import read_metrics


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory):
    from steadylm.data import load_kjv, prepare_data

    mp = pytest.MonkeyPatch()
    mp.setenv("STEADYLM_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    corpus = tmp_path_factory.mktemp("corpus") / "genesis.txt"
    corpus.write_text("\n".join(load_kjv()[:500]), encoding="utf-8")
    try:
        return prepare_data(str(corpus), vocab_size=300, seq_len=16)
    finally:
        mp.undo()


def _config(data, activation: str):
    from steadylm.models import ModelConfig

    return ModelConfig.from_preset("nano", dim=32, n_layers=2, n_heads=2, n_kv_heads=2, ffn_dim=48,
                                   activation=activation, vocab_size=data.vocab_size, max_seq_len=16,
                                   impl="reference")


TRAIN = TrainConfig(steps=6, batch_size=2, warmup_steps=1, eval_every=3, eval_batches=1, probe_every=0, threads=1)


def test_a_fork_continues_the_source_run_and_can_change_the_model(data, tmp_path: Path):
    whole = Trainer(_config(data, "swiglu"), TRAIN, data, tmp_path / "whole").run()
    src = tmp_path / "src"
    Trainer(_config(data, "swiglu"), TRAIN, data, src).run(stop_after=3)
    before = (src / "metrics.jsonl").read_bytes()

    same = tmp_path / "same"
    fork_run(src, same, step=3)
    Trainer(_config(data, "swiglu"), TRAIN, data, same).run(resume=True)
    assert [r["loss"] for r in read_metrics(same / "metrics.jsonl")] == \
        [r["loss"] for r in read_metrics(whole.metrics_jsonl)]

    switched = tmp_path / "switched"
    ckpt = fork_run(src, switched, model_config=_config(data, "powlu"))
    assert read_checkpoint_state(ckpt).configs["model"]["activation"] == "powlu"
    assert [r["step"] for r in read_metrics(switched / "metrics.jsonl")] == [1, 2, 3]
    result = Trainer(_config(data, "powlu"), TRAIN, data, switched).run(resume=True)
    assert result.resumed_from == 3 and result.steps_done == 6
    rows = read_metrics(switched / "metrics.jsonl")
    assert [r["loss"] for r in rows[:3]] == [r["loss"] for r in read_metrics(whole.metrics_jsonl)[:3]]
    assert rows[3]["loss"] != read_metrics(whole.metrics_jsonl)[3]["loss"]
    assert json.loads((switched / "config.json").read_text())["model"]["activation"] == "powlu"
    # the source is untouched
    assert (src / "metrics.jsonl").read_bytes() == before
    assert read_checkpoint_state(src / "checkpoint").configs["model"]["activation"] == "swiglu"


def test_fork_errors_name_the_problem(data, tmp_path: Path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        fork_run(tmp_path / "empty", tmp_path / "dst")
    src = tmp_path / "src"
    Trainer(_config(data, "swiglu"), TRAIN, data, src).run(stop_after=2)
    with pytest.raises(CheckpointError, match="at step 2"):
        fork_run(src, tmp_path / "dst", step=4)
    with pytest.raises(CheckpointError, match="into itself"):
        fork_run(src, src)
