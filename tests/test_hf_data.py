"""Hugging Face datasets (data.name=hf): save_to_disk folders and parquet files built here from
real CIFAR-10 JPEGs (the shared copy), offline; hub ids fail fast and clearly when not cached."""

from __future__ import annotations

import tarfile
import time

import pytest
import torch
from typer.testing import CliRunner

from conftest import REPO_ROOT, SHARED_DATA
from finetune.cli import app
from finetune.data.load import load_eval_split, load_splits
from finetune.errors import DataError
from finetune.recipe import load_recipe

datasets = pytest.importorskip("datasets")
CIFAR_TAR = SHARED_DATA / "cifar10-jpeg.tar.gz"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
pytestmark = pytest.mark.skipif(not CIFAR_TAR.exists(), reason=f"{CIFAR_TAR} not present")


@pytest.fixture(scope="module")
def cifar_jpegs() -> dict[str, list[tuple[bytes, int]]]:
    """A few real CIFAR-10 JPEGs per split: (bytes, label), streamed from the shared tarball."""
    wanted = {"train": 6, "test": 2}
    found: dict[str, list[tuple[bytes, int]]] = {"train": [], "test": []}
    counts: dict[tuple[str, str], int] = {}
    with tarfile.open(CIFAR_TAR) as tar:
        for member in tar:
            parts = member.name.split("/")
            if len(parts) != 3 or not member.isfile():
                continue
            split, cls, _ = parts
            if counts.get((split, cls), 0) >= wanted.get(split, 0):
                continue
            counts[(split, cls)] = counts.get((split, cls), 0) + 1
            found[split].append((tar.extractfile(member).read(), CLASSES.index(cls)))
            if sum(counts.values()) == 10 * sum(wanted.values()):
                break
    return found


def build(cifar_jpegs, *, val: bool = False):
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES),
                                  "note": datasets.Value("string")})

    def split(rows):
        return datasets.Dataset.from_dict(
            {"img": [{"bytes": b, "path": None} for b, _ in rows], "label": [y for _, y in rows],
             "note": ["x"] * len(rows)}, features=features)

    parts = {"train": split(cifar_jpegs["train"]), "test": split(cifar_jpegs["test"])}
    if val:
        parts["validation"] = split(cifar_jpegs["test"][:5])
    return datasets.DatasetDict(parts)


@pytest.fixture(autouse=True)
def datasets_cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets-cache"))


def cfg(path, **extra):
    from test_data import make_cfg

    return make_cfg(**{"name": "hf", "path": str(path), "image_column": None, "label_column": None, **extra})


@pytest.mark.parametrize("layout", ["save_to_disk", "parquet"])
def test_a_local_dataset_loads_with_its_columns_classes_and_splits(tmp_path, cifar_jpegs, layout):
    dataset = build(cifar_jpegs)
    path = tmp_path / "cifar_small"
    if layout == "save_to_disk":
        dataset.save_to_disk(str(path))
    else:
        path.mkdir()
        for name, part in dataset.items():
            part.to_parquet(str(path / f"{name}-00000-of-00001.parquet"))
    splits = load_splits(cfg(path), seed=0)
    assert splits.classes == CLASSES  # from the ClassLabel
    assert splits.train.images.shape == (60, 3, 32, 32) and splits.test.images.shape == (20, 3, 32, 32)
    assert splits.train.labels.tolist() == [y for _, y in cifar_jpegs["train"]]
    assert splits.val is None
    # The pixels are the JPEGs' own, decoded as an image folder would decode them.
    reference = torch.stack([_decode(b) for b, _ in cifar_jpegs["test"]])
    assert torch.equal(splits.test.images, reference)


def _decode(blob: bytes) -> torch.Tensor:
    import warnings

    from finetune.data.decode import TV_CODEC_DEPRECATION as _TV_CODEC_DEPRECATION, decode_bytes as _decode_bytes

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_TV_CODEC_DEPRECATION, category=DeprecationWarning)
        return _decode_bytes(blob, "x")


def test_the_dataset_s_validation_split_is_the_validation_set(tmp_path, cifar_jpegs):
    build(cifar_jpegs, val=True).save_to_disk(str(tmp_path / "ds"))
    splits = load_splits(cfg(tmp_path / "ds"), seed=0)
    assert len(splits.val) == 5 and len(splits.test) == 20 and len(splits.train) == 60
    with pytest.raises(DataError, match="its own validation split"):
        load_splits(cfg(tmp_path / "ds", val_split=10), seed=0)


def test_named_columns_and_bad_columns(tmp_path, cifar_jpegs):
    build(cifar_jpegs).save_to_disk(str(tmp_path / "ds"))
    splits = load_splits(cfg(tmp_path / "ds", image_column="img", label_column="label"), seed=0)
    assert len(splits.train) == 60
    with pytest.raises(DataError, match="has no column 'picture'"):
        load_splits(cfg(tmp_path / "ds", image_column="picture"), seed=0)
    with pytest.raises(DataError, match="does not hold class numbers"):
        load_splits(cfg(tmp_path / "ds", label_column="note"), seed=0)


def test_training_and_eval_on_a_saved_dataset(tmp_path, cifar_jpegs):
    build(cifar_jpegs).save_to_disk(str(tmp_path / "ds"))
    runner = CliRunner()
    args = ["run", str(REPO_ROOT / "recipes" / "quick_cpu.yaml"), "data.name=hf", f"data.path={tmp_path / 'ds'}",
            "data.batch_size=20", f"output.dir={tmp_path / 'runs'}", "output.plots=false", "-q"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "runs" / "quick_cpu"
    assert load_recipe(run_dir / "recipe.yaml").data.path == str(tmp_path / "ds")
    result = runner.invoke(app, ["eval", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert "(20 images)" in result.output and "airplane" in result.output
    test, classes, _ = load_eval_split(load_recipe(run_dir / "recipe.yaml").data)
    assert classes == CLASSES and len(test) == 20


def test_a_hub_dataset_that_is_not_cached_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: the hub is unreachable
    # Going offline sets these for the rest of the process; put them back afterwards.
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    started = time.perf_counter()
    with pytest.raises(DataError) as info:
        load_splits(cfg("someone/not-a-cached-dataset"), seed=0)
    assert time.perf_counter() - started < 15
    text = str(info.value)
    assert "not in the local datasets cache" in text and "load_dataset('someone/not-a-cached-dataset')" in text


def test_a_recipe_with_hf_needs_a_path():
    from finetune.errors import RecipeError

    with pytest.raises(RecipeError, match="data.path: data.name 'hf' needs data.path"):
        load_recipe(REPO_ROOT / "recipes" / "quick_cpu.yaml", ["data.name=hf"])


def test_a_dataset_can_be_streamed_from_its_memory_mapped_arrow_files(tmp_path, cifar_jpegs):
    from finetune.data.loader import BatchLoader
    from finetune.data.splits import EncodedImages

    build(cifar_jpegs).save_to_disk(str(tmp_path / "ds"))
    in_memory = load_splits(cfg(tmp_path / "ds", in_memory=True), seed=0)
    streamed = load_splits(cfg(tmp_path / "ds", in_memory=False), seed=0)
    assert isinstance(streamed.train, EncodedImages) and len(streamed.train) == 60
    assert type(streamed.train.items).__name__ == "ArrowImages"  # read per batch, not copied up front
    args = dict(batch_size=20, train=False, device=torch.device("cpu"), out_size=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3)
    for (xa, ya), (xb, yb) in zip(BatchLoader(in_memory.train, **args), BatchLoader(streamed.train, **args)):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
