"""Where does a CPU norm kernel's bandwidth go? ``python -m steadylm.bench.bandwidth [options]``.

One process = one setting (the allocator strategy and the thread count must be fixed before the
first large allocation), so BENCHMARKS.md runs this once per setting. For a ``[tokens, hidden]``
tensor it times, interleaved run by run:

* ``copy_``  — copy into a preallocated tensor: the machine's copy bandwidth (the roofline);
* ``clone``  — the same copy into a freshly allocated tensor: copy + allocation + page faults;
* ``empty+fill`` — only the fresh allocation and first touch, write-only;
* ``rms fused`` / ``rms compile`` — the fused RMSNorm forward and ``torch.compile`` of the reference.

Printed per item: min and median milliseconds, and the min/median as % of the median ``copy_``
bandwidth. The min is reported next to the median because on a shared machine the median mostly
measures the neighbours; the min is the closest estimate of what the hardware does.
"""

from __future__ import annotations

import argparse
import statistics
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m steadylm.bench.bandwidth", description=__doc__.splitlines()[0])
    parser.add_argument("--alloc", choices=("default", "heap", "thp"), default="default")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: leave as is)")
    parser.add_argument("--simdlen", type=int, default=0, help="Inductor CPU vector width in bits (0: auto)")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)

    from steadylm.kernels.cpu_memory import tune_cpu_allocator

    applied = tune_cpu_allocator(args.alloc)  # before any large tensor exists

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.simdlen:
        import torch._inductor.config as inductor_config

        inductor_config.cpp.simdlen = args.simdlen

    from steadylm import functional as ref
    from steadylm import kernels
    from steadylm.bench.ops import DTYPES, _interleaved_times

    dtype = DTYPES[args.dtype]
    x = torch.randn(args.tokens, args.hidden).to(dtype)
    weight = torch.ones(args.hidden)
    dst = torch.empty_like(x)
    compiled_ref = torch.compile(ref.rms_norm, dynamic=False)
    runners = {
        "copy_": lambda: dst.copy_(x),
        "clone": lambda: x.clone(),
        "empty+fill": lambda: torch.empty_like(x).fill_(1.0),
        "rms fused": lambda: kernels.rms_norm(x, weight),
        "rms compile": lambda: compiled_ref(x, weight),
    }
    with torch.no_grad():
        for _ in range(3):
            for fn in runners.values():
                fn()
        times = _interleaved_times(runners, args.repeats, torch.device("cpu"))
    big = x.numel() * x.element_size()
    traffic = {"copy_": 2 * big, "clone": 2 * big, "empty+fill": big, "rms fused": 2 * big, "rms compile": 2 * big}
    roof = traffic["copy_"] / statistics.median(times["copy_"]) / 1e9
    print(
        f"alloc={args.alloc}{'' if applied else '(not applied)'} threads={torch.get_num_threads()} "
        f"simdlen={args.simdlen or 'auto'} isa={torch.backends.cpu.get_cpu_capability()} dtype={args.dtype} "
        f"shape={args.tokens}x{args.hidden} copy roofline (median) {roof:.1f} GB/s"
    )
    for name, ts in times.items():
        lo, med = min(ts), statistics.median(ts)
        gbs_lo, gbs_med = traffic[name] / lo / 1e9, traffic[name] / med / 1e9
        print(
            f"  {name:12s} min {lo * 1e3:7.2f} ms  median {med * 1e3:7.2f} ms  "
            f"{gbs_lo:5.1f}/{gbs_med:5.1f} GB/s  = {100 * gbs_lo / roof:4.0f}% / {100 * gbs_med / roof:4.0f}% of copy"
        )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
