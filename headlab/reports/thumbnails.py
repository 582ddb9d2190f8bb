"""Small inline images of a report's questions: the thumbnails of the flipped-answer tables.

Contract: `Thumbnails(size)` makes, once per image file, a JPEG of at most `size` x `size` pixels (aspect kept)
as a `data:image/jpeg;base64,...` URI, with PIL, opening the file through `inputs.open_image` (so a missing,
unreadable or oversized file is refused by the same rules as answering). `get(path)` is that URI, or None
when the file cannot be used or `limit` distinct images were already made (the table then shows the name
only). Nothing is fetched from the network and nothing is written to disk.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

THUMBNAIL_PX = 64
THUMBNAIL_LIMIT = 1000  # distinct images per report; beyond it tables show names only


class Thumbnails:
    """Data URIs of small JPEGs, made once per image file (module docstring)."""

    def __init__(self, size: int = THUMBNAIL_PX, limit: int = THUMBNAIL_LIMIT) -> None:
        self.size, self.limit = size, limit
        self.made: dict[Path, str | None] = {}

    def get(self, path: Path) -> str | None:
        """The thumbnail of the image at `path`, or None (module docstring)."""
        path = Path(path)
        if path not in self.made:
            if len(self.made) >= self.limit:
                return None
            self.made[path] = _thumbnail(path, self.size)
        return self.made[path]


def _thumbnail(path: Path, size: int) -> str | None:
    from headlab.errors import InputError
    from headlab.inputs import open_image

    try:
        image = open_image(path)
    except InputError:
        return None
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=75)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
