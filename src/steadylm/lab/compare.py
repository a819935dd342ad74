"""``steadylm compare``: train activation × norm variants on one corpus and report on stability.

Every variant is trained from the same seed on the same :class:`~steadylm.data.TokenData`, so all
of them see the same batches in the same order (batches are a pure function of seed and step).
Each variant writes its own run directory ``OUT/<activation>+<norm>/`` (config, checkpoints,
``metrics.jsonl`` / ``metrics.csv``, BHyT token samples); the report sits in ``OUT/``:
``report.html`` (self-contained), ``summary.md``, ``summary.json`` and ``plots/*.png``.

The default grid (the dense ``nano`` preset on the embedded King James Bible) is the PowLU paper's
activations under RMSNorm, the BHyT paper's norms under SwiGLU, and PowLU + BHyT together, which
neither paper ran.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from steadylm.errors import ConfigError
from steadylm.lab import plots
from steadylm.lab.report import Report, markdown_table
from steadylm.models.params import parse_overrides
from steadylm.probes import StabilityProbe, detect_divergence, detect_spikes, pearson_r
from steadylm.probes.spikes import DEFAULT_DIVERGENCE_MARGIN
from steadylm.train.atomic import atomic_write_text

# ---------------------------------------------------------------------------------------------
# the grid
# ---------------------------------------------------------------------------------------------

#: (activation, norm) pairs of the default comparison.
DEFAULT_GRID: tuple[tuple[str, str], ...] = (
    ("swiglu", "rmsnorm"),
    ("swiglu_clip", "rmsnorm"),
    ("powlu", "rmsnorm"),
    ("swiglu", "dyt"),
    ("swiglu", "bhyt"),
    ("powlu", "bhyt"),
)

#: ``--model dense`` / ``--model moe`` pick these presets.
MODEL_ALIASES = {"dense": "nano", "moe": "nano-moe"}


@dataclass(frozen=True)
class Variant:
    activation: str
    norm: str

    @property
    def name(self) -> str:
        return f"{self.activation}+{self.norm}"


@dataclass(frozen=True)
class Budget:
    """How much training one variant gets (measured to fit the runtime promises on 2 cores)."""

    steps: int
    batch_size: int
    seq_len: int
    probe_every: int
    eval_every: int
    eval_batches: int
    warmup_steps: int


#: Default: 6 variants of ``nano``; 8 min 19 s on 2 partly busy CPU cores (docs/RESULTS.md).
DEFAULT_BUDGET = Budget(steps=150, batch_size=16, seq_len=128, probe_every=10, eval_every=25,
                        eval_batches=4, warmup_steps=15)
#: ``--quick``: the same grid in under 2 minutes; a smoke test of the whole pipeline.
QUICK_BUDGET = Budget(steps=40, batch_size=8, seq_len=64, probe_every=5, eval_every=10,
                      eval_batches=2, warmup_steps=5)

#: Implementations ``--impl auto`` picks. Compiling the fused kernels costs seconds per op on a
#: cold cache, which a 30-step smoke run never earns back.
DEFAULT_IMPL = "fused"
QUICK_IMPL = "reference"

# Metric keys written by the trainer (docs/ARCHITECTURE.md, train contract).
STEP_KEY = "step"
LOSS_KEY = "loss"
VAL_KEY = "val_loss"
TOKENS_PER_S_KEY = "tokens_per_s"  # per row: tokens / compute time since the previous row


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------


def _csv_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``steadylm compare`` flags."""
    from steadylm.data import add_data_arguments

    parser.add_argument("--out", metavar="DIR", default="runs/compare",
                        help="output directory: one sub-directory per variant, the report on top "
                        "(default: runs/compare)")
    parser.add_argument("--model", default="nano", metavar="PRESET",
                        help="a model preset (see `steadylm params`), or 'dense' (= nano) / "
                        "'moe' (= nano-moe); default: nano")
    parser.add_argument("--activations", type=_csv_list, default=None, metavar="A,B,...",
                        help="activations to compare (crossed with --norms); default: the built-in grid")
    parser.add_argument("--norms", type=_csv_list, default=None, metavar="N,M,...",
                        help="norms to compare (crossed with --activations); default: the built-in grid")
    parser.add_argument("--variants", type=_csv_list, default=None, metavar="ACT+NORM,...",
                        help="explicit variants, e.g. 'swiglu+rmsnorm,powlu+bhyt' (instead of a cross product)")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"optimizer steps per variant (default {DEFAULT_BUDGET.steps}, "
                        f"--quick {QUICK_BUDGET.steps})")
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"sequences per step (default {DEFAULT_BUDGET.batch_size}, --quick {QUICK_BUDGET.batch_size})")
    parser.add_argument("--seq-len", type=int, default=None,
                        help=f"training context length (default {DEFAULT_BUDGET.seq_len}, --quick {QUICK_BUDGET.seq_len})")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (AdamW, warm-up then cosine to lr/10; default 3e-3)")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp8"), default="fp32",
                        help="training precision (fp8: FP8 linears in the FFNs with bf16 autocast; default fp32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of initialisation and batch order (default 0)")
    parser.add_argument("--quick", action="store_true",
                        help="a small budget that runs the whole grid in under two minutes")
    parser.add_argument("--probe-every", type=int, default=None,
                        help="sample the stability probes every N steps "
                        f"(default {DEFAULT_BUDGET.probe_every}, --quick {QUICK_BUDGET.probe_every})")
    parser.add_argument("--eval-every", type=int, default=None, help="validation interval in steps (default 25, --quick 10; with --steps: steps/6)")
    parser.add_argument("--spike-window", type=int, default=20,
                        help="loss-spike detector: number of preceding steps the z-score is measured against (default 20)")
    parser.add_argument("--spike-threshold", type=float, default=4.0,
                        help="loss-spike detector: z-score above which a step counts as a spike (default 4)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a ModelConfig field of every variant, e.g. --set n_layers=2 "
                        "(repeatable; VALUE is parsed as JSON when it can be)")
    parser.add_argument("--impl", choices=("auto", "fused", "reference"), default="auto",
                        help="op implementation: the compiled fused kernels, or the eager reference "
                        "math (same numbers, no compile time); auto = fused, reference for --quick")
    parser.add_argument("--resume", action="store_true",
                        help="continue each variant from the last checkpoint in its run directory")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    add_data_arguments(parser)


