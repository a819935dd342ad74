"""``steadylm bench model`` on a tiny run: every row measured, paired ratios, profiler shares, CSV and
markdown output. (No timing assertions: only the structure and the arithmetic are checked.)"""

from __future__ import annotations

import csv
import importlib.util
import re
import statistics

import pytest
import torch

from steadylm.bench import model as bench_model
from steadylm.bench import step as bench_step
from steadylm.bench.memory import state_bytes, train_peak_bytes
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
    assert "[p20–p80]" in printed and "[nano] swiglu+bhyt eager" in printed  # not eaten as rich markup
    # The comparison line keeps its spread (it printed none while rich ate the bracket as a tag); one
    # round is too few for a 95% interval of the median, and it says so.
    assert re.search(r"train eager: swiglu\+bhyt / swiglu\+rmsnorm: \d+\.\d{3} \[p20–p80 \d+\.\d{3}–\d+\.\d{3}; "
                     r"too few rounds for a 95% interval\]", printed), printed
    assert "| 95% interval of the median |" in markdown and "| too few rounds |" in markdown
    # the peak memory column (on by default): in the table, the markdown and the CSV, in MiB
    assert "train peak MiB" in markdown and "train peak" in printed
    peaks = {r["kernel"]: float(r["median"]) for r in read if r["metric"] == "peak_memory"}
    assert set(peaks) == {"swiglu+rmsnorm", "swiglu+bhyt"} and all(r["unit"] == "MiB" for r in read if r["metric"] == "peak_memory")
    assert all(1.0 < mib < 200.0 for mib in peaks.values()), peaks  # nano: ~1.4 M parameters, 21 MiB of state + grads


@pytest.mark.slow  # ~1-2 min on 2 busy cores (kernel compiles, the HF import)
def test_tiny_run_rows_ratios_shares_and_outputs(tmp_path):
    result = bench_model.run_model_bench(_tiny(hf=HAS_TRANSFORMERS))
    variants = {r.variant for r in result.rows}
    expected = {"swiglu+rmsnorm", "swiglu+bhyt"}
    hf_rows = {bench_model.HF_VARIANT, "hf-steadylm:swiglu+rmsnorm"}  # the steadylm HF type: generate rows only
    assert variants == expected | (hf_rows if HAS_TRANSFORMERS else set())
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
    assert set(result.peaks) == {(r.preset, r.variant, r.mode) for r in result.rows if r.measure == "train"}
    assert all(peak > _NANO_STATE_AND_GRADS for peak in result.peaks.values()), result.peaks
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
    assert "train peak MiB" not in bench_model.render_markdown(result)  # no peaks measured: no column
    result.peaks = {("nano", "swiglu+bhyt", "compiled"): 3 * 2**20, ("nano", bench_model.HF_VARIANT, "compiled"): 2 * 2**20,
                    ("nano", "swiglu+rmsnorm", "compiled"): 2**20}  # fmt: skip
    comparisons = dict(bench_model.comparisons(result))
    assert comparisons["[nano] generate-b1 compiled: swiglu+bhyt / swiglu+rmsnorm"] == [2.0, 0.5]
    assert comparisons["[nano] generate-b1: steadylm swiglu+rmsnorm compiled / HF generate"] == [2.0, 1.0]
    csv_rows = bench_model.csv_rows(result)
    assert all(tuple(r) == CSV_COLUMNS for r in csv_rows)
    assert {r["metric"] for r in csv_rows} == {"throughput", "norm_share", "activation_share", "peak_memory",
                                               "peak_memory_ratio_vs_hf"}  # fmt: skip
    peak_rows = {(r["kernel"], r["metric"]): r["median"] for r in csv_rows if r["metric"].startswith("peak")}
    assert peak_rows[("swiglu+bhyt", "peak_memory")] == "3" and peak_rows[("swiglu+bhyt", "peak_memory_ratio_vs_hf")] == "1.5"
    assert peak_rows[("swiglu+rmsnorm", "peak_memory_ratio_vs_hf")] == "0.5"
    markdown = bench_model.render_markdown(result)
    assert "| nano | swiglu+bhyt | compiled | " in markdown
    assert "train peak MiB | peak / HF |" in markdown and "| 3.0 | 1.500 |" in markdown and "| 1.0 | 0.500 |" in markdown
    assert "| [nano] generate-b1 compiled: swiglu+bhyt / swiglu+rmsnorm | 1.250 |" in markdown


