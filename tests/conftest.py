"""Shared pytest configuration: the hypothesis profile and the ``device`` parametrization.

Hypothesis: deterministic (derandomized, no example database) so a CI run is reproducible; no
deadline because the first call of an op may compile or warm up; a modest number of examples keeps
the default suite fast. ``STEADYLM_HYPOTHESIS_PROFILE=thorough`` runs many more examples.

Devices: a test that takes a ``device`` argument runs once per device — ``"cpu"`` always, and
``"cuda"`` (marked ``cuda``) when a CUDA device is present; without one the CUDA variant is still
collected and reported as skipped. ``pytest -m cuda`` selects only the CUDA variants (``make
gpu-check``). Write such a test once, creating its tensors and model on ``device``; it is the same
test on both, not a copy.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

settings.register_profile("steadylm", derandomize=True, database=None, deadline=None, max_examples=60)
settings.register_profile("thorough", derandomize=False, database=None, deadline=None, max_examples=2000)
settings.load_profile(os.environ.get("STEADYLM_HYPOTHESIS_PROFILE", "steadylm"))

CUDA_AVAILABLE = torch.cuda.is_available()

#: The values of the ``device`` parametrization, CUDA skipped (not dropped) without a device.
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=[pytest.mark.cuda, pytest.mark.skipif(not CUDA_AVAILABLE, reason="no CUDA device")],
    ),
]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cuda: runs on a CUDA device (the cuda variant of a device test)")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize every test that takes ``device`` (and does not parametrize it itself) over
    :data:`DEVICES`."""
    if "device" not in metafunc.fixturenames:
        return
    for marker in metafunc.definition.iter_markers("parametrize"):
        names = marker.args[0]
        if isinstance(names, str):
            names = [name.strip() for name in names.split(",")]
        if "device" in names:
            return
    metafunc.parametrize("device", DEVICES)
