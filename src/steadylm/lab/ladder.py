"""``steadylm ladder``: the same variants at growing size or depth, with fitted laws.

``--axis size``
    Models from a width rule (:func:`size_shape`: ``n_layers = max(2, round(width / 16))``, heads
    of 16 dims, FFN ≈ 8/3 × width), each variant at every width with a fixed budget of
    ``--tokens-per-param`` training tokens per non-embedding parameter (default 20), and ≥ 2 seeds.
    Per variant L(N) = E + A·N^(−α) is fitted to the final validation losses
    (:func:`fit_power_law`: Huber on log L, L-BFGS from a grid of starts, bootstrap 95% intervals
    over runs, i.e. sizes and seeds). Reported: α with its interval, the loss gap to the first
    variant at each size, and the extrapolated gap at 10× and 100× the largest size.
``--axis depth``
    A fixed narrow width (``--depth-width``), depth ``--depths`` (4 → 32), one variant per norm
    (rmsnorm, lns, peri_ln, dyt, bhyt, bhyt_star under SwiGLU): last-layer hidden-state variance,
    per-layer variance growth, the share of lazy blocks (cos(block input, block output) >
    :data:`LAZY_COS`), the loss, and BHyT's λ/κ against the LayerNorm-Scaling bound 1/√L.

Fair baselines: ``--tune-lr`` first trains each variant at the smallest point of the ladder with
every LR of ``--lr-grid`` (multiples of ``train.lr``) and uses the one with the best validation
loss among runs that neither diverged nor died (:mod:`steadylm.lab.summary`: vanishing gradients,
saturated tanh); the choice is in the report. A dead variant is reported as dead with its reason
and left out of the fits.

Every run is one process in ``OUT/<axis>/<point>/<variant>/seed<k>/`` and leaves ``result.json``
when finished: ``--resume`` re-reads finished runs and continues interrupted ones from their
checkpoints (every quarter of a run). Under ``torchrun`` rank r trains runs r, r + W, ... (the
launcher's layout, :meth:`DistEnv.from_launcher`; no process group), waits for the others' ``result.json`` and rank
0 writes the report.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steadylm.config_fields import spec_field
from steadylm.distributed.env import DistEnv
from steadylm.errors import ConfigError
from steadylm.lab.options import (
    LabOptions,
    TuneOptions,
    Variant,
    add_lab_arguments,
    lab_options,
    lab_spec,
    options_from_args,
    resolve_variants,
)
from steadylm.lab.ladder_report import LAZY_COS, depth_report, size_report
from steadylm.lab.powerlaw import fit_power_law
from steadylm.lab.runner import RunResult, load_data, output_lock, run_shared, variant_spec
from steadylm.lab.summary import pick_lr
from steadylm.probes.block_cosine import BlockCosineProbe
from steadylm.train import TrainConfig
from steadylm.train.spec import DataSpec, ModelSpec, ProbeSpec, RunSpec

__all__ = ["AXES", "LAZY_COS", "BlockCosineProbe", "LadderOptions", "add_arguments", "fit_power_law", "run",
           "size_shape"]

AXES: tuple[str, ...] = ("size", "depth")
DEFAULT_OUT = "runs/ladder"
SIZE_VARIANTS: tuple[tuple[str, str], ...] = (("swiglu", "rmsnorm"), ("powlu", "rmsnorm"),
                                              ("swiglu", "bhyt"), ("powlu", "bhyt"))
DEPTH_VARIANTS: tuple[tuple[str, str], ...] = tuple(
    ("swiglu", n) for n in ("rmsnorm", "lns", "peri_ln", "dyt", "bhyt", "bhyt_star"))
#: Fields the size rule sets (a user override of them is refused).
SHAPE_FIELDS: tuple[str, ...] = ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim")

BASE_SPEC = RunSpec(
    model=ModelSpec(preset="nano", impl="fused"),
    train=TrainConfig(steps=200, batch_size=16, lr=3e-3, min_lr=3e-3 / 10, warmup_steps=20, eval_every=50,
                      eval_batches=4, probe_every=25, ckpt_every=50),
    data=DataSpec(seq_len=128, split_seed=0),  # one validation split for every seed
    probes=ProbeSpec(stability=True),
)
#: ``--quick``: three small points, two variants, the reference ops, a 1024-token vocabulary, one
#: thread per run (tiny models lose more to a contended second intra-op thread than they gain).
QUICK: dict[str, Any] = {"model.impl": "reference", "data.seq_len": 64, "data.vocab_size": 1024, "train.threads": 1,
                         "train.eval_batches": 2, "train.steps": 120, "train.warmup_steps": 12,
                         "train.eval_every": 40, "train.probe_every": 20, "train.ckpt_every": 40}
QUICK_WIDTHS = (16, 24, 32)
QUICK_DEPTHS = (2, 4, 8)
QUICK_DEPTH_WIDTH = 32
QUICK_SIZE_VARIANTS = (("swiglu", "rmsnorm"), ("powlu", "rmsnorm"))
QUICK_DEPTH_VARIANTS = (("swiglu", "rmsnorm"), ("swiglu", "bhyt"))
QUICK_TOKENS_PER_PARAM = 5.0


@dataclass
class LadderOptions:
    """The ladder's own options."""

    axis: str = spec_field("size", help="size: variants × widths at a tokens-per-parameter budget; "
                           "depth: norms × depths at a fixed width", flag="--axis", choices=AXES)
    widths: list[int] | None = spec_field(None, help="size axis: model widths (default 32,48,64,96,128; "
                                          "--quick 16,24,32)", flag="--widths")
    depths: list[int] | None = spec_field(None, help="depth axis: numbers of blocks (default 4,8,16,32; "
                                          "--quick 2,4,8)", flag="--depths")
    depth_width: int | None = spec_field(None, help="depth axis: the width of every model (default 64, "
                                         "--quick 32)", flag="--depth-width")
    tokens_per_param: float | None = spec_field(None, help="size axis: training tokens per non-embedding "
                                                "parameter (default 20, --quick 5)", flag="--tokens-per-param")
    seeds: list[int] | None = spec_field(None, help="seeds of every point (default: size 0,1; depth 0)",
                                         flag="--seeds")
    bootstrap: int = spec_field(1000, help="bootstrap resamples of each fit", flag="--bootstrap")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[0] if __doc__ else None
    add_lab_arguments(parser, LadderOptions, TuneOptions, out=DEFAULT_OUT)


