"""What every run says about its items: why one failed, how complete the run is, and how it reports progress.

Contract:
- `reason(err)`: why an item failed, for a report or a listing: a HeadlabError's own message, else the
  exception's type and text. One item's failure is listed with it and never stops the others.
- `Outcome`: how complete a run is, and the exit code the CLI gives it: 0 complete (every item of the input
  done under every condition), 1 partial (something was written but some items are missing: bad input
  records, unusable images, failed answers), 2 nothing usable (no item done; a `HeadlabError` also exits
  2), 130 interrupted (rerun to resume; interruption wins over the others).
- `Progress`: the callback a run is given to show its progress: `progress(description, total)` is called
  once per group of work and returns a `tick()` called after each item of it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

from headlab.errors import HeadlabError

Progress = Callable[[str, int], Callable[[], None]]  # (description, total) -> tick


def reason(err: BaseException) -> str:
    """Why an item failed: a HeadlabError's message, else the exception's type and text."""
    return str(err) if isinstance(err, HeadlabError) else f"{type(err).__name__}: {err}"


@dataclass(frozen=True, kw_only=True)
class Outcome:
    """How complete a run is (module docstring: the exit codes)."""

    items: int  # what the input asks for: usable items x conditions
    answered: int  # of those, done (now or by an earlier run)
    failed: int  # items that failed in this run (listed)
    bad_input: int  # input records that never became items (malformed, image missing)
    interrupted: bool = False

    @property
    def status(self) -> str:
        if self.interrupted:
            return "interrupted"
        if self.answered == 0:
            return "empty"
        if self.failed or self.bad_input or self.answered < self.items:
            return "partial"
        return "complete"

    @property
    def exit_code(self) -> int:
        return {"complete": 0, "partial": 1, "empty": 2, "interrupted": 130}[self.status]

    def as_dict(self) -> dict:
        return asdict(self) | {"status": self.status, "exit_code": self.exit_code}
