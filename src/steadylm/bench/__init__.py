"""``steadylm bench``: benchmarks. Sub-commands ``ops`` (:mod:`steadylm.bench.ops`) and ``model``
(:mod:`steadylm.bench.model`)."""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from typing import Any, Callable

from steadylm.config_fields import add_field_flags, fields_from_args, shown
from steadylm.errors import ConfigError

__all__ = ["add_arguments", "run"]

#: ``--quick``: presets of field values (explicit flags still win).
QUICK_OPS: dict[str, object] = {"ops": ["rms_norm", "swiglu"], "dtypes": ["fp32"], "tokens": 128, "hidden": 256,
                                "repeats": 3, "warmup": 1}
QUICK_MODEL: dict[str, object] = {"presets": ["nano"], "activations": ["swiglu", "powlu"], "norms": ["rmsnorm", "bhyt"],
                                  "batch": 4, "seq": 64, "gen_batches": [1], "prompt": 8, "new_tokens": 16,
                                  "rounds": 3, "warmup": 1}  # fmt: skip


def _say(console: Any) -> Callable[[str], None]:
    """Progress lines, dimmed; not parsed as rich markup ("[nano] …" is text)."""
    return lambda msg: console.print(msg, style="dim", markup=False)


def _dest(cls: type, name: str) -> str:
    return f"bench__{cls.__name__}__{name}"


def _config(cls: type, args: argparse.Namespace, quick: dict[str, object], **fixed: object) -> object:
    """``cls`` from its generated flags, the quick preset under ``--quick``, then ``fixed``."""
    values = fields_from_args(args, cls, dest=lambda name: _dest(cls, name), defaults=quick if args.quick else {})
    return cls(**{**values, **fixed})


def _quick_help(quick: dict[str, object]) -> str:
    return "small smoke run: " + ", ".join(f"{k}={shown(v)}" for k, v in quick.items()) + " (explicit flags still win)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from steadylm.bench.model import ModelBenchConfig
    from steadylm.bench.ops import BenchConfig

    sub = parser.add_subparsers(dest="bench_command", metavar="BENCH")
    ops = sub.add_parser(
        "ops",
        help="time fused kernels vs eager reference vs torch.compile of the reference",
        description="Time forward, backward and forward+backward of each op for the eager reference, "
        "torch.compile of the reference and the fused kernels; report median/p20/p80, effective "
        "bandwidth as %% of the machine's copy bandwidth, and peak memory. Prints a table and "
        "appends rows to a CSV.",
    )
    add_field_flags(ops, BenchConfig, dest=lambda name: _dest(BenchConfig, name))
    ops.add_argument("--csv", default="bench-results.csv", help="CSV to append rows to (default %(default)s)")
    ops.add_argument("--no-csv", action="store_true", help="do not write a CSV")
    ops.add_argument(
        "--cpu-alloc",
        choices=("default", "heap", "thp"),
        default="default",
        help="CPU allocator strategy for this run (see steadylm.kernels.cpu_memory); default: leave as is",
    )
    ops.add_argument("--quick", action="store_true", help=_quick_help(QUICK_OPS))
    ops.add_argument("--markdown", default=None, help="also write the printed report to this markdown file")

    model = sub.add_parser(
        "model",
        help="training and generation tokens/s per model variant, eager and compiled, vs HF Llama",
        description="Training tokens/s (forward + backward + AdamW) and generation tokens/s (greedy, KV "
        "cache) of each preset x activation x norm, eager and compiled, in interleaved rounds with "
        "paired ratios against swiglu+rmsnorm; the same-shape Hugging Face LlamaForCausalLM as a row "
        "when transformers is installed; the profiler share of norms and activations in the eager "
        "training step. Prints a table and appends rows to a CSV (the bench ops columns).",
    )
    add_field_flags(model, ModelBenchConfig, dest=lambda name: _dest(ModelBenchConfig, name))
    model.add_argument("--dtype", choices=("fp32", "bf16"), default=None,
                       help="fp32, or bf16 autocast (default: bf16 on CUDA, fp32 on CPU)")  # fmt: skip
    model.add_argument("--threads", type=int, default=None,
                       help="torch intra-op threads (default: torch's; 1 is steadier on a loaded CPU)")  # fmt: skip
    model.add_argument("--csv", default="bench-model.csv", help="CSV to append rows to (default %(default)s)")
    model.add_argument("--no-csv", action="store_true", help="do not write a CSV")
    model.add_argument("--markdown", default=None, help="also write the table and comparisons as markdown")
    model.add_argument("--quick", action="store_true", help=_quick_help(QUICK_MODEL))
    model.add_argument("--claim", choices=("bhyt",), default=None,
                       help="answer a published claim: bhyt = swiglu+bhyt / swiglu+rmsnorm training and generation "
                       "throughput ratios (median, p20-p80) beside the BHyT paper's +1.6%% / +1.77%% "
                       "(steadylm.bench.claim; shapes, rounds, modes, device from the other flags)")  # fmt: skip


