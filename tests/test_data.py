"""Tests for finetune.data: loading splits in the real on-disk formats, and the batch loader.

Everything runs offline on a CPU in a few seconds. Image folders are written as real JPEG/PNG files
and CIFAR as torchvision's own pickled batches; only torchvision's md5 check is patched out.
"""

from __future__ import annotations

import os
import pickle
import socket
import tarfile
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from finetune.data.decode import read_image
from finetune.data.load import load_splits
from finetune.data.loader import BatchLoader
from finetune.data.preprocess import preprocess_images, resize_center_crop
from finetune.data.splits import DatasetSplits, ImageTensors, split_train
from finetune.data.transforms import random_crop, random_hflip, random_resized_crop
from finetune.errors import DataError, FinetuneError

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CIFAR_JPEG_TAR = SHARED_DATA / "cifar10-jpeg.tar.gz"
CPU = torch.device("cpu")


def make_augment(hflip=False, crop_padding=0, random_resized_crop=False, rrc_scale=(0.35, 1.0)):
    return types.SimpleNamespace(
        hflip=hflip, crop_padding=crop_padding, random_resized_crop=random_resized_crop, rrc_scale=rrc_scale
    )


def make_cfg(**overrides) -> types.SimpleNamespace:
    """A recipe ``data`` section with the recipe's defaults, small synthetic sizes."""
    fields = dict(
        name="synthetic",
        root="data",
        download=False,
        batch_size=32,
        eval_batch_size=None,
        train_subset=None,
        val_split=0,
        image_size=None,
        in_memory=True,
        synthetic_train=200,
        synthetic_test=50,
        synthetic_classes=5,
        synthetic_size=16,
        augment=make_augment(hflip=True, crop_padding=4),
    )
    fields.update(overrides)
    return types.SimpleNamespace(**fields)


def image_keys(images: torch.Tensor) -> set[bytes]:
    """One key per image, to compare splits by content."""
    return {img.numpy().tobytes() for img in images}


# ---- synthetic -----------------------------------------------------------------------------------


def test_synthetic_shapes_dtypes_and_classes():
    splits = load_splits(make_cfg(), seed=0)
    assert isinstance(splits, DatasetSplits)
    assert splits.name == "synthetic"
    assert splits.classes == [f"class_{k}" for k in range(5)]
    assert splits.val is None
    assert splits.train.images.shape == (200, 3, 16, 16) and splits.train.images.dtype == torch.uint8
    assert splits.train.labels.shape == (200,) and splits.train.labels.dtype == torch.int64
    assert splits.test.images.shape == (50, 3, 16, 16)
    assert torch.bincount(splits.train.labels).tolist() == [40] * 5  # balanced


def test_synthetic_is_deterministic_per_seed():
    a, b, c = (load_splits(make_cfg(), seed=s) for s in (3, 3, 4))
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.train.labels, b.train.labels)
    assert torch.equal(a.test.images, b.test.images)
    assert not torch.equal(a.train.images, c.train.images)


def test_synthetic_classes_are_learnable():
    # A nearest-class-mean classifier fitted on train must do far better than chance on test.
    splits = load_splits(make_cfg(synthetic_classes=10, synthetic_train=500, synthetic_test=200), seed=0)
    x_train = splits.train.images.flatten(1).float()
    means = torch.stack([x_train[splits.train.labels == k].mean(0) for k in range(10)])
    pred = torch.cdist(splits.test.images.flatten(1).float(), means).argmin(1)
    assert (pred == splits.test.labels).float().mean() > 0.8


def test_image_size_resizes_in_memory():
    splits = load_splits(make_cfg(image_size=24, val_split=20), seed=0)
    assert splits.train.images.shape == (180, 3, 24, 24)
    assert splits.val.images.shape == (20, 3, 24, 24)
    assert splits.test.images.shape == (50, 3, 24, 24)


# ---- train subset and validation split ------------------------------------------------------------


