"""Runs that survive what clusters do to them, with real processes and real signals.

* one writer per run directory: a second run on the same directory refuses at once, naming the
  holder; the first run's files are untouched; a lock left by a killed process never blocks;
* SIGTERM (1 rank, and one of 2 ranks under torchrun): a checkpoint at the step reached, exit 75,
  and ``--resume`` finishes with the losses of the uninterrupted run, bit for bit;
* a second SIGTERM while that checkpoint is written aborts it; the previous one still loads;
* a disk that fills during a checkpoint: a one-line error naming the file, the previous checkpoint
  intact, no staging left behind;
* a killed peer rank: the survivor's launch ends in bounded time, naming the lost rank;
* the run config, fuzzed: every input is a valid spec or a one-line error naming the key.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from steadylm.errors import ConfigError
from steadylm.train.command import EXIT_PREEMPTED
from steadylm.train.metrics import read_metrics
from steadylm.train.spec import SECTIONS, RunSpec, parse_assignments

MODEL = ["--set", "model.dim=32", "--set", "model.n_layers=2", "--set", "model.n_heads=2", "--set",
         "model.n_kv_heads=2", "--set", "model.ffn_dim=64", "--impl", "reference"]


# Long enough that a signal sent after the first rows lands mid-run (the tests stop or signal the
# run at row 5-7), short enough that the uninterrupted reference and the resumes stay cheap.
STEPS = 60


def train_args(out: Path, steps: int = STEPS, *extra: str) -> list[str]:
    return ["train", "--out", str(out), *MODEL, "--steps", str(steps), "--batch-size", "4", "--seq-len", "32",
            "--vocab-size", "512", "--set", "train.threads=1", "--set", "train.eval_every=50", "--seed", "2",
            "--set", "train.device=cpu", *extra]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    cache = tmp_path_factory.mktemp("cache")
    return {**os.environ, "STEADYLM_CACHE": str(cache), "OMP_NUM_THREADS": "1"}


def steadylm(args: list[str], env: dict[str, str], **kw) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "steadylm", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def wait_for_rows(run: Path, rows: int, process: subprocess.Popen[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while len(read_metrics(run / "metrics.jsonl")) < rows:
        if process.poll() is not None:
            pytest.fail(f"run ended ({process.returncode}) early: {process.communicate()[1][-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("run did not start in time")
        time.sleep(0.05)


def losses(run: Path) -> list[float]:
    return [row["loss"] for row in read_metrics(run / "metrics.jsonl")]


@pytest.fixture(scope="module")
def reference(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> list[float]:
    out = tmp_path_factory.mktemp("reference") / "run"
    proc = steadylm(train_args(out), env)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    return losses(out)


def test_second_run_on_a_directory_refuses_and_sigterm_checkpoints(env: dict[str, str], tmp_path: Path,
                                                                   reference: list[float]) -> None:
    run = tmp_path / "run"
    first = steadylm(train_args(run), env)
    wait_for_rows(run, 5, first)
    first.send_signal(signal.SIGSTOP)  # alive and holding the directory while the second one tries

    second = steadylm(train_args(run), env)
    _, err = second.communicate(timeout=120)
    assert second.returncode == 2
    assert err.count("\n") == 1 and err.startswith(f"error: run directory {run.resolve()} is in use by pid "
                                                   f"{first.pid} on host "), err

    first.send_signal(signal.SIGTERM)  # handled when it runs again, mid-run
    first.send_signal(signal.SIGCONT)
    out, err = first.communicate(timeout=120)
    assert first.returncode == EXIT_PREEMPTED, err[-2000:]
    assert "preempted by SIGTERM at step" in err
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    rows = read_metrics(run / "metrics.jsonl")
    # the second run wrote nothing: one row per step, in order, up to the step reached
    assert [r["step"] for r in rows] == list(range(1, state["step"] + 1))
    assert state["step"] < STEPS

    resumed = steadylm(train_args(run, STEPS, "--resume"), env)
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-2000:]
    assert losses(run) == reference  # bit-exact on CPU


def test_sigusr1_is_handled_like_sigterm(env: dict[str, str], tmp_path: Path, reference: list[float]) -> None:
    # SLURM's early warning (--signal=USR1@120): checkpoint at the step reached, exit 75, resume
    # finishes with the uninterrupted run's losses.
    run = tmp_path / "run"
    first = steadylm(train_args(run), env)
    wait_for_rows(run, 5, first)
    first.send_signal(signal.SIGUSR1)
    _, err = first.communicate(timeout=120)
    assert first.returncode == EXIT_PREEMPTED, err[-2000:]
    assert "preempted by SIGUSR1 at step" in err.strip().splitlines()[-1], err[-2000:]
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert 5 <= state["step"] < STEPS
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == list(range(1, state["step"] + 1))
    resumed = steadylm(train_args(run, STEPS, "--resume"), env)
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-2000:]
    assert losses(run) == reference  # bit-exact on CPU


def test_lock_of_a_killed_run_does_not_block_resume(env: dict[str, str], tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = steadylm(train_args(run, STEPS, "--ckpt-every", "2"), env)
    wait_for_rows(run, 4, first)
    first.kill()
    first.wait()
    assert (run / ".steadylm.lock").exists()
    resumed = steadylm(train_args(run, 8, "--resume", "auto", "--ckpt-every", "2"), env)
    _, err = resumed.communicate(timeout=300)
    # --steps differs from the killed run's, which is allowed: the schedule follows the new spec
    assert resumed.returncode == 0, err[-2000:]


_PAUSING_CHILD = textwrap.dedent(
    """
    import os, signal, sys, time
    from pathlib import Path
    from steadylm import cli
    from steadylm.train import dcp

    marker = Path(sys.argv[1])
    real_save_rng = dcp._save_rng

    def save_rng(path):
        handler = signal.getsignal(signal.SIGTERM)
        if getattr(getattr(handler, "__self__", None), "requested", None):  # the preemption save
            marker.write_text("paused")
            time.sleep(120)  # the second SIGTERM arrives here
        real_save_rng(path)

    dcp._save_rng = save_rng
    sys.exit(cli.main(sys.argv[2:]))
    """
)


def test_second_sigterm_during_the_checkpoint_keeps_the_previous_one(env: dict[str, str], tmp_path: Path) -> None:
    script, marker, run = tmp_path / "child.py", tmp_path / "paused", tmp_path / "run"
    script.write_text(_PAUSING_CHILD)
    child = subprocess.Popen([sys.executable, str(script), str(marker), *train_args(run, STEPS, "--ckpt-every", "3")],
                             env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_rows(run, 7, child)
    child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert child.poll() is None and time.monotonic() < deadline, child.communicate()[1][-2000:]
        time.sleep(0.05)
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 2
    assert err.startswith("error: second SIGTERM while writing the preemption checkpoint") and err.count("\n") == 1
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert state["step"] % 3 == 0  # the last regular checkpoint
    assert not any(p.name.startswith(".checkpoint.staging-") for p in run.iterdir())
    resumed = steadylm(train_args(run, STEPS, "--resume", "--stop-after", str(state["step"] + 1)), env)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]


@pytest.fixture()
def small_disk(tmp_path: Path):
    mount = tmp_path / "disk"
    mount.mkdir()
    yield mount
    subprocess.run(["umount", str(mount)], capture_output=True)


def test_disk_full_during_a_checkpoint(env: dict[str, str], tmp_path: Path, small_disk: Path) -> None:
    probe = tmp_path / "probe"
    proc = steadylm(train_args(probe, 2), env)
    assert proc.wait(timeout=300) == 0
    ckpt_bytes = sum(p.stat().st_size for p in (probe / "checkpoint").iterdir())
    # room for one checkpoint and the metrics, not for the second one staged beside it
    size_kib = (ckpt_bytes * 3 // 2) // 1024 + 64
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(small_disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here: {mounted.stderr.strip()}")
    run = small_disk / "run"
    proc = steadylm(train_args(run, STEPS, "--ckpt-every", "2"), env)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert "No space left on device" in err and str(run) in err
    assert "Traceback" not in err
    assert json.loads((run / "checkpoint" / "state.json").read_text())["step"] == 2
    assert not any(p.name.startswith(".checkpoint.staging-") for p in run.iterdir())
    # the surviving checkpoint loads (resume one step somewhere with room)
    shutil.copytree(run, tmp_path / "moved")
    resumed = steadylm(train_args(tmp_path / "moved", STEPS, "--resume", "--stop-after", "3"), env)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture()
def read_only_dir(tmp_path: Path):
    """A directory to fill, then make read-only with the returned function: a tmpfs remounted
    read-only as root (where permission bits do not stop writes), ``chmod a-w`` otherwise."""
    place = tmp_path / "ro"
    place.mkdir()
    mounted = False
    if os.geteuid() == 0:
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(place)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"running as root and cannot mount a tmpfs here: {result.stderr.strip()}")
        mounted = True

    def make_read_only() -> None:
        if mounted:
            subprocess.run(["mount", "-o", "remount,ro", str(place)], check=True)
        else:
            for path in [place, *place.rglob("*")]:
                path.chmod(path.stat().st_mode & ~0o222)

    yield place, make_read_only
    if mounted:
        subprocess.run(["umount", str(place)], capture_output=True)
    else:
        for path in [place, *place.rglob("*")]:
            path.chmod(path.stat().st_mode | 0o200)


def test_read_only_and_missing_output_directories(env: dict[str, str], tmp_path: Path, read_only_dir,
                                                  capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from steadylm import cli

    monkeypatch.setenv("STEADYLM_CACHE", env["STEADYLM_CACHE"])
    place, make_read_only = read_only_dir
    # missing parents are created: a run in a new nested directory trains
    done = tmp_path / "new" / "nested" / "run"
    assert cli.main(train_args(done, 2)) == 0
    shutil.copytree(done, place / "run")
    make_read_only()
    before = _tree_bytes(place)
    capsys.readouterr()

    def one_line_error(*needles: str) -> None:
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("error: ") and "Traceback" not in err, err
        for needle in needles:
            assert needle in err, err

    # a new run, a resumed run and a lab run in a read-only place: exit 2, one line naming the path
    assert cli.main(train_args(place / "fresh", 2)) == 2
    one_line_error(str(place / "fresh"), "Read-only file system" if os.geteuid() == 0 else "ermission")
    assert cli.main(train_args(place / "run", 4, "--resume")) == 2
    one_line_error(str(place / "run"))
    assert cli.main(compare_args(place / "lab", 2)) == 2
    one_line_error(str(place / "lab"))
    assert _tree_bytes(place) == before  # nothing already written was lost or changed

    # resuming a run directory that does not exist: one line, nothing created in its place
    assert cli.main(train_args(tmp_path / "absent" / "run", 4, "--resume")) == 2
    one_line_error("no checkpoint", str(tmp_path / "absent" / "run"))
    assert not (tmp_path / "absent" / "run").exists()


def _rank_pids(agent: subprocess.Popen[str], nproc: int, timeout: float = 120) -> dict[int, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True, text=True).stdout.split()
        pids = {}
        for pid in children:
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            ranks = [e.split(b"=", 1)[1] for e in environ if e.startswith(b"RANK=")]
            if ranks:
                pids[int(ranks[0])] = int(pid)
        if len(pids) == nproc:
            return pids
        time.sleep(0.1)
    pytest.fail("torchrun did not start its ranks")


def ranks_stderr(err: str) -> str:
    """What the ranks printed before torchrun's own failure summary (which fills the tail)."""
    cut = err.find("ChildFailedError")
    cut = err.rfind("\n", 0, err.rfind("failed (exitcode", 0, cut if cut >= 0 else len(err)))
    return err[max(0, cut - 3000) : cut] if cut > 0 else err[-3000:]


