"""Checkpoints: round trip, and a process SIGKILLed while writing one leaves the previous loadable.

The crash tests run a real training process and kill it with SIGKILL at two points of its second
checkpoint save: (a) with the DCP shard half written in the staging directory, and
(b) between the two renames of the swap (``checkpoint`` already moved to ``checkpoint.old``, the
new one not yet in place). The process is paused there by wrapping the RNG write that follows the shard write
(or ``os.rename``; the real save code runs up to that point), then killed from outside.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from steadylm.data import TokenData, prepare_data
from steadylm.errors import CheckpointError
from steadylm.models import ModelConfig
from steadylm.train import (
    TIMING_KEYS,
    TrainConfig,
    Trainer,
    find_checkpoint,
    load_checkpoint,
    read_metrics,
    save_checkpoint,
)

MODEL = dict(dim=32, n_layers=2, n_heads=2, n_kv_heads=2, ffn_dim=64, activation="swiglu", norm="rmsnorm",
             impl="reference")
TRAIN = dict(steps=6, batch_size=4, warmup_steps=2, eval_every=0, eval_batches=1, ckpt_every=2, seed=3,
             threads=1, progress=False)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "steadylm-cache"


@pytest.fixture(scope="module")
def data(cache_dir: Path) -> TokenData:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("STEADYLM_CACHE", str(cache_dir))
        return prepare_data(None, vocab_size=512, seq_len=32)


def model_config(data: TokenData) -> ModelConfig:
    return ModelConfig.from_preset("nano", vocab_size=data.vocab_size, max_seq_len=data.seq_len, **MODEL)


def test_round_trip_restores_model_optimizer_and_rng(data: TokenData, tmp_path: Path) -> None:
    trainer = Trainer(model_config(data), TrainConfig(**TRAIN), data, tmp_path / "run")
    trainer.run()
    model, optimizer = trainer.model, trainer.optimizer
    torch.manual_seed(1234)
    path = save_checkpoint(tmp_path / "manual", model, optimizer, step=6, counters={"tokens_seen": 5})
    expected_draw = torch.rand(3)

    other = Trainer(model_config(data), TrainConfig(**{**TRAIN, "seed": 4}), data, tmp_path / "other")
    other._build(torch.device("cpu"))
    state = load_checkpoint(path, other.model, other.optimizer)
    assert state.step == 6 and state.counters == {"tokens_seen": 5}
    assert torch.equal(torch.rand(3), expected_draw)  # the torch generator continues where it was
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, other.model.state_dict()[name]), name
    # Tied embedding stored once, restored as one shared tensor.
    assert other.model.lm_head.weight.data_ptr() == other.model.embed.weight.data_ptr()
    original, restored = optimizer.state_dict(), other.optimizer.state_dict()
    assert original["param_groups"] == restored["param_groups"]
    for index, values in original["state"].items():
        for key, value in values.items():
            assert torch.equal(value, restored["state"][index][key]), (index, key)


def test_find_checkpoint_falls_back_to_the_old_one(data: TokenData, tmp_path: Path) -> None:
    Trainer(model_config(data), TrainConfig(**{**TRAIN, "steps": 2}), data, tmp_path).run()
    assert find_checkpoint(tmp_path) == tmp_path / "checkpoint"
    os.rename(tmp_path / "checkpoint", tmp_path / "checkpoint.old")
    assert find_checkpoint(tmp_path) == tmp_path / "checkpoint.old"
    (tmp_path / "checkpoint").mkdir()  # a checkpoint dir without state.json is never trusted
    assert find_checkpoint(tmp_path) == tmp_path / "checkpoint.old"


def test_incomplete_checkpoint_without_a_previous_one_is_an_error(data: TokenData, tmp_path: Path) -> None:
    (tmp_path / "checkpoint").mkdir()
    with pytest.raises(CheckpointError, match="incomplete"):
        find_checkpoint(tmp_path)


# ----------------------------------------------------------------------------------------------
# SIGKILL during a save
# ----------------------------------------------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from steadylm.data import prepare_data
    from steadylm.models import ModelConfig
    from steadylm.train import TrainConfig, Trainer
    from steadylm.train import dcp

    phase, run_dir, marker = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    MODEL, TRAIN = {model!r}, {train!r}

    def pause_here():
        marker.write_text(str(os.getpid()))
        time.sleep(300)  # the test kills us here
        sys.exit("not killed")

    saves = {{"model": 0}}
    real_save_rng, real_rename = dcp._save_rng, os.rename

    def save_rng(path):
        # called once per save, after DCP wrote the shard and before the commit
        saves["model"] += 1
        if phase == "mid-write" and saves["model"] == 2:
            shard = path.parent / "__0_0.distcp"
            blob = shard.read_bytes()
            with open(shard, "wb") as handle:  # the shard, half written
                handle.write(blob[: len(blob) // 2])
                handle.flush()
                os.fsync(handle.fileno())
            pause_here()
        real_save_rng(path)

    def rename(src, dst):
        real_rename(src, dst)
        if phase == "mid-swap" and Path(dst).name == "checkpoint.old" and saves["model"] == 2:
            pause_here()

    dcp._save_rng = save_rng
    os.rename = rename
    data = prepare_data(None, vocab_size=512, seq_len=32)
    cfg = ModelConfig.from_preset("nano", vocab_size=data.vocab_size, max_seq_len=data.seq_len, **MODEL)
    Trainer(cfg, TrainConfig(**TRAIN), data, run_dir).run()
    sys.exit("finished without pausing")
    """
)