@pytest.mark.parametrize("subset, expected", [(60, 60), (0.25, 50), (1.0, 200)])
def test_train_subset_by_count_and_fraction(subset, expected):
    full = load_splits(make_cfg(), seed=0).train
    train = load_splits(make_cfg(train_subset=subset), seed=0).train
    assert len(train) == expected
    assert image_keys(train.images) <= image_keys(full.images)


def test_val_split_is_disjoint_seeded_and_stable():
    full = load_splits(make_cfg(), seed=0).train
    a = load_splits(make_cfg(train_subset=100, val_split=0.2), seed=0)
    b = load_splits(make_cfg(train_subset=100, val_split=0.2), seed=0)
    c = load_splits(make_cfg(train_subset=100, val_split=0.2), seed=1)
    assert len(a.train) == 100 and len(a.val) == 40
    assert not image_keys(a.train.images) & image_keys(a.val.images)
    assert torch.equal(a.val.images, b.val.images) and torch.equal(a.train.images, b.train.images)
    assert image_keys(c.val.images) != image_keys(a.val.images)
    # Labels travel with their images.
    lookup = {img.numpy().tobytes(): int(y) for img, y in zip(full.images, full.labels)}
    assert all(lookup[img.numpy().tobytes()] == int(y) for img, y in zip(a.val.images, a.val.labels))
    # Changing one size leaves the other selection alone.
    d = load_splits(make_cfg(train_subset=60, val_split=0.2), seed=0)
    e = load_splits(make_cfg(train_subset=100, val_split=10), seed=0)
    assert torch.equal(d.val.images, a.val.images)
    assert torch.equal(e.train.images, a.train.images)


def test_val_split_without_subset_uses_the_rest():
    splits = load_splits(make_cfg(val_split=30), seed=0)
    assert len(splits.train) == 170 and len(splits.val) == 30


def test_subset_and_val_that_do_not_fit_raise():
    data = ImageTensors(torch.zeros(10, 3, 2, 2, dtype=torch.uint8), torch.zeros(10, dtype=torch.int64))
    with pytest.raises(DataError, match="train_subset"):
        split_train(data, train_subset=8, val_split=5, seed=0)
    with pytest.raises(DataError, match="fraction"):
        split_train(data, train_subset=2.5, val_split=0, seed=0)


# ---- ImageFolder ---------------------------------------------------------------------------------


