"""User-facing errors.

Every mistake a user can make (a bad recipe key, a missing file, a checkpoint of another
architecture, no network, a run folder in use) is raised as a :class:`FinetuneError`. The command
line prints its message as one paragraph and exits non-zero without a traceback; library callers
can catch it. Every error class lives here, so ``finetune.errors`` is the one place to look.
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


class PushError(FinetuneError):
    """A run that cannot be pushed to the Hugging Face hub: not a finished run, no model, a bad
    repository id, offline, no token, or refused by the hub."""


class GridError(FinetuneError, ValueError):
    """An image size, patch size or position-embedding resize that cannot work."""


class DataError(FinetuneError):
    """A data set that is missing, unreadable, or does not fit the recipe's ``data`` section."""


class RecipeError(FinetuneError):
    """A recipe that cannot be read or does not validate."""


class ExperimentError(FinetuneError):
    """An experiment file, grid or experiment folder that cannot be used as it is."""


class RunDirError(FinetuneError):
    """A run folder that cannot be used: it exists, is in use, is not a run, or cannot be written."""


class ExportError(FinetuneError):
    """A model that cannot be exported, an exported file that does not match its PyTorch model, or
    an exported file that cannot be read back (no metadata, a missing optional extra)."""


class DivergedError(FinetuneError):
    """Training produced a loss that is not a finite number; the run stopped as ``diverged``."""


class RunInterrupted(KeyboardInterrupt):
    """A run stopped on request (Ctrl-C, SIGTERM) after saving a checkpoint; ``str(err)`` says how
    to continue it. A ``KeyboardInterrupt``, so that code that stops on Ctrl-C stops on it too."""


def excerpt(value: object, limit: int = 80) -> str:
    """``value`` as a short, escaped quote for an error message: the ``repr`` of a value read from
    a file (of the text of anything else, such as an exception), so control characters and markup
    show as escapes and never act, cut to ``limit`` characters. Messages quote what a file holds
    only through this, so a file never fills a terminal or a log with its content."""
    plain = value if isinstance(value, (str, int, float, bool, list, tuple, dict, type(None))) else str(value)
    try:
        quoted = repr(plain)
    except RecursionError:  # a value nested deeper than repr recurses
        quoted = f"<a deeply nested {type(plain).__name__}>"
    return quoted if len(quoted) <= limit else quoted[: limit - 3] + "..."
