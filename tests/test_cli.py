"""Tests for the ``finetune`` command line: every command, every user error, and the main recipe.

Commands run in-process through ``typer.testing.CliRunner``; each test asserts on the exit code and
the printed text. User errors must be one paragraph on stderr, exit code 1, no traceback, and leave
nothing on disk. Runs use the shipped recipes with overrides that keep them offline and small.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from conftest import REPO_ROOT
from finetune.cli import app
from finetune.data.load import load_splits
from finetune.recipe import SHIPPED_RECIPES, load_recipe

RUNNER = CliRunner()
COMMANDS = ("run", "validate", "ls", "eval", "predict")
ALL_COMMANDS = sorted(typer.main.get_command(app).commands)  # including any added later
CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]
# quick_cpu.yaml replaces its run folder by default; the error tests want the safe default back.
QUICK = ("quick_cpu", "output.plots=false")


def invoke(*args):
    return RUNNER.invoke(app, [str(a) for a in args])


def assert_user_error(result, *phrases: str) -> str:
    """Exit 1 through a FinetuneError: one paragraph on stderr naming ``phrases``, no traceback."""
    assert result.exit_code == 1, result.output
    # A crash would also exit 1 under CliRunner; only a handled error leaves SystemExit behind.
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    # A line announcing a long step ("evaluating ... ...") may come first; the error is one paragraph.
    text = "\n".join(line for line in result.stderr.splitlines() if not line.endswith(" ...")).strip()
    assert text.startswith("error: "), text
    assert "\n\n" not in text and "Traceback" not in result.output, text
    for phrase in phrases:
        assert phrase in text, f"{phrase!r} not in {text!r}"
    return text


def write_image(path, rng: np.random.Generator, size: int = 32) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)


def write_imagefolder(root, classes, per_class: dict[str, int], seed: int = 0) -> None:
    """``root/<split>/<class>/<i>.png|.jpg``: real image files, PNG and JPEG alternating."""
    rng = np.random.default_rng(seed)
    for split, count in per_class.items():
        for name in classes:
            for i in range(count):
                write_image(root / split / name / f"{i}.{'png' if i % 2 == 0 else 'jpg'}", rng)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A quick_cpu run through the CLI: (run folder, summary)."""
    out = tmp_path_factory.mktemp("finished")
    result = invoke("run", *QUICK, f"output.dir={out}", "-q")
    assert result.exit_code == 0, result.output
    run_dir = out / "quick_cpu"
    assert "done quick_cpu: final test top-1" in result.stdout and str(run_dir) in result.stdout.replace("\n", "")
    return run_dir, json.loads((run_dir / "summary.json").read_text())


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error, exit 1, and nothing written


def test_typo_in_a_recipe_file_names_the_key_and_the_fix(tmp_path):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text((SHIPPED_RECIPES / "quick_cpu.yaml").read_text().replace("  epochs: 1", "  epoch: 1"))
    result = invoke("run", recipe, f"output.dir={tmp_path / 'runs'}")
    assert_user_error(result, "mine.yaml", "unknown key 'train.epoch'", "Did you mean 'train.epochs'?")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "override, phrases",
    [
        ("optim.weight_decy=0.1", ("unknown key 'optim.weight_decy'", "Did you mean 'optim.weight_decay'?")),
        ("data.batch_size=abc", ("data.batch_size", "expected an integer, got 'abc'")),
        ("train.epochs=0", ("train.epochs", "must be >= 1")),
        ("optim.name=lamb", ("optim.name", "'sgd'", "'adamw'")),
    ],
)
def test_bad_override_is_one_clear_line(tmp_path, override, phrases):
    result = invoke("run", *QUICK, override, f"output.dir={tmp_path / 'runs'}")
    assert_user_error(result, f"override {override!r}", *phrases)
    assert not (tmp_path / "runs").exists()


def test_missing_recipe_file_lists_the_shipped_ones(tmp_path):
    result = invoke("run", tmp_path / "nope.yaml")
    assert_user_error(result, "nope.yaml' not found", "quick_cpu", "deit_tiny_cifar")
    result = invoke("validate", "quick_cpo")
    assert_user_error(result, "Did you mean 'quick_cpu'?")


