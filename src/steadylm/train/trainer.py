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

Divergence guard: a non-finite training loss or gradient norm (or validation loss) stops the run
before the optimizer applies the poisoned update; no checkpoint is written after it, so the last
good checkpoint stays in place. The step is in :attr:`TrainResult.diverged_at` (the caller decides
whether that is an error: :meth:`TrainResult.raise_if_diverged`). Separately, the first step after
warm-up whose loss is above the first step's loss is reported as ``loss_above_start_at``.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from steadylm.errors import CheckpointError, ConfigError, DivergenceError
from steadylm.train.atomic import atomic_write_text
from steadylm.train.checkpoint import (
    CHECKPOINT_DIRNAME,
    find_checkpoint,
    load_checkpoint,
    read_checkpoint_state,
    save_checkpoint,
)
from steadylm.train.config import TrainConfig, lr_at
from steadylm.train.metrics import MetricsLog

__all__ = ["Probe", "TrainCallback", "TrainResult", "Trainer"]

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
    loss_above_start_at: int | None  # first step after warm-up with loss > the first step's loss
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


def _config_dict(config: Any) -> dict[str, Any]:
    if hasattr(config, "to_dict"):
        return config.to_dict()
    if is_dataclass(config):
        return json.loads(json.dumps(asdict(config), default=str))
    raise ConfigError(f"model_config must be a ModelConfig (with to_dict), got {type(config).__name__}")


def _default_model_factory(model_config: Any) -> nn.Module:
    from steadylm.models import build_model

    return build_model(model_config)


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"TrainConfig.device {name!r} is not a torch device: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"TrainConfig.device is {name!r} but CUDA is not available; use 'cpu' or 'auto'")
    return device


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def _float(x: torch.Tensor | float) -> float:
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


