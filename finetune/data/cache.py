"""A cache of decoded image folders: decode once, memory-map ever after.

Decoding an image folder into one ``uint8 (N, 3, H, W)`` array costs seconds for CIFAR's 60,000
small JPEGs and minutes for folders of photos, at every start, ``finetune eval`` included. The
first decode is saved as a ``.npy`` file under the user's cache folder; later loads memory-map it
(``numpy.load(mmap_mode="c")``), which takes milliseconds and reads pages only as they are used.

An entry is keyed by the SHA-256 of everything that decides its contents: each file's path, size,
modification and change times and inode (or a Hugging Face dataset's fingerprint and image
column), the labels, ``data.image_size``, the decoders' versions and the cache format. A changed,
added or removed file gives another key, so a stale entry is never used (it is simply left
behind). The change time is in the key because ``os.utime`` can put back a replaced file's
modification time but never its change time.

Nothing read from the cache is trusted: its index (``KEY.json``) is checked as data (types, counts,
indices within the inputs) and a CRC-32 of the image bytes and the kept indices, written when the
entry is made, is checked on every read. A damaged or edited entry is decoded again, with a
one-line warning. The index holds no paths: the names of unreadable inputs are those of the
caller's own listing, never text from the file.

The cache folder is ``$FINETUNE_CACHE_DIR``, else ``$XDG_CACHE_HOME/finetune``, else
``~/.cache/finetune``; ``data.cache: false`` turns the cache off. A cache that cannot be written
(a read-only home, a full disk) is skipped with a warning: it never stops a run.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
import zlib
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path

import numpy as np
import torch

from ..snapshot import write_atomically, write_text_atomically

FORMAT = 2  # 2: indices only in the index, a checksum, EXIF orientation for every format


def cache_dir() -> Path:
    """Where decoded folders are kept (see the module docstring)."""
    if os.environ.get("FINETUNE_CACHE_DIR"):
        return Path(os.environ["FINETUNE_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "finetune"


@cache
def _decoders() -> str:
    """The decoders' versions: another libjpeg or Pillow may give other pixels."""
    import PIL
    import torchvision

    return f"torchvision={torchvision.__version__} pillow={PIL.__version__}"


def _header(image_size: int | None) -> str:
    return f"finetune-decoded/{FORMAT}\n{_decoders()}\nimage_size={image_size}\n"


def files_key(files: Sequence[str], labels: Sequence[int], image_size: int | None) -> str:
    """Cache key of image files: SHA-256 of each file's path, size, mtime, ctime and inode, the
    labels, the image size and the decoders. Paths are hashed as the bytes the file system holds
    (``os.fsencode``), so names that are not UTF-8 work too."""
    digest = hashlib.sha256(_header(image_size).encode())
    for path, label in zip(files, labels):
        try:
            info = os.stat(path)
            stamp = b"%d\0%d\0%d\0%d" % (info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino)
        except OSError:  # gone since it was listed: the decode will find it unreadable
            stamp = b"missing"
        digest.update(b"%s\0%s\0%d\n" % (os.fsencode(path), stamp, label))
    return digest.hexdigest()


def dataset_key(fingerprint: str, split: str, image_size: int | None, image_column: str) -> str:
    """Cache key of a Hugging Face dataset's split: its fingerprint (which changes with its data),
    the split, the image column, the image size and the decoders."""
    text = f"{_header(image_size)}hf={fingerprint}\nsplit={split}\nimage_column={image_column}\n"
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def cached(
    key: str, count: int, decode: Callable[[], tuple[torch.Tensor, list[int]]]
) -> tuple[torch.Tensor, list[int]]:
    """The decoded images for ``key`` (:func:`files_key`, :func:`dataset_key`), from the cache when
    it holds a sound entry, else from ``decode()`` (whose result is then stored).

    Args:
        key: what the images are decoded from.
        count: how many inputs the images are decoded from.
        decode: returns ``(images, kept)``: ``uint8 (K, 3, H, W)`` and the increasing indices of
            its K images among the ``count`` inputs (the others could not be read).

    Returns:
        The same pair. Images from the cache are memory-mapped (copy-on-write: changing them
        never touches the file).
    """
    folder = cache_dir() / "decoded"
    data, meta = folder / f"{key}.npy", folder / f"{key}.json"
    if meta.is_file() and data.is_file():
        try:
            return _read_entry(key, count, data, meta)
        except _Damaged as exc:
            warnings.warn(f"the decode cache entry {data} is damaged ({exc}); decoding the images again",
                          stacklevel=2)
    images, kept = decode()
    array = images.numpy()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_atomically(data, lambda tmp: _save_npy(tmp, array))
        # Written last: an entry without its .json (a crash in between) is never read.
        write_text_atomically(meta, json.dumps({
            "format": FORMAT, "key": key, "inputs": count, "shape": list(array.shape), "kept": list(kept),
            "crc32": _checksum(array, kept)}))
    except OSError as exc:
        warnings.warn(f"could not write the decode cache in {folder} ({exc.strerror or exc}); "
                      "the next start decodes the images again", stacklevel=2)
    return images, kept


