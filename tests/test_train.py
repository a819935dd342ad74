"""steadylm.train: schedule, repeatability, resume, divergence guard, probes, metrics files, errors.

Runs use a small ``nano`` (2 layers x 32 wide, PowLU + BHyT, reference ops so nothing compiles) on
the embedded KJV corpus with a 512-token vocabulary and 32-token context: a dozen steps take well
under a second. Checkpoint crash tests live in ``test_train_checkpoint.py``.
"""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from steadylm import cli
from steadylm.data import TokenData, prepare_data
from steadylm.errors import CheckpointError, ConfigError, DivergenceError
from steadylm.models import ModelConfig
from steadylm.train import (
    TIMING_KEYS,
    TrainConfig,
    Trainer,
    find_checkpoint,
    load_checkpoint,
    lr_at,
    read_checkpoint_state,
    read_metrics,
)
from steadylm.train.config import OPTIMIZER_IMPLEMENTATIONS


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> TokenData:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("STEADYLM_CACHE", str(tmp_path_factory.getbasetemp() / "steadylm-cache"))
        return prepare_data(None, vocab_size=512, seq_len=32, val_fraction=0.05, seed=0)


def small_model(data: TokenData, **overrides: Any) -> ModelConfig:
    settings = dict(
        vocab_size=data.vocab_size, dim=32, n_layers=2, n_heads=2, n_kv_heads=2, ffn_dim=64,
        max_seq_len=data.seq_len, activation="powlu", norm="bhyt", impl="reference",
        bhyt_refresh_every=3,
    )
    return ModelConfig.from_preset("nano", **{**settings, **overrides})


def quick_config(**overrides: Any) -> TrainConfig:
    settings = dict(
        steps=12, batch_size=4, lr=3e-3, min_lr=3e-4, warmup_steps=3, eval_every=4, eval_batches=2,
        ckpt_every=4, log_every=1, seed=7, threads=1, progress=False,
    )
    settings.update(overrides)
    if "warmup_steps" not in overrides:
        settings["warmup_steps"] = min(settings["warmup_steps"], settings["steps"])
    return TrainConfig(**settings)


def deterministic_part(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


# ----------------------------------------------------------------------------------------------
# configuration and schedule
# ----------------------------------------------------------------------------------------------


def test_lr_schedule_warms_up_then_decays_to_min_lr() -> None:
    cfg = TrainConfig(steps=100, lr=1e-3, min_lr=1e-4, warmup_steps=10)
    assert lr_at(1, cfg) == pytest.approx(1e-4)
    assert lr_at(5, cfg) == pytest.approx(5e-4)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(55, cfg) == pytest.approx(0.5 * (1e-3 + 1e-4))  # half-way through the cosine
    assert lr_at(100, cfg) == pytest.approx(1e-4)
    decay = [lr_at(k, cfg) for k in range(10, 101)]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    assert lr_at(1, TrainConfig(steps=5, warmup_steps=0, lr=2e-3, min_lr=0.0)) == pytest.approx(
        0.5 * 2e-3 * (1 + math.cos(math.pi / 5))
    )


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("steps", 0, r"TrainConfig\.steps must be >= 1"),
        ("lr", -1.0, r"TrainConfig\.lr must be in \(0"),
        ("min_lr", 1.0, r"TrainConfig\.min_lr must be in \[0, lr="),
        ("warmup_steps", 50, r"TrainConfig\.warmup_steps must be >= 0 and <= 12"),
        ("precision", "fp16", r"TrainConfig\.precision must be one of \['fp32', 'bf16', 'fp8'\]"),
        ("beta2", 1.0, r"TrainConfig\.beta2 must be in \[0\.0, 1\.0\)"),
        ("grad_clip", float("nan"), r"TrainConfig\.grad_clip must be a finite number"),
        ("fp8_scaling", "static", r"TrainConfig\.fp8_scaling must be one of"),
    ],
)
def test_invalid_train_config_names_the_field(field: str, value: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        quick_config(**{field: value})


def test_model_must_cover_the_tokenizer_vocabulary(data: TokenData, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"vocab_size \(300\) must be >= the tokenizer's"):
        Trainer(small_model(data, vocab_size=300), quick_config(), data, tmp_path)


# ----------------------------------------------------------------------------------------------
# repeatability and resume
# ----------------------------------------------------------------------------------------------


def test_one_seed_gives_identical_metrics_and_files(data: TokenData, tmp_path: Path) -> None:
    first = Trainer(small_model(data), quick_config(), data, tmp_path / "a").run()
    second = Trainer(small_model(data), quick_config(), data, tmp_path / "b").run()
    other_seed = Trainer(small_model(data), quick_config(seed=8), data, tmp_path / "c").run()

    rows_a, rows_b = read_metrics(first.metrics_jsonl), read_metrics(second.metrics_jsonl)
    assert [row["step"] for row in rows_a] == list(range(1, 13))
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "tokens_seen"} <= set(rows_a[0])
    assert [row["step"] for row in rows_a if "val_loss" in row] == [4, 8, 12]
    # Bit-identical, not approximately equal: same seed, same batches, same kernels.
    assert deterministic_part(rows_a) == deterministic_part(rows_b)
    assert deterministic_part(rows_a) != deterministic_part(read_metrics(other_seed.metrics_jsonl))
    assert first.final_val_loss == second.final_val_loss
    assert first.final_loss < first.start_loss  # it learns something even in 12 steps
    assert first.diverged_at is None and first.steps_done == 12 and first.tokens_seen == 12 * 4 * 32
    assert first.tokens_per_s > 0 and first.num_params["total"] > 0
    # The DCP shard (model + optimizer) is byte-identical too.
    state_a = (first.checkpoint_dir / "__0_0.distcp").read_bytes()
    assert state_a == (second.checkpoint_dir / "__0_0.distcp").read_bytes()


