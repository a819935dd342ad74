"""One run assembly (issue 16 item 1): ``steadylm train`` and the lab build the same run from the
same spec — data (a user ``tokenizer.json`` included), probes, model config, run spec recorded —
and the lab's ranks come from the launcher's layout (:meth:`DistEnv.from_launcher`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from steadylm.distributed.env import DistEnv
from steadylm.errors import ConfigError
from steadylm.lab.runner import load_data, run_variant
from steadylm.probes import StabilityProbe
from steadylm.train.assemble import RUN_SPEC_KEY, build_data, build_probes, build_run
from steadylm.train.spec import RunSpec

TINY = {"dim": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 2, "ffn_dim": 48}


@pytest.fixture(scope="module")
def corpus_and_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from steadylm.data import load_kjv, train_tokenizer

    root = tmp_path_factory.mktemp("assemble")
    docs = load_kjv()[:200]
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(docs), encoding="utf-8")
    tokenizer = root / "tokenizer.json"
    train_tokenizer(docs, 300).save(str(tokenizer))
    return corpus, tokenizer


def _spec(corpus: Path, tokenizer: Path | None, **train: object) -> RunSpec:
    return RunSpec.from_dict({
        "model": {"preset": "nano", "impl": "reference", "activation": "powlu", "norm": "bhyt", **TINY},
        "train": {"steps": 2, "batch_size": 2, "warmup_steps": 0, "eval_every": 2, "probe_every": 1,
                  "eval_batches": 1, "ckpt_every": 0, **train},
        "data": {"path": str(corpus), "seq_len": 16, "vocab_size": 300,
                 **({"tokenizer": str(tokenizer)} if tokenizer else {})},
        "probes": {"stability": True},
    })


def test_the_lab_takes_a_tokenizer_file_and_builds_the_data_train_builds(
        corpus_and_tokenizer: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("STEADYLM_CACHE", str(tmp_path / "cache"))
    corpus, tokenizer = corpus_and_tokenizer
    spec = _spec(corpus, tokenizer)
    lab, train = load_data(spec), build_data(spec)
    assert lab.describe() == train.describe() and lab.fingerprint == train.fingerprint
    assert lab.train_tokens.equal(train.train_tokens) and lab.val_tokens.equal(train.val_tokens)


def test_train_and_the_lab_assemble_the_same_run(corpus_and_tokenizer: tuple[Path, Path],
                                                  monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("STEADYLM_CACHE", str(tmp_path / "cache"))
    corpus, _ = corpus_and_tokenizer
    spec = _spec(corpus, None)
    trainer = build_run(spec, tmp_path / "train")
    assert [type(p) for p in trainer.probes] == [type(p) for p in build_probes(spec)] == [StabilityProbe]
    assert build_probes(spec.with_overrides({"train.probe_every": 0})) == []
    train_result = trainer.run()
    lab_result = run_variant(spec, tmp_path / "lab", load_data(spec))
    # one assembly: the same spec gives the same config.json and the same logged numbers
    configs = [json.loads((tmp_path / d / "config.json").read_text()) for d in ("train", "lab")]
    assert configs[0] == configs[1] and configs[0][RUN_SPEC_KEY] == json.loads(json.dumps(spec.to_dict()))
    from steadylm.train import TIMING_KEYS
    from steadylm.train.metrics import read_metrics

    strip = [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_metrics(train_result.metrics_jsonl)]
    assert strip == [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in lab_result.rows]


def test_ranks_come_from_the_launcher_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert DistEnv.from_launcher() == DistEnv()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    env = DistEnv.from_launcher()
    assert (env.rank, env.world_size, env.local_world_size, env.is_main) == (1, 3, 3, False)
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(ConfigError, match="RANK=3"):
        DistEnv.from_launcher()
