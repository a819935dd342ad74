"""``steadylm stress``: protocols that push training until it breaks, and a report of how it broke.

Three protocols, each a sub-command writing its runs and a report (``report.html``, ``summary.md``,
``summary.json``, ``plots/``) under ``--out``:

``lr-sweep``
    Every activation at 1×, 2×, 4×, 8×, 16× the base LR (``--multipliers``): divergences, loss
    spikes, final loss, and an LR-sensitivity figure per activation.
``switch``
    The PowLU paper's Fig. 4: train SwiGLU, stop at ``--switch-step`` (checkpoint), then continue
    from that checkpoint — same weights, optimizer moments, LR schedule and batch order — once with
    SwiGLU (the control) and once with each ``--to`` activation (PowLU, SwiGLU-Clip). Reported:
    recovery steps, loss gap to the control, spikes and divergence after the switch.
``fp8``
    Every activation in bf16 and in FP8: spikes, divergence, final loss, FFN down-projection input
    outliers, FP8 counters (overflow, underflow, amax, quantisation SNR per tensor role), step time.

The unstable setting (:data:`STRESS`): by default the protocols train in the most unstable regime we
found for the ``nano`` model — a high peak LR, no gradient clipping, a short warm-up, FP8 with
delayed scaling on the FFN linears, no QK-norm (:data:`STRESS_NOTE` says what it does and does not
produce). ``--stable`` switches to the compare command's setting instead. Every report states the
setting that produced it.

Runs reuse the lab's pieces: :class:`steadylm.train.Trainer` (one run per variant, the same seed and
batches for all), :func:`steadylm.lab.compare.summarize` (final loss, spikes, divergence,
down-projection statistics), :class:`steadylm.lab.report.Report`, the stability probe and
:class:`steadylm.precision.FP8Probe`.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from steadylm.errors import ConfigError, DivergenceError
from steadylm.lab import plots
from steadylm.lab.compare import (
    DEFAULT_IMPL,
    QUICK_IMPL,
    Budget,
    Variant,
    VariantResult,
    _fmt,
    _json_safe,
    _parse_overrides,
    check_spike_detector,
    resolve_preset,
    resolve_variants,
    summarize,
)
from steadylm.lab.report import Report, atomic_write_text, markdown_table
from steadylm.probes.spikes import DEFAULT_DIVERGENCE_MARGIN

PROTOCOLS = ("lr-sweep", "switch", "fp8")
DEFAULT_ACTIVATIONS = ("swiglu", "powlu", "swiglu_clip")
DEFAULT_MULTIPLIERS = (1.0, 2.0, 4.0, 8.0, 16.0)
DEFAULT_SWITCH_TARGETS = ("powlu", "swiglu_clip")


@dataclass(frozen=True)
class Setting:
    """The optimisation regime of a protocol's runs (what makes them stable or not)."""

    name: str
    lr: float  # base / peak LR (the LR sweep multiplies it)
    grad_clip: float  # 0 disables clipping
    warmup_steps: int
    weight_decay: float
    precision: str  # of the switch protocol and the LR sweep; the fp8 protocol runs bf16 and fp8
    fp8_scaling: str
    fp8_scope: str
    qk_norm: bool

    def describe(self) -> str:
        clip = "no gradient clipping" if self.grad_clip == 0 else f"gradient clipping at {self.grad_clip:g}"
        return (f"peak LR {self.lr:g}, {clip}, {self.warmup_steps} warm-up steps, weight decay "
                f"{self.weight_decay:g}, QK-norm {'on' if self.qk_norm else 'off'}, precision "
                f"{self.precision} (FP8: {self.fp8_scaling} scaling, scope {self.fp8_scope})")


#: The unstable regime (measured in BENCHMARKS.md, "FP8 and stress protocols"). High LR and no
#: clipping do most of the work; FP8 with delayed scaling adds quantisation error and saturation
#: when activations grow faster than the amax history.
STRESS = Setting("unstable", lr=2e-2, grad_clip=0.0, warmup_steps=5, weight_decay=0.1,
                 precision="fp8", fp8_scaling="delayed", fp8_scope="ffn", qk_norm=False)
#: What :data:`STRESS` does at the ``nano`` scale (300 steps, seeds 0–2), stated in every report.
STRESS_NOTE = (
    "Measured with the nano model (BENCHMARKS.md): with seed 0, in FP8 this setting gives SwiGLU "
    "one loss spike that bf16 does not — but PowLU and SwiGLU-Clip get one too, at the same batch; at 2× its LR "
    "only SwiGLU climbs back above its starting loss early on; SwiGLU's FFN down-projection inputs "
    "reach the thousands (10^5 at 16× LR) while PowLU's stay ~10× smaller and SwiGLU-Clip's at its "
    "cap of 56. No run diverged, at any LR up to 16×. With seeds 1 and 2 the FP8-only SwiGLU spike "
    "does not recur: SwiGLU spikes in 2 of 3 seeds in each precision, always at the same (or a "
    "nearby) step as another activation of the same seed, i.e. on a hard batch — no setting tried "
    "makes SwiGLU alone spike or diverge (BENCHMARKS.md, \"A setting that makes SwiGLU spike\")."
)
#: The compare command's regime (``--stable``).
STABLE = Setting("stable", lr=3e-3, grad_clip=1.0, warmup_steps=15, weight_decay=0.1,
                 precision="bf16", fp8_scaling="current", fp8_scope="ffn", qk_norm=False)

#: Per-run budgets. Quick: the whole protocol in a couple of minutes on 2 cores.
DEFAULT_BUDGET = Budget(steps=300, batch_size=8, seq_len=64, probe_every=10, eval_every=50,
                        eval_batches=2, warmup_steps=STRESS.warmup_steps)
QUICK_BUDGET = Budget(steps=40, batch_size=4, seq_len=32, probe_every=5, eval_every=20,
                      eval_batches=1, warmup_steps=STRESS.warmup_steps)

STEP_TIME_KEY = "tokens_per_s"


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------


