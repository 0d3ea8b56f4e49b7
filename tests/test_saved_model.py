"""The model that leaves a run is the model that was measured (issue 27): its config.json states
the preprocessing evaluation used, plain timm (in a fresh process, without finetune) and
transformers' timm wrapper load it, and both, preprocessing as config.json says, agree with finetune
on real CIFAR-10 JPEGs. Also: what the card says about the data, and transformers repositories'
preprocessor_config.json.

The runs are tiny (one epoch on 180 real images, checked on 120); what is checked is agreement image by image, so
they need not be accurate, only not constant.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import textwrap
import warnings
from pathlib import Path

import pytest
import timm
import torch

from conftest import DEIT_TINY_CONFIG, HUB_REVISION, REPO_ROOT, SHARED_DATA, write_hub_cache
from finetune import load_model, save_model
from finetune.data.decode import read_image
from finetune.data.preprocess import Preprocess
from finetune.errors import CheckpointError
from finetune.recipe import load_recipe
from finetune.runs.run import run

CIFAR_TAR = SHARED_DATA / "cifar10-jpeg.tar.gz"
CLASSES = ("cat", "ship", "truck")
QUICK = REPO_ROOT / "recipes" / "quick_cpu.yaml"
needs_cifar = pytest.mark.skipif(not CIFAR_TAR.exists(), reason=f"{CIFAR_TAR} not present")


def extract_cifar(root: Path, train: int = 60, test: int = 40) -> Path:
    """``root/train/<class>/`` and ``root/test/<class>/`` with the first real JPEGs of CLASSES."""
    wanted = {f"{split}/{c}/{i:04d}.jpg" for c in CLASSES for split, n in (("train", train), ("test", test))
              for i in range(n)}
    with tarfile.open(CIFAR_TAR) as tar:
        for member in tar:
            if member.name in wanted:
                target = root / member.name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())
                wanted.discard(member.name)
                if not wanted:
                    break
    return root


def deit_source(folder: Path) -> Path:
    """A DeiT-tiny in the hub's folder layout (config.json as timm publishes it, 224 px, bicubic,
    crop_pct 0.875) with random weights, standing in for the ImageNet checkpoint."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(DEIT_TINY_CONFIG))
    from safetensors.torch import save_file

    torch.manual_seed(3)  # timm's own initialisation: LayerNorm weights at one, so outputs are not flat
    save_file(timm.create_model("deit_tiny_patch16_224").state_dict(), str(folder / "model.safetensors"))
    return folder


