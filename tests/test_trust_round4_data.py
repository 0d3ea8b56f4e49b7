"""Trust, round 4 (issue 26): the data pipeline, recipes and start-up.

One random resized crop for both data paths (streamed == in memory, bit for bit, under every
augmentation; torchvision's box rule in pixels); ``precision: auto`` decided from interleaved,
bounded, honest timings; recipe values no run can use refused when the recipe is read; messages
that name the real problem; and data sets that cannot train a classifier refused.
"""

from __future__ import annotations

import json
import math
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import finetune.training.components as components
from conftest import REPO_ROOT
from test_robustness import assert_user_error, invoke
from finetune.data.load import load_splits
from finetune.data.loader import BatchLoader
from finetune.data.splits import EncodedImages, ImageTensors
from finetune.data.transforms import RRC_TRIES, random_resized_crop, resized_crop_boxes
from finetune.errors import RecipeError
from finetune.recipe import AugmentConfig, DataConfig, load_recipe
from finetune.recipe.messages import valid_keys
from finetune.recipe.schema import MAX_NAME_BYTES, PRESET_PATCH_SIZES, Recipe
from finetune.runs.run import run
from finetune.training.device import (
    PRECISION_MIN_ROUNDS,
    decide_precision,
    describe_precision_choice,
    time_interleaved,
)

QUICK = REPO_ROOT / "recipes" / "quick_cpu.yaml"
CPU = torch.device("cpu")
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities of TorchVision")


