"""Data parallelism on torch.distributed: which process this is, its slice of the input, and the collective
steps a data-parallel command needs (wait for the others, gather their counts). headlab launches nothing and
schedules nothing: `torchrun --nproc-per-node N -m headlab ...` or `accelerate launch -m headlab ...` start
the processes and set RANK, WORLD_SIZE and LOCAL_RANK (and the rendezvous address); this module reads them.

Contract:
- `world()` -> (rank, size) from the environment: (0, 1) when WORLD_SIZE is unset or 1. A single process never
  touches torch.distributed (not even its import).
- `shard(items, rank, size)`: the rank's disjoint, deterministic slice. Items are ordered by a stable hash of
  their id (its kind and value, never the file position or Python's salted `hash`) and dealt round-robin, so
  slices differ in size by at most one, every item is in exactly one slice, and a rerun of the same input
  gives every rank the same slice. The slice keeps the input order. Resuming does not rely on the split: every
  rank skips what is committed, whoever committed it.
- `process_group()`: a context manager that initialises the gloo process group when WORLD_SIZE > 1 (and none
  is initialised yet) and destroys it on exit, even on error; it yields a `World`. gloo runs on every host
  (CPU tensors only: the collectives here move small Python objects, never activations). The timeout of the
  collectives is long (`TIMEOUT`): a rank that has finished its slice may wait hours for a slower one.
- `World.barrier()`, `World.gather(obj)` (every rank's `obj`, in rank order, on every rank): no-ops on one
  process. `World.sweep(items)` / `World.collect(results)`: a sweep every rank lists alike (an analysis's
  heads), each rank running its share, the results joined in the sweep's order on every rank.
- `current()`: the `World` of this process inside `process_group()` (a single process outside). If a rank dies, the launcher (torchrun's agent) stops the others; committed shards stay, and a
  rerun of the same command resumes.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

from headlab.errors import InputError

T = TypeVar("T")

TIMEOUT = timedelta(days=7)  # collectives wait this long for the slowest rank (gloo's default is 30 min)


def world() -> tuple[int, int]:
    """(rank, size) from RANK and WORLD_SIZE as torchrun / accelerate set them; (0, 1) without them."""
    size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", -1) if size > 1 else 0  # several processes without a rank: refused below
    if size < 1 or not 0 <= rank < size:
        raise InputError(
            f"RANK={os.environ.get('RANK')!r} WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} do not describe a "
            "process of a group; launch with `torchrun --nproc-per-node N -m headlab ...` or unset them"
        )
    return rank, size


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise InputError(f"{name}={text!r} is not an integer; it is set by the launcher (torchrun)") from None


def stable_key(ident: int | str) -> bytes:
    """A hash of an example id that is the same in every process and run (int 1 and str "1" differ)."""
    text = f"{'int' if isinstance(ident, int) else 'str'}:{ident}"
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()


def shard(
    items: Sequence[T], rank: int, size: int, *, key: Callable[[T], int | str] = lambda it: it.id
) -> list[T]:
    """The items rank `rank` of `size` takes (module docstring), in input order."""
    if size == 1:
        return list(items)
    order = sorted(range(len(items)), key=lambda i: (stable_key(key(items[i])), i))
    mine = sorted(order[rank::size])
    return [items[i] for i in mine]


@dataclass(frozen=True)
class World:
    """This process's place in the group; the collectives are no-ops for a single process."""

    rank: int = 0
    size: int = 1

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        """Whether this is rank 0, the process that writes merged results and prints summaries."""
        return self.rank == 0

    def shard(self, items: Sequence[T], *, key: Callable[[T], int | str] = lambda it: it.id) -> list[T]:
        return shard(items, self.rank, self.size, key=key)

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def sweep(self, items: Sequence[T]) -> list[tuple[int, T]]:
        """This rank's share of a sweep every rank lists alike (an analysis's heads): (index, item) pairs;
        `collect` puts the ranks' results back in index order."""
        return shard(list(enumerate(items)), self.rank, self.size, key=lambda pair: pair[0])

    def collect(self, results: Sequence[tuple[int, T]]) -> list[T]:
        """Every rank's (index, result) pairs of a `sweep`, as one list in index order, on every rank."""
        merged = [pair for part in self.gather(list(results)) for pair in part]
        return [result for _, result in sorted(merged, key=lambda pair: pair[0])]

    def gather(self, obj: T) -> list[T]:
        """Every rank's `obj` (picklable; small: counts, lists of messages), in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list = [None] * self.size
        dist.all_gather_object(out, obj)
        return out


class NotMainRank(Exception):
    """Raised on ranks other than 0 once their share of a data-parallel report is done and gathered: rank 0
    alone writes the report (the command exits 0 quietly on the others)."""


def current() -> World:
    """This process's `World` inside `process_group()` (or any initialised torch.distributed group), else
    a single process."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return World()
    import torch.distributed as dist

    if not dist.is_initialized():
        return World()
    return World(rank=dist.get_rank(), size=dist.get_world_size())


@contextmanager
def process_group() -> Iterator[World]:
    """This process's `World`, with the gloo group initialised while inside when WORLD_SIZE > 1."""
    rank, size = world()
    if size == 1:
        yield World()
        return
    import torch.distributed as dist

    owned = not dist.is_initialized()
    if owned:  # env:// reads MASTER_ADDR / MASTER_PORT (or torchrun's agent store) set by the launcher
        dist.init_process_group("gloo", rank=rank, world_size=size, timeout=TIMEOUT)
    try:
        yield World(rank=dist.get_rank(), size=dist.get_world_size())
        if owned:  # every rank done before any tears the group down: a rank that destroys its gloo group
            dist.barrier()  # while a peer still holds it can abort at exit ("terminate called ...")
    finally:
        if owned and dist.is_initialized():
            dist.destroy_process_group()
