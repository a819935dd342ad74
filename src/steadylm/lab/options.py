"""The lab's command line: the run spec's flags (generated once, :mod:`steadylm.train.spec`), the
lab's own options (dataclasses whose fields carry their flags, :func:`add_options`), and the
variants a protocol trains.

A protocol module declares::

    def add_arguments(parser):
        add_lab_arguments(parser, ProtocolOptions)       # spec flags + LabOptions + its own fields

    def run(args):
        lab, own = lab_options(args, ProtocolOptions)
        spec = lab_spec(args, base=BASE_SPEC, derive=derive_defaults)

Every lab run is one process (each variant is trained by :func:`steadylm.lab.runner.run_variant`),
so the spec's ``parallel`` section is not offered, and the fields a protocol sets per variant
(``model.activation``, ``model.norm``) are chosen with ``--variants`` / ``--activations`` /
``--norms`` instead.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from steadylm.config_fields import add_field_flags, fields_from_args, spec_field
from steadylm.errors import ConfigError
from steadylm.train.spec import RunSpec, add_spec_arguments, user_assignments

__all__ = [
    "LAB_EXCLUDED",
    "LabOptions",
    "TuneOptions",
    "Variant",
    "add_lab_arguments",
    "add_options",
    "command_line",
    "lab_options",
    "lab_spec",
    "options_from_args",
    "resolve_variants",
]

#: Spec sections / fields the lab sets itself, with what to use instead.
LAB_EXCLUDED: dict[str, str] = {
    "parallel": "each lab run is one process (under torchrun, `steadylm ladder` gives whole runs to ranks)",
    "model.activation": "--variants or --activations",
    "model.norm": "--variants or --norms",
    "model.vocab_size": "--vocab-size (the model takes the tokenizer's vocabulary)",
    "model.max_seq_len": "--seq-len",
    "probes.stability": "the lab always runs the stability probe",
}

T = TypeVar("T")


@dataclass(frozen=True)
class Variant:
    """An activation × block-norm pair, named ``activation+norm``."""

    activation: str
    norm: str

    @property
    def name(self) -> str:
        return f"{self.activation}+{self.norm}"

    @classmethod
    def parse(cls, text: str) -> Variant:
        act, sep, norm = text.partition("+")
        if not sep or not act.strip() or not norm.strip():
            raise ConfigError(f"variant {text!r} must be written ACTIVATION+NORM, e.g. powlu+bhyt")
        return cls(act.strip(), norm.strip())


@dataclass
class LabOptions:
    """Options every lab protocol has besides the run spec."""

    out: str = spec_field("runs/lab", help="output directory: one sub-directory per run, the report "
                          "(report.html, summary.md, summary.json, plots/) on top", flag="--out")
    variants: list[str] | None = spec_field(None, help="explicit variants ACTIVATION+NORM, comma-"
                                            "separated (instead of --activations x --norms)",
                                            flag="--variants")
    activations: list[str] | None = spec_field(None, help="activations, crossed with --norms",
                                               flag="--activations")
    norms: list[str] | None = spec_field(None, help="block norms, crossed with --activations",
                                         flag="--norms")
    quick: bool = spec_field(False, help="the protocol's small budget: a smoke test of the whole "
                             "pipeline in minutes", flag="--quick")
    resume: bool = spec_field(False, help="continue every run from its directory: finished runs are "
                              "re-read, not retrained; interrupted ones resume from their checkpoint",
                              flag="--resume")


@dataclass
class TuneOptions:
    """Fair baselines: each variant's learning rate picked by a short sweep."""

    tune_lr: bool = spec_field(False, help="pick each variant's LR by a short sweep (a third of the "
                               "steps for compare, the smallest point for the ladder): the LR of "
                               "--lr-grid with the best validation loss among runs that neither "
                               "diverged nor died; the choice is in the report", flag="--tune-lr")
    lr_grid: list[float] = spec_field(default_factory=lambda: [0.25, 0.5, 1.0, 2.0, 4.0],
                                      help="--tune-lr: LR multipliers of train.lr", flag="--lr-grid")

    def validate(self) -> None:
        import math

        if not self.lr_grid or any(not (m > 0 and math.isfinite(m)) for m in self.lr_grid):
            raise ConfigError(f"--lr-grid must be positive numbers, got {self.lr_grid}")


# ----------------------------------------------------------------------------------------------
# flags from dataclass fields (the one generator: steadylm.config_fields)
# ----------------------------------------------------------------------------------------------


def _dest(cls: type, name: str) -> str:
    return f"lab__{cls.__name__}__{name}"