def test_config_validation_and_cli_error():
    with pytest.raises(ConfigError, match="norms"):
        _tiny(norms=["batchnorm"]).validate()
    assert main(["bench", "model", "--quick", "--norms", "layernorm", "--no-csv"]) == 2  # one-line error


# --------------------------------------------------------------------------------------------
# peak training memory
# --------------------------------------------------------------------------------------------

_NANO_STATE_AND_GRADS = 16 * 1_377_408  # fp32 parameters + gradients + AdamW's two moments of nano


def _nano_peak(batch: int, seq: int = 16, dim: int = 128):
    """(peak bytes of one eager training step after one warm-up step, the model, its optimizer) of
    nano with the reference impl (no fused-kernel compile for a new width: the memory bounds below
    hold for any impl)."""
    from steadylm.models import ModelConfig, build_model

    device = torch.device("cpu")
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_preset("nano", dim=dim, ffn_dim=3 * dim, impl="reference"), device=device)
    vocab = model.config.vocab_size
    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    step, optimizer = bench_step.train_step(model, False, tokens, device, "fp32")
    step()  # warm-up: AdamW's state is created here
    return train_peak_bytes(step, model, optimizer, device), model, optimizer


def test_train_peak_is_at_least_state_gradients_and_logits_and_grows_with_batch_and_width():
    """The peak of one training step holds, at the optimizer step, the parameters, their gradients,
    AdamW's two moments (16 bytes per fp32 parameter, exactly from the parameter count) and the
    logits the step keeps alive (batch × seq × vocab fp32); it grows with the batch (activations,
    logits) and with the hidden size (parameters)."""
    peak, model, optimizer = _nano_peak(batch=2)
    n_params = sum(p.numel() for p in model.parameters())  # tied embedding counted once
    assert 16 * n_params == _NANO_STATE_AND_GRADS
    vocab, logits = model.config.vocab_size, 2 * 16 * model.config.vocab_size * 4
    assert peak >= 16 * n_params + logits, (peak, 16 * n_params + logits)
    assert peak < 2 * (16 * n_params + logits), peak  # plausible: activations of 2x16 tokens are small
    # what the model and AdamW hold between steps: parameters, buffers, two moments, a step counter each
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    n_tensors = len(list(model.parameters()))
    assert state_bytes(model) == 4 * n_params + buffers
    assert state_bytes(model, optimizer) == 12 * n_params + 4 * n_tensors + buffers
    bigger_batch, _, _ = _nano_peak(batch=8)
    assert bigger_batch - peak >= (8 - 2) * 16 * vocab * 4, (bigger_batch, peak)  # at least the extra logits
    wider, wide_model, _ = _nano_peak(batch=2, dim=256)
    wide_params = sum(p.numel() for p in wide_model.parameters())
    assert wider >= 16 * wide_params + logits and wider - peak >= 16 * (wide_params - n_params), (wider, peak)


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers not installed")
def test_run_measures_peak_per_variant_and_hf_with_ratio_and_no_memory_turns_it_off():
    cfg = _tiny(norms=["rmsnorm"], measures=["train"], rounds=1, profile=False, hf=True)
    result = bench_model.run_model_bench(cfg)
    assert set(result.peaks) == {("nano", v, "eager") for v in (bench_model.BASELINE, bench_model.HF_VARIANT)}
    for key, peak in result.peaks.items():
        assert peak >= _NANO_STATE_AND_GRADS + 2 * 16 * 4096 * 4, (key, peak)  # same shape: same lower bound
    hf = result.peaks[("nano", bench_model.HF_VARIANT, "eager")]
    ratio = result.peak_ratio_vs_hf("nano", bench_model.BASELINE, "eager")
    assert ratio == result.peaks[("nano", bench_model.BASELINE, "eager")] / hf and 0.5 < ratio < 2.0
    header, body = bench_model.table_cells(result)
    assert header[-2:] == ["train peak MiB", "peak / HF"]
    assert next(cells for cells in body if cells[1] == bench_model.HF_VARIANT)[-1] == "1.000"
    off = bench_model.run_model_bench(_tiny(norms=["rmsnorm"], measures=["train"], rounds=1, profile=False, hf=False,
                                            memory=False))  # fmt: skip
    assert off.peaks == {} and "train peak MiB" not in bench_model.table_cells(off)[0]
