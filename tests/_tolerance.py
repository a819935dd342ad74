"""Tolerances in units of the output dtype, for tests that compare against a float64 reference.

The rule (issue 15): every element of a result must lie within

    allowed = ulps · ulp(ref)  +  U32 · bound  +  SUBNORMAL · underflow

of its float64 reference, where

* ``ulp(ref)`` is the spacing of the *output* dtype at ``|ref|`` (:func:`ulp`; subnormal spacing
  below the smallest normal number). ``ulps = 0.5`` is the one rounding of a round-to-nearest
  cast of the (fp32) result to the output dtype — the whole bf16 error budget, since fp32 math
  adds only ``~2^-16`` bf16 ulps per rounding; for fp32 outputs it is the last rounding.
* ``bound`` is the op's forward-error bound in units of ``U32 = 2^-24`` (fp32 unit roundoff), a
  float64 tensor computed per element from the *inputs*: a count of fp32 roundings times the
  magnitude of the terms they act on. Where terms cancel (``g − x̂·mean(g·x̂)``, ``u + 1``,
  ``1 + g(1 − σ)``) the magnitude is the sum of the absolute values of those terms, not the
  (possibly tiny) result — the op's conditioning, element by element, never the worst error
  anywhere in the tensor.
* ``underflow`` is the absolute error from fp32 intermediates that fell into the subnormal range
  (at most one subnormal spacing, ``SUBNORMAL = 2^-149``, times what multiplies them afterwards).

Non-finite references must be matched exactly (same infinity, or NaN for NaN); a finite reference
whose value rounds to ±inf in the output dtype must come back as that infinity.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["SUBNORMAL", "U32", "assert_within", "excess", "ulp"]

#: fp32 unit roundoff: one round-to-nearest fp32 operation has relative error ≤ U32.
U32 = 2.0**-24
#: fp32's smallest subnormal spacing: the absolute error of one rounding in the subnormal range.
SUBNORMAL = 2.0**-149


def ulp(ref: Tensor, dtype: torch.dtype) -> Tensor:
    """Spacing of ``dtype`` at ``|ref|`` (float64): ``2^(e − p)`` for ``2^e ≤ |ref| < 2^(e+1)``.

    ``p`` is the number of explicit mantissa bits (23 for fp32, 7 for bf16, 10 for fp16, 52 for
    float64). Below the smallest normal number the spacing is the subnormal one, ``tiny · 2^-p``;
    beyond the largest finite number it stays that of the top binade.
    """
    finfo = torch.finfo(dtype)
    mantissa_bits = -round(math.log2(finfo.eps))
    a = ref.detach().double().abs()
    finite = torch.isfinite(a)
    a = torch.where(finite, a, torch.full_like(a, float(finfo.max)))
    exponent = torch.floor(torch.log2(a.clamp(min=float(finfo.tiny), max=float(finfo.max))))
    return torch.exp2(exponent - mantissa_bits)


def excess(
    actual: Tensor,
    expected: Tensor,
    *,
    ulps: float,
    bound: Tensor | float = 0.0,
    underflow: Tensor | float = 0.0,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(bad, err, allowed)``: which elements break the rule above, their errors and allowances.

    ``dtype`` is the output dtype the ulps refer to (default: ``actual.dtype``).
    """
    dtype = dtype or actual.dtype
    a = actual.detach().cpu().double()
    e = expected.detach().cpu().double()
    if a.shape != e.shape:
        raise AssertionError(f"shape {tuple(a.shape)} != reference shape {tuple(e.shape)}")
    bound_t = torch.as_tensor(bound, dtype=torch.float64).cpu()
    underflow_t = torch.as_tensor(underflow, dtype=torch.float64).cpu()
    allowed = ulps * ulp(e, dtype) + U32 * bound_t + SUBNORMAL * underflow_t
    allowed = torch.broadcast_to(allowed, e.shape)
    err = (a - e).abs()
    # A reference that overflows the output dtype (or is ±inf / NaN) must be reproduced exactly.
    rounded = e.to(dtype).double() if dtype != torch.float64 else e
    exact_needed = ~torch.isfinite(rounded)
    same = (a == rounded) | (torch.isnan(a) & torch.isnan(rounded))
    within = torch.isfinite(a) & (err <= allowed)
    bad = torch.where(exact_needed, ~same, ~within)
    return bad, err, allowed


def assert_within(
    actual: Tensor,
    expected: Tensor,
    what: str,
    *,
    ulps: float,
    bound: Tensor | float = 0.0,
    underflow: Tensor | float = 0.0,
    dtype: torch.dtype | None = None,
) -> None:
    """Assert the rule of this module for every element; the message names ``what`` and the worst
    element (index, value, reference, error / allowance)."""
    bad, err, allowed = excess(actual, expected, ulps=ulps, bound=bound, underflow=underflow, dtype=dtype)
    if bool(bad.any()):
        ratio = torch.where(bad, err / allowed.clamp_min(1e-320), torch.zeros_like(err))
        ratio = torch.where(torch.isnan(ratio), torch.full_like(ratio, math.inf), ratio)
        flat = int(torch.argmax(ratio.reshape(-1)))
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), bad.shape)) if bad.dim() else ()
        a = actual.detach().cpu().double().reshape(-1)[flat].item()
        e = expected.detach().cpu().double().reshape(-1)[flat].item()
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} elements outside the bound; worst at {idx}: "
            f"got {a:.9g}, float64 reference {e:.9g}, |err| {err.reshape(-1)[flat].item():.3e} "
            f"> allowed {allowed.reshape(-1)[flat].item():.3e} "
            f"({ulps} ulp of {dtype or actual.dtype} + U32·bound + 2^-149·underflow)"
        )
