"""Sharded, atomic checkpoints with ``torch.distributed.checkpoint`` (DCP).

Layout of ``<run>/checkpoint/`` (``format_version`` 2)::

    .metadata, __<rank>_0.distcp   model + optimizer state, as DCP writes it: each rank saves its
                                   own shards (replicated tensors once), so the checkpoint loads at
                                   any world size, sharded (FSDP2) or not (DDP, one process)
    rng-rank<r>.safetensors        rank r's torch (and CUDA) generator states; python and numpy
                                   generator states in its metadata
    state.json                     step, data position, trainer counters, the run's configs, the
                                   world size, and the SHA-256 of every file above; written last

Atomicity is the one of :mod:`steadylm.train.checkpoint_layout`, across ranks: every rank writes into one
staging directory; only after all ranks have written does rank 0 write ``state.json`` and swap the
staging directory in by renames. A rank killed mid-write leaves ``checkpoint/`` (the last good one)
untouched; the staging leftover is removed by the next save.

DCP keeps its ``.metadata`` as a pickle: load checkpoints of your own runs. For sharing weights,
export to the Hugging Face format (safetensors).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import warnings
from contextlib import contextmanager
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file as load_safetensors_file
from safetensors.torch import save_file as save_safetensors_file
from torch import nn

from steadylm.distributed.env import DistEnv, all_gather_object, broadcast_object
from steadylm.errors import CheckpointError, SteadyLMError
from steadylm.train.atomic import fsync_dir, write_and_sync
from steadylm.train.checkpoint_layout import (
    CHECKPOINT_DIRNAME,
    DCP_FORMAT_VERSION,
    STAGING_PREFIX,
    STATE_FILE,
    read_state_json,
    restore_buffers,
    restore_rng_state,
    rng_json,
    rng_tensors,
    swap_into_place,
)

__all__ = ["DCP_FORMAT_VERSION", "load_dcp_checkpoint", "save_dcp_checkpoint"]

# Fault injection for the crash tests (a real SIGKILL of one rank between its shard write and the
# commit): "STEP:RANK". Read on every save so a test can set it for a child process only.
_KILL_ENV = "STEADYLM_TEST_KILL_IN_CHECKPOINT"


def _state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[dict[str, Any], dict[str, Any]]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model_sd = get_model_state_dict(model)
    optim_sd = get_optimizer_state_dict(model, optimizer) if optimizer is not None else {}
    return model_sd, optim_sd


@contextmanager
def _quiet_single_process() -> Iterator[None]:
    # DCP warns that it "assumes the intent" of a single-process save/load; that is the intent.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _cause(err: BaseException, directory: Path) -> str:
    """The I/O cause of a failed save, in a few words (``No space left on device``).

    ``torch.save`` reports a short write on a full disk as a RuntimeError ("unexpected pos"),
    without the errno, so a file system with no room left is recognised by asking it.
    """
    try:
        if shutil.disk_usage(directory).free < (1 << 16):
            return f"{os.strerror(errno.ENOSPC)} ({_first_line(err)})"
    except OSError:
        pass
    seen: list[BaseException] = [err]
    while seen:
        current = seen.pop()
        if isinstance(current, OSError):
            return current.strerror or str(current)
        failures = getattr(current, "failures", None)  # DCP's CheckpointException: rank -> error
        if isinstance(failures, dict):  # values: (exception, traceback frames)
            for failure in failures.values():
                inner = failure[0] if isinstance(failure, tuple) and failure else getattr(failure, "exc", failure)
                if isinstance(inner, BaseException):
                    seen.append(inner)
        seen.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    return _first_line(err)


def _first_line(err: BaseException) -> str:
    failures = getattr(err, "failures", None)  # DCP's CheckpointException: say what failed, not the ranks
    if isinstance(failures, dict) and failures:
        rank, failure = next(iter(failures.items()))
        inner = failure[0] if isinstance(failure, tuple) and failure else getattr(failure, "exc", failure)
        return f"rank {rank}: {_first_line(inner) if isinstance(inner, BaseException) else inner}"
    text = str(err).strip().splitlines()
    return text[0][:300] if text else type(err).__name__


def _commit(staging: Path, final: Path, step: int, counters: dict[str, Any] | None,
            configs: dict[str, Any] | None, env: DistEnv) -> None:
    """Rank 0, after every rank has written: state.json last, then swap the checkpoint in."""
    files = sorted(p.name for p in staging.iterdir() if p.is_file())
    state = {
        "format_version": DCP_FORMAT_VERSION,
        "step": int(step),
        "data_position": {"next_batch_index": int(step)},
        "counters": counters or {},
        "configs": configs or {},
        "world_size": env.world_size,
        "sha256": {name: _sha256(staging / name) for name in files},
    }
    write_and_sync(staging / STATE_FILE, json.dumps(state, indent=1, allow_nan=True).encode())
    fsync_dir(staging)
    swap_into_place(staging, final)


def rng_file(rank: int) -> str:
    return f"rng-rank{rank}.safetensors"


def _save_rng(path: Path) -> None:
    save_safetensors_file(rng_tensors(), str(path), metadata={"rng": json.dumps(rng_json())})


def _restore_rng(path: Path) -> None:
    from safetensors import safe_open

    tensors = load_safetensors_file(str(path))
    with safe_open(str(path), framework="pt") as handle:
        states = json.loads((handle.metadata() or {})["rng"])
    restore_rng_state(tensors, states)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fault_point(step: int, env: DistEnv) -> None:
    target = os.environ.get(_KILL_ENV)
    if target and target == f"{step}:{env.rank}":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def save_dcp_checkpoint(
    run_dir: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    step: int,
    *,
    counters: dict[str, Any] | None = None,
    configs: dict[str, Any] | None = None,
    env: DistEnv | None = None,
) -> Path:
    """Write ``run_dir/checkpoint/`` for the state after optimizer step ``step``; every rank calls
    it (it is collective). Returns the checkpoint directory."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    env = env or DistEnv.current()
    run_dir = Path(run_dir)
    final = run_dir / CHECKPOINT_DIRNAME
    staging = run_dir / f"{STAGING_PREFIX}{step}"
    error: str | None = None
    if env.is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            for leftover in run_dir.glob(STAGING_PREFIX + "*"):  # from a process killed mid-save
                shutil.rmtree(leftover, ignore_errors=True)
            staging.mkdir()
        except OSError as err:
            error = f"cannot create {staging}: {err.strerror or err}"
    error = broadcast_object(error)
    if error:
        raise CheckpointError(error)

    try:
        error = None
        try:
            model_sd, optim_sd = _state_dicts(model, optimizer)
            with _quiet_single_process():
                dcp.save({"model": model_sd, "optim": optim_sd},
                         storage_writer=dcp.FileSystemWriter(str(staging), sync_files=True))
            _save_rng(staging / rng_file(env.rank))
        except SteadyLMError:
            raise  # a second preemption signal (RunInterrupted) ends the save as it is
        except (Exception, CheckpointException) as err:  # noqa: BLE001 - DCP wraps each rank's error
            # (CheckpointException is a BaseException)
            error = f"cannot write checkpoint {final} (staging {staging}): {_cause(err, staging.parent)}"
        _fault_point(step, env)
        errors = all_gather_object(error)  # every rank's files are on disk, or someone failed
        error = next((e for e in errors if e), None)
        if error is None and env.is_main:
            try:
                _commit(staging, final, step, counters, configs, env)
            except OSError as err:
                error = f"cannot write checkpoint {final}: {err.strerror or err}"
        error = broadcast_object(error)
        if error:
            raise CheckpointError(error + "; the previous checkpoint is intact")
    except BaseException:
        # a failed write, or a second preemption signal: the last good checkpoint stays in place
        if env.is_main:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def _verify(directory: Path, state: dict[str, Any]) -> str | None:
    for name, expected in state["sha256"].items():
        path = directory / name
        try:
            if _sha256(path) != expected:
                return f"checkpoint file {path} is corrupt (SHA-256 does not match {STATE_FILE})"
        except OSError as err:
            return f"checkpoint file {path} is missing or unreadable: {err.strerror or err}"
    return None


