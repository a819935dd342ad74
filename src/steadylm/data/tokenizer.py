"""Byte-level BPE tokenizer (Hugging Face ``tokenizers``), trained once per corpus and cached.

The cache entry for a corpus holds the trained tokenizer and the whole corpus encoded as one token
stream (documents separated by the end-of-text token), so a second run with the same corpus and
settings starts without re-training or re-encoding. The key is a SHA-256 of the corpus content,
the vocabulary size and the tokenizer settings; entries are written to a temporary directory and
renamed into place, so a crash never leaves a half-written entry behind.

Cache location: ``$STEADYLM_CACHE``, else ``$XDG_CACHE_HOME/steadylm``, else ``~/.cache/steadylm``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from steadylm.errors import ConfigError, DataError

__all__ = [
    "EOS_TOKEN",
    "MAX_VOCAB_SIZE",
    "MIN_VOCAB_SIZE",
    "EncodedCorpus",
    "cache_root",
    "corpus_fingerprint",
    "encode_corpus",
    "train_tokenizer",
]

EOS_TOKEN = "<|endoftext|>"
# 256 byte symbols + the end-of-text token is the smallest byte-level vocabulary.
MIN_VOCAB_SIZE = 257
MAX_VOCAB_SIZE = 1 << 20
# Bump when anything below changes the trained tokenizer or the encoding, to invalidate caches.
_TOKENIZER_SETTINGS = {"kind": "byte-level-bpe", "version": 1, "min_frequency": 2, "eos": EOS_TOKEN}
# Long documents are cut at line breaks into pieces of about this many characters, so that
# training and encoding run in parallel and no single string is enormous.
_PIECE_CHARS = 1 << 18


def cache_root() -> Path:
    """The steadylm cache directory (not created here)."""
    explicit = os.environ.get("STEADYLM_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "steadylm"


def validate_vocab_size(vocab_size: int) -> int:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise ConfigError(f"vocab_size must be an integer, got {vocab_size!r}")
    if not MIN_VOCAB_SIZE <= vocab_size <= MAX_VOCAB_SIZE:
        raise ConfigError(
            f"vocab_size must be in [{MIN_VOCAB_SIZE}, {MAX_VOCAB_SIZE}], got {vocab_size}"
        )
    return vocab_size


def corpus_fingerprint(docs: Sequence[str], vocab_size: int) -> str:
    """SHA-256 of the documents (with their boundaries), the vocabulary size and the settings."""
    digest = hashlib.sha256()
    digest.update(json.dumps({**_TOKENIZER_SETTINGS, "vocab_size": vocab_size}, sort_keys=True).encode())
    for doc in docs:
        data = doc.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def _pieces(doc: str) -> Iterator[str]:
    """Cut a document at line breaks into pieces of roughly ``_PIECE_CHARS`` characters."""
    start = 0
    while len(doc) - start > _PIECE_CHARS:
        cut = doc.rfind("\n", start + _PIECE_CHARS // 2, start + _PIECE_CHARS)
        end = cut + 1 if cut >= 0 else start + _PIECE_CHARS
        yield doc[start:end]
        start = end
    yield doc[start:]


def train_tokenizer(docs: Sequence[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE tokenizer on ``docs`` (deterministic for the same input)."""
    validate_vocab_size(vocab_size)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=_TOKENIZER_SETTINGS["min_frequency"],
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator((piece for doc in docs for piece in _pieces(doc)), trainer=trainer)
    return tokenizer


def _encode_stream(tokenizer: Tokenizer, docs: Sequence[str]) -> np.ndarray:
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    dtype = np.uint16 if tokenizer.get_vocab_size() <= np.iinfo(np.uint16).max + 1 else np.int32
    parts: list[np.ndarray] = []
    eos = np.array([eos_id], dtype=dtype)
    for doc in docs:
        pieces = list(_pieces(doc))
        for encoding in tokenizer.encode_batch(pieces, add_special_tokens=False):
            parts.append(np.asarray(encoding.ids, dtype=dtype))
        parts.append(eos)
    return np.concatenate(parts)


@dataclass(frozen=True)
class EncodedCorpus:
    """A trained tokenizer and the corpus as one token stream (documents end with EOS)."""

    tokenizer: Tokenizer
    tokens: np.ndarray  # 1-D, uint16 when the vocabulary fits, else int32
    fingerprint: str
    cache_dir: Path | None  # where it is cached, None if caching was disabled
    from_cache: bool

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    @property
    def eos_id(self) -> int:
        return int(self.tokenizer.token_to_id(EOS_TOKEN))


def _load_entry(entry: Path, fingerprint: str) -> EncodedCorpus | None:
    try:
        meta = json.loads((entry / "meta.json").read_text())
        if meta.get("fingerprint") != fingerprint:
            return None
        tokenizer = Tokenizer.from_file(str(entry / "tokenizer.json"))
        tokens = np.load(entry / "tokens.npy", allow_pickle=False)
        if tokens.ndim != 1 or tokens.shape[0] != meta.get("num_tokens"):
            return None
    except Exception:  # noqa: BLE001 - an unreadable entry of any kind is rebuilt, never trusted
        return None
    return EncodedCorpus(tokenizer, tokens, fingerprint, entry, from_cache=True)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _store_entry(root: Path, entry: Path, tokenizer: Tokenizer, tokens: np.ndarray, meta: dict) -> None:
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp-", dir=root))
    try:
        tokenizer.save(str(staging / "tokenizer.json"))
        with open(staging / "tokens.npy", "wb") as handle:
            np.save(handle, tokens, allow_pickle=False)
        (staging / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        for name in ("tokenizer.json", "tokens.npy", "meta.json"):
            _fsync_path(staging / name)
        try:
            os.rename(staging, entry)
        except OSError:
            # Another process stored the same entry first; theirs is equivalent.
            if not entry.is_dir():
                raise
        else:
            _fsync_path(root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def encode_corpus(docs: Sequence[str], vocab_size: int, *, use_cache: bool = True) -> EncodedCorpus:
    """Train (or load from the cache) the tokenizer for ``docs`` and the encoded token stream."""
    validate_vocab_size(vocab_size)
    if not docs:
        raise DataError("the corpus contains no documents")
    fingerprint = corpus_fingerprint(docs, vocab_size)
    root = cache_root() / "tokenized"
    entry = root / fingerprint[:32]
    if use_cache and entry.is_dir():
        cached = _load_entry(entry, fingerprint)
        if cached is not None:
            return cached
        shutil.rmtree(entry, ignore_errors=True)  # stale or damaged: rebuild below

    tokenizer = train_tokenizer(docs, vocab_size)
    tokens = _encode_stream(tokenizer, docs)
    if not use_cache:
        return EncodedCorpus(tokenizer, tokens, fingerprint, None, from_cache=False)
    meta = {
        "fingerprint": fingerprint,
        "requested_vocab_size": vocab_size,
        "vocab_size": tokenizer.get_vocab_size(),
        "num_docs": len(docs),
        "num_chars": sum(len(doc) for doc in docs),
        "num_tokens": int(tokens.shape[0]),
        "settings": _TOKENIZER_SETTINGS,
    }
    try:
        _store_entry(root, entry, tokenizer, tokens, meta)
    except OSError as err:
        # A read-only or full cache must not stop training; the run just re-tokenizes next time.
        import warnings

        warnings.warn(f"steadylm: could not write the tokenizer cache at {root}: {err}", stacklevel=2)
        return EncodedCorpus(tokenizer, tokens, fingerprint, None, from_cache=False)
    return EncodedCorpus(tokenizer, tokens, fingerprint, entry, from_cache=False)
