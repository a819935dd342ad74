"""A small report builder: markdown sections with PNG figures, written as a self-contained
``report.html`` (figures embedded as base64, no script, no stylesheet or font from the network),
a ``summary.md`` that links the same figures as files under ``plots/``, and the PNGs themselves.

The compare command builds one, and the stress protocols add their own sections to the same
kind of object::

    report = Report("steadylm compare", intro="...")
    report.add_section("Loss", "Train and validation loss ...", [("loss", fig, "caption")])
    paths = report.write(out_dir)        # every file written atomically

A figure may be a matplotlib ``Figure`` (rendered to PNG at :attr:`Report.dpi`) or PNG bytes.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from markdown_it import MarkdownIt

from steadylm.train.atomic import atomic_write_bytes, atomic_write_text

PLOTS_DIR = "plots"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub-style pipe table; cells are converted with ``str`` and ``|`` is escaped."""

    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |"]
    lines.append("|" + "|".join("---" for _ in headers) + "|")
    lines.extend("| " + " | ".join(cell(c) for c in row) + " |" for row in rows)
    return "\n".join(lines)


@dataclass
class ReportFigure:
    name: str  # file stem under plots/, unique within a report
    png: bytes
    caption: str = ""


@dataclass
class ReportSection:
    title: str
    markdown: str = ""
    figures: list[ReportFigure] = field(default_factory=list)


def _slug(text: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug or "section"


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#1d1d1f;line-height:1.45}
h1{border-bottom:2px solid #ddd;padding-bottom:.3em}
h2{margin-top:2em;border-bottom:1px solid #eee;padding-bottom:.2em}
table{border-collapse:collapse;margin:1em 0;font-size:.92em}
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right}
th{background:#f4f4f6}
td:first-child,th:first-child{text-align:left}
code{background:#f4f4f6;padding:.1em .3em;border-radius:3px;font-size:.92em}
pre{background:#f4f4f6;padding:.8em;overflow-x:auto}
figure{margin:1.2em 0}
figure img{max-width:100%;border:1px solid #eee}
figcaption{color:#555;font-size:.9em}
nav ul{columns:2}
"""


class Report:
    """Sections of markdown and figures, rendered to ``report.html`` + ``summary.md`` + PNGs."""

    dpi = 110

    def __init__(self, title: str, intro: str = "") -> None:
        self.title = title
        self.intro = intro
        self.sections: list[ReportSection] = []
        self._names: set[str] = set()

    def add_section(
        self,
        title: str,
        markdown: str = "",
        figures: Iterable[tuple[str, Any, str] | ReportFigure] = (),
    ) -> ReportSection:
        """Append a section. ``figures`` holds ``(name, figure_or_png_bytes, caption)`` tuples
        (or :class:`ReportFigure`); ``name`` becomes ``plots/<name>.png`` and must be unique."""
        section = ReportSection(title, markdown)
        for item in figures:
            fig = item if isinstance(item, ReportFigure) else self._figure(*item)
            if fig.name in self._names:
                raise ValueError(f"figure name {fig.name!r} is used twice in this report")
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", fig.name):
                raise ValueError(f"figure name {fig.name!r}: use letters, digits, '_', '-', '.'")
            self._names.add(fig.name)
            section.figures.append(fig)
        self.sections.append(section)
        return section

    def _figure(self, name: str, figure: Any, caption: str = "") -> ReportFigure:
        if isinstance(figure, (bytes, bytearray)):
            return ReportFigure(name, bytes(figure), caption)
        buf = io.BytesIO()
        figure.savefig(buf, format="png", dpi=self.dpi)
        return ReportFigure(name, buf.getvalue(), caption)

    # -- rendering ---------------------------------------------------------------------------
    def to_markdown(self, plots_dir: str = PLOTS_DIR) -> str:
        parts = [f"# {self.title}", ""]
        if self.intro:
            parts += [self.intro.strip(), ""]
        for sec in self.sections:
            parts += [f"## {sec.title}", ""]
            if sec.markdown:
                parts += [sec.markdown.strip(), ""]
            for fig in sec.figures:
                parts.append(f"![{fig.caption or fig.name}]({plots_dir}/{fig.name}.png)")
                if fig.caption:
                    parts.append(f"*{fig.caption}*")
                parts.append("")
        return "\n".join(parts).rstrip() + "\n"

    def to_html(self) -> str:
        md = MarkdownIt("commonmark", {"html": False}).enable("table")
        esc = html.escape
        body = [f"<h1>{esc(self.title)}</h1>"]
        if self.intro:
            body.append(md.render(self.intro))
        if len(self.sections) > 2:
            items = "".join(
                f'<li><a href="#{_slug(s.title)}-{k}">{esc(s.title)}</a></li>'
                for k, s in enumerate(self.sections)
            )
            body.append(f"<nav><ul>{items}</ul></nav>")
        for k, sec in enumerate(self.sections):
            body.append(f'<section id="{_slug(sec.title)}-{k}"><h2>{esc(sec.title)}</h2>')
            if sec.markdown:
                body.append(md.render(sec.markdown))
            for fig in sec.figures:
                data = base64.b64encode(fig.png).decode("ascii")
                alt = esc(fig.caption or fig.name)
                cap = f"<figcaption>{esc(fig.caption)}</figcaption>" if fig.caption else ""
                body.append(
                    f'<figure><img alt="{alt}" src="data:image/png;base64,{data}">{cap}</figure>'
                )
            body.append("</section>")
        return (
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{esc(self.title)}</title><style>{_CSS}</style></head>\n<body>\n"
            + "\n".join(body)
            + "\n</body></html>\n"
        )

    def write(self, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
        """Write ``report.html``, ``summary.md`` and ``plots/<name>.png`` under ``out_dir``
        (each atomically; the HTML last, so a present report.html means a complete report)."""
        out = Path(out_dir)
        paths: dict[str, Path] = {}
        for sec in self.sections:
            for fig in sec.figures:
                p = out / PLOTS_DIR / f"{fig.name}.png"
                atomic_write_bytes(p, fig.png)
                paths[f"plot:{fig.name}"] = p
        paths["summary.md"] = out / "summary.md"
        atomic_write_text(paths["summary.md"], self.to_markdown())
        paths["report.html"] = out / "report.html"
        atomic_write_text(paths["report.html"], self.to_html())
        return paths


# ----------------------------------------------------------------------------------------------
# helpers every protocol's report uses
# ----------------------------------------------------------------------------------------------


def fmt(value: Any, spec: str) -> str:
    """``spec.format(value)``, or "–" for a missing / NaN value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    try:
        return spec.format(value)
    except (ValueError, TypeError):
        return str(value)


def json_safe(obj: Any) -> Any:
    """``obj`` with non-finite floats as None and dataclasses / paths as plain values (strict JSON)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = obj.to_dict() if hasattr(obj, "to_dict") else dataclasses.asdict(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_all(report: Report, out_dir: str | os.PathLike[str], summary: Any) -> dict[str, Path]:
    """``summary.json`` (``summary`` made strict JSON) and the report files under ``out_dir``."""
    out = Path(out_dir)
    atomic_write_text(out / "summary.json", json.dumps(json_safe(summary), indent=2, default=str) + "\n")
    paths = report.write(out)
    paths["summary.json"] = out / "summary.json"
    return paths
