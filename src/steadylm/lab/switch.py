"""``steadylm stress switch``: the PowLU paper's Fig. 4 — switch the activation mid-training.

Phase 1 trains ``--from`` (SwiGLU) to ``--switch-step`` and checkpoints (``OUT/phase1-<from>/``).
Each branch is a fork of that checkpoint (:func:`steadylm.train.fork.fork_run`) with its own
activation — same weights, optimizer moments, step, LR schedule and batch order — trained to the
end: ``OUT/stay-<from>/`` (the control) and ``OUT/switch-<to>/`` per ``--to`` activation.
Reported: the loss jump at the switch, recovery steps, the gap to the control, spikes, FFN
outliers and FP8 overflows after the switch.
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steadylm.config_fields import spec_field
from steadylm.errors import ConfigError, DivergenceError
from steadylm.lab import plots
from steadylm.lab.options import LabOptions, Variant, add_lab_arguments, command_line, lab_options, options_from_args
from steadylm.lab.report import Report, fmt, markdown_table, write_all
from steadylm.lab.runner import RunResult, load_data, run_variant, variant_spec
from steadylm.lab.stress import StressOptions, intro, stress_options, stress_spec
from steadylm.lab.summary import status
from steadylm.probes import detect_spikes
from steadylm.probes import keys as K
from steadylm.train.fork import fork_run

__all__ = ["SwitchOptions", "add_arguments", "run", "switch_metrics"]

DEFAULT_OUT = "runs/stress-switch"


@dataclass
class SwitchOptions:
    """The switch protocol's own options."""

    switch_step: int | None = spec_field(None, help="step at which to switch (default: 40%% of the steps)",
                                         flag="--switch-step")
    to: list[str] = spec_field(default_factory=lambda: ["powlu", "swiglu_clip"],
                               help="activations to switch to (the control stays on --from)", flag="--to")
    from_activation: str = spec_field("swiglu", help="activation before the switch", flag="--from")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_lab_arguments(parser, StressOptions, SwitchOptions, out=DEFAULT_OUT)


def switch_metrics(rows: Sequence[Mapping[str, Any]], control: Sequence[Mapping[str, Any]], k: int,
                   window: int, threshold: float, smooth: int = 5) -> dict[str, Any]:
    """Post-switch numbers of one branch against the control (the branch that kept the activation).

    - ``jump``: mean loss of the ``smooth`` steps after the switch minus the mean of the ``smooth``
      steps before it (the immediate cost of changing the function);
    - ``recovery_steps``: steps after the switch until the ``smooth``-step running mean of the loss
      is back at or below its pre-switch mean; None if it never is;
    - ``loss_gap``: mean loss of the last 10 steps minus the control's (negative: better than
      staying); ``spikes_after``: spikes at steps > k; ``nonfinite_after``: a NaN/inf loss after k.
    """

    def losses(rs: Sequence[Mapping[str, Any]]) -> list[tuple[int, float]]:
        return [(int(r[K.STEP]), K.num(r[K.LOSS])) for r in rs if K.LOSS in r]

    series = losses(rows)
    before = [v for s, v in series if k - smooth < s <= k]
    after = [(s, v) for s, v in series if s > k]
    pre = statistics.fmean(before) if before else math.nan
    jump = statistics.fmean(v for _, v in after[:smooth]) - pre if after else math.nan
    recovery = None
    for i in range(len(after)):
        chunk = [v for _, v in after[max(0, i - smooth + 1): i + 1]]
        if i + 1 >= smooth and all(math.isfinite(v) for v in chunk) and statistics.fmean(chunk) <= pre:
            recovery = after[i][0] - k
            break
    tail = [v for _, v in after[-10:] if math.isfinite(v)]
    ctail = [v for _, v in losses(control)[-10:] if math.isfinite(v)]
    vals = [v for _, v in series]
    sp = detect_spikes(vals, window, threshold) if len(vals) > window else []
    spike_steps = [series[p.index][0] for p in sp]
    return {
        "pre_switch_loss": pre,
        "jump": jump,
        "recovery_steps": recovery,
        "final_loss": statistics.fmean(tail) if tail else math.nan,
        "loss_gap": (statistics.fmean(tail) - statistics.fmean(ctail)) if tail and ctail else math.nan,
        "spikes_after": len([s for s in spike_steps if s > k]),
        "spike_steps_after": [s for s in spike_steps if s > k],
        "nonfinite_after": not all(math.isfinite(v) for _, v in after),
    }


def _after(rows: Sequence[Mapping[str, Any]], k: int) -> list[Mapping[str, Any]]:
    return [r for r in rows if int(r.get(K.STEP, 0)) > k]


def _check(lab: LabOptions, opts: SwitchOptions, steps: int) -> tuple[int, str]:
    if lab.variants or lab.activations:
        raise ConfigError("the switch protocol takes its activations from --from and --to, not "
                          "--variants/--activations")
    if lab.norms and len(lab.norms) != 1:
        raise ConfigError(f"the switch protocol takes one --norms value, got {lab.norms}")
    if not opts.to:
        raise ConfigError("--to must name at least one activation")
    k = opts.switch_step if opts.switch_step is not None else max(1, int(0.4 * steps))
    if k < 1 or k >= steps:
        raise ConfigError(f"--switch-step must be in [1, steps={steps}), got {k}")
    return k, (lab.norms[0] if lab.norms else "rmsnorm")


