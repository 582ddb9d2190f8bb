"""The store's lock (an flock on STORE/.lock), held only for short critical sections:
- `Store.append`'s last step: re-read the committed shards, check the new ids against them, write shard.json
  and rename the shard into place, so two writers never commit the same (example, condition);
- writes to manifest.json; and `store verify --repair` (quarantining while no shard is being committed).
Writing a shard's files needs no lock (each writer owns its own temp folder). Readers never lock.

Where it holds: local disks, and network filesystems whose flock is seen by every client: NFSv4 (the Linux
client maps flock to NFS byte-range locks), NFSv3 with the lock daemon (not mounted `nolock` or
`local_lock=flock|all`), Lustre mounted `-o flock`. Where flock is only local to each host (those NFS
options, Lustre `-o localflock`, some FUSE filesystems), writers on different hosts can commit the same
(example, condition) twice; readers then keep the first commit (catalog.py: shards ordered by creation time
and id), so nothing reads twice, and `headlab store verify` still passes. Where flock is refused (Lustre
without a flock option: ENOSYS), `locked` raises a StoreError saying so instead of writing unlocked.
"""

from __future__ import annotations

import errno
import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from headlab.errors import StoreError

_UNSUPPORTED = {errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL}


@contextmanager
def locked(root: Path) -> Iterator[None]:
    """Hold the store's exclusive lock while inside (blocks until other holders leave)."""
    with open(root / ".lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError as err:
            if err.errno not in _UNSUPPORTED:
                raise
            raise StoreError(
                f"{root}: the filesystem refuses file locks ({err.strerror}), which several writers of one "
                "store need; put the store on a local disk or a filesystem with flock (NFSv4, NFSv3 with "
                "lockd, Lustre mounted -o flock)"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
