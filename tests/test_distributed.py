"""Multi-process training with real processes: 2 ranks under torchrun (gloo on CPU, nccl on CUDA).

What SPEC §6 promises and how it is checked:
* N ranks with global batch B follow one process with batch B: DDP and FSDP2 losses over 20
  steps equal the single-process losses within 1e-5 relative, for swiglu+rmsnorm, powlu+bhyt
  (c_ℓ refreshed every 3 steps), the MoE preset (router-bias balancing) and FP8 with delayed
  scaling. 1e-5: the only difference is the order of the cross-rank gradient reduction (and of
  the per-shard loss sums), a few fp32 ulps per step that the optimizer carries forward. FP8
  (with bf16 autocast) amplifies such ulps into rounding flips; its bound is its own measured
  noise floor when that is above 1e-5 (see the test).
* FSDP2 with --compile follows one process within 1e-5; with --fsdp-bf16 within a bound derived
  from bf16's unit roundoff (see FSDP_FLAG_REL).
* Every parameter and buffer is identical on every rank after training (λ, c_ℓ, router biases,
  FP8 amax history and scales included) — exactly, because each is computed from reduced values.
* DCP checkpoints: a 2-rank checkpoint resumes at 2 ranks bit-exact and at 1 rank within the
  same fp32 tolerance; a 1-rank checkpoint resumes at 2 ranks.
* A rank SIGKILLed during a checkpoint write leaves the previous checkpoint, and ``--resume``
  continues from it to the uninterrupted run's losses.
* Bad input fails on every rank with a one-line error naming the key, exit != 0, no hang.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from steadylm.train.command import train_from_spec
from steadylm.train.metrics import read_metrics
from steadylm.train.spec import RunSpec

HERE = Path(__file__).resolve().parent
REL = 1e-5  # see the module docstring
# FSDP2 flags against the one-process fp32 eager run (test_fsdp_flags_follow_one_process):
# * --compile: Inductor fuses and reorders fp32 ops — the same kind of difference as the ranks'
#   reduction order, so REL (measured: 1.6e-7 over 20 steps).
# * --fsdp-bf16: parameters and activations in bf16 for compute (fp32 master weights and gradient
#   reduction). bf16's unit roundoff is 2^-9 = 2.0e-3; a token's loss passes ~4 bf16-rounded stages
#   (cast parameters, attention, FFN, head), and the logged loss averages 8 x 32 = 256 tokens whose
#   rounding errors have independent signs (÷ sqrt(256) = 16): 4 x 2^-9 / 16 = 4.9e-4. Measured
#   1.6e-4 over 20 steps. It must also differ by more than REL, or the flag did nothing.
FSDP_FLAG_REL = {"fsdp_bf16": 4.9e-4, "compile": REL}
NPROC = 2
ON_CUDA = torch.cuda.device_count() >= NPROC

BASE: dict[str, Any] = {
    "model": {"preset": "nano", "dim": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 2, "ffn_dim": 64, "impl": "reference",
              "bhyt_refresh_every": 3},
    "train": {"steps": 20, "batch_size": 8, "warmup_steps": 2, "eval_every": 10, "eval_batches": 2,
              "ckpt_every": 0, "log_every": 1, "seed": 3, "threads": 1, "progress": False, "probe_every": 5},
    "data": {"vocab_size": 512, "seq_len": 32},
}
CASES: dict[str, dict[str, Any]] = {
    "swiglu_rmsnorm": {"model": {"activation": "swiglu", "norm": "rmsnorm"}},
    "powlu_bhyt": {"model": {"activation": "powlu", "norm": "bhyt"}},
    "moe": {"model": {"preset": "nano-moe", "n_experts": 4, "moe_top_k": 2, "expert_ffn_dim": 32,
                      "activation": "powlu", "norm": "rmsnorm"}},
    "fp8": {"model": {"activation": "swiglu", "norm": "rmsnorm"},
            "train": {"precision": "fp8", "fp8_scaling": "delayed"}},
}


def spec_dict(case: str, **train: Any) -> dict[str, Any]:
    merged = json.loads(json.dumps(BASE))
    for section, values in CASES[case].items():
        merged.setdefault(section, {}).update(values)
    merged["train"].update(train)
    if not ON_CUDA:
        merged["train"]["device"] = "cpu"
    return merged


def torchrun(args: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={NPROC}", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    cache = tmp_path_factory.mktemp("cache")
    os.environ["STEADYLM_CACHE"] = str(cache)  # the single-process runs of this module share it
    return {**os.environ, "STEADYLM_CACHE": str(cache), "OMP_NUM_THREADS": "1"}


def losses(run_dir: Path) -> list[float]:
    return [row["loss"] for row in read_metrics(run_dir / "metrics.jsonl")]


def assert_close(got: list[float], want: list[float], rel: float, what: str) -> None:
    assert len(got) == len(want), what
    worst = max(abs(g - w) / abs(w) for g, w in zip(got, want))
    assert worst <= rel, f"{what}: worst relative loss difference {worst:.3g} > {rel}"


@pytest.fixture(scope="module")
def two_rank_runs(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One torchrun launch (startup dominates) that trains every 2-rank job; plus the 1-rank
    references trained here, in this process."""
    root = tmp_path_factory.mktemp("dist")
    single = {case: root / f"single-{case}" for case in CASES}
    for case, out in single.items():
        train_from_spec(RunSpec.from_dict(spec_dict(case)), out)
    # FP8's noise floor: the same single process, the same rows, only summed in another order
    train_from_spec(RunSpec.from_dict(spec_dict("fp8", grad_accum=2)), root / "single-fp8-accum2")
    fp8_floor = max(abs(a - b) / abs(b) for a, b in zip(losses(root / "single-fp8-accum2"), losses(single["fp8"])))
    # a single-process checkpoint at step 10, to be resumed by 2 ranks (1 -> 2 resharding)
    train_from_spec(RunSpec.from_dict(spec_dict("powlu_bhyt")), root / "one-to-two", stop_after=10)

    jobs = []
    for case in CASES:
        for mode in ("ddp", "fsdp"):
            jobs.append({"name": f"{case}-{mode}", "out": str(root / f"{case}-{mode}"),
                         "spec": {**spec_dict(case), "parallel": {"mode": mode}}})
    if importlib.util.find_spec("torchao") is not None:  # torchao float8 composes with FSDP2
        torchao_spec = spec_dict("swiglu_rmsnorm", precision="fp8", fp8_backend="torchao", steps=6)
        jobs.append({"name": "torchao-fsdp", "out": str(root / "torchao-fsdp"),
                     "spec": {**torchao_spec, "parallel": {"mode": "fsdp"}}})
    fsdp_bhyt = {**spec_dict("powlu_bhyt"), "parallel": {"mode": "fsdp"}}
    # the advertised FSDP2 flags, each against the one-process fp32 eager run of the same spec
    jobs += [{"name": f"powlu_bhyt-fsdp-{flag}", "out": str(root / f"powlu_bhyt-fsdp-{flag}"),
              "spec": {**spec_dict("powlu_bhyt"), "parallel": {"mode": "fsdp", flag: True}}}
             for flag in ("fsdp_bf16", "compile")]
    jobs += [
        {"name": "stop-at-10", "out": str(root / "two-to-two"), "spec": fsdp_bhyt, "stop_after": 10,
         "snapshot": str(root / "two-to-one")},
        {"name": "two-to-two", "out": str(root / "two-to-two"), "spec": fsdp_bhyt, "resume": True},
        {"name": "one-to-two", "out": str(root / "one-to-two"), "spec": fsdp_bhyt, "resume": True},
    ]
    jobs_file, out_file = root / "jobs.json", root / "results.json"
    jobs_file.write_text(json.dumps(jobs))
    proc = torchrun([str(HERE / "distributed_worker.py"), str(jobs_file), str(out_file)], env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(out_file.read_text())
    return {"root": root, "single": single, "results": results, "fp8_floor": fp8_floor}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_follow_one_process(two_rank_runs: dict[str, Any], case: str, mode: str) -> None:
    run = two_rank_runs["results"][f"{case}-{mode}"]
    want = losses(two_rank_runs["single"][case])
    assert len(want) == 20
    # FP8 rounds to a 3-bit mantissa (and bf16 autocast to 8 bits): a last-bit difference in a
    # weight can flip an element's rounding, so the trajectory's own noise floor is larger than
    # 1e-5 — measured here as one process with grad_accum=2 (same rows, another summation order)
    # against grad_accum=1 (about 1e-4 over 20 steps on CPU). N ranks may not drift further.
    rel = max(REL, two_rank_runs["fp8_floor"]) if case == "fp8" else REL
    assert_close(run["losses"], want, rel, f"{case} {mode}")
    assert run["steps_done"] == 20
    # validation: each rank evaluates its rows of the fixed batches, the sums are reduced
    single_val = [r["val_loss"] for r in read_metrics(two_rank_runs["single"][case] / "metrics.jsonl")
                  if "val_loss" in r][-1]
    assert_close([run["val_loss"]], [single_val], rel, f"{case} {mode} validation")


@pytest.mark.parametrize("flag", ["fsdp_bf16", "compile"])
def test_fsdp_flags_follow_one_process(two_rank_runs: dict[str, Any], flag: str) -> None:
    run = two_rank_runs["results"][f"powlu_bhyt-fsdp-{flag}"]
    want = losses(two_rank_runs["single"]["powlu_bhyt"])
    got = run["losses"]
    assert run["steps_done"] == 20
    assert_close(got, want, FSDP_FLAG_REL[flag], f"fsdp --{flag}")
    if flag == "fsdp_bf16":  # bf16 compute really ran: not the fp32 trajectory to reduction order
        assert max(abs(g - w) / abs(w) for g, w in zip(got, want)) > REL
    diffs = {n: d for n, d in run["rank_max_diff"].items() if d != 0.0}
    assert not diffs, diffs  # still identical on every rank


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_every_parameter_and_buffer_agrees_across_ranks(two_rank_runs: dict[str, Any], case: str, mode: str) -> None:
    diffs = two_rank_runs["results"][f"{case}-{mode}"]["rank_max_diff"]
    expected_kinds = {
        "powlu_bhyt": ("bhyt_correction", "lam"),
        "moe": ("expert_bias",),
        "fp8": ("amax_history", "last_scale"),
    }.get(case, ())
    for kind in expected_kinds:  # the state SPEC §6 names is there to be compared
        assert any(kind in name for name in diffs), (case, kind)
    # last_load is a per-rank diagnostic (this rank's rows in the last forward); the router-bias
    # update uses the load summed over ranks, and the biases are compared here.
    differing = {name: d for name, d in diffs.items() if d != 0.0 and not name.endswith(".last_load")}
    assert not differing, f"{case} {mode}: differs across ranks: {differing}"


def test_fp8_counters_are_summed_over_ranks(two_rank_runs: dict[str, Any]) -> None:
    single_rows = [r for r in read_metrics(two_rank_runs["single"]["fp8"] / "metrics.jsonl")
                   if "fp8/input/amax" in r]
    for mode in ("ddp", "fsdp"):
        rows = two_rank_runs["results"][f"fp8-{mode}"]["fp8_rows"]
        assert len(rows) == len(single_rows) > 0
        for got, want in zip(rows, single_rows):
            # element counts are exact: the inputs and output gradients of both halves of the batch
            # add up to the whole batch's; every rank quantises the whole weight, so weights count
            # once per rank
            for role in ("input", "grad_output"):
                assert got[f"fp8/{role}/numel"] == want[f"fp8/{role}/numel"] > 0, role
            assert got["fp8/weight/numel"] == NPROC * want["fp8/weight/numel"] > 0
            # amax: the max over both halves of the batch = the whole batch's. The trajectories
            # drift apart by up to ~1e-4 in loss (see test_two_ranks_follow_one_process), which a
            # single extreme activation amplifies; that amax and scales are identical across ranks
            # is checked exactly in test_every_parameter_and_buffer_agrees_across_ranks.
            assert got["fp8/input/amax"] == pytest.approx(want["fp8/input/amax"], rel=5e-3)


def test_dcp_checkpoint_resumes_at_two_ranks_bit_exact(two_rank_runs: dict[str, Any]) -> None:
    results = two_rank_runs["results"]
    assert results["stop-at-10"]["steps_done"] == 10
    resumed = results["two-to-two"]
    assert resumed["resumed_from"] == 10 and resumed["steps_done"] == 20
    assert resumed["losses"] == results["powlu_bhyt-fsdp"]["losses"]  # bit for bit
    assert resumed["val_loss"] == results["powlu_bhyt-fsdp"]["val_loss"]


def test_dcp_checkpoint_resumes_at_one_rank(two_rank_runs: dict[str, Any]) -> None:
    snapshot = two_rank_runs["root"] / "two-to-one"
    assert json.loads((snapshot / "checkpoint" / "state.json").read_text())["world_size"] == 2
    result = train_from_spec(RunSpec.from_dict(spec_dict("powlu_bhyt")), snapshot, resume=True)
    assert result.resumed_from == 10 and result.steps_done == 20
    assert_close(losses(snapshot), losses(two_rank_runs["single"]["powlu_bhyt"]), REL, "2 -> 1 ranks")


def test_single_process_checkpoint_resumes_at_two_ranks(two_rank_runs: dict[str, Any]) -> None:
    run = two_rank_runs["results"]["one-to-two"]
    assert run["resumed_from"] == 10 and run["steps_done"] == 20
    assert_close(run["losses"], losses(two_rank_runs["single"]["powlu_bhyt"]), REL, "1 -> 2 ranks")


def _train_args(out: Path, *extra: str) -> list[str]:
    return ["-m", "steadylm", "train", "--out", str(out), "--preset", "nano", "--set", "model.dim=32",
            "--set", "model.n_layers=2", "--set", "model.n_heads=2", "--set", "model.n_kv_heads=2",
            "--set", "model.ffn_dim=64",
            "--impl", "reference", "--steps", "8", "--batch-size", "4", "--seq-len", "32", "--vocab-size", "512",
            "--ckpt-every", "2", "--set", "train.eval_every=4", "--set", "train.threads=1",
            "--parallel", "ddp", "--seed", "5", *extra]


def test_rank_killed_during_checkpoint_leaves_previous_one(env: dict[str, str], tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    assert torchrun(_train_args(reference), env).returncode == 0

    run = tmp_path / "run"
    # rank 1 is SIGKILLed after writing its shard of the step-6 checkpoint, before the commit
    killed = torchrun(_train_args(run), {**env, "STEADYLM_TEST_KILL_IN_CHECKPOINT": "6:1"})
    assert killed.returncode != 0
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert state["step"] == 4  # the last good checkpoint (rank 0 removes the abandoned staging
    # directory when the collective with the dead rank fails, or the next save does)

    resumed = torchrun(_train_args(run, "--resume"), env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(run) == losses(reference)  # same world size: bit-exact
    assert not any(p.name.startswith(".checkpoint.staging-") for p in run.iterdir())


@pytest.mark.parametrize(
    "extra, message",
    [
        # Every rank runs the same parser before any process group exists, so one torchrun launch
        # (the deepest check, model validation) shows the multi-rank behaviour in the default
        # suite; the other two launches are slow, and their messages are checked in one process
        # by test_bad_input_messages_in_one_process.
        pytest.param(["--set", "train.lrr=1"], "--set train.lrr: unknown key", marks=pytest.mark.slow),
        pytest.param(["--set", "train.lr=fast"], "train.lr must be a number, got 'fast'", marks=pytest.mark.slow),
        (["--set", "model.n_heads=3"], "ModelConfig.dim (32) must be divisible by n_heads (3)"),
    ],
)
def test_bad_input_fails_on_every_rank_in_one_line(env: dict[str, str], tmp_path: Path, extra: list[str],
                                                   message: str) -> None:
    logs = tmp_path / "logs"
    # torchrun keeps each rank's stderr in its own file (and prints its own launcher traceback)
    proc = torchrun(["--log-dir", str(logs), "--redirects", "2", *_train_args(tmp_path / "run", *extra)], env,
                    timeout=120)
    assert proc.returncode != 0
    rank_stderr = sorted(logs.rglob("stderr.log"))
    assert len(rank_stderr) == NPROC, proc.stderr[-3000:]
    for path in rank_stderr:  # every rank: exactly one line, the error, no traceback
        lines = path.read_text().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (path, lines)
    assert not (tmp_path / "run").exists()  # nothing was written


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--set", "train.lrr=1"], "--set train.lrr: unknown key"),
        (["--set", "train.lr=fast"], "train.lr must be a number, got 'fast'"),
        (["--set", "model.n_heads=3"], "ModelConfig.dim (32) must be divisible by n_heads (3)"),
    ],
)
def test_bad_input_messages_in_one_process(tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str],
                                           message: str) -> None:
    from steadylm import cli

    assert cli.main(_train_args(tmp_path / "run", *extra)[2:]) == 2  # without "-m steadylm"
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "content, suffix, message",
    [
        ("[train]\nlr = 'fast'\n", ".toml", "train.lr must be a number, got 'fast'"),
        ("[trian]\nlr = 1e-3\n", ".toml", "unknown section(s) ['trian']"),
        ("{\"train\": {\"steps\": 0}}", ".json", "TrainConfig.steps must be >= 1, got 0"),
        ("[train\n", ".toml", "is not valid TOML"),
    ],
)
def test_bad_config_file_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str,
                                             suffix: str, message: str) -> None:
    from steadylm import cli

    config = tmp_path / f"run{suffix}"
    config.write_text(content)
    code = cli.main(["train", "--out", str(tmp_path / "run"), "--config", str(config)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err


def test_config_file_and_flags_build_one_spec(tmp_path: Path) -> None:
    import argparse

    from steadylm.train.command import add_arguments
    from steadylm.train.spec import spec_from_args

    config = tmp_path / "run.toml"
    config.write_text("[model]\npreset = 'nano'\nn_layers = 3\n[train]\nlr = 1e-3\nsteps = 50\n"
                      "[parallel]\nmode = 'fsdp'\n")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--out", "x", "--config", str(config), "--set", "train.lr=2e-3", "--steps", "60",
                              "--activation", "powlu"])
    spec = spec_from_args(args)
    # defaults < file < --set < short flags
    assert spec.train.lr == 2e-3 and spec.train.steps == 60 and spec.parallel.mode == "fsdp"
    assert spec.model.to_dict() == {"preset": "nano", "activation": "powlu", "n_layers": 3}
    assert RunSpec.from_dict(spec.to_dict()) == spec  # the spec round-trips through its dict


