"""Hugging Face datasets as a data source (``data.name=hf``): a hub id, a ``save_to_disk`` folder,
or parquet files.

This module finds the splits, the image and label columns and the class names, and hands back
the *encoded* images (bytes, as stored) with their labels; ``finetune.data`` decodes them like
any image files. The ``datasets`` library is imported only here, and only when a recipe asks.

Offline: a hub dataset already in the local datasets cache loads with no network. One that is
not fails within a few seconds (not the hub client's retries) with a message saying how to fill
the cache, as for hub models.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError

VAL_NAMES = ("validation", "valid", "val", "dev")


class ArrowImages(Sequence):
    """The encoded images of an ``Image`` column, read from the (memory-mapped) dataset only when
    indexed: bytes, or a file path when the dataset keeps only paths."""

    def __init__(self, column: Any):
        self._column = column  # a pyarrow ChunkedArray of struct<bytes, path>

    def __len__(self) -> int:
        return len(self._column)

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            rows = self._column.slice(start, max(0, stop - start)).to_pylist()[::step]
            return [_item(r) for r in rows]
        return _item(self._column[index].as_py())


def _item(row: dict | None) -> bytes | str:
    # load_hf refuses empty cells; b"" (never an image) keeps a row that slipped through from
    # being a TypeError: it is then an unreadable image, named by its split and row.
    if row is None:
        return b""
    return row["bytes"] if row["bytes"] is not None else (row["path"] or b"")


@dataclass
class EncodedSplit:
    """One split as stored: encoded images (bytes, or a file path when the dataset keeps only
    paths) and integer labels."""

    items: Sequence[bytes | str]
    labels: list[int]
    names: list[str]  # how messages name each item, e.g. "train[17]"


@dataclass
class HFSplits:
    train: EncodedSplit
    val: EncodedSplit | None
    test: EncodedSplit
    classes: list[str]
    fingerprint: str  # identifies the data, for the decode cache
    image_column: str  # the column the images come from, also for the decode cache


def load_hf(path: str, *, image_column: str | None = None, label_column: str | None = None,
            only_test: bool = False) -> HFSplits:
    """Open a Hugging Face dataset and pick its splits and columns.

    Splits: ``train``; ``test`` (or, without one, the validation split) as the test set; and,
    when there is both a test and a validation split (``validation``/``valid``/``val``/``dev``),
    the validation split as the validation set. Columns: the ``Image`` feature and the
    ``ClassLabel`` feature unless named; class names come from the train split's ``ClassLabel``
    (another split's ``ClassLabel`` is matched to them by name), else the classes are numbered
    ``0..max`` from the train split's labels.

    Every cell is checked here, with vectorised Arrow and NumPy operations (milliseconds for
    CIFAR-10), before anything is decoded or trained: an empty image cell, a missing label, or a
    label outside the classes (``-1`` for "no label", say) is an error naming its split and row,
    not an ``IndexError`` an epoch later.

    Args:
        path: a hub id (``uoft-cs/cifar10``), a ``save_to_disk`` folder, a folder of parquet files
            named by split (``train-*.parquet``...), or one ``.parquet`` file (then train only: an
            error, a test split is needed).
        image_column: the image column; ``None`` detects the ``Image`` feature.
        label_column: the label column; ``None`` detects the ``ClassLabel`` feature.
        only_test: read only the test split (``finetune eval``).

    Raises:
        DataError: the dataset cannot be found or opened, its splits or columns do not fit, an
            image cell is empty, or a label is missing or not one of the classes.
    """
    import numpy as np

    dataset = _open(path)
    names = list(dataset.keys())
    val_name = next((n for n in VAL_NAMES if n in dataset), None)
    test_name = "test" if "test" in dataset else val_name
    if "train" not in dataset or test_name is None:
        raise DataError(
            f"The dataset {path} has the splits {', '.join(names) or 'none'}; finetune needs 'train' and "
            "'test' (or 'validation').",
            "Rename its splits, or save it with a train and a test split.",
        )
    image_col, label_col, classes = _columns(dataset["train"].features, path, image_column, label_column)

    def encoded(split: str) -> tuple[EncodedSplit, np.ndarray]:
        return _encoded_split(dataset, split, image_col, label_col, classes, path)

    test, test_labels = encoded(test_name)
    train, train_labels = (EncodedSplit([], [], []), np.zeros(0, np.int64)) if only_test else encoded("train")
    val, val_labels = encoded(val_name) if val_name and val_name != test_name and not only_test else (None, None)
    if classes is None:  # plain integer labels: the train split's classes, numbered
        counted = test_labels if only_test else train_labels
        classes = [str(i) for i in range(max(int(counted.max(initial=-1)) + 1, 1))]
    for name, split, labels in (("train", train, train_labels), (test_name, test, test_labels), (val_name, val, val_labels)):
        if split is not None:
            _check_labels(labels, len(classes), name, label_col, path)
            split.labels = labels.tolist()
    fingerprint = ":".join(getattr(dataset[n], "_fingerprint", n) for n in names)
    return HFSplits(train, val, test, classes, fingerprint, image_col)


def _columns(features: Any, path: str, image_column: str | None, label_column: str | None
             ) -> tuple[str, str, list[str] | None]:
    """The image and label columns (given, else detected) and the train split's class names.

    Raises:
        DataError: a column cannot be detected or is not there.
    """
    image_col = image_column or _detect(features, "Image", path, "image_column")
    label_col = label_column or _detect(features, "ClassLabel", path, "label_column")
    for column in (image_col, label_col):
        if column not in features:
            raise DataError(
                f"The dataset {path} has no column {column!r}; its columns are {', '.join(features)}.",
                "Set data.image_column and data.label_column to the right columns.",
            )
    return image_col, label_col, _class_names(features[label_col])


def _encoded_split(dataset: Any, split: str, image_col: str, label_col: str, classes: list[str] | None,
                   path: str) -> tuple[EncodedSplit, Any]:
    """One split's encoded images and labels (as numbers into ``classes``), every cell checked.

    Raises:
        DataError: a column is missing or holds the wrong kind of data, an image cell is empty, a
            label is missing, or a label names a class the train split lacks.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    table = dataset[split].with_format("arrow")[:]  # respects any selection, without decoding
    if image_col not in table.column_names or label_col not in table.column_names:
        raise DataError(f"{path}: the {split} split has no column {image_col!r} or {label_col!r}.",
                        "Give every split the same columns, or set data.image_column and data.label_column.")
    images = table.column(image_col)
    _check_images(images, split, image_col, path)
    column = table.column(label_col)
    if not pa.types.is_integer(column.type):
        raise DataError(f"{path}: the column {label_col!r} does not hold class numbers.", "Set data.label_column.")
    if column.null_count:
        import numpy as np

        rows = np.flatnonzero(pc.is_null(column).to_numpy(zero_copy_only=False))
        raise DataError(
            f"{path}: the {split} split has {_rows(rows)} with no label in the column {label_col!r} "
            f"(e.g. {split}[{rows[0]}]).",
            f"Remove those rows (dataset.filter(lambda r: r[{label_col!r}] is not None)) or label them.",
        )
    labels = column.to_numpy().astype("int64", copy=False)
    own = _class_names(dataset[split].features[label_col])
    if classes is not None and own is not None and own != classes:
        labels = _by_name(labels, own, classes, split, path)
    return EncodedSplit(ArrowImages(images), labels, [f"{split}[{i}]" for i in range(len(images))]), labels


def _check_images(images: Any, split: str, image_col: str, path: str) -> None:
    """Refuse an image column that is not one, or that has empty cells (null, or neither bytes nor
    a path), naming how many and the first."""
    import numpy as np
    import pyarrow.compute as pc

    if getattr(images.type, "num_fields", 0) < 2 or min(images.type.get_field_index(f) for f in ("bytes", "path")) < 0:
        raise DataError(f"{path}: the column {image_col!r} does not hold images.", "Set data.image_column.")
    empty = pc.and_kleene(pc.is_null(pc.struct_field(images, "bytes")), pc.is_null(pc.struct_field(images, "path")))
    if len(images) and pc.any(pc.or_kleene(pc.is_null(images), empty)).as_py():
        rows = np.flatnonzero(pc.or_kleene(pc.is_null(images), empty).to_numpy(zero_copy_only=False))
        raise DataError(
            f"{path}: the {split} split has {_rows(rows)} with no image in the column {image_col!r} "
            f"(e.g. {split}[{rows[0]}]).",
            f"Remove or fill those rows (e.g. dataset.filter(lambda r: r[{image_col!r}] is not None)) and save "
            "the dataset again.",
        )


def _class_names(feature: Any) -> list[str] | None:
    return list(feature.names) if type(feature).__name__ == "ClassLabel" else None


def _rows(rows: Any) -> str:
    return "1 row" if len(rows) == 1 else f"{len(rows)} rows"


def _by_name(labels: Any, own: list[str], classes: list[str], split: str, path: str) -> Any:
    """A split's labels, numbers into its own ``ClassLabel`` names, as numbers into ``classes``
    (the train split's). Numbers outside ``own`` stay outside ``classes``, for :func:`_check_labels`.

    Raises:
        DataError: a label names a class the train split lacks.
    """
    import numpy as np

    lookup = np.array([classes.index(name) if name in classes else -1 for name in own] + [len(classes)], dtype=np.int64)
    inside = (labels >= 0) & (labels < len(own))
    mapped = np.where(labels < 0, labels, lookup[np.where(inside, labels, len(own))])
    unknown = np.flatnonzero(inside & (mapped == -1))
    if len(unknown):
        row = int(unknown[0])
        raise DataError(
            f"{path}: the {split} split has {_rows(unknown)} of classes the train split lacks (e.g. {split}[{row}] "
            f"is {own[labels[row]]!r}; the train split's classes are {', '.join(classes[:20])}).",
            "Remove those rows, or give the splits the same ClassLabel names.",
        )
    return mapped


def _check_labels(labels: Any, count: int, split: str, column: str, path: str) -> None:
    """Refuse labels outside ``0..count-1``, naming how many, the first row and its label."""
    import numpy as np

    bad = np.flatnonzero((labels < 0) | (labels >= count))
    if not len(bad):
        return
    row, label = int(bad[0]), int(labels[bad[0]])
    why = "-1 usually marks a row with no label" if label == -1 else f"the train split has {count} classes"
    raise DataError(
        f"{path}: the {split} split has {_rows(bad)} whose label is not one of the {count} classes 0..{count - 1} "
        f"(e.g. {split}[{row}] has label {label}; {why}).",
        f"Remove those rows (e.g. dataset.filter(lambda r: 0 <= r[{column!r}] < {count})), or use a split whose "
        "classes all appear in the train split.",
    )


def _detect(features: Any, kind: str, path: str, key: str) -> str:
    found = [name for name, feature in features.items() if type(feature).__name__ == kind]
    if len(found) != 1:
        what = "none" if not found else ", ".join(found)
        raise DataError(
            f"Cannot tell which column of {path} holds the {'images' if kind == 'Image' else 'labels'}: "
            f"its {kind} columns are {what} (all columns: {', '.join(features)}).",
            f"Set data.{key} to the column's name.",
        )
    return found[0]


def _open(path: str):
    """The dataset at ``path`` as a ``DatasetDict``."""
    local = Path(path).expanduser()
    if local.exists():
        import datasets

        try:
            if local.is_dir() and ((local / "dataset_dict.json").is_file() or (local / "state.json").is_file()):
                loaded = datasets.load_from_disk(str(local))
            elif local.is_file() and local.suffix == ".parquet":
                loaded = datasets.load_dataset("parquet", data_files={"train": str(local)})
            else:
                loaded = datasets.load_dataset(str(local))
        except (OSError, ValueError, FileNotFoundError) as exc:
            raise DataError(
                f"{local} is not a dataset finetune can read ({type(exc).__name__}: {exc}).",
                "Give a folder written by Dataset(Dict).save_to_disk, a folder of parquet files named by split "
                "(train-*.parquet, test-*.parquet), or a hub id.",
            ) from None
        return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict({"train": loaded})
    return _open_hub(path)


def _open_hub(repo_id: str):
    from ..hub import endpoint_reachable, hub_endpoint, hub_offline_forced

    offline = hub_offline_forced() or os.environ.get("HF_DATASETS_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if not offline and not endpoint_reachable(hub_endpoint()):
        offline = True
    if offline:
        # Read before `datasets` is first imported; set on its config too, in case it already was.
        os.environ["HF_DATASETS_OFFLINE"] = "1"
    import datasets

    if offline:
        datasets.config.HF_DATASETS_OFFLINE = True
        datasets.config.HF_HUB_OFFLINE = True
    try:
        return datasets.load_dataset(repo_id)
    except Exception as exc:  # noqa: BLE001 - the datasets library raises many kinds; all mean "not available"
        reason = "the hub cannot be reached and it is not in the local datasets cache" if offline else str(exc)
        raise DataError(
            f"Cannot load the dataset '{repo_id}': {reason}.",
            f"On a machine with internet run `python -c \"import datasets; datasets.load_dataset('{repo_id}')\"` "
            f"and copy its cache ({datasets.config.HF_DATASETS_CACHE}) here, or pass a local save_to_disk folder "
            "or parquet files as data.path.",
        ) from None
