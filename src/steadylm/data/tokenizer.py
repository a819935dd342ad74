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
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from steadylm.errors import ConfigError, DataError

__all__ = [
    "DEFAULT_VOCAB_SIZE",
    "EOS_TOKEN",
    "MAX_VOCAB_SIZE",
    "MIN_VOCAB_SIZE",
    "CorpusHasher",
    "EncodedCorpus",
    "cache_root",
    "cached_tokenizer",
    "corpus_fingerprint",
    "docs_fingerprint",
    "encode_corpus",
    "encode_documents",
    "encode_pieces",
    "fsync_path",
    "iter_pieces",
    "load_tokenizer_file",
    "store_tokenizer",
    "token_dtype",
    "tokenizer_sha256",
    "train_tokenizer",
    "trained_tokenizer_settings",
    "user_tokenizer_settings",
]

EOS_TOKEN = "<|endoftext|>"
DEFAULT_VOCAB_SIZE = 4096
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
        raise ConfigError(f"vocab_size must be in [{MIN_VOCAB_SIZE}, {MAX_VOCAB_SIZE}], got {vocab_size}")
    return vocab_size


class CorpusHasher:
    """Incremental form of :func:`corpus_fingerprint`: ``begin_document(num_bytes)``, then the
    document's text in any number of ``update`` calls, for each document in order."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self._digest = hashlib.sha256()
        self._digest.update(json.dumps(settings, sort_keys=True).encode())

    def begin_document(self, num_bytes: int) -> None:
        self._digest.update(num_bytes.to_bytes(8, "little"))

    def update(self, text: str) -> None:
        self._digest.update(text.encode("utf-8"))

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def trained_tokenizer_settings(vocab_size: int) -> dict[str, Any]:
    """What, besides the corpus, determines the trained tokenizer (part of the fingerprint)."""
    return {**_TOKENIZER_SETTINGS, "vocab_size": vocab_size}


def user_tokenizer_settings(tokenizer: Tokenizer) -> dict[str, Any]:
    """Fingerprint settings for a user-supplied tokenizer: its identity instead of BPE settings."""
    return {"kind": "tokenizer.json", "sha256": tokenizer_sha256(tokenizer)}


def docs_fingerprint(docs: Iterable[str], settings: dict[str, Any]) -> str:
    """SHA-256 of the documents (with their boundaries) and the tokenizer settings."""
    hasher = CorpusHasher(settings)
    for doc in docs:
        hasher.begin_document(len(doc.encode("utf-8")))
        hasher.update(doc)
    return hasher.hexdigest()


def corpus_fingerprint(docs: Sequence[str], vocab_size: int) -> str:
    """SHA-256 of the documents (with their boundaries), the vocabulary size and the settings."""
    return docs_fingerprint(docs, trained_tokenizer_settings(vocab_size))


def iter_pieces(chunks: Iterable[str]) -> Iterator[str]:
    """Cut a document, given as consecutive chunks of text, at line breaks into pieces of roughly
    ``_PIECE_CHARS`` characters. The pieces depend only on the text, not on how it is chunked."""
    buffer = ""
    for chunk in chunks:
        buffer += chunk
        while len(buffer) > _PIECE_CHARS:
            cut = buffer.rfind("\n", _PIECE_CHARS // 2, _PIECE_CHARS)
            end = cut + 1 if cut >= 0 else _PIECE_CHARS
            yield buffer[:end]
            buffer = buffer[end:]
    yield buffer


def _pieces(doc: str) -> Iterator[str]:
    return iter_pieces((doc,))


def train_tokenizer(
    docs: Sequence[str] | Iterable[str], vocab_size: int, *, pieces: Iterable[str] | None = None
) -> Tokenizer:
    """Train a byte-level BPE tokenizer on ``docs`` (deterministic for the same input).

    ``pieces`` (instead of ``docs``, which is then ignored) streams already-cut pieces
    (:func:`iter_pieces`), so a corpus larger than memory can be trained on.
    """
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
    if pieces is None:
        pieces = (piece for doc in docs for piece in _pieces(doc))
    tokenizer.train_from_iterator(pieces, trainer=trainer)
    return tokenizer


def token_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` when every id fits (vocab_size <= 65536), else ``uint32``."""
    return np.dtype(np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32)


def encode_pieces(
    tokenizer: Tokenizer, pieces: Sequence[str], ends: Sequence[bool], eos_id: int, dtype: np.dtype
) -> np.ndarray:
    """Encode ``pieces`` into one token array, with ``eos_id`` after each piece whose ``ends`` flag
    says it is the last piece of its document."""
    parts: list[np.ndarray] = []
    eos = np.array([eos_id], dtype=dtype)
    # encode_batch_fast (tokenizers >= 0.21) skips the character offsets: same ids, about 2x faster.
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    for encoding, end in zip(encode(list(pieces), add_special_tokens=False), ends, strict=True):
        parts.append(np.asarray(encoding.ids, dtype=dtype))
        if end:
            parts.append(eos)
    return np.concatenate(parts) if parts else np.empty(0, dtype=dtype)