def torchrun(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "steadylm", *args], env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def test_sigterm_to_one_of_two_ranks_stops_both_at_one_step(env: dict[str, str], tmp_path: Path) -> None:
    reference, run = tmp_path / "reference", tmp_path / "run"
    ref = torchrun(train_args(reference, STEPS, "--parallel", "ddp"), env)
    assert ref.wait(timeout=600) == 0, ranks_stderr(ref.communicate()[1])

    agent = torchrun(train_args(run, STEPS, "--parallel", "ddp"), env)
    pids = _rank_pids(agent, 2)
    wait_for_rows(run, 5, agent)
    os.kill(pids[1], signal.SIGTERM)  # only rank 1 hears it
    _, err = agent.communicate(timeout=300)
    assert agent.returncode != 0  # torchrun reports the ranks' exit 75 as a failure to requeue
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert state["world_size"] == 2 and state["step"] < STEPS
    assert read_metrics(run / "metrics.jsonl")[-1]["step"] == state["step"]

    resumed = torchrun(train_args(run, STEPS, "--parallel", "ddp", "--resume"), env)
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, ranks_stderr(err)
    assert losses(run) == losses(reference)


def test_killed_peer_ends_the_run_in_bounded_time(env: dict[str, str], tmp_path: Path) -> None:
    run = tmp_path / "run"
    agent = torchrun(train_args(run, 100000, "--parallel", "ddp", "--dist-timeout", "30"), env)
    pids = _rank_pids(agent, 2)
    wait_for_rows(run, 3, agent)
    start = time.monotonic()
    os.kill(pids[1], signal.SIGKILL)
    _, err = agent.communicate(timeout=180)
    elapsed = time.monotonic() - start
    assert agent.returncode != 0
    assert elapsed < 90, f"took {elapsed:.0f} s"  # torchrun's 30 s grace + our 30 s timeout, at worst
    assert "rank" in err and ("exitcode  : -9" in err or "Signals.SIGKILL" in err or "rank 0 of 2" in err), err[-3000:]


