"""Datasets held in memory as uint8 tensors, and a GPU batch loader that augments whole batches.

The design follows airbench: a dataset is decoded once into one ``uint8 (N, 3, H, W)`` tensor, the
tensor moves to the device once, and each batch is a slice of a device ``randperm``. Augmentation
(pad-and-crop, flip, random resized crop) and resizing (e.g. CIFAR's 32 px to a ViT's 224 px) run on
the whole batch on the device, so the CPU never touches a 224-px image and there are no DataLoader
workers to feed. Upsampling 50,000 images to 224 px on the CPU, as the course's notebook does, is
what makes its head-only epoch slow.

``load_splits`` builds the train/val/test tensors from the recipe's ``data`` section;
``BatchLoader`` turns one of them into normalised float batches on the device. ``read_image`` and
``preprocess_images`` serve single photos (the ``predict`` command).
"""

from __future__ import annotations

import io
import math
import os
import socket
import stat
import struct
import urllib.parse
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.io import ImageReadMode
from torchvision.transforms.v2 import functional as TF

from . import cache as decode_cache
from ..training.device import host_available_memory
from ..training.distributed import check_global_batch
from ..errors import DataError

# torchvision >= 0.29 marks its image codecs deprecated in favour of TorchCodec (not a dependency
# here). They are still the fastest CPU decoders available, so their warning is silenced locally.
_TV_CODEC_DEPRECATION = "The image decoding and encoding capabilities of TorchVision are deprecated"
_JPEG_MAGIC = b"\xff\xd8\xff"
_DECODE_CHUNK = 512  # files per thread-pool task; small tasks cost more in overhead than they save
_RESIZE_CHUNK = 1024  # images resized at once when a whole split is resized in memory
_CIFAR_CLASSES = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}
_DOWNLOAD_CONNECT_TIMEOUT_S = 10.0  # how long to wait for the download server before giving up
_DOWNLOAD_STALL_TIMEOUT_S = 60.0  # how long a started download may go without receiving data


@dataclass
class ImageTensors:
    """One split of a dataset, decoded.

    Attributes:
        images: ``uint8 (N, 3, H, W)`` on the CPU.
        labels: ``int64 (N,)`` class indices into ``DatasetSplits.classes``.
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.images.shape[0]

    def take(self, index: torch.Tensor | slice) -> ImageTensors:
        """The images at ``index`` (a tensor of indices or booleans, or a slice), in that order."""
        return ImageTensors(self.images[index], self.labels[index])


@dataclass
class EncodedImages:
    """One split kept encoded, for streaming: images are decoded when a batch needs them.

    Attributes:
        items: per image, its file path or its encoded bytes (for a Hugging Face dataset, a lazy
            sequence that reads them from the memory-mapped dataset).
        labels: ``int64 (N,)``.
        names: how messages name each image.
        image_size: what each image is resized to (shorter side, centre crop) when it is decoded,
            before any augmentation; ``None``: the model's input size. Random resized crops are cut
            from the full image instead.
    """

    items: Sequence[str | bytes]
    labels: torch.Tensor
    names: Sequence[str]
    image_size: int | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: torch.Tensor | slice) -> EncodedImages:
        positions = range(len(self))[index] if isinstance(index, slice) else _positions(index)
        return EncodedImages([self.items[i] for i in positions], self.labels[index],
                             [self.names[i] for i in positions], self.image_size)


def _positions(index: torch.Tensor) -> list[int]:
    return (index.nonzero().flatten() if index.dtype == torch.bool else index).tolist()


Split = ImageTensors | EncodedImages


def printable(path: str | Path) -> str:
    """A path as messages and ``summary.json`` show it. A file name that is not UTF-8 (``b"\\xff.png"``
    on Linux, which Python holds with a lone surrogate) shows its bytes escaped: ``\\xff.png``;
    printing or encoding the raw string would fail."""
    text = str(path)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return os.fsencode(text).decode("utf-8", "backslashreplace")


def shard(split: Split, rank: int, world_size: int) -> Split:
    """Process ``rank``'s contiguous part of a split, for evaluation: the parts cover every image
    exactly once (their sizes differ by at most one, nothing is padded or repeated)."""
    n = len(split)
    return split.take(slice(rank * n // world_size, (rank + 1) * n // world_size))


@dataclass
class SkippedFiles:
    """Entries of image folders that were not read, by reason, so that none goes unmentioned.

    Attributes:
        reasons: reason -> paths, e.g. ``"not an image file (.txt)" -> ["train/cat/notes.txt"]``.
    """

    reasons: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, path: str | Path) -> None:
        self.reasons.setdefault(reason, []).append(printable(path))

    def __len__(self) -> int:
        return sum(len(paths) for paths in self.reasons.values())

    def describe(self) -> str:
        """``skipped 3 entries: 2 not an image file (.gif), 1 unreadable image (e.g. a/b.jpg)``."""
        parts = [f"{len(paths)} {reason} (e.g. {paths[0]})" for reason, paths in sorted(self.reasons.items())]
        return f"skipped {len(self)} {'entry' if len(self) == 1 else 'entries'}: " + ", ".join(parts)

    def to_dict(self, examples: int = 5) -> dict[str, Any]:
        """Counts and a few example paths per reason, for ``summary.json``."""
        return {reason: {"count": len(paths), "examples": paths[:examples]} for reason, paths in sorted(self.reasons.items())}


@dataclass
class DatasetSplits:
    """The splits of a dataset and its class names.

    Attributes:
        train: images to train on (after ``train_subset`` and ``val_split``).
        val: images held out of the train set, or ``None`` when ``val_split`` is 0.
        test: the dataset's own test set (ImageFolder: ``test/`` or ``val/``).
        classes: class names; label ``i`` is ``classes[i]``.
        name: the dataset's name in the recipe (``cifar10``, ``imagefolder``, ...).
        skipped: image-folder entries that were not read, by reason.
    """

    train: ImageTensors
    val: ImageTensors | None
    test: ImageTensors
    classes: list[str]
    name: str
    skipped: SkippedFiles = field(default_factory=SkippedFiles)


# --------------------------------------------------------------------------------------------------
# Loading splits
# --------------------------------------------------------------------------------------------------


def load_splits(cfg, *, seed: int) -> DatasetSplits:
    """Load the dataset named by a recipe's ``data`` section into CPU uint8 tensors.

    Args:
        cfg: the recipe's ``data`` section (``name``, ``root``, ``download``, ``train_subset``,
            ``val_split``, ``image_size``, ``synthetic_*``).
        seed: seeds the synthetic images and the choice of the train subset and validation images.

    Returns:
        The train, val (or ``None``) and test splits, each ``uint8 (N, 3, S, S)`` when
        ``cfg.image_size = S`` and at the dataset's own size otherwise.

    Raises:
        DataError: the data is missing and cannot be downloaded, a file is not an image, images
            differ in size with no ``image_size``, a training class folder holds no readable image,
            a Hugging Face label or image cell does not fit, the subset and validation sizes do not
            fit, or the decoded images would not fit in memory.
    """
    skipped = SkippedFiles()
    given_val = None  # a validation split the dataset brings with it
    if cfg.name in _CIFAR_CLASSES:
        (train, test), classes = _load_cifar(cfg.name, Path(cfg.root).expanduser(), download=cfg.download)
    elif cfg.name == "hf":
        hf = _load_hf(cfg)
        stream = _keep_encoded(cfg, len(hf.train.items) + len(hf.test.items), hf.train.items[0])
        train, test = _decode_hf(cfg, hf, "train", skipped, stream), _decode_hf(cfg, hf, "test", skipped, stream)
        given_val = _decode_hf(cfg, hf, "val", skipped, stream) if hf.val is not None else None
        classes = hf.classes
    elif cfg.name == "imagefolder":
        train, test, classes = _load_imagefolder(cfg, skipped)
    elif cfg.name == "synthetic":
        train, test, classes = _make_synthetic(
            num_train=cfg.synthetic_train,
            num_test=cfg.synthetic_test,
            num_classes=cfg.synthetic_classes,
            size=cfg.synthetic_size,
            seed=seed,
        )
    else:
        raise _unknown_dataset(cfg.name)

    if getattr(cfg, "classes", None):
        if given_val is not None:
            given_val, _, _ = select_classes(given_val, given_val, classes, cfg.classes)
        train, test, classes = select_classes(train, test, classes, cfg.classes)
    if given_val is not None and cfg.val_split:
        raise DataError(
            f"The dataset has its own validation split, and data.val_split={cfg.val_split!r} asks to hold out another.",
            "Set data.val_split=0 to use the dataset's validation split.",
        )
    train, val = split_train(train, train_subset=cfg.train_subset, val_split=cfg.val_split, seed=seed)
    val = given_val if given_val is not None else val
    if cfg.image_size is not None and isinstance(train, ImageTensors):
        # ImageFolder files were resized while decoding (a no-op here); CIFAR and synthetic tensors
        # are resized after the subset is taken, so images that will not be used are not resized.
        # Streamed images are resized as each batch is decoded.
        train, test = _resize_split(train, cfg.image_size), _resize_split(test, cfg.image_size)
        val = _resize_split(val, cfg.image_size) if val is not None else None
    return DatasetSplits(train=train, val=val, test=test, classes=classes, name=cfg.name, skipped=skipped)


def select_classes(
    train: ImageTensors, test: ImageTensors, classes: list[str], keep: Sequence[str]
) -> tuple[ImageTensors, ImageTensors, list[str]]:
    """Keep only the images of the classes named in ``keep``, relabelled ``0..len(keep)-1`` in that order.

    Used to split one dataset into two tasks, e.g. pretraining on five CIFAR-10 classes and
    fine-tuning on the other five.
    """
    unknown = [name for name in keep if name not in classes]
    if unknown or len(set(keep)) != len(keep):
        raise DataError(
            f"data.classes names {', '.join(unknown) if unknown else 'a class twice'}; "
            f"the dataset's classes are: {', '.join(classes)}.",
            "List each class at most once, spelled as above.",
        )
    lookup = torch.full((len(classes),), -1, dtype=torch.int64)
    for new, name in enumerate(keep):
        lookup[classes.index(name)] = new

    def subset(split: Split) -> Split:
        labels = lookup[split.labels]  # old label -> new label, -1 for dropped classes
        kept = labels >= 0
        chosen = split.take(kept)
        chosen.labels = labels[kept]
        return chosen

    return subset(train), subset(test), list(keep)


def split_train(
    train: ImageTensors, *, train_subset: int | float | None, val_split: int | float, seed: int
) -> tuple[ImageTensors, ImageTensors | None]:
    """Pick a seeded random training subset and a disjoint held-out validation set.

    One seeded permutation of the train set decides both: validation images are taken from its end
    and training images from its start, so changing ``train_subset`` never changes which images are
    held out, and changing ``val_split`` never changes the training subset (as long as they fit).
    Both keep the dataset's original order.

    Args:
        train: the full train split.
        train_subset: images to train on (int), a fraction of the full train set (float in
            ``(0, 1]``), or ``None`` for every image not held out.
        val_split: images (int) or fraction of the full train set (float in ``[0, 1)``) to hold
            out; 0 holds out none.
        seed: seeds the permutation.

    Returns:
        ``(train, val)``; ``val`` is ``None`` when ``val_split`` is 0.

    Raises:
        DataError: the two together ask for more images than the train set has.
    """
    n = len(train)
    n_val = _count_images(val_split, n, field="data.val_split")
    n_train = n - n_val if train_subset is None else _count_images(train_subset, n, field="data.train_subset")
    if n_train < 1 or n_train + n_val > n:
        raise DataError(
            f"The train set has {n} images, too few for data.train_subset={train_subset!r} "
            f"({n_train} images) plus data.val_split={val_split!r} ({n_val} images).",
            "Lower data.train_subset or data.val_split so that together they fit in the train set.",
        )
    if n_val == 0 and n_train == n:
        return train, None

    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    train_idx = perm[:n_train].sort().values
    subset = train.take(train_idx)
    if n_val == 0:
        return subset, None
    return subset, train.take(perm[n - n_val :].sort().values)


def _count_images(amount: int | float | None, total: int, *, field: str) -> int:
    """Turn a recipe's image count (int) or fraction (float) into a number of images."""
    if amount is None:
        return 0
    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount < 0:
        raise DataError(f"{field} is {amount!r}, not a number of images or a fraction.", "Use e.g. 10000 or 0.2.")
    if isinstance(amount, float):
        if amount > 1.0:
            raise DataError(
                f"{field} is {amount}: a float is a fraction of the train set and must be at most 1.",
                "Write a number of images as an integer, e.g. 10000.",
            )
        # A non-zero fraction always keeps at least one image.
        return max(1, round(amount * total)) if amount > 0 else 0
    return amount


