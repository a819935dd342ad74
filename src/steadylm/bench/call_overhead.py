"""What one fused-op call costs when the op has almost no work: the eager decode case.

In an eager decode step every norm and activation sees 1-8 rows, so a call's cost is its overhead:
the Python wrapper in :mod:`steadylm.kernels.ops`, Dynamo's frame evaluation and guards (skipped
by the direct builds), the AOT runtime wrapper, and (for a dynamic row count) Inductor's OpenMP
region. This times, per call and side by side in one process, the layers of that stack and the
block-level pairs a decode step runs, next to the eager ATen RMSNorm a Hugging Face Llama runs:

* ``kernel <name>``: the compiled ``_math`` function alone through Dynamo (the build
  :func:`.._compile._kernel` picks when gradients are wanted);
* ``direct <name>``: the same kernel as a direct build (:func:`.._compile.forward`: traced and
  compiled by Inductor without Dynamo), what a forward-only call runs on CPU;
* ``ops.<op>``: the public fused op (validation, flattening, the no-grad fast path);
* ``RMSNorm pair`` / ``BHyT pair``: a micro-preset layer's two norm sites as its forward runs them
  (the BHyT pair: first site with its statistic, the frozen shift add, second site);
* ``eager RMSNorm (HF)``: ``w * (x * rsqrt(mean(x²) + ε))`` in ATen ops, as ``LlamaRMSNorm``.

Each figure is the minimum over ``--repeats`` batches of ``--calls`` calls of the process CPU time
per call (the minimum: the least disturbed batch on a shared machine), under ``torch.no_grad``. On
CUDA (``--device cuda``) that is the host's cost of launching a call, which bounds a decode step
whose kernels are tiny; each batch ends with a synchronize, so a call that outruns the GPU pays for
the wait. Direct builds run on CUDA only with ``STEADYLM_DIRECT_DEVICES=cpu,cuda`` (the measurement
that decides whether CUDA should have them).

    python -m steadylm.bench.call_overhead --rows 1 4 --threads 1 2
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from steadylm.kernels import _compile, _math, ops

__all__ = ["call_costs", "main"]


def _per_call_us(fn: Callable[[], Any], calls: int, repeats: int, device: torch.device) -> float:
    fn()  # compile / warm up outside the timing
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        for _ in range(calls):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, (time.process_time() - start) / calls)
    return best * 1e6


def _cases(rows: int, dim: int, ffn_dim: int, device: torch.device) -> dict[str, Callable[[], Any]]:
    from steadylm.models import ModelConfig, Transformer

    torch.manual_seed(0)
    x = torch.randn(rows, 1, dim).to(device)
    weight = torch.ones(dim, device=device)
    lam = torch.tensor([2.0], device=device)
    variance = torch.rand(rows, 1, 1).to(device)
    gate, up = torch.randn(rows, 1, ffn_dim).to(device), torch.randn(rows, 1, ffn_dim).to(device)
    flat = x.reshape(rows, dim)
    if rows > 1:  # as the fused ops mark them: the dynamic-row build
        torch._dynamo.maybe_mark_dynamic(flat, 0)
    shape = dict(dim=dim, ffn_dim=ffn_dim, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=256)
    rms_layer = Transformer(ModelConfig.from_preset("micro", norm="rmsnorm", **shape)).layers[0].to(device)
    bhyt_layer = Transformer(ModelConfig.from_preset("micro", norm="bhyt", **shape)).layers[0].to(device)
    bhyt_layer.begin_inference()  # as a generate call does: the shift frozen once

    def bhyt_pair() -> torch.Tensor:
        out, v = bhyt_layer.bhyt_attn_input(x)
        return bhyt_layer.bhyt_ffn_input(x, v)

    def rms_pair() -> torch.Tensor:
        rms_layer.attn_norm(x)
        return rms_layer.ffn_norm(x)

    rms_kernel = _compile._kernel(_math.rms_norm_fwd, flat)
    bhyt_kernel = _compile._kernel(_math.bhyt_fwd, flat)
    v_flat = variance.reshape(rows, 1)
    if rows > 1:
        torch._dynamo.maybe_mark_dynamic(v_flat, 0)
    return {
        "kernel rms_norm_fwd": lambda: rms_kernel(flat, weight, eps=1e-6, has_weight=True, allow_upscale=False),
        "kernel bhyt_fwd (variance)": lambda: bhyt_kernel(flat, weight, lam.reshape(()), v_flat, kappa=10.0,
                                                          eps=1e-6, has_weight=True, use_variance=True,
                                                          allow_upscale=False),
        "direct rms_norm_fwd": lambda: _compile.forward(_math.rms_norm_fwd, (0,), flat, weight, eps=1e-6,
                                                         has_weight=True, allow_upscale=False),
        "direct bhyt_fwd (variance)": lambda: _compile.forward(_math.bhyt_fwd, (0, 3), flat, weight, lam.reshape(()),
                                                                v_flat, kappa=10.0, eps=1e-6, has_weight=True,
                                                                use_variance=True, allow_upscale=False),
        "ops.rms_norm": lambda: ops.rms_norm(x, weight, 1e-6),
        "ops.bhyt_and_mean_square": lambda: ops.bhyt_and_mean_square(x, weight, lam, 10.0, 1e-6),
        "ops.bhyt (variance)": lambda: ops.bhyt(x, weight, lam, 10.0, 1e-6, variance=variance),
        "ops.swiglu": lambda: ops.swiglu(gate, up),
        "ops.powlu_glu": lambda: ops.powlu_glu(gate, up),
        "RMSNorm pair": rms_pair,
        "BHyT pair": bhyt_pair,
        "eager RMSNorm (HF)": lambda: weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)),
    }


def call_costs(rows: int, threads: int, *, dim: int = 256, ffn_dim: int = 704, calls: int = 4000,
               repeats: int = 7, device: str | torch.device = "cpu") -> dict[str, float]:
    """µs per call of each case at ``rows`` rows (micro-preset widths by default) on ``threads``
    intra-op threads, inputs on ``device``; the thread count is restored afterwards."""
    device = torch.device(device)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            cases = _cases(rows, dim, ffn_dim, device)
            return {name: _per_call_us(fn, calls, repeats, device) for name, fn in cases.items()}
    finally:
        torch.set_num_threads(before)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4], help="rows per call (decode batch)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1], help="intra-op threads")
    parser.add_argument("--dim", type=int, default=256, help="model width d (micro: 256)")
    parser.add_argument("--ffn-dim", type=int, default=704, help="FFN width (micro: 704)")
    parser.add_argument("--calls", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    args = parser.parse_args(argv)
    if args.device not in ("cpu", "cuda"):
        parser.error(f"--device must be one of ['cpu', 'cuda'], got {args.device!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False")
    if min(args.rows + args.threads + [args.calls, args.repeats]) < 1:
        parser.error("--rows, --threads, --calls and --repeats must be >= 1")
    if args.dim < 4 or args.dim % 4 or args.ffn_dim < 1:
        parser.error("--dim must be a multiple of 4 (4 heads) and --ffn-dim >= 1")
    columns = [(r, t) for r in args.rows for t in args.threads]
    results = {col: call_costs(col[0], col[1], dim=args.dim, ffn_dim=args.ffn_dim, calls=args.calls,
                               repeats=args.repeats, device=args.device) for col in columns}
    names = list(next(iter(results.values())))
    print(f"# µs per call on {args.device} (CPU time, min of {args.repeats} × {args.calls} calls, no grad); "
          f"compile builds: {'on' if _compile.compile_enabled() else 'off'}; direct builds on: "
          f"{','.join(sorted(_compile.DIRECT_DEVICES)) or 'none'}")
    print("| call | " + " | ".join(f"rows {r}, {t} thr" for r, t in columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for name in names:
        print(f"| {name} | " + " | ".join(f"{results[col][name]:.1f}" for col in columns) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
