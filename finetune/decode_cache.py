"""A cache of decoded image folders: decode once, memory-map ever after.

Decoding an image folder into one ``uint8 (N, 3, H, W)`` array costs seconds for CIFAR's 60,000
small JPEGs and minutes for folders of photos, at every start, ``finetune eval`` included. The
first decode is saved as a ``.npy`` file under the user's cache folder; later loads memory-map it
(``numpy.load(mmap_mode="c")``), which takes milliseconds and reads pages only as they are used.

An entry is keyed by the SHA-256 of everything that decides its contents: each file's path, size
and modification time (or a Hugging Face dataset's fingerprint), the labels, ``data.image_size``
and the cache format. A changed, added or removed file gives another key, so a stale entry is
never used (it is simply left behind).

The cache folder is ``$FINETUNE_CACHE_DIR``, else ``$XDG_CACHE_HOME/finetune``, else
``~/.cache/finetune``; ``data.cache: false`` turns the cache off. A cache that cannot be written
(a read-only home, a full disk) is skipped with a warning: it never stops a run.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from .snapshot import write_atomically, write_text_atomically

FORMAT = 1


def cache_dir() -> Path:
    """Where decoded folders are kept (see the module docstring)."""
    if os.environ.get("FINETUNE_CACHE_DIR"):
        return Path(os.environ["FINETUNE_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "finetune"


def files_key(files: Sequence[str], labels: Sequence[int], image_size: int | None) -> str:
    """Cache key of image files: SHA-256 of each file's path, size and mtime, the labels and the image size."""
    digest = hashlib.sha256(f"finetune-decoded/{FORMAT}\nimage_size={image_size}\n".encode())
    for path, label in zip(files, labels):
        info = os.stat(path)
        digest.update(f"{path}\0{info.st_size}\0{info.st_mtime_ns}\0{label}\n".encode())
    return digest.hexdigest()


def dataset_key(fingerprint: str, split: str, image_size: int | None) -> str:
    """Cache key of a Hugging Face dataset's split: its fingerprint (which changes with its data),
    the split and the image size."""
    text = f"finetune-decoded/{FORMAT}\nimage_size={image_size}\nhf={fingerprint}\nsplit={split}\n"
    return hashlib.sha256(text.encode()).hexdigest()


def cached(
    key: str, decode: Callable[[], tuple[torch.Tensor, list[int], list[str]]]
) -> tuple[torch.Tensor, list[int], list[str]]:
    """The decoded images for ``key`` (:func:`files_key`, :func:`dataset_key`), from the cache when
    it has them, else from ``decode()`` (whose result is then stored).

    Args:
        key: what the images are decoded from.
        decode: returns ``(images, kept, unreadable)``: ``uint8 (K, 3, H, W)``, the indices of its
            K images among the inputs, and the names of inputs that could not be read.

    Returns:
        The same triple. Images from the cache are memory-mapped (copy-on-write: changing them
        never touches the file).
    """
    folder = cache_dir() / "decoded"
    data, meta = folder / f"{key}.npy", folder / f"{key}.json"
    if meta.is_file() and data.is_file():
        try:
            info = json.loads(meta.read_text(encoding="utf-8"))
            images = np.load(data, mmap_mode="c")  # maps the file; pages are read when used
            if info.get("format") == FORMAT and list(images.shape) == info["shape"]:
                return torch.from_numpy(images), list(info["kept"]), list(info["unreadable"])
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a damaged entry: decode again and replace it
    images, kept, unreadable = decode()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_atomically(data, lambda tmp: _save_npy(tmp, images.numpy()))
        # Written last: an entry without its .json (a crash in between) is never read.
        write_text_atomically(meta, json.dumps(
            {"format": FORMAT, "shape": list(images.shape), "kept": kept, "unreadable": unreadable}))
    except OSError as exc:
        warnings.warn(f"could not write the decode cache in {folder} ({exc.strerror or exc}); "
                      "the next start decodes the images again", stacklevel=2)
    return images, kept, unreadable


def _save_npy(path: Path, array: np.ndarray) -> None:
    # Through an open file: given a path without ".npy", np.save would add the suffix.
    with open(path, "wb") as f:
        np.save(f, array)
