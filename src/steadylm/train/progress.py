"""The training progress bar: rich, on stderr, on rank 0, shown only on a terminal unless
``train.progress`` forces it."""

from __future__ import annotations

import sys
from typing import Any

from steadylm.train.config import TrainConfig

__all__ = ["ProgressBar"]


class ProgressBar:
    """A rich progress bar on stderr, shown only on a terminal unless forced by the config."""

    def __init__(self, config: TrainConfig, start_step: int, *, enabled: bool = True) -> None:
        enabled = enabled and (config.progress if config.progress is not None else sys.stderr.isatty())
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

    def update(self, step: int, loss: float, lr: float, state: Any, val_loss: float | None) -> None:
        if self._progress is None:
            return
        rate = state.tokens_seen / state.train_time_s if state.train_time_s else 0.0
        info = f"loss {loss:.3f}  lr {lr:.2e}  {rate:,.0f} tok/s"
        if state.final_val_loss is not None:
            info += f"  val {state.final_val_loss:.3f}"
        self._progress.update(self._task, completed=step, info=info)

    def note(self, message: str) -> None:
        if self._progress is not None:
            self._progress.console.print(f"[yellow]{message}")

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
