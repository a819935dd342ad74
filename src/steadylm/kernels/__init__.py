"""Fused fast paths of the steadylm ops (same names and signatures as :mod:`steadylm.functional`).

One pass forward, one pass backward that recomputes from the saved inputs, fp32 math inside,
compiled by ``torch.compile`` (Inductor: C++ on CPU, Triton on CUDA). See :mod:`.ops` for the design
and :mod:`.cpu_memory` for the CPU allocator settings that decide how close to memory bandwidth
these kernels get on a CPU.
"""

from __future__ import annotations

from steadylm.kernels import ops as _ops
from steadylm.kernels.ops import *  # noqa: F403 — the public ops; ops.__all__ owns the list

# Everything ops exports but its per-device tuning table.
__all__ = [name for name in _ops.__all__ if name != "COMPILED_INLINE"]
