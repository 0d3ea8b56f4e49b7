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
    .finetune-run          finetune's marker: JSON with its format and the finetune version that wrote it

Statuses: ``running``, ``finished``, ``interrupted`` (stopped by a signal, or its process died: a
``running`` folder whose lock nobody holds), ``failed`` and ``diverged``.

Nothing read from the folder is an instruction: no path found in a file is ever deleted, moved or
written. Only a folder carrying the marker is ever replaced (``output.overwrite``); the earlier run
is moved aside to ``.NAME.replaced-*`` beside it, and such folders are found again only by that
name and the marker. Folders from finetune versions before the marker are read, resumed and
evaluated, but never moved or deleted.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from ..errors import CheckpointError, FinetuneError, RunDirError
from ..recipe import Recipe, computed_settings, dump_recipe_yaml
from ..snapshot import fsync_dir, load_state, save_state, write_new_text_synced, write_text_atomically

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: runs work, folders are not locked
    fcntl = None

LOCK_FILE = ".lock"
CHECKPOINT = Path("checkpoints") / "last.safetensors"
BEST_DIR = "best"
MARKER = ".finetune-run"  # written into every run folder finetune creates: only these are ever replaced
MARKER_FORMAT = "finetune-run/1"
# What a write can raise: the OS's errors, and safetensors' own type for the same (a full disk).
WRITE_ERRORS = (OSError, SafetensorError)
# Leftovers of writes a killed process did not finish: snapshot.write_atomically's temporary files
# (".summary.json.PID-HEX.tmp") and RunDir._swap_in's folders (".best.HEX", ".best.old.HEX").
_TEMP_FILE = re.compile(r"\..+\.\d+-[0-9a-f]{8}\.tmp")
_SWAP_FOLDER = re.compile(r"\.(best|adapter)\.(old\.)?[0-9a-f]{8}")


def run_dir_for(recipe: Recipe) -> Path:
    """``output.dir / name``."""
    return Path(recipe.output.dir).expanduser() / (recipe.name or "run")


# --------------------------------------------------------------------------------------------
# Reading a folder's state


def marker_text() -> str:
    """The content of a run folder's marker file (:data:`MARKER`)."""
    from .. import __version__

    return json.dumps({"format": MARKER_FORMAT, "finetune_version": __version__}) + "\n"


def write_marker(folder: Path) -> None:
    """Mark ``folder`` as a run folder that finetune wrote (and so may replace); flushed to disk.

    For a folder finetune itself creates, before anything else goes into it.

    Raises:
        FileExistsError: it has a marker already.
    """
    write_new_text_synced(folder / MARKER, marker_text())
    fsync_dir(folder)


