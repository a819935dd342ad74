"""Commands a new user runs either work or say in one line why not (issue 17, item 5).

* The world size comes from the launcher: ``--parallel fsdp|ddp`` without torchrun is a one-process
  group, and a run saved with such a spec resumes with ``--resume`` and no flag.
* ``steadylm export`` of an imported checkpoint that shipped no tokenizer writes the model and says
  it has none.
* A missing or malformed ``config.json`` field is one line naming it (``import`` and ``scan``).
* Optional dependencies are imported only by the feature that needs them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from steadylm import cli
from steadylm.distributed.env import init_distributed, is_distributed, shutdown_distributed
from steadylm.train.metrics import read_metrics

#: A nano model small enough that a handful of steps take well under a second (as in test_train).
SMALL = ["--preset", "nano", "--set", "model.dim=32", "--set", "model.n_layers=2", "--set", "model.n_heads=2",
         "--set", "model.n_kv_heads=2", "--set", "model.ffn_dim=64", "--set", "model.impl=reference",
         "--activation", "powlu", "--norm", "bhyt", "--set", "data.vocab_size=512", "--set", "data.seq_len=32",
         "--batch-size", "4", "--set", "train.warmup_steps=1", "--set", "train.eval_every=0",
         "--set", "train.eval_batches=1", "--set", "train.threads=1", "--set", "train.progress=false",
         "--set", "train.device=cpu", "--set", "train.probe_every=2"]
#: One process with FSDP2 over a group of one computes the same sums as no FSDP, except that the
#: gradient-norm clip and the (size-one) reduce-scatter may add in another order: a few fp32 ulps per
#: step that AdamW carries forward over 4 steps; 1e-5 relative is the bound test_distributed derives
#: for that same effect.
REL = 1e-5


@pytest.fixture
def cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    # the session-wide tokenizer cache test_train uses: the 512-token KJV tokenizer is trained once
    path = tmp_path_factory.getbasetemp() / "steadylm-cache"
    monkeypatch.setenv("STEADYLM_CACHE", str(path))
    return path


@pytest.fixture
def no_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_data_parallel_mode_without_a_launcher_is_a_one_process_group(no_launcher: None, mode: str) -> None:
    assert init_distributed(mode="none").world_size == 1 and not is_distributed()
    try:
        env = init_distributed("gloo", 30.0, mode=mode)
        assert is_distributed() and (env.rank, env.world_size) == (0, 1)
        assert torch.distributed.get_world_size() == 1
    finally:
        shutdown_distributed()
    assert not is_distributed()


def test_fsdp_run_without_torchrun_trains_and_resumes_with_no_flag(
        tmp_path: Path, cache: Path, no_launcher: None, capsys: pytest.CaptureFixture[str]) -> None:
    split = tmp_path / "fsdp"
    assert cli.main(["train", "--out", str(split), *SMALL, "--steps", "4", "--parallel", "fsdp",
                     "--stop-after", "2"]) == 0
    saved = json.loads((split / "config.json").read_text())["run_spec"]
    assert saved["parallel"]["mode"] == "fsdp"
    # the saved spec says fsdp; no launcher, no flag: the resume runs as a one-process group
    assert cli.main(["train", "--out", str(split), "--resume"]) == 0
    assert "(1 process, fsdp)" in capsys.readouterr().out
    assert not is_distributed()
    plain = tmp_path / "plain"
    assert cli.main(["train", "--out", str(plain), *SMALL, "--steps", "4"]) == 0
    got = [row["loss"] for row in read_metrics(split / "metrics.jsonl")]
    want = [row["loss"] for row in read_metrics(plain / "metrics.jsonl")]
    assert len(got) == len(want) == 4
    worst = max(abs(g - w) / abs(w) for g, w in zip(got, want))
    assert worst <= REL, f"one-process FSDP2 (stopped and resumed) vs no parallelism: {worst:.3g}"


# ------------------------------------------------------------------------------------------------
# Hugging Face directories
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama checkpoint with no tokenizer files."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    out = tmp_path_factory.mktemp("llama")
    transformers.LlamaForCausalLM(config).save_pretrained(out)
    assert not (out / "tokenizer.json").exists()
    return out


def test_export_of_an_import_without_tokenizer_writes_the_model_and_says_so(
        llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    transformers = pytest.importorskip("transformers")
    import steadylm.integrations.transformers  # noqa: F401  (registers the steadylm model type)

    run_dir, out = tmp_path / "imported", tmp_path / "exported"
    assert cli.main(["import", str(llama_dir), str(run_dir), "--activation", "powlu"]) == 0
    capsys.readouterr()
    assert cli.main(["export", str(run_dir), str(out)]) == 0
    # transformers itself imports torchao when it is installed (its quantizers), whose CPU wheel logs
    # two "Failed to load ..._C*.so" warnings: not steadylm's lines, so only ours are counted.
    err = [line for line in capsys.readouterr().err.strip().splitlines() if str(out) in line]
    assert len(err) == 1 and "no tokenizer" in err[0] and "--tokenizer FILE" in err[0], err
    assert (out / "model.safetensors").is_file() and not (out / "tokenizer.json").exists()
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokens = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(model(tokens).logits).all()


def _broken(llama_dir: Path, tmp_path: Path, change: dict[str, Any], drop: str | None) -> Path:
    out = tmp_path / "broken"
    out.mkdir()
    config = json.loads((llama_dir / "config.json").read_text())
    if drop:
        del config[drop]
    config.update(change)
    (out / "config.json").write_text(json.dumps(config))
    (out / "model.safetensors").symlink_to(llama_dir / "model.safetensors")
    return out


@pytest.mark.parametrize("command", ["import", "scan"])
@pytest.mark.parametrize(("change", "drop", "field"), [
    ({}, "hidden_size", "hidden_size"),
    ({}, "num_hidden_layers", "num_hidden_layers"),
    ({"num_attention_heads": "4"}, None, "num_attention_heads"),
    ({"rms_norm_eps": -1.0}, None, "rms_norm_eps"),
    ({"tie_word_embeddings": "no"}, None, "tie_word_embeddings"),
    ({"rope_scaling": [2.0]}, None, "rope_scaling"),
    ({"architectures": "LlamaForCausalLM"}, None, "architectures"),
])
def test_a_missing_or_malformed_config_field_is_one_line_naming_it(
        llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str,
        change: dict[str, Any], drop: str | None, field: str) -> None:
    source = _broken(llama_dir, tmp_path, change, drop)
    text = tmp_path / "text.txt"
    text.write_text("in the beginning " * 50)
    argv = ([command, str(source), str(tmp_path / "out")] if command == "import" else
            [command, str(source), "--data", str(text), "--out", str(tmp_path / "out")])
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and repr(field) in err[0], err


def test_scan_with_a_tokenizer_of_another_vocabulary_is_one_line(
        llama_dir: Path, tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from steadylm.data import prepare_data

    data = prepare_data(None, vocab_size=512, seq_len=32, val_fraction=0.05, seed=0)  # ids up to 511 > 95
    tokenizer = tmp_path / "tokenizer.json"
    data.tokenizer.save(str(tokenizer))
    text = tmp_path / "text.txt"
    text.write_text("In the beginning God created the heaven and the earth. " * 40)
    assert cli.main(["scan", str(llama_dir), "--tokenizer", str(tokenizer), "--data", str(text),
                     "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "vocabulary has 96 ids" in err[0], err


# ------------------------------------------------------------------------------------------------
# optional dependencies
# ------------------------------------------------------------------------------------------------

_IMPORT_PROBE = """
import sys
from steadylm import cli
out = sys.argv[1]
small = {small!r}
assert cli.main(["train", "--out", out + "/run", *small, "--steps", "2"]) == 0
with open(out + "/text.txt", "w") as f:
    f.write("In the beginning God created the heaven and the earth. " * 40)
assert cli.main(["scan", out + "/run", "--data", out + "/text.txt", "--out", out + "/scan", "--max-tokens", "256",
                 "--seq-len", "32"]) == 0
print(sorted({{name.split(".")[0] for name in sys.modules}} & {{"torchao", "transformers", "pyarrow", "wandb",
                                                                "tensorboard", "torchtitan"}}))
"""


def test_train_and_scan_import_no_optional_dependency(tmp_path: Path, cache: Path) -> None:
    # A fresh interpreter: this test session may already have imported any of them.
    env = {**os.environ, "STEADYLM_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _IMPORT_PROBE.format(small=SMALL), str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout
    assert "torchao" not in proc.stderr and "Failed to load" not in proc.stderr