def write_image(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (8, 8)) -> None:
    """A solid-colour image file; the format follows the suffix (.jpg, .png)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, quality=95)


@pytest.fixture
def image_tree(tmp_path) -> Path:
    """train/ and test/ with three classes, mixing JPEG and PNG; each class has its own colour."""
    colours = {"cat": (200, 30, 30), "dog": (30, 200, 30), "emu": (30, 30, 200)}
    for cls, colour in colours.items():
        for i in range(3):
            write_image(tmp_path / "train" / cls / f"{i}.jpg", colour)
        write_image(tmp_path / "train" / cls / "3.png", colour)
        write_image(tmp_path / "test" / cls / "0.png", colour)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image, and not named like one")
    return tmp_path


def test_imagefolder_loads_labels_and_classes(image_tree):
    splits = load_splits(make_cfg(name="imagefolder", root=str(image_tree)), seed=0)
    assert splits.classes == ["cat", "dog", "emu"]
    assert splits.train.images.shape == (12, 3, 8, 8) and splits.train.images.dtype == torch.uint8
    assert splits.train.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert splits.test.labels.tolist() == [0, 1, 2]
    # Each image's dominant channel is its class's colour (JPEG is lossy, so compare coarsely).
    dominant = splits.train.images.float().mean((2, 3)).argmax(1)
    assert torch.equal(dominant, splits.train.labels)
    assert torch.equal(splits.test.images[:, :, 0, 0], torch.tensor([[200, 30, 30], [30, 200, 30], [30, 30, 200]]))


def test_imagefolder_val_folder_and_missing_test_class(tmp_path):
    for cls in ("a", "b", "c"):
        write_image(tmp_path / "train" / cls / "0.png", (10, 10, 10))
    write_image(tmp_path / "val" / "c" / "0.png", (10, 10, 10))  # only class c in val/
    splits = load_splits(make_cfg(name="imagefolder", root=str(tmp_path)), seed=0)
    assert splits.test.labels.tolist() == [2]  # labelled by name, not by position in val/


def test_imagefolder_file_that_is_not_an_image_is_skipped_and_counted(image_tree):
    bad = image_tree / "train" / "dog" / "broken.jpg"
    bad.write_text("this is text")
    splits = load_splits(make_cfg(name="imagefolder", root=str(image_tree)), seed=0)
    assert len(splits.train) == 12  # the 12 real images; broken.jpg and notes.txt are left out
    assert splits.skipped.reasons == {"unreadable image": [str(bad)],
                                      "not an image file (.txt)": [str(image_tree / "train" / "cat" / "notes.txt")]}
    assert splits.skipped.describe().startswith("skipped 2 entries: 1 not an image file (.txt)")
    # Nothing readable at all is an error, naming a file.
    for path in (image_tree / "train").rglob("*.*"):
        path.write_text("not an image")
    with pytest.raises(DataError, match="None of the"):
        load_splits(make_cfg(name="imagefolder", root=str(image_tree)), seed=0)


@pytest.mark.parametrize("missing", ["train", "test"])
def test_imagefolder_missing_folder(image_tree, missing):
    import shutil

    shutil.rmtree(image_tree / missing)
    with pytest.raises(DataError, match=missing) as info:
        load_splits(make_cfg(name="imagefolder", root=str(image_tree)), seed=0)
    assert str(image_tree / missing) in str(info.value)


def test_imagefolder_missing_root(tmp_path):
    with pytest.raises(DataError, match="nowhere"):
        load_splits(make_cfg(name="imagefolder", root=str(tmp_path / "nowhere")), seed=0)


def test_imagefolder_mixed_sizes(tmp_path):
    write_image(tmp_path / "train" / "a" / "0.png", (0, 0, 0), size=(8, 8))
    write_image(tmp_path / "train" / "a" / "1.png", (0, 0, 0), size=(12, 6))
    write_image(tmp_path / "test" / "a" / "0.png", (0, 0, 0), size=(8, 8))
    with pytest.raises(DataError, match="image_size") as info:
        load_splits(make_cfg(name="imagefolder", root=str(tmp_path)), seed=0)
    assert "1.png" in str(info.value)
    splits = load_splits(make_cfg(name="imagefolder", root=str(tmp_path), image_size=10), seed=0)
    assert splits.train.images.shape == (2, 3, 10, 10)
    assert splits.test.images.shape == (1, 3, 10, 10)


@pytest.mark.skipif(not CIFAR_JPEG_TAR.exists(), reason=f"{CIFAR_JPEG_TAR} not present")
def test_real_cifar_jpegs_from_the_shared_copy(tmp_path):
    # The tarball lists train/airplane/ first, then train/automobile/: stream only that far.
    wanted = {f"train/{cls}/{i:04d}.jpg" for cls in ("airplane", "automobile") for i in range(4)}
    with tarfile.open(CIFAR_JPEG_TAR) as tar:
        for member in tar:
            if member.name in wanted:
                cls, name = member.name.split("/")[1:]
                split = "train" if int(name[:4]) < 3 else "test"
                target = tmp_path / split / cls / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())
                wanted.discard(member.name)
            if not wanted:
                break
    splits = load_splits(make_cfg(name="imagefolder", root=str(tmp_path)), seed=0)
    assert splits.classes == ["airplane", "automobile"]
    assert splits.train.images.shape == (6, 3, 32, 32)
    assert splits.train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert splits.test.labels.tolist() == [0, 1]
    assert 20 < splits.train.images.float().mean() < 235  # real pixels, not blank


# ---- CIFAR in torchvision's on-disk format --------------------------------------------------------


def write_cifar(root: Path, name: str, n_train: int = 10, n_test: int = 4) -> np.ndarray:
    """Write torchvision's ``cifar-10-batches-py`` (or ``cifar-100-python``) pickles; return train pixels."""
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (n_train, 3 * 32 * 32), dtype=np.uint8)
    test = rng.integers(0, 256, (n_test, 3 * 32 * 32), dtype=np.uint8)

    def dump(path: Path, obj: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            pickle.dump(obj, f)

    if name == "cifar10":
        folder = root / "cifar-10-batches-py"
        per_batch = n_train // 5
        for b in range(5):
            rows = slice(b * per_batch, (b + 1) * per_batch)
            labels = [i % 10 for i in range(rows.start, rows.stop)]
            batch = {"batch_label": f"training batch {b + 1} of 5", "data": train[rows], "labels": labels}
            dump(folder / f"data_batch_{b + 1}", batch)
        dump(folder / "test_batch", {"data": test, "labels": [i % 10 for i in range(n_test)]})
        dump(folder / "batches.meta", {"label_names": [f"c10_{k}" for k in range(10)]})
    else:
        folder = root / "cifar-100-python"
        dump(folder / "train", {"data": train, "fine_labels": [i % 100 for i in range(n_train)]})
        dump(folder / "test", {"data": test, "fine_labels": [i % 100 for i in range(n_test)]})
        dump(folder / "meta", {"fine_label_names": [f"c100_{k}" for k in range(100)]})
    return train.reshape(n_train, 3, 32, 32)


@pytest.fixture
def skip_md5(monkeypatch):
    """torchvision checks md5 sums of the real files; the tiny fixture files only need to exist."""
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))


