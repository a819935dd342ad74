"""ModelConfig: validation (every invalid field is named), presets, serialisation, parameter counts."""

from __future__ import annotations

import json

import pytest
import torch

from steadylm.cli import main as cli_main
from steadylm.errors import ConfigError
from steadylm.models import PRESETS, ModelConfig, build_model, count_parameters
from steadylm.models.moe import MoE
from steadylm.nn import BHyT, DyT, GatedFFN, RMSNorm

TINY = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=16)
TINY_MOE = dict(TINY, n_experts=4, moe_top_k=2, expert_ffn_dim=16)


# ------------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------------

INVALID = [
    # (overrides on TINY, text the message must contain: the field name)
    (dict(dim=30, n_heads=4), "dim"),
    (dict(n_heads=4, n_kv_heads=3), "n_kv_heads"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(n_layers=0), "n_layers"),
    (dict(ffn_dim=-4), "ffn_dim"),
    (dict(max_seq_len=0), "max_seq_len"),
    (dict(dim=32.0), "dim"),
    (dict(n_layers=True), "n_layers"),
    (dict(activation="gelu"), "activation"),
    (dict(activation="powlu", activation_kwargs={"m": 10.0}), "m"),
    (dict(activation="powlu", activation_kwargs={"m": 0.0}), "m"),
    (dict(activation="powlu", activation_kwargs={"m": -1.0}), "activation_kwargs"),
    (dict(activation="powlu", activation_kwargs={"limit": 7.0}), "activation_kwargs"),
    (dict(activation="swiglu_clip", activation_kwargs={"limit": -1.0}), "limit"),
    (dict(activation="swiglu_clip", activation_kwargs={"variant": "nope"}), "variant"),
    (dict(activation="swiglu_clip", layer_activation_kwargs=[{"limit": 5.0}]), "layer_activation_kwargs"),
    (dict(activation="swiglu_clip", layer_activation_kwargs=[{}, {"limit": 0.0}]), "layer_activation_kwargs[1]"),
    (dict(norm="batchnorm"), "norm"),
    (dict(final_norm="bhyt"), "final_norm"),
    (dict(norm_eps=-1e-6), "norm_eps"),
    (dict(bhyt_kappa=0.0), "bhyt_kappa"),
    (dict(bhyt_lambda_attn=float("nan")), "bhyt_lambda_attn"),
    (dict(bhyt_refresh_every=0), "bhyt_refresh_every"),
    (dict(dyt_alpha_attn=-0.8), "dyt_alpha_attn"),
    (dict(init_std=0.0), "init_std"),
    (dict(rope_fraction=1.5), "rope_fraction"),
    (dict(rope_fraction=0.375), "rope_fraction"),  # head_dim 8 * 0.375 = 3 rotated dims: odd
    (dict(impl="cuda"), "impl"),
    (dict(tie_embeddings="yes"), "tie_embeddings"),
    (dict(n_experts=-1), "n_experts"),
    (dict(n_experts=4, moe_top_k=5), "moe_top_k"),
    (dict(n_experts=4, moe_top_k=0), "moe_top_k"),
    (dict(n_experts=4, n_dense_layers=2), "n_dense_layers"),
    (dict(n_experts=4, n_shared_experts=-1), "n_shared_experts"),
    (dict(n_experts=4, expert_ffn_dim=0), "expert_ffn_dim"),
    (dict(n_experts=4, router_bias_update_rate=-1e-3), "router_bias_update_rate"),
    (dict(n_experts=4, moe_routed_scale=0.0), "moe_routed_scale"),
]


@pytest.mark.parametrize("overrides, field", INVALID, ids=[f for _, f in INVALID])
def test_invalid_config_raises_config_error_naming_the_field(overrides, field):
    with pytest.raises(ConfigError) as info:
        ModelConfig(**{**TINY, **overrides})
    assert field in str(info.value)
    assert isinstance(info.value, ValueError)  # ConfigError is a ValueError for plain-Python callers


def test_unknown_preset_and_fields_are_rejected_by_name():
    with pytest.raises(ConfigError, match=r"model preset must be one of \['nano', 'micro'.*got 'huge'"):
        ModelConfig.from_preset("huge")
    with pytest.raises(ConfigError, match="widht"):
        ModelConfig.from_preset("nano", widht=64)
    with pytest.raises(ConfigError, match="colour"):
        ModelConfig.from_dict({**TINY, "colour": "red"})
    with pytest.raises(ConfigError, match="JSON"):
        ModelConfig.from_json("{not json")