def read_marker(path: Path) -> dict[str, Any] | None:
    """The folder's marker as a dict, or ``None`` when it has none (or something else by that name:
    a link, a folder, a file that is not finetune's JSON)."""
    try:
        # O_NOFOLLOW: a link is not a marker; O_NONBLOCK: a FIFO by that name cannot hang us
        fd = os.open(path / MARKER, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        doc = json.loads(os.read(fd, 4096))
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
    if not isinstance(doc, dict) or not str(doc.get("format", "")).startswith("finetune-run/"):
        return None
    return doc


def is_owned_run_folder(path: Path) -> bool:
    """A run folder that finetune created (it has finetune's marker): the only kind that
    ``output.overwrite`` moves aside and a finished run may delete. A link is never one."""
    return path.is_dir() and not path.is_symlink() and read_marker(path) is not None


def is_legacy_run_folder(path: Path) -> bool:
    """A run folder written by a finetune from before the marker: ``recipe.yaml`` and a
    ``summary.json`` with finetune's fields (``name`` and ``status``). Read, resumed and
    evaluated like any run, but never moved or deleted."""
    if not path.is_dir() or not (path / "recipe.yaml").is_file():
        return False
    summary = read_summary(path)
    return summary is not None and isinstance(summary.get("name"), str) and isinstance(summary.get("status"), str)


def is_run_folder(path: Path) -> bool:
    """A folder to read as a run (``eval``, ``predict``, ``resume``, reports): one finetune marked
    (:func:`is_owned_run_folder`) or one from before the marker (:func:`is_legacy_run_folder`).
    To decide whether a folder may be replaced, use :func:`is_owned_run_folder`."""
    return is_owned_run_folder(path) or is_legacy_run_folder(path)


def parked_runs(path: Path) -> list[Path]:
    """The earlier runs that ``output.overwrite`` moved aside to make room for the run at ``path``:
    the folders beside it named ``.NAME.replaced-<time>-<hex>`` that carry finetune's marker,
    oldest first. Found by that rule alone, never from a list read from a file."""
    pattern = re.compile(re.escape(f".{path.name}.replaced-") + r"\d{8}-\d{6}-[0-9a-f]{6}")
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return []
    return sorted(p for p in entries if pattern.fullmatch(p.name) and is_owned_run_folder(p))


def read_summary(path: Path) -> dict[str, Any] | None:
    """``summary.json`` as a dict, or ``None`` when it is missing or unreadable."""
    file = path / "summary.json"
    if not file.is_file():  # not a FIFO or a folder: reading those would hang or fail
        return None
    try:
        summary = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def lock_held(path: Path) -> bool:
    """True while a process holds the run folder's lock (it is training in it)."""
    if fcntl is None:
        return False
    try:
        fd = os.open(path / LOCK_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
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
    if path.is_symlink():
        return RunDirError(
            f"The run folder {path} is a link (to {os.readlink(path)}); finetune creates its run folders "
            "itself and never replaces a link, even with output.overwrite=true.",
            "Pick another name (name=...) or output.dir, or remove the link yourself.",
        )
    if path.exists() and not path.is_dir():
        return RunDirError(
            f"The run folder {path} is a file.", "Pick another name (name=...) or output.dir, or move the file."
        )
    if not path.exists() or not any(path.iterdir()):
        return None
    if not is_run_folder(path):
        return RunDirError(
            f"{path} exists and is not a finetune run folder (it has no {MARKER} marker, nor the recipe.yaml "
            "and summary.json of a run from an earlier finetune); finetune never replaces or deletes a folder "
            "it did not write, even with output.overwrite=true.",
            "Pick another name (name=...) or output.dir, or move that folder away yourself.",
        )
    if lock_held(path):
        return RunDirError(
            f"The run folder {path} is in use: another finetune process is training in it right now.",
            "Wait for it to finish, stop it (it saves a checkpoint on Ctrl-C or SIGTERM), or pick another "
            "name (name=...).",
        )
    if overwrite:
        if is_owned_run_folder(path):
            return None
        return RunDirError(
            f"{path} holds a run written by an earlier version of finetune, without the {MARKER} marker that "
            "proves finetune wrote the folder, so finetune will not move or delete it, even with "
            "output.overwrite=true.",
            f"Move it away yourself (e.g. mv {path} {path}.old), or pick another name (name=...) or output.dir.",
        )
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
        RunDirError: the lock file is a link or not a plain file (it is never followed or truncated).
    """
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        fd = -1
    if fd < 0 or not stat.S_ISREG(os.fstat(fd).st_mode):
        if fd >= 0:
            os.close(fd)
        raise RunDirError(
            f"{lock_path} is not finetune's lock file (it is a link or not a plain file); finetune does not "
            "follow or write it.",
            f"Remove it (rm {lock_path}) if you know what it is, then try again.",
        )
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
            fd = _lock(staging / LOCK_FILE)
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
                aside = _move_aside(path, overwrite)
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
            RunDirError: not a run folder, in use, already finished, diverged, or without a checkpoint.
        """
        if not path.is_dir():
            raise RunDirError(f"{path} is not a folder.", "Pass the run folder, e.g. runs/deit_tiny_cifar.")
        if not is_run_folder(path):
            raise RunDirError(
                f"{path} is not a finetune run folder (no {MARKER} marker, nor the recipe.yaml and readable "
                "summary.json of a run from an earlier finetune).",
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
        from ..models.build import save_model

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
    state = load_state(path)
    if not isinstance(state, dict) or not {"recipe", "progress", "model", "model_config"} <= set(state):
        raise CheckpointError(f"{path} is not a finetune training checkpoint.", "Start the run again with output.overwrite=true.")
    if computed_settings(state["recipe"]) != computed_settings(recipe):
        raise CheckpointError(
            f"{path} was written by another recipe than {run_dir / 'recipe.yaml'}, so it cannot continue that run.",
            "Restore the recipe.yaml the run started with, or start the run again with output.overwrite=true.",
        )
    return state


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
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        entry.unlink(missing_ok=True)


def _move_aside(path: Path, overwrite: bool) -> Path:
    """Make room for a new run at ``path`` (see :meth:`RunDir.create`): move the run there, which
    must carry finetune's marker, to ``.NAME.replaced-<time>-<hex>`` beside it.

    Returns:
        Where the old run went.
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
        if not is_owned_run_folder(path):  # again, under the lock: it may have changed meanwhile
            raise RunDirError(
                f"{path} changed while finetune was about to move it aside, and no longer carries the {MARKER} "
                "marker; finetune leaves it as it is.",
                "Pick another name (name=...), or look at the folder and move it away yourself.",
            )
        aside = path.parent / f".{path.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        os.rename(path, aside)
    finally:
        os.close(fd)
    return aside


def _not_plain(path: Path) -> RunDirError:
    return RunDirError(
        f"{path} is a link or not a plain file; finetune writes only its own files in a run folder and never "
        "follows a link there.",
        "Replace it with a plain file (or remove it), then try again.",
    )


def _reason(exc: BaseException) -> str:
    """The human part of a write error: ``No space left on device``, also from safetensors' own
    error type, whose text wraps the OS error (``... I/O error: No space left on device (os error 28)``)."""
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    text = str(exc)
    found = re.search(r'message: "([^"]+)"', text) or re.search(r"(?:I/O error|IoError): ([^(]+?) \(os error \d+\)", text)
    return found[1] if found else text


def write_error(action: str, exc: BaseException, note: str = "") -> RunDirError:
    """The error for a failed write: what could not be done, why, and (``note``) what is intact."""
    return RunDirError(
        f"Could not {action}: {_reason(exc)}." + (f" {note}" if note else ""),
        "Free some disk space or pick a writable output.dir, then continue the run with `finetune resume RUN_FOLDER`"
        if note else "Free some disk space or set output.dir to a folder you can write to.",
    )