def _resize_split(split: ImageTensors, size: int) -> ImageTensors:
    """Resize a split's images to ``(N, 3, size, size)`` (shorter side, then centre crop)."""
    images = split.images
    if images.shape[-2:] == (size, size):
        return split
    check_memory(images.shape[0] * 3 * size * size, f"Resizing {images.shape[0]} images to {size}x{size} (data.image_size)",
                 "Lower data.image_size or use fewer images (data.train_subset).")
    out = torch.empty((images.shape[0], 3, size, size), dtype=torch.uint8)
    for start in range(0, images.shape[0], _RESIZE_CHUNK):
        # Chunks bound the intermediates that resizing a whole split at once would need.
        out[start : start + _RESIZE_CHUNK] = resize_center_crop(images[start : start + _RESIZE_CHUNK], (size, size))
    return ImageTensors(out, split.labels)


# ---- CIFAR-10 / CIFAR-100 ------------------------------------------------------------------------


def _load_cifar(
    name: str, root: Path, *, download: bool, splits: Sequence[str] = ("train", "test")
) -> tuple[list[ImageTensors], list[str]]:
    """Read the named splits of CIFAR's pickled batches through torchvision; download them first when asked."""
    dataset_cls = _CIFAR_CLASSES[name]
    try:
        first = dataset_cls(str(root), train=splits[0] == "train", download=False)
    except RuntimeError:
        # torchvision raises RuntimeError for missing or corrupt files (it checks md5 sums).
        if not download:
            raise _cifar_missing_error(name, dataset_cls, root, reason="download is off (data.download=false)")
        _download_cifar(name, dataset_cls, root)
        first = dataset_cls(str(root), train=splits[0] == "train", download=False)
    sets = [first] + [dataset_cls(str(root), train=split == "train", download=False) for split in splits[1:]]
    return [_cifar_tensors(d) for d in sets], list(first.classes)