def test_every_short_flag_comes_from_a_field() -> None:
    import argparse
    import dataclasses

    from steadylm.train.command import add_arguments
    from steadylm.train.spec import SECTIONS

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    flags = {opt for action in parser._actions for opt in action.option_strings}
    from_fields = {f.metadata["flag"] for cls in SECTIONS.values() for f in dataclasses.fields(cls)
                   if f.metadata.get("flag")}
    issue_flags = {"--preset", "--activation", "--norm", "--steps", "--batch-size", "--seq-len", "--lr", "--seed",
                   "--precision", "--impl", "--data", "--tokenizer", "--parallel", "--ckpt-every", "--grad-accum",
                   "--fp8-backend"}
    assert issue_flags <= from_fields
    # the command's own flags are only the invocation ones; everything else is generated
    assert flags - from_fields - {"-h", "--help"} == {"--out", "--config", "--set", "--resume", "--stop-after"} | {
        "--no-" + f[2:] for f in from_fields if f in ("--probes", "--fsdp-bf16", "--compile")}


def test_grad_accumulation_follows_the_full_batch(tmp_path: Path) -> None:
    whole = train_from_spec(RunSpec.from_dict(spec_dict("swiglu_rmsnorm", steps=6)), tmp_path / "whole")
    accum = train_from_spec(RunSpec.from_dict(spec_dict("swiglu_rmsnorm", steps=6, grad_accum=4)), tmp_path / "acc")
    assert whole.steps_done == accum.steps_done == 6
    # the mean of 4 micro-batch means of 2 rows = the mean of 8 rows, to fp32 rounding
    assert_close(losses(tmp_path / "acc"), losses(tmp_path / "whole"), REL, "grad_accum=4")


