"""steadylm in torchtitan 0.3.x through its config overrides and a config module (skipped without
torchtitan).

A tiny torchtitan Llama-3 model (2 layers × 64, GQA 4/2; SDPA instead of Flex attention, which has
no CPU backward — a test-only shim) gets the overrides applied to its config, is built and
initialised by torchtitan, converted with torchtitan's HF state-dict adapter (ours for BHyT, which
keeps λ and c_ℓ) to Hugging Face names, and loaded into steadylm's model: logits and gradients agree
within fp32 rounding, c_ℓ is steadylm's, and the c_ℓ refresh follows the optimizer steps of
torchtitan's own optimizer container; λ's placement in torchtitan's TP plan and c_ℓ's T/K from the
final command line. torchtitan's own ``Trainer`` runs in tests/test_torchtitan_trainer.py.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("torchtitan")

from torchtitan.config.override import OverrideConfig, apply_overrides  # noqa: E402
from torchtitan.models import llama3 as L  # noqa: E402
from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm  # noqa: E402
from torchtitan.models.common.attention import ScaledDotProductAttention  # noqa: E402
from torchtitan.models.llama3.state_dict_adapter import Llama3StateDictAdapter  # noqa: E402

from steadylm.errors import ConfigError  # noqa: E402
from steadylm.integrations.torchtitan import SteadyLMFeedForward  # noqa: E402
from steadylm.models import ModelConfig, build_model  # noqa: E402
from steadylm.models.hf_format import steadylm_name  # noqa: E402

DIM, HEADS, KV_HEADS, HIDDEN, VOCAB, LAYERS, SEQ = 64, 4, 2, 128, 256, 2, 64
# Same weights, the same fp32 ops up to summation order and RoPE tables (torchtitan builds its
# complex table in fp32, steadylm in float64): 1e-5 of the largest value, the bound the HF export
# tests use for the same effects (measured here: ~6e-8 of the largest logit).
REL_TOL = 1e-5

OVERRIDES = {
    "powlu": ("steadylm.integrations.torchtitan.overrides.powlu", {"m": 3.0}, {"m": 3.0}),
    "swiglu_clip": ("steadylm.integrations.torchtitan.overrides.swiglu_clip", {"limit": 0.05}, {"limit": 0.05}),
}


def torchtitan_config() -> L.Llama3Model.Config:
    layers = L._build_llama3_layers(
        n_layers=LAYERS, dim=DIM, n_heads=HEADS, n_kv_heads=KV_HEADS, hidden_dim=HIDDEN,
        rope=ComplexRoPE.Config(dim=DIM // HEADS, max_seq_len=SEQ, theta=10000.0), fuse_qkv=True,
        attn_backend="flex")
    for layer in layers:  # test shim: SDPA (CPU backward) in place of Flex attention
        layer.attention.inner_attention = ScaledDotProductAttention.Config()
    return L.Llama3Model.Config(
        dim=DIM, vocab_size=VOCAB, layers=layers,
        tok_embeddings=Embedding.Config(num_embeddings=VOCAB, embedding_dim=DIM, param_init=L._EMBEDDING_INIT),
        norm=RMSNorm.Config(normalized_shape=DIM, param_init=L._NORM_INIT),
        lm_head=Linear.Config(in_features=DIM, out_features=VOCAB, param_init=L._output_linear_init(DIM)))


def built(name: str) -> tuple[torch.nn.Module, L.Llama3Model.Config, list[str]]:
    target, kwargs, _ = OVERRIDES[name]
    config = torchtitan_config()
    log = apply_overrides(OverrideConfig(imports=[(target, kwargs)]), config)
    torch.manual_seed(0)
    model = config.build()
    model.init_states()
    return model, config, log


def as_steadylm(name: str, model: torch.nn.Module, config: L.Llama3Model.Config) -> torch.nn.Module:
    """steadylm's model holding the torchtitan model's weights (via torchtitan's HF adapter)."""
    _, _, activation_kwargs = OVERRIDES[name]
    hf = Llama3StateDictAdapter(config, None).to_hf(model.state_dict())
    ours = build_model(ModelConfig(
        vocab_size=VOCAB, dim=DIM, n_layers=LAYERS, n_heads=HEADS, n_kv_heads=KV_HEADS, ffn_dim=HIDDEN,
        max_seq_len=SEQ, activation=name, activation_kwargs=activation_kwargs, norm="rmsnorm", norm_eps=1e-5,
        rope_theta=10000.0, tie_embeddings=False, impl="reference"))
    ours.load_state_dict({steadylm_name(k): v for k, v in hf.items()})
    return ours


@pytest.mark.parametrize("name", sorted(OVERRIDES))
def test_override_imports_replace_every_ffn(name: str) -> None:
    model, _, log = built(name)
    assert len(log) == LAYERS and all(f"-> SteadyLMFeedForward.Config" in line for line in log)
    for i in range(LAYERS):
        ffn = model.layers[str(i)].feed_forward
        assert isinstance(ffn, SteadyLMFeedForward) and ffn.activation == name
    # the stock FFN's parameter names: torchtitan's sharding plans and HF adapter still apply
    assert {k for k in model.state_dict() if ".feed_forward." in k} == {
        f"layers.{i}.feed_forward.w{j}.weight" for i in range(LAYERS) for j in (1, 2, 3)}


@pytest.mark.parametrize("name", sorted(OVERRIDES))
def test_torchtitan_model_matches_steadylm_logits_and_gradients(name: str) -> None:
    model, config, _ = built(name)
    ours = as_steadylm(name, model, config)
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    theirs_logits, our_logits = model(tokens), ours(tokens)
    scale = float(our_logits.abs().max())
    assert float((theirs_logits - our_logits).abs().max()) <= REL_TOL * scale
    theirs_logits.float().logsumexp(-1).mean().backward()
    our_logits.float().logsumexp(-1).mean().backward()
    for i in range(LAYERS):
        for tt_name, our_name in (("w1", "w_gate"), ("w3", "w_up"), ("w2", "w_down")):
            g_tt = getattr(model.layers[str(i)].feed_forward, tt_name).weight.grad
            g_ours = getattr(ours.layers[i].ffn, our_name).weight.grad
            assert float((g_tt - g_ours).abs().max()) <= REL_TOL * float(g_ours.abs().max()), (i, tt_name)


def test_hf_state_dict_round_trip() -> None:
    model, config, _ = built("powlu")
    adapter = Llama3StateDictAdapter(config, None)
    back = adapter.from_hf(adapter.to_hf(model.state_dict()))
    fresh_config = torchtitan_config()
    apply_overrides(OverrideConfig(imports=[OVERRIDES["powlu"][:2]]), fresh_config)
    fresh = fresh_config.build()
    fresh.init_states()
    fresh.load_state_dict(back)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_a_bad_activation_argument_fails_when_the_config_is_built() -> None:
    config = torchtitan_config()
    with pytest.raises(ConfigError, match="m"):
        apply_overrides(OverrideConfig(imports=[("steadylm.integrations.torchtitan.overrides.powlu",
                                                 {"m": -1.0})]), config)


def test_the_readme_command_line_applies_the_override_to_torchtitans_own_config() -> None:
    # torchtitan's own CLI parser and config registry (the README's command, on the debug model)
    from torchtitan.config.manager import ConfigManager

    config = ConfigManager().parse_args([
        "--module", "llama3", "--config", "llama3_debugmodel",
        "--override.imports", 'steadylm.integrations.torchtitan.overrides.powlu={"m": 3.0}'])
    assert config.override.imports == [("steadylm.integrations.torchtitan.overrides.powlu", {"m": 3.0})]
    log = apply_overrides(config.override, config)
    n_layers = len(config.model_spec.model.layers)
    assert len(log) == n_layers and all(
        isinstance(layer.feed_forward, SteadyLMFeedForward.Config) and layer.feed_forward.activation_kwargs == {"m": 3.0}
        for layer in config.model_spec.model.layers)


# ------------------------------------------------------------------------------------------------
# the BHyT block
# ------------------------------------------------------------------------------------------------

BHYT = ("steadylm.integrations.torchtitan.bhyt.bhyt",
        {"context_length": SEQ, "activation": "powlu", "activation_kwargs": {"m": 3.0}, "refresh_every": 2})


def built_bhyt(vo_scale: float = 8.0) -> tuple[torch.nn.Module, L.Llama3Model.Config]:
    """PowLU + BHyT through one override; W_V/W_O scaled so c_ℓ moves the logits (as in the HF tests)."""
    from steadylm.integrations.torchtitan import SteadyLMBHyTBlock

    config = torchtitan_config()
    config.norm.eps = 1e-6  # steadylm's final RMSNorm shares norm_eps with the BHyT sites
    log = apply_overrides(OverrideConfig(imports=[BHYT]), config)
    assert len(log) == LAYERS
    torch.manual_seed(0)
    model = config.build()
    model.init_states()
    with torch.no_grad():
        for i in range(LAYERS):
            block = model.layers[str(i)]
            assert isinstance(block, SteadyLMBHyTBlock) and isinstance(block.feed_forward, SteadyLMFeedForward)
            block.attention.qkv_linear.wqkv.weight.mul_(vo_scale)
            block.attention.wo.weight.mul_(vo_scale)
            block.refresh_bhyt_correction()
    return model, config


def steadylm_bhyt(model: torch.nn.Module, config: L.Llama3Model.Config) -> torch.nn.Module:
    from steadylm.integrations.torchtitan import SteadyLMLlama3StateDictAdapter

    hf = SteadyLMLlama3StateDictAdapter(config, None).to_hf(model.state_dict())
    ours = build_model(ModelConfig(
        vocab_size=VOCAB, dim=DIM, n_layers=LAYERS, n_heads=HEADS, n_kv_heads=KV_HEADS, ffn_dim=HIDDEN,
        max_seq_len=SEQ, activation="powlu", activation_kwargs={"m": 3.0}, norm="bhyt", norm_eps=1e-6,
        rope_theta=10000.0, tie_embeddings=False, impl="reference"))
    ours.load_state_dict({steadylm_name(k): v for k, v in hf.items()})  # strict: λ and c_ℓ included
    return ours


def test_bhyt_block_matches_steadylm_and_its_c_l() -> None:
    model, config = built_bhyt()
    ours = steadylm_bhyt(model, config)
    for i in range(LAYERS):  # steadylm recomputes c_ℓ from W_V/W_O on load: the same value
        assert float(model.layers[str(i)].bhyt_correction) == pytest.approx(
            float(ours.layers[i].bhyt_correction), rel=1e-6)
        assert float(ours.layers[i].bhyt_correction) > 1e-3  # large enough to matter
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(2))
    theirs, our_logits = model(tokens), ours(tokens)
    assert float((theirs - our_logits).abs().max()) <= REL_TOL * float(our_logits.abs().max())


