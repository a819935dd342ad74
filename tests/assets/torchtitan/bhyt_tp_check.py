"""Run by tests/test_torchtitan.py under ``torchrun --nproc_per_node 2`` (gloo, CPU): one BHyT
block's two sites and a PowLU FFN activation on tensor-parallel DTensors (tokens sequence-sharded,
replicated, the FFN hidden column-sharded), fused ops, against the same modules on the full
tensors in one process. Writes ``rank<r>.json`` (the largest relative differences) to the folder
given as the first argument."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from steadylm.integrations.torchtitan import SteadyLMBHyT, SteadyLMFeedForward


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def main() -> None:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (2,))
    torch.manual_seed(0)
    d, shift = 16, 0.3
    x = torch.randn(2, 8, d) * 3
    h = torch.randn(2, 8, d)
    dy1, dy2 = torch.randn(2, 8, d), torch.randn(2, 8, d)
    worst: dict[str, float] = {}
    for layout in ("sequence", "replicated"):
        place = [Shard(1)] if layout == "sequence" else [Replicate()]
        results = []
        for distributed in (False, True):
            sites = [SteadyLMBHyT.Config(normalized_shape=d, lam_init=lam, eps=1e-6, impl="fused").build()
                     for lam in (2.0, 1.0)]
            with torch.no_grad():
                for site in sites:
                    site.weight.copy_(torch.linspace(0.5, 1.5, d))
            xs, hs = x.clone().requires_grad_(), h.clone().requires_grad_()
            if distributed:
                for site in sites:
                    for name in ("weight", "lam"):
                        setattr(site, name, torch.nn.Parameter(distribute_tensor(getattr(site, name).detach(),
                                                                                 mesh, [Replicate()])))
                xi = distribute_tensor(x, mesh, place).requires_grad_()
                hi = distribute_tensor(h, mesh, place).requires_grad_()
                g1, g2 = distribute_tensor(dy1, mesh, place), distribute_tensor(dy2, mesh, place)
            else:
                xi, hi, g1, g2 = xs, hs, dy1, dy2
            y1, v = sites[0](xi, with_mean_square=True)
            y2 = sites[1](hi, variance=v + shift)
            ((y1 * g1).sum() + (y2 * g2).sum()).backward()
            grads = [full(xi.grad), full(hi.grad)] + [full(p.grad) for s in sites for p in (s.weight, s.lam)]
            results.append([full(y1), full(y2), full(v)] + grads)
        for name, a, b in zip(("y1", "y2", "v", "dx", "dh", "dw1", "dlam1", "dw2", "dlam2"), *results):
            worst[f"{layout}.{name}"] = float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
    # the FFN's activation on column-sharded gate/up (the hidden dimension, as TP shards w1/w3)
    from torchtitan.models.common.config_utils import make_ffn_config

    from steadylm.integrations.torchtitan.overrides import _replace

    init = {"weight": torch.nn.init.zeros_, "bias": torch.nn.init.zeros_}
    ffn = _replace(make_ffn_config(dim=d, hidden_dim=32, w1_param_init=init, w2w3_param_init=init), "powlu",
                   "fused", {"m": 3.0}).build()
    assert isinstance(ffn, SteadyLMFeedForward)
    gate, up = torch.randn(2, 8, 32, requires_grad=True), torch.randn(2, 8, 32, requires_grad=True)
    gd = distribute_tensor(gate.detach(), mesh, [Shard(2)]).requires_grad_()
    ud = distribute_tensor(up.detach(), mesh, [Shard(2)]).requires_grad_()
    out_d = ffn._act_local(gd, ud)
    out = ffn.act(gate, up)
    (out_d * distribute_tensor(dy_ffn := torch.randn(2, 8, 32), mesh, [Shard(2)])).sum().backward()
    (out * dy_ffn).sum().backward()
    worst["ffn.sharding_changed"] = float(tuple(out_d.placements) != (Shard(2),))
    for name, a, b in (("ffn.y", full(out_d), out), ("ffn.dgate", full(gd.grad), gate.grad),
                       ("ffn.dup", full(ud.grad), up.grad)):
        worst[name] = float((a - b).abs().max() / b.abs().max())
    Path(sys.argv[1], f"rank{dist.get_rank()}.json").write_text(json.dumps({"rank": dist.get_rank(), "worst": worst}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
