"""Decoding images: encoded bytes or files to ``uint8 (3, H, W)`` RGB tensors, upright (EXIF
orientation applied), through one fallback chain (torchvision's batched JPEG decoder, then its
``decode_image``, then Pillow); whole lists of files decoded in a thread pool into one split
tensor, with an optional report of how far that has got (:func:`decode_progress`); and the choice
between decoding a dataset into memory and streaming it."""

from __future__ import annotations

import contextlib
import io
import os
import struct
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.io import ImageReadMode
from torchvision.transforms.v2 import functional as TF

from ..errors import DataError
from . import cache as decode_cache
from .memory import check_memory, host_memory_budget
from .preprocess import resize_center_crop
from .splits import ImageTensors, SkippedFiles, printable

# torchvision >= 0.29 marks its image codecs deprecated in favour of TorchCodec (not a dependency
# here). They are still the fastest CPU decoders available, so their warning is silenced locally.
TV_CODEC_DEPRECATION = "The image decoding and encoding capabilities of TorchVision are deprecated"
_JPEG_MAGIC = b"\xff\xd8\xff"
_DECODE_CHUNK = 512  # files per thread-pool task; small tasks cost more in overhead than they save
# Who hears how far decode_files has got (decoded, total), in this context: set by decode_progress.
_on_decoded: ContextVar[Callable[[int, int], None] | None] = ContextVar("finetune_decode_progress", default=None)


@contextlib.contextmanager
def decode_progress(callback: Callable[[int, int], None]) -> Iterator[None]:
    """Within the block, :func:`decode_files` calls ``callback(decoded, total)`` in the calling
    thread when it starts decoding (``decoded`` 0) and after each chunk of files, so that a caller
    can show a progress bar. Images memory-mapped from the decode cache are not decoded and not
    reported. Blocks nest: the innermost callback hears."""
    token = _on_decoded.set(callback)
    try:
        yield
    finally:
        _on_decoded.reset(token)


def decode_files(
    files: Sequence[str | bytes],
    labels: list[int],
    image_size: int | None,
    skipped: SkippedFiles,
    *,
    names: Sequence[str] | None = None,
    cache_key: str | None = None,
) -> ImageTensors:
    """Decode images (file paths, or encoded bytes) into one ``uint8 (N, 3, H, W)`` tensor, in a
    thread pool.

    With ``image_size`` each image is resized (shorter side, centre crop) right after decoding, so a
    folder of large photos never sits in memory at full size. An image that cannot be decoded is
    left out and recorded in ``skipped`` under its name (``names``, default the paths). With a
    ``cache_key`` the result is kept in, and on later calls memory-mapped from, the decode cache
    (:mod:`finetune.data.cache`).

    Raises:
        DataError: images of different sizes without ``image_size``, or no readable image.
    """
    names = list(names) if names is not None else [str(f) for f in files]
    decode = lambda: _decode_all(files, image_size, names)  # noqa: E731
    images, kept = decode_cache.cached(cache_key, len(files), decode) if cache_key else decode()
    unreadable = np.ones(len(files), dtype=bool)
    unreadable[kept] = False
    for i in np.flatnonzero(unreadable).tolist():  # named from our own listing, never from the cache
        skipped.add("unreadable image", names[i])
    return ImageTensors(images, torch.tensor([labels[i] for i in kept], dtype=torch.int64))


