"""Per-rank memory and step time of a run under DDP/FSDP2 vs one process.

::

    python -m steadylm.bench.scale_out --preset micro --parallel none --out /tmp/b1
    torchrun --standalone --nproc_per_node=2 -m steadylm.bench.scale_out --preset micro --parallel fsdp --out /tmp/b2

Trains ``--steps`` steps of the run spec the flags describe (the same flags as ``steadylm train``)
and prints one JSON line from rank 0: the bytes of parameters and optimizer state this rank holds
(its local shards under FSDP2, counted tensor by tensor — what sharding saves, free of allocator
noise), the process's peak RSS, and the median step time over the steps after the first
``--warmup`` (the trainer's own per-row timing: forward, backward, optimizer; no evaluation).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
from typing import Any

import torch


def _local_bytes(tensor: torch.Tensor) -> int:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of parameters and of optimizer state held by this rank."""
    params = sum(_local_bytes(p) for p in model.parameters())
    optim = sum(_local_bytes(v) for state in optimizer.state.values() for v in state.values()
                if isinstance(v, torch.Tensor))
    return {"param_bytes": params, "optim_bytes": optim, "param_plus_optim_bytes": params + optim}


def main(argv: list[str] | None = None) -> int:
    from steadylm.bench.timing import quantile
    from steadylm.distributed.env import broadcast_object, init_distributed, shutdown_distributed
    from steadylm.train.assemble import build_run
    from steadylm.train.metrics import read_metrics
    from steadylm.train.spec import add_spec_arguments, spec_from_args

    parser = argparse.ArgumentParser(prog="python -m steadylm.bench.scale_out", description=__doc__)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the median step time")
    parser.add_argument("--out", default=None, help="run directory (default: a temporary one)")
    add_spec_arguments(parser)
    args = parser.parse_args(argv)
    spec = spec_from_args(args)
    env = init_distributed(spec.parallel.backend, spec.parallel.timeout_s, mode=spec.parallel.mode)
    out = args.out or broadcast_object(tempfile.mkdtemp(prefix="steadylm-bench-") if env.is_main else None)
    try:
        trainer = build_run(spec, out, env=env)
        result = trainer.run()
        assert trainer.model is not None and trainer.optimizer is not None
        sizes = state_bytes(trainer.model, trainer.optimizer)
    finally:
        shutdown_distributed()
    if env.is_main:
        rows = read_metrics(f"{out}/metrics.jsonl")
        tokens_per_step = spec.train.batch_size * spec.data.seq_len
        times = [tokens_per_step / r["tokens_per_s"] for r in rows[args.warmup:] if r.get("tokens_per_s")]
        report: dict[str, Any] = {
            "world_size": env.world_size, "parallel": spec.parallel.mode, "preset": spec.model.preset,
            "params": result.num_params["total"], **sizes,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "step_s_median": statistics.median(times) if times else None,
            "step_s_p20": quantile(times, 0.2) if times else None,
            "step_s_p80": quantile(times, 0.8) if times else None,
            "threads_per_rank": spec.train.threads or (env.cpu_threads() if env.world_size > 1 else torch.get_num_threads()),
        }
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
