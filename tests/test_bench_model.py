"""``steadylm bench model`` on a tiny run: every row measured, paired ratios, profiler shares, CSV and
markdown output. (No timing assertions: only the structure and the arithmetic are checked.)"""

from __future__ import annotations

import csv
import importlib.util
import statistics

import pytest

from steadylm.bench import model as bench_model
from steadylm.bench.ops import CSV_COLUMNS, append_csv
from steadylm.cli import main
from steadylm.errors import ConfigError

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


def _tiny(**overrides) -> bench_model.ModelBenchConfig:
    base = dict(presets=["nano"], activations=["swiglu"], norms=["rmsnorm", "bhyt"], modes=["eager"],
                batch=2, seq=16, gen_batches=[1], prompt=4, new_tokens=3, rounds=2, warmup=0, device="cpu")  # fmt: skip
    return bench_model.ModelBenchConfig(**{**base, **overrides})


def test_bench_model_cli_end_to_end_tiny(tmp_path, capsys):
    """The default-suite version of the slow test below: `steadylm bench model` through the CLI,
    one preset, two variants (the baseline and BHyT), one timed round of 2 tokens per batch row:
    every row measured, the CSV and markdown written, the comparison printed."""
    csv_path, md_path = tmp_path / "m.csv", tmp_path / "m.md"
    argv = ["bench", "model", "--presets", "nano", "--activations", "swiglu", "--norms", "rmsnorm,bhyt",
            "--modes", "eager", "--batch", "2", "--seq", "8", "--gen-batches", "1", "--prompt", "2",
            "--new-tokens", "2", "--rounds", "1", "--warmup", "0", "--no-hf", "--no-profile", "--device", "cpu",
            "--csv", str(csv_path), "--markdown", str(md_path)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    with open(csv_path, newline="") as f:
        read = list(csv.DictReader(f))
    assert tuple(read[0]) == CSV_COLUMNS
    measured = {(r["kernel"], r["mode"]) for r in read if r["metric"] == "throughput"}
    assert {("swiglu+rmsnorm", "train"), ("swiglu+bhyt", "train")} <= measured, measured
    assert all(float(r["median"]) > 0 for r in read if r["metric"] == "throughput")
    markdown = md_path.read_text()
    assert "| nano | swiglu+bhyt | eager |" in markdown and "swiglu+bhyt / swiglu+rmsnorm" in markdown
    assert "swiglu+bhyt" in printed


@pytest.mark.slow  # ~1-2 min on 2 busy cores (kernel compiles, the HF import)
def test_tiny_run_rows_ratios_shares_and_outputs(tmp_path):
    result = bench_model.run_model_bench(_tiny(hf=HAS_TRANSFORMERS))
    variants = {r.variant for r in result.rows}
    expected = {"swiglu+rmsnorm", "swiglu+bhyt"}
    assert variants == expected | ({bench_model.HF_VARIANT} if HAS_TRANSFORMERS else set())
    for row in result.rows:
        assert len(row.times_s) == 2 and all(t > 0 for t in row.times_s)
        if row.variant == bench_model.BASELINE:
            assert row.ratios == [1.0, 1.0]  # the baseline against itself, round by round
        base = next(r for r in result.rows if (r.variant, r.mode, r.measure) == (bench_model.BASELINE, row.mode, row.measure))
        assert row.ratios == [b / t for b, t in zip(base.times_s, row.times_s)]
    assert {r.measure for r in result.rows} == {"train", "generate-b1"}
    for variant in expected:
        shares = result.shares[("nano", variant)]
        assert 0.0 < shares["norm"] < 1.0 and 0.0 < shares["activation"] < 1.0, shares
    rows = bench_model.csv_rows(result)
    append_csv(tmp_path / "m.csv", rows)
    with open(tmp_path / "m.csv", newline="") as f:
        read = list(csv.DictReader(f))
    assert tuple(read[0]) == CSV_COLUMNS and len(read) == len(rows)
    throughput = [r for r in read if r["metric"] == "throughput" and r["kernel"] == "swiglu+bhyt" and r["mode"] == "train"]
    row = next(r for r in result.rows if r.key == ("nano", "swiglu+bhyt", "eager", "train"))
    assert float(throughput[0]["median"]) == pytest.approx(statistics.median(row.tokens_per_s()), rel=1e-5)
    markdown = bench_model.render_markdown(result)
    assert "| nano | swiglu+bhyt | eager |" in markdown and "swiglu+bhyt / swiglu+rmsnorm" in markdown


@pytest.mark.slow
def test_moe_loop_row():
    result = bench_model.run_model_bench(
        _tiny(presets=["nano-moe"], activations=["swiglu"], norms=["rmsnorm"], hf=False, profile=False, moe_loop=True)
    )
    assert {r.variant for r in result.rows} == {"swiglu+rmsnorm", "swiglu+rmsnorm:loop"}


def test_paired_ratios_and_outputs_of_a_given_result(tmp_path):
    """The arithmetic on fixed timings: per-round ratios, comparisons, CSV and markdown."""
    cfg = _tiny(modes=["eager", "compiled"])
    rows = [
        bench_model.Row("nano", "swiglu+rmsnorm", "compiled", "generate-b1", 3, times_s=[1.0, 2.0]),
        bench_model.Row("nano", "swiglu+bhyt", "compiled", "generate-b1", 3, times_s=[0.5, 4.0]),
        bench_model.Row("nano", bench_model.HF_VARIANT, "eager", "generate-b1", 3, times_s=[2.0, 2.0]),
    ]
    result = bench_model.ModelBenchResult(rows, {("nano", "swiglu+bhyt"): {"norm": 0.25, "activation": 0.1}}, "cpu", cfg)
    comparisons = dict(bench_model.comparisons(result))
    assert comparisons["[nano] generate-b1 compiled: swiglu+bhyt / swiglu+rmsnorm"] == [2.0, 0.5]
    assert comparisons["[nano] generate-b1: steadylm swiglu+rmsnorm compiled / HF generate"] == [2.0, 1.0]
    csv_rows = bench_model.csv_rows(result)
    assert all(tuple(r) == CSV_COLUMNS for r in csv_rows)
    assert {r["metric"] for r in csv_rows} == {"throughput", "norm_share", "activation_share"}
    markdown = bench_model.render_markdown(result)
    assert "| nano | swiglu+bhyt | compiled | " in markdown
    assert "| [nano] generate-b1 compiled: swiglu+bhyt / swiglu+rmsnorm | 1.250 |" in markdown


def test_config_validation_and_cli_error():
    with pytest.raises(ConfigError, match="norms"):
        _tiny(norms=["batchnorm"]).validate()
    assert main(["bench", "model", "--quick", "--norms", "layernorm", "--no-csv"]) == 2  # one-line error