def _load_average() -> tuple[float, float, float] | None:
    return os.getloadavg() if hasattr(os, "getloadavg") else None


def _write_markdown(path: str, text: str) -> None:
    from pathlib import Path

    from steadylm.train.atomic import atomic_write_text

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(target, text)


def _run_model(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console

    from steadylm.bench import model as bench_model
    from steadylm.bench.ops import append_csv

    requested = getattr(args, _dest(bench_model.ModelBenchConfig, "device"))
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda requested but torch.cuda.is_available() is False")
    device = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"threads must be an integer >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    config = _config(bench_model.ModelBenchConfig, args, QUICK_MODEL, device=device,
                     dtype=args.dtype or ("bf16" if device.startswith("cuda") else "fp32"))
    config.validate()
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 200, record=True)
    if args.claim:
        from steadylm.bench.claim import run_claim

        command = "steadylm " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else f"bench model --claim {args.claim}"
        _, text = run_claim(config, args.claim, command, progress=_say(console))
        console.print(text, markup=False)
        if args.markdown:
            _write_markdown(args.markdown, text)
        return 0
    load_before = _load_average()
    console.print(
        f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}"
        + (f", load average {load_before[0]:.2f}" if load_before else "")
    )
    result = bench_model.run_model_bench(config, progress=_say(console))
    console.print(bench_model.render_table(result))
    for description, ratios in bench_model.comparisons(result):
        interval = bench_model.median_interval(ratios)
        console.print(  # markup off: rich would take "[p20–p80 …]" for a tag and drop it
            f"{description}: {statistics.median(ratios):.3f} "
            f"[p20–p80 {bench_model.quantile(ratios, 0.2):.3f}–{bench_model.quantile(ratios, 0.8):.3f}; "
            + (f"95% interval of the median {interval[0]:.3f}–{interval[1]:.3f}]" if interval else "too few rounds for a 95% interval]"),
            markup=False,
        )
    load_after = _load_average()
    if load_before is not None and load_after is not None:
        console.print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} ({os.cpu_count()} cores)")
    if not args.no_csv:
        rows = bench_model.csv_rows(result)
        append_csv(args.csv, rows)
        console.print(f"appended {len(rows)} rows to {args.csv}")
    if args.markdown:
        load = (
            f"\nload average before {load_before[0]:.2f}, after {load_after[0]:.2f} ({os.cpu_count()} cores)\n"
            if load_before is not None and load_after is not None
            else ""
        )
        _write_markdown(args.markdown, bench_model.render_markdown(result) + load)
        console.print(f"wrote {args.markdown}")
    return 0


def run(args: argparse.Namespace) -> int:
    command = getattr(args, "bench_command", None)
    if command == "model":
        return _run_model(args)
    if command != "ops":
        print("usage: steadylm bench {ops,model} [options]  (see: steadylm bench ops --help)", file=sys.stderr)
        return 2
    # The allocator strategy must be applied before the first large tensor exists.
    from steadylm.kernels.cpu_memory import tune_cpu_allocator

    alloc_ok = tune_cpu_allocator(args.cpu_alloc)

    import torch
    from rich.console import Console

    from steadylm.bench import ops as bench_ops

    config = _config(bench_ops.BenchConfig, args, QUICK_OPS)
    config.validate()
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda requested but torch.cuda.is_available() is False")
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    # A wide console when piped (nohup, CI logs) so the table is not squeezed to 80 columns.
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 160, record=True)
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    console.print(
        f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"cpu capability {torch.backends.cpu.get_cpu_capability()}, cpu-alloc {args.cpu_alloc}"
        f"{'' if alloc_ok else ' (not applied on this platform)'}, "
        f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')}"
        + (f", load average {load_before[0]:.2f}" if load_before else "")
    )
    results, copies = bench_ops.run_bench(config, progress=_say(console))
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
    if args.markdown:
        _write_markdown(args.markdown, "```\n" + console.export_text() + "```\n")
    return 0
