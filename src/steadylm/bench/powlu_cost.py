"""Where the fused PowLU kernels spend their time, and two ways around it that were measured.

PowLU's gate ``z^(m/(√z+1))·σ(z)`` needs a log and two exps per element where SwiGLU needs one exp.
This times, side by side in one process (interleaved rounds, each variant's per-round time as a
ratio to the current kernel, median and the median's 95% interval):

* the current fused forward and backward (``kernels._math``, compiled as the fused ops compile it);
* the forward with one piece of arithmetic removed (the log, the power's exp, the square root and
  division): what each costs;
* the forward and backward with polynomial exp and log written in tensor ops, as the tanh norms
  use a rational tanh (:func:`poly_exp`, :func:`poly_log`), with Inductor's FMA contraction off
  (its default) and on;
* a forward that also returns f and f′ so that the backward only multiplies, against the current
  recompute-in-backward design, on the kernels alone and (``--train-rounds``) in a micro-preset
  eager training step, where the op is swapped for an ``autograd.Function`` saving (up, f, f′).

    python -m steadylm.bench.powlu_cost --rounds 81 --train-rounds 41
"""

from __future__ import annotations

import argparse
import statistics
import time
import types
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from steadylm.kernels import _math

__all__ = ["kernel_table", "main", "poly_exp", "poly_log", "relative_error_u32", "training_step_ratios"]

U32 = 2.0**-24  # fp32 unit roundoff: the tests' error budgets count in it (tests/test_kernels.py)

# Cody-Waite split of ln 2: n·_LN2_HI is exact for |n| < 2^15, so x − n·ln2 keeps its low bits.
_LOG2E = 1.4426950408889634
_LN2_HI = 0.693359375
_LN2_LO = -2.12194440054690583e-4
# exp(r) = 1 + r + r²·Q(r) on |r| ≤ ln2/2; log(1+f) = f − f²/2 + f³·P(f) on [√½ − 1, √2 − 1].
# Fitted here by reweighted least squares on Chebyshev nodes (relative error 3e-9 and 6e-9 in exact
# arithmetic, far below fp32's rounding).
_EXP_Q = (0.4999999345137236, 0.16666520685744546, 0.04166838742137679, 0.00836871025617547, 0.0013814611203264344)
_LOG_P = (
    0.3333333170934328, -0.2500082106842797, 0.20001226713663187, -0.16623356049394236,
    0.1420176100241294, -0.13160198004176601, 0.1276156291471698, -0.07634437987835739,
)  # fmt: skip
_SQRT_HALF_BITS = 0x3F3504F3  # fp32 bits of √½: the mantissa is reduced to [√½, √2)
_TINY = 1.1754943508222875e-38  # smallest normal fp32


def poly_exp(x: Tensor) -> Tensor:
    """fp32 exp from tensor ops: ``2^n · (1 + r + r²Q(r))``, ``n = round(x·log2 e)``; 2^n is built
    from exponent bits in two halves so that results down to the subnormal range and up to
    overflow come out right (0 below −104, inf above 88.7, NaN propagates)."""
    xc = x.clamp(-104.0, 89.0)
    n = torch.round(xc * _LOG2E)
    r = (xc - n * _LN2_HI) - n * _LN2_LO
    q = r * _EXP_Q[4] + _EXP_Q[3]
    for c in reversed(_EXP_Q[:3]):
        q = q * r + c
    p = (r * r) * q + r + 1.0
    ni = n.to(torch.int32)
    half = ni >> 1
    scale_a = ((half + 127) << 23).view(torch.float32)
    scale_b = ((ni - half + 127) << 23).view(torch.float32)
    return (p * scale_a) * scale_b


