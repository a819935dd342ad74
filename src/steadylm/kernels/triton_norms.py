"""RMSNorm and BHyT backward as hand-written Triton kernels: input gradient and γ gradient in one pass.

Inductor compiles :func:`steadylm.kernels._math.rms_norm_bwd` into a row loop (per-token sums and
the input gradient) plus a second, column loop for the γ gradient ``Σ_tokens dy·x̂``, which reads
``x`` and ``dy`` again: 5 tensor passes (read x, dy; write dx; read x, dy). A reduction over rows
cannot join a loop over rows in Inductor, so this kernel does what Liger-Kernel's does: each program
owns a contiguous block of rows, keeps the row in registers, writes the row's ``dx`` and adds
``dy·x̂`` to a per-program fp32 accumulator; one ``[programs, d]`` sum finishes γ's gradient. Traffic:
read x, read dy, write dx — 3 passes, plus ``programs × d`` floats.

BHyT's kernel does the same for its backward (λ's gradient as per-program partial sums, the given
variance's gradient per row), with ``_math``'s rational tanh and exp-based sech².

The math is the same as :func:`~steadylm.kernels._math.rms_norm_bwd`, including the exact
per-row statistic over the whole fp32 range (sums of squares of x, x·2^-72 and, for ε < 2^-60,
x·2^90, each row picking the one in range; the constants come from ``_math``).

Used on CUDA for fp32/bf16/fp16 inputs when Triton is installed and the call is not being traced by
``torch.compile`` (a compiled model keeps Inductor's own fusion of the whole graph). With
``TRITON_INTERPRET=1`` set before Triton is imported, the kernels also run on CPU tensors through
Triton's interpreter: called directly always, and from the public ops' backward only while
:data:`cpu_interpreter` is True. That is how the test suite checks them without a GPU
(``tests/conftest.py`` sets the variable; the interpreter rounds fp32 → bf16 toward zero, see
``tests/test_kernels.py``). ``TRITON_INTERPRET=1`` alone never reroutes a CPU run: it is Triton's
debugging switch, inherited by every child process, and the interpreter is NumPy-slow.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from steadylm.kernels import _math

try:  # Triton ships with CUDA builds of PyTorch; the CPU wheel has none.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None
    tl = None

__all__ = ["available", "bhyt_bwd", "rms_norm_bwd", "usable"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

#: Route the public ops' CPU backward through the interpreted kernels (only with TRITON_INTERPRET=1
#: set before import; the tests switch it on around the Triton checks).
cpu_interpreter: bool = False


def available() -> bool:
    """Whether Triton is importable (the kernel can be launched at all)."""
    return triton is not None


def usable(x: Tensor, eps: float) -> bool:
    """Whether the Triton backward should run for ``x`` and ``eps`` (see the module docstring)."""
    if triton is None or x.dtype not in _DTYPES or torch.compiler.is_compiling():
        return False
    if x.shape[-1] > 16384 or x.shape[0] == 0:
        return False
    if eps < _math.TINY_EPS:
        # ε below 2^-60 needs the 2^90 rescue of subnormal rows; GPUs flush subnormal inputs to
        # zero, so those rows keep the Inductor path (ε = 0 is a corner, the models use 1e-6).
        return False
    return x.is_cuda or (_INTERPRET and cpu_interpreter and x.device.type == "cpu")


if triton is not None:

    @triton.jit
    def _program_start(W, n_cols, rows_per_program, BLOCK: tl.constexpr, HAS_WEIGHT: tl.constexpr):
        """This program's prologue: its id, the columns and their mask, γ in fp32 (ones without a
        weight), a zero γ-gradient accumulator and its first row."""
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        col_mask = cols < n_cols
        if HAS_WEIGHT:
            w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
        else:
            w = tl.full([BLOCK], 1.0, tl.float32)
        return pid, cols, col_mask, w, tl.zeros([BLOCK], dtype=tl.float32), pid * rows_per_program

    @triton.jit
    def _load_row(X, DY, row, n_rows, n_cols, cols):
        """Row ``row`` of x and dy in fp32 and its mask (nothing of rows past the end)."""
        valid = row < n_rows
        mask = cols < tl.where(valid, n_cols, 0)
        x = tl.load(X + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        d = tl.load(DY + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        return valid, mask, x, d

    @triton.jit
    def _row_scale_and_inv_rms(x, n_cols, eps, eps_down, eps_up,
                               SCALE_DOWN: tl.constexpr, SCALE_UP: tl.constexpr,
                               OVERFLOW_SUM: tl.constexpr, UNDERFLOW_SUM: tl.constexpr, UPSCALE: tl.constexpr):  # fmt: skip
        """``_math._row_scale_and_inv_rms`` for one row: the power of two S and r_S (see there)."""
        sum_sq = tl.sum(x * x, axis=0)
        x_down = x * SCALE_DOWN
        sum_down = tl.sum(x_down * x_down, axis=0)
        big = sum_sq >= OVERFLOW_SUM
        scale = tl.where(big, SCALE_DOWN, 1.0)
        chosen = tl.where(big, sum_down, sum_sq)
        eps_scaled = tl.where(big, eps_down, eps)
        if UPSCALE:
            x_up = x * SCALE_UP
            sum_up = tl.sum(x_up * x_up, axis=0)
            tiny = sum_sq < UNDERFLOW_SUM
            scale = tl.where(tiny, SCALE_UP, scale)
            chosen = tl.where(tiny, sum_up, chosen)
            eps_scaled = tl.where(tiny, eps_up, eps_scaled)
        return scale, 1.0 / tl.sqrt(chosen / n_cols + eps_scaled)

    @triton.jit
    def _rms_norm_bwd_kernel(
        X, W, DY, DX, DW_PART,
        n_rows, n_cols, rows_per_program,
        eps, eps_down, eps_up,
        SCALE_DOWN: tl.constexpr, SCALE_UP: tl.constexpr,
        OVERFLOW_SUM: tl.constexpr, UNDERFLOW_SUM: tl.constexpr,
        BLOCK: tl.constexpr, HAS_WEIGHT: tl.constexpr, UPSCALE: tl.constexpr,
    ):  # fmt: skip
        pid, cols, col_mask, w, dw, first = _program_start(W, n_cols, rows_per_program, BLOCK, HAS_WEIGHT)
        for i in range(0, rows_per_program):
            row = first + i
            valid, mask, x, d = _load_row(X, DY, row, n_rows, n_cols, cols)
            scale, inv = _row_scale_and_inv_rms(x, n_cols, eps, eps_down, eps_up, SCALE_DOWN, SCALE_UP,
                                                OVERFLOW_SUM, UNDERFLOW_SUM, UPSCALE)  # fmt: skip
            x_hat = (x * scale) * inv
            g = d * w
            mean_gx = tl.sum(g * x_hat, axis=0) / n_cols
            dx = ((g - x_hat * mean_gx) * scale) * inv
            # (Constant floats may widen to fp64 in the interpreter: pin fp32 before the final cast.)
            tl.store(DX + row * n_cols + cols, dx.to(tl.float32).to(DX.dtype.element_ty), mask=mask)
            dw += tl.where(mask, d * x_hat, 0.0)  # rows past the end may be 0/0: never added
        tl.store(DW_PART + pid * n_cols + cols, dw, mask=col_mask)

    @triton.jit
    def _tanh_and_sech2(a, CLAMP: tl.constexpr, LINEAR: tl.constexpr,
                        N0: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr, N3: tl.constexpr,
                        N4: tl.constexpr, N5: tl.constexpr, N6: tl.constexpr,
                        D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, D3: tl.constexpr):  # fmt: skip
        """``_math._tanh`` (the [13/6] rational form) and ``_math._sech2`` (4e/(1+e)², e = exp(−2|a|))."""
        c = tl.minimum(tl.maximum(a, -CLAMP), CLAMP)
        a2 = c * c
        num = a2 * N6 + N5
        num = num * a2 + N4
        num = num * a2 + N3
        num = num * a2 + N2
        num = num * a2 + N1
        num = num * a2 + N0
        den = a2 * D3 + D2
        den = den * a2 + D1
        den = den * a2 + D0
        t = tl.where(tl.abs(a) < LINEAR, a, c * num / den)
        e = tl.exp(-2.0 * tl.abs(a))
        one_plus = 1.0 + e
        return t, 4.0 * e / (one_plus * one_plus)

    @triton.jit
    def _bhyt_bwd_kernel(
        X, W, LAM, VAR, DY, DX, DW_PART, DLAM_PART, DVAR,
        n_rows, n_cols, rows_per_program,
        kappa, eps, eps_down,
        SCALE_DOWN: tl.constexpr, OVERFLOW_SUM: tl.constexpr,
        CLAMP: tl.constexpr, LINEAR: tl.constexpr,
        N0: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr, N3: tl.constexpr,
        N4: tl.constexpr, N5: tl.constexpr, N6: tl.constexpr,
        D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, D3: tl.constexpr,
        BLOCK: tl.constexpr, HAS_WEIGHT: tl.constexpr, USE_VARIANCE: tl.constexpr,
    ):  # fmt: skip
        pid, cols, col_mask, w, dw, first = _program_start(W, n_cols, rows_per_program, BLOCK, HAS_WEIGHT)
        c = tl.load(LAM).to(tl.float32) / kappa
        dlam = 0.0
        for i in range(0, rows_per_program):
            row = first + i
            valid, mask, x, d = _load_row(X, DY, row, n_rows, n_cols, cols)
            if USE_VARIANCE:
                v = tl.load(VAR + row, mask=valid, other=1.0).to(tl.float32)
                inv = 1.0 / tl.sqrt(v + eps)
                scale = 1.0
            else:
                # No subnormal-row rescue (UPSCALE off, so the up-scale constants are never read).
                scale, inv = _row_scale_and_inv_rms(x, n_cols, eps, eps_down, eps, SCALE_DOWN, 1.0,
                                                    OVERFLOW_SUM, 0.0, False)  # fmt: skip
            x_hat = (x * scale) * inv
            arg = c * x_hat
            t, sech2 = _tanh_and_sech2(arg, CLAMP, LINEAR, N0, N1, N2, N3, N4, N5, N6, D0, D1, D2, D3)
            h = d * w * sech2
            row_hx = tl.sum(tl.where(mask, h * x_hat, 0.0), axis=0)
            if USE_VARIANCE:
                dx = (h * c) * inv
                tl.store(DVAR + row, (-0.5 * c) * inv * (inv * row_hx), mask=valid)
            else:
                dx = (((h - x_hat * (row_hx / n_cols)) * c) * scale) * inv
            tl.store(DX + row * n_cols + cols, dx.to(tl.float32).to(DX.dtype.element_ty), mask=mask)
            dw += tl.where(mask, d * t, 0.0)
            dlam += tl.where(valid, row_hx, 0.0)
        tl.store(DW_PART + pid * n_cols + cols, dw, mask=col_mask)
        tl.store(DLAM_PART + pid, dlam)


def _programs(n_rows: int, device: torch.device) -> int:
    """Enough programs to fill the device (a few per SM), never more than rows."""
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 4
    return max(1, min(n_rows, target))


class _Launch:
    """What both kernels' launches share: contiguous ``x`` and ``dy``, ``dx``, the row split over
    the programs, the per-program γ-gradient partial sums, the block width and the warps."""

    def __init__(self, x: Tensor, dy: Tensor) -> None:
        self.x = x.contiguous()
        self.dy = dy.contiguous()
        self.n_rows, self.n_cols = self.x.shape
        self.dx = torch.empty_like(self.x)
        self.programs = _programs(self.n_rows, x.device)
        self.rows_per_program = triton.cdiv(self.n_rows, self.programs)
        self.dw_part = torch.empty(self.programs, self.n_cols, dtype=torch.float32, device=x.device)
        self.block = triton.next_power_of_2(self.n_cols)
        self.num_warps = 4 if self.block < 2048 else 8 if self.block < 8192 else 16

    def d_weight(self, weight: Tensor, wanted: bool) -> Tensor | None:
        return self.dw_part.sum(dim=0).to(weight.dtype) if wanted else None


def rms_norm_bwd(
    x: Tensor,
    weight: Tensor,
    dy: Tensor,
    *,
    eps: float,
    has_weight: bool,
    allow_upscale: bool,
    need_weight_grad: bool,
) -> tuple[Tensor, Tensor | None]:
    """Same contract as :func:`steadylm.kernels._math.rms_norm_bwd` (``x``, ``dy``: ``[tokens, d]``)."""
    run = _Launch(x, dy)
    w = weight.contiguous() if has_weight else run.dw_part  # never read without HAS_WEIGHT
    _rms_norm_bwd_kernel[(run.programs,)](
        run.x, w, run.dy, run.dx, run.dw_part,
        run.n_rows, run.n_cols, run.rows_per_program,
        eps, eps * (_math._SCALE_DOWN * _math._SCALE_DOWN),
        eps * (_math._SCALE_UP * _math._SCALE_UP) if allow_upscale else 0.0,
        SCALE_DOWN=_math._SCALE_DOWN, SCALE_UP=_math._SCALE_UP,
        OVERFLOW_SUM=_math._OVERFLOW_SUM, UNDERFLOW_SUM=_math._UNDERFLOW_SUM,
        BLOCK=run.block, HAS_WEIGHT=has_weight, UPSCALE=allow_upscale,
        num_warps=run.num_warps,
    )  # fmt: skip
    return run.dx, run.d_weight(weight, has_weight and need_weight_grad)


def bhyt_bwd(
    x: Tensor,
    weight: Tensor,
    lam: Tensor,
    variance: Tensor,
    dy: Tensor,
    *,
    kappa: float,
    eps: float,
    has_weight: bool,
    use_variance: bool,
    allow_upscale: bool,
    need_weight_grad: bool,
    need_lam_grad: bool,
    need_variance_grad: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Same contract as :func:`steadylm.kernels._math.bhyt_bwd` (only for ε ≥ 2^-60: see :func:`usable`)."""
    assert not allow_upscale, "the Triton BHyT backward has no subnormal-row rescue (usable() keeps it off)"
    run = _Launch(x, dy)
    dlam_part = torch.empty(run.programs, dtype=torch.float32, device=x.device)
    d_var = torch.empty(run.n_rows, dtype=torch.float32, device=x.device) if use_variance else dlam_part
    var = variance.reshape(-1).contiguous() if use_variance else dlam_part  # never read otherwise
    num, den = _math._TANH_NUM, _math._TANH_DEN
    _bhyt_bwd_kernel[(run.programs,)](
        run.x, weight.contiguous() if has_weight else run.dw_part, lam.reshape(()).contiguous(), var, run.dy, run.dx,
        run.dw_part, dlam_part, d_var,
        run.n_rows, run.n_cols, run.rows_per_program,
        float(kappa), eps, eps * (_math._SCALE_DOWN * _math._SCALE_DOWN),
        SCALE_DOWN=_math._SCALE_DOWN, OVERFLOW_SUM=_math._OVERFLOW_SUM,
        CLAMP=_math._TANH_CLAMP, LINEAR=_math._TANH_LINEAR,
        N0=num[0], N1=num[1], N2=num[2], N3=num[3], N4=num[4], N5=num[5], N6=num[6],
        D0=den[0], D1=den[1], D2=den[2], D3=den[3],
        BLOCK=run.block, HAS_WEIGHT=has_weight, USE_VARIANCE=use_variance,
        num_warps=run.num_warps,
    )  # fmt: skip
    d_lam = (dlam_part.sum() / kappa).reshape(lam.shape).to(lam.dtype) if need_lam_grad else None
    d_variance = d_var.reshape(variance.shape).to(variance.dtype) if (use_variance and need_variance_grad) else None
    return run.dx, run.d_weight(weight, has_weight and need_weight_grad), d_lam, d_variance
