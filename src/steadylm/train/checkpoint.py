"""Atomic training checkpoints: safetensors weights + optimizer state, RNG and step state.

Layout of ``<run>/checkpoint/``::

    model.safetensors      model state dict (tied weights stored once; aliases in state.json)
    optimizer.safetensors  the optimizer's per-parameter tensors, keys ``"<param index>.<name>"``
    rng.safetensors        torch CPU (and CUDA) generator states
    state.json             step and counters, optimizer hyper-parameters, numpy/python RNG,
                           the run's configs, and the SHA-256 of each file above; written last

No pickle anywhere, so loading a checkpoint cannot execute code. This is format 1, what
single-process runs wrote before the trainer moved to ``torch.distributed.checkpoint`` (format 2,
:mod:`steadylm.train.dcp`, sharded, any world size); :func:`load_checkpoint` reads both.

Atomicity: a checkpoint is written into a fresh staging directory and fsynced; then the current
``checkpoint/`` is renamed to ``checkpoint.old/``, the staging directory to ``checkpoint/``, and
``checkpoint.old/`` deleted. A process killed at any point leaves either ``checkpoint/`` or (only
between the two renames) ``checkpoint.old/`` complete, and :func:`find_checkpoint` picks whichever
is. Corruption (a bad checksum, a truncated or unparsable file, a model that does not match)
raises :class:`steadylm.errors.CheckpointError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from steadylm.errors import CheckpointError
from steadylm.train.atomic import fsync_dir, write_and_sync

__all__ = [
    "CHECKPOINT_DIRNAME",
    "CheckpointState",
    "find_checkpoint",
    "load_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
]

CHECKPOINT_DIRNAME = "checkpoint"
_OLD_SUFFIX = ".old"
STAGING_PREFIX = ".checkpoint.staging-"
_FORMAT_VERSION = 1
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
    """Restore the torch / CUDA / numpy / python generators saved by :func:`save_checkpoint`."""
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
# model and optimizer state <-> flat tensor dicts
# ----------------------------------------------------------------------------------------------


def _model_tensors(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict with shared tensors (tied embeddings) stored once; returns (tensors, aliases)."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple[int, ...], tuple[int, ...], torch.dtype], str] = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach()
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
               tuple(tensor.stride()), tensor.dtype)
        if tensor.numel() > 0 and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = tensor.contiguous().cpu()
    return tensors, aliases


def _optimizer_payload(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state_dict = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param_id, param_state in state_dict["state"].items():
        for name, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{param_id}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(param_id), {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _optimizer_state_dict(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        param_id, name = key.split(".", 1)
        state.setdefault(int(param_id), {})[name] = value
    for param_id, values in meta.get("scalars", {}).items():
        state.setdefault(int(param_id), {}).update(values)
    # JSON turned tuples (AdamW's betas) into lists; give the optimizer back what it saved.
    groups = [
        {key: tuple(value) if key == "betas" and isinstance(value, list) else value for key, value in group.items()}
        for group in meta["param_groups"]
    ]
    return {"state": state, "param_groups": groups}


# ----------------------------------------------------------------------------------------------
# save
# ----------------------------------------------------------------------------------------------


def _write_file(path: Path, data: bytes) -> None:
    """Write one checkpoint file into the staging directory (a seam the crash tests patch)."""
    write_and_sync(path, data)


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


def save_checkpoint(
    run_dir: str | os.PathLike[str],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    counters: dict[str, Any] | None = None,
    configs: dict[str, Any] | None = None,
) -> Path:
    """Atomically write ``run_dir/checkpoint/`` for the state after optimizer step ``step``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / CHECKPOINT_DIRNAME
    for leftover in run_dir.glob(STAGING_PREFIX + "*"):  # from a process killed mid-save
        shutil.rmtree(leftover, ignore_errors=True)

    model_tensors, aliases = _model_tensors(model)
    optim_tensors, optim_meta = _optimizer_payload(optimizer)
    files = {
        "model.safetensors": save_safetensors(model_tensors),
        "optimizer.safetensors": save_safetensors(optim_tensors) if optim_tensors else save_safetensors({}),
        "rng.safetensors": save_safetensors(rng_tensors()),
    }
    state = {
        "format_version": _FORMAT_VERSION,
        "step": int(step),
        "counters": counters or {},
        "configs": configs or {},
        "model_aliases": aliases,
        "optimizer": optim_meta,
        "rng": rng_json(),
        "sha256": {name: hashlib.sha256(data).hexdigest() for name, data in files.items()},
    }

    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=run_dir))
    try:
        staging.chmod(0o755)  # mkdtemp gives 0700; a checkpoint is as readable as the run's files
        for name, data in files.items():
            _write_file(staging / name, data)
        # state.json last: a directory that has it has everything.
        _write_file(staging / STATE_FILE, json.dumps(state, indent=1, allow_nan=True).encode())
        fsync_dir(staging)
        swap_into_place(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


# ----------------------------------------------------------------------------------------------
# load
# ----------------------------------------------------------------------------------------------


def find_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The run's complete checkpoint directory, or None if it has none.

    ``checkpoint/`` when it has its ``state.json``; otherwise ``checkpoint.old/`` (left complete
    by a process killed between the two renames of :func:`save_checkpoint`).
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


def _read_verified(directory: Path, name: str, expected: dict[str, str]) -> dict[str, torch.Tensor]:
    path = directory / name
    if name not in expected:
        raise CheckpointError(f"checkpoint {directory} is corrupt: {STATE_FILE} lists no checksum for {name}")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"checkpoint file {path} is missing or unreadable: {err.strerror or err}") from None
    if hashlib.sha256(data).hexdigest() != expected[name]:
        raise CheckpointError(f"checkpoint file {path} is corrupt (SHA-256 does not match {STATE_FILE})")
    try:
        return load_safetensors(data)
    except Exception as err:  # noqa: BLE001 - any parse failure means a corrupt file
        raise CheckpointError(f"checkpoint file {path} is corrupt: {err}") from None