def _decode_all(
    files: Sequence[str | bytes], image_size: int | None, names: Sequence[str]
) -> tuple[torch.Tensor, list[int]]:
    """:func:`decode_files`' work: ``(images, increasing indices of the inputs they come from)``.

    Raises:
        DataError: images of different sizes without ``image_size``, no readable image, or more
            images than memory can hold.
    """
    chunks = [files[i : i + _DECODE_CHUNK] for i in range(0, len(files), _DECODE_CHUNK)]
    threads = min(len(chunks), os.cpu_count() or 1, 16)
    report = _on_decoded.get() or (lambda decoded, total: None)
    report(0, len(files))
    out: torch.Tensor | None = None
    kept: list[int] = []  # indices into files of the images in out, in order
    with warnings.catch_warnings(), ThreadPoolExecutor(threads) as pool:
        warnings.filterwarnings("ignore", message=TV_CODEC_DEPRECATION, category=DeprecationWarning)
        start = 0
        results = pool.map(lambda chunk: _decode_chunk(chunk, image_size), chunks)
        try:
            # map yields in file order, so the first readable file sets the size the others must have.
            for decoded in results:
                for offset, image in enumerate(decoded):
                    index = start + offset
                    if image is None:
                        continue
                    if out is None:
                        check_memory(
                            len(files) * image.numel(),
                            f"Decoding {len(files)} images of {_size(image)} (the size of {printable(names[index])})",
                            "Set data.image_size to keep them smaller, or data.in_memory=auto (or false) to stream "
                            "them from the files instead.",
                        )
                        out = torch.empty((len(files), *image.shape), dtype=torch.uint8)
                    if image.shape != out.shape[1:]:
                        raise DataError(
                            f"Images differ in size: {printable(names[kept[0]])} is {_size(out[0])} but "
                            f"{printable(names[index])} is {_size(image)}, and data.image_size is not set.",
                            "Set data.image_size (e.g. data.image_size=224; for finetune eval: --image-size) "
                            "to resize every image to one size when it is loaded.",
                        )
                    out[len(kept)] = image
                    kept.append(index)
                start += len(decoded)
                report(start, len(files))
        except DataError:
            pool.shutdown(cancel_futures=True)  # no point decoding the rest
            raise
    if out is None:
        raise DataError(
            f"None of the {len(files)} images could be read (e.g. {printable(names[0])}).",
            "Check that the files are images (JPEG, PNG, GIF, BMP, TIFF, WebP) and not damaged.",
        )
    return out[: len(kept)], kept


def _size(image: torch.Tensor) -> str:
    return f"{image.shape[-1]}x{image.shape[-2]}"


def _decode_chunk(files: Sequence[str | bytes], image_size: int | None) -> list[torch.Tensor | None]:
    """Decode (and resize) one chunk of files; runs in a worker thread. ``None`` for a file that
    cannot be read or decoded."""
    images = decode_images(files, skip_unreadable=True)
    size = (image_size, image_size) if image_size else None
    return [resize_center_crop(image, size) if image is not None and size else image for image in images]


def decode_images(
    items: Sequence[str | bytes | None],
    names: Sequence[str] | None = None,
    *,
    device: torch.device | str | None = None,
    exif: bool = True,
    skip_unreadable: bool = False,
) -> list[torch.Tensor | None]:
    """Decode images (file paths or encoded bytes) to upright ``uint8 (3, H, W)`` RGB tensors:
    the one decoding path of every loader, on the CPU or a GPU.

    The fallback chain: every JPEG in one batched ``torchvision.io.decode_jpeg`` call on
    ``device`` (nvJPEG on a GPU: per-call overhead dominates for small images); if that call
    fails (one corrupt JPEG fails it) and for other formats, each image alone through
    :func:`decode_bytes` (torchvision's ``decode_image``, then Pillow) on the CPU, then moved to
    ``device``. The EXIF orientation is read from the bytes on the CPU and applied on the
    image's device after decoding on every path (the GPU decoder ignores it).

    Args:
        items: per image, its file path or its encoded bytes (``None``: unreadable).
        names: how messages name each image (default: the paths).
        device: where the images are decoded and returned (``None``: the CPU).
        exif: apply the EXIF orientation.
        skip_unreadable: ``None`` for an image that cannot be read or decoded, instead of an error.

    Raises:
        DataError: an image that cannot be read or decoded, named (without ``skip_unreadable``).
    """
    names = [str(item) for item in items] if names is None else names
    blobs = [read_bytes_or_none(item) if item is not None else None for item in items]
    images: list[torch.Tensor | None] = [None] * len(blobs)
    jpegs = [i for i, blob in enumerate(blobs) if blob is not None and blob.startswith(_JPEG_MAGIC)]
    if jpegs:
        on = {} if device is None else {"device": device}
        try:
            decoded = torchvision.io.decode_jpeg([_as_tensor(blobs[i]) for i in jpegs], mode=ImageReadMode.RGB, **on)
            for i, image in zip(jpegs, decoded):
                images[i] = orient(image, exif_orientation(blobs[i])) if exif else image
        except RuntimeError:
            pass  # a corrupt JPEG fails the call: decode them one by one below to find out which
    for i, image in enumerate(images):
        if image is not None:
            continue
        try:
            image = decode_bytes(blobs[i] or b"", names[i], exif=exif)
            images[i] = image if device is None else image.to(device)
        except DataError:
            if not skip_unreadable:
                raise DataError(
                    f"{printable(names[i])} cannot be read as an image (found while streaming the data).",
                    "Remove or replace it; or set data.in_memory=true, which leaves unreadable images out.",
                ) from None
    return images