def poly_log(z: Tensor) -> Tensor:
    """fp32 natural log of ``z > 0`` (subnormals included) from tensor ops: the exponent from the
    bits, ``log(1+f)`` of the mantissa reduced to [√½, √2) by a polynomial, ``e·ln2`` added last in
    two parts."""
    tiny = z < _TINY
    scaled = torch.where(tiny, z * 8388608.0, z)  # 2^23 lifts subnormals into the normal range
    t = scaled.view(torch.int32) - _SQRT_HALF_BITS
    e = (t >> 23).to(torch.float32) - torch.where(tiny, 23.0, 0.0)
    f = ((t & 0x007FFFFF) + _SQRT_HALF_BITS).view(torch.float32) - 1.0
    p = f * _LOG_P[7] + _LOG_P[6]
    for c in reversed(_LOG_P[:6]):
        p = p * f + c
    y = f + (f * f) * (f * p - 0.5)
    return (y + e * _LN2_LO) + e * _LN2_HI


def relative_error_u32(fn: Callable[[Tensor], Tensor], reference: Callable[[Tensor], Tensor], x: Tensor) -> float:
    """Largest ``|fn(x) − reference(x)| / |reference(x)|`` over ``x`` (fp32; reference in float64)
    where the reference is a finite normal fp32 number, in units of :data:`U32`."""
    got = fn(x).double()
    want = reference(x.double())
    normal = torch.isfinite(want) & (want.abs() >= _TINY) & (want.abs() <= torch.finfo(torch.float32).max)
    return float(((got - want).abs() / want.abs())[normal].max()) / U32


def _powlu_fwd_poly(gate: Tensor, up: Tensor, m: float) -> Tensor:
    positive = gate > 0
    safe = torch.where(positive, gate, torch.ones_like(gate))
    power = poly_exp((m / (torch.sqrt(safe) + 1.0)) * poly_log(safe))
    s = 1.0 / (1.0 + poly_exp(-gate))
    return torch.where(positive, power * s, gate * s) * up


def _powlu_bwd_poly(gate: Tensor, up: Tensor, dy: Tensor, m: float) -> tuple[Tensor, Tensor]:
    f, d_gate = _math._powlu_gate_and_grad(gate, dy * up, m, exp=poly_exp, log=poly_log)
    return d_gate, dy * f


def _fwd_without(piece: str) -> Callable[[Tensor, Tensor, float], Tensor]:
    """The current forward with ``piece`` ("log", "power exp", "sqrt and division") removed."""

    def fwd(gate: Tensor, up: Tensor, m: float) -> Tensor:
        positive = gate > 0
        safe = torch.where(positive, gate, torch.ones_like(gate))
        log_z = safe - 1.0 if piece == "log" else torch.log(safe)
        exponent = m * safe if piece == "sqrt and division" else m / (torch.sqrt(safe) + 1.0)
        power = exponent * log_z if piece == "power exp" else torch.exp(exponent * log_z)
        s = torch.sigmoid(gate)
        return torch.where(positive, power * s, gate * s) * up

    return fwd


def _fwd_saving(gate: Tensor, up: Tensor, m: float) -> tuple[Tensor, Tensor, Tensor]:
    """Output, f and f′ (the gate's derivative) in one pass: what a saving forward keeps."""
    f, f_prime = _math._powlu_gate_and_grad(gate, torch.ones_like(gate), m)
    return f * up, f, f_prime


def _bwd_saved(up: Tensor, f: Tensor, f_prime: Tensor, dy: Tensor) -> tuple[Tensor, Tensor]:
    return dy * up * f_prime, dy * f


_FMA = {"cpp.enable_floating_point_contract_flag": "fast"}