def _cifar_tensors(dataset: torchvision.datasets.CIFAR10) -> ImageTensors:
    # torchvision keeps the pixels as uint8 (N, 32, 32, 3) HWC numpy; we want (N, 3, 32, 32).
    images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()
    return ImageTensors(images, torch.tensor(dataset.targets, dtype=torch.int64))


def _download_cifar(name: str, dataset_cls: type, root: Path) -> None:
    """Download CIFAR with torchvision, failing within seconds when there is no network.

    torchvision's ``urlopen`` has no timeout, so on a machine behind a firewall that drops packets it
    would hang for minutes. A short connection attempt first turns "no network" into an error in at
    most ``_DOWNLOAD_CONNECT_TIMEOUT_S``; a socket timeout during the download stops a stalled one.
    """
    host = urllib.parse.urlsplit(dataset_cls.url).hostname
    try:
        socket.create_connection((host, 443), timeout=_DOWNLOAD_CONNECT_TIMEOUT_S).close()
    except OSError as err:
        raise _cifar_missing_error(name, dataset_cls, root, reason=f"{host} cannot be reached ({err})") from None
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(_DOWNLOAD_STALL_TIMEOUT_S)  # urllib gives no other way to set it
    try:
        dataset_cls(str(root), train=True, download=True)
    except (OSError, RuntimeError) as err:  # URLError and socket timeouts are OSErrors
        raise _cifar_missing_error(name, dataset_cls, root, reason=f"the download failed ({err})") from None
    finally:
        socket.setdefaulttimeout(previous_timeout)


def _cifar_missing_error(name: str, dataset_cls: type, root: Path, *, reason: str) -> DataError:
    folder = root / dataset_cls.base_folder
    hints = []
    if root.name == dataset_cls.base_folder:
        hints.append(f"data.root should be the folder that contains {dataset_cls.base_folder}, i.e. {root.parent}.")
    if (root / "train").is_dir():
        hints.append(f"{root} holds a train/ folder: for an ImageFolder copy set data.name=imagefolder.")
    return DataError(
        f"{name} is not in {folder} (missing or corrupt files) and {reason}.",
        " ".join(
            hints
            + [
                f"Download it on a connected machine into {root} (finetune with data.download=true, or "
                f"torchvision.datasets.{dataset_cls.__name__}('{root}', download=True)), point data.root "
                "at a folder that already holds it, or use data.name=imagefolder with data.root at an "
                "ImageFolder copy (train/<class>/*.jpg and test/<class>/*.jpg)."
            ]
        ),
    )


# ---- ImageFolder ---------------------------------------------------------------------------------


def _load_imagefolder(cfg, skipped: SkippedFiles) -> tuple[Split, Split, list[str]]:
    """Decode ``root/train`` and ``root/test`` (or ``root/val``) ImageFolder trees, or keep them
    encoded for streaming (see :func:`_keep_encoded`)."""
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

    train_files, train_labels, classes = _list_imagefolder(train_dir, skipped, exclude=[test_dir])
    used = getattr(cfg, "classes", None) or classes  # data.classes may leave some class folders out
    _refuse_empty_classes(train_dir, classes, used, torch.bincount(torch.tensor(train_labels), minlength=len(classes)))
    test_files, test_names, test_classes = _list_imagefolder(test_dir, skipped, exclude=[train_dir])
    unknown = sorted(set(test_classes) - set(classes))
    if unknown:
        raise DataError(
            f"{test_dir} has class folders that {train_dir} lacks: {', '.join(unknown)}.",
            "Give train/ and test/ the same class folders.",
        )
    # Labels follow train/'s class order, so a class missing from test/ cannot shift the others.
    class_to_idx = {c: i for i, c in enumerate(classes)}
    test_labels = [class_to_idx[test_classes[i]] for i in test_names]

    if _keep_encoded(cfg, len(train_files) + len(test_files), train_files[0]):
        return _encoded(train_files, train_labels, image_size), _encoded(test_files, test_labels, image_size), classes
    train = _decode_files(train_files, train_labels, image_size, skipped, cache_key=_folder_key(cfg, train_files, train_labels))
    _refuse_empty_classes(train_dir, classes, used, torch.bincount(train.labels, minlength=len(classes)), skipped)
    test = _decode_files(test_files, test_labels, image_size, skipped, cache_key=_folder_key(cfg, test_files, test_labels))
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


def _encoded(files: Sequence[str], labels: Sequence[int], image_size: int | None) -> EncodedImages:
    return EncodedImages(list(files), torch.tensor(list(labels), dtype=torch.int64), list(files), image_size)


def available_memory() -> int:
    """Bytes of memory this process can allocate now (:func:`finetune.device.host_available_memory`)."""
    return host_available_memory()


def host_memory_budget() -> int:
    """Bytes of decoded images this machine can hold: half its available memory."""
    return available_memory() // 2


def check_memory(nbytes: int, what: str, fix: str) -> None:
    """Refuse, before allocating, ``nbytes`` of images that the available memory cannot hold: the
    allocator's own failure is a traceback, and Linux may instead kill the process later.

    Raises:
        DataError: ``"{what} needs about N GB of memory ..."`` followed by ``fix``.
    """
    available = available_memory()
    if nbytes > available:
        raise DataError(
            f"{what} needs about {_gigabytes(nbytes)} of memory, and this machine has {_gigabytes(available)} available.",
            fix,
        )


def _gigabytes(nbytes: int) -> str:
    return f"{nbytes / 1e9:.3g} GB"


def _keep_encoded(cfg, count: int, first: str | bytes) -> bool:
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
            warnings.filterwarnings("ignore", message=_TV_CODEC_DEPRECATION, category=DeprecationWarning)
            blob = _read_bytes_or_none(first)
            per_image = _decode_bytes(blob, "the first image").numel() if blob else 0
    return count * per_image > host_memory_budget()


def load_eval_split(
    cfg, *, seed: int = 0, classes: Sequence[str] | None = None
) -> tuple[ImageTensors, list[str], SkippedFiles]:
    """The split ``finetune eval`` scores: the test set, without decoding the train set.

    Args:
        cfg: a recipe's ``data`` section. For ``imagefolder``, ``root`` may hold ``test/`` or
            ``val/``, or be itself a folder of class folders.
        seed: seeds synthetic data.
        classes: the model's class names. Folder labels are mapped onto them by name, so a test
            folder that lacks some classes still gets the model's label numbers.

    Returns:
        ``(split, classes, skipped)``: the images, the class names of their labels, and the
        image-folder entries that were not read.
    """
    # Without the model's class names, the run's own data.classes says which classes it learned
    # and in which order (training relabelled them 0..k-1 in that order).
    if classes is None and getattr(cfg, "classes", None):
        classes = list(cfg.classes)
    if cfg.name != "imagefolder":
        test, all_classes = _load_test_split(cfg, seed=seed)
        if classes is None or list(classes) == all_classes:
            return test, all_classes, SkippedFiles()
        # A model trained on some of the classes (data.classes): score it on those, its labels.
        test, _, kept = select_classes(test, test, all_classes, list(classes))
        return test, kept, SkippedFiles()
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise DataError(f"{root} is not a folder.", "Pass a folder of <class>/<image> folders, or one with test/ in it.")
    folder = next((root / sub for sub in ("test", "val") if (root / sub).is_dir()), root)
    skipped = SkippedFiles()
    files, labels, folder_classes = _list_imagefolder(folder, skipped)
    if getattr(cfg, "classes", None):
        # The run trained on some class folders only: leave the others out, as training did.
        keep = [i for i, label in enumerate(labels) if folder_classes[label] in cfg.classes]
        files, labels = [files[i] for i in keep], [labels[i] for i in keep]
    if classes is not None:
        index = {c: i for i, c in enumerate(classes)}
        unknown = sorted({folder_classes[label] for label in labels} - set(index))
        if unknown:
            raise DataError(
                f"{folder} has class folders the model does not know: {', '.join(unknown[:10])}.",
                f"The model's classes are: {', '.join(list(classes)[:20])}.",
            )
        labels = [index[folder_classes[label]] for label in labels]
        folder_classes = list(classes)
    if _keep_encoded(cfg, len(files), files[0]):
        return _encoded(files, labels, cfg.image_size), folder_classes, skipped
    return _decode_files(files, labels, cfg.image_size, skipped, cache_key=_folder_key(cfg, files, labels)), folder_classes, skipped


