"""Fused fast paths of the steadylm ops (same names and signatures as :mod:`steadylm.functional`).

One pass forward, one pass backward that recomputes from the saved inputs, fp32 math inside,
compiled by ``torch.compile`` (Inductor: C++ on CPU, Triton on CUDA). See :mod:`.ops` for the design
and :mod:`.cpu_memory` for the CPU allocator settings that decide how close to memory bandwidth
these kernels get on a CPU.
"""

from __future__ import annotations

from steadylm.kernels.ops import (
    bhyt,
    bhyt_and_mean_square,
    compile_enabled,
    dyt,
    mean_square,
    powlu_glu,
    rms_norm,
    set_compile,
    swiglu,
    swiglu_clip,
)

__all__ = [
    "bhyt",
    "bhyt_and_mean_square",
    "compile_enabled",
    "dyt",
    "mean_square",
    "powlu_glu",
    "rms_norm",
    "set_compile",
    "swiglu",
    "swiglu_clip",
]
