"""The packed-sequence sampler both token-data classes share: the deterministic train/validation
block split, and batches as a pure function of ``(seed, batch_index, batch_size)``.

Each stream is packed to the context length: sequence ``i`` is tokens
``[i*seq_len, i*seq_len + seq_len + 1)``, i.e. ``seq_len`` inputs and the ``seq_len`` next-token
targets, with no padding; documents simply follow each other after their EOS token.

Batches: the training sequences are visited epoch by epoch in a permutation drawn from a generator
seeded by ``(seed, epoch)``. So every model variant given the same data and seed sees the same
batches, and a resumed run draws exactly the batches the uninterrupted run would have. (Past
``EXACT_PERMUTATION_LIMIT`` training sequences the permutation is a keyed bijection computed per
batch instead of a stored one.)

Data parallelism: ``train_batch(..., shard=(rank, world_size))`` gives rank ``r`` rows
``[r*B/world, (r+1)*B/world)`` of the global batch of ``B`` rows, so ``world_size`` ranks together
see exactly the batch one process would.

:class:`PackedBatches` is subclassed by the in-memory :class:`steadylm.data.dataset.TokenData`
and the memory-mapped :class:`steadylm.data.shards.ShardedTokenData`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from steadylm.errors import ConfigError, DataError

__all__ = ["EXACT_PERMUTATION_LIMIT", "PackedBatches", "check_shard", "keyed_permutation", "split_blocks"]

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


@dataclass(frozen=True)
class PackedBatches:
    """Batch sampling shared by the in-memory :class:`TokenData` and the memory-mapped
    :class:`~steadylm.data.shards.ShardedTokenData`: both expose a training and a validation
    stream, packed to ``seq_len`` and visited in the same seeded order, so the same corpus gives
    the same batches from either.

    The fields both hold are declared here, once; ``train_tokens`` / ``val_tokens`` are whatever
    1-D token stream the subclass reads (a tensor, a stream of shards). Subclasses provide
    :meth:`_stream_length` and :meth:`_rows`.
    """

    train_tokens: Any
    val_tokens: Any
    seq_len: int
    vocab_size: int
    tokenizer: Tokenizer
    eos_id: int
    source: str = ""
    fingerprint: str = ""
    val_fraction: float = 0.0
    split_seed: int = 0
    _permutations: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("train_tokens", "val_tokens"):
            stream = getattr(self, name)
            if not self._is_stream(stream) or self._length(stream) < self.seq_len + 1:
                raise DataError(
                    f"{name} must hold at least seq_len + 1 = {self.seq_len + 1} tokens, has {self._length(stream)}"
                )

    @staticmethod
    def _is_stream(stream: Any) -> bool:
        """Whether ``stream`` has the form of a token stream (a subclass checks its own kind)."""
        return True

    @staticmethod
    def _length(stream: Any) -> int:
        """The number of tokens in ``stream``."""
        return len(stream)

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
