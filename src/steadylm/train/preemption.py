"""Preemption: SIGTERM / SIGUSR1 during a run finish the step, checkpoint it and stop.

Used by :class:`steadylm.train.trainer.Trainer` around its step loop; ``TrainResult.preempted_at``
says where a run stopped, and ``steadylm train`` exits with status 75 so a job script requeues it.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

from steadylm.errors import RunInterrupted

__all__ = ["Preemption"]


class Preemption:
    """SIGTERM / SIGUSR1 during a run: finish the step, checkpoint, stop (context manager).

    Schedulers send SIGTERM before SIGKILL when they preempt a job (SLURM can be told to send
    SIGUSR1 earlier, ``--signal=USR1@120``). The first signal only sets :attr:`requested`; the
    trainer checks it once per step. A second signal while that checkpoint is being written raises
    :class:`~steadylm.errors.RunInterrupted` at once: the save is abandoned and the previous
    checkpoint stays valid. Handlers are installed only in the main thread and restored on exit.
    """

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self) -> None:
        self.requested: str | None = None
        self.checkpointing = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None and self.checkpointing:
            raise RunInterrupted(f"second {name} while writing the preemption checkpoint: aborted; "
                                 "the previous checkpoint is intact")
        self.requested = self.requested or name

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                signum = getattr(signal, name, None)
                if signum is not None:
                    self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
