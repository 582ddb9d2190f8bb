"""The report document model: a report builds its content once, as a `Document` of blocks, and two renderers
write it: `markdown(doc)` here (report.md) and `reports.html.html_page(doc)` (report.html).

Blocks: `Heading(text, level)`, `Paragraph(text)`, `Bullets(items)`, `Table(headers, rows)` and
`Figure(figure)` (a plotly figure). Every string in a block is data, never markup: the HTML renderer escapes
all of it, and Markdown escapes what a Markdown viewer would read as markup or HTML (`&`, `<`; in tables
also `|`; line breaks become spaces). A table cell is shown by `cell_text`, the same in both renderers:
None is "n/a" (a metric over zero answered items), a float has 4 decimals (NaN is "-"), an int is written
as is, anything else as its text. Figures are drawn in HTML only; Markdown names each one (by its title)
and points to report.html.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2  # 1 is the document's title


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Bullets:
    items: tuple[str, ...]


@dataclass(frozen=True)
class Table:
    headers: tuple[str, ...]
    rows: tuple[tuple[object, ...], ...]


@dataclass(frozen=True)
class Figure:
    figure: object  # a plotly Figure

    @property
    def title(self) -> str:
        title = self.figure.layout.title.text
        return str(title) if title else ""


Block = Heading | Paragraph | Bullets | Table | Figure


class Document:
    """A report's content, block by block, in reading order (module docstring)."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.blocks: list[Block] = []

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(Heading(text, level))

    def paragraph(self, text: str) -> None:
        self.blocks.append(Paragraph(text))

    def bullets(self, items: Sequence[str]) -> None:
        self.blocks.append(Bullets(tuple(items)))

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
        """A table; cells as `cell_text` shows them (floats with 4 decimals, None as n/a)."""
        self.blocks.append(Table(tuple(headers), tuple(tuple(row) for row in rows)))

    def figure(self, fig) -> None:
        """A plotly figure (drawn in HTML; named in Markdown)."""
        self.blocks.append(Figure(fig))


def cell_text(value: object) -> str:
    """A table cell as text: None -> n/a, float -> 4 decimals (NaN -> -), anything else as its text."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}" if value == value else "-"
    return str(value)


def _md(text: object, *, cell: bool = False) -> str:
    """Data text that Markdown shows as text: no HTML, no table breaks, one line in a cell."""
    out = str(text).replace("&", "&amp;").replace("<", "&lt;")
    if cell:
        out = " ".join(out.replace("|", "\\|").split())
    return out


def markdown(doc: Document) -> str:
    """The document as Markdown (module docstring)."""
    parts = [f"# {_md(doc.title)}"]
    for block in doc.blocks:
        if isinstance(block, Heading):
            parts.append(f"{'#' * block.level} {_md(block.text)}")
        elif isinstance(block, Paragraph):
            parts.append(_md(block.text))
        elif isinstance(block, Bullets):
            if block.items:
                parts.append("\n".join(f"- {_md(item)}" for item in block.items))
        elif isinstance(block, Table):
            parts.append("\n".join(_md_table(block)))
        else:
            title = f": {_md(block.title)}" if block.title else ""
            parts.append(f"_Figure{title} (in report.html)._")
    return "\n\n".join(parts) + "\n"


def _md_table(table: Table) -> list[str]:
    return [
        "| " + " | ".join(_md(h, cell=True) for h in table.headers) + " |",
        "|" + "---|" * len(table.headers),
        *("| " + " | ".join(_md(cell_text(v), cell=True) for v in row) + " |" for row in table.rows),
    ]