class CrashAt:
    """A callback that raises after the metrics row of ``step`` (a crash mid-run)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_log(self, row: dict[str, Any]) -> None:
        if row["step"] == self.step:
            raise RuntimeError(f"simulated crash at step {self.step}")


def test_resumed_run_matches_uninterrupted_run(data: TokenData, tmp_path: Path) -> None:
    whole = Trainer(small_model(data), quick_config(), data, tmp_path / "whole")
    whole_result = whole.run()

    crashed = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="simulated crash at step 10"):
        Trainer(small_model(data), quick_config(), data, crashed, callbacks=[CrashAt(10)]).run()
    assert read_checkpoint_state(find_checkpoint(crashed)).step == 8
    assert read_metrics(crashed / "metrics.jsonl")[-1]["step"] == 10  # rows 9-10 were written

    resumed = Trainer(small_model(data), quick_config(), data, crashed)
    resumed_result = resumed.run(resume=True)
    assert resumed_result.resumed_from == 8 and resumed_result.steps_done == 12

    # The rows of steps 9-10 from before the crash were replaced, not duplicated.
    assert deterministic_part(read_metrics(crashed / "metrics.jsonl")) == deterministic_part(
        read_metrics(whole_result.metrics_jsonl)
    )
    assert resumed_result.final_loss == whole_result.final_loss
    assert resumed_result.final_val_loss == whole_result.final_val_loss
    assert resumed_result.tokens_seen == whole_result.tokens_seen
    # Weights and buffers (BHyT c_l, refreshed every 3 steps by the model hook) agree bit for bit.
    whole_state, resumed_state = whole.model.state_dict(), resumed.model.state_dict()
    assert any("bhyt_correction" in name for name in whole_state)
    for name, tensor in whole_state.items():
        assert torch.equal(tensor, resumed_state[name]), name
    # The CSV is regenerated from the JSON-lines file.
    csv_rows = (crashed / "metrics.csv").read_text().splitlines()
    assert csv_rows[0].startswith("step,loss,lr,grad_norm,tokens_per_s,tokens_seen")
    assert len(csv_rows) == 1 + 12

    # A deliberate stop (stop_after) checkpoints that step; resume="auto" finishes the same run.
    stopped_dir = tmp_path / "stopped"
    stopped = Trainer(small_model(data), quick_config(), data, stopped_dir).run(stop_after=5)
    assert stopped.steps_done == 5 and read_checkpoint_state(find_checkpoint(stopped_dir)).step == 5
    finished = Trainer(small_model(data), quick_config(), data, stopped_dir).run(resume="auto")
    assert finished.resumed_from == 5
    assert deterministic_part(read_metrics(stopped_dir / "metrics.jsonl")) == deterministic_part(
        read_metrics(whole_result.metrics_jsonl)
    )
    # With nothing to resume, "auto" starts fresh.
    fresh = Trainer(small_model(data), quick_config(steps=2), data, tmp_path / "fresh").run(resume="auto")
    assert fresh.resumed_from is None and fresh.steps_done == 2


def test_adamw_runs_the_configured_implementation_and_it_wins_on_resume(data: TokenData, tmp_path: Path) -> None:
    """AdamW is fused by default (one kernel per step: 4x faster than torch's CPU for-loop default on
    the micro preset), foreach or for-loop on request; all three follow one trajectory. A checkpoint
    saved under another implementation resumes in this run's: loading a state dict restores each
    group's saved flags, which would otherwise win silently."""
    finals = {}
    for impl, flags in OPTIMIZER_IMPLEMENTATIONS.items():
        trainer = Trainer(small_model(data), quick_config(steps=4, ckpt_every=0, optimizer_impl=impl), data,
                          tmp_path / impl)  # fmt: skip
        finals[impl] = trainer.run().final_loss
        assert trainer.optimizer is not None
        assert [(g["fused"], g["foreach"]) for g in trainer.optimizer.param_groups] == [
            (flags["fused"], flags["foreach"])
        ] * len(trainer.optimizer.param_groups), impl
    assert TrainConfig().optimizer_impl == "fused"
    # The same update, rounded differently (the implementations apply the bias corrections in other
    # orders): a few fp32 ulps per parameter per step, far below 1e-4 of the loss after 4 steps.
    for impl in ("foreach", "for-loop"):
        assert finals[impl] == pytest.approx(finals["fused"], rel=1e-4), finals

    run_dir = tmp_path / "switched"
    Trainer(small_model(data), quick_config(optimizer_impl="for-loop"), data, run_dir).run(stop_after=4)
    resumed = Trainer(small_model(data), quick_config(), data, run_dir)
    assert resumed.run(resume=True).resumed_from == 4
    assert resumed.optimizer is not None
    assert all(g["fused"] and not g["foreach"] for g in resumed.optimizer.param_groups)


