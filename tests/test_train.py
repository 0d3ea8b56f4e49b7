"""Tests for the training engine (finetune.runs.run): what a run writes, that it learns, and each option.

Every run starts from the shipped ``recipes/quick_cpu.yaml`` (synthetic images, the toy
``vit_tiny_test`` preset) with overrides, so one takes well under a second on a CPU. Pretrained
sources are conftest's DeiT release ``.pth`` or a toy model saved by ``save_model``; nothing touches
the network.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO_ROOT
from finetune import count_parameters, create_model, load_model, save_model
from finetune.data.loader import BatchLoader
from finetune.training.components import build_optimizer, build_scheduler
from finetune.errors import FinetuneError
from finetune.training.evaluate import evaluate
from finetune.recipe import load_recipe
from finetune.runs.records import read_metrics
from finetune.runs.run import prepare, run, run_dir_for

QUICK = REPO_ROOT / "recipes" / "quick_cpu.yaml"
CPU = torch.device("cpu")
# The keys of metrics.jsonl lines, as train.run writes them and report.plot_curves reads them.
STEP_KEYS = {"kind", "epoch", "step", "time_s", "loss", "lr", "images_per_s"}
EPOCH_KEYS = {
    "kind", "epoch", "step", "time_s", "train_loss", "train_acc1", "test_acc1", "test_acc5",
    "test_loss", "val_acc1", "lr", "per_class_acc",
}
# Most tests look at metrics or weights only; plots cost more than the training itself.
NO_PLOTS = "output.plots=false"


def quick(tmp_path, *overrides: str):
    """quick_cpu.yaml with its run folder under ``tmp_path/runs`` and the given overrides."""
    return load_recipe(QUICK, [f"output.dir={tmp_path / 'runs'}", *overrides])


def metric_lines(recipe, kind: str) -> list[dict]:
    return [row for row in read_metrics(run_dir_for(recipe) / "metrics.jsonl") if row["kind"] == kind]


def saved_weights(recipe) -> dict[str, torch.Tensor]:
    return load_file(run_dir_for(recipe) / "model.safetensors")


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """L2 distance between two state dicts over all their tensors."""
    return math.sqrt(sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a))


@pytest.fixture(scope="module")
def toy_source(tmp_path_factory):
    """A saved vit_tiny_test model (config.json + model.safetensors): a cheap pretrained source."""
    torch.manual_seed(0)
    model = create_model("vit_tiny_test", num_classes=10)
    return save_model(model, tmp_path_factory.mktemp("toy_source") / "toy")


# ---------------------------------------------------------------------------------------------
# The run directory


def test_run_writes_a_complete_self_describing_run_directory(tmp_path):
    recipe = quick(tmp_path, "train.epochs=2", "data.val_split=32")
    prepared = prepare(recipe)
    summary = run(recipe, quiet=True, prepared=prepared)
    run_dir = run_dir_for(recipe)

    # Exactly these files: no temporary leftovers from the atomic writes.
    assert sorted(p.name for p in run_dir.iterdir()) == [
        ".finetune-run", ".lock", "README.md", "best", "checkpoints", "config.json", "confusion_matrix.png",
        "curves.png", "metrics.jsonl", "mistakes.png", "model.safetensors", "recipe.yaml", "samples.png", "summary.json",
    ]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.safetensors"]
    assert sorted(p.name for p in (run_dir / "best").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert not list(run_dir.parent.glob(".*"))  # no staging folder left beside it
    assert load_recipe(run_dir / "recipe.yaml") == recipe

    # 256 synthetic images - 32 held out = 224 = 7 steps of 32 per epoch, a line every 2 steps.
    steps = metric_lines(recipe, "step")
    assert [row["step"] for row in steps] == [2, 4, 6, 8, 10, 12, 14]
    assert [row["epoch"] for row in steps] == [1, 1, 1, 2, 2, 2, 2]
    for row in steps:
        assert set(row) == STEP_KEYS
        assert 0 < row["loss"] < 10 and row["lr"] == pytest.approx(1e-3) and row["images_per_s"] > 0
    assert [row["time_s"] for row in steps] == sorted(row["time_s"] for row in steps)
    epochs = metric_lines(recipe, "epoch")
    assert [(row["epoch"], row["step"]) for row in epochs] == [(1, 7), (2, 14)]
    for row in epochs:
        assert EPOCH_KEYS <= set(row)
        for key in ("train_acc1", "test_acc1", "test_acc5", "val_acc1"):
            assert 0.0 <= row[key] <= 1.0, key
        assert row["test_acc1"] <= row["test_acc5"]
        assert len(row["per_class_acc"]) == 10

    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert summary["status"] == "finished" and summary["error"] is None
    assert summary["final_acc1"] == epochs[-1]["test_acc1"]
    assert summary["final_val_acc1"] == epochs[-1]["val_acc1"]
    # The best epoch is chosen on validation; its test accuracy is reported, not chosen.
    assert summary["selection"] == "val"
    assert summary["best_val_acc1"] == max(row["val_acc1"] for row in epochs)
    best_row = epochs[summary["best_epoch"] - 1]
    assert best_row["val_acc1"] == summary["best_val_acc1"] and best_row["test_acc1"] == summary["best_test_acc1"]
    assert summary["peak_test_acc1"] == max(row["test_acc1"] for row in epochs)
    assert "best_acc1" not in summary  # the old, test-selected name is gone
    assert 0.0 <= summary["final_acc1"] <= summary["final_acc5"] <= 1.0
    assert summary["params_trainable"] == summary["params_total"] == count_parameters(prepared.model).total
    assert (summary["train_images"], summary["test_images"], summary["steps"]) == (224, 128, 14)
    assert summary["wall_time_s"] >= summary["train_time_s"] > 0
    assert summary["images_per_s"] > 0
    assert summary["device"] == "cpu"
    assert {"finetune", "python", "torch", "torchvision", "timm"} <= set(summary["versions"])
    assert summary["versions"]["torch"] == torch.__version__
    confusion = torch.tensor(summary["confusion_matrix"])
    assert confusion.shape == (10, 10)
    assert int(confusion.sum()) == summary["test_images"] == 128
    assert int(confusion.diag().sum()) / 128 == pytest.approx(summary["final_acc1"])

    reloaded = load_model(run_dir)
    trained = prepared.model.state_dict()  # run() trains the prepared model in place
    assert set(reloaded.state_dict()) == set(trained)
    for name, value in reloaded.state_dict().items():
        assert torch.equal(value, trained[name]), name
    assert reloaded.pretrained_cfg["label_names"] == summary["classes"] == [f"class_{k}" for k in range(10)]

    for png in ("curves.png", "confusion_matrix.png", "samples.png", "mistakes.png"):
        data = (run_dir / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000, png


def test_saved_model_records_the_normalisation_it_was_trained_with(tmp_path):
    recipe = quick(tmp_path, "data.mean=[0.2, 0.2, 0.2]", "data.std=[0.3, 0.3, 0.3]", NO_PLOTS)
    run(recipe, quiet=True)
    cfg = load_model(run_dir_for(recipe)).pretrained_cfg  # what eval and predict normalise with
    assert (list(cfg["mean"]), list(cfg["std"])) == ([0.2] * 3, [0.3] * 3)




# ---------------------------------------------------------------------------------------------
# Learning and determinism


def test_training_lowers_the_loss(tmp_path):
    recipe = quick(tmp_path, "train.epochs=4", "optim.lr=3e-3", "train.log_every=4", NO_PLOTS)
    summary = run(recipe, quiet=True)
    losses = [row["loss"] for row in metric_lines(recipe, "step")]  # each the mean of 4 steps
    assert len(losses) == 8
    assert losses[0] > 2.0  # about ln(10) before learning anything
    assert losses[-1] < 0.8 * losses[0]
    assert summary["final_acc1"] > 0.2  # chance is 0.1


def test_same_seed_gives_the_same_run_and_another_seed_does_not(tmp_path):
    results = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        recipe = quick(tmp_path, f"name={name}", f"seed={seed}", "train.epochs=2", NO_PLOTS)
        summary = run(recipe, quiet=True)
        losses = [row["loss"] for row in metric_lines(recipe, "step")]
        results[name] = (summary, losses, saved_weights(recipe))
    (a, a_losses, a_weights), (b, b_losses, b_weights), (c, c_losses, _) = results.values()
    for key in ("final_acc1", "final_acc5", "final_loss", "peak_test_acc1", "confusion_matrix"):
        assert a[key] == b[key], key
    assert a_losses == b_losses
    assert all(torch.equal(a_weights[k], b_weights[k]) for k in a_weights)
    assert c["final_loss"] != a["final_loss"] and c_losses != a_losses


# ---------------------------------------------------------------------------------------------
# Training modes


def test_head_mode_changes_only_the_head_of_a_deit_checkpoint(tmp_path, deit_release_pth, deit_tiny_sd):
    recipe = quick(
        tmp_path, "train.mode=head", f"model.source={deit_release_pth}", "model.arch=null",
        "model.pos_embed_mode=truncate", "data.synthetic_train=32", "data.synthetic_test=16",
        "data.batch_size=16", "optim.lr=1e-2", NO_PLOTS,
    )
    prepared = prepare(recipe)
    head_before = {k: v.clone() for k, v in prepared.model.state_dict().items() if k.startswith("head.")}
    summary = run(recipe, quiet=True, prepared=prepared)

    saved = load_model(run_dir_for(recipe)).state_dict()
    assert set(head_before) == {"head.weight", "head.bias"}
    for name, value in saved.items():
        if name.startswith("head."):
            assert value.shape[0] == 10 and not torch.equal(value, head_before[name]), name
        elif name == "pos_embed":
            # 32 px with 16 px patches is a 2x2 grid: truncation keeps the first 1 + 4 slots.
            assert torch.equal(value, deit_tiny_sd["pos_embed"][:, :5])
        else:
            assert torch.equal(value, deit_tiny_sd[name]), name
    assert summary["params_trainable"] == 192 * 10 + 10
    assert summary["params_total"] == count_parameters(prepared.model).total > 5_000_000
    assert "new head: head.weight, head.bias" in summary["load_report"]


@pytest.mark.parametrize(
    "mode, trained",
    [
        # vit_tiny_test has 2 blocks, no final `norm` (mean pooling uses fc_norm) and a head.
        ("last_k", ("blocks.1.", "fc_norm.", "head.")),
        ("full", ("",)),
    ],
)
def test_last_k_and_full_modes_train_what_they_say(tmp_path, toy_source, mode, trained):
    recipe = quick(
        tmp_path, f"train.mode={mode}", "train.last_k=1", f"model.source={toy_source}", "model.arch=null",
        NO_PLOTS,
    )
    prepared = prepare(recipe)
    before = snapshot(prepared.model)
    expected = sum(p.numel() for name, p in prepared.model.named_parameters() if name.startswith(trained))
    summary = run(recipe, quiet=True, prepared=prepared)

    after = saved_weights(recipe)
    changed = {name for name in before if not torch.equal(after[name], before[name])}
    assert changed == {name for name in before if name.startswith(trained)}
    assert summary["params_trainable"] == expected
    assert summary["params_total"] == count_parameters(prepared.model).total
    assert (summary["params_trainable"] == summary["params_total"]) == (mode == "full")


# ---------------------------------------------------------------------------------------------
# Options


@pytest.mark.parametrize("precision, ran", [("bf16", "bf16"), ("fp16", "fp32")])
def test_half_precision_on_a_cpu_runs_bf16_as_asked_and_fp16_as_fp32(tmp_path, precision, ran):
    recipe = quick(tmp_path, f"train.precision={precision}", NO_PLOTS)
    summary = run(recipe, quiet=True)
    assert summary["status"] == "finished"
    assert summary["precision"] == ran  # what ran: CPUs have bf16 autocast, fp16 is slow or missing there
    assert summary["precision_asked"] == precision
    assert load_recipe(run_dir_for(recipe) / "recipe.yaml").train.precision == precision  # what was asked


def test_grad_accum_gives_the_same_update_as_one_big_batch(tmp_path):
    # One optimizer step over the same 32 images: SGD with momentum (its first step is lr * grad),
    # no weight decay and no augmentation, so only the batching differs.
    common = (
        "optim.name=sgd", "optim.lr=0.5", "optim.weight_decay=0", "data.synthetic_train=32",
        "data.augment.hflip=false", "data.augment.crop_padding=0", NO_PLOTS,
    )
    big = quick(tmp_path, "name=big", "data.batch_size=32", *common)
    prepared = prepare(big)
    start = snapshot(prepared.model)
    runs = {"big": run(big, quiet=True, prepared=prepared)}
    accum = quick(tmp_path, "name=accum", "data.batch_size=16", "train.grad_accum=2", *common)
    runs["accum"] = run(accum, quiet=True)
    small = quick(tmp_path, "name=small", "data.batch_size=16", *common)
    runs["small"] = run(small, quiet=True)

    assert [runs[name]["steps"] for name in ("big", "accum", "small")] == [1, 1, 2]
    big_w, accum_w, small_w = saved_weights(big), saved_weights(accum), saved_weights(small)
    update = distance(big_w, start)
    assert update > 1e-3
    assert distance(accum_w, big_w) < 1e-5 * update
    for name in big_w:
        torch.testing.assert_close(accum_w[name], big_w[name], rtol=1e-5, atol=1e-7)
    # Two plain steps of 16 are a different update: the comparison above can tell them apart.
    assert distance(small_w, big_w) > 0.01 * update


def test_label_smoothing_changes_the_loss(tmp_path):
    losses = {}
    for eps in (0.0, 0.3):
        recipe = quick(tmp_path, f"name=ls{eps}", f"train.label_smoothing={eps}", "train.log_every=1",
                       "train.epochs=2", "optim.lr=3e-3", NO_PLOTS)
        run(recipe, quiet=True)
        losses[eps] = [row["loss"] for row in metric_lines(recipe, "step")]
    assert losses[0.0][0] != losses[0.3][0]  # same weights and first batch: only the loss differs
    # Smoothed targets (0.73 on the class, 0.03 on each other) have entropy 1.18: no model gets lower.
    floor = -(0.73 * math.log(0.73) + 9 * 0.03 * math.log(0.03))
    assert min(losses[0.3]) > floor


def test_mixup_and_cutmix_run(tmp_path):
    recipe = quick(tmp_path, "train.mixup_alpha=0.2", "train.cutmix_alpha=1.0", "train.label_smoothing=0.1",
                   "train.epochs=2", NO_PLOTS)
    summary = run(recipe, quiet=True)
    assert summary["status"] == "finished"
    for row in metric_lines(recipe, "epoch"):
        assert row["train_acc1"] is None  # mixed targets have no top-1
        assert 0 < row["train_loss"] < 10 and 0 <= row["test_acc1"] <= 1


def test_mixup_with_an_odd_batch_size_is_a_clear_error_and_writes_nothing(tmp_path):
    recipe = quick(tmp_path, "train.mixup_alpha=0.2", "data.batch_size=31")
    with pytest.raises(FinetuneError, match=r"batch_size must be even \(got 31\)") as info:
        run(recipe, quiet=True)
    assert info.value.fix  # says what to do
    assert not (tmp_path / "runs").exists()


def test_ema_weights_are_saved_and_evaluated(tmp_path, monkeypatch):
    import timm.utils

    averages = []

    class RecordedEma(timm.utils.ModelEmaV3):
        """timm's EMA, remembered so the test can compare the saved model with it."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            averages.append(self)

    monkeypatch.setattr(timm.utils, "ModelEmaV3", RecordedEma)
    recipe = quick(tmp_path, "train.ema=true", "train.ema_decay=0.9", "optim.lr=3e-3", NO_PLOTS)
    prepared = prepare(recipe)
    start = snapshot(prepared.model)
    summary = run(recipe, quiet=True, prepared=prepared)

    (ema,) = averages
    assert ema.decay == 0.9
    assert not ema.use_warmup  # ema_decay from the second step on (train.ema_warmup is off by default)
    live, average, saved = snapshot(prepared.model), snapshot(ema.module), saved_weights(recipe)
    assert all(torch.equal(saved[k], average[k]) for k in average)
    # The average lags behind the live weights: it is a different model, closer to the start.
    assert distance(saved, live) > 0.01 * distance(live, start)
    assert distance(saved, start) < distance(live, start)

    loader = BatchLoader(prepared.data.test, batch_size=64, train=False, device=CPU,
                         out_size=prepared.out_size, mean=prepared.mean, std=prepared.std)
    result = evaluate(load_model(run_dir_for(recipe)), loader, 10)
    assert result.images == 128
    assert result.acc1 == summary["final_acc1"]  # the reported accuracy is the average's


