"""``steadylm ladder`` and its power-law fit: known parameters recovered, intervals that cover,
tiny ladders end to end on both axes, a killed ladder resumed without redoing finished runs."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from steadylm.cli import main
from steadylm.lab.ladder import fit_power_law, size_shape

TRUE = {"E": 1.8, "A": 60.0, "alpha": 0.3}
SIZES = np.geomspace(1e4, 1e7, 8)


def _synthetic(rng: np.random.Generator, seeds: int = 3, noise: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    n = np.repeat(SIZES, seeds)
    loss = (TRUE["E"] + TRUE["A"] * n ** -TRUE["alpha"]) * np.exp(rng.normal(0.0, noise, n.size))
    return n, loss


def test_fit_power_law_recovers_known_parameters_from_noisy_data():
    n, loss = _synthetic(np.random.default_rng(7), noise=0.005)
    fit = fit_power_law(n, loss, bootstrap=200, seed=0)
    assert fit.E == pytest.approx(TRUE["E"], rel=0.05)
    assert fit.alpha == pytest.approx(TRUE["alpha"], rel=0.1)
    assert fit.A == pytest.approx(TRUE["A"], rel=0.35)
    for key in ("E", "A", "alpha"):
        lo, hi = getattr(fit, f"{key}_ci")
        assert lo <= TRUE[key] <= hi, (key, lo, hi)
    assert fit.bootstrap == 200 and fit.samples.shape == (200, 3)
    # noiseless data: the fit is exact
    exact = fit_power_law(SIZES, TRUE["E"] + TRUE["A"] * SIZES ** -TRUE["alpha"], bootstrap=0)
    assert (exact.E, exact.A, exact.alpha) == pytest.approx((TRUE["E"], TRUE["A"], TRUE["alpha"]), rel=1e-4)


def test_fit_power_law_rejects_what_it_cannot_fit():
    with pytest.raises(ValueError, match="3 distinct sizes"):
        fit_power_law([1e5, 1e5, 1e6], [3.0, 3.1, 2.9])
    with pytest.raises(ValueError, match="sizes but"):
        fit_power_law([1e5, 1e6], [3.0])


def _coverage(replicates: int, bootstrap: int) -> int:
    covered = 0
    for k in range(replicates):
        n, loss = _synthetic(np.random.default_rng(1000 + k))
        lo, hi = fit_power_law(n, loss, bootstrap=bootstrap, seed=k).alpha_ci
        covered += lo <= TRUE["alpha"] <= hi
    return covered


@pytest.mark.slow
def test_fit_power_law_95_intervals_cover_alpha_in_at_least_90_of_100_replicates():
    assert _coverage(100, 200) >= 90


def test_fit_power_law_intervals_cover_alpha_in_most_of_12_replicates():
    """The fast variant of the slow coverage test (a binomial(12, 0.95) has >= 10 with p = 0.98)."""
    assert _coverage(12, 100) >= 10


def test_size_rule():
    assert size_shape(64) == {"dim": 64, "n_layers": 4, "n_heads": 4, "n_kv_heads": 4, "ffn_dim": 176}
    assert size_shape(24)["n_heads"] == 1 and size_shape(16)["n_layers"] == 2
    from steadylm.errors import ConfigError

    with pytest.raises(ConfigError, match="--widths"):
        size_shape(20)


# ---------------------------------------------------------------------------------------------
# tiny ladders end to end
# ---------------------------------------------------------------------------------------------

TINY = ["--data", "CORPUS", "--vocab-size", "300", "--seq-len", "16", "--batch-size", "8", "--impl", "reference",
        "--set", "train.eval_batches=1", "--set", "train.threads=1"]
SIZE_ARGS = ["ladder", "--axis", "size", "--widths", "16,24,32", "--tokens-per-param", "0.5", "--seeds", "0",
             "--variants", "swiglu+rmsnorm,powlu+rmsnorm", "--bootstrap", "50"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> str:
    from steadylm.data import load_kjv

    path = tmp_path_factory.mktemp("corpus") / "genesis.txt"
    path.write_text("\n".join(load_kjv()[:500]), encoding="utf-8")
    return str(path)


@pytest.fixture(autouse=True)
def _cache(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    monkeypatch.setenv("STEADYLM_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _tiny(corpus: str) -> list[str]:
    return [corpus if a == "CORPUS" else a for a in TINY]


@pytest.fixture(scope="module")
def size_ladder(corpus: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ladder") / "size"
    mp = pytest.MonkeyPatch()
    mp.setenv("STEADYLM_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    try:
        assert main([*SIZE_ARGS, "--out", str(out), *_tiny(corpus)]) == 0
    finally:
        mp.undo()
    return out


def test_size_ladder_reports_finite_fits_for_every_variant(size_ladder: Path):
    summary = json.loads((size_ladder / "summary.json").read_text())
    assert set(summary["fits"]) == {"swiglu+rmsnorm", "powlu+rmsnorm"}
    for name, fit in summary["fits"].items():
        for key in ("E", "A", "alpha"):
            assert isinstance(fit[key], float) and math.isfinite(fit[key]), (name, key, fit)
        assert all(math.isfinite(v) for v in fit["alpha_ci"]), (name, fit["alpha_ci"])
    assert len(summary["runs"]) == 3 * 2
    assert {r["width"] for r in summary["runs"]} == {16, 24, 32}
    assert "powlu+rmsnorm" in summary["extrapolated_gap"]
    md = (size_ladder / "summary.md").read_text()
    assert "Fitted laws" in md and "| swiglu+rmsnorm |" in md
    assert (size_ladder / "plots" / "scaling.png").read_bytes()[:4] == b"\x89PNG"


def test_a_killed_ladder_resumes_without_redoing_finished_runs(size_ladder: Path, corpus: str, tmp_path: Path):
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "steadylm.cli", *SIZE_ARGS, "--out", str(out), *_tiny(corpus)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline and len(list(out.glob("size/*/*/*/result.json"))) < 2:
            assert proc.poll() is None, "the ladder ended before it could be killed"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finished = {p: p.stat().st_mtime_ns for p in out.glob("size/*/*/*/result.json")}
    metrics = {p.parent / "metrics.jsonl": (p.parent / "metrics.jsonl").stat().st_mtime_ns for p in finished}
    assert 2 <= len(finished) < 6 and not (out / "summary.json").exists()

    assert main([*SIZE_ARGS, "--out", str(out), "--resume", *_tiny(corpus)]) == 0
    for path, mtime in {**finished, **metrics}.items():
        assert path.stat().st_mtime_ns == mtime, f"{path} was redone"
    assert len(list(out.glob("size/*/*/*/result.json"))) == 6
    # the resumed ladder has the uninterrupted ladder's numbers
    again = json.loads((out / "summary.json").read_text())
    first = json.loads((size_ladder / "summary.json").read_text())
    losses = lambda s: [(r["variant"], r["width"], r["seed"], r["summary"]["final_val_loss"]) for r in s["runs"]]  # noqa: E731
    assert losses(again) == losses(first)


def test_depth_ladder_reports_variance_lazy_blocks_and_the_bound(corpus: str, tmp_path: Path):
    out = tmp_path / "depth"
    assert main(["ladder", "--axis", "depth", "--depths", "1,2,3", "--depth-width", "16", "--steps", "8",
                 "--set", "train.probe_every=4", "--set", "train.eval_every=4", "--set", "train.warmup_steps=1",
                 "--variants", "swiglu+rmsnorm,swiglu+bhyt", "--out", str(out), *_tiny(corpus)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    for name in ("swiglu+rmsnorm", "swiglu+bhyt"):
        for depth in ("1", "2", "3"):
            point = summary["depth"][name][depth]
            assert point["last_var"] > 0 and 0 <= point["lazy_share"] <= 1, (name, depth, point)
            assert len(point["layer_var"]) == int(depth)
    assert summary["depth"]["swiglu+bhyt"]["3"]["lam_max"] > 0
    md = (out / "summary.md").read_text()
    assert "LayerNorm-Scaling bound" in md and "swiglu+rmsnorm / swiglu+bhyt" in md
    rows = [json.loads(line) for line in (out / "depth" / "3" / "swiglu+bhyt" / "seed0" / "metrics.jsonl").open()]
    assert any("depth/layer2/cos" in r for r in rows)


def test_tune_lr_picks_and_reports_each_variants_lr(corpus: str, tmp_path: Path):
    out = tmp_path / "tuned"
    assert main(["ladder", "--axis", "depth", "--depths", "1", "--depth-width", "16", "--steps", "6",
                 "--set", "train.probe_every=3", "--set", "train.eval_every=3", "--set", "train.warmup_steps=1",
                 "--variants", "swiglu+rmsnorm", "--tune-lr", "--lr-grid", "0.1,10", "--out", str(out),
                 *_tiny(corpus)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    tried = summary["tuning"]["swiglu+rmsnorm"]
    assert [t["lr"] for t in tried] == pytest.approx([3e-4, 3e-2])
    best = min(tried, key=lambda t: t["summary"]["final_val_loss"])["lr"]
    assert summary["lrs"]["swiglu+rmsnorm"] == pytest.approx(best)
    assert "Learning-rate tuning" in (out / "summary.md").read_text()


def test_bad_ladder_options_are_one_line_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path):
    for argv, needle in ((["--widths", "16,16,32"], "3 distinct widths"), (["--widths", "16,24,30"], "multiple of 8"),
                         (["--steps", "5"], "size axis sets"), (["--seeds", "0,0"], "--seeds"),
                         (["--axis", "depth", "--set", "model.n_layers=3"], "--depths")):
        assert main(["ladder", "--out", str(tmp_path / "o"), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and needle in err and len(err.splitlines()) == 1, err


@pytest.mark.slow
def test_quick_ladder_end_to_end(tmp_path: Path):
    """The README's `steadylm ladder --quick` (size axis): finite fits for every variant."""
    assert main(["ladder", "--quick", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    for name, fit in summary["fits"].items():
        assert all(isinstance(fit[k], float) and math.isfinite(fit[k]) for k in ("E", "A", "alpha")), (name, fit)


def test_rank_1_in_a_process_and_rank_0_here_share_the_runs(corpus: str, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]):
    """The default-suite twin of the slow torchrun test below: rank 1 in a child process, rank 0
    in this one (RANK / WORLD_SIZE as torchrun sets them), so one process start instead of two."""
    out = tmp_path / "ranks"
    args = ["ladder", "--axis", "size", "--widths", "16,24,32", "--tokens-per-param", "0.5", "--seeds", "0",
            "--variants", "swiglu+rmsnorm", "--bootstrap", "20", "--out", str(out), *_tiny(corpus)]
    layout = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    child = subprocess.Popen([sys.executable, "-m", "steadylm.cli", *args], env={**os.environ, **layout, "RANK": "1"},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for key, value in {**layout, "RANK": "0"}.items():
            monkeypatch.setenv(key, value)
        assert main(args) == 0
    finally:
        log = child.communicate(timeout=600)[0]
    assert child.returncode == 0, log
    here = capsys.readouterr().out
    trained = [[line.split(" main ")[1].split(" lr ")[0] for line in text.splitlines() if " main " in line]
               for text in (here, log)]
    assert trained == [["swiglu+rmsnorm @16 seed 0", "swiglu+rmsnorm @32 seed 0"], ["swiglu+rmsnorm @24 seed 0"]]
    assert "report:" in here and "report:" not in log
    assert len(json.loads((out / "summary.json").read_text())["runs"]) == 3


@pytest.mark.slow
def test_ranks_take_whole_runs_and_rank_0_reports(corpus: str, tmp_path: Path):
    """Two processes as torchrun starts them (RANK / WORLD_SIZE): runs 0 and 2 on rank 0, run 1
    on rank 1, one report."""
    out = tmp_path / "ranks"
    cmd = [sys.executable, "-m", "steadylm.cli", "ladder", "--axis", "size", "--widths", "16,24,32",
           "--tokens-per-param", "0.5", "--seeds", "0", "--variants", "swiglu+rmsnorm", "--bootstrap", "20",
           "--out", str(out), *_tiny(corpus)]
    procs = [subprocess.Popen(cmd, env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    logs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    trained = [[line.split(" main ")[1].split(" lr ")[0] for line in log.splitlines() if " main " in line]
               for log in logs]
    assert trained == [["swiglu+rmsnorm @16 seed 0", "swiglu+rmsnorm @32 seed 0"], ["swiglu+rmsnorm @24 seed 0"]]
    assert "report:" in logs[0] and "report:" not in logs[1]
    assert len(json.loads((out / "summary.json").read_text())["runs"]) == 3
    config = json.loads((out / "size" / "24" / "swiglu+rmsnorm" / "seed0" / "config.json").read_text())
    assert config["train"]["threads"] == 1  # the explicit --set wins over cores / local world size