class Trainer:
    """Trains ``model_factory(model_config)`` on ``data`` with ``train_config`` into ``out_dir``.

    ``model_factory`` defaults to :func:`steadylm.models.build_model`; the model must provide
    ``model(tokens) -> logits`` and may provide ``param_groups(weight_decay)``,
    ``after_optimizer_step(step, total_steps)`` and ``num_params()``.
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
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._check_data_fits_model()

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

    def _configs(self) -> dict[str, Any]:
        return {
            "model": _config_dict(self.model_config),
            "train": self.config.to_dict(),
            "data": self.data.describe() if hasattr(self.data, "describe") else {},
        }

    def _build(self, device: torch.device) -> None:
        cfg = self.config
        seed_everything(cfg.seed)
        model = self.model_factory(self.model_config)
        if cfg.precision == "fp8":
            from steadylm.precision import apply_fp8  # lazy: fp32/bf16 runs never need it

            apply_fp8(model, scope=cfg.fp8_scope, scaling=cfg.fp8_scaling)
        model.to(device)
        if hasattr(model, "param_groups"):
            groups = model.param_groups(cfg.weight_decay)
        else:
            groups = [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": cfg.weight_decay}]
        self.model = model
        self.optimizer = torch.optim.AdamW(
            groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, weight_decay=cfg.weight_decay
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

    # ------------------------------------------------------------------------------------------
    # pieces of a step
    # ------------------------------------------------------------------------------------------

    def _autocast(self, device: torch.device):
        if self.config.precision in ("bf16", "fp8"):
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _loss(self, inputs: torch.Tensor, targets: torch.Tensor, device: torch.device) -> torch.Tensor:
        assert self.model is not None
        with self._autocast(device):
            logits = self.model(inputs)
        # The loss in fp32 whatever the compute precision: bf16 log-softmax over the vocabulary
        # would add noise that looks like instability.
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))

    @torch.no_grad()
    def _evaluate(self, batches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> float:
        assert self.model is not None
        was_training = self.model.training
        self.model.eval()
        total, count = 0.0, 0
        try:
            for inputs, targets in batches:
                total += _float(self._loss(inputs, targets, device)) * targets.numel()
                count += targets.numel()
        finally:
            self.model.train(was_training)
        return total / count

    def _emit(self, method: str, *args: Any) -> None:
        for callback in self.callbacks:
            handler = getattr(callback, method, None)
            if handler is None and method == "on_log" and callable(callback):
                handler = callback
            if handler is not None:
                handler(*args)

    # ------------------------------------------------------------------------------------------
    # run
    # ------------------------------------------------------------------------------------------

    def _prepare_out_dir(self, resume: bool | str, metrics: MetricsLog) -> Path | None:
        """Set up ``out_dir``; returns the checkpoint to resume from (None for a fresh run)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        configs = self._configs()
        if resume == "auto":
            resume = find_checkpoint(self.out_dir) is not None
        if not resume:
            for name in (CHECKPOINT_DIRNAME, CHECKPOINT_DIRNAME + ".old"):
                shutil.rmtree(self.out_dir / name, ignore_errors=True)
            metrics.reset()
            atomic_write_text(self.out_dir / "config.json", json.dumps(configs, indent=2, default=str))
            return None
        checkpoint = find_checkpoint(self.out_dir)
        if checkpoint is None:
            raise CheckpointError(f"cannot resume: no checkpoint in {self.out_dir}")
        saved = read_checkpoint_state(checkpoint).configs
        problems = []
        if saved.get("model") != configs["model"]:
            differing = sorted(
                k for k in set(saved.get("model", {})) | set(configs["model"])
                if saved.get("model", {}).get(k) != configs["model"].get(k)
            )
            problems.append(f"model config differs in {differing}")
        if saved.get("train", {}).get("seed") != self.config.seed:
            problems.append(f"seed differs (checkpoint {saved.get('train', {}).get('seed')}, now {self.config.seed})")
        saved_fp = saved.get("data", {}).get("fingerprint")
        if saved_fp and saved_fp != configs["data"].get("fingerprint"):
            problems.append("the data (corpus, tokenizer or split) differs")
        if saved.get("train", {}).get("precision") != self.config.precision:
            problems.append("precision differs")
        if problems:
            raise CheckpointError(f"cannot resume from {checkpoint}: " + "; ".join(problems))
        atomic_write_text(self.out_dir / "config.json", json.dumps(configs, indent=2, default=str))
        return checkpoint

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
        if resume not in (True, False, "auto"):
            raise ConfigError(f"resume must be True, False or 'auto', got {resume!r}")
        if stop_after is not None and (isinstance(stop_after, bool) or not isinstance(stop_after, int)
                                       or not 1 <= stop_after <= self.config.steps):
            raise ConfigError(f"stop_after must be an integer in [1, steps={self.config.steps}], got {stop_after!r}")
        threads_before = torch.get_num_threads()
        if self.config.threads is not None:
            torch.set_num_threads(self.config.threads)
        try:
            return self._run(resume, stop_after or self.config.steps)
        finally:
            torch.set_num_threads(threads_before)

    def _run(self, resume: bool | str, last_step: int) -> TrainResult:
        cfg = self.config
        device = _resolve_device(cfg.device)
        metrics = MetricsLog(self.out_dir)
        checkpoint_path = self._prepare_out_dir(resume, metrics)
        self._build(device)
        assert self.model is not None and self.optimizer is not None
        model, optimizer = self.model, self.optimizer

        counters: dict[str, Any] = {
            "tokens_seen": 0, "train_time_s": 0.0, "start_loss": None, "loss_above_start_at": None,
            "final_loss": None, "final_val_loss": None, "best_val_loss": None,
        }
        start_step, resumed_from, last_checkpoint = 0, None, None
        if checkpoint_path is not None:
            state = load_checkpoint(checkpoint_path, model, optimizer)
            start_step = resumed_from = state.step
            counters.update(state.counters)
            last_checkpoint = checkpoint_path
            metrics.truncate_after(start_step)

        val_batches = self.data.val_batches(cfg.eval_batches, cfg.batch_size, device=device)
        tokens_per_step = cfg.batch_size * self.data.seq_len
        diverged_at, reason = None, None
        steps_done = start_step
        window_tokens, window_time = 0, 0.0
        model.train()

        progress = _Progress(cfg, start_step)
        try:
            for step in range(start_step + 1, last_step + 1):
                t0 = time.perf_counter()
                lr = lr_at(step, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr * group.get("lr_scale", 1.0)
                inputs, targets = self.data.train_batch(step - 1, cfg.batch_size, cfg.seed, device=device)

                for probe in self.probes:
                    probe.begin_step(step, model)
                loss = self._loss(inputs, targets, device)
                loss.backward()
                probe_metrics: dict[str, float] = {}
                for probe in self.probes:
                    probe_metrics.update(probe.end_step(step, model) or {})
                max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
                grad_norm = torch.nn.utils.clip_grad_norm_(self._params, max_norm, foreach=None)
                loss_value, grad_norm_value = _float(loss), _float(grad_norm)

                if not math.isfinite(loss_value) or not math.isfinite(grad_norm_value):
                    diverged_at = step
                    what = "loss" if not math.isfinite(loss_value) else "gradient norm"
                    reason = f"non-finite {what} ({loss_value if what == 'loss' else grad_norm_value})"
                    optimizer.zero_grad(set_to_none=True)
                    row = {"step": step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm_value,
                           "tokens_seen": counters["tokens_seen"], "diverged": True, **probe_metrics}
                    self._emit("on_log", metrics.append(row))
                    break

                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if hasattr(model, "after_optimizer_step"):
                    model.after_optimizer_step(step, cfg.steps)
                steps_done = step

                step_time = time.perf_counter() - t0
                counters["tokens_seen"] += tokens_per_step
                counters["train_time_s"] += step_time
                counters["final_loss"] = loss_value
                window_tokens += tokens_per_step
                window_time += step_time
                if counters["start_loss"] is None:
                    counters["start_loss"] = loss_value
                elif (counters["loss_above_start_at"] is None and step > cfg.warmup_steps
                      and loss_value > counters["start_loss"]):
                    counters["loss_above_start_at"] = step

                is_last = step == cfg.steps
                do_eval = is_last or (cfg.eval_every > 0 and step % cfg.eval_every == 0)
                do_ckpt = is_last or step == last_step or (cfg.ckpt_every > 0 and step % cfg.ckpt_every == 0)
                val_loss = None
                if do_eval:
                    val_loss = self._evaluate(val_batches, device)
                    if not math.isfinite(val_loss):
                        diverged_at, reason = step, f"non-finite validation loss ({val_loss})"
                    else:
                        counters["final_val_loss"] = val_loss
                        best = counters["best_val_loss"]
                        counters["best_val_loss"] = val_loss if best is None else min(best, val_loss)

                if do_eval or probe_metrics or is_last or step % cfg.log_every == 0 or diverged_at:
                    row = {
                        "step": step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm_value,
                        "tokens_per_s": window_tokens / window_time if window_time > 0 else 0.0,
                        "tokens_seen": counters["tokens_seen"],
                    }
                    if val_loss is not None:
                        row["val_loss"] = val_loss
                    if diverged_at:
                        row["diverged"] = True
                    row.update(probe_metrics)
                    window_tokens, window_time = 0, 0.0
                    self._emit("on_log", metrics.append(row))
                progress.update(step, loss_value, lr, counters, val_loss)
                if diverged_at:
                    break

                if do_ckpt:
                    metrics.sync()
                    last_checkpoint = save_checkpoint(
                        self.out_dir, model, optimizer, step, counters=counters, configs=self._configs()
                    )
                    self._emit("on_checkpoint", step, last_checkpoint)
        finally:
            progress.close()
            metrics.sync()
            metrics.close()

        if diverged_at is not None:
            progress.note(f"diverged at step {diverged_at}: {reason}; last good checkpoint: "
                          f"{last_checkpoint or 'none'}")
        train_time = float(counters["train_time_s"])
        return TrainResult(
            steps_done=steps_done,
            total_steps=cfg.steps,
            final_loss=counters["final_loss"],
            final_val_loss=counters["final_val_loss"],
            best_val_loss=counters["best_val_loss"],
            diverged_at=diverged_at,
            divergence_reason=reason,
            loss_above_start_at=counters["loss_above_start_at"],
            start_loss=counters["start_loss"],
            tokens_seen=int(counters["tokens_seen"]),
            tokens_per_s=counters["tokens_seen"] / train_time if train_time > 0 else 0.0,
            train_time_s=train_time,
            resumed_from=resumed_from,
            num_params=self._num_params(),
            out_dir=self.out_dir,
            config_path=self.out_dir / "config.json",
            metrics_jsonl=metrics.jsonl_path,
            metrics_csv=metrics.csv_path,
            checkpoint_dir=last_checkpoint,
        )


class _Progress:
    """A rich progress bar on stderr, shown only on a terminal unless forced by the config."""

    def __init__(self, config: TrainConfig, start_step: int) -> None:
        enabled = config.progress if config.progress is not None else sys.stderr.isatty()
        self._progress = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task("train", total=config.steps, completed=start_step, info="")

    def update(self, step: int, loss: float, lr: float, counters: dict[str, Any], val_loss: float | None) -> None:
        if self._progress is None:
            return
        rate = counters["tokens_seen"] / counters["train_time_s"] if counters["train_time_s"] else 0.0
        info = f"loss {loss:.3f}  lr {lr:.2e}  {rate:,.0f} tok/s"
        if counters.get("final_val_loss") is not None:
            info += f"  val {counters['final_val_loss']:.3f}"
        self._progress.update(self._task, completed=step, info=info)

    def note(self, message: str) -> None:
        if self._progress is not None:
            self._progress.console.print(f"[yellow]{message}")

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
