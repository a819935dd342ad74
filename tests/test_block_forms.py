"""The block-form registry (issue 9, item 5): one entry makes a norm a ModelConfig option."""

from __future__ import annotations

import pytest
import torch

from steadylm.errors import ConfigError
from steadylm.models import BLOCK_FORMS, BHyTBlock, BlockForm, ModelConfig, build_model, register_block_form
from steadylm.models.config import count_parameters
from steadylm.nn import BHyT, BHyTPair, LayerNorm


@pytest.fixture
def layernorm_scaled():
    form = register_block_form(BlockForm("layernorm_lns", "layernorm", final_norm="layernorm", layer_scale=True))
    try:
        yield form
    finally:
        BLOCK_FORMS.pop(form.name)


def test_a_registered_form_is_a_config_value(layernorm_scaled) -> None:
    config = ModelConfig(vocab_size=64, dim=32, n_layers=3, n_heads=4, ffn_dim=64, max_seq_len=16, norm="layernorm_lns")
    model = build_model(config)
    assert isinstance(model.layers[0].attn_norm, LayerNorm) and isinstance(model.final_norm, LayerNorm)
    assert model.layers[2].norm_output_scale == pytest.approx(3 ** -0.5)  # LNS: 1/sqrt(layer number)
    assert model.num_params()["total"] == count_parameters(config).total  # the form's closed-form count
    assert model(torch.randint(0, 64, (2, 8))).shape == (2, 8, 64)


@pytest.mark.parametrize("norm", sorted(BLOCK_FORMS))
def test_every_form_counts_its_parameters(norm: str) -> None:
    config = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, ffn_dim=64, max_seq_len=16, norm=norm)
    assert build_model(config, device="meta").num_params()["total"] == count_parameters(config).total


def test_bhyt_forms_use_the_shared_pair() -> None:
    config = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, ffn_dim=64, max_seq_len=16, norm="bhyt")
    block = build_model(config).layers[0]
    assert isinstance(block, BHyTBlock) and isinstance(block, BHyTPair)
    assert block.bhyt_sites == (block.attn_norm, block.ffn_norm) and isinstance(block.attn_norm, BHyT)


def test_unknown_form_and_bad_entries_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="ModelConfig.norm must be one of"):
        ModelConfig(norm="nope")
    with pytest.raises(ConfigError, match="BlockForm.block"):
        register_block_form(BlockForm("x", "rmsnorm", block="other"))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="BlockForm.final_norm"):
        register_block_form(BlockForm("x", "rmsnorm", final_norm="bhyt"))
    assert "x" not in BLOCK_FORMS