def test_old_single_process_checkpoint_still_resumes(tmp_path: Path) -> None:
    from steadylm.train.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
    from steadylm.train.assemble import build_data
    from steadylm.train.trainer import Trainer

    spec = RunSpec.from_dict(spec_dict("powlu_bhyt", steps=8))
    data = build_data(spec)
    stopped = Trainer(spec.model_config(data.vocab_size), spec.train, data, tmp_path / "old")
    stopped.run(stop_after=4)
    # rewrite the checkpoint in the 0.1 format (safetensors + state.json format_version 1)
    state = load_checkpoint(find_checkpoint(tmp_path / "old"), stopped.model, stopped.optimizer)
    shutil.rmtree(tmp_path / "old" / "checkpoint")
    save_checkpoint(tmp_path / "old", stopped.model, stopped.optimizer, 4, counters=state.counters,
                    configs=state.configs)
    assert (tmp_path / "old" / "checkpoint" / "model.safetensors").exists()
    # a run of an older version has no entry for fields added since (at their defaults)
    state_path = tmp_path / "old" / "checkpoint" / "state.json"
    saved = json.loads(state_path.read_text())
    del saved["configs"]["model"]["qk_norm"]
    state_path.write_text(json.dumps(saved))
    resumed = Trainer(spec.model_config(data.vocab_size), spec.train, data, tmp_path / "old").run(resume=True)
    whole = Trainer(spec.model_config(data.vocab_size), spec.train, data, tmp_path / "whole").run()
    assert resumed.resumed_from == 4 and resumed.final_loss == whole.final_loss


