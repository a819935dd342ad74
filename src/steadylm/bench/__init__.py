"""``steadylm bench``: benchmarks. Sub-command ``ops`` (see :mod:`steadylm.bench.ops`)."""

from __future__ import annotations

import argparse
import os
import sys

from steadylm.errors import ConfigError

__all__ = ["add_arguments", "run"]

_QUICK = {"ops": "rms_norm,swiglu", "dtypes": "fp32", "tokens": 128, "hidden": 256, "repeats": 3, "warmup": 1}


def _csv_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench_command", metavar="BENCH")
    ops = sub.add_parser(
        "ops",
        help="time fused kernels vs eager reference vs torch.compile of the reference",
        description="Time forward, backward and forward+backward of each op for the eager reference, "
        "torch.compile of the reference and the fused kernels; report median/p20/p80, effective "
        "bandwidth as %% of the machine's copy bandwidth, and peak memory. Prints a table and "
        "appends rows to a CSV.",
    )
    ops.add_argument("--ops", default=None, help="comma-separated ops (default: all: "
                     "swiglu,powlu_glu,swiglu_clip,rms_norm,dyt,bhyt)")  # fmt: skip
    ops.add_argument("--dtypes", default=None, help="comma-separated: fp32,bf16,fp16 (default fp32,bf16)")
    ops.add_argument("--modes", default=None, help="comma-separated: forward,backward,forward+backward (default all)")
    ops.add_argument("--providers", default=None, help="comma-separated: eager,compile,fused (default all)")
    ops.add_argument("--tokens", type=int, default=None, help="rows (tokens), default 8192")
    ops.add_argument("--hidden", type=int, default=None, help="hidden size, default 4096")
    ops.add_argument("--repeats", type=int, default=None, help="timed runs per provider, default 10")
    ops.add_argument("--warmup", type=int, default=None, help="untimed runs before timing, default 2")
    ops.add_argument("--csv", default="bench-results.csv", help="CSV to append rows to (default %(default)s)")
    ops.add_argument("--no-csv", action="store_true", help="do not write a CSV")
    ops.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    ops.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ops.add_argument(
        "--cpu-alloc",
        choices=("default", "heap", "thp"),
        default="default",
        help="CPU allocator strategy for this run (see steadylm.kernels.cpu_memory); default: leave as is",
    )
    ops.add_argument(
        "--quick",
        action="store_true",
        help="small smoke run: rms_norm,swiglu, fp32, 128x256, 3 repeats (explicit flags still win)",
    )


def run(args: argparse.Namespace) -> int:
    if getattr(args, "bench_command", None) != "ops":
        print("usage: steadylm bench ops [options]  (see: steadylm bench ops --help)", file=sys.stderr)
        return 2
    # The allocator strategy must be applied before the first large tensor exists.
    from steadylm.kernels.cpu_memory import tune_cpu_allocator

    alloc_ok = tune_cpu_allocator(args.cpu_alloc)

    import torch
    from rich.console import Console

    from steadylm.bench import ops as bench_ops

    defaults = bench_ops.BenchConfig()

    def pick(name: str, default: object) -> object:
        value = getattr(args, name)
        if value is not None:
            return value
        return _QUICK[name] if args.quick and name in _QUICK else default

    def pick_list(name: str, default: tuple[str, ...] | list[str]) -> list[str]:
        value = pick(name, None)
        return _csv_list(value) if isinstance(value, str) else list(default)

    config = bench_ops.BenchConfig(
        ops=pick_list("ops", list(defaults.ops)),
        dtypes=pick_list("dtypes", list(defaults.dtypes)),
        modes=pick_list("modes", list(defaults.modes)),
        providers=pick_list("providers", list(defaults.providers)),
        tokens=int(pick("tokens", defaults.tokens)),  # type: ignore[arg-type]
        hidden=int(pick("hidden", defaults.hidden)),  # type: ignore[arg-type]
        repeats=int(pick("repeats", defaults.repeats)),  # type: ignore[arg-type]
        warmup=int(pick("warmup", defaults.warmup)),  # type: ignore[arg-type]
        memory=not args.no_memory,
        device=args.device,
    )
    config.validate()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda requested but torch.cuda.is_available() is False")
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    # A wide console when piped (nohup, CI logs) so the table is not squeezed to 80 columns.
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    console.print(
        f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"cpu capability {torch.backends.cpu.get_cpu_capability()}, cpu-alloc {args.cpu_alloc}"
        f"{'' if alloc_ok else ' (not applied on this platform)'}, "
        f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')}"
        + (f", load average {load_before[0]:.2f}" if load_before else "")
    )
    results, copies = bench_ops.run_bench(config, progress=lambda msg: console.print(msg, style="dim"))
    console.print(bench_ops.render_table(results, copies, config))
    for description, met, measured in bench_ops.check_targets(results, copies, config):
        console.print(f"{'met   ' if met else 'MISSED'} {description}: {measured}")
    if load_before is not None:
        load_after = os.getloadavg()
        cores = os.cpu_count() or 1
        note = "  (above the core count: other work ran during the benchmark)" if max(load_before[0], load_after[0]) > cores else ""
        console.print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}{note}")
    if not args.no_csv:
        rows = bench_ops.csv_rows(results, copies, config, device)
        bench_ops.append_csv(args.csv, rows)
        console.print(f"appended {len(rows)} rows to {args.csv}")
    return 0
