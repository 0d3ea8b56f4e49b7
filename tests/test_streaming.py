"""The streaming data path (data.in_memory=false, or auto when the decoded set would not fit):
images stay encoded and each batch is decoded by background threads."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

import finetune.data.decode as decode_mod
from conftest import REPO_ROOT
from finetune.cli import app
from finetune.data.load import load_splits
from finetune.data.loader import BatchLoader
from finetune.data.splits import EncodedImages, ImageTensors
from finetune.errors import DataError
from test_data import make_augment, make_cfg

CPU = torch.device("cpu")
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities of TorchVision")


def photo(path: Path, seed: int, size: tuple[int, int]) -> None:
    """A smooth random photo (a colour gradient): small as a JPEG, of any size."""
    rng = np.random.default_rng(seed)
    w, h = size
    corners = rng.integers(0, 256, (2, 2, 3)).astype(np.float32)
    y, x = np.mgrid[0:h, 0:w]
    fy, fx = (y / max(h - 1, 1))[..., None], (x / max(w - 1, 1))[..., None]
    pixels = (corners[0, 0] * (1 - fy) * (1 - fx) + corners[0, 1] * (1 - fy) * fx
              + corners[1, 0] * fy * (1 - fx) + corners[1, 1] * fy * fx)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path, quality=90)


@pytest.fixture
def photos(tmp_path) -> Path:
    """train/ and test/ with three classes of photos of mixed sizes, larger than the model's input."""
    for split, count in (("train", 12), ("test", 4)):
        for c in range(3):
            for i in range(count):
                photo(tmp_path / split / f"class{c}" / f"{i}.jpg", seed=c * 100 + i + (50 if split == "test" else 0),
                      size=(40 + 8 * (i % 3), 36 + 4 * (i % 2)))
    return tmp_path


def loader(split, *, train: bool, augment=None, seed: int = 3) -> BatchLoader:
    return BatchLoader(split, batch_size=8, train=train, device=CPU, out_size=(24, 24), mean=(0.5,) * 3,
                       std=(0.25,) * 3, augment=augment, seed=seed, workers=3)


def test_streaming_gives_the_same_batches_as_memory(photos):
    in_memory = load_splits(make_cfg(name="imagefolder", root=str(photos), image_size=32, in_memory=True), seed=0)
    streamed = load_splits(make_cfg(name="imagefolder", root=str(photos), image_size=32, in_memory=False), seed=0)
    assert isinstance(in_memory.train, ImageTensors) and isinstance(streamed.train, EncodedImages)
    assert torch.equal(streamed.train.labels, in_memory.train.labels) and streamed.classes == in_memory.classes
    augment = make_augment(hflip=True, crop_padding=4)
    for epoch in (1, 2):
        a, b = loader(in_memory.train, train=True, augment=augment), loader(streamed.train, train=True, augment=augment)
        a.set_epoch(epoch), b.set_epoch(epoch)
        pairs = list(zip(a, b))
        assert len(pairs) == 36 // 8
        for (xa, ya), (xb, yb) in pairs:
            assert torch.equal(ya, yb) and torch.equal(xa, xb)
    for (xa, ya), (xb, yb) in zip(loader(in_memory.test, train=False), loader(streamed.test, train=False)):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)
    # Starting part-way through an epoch (a resume) gives the rest of the same batches.
    b = loader(streamed.train, train=True, augment=augment)
    b.set_epoch(2)
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(list(b)[2:], b.iter_from(2)))


def test_random_resized_crops_are_cut_from_the_full_photo(photos):
    streamed = load_splits(make_cfg(name="imagefolder", root=str(photos), in_memory=False), seed=0)
    assert streamed.train.image_size is None  # photos of mixed sizes: no fixed stored size needed
    augment = make_augment(hflip=True, random_resized_crop=True, rrc_scale=(0.3, 1.0))
    first, second = (list(loader(streamed.train, train=True, augment=augment)) for _ in range(2))
    assert [x.shape for x, _ in first] == [torch.Size([8, 3, 24, 24])] * 4
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(first, second))  # the same seed: the same crops
    other = list(loader(streamed.train, train=True, augment=augment, seed=4))
    assert not all(torch.equal(a, b) for (a, _), (b, _) in zip(first, other))
    # Without random resized crops, photos of mixed sizes are resized to the model's size.
    assert [x.shape for x, _ in loader(streamed.test, train=False)] == [torch.Size([8, 3, 24, 24])] + [torch.Size([4, 3, 24, 24])]


def test_auto_streams_only_what_would_not_fit(photos, monkeypatch):
    cfg = make_cfg(name="imagefolder", root=str(photos), image_size=32, in_memory="auto")
    assert isinstance(load_splits(cfg, seed=0).train, ImageTensors)
    monkeypatch.setattr(decode_mod, "host_memory_budget", lambda: 48 * 3 * 32 * 32 - 1)  # one image short
    assert isinstance(load_splits(cfg, seed=0).train, EncodedImages)


