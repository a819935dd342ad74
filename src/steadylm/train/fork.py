"""Fork a run at its checkpoint: a new run directory that continues from the same state.

::

    fork_run("runs/a", "runs/b", model_config=cfg_b)   # b = a's checkpoint + metrics so far
    Trainer(cfg_b, train_cfg, data, "runs/b").run(resume=True)

The new run gets a copy of the source's checkpoint directory (whatever its file layout — only
``state.json`` is read and rewritten) and of its metrics rows up to the checkpoint's step. With
``model_config`` the checkpoint records that model config instead of the source's, so that the
trainer, resuming, builds the new architecture and loads the old weights into it: an activation
swap (the PowLU paper's mid-training switch) adds no parameter, so the weights, optimizer moments,
step, LR schedule and batch order all carry over. Nothing in the source run is modified.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from steadylm.errors import CheckpointError
from steadylm.train.atomic import atomic_write_text
from steadylm.train.checkpoint import CHECKPOINT_DIRNAME, find_checkpoint, read_checkpoint_state
from steadylm.train.metrics import read_metrics

__all__ = ["fork_run"]

_STATE_FILE = "state.json"
_METRICS_FILE = "metrics.jsonl"


def fork_run(
    src_run: str | os.PathLike[str],
    dst_run: str | os.PathLike[str],
    *,
    model_config: Any = None,
    step: int | None = None,
) -> Path:
    """Make ``dst_run`` a copy of ``src_run`` at its checkpoint; returns the new checkpoint dir.

    ``model_config`` (a ``ModelConfig`` or its dict): the model the forked run continues with.
    ``step``: the step the caller expects to fork at; a checkpoint at another step raises
    :class:`CheckpointError` (only a checkpointed step can be forked). ``dst_run`` is replaced.
    """
    src, dst = Path(src_run), Path(dst_run)
    if src.resolve() == dst.resolve():
        raise CheckpointError(f"cannot fork {src} into itself")
    ckpt = find_checkpoint(src)
    if ckpt is None:
        raise CheckpointError(f"no checkpoint in {src} to fork from")
    state = read_checkpoint_state(ckpt)
    if step is not None and state.step != step:
        raise CheckpointError(f"cannot fork {src} at step {step}: its checkpoint is at step {state.step}")
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    dst_ckpt = dst / CHECKPOINT_DIRNAME
    shutil.copytree(ckpt, dst_ckpt)
    rows = [r for r in read_metrics(src / _METRICS_FILE) if int(r.get("step", 0)) <= state.step]
    atomic_write_text(dst / _METRICS_FILE, "".join(json.dumps(r) + "\n" for r in rows))
    if model_config is not None:
        model = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
        state_path = dst_ckpt / _STATE_FILE
        raw = json.loads(state_path.read_text(encoding="utf-8"))
        raw.setdefault("configs", {})["model"] = model
        atomic_write_text(state_path, json.dumps(raw, indent=1, allow_nan=True))
    return dst_ckpt
