"""The run folder on disk: its layout and marker, how a folder's state reads, the checks that a
new run may claim a path, the folder's lock, and moving an earlier run aside (``output.overwrite``).
A training process holds its folder as a :class:`finetune.runs.rundir.RunDir`, which
``finetune.runs.recorder.RunRecorder`` fills; ``eval``, ``predict`` and reports read folders
through this module without importing the training loop.

Layout of ``output.dir/name/``::

    recipe.yaml            the resolved recipe (what ``finetune resume`` trains with)
    metrics.jsonl          one strict-JSON line per log interval and per evaluated epoch
    summary.json           status, results, times, environment; rewritten atomically
    checkpoints/last.safetensors   the full training state (finetune.snapshot), replaced atomically
    best/                  the model of the best epoch on validation (only with a validation split)
    config.json, model.safetensors, curves.png, confusion_matrix.png   written when the run finishes
    README.md              the model card (finetune.runs.card), also in best/; written when the run finishes
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

import errno
import json
import math
import os
import re
import secrets
import stat
import time
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from ..errors import RunDirError, excerpt
from ..recipe import Recipe
from ..snapshot import fsync_dir, write_new_text_synced

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
# What reading a JSON or YAML file finetune wrote can raise when it is damaged or crafted: a bad
# encoding or syntax (ValueError), and nesting deeper than Python's parsers recurse.
PARSE_ERRORS = (OSError, UnicodeDecodeError, ValueError, RecursionError)
# Plausible sides of a stored image (summary.json's stored_size): below 2 pixels nothing of a photo
# is left; above 4096 one photo alone takes 200 MB as floats, and no run keeps images that large.
STORED_SIDE = (2, 4096)
# What finetune reads in a run folder, checked by check_links: none of it may lead out of the folder.
READ_PATHS = ("recipe.yaml", "summary.json", "metrics.jsonl", "config.json", "model.safetensors",
              str(CHECKPOINT.parent), str(CHECKPOINT), BEST_DIR, f"{BEST_DIR}/config.json",
              f"{BEST_DIR}/model.safetensors")


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
    except PARSE_ERRORS:
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
    """``summary.json`` as a dict, or ``None`` when it is missing, unreadable, or a link out of
    the folder (whose content is another file's, never the run's)."""
    file = path / "summary.json"
    if not file.is_file() or leads_out(path, "summary.json"):  # a FIFO or a folder would hang or fail
        return None
    try:
        summary = json.loads(file.read_text(encoding="utf-8"))
    except PARSE_ERRORS:
        return None
    return summary if isinstance(summary, dict) else None


def leads_out(folder: Path, name: str | Path) -> bool:
    """Whether ``folder / name`` is, or passes through, a link that leads out of ``folder`` (a
    missing entry does not)."""
    path = folder / name
    if not (path.exists() or path.is_symlink()):
        return False
    try:
        return not path.resolve().is_relative_to(folder.resolve())
    except (OSError, RuntimeError):  # a loop of links
        return True


def check_links(folder: Path, names: tuple[str, ...] = READ_PATHS) -> None:
    """Refuse a run folder in which a file finetune reads (``recipe.yaml``, ``checkpoints/``...)
    is a link that leads out of the folder: reading it would read another file, and messages about
    it would print that file's content. Links that stay inside the folder are read as usual.

    Raises:
        RunDirError: one such link, named.
    """
    for name in names:
        if leads_out(folder, name):
            raise RunDirError(
                f"{folder / name} is a link that leads out of the run folder {folder}; finetune reads a run "
                "folder's own files only, never another file through a link.",
                "Replace the link with a copy of what it points to if you trust that, or use another run folder.",
            )


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

    :meth:`.rundir.RunDir.create` checks again when it creates the folder, since another process may act
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


def take_lock(lock_path: Path) -> int | None:
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


# --------------------------------------------------------------------------------------------
# Writing


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
# Replacing an earlier run


def move_aside(path: Path, overwrite: bool) -> Path:
    """Make room for a new run at ``path`` (see :meth:`.rundir.RunDir.create`): move the run there, which
    must carry finetune's marker, to ``.NAME.replaced-<time>-<hex>`` beside it.

    Returns:
        Where the old run went.
    """
    refusal = _refusal(path, overwrite)
    if refusal is not None:
        raise refusal
    try:
        fd = take_lock(path / LOCK_FILE)  # hold the old run's lock while moving it: no one else can start there
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


# --------------------------------------------------------------------------------------------
# Write errors


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


def patch_side(model: Any) -> int:
    """The smaller side of a model's patch (``patch_embed.patch_size``); 1 for a model without
    patches. An image kept smaller than one patch leaves such a model nothing to see."""
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if isinstance(patch, int):
        return patch
    return min(patch) if patch else 1


def stored_size(target: Path, model: Any = None) -> tuple[int, int] | None:
    """The size a run kept its training images at (``summary.json``: ``stored_size``), when
    ``target`` is a run folder, its ``best/`` model or a weights file in one: ``predict`` then
    resizes a photo as the run's evaluation resized its images (to that size, then to the model's),
    and ``finetune export`` writes it into the exported file.
    ``None`` for any other source, or a run from before the size was recorded.

    Args:
        model: the run's model, when at hand: a side below its patch (:func:`patch_side`) is
            implausible too.

    Raises:
        RunDirError: a recorded size that is not ``[height, width]`` with sides from 2 (or the
            model's patch) to 4096 (:data:`STORED_SIDE`): resizing photos to it would be wrong or
            would exhaust memory, and leaving it out would preprocess differently from the run.
    """
    if not target.exists():  # a timm name or hub id: no run folder, and no reading of ./summary.json
        return None
    folder = target if target.is_dir() else target.parent
    if folder.name == BEST_DIR and not is_run_folder(folder):
        folder = folder.parent
    summary = read_summary(folder) if is_run_folder(folder) else None
    size = summary.get("stored_size") if summary else None
    if size is None:
        return None
    low, high = max(patch_side(model), STORED_SIDE[0]), STORED_SIDE[1]
    if not (isinstance(size, list) and len(size) == 2 and all(type(s) is int and low <= s <= high for s in size)):
        raise RunDirError(
            f"{folder / 'summary.json'} records stored_size {excerpt(size)}, which is not [height, width] with "
            f"sides from {low} to {high} pixels (the size the run kept its images at; a side below {low} "
            "leaves nothing of a photo for this model, a larger one exhausts memory).",
            "Restore summary.json from the run as finetune wrote it, or remove its stored_size entry to "
            "resize photos straight to the model's input size.",
        )
    return size[0], size[1]


def preprocess_of(model: Any, source: Path):
    """How photos become ``model``'s input (a :class:`~finetune.data.preprocess.Preprocess`), for
    ``predict``, ``show`` and ``finetune export``: its config.json's ``pretrained_cfg``, which
    states what the run's evaluation did, or, for a run saved before that config named the stored
    size, the run's ``summary.json`` (:func:`stored_size`)."""
    from ..data.preprocess import Preprocess, stored_size_of

    if stored_size_of(model.pretrained_cfg) is None and (size := stored_size(Path(source), model)) is not None:
        return Preprocess.from_model(model, load_size=size)
    return Preprocess.from_model(model)
