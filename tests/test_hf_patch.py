"""PowLU / SwiGLU-Clip / BHyT inside Hugging Face models (issue 9): ``register()``'s hidden_act
names, ``apply_steadylm`` on instances and classes, and training under ``transformers.Trainer``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from steadylm.integrations import transformers as slt  # noqa: E402
from steadylm.models.hf_format import hf_config_to_model_config, steadylm_name  # noqa: E402
from steadylm.models import build_model  # noqa: E402
from steadylm.nn import BHyT, BHyTPair  # noqa: E402

# fp32 on both sides, same weights; the ops differ only in summation order and HF's fp32 RoPE
# table (steadylm's is built in float64): 1e-5 of the largest logit, as for export (issue 9).
REL_TOL = 1e-5
VOCAB = 96


def _config(family: str = "llama", **kw):
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                  architectures=[f"{'Llama' if family == 'llama' else 'Qwen3'}ForCausalLM"])
    if family == "llama":
        return transformers.LlamaConfig(**common, **kw)
    return transformers.Qwen3Config(**common, head_dim=16, **kw)


def _model(family: str = "llama", **kw):
    torch.manual_seed(0)
    cls = transformers.LlamaForCausalLM if family == "llama" else transformers.Qwen3ForCausalLM
    model = cls(_config(family, **kw)).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # RMSNorm gains away from 1, so copying them is tested
        for _name, p in model.named_parameters():
            if p.dim() == 1:
                p.mul_(1.0 + 0.3 * torch.rand(p.shape, generator=g))
    return model


def _steadylm_twin(hf_model, switched: bool = False, **changes):
    """steadylm's model of the HF config (+ changes) with the HF model's weights."""
    config = hf_config_to_model_config(hf_model.config.to_dict()).replace(**changes)
    model = build_model(config).eval()
    state = {steadylm_name(k): v for k, v in hf_model.state_dict().items()}
    result = model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    # Tied heads are one tensor; a plain source switched to BHyT has no λ / c_ℓ yet (λ0, refreshed).
    allowed = ("lm_head.weight",) + ((".lam", "bhyt_correction") if switched else ())
    assert all(k.endswith(allowed) for k in result.missing_keys), result.missing_keys
    return model


def _tokens(seq: int = 24) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, seq), generator=torch.Generator().manual_seed(1))


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    rel = float((a - b).abs().max() / a.abs().max())
    assert rel <= REL_TOL, rel
    return rel


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize(("activation", "norm"),
                         [("powlu", "bhyt"), ("swiglu_clip", "bhyt_star"), ("powlu", "rmsnorm")])
def test_apply_to_instance_equals_steadylm(family: str, activation: str, norm: str) -> None:
    hf = _model(family)
    gains = hf.model.layers[1].input_layernorm.weight.detach().clone()
    kwargs = {"limit": 0.05} if activation == "swiglu_clip" else {}  # the clip active on random weights
    assert slt.apply_steadylm(hf, activation=activation, norm=norm, **kwargs) is hf
    layer = hf.model.layers[1]
    if norm != "rmsnorm":
        assert isinstance(layer, BHyTPair) and isinstance(layer.input_layernorm, BHyT)
        assert layer.input_layernorm.lam.item() == 2.0 and layer.post_attention_layernorm.lam.item() == 1.0
        torch.testing.assert_close(layer.input_layernorm.weight, gains, rtol=0, atol=0)  # γ kept
        assert float(layer.bhyt_correction) > 0
    twin = _steadylm_twin(hf, activation=activation, activation_kwargs=kwargs, norm=norm)
    if norm != "rmsnorm":  # c_ℓ: the HF layer and steadylm's block share BHyTPair's refresh
        assert torch.equal(layer.bhyt_correction, twin.layers[1].bhyt_correction)
    tokens = _tokens()
    with torch.no_grad():
        _close(twin(tokens), hf(tokens).logits)
    # Gradients flow through the patched layers the same way.
    hf.train(), twin.train()
    hf(tokens, labels=tokens).loss.backward()
    assert hf.model.layers[0].mlp.gate_proj.weight.grad is not None
    if norm != "rmsnorm":
        assert layer.input_layernorm.lam.grad is not None and layer.input_layernorm.lam.grad.shape == (1,)


@pytest.mark.parametrize(("hidden_act", "activation", "kwargs", "config_kw"), [
    ("powlu", "powlu", {}, {}),
    ("powlu", "powlu", {"m": 2.5}, {"powlu_m": 2.5}),
    ("swiglu_clip", "swiglu_clip", {"limit": 0.05}, {"swiglu_clip_limit": 0.05}),
    ("swiglu_clip_step", "swiglu_clip", {"limit": 0.05, "variant": "step"}, {"swiglu_clip_limit": 0.05}),
])
def test_registered_hidden_act_is_exact_in_a_plain_model(hidden_act, activation, kwargs, config_kw) -> None:
    # No patching: the stock LlamaMLP computes act_fn(gate) * up with steadylm's activation.
    hf = _model(hidden_act=hidden_act, **config_kw)
    assert type(hf.model.layers[0].mlp).__name__ == "LlamaMLP"
    assert isinstance(hf.model.layers[0].mlp.act_fn, slt.SteadyLMGate)
    twin = _steadylm_twin(hf, activation=activation, activation_kwargs=kwargs)
    tokens = _tokens()
    with torch.no_grad():
        _close(twin(tokens), hf(tokens).logits)
    # ... and m / the limit really came from the config: the default differs.
    if config_kw:
        default = _steadylm_twin(hf, activation=activation,
                                 activation_kwargs={k: v for k, v in kwargs.items() if k == "variant"})
        with torch.no_grad():
            assert (default(tokens) - hf(tokens).logits).abs().max() > 1e-4


def test_steadylm_model_type_is_registered() -> None:
    config = transformers.AutoConfig.for_model("steadylm")
    assert isinstance(config, slt.SteadyLMConfig)
    model = transformers.AutoModelForCausalLM.from_config(config)
    assert isinstance(model, slt.SteadyLMForCausalLM)


def test_class_patch_applies_to_from_pretrained(tmp_path: Path) -> None:
    from transformers.monkey_patching import unregister_patch_mapping

    plain = _model()
    plain.save_pretrained(tmp_path / "plain")
    names = slt.apply_steadylm(activation="powlu", norm="bhyt")
    try:
        assert "LlamaDecoderLayer" in names and "LlamaMLP" in names
        hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "plain").eval()
    finally:
        unregister_patch_mapping(names)
    layer = hf.model.layers[0]
    assert isinstance(layer, BHyTPair)
    # Loaded γ from the checkpoint, λ (missing from it) at λ0, c_ℓ from the loaded weights at the
    # first forward (HF's loader runs no load_state_dict post-hooks).
    torch.testing.assert_close(layer.input_layernorm.weight, plain.model.layers[0].input_layernorm.weight,
                               rtol=0, atol=0)
    assert layer.input_layernorm.lam.item() == 2.0 and layer.post_attention_layernorm.lam.item() == 1.0
    twin = _steadylm_twin(plain, switched=True, activation="powlu", norm="bhyt")
    tokens = _tokens()
    with torch.no_grad():
        logits = hf(tokens).logits
    assert torch.equal(layer.bhyt_correction, twin.layers[0].bhyt_correction)
    _close(twin(tokens), logits)
    # Unregistered: models built afterwards are stock again.
    again = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "plain")
    assert type(again.model.layers[0]).__name__ == "LlamaDecoderLayer"


def test_trainer_refreshes_c_l_and_does_not_decay_lambda_or_gamma(tmp_path: Path) -> None:
    from transformers import Trainer, TrainingArguments

    hf = _model()
    slt.apply_steadylm(hf, activation="powlu", norm="bhyt")
    hf.train()
    sequences = torch.randint(0, VOCAB, (20, 16), generator=torch.Generator().manual_seed(4))
    data = [{"input_ids": t, "labels": t} for t in sequences]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=5, per_device_train_batch_size=4,
                             learning_rate=1e-2, weight_decay=0.5, report_to=[], use_cpu=True,
                             save_strategy="no", logging_strategy="no", disable_tqdm=True)
    callback = slt.SteadyLMCallback(refresh_every=1)
    trainer = Trainer(model=hf, args=args, train_dataset=data, callbacks=[callback])
    decayed = set(trainer.get_decay_parameter_names(hf))
    lam_names = [n for n, _ in hf.named_parameters() if n.endswith(".lam")]
    gain_names = [n for n, p in hf.named_parameters() if "layernorm" in n or n.endswith("norm.weight")]
    assert lam_names and gain_names
    assert not decayed & set(lam_names + gain_names)
    assert "model.layers.0.mlp.gate_proj.weight" in decayed

    before = [layer.bhyt_correction.clone() for layer in hf.model.layers]
    lam_before = hf.model.layers[0].input_layernorm.lam.item()
    trainer.train()
    assert trainer.state.global_step == 5 and callback.refreshes == 5  # K = 1: after every step
    assert hf.model.layers[0].input_layernorm.lam.item() != lam_before  # λ trains
    after = [layer.bhyt_correction.clone() for layer in hf.model.layers]
    assert all(not torch.equal(a, b) for a, b in zip(before, after))  # W_V, W_O moved
    slt.refresh_bhyt(hf)  # c_ℓ after the last step is the value of the final weights
    assert all(torch.equal(a, layer.bhyt_correction) for a, layer in zip(after, hf.model.layers))
    assert slt.SteadyLMCallback().interval(5000) == 100  # default K = max(1, min(1000, steps // 50))


def test_missing_or_old_transformers_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from steadylm.integrations.transformers import (
        TransformersVersionError,
        _check_transformers,
    )

    # sys.modules' entry, not this module's global: importing Trainer can replace transformers' lazy module.
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "4.57.0")
    with pytest.raises(TransformersVersionError, match=r"transformers >= 5\.3, found 4\.57\.0"):
        _check_transformers()
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"pip install 'steadylm\[hf\]'"):
        _check_transformers()


def test_apply_steadylm_refuses_what_it_cannot_patch() -> None:
    from steadylm.errors import ConfigError

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))
    with pytest.raises(ConfigError, match="llama, mistral, qwen2, qwen3"):
        slt.apply_steadylm(gpt2, activation="powlu")
    with pytest.raises(ConfigError, match="norm must be one of"):
        slt.apply_steadylm(_model(), norm="dyt")
    with pytest.raises(ConfigError, match="m"):
        slt.apply_steadylm(_model(), activation="powlu", m=12.0)  # PowLU needs 0 < m < 10
    with pytest.raises(ConfigError, match="unknown argument"):
        slt.apply_steadylm(_model(), limit=7.0)  # a hyper-parameter without an activation


def test_patching_twice_applies_the_second_choice() -> None:
    from transformers.models.llama import modeling_llama

    from steadylm.integrations.transformers.patch import (
        _patched_class,
        _spec,
        _SteadyBHyTLayer,
        _unpatched,
    )

    hf = _model()
    slt.apply_steadylm(hf, activation="powlu", norm="bhyt")
    slt.apply_steadylm(hf, activation="swiglu_clip", norm="bhyt_star", limit=0.05)
    twin = _steadylm_twin(hf, activation="swiglu_clip", activation_kwargs={"limit": 0.05}, norm="bhyt_star")
    tokens = _tokens()
    with torch.no_grad():
        _close(twin(tokens), hf(tokens).logits)
    patched = _patched_class(modeling_llama.LlamaDecoderLayer, _SteadyBHyTLayer, _spec("powlu", "bhyt", True, {}))
    assert _unpatched(patched) is modeling_llama.LlamaDecoderLayer  # re-patching starts from the stock class


def test_trainer_on_a_steadylm_moe_model_updates_router_biases(tmp_path: Path) -> None:
    from transformers import Trainer, TrainingArguments

    from steadylm.models import ModelConfig

    config = ModelConfig.from_preset("nano-moe", vocab_size=VOCAB, dim=32, n_heads=4, n_kv_heads=4, ffn_dim=64,
                                     expert_ffn_dim=32, max_seq_len=16, norm="bhyt", impl="reference")
    torch.manual_seed(0)
    model = slt.SteadyLMForCausalLM(slt.SteadyLMConfig(steadylm=config.to_dict()))
    sequences = torch.randint(0, VOCAB, (8, 16), generator=torch.Generator().manual_seed(4))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4,
                             report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=[{"input_ids": t, "labels": t} for t in sequences],
                      callbacks=[slt.SteadyLMCallback(refresh_every=1)])
    decayed = set(trainer.get_decay_parameter_names(model))
    assert not any(n.endswith((".lam", "layernorm.weight")) for n in decayed)
    biases = [moe.router.expert_bias.clone() for moe in model.model.moe_layers()]
    trainer.train()
    after = [moe.router.expert_bias for moe in model.model.moe_layers()]
    # Aux-loss-free balancing: each step nudges every bias by ±rate (SPEC §3).
    assert all(not torch.equal(a, b) for a, b in zip(biases, after))
