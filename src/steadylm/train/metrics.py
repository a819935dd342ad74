"""Metrics files of a run: ``metrics.jsonl`` (appended per row) and ``metrics.csv`` (derived).

Rows are flat dicts with a ``step`` key. Non-finite floats are written as ``null`` (JSON has no
NaN), so every line is strict JSON. The CSV is regenerated from the JSON-lines file — columns are
the union of all keys in order of first appearance — and replaced atomically.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

from steadylm.train.atomic import atomic_write_text, io_error

__all__ = ["MetricsLog", "read_metrics"]


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item") and callable(value.item):  # 0-dim tensors / numpy scalars
        return _clean(value.item())
    return value


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Rows of a ``metrics.jsonl`` file (a torn last line, from a killed process, is skipped)."""
    rows: list[dict[str, Any]] = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return rows
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _csv_text(rows: Iterable[dict[str, Any]]) -> str:
    rows = list(rows)
    columns: dict[str, None] = {}
    for row in rows:
        for key in row:
            columns.setdefault(key, None)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), restval="", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return buffer.getvalue()


class MetricsLog:
    """Appends rows to ``metrics.jsonl``; writes ``metrics.csv`` on demand."""

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.run_dir = Path(run_dir)
        self.jsonl_path = self.run_dir / "metrics.jsonl"
        self.csv_path = self.run_dir / "metrics.csv"
        self._handle: io.TextIOWrapper | None = None

    def reset(self) -> None:
        """Start empty (a fresh run in a directory that held an older one)."""
        self.close()
        atomic_write_text(self.jsonl_path, "")
        if self.csv_path.exists():
            self.csv_path.unlink()

    def truncate_after(self, step: int) -> None:
        """Drop rows past ``step`` (written after the checkpoint a resumed run restarts from)."""
        self.close()
        kept = [row for row in read_metrics(self.jsonl_path) if int(row.get("step", 0)) <= step]
        atomic_write_text(self.jsonl_path, "".join(json.dumps(row) + "\n" for row in kept))

    def append(self, row: dict[str, Any]) -> dict[str, Any]:
        """Write one row; returns it as written (non-finite floats as None)."""
        clean = {key: _clean(value) for key, value in row.items()}
        try:
            if self._handle is None:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                self._handle = open(self.jsonl_path, "a", encoding="utf-8")
            self._handle.write(json.dumps(clean, allow_nan=False) + "\n")
            self._handle.flush()
        except OSError as err:
            raise io_error(self.jsonl_path, err) from None
        return clean

    def sync(self) -> None:
        """Flush the JSON-lines file to disk and rewrite the CSV from it."""
        try:
            if self._handle is not None:
                self._handle.flush()
                os.fsync(self._handle.fileno())
        except OSError as err:
            raise io_error(self.jsonl_path, err) from None
        atomic_write_text(self.csv_path, _csv_text(read_metrics(self.jsonl_path)))

    def rows(self) -> list[dict[str, Any]]:
        if self._handle is not None:
            self._handle.flush()
        return read_metrics(self.jsonl_path)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
