"""``steadylm train``: one run from a run spec, on one process or many.

::

    steadylm train --out runs/x --preset micro --activation powlu --norm bhyt --steps 2000
    steadylm train --out runs/x --config run.toml --set train.lr=1e-3
    torchrun --standalone --nproc_per_node=8 -m steadylm train --out runs/x --parallel fsdp ...
    steadylm train --out runs/x --resume          # continue runs/x with its saved spec

Every rank parses the same arguments, so bad input fails on every rank with the same one-line
error before any process group exists. Rank 0 writes the run directory (``config.json`` with the
full run spec, ``metrics.jsonl``/``metrics.csv``); all ranks write the sharded checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from steadylm.errors import ConfigError, DistributedError, RunPreempted
from steadylm.train.assemble import RUN_SPEC_KEY, build_run
from steadylm.train.spec import RunSpec, add_spec_arguments, spec_from_args

__all__ = ["EXIT_PREEMPTED", "add_arguments", "run", "train_from_spec"]

#: Exit status of a run stopped by SIGTERM/SIGUSR1 after writing its checkpoint (EX_TEMPFAIL:
#: "try again" — a job script requeues on it and relaunches with ``--resume auto``).
EXIT_PREEMPTED = RunPreempted.exit_code


def _resume_mode(text: str) -> bool | str:
    lowered = text.lower()
    if lowered in ("auto",):
        return "auto"
    if lowered in ("true", "yes", "1"):
        return True
    raise argparse.ArgumentTypeError(f"--resume takes no value or 'auto', got {text!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", metavar="DIR", required=True,
                        help="run directory: config.json, metrics.jsonl/.csv, checkpoint/")
    parser.add_argument("--resume", nargs="?", const=True, default=False, type=_resume_mode, metavar="auto",
                        help="continue from the checkpoint in --out (with its saved spec unless "
                        "--config is given; flags still override); '--resume auto' starts fresh "
                        "when there is no checkpoint, so a requeued job can always pass it")
    parser.add_argument("--stop-after", type=int, default=None, metavar="STEP",
                        help="stop after this step with a checkpoint, as a preempted job would; "
                        "--resume then finishes the same run")
    add_spec_arguments(parser)


def _saved_spec(out: Path) -> RunSpec | None:
    path = out / "config.json"
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8")).get(RUN_SPEC_KEY)
    except (OSError, ValueError, AttributeError):
        return None
    return RunSpec.from_dict(saved, source=str(path)) if isinstance(saved, dict) else None


def train_from_spec(spec: RunSpec, out: str | Path, *, resume: bool | str = False,
                    stop_after: int | None = None, callbacks: Sequence[Any] = ()) -> Any:
    """Train ``spec`` into ``out`` in this process (one rank of a process group if one is
    initialised): :func:`~steadylm.train.assemble.build_run`, then run. Returns the
    :class:`~steadylm.train.TrainResult`."""
    return build_run(spec, out, callbacks=callbacks).run(resume=resume, stop_after=stop_after)


def _is_peer_failure(err: BaseException) -> bool:
    import torch.distributed as dist

    backend_errors = tuple(getattr(dist, name) for name in ("DistBackendError", "DistNetworkError", "DistError")
                           if hasattr(dist, name))
    if isinstance(err, backend_errors):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(
        marker in text for marker in ("Connection closed by peer", "Connection reset by peer", "Timed out",
                                      "timed out", "Broken pipe", "gloo", "NCCL"))


def run(args: argparse.Namespace) -> int:
    from steadylm.distributed.env import init_distributed, shutdown_distributed

    out = Path(args.out)
    base = _saved_spec(out) if args.resume else None
    spec = spec_from_args(args, base=base)
    if args.stop_after is not None and not 1 <= args.stop_after <= spec.train.steps:
        raise ConfigError(f"--stop-after must be in [1, train.steps={spec.train.steps}], got {args.stop_after}")
    env = init_distributed(spec.parallel.backend, spec.parallel.timeout_s, mode=spec.parallel.mode)
    try:
        result = train_from_spec(spec, out, resume=args.resume, stop_after=args.stop_after)
    except Exception as err:
        if env.world_size > 1 and _is_peer_failure(err):
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
            raise DistributedError(
                f"rank {env.rank} of {env.world_size}: a collective failed, so a peer rank died or stalled "
                f"(parallel.timeout_s={spec.parallel.timeout_s:g}); the last checkpoint is intact: {first}"
            ) from None
        raise
    finally:
        shutdown_distributed()
    if env.is_main:
        val = f"{result.final_val_loss:.4f}" if result.final_val_loss is not None else "n/a"
        state = (f"diverged at step {result.diverged_at}: {result.divergence_reason}" if result.diverged
                 else f"{result.steps_done}/{result.total_steps} steps")
        print(f"{out}: {state}, val loss {val}, {result.tokens_per_s:,.0f} tokens/s "
              f"({env.world_size} process{'es' if env.world_size > 1 else ''}, {spec.parallel.mode})")
        if result.preempted_at is not None:
            print(f"preempted by {result.preempt_signal} at step {result.preempted_at}: checkpoint written; "
                  f"continue with --resume (exit status {EXIT_PREEMPTED})", file=sys.stderr)
    if result.preempted_at is not None:
        return EXIT_PREEMPTED
    return 1 if result.diverged else 0
