"""``bench model --claim bhyt``: the claim view runs both rows on a tiny preset (2 rounds, eager)
and prints one ratio line per measurement, the paper's figures, the load and the command."""

from __future__ import annotations

import re

import pytest

from steadylm.bench.claim import CLAIMS, claim_config, claim_lines, run_claim
from steadylm.bench.model import ModelBenchConfig
from steadylm.errors import ConfigError


@pytest.fixture
def eager_kernels():
    """The fused math uncompiled: the view's structure is under test, not kernel speed (seconds)."""
    from steadylm import kernels

    previous = kernels.compile_enabled()
    kernels.set_compile(False)
    yield
    kernels.set_compile(previous)


def test_claim_view_on_a_tiny_preset(eager_kernels):
    base = ModelBenchConfig(presets=("nano",), modes=("eager",), batch=2, seq=8, gen_batches=(1, 2), prompt=4,
                            new_tokens=3, rounds=2, warmup=0, device="cpu")  # fmt: skip
    result, text = run_claim(base, "bhyt", "steadylm bench model --claim bhyt --presets nano")
    lines = claim_lines(result, "bhyt")
    assert [(l.measure, l.mode) for l in lines] == [("train", "eager"), ("generate-b1", "eager"), ("generate-b2", "eager")]
    for line in lines:
        assert len(line.ratios) == 2 and all(r > 0 for r in line.ratios)
        p20, med, p80 = line.summary()
        assert p20 <= med <= p80
    assert lines[0].paper == 1.016 and lines[1].paper == 1.0177
    rows = [r for r in text.splitlines() if r.startswith("| nano |")]
    assert len(rows) == 3
    for row, line in zip(rows, lines):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[:3] == ["nano", line.measure, "eager"]
        assert float(cells[3]) == pytest.approx(line.summary()[1], abs=5e-4)
        assert re.fullmatch(r"\d+\.\d{3}–\d+\.\d{3}", cells[4])
        assert cells[5] == "too few rounds" and line.interval() is None  # 2 rounds: no 95% interval
        assert cells[7] == "inconclusive" and cells[8] == "not resolved"
    assert "+1.6% training" in text and "+1.77% generation" in text
    assert "load average" in text and "command: `steadylm bench model --claim bhyt --presets nano`" in text
    assert {row.variant for row in result.rows} == {"swiglu+bhyt", "swiglu+rmsnorm"}


def test_claim_config_keeps_shapes_and_defaults_to_micro():
    config = claim_config(ModelBenchConfig(batch=3, rounds=4), "bhyt")
    assert config.presets == ("micro",) and config.batch == 3 and config.rounds == 4
    assert set(config.variants()) == {CLAIMS["bhyt"].variant, CLAIMS["bhyt"].baseline}
    assert not config.hf and not config.profile
    with pytest.raises(ConfigError, match="claim must be one of"):
        claim_config(ModelBenchConfig(), "nope")
