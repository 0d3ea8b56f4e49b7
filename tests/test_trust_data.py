"""Data that finetune is handed is checked, not believed ("Trust, round 3"): links into the other
split, macOS archive debris, empty classes, a tampered or stale decode cache, Hugging Face labels
and cells that do not fit, file names that are not UTF-8, EXIF orientation on every decode path,
and sizes that memory cannot hold. Each case is a row of docs/robustness.md.

Everything is offline and small: tiny images written in tmp_path, each test well under a second
or two on a CPU.
"""

from __future__ import annotations

import io
import json
import os
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from typer.testing import CliRunner

import finetune.data.memory as memory_mod
from conftest import REPO_ROOT
from finetune.data import cache as decode_cache
from finetune.cli import app
from finetune.data.decode import _decode_chunk, decode_bytes as _decode_bytes, decode_images, exif_orientation
from finetune.data.load import load_splits
from finetune.data.loader import BatchLoader
from finetune.errors import DataError
from test_data import make_cfg

CPU = torch.device("cpu")
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities of TorchVision")
COLOURS = {"cat": (200, 30, 30), "dog": (30, 200, 30)}
TEST_COLOURS = {"cat": (250, 250, 0), "dog": (0, 250, 250)}  # unlike any train image, to see a leak


def write_image(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (8, 8)) -> None:
    """A solid-colour image, losslessly stored (PNG, BMP: the format follows the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


@pytest.fixture
def tree(tmp_path) -> Path:
    """train/{cat,dog} with three PNGs each, test/{cat,dog} with one each, in other colours."""
    for cls in COLOURS:
        for i in range(3):
            write_image(tmp_path / "train" / cls / f"{i}.png", COLOURS[cls])
        write_image(tmp_path / "test" / cls / "0.png", TEST_COLOURS[cls])
    return tmp_path


def folder_cfg(root: Path, **overrides):
    return make_cfg(name="imagefolder", root=str(root), **overrides)


def colours_of(images: torch.Tensor) -> set[tuple[int, ...]]:
    return {tuple(image[:, 0, 0].tolist()) for image in images}


# ---- 1. file links into the other split ----------------------------------------------------------


def test_a_file_link_from_train_into_test_is_not_followed(tree):
    os.symlink("../../test/cat/0.png", tree / "train" / "cat" / "x.png")  # as in the issue: relative
    os.symlink(tree / "train" / "dog" / "0.png", tree / "test" / "dog" / "y.png")  # and test -> train
    splits = load_splits(folder_cfg(tree), seed=0)
    assert len(splits.train) == 6 and len(splits.test) == 2
    assert not colours_of(splits.train.images) & set(TEST_COLOURS.values())  # no test image trained on
    assert splits.skipped.reasons == {"link to a file in the dataset's other split": [
        str(tree / "train" / "cat" / "x.png"), str(tree / "test" / "dog" / "y.png")]}


# ---- 2. macOS debris, empty classes --------------------------------------------------------------

APPLEDOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        "  # the start of a real ._ file


def test_macos_metadata_is_neither_a_class_nor_an_image_and_is_counted(tree):
    write_image(tree / "train" / "__MACOSX" / "cat" / "0.png", (0, 0, 0))  # a zip made on a Mac
    (tree / "train" / "__MACOSX" / "cat" / "._0.png").write_bytes(APPLEDOUBLE)
    (tree / "train" / "._cat").write_bytes(APPLEDOUBLE)
    (tree / "train" / "cat" / "._0.png").write_bytes(APPLEDOUBLE)
    write_image(tree / "train" / "dog" / "__MACOSX" / "1.png", (0, 0, 0))
    splits = load_splits(folder_cfg(tree), seed=0)
    assert splits.classes == ["cat", "dog"] and len(splits.train) == 6
    assert colours_of(splits.train.images) == set(COLOURS.values())
    reason = "macOS metadata (__MACOSX, ._*)"
    assert set(splits.skipped.reasons) == {reason}
    assert sorted(splits.skipped.reasons[reason]) == sorted(str(tree / "train" / p) for p in (
        "__MACOSX", "._cat", "cat/._0.png", "dog/__MACOSX"))
    assert "4 macOS metadata" in splits.skipped.describe()


@pytest.mark.parametrize("content", ["nothing", "no image files", "only unreadable images"])
def test_an_empty_class_folder_is_refused_by_name(tree, content):
    bird = tree / "train" / "bird"
    bird.mkdir()
    if content == "no image files":
        (bird / "notes.txt").write_text("to do: find birds")
        (bird / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    elif content == "only unreadable images":
        (bird / "0.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError) as info:
        load_splits(folder_cfg(tree), seed=0)
    message = " ".join(str(info.value).split())
    assert f"The class folder {bird} holds no" in message and "Remove the folder" in message, message
    # A run that leaves the class out (data.classes) does not need it.
    assert load_splits(folder_cfg(tree, classes=("cat", "dog")), seed=0).classes == ["cat", "dog"]


# ---- 3. the decode cache -------------------------------------------------------------------------


def entry_files() -> list[Path]:
    return sorted((decode_cache.cache_dir() / "decoded").iterdir())


def test_an_image_replaced_with_its_old_mtime_is_not_served_stale(tree):
    cfg = folder_cfg(tree, cache=True)
    path = tree / "train" / "cat" / "0.bmp"  # BMP: another colour, the same number of bytes
    write_image(path, (1, 2, 3))
    first = load_splits(cfg, seed=0)
    before = path.stat()
    time.sleep(0.02)  # past the file system's timestamp granularity
    write_image(path, (9, 8, 7))  # rewritten in place: the same inode
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # the old mtime put back
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)
    second = load_splits(cfg, seed=0)
    assert (9, 8, 7) in colours_of(second.train.images) and (1, 2, 3) not in colours_of(second.train.images)
    assert (1, 2, 3) in colours_of(first.train.images)


@pytest.mark.parametrize("damage", ["flip", "zero", "cut"])
def test_a_damaged_decode_cache_entry_is_rebuilt_not_trained_on(tree, damage, recwarn):
    cfg = folder_cfg(tree, cache=True)
    fresh = load_splits(cfg, seed=0)
    for npy in [p for p in entry_files() if p.suffix == ".npy"]:
        data = bytearray(npy.read_bytes())
        if damage == "flip":
            data[-5] ^= 0x10
        elif damage == "zero":
            data[-40:] = bytes(40)
        else:
            del data[-7:]
        npy.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=r"decode cache entry .* is damaged .*; decoding the images again"):
        again = load_splits(cfg, seed=0)
    assert torch.equal(again.train.images, fresh.train.images) and torch.equal(again.test.images, fresh.test.images)
    recwarn.clear()
    assert torch.equal(load_splits(cfg, seed=0).train.images, fresh.train.images)  # rebuilt: a clean hit
    assert not [w for w in recwarn if "decode cache" in str(w.message)]


def _shift_kept(info):  # pairs every image after the unreadable one with the previous file's label
    info["kept"] = list(range(len(info["kept"])))


EDITS = {
    "not JSON": lambda text: "{not json",
    "a list": lambda text: "[]",
    "nested 3000 deep": lambda text: "[" * 3000,
    "kept as strings": lambda info: info.update(kept=[str(k) for k in info["kept"]]),
    "an extra entry": lambda info: info.update(kept=info["kept"] + [info["inputs"]]),
    "an index out of range": lambda info: info.update(kept=info["kept"][:-1] + [10**6]),
    "another number of inputs": lambda info: info.update(inputs=info["inputs"] + 1),
    "a wrong shape": lambda info: info.update(shape=[1, 2, 3]),
    "a path as a skipped file": lambda info: info.update(unreadable=["/etc/passwd"]),
    "images paired with other files": _shift_kept,
    "a null checksum": lambda info: info.update(crc32=None),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_an_edited_decode_cache_index_is_rebuilt_never_believed(tree, edit):
    (tree / "train" / "cat" / "1.png").write_bytes(b"not a png")  # so the kept indices skip one
    cfg = folder_cfg(tree, cache=True)
    fresh = load_splits(cfg, seed=0)
    for meta in [p for p in entry_files() if p.suffix == ".json"]:
        change = EDITS[edit]
        if change.__code__.co_varnames[:1] == ("text",):
            meta.write_text(change(meta.read_text()))
        else:
            info = json.loads(meta.read_text())
            change(info)
            meta.write_text(json.dumps(info))
    with pytest.warns(UserWarning, match="decode cache entry .* is damaged"):
        again = load_splits(cfg, seed=0)
    assert torch.equal(again.train.images, fresh.train.images) and torch.equal(again.train.labels, fresh.train.labels)
    assert again.skipped.reasons == fresh.skipped.reasons == {"unreadable image": [str(tree / "train" / "cat" / "1.png")]}


def test_random_damage_to_a_decode_cache_entry_never_escapes():
    # Bytes changed at random in the .npy header or the index: always a rebuild with the right
    # images, never an exception (numpy's header parser alone raises ValueError, SyntaxError or
    # tokenize.TokenError).
    images = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    decode = lambda: (images.clone(), [0, 1, 2, 4, 5])  # noqa: E731 - input 3 was unreadable
    decode_cache.cached("k", 6, decode)
    files = {path: path.read_bytes() for path in entry_files()}
    rng = np.random.default_rng(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for trial in range(400):
            path, original = list(files.items())[trial % 2]
            data = bytearray(original)
            for at in rng.integers(0, min(len(data), 200), rng.integers(1, 5)):
                data[at] = rng.integers(0, 256)
            path.write_bytes(bytes(data))
            got, kept = decode_cache.cached("k", 6, decode)
            assert torch.equal(got, images) and kept == [0, 1, 2, 4, 5]


def hf_available():
    return pytest.importorskip("datasets")


def png_bytes(colour, size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def save_hf(tmp_path: Path, splits: dict[str, dict], features: dict | None = None) -> Path:
    """A save_to_disk folder with the given columns per split (images as PNG bytes or None)."""
    datasets = hf_available()
    parts = {}
    for name, columns in splits.items():
        feats = datasets.Features(features[name] if features and name in features else {
            key: datasets.Image() if key.startswith("img") else datasets.Value("int64") for key in columns})
        rows = {key: [{"bytes": v, "path": None} if key.startswith("img") and v is not None else v for v in values]
                for key, values in columns.items()}
        parts[name] = datasets.Dataset.from_dict(rows, features=feats)
    path = tmp_path / "ds"
    datasets.DatasetDict(parts).save_to_disk(str(path))
    return path


def hf_cfg(path: Path, **overrides):
    fields = dict(name="hf", path=str(path), image_column=None, label_column="label", cache=True)
    fields.update(overrides)
    return make_cfg(**fields)


def test_the_decode_cache_key_covers_the_hf_image_column(tmp_path):
    red, blue = png_bytes((200, 0, 0)), png_bytes((0, 0, 200))
    split = {"img_a": [red] * 4, "img_b": [blue] * 4, "label": [0, 1, 0, 1]}
    path = save_hf(tmp_path, {"train": split, "test": split})
    a = load_splits(hf_cfg(path, image_column="img_a"), seed=0)
    b = load_splits(hf_cfg(path, image_column="img_b"), seed=0)  # used to be served column a's images
    assert colours_of(a.train.images) == {(200, 0, 0)} and colours_of(b.train.images) == {(0, 0, 200)}


# ---- 4. Hugging Face labels and cells ------------------------------------------------------------


@pytest.mark.parametrize("case", ["-1 in train", "test label >= classes", "test label train lacks"])
def test_hf_labels_outside_the_classes_are_refused_when_loaded(tmp_path, case):
    datasets = hf_available()
    img = [png_bytes((100, 100, 100))] * 4
    if case == "-1 in train":
        names = datasets.ClassLabel(names=["cat", "dog"])
        features = {s: {"img": datasets.Image(), "label": names} for s in ("train", "test")}
        splits = {"train": {"img": img, "label": [0, 1, -1, 1]}, "test": {"img": img, "label": [0, 1, 0, 1]}}
        expected = ["train split has 1 row", "train[2] has label -1", "no label"]
    elif case == "test label >= classes":
        splits = {"train": {"img": img, "label": [0, 1, 0, 1]}, "test": {"img": img, "label": [0, 1, 2, 7]}}
        features, expected = None, ["test split has 2 rows", "test[2] has label 2", "the train split has 2 classes"]
    else:  # the test split's ClassLabel has a class the train split's lacks
        features = {"train": {"img": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"])},
                    "test": {"img": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog", "emu"])}}
        splits = {"train": {"img": img, "label": [0, 1, 0, 1]}, "test": {"img": img, "label": [0, 2, 0, 1]}}
        expected = ["test split has 1 row of classes the train split lacks", "test[1] is 'emu'"]
    path = save_hf(tmp_path, splits, features)
    with pytest.raises(DataError) as info:
        load_splits(hf_cfg(path), seed=0)
    message = " ".join(str(info.value).split())
    assert all(phrase in message for phrase in expected), message


def test_hf_test_classes_are_matched_to_train_classes_by_name(tmp_path):
    datasets = hf_available()
    colours = {"cat": (200, 0, 0), "dog": (0, 200, 0)}
    features = {"train": {"img": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"])},
                "test": {"img": datasets.Image(), "label": datasets.ClassLabel(names=["dog", "cat"])}}
    splits = {"train": {"img": [png_bytes(colours[c]) for c in ("cat", "dog")], "label": [0, 1]},
              "test": {"img": [png_bytes(colours[c]) for c in ("cat", "dog")], "label": [1, 0]}}
    loaded = load_splits(hf_cfg(load_path := save_hf(tmp_path, splits, features)), seed=0)
    assert loaded.classes == ["cat", "dog"] and loaded.test.labels.tolist() == [0, 1], load_path


def test_an_hf_image_cell_holding_none_is_named(tmp_path):
    img = [png_bytes((100, 100, 100))] * 4
    path = save_hf(tmp_path, {"train": {"img": img[:2] + [None] + img[:1], "label": [0, 1, 0, 1]},
                              "test": {"img": img, "label": [0, 1, 0, 1]}})
    for in_memory in (True, False):
        with pytest.raises(DataError) as info:
            load_splits(hf_cfg(path, in_memory=in_memory), seed=0)
        message = " ".join(str(info.value).split())
        assert "train split has 1 row with no image in the column 'img' (e.g. train[2])" in message, message


# ---- 5. file names that are not UTF-8 ------------------------------------------------------------


def test_a_file_name_that_is_not_utf8_is_read_cached_and_printable(tree):
    write_image(tree / "train" / "cat" / os.fsdecode(b"\xff.png"), (1, 2, 3))
    (tree / "train" / "cat" / os.fsdecode(b"\xfe.jpg")).write_bytes(b"not a jpeg")
    cfg = folder_cfg(tree, cache=True)
    first = load_splits(cfg, seed=0)
    second = load_splits(cfg, seed=0)  # from the cache
    assert len(first.train) == 7 and (1, 2, 3) in colours_of(first.train.images)
    assert torch.equal(first.train.images, second.train.images)
    shown = str(tree / "train" / "cat") + "/\\xfe.jpg"
    assert second.skipped.reasons == {"unreadable image": [shown]}
    json.dumps(second.skipped.to_dict(), ensure_ascii=False).encode("utf-8")  # summary.json can hold it
    second.skipped.describe().encode("utf-8")  # and the warning can be printed


# ---- 6. EXIF orientation -------------------------------------------------------------------------


def oriented(fmt: str, orientation: int, size: tuple[int, int] = (24, 16)) -> bytes:
    """An image of 8x8 blocks in distinct colours (so JPEG keeps them), stored with an EXIF
    orientation: a reader that ignores it returns a turned or mirrored picture."""
    width, height = size
    rng = np.random.default_rng(orientation)
    blocks = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
    pixels = blocks.repeat(8, 0).repeat(8, 1)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    options = {"JPEG": dict(quality=100, subsampling=0), "WEBP": dict(lossless=True), "PNG": {}}[fmt]
    Image.fromarray(pixels).save(buf, fmt, exif=exif.tobytes(), **options)
    return buf.getvalue()


def upright(blob: bytes) -> torch.Tensor:
    """What Pillow shows: the reference."""
    with Image.open(io.BytesIO(blob)) as image:
        return torch.from_numpy(np.array(ImageOps.exif_transpose(image).convert("RGB"))).permute(2, 0, 1)


def assert_same_picture(got: torch.Tensor, expected: torch.Tensor, fmt: str) -> None:
    assert got.shape == expected.shape, (got.shape, expected.shape)
    tolerance = 3 if fmt == "JPEG" else 0  # two JPEG decoders may round differently
    assert (got.cpu().int() - expected.int()).abs().max() <= tolerance


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_exif_orientation_is_applied_for_every_format_on_every_decode_path(fmt):
    for orientation in range(1, 9):
        blob = oriented(fmt, orientation)
        assert exif_orientation(blob) == orientation
        expected = upright(blob)
        assert_same_picture(_decode_bytes(blob, "x"), expected, fmt)  # one image (predict, streaming on a CPU)
        assert_same_picture(_decode_chunk([blob], None)[0], expected, fmt)  # in-memory folders (batched JPEGs)
        # The GPU path's logic (batched decode_jpeg on the device, orientation read on the CPU),
        # run on the CPU device.
        assert_same_picture(decode_images([blob], ["x"], device=CPU)[0], expected, fmt)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (nvJPEG)")
def test_exif_orientation_is_applied_by_the_gpu_decoder():
    for orientation in range(1, 9):
        blob = oriented("JPEG", orientation)
        assert_same_picture(decode_images([blob], ["x"], device=torch.device("cuda"))[0], upright(blob), "JPEG")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_folders_are_upright_in_memory_and_streamed(tmp_path, fmt):
    suffix = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp"}[fmt]
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            (tmp_path / split / cls / f"0{suffix}").write_bytes(oriented(fmt, 6, size=(16, 16)))
    expected = upright(oriented(fmt, 6, size=(16, 16)))
    memory = load_splits(folder_cfg(tmp_path, in_memory=True), seed=0)
    assert_same_picture(memory.train.images[0], expected, fmt)
    streamed = load_splits(folder_cfg(tmp_path, in_memory=False), seed=0)
    loader = BatchLoader(streamed.train, batch_size=2, train=False, device=CPU, out_size=(16, 16),
                         mean=(0, 0, 0), std=(1 / 255, 1 / 255, 1 / 255), workers=1)
    x, _ = next(iter(loader))
    assert_same_picture(x[0].round().to(torch.uint8), expected, fmt)


def test_exif_orientation_reader_never_fails_on_damaged_bytes():
    for fmt in ("JPEG", "PNG", "WEBP"):
        blob = oriented(fmt, 6)
        for cut in range(0, 200, 3):
            assert 1 <= exif_orientation(blob[:cut]) <= 8
        for at in range(0, 120):
            flipped = bytearray(blob)
            flipped[at] ^= 0xFF
            assert 1 <= exif_orientation(bytes(flipped)) <= 8


# ---- 7. sizes memory cannot hold -----------------------------------------------------------------


def test_synthetic_sizes_beyond_memory_are_refused_before_allocating():
    start = time.perf_counter()
    with pytest.raises(DataError) as info:
        load_splits(make_cfg(synthetic_train=100_000_000, synthetic_size=32), seed=0)
    assert time.perf_counter() - start < 1.0
    message = " ".join(str(info.value).split())
    assert "data.synthetic_train=100000000" in message and "307 GB of memory" in message, message
    assert "Lower data.synthetic_train" in message


def test_every_decoded_allocation_is_checked_against_memory(tree, monkeypatch):
    # 16 + 8 synthetic images of 8x8 fit in 150 kB (with their work space); resizing them to 64x64 does not.
    monkeypatch.setattr(memory_mod, "available_memory", lambda: 150_000)
    with pytest.raises(DataError, match="Resizing 16 images to 64x64.*Lower data.image_size"):
        load_splits(make_cfg(synthetic_train=16, synthetic_test=8, synthetic_size=8, image_size=64), seed=0)
    monkeypatch.setattr(memory_mod, "available_memory", lambda: 1000)  # six 8x8 images need 1,152 bytes
    with pytest.raises(DataError, match="Decoding 6 images of 8x8.*data.in_memory=auto"):
        load_splits(folder_cfg(tree, in_memory=True), seed=0)


def test_a_huge_synthetic_dataset_is_a_message_from_the_command_line(tmp_path):
    result = CliRunner().invoke(app, ["run", str(REPO_ROOT / "recipes" / "quick_cpu.yaml"),
                                      "data.synthetic_train=100000000", f"output.dir={tmp_path}", "-q"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    text = " ".join(result.output.split())
    assert text.startswith("error:") and "GB of memory" in text and "Traceback" not in text, text
