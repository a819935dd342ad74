"""``steadylm stress lr-sweep``: every variant at several multiples of the base LR.

Runs go to ``OUT/x<multiplier>/<variant>/``; the report has divergences, loss spikes, transient
excursions and the final loss per LR, and an LR-sensitivity figure per variant. The peak LR of a
run is ``train.lr × multiplier`` and its final LR ``train.min_lr × multiplier``.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any

from steadylm.config_fields import spec_field
from steadylm.errors import ConfigError
from steadylm.lab import plots
from steadylm.lab.options import add_lab_arguments, command_line, lab_options, options_from_args, resolve_variants
from steadylm.lab.report import Report, fmt, markdown_table, write_all
from steadylm.lab.runner import RunResult, load_data, run_variant, variant_spec
from steadylm.lab.stress import DEFAULT_VARIANTS, StressOptions, intro, stress_options, stress_spec
from steadylm.lab.summary import status

__all__ = ["SweepOptions", "add_arguments", "run"]

DEFAULT_OUT = "runs/stress-lr-sweep"


@dataclass
class SweepOptions:
    """The LR sweep's own option."""

    multipliers: list[float] = spec_field(default_factory=lambda: [1.0, 2.0, 4.0, 8.0, 16.0],
                                          help="LR multipliers", flag="--multipliers")

    def validate(self) -> None:
        if not self.multipliers or any(not (m > 0 and math.isfinite(m)) for m in self.multipliers):
            raise ConfigError(f"--multipliers must be positive numbers, got {self.multipliers}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_lab_arguments(parser, StressOptions, SweepOptions, out=DEFAULT_OUT)


def run(args: argparse.Namespace) -> int:
    lab = lab_options(args, out=DEFAULT_OUT)
    sweep = options_from_args(args, SweepOptions)
    sweep.validate()
    stress = stress_options(args)
    spec = stress_spec(args, lab, stress)
    variants = resolve_variants(lab, DEFAULT_VARIANTS)
    specs = {(v.name, m): variant_spec(spec, v, **{"train.lr": spec.train.lr * m,
                                                   "train.min_lr": spec.train.min_lr * m})
             for m in sweep.multipliers for v in variants}
    data = load_data(spec)
    results: dict[str, dict[float, RunResult]] = {v.name: {} for v in variants}
    for m in sweep.multipliers:
        for v in variants:
            s = specs[(v.name, m)]
            print(f"lr-sweep: {v.name} at {m:g}× (lr {s.train.lr:g}, {s.train.precision})", flush=True)
            results[v.name][m] = run_variant(s, f"{lab.out}/x{m:g}/{v.name}", data, label=v.name,
                                             resume=lab.resume)
    base_lr = spec.train.lr
    table, totals = [], []
    for name, by_m in results.items():
        for m, r in by_m.items():
            s = r.summary
            table.append([name, f"{m:g}× ({base_lr * m:g})", fmt(s.final_train_loss, "{:.3f}"),
                          fmt(s.final_val_loss, "{:.3f}"), str(s.spikes), fmt(s.peak_above_start, "{:.2f}"),
                          fmt(s.down_in_amax_peak, "{:.3g}"), status(s)])
        ok = [base_lr * m for m, r in by_m.items() if not r.summary.diverged]
        totals.append([name, str(sum(r.summary.diverged for r in by_m.values())),
                       str(sum(r.summary.spikes for r in by_m.values())),
                       str(sum(1 for r in by_m.values() if r.summary.excursion)),
                       str(sum(1 for r in by_m.values() if r.summary.dead)),
                       fmt(max(ok, default=math.nan), "{:g}")])
    report = Report("steadylm stress lr-sweep", intro(
        "lr-sweep", spec, stress, list(results), data.describe(), command_line(),
        [["LR multipliers", ", ".join(f"{m:g}×" for m in sweep.multipliers)]]))
    report.add_section(
        "Summary",
        markdown_table(["variant", "divergences", "loss spikes (all LRs)", "transient excursions above start",
                        "dead", "largest LR that did not diverge"], totals)
        + "\n\n" + markdown_table(["variant", "LR", "train loss (last 10)", "val loss", "spikes",
                                   "worst loss above start", "peak max |down-in|", "status"], table),
    )
    grid = {name: {m: r.summary.to_dict() for m, r in by_m.items()} for name, by_m in results.items()}
    report.add_section(
        "LR sensitivity",
        "Final train loss against the peak LR for each variant; a diverged run is a red × at the "
        "top of its panel; the label over each point is the number of loss spikes.",
        [("lr_sensitivity", plots.plot_lr_sensitivity(grid, base_lr), "LR sensitivity per variant")],
    )
    rows = {name: {f"{m:g}×": r.rows for m, r in by_m.items()} for name, by_m in results.items()}
    spikes = {name: {f"{m:g}×": r.summary.spike_steps for m, r in by_m.items()} for name, by_m in results.items()}
    report.add_section(
        "Loss curves",
        "Train loss of every run, one panel per variant, one line per LR multiplier; red × = spike.",
        [("lr_sweep_losses", plots.plot_loss_grid(rows, spikes), "Train loss per LR multiplier")],
    )
    summary: dict[str, Any] = {
        "command": command_line(), "protocol": "lr-sweep", "spec": spec.to_dict(), "lab": lab,
        "stress": stress, "multipliers": sweep.multipliers,
        "runs": {name: {f"{m:g}": r.summary for m, r in by_m.items()} for name, by_m in results.items()},
    }
    paths = write_all(report, lab.out, summary)
    print(f"report: {paths['report.html']}")
    return 0

