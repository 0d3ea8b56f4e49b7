"""The run folder: created atomically, locked while a process uses it, and written only in ways a
crash cannot corrupt. ``finetune.recorder.RunRecorder`` fills it during training; ``eval``,
``predict`` and reports read it through this module without importing the training loop.

Layout of ``output.dir/name/``::

    recipe.yaml            the resolved recipe (what ``finetune resume`` trains with)
    metrics.jsonl          one strict-JSON line per log interval and per evaluated epoch
    summary.json           status, results, times, environment; rewritten atomically
    checkpoints/last.safetensors   the full training state (finetune.snapshot), replaced atomically
    best/                  the model of the best epoch on validation (only with a validation split)
    config.json, model.safetensors, curves.png, confusion_matrix.png   written when the run finishes
    .lock                  held (flock) by the process using the folder

Statuses: ``running``, ``finished``, ``interrupted`` (stopped by a signal, or its process died: a
``running`` folder whose lock nobody holds), ``failed`` and ``diverged``.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .errors import CheckpointError, RunDirError
from .recipe import Recipe, computed_settings, dump_recipe_yaml
from .snapshot import load_state, save_state, write_text_atomically

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: runs work, folders are not locked
    fcntl = None

LOCK_FILE = ".lock"
CHECKPOINT = Path("checkpoints") / "last.safetensors"
BEST_DIR = "best"
RUN_MARKERS = ("recipe.yaml", "summary.json")  # a folder with either is a finetune run folder


def run_dir_for(recipe: Recipe) -> Path:
    """``output.dir / name``."""
    return Path(recipe.output.dir).expanduser() / (recipe.name or "run")


# --------------------------------------------------------------------------------------------
# Reading a folder's state


def is_run_folder(path: Path) -> bool:
    return path.is_dir() and any((path / marker).is_file() for marker in RUN_MARKERS)


def read_summary(path: Path) -> dict[str, Any] | None:
    """``summary.json`` as a dict, or ``None`` when it is missing or unreadable."""
    try:
        summary = json.loads((path / "summary.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def lock_held(path: Path) -> bool:
    """True while a process holds the run folder's lock (it is training in it)."""
    if fcntl is None:
        return False
    try:
        fd = os.open(path / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return False  # no lock file: nobody ever locked it (or not a run folder)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing also drops the shared lock just taken
    return False


def run_status(path: Path) -> str | None:
    """The run's status; a ``running`` run whose process is gone reads as ``interrupted``."""
    summary = read_summary(path)
    if summary is None:
        return None
    status = str(summary.get("status") or "")
    if status == "running" and not lock_held(path):
        return "interrupted"
    return status


def _refusal(path: Path, overwrite: bool) -> RunDirError | None:
    """Why ``path`` cannot become a new run's folder, or ``None`` when it can (maybe after being
    moved aside, for ``overwrite``)."""
    if path.exists() and not path.is_dir():
        return RunDirError(
            f"The run folder {path} is a file.", "Pick another name (name=...) or output.dir, or move the file."
        )
    if not path.exists() or not any(path.iterdir()):
        return None
    if not is_run_folder(path):
        return RunDirError(
            f"{path} exists and is not a finetune run folder (it has no recipe.yaml or summary.json); "
            "finetune never replaces or deletes a folder it did not write, even with output.overwrite=true.",
            "Pick another name (name=...) or output.dir, or move that folder away yourself.",
        )
    if lock_held(path):
        return RunDirError(
            f"The run folder {path} is in use: another finetune process is training in it right now.",
            "Wait for it to finish, stop it (it saves a checkpoint on Ctrl-C or SIGTERM), or pick another "
            "name (name=...).",
        )
    if overwrite:
        return None
    status = run_status(path)
    if status in ("interrupted", "failed"):
        return RunDirError(
            f"The run folder {path} already exists and holds a run that did not finish (status {status}).",
            f"Continue it from its last checkpoint with `finetune resume {path}`, pick another name "
            "(name=...), or pass output.overwrite=true to replace it.",
        )
    return RunDirError(
        f"The run folder {path} already exists; finetune never overwrites an earlier run.",
        "Pick another name (name=my_run_2 or output.dir=...), or pass output.overwrite=true to replace it.",
    )


def check_run_dir(path: Path, overwrite: bool) -> None:
    """Raise now if a run could not use ``path``, before any data or model is loaded: it is taken
    (see :func:`_refusal`), or it could not be created or written.

    :meth:`RunDir.create` checks again when it creates the folder, since another process may act
    in between.
    """
    refusal = _refusal(path, overwrite)
    if refusal is not None:
        raise refusal
    _check_writable(path)


def _check_writable(path: Path) -> None:
    """Try to create (and remove) a folder where the run folder will go, so that a path under a
    file, a read-only disk or a pseudo file system is reported now, not after data and model load."""
    base = next((p for p in (path, *path.parents) if p.exists() or p.is_symlink()), Path("."))
    if not base.is_dir():
        raise RunDirError(
            f"The run folder {path} cannot be created: {base} is a file, not a folder.",
            "Set output.dir (or name) to a path under a folder.",
        )
    probe = base / f".finetune-write-test-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        raise RunDirError(
            f"The run folder {path} cannot be created: {base} is not writable ({exc.strerror or exc}).",
            "Set output.dir to a folder you can write to.",
        ) from None


