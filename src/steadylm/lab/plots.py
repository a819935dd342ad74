"""The lab's figures, built from metric rows (the dicts of ``metrics.jsonl``).

Every function returns a ``matplotlib.figure.Figure`` made without pyplot (no global state, no
GUI backend: ``Figure.savefig`` renders through Agg), so the lab runs headless and in threads.
Metric keys are built and parsed with :mod:`steadylm.probes.keys` (``ffn_down_in/layer3/p99`` ...).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # the lab never opens a window; set before anything imports pyplot

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from steadylm import functional as Fn
from steadylm.probes import keys as K

Rows = Sequence[Mapping[str, float]]
Runs = Mapping[str, Rows]

_LAYER_RE = re.compile(r"layer(\d+)")


def _colors(n: int) -> list:
    cmap = matplotlib.colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def series(rows: Rows, key: str, step_key: str = "step") -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the rows that have ``key`` (non-finite values kept as NaN)."""
    xs, ys = [], []
    for r in rows:
        if key in r and step_key in r:
            v = r[key]
            xs.append(r[step_key])
            ys.append(float(v) if isinstance(v, (int, float)) and v is not None else math.nan)
    return np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)


def layer_count(rows: Rows, prefix: str) -> int:
    """Number of layers that have keys ``{prefix}/layer{i}/...`` in any row."""
    return K.layer_count(rows, prefix)


def last_row_with(rows: Rows, key: str) -> Mapping[str, float] | None:
    for r in reversed(rows):
        if key in r:
            return r
    return None


def _no_data(ax, text: str = "no data") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#888")
    ax.set_xticks([])
    ax.set_yticks([])


# --------------------------------------------------------------------------------------------
# activation functions (PowLU paper, Fig. 1)
# --------------------------------------------------------------------------------------------