def test_missing_cifar_without_download_says_where_it_looked(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = invoke("run", *QUICK, "data.name=cifar10", f"data.root={empty}", "data.download=false",
                    f"output.dir={tmp_path / 'runs'}")
    assert_user_error(result, f"cifar10 is not in {empty / 'cifar-10-batches-py'}", "data.download=false",
                      "data.name=imagefolder")
    assert not (tmp_path / "runs").exists()
    assert list(empty.iterdir()) == []


def test_missing_cifar_with_download_fails_fast_without_network(tmp_path, monkeypatch):
    import torchvision

    asked = []

    def unreachable(address, timeout=None, *args, **kwargs):
        asked.append((address, timeout))
        raise OSError("[Errno 101] Network is unreachable")

    def no_download(*args, **kwargs):
        raise AssertionError("the download started although the server cannot be reached")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", no_download)
    start = time.perf_counter()
    result = invoke("run", *QUICK, "data.name=cifar10", f"data.root={tmp_path / 'data'}", "data.download=true",
                    f"output.dir={tmp_path / 'runs'}")
    assert time.perf_counter() - start < 10
    assert_user_error(result, "cifar10 is not in", "cannot be reached", "Network is unreachable")
    assert len(asked) == 1 and asked[0][1] is not None and asked[0][1] <= 10  # a bounded connection attempt
    assert not (tmp_path / "runs").exists()


def test_existing_run_folder_is_kept_unless_overwrite(tmp_path):
    from finetune.runs.folder import MARKER, marker_text

    earlier = tmp_path / "runs" / "quick_cpu"
    earlier.mkdir(parents=True)
    (earlier / MARKER).write_text(marker_text())  # a run folder finetune wrote, so one it may replace
    (earlier / "summary.json").write_text('{"status": "finished"}')
    result = invoke("run", *QUICK, "output.overwrite=false", f"output.dir={tmp_path / 'runs'}")
    assert_user_error(result, f"{earlier} already exists", "output.overwrite=true")
    assert sorted(p.name for p in earlier.iterdir()) == [MARKER, "summary.json"]
    assert (earlier / "summary.json").read_text() == '{"status": "finished"}'

    result = invoke("run", *QUICK, "output.overwrite=true", f"output.dir={tmp_path / 'runs'}", "-q")
    assert result.exit_code == 0, result.output
    assert json.loads((earlier / "summary.json").read_text())["name"] == "quick_cpu"
    assert (earlier / "model.safetensors").is_file()


def test_predict_on_a_file_that_is_not_an_image(tmp_path, finished_run):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture")
    assert_user_error(invoke("predict", finished_run[0], notes), f"{notes} is not an image")
    assert_user_error(invoke("predict", finished_run[0], tmp_path / "gone.jpg"), "gone.jpg does not exist")


def test_imagefolder_with_a_corrupt_jpeg_skips_it_and_names_it(tmp_path):
    root = tmp_path / "folder"
    write_imagefolder(root, ["cat", "dog"], {"train": 2, "test": 1})
    corrupt = root / "train" / "dog" / "broken.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is not the rest of a JPEG")
    result = invoke("run", *QUICK, "data.name=imagefolder", f"data.root={root}", "data.batch_size=2",
                    f"output.dir={tmp_path / 'runs'}")
    assert result.exit_code == 0, result.output
    assert f"warning: skipped 1 entry: 1 unreadable image (e.g. {corrupt})" in result.stderr.replace("\n", "")
    summary = json.loads((tmp_path / "runs" / "quick_cpu" / "summary.json").read_text())
    assert summary["skipped_files"] == {"unreadable image": {"count": 1, "examples": [str(corrupt)]}}
    assert summary["train_images"] == 4  # the other four were read


def test_checkpoint_of_another_architecture(tmp_path, deit_release_pth):
    result = invoke("run", *QUICK, "train.mode=full", f"model.source={deit_release_pth}",
                    "model.arch=deit_small_patch16_224", f"output.dir={tmp_path / 'runs'}")
    assert_user_error(result, "does not fit deit_small_patch16_224", "embed dim 192", "another architecture",
                      "model.arch")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "overrides, phrases",
    [
        (("model.arch=vit_tiny_tset",), ("Unknown model architecture 'vit_tiny_tset'", "vit_tiny_test")),
        (("train.mode=full", "model.arch=null", "model.source=deit_tiny_patch16_22"),
         ("Unknown model architecture 'deit_tiny_patch16_22'", "deit_tiny_patch16_224")),
    ],
)
def test_unknown_model_name_suggests_close_ones(tmp_path, no_network, overrides, phrases):
    result = invoke("run", *QUICK, *overrides, f"output.dir={tmp_path / 'runs'}")
    assert_user_error(result, *phrases)
    assert not (tmp_path / "runs").exists()


