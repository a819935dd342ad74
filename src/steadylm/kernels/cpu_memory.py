"""CPU allocator settings that decide how close elementwise/norm kernels get to memory bandwidth.

Measured on the project machine (2-core AMD EPYC Zen 4 VM, AVX-512, THP in ``madvise`` mode;
details and numbers in BENCHMARKS.md): a 128 MiB ``clone`` runs at ~7 GB/s while ``copy_`` into a
preallocated tensor runs at ~30 GB/s. The difference is the *fresh allocation*: glibc serves every
allocation above 32 MiB with a new ``mmap``, and the kernel must fault in and zero each 4 KiB page
on first touch (32 768 faults per 128 MiB), then ``munmap`` frees it again — every call. Any op that
returns a new large tensor (eager, ``torch.compile``'d, or fused) pays this, so at 8192×4096 the
allocator, not the arithmetic, sets the speed.

Two process-wide remedies, both opt-in because they change the whole process's memory behaviour:

* ``"heap"``: ``mallopt(M_MMAP_MAX, 0)`` + a huge ``M_TRIM_THRESHOLD`` make glibc serve large blocks
  from the heap and keep freed blocks for reuse, so steady-state training loops stop faulting
  (memory is not returned to the OS until exit; peak RSS stays at the high-water mark).
* ``"thp"``: PyTorch's own ``THP_MEM_ALLOC_ENABLE=1`` aligns large CPU allocations to 2 MiB and
  ``madvise``s them as transparent huge pages (512× fewer faults). PyTorch reads the variable once,
  at the first large allocation, so it only takes effect when set before that.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["CPU_ALLOCATOR_STRATEGIES", "tune_cpu_allocator"]

CPU_ALLOCATOR_STRATEGIES: tuple[str, ...] = ("default", "heap", "thp")

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1


def tune_cpu_allocator(strategy: str) -> bool:
    """Apply a CPU allocator strategy to this process; return whether it took effect.

    Args:
        strategy: ``"default"`` (change nothing), ``"heap"`` (glibc keeps large blocks for reuse;
            Linux/glibc only) or ``"thp"`` (PyTorch's transparent-huge-page allocations; must run
            before the process's first large tensor allocation).
    Raises:
        ValueError: unknown strategy.
    """
    if strategy not in CPU_ALLOCATOR_STRATEGIES:
        raise ValueError(f"strategy must be one of {list(CPU_ALLOCATOR_STRATEGIES)}, got {strategy!r}")
    if strategy == "default":
        return True
    if strategy == "thp":
        os.environ["THP_MEM_ALLOC_ENABLE"] = "1"
        return sys.platform.startswith("linux")
    if not sys.platform.startswith("linux"):
        return False
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    try:
        libc = ctypes.CDLL(libc_name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False
    ok_mmap = mallopt(_M_MMAP_MAX, 0) == 1
    ok_trim = mallopt(_M_TRIM_THRESHOLD, _INT_MAX) == 1
    return ok_mmap and ok_trim