def _value_and_grad(fn, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    x = x.clone().requires_grad_(True)
    y = fn(x)
    (g,) = torch.autograd.grad(y.sum(), x)
    return y.detach().numpy(), g.detach().numpy()


def plot_activation_functions(m: float = 3.0, clip_limit: float = 7.0) -> Figure:
    """Gates and the scalar (u = x) activations with their derivatives, from ``steadylm.functional``.

    Top: the gate g(z) — SiLU (SwiGLU), the PowLU gate f_m, the clipped SiLU of SwiGLU-Clip
    ("clamp" form). Bottom: the scalar activations x·g(x) that the gated FFN becomes when gate and
    up see the same input: SwiGLU grows like x², PowLU like x, the clipped form stops at L·x.
    Derivatives by autograd in float64.
    """
    z = torch.linspace(-6.0, 30.0, 1441, dtype=torch.float64)
    ones = torch.ones_like(z)
    gates = {
        "SiLU (SwiGLU)": lambda t: Fn.swiglu(t, ones),
        f"PowLU gate $f_{{{m:g}}}$": lambda t: Fn.powlu_gate(t, m),
        f"clipped SiLU, L={clip_limit:g}": lambda t: Fn.swiglu_clip(
            t, ones, limit=clip_limit, variant="clamp"
        ),
    }
    scalars = {
        r"$x\cdot$silu$(x)$ (SwiGLU, u=x)": lambda t: Fn.swiglu(t, t),
        f"PowLU $x f_{{{m:g}}}(x)$": lambda t: Fn.powlu(t, m),
        f"clamp SwiGLU-Clip, L={clip_limit:g}": lambda t: Fn.swiglu_clip(
            t, t, limit=clip_limit, variant="clamp"
        ),
    }
    fig = Figure(figsize=(11, 7.5), layout="constrained")
    axes = fig.subplots(2, 2)
    colors = _colors(3)
    x = z.numpy()
    for row, (fns, title) in enumerate(((gates, "gate g(z)"), (scalars, "x · g(x)"))):
        for (label, fn), c in zip(fns.items(), colors):
            y, dy = _value_and_grad(fn, z)
            axes[row, 0].plot(x, y, color=c, label=label, lw=1.8)
            axes[row, 1].plot(x, dy, color=c, label=label, lw=1.8)
        axes[row, 0].set_title(title)
        axes[row, 1].set_title(f"derivative of {title}")
        for ax in axes[row]:
            ax.axhline(0, color="#999", lw=0.6)
            ax.axvline(0, color="#999", lw=0.6)
            ax.grid(alpha=0.3)
            ax.set_xlabel("z" if row == 0 else "x")
            ax.legend(fontsize=8, loc="upper left")
    axes[1, 0].set_yscale("symlog", linthresh=1.0)
    axes[1, 0].set_ylim(bottom=-0.5)
    axes[1, 0].set_title("x · g(x)  (symlog y: SwiGLU ~ x², PowLU ~ x)")
    fig.suptitle(f"Activation functions and their derivatives (m = {m:g})")
    return fig


# --------------------------------------------------------------------------------------------
# training curves
# --------------------------------------------------------------------------------------------


def plot_losses(
    runs: Runs,
    spikes: Mapping[str, Sequence[int]] | None = None,
    loss_key: str = "loss",
    val_key: str = "val_loss",
    grad_norm_key: str = "grad_norm",
) -> Figure:
    """Train loss (left; detected spikes as red ×), validation loss (middle) and the global
    gradient norm before clipping (right, log scale) per variant."""
    fig = Figure(figsize=(16, 4.6), layout="constrained")
    ax_tr, ax_va, ax_gn = fig.subplots(1, 3)
    spikes = spikes or {}
    top = start = -math.inf
    for (name, rows), c in zip(runs.items(), _colors(len(runs))):
        st, lv = series(rows, loss_key)
        if len(st):
            ax_tr.plot(st, lv, color=c, lw=1.1, label=name)
            fin = lv[np.isfinite(lv)]
            if len(fin):
                top = max(top, float(fin.max()))
                start = max(start, float(fin[0]))
            sp = set(spikes.get(name, ()))
            if sp:
                mask = np.isin(st, sorted(sp))
                ax_tr.scatter(st[mask], lv[mask], marker="x", s=60, color="red", zorder=5, lw=2)
        sv, vv = series(rows, val_key)
        if len(sv):
            ax_va.plot(sv, vv, color=c, marker="o", ms=3.5, lw=1.4, label=name)
        sg, gv = series(rows, grad_norm_key)
        if len(sg):
            ax_gn.plot(sg, gv, color=c, lw=1.0, label=name)
    # a diverged run (loss 1e3) must not flatten every other curve: cap at 1.5x the starting loss
    if math.isfinite(top) and top > 1.5 * start > 0:
        ax_tr.set_ylim(top=1.5 * start)
    if any(spikes.values()):
        ax_tr.scatter([], [], marker="x", color="red", label="loss spike")
    ax_tr.set_title("train loss")
    ax_va.set_title("validation loss")
    ax_gn.set_title("global gradient norm (before clipping)")
    ax_tr.set_ylabel("cross-entropy (nats/token)")
    ax_va.set_ylabel("cross-entropy (nats/token)")
    ax_gn.set_ylabel("L2 norm")
    if ax_gn.lines:
        ax_gn.set_yscale("log")
    for ax in (ax_tr, ax_va, ax_gn):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            _no_data(ax)
    return fig


def _band_parts(row: Mapping[str, float], prefix: str) -> list[str]:
    """The expert parts present in a row: [""] for dense, ["routed", "shared"] for MoE."""
    parts = set()
    for key in row:
        k = K.parse_key(key)
        if k is not None and k.family == prefix and k.layer is not None and k.stat == "p99":
            parts.add(k.part)
    return sorted(parts)


def plot_down_proj_bands(runs: Runs, prefix: str = "ffn_down_in") -> Figure:
    """Per-layer min–max (light) and P1–P99 (dark) bars of the FFN down-projection input at the
    last probed step, one panel per variant on a shared symlog y-axis (PowLU paper, Fig. 2).
    MoE layers show routed and shared experts side by side."""
    names = list(runs)
    ncols = min(3, max(1, len(names)))
    nrows = max(1, math.ceil(len(names) / ncols))
    fig = Figure(figsize=(4.3 * ncols, 3.5 * nrows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, sharey=True, squeeze=False)).ravel()
    amax_all, p99_min = 1e-3, math.inf
    for ax, name in zip(axes, names):
        row = next((r for r in reversed(runs[name]) if _band_parts(r, prefix)), None)
        ax.set_title(name if row is None else f"{name} (step {int(row.get('step', -1))})", fontsize=10)
        if row is None:
            _no_data(ax)
            continue
        parts = _band_parts(row, prefix)
        width = 0.7 / len(parts)
        for j, (tag, c) in enumerate(zip(parts, _colors(len(parts)))):
            layers = sorted(K.layer_values(row, prefix, "p99", part=tag))
            xs = np.asarray(layers, dtype=float) + (j - (len(parts) - 1) / 2) * width

            def get(stat: str, tag: str = tag, layers: list[int] = layers) -> np.ndarray:
                vals = K.layer_values(row, prefix, stat, part=tag)
                return np.asarray([vals.get(i, math.nan) for i in layers])

            mn, mx, p1, p99 = get("min"), get("max"), get("p1"), get("p99")
            label = (tag or "dense") + " " if len(parts) > 1 else ""
            ax.bar(xs, mx - mn, bottom=mn, width=width, color=c, alpha=0.3, label=f"{label}min–max")
            ax.bar(xs, p99 - p1, bottom=p1, width=width * 0.6, color=c, alpha=0.9, label=f"{label}P1–P99")
            mag = np.abs(np.concatenate([mn, mx]))
            mag = mag[np.isfinite(mag)]
            if len(mag):
                amax_all = max(amax_all, float(mag.max()))
            spread = np.abs(np.concatenate([p1, p99]))
            spread = spread[np.isfinite(spread) & (spread > 0)]
            if len(spread):
                p99_min = min(p99_min, float(spread.min()))
        ax.axhline(0, color="#555", lw=0.6)
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7, loc="upper left", ncol=2 if len(parts) > 1 else 1)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    # linear inside the bulk of the smallest variant, logarithmic beyond, so that both the bulk
    # and the outliers of every variant stay readable on one shared axis
    linthresh = 10.0 ** math.floor(math.log10(min(0.1, p99_min))) if math.isfinite(p99_min) else 0.1
    # decade ticks only outside the linear zone (ticks at ±linthresh would crowd the 0 label)
    lo_exp, hi_exp = round(math.log10(linthresh)) + 1, math.ceil(math.log10(2.0 * amax_all))
    decades = [10.0**k for k in range(lo_exp, hi_exp + 1)]
    ticks = sorted([-d for d in decades] + [0.0] + decades)
    for ax in axes[: len(names)]:
        ax.set_yscale("symlog", linthresh=linthresh)
        ax.set_ylim(-2.0 * amax_all, 2.0 * amax_all)
        ax.set_yticks(ticks)
    axes[0].set_ylabel("FFN down-projection input (symlog)")
    fig.suptitle("FFN down-projection input per layer: min–max and P1–P99 (last probed step)")
    return fig


