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

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from steadylm.data.corpus import describe_source, load_corpus
from steadylm.data.packing import EXACT_PERMUTATION_LIMIT, PackedBatches, check_shard, keyed_permutation, split_blocks
from steadylm.data.shard_format import is_prepared_dir
from steadylm.data.shards import open_prepared
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
    "check_shard",
    "keyed_permutation",
    "prepare_data",
    "split_blocks",
    "split_stream",
]

@dataclass(frozen=True)
class TokenData(PackedBatches):
    """Packed train/validation token streams plus the tokenizer that produced them.

    ``train_tokens`` / ``val_tokens`` are 1-D ``int32`` CPU tensors; batches come out as ``int64``
    on the requested device.
    """

    train_tokens: torch.Tensor
    val_tokens: torch.Tensor

    @staticmethod
    def _is_stream(stream: torch.Tensor) -> bool:
        return stream.dim() == 1

    @staticmethod
    def _length(stream: torch.Tensor) -> int:
        return int(stream.shape[0])

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
