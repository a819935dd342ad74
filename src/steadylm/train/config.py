"""``TrainConfig``: the validated hyper-parameters of one training run, and the LR schedule."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from steadylm.config_fields import spec_field
from steadylm.errors import ConfigError, check_choice
from steadylm.precision.apply import SCOPES as _FP8_SCOPES
from steadylm.precision.backends import FP8_BACKENDS
from steadylm.precision.backends import TORCHAO_RECIPES as FP8_RECIPES
from steadylm.precision.linear import SCALINGS as _FP8_SCALINGS
from steadylm.train.trackers import check_trackers, tracker_names

__all__ = ["FP8_BACKENDS", "FP8_RECIPES", "OPTIMIZER_IMPLEMENTATIONS", "PRECISIONS", "TrainConfig", "lr_at"]

PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp8")

#: ``torch.optim.AdamW``'s implementations, named as torchtitan's ``optimizer.implementation``
#: names them -> the keyword arguments that select one. "fused" updates all parameters of a device
#: and dtype in one kernel (CPU and CUDA); "foreach" runs one multi-tensor op per update term;
#: "for-loop" one op per parameter and term, which is what torch picks on CPU when told nothing
#: (micro preset, 6.5 M parameters on this 2-core CPU: 3.2 ms fused, 13.9 ms for-loop, 17.3 ms
#: foreach per step; BENCHMARKS.md).
OPTIMIZER_IMPLEMENTATIONS: dict[str, dict[str, bool]] = {
    "fused": {"fused": True, "foreach": False},
    "foreach": {"fused": False, "foreach": True},
    "for-loop": {"fused": False, "foreach": False},
}


def _check_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"TrainConfig.{name} must be an integer, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        upper = "" if maximum is None else f" and <= {maximum}"
        raise ConfigError(f"TrainConfig.{name} must be >= {minimum}{upper}, got {value}")


def _check_real(name: str, value: Any, low: float, high: float = math.inf, *, low_open: bool = False,
                high_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"TrainConfig.{name} must be a finite number, got {value!r}")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open or high == math.inf else ']'}"
        raise ConfigError(f"TrainConfig.{name} must be in {interval}, got {value}")


@dataclass
class TrainConfig:
    """Hyper-parameters of a run. Steps are counted from 1: step ``k`` is the ``k``-th optimizer
    update, and every ``*_every`` interval fires when ``k`` is a multiple of it.

    * LR: linear warm-up to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr`` at the
      last step (:func:`lr_at`).
    * AdamW with ``betas=(beta1, beta2)``, in the implementation ``optimizer_impl`` names
      (:data:`OPTIMIZER_IMPLEMENTATIONS`); ``weight_decay`` goes to the groups the model's
      ``param_groups`` marks for decay. ``grad_clip`` is the max global L2 norm (0 disables it).
    * ``precision``: ``fp32``; ``bf16`` autocast; ``fp8`` = FP8 linears (``fp8_scope``,
      ``fp8_scaling``) with bf16 autocast for the rest.
    * ``eval_every``/``ckpt_every``: 0 means only at the end. Validation uses a fixed set of
      ``eval_batches`` batches. ``log_every``: metrics row interval (rows are also written at
      evaluation steps, at the last step, and whenever a probe returns metrics).
    * ``probe_every``: the sampling interval for the run's probes. Probes are called every step
      and decide themselves whether to sample (the contract); the lab builds them with this value.
    * ``trackers``: experiment trackers (:mod:`steadylm.train.trackers`) fed every metrics row.
    * ``device``: ``"auto"`` picks CUDA when available. ``threads``: torch intra-op threads, None
      leaves torch's default. ``progress``: rich progress bar; None shows it only on a terminal.
    """

    steps: int = spec_field(200, help="optimizer steps of the run", flag="--steps")
    batch_size: int = spec_field(16, help="global batch: sequences per optimizer step, split over "
                                 "ranks and micro-batches", flag="--batch-size")
    lr: float = spec_field(3e-3, help="peak learning rate (AdamW)", flag="--lr")
    min_lr: float = spec_field(3e-4, help="learning rate at the last step (cosine decay)")
    warmup_steps: int = spec_field(20, help="linear warm-up steps")
    weight_decay: float = spec_field(0.1, help="AdamW weight decay of the decayed groups")
    grad_clip: float = spec_field(1.0, help="max global gradient L2 norm (0: no clipping)")
    precision: str = spec_field("fp32", help="fp32; bf16 autocast; fp8 linears + bf16 autocast",
                                flag="--precision", choices=PRECISIONS)
    seed: int = spec_field(0, help="seed of initialisation and batch order", flag="--seed")
    eval_every: int = spec_field(50, help="validation interval in steps (0: only at the end)")
    eval_batches: int = spec_field(4, help="validation batches (a fixed set)")
    ckpt_every: int = spec_field(0, help="checkpoint interval in steps (0: only at the end)",
                                 flag="--ckpt-every")
    log_every: int = spec_field(1, help="metrics row interval in steps")
    probe_every: int = spec_field(10, help="probe sampling interval in steps")
    fp8_scope: str = spec_field("ffn", help="FP8 linears: the FFN projections, or all but the head",
                                choices=_FP8_SCOPES)
    fp8_scaling: str = spec_field("current", help="steadylm FP8 scaling: per-tensor current or "
                                  "delayed (amax history)", choices=_FP8_SCALINGS)
    fp8_backend: str = spec_field("steadylm", help="FP8 implementation: steadylm's FP8Linear (with "
                                  "counters) or torchao float8", flag="--fp8-backend",
                                  choices=FP8_BACKENDS)
    fp8_recipe: str = spec_field("tensorwise", help="torchao float8 recipe",
                                 choices=FP8_RECIPES)
    grad_accum: int = spec_field(1, help="micro-batches per optimizer step (gradient accumulation)",
                                 flag="--grad-accum")
    beta1: float = spec_field(0.9, help="AdamW beta1")
    beta2: float = spec_field(0.95, help="AdamW beta2")
    adam_eps: float = spec_field(1e-8, help="AdamW epsilon")
    optimizer_impl: str = spec_field("fused", help="AdamW implementation: fused (one kernel per step), "
                                     "foreach or for-loop", flag="--optimizer-impl",
                                     choices=tuple(OPTIMIZER_IMPLEMENTATIONS))
    device: str = spec_field("auto", help="'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'; "
                             "under torchrun each rank takes cuda:LOCAL_RANK")
    threads: int | None = spec_field(None, help="torch intra-op threads (default: torch's; under "
                                     "torchrun on CPU: cores / local world size)")
    progress: bool | None = spec_field(None, help="progress bar (default: on a terminal only)")
    trackers: list[str] = spec_field(default_factory=list, help="experiment trackers rank 0 logs every "
                                     "metrics row and the run spec to, comma-separated: tensorboard "
                                     "(RUN_DIR/tensorboard), wandb (WANDB_MODE=offline: no network); a "
                                     "resume continues the same tracker run", flag="--tracker",
                                     choices=tracker_names)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid field and its allowed range."""
        _check_int("steps", self.steps, 1)
        _check_int("batch_size", self.batch_size, 1)
        _check_real("lr", self.lr, 0.0, low_open=True)
        _check_real("min_lr", self.min_lr, 0.0)
        if self.min_lr > self.lr:
            raise ConfigError(f"TrainConfig.min_lr must be in [0, lr={self.lr}], got {self.min_lr}")
        _check_int("warmup_steps", self.warmup_steps, 0, self.steps)
        _check_real("weight_decay", self.weight_decay, 0.0)
        _check_real("grad_clip", self.grad_clip, 0.0)
        check_choice("TrainConfig.precision", self.precision, PRECISIONS)
        _check_int("seed", self.seed, 0, (1 << 63) - 1)
        _check_int("eval_every", self.eval_every, 0)
        _check_int("eval_batches", self.eval_batches, 1)
        _check_int("ckpt_every", self.ckpt_every, 0)
        _check_int("log_every", self.log_every, 1)
        _check_int("probe_every", self.probe_every, 0)
        check_choice("TrainConfig.fp8_scope", self.fp8_scope, _FP8_SCOPES)
        check_choice("TrainConfig.fp8_scaling", self.fp8_scaling, _FP8_SCALINGS)
        check_choice("TrainConfig.fp8_backend", self.fp8_backend, FP8_BACKENDS)
        check_choice("TrainConfig.fp8_recipe", self.fp8_recipe, FP8_RECIPES)
        _check_int("grad_accum", self.grad_accum, 1)
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"TrainConfig.batch_size ({self.batch_size}) must be a multiple of "
                              f"grad_accum ({self.grad_accum})")
        _check_real("beta1", self.beta1, 0.0, 1.0, high_open=True)
        _check_real("beta2", self.beta2, 0.0, 1.0, high_open=True)
        _check_real("adam_eps", self.adam_eps, 0.0, low_open=True)
        check_choice("TrainConfig.optimizer_impl", self.optimizer_impl, tuple(OPTIMIZER_IMPLEMENTATIONS))
        if not isinstance(self.device, str) or not self.device:
            raise ConfigError(f"TrainConfig.device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.threads is not None:
            _check_int("threads", self.threads, 1)
        if self.progress is not None and not isinstance(self.progress, bool):
            raise ConfigError(f"TrainConfig.progress must be True, False or None, got {self.progress!r}")
        if not isinstance(self.trackers, (list, tuple)) or not all(isinstance(t, str) for t in self.trackers):
            raise ConfigError(f"TrainConfig.trackers must be a list of tracker names, got {self.trackers!r}")
        check_trackers(self.trackers, installed=False)  # names only: a saved spec reads without the packages

    def replace(self, **changes: Any) -> TrainConfig:
        """A validated copy with ``changes`` applied."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ConfigError(f"unknown TrainConfig field(s) {unknown}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown TrainConfig field(s) {unknown}; fields are {sorted(names)}")
        return cls(**data)


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (1-based).

    Warm-up: ``lr * step / warmup_steps`` for ``step <= warmup_steps``; then a half cosine from
    ``lr`` down to ``min_lr``, reached exactly at ``step == steps``.
    """
    if step < 1:
        raise ConfigError(f"step must be >= 1, got {step}")
    if step <= config.warmup_steps:
        return config.lr * step / config.warmup_steps
    decay_steps = config.steps - config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / decay_steps) if decay_steps > 0 else 1.0
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1.0 + math.cos(math.pi * progress))