def plot_hidden_states(runs: Runs) -> Figure:
    """Hidden state after each block (BHyT paper, Fig. 3): per-layer variance and L2 norm at the
    last probed step (top), and per-layer curves over training for the last layer (bottom)."""
    fig = Figure(figsize=(12, 8), layout="constrained")
    axes = fig.subplots(2, 2)
    any_data = False
    for (name, rows), c in zip(runs.items(), _colors(len(runs))):
        n = layer_count(rows, K.HIDDEN)
        if n == 0:
            continue
        any_data = True
        row = last_row_with(rows, K.layer_key(K.HIDDEN, n - 1, "var"))
        layers = np.arange(1, n + 1)
        for ax, stat in ((axes[0, 0], "var"), (axes[0, 1], "l2")):
            ax.plot(layers, [row.get(K.layer_key(K.HIDDEN, i, stat), math.nan) for i in range(n)],
                    marker="o", color=c, label=name)
        for ax, stat in ((axes[1, 0], "var"), (axes[1, 1], "l2")):
            st, v = series(rows, K.layer_key(K.HIDDEN, n - 1, stat))
            ax.plot(st, v, color=c, label=name)
    titles = (
        ("hidden-state variance after each block (last probed step)", "layer", "mean per-token variance"),
        ("hidden-state L2 norm after each block (last probed step)", "layer", "mean per-token L2 norm"),
        ("last layer's hidden-state variance over training", "step", "mean per-token variance"),
        ("last layer's hidden-state L2 norm over training", "step", "mean per-token L2 norm"),
    )
    for ax, (t, xl, yl) in zip(axes.ravel(), titles):
        ax.set_title(t, fontsize=10)
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        if any_data:
            ax.set_yscale("log")
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=8)
        else:
            _no_data(ax)
    if any_data:
        for ax in axes[0]:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig


