"""``steadylm stress``: protocols that push training until it breaks, and a report of how it broke.

Three protocols, each its own module and a sub-command writing its runs and a report
(``report.html``, ``summary.md``, ``summary.json``, ``plots/``) under ``--out``:

``lr-sweep`` (:mod:`steadylm.lab.lr_sweep`)
    Every variant at 1×, 2×, 4×, 8×, 16× the base LR (``--multipliers``).
``switch`` (:mod:`steadylm.lab.switch`)
    The PowLU paper's Fig. 4: train SwiGLU, fork at ``--switch-step``, continue once with SwiGLU
    (the control) and once with each ``--to`` activation.
``fp8`` (:mod:`steadylm.lab.fp8`)
    Every variant in bf16 and in FP8, with the FP8 counters.

This module holds what the three share: the unstable setting (:data:`STRESS_SPEC`: a high peak
LR, no gradient clipping, a short warm-up, FP8 with delayed scaling on the FFN linears, no QK-norm;
:data:`STRESS_NOTE` says what it does and does not produce at this scale), the stable one
(``--stable``, :data:`STABLE_SPEC`, the compare command's regime in bf16), and the report intro.
Every flag of the run spec overrides the setting (``--lr``, ``--set train.grad_clip=1`` ...).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from steadylm.config_fields import spec_field
from steadylm.lab.options import LabOptions, lab_options, lab_spec, options_from_args
from steadylm.lab.runner import output_lock
from steadylm.lab.report import markdown_table
from steadylm.probes.spikes import DIVERGENCE_RULE, EXCURSION_RULE
from steadylm.train import TrainConfig
from steadylm.train.spec import DataSpec, ModelSpec, ProbeSpec, RunSpec

__all__ = ["DEFAULT_VARIANTS", "PROTOCOLS", "STABLE_SPEC", "STRESS_NOTE", "STRESS_SPEC", "StressOptions",
           "add_arguments", "intro", "run", "stress_spec"]

#: sub-command -> (module, one-line help)
PROTOCOLS: dict[str, tuple[str, str]] = {
    "lr-sweep": ("steadylm.lab.lr_sweep", "each variant at several multiples of the base LR"),
    "switch": ("steadylm.lab.switch", "SwiGLU, then switch the activation mid-training (PowLU paper Fig. 4)"),
    "fp8": ("steadylm.lab.fp8", "each variant in bf16 and in FP8"),
}
DEFAULT_VARIANTS: tuple[tuple[str, str], ...] = (("swiglu", "rmsnorm"), ("powlu", "rmsnorm"),
                                                 ("swiglu_clip", "rmsnorm"))

#: The unstable regime (measured in BENCHMARKS.md, "FP8 and stress protocols"). High LR and no
#: clipping do most of the work; FP8 with delayed scaling adds quantisation error and saturation
#: when activations grow faster than the amax history. 300 steps × 8 × 64 tokens.
STRESS_SPEC = RunSpec(
    model=ModelSpec(preset="nano", impl="fused", overrides={"qk_norm": False}),
    train=TrainConfig(steps=300, batch_size=8, lr=2e-2, min_lr=2e-2 / 10, warmup_steps=5, weight_decay=0.1,
                      grad_clip=0.0, precision="fp8", fp8_scaling="delayed", fp8_scope="ffn",
                      eval_every=50, eval_batches=2, probe_every=10),
    data=DataSpec(seq_len=64),
    probes=ProbeSpec(stability=True),
)
#: ``--stable``: the compare command's regime (clipping at 1, LR 3e-3, 15 warm-up steps) in bf16.
STABLE_SPEC = dataclasses.replace(
    STRESS_SPEC,
    train=STRESS_SPEC.train.replace(lr=3e-3, min_lr=3e-3 / 10, grad_clip=1.0, warmup_steps=15,
                                    precision="bf16", fp8_scaling="current"),
)
#: ``--quick``: the protocol in a couple of minutes on 2 cores (reference ops, no compilation).
QUICK_BUDGET: dict[str, Any] = {"train.steps": 40, "train.batch_size": 4, "data.seq_len": 32,
                                "train.probe_every": 5, "train.eval_every": 20, "train.eval_batches": 1,
                                "model.impl": "reference"}
#: What :data:`STRESS_SPEC` does at the ``nano`` scale (300 steps, seeds 0–2), stated in every report.
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


@dataclass
class StressOptions:
    """Options the stress protocols share."""

    stable: bool = spec_field(False, help="start from the stable setting (LR 3e-3, clipping at 1, bf16) "
                              "instead of the unstable stress setting", flag="--stable")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``steadylm stress {lr-sweep,switch,fp8}``: each protocol module adds its own flags."""
    sub = parser.add_subparsers(dest="protocol", metavar="PROTOCOL", required=True)
    for name, (module, help_text) in PROTOCOLS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(p)


