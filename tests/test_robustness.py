"""Hostile and broken inputs: each gets a clear one-paragraph error or the right behaviour, nothing
is written or lost, and nothing hangs (the cases that used to hang run under a time limit).

docs/robustness.md lists these cases and what each gets.
"""

from __future__ import annotations

import ast

import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import REPO_ROOT
from finetune import GridError, create_model, load_model, resize_pos_embed, save_model
from finetune.cli import app
from finetune.data.load import load_splits
from finetune.errors import CheckpointError, FinetuneError

QUICK = REPO_ROOT / "recipes" / "quick_cpu.yaml"
runner = CliRunner()


@contextlib.contextmanager
def time_limit(seconds: float):
    """Fail instead of hanging: raise TimeoutError in this (main) thread after ``seconds``."""
    def expire(signum, frame):
        raise TimeoutError(f"took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_user_error(result, *phrases: str) -> str:
    """Exit 1 through a FinetuneError: one paragraph naming ``phrases``, no traceback."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    text = " ".join(result.output.split())
    assert "Traceback" not in text and text.startswith("error:"), text
    for phrase in phrases:
        assert phrase in text, (phrase, text)
    return text


def image(path: Path, colour, size=8, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path, format=fmt)


def folder_cfg(root: Path, **extra):
    from test_data import make_cfg

    return make_cfg(name="imagefolder", root=str(root), **extra)


@pytest.fixture
def tree(tmp_path) -> Path:
    """train/ with cat (red) and dog (green), 3 images each; test/ with one of each."""
    for cls, colour in (("cat", (200, 0, 0)), ("dog", (0, 200, 0))):
        for i in range(3):
            image(tmp_path / "train" / cls / f"{i}.png", colour)
        image(tmp_path / "test" / cls / "0.png", colour)
    return tmp_path


# ---------------------------------------------------------------------------------------------
# Image folders


def test_symlink_loops_neither_multiply_images_nor_hang(tree):
    os.symlink("..", tree / "train" / "cat" / "loop")  # train/cat/loop -> train/
    os.symlink("../..", tree / "train" / "dog" / "up")  # train/dog/up -> the dataset root
    os.symlink(".", tree / "train" / "dog" / "self")
    with time_limit(20):
        splits = load_splits(folder_cfg(tree), seed=0)
    assert len(splits.train) == 6 and splits.train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    dominant = splits.train.images.float().mean((2, 3)).argmax(1)
    assert dominant.tolist() == [0, 0, 0, 1, 1, 1]  # every image carries its own class's label
    reasons = splits.skipped.reasons
    assert reasons["link to a folder holding the dataset or its other split"] == [str(tree / "train" / "dog" / "up")]
    assert reasons["link to a folder already read"] == [
        str(tree / "train" / "cat" / "loop"), str(tree / "train" / "dog" / "self")]


def test_a_link_from_train_into_test_does_not_leak_test_images(tree):
    os.symlink(tree / "test" / "cat", tree / "train" / "cat" / "borrowed")
    splits = load_splits(folder_cfg(tree), seed=0)
    assert len(splits.train) == 6
    assert splits.skipped.reasons == {
        "link to a folder holding the dataset or its other split": [str(tree / "train" / "cat" / "borrowed")]}


def test_a_linked_folder_is_read_once_and_a_linked_file_once(tree):
    extra = tree / "elsewhere"
    image(extra / "x.png", (200, 0, 0))
    os.symlink(extra, tree / "train" / "cat" / "more")
    os.symlink(extra / "x.png", tree / "train" / "cat" / "x_again.png")
    splits = load_splits(folder_cfg(tree), seed=0)
    assert len(splits.train) == 7  # x.png once
    assert splits.skipped.reasons == {"the same file reached twice through links": [str(tree / "train" / "cat" / "more" / "x.png")]}


def test_hidden_entries_are_not_classes_and_are_counted(tree):
    image(tree / "train" / ".ipynb_checkpoints" / "0.png", (0, 0, 200))
    image(tree / "train" / "cat" / ".hidden.png", (0, 0, 200))
    (tree / "train" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    splits = load_splits(folder_cfg(tree), seed=0)
    assert splits.classes == ["cat", "dog"] and len(splits.train) == 6
    assert len(splits.skipped.reasons["hidden entry"]) == 3


def test_gif_bmp_tiff_webp_are_read_not_skipped(tree):
    for fmt, suffix in (("GIF", ".gif"), ("BMP", ".bmp"), ("TIFF", ".tif"), ("WEBP", ".webp")):
        image(tree / "train" / "cat" / f"x{suffix}", (200, 0, 0), fmt=fmt)
    frames = [Image.new("RGB", (8, 8), c) for c in ((200, 0, 0), (0, 0, 200))]
    frames[0].save(tree / "train" / "cat" / "anim.gif", save_all=True, append_images=frames[1:])
    (tree / "train" / "cat" / "notes.txt").write_text("a note")
    splits = load_splits(folder_cfg(tree), seed=0)
    assert len(splits.train) == 6 + 5
    assert splits.skipped.reasons == {"not an image file (.txt)": [str(tree / "train" / "cat" / "notes.txt")]}
    red = splits.train.images[splits.train.labels == 0].float().mean((2, 3))
    assert (red[:, 0] > 150).all()  # each format (and the GIF's first frame) decoded to red


def test_a_class_missing_from_test_is_na_not_zero(tmp_path, tree):
    (tree / "test" / "dog" / "0.png").unlink()
    (tree / "test" / "dog").rmdir()
    result = invoke("run", QUICK, "data.name=imagefolder", f"data.root={tree}", "data.image_size=32",
                    "data.batch_size=2", "data.val_split=0", f"output.dir={tmp_path / 'runs'}", "output.plots=false", "-q")
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "runs" / "quick_cpu"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["per_class_acc"][1] is None and summary["per_class_acc"][0] in (0.0, 1.0)
    table = invoke("eval", run_dir).stdout
    assert "n/a (no images)" in table and "dog" in table


# ---------------------------------------------------------------------------------------------
# Model folders are data, not code


@pytest.fixture
def toy_folder(tmp_path) -> Path:
    torch.manual_seed(0)
    return save_model(create_model("vit_tiny_test", num_classes=3), tmp_path / "toy", class_names=["a", "b", "c"])


def edit_config(folder: Path, **model_args) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["model_args"].update(model_args)
    (folder / "config.json").write_text(json.dumps(config))


def test_config_json_cannot_make_timm_open_another_file(toy_folder, tmp_path):
    evil = tmp_path / "evil.pth"
    evil.write_bytes(b"not even read")
    os.chmod(evil, 0)  # opening it would fail loudly; the check comes first
    edit_config(toy_folder, checkpoint_path=str(evil))
    with pytest.raises(CheckpointError, match="'checkpoint_path' is not an argument finetune passes on"):
        load_model(toy_folder)
    result = invoke("predict", toy_folder, REPO_ROOT / "docs" / "results" / "transfer_cpu" / "acc_vs_epoch.png")
    assert_user_error(result, "checkpoint_path", "config.json")


@pytest.mark.parametrize(
    "args, phrase",
    [
        ({"depth": 100000}, "depth=100000 should be a whole number from 1 to 256"),
        ({"depth": 7}, "depth=7 but the weights have 2 blocks"),
        ({"embed_dim": 64}, "embed_dim=64 but the weights are 32 wide"),
        ({"num_heads": 3}, "num_heads=3 does not divide the width 32"),
        ({"mlp_ratio": "huge"}, "mlp_ratio='huge' should be a number"),
        ({"img_size": [32, -1]}, "img_size=[32, -1] should be a whole number"),
        ({"act_layer": "os.system"}, "act_layer='os.system' should be a short name"),
        ({"pretrained_cfg_overlay": {"file": "x.pth"}}, "'pretrained_cfg_overlay' is not an argument"),
    ],
)
def test_model_args_are_checked_before_anything_is_built(toy_folder, args, phrase):
    edit_config(toy_folder, **args)
    with time_limit(10), pytest.raises(CheckpointError) as info:
        load_model(toy_folder)
    assert phrase in str(info.value) and str(toy_folder) in str(info.value)


def test_bad_normalisation_in_config_json_is_refused(toy_folder):
    config = json.loads((toy_folder / "config.json").read_text())
    config["pretrained_cfg"]["std"] = [0.5, 0.0, 0.5]
    (toy_folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"std=\[0.5, 0.0, 0.5\] should be positive"):
        load_model(toy_folder)


def test_a_flipped_byte_in_the_weights_is_caught(toy_folder, tmp_path):
    weights = toy_folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x40  # inside the last tensor's values: still a valid safetensors file
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match the SHA-256"):
        load_model(toy_folder)
    photo = tmp_path / "p.png"
    image(photo, (1, 2, 3))
    for result in (invoke("predict", toy_folder, photo), invoke("eval", toy_folder, "--data", "synthetic")):
        assert_user_error(result, str(weights), "SHA-256", "download the model folder again")


def test_save_model_records_the_hash_it_is_checked_against(toy_folder):
    from finetune.models.reading import file_sha256

    config = json.loads((toy_folder / "config.json").read_text())
    assert config["weights_sha256"] == file_sha256(toy_folder / "model.safetensors")
    assert load_model(toy_folder).num_classes == 3


def test_save_model_under_a_file_is_a_message(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(FinetuneError, match="Cannot save the model to") as info:
        save_model(create_model("vit_tiny_test", num_classes=2), tmp_path / "file" / "model")
    assert "Not a directory" in str(info.value) and info.value.fix


# ---------------------------------------------------------------------------------------------
# Output locations


@pytest.mark.parametrize("where", ["under a file", "pseudo file system"])
def test_an_unwritable_output_dir_fails_before_loading_anything(tmp_path, monkeypatch, where):
    import finetune.training.setup as setup

    if where == "under a file":
        (tmp_path / "afile").write_text("x")
        out, phrase = tmp_path / "afile" / "runs", "is a file, not a folder"
    else:
        if not Path("/proc/self").exists():
            pytest.skip("no /proc on this system")
        out, phrase = Path("/proc/finetune-runs"), "is not writable"

    def no_data(*args, **kwargs):
        raise AssertionError("data was loaded before the output folder was checked")

    monkeypatch.setattr(setup, "load_splits", no_data)
    assert_user_error(invoke("run", QUICK, f"output.dir={out}"), phrase, "output.dir")


def test_an_experiment_under_a_file_is_a_message(tmp_path):
    (tmp_path / "afile").write_text("x")
    result = invoke("sweep", QUICK, "--grid", "optim.lr=1e-3,3e-3", f"output.dir={tmp_path / 'afile'}", "-q")
    assert_user_error(result, "Cannot write the experiment folder")


# ---------------------------------------------------------------------------------------------
# Recipes


def test_a_binary_file_as_a_recipe(tmp_path):
    path = tmp_path / "weights.yaml"
    path.write_bytes(bytes(range(256)) * 4)
    for command in ("validate", "run"):
        assert_user_error(invoke(command, path), "is not UTF-8 text", "binary file")


def test_a_huge_recipe_is_refused_before_parsing(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("description: x\n" + "# padding\n" * 4_000_000)  # ~40 MB
    started = time.perf_counter()
    assert_user_error(invoke("validate", path), "bytes", "short YAML file")
    assert time.perf_counter() - started < 5


def test_yaml_tags_are_refused_and_never_run(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "tag.yaml"
    path.write_text(f"description: !!python/object/apply:os.system ['touch {marker}']\n")
    text = assert_user_error(invoke("validate", path), "uses the YAML tag", "python/object/apply:os.system", "plain YAML")
    assert "indentation" not in text
    assert not marker.exists()
    assert_user_error(invoke("validate", QUICK, "seed=!!python/name:os.system"), "uses the YAML tag")


def test_yaml_bombs_fail_fast(tmp_path):
    nested = tmp_path / "nested.yaml"
    nested.write_text("description: " + "[" * 200_000 + "]" * 200_000 + "\n")
    laughs = tmp_path / "laughs.yaml"
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 10)]
    laughs.write_text("\n".join(lines) + "\ndescription: *a9\n")  # 10**10 leaves if expanded
    with time_limit(20):
        assert_user_error(invoke("validate", nested), "nested.yaml")
        text = assert_user_error(invoke("validate", laughs), "laughs.yaml")
    assert len(text) < 5_000  # the bad value is shown cut short


def test_recipe_suggestions_only_when_close():
    text = assert_user_error(invoke("validate", "nope.yaml"), "recipe 'nope.yaml' not found")
    assert "Did you mean" not in text
    assert_user_error(invoke("validate", "deit_tiny_cifr"), "Did you mean 'deit_tiny_cifar'?")


def test_from_scratch_image_size_must_split_into_patches(tmp_path):
    # Refused when the recipe is read: the preset's patch size is known without building it.
    result = invoke("run", QUICK, "model.img_size=30", f"output.dir={tmp_path / 'runs'}")
    assert_user_error(result, "model.img_size: 30 is not a multiple of vit_tiny_test's patch size (8)", "24 or 32")
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------
# Command-line numbers


@pytest.mark.parametrize("args", [("eval", "--batch-size", "0"), ("predict", "--topk", "0")])
def test_zero_batch_size_and_topk_are_refused(tmp_path, args):
    command, *option = args
    photo = tmp_path / "p.png"
    image(photo, (1, 2, 3))
    target = [tmp_path, photo] if command == "predict" else [tmp_path]
    result = invoke(command, *target, *option)
    assert result.exit_code == 2  # a usage error, before anything is loaded
    text = " ".join(result.output.split())
    assert option[0] in text and ("x>=1" in text or "greater than or equal to 1" in text), text
    assert "Traceback" not in result.output


# ---------------------------------------------------------------------------------------------
# Library arguments


@pytest.mark.parametrize(
    "kwargs, phrase",
    [
        ({"pos_embed": np.zeros((1, 197, 8)), "new_grid": 2}, "must be a torch.Tensor"),
        ({"new_grid": 2.5}, "new_grid must be an int or a pair of ints"),
        ({"new_grid": (2, "3")}, "new_grid must be an int or a pair of ints"),
        ({"new_grid": 5000}, "between 1 and 1024"),
        ({"new_grid": 0}, "between 1 and 1024"),
        ({"new_grid": 4, "old_grid": (14, 14.0)}, "old_grid must be an int or a pair of ints"),
        ({"new_grid": 4, "num_prefix_tokens": -1}, "num_prefix_tokens must be a whole number from 0 to 196"),
        ({"new_grid": 4, "num_prefix_tokens": 197}, "num_prefix_tokens must be a whole number from 0 to 196"),
    ],
)
def test_resize_pos_embed_validates_its_arguments(kwargs, phrase):
    args = {"pos_embed": torch.zeros(1, 197, 8), **kwargs}
    with time_limit(5), pytest.raises(GridError, match=phrase):
        resize_pos_embed(**args)


@pytest.mark.parametrize(
    "kwargs, phrase",
    [
        ({"img_size": "abc"}, "img_size must be an int or a pair of ints"),
        ({"img_size": -32}, "img_size must be between 1 and 16384 pixels"),
        ({"img_size": 32, "patch_size": 0}, "patch_size must be between 1 and 1024 pixels"),
        ({"img_size": 30}, "30x30 is not divisible by the patch size 16x16"),
    ],
)
def test_load_model_sizes_are_validated(deit_release_pth, kwargs, phrase):
    with time_limit(10), pytest.raises(GridError, match=phrase):
        load_model(deit_release_pth, num_classes=10, **kwargs)


# ---------------------------------------------------------------------------------------------
# The catalogue


def test_docs_robustness_lists_every_case_and_the_readme_links_it():
    doc = (REPO_ROOT / "docs" / "robustness.md").read_text()
    assert "docs/robustness.md" in (REPO_ROOT / "README.md").read_text()
    tests = [name for name in dir(sys.modules[__name__]) if name.startswith("test_") and name != "test_docs_robustness_lists_every_case_and_the_readme_links_it"]
    # the trust files' cases too: every test in tests/test_trust_*.py is a row of the catalogue
    for path in sorted((REPO_ROOT / "tests").glob("test_trust_*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        tests += [node.name for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")]
    missing = [name for name in tests if name not in doc]
    assert not missing, f"docs/robustness.md does not mention: {missing}"
