"""Issue 27, exports that carry their preprocessing in the graph: by default an exported graph takes
``uint8 (B, 3, H, W)`` pixels at the run's stored size and normalises and resizes them itself, so
plain onnxruntime on raw pixels gives ``finetune predict``'s answers, at batch 1 and at batch N;
``--input float`` keeps the normalised float input; parity is checked at both batch sizes; the
metadata says what the graph takes and is refused when damaged, also under ``python -O``.

Two quick runs keep their images at another size than the model's: 16 px images for a 32 px model
(the graph upsamples) and 48 px images for a 32 px model (it shrinks, antialiased).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import onnx
import pytest
import torch
from torchvision.io import decode_image, write_png
from typer.testing import CliRunner

from conftest import REPO_ROOT
from finetune import load_model
from finetune.cli import app
from finetune.data.load import load_eval_split
from finetune.errors import ExportError
from finetune.export import runtime
from finetune.export.exporter import export_run
from finetune.export.metadata import ExportMeta, sidecar
from finetune.recipe import load_recipe
from finetune.runs.folder import preprocess_of
from finetune.runs.run import run

QUICK = REPO_ROOT / "recipes" / "quick_cpu.yaml"
RUNNER = CliRunner()
STORED = {"up": 16, "down": 48}  # run -> data.image_size; the model takes 32 px in both
# Largest logit difference accepted between onnxruntime and PyTorch: the export's own parity
# tolerance. Both compute the same fp32 operations (cast, /255, normalise, resize, the ViT); they
# differ only in summation order inside kernels, about 1e-7 per logit here, far inside 1e-4, while
# a wrong normalisation or resize moves logits by 1e-2 or more.
TOLERANCE = 1e-4
# onnxruntime alone, in a fresh interpreter: PNG files in, logits out, nothing from finetune.
PLAIN_ORT = textwrap.dedent("""
    import json, sys
    import numpy as np, onnxruntime
    from PIL import Image
    model, out, *photos = sys.argv[1:]
    session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB")).transpose(2, 0, 1) for p in photos])  # NCHW uint8
    logits = {"batch_n": session.run(None, {name: pixels})[0].tolist(),
              "batch_1": [session.run(None, {name: pixels[i:i + 1]})[0][0].tolist() for i in range(len(pixels))]}
    assert not any(m.split(".")[0] == "finetune" for m in sys.modules), "finetune was imported"
    json.dump(logits, open(out, "w"))
""")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Two finished quick runs whose stored image size is not the model's input size."""
    root = tmp_path_factory.mktemp("graph")
    for kind, size in STORED.items():
        over = [f"output.dir={root / 'runs'}", "output.plots=false", f"name={kind}", "data.synthetic_test=24",
                f"data.synthetic_size={size}", f"data.image_size={size}", "model.img_size=32"]
        run(load_recipe(QUICK, over), quiet=True)
    return {kind: root / "runs" / kind for kind in STORED}


def photos(folder, tmp_path, n: int) -> list[str]:
    """``n`` of the run's own test images, at the size the run stored them, as PNG files."""
    recipe = load_recipe(folder / "recipe.yaml")
    split, _, _ = load_eval_split(recipe.data, seed=recipe.seed)
    paths = [str(tmp_path / f"img{i}.png") for i in range(n)]
    for image, path in zip(split.images, paths):
        write_png(image, path)
    return paths