# ----------------------------------------------------------------------------------------------
# the ladder's points
# ----------------------------------------------------------------------------------------------


def size_shape(width: int) -> dict[str, int]:
    """The model shape of ``width`` on the size axis: depth grows with width (aspect ratio 16),
    heads of 16 dims (at least one), FFN ≈ 8/3 × width rounded up to 16."""
    if isinstance(width, bool) or not isinstance(width, int) or width < 8 or width % 8:
        raise ConfigError(f"--widths: every width must be a multiple of 8 and >= 8, got {width!r}")
    heads = max(1, width // 16)
    while width % heads or (width // heads) % 2:
        heads -= 1
    return {"dim": width, "n_layers": max(2, round(width / 16)), "n_heads": heads, "n_kv_heads": heads,
            "ffn_dim": 16 * math.ceil(8 * width / 3 / 16)}


@dataclass
class Job:
    """One run of the ladder."""

    kind: str  # "tune" or "main"
    variant: Variant
    point: int  # width (size axis) or depth (depth axis)
    seed: int
    spec: RunSpec
    run_dir: Path
    lr_mult: float = 1.0

    @property
    def label(self) -> str:
        return f"{self.variant.name} @{self.point} seed {self.seed}"


def _budget(spec: RunSpec, n_params: int, tokens_per_param: float) -> dict[str, Any]:
    tokens_per_step = spec.train.batch_size * spec.data.seq_len
    steps = max(20, math.ceil(tokens_per_param * n_params / tokens_per_step))
    return {"train.steps": steps, "train.warmup_steps": max(1, steps // 10), "train.eval_every": max(1, steps // 4),
            "train.probe_every": max(1, steps // 8), "train.ckpt_every": max(1, steps // 4)}


def _point_spec(axis: str, spec: RunSpec, point: int, width: int, tpp: float, vocab: int) -> RunSpec:
    from steadylm.models.config import count_parameters

    if axis == "size":
        shape = size_shape(point)
    else:
        shape = {**size_shape(width), "n_layers": point}
    s = spec.with_overrides({f"model.{k}": v for k, v in shape.items()})
    if axis == "size":
        counts = count_parameters(s.model_config(vocab))
        s = s.with_overrides(_budget(s, counts.total - counts.embedding, tpp))
    return s


# ----------------------------------------------------------------------------------------------
# running: ranks take whole runs (lab.runner.run_shared)
# ----------------------------------------------------------------------------------------------


def _run_jobs(jobs: Sequence[Job], data: Any, axis: str, resume: bool, env: DistEnv) -> dict[int, RunResult]:
    """Train this rank's share of ``jobs`` and return every job's result (:func:`run_shared`)."""
    def probes(job: Job) -> list[Any]:
        return [BlockCosineProbe(max(1, job.spec.train.probe_every))] if axis == "depth" else []

    def announce(job: Job, reused: bool) -> None:
        print(f"ladder[{env.rank}/{env.world_size}]: {job.kind} {job.label} lr {job.spec.train.lr:g} "
              f"({job.spec.train.steps} steps){' — finished, re-read' if reused else ''}", flush=True)

    return run_shared(jobs, data, resume=resume, env=env, extra_probes=probes, announce=announce, tag="ladder")


# ----------------------------------------------------------------------------------------------
# the protocol
# ----------------------------------------------------------------------------------------------


def _resolve(lab: LabOptions, opts: LadderOptions) -> dict[str, Any]:
    axis = opts.axis
    quick = lab.quick
    if axis == "size":
        variants = resolve_variants(lab, QUICK_SIZE_VARIANTS if quick else SIZE_VARIANTS)
        points = list(opts.widths or (QUICK_WIDTHS if quick else (32, 48, 64, 96, 128)))
        for w in points:
            size_shape(w)
        if len(set(points)) < 3:
            raise ConfigError(f"--widths: a power law needs at least 3 distinct widths, got {points}")
    else:
        variants = resolve_variants(lab, QUICK_DEPTH_VARIANTS if quick else DEPTH_VARIANTS)
        points = list(opts.depths or (QUICK_DEPTHS if quick else (4, 8, 16, 32)))
        if any(isinstance(d, bool) or d < 1 for d in points):
            raise ConfigError(f"--depths must be integers >= 1, got {points}")
    width = opts.depth_width or (QUICK_DEPTH_WIDTH if quick else 64)
    size_shape(width)
    seeds = list(opts.seeds if opts.seeds is not None else ((0, 1) if axis == "size" else (0,)))
    if not seeds or len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
        raise ConfigError(f"--seeds must be distinct integers >= 0, got {seeds}")
    tpp = opts.tokens_per_param if opts.tokens_per_param is not None else (QUICK_TOKENS_PER_PARAM if quick else 20.0)
    if not (tpp > 0 and math.isfinite(tpp)):
        raise ConfigError(f"--tokens-per-param must be a number > 0, got {tpp}")
    if opts.bootstrap < 0:
        raise ConfigError(f"--bootstrap must be >= 0, got {opts.bootstrap}")
    return {"variants": variants, "points": sorted(set(points)), "width": width, "seeds": seeds, "tpp": tpp}


def ladder_spec(args: argparse.Namespace, lab: LabOptions, opts: LadderOptions) -> RunSpec:
    base = BASE_SPEC.with_overrides(QUICK) if lab.quick else BASE_SPEC

    def derive(b: RunSpec, user: Mapping[str, Any]) -> dict[str, Any]:
        if opts.axis == "size":
            fixed = sorted(k for k in user if k in ("train.steps", "train.warmup_steps", "train.eval_every",
                                                     "train.probe_every", "train.ckpt_every")
                           or k in {f"model.{f}" for f in SHAPE_FIELDS})
            if fixed:
                raise ConfigError(f"{fixed}: the size axis sets the model shape and the budget itself "
                                  "(use --widths and --tokens-per-param)")
        elif any(k == f"model.{f}" for k in user for f in ("n_layers", "dim")):
            raise ConfigError("the depth axis sets model.n_layers and model.dim itself (use --depths and --depth-width)")
        lr = user.get("train.lr", b.train.lr)
        return {"train.min_lr": lr / 10} if isinstance(lr, (int, float)) else {}

    spec = lab_spec(args, base, derive)
    if spec.train.threads is None:
        env = DistEnv.from_launcher()
        if env.world_size > 1:
            spec = spec.with_overrides({"train.threads": max(1, (os.cpu_count() or 1) // env.local_world_size)})
    return spec


def run(args: argparse.Namespace) -> int:
    lab = lab_options(args, out=DEFAULT_OUT)
    with output_lock(lab.out):
        return _run(args, lab)


def _run(args: argparse.Namespace, lab: Any) -> int:
    opts = options_from_args(args, LadderOptions)
    tune = options_from_args(args, TuneOptions)
    tune.validate()
    plan = _resolve(lab, opts)
    spec = ladder_spec(args, lab, opts)
    env = DistEnv.from_launcher()
    axis, out = opts.axis, Path(lab.out) / opts.axis
    t0 = time.perf_counter()
    data = load_data(spec)
    vocab = data.vocab_size
    point_specs = {p: _point_spec(axis, spec, p, plan["width"], plan["tpp"], vocab) for p in plan["points"]}
    variants, seeds = plan["variants"], plan["seeds"]

    lrs = {v.name: spec.train.lr for v in variants}
    tuning: dict[str, list[tuple[float, RunResult]]] = {}
    if tune.tune_lr:
        p0 = plan["points"][0]
        tune_jobs = [Job("tune", v, p0, seeds[0], _with_lr(point_specs[p0], v, spec.train.lr * m, seeds[0]),
                         out / "tune-lr" / f"{p0}" / v.name / f"x{m:g}", m)
                     for v in variants for m in tune.lr_grid]
        done = _run_jobs(tune_jobs, data, axis, lab.resume, env)
        for i, job in enumerate(tune_jobs):
            tuning.setdefault(job.variant.name, []).append((job.spec.train.lr, done[i]))
        lrs = {name: pick_lr([(lr, r.summary) for lr, r in runs], spec.train.lr) for name, runs in tuning.items()}

    jobs = [Job("main", v, p, s, _with_lr(point_specs[p], v, lrs[v.name], s), out / f"{p}" / v.name / f"seed{s}")
            for p in plan["points"] for v in variants for s in seeds]
    results = _run_jobs(jobs, data, axis, lab.resume, env)
    if not env.is_main:
        return 0
    wall = time.perf_counter() - t0
    ctx = {"spec": spec, "lab": lab, "opts": opts, "plan": plan, "jobs": jobs, "results": results,
           "lrs": lrs, "tuning": tuning, "data": data.describe(), "wall_s": wall, "point_specs": point_specs}
    paths = (size_report if axis == "size" else depth_report)(ctx)
    print(f"report: {paths['report.html']}  ({wall:.0f} s)")
    return 0


def _with_lr(spec: RunSpec, variant: Variant, lr: float, seed: int) -> RunSpec:
    return variant_spec(spec, variant, **{"train.lr": lr, "train.min_lr": lr / 10, "train.seed": seed})
