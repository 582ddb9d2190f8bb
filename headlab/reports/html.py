"""The HTML renderer of report documents (`reports.document`): one self-contained page that loads nothing from
the network.

Contract: every piece of text in a document is HTML-escaped (`html.escape`, quotes too), so dataset text such
as a question holding `<script>` shows as text and never runs. Only the figures' own markup (plotly's
`to_html`) goes in unescaped. The plotly.js bundle is inlined once, with the first figure; later figures
reuse it. The page uses no external stylesheet, font, script or image. Table cells read as
`document.cell_text` shows them; text cells are left-aligned, numbers right-aligned.
"""

from __future__ import annotations

import html

from headlab.reports.document import Bullets, Document, Figure, Heading, Paragraph, Table, cell_text

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
    if value is None or isinstance(value, int | float):
        return f"<td>{cell_text(value)}</td>"
    return f'<td class="text">{esc(cell_text(value))}</td>'


def _table(table: Table) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in table.headers)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in table.rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure(block: Figure, first: bool) -> str:
    return block.figure.to_html(
        full_html=False, include_plotlyjs=first, include_mathjax=False, config={"displaylogo": False}
    )


def html_page(doc: Document) -> str:
    """The document as one self-contained HTML page (module docstring)."""
    parts, inlined = [], False
    for block in doc.blocks:
        if isinstance(block, Heading):
            parts.append(f"<h{block.level}>{esc(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            parts.append(f"<p>{esc(block.text)}</p>")
        elif isinstance(block, Bullets):
            parts.append("<ul>" + "".join(f"<li>{esc(i)}</li>" for i in block.items) + "</ul>")
        elif isinstance(block, Table):
            parts.append(_table(block))
        else:
            parts.append(_figure(block, first=not inlined))
            inlined = True
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{esc(doc.title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        f"<h1>{esc(doc.title)}</h1>\n" + "\n".join(parts) + "\n</body>\n</html>\n"
    )


class Page(Document):
    """A document whose `render()` is its HTML page."""

    def render(self) -> str:
        return html_page(self)
