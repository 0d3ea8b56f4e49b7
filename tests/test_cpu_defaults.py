"""CPU defaults: threads from the physical cores, and bf16 against fp32 decided by measurement.

These check the resolved settings, never the speed: timings are replaced by fixed ones where a
choice must be forced, so the tests do not depend on how busy the machine is.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

import finetune.training.device as device_mod
import finetune.training.components as components
from conftest import REPO_ROOT, send_at_step
from finetune.training.device import autocast_dtype, cpu_threads, measure_cpu_precision, physical_cores
from finetune.recipe import load_recipe
from finetune.runs.run import resume, run

QUICK = REPO_ROOT / "recipes" / "quick_cpu.yaml"
FAST = ("output.plots=false", "train.log_every=1")
CPU = torch.device("cpu")


def quick(out, *overrides):
    return load_recipe(QUICK, [f"output.dir={out}", *FAST, *overrides])


def summary_of(folder):
    return json.loads((folder / "summary.json").read_text())


def forced(chosen: str):
    """A stand-in for the measurement that always answers ``chosen``."""
    calls = []

    def measure(model, batch, size, *, steps=3):
        calls.append((batch, size))
        return {"fp32_ms": 10.0, "bf16_ms": 5.0 if chosen == "bf16" else 20.0, "chosen": chosen,
                "batch": batch, "steps": steps}

    return measure, calls


def test_precision_defaults_to_auto_and_auto_means_fp32_for_eval_on_a_cpu():
    assert load_recipe(QUICK, ["train.precision=auto"]).train.precision == "auto"
    from finetune.recipe import TrainConfig

    assert TrainConfig().precision == "auto"
    assert autocast_dtype("auto", CPU) is None  # eval and predict: exact fp32
    assert autocast_dtype("bf16", CPU) is torch.bfloat16  # asked for explicitly: honoured
    assert autocast_dtype("fp16", CPU) is None  # slow or missing on CPUs: fp32, with a warning


@pytest.mark.parametrize("chosen", ["fp32", "bf16"])
def test_auto_on_a_cpu_trains_in_what_the_measurement_chose_and_records_it(tmp_path, monkeypatch, chosen):
    measure, calls = forced(chosen)
    monkeypatch.setattr(components, "measure_cpu_precision", measure)
    summary = run(quick(tmp_path, "train.precision=auto"), quiet=True)
    assert summary["status"] == "finished"
    assert calls == [(32, (32, 32))]  # once, on the run's own batch and image size
    assert summary["precision"] == chosen and summary["precision_asked"] == "auto"
    assert summary["precision_choice"]["chosen"] == chosen
    assert summary["precision_choice"]["fp32_ms"] == 10.0


def test_the_measurement_leaves_the_model_and_random_state_untouched():
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = torch.get_rng_state()
    choice = measure_cpu_precision(model, 4, (8, 8), budget_s=1.0)
    assert choice["chosen"] in ("fp32", "bf16") and choice["fp32_ms"] > 0 and choice["bf16_ms"] > 0
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_bf16_is_chosen_only_when_it_is_clearly_faster():
    decide = device_mod.decide_precision
    fp32 = [10.0, 10.1, 10.0, 10.2, 10.1, 10.0]
    assert decide(fp32, [9.7, 9.7, 9.8, 9.7, 9.7, 9.7])[0] == "fp32"  # 3% faster: not worth it
    assert decide(fp32, [9.4, 9.3, 9.4, 9.3, 9.4, 9.4])[0] == "bf16"  # 6% faster in every round, noise 2%
    assert decide(fp32, [12.0, 12.0, 12.1, 12.0, 12.0, 12.1])[0] == "fp32"


def test_a_resume_keeps_the_precision_the_run_chose_without_measuring_again(tmp_path, monkeypatch):
    measure, calls = forced("bf16")
    monkeypatch.setattr(components, "measure_cpu_precision", measure)
    recipe = quick(tmp_path, "train.precision=auto", "train.epochs=2", "output.checkpoint_every_steps=3")
    send_at_step(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        run(recipe, quiet=True)
    assert len(calls) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("a resume must not measure again")

    monkeypatch.setattr(components, "measure_cpu_precision", refuse)
    folder = tmp_path / "quick_cpu"
    summary = resume(folder, quiet=True)
    assert summary["status"] == "finished"
    assert summary["precision"] == "bf16"


def test_cpu_threads_are_the_physical_cores_shared_among_processes(monkeypatch):
    cores = physical_cores()
    assert 1 <= cores <= (os.cpu_count() or 1)
    assert cpu_threads(None, 1) == cores
    assert cpu_threads(None, 2 * cores) == 1  # never zero
    assert cpu_threads(3, 4) == 3  # asked for: taken as given


def test_cpu_threads_setting_is_applied_and_recorded(tmp_path):
    before = torch.get_num_threads()
    try:
        summary = run(quick(tmp_path, "train.cpu_threads=1"), quiet=True)
        assert summary["cpu_threads"] == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    summary = run(quick(tmp_path, "name=default_threads"), quiet=True)
    assert summary["cpu_threads"] == torch.get_num_threads()  # one process keeps torch's own count


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_the_optimizer_steps_with_the_fused_kernel_on_a_cpu_unless_told_otherwise(tmp_path, name):
    model = torch.nn.Linear(4, 2)
    fused = components.build_optimizer(quick(tmp_path, f"optim.name={name}"), model, CPU)
    assert components.optimizer_kernel(fused) == "fused"
    loop = components.build_optimizer(quick(tmp_path, f"optim.name={name}", "optim.fused=false"), model, CPU)
    assert components.optimizer_kernel(loop) == "for-loop"


def test_a_run_records_its_optimizer_kernel_and_fused_matches_the_loop(tmp_path):
    summaries = {}
    for fused in ("true", "false"):
        out = tmp_path / fused
        summaries[fused] = run(quick(out, f"optim.fused={fused}", "train.precision=fp32"), quiet=True)
    assert summaries["true"]["optimizer_kernel"] == "fused"
    assert summaries["false"]["optimizer_kernel"] == "for-loop"
    # The same arithmetic in another order: the two runs end within rounding of each other.
    assert summaries["true"]["final_loss"] == pytest.approx(summaries["false"]["final_loss"], rel=1e-3)


@pytest.mark.parametrize("name", ["vit_lab_fast", "vit_cifar_cpu_15min", "vit_cifar_cpu", "vit_cifar_cpu_60min"])
def test_the_cpu_recipes_run_as_shipped_on_a_small_synthetic_set(tmp_path, name):
    """The CPU recipes resolve to what their headers promise and run end to end (on 96 synthetic
    images instead of CIFAR-10, one epoch): fused steps, validation kept; the lab's recipe measures
    its precision, the budgeted ones are fp32 in channels-last memory and plan from their budget."""
    budgeted = name != "vit_lab_fast"
    recipe = load_recipe(REPO_ROOT / "recipes" / f"{name}.yaml", [
        f"output.dir={tmp_path}", "output.plots=false", "train.epochs=1", "data.name=synthetic",
        "data.synthetic_train=96", "data.synthetic_test=32", "data.batch_size=16",
        *(["data.val_split=16", "train.time_budget=null"] if budgeted else [])])
    assert recipe.optim.fused is None and recipe.train.cpu_threads is None
    assert recipe.train.precision == ("fp32" if budgeted else "auto")
    summary = run(recipe, quiet=True)
    assert summary["status"] == "finished" and summary["optimizer_kernel"] == "fused"
    if name == "vit_lab_fast":  # the lab's model, unchanged: only the recipe differs
        assert summary["precision"] in ("fp32", "bf16") and summary["precision_choice"]["chosen"] == summary["precision"]
        lab = load_recipe(REPO_ROOT / "recipes" / "vit_lab_cifar.yaml")
        assert recipe.model == lab.model and recipe.data.mean == lab.data.mean and summary["arch"] == "vit_lab"
    else:
        shipped = load_recipe(REPO_ROOT / "recipes" / f"{name}.yaml")
        minutes = {"vit_cifar_cpu_15min": 15, "vit_cifar_cpu": 30, "vit_cifar_cpu_60min": 60}[name]
        assert shipped.train.time_budget == minutes and shipped.train.channels_last
        assert shipped.data.val_split == 5000 and summary["arch"] == "vit_cifar_conv"
        assert summary["selection"] == "val" and summary["val_images"] == 16 and summary["precision"] == "fp32"
        # The three budget recipes are copies of one: only the minutes, how often the hour evaluates,
        # the name and the description may differ.
        differ = {"name": True, "description": True, "train": {"time_budget", "eval_every"}}
        thirty = load_recipe(REPO_ROOT / "recipes" / "vit_cifar_cpu.yaml").model_dump(exclude=differ)
        assert shipped.model_dump(exclude=differ) == thirty


def test_the_conv_tokenizer_model_resumes_bit_identically(tmp_path, monkeypatch):
    """vit_cifar_conv has BatchNorm buffers and a stem timm builds without a probe forward: a run
    stopped by SIGTERM and resumed ends with the same weights as one that never stopped."""
    from safetensors.torch import load_file

    args = ("model.arch=vit_cifar_conv", "train.epochs=2", "output.checkpoint_every_steps=3", "train.precision=fp32")
    whole = run(quick(tmp_path / "whole", *args), quiet=True)
    assert whole["status"] == "finished"
    send_at_step(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        run(quick(tmp_path / "cut", *args), quiet=True)
    monkeypatch.undo()
    assert resume(tmp_path / "cut" / "quick_cpu", quiet=True)["status"] == "finished"
    a = load_file(tmp_path / "whole" / "quick_cpu" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "quick_cpu" / "model.safetensors")
    assert a.keys() == b.keys() and any("running_mean" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