def read_state_json(directory: Path) -> dict[str, Any]:
    path = directory / STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"checkpoint file {path} is corrupt or unreadable: {err}") from None
    versions = (_FORMAT_VERSION, DCP_FORMAT_VERSION)
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


def load_checkpoint(
    directory: str | os.PathLike[str],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    restore_rng: bool = True,
) -> CheckpointState:
    """Load a checkpoint written by :func:`save_checkpoint` into ``model`` (and ``optimizer``).

    Every file is checked against its SHA-256 before use; any mismatch raises
    :class:`CheckpointError` and leaves ``model``/``optimizer`` untouched. Buffers get exactly
    their saved values, even where a module's post-load hook would recompute them.
    """
    directory = Path(directory)
    state = read_state_json(directory)
    if state["format_version"] == DCP_FORMAT_VERSION:
        from steadylm.train.dcp import load_dcp_checkpoint

        state = load_dcp_checkpoint(directory, model, optimizer, restore_rng=restore_rng)
        return CheckpointState(int(state["step"]), state.get("counters", {}), state.get("configs", {}), directory)
    checksums = state["sha256"]
    model_tensors = _read_verified(directory, "model.safetensors", checksums)
    optim_tensors = _read_verified(directory, "optimizer.safetensors", checksums) if optimizer else {}
    rng_tensors = _read_verified(directory, "rng.safetensors", checksums) if restore_rng else {}

    full_state = dict(model_tensors)
    for alias, canonical in state.get("model_aliases", {}).items():
        if canonical not in model_tensors:
            raise CheckpointError(f"checkpoint {directory} is corrupt: alias {alias} -> missing {canonical}")
        full_state[alias] = model_tensors[canonical]
    expected = model.state_dict()
    # Learnable scalars (λ, α, the embedding scale) were 0-dim before they became shape [1].
    for name, value in full_state.items():
        if value.dim() == 0 and name in expected and expected[name].shape == (1,):
            full_state[name] = value.reshape(1)
    missing = sorted(set(expected) - set(full_state))
    unexpected = sorted(set(full_state) - set(expected))
    mismatched = sorted(
        name for name in set(expected) & set(full_state) if expected[name].shape != full_state[name].shape
    )
    if missing or unexpected or mismatched:
        details = "; ".join(
            f"{label}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
            for label, names in (("missing", missing), ("unexpected", unexpected), ("shape differs", mismatched))
            if names
        )
        raise CheckpointError(f"checkpoint {directory} does not match the model ({details})")
    model.load_state_dict(full_state, strict=True)
    restore_buffers(model, full_state)

    if optimizer is not None:
        try:
            optimizer.load_state_dict(_optimizer_state_dict(optim_tensors, state["optimizer"]))
        except (ValueError, KeyError, TypeError, RuntimeError) as err:
            raise CheckpointError(f"checkpoint {directory}: optimizer state does not match: {err}") from None
        # Moments of a learnable scalar saved 0-dim follow it to shape [1] ("step" stays 0-dim).
        for param, param_state in optimizer.state.items():
            if param.shape == (1,):
                for key, value in param_state.items():
                    if key != "step" and isinstance(value, torch.Tensor) and value.dim() == 0:
                        param_state[key] = value.reshape(1)
    if restore_rng:
        try:
            restore_rng_state(rng_tensors, state["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"checkpoint {directory}: RNG state is corrupt: {err}") from None
    return CheckpointState(int(state["step"]), state.get("counters", {}), state.get("configs", {}), directory)
