"""The on-disk format of a prepared directory (``steadylm data prepare``): names, the index and
its validation. Free of PyTorch so the preparing process and its workers stay small; the reader is
:mod:`steadylm.data.shards`."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from steadylm.errors import DataError, check_choice

__all__ = [
    "AUTO_VERIFY_BYTES",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "INDEX_NAME",
    "SHARD_DTYPES",
    "TOKENIZER_NAME",
    "PreparedIndex",
    "ShardInfo",
    "file_sha256",
    "is_prepared_dir",
    "shard_name",
]

FORMAT_NAME = "steadylm-token-shards"
FORMAT_VERSION = 1
INDEX_NAME = "index.json"
TOKENIZER_NAME = "tokenizer.json"
SHARD_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
# Below this total shard size, opening a prepared directory also checks every shard's SHA-256.
AUTO_VERIFY_BYTES = 512 << 20
_HASH_BLOCK = 16 << 20


def shard_name(number: int) -> str:
    return f"tokens-{number:05d}.bin"


def is_prepared_dir(path: str | os.PathLike[str] | None) -> bool:
    """Whether ``path`` is a directory written by ``steadylm data prepare`` (it has an index, or
    token shards whose index is missing, which :func:`open_prepared` then reports)."""
    if path is None:
        return False
    directory = Path(path).expanduser()
    if not directory.is_dir():
        return False
    return (directory / INDEX_NAME).exists() or any(directory.glob("tokens-*.bin"))


@dataclass(frozen=True)
class ShardInfo:
    """One shard as the index records it."""

    file: str
    tokens: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class PreparedIndex:
    """The parsed, validated ``index.json`` of a prepared directory."""

    dtype: str
    num_tokens: int
    shards: tuple[ShardInfo, ...]
    vocab_size: int
    eos_id: int
    fingerprint: str
    tokenizer_sha256: str
    source: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "dtype": self.dtype,
            "num_tokens": self.num_tokens,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "fingerprint": self.fingerprint,
            "tokenizer": {"file": TOKENIZER_NAME, "sha256": self.tokenizer_sha256},
            "source": self.source,
            "shards": [vars(shard) for shard in self.shards],
        }

    @classmethod
    def read(cls, path: Path) -> PreparedIndex:
        """Parse and check ``path``; every problem is a one-line :class:`DataError` naming it."""
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as err:
            raise DataError(
                f"{path}: missing (a prepared directory needs its index; re-run steadylm data prepare)"
            ) from err
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(f"cannot read {path}: {err}") from err
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path}: not valid JSON ({err.msg} at line {err.lineno}); the index is damaged"
            ) from err
        if not isinstance(raw, dict):
            raise DataError(f"{path}: expected a JSON object")
        if raw.get("format") != FORMAT_NAME:
            raise DataError(f"{path}: not a steadylm token-shard index (format {raw.get('format')!r})")
        if raw.get("version") != FORMAT_VERSION:
            raise DataError(
                f"{path}: format version {raw.get('version')!r} is not supported (this steadylm reads "
                f"version {FORMAT_VERSION}); re-run steadylm data prepare"
            )

        def need(container: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str = "") -> Any:
            if key not in container:
                raise DataError(f"{path}: missing key {where}{key!r}")
            value = container[key]
            if not isinstance(value, kind) or isinstance(value, bool):
                raise DataError(f"{path}: key {where}{key!r} has the wrong type ({type(value).__name__})")
            return value

        dtype = need(raw, "dtype", str)
        check_choice(f"{path}: dtype", dtype, SHARD_DTYPES, error=DataError)
        vocab_size = need(raw, "vocab_size", int)
        eos_id = need(raw, "eos_id", int)
        if vocab_size < 1 or vocab_size > np.iinfo(SHARD_DTYPES[dtype]).max + 1:
            raise DataError(f"{path}: vocab_size {vocab_size} does not fit dtype {dtype}")
        if not 0 <= eos_id < vocab_size:
            raise DataError(f"{path}: eos_id {eos_id} is outside [0, vocab_size={vocab_size})")
        tokenizer = need(raw, "tokenizer", dict)
        shards = []
        for number, entry in enumerate(need(raw, "shards", list)):
            where = f"shards[{number}]."
            if not isinstance(entry, dict):
                raise DataError(f"{path}: shards[{number}] must be an object")
            info = ShardInfo(
                file=need(entry, "file", str, where),
                tokens=need(entry, "tokens", int, where),
                bytes=need(entry, "bytes", int, where),
                sha256=need(entry, "sha256", str, where),
            )
            if Path(info.file).name != info.file or info.tokens < 0:
                raise DataError(f"{path}: shards[{number}] is invalid ({info.file!r}, {info.tokens} tokens)")
            if info.bytes != info.tokens * SHARD_DTYPES[dtype].itemsize:
                raise DataError(
                    f"{path}: shards[{number}] ({info.file}) records {info.bytes} bytes for "
                    f"{info.tokens} tokens of {dtype}"
                )
            shards.append(info)
        num_tokens = need(raw, "num_tokens", int)
        if num_tokens != sum(s.tokens for s in shards):
            raise DataError(f"{path}: num_tokens {num_tokens} is not the sum of the shards' token counts")
        return cls(
            dtype=dtype,
            num_tokens=num_tokens,
            shards=tuple(shards),
            vocab_size=vocab_size,
            eos_id=eos_id,
            fingerprint=need(raw, "fingerprint", str),
            tokenizer_sha256=need(tokenizer, "sha256", str, "tokenizer."),
            source=need(raw, "source", dict),
        )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()