def test_an_unreadable_file_met_while_streaming_is_named(photos):
    (photos / "train" / "class1" / "5.jpg").write_bytes(b"\xff\xd8\xff not really")
    streamed = load_splits(make_cfg(name="imagefolder", root=str(photos), image_size=32, in_memory=False), seed=0)
    with pytest.raises(DataError, match=r"class1/5.jpg cannot be read as an image .*in_memory=true"):
        list(loader(streamed.train, train=False))


def test_a_streamed_run_trains_exactly_like_an_in_memory_one(tmp_path, photos):
    runner = CliRunner()
    common = [str(REPO_ROOT / "recipes" / "quick_cpu.yaml"), "data.name=imagefolder", f"data.root={photos}",
              "data.image_size=32", "data.batch_size=6", "train.epochs=2", f"output.dir={tmp_path / 'runs'}",
              "output.plots=false", "-q"]
    for name, mode in (("memory", "true"), ("stream", "false")):
        result = runner.invoke(app, ["run", *common, f"name={name}", f"data.in_memory={mode}"])
        assert result.exit_code == 0, result.output
    a, b = (load_file(tmp_path / "runs" / n / "model.safetensors") for n in ("memory", "stream"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = (json.loads((tmp_path / "runs" / n / "summary.json").read_text()) for n in ("memory", "stream"))
    assert sa["final_acc1"] == sb["final_acc1"] and sa["confusion_matrix"] == sb["confusion_matrix"]


MEMORY_SCRIPT = textwrap.dedent('''
    import json, resource, sys, torch
    from finetune.data.load import load_splits
    from finetune.data.loader import BatchLoader
    from finetune.recipe import DataConfig, AugmentConfig

    cfg = DataConfig(name="imagefolder", root=sys.argv[1], in_memory=False, cache=False)
    splits = load_splits(cfg, seed=0)
    augment = AugmentConfig(random_resized_crop=True)
    loader = BatchLoader(splits.train, batch_size=16, train=True, device=torch.device("cpu"), out_size=(64, 64),
                         mean=(0.5,) * 3, std=(0.5,) * 3, augment=augment, workers=2)
    def resident():  # bytes in memory now (not the peak, which imports may have set)
        return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()

    before, highest, seen = resident(), 0, 0
    for x, _ in loader:
        seen += x.shape[0]
        highest = max(highest, resident())
    json.dump({"seen": seen, "peak_growth": highest - before, "images": len(splits.train)}, open(sys.argv[2], "w"))
''')


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux's /proc to read memory use")
def test_streaming_memory_stays_bounded(tmp_path):
    # 600 photos of 512x512: 472 MB once decoded, 11 MB as JPEGs.
    for i in range(600):
        photo(tmp_path / "data" / "train" / f"c{i % 2}" / f"{i}.jpg", seed=i, size=(512, 512))
    photo(tmp_path / "data" / "test" / "c0" / "0.jpg", seed=0, size=(512, 512))
    script, out = tmp_path / "measure.py", tmp_path / "out.json"
    script.write_text(MEMORY_SCRIPT)
    subprocess.run([sys.executable, str(script), str(tmp_path / "data"), str(out)], check=True, timeout=300,
                   env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    result = json.loads(out.read_text())
    decoded = 600 * 3 * 512 * 512
    assert result["images"] == 600 and result["seen"] == 600 // 16 * 16  # the last partial batch is dropped
    assert result["peak_growth"] < decoded / 4, result  # a few batches at a time, never the whole set (~56 MB here)


def test_batched_device_decoding_matches_one_by_one(photos):
    # The path a GPU takes (one decode_jpeg call for the batch's JPEGs, other formats on the CPU),
    # run here on the CPU device: the same pixels as decoding each file alone.
    from finetune.data.decode import decode_bytes as _decode_bytes, decode_images

    files = sorted((photos / "train" / "class0").glob("*.jpg"))[:4]
    png = photos / "extra.png"
    Image.open(files[0]).save(png)
    blobs = [f.read_bytes() for f in files] + [png.read_bytes()]
    names = [str(f) for f in files] + [str(png)]
    decoded = decode_images(blobs, names, device=CPU)
    expected = [_decode_bytes(b, n) for b, n in zip(blobs, names)]
    assert all(torch.equal(a, b) for a, b in zip(decoded, expected))
    with pytest.raises(DataError, match="extra.png cannot be read"):
        decode_images(blobs[:1] + [b"not an image"], names[:1] + [str(png)], device=CPU)


def test_the_data_benchmark_measures_each_path(photos):
    import importlib.util

    spec = importlib.util.spec_from_file_location("data_throughput", REPO_ROOT / "benchmarks" / "data_throughput.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    streamed = load_splits(make_cfg(name="imagefolder", root=str(photos), in_memory=False), seed=0)
    memory = load_splits(make_cfg(name="imagefolder", root=str(photos), image_size=32, in_memory=True), seed=0)
    common = dict(device=CPU, out=24, batch=8, batches=2, workers=2)
    for split, rrc in ((memory.train, False), (streamed.train, False), (streamed.train, True)):
        assert bench.throughput(split, rrc=rrc, **common) > 0
