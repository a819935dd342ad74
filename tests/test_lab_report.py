"""The report writer and the plots, on synthetic metric rows (no training)."""

from __future__ import annotations

import base64
import math
from pathlib import Path

import pytest
from matplotlib.figure import Figure

from steadylm.lab import plots
from steadylm.lab.report import Report, markdown_table

PNG = b"\x89PNG\r\n\x1a\n"


def _rows(n_layers: int = 3, moe: bool = False, bhyt: bool = False, scale: float = 1.0) -> list[dict]:
    rows = []
    for step in range(1, 31):
        r: dict = {"step": step, "loss": 8.0 - 0.1 * step + (2.0 if step == 25 else 0.0), "tokens_per_s": 1000.0}
        if step % 10 == 0:
            r["val_loss"] = 8.1 - 0.1 * step
        if step == 1 or step % 5 == 0:
            for i in range(n_layers):
                tags = ["/routed", "/shared"] if moe and i > 0 else [""]
                for tag in tags:
                    base = f"ffn_down_in/layer{i}{tag}"
                    r.update({f"{base}/min": -scale * (i + 1), f"{base}/max": 2 * scale * (i + 1),
                              f"{base}/p1": -0.1 * scale, f"{base}/p99": 0.2 * scale,
                              f"{base}/amax": 2 * scale * (i + 1), f"{base}/kurtosis": 5.0,
                              f"{base}/max_rms": 10.0})
                r[f"hidden/layer{i}/l2"] = 3.0 + i + step / 10
                r[f"hidden/layer{i}/var"] = 1.0 + i + step / 10
                if bhyt:
                    r[f"bhyt/layer{i}/pearson_r"] = 0.9 + 0.003 * step
                    r[f"sat/layer{i}/attn_norm"] = 0.001 * step
                    r[f"lam/layer{i}/attn_norm"] = 2.0 + 0.001 * step
                    r[f"lam/layer{i}/ffn_norm"] = 1.0
        rows.append(r)
    return rows


RUNS = {"swiglu+rmsnorm": _rows(scale=5.0), "powlu+bhyt": _rows(bhyt=True), "moe": _rows(moe=True)}
SAMPLES = {"powlu+bhyt": {f"layer{i}": {"v_true": [1.0, 2.0, 3.0], "v_approx": [1.1, 2.1, 2.9]} for i in range(3)}}


@pytest.mark.parametrize(
    "make",
    [
        lambda: plots.plot_activation_functions(),
        lambda: plots.plot_losses(RUNS, {"swiglu+rmsnorm": [25]}),
        lambda: plots.plot_down_proj_bands(RUNS),
        lambda: plots.plot_hidden_states(RUNS),
        lambda: plots.plot_bhyt_variance(RUNS, SAMPLES),
        lambda: plots.plot_saturation(RUNS),
        lambda: plots.plot_throughput({"a": 1000.0, "b": 2500.0}),
    ],
    ids=["activations", "losses", "bands", "hidden", "bhyt", "saturation", "throughput"],
)
def test_every_plot_renders(make, tmp_path: Path) -> None:
    fig = make()
    assert isinstance(fig, Figure)
    fig.savefig(tmp_path / "x.png", dpi=40)
    assert (tmp_path / "x.png").read_bytes()[:8] == PNG


def test_plots_without_the_data_they_need_still_render(tmp_path: Path) -> None:
    empty = {"swiglu+rmsnorm": [{"step": 1, "loss": 5.0}]}
    for fig in (plots.plot_down_proj_bands(empty), plots.plot_hidden_states(empty),
                plots.plot_bhyt_variance(empty, {}), plots.plot_saturation(empty), plots.plot_losses({})):
        assert isinstance(fig, Figure)
        fig.savefig(tmp_path / "x.png", dpi=30)
        assert (tmp_path / "x.png").read_bytes()[:8] == PNG


def test_series_and_layer_helpers() -> None:
    rows = [{"step": 1, "a": 1.0}, {"step": 2}, {"step": 3, "a": None}]
    steps, vals = plots.series(rows, "a")
    assert list(steps) == [1, 3] and vals[0] == 1.0 and math.isnan(vals[1])
    assert plots.layer_count(RUNS["moe"], "ffn_down_in") == 3
    assert plots.layer_count(RUNS["moe"], "bhyt") == 0


def test_markdown_table_escapes_pipes() -> None:
    assert markdown_table(["a", "b"], [["x|y", 1]]) == "| a | b |\n|---|---|\n| x\\|y | 1 |"


def test_report_writes_html_markdown_and_pngs(tmp_path: Path) -> None:
    rep = Report("A <title>", intro="Intro with **bold** and <script>alert(1)</script>.")
    rep.add_section("Numbers", markdown_table(["k", "v"], [["x", 1]]),
                    [("throughput", plots.plot_throughput({"a": 1.0}), "a caption")])
    rep.add_section("Raw", "text only", [("raw", PNG + b"rest", "")])
    paths = rep.write(tmp_path)
    html = paths["report.html"].read_text()
    assert html.startswith("<!DOCTYPE html>") and "<table>" in html and "<strong>bold</strong>" in html
    assert "<script>" not in html and "&lt;script&gt;" in html  # user text is escaped, never live
    assert "&lt;title&gt;" in html
    b64 = base64.b64encode(PNG + b"rest").decode()
    assert f'src="data:image/png;base64,{b64}"' in html
    assert "http" not in html.replace("http-equiv", "")
    md = paths["summary.md"].read_text()
    assert "![a caption](plots/throughput.png)" in md and "## Raw" in md
    assert (tmp_path / "plots" / "raw.png").read_bytes() == PNG + b"rest"
    assert not [p for p in tmp_path.rglob("*.tmp")]  # atomic writes leave no temp files


def test_report_rejects_duplicate_and_unsafe_figure_names() -> None:
    rep = Report("r")
    rep.add_section("a", "", [("fig", PNG, "")])
    with pytest.raises(ValueError, match="twice"):
        rep.add_section("b", "", [("fig", PNG, "")])
    with pytest.raises(ValueError, match="letters"):
        rep.add_section("c", "", [("../evil", PNG, "")])