def encode_documents(tokenizer: Tokenizer, docs: Sequence[str], eos_id: int | None = None) -> np.ndarray:
    """The documents as one token stream, each followed by ``eos_id`` (default: the id of
    ``EOS_TOKEN``); ``uint16`` when the vocabulary fits, else ``int32``."""
    eos_id = tokenizer.token_to_id(EOS_TOKEN) if eos_id is None else eos_id
    dtype = np.uint16 if tokenizer.get_vocab_size() <= np.iinfo(np.uint16).max + 1 else np.int32
    parts: list[np.ndarray] = []
    for doc in docs:
        pieces = list(_pieces(doc))
        parts.append(encode_pieces(tokenizer, pieces, [False] * (len(pieces) - 1) + [True], eos_id, dtype))
    return np.concatenate(parts)


def tokenizer_sha256(tokenizer: Tokenizer) -> str:
    """SHA-256 of the tokenizer's serialised form (its identity in fingerprints and indexes)."""
    return hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()


# End-of-text tokens looked for, in this order, in a tokenizer.json without a tokenizer_config.json.
_EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>")


def load_tokenizer_file(path: str | os.PathLike[str], eos_token: str | None = None) -> tuple[Tokenizer, int]:
    """Load a Hugging Face ``tokenizer.json`` and find its end-of-text id: ``eos_token`` if given,
    else ``eos_token`` of a ``tokenizer_config.json`` beside it, else the first known EOS token
    (``<|endoftext|>``, ``<|end_of_text|>``, ``</s>``, ``<eos>``) in its vocabulary."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"tokenizer file not found: {file}")
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as err:  # noqa: BLE001 - tokenizers raises a bare Exception on bad files
        raise DataError(f"{file} is not a readable tokenizer.json ({str(err).splitlines()[0]})") from err
    candidates: tuple[str, ...] = _EOS_CANDIDATES
    if eos_token is not None:
        candidates = (eos_token,)
    else:
        config = file.parent / "tokenizer_config.json"
        if config.is_file():
            try:
                value = json.loads(config.read_text(encoding="utf-8")).get("eos_token")
            except (OSError, ValueError, AttributeError) as err:
                raise DataError(f"cannot read {config}: {err}") from err
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                candidates = (value,)
    for token in candidates:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return tokenizer, int(token_id)
    raise DataError(
        f"{file}: no end-of-text token among {', '.join(candidates)} in its vocabulary; "
        "name it with --eos-token"
    )


@dataclass(frozen=True)
class EncodedCorpus:
    """A trained tokenizer and the corpus as one token stream (documents end with EOS)."""

    tokenizer: Tokenizer
    tokens: np.ndarray  # 1-D, uint16 when the vocabulary fits, else int32
    fingerprint: str
    cache_dir: Path | None  # where it is cached, None if caching was disabled
    from_cache: bool
    eos: int | None = None  # end-of-text id of a user tokenizer; None: the id of EOS_TOKEN

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    @property
    def eos_id(self) -> int:
        return int(self.tokenizer.token_to_id(EOS_TOKEN)) if self.eos is None else self.eos


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


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (after a rename) by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit_entry(root: Path, entry: Path, files: dict[str, Callable[[Path], None]]) -> None:
    """Write a cache entry atomically: each ``files[name](path)`` writes one file into a staging
    directory, every file is fsynced, and the directory is renamed into place (an entry another
    process stored first is equivalent, and kept)."""
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp-", dir=root))
    try:
        for name, write in files.items():
            write(staging / name)
        for name in files:
            fsync_path(staging / name)
        try:
            os.rename(staging, entry)
        except OSError:
            if not entry.is_dir():
                raise
        else:
            fsync_path(root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _save_npy(tokens: np.ndarray) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        with open(path, "wb") as handle:
            np.save(handle, tokens, allow_pickle=False)

    return write


def _store_entry(root: Path, entry: Path, tokenizer: Tokenizer, tokens: np.ndarray, meta: dict) -> None:
    _commit_entry(root, entry, {
        "tokenizer.json": lambda path: tokenizer.save(str(path)),
        "tokens.npy": _save_npy(tokens),
        "meta.json": lambda path: path.write_text(json.dumps(meta, indent=2, sort_keys=True)),
    })


def cached_tokenizer(fingerprint: str) -> Tokenizer | None:
    """The cached trained tokenizer for a corpus fingerprint (from an :func:`encode_corpus` entry or
    one stored by :func:`store_tokenizer`), or ``None``."""
    root = cache_root()
    for entry in (root / "tokenized" / fingerprint[:32], root / "tokenizers" / fingerprint[:32]):
        try:
            meta = json.loads((entry / "meta.json").read_text())
            if meta.get("fingerprint") == fingerprint:
                return Tokenizer.from_file(str(entry / "tokenizer.json"))
        except Exception:  # noqa: BLE001 - missing or unreadable: not cached
            continue
    return None


def store_tokenizer(fingerprint: str, tokenizer: Tokenizer, meta: dict[str, Any]) -> None:
    """Cache a trained tokenizer (without the token stream) under its corpus fingerprint; a cache
    that cannot be written only costs re-training next time."""
    root = cache_root() / "tokenizers"
    entry = root / fingerprint[:32]
    try:
        _commit_entry(root, entry, {
            "tokenizer.json": lambda path: tokenizer.save(str(path)),
            "meta.json": lambda path: path.write_text(json.dumps({**meta, "fingerprint": fingerprint},
                                                                 indent=2, sort_keys=True)),
        })
    except OSError as err:
        import warnings

        warnings.warn(f"steadylm: could not write the tokenizer cache at {root}: {err}", stacklevel=2)


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

    tokenizer = (cached_tokenizer(fingerprint) if use_cache else None) or train_tokenizer(docs, vocab_size)
    tokens = encode_documents(tokenizer, docs)
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
