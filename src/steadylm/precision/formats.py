"""FP8 formats, per-tensor scaling and the FP8 matmul primitive.

Numbers (SPEC §4):

======  ========  ===========  ==============  ====================
format  max       min normal   min subnormal   unit roundoff u
======  ========  ===========  ==============  ====================
e4m3    448       2^-6         2^-9            2^-4 (3 mantissa bits)
e5m2    57344     2^-14        2^-16           2^-3 (2 mantissa bits)
======  ========  ===========  ==============  ====================

``torch._scaled_mm(a, b, scale_a, scale_b, out_dtype=...)`` computes
``(a.float() * scale_a) @ (b.float() * scale_b)``: the scales it takes are *dequantisation* scales,
i.e. the reciprocal of the quantisation scale ``s = fmax / amax`` this module works with. What it
accepts (checked on torch 2.13, CPU build):

- ``a`` 2-D row-major, ``b`` 2-D (column-major is what CUDA requires; the CPU kernel takes either);
  3-D inputs are refused ("mat1 must be a matrix"), so callers flatten the leading dimensions;
- fp32 scales of shape ``[]``, ``[1]`` or ``[1, 1]`` (per-tensor); row-wise scales exist but are unused
  here;
- dtype pairs on CPU: every combination of e4m3/e5m2, including e5m2 x e5m2. On Hopper (sm_89+),
  cuBLASLt refuses e5m2 x e5m2, so the three products this package issues are chosen to be valid on
  both: forward ``x(e4m3) @ W(e4m3)^T``, data gradient ``dY(e5m2) @ W(e4m3)`` and weight gradient
  ``dY(e5m2)^T @ x(e4m3)``;
- CUDA additionally requires both dimensions of ``b`` and the inner dimension to be multiples of 16
  and compute capability >= 8.9. Where a shape or device does not qualify, or where ``_scaled_mm`` is
  absent (older torch), :func:`fp8_mm` falls back to the *same arithmetic* emulated in fp32
  (dequantise the FP8 operands, multiply): the rounding of the operands — which is what this package
  studies — is identical; only the accumulation order differs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "E4M3",
    "E5M2",
    "FP8Format",
    "fp8_mm",
    "scaled_mm_available",
]


@dataclass(frozen=True)
class FP8Format:
    name: str
    dtype: torch.dtype
    max: float
    min_normal: float
    min_subnormal: float
    mantissa_bits: int

    @property
    def unit_roundoff(self) -> float:
        """Largest relative rounding error of a normal number: 2^-(mantissa_bits + 1)."""
        return 2.0 ** -(self.mantissa_bits + 1)


E4M3 = FP8Format("e4m3", torch.float8_e4m3fn, 448.0, 2.0**-6, 2.0**-9, 3)
E5M2 = FP8Format("e5m2", torch.float8_e5m2, 57344.0, 2.0**-14, 2.0**-16, 2)


def scaled_mm_available(device: torch.device, a_shape: tuple[int, int], b_shape: tuple[int, int]) -> bool:
    """Whether ``torch._scaled_mm`` can run this product on this device (else :func:`fp8_mm` emulates)."""
    if not hasattr(torch, "_scaled_mm"):
        return False
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        if torch.cuda.get_device_capability(device) < (8, 9):
            return False
        m, k = a_shape
        _, n = b_shape
        return k % 16 == 0 and n % 16 == 0 and m % 16 == 0
    return False


def fp8_mm(
    a: torch.Tensor,
    b: torch.Tensor,
    a_inv_scale: torch.Tensor,
    b_inv_scale: torch.Tensor,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``(a * a_inv_scale) @ (b * b_inv_scale)`` for FP8 ``a`` [M, K] and ``b`` [K, N].

    On CUDA ``a`` is made row-major and ``b`` column-major here if they are not. The
    inverse scales are fp32 0-dim tensors (no host sync anywhere).
    """
    if scaled_mm_available(a.device, tuple(a.shape), tuple(b.shape)):
        if a.device.type == "cuda":  # cuBLASLt layouts; the CPU kernel takes any strides
            if a.stride(-1) != 1:
                a = a.contiguous()
            if b.stride(0) != 1:
                b = b.t().contiguous().t()
        return torch._scaled_mm(a, b, scale_a=a_inv_scale, scale_b=b_inv_scale, out_dtype=out_dtype)
    out = (a.float() * a_inv_scale) @ (b.float() * b_inv_scale)
    return out.to(out_dtype)