# ----------------------------------------------------------------------------------------------
# config fuzzing
# ----------------------------------------------------------------------------------------------

_KEYS = [f"{section}.{f}" for section, cls in SECTIONS.items() for f in cls.__dataclass_fields__ if f != "overrides"]
_KEYS += ["model.n_layers", "model.dim", "model.n_heads", "model.activation_kwargs", "model.nope", "train.nope",
          "nosection.lr", "train", ".lr", "model."]
_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-5, 5000), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=8), st.lists(st.integers(), max_size=2),
                    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


def _check_outcome(build, keys: list[str]) -> None:
    try:
        spec = build()
    except ConfigError as err:
        message = str(err)
        assert "\n" not in message
        assert any(k in message or k.split(".", 1)[-1] in message for k in keys) or "section" in message, message
        return
    assert isinstance(spec, RunSpec)
    assert RunSpec.from_dict(spec.to_dict()) == spec


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(_KEYS), _VALUES, max_size=4))
def test_fuzzed_config_file_is_a_spec_or_a_one_line_error(assignments: dict[str, object]) -> None:
    data: dict[str, object] = {}
    for key, value in assignments.items():
        section, _, name = key.partition(".")
        if isinstance(data.get(section, {}), dict):
            data.setdefault(section, {})[name] = value  # type: ignore[index]
    _check_outcome(lambda: RunSpec.from_dict(data), list(assignments) or ["section"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(_KEYS), st.text(max_size=10)), max_size=4))
