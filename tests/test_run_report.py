"""``steadylm report RUN_DIR [RUN_DIR ...] --out DIR`` on two tiny training runs: a PowLU + BHyT run
and an FP8 (steadylm backend) run, both with probes; then on a run caught mid-write."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from steadylm import cli
from steadylm.train.assemble import build_run
from steadylm.train.metrics import read_metrics
from steadylm.train.spec import RunSpec

BASE: dict[str, Any] = {
    "model": {"preset": "nano", "dim": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 2, "ffn_dim": 64,
              "impl": "reference"},
    "train": {"steps": 8, "batch_size": 4, "warmup_steps": 1, "eval_every": 4, "eval_batches": 1,
              "log_every": 1, "probe_every": 2, "seed": 1, "threads": 1, "progress": False, "device": "cpu"},
    "data": {"vocab_size": 512, "seq_len": 32},
    "probes": {"stability": True},
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as patch:  # the session's tokenizer cache (see test_train)
        patch.setenv("STEADYLM_CACHE", str(tmp_path_factory.getbasetemp() / "steadylm-cache"))
        out = {}
        for name, model, train in (("powlu_bhyt", {"activation": "powlu", "norm": "bhyt"}, {}),
                                   ("fp8", {"activation": "swiglu", "norm": "rmsnorm"}, {"precision": "fp8"})):
            spec = json.loads(json.dumps(BASE))
            spec["model"].update(model)
            spec["train"].update(train)
            out[name] = root / name
            build_run(RunSpec.from_dict(spec), out[name]).run()
    return out


def test_report_of_two_runs_side_by_side(runs: dict[str, Path], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report"
    assert cli.main(["report", str(runs["powlu_bhyt"]), str(runs["fp8"]), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"{out / 'report.html'}: 2 runs"
    # every file complete (atomic writes leave no temporary files behind)
    assert sorted(p.name for p in out.iterdir()) == ["plots", "report.html", "summary.json", "summary.md"]
    plots = {p.stem for p in (out / "plots").iterdir()}
    assert plots == {"loss", "stability_over_steps", "down_proj_bands", "hidden_states", "tanh_saturation",
                     "fp8_counters", "throughput", "throughput_over_steps"}
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(plots)

    summary = json.loads((out / "summary.json").read_text())["runs"]
    assert list(summary) == ["powlu_bhyt", "fp8"]
    for name, path in runs.items():
        rows = read_metrics(path / "metrics.jsonl")
        got = summary[name]
        assert (got["last_step"], got["total_steps"], got["in_progress"]) == (8, 8, False)
        want_val = [r["val_loss"] for r in rows if "val_loss" in r][-1]
        assert got["summary"]["final_val_loss"] == want_val
        losses = [r["loss"] for r in rows][-10:]
        assert got["summary"]["final_train_loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-12)
        assert got["summary"]["variant"] == name
    assert summary["fp8"]["summary"]["fp8"]  # the FP8 counters reached the summary
    assert summary["powlu_bhyt"]["summary"]["bhyt_pearson_r_min"] is not None  # BHyT probe read (NaN -> null)
    table = (out / "summary.md").read_text()
    assert "| powlu_bhyt | powlu+bhyt | fp32 | 8 / 8 |" in table and "| fp8 | swiglu+rmsnorm | fp8 | 8 / 8 |" in table


def test_report_of_a_run_still_going(runs: dict[str, Path], tmp_path: Path) -> None:
    live = tmp_path / "live"
    live.mkdir()
    shutil.copy(runs["powlu_bhyt"] / "config.json", live / "config.json")
    lines = (runs["powlu_bhyt"] / "metrics.jsonl").read_text().splitlines(keepends=True)
    # three complete rows and the fourth caught half-written
    (live / "metrics.jsonl").write_text("".join(lines[:3]) + lines[3][: len(lines[3]) // 2])
    out = tmp_path / "report"
    assert cli.main(["report", str(live), "--out", str(out)]) == 0
    got = json.loads((out / "summary.json").read_text())["runs"]["live"]
    assert (got["last_step"], got["total_steps"], got["in_progress"]) == (3, 8, True)
    assert "| live | powlu+bhyt | fp32 | 3 / 8 |" in (out / "summary.md").read_text()
    assert "in progress" in (out / "summary.md").read_text()


def test_runs_with_the_same_directory_name_get_distinct_names(tmp_path: Path) -> None:
    from steadylm.lab.run_report import _names

    a, b, c = tmp_path / "a" / "run", tmp_path / "b" / "run", tmp_path / "b" / "other"
    assert _names([a, b, c]) == ["a/run", "b/run", "b/other"]
    assert _names([a, c]) == ["run", "other"]


def test_a_directory_that_is_not_a_run_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    assert cli.main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: RUN_DIR {tmp_path / 'empty'} has neither config.json nor metrics.jsonl: not a training run"]
    assert not (tmp_path / "out").exists()
