"""What every command shares: the two consoles, user errors as one paragraph, finetune's warnings
as one line, the common arguments and options, and the checks several commands make before any
work (an unfinished run, a folder that cannot be written, a model's class names)."""

from __future__ import annotations

import contextlib
import functools
import warnings
from pathlib import Path
from typing import Annotated, Any, Callable

import typer
from rich.console import Console
from rich.markup import escape

from ..errors import FinetuneError

# soft_wrap: long lines (paths, YAML) are never broken, so output can be piped or copied as is.
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


OverridesArg = Annotated[
    list[str] | None,
    typer.Argument(help="Recipe overrides as dotted.key=value, e.g. optim.lr=3e-4 data.batch_size=64.", show_default=False),
]


def friendly_errors(fn: Callable) -> Callable:
    """Print user errors as one paragraph and exit 1; let real bugs keep their traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with _plain_warnings():
                return fn(*args, **kwargs)
        except FinetuneError as exc:
            err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
            raise typer.Exit(1) from None
        except KeyboardInterrupt as exc:
            detail = f": {escape(str(exc))}" if str(exc) else ""  # RunInterrupted says how to resume
            err.print(f"[yellow]interrupted[/]{detail}", highlight=False)
            raise typer.Exit(130) from None

    return wrapper


@contextlib.contextmanager
def _plain_warnings():
    """Print finetune's own warnings (``engine.TrainingWarning``: a setting that does less than it
    says) as one ``warning:`` line, by the main process only; other warnings keep Python's format."""
    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if getattr(category, "__module__", "").split(".")[0] != "finetune":
            return previous(message, category, filename, lineno, file, line)
        if is_main_process():
            err.print(f"[yellow]warning:[/] {escape(str(message))}", highlight=False)

    with warnings.catch_warnings():  # also forgets which warnings an earlier command showed
        warnings.showwarning = show
        yield


NprocOpt = Annotated[
    int,
    typer.Option("--nproc", min=1, help="Processes to train with on this machine, through torchrun (one per GPU; "
                 "gloo on a CPU). data.batch_size stays the global batch."),
]


def is_main_process() -> bool:
    """False on the ranks of a torchrun other than 0, which print nothing but errors."""
    import os

    return os.environ.get("RANK", "0") == "0"


def refuse_unfinished_run(target: Path) -> None:
    """A run folder that has no model yet gets a message about the run, not about a missing file;
    one (or the run around a model in it) with a file that is a link out of it is refused."""
    from ..runs.folder import BEST_DIR, check_links, is_run_folder, run_status

    for folder in (target, target.parent):
        if folder.is_dir() and is_run_folder(folder):
            check_links(folder)  # what eval, predict and export read of a run never comes from elsewhere
    if not is_run_folder(target) or (target / "config.json").is_file():
        return
    status = run_status(target) or "unknown"
    best = target / BEST_DIR
    also = f" Its best epoch so far is saved in {best}, which you can evaluate now." if (best / "config.json").is_file() else ""
    if status == "running":
        fix = "Wait for it to finish." + also
    elif status in ("interrupted", "failed"):
        fix = f"Continue it with `finetune resume {target}` first." + also
    else:
        fix = "Train it again (finetune run ...), or pass another model." + also
    raise FinetuneError(f"The run {target} did not finish (status {status}), so it has no final model.", fix)


def check_writable_folder(folder: Path, option: str) -> None:
    """Refuse, before any work, a folder that cannot be made or written: one under a file, a file
    itself, or one without write permission."""
    import os

    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        where = "it is a file" if existing == folder else f"{existing} is a file, not a folder"
        raise FinetuneError(f"Cannot write to {folder} ({option}): {where}.",
                            f"Pass {option} a path in a folder, or the name of a new folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise FinetuneError(f"Cannot write to {folder} ({option}): {existing} is not writable (permissions, or a "
                            "read-only file system).", f"Pass {option} a path in a folder you can write to.")


def check_device(name: str) -> None:
    """Refuse a --device that names no device, before any work (torch's own error is a traceback)."""
    import re

    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", name):
        raise FinetuneError(f"--device {name!r} is not a device.", "Pass auto, cpu, cuda, cuda:N or mps.")


def check_image_size(size: int | None, model: Any, option: str = "--image-size") -> None:
    """Refuse an image size that cannot be a size images are kept at: below 2 pixels or the model's
    patch, or above 4096 (one image alone would take 200 MB as floats)."""
    from ..runs.folder import STORED_SIDE, patch_side

    low, high = max(STORED_SIDE[0], patch_side(model)), STORED_SIDE[1]
    if size is not None and not low <= size <= high:
        raise FinetuneError(f"{option} {size} is outside {low}..{high} pixels (the smallest is this model's patch "
                            f"size, or 2; above {high}, one image alone would take 200 MB).",
                            f"Pass {option} between {low} and {high}, or leave it out to keep the run's own size.")


def model_class_names(model: Any) -> list[str]:
    """The model's class names: saved with it, ImageNet's for an ImageNet head, else numbers."""
    names = model.pretrained_cfg.get("label_names")
    if names:
        return list(names)
    from timm.data import ImageNetInfo, infer_imagenet_subset

    subset = infer_imagenet_subset(model)  # e.g. a timm hub model that kept its 1000-class head
    if subset:
        info = ImageNetInfo(subset)
        return [info.index_to_description(i) for i in range(model.num_classes)]
    return [str(i) for i in range(model.num_classes)]