def test_torchao_float8_with_fsdp2(two_rank_runs: dict[str, Any]) -> None:
    pytest.importorskip("torchao")
    run = two_rank_runs["results"]["torchao-fsdp"]
    assert run["steps_done"] == 6 and all(math.isfinite(x) for x in run["losses"])
    assert run["losses"][-1] < run["losses"][0]
    differing = {name: d for name, d in run["rank_max_diff"].items() if d != 0.0}
    assert not differing, differing


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_torchao_float8_backend_trains(tmp_path: Path, recipe: str) -> None:
    pytest.importorskip("torchao")
    from torchao.float8.float8_linear import Float8Linear

    from steadylm.train.assemble import build_data
    from steadylm.train.trainer import Trainer

    from steadylm.errors import ConfigError
    from steadylm.precision.backends import cpu_scaled_mm_takes_row_scales

    spec = RunSpec.from_dict(spec_dict("swiglu_rmsnorm", precision="fp8", fp8_backend="torchao", fp8_recipe=recipe,
                                       steps=6))
    data = build_data(spec)
    if recipe == "rowwise" and not cpu_scaled_mm_takes_row_scales():  # torch < 2.13 on CPU: a clear error instead
        with pytest.raises(ConfigError, match="train.fp8_recipe 'rowwise' needs per-row scales"):
            Trainer(spec.model_config(data.vocab_size), spec.train, data, tmp_path)
        return
    trainer = Trainer(spec.model_config(data.vocab_size), spec.train, data, tmp_path)
    result = trainer.run()
    converted = [name for name, m in trainer.model.named_modules() if isinstance(m, Float8Linear)]
    # scope "ffn": the three projections of both layers' FFNs, nothing else
    assert len(converted) == 6 and all(name.split(".")[-1] in ("w_gate", "w_up", "w_down") for name in converted)
    assert result.steps_done == 6 and result.final_loss < result.start_loss


def test_torchao_recipe_that_cannot_run_here_is_a_clear_error(tmp_path: Path) -> None:
    from steadylm.errors import ConfigError

    spec = RunSpec.from_dict(spec_dict("swiglu_rmsnorm", precision="fp8", fp8_backend="torchao",
                                       fp8_recipe="rowwise_with_gw_hp", device="cpu"))
    with pytest.raises(ConfigError, match="rowwise_with_gw_hp' needs bf16 parameters in compute on CPU"):
        train_from_spec(spec, tmp_path / "run")
    assert not (tmp_path / "run").exists()
