"""A self-contained HTML page writer shared by the reports: headings, paragraphs, tables, lists and plotly
figures, in one file that loads nothing from the network.

Contract: every piece of text given to a `Page` is HTML-escaped (`html.escape`, quotes too), so dataset text
such as a question holding `<script>` shows as text and never runs. Only the figures' own markup (plotly's
`to_html`) goes in unescaped. The plotly.js bundle is inlined once, with the first figure; later figures
reuse it. The page uses no external stylesheet, font, script or image. A missing number (None: a metric
over zero answered items) shows as "n/a". `Page.write` replaces the file atomically (`reports.output`).
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

from headlab.reports.output import write_text_atomic

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; }
td.text { text-align: left; }
.note { color: #555; }
"""


def esc(value: object) -> str:
    """`value` as text that is safe inside HTML elements and attributes."""
    return html.escape(str(value), quote=True)


def _cell(value: object) -> str:
    if value is None:
        return "<td>n/a</td>"
    if isinstance(value, float):
        return f"<td>{value:.4f}</td>" if value == value else "<td>-</td>"
    if isinstance(value, int):
        return f"<td>{value}</td>"
    return f'<td class="text">{esc(value)}</td>'


class Page:
    """An HTML document built section by section; `write` saves it as one self-contained file."""

    def __init__(self, title: str) -> None:
        self.title = title
        self._parts: list[str] = []
        self._plotly_inlined = False

    def heading(self, text: str, level: int = 2) -> None:
        self._parts.append(f"<h{level}>{esc(text)}</h{level}>")

    def paragraph(self, text: str, *, note: bool = False) -> None:
        cls = ' class="note"' if note else ""
        self._parts.append(f"<p{cls}>{esc(text)}</p>")

    def bullets(self, items: Sequence[str]) -> None:
        self._parts.append("<ul>" + "".join(f"<li>{esc(i)}</li>" for i in items) + "</ul>")

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
        """A table; floats are shown with 4 decimals, strings escaped and left-aligned."""
        head = "".join(f"<th>{esc(h)}</th>" for h in headers)
        body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
        self._parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")

    def figure(self, fig) -> None:
        """A plotly figure; the plotly.js bundle is inlined with the first one (no CDN)."""
        self._parts.append(
            fig.to_html(
                full_html=False,
                include_plotlyjs=not self._plotly_inlined,
                include_mathjax=False,
                config={"displaylogo": False},
            )
        )
        self._plotly_inlined = True

    def render(self) -> str:
        return (
            '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>{esc(self.title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
            f"<h1>{esc(self.title)}</h1>\n" + "\n".join(self._parts) + "\n</body>\n</html>\n"
        )

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, self.render())
        return path
