"""``python -m steadylm.bench.decode_sites``: an eager decode step's time, part by part."""

from __future__ import annotations

import pytest

from steadylm.bench import decode_sites


def test_parts_add_up_to_the_block_and_the_block_to_less_than_the_token():
    costs = decode_sites.decode_part_costs("nano", ["swiglu+rmsnorm", "swiglu+bhyt"], new_tokens=3, rounds=1, prompt=4)
    for variant, parts in costs.items():
        assert list(parts) == [*decode_sites.PARTS, "rest of block", "block", "token"], variant
        assert all(parts[p] > 0.0 for p in (*decode_sites.PARTS, "block", "token")), parts
        assert parts["rest of block"] == pytest.approx(parts["block"] - sum(parts[p] for p in decode_sites.PARTS))
        assert parts["block"] < parts["token"], parts


def test_the_hooks_are_removed_afterwards():
    from steadylm.models import ModelConfig, build_model

    model = build_model(ModelConfig.from_preset("nano"))
    timer = decode_sites._PartTimer(model)
    assert model.layers[0].attn._forward_hooks
    timer.remove()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_cli_prints_one_column_per_variant(capsys):
    assert decode_sites.main(["--preset", "nano", "--variants", "swiglu+rmsnorm,powlu+bhyt", "--new-tokens", "2",
                              "--rounds", "1", "--prompt", "3"]) == 0
    out = capsys.readouterr().out
    assert "| part | swiglu+rmsnorm | powlu+bhyt |" in out
    assert "| attn_norm |" in out and "| token |" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--rounds", "0"], "must be >= 1"),
        (["--variants", "swiglu"], "activation+norm"),
        (["--preset", "huge"], "--preset must be one of"),
        (["--preset", "nano", "--variants", "swiglu+nonorm", "--new-tokens", "1", "--rounds", "1"], "nonorm"),
    ],
)
def test_bad_input_is_refused_with_the_field_named(argv, message, capsys):
    with pytest.raises(SystemExit):
        decode_sites.main(argv)
    assert message in capsys.readouterr().err
