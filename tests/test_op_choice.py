"""``python -m steadylm.bench.op_choice``: opaque vs inlined fused op inside a compiled training step."""

from __future__ import annotations

import pytest
import torch

from steadylm.bench import op_choice
from steadylm.kernels import ops


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_op_choice_times_both_policies_and_restores_the_default(dtype):
    before = dict(ops.COMPILED_INLINE)
    seen = []
    results = op_choice.measure_op_choice(
        ["swiglu"], preset="nano", batch=1, seq=8, rounds=2, warmup=1, device="cpu", dtype=dtype, on_result=seen.append
    )
    assert [r.op for r in results] == ["swiglu"] and seen == results
    assert len(results[0].ratios) == 2 and all(r > 0 and r == r for r in results[0].ratios)
    assert ops.COMPILED_INLINE == before  # the policy is only changed while each step runs


def test_op_choice_rejects_an_unknown_dtype(capsys):
    with pytest.raises(SystemExit):
        op_choice.main(["--dtype", "fp8", "--device", "cpu"])
    assert "--dtype" in capsys.readouterr().err
