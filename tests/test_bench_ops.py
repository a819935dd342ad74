"""``steadylm bench ops``: the CLI's quick mode end to end, and the pieces it is built from."""

from __future__ import annotations

import csv

import pytest
import torch

from steadylm.bench import ops as bench_ops
from steadylm.bench.memory import peak_bytes
from steadylm.cli import main
from steadylm.errors import ConfigError


def _read_csv(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_quick_cli_run_prints_table_and_appends_csv(tmp_path, capsys):
    csv_path = tmp_path / "bench.csv"
    assert main(["bench", "ops", "--quick", "--csv", str(csv_path)]) == 0
    printed = capsys.readouterr().out
    assert "copy bandwidth" in printed and "rms_norm" in printed and "swiglu" in printed
    assert "fused not slower than compile" in printed  # the target check ran
    rows = _read_csv(csv_path)
    assert tuple(rows[0].keys()) == bench_ops.CSV_COLUMNS
    seen = {(r["kernel"], r["provider"], r["mode"], r["metric"]) for r in rows}
    for kernel in ("rms_norm", "swiglu"):
        for provider in bench_ops.PROVIDERS:
            for mode in bench_ops.MODES:
                for metric in ("time", "bandwidth", "roofline", "peak_memory"):
                    assert (kernel, provider, mode, metric) in seen
    assert ("copy", "torch", "copy_", "bandwidth") in seen
    for r in rows:
        assert r["shape"] == "128x256:fp32" and r["device"] == "cpu"
        p20, median, p80 = float(r["p20"]), float(r["median"]), float(r["p80"])
        assert median > 0 or r["metric"] == "peak_memory"
        assert p20 <= median <= p80, r
    # The fused forward+backward keeps no intermediates: peak ≤ eager's.
    peak = {
        (r["kernel"], r["provider"]): float(r["median"])
        for r in rows
        if r["metric"] == "peak_memory" and r["mode"] == "forward+backward"
    }
    assert peak[("rms_norm", "fused")] <= peak[("rms_norm", "eager")]
    assert peak[("swiglu", "fused")] <= peak[("swiglu", "eager")]
    # A second run appends instead of overwriting (same header, twice the rows).
    first = len(rows)
    assert main(["bench", "ops", "--quick", "--ops", "dyt", "--modes", "forward", "--providers", "eager",
                 "--no-memory", "--csv", str(csv_path)]) == 0  # fmt: skip
    rows = _read_csv(csv_path)
    assert len(rows) > first and rows[-1]["kernel"] == "dyt"


@pytest.mark.parametrize(
    "argv, field",
    [
        (["--ops", "gelu"], "ops"),
        (["--dtypes", "fp8"], "dtypes"),
        (["--modes", "sideways"], "modes"),
        (["--tokens", "0"], "tokens"),
        (["--repeats", "0"], "repeats"),
        (["--cuda-calls", "0"], "cuda_calls"),
        (["--hidden", "20000", "--ops", "rms_norm"], "hidden"),
    ],
)
def test_bad_arguments_are_one_line_errors(argv, field, capsys, tmp_path):
    assert main(["bench", "ops", "--csv", str(tmp_path / "x.csv"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and field in err
    assert not (tmp_path / "x.csv").exists()


def test_bench_without_subcommand_prints_usage(capsys):
    assert main(["bench"]) == 2
    assert "bench ops" in capsys.readouterr().err


def test_traffic_model_counts_each_big_tensor_once():
    n, es = 1000, 2
    act, norm = bench_ops.OPS["powlu_glu"], bench_ops.OPS["rms_norm"]
    assert act.traffic_bytes("forward", n, es) == 3 * n * es  # read gate, up; write out
    assert act.traffic_bytes("backward", n, es) == 5 * n * es  # read gate, up, dy; write 2 grads
    assert norm.traffic_bytes("forward", n, es) == 2 * n * es
    assert norm.traffic_bytes("backward", n, es) == 3 * n * es
    assert norm.traffic_bytes("forward+backward", n, es) == 5 * n * es


def test_quantiles_and_targets_on_synthetic_measurements():
    def m(kernel, provider, mode, seconds, peak=None):
        return bench_ops.Measurement(kernel, provider, mode, "fp32", [seconds * f for f in (0.9, 1.0, 1.1)], 10**9, peak)

    times = bench_ops.Measurement("k", "p", "forward", "fp32", [5.0, 1.0, 3.0, 2.0, 4.0], 1)
    assert times.median_s == 3.0
    assert times.quantile_s(0.2) == pytest.approx(1.8) and times.quantile_s(0.8) == pytest.approx(4.2)
    config = bench_ops.BenchConfig(ops=["powlu_glu", "rms_norm"], dtypes=["fp32"], tokens=1000, hidden=1000)
    fb = "forward+backward"
    results = [
        m("powlu_glu", "eager", fb, 1.0, peak=100), m("powlu_glu", "compile", fb, 0.3), m("powlu_glu", "fused", fb, 0.25, peak=50),
        m("rms_norm", "compile", "forward", 0.1), m("rms_norm", "fused", "forward", 0.2),
        m("rms_norm", "eager", fb, 1.0, peak=10), m("rms_norm", "fused", fb, 1.0, peak=20),
    ]  # fmt: skip
    # copy of 1e6 fp32 elements: 8e6 bytes in 1e-3 s = 8 GB/s; the fused rms forward moves 1e9 B in 0.2 s = 5 GB/s
    copies = {"fp32": {"copy_": [1e-3], "clone": [2e-3]}}
    checks = {d: (met, measured) for d, met, measured in bench_ops.check_targets(results, copies, config)}
    assert checks["[fp32] powlu_glu fwd+bwd fused >= 5x eager"] == (False, "4.00x")
    assert checks["[fp32] powlu_glu forward+backward: fused not slower than compile"][0] is True
    assert checks["[fp32] rms_norm forward: fused not slower than compile"] == (False, "0.50x")
    assert checks["[fp32] rms_norm fused forward >= 50% of copy bandwidth"] == (True, "62%")
    assert checks["[fp32] rms_norm fwd+bwd peak memory fused <= eager"][0] is False
    assert checks["[fp32] powlu_glu fwd+bwd peak memory fused <= eager"][0] is True


def test_append_csv_refuses_a_file_with_other_columns(tmp_path):
    path = tmp_path / "other.csv"
    path.write_text("a,b\n1,2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="columns"):
        bench_ops.append_csv(path, [])
    assert path.read_text(encoding="utf-8") == "a,b\n1,2\n"


def test_peak_memory_sees_intermediates():
    x = torch.randn(256, 256)
    keep = peak_bytes(lambda: x * 2, torch.device("cpu"))
    twice = peak_bytes(lambda: (x * 2) * 3, torch.device("cpu"))  # a temporary and the result
    size = x.numel() * 4
    # the profiler itself allocates a few bytes of bookkeeping inside the window
    assert size <= keep < size + 4096
    assert 2 * size <= twice < 2 * size + 4096


def test_time_call_is_per_call_over_back_to_back_calls(device):
    import time as _time

    from steadylm.bench.timing import time_call

    dev = torch.device(device)
    x = torch.ones(4, device=dev)
    calls = []

    def fn():
        calls.append(1)
        _time.sleep(0.002)  # host time; on CUDA, a queued kernel too
        return x * 2

    per_call = time_call(fn, dev, calls=5)
    assert len(calls) == 5
    # The mean of five 2 ms calls, not their sum. On CUDA the events see the GPU's timeline, which
    # the host's sleeps leave idle: back to back hides host work only behind longer device work.
    assert 0.0019 < per_call < 0.1
    with pytest.raises(Exception, match="calls must be >= 1"):
        time_call(fn, dev, calls=0)