COSINE_WITH_WARMUP = (
    # 8 steps per epoch: warmup over steps 1-8, then cosine down to min_lr at step 24.
    "schedule.name=cosine", "schedule.warmup_epochs=1", "schedule.warmup_lr=1e-5", "schedule.min_lr=1e-6",
    "optim.lr=1e-3", "train.epochs=3", "train.log_every=1", NO_PLOTS,
)


def test_cosine_schedule_warms_up_then_decays_to_min_lr(tmp_path):
    recipe = quick(tmp_path, *COSINE_WITH_WARMUP)
    run(recipe, quiet=True)
    lrs = [row["lr"] for row in metric_lines(recipe, "step")]
    assert len(lrs) == 24
    assert all(a < b for a, b in zip(lrs[:6], lrs[1:7])), lrs[:7]  # rising through the warmup
    assert all(a >= b for a, b in zip(lrs[8:], lrs[9:])), lrs[8:]  # then never rising
    assert max(lrs) <= 1e-3
    assert lrs[-1] <= 1e-6 + 0.01 * (1e-3 - 1e-6)  # near min_lr at the end


def test_step_line_lr_is_the_lr_that_step_used(tmp_path):
    recipe = quick(tmp_path, *COSINE_WITH_WARMUP)
    run(recipe, quiet=True)
    assert metric_lines(recipe, "step")[0]["lr"] == pytest.approx(1e-5)  # step 1 runs at warmup_lr


