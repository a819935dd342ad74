"""The ``steadylm`` Hugging Face model type generates with transformers' KV cache and padded batches
(issue 17, item 4), against steadylm's own ``Transformer.generate`` on the same weights.

* Greedy ``generate`` with the cache (a ``DynamicCache``), without it, and steadylm's eager
  ``generate`` give the same tokens, for a dense PowLU + BHyT model, DyT and MoE (reference ops: the
  cache is kernel-agnostic, and the fused kernels would compile for every new length).
* A left-padded batch gives each row what that row gives alone: the same greedy tokens, and logits
  within the bound below.
* ``pipeline("text-generation")`` on an exported directory, with a batch of prompts of different
  lengths (so it pads), returns steadylm's tokens.

Models are tiny and random; nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from steadylm.data.tokenizer import EOS_TOKEN, train_tokenizer  # noqa: E402
from steadylm.integrations.transformers import export_model  # noqa: E402
from steadylm.integrations.transformers.modeling import SteadyLMConfig, SteadyLMForCausalLM  # noqa: E402
from steadylm.models import ModelConfig, Transformer, build_model  # noqa: E402

# A padded row against the same row alone: the same fp32 ops on the same values, except that the
# attention of the batch takes SDPA's masked path and the row alone its causal path, which may sum
# in another order (measured: 4.8e-7 of the largest logit; 0 for the padded row itself). Bounded, as
# in test_hf_checkpoints, by 1e-5 of the largest logit.
REL_TOL = 1e-5

TEXT = ("In the beginning God created the heaven and the earth. And the earth was without form, and void; "
        "and darkness was upon the face of the deep. ") * 4


def _config(**kw) -> ModelConfig:
    base = dict(vocab_size=320, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=48,
                impl="reference")
    return ModelConfig(**{**base, **kw})


VARIANTS = {
    "powlu_bhyt": _config(activation="powlu", norm="bhyt"),
    "swiglu_dyt": _config(norm="dyt"),
    "nano_moe": ModelConfig.from_preset("nano-moe", vocab_size=320, dim=32, n_heads=4, n_kv_heads=2,
                                        expert_ffn_dim=32, ffn_dim=64, max_seq_len=48, impl="reference"),
}


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny matrices: one intra-op thread is fastest, and on a shared machine more threads spin.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def hf_model(config: ModelConfig) -> tuple[SteadyLMForCausalLM, Transformer]:
    """The HF model of ``config`` with random weights, and its steadylm trunk (the same modules)."""
    torch.manual_seed(0)
    hf = SteadyLMForCausalLM(SteadyLMConfig(steadylm=config.to_dict())).eval()
    with torch.no_grad():  # non-trivial gains and a c_ℓ that moves the logits
        for name, p in hf.named_parameters():
            if p.dim() == 1:
                p.mul_(1.0 + 0.3 * torch.rand(p.shape))
    hf.steadylm_after_load()
    return hf, hf.model


def prompts(batch: int, length: int) -> torch.Tensor:
    return torch.randint(0, 320, (batch, length), generator=torch.Generator().manual_seed(length))


def steadylm_greedy(model: Transformer, tokens: torch.Tensor, new: int) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(tokens, new, temperature=0.0, decode="eager")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_generate_with_and_without_the_cache_gives_steadylms_tokens(variant: str) -> None:
    hf, model = hf_model(VARIANTS[variant])
    tokens = prompts(2, 9)
    want = steadylm_greedy(model, tokens, 12)
    cached = hf.generate(tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=12, do_sample=False,
                         pad_token_id=0, return_dict_in_generate=True)
    uncached = hf.generate(tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=12, do_sample=False,
                           pad_token_id=0, use_cache=False)
    assert torch.equal(cached.sequences, want) and torch.equal(uncached, want)
    cache = getattr(cached, "cache", None) or getattr(cached, "past_key_values", None)
    assert isinstance(cache, transformers.DynamicCache)
    assert cache.get_seq_length() == 9 + 12 - 1  # the last token is sampled, never fed back


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_a_left_padded_batch_gives_each_row_what_it_gives_alone(variant: str) -> None:
    hf, model = hf_model(VARIANTS[variant])
    rows = [prompts(1, 11)[0], prompts(1, 6)[0], prompts(1, 9)[0]]
    width = max(len(r) for r in rows)
    batch = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for i, row in enumerate(rows):
        batch[i, width - len(row):] = row
        mask[i, width - len(row):] = 1
    out = hf.generate(batch, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        padded_logits = hf(batch, attention_mask=mask).logits
    for i, row in enumerate(rows):
        pad = width - len(row)
        alone = steadylm_greedy(model, row[None], 10)[0]
        assert torch.equal(out[i, pad:], alone), i
        with torch.no_grad():
            logits = hf(row[None]).logits[0]
        diff = float((padded_logits[i, pad:] - logits).abs().max() / logits.abs().max())
        assert diff <= REL_TOL, (i, diff)


def test_explicit_position_ids_and_a_cache_continue_a_sequence() -> None:
    # Two forwards through one cache (a prompt, then a chunk of 3) give the logits of one forward.
    hf, _ = hf_model(VARIANTS["powlu_bhyt"])
    tokens = prompts(2, 12)
    with torch.no_grad():
        whole = hf(tokens, use_cache=False).logits
        first = hf(tokens[:, :9], use_cache=True)
        cache = getattr(first, "cache", None) or getattr(first, "past_key_values", None)
        rest = hf(tokens[:, 9:], cache=cache, position_ids=torch.arange(9, 12).expand(2, 3)).logits
    got = torch.cat([first.logits, rest], dim=1)
    assert float((got - whole).abs().max() / whole.abs().max()) <= REL_TOL


def test_pipeline_pads_a_batch_and_returns_steadylms_tokens(tmp_path: Path) -> None:
    from transformers import pipeline

    tokenizer = train_tokenizer([TEXT], 320)
    torch.manual_seed(0)
    model = build_model(VARIANTS["powlu_bhyt"]).eval()
    export_model(model, tmp_path / "hf", tokenizer=tokenizer, eos_token=EOS_TOKEN)
    texts = ["In the beginning God created", "And the earth was without form, and void; and darkness"]
    generator = pipeline("text-generation", model=str(tmp_path / "hf"), trust_remote_code=True)
    assert generator.tokenizer.padding_side == "left"  # written by the export: decoder-only generation
    results = generator(texts, max_new_tokens=8, do_sample=False, return_tensors=True, batch_size=2)
    for text, result in zip(texts, results):
        ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False).ids])
        want = steadylm_greedy(model, ids, 8)[0]
        # the pipeline's ids for one prompt: the batch's left padding, the prompt, the new tokens
        got = list(result[0]["generated_token_ids"])
        pads = len(got) - len(want)
        assert pads >= 0 and got[:pads] == [generator.tokenizer.pad_token_id] * pads, text
        assert got[pads:] == want.tolist(), text
    assert len(results[0][0]["generated_token_ids"]) > len(steadylm_greedy(
        model, torch.tensor([tokenizer.encode(texts[0], add_special_tokens=False).ids]), 8)[0])  # it did pad
