"""Experiment trackers: every metrics row of a run, live, in TensorBoard or Weights & Biases.

::

    steadylm train --out runs/x --tracker tensorboard,wandb ...   # (train.trackers in a run spec)
    tensorboard --logdir runs/x/tensorboard

Rank 0 sends each row the :class:`~steadylm.train.trainer.Trainer` writes to ``metrics.jsonl`` (the
keys of :mod:`steadylm.probes.keys`, unchanged) to every tracker of ``train.trackers`` as it is
written, and the run's configs (model, train, data and the whole run spec) as hyper-parameters.
A ``--resume`` continues the same tracker run:

* **TensorBoard** (``torch.utils.tensorboard``, needs the ``tensorboard`` package) appends to
  ``RUN_DIR/tensorboard`` with ``purge_step`` = the first step after the checkpoint, so events a
  crashed run wrote past its last checkpoint are dropped by every reader, as ``metrics.jsonl`` drops
  those rows. A fresh run replaces the directory's earlier event files (as it does the metrics).
* **Weights & Biases** (``wandb``; ``WANDB_MODE=offline`` logs to ``RUN_DIR/wandb`` with no network)
  keeps its run id in ``RUN_DIR/trackers.json`` and resumes it with ``resume="allow"``; the project
  is ``$WANDB_PROJECT`` (default ``steadylm``). Steps a crashed run logged past its checkpoint stay
  in W&B (it ignores steps below its last one): their values are the ones the resumed run
  recomputes, because a resume is bit-exact.

Another backend is one :func:`register_tracker` entry: a class with ``start`` / ``log_metrics`` /
``finish`` (:class:`Tracker`), the module it needs and the extra that installs it. A missing package
is one :class:`~steadylm.errors.ConfigError` line naming the extra, raised before training starts.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from steadylm.errors import ConfigError

__all__ = [
    "TRACKERS",
    "TensorBoardTracker",
    "Tracker",
    "TrackerCallback",
    "TrackerEntry",
    "WandbTracker",
    "check_trackers",
    "register_tracker",
    "tracker_callback",
    "tracker_names",
]

#: File in the run directory where trackers keep what a resume needs (the W&B run id).
STATE_FILE = "trackers.json"


class Tracker(Protocol):
    """One tracker run for one training run (rank 0 only)."""

    def start(self, run_dir: Path, configs: Mapping[str, Any], start_step: int) -> None:
        """Open the tracker run. ``start_step``: the checkpoint step training continues from (0 for
        a fresh run, whose earlier logs in ``run_dir`` are replaced); ``configs``: the run's
        ``config.json`` (``model``, ``train``, ``data``, ``run_spec``), logged as hyper-parameters."""

    def log_metrics(self, row: Mapping[str, float], step: int) -> None:
        """Log one metrics row (numbers only) at optimizer step ``step``."""

    def finish(self) -> None:
        """Flush and close (also after a failed run)."""


@dataclass(frozen=True)
class TrackerEntry:
    """A registered backend: its factory, the importable module it needs and the extra installing it."""

    factory: Callable[[], Tracker]
    requires: str
    extra: str


TRACKERS: dict[str, TrackerEntry] = {}


def register_tracker(name: str, factory: Callable[[], Tracker], *, requires: str, extra: str) -> None:
    """Make ``name`` a value of ``train.trackers`` (``--tracker``)."""
    TRACKERS[name] = TrackerEntry(factory, requires, extra)


def tracker_names() -> list[str]:
    """The registered tracker names (the choices of ``--tracker``)."""
    return sorted(TRACKERS)


def check_trackers(names: Iterable[str], *, installed: bool = True) -> None:
    """Raise :class:`ConfigError` for an unknown name, or (``installed``) for a backend whose package
    is missing, naming the extra to install; imports nothing."""
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"train.trackers: unknown tracker {name!r}; choose from {tracker_names()}")
        entry = TRACKERS[name]
        if installed and importlib.util.find_spec(entry.requires) is None:
            raise ConfigError(f"--tracker {name} needs the {entry.requires!r} package: "
                              f"pip install 'steadylm[{entry.extra}]'")


def _numbers(row: Mapping[str, Any]) -> dict[str, float]:
    """The loggable values of a metrics row: numbers (a bool flag as 0/1), ``step`` left out."""
    out: dict[str, float] = {}
    for key, value in row.items():
        if key == "step" or value is None:
            continue
        if isinstance(value, bool):
            out[key] = float(value)
        elif isinstance(value, (int, float)):
            out[key] = float(value)
    return out


def _flat_hparams(configs: Mapping[str, Any]) -> dict[str, Any]:
    """``section.key -> value`` of the run spec (or of the configs without one): scalars as they
    are, anything else as JSON text (TensorBoard's hparams take bool, int, float, str only)."""
    spec = configs.get("run_spec")
    source = spec if isinstance(spec, Mapping) else configs
    flat: dict[str, Any] = {}
    for section, values in source.items():
        items = values.items() if isinstance(values, Mapping) else [("", values)]
        for key, value in items:
            name = f"{section}.{key}" if key else str(section)
            flat[name] = value if isinstance(value, (bool, int, float, str)) else json.dumps(value, default=str)
    return flat


def _read_state(run_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((run_dir / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_state(run_dir: Path, name: str, values: dict[str, Any]) -> None:
    from steadylm.train.atomic import atomic_write_text

    state = _read_state(run_dir)
    state[name] = values
    atomic_write_text(run_dir / STATE_FILE, json.dumps(state, indent=2))


# ------------------------------------------------------------------------------------------------
# backends
# ------------------------------------------------------------------------------------------------


class TensorBoardTracker:
    """``torch.utils.tensorboard.SummaryWriter`` on ``RUN_DIR/tensorboard``; scalars under the
    metrics keys, the run spec as hparams and as text."""

    #: subdirectory of the run directory holding the event files
    DIRNAME = "tensorboard"
    #: seconds between background flushes: a live dashboard lags the run by at most this
    FLUSH_SECS = 10

    def __init__(self) -> None:
        self.writer: Any = None

    def start(self, run_dir: Path, configs: Mapping[str, Any], start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        log_dir = run_dir / self.DIRNAME
        if start_step == 0 and log_dir.is_dir():
            for old in log_dir.glob("events.out.tfevents.*"):
                old.unlink()
        # purge_step: readers drop the events of steps >= it written before this point (a crashed
        # run's rows past its checkpoint); a fresh run has nothing to purge.
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=start_step + 1 if start_step > 0 else None,
                                    flush_secs=self.FLUSH_SECS)
        if start_step == 0:  # a resumed run keeps the hyper-parameters written at step 0
            exp, ssi, sei = hparams(_flat_hparams(configs), {})
            for summary in (exp, ssi, sei):
                self.writer.file_writer.add_summary(summary)
            self.writer.add_text("config", "```json\n" + json.dumps(dict(configs), indent=2, default=str)
                                 + "\n```", global_step=0)

    def log_metrics(self, row: Mapping[str, float], step: int) -> None:
        for key, value in row.items():
            self.writer.add_scalar(key, value, global_step=step)

    def finish(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None


class WandbTracker:
    """A Weights & Biases run in ``RUN_DIR/wandb``; resumed by the id kept in ``trackers.json``."""

    def __init__(self) -> None:
        self.run: Any = None

    def start(self, run_dir: Path, configs: Mapping[str, Any], start_step: int) -> None:
        import wandb

        saved = _read_state(run_dir).get("wandb", {}) if start_step > 0 else {}
        run_id = saved.get("run_id") if isinstance(saved, dict) else None
        # W&B run ids: lowercase letters and digits (its own generator is not public API)
        run_id = run_id or "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
        _write_state(run_dir, "wandb", {"run_id": run_id})
        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "steadylm"), name=run_dir.name,
                                  id=run_id, resume="allow", dir=str(run_dir),
                                  settings=wandb.Settings(console="off"))
        except Exception as err:  # noqa: BLE001 - wandb raises many types (login, network, usage)
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
            raise ConfigError(f"--tracker wandb could not start a run: {first} (log in with `wandb login`, "
                              "or set WANDB_MODE=offline to log to RUN_DIR/wandb without a network)") from None
        # The configs of a resumed run may differ in what a resume may change (steps, trackers).
        self.run.config.update(dict(configs), allow_val_change=True)

    def log_metrics(self, row: Mapping[str, float], step: int) -> None:
        self.run.log(dict(row), step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


register_tracker("tensorboard", TensorBoardTracker, requires="tensorboard", extra="tensorboard")
register_tracker("wandb", WandbTracker, requires="wandb", extra="wandb")


# ------------------------------------------------------------------------------------------------
# the Trainer callback
# ------------------------------------------------------------------------------------------------


class TrackerCallback:
    """A Trainer callback (rank 0: the Trainer calls callbacks on rank 0 only) that drives trackers:
    ``on_train_start`` opens them, ``on_log`` sends each metrics row, ``on_train_end`` closes them."""

    def __init__(self, run_dir: str | os.PathLike[str], trackers: Sequence[Tracker]) -> None:
        self.run_dir = Path(run_dir)
        self.trackers = list(trackers)
        self._open: list[Tracker] = []

    def on_train_start(self, step: int, configs: Mapping[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.start(self.run_dir, configs, step)
            self._open.append(tracker)

    def on_log(self, row: Mapping[str, Any]) -> None:
        step = int(row["step"])
        values = _numbers(row)  # NaN/inf included: a diverged step is logged as it happened
        for tracker in self._open:
            tracker.log_metrics(values, step)

    def on_train_end(self) -> None:
        open_trackers, self._open = self._open, []
        for tracker in open_trackers:
            tracker.finish()


def tracker_callback(names: Sequence[str], run_dir: str | os.PathLike[str]) -> TrackerCallback | None:
    """The callback logging a run in ``run_dir`` to the trackers ``names`` (None for none); raises
    :class:`ConfigError` naming the extra when a backend's package is missing."""
    if not names:
        return None
    check_trackers(names)
    return TrackerCallback(run_dir, [TRACKERS[name].factory() for name in dict.fromkeys(names)])
