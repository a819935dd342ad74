"""``steadylm data prepare SRC OUT``: tokenize a corpus of any size into memory-mapped token shards.

The corpus (a text file, a directory, JSON-lines, Parquet, or ``kjv`` for the embedded default) is
streamed document by document (:func:`steadylm.data.corpus.iter_documents`), cut into pieces of
about 256 K characters (:func:`steadylm.data.tokenizer.iter_pieces`), encoded in parallel by
``--workers`` processes and appended to shards in corpus order (the output does not depend on the
number of workers). At most ``2 * workers`` tasks of about a million characters are in flight, so
memory stays bounded whatever the corpus size. Documents end with the tokenizer's end-of-text id,
exactly as in the in-memory path, which is why a prepared directory gives the same batches.

The tokenizer is either the byte-level BPE that steadylm trains per corpus (``--vocab-size``; taken
from the tokenizer cache when this corpus was seen before, else trained on a streamed pass and
cached), or a Hugging Face ``tokenizer.json`` the user brings (``--tokenizer``, e.g. a Llama
tokenizer; ``--eos-token`` names its end-of-text token if ``tokenizer_config.json`` does not).
BPE training keeps the corpus's distinct words and their counts in memory (the ``tokenizers``
trainer), which grows with the vocabulary of the text rather than its length.

Everything is written into a staging directory next to ``OUT`` and renamed into place at the end,
so an interrupted run never leaves a half-written ``OUT``. ``steadylm data verify DIR`` re-checks a
prepared directory (index, sizes, SHA-256 of every shard, tokenizer).
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from tokenizers import Tokenizer

from steadylm.data.corpus import Document, describe_source, iter_documents
from steadylm.data.shard_format import (
    FORMAT_VERSION,
    INDEX_NAME,
    SHARD_DTYPES,
    TOKENIZER_NAME,
    PreparedIndex,
    ShardInfo,
    shard_name,
)
from steadylm.data.tokenizer import (
    DEFAULT_VOCAB_SIZE,
    EOS_TOKEN,
    CorpusHasher,
    fsync_path,
    cached_tokenizer,
    encode_pieces,
    iter_pieces,
    load_tokenizer_file,
    store_tokenizer,
    token_dtype,
    tokenizer_sha256,
    train_tokenizer,
    trained_tokenizer_settings,
    user_tokenizer_settings,
    validate_vocab_size,
)
from steadylm.errors import ConfigError, DataError

__all__ = ["DEFAULT_SHARD_TOKENS", "PrepareResult", "add_arguments", "prepare_corpus", "run"]

# 128 Mi tokens: 256 MiB per uint16 shard.
DEFAULT_SHARD_TOKENS = 1 << 27
# Characters of text per encoding task sent to a worker.
_TASK_CHARS = 1 << 20
_PROGRESS_EVERY_S = 10.0


@dataclass
class PrepareResult:
    """What :func:`prepare_corpus` wrote and how long it took."""

    directory: Path
    index: PreparedIndex
    num_documents: int
    num_bytes: int
    seconds: float  # in all
    tokenizer_seconds: float  # fingerprinting the corpus and training the BPE (0 with --tokenizer)
    tokenizer: str  # how the tokenizer was obtained

    @property
    def encode_seconds(self) -> float:
        return self.seconds - self.tokenizer_seconds

    @property
    def mb_per_s(self) -> float:
        """Encoding throughput: MB of UTF-8 text read, encoded and written per second."""
        return self.num_bytes / 1e6 / self.encode_seconds if self.encode_seconds > 0 else float("inf")


@dataclass
class _Counts:
    documents: int = 0
    bytes: int = 0
    tokens: int = 0
    started: float = field(default_factory=time.perf_counter)


def _documents(
    source: str | os.PathLike[str] | None,
    text_field: str,
    hasher: CorpusHasher | None,
    counts: _Counts | None,
) -> Iterator[Iterator[str]]:
    """The pieces of each document (consume them before the next document), feeding the corpus
    hasher and the counters on the way."""
    for doc in iter_documents(source, text_field=text_field):
        if hasher is not None:
            hasher.begin_document(doc.num_bytes)
        if counts is not None:
            counts.documents += 1
            counts.bytes += doc.num_bytes

        def pieces(doc: Document = doc) -> Iterator[str]:
            for piece in iter_pieces(doc.chunks()):
                if hasher is not None:
                    hasher.update(piece)
                yield piece

        yield pieces()


def _fingerprint(source: str | os.PathLike[str] | None, text_field: str, settings: dict) -> str:
    hasher = CorpusHasher(settings)
    for pieces in _documents(source, text_field, hasher, None):
        for _ in pieces:
            pass
    return hasher.hexdigest()


def _tasks(documents: Iterable[Iterator[str]]) -> Iterator[tuple[list[str], list[bool]]]:
    """Group pieces into encoding tasks of about ``_TASK_CHARS`` characters: ``(pieces, ends)``
    where ``ends[i]`` marks the last piece of a document (an end-of-text id follows it)."""
    pieces: list[str] = []
    ends: list[bool] = []
    chars = 0
    for doc_pieces in documents:
        for piece in doc_pieces:
            if chars >= _TASK_CHARS:
                yield pieces, ends
                pieces, ends, chars = [], [], 0
            pieces.append(piece)
            ends.append(False)
            chars += len(piece)
        ends[-1] = True  # iter_pieces yields at least one piece, still in this task
    if pieces:
        yield pieces, ends


# -- worker processes --------------------------------------------------------------------------
_WORKER: dict[str, object] = {}


def _init_worker(tokenizer_json: str, eos_id: int, dtype: str) -> None:
    # One thread per worker process: the parallelism comes from the processes.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER.update(tokenizer=Tokenizer.from_str(tokenizer_json), eos_id=eos_id, dtype=np.dtype(dtype))


def _encode_task(task: tuple[list[str], list[bool]]) -> np.ndarray:
    pieces, ends = task
    return encode_pieces(_WORKER["tokenizer"], pieces, ends, _WORKER["eos_id"], _WORKER["dtype"])  # type: ignore[arg-type]


def _encode(
    tasks: Iterator[tuple[list[str], list[bool]]],
    tokenizer: Tokenizer,
    eos_id: int,
    dtype: np.dtype,
    workers: int,
) -> Iterator[np.ndarray]:
    """Token arrays of the tasks, in order; at most ``2 * workers`` tasks in flight."""
    if workers == 1:
        for pieces, ends in tasks:
            yield encode_pieces(tokenizer, pieces, ends, eos_id, dtype)
        return
    context = multiprocessing.get_context("spawn")  # no fork of a process holding tokenizer threads
    with context.Pool(
        workers, initializer=_init_worker, initargs=(tokenizer.to_str(), eos_id, dtype.str)
    ) as pool:
        pending: deque = deque()
        for task in tasks:
            pending.append(pool.apply_async(_encode_task, (task,)))
            while len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# -- shard writing ------------------------------------------------------------------------------
class _ShardWriter:
    """Appends token arrays to ``tokens-NNNNN.bin`` files of ``shard_tokens`` tokens each,
    hashing and counting as it goes."""

    def __init__(self, directory: Path, dtype: np.dtype, shard_tokens: int) -> None:
        self.directory, self.dtype, self.shard_tokens = directory, dtype, shard_tokens
        self.shards: list[ShardInfo] = []
        self._handle = None
        self._count = 0
        self._digest = None

    def _open_next(self) -> None:
        self._handle = open(self.directory / shard_name(len(self.shards)), "wb")
        self._count, self._digest = 0, hashlib.sha256()

    def _close_current(self) -> None:
        if self._handle is None:
            return
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        name = shard_name(len(self.shards))
        self.shards.append(
            ShardInfo(name, self._count, self._count * self.dtype.itemsize, self._digest.hexdigest())
        )
        self._handle = None

    def write(self, tokens: np.ndarray) -> None:
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        while tokens.size:
            if self._handle is None:
                self._open_next()
            part = tokens[: self.shard_tokens - self._count]
            data = memoryview(part).cast("B")
            self._handle.write(data)
            self._digest.update(data)
            self._count += part.size
            tokens = tokens[part.size :]
            if self._count == self.shard_tokens:
                self._close_current()

    def close(self) -> list[ShardInfo]:
        self._close_current()
        return self.shards


def _install(staging: Path, out: Path) -> None:
    """Rename the finished staging directory to ``out`` (replacing an old ``out``)."""
    fsync_path(staging)
    if out.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rename(out, trash / out.name)
        os.rename(staging, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(staging, out)
    fsync_path(out.parent)


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def prepare_corpus(
    source: str | os.PathLike[str] | None,
    out: str | os.PathLike[str],
    *,
    tokenizer: str | os.PathLike[str] | None = None,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    eos_token: str | None = None,
    text_field: str = "text",
    workers: int = 1,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    overwrite: bool = False,
    use_cache: bool = True,
    progress: Callable[[str], None] | None = None,
) -> PrepareResult:
    """Tokenize ``source`` (``None`` or ``"kjv"``: the embedded corpus) into shards under ``out``.

    ``tokenizer``: a ``tokenizer.json`` to use; ``None`` trains (or reuses from the cache) the
    byte-level BPE of ``vocab_size`` that the in-memory path uses for the same corpus.
    """
    started = time.perf_counter()
    _check_int("workers", workers, 1)
    _check_int("shard_tokens", shard_tokens, 1)
    out_dir = Path(out).expanduser().resolve()
    if out_dir.exists() and not overwrite and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DataError(f"{out_dir} already exists; pass --overwrite to replace it")
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir} exists and is not a directory")

    if tokenizer is not None:
        tok, eos_id = load_tokenizer_file(tokenizer, eos_token)
        settings = user_tokenizer_settings(tok)
        expected = None
        how = f"{Path(tokenizer).expanduser().resolve()}"
    else:
        if eos_token is not None:
            raise ConfigError("eos_token (--eos-token) only applies with tokenizer (--tokenizer)")
        validate_vocab_size(vocab_size)
        settings = trained_tokenizer_settings(vocab_size)
        expected = _fingerprint(source, text_field, settings)
        tok = cached_tokenizer(expected) if use_cache else None
        how = "steadylm byte-level BPE from the tokenizer cache"
        if tok is None:
            if progress:
                progress("training the byte-level BPE tokenizer (one streamed pass)")
            pieces = (
                piece for doc_pieces in _documents(source, text_field, None, None) for piece in doc_pieces
            )
            tok = train_tokenizer((), vocab_size, pieces=pieces)
            how = "steadylm byte-level BPE trained on this corpus"
            if use_cache:
                store_tokenizer(
                    expected, tok, {"requested_vocab_size": vocab_size, "vocab_size": tok.get_vocab_size()}
                )
        eos_id = int(tok.token_to_id(EOS_TOKEN))
    vocab = tok.get_vocab_size(with_added_tokens=True)
    dtype = SHARD_DTYPES[token_dtype(vocab).name]
    tokenizer_seconds = time.perf_counter() - started
    counts = _Counts()

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        hasher = CorpusHasher(settings)
        writer = _ShardWriter(staging, dtype, shard_tokens)
        last_report = time.perf_counter()
        tasks = _tasks(_documents(source, text_field, hasher, counts))
        for tokens in _encode(tasks, tok, eos_id, dtype, workers):
            writer.write(tokens)
            counts.tokens += int(tokens.size)
            if progress and time.perf_counter() - last_report > _PROGRESS_EVERY_S:
                last_report = time.perf_counter()
                elapsed = last_report - counts.started
                progress(
                    f"{counts.bytes / 1e6:,.0f} MB read, {counts.tokens:,} tokens, "
                    f"{counts.bytes / 1e6 / elapsed:.1f} MB/s"
                )
        shards = writer.close()
        fingerprint = hasher.hexdigest()
        if expected is not None and fingerprint != expected:
            raise DataError(f"the corpus at {source} changed while it was being prepared; run again")
        if counts.tokens == 0:
            raise DataError(f"the corpus at {source} gives no tokens")
        (staging / TOKENIZER_NAME).write_text(tok.to_str(), encoding="utf-8")
        index = PreparedIndex(
            dtype=dtype.name,
            num_tokens=counts.tokens,
            shards=tuple(shards),
            vocab_size=vocab,
            eos_id=eos_id,
            fingerprint=fingerprint,
            tokenizer_sha256=tokenizer_sha256(tok),
            source={
                "description": describe_source(source),
                "documents": counts.documents,
                "bytes": counts.bytes,
                "text_field": text_field,
                "tokenizer": how,
            },
        )
        (staging / INDEX_NAME).write_text(json.dumps(index.to_json(), indent=2) + "\n", encoding="utf-8")
        for name in (TOKENIZER_NAME, INDEX_NAME):
            fsync_path(staging / name)
        _install(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    seconds = time.perf_counter() - started
    return PrepareResult(out_dir, index, counts.documents, counts.bytes, seconds, tokenizer_seconds, how)


# -- command line -------------------------------------------------------------------------------
#: The keyword-only parameters of :func:`prepare_corpus`. A ``data prepare`` flag whose argparse
#: destination is one of these names (``--vocab-size`` -> ``vocab_size``) is passed to it as is.
PREPARE_KEYWORDS = frozenset(
    name for name, p in inspect.signature(prepare_corpus).parameters.items() if p.kind is p.KEYWORD_ONLY
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    prepare = actions.add_parser(
        "prepare",
        help="tokenize a corpus into memory-mapped token shards for --data",
        description="Tokenize SRC (a text file, a directory, JSON-lines, Parquet, or 'kjv') into "
        "memory-mapped token shards plus index.json in OUT; pass OUT to --data.",
    )
    prepare.add_argument("src", metavar="SRC", help="corpus path, or 'kjv' for the embedded King James Bible")
    prepare.add_argument("out", metavar="OUT", help="output directory (written atomically)")
    prepare.add_argument(
        "--tokenizer",
        metavar="PATH",
        default=None,
        help="a Hugging Face tokenizer.json to use (default: train steadylm's byte-level BPE)",
    )
    prepare.add_argument(
        "--vocab-size",
        type=int,
        default=DEFAULT_VOCAB_SIZE,
        metavar="N",
        help=f"vocabulary size of the trained BPE (default {DEFAULT_VOCAB_SIZE}; ignored with --tokenizer)",
    )
    prepare.add_argument(
        "--eos-token",
        metavar="TOKEN",
        default=None,
        help="end-of-text token of --tokenizer (default: from tokenizer_config.json "
        "beside it, else <|endoftext|>, <|end_of_text|>, </s> or <eos>)",
    )
    prepare.add_argument(
        "--text-field",
        default="text",
        metavar="KEY",
        help="JSON-lines key / Parquet column holding the text (default: text)",
    )
    prepare.add_argument(
        "--workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        metavar="N",
        help="encoding processes (default: min(8, CPU count)); 1 encodes in this process",
    )
    prepare.add_argument(
        "--shard-tokens",
        type=int,
        default=DEFAULT_SHARD_TOKENS,
        metavar="N",
        help=f"tokens per shard file (default {DEFAULT_SHARD_TOKENS:,})",
    )
    prepare.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    prepare.add_argument("--quiet", action="store_true", help="no progress lines")
    verify = actions.add_parser(
        "verify",
        help="check a prepared directory: index, shard sizes and SHA-256, tokenizer",
        description="Check a prepared directory completely (reads every shard).",
    )
    verify.add_argument("path", metavar="DIR")


def run(args: argparse.Namespace) -> int:
    if args.action == "verify":
        from steadylm.data.shards import verify_prepared

        index = verify_prepared(args.path)
        print(
            f"ok: {index.num_tokens:,} tokens in {len(index.shards)} shard(s) of {index.dtype}, "
            f"vocab {index.vocab_size}, all SHA-256 match"
        )
        return 0

    def progress(message: str) -> None:
        print(f"[data prepare] {message}", file=sys.stderr, flush=True)

    flags = {name: value for name, value in vars(args).items() if name in PREPARE_KEYWORDS}
    result = prepare_corpus(args.src, args.out, progress=None if args.quiet else progress, **flags)
    index = result.index
    print(
        f"prepared {result.num_documents:,} documents ({result.num_bytes / 1e6:,.1f} MB) into "
        f"{index.num_tokens:,} {index.dtype} tokens in {len(index.shards)} shard(s) at {result.directory} "
        f"in {result.seconds:.1f} s (tokenizer {result.tokenizer_seconds:.1f} s, encoding "
        f"{result.encode_seconds:.1f} s = {result.mb_per_s:.2f} MB/s with {args.workers} worker(s)); "
        f"tokenizer: {result.tokenizer}, vocab {index.vocab_size}, eos id {index.eos_id}; "
        f"format v{FORMAT_VERSION}"
    )
    return 0