def test_resume_refuses_a_checkpoint_of_another_model_or_seed(data: TokenData, tmp_path: Path) -> None:
    Trainer(small_model(data), quick_config(steps=4), data, tmp_path).run()
    with pytest.raises(CheckpointError, match=r"model config differs in \['dim', 'ffn_dim'\]"):
        Trainer(small_model(data, dim=48, ffn_dim=96), quick_config(steps=8), data, tmp_path).run(resume=True)
    with pytest.raises(CheckpointError, match="seed differs"):
        Trainer(small_model(data), quick_config(steps=8, seed=99), data, tmp_path).run(resume=True)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        Trainer(small_model(data), quick_config(), data, tmp_path / "empty").run(resume=True)
    # Extending a finished run is allowed: it continues from step 4.
    longer = Trainer(small_model(data), quick_config(steps=6), data, tmp_path).run(resume=True)
    assert longer.resumed_from == 4 and longer.steps_done == 6


def _default_impl_model(data: TokenData, preset: str) -> ModelConfig:
    """A tiny model of ``preset`` with the *default* implementation (no ``impl=`` given)."""
    if preset == "nano-moe":
        return ModelConfig.from_preset("nano-moe", vocab_size=data.vocab_size, dim=32, n_layers=2, n_heads=2,
                                       n_kv_heads=2, ffn_dim=64, expert_ffn_dim=32, n_experts=4, moe_top_k=2,
                                       max_seq_len=data.seq_len, activation="powlu", norm="bhyt",
                                       bhyt_refresh_every=3)
    return ModelConfig.from_preset("nano", vocab_size=data.vocab_size, dim=32, n_layers=2, n_heads=2,
                                   n_kv_heads=2, ffn_dim=64, max_seq_len=data.seq_len, activation="powlu",
                                   norm="bhyt", bhyt_refresh_every=3)


@pytest.mark.parametrize("preset", ["nano", "nano-moe"])
def test_default_fused_impl_repeats_and_resumes_bit_exact(data: TokenData, tmp_path: Path, preset: str) -> None:
    """What users run by default (the fused kernels, compiled) repeats and resumes bit for bit on
    one machine, dense and MoE (router-bias balancing), like the reference math above."""
    config = _default_impl_model(data, preset)
    assert config.impl == "fused"  # the default this test is about
    train = quick_config(steps=8, ckpt_every=4, eval_every=4)
    first = Trainer(config, train, data, tmp_path / "a")
    first_result = first.run()
    second = Trainer(config, train, data, tmp_path / "b")
    second.run()
    rows = deterministic_part(read_metrics(first_result.metrics_jsonl))
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert rows == deterministic_part(read_metrics(tmp_path / "b" / "metrics.jsonl"))

    crashed = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="simulated crash at step 6"):
        Trainer(config, train, data, crashed, callbacks=[CrashAt(6)]).run()
    resumed = Trainer(config, train, data, crashed)
    assert resumed.run(resume=True).resumed_from == 4
    assert deterministic_part(read_metrics(crashed / "metrics.jsonl")) == rows
    states = [t.model.state_dict() for t in (first, second, resumed)]
    if preset == "nano-moe":
        assert any(name.endswith("expert_bias") for name in states[0])
    for name, tensor in states[0].items():
        assert torch.equal(tensor, states[1][name]) and torch.equal(tensor, states[2][name]), name


