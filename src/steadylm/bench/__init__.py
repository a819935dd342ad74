"""``steadylm bench``: benchmarks. Sub-commands ``ops`` (:mod:`steadylm.bench.ops`) and ``model``
(:mod:`steadylm.bench.model`)."""

from __future__ import annotations

import argparse
import os
import statistics
import sys

from steadylm.errors import ConfigError

__all__ = ["add_arguments", "run"]

_QUICK = {"ops": "rms_norm,swiglu", "dtypes": "fp32", "tokens": 128, "hidden": 256, "repeats": 3, "warmup": 1}
_QUICK_MODEL = {"presets": "nano", "activations": "swiglu,powlu", "norms": "rmsnorm,bhyt", "batch": 4, "seq": 64,
                "gen_batches": "1", "prompt": 8, "new_tokens": 16, "rounds": 3, "warmup": 1}  # fmt: skip


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
    ops.add_argument("--no-liger", action="store_true", help="skip the Liger-Kernel peer rows (CUDA only)")
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
    model.add_argument("--presets", default=None, help="comma-separated model presets (default micro,nano-moe)")
    model.add_argument("--activations", default=None, help="comma-separated (default swiglu,swiglu_clip,powlu)")
    model.add_argument("--norms", default=None, help="comma-separated (default rmsnorm,bhyt,bhyt_star,dyt)")
    model.add_argument("--modes", default=None, help="comma-separated: eager,compiled (default both)")
    model.add_argument("--measures", default=None, help="comma-separated: train,generate (default both)")
    model.add_argument("--batch", type=int, default=None, help="training batch (default 8)")
    model.add_argument("--seq", type=int, default=None, help="training sequence length (default 256)")
    model.add_argument("--gen-batches", dest="gen_batches", default=None, help="generation batch sizes (default 1,8)")
    model.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 16)")
    model.add_argument("--new-tokens", dest="new_tokens", type=int, default=None, help="generated tokens (default 128)")
    model.add_argument("--rounds", type=int, default=None, help="interleaved timed rounds (default 5)")
    model.add_argument("--warmup", type=int, default=None, help="untimed calls per row after the first (default 1)")
    model.add_argument("--dtype", choices=("fp32", "bf16"), default=None,
                       help="fp32, or bf16 autocast (default: bf16 on CUDA, fp32 on CPU)")  # fmt: skip
    model.add_argument("--no-hf", action="store_true", help="skip the Hugging Face LlamaForCausalLM row")
    model.add_argument("--no-profile", action="store_true", help="skip the profiler shares")
    model.add_argument("--moe-loop", action="store_true",
                       help="MoE presets: add swiglu+rmsnorm:loop, the per-expert loop dispatch (graph breaks)")  # fmt: skip
    model.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    model.add_argument("--threads", type=int, default=None,
                       help="torch intra-op threads (default: torch's; 1 is steadier on a loaded CPU)")  # fmt: skip
    model.add_argument("--csv", default="bench-model.csv", help="CSV to append rows to (default %(default)s)")
    model.add_argument("--no-csv", action="store_true", help="do not write a CSV")
    model.add_argument("--markdown", default=None, help="also write the table and comparisons as markdown")
    model.add_argument(
        "--quick",
        action="store_true",
        help="small smoke run: nano, swiglu,powlu x rmsnorm,bhyt, 4x64 training, batch-1 generation of "
        "8+16 tokens, 3 rounds (explicit flags still win)",
    )


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

    defaults = bench_model.ModelBenchConfig()

    def pick(name: str) -> object:
        value = getattr(args, name)
        if value is not None:
            return value
        return _QUICK_MODEL[name] if args.quick and name in _QUICK_MODEL else getattr(defaults, name)

    def pick_list(name: str) -> list[str]:
        value = pick(name)
        return _csv_list(value) if isinstance(value, str) else list(value)  # type: ignore[call-overload]

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda requested but torch.cuda.is_available() is False")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"threads must be an integer >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    try:
        gen_batches = [int(b) for b in pick_list("gen_batches")]
    except ValueError as err:
        raise ConfigError(f"gen-batches must be comma-separated integers: {err}") from None
    config = bench_model.ModelBenchConfig(
        presets=pick_list("presets"),
        activations=pick_list("activations"),
        norms=pick_list("norms"),
        modes=pick_list("modes"),
        measures=pick_list("measures"),
        batch=int(pick("batch")),  # type: ignore[call-overload]
        seq=int(pick("seq")),  # type: ignore[call-overload]
        gen_batches=gen_batches,
        prompt=int(pick("prompt")),  # type: ignore[call-overload]
        new_tokens=int(pick("new_tokens")),  # type: ignore[call-overload]
        rounds=int(pick("rounds")),  # type: ignore[call-overload]
        warmup=int(pick("warmup")),  # type: ignore[call-overload]
        dtype=args.dtype or ("bf16" if device.startswith("cuda") else "fp32"),
        hf=not args.no_hf,
        moe_loop=args.moe_loop,
        profile=not args.no_profile,
        device=device,
    )
    config.validate()
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 200, record=True)
    load_before = _load_average()
    console.print(
        f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}"
        + (f", load average {load_before[0]:.2f}" if load_before else "")
    )
    result = bench_model.run_model_bench(config, progress=lambda msg: console.print(msg, style="dim"))
    console.print(bench_model.render_table(result))
    for description, ratios in bench_model.comparisons(result):
        console.print(
            f"{description}: {statistics.median(ratios):.3f} "
            f"[p20–p80 {bench_model.quantile(ratios, 0.2):.3f}–{bench_model.quantile(ratios, 0.8):.3f}]"
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
        liger=not args.no_liger,
    )
    config.validate()
    if args.device == "cuda" and not torch.cuda.is_available():
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
    if args.markdown:
        _write_markdown(args.markdown, "```\n" + console.export_text() + "```\n")
    return 0
