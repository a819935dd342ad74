"""Apply data parallelism to a built model from outside, like torchtitan's ``parallelize``.

* ``fsdp``: FSDP2 ``fully_shard`` on every block of ``model.layers``, then on the root (embedding,
  final norm and head), over a 1-D device mesh of all ranks; optionally a bf16
  ``MixedPrecisionPolicy`` with fp32 gradient reduction. Parameters become ``DTensor`` shards.
* ``ddp``: ``DistributedDataParallel``; buffers are not broadcast each forward, because every
  buffer steadylm keeps (BHyT c_ℓ, MoE router bias, FP8 amax history) is made identical on every
  rank by construction — broadcasting would hide a bug instead of preventing one.
* ``compile``: ``torch.compile`` each block after sharding (``module.compile()``, in place).

The model code never sees any of this.
"""

from __future__ import annotations

import inspect
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from steadylm.distributed.config import ParallelConfig
from steadylm.distributed.env import DistEnv, init_distributed, is_distributed
from steadylm.errors import ConfigError

__all__ = ["ParallelModel", "parallelize"]


class ParallelModel:
    """A model and the module its forward runs through.

    ``model`` is the user's module (methods such as ``after_optimizer_step`` stay reachable);
    ``forward_module`` is what is called (the DDP wrapper, or the model itself under FSDP2, which
    shards in place).
    """

    def __init__(self, model: nn.Module, forward_module: nn.Module, mode: str) -> None:
        self.model = model
        self.forward_module = forward_module
        self.mode = mode

    def no_sync(self, sync: bool) -> AbstractContextManager[None]:
        """Skip the gradient reduction of a micro-batch that is not the last of its step."""
        if sync or self.mode == "none":
            return nullcontext()
        if self.mode == "ddp":
            return self.forward_module.no_sync()  # type: ignore[operator]
        return _FSDPNoSync(self.model)


class _FSDPNoSync:
    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> None:
        self.model.set_requires_gradient_sync(False)  # type: ignore[operator]

    def __exit__(self, *exc: object) -> None:
        self.model.set_requires_gradient_sync(True)  # type: ignore[operator]


def _blocks(model: nn.Module) -> list[nn.Module]:
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ConfigError("parallel.mode 'fsdp' needs a model with a `layers` ModuleList of blocks")
    return list(layers)



def _no_buffer_sync(ddp: type) -> dict[str, bool]:
    """DDP's keyword for "do not sync buffers in forward" (our models' buffers are RoPE tables,
    identical on every rank): ``forward_sync_buffers`` since torch 2.13, which deprecates the
    older ``broadcast_buffers`` (torch 2.11 has only that one)."""
    if "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}

def parallelize(model: nn.Module, config: ParallelConfig, env: DistEnv, device: torch.device) -> ParallelModel:
    """Apply ``config`` to ``model`` (already on ``device``). In one process with ``mode='none'``
    only ``compile`` applies."""
    if config.mode == "none" and env.world_size > 1:
        raise ConfigError(
            f"parallel.mode is 'none' but {env.world_size} processes were started; "
            "use --parallel ddp or --parallel fsdp under torchrun"
        )
    if config.mode != "none" and not is_distributed():
        # A Trainer built outside `steadylm train` with --parallel ddp|fsdp and no launcher: the
        # launcher decides the world size, so this is a one-process group (as the command makes).
        init_distributed(config.backend, config.timeout_s, mode=config.mode)
    if config.mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(device.type, (env.world_size,))
        policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                  if config.fsdp_bf16 else MixedPrecisionPolicy())
        blocks = _blocks(model)
        for index, block in enumerate(blocks):
            # The last block's parameters are needed again at once by the backward: keep them.
            fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=index < len(blocks) - 1)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        if config.compile:
            for block in blocks:
                block.compile()
        return ParallelModel(model, model, "fsdp")
    if config.compile:
        for block in _blocks(model):
            block.compile()
    if config.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, **_no_buffer_sync(DistributedDataParallel)
        )
        return ParallelModel(model, wrapped, "ddp")
    return ParallelModel(model, model, "none")
