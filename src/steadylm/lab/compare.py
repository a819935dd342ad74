"""``steadylm compare``: train activation × norm variants on one corpus and report on stability.

Every variant is trained from the same seed on the same :class:`~steadylm.data.TokenData`, so all
of them see the same batches in the same order (batches are a pure function of seed and step).
Each variant writes its own run directory ``OUT/<activation>+<norm>/`` (config, checkpoints,
``metrics.jsonl`` / ``metrics.csv``, BHyT token samples); the report sits in ``OUT/``:
``report.html`` (self-contained), ``summary.md``, ``summary.json`` and ``plots/*.png``.

The default grid (the dense ``nano`` preset on the embedded King James Bible) is the PowLU paper's
activations under RMSNorm, the BHyT paper's norms under SwiGLU, and PowLU + BHyT together, which
neither paper ran. Flags: the run spec's (``--steps``, ``--lr``, ``--preset``, ``--set
train.probe_every=5`` ...) and the lab's (``--variants``, ``--quick``, ``--resume``); see ``--help``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from steadylm.lab import plots
from steadylm.lab.options import (
    LabOptions,
    TuneOptions,
    Variant,
    add_lab_arguments,
    command_line,
    lab_options,
    lab_spec,
    options_from_args,
    resolve_variants,
    scaled_budget,
)
from steadylm.lab.report import Report, fmt, markdown_table, write_all
from steadylm.lab.runner import RunResult, load_data, output_lock, run_variant, variant_spec
from steadylm.lab.seeds import (
    SPREAD_RULE,
    SeedOptions,
    SeedStats,
    exceeds_spread,
    seed_stats,
    seed_table,
    validate_seeds,
)
from steadylm.lab.summary import RunSummary, pick_lr, status
from steadylm.probes import keys as K
from steadylm.probes.spikes import DIVERGENCE_RULE
from steadylm.train import TrainConfig
from steadylm.train.spec import DataSpec, ModelSpec, ProbeSpec, RunSpec

__all__ = ["DEFAULT_GRID", "DEFAULT_SPEC", "QUICK_SPEC", "add_arguments", "run", "run_compare"]

#: (activation, norm) pairs of the default comparison.
DEFAULT_GRID: tuple[tuple[str, str], ...] = (
    ("swiglu", "rmsnorm"),
    ("swiglu_clip", "rmsnorm"),
    ("powlu", "rmsnorm"),
    ("swiglu", "dyt"),
    ("swiglu", "bhyt"),
    ("powlu", "bhyt"),
)

#: The default run: 6 variants of ``nano``, 150 steps × 16 × 128 tokens, fp32, fused kernels
#: (5–8 min on 2 CPU cores, docs/RESULTS.md).
DEFAULT_SPEC = RunSpec(
    model=ModelSpec(preset="nano", impl="fused"),
    train=TrainConfig(steps=150, batch_size=16, lr=3e-3, min_lr=3e-3 / 10, warmup_steps=15,
                      eval_every=25, eval_batches=4, probe_every=10),
    data=DataSpec(seq_len=128),
    probes=ProbeSpec(stability=True),
)
_BASE = copy.deepcopy(DEFAULT_SPEC)  # nothing of the default run's (mutable) fields is shared
#: ``--quick``: the same grid in under 2 minutes with the reference ops (compiling the fused
#: kernels costs seconds per op, which a 40-step smoke run never earns back): the default run, smaller.
QUICK_SPEC = dataclasses.replace(
    _BASE,
    model=dataclasses.replace(_BASE.model, impl="reference"),
    train=dataclasses.replace(_BASE.train, steps=40, batch_size=8, warmup_steps=5, eval_every=10, eval_batches=2,
                              probe_every=5),
    data=dataclasses.replace(_BASE.data, seq_len=64),
)
DEFAULT_OUT = "runs/compare"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``steadylm compare`` flags: the run spec's and the lab's."""
    parser.description = __doc__.split("\n\n")[0] if __doc__ else None
    add_lab_arguments(parser, TuneOptions, SeedOptions, out=DEFAULT_OUT)


def _derive(base: RunSpec, user: Mapping[str, Any]) -> dict[str, Any]:
    # with --steps: evaluation every steps/6, warm-up steps/10; min_lr = lr/10 always
    return scaled_budget(base, user, eval_div=6, warmup_div=10)


