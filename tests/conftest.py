"""Shared pytest configuration: the hypothesis profile.

Deterministic (derandomized, no example database) so a CI run is reproducible; no deadline because
the first call of an op may compile or warm up; a modest number of examples keeps the default suite
fast. ``STEADYLM_HYPOTHESIS_PROFILE=thorough`` runs many more examples.
"""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("steadylm", derandomize=True, database=None, deadline=None, max_examples=60)
settings.register_profile("thorough", derandomize=False, database=None, deadline=None, max_examples=2000)
settings.load_profile(os.environ.get("STEADYLM_HYPOTHESIS_PROFILE", "steadylm"))
