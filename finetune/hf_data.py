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

from .errors import DataError

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
            return [r["bytes"] if r["bytes"] is not None else r["path"] for r in rows]
        row = self._column[index].as_py()
        return row["bytes"] if row["bytes"] is not None else row["path"]


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


def load_hf(path: str, *, image_column: str | None = None, label_column: str | None = None,
            only_test: bool = False) -> HFSplits:
    """Open a Hugging Face dataset and pick its splits and columns.

    Splits: ``train``; ``test`` (or, without one, the validation split) as the test set; and,
    when there is both a test and a validation split (``validation``/``valid``/``val``/``dev``),
    the validation split as the validation set. Columns: the ``Image`` feature and the
    ``ClassLabel`` feature unless named; class names come from the ``ClassLabel``.

    Args:
        path: a hub id (``uoft-cs/cifar10``), a ``save_to_disk`` folder, a folder of parquet files
            named by split (``train-*.parquet``...), or one ``.parquet`` file (then train only: an
            error, a test split is needed).
        image_column: the image column; ``None`` detects the ``Image`` feature.
        label_column: the label column; ``None`` detects the ``ClassLabel`` feature.
        only_test: read only the test split (``finetune eval``).

    Raises:
        DataError: the dataset cannot be found or opened, or its splits or columns do not fit.
    """
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
    features = dataset["train"].features
    image_col = image_column or _detect(features, "Image", path, "image_column")
    label_col = label_column or _detect(features, "ClassLabel", path, "label_column")
    for column in (image_col, label_col):
        if column not in features:
            raise DataError(
                f"The dataset {path} has no column {column!r}; its columns are {', '.join(features)}.",
                "Set data.image_column and data.label_column to the right columns.",
            )
    label_feature = features[label_col]
    classes = list(label_feature.names) if type(label_feature).__name__ == "ClassLabel" else None

    def encoded(split: str) -> EncodedSplit:
        table = dataset[split].with_format("arrow")[:]  # respects any selection, without decoding
        images = table.column(image_col)
        if getattr(images.type, "num_fields", 0) < 2 or images.type.get_field_index("bytes") < 0:
            raise DataError(f"{path}: the column {image_col!r} does not hold images.", "Set data.image_column.")
        items = ArrowImages(images)
        labels = table.column(label_col).to_pylist()
        if not all(isinstance(label, int) and not isinstance(label, bool) for label in labels):
            raise DataError(f"{path}: the column {label_col!r} does not hold class numbers.", "Set data.label_column.")
        return EncodedSplit(items, labels, [f"{split}[{i}]" for i in range(len(items))])

    test = encoded(test_name)
    train = EncodedSplit([], [], []) if only_test else encoded("train")
    val = encoded(val_name) if val_name and val_name != test_name and not only_test else None
    if classes is None:  # plain integer labels: number the classes
        count = max(max(train.labels, default=0), max(test.labels, default=0)) + 1
        classes = [str(i) for i in range(count)]
    fingerprint = ":".join(getattr(dataset[n], "_fingerprint", n) for n in names)
    return HFSplits(train, val, test, classes, fingerprint)


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
    from .checkpoint import _hub_endpoint, endpoint_reachable, hub_offline_forced

    offline = hub_offline_forced() or os.environ.get("HF_DATASETS_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if not offline and not endpoint_reachable(_hub_endpoint()):
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
