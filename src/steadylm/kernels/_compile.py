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
import types
from typing import Any, Callable

import torch
from torch import Tensor

__all__ = ["compile_enabled", "set_compile"]

_compile_enabled: bool = os.environ.get("STEADYLM_COMPILE_KERNELS", "1").strip() not in ("0", "false", "no")




def _separate_inductor_cache_per_cpu_capability() -> None:
    """Give each ``ATEN_CPU_CAPABILITY`` its own Inductor cache directory (unless one is set).

    Inductor picks its vector ISA from ``ATEN_CPU_CAPABILITY`` but does not put that choice in its
    on-disk FX-graph cache key (torch 2.13). C++ generated for one ISA is then recompiled for
    another: code written for 8-lane avx2 vectors, rebuilt for 16-lane avx512, stores past the end
    of its buffers ("double free or corruption", SIGABRT/SIGSEGV in the fused backward; measured),
    and avx512 code fails to build under ``default``. Runs that never set the variable keep
    torch's default directory. Called at import, before anything is compiled: Inductor reads the
    variable when it first needs the directory.
    """
    capability = os.environ.get("ATEN_CPU_CAPABILITY", "").strip()
    if not capability or "TORCHINDUCTOR_CACHE_DIR" in os.environ:
        return
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = f"{default_cache_dir()}_{capability}"


_separate_inductor_cache_per_cpu_capability()


def set_compile(enabled: bool) -> None:
    """Turn compilation of the fused kernels on (default) or off (same math, run eagerly)."""
    global _compile_enabled
    _compile_enabled = bool(enabled)


def compile_enabled() -> bool:
    """Whether the fused kernels are currently compiled with ``torch.compile``."""
    return _compile_enabled


#: Below this many elements a CPU kernel runs on one thread: ATen's own ``parallel_for`` grain
#: size (``at::internal::GRAIN_SIZE``). Inductor cannot decide that itself for a kernel whose row
#: count is dynamic, and always opens an OpenMP parallel region: measured in a micro-preset decode
#: step at batch 4 on 2 threads, that costs ~18 µs per fused call (every kernel of the step serial:
#: 4.82 -> 4.47 ms per step).
SERIAL_BELOW = 32768


@functools.cache
def _compiled(fn: Callable[..., Any], serial: bool = False) -> Callable[..., Any]:
    # Not fullgraph: with fullgraph=True, Dynamo turns its recompile limit (8 specialisations per
    # function: dtypes × hidden sizes × optional-argument flags) into a hard error; without it, the
    # ninth specialisation runs the same math eagerly. Graph-break freedom is tested separately
    # (tests/test_kernels.py compiles a module using every op with fullgraph=True).
    if not serial:
        return torch.compile(fn)
    # Its own copy of the code object: Dynamo keys its cache (and that recompile limit) on the code,
    # so the serial build neither evicts nor counts against the parallel one.
    copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return torch.compile(copy, options={"cpp.threads": 1})


def _kernel(fn: Callable[..., Any], like: Tensor) -> Callable[..., Any]:
    """What to call for ``fn`` on inputs like ``like``: its compiled version (built for one thread
    when ``like`` is a CPU tensor of fewer than :data:`SERIAL_BELOW` elements), or ``fn`` itself
    when compilation is off.

    Under an outer ``torch.compile`` the plain function: Dynamo is already tracing and would
    inline the inner compiled wrapper anyway. Returned rather than called here so that the
    arguments are passed once (a decode step's ops are small enough for that to show).
    """
    if not _compile_enabled or torch.compiler.is_compiling():
        return fn
    return _compiled(fn, like.device.type == "cpu" and like.numel() < SERIAL_BELOW)


def _mark_rows_dynamic(*tensors: Tensor | None) -> None:
    """Mark dim 0 (tokens / elements) dynamic so that new batch shapes reuse the kernel."""
    if torch.compiler.is_compiling() or not _compile_enabled:
        return
    for t in tensors:
        # Sizes 0 and 1 are specialised by Dynamo whatever the mark says: skip marking them.
        if t is not None and t.dim() >= 1 and t.shape[0] > 1:
            torch._dynamo.maybe_mark_dynamic(t, 0)
