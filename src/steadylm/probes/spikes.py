"""Loss-spike and divergence detection on a logged loss series, and the one definition of
"diverged" and "rose above the start loss" that the trainer, the lab's summaries and every report use.

The detectors work on plain sequences of floats (one value per logged step), so the lab, the stress
protocols and a user's notebook can apply them to any ``metrics.jsonl`` after the fact. The rule
(:func:`above_start`, :func:`classify_run`) and its wording (:data:`DIVERGENCE_RULE`,
:data:`EXCURSION_RULE`) live here and nowhere else:

* **above the start**: a loss above the run's first finite loss + :data:`DEFAULT_DIVERGENCE_MARGIN`
  (the margin keeps step-to-step noise right after initialisation from counting);
* **diverged**: a non-finite loss or gradient (the trainer stops the run there), or a run that
  *ends* (mean of its last :data:`ENDING_WINDOW` losses) above the start;
* **excursion**: a run that did not diverge but was above the start on the way (the first such
  step): a transient instability it recovered from.
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
#: Losses averaged for "where the run ended" (the divergence verdict and the final train loss).
ENDING_WINDOW = 10

#: The divergence rule in words, quoted by every report.
DIVERGENCE_RULE = (
    "a non-finite loss or gradient (the trainer stops the run), or a run that *ends* "
    f"(mean of its last {ENDING_WINDOW} losses) above its first loss + {DEFAULT_DIVERGENCE_MARGIN}"
)
#: The excursion rule in words, quoted by every report.
EXCURSION_RULE = (
    f"a run that does not diverge but climbs above its first loss + {DEFAULT_DIVERGENCE_MARGIN} on the "
    "way (a transient instability it recovers from) is reported with an excursion at that step"
)


def above_start(loss: float, start: float, margin: float = DEFAULT_DIVERGENCE_MARGIN) -> bool:
    """Whether ``loss`` counts as above the run's starting loss ``start`` (the one rule)."""
    return loss > start + margin


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
        if above_start(v, ref, margin):
            return Divergence(index=i, loss=v, reason="above-start")
    return None


@dataclass(frozen=True)
class RunVerdict:
    """:func:`classify_run`'s answer: positions in the loss series (None: not at all)."""

    diverged: bool
    divergence_index: int | None  # first non-finite position, or the first position above the start
    divergence_reason: str | None  # "non-finite loss" / "ended above its starting loss"
    excursion_index: int | None  # a run that did not diverge: its first position above the start


def classify_run(losses: Sequence[float], margin: float = DEFAULT_DIVERGENCE_MARGIN) -> RunVerdict:
    """Diverged / excursion / neither for a loss series, by :data:`DIVERGENCE_RULE` and
    :data:`EXCURSION_RULE` (a run the trainer stopped is diverged whatever this says)."""
    first = detect_divergence(losses, margin)
    if first is not None and first.reason == "non-finite":
        return RunVerdict(True, first.index, "non-finite loss", None)
    finite = [float(v) for v in losses if math.isfinite(float(v))]
    tail = [float(v) for v in losses[-ENDING_WINDOW:] if math.isfinite(float(v))]
    # the same mean as RunSummary.final_train_loss (plain sum, so the verdict matches the table)
    if finite and tail and above_start(sum(tail) / len(tail), finite[0], margin):
        return RunVerdict(True, first.index if first is not None else None, "ended above its starting loss", None)
    return RunVerdict(False, None, None, first.index if first is not None else None)
