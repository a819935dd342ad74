"""Training: ``TrainConfig``, ``Trainer`` / ``TrainResult``, the LR schedule, atomic checkpoints
and the metrics files. See :mod:`steadylm.train.trainer` for what one step does."""

from steadylm.train.checkpoint import (
    CheckpointState,
    find_checkpoint,
    load_checkpoint,
    read_checkpoint_state,
    save_checkpoint,
)
from steadylm.train.config import PRECISIONS, TrainConfig, lr_at
from steadylm.train.metrics import MetricsLog, read_metrics
from steadylm.train.trainer import TIMING_KEYS, Probe, TrainCallback, Trainer, TrainResult, seed_everything

__all__ = [
    "PRECISIONS",
    "TIMING_KEYS",
    "CheckpointState",
    "MetricsLog",
    "Probe",
    "TrainCallback",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "find_checkpoint",
    "load_checkpoint",
    "lr_at",
    "read_checkpoint_state",
    "read_metrics",
    "save_checkpoint",
    "seed_everything",
]
