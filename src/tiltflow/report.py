"""A small self-contained HTML report: sections of text, tables and PNG figures.

Figures are written next to the HTML file and linked relatively, so a run directory can be
copied or zipped as a whole. Later capabilities add their own sections to the demo report.
"""

from __future__ import annotations

import html
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from .fileio import atomic_write_bytes, atomic_write_text

__all__ = ["Report", "Section", "save_figure"]


def save_figure(fig, path: Path) -> Path:
    """Save a matplotlib figure as PNG (atomically) and close it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


@dataclass
class Section:
    title: str
    text: str = ""
    images: list[tuple[str, str]] = field(default_factory=list)  # (file name, caption)
    tables: list[tuple[list[str], list[list]]] = field(default_factory=list)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


class Report:
    """Collects sections and writes ``report.html`` (+ ``report.json`` with the tables)."""

    def __init__(self, title: str, out_dir):
        self.title = title
        self.out_dir = Path(out_dir)
        self.sections: list[Section] = []

    def section(self, title: str, text: str = "") -> Section:
        s = Section(title, text)
        self.sections.append(s)
        return s

    def write(self, name: str = "report.html") -> Path:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        parts = [
            "<!doctype html><html><head><meta charset='utf-8'>",
            f"<title>{html.escape(self.title)}</title>",
            "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;"
            "padding:0 1em;color:#222}h2{border-bottom:1px solid #ddd;padding-bottom:.2em}"
            "table{border-collapse:collapse;margin:.5em 0 1em}td,th{border:1px solid #ccc;"
            "padding:.25em .6em;text-align:right}th{background:#f4f4f4}figure{display:inline-block;"
            "margin:.5em 1em .5em 0;vertical-align:top}figcaption{font-size:.9em;color:#555;"
            "max-width:520px}img{max-width:520px;border:1px solid #eee}</style></head><body>",
            f"<h1>{html.escape(self.title)}</h1>",
        ]
        for s in self.sections:
            parts.append(f"<h2>{html.escape(s.title)}</h2>")
            if s.text:
                parts += [f"<p>{html.escape(p)}</p>" for p in s.text.strip().split("\n\n")]
            for header, rows in s.tables:
                parts.append("<table><tr>" + "".join(f"<th>{_fmt(h)}</th>" for h in header) + "</tr>")
                parts += ["<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in r) + "</tr>" for r in rows]
                parts.append("</table>")
            for fname, caption in s.images:
                parts.append(f"<figure><img src='{html.escape(fname)}' alt='{html.escape(caption)}'>"
                             f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        parts.append("</body></html>")
        path = self.out_dir / name
        atomic_write_text(path, "\n".join(parts))
        tables = {s.title: [dict(zip(h, r, strict=True)) for h, rows in s.tables for r in rows]
                  for s in self.sections}
        atomic_write_text(path.with_suffix(".json"), json.dumps(tables, indent=1, default=str))
        return path

