"""ImageFolder trees (``data.name=imagefolder``): ``root/train/<class>/<image>`` and
``root/test`` (or ``root/val``), listed safely (hidden entries, macOS metadata, link loops and links
into the other split are left out and recorded), then decoded or kept encoded for streaming."""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import DataError
from . import cache as decode_cache
from .decode import decode_files, keep_encoded
from .splits import SkippedFiles, Split, encoded_files, printable


def load_imagefolder(cfg, skipped: SkippedFiles) -> tuple[Split, Split, list[str]]:
    """Decode ``root/train`` and ``root/test`` (or ``root/val``) ImageFolder trees, or keep them
    encoded for streaming (see :func:`keep_encoded`)."""
    root, image_size = Path(cfg.root).expanduser(), cfg.image_size
    if not root.is_dir():
        raise DataError(
            f"data.root {root} is not a folder.",
            "Point data.root at the folder that holds train/<class>/<image> and test/<class>/<image>.",
        )
    train_dir = root / "train"
    test_dir = next((root / sub for sub in ("test", "val") if (root / sub).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        missing = [str(p) for p in (train_dir,) if not p.is_dir()] + ([] if test_dir else [f"{root}/test (or val)"])
        raise DataError(
            f"data.name=imagefolder expects the folders {' and '.join(missing)}, which do not exist.",
            f"Lay the images out as {root}/train/<class>/<image> and {root}/test/<class>/<image>.",
        )

    train_files, train_labels, classes = list_imagefolder(train_dir, skipped, exclude=[test_dir])
    used = getattr(cfg, "classes", None) or classes  # data.classes may leave some class folders out
    _refuse_empty_classes(train_dir, classes, used, torch.bincount(torch.tensor(train_labels), minlength=len(classes)))
    test_files, test_names, test_classes = list_imagefolder(test_dir, skipped, exclude=[train_dir])
    unknown = sorted(set(test_classes) - set(classes))
    if unknown:
        raise DataError(
            f"{test_dir} has class folders that {train_dir} lacks: {', '.join(unknown)}.",
            "Give train/ and test/ the same class folders.",
        )
    # Labels follow train/'s class order, so a class missing from test/ cannot shift the others.
    class_to_idx = {c: i for i, c in enumerate(classes)}
    test_labels = [class_to_idx[test_classes[i]] for i in test_names]

    if keep_encoded(cfg, len(train_files) + len(test_files), train_files[0]):
        return encoded_files(train_files, train_labels, image_size), encoded_files(test_files, test_labels, image_size), classes
    train = decode_files(train_files, train_labels, image_size, skipped, cache_key=folder_key(cfg, train_files, train_labels))
    _refuse_empty_classes(train_dir, classes, used, torch.bincount(train.labels, minlength=len(classes)), skipped)
    test = decode_files(test_files, test_labels, image_size, skipped, cache_key=folder_key(cfg, test_files, test_labels))
    return train, test, classes


def _refuse_empty_classes(
    folder: Path, classes: list[str], used: Sequence[str], counts: torch.Tensor, skipped: SkippedFiles | None = None
) -> None:
    """Refuse a training class folder without images: it would add an output the model can never
    learn, and lower the accuracy. ``counts``: images per class, listed (``skipped`` ``None``) or
    decoded (then the images that could not be read are why)."""
    empty = [name for name, n in zip(classes, counts.tolist()) if n == 0 and name in used]
    if not empty:
        return
    where = ", ".join(printable(folder / name) for name in empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
    plural = len(empty) > 1
    why = "image files" if skipped is None else "image that can be read"
    raise DataError(
        f"The class folder{'s' if plural else ''} {where} hold{'' if plural else 's'} no {why}, so "
        f"{'these classes' if plural else 'its class'} would have no training images (an output the model can "
        "never learn, which lowers its accuracy).",
        f"Remove the folder{'s' if plural else ''} or add images (JPEG, PNG, GIF, BMP, TIFF, WebP), or leave "
        f"{'them' if plural else 'it'} out with data.classes.",
    )


_MACOS_FOLDER = "__MACOSX"  # what macOS's Archive Utility adds to a zip: AppleDouble copies of each file
_MACOS_METADATA = "macOS metadata (__MACOSX, ._*)"

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
"""File extensions read as images (any case); torchvision decodes JPEG, PNG, GIF and WebP, Pillow the rest."""


def list_imagefolder(
    folder: Path, skipped: SkippedFiles, *, exclude: Sequence[Path] = ()
) -> tuple[list[str], list[int], list[str]]:
    """Files, labels and classes of an ImageFolder tree ``folder/<class>/.../<image>``.

    Hidden entries (names starting with ``.``, such as ``.ipynb_checkpoints``) and the metadata
    macOS adds to archives (``__MACOSX/``, AppleDouble ``._*`` files) are ignored. Symbolic links
    are followed, but no folder is read twice and no file is listed twice, so a link that loops
    back (``cat/loop -> ..``) cannot multiply the images or hang the listing. A link to a folder
    that holds ``folder`` (the dataset root, say), or a folder or file link into one of ``exclude``
    (the other split), is not followed either: it would mislabel images or leak test images into
    training. Every entry left out is recorded in ``skipped`` with its reason. Files are listed per
    class in sorted path order, as torchvision's ``ImageFolder`` lists them.

    Raises:
        DataError: no class folders, or no image files at all.
    """
    walk = _Walk(folder, skipped, exclude)
    classes, roots = walk.class_folders()
    if not classes:
        raise DataError(
            f"{folder} has no class folders.", f"Put each class's images in its own folder: {folder}/<class>/<image>.jpg."
        )
    samples: list[tuple[str, int]] = []
    for label, root in enumerate(roots):
        found = walk.image_files(root)
        # Folder by folder, each folder's files by name: the order torchvision's ImageFolder gives.
        samples += [(path, label) for path in sorted(found, key=lambda f: (os.path.dirname(f), os.path.basename(f)))]
    if not samples:
        raise DataError(f"{folder} holds no image files.", f"Add images as {folder}/<class>/<image>.jpg.")
    return [path for path, _ in samples], [label for _, label in samples], classes


class _Walk:
    """One listing of an ImageFolder tree: the folders and files already reached (by device and
    inode, whichever path or link reached them), and the places links must not lead."""

    def __init__(self, folder: Path, skipped: SkippedFiles, exclude: Sequence[Path]):
        self.folder, self.skipped = folder, skipped
        self.visited: set[tuple[int, int]] = {_identity(folder)}  # folders read
        self.seen: set[tuple[int, int]] = set()  # files listed
        self.here, self.others = folder.resolve(), [p.resolve() for p in exclude]

    def outside(self, path: Path) -> bool:
        """A folder that holds this tree, or lies in another split's."""
        real = path.resolve()
        return self.here.is_relative_to(real) and real != self.here or any(real.is_relative_to(o) for o in self.others)

    def class_folders(self) -> tuple[list[str], list[Path]]:
        """The class names and their folders, in name order; other entries are recorded as skipped."""
        classes: list[str] = []
        roots: list[Path] = []
        skipped, folder = self.skipped, self.folder
        for entry in _entries(folder, skipped):
            path = folder / entry
            if entry == _MACOS_FOLDER or entry.startswith("._"):
                skipped.add(_MACOS_METADATA, path)
            elif entry.startswith("."):
                skipped.add("hidden entry", path)
            elif not path.is_dir():
                skipped.add("file outside the class folders", path)
            elif self.outside(path):
                skipped.add("link to a folder holding the dataset or its other split", path)
            elif _identity(path) in self.visited:
                skipped.add("link to a folder already read", path)
            else:
                self.visited.add(_identity(path))
                classes.append(entry)
                roots.append(path)
        return classes, roots

    def image_files(self, root: Path) -> list[str]:
        """The image files under one class folder (in no particular order)."""
        found: list[str] = []
        stack = [(root, _identity(root)[0])]
        while stack:
            current, device = stack.pop()
            for entry in _scan(current, self.skipped):
                kind = self._kind(entry, device)
                if kind is None:
                    continue
                key, is_dir, is_file = kind
                if is_dir:
                    self._enter(entry, key, stack)
                elif self._is_new_image(entry, key, is_file):
                    self.seen.add(key)
                    found.append(entry.path)
        return found

    def _kind(self, entry: os.DirEntry, device: int) -> tuple[tuple[int, int], bool, bool] | None:
        """``(identity, is a folder, is a regular file)`` of an entry, or ``None`` (recorded as
        skipped) for hidden entries, macOS metadata and broken links."""
        skipped = self.skipped
        if entry.name == _MACOS_FOLDER or entry.name.startswith("._"):
            skipped.add(_MACOS_METADATA, entry.path)
            return None
        if entry.name.startswith("."):
            skipped.add("hidden entry", entry.path)
            return None
        if entry.is_symlink():
            try:
                info = os.stat(entry.path)
            except OSError:
                skipped.add("broken link or unreadable entry", entry.path)
                return None
            return (info.st_dev, info.st_ino), stat.S_ISDIR(info.st_mode), stat.S_ISREG(info.st_mode)
        # The listing already says what a plain entry is: no stat call per file.
        return (device, entry.inode()), entry.is_dir(follow_symlinks=False), entry.is_file(follow_symlinks=False)

    def _enter(self, entry: os.DirEntry, key: tuple[int, int], stack: list[tuple[Path, int]]) -> None:
        """Queue a folder to be read, unless a link leads outside or it was read already."""
        if entry.is_symlink() and self.outside(Path(entry.path)):
            self.skipped.add("link to a folder holding the dataset or its other split", entry.path)
        elif key in self.visited:
            self.skipped.add("link to a folder already read", entry.path)
        else:
            self.visited.add(key)
            stack.append((Path(entry.path), key[0]))

    def _is_new_image(self, entry: os.DirEntry, key: tuple[int, int], is_file: bool) -> bool:
        """Whether a non-folder entry is an image file not listed yet; if not, record why."""
        skipped = self.skipped
        if not is_file:
            skipped.add("not a regular file", entry.path)
        elif (suffix := os.path.splitext(entry.name)[1].lower()) not in IMAGE_EXTENSIONS:
            skipped.add(f"not an image file ({suffix or 'no extension'})", entry.path)
        elif entry.is_symlink() and any(Path(entry.path).resolve().is_relative_to(o) for o in self.others):
            skipped.add("link to a file in the dataset's other split", entry.path)
        elif key in self.seen:
            skipped.add("the same file reached twice through links", entry.path)
        else:
            return True
        return False


def _entries(folder: Path, skipped: SkippedFiles) -> list[str]:
    return [entry.name for entry in _scan(folder, skipped)]


def _scan(folder: Path, skipped: SkippedFiles) -> list[os.DirEntry]:
    """A folder's entries sorted by name; an unreadable folder is recorded and gives none."""
    try:
        with os.scandir(folder) as entries:
            return sorted(entries, key=lambda e: e.name)
    except OSError:
        skipped.add("unreadable folder", folder)
        return []


def _identity(path: Path) -> tuple[int, int]:
    """What makes a folder or file the same one, whichever path (or link) reaches it."""
    info = path.stat()
    return info.st_dev, info.st_ino


def folder_key(cfg, files: list[str], labels: list[int]) -> str | None:
    """The decode-cache key of image files, or ``None`` when the recipe turns the cache off."""
    return decode_cache.files_key(files, labels, cfg.image_size) if getattr(cfg, "cache", False) else None