# ---------------------------------------------------------------------------------------------
# One random resized crop for both data paths


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """An image folder of lossless, non-square photos of mixed sizes (3 classes)."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for split, count in (("train", 10), ("test", 3)):
        for c in range(3):
            for i in range(count):
                height, width = (30, 52) if i % 2 else (44, 26)
                path = root / split / f"c{c}" / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return root


def splits(root: Path, in_memory: bool):
    cfg = DataConfig(name="imagefolder", root=str(root), image_size=20, in_memory=in_memory, cache=False)
    return load_splits(cfg, seed=0)


EVERY_AUGMENTATION = {  # the README's data.augment keys: hflip, crop_padding, random_resized_crop, rrc_scale
    "none": AugmentConfig(hflip=False, crop_padding=0),
    "hflip": AugmentConfig(hflip=True, crop_padding=0),
    "crop_padding": AugmentConfig(hflip=False, crop_padding=3),
    "hflip+crop_padding": AugmentConfig(hflip=True, crop_padding=3),
    "random_resized_crop": AugmentConfig(hflip=False, random_resized_crop=True),
    "random_resized_crop+hflip": AugmentConfig(hflip=True, random_resized_crop=True),
    "random_resized_crop+hflip+rrc_scale": AugmentConfig(hflip=True, random_resized_crop=True, rrc_scale=(0.08, 0.5)),
}


@pytest.mark.parametrize("name", list(EVERY_AUGMENTATION))
def test_streamed_and_in_memory_batches_are_bit_identical_under_every_augmentation(photos, name):
    augment = EVERY_AUGMENTATION[name]
    memory, streamed = splits(photos, True), splits(photos, False)
    assert isinstance(memory.train, ImageTensors) and isinstance(streamed.train, EncodedImages)

    def batches(split, epoch, **kwargs):
        loader = BatchLoader(split, batch_size=6, train=True, device=CPU, out_size=(16, 24), mean=(0.5, 0.4, 0.3),
                             std=(0.2, 0.25, 0.3), augment=augment, seed=7, workers=2, **kwargs)
        loader.set_epoch(epoch)
        return list(loader)

    for epoch in (0, 1):
        for kwargs in ({}, {"rank": 1, "world_size": 2}):  # one process, and the second of two
            a, b = batches(memory.train, epoch, **kwargs), batches(streamed.train, epoch, **kwargs)
            assert len(a) == len(b) == 5
            for (xa, ya), (xb, yb) in zip(a, b):
                assert xa.shape[-2:] == (16, 24)
                assert torch.equal(ya, yb) and torch.equal(xa, xb)
    if augment.random_resized_crop:  # the crops do something: another seed gives other batches
        other = BatchLoader(memory.train, batch_size=6, train=True, device=CPU, out_size=(16, 24), mean=(0.5,) * 3,
                            std=(0.2,) * 3, augment=augment, seed=8)
        assert not torch.equal(next(iter(other))[0], batches(memory.train, 0)[0][0])


def torchvision_rule(tries: torch.Tensor, place: torch.Tensor, size, scale, ratio):
    """torchvision's RandomResizedCrop.get_params, written as its documented loop, on given draws."""
    height, width = size
    out = []
    for b in range(tries.shape[1]):
        for t in range(tries.shape[2]):
            area = height * width * (scale[0] + (scale[1] - scale[0]) * float(tries[0, b, t]))
            aspect = math.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * float(tries[1, b, t]))
            w, h = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = min(int(float(place[0, b]) * (height - h + 1)), height - h)
                left = min(int(float(place[1, b]) * (width - w + 1)), width - w)
                out.append((top, left, h, w))
                break
        else:
            in_ratio = width / height
            if in_ratio < min(ratio):
                w, h = width, int(round(width / min(ratio)))
            elif in_ratio > max(ratio):
                h, w = height, int(round(height * max(ratio)))
            else:
                h, w = height, width
            out.append(((height - h) // 2, (width - w) // 2, h, w))
    return out


@pytest.mark.parametrize("size", [(20, 60), (60, 20), (32, 32), (7, 9)])
@pytest.mark.parametrize("scale", [(0.08, 1.0), (0.35, 1.0), (0.9, 1.0)])
def test_crop_boxes_follow_torchvisions_rule_in_pixels(size, scale):
    gen = torch.Generator().manual_seed(1)
    tries, place = torch.rand(2, 200, RRC_TRIES, generator=gen), torch.rand(2, 200, generator=gen)
    ratio = (3 / 4, 4 / 3)
    boxes = resized_crop_boxes(tries, place, size, scale, ratio)
    assert boxes.dtype == torch.int64 and boxes.shape == (4, 200)
    assert [tuple(b) for b in boxes.t().tolist()] == torchvision_rule(tries, place, size, scale, ratio)
    top, left, h, w = boxes
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= size[0]).all() and (left + w <= size[1]).all()


def test_crop_boxes_have_torchvisions_distribution_on_a_non_square_image():
    # The old boxes drew the ratio in coordinates normalised per side: on a 3:1 image their ratio
    # in pixels averaged about 3, where torchvision's stays within [3/4, 4/3].
    size, scale, ratio, n = (30, 90), (0.08, 1.0), (3 / 4, 4 / 3), 3000
    gen = torch.Generator().manual_seed(0)
    top, left, h, w = resized_crop_boxes(torch.rand(2, n, RRC_TRIES, generator=gen), torch.rand(2, n, generator=gen),
                                         size, scale, ratio).double()
    reference = torchvision.transforms.RandomResizedCrop(8, scale=scale, ratio=ratio)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        image = torch.zeros(3, *size)
        theirs = torch.tensor([reference.get_params(image, scale, ratio) for _ in range(n)], dtype=torch.float64).t()
    mine_log_ratio, their_log_ratio = torch.log(w / h).mean(), torch.log(theirs[3] / theirs[2]).mean()
    mine_area, their_area = (h * w).mean() / (30 * 90), (theirs[2] * theirs[3]).mean() / (30 * 90)
    assert abs(mine_log_ratio - their_log_ratio) < 0.03, (mine_log_ratio, their_log_ratio)
    assert abs(mine_area - their_area) < 0.02, (mine_area, their_area)
    assert (w / h).max() <= 4 / 3 * 1.1 and (w / h).min() >= 3 / 4 / 1.1  # pixels, up to rounding
    # No box fits at full area on a 3:1 image: the centre crop at the nearest ratio, as torchvision.
    gen = torch.Generator().manual_seed(0)
    fallback = resized_crop_boxes(torch.rand(2, 5, RRC_TRIES, generator=gen), torch.rand(2, 5, generator=gen),
                                  (20, 60), (1.0, 1.0), ratio)
    assert fallback.t().tolist() == [[0, 16, 20, 27]] * 5


def test_the_crop_resamples_exactly_the_box_it_drew():
    # On a ramp image (value = column), bilinear sampling is exact inside the image, so each output
    # column tells where it was sampled: the box's own columns, spread over the output's width.
    height, width, out = 40, 60, (12, 10)
    ramp = torch.arange(width, dtype=torch.float32).expand(2, 1, height, width).contiguous()
    out_x = random_resized_crop(ramp, out, (0.2, 0.6), torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)  # the same draws, in the same order
    tries, place = torch.rand(2, 2, RRC_TRIES, generator=gen), torch.rand(2, 2, generator=gen)
    boxes = resized_crop_boxes(tries, place, (height, width), (0.2, 0.6)).t().tolist()
    for image, (top, left, h, w) in zip(out_x, boxes):
        expected = left - 0.5 + (torch.arange(out[1]) + 0.5) * w / out[1]  # centres of the box's output columns
        inside = (expected >= 0) & (expected <= width - 1)
        assert inside.sum() >= out[1] - 2
        assert torch.allclose(image[0, 0][inside], expected[inside], atol=1e-3)


# ---------------------------------------------------------------------------------------------
# precision: auto, measured honestly and briefly


class FakeMachine:
    """A clock and a training step: each step advances the clock by the next of its times."""

    def __init__(self, fp32: list[float], bf16: list[float]):
        self.now, self.times, self.calls = 100.0, {"fp32": list(fp32), "bf16": list(bf16)}, []

    def clock(self) -> float:
        return self.now

    def step(self, name: str) -> None:
        self.calls.append(name)
        times = self.times[name]
        self.now += times.pop(0) if len(times) > 1 else times[0]


def test_steps_are_interleaved_with_the_order_alternating():
    machine = FakeMachine([0.010] * 100, [0.011] * 100)
    record = time_interleaved(machine.step, budget_s=5.0, clock=machine.clock)
    assert machine.calls[:2] == ["fp32", "bf16"]  # warm-up, untimed
    rounds = [tuple(machine.calls[i : i + 2]) for i in range(2, len(machine.calls), 2)]
    assert rounds[:4] == [("fp32", "bf16"), ("bf16", "fp32"), ("fp32", "bf16"), ("bf16", "fp32")]
    assert record["chosen"] == "fp32" and record["reason"] == "bf16 is not faster"
    assert record["rounds"] == PRECISION_MIN_ROUNDS  # settled: bf16 is not faster, no more rounds spent


def test_noisy_timings_keep_fp32():
    # bf16 a little faster on the median, but well within the noise of a busy machine.
    fp32 = [0.010, 0.014, 0.009, 0.013] * 25
    bf16 = [0.009, 0.012, 0.0085, 0.0125] * 25  # 9% faster on the median, slower than fp32's fastest
    machine = FakeMachine(fp32, bf16)
    record = time_interleaved(machine.step, budget_s=5.0, clock=machine.clock)
    assert record["chosen"] == "fp32" and "within the noise" in record["reason"]
    assert record["rounds"] == 20  # unclear: it measured until its round limit, then kept fp32


def test_a_clear_bf16_win_is_chosen_quickly():
    machine = FakeMachine([0.010, 0.0105, 0.0102, 0.0101] * 10, [0.006, 0.0063, 0.0061, 0.0062] * 10)
    record = time_interleaved(machine.step, budget_s=5.0, clock=machine.clock)
    assert record["chosen"] == "bf16" and record["rounds"] == PRECISION_MIN_ROUNDS
    assert record["fp32_ms_range"][0] > record["bf16_ms_range"][1]
    assert record["bf16_ms"] == pytest.approx(6.15, abs=0.01) and record["seconds"] < 0.2


@pytest.mark.parametrize("step_s", [3.0, 0.4, 13.0])
def test_the_time_bound_is_respected(step_s):
    machine = FakeMachine([step_s], [step_s * 0.5])  # bf16 twice as fast, but steps are slow
    record = time_interleaved(machine.step, budget_s=5.0, clock=machine.clock)
    assert record["seconds"] <= 5.0 + step_s  # the bound, passed by at most the step under way
    assert record["seconds"] == pytest.approx(machine.now - 100.0)
    if step_s >= 3.0:  # not even one round fits: too few to tell, fp32 kept
        assert record["chosen"] == "fp32" and record["rounds"] == 0 and "5 s bound" in record["reason"]
    else:
        assert record["chosen"] == "bf16" and record["rounds"] >= PRECISION_MIN_ROUNDS


def test_the_same_machine_gives_the_same_choice_every_time():
    rng = np.random.default_rng(1)
    for gain, expected in ((0.03, "fp32"), (0.0, "fp32"), (-0.2, "fp32"), (0.4, "bf16")):
        choices = set()
        for _ in range(30):  # 30 start-ups of one recipe, each with its own noise (+-10%)
            fp32 = list(0.020 * rng.uniform(0.9, 1.1, 40))
            bf16 = list(0.020 * (1 - gain) * rng.uniform(0.9, 1.1, 40))
            machine = FakeMachine(fp32, bf16)
            choices.add(time_interleaved(machine.step, clock=machine.clock)["chosen"])
        assert choices == {expected}, (gain, choices)


def test_the_decision_needs_bf16_beyond_the_spread():
    assert decide_precision([10] * 6, [8] * 6)[0] == "bf16"
    assert decide_precision([10] * 6, [8] * 5 + [10.5])[0] == "fp32"  # one bf16 step slower: overlap
    assert decide_precision([10, 11, 12, 14, 11, 12], [8, 8, 9, 9.5, 8, 8])[0] == "fp32"  # 26% faster, fp32 spreads 35%
    assert decide_precision([10] * 5, [5] * 5)[0] == "fp32"  # five rounds are too few
    assert decide_precision([10] * 6, [9.7] * 6)[0] == "fp32"  # 3%: not worth leaving fp32


def test_auto_prints_one_line_with_what_it_measured_and_records_it(tmp_path, monkeypatch, capsys):
    measured = {"chosen": "bf16", "reason": "bf16 40% faster on the median, beyond the noise",
                "fp32_ms": 10.0, "bf16_ms": 6.0, "fp32_ms_range": [9.8, 10.4], "bf16_ms_range": [5.9, 6.2],
                "rounds": 4, "seconds": 0.3, "budget_s": 5.0}
    calls = []

    def measure(model, batch, size):
        calls.append(batch)
        return {**measured, "batch": batch}

    monkeypatch.setattr(components, "measure_cpu_precision", measure)
    recipe = load_recipe(QUICK, [f"output.dir={tmp_path}", "output.plots=false", "train.precision=auto"])
    summary = run(recipe)
    assert calls == [32]
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("precision auto")]
    assert lines == [describe_precision_choice({**measured, "batch": 32})]
    assert "bf16" in lines[0] and "10 ms/step (9.8-10.4)" in lines[0] and "4 interleaved rounds" in lines[0]
    assert summary["precision"] == "bf16" and summary["precision_choice"]["reason"] == measured["reason"]
    assert json.loads((tmp_path / "quick_cpu" / "summary.json").read_text())["precision_choice"]["rounds"] == 4


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_an_explicit_precision_skips_the_measurement(tmp_path, monkeypatch, precision):
    def refuse(*args, **kwargs):
        raise AssertionError("an explicit precision must not be measured")

    monkeypatch.setattr(components, "measure_cpu_precision", refuse)
    recipe = load_recipe(QUICK, [f"output.dir={tmp_path}", "output.plots=false", f"train.precision={precision}"])
    summary = run(recipe, quiet=True)
    assert summary["precision"] == precision and summary["precision_choice"] is None


