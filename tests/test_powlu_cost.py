"""``python -m steadylm.bench.powlu_cost``: the PowLU cost measurements and their polynomial exp/log."""

from __future__ import annotations

import pytest
import torch

from steadylm.bench import powlu_cost

# Every 9973rd positive fp32 bit pattern (normals and subnormals, ~213k values) and a dense grid of
# exp arguments over its whole range (underflow to overflow).
POSITIVE = torch.arange(1, 0x7F800000, 9973, dtype=torch.int64).to(torch.int32).view(torch.float32)
ARGUMENTS = torch.linspace(-110.0, 90.0, 200_001, dtype=torch.float64).float()
#: tests/test_kernels.py's error budget for one exp or log (EXP = LOG = 4, in units of 2^-24).
BUDGET = 4.0


def test_polynomial_exp_and_log_are_within_the_kernel_tests_budget():
    assert powlu_cost.relative_error_u32(powlu_cost.poly_log, torch.log, POSITIVE) < BUDGET
    assert powlu_cost.relative_error_u32(powlu_cost.poly_exp, torch.exp, ARGUMENTS) < BUDGET


def test_polynomial_exp_and_log_edges():
    exp = powlu_cost.poly_exp(torch.tensor([float("inf"), -float("inf"), 89.0, -104.0, 0.0]))
    assert exp.tolist() == [float("inf"), 0.0, float("inf"), 0.0, 1.0]
    assert torch.isnan(powlu_cost.poly_exp(torch.tensor([float("nan")]))).all()
    log = powlu_cost.poly_log(torch.tensor([1.0, 2.0**-149, 0.5, 2.0]))
    assert log[0].item() == 0.0
    torch.testing.assert_close(log[1:].double(), torch.tensor([-149.0, -1.0, 1.0], dtype=torch.float64) * 0.6931471805599453)


def test_the_accuracy_check_rejects_a_polynomial_one_term_short(monkeypatch):
    # The mutant: exp's polynomial without its highest term (relative error ~1e-7 near |r| = ln2/2).
    monkeypatch.setattr(powlu_cost, "_EXP_Q", powlu_cost._EXP_Q[:4] + (0.0,))
    assert powlu_cost.relative_error_u32(powlu_cost.poly_exp, torch.exp, ARGUMENTS) > BUDGET


def test_bad_arguments_are_refused():
    for bad in (["--rounds", "5"], ["--numel", "0"], ["--train-rounds", "3"], ["--accuracy-stride", "-1"]):
        with pytest.raises(SystemExit):
            powlu_cost.main(bad)


@pytest.mark.slow  # compiles ~20 kernels and builds three micro models
def test_cli_prints_both_tables(capsys):
    assert powlu_cost.main(["--numel", "4096", "--rounds", "6", "--calls", "1", "--train-rounds", "6",
                            "--accuracy-stride", "0"]) == 0
    out = capsys.readouterr().out
    assert "| forward: log replaced by z - 1 |" in out and "| forward+backward: forward saves f and f' |" in out
    assert "| powlu, saving f and f' |" in out