def read_bytes_or_none(item: str | bytes) -> bytes | None:
    """An image's encoded bytes: given, or read from its file (``None`` when it cannot be read)."""
    if isinstance(item, bytes):
        return item
    try:
        return read_bytes(item)
    except DataError:
        return None


def read_bytes(path: str | Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise DataError(f"The image file {path} does not exist.", "Check the path.") from None
    except IsADirectoryError:
        raise DataError(f"{path} is a folder, not an image file.", "Give the path of an image file.") from None
    except OSError as err:
        raise DataError(f"Could not read {path}: {err}.", "Check that the file is readable.") from None


def _as_tensor(blob: bytes) -> torch.Tensor:
    """Encoded bytes as the 1-D uint8 tensor torchvision's decoders take."""
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8)  # bytearray: frombuffer wants it writable


def decode_bytes(blob: bytes, path: str | Path, *, exif: bool = True) -> torch.Tensor:
    """Decode one encoded image to ``uint8 (3, H, W)`` RGB, upright (EXIF orientation applied
    unless ``exif`` is false) on the CPU: torchvision first, then Pillow (the fallbacks of
    :func:`decode_images`).

    Raises:
        DataError: neither can decode it, named ``path``.
    """
    if blob:
        try:
            image = torchvision.io.decode_image(_as_tensor(blob), mode=ImageReadMode.RGB)
            if image.ndim == 4:  # an animated GIF: (frames, 3, H, W); its first frame is the picture
                image = image[0]
            # 16-bit PNGs decode to uint16: rescale to 0-255 rather than truncate.
            image = image if image.dtype == torch.uint8 else TF.to_dtype(image, torch.uint8, scale=True)
            # Not torchvision's apply_exif_orientation: it skips WebP, and its GPU decoder skips EXIF.
            return orient(image, exif_orientation(blob)) if exif else image
        except RuntimeError:
            pass  # not JPEG/PNG/GIF/WEBP (e.g. BMP, TIFF) or corrupt: Pillow knows more formats
    try:
        with Image.open(io.BytesIO(blob)) as pil:
            rgb = (ImageOps.exif_transpose(pil) if exif else pil).convert("RGB")
            return torch.from_numpy(np.array(rgb)).permute(2, 0, 1).contiguous()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DataError(
            f"{printable(path)} is not an image that can be read ({type(err).__name__}: {err}).",
            "Delete or replace the file, or move it out of the dataset folder.",
        ) from None


def exif_orientation(blob: bytes) -> int:
    """The EXIF orientation (1-8; 1: upright) stored in a JPEG (APP1), PNG (eXIf) or WebP (EXIF
    chunk), read from the bytes without decoding: cheap enough for every file, and on the CPU
    for images a GPU decodes. 1 for other formats, no EXIF or damaged EXIF."""
    try:
        tiff = _exif_block(blob)
        if not tiff:
            return 1
        order = {b"II": "<", b"MM": ">"}[tiff[:2]]
        ifd = struct.unpack_from(order + "I", tiff, 4)[0]  # the first image file directory (IFD0)
        for n in range(struct.unpack_from(order + "H", tiff, ifd)[0]):
            tag, kind = struct.unpack_from(order + "HH", tiff, ifd + 2 + 12 * n)
            if tag == 0x0112:  # Orientation: a SHORT (type 3), though some writers use a LONG (4)
                value = struct.unpack_from(order + ("H" if kind == 3 else "I"), tiff, ifd + 10 + 12 * n)[0]
                return value if kind in (3, 4) and 1 <= value <= 8 else 1
    except (KeyError, struct.error, IndexError):
        pass
    return 1


