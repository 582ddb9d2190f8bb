"""The HTML renderer of report documents (`reports.document`): one page that loads nothing from the network.

Contract: every piece of text in a document is HTML-escaped (`html.escape`, quotes too), so dataset text such
as a question holding `<script>` shows as text and never runs. Only the figures' own markup (plotly's
`to_html`, with fixed element ids) and the page's own pager script go in unescaped. plotly.js is not inlined:
a page with figures loads it with a relative `<script src="plotly.min.js">` (`PLOTLY_JS`), a file that
`reports.output` writes once into the report folder. The page uses no external stylesheet, font, script or
image. Table cells read as `document.cell_text` shows them; text cells are left-aligned, numbers
right-aligned; a `Thumbnail` cell is its image (`<img>`, 64 px) captioned by its name.

Long tables (more than `document.PAGE_ROWS` rows) hold every row, shown a page at a time by a few lines of
inline script with previous / next buttons; without script every row shows. Thumbnails are stored once per
distinct image, in a JSON block at the end of the page, and set on the rows of the page shown.
"""

from __future__ import annotations

import html
import json

from headlab.reports.document import (
    PAGE_ROWS,
    Bullets,
    Document,
    Figure,
    Heading,
    Paragraph,
    Table,
    Thumbnail,
    cell_text,
)

PLOTLY_JS = "plotly.min.js"  # beside report.html

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; }
td.text { text-align: left; }
td.thumb img { display: block; max-width: 64px; max-height: 64px; }
td.thumb span { font-size: 0.8em; color: #555; }
.pager { margin: -1em 0 1.5em; font-size: 0.9em; }
.pager button { margin: 0 0.4em; }
.note { color: #555; }
"""
_NO_SCRIPT = (
    "<noscript><style>.paged tr[hidden] { display: table-row; } .pager { display: none; }</style></noscript>"
)

# Shows page `n` of a paged table: its rows, and the thumbnails of those rows (from the JSON block).
_PAGER = """
(function () {
  var block = document.getElementById("headlab-thumbs");
  var thumbs = block ? JSON.parse(block.textContent) : [];
  function show(box, n) {
    var rows = box.querySelectorAll("tbody > tr"), size = +box.dataset.pageSize;
    var pages = Math.max(1, Math.ceil(rows.length / size));
    n = Math.max(0, Math.min(pages - 1, n));
    box.dataset.page = n;
    rows.forEach(function (row, i) {
      row.hidden = i < n * size || i >= (n + 1) * size;
      if (!row.hidden) {
        row.querySelectorAll("img[data-thumb]").forEach(function (img) {
          if (!img.getAttribute("src")) img.src = thumbs[+img.dataset.thumb];
        });
      }
    });
    var label = box.querySelector(".pager span");
    if (label) label.textContent = "page " + (n + 1) + " of " + pages + " (" + rows.length + " rows)";
  }
  document.querySelectorAll(".paged").forEach(function (box) {
    box.querySelectorAll(".pager button").forEach(function (button) {
      button.addEventListener("click", function () { show(box, +box.dataset.page + +button.dataset.step); });
    });
    show(box, 0);
  });
})();
"""


def esc(value: object) -> str:
    """`value` as text that is safe inside HTML elements and attributes."""
    return html.escape(str(value), quote=True)


class _Thumbs:
    """The distinct thumbnails of a page, numbered in order of first use."""

    def __init__(self) -> None:
        self.index: dict[str, int] = {}

    def cell(self, thumb: Thumbnail) -> str:
        """The cell of a thumbnail: its image (set by the pager script) over its name, or the name alone."""
        name = esc(thumb.name)
        if thumb.data is None:
            return f'<td class="text">{name}</td>'
        n = self.index.setdefault(thumb.data, len(self.index))
        return (
            f'<td class="text thumb"><img data-thumb="{n}" alt="{name}" width="64"><span>{name}</span></td>'
        )

    def block(self) -> str:
        """The JSON block of the thumbnails ("<" written as \\u003c, so it cannot end the block)."""
        data = json.dumps(list(self.index)).replace("<", "\\u003c")
        return f'<script type="application/json" id="headlab-thumbs">{data}</script>'


def _cell(value: object, thumbs: _Thumbs) -> str:
    if isinstance(value, Thumbnail):
        return thumbs.cell(value)
    if value is None or isinstance(value, int | float):
        return f"<td>{cell_text(value)}</td>"
    return f'<td class="text">{esc(cell_text(value))}</td>'


def _table(table: Table, thumbs: _Thumbs) -> str:
    """The table; a paged one (more than one page, or thumbnails to set) in a box with its pager."""
    head = "".join(f"<th>{esc(h)}</th>" for h in table.headers)
    rows = []
    for i, row in enumerate(table.rows):
        hidden = " hidden" if i >= PAGE_ROWS else ""
        rows.append(f"<tr{hidden}>" + "".join(_cell(v, thumbs) for v in row) + "</tr>")
    markup = f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    has_thumbs = any(isinstance(v, Thumbnail) for row in table.rows for v in row)
    if table.pages == 1 and not has_thumbs:
        return markup
    pager = ""
    if table.pages > 1:
        pager = (
            '<nav class="pager"><button type="button" data-step="-1">previous</button>'
            f"<span>page 1 of {table.pages} ({len(table.rows)} rows)</span>"
            '<button type="button" data-step="1">next</button></nav>'
        )
    return f'<div class="paged" data-page-size="{PAGE_ROWS}" data-page="0">{markup}{pager}</div>'


def _figure(block: Figure, number: int) -> str:
    return block.figure.to_html(
        full_html=False,
        include_plotlyjs=False,
        include_mathjax=False,
        div_id=f"figure-{number}",
        config={"displaylogo": False},
    )


def html_page(doc: Document, *, plotly_src: str = PLOTLY_JS) -> str:
    """The document as one HTML page (module docstring); `plotly_src` is where a page with figures loads
    plotly.js from (relative to the page)."""
    parts, thumbs, figures, paged = [], _Thumbs(), 0, False
    for block in doc.blocks:
        if isinstance(block, Heading):
            parts.append(f"<h{block.level}>{esc(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            parts.append(f"<p>{esc(block.text)}</p>")
        elif isinstance(block, Bullets):
            parts.append("<ul>" + "".join(f"<li>{esc(i)}</li>" for i in block.items) + "</ul>")
        elif isinstance(block, Table):
            parts.append(_table(block, thumbs))
            paged = paged or parts[-1].startswith('<div class="paged"')
        else:
            parts.append(_figure(block, figures))
            figures += 1
    head = f'<script src="{esc(plotly_src)}"></script>\n' if figures else ""
    tail = ""
    if paged:
        tail = (thumbs.block() if thumbs.index else "") + f"\n<script>{_PAGER}</script>\n"
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{esc(doc.title)}</title>\n<style>{_STYLE}</style>\n{_NO_SCRIPT}\n{head}</head>\n<body>\n"
        f"<h1>{esc(doc.title)}</h1>\n" + "\n".join(parts) + "\n" + tail + "</body>\n</html>\n"
    )


class Page(Document):
    """A document whose `render()` is its HTML page."""

    def render(self) -> str:
        return html_page(self)
