"""Loading a recipe's dataset: :func:`load_splits` for training (train, val and test), and
:func:`load_eval_split` for ``finetune eval`` (the test set alone), by dispatching to the source
named by ``data.name`` (one module per source: :mod:`.cifar`, :mod:`.imagefolder`, :mod:`.hf`,
:mod:`.synthetic`).

The design follows airbench: a dataset is decoded once into one ``uint8 (N, 3, H, W)`` tensor, the
tensor moves to the device once, and each batch is a slice of a device ``randperm`` (see
:mod:`.loader`). A dataset too large for memory is kept encoded and streamed instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import DataError
from . import cache as decode_cache
from .cifar import CIFAR_CLASSES, load_cifar
from .decode import decode_files, keep_encoded
from .imagefolder import list_imagefolder, load_imagefolder, folder_key
from .splits import (
    DatasetSplits,
    EncodedImages,
    ImageTensors,
    SkippedFiles,
    Split,
    encoded_files,
    resize_split,
    select_classes,
    split_train,
)
from .synthetic import make_synthetic


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
    if cfg.name in CIFAR_CLASSES:
        (train, test), classes = load_cifar(cfg.name, Path(cfg.root).expanduser(), download=cfg.download)
    elif cfg.name == "hf":
        hf = _load_hf(cfg)
        stream = keep_encoded(cfg, len(hf.train.items) + len(hf.test.items), hf.train.items[0])
        train, test = _decode_hf(cfg, hf, "train", skipped, stream), _decode_hf(cfg, hf, "test", skipped, stream)
        given_val = _decode_hf(cfg, hf, "val", skipped, stream) if hf.val is not None else None
        classes = hf.classes
    elif cfg.name == "imagefolder":
        train, test, classes = load_imagefolder(cfg, skipped)
    elif cfg.name == "synthetic":
        train, test, classes = make_synthetic(
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
        train, test = resize_split(train, cfg.image_size), resize_split(test, cfg.image_size)
        val = resize_split(val, cfg.image_size) if val is not None else None
    return DatasetSplits(train=train, val=val, test=test, classes=classes, name=cfg.name, skipped=skipped)


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
    files, labels, folder_classes = list_imagefolder(folder, skipped)
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
    if keep_encoded(cfg, len(files), files[0]):
        return encoded_files(files, labels, cfg.image_size), folder_classes, skipped
    return decode_files(files, labels, cfg.image_size, skipped, cache_key=folder_key(cfg, files, labels)), folder_classes, skipped


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
    return decode_files(encoded.items, encoded.labels, cfg.image_size, skipped, names=encoded.names, cache_key=key)


def _load_test_split(cfg, *, seed: int) -> tuple[ImageTensors, list[str]]:
    """The test split of CIFAR, Hugging Face or synthetic data, without decoding, generating or
    resizing the train split."""
    if cfg.name in CIFAR_CLASSES:
        (test,), classes = load_cifar(cfg.name, Path(cfg.root).expanduser(), download=cfg.download, splits=("test",))
    elif cfg.name == "hf":
        hf = _load_hf(cfg, only_test=True)
        stream = keep_encoded(cfg, len(hf.test.items), hf.test.items[0])
        test, classes = _decode_hf(cfg, hf, "test", SkippedFiles(), stream), hf.classes
    elif cfg.name == "synthetic":
        # The test images come from their own stream, so no train images need to be made.
        _, test, classes = make_synthetic(
            num_train=0, num_test=cfg.synthetic_test, num_classes=cfg.synthetic_classes,
            size=cfg.synthetic_size, seed=seed,
        )
    else:
        raise _unknown_dataset(cfg.name)
    if cfg.image_size is not None and isinstance(test, ImageTensors):
        test = resize_split(test, cfg.image_size)
    return test, classes


def _unknown_dataset(name: str) -> DataError:
    return DataError(
        f"data.name is {name!r}, which is not a dataset finetune knows.",
        "Use one of cifar10, cifar100, imagefolder, hf or synthetic.",
    )
