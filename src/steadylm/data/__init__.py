"""Corpora, the cached byte-level BPE tokenizer, and packed train/validation token streams.

Typical use::

    from steadylm.data import prepare_data
    data = prepare_data(None, vocab_size=4096, seq_len=128)   # the embedded King James Bible
    inputs, targets = data.train_batch(batch_index=0, batch_size=16, seed=0)
"""

from steadylm.data.corpus import DEFAULT_CORPUS_NAME, describe_source, load_corpus, load_kjv
from steadylm.data.dataset import (
    DEFAULT_VOCAB_SIZE,
    PackedBatches,
    TokenData,
    add_data_arguments,
    check_shard,
    keyed_permutation,
    prepare_data,
    split_stream,
)
from steadylm.data.tokenizer import EOS_TOKEN, EncodedCorpus, cache_root, encode_corpus, train_tokenizer

__all__ = [
    "DEFAULT_CORPUS_NAME",
    "DEFAULT_VOCAB_SIZE",
    "EOS_TOKEN",
    "EncodedCorpus",
    "PackedBatches",
    "TokenData",
    "add_data_arguments",
    "cache_root",
    "check_shard",
    "describe_source",
    "encode_corpus",
    "keyed_permutation",
    "load_corpus",
    "load_kjv",
    "prepare_data",
    "split_stream",
    "train_tokenizer",
]