def test_error_message_shows_paths_with_brackets_verbatim(tmp_path):
    root = tmp_path / "data [copy]"
    result = invoke("run", *QUICK, "data.name=imagefolder", f"data.root={root}", f"output.dir={tmp_path / 'runs'}")
    assert_user_error(result, f"{root} is not a folder")


# ---------------------------------------------------------------------------------------------
# Help, ls, validate, python -m


def test_the_documented_commands_exist():
    assert set(COMMANDS) <= set(ALL_COMMANDS)


@pytest.mark.parametrize("command", ALL_COMMANDS)
def test_every_command_has_help_with_an_example(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0, result.output
    assert f"Usage: finetune {command}" in result.stdout
    assert re.search(rf"^\s*Example: finetune {command}\b", result.stdout, re.MULTILINE), result.stdout


def test_ls_lists_every_shipped_recipe():
    result = invoke("ls")
    assert result.exit_code == 0, result.output
    shipped = sorted(p.name for p in SHIPPED_RECIPES.glob("*.y*ml"))
    assert len(shipped) >= 7
    listed = re.findall(r"^\s*(\S+\.ya?ml)\s", result.stdout, re.MULTILINE)
    assert listed == shipped
    assert "Smoke test" in result.stdout  # quick_cpu's description


def test_validate_show_prints_the_resolved_recipe():
    result = invoke("validate", "quick_cpu", "optim.lr=0.01", "--show")
    assert result.exit_code == 0, result.output
    out = result.stdout
    for line in ("  lr: 0.01", "  arch: vit_tiny_test", "  name: synthetic", "  ema_decay: 0.9998"):
        assert f"\n{line}\n" in out, line  # defaults filled in, the override applied
    assert out.rstrip().splitlines()[-1].startswith("ok ") and out.rstrip().endswith("quick_cpu.yaml")

    plain = invoke("validate", "quick_cpu")
    assert plain.exit_code == 0 and "lr:" not in plain.stdout and plain.stdout.startswith("ok ")


def test_validate_show_output_is_yaml_that_reloads_to_the_same_recipe(tmp_path):
    result = invoke("validate", "quick_cpu", "optim.lr=0.01", "--show")
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(result.stdout.rstrip().rsplit("\n", 1)[0])  # without the final `ok` line
    assert load_recipe(resolved) == load_recipe("quick_cpu", ["optim.lr=0.01"])


def test_python_dash_m_finetune_help():
    result = subprocess.run(
        [sys.executable, "-m", "finetune", "--help"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout
    for command in ALL_COMMANDS:
        assert command in result.stdout


# ---------------------------------------------------------------------------------------------
# eval and predict


def top1_of(output: str) -> float:
    match = re.search(r"top-1\s+([\d.]+)%", output)
    assert match, output
    return float(match.group(1))


def test_eval_of_a_run_matches_its_summary(finished_run):
    run_dir, summary = finished_run
    result = invoke("eval", run_dir)
    assert result.exit_code == 0, result.output
    assert top1_of(result.stdout) == round(100 * summary["final_acc1"], 2)
    assert "(128 images)" in result.stdout.replace("\n", "")
    for name in summary["classes"]:
        assert name in result.stdout


def test_eval_of_the_best_epoch_reads_the_run_s_data(tmp_path):
    result = invoke("run", *QUICK, f"output.dir={tmp_path}", "data.val_split=32", "train.epochs=2", "-q")
    assert result.exit_code == 0, result.output
    assert "best val top-1" in result.stdout and "test top-1 there" in result.stdout
    summary = json.loads((tmp_path / "quick_cpu" / "summary.json").read_text())
    result = invoke("eval", tmp_path / "quick_cpu" / "best")  # the data comes from the run's recipe.yaml
    assert result.exit_code == 0, result.output
    assert top1_of(result.stdout) == round(100 * summary["best_test_acc1"], 2)


def test_eval_on_an_image_folder_of_the_same_images_gives_the_same_accuracy(tmp_path, finished_run):
    run_dir, summary = finished_run
    # The run's test set, written as lossless PNGs in class folders.
    test = load_splits(load_recipe(run_dir / "recipe.yaml").data, seed=0).test
    folder = tmp_path / "photos"
    for i, (image, label) in enumerate(zip(test.images, test.labels.tolist())):
        path = folder / summary["classes"][label] / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)
    result = invoke("eval", run_dir, "--data", folder, "--batch-size", 50)
    assert result.exit_code == 0, result.output
    assert top1_of(result.stdout) == round(100 * summary["final_acc1"], 2)

    # A folder with only some of the classes keeps the model's label numbers.
    partial = tmp_path / "partial"
    shutil.copytree(folder / "class_3", partial / "class_3")
    result = invoke("eval", run_dir, "--data", partial)
    assert result.exit_code == 0, result.output
    assert top1_of(result.stdout) == round(100 * summary["per_class_acc"][3], 2)


def test_eval_on_photos_of_mixed_sizes_needs_and_takes_image_size(tmp_path, finished_run):
    run_dir, _ = finished_run
    rng = np.random.default_rng(2)
    write_image(tmp_path / "photos" / "class_0" / "big.png", rng, size=64)
    write_image(tmp_path / "photos" / "class_1" / "small.png", rng, size=40)
    assert_user_error(invoke("eval", run_dir, "--data", tmp_path / "photos"), "--image-size")
    result = invoke("eval", run_dir, "--data", tmp_path / "photos", "--image-size", 32)
    assert result.exit_code == 0, result.output
    assert "(2 images)" in result.stdout


def test_eval_of_a_run_with_another_seed_matches_its_summary(tmp_path):
    result = invoke("run", *QUICK, "seed=3", f"output.dir={tmp_path}", "-q")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "quick_cpu" / "summary.json").read_text())
    assert top1_of(invoke("eval", tmp_path / "quick_cpu").stdout) == round(100 * summary["final_acc1"], 2)