def check_spike_detector(window: int, threshold: float) -> None:
    """Validate the loss-spike detector flags shared by ``compare`` and ``stress``."""
    if window < 2:
        raise ConfigError(f"--spike-window must be >= 2, got {window}")
    if not (threshold > 0 and math.isfinite(threshold)):
        raise ConfigError(f"--spike-threshold must be a number > 0, got {threshold}")


def _parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``--set FIELD=VALUE`` items as ModelConfig overrides, minus the fields the lab sets itself."""
    out = parse_overrides(list(items))
    reserved = sorted(set(out) & {"activation", "norm", "vocab_size", "max_seq_len", "impl"})
    if reserved:
        raise ConfigError(
            f"--set cannot change {reserved}: use --activations/--norms/--variants, "
            "--vocab-size, --seq-len and --impl"
        )
    return out


def resolve_variants(
    activations: Sequence[str] | None,
    norms: Sequence[str] | None,
    variants: Sequence[str] | None = None,
) -> list[Variant]:
    """The variants to train, validated against the activation and norm registries."""
    from steadylm.models.config import BLOCK_NORMS
    from steadylm.nn import ACTIVATIONS

    if variants:
        if activations or norms:
            raise ConfigError("--variants cannot be combined with --activations/--norms")
        chosen = []
        for spec in variants:
            act, sep, norm = spec.partition("+")
            if not sep:
                raise ConfigError(f"variant {spec!r} must be written ACTIVATION+NORM, e.g. powlu+bhyt")
            chosen.append(Variant(act.strip(), norm.strip()))
    elif activations or norms:
        acts = list(activations or ["swiglu"])
        nrms = list(norms or ["rmsnorm"])
        chosen = [Variant(a, n) for a in acts for n in nrms]
    else:
        chosen = [Variant(a, n) for a, n in DEFAULT_GRID]
    for v in chosen:
        if v.activation not in ACTIVATIONS:
            raise ConfigError(f"unknown activation {v.activation!r} in variant {v.name!r}; "
                              f"choose from {sorted(ACTIVATIONS)}")
        if v.norm not in BLOCK_NORMS:
            raise ConfigError(f"unknown norm {v.norm!r} in variant {v.name!r}; choose from {list(BLOCK_NORMS)}")
    names = [v.name for v in chosen]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"variant(s) listed twice: {dupes}")
    return chosen


def resolve_preset(model: str) -> str:
    from steadylm.models.config import PRESETS

    preset = MODEL_ALIASES.get(model, model)
    if preset not in PRESETS:
        raise ConfigError(f"--model must be 'dense', 'moe' or a preset in {list(PRESETS)}, got {model!r}")
    return preset


def _positive(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or value < 1):
        raise ConfigError(f"{name} must be an integer >= 1, got {value}")


@dataclass
class CompareOptions:
    """Everything a compare run needs; the CLI builds one from its flags."""

    out: Path
    variants: list[Variant]
    preset: str = "nano"
    budget: Budget = DEFAULT_BUDGET
    lr: float = 3e-3
    precision: str = "fp32"
    seed: int = 0
    data: str | None = None
    vocab_size: int = 4096
    text_field: str = "text"
    spike_window: int = 20
    spike_threshold: float = 4.0
    overrides: dict[str, Any] = field(default_factory=dict)
    impl: str = "fused"
    resume: bool = False
    threads: int | None = None
    quick: bool = False
    command: str = ""


def options_from_args(args: argparse.Namespace) -> CompareOptions:
    base = QUICK_BUDGET if args.quick else DEFAULT_BUDGET
    for name in ("steps", "batch_size", "seq_len", "probe_every", "eval_every", "threads"):
        _positive(f"--{name.replace('_', '-')}", getattr(args, name))
    steps = args.steps or base.steps
    budget = Budget(
        steps=steps,
        batch_size=args.batch_size or base.batch_size,
        seq_len=args.seq_len or base.seq_len,
        probe_every=args.probe_every or base.probe_every,
        eval_every=args.eval_every or (base.eval_every if args.steps is None else max(1, steps // 6)),
        eval_batches=base.eval_batches,
        warmup_steps=min(steps, base.warmup_steps if args.steps is None else max(1, steps // 10)),
    )
    check_spike_detector(args.spike_window, args.spike_threshold)
    return CompareOptions(
        out=Path(args.out),
        variants=resolve_variants(args.activations, args.norms, args.variants),
        preset=resolve_preset(args.model),
        budget=budget,
        lr=args.lr,
        precision=args.precision,
        seed=args.seed,
        data=args.data,
        vocab_size=args.vocab_size,
        text_field=args.text_field,
        spike_window=args.spike_window,
        spike_threshold=args.spike_threshold,
        overrides=_parse_overrides(args.overrides),
        impl=args.impl if args.impl != "auto" else (QUICK_IMPL if args.quick else DEFAULT_IMPL),
        resume=args.resume,
        threads=args.threads,
        quick=args.quick,
        command="steadylm " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "",
    )


# ---------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------


@dataclass
class VariantResult:
    variant: Variant
    run_dir: Path
    rows: list[dict[str, Any]]
    params_total: int
    params_active: int
    tokens_seen: int
    tokens_per_s: float  # training tokens / training compute time (evaluation excluded)
    wall_s: float
    samples: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    error: str | None = None  # set when training stopped (divergence)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.variant.name

    @property
    def tokens_per_param(self) -> float:
        return self.tokens_seen / max(1, self.params_active)


def _num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None else math.nan


def _last(rows: Sequence[Mapping[str, Any]], key: str) -> float:
    for r in reversed(rows):
        if key in r:
            return _num(r[key])
    return math.nan


def _max_over_layers(row: Mapping[str, Any] | None, prefix: str, stat: str) -> float:
    if row is None:
        return math.nan
    vals = [_num(v) for k, v in row.items() if k.startswith(prefix + "/layer") and k.endswith("/" + stat)]
    vals = [v for v in vals if not math.isnan(v)]
    return max(vals) if vals else math.nan


def summarize(result: VariantResult, window: int, threshold: float) -> dict[str, Any]:
    """Headline numbers of one variant (what the table and summary.json show)."""
    rows = result.rows
    train = [r for r in rows if LOSS_KEY in r]
    losses = [_num(r[LOSS_KEY]) for r in train]
    spikes = detect_spikes(losses, window, threshold) if len(losses) > window else []
    div = detect_divergence(losses)
    tail = [x for x in losses[-10:] if math.isfinite(x)]
    probe_row = next((r for r in reversed(rows) if any(k.startswith("ffn_down_in/") for k in r)), None)
    hidden_row = next((r for r in reversed(rows) if any(k.startswith("hidden/") for k in r)), None)
    n_hidden = plots.layer_count(rows, "hidden")
    peak_amax = max((_max_over_layers(r, "ffn_down_in", "amax") for r in rows
                     if any(k.startswith("ffn_down_in/") for k in r)), default=math.nan)
    bhyt_r = [_num(v) for k, v in (probe_row or {}).items() if k.startswith("bhyt/") and k.endswith("/pearson_r")]
    # the per-layer means of every probed step, pooled: the coarser agreement a per-layer plot shows
    mean_pairs = [(_num(r[k]), _num(r[k.replace("/v_approx", "/v_true")])) for r in rows for k in r
                  if k.startswith("bhyt/") and k.endswith("/v_approx") and k.replace("/v_approx", "/v_true") in r]
    mean_pairs = [p for p in mean_pairs if math.isfinite(p[0]) and math.isfinite(p[1])]
    r_means = (pearson_r(torch.tensor([p[0] for p in mean_pairs]), torch.tensor([p[1] for p in mean_pairs]))
               if len(mean_pairs) > 2 else math.nan)
    sat = {k.removeprefix("sat/"): _num(v) for k, v in (hidden_row or {}).items() if k.startswith("sat/")}
    sat = {k: v for k, v in sat.items() if math.isfinite(v)}
    worst_site = max(sat, key=sat.__getitem__) if sat else None
    overhead = [_num(r["probe/overhead_ms"]) for r in rows if "probe/overhead_ms" in r]
    return {
        "variant": result.name,
        "activation": result.variant.activation,
        "norm": result.variant.norm,
        "steps_logged": len(train),
        "final_train_loss": sum(tail) / len(tail) if tail else math.nan,
        "final_val_loss": _last(rows, VAL_KEY),
        "spikes": len(spikes),
        "spike_steps": [int(train[s.index][STEP_KEY]) for s in spikes],
        "diverged": None if div is None else {"step": int(train[div.index][STEP_KEY]), "reason": div.reason},
        "error": result.error,
        "down_in_amax_last": _max_over_layers(probe_row, "ffn_down_in", "amax"),
        "down_in_amax_peak": peak_amax,
        "down_in_p99_last": _max_over_layers(probe_row, "ffn_down_in", "p99"),
        "down_in_kurtosis_last": _max_over_layers(probe_row, "ffn_down_in", "kurtosis"),
        "down_in_max_rms_last": _max_over_layers(probe_row, "ffn_down_in", "max_rms"),
        "grad_gate_amax_last": _max_over_layers(probe_row, "grad_gate_out", "amax"),
        "grad_up_amax_last": _max_over_layers(probe_row, "grad_up_out", "amax"),
        "last_layer_hidden_var": _num((hidden_row or {}).get(f"hidden/layer{n_hidden - 1}/var")),
        "last_layer_hidden_l2": _num((hidden_row or {}).get(f"hidden/layer{n_hidden - 1}/l2")),
        "bhyt_pearson_r_min": min(bhyt_r) if bhyt_r else math.nan,
        "bhyt_pearson_r_layer_means": r_means,
        "tanh_saturation_max": sat[worst_site] if worst_site else math.nan,
        "tanh_saturation_worst_site": worst_site,
        "tokens_per_s": result.tokens_per_s,
        "probe_overhead_ms_mean": sum(overhead) / len(overhead) if overhead else math.nan,
        "probe_samples": len(overhead),
        "params_total": result.params_total,
        "params_active": result.params_active,
        "tokens_seen": result.tokens_seen,
        "tokens_per_param": result.tokens_per_param,
        "wall_s": result.wall_s,
    }


def model_config(variant: Variant, opts: CompareOptions, vocab_size: int) -> Any:
    """The validated ``ModelConfig`` of one variant."""
    from steadylm.models import ModelConfig

    return ModelConfig.from_preset(
        opts.preset,
        activation=variant.activation,
        norm=variant.norm,
        vocab_size=vocab_size,
        max_seq_len=opts.budget.seq_len,
        impl=opts.impl,
        **opts.overrides,
    )


def train_config(opts: CompareOptions) -> Any:
    """The validated ``TrainConfig`` shared by every variant."""
    from steadylm.train import TrainConfig

    b = opts.budget
    return TrainConfig(
        steps=b.steps,
        batch_size=b.batch_size,
        lr=opts.lr,
        min_lr=opts.lr / 10,
        warmup_steps=b.warmup_steps,
        precision=opts.precision,
        seed=opts.seed,
        eval_every=b.eval_every,
        eval_batches=b.eval_batches,
        probe_every=b.probe_every,
        threads=opts.threads,
    )


def _train_one(variant: Variant, opts: CompareOptions, data: Any, console: Any) -> VariantResult:
    from steadylm.train import Trainer
    from steadylm.train.metrics import read_metrics

    b = opts.budget
    model_cfg = model_config(variant, opts, data.vocab_size)
    train_cfg = train_config(opts)
    run_dir = opts.out / variant.name
    probe = StabilityProbe(every=b.probe_every)
    probes: list[Any] = [probe]
    if opts.precision == "fp8":
        from steadylm.precision import FP8Probe

        probes.append(FP8Probe(every=b.probe_every, per_module=False))
    trainer = Trainer(model_cfg, train_cfg, data, run_dir, probes=probes)
    t0 = time.perf_counter()
    result = trainer.run(resume=opts.resume)
    wall = time.perf_counter() - t0
    error = None
    if result.diverged:
        # A diverged variant is a result of the comparison, not a failure of it.
        error = f"diverged at step {result.diverged_at}: {result.divergence_reason}"
        console.print(f"[red]{variant.name}: {error}[/red]")
    samples_path = run_dir / "bhyt_variance_samples.json"
    samples = probe.samples
    if samples:
        atomic_write_text(samples_path, json.dumps(samples))
    elif opts.resume and samples_path.exists():
        samples = json.loads(samples_path.read_text(encoding="utf-8"))
    return VariantResult(
        variant=variant,
        run_dir=run_dir,
        rows=read_metrics(result.metrics_jsonl),
        params_total=int(result.num_params["total"]),
        params_active=int(result.num_params.get("active", result.num_params["total"])),
        tokens_seen=result.tokens_seen,
        tokens_per_s=result.tokens_per_s,
        wall_s=wall,
        samples=samples,
        error=error,
    )


def run_compare(opts: CompareOptions, console: Any = None) -> list[VariantResult]:
    """Train every variant, write the report; returns the per-variant results."""
    from rich.console import Console

    from steadylm.data import prepare_data

    # a log file or pipe gets a table wide enough not to wrap every header
    console = console or Console(width=None if sys.stdout.isatty() else 180)
    # every configuration error surfaces before the corpus is tokenized or anything is written
    for variant in opts.variants:
        model_config(variant, opts, opts.vocab_size)
    train_config(opts)
    t_start = time.perf_counter()
    data = prepare_data(opts.data, vocab_size=opts.vocab_size, seq_len=opts.budget.seq_len,
                        seed=opts.seed, text_field=opts.text_field)
    t_data = time.perf_counter() - t_start
    console.print(f"data: {data.describe()['source']} — {int(data.train_tokens.shape[0]):,} train / "
                  f"{int(data.val_tokens.shape[0]):,} val tokens, vocab {data.vocab_size} "
                  f"({t_data:.1f} s)")
    results = []
    for k, variant in enumerate(opts.variants, 1):
        console.print(f"[bold]({k}/{len(opts.variants)}) {variant.name}[/bold] — {opts.preset}, "
                      f"{opts.budget.steps} steps × {opts.budget.batch_size} × {opts.budget.seq_len} tokens")
        res = _train_one(variant, opts, data, console)
        res.summary = summarize(res, opts.spike_window, opts.spike_threshold)
        results.append(res)
    t_train = time.perf_counter() - t_start - t_data
    write_report(opts, results, data.describe(), {"data_s": t_data, "train_s": t_train})
    print_table(results, console)
    console.print(f"report: {opts.out / 'report.html'}  (total {time.perf_counter() - t_start:.0f} s)")
    return results


def run(args: argparse.Namespace) -> int:
    opts = options_from_args(args)
    run_compare(opts)
    return 0


# ---------------------------------------------------------------------------------------------
# output: table, report
# ---------------------------------------------------------------------------------------------

TABLE_COLUMNS: tuple[tuple[str, str, str], ...] = (
    # (summary key, header, format)
    ("final_train_loss", "train loss (last 10)", "{:.3f}"),
    ("final_val_loss", "val loss", "{:.3f}"),
    ("spikes", "spikes", "{:d}"),
    ("down_in_amax_last", "max |down-in|", "{:.3g}"),
    ("down_in_p99_last", "down-in P99", "{:.3g}"),
    ("down_in_kurtosis_last", "down-in kurtosis", "{:.3g}"),
    ("last_layer_hidden_var", "last-layer var", "{:.3g}"),
    ("tokens_per_s", "tokens/s", "{:,.0f}"),
    ("tokens_per_param", "tokens/param", "{:.3f}"),
)


def _fmt(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def _status(s: Mapping[str, Any]) -> str:
    if s.get("error"):
        return "stopped: " + str(s["error"])
    if s.get("diverged"):
        d = s["diverged"]
        return f"diverged at step {d['step']} ({d['reason']})"
    return "ok"


def table_rows(results: Sequence[VariantResult]) -> list[list[str]]:
    return [[r.name] + [_fmt(r.summary.get(k), f) for k, _, f in TABLE_COLUMNS] + [_status(r.summary)]
            for r in results]


def print_table(results: Sequence[VariantResult], console: Any) -> None:
    from rich.table import Table

    table = Table(title="steadylm compare", show_lines=False)
    table.add_column("variant", style="bold")
    for _, header, _ in TABLE_COLUMNS:
        table.add_column(header, justify="right")
    table.add_column("status")
    for row in table_rows(results):
        table.add_row(*row)
    console.print(table)


def _ratio(a: float, b: float) -> float:
    return a / b if b and math.isfinite(a) and math.isfinite(b) and b != 0 else math.nan


def findings(results: Sequence[VariantResult]) -> list[str]:
    """Plain statements comparing the variants with the papers' claims, computed from the numbers."""
    by = {r.name: r.summary for r in results}
    out: list[str] = []

    def get(name: str, key: str) -> float:
        return _num(by.get(name, {}).get(key))

    base = "swiglu+rmsnorm"
    if base in by:
        for other in ("powlu+rmsnorm", "swiglu_clip+rmsnorm"):
            if other in by:
                r = _ratio(get(base, "down_in_amax_last"), get(other, "down_in_amax_last"))
                rk = _ratio(get(base, "down_in_kurtosis_last"), get(other, "down_in_kurtosis_last"))
                if math.isfinite(r):
                    verdict = "smaller" if r > 1 else "not smaller"
                    out.append(
                        f"**{other}** vs {base}: max |FFN down-projection input| {get(other, 'down_in_amax_last'):.3g} "
                        f"vs {get(base, 'down_in_amax_last'):.3g} ({r:.2f}× — {verdict}); kurtosis ratio "
                        f"{rk:.2f}×. The PowLU paper reports far smaller FFN outliers than SwiGLU at scale "
                        "(Fig. 2); at this scale outliers have had little time to grow."
                    )
        for other in ("swiglu+bhyt", "swiglu+dyt"):
            if other in by:
                r = _ratio(get(base, "last_layer_hidden_var"), get(other, "last_layer_hidden_var"))
                if math.isfinite(r) and r > 0:
                    norm = other.split("+")[1]
                    rel = (f"RMSNorm's is {r:.3g}× the {norm} one" if r >= 1
                           else f"the {norm} one is {1 / r:.3g}× RMSNorm's — larger, not smaller")
                    out.append(
                        f"**{other}** vs {base}: last-layer hidden-state variance "
                        f"{get(other, 'last_layer_hidden_var'):.3g} vs {get(base, 'last_layer_hidden_var'):.3g} "
                        f"({rel}). The BHyT paper reports RMSNorm's ~25× BHyT's at 1B parameters."
                    )
        for other in by:
            if other == base:
                continue
            d = get(other, "final_val_loss") - get(base, "final_val_loss")
            if math.isfinite(d):
                out.append(f"{other}: final validation loss {get(other, 'final_val_loss'):.3f} "
                           f"({d:+.3f} vs {base}).")
    rs = [(n, get(n, "bhyt_pearson_r_min")) for n in by if math.isfinite(get(n, "bhyt_pearson_r_min"))]
    for n, r in rs:
        verdict = "reproduces" if r > 0.99 else "does not reach"
        out.append(
            f"**{n}**: Pearson r between the approximated and the true second-site variance over the "
            f"tokens of a layer (last probe, worst layer) = {r:.4f} — {verdict} the paper's r > 0.99; "
            f"over the per-layer means of all probed steps r = {get(n, 'bhyt_pearson_r_layer_means'):.4f}."
        )
    for n in by:
        s = get(n, "tanh_saturation_max")
        if math.isfinite(s):
            out.append(f"**{n}**: worst tanh saturation (|tanh| > 0.95) at the last probe = {s:.4f} "
                       f"({by[n].get('tanh_saturation_worst_site')}); the BHyT paper expects ≈ 0 for BHyT.")
    for n, s in by.items():
        if s.get("spikes"):
            out.append(f"**{n}**: {s['spikes']} loss spike(s) at step(s) {s['spike_steps']}.")
        if s.get("diverged") or s.get("error"):
            out.append(f"**{n}**: {_status(s)}.")
    return out