def test_valid_edge_values_are_accepted():
    """Each edge value is accepted, kept, and builds a model whose forward is finite."""
    edges = [({**TINY, "rope_fraction": 0.0}, "rope_fraction", 0.0),  # NoPE
             ({**TINY, "n_kv_heads": 1}, "n_kv_heads", 1),  # multi-query
             ({**TINY_MOE, "moe_top_k": 4, "n_shared_experts": 0, "n_dense_layers": 0}, "moe_top_k", 4),
             ({**TINY, "activation": "powlu", "activation_kwargs": {"m": 9.99}}, "activation_kwargs", {"m": 9.99})]
    for fields, name, value in edges:
        cfg = ModelConfig(**fields)
        assert getattr(cfg, name) == value
        logits = build_model(cfg)(torch.randint(0, cfg.vocab_size, (1, 8)))
        logits = logits if isinstance(logits, torch.Tensor) else logits.logits
        assert torch.isfinite(logits).all(), name


# ------------------------------------------------------------------------------------------------
# serialisation, presets, per-layer kwargs
# ------------------------------------------------------------------------------------------------


def test_json_round_trip_preserves_every_field():
    cfg = ModelConfig.from_preset(
        "nano-moe", activation="swiglu_clip", activation_kwargs={"variant": "step"},
        layer_activation_kwargs=[{"limit": 5.0}, {}, {"limit": 9.0}, {}], norm="bhyt", vocab_size=300,
    )
    again = ModelConfig.from_json(cfg.to_json())
    assert again == cfg
    assert json.loads(cfg.to_json())["n_experts"] == 8
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_presets_cover_dense_and_moe_from_1m_to_100m():
    assert {"nano", "nano-moe"} <= set(PRESETS)
    dense = [n for n in PRESETS if not n.endswith("-moe")]
    moe = [n for n in PRESETS if n.endswith("-moe")]
    assert dense and moe
    totals = [count_parameters(ModelConfig.from_preset(n)).total for n in PRESETS]
    assert 0.9e6 <= min(totals) and max(totals) <= 1.1e8
    for name in dense:
        assert not ModelConfig.from_preset(name).is_moe
    for name in moe:
        cfg = ModelConfig.from_preset(name)
        # Ling-style: first layer dense, one shared expert, QK-norm, RoPE on half of each head.
        assert cfg.is_moe and cfg.n_dense_layers == 1 and cfg.n_shared_experts == 1
        assert cfg.qk_norm and cfg.rope_fraction == 0.5
        assert cfg.moe_top_k < cfg.n_experts


def test_nano_is_the_nanogpt_cpu_demo_scale_and_takes_the_tokenizer_vocab():
    cfg = ModelConfig.from_preset("nano", vocab_size=1234)
    assert (cfg.n_layers, cfg.dim) == (4, 128)
    assert 128 <= cfg.max_seq_len <= 256
    assert cfg.vocab_size == 1234
    for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len", "activation", "norm"):
        assert hasattr(cfg, name)


def test_per_layer_activation_kwargs_reach_each_layer():
    cfg = ModelConfig(
        **{**TINY_MOE, "n_layers": 3}, activation="swiglu_clip",
        activation_kwargs={"variant": "step", "limit": 7.0},
        layer_activation_kwargs=[{"limit": 4.0}, {}, {"limit": 10.0}],
    )
    model = build_model(cfg)
    assert model.layers[0].ffn.act.kwargs["limit"] == 4.0  # dense first layer
    assert model.layers[1].ffn.experts.act.kwargs["limit"] == 7.0
    assert model.layers[1].ffn.shared_expert.act.kwargs["limit"] == 7.0
    assert model.layers[2].ffn.experts.act.kwargs == {"limit": 10.0, "variant": "step", "alpha": 1.702}


