"""Time one linear layer, forward + backward: bf16 autocast ``nn.Linear`` against ``FP8Linear``.

    python -m steadylm.precision.bench [--threads N] [--repeats R]

Shapes are the FFN projections of the ``nano`` and ``micro`` presets at the lab's batch sizes.
FP8 layers keep their counters (the default ``stats="sampled"``: no SNR pass outside probe
steps); the last column measures the SNR pass on every step. The variants are interleaved round-robin and each reported time is the median over repeats, so a
busy machine slows all of them alike. On a CPU ``torch._scaled_mm`` converts its FP8 operands to
fp32 and runs an fp32 GEMM, so FP8 is expected to be *slower* than bf16 here; the numbers measure
the price of the quantisation passes and counters, not a tensor-core speed-up.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from steadylm.precision.linear import FP8Linear

#: (label, tokens, in_features, out_features)
SHAPES = (
    ("nano w_up   (8×64 tok)", 512, 128, 384),
    ("nano w_down (8×64 tok)", 512, 384, 128),
    ("micro w_up  (16×128 tok)", 2048, 256, 704),
    ("micro w_down(16×128 tok)", 2048, 704, 256),
)


def _step(module: nn.Module, x: torch.Tensor) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = module(x)
    y.float().square().mean().backward()


def measure(tokens: int, fan_in: int, fan_out: int, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    base = nn.Linear(fan_in, fan_out, bias=False)
    variants: dict[str, nn.Module] = {
        "bf16": base,
        "fp8 current": FP8Linear.from_linear(nn.Linear(fan_in, fan_out, bias=False), scaling="current"),
        "fp8 delayed": FP8Linear.from_linear(nn.Linear(fan_in, fan_out, bias=False), scaling="delayed"),
        "fp8 current, SNR every step": FP8Linear.from_linear(nn.Linear(fan_in, fan_out, bias=False), stats="full"),
    }
    x = torch.randn(tokens, fan_in, requires_grad=True)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(3):  # warm-up
        for m in variants.values():
            _step(m, x)
    for _ in range(repeats):
        for name, m in variants.items():
            t0 = time.perf_counter()
            _step(m, x)
            times[name].append(time.perf_counter() - t0)
    return {k: 1000 * statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = ["bf16", "fp8 current", "fp8 delayed", "fp8 current, SNR every step"]
    print(f"fwd+bwd median ms, {torch.get_num_threads()} thread(s), {args.repeats} repeats, torch {torch.__version__}")
    print("| shape | " + " | ".join(names) + " | FP8 current / bf16 |")
    print("|---|" + "---|" * (len(names) + 1))
    for label, tokens, fi, fo in SHAPES:
        r = measure(tokens, fi, fo, args.repeats)
        cells = " | ".join(f"{r[n]:.2f}" for n in names)
        print(f"| {label} | {cells} | {r['fp8 current'] / r['bf16']:.1f}× |", flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