# ----------------------------------------------------------------------------------------------
# divergence guard
# ----------------------------------------------------------------------------------------------


class PoisonAt:
    """Sets one weight to +inf before the forward of ``step``: the loss of that step is NaN."""

    def __init__(self, step: int) -> None:
        self.step = step

    def begin_step(self, step: int, model: torch.nn.Module) -> None:
        if step == self.step:
            with torch.no_grad():
                model.layers[0].ffn.w_up.weight[0, 0] = float("inf")

    def end_step(self, step: int, model: torch.nn.Module) -> dict[str, float]:
        return {}


def test_divergence_stops_and_keeps_the_last_good_checkpoint(data: TokenData, tmp_path: Path) -> None:
    result = Trainer(small_model(data), quick_config(), data, tmp_path, probes=[PoisonAt(7)]).run()
    assert result.diverged_at == 7 and result.steps_done == 6
    assert "non-finite" in result.divergence_reason
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert rows[-1]["step"] == 7 and rows[-1]["diverged"] is True and rows[-1]["loss"] is None
    # The checkpoint of step 4 survives and holds finite weights; nothing was saved after it.
    assert result.checkpoint_dir == tmp_path / "checkpoint"
    fresh = Trainer(small_model(data), quick_config(), data, tmp_path / "fresh")
    fresh._build(torch.device("cpu"))
    state = load_checkpoint(result.checkpoint_dir, fresh.model, fresh.optimizer)
    assert state.step == 4
    assert all(torch.isfinite(t).all() for t in fresh.model.state_dict().values())
    with pytest.raises(DivergenceError, match=r"diverged at step 7: non-finite loss .*checkpoint"):
        result.raise_if_diverged()


def test_divergence_before_any_checkpoint_reports_none(data: TokenData, tmp_path: Path) -> None:
    result = Trainer(small_model(data), quick_config(), data, tmp_path, probes=[PoisonAt(2)]).run()
    assert result.diverged_at == 2 and result.checkpoint_dir is None
    assert find_checkpoint(tmp_path) is None


def test_loss_above_start_is_reported(data: TokenData, tmp_path: Path) -> None:
    # lr 3.0 with no clipping wrecks the model without producing NaN right away.
    cfg = quick_config(lr=3.0, min_lr=3.0, grad_clip=0.0, warmup_steps=0, steps=8, ckpt_every=0)
    result = Trainer(small_model(data), cfg, data, tmp_path).run()
    assert result.diverged_at is None  # finite but wrecked: the loss jumps far above ln(512)
    assert result.loss_above_start_at is not None and result.loss_above_start_at <= 3
    sane = Trainer(small_model(data), quick_config(), data, tmp_path / "sane").run()
    assert sane.loss_above_start_at is None


# ----------------------------------------------------------------------------------------------
# probes, callbacks, metrics files
# ----------------------------------------------------------------------------------------------


