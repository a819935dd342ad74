"""Experiment trackers (steadylm.train.trackers), read back with the real libraries.

* TensorBoard: the event files of a run are read by TensorBoard's own ``EventAccumulator``; every
  metrics row is there at its step with the value ``metrics.jsonl`` holds (as float32, TensorBoard's
  scalar type); the run spec is there as hparams; a run that crashed past its checkpoint and
  resumed shows each step once (``purge_step``) in the same log directory.
* Weights & Biases (``WANDB_MODE=offline``): the ``.wandb`` files of the offline run directory are
  read record by record with W&B's own protobuf schema (``wandb.proto.wandb_internal_pb2.Record``;
  the framing is the LevelDB log format W&B writes, decoded below); a resume logs into the same run
  id.
* The registry: one entry adds a backend, which gets start (with the resume step), every row and
  finish; a missing package is one line naming the extra.
"""

from __future__ import annotations

import json
import math
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from steadylm import cli
from steadylm.errors import ConfigError
from steadylm.train import trackers as T
from steadylm.train import TIMING_KEYS
from steadylm.train.assemble import build_run
from steadylm.train.metrics import read_metrics
from steadylm.train.spec import RunSpec

SPEC: dict[str, Any] = {
    "model": {"preset": "nano", "dim": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 2, "ffn_dim": 64,
              "impl": "reference", "activation": "powlu", "norm": "bhyt"},
    "train": {"steps": 8, "batch_size": 4, "warmup_steps": 1, "eval_every": 4, "eval_batches": 1, "ckpt_every": 2,
              "log_every": 1, "probe_every": 2, "seed": 1, "threads": 1, "progress": False, "device": "cpu"},
    "data": {"vocab_size": 512, "seq_len": 32},
    "probes": {"stability": True},
}


@pytest.fixture(autouse=True)
def cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # the session-wide tokenizer cache of test_train: the 512-token KJV tokenizer is trained once
    monkeypatch.setenv("STEADYLM_CACHE", str(tmp_path_factory.getbasetemp() / "steadylm-cache"))


def spec(**train: Any) -> RunSpec:
    data = json.loads(json.dumps(SPEC))
    data["train"].update(train)
    return RunSpec.from_dict(data)


class CrashAt:
    """A callback that stops the run at step ``step``'s row, as a crash would (after the trackers
    got the earlier rows, and past the last checkpoint)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_log(self, row: dict[str, Any]) -> None:
        if row["step"] == self.step:
            raise RuntimeError(f"simulated crash at step {self.step}")


def crash_then_resume(run_spec: RunSpec, out: Path, crash_at: int = 6) -> list[dict[str, Any]]:
    """Train with a crash at ``crash_at`` (checkpoint every 2 steps: the last one at crash_at - 2
    when crash_at is even), then resume to the end; returns the final metrics rows."""
    with pytest.raises(RuntimeError, match="simulated crash"):
        # the tracker comes after the caller's callbacks, so it never sees the crashing row: it saw
        # crash_at - 1, one step past the checkpoint at crash_at - 2
        build_run(run_spec, out, callbacks=[CrashAt(crash_at)]).run()
    build_run(run_spec, out).run(resume=True)
    return read_metrics(out / "metrics.jsonl")


def scalar_keys(rows: list[dict[str, Any]]) -> set[str]:
    return {k for row in rows for k, v in row.items() if k != "step" and isinstance(v, (int, float))}


# ------------------------------------------------------------------------------------------------
# TensorBoard
# ------------------------------------------------------------------------------------------------


def test_tensorboard_events_read_back_and_a_resume_continues_the_same_log(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing import event_accumulator as ea
    from tensorboard.plugins.hparams import plugin_data_pb2

    out = tmp_path / "run"
    rows = crash_then_resume(spec(trackers=["tensorboard"]), out)
    assert [row["step"] for row in rows] == list(range(1, 9))
    log_dir = out / "tensorboard"
    assert len(list(log_dir.glob("events.out.tfevents.*"))) == 2  # one file per process, one directory

    acc = ea.EventAccumulator(str(log_dir), size_guidance={ea.SCALARS: 0, ea.TENSORS: 0})
    acc.Reload()
    keys = scalar_keys(rows)
    assert any(k.startswith("ffn_down_in/layer") for k in keys) and "val_loss" in keys  # probes + evals
    assert set(acc.Tags()["scalars"]) == keys
    for key in keys:
        want = [(row["step"], row[key]) for row in rows if key in row]
        got = [(e.step, e.value) for e in acc.Scalars(key)]
        # step 5 was logged twice (before the crash and after the resume): purge_step keeps the second
        assert [s for s, _ in got] == [s for s, _ in want], key
        # TensorBoard stores scalars as float32: equal to the row's value rounded to float32
        assert all(g == np.float32(w) or (math.isnan(g) and math.isnan(w)) for (_, g), (_, w) in zip(got, want)), key

    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["model.activation"].string_value == "powlu"
    assert hparams["train.steps"].number_value == 8
    assert "config/text_summary" in acc.Tags()["tensors"]


def test_a_fresh_run_replaces_earlier_tensorboard_events(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    build_run(spec(trackers=["tensorboard"], steps=2), out).run()
    build_run(spec(trackers=["tensorboard"], steps=2), out).run()  # not a resume: a new run
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1


# ------------------------------------------------------------------------------------------------
# Weights & Biases, offline
# ------------------------------------------------------------------------------------------------

_BLOCK = 32 * 1024  # LevelDB log block size
_HEADER = 7  # ":W&B" + 2-byte magic + 1-byte version, then LevelDB records (crc32c, length, type)


def wandb_records(path: Path) -> list[Any]:
    """Every record of a ``.wandb`` file, parsed with W&B's own protobuf schema."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    if len(data) < _HEADER:
        return []  # not written yet
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    records, pos, pending = [], _HEADER, b""
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # a block trailer too short for a record header is zero padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding up to the next block
            pos += left
            continue
        if pos + 7 + length > len(data):
            break  # a record still being written
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # FULL/FIRST start, MIDDLE/LAST add
        if kind in (1, 4):  # FULL or LAST: a whole record
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    return records