def test_norm_recipes_are_built_as_specified():
    bhyt = build_model(ModelConfig(**TINY, norm="bhyt"))
    block = bhyt.layers[0]
    assert isinstance(block.attn_norm, BHyT) and isinstance(block.ffn_norm, BHyT)
    assert block.attn_norm.lam.item() == 2.0 and block.ffn_norm.lam.item() == 1.0
    assert block.attn_norm.kappa == 10.0
    assert isinstance(bhyt.final_norm, RMSNorm)  # published runs keep an RMSNorm at the end
    assert isinstance(build_model(ModelConfig(**TINY, norm="bhyt", final_norm="bhyt_star")).final_norm, BHyT)

    dyt = build_model(ModelConfig(**TINY, norm="dyt"))
    assert dyt.layers[1].attn_norm.alpha.item() == pytest.approx(0.8)
    assert dyt.layers[1].ffn_norm.alpha.item() == pytest.approx(0.2)
    assert isinstance(dyt.final_norm, DyT) and dyt.final_norm.alpha.item() == pytest.approx(0.2)
    assert dyt.embed_scale.item() == pytest.approx(32**0.5)

    lns = build_model(ModelConfig(**TINY, norm="lns"))
    assert [b.norm_output_scale for b in lns.layers] == pytest.approx([1.0, 2**-0.5])
    peri = build_model(ModelConfig(**TINY, norm="peri_ln"))
    assert isinstance(peri.layers[0].attn_post_norm, RMSNorm) and isinstance(peri.layers[0].ffn_post_norm, RMSNorm)

    moe = build_model(ModelConfig(**TINY_MOE))
    assert isinstance(moe.layers[0].ffn, GatedFFN) and isinstance(moe.layers[1].ffn, MoE)
    assert isinstance(moe.layers[1].ffn.shared_expert, GatedFFN)


# ------------------------------------------------------------------------------------------------
# parameter counts and optimizer groups
# ------------------------------------------------------------------------------------------------


def test_nano_count_matches_a_hand_count():
    cfg = ModelConfig.from_preset("nano")
    v, d, layers, ffn = cfg.vocab_size, cfg.dim, cfg.n_layers, cfg.ffn_dim
    # tied embedding + per layer (q,k,v,o + gate,up,down + two RMSNorm gains) + final RMSNorm gain
    by_hand = v * d + layers * (4 * d * d + 3 * d * ffn + 2 * d) + d
    assert count_parameters(cfg).total == by_hand == 1_377_408


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_formula_count_matches_the_built_modules(name):
    for norm in ("rmsnorm", "bhyt"):
        cfg = ModelConfig.from_preset(name, norm=norm)
        built = build_model(cfg, device="meta").num_params()  # meta: no memory, no init cost
        count = count_parameters(cfg)
        assert (built["total"], built["active"], built["embedding"]) == tuple(count)


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm", "dyt", "bhyt", "bhyt_star", "lns", "peri_ln"])
@pytest.mark.parametrize("extra", [dict(), dict(TINY_MOE, qk_norm=True, tie_embeddings=False, n_shared_experts=2)])
def test_formula_count_matches_modules_for_every_norm(norm, extra):
    cfg = ModelConfig(**{**TINY, **extra, "norm": norm})
    model = build_model(cfg)
    manual_total = sum(p.numel() for p in model.parameters())
    counts = model.num_params()
    assert counts["total"] == manual_total == count_parameters(cfg).total
    if cfg.is_moe:
        per_expert = 3 * cfg.dim * cfg.expert_hidden
        assert counts["total"] - counts["active"] == (cfg.n_experts - cfg.moe_top_k) * per_expert


def test_params_command_prints_every_preset_and_verifies(capsys):
    assert cli_main(["params", "--verify"]) == 0
    out = capsys.readouterr().out
    for name in PRESETS:
        assert name in out
    assert "NO" not in out.split()
    assert cli_main(["params", "nano", "--set", "vocab_size=2048", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["total"] == count_parameters(ModelConfig.from_preset("nano", vocab_size=2048)).total
    assert cli_main(["params", "--set", "n_heads=5"]) == 2  # ConfigError -> one-line error, exit 2
    assert "dim" in capsys.readouterr().err


@pytest.mark.parametrize("norm", ["layernorm", "dyt", "bhyt"])
def test_param_groups_exempt_gains_scalars_and_biases_from_decay(norm):
    model = build_model(ModelConfig(**{**TINY_MOE, "norm": norm, "qk_norm": True}))
    groups = model.param_groups(0.1)
    by_name = {g["name"]: g for g in groups}
    assert by_name["decay"]["weight_decay"] == 0.1 and by_name["no_decay"]["weight_decay"] == 0.0
    decay_ids = {id(p) for p in by_name["decay"]["params"]}
    no_decay_ids = {id(p) for p in by_name["no_decay"]["params"]}
    assert not decay_ids & no_decay_ids
    assert decay_ids | no_decay_ids == {id(p) for p in model.parameters()}  # everything, tied once
    for name, p in model.named_parameters():
        exempt = name.endswith((".lam", ".alpha", ".bias", "embed_scale")) or "norm" in name
        assert (id(p) in no_decay_ids) == exempt, name
    assert id(model.layers[1].ffn.router.weight) in decay_ids
    torch.optim.AdamW(groups, lr=1e-3)  # the groups are valid optimizer input
