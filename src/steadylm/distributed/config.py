"""``ParallelConfig``: how a run is spread over processes (the ``parallel`` section of a run spec)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from steadylm.config_fields import spec_field
from steadylm.errors import ConfigError, check_choice

__all__ = ["PARALLEL_MODES", "ParallelConfig"]

#: ``none``: one process (several processes each train the whole batch is refused); ``ddp``:
#: DistributedDataParallel; ``fsdp``: FSDP2 ``fully_shard`` per block, then the root.
PARALLEL_MODES: tuple[str, ...] = ("none", "ddp", "fsdp")


@dataclass
class ParallelConfig:
    """Data parallelism on ``torch.distributed`` (launch with ``torchrun``)."""

    mode: str = spec_field("none", help="data parallelism across the processes torchrun started",
                           flag="--parallel", choices=PARALLEL_MODES)
    fsdp_bf16: bool = spec_field(False, help="FSDP2 MixedPrecisionPolicy: bf16 parameters and "
                                 "gradients in compute, fp32 gradient reduction and master weights",
                                 flag="--fsdp-bf16")
    compile: bool = spec_field(False, help="torch.compile each block (module.compile()) after "
                               "sharding", flag="--compile")
    backend: str | None = spec_field(None, help="process-group backend; default nccl on CUDA, gloo on CPU")
    timeout_s: float = spec_field(600.0, help="seconds a collective may wait for a peer before "
                                  "the run fails naming it (a dead or stalled rank)", flag="--dist-timeout")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        check_choice("parallel.mode", self.mode, PARALLEL_MODES)
        for name in ("fsdp_bf16", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"parallel.{name} must be true or false, got {getattr(self, name)!r}")
        if self.fsdp_bf16 and self.mode != "fsdp":
            raise ConfigError("parallel.fsdp_bf16 needs parallel.mode = 'fsdp'")
        check_choice("parallel.backend", self.backend, (None, "gloo", "nccl"))
        if (isinstance(self.timeout_s, bool) or not isinstance(self.timeout_s, (int, float))
                or not math.isfinite(self.timeout_s) or self.timeout_s <= 0):
            raise ConfigError(f"parallel.timeout_s must be a number > 0, got {self.timeout_s!r}")
