"""One writer per run directory: an advisory ``fcntl.flock`` on ``<run>/.steadylm.lock``.

The lock belongs to the open file, so the OS releases it when the holder exits or is killed — a
stale lock file from a dead process never blocks a resume. The file records the holder (pid, host,
start time) so the refusal can say who holds it.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from types import TracebackType

from steadylm.errors import RunDirectoryInUse

__all__ = ["LOCK_FILENAME", "RunDirLock"]

LOCK_FILENAME = ".steadylm.lock"


class RunDirLock:
    """Hold the run directory ``path`` for writing (context manager; re-entrant per process).

    Raises :class:`~steadylm.errors.RunDirectoryInUse` naming the directory and the holder when
    another live process has it. On platforms without ``fcntl`` it is a no-op.
    """

    _held: dict[Path, int] = {}  # directory -> depth, for nested use inside one process

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).resolve()
        self._handle: int | None = None
        self._created = False

    def __enter__(self) -> RunDirLock:
        depth = RunDirLock._held.get(self.path, 0)
        if depth:
            RunDirLock._held[self.path] = depth + 1
            return self
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return self
        from steadylm.train.atomic import io_error

        self._created = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            handle = os.open(self.path / LOCK_FILENAME, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise io_error(self.path / LOCK_FILENAME, err) from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(handle)
            os.close(handle)
            raise RunDirectoryInUse(
                f"run directory {self.path} is in use by pid {holder.get('pid', '?')} on host "
                f"{holder.get('host', '?')} (since {holder.get('started', '?')}); wait for it or use another --out"
            ) from None
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode()
        os.ftruncate(handle, 0)
        os.pwrite(handle, info, 0)
        self._handle = handle
        RunDirLock._held[self.path] = 1
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        depth = RunDirLock._held.get(self.path, 0)
        if depth > 1:
            RunDirLock._held[self.path] = depth - 1
            return
        RunDirLock._held.pop(self.path, None)
        if self._handle is not None:
            if self._created and [p.name for p in self.path.iterdir()] == [LOCK_FILENAME]:
                # a run that failed before writing anything leaves nothing behind
                (self.path / LOCK_FILENAME).unlink(missing_ok=True)
                self.path.rmdir()
            os.close(self._handle)  # releases the flock
            self._handle = None


def _read_holder(handle: int) -> dict[str, object]:
    try:
        return json.loads(os.pread(handle, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}
