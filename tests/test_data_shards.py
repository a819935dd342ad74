"""Data at scale: rank sharding of batches, ``steadylm data prepare`` and memory-mapped shards."""

from __future__ import annotations

import json
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from steadylm.cli import main as cli_main
from steadylm.data import (
    ShardedTokenData,
    TokenData,
    encode_corpus,
    keyed_permutation,
    load_corpus,
    load_kjv,
    open_prepared,
    prepare_corpus,
    prepare_data,
    split_stream,
)
from steadylm.data import corpus as corpus_module
from steadylm.data import packing as packing_module
from steadylm.data import prepare as prepare_module
from steadylm.data import tokenizer as tokenizer_module
from steadylm.data.shards import verify_prepared
from steadylm.data.tokenizer import encode_documents
from steadylm.errors import ConfigError, DataError


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path_factory.getbasetemp() / "steadylm-cache"
    monkeypatch.setenv("STEADYLM_CACHE", str(root))
    return root


def _toy_data(num_tokens: int = 4001, seq_len: int = 8) -> TokenData:
    train = torch.arange(num_tokens, dtype=torch.int32) % 300
    val = (torch.arange(num_tokens // 4, dtype=torch.int32) * 7) % 300
    return TokenData(train, val, seq_len=seq_len, vocab_size=300, tokenizer=None, eos_id=0)


# ----------------------------------------------------------------------------------------------
# rank sharding of the global batch
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 4])
def test_rank_shards_concatenate_to_the_global_batch(world: int) -> None:
    data = _toy_data()
    for batch_index in (0, 3, 61):  # 61 * 8 rows crosses an epoch boundary (500 sequences)
        inputs, targets = data.train_batch(batch_index, 8, seed=5)
        parts = [data.train_batch(batch_index, 8, seed=5, shard=(r, world)) for r in range(world)]
        assert all(p[0].shape == (8 // world, 8) for p in parts)
        assert torch.equal(torch.cat([p[0] for p in parts]), inputs)
        assert torch.equal(torch.cat([p[1] for p in parts]), targets)


@pytest.mark.parametrize(("num_batches", "batch_size", "world"), [(3, 8, 2), (2, 4, 4), (200, 4, 2)])
def test_validation_shards_concatenate_to_the_global_batches(
    num_batches: int, batch_size: int, world: int
) -> None:
    data = _toy_data()
    whole = data.val_batches(num_batches, batch_size)
    parts = [data.val_batches(num_batches, batch_size, shard=(r, world)) for r in range(world)]
    assert all(len(p) == len(whole) for p in parts)  # same number of batches on every rank
    for i, (inputs, targets) in enumerate(whole):
        assert torch.equal(torch.cat([p[i][0] for p in parts]), inputs)
        assert torch.equal(torch.cat([p[i][1] for p in parts]), targets)


def test_bad_shards_raise_config_error_naming_the_field() -> None:
    data = _toy_data()
    with pytest.raises(ConfigError, match=r"batch_size \(6\) must be divisible by the number of ranks \(4\)"):
        data.train_batch(0, 6, seed=0, shard=(0, 4))
    with pytest.raises(ConfigError, match="batch_size"):
        data.val_batches(2, 6, shard=(1, 4))
    with pytest.raises(ConfigError, match="rank"):
        data.train_batch(0, 8, seed=0, shard=(2, 2))
    with pytest.raises(ConfigError, match="shard"):
        data.train_batch(0, 8, seed=0, shard="01")  # type: ignore[arg-type]


def test_keyed_permutation_is_a_seeded_bijection() -> None:
    for count in (1, 2, 3, 1000, 4099):
        image = keyed_permutation(np.arange(count), count, key=17)
        assert np.array_equal(np.sort(image), np.arange(count))
    a = keyed_permutation(np.arange(1000), 1000, key=1)
    assert np.array_equal(a, keyed_permutation(np.arange(1000), 1000, key=1))
    assert not np.array_equal(a, keyed_permutation(np.arange(1000), 1000, key=2))
    assert not np.array_equal(a, np.arange(1000))


def test_large_corpora_use_the_keyed_permutation_and_still_visit_every_sequence(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = _toy_data(num_tokens=8 * 100 + 1)  # 100 sequences
    stored = torch.cat([data.train_batch_indices(i, 10, seed=3) for i in range(10)])
    monkeypatch.setattr(packing_module, "EXACT_PERMUTATION_LIMIT", 50)
    keyed = torch.cat([data.train_batch_indices(i, 10, seed=3) for i in range(10)])
    assert sorted(keyed.tolist()) == list(range(100)) and not torch.equal(keyed, stored)
    assert not data._permutations or all(p.numel() == 100 for p in data._permutations.values())
    nxt = torch.cat([data.train_batch_indices(i, 10, seed=3) for i in range(10, 20)])
    assert sorted(nxt.tolist()) == list(range(100)) and not torch.equal(nxt, keyed)


# ----------------------------------------------------------------------------------------------
# steadylm data prepare -> memory-mapped shards
# ----------------------------------------------------------------------------------------------


def _shard_stream(directory: Path) -> np.ndarray:
    index = json.loads((directory / "index.json").read_text())
    dtype = np.dtype("<" + {"uint16": "u2", "uint32": "u4"}[index["dtype"]])
    return np.concatenate([np.fromfile(directory / s["file"], dtype=dtype) for s in index["shards"]])


@pytest.fixture(scope="module")
def kjv_prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[TokenData, Path, Path]:
    """The KJV default (vocab 4096, seq_len 128) in memory, and prepared twice: in one shard by one
    in-process worker, and in 100k-token shards by two worker processes."""
    cache = tmp_path_factory.mktemp("kjv-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("STEADYLM_CACHE", str(cache))
        in_memory = prepare_data(None)  # the lab's defaults: vocab 4096, seq_len 128
        root = tmp_path_factory.mktemp("kjv-prepared")
        one = prepare_corpus("kjv", root / "one", workers=1).directory
        many = prepare_corpus(None, root / "many", workers=2, shard_tokens=100_000).directory
    return in_memory, one, many


def test_prepared_kjv_gives_the_in_memory_batches_bit_for_bit(
    kjv_prepared: tuple[TokenData, Path, Path],
) -> None:
    in_memory, one, many = kjv_prepared
    index = json.loads((many / "index.json").read_text())
    assert index["dtype"] == "uint16" and len(index["shards"]) == 12 and index["version"] == 1
    assert np.array_equal(_shard_stream(one), _shard_stream(many))  # workers and shard size do not matter
    for directory in (one, many):
        data = prepare_data(directory)  # --data DIR: the default seq_len 128, split seed 0
        assert isinstance(data, ShardedTokenData)
        assert (data.vocab_size, data.eos_id, data.fingerprint) == (
            in_memory.vocab_size,
            in_memory.eos_id,
            in_memory.fingerprint,
        )
        assert data.tokenizer.to_str() == in_memory.tokenizer.to_str()
        described = data.describe()
        assert {k: described[k] for k in in_memory.describe()} == in_memory.describe()
        assert data.train_tokens.shape == tuple(in_memory.train_tokens.shape)
        # batch 523 of 16 crosses the first epoch boundary (8363 sequences)
        for batch_index, seed in [(0, 0), (7, 0), (522, 0), (523, 0), (1500, 3)]:
            expected = in_memory.train_batch(batch_index, 16, seed)
            got = data.train_batch(batch_index, 16, seed)
            assert (
                got[0].dtype == torch.long
                and torch.equal(got[0], expected[0])
                and torch.equal(got[1], expected[1])
            )
            halves = [data.train_batch(batch_index, 16, seed, shard=(r, 2)) for r in range(2)]
            assert torch.equal(torch.cat([h[0] for h in halves]), expected[0])
        for expected, got in zip(in_memory.val_batches(4, 16), data.val_batches(4, 16), strict=True):
            assert torch.equal(expected[0], got[0]) and torch.equal(expected[1], got[1])


def test_prepared_kjv_other_split_matches_too(kjv_prepared: tuple[TokenData, Path, Path]) -> None:
    in_memory, _, many = kjv_prepared
    data = prepare_data(many, seq_len=64, val_fraction=0.1, seed=2)
    reference = TokenData(
        *[torch.from_numpy(s.astype(np.int32)) for s in split_stream(_shard_stream(many), 64, 0.1, 2)],
        seq_len=64,
        vocab_size=in_memory.vocab_size,
        tokenizer=in_memory.tokenizer,
        eos_id=in_memory.eos_id,
    )
    for batch_index in (0, 100, 1100):
        assert torch.equal(
            data.train_batch(batch_index, 24, 9)[0], reference.train_batch(batch_index, 24, 9)[0]
        )
    assert all(
        torch.equal(a[1], b[1])
        for a, b in zip(data.val_batches(3, 24), reference.val_batches(3, 24), strict=True)
    )


@pytest.fixture(scope="module")
def ruth() -> str:
    return load_kjv()[7]  # the Book of Ruth, ~25 KB


def _write_mixed_corpus(folder: Path, ruth: str) -> None:
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_bytes(
        ruth[:9000].replace("\n", "\r\n").encode("utf-8")
    )  # CRLF: universal newlines
    (folder / "sub" / "b.md").write_text(ruth[9000:] + "\n\nnaïve 東京 🙂\n", encoding="utf-8")
    (folder / "sub" / "c.jsonl").write_text(
        json.dumps({"text": ruth[:700]})
        + "\n\n"
        + json.dumps({"text": "  "})
        + "\n"
        + json.dumps({"text": ruth[700:2000]})
        + "\n",
        encoding="utf-8",
    )
    (folder / "blank.txt").write_text(" \n\t\n", encoding="utf-8")  # whitespace only: no document


@pytest.mark.parametrize("workers", [1, 2])
def test_prepare_text_directory_and_jsonl_stream_equals_the_in_memory_encoding(
    tmp_path: Path, ruth: str, workers: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Small pieces and chunks so that documents span many chunks, pieces and tasks.
    monkeypatch.setattr(tokenizer_module, "_PIECE_CHARS", 300)
    monkeypatch.setattr(corpus_module, "_TEXT_CHUNK_CHARS", 257)
    monkeypatch.setattr(prepare_module, "_TASK_CHARS", 1000)
    folder = tmp_path / "corpus"
    _write_mixed_corpus(folder, ruth)
    for source in (folder, folder / "a.txt", folder / "sub" / "c.jsonl"):
        out = tmp_path / f"out-{source.name}"
        # Workers are fresh processes (spawn): they encode with the tokenizer they are given, and
        # piece cutting happens in this process, so the patched sizes apply.
        result = prepare_corpus(source, out, vocab_size=400, workers=workers, shard_tokens=1000)
        encoded = encode_corpus(load_corpus(source), vocab_size=400)
        assert np.array_equal(_shard_stream(out), encoded.tokens.astype(np.int64))
        assert result.index.fingerprint == encoded.fingerprint
        assert result.num_documents == len(load_corpus(source))
        assert result.index.source["bytes"] == sum(len(d.encode()) for d in load_corpus(source))
        assert all(s.tokens <= 1000 for s in result.index.shards)


def test_prepare_parquet(tmp_path: Path, ruth: str) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "docs.parquet"
    texts = [ruth[i : i + 1500] for i in range(0, len(ruth), 1500)]
    pq.write_table(pa.table({"id": list(range(len(texts))), "body": texts}), path, row_group_size=4)
    result = prepare_corpus(path, tmp_path / "out", vocab_size=400, text_field="body", workers=1)
    assert result.num_documents == len(texts)
    assert np.array_equal(_shard_stream(result.directory), encode_corpus(texts, 400).tokens.astype(np.int64))
    # In a directory, Parquet files are corpus files like text and JSON-lines.
    folder = tmp_path / "mixed"
    folder.mkdir()
    pq.write_table(pa.table({"text": texts[:3]}), folder / "b.parquet")
    (folder / "a.txt").write_text(texts[3], encoding="utf-8")
    mixed = prepare_corpus(folder, tmp_path / "out-mixed", vocab_size=400, workers=1)
    assert load_corpus(folder) == [texts[3], *texts[:3]] and mixed.num_documents == 4
    assert np.array_equal(
        _shard_stream(mixed.directory), encode_corpus(load_corpus(folder), 400).tokens.astype(np.int64)
    )
    with pytest.raises(DataError, match=r"docs\.parquet: no column 'text'"):
        prepare_corpus(path, tmp_path / "out2", vocab_size=400, workers=1)
    with pytest.raises(DataError, match=r"docs\.parquet: column 'id' must hold strings"):
        prepare_corpus(path, tmp_path / "out2", vocab_size=400, text_field="id", workers=1)


def _llama_like_tokenizer(directory: Path, corpus: str, eos: str = "</s>", config: bool = True) -> Path:
    """A byte-level BPE with <s>/</s> specials, saved like a Hugging Face model repo (nothing downloaded)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<unk>", "<s>", eos],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([corpus], trainer=trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    if config:
        (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": eos}}))
    return directory / "tokenizer.json"


def test_bring_your_own_tokenizer_json(tmp_path: Path, ruth: str) -> None:
    tok_path = _llama_like_tokenizer(tmp_path / "llama", ruth)
    source = tmp_path / "docs.jsonl"
    docs = [ruth[i : i + 2000] for i in range(0, len(ruth), 2000)]
    source.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    result = prepare_corpus(source, tmp_path / "out", tokenizer=tok_path, workers=2)
    tok = Tokenizer.from_file(str(tok_path))
    eos = tok.token_to_id("</s>")
    assert result.index.eos_id == eos == 2 and result.index.vocab_size == tok.get_vocab_size()
    stream = _shard_stream(result.directory)
    assert int((stream == eos).sum()) == len(docs) and stream[-1] == eos
    assert np.array_equal(stream, encode_documents(tok, docs, eos).astype(np.int64))
    # The in-memory path with the same tokenizer.json gives the same batches and fingerprint.
    in_memory = prepare_data(source, seq_len=16, tokenizer=tok_path)
    prepared = prepare_data(result.directory, seq_len=16)
    assert prepared.fingerprint == in_memory.fingerprint and prepared.eos_id == in_memory.eos_id == eos
    for i in (0, 9, 40):
        assert torch.equal(prepared.train_batch(i, 8, 1)[0], in_memory.train_batch(i, 8, 1)[0])
    assert prepared.decode(prepared.train_batch(0, 1, 0)[0][0])  # the carried tokenizer decodes
    with pytest.raises(ConfigError, match="differs from the one"):
        prepare_data(result.directory, tokenizer=_llama_like_tokenizer(tmp_path / "other", ruth[:5000]))

    # Without tokenizer_config.json the EOS token is found by name, or named with eos_token.
    bare = _llama_like_tokenizer(tmp_path / "bare", ruth, eos="<|end_of_text|>", config=False)
    found = prepare_corpus(source, tmp_path / "out-bare", tokenizer=bare, workers=1)
    assert found.index.eos_id == Tokenizer.from_file(str(bare)).token_to_id("<|end_of_text|>")
    odd = _llama_like_tokenizer(tmp_path / "odd", ruth, eos="<|stop|>", config=False)
    with pytest.raises(DataError, match=r"odd/tokenizer\.json: no end-of-text token .* --eos-token"):
        prepare_corpus(source, tmp_path / "out-odd", tokenizer=odd, workers=1)
    named = prepare_corpus(source, tmp_path / "out-odd", tokenizer=odd, eos_token="<|stop|>", workers=1)
    assert named.index.eos_id == 2
    with pytest.raises(DataError, match=r"tokenizer file not found: .*missing\.json"):
        prepare_corpus(source, tmp_path / "x", tokenizer=tmp_path / "missing.json")


def test_vocabulary_over_65536_gives_uint32_shards(tmp_path: Path) -> None:
    vocab = {f"w{i}": i for i in range(70_000)}
    vocab.update({"[UNK]": 70_000, "</s>": 70_001})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok_path = tmp_path / "big.json"
    tok.save(str(tok_path))
    rng = np.random.default_rng(0)
    docs = [" ".join(f"w{i}" for i in rng.integers(60_000, 70_000, size=300)) for _ in range(20)]
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    result = prepare_corpus(source, tmp_path / "out", tokenizer=tok_path, workers=1)
    assert result.index.dtype == "uint32" and result.index.vocab_size == 70_002
    stream = _shard_stream(result.directory)
    assert stream.max() >= 65_536 and stream[300] == 70_001  # the first document's EOS
    prepared, in_memory = (
        prepare_data(result.directory, seq_len=32),
        prepare_data(source, seq_len=32, tokenizer=tok_path),
    )
    assert torch.equal(prepared.train_batch(2, 16, 0)[0], in_memory.train_batch(2, 16, 0)[0])
    assert int(prepared.train_batch(2, 16, 0)[0].max()) >= 65_536


# ----------------------------------------------------------------------------------------------
# damaged shards and indexes: one-line DataError naming the file, never garbage tokens
# ----------------------------------------------------------------------------------------------


@pytest.fixture()
def small_prepared(tmp_path: Path, ruth: str) -> Path:
    source = tmp_path / "ruth.txt"
    source.write_text(ruth, encoding="utf-8")
    return prepare_corpus(
        source, tmp_path / "prepared", vocab_size=300, workers=1, shard_tokens=4000
    ).directory


def _one_line_error(match: str, call) -> str:  # noqa: ANN001 - a zero-argument callable
    with pytest.raises(DataError, match=match) as info:
        call()
    assert "\n" not in str(info.value)
    return str(info.value)


def test_truncated_missing_or_corrupt_shards(small_prepared: Path) -> None:
    shard = small_prepared / "tokens-00001.bin"
    original = shard.read_bytes()
    shard.write_bytes(original[:-6])
    _one_line_error(
        r"tokens-00001\.bin: 7994 bytes, the index says 8000 \(truncated",
        lambda: prepare_data(small_prepared, seq_len=16),
    )
    shard.unlink()
    _one_line_error(r"tokens-00001\.bin: shard missing", lambda: prepare_data(small_prepared, seq_len=16))
    # Same size, ids scrambled to 0xFFFF: the SHA-256 check on open (small sets) catches it ...
    shard.write_bytes(b"\xff" * len(original))
    _one_line_error(
        r"tokens-00001\.bin: SHA-256 differs from the index", lambda: prepare_data(small_prepared, seq_len=16)
    )
    _one_line_error(r"tokens-00001\.bin: SHA-256 differs", lambda: verify_prepared(small_prepared))
    # ... and without it every window read checks ids against the vocabulary.
    data = open_prepared(small_prepared, seq_len=16, verify=False)
    message = _one_line_error(
        r"tokens-00001\.bin: token id 65535 at token \d+ is >= vocab_size 300",
        lambda: [data.train_batch(i, 16, 0) for i in range(data.num_train_sequences // 16)],
    )
    assert "corrupt" in message
    shard.write_bytes(original)
    assert verify_prepared(small_prepared).num_tokens == data.train_tokens.shape[0] + data.val_tokens.shape[0]


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda raw: "{not json", r"index\.json: not valid JSON"),
        (
            lambda raw: json.dumps({k: v for k, v in json.loads(raw).items() if k != "dtype"}),
            r"index\.json: missing key 'dtype'",
        ),
        (
            lambda raw: json.dumps({**json.loads(raw), "version": 2}),
            r"index\.json: format version 2 is not supported",
        ),
        (
            lambda raw: json.dumps({**json.loads(raw), "format": "other"}),
            r"index\.json: not a steadylm token-shard index",
        ),
        (
            lambda raw: json.dumps({**json.loads(raw), "num_tokens": 5}),
            r"index\.json: num_tokens 5 is not the sum",
        ),
        (lambda raw: json.dumps({**json.loads(raw), "dtype": "int8"}), r"index\.json: dtype must be one of"),
        (lambda raw: json.dumps({**json.loads(raw), "eos_id": 999}), r"index\.json: eos_id 999 is outside"),
        (
            lambda raw: json.dumps(
                {**json.loads(raw), "shards": [{"file": "../x.bin", "tokens": 1, "bytes": 2, "sha256": ""}]}
            ),
            r"index\.json: shards\[0\] is invalid",
        ),
        (
            lambda raw: json.dumps(
                {**json.loads(raw), "shards": [{"file": "tokens-00000.bin", "tokens": "1"}]}
            ),
            r"index\.json: key shards\[0\]\.'tokens' has the wrong type",
        ),
    ],
)
def test_damaged_index(small_prepared: Path, edit, match: str) -> None:  # noqa: ANN001
    index = small_prepared / "index.json"
    index.write_text(edit(index.read_text()))
    _one_line_error(match, lambda: prepare_data(small_prepared, seq_len=16))


def test_missing_index_and_replaced_tokenizer(small_prepared: Path, ruth: str) -> None:
    tokenizer = small_prepared / "tokenizer.json"
    tokenizer.write_text(Tokenizer.from_file(str(tokenizer)).to_str().replace('"<|endoftext|>"', '"<|end|>"'))
    _one_line_error(
        r"tokenizer\.json: differs from the tokenizer the shards were made with",
        lambda: prepare_data(small_prepared, seq_len=16),
    )
    tokenizer.write_text("{}")
    _one_line_error(
        r"tokenizer\.json: cannot load the tokenizer", lambda: prepare_data(small_prepared, seq_len=16)
    )
    (small_prepared / "index.json").unlink()
    _one_line_error(
        r"index\.json: missing \(a prepared directory needs its index",
        lambda: prepare_data(small_prepared, seq_len=16),
    )


def test_failed_prepare_leaves_no_output_and_keeps_the_old_one(tmp_path: Path, ruth: str) -> None:
    source = tmp_path / "docs.jsonl"
    source.write_text(json.dumps({"text": ruth}) + "\n" + "{broken\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"docs\.jsonl:2: not valid JSON"):
        prepare_corpus(source, tmp_path / "out", vocab_size=300, workers=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl"]  # no OUT, no staging left
    good = tmp_path / "good.txt"
    good.write_text(ruth, encoding="utf-8")
    first = prepare_corpus(good, tmp_path / "out", vocab_size=300, workers=1)
    before = (first.directory / "index.json").read_text()
    with pytest.raises(DataError, match="already exists; pass --overwrite"):
        prepare_corpus(good, tmp_path / "out", vocab_size=300, workers=1)
    with pytest.raises(DataError, match="not valid JSON"):
        prepare_corpus(source, tmp_path / "out", vocab_size=300, workers=1, overwrite=True)
    assert (first.directory / "index.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl", "good.txt", "out"]
    again = prepare_corpus(good, tmp_path / "out", vocab_size=320, workers=1, overwrite=True)
    assert again.index.vocab_size == 320


# ----------------------------------------------------------------------------------------------
# the command line
# ----------------------------------------------------------------------------------------------


def test_cli_prepare_flags_are_prepare_corpus_keywords() -> None:
    """``data prepare`` passes its flags to prepare_corpus by name: every flag but the corpus, the
    output and --quiet is a keyword of it, and every keyword but use_cache/progress is a flag."""
    from steadylm.cli import _build_parser

    args = _build_parser("data").parse_args(["data", "prepare", "SRC", "OUT"])
    flags = set(vars(args)) - {"command", "plugin", "action", "src", "out", "quiet"}
    assert flags == prepare_module.PREPARE_KEYWORDS - {"use_cache", "progress"}


def test_cli_prepare_verify_and_one_line_errors(
    tmp_path: Path, ruth: str, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "ruth.txt"
    source.write_text(ruth, encoding="utf-8")
    out = tmp_path / "prepared"
    assert (
        cli_main(
            ["data", "prepare", str(source), str(out), "--vocab-size", "300", "--workers", "1", "--quiet"]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert printed.startswith("prepared 1 documents") and "uint16 tokens in 1 shard(s)" in printed
    assert cli_main(["data", "verify", str(out)]) == 0
    assert capsys.readouterr().out.startswith("ok: ")

    def fails(argv: list[str], match: str) -> None:
        assert cli_main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and re.search(match, err), err

    fails(["data", "prepare", str(source), str(out), "--quiet"], "already exists; pass --overwrite")
    fails(
        ["data", "prepare", str(tmp_path / "nope.txt"), str(tmp_path / "o")],
        r"data file not found: .*nope\.txt",
    )
    fails(
        ["data", "prepare", str(source), str(tmp_path / "o"), "--workers", "0"],
        "workers must be an integer >= 1",
    )
    fails(
        ["data", "prepare", str(source), str(tmp_path / "o"), "--vocab-size", "10"], "vocab_size must be in"
    )
    fails(
        ["data", "prepare", str(source), str(tmp_path / "o"), "--eos-token", "</s>"],
        "eos_token .* only applies with tokenizer",
    )
    (out / "tokens-00000.bin").write_bytes(b"\x00\x01")
    fails(["data", "verify", str(out)], r"tokens-00000\.bin: 2 bytes, the index says")


def test_cli_exit_code_in_a_real_process(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "steadylm.cli",
            "data",
            "prepare",
            str(tmp_path / "nope"),
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "data file not found" in done.stderr


# ----------------------------------------------------------------------------------------------
# bounded memory at scale (slow: about 200 MB of text through steadylm data prepare)
# ----------------------------------------------------------------------------------------------

# Peak RSS of the preparing process from its own VmHWM (ru_maxrss of an exec'd child would include
# the RSS of the forked parent, pytest, before the exec); the workers' from RUSAGE_CHILDREN (the
# largest worker; they are started from this small process).
_MEASURE = """
import json, re, resource, sys
from steadylm.cli import main
rc = main(sys.argv[1:])
hwm_kb = int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
print(json.dumps({"rc": rc, "main_peak_rss_mb": hwm_kb / 1024,
                  "worker_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def _generate_corpus(directory: Path, megabytes: int, seed: int = 0) -> int:
    """Text files of about 4 MB, each the KJV's verses in a seeded random order; returns bytes."""
    verses = [line for doc in load_kjv() for line in doc.splitlines() if line.strip()]
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True)
    written, number = 0, 0
    while written < megabytes * 1_000_000:
        text = "\n".join(verses[i] for i in rng.permutation(len(verses))) + "\n"
        (directory / f"part-{number:04d}.txt").write_text(text, encoding="utf-8")
        written += len(text.encode("utf-8"))
        number += 1
    return written


def _measured_prepare(source: Path, out: Path, tokenizer: Path, workers: int) -> dict:
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            _MEASURE,
            "data",
            "prepare",
            str(source),
            str(out),
            "--tokenizer",
            str(tokenizer),
            "--workers",
            str(workers),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=3600,
        check=True,
    )
    lines = done.stdout.strip().splitlines()
    figures = json.loads(lines[-1])
    figures["summary"] = lines[0]
    return figures


def test_prepare_peak_allocations_do_not_grow_with_the_corpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Default-suite version of the slow RSS test below: in-process (one worker), tracemalloc's peak
    of Python and numpy allocations while preparing 0.5 MB and 2 MB of text. The encoder keeps a
    bounded number of tasks in flight; the tasks are shrunk here (64 KiB, pieces of 16 KiB) so that
    both corpora are many tasks long, as 20 MB and 200 MB are for the real 1 MiB tasks."""
    import tracemalloc

    from steadylm.data import prepare as prepare_module

    monkeypatch.setattr(prepare_module, "_TASK_CHARS", 1 << 16)
    monkeypatch.setattr(tokenizer_module, "_PIECE_CHARS", 1 << 14)
    verses = [line for doc in load_kjv() for line in doc.splitlines() if line.strip()]
    tokenizer = tmp_path / "bpe-300.json"
    tokenizer_module.train_tokenizer(verses[:2000], 300).save(str(tokenizer))
    peaks, sizes = {}, {}
    for files in (1, 4):
        source = tmp_path / f"corpus-{files}"
        source.mkdir()
        rng = np.random.default_rng(files)
        for number in range(files):
            text = "\n".join(verses[i] for i in rng.permutation(len(verses))[:4000])[:500_000] + "\n"
            (source / f"part-{number}.txt").write_text(text, encoding="utf-8")
        sizes[files] = sum(p.stat().st_size for p in source.iterdir())
        tracemalloc.start()
        prepare_corpus(source, tmp_path / f"out-{files}", tokenizer=tokenizer, workers=1, use_cache=False,
                       shard_tokens=50_000)
        peaks[files] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    # Holding the corpus (its text or its tokens) would add at least the 1.5 MB of extra text; the
    # peak may grow by less than a third of that (0.5 MB: allocator noise and the tasks in flight).
    grown = peaks[4] - peaks[1]
    assert sizes[4] - sizes[1] > 1_450_000 and grown < 500_000, (peaks, sizes)


@pytest.mark.slow
def test_prepare_memory_does_not_grow_with_the_corpus(tmp_path: Path) -> None:
    tokenizer = tmp_path / "kjv-bpe-4096.json"
    tokenizer_module.train_tokenizer(load_kjv(), 4096).save(str(tokenizer))
    runs = {}
    for megabytes in (20, 200):
        source = tmp_path / f"corpus-{megabytes}mb"
        size = _generate_corpus(source, megabytes)
        runs[megabytes] = _measured_prepare(source, tmp_path / f"out-{megabytes}", tokenizer, workers=2)
        runs[megabytes]["corpus_mb"] = size / 1e6
        print(f"\n{size / 1e6:.0f} MB corpus: {runs[megabytes]}")
    small, big = runs[20], runs[200]
    assert small["rc"] == big["rc"] == 0
    # Ten times the corpus, the same memory (within 64 MB of allocator noise), per process.
    assert big["main_peak_rss_mb"] < small["main_peak_rss_mb"] + 64, runs
    assert big["worker_peak_rss_mb"] < small["worker_peak_rss_mb"] + 64, runs
    assert big["main_peak_rss_mb"] < 0.5 * big["corpus_mb"], runs
    data = prepare_data(tmp_path / "out-200", seq_len=128)
    assert data.train_tokens.shape[0] > 40_000_000 and data.train_batch(10_000, 16, 0)[0].shape == (16, 128)


def test_prepared_data_pickles_without_its_token_contents(small_prepared: Path) -> None:
    data = prepare_data(small_prepared, seq_len=16)
    expected = data.train_batch(3, 8, seed=1)  # maps the shards
    payload = pickle.dumps(data)
    assert b"memmap" not in payload  # the shards are reopened, not copied into the pickle
    clone = pickle.loads(payload)
    assert torch.equal(clone.train_batch(3, 8, seed=1)[0], expected[0])
    assert torch.equal(clone.val_batches(2, 8)[0][1], data.val_batches(2, 8)[0][1])
