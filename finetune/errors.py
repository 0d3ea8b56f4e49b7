"""User-facing errors.

Every mistake a user can make (a bad recipe key, a missing file, a checkpoint of another
architecture, no network) is raised as a :class:`FinetuneError`. The command line prints its
message as one paragraph and exits non-zero without a traceback; library callers can catch it.
"""

from __future__ import annotations


class FinetuneError(Exception):
    """An error the user can fix; ``str(err)`` says what was wrong and what to do."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} {fix}" if fix else problem)


class SourceNotFoundError(FinetuneError):
    """A model name, file or folder that does not exist."""


class CheckpointError(FinetuneError):
    """A checkpoint that is corrupt, unsafe, or does not match the architecture."""


class OfflineError(FinetuneError):
    """Weights that are not in the local cache while the hub cannot be reached."""


class GridError(FinetuneError, ValueError):
    """An image size, patch size or position-embedding resize that cannot work."""


class DataError(FinetuneError):
    """A data set that is missing, unreadable, or does not fit the recipe's ``data`` section."""
