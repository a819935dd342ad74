"""Memory-mapped token shards: the on-disk format of ``steadylm data prepare`` and its reader.

A prepared directory (format: :mod:`steadylm.data.shard_format`) holds

* ``tokens-00000.bin``, ``tokens-00001.bin``, ...: the corpus as one token stream (documents
  separated by the end-of-text id), cut into shards of raw little-endian ``uint16`` (vocabulary
  <= 65536) or ``uint32`` ids;
* ``tokenizer.json``: the tokenizer that produced them (Hugging Face ``tokenizers`` format);
* ``index.json``: format and version, dtype, every shard's file name, token count, byte size and
  SHA-256, the tokenizer's SHA-256, vocabulary size, end-of-text id, the data fingerprint and a
  description of the source.

:func:`open_prepared` checks the index and every shard's size on open (and the SHA-256 of every
shard when the whole set is at most ``AUTO_VERIFY_BYTES``, or when asked), then reads training
windows through ``np.memmap``: memory holds the windows of the current batch, never the corpus.
Each window read also checks that its ids are below the vocabulary size, so a damaged shard
raises :class:`~steadylm.errors.DataError` naming the file instead of feeding garbage to a model.

The train/validation split and the batch order are those of the in-memory
:class:`~steadylm.data.TokenData` (:func:`~steadylm.data.dataset.split_blocks`,
:class:`~steadylm.data.dataset.PackedBatches`) applied to the same stream, so a prepared directory
gives exactly the batches that the same corpus and tokenizer give in memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tokenizers import Tokenizer

from steadylm.data.packing import PackedBatches, split_blocks
from steadylm.data.shard_format import (
    AUTO_VERIFY_BYTES,
    INDEX_NAME,
    SHARD_DTYPES,
    TOKENIZER_NAME,
    PreparedIndex,
    file_sha256,
    is_prepared_dir,
)
from steadylm.data.tokenizer import tokenizer_sha256
from steadylm.errors import DataError

__all__ = [
    "ShardSet",
    "ShardedTokenData",
    "TokenStream",
    "is_prepared_dir",
    "open_prepared",
    "verify_prepared",
]


class ShardSet:
    """The shards of a prepared directory as one read-only token stream, memory-mapped lazily."""

    def __init__(self, directory: Path, index: PreparedIndex) -> None:
        self.directory = directory
        self.index = index
        self.dtype = SHARD_DTYPES[index.dtype]
        self.paths = [directory / shard.file for shard in index.shards]
        counts = np.array([shard.tokens for shard in index.shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._maps: dict[int, np.memmap] = {}

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getstate__(self) -> dict[str, Any]:
        # Pickled (e.g. handed to spawned ranks) without the maps: they are reopened on first read
        # instead of their contents being copied into the pickle.
        return {**self.__dict__, "_maps": {}}

    def check_sizes(self) -> None:
        for path, shard in zip(self.paths, self.index.shards, strict=True):
            try:
                size = path.stat().st_size
            except FileNotFoundError as err:
                raise DataError(f"{path}: shard missing (listed in {INDEX_NAME})") from err
            if size != shard.bytes:
                raise DataError(
                    f"{path}: {size} bytes, the index says {shard.bytes} (truncated or replaced; "
                    "re-run steadylm data prepare)"
                )

    def check_hashes(self) -> None:
        for path, shard in zip(self.paths, self.index.shards, strict=True):
            if file_sha256(path) != shard.sha256:
                raise DataError(
                    f"{path}: SHA-256 differs from the index "
                    "(the shard is corrupt; re-run steadylm data prepare)"
                )

    def _map(self, number: int) -> np.memmap | np.ndarray:
        mapped = self._maps.get(number)
        if mapped is None:
            if self.index.shards[number].tokens == 0:
                return np.empty(0, dtype=self.dtype)
            try:
                mapped = np.memmap(self.paths[number], dtype=self.dtype, mode="r")
            except (OSError, ValueError) as err:
                raise DataError(f"{self.paths[number]}: cannot map the shard ({err})") from err
            if mapped.shape[0] != self.index.shards[number].tokens:
                raise DataError(
                    f"{self.paths[number]}: {mapped.shape[0]} tokens, "
                    f"the index says {self.index.shards[number].tokens}"
                )
            self._maps[number] = mapped
        return mapped

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` of the whole stream (a copy), each checked against the
        vocabulary size."""
        if not 0 <= start <= stop <= len(self):
            raise IndexError(f"token range [{start}, {stop}) outside [0, {len(self)})")
        return _read_ranges(self.starts, start, stop, self._read_shard, self.dtype)

    def _read_shard(self, number: int, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` of the whole stream, all inside shard ``number``, checked
        against the vocabulary size."""
        shard_start = int(self.starts[number])
        part = np.asarray(self._map(number)[start - shard_start : stop - shard_start])
        if part.size and int(part.max()) >= self.index.vocab_size:
            bad = int(np.argmax(part >= self.index.vocab_size))
            raise DataError(
                f"{self.paths[number]}: token id {int(part[bad])} at token "
                f"{start - shard_start + bad} is >= vocab_size {self.index.vocab_size} "
                "(the shard is corrupt; re-run steadylm data prepare)"
            )
        return part


def _read_ranges(
    offsets: np.ndarray, start: int, stop: int, read: Callable[[int, int, int], np.ndarray], dtype: Any
) -> np.ndarray:
    """Tokens ``[start, stop)`` of a stream made of consecutive ranges (range ``i`` is
    ``[offsets[i], offsets[i + 1])``): ``read(i, lo, hi)`` for each range's part, joined."""
    parts = []
    number = int(np.searchsorted(offsets, start, side="right")) - 1
    position = start
    while position < stop:
        end = min(stop, int(offsets[number + 1]))
        if end > position:
            parts.append(read(number, position, end))
            position = end
        number += 1
    return parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else np.empty(0, dtype)


class TokenStream:
    """A virtual 1-D token array: consecutive ``[start, stop)`` ranges of a :class:`ShardSet`
    (the training or validation blocks of the split), read on demand."""

    def __init__(self, shards: ShardSet, ranges: list[tuple[int, int]]) -> None:
        self.shards = shards
        self.ranges = ranges
        lengths = np.array([stop - start for start, stop in ranges], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` of this stream."""
        if not 0 <= start <= stop <= len(self):
            raise IndexError(f"token range [{start}, {stop}) outside [0, {len(self)})")
        return _read_ranges(self.offsets, start, stop, self._read_block, self.shards.dtype)

    def _read_block(self, block: int, start: int, stop: int) -> np.ndarray:
        base = self.ranges[block][0] - int(self.offsets[block])
        return self.shards.read(base + start, base + stop)

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("TokenStream supports contiguous slices only")
        start, stop, _ = key.indices(len(self))
        return self.read(start, max(start, stop))


@dataclass(frozen=True)
class ShardedTokenData(PackedBatches):
    """A prepared directory as training data: the interface of :class:`~steadylm.data.TokenData`
    (``train_batch``, ``val_batches``, ``seq_len``, ``vocab_size``, ``tokenizer``, ``eos_id``,
    ``describe()``, ``fingerprint``, ...), reading each batch's windows from memory-mapped shards.

    ``train_tokens`` / ``val_tokens`` are :class:`TokenStream` objects (``.shape``, slicing)."""

    train_tokens: TokenStream
    val_tokens: TokenStream
    num_shards: int = 0
    dtype: str = ""
    directory: Path = field(kw_only=True)

    def _stream_length(self, split: str) -> int:
        return len(self.train_tokens if split == "train" else self.val_tokens)

    def _rows(self, split: str, indices: torch.Tensor) -> torch.Tensor:
        stream = self.train_tokens if split == "train" else self.val_tokens
        width = self.seq_len + 1
        rows = np.empty((int(indices.shape[0]), width), dtype=np.int64)
        for row, index in enumerate(indices.tolist()):
            start = index * self.seq_len
            rows[row] = stream.read(start, start + width)
        return torch.from_numpy(rows)

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable summary (recorded in each run's ``config.json``)."""
        return {
            "source": self.source,
            "prepared": str(self.directory),
            "fingerprint": self.fingerprint,
            "vocab_size": self.vocab_size,
            "seq_len": self.seq_len,
            "val_fraction": self.val_fraction,
            "split_seed": self.split_seed,
            "train_tokens": len(self.train_tokens),
            "val_tokens": len(self.val_tokens),
            "train_sequences": self.num_train_sequences,
            "val_sequences": self.num_val_sequences,
            "shards": self.num_shards,
            "dtype": self.dtype,
        }


def _open(directory: Path, verify: bool | None) -> tuple[PreparedIndex, ShardSet, Tokenizer]:
    index = PreparedIndex.read(directory / INDEX_NAME)
    shards = ShardSet(directory, index)
    shards.check_sizes()
    total_bytes = sum(shard.bytes for shard in index.shards)
    if verify or (verify is None and total_bytes <= AUTO_VERIFY_BYTES):
        shards.check_hashes()
    tokenizer_path = directory / TOKENIZER_NAME
    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_path))
    except Exception as err:  # noqa: BLE001 - tokenizers raises a bare Exception
        raise DataError(f"{tokenizer_path}: cannot load the tokenizer ({str(err).splitlines()[0]})") from err
    if tokenizer_sha256(tokenizer) != index.tokenizer_sha256:
        raise DataError(
            f"{tokenizer_path}: differs from the tokenizer the shards were made with (SHA-256 mismatch)"
        )
    return index, shards, tokenizer