def test_the_real_measurement_stays_within_its_bound():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    from finetune.training.device import measure_cpu_precision

    record = measure_cpu_precision(model, 4, (8, 8), budget_s=0.5)
    assert record["seconds"] < 5 and record["chosen"] in ("fp32", "bf16") and record["batch"] == 4
    assert record["rounds"] >= 1 and record["fp32_ms"] > 0


# ---------------------------------------------------------------------------------------------
# Recipe values no run can use


def float_leaves() -> list[tuple[str, object]]:
    """Every float field of the schema, with an override value holding inf where a float goes."""
    out = []
    for key in valid_keys():
        model, *parts = key.split(".")
        section = Recipe
        for part in [model, *parts][:-1]:
            section = section.model_fields[part].annotation
        annotation = section.model_fields[key.split(".")[-1]].annotation
        text = str(annotation)
        if "float" not in text:
            continue
        if text.startswith("tuple"):
            out.append((key, "[.inf" + ", 0.5" * (text.count("float") - 1) + "]"))
        else:
            out.append((key, ".inf"))
    return out


def test_every_float_field_refuses_infinity_and_nan():
    leaves = float_leaves()
    assert {"optim.lr", "data.mean", "optim.betas", "train.dist_timeout", "data.augment.rrc_scale",
            "train.clip_grad", "data.val_split"} <= {k for k, _ in leaves}
    for key, value in leaves:
        for bad in (value, value.replace(".inf", "-.inf"), value.replace(".inf", ".nan")):
            with pytest.raises(RecipeError, match=f"{key}: must be a finite number"):
                load_recipe(QUICK, [f"{key}={bad}"])
    assert_user_error(invoke("validate", QUICK, "optim.lr=inf"), "optim.lr: must be a finite number, got 'inf'")


