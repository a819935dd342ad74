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

import torch

# Triton's kernels (kernels/triton_norms.py) run on CPU through Triton's interpreter, which must be
# switched on before Triton is imported (its @triton.jit reads TRITON_INTERPRET at decoration time,
# and its lazy imports read it later too, so it stays set; child processes inherit it harmlessly:
# steadylm only routes CPU tensors to the interpreted kernels while `triton_norms.cpu_interpreter`
# is on, see the `triton_on_cpu` fixture). Importing torch does not import Triton. With a CUDA
# device the real compiled kernels are tested instead, so the variable is left alone.
CUDA_AVAILABLE = torch.cuda.is_available()
if not CUDA_AVAILABLE:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# One Inductor cache directory per ATEN_CPU_CAPABILITY (so the suite passes under default / avx2 /
# avx512 on one machine, and its child processes inherit the choice): steadylm.kernels sets it at
# import, before anything compiles; see kernels/_compile.py for the torch cache-key bug it avoids.
# After TRITON_INTERPRET: steadylm.kernels imports Triton.
import steadylm.kernels  # noqa: E402,F401

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

settings.register_profile("steadylm", derandomize=True, database=None, deadline=None, max_examples=60)
settings.register_profile("thorough", derandomize=False, database=None, deadline=None, max_examples=2000)
settings.load_profile(os.environ.get("STEADYLM_HYPOTHESIS_PROFILE", "steadylm"))

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


@pytest.fixture
def triton_on_cpu(monkeypatch: pytest.MonkeyPatch) -> bool:
    """Let the public ops' CPU backward take the Triton kernels (interpreted) for one test.

    Returns whether they can run here at all: Triton installed and, on CPU, interpreted.
    """
    from steadylm.kernels import triton_norms

    monkeypatch.setattr(triton_norms, "cpu_interpreter", True)
    return triton_norms.available() and triton_norms._INTERPRET