def _load_hf(cfg, only_test: bool = False):
    from .hf import load_hf

    return load_hf(cfg.path, image_column=cfg.image_column, label_column=cfg.label_column, only_test=only_test)


def _decode_hf(cfg, hf, split: str, skipped: SkippedFiles, stream: bool = False) -> Split:
    """Decode one split of a Hugging Face dataset (through the decode cache, by its fingerprint),
    or keep it encoded for streaming."""
    encoded = getattr(hf, split)
    if stream:
        return EncodedImages(encoded.items, torch.tensor(encoded.labels, dtype=torch.int64), encoded.names, cfg.image_size)
    key = (decode_cache.dataset_key(hf.fingerprint, split, cfg.image_size, hf.image_column)
           if getattr(cfg, "cache", False) else None)
    return _decode_files(encoded.items, encoded.labels, cfg.image_size, skipped, names=encoded.names, cache_key=key)


def _load_test_split(cfg, *, seed: int) -> tuple[ImageTensors, list[str]]:
    """The test split of CIFAR, Hugging Face or synthetic data, without decoding, generating or
    resizing the train split."""
    if cfg.name in _CIFAR_CLASSES:
        (test,), classes = _load_cifar(cfg.name, Path(cfg.root).expanduser(), download=cfg.download, splits=("test",))
    elif cfg.name == "hf":
        hf = _load_hf(cfg, only_test=True)
        stream = _keep_encoded(cfg, len(hf.test.items), hf.test.items[0])
        test, classes = _decode_hf(cfg, hf, "test", SkippedFiles(), stream), hf.classes
    elif cfg.name == "synthetic":
        # The test images come from their own stream, so no train images need to be made.
        _, test, classes = _make_synthetic(
            num_train=0, num_test=cfg.synthetic_test, num_classes=cfg.synthetic_classes,
            size=cfg.synthetic_size, seed=seed,
        )
    else:
        raise _unknown_dataset(cfg.name)
    if cfg.image_size is not None and isinstance(test, ImageTensors):
        test = _resize_split(test, cfg.image_size)
    return test, classes


def _unknown_dataset(name: str) -> DataError:
    return DataError(
        f"data.name is {name!r}, which is not a dataset finetune knows.",
        "Use one of cifar10, cifar100, imagefolder, hf or synthetic.",
    )


_MACOS_FOLDER = "__MACOSX"  # what macOS's Archive Utility adds to a zip: AppleDouble copies of each file
_MACOS_METADATA = "macOS metadata (__MACOSX, ._*)"

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
"""File extensions read as images (any case); torchvision decodes JPEG, PNG, GIF and WebP, Pillow the rest."""


