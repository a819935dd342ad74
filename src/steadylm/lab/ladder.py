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
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from steadylm.config_fields import spec_field
from steadylm.distributed.env import DistEnv
from steadylm.errors import ConfigError
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
)
from steadylm.lab.powerlaw import PowerLawFit, fit_power_law
from steadylm.lab.report import Report, fmt, markdown_table, write_all
from steadylm.lab.runner import RunResult, is_finished, load_data, output_lock, run_variant, variant_spec
from steadylm.lab.summary import pick_lr, status
from steadylm.probes import keys as K
from steadylm.train import TrainConfig
from steadylm.train.spec import DataSpec, ModelSpec, ProbeSpec, RunSpec

__all__ = ["AXES", "LAZY_COS", "BlockCosineProbe", "LadderOptions", "add_arguments", "fit_power_law", "run",
           "size_shape"]

AXES: tuple[str, ...] = ("size", "depth")
DEFAULT_OUT = "runs/ladder"
#: A block whose output has cosine similarity above this with its input barely changes the
#: residual stream: a "lazy" block (the curse of depth).
LAZY_COS = 0.99
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


def _non_embedding(result: RunResult) -> int:
    return int(result.params["total"]) - int(result.params.get("embedding", 0))


# ----------------------------------------------------------------------------------------------
# the depth probe
# ----------------------------------------------------------------------------------------------


