"""``finetune export``: quick runs (full, LoRA-merged, distilled DeiT with two heads, a model at a
resized position embedding) exported to ONNX and ``.pt2``, each checked against PyTorch on the
run's own test images; ``predict`` on the exported file names the classes the run folder names; a
parity failure, a missing extra and a folder that is not a run leave nothing behind."""

from __future__ import annotations

import json
import sys

import pytest
import timm
import torch
from torchvision.io import write_png
from typer.testing import CliRunner

from conftest import REPO_ROOT
from finetune import create_model, load_model, save_model
from finetune.cli import app
from finetune.data.load import load_eval_split
from finetune.errors import ExportError
from finetune.export import runtime
from finetune.export.exporter import export_run
from finetune.export.metadata import sidecar
from finetune.recipe import load_recipe
from finetune.runs.run import run

QUICK = REPO_ROOT / "recipes" / "quick_cpu.yaml"
RUNNER = CliRunner()
KINDS = ("full", "lora", "distilled", "resized")


def _random(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Four finished quick runs (one epoch on synthetic images), by kind."""
    root = tmp_path_factory.mktemp("export")
    toy = save_model(_random(create_model("vit_tiny_test", num_classes=10), 0), root / "toy")
    deit = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, depth=1, num_classes=10)
    deit_src = save_model(_random(deit, 1), root / "deit")
    base = [f"output.dir={root / 'runs'}", "output.plots=false", "model.arch=null", "data.synthetic_test=48"]
    extra = {
        "full": [f"model.source={toy}", "train.mode=full", "data.val_split=64"],  # keeps a best/ model
        "lora": [f"model.source={toy}", "train.mode=lora", "train.lora.r=4", "optim.lr=3e-3"],
        "distilled": [f"model.source={deit_src}", "train.mode=full", "data.synthetic_train=64"],
        "resized": [f"model.source={toy}", "train.mode=full", "model.img_size=48"],  # pos_embed 8x8 -> 12x12
    }
    for kind, over in extra.items():
        run(load_recipe(QUICK, [*base, f"name={kind}", *over]), quiet=True)
    return {kind: root / "runs" / kind for kind in KINDS}


def photos(folder, tmp_path, n: int = 3) -> list[str]:
    """``n`` of the run's own test images, written as PNG files."""
    recipe = load_recipe(folder / "recipe.yaml")
    split, _, _ = load_eval_split(recipe.data, seed=recipe.seed)
    paths = []
    for i in range(n):
        write_png(split.images[i], str(tmp_path / f"img{i}.png"))
        paths.append(str(tmp_path / f"img{i}.png"))
    return paths


def top_classes(output: str) -> list[str]:
    """The top class of each image in ``finetune predict``'s output."""
    lines = output.splitlines()
    return [lines[i + 1].split()[1] for i, line in enumerate(lines) if line.endswith(".png")]


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
@pytest.mark.parametrize("kind", KINDS)
def test_export_matches_pytorch_and_predicts_the_same_classes(runs, kind, fmt, tmp_path):
    out = tmp_path / f"model.{fmt}"
    result = export_run(runs[kind], fmt, out=out)
    assert out.is_file() and result.max_abs_diff <= 1e-4 and result.top1_agree == result.images == 48
    meta = runtime.load_exported(out)[1]
    assert meta.class_names == tuple(f"class_{i}" for i in range(10)) and meta.stored_size == (32, 32)
    assert meta.input_size == ((48, 48) if kind == "resized" else (32, 32)) and meta.batch is None
    assert meta.model == ("best" if kind == "full" else "final")
    if kind == "distilled":  # two heads, averaged in eval mode as timm does
        assert load_model(runs[kind]).head_dist.out_features == 10
    if fmt == "pt2":
        assert json.loads(sidecar(out).read_text())["input_size"] == list(meta.input_size)
    images = photos(runs[kind], tmp_path)
    on_run = RUNNER.invoke(app, ["predict", str(runs[kind]), *images, "--device", "cpu"])
    on_file = RUNNER.invoke(app, ["predict", str(out), *images])
    assert on_run.exit_code == 0 and on_file.exit_code == 0, on_run.output + on_file.output
    assert top_classes(on_file.output) == top_classes(on_run.output) and len(top_classes(on_run.output)) == 3


def test_the_cli_exports_a_fixed_batch_into_the_run_folder(runs, tmp_path):
    result = RUNNER.invoke(app, ["export", str(runs["full"]), "--format", "pt2", "--batch", "2"])
    assert result.exit_code == 0, result.output
    assert "top-1 agrees on 2/2" in result.output and "batch 2" in result.output
    out = runs["full"] / "model.pt2"
    assert runtime.load_exported(out)[1].batch == 2
    images = photos(runs["full"], tmp_path, n=3)  # three photos through a batch of two: padded
    on_file = RUNNER.invoke(app, ["predict", str(out), *images])
    on_run = RUNNER.invoke(app, ["predict", str(runs["full"]), *images, "--device", "cpu"])
    assert top_classes(on_file.output) == top_classes(on_run.output)
    out.unlink(), sidecar(out).unlink()


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_a_parity_failure_leaves_no_file(runs, fmt, tmp_path, monkeypatch):
    real = runtime.open_runner
    monkeypatch.setattr(runtime, "open_runner", lambda path, f: (lambda x: real(path, f)(x) + 1e-3))
    out = tmp_path / "sub" / f"model.{fmt}"
    result = RUNNER.invoke(app, ["export", str(runs["full"]), "--format", fmt, "--out", str(out)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "differ from the PyTorch model's by up to 0.001" in result.output and "Nothing was written" in result.output
    assert list((tmp_path / "sub").iterdir()) == []
    with pytest.raises(ExportError):  # a looser tolerance is the user's choice
        export_run(runs["full"], fmt, out=out, tolerance=1e-5)
    assert export_run(runs["full"], fmt, out=out, tolerance=1e-2).path == out


def test_a_missing_extra_is_a_clear_message(runs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # importing it now fails
    result = RUNNER.invoke(app, ["export", str(runs["full"]), "--out", str(tmp_path / "m.onnx")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "pip install 'finetune[export]'" in result.output and list(tmp_path.iterdir()) == []


def test_a_folder_that_is_not_a_run_is_refused(tmp_path):
    result = RUNNER.invoke(app, ["export", str(tmp_path)])
    assert result.exit_code == 1 and "is not a run folder" in result.output and "Traceback" not in result.output
    result = RUNNER.invoke(app, ["export", str(tmp_path), "--batch", "zero"])
    assert result.exit_code == 1 and "--batch 'zero'" in result.output
    bad = tmp_path / "x.onnx"
    bad.write_bytes(b"not a model")
    write_png(torch.zeros(3, 8, 8, dtype=torch.uint8), str(tmp_path / "photo.png"))
    result = RUNNER.invoke(app, ["predict", str(bad), str(tmp_path / "photo.png")])
    assert result.exit_code == 1 and "cannot be read as an ONNX model" in result.output and "Traceback" not in result.output
