"""Corpora, the cached byte-level BPE tokenizer, packed train/validation token streams, and
memory-mapped token shards prepared by ``steadylm data prepare``.

Typical use::

    from steadylm.data import prepare_data
    data = prepare_data(None, vocab_size=4096, seq_len=128)   # the embedded King James Bible
    inputs, targets = data.train_batch(batch_index=0, batch_size=16, seed=0)
    data = prepare_data("prepared/")                          # a `steadylm data prepare` output

Names are imported lazily so that ``steadylm data prepare`` and its worker processes do not load
PyTorch (only the batch classes need it).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> defining submodule
_EXPORTS: dict[str, str] = {
    "DEFAULT_CORPUS_NAME": "corpus",
    "Document": "corpus",
    "describe_source": "corpus",
    "iter_documents": "corpus",
    "load_corpus": "corpus",
    "load_kjv": "corpus",
    "DEFAULT_VOCAB_SIZE": "tokenizer",
    "PackedBatches": "packing",
    "TokenData": "dataset",
    "check_shard": "packing",
    "keyed_permutation": "packing",
    "prepare_data": "dataset",
    "split_stream": "dataset",
    "EOS_TOKEN": "tokenizer",
    "EncodedCorpus": "tokenizer",
    "cache_root": "tokenizer",
    "encode_corpus": "tokenizer",
    "load_tokenizer_file": "tokenizer",
    "train_tokenizer": "tokenizer",
    "ShardedTokenData": "shards",
    "is_prepared_dir": "shard_format",
    "open_prepared": "shards",
    "prepare_corpus": "prepare",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from steadylm.data.corpus import (
        DEFAULT_CORPUS_NAME,
        Document,
        describe_source,
        iter_documents,
        load_corpus,
        load_kjv,
    )
    from steadylm.data.dataset import TokenData, prepare_data, split_stream
    from steadylm.data.packing import PackedBatches, check_shard, keyed_permutation
    from steadylm.data.prepare import prepare_corpus
    from steadylm.data.shard_format import is_prepared_dir
    from steadylm.data.shards import ShardedTokenData, open_prepared
    from steadylm.data.tokenizer import (
        DEFAULT_VOCAB_SIZE,
        EOS_TOKEN,
        EncodedCorpus,
        cache_root,
        encode_corpus,
        load_tokenizer_file,
        train_tokenizer,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'steadylm.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"steadylm.data.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