@pytest.mark.parametrize("size", ["31", "1", "[32, 30]"])
def test_an_img_size_the_presets_patches_do_not_split_is_refused_by_validate(size):
    assert_user_error(invoke("validate", QUICK, f"model.img_size={size}"),
                      "model.img_size", "vit_tiny_test's patch size (8)", "whole patches")
    assert invoke("validate", QUICK, "model.img_size=24").exit_code == 0
    # An explicit patch size is what counts: 31 px cannot split into 8s, 30 px splits into 5 x 6.
    assert invoke("validate", QUICK, "model.img_size=30", "model.patch_size=5").exit_code == 0


def test_the_preset_patch_sizes_the_schema_knows_are_the_presets_own():
    from finetune.models.presets import PRESETS

    patched = {name: args["patch_size"] for name, (args, _) in PRESETS.items() if "stem_channels" not in args}
    assert PRESET_PATCH_SIZES == patched


def test_a_run_name_longer_than_a_folder_name_is_refused_before_anything_is_made(tmp_path):
    out = tmp_path / "runs"
    assert_user_error(invoke("run", QUICK, "name=" + "a" * 300, f"output.dir={out}", "-q"),
                      "name: is 300 bytes long", f"at most {MAX_NAME_BYTES}")
    assert not out.exists()
    assert_user_error(invoke("validate", QUICK, "name=" + "é" * 101), "name: is 202 bytes long")  # bytes, not letters
    assert invoke("validate", QUICK, "name=" + "é" * 100).exit_code == 0
    # A name taken from a long file name is refused too.
    long_file = tmp_path / ("b" * 220 + ".yaml")
    long_file.write_text(QUICK.read_text())
    assert_user_error(invoke("validate", long_file), "the run is named after the file", "220 bytes long")
    assert invoke("validate", long_file, "name=short").exit_code == 0


