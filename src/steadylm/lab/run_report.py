"""``steadylm report RUN_DIR [RUN_DIR ...] --out DIR``: the lab's report for any training runs.

::

    steadylm report runs/a runs/b --out reports/ab      # report.html, summary.md, summary.json, plots/

Any run directory that ``steadylm train`` (or a lab protocol, per variant) writes: its
``config.json`` (the run spec) and ``metrics.jsonl``. The runs are shown side by side: a summary
table, loss / validation / gradient-norm curves with detected spikes, the stability probes over
steps (FFN down-projection outliers, hidden-state variance, tanh saturation, BHyT's variance
estimate, gate gradients), FP8 counters when a run has them, and throughput. A run that is still going is read as
it is (a line being written is skipped), so the report can be re-made while training; every file
is written atomically, so a reader never sees half a report.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steadylm.errors import ConfigError

__all__ = ["RunRecord", "add_arguments", "build_report", "read_run", "run", "write_run_report"]


@dataclass
class RunRecord:
    """One run directory as read now: its name in the report, spec and metric rows."""

    name: str
    path: Path
    spec: dict[str, Any]  # config.json's run_spec (empty for a run without one)
    model: dict[str, Any]  # config.json's model config
    rows: list[dict[str, Any]]

    @property
    def total_steps(self) -> int | None:
        steps = (self.spec.get("train") or {}).get("steps")
        return int(steps) if isinstance(steps, int) else None

    @property
    def last_step(self) -> int:
        return max((int(r["step"]) for r in self.rows if isinstance(r.get("step"), int)), default=0)

    @property
    def in_progress(self) -> bool:
        return self.total_steps is not None and self.last_step < self.total_steps and not any(
            r.get("diverged") for r in self.rows)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="run directories (steadylm train --out, or one variant of a lab run); "
                        "a run still training is read as far as it got")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="report directory: report.html, summary.md, summary.json, plots/")


def read_run(path: str | Path, name: str) -> RunRecord:
    """The run in ``path`` as it is now (``metrics.jsonl`` may be growing; a torn last line is skipped)."""
    from steadylm.train.metrics import read_metrics

    directory = Path(path).expanduser()
    config_json, metrics = directory / "config.json", directory / "metrics.jsonl"
    if not directory.is_dir():
        raise ConfigError(f"RUN_DIR {directory} is not a directory")
    if not config_json.is_file() and not metrics.is_file():
        raise ConfigError(f"RUN_DIR {directory} has neither config.json nor metrics.jsonl: not a training run")
    configs: dict[str, Any] = {}
    if config_json.is_file():
        try:
            loaded = json.loads(config_json.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ConfigError(f"cannot read {config_json}: {err}") from None
        configs = loaded if isinstance(loaded, dict) else {}
    spec = configs.get("run_spec") if isinstance(configs.get("run_spec"), dict) else {}
    model = configs.get("model") if isinstance(configs.get("model"), dict) else {}
    rows = [r for r in read_metrics(metrics) if isinstance(r, dict)]
    return RunRecord(name, directory, spec, model, rows)


def _names(paths: Sequence[Path]) -> list[str]:
    """Short unique names: the directory name, with parents added while two runs share it."""
    depth = 1
    while True:
        names = ["/".join(p.resolve().parts[-depth:]) for p in paths]
        if len(set(names)) == len(names) or depth > 8:
            return names
        depth += 1


# ------------------------------------------------------------------------------------------------
# figures this report adds to the lab's (the lab's are per-layer snapshots; these follow steps)
# ------------------------------------------------------------------------------------------------


def plot_stability_over_steps(runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> Any:
    """Per run over steps: max over layers of the FFN down-projection input's max |x| and kurtosis,
    the worst tanh saturation, and the last layer's hidden-state variance (probed steps)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    from steadylm.lab import plots
    from steadylm.probes import keys as K

    fig = Figure(figsize=(12, 11), layout="constrained")
    axes = fig.subplots(3, 2).ravel()
    panels = [
        ("FFN down-projection input: max |x| (max over layers)", "max |x|",
         lambda r: K.max_over_layers(r, K.DOWN_IN, "amax") if K.has_family(r, K.DOWN_IN) else math.nan),
        ("FFN down-projection input: kurtosis (max over layers)", "kurtosis",
         lambda r: K.max_over_layers(r, K.DOWN_IN, "kurtosis") if K.has_family(r, K.DOWN_IN) else math.nan),
        ("tanh saturation (worst site)", "fraction |tanh| > 0.95",
         lambda r: max((K.num(v) for k, v in r.items() if k.startswith(K.SAT + "/")), default=math.nan)),
        ("last layer's hidden-state variance", "mean per-token variance", None),
        ("BHyT: Pearson r of v' and the true mean(h²) (min over layers)", "Pearson r over tokens",
         lambda r: min(K.layer_values(r, K.BHYT, "pearson_r").values(), default=math.nan)),
        ("FFN gate gradient: max |∂L/∂gate| (max over layers)", "max |∂L/∂gate|",
         lambda r: K.max_over_layers(r, K.GRAD_GATE, "amax") if K.has_family(r, K.GRAD_GATE) else math.nan),
    ]
    any_data = [False] * len(panels)
    for (name, rows), color in zip(runs.items(), plots._colors(len(runs))):
        n_hidden = K.layer_count(rows, K.HIDDEN)
        for i, (_, _, value) in enumerate(panels):
            if value is None:
                if not n_hidden:
                    continue
                steps, values = plots.series(rows, K.layer_key(K.HIDDEN, n_hidden - 1, "var"))
            else:
                pairs = [(r["step"], value(r)) for r in rows if "step" in r]
                pairs = [(s, v) for s, v in pairs if math.isfinite(v)]
                steps, values = [s for s, _ in pairs], [v for _, v in pairs]
            if len(steps):
                axes[i].plot(steps, values, color=color, marker=".", lw=1.1, label=name)
                any_data[i] = True
    for ax, (title, ylabel, _), has in zip(axes, panels, any_data):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        if has:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        else:
            plots._no_data(ax, "no probe samples (train with --probes)")
    return fig


