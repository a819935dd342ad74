"""Token streams for training: deterministic train/validation split, packing, batch sampling.

The encoded corpus (one token stream, documents separated by EOS) is cut into ``num_blocks``
contiguous blocks of equal length; a seeded choice of about ``val_fraction`` of them forms the
validation stream, the rest (in corpus order) the training stream. Contiguous blocks spread over
the whole corpus keep the validation text in-domain (the KJV's last books differ from its first)
while adjacent-sequence leakage is limited to the few block edges.

Each stream is packed to the context length: sequence ``i`` is tokens
``[i*seq_len, i*seq_len + seq_len + 1)``, i.e. ``seq_len`` inputs and the ``seq_len`` next-token
targets, with no padding; documents simply follow each other after their EOS token.

Batches are a pure function of ``(seed, batch_index, batch_size)``: the training sequences are
visited epoch by epoch in a permutation drawn from a generator seeded by ``(seed, epoch)``. So every
model variant given the same data and seed sees the same batches, and a resumed run draws exactly
the batches the uninterrupted run would have. (Past ``EXACT_PERMUTATION_LIMIT`` training
sequences the permutation is a keyed bijection computed per batch instead of a stored one.)

Data parallelism: ``train_batch(..., shard=(rank, world_size))`` gives rank ``r`` rows
``[r*B/world, (r+1)*B/world)`` of the global batch of ``B`` rows, so ``world_size`` ranks together
see exactly the batch one process would.

The same sampling serves an in-memory :class:`TokenData` and a memory-mapped prepared directory
(:class:`steadylm.data.shards.ShardedTokenData`); :func:`prepare_data` picks the one for its path.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from steadylm.data.corpus import describe_source, load_corpus
from steadylm.data.shard_format import is_prepared_dir
from steadylm.data.tokenizer import (
    DEFAULT_VOCAB_SIZE,
    EncodedCorpus,
    encode_documents,
    docs_fingerprint,
    encode_corpus,
    load_tokenizer_file,
    tokenizer_sha256,
    user_tokenizer_settings,
    validate_vocab_size,
)
from steadylm.errors import ConfigError, DataError

__all__ = [
    "DEFAULT_VOCAB_SIZE",
    "EXACT_PERMUTATION_LIMIT",
    "PackedBatches",
    "TokenData",
    "add_data_arguments",
    "check_shard",
    "keyed_permutation",
    "prepare_data",
    "split_blocks",
    "split_stream",
]

_MAX_SPLIT_BLOCKS = 200
# Up to this many training sequences an epoch's order is a stored ``torch.randperm`` (8 bytes per
# sequence, 32 MiB at the limit, two epochs cached); beyond it a keyed Feistel bijection computed
# per batch, so the sampler's memory never grows with the corpus.
EXACT_PERMUTATION_LIMIT = 1 << 22


def _epoch_seed(seed: int, epoch: int) -> int:
    # SplitMix-style mixing so that (seed, epoch) pairs never collide for small values.
    value = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) % (1 << 64)
    value ^= value >> 31
    return value % (1 << 63)


def _mix64(values: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on a ``uint64`` array (wrapping arithmetic)."""
    z = values.astype(np.uint64, copy=True)
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z