def _csv(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def _floats(text: str) -> list[float]:
    try:
        return [float(p) for p in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _add_common(p: argparse.ArgumentParser, protocol: str) -> None:
    from steadylm.data import add_data_arguments

    p.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    p.add_argument("--out", metavar="DIR", default=f"runs/stress-{protocol}", help="output directory")
    p.add_argument("--model", default="nano", metavar="PRESET", help="model preset, or 'dense'/'moe'")
    p.add_argument("--activations", type=_csv, default=list(DEFAULT_ACTIVATIONS), metavar="A,B,...",
                   help="activations to stress")
    p.add_argument("--norm", default="rmsnorm", help="block norm of every variant")
    p.add_argument("--steps", type=int, default=None,
                   help=f"steps per run (default {DEFAULT_BUDGET.steps}, --quick {QUICK_BUDGET.steps})")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=None, help="context length")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation and batch order")
    p.add_argument("--quick", action="store_true", help="a small budget: the protocol in a couple of minutes")
    p.add_argument("--stable", action="store_true",
                   help="use the compare command's stable setting instead of the unstable stress setting")
    p.add_argument("--lr", type=float, default=None, help="base/peak LR (default: the setting's)")
    p.add_argument("--grad-clip", type=float, default=None, help="max global grad norm, 0 = off (default: the setting's)")
    p.add_argument("--warmup-steps", type=int, default=None, help="LR warm-up steps (default: the setting's)")
    p.add_argument("--fp8-scaling", choices=("current", "delayed"), default=None,
                   help="FP8 scaling (default: the setting's)")
    p.add_argument("--fp8-scope", choices=("ffn", "all"), default=None,
                   help="FP8 linears: the FFN projections, or every linear but the output head")
    p.add_argument("--qk-norm", action=argparse.BooleanOptionalAction, default=None,
                   help="QK-norm in attention (default: the setting's)")
    p.add_argument("--probe-every", type=int, default=None, help="stability/FP8 probe interval")
    p.add_argument("--spike-window", type=int, default=20, help="loss-spike detector window")
    p.add_argument("--spike-threshold", type=float, default=4.0, help="loss-spike z-score threshold")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a ModelConfig field (repeatable)")
    p.add_argument("--impl", choices=("auto", "fused", "reference"), default="auto",
                   help="op implementation: compiled fused kernels or the eager reference math "
                   "(same numbers); auto = fused, reference for --quick")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--resume", action="store_true",
                   help="continue every run from the checkpoint in its directory (finished runs are "
                   "only re-read: a cheap way to rebuild the report)")
    add_data_arguments(p)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``steadylm stress {lr-sweep,switch,fp8}``."""
    sub = parser.add_subparsers(dest="protocol", metavar="PROTOCOL", required=True)
    p = sub.add_parser("lr-sweep", help="each activation at several multiples of the base LR")
    _add_common(p, "lr-sweep")
    p.add_argument("--multipliers", type=_floats, default=list(DEFAULT_MULTIPLIERS), metavar="M,M,...",
                   help="LR multipliers")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp8"), default=None,
                   help="precision of the sweep (default: the setting's)")
    p = sub.add_parser("switch", help="SwiGLU, then switch the activation mid-training (PowLU paper Fig. 4)")
    _add_common(p, "switch")
    p.add_argument("--switch-step", type=int, default=None, help="step at which to switch (default: 40%% of --steps)")
    p.add_argument("--to", type=_csv, default=list(DEFAULT_SWITCH_TARGETS), metavar="A,B",
                   help="activations to switch to (the control stays on --from)")
    p.add_argument("--from", dest="from_activation", default="swiglu", help="activation before the switch")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp8"), default=None,
                   help="precision of both phases (default: the setting's)")
    p = sub.add_parser("fp8", help="each activation in bf16 and in FP8")
    _add_common(p, "fp8")


@dataclass
class StressOptions:
    protocol: str
    out: Path
    activations: list[str]
    setting: Setting
    norm: str = "rmsnorm"
    preset: str = "nano"
    budget: Budget = DEFAULT_BUDGET
    seed: int = 0
    data: str | None = None
    vocab_size: int = 4096
    text_field: str = "text"
    spike_window: int = 20
    spike_threshold: float = 4.0
    overrides: dict[str, Any] = field(default_factory=dict)
    impl: str = DEFAULT_IMPL
    threads: int | None = None
    resume: bool = False
    quick: bool = False
    multipliers: list[float] = field(default_factory=lambda: list(DEFAULT_MULTIPLIERS))
    switch_step: int | None = None
    switch_from: str = "swiglu"
    switch_to: list[str] = field(default_factory=lambda: list(DEFAULT_SWITCH_TARGETS))
    command: str = ""


def _positive(name: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")


def options_from_args(args: argparse.Namespace) -> StressOptions:
    for name in ("steps", "batch_size", "seq_len", "probe_every", "threads"):
        _positive(f"--{name.replace('_', '-')}", getattr(args, name))
    base = QUICK_BUDGET if args.quick else DEFAULT_BUDGET
    setting = STABLE if args.stable else STRESS
    changes = {k: v for k, v in {
        "lr": args.lr, "grad_clip": args.grad_clip, "warmup_steps": args.warmup_steps,
        "fp8_scaling": args.fp8_scaling, "fp8_scope": args.fp8_scope, "qk_norm": args.qk_norm,
        "precision": getattr(args, "precision", None),
    }.items() if v is not None}
    if changes:
        setting = replace(setting, name=setting.name + " (modified)", **changes)
    if not (setting.lr > 0 and math.isfinite(setting.lr)):
        raise ConfigError(f"--lr must be a finite number > 0, got {setting.lr}")
    if setting.grad_clip < 0:
        raise ConfigError(f"--grad-clip must be >= 0, got {setting.grad_clip}")
    steps = args.steps or base.steps
    if args.warmup_steps is None:  # the setting's warm-up, shortened for a short run
        setting = replace(setting, warmup_steps=min(setting.warmup_steps, steps // 2))
    if setting.warmup_steps < 0 or setting.warmup_steps > steps:
        raise ConfigError(f"--warmup-steps must be in [0, steps={steps}], got {setting.warmup_steps}")
    budget = replace(base, steps=steps, batch_size=args.batch_size or base.batch_size,
                     seq_len=args.seq_len or base.seq_len, probe_every=args.probe_every or base.probe_every,
                     eval_every=base.eval_every if args.steps is None else max(1, steps // 5),
                     warmup_steps=setting.warmup_steps)
    check_spike_detector(args.spike_window, args.spike_threshold)
    activations = list(args.activations)
    if not activations:
        raise ConfigError("--activations must name at least one activation")
    resolve_variants(activations, [args.norm])  # validates names against the registries
    opts = StressOptions(
        protocol=args.protocol, out=Path(args.out), activations=activations, setting=setting,
        norm=args.norm, preset=resolve_preset(args.model), budget=budget, seed=args.seed, data=args.data,
        vocab_size=args.vocab_size, text_field=args.text_field, spike_window=args.spike_window,
        spike_threshold=args.spike_threshold, overrides=_parse_overrides(args.overrides),
        impl=args.impl if args.impl != "auto" else (QUICK_IMPL if args.quick else DEFAULT_IMPL),
        threads=args.threads, quick=args.quick, resume=args.resume,
        command="steadylm " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "",
    )
    if "qk_norm" in opts.overrides:
        raise ConfigError("use --qk-norm / --no-qk-norm rather than --set qk_norm=...")
    if args.protocol == "lr-sweep":
        if not args.multipliers or any(not (m > 0 and math.isfinite(m)) for m in args.multipliers):
            raise ConfigError(f"--multipliers must be positive numbers, got {args.multipliers}")
        opts.multipliers = list(args.multipliers)
    if args.protocol == "switch":
        k = args.switch_step if args.switch_step is not None else max(1, int(0.4 * steps))
        if isinstance(k, bool) or k < 1 or k >= steps:
            raise ConfigError(f"--switch-step must be in [1, steps={steps}), got {k}")
        resolve_variants([args.from_activation, *args.to], [args.norm])
        if not args.to:
            raise ConfigError("--to must name at least one activation")
        opts.switch_step, opts.switch_from, opts.switch_to = k, args.from_activation, list(args.to)
        opts.activations = [args.from_activation, *args.to]
    return opts


def run(args: argparse.Namespace) -> int:
    opts = options_from_args(args)
    {"lr-sweep": run_lr_sweep, "switch": run_switch, "fp8": run_fp8}[opts.protocol](opts)
    return 0


# ---------------------------------------------------------------------------------------------
# one run
# ---------------------------------------------------------------------------------------------


def _model_config(opts: StressOptions, activation: str, data: Any) -> Any:
    from steadylm.models import ModelConfig

    return ModelConfig.from_preset(
        opts.preset, activation=activation, norm=opts.norm, vocab_size=data.vocab_size,
        max_seq_len=opts.budget.seq_len, qk_norm=opts.setting.qk_norm, impl=opts.impl, **opts.overrides,
    )


def _train_config(opts: StressOptions, lr: float, precision: str, **changes: Any) -> Any:
    from steadylm.train import TrainConfig

    b, s = opts.budget, opts.setting
    return TrainConfig(
        steps=b.steps, batch_size=b.batch_size, lr=lr, min_lr=lr / 10, warmup_steps=b.warmup_steps,
        weight_decay=s.weight_decay, grad_clip=s.grad_clip, precision=precision, seed=opts.seed,
        eval_every=b.eval_every, eval_batches=b.eval_batches, probe_every=b.probe_every,
        fp8_scope=s.fp8_scope, fp8_scaling=s.fp8_scaling, threads=opts.threads, **changes,
    )


def _probes(opts: StressOptions, precision: str) -> list[Any]:
    from steadylm.precision import FP8Probe
    from steadylm.probes import StabilityProbe

    probes: list[Any] = [StabilityProbe(every=opts.budget.probe_every)]
    if precision == "fp8":
        probes.append(FP8Probe(every=opts.budget.probe_every, per_module=True))
    return probes


def train_run(
    opts: StressOptions,
    activation: str,
    run_dir: Path,
    data: Any,
    *,
    lr: float,
    precision: str,
    label: str | None = None,
    resume: bool | str = False,
    stop_after: int | None = None,
    **train_changes: Any,
) -> VariantResult:
    """One :class:`~steadylm.train.Trainer` run of ``activation`` into ``run_dir`` (``resume`` as in
    :meth:`Trainer.run`; ``opts.resume`` turns a fresh start into ``"auto"``), summarised with
    :func:`steadylm.lab.compare.summarize` plus the stress extras (:func:`_stress_summary`).
    ``stop_after``: end the run after that step with a checkpoint (the LR schedule still spans
    the configured steps), as :meth:`Trainer.run` does."""
    from steadylm.train import Trainer
    from steadylm.train.metrics import read_metrics

    model_cfg = _model_config(opts, activation, data)
    train_cfg = _train_config(opts, lr, precision, **train_changes)
    trainer = Trainer(model_cfg, train_cfg, data, run_dir, probes=_probes(opts, precision))
    t0 = time.perf_counter()
    result = trainer.run(resume=resume or ("auto" if opts.resume else False), stop_after=stop_after)
    wall = time.perf_counter() - t0
    error = result.divergence_reason if result.diverged else None  # e.g. "non-finite loss (nan)"
    res = VariantResult(
        variant=Variant(label or activation, opts.norm), run_dir=run_dir, rows=read_metrics(result.metrics_jsonl),
        params_total=int(result.num_params["total"]),
        params_active=int(result.num_params.get("active", result.num_params["total"])),
        tokens_seen=result.tokens_seen, tokens_per_s=result.tokens_per_s, wall_s=wall, error=error,
    )
    res.summary = summarize(res, opts.spike_window, opts.spike_threshold)
    res.summary.update(_stress_summary(res.rows, opts.budget))
    res.summary.update(diverged_at=result.diverged_at, lr=lr, precision=precision)
    res.summary.update(_divergence(res.summary, res.rows))
    return res


def _num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def _stress_summary(rows: Sequence[Mapping[str, Any]], budget: Budget) -> dict[str, Any]:
    """Step time and FP8 counters of a run (summed over the probe rows, which each cover the steps
    since the previous probe)."""
    tokens_per_step = budget.batch_size * budget.seq_len
    times = [tokens_per_step / _num(r[STEP_TIME_KEY]) for r in rows
             if _num(r.get(STEP_TIME_KEY)) > 0 and not any(k.startswith("ffn_down_in/") for k in r)]
    out: dict[str, Any] = {
        # median over steps without a stability-probe sample; the first step (warm-up, kernel
        # compilation) is dropped
        "step_ms_median": 1000 * statistics.median(times[1:]) if len(times) > 1 else math.nan,
    }
    fp8_rows = [r for r in rows if "fp8/overflow" in r]
    if fp8_rows:
        for role in ("input", "weight", "grad_output"):
            out[f"fp8_{role}_overflow"] = sum(_num(r.get(f"fp8/{role}/overflow")) for r in fp8_rows)
            out[f"fp8_{role}_underflow"] = sum(_num(r.get(f"fp8/{role}/underflow")) for r in fp8_rows)
            snr = [_num(r.get(f"fp8/{role}/snr_db")) for r in fp8_rows]
            snr = [v for v in snr if math.isfinite(v)]
            out[f"fp8_{role}_snr_db_min"] = min(snr) if snr else math.nan
            out[f"fp8_{role}_snr_db_median"] = statistics.median(snr) if snr else math.nan
            amax = [_num(r.get(f"fp8/{role}/amax")) for r in fp8_rows]
            amax = [v for v in amax if math.isfinite(v)]
            out[f"fp8_{role}_amax_max"] = max(amax) if amax else math.nan
    return out


def _divergence(summary: Mapping[str, Any], rows: Sequence[Mapping[str, Any]],
                margin: float = DEFAULT_DIVERGENCE_MARGIN) -> dict[str, Any]:
    """The stress verdict on a run, from compare's summary (which flags the *first* loss above the
    start, even a transient one that training recovers from):

    - ``divergence``: the run diverged — a non-finite loss or gradient stopped it, or it *ended*
      (mean of the last 10 losses) above its first loss + ``margin``; else None;
    - ``excursion``: the step of a transient climb above the start loss that the run recovered from;
    - ``peak_above_start``: the highest finite loss minus the first loss (0 if never above): how far
      the worst instability threw the run back.
    """
    losses = [_num(r["loss"]) for r in rows if "loss" in r]
    finite = [v for v in losses if math.isfinite(v)]
    start = finite[0] if finite else math.nan
    first_above = summary.get("diverged")
    verdict: dict[str, Any] = {"divergence": None, "excursion": None,
                               "peak_above_start": max(0.0, max(finite) - start) if finite else math.nan}
    if summary.get("error") or (first_above and first_above.get("reason") == "non-finite"):
        step = summary.get("diverged_at") or (first_above or {}).get("step")
        verdict["divergence"] = {"step": step, "reason": summary.get("error") or "non-finite loss"}
    elif _num(summary.get("final_train_loss")) > start + margin:
        verdict["divergence"] = {"step": first_above["step"] if first_above else None,
                                 "reason": "ended above its starting loss"}
    elif first_above:
        verdict["excursion"] = first_above["step"]
    return verdict


def _diverged(s: Mapping[str, Any]) -> bool:
    return s.get("divergence") is not None


def _prepare(opts: StressOptions) -> Any:
    from steadylm.data import prepare_data

    opts.out.mkdir(parents=True, exist_ok=True)
    return prepare_data(opts.data, vocab_size=opts.vocab_size, seq_len=opts.budget.seq_len,
                        seed=opts.seed, text_field=opts.text_field)


def _status(s: Mapping[str, Any]) -> str:
    d = s.get("divergence")
    if d:
        return f"diverged{'' if d.get('step') is None else ' at step ' + str(d['step'])}: {d['reason']}"
    if s.get("excursion"):
        return f"ok (transient loss above start at step {s['excursion']})"
    return "ok"


def _intro(opts: StressOptions, data: Any, extra: Sequence[Sequence[str]] = ()) -> str:
    b, s = opts.budget, opts.setting
    info = data.describe()
    rows = [
        ["model preset", opts.preset + (f" with {opts.overrides}" if opts.overrides else "")],
        ["activations / norm", f"{', '.join(opts.activations)} / {opts.norm}"],
        ["corpus", str(info.get("source"))],
        ["steps × batch × context", f"{b.steps} × {b.batch_size} × {b.seq_len}"],
        ["setting", f"**{s.name}**: {s.describe()}"],
        ["seed", str(opts.seed)],
        ["loss-spike detector", f"rolling z-score over the preceding {opts.spike_window} steps > {opts.spike_threshold:g}"],
        ["divergence", "a non-finite loss or gradient (the trainer stops the run), or a run that *ends* "
                       "(mean of its last 10 losses) above its first loss + 0.1; a transient climb above "
                       "the first loss that training recovers from is reported as an excursion"],
        *extra,
    ]
    note = f"\n\n{STRESS_NOTE}" if s.name == STRESS.name else ""
    return (f"Command: `{opts.command or 'steadylm stress ' + opts.protocol}`\n\n"
            + markdown_table(["", ""], rows)
            + "\n\nEvery run starts from the same seed and sees the same batches in the same order." + note)


def _write(opts: StressOptions, report: Report, payload: Mapping[str, Any]) -> dict[str, Path]:
    summary = {"command": opts.command, "protocol": opts.protocol,
               "options": {**asdict(opts), "out": str(opts.out)}, **payload}
    atomic_write_text(opts.out / "summary.json", json.dumps(_json_safe(summary), indent=2, default=str) + "\n")
    paths = report.write(opts.out)
    print(f"report: {paths['report.html']}")
    return paths


# ---------------------------------------------------------------------------------------------
# figures (matplotlib Figure objects without pyplot, as in steadylm.lab.plots)
# ---------------------------------------------------------------------------------------------


def _figure(ncols: int, nrows: int = 1, w: float = 4.2, h: float = 3.4):
    import numpy as np
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w * ncols, h * nrows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    return fig, axes


def plot_lr_sensitivity(grid: Mapping[str, Mapping[float, Mapping[str, Any]]], base_lr: float):
    """One column per activation against the peak LR (log axis). Top: final loss, diverged runs as
    red × at the top of the panel, spike counts as labels. Bottom: the peak FFN down-projection
    input (max |x| over layers and probes, shared log axis) — how the outliers grow with the LR."""
    n = len(grid)
    fig, axes = _figure(n, 2, h=3.0)
    finite = [_num(s.get("final_train_loss")) for runs in grid.values() for s in runs.values()]
    finite = [v for v in finite if math.isfinite(v)]
    span = (max(finite) - min(finite)) if finite else 1.0
    top = max(finite) + 0.25 * max(span, 0.05) if finite else 1.0
    bottom = min(finite) - 0.1 * max(span, 0.05) if finite else 0.0
    amax_axes = axes[n:]
    for j, ((act, runs), color) in enumerate(zip(grid.items(), plots._colors(n))):
        ax, ax_amax = axes[j], amax_axes[j]
        mults = sorted(runs)
        lrs = [base_lr * m for m in mults]
        ok = [(lr, _num(runs[m].get("final_train_loss"))) for lr, m in zip(lrs, mults) if not _diverged(runs[m])]
        if ok:
            ax.plot([x for x, _ in ok], [y for _, y in ok], "o-", color=color, label="final train loss")
        div = [lr for lr, m in zip(lrs, mults) if _diverged(runs[m])]
        if div:
            ax.scatter(div, [top] * len(div), marker="x", s=80, color="red", lw=2, label="diverged", zorder=5)
        for lr, m in zip(lrs, mults):
            k = int(runs[m].get("spikes") or 0)
            y = top if _diverged(runs[m]) else _num(runs[m].get("final_train_loss"))
            if math.isfinite(y):
                ax.annotate(f"{k} spk", (lr, y), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
        ax.set_ylim(bottom, top + 0.1 * max(span, 0.05))
        ax.set_title(f"{act} (1× = {base_lr:g})")
        ax.legend(fontsize=8, loc="upper left")
        amax = [(lr, _num(runs[m].get("down_in_amax_peak"))) for lr, m in zip(lrs, mults)]
        amax = [(x, y) for x, y in amax if math.isfinite(y) and y > 0]
        if amax:
            ax_amax.plot([x for x, _ in amax], [y for _, y in amax], "s-", color=color)
        ax_amax.set_yscale("log")
        ax_amax.set_xlabel("peak LR")
        for a in (ax, ax_amax):
            a.set_xscale("log", base=2)
            a.set_xticks(lrs, [f"{m:g}×" for m in mults])
            a.grid(alpha=0.3)
    lims = [a.get_ylim() for a in amax_axes if a.lines]
    for a in amax_axes:
        if lims:
            a.set_ylim(min(lo for lo, _ in lims), max(hi for _, hi in lims))
    axes[0].set_ylabel("train loss, mean of last 10 steps")
    amax_axes[0].set_ylabel("peak max |FFN down-proj. input|")
    fig.suptitle("LR sensitivity per activation: final loss, loss spikes (spk), divergences, FFN outliers")
    return fig


def plot_loss_grid(panels: Mapping[str, Mapping[str, Sequence[Mapping[str, Any]]]],
                   spikes: Mapping[str, Mapping[str, Sequence[int]]], vline: int | None = None):
    """One panel per key of ``panels`` (each a set of named runs): train loss over steps, spikes as red ×."""
    import numpy as np

    fig, axes = _figure(len(panels), w=4.6)
    for ax, (title, runs) in zip(axes, panels.items()):
        starts = []
        for (name, rows), c in zip(runs.items(), plots._colors(len(runs))):
            st, lv = plots.series(rows, "loss")
            if not len(st):
                continue
            ax.plot(st, lv, color=c, lw=1.0, label=name)
            fin = lv[np.isfinite(lv)]
            if len(fin):
                starts.append(float(fin[0]))
            sp = set(spikes.get(title, {}).get(name, ()))
            if sp:
                mask = np.isin(st, sorted(sp))
                ax.scatter(st[mask], lv[mask], marker="x", s=50, color="red", zorder=5, lw=2)
        if starts:
            ax.set_ylim(top=1.3 * max(starts))  # a diverging run must not flatten the others
        if vline is not None:
            ax.axvline(vline, color="#555", ls="--", lw=1, label=f"switch (step {vline})")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    axes[0].set_ylabel("train loss")
    return fig


def plot_fp8_counters(runs: Mapping[str, Sequence[Mapping[str, Any]]]):
    """Per FP8 run: quantisation SNR per tensor role (top) and overflow + underflow fraction (bottom)."""
    import numpy as np

    roles = ("input", "weight", "grad_output")
    fig, axes = _figure(len(runs), 2, w=4.4, h=3.0)
    n = len(runs)
    for j, (name, rows) in enumerate(runs.items()):
        ax_snr, ax_cnt = axes[j], axes[n + j]
        for role, c in zip(roles, plots._colors(3)):
            st, snr = plots.series(rows, f"fp8/{role}/snr_db")
            if len(st):
                ax_snr.plot(st, snr, color=c, label=role)
            st, ov = plots.series(rows, f"fp8/{role}/overflow_frac")
            _, un = plots.series(rows, f"fp8/{role}/underflow_frac")
            if len(st):
                ax_cnt.plot(st, np.maximum(ov, 1e-9), color=c, label=f"{role} overflow")
                ax_cnt.plot(st, np.maximum(un, 1e-9), color=c, ls=":", label=f"{role} underflow")
        ax_snr.set_title(name)
        ax_snr.set_ylabel("quantisation SNR (dB)")
        ax_cnt.set_yscale("log")
        ax_cnt.set_ylim(bottom=1e-9)
        ax_cnt.set_ylabel("fraction of elements")
        ax_cnt.set_xlabel("step")
        for ax in (ax_snr, ax_cnt):
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=7)
    fig.suptitle("FP8 counters (per probe interval; fractions floored at 1e-9 for the log axis)")
    return fig


# ---------------------------------------------------------------------------------------------
# protocol: LR sweep
# ---------------------------------------------------------------------------------------------


def run_lr_sweep(opts: StressOptions) -> dict[str, dict[float, dict[str, Any]]]:
    data = _prepare(opts)
    s = opts.setting
    grid: dict[str, dict[float, dict[str, Any]]] = {a: {} for a in opts.activations}
    rows: dict[str, dict[str, Any]] = {a: {} for a in opts.activations}
    spikes: dict[str, dict[str, list[int]]] = {a: {} for a in opts.activations}
    for m in opts.multipliers:
        for act in opts.activations:
            print(f"lr-sweep: {act} at {m:g}× (lr {s.lr * m:g}, {s.precision})", flush=True)
            res = train_run(opts, act, opts.out / f"x{m:g}" / f"{act}+{opts.norm}", data,
                            lr=s.lr * m, precision=s.precision, label=act)
            grid[act][m] = res.summary
            rows[act][f"{m:g}×"] = res.rows
            spikes[act][f"{m:g}×"] = res.summary["spike_steps"]
    table = []
    for act in opts.activations:
        for m in opts.multipliers:
            sm = grid[act][m]
            table.append([act, f"{m:g}× ({s.lr * m:g})", _fmt(sm["final_train_loss"], "{:.3f}"), _fmt(sm["final_val_loss"], "{:.3f}"),
                          str(sm["spikes"]), _fmt(sm["peak_above_start"], "{:.2f}"),
                          _fmt(sm["down_in_amax_peak"], "{:.3g}"), _status(sm)])
    totals = [[act, str(sum(1 for m in opts.multipliers if _diverged(grid[act][m]))),
               str(sum(int(grid[act][m]["spikes"]) for m in opts.multipliers)),
               str(sum(1 for m in opts.multipliers if grid[act][m]["excursion"])),
               _fmt(max((s.lr * m for m in opts.multipliers if not _diverged(grid[act][m])), default=math.nan), "{:g}")]
              for act in opts.activations]
    report = Report("steadylm stress lr-sweep", _intro(opts, data, [["LR multipliers", ", ".join(f"{m:g}×" for m in opts.multipliers)]]))
    report.add_section(
        "Summary",
        markdown_table(["activation", "divergences", "loss spikes (all LRs)", "transient excursions above start",
                        "largest LR that did not diverge"], totals)
        + "\n\n" + markdown_table(["activation", "LR", "train loss (last 10)", "val loss", "spikes",
                                   "worst loss above start", "peak max |down-in|", "status"], table),
    )
    report.add_section(
        "LR sensitivity",
        "Final train loss against the peak LR for each activation; a diverged run is a red × at the "
        "top of its panel; the label over each point is the number of loss spikes.",
        [("lr_sensitivity", plot_lr_sensitivity(grid, s.lr), "LR sensitivity per activation")],
    )
    report.add_section(
        "Loss curves",
        "Train loss of every run, one panel per activation, one line per LR multiplier; red × = spike.",
        [("lr_sweep_losses", plot_loss_grid(rows, spikes), "Train loss per LR multiplier")],
    )
    _write(opts, report, {"runs": {a: {f"{m:g}": grid[a][m] for m in opts.multipliers} for a in opts.activations}})
    return grid


# ---------------------------------------------------------------------------------------------
# protocol: mid-training switch
# ---------------------------------------------------------------------------------------------


def fork_checkpoint(src_run: Path, dst_run: Path, model_config: Any) -> None:
    """Start ``dst_run`` from ``src_run``'s checkpoint with a different model config.

    Copies the checkpoint and the metrics so far, and records ``model_config`` as the checkpoint's
    model config, so that :meth:`Trainer.run(resume=True) <steadylm.train.Trainer.run>` in
    ``dst_run`` builds the new architecture, loads the old weights (same parameter names: an
    activation swap adds none) and continues with the same optimizer state, step, LR schedule and
    batch order. The checksums in ``state.json`` cover the tensor files, which are unchanged.
    """
    from steadylm.train.checkpoint import CHECKPOINT_DIRNAME, find_checkpoint

    src_ckpt = find_checkpoint(src_run)
    if src_ckpt is None:
        raise ConfigError(f"no checkpoint in {src_run} to switch from")
    if dst_run.exists():
        shutil.rmtree(dst_run)
    dst_run.mkdir(parents=True)
    shutil.copytree(src_ckpt, dst_run / CHECKPOINT_DIRNAME)
    shutil.copy2(src_run / "metrics.jsonl", dst_run / "metrics.jsonl")
    state_path = dst_run / CHECKPOINT_DIRNAME / "state.json"
    state = json.loads(state_path.read_text(encoding="utf-8"))
    state["configs"]["model"] = model_config.to_dict()
    atomic_write_text(state_path, json.dumps(state, indent=1, allow_nan=True))


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
    from steadylm.probes import detect_spikes

    def losses(rs: Sequence[Mapping[str, Any]]) -> list[tuple[int, float]]:
        return [(int(r["step"]), _num(r["loss"])) for r in rs if "loss" in r]

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
    finite_after = all(math.isfinite(v) for _, v in after)
    return {
        "pre_switch_loss": pre,
        "jump": jump,
        "recovery_steps": recovery,
        "final_loss": statistics.fmean(tail) if tail else math.nan,
        "loss_gap": (statistics.fmean(tail) - statistics.fmean(ctail)) if tail and ctail else math.nan,
        "spikes_after": len([s for s in spike_steps if s > k]),
        "spike_steps_after": [s for s in spike_steps if s > k],
        "nonfinite_after": not finite_after,
    }


def run_switch(opts: StressOptions) -> dict[str, Any]:
    data = _prepare(opts)
    s, k = opts.setting, int(opts.switch_step or 1)
    prec = s.precision
    phase1 = opts.out / f"phase1-{opts.switch_from}"
    print(f"switch: phase 1, {opts.switch_from} to step {k} ({prec})", flush=True)
    res = train_run(opts, opts.switch_from, phase1, data, lr=s.lr, precision=prec, stop_after=k)
    if res.error:
        raise DivergenceError(
            f"{opts.switch_from} diverged at step {res.summary['diverged_at']}, before the switch step {k} "
            f"({res.error}); choose an earlier --switch-step or a milder setting")
    branches: dict[str, VariantResult] = {}
    for target in [opts.switch_from, *opts.switch_to]:
        name = f"stay {target}" if target == opts.switch_from else f"switch to {target}"
        run_dir = opts.out / (f"stay-{target}" if target == opts.switch_from else f"switch-{target}")
        if not (opts.resume and (run_dir / "checkpoint").is_dir()):
            fork_checkpoint(phase1, run_dir, _model_config(opts, target, data))
        print(f"switch: {name} from step {k}", flush=True)
        branches[name] = train_run(opts, target, run_dir, data, lr=s.lr, precision=prec, label=name,
                                   resume=True)
    control = branches[f"stay {opts.switch_from}"]
    table, metrics = [], {}
    for name, br in branches.items():
        sm = switch_metrics(br.rows, control.rows, k, opts.spike_window, opts.spike_threshold)
        sm["status"] = _status(br.summary)
        sm["down_in_amax_peak_after"] = max(
            (_num(v) for r in br.rows if int(r.get("step", 0)) > k for kk, v in r.items()
             if kk.startswith("ffn_down_in/") and kk.endswith("/amax")), default=math.nan)
        sm["fp8_overflow_after"] = sum(_num(r.get("fp8/overflow", 0)) for r in br.rows if int(r.get("step", 0)) > k)
        metrics[name] = {**br.summary, **sm}
        rec = sm["recovery_steps"]
        table.append([name, _fmt(sm["jump"], "{:+.3f}"),
                      "–" if name.startswith("stay") else ("not recovered" if rec is None else str(rec)),
                      _fmt(sm["final_loss"], "{:.3f}"), "0 (control)" if name.startswith("stay") else _fmt(sm["loss_gap"], "{:+.3f}"),
                      str(sm["spikes_after"]), _fmt(sm["down_in_amax_peak_after"], "{:.3g}"),
                      _fmt(sm["fp8_overflow_after"], "{:.0f}"), sm["status"]])
    report = Report("steadylm stress switch", _intro(opts, data, [
        ["switch", f"{opts.switch_from} for steps 1–{k}, then each branch from the step-{k} checkpoint"],
        ["branches", ", ".join(branches)]]))
    report.add_section(
        "Summary",
        "The PowLU paper's Fig. 4 protocol: the activation is swapped in place at the switch step, "
        "keeping weights, optimizer moments, LR schedule and data order; the control continues "
        f"unchanged. *Jump*: mean loss of the 5 steps after the switch minus that of the 5 steps "
        "before. *Recovery*: steps until the 5-step running mean is back at the pre-switch level. "
        "*Gap*: final loss (last 10 steps) minus the control's; negative is better than staying.\n\n"
        + markdown_table(["branch", "jump", "recovery steps", "final loss", "gap vs control",
                          "spikes after switch", "peak max |down-in| after", "FP8 overflows after", "status"], table),
    )
    runs = {n: b.rows for n, b in branches.items()}
    spikes = {"all branches": {n: metrics[n]["spike_steps_after"] for n in branches}}
    zoom = {n: [r for r in b.rows if int(r.get("step", 0)) >= k - 10] for n, b in branches.items()}
    report.add_section(
        "Loss",
        "Train loss of every branch (left: whole run; right: from 10 steps before the switch). "
        "Red × = spike after the switch.",
        [("switch_losses", plot_loss_grid({"all branches": runs, "around the switch": zoom},
                                          {**spikes, "around the switch": spikes["all branches"]}, vline=k),
          "Train loss around the activation switch")],
    )
    report.add_section(
        "FFN down-projection input after the switch",
        "Per layer, min–max and P1–P99 of the FFN down-projection input at the last probe of each branch.",
        [("switch_down_proj", plots.plot_down_proj_bands(runs), "FFN down-projection input per branch")],
    )
    if prec == "fp8":
        report.add_section("FP8 counters", "Per branch, over the whole run (phase 1 included).",
                           [("switch_fp8", plot_fp8_counters(runs), "FP8 counters per branch")])
    _write(opts, report, {"switch_step": k, "branches": metrics})
    return metrics


# ---------------------------------------------------------------------------------------------
# protocol: FP8 vs bf16
# ---------------------------------------------------------------------------------------------


def _ratio(a: float, b: float) -> float:
    return a / b if math.isfinite(a) and math.isfinite(b) and b != 0 else math.nan


def _down_input_counters(rows: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    """Per FP8 ``w_down`` module: [name, overflow sum, underflow sum, max amax, median SNR]."""
    names = sorted({k.split("/")[1] for r in rows for k in r
                    if k.startswith("fp8/") and k.endswith("/input/overflow") and ".w_down" in k})
    out = []
    for name in names:
        key = f"fp8/{name}/input"
        vals = {c: [_num(r[f"{key}/{c}"]) for r in rows if f"{key}/{c}" in r]
                for c in ("overflow", "underflow", "amax", "snr_db")}
        snr = [v for v in vals["snr_db"] if math.isfinite(v)]
        out.append([name, _fmt(sum(vals["overflow"]), "{:.0f}"), _fmt(sum(vals["underflow"]), "{:.0f}"),
                    _fmt(max(vals["amax"], default=math.nan), "{:.3g}"),
                    _fmt(statistics.median(snr) if snr else math.nan, "{:.1f}")])
    return out


def run_fp8(opts: StressOptions) -> dict[str, dict[str, Any]]:
    data = _prepare(opts)
    s = opts.setting
    results: dict[str, dict[str, VariantResult]] = {"bf16": {}, "fp8": {}}
    for act in opts.activations:
        for prec in ("bf16", "fp8"):
            print(f"fp8: {act} in {prec} (lr {s.lr:g})", flush=True)
            results[prec][act] = train_run(opts, act, opts.out / prec / f"{act}+{opts.norm}", data,
                                           lr=s.lr, precision=prec, label=f"{act} {prec}")
    table, fp8_table, summary = [], [], {}
    for act in opts.activations:
        b, f = results["bf16"][act].summary, results["fp8"][act].summary
        over = _ratio(f["step_ms_median"], b["step_ms_median"])
        table.append([act, _fmt(b["final_train_loss"], "{:.3f}"), _fmt(f["final_train_loss"], "{:.3f}"), str(b["spikes"]), str(f["spikes"]),
                      _fmt(b["peak_above_start"], "{:.2f}"), _fmt(f["peak_above_start"], "{:.2f}"),
                      _status(b), _status(f), _fmt(b["step_ms_median"], "{:.0f}"), _fmt(f["step_ms_median"], "{:.0f}"),
                      _fmt(over, "{:.2f}×")])
        fp8_table.append([act] + [_fmt(f.get(f"fp8_{r}_{k}"), fm) for r in ("input", "weight", "grad_output")
                                  for k, fm in (("overflow", "{:.0f}"), ("underflow", "{:.0f}"), ("snr_db_median", "{:.1f}"),
                                                ("amax_max", "{:.3g}"))])
        summary[act] = {"bf16": b, "fp8": f, "fp8_step_time_ratio": over}
    ratio_rows = []
    base = opts.activations[0]
    for other in opts.activations[1:]:
        for prec in ("bf16", "fp8"):
            sb, so = results[prec][base].summary, results[prec][other].summary
            ratio_rows.append([f"{base}/{other}", prec,
                               _fmt(_ratio(sb["down_in_amax_last"], so["down_in_amax_last"]), "{:.2f}"),
                               _fmt(_ratio(sb["down_in_p99_last"], so["down_in_p99_last"]), "{:.2f}"),
                               _fmt(_ratio(sb["down_in_amax_peak"], so["down_in_amax_peak"]), "{:.2f}")])
    report = Report("steadylm stress fp8", _intro(opts, data))
    report.add_section(
        "Summary",
        markdown_table(["activation", "bf16 loss", "FP8 loss", "bf16 spikes", "FP8 spikes",
                        "bf16 worst loss above start", "FP8 worst loss above start", "bf16 status", "FP8 status", "bf16 step (ms)", "FP8 step (ms)", "FP8/bf16 step time"], table)
        + "\n\nStep times are medians over steps without a stability-probe sample (FP8 counters are "
        "always on). On a CPU, `torch._scaled_mm` dequantises to fp32 internally and the quantisation "
        "(amax, scale, cast, counters) adds elementwise passes, so FP8 is *slower* here; the speed-up "
        "exists only on FP8 tensor cores (Hopper).",
    )
    report.add_section(
        "FFN down-projection input: outlier ratios",
        f"Ratio of {base}'s statistic to the other activation's (max over layers at the last probe; "
        "peak over all probes). A ratio above 1 means the other activation has smaller outliers.\n\n"
        + markdown_table(["ratio", "precision", "max |x| (last)", "P99 (last)", "max |x| (peak)"], ratio_rows),
        [("fp8_down_proj", plots.plot_down_proj_bands(
            {f"{a} {p}": results[p][a].rows for a in opts.activations for p in ("bf16", "fp8")}),
          "FFN down-projection input per layer")],
    )
    roles_hdr = [f"{r} {k}" for r in ("input", "weight", "grad") for k in ("overflow", "underflow", "SNR dB", "amax")]
    report.add_section(
        "FP8 counters",
        f"Summed over the run (FP8 linears: {s.fp8_scope}, {s.fp8_scaling} scaling). Overflow: elements "
        "with |x·scale| above the format maximum (e4m3 448, e5m2 57344) before saturation — only "
        "delayed scaling can overflow; underflow: nonzero elements flushed to zero. SNR: median over "
        "probe intervals of 10·log10(Σx²/Σ(x−q(x))²); e4m3 gives ~31 dB and e5m2 ~25 dB on Gaussian "
        "data. Routed MoE experts are converted too (one nn.Linear per expert).\n\n"
        + markdown_table(["activation"] + roles_hdr, fp8_table)
        + "\n\nPer tensor, the input of each FFN down-projection (the activation output, where the "
        "PowLU paper locates SwiGLU's outliers), summed over the run; every FP8 tensor's counters "
        "are in the runs' `metrics.jsonl` as `fp8/<module>/<role>/<counter>`.\n\n"
        + markdown_table(["activation", "module", "overflow", "underflow", "max amax", "median SNR (dB)"],
                         [[a, *row] for a in opts.activations for row in _down_input_counters(results["fp8"][a].rows)]),
        [("fp8_counters", plot_fp8_counters({a: results["fp8"][a].rows for a in opts.activations}),
          "FP8 counters over training")],
    )
    panels = {a: {p: results[p][a].rows for p in ("bf16", "fp8")} for a in opts.activations}
    spikes = {a: {p: results[p][a].summary["spike_steps"] for p in ("bf16", "fp8")} for a in opts.activations}
    report.add_section("Loss", "Train loss in bf16 and FP8, one panel per activation; red × = spike.",
                       [("fp8_losses", plot_loss_grid(panels, spikes), "bf16 vs FP8 train loss")])
    _write(opts, report, {"variants": summary})
    return summary
