"""Stability measurements taken during training (SPEC §5).

- :mod:`steadylm.probes.stats` — tensor statistics (min, max, P1, P99, amax, Pearson kurtosis,
  max/RMS), hidden-state norm/variance, Pearson r.
- :mod:`steadylm.probes.probe` — :class:`StabilityProbe`, the hook-based probe the trainer calls.
- :mod:`steadylm.probes.spikes` — loss-spike (rolling z-score) and divergence detection.
"""

from steadylm.probes.probe import StabilityProbe
from steadylm.probes.spikes import (
    Divergence,
    Spike,
    detect_divergence,
    detect_spikes,
    rolling_zscores,
)
from steadylm.probes.stats import STAT_NAMES, pearson_r, tensor_stats, token_l2_and_variance

__all__ = [
    "STAT_NAMES",
    "Divergence",
    "Spike",
    "StabilityProbe",
    "detect_divergence",
    "detect_spikes",
    "pearson_r",
    "rolling_zscores",
    "tensor_stats",
    "token_l2_and_variance",
]