def _list_imagefolder(
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
    classes: list[str] = []
    roots: list[Path] = []
    visited: set[tuple[int, int]] = {_identity(folder)}
    here, others = folder.resolve(), [p.resolve() for p in exclude]

    def outside(path: Path) -> bool:
        """A folder that holds this tree, or lies in another split's."""
        real = path.resolve()
        return here.is_relative_to(real) and real != here or any(real.is_relative_to(o) for o in others)

    for entry in _entries(folder, skipped):
        path = folder / entry
        if entry == _MACOS_FOLDER or entry.startswith("._"):
            skipped.add(_MACOS_METADATA, path)
        elif entry.startswith("."):
            skipped.add("hidden entry", path)
        elif not path.is_dir():
            skipped.add("file outside the class folders", path)
        elif outside(path):
            skipped.add("link to a folder holding the dataset or its other split", path)
        elif _identity(path) in visited:
            skipped.add("link to a folder already read", path)
        else:
            visited.add(_identity(path))
            classes.append(entry)
            roots.append(path)
    if not classes:
        raise DataError(
            f"{folder} has no class folders.", f"Put each class's images in its own folder: {folder}/<class>/<image>.jpg."
        )
    seen: set[tuple[int, int]] = set()
    samples: list[tuple[str, int]] = []
    for label, root in enumerate(roots):
        found: list[str] = []
        stack = [(root, _identity(root)[0])]
        while stack:
            current, device = stack.pop()
            for entry in _scan(current, skipped):
                if entry.name == _MACOS_FOLDER or entry.name.startswith("._"):
                    skipped.add(_MACOS_METADATA, entry.path)
                    continue
                if entry.name.startswith("."):
                    skipped.add("hidden entry", entry.path)
                    continue
                if entry.is_symlink():
                    try:
                        info = os.stat(entry.path)
                    except OSError:
                        skipped.add("broken link or unreadable entry", entry.path)
                        continue
                    key, is_dir, is_file = (info.st_dev, info.st_ino), stat.S_ISDIR(info.st_mode), stat.S_ISREG(info.st_mode)
                else:  # the listing already says what a plain entry is: no stat call per file
                    key = (device, entry.inode())
                    is_dir, is_file = entry.is_dir(follow_symlinks=False), entry.is_file(follow_symlinks=False)
                if is_dir:
                    if entry.is_symlink() and outside(Path(entry.path)):
                        skipped.add("link to a folder holding the dataset or its other split", entry.path)
                    elif key in visited:
                        skipped.add("link to a folder already read", entry.path)
                    else:
                        visited.add(key)
                        stack.append((Path(entry.path), key[0]))
                elif not is_file:
                    skipped.add("not a regular file", entry.path)
                elif (suffix := os.path.splitext(entry.name)[1].lower()) not in IMAGE_EXTENSIONS:
                    skipped.add(f"not an image file ({suffix or 'no extension'})", entry.path)
                elif entry.is_symlink() and any(Path(entry.path).resolve().is_relative_to(o) for o in others):
                    skipped.add("link to a file in the dataset's other split", entry.path)
                elif key in seen:
                    skipped.add("the same file reached twice through links", entry.path)
                else:
                    seen.add(key)
                    found.append(entry.path)
        # Folder by folder, each folder's files by name: the order torchvision's ImageFolder gives.
        samples += [(path, label) for path in sorted(found, key=lambda f: (os.path.dirname(f), os.path.basename(f)))]
    if not samples:
        raise DataError(f"{folder} holds no image files.", f"Add images as {folder}/<class>/<image>.jpg.")
    return [path for path, _ in samples], [label for _, label in samples], classes


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


def _decode_files(
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
    (``finetune.decode_cache``).

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


def _folder_key(cfg, files: list[str], labels: list[int]) -> str | None:
    """The decode-cache key of image files, or ``None`` when the recipe turns the cache off."""
    return decode_cache.files_key(files, labels, cfg.image_size) if getattr(cfg, "cache", False) else None


def _decode_all(
    files: Sequence[str | bytes], image_size: int | None, names: Sequence[str]
) -> tuple[torch.Tensor, list[int]]:
    """:func:`_decode_files`' work: ``(images, increasing indices of the inputs they come from)``.

    Raises:
        DataError: images of different sizes without ``image_size``, no readable image, or more
            images than memory can hold.
    """
    chunks = [files[i : i + _DECODE_CHUNK] for i in range(0, len(files), _DECODE_CHUNK)]
    threads = min(len(chunks), os.cpu_count() or 1, 16)
    out: torch.Tensor | None = None
    kept: list[int] = []  # indices into files of the images in out, in order
    with warnings.catch_warnings(), ThreadPoolExecutor(threads) as pool:
        warnings.filterwarnings("ignore", message=_TV_CODEC_DEPRECATION, category=DeprecationWarning)
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
    blobs = [_read_bytes_or_none(path) for path in files]
    images: list[torch.Tensor | None] = [None] * len(files)
    jpegs = [i for i, blob in enumerate(blobs) if blob is not None and blob.startswith(_JPEG_MAGIC)]
    if jpegs:
        try:
            # One call for the chunk's JPEGs: per-call overhead dominates for small (CIFAR) images.
            decoded = torchvision.io.decode_jpeg([_as_tensor(blobs[i]) for i in jpegs], mode=ImageReadMode.RGB)
            for i, image in zip(jpegs, decoded):
                images[i] = orient(image, exif_orientation(blobs[i]))
        except RuntimeError:
            pass  # a corrupt JPEG: decode one by one below to find out which
    for i, path in enumerate(files):
        image = images[i]
        if image is None and blobs[i] is not None:
            try:
                image = _decode_bytes(blobs[i], "an image")
            except DataError:
                image = None
        images[i] = resize_center_crop(image, (image_size, image_size)) if image is not None and image_size else image
    return images


def decode_on_device(blobs: Sequence[bytes | None], names: Sequence[str], device: torch.device) -> list[torch.Tensor]:
    """Decode encoded images to ``uint8 (3, H, W)`` tensors on ``device``: the JPEGs in one batched
    ``torchvision.io.decode_jpeg`` call on that device (nvJPEG on a GPU, which ignores EXIF: the
    orientation is read from the bytes on the CPU and applied on the device after decoding), the
    other formats (and JPEGs it cannot read) on the CPU, then moved.

    Raises:
        DataError: an image that cannot be read, named.
    """
    images: list[torch.Tensor | None] = [None] * len(blobs)
    jpegs = [i for i, blob in enumerate(blobs) if blob is not None and blob.startswith(_JPEG_MAGIC)]
    if jpegs:
        try:
            decoded = torchvision.io.decode_jpeg([_as_tensor(blobs[i]) for i in jpegs], mode=ImageReadMode.RGB,
                                                 device=device)
            for i, image in zip(jpegs, decoded):
                images[i] = orient(image, exif_orientation(blobs[i]))
        except RuntimeError:
            pass  # one bad JPEG fails the call: decode them one by one below
    for i, image in enumerate(images):
        if image is None:
            try:
                images[i] = _decode_bytes(blobs[i] or b"", names[i]).to(device)
            except DataError:
                raise DataError(
                    f"{printable(names[i])} cannot be read as an image (found while streaming the data).",
                    "Remove or replace it; or set data.in_memory=true, which leaves unreadable images out.",
                ) from None
    return images


def _read_bytes_or_none(item: str | bytes) -> bytes | None:
    """An image's encoded bytes: given, or read from its file (``None`` when it cannot be read)."""
    if isinstance(item, bytes):
        return item
    try:
        return _read_bytes(item)
    except DataError:
        return None


def _read_bytes(path: str | Path) -> bytes:
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


def _decode_bytes(blob: bytes, path: str | Path) -> torch.Tensor:
    """Decode one encoded image to ``uint8 (3, H, W)`` RGB, upright (EXIF orientation applied):
    torchvision first, then Pillow."""
    if blob:
        try:
            image = torchvision.io.decode_image(_as_tensor(blob), mode=ImageReadMode.RGB)
            if image.ndim == 4:  # an animated GIF: (frames, 3, H, W); its first frame is the picture
                image = image[0]
            # 16-bit PNGs decode to uint16: rescale to 0-255 rather than truncate.
            image = image if image.dtype == torch.uint8 else TF.to_dtype(image, torch.uint8, scale=True)
            # Not torchvision's apply_exif_orientation: it skips WebP, and its GPU decoder skips EXIF.
            return orient(image, exif_orientation(blob))
        except RuntimeError:
            pass  # not JPEG/PNG/GIF/WEBP (e.g. BMP, TIFF) or corrupt: Pillow knows more formats
    try:
        with Image.open(io.BytesIO(blob)) as pil:
            rgb = ImageOps.exif_transpose(pil).convert("RGB")
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


# ---- synthetic -----------------------------------------------------------------------------------


def _make_synthetic(
    *, num_train: int, num_test: int, num_classes: int, size: int, seed: int
) -> tuple[ImageTensors, ImageTensors, list[str]]:
    """Seeded random images whose class is visible: a disc of the class's colour at the class's place.

    Each class has a colour and a disc centre; an image is grey noise with that disc (jittered,
    noisy) painted on it. A tiny model's loss falls within a few steps, which is what smoke tests
    and ``finetune`` dry runs need; nothing here resembles natural images.

    Raises:
        DataError: the images, with the float work space of one chunk, would not fit in memory.
    """
    pixels = 3 * size * size
    # uint8 images, plus about six float32 (chunk, 3, size, size) intermediates for one chunk.
    check_memory(
        (num_train + num_test) * pixels + min(num_train + num_test, _RESIZE_CHUNK) * pixels * 4 * 6,
        f"The synthetic dataset (data.synthetic_train={num_train} and data.synthetic_test={num_test} images of "
        f"{size}x{size})",
        f"Lower data.synthetic_train, data.synthetic_test or data.synthetic_size: about "
        f"{max(1, available_memory() // (2 * pixels)):,} images of {size}x{size} fill half the available memory.",
    )
    gen = torch.Generator().manual_seed(seed)
    colours = torch.rand(num_classes, 3, generator=gen) * 195 + 30  # (K, 3) in [30, 225]
    centres = torch.rand(num_classes, 2, generator=gen) * size * 0.5 + size * 0.25  # (K, 2), inner half
    # Separate streams for train and test: the test images do not depend on num_train.
    train = _synthetic_images(num_train, colours, centres, size, torch.Generator().manual_seed(seed * 2 + 1))
    test = _synthetic_images(num_test, colours, centres, size, torch.Generator().manual_seed(seed * 2 + 2))
    return train, test, [f"class_{k}" for k in range(num_classes)]


def _synthetic_images(
    n: int, colours: torch.Tensor, centres: torch.Tensor, size: int, gen: torch.Generator
) -> ImageTensors:
    num_classes = colours.shape[0]
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=gen)]  # balanced classes
    out = torch.empty((n, 3, size, size), dtype=torch.uint8)
    coords = torch.arange(size, dtype=torch.float32)
    radius = max(size / 5, 1.0)
    for start in range(0, n, _RESIZE_CHUNK):
        y = labels[start : start + _RESIZE_CHUNK]
        b = y.shape[0]
        centre = centres[y] + (torch.rand(b, 2, generator=gen) - 0.5) * size / 8  # (b, 2) jittered
        dist2 = (coords[None, :, None] - centre[:, 0, None, None]) ** 2 + (
            coords[None, None, :] - centre[:, 1, None, None]
        ) ** 2  # (b, size, size)
        disc = (dist2 <= radius**2)[:, None]  # (b, 1, size, size)
        background = torch.randn(b, 3, size, size, generator=gen) * 40 + 128
        images = torch.where(disc, colours[y][:, :, None, None], background)
        images = images + torch.randn(b, 3, size, size, generator=gen) * 12
        out[start : start + b] = images.round().clamp(0, 255).to(torch.uint8)
    return ImageTensors(out, labels)


