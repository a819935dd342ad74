"""bench.step_profile: shares of one training step, and "not attributable" where an op is inlined."""

from __future__ import annotations

import math

import pytest

from steadylm.bench.step_profile import CATEGORIES, _shares, main, profile_step
from steadylm.kernels import ops


def test_a_compiled_category_without_any_op_is_not_attributable_not_zero() -> None:
    """Compiled: no steadylm op of a category in the step means Inductor traced it into its own
    kernels (or it is absent): NaN. Eager: the ranges are the attribution, so none seen is 0."""
    assert all(math.isnan(v) for v in _shares([], 1000.0, eager=False).values())
    assert _shares([], 1000.0, eager=True) == dict.fromkeys(CATEGORIES, 0.0)


def test_eager_shares_are_measured_and_printed(capsys) -> None:
    main(["--preset", "nano", "--batch", "2", "--seq", "16", "--variants", "swiglu+rmsnorm", "--modes", "eager",
          "--repeats", "1"])
    row = capsys.readouterr().out.strip().splitlines()[-1].split("|")
    norm, activation = float(row[4]), float(row[5])
    assert 0.0 < norm < 100.0 and 0.0 < activation < 100.0


@pytest.mark.slow  # compiles a nano model: ~22 s cold, 7 s warm
def test_compiled_rms_norm_inlined_on_cpu_is_not_attributable_not_zero() -> None:
    assert "rms_norm" in ops.COMPILED_INLINE.get("cpu", set())
    shares = profile_step("swiglu+rmsnorm", "nano", batch=2, seq=16, compiled=True, repeats=1)
    assert math.isnan(shares["norm"]) and math.isnan(shares["statistic"])
    assert 0.0 < shares["activation"] < 1.0 and shares["step_ms"] > 0
