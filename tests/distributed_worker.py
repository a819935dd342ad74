"""One rank of the multi-process tests (tests/test_distributed.py), launched with torchrun.

``python -m torch.distributed.run --nproc_per_node=2 tests/distributed_worker.py JOBS.json OUT.json``

JOBS.json lists runs ``{"name", "out", "spec" (a RunSpec dict), "resume", "stop_after",
"snapshot"}`` (``snapshot``: rank 0 copies the run directory there after the run). Each is
trained by every rank in the one process group (gloo on CPU, nccl on CUDA) through
:func:`steadylm.train.assemble.build_run`; then every parameter (whole, DTensor shards
gathered) and every buffer is gathered from all ranks and compared. Rank 0 writes, per run, the
logged losses, the final validation loss and the largest difference across ranks.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from steadylm.distributed.env import barrier, init_distributed, shutdown_distributed
from steadylm.precision.linear import Col
from steadylm.train.assemble import build_run
from steadylm.train.metrics import read_metrics
from steadylm.train.spec import RunSpec


def _full(tensor: torch.Tensor) -> torch.Tensor:
    if hasattr(tensor, "full_tensor"):
        tensor = tensor.full_tensor()
    return tensor.detach().to("cpu", torch.float64).clone()


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = {f"param:{name}": _full(p) for name, p in model.named_parameters()}
    for name, buffer in model.named_buffers():
        if name.endswith("fp8_counters"):
            # Counts are per rank by design (summed when read); amax and scales must agree.
            state[f"buffer:{name}[amax,last_amax,last_scale]"] = _full(
                buffer[:, [Col.AMAX, Col.LAST_AMAX, Col.LAST_SCALE]])
        else:
            state[f"buffer:{name}"] = _full(buffer)
    return state


def main() -> None:
    jobs = json.loads(Path(sys.argv[1]).read_text())
    env = init_distributed(timeout_s=120)
    results = {}
    for job in jobs:
        spec = RunSpec.from_dict(job["spec"])
        trainer = build_run(spec, job["out"])
        result = trainer.run(resume=job.get("resume", False), stop_after=job.get("stop_after"))
        assert trainer.model is not None
        state = _state(trainer.model)
        gathered: list[dict[str, torch.Tensor]] = [{} for _ in range(env.world_size)]
        dist.all_gather_object(gathered, state)
        if env.is_main:
            max_diff = {name: max(float((g[name] - state[name]).abs().max()) if state[name].numel() else 0.0
                                  for g in gathered) for name in state}
            rows = read_metrics(Path(job["out"]) / "metrics.jsonl")
            results[job["name"]] = {
                "losses": [row["loss"] for row in rows if "loss" in row],
                "val_loss": result.final_val_loss,
                "rank_max_diff": max_diff,
                "steps_done": result.steps_done,
                "resumed_from": result.resumed_from,
                "fp8_rows": [{k: v for k, v in row.items() if k.startswith("fp8/")} for row in rows
                             if any(k.startswith("fp8/") for k in row)],
            }
        if job.get("snapshot") and env.is_main:
            shutil.copytree(job["out"], job["snapshot"])
        barrier()
    if env.is_main:
        Path(sys.argv[2]).write_text(json.dumps(results))
    shutdown_distributed()


if __name__ == "__main__":
    main()
