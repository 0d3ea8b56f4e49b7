"""One image pipeline: the same photo becomes the same model input on every path (training and
evaluation loaders, in memory and streamed, ``finetune eval``, ``finetune predict``), and the one
decode function's fallbacks and EXIF handling hold for files and bytes, on the CPU and on the
device path."""

from __future__ import annotations

import io
import types

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from timm.models.vision_transformer import VisionTransformer
from typer.testing import CliRunner

import finetune.data.decode as decode_mod
import finetune.models.build as build_mod
from finetune.cli import app
from finetune.data.decode import decode_images, read_image
from finetune.data.load import load_eval_split, load_splits
from finetune.data.loader import BatchLoader
from finetune.data.preprocess import Preprocess
from finetune.errors import DataError
from test_data import make_cfg

# torchvision >= 0.29 deprecates its decoders; the loaders silence that, direct calls here do too.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")
CPU = torch.device("cpu")
SIZE = 24  # the model's input size, and data.image_size: no second resize on the device
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Each photo is its own class, so a label says which photo a batch row is, whatever the shuffle.
PHOTOS = {"jpeg": ("JPEG", 1), "png": ("PNG", 1), "exif3": ("JPEG", 3), "exif6": ("JPEG", 6), "exif8": ("JPEG", 8)}


def photo_bytes(fmt: str, orientation: int, seed: int) -> bytes:
    """A 40x64 (height x width) photo, smooth enough that JPEG keeps it close, with an EXIF
    orientation tag unless it is 1."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (5, 8, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((64, 40), Image.BILINEAR)
    buf = io.BytesIO()
    if orientation == 1:
        image.save(buf, format=fmt)
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        image.save(buf, format=fmt, exif=exif.tobytes(), quality=95)
    return buf.getvalue()


def upright(blob: bytes) -> torch.Tensor:
    """What Pillow shows: the reference picture, ``uint8 (3, H, W)``."""
    with Image.open(io.BytesIO(blob)) as image:
        return torch.from_numpy(np.array(ImageOps.exif_transpose(image).convert("RGB"))).permute(2, 0, 1)


@pytest.fixture
def photos(tmp_path):
    """``root/{train,test}/<name>/0.<ext>``: each photo in both splits; returns (root, {name: path})."""
    root, files = tmp_path / "photos", {}
    for seed, (name, (fmt, orientation)) in enumerate(PHOTOS.items()):
        blob = photo_bytes(fmt, orientation, seed)
        for split in ("train", "test"):
            path = root / split / name / ("0.png" if fmt == "PNG" else "0.jpg")
            path.parent.mkdir(parents=True)
            path.write_bytes(blob)
        files[name] = root / "test" / name / path.name
    return root, files


def tiny_model(classes: list[str]) -> VisionTransformer:
    model = VisionTransformer(img_size=SIZE, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=len(classes))
    model.pretrained_cfg = {"mean": MEAN, "std": STD, "label_names": classes, "input_size": (3, SIZE, SIZE)}
    return model


def by_label(batches) -> dict[int, torch.Tensor]:
    """``{label: image}`` over a loader's batches."""
    rows = {}
    for x, y in batches:
        for image, label in zip(x, y.tolist()):
            rows[label] = image
    return rows


def model_inputs(monkeypatch, model) -> list[torch.Tensor]:
    """Every batch the CLI feeds ``model``, which stands in for whatever it would load."""
    seen: list[torch.Tensor] = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    monkeypatch.setattr(build_mod, "load_model", lambda *args, **kwargs: model)
    return seen


