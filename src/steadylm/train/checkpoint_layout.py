"""The checkpoint directory: its layout, its atomic swap, and what every checkpoint format shares.

``<run>/checkpoint/`` holds one checkpoint; ``state.json`` is written last and names the format
(1: single-process safetensors, :mod:`steadylm.train.checkpoint`; 2: ``torch.distributed.checkpoint``
shards, :mod:`steadylm.train.dcp`), the step, the trainer's counters, the run's configs and the
SHA-256 of every other file. A new checkpoint is staged in ``.checkpoint.staging-*`` and swapped in
by renames (current -> ``checkpoint.old/``, staging -> ``checkpoint/``, drop ``.old``), so a process
killed at any point leaves either ``checkpoint/`` or ``checkpoint.old/`` complete, and
:func:`find_checkpoint` picks whichever is.

Both formats import this module and nothing of each other; :func:`steadylm.train.checkpoint.load_checkpoint`
reads either.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from steadylm.errors import CheckpointError
from steadylm.train.atomic import fsync_dir

__all__ = [
    "CHECKPOINT_DIRNAME",
    "DCP_FORMAT_VERSION",
    "SAFETENSORS_FORMAT_VERSION",
    "STAGING_PREFIX",
    "STATE_FILE",
    "CheckpointState",
    "find_checkpoint",
    "read_checkpoint_state",
    "read_state_json",
    "restore_buffers",
    "restore_rng_state",
    "rng_json",
    "rng_tensors",
    "swap_into_place",
]

CHECKPOINT_DIRNAME = "checkpoint"
_OLD_SUFFIX = ".old"
STAGING_PREFIX = ".checkpoint.staging-"
#: Single-process safetensors checkpoints (0.1, :mod:`steadylm.train.checkpoint`).
SAFETENSORS_FORMAT_VERSION = 1
#: Checkpoints written by the trainer (``torch.distributed.checkpoint``, :mod:`steadylm.train.dcp`).
DCP_FORMAT_VERSION = 2
STATE_FILE = "state.json"


@dataclass
class CheckpointState:
    """What a checkpoint holds besides the tensors that go straight into model and optimizer."""

    step: int
    counters: dict[str, Any] = field(default_factory=dict)  # tokens_seen, train_time_s, ...
    configs: dict[str, Any] = field(default_factory=dict)  # model / train / data descriptions
    path: Path | None = None


# ----------------------------------------------------------------------------------------------
# RNG state
# ----------------------------------------------------------------------------------------------


def rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{index}"] = state
    return tensors


def rng_json() -> dict[str, Any]:
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": {
            "kind": np_state[0],
            "keys": np_state[1].tolist(),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
    }


def restore_rng_state(tensors: dict[str, torch.Tensor], states: dict[str, Any]) -> None:
    """Restore the torch / CUDA / numpy / python generators saved with :func:`rng_tensors` / :func:`rng_json`."""
    torch.set_rng_state(tensors["torch_cpu"])
    cuda_states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda_"))]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])
    version, state, gauss = states["python"]
    random.setstate((version, tuple(state), gauss))
    np_state = states["numpy"]
    np.random.set_state(
        (np_state["kind"], np.asarray(np_state["keys"], dtype=np.uint32), np_state["pos"],
         np_state["has_gauss"], np_state["cached_gaussian"])
    )


# ----------------------------------------------------------------------------------------------
# the directory
# ----------------------------------------------------------------------------------------------


def swap_into_place(staging: Path, final: Path) -> None:
    """Make ``staging`` the checkpoint: current -> .old, staging -> current, drop .old."""
    old = final.with_name(final.name + _OLD_SUFFIX)
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.rename(final, old)
        fsync_dir(final.parent)
    os.rename(staging, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The run's complete checkpoint directory, or None if it has none.

    ``checkpoint/`` when it has its ``state.json``; otherwise ``checkpoint.old/`` (left complete
    by a process killed between the two renames of :func:`swap_into_place`).
    """
    run_dir = Path(run_dir)
    current = run_dir / CHECKPOINT_DIRNAME
    if (current / STATE_FILE).is_file():
        return current
    previous = run_dir / (CHECKPOINT_DIRNAME + _OLD_SUFFIX)
    if (previous / STATE_FILE).is_file():
        return previous
    if current.is_dir():
        raise CheckpointError(f"checkpoint {current} is incomplete: it has no {STATE_FILE}")
    return None


def read_state_json(directory: Path) -> dict[str, Any]:
    path = directory / STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"checkpoint file {path} is corrupt or unreadable: {err}") from None
    versions = (SAFETENSORS_FORMAT_VERSION, DCP_FORMAT_VERSION)
    if not isinstance(state, dict) or state.get("format_version") not in versions:
        raise CheckpointError(
            f"checkpoint file {path} is corrupt or has an unsupported format "
            f"(expected format_version in {list(versions)})"
        )
    required = ("step", "sha256", "world_size") if state["format_version"] == DCP_FORMAT_VERSION else (
        "step", "sha256", "optimizer", "rng")
    for key in required:
        if key not in state:
            raise CheckpointError(f"checkpoint file {path} is corrupt: missing {key!r}")
    return state


def read_checkpoint_state(directory: str | os.PathLike[str]) -> CheckpointState:
    """Step, counters and configs of a checkpoint, without loading any tensors."""
    directory = Path(directory)
    state = read_state_json(directory)
    return CheckpointState(int(state["step"]), state.get("counters", {}), state.get("configs", {}), directory)


@torch.no_grad()
def restore_buffers(model: torch.nn.Module, saved: dict[str, Any]) -> None:
    """Put saved buffers back verbatim after ``load_state_dict``.

    Post-load hooks may recompute buffers from the weights (BHyT's c_l is refreshed on load); a
    resumed run must continue with the values the uninterrupted run had at this step (c_l from
    the last K-step refresh).
    """
    for name, buffer in model.named_buffers():
        value = saved.get(name)
        if isinstance(value, torch.Tensor) and value.shape == buffer.shape:
            buffer.copy_(value)