def _exif_block(blob: bytes) -> bytes | None:
    """The TIFF-structured EXIF data of a JPEG, PNG or WebP file, or ``None``."""
    if blob.startswith(_JPEG_MAGIC):
        pos = 2
        while pos + 4 <= len(blob) and blob[pos] == 0xFF:
            marker = blob[pos + 1]
            if marker == 0xFF:  # a fill byte
                pos += 1
                continue
            if marker in (0xDA, 0xD9):  # start of scan, end of image: EXIF comes before either
                return None
            length = int.from_bytes(blob[pos + 2 : pos + 4], "big")
            if marker == 0xE1 and blob[pos + 4 : pos + 10] == b"Exif\0\0":
                return blob[pos + 10 : pos + 2 + length]
            pos += 2 + length
        return None
    if blob.startswith(b"\x89PNG\r\n\x1a\n"):
        pos = 8
        while pos + 8 <= len(blob):  # chunks: length, type, data, CRC; eXIf may follow IDAT
            length, kind = int.from_bytes(blob[pos : pos + 4], "big"), blob[pos + 4 : pos + 8]
            if kind == b"eXIf":
                data = blob[pos + 8 : pos + 8 + length]
                return data[6:] if data.startswith(b"Exif\0\0") else data
            if kind == b"IEND":
                return None
            pos += 12 + length
        return None
    if blob[:4] == b"RIFF" and blob[8:12] == b"WEBP":
        pos = 12
        while pos + 8 <= len(blob):  # chunks: type, little-endian size, data padded to even
            kind, size = blob[pos : pos + 4], int.from_bytes(blob[pos + 4 : pos + 8], "little")
            if kind == b"EXIF":
                data = blob[pos + 8 : pos + 8 + size]
                return data[6:] if data.startswith(b"Exif\0\0") else data
            pos += 8 + size + (size & 1)
    return None


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """Turn a decoded ``(..., H, W)`` image upright for its EXIF ``orientation`` (1-8), as Pillow's
    ``ImageOps.exif_transpose`` does; on the image's own device."""
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-1, -2)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:  # transpose: mirror across the main diagonal
        return image.transpose(-1, -2).contiguous()
    if orientation == 6:  # stored turned 90 degrees anticlockwise: turn it clockwise
        return torch.rot90(image, -1, (-2, -1)).contiguous()
    if orientation == 7:  # transverse: mirror across the other diagonal
        return image.transpose(-1, -2).flip(-1, -2).contiguous()
    if orientation == 8:
        return torch.rot90(image, 1, (-2, -1)).contiguous()
    return image


def read_image(path: str | Path) -> torch.Tensor:
    """Read an image file as ``uint8 (3, H, W)`` RGB, honouring EXIF orientation.

    Raises:
        DataError: the file does not exist or is not an image.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=TV_CODEC_DEPRECATION, category=DeprecationWarning)
        return decode_bytes(read_bytes(path), path)


def keep_encoded(cfg, count: int, first: str | bytes) -> bool:
    """Whether to stream a data set (keep it encoded) instead of decoding it into memory:
    ``data.in_memory`` false, or ``auto`` and the decoded set would take more than
    :func:`host_memory_budget` (estimated from ``data.image_size``, else from the first image)."""
    mode = getattr(cfg, "in_memory", True)
    if mode != "auto":
        return not mode
    if cfg.image_size:
        per_image = 3 * cfg.image_size**2
    else:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=TV_CODEC_DEPRECATION, category=DeprecationWarning)
            blob = read_bytes_or_none(first)
            per_image = decode_bytes(blob, "the first image").numel() if blob else 0
    return count * per_image > host_memory_budget()
