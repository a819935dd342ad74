"""Loss-spike and divergence detection on a logged loss series.

Both work on plain sequences of floats (one value per logged step), so the lab, the stress
protocols and a user's notebook can apply them to any ``metrics.jsonl`` after the fact.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT_WINDOW = 50
DEFAULT_THRESHOLD = 4.0
#: Loss units a run may sit above its start before it counts as diverged: step-to-step noise
#: in the first few steps after initialisation must not count.
DEFAULT_DIVERGENCE_MARGIN = 0.1


@dataclass(frozen=True)
class Spike:
    index: int  # position in the loss sequence
    loss: float
    zscore: float  # (loss − mean of the preceding window) / its std


@dataclass(frozen=True)
class Divergence:
    index: int  # first position at which the run counts as diverged
    loss: float
    reason: str  # "non-finite" or "above-start"


def _validate(window: int, threshold: float) -> None:
    if not isinstance(window, int) or window < 2:
        raise ValueError(f"window must be an integer >= 2, got {window!r}")
    if not (threshold > 0 and math.isfinite(threshold)):
        raise ValueError(f"threshold must be a finite number > 0, got {threshold!r}")


def rolling_zscores(
    losses: Sequence[float], window: int = DEFAULT_WINDOW, min_std: float = 1e-8
) -> list[float]:
    """z_i = (l_i − mean(l_{i−W..i−1})) / std(l_{i−W..i−1}) against the *preceding* window.

    The window holds the last ``window`` finite values before i (non-finite losses are skipped,
    so one NaN does not blind the detector for W steps). NaN where fewer than ``window`` finite
    predecessors exist, where l_i is not finite, or where the window's std is below ``min_std``.
    The std is the population std of the window.
    """
    _validate(window, 1.0)
    out: list[float] = []
    buf: deque[float] = deque(maxlen=window)  # the last `window` finite values
    for loss in losses:
        v = float(loss)
        z = math.nan
        if len(buf) == window and math.isfinite(v):
            # direct two-pass statistics (O(W) per step): running sums cancel badly on plateaus
            mean = math.fsum(buf) / window
            std = math.sqrt(math.fsum((b - mean) ** 2 for b in buf) / window)
            if std >= min_std:
                z = (v - mean) / std
        out.append(z)
        if math.isfinite(v):
            buf.append(v)
    return out


def detect_spikes(
    losses: Sequence[float],
    window: int = DEFAULT_WINDOW,
    threshold: float = DEFAULT_THRESHOLD,
) -> list[Spike]:
    """Loss spikes: positions whose rolling z-score (see :func:`rolling_zscores`) exceeds
    ``threshold``. Only upward excursions count (a sudden drop is not an instability).

    ``window`` (W, ≥ 2) is the number of preceding finite losses the z-score is measured against;
    ``threshold`` (k > 0) is in standard deviations. The first W positions are never flagged.
    """
    _validate(window, threshold)
    zs = rolling_zscores(losses, window)
    return [
        Spike(index=i, loss=float(losses[i]), zscore=z)
        for i, z in enumerate(zs)
        if math.isfinite(z) and z > threshold
    ]


def detect_divergence(
    losses: Sequence[float], margin: float = DEFAULT_DIVERGENCE_MARGIN, start: float | None = None
) -> Divergence | None:
    """The first position at which a run has diverged, or None.

    Diverged means a non-finite loss (NaN/inf), or a loss above the starting value plus
    ``margin`` (default 0.1, so that noise right after initialisation does not count) — the starting value is ``start`` if given, else the first finite loss of the
    series (at initialisation a language model's loss is ≈ ln(vocab); a run that climbs back
    above it has lost everything it learned).
    """
    if margin < 0 or not math.isfinite(margin):
        raise ValueError(f"margin must be a finite number >= 0, got {margin!r}")
    ref = start
    for i, loss in enumerate(losses):
        v = float(loss)
        if not math.isfinite(v):
            return Divergence(index=i, loss=v, reason="non-finite")
        if ref is None:
            ref = v
            continue
        if v > ref + margin:
            return Divergence(index=i, loss=v, reason="above-start")
    return None