def test_wandb_offline_run_reads_back_and_a_resume_continues_the_same_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")  # no network, no login
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_PROJECT", "steadylm-test")
    out = tmp_path / "run"
    rows = crash_then_resume(spec(trackers=["wandb"]), out)
    run_id = json.loads((out / "trackers.json").read_text())["wandb"]["run_id"]
    files = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2, files  # the first process and the resume

    for file in files:
        # run.finish() returns before W&B's service process has necessarily written the whole
        # transaction log (seen: an empty file, complete a moment later): wait for its exit record.
        deadline = time.monotonic() + 60
        while not any(r.WhichOneof("record_type") == "exit" for r in wandb_records(file)):
            assert time.monotonic() < deadline, f"{file}: no exit record after 60 s"
            time.sleep(0.2)
    history: dict[int, dict[str, float]] = {}
    before_crash: dict[int, dict[str, float]] = {}
    for number, file in enumerate(files):
        records = wandb_records(file)
        runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        kinds = [r.WhichOneof("record_type") for r in records]
        assert [(r.run_id, r.project) for r in runs] == [(run_id, "steadylm-test")], (file, kinds)  # the same run
        config = {u.key: json.loads(u.value_json) for r in records if r.WhichOneof("record_type") == "config"
                  for u in r.config.update}
        assert config["run_spec"]["model"]["activation"] == "powlu" and config["train"]["steps"] == 8
        steps = []
        for r in records:
            if r.WhichOneof("record_type") == "history":
                # W&B stores a "/"-separated key as its nested_key parts
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                steps.append(items["_step"])
                (history if number else before_crash)[items["_step"]] = items
        # before the crash: steps 1-5 (step 5 is past the checkpoint at 4); the resume: 5-8
        assert steps == ([1, 2, 3, 4, 5] if number == 0 else [5, 6, 7, 8])
    history = {**before_crash, **history}
    for row in rows:
        logged = history[row["step"]]
        for key in scalar_keys([row]):
            assert logged[key] == row[key] or (math.isnan(row[key]) and math.isnan(logged[key])), (row["step"], key)
    # step 5, logged before the crash and again by the resume: the same values (a resume is exact;
    # only wall-clock throughput differs), so W&B keeping either one keeps the run's values
    def exact(items: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in items.items() if not k.startswith("_") and k not in TIMING_KEYS}

    assert exact(before_crash[5]) == exact(history[5]) and "loss" in exact(history[5])


# ------------------------------------------------------------------------------------------------
# registry, errors, flags
# ------------------------------------------------------------------------------------------------


class Recording:
    """A backend that keeps what it is given (the registry test)."""

    runs: list[dict[str, Any]] = []

    def start(self, run_dir: Path, configs: Any, start_step: int) -> None:
        self.record = {"start": start_step, "rows": [], "finished": False, "spec": configs["run_spec"]}
        Recording.runs.append(self.record)

    def log_metrics(self, row: dict[str, float], step: int) -> None:
        self.record["rows"].append({"step": step, **row})

    def finish(self) -> None:
        self.record["finished"] = True


def test_another_backend_is_one_registry_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(T.TRACKERS, "recording", T.TrackerEntry(Recording, requires="json", extra="none"))
    Recording.runs = []
    out = tmp_path / "run"
    rows = crash_then_resume(spec(trackers=["recording"]), out)
    first, second = Recording.runs
    assert (first["start"], second["start"]) == (0, 4) and first["finished"] and second["finished"]
    assert first["spec"]["train"]["trackers"] == ["recording"]
    assert [r["step"] for r in first["rows"]] == [1, 2, 3, 4, 5]
    resumed = {r["step"]: r for r in second["rows"]}
    assert [r["step"] for r in second["rows"]] == [5, 6, 7, 8]
    for row in rows[4:]:
        assert resumed[row["step"]] == {k: float(v) for k, v in row.items()}


def test_a_missing_package_is_one_line_naming_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(T.TRACKERS, "wandb", T.TrackerEntry(T.WandbTracker, requires="steadylm_no_such_package",
                                                            extra="wandb"))
    assert cli.main(["train", "--out", str(tmp_path / "run"), "--preset", "nano", "--steps", "1",
                     "--set", "data.vocab_size=512", "--set", "data.seq_len=32", "--tracker", "wandb"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --tracker wandb needs the 'steadylm_no_such_package' package: "
                   "pip install 'steadylm[wandb]'"]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before training


def test_unknown_tracker_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"unknown tracker 'mlflow'; choose from \['tensorboard', 'wandb'\]"):
        spec(trackers=["mlflow"])


@pytest.mark.parametrize("command", [["train", "--out", "x"], ["compare"], ["ladder"], ["stress", "lr-sweep"],
                                     ["stress", "switch"], ["stress", "fp8"]])
def test_every_command_that_trains_has_the_tracker_flag(command: list[str],
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main([*command, "--help"])
    assert "--tracker A,B,..." in capsys.readouterr().out
