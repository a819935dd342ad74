"""Model state under sharding (issue 8, item 3): shape-[1] learnable scalars, old 0-dim checkpoints,
and BHyT c_ℓ computed from the full W_V/W_O when FSDP2 shards them."""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist

from steadylm.models import ModelConfig, build_model
from steadylm.nn import BHyT, DyT


def _cfg(norm: str, **kw) -> ModelConfig:
    return ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                       max_seq_len=16, norm=norm, **kw)


@pytest.mark.parametrize("norm", ["dyt", "bhyt", "bhyt_star"])
def test_learnable_scalars_are_shape_1(norm: str) -> None:
    model = build_model(_cfg(norm))
    scalars = {n: p for n, p in model.named_parameters() if n.endswith((".lam", ".alpha", "embed_scale"))}
    assert scalars, "the model has learnable scalars"
    assert all(p.shape == (1,) for p in scalars.values()), {n: tuple(p.shape) for n, p in scalars.items()}


@pytest.mark.parametrize("norm", ["dyt", "bhyt"])
def test_old_zero_dim_state_dict_still_loads(norm: str) -> None:
    torch.manual_seed(0)
    model = build_model(_cfg(norm))
    with torch.no_grad():
        for _name, p in model.named_parameters():
            if p.shape == (1,):
                p.fill_(0.37)
    old = {k: (v.reshape(()) if v.shape == (1,) else v) for k, v in model.state_dict().items()}
    assert any(v.dim() == 0 and k.endswith((".lam", ".alpha", "embed_scale")) for k, v in old.items())
    fresh = build_model(_cfg(norm))
    fresh.load_state_dict(old)  # strict: 0-dim λ/α/embed scale are reshaped on load
    tokens = torch.randint(0, 64, (2, 8))
    torch.testing.assert_close(fresh(tokens), model(tokens), rtol=0, atol=0)  # same weights, same math


def test_shape_1_scalar_broadcasts_like_a_0_dim_one() -> None:
    # The fused and reference ops see λ/α as a scalar: shape [1] gives bit-identical output.
    x = torch.randn(3, 5, 16)
    for impl in ("fused", "reference"):
        bhyt, dyt = BHyT(16, lam_init=1.7, impl=impl), DyT(16, alpha_init=0.6, impl=impl)
        assert torch.equal(bhyt(x), bhyt._op(x, bhyt.weight, bhyt.lam.reshape(()), bhyt.kappa, bhyt.eps, None))
        assert torch.equal(dyt(x), dyt._op(x, dyt.weight, dyt.alpha.reshape(()), None))
        bhyt(x).sum().backward()
        assert bhyt.lam.grad is not None and bhyt.lam.grad.shape == (1,)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def single_rank_group():
    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_bhyt_correction_from_full_weights_under_fsdp2(single_rank_group) -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    torch.manual_seed(1)
    plain = build_model(_cfg("bhyt"))
    sharded = copy.deepcopy(plain)
    for block in sharded.layers:
        fully_shard(block)  # refuses 0-dim parameters: λ must be shape [1]
    fully_shard(sharded)
    assert isinstance(sharded.layers[0].attn.wv.weight, DTensor)
    with torch.no_grad():
        for block in plain.layers:
            block.bhyt_correction.zero_()
        for block in sharded.layers:
            block.bhyt_correction.zero_()
    plain.refresh_bhyt_correction()
    sharded.refresh_bhyt_correction()
    for a, b in zip(plain.layers, sharded.layers):
        assert float(a.bhyt_correction) > 0
        # Same weights gathered in full: the same fp32 reduction, bit for bit.
        assert torch.equal(a.bhyt_correction, b.bhyt_correction)


def test_old_format_1_checkpoint_with_zero_dim_scalars_loads(tmp_path) -> None:
    from torch import nn

    from steadylm.train.checkpoint import load_checkpoint, save_checkpoint

    torch.manual_seed(2)
    old = build_model(_cfg("bhyt"))
    for block in old.layers:  # what a checkpoint written before shape-[1] scalars holds
        for norm in (block.attn_norm, block.ffn_norm):
            norm.lam = nn.Parameter(norm.lam.detach().reshape(()) * 1.5)
    old_opt = torch.optim.AdamW(old.parameters())
    old(torch.randint(0, 64, (2, 8))).square().mean().backward()
    old_opt.step()  # 0-dim Adam moments for λ
    save_checkpoint(tmp_path, old, old_opt, step=1, configs={"model": old.config.to_dict()})
    fresh = build_model(_cfg("bhyt"))
    optimizer = torch.optim.AdamW(fresh.parameters())
    load_checkpoint(tmp_path / "checkpoint", fresh, optimizer, restore_rng=False)
    lam = fresh.layers[0].attn_norm.lam
    assert lam.shape == (1,) and optimizer.state[lam]["exp_avg"].shape == (1,)
    assert lam.item() == pytest.approx(3.0 - 1e-3, abs=2e-3)  # λ0 = 2, × 1.5, one Adam step (lr 1e-3)
    fresh(torch.randint(0, 64, (2, 8))).square().mean().backward()
    optimizer.step()  # the resumed run steps with the reshaped moments
