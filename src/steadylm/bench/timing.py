"""What every benchmark shares: timing one call, the quantiles reported (median, p20, p80) and the
CSV the results are appended to.

One definition each, so ``steadylm bench ops``, ``steadylm bench model`` and the scale-out bench
(:mod:`steadylm.bench.scale_out`) report comparable numbers: a quantile is the linear
interpolation between order statistics (numpy's default "linear" method), p20/p80 bracket the
median, and a CSV keeps its header (a file with other columns is refused, never rewritten).
"""

from __future__ import annotations

import csv
import io
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from steadylm.errors import ConfigError

__all__ = ["append_csv", "median_interval", "quantile", "spread", "synchronize", "time_call", "verdict"]


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q``-quantile (0 ≤ q ≤ 1) of ``values``: linear interpolation between order statistics."""
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo, hi = int(pos), min(int(pos) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def spread(values: Sequence[float]) -> tuple[float, float, float]:
    """``(p20, median, p80)``: what every benchmark table reports."""
    return quantile(values, 0.2), statistics.median(values), quantile(values, 0.8)


def median_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float] | None:
    """A distribution-free ``confidence`` interval for the median of the population ``values`` were
    drawn from: the order statistics ``(x_(k), x_(n+1-k))`` (1-based) with the largest ``k`` such
    that ``P(Binomial(n, 1/2) < k) <= (1 - confidence) / 2`` (the sign-test interval). It assumes
    only that the values are independent draws; a benchmark's per-round ratios are heavy-tailed
    (a round that another process hit), which is why the median and not the mean is reported.

    None when ``values`` are too few for any such interval (fewer than 6 at 95%: even
    ``(min, max)`` covers the median with less than the asked confidence).
    """
    if not 0.0 < confidence < 1.0:
        raise ConfigError(f"confidence must be in (0, 1), got {confidence}")
    from scipy.stats import binom

    n, tail = len(values), (1.0 - confidence) / 2.0
    # P(x_(k) > median) = P(Binomial(n, 1/2) <= k - 1): count the k (up to n/2) whose tail stays
    # within alpha/2; the tail grows with k, so they are the first ones.
    k = int((binom.cdf(np.arange(n // 2), n, 0.5) <= tail).sum())
    if k == 0:
        return None
    ordered = sorted(values)
    return ordered[k - 1], ordered[n - k]


def verdict(values: Sequence[float], target: float, confidence: float = 0.95) -> str:
    """Whether the median of ``values`` reaches ``target``, decided by :func:`median_interval`:
    ``"met"`` (the whole interval at or above it), ``"not met"`` (the whole interval below it) or
    ``"inconclusive"`` (the interval straddles it, or too few values for an interval)."""
    interval = median_interval(values, confidence)
    if interval is None:
        return "inconclusive"
    low, high = interval
    if low >= target:
        return "met"
    if high < target:
        return "not met"
    return "inconclusive"


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU), so a timer brackets the work itself."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device, calls: int = 1) -> float:
    """Seconds per ``fn()`` on ``device``: ``calls`` calls back to back, synchronised before and
    after, their results dropped, the total divided by ``calls``.

    With one call the time includes all of the call's host work (Python, dispatch, guards), during
    which a GPU waits. With several on CUDA, the host prepares the next call while the device runs
    this one, as in a step whose GPU queue runs ahead: where the device work per call is the longer,
    the figure is the device time, which is what a bandwidth roofline compares (CUDA events bracket
    the calls; where the host work is the longer, they see it as idle gaps).
    """
    if calls < 1:
        raise ConfigError(f"calls must be >= 1, got {calls}")
    synchronize(device)
    if device.type == "cuda" and calls > 1:
        start_event, end_event = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start_event.record()
        for _ in range(calls):
            fn()
        end_event.record()
        end_event.synchronize()
        return start_event.elapsed_time(end_event) / 1e3 / calls
    start = time.perf_counter()
    for _ in range(calls):
        out = fn()
        del out
    synchronize(device)
    return (time.perf_counter() - start) / calls


def append_csv(path: str | os.PathLike[str], rows: Sequence[dict[str, str]], columns: Sequence[str]) -> None:
    """Append ``rows`` to a CSV with ``columns`` (header written when the file is new); the file is
    replaced atomically. A file with other columns raises :class:`ConfigError`."""
    from steadylm.train.atomic import atomic_write_text

    target = Path(path)
    existing = target.read_text(encoding="utf-8") if target.exists() else ""
    if existing:
        header = existing.splitlines()[0].split(",")
        if tuple(header) != tuple(columns):
            raise ConfigError(f"csv: {target} has columns {header}, expected {list(columns)}")
        if not existing.endswith("\n"):
            existing += "\n"
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    if not existing:
        writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(target, existing + buffer.getvalue())
