"""The report document model: a report builds its content once, as a `Document` of blocks, and two renderers
write it: `markdown(doc)` here (report.md) and `reports.html.html_page(doc)` (report.html).

Blocks: `Heading(text, level)`, `Paragraph(text)`, `Bullets(items)`, `Table(headers, rows)` and
`Figure(figure)` (a plotly figure). Every string in a block is data, never markup: the HTML renderer escapes
all of it, and Markdown shows it as text (`md_text`): each text is one line (line breaks and runs of spaces
become one space), `&` and `<` become entities, the characters Markdown reads as inline markup (`\\`,
`` ` ``, `*`, `[`, `|`, `~`, and `_` unless inside a word) are backslash-escaped, and so is a first
character that would open a block outside a table cell (`#`, `>`, `-`, `+`, `=`, a list number's `.` or
`)`). A table cell is shown by `cell_text`, the same in both renderers: None is "n/a" (a metric over zero
answered items), a float has 4 decimals (NaN is "-"), an int is written as is, a `Thumbnail` by its name,
anything else as its text.

Long tables: a table of more than `PAGE_ROWS` rows is shown a page at a time in HTML (every row is in the
page) and by its first page in Markdown, followed by a line saying how many more rows report.html and
report.json hold. Figures are drawn in HTML only; Markdown names each one (by its title) and points to
report.html.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

PAGE_ROWS = 50  # rows per page of a long table


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
class Thumbnail:
    """A table cell showing an image: `name` as text, and in HTML the small image `data` (a `data:image/...`
    URI made by `reports.thumbnails`), or only the name when `data` is None (no image file)."""

    name: str
    data: str | None = None


@dataclass(frozen=True)
class Table:
    headers: tuple[str, ...]
    rows: tuple[tuple[object, ...], ...]

    @property
    def pages(self) -> int:
        """How many pages of `PAGE_ROWS` rows the table shows (at least 1)."""
        return max(1, -(-len(self.rows) // PAGE_ROWS))


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
        """A table; cells as `cell_text` shows them (floats with 4 decimals, None as n/a), long ones paged."""
        self.blocks.append(Table(tuple(headers), tuple(tuple(row) for row in rows)))

    def figure(self, fig) -> None:
        """A plotly figure (drawn in HTML; named in Markdown)."""
        self.blocks.append(Figure(fig))

    @property
    def has_figures(self) -> bool:
        return any(isinstance(block, Figure) for block in self.blocks)


def cell_text(value: object) -> str:
    """A table cell as text: None -> n/a, float -> 4 decimals (NaN -> -), a thumbnail -> its name, anything
    else as its text."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}" if value == value else "-"
    if isinstance(value, Thumbnail):
        return value.name
    return str(value)


# what Markdown reads as inline markup: \ ` * [ | ~ anywhere (a lone "]" opens nothing), and "_" unless it
# stands between two letters or digits (where it can neither open nor close emphasis)
_INLINE = re.compile(r"([\\`*\[|~]|(?<![^\W_])_|_(?![^\W_]))")
_BLOCK_START = re.compile(r"^([#>+=-])|^(\d{1,9})([.)])(?=\s|$)")  # a start that opens a block


def md_text(text: object, *, cell: bool = False) -> str:
    """Data text that Markdown shows as text, on one line (module docstring); a table `cell` cannot open a
    block, so its first character is left as it is (-0.5 stays -0.5)."""
    out = " ".join(str(text).split())
    out = out.replace("&", "&amp;").replace("<", "&lt;")
    out = _INLINE.sub(r"\\\1", out)
    if cell:
        return out
    return _BLOCK_START.sub(lambda m: f"\\{m[1]}" if m[1] else f"{m[2]}\\{m[3]}", out)


def markdown(doc: Document) -> str:
    """The document as Markdown (module docstring)."""
    parts = [f"# {md_text(doc.title)}"]
    for block in doc.blocks:
        if isinstance(block, Heading):
            parts.append(f"{'#' * block.level} {md_text(block.text)}")
        elif isinstance(block, Paragraph):
            parts.append(md_text(block.text))
        elif isinstance(block, Bullets):
            if block.items:
                parts.append("\n".join(f"- {md_text(item)}" for item in block.items))
        elif isinstance(block, Table):
            parts.append("\n".join(_md_table(block)))
            if block.pages > 1:
                more, total = len(block.rows) - PAGE_ROWS, len(block.rows)
                parts.append(f"_{more} more rows: all {total} are in report.html and report.json._")
        else:
            title = f": {md_text(block.title)}" if block.title else ""
            parts.append(f"_Figure{title} (in report.html)._")
    return "\n\n".join(parts) + "\n"


def _md_table(table: Table) -> list[str]:
    """The table's header and its first page of rows."""
    return [
        "| " + " | ".join(md_text(h, cell=True) for h in table.headers) + " |",
        "|" + "---|" * len(table.headers),
        *(
            "| " + " | ".join(md_text(cell_text(v), cell=True) for v in row) + " |"
            for row in table.rows[:PAGE_ROWS]
        ),
    ]