def test_the_same_photo_is_the_same_input_on_every_path(photos, monkeypatch, tmp_path):
    root, files = photos
    classes = sorted(PHOTOS)
    model = tiny_model(classes)
    pre = Preprocess.from_model(model)
    assert pre.size == (SIZE, SIZE) and pre.mean == MEAN and pre.std == STD
    # predict's own preprocessing, photo by photo: the reference every other path must equal.
    expected = {classes.index(name): pre(read_image(path))[0] for name, path in files.items()}

    # The orientation is honoured: the same as Pillow's upright picture through the same steps.
    for name, path in files.items():
        reference = pre(upright(path.read_bytes()))[0]
        assert (expected[classes.index(name)] - reference).abs().max() <= 3 / 255 / min(STD) + 1e-6, name

    def loader(split, **kwargs):
        return BatchLoader(split, batch_size=2, device=CPU, out_size=(SIZE, SIZE), mean=MEAN, std=STD, **kwargs)

    paths = {}
    for in_memory in (True, False):  # decoded into memory, and streamed from the files
        data = load_splits(make_cfg(name="imagefolder", root=str(root), image_size=SIZE, in_memory=in_memory), seed=0)
        train = loader(data.train, train=True, augment=None, drop_last=False)
        train.set_epoch(1)
        paths[f"train loader (in_memory={in_memory})"] = by_label(train)
        paths[f"eval loader (in_memory={in_memory})"] = by_label(loader(data.test, train=False))
    split, _, _ = load_eval_split(make_cfg(name="imagefolder", root=str(root), image_size=SIZE), classes=classes)
    paths["eval loader with the model's Preprocess"] = by_label(BatchLoader(split, batch_size=2, train=False, device=CPU,
                                                                           preprocess=pre))

    seen = model_inputs(monkeypatch, model)
    result = CliRunner().invoke(app, ["eval", str(tmp_path / "model"), "--data", str(root), "--image-size", str(SIZE),
                                      "--batch-size", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    labels = [y for _, y in loader(split, train=False)]
    paths["finetune eval"] = by_label(zip(seen, labels))
    seen.clear()
    names = list(files)
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "model"), *map(str, files.values()), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    paths["finetune predict"] = {classes.index(name): image for name, image in zip(names, torch.cat(seen))}

    for path, images in paths.items():
        assert sorted(images) == sorted(expected), path
        for label, image in images.items():
            assert image.dtype == torch.float32 and image.shape == (3, SIZE, SIZE), path
            assert torch.equal(image, expected[label]), f"{path}: {classes[label]} differs"


def test_preprocess_from_a_recipe_takes_the_recipe_over_the_model():
    model = tiny_model(["a", "b"])
    recipe = types.SimpleNamespace(data=types.SimpleNamespace(mean=(0.5, 0.5, 0.5), std=None, image_size=32),
                                   train=types.SimpleNamespace(channels_last=True))
    pre = Preprocess.from_recipe(recipe, model, dtype=torch.bfloat16)
    assert pre.mean == (0.5, 0.5, 0.5) and pre.std == STD  # data.mean given, data.std from the model
    assert pre.size == (SIZE, SIZE) and pre.load_size == (32, 32)
    assert pre.channels_last and pre.dtype == torch.bfloat16
    batch = pre(torch.zeros(3, 40, 64, dtype=torch.uint8))
    assert batch.shape == (1, 3, SIZE, SIZE) and batch.dtype == torch.bfloat16
    assert batch.is_contiguous(memory_format=torch.channels_last)


def test_a_corrupt_jpeg_in_a_batch_leaves_its_neighbours_decoded(tmp_path):
    good = [photo_bytes("JPEG", orientation, seed) for seed, orientation in enumerate((1, 6))]
    corrupt = good[0][:200] + b"\x00" * 50  # a JPEG header, then garbage: the batched call fails
    alone = [decode_images([blob])[0] for blob in good]
    decoded = decode_images([good[0], corrupt, good[1]], ["a.jpg", "bad.jpg", "c.jpg"], skip_unreadable=True)
    assert decoded[1] is None
    assert torch.equal(decoded[0], alone[0]) and torch.equal(decoded[2], alone[1])
    assert decoded[2].shape == (3, 64, 40)  # orientation 6: stored landscape, shown portrait
    with pytest.raises(DataError, match="bad.jpg cannot be read"):
        decode_images([good[0], corrupt], ["a.jpg", "bad.jpg"])


def test_files_and_bytes_decode_alike_and_bmp_goes_through_pillow(tmp_path):
    bmp = tmp_path / "photo.bmp"
    Image.open(io.BytesIO(photo_bytes("PNG", 1, 0))).save(bmp)
    jpeg = tmp_path / "photo.jpg"
    jpeg.write_bytes(photo_bytes("JPEG", 8, 1))
    from_files = decode_images([str(bmp), str(jpeg)])
    from_bytes = decode_images([bmp.read_bytes(), jpeg.read_bytes()])
    assert all(torch.equal(a, b) for a, b in zip(from_files, from_bytes))
    assert torch.equal(from_files[0], upright(bmp.read_bytes()))  # BMP: lossless, Pillow's pixels exactly
    assert torch.equal(from_files[0], read_image(bmp))
    assert from_files[1].shape == (3, 64, 40)  # orientation 8 applied


def test_the_device_path_decodes_jpegs_in_one_call_on_the_device_and_orients_them(monkeypatch):
    # On a GPU, decode_jpeg(device="cuda") is nvJPEG, which ignores EXIF. Stand in for it on the CPU
    # and check that the device is asked for and that the orientation is applied afterwards.
    real = decode_mod.torchvision.io.decode_jpeg
    calls = []

    def fake_decode_jpeg(blobs, mode, device="cpu"):
        calls.append((len(blobs), str(device)))
        return real(blobs, mode=mode)  # no orientation applied here, as nvJPEG

    monkeypatch.setattr(decode_mod.torchvision.io, "decode_jpeg", fake_decode_jpeg)
    blobs = [photo_bytes("JPEG", orientation, seed) for seed, orientation in enumerate((3, 6, 8))]
    decoded = decode_images(blobs, ["a", "b", "c"], device="cuda")
    assert calls == [(3, "cuda")]
    for blob, image in zip(blobs, decoded):
        assert image.shape == upright(blob).shape
        assert (image.int() - upright(blob).int()).abs().max() <= 3
    unoriented = decode_images(blobs[1:2], device="cuda", exif=False)[0]
    assert unoriented.shape == (3, 40, 64)  # as stored: proof the orientation came from decode_images


def test_predict_resizes_a_photo_as_the_run_stored_its_images(photos, monkeypatch, tmp_path):
    # Images kept at 16 px for a 32 px model: training and evaluation resize twice (to 16 when
    # decoded, to 32 on the device); predict and show must do the same, from summary.json.
    from conftest import REPO_ROOT
    from finetune.runs.folder import stored_size

    root, files = photos
    result = CliRunner().invoke(app, [
        "run", str(REPO_ROOT / "recipes" / "quick_cpu.yaml"), "data.name=imagefolder", f"data.root={root}",
        "data.image_size=16", "model.img_size=32", "data.batch_size=2", "output.plots=false",
        f"output.dir={tmp_path / 'runs'}", "name=stored16", "-q"])
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "runs" / "stored16"
    assert stored_size(run_dir) == (16, 16) and stored_size(run_dir / "model.safetensors") == (16, 16)
    assert stored_size(tmp_path) is None and stored_size(tmp_path / "no_such_model") is None

    real_load = build_mod.load_model
    seen: list[torch.Tensor] = []

    def load_and_watch(*args, **kwargs):
        model = real_load(*args, **kwargs)
        model.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].detach().clone()))
        return model

    monkeypatch.setattr(build_mod, "load_model", load_and_watch)
    names = list(files)
    result = CliRunner().invoke(app, ["predict", str(run_dir), *map(str, files.values()), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    predicted = torch.cat(seen)
    model = real_load(run_dir)
    classes = model.pretrained_cfg["label_names"]
    split, _, _ = load_eval_split(make_cfg(name="imagefolder", root=str(root), image_size=16), classes=classes)
    evaluated = by_label(BatchLoader(split, batch_size=2, train=False, device=CPU, preprocess=Preprocess.from_model(model)))
    assert predicted.shape[-2:] == (32, 32)
    for name, image in zip(names, predicted):
        assert torch.equal(image, evaluated[classes.index(name)]), name
    # finetune eval on the same folder (other data than the run's) brings the photos to the stored
    # size too: its top-1 is the one of predict's inputs.
    with torch.no_grad():
        hits = sum(int(model(x[None]).argmax()) == classes.index(name) for name, x in zip(names, predicted))
    result = CliRunner().invoke(app, ["eval", str(run_dir), "--data", str(root), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert f"top-1 {100 * hits / len(names):.2f}%" in result.output
    # Straight to 32 px (what predict did before the size was recorded) is another input.
    straight = Preprocess.from_model(model, load_size=None)(read_image(files[names[0]]))[0]
    assert not torch.equal(straight, predicted[0])
    # The saved model states the stored size itself (config.json), so a copy of it without the run
    # folder (a hub copy) is preprocessed the same way.
    assert model.pretrained_cfg["stored_size"] == [16, 16]
    copied = tmp_path / "copy"
    copied.mkdir()
    for name in ("config.json", "model.safetensors"):
        (copied / name).write_bytes((run_dir / name).read_bytes())
    seen.clear()
    result = CliRunner().invoke(app, ["predict", str(copied), str(files[names[0]]), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert torch.equal(seen[0][0], predicted[0])
