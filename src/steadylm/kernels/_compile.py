"""How the fused kernels are compiled: one ``torch.compile`` per pure function of
:mod:`steadylm.kernels._math`, cached, with the token dimension dynamic.

Shared by :mod:`.ops` (the public ops and their traced form) and :mod:`.library` (the custom ops);
kept apart from both so that neither imports the other's module at call time.

Set the environment variable ``STEADYLM_COMPILE_KERNELS=0`` (or call :func:`set_compile`) to run
the very same math eagerly, e.g. where no C++ compiler is available.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

import torch
from torch import Tensor

__all__ = ["compile_enabled", "set_compile"]

_compile_enabled: bool = os.environ.get("STEADYLM_COMPILE_KERNELS", "1").strip() not in ("0", "false", "no")


#: Intra-op thread count when the first fused kernel was compiled in this process.
_compile_threads: int | None = None


def set_compile(enabled: bool) -> None:
    """Turn compilation of the fused kernels on (default) or off (same math, run eagerly)."""
    global _compile_enabled
    _compile_enabled = bool(enabled)


def compile_enabled() -> bool:
    """Whether the fused kernels are currently compiled with ``torch.compile``."""
    return _compile_enabled


@functools.cache
def _compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    # Not fullgraph: with fullgraph=True, Dynamo turns its recompile limit (8 specialisations per
    # function: dtypes × hidden sizes × optional-argument flags) into a hard error; without it, the
    # ninth specialisation runs the same math eagerly. Graph-break freedom is tested separately
    # (tests/test_kernels.py compiles a module using every op with fullgraph=True).
    return torch.compile(fn)


def _run(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call the compiled version of ``fn`` (or ``fn`` itself when compilation is off).

    Under an outer ``torch.compile`` the plain function is called: Dynamo is already tracing and
    would inline the inner compiled wrapper anyway.
    """
    if not _compile_enabled or torch.compiler.is_compiling():
        return fn(*args, **kwargs)
    global _compile_threads
    threads = torch.get_num_threads()
    if _compile_threads is None:
        _compile_threads = threads
    elif threads != _compile_threads:
        # Inductor's CPU kernels are built for the intra-op thread count of the process when they
        # were first compiled, and Dynamo's guards do not check it: after torch.set_num_threads()
        # changes it (e.g. `--set train.threads=1` after kernels ran with the default), the compiled
        # backward crashed (SIGSEGV, torch 2.13 CPU). Run the same math eagerly instead.
        return fn(*args, **kwargs)
    return _compiled(fn)(*args, **kwargs)


def _mark_rows_dynamic(*tensors: Tensor | None) -> None:
    """Mark dim 0 (tokens / elements) dynamic so that new batch shapes reuse the kernel."""
    if torch.compiler.is_compiling() or not _compile_enabled:
        return
    for t in tensors:
        if t is not None and t.dim() >= 1:
            torch._dynamo.maybe_mark_dynamic(t, 0)
