"""Choosing between the reference math and the fused kernels."""

from __future__ import annotations

from types import ModuleType
from typing import Callable

from steadylm.errors import ConfigError

IMPLS: tuple[str, ...] = ("fused", "reference")


def check_impl(impl: str) -> str:
    """Validate an ``impl`` argument: ``"fused"`` (default fast path) or ``"reference"``."""
    if impl not in IMPLS:
        raise ConfigError(f"impl must be one of {list(IMPLS)}, got {impl!r}")
    return impl


def resolve_op(impl: str, name: str) -> Callable:
    """The op ``name`` from ``steadylm.kernels`` (fused) or ``steadylm.functional`` (reference).

    Both modules expose the same names and signatures, so modules switch paths with one string.
    """
    module: ModuleType
    if impl == "fused":
        from steadylm import kernels as module
    else:
        from steadylm import functional as module
    return getattr(module, name)
