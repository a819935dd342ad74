"""The ``steadylm scan`` report: markdown tables and figures through :class:`steadylm.lab.report.Report`."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from steadylm.lab.plots import plot_down_proj_bands
from steadylm.lab.report import Report, fmt, markdown_table
from steadylm.probes import keys as K

__all__ = ["build_report"]

#: A channel this many times above the median channel counts as a massive activation (the
#: "massive activations" literature reports ratios in the hundreds to thousands).
MASSIVE_RATIO = 100.0


def _layer_rows(metrics: dict[str, float], family: str, stat: str) -> dict[int, float]:
    return K.layer_values(metrics, family, stat)


def _depth_figure(result: dict[str, Any]) -> Figure:
    fig = Figure(figsize=(11, 3.6), layout="constrained")
    ax_var, ax_logit = fig.subplots(1, 2)
    var = _layer_rows(result["metrics"], K.HIDDEN, "var")
    layers = sorted(var)
    ax_var.plot([i + 1 for i in layers], [var[i] for i in layers], marker="o", label="checkpoint")
    for name, switched in result["what_if"].items():
        v = _layer_rows(switched["metrics"], K.HIDDEN, "var")
        ax_var.plot([i + 1 for i in layers], [v.get(i, math.nan) for i in layers], marker=".", ls="--", label=name)
    ax_var.set(title="hidden-state variance after each block", xlabel="layer", ylabel="mean per-token variance",
               yscale="log")
    ax_var.legend(fontsize=8)
    logits = result["attention_max_logit"]
    ax_logit.bar([int(i) + 1 for i in logits], list(logits.values()), color="#4c72b0")
    ax_logit.set(title="attention max logit q·k/√d", xlabel="layer", ylabel="max logit")
    for ax in (ax_var, ax_logit):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig


def _fp8_figure(rows: list[dict[str, Any]]) -> Figure:
    fig = Figure(figsize=(11, 3.8), layout="constrained")
    ax_u, ax_s = fig.subplots(1, 2)
    names = [r["module"] for r in rows]
    x = np.arange(len(rows))
    ax_u.bar(x, [100 * r["underflow_frac"] for r in rows], color="#dd8452")
    ax_u.set(title="e4m3 underflow (current scaling)", ylabel="% of input elements flushed to 0")
    ax_s.bar(x, [r["snr_db"] if math.isfinite(r["snr_db"]) else np.nan for r in rows], color="#55a868")
    ax_s.set(title="e4m3 quantisation SNR", ylabel="dB")
    for ax in (ax_u, ax_s):
        ax.set_xticks(x, names, rotation=90, fontsize=6)
        ax.grid(alpha=0.3, axis="y")
    return fig


def build_report(result: dict[str, Any]) -> Report:
    """The report of a :func:`steadylm.scan.scan` result."""
    cfg = result["model"]
    report = Report(
        "steadylm scan",
        intro=(
            f"{result.get('source', 'model')}: {cfg['n_layers']} layers × {cfg['dim']} wide, "
            f"activation `{cfg['activation']}`, norm `{cfg['norm']}`, "
            f"{result['params']['total']:,} parameters. Text: {result['tokens']:,} tokens of "
            f"`{result.get('data', '?')}` in {result['windows']} windows of {result['seq_len']}. "
            "Statistics pool every token (kurtosis is Pearson's: normal = 3)."
        ),
    )
    m = result["metrics"]
    top = {(r["layer"], r["part"]): r for r in result["outlier_channels"] if r["family"] == "ffn_down_in"}
    rows = []
    for (layer, part), ch in sorted(top.items()):
        def stat(name: str, layer: int = layer, part: str = part) -> float:
            return K.num(m.get(K.layer_key(K.DOWN_IN, layer, name, part)))
        label = f"{layer}" + (f" {part}" if part else "")
        rows.append([label, fmt(stat("max"), "{:.3g}"), fmt(stat("p99"), "{:.3g}"),
                     fmt(stat("kurtosis"), "{:.1f}"), fmt(stat("max_rms"), "{:.1f}"),
                     ch["channel"], fmt(ch["ratio"], "{:.1f}"),
                     "yes" if ch["ratio"] >= MASSIVE_RATIO else ""])
    runs = {"checkpoint": [{**m, "step": 0}]}
    runs.update({f"gate → {k}": [{**v["metrics"], "step": 0}] for k, v in result["what_if"].items()})
    report.add_section(
        "FFN down-projection input",
        "Per layer, the input of the FFN down-projection (the activation output): max, P99, "
        "kurtosis, max/RMS, and its largest channel (the hidden unit with the largest |value| over "
        f"the text) with its ratio to the median channel; ≥ {MASSIVE_RATIO:g}× is marked massive.\n\n"
        + markdown_table(["layer", "max", "P99", "kurtosis", "max/RMS", "top channel", "× median", "massive"], rows),
        [("down_proj_bands", plot_down_proj_bands(runs), "min–max and P1–P99 per layer, checkpoint and gate switches")],
    )
    residual = [r for r in result["outlier_channels"] if r["family"] == "hidden"]
    var = _layer_rows(m, K.HIDDEN, "var")
    logits = result["attention_max_logit"]
    report.add_section(
        "Hidden state and attention with depth",
        markdown_table(
            ["layer", "variance", "top residual channel", "× median", "attention max logit"],
            [[r["layer"], fmt(var.get(r["layer"]), "{:.3g}"), r["channel"], fmt(r["ratio"], "{:.1f}"),
              fmt(logits.get(r["layer"]), "{:.3g}")] for r in residual],
        ),
        [("depth", _depth_figure(result), "hidden-state variance after each block; attention max logit")],
    )
    fp8 = result["fp8"]
    worst = sorted(fp8, key=lambda r: -r["underflow_frac"])[:12]
    report.add_section(
        "FP8 risk (e4m3, per-tensor current scaling)",
        "Each linear layer's input quantised with scale = 448/amax per call (SPEC §4). Current "
        "scaling maps amax onto the format's maximum, so overflow is 0 by construction; the cost "
        "of an outlier is underflow and a lower SNR for the bulk. Largest underflow first:\n\n"
        + markdown_table(["linear input", "underflow", "overflow", "SNR (dB)", "amax"],
                         [[r["module"], fmt(100 * r["underflow_frac"], "{:.2f}%"),
                           fmt(100 * r["overflow_frac"], "{:.2f}%"), fmt(r["snr_db"], "{:.1f}"),
                           fmt(r["amax"], "{:.3g}")] for r in worst]),
        [("fp8_risk", _fp8_figure(fp8), "e4m3 underflow and SNR of every linear layer's input")],
    )
    base_amax = K.max_over_layers(m, K.DOWN_IN, "amax")
    base_kurt = K.max_over_layers(m, K.DOWN_IN, "kurtosis")
    switch_rows = []
    for name, v in result["what_if"].items():
        amax = K.max_over_layers(v["metrics"], K.DOWN_IN, "amax")
        kurt = K.max_over_layers(v["metrics"], K.DOWN_IN, "kurtosis")
        switch_rows.append([name, fmt(amax, "{:.3g}"), fmt(amax / base_amax if base_amax else math.nan, "{:.2f}×"),
                            fmt(kurt, "{:.1f}"), fmt(v["kl"], "{:.4f}"), fmt(100 * v["top1_agree"], "{:.1f}%")])
    report.add_section(
        "What-if: switch the gate, keep the weights",
        "The same weights with every FFN gate switched (the PowLU paper's mid-training switch, "
        "before any training resumes): the largest down-projection input and kurtosis over all "
        "layers, and how far the outputs move — KL(p_checkpoint ‖ p_switched) per token (nats) and "
        "the share of tokens whose most likely next token is unchanged.\n\n"
        + markdown_table(["gate", "max |down input|", "vs checkpoint", "max kurtosis", "KL (nats)", "top-1 same"],
                         [["checkpoint", fmt(base_amax, "{:.3g}"), "1.00×", fmt(base_kurt, "{:.1f}"), "0", "100%"]]
                         + switch_rows),
    )
    return report
