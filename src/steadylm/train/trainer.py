"""``Trainer``: one repeatable, resumable, divergence-guarded training run.

::

    result = Trainer(model_config, train_config, data, "runs/x", probes=[probe]).run()

One step ``k`` (1-based) is: LR ``lr_at(k)``; batch ``k - 1`` of ``data`` for the run's seed; probes'
``begin_step``; forward (under bf16 autocast for ``bf16``/``fp8``) and fp32 cross-entropy;
backward; probes' ``end_step`` (before clipping, so they see raw gradients); global grad-norm clip;
the divergence guard; ``optimizer.step()``; ``model.after_optimizer_step(k, steps)`` (BHyT c_ℓ
refresh, MoE router-bias update). Then, as scheduled: a metrics row, validation, a checkpoint.

Repeatability: the seed fixes the initial weights (torch, numpy and python generators are seeded
before the model is built) and the batch order (a pure function of seed and step), so two runs with
one seed produce bit-identical metrics on CPU, and a run resumed from its checkpoint (which holds
weights, optimizer moments, generator states and counters) continues exactly as if never stopped.

Many processes (``torchrun``; :mod:`steadylm.distributed`): every rank builds the same model, DDP or
FSDP2 is applied from outside (``parallel``), each rank trains its rows of the global batch (in
``grad_accum`` micro-batches) and the logged loss is the mean over ranks, so N ranks follow one
process with the same global batch. Rank 0 alone writes the run directory; checkpoints are DCP
shards written by every rank (:mod:`steadylm.train.dcp`) and load at any world size.

Preemption: SIGTERM/SIGUSR1 finish the step, checkpoint it and stop (:class:`Preemption`,
:attr:`TrainResult.preempted_at`); a ``.steadylm.lock`` flock keeps a second run out of the
directory.

Divergence guard: a non-finite training loss or gradient norm (or validation loss) stops the run
before the optimizer applies the poisoned update; no checkpoint is written after it, so the last
good checkpoint stays in place. The step is in :attr:`TrainResult.diverged_at` (the caller decides
whether that is an error: :meth:`TrainResult.raise_if_diverged`). Separately, the first step whose
loss is above the start (:func:`steadylm.probes.spikes.above_start`: the first step's loss + the
margin, the rule of every report) is reported as ``loss_above_start_at``.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from steadylm.distributed.config import ParallelConfig
from steadylm.distributed.env import DistEnv, all_reduce_sum_, broadcast_object
from steadylm.distributed.parallelize import parallelize
from steadylm.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    DivergenceError,
    OutputError,
    RunDirectoryInUse,
    SteadyLMError,
    check_choice,
)
from steadylm.models.transformer import takes_targets
from steadylm.probes.spikes import above_start
from steadylm.train.checkpoint import (
    DCP_FORMAT_VERSION,
    load_checkpoint,
    read_state_json,
)
from steadylm.train.dcp import save_dcp_checkpoint
from steadylm.train.lock import RunDirLock
from steadylm.train.config import OPTIMIZER_IMPLEMENTATIONS, TrainConfig, lr_at
from steadylm.train.metrics import MetricsLog
from steadylm.train.preemption import Preemption
from steadylm.train.run_dir import config_dict as _config_dict
from steadylm.train.run_dir import prepare_run_dir
from steadylm.train.progress import ProgressBar

__all__ = ["Preemption", "Probe", "TrainCallback", "TrainResult", "Trainer"]

# Metrics that depend on wall-clock time, hence differ between otherwise identical runs.
TIMING_KEYS: frozenset[str] = frozenset({"tokens_per_s", "elapsed_s", "probe/overhead_ms"})


class Probe(Protocol):
    """The train ↔ probes contract (docs/ARCHITECTURE.md)."""

    def begin_step(self, step: int, model: nn.Module) -> None: ...

    def end_step(self, step: int, model: nn.Module) -> dict[str, float]: ...


class TrainCallback(Protocol):
    """Optional observer; any subset of these methods may be defined (a plain callable is
    treated as ``on_log``). Raising from a callback aborts the run (after its last checkpoint)."""

    def on_log(self, row: dict[str, Any]) -> None: ...

    def on_checkpoint(self, step: int, path: Path) -> None: ...

    def on_train_start(self, step: int, configs: dict[str, Any]) -> None: ...  # step: resumed from (0: fresh)

    def on_train_end(self) -> None: ...  # also when the run stops on an error


@dataclass
class TrainResult:
    """Outcome of :meth:`Trainer.run`."""

    steps_done: int  # optimizer steps applied (a step whose loss/grad norm was non-finite is not)
    total_steps: int
    final_loss: float | None  # last finite training loss
    final_val_loss: float | None  # last validation loss
    best_val_loss: float | None
    diverged_at: int | None  # step whose loss/grad norm was non-finite, None if none
    divergence_reason: str | None
    loss_above_start_at: int | None  # first step whose loss is above the start (probes.spikes.above_start)
    start_loss: float | None
    tokens_seen: int
    tokens_per_s: float  # training tokens / training compute time (evaluation excluded)
    train_time_s: float
    resumed_from: int | None  # checkpoint step this run started from, None for a fresh run
    num_params: dict[str, int]
    out_dir: Path
    config_path: Path
    metrics_jsonl: Path
    metrics_csv: Path
    checkpoint_dir: Path | None  # the last good checkpoint, None if none was written
    preempted_at: int | None = None  # step at which a SIGTERM/SIGUSR1 stopped the run (checkpointed)
    preempt_signal: str | None = None

    @property
    def diverged(self) -> bool:
        return self.diverged_at is not None

    def raise_if_diverged(self) -> TrainResult:
        if self.diverged_at is not None:
            raise DivergenceError(
                f"training diverged at step {self.diverged_at}: {self.divergence_reason}; "
                f"last good checkpoint: {self.checkpoint_dir or 'none written'}"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


def _default_model_factory(model_config: Any) -> nn.Module:
    from steadylm.models import build_model

    return build_model(model_config)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def _float(x: torch.Tensor | float) -> float:
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


@dataclass
class _RunState:
    """What a run carries from step to step. ``counters()`` is what a checkpoint saves."""

    step: int = 0  # the last optimizer step applied
    tokens_seen: int = 0
    train_time_s: float = 0.0
    start_loss: float | None = None
    loss_above_start_at: int | None = None
    final_loss: float | None = None
    final_val_loss: float | None = None
    best_val_loss: float | None = None
    resumed_from: int | None = None
    last_checkpoint: Path | None = None
    diverged_at: int | None = None
    divergence_reason: str | None = None
    preempted_at: int | None = None
    # tokens and compute time since the last metrics row (its tokens_per_s); not saved
    window_tokens: int = 0
    window_time: float = 0.0

    _SAVED = ("tokens_seen", "train_time_s", "start_loss", "loss_above_start_at", "final_loss",
              "final_val_loss", "best_val_loss")

    def counters(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._SAVED}

    def restore(self, step: int, counters: dict[str, Any]) -> None:
        self.step = self.resumed_from = step
        for name in self._SAVED:
            if name in counters:
                setattr(self, name, counters[name])

    def record_train_step(self, step: int, loss: float, tokens: int, seconds: float) -> None:
        self.step = step
        self.tokens_seen += tokens
        self.train_time_s += seconds
        self.final_loss = loss
        self.window_tokens += tokens
        self.window_time += seconds
        if self.start_loss is None:
            self.start_loss = loss
        elif self.loss_above_start_at is None and above_start(loss, self.start_loss):
            self.loss_above_start_at = step

    def record_val_loss(self, step: int, val_loss: float) -> None:
        if not math.isfinite(val_loss):
            self.diverged_at, self.divergence_reason = step, f"non-finite validation loss ({val_loss})"
            return
        self.final_val_loss = val_loss
        self.best_val_loss = val_loss if self.best_val_loss is None else min(self.best_val_loss, val_loss)

    def take_window_rate(self) -> float:
        rate = self.window_tokens / self.window_time if self.window_time > 0 else 0.0
        self.window_tokens, self.window_time = 0, 0.0
        return rate

    def result_fields(self) -> dict[str, Any]:
        """The :class:`TrainResult` fields this state holds: every field of the same name as it is
        (the two counters as int and float), ``steps_done``, ``tokens_per_s`` and ``checkpoint_dir``."""
        shared = {f.name for f in fields(TrainResult)} & {f.name for f in fields(self)}
        values = {name: getattr(self, name) for name in shared}
        values.update(
            steps_done=self.step,
            tokens_seen=int(self.tokens_seen),
            train_time_s=float(self.train_time_s),
            tokens_per_s=self.tokens_seen / self.train_time_s if self.train_time_s > 0 else 0.0,
            checkpoint_dir=self.last_checkpoint,
        )
        return values


@dataclass
class _StepOutput:
    loss: float
    grad_norm: float
    lr: float
    probe_metrics: dict[str, float]
    stop_requested: bool = False  # a preemption signal reached this rank or another one


class Trainer:
    """Trains ``model_factory(model_config)`` on ``data`` with ``train_config`` into ``out_dir``.

    ``model_factory`` defaults to :func:`steadylm.models.build_model`; the model must provide
    ``model(tokens) -> logits`` and may provide ``model(tokens, targets=t) -> mean loss`` (then
    used for the loss: :func:`~steadylm.models.takes_targets`), ``param_groups(weight_decay)``,
    ``after_optimizer_step(step, total_steps)`` and ``num_params()``.
    ``parallel`` applies data parallelism (DDP or FSDP2) when a process group is initialised
    (``torchrun``; see :func:`steadylm.distributed.env.init_distributed`); every rank constructs
    the same Trainer and calls :meth:`run`. ``env``: this process's rank layout (default
    :meth:`DistEnv.current`).
    After :meth:`run`, ``trainer.model`` is the trained model (last state, or the state at the
    diverged step's forward).
    """

    def __init__(
        self,
        model_config: Any,
        train_config: TrainConfig,
        data: Any,
        out_dir: str | Path,
        probes: Sequence[Probe] = (),
        *,
        callbacks: Sequence[TrainCallback | Callable[[dict[str, Any]], None]] = (),
        model_factory: Callable[[Any], nn.Module] | None = None,
        parallel: ParallelConfig | None = None,
        extra_configs: dict[str, Any] | None = None,
        env: DistEnv | None = None,
    ) -> None:
        if not isinstance(train_config, TrainConfig):
            raise ConfigError(f"train_config must be a TrainConfig, got {type(train_config).__name__}")
        train_config.validate()
        self.model_config = model_config
        self.config = train_config
        self.data = data
        self.out_dir = Path(out_dir)
        self.probes = list(probes)
        self.callbacks = list(callbacks)
        self.model_factory = model_factory or _default_model_factory
        self.parallel = parallel or ParallelConfig()
        self.extra_configs = dict(extra_configs or {})
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.env = env or DistEnv.current()
        self._preemption = Preemption()
        self._check_data_fits_model()
        self._check_batch_split()
        self._check_fp8_recipe()

    # ------------------------------------------------------------------------------------------
    # setup
    # ------------------------------------------------------------------------------------------

    def _check_data_fits_model(self) -> None:
        model_vocab = getattr(self.model_config, "vocab_size", None)
        if model_vocab is not None and model_vocab < self.data.vocab_size:
            raise ConfigError(
                f"ModelConfig.vocab_size ({model_vocab}) must be >= the tokenizer's vocabulary "
                f"size ({self.data.vocab_size}); build the config with vocab_size=data.vocab_size"
            )
        max_seq_len = getattr(self.model_config, "max_seq_len", None)
        if max_seq_len is not None and max_seq_len < self.data.seq_len:
            raise ConfigError(
                f"ModelConfig.max_seq_len ({max_seq_len}) must be >= the data's seq_len ({self.data.seq_len})"
            )

    def _check_batch_split(self) -> None:
        parts = self.env.world_size * self.config.grad_accum
        if self.config.batch_size % parts:
            raise ConfigError(
                f"train.batch_size ({self.config.batch_size}) must be a multiple of world size × "
                f"grad_accum ({self.env.world_size} × {self.config.grad_accum} = {parts})"
            )

    def _check_fp8_recipe(self) -> None:
        cfg = self.config
        on_cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
        if (cfg.precision == "fp8" and cfg.fp8_backend == "torchao" and cfg.fp8_recipe == "rowwise_with_gw_hp"
                and on_cpu and not self.parallel.fsdp_bf16):
            # Measured with torchao 0.18 on CPU: its high-precision weight-gradient matmul gets a bf16
            # gradient and fp32 weights under autocast and fails; bf16 compute weights work.
            raise ConfigError("train.fp8_recipe 'rowwise_with_gw_hp' needs bf16 parameters in compute on CPU: "
                              "add --parallel fsdp --fsdp-bf16, or use 'tensorwise' / 'rowwise'")
        if cfg.precision == "fp8" and cfg.fp8_backend == "torchao" and cfg.fp8_recipe.startswith("rowwise") and on_cpu:
            from steadylm.precision.backends import cpu_scaled_mm_takes_row_scales  # lazy, as apply_fp8_backend

            if not cpu_scaled_mm_takes_row_scales():
                raise ConfigError(f"train.fp8_recipe '{cfg.fp8_recipe}' needs per-row scales in CPU float8 matmuls, "
                                  f"which torch {torch.__version__} lacks (torch 2.13 has them): use "
                                  "'tensorwise' on CPU, or run on CUDA")

    def _configs(self) -> dict[str, Any]:
        return {
            "model": _config_dict(self.model_config),
            "train": self.config.to_dict(),
            "data": self.data.describe() if hasattr(self.data, "describe") else {},
            **self.extra_configs,
        }

    def _build(self, device: torch.device) -> None:
        cfg = self.config
        seed_everything(cfg.seed)
        model = self.model_factory(self.model_config)
        if cfg.precision == "fp8":
            from steadylm.precision import apply_fp8_backend  # lazy: fp32/bf16 runs never need it

            apply_fp8_backend(model, backend=cfg.fp8_backend, scope=cfg.fp8_scope, scaling=cfg.fp8_scaling,
                              recipe=cfg.fp8_recipe, fsdp=self.parallel.mode == "fsdp")
        model.to(device)
        self._parallel = parallelize(model, self.parallel, self.env, device)
        if hasattr(model, "param_groups"):
            groups = model.param_groups(cfg.weight_decay)
        else:
            groups = [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": cfg.weight_decay}]
        self.model = model
        self.optimizer = torch.optim.AdamW(
            groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, weight_decay=cfg.weight_decay,
            **OPTIMIZER_IMPLEMENTATIONS[cfg.optimizer_impl],
        )
        self._params = [p for group in self.optimizer.param_groups for p in group["params"]]

    def _num_params(self) -> dict[str, int]:
        assert self.model is not None
        if hasattr(self.model, "num_params"):
            counts = self.model.num_params()
            if isinstance(counts, dict):
                return {k: int(v) for k, v in counts.items()}
            return {"total": int(counts), "active": int(counts)}
        total = sum(p.numel() for p in self.model.parameters())
        return {"total": total, "active": total}

    def _on_main(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on rank 0 only; every rank gets its result, or raises its error (so a bad
        run directory fails every rank with the same message instead of hanging the others)."""
        outcome: tuple[str, Any] = ("ok", None)
        if self.env.is_main:
            try:
                outcome = ("ok", fn())
            except SteadyLMError as err:
                outcome = (type(err).__name__, str(err))
        outcome = broadcast_object(outcome)
        if outcome[0] != "ok":
            error_type = {cls.__name__: cls for cls in (ConfigError, CheckpointError, DataError, OutputError,
                                                        RunDirectoryInUse)}.get(outcome[0], SteadyLMError)
            raise error_type(outcome[1])
        return outcome[1]

    # ------------------------------------------------------------------------------------------
    # pieces of a step
    # ------------------------------------------------------------------------------------------

    def _autocast(self, device: torch.device):
        if self.config.precision in ("bf16", "fp8"):
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _loss(self, inputs: torch.Tensor, targets: torch.Tensor, device: torch.device,
              module: nn.Module | None = None) -> torch.Tensor:
        module = module if module is not None else self.model
        assert module is not None
        with self._autocast(device):
            if takes_targets(self.model):  # the model's own loss: steadylm's never stores the logits
                return module(inputs, targets=targets)
            logits = module(inputs)
        # The loss in fp32 whatever the compute precision: bf16 log-softmax over the vocabulary
        # would add noise that looks like instability.
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def _shard(self) -> dict[str, Any]:
        # Rows of the global batch this rank trains on; omitted in one process (any data object
        # with the plain TokenData interface works there).
        return {"shard": (self.env.rank, self.env.world_size)} if self.env.world_size > 1 else {}

    def _train_step(self, step: int, device: torch.device) -> _StepOutput:
        """Forward and backward of the step's global batch (this rank's rows, in ``grad_accum``
        micro-batches), probes, and the clipped global gradient norm. The optimizer is not
        stepped: the caller decides after the divergence guard."""
        assert self.model is not None and self.optimizer is not None
        cfg, model = self.config, self.model
        lr = lr_at(step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        inputs, targets = self.data.train_batch(step - 1, cfg.batch_size, cfg.seed, device=device, **self._shard())

        for probe in self.probes:
            probe.begin_step(step, model)
        accum = cfg.grad_accum
        micro_inputs, micro_targets = inputs.chunk(accum), targets.chunk(accum)
        loss_sum: torch.Tensor | None = None
        for index, (x, y) in enumerate(zip(micro_inputs, micro_targets)):
            with self._parallel.no_sync(sync=index == accum - 1):
                loss = self._loss(x, y, device, self._parallel.forward_module)
                (loss if accum == 1 else loss / accum).backward()
            loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
        assert loss_sum is not None
        local_loss = loss_sum if accum == 1 else loss_sum / accum
        stop = self._preemption.requested is not None
        if self.env.world_size > 1:
            # One reduction carries the loss and the preemption flag: one rank receiving the
            # signal is enough for every rank to stop at the same step.
            flag = torch.tensor(float(stop), dtype=local_loss.dtype, device=local_loss.device)
            reduced = all_reduce_sum_(torch.stack([local_loss.detach(), flag]))
            loss_mean, stop = reduced[0] / self.env.world_size, bool(reduced[1].item() > 0)
        else:
            loss_mean = local_loss
        probe_metrics: dict[str, float] = {}
        for probe in self.probes:
            probe_metrics.update(probe.end_step(step, model) or {})
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self._params, max_norm, foreach=None)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: the norm is a DTensor over the shards
            grad_norm = grad_norm.full_tensor()
        return _StepOutput(_float(loss_mean), _float(grad_norm), lr, probe_metrics, stop)

    @torch.no_grad()
    def _evaluate(self, batches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> float:
        """Mean validation loss per token over the fixed batches (this rank's rows, summed over ranks)."""
        assert self.model is not None
        was_training = self.model.training
        self.model.eval()
        total, count = 0.0, 0
        try:
            for inputs, targets in batches:
                if targets.numel() == 0:
                    # this rank's share of a short last batch is empty; the forward still runs,
                    # because FSDP2 ranks all-gather the parameters together
                    with self._autocast(device):
                        self._parallel.forward_module(inputs)
                    continue
                total += _float(self._loss(inputs, targets, device, self._parallel.forward_module)) * targets.numel()
                count += targets.numel()
        finally:
            self.model.train(was_training)
        if self.env.world_size > 1:
            sums = all_reduce_sum_(torch.tensor([total, float(count)], dtype=torch.float64, device=device))
            total, count = float(sums[0].item()), int(sums[1].item())
        return total / count

    def _save(self, step: int, state: _RunState, metrics: MetricsLog | None) -> None:
        assert self.model is not None and self.optimizer is not None
        if metrics is not None:
            metrics.sync()
        state.last_checkpoint = save_dcp_checkpoint(
            self.out_dir, self.model, self.optimizer, step,
            counters=state.counters(), configs=self._configs(), env=self.env,
        )
        self._emit("on_checkpoint", step, state.last_checkpoint)

    def _restore(self, checkpoint: Path, state: _RunState, metrics: MetricsLog | None) -> None:
        assert self.model is not None and self.optimizer is not None
        format_version = read_state_json(checkpoint)["format_version"]
        if format_version != DCP_FORMAT_VERSION and self._parallel.mode == "fsdp":
            raise CheckpointError(
                f"checkpoint {checkpoint} is in the single-process format of steadylm 0.1; resume it "
                "once without --parallel fsdp (it is then saved in the sharded format)"
            )
        saved = load_checkpoint(checkpoint, self.model, self.optimizer)
        # Loading restores each group's saved settings, the implementation flags included: this
        # run's choice wins (a checkpoint from before the setting existed says neither fused nor
        # foreach, i.e. for-loop on CPU). The update's math is the same in every implementation.
        for group in self.optimizer.param_groups:
            group.update(OPTIMIZER_IMPLEMENTATIONS[self.config.optimizer_impl])
        state.restore(saved.step, saved.counters)
        state.last_checkpoint = checkpoint
        if metrics is not None:
            metrics.truncate_after(saved.step)

    def _emit(self, method: str, *args: Any) -> None:
        if not self.env.is_main:
            return
        for callback in self.callbacks:
            handler = getattr(callback, method, None)
            if handler is None and method == "on_log" and callable(callback):
                handler = callback
            if handler is not None:
                handler(*args)

    def _log(self, metrics: MetricsLog | None, row: dict[str, Any]) -> None:
        if metrics is not None:
            self._emit("on_log", metrics.append(row))

    # ------------------------------------------------------------------------------------------
    # run
    # ------------------------------------------------------------------------------------------

    def _prepare_out_dir(self, resume: bool | str, metrics: MetricsLog) -> Path | None:
        """Set up ``out_dir`` (rank 0); returns the checkpoint to resume from (None for a fresh run)."""
        return prepare_run_dir(self.out_dir, self._configs(), resume, metrics, model_config=self.model_config,
                               seed=self.config.seed, precision=self.config.precision)

    def run(self, resume: bool | str = False, *, stop_after: int | None = None) -> TrainResult:
        """Train (or continue from ``out_dir``'s checkpoint when ``resume``) to ``steps``.

        ``resume``: False starts fresh (clearing an earlier run's checkpoint and metrics in
        ``out_dir``); True continues from the checkpoint and raises :class:`CheckpointError` when
        there is no usable one (missing, corrupt, or written for another model / seed / corpus);
        ``"auto"`` continues when a checkpoint exists and starts fresh otherwise.
        ``stop_after``: stop after that step (checkpointing it) as if interrupted there; the LR
        schedule still spans ``steps``, so a later ``run(resume=True)`` finishes the same run.
        A divergence does not raise; see :attr:`TrainResult.diverged_at` and
        :meth:`TrainResult.raise_if_diverged`.
        """
        check_choice("resume", resume, (True, False, "auto"))
        if stop_after is not None and (isinstance(stop_after, bool) or not isinstance(stop_after, int)
                                       or not 1 <= stop_after <= self.config.steps):
            raise ConfigError(f"stop_after must be an integer in [1, steps={self.config.steps}], got {stop_after!r}")
        self._preemption = Preemption()
        threads_before = torch.get_num_threads()
        threads = self.config.threads
        if threads is None and self.env.world_size > 1:
            threads = self.env.cpu_threads()
        if threads is not None:
            torch.set_num_threads(threads)
        try:
            with self._preemption:
                return self._run(resume, stop_after or self.config.steps)
        finally:
            torch.set_num_threads(threads_before)

    def _run(self, resume: bool | str, last_step: int) -> TrainResult:
        lock = RunDirLock(self.out_dir)

        def acquire() -> None:
            lock.__enter__()

        self._on_main(acquire)  # refused on every rank when another live run holds the directory
        try:
            return self._run_locked(resume, last_step)
        finally:
            if self.env.is_main:
                lock.__exit__(None, None, None)

    def _run_locked(self, resume: bool | str, last_step: int) -> TrainResult:
        cfg = self.config
        device = self.env.device(cfg.device)
        metrics = MetricsLog(self.out_dir) if self.env.is_main else None
        checkpoint = self._on_main(lambda: self._prepare_out_dir(resume, metrics))  # type: ignore[arg-type]
        self._build(device)
        assert self.model is not None and self.optimizer is not None
        state = _RunState()
        if checkpoint is not None:
            self._restore(Path(checkpoint), state, metrics)

        val_batches = self.data.val_batches(cfg.eval_batches, cfg.batch_size, device=device, **self._shard())
        tokens_per_step = cfg.batch_size * self.data.seq_len
        self.model.train()
        progress = ProgressBar(cfg, state.step, enabled=self.env.is_main)
        try:
            self._emit("on_train_start", state.step, self._configs())
            for step in range(state.step + 1, last_step + 1):
                t0 = time.perf_counter()
                out = self._train_step(step, device)
                if not math.isfinite(out.loss) or not math.isfinite(out.grad_norm):
                    self._stop_diverged(step, out, state, metrics)
                    break
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                if hasattr(self.model, "after_optimizer_step"):
                    self.model.after_optimizer_step(step, cfg.steps)
                state.record_train_step(step, out.loss, tokens_per_step, time.perf_counter() - t0)

                is_last = step == cfg.steps
                val_loss = None
                if is_last or (cfg.eval_every > 0 and step % cfg.eval_every == 0):
                    val_loss = self._evaluate(val_batches, device)
                    state.record_val_loss(step, val_loss)
                if (val_loss is not None or out.probe_metrics or is_last or step % cfg.log_every == 0
                        or state.diverged_at or out.stop_requested):
                    self._log_step(step, out, val_loss, state, metrics)
                progress.update(step, out.loss, out.lr, state, val_loss)
                if state.diverged_at:
                    break
                if out.stop_requested:
                    state.preempted_at = step
                if (is_last or step == last_step or state.preempted_at
                        or (cfg.ckpt_every > 0 and step % cfg.ckpt_every == 0)):
                    self._preemption.checkpointing = True
                    self._save(step, state, metrics)
                    self._preemption.checkpointing = False
                if state.preempted_at:
                    break
        finally:
            progress.close()
            if metrics is not None:
                metrics.sync()
                metrics.close()
            self._emit("on_train_end")

        if state.diverged_at is not None:
            progress.note(f"diverged at step {state.diverged_at}: {state.divergence_reason}; last good "
                          f"checkpoint: {state.last_checkpoint or 'none'}")
        if state.preempted_at is not None:
            progress.note(f"preempted at step {state.preempted_at}: checkpoint written")
        return self._result(state)

    def _stop_diverged(self, step: int, out: _StepOutput, state: _RunState, metrics: MetricsLog | None) -> None:
        """A non-finite loss or gradient norm: drop the poisoned gradients and log the step."""
        assert self.optimizer is not None
        what = "loss" if not math.isfinite(out.loss) else "gradient norm"
        state.diverged_at = step
        state.divergence_reason = f"non-finite {what} ({out.loss if what == 'loss' else out.grad_norm})"
        self.optimizer.zero_grad(set_to_none=True)
        self._log(metrics, {"step": step, "loss": out.loss, "lr": out.lr, "grad_norm": out.grad_norm,
                            "tokens_seen": state.tokens_seen, "diverged": True, **out.probe_metrics})

    def _log_step(self, step: int, out: _StepOutput, val_loss: float | None, state: _RunState,
                  metrics: MetricsLog | None) -> None:
        row: dict[str, Any] = {
            "step": step, "loss": out.loss, "lr": out.lr, "grad_norm": out.grad_norm,
            "tokens_per_s": state.take_window_rate(), "tokens_seen": state.tokens_seen,
        }
        if val_loss is not None:
            row["val_loss"] = val_loss
        if state.diverged_at:
            row["diverged"] = True
        row.update(out.probe_metrics)
        self._log(metrics, row)

    def _result(self, state: _RunState) -> TrainResult:
        out = self.out_dir
        return TrainResult(
            **state.result_fields(),
            total_steps=self.config.steps,
            num_params=self._num_params(),
            out_dir=out, config_path=out / "config.json",
            metrics_jsonl=out / "metrics.jsonl", metrics_csv=out / "metrics.csv",
            preempt_signal=self._preemption.requested if state.preempted_at else None,
        )