@pytest.mark.parametrize("name, num_classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_on_disk_format_loads(tmp_path, skip_md5, name, num_classes):
    pixels = write_cifar(tmp_path, name)
    splits = load_splits(make_cfg(name=name, root=str(tmp_path)), seed=0)
    assert len(splits.classes) == num_classes and splits.classes[1].endswith("_1")
    assert splits.train.images.shape == (10, 3, 32, 32) and splits.train.images.dtype == torch.uint8
    assert torch.equal(splits.train.images, torch.from_numpy(pixels))  # CHW order kept exactly
    assert splits.train.labels.tolist() == list(range(10))
    assert splits.test.images.shape == (4, 3, 32, 32)


def test_cifar_missing_without_download(tmp_path):
    with pytest.raises(DataError) as info:
        load_splits(make_cfg(name="cifar10", root=str(tmp_path), download=False), seed=0)
    message = str(info.value)
    assert str(tmp_path / "cifar-10-batches-py") in message
    assert "data.root" in message and "imagefolder" in message


def test_cifar_download_without_network_fails_fast(tmp_path, monkeypatch):
    def unreachable(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    start = time.perf_counter()
    with pytest.raises(DataError, match="cannot be reached") as info:
        load_splits(make_cfg(name="cifar10", root=str(tmp_path), download=True), seed=0)
    assert time.perf_counter() - start < 5
    assert isinstance(info.value, FinetuneError) and str(tmp_path) in str(info.value)


# ---- BatchLoader ---------------------------------------------------------------------------------


def numbered(n: int, size: int = 8) -> ImageTensors:
    """Random images whose label is their index, so every batch row can be traced to its source."""
    images = torch.randint(1, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    return ImageTensors(images, torch.arange(n))


def loader(data, **kwargs) -> BatchLoader:
    # mean 0, std 1/255 make x equal the raw pixel values, so tests can compare pixels exactly.
    defaults = dict(batch_size=4, train=False, device=CPU, out_size=(8, 8), mean=(0.0,) * 3, std=(1 / 255,) * 3)
    return BatchLoader(data, **{**defaults, **kwargs})


def test_batch_count_and_shapes():
    data = numbered(10)
    train = loader(data, train=True)
    evaluate = loader(data, train=False)
    assert len(train) == 2 and len(evaluate) == 3
    assert [x.shape[0] for x, _ in train] == [4, 4]
    batches = list(evaluate)
    assert [x.shape for x, _ in batches] == [(4, 3, 8, 8), (4, 3, 8, 8), (2, 3, 8, 8)]
    assert all(x.dtype == torch.float32 and y.dtype == torch.int64 for x, y in batches)
    assert len(loader(data, train=True, drop_last=False)) == 3


def test_normalisation_is_exact():
    image = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 2, 2).contiguous()
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    data = ImageTensors(image, torch.zeros(1, dtype=torch.int64))
    bl = BatchLoader(data, batch_size=1, train=False, device=CPU, out_size=(2, 2), mean=mean, std=std)
    x, _ = next(iter(bl))
    expected = [(v / 255 - m) / s for v, m, s in zip((0, 51, 255), mean, std)]
    assert torch.allclose(x[0, :, 0, 0], torch.tensor(expected), atol=1e-6)


def test_eval_keeps_order_and_never_augments():
    data = numbered(10)
    batches = list(loader(data, train=False, augment=make_augment(hflip=True, crop_padding=2)))
    x = torch.cat([b[0] for b in batches])
    assert torch.equal(torch.cat([b[1] for b in batches]), torch.arange(10))
    assert torch.equal(x.round().to(torch.uint8), data.images)


def epoch_labels(bl: BatchLoader, epoch: int) -> list[int]:
    bl.set_epoch(epoch)
    return torch.cat([y for _, y in bl]).tolist()


def test_train_shuffle_differs_per_epoch_and_is_reproducible():
    data = numbered(40)
    a, b = loader(data, train=True, seed=1), loader(data, train=True, seed=1)
    assert epoch_labels(a, 0) == epoch_labels(b, 0)
    assert epoch_labels(a, 0) != epoch_labels(a, 1)
    assert sorted(epoch_labels(a, 1)) == list(range(40))  # every image once per epoch
    assert epoch_labels(a, 2) != epoch_labels(loader(data, train=True, seed=2), 2)


def test_streaming_matches_in_memory():
    data = numbered(12)
    aug = make_augment(hflip=True, crop_padding=2)
    for train in (True, False):
        on_device = list(loader(data, train=train, augment=aug, seed=5))
        streamed = list(loader(data, train=train, augment=aug, seed=5, in_memory=False))
        assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(on_device, streamed))


def shift(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Reference translation: ``out[i, j] = image[i + dy, j + dx]``, zero outside."""
    out = torch.zeros_like(image)
    h, w = image.shape[-2:]
    out[:, max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)] = image[
        :, max(0, dy) : h + min(0, dy), max(0, dx) : w + min(0, dx)
    ]
    return out


def test_flip_and_crop_keep_pixel_values():
    data = numbered(64)
    bl = loader(data, train=True, batch_size=64, augment=make_augment(hflip=True, crop_padding=2))
    x, y = next(iter(bl))
    pixels = x.round().to(torch.uint8)
    # No interpolation: every value is an original pixel or 0 (up to float rounding of /255*255).
    assert torch.allclose(x, pixels.float(), atol=1e-3)
    shifts, flips = set(), 0
    for out, label in zip(pixels, y):
        source = data.images[label]
        matches = [
            (dy, dx, flip)
            for flip in (False, True)
            for dy in range(-2, 3)
            for dx in range(-2, 3)
            if torch.equal(out, shift(source.flip(-1) if flip else source, dy, dx))
        ]
        assert matches, f"image {int(label)} is not a shifted (and maybe flipped) copy of its source"
        dy, dx, flip = matches[0]
        shifts.add((dy, dx))
        flips += flip
    assert len(shifts) > 5 and 10 < flips < 54  # shifts and flips vary per image


def test_augment_functions_directly():
    gen = torch.Generator().manual_seed(0)
    images = numbered(16).images
    assert random_crop(images, 0, gen).equal(images)
    flipped = random_hflip(images, gen)
    assert all(torch.equal(f, i) or torch.equal(f, i.flip(-1)) for f, i in zip(flipped, images))
    out = random_resized_crop(images.float(), (20, 12), (0.5, 1.0), gen)
    assert out.shape == (16, 3, 20, 12)
    assert out.min() >= images.min() and out.max() <= images.max()  # bilinear stays within range


def test_resize_to_224_rrc_channels_last_and_dtype():
    data = numbered(4, size=32)
    x, _ = next(iter(loader(data, out_size=(224, 224), channels_last=True, dtype=torch.bfloat16)))
    assert x.shape == (4, 3, 224, 224) and x.dtype == torch.bfloat16
    assert x.is_contiguous(memory_format=torch.channels_last)
    aug = make_augment(hflip=True, random_resized_crop=True, rrc_scale=(0.3, 1.0))
    x, _ = next(iter(loader(data, train=True, out_size=(64, 48), augment=aug)))
    assert x.shape == (4, 3, 64, 48)


def test_train_split_smaller_than_a_batch_raises():
    with pytest.raises(DataError, match="batch_size"):
        loader(numbered(3), train=True, batch_size=4)


# ---- single images -------------------------------------------------------------------------------


def test_read_image_and_preprocess(tmp_path):
    path = tmp_path / "photo.png"
    Image.new("RGB", (40, 20), (255, 0, 51)).save(path)
    image = read_image(path)
    assert image.shape == (3, 20, 40) and image.dtype == torch.uint8
    grey = tmp_path / "grey.png"
    Image.new("L", (10, 10), 7).save(grey)
    assert read_image(grey).shape == (3, 10, 10)  # converted to RGB
    bmp = tmp_path / "old.bmp"  # torchvision cannot decode BMP; Pillow can
    Image.new("RGB", (5, 5), (1, 2, 3)).save(bmp)
    assert read_image(bmp)[:, 0, 0].tolist() == [1, 2, 3]

    batch = preprocess_images([image, read_image(grey)], 16, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert batch.shape == (2, 3, 16, 16) and batch.dtype == torch.float32
    assert torch.allclose(batch[0, :, 8, 8], torch.tensor([1.0, -1.0, 51 / 255 * 2 - 1]), atol=1e-6)


def test_resize_center_crop_keeps_the_centre():
    image = torch.zeros(3, 10, 30, dtype=torch.uint8)
    image[:, :, 10:20] = 255  # a white middle third
    out = resize_center_crop(image, (10, 10))
    assert out.shape == (3, 10, 10) and bool((out == 255).all())


def test_read_image_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_image(tmp_path / "missing.jpg")
    text = tmp_path / "notes.jpg"
    text.write_bytes(b"hello")
    with pytest.raises(DataError, match="notes.jpg"):
        read_image(text)
    with pytest.raises(DataError, match="folder"):
        read_image(tmp_path)


def test_select_classes_relabels_in_the_given_order():
    from finetune.data.splits import select_classes

    labels = torch.tensor([0, 1, 2, 3, 1, 2])
    images = torch.arange(6, dtype=torch.uint8).view(6, 1, 1, 1).expand(6, 3, 2, 2).contiguous()
    split = ImageTensors(images, labels)
    train, test, classes = select_classes(split, split, ["a", "b", "c", "d"], ["c", "b"])
    assert classes == ["c", "b"]
    assert train.labels.tolist() == [1, 0, 1, 0]  # b, c, b, c -> c is 0, b is 1
    assert train.images[:, 0, 0, 0].tolist() == [1, 2, 4, 5]
    with pytest.raises(DataError, match="the dataset's classes are: a, b, c, d"):
        select_classes(split, split, ["a", "b", "c", "d"], ["b", "zebra"])


def test_sixteen_bit_png_is_rescaled_not_truncated(tmp_path):
    from finetune.data.decode import read_image

    path = tmp_path / "deep.png"
    Image.fromarray(np.full((4, 4), 40000, dtype=np.uint16)).save(path)  # 16-bit grey
    image = read_image(path)
    assert image.dtype == torch.uint8
    assert abs(int(image[0, 0, 0]) - round(40000 / 65535 * 255)) <= 1


def test_eval_split_of_a_model_trained_on_some_classes():
    from finetune.data.load import load_eval_split

    # A torchvision-style dataset scored for a model that knows two of its classes, in its order.
    test, classes, _ = load_eval_split(make_cfg(), seed=0, classes=["class_3", "class_1"])
    assert classes == ["class_3", "class_1"]
    full = load_splits(make_cfg(), seed=0).test
    assert len(test) == int(((full.labels == 3) | (full.labels == 1)).sum())
    assert set(test.labels.tolist()) == {0, 1}
    with pytest.raises(DataError, match="zebra"):
        load_eval_split(make_cfg(), seed=0, classes=["zebra"])


def test_eval_split_of_an_imagefolder_run_trained_with_data_classes(image_tree):
    from finetune.data.load import load_eval_split

    all_classes = load_splits(make_cfg(name="imagefolder", root=str(image_tree)), seed=0).classes
    kept = all_classes[:1]
    cfg = make_cfg(name="imagefolder", root=str(image_tree), classes=kept)
    test, classes, _ = load_eval_split(cfg, classes=kept)
    assert classes == kept and set(test.labels.tolist()) == {0}


def test_eval_split_reads_only_the_test_set(tmp_path, skip_md5, monkeypatch):
    import finetune.data.cifar as cifar_mod
    import finetune.data.synthetic as synthetic_mod
    from finetune.data.load import load_eval_split

    write_cifar(tmp_path, "cifar10", n_train=10, n_test=4)
    decoded, made = [], []
    real_tensors, real_synthetic = cifar_mod._cifar_tensors, synthetic_mod._synthetic_images
    monkeypatch.setattr(cifar_mod, "_cifar_tensors", lambda d: decoded.append(d.train) or real_tensors(d))
    monkeypatch.setattr(synthetic_mod, "_synthetic_images", lambda n, *a: made.append(n) or real_synthetic(n, *a))

    test, classes, _ = load_eval_split(make_cfg(name="cifar10", root=str(tmp_path), image_size=16))
    assert decoded == [False]  # torchvision's train=False set only
    assert test.images.shape == (4, 3, 16, 16) and len(classes) == 10
    # Synthetic test images are the ones training evaluates on, made without the train images.
    test, _, _ = load_eval_split(make_cfg(synthetic_train=5000), seed=3)
    assert made == [0, make_cfg().synthetic_test]
    assert torch.equal(test.images, load_splits(make_cfg(), seed=3).test.images)


def test_eval_split_relabels_data_classes_as_training_did(image_tree):
    from finetune.data.load import load_eval_split

    # The run learned emu as class 0 and cat as class 1; eval without the model's names must agree.
    cfg = make_cfg(name="imagefolder", root=str(image_tree), classes=("emu", "cat"))
    trained = load_splits(cfg, seed=0)
    test, classes, _ = load_eval_split(cfg)
    assert classes == trained.classes == ["emu", "cat"]
    assert test.labels.tolist() == trained.test.labels.tolist() == [1, 0]
    assert torch.equal(test.images, trained.test.images)


def test_seed_streams_are_independent():
    from finetune.data.plan import AUGMENT_STREAM, SHUFFLE_STREAM, stream_seed

    seeds = {(s, e, k): stream_seed(s, e, k) for s in range(-3, 20) for e in range(20) for k in (SHUFFLE_STREAM, AUGMENT_STREAM)}
    assert len(set(seeds.values())) == len(seeds)  # no two (seed, epoch, stream) share a seed
    assert all(0 <= v < 2**63 for v in seeds.values())  # valid for torch.Generator.manual_seed
    assert stream_seed(3, 4, SHUFFLE_STREAM) == stream_seed(3, 4, SHUFFLE_STREAM)


def shuffled_batches(seed: int, epoch: int, **augment) -> list[torch.Tensor]:
    n = 64
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 8, 8).contiguous()
    loader = BatchLoader(ImageTensors(images, torch.arange(n)), batch_size=16, train=True, device=CPU,
                         out_size=(8, 8), mean=(0, 0, 0), std=(1, 1, 1), seed=seed, augment=make_augment(**augment))
    loader.set_epoch(epoch)
    return [x for x, _ in loader]


def test_no_two_seeds_share_an_epoch_and_shuffle_and_augmentation_are_independent():
    orders = {(s, e): torch.cat([y for y in shuffled_batches(s, e)])[:, 0, 0, 0] for s in (0, 1, 2) for e in (1, 2, 3)}
    # seed s, epoch e + 1 never replays seed s + 1, epoch e (as seed + epoch would)
    for (s, e), order in orders.items():
        if (s + 1, e - 1) in orders:
            assert not torch.equal(order, orders[(s + 1, e - 1)]), (s, e)
    assert len({tuple(o.tolist()) for o in orders.values()}) == len(orders)

    # The shuffle and the augmentation of an epoch draw from different streams, so the crops and
    # flips do not follow the shuffle order (with one seed for both, these draws would be equal).
    from finetune.data.plan import AUGMENT_STREAM, SHUFFLE_STREAM, stream_seed

    shuffle_gen = torch.Generator().manual_seed(stream_seed(0, 1, SHUFFLE_STREAM))
    aug_gen = torch.Generator().manual_seed(stream_seed(0, 1, AUGMENT_STREAM))
    assert not torch.equal(torch.rand(64, generator=shuffle_gen), torch.rand(64, generator=aug_gen))


def test_iter_from_resumes_an_epoch_with_the_same_batches():
    n = 64
    images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    loader = BatchLoader(ImageTensors(images, torch.arange(n)), batch_size=16, train=True, device=CPU,
                         out_size=(8, 8), mean=(0, 0, 0), std=(1, 1, 1), seed=5,
                         augment=make_augment(hflip=True, crop_padding=2))
    loader.set_epoch(2)
    everything = [(x, y) for x, y in loader]
    rest = list(loader.iter_from(2))
    assert len(rest) == 2
    for (x, y), (x2, y2) in zip(everything[2:], rest):
        assert torch.equal(x, x2) and torch.equal(y, y2)


def test_decode_cache_hits_misses_and_invalidation(image_tree, monkeypatch, tmp_path):
    import finetune.data.decode as decode_mod

    cache = tmp_path / "cache"
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(cache))
    (image_tree / "train" / "dog" / "broken.jpg").write_text("not an image")
    cfg = make_cfg(name="imagefolder", root=str(image_tree), cache=True)
    first = load_splits(cfg, seed=0)
    entries = sorted(p.suffix for p in (cache / "decoded").iterdir())
    assert entries == [".json", ".json", ".npy", ".npy"]  # train and test

    decodes = []
    real = decode_mod._decode_all
    monkeypatch.setattr(decode_mod, "_decode_all", lambda *a: decodes.append(a[0]) or real(*a))
    second = load_splits(cfg, seed=0)  # a hit: nothing decoded, the same tensors, the same skips
    assert decodes == []
    assert torch.equal(second.train.images, first.train.images) and torch.equal(second.train.labels, first.train.labels)
    assert second.skipped.reasons == first.skipped.reasons != {}
    second.train.images[0] += 1  # copy-on-write: the cached file is not changed ...
    assert torch.equal(load_splits(cfg, seed=0).train.images, first.train.images)  # ... as the next load shows

    # A changed file, an added file: another key, so a fresh decode that sees the change.
    time.sleep(0.01)
    write_image(image_tree / "train" / "cat" / "0.jpg", (0, 0, 255))
    changed = load_splits(cfg, seed=0)
    assert len(decodes) == 1 and not torch.equal(changed.train.images, first.train.images)
    write_image(image_tree / "train" / "cat" / "9.jpg", (200, 30, 30))
    assert len(load_splits(cfg, seed=0).train) == len(first.train) + 1 and len(decodes) == 2
    # Another image size is another entry (train and test: 2 decodes); the cache off decodes every time.
    load_splits(make_cfg(name="imagefolder", root=str(image_tree), cache=True, image_size=4), seed=0)
    assert len(decodes) == 4
    load_splits(make_cfg(name="imagefolder", root=str(image_tree), cache=False), seed=0)
    assert len(decodes) == 6


def test_an_unwritable_decode_cache_warns_and_the_load_goes_on(image_tree, monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(blocker / "cache"))  # under a file: cannot be created
    with pytest.warns(UserWarning, match="could not write the decode cache"):
        splits = load_splits(make_cfg(name="imagefolder", root=str(image_tree), cache=True), seed=0)
    assert len(splits.train) == 12