class BlockCosineProbe:
    """Mean cosine similarity between each block's input and output over the step's tokens,
    ``depth/layer{i}/cos``, sampled on step 1 and every ``every`` steps (the train ↔ probes
    contract of docs/ARCHITECTURE.md)."""

    def __init__(self, every: int) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every = every
        self._handles: list[Any] = []
        self._values: dict[int, Any] = {}

    def begin_step(self, step: int, model: Any) -> None:
        self._clear()
        if not (step == 1 or step % self.every == 0):
            return
        import torch

        for i, block in enumerate(model.layers):
            def hook(_mod: Any, args: tuple, kwargs: dict, output: Any, i: int = i) -> None:
                x = args[0] if args else kwargs.get("x")
                out = output[0] if isinstance(output, (tuple, list)) else output
                if isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor):
                    with torch.no_grad():
                        cos = torch.nn.functional.cosine_similarity(x.detach().float(), out.detach().float(), dim=-1)
                        self._values[i] = cos.mean()

            self._handles.append(block.register_forward_hook(hook, with_kwargs=True))

    def end_step(self, step: int, model: Any) -> dict[str, float]:
        out = {K.layer_key(K.DEPTH, i, "cos"): float(v) for i, v in sorted(self._values.items())}
        self._clear()
        return out

    def _clear(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._values.clear()


# ----------------------------------------------------------------------------------------------
# running: ranks take whole runs
# ----------------------------------------------------------------------------------------------


def _rank() -> tuple[int, int]:
    """(rank, world size) the launcher gave this process (no process group: ranks take whole runs)."""
    env = DistEnv.from_launcher()
    return env.rank, env.world_size


def _run_jobs(jobs: Sequence[Job], data: Any, axis: str, resume: bool, rank: int, world: int,
              poll_s: float = 5.0) -> dict[int, RunResult]:
    """Train this rank's share of ``jobs`` (job i goes to rank i mod world), then wait until every
    job has its ``result.json`` and return all results (others' re-read from their directories)."""
    results: dict[int, RunResult] = {}
    for i, job in enumerate(jobs):
        if i % world != rank:
            continue
        extra = [BlockCosineProbe(max(1, job.spec.train.probe_every))] if axis == "depth" else []
        reused = resume and is_finished(job.run_dir, job.spec)
        print(f"ladder[{rank}/{world}]: {job.kind} {job.label} lr {job.spec.train.lr:g} "
              f"({job.spec.train.steps} steps){' — finished, re-read' if reused else ''}", flush=True)
        results[i] = run_variant(job.spec, job.run_dir, data, label=job.label, resume=resume, extra_probes=extra)
    waiting = [i for i in range(len(jobs)) if i not in results]
    last_note = time.monotonic()
    while waiting:
        waiting = [i for i in waiting if not is_finished(jobs[i].run_dir, jobs[i].spec)]
        if waiting:
            if time.monotonic() - last_note > 60:
                print(f"ladder[{rank}/{world}]: waiting for {len(waiting)} run(s) of other ranks", flush=True)
                last_note = time.monotonic()
            time.sleep(poll_s)
    for i, job in enumerate(jobs):
        if i not in results:
            results[i] = run_variant(job.spec, job.run_dir, data, label=job.label, resume=True)
    return results


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
    rank, world = _rank()
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
        done = _run_jobs(tune_jobs, data, axis, lab.resume, rank, world)
        for i, job in enumerate(tune_jobs):
            tuning.setdefault(job.variant.name, []).append((job.spec.train.lr, done[i]))
        lrs = {name: pick_lr([(lr, r.summary) for lr, r in runs], spec.train.lr) for name, runs in tuning.items()}

    jobs = [Job("main", v, p, s, _with_lr(point_specs[p], v, lrs[v.name], s), out / f"{p}" / v.name / f"seed{s}")
            for p in plan["points"] for v in variants for s in seeds]
    results = _run_jobs(jobs, data, axis, lab.resume, rank, world)
    if rank != 0:
        return 0
    wall = time.perf_counter() - t0
    ctx = {"spec": spec, "lab": lab, "opts": opts, "plan": plan, "jobs": jobs, "results": results,
           "lrs": lrs, "tuning": tuning, "data": data.describe(), "wall_s": wall, "point_specs": point_specs}
    paths = (_size_report if axis == "size" else _depth_report)(ctx)
    print(f"report: {paths['report.html']}  ({wall:.0f} s)")
    return 0


def _with_lr(spec: RunSpec, variant: Variant, lr: float, seed: int) -> RunSpec:
    return variant_spec(spec, variant, **{"train.lr": lr, "train.min_lr": lr / 10, "train.seed": seed})


# ----------------------------------------------------------------------------------------------
# reports
# ----------------------------------------------------------------------------------------------


def _ci(v: float, ci: Sequence[float], spec: str = "{:.3g}") -> str:
    lo, hi = ci
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return fmt(v, spec)
    return f"{fmt(v, spec)} [{fmt(lo, spec)}, {fmt(hi, spec)}]"


def _intro(ctx: Mapping[str, Any], extra: Sequence[Sequence[str]]) -> str:
    spec, plan, opts = ctx["spec"], ctx["plan"], ctx["opts"]
    t = spec.train
    rows = [
        ["axis", opts.axis],
        ["variants", ", ".join(v.name for v in plan["variants"])],
        ["seeds", ", ".join(str(s) for s in plan["seeds"])],
        ["corpus", f"{ctx['data'].get('source')} ({ctx['data'].get('train_tokens', 0):,} train tokens, vocabulary "
                   f"{ctx['data'].get('vocab_size')})"],
        ["batch × context", f"{t.batch_size} × {spec.data.seq_len}"],
        ["optimizer", f"AdamW, peak LR {t.lr:g} (unless tuned), warm-up 10 %, cosine to LR/10, grad clip "
                      f"{t.grad_clip:g}, weight decay {t.weight_decay:g}, {t.precision}"],
        ["op implementation", str(spec.model.impl)],
        *extra,
        ["dead", "vanishing gradients or a saturated tanh site (steadylm.lab.summary); dead runs are left out of fits"],
        ["wall time", f"{ctx['wall_s']:.0f} s"],
    ]
    return f"Command: `{command_line() or 'steadylm ladder'}`\n\n" + markdown_table(["setting", "value"], rows)


def _tuning_section(report: Report, ctx: Mapping[str, Any]) -> None:
    if not ctx["tuning"]:
        return
    rows = []
    for name, runs in ctx["tuning"].items():
        for lr, r in runs:
            chosen = "**chosen**" if lr == ctx["lrs"][name] else ""
            rows.append([name, f"{lr:g}", fmt(r.summary.final_val_loss, "{:.4f}"), status(r.summary), chosen])
    report.add_section(
        "Learning-rate tuning",
        f"Each variant at the smallest point ({ctx['plan']['points'][0]}), seed {ctx['plan']['seeds'][0]}, "
        "at every LR of the grid; the LR with the lowest validation loss among runs that neither diverged "
        "nor died is used for the whole ladder.\n\n"
        + markdown_table(["variant", "LR", "val loss", "status", ""], rows))


def _dead_rows(ctx: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for i, job in enumerate(ctx["jobs"]):
        s = ctx["results"][i].summary
        if s.dead or s.diverged:
            rows.append([job.variant.name, str(job.point), str(job.seed), status(s)])
    return rows


def _size_report(ctx: dict[str, Any]) -> dict[str, Path]:
    plan, jobs, results, opts = ctx["plan"], ctx["jobs"], ctx["results"], ctx["opts"]
    names = [v.name for v in plan["variants"]]
    points: dict[str, tuple[list[float], list[float]]] = {n: ([], []) for n in names}
    n_of: dict[int, int] = {}
    for i, job in enumerate(jobs):
        r = results[i]
        n_of[job.point] = _non_embedding(r)
        if r.summary.dead or r.summary.diverged or not math.isfinite(r.summary.final_val_loss):
            continue
        points[job.variant.name][0].append(float(_non_embedding(r)))
        points[job.variant.name][1].append(r.summary.final_val_loss)
    fits: dict[str, PowerLawFit | None] = {}
    fit_errors: dict[str, str] = {}
    for k, n in enumerate(names):
        try:
            fits[n] = fit_power_law(points[n][0], points[n][1], bootstrap=opts.bootstrap, seed=k)
        except ValueError as err:
            fits[n], fit_errors[n] = None, str(err)
    largest = max(n_of.values())
    ref = names[0]

    def gap_at(n: str, size: float) -> tuple[float, tuple[float, float]]:
        a, b = fits.get(n), fits.get(ref)
        if a is None or b is None:
            return math.nan, (math.nan, math.nan)
        g = float(a.predict(size) - b.predict(size))
        if a.samples.shape[0] and b.samples.shape[0]:
            k = min(a.samples.shape[0], b.samples.shape[0])
            d = a.predict_samples(size)[:k] - b.predict_samples(size)[:k]
            lo, hi = np.percentile(d, [2.5, 97.5])
            return g, (float(lo), float(hi))
        return g, (math.nan, math.nan)

    fit_rows, extrap_rows = [], []
    for n in names:
        f = fits[n]
        if f is None:
            fit_rows.append([n, "–", "–", "–", str(len(points[n][0])), "–", f"no fit: {fit_errors[n]}"])
            continue
        fit_rows.append([n, _ci(f.alpha, f.alpha_ci), _ci(f.E, f.E_ci), _ci(f.A, f.A_ci), str(f.n_points),
                         str(f.bootstrap), f"{ctx['lrs'][n]:g}"])
        if n != ref:
            row = [n]
            for mult in (10, 100):
                g, ci = gap_at(n, mult * largest)
                row.append(_ci(g, ci, "{:+.4f}"))
            extrap_rows.append(row)
    size_rows = []
    for p in plan["points"]:
        row = [str(p), f"{n_of[p]:,}", f"{ctx['point_specs'][p].train.steps}"]
        means = {}
        for n in names:
            vals = [results[i].summary.final_val_loss for i, j in enumerate(jobs) if j.point == p and j.variant.name == n]
            vals = [v for v in vals if math.isfinite(v)]
            means[n] = statistics.fmean(vals) if vals else math.nan
            sd = statistics.stdev(vals) if len(vals) > 1 else math.nan
            row.append(fmt(means[n], "{:.4f}") + ("" if math.isnan(sd) else f" ± {sd:.4f}"))
        row += [fmt(means[n] - means[ref], "{:+.4f}") for n in names[1:]]
        size_rows.append(row)
    shape_rows = []
    for p in plan["points"]:
        s = ctx["point_specs"][p]
        m = s.model.overrides
        shape_rows.append([str(p), str(m["n_layers"]), str(m["n_heads"]), str(m["ffn_dim"]), f"{n_of[p]:,}",
                           f"{s.train.steps}", f"{s.train.steps * s.train.batch_size * s.data.seq_len:,}"])
    report = Report("steadylm ladder --axis size", _intro(ctx, [
        ["size rule", "n_layers = max(2, round(width/16)), heads of 16 dims, FFN ≈ 8/3·width; N = non-embedding parameters"],
        ["budget", f"{plan['tpp']:g} training tokens per non-embedding parameter (at least 20 steps)"],
    ]))
    report.add_section("Sizes", markdown_table(["width", "layers", "heads", "FFN", "N (non-embedding)", "steps",
                                                "tokens"], shape_rows))
    _tuning_section(report, ctx)
    report.add_section(
        "Fitted laws",
        "L(N) = E + A·N^(−α) per variant on the final validation losses of every run (sizes × seeds), Huber "
        f"loss on log L, L-BFGS from a grid of starts; [95% bootstrap interval] over runs "
        f"({opts.bootstrap} resamples).\n\n"
        + markdown_table(["variant", "α", "E", "A", "runs", "resamples", "LR"], fit_rows)
        + ("\n\n" + markdown_table(["variant", f"gap to {ref} at 10× largest N", "at 100× largest N"], extrap_rows)
           if extrap_rows else ""),
        [("scaling", plots.plot_scaling(points, {n: f.to_dict() for n, f in fits.items() if f},
                                        {n: f.samples for n, f in fits.items() if f}), "Loss against parameters")],
    )
    report.add_section(
        "Loss per size",
        "Final validation loss, mean ± standard deviation over seeds, and the gap to "
        f"{ref} (negative: better).\n\n"
        + markdown_table(["width", "N", "steps"] + names + [f"{n} − {ref}" for n in names[1:]], size_rows))
    dead = _dead_rows(ctx)
    report.add_section("Dead or diverged runs", markdown_table(["variant", "width", "seed", "status"], dead)
                       if dead else "None.")
    summary = {"command": command_line(), "axis": "size", "spec": ctx["spec"].to_dict(), "lab": ctx["lab"],
               "ladder": opts, "lrs": ctx["lrs"],
               "fits": {n: (f.to_dict() if f else {"error": fit_errors[n]}) for n, f in fits.items()},
               "extrapolated_gap": {r[0]: {"10x": r[1], "100x": r[2]} for r in extrap_rows},
               "runs": [{"variant": j.variant.name, "width": j.point, "seed": j.seed, "n_params": n_of[j.point],
                         "summary": results[i].summary} for i, j in enumerate(jobs)],
               "tuning": {n: [{"lr": lr, "summary": r.summary} for lr, r in runs] for n, runs in ctx["tuning"].items()},
               "wall_s": ctx["wall_s"]}
    return write_all(report, ctx["lab"].out, summary)


def _depth_point(rows: Sequence[Mapping[str, Any]], n_layers: int) -> dict[str, Any]:
    hidden_row = next((r for r in reversed(rows) if K.has_family(r, K.HIDDEN)), None)
    layer_var = K.layer_values(hidden_row, K.HIDDEN, "var")
    profile = [layer_var.get(i, math.nan) for i in range(n_layers)]
    cos_row = next((r for r in reversed(rows) if K.has_family(r, K.DEPTH)), None)
    cos = K.layer_values(cos_row, K.DEPTH, "cos")
    lam_row = next((r for r in reversed(rows) if K.has_family(r, K.LAM)), None)
    lams = [v for k, v in (lam_row or {}).items()
            if (p := K.parse_key(k)) and p.family == K.LAM and p.layer is not None]
    return {"layer_var": profile, "last_var": profile[-1] if profile else math.nan,
            "growth": profile[-1] / profile[0] if profile and profile[0] else math.nan,
            "lazy_share": (sum(c > LAZY_COS for c in cos.values()) / len(cos)) if cos else math.nan,
            "lam_max": max((K.num(v) for v in lams), default=math.nan)}


def _depth_report(ctx: dict[str, Any]) -> dict[str, Path]:
    plan, jobs, results = ctx["plan"], ctx["jobs"], ctx["results"]
    names = [v.name for v in plan["variants"]]
    table: dict[str, dict[int, dict[str, Any]]] = {}
    for p in plan["points"]:
        for n in names:
            runs = [(j, results[i]) for i, j in enumerate(jobs) if j.point == p and j.variant.name == n]
            per = [_depth_point(r.rows, p) for _, r in runs]
            vals = {k: statistics.fmean([x[k] for x in per if math.isfinite(x[k])] or [math.nan])
                    for k in ("last_var", "growth", "lazy_share", "lam_max")}
            vals["layer_var"] = per[0]["layer_var"] if per else []
            vals["val_loss"] = statistics.fmean([r.summary.final_val_loss for _, r in runs] or [math.nan])
            vals["status"] = "; ".join(sorted({status(r.summary) for _, r in runs}))
            vals["kappa"] = runs[0][1].spec.model_config(ctx["data"].get("vocab_size") or 4096).bhyt_kappa
            table.setdefault(n, {})[p] = vals
    ref = next((n for n in names if n.endswith("+rmsnorm")), names[0])
    var_rows = []
    for p in plan["points"]:
        row = [str(p)] + [fmt(table[n][p]["last_var"], "{:.3g}") for n in names]
        row += [fmt(table[ref][p]["last_var"] / table[n][p]["last_var"], "{:.3g}×") for n in names if n != ref]
        var_rows.append(row)
    detail = []
    for n in names:
        for p in plan["points"]:
            v = table[n][p]
            detail.append([n, str(p), fmt(v["growth"], "{:.3g}"), fmt(v["lazy_share"], "{:.2f}"),
                           fmt(v["val_loss"], "{:.4f}"), v["status"]])
    bound_rows = []
    for n in names:
        if "bhyt" not in n:
            continue
        for p in plan["points"]:
            v = table[n][p]
            ratio = v["lam_max"] / v["kappa"] if math.isfinite(v["lam_max"]) else math.nan
            bound = 1 / math.sqrt(p)
            bound_rows.append([n, str(p), fmt(v["lam_max"], "{:.3g}"), fmt(ratio, "{:.3g}"), f"{bound:.3g}",
                               "yes" if ratio < bound else ("no" if math.isfinite(ratio) else "–")])
    spec = ctx["spec"]
    report = Report("steadylm ladder --axis depth", _intro(ctx, [
        ["width", f"{plan['width']} (heads of 16 dims, FFN ≈ 8/3·width)"],
        ["depths", ", ".join(str(p) for p in plan["points"])],
        ["steps per run", f"{spec.train.steps} ({spec.train.steps * spec.train.batch_size * spec.data.seq_len:,} tokens)"],
    ]))
    _tuning_section(report, ctx)
    report.add_section(
        "Last-layer hidden-state variance",
        "Mean per-token variance of the residual stream after the last block at the last probe (BHyT paper "
        f"Fig. 3), and {ref}'s divided by each other variant's (BHyT paper: ~25× for BHyT at 1B).\n\n"
        + markdown_table(["depth"] + names + [f"{ref} / {n}" for n in names if n != ref], var_rows),
        [("depth", plots.plot_depth(table, LAZY_COS), "Variance, lazy blocks and loss against depth")],
    )
    report.add_section(
        "Growth, lazy blocks, loss",
        f"Growth: last-layer variance / first-layer variance. Lazy: share of blocks whose output has cosine "
        f"similarity > {LAZY_COS} with their input at the last probe.\n\n"
        + markdown_table(["variant", "depth", "variance growth", "lazy share", "val loss", "status"], detail))
    if bound_rows:
        report.add_section(
            "BHyT and the LayerNorm-Scaling bound",
            "The BHyT paper: if λ/κ < 1/√L, BHyT's per-layer variance stays below LayerNorm-Scaling's. "
            "λ: the largest learned λ over layers and sites at the end of training.\n\n"
            + markdown_table(["variant", "depth L", "max λ", "λ/κ", "1/√L", "λ/κ < 1/√L"], bound_rows))
    dead = _dead_rows(ctx)
    report.add_section("Dead or diverged runs", markdown_table(["variant", "depth", "seed", "status"], dead)
                       if dead else "None.")
    summary = {"command": command_line(), "axis": "depth", "spec": spec.to_dict(), "lab": ctx["lab"],
               "ladder": ctx["opts"], "lrs": ctx["lrs"],
               "depth": {n: {str(p): v for p, v in by.items()} for n, by in table.items()},
               "runs": [{"variant": j.variant.name, "depth": j.point, "seed": j.seed, "summary": results[i].summary}
                        for i, j in enumerate(jobs)],
               "tuning": {n: [{"lr": lr, "summary": r.summary} for lr, r in runs] for n, runs in ctx["tuning"].items()},
               "wall_s": ctx["wall_s"]}
    return write_all(report, ctx["lab"].out, summary)
