"""Data parallelism on PyTorch's own engine: process groups from ``torchrun``, FSDP2 / DDP applied
to a built model from outside (the way torchtitan's ``parallelize`` does it), DCP checkpoints.

Nothing here is imported by ``models``: a model is built for one process, then parallelised.
"""

from steadylm.distributed.config import PARALLEL_MODES, ParallelConfig

__all__ = ["PARALLEL_MODES", "ParallelConfig"]