def _start_child(phase: str, run_dir: Path, cache_dir: Path, script: Path) -> tuple[subprocess.Popen, Path]:
    marker = run_dir.parent / f"{phase}.paused"
    env = {**os.environ, "STEADYLM_CACHE": str(cache_dir)}
    process = subprocess.Popen(
        [sys.executable, str(script), phase, str(run_dir), str(marker)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    return process, marker


def _kill_when_paused(process: subprocess.Popen, marker: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if process.poll() is not None:
            out, err = process.communicate()
            pytest.fail(f"child exited ({process.returncode}) before pausing:\n{err.decode()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("child did not reach the checkpoint pause in time")
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL


def test_kill_during_checkpoint_leaves_previous_one_loadable(
    data: TokenData, cache_dir: Path, tmp_path: Path
) -> None:
    script = tmp_path / "child.py"
    script.write_text(_CHILD.format(model=MODEL, train=TRAIN))
    runs = {phase: tmp_path / phase / "run" for phase in ("mid-write", "mid-swap")}
    # Both children run at once (separate directories) to halve the wall time.
    children = {phase: _start_child(phase, run, cache_dir, script) for phase, run in runs.items()}
    for process, marker in children.values():
        _kill_when_paused(process, marker)

    # What the crash left on disk.
    assert any(p.name.startswith(".checkpoint.staging-") for p in runs["mid-write"].iterdir())
    assert (runs["mid-write"] / "checkpoint" / "state.json").is_file()
    assert not (runs["mid-swap"] / "checkpoint").exists()
    assert (runs["mid-swap"] / "checkpoint.old" / "state.json").is_file()

    reference = Trainer(model_config(data), TrainConfig(**TRAIN), data, tmp_path / "reference")
    reference.run()
    expected = [{k: v for k, v in row.items() if k not in TIMING_KEYS}
                for row in read_metrics(tmp_path / "reference" / "metrics.jsonl")]
    for phase, run_dir in runs.items():
        found = find_checkpoint(run_dir)
        probe = Trainer(model_config(data), TrainConfig(**TRAIN), data, tmp_path / f"{phase}-probe")
        probe._build(torch.device("cpu"))
        assert load_checkpoint(found, probe.model, probe.optimizer).step == 2, phase

        # Resuming from the surviving checkpoint reproduces the uninterrupted run exactly.
        resumed = Trainer(model_config(data), TrainConfig(**TRAIN), data, run_dir).run(resume=True)
        assert resumed.resumed_from == 2 and resumed.steps_done == 6, phase
        rows = [{k: v for k, v in row.items() if k not in TIMING_KEYS}
                for row in read_metrics(run_dir / "metrics.jsonl")]
        assert rows == expected, phase
        # The next save cleaned up after the crash.
        assert sorted(p.name for p in run_dir.iterdir()) == [
            ".steadylm.lock", "checkpoint", "config.json", "metrics.csv", "metrics.jsonl",
        ], phase