def test_cosine_schedule_reaches_the_peak_lr_after_warmup(tmp_path):
    recipe = quick(tmp_path, *COSINE_WITH_WARMUP)
    model = create_model("vit_tiny_test", num_classes=10)
    optimizer = build_optimizer(recipe, model, CPU)
    scheduler = build_scheduler(recipe, optimizer, steps_per_epoch=8)
    scheduler.step_update(num_updates=8)  # the first update after the 8 warmup updates
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)


@pytest.mark.parametrize(
    "name, extra, expected",
    [
        # (schedule, overrides, lr after 0, 8, 16 and 24 updates of 8 per epoch, peak 1e-3)
        ("constant", (), [1e-3, 1e-3, 1e-3, 1e-3]),
        ("step", ("schedule.step_epochs=1", "schedule.step_gamma=0.5"), [1e-3, 5e-4, 2.5e-4, 1.25e-4]),
        ("cosine", ("schedule.min_lr=0",), [1e-3, 7.5e-4, 2.5e-4, 0.0]),
    ],
)
def test_build_scheduler_shapes(tmp_path, name, extra, expected):
    recipe = quick(tmp_path, f"schedule.name={name}", "train.epochs=3", *extra)
    model = create_model("vit_tiny_test", num_classes=10)
    optimizer = build_optimizer(recipe, model, CPU)
    scheduler = build_scheduler(recipe, optimizer, steps_per_epoch=8)
    got = []
    for t in (0, 8, 16, 24):
        scheduler.step_update(num_updates=t)
        got.append(optimizer.param_groups[0]["lr"])
    assert got == pytest.approx(expected, abs=1e-9)