@pytest.mark.parametrize("seed, phrase", [(2**40, "seed: must be <= 4294967295"), (-1, "seed: must be >= 0")])
def test_a_seed_out_of_range_is_refused_when_the_recipe_is_read(tmp_path, seed, phrase):
    assert_user_error(invoke("run", QUICK, f"seed={seed}", f"output.dir={tmp_path}", "-q"), phrase)
    assert not any(tmp_path.iterdir())
    assert load_recipe(QUICK, [f"seed={2**32 - 1}"]).seed == 2**32 - 1


# ---------------------------------------------------------------------------------------------
# Messages that name the real problem


def test_a_latin1_recipe_is_called_not_utf8_with_the_byte_not_binary(tmp_path):
    path = tmp_path / "latin.yaml"
    path.write_bytes(QUICK.read_bytes().replace(b'description: "', b'description: "caf\xe9 ', 1))
    offset = path.read_bytes().index(b"\xe9")
    text = assert_user_error(invoke("validate", path), "is not UTF-8 text", f"byte {offset} (0xe9, line 2",
                             "Latin-1", "Save it as UTF-8")
    assert "binary" not in text


@pytest.mark.parametrize("tagged", ["!!binary aGVsbG8=", "!!timestamp 2024-01-01", "!!set {a: null}",
                                    "!!str caf", "!!python/name:os.system"])