def run(args: argparse.Namespace) -> int:
    protocol = importlib.import_module(PROTOCOLS[args.protocol][0])
    with output_lock(lab_options(args, out=protocol.DEFAULT_OUT).out):
        return int(protocol.run(args) or 0)


def stress_options(args: argparse.Namespace) -> StressOptions:
    return options_from_args(args, StressOptions)


def _derive(base: RunSpec, user: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    steps = user.get("train.steps", base.train.steps)
    if "train.steps" in user and isinstance(steps, int):
        out["train.eval_every"] = max(1, steps // 5)
    if isinstance(steps, int):  # the setting's warm-up, shortened for a short run
        out["train.warmup_steps"] = min(base.train.warmup_steps, steps // 2)
    lr = user.get("train.lr", base.train.lr)
    if isinstance(lr, (int, float)) and not isinstance(lr, bool):
        out["train.min_lr"] = lr / 10
    return out


def stress_spec(args: argparse.Namespace, lab: LabOptions, opts: StressOptions) -> RunSpec:
    """The protocol's run spec: the stress (or ``--stable``) setting, the ``--quick`` budget, and
    whatever the user set on top."""
    base = STABLE_SPEC if opts.stable else STRESS_SPEC
    if lab.quick:
        base = base.with_overrides(QUICK_BUDGET)
    return lab_spec(args, base, _derive)


def describe(spec: RunSpec) -> str:
    """The optimisation regime of a spec in words."""
    t = spec.train
    clip = "no gradient clipping" if t.grad_clip == 0 else f"gradient clipping at {t.grad_clip:g}"
    qk = spec.model.overrides.get("qk_norm", False)
    return (f"peak LR {t.lr:g}, {clip}, {t.warmup_steps} warm-up steps, weight decay "
            f"{t.weight_decay:g}, QK-norm {'on' if qk else 'off'}, precision {t.precision} "
            f"(FP8: {t.fp8_scaling} scaling, scope {t.fp8_scope})")


def intro(protocol: str, spec: RunSpec, opts: StressOptions, variants: Sequence[str], data_info: Mapping[str, Any],
          command: str, extra: Sequence[Sequence[str]] = ()) -> str:
    """The setting table every stress report opens with."""
    t = spec.train
    overrides = {k: v for k, v in spec.model.overrides.items() if k != "qk_norm"}
    rows = [
        ["model preset", spec.model.preset + (f" with {overrides}" if overrides else "")],
        ["variants", ", ".join(variants)],
        ["corpus", str(data_info.get("source"))],
        ["steps × batch × context", f"{t.steps} × {t.batch_size} × {spec.data.seq_len}"],
        ["setting", f"**{'stable' if opts.stable else 'unstable'}**: {describe(spec)}"],
        ["seed", str(t.seed)],
        ["loss-spike detector", f"rolling z-score over the preceding {spec.probes.spike_window} steps > "
                                f"{spec.probes.spike_threshold:g}"],
        ["divergence", f"{DIVERGENCE_RULE}; {EXCURSION_RULE}"],
        *extra,
    ]
    note = "" if opts.stable else f"\n\n{STRESS_NOTE}"
    return (f"Command: `{command or 'steadylm stress ' + protocol}`\n\n" + markdown_table(["", ""], rows)
            + "\n\nEvery run starts from the same seed and sees the same batches in the same order." + note)