class GradNormProbe:
    """Records the call order and the global gradient norm it sees in ``end_step``."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.forward_seen = False
        self._handle = None

    def begin_step(self, step: int, model: torch.nn.Module) -> None:
        self.calls.append(("begin", step))
        self.forward_seen = False
        self._handle = model.register_forward_hook(lambda *_: setattr(self, "forward_seen", True))

    def end_step(self, step: int, model: torch.nn.Module) -> dict[str, float]:
        self.calls.append(("end", step))
        self._handle.remove()
        assert self.forward_seen, "begin_step must come before the forward"
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        return {"probe/grad_norm": float(norm), "probe/step": float(step)} if step % 2 == 0 else {}


def test_probes_run_around_each_step_and_see_unclipped_gradients(data: TokenData, tmp_path: Path) -> None:
    probe, logged = GradNormProbe(), []
    cfg = quick_config(steps=6, grad_clip=0.01, log_every=3)  # clipping always active
    Trainer(small_model(data), cfg, data, tmp_path, probes=[probe], callbacks=[logged.append]).run()
    assert probe.calls == [(kind, step) for step in range(1, 7) for kind in ("begin", "end")]
    rows = read_metrics(tmp_path / "metrics.jsonl")
    # Rows at log_every multiples, evaluation steps, and whenever a probe returned metrics.
    assert [row["step"] for row in rows] == [2, 3, 4, 6]
    assert logged == rows
    for row in rows:
        if "probe/grad_norm" in row:
            # The trainer's grad_norm is the pre-clip norm; the probe saw the same gradients.
            assert row["probe/grad_norm"] == pytest.approx(row["grad_norm"], rel=1e-5)
            assert row["grad_norm"] > 0.01
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[:6] == ["step", "loss", "lr", "grad_norm", "tokens_per_s", "tokens_seen"]
    assert {"val_loss", "probe/grad_norm", "probe/step"} <= set(header)


def test_run_directory_contents(data: TokenData, tmp_path: Path) -> None:
    result = Trainer(small_model(data), quick_config(steps=4), data, tmp_path).run()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model"]["norm"] == "bhyt" and config["train"]["steps"] == 4
    assert config["data"]["fingerprint"] == data.fingerprint
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    # torch.distributed.checkpoint's layout, plus the rank's RNG and the trainer state
    assert sorted(p.name for p in result.checkpoint_dir.iterdir()) == [
        ".metadata", "__0_0.distcp", "rng-rank0.safetensors", "state.json",
    ]
    # A fresh run in the same directory starts over: old metrics and checkpoint are gone.
    again = Trainer(small_model(data), quick_config(steps=2, ckpt_every=0), data, tmp_path).run()
    assert [row["step"] for row in read_metrics(again.metrics_jsonl)] == [1, 2]
    assert read_checkpoint_state(find_checkpoint(tmp_path)).step == 2


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_low_precision_runs(data: TokenData, tmp_path: Path, precision: str) -> None:
    trainer = Trainer(small_model(data), quick_config(steps=4, precision=precision), data, tmp_path)
    result = trainer.run()
    assert result.diverged_at is None and math.isfinite(result.final_loss)
    assert result.final_loss < result.start_loss + 0.5
    fp8_layers = [m for m in trainer.model.modules() if type(m).__name__ == "FP8Linear"]
    assert bool(fp8_layers) == (precision == "fp8")


def test_torch_threads_are_restored(data: TokenData, tmp_path: Path) -> None:
    before = torch.get_num_threads()
    Trainer(small_model(data), quick_config(steps=1, threads=1), data, tmp_path).run()
    assert torch.get_num_threads() == before


# ----------------------------------------------------------------------------------------------
# user errors: one line on the CLI, no traceback
# ----------------------------------------------------------------------------------------------


def run_cli_command(monkeypatch: pytest.MonkeyPatch, body: Any, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Run ``body()`` as a steadylm sub-command through ``steadylm.cli.main``."""
    module = types.ModuleType("steadylm_test_train_command")
    module.add_arguments = lambda parser: None
    module.run = lambda args: body()
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(cli.COMMANDS, "train-test", (module.__name__, "test command"))
    code = cli.main(["train-test"])
    return code, capsys.readouterr().err


def test_corrupt_checkpoint_gives_a_clear_error(
    data: TokenData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    Trainer(small_model(data), quick_config(steps=2), data, tmp_path).run()
    weights = tmp_path / "checkpoint" / "__0_0.distcp"
    blob = bytearray(weights.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # one flipped byte inside the tensor data
    weights.write_bytes(bytes(blob))

    def resume() -> int:
        Trainer(small_model(data), quick_config(steps=4), data, tmp_path).run(resume=True)
        return 0

    code, err = run_cli_command(monkeypatch, resume, capsys)
    assert code == 2
    assert err.startswith("error: checkpoint file ") and "__0_0.distcp is corrupt" in err
    assert err.count("\n") == 1 and "Traceback" not in err

    (tmp_path / "checkpoint" / "state.json").write_text('{"format_version": 1, "st')  # truncated
    with pytest.raises(CheckpointError, match=r"state\.json is corrupt or unreadable"):
        Trainer(small_model(data), quick_config(steps=4), data, tmp_path).run(resume=True)


def test_missing_data_file_gives_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "no-such-corpus.txt"
    code, err = run_cli_command(monkeypatch, lambda: prepare_data(missing, vocab_size=512, seq_len=32), capsys)
    assert code == 2
    assert err == f"error: data file not found: {missing}\n"