_INDEX_KEYS = {"format", "key", "inputs", "shape", "kept", "crc32"}  # exactly what cached() writes


class _Damaged(Exception):
    """A cache entry that must not be used; ``str()`` says why, in a few words."""


def _read_entry(key: str, count: int, data: Path, meta: Path) -> tuple[torch.Tensor, list[int]]:
    """A cached entry, checked as untrusted data.

    Raises:
        _Damaged: anything about it is not what :func:`cached` writes for ``key`` and ``count`` inputs.
    """
    try:
        if meta.stat().st_size > 4096 + 24 * count:  # the index of ``count`` inputs cannot be longer
            raise _Damaged("its index is too long")
        info = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise _Damaged(f"its index cannot be read: {type(exc).__name__}") from None
    if not isinstance(info, dict) or set(info) != _INDEX_KEYS or info["format"] != FORMAT or info["key"] != key:
        raise _Damaged("its index is not what finetune writes for this entry")
    shape, kept, checksum = info.get("shape"), info.get("kept"), info.get("crc32")
    if not (_ints(shape) and len(shape) == 4 and shape[1] == 3 and min(shape) >= 0):
        raise _Damaged("its index has no valid image shape")
    if info.get("inputs") != count or type(count) is not int:
        raise _Damaged(f"its index is for {info.get('inputs')!r} inputs, not {count}")
    if not (_ints(kept) and len(kept) == shape[0] and (not kept or (kept[0] >= 0 and kept[-1] < count))
            and all(a < b for a, b in zip(kept, kept[1:]))):
        raise _Damaged("its index does not list one increasing input number per image")
    if type(checksum) is not int:
        raise _Damaged("its index has no checksum")
    try:
        images = np.load(data, mmap_mode="c")  # maps the file; pages are read when used
    except Exception as exc:  # noqa: BLE001 - a damaged header fails in many ways (ValueError, tokenize.TokenError, ...)
        raise _Damaged(f"its images cannot be read: {type(exc).__name__}") from None
    if images.dtype != np.uint8 or list(images.shape) != shape or not images.flags.c_contiguous:
        raise _Damaged("its images do not have the shape its index gives")
    if _checksum(images, kept) != checksum:
        raise _Damaged("its checksum does not match: the files changed after they were written")
    return torch.from_numpy(images), kept


def _ints(value: object) -> bool:
    return isinstance(value, list) and all(type(v) is int for v in value)


def _checksum(images: np.ndarray, kept: Sequence[int]) -> int:
    """CRC-32 of the kept indices and the image bytes: catches flipped, zeroed or cut bytes, and an
    index that pairs the images with other inputs. (A checksum, not a signature: whoever can
    write the cache can write both.) About 3 GB/s, against 1 GB/s for SHA-256 on this CPU."""
    crc = zlib.crc32(np.asarray(kept, dtype="<i8").tobytes())
    return zlib.crc32(np.ascontiguousarray(images).reshape(-1), crc)


def _save_npy(path: Path, array: np.ndarray) -> None:
    # Through an open file: given a path without ".npy", np.save would add the suffix.
    with open(path, "wb") as f:
        np.save(f, array)