def add_options(parser: argparse.ArgumentParser | Any, cls: type, **defaults: Any) -> None:
    """A flag for every field of the dataclass ``cls`` that has ``spec_field(flag=...)``.
    ``defaults`` replace field defaults (shown in ``--help``; applied by :func:`options_from_args`)."""
    group = parser.add_argument_group(cls.__name__, (cls.__doc__ or "").strip().split("\n")[0])
    add_field_flags(group, cls, dest=lambda name: _dest(cls, name), defaults=defaults)


def options_from_args(args: argparse.Namespace, cls: type[T], **defaults: Any) -> T:
    """An instance of ``cls`` from the flags :func:`add_options` made (unset flags: ``defaults``,
    then the field defaults)."""
    return cls(**fields_from_args(args, cls, dest=lambda name: _dest(cls, name), defaults=defaults))


def add_lab_arguments(parser: argparse.ArgumentParser, *protocol_options: type, **defaults: Any) -> None:
    """The run spec's flags (without :data:`LAB_EXCLUDED`), :class:`LabOptions` and the given
    protocol option classes. ``defaults`` (field name -> value) apply to all of them."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add_options(parser, LabOptions, **defaults)
    for cls in protocol_options:
        add_options(parser, cls, **defaults)
    add_spec_arguments(parser, exclude=tuple(LAB_EXCLUDED))


def lab_options(args: argparse.Namespace, **defaults: Any) -> LabOptions:
    return options_from_args(args, LabOptions, **defaults)


# ----------------------------------------------------------------------------------------------
# the run spec of a protocol
# ----------------------------------------------------------------------------------------------


def _check_not_excluded(user: Mapping[str, Any]) -> None:
    for key in user:
        section = key.partition(".")[0]
        for excluded, instead in LAB_EXCLUDED.items():
            if key == excluded or section == excluded:
                raise ConfigError(f"{key} cannot be set in the lab: {instead}")


def lab_spec(
    args: argparse.Namespace,
    base: RunSpec,
    derive: Callable[[RunSpec, Mapping[str, Any]], Mapping[str, Any]] | None = None,
) -> RunSpec:
    """The protocol's run spec: ``base`` < derived defaults < what the user set (config file,
    ``--set``, flags). ``derive(base, user)`` returns ``{"section.key": value}`` defaults computed
    from the user's values (e.g. warm-up from the step count); keys the user set win over them."""
    user = user_assignments(args)
    _check_not_excluded(user)
    merged = dict(user)
    if derive is not None:
        for key, value in derive(base, user).items():
            merged.setdefault(key, value)
    return base.with_overrides(merged) if merged else base


def scaled_budget(base: RunSpec, user: Mapping[str, Any], *, eval_div: int, warmup_div: int) -> dict[str, Any]:
    """Defaults that follow the step count and the LR when the user changed them: evaluation every
    ``steps // eval_div`` steps, warm-up ``steps // warmup_div`` steps, ``min_lr = lr / 10``."""
    out: dict[str, Any] = {}
    steps = user.get("train.steps", base.train.steps)
    if "train.steps" in user:
        out["train.eval_every"] = max(1, steps // eval_div) if isinstance(steps, int) else base.train.eval_every
        out["train.warmup_steps"] = min(steps, max(1, steps // warmup_div)) if isinstance(steps, int) else 0
    lr = user.get("train.lr", base.train.lr)
    if isinstance(lr, (int, float)) and not isinstance(lr, bool):
        out["train.min_lr"] = lr / 10
    return out


def resolve_variants(
    lab: LabOptions,
    default: Sequence[tuple[str, str]],
) -> list[Variant]:
    """The variants to train (``--variants``, or ``--activations`` × ``--norms`` with the first of
    ``default`` filling an unset side, or ``default``), validated against the registries."""
    from steadylm.models.forms import block_form_names
    from steadylm.nn import ACTIVATIONS

    if lab.variants:
        if lab.activations or lab.norms:
            raise ConfigError("--variants cannot be combined with --activations/--norms")
        chosen = [Variant.parse(v) for v in lab.variants]
    elif lab.activations or lab.norms:
        acts = list(lab.activations or [default[0][0]])
        norms = list(lab.norms or [default[0][1]])
        chosen = [Variant(a, n) for a in acts for n in norms]
    else:
        chosen = [Variant(a, n) for a, n in default]
    for v in chosen:
        if v.activation not in ACTIVATIONS:
            raise ConfigError(f"unknown activation {v.activation!r} in variant {v.name!r}; "
                              f"choose from {sorted(ACTIVATIONS)}")
        if v.norm not in block_form_names():
            raise ConfigError(f"unknown norm {v.norm!r} in variant {v.name!r}; choose from {list(block_form_names())}")
    names = [v.name for v in chosen]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"variant(s) listed twice: {dupes}")
    return chosen


def command_line() -> str:
    """The command as typed (for reports)."""
    return "steadylm " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else ""