def test_bhyt_state_dict_round_trip_keeps_lambda_and_c_l() -> None:
    from steadylm.integrations.torchtitan import SteadyLMLlama3StateDictAdapter

    model, config = built_bhyt()
    with torch.no_grad():
        model.layers["1"].attention_norm.lam.fill_(1.7)  # not the initial value
    adapter = SteadyLMLlama3StateDictAdapter(config, None)
    hf = adapter.to_hf(model.state_dict())
    assert {"model.layers.1.input_layernorm.lam", "model.layers.1.bhyt_correction"} <= set(hf)
    fresh, _ = built_bhyt(vo_scale=1.0)
    fresh.load_state_dict(adapter.from_hf(hf))
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_c_l_refresh_follows_the_optimizer_steps() -> None:
    from torchtitan.components.optimizer import OptimizersContainer
    from torchtitan.components.optimizer.optimizer import ParamGroupConfig

    from steadylm.integrations.torchtitan import register_bhyt_refresh

    model, _ = built_bhyt(vo_scale=1.0)
    optimizers = OptimizersContainer.Config(implementation="for-loop", param_groups=[ParamGroupConfig(
        pattern=".*", optimizer_name="AdamW", optimizer_kwargs={"lr": 1e-2})]).build(model_parts=[model])
    register_bhyt_refresh(optimizers, [model])
    block = model.layers["0"]
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    seen = []
    for step in range(1, 5):
        model(tokens).float().logsumexp(-1).mean().backward()
        optimizers.step()
        optimizers.zero_grad()
        stored = float(block.bhyt_correction)
        block.refresh_bhyt_correction()  # what c_ℓ of the current weights is
        current = float(block.bhyt_correction)
        block.bhyt_correction.fill_(stored)
        seen.append((step, stored == current))
    # refresh_every=2: c_ℓ is the current weights' after steps 2 and 4, stale after 1 and 3
    assert seen == [(1, False), (2, True), (3, False), (4, True)]


