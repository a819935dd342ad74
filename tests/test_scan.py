"""``steadylm scan`` (issue 9): agrees with the lab's probes, finds a planted outlier channel, and
reports bad input in one line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from steadylm.cli import main as cli_main  # noqa: E402
from steadylm.data.tokenizer import train_tokenizer  # noqa: E402
from steadylm.integrations import transformers as slt  # noqa: E402
from steadylm.models import ModelConfig, build_model  # noqa: E402
from steadylm.probes import StabilityProbe  # noqa: E402
from steadylm.probes import keys as K  # noqa: E402
from steadylm.scan import open_model_dir, tokenize_text  # noqa: E402

TEXT = (
    "And God said, Let there be light: and there was light. And God saw the light, that it was good: "
    "and God divided the light from the darkness. And God called the light Day, and the darkness he "
    "called Night. And the evening and the morning were the first day. "
) * 6
SEQ = 32


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([TEXT], 320)


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def _scan(model_dir: Path, text_file: Path, out: Path) -> dict:
    assert cli_main(["scan", str(model_dir), "--data", str(text_file), "--out", str(out),
                     "--seq-len", str(SEQ)]) == 0
    assert {"report.html", "summary.md", "summary.json"} <= {p.name for p in out.iterdir()}
    assert (out / "plots" / "down_proj_bands.png").is_file()
    return json.loads((out / "summary.json").read_text())


def test_scan_of_an_exported_run_agrees_with_the_lab_probes(tmp_path: Path, tokenizer, text_file: Path) -> None:
    config = ModelConfig(vocab_size=320, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                         max_seq_len=SEQ, activation="powlu", norm="bhyt", impl="reference")
    torch.manual_seed(0)
    model = build_model(config).eval()
    export = tmp_path / "hf"
    slt.export_model(model, export, tokenizer=tokenizer, eos_token="<|endoftext|>")
    summary = _scan(export, text_file, tmp_path / "scan")

    # The lab's probe on steadylm's own model over the same windows, batch by batch as scan does.
    tokens = tokenize_text(text_file, tokenizer, SEQ, 16384)
    probe = StabilityProbe(every=1, grad_stats=False)
    probe.begin_step(1, model)
    with torch.no_grad():
        for start in range(0, tokens.shape[0], 4):
            model(tokens[start : start + 4])
    expected = probe.end_step(1, model)
    compared = [k for k in expected if k.startswith((K.DOWN_IN, K.HIDDEN, K.SAT, K.LAM, K.BHYT))]
    assert len(compared) > 20
    for key in compared:
        # Same weights (exported, re-imported: fp32 copies) and the same ops on the same windows.
        assert summary["metrics"][key] == pytest.approx(expected[key], rel=1e-6, abs=1e-12), key
    assert summary["tokens"] == tokens.numel()
    assert set(summary["what_if"]) == {"swiglu_clip"}  # the model is PowLU already
    assert 0 <= summary["what_if"]["swiglu_clip"]["kl"] and summary["fp8"]


def test_scan_reports_a_planted_outlier_channel(tmp_path: Path, tokenizer, text_file: Path) -> None:
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=SEQ, architectures=["LlamaForCausalLM"]))
    layer, channel = 1, 37
    with torch.no_grad():  # one FFN hidden unit 40× larger on both gate and up: a massive activation
        hf.model.layers[layer].mlp.gate_proj.weight[channel] *= 40
        hf.model.layers[layer].mlp.up_proj.weight[channel] *= 40
    hf.save_pretrained(tmp_path / "hf")
    tokenizer.save(str(tmp_path / "hf" / "tokenizer.json"))
    summary = _scan(tmp_path / "hf", text_file, tmp_path / "scan")
    tops = {r["layer"]: r for r in summary["outlier_channels"] if r["family"] == "ffn_down_in"}
    assert tops[layer]["channel"] == channel
    assert tops[layer]["ratio"] > 100 > max(tops[i]["ratio"] for i in tops if i != layer)
    md = (tmp_path / "scan" / "summary.md").read_text()
    assert f"| {layer} |" in md and f"| {channel} |" in md and "| yes |" in md
    # The what-if sees the outlier layer shrink under the clamped gate.
    amax = K.layer_values(summary["metrics"], K.DOWN_IN, "amax")[layer]
    clipped = K.layer_values(summary["what_if"]["swiglu_clip"]["metrics"], K.DOWN_IN, "amax")[layer]
    assert clipped < amax and math.isfinite(summary["what_if"]["powlu"]["kl"])


def test_scan_loads_without_running_checkpoint_code(tmp_path: Path, tokenizer) -> None:
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=SEQ, architectures=["LlamaForCausalLM"]))
    hf.save_pretrained(tmp_path / "hf")
    model, tok, description = open_model_dir(tmp_path / "hf")
    assert tok is None and "LlamaForCausalLM" in description and model.config.n_layers == 1


def test_scan_errors_are_one_line(tmp_path: Path, text_file: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    assert cli_main(["scan", str(tmp_path / "empty"), "--data", str(text_file), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "neither a Hugging Face model directory" in err
    assert cli_main(["scan", str(tmp_path / "empty"), "--data", str(text_file), "--out", str(tmp_path / "o"),
                     "--seq-len", "0"]) == 2
    assert "--seq-len must be >= 1" in capsys.readouterr().err
