"""Crash-safe file writes: temp file in the same directory, fsync, ``os.replace``, fsync the dir."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from steadylm.errors import OutputError

__all__ = ["atomic_write_bytes", "atomic_write_text", "fsync_dir", "io_error", "write_and_sync"]


def io_error(path: str | os.PathLike[str], err: OSError) -> OutputError:
    """A one-line :class:`OutputError` naming ``path`` and the cause (``No space left on device``)."""
    return OutputError(f"cannot write {path}: {err.strerror or err}")


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Persist a directory entry change (a rename or a new file) on POSIX; no-op elsewhere."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_and_sync(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` (not atomically) and fsync it."""
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new file, never a mix.

    An I/O failure (full disk, read-only file system) raises :class:`OutputError` naming the file;
    the old file stays as it was and no temporary file is left behind.
    """
    target = Path(path)
    try:
        _atomic_write(target, data)
    except OutputError:
        raise
    except OSError as err:
        raise io_error(target, err) from None


def _atomic_write(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            if hasattr(os, "fchmod"):  # mkstemp creates 0600; run files are ordinary files
                os.fchmod(handle.fileno(), 0o644)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(target.parent)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