def test_the_config_module_sets_blocks_refresh_and_adapter() -> None:
    # `--module steadylm.integrations.torchtitan --config llama3_debugmodel_powlu_bhyt` (README)
    from torchtitan.config.manager import ConfigManager

    from steadylm.integrations.torchtitan import (
        SteadyLMBHyTBlock,
        SteadyLMLlama3StateDictAdapter,
        register_bhyt_refresh,
    )

    config = ConfigManager().parse_args(["--module", "steadylm.integrations.torchtitan",
                                         "--config", "llama3_debugmodel_powlu_bhyt"])
    spec = config.model_spec
    assert spec.post_optimizer_build_fn is register_bhyt_refresh
    assert spec.state_dict_adapter is SteadyLMLlama3StateDictAdapter
    assert all(isinstance(layer, SteadyLMBHyTBlock.Config) and layer.context_length == config.training.seq_len
               and isinstance(layer.feed_forward, SteadyLMFeedForward.Config) for layer in spec.model.layers)
    with torch.device("meta"):  # torchtitan builds on meta, then materialises (no memory here)
        model = spec.model.build()
    assert sum(isinstance(m, SteadyLMBHyTBlock) for m in model.modules()) == len(spec.model.layers)


# ------------------------------------------------------------------------------------------------
# torchtitan's sharding plans and the trainer's final config
# ------------------------------------------------------------------------------------------------