def test_fuzzed_set_flags_are_a_spec_or_a_one_line_error(items: list[tuple[str, str]]) -> None:
    raw = [f"{key}={value}" for key, value in items]
    _check_outcome(lambda: RunSpec().with_overrides(parse_assignments(raw)), [k for k, _ in items] or ["section"])


def test_stalled_peer_is_named_after_a_short_dist_timeout(env: dict[str, str], tmp_path: Path) -> None:
    """Default-suite version of the slow test below: --dist-timeout 3, and the stalled rank is
    SIGKILLed as soon as rank 0 has reported it, so torchrun's 30 s grace is not waited for."""
    run, logs = tmp_path / "run", tmp_path / "logs"
    agent = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              "--log-dir", str(logs), "--redirects", "2", "-m", "steadylm",
                              *train_args(run, 100000, "--parallel", "ddp", "--dist-timeout", "3")],
                             env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    pids = _rank_pids(agent, 2)
    wait_for_rows(run, 3, agent)
    os.kill(pids[1], signal.SIGSTOP)  # alive but silent
    start, message, rank0 = time.monotonic(), "error: rank 0 of 2: a collective failed, so a peer rank died or stalled", ""
    try:
        while time.monotonic() - start < 120 and message not in rank0:
            time.sleep(0.2)
            rank0 = "".join(p.read_text() for p in logs.rglob("stderr.log") if p.parent.name == "0")
        elapsed = time.monotonic() - start
    finally:
        os.kill(pids[1], signal.SIGKILL)
        agent.communicate(timeout=120)
    assert message in rank0, rank0[-2000:]
    # 3 s timeout + the step in flight + loaded-machine slack; without the timeout it would be 600 s
    assert elapsed < 60, f"took {elapsed:.0f} s"
    assert agent.returncode != 0


