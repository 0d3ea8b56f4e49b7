"""A dataset's splits in memory, and what is done to whole splits: the decoded (:class:`ImageTensors`)
and encoded (:class:`EncodedImages`) forms of a split, the entries left out of it
(:class:`SkippedFiles`), choosing classes, a training subset and a validation set, sharding a split
across processes, and resizing a decoded split to the recipe's ``data.image_size``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import DataError
from .memory import check_memory
from .preprocess import resize_center_crop

_RESIZE_CHUNK = 1024  # images resized at once when a whole split is resized in memory


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

    @property
    def path(self) -> str:
        """How the training images reach the loader: ``"in_memory"`` (decoded once) or
        ``"streamed"`` (decoded per batch from the files or bytes)."""
        return "streamed" if isinstance(self.train, EncodedImages) else "in_memory"

    @property
    def stored_size(self) -> tuple[int, int] | None:
        """``(H, W)`` the training images are kept at before the loader resizes them to the
        model's input: the decoded size, or a streamed split's ``image_size``; ``None`` when
        streamed images keep their own sizes."""
        if isinstance(self.train, ImageTensors):
            return tuple(self.train.images.shape[-2:])
        size = self.train.image_size
        return (size, size) if size else None


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
    if n_val >= n:
        raise DataError(
            f"data.val_split={val_split!r} holds out {n_val:,} images, but the train set has only {n:,}, so no "
            "image would be left to train on.",
            f"Hold out fewer than {n:,} images (e.g. data.val_split={max(1, n // 10)} or a fraction such as 0.1).",
        )
    n_train = n - n_val if train_subset is None else _count_images(train_subset, n, field="data.train_subset")
    if n_train < 1:
        raise DataError(f"data.train_subset={train_subset!r} leaves no image to train on.",
                        "Ask for at least one image (a whole number, or a fraction of the train set above 0).")
    if n_train > n:
        raise DataError(
            f"data.train_subset={train_subset!r} asks for {n_train:,} images, but the train set has only {n:,}.",
            f"Use at most {n - n_val:,} images{' (the rest are held out by data.val_split)' if n_val else ''}, "
            "or a fraction such as 0.5.",
        )
    if n_train + n_val > n:
        raise DataError(
            f"The train set has {n:,} images, too few for data.train_subset={train_subset!r} "
            f"({n_train:,} images) plus data.val_split={val_split!r} ({n_val:,} images).",
            f"Lower data.train_subset (to at most {n - n_val:,}) or data.val_split so that together they fit "
            "in the train set.",
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


def resize_split(split: ImageTensors, size: int) -> ImageTensors:
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


def encoded_files(files: Sequence[str], labels: Sequence[int], image_size: int | None) -> EncodedImages:
    return EncodedImages(list(files), torch.tensor(list(labels), dtype=torch.int64), list(files), image_size)