def test_predict_prints_the_top_classes_with_probabilities(tmp_path, finished_run):
    run_dir, summary = finished_run
    photos = [tmp_path / "a.png", tmp_path / "b.jpg"]
    rng = np.random.default_rng(0)
    for photo in photos:
        write_image(photo, rng, size=48)  # not the model's 32 px: predict resizes
    result = invoke("predict", run_dir, *photos, "--topk", 3)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    for photo in photos:
        at = lines.index(str(photo))
        ranked = [re.fullmatch(r"\s+(\d)\. (\S+)\s+([\d.]+)%", line) for line in lines[at + 1 : at + 4]]
        assert all(ranked), lines[at + 1 : at + 4]
        assert [int(m.group(1)) for m in ranked] == [1, 2, 3]
        assert all(m.group(2) in summary["classes"] for m in ranked)
        assert len({m.group(2) for m in ranked}) == 3
        probabilities = [float(m.group(3)) for m in ranked]
        assert probabilities == sorted(probabilities, reverse=True)
        assert 0 < sum(probabilities) <= 100.0 + 0.02  # rounding to 2 decimals
    assert len(lines) == 2 * 4


# ---------------------------------------------------------------------------------------------
# The main recipe, end to end, offline


def test_main_recipe_end_to_end_offline(tmp_path, hub_cache, no_network, monkeypatch):
    """deit_tiny_cifar.yaml as shipped: DeiT-tiny from the hub cache, full fine-tuning at 224 px."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root = tmp_path / "cifar_like"
    write_imagefolder(root, CIFAR10_CLASSES, {"train": 2, "test": 1})  # 32 px, like CIFAR
    result = invoke(
        "run", SHIPPED_RECIPES / "deit_tiny_cifar.yaml", "data.name=imagefolder", f"data.root={root}",
        "data.batch_size=8", "train.epochs=1", f"output.dir={tmp_path / 'runs'}", "-q",
    )
    assert result.exit_code == 0, result.output
    assert "done deit_tiny_cifar: final test top-1" in result.stdout
    run_dir = tmp_path / "runs" / "deit_tiny_cifar"
    summary = json.loads((run_dir / "summary.json").read_text())

    assert summary["status"] == "finished" and summary["error"] is None
    assert (summary["mode"], summary["arch"], summary["source"]) == (
        "full", "deit_tiny_patch16_224", "deit_tiny_patch16_224.fb_in1k")
    report = summary["load_report"]
    assert report.startswith("loaded 150 tensors of deit_tiny_patch16_224 from ")
    assert "new head: head.weight, head.bias" in report
    for problem in ("NOT in checkpoint", "NOT loaded", "resized"):
        assert problem not in report, report
    assert summary["img_size"] == [224, 224] and summary["precision"] == summary["precision_choice"]["chosen"]  # auto: measured on this CPU
    assert summary["params_trainable"] == summary["params_total"] == 5_526_346  # 10-class DeiT-tiny
    assert (summary["train_images"], summary["test_images"], summary["steps"]) == (20, 10, 2)
    assert summary["classes"] == CIFAR10_CLASSES
    assert 0.0 <= summary["final_acc1"] <= summary["final_acc5"] <= 1.0
    assert sum(map(sum, summary["confusion_matrix"])) == 10
    config = json.loads((run_dir / "config.json").read_text())
    assert config["pretrained_cfg"]["mean"] == [0.485, 0.456, 0.406]  # the checkpoint's ImageNet mean
    assert config["label_names"] == CIFAR10_CLASSES  # where timm writes class names
    assert load_recipe(run_dir / "recipe.yaml").model.source == "deit_tiny_patch16_224.fb_in1k"


def test_predict_with_a_pretrained_imagenet_model_names_imagenet_classes(tmp_path, hub_cache, no_network, monkeypatch):
    # The course's first step: classify a photo with the pretrained model and print the top 3.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    photo = tmp_path / "photo.png"
    write_image(photo, np.random.default_rng(1), size=64)
    result = invoke("predict", "deit_tiny_patch16_224", photo, "--topk", 3)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    ranked = lines[lines.index(str(photo)) + 1 :]
    assert len(ranked) == 3
    from timm.data import ImageNetInfo

    info = ImageNetInfo("imagenet-1k")  # built once: each construction reads timm's class files
    names = {info.index_to_description(i) for i in range(1000)}
    for line in ranked:
        name = re.fullmatch(r"\s+\d\. (.+?)\s+[\d.]+%", line).group(1)
        assert name in names, line


def test_the_progress_bar_ends_on_the_summarys_images_per_second(tmp_path):
    result = CliRunner().invoke(app, ["run", *QUICK, f"output.dir={tmp_path}", "train.epochs=2", "train.log_every=3"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "quick_cpu" / "summary.json").read_text())
    bars = [line for line in result.stderr.splitlines() if "img/s" in line and "/" in line and "loss" in line]
    assert bars, result.stderr
    shown = re.findall(r"([\d,]+) img/s", bars[-1])[-1]
    # The bar's figure is the summary's (after the first step, training time only), not the last
    # log interval's, which on a small run can be ten times off.
    assert shown == f"{summary['images_per_s']:,.0f}"


def test_sigterm_during_start_up_stops_with_a_message_and_exit_130(tmp_path, monkeypatch):
    import os
    import signal

    import finetune.training.setup as setup

    real = setup.prepare

    def prepare_then_terminated(*args, **kwargs):  # as a scheduler's SIGTERM arriving while data loads
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(setup, "prepare", prepare_then_terminated)
    before = signal.getsignal(signal.SIGTERM)
    result = CliRunner().invoke(app, ["run", *QUICK, f"output.dir={tmp_path}"])
    assert result.exit_code == 130, result.output
    assert "stopped by SIGTERM during start-up" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "quick_cpu").exists()
    assert signal.getsignal(signal.SIGTERM) == before  # the start-up handler was put back


def test_long_steps_say_what_they_are_doing_before_they_start(tmp_path):
    run = CliRunner().invoke(app, ["run", *QUICK, f"output.dir={tmp_path}", "-q"])
    assert run.exit_code == 0, run.output
    folder = tmp_path / "quick_cpu"
    for args, first in ((["eval", str(folder), "--device", "cpu"], "evaluating"),
                        (["report", str(folder), "--out", str(tmp_path / "r")], "reading 1 run(s) and drawing the report"),
                        (["export", str(folder), "--format", "pt2"], "exporting")):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        assert result.stderr.startswith(first), (args[0], result.stderr[:200])