def compare_spec(args: argparse.Namespace, lab: LabOptions) -> RunSpec:
    return lab_spec(args, QUICK_SPEC if lab.quick else DEFAULT_SPEC, _derive)


def run(args: argparse.Namespace) -> int:
    lab = lab_options(args, out=DEFAULT_OUT)
    tune = options_from_args(args, TuneOptions)
    tune.validate()
    seeds = validate_seeds(options_from_args(args, SeedOptions).seeds)
    variants = resolve_variants(lab, DEFAULT_GRID)
    spec = compare_spec(args, lab)
    with output_lock(lab.out):
        run_compare(spec, variants, lab, command=command_line(), tune=tune, seeds=seeds)
    return 0


def _tuning_spec(spec: RunSpec, variant: Variant, lr: float) -> RunSpec:
    """A third of the run (at least 10 steps) at peak LR ``lr``, evaluated at its end."""
    steps = max(10, spec.train.steps // 3)
    return variant_spec(spec, variant, **{
        "train.lr": lr, "train.min_lr": lr / 10, "train.steps": steps, "train.eval_every": steps,
        "train.warmup_steps": min(spec.train.warmup_steps, steps), "train.ckpt_every": 0})


def tune_lrs(spec: RunSpec, variants: Sequence[Variant], tune: TuneOptions, out: Any, data: Any, *,
             resume: bool, console: Any) -> dict[str, list[tuple[float, RunResult]]]:
    """Every variant at every LR of the grid (``OUT/tune-lr/<variant>/x<m>/``)."""
    runs: dict[str, list[tuple[float, RunResult]]] = {}
    for v in variants:
        for m in tune.lr_grid:
            lr = spec.train.lr * m
            console.print(f"tune-lr: {v.name} at {lr:g}")
            res = run_variant(_tuning_spec(spec, v, lr), out / "tune-lr" / v.name / f"x{m:g}", data,
                              resume=resume)
            runs.setdefault(v.name, []).append((lr, res))
    return runs


def run_compare(spec: RunSpec, variants: Sequence[Variant], lab: LabOptions, *, command: str = "",
                console: Any = None, tune: TuneOptions | None = None,
                seeds: Sequence[int] | None = None) -> list[RunResult]:
    """Train every variant, write the report; returns the per-variant results (of the first seed).

    With ``seeds``, every variant is trained once per seed (``OUT/seed<k>/<variant>/``, the
    learning rates tuned on the first seed); the report's curves are the first seed's, and its
    "Spread over seeds" section gives each number's mean, standard deviation and range over seeds."""
    from pathlib import Path

    from rich.console import Console

    # a log file or pipe gets a table wide enough not to wrap every header
    console = console or Console(width=None if sys.stdout.isatty() else 180)
    out = Path(lab.out)
    seed_list = list(seeds) if seeds is not None else [spec.train.seed]
    if seeds is not None:
        spec = spec.with_overrides({"train.seed": seed_list[0]})
    specs = [variant_spec(spec, v) for v in variants]  # every configuration error surfaces here
    t_start = time.perf_counter()
    data = load_data(spec)
    t_data = time.perf_counter() - t_start
    console.print(f"data: {data.describe()['source']} — {int(data.train_tokens.shape[0]):,} train / "
                  f"{int(data.val_tokens.shape[0]):,} val tokens, vocab {data.vocab_size} ({t_data:.1f} s)")
    for s in specs:
        s.model_config(data.vocab_size)
    tuning: dict[str, list[tuple[float, RunResult]]] = {}
    if tune is not None and tune.tune_lr:
        tuning = tune_lrs(spec, variants, tune, out, data, resume=lab.resume, console=console)
        lrs = {name: pick_lr([(lr, r.summary) for lr, r in runs], spec.train.lr) for name, runs in tuning.items()}
        specs = [variant_spec(spec, v, **{"train.lr": lrs[v.name], "train.min_lr": lrs[v.name] / 10})
                 for v in variants]
    by_seed: dict[int, list[RunResult]] = {}
    t = spec.train
    for seed in seed_list:
        seed_out = out / f"seed{seed}" if seeds is not None else out
        seed_specs = specs if seeds is None else [s.with_overrides({"train.seed": seed}) for s in specs]
        for k, (variant, vspec) in enumerate(zip(variants, seed_specs), 1):
            tag = f", seed {seed}" if seeds is not None else ""
            console.print(f"[bold]({k}/{len(variants)}) {variant.name}[/bold] — {spec.model.preset}, "
                          f"{t.steps} steps × {t.batch_size} × {spec.data.seq_len} tokens{tag}")
            by_seed.setdefault(seed, []).append(
                run_variant(vspec, seed_out / variant.name, data, resume=lab.resume, console=console))
    results = by_seed[seed_list[0]]
    t_train = time.perf_counter() - t_start - t_data
    spread = None
    if seeds is not None:
        spread = {v.name: [by_seed[s][i].summary for s in seed_list] for i, v in enumerate(variants)}
    write_report(spec, lab, results, data.describe(), {"data_s": t_data, "train_s": t_train}, command, tuning,
                 seeds=seed_list if seeds is not None else None, spread=spread)
    print_table(results, console)
    if spread is not None:
        console.print(f"spread over seeds {', '.join(map(str, seed_list))} (mean ± sd [min, max]):", markup=False)
        console.print(seed_table(seed_stats(spread), _baseline(spread)), markup=False)
        console.print(SPREAD_RULE, markup=False)
    console.print(f"report: {out / 'report.html'}  (total {time.perf_counter() - t_start:.0f} s)")
    return results


def _baseline(spread: Mapping[str, Any]) -> str | None:
    """The comparison's baseline: swiglu+rmsnorm when it ran, else the first variant."""
    return "swiglu+rmsnorm" if "swiglu+rmsnorm" in spread else next(iter(spread), None)


# ---------------------------------------------------------------------------------------------
# output: table, findings, report
# ---------------------------------------------------------------------------------------------

TABLE_COLUMNS: tuple[tuple[str, str, str], ...] = (
    # (summary field, header, format)
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


def table_rows(results: Sequence[RunResult]) -> list[list[str]]:
    return [[r.name] + [fmt(getattr(r.summary, k), f) for k, _, f in TABLE_COLUMNS] + [status(r.summary)]
            for r in results]


def print_table(results: Sequence[RunResult], console: Any) -> None:
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
    return a / b if math.isfinite(a) and math.isfinite(b) and b != 0 else math.nan


def findings(results: Sequence[RunResult], stats: Mapping[str, Mapping[str, SeedStats]] | None = None,
             curves_seed: int | None = None) -> list[str]:
    """Plain statements comparing the variants with the papers' claims, computed from the numbers.

    With ``stats`` (:func:`~steadylm.lab.seeds.seed_stats` of a run over several seeds) every number
    that has a spread is quoted as its mean over the seeds, and each comparison says whether it
    exceeds that spread (:data:`~steadylm.lab.seeds.SPREAD_RULE`): one seed's difference is not
    a fact about the variant. Numbers without a spread (kurtosis, Pearson r, saturation, spikes)
    are ``curves_seed``'s run's, and say so.
    """
    by: dict[str, RunSummary] = {r.name: r.summary for r in results}
    out: list[str] = []
    base = "swiglu+rmsnorm"
    seeded = stats is not None and base in stats and stats[base]["final_val_loss"].n >= 2
    one_seed = f" (seed {curves_seed})" if seeded and curves_seed is not None else (" (one seed)" if seeded else "")

    def pair(other: str, key: str) -> tuple[float, float, str]:
        """The other variant's and the baseline's number, and how to read their difference."""
        if not seeded or stats is None or other not in stats:
            return getattr(by[other], key), getattr(by[base], key), ""
        o_s, b_s = stats[other][key], stats[base][key]
        where = "beyond" if exceeds_spread(o_s, b_s) else "within"
        return o_s.mean, b_s.mean, f", means over {b_s.n} seeds, {where} the seed spread"

    if base in by:
        for other in ("powlu+rmsnorm", "swiglu_clip+rmsnorm"):
            if other in by:
                o_max, b_max, spread = pair(other, "down_in_amax_last")
                r = _ratio(b_max, o_max)
                rk = _ratio(by[base].down_in_kurtosis_last, by[other].down_in_kurtosis_last)
                if math.isfinite(r):
                    verdict = "smaller" if r > 1 else "not smaller"
                    out.append(
                        f"**{other}** vs {base}: max |FFN down-projection input| {o_max:.3g} "
                        f"vs {b_max:.3g} ({r:.2f}× — {verdict}{spread}); kurtosis ratio "
                        f"{rk:.2f}×{one_seed}. The PowLU paper reports far smaller FFN outliers than SwiGLU "
                        "at scale (Fig. 2); at this scale outliers have had little time to grow."
                    )
        for other in ("swiglu+bhyt", "swiglu+dyt"):
            if other in by:
                o_var, b_var, spread = pair(other, "last_layer_hidden_var")
                r = _ratio(b_var, o_var)
                if math.isfinite(r) and r > 0:
                    norm = by[other].norm
                    rel = (f"RMSNorm's is {r:.3g}× the {norm} one" if r >= 1
                           else f"the {norm} one is {1 / r:.3g}× RMSNorm's — larger, not smaller")
                    out.append(
                        f"**{other}** vs {base}: last-layer hidden-state variance "
                        f"{o_var:.3g} vs {b_var:.3g} ({rel}{spread}). The BHyT paper reports RMSNorm's "
                        "~25× BHyT's at 1B parameters."
                    )
        for other in by:
            if other == base:
                continue
            o_loss, b_loss, spread = pair(other, "final_val_loss")
            d = o_loss - b_loss
            if math.isfinite(d):
                out.append(f"{other}: final validation loss {o_loss:.3f} ({d:+.3f} vs {base}{spread}).")
    for n, s in by.items():
        if math.isfinite(s.bhyt_pearson_r_min):
            verdict = "reproduces" if s.bhyt_pearson_r_min > 0.99 else "does not reach"
            out.append(
                f"**{n}**{one_seed}: Pearson r between the approximated and the true second-site variance "
                f"over the tokens of a layer (last probe, worst layer) = {s.bhyt_pearson_r_min:.4f} — "
                f"{verdict} the paper's r > 0.99; over the per-layer means of all probed steps r = "
                f"{s.bhyt_pearson_r_layer_means:.4f}."
            )
    for n, s in by.items():
        if math.isfinite(s.tanh_saturation_max):
            out.append(f"**{n}**{one_seed}: worst tanh saturation (|tanh| > 0.95) at the last probe = "
                       f"{s.tanh_saturation_max:.4f} ({s.tanh_saturation_worst_site}); the BHyT paper "
                       "expects ≈ 0 for BHyT.")
    for n, s in by.items():
        if s.spikes:
            out.append(f"**{n}**{one_seed}: {s.spikes} loss spike(s) at step(s) {s.spike_steps}.")
        if s.divergence or s.dead:
            out.append(f"**{n}**{one_seed}: {status(s)}.")
    return out


def _overhead_text(results: Sequence[RunResult], spec: RunSpec) -> str:
    probe_every = spec.train.probe_every
    tokens_per_step = spec.train.batch_size * spec.data.seq_len
    lines = []
    for r in results:
        ov = r.summary.probe_overhead_ms_mean
        # every step is logged (log_every = 1), so a row's tokens/s is that step's own rate
        times_p, times_n = [], []
        for x in r.rows:
            tps = K.num(x.get(K.TOKENS_PER_S))
            if math.isfinite(tps) and tps > 0:
                (times_p if K.PROBE_OVERHEAD in x else times_n).append(tokens_per_step / tps)
        times_p.sort()
        times_n.sort()
        if times_p and times_n:
            med_p, med_n = times_p[len(times_p) // 2], times_n[len(times_n) // 2]
            extra = med_p - med_n
            lines.append([r.name, f"{ov:.1f}", f"{1000 * med_p:.1f}", f"{1000 * med_n:.1f}",
                          f"{100 * extra / med_n:+.1f}%", f"{100 * extra / med_n / probe_every:+.2f}%"])
        else:
            lines.append([r.name, fmt(ov, "{:.1f}"), "–", "–", "–", "–"])
    return markdown_table(
        ["variant", "probe's own time (ms/sampled step)", "median step, sampled (ms)",
         "median step, not sampled (ms)", "sampled-step overhead", f"amortised (every {probe_every})"],
        lines,
    )


def _moe_table(results: Sequence[RunResult]) -> str:
    """Per variant and MoE layer: max / min expert load and its CV at the last probe ('' if dense)."""
    lines = []
    for r in results:
        row = next((x for x in reversed(r.rows) if K.has_family(x, K.MOE)), None)
        if row is None:
            continue
        cols = {stat: K.layer_values(row, K.MOE, stat) for stat in ("load_max", "load_min", "load_cv")}
        for i in sorted(cols["load_max"]):
            lines.append([r.name, str(i)] + [fmt(cols[s].get(i, math.nan), "{:.3f}") for s in cols])
    if not lines:
        return ""
    return markdown_table(["variant", "layer", "max load", "min load", "CV"], lines)


def _fp8_table(results: Sequence[RunResult]) -> str:
    """Per variant and FP8 role: total overflow / underflow, peak amax, worst SNR ('' without FP8)."""
    lines = []
    for r in results:
        for role, c in r.summary.fp8.items():
            lines.append([r.name, role, f"{c['overflow']:,.0f}", f"{c['underflow']:,.0f}",
                          fmt(c["amax_max"], "{:.3g}"), fmt(c["snr_db_min"], "{:.1f}")])
    if not lines:
        return ""
    return markdown_table(["variant", "tensor", "overflow", "underflow", "peak amax", "worst SNR (dB)"], lines)


def write_report(spec: RunSpec, lab: LabOptions, results: Sequence[RunResult], data_info: Mapping[str, Any],
                 timings: Mapping[str, float], command: str = "",
                 tuning: Mapping[str, Sequence[tuple[float, RunResult]]] | None = None, *,
                 seeds: Sequence[int] | None = None,
                 spread: Mapping[str, Sequence[RunSummary]] | None = None) -> dict[str, Any]:
    """Write report.html, summary.md, summary.json and the plots under ``lab.out``; with ``spread``
    (``{variant: [RunSummary per seed]}``) also the spread over ``seeds``."""
    runs = {r.name: r.rows for r in results}
    t = spec.train
    first = results[0].summary if results else None
    tpp = f"{first.tokens_per_param:.3f}" if first else "–"
    tokens_note = (f"tokens/param = {tpp} ({first.tokens_seen:,} training tokens per variant, "
                   f"{first.params_active:,} parameters)" if first else "")
    overrides = spec.model.overrides
    intro = "\n".join([
        f"Command: `{command or 'steadylm compare'}`",
        "",
        markdown_table(["setting", "value"], [
            ["model preset", spec.model.preset + (f" with {overrides}" if overrides else "")],
            ["parameters (total / active)", f"{first.params_total:,} / {first.params_active:,}" if first else "–"],
            ["corpus", str(data_info.get("source"))],
            ["train / val tokens in the corpus", f"{data_info.get('train_tokens', 0):,} / {data_info.get('val_tokens', 0):,}"],
            ["vocabulary", str(data_info.get("vocab_size"))],
            ["steps × batch × context", f"{t.steps} × {t.batch_size} × {spec.data.seq_len}"],
            ["tokens per variant", f"{first.tokens_seen:,}" if first else "–"],
            ["**tokens per parameter**", tpp],
            ["precision / seed / peak LR", f"{t.precision} / "
             + (f"{', '.join(map(str, seeds))} (curves: seed {t.seed})" if seeds else f"{t.seed}") + " / "
             + (", ".join(f"{r.name} {r.summary.lr:g}" for r in results) + " (tuned)" if tuning else f"{t.lr:g}")],
            ["op implementation", str(spec.model.impl)],
            ["probes sampled every", f"{t.probe_every} steps"],
            ["loss-spike detector", f"rolling z-score over the preceding {spec.probes.spike_window} steps > "
                                    f"{spec.probes.spike_threshold:g}"],
            ["divergence", DIVERGENCE_RULE],
            ["dead", "vanishing gradients (a layer's gate/up gradients all below 1e-12, or a global "
                     "gradient norm below 1e-8) or a saturated tanh site (> 50 % of |tanh| > 0.95)"],
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

    def note(fig: Any) -> Any:
        if tokens_note:
            fig.supxlabel(tokens_note, fontsize=9, color="#444")
        return fig

    stats = seed_stats(spread) if spread else None
    report.add_section(
        "Summary",
        (f"Seed {t.seed}'s runs; the means over seeds, and whether each difference exceeds the seed "
         "spread, are in the findings below and in *Spread over seeds*.\n\n" if stats is not None else "")
        + markdown_table(["variant"] + [h for _, h, _ in TABLE_COLUMNS] + ["status"], table_rows(results))
        + "\n\n" + "\n".join(f"- {f}" for f in findings(results, stats, t.seed)),
    )
    if stats is not None:
        report.add_section(
            "Spread over seeds",
            f"Every variant trained with seeds {', '.join(map(str, seeds or []))} (initialisation and "
            "batch order); each number as mean ± sample standard deviation [min, max] over seeds, and "
            f"its difference from {_baseline(stats)}'s mean. {SPREAD_RULE} The curves below are seed "
            f"{t.seed}'s. Single-seed numbers also differ across CPUs (vector width, BLAS) in the last "
            "bits, which training at this learning rate amplifies; read differences next to this spread.\n\n"
            + seed_table(stats, _baseline(stats)))
    report.add_section(
        "Activation functions",
        "The gates and the scalar forms of the activations compared here, with their derivatives "
        "(the PowLU paper's Fig. 1), computed with `steadylm.functional` and autograd.",
        [("activations", plots.plot_activation_functions(), "Activations and derivatives")],
    )
    if tuning:
        chosen = {r.name: r.summary.lr for r in results}
        rows = [[name, f"{lr:g}", fmt(r.summary.final_val_loss, "{:.4f}"), status(r.summary),
                 "**chosen**" if chosen.get(name) == lr else ""]
                for name, runs in tuning.items() for lr, r in runs]
        report.add_section(
            "Learning-rate tuning",
            "Each variant trained for a third of the steps at every LR of the grid; the comparison uses "
            "the LR with the lowest validation loss among runs that neither diverged nor died.\n\n"
            + markdown_table(["variant", "peak LR", "val loss", "status", ""], rows))
    spikes = {r.name: r.summary.spike_steps for r in results}
    report.add_section(
        "Loss",
        f"Train loss every step, validation loss every {t.eval_every} steps, and the global gradient "
        f"norm before clipping (clipped at {t.grad_clip:g}). Red × marks a loss spike: a step whose "
        f"loss is more than {spec.probes.spike_threshold:g} standard deviations above the mean of the "
        f"preceding {spec.probes.spike_window} steps. {tokens_note}.",
        [("loss", note(plots.plot_losses(runs, spikes, K.LOSS, K.VAL_LOSS)), "Train and validation loss")],
    )
    down_rows = [[r.name] + [fmt(getattr(r.summary, k), "{:.3g}") for k in
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
        [("bhyt_variance", note(plots.plot_bhyt_variance(runs, {r.name: r.samples for r in results if r.samples})),
          "Approximated vs true second-site variance")],
    )
    report.add_section(
        "tanh saturation",
        "Fraction of tanh outputs with |tanh| > 0.95 at the DyT / BHyT sites (worst site per probe), "
        "and the learnable scales λ (BHyT) and α (DyT).",
        [("tanh_saturation", note(plots.plot_saturation(runs)), "tanh saturation and λ/α")],
    )
    report.add_section(
        "Throughput and probe overhead",
        "Training tokens per second (probe steps included). The probes only register hooks on "
        "sampled steps; their cost is measured two ways: the time the probe itself spends (hooks "
        "and reductions), and the median step time of sampled against not-sampled steps.\n\n"
        + _overhead_text(results, spec),
        [("throughput", note(plots.plot_throughput({r.name: r.summary.tokens_per_s for r in results})),
          "Tokens per second")],
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
        "command": command,
        "spec": spec.to_dict(),
        "lab": lab,
        "variants_run": [r.name for r in results],
        "data": dict(data_info),
        "timings_s": dict(timings),
        "variants": [r.summary for r in results],
    }
    if stats is not None:
        summary["seeds"] = {"seeds": list(seeds or []), "rule": SPREAD_RULE,
                            "variants": {n: {k: v.to_dict() for k, v in per.items()} for n, per in stats.items()}}
    if tuning:
        summary["tuning"] = {n: [{"lr": lr, "summary": r.summary} for lr, r in runs] for n, runs in tuning.items()}
    return write_all(report, lab.out, summary)
