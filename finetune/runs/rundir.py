"""A run folder held by this process: :class:`RunDir` takes its lock, creates it whole (staged,
flushed, renamed into place) or reopens it for ``finetune resume``, and writes into it only in
ways a crash cannot corrupt: metrics appended and flushed, the summary and the checkpoint replaced
atomically, ``best/`` and ``adapter/`` swapped in whole. :func:`read_checkpoint` reads the
checkpoint back for a resume; what a killed process left half-written is cleaned up on reopening.

The folder's layout, its marker, the checks before a run and the lock are in :mod:`.folder`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, FinetuneError, RunDirError
from ..recipe import Recipe, RecipeError, computed_settings, dump_recipe_yaml, recipe_from_dict
from ..snapshot import fsync_dir, load_state, save_state, write_new_text_synced, write_text_atomically
from .folder import (
    CHECKPOINT,
    LOCK_FILE,
    MARKER,
    WRITE_ERRORS,
    check_links,
    is_run_folder,
    lock_held,
    move_aside,
    parked_runs,
    read_summary,
    strict_json,
    take_lock,
    write_error,
    write_marker,
)

# Leftovers of writes a killed process did not finish: snapshot.write_atomically's temporary files
# (".summary.json.PID-HEX.tmp") and RunDir._swap_in's folders (".best.HEX", ".best.old.HEX").
_TEMP_FILE = re.compile(r"\..+\.\d+-[0-9a-f]{8}\.tmp")
_SWAP_FOLDER = re.compile(r"\.(best|adapter)\.(old\.)?[0-9a-f]{8}")


class RunDir:
    """A run folder held by this process: its lock, its metrics file and its writes.

    Create one with :meth:`create` (a new run) or :meth:`reopen` (``finetune resume``); release it
    with :meth:`close`. Every write failure (a full disk, a read-only folder) is a
    :class:`RunDirError` that says what is still intact.

    ``replaced`` lists the earlier runs that ``output.overwrite`` parked beside this one (see
    :func:`parked_runs`), for messages; :meth:`discard_replaced` deletes them once this run finished.
    """

    def __init__(self, path: Path, lock_fd: int | None, replaced: Sequence[Path] = ()):
        self.path = path
        self._lock_fd = lock_fd
        self.replaced = list(replaced)  # earlier runs parked by output.overwrite: said on failure, deleted on success
        self.last_checkpoint: tuple[int, int] | None = None  # (epoch, step) of the checkpoint on disk
        self.previous_status: str | None = None  # how the run had ended, for a reopened folder
        self._metrics = self._open_metrics()

    # ---- opening -------------------------------------------------------------------------

    @classmethod
    def create(cls, path: Path, recipe: Recipe, summary: dict[str, Any], *, overwrite: bool) -> RunDir:
        """Create and lock a new run folder holding finetune's marker, ``recipe.yaml``, an empty
        ``metrics.jsonl`` and ``summary``.

        The folder is assembled under a temporary name, flushed to disk and renamed into place, so
        it appears complete and already locked. An existing run folder is refused, or with
        ``overwrite`` (and only if it carries finetune's marker) moved aside to a hidden
        ``.NAME.replaced-*`` folder that :meth:`discard_replaced` deletes once the new run has
        finished.

        Raises:
            RunDirError: the folder exists (without ``overwrite``), is in use, is not a run folder,
                was written by a finetune without the marker (with ``overwrite``), or cannot be written.
        """
        parent = path.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            staging = parent / f".{path.name}.starting-{os.getpid()}-{secrets.token_hex(4)}"
            staging.mkdir()  # the usual permissions, unlike tempfile.mkdtemp's owner-only ones
        except OSError as exc:
            raise write_error(f"create the run folder {path}", exc) from None
        fd = None
        try:
            fd = take_lock(staging / LOCK_FILE)
            # Every file reaches the disk before the rename publishes the folder: after a power
            # loss the folder is absent or whole, never present with empty files.
            write_marker(staging)
            write_new_text_synced(staging / "recipe.yaml", dump_recipe_yaml(recipe))
            write_new_text_synced(staging / "metrics.jsonl", "")
            write_new_text_synced(staging / "summary.json", strict_json(summary, indent=2) + "\n")
            fsync_dir(staging)
            aside = None
            try:
                os.rename(staging, path)  # atomic; succeeds when path is absent or an empty folder
            except OSError:
                aside = move_aside(path, overwrite)
                try:
                    os.rename(staging, path)
                except OSError:
                    raise RunDirError(
                        f"Another run created {path} at the same moment. The run that was there is kept at {aside}.",
                        "Run one at a time per run folder, or pick another name (name=...).",
                    ) from None
            fsync_dir(parent)
            # The run just moved aside first, then any earlier ones still parked (an overwrite
            # whose new run never finished).
            replaced = [aside] if aside is not None else []
            replaced += [p for p in parked_runs(path) if p != aside]
            return cls(path, fd, replaced)
        except BaseException as exc:
            if fd is not None:
                os.close(fd)
            shutil.rmtree(staging, ignore_errors=True)
            if isinstance(exc, WRITE_ERRORS):
                raise write_error(f"create the run folder {path}", exc) from None
            raise

    @classmethod
    def reopen(cls, path: Path) -> RunDir:
        """Lock an existing, unfinished run folder to continue it (``finetune resume``), and clean
        up what writes that a killed process did not finish left behind.

        Raises:
            RunDirError: not a run folder, in use, already finished, diverged, without a checkpoint, or
                a file it reads is a link out of the folder (:func:`.folder.check_links`).
        """
        if not path.is_dir():
            raise RunDirError(f"{path} is not a folder.", "Pass the run folder, e.g. runs/deit_tiny_cifar.")
        if not is_run_folder(path):
            raise RunDirError(
                f"{path} is not a finetune run folder (no {MARKER} marker, nor the recipe.yaml and readable "
                "summary.json of a run from an earlier finetune).",
                "Pass a folder that `finetune run` created, e.g. runs/deit_tiny_cifar.",
            )
        check_links(path)
        try:
            fd = take_lock(path / LOCK_FILE)
        except BlockingIOError:
            raise RunDirError(
                f"The run {path} is in use: another finetune process is training in it right now.",
                "Wait for it, or stop it first (it saves a checkpoint on Ctrl-C or SIGTERM).",
            ) from None
        except OSError as exc:
            raise write_error(f"lock {path}", exc) from None
        try:
            summary = read_summary(path)
            status = (summary or {}).get("status")
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
                raise _no_checkpoint(path, summary)
            _clean_leftovers(path)
            rundir = cls(path, fd, parked_runs(path))
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

    def _open_metrics(self):
        """``metrics.jsonl`` for appending; never through a link, which could point anywhere."""
        path = self.path / "metrics.jsonl"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o666)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENXIO):  # a link; a FIFO nobody reads
                raise _not_plain(path) from None
            raise write_error(f"open {path}", exc) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise _not_plain(path)
        return os.fdopen(fd, "a", encoding="utf-8", buffering=1)

    def log(self, row: dict[str, Any]) -> None:
        """Append one line to ``metrics.jsonl``."""
        try:
            self._metrics.write(strict_json(row) + "\n")
        except OSError as exc:
            raise write_error(f"append to {self.path / 'metrics.jsonl'}", exc, self._checkpoint_note()) from None

    def metrics_offset(self) -> int:
        """Bytes of ``metrics.jsonl`` written so far, flushed to disk: a checkpoint records it, a
        resume cuts back to it, so it must not point past what a power loss would leave."""
        try:
            self._metrics.flush()
            os.fsync(self._metrics.fileno())
        except OSError as exc:
            raise write_error(f"append to {self.path / 'metrics.jsonl'}", exc, self._checkpoint_note()) from None
        return self._metrics.tell()

    def truncate_metrics(self, offset: int) -> str | None:
        """Drop the lines written after the checkpoint being resumed from; they will be written again.

        Returns:
            A warning when the file is shorter than ``offset`` (its last lines never reached the
            disk: a machine that stopped, or a file from before the offset was flushed): the
            complete lines there are kept and the run continues; ``None`` otherwise.
        """
        path = self.path / "metrics.jsonl"
        self._metrics.close()  # reopened below, so that its position is the new end
        warning = None
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK)
            try:
                size = os.fstat(fd).st_size
                if size < offset:
                    kept = os.pread(fd, size, 0)
                    cut = kept.rfind(b"\n") + 1  # a line cut short in the middle goes too
                    lines = kept[:cut].count(b"\n")
                    warning = (
                        f"{path} is shorter ({size} bytes) than its checkpoint says ({offset}): lines written "
                        "before the checkpoint never reached the disk (the machine stopped, or a crash). The "
                        f"{lines} complete lines there are kept and the run continues; the "
                        "lost lines stay missing."
                    )
                    offset = cut
                os.ftruncate(fd, offset)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENXIO):
                raise _not_plain(path) from None
            raise write_error(f"cut {path} back to its checkpoint", exc) from None
        self._metrics = self._open_metrics()
        return warning

    def write_summary(self, summary: dict[str, Any]) -> None:
        try:
            write_text_atomically(self.path / "summary.json", strict_json(summary, indent=2) + "\n")
        except OSError as exc:
            raise write_error(f"write {self.path / 'summary.json'}", exc, self._checkpoint_note()) from None

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        """Replace ``checkpoints/last.safetensors`` atomically; on failure the previous one is intact."""
        path = self.path / CHECKPOINT
        with self.writing(f"write the checkpoint {path}"):
            path.parent.mkdir(exist_ok=True)
            save_state(path, state)
        self.last_checkpoint = (state["progress"]["epoch"], state["progress"]["step"])

    def save_model(self, model: Any, classes: list[str], subfolder: str | None = None) -> None:
        """Save a plain model folder (``config.json`` + ``model.safetensors``): into the run folder
        itself, or as ``subfolder`` (``best/``), which is written aside and swapped in whole so that
        a stop while saving never leaves weights that disagree with their ``config.json``."""
        from ..models.saving import save_model

        if subfolder is None:  # the final model: the folder says "finished" only once it is written
            with self.writing(f"save the model to {self.path}"):
                save_model(model, self.path, class_names=classes)
            return
        self._swap_in(subfolder, lambda staging: save_model(model, staging, class_names=classes), "the model")

    def save_adapter(self, model: Any) -> None:
        """Save a peft model's adapters alone as ``adapter/`` (peft's format), for keeping many
        adapters of one backbone."""
        self._swap_in("adapter", lambda staging: model.save_pretrained(str(staging)), "the adapters")

    def _swap_in(self, name: str, write: Callable[[Path], None], what: str) -> None:
        """Write a subfolder through ``write(staging)`` into a hidden sibling, then rename it into
        place, moving any earlier one aside first: ``name`` is always whole (or, if the process is
        killed between the two renames, absent, with the earlier one kept as ``.name.old.*``, which
        :meth:`reopen` puts back)."""
        target = self.path / name
        tag = secrets.token_hex(4)
        staging, old = self.path / f".{name}.{tag}", self.path / f".{name}.old.{tag}"
        try:
            with self.writing(f"save {what} to {target}"):
                write(staging)
                if target.exists():
                    os.rename(target, old)
                os.rename(staging, target)
        except BaseException:  # a failed write or a second Ctrl-C: no half-written folder left
            shutil.rmtree(staging, ignore_errors=True)
            raise
        shutil.rmtree(old, ignore_errors=True)

    @contextlib.contextmanager
    def writing(self, action: str) -> Iterator[None]:
        """Turn any write failure in the block (the OS's, safetensors', PIL's or matplotlib's, or a
        model save that reported one) into a :class:`RunDirError` that says what ``action`` could
        not do and that the last checkpoint is intact."""
        try:
            yield
        except WRITE_ERRORS as exc:
            raise write_error(action, exc, self._checkpoint_note()) from None
        except FinetuneError as exc:
            # models.save_model reports an OSError as its own message; say it the run's way
            if not isinstance(exc, RunDirError) and isinstance(exc.__context__, WRITE_ERRORS):
                raise write_error(action, exc.__context__, self._checkpoint_note()) from None
            raise

    def discard_replaced(self) -> list[Path]:
        """Delete the earlier runs that ``output.overwrite`` parked beside this one (found by
        :func:`parked_runs`, never from a file); called once this run finished.

        Returns:
            The folders deleted.
        """
        deleted = []
        for folder in parked_runs(self.path):
            if lock_held(folder):  # someone resumed a parked run by hand and is training in it
                continue
            shutil.rmtree(folder, ignore_errors=True)
            if not folder.exists():
                deleted.append(folder)
        self.replaced = []
        return deleted

    def _checkpoint_note(self) -> str:
        where = self.path / CHECKPOINT
        if self.last_checkpoint is None:
            return ""
        epoch, step = self.last_checkpoint
        return f"The last checkpoint ({where}, step {step}, before epoch {epoch}) is intact."


def read_checkpoint(run_dir: Path, recipe: Recipe) -> dict[str, Any]:
    """Read a run folder's ``checkpoints/last.safetensors`` and check that it belongs to ``recipe``.

    Raises:
        CheckpointError: unreadable, damaged (its SHA-256 does not match), or written by another recipe.
    """
    path = run_dir / CHECKPOINT
    check_links(run_dir, (str(CHECKPOINT.parent), str(CHECKPOINT)))  # never another run's checkpoint
    state = load_state(path)
    if not isinstance(state, dict) or not {"recipe", "progress", "model", "model_config"} <= set(state):
        raise CheckpointError(f"{path} is not a finetune training checkpoint.", "Start the run again with output.overwrite=true.")
    if not _same_settings(state["recipe"], recipe):
        raise CheckpointError(
            f"{path} was written by another recipe than {run_dir / 'recipe.yaml'}, so it cannot continue that run.",
            "Restore the recipe.yaml the run started with, or start the run again with output.overwrite=true.",
        )
    return state


def _same_settings(stored: Any, recipe: Recipe) -> bool:
    """Whether a checkpoint's stored recipe trains like ``recipe``. The stored mapping is read
    through today's schema first, so a key added to recipes since the checkpoint was written (with
    a default that trains as before) does not stop an old run from resuming; a mapping today's
    schema refuses is another recipe."""
    try:
        stored = recipe_from_dict(stored, where="the checkpoint's recipe")
    except RecipeError:
        return False
    return computed_settings(stored) == computed_settings(recipe)


def _no_checkpoint(path: Path, summary: dict[str, Any] | None) -> RunDirError:
    """Why a run folder without ``checkpoints/last.safetensors`` cannot be resumed: it stopped before
    its first checkpoint, or its checkpoints were deleted (the summary or metrics show it had some)."""
    folder, summary = path / CHECKPOINT.parent, summary or {}
    again = f"start it again: finetune run {path / 'recipe.yaml'} output.overwrite=true"
    had_one = bool(summary.get("last_checkpoint") or summary.get("resumed")) or folder.is_dir()
    missing = f"{folder}/ is missing" if not folder.is_dir() else f"{path / CHECKPOINT} is missing"
    if had_one:
        return RunDirError(
            f"The run {path} had checkpoints, but {missing} (deleted or moved?), so there is nothing to resume from.",
            f"Put {CHECKPOINT} back into {path} to continue the run, or {again}.",
        )
    metrics = path / "metrics.jsonl"
    if summary.get("steps") or (metrics.is_file() and metrics.stat().st_size > 0):
        return RunDirError(
            f"The run {path} trained (its metrics.jsonl and summary.json show progress), but {missing}: it was "
            "deleted or moved, or the run stopped before its first checkpoint. There is nothing to resume from.",
            f"Put {CHECKPOINT} back into {path} if you have it; otherwise {again} "
            "(output.checkpoint_every_steps=N checkpoints within epochs).",
        )
    return RunDirError(
        f"The run {path} stopped before its first checkpoint, so there is nothing to resume from.",
        f"Start it again: finetune run {path / 'recipe.yaml'} output.overwrite=true "
        "(output.checkpoint_every_steps=N checkpoints within epochs).",
    )


def _clean_leftovers(path: Path) -> None:
    """Remove what writes that a killed process did not finish left in a run folder (it is locked
    by us): temporary files of atomic writes (``.summary.json.*.tmp``, the checkpoint's), and the
    staging folders of ``best/`` and ``adapter/``. A process killed between ``_swap_in``'s two
    renames left the earlier ``best/`` as ``.best.old.*``: it goes back in place.

    Only entries with finetune's own temporary names, inside the folder, are touched, and links
    are removed as links, never followed."""
    for folder in (path, path / CHECKPOINT.parent):
        if folder.is_symlink() or not folder.is_dir():
            continue
        for entry in folder.iterdir():
            if _TEMP_FILE.fullmatch(entry.name):
                _remove(entry)
    for entry in sorted(path.iterdir()):
        match = _SWAP_FOLDER.fullmatch(entry.name)
        if match is None:
            continue
        target = path / match[1]
        if match[2] and not (target.exists() or target.is_symlink()) and entry.is_dir() and not entry.is_symlink():
            os.rename(entry, target)
        else:
            _remove(entry)


def _remove(entry: Path) -> None:
    """Delete a leftover: a folder with what is in it, anything else (a link too) as an entry."""
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        entry.unlink(missing_ok=True)


def _not_plain(path: Path) -> RunDirError:
    """The error for a run-folder file that is a link, a FIFO or anything but a plain file."""
    return RunDirError(
        f"{path} is a link or not a plain file; finetune writes only its own files in a run folder and never "
        "follows a link there.",
        "Replace it with a plain file (or remove it), then try again.",
    )
