"""The store's lock (an flock on STORE/.lock), held only for short critical sections:
- `Store.append`'s last step: re-read the committed shards, check the new ids against them, write shard.json
  and rename the shard into place, so two local writers never commit the same (example, condition);
- writes to manifest.json; and `store verify --repair` (quarantining while no shard is being committed).
Writing a shard's files needs no lock (each writer owns its own temp folder). Readers never lock. On a
filesystem where flock does not hold across hosts (some NFS), duplicates can still be committed; readers
then keep the first commit (catalog.py)."""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def locked(root: Path) -> Iterator[None]:
    with open(root / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