def run(args: argparse.Namespace) -> int:
    from steadylm.lab.options import resolve_variants

    lab = lab_options(args, out=DEFAULT_OUT)
    opts = options_from_args(args, SwitchOptions)
    stress = stress_options(args)
    spec = stress_spec(args, lab, stress)
    k, norm = _check(lab, opts, spec.train.steps)
    acts = [opts.from_activation, *opts.to]
    resolve_variants(LabOptions(activations=acts, norms=[norm]), [(acts[0], norm)])  # registry check
    specs = {a: variant_spec(spec, Variant(a, norm)) for a in acts}
    data = load_data(spec)
    out = Path(lab.out)
    phase1 = out / f"phase1-{opts.from_activation}"
    print(f"switch: phase 1, {opts.from_activation} to step {k} ({spec.train.precision})", flush=True)
    first = run_variant(specs[opts.from_activation], phase1, data, resume=lab.resume, stop_after=k)
    if first.summary.diverged:
        raise DivergenceError(f"{opts.from_activation} diverged before the switch step {k} "
                              f"({status(first.summary)}); choose an earlier --switch-step or a milder setting")
    branches: dict[str, RunResult] = {}
    for target in acts:
        stay = target == opts.from_activation
        name = f"stay {target}" if stay else f"switch to {target}"
        run_dir = out / (f"stay-{target}" if stay else f"switch-{target}")
        if not (lab.resume and (run_dir / "checkpoint").is_dir()):
            fork_run(phase1, run_dir, model_config=specs[target].model_config(data.vocab_size), step=k)
        print(f"switch: {name} from step {k}", flush=True)
        branches[name] = run_variant(specs[target], run_dir, data, label=name, resume=True)
    control = branches[f"stay {opts.from_activation}"]
    table, metrics = [], {}
    for name, br in branches.items():
        sm = switch_metrics(br.rows, control.rows, k, spec.probes.spike_window, spec.probes.spike_threshold)
        after = _after(br.rows, k)
        sm["status"] = status(br.summary)
        sm["down_in_amax_peak_after"] = max(
            (v for r in after for v in [K.max_over_layers(r, K.DOWN_IN, "amax")] if math.isfinite(v)), default=math.nan)
        sm["fp8_overflow_after"] = math.fsum(K.num(r.get(K.fp8_key("overflow"), 0)) for r in after)
        metrics[name] = {"summary": br.summary, **sm}
        rec = sm["recovery_steps"]
        control_row = name.startswith("stay")
        table.append([name, fmt(sm["jump"], "{:+.3f}"),
                      "–" if control_row else ("not recovered" if rec is None else str(rec)),
                      fmt(sm["final_loss"], "{:.3f}"), "0 (control)" if control_row else fmt(sm["loss_gap"], "{:+.3f}"),
                      str(sm["spikes_after"]), fmt(sm["down_in_amax_peak_after"], "{:.3g}"),
                      fmt(sm["fp8_overflow_after"], "{:.0f}"), sm["status"]])
    report = Report("steadylm stress switch", intro(
        "switch", spec, stress, acts, data.describe(), command_line(), [
            ["switch", f"{opts.from_activation} for steps 1–{k}, then each branch from the step-{k} checkpoint"],
            ["branches", ", ".join(branches)]]))
    report.add_section(
        "Summary",
        "The PowLU paper's Fig. 4 protocol: the activation is swapped at the switch step, keeping "
        "weights, optimizer moments, LR schedule and data order; the control continues unchanged. "
        "*Jump*: mean loss of the 5 steps after the switch minus that of the 5 steps before. "
        "*Recovery*: steps until the 5-step running mean is back at the pre-switch level. "
        "*Gap*: final loss (last 10 steps) minus the control's; negative is better than staying.\n\n"
        + markdown_table(["branch", "jump", "recovery steps", "final loss", "gap vs control",
                          "spikes after switch", "peak max |down-in| after", "FP8 overflows after", "status"], table),
    )
    runs = {n: b.rows for n, b in branches.items()}
    spikes = {n: metrics[n]["spike_steps_after"] for n in branches}
    zoom = {n: [r for r in b.rows if int(r.get(K.STEP, 0)) >= k - 10] for n, b in branches.items()}
    report.add_section(
        "Loss",
        "Train loss of every branch (left: whole run; right: from 10 steps before the switch). "
        "Red × = spike after the switch.",
        [("switch_losses", plots.plot_loss_grid({"all branches": runs, "around the switch": zoom},
                                                {"all branches": spikes, "around the switch": spikes}, vline=k),
          "Train loss around the activation switch")],
    )
    report.add_section(
        "FFN down-projection input after the switch",
        "Per layer, min–max and P1–P99 of the FFN down-projection input at the last probe of each branch.",
        [("switch_down_proj", plots.plot_down_proj_bands(runs), "FFN down-projection input per branch")],
    )
    if spec.train.precision == "fp8":
        report.add_section("FP8 counters", "Per branch, over the whole run (phase 1 included).",
                           [("switch_fp8", plots.plot_fp8_counters(runs), "FP8 counters per branch")])
    summary = {"command": command_line(), "protocol": "switch", "spec": spec.to_dict(), "lab": lab,
               "stress": stress, "switch": opts, "switch_step": k, "branches": metrics}
    paths = write_all(report, lab.out, summary)
    print(f"report: {paths['report.html']}")
    return 0