def keyed_permutation(positions: np.ndarray, count: int, key: int, rounds: int = 6) -> np.ndarray:
    """Image of ``positions`` under a keyed bijection of ``[0, count)`` (a Feistel network with
    cycle-walking), computed without materialising the permutation: O(len(positions)) memory.
    """
    positions = np.asarray(positions, dtype=np.uint64)
    if count <= 1:
        return positions.astype(np.int64)
    half = max(1, (int(count - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    keys = _mix64(np.arange(1, rounds + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(key))

    def encrypt(x: np.ndarray) -> np.ndarray:
        left, right = x >> np.uint64(half), x & mask
        for round_key in keys:
            left, right = right, left ^ (_mix64(right ^ round_key) & mask)
        return (left << np.uint64(half)) | right

    out = encrypt(positions)
    outside = out >= np.uint64(count)
    while outside.any():  # cycle-walking: the domain is < 4 * count, so few rounds are needed
        out[outside] = encrypt(out[outside])
        outside = out >= np.uint64(count)
    return out.astype(np.int64)


def check_shard(shard: tuple[int, int], batch_size: int) -> tuple[int, int]:
    """Validate ``shard = (rank, world_size)`` for a global batch of ``batch_size`` rows; returns
    ``(rank, world_size)``. Rank ``r`` owns rows ``[r*B/world, (r+1)*B/world)``."""
    if (
        not isinstance(shard, (tuple, list))
        or len(shard) != 2
        or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in shard)
    ):
        raise ConfigError(f"shard must be a (rank, world_size) pair of integers, got {shard!r}")
    rank, world = int(shard[0]), int(shard[1])
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"shard must satisfy 0 <= rank < world_size, got rank={rank}, world_size={world}")
    if batch_size % world != 0:
        raise ConfigError(
            f"batch_size ({batch_size}) must be divisible by the number of ranks ({world}) "
            "so that every rank gets the same number of rows of the global batch"
        )
    return rank, world


class PackedBatches:
    """Batch sampling shared by the in-memory :class:`TokenData` and the memory-mapped
    :class:`~steadylm.data.shards.ShardedTokenData`: both expose a training and a validation
    stream, packed to ``seq_len`` and visited in the same seeded order, so the same corpus gives
    the same batches from either.

    Subclasses provide ``seq_len``, ``tokenizer``, ``_permutations`` (a dict cache),
    :meth:`_stream_length` and :meth:`_rows`.
    """

    seq_len: int
    tokenizer: Tokenizer
    _permutations: dict[tuple[int, int], torch.Tensor]

    def _stream_length(self, split: str) -> int:
        """Number of tokens in the ``"train"`` or ``"val"`` stream."""
        raise NotImplementedError

    def _rows(self, split: str, indices: torch.Tensor) -> torch.Tensor:
        """``[len(indices), seq_len + 1]`` integer tensor: the packed sequences ``indices``."""
        raise NotImplementedError

    # -- sizes ---------------------------------------------------------------------------------
    @property
    def num_train_sequences(self) -> int:
        return (self._stream_length("train") - 1) // self.seq_len

    @property
    def num_val_sequences(self) -> int:
        return (self._stream_length("val") - 1) // self.seq_len

    @property
    def num_train_tokens(self) -> int:
        return self.num_train_sequences * self.seq_len

    # -- batches -------------------------------------------------------------------------------
    def _permutation(self, seed: int, epoch: int) -> torch.Tensor:
        key = (seed, epoch)
        perm = self._permutations.get(key)
        if perm is None:
            generator = torch.Generator().manual_seed(_epoch_seed(seed, epoch))
            perm = torch.randperm(self.num_train_sequences, generator=generator)
            while len(self._permutations) >= 2:  # a batch spans at most this epoch and the next
                self._permutations.pop(next(iter(self._permutations)))
            self._permutations[key] = perm
        return perm

    def _permuted(self, seed: int, epoch: int, offsets: torch.Tensor) -> torch.Tensor:
        """Sequence indices at ``offsets`` of epoch ``epoch``'s visiting order."""
        count = self.num_train_sequences
        if count <= EXACT_PERMUTATION_LIMIT:
            return self._permutation(seed, epoch)[offsets]
        # Beyond the limit a stored permutation would grow with the corpus: use a keyed bijection.
        return torch.from_numpy(keyed_permutation(offsets.numpy(), count, _epoch_seed(seed, epoch)))

    def train_batch_indices(self, batch_index: int, batch_size: int, seed: int) -> torch.Tensor:
        """Indices of the training sequences in batch number ``batch_index`` (0-based)."""
        if batch_index < 0 or batch_size < 1:
            raise ConfigError(
                f"batch_index must be >= 0 and batch_size >= 1, got {batch_index} and {batch_size}"
            )
        count = self.num_train_sequences
        positions = torch.arange(batch_index * batch_size, (batch_index + 1) * batch_size)
        epochs = positions // count
        offsets = positions % count
        indices = torch.empty_like(positions)
        for epoch in torch.unique(epochs).tolist():
            mask = epochs == epoch
            indices[mask] = self._permuted(seed, int(epoch), offsets[mask])
        return indices

    def train_batch(
        self,
        batch_index: int,
        batch_size: int,
        seed: int,
        device: torch.device | str | None = None,
        *,
        shard: tuple[int, int] = (0, 1),
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, targets)``, each ``[batch_size, seq_len]`` int64, for batch ``batch_index``.

        ``shard=(rank, world_size)`` returns only rows ``[rank*B/world, (rank+1)*B/world)`` of the
        global batch of ``B = batch_size`` rows (only those rows are read); concatenating the
        shards of all ranks gives the unsharded batch.
        """
        rank, world = check_shard(shard, batch_size)
        per_rank = batch_size // world
        indices = self.train_batch_indices(batch_index, batch_size, seed)
        indices = indices[rank * per_rank : (rank + 1) * per_rank]
        rows = self._rows("train", indices)
        rows = rows.to(device=device, dtype=torch.long, non_blocking=True)
        return rows[:, :-1], rows[:, 1:]

    def val_batches(
        self,
        num_batches: int,
        batch_size: int,
        device: torch.device | str | None = None,
        *,
        shard: tuple[int, int] = (0, 1),
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A fixed validation set: ``num_batches`` batches of sequences spread evenly over the
        validation stream (all of it, in fewer or smaller batches, when it is shorter).

        With ``shard=(rank, world_size)`` every rank gets the same number of batches, each holding
        its contiguous part of the global batch; the last global batch can be smaller than
        ``batch_size`` and is split as evenly as possible, so a rank's part can have fewer rows
        (even none, when it has fewer rows than there are ranks): weight losses by row count.
        """
        if num_batches < 1 or batch_size < 1:
            raise ConfigError(f"num_batches and batch_size must be >= 1, got {num_batches} and {batch_size}")
        rank, world = check_shard(shard, batch_size)
        count = self.num_val_sequences
        wanted = min(num_batches * batch_size, count)
        picks = torch.linspace(0, count - 1, wanted).round().long().unique()
        mine = []
        for chunk in picks.split(batch_size):
            size = chunk.shape[0]
            mine.append(chunk[size * rank // world : size * (rank + 1) // world])
        rows = self._rows("val", torch.cat(mine)).to(device=device, dtype=torch.long)
        return [(chunk[:, :-1], chunk[:, 1:]) for chunk in rows.split([c.shape[0] for c in mine])]

    # -- text ----------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(ids)


@dataclass(frozen=True)
class TokenData(PackedBatches):
    """Packed train/validation token streams plus the tokenizer that produced them.

    ``train_tokens`` / ``val_tokens`` are 1-D ``int32`` CPU tensors; batches come out as ``int64``
    on the requested device.
    """

    train_tokens: torch.Tensor
    val_tokens: torch.Tensor
    seq_len: int
    vocab_size: int
    tokenizer: Tokenizer
    eos_id: int
    source: str = ""
    fingerprint: str = ""
    val_fraction: float = 0.0
    split_seed: int = 0
    _permutations: dict[tuple[int, int], torch.Tensor] = field(
        default_factory=dict, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        for name in ("train_tokens", "val_tokens"):
            stream = getattr(self, name)
            if stream.dim() != 1 or stream.shape[0] < self.seq_len + 1:
                raise DataError(
                    f"{name} must hold at least seq_len + 1 = {self.seq_len + 1} tokens, "
                    f"has {stream.shape[0]}"
                )

    def _stream_length(self, split: str) -> int:
        return int((self.train_tokens if split == "train" else self.val_tokens).shape[0])

    def _packed(self, stream: torch.Tensor) -> torch.Tensor:
        """``[num_sequences, seq_len + 1]`` view; neighbours share one boundary token."""
        return stream.unfold(0, self.seq_len + 1, self.seq_len)

    def _rows(self, split: str, indices: torch.Tensor) -> torch.Tensor:
        return self._packed(self.train_tokens if split == "train" else self.val_tokens)[indices]

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable summary (recorded in each run's ``config.json``)."""
        return {
            "source": self.source,
            "fingerprint": self.fingerprint,
            "vocab_size": self.vocab_size,
            "seq_len": self.seq_len,
            "val_fraction": self.val_fraction,
            "split_seed": self.split_seed,
            "train_tokens": int(self.train_tokens.shape[0]),
            "val_tokens": int(self.val_tokens.shape[0]),
            "train_sequences": self.num_train_sequences,
            "val_sequences": self.num_val_sequences,
        }


def split_blocks(total: int, seq_len: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The block split of a ``total``-token stream: ``(edges, is_val)`` where block ``b`` is tokens
    ``[edges[b], edges[b + 1])`` and ``is_val[b]`` says whether it belongs to validation."""
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction}")
    num_blocks = min(_MAX_SPLIT_BLOCKS, total // (seq_len + 1))
    num_val = max(1, round(val_fraction * num_blocks))
    if num_blocks - num_val < 1:
        raise DataError(
            f"the corpus is too small: {total} tokens cannot give both a training and a "
            f"validation sequence of seq_len + 1 = {seq_len + 1} tokens "
            f"(need about {math.ceil(2 * (seq_len + 1) / min(val_fraction, 1 - val_fraction))})"
        )
    edges = np.linspace(0, total, num_blocks + 1).astype(np.int64)
    chosen = np.random.default_rng(seed).permutation(num_blocks)[:num_val]
    is_val = np.zeros(num_blocks, dtype=bool)
    is_val[chosen] = True
    return edges, is_val


def split_stream(
    tokens: np.ndarray, seq_len: int, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic block split of a token stream into (train, validation) streams."""
    edges, is_val = split_blocks(int(tokens.shape[0]), seq_len, val_fraction, seed)
    blocks = range(len(is_val))
    train = np.concatenate([tokens[edges[b] : edges[b + 1]] for b in blocks if not is_val[b]])
    val = np.concatenate([tokens[edges[b] : edges[b + 1]] for b in blocks if is_val[b]])
    return train, val


def prepare_data(
    path: str | os.PathLike[str] | None = None,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    seq_len: int = 128,
    val_fraction: float = 0.05,
    seed: int = 0,
    *,
    text_field: str = "text",
    use_cache: bool = True,
    tokenizer: str | os.PathLike[str] | None = None,
    eos_token: str | None = None,
) -> PackedBatches:
    """Load a corpus (``None`` = the embedded KJV), tokenize it (cached) and split/pack it.

    ``path`` may also be a directory written by ``steadylm data prepare``: the result is then a
    memory-mapped :class:`~steadylm.data.shards.ShardedTokenData` (same interface, same batches
    as the in-memory path for the same corpus and tokenizer; it carries its own tokenizer, so
    ``vocab_size`` and ``text_field`` are not used). Otherwise the result is a :class:`TokenData`.

    ``tokenizer``: a Hugging Face ``tokenizer.json`` to use instead of training steadylm's
    byte-level BPE (``eos_token`` names its end-of-text token, see
    :func:`~steadylm.data.tokenizer.load_tokenizer_file`).

    ``seed`` only fixes which blocks go to validation; batch order is seeded by the trainer.
    The model must use ``data.vocab_size``, which can be below ``vocab_size`` when the corpus
    is too small to learn that many merges.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ConfigError(f"seq_len must be an integer >= 1, got {seq_len!r}")
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if is_prepared_dir(path):
        from steadylm.data.shards import open_prepared  # imports this module

        data = open_prepared(path, seq_len, val_fraction, seed)
        if tokenizer is not None:
            wanted, _ = load_tokenizer_file(tokenizer, eos_token)
            if tokenizer_sha256(wanted) != tokenizer_sha256(data.tokenizer):
                raise ConfigError(
                    f"tokenizer {tokenizer} differs from the one {path} was prepared with; "
                    "a prepared directory carries its tokenizer (leave --tokenizer out)"
                )
        return data
    docs = load_corpus(path, text_field=text_field)
    if tokenizer is not None:
        user_tokenizer, eos_id = load_tokenizer_file(tokenizer, eos_token)
        tokens = encode_documents(user_tokenizer, docs, eos_id)
        fingerprint = docs_fingerprint(docs, user_tokenizer_settings(user_tokenizer))
        encoded = EncodedCorpus(user_tokenizer, tokens, fingerprint, None, from_cache=False, eos=eos_id)
    else:
        validate_vocab_size(vocab_size)
        encoded = encode_corpus(docs, vocab_size, use_cache=use_cache)
    train, val = split_stream(encoded.tokens, seq_len, val_fraction, seed)
    return TokenData(
        train_tokens=torch.from_numpy(train.astype(np.int32)),
        val_tokens=torch.from_numpy(val.astype(np.int32)),
        seq_len=seq_len,
        vocab_size=encoded.vocab_size,
        tokenizer=encoded.tokenizer,
        eos_id=encoded.eos_id,
        source=describe_source(path),
        fingerprint=encoded.fingerprint,
        val_fraction=val_fraction,
        split_seed=seed,
    )


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The corpus flags shared by the lab commands: ``--data``, ``--vocab-size``, ``--text-field``."""
    group = parser.add_argument_group("data")
    group.add_argument(
        "--data",
        metavar="PATH",
        default=None,
        help="corpus: a UTF-8 text file, a directory of text files, JSON-lines (.jsonl) or Parquet "
        "with a text field, or a directory written by 'steadylm data prepare' (memory-mapped; it "
        "carries its tokenizer); default: the embedded King James Bible",
    )
    group.add_argument(
        "--vocab-size",
        type=int,
        default=DEFAULT_VOCAB_SIZE,
        metavar="N",
        help=f"byte-level BPE vocabulary size (default {DEFAULT_VOCAB_SIZE}); the tokenizer is "
        "cached per corpus under $STEADYLM_CACHE or ~/.cache/steadylm",
    )
    group.add_argument(
        "--text-field",
        default="text",
        metavar="KEY",
        help="JSON-lines field / Parquet column holding the text (default: text)",
    )