def plot_bhyt_variance(
    runs: Runs, samples: Mapping[str, Mapping[str, Mapping[str, Sequence[float]]]]
) -> Figure:
    """BHyT second site: approximated v' against the true mean(h²) per token (left; one colour per
    layer, the last probed step, Pearson r in the legend) and Pearson r per layer over training."""
    names = [n for n in runs if layer_count(runs[n], K.BHYT) > 0 or samples.get(n)]
    fig = Figure(figsize=(5.0 * max(1, len(names)) + 4.5, 4.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(names) + 1, squeeze=False)).ravel()
    if not names:
        for ax in axes:
            _no_data(ax, "no BHyT variant in this run")
        return fig
    for ax, name in zip(axes, names):
        by_layer = samples.get(name, {})
        lo, hi = math.inf, 0.0
        for (layer, d), c in zip(sorted(by_layer.items(), key=lambda kv: int(_LAYER_RE.search(kv[0]).group(1))), _colors(len(by_layer))):
            vt, va = np.asarray(d["v_true"]), np.asarray(d["v_approx"])
            if len(vt) < 2:
                continue
            r = float(np.corrcoef(vt, va)[0, 1])
            ax.scatter(vt, va, s=6, alpha=0.5, color=c, label=f"{layer}: r={r:.3f}")
            pos = np.concatenate([vt, va])
            pos = pos[np.isfinite(pos) & (pos > 0)]
            if len(pos):
                lo, hi = min(lo, float(pos.min())), max(hi, float(pos.max()))
        if math.isfinite(lo) and hi > 0:
            ax.plot([lo, hi], [lo, hi], color="k", lw=0.8, ls="--", label="y = x")
            ax.set_xscale("log")
            ax.set_yscale("log")
        ax.set_xlabel("true mean(h²) per token")
        ax.set_ylabel("approximated v' per token")
        ax.set_title(f"{name}: v' vs true (last probed step)", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, markerscale=2)
    ax = axes[-1]
    for name, ls in zip(names, ("-", "--", ":", "-.")):
        n = layer_count(runs[name], K.BHYT)
        for i, c in zip(range(n), _colors(n)):
            st, r = series(runs[name], K.layer_key(K.BHYT, i, "pearson_r"))
            ax.plot(st, r, color=c, ls=ls, marker=".", label=f"{name} layer{i}")
    ax.set_title("Pearson r(v', true) over training", fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel("Pearson r over tokens")
    ax.axhline(0.99, color="#999", lw=0.8, ls="--")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def plot_saturation(runs: Runs) -> Figure:
    """tanh norms: saturation (fraction of |tanh| > 0.95, worst site per step) and the learnable
    scale λ (BHyT) / α (DyT), mean over layers per site, over training."""
    fig = Figure(figsize=(12, 4.4), layout="constrained")
    ax_s, ax_p = fig.subplots(1, 2)
    plotted = False
    for (name, rows), c in zip(runs.items(), _colors(len(runs))):
        sat_keys = sorted({k for r in rows for k in r if (p := K.parse_key(k)) and p.family == K.SAT})
        if sat_keys:
            plotted = True
            st, _ = series(rows, sat_keys[0])
            worst = [max((r[k] for k in sat_keys if _finite(r.get(k))), default=math.nan)
                     for r in rows if "step" in r and sat_keys[0] in r]
            ax_s.plot(st, worst, color=c, label=name)
        for site, ls in (("attn_norm", "-"), ("ffn_norm", "--"), ("final_norm", ":")):
            keys = sorted({k for r in rows for k in r
                           if (p := K.parse_key(k)) and p.family in (K.LAM, K.ALPHA) and p.stat == site})
            if not keys:
                continue
            xs, ys = [], []
            for r in rows:
                vals = [r[k] for k in keys if _finite(r.get(k))]
                if vals and "step" in r:
                    xs.append(r["step"])
                    ys.append(sum(vals) / len(vals))
            sym = "λ" if K.parse_key(keys[0]).family == K.LAM else "α"
            ax_p.plot(xs, ys, color=c, ls=ls, label=f"{name}: {sym} {site}")
    ax_s.set_title("tanh saturation: fraction of |tanh| > 0.95 (worst site)", fontsize=10)
    ax_s.set_ylabel("fraction")
    ax_p.set_title("learnable scale λ (BHyT) / α (DyT), mean over layers", fontsize=10)
    for ax in (ax_s, ax_p):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    if not plotted:
        _no_data(ax_s, "no tanh norm in this run")
    if not ax_p.lines:
        _no_data(ax_p, "no tanh norm in this run")
    return fig


def plot_throughput(tokens_per_s: Mapping[str, float]) -> Figure:
    """Training throughput (tokens/s, probe steps included) per variant."""
    names = list(tokens_per_s)
    fig = Figure(figsize=(8, 0.45 * len(names) + 1.4), layout="constrained")
    ax = fig.subplots()
    vals = [tokens_per_s[n] for n in names]
    bars = ax.barh(names, vals, color=_colors(len(names)))
    ax.bar_label(bars, labels=[f"{v:,.0f}" for v in vals], padding=3, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("training tokens / s")
    ax.set_xlim(0, 1.15 * max(vals, default=1.0) or 1.0)
    ax.grid(alpha=0.3, axis="x")
    ax.set_title("throughput")
    return fig


# --------------------------------------------------------------------------------------------
# stress protocols: LR sensitivity, loss grids, FP8 counters
# --------------------------------------------------------------------------------------------


def _grid_figure(ncols: int, nrows: int = 1, w: float = 4.2, h: float = 3.4) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(w * ncols, h * nrows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    return fig, axes


def plot_lr_sensitivity(grid: Mapping[str, Mapping[float, Mapping[str, object]]], base_lr: float) -> Figure:
    """One column per activation against the peak LR (log axis). ``grid[act][multiplier]`` is a
    run summary (``final_train_loss``, ``spikes``, ``diverged``, ``down_in_amax_peak``). Top: final
    loss, diverged runs as red × at the top of the panel, spike counts as labels. Bottom: the peak
    FFN down-projection input (max |x| over layers and probes, shared log axis)."""
    n = len(grid)
    fig, axes = _grid_figure(n, 2, h=3.0)

    def val(s: Mapping[str, object], key: str) -> float:
        return K.num(s.get(key))

    finite = [val(s, "final_train_loss") for runs in grid.values() for s in runs.values()]
    finite = [v for v in finite if math.isfinite(v)]
    span = (max(finite) - min(finite)) if finite else 1.0
    top = max(finite) + 0.25 * max(span, 0.05) if finite else 1.0
    bottom = min(finite) - 0.1 * max(span, 0.05) if finite else 0.0
    amax_axes = axes[n:]
    for j, ((act, runs), color) in enumerate(zip(grid.items(), _colors(n))):
        ax, ax_amax = axes[j], amax_axes[j]
        mults = sorted(runs)
        lrs = [base_lr * m for m in mults]
        diverged = {m: bool(runs[m].get("divergence")) for m in mults}
        ok = [(lr, val(runs[m], "final_train_loss")) for lr, m in zip(lrs, mults) if not diverged[m]]
        if ok:
            ax.plot([x for x, _ in ok], [y for _, y in ok], "o-", color=color, label="final train loss")
        div = [lr for lr, m in zip(lrs, mults) if diverged[m]]
        if div:
            ax.scatter(div, [top] * len(div), marker="x", s=80, color="red", lw=2, label="diverged", zorder=5)
        for lr, m in zip(lrs, mults):
            k = int(val(runs[m], "spikes") or 0) if math.isfinite(val(runs[m], "spikes")) else 0
            y = top if diverged[m] else val(runs[m], "final_train_loss")
            if math.isfinite(y):
                ax.annotate(f"{k} spk", (lr, y), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
        ax.set_ylim(bottom, top + 0.1 * max(span, 0.05))
        ax.set_title(f"{act} (1× = {base_lr:g})")
        ax.legend(fontsize=8, loc="upper left")
        amax = [(lr, val(runs[m], "down_in_amax_peak")) for lr, m in zip(lrs, mults)]
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


def plot_loss_grid(panels: Mapping[str, Runs], spikes: Mapping[str, Mapping[str, Sequence[int]]],
                   vline: int | None = None) -> Figure:
    """One panel per key of ``panels`` (each a set of named runs): train loss over steps, spikes as red ×."""
    fig, axes = _grid_figure(len(panels), w=4.6)
    for ax, (title, runs) in zip(axes, panels.items()):
        starts = []
        for (name, rows), c in zip(runs.items(), _colors(len(runs))):
            st, lv = series(rows, K.LOSS)
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


def plot_fp8_counters(runs: Runs) -> Figure:
    """Per FP8 run: quantisation SNR per tensor role (top) and overflow + underflow fraction (bottom)."""
    fig, axes = _grid_figure(len(runs), 2, w=4.4, h=3.0)
    n = len(runs)
    for j, (name, rows) in enumerate(runs.items()):
        ax_snr, ax_cnt = axes[j], axes[n + j]
        for role, c in zip(K.FP8_ROLES, _colors(3)):
            st, snr = series(rows, K.fp8_key("snr_db", role))
            if len(st):
                ax_snr.plot(st, snr, color=c, label=role)
            st, ov = series(rows, K.fp8_key("overflow_frac", role))
            _, un = series(rows, K.fp8_key("underflow_frac", role))
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


# --------------------------------------------------------------------------------------------
# ladders: loss against parameters with fitted laws, variance against depth
# --------------------------------------------------------------------------------------------


def plot_scaling(
    points: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    fits: Mapping[str, Mapping[str, object]],
    bands: Mapping[str, np.ndarray] | None = None,
    extrapolate: float = 100.0,
) -> Figure:
    """Log-log final loss against parameters: one colour per variant, one dot per run (seed),
    the fitted L(N) = E + A·N^(−α) to ``extrapolate``× the largest size, and its bootstrap 95%
    band (``bands[variant]``: parameter samples, rows (E, A, α)). Right: the loss gap of every
    variant to the first one, measured (dots) and fitted (line)."""
    fig = Figure(figsize=(13, 4.8), layout="constrained")
    ax, ax_gap = fig.subplots(1, 2)
    names = list(points)
    all_n = [n for xs, _ in points.values() for n in xs]
    if not all_n:
        _no_data(ax)
        _no_data(ax_gap)
        return fig
    grid = np.geomspace(min(all_n), max(all_n) * extrapolate, 200)
    curves: dict[str, np.ndarray] = {}
    for name, c in zip(names, _colors(len(names))):
        xs, ys = points[name]
        ax.scatter(xs, ys, color=c, s=18, alpha=0.8, label=name)
        fit = fits.get(name) or {}
        e, a, al = (K.num(fit.get(k)) for k in ("E", "A", "alpha"))
        if all(math.isfinite(v) for v in (e, a, al)):
            curves[name] = e + a * grid ** (-al)
            ax.plot(grid, curves[name], color=c, lw=1.3,
                    label=f"{name}: α = {al:.3g}" + (" (CI " + "–".join(f"{v:.3g}" for v in fit["alpha_ci"]) + ")"
                                                    if fit.get("alpha_ci") else ""))
            samples = None if bands is None else bands.get(name)
            if samples is not None and len(samples):
                s = np.asarray(samples, dtype=float)
                lcurves = s[:, 0:1] + s[:, 1:2] * grid[None, :] ** (-s[:, 2:3])
                lo, hi = np.nanpercentile(lcurves, [2.5, 97.5], axis=0)
                ax.fill_between(grid, lo, hi, color=c, alpha=0.15, lw=0)
    ax.axvline(max(all_n), color="#999", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters N (non-embedding)")
    ax.set_ylabel("final validation loss")
    ax.set_title("loss vs parameters: fits L = E + A·N^(−α), bootstrap 95% bands")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    ref = names[0]
    for name, c in zip(names[1:], _colors(len(names))[1:]):
        if name in curves and ref in curves:
            ax_gap.plot(grid, curves[name] - curves[ref], color=c, label=f"{name} − {ref} (fit)")
        xs, ys = points[name]
        rx, ry = points[ref]
        by_n: dict[float, list[float]] = {}
        for n, y in zip(rx, ry):
            by_n.setdefault(n, []).append(y)
        gaps = [(n, y - float(np.mean(by_n[n]))) for n, y in zip(xs, ys) if n in by_n]
        if gaps:
            ax_gap.scatter([g[0] for g in gaps], [g[1] for g in gaps], color=c, s=14)
    ax_gap.axhline(0, color="#555", lw=0.8)
    ax_gap.axvline(max(all_n), color="#999", ls=":", lw=1)
    ax_gap.set_xscale("log")
    ax_gap.set_xlabel("parameters N (non-embedding)")
    ax_gap.set_ylabel(f"loss gap to {ref}")
    ax_gap.set_title("gap per size (dots) and extrapolated (line)")
    ax_gap.grid(alpha=0.3, which="both")
    if ax_gap.get_legend_handles_labels()[0]:  # the 0-lines have no label
        ax_gap.legend(fontsize=7)
    else:
        _no_data(ax_gap, "one variant: no gap")
    return fig


def plot_depth(table: Mapping[str, Mapping[int, Mapping[str, object]]], lazy_cos: float) -> Figure:
    """The depth ladder, one line per norm: last-layer hidden-state variance against depth,
    per-layer variance at the largest depth, the share of lazy blocks, and the final loss.
    ``table[norm][depth]`` holds ``last_var``, ``layer_var`` (list), ``lazy_share`` and ``val_loss``."""
    fig = Figure(figsize=(13, 8), layout="constrained")
    (ax_v, ax_p), (ax_l, ax_loss) = fig.subplots(2, 2)
    for (norm, by_depth), c in zip(table.items(), _colors(len(table))):
        depths = sorted(by_depth)
        for ax, key in ((ax_v, "last_var"), (ax_l, "lazy_share"), (ax_loss, "val_loss")):
            ys = [K.num(by_depth[d].get(key)) for d in depths]
            ax.plot(depths, ys, "o-", color=c, label=norm)
        if depths:
            profile = by_depth[depths[-1]].get("layer_var") or []
            ax_p.plot(np.arange(1, len(profile) + 1), profile, color=c, marker=".", label=f"{norm} (L={depths[-1]})")
    ax_v.set_yscale("log")
    ax_p.set_yscale("log")
    for ax, (title, xl, yl) in zip(
        (ax_v, ax_p, ax_l, ax_loss),
        (("last-layer hidden-state variance", "depth L", "mean per-token variance"),
         ("hidden-state variance per layer, deepest model", "layer", "mean per-token variance"),
         (f"share of lazy blocks (cos(input, output) > {lazy_cos:g})", "depth L", "share of blocks"),
         ("final validation loss", "depth L", "cross-entropy"))):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3, which="both")
        if ax.lines:
            ax.legend(fontsize=7)
        else:
            _no_data(ax)
    for ax in (ax_v, ax_l, ax_loss):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle("The curse of depth: variance growth and lazy blocks per norm")
    return fig
