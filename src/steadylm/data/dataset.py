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
the batches the uninterrupted run would have.
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
from steadylm.data.tokenizer import encode_corpus, validate_vocab_size
from steadylm.errors import ConfigError, DataError

__all__ = ["DEFAULT_VOCAB_SIZE", "TokenData", "add_data_arguments", "prepare_data", "split_stream"]

DEFAULT_VOCAB_SIZE = 4096
_MAX_SPLIT_BLOCKS = 200


def _epoch_seed(seed: int, epoch: int) -> int:
    # SplitMix-style mixing so that (seed, epoch) pairs never collide for small values.
    value = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) % (1 << 64)
    value ^= value >> 31
    return value % (1 << 63)


@dataclass(frozen=True)
class TokenData:
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

    # -- sizes ---------------------------------------------------------------------------------
    @property
    def num_train_sequences(self) -> int:
        return (self.train_tokens.shape[0] - 1) // self.seq_len

    @property
    def num_val_sequences(self) -> int:
        return (self.val_tokens.shape[0] - 1) // self.seq_len

    @property
    def num_train_tokens(self) -> int:
        return self.num_train_sequences * self.seq_len

    def _packed(self, stream: torch.Tensor) -> torch.Tensor:
        """``[num_sequences, seq_len + 1]`` view; neighbours share one boundary token."""
        return stream.unfold(0, self.seq_len + 1, self.seq_len)

    # -- batches -------------------------------------------------------------------------------
    def _permutation(self, seed: int, epoch: int) -> torch.Tensor:
        key = (seed, epoch)
        perm = self._permutations.get(key)
        if perm is None:
            generator = torch.Generator().manual_seed(_epoch_seed(seed, epoch))
            perm = torch.randperm(self.num_train_sequences, generator=generator)
            if len(self._permutations) > 4:  # only the current and next epoch are ever needed
                self._permutations.clear()
            self._permutations[key] = perm
        return perm

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
            indices[mask] = self._permutation(seed, int(epoch))[offsets[mask]]
        return indices

    def train_batch(
        self, batch_index: int, batch_size: int, seed: int, device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, targets)``, each ``[batch_size, seq_len]`` int64, for batch ``batch_index``."""
        rows = self._packed(self.train_tokens)[self.train_batch_indices(batch_index, batch_size, seed)]
        rows = rows.to(device=device, dtype=torch.long, non_blocking=True)
        return rows[:, :-1], rows[:, 1:]

    def val_batches(
        self, num_batches: int, batch_size: int, device: torch.device | str | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A fixed validation set: ``num_batches`` batches of sequences spread evenly over the
        validation stream (all of it, in fewer or smaller batches, when it is shorter)."""
        if num_batches < 1 or batch_size < 1:
            raise ConfigError(
                f"num_batches and batch_size must be >= 1, got {num_batches} and {batch_size}"
            )
        packed = self._packed(self.val_tokens)
        wanted = min(num_batches * batch_size, packed.shape[0])
        picks = torch.linspace(0, packed.shape[0] - 1, wanted).round().long().unique()
        rows = packed[picks].to(device=device, dtype=torch.long)
        return [(chunk[:, :-1], chunk[:, 1:]) for chunk in rows.split(batch_size)]

    # -- text ----------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(ids)

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


def split_stream(
    tokens: np.ndarray, seq_len: int, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic block split of a token stream into (train, validation) streams."""
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction}")
    total = int(tokens.shape[0])
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
    train = np.concatenate([tokens[edges[b] : edges[b + 1]] for b in range(num_blocks) if not is_val[b]])
    val = np.concatenate([tokens[edges[b] : edges[b + 1]] for b in range(num_blocks) if is_val[b]])
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
) -> TokenData:
    """Load a corpus (``None`` = the embedded KJV), tokenize it (cached) and split/pack it.

    ``seed`` only fixes which blocks go to validation; batch order is seeded by the trainer.
    The model must use ``TokenData.vocab_size``, which can be below ``vocab_size`` when the corpus
    is too small to learn that many merges.
    """
    validate_vocab_size(vocab_size)
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ConfigError(f"seq_len must be an integer >= 1, got {seq_len!r}")
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction}")
    docs = load_corpus(path, text_field=text_field)
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
        help="corpus: a UTF-8 text file, a directory of text files, or JSON-lines (.jsonl) with a "
        "text field; default: the embedded King James Bible",
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
        help="JSON-lines field holding the text (default: text)",
    )
