"""The reports of ``steadylm ladder`` (:mod:`steadylm.lab.ladder`): the size axis (fitted power laws
per variant, loss gaps, extrapolations) and the depth axis (variance growth, lazy blocks, BHyT's
λ/κ against 1/√L), written through :mod:`steadylm.lab.report`.

``size_report(ctx)`` / ``depth_report(ctx)`` take the protocol's context (its spec, options, plan,
jobs and results) and return the written paths.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from steadylm.lab import plots
from steadylm.lab.options import command_line
from steadylm.lab.powerlaw import PowerLawFit, fit_power_law
from steadylm.lab.report import Report, fmt, markdown_table, write_all
from steadylm.lab.runner import RunResult
from steadylm.lab.seeds import SPREAD_RULE, seed_stats, seed_table
from steadylm.lab.summary import status
from steadylm.probes import keys as K

__all__ = ["LAZY_COS", "depth_report", "size_report"]

#: A block whose output has cosine similarity above this with its input barely changes the
#: residual stream: a "lazy" block (the curse of depth).
LAZY_COS = 0.99


def _non_embedding(result: RunResult) -> int:
    return int(result.params["total"]) - int(result.params.get("embedding", 0))


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


def _seed_section(report: Report, ctx: Mapping[str, Any], point_name: str) -> dict[str, Any]:
    """Per point, every variant's numbers over seeds (mean ± sd [min, max]) and † where a difference
    from the first variant exceeds the seed spread (:mod:`steadylm.lab.seeds`); ``{}`` with one seed."""
    plan, jobs, results = ctx["plan"], ctx["jobs"], ctx["results"]
    if len(plan["seeds"]) < 2:
        return {}
    names = [v.name for v in plan["variants"]]
    blocks, out = [], {}
    for p in plan["points"]:
        per = {n: [results[i].summary for i, j in enumerate(jobs) if j.point == p and j.variant.name == n]
               for n in names}
        stats = seed_stats(per)
        out[str(p)] = {n: {k: v.to_dict() for k, v in st.items()} for n, st in stats.items()}
        blocks.append(f"**{point_name} {p}**\n\n" + seed_table(stats, names[0]))
    report.add_section(
        "Spread over seeds",
        f"Seeds {', '.join(map(str, plan['seeds']))} at every {point_name}; each number as mean ± sample "
        f"standard deviation [min, max], and its difference from {names[0]}'s mean. {SPREAD_RULE}\n\n"
        + "\n\n".join(blocks))
    return out


def size_report(ctx: dict[str, Any]) -> dict[str, Path]:
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
    seed_spread = _seed_section(report, ctx, "width")
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
               "seeds": {"rule": SPREAD_RULE, "points": seed_spread} if seed_spread else None,
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


def depth_report(ctx: dict[str, Any]) -> dict[str, Path]:
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
    seed_spread = _seed_section(report, ctx, "depth")
    dead = _dead_rows(ctx)
    report.add_section("Dead or diverged runs", markdown_table(["variant", "depth", "seed", "status"], dead)
                       if dead else "None.")
    summary = {"command": command_line(), "axis": "depth", "spec": spec.to_dict(), "lab": ctx["lab"],
               "ladder": ctx["opts"], "lrs": ctx["lrs"],
               "depth": {n: {str(p): v for p, v in by.items()} for n, by in table.items()},
               "runs": [{"variant": j.variant.name, "depth": j.point, "seed": j.seed, "summary": results[i].summary}
                        for i, j in enumerate(jobs)],
               "tuning": {n: [{"lr": lr, "summary": r.summary} for lr, r in runs] for n, runs in ctx["tuning"].items()},
               "seeds": {"rule": SPREAD_RULE, "points": seed_spread} if seed_spread else None,
               "wall_s": ctx["wall_s"]}
    return write_all(report, ctx["lab"].out, summary)