@pytest.mark.slow
def test_stalled_peer_fails_the_others_after_the_timeout(env: dict[str, str], tmp_path: Path) -> None:
    run = tmp_path / "run"
    logs = tmp_path / "logs"
    agent = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              "--log-dir", str(logs), "--redirects", "2", "-m", "steadylm",
                              *train_args(run, 100000, "--parallel", "ddp", "--dist-timeout", "10")],
                             env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    pids = _rank_pids(agent, 2)
    wait_for_rows(run, 3, agent)
    os.kill(pids[1], signal.SIGSTOP)  # alive but silent
    start = time.monotonic()
    try:
        agent.communicate(timeout=240)
    finally:
        if Path(f"/proc/{pids[1]}").exists():
            os.kill(pids[1], signal.SIGKILL)
    assert agent.returncode != 0
    assert time.monotonic() - start < 120  # 10 s collective timeout + torchrun's 30 s grace
    rank0 = next(p for p in logs.rglob("stderr.log") if p.parent.name == "0").read_text()
    assert "error: rank 0 of 2: a collective failed, so a peer rank died or stalled" in rank0, rank0[-2000:]


def compare_args(out: Path, steps: int, *extra: str) -> list[str]:
    return ["compare", "--out", str(out), "--variants", "swiglu+rmsnorm,powlu+rmsnorm", "--steps", str(steps),
            "--batch-size", "4", "--seq-len", "32", "--vocab-size", "512", "--set", "model.dim=32",
            "--set", "model.n_layers=2", "--set", "model.n_heads=2", "--set", "model.n_kv_heads=2",
            "--set", "model.ffn_dim=64", "--impl", "reference", "--set", "train.threads=1", *extra]


def test_lab_protocol_holds_its_directory_and_stops_on_sigterm(env: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "lab"
    first = steadylm(compare_args(out, STEPS), env)
    wait_for_rows(out / "swiglu+rmsnorm", 5, first)
    first.send_signal(signal.SIGSTOP)
    second = steadylm(compare_args(out, STEPS), env)
    _, err = second.communicate(timeout=120)
    assert second.returncode == 2 and err.startswith(f"error: run directory {out.resolve()} is in use by pid "
                                                     f"{first.pid}"), err
    first.send_signal(signal.SIGTERM)
    first.send_signal(signal.SIGCONT)
    _, err = first.communicate(timeout=120)
    assert first.returncode == EXIT_PREEMPTED, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("error: preempted by SIGTERM at step ")
    step = json.loads((out / "swiglu+rmsnorm" / "checkpoint" / "state.json").read_text())["step"]
    assert 5 <= step < STEPS and not (out / "report.html").exists()
    resumed = steadylm(compare_args(out, STEPS, "--resume"), env)
    _, err = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, err[-2000:]
    assert (out / "report.html").exists()
    rows = read_metrics(out / "swiglu+rmsnorm" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # continued, not restarted or duplicated
