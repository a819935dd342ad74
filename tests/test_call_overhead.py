"""``python -m steadylm.bench.call_overhead``: every layer of a fused-op call is timed and printed."""

from __future__ import annotations

import pytest
import torch

from steadylm.bench import call_overhead


def test_every_case_is_timed_at_each_row_count():
    for rows in (1, 3):
        costs = call_overhead.call_costs(rows, 1, dim=32, ffn_dim=48, calls=2, repeats=1)
        assert set(costs) >= {"kernel rms_norm_fwd", "direct rms_norm_fwd", "ops.bhyt (variance)", "RMSNorm pair", "BHyT pair",
                              "eager RMSNorm (HF)"}
        assert all(0.0 < us < 1e7 for us in costs.values()), costs


def test_cli_prints_one_column_per_rows_and_threads(capsys):
    assert call_overhead.main(["--rows", "1", "3", "--threads", "1", "--dim", "32", "--ffn-dim", "48",
                               "--calls", "2", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "| call | rows 1, 1 thr | rows 3, 1 thr |" in out
    assert "| BHyT pair |" in out


def test_bad_counts_are_refused():
    for bad in (["--rows", "0"], ["--dim", "30"], ["--repeats", "0"], ["--device", "tpu"]):
        with pytest.raises(SystemExit):
            call_overhead.main(bad)


def test_cuda_without_a_device_is_refused_with_the_reason(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SystemExit):
        call_overhead.main(["--device", "cuda"])
    assert "torch.cuda.is_available() is False" in capsys.readouterr().err


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_every_case_is_timed_on_cuda():
    costs = call_overhead.call_costs(1, 1, dim=32, ffn_dim=48, calls=2, repeats=1, device="cuda")
    assert "BHyT pair" in costs and all(0.0 < us < 1e7 for us in costs.values()), costs
