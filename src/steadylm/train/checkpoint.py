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
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from steadylm.errors import CheckpointError
from steadylm.train.atomic import fsync_dir, write_and_sync
# The directory layout is re-exported: callers find, read and load checkpoints of either format here.
from steadylm.train.checkpoint_layout import *  # noqa: F403
from steadylm.train.checkpoint_layout import __all__ as _LAYOUT_NAMES
from steadylm.train.dcp import load_dcp_checkpoint

__all__ = [*_LAYOUT_NAMES, "load_checkpoint", "save_checkpoint"]

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
        "format_version": SAFETENSORS_FORMAT_VERSION,
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