def _variant_samples(results: Sequence[VariantResult]) -> dict[str, dict[str, dict[str, list[float]]]]:
    return {r.name: r.samples for r in results if r.samples}


def _overhead_text(results: Sequence[VariantResult], budget: Budget) -> str:
    probe_every = budget.probe_every
    lines = []
    for r in results:
        rows = r.rows
        ov = r.summary.get("probe_overhead_ms_mean", math.nan)
        # every step is logged (log_every = 1), so a row's tokens/s is that step's own rate
        tokens_per_step = budget.batch_size * budget.seq_len
        times_p, times_n = [], []
        for x in rows:
            tps = _num(x.get(TOKENS_PER_S_KEY))
            if math.isfinite(tps) and tps > 0:
                (times_p if "probe/overhead_ms" in x else times_n).append(tokens_per_step / tps)
        times_p.sort()
        times_n.sort()
        if times_p and times_n:
            med_p, med_n = times_p[len(times_p) // 2], times_n[len(times_n) // 2]
            extra = med_p - med_n
            lines.append([r.name, f"{ov:.1f}", f"{1000 * med_p:.1f}", f"{1000 * med_n:.1f}",
                          f"{100 * extra / med_n:+.1f}%", f"{100 * extra / med_n / probe_every:+.2f}%"])
        else:
            lines.append([r.name, _fmt(ov, "{:.1f}"), "–", "–", "–", "–"])
    return markdown_table(
        ["variant", "probe's own time (ms/sampled step)", "median step, sampled (ms)",
         "median step, not sampled (ms)", "sampled-step overhead", f"amortised (every {probe_every})"],
        lines,
    )


def write_report(
    opts: CompareOptions,
    results: Sequence[VariantResult],
    data_info: Mapping[str, Any],
    timings: Mapping[str, float],
) -> dict[str, Path]:
    """Write report.html, summary.md, summary.json and the plots under ``opts.out``."""
    runs = {r.name: r.rows for r in results}
    b = opts.budget
    first = results[0] if results else None
    tpp = f"{first.tokens_per_param:.3f}" if first else "–"
    tokens_note = (
        f"tokens/param = {tpp} ({first.tokens_seen:,} training tokens per variant, "
        f"{first.params_active:,} parameters)" if first else ""
    )
    intro = "\n".join([
        f"Command: `{opts.command or 'steadylm compare'}`",
        "",
        markdown_table(["setting", "value"], [
            ["model preset", opts.preset + (f" with {opts.overrides}" if opts.overrides else "")],
            ["parameters (total / active)", f"{first.params_total:,} / {first.params_active:,}" if first else "–"],
            ["corpus", str(data_info.get("source"))],
            ["train / val tokens in the corpus", f"{data_info.get('train_tokens', 0):,} / {data_info.get('val_tokens', 0):,}"],
            ["vocabulary", str(data_info.get("vocab_size"))],
            ["steps × batch × context", f"{b.steps} × {b.batch_size} × {b.seq_len}"],
            ["tokens per variant", f"{first.tokens_seen:,}" if first else "–"],
            ["**tokens per parameter**", tpp],
            ["precision / seed / peak LR", f"{opts.precision} / {opts.seed} / {opts.lr:g}"],
            ["op implementation", opts.impl],
            ["probes sampled every", f"{b.probe_every} steps"],
            ["loss-spike detector", f"rolling z-score over the preceding {opts.spike_window} steps > {opts.spike_threshold:g}"],
            ["divergence", f"non-finite loss, or loss above its first value + {DEFAULT_DIVERGENCE_MARGIN}"],
            ["wall time", f"data {timings.get('data_s', 0):.0f} s, training {timings.get('train_s', 0):.0f} s"],
        ]),
        "",
        "Every variant starts from the same seed and sees the same batches in the same order. "
        "Kurtosis is Pearson's (a normal distribution gives 3). P1/P99 are the 1st/99th percentiles. "
        "Tanh-based norms are known to look best when data is scarce, so read every comparison next "
        "to its tokens-per-parameter figure: this run is far below the ~20 tokens/param of "
        "compute-optimal training and the hundreds the papers use.",
    ])
    report = Report("steadylm compare", intro)

    def note(fig):
        if tokens_note:
            fig.supxlabel(tokens_note, fontsize=9, color="#444")
        return fig

    report.add_section(
        "Summary",
        markdown_table(["variant"] + [h for _, h, _ in TABLE_COLUMNS] + ["status"], table_rows(results))
        + "\n\n" + "\n".join(f"- {f}" for f in findings(results)),
    )
    report.add_section(
        "Activation functions",
        "The gates and the scalar forms of the activations compared here, with their derivatives "
        "(the PowLU paper's Fig. 1), computed with `steadylm.functional` and autograd.",
        [("activations", plots.plot_activation_functions(), "Activations and derivatives")],
    )
    spikes = {r.name: r.summary.get("spike_steps", []) for r in results}
    report.add_section(
        "Loss",
        f"Train loss every step, validation loss every {b.eval_every} steps, and the global gradient "
        f"norm before clipping (clipped at 1.0). Red × marks a loss "
        f"spike: a step whose loss is more than {opts.spike_threshold:g} standard deviations above the "
        f"mean of the preceding {opts.spike_window} steps. {tokens_note}.",
        [("loss", note(plots.plot_losses(runs, spikes, LOSS_KEY, VAL_KEY)), "Train and validation loss")],
    )
    down_rows = [[r.name] + [_fmt(r.summary.get(k), "{:.3g}") for k in
                             ("down_in_amax_last", "down_in_amax_peak", "down_in_p99_last",
                              "down_in_kurtosis_last", "down_in_max_rms_last",
                              "grad_gate_amax_last", "grad_up_amax_last")] for r in results]
    report.add_section(
        "FFN down-projection input",
        "Per layer, the range (min–max) and the P1–P99 band of the FFN down-projection input — the "
        "activation output, the tensor FP8 training must represent — at the last probed step (the "
        "PowLU paper's Fig. 2). Values in the table are the maximum over layers.\n\n"
        + markdown_table(["variant", "max |x| (last)", "max |x| (peak over training)", "P99",
                          "kurtosis", "max/RMS", "max |∂L/∂gate|", "max |∂L/∂up|"], down_rows),
        [("down_proj_bands", note(plots.plot_down_proj_bands(runs)), "FFN down-projection input per layer")],
    )
    report.add_section(
        "Hidden states",
        "Mean per-token L2 norm and variance of the residual stream after each block (the BHyT "
        "paper's Fig. 3): per layer at the last probed step, and the last layer over training.",
        [("hidden_states", note(plots.plot_hidden_states(runs)), "Hidden-state variance and norm")],
    )
    report.add_section(
        "BHyT second-site variance",
        "BHyT avoids a second reduction per block by estimating the FFN-side mean square as "
        "v' = v + c_ℓ·λ₁²/κ². Left: v' against the true mean(h²) for sampled tokens of each layer "
        "(last probed step) with Pearson r; right: Pearson r over training. The paper reports r > 0.99.",
        [("bhyt_variance", note(plots.plot_bhyt_variance(runs, _variant_samples(results))),
          "Approximated vs true second-site variance")],
    )
    report.add_section(
        "tanh saturation",
        "Fraction of tanh outputs with |tanh| > 0.95 at the DyT / BHyT sites (worst site per probe), "
        "and the learnable scales λ (BHyT) and α (DyT).",
        [("tanh_saturation", note(plots.plot_saturation(runs)), "tanh saturation and λ/α")],
    )
    tps = {r.name: _num(r.summary.get("tokens_per_s")) for r in results}
    report.add_section(
        "Throughput and probe overhead",
        "Training tokens per second (probe steps included). The probes only register hooks on "
        "sampled steps; their cost is measured two ways: the time the probe itself spends (hooks "
        "and reductions), and the median step time of sampled against not-sampled steps.\n\n"
        + _overhead_text(results, b),
        [("throughput", note(plots.plot_throughput(tps)), "Tokens per second")],
    )
    moe = _moe_table(results)
    if moe:
        report.add_section(
            "MoE routing",
            "Routed token-slots per expert at the last probed step (uniform = 1/E each); the router "
            "bias balances load without an auxiliary loss. Coefficient of variation across experts.\n\n" + moe,
        )
    fp8 = _fp8_table(results)
    if fp8:
        report.add_section(
            "FP8 counters",
            "FP8 linear layers (e4m3 forward, e5m2 gradients), summed over every training step: "
            "elements that overflowed the format's range or were flushed to zero, the largest "
            "magnitude seen, and the worst quantisation signal-to-noise ratio of a probe interval.\n\n" + fp8,
        )
    files = "\n".join(f"- `{r.run_dir.name}/metrics.jsonl`, `{r.run_dir.name}/metrics.csv`" for r in results)
    report.add_section(
        "Raw data",
        "Per-variant metrics (one JSON object per logged step; probe keys such as "
        "`ffn_down_in/layer3/p99`, `hidden/layer3/var`, `bhyt/layer3/pearson_r`):\n\n" + files
        + "\n- `summary.json`: the numbers of the summary table.",
    )
    summary = {
        "command": opts.command,
        "options": {**asdict(opts), "out": str(opts.out), "variants": [v.name for v in opts.variants]},
        "data": dict(data_info),
        "timings_s": dict(timings),
        "variants": [_json_safe(r.summary) for r in results],
    }
    atomic_write_text(opts.out / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    return report.write(opts.out)


def _moe_table(results: Sequence[VariantResult]) -> str:
    """Per variant and MoE layer: max / min expert load and its CV at the last probe ('' if dense)."""
    lines = []
    for r in results:
        row = next((x for x in reversed(r.rows) if any(k.startswith("moe/") for k in x)), None)
        if row is None:
            continue
        for i in range(plots.layer_count([row], "moe")):
            if f"moe/layer{i}/load_max" in row:
                lines.append([r.name, str(i)] + [_fmt(_num(row.get(f"moe/layer{i}/{k}")), "{:.3f}")
                                                 for k in ("load_max", "load_min", "load_cv")])
    if not lines:
        return ""
    return markdown_table(["variant", "layer", "max load", "min load", "CV"], lines)


def _fp8_table(results: Sequence[VariantResult]) -> str:
    """Per variant and FP8 role: total overflow / underflow, peak amax, worst SNR ('' without FP8)."""
    lines = []
    for r in results:
        for role in ("input", "weight", "grad_output"):
            key = f"fp8/{role}/"
            rows = [x for x in r.rows if key + "overflow" in x]
            if not rows:
                continue
            tot = lambda f: sum(_num(x.get(key + f)) for x in rows if math.isfinite(_num(x.get(key + f))))  # noqa: E731
            amax = [_num(x.get(key + "amax")) for x in rows]
            snr = [_num(x.get(key + "snr_db")) for x in rows]
            amax = [a for a in amax if math.isfinite(a)]
            snr = [s for s in snr if math.isfinite(s)]
            lines.append([r.name, role, f"{tot('overflow'):,.0f}", f"{tot('underflow'):,.0f}",
                          _fmt(max(amax) if amax else math.nan, "{:.3g}"),
                          _fmt(min(snr) if snr else math.nan, "{:.1f}")])
    if not lines:
        return ""
    return markdown_table(["variant", "tensor", "overflow", "underflow", "peak amax", "worst SNR (dB)"], lines)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj
