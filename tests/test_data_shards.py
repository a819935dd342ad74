"""Data at scale: rank sharding of batches, ``steadylm data prepare`` and memory-mapped shards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from steadylm.data import TokenData, keyed_permutation
from steadylm.data import dataset as dataset_module
from steadylm.errors import ConfigError


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path_factory.getbasetemp() / "steadylm-cache"
    monkeypatch.setenv("STEADYLM_CACHE", str(root))
    return root


def _toy_data(num_tokens: int = 4001, seq_len: int = 8) -> TokenData:
    train = torch.arange(num_tokens, dtype=torch.int32) % 300
    val = (torch.arange(num_tokens // 4, dtype=torch.int32) * 7) % 300
    return TokenData(train, val, seq_len=seq_len, vocab_size=300, tokenizer=None, eos_id=0)


# ----------------------------------------------------------------------------------------------
# rank sharding of the global batch
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 4])
def test_rank_shards_concatenate_to_the_global_batch(world: int) -> None:
    data = _toy_data()
    for batch_index in (0, 3, 61):  # 61 * 8 rows crosses an epoch boundary (500 sequences)
        inputs, targets = data.train_batch(batch_index, 8, seed=5)
        parts = [data.train_batch(batch_index, 8, seed=5, shard=(r, world)) for r in range(world)]
        assert all(p[0].shape == (8 // world, 8) for p in parts)
        assert torch.equal(torch.cat([p[0] for p in parts]), inputs)
        assert torch.equal(torch.cat([p[1] for p in parts]), targets)


@pytest.mark.parametrize(("num_batches", "batch_size", "world"), [(3, 8, 2), (2, 4, 4), (200, 4, 2)])
def test_validation_shards_concatenate_to_the_global_batches(num_batches: int, batch_size: int, world: int) -> None:
    data = _toy_data()
    whole = data.val_batches(num_batches, batch_size)
    parts = [data.val_batches(num_batches, batch_size, shard=(r, world)) for r in range(world)]
    assert all(len(p) == len(whole) for p in parts)  # same number of batches on every rank
    for i, (inputs, targets) in enumerate(whole):
        assert torch.equal(torch.cat([p[i][0] for p in parts]), inputs)
        assert torch.equal(torch.cat([p[i][1] for p in parts]), targets)


def test_bad_shards_raise_config_error_naming_the_field() -> None:
    data = _toy_data()
    with pytest.raises(ConfigError, match=r"batch_size \(6\) must be divisible by the number of ranks \(4\)"):
        data.train_batch(0, 6, seed=0, shard=(0, 4))
    with pytest.raises(ConfigError, match="batch_size"):
        data.val_batches(2, 6, shard=(1, 4))
    with pytest.raises(ConfigError, match="rank"):
        data.train_batch(0, 8, seed=0, shard=(2, 2))
    with pytest.raises(ConfigError, match="shard"):
        data.train_batch(0, 8, seed=0, shard="01")  # type: ignore[arg-type]


def test_keyed_permutation_is_a_seeded_bijection() -> None:
    for count in (1, 2, 3, 1000, 4099):
        image = keyed_permutation(np.arange(count), count, key=17)
        assert np.array_equal(np.sort(image), np.arange(count))
    a = keyed_permutation(np.arange(1000), 1000, key=1)
    assert np.array_equal(a, keyed_permutation(np.arange(1000), 1000, key=1))
    assert not np.array_equal(a, keyed_permutation(np.arange(1000), 1000, key=2))
    assert not np.array_equal(a, np.arange(1000))


def test_large_corpora_use_the_keyed_permutation_and_still_visit_every_sequence(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = _toy_data(num_tokens=8 * 100 + 1)  # 100 sequences
    stored = torch.cat([data.train_batch_indices(i, 10, seed=3) for i in range(10)])
    monkeypatch.setattr(dataset_module, "EXACT_PERMUTATION_LIMIT", 50)
    keyed = torch.cat([data.train_batch_indices(i, 10, seed=3) for i in range(10)])
    assert sorted(keyed.tolist()) == list(range(100)) and not torch.equal(keyed, stored)
    assert not data._permutations or all(p.numel() == 100 for p in data._permutations.values())
    nxt = torch.cat([data.train_batch_indices(i, 10, seed=3) for i in range(10, 20)])
    assert sorted(nxt.tolist()) == list(range(100)) and not torch.equal(nxt, keyed)