def predicted(model, images: list[str]) -> list[str]:
    """``finetune predict``'s top class for each image."""
    result = RUNNER.invoke(app, ["predict", str(model), *images, "--device", "cpu", "--topk", "1"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    return [lines[i + 1].split()[1] for i, line in enumerate(lines) if line.endswith((".png", ".jpg"))]


def predict_logits(folder, images: list[str]) -> torch.Tensor:
    """The logits ``finetune predict RUN_DIR`` computes: the run's model on its own preprocessing."""
    model = load_model(folder).eval()
    with torch.no_grad():
        return model(preprocess_of(model, folder)([decode_image(p) for p in images]))


@pytest.mark.parametrize("kind", list(STORED))
def test_plain_onnxruntime_on_raw_pixels_agrees_with_predict_at_batch_1_and_n(runs, kind, tmp_path):
    folder, size = runs[kind], STORED[kind]
    out = tmp_path / "model.onnx"
    result = export_run(folder, "onnx", out=out)
    assert result.batches == (1, 24) and result.images == 24 and result.top1_agree == 24
    assert result.max_abs_diff <= TOLERANCE
    # The metadata says what the graph takes, and the graph takes it.
    props = {p.key: json.loads(p.value) for p in onnx.load(str(out)).metadata_props}
    assert props["finetune.graph_dtype"] == "uint8" and props["finetune.graph_layout"] == "NCHW"
    assert props["finetune.graph_size"] == [size, size] and props["finetune.input_size"] == [32, 32]
    assert props["finetune.stored_size"] == [size, size]
    images = photos(folder, tmp_path, 6)
    logits = tmp_path / "logits.json"
    subprocess.run([sys.executable, "-c", PLAIN_ORT, str(out), str(logits), *images], check=True, timeout=120,
                   cwd=tmp_path, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})  # no finetune on the path
    plain = {k: torch.tensor(v) for k, v in json.loads(logits.read_text()).items()}
    expected = predict_logits(folder, images)
    print(f"{kind}: onnxruntime vs predict, largest logit difference at batch 1 "
          f"{(plain['batch_1'] - expected).abs().max():.2g}, at batch 6 {(plain['batch_n'] - expected).abs().max():.2g}")
    for logits_at in plain.values():
        assert (logits_at - expected).abs().max() <= TOLERANCE
        assert logits_at.argmax(-1).tolist() == expected.argmax(-1).tolist()
    on_run = predicted(folder, images)
    assert predicted(out, images) == on_run == [predicted(out, [p])[0] for p in images]
    names = load_model(folder).pretrained_cfg["label_names"]
    assert [names[i] for i in plain["batch_1"].argmax(-1)] == on_run


def test_a_pt2_taking_uint8_resizes_inside_and_runs_through_predict(runs, tmp_path):
    folder = runs["up"]
    out = tmp_path / "model.pt2"
    export_run(folder, "pt2", out=out)
    runner, meta = runtime.load_exported(out)  # the archive check passes: normalise and resize are ATen ops
    model = load_model(folder)
    assert meta.graph_dtype == "uint8" and meta.graph_size == (16, 16) and meta.input_size == (32, 32)
    assert meta.preprocess() == preprocess_of(model, folder)  # one description: the model's pretrained_cfg
    assert json.loads(sidecar(out).read_text())["graph_size"] == [16, 16]
    program = torch.export.load(str(out))
    ops = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert {"aten.div.Tensor", "aten.sub.Tensor", "aten.upsample_bilinear2d.vec"} <= ops, ops
    images = photos(folder, tmp_path, 5)
    assert predicted(out, images) == predicted(folder, images)
    got = runner(torch.stack([decode_image(p) for p in images]))
    assert (got - predict_logits(folder, images)).abs().max() <= TOLERANCE
    with pytest.raises(ExportError, match="takes uint8 pixels"):  # never a silent cast of floats to pixels
        runner(torch.rand(2, 3, 16, 16))


def test_input_float_keeps_the_normalised_input_at_the_models_size(runs, tmp_path):
    folder = runs["down"]
    out = tmp_path / "model.onnx"
    result = RUNNER.invoke(app, ["export", str(folder), "--out", str(out), "--input", "float"])
    assert result.exit_code == 0, result.output
    assert "parity at batch 1 and 24" in result.output and "takes normalised float32 NCHW input at 32x32" in result.output
    meta = runtime.load_exported(out)[1]
    assert meta.graph_dtype == "float32" and meta.graph_size == (32, 32) and meta.stored_size == (48, 48)
    import onnxruntime

    node = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"]).get_inputs()[0]
    assert node.type == "tensor(float)" and node.shape[1:] == [3, 32, 32]
    images = photos(folder, tmp_path, 4)
    assert predicted(out, images) == predicted(folder, images)


def test_the_cli_default_is_uint8_and_says_so(runs, tmp_path):
    out = tmp_path / "model.onnx"
    result = RUNNER.invoke(app, ["export", str(runs["down"]), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "takes uint8 NCHW images at 48x48, normalised and resized to 32x32 inside" in result.output
    assert runtime.load_exported(out)[1].graph_dtype == "uint8"
    result = RUNNER.invoke(app, ["export", str(runs["down"]), "--input", "int8"])
    assert result.exit_code != 0 and "int8" in result.output


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_parity_is_checked_at_batch_1_too(runs, fmt, tmp_path, monkeypatch):
    real = runtime.open_runner

    def wrong_alone(path, f):  # right for a batch of many, wrong for one image: the serving case
        run_file = real(path, f)
        return lambda x: run_file(x) + (1e-2 if len(x) == 1 else 0.0)

    monkeypatch.setattr(runtime, "open_runner", wrong_alone)
    out = tmp_path / f"model.{fmt}"
    result = RUNNER.invoke(app, ["export", str(runs["up"]), "--format", fmt, "--out", str(out)])
    assert result.exit_code == 1 and "at batch 1" in result.output and "Nothing was written" in result.output
    assert not out.exists() and not sidecar(out).exists()
    monkeypatch.setattr(runtime, "open_runner", real)
    result = RUNNER.invoke(app, ["export", str(runs["up"]), "--format", fmt, "--out", str(out), "--batch", "3"])
    assert result.exit_code == 0 and "parity at batch 3 " in result.output, result.output


def test_a_run_saved_before_config_json_named_its_stored_size_exports_with_summary_json(runs, tmp_path):
    import shutil

    folder = shutil.copytree(runs["up"], tmp_path / "runs" / "older")
    config = json.loads((folder / "config.json").read_text())
    assert config.pop("stored_size") == [16, 16]
    (folder / "config.json").write_text(json.dumps(config))
    meta = export_run(folder, "pt2", out=tmp_path / "m.pt2").meta
    assert meta.stored_size == meta.graph_size == (16, 16)  # from summary.json, as predict reads it


GOOD = {"input_size": [32, 32], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "class_names": ["a", "b"],
        "stored_size": [16, 16], "graph_dtype": "uint8", "graph_size": [16, 16]}
BAD = {
    "std of zeros": {"std": [0, 0, 0]},
    "two means": {"mean": [0.5, 0.5]},
    "a NaN mean": {"mean": [float("nan"), 0.5, 0.5]},
    "a huge mean": {"mean": [10**400, 0.5, 0.5]},
    "names as one string": {"class_names": "abc"},
    "no names": {"class_names": []},
    "an unknown interpolation": {"interpolation": "lanczos"},
    "an unknown resize": {"resize": "stretch"},
    "an unknown graph dtype": {"graph_dtype": "int8"},
    "a graph size that is not the stored size": {"graph_size": [32, 32]},
    "a 1x1 stored size": {"stored_size": [1, 1]},
    "NHWC": {"graph_layout": "NHWC"},
    "a boolean batch": {"batch": True},
}


def test_metadata_from_before_uint8_graphs_reads_as_a_float_graph(tmp_path):
    old = ExportMeta.from_dict({k: v for k, v in GOOD.items() if not k.startswith("graph")} | {"stored_size": None},
                               tmp_path / "old.onnx")
    assert old.graph_dtype == "float32" and old.graph_size == (32, 32) and old.graph_layout == "NCHW"
    assert ExportMeta.from_dict(GOOD, tmp_path / "m.onnx").graph_size == (16, 16)


@pytest.mark.parametrize("case", list(BAD))
def test_bad_metadata_is_refused_by_name(case, tmp_path):
    with pytest.raises(ExportError, match="has no usable finetune metadata"):
        ExportMeta.from_dict(GOOD | BAD[case], tmp_path / "m.onnx")


def test_bad_metadata_is_refused_under_python_O(tmp_path):
    """``python -O`` drops asserts: the checks must be statements of their own."""
    script = textwrap.dedent("""
        import json, sys
        from pathlib import Path
        from finetune.errors import ExportError
        from finetune.export.metadata import ExportMeta
        assert False, "asserts run"  # removed under -O: reaching the checks proves they do not rely on assert
        good, bad = json.loads(sys.argv[1]), json.loads(sys.argv[2])
        ExportMeta.from_dict(good, Path("m.onnx"))
        for case, change in bad.items():
            try:
                ExportMeta.from_dict({**good, **change}, Path("m.onnx"))
            except ExportError as exc:
                assert "no usable finetune metadata" in str(exc)
                continue
            print("accepted:", case)
            sys.exit(1)
        print("all refused")
    """)
    result = subprocess.run([sys.executable, "-O", "-c", script, json.dumps(GOOD), json.dumps(BAD)],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert result.returncode == 0 and "all refused" in result.stdout, result.stdout + result.stderr


def test_a_damaged_onnx_is_refused_by_predict_in_one_paragraph(runs, tmp_path):
    out = tmp_path / "model.onnx"
    export_run(runs["up"], "onnx", out=out)
    model = onnx.load(str(out))
    for prop in model.metadata_props:
        if prop.key == "finetune.std":
            prop.value = "[0, 0, 0]"
    onnx.save(model, str(out))
    image = photos(runs["up"], tmp_path, 1)
    result = RUNNER.invoke(app, ["predict", str(out), *image])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "has no usable finetune metadata (std [0, 0, 0] has a value that is not above zero)" in result.output
    graph = tmp_path / "graph.onnx"  # a graph that takes floats, with metadata that says uint8
    export_run(runs["up"], "onnx", out=graph, input="float")
    model = onnx.load(str(graph))
    props = {p.key: p for p in model.metadata_props}
    props["finetune.graph_dtype"].value, props["finetune.graph_size"].value = '"uint8"', "[32, 32]"
    props["finetune.stored_size"].value = "null"
    onnx.save(model, str(graph))
    result = RUNNER.invoke(app, ["predict", str(graph), *image])
    assert result.exit_code == 1 and "takes 'float32' inputs, but its metadata says uint8" in result.output, result.output


def test_a_streamed_image_folder_run_exports_with_its_own_jpegs(tmp_path):
    """JPEGs of several shapes, kept encoded (``data.in_memory=false``): the parity images are
    decoded and brought to the stored size as the run's streaming loader does it."""
    from torchvision.io import write_jpeg

    gen = torch.Generator().manual_seed(0)
    for split in ("train", "test"):
        for c in ("cat", "dog"):
            (tmp_path / "photos" / split / c).mkdir(parents=True)
            for i in range(6):
                h, w = 20 + 7 * i, 40 - 3 * i
                base = torch.linspace(0, 255, w).expand(3, h, w) * (0.4 if c == "cat" else 1.0)
                noise = torch.randint(0, 40, (3, h, w), generator=gen)
                write_jpeg((base + noise).clamp(0, 255).to(torch.uint8), str(tmp_path / "photos" / split / c / f"{i}.jpg"))
    over = [f"output.dir={tmp_path / 'runs'}", "output.plots=false", "name=folder", "data.name=imagefolder",
            f"data.root={tmp_path / 'photos'}", "data.image_size=24", "data.in_memory=false", "data.batch_size=4",
            "data.val_split=0", "model.img_size=32"]
    run(load_recipe(QUICK, over), quiet=True)
    folder = tmp_path / "runs" / "folder"
    result = export_run(folder, "onnx", out=tmp_path / "m.onnx")
    assert result.meta.graph_size == (24, 24) and result.batches == (1, 12) and result.top1_agree == 12
    images = sorted(str(p) for p in (tmp_path / "photos" / "test").rglob("*.jpg"))[:4]
    assert predicted(tmp_path / "m.onnx", images) == predicted(folder, images)