def _compile_with_contraction(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` compiled with FMA contraction, from a copy of its code: Dynamo caches compiled code per
    code object and checks the backend on every call, so one function compiled with two option sets
    and called in turn recompiles (measured: a 0.1 ms kernel timed at ~3 ms)."""
    copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return torch.compile(copy, options=_FMA)


def _variants(numel: int, m: float) -> dict[str, Callable[[], Any]]:
    gen = torch.Generator().manual_seed(0)
    g, u, d = (torch.randn(numel, generator=gen) for _ in range(3))
    compile_ = torch.compile
    fwd, bwd = compile_(_math.powlu_glu_fwd), compile_(_math.powlu_glu_bwd)
    sw_fwd, sw_bwd = compile_(_math.swiglu_fwd), compile_(_math.swiglu_bwd)
    saving, saved = compile_(_fwd_saving), compile_(_bwd_saved)

    def fwd_call(fn: Callable[..., Any]) -> Callable[[], Any]:
        return lambda: fn(g, u, m)

    def bwd_call(fn: Callable[..., Any]) -> Callable[[], Any]:
        return lambda: fn(g, u, d, m)

    return {
        "forward: current": fwd_call(fwd),
        "forward: log replaced by z - 1": fwd_call(compile_(_fwd_without("log"))),
        "forward: the power's exp removed": fwd_call(compile_(_fwd_without("power exp"))),
        "forward: sqrt and division removed": fwd_call(compile_(_fwd_without("sqrt and division"))),
        "forward: swiglu": lambda: sw_fwd(g, u),
        "forward: polynomial exp and log": fwd_call(compile_(_powlu_fwd_poly)),
        "forward: polynomial exp and log, FMA contraction": fwd_call(_compile_with_contraction(_powlu_fwd_poly)),
        "forward: current, FMA contraction": fwd_call(_compile_with_contraction(_math.powlu_glu_fwd)),
        "backward: current": bwd_call(bwd),
        "backward: polynomial exp and log": bwd_call(compile_(_powlu_bwd_poly)),
        "backward: polynomial exp and log, FMA contraction": bwd_call(_compile_with_contraction(_powlu_bwd_poly)),
        "backward: swiglu": lambda: sw_bwd(g, u, d),
        "forward+backward: current": lambda: (fwd(g, u, m), bwd(g, u, d, m)),
        "forward+backward: forward saves f and f'": lambda: saved(u, *saving(g, u, m)[1:], d),
        "forward+backward: swiglu": lambda: (sw_fwd(g, u), sw_bwd(g, u, d)),
    }


def _ratio_row(times: Sequence[float], base: Sequence[float]) -> dict[str, Any]:
    from steadylm.bench.timing import median_interval

    ratios = [a / b for a, b in zip(times, base)]
    return {"median_ms": statistics.median(times) * 1e3, "ratio": statistics.median(ratios),
            "interval": median_interval(ratios)}  # fmt: skip


def kernel_table(numel: int = 2048 * 704, rounds: int = 81, calls: int = 5, m: float = 3.0) -> dict[str, dict[str, Any]]:
    """Each variant's median time and its per-round ratio to the current kernel of its group
    (forward, backward, forward+backward): ``{name: {"median_ms", "ratio", "interval"}}``."""
    variants = _variants(numel, m)
    for fn in variants.values():  # compile and warm up outside the timing
        fn()
        fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append((time.perf_counter() - start) / calls)
    return {name: _ratio_row(t, times[name.split(":")[0] + ": current"]) for name, t in times.items()}


class _SavingPowLU(torch.autograd.Function):
    """Gated PowLU whose forward keeps (up, f, f′) so that the backward is two products."""

    @staticmethod
    def forward(ctx: Any, gate: Tensor, up: Tensor, m: float, kernels: tuple[Callable, Callable]) -> Tensor:
        saving, _ = kernels
        out, f, f_prime = saving(gate.reshape(-1), up.reshape(-1), m)
        ctx.save_for_backward(up.reshape(-1), f, f_prime)
        ctx.shape, ctx.kernels = gate.shape, kernels
        return out.view(gate.shape)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        up, f, f_prime = ctx.saved_tensors
        d_gate, d_up = ctx.kernels[1](up, f, f_prime, dy.reshape(-1))
        return d_gate.view(ctx.shape), d_up.view(ctx.shape), None, None


def training_step_ratios(rounds: int = 41, batch: int = 8, seq: int = 256, preset: str = "micro") -> dict[str, dict[str, Any]]:
    """Eager training steps (fused ops, fused AdamW: ``bench.step.train_step``) of swiglu, powlu and
    powlu with the saving op, interleaved: each one's median step and its per-round ratio to powlu's
    (``"vs powlu"``) and to swiglu's (``"vs swiglu"``)."""
    from steadylm.bench.step import train_step
    from steadylm.models import ModelConfig, build_model
    from steadylm.nn.activations import Activation

    kernels = (torch.compile(_fwd_saving, dynamic=True), torch.compile(_bwd_saved, dynamic=True))
    models = {name: build_model(ModelConfig.from_preset(preset, activation=act))
              for name, act in (("swiglu", "swiglu"), ("powlu", "powlu"), ("powlu, saving f and f'", "powlu"))}  # fmt: skip
    swapped = 0
    for module in models["powlu, saving f and f'"].modules():
        if isinstance(module, Activation):
            m = float(module.kwargs["m"])
            module._fn = lambda gate, up, m=m: _SavingPowLU.apply(gate, up, m, kernels)
            swapped += 1
    if swapped == 0:
        raise RuntimeError("no Activation module found to swap")
    gen = torch.Generator().manual_seed(0)
    vocab = models["powlu"].config.vocab_size
    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=gen)
    steps = {name: train_step(model, False, tokens, torch.device("cpu"))[0] for name, model in models.items()}
    for step in steps.values():
        step()
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: {"vs powlu": _ratio_row(t, times["powlu"]), "vs swiglu": _ratio_row(t, times["swiglu"])}
            for name, t in times.items()}  # fmt: skip


def _interval(row: dict[str, Any]) -> str:
    iv = row["interval"]
    return f"{iv[0]:.3f}–{iv[1]:.3f}" if iv is not None else "n/a"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=2048 * 704, help="elements per call (micro FFN: 2048 × 704)")
    parser.add_argument("--rounds", type=int, default=81, help="interleaved rounds of the kernel table (>= 6)")
    parser.add_argument("--calls", type=int, default=5, help="calls per timed round")
    parser.add_argument("--train-rounds", type=int, default=0,
                        help="interleaved training-step rounds (micro, 8 × 256); 0 skips them, else >= 6")
    parser.add_argument("--accuracy-stride", type=int, default=97,
                        help="check poly_exp/poly_log on every k-th fp32 bit pattern (0 skips)")
    args = parser.parse_args(argv)
    if args.numel < 1 or args.calls < 1 or args.rounds < 6 or args.accuracy_stride < 0:
        parser.error("--numel and --calls must be >= 1, --rounds >= 6, --accuracy-stride >= 0")
    if args.train_rounds and args.train_rounds < 6:
        parser.error("--train-rounds must be 0 or >= 6 (the median's 95% interval needs 6)")
    if args.accuracy_stride:
        positive = torch.arange(1, 0x7F800000, args.accuracy_stride, dtype=torch.int64).to(torch.int32).view(torch.float32)
        arguments = torch.linspace(-110.0, 90.0, 2_000_001, dtype=torch.float64).float()
        print(f"poly_log max relative error: {relative_error_u32(poly_log, torch.log, positive):.2f} × 2^-24; "
              f"poly_exp: {relative_error_u32(poly_exp, torch.exp, arguments):.2f} × 2^-24 "
              "(budget in tests/test_kernels.py: 4)")
    print(f"# PowLU kernels, {args.numel} elements fp32, {torch.get_num_threads()} threads, "
          f"{args.rounds} interleaved rounds of {args.calls} calls; ratio to the current kernel of the same group")
    print("| variant | median ms | ratio to current | 95% interval |\n|---|---:|---:|---:|")
    for name, row in kernel_table(args.numel, args.rounds, args.calls).items():
        print(f"| {name} | {row['median_ms']:.3f} | {row['ratio']:.3f} | {_interval(row)} |")
    if args.train_rounds:
        print(f"\n# micro eager training steps, 8 × 256, fused AdamW, {args.train_rounds} interleaved rounds")
        print("| model | median step ms | vs powlu | 95% interval | vs swiglu | 95% interval |\n|---|---:|---:|---:|---:|---:|")
        for name, row in training_step_ratios(args.train_rounds).items():
            p, s = row["vs powlu"], row["vs swiglu"]
            print(f"| {name} | {p['median_ms']:.1f} | {p['ratio']:.3f} | {_interval(p)} | {s['ratio']:.3f} | {_interval(s)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