# --------------------------------------------------------------------------------------------------
# Single images (predict)
# --------------------------------------------------------------------------------------------------


def read_image(path: str | Path) -> torch.Tensor:
    """Read an image file as ``uint8 (3, H, W)`` RGB, honouring EXIF orientation.

    Raises:
        DataError: the file does not exist or is not an image.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_TV_CODEC_DEPRECATION, category=DeprecationWarning)
        return _decode_bytes(_read_bytes(path), path)


def resize_center_crop(images: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
    """Scale images to cover ``out_size``, then cut the centre (torchvision's eval transform).

    Args:
        images: ``(3, H, W)`` or ``(B, 3, H, W)``, uint8 or float.
        out_size: ``(H', W')``.

    Returns:
        ``(3, H', W')`` or ``(B, 3, H', W')`` of the input's dtype; antialiased when shrinking.
    """
    out_h, out_w = out_size
    height, width = images.shape[-2:]
    if (height, width) == (out_h, out_w):
        return images
    scale = max(out_h / height, out_w / width)  # for a square output: shorter side -> out size
    new_size = [max(out_h, round(height * scale)), max(out_w, round(width * scale))]
    resized = TF.resize(images, new_size, interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    return TF.center_crop(resized, [out_h, out_w])


def preprocess_images(
    images: Sequence[torch.Tensor],
    out_size: int | tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """Turn decoded photos of any size into one normalised model input.

    Args:
        images: ``uint8 (3, H, W)`` images; sizes may differ.
        out_size: model input size ``(H', W')`` (or one int for square).
        mean: per-channel mean of ``x / 255``.
        std: per-channel std of ``x / 255``.

    Returns:
        ``float32 (B, 3, H', W')``: ``(x / 255 - mean) / std`` after resize and centre crop.
    """
    size = (out_size, out_size) if isinstance(out_size, int) else tuple(out_size)
    batch = torch.stack([resize_center_crop(image, size) for image in images])
    return _normalize(batch, mean, std)


def normalisation(
    pretrained_cfg: dict, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean and std a model's inputs are normalised with: the given ones (a recipe's
    ``data.mean``/``data.std``), else the model's ``pretrained_cfg`` (ImageNet's for DeiT), else 0.5."""
    return (
        tuple(mean or pretrained_cfg.get("mean") or (0.5, 0.5, 0.5)),
        tuple(std or pretrained_cfg.get("std") or (0.5, 0.5, 0.5)),
    )


def _normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``uint8 (B, 3, H, W)`` -> ``float32 (x / 255 - mean) / std``."""
    mean_t = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255 - mean_t) / std_t


# --------------------------------------------------------------------------------------------------
# Batch augmentation (whole batches, on the device)
# --------------------------------------------------------------------------------------------------


def _draw_rows(images: torch.Tensor, rows: tuple[int, int] | None) -> tuple[int, slice]:
    """How many images to draw random numbers for, and which of them are these ``images``.

    ``rows = (offset, total)``: ``images`` are rows ``offset .. offset + B`` of a batch of ``total``
    split across processes. Drawing for the whole batch and keeping one's own rows gives every
    image the same random numbers whatever the number of processes.
    """
    batch = images.shape[0]
    offset, total = rows if rows is not None else (0, batch)
    return total, slice(offset, offset + batch)


def random_crop(
    images: torch.Tensor, padding: int, generator: torch.Generator, rows: tuple[int, int] | None = None
) -> torch.Tensor:
    """Pad with zeros by ``padding`` and cut a random window of the original size, per image.

    Equivalent to torchvision's ``RandomCrop(size, padding)`` applied to each image: every image is
    shifted by its own ``(dy, dx)`` in ``[-padding, padding]`` with zeros filling the gap.

    Args:
        images: ``(B, C, H, W)`` of any dtype.
        padding: largest shift in pixels.
        generator: on ``images.device``.
        rows: ``(offset, total)`` when ``images`` are one process's rows of a larger batch.

    Returns:
        ``(B, C, H, W)``, same dtype.
    """
    batch, _, height, width = images.shape
    device = images.device
    total, mine = _draw_rows(images, rows)
    shifts = torch.randint(0, 2 * padding + 1, (2, total), device=device, generator=generator)[:, mine]  # offsets
    padded = F.pad(images, (padding, padding, padding, padding))  # (B, C, H + 2p, W + 2p), zeros
    rows = shifts[0, :, None] + torch.arange(height, device=device)  # (B, H) rows of the padded image
    cols = shifts[1, :, None] + torch.arange(width, device=device)  # (B, W)
    b = torch.arange(batch, device=device)[:, None, None]
    # Gather in (B, H, W, C) so one advanced index picks every image's own window, no loop over images.
    windows = padded.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return windows.permute(0, 3, 1, 2)


def random_hflip(
    images: torch.Tensor, generator: torch.Generator, rows: tuple[int, int] | None = None
) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2. ``(B, C, H, W)`` -> same. ``rows`` as in
    :func:`random_crop`."""
    total, mine = _draw_rows(images, rows)
    flip = torch.rand(total, device=images.device, generator=generator)[mine] < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def random_resized_crop(
    images: torch.Tensor,
    out_size: tuple[int, int],
    scale: tuple[float, float],
    generator: torch.Generator,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    rows: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Cut a random box from each image and resample it straight to ``out_size``.

    Like torchvision's ``RandomResizedCrop``: box area is uniform in ``scale`` (fraction of the
    image), aspect ratio log-uniform in ``ratio``; box sides are clipped to the image, so extreme
    draws come out slightly squarer. One ``affine_grid`` + ``grid_sample`` does every image at once.

    Args:
        images: float ``(B, C, H, W)``.
        out_size: ``(H', W')``.
        scale: ``(low, high)`` area fractions.
        generator: on ``images.device``.
        ratio: ``(low, high)`` width / height.
        rows: ``(offset, total)`` as in :func:`random_crop`.

    Returns:
        float ``(B, C, H', W')``.
    """
    batch, channels = images.shape[:2]
    device = images.device
    total, mine = _draw_rows(images, rows)
    box_w, box_h, centre_x, centre_y = crop_boxes(torch.rand(4, total, device=device, generator=generator)[:, mine], scale, ratio)
    theta = torch.zeros(batch, 2, 3, device=device)
    theta[:, 0, 0] = box_w
    theta[:, 1, 1] = box_h
    theta[:, 0, 2] = centre_x
    theta[:, 1, 2] = centre_y
    grid = F.affine_grid(theta, [batch, channels, *out_size], align_corners=False)  # (B, H', W', 2)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def crop_boxes(
    rand: torch.Tensor, scale: tuple[float, float], ratio: tuple[float, float] = (3 / 4, 4 / 3)
) -> torch.Tensor:
    """Random-resized-crop boxes from uniform draws ``rand (4, B)``: ``(4, B)`` rows of half-width,
    half-height, centre x and centre y in normalised coordinates, where an image spans [-1, 1].

    Area is uniform in ``scale`` (a fraction of the image) and width/height log-uniform in
    ``ratio``; sides are clipped to the image and the centre keeps the box inside it.
    """
    area = scale[0] + (scale[1] - scale[0]) * rand[0]
    log_ratio = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * rand[1]
    box_w = torch.sqrt(area * torch.exp(log_ratio)).clamp(max=1.0)
    box_h = torch.sqrt(area / torch.exp(log_ratio)).clamp(max=1.0)
    return torch.stack([box_w, box_h, (2 * rand[2] - 1) * (1 - box_w), (2 * rand[3] - 1) * (1 - box_h)])


def boxes_in_pixels(boxes: torch.Tensor, images: Sequence[torch.Tensor]) -> list[tuple[int, int, int, int]]:
    """:func:`crop_boxes` as ``(top, left, height, width)`` in each image's own pixels."""
    out = []
    for (box_w, box_h, cx, cy), image in zip(boxes.t().tolist(), images):
        height, width = image.shape[-2:]
        crop_h, crop_w = max(1, round(box_h * height)), max(1, round(box_w * width))
        top = min(height - crop_h, max(0, round((cy + 1) / 2 * height - crop_h / 2)))
        left = min(width - crop_w, max(0, round((cx + 1) / 2 * width - crop_w / 2)))
        out.append((top, left, crop_h, crop_w))
    return out


# --------------------------------------------------------------------------------------------------
# Batch loader
# --------------------------------------------------------------------------------------------------


SHUFFLE_STREAM, AUGMENT_STREAM = 0, 1
"""Random streams of a training epoch: the order of the images, and their augmentation."""


def stream_seed(seed: int, epoch: int, stream: int) -> int:
    """A 63-bit seed for one random stream of one epoch of one run.

    NumPy's ``SeedSequence`` hashes the three numbers together, so every ``(seed, epoch, stream)``
    gets its own, unrelated seed: the shuffle and the augmentation of an epoch do not share one,
    and seed ``s`` at epoch ``e + 1`` does not replay seed ``s + 1`` at epoch ``e`` (as ``seed +
    epoch`` would).
    """
    entropy = [seed & (2**64 - 1), epoch & (2**64 - 1), stream]  # SeedSequence takes non-negative ints
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 1)