# --------------------------------------------------------------------------------------------
# Locks


def _lock(lock_path: Path) -> int | None:
    """Take the exclusive lock of a run folder; return the file descriptor that holds it.

    Raises:
        BlockingIOError: another process holds it.
    """
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    if fcntl is None:  # pragma: no cover
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())  # for people looking; the lock is what counts
    return fd


def _finite(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by ``None``, so JSON stays strict."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def strict_json(value: Any, **kwargs: Any) -> str:
    """JSON that every parser reads: non-finite numbers become ``null``."""
    return json.dumps(_finite(value), allow_nan=False, **kwargs)


# --------------------------------------------------------------------------------------------
# The folder


class RunDir:
    """A run folder held by this process: its lock, its metrics file and its writes.

    Create one with :meth:`create` (a new run) or :meth:`reopen` (``finetune resume``); release it
    with :meth:`close`. Every write failure (a full disk, a read-only folder) is a
    :class:`RunDirError` that says what is still intact.
    """

    def __init__(self, path: Path, lock_fd: int | None, replaced: Sequence[Path] = ()):
        self.path = path
        self._lock_fd = lock_fd
        self.replaced = list(replaced)  # earlier runs moved aside by output.overwrite, deleted on success
        self.last_checkpoint: tuple[int, int] | None = None  # (epoch, step) of the checkpoint on disk
        self.previous_status: str | None = None  # how the run had ended, for a reopened folder
        self._metrics = open(path / "metrics.jsonl", "a", encoding="utf-8", buffering=1)

    # ---- opening -------------------------------------------------------------------------

    @classmethod
    def create(cls, path: Path, recipe: Recipe, summary: dict[str, Any], *, overwrite: bool) -> RunDir:
        """Create and lock a new run folder holding ``recipe.yaml``, an empty ``metrics.jsonl``
        and ``summary``.

        The folder is assembled under a temporary name and renamed into place, so it appears
        complete and already locked. An existing run folder is refused, or with ``overwrite``
        moved aside to a hidden ``.NAME.replaced-*`` folder that :meth:`discard_replaced` deletes
        once the new run has finished.

        Raises:
            RunDirError: the folder exists (without ``overwrite``), is in use, is not a run folder,
                or cannot be written.
        """
        parent = path.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            staging = parent / f".{path.name}.starting-{os.getpid()}-{secrets.token_hex(4)}"
            staging.mkdir()  # the usual permissions, unlike tempfile.mkdtemp's owner-only ones
        except OSError as exc:
            raise _write_error(f"create the run folder {path}", exc) from None
        fd = None
        try:
            fd = _lock(staging / LOCK_FILE)
            (staging / "recipe.yaml").write_text(dump_recipe_yaml(recipe), encoding="utf-8")
            (staging / "metrics.jsonl").touch()
            (staging / "summary.json").write_text(strict_json(summary, indent=2) + "\n", encoding="utf-8")
            replaced: list[Path] = []
            try:
                os.rename(staging, path)  # atomic; succeeds when path is absent or an empty folder
            except OSError:
                replaced = _move_aside(path, overwrite)
                try:
                    os.rename(staging, path)
                except OSError:
                    raise RunDirError(
                        f"Another run created {path} at the same moment. The run that was there is kept at {replaced[0]}.",
                        "Run one at a time per run folder, or pick another name (name=...).",
                    ) from None
            return cls(path, fd, replaced)
        except BaseException as exc:
            if fd is not None:
                os.close(fd)
            shutil.rmtree(staging, ignore_errors=True)
            if isinstance(exc, OSError):
                raise _write_error(f"create the run folder {path}", exc) from None
            raise

    @classmethod
    def reopen(cls, path: Path) -> RunDir:
        """Lock an existing, unfinished run folder to continue it (``finetune resume``).

        Raises:
            RunDirError: not a run folder, in use, already finished, diverged, or without a checkpoint.
        """
        if not path.is_dir():
            raise RunDirError(f"{path} is not a folder.", "Pass the run folder, e.g. runs/deit_tiny_cifar.")
        if not is_run_folder(path):
            raise RunDirError(
                f"{path} is not a finetune run folder (no recipe.yaml or summary.json).",
                "Pass a folder that `finetune run` created, e.g. runs/deit_tiny_cifar.",
            )
        try:
            fd = _lock(path / LOCK_FILE)
        except BlockingIOError:
            raise RunDirError(
                f"The run {path} is in use: another finetune process is training in it right now.",
                "Wait for it, or stop it first (it saves a checkpoint on Ctrl-C or SIGTERM).",
            ) from None
        except OSError as exc:
            raise _write_error(f"lock {path}", exc) from None
        try:
            summary = read_summary(path) or {}
            status = summary.get("status")
            if status == "finished":
                raise RunDirError(
                    f"The run {path} already finished; there is nothing to resume.",
                    "To train longer, start a new run (finetune run ... name=NEW_NAME train.epochs=N).",
                )
            if status == "diverged":
                raise RunDirError(
                    f"The run {path} diverged; resuming it would repeat the same steps and diverge again.",
                    f"Start it again with a lower learning rate: finetune run {path / 'recipe.yaml'} "
                    "output.overwrite=true optim.lr=...",
                )
            if not (path / CHECKPOINT).is_file():
                raise RunDirError(
                    f"The run {path} stopped before its first checkpoint, so there is nothing to resume from.",
                    f"Start it again: finetune run {path / 'recipe.yaml'} output.overwrite=true "
                    "(output.checkpoint_every_steps=N checkpoints within epochs).",
                )
            # A process killed while writing a checkpoint leaves its temporary file (never the
            # checkpoint itself, which is only ever replaced whole).
            for stale in (path / CHECKPOINT).parent.glob(f".{CHECKPOINT.name}.*.tmp"):
                stale.unlink(missing_ok=True)
            rundir = cls(path, fd, [Path(p) for p in summary.get("replaced_runs") or []])
            # We hold the lock, so a run that says "running" has no process left: it was killed.
            rundir.previous_status = "interrupted" if status == "running" else status
            return rundir
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        """Close the metrics file and release the lock."""
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # ---- files ---------------------------------------------------------------------------

    def read_summary(self) -> dict[str, Any]:
        return read_summary(self.path) or {}

    def log(self, row: dict[str, Any]) -> None:
        """Append one line to ``metrics.jsonl``."""
        try:
            self._metrics.write(strict_json(row) + "\n")
        except OSError as exc:
            raise _write_error(f"append to {self.path / 'metrics.jsonl'}", exc, self._checkpoint_note()) from None

    def metrics_offset(self) -> int:
        """Bytes of ``metrics.jsonl`` written so far: a checkpoint records it, a resume cuts back to it."""
        self._metrics.flush()
        return self._metrics.tell()

    def truncate_metrics(self, offset: int) -> None:
        """Drop the lines written after the checkpoint being resumed from; they will be written again."""
        path = self.path / "metrics.jsonl"
        self._metrics.close()  # reopened below, so that its position is the new end
        size = path.stat().st_size
        if size < offset:
            raise CheckpointError(
                f"{path} is shorter ({size} bytes) than its checkpoint says ({offset}).",
                "The run folder was edited or damaged; start the run again with output.overwrite=true.",
            )
        os.truncate(path, offset)
        self._metrics = open(path, "a", encoding="utf-8", buffering=1)

    def write_summary(self, summary: dict[str, Any]) -> None:
        try:
            write_text_atomically(self.path / "summary.json", strict_json(summary, indent=2) + "\n")
        except OSError as exc:
            raise _write_error(f"write {self.path / 'summary.json'}", exc, self._checkpoint_note()) from None

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        """Replace ``checkpoints/last.safetensors`` atomically; on failure the previous one is intact."""
        path = self.path / CHECKPOINT
        try:
            path.parent.mkdir(exist_ok=True)
            save_state(path, state)
        except OSError as exc:
            raise _write_error(f"write the checkpoint {path}", exc, self._checkpoint_note()) from None
        self.last_checkpoint = (state["progress"]["epoch"], state["progress"]["step"])

    def save_model(self, model: Any, classes: list[str], subfolder: str | None = None) -> None:
        """Save a plain model folder (``config.json`` + ``model.safetensors``): into the run folder
        itself, or as ``subfolder`` (``best/``), which is written aside and swapped in whole so that
        a stop while saving never leaves weights that disagree with their ``config.json``."""
        from .models import save_model

        if subfolder is None:  # the final model: the folder says "finished" only once it is written
            try:
                save_model(model, self.path, class_names=classes)
            except OSError as exc:
                raise _write_error(f"save the model to {self.path}", exc, self._checkpoint_note()) from None
            return
        self._swap_in(subfolder, lambda staging: save_model(model, staging, class_names=classes), "the model")

    def save_adapter(self, model: Any) -> None:
        """Save a peft model's adapters alone as ``adapter/`` (peft's format), for keeping many
        adapters of one backbone."""
        self._swap_in("adapter", lambda staging: model.save_pretrained(str(staging)), "the adapters")

    def _swap_in(self, name: str, write: Callable[[Path], None], what: str) -> None:
        """Write a subfolder through ``write(staging)`` into a hidden sibling, then rename it into
        place, moving any earlier one aside first: ``name`` is always whole (or, if the process is
        killed between the two renames, absent, with the earlier one kept as ``.name.old.*``)."""
        target = self.path / name
        tag = secrets.token_hex(4)
        staging, old = self.path / f".{name}.{tag}", self.path / f".{name}.old.{tag}"
        try:
            write(staging)
            if target.exists():
                os.rename(target, old)
            os.rename(staging, target)
        except BaseException as exc:  # a failed write or a second Ctrl-C: no half-written folder left
            shutil.rmtree(staging, ignore_errors=True)
            if isinstance(exc, OSError):
                raise _write_error(f"save {what} to {target}", exc, self._checkpoint_note()) from None
            raise
        shutil.rmtree(old, ignore_errors=True)

    def discard_replaced(self) -> None:
        """Delete the earlier runs that ``output.overwrite`` moved aside; called once this run finished."""
        for folder in self.replaced:
            if folder.is_dir():
                shutil.rmtree(folder, ignore_errors=True)
        self.replaced = []

    def _checkpoint_note(self) -> str:
        where = self.path / CHECKPOINT
        if self.last_checkpoint is None:
            return ""
        epoch, step = self.last_checkpoint
        return f"The last checkpoint ({where}, step {step}, before epoch {epoch}) is intact."


def read_checkpoint(run_dir: Path, recipe: Recipe) -> dict[str, Any]:
    """Read a run folder's ``checkpoints/last.safetensors`` and check that it belongs to ``recipe``.

    Raises:
        CheckpointError: unreadable, or written by another recipe.
    """
    path = run_dir / CHECKPOINT
    state = load_state(path)
    if not isinstance(state, dict) or not {"recipe", "progress", "model", "model_config"} <= set(state):
        raise CheckpointError(f"{path} is not a finetune training checkpoint.", "Start the run again with output.overwrite=true.")
    if computed_settings(state["recipe"]) != computed_settings(recipe):
        raise CheckpointError(
            f"{path} was written by another recipe than {run_dir / 'recipe.yaml'}, so it cannot continue that run.",
            "Restore the recipe.yaml the run started with, or start the run again with output.overwrite=true.",
        )
    return state


def _move_aside(path: Path, overwrite: bool) -> list[Path]:
    """Make room for a new run at ``path`` (see :meth:`RunDir.create`).

    Returns:
        Where the old run went, then the runs that it was itself replacing (an overwrite that had
        not finished): the new run deletes them all once it finishes.
    """
    refusal = _refusal(path, overwrite)
    if refusal is not None:
        raise refusal
    try:
        fd = _lock(path / LOCK_FILE)  # hold the old run's lock while moving it: no one else can start there
    except BlockingIOError:
        raise RunDirError(
            f"The run folder {path} is in use: another finetune process is training in it right now.",
            "Wait for it to finish, or pick another name (name=...).",
        ) from None
    try:
        earlier = [Path(p) for p in (read_summary(path) or {}).get("replaced_runs") or []]
        aside = path.parent / f".{path.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        os.rename(path, aside)
    finally:
        os.close(fd)
    return [aside, *earlier]


def _write_error(action: str, exc: OSError, note: str = "") -> RunDirError:
    reason = exc.strerror or str(exc)
    return RunDirError(
        f"Could not {action}: {reason}." + (f" {note}" if note else ""),
        "Free some disk space or pick a writable output.dir, then continue the run with `finetune resume RUN_FOLDER`"
        if note else "Free some disk space or set output.dir to a folder you can write to.",
    )