def test_build_optimizer_groups_and_kinds(tmp_path):
    model = create_model("vit_tiny_test", num_classes=10)
    sgd = build_optimizer(quick(tmp_path, "optim.name=sgd", "optim.momentum=0.8"), model, CPU)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.8
    adamw = build_optimizer(quick(tmp_path, "optim.weight_decay=0.05"), model, CPU)
    assert isinstance(adamw, torch.optim.AdamW)
    decay = {id(p): g["weight_decay"] for g in adamw.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert decay[id(named["blocks.0.attn.qkv.weight"])] == 0.05
    for no_decay in ("cls_token", "pos_embed", "blocks.0.norm1.weight", "head.bias"):
        assert decay[id(named[no_decay])] == 0.0, no_decay
    assert len(decay) == len(named)

    model.requires_grad_(False)
    with pytest.raises(FinetuneError, match="Nothing to train"):
        build_optimizer(quick(tmp_path), model, CPU)


def test_layer_decay_scales_the_lr_by_depth_and_runs(tmp_path):
    recipe = quick(tmp_path, "optim.layer_decay=0.5", NO_PLOTS)
    prepared = prepare(recipe)
    optimizer = build_optimizer(recipe, prepared.model, CPU)
    build_scheduler(recipe, optimizer, steps_per_epoch=8)  # applies each group's lr_scale
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    named = dict(prepared.model.named_parameters())
    # 2 blocks: the head and final norm at the full lr, each block below it halved, the stem last.
    for name, scale in (("head.weight", 1.0), ("fc_norm.weight", 1.0), ("blocks.1.attn.qkv.weight", 0.5),
                        ("blocks.0.attn.qkv.weight", 0.25), ("patch_embed.proj.weight", 0.125)):
        assert lr_of[id(named[name])] == pytest.approx(1e-3 * scale), name

    summary = run(recipe, quiet=True, prepared=prepared)
    assert summary["status"] == "finished" and summary["steps"] == 8


def test_ema_warmup_tracks_training_and_says_which_decay_it_reached(tmp_path):
    # With 0.9998 from the second step the average stays near the first step's weights for thousands
    # of steps; train.ema_warmup ramps the decay up, so it tracks the trained model after a few dozen,
    # and the run says that its 24 steps end far below the decay asked for.
    from finetune.training.components import TrainingWarning

    recipe = quick(tmp_path, "train.ema=true", "train.ema_warmup=true", "train.epochs=3", "optim.lr=3e-3", NO_PLOTS)
    prepared = prepare(recipe)
    start = snapshot(prepared.model)
    with pytest.warns(TrainingWarning, match=r"24 steps end at decay 0\.87981 .* short of train.ema_decay=0.9998"):
        run(recipe, quiet=True, prepared=prepared)
    live, saved = snapshot(prepared.model), saved_weights(recipe)
    assert distance(saved, start) > 0.5 * distance(live, start)


def test_num_classes_that_differs_from_the_dataset_is_an_error(tmp_path):
    with pytest.raises(FinetuneError, match="model.num_classes is 12 but the dataset has 10 classes"):
        prepare(quick(tmp_path, "model.num_classes=12"))
    assert not (tmp_path / "runs").exists()


def test_a_file_where_the_run_folder_goes_is_an_error(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "quick_cpu").write_text("not a folder")
    with pytest.raises(FinetuneError, match="is a file"):
        prepare(quick(tmp_path))


# ---------------------------------------------------------------------------------------------
# Honest selection


def scripted_evaluation(monkeypatch, val_accs, test_accs):
    """Make evaluation report the given accuracies, epoch by epoch, and remember the weights it saw."""
    import finetune.training.loop as loop
    from finetune.training.evaluate import EvalResult

    seen, calls = [], {"val": 0, "test": 0}

    def evaluate(model, loader, num_classes, **kwargs):
        split = "val" if loader.num_images == 32 else "test"  # the val split is 32 images here
        accs = val_accs if split == "val" else test_accs
        acc = accs[calls[split]]
        calls[split] += 1
        if split == "test":
            seen.append(snapshot(model))
        confusion = [[0] * num_classes for _ in range(num_classes)]
        return EvalResult(acc1=acc, acc5=1.0, loss=1.0, per_class_acc=[acc] * num_classes, confusion=confusion, images=128)

    monkeypatch.setattr(loop, "evaluate", evaluate)
    return seen


def test_the_best_epoch_and_its_model_are_chosen_on_validation(tmp_path, monkeypatch):
    # Validation is best at epoch 2, the test set at epoch 1: the run reports epoch 2.
    seen = scripted_evaluation(monkeypatch, val_accs=[0.5, 0.7, 0.6, 0.7], test_accs=[0.9, 0.6, 0.8, 0.5])
    recipe = quick(tmp_path, "train.epochs=4", "data.val_split=32", NO_PLOTS)
    summary = run(recipe, quiet=True)
    assert summary["selection"] == "val"
    assert (summary["best_epoch"], summary["best_val_acc1"], summary["best_test_acc1"]) == (2, 0.7, 0.6)
    assert summary["final_acc1"] == 0.5 and summary["final_val_acc1"] == 0.7  # a later tie does not move it
    assert (summary["peak_test_acc1"], summary["peak_test_epoch"]) == (0.9, 1)  # recorded, not used
    best = load_file(run_dir_for(recipe) / "best" / "model.safetensors")
    assert all(torch.equal(best[k], seen[1][k]) for k in best)  # the weights evaluated at epoch 2
    final = saved_weights(recipe)
    assert all(torch.equal(final[k], seen[3][k]) for k in final)
    assert load_model(run_dir_for(recipe) / "best").pretrained_cfg["label_names"] == summary["classes"]


def test_without_a_validation_split_nothing_is_selected(tmp_path, monkeypatch):
    scripted_evaluation(monkeypatch, val_accs=[], test_accs=[0.9, 0.6, 0.8])
    recipe = quick(tmp_path, "train.epochs=3", NO_PLOTS)
    summary = run(recipe, quiet=True)
    assert summary["selection"] == "final" and summary["final_acc1"] == 0.8
    assert not {"best_epoch", "best_val_acc1", "best_test_acc1"} & set(summary)
    assert (summary["peak_test_acc1"], summary["peak_test_epoch"]) == (0.9, 1)
    assert not (run_dir_for(recipe) / "best").exists()


# ---------------------------------------------------------------------------------------------
# The engine's parts, without a run folder


def test_the_loop_runs_without_a_run_folder(tmp_path):
    from finetune.training.callbacks import Callback
    from finetune.training.loop import evaluate_epoch, fit, train_one_epoch
    from finetune.training.setup import build, prepare

    recipe = quick(tmp_path, "train.epochs=2", "data.val_split=32", "train.log_every=1")

    class Record(Callback):
        def __init__(self):
            self.events = []

        def on_log(self, state, row):
            self.events.append(("log", row["step"]))

        def on_step_end(self, state):
            self.events.append(("step", state.progress.step))

        def on_epoch_end(self, state, row):
            self.events.append(("epoch", row["epoch"], state.progress.epoch))

    state = build(prepare(recipe))
    assert state.progress.epoch == 1 and state.progress.step == 0 and not state.scaler.is_enabled()
    record = Record()
    fit(state, record)
    assert not (tmp_path / "runs").exists()  # nothing written
    assert record.events[:3] == [("log", 1), ("step", 1), ("log", 2)]
    assert [e for e in record.events if e[0] == "epoch"] == [("epoch", 1, 2), ("epoch", 2, 3)]
    assert state.progress.step == 14 and state.progress.best["epoch"] in (1, 2)

    # One more epoch by hand: train_one_epoch and evaluate_epoch are usable alone.
    state.progress.epoch, state.progress.batch = 3, 0
    state.meters.reset_epoch()
    train_one_epoch(state, Callback())
    row = evaluate_epoch(state)
    assert state.progress.step == 21 and row["epoch"] == 3 and 0 <= row["val_acc1"] <= 1
