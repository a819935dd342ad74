"""Plug-ins (issue 16 item 6): a norm and an activation defined outside src/ (tests/plugin_toy.py)
run through ``steadylm train``, ``compare --quick`` and the Hugging Face export, loaded with
``--plugin`` / ``$STEADYLM_PLUGINS``; nothing in src/ names them.

The registries are process-wide, so every test restores them (and forgets the plug-in module)
afterwards: the rest of the suite sees only steadylm's own names.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from steadylm import plugins
from steadylm.cli import main
from steadylm.models import BLOCK_FORMS, ModelConfig, build_model, count_parameters
from steadylm.nn import ACTIVATIONS, NORM_SPECS, NORMS

TESTS = Path(__file__).resolve().parent
PLUGIN = "plugin_toy"
TINY = [
    "--steps", "4", "--batch-size", "2", "--seq-len", "16", "--vocab-size", "300", "--impl", "reference",
    "--set", "model.dim=32", "--set", "model.n_layers=2", "--set", "model.n_heads=2",
    "--set", "model.n_kv_heads=2", "--set", "model.ffn_dim=48", "--set", "train.eval_every=2",
    "--set", "train.probe_every=2", "--set", "train.ckpt_every=4",
]


@pytest.fixture(autouse=True)
def _clean_registries(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory):
    monkeypatch.syspath_prepend(str(TESTS))
    monkeypatch.setenv("STEADYLM_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.delenv(plugins.ENV_VAR, raising=False)
    saved = (dict(NORMS), dict(NORM_SPECS), dict(ACTIVATIONS), dict(BLOCK_FORMS), list(plugins._LOADED))
    yield
    for registry, before in zip((NORMS, NORM_SPECS, ACTIVATIONS, BLOCK_FORMS), saved[:4]):
        registry.clear()
        registry.update(before)
    plugins._LOADED[:] = saved[4]
    sys.modules.pop(PLUGIN, None)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from steadylm.data import load_kjv

    path = tmp_path_factory.mktemp("corpus") / "genesis.txt"
    path.write_text("\n".join(load_kjv()[:300]), encoding="utf-8")
    return path


def test_plugin_names_are_choices_in_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert "toynorm" not in NORMS
    with pytest.raises(SystemExit):
        main(["train", "--plugin", PLUGIN, "--help"])
    shown = capsys.readouterr().out
    assert "toynorm" in shown and "toyact" in shown  # --norm / --activation choices come from the registries
    with pytest.raises(SystemExit):
        main(["compare", "--plugin", PLUGIN, "--help"])
    assert "--plugin MODULE" in capsys.readouterr().out


def test_a_norm_is_one_registration_the_model_uses_everywhere() -> None:
    plugins.load_plugins([PLUGIN])
    import plugin_toy

    config = ModelConfig.from_preset("nano", norm="toynorm", activation="toyact", n_layers=2)
    model = build_model(config)
    # the parameter count the model reports, the closed form (steadylm params) and the modules agree
    assert model.num_params()["total"] == count_parameters(config).total == sum(p.numel() for p in model.parameters())
    block = model.layers[0]
    assert isinstance(block.attn_norm, plugin_toy.ToyNorm) and isinstance(block.ffn_norm, plugin_toy.ToyNorm)
    assert block.attn_norm.scale.item() == plugin_toy.SCALE_ATTN  # per-site arguments from the registration
    assert block.ffn_norm.scale.item() == plugin_toy.SCALE_OTHER
    gate, up = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    assert torch.equal(block.ffn.act(gate, up), torch.tanh(gate) * up)
    # a config names its plug-in, and a dict with it imports the plug-in again
    assert config.to_dict()["plugins"] == [PLUGIN]
    assert ModelConfig.from_preset("nano").to_dict().get("plugins") is None  # built-ins: unchanged dicts
    sys.modules.pop(PLUGIN)
    plugins._LOADED.remove(PLUGIN)
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert PLUGIN in sys.modules


def test_params_lists_the_plugin_names(capsys: pytest.CaptureFixture[str]) -> None:
    # Without the plug-in: steadylm's own names only.
    assert main(["params", "--names", "--json"]) == 0
    names = json.loads(capsys.readouterr().out)
    assert {(n["kind"], n["name"]) for n in names} >= {("norm", "bhyt"), ("activation", "powlu")}
    assert not any(n["plugin"] for n in names) and "toynorm" not in {n["name"] for n in names}
    # With it: its norm and activation, each with the module that registered it.
    assert main(["params", "--plugin", PLUGIN, "--names", "--json"]) == 0
    names = json.loads(capsys.readouterr().out)
    assert [(n["kind"], n["name"], n["module"]) for n in names if n["plugin"]] == [
        ("norm", "toynorm", PLUGIN), ("activation", "toyact", PLUGIN)
    ]
    assert main(["params", "--plugin", PLUGIN, "--names"]) == 0
    shown = capsys.readouterr().out
    assert f"toynorm ({PLUGIN})" in shown and f"toyact ({PLUGIN})" in shown
    # The count table names the plug-ins' norms and activations under it.
    assert main(["params", "nano", "--plugin", PLUGIN]) == 0
    assert f"from plug-ins: norm toynorm ({PLUGIN}), activation toyact ({PLUGIN})" in capsys.readouterr().out
    assert main(["params", "nano", "--names"]) == 2  # --names takes no presets: one-line error


def test_unknown_plugin_is_a_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["params", "--plugin", "no_such_plugin_module"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no_such_plugin_module" in err


def test_toy_plugin_trains_compares_and_exports(tmp_path: Path, corpus: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("transformers")
    run = tmp_path / "run"
    assert main(["train", "--plugin", PLUGIN, "--out", str(run), "--data", str(corpus),
                 "--activation", "toyact", "--norm", "toynorm", *TINY]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in rows if "loss" in r]) >= 2
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if "loss" in r)

    # the lab, with the plug-in from the environment this time
    monkeypatch.setenv(plugins.ENV_VAR, PLUGIN)
    out = tmp_path / "compare"
    assert main(["compare", "--quick", "--out", str(out), "--data", str(corpus),
                 "--variants", "toyact+toynorm,swiglu+rmsnorm", *TINY]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert "toyact+toynorm" in json.dumps(summary)
    monkeypatch.delenv(plugins.ENV_VAR)

    # HF export: the steadylm model type, the plug-in recorded, importable on load in a fresh process
    hf = tmp_path / "hf"
    assert main(["export", "--plugin", PLUGIN, str(run), str(hf)]) == 0
    saved = json.loads((hf / "config.json").read_text())
    assert saved["model_type"] == "steadylm" and saved["steadylm"]["plugins"] == [PLUGIN]
    check = (
        "import json, sys, torch, transformers\n"
        "import steadylm.integrations.transformers\n"
        "assert 'plugin_toy' not in sys.modules\n"
        f"m = transformers.AutoModelForCausalLM.from_pretrained({str(hf)!r}).eval()\n"
        "tokens = torch.arange(8).reshape(1, 8)\n"
        "with torch.no_grad():\n"
        "    print(json.dumps(m(tokens).logits[0, -1, :4].tolist()))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    env.pop(plugins.ENV_VAR, None)
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    from steadylm.train.model_dir import load_model_dir

    model = load_model_dir(run).build().eval()
    with torch.no_grad():
        expected = model(torch.arange(8).reshape(1, 8))[0, -1, :4].tolist()
    got = json.loads(done.stdout.strip().splitlines()[-1])
    # same weights, same fp32 math on one machine: equal up to summation-order rounding of the
    # HF wrapper's forward (the same modules, so in practice identical); 1e-5 relative covers it
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-5, atol=1e-6)