class BatchLoader:
    """Batches of one split, normalised on the device, with augmentation on whole batches.

    ``in_memory=True`` moves the uint8 images to the device once (CIFAR-10's 50,000 train images are
    150 MB); each batch is then an index into them, with no host work and no host syncs. With
    ``in_memory=False`` the images stay on the CPU and each batch is gathered into pinned memory and
    copied with ``non_blocking``. Training batches are slices of a ``randperm`` drawn from the
    epoch's shuffle stream, and batch ``i`` is augmented from the epoch's augmentation stream
    re-seeded for ``i`` (see :func:`stream_seed`): call :meth:`set_epoch` before each epoch, as with
    ``DistributedSampler``. The same epoch gives the same batches and augmentations, and
    :meth:`iter_from` starts an epoch part-way through with exactly the batches the rest of it
    would have had, which is what resuming a run mid-epoch needs.

    Per batch, on the device: pad-and-crop (``augment.crop_padding``) or random resized crop
    (``augment.random_resized_crop``, which replaces it), horizontal flip (``augment.hflip``), then
    ``(x / 255 - mean) / std`` and a bilinear resize to ``out_size`` when the stored size differs,
    then ``channels_last`` and ``dtype``. Evaluation batches are not augmented or shuffled and keep
    the last partial batch.
    """

    def __init__(
        self,
        data: ImageTensors,
        *,
        batch_size: int,
        train: bool,
        device: torch.device,
        out_size: tuple[int, int],
        mean: Sequence[float],
        std: Sequence[float],
        augment=None,
        channels_last: bool = False,
        drop_last: bool | None = None,
        in_memory: bool = True,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        rank: int = 0,
        world_size: int = 1,
        workers: int = 4,
    ):
        """Stage one split for batching.

        Args:
            data: the split; uint8 ``(N, 3, H, W)`` images and int64 labels.
            batch_size: images per batch.
            train: shuffle and augment (and by default drop the last partial batch).
            device: where batches are produced.
            out_size: ``(H', W')`` of the batches the model sees.
            mean: per-channel mean of ``x / 255``.
            std: per-channel std of ``x / 255``.
            augment: the recipe's ``data.augment`` (``hflip``, ``crop_padding``,
                ``random_resized_crop``, ``rrc_scale``); ``None``: no augmentation. Ignored when
                ``train`` is false.
            channels_last: return batches in channels-last memory format.
            drop_last: drop a final partial batch; ``None``: drop when training, keep otherwise.
            in_memory: keep the images on ``device`` (``False``: on the CPU, copied per batch).
            seed: the run's seed; with the epoch it seeds shuffling and augmentation.
            dtype: floating dtype of the batches.
            rank: this process's place among ``world_size`` training processes.
            world_size: processes sharing each training batch. ``batch_size`` is the global batch:
                every process draws the same shuffle and takes its own ``batch_size / world_size``
                images of each batch, augmented exactly as one process would augment them. An
                evaluation loader is given each process's own part of the split instead.
            workers: threads decoding the images of a streamed split (:class:`EncodedImages`).

        Raises:
            DataError: a training split smaller than one batch when the last partial one is dropped.
        """
        device = torch.device(device)
        assert batch_size >= 1, f"batch_size must be >= 1, got {batch_size}"
        assert dtype.is_floating_point, f"dtype must be a floating type, got {dtype}"
        self.streaming = isinstance(data, EncodedImages)
        if not self.streaming:
            assert data.images.dtype == torch.uint8 and data.images.dim() == 4, "images must be uint8 (N, 3, H, W)"
        if train:
            check_global_batch(batch_size, world_size)
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.train = train
        self.device = device
        self.out_size = (int(out_size[0]), int(out_size[1]))
        self.augment = augment if train else None
        self.channels_last = channels_last
        self.drop_last = train if drop_last is None else drop_last
        self.in_memory = in_memory
        self.seed = seed
        self.dtype = dtype
        self.epoch = 0
        self.num_images = len(data)
        if self.drop_last and self.num_images < batch_size:
            raise DataError(
                f"The {'training' if train else 'evaluation'} split has {self.num_images} images, fewer "
                f"than one batch of {batch_size}, so an epoch would have no batches.",
                "Lower data.batch_size or use more images (data.train_subset, data.synthetic_train).",
            )

        # Where the index permutation lives: beside the images, so indexing never crosses devices.
        self._index_device = device if in_memory and not self.streaming else torch.device("cpu")
        if self.streaming:
            self._encoded = data
            size = data.image_size
            self._stored_size = (size, size) if size else self.out_size  # decoded images are resized to this
            self._workers = workers
        else:
            self._images = data.images.to(self._index_device)
        self._labels = data.labels.to(self._index_device)
        self._pin = (not in_memory or self.streaming) and device.type == "cuda"
        self.mean, self.std = tuple(mean), tuple(std)
        self._mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)

    def __len__(self) -> int:
        """Batches per epoch."""
        if self.drop_last:
            return self.num_images // self.batch_size
        return math.ceil(self.num_images / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose shuffle and augmentation the next iteration uses."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(x, y)``: ``x`` ``(B, 3, *out_size)`` of ``dtype``, ``y`` int64 ``(B,)``, on the device."""
        return self.iter_from(0)

    def iter_from(self, start_batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Like iterating, but skip the epoch's first ``start_batch`` batches without making them."""
        order = None
        aug_gen = None
        if self.train:
            shuffle_seed = stream_seed(self.seed, self.epoch, SHUFFLE_STREAM)
            index_gen = torch.Generator(device=self._index_device).manual_seed(shuffle_seed)
            order = torch.randperm(self.num_images, device=self._index_device, generator=index_gen)
            aug_gen = torch.Generator(device=self.device)
            aug_seed = stream_seed(self.seed, self.epoch, AUGMENT_STREAM)
        local = self.batch_size // self.world_size if self.train else self.batch_size
        rows = (self.rank * local, self.batch_size) if self.train else None  # this process's part of a batch

        def positions(i: int) -> torch.Tensor | slice:
            start, stop = i * self.batch_size, min((i + 1) * self.batch_size, self.num_images)
            return slice(start, stop) if order is None else order[start + rows[0] : start + rows[0] + local]

        if self.streaming:
            yield from self._stream(start_batch, positions, rows, aug_gen, aug_seed if self.train else 0)
            return
        for i in range(start_batch, len(self)):
            idx = positions(i)
            if order is None:
                images, labels = self._images[idx], self._labels[idx]  # views, no copy
            else:
                images, labels = self._images.index_select(0, idx), self._labels.index_select(0, idx)
                # Re-seeded per batch, so batch i's augmentation does not depend on where iteration
                # started; setting a seed is host-side bookkeeping, with no device sync.
                aug_gen.manual_seed((aug_seed + i) % 2**63)
            if not self.in_memory:
                images, labels = self._to_device(images), self._to_device(labels)
            yield self._prepare(images, aug_gen, rows), labels

    def _stream(self, start_batch, positions, rows, aug_gen, aug_seed) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of a streamed split: a background thread decodes the next batch (in
        ``workers`` threads) while this one trains, so only about two batches are ever decoded."""
        rrc = self.augment is not None and self.augment.random_resized_crop
        with ThreadPoolExecutor(1) as loader, ThreadPoolExecutor(self._workers) as decoders, \
                warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_TV_CODEC_DEPRECATION, category=DeprecationWarning)

            def load(i: int):
                idx = positions(i)
                labels = self._labels[idx]
                where = range(self.num_images)[idx] if isinstance(idx, slice) else idx.tolist()
                return self._decode_batch(list(where), decoders, i, aug_seed, rows if rrc else None), labels

            pending = loader.submit(load, start_batch) if start_batch < len(self) else None
            for i in range(start_batch, len(self)):
                images, labels = pending.result()
                pending = loader.submit(load, i + 1) if i + 1 < len(self) else None
                images, labels = self._to_device(images), self._to_device(labels)
                if rrc:  # cropped, resized and flipped while decoding: only normalise here
                    yield self._prepare(images, None, rows, augment=False), labels
                    continue
                if self.train:
                    aug_gen.manual_seed((aug_seed + i) % 2**63)
                yield self._prepare(images, aug_gen, rows), labels

    def _decode_batch(
        self, where: list[int], decoders: ThreadPoolExecutor, batch: int, aug_seed: int, rrc_rows: tuple[int, int] | None
    ) -> torch.Tensor:
        """Decode one batch of a streamed split into ``uint8 (B, 3, H, W)`` on the CPU.

        Each image is resized to the stored size (``image_size``, else the model's), or, for a
        random resized crop (``rrc_rows`` given), cut from the full decoded image and resized
        straight to the model's size, then flipped: as timm's training transforms, large photos
        are never squashed to one size first. The random numbers are drawn for the whole batch in
        the order :meth:`_prepare` draws them, from the batch's own seed.
        """
        encoded = self._encoded

        def decode(j: int) -> torch.Tensor:
            blob = _read_bytes_or_none(encoded.items[j])
            try:
                return _decode_bytes(blob if blob is not None else b"", encoded.names[j])
            except DataError:
                raise DataError(
                    f"{printable(encoded.names[j])} cannot be read as an image (found while streaming the data).",
                    "Remove or replace it; or set data.in_memory=true, which leaves unreadable images out.",
                ) from None

        if self.device.type == "cuda":  # JPEGs decoded on the GPU, in one call for the batch
            images = decode_on_device([_read_bytes_or_none(encoded.items[j]) for j in where],
                                      [encoded.names[j] for j in where], self.device)
        else:
            images = list(decoders.map(decode, where))
        if rrc_rows is None:
            return torch.stack([resize_center_crop(image, self._stored_size) for image in images])
        gen = torch.Generator().manual_seed((aug_seed + batch) % 2**63)
        total, mine = rrc_rows[1], slice(rrc_rows[0], rrc_rows[0] + len(images))
        flips = torch.rand(total, generator=gen)[mine] < 0.5 if self.augment.hflip else torch.zeros(len(images), dtype=torch.bool)
        boxes = crop_boxes(torch.rand(4, total, generator=gen)[:, mine], tuple(self.augment.rrc_scale))
        out = torch.empty((len(images), 3, *self.out_size), dtype=torch.uint8, device=images[0].device)
        for k, (image, (top, left, height, width)) in enumerate(zip(images, boxes_in_pixels(boxes, images))):
            crop = TF.resized_crop(image, top, left, height, width, list(self.out_size), antialias=True)
            out[k] = crop.flip(-1) if flips[k] else crop
        return out

    def _to_device(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.device == self.device:  # decoded on the GPU already
            return batch
        if self._pin:
            # A fresh pinned buffer per batch: the caching host allocator will not reuse it until
            # the asynchronous copy from it has finished.
            pinned = torch.empty(batch.shape, dtype=batch.dtype, pin_memory=True)
            pinned.copy_(batch)
            return pinned.to(self.device, non_blocking=True)
        return batch.to(self.device)

    def _prepare(
        self, images: torch.Tensor, gen: torch.Generator | None, rows: tuple[int, int] | None = None,
        *, augment: bool = True,
    ) -> torch.Tensor:
        """uint8 ``(B, 3, H, W)`` -> augmented, normalised, resized ``(B, 3, *out_size)``."""
        aug = self.augment if augment else None
        rrc = aug is not None and aug.random_resized_crop
        if aug is not None and not rrc and aug.crop_padding > 0:
            images = random_crop(images, aug.crop_padding, gen, rows)  # still uint8: a quarter of the bytes
        if aug is not None and aug.hflip:
            images = random_hflip(images, gen, rows)
        # Normalising before resizing is exact (bilinear weights sum to 1, so they commute with a
        # per-channel affine map) and touches 49x fewer values for 32 -> 224.
        x = (images.float() / 255 - self._mean) / self._std
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        # Change layout at the stored size, before any resize: the resized batch then comes out in
        # the right layout instead of being copied again at 224 px.
        x = x.contiguous(memory_format=memory_format)
        if rrc:
            x = random_resized_crop(x, self.out_size, tuple(aug.rrc_scale), gen, rows=rows)
        elif tuple(x.shape[-2:]) != self.out_size:
            # On the device: upsampling CIFAR to 224 px here is the reason the data is kept small.
            # Antialiasing only matters (and only costs) when shrinking.
            shrink = x.shape[-2] > self.out_size[0] or x.shape[-1] > self.out_size[1]
            x = F.interpolate(x, size=self.out_size, mode="bilinear", align_corners=False, antialias=shrink)
        return x.to(dtype=self.dtype, memory_format=memory_format)
