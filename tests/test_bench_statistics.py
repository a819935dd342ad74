"""The interval and verdict every paired benchmark ratio is judged by (``bench.timing``).

The interval must cover the population median at least as often as it claims, at every sample size
(checked by simulation on a skewed, heavy-tailed distribution like a noisy benchmark's, with a
fixed seed), and no more often than the order statistics it picks allow. The p20–p80 range that
the tables print beside it is *not* such an interval: the same check rejects it (the mutant).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.stats import binom

from steadylm.bench.timing import median_interval, quantile, verdict
from steadylm.errors import ConfigError


@functools.cache
def _population_median() -> float:
    """The median of :func:`_coverage`'s population, from a sample far larger than any trial."""
    rng = np.random.default_rng(0)
    big = np.exp(rng.normal(0.0, 0.5, size=2_000_000))
    return float(np.median(np.where(rng.random(big.shape) < 0.1, big * 1.3, big)))


def _coverage(interval_of, n: int, trials: int = 4000) -> float:
    """How often ``interval_of(sample)`` holds the median of a lognormal(0, 0.5) population, shifted
    and mixed with 10% of rounds slowed 1.3× (another process hitting the machine)."""
    rng = np.random.default_rng(n)
    samples = np.exp(rng.normal(0.0, 0.5, size=(trials, n)))
    slowed = rng.random((trials, n)) < 0.1
    samples = np.where(slowed, samples * 1.3, samples)
    median = _population_median()
    hits = 0
    for row in samples:
        interval = interval_of(list(row))
        hits += interval is not None and interval[0] <= median <= interval[1]
    return hits / trials


@pytest.mark.parametrize("n", [6, 11, 21, 51])
def test_the_median_interval_covers_the_median_as_often_as_it_claims(n):
    k = int(median_interval([float(i) for i in range(n)])[0]) + 1  # the interval is (x_(k), x_(n+1-k))
    exact = 1.0 - 2.0 * binom.cdf(k - 1, n, 0.5)  # P(x_(k) <= median <= x_(n+1-k)) for continuous draws
    assert exact >= 0.95
    assert 1.0 - 2.0 * binom.cdf(k, n, 0.5) < 0.95  # and the narrowest such: one rank in would fall short
    coverage = _coverage(median_interval, n)
    # 4000 trials: the binomial standard error of a coverage near 0.96 is 0.003; 4 of them.
    assert exact - 0.013 <= coverage <= exact + 0.013


def _one_rank_narrower(values):
    low, high = median_interval(values)
    ordered = sorted(values)
    return ordered[ordered.index(low) + 1], ordered[len(ordered) - 2 - ordered.index(low)]


@pytest.mark.parametrize(
    ("mutant", "n"),
    [
        # The tables' p20–p80 range used as the interval (it covers more as n grows: 0.99 at n = 21).
        (lambda v: (quantile(v, 0.2), quantile(v, 0.8)), 6),
        # One order statistic too far in on each side: 92% at n = 21.
        (_one_rank_narrower, 21),
    ],
    ids=["p20-p80", "one-rank-narrower"],
)
def test_the_coverage_check_rejects_intervals_that_claim_too_much(mutant, n):
    assert _coverage(mutant, n) < 0.95 - 0.013


def test_too_few_values_give_no_interval_and_an_inconclusive_verdict():
    assert median_interval([]) is None
    assert median_interval([1.0, 2.0, 3.0, 4.0, 5.0]) is None  # (min, max) covers with 93.75% only
    assert median_interval([1.0] * 6) == (1.0, 1.0)
    assert verdict([2.0] * 5, 1.0) == "inconclusive"
    with pytest.raises(ConfigError, match="confidence must be in"):
        median_interval([1.0] * 10, confidence=1.0)


def test_verdicts_need_the_whole_interval_on_one_side():
    ratios = [0.99, 1.00, 1.01, 1.02, 1.03, 1.04, 1.05, 1.06, 1.07, 1.08, 1.09]  # interval x_(2)..x_(10)
    assert median_interval(ratios) == (1.00, 1.08)
    assert verdict(ratios, 0.995) == "met" and verdict(ratios, 1.00) == "met"
    assert verdict(ratios, 1.016) == "inconclusive"
    assert verdict(ratios, 1.081) == "not met"


@given(st.lists(st.floats(min_value=-1e6, max_value=1e6, allow_nan=False), min_size=6, max_size=200))
def test_the_interval_holds_the_sample_median_and_narrows_with_confidence(values):
    low, high = median_interval(values)
    assert low <= float(np.median(values)) <= high
    assert low in values and high in values
    wider = median_interval(values, confidence=0.99)
    if wider is not None:
        assert wider[0] <= low and high <= wider[1]
