"""``steadylm compare`` end to end on tiny runs, and its error paths through the CLI.

Default tests use a tiny model (``--set`` overrides, the reference implementation so that no
kernel compilation is timed) on a small slice of the embedded corpus; the full ``--quick`` grid
runs under ``-m slow``.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from steadylm.cli import main
from steadylm.errors import ConfigError
from steadylm.lab.compare import DEFAULT_GRID
from steadylm.lab.options import LabOptions, resolve_variants
from steadylm.train import TIMING_KEYS
from steadylm.train.metrics import read_metrics

TINY_FLAGS = [
    "--steps", "6", "--batch-size", "2", "--seq-len", "16", "--set", "train.probe_every=3",
    "--set", "train.eval_every=3", "--set", "model.dim=32", "--set", "model.n_layers=2",
    "--set", "model.n_heads=2", "--set", "model.n_kv_heads=2", "--set", "model.ffn_dim=48",
    "--impl", "reference", "--vocab-size", "300", "--set", "probes.spike_window=3",
]
VARIANTS = "swiglu+rmsnorm,powlu+bhyt,swiglu+dyt"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from steadylm.data import load_kjv

    path = tmp_path_factory.mktemp("corpus") / "genesis.txt"
    path.write_text("\n".join(load_kjv()[:500]), encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STEADYLM_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _run(out: Path, corpus: Path, *extra: str) -> int:
    return main(["compare", "--out", str(out), "--data", str(corpus), "--variants", VARIANTS,
                 *TINY_FLAGS, *extra])


@pytest.fixture(scope="module")
def tiny_run_with_output(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("compare") / "out"
    mp = pytest.MonkeyPatch()
    mp.setenv("STEADYLM_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    stdout = io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout):
            assert _run(out, corpus) == 0
    finally:
        mp.undo()
    return out, stdout.getvalue()


@pytest.fixture()
def tiny_run(tiny_run_with_output: tuple[Path, str]) -> Path:
    return tiny_run_with_output[0]


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_report_and_metrics_exist_with_finite_numbers_for_every_variant(tiny_run: Path) -> None:
    for name in ("report.html", "summary.md", "summary.json"):
        assert (tiny_run / name).stat().st_size > 0, name
    for plot in ("activations", "loss", "down_proj_bands", "hidden_states", "bhyt_variance",
                 "tanh_saturation", "throughput"):
        assert (tiny_run / "plots" / f"{plot}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert [v["variant"] for v in summary["variants"]] == VARIANTS.split(",")
    for v in summary["variants"]:
        for key in ("final_train_loss", "final_val_loss", "down_in_amax_last", "down_in_p99_last",
                    "down_in_kurtosis_last", "last_layer_hidden_var", "tokens_per_s", "tokens_per_param"):
            assert _finite(v[key]), (v["variant"], key)
        assert v["tokens_seen"] == 6 * 2 * 16
        rows = read_metrics(tiny_run / v["variant"] / "metrics.jsonl")
        assert (tiny_run / v["variant"] / "metrics.csv").exists()
        assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
        probed = [r for r in rows if "ffn_down_in/layer1/p99" in r]
        assert [r["step"] for r in probed] == [1, 3, 6]
        for r in rows:
            for k, val in r.items():
                if k != "diverged":
                    assert _finite(val), (v["variant"], r["step"], k, val)
    bhyt = summary["variants"][1]
    assert -1 <= bhyt["bhyt_pearson_r_min"] <= 1 and 0 <= bhyt["tanh_saturation_max"] <= 1
    assert json.loads((tiny_run / "powlu+bhyt" / "bhyt_variance_samples.json").read_text())["layer0"]


def test_html_report_is_self_contained(tiny_run: Path) -> None:
    html = (tiny_run / "report.html").read_text()
    assert html.count('src="data:image/png;base64,') == 7
    assert "http://" not in html and "https://" not in html and "<script" not in html
    assert "tokens/param" in html and "Pearson" in html and "kurtosis" in html.lower()
    md = (tiny_run / "summary.md").read_text()
    assert "(plots/loss.png)" in md and "| powlu+bhyt |" in md


def test_two_runs_with_one_seed_give_identical_metrics(tiny_run: Path, corpus: Path, tmp_path: Path) -> None:
    # One variant repeated (the one with the most state: PowLU, BHyT's c_ℓ refresh, its probes):
    # the lab runs every variant through the same runner, so repeating all three adds time, not power.
    name = "powlu+bhyt"
    assert main(["compare", "--out", str(tmp_path / "again"), "--data", str(corpus), "--variants", name,
                 *TINY_FLAGS]) == 0
    for name in [name]:
        a = read_metrics(tiny_run / name / "metrics.jsonl")
        b = read_metrics(tmp_path / "again" / name / "metrics.jsonl")
        strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]  # noqa: E731
        assert strip(a) == strip(b), name


def test_the_table_is_printed_at_the_end(tiny_run_with_output: tuple[Path, str]) -> None:
    out = tiny_run_with_output[1]
    table = out[out.rindex("steadylm compare"):]
    for header in ("variant", "val loss", "spikes", "max |down-in|", "down-in P99", "last-layer var",
                   "tokens/s", "tokens/param"):
        assert header in table
    for name in VARIANTS.split(","):
        assert name in table
    assert "report:" in table


# ---------------------------------------------------------------------------------------------
# variants
# ---------------------------------------------------------------------------------------------


def _variants(acts=None, norms=None, variants=None) -> list[str]:
    lab = LabOptions(activations=acts, norms=norms, variants=variants)
    return [v.name for v in resolve_variants(lab, DEFAULT_GRID)]


def test_default_grid_and_cross_products() -> None:
    assert _variants() == [f"{a}+{n}" for a, n in DEFAULT_GRID]
    assert len(DEFAULT_GRID) == 6 and ("powlu", "bhyt") in DEFAULT_GRID
    assert _variants(["powlu", "swiglu"], ["bhyt"]) == ["powlu+bhyt", "swiglu+bhyt"]
    assert _variants(["powlu"]) == ["powlu+rmsnorm"]
    assert _variants(variants=["swiglu+dyt"]) == ["swiglu+dyt"]
    for bad in ((["gelu"], None, None), (None, ["batchnorm"], None), (None, None, ["powlu"]),
                (None, None, ["powlu+rmsnorm", "powlu+rmsnorm"]), (["powlu"], None, ["powlu+bhyt"])):
        with pytest.raises(ConfigError):
            _variants(*bad)


# Summary numbers of the tiny run above written by the lab before its rebuild (commit 41e94c0,
# same corpus slice and flags in that version's syntax), recorded on another machine. They are a
# golden from elsewhere, so they are compared within a tolerance, not bit for bit (SPEC §6): the
# last bits of fp32 matmuls and reductions depend on the CPU's vector width (the summation order),
# and 6 AdamW steps carry such ulps forward.
RECORDED_BEFORE_REBUILD = {
    "swiglu+rmsnorm": {"final_train_loss": 5.682663917541504, "final_val_loss": 5.65092658996582,
                       "down_in_amax_last": 0.05402728170156479, "down_in_amax_peak": 0.05851314961910248,
                       "down_in_p99_last": 0.02708962745964527, "down_in_kurtosis_last": 8.147073745727539,
                       "grad_gate_amax_last": 0.0015135669382289052,
                       "last_layer_hidden_var": 0.0006708752480335534, "spikes": 0},
    "powlu+bhyt": {"final_train_loss": 5.703566392262776, "final_val_loss": 5.697598576545715,
                   "down_in_amax_last": 0.000611701572779566, "down_in_amax_peak": 0.000611701572779566,
                   "down_in_p99_last": 0.0002693806018214673, "down_in_kurtosis_last": 24.53104591369629,
                   "grad_gate_amax_last": 0.0002002428809646517,
                   "last_layer_hidden_var": 0.00042643205961212516, "bhyt_pearson_r_min": 0.9942516742049908,
                   "bhyt_pearson_r_layer_means": 0.9787465546746121, "tanh_saturation_max": 0.0, "spikes": 0},
    "swiglu+dyt": {"final_train_loss": 5.703610102335612, "final_val_loss": 5.703518748283386,
                   "down_in_amax_last": 2.1106829080963507e-05, "down_in_amax_peak": 2.850213240890298e-05,
                   "down_in_p99_last": 1.226367567142006e-05, "down_in_kurtosis_last": 9.065792083740234,
                   "grad_gate_amax_last": 2.056362262692346e-07,
                   "last_layer_hidden_var": 0.013843228109180927, "tanh_saturation_max": 0.0, "spikes": 1},
}


# Tolerance for RECORDED_BEFORE_REBUILD. Measured on one AVX-512 machine (torch 2.13.0 CPU) under
# ATEN_CPU_CAPABILITY=default, avx2 and avx512: the worst relative difference of any recorded number
# was 4.3e-7, 5.4e-7 and 5.4e-7 (down_in_p99_last of powlu+bhyt; ~9 fp32 ulps, 2^-24 = 6e-8);
# 1e-5 leaves a margin of ~18x for other CPUs and BLAS builds. What the test is for — the rebuilt lab
# computing the same run — still shows: measured, a 3% change of the learning rate (3.1e-3 instead
# of 3e-3) moves 23 of the 26 non-count numbers by more than 1e-5 (median 4e-3), another seed moves
# the losses by up to 1e-3. Counts (spikes) and exact zeros (no tanh saturation) are compared exactly.
RECORDED_REL_TOL = 1e-5


def test_summary_numbers_match_the_lab_before_its_rebuild_within_cross_cpu_rounding(tiny_run: Path) -> None:
    summary = {v["variant"]: v for v in json.loads((tiny_run / "summary.json").read_text())["variants"]}
    for name, recorded in RECORDED_BEFORE_REBUILD.items():
        for key, value in recorded.items():
            got = summary[name][key]
            if isinstance(value, int) or value == 0.0:
                assert got == value, (name, key, got, value)
            else:
                assert got == pytest.approx(value, rel=RECORDED_REL_TOL, abs=0.0), (name, key, got, value)


# ---------------------------------------------------------------------------------------------
# errors through the CLI: exit code 2, one line on stderr, no traceback
# ---------------------------------------------------------------------------------------------


def _one_line_error(capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    return err


def test_unknown_variant_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", "--out", str(tmp_path), "--variants", "gelu+rmsnorm"]) == 2
    _one_line_error(capsys, "gelu", "swiglu")
    assert main(["compare", "--out", str(tmp_path), "--norms", "batchnorm"]) == 2
    _one_line_error(capsys, "batchnorm", "bhyt")
    with pytest.raises(SystemExit) as exit_info:  # argparse: the preset is a choice of the flag
        main(["compare", "--out", str(tmp_path), "--preset", "huge"])
    assert exit_info.value.code == 2 and "nano" in capsys.readouterr().err
    assert not (tmp_path / "report.html").exists()


def test_missing_data_file_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.txt"
    assert main(["compare", "--out", str(tmp_path / "o"), "--data", str(missing), *TINY_FLAGS]) == 2
    _one_line_error(capsys, "nope.txt")


def test_corrupt_checkpoint_is_a_clear_error(tiny_run: Path, corpus: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    out = tmp_path / "resume"
    shutil.copytree(tiny_run, out)
    (out / "swiglu+rmsnorm" / "result.json").unlink()  # an interrupted run: resumed from its checkpoint
    ckpt = out / "swiglu+rmsnorm" / "checkpoint"
    weights = next(p for p in ckpt.iterdir() if p.suffix == ".safetensors")
    weights.write_bytes(b"\x00garbage" * 10)
    capsys.readouterr()
    assert _run(out, corpus, "--resume") == 2
    _one_line_error(capsys, "checkpoint")


def test_bad_numbers_are_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for flags, needle in ((["--steps", "0"], "steps"), (["--set", "probes.spike_window=1"], "spike_window"),
                          (["--set", "n_layers"], "SECTION.KEY=VALUE"),
                          (["--set", "model.activation=powlu"], "--variants"),
                          (["--set", "parallel.mode=ddp"], "one process"),
                          (["--set", "model.no_such_field=1"], "no_such_field"), (["--lr", "-1"], "lr"),
                          (["--set", "model.n_heads=3"], "n_heads")):
        assert main(["compare", "--out", str(tmp_path / "o"), *flags]) == 2
        _one_line_error(capsys, needle)
    assert not (tmp_path / "o").exists()  # rejected before anything was written


def test_cli_subprocess_error_has_no_traceback(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "steadylm.cli", "compare", "--out", str(tmp_path), "--variants", "powlu+nonorm"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "nonorm" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_quick_default_grid_end_to_end(tmp_path: Path) -> None:
    """The README's `--quick` command: every default variant, finite numbers, a report."""
    assert main(["compare", "--quick", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["variants"]) == len(DEFAULT_GRID)
    for v in summary["variants"]:
        assert _finite(v["final_val_loss"]) and _finite(v["down_in_amax_last"]), v["variant"]
    assert (tmp_path / "report.html").exists()


def test_tune_lr_picks_each_variants_lr_and_reports_it(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "tuned"
    assert main(["compare", "--out", str(out), "--data", str(corpus), "--variants", "swiglu+rmsnorm",
                 *TINY_FLAGS, "--tune-lr", "--lr-grid", "0.1,10"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    tried = summary["tuning"]["swiglu+rmsnorm"]
    assert [t["lr"] for t in tried] == pytest.approx([3e-4, 3e-2])
    assert all(t["summary"]["steps_logged"] == 10 for t in tried)  # a third of the steps, at least 10
    best = min(tried, key=lambda t: t["summary"]["final_val_loss"])["lr"]
    assert summary["variants"][0]["lr"] == pytest.approx(best)
    assert "Learning-rate tuning" in (out / "summary.md").read_text()