def parsed(config: str, *flags: str):
    from torchtitan.config.manager import ConfigManager

    return ConfigManager().parse_args(["--module", "steadylm.integrations.torchtitan", "--config", config, *flags])


@pytest.mark.parametrize("sequence_parallel", [True, False])
def test_lambda_is_declared_replicated_like_the_gain_in_torchtitans_tp_plan(sequence_parallel: bool) -> None:
    # what the Trainer does before building: update_from_config sets torchtitan's Llama-3 sharding
    # plan (a norm declares only `weight`); every BHyT site adds λ with γ's placement, so
    # Module.parallelize (which refuses an undeclared parameter) distributes it
    import spmd_types as spmd
    from torchtitan.distributed.parallel_dims import MeshAxisName

    from steadylm.integrations.torchtitan import SteadyLMBHyT

    config = parsed("llama3_debugmodel_powlu_bhyt", "--parallelism.tensor_parallel_degree", "2")
    config.parallelism.enable_sequence_parallel = sequence_parallel
    config.model_spec.model.update_from_config(config=config)
    with torch.device("meta"):
        model = config.model_spec.model.build()
    sites = [m for m in model.modules() if isinstance(m, SteadyLMBHyT)]
    assert len(sites) == 2 * len(config.model_spec.model.layers)
    for site in sites:
        states = site._sharding_config.state_shardings
        assert set(states) == {"weight", "lam"} and states["lam"] == states["weight"]
        # replicated on every axis; on TP, R (its gradient reduced) under SP, else I
        assert states["lam"].per_axis_spmd_types()[MeshAxisName.TP] == (spmd.R if sequence_parallel else spmd.I)
        assert states["lam"].per_axis_spmd_types()[MeshAxisName.DP] == spmd.R


def test_lambda_declaration_keeps_an_explicit_one() -> None:
    from torchtitan.protocols.sharding import ShardingConfig, SpmdLayout

    from steadylm.integrations.torchtitan.bhyt import lam_sharding

    mine, weight = SpmdLayout({}), SpmdLayout({})
    declared = ShardingConfig(state_shardings={"weight": weight, "lam": mine})
    assert lam_sharding(declared).state_shardings["lam"] is mine
    assert lam_sharding(None) is None


def test_c_l_context_length_and_interval_follow_the_command_line() -> None:
    # c_ℓ's T is the run's training.seq_len (SPEC: "the training context length"), and the config
    # function runs before the command line is applied: the Trainer's update_from_config sets it
    config = parsed("llama3_debugmodel_powlu_bhyt", "--training.seq_len", "64", "--training.steps", "1000")
    layers = config.model_spec.model.layers
    assert all(layer.context_length == 2048 for layer in layers)  # the config function's value
    config.model_spec.model.update_from_config(config=config)
    assert all(layer.context_length == 64 and layer.refresh_every == 5 for layer in layers)  # K set: kept
    config = parsed("llama3_8b_powlu_bhyt", "--training.seq_len", "4096", "--training.steps", "1000")
    config.model_spec.model.update_from_config(config=config)
    # K unset: SPEC's default max(1, min(1000, steps // 50))
    assert all(layer.context_length == 4096 and layer.refresh_every == 20
               for layer in config.model_spec.model.layers)


def test_c_l_refuses_a_projection_shard_that_is_not_a_dtensor() -> None:
    # torchtitan's spmd_types backend keeps TP shards as plain local tensors: c_ℓ of the slice
    # would be wrong without a word, so the refresh says what to do instead
    model, _ = built_bhyt(vo_scale=1.0)
    block = model.layers["0"]
    wqkv = block.attention.qkv_linear.wqkv
    wqkv.weight = torch.nn.Parameter(wqkv.weight.detach()[: wqkv.weight.shape[0] // 2].clone())
    with pytest.raises(RuntimeError, match="spmd_backend partial_dtensor"):
        block.refresh_bhyt_correction()