def test_every_explicit_yaml_tag_is_refused(tmp_path, tagged):
    path = tmp_path / "tagged.yaml"
    path.write_text(f"description: {tagged}\n")
    tag = tagged.split()[0]
    assert_user_error(invoke("validate", path), f"uses the YAML tag {tag}", "plain values only")
    assert_user_error(invoke("validate", QUICK, f"description={tagged}"), f"uses the YAML tag {tag}")
    assert invoke("validate", QUICK, "description=café").exit_code == 0  # plain values still read


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_fifo_recipe_is_named_as_such_and_never_opened(tmp_path):
    fifo = tmp_path / "recipe.yaml"
    os.mkfifo(fifo)
    results = []
    worker = threading.Thread(target=lambda: results.extend([invoke("validate", fifo), invoke("run", fifo)]),
                              daemon=True)
    worker.start()
    worker.join(timeout=30)  # an open for reading would wait for a writer forever
    assert not worker.is_alive(), "finetune opened the FIFO"
    for result in results:
        text = assert_user_error(result, "is a FIFO (named pipe), not a regular file", "did not open it")
        assert "not found" not in text
    with pytest.raises(RecipeError, match="FIFO"):
        load_recipe(tmp_path / "recipe")  # found by its bare name too


def test_a_val_split_larger_than_the_train_set_says_so(tmp_path):
    text = assert_user_error(invoke("run", QUICK, "data.val_split=50001", f"output.dir={tmp_path}", "-q"),
                             "data.val_split=50001 holds out 50,001 images, but the train set has only 256")
    assert "-49" not in text and "None" not in text
    assert not any(tmp_path.iterdir())
    assert_user_error(invoke("run", QUICK, "data.train_subset=300", f"output.dir={tmp_path}", "-q"),
                      "data.train_subset=300 asks for 300 images, but the train set has only 256")


# ---------------------------------------------------------------------------------------------
# Image folders: what is left out is said, and a classifier needs two classes


def folder(root: Path, classes=("a", "b"), corrupt: bool = False) -> Path:
    rng = np.random.default_rng(2)
    for split, count in (("train", 6), ("test", 2)):
        for name in classes:
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    if corrupt:
        (root / "train" / classes[0] / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    return root


def folder_run(root: Path, out: Path, *extra: str):
    return invoke("run", QUICK, "data.name=imagefolder", f"data.root={root}", "model.img_size=16",
                  "data.batch_size=4", "output.plots=false", f"output.dir={out}", *extra)


def test_skipped_files_are_warned_about_even_with_quiet(tmp_path):
    root = folder(tmp_path / "photos", corrupt=True)
    result = folder_run(root, tmp_path / "runs", "-q")
    assert result.exit_code == 0, result.output
    assert "warning: skipped 1 entry: 1 unreadable image" in " ".join(result.output.split())
    summary = json.loads((tmp_path / "runs" / "quick_cpu" / "summary.json").read_text())
    assert summary["skipped_files"]["unreadable image"]["count"] == 1


def test_one_class_is_refused_before_a_run_folder_is_made(tmp_path):
    root = folder(tmp_path / "photos", classes=("only",))
    out = tmp_path / "runs"
    assert_user_error(folder_run(root, out, "-q"), "holds one class folder (only)", "nothing to classify",
                      "at least two classes")
    assert not out.exists()
    two = folder(tmp_path / "two")
    assert_user_error(folder_run(two, out, "-q", "data.classes=[a]"), "data.classes keeps one class (a)")
    assert_user_error(invoke("run", QUICK, "data.train_subset=1", f"output.dir={out}", "-q"),
                      "Every training image left after data.train_subset", "belongs to one class")
    assert not out.exists()
    assert folder_run(two, out, "-q").exit_code == 0