def verify_prepared(path: str | os.PathLike[str]) -> PreparedIndex:
    """Check a prepared directory completely: index, sizes, every shard's SHA-256, the tokenizer."""
    index, _, _ = _open(Path(path).expanduser(), verify=True)
    return index


def open_prepared(
    path: str | os.PathLike[str],
    seq_len: int = 128,
    val_fraction: float = 0.05,
    seed: int = 0,
    *,
    verify: bool | None = None,
) -> ShardedTokenData:
    """Open a prepared directory as training data, split and packed like the in-memory path.

    ``verify``: check every shard's SHA-256 on open (``None``: only when the shards total at most
    ``AUTO_VERIFY_BYTES``); sizes are always checked, and token ids at every read.
    """
    directory = Path(path).expanduser().resolve()
    index, shards, tokenizer = _open(directory, verify)
    edges, is_val = split_blocks(index.num_tokens, seq_len, val_fraction, seed)
    blocks = range(len(is_val))
    train = [(int(edges[b]), int(edges[b + 1])) for b in blocks if not is_val[b]]
    val = [(int(edges[b]), int(edges[b + 1])) for b in blocks if is_val[b]]
    return ShardedTokenData(
        directory=directory,
        train_tokens=TokenStream(shards, train),
        val_tokens=TokenStream(shards, val),
        seq_len=seq_len,
        vocab_size=index.vocab_size,
        tokenizer=tokenizer,
        eos_id=index.eos_id,
        source=str(index.source.get("description", "")),
        fingerprint=index.fingerprint,
        val_fraction=val_fraction,
        split_seed=seed,
        num_shards=len(index.shards),
        dtype=index.dtype,
    )
