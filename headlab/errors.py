"""headlab's errors: each says what was wrong and what to do about it.

Every error a user can cause (a bad path, an unsupported model, a selection out of range, an input longer
than the model's context) is raised as a subclass of `HeadlabError`, so callers can catch one type and
the CLI can print the message without a traceback.
"""

from __future__ import annotations


class HeadlabError(Exception):
    """Base class of every error headlab raises on purpose."""


class ModelLoadError(HeadlabError):
    """The model could not be loaded (missing path, offline hub id, unreadable checkpoint)."""


class UnsupportedModelError(HeadlabError):
    """The architecture is not one headlab knows how to attach to."""


class SelectionError(HeadlabError):
    """A layer, head, query or role selection does not fit the model or the input."""


class InputError(HeadlabError):
    """The model input is unusable as given (too long, missing a role it was asked about, ...)."""


class StoreError(HeadlabError):
    """Stored data cannot be used or written: an activation store that is missing, corrupted, from a newer
    headlab or for another model, or an output file (a report, an answer log) that cannot be written."""
