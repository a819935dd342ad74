"""Spread over seeds: the per-variant mean, standard deviation and range of a lab number over runs
that differ only in ``train.seed`` (initialisation and batch order), and which differences from the
baseline exceed that spread.

One seed at a high learning rate amplifies last-bit differences (another CPU's vector width, another
BLAS) into visible ones, so a difference between two variants means something only next to the
spread that the seed alone produces. The rule used everywhere (:func:`exceeds_spread`): a variant
differs from the baseline when their seed ranges ``[min, max]`` do not overlap — with 3 seeds, a
conservative test that needs no distributional assumption.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from steadylm.config_fields import spec_field
from steadylm.errors import ConfigError
from steadylm.lab.report import fmt, markdown_table

__all__ = [
    "SEED_METRICS",
    "SPREAD_RULE",
    "SeedOptions",
    "SeedStats",
    "exceeds_spread",
    "seed_stats",
    "seed_table",
    "validate_seeds",
]

#: (RunSummary field, column header, number format) of the numbers reported with their spread.
SEED_METRICS: tuple[tuple[str, str, str], ...] = (
    ("final_val_loss", "val loss", "{:.3f}"),
    ("final_train_loss", "train loss (last 10)", "{:.3f}"),
    ("down_in_amax_last", "max |down-in|", "{:.3g}"),
    ("last_layer_hidden_var", "last-layer var", "{:.3g}"),
)

#: The sentence every report quotes for the marker.
SPREAD_RULE = ("† marks a difference from the baseline that exceeds the spread over seeds: the "
               "variant's range [min, max] over seeds does not overlap the baseline's.")


@dataclass
class SeedOptions:
    """Repeat every run over several seeds and report the spread."""

    seeds: list[int] | None = spec_field(None, help="train every variant once per seed (e.g. 0,1,2; "
                                         "runs in OUT/seed<k>/) and report each number's mean, standard "
                                         "deviation and range over seeds", flag="--seeds")


@dataclass(frozen=True)
class SeedStats:
    """One number of one variant over seeds (non-finite values — a diverged run — are counted in
    ``n_nonfinite`` and left out of the statistics)."""

    values: tuple[float, ...]

    @property
    def finite(self) -> list[float]:
        return [v for v in self.values if math.isfinite(v)]

    @property
    def n(self) -> int:
        return len(self.finite)

    @property
    def n_nonfinite(self) -> int:
        return len(self.values) - self.n

    @property
    def mean(self) -> float:
        return statistics.fmean(self.finite) if self.finite else math.nan

    @property
    def sd(self) -> float:
        """Sample standard deviation (n − 1); NaN with fewer than 2 finite values."""
        return statistics.stdev(self.finite) if self.n >= 2 else math.nan

    @property
    def low(self) -> float:
        return min(self.finite) if self.finite else math.nan

    @property
    def high(self) -> float:
        return max(self.finite) if self.finite else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {"values": list(self.values), "mean": self.mean, "sd": self.sd, "min": self.low,
                "max": self.high, "n": self.n}


def validate_seeds(seeds: Sequence[int] | None) -> list[int] | None:
    """``seeds`` as a list, or ``None`` when unset; distinct integers ≥ 0."""
    if seeds is None:
        return None
    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds) or any(not isinstance(s, int) or s < 0 for s in seeds):
        raise ConfigError(f"--seeds must be distinct integers >= 0, got {seeds}")
    return seeds


def seed_stats(summaries: Mapping[str, Sequence[Any]],
               metrics: Sequence[tuple[str, str, str]] = SEED_METRICS) -> dict[str, dict[str, SeedStats]]:
    """``{variant: {field: SeedStats}}`` from ``{variant: [RunSummary per seed]}``."""
    return {name: {key: SeedStats(tuple(float(getattr(s, key)) for s in runs)) for key, _, _ in metrics}
            for name, runs in summaries.items()}


def exceeds_spread(a: SeedStats, b: SeedStats) -> bool:
    """Whether the seed ranges of ``a`` and ``b`` are disjoint (both need ≥ 2 finite values: a
    single seed has no spread to compare against)."""
    if a.n < 2 or b.n < 2:
        return False
    return a.low > b.high or a.high < b.low


def seed_table(stats: Mapping[str, Mapping[str, SeedStats]], baseline: str | None,
               metrics: Sequence[tuple[str, str, str]] = SEED_METRICS) -> str:
    """Markdown: per variant, each number as ``mean ± sd [min, max]`` and its difference from the
    baseline's mean, marked † where it exceeds the spread (:data:`SPREAD_RULE`)."""
    headers = ["variant", "seeds"]
    for _, header, _ in metrics:
        headers += [header, f"Δ {header}"]
    rows = []
    base = stats.get(baseline) if baseline is not None else None
    for name, per in stats.items():
        first = next(iter(per.values()))
        seeds_cell = f"{first.n}" + (f" (+{first.n_nonfinite} non-finite)" if first.n_nonfinite else "")
        row = [name, seeds_cell]
        for key, _, spec in metrics:
            s = per[key]
            cell = f"{fmt(s.mean, spec)} ± {fmt(s.sd, spec)} [{fmt(s.low, spec)}, {fmt(s.high, spec)}]"
            if base is None or name == baseline:
                delta = "–"
            else:
                d = s.mean - base[key].mean
                delta = (f"{d:+.3g}" if math.isfinite(d) else "–") + (" †" if exceeds_spread(s, base[key]) else "")
            row += [cell, delta]
        rows.append(row)
    return markdown_table(headers, rows)