def load_dcp_checkpoint(
    directory: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    restore_rng: bool = True,
    env: DistEnv | None = None,
) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_dcp_checkpoint` at any world size (collective).

    Rank 0 checks every file against its SHA-256 first; a mismatch raises
    :class:`CheckpointError` on every rank. Buffers get exactly their saved values (BHyT c_ℓ is not
    recomputed), so a resumed run continues as the uninterrupted one would. The RNG of rank r is
    restored from rank r's file when the saving run had that rank. Returns the ``state.json`` dict.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    env = env or DistEnv.current()
    directory = Path(directory)
    state = read_state_json(directory)
    if state["format_version"] != DCP_FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {directory} is not a DCP checkpoint (format {state['format_version']})")
    error = _verify(directory, state) if env.is_main else None
    error = broadcast_object(error)
    if error:
        raise CheckpointError(error)

    model_sd, optim_sd = _state_dicts(model, optimizer)
    # The state dict aliases the model's own tensors; buffers get their own storage so that a
    # post-load hook recomputing them (BHyT c_l) cannot overwrite the saved values before they
    # are put back.
    buffer_names = {name for name, _ in model.named_buffers()}
    model_sd = {k: (v.clone() if k in buffer_names and isinstance(v, torch.Tensor) else v) for k, v in model_sd.items()}
    to_load: dict[str, Any] = {"model": model_sd}
    if optimizer is not None:
        to_load["optim"] = optim_sd
    try:
        with _quiet_single_process():
            dcp.load(to_load, checkpoint_id=str(directory))
    except (Exception, CheckpointException) as err:  # noqa: BLE001 - also RuntimeError / KeyError
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {directory} does not match the model: {first}") from None
    set_model_state_dict(model, to_load["model"])
    restore_buffers(model, to_load["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, to_load["optim"])
    rng_path = directory / rng_file(env.rank)
    if restore_rng and rng_path.exists():
        _restore_rng(rng_path)
    return state