def transformers_source(folder: Path) -> Path | None:
    try:
        import transformers
    except ImportError:
        return None
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                    image_size=32, patch_size=8, num_labels=4)
    transformers.ViTForImageClassification(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(a) DeiT source at 64 px on 32-px images, (b) a transformers ViT folder, (c) vit_lab from
    scratch, (d) LoRA on (a)'s source; each trained one epoch on the real JPEGs."""
    if not CIFAR_TAR.exists():
        pytest.skip(f"{CIFAR_TAR} not present")
    root = tmp_path_factory.mktemp("saved")
    data = extract_cifar(root / "cifar")
    deit = deit_source(root / "deit")
    common = ["data.name=imagefolder", f"data.root={data}", "data.cache=false", "train.epochs=1",
              "train.precision=fp32", "output.plots=false", f"output.dir={root / 'runs'}", "data.batch_size=32",
              "optim.lr=3e-4"]
    variants = {
        "deit64": [f"model.source={deit}", "model.arch=null", "model.img_size=64", "train.mode=full"],
        "lab": ["model.arch=vit_lab", "model.source=null", "train.mode=scratch"],
        "lora": [f"model.source={deit}", "model.arch=null", "model.img_size=64", "train.mode=lora"],
    }
    hf = transformers_source(root / "hf")
    if hf is not None:
        variants["hf"] = [f"model.source={hf}", "model.arch=null", "train.mode=full"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FINETUNE_CACHE_DIR", str(root / "cache"))
        for name, settings in variants.items():
            run(load_recipe(QUICK, [*common, *settings, f"name={name}"]), quiet=True)
    return {name: root / "runs" / name for name in variants}, data


PLAIN_TIMM = textwrap.dedent('''
    import json, sys
    import timm, torch, torchvision.transforms as T
    from PIL import Image

    folder, paths = sys.argv[1], json.loads(sys.stdin.read())
    model = timm.create_model("local-dir:" + folder, pretrained=True).eval()
    config = timm.data.resolve_data_config(model=model)
    transform = timm.data.create_transform(**config)
    with open(folder + "/config.json") as f:
        stored = json.load(f).get("stored_size")  # finetune's key beside pretrained_cfg
    inputs = []
    for path in paths:
        image = Image.open(path).convert("RGB")
        if stored:  # as the model card shows: the stored size first
            resample = T.InterpolationMode(config["interpolation"])
            image = T.CenterCrop(stored)(T.Resize(min(stored), interpolation=resample)(image))
        inputs.append(transform(image))
    with torch.no_grad():
        predictions = model(torch.stack(inputs)).argmax(-1).tolist()
    assert not any(m == "finetune" or m.startswith("finetune.") for m in sys.modules), "finetune was imported"
    print(json.dumps({"predictions": predictions, "config": config}))
''')


def plain_timm_predictions(run_dir: Path, paths: list[Path]) -> tuple[list[int], dict]:
    """Top-1 of each image by timm alone, in a fresh Python that never imports finetune."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing of the checkout on the path
    done = subprocess.run([sys.executable, "-c", PLAIN_TIMM, str(run_dir)], input=json.dumps([str(p) for p in paths]),
                          capture_output=True, text=True, env=env, cwd=run_dir, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    return out["predictions"], out["config"]


def finetune_predictions(run_dir: Path, paths: list[Path]) -> list[int]:
    """Top-1 of each image as `finetune predict` makes it (config.json's preprocessing)."""
    model = load_model(run_dir).eval()
    pre = Preprocess.from_model(model)
    with torch.no_grad():
        return model(pre([read_image(p) for p in paths])).argmax(-1).tolist()


@needs_cifar
@pytest.mark.parametrize("name", ["deit64", "hf", "lab", "lora"])
def test_plain_timm_preprocessing_as_config_json_says_agrees_with_finetune(runs, name):
    folders, data = runs
    if name not in folders:
        pytest.skip("transformers is not installed")
    run_dir = folders[name]
    config = json.loads((run_dir / "config.json").read_text())
    cfg = config["pretrained_cfg"]
    # What evaluation did, stated once: the model's size, bilinear, no extra crop, the run's statistics.
    size = 64 if name in ("deit64", "lora") else 32
    assert (cfg["input_size"], cfg["interpolation"], cfg["crop_pct"], cfg["crop_mode"]) == ([3, size, size], "bilinear",
                                                                                           1.0, "center")
    assert "stored_size" not in cfg  # timm refuses keys it does not know inside pretrained_cfg
    assert config.get("stored_size") == ([32, 32] if size == 64 else None)
    assert config["label_names"] == sorted(CLASSES) and "norm_eps" not in config["model_args"]
    paths = sorted((data / "test").rglob("*.jpg"))
    expected = finetune_predictions(run_dir, paths)
    got, timm_config = plain_timm_predictions(run_dir, paths)
    assert timm_config["crop_pct"] == 1.0 and timm_config["interpolation"] == "bilinear"
    assert len(set(expected)) > 1, "a constant model would agree by accident"
    agree = sum(a == b for a, b in zip(expected, got)) / len(paths)
    assert agree >= 0.99, f"{name}: plain timm agrees with finetune on {agree:.1%} of {len(paths)} images"
    # finetune eval scores the same images the same way: its accuracy is the per-image one.
    summary = json.loads((run_dir / "summary.json").read_text())
    labels = [sorted(CLASSES).index(p.parent.name) for p in paths]
    assert summary["final_acc1"] == pytest.approx(sum(e == y for e, y in zip(expected, labels)) / len(paths))


@needs_cifar
@pytest.mark.parametrize("name", ["lab", "deit64", "hf", "lora"])
def test_transformers_pipeline_loads_a_saved_run_and_agrees(runs, name):
    transformers = pytest.importorskip("transformers")
    folders, data = runs
    if name not in folders:
        pytest.skip("transformers is not installed")
    paths = sorted((data / "test").rglob("*.jpg"))
    expected = finetune_predictions(folders[name], paths)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        classify = transformers.pipeline("image-classification", model=str(folders[name]), device="cpu")
        if name in ("deit64", "lora"):  # stored at 32 px, input 64: the card's step first, as for plain timm
            from PIL import Image

            images = [Image.open(p).convert("RGB") for p in paths]  # already 32 px: the step is a no-op
        else:
            images = [str(p) for p in paths]
        got = [out[0]["label"] for out in classify(images, top_k=1)]
    names = sorted(CLASSES)
    agree = sum(names[e] == g for e, g in zip(expected, got)) / len(paths)
    assert agree >= 0.99, f"{name}: the transformers pipeline agrees with finetune on {agree:.1%}"


@needs_cifar
def test_the_cards_how_to_use_code_runs_as_written(runs, tmp_path):
    folders, data = runs
    card = (folders["deit64"] / "README.md").read_text()
    code = card.split("## How to use")[1].split("```python\n")[1].split("```")[0]
    assert "stored = [32, 32]" in code and "import finetune" not in code
    photo = sorted((data / "test").rglob("*.jpg"))[0]
    code = code.replace("hf-hub:REPO_ID", f"local-dir:{folders['deit64']}").replace("photo.jpg", str(photo))
    script = tmp_path / "card.py"
    script.write_text(code + "\nimport sys\nassert 'finetune' not in sys.modules\nprint(int(probs.argmax()))\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.split()[-1]) == finetune_predictions(folders["deit64"], [photo])[0]


@needs_cifar
def test_the_card_states_the_data_used_and_this_runs_figure(runs):
    folders, _ = runs
    card = (folders["deit64"] / "README.md").read_text()
    summary = json.loads((folders["deit64"] / "summary.json").read_text())
    intro = card.split("## Results")[0]
    assert f"{100 * summary['final_acc1']:.2f}% test top-1" in intro
    assert "best in 30 minutes" not in intro and "toy ViT" not in intro  # the recipe's tagline is not this run


def test_a_card_names_the_classes_and_the_subset_a_run_used(tmp_path):
    recipe = load_recipe(QUICK, [f"output.dir={tmp_path}", "name=sub", "data.synthetic_classes=6",
                                 "data.classes=[class_0, class_3]", "data.train_subset=40", "data.synthetic_train=200",
                                 "output.plots=false", "data.batch_size=8", "train.epochs=1"])
    run(recipe, quiet=True)
    card = (tmp_path / "sub" / "README.md").read_text()
    front = card.split("---")[1]
    assert "2 of its classes (class_0, class_3)" in card and "a random subset of 40 training images" in card
    assert "2 of its classes" in front  # the hub's model-index names the data the figure is on


def test_presets_are_saved_under_a_timm_name_plain_timm_builds(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("vit_cifar_xs", num_classes=5).eval()
    folder = save_model(model, tmp_path / "xs")
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224"
    assert config["model_args"]["embed_dim"] == 128 and config["model_args"]["depth"] == 6
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_model(folder).eval()(x), model(x))
        by_timm = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
        assert torch.equal(by_timm(x), model(x))
    # A conv tokenizer needs finetune's code: it keeps its own name, and the card says so.
    conv = save_model(timm.create_model("vit_cifar_conv", num_classes=5), tmp_path / "conv")
    assert json.loads((conv / "config.json").read_text())["architecture"] == "vit_cifar_conv"


# --- transformers repositories' preprocessor_config.json -------------------------------------


def transformers_repo(cache: Path, preprocessor: dict | None) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                                    image_size=32, patch_size=8, num_labels=3)
    folder = cache.parent / "hf-src"
    transformers.ViTForImageClassification(config).save_pretrained(folder)
    from safetensors.torch import load_file

    snapshot = write_hub_cache(cache, "someone/vit-cifar", json.loads((folder / "config.json").read_text()),
                               load_file(folder / "model.safetensors"))
    if preprocessor is not None:
        (snapshot / "preprocessor_config.json").write_text(json.dumps(preprocessor))


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_a_hub_transformers_repo_brings_its_preprocessor_config(offline_hub):
    transformers_repo(offline_hub, {"image_mean": [0.4, 0.4, 0.4], "image_std": [0.2, 0.2, 0.2], "resample": 3})
    model = load_model("hf-hub:someone/vit-cifar", cache_dir=offline_hub)
    assert (model.pretrained_cfg["mean"], model.pretrained_cfg["interpolation"]) == ((0.4, 0.4, 0.4), "bicubic")


def test_a_hub_transformers_repo_without_its_preprocessor_offline_says_so(offline_hub):
    transformers_repo(offline_hub, None)
    with pytest.warns(UserWarning, match="preprocessor_config.json is not in the local hub cache.*default mean"):
        model = load_model("hf-hub:someone/vit-cifar", cache_dir=offline_hub)
    assert model.pretrained_cfg["mean"] == (0.5, 0.5, 0.5)
    # Cached as absent from the repository (the hub said so once): its defaults, without a warning.
    no_exist = offline_hub / "models--someone--vit-cifar" / ".no_exist" / HUB_REVISION
    no_exist.mkdir(parents=True)
    (no_exist / "preprocessor_config.json").touch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_model("hf-hub:someone/vit-cifar", cache_dir=offline_hub)


@pytest.mark.parametrize("preprocessor, message", [
    ({"image_mean": [0.5, 0.5]}, r"image_mean=\[0.5, 0.5\] should be 3 numbers"),
    ({"image_std": [0.5, 0.0, 0.5]}, "image_std=.* should be positive"),
    ({"image_mean": "imagenet"}, "image_mean='imagenet' should be 3 numbers"),
    ({"resample": "lanczos"}, "resample='lanczos' should be one of PIL's resampling filters"),
])
def test_bad_processor_values_are_refused_by_name(offline_hub, preprocessor, message):
    transformers_repo(offline_hub, preprocessor)
    with pytest.raises(CheckpointError, match=message):
        load_model("hf-hub:someone/vit-cifar", cache_dir=offline_hub)


def test_one_number_for_mean_is_broadcast_as_transformers_does(offline_hub):
    transformers_repo(offline_hub, {"image_mean": 0.45, "image_std": 0.25})
    model = load_model("hf-hub:someone/vit-cifar", cache_dir=offline_hub)
    assert model.pretrained_cfg["mean"] == (0.45, 0.45, 0.45) and model.pretrained_cfg["std"] == (0.25, 0.25, 0.25)


@pytest.mark.parametrize("stored", [[1, 1], [32], "32", [32, 5000], [32.0, 32.0]])
def test_a_config_stored_size_is_checked_as_data(tmp_path, stored):
    folder = save_model(timm.create_model("vit_tiny_test", num_classes=3), tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["stored_size"] = stored
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="stored_size=.* should be \\[height, width\\], each from 2 to 4096"):
        load_model(folder)