def plot_throughput_over_steps(runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> Any:
    """Training tokens/s of every logged row (tokens over compute time since the previous row)."""
    from matplotlib.figure import Figure

    from steadylm.lab import plots
    from steadylm.probes import keys as K

    fig = Figure(figsize=(10, 4), layout="constrained")
    ax = fig.subplots()
    for (name, rows), color in zip(runs.items(), plots._colors(len(runs))):
        steps, values = plots.series(rows, K.TOKENS_PER_S)
        if len(steps):
            ax.plot(steps, values, color=color, lw=1.0, label=name)
    ax.set_title("training throughput per logged row (probe steps included)", fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel("tokens / s")
    if ax.lines:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    else:
        plots._no_data(ax)
    return fig


# ------------------------------------------------------------------------------------------------
# the report
# ------------------------------------------------------------------------------------------------


def _summary(record: RunRecord) -> Any:
    from steadylm.lab.summary import summarize
    from steadylm.probes import keys as K

    probes = record.spec.get("probes") or {}
    train = record.spec.get("train") or {}
    data = record.spec.get("data") or {}
    seq = data.get("seq_len") or record.model.get("max_seq_len") or 0
    tokens_seen = max((int(K.num(r[K.TOKENS_SEEN])) for r in record.rows
                       if math.isfinite(K.num(r.get(K.TOKENS_SEEN)))), default=0)
    rates = [K.num(r[K.TOKENS_PER_S]) for r in record.rows if K.num(r.get(K.TOKENS_PER_S)) > 0]
    stopped = next(((int(r["step"]), "non-finite loss or gradient norm") for r in record.rows if r.get(K.DIVERGED)),
                   None)
    return summarize(
        record.rows, variant=record.name, activation=str(record.model.get("activation", "?")),
        norm=str(record.model.get("norm", "?")), spike_window=int(probes.get("spike_window", 20)),
        spike_threshold=float(probes.get("spike_threshold", 4.0)), stopped=stopped,
        tokens_per_step=int(train.get("batch_size", 0)) * int(seq), tokens_seen=tokens_seen,
        tokens_per_s=statistics.median(rates) if rates else math.nan,
        lr=float(train.get("lr", math.nan)), precision=str(train.get("precision", "")),
    )


def build_report(records: Sequence[RunRecord]) -> tuple[Any, dict[str, Any]]:
    """The :class:`~steadylm.lab.report.Report` of ``records`` and its ``summary.json`` content."""
    from steadylm.lab import plots
    from steadylm.lab.report import Report, fmt, markdown_table
    from steadylm.lab.summary import status
    from steadylm.probes import keys as K

    summaries = {r.name: _summary(r) for r in records}
    runs = {r.name: r.rows for r in records}
    rows = []
    for r in records:
        s = summaries[r.name]
        progress = f"{r.last_step} / {r.total_steps}" if r.total_steps else str(r.last_step)
        state = ("in progress" if r.in_progress and not s.divergence else status(s)) if r.rows else "no metrics yet"
        rows.append([r.name, f"{s.activation}+{s.norm}", str((r.spec.get("train") or {}).get("precision", "–")),
                     progress, fmt(s.final_train_loss, "{:.4f}"), fmt(s.final_val_loss, "{:.4f}"), str(s.spikes),
                     fmt(s.down_in_amax_last, "{:.3g}"), fmt(s.tanh_saturation_max, "{:.3f}"),
                     fmt(s.tokens_per_s, "{:,.0f}"), state])
    intro = ("Runs: " + ", ".join(f"`{r.path}`" for r in records) + ". Each is read as it is now: a run "
             "still training shows the steps it has logged (re-run the command to refresh). Train loss is "
             "the mean of the last 10 logged steps; throughput the median of the logged rows.")
    report = Report("steadylm report", intro)
    report.add_section("Summary", markdown_table(
        ["run", "variant", "precision", "step", "train loss", "val loss", "spikes", "max |x| FFN down-in (last)",
         "tanh saturation (max)", "tokens/s", "status"], rows))
    spikes = {name: s.spike_steps for name, s in summaries.items()}
    report.add_section(
        "Loss", "Train loss per logged step (red ×: a detected loss spike), validation loss at evaluation "
        "steps, and the global gradient norm before clipping.",
        [("loss", plots.plot_losses(runs, spikes, K.LOSS, K.VAL_LOSS), "Train and validation loss")])
    report.add_section(
        "Stability probes over steps", "The stability statistics of every probed step (`--probes`; sampled "
        "every `train.probe_every` steps): FFN down-projection outliers, tanh saturation, the last "
        "layer's hidden-state variance, BHyT's second-site variance estimate (v' = v + c_ℓ·λ₁²/κ² against "
        "the true mean(h²); the paper reports r > 0.99) and the largest gate gradient.",
        [("stability_over_steps", plot_stability_over_steps(runs), "Stability statistics over training")])
    if any(K.has_family(row, K.DOWN_IN) for rows_ in runs.values() for row in rows_):
        report.add_section(
            "FFN down-projection input per layer", "Range and P1–P99 band per layer at the last probed step.",
            [("down_proj_bands", plots.plot_down_proj_bands(runs), "FFN down-projection input per layer")])
        report.add_section(
            "Hidden states", "Per-layer variance and L2 norm of the residual stream (last probed step) and the "
            "last layer over training.",
            [("hidden_states", plots.plot_hidden_states(runs), "Hidden-state variance and norm")])
    if any(K.has_family(row, K.SAT) for rows_ in runs.values() for row in rows_):
        report.add_section("tanh saturation", "Saturation at the DyT / BHyT sites and the scales λ / α.",
                           [("tanh_saturation", plots.plot_saturation(runs), "tanh saturation and λ/α")])
    fp8_runs = {name: rows_ for name, rows_ in runs.items()
                if any(K.parse_fp8_key(k) is not None for row in rows_ for k in row)}
    if fp8_runs:
        report.add_section("FP8 counters", "Quantisation SNR and overflow / underflow fractions per tensor "
                           "role (steadylm's FP8 backend with probes).",
                           [("fp8_counters", plots.plot_fp8_counters(fp8_runs), "FP8 counters")])
    report.add_section(
        "Throughput", "Median training tokens/s per run and tokens/s of every logged row.",
        [("throughput", plots.plot_throughput({n: s.tokens_per_s if math.isfinite(s.tokens_per_s) else 0.0
                                                for n, s in summaries.items()}), "Tokens per second"),
         ("throughput_over_steps", plot_throughput_over_steps(runs), "Tokens per second over steps")])
    summary = {"runs": {r.name: {"path": str(r.path), "last_step": r.last_step, "total_steps": r.total_steps,
                                 "in_progress": r.in_progress, "summary": summaries[r.name].to_dict()}
                        for r in records}}
    return report, summary


def write_run_report(run_dirs: Sequence[str | Path], out: str | Path) -> dict[str, Path]:
    """Read ``run_dirs`` and write their report under ``out`` (every file atomically)."""
    from steadylm.lab.report import write_all

    paths = [Path(p).expanduser() for p in run_dirs]
    records = [read_run(p, name) for p, name in zip(paths, _names(paths))]
    report, summary = build_report(records)
    return write_all(report, out, summary)


def run(args: argparse.Namespace) -> int:
    paths = write_run_report(args.run_dirs, args.out)
    print(f"{paths['report.html']}: {len(args.run_dirs)} run{'s' if len(args.run_dirs) > 1 else ''}")
    return 0
