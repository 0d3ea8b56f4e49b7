"""Training to a time budget (``train.time_budget``): the probe's timing, the plan made from it,
a real budgeted run that follows its plan, a resume after ``kill -9`` that keeps the recorded plan
and ends bit-identical to an uninterrupted run (CPU, fp32), refusals of impossible budgets, the
noisy-probe warning and the schema's bounds.

Plans that must be equal across runs come from a fixed probe record (``budget.time_steps``
replaced), so they do not depend on how busy the machine is; one test checks that the real probe
leaves the run exactly as a run with the same plan and no probe.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from typer.testing import CliRunner

import finetune.training.budget as budget
from conftest import REPO_ROOT, send_at_step
from finetune.cli import app
from finetune.errors import FinetuneError, RecipeError, RunInterrupted
from finetune.recipe import load_recipe
from finetune.runs.folder import CHECKPOINT
from finetune.runs.run import resume, run, run_dir_for
from finetune.snapshot import load_state
from finetune.training.budget import BudgetPlan, plan_budget, smallest_budget, time_steps
from finetune.training.callbacks import Callback
from finetune.training.components import base_lr, build_scheduler
from finetune.training.loop import fit
from finetune.training.setup import build, prepare
from test_resume import ONE_THREAD, assert_same_run, quick, quick_args, strict_json_lines

runner = CliRunner()
NO_PLOTS = "output.plots=false"


class FakeClock:
    """A clock that moves only when a fake step says how long it took."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def steps(self, durations):
        remaining = iter(durations)

        def step():
            self.now += next(remaining)

        return step


def fixed_probe(median_s: float, *, noisy: bool = False) -> dict:
    p90 = median_s * (1.5 if noisy else 1.0)
    return {"median_s": median_s, "p90_s": p90, "steps": 7, "seconds": 0.5, "noisy": noisy}


def use_fixed_probe(monkeypatch, record: dict) -> None:
    monkeypatch.setattr(budget, "time_steps", lambda step, **kwargs: dict(record))


def summary_of(recipe) -> dict:
    return json.loads((run_dir_for(recipe) / "summary.json").read_text())


# ---------------------------------------------------------------------------------------------
# (a) The probe's timing and the plan, from a fake clock and a given step time


def test_the_probe_times_steps_after_an_untimed_warm_up_within_its_bound():
    clock = FakeClock()
    step = clock.steps([5.0] + [0.2] * 100)  # a slow first step (compilation), then 0.2 s steps
    record = time_steps(step, seconds=6.0, max_steps=50, clock=clock)
    # The warm-up's 5 s count towards the bound: 5.0 + 0.2 * 5 = 6.0 s, then it stops.
    assert record["steps"] == 5 and record["median_s"] == pytest.approx(0.2)
    assert record["seconds"] == pytest.approx(6.0) and record["noisy"] is False
    clock = FakeClock()
    record = time_steps(clock.steps([0.1] * 100), seconds=60.0, max_steps=12, clock=clock)
    assert record["steps"] == 12  # fast steps stop at max_steps, long before the bound
    clock = FakeClock()
    record = time_steps(clock.steps([30.0, 30.0, 30.0]), seconds=5.0, clock=clock)
    assert record["steps"] == 1  # one step is always timed, whatever the bound


def test_the_plan_follows_its_formula_and_cuts_the_last_epoch_short():
    plan = plan_budget(0.5, fixed_probe(0.2), steps_per_epoch=8, warmup_steps=4)
    # 0.5 min = 30 s, less the 5% margin = 28.5 s, at 0.2 s a step: 142 whole steps.
    assert plan.steps == math.floor(0.5 * 60 * (1 - budget.BUDGET_MARGIN) / 0.2) == 142
    assert plan.epochs == 18 and plan.last_epoch_steps == 142 - 17 * 8 == 6
    assert (plan.step_s, plan.warmup_steps, plan.margin) == (0.2, 4, budget.BUDGET_MARGIN)
    assert BudgetPlan.from_dict(plan.to_dict()) == plan
    exact = plan_budget(0.5, fixed_probe(0.3), steps_per_epoch=10, warmup_steps=0)
    assert (exact.steps, exact.epochs, exact.last_epoch_steps) == (95, 10, 5)


def test_the_schedule_reaches_min_lr_at_the_last_planned_step(tmp_path):
    recipe = quick(tmp_path, "train.time_budget=0.5", "schedule.name=cosine", "schedule.warmup_epochs=0.5",
                   "schedule.min_lr=1e-5", "optim.lr=1e-3")
    plan = plan_budget(0.5, fixed_probe(0.2), steps_per_epoch=8, warmup_steps=4)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=recipe.optim.lr)
    scheduler = build_scheduler(recipe, optimizer, 8, plan.steps)
    lrs = []
    for step in range(1, plan.steps + 1):
        scheduler.step_update(num_updates=step)
        lrs.append(base_lr(optimizer))
    assert lrs[3] == pytest.approx(1e-3)  # the peak, at the end of the 4-step warm-up
    assert lrs[-1] == pytest.approx(1e-5) and lrs[-2] > 1e-5 * 1.0001  # min_lr first at the last step


def test_the_loop_stops_at_the_planned_step_in_a_cut_short_last_epoch(tmp_path):
    recipe = quick(tmp_path, "train.time_budget=0.5", "schedule.name=cosine", "schedule.min_lr=1e-5")
    plan = plan_budget(0.0048, fixed_probe(0.01), steps_per_epoch=8, warmup_steps=0)
    assert (plan.steps, plan.epochs, plan.last_epoch_steps) == (27, 4, 3)

    class Steps(Callback):
        def __init__(self):
            self.per_epoch, self.lrs, self.evaluated = {}, [], []

        def on_step_end(self, state):
            self.per_epoch[state.progress.epoch] = self.per_epoch.get(state.progress.epoch, 0) + 1
            self.lrs.append(state.progress.lr)

        def on_epoch_end(self, state, row):
            self.evaluated.append(row["epoch"])

    state = build(prepare(recipe), budget=plan)  # a recorded plan: nothing is measured
    seen = Steps()
    fit(state, seen)
    assert state.progress.step == 27 and state.epochs == 4 and state.total_steps == 27
    assert seen.per_epoch == {1: 8, 2: 8, 3: 8, 4: 3} and seen.evaluated == [1, 2, 3, 4]
    assert base_lr(state.optimizer) == pytest.approx(1e-5) and seen.lrs[-1] > 1e-5  # the schedule ended there
    assert [e["epoch"] for e in state.progress.evaluations] == [1, 2, 3, 4]


# ---------------------------------------------------------------------------------------------
# (b) A real budgeted run


def test_a_budgeted_run_takes_exactly_its_planned_steps_and_records_the_plan(tmp_path):
    recipe = quick(tmp_path, "name=budgeted", "train.time_budget=0.03", "data.val_split=32", NO_PLOTS)
    result = runner.invoke(app, ["run", *quick_args(tmp_path, "name=budgeted", "train.time_budget=0.03",
                                                     "data.val_split=32", NO_PLOTS)])
    assert result.exit_code == 0, result.output
    summary = summary_of(recipe)
    tb = summary["time_budget"]
    probe = tb["probe"]
    assert probe["steps"] >= 1 and probe["median_step_s"] > 0 and probe["p90_step_s"] >= probe["median_step_s"]
    assert probe["seconds"] > 0 and isinstance(probe["noisy"], bool)
    assert tb["planned_steps"] == math.floor(0.03 * 60 * (1 - tb["margin"]) / probe["median_step_s"] + 1e-9)
    assert tb["steps_per_epoch"] == 7 and tb["planned_epochs"] == math.ceil(tb["planned_steps"] / 7)
    assert tb["last_epoch_steps"] == tb["planned_steps"] - 7 * (tb["planned_epochs"] - 1)
    assert summary["steps"] == tb["planned_steps"] and summary["epochs"] == summary["epochs_done"] == tb["planned_epochs"]
    rows = strict_json_lines(run_dir_for(recipe) / "metrics.jsonl")
    epochs = [r for r in rows if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == list(range(1, tb["planned_epochs"] + 1))
    assert epochs[-1]["step"] == tb["planned_steps"]
    # The training time used, evaluation apart, and whether it fitted.
    assert tb["train_time_s"] == summary["train_time_s"] > 0 and tb["eval_time_s"] > 0
    assert tb["within_budget"] == (tb["train_time_s"] <= 0.03 * 60)
    # For each share of the budget: the latest evaluation done by then.
    assert [f["fraction"] for f in tb["at_fractions"]] == [0.25, 0.5, 0.75, 1.0]
    checkpoint = load_state(run_dir_for(recipe) / CHECKPOINT)
    evaluations = checkpoint["progress"]["evaluations"]  # the metrics' epoch lines, times unrounded
    assert [(e["epoch"], e["test_acc1"]) for e in evaluations] == [(r["epoch"], r["test_acc1"]) for r in epochs]
    assert all(e["time_s"] == pytest.approx(r["time_s"], abs=1e-4) for e, r in zip(evaluations, epochs))
    for share in tb["at_fractions"]:
        done = [e for e in evaluations if e["time_s"] <= share["budget_s"]]
        assert share["budget_s"] == pytest.approx(share["fraction"] * 0.03 * 60)
        assert share["epoch"] == (done[-1]["epoch"] if done else None)
        if done:
            assert (share["test_acc1"], share["val_acc1"]) == (done[-1]["test_acc1"], done[-1]["val_acc1"])
    # The plan is in the checkpoint, and the closing line names it.
    assert checkpoint["time_budget"]["steps"] == tb["planned_steps"]
    assert f"planned {tb['planned_steps']:,} steps for 0.03 min from a" in result.stdout
    assert "time budget 0.03 min: a training step takes" in result.output


def test_a_budget_with_an_epoch_of_warm_up_and_the_default_epochs_logs_no_scheduler_warning(tmp_path, caplog):
    """train.epochs is ignored with a budget, so its default (1) beside a one-epoch warm-up is a
    valid recipe: neither the probe's schedule nor the run's may be an empty cosine (timm warns)."""
    recipe = quick(tmp_path, "train.time_budget=0.02", "train.epochs=1", "schedule.name=cosine",
                   "schedule.warmup_epochs=1", NO_PLOTS)
    with caplog.at_level("WARNING"):
        summary = run(recipe, quiet=True)
    assert summary["status"] == "finished" and summary["time_budget"]["planned_steps"] >= 1
    assert not [r for r in caplog.records if "no effect on the learning rate" in r.getMessage()]


def test_the_probe_leaves_the_run_as_a_run_with_the_same_plan_and_no_probe(tmp_path, monkeypatch):
    # Drop path, Mixup and random crops draw from every random stream the probe must leave alone.
    args = ("train.time_budget=0.02", "model.drop_path_rate=0.2", "train.mixup_alpha=0.4", "train.ema=true",
            "data.augment.random_resized_crop=true", "output.checkpoint_every=0", NO_PLOTS)
    probed = quick(tmp_path, "name=probed", *args)
    run(probed, quiet=True)
    measured = summary_of(probed)["time_budget"]["probe"]
    use_fixed_probe(monkeypatch, {"median_s": measured["median_step_s"], "p90_s": measured["p90_step_s"],
                                  "steps": measured["steps"], "seconds": measured["seconds"], "noisy": measured["noisy"]})
    unprobed = quick(tmp_path, "name=unprobed", *args)
    run(unprobed, quiet=True)
    assert summary_of(unprobed)["time_budget"]["planned_steps"] == summary_of(probed)["time_budget"]["planned_steps"]
    assert_same_run(run_dir_for(probed), run_dir_for(unprobed))


# ---------------------------------------------------------------------------------------------
# (c) Resume after kill -9 keeps the recorded plan

# A child that trains with a fixed probe and SIGKILLs itself right after its N-th checkpoint.
KILLER = textwrap.dedent('''
    import os, signal, sys
    import finetune.runs.rundir as rundir, finetune.training.budget as budget
    from finetune.recipe import load_recipe
    from finetune.runs.run import run

    n, median = int(sys.argv[1]), float(sys.argv[2])
    budget.time_steps = lambda step, **kw: {"median_s": median, "p90_s": median, "steps": 7, "seconds": 0.5,
                                            "noisy": False}
    seen = []
    real_save = rundir.RunDir.save_checkpoint

    def save(self, state):
        seen.append(state["progress"]["step"])
        real_save(self, state)
        if len(seen) == n:
            os.kill(os.getpid(), signal.SIGKILL)

    rundir.RunDir.save_checkpoint = save
    run(load_recipe(sys.argv[3], sys.argv[4:]), quiet=True)
''')
# Mixup/CutMix, EMA, drop path, random resized crops, gradient accumulation, clipping, layer decay and
# a validation split: 224 training images, 4 steps of 2 x 28 per epoch, a cosine with a warm-up.
FULL_STATE = (
    "data.val_split=32", "data.batch_size=28", "train.grad_accum=2", "train.log_every=1",
    "train.mixup_alpha=0.4", "train.cutmix_alpha=1.0", "train.ema=true", "train.ema_decay=0.9",
    "model.drop_path_rate=0.2", "data.augment.random_resized_crop=true", "optim.layer_decay=0.7",
    "train.clip_grad=1.0", "schedule.name=cosine", "schedule.warmup_epochs=0.5", NO_PLOTS,
    "output.checkpoint_every_steps=3", "train.time_budget=0.0018",
)


def test_a_killed_budgeted_run_resumes_with_its_plan_and_ends_bit_identical(tmp_path, monkeypatch):
    # 0.0018 min less 5%, at 0.01 s a step: 10 steps, 3 epochs of 4, the last cut to 2 steps.
    assert plan_budget(0.0018, fixed_probe(0.01), 4, 2).steps == 10
    # Checkpoints at steps 3, 4 (epoch 1's end), 6, 8 (epoch 2's end), 9: the 5th is inside the last epoch.
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    child = subprocess.run([sys.executable, str(script), "5", "0.01", *quick_args(tmp_path, "name=killed", *FULL_STATE)],
                           env=ONE_THREAD, capture_output=True, text=True, timeout=300)
    assert child.returncode == -9, child.stderr
    killed = tmp_path / "runs" / "killed"
    checkpoint = load_state(killed / CHECKPOINT)
    assert (checkpoint["progress"]["epoch"], checkpoint["progress"]["batch"], checkpoint["progress"]["step"]) == (3, 2, 9)
    assert checkpoint["time_budget"]["steps"] == 10 and checkpoint["time_budget"]["step_s"] == 0.01

    def no_probe(*args, **kwargs):
        raise AssertionError("a resumed budgeted run measured its step again")

    monkeypatch.setattr(budget, "time_steps", no_probe)
    resume(killed, quiet=True)
    use_fixed_probe(monkeypatch, fixed_probe(0.01))
    run(quick(tmp_path, "name=straight", *FULL_STATE), quiet=True)
    assert_same_run(killed, tmp_path / "runs" / "straight")
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["steps"] == summary["time_budget"]["planned_steps"] == 10
    assert summary["time_budget"]["probe"]["median_step_s"] == 0.01 and summary["epochs_done"] == 3
    assert [r["step"] for r in strict_json_lines(killed / "metrics.jsonl") if r["kind"] == "step"] == list(range(1, 11))


def test_a_run_stopped_at_its_last_planned_step_resumes_without_another_step(tmp_path, monkeypatch):
    use_fixed_probe(monkeypatch, fixed_probe(0.01))
    args = ("train.time_budget=0.0048", "data.val_split=32", NO_PLOTS)  # 27 steps: epochs of 7, 7, 7, 6
    send_at_step(monkeypatch, 27, run="stopped")
    with pytest.raises(RunInterrupted):
        run(quick(tmp_path, "name=stopped", *args), quiet=True)
    stopped = tmp_path / "runs" / "stopped"
    progress = load_state(stopped / CHECKPOINT)["progress"]
    assert (progress["epoch"], progress["batch"], progress["step"]) == (4, 6, 27)  # before epoch 4's evaluation
    resume(stopped, quiet=True)
    run(quick(tmp_path, "name=straight", *args), quiet=True)
    assert_same_run(stopped, tmp_path / "runs" / "straight")
    summary = json.loads((stopped / "summary.json").read_text())
    assert summary["steps"] == 27 and summary["epochs_done"] == 4 and summary["status"] == "finished"


# ---------------------------------------------------------------------------------------------
# (d) Impossible budgets are refused before anything is written


def test_a_budget_too_short_for_one_step_is_refused_in_one_paragraph(tmp_path):
    from test_robustness import assert_user_error

    result = runner.invoke(app, ["run", *quick_args(tmp_path, "train.time_budget=0.000001")])
    text = assert_user_error(result, "train.time_budget=1e-06 (minutes) is too short for one training step",
                             "s per optimizer step", "Set train.time_budget to at least",
                             "no run folder was written")
    assert "\n\n" not in result.output.strip()
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # nothing half-written
    smallest = float(re.search(r"at least ([0-9.e-]+),", text).group(1))
    assert smallest > 0.000001


def test_the_smallest_budget_named_is_the_smallest_that_works():
    probe = fixed_probe(0.21)
    with pytest.raises(FinetuneError, match="too short for one training step") as info:
        plan_budget(0.001, probe, steps_per_epoch=8, warmup_steps=0)
    smallest = smallest_budget(1, 0.21)
    assert f"at least {smallest:g}," in str(info.value) and "0.21 s per optimizer step" in str(info.value)
    assert plan_budget(smallest, probe, 8, 0).steps == 1
    with pytest.raises(FinetuneError):
        plan_budget(smallest * 0.95, probe, 8, 0)


def test_a_warm_up_longer_than_the_plan_is_refused_naming_both_fixes():
    with pytest.raises(FinetuneError) as info:
        plan_budget(0.01, fixed_probe(0.1), steps_per_epoch=8, warmup_steps=16)  # 5 steps planned
    message = str(info.value)
    assert "The warm-up is 16 optimizer steps" in message and "more than the 5 steps" in message
    assert f"at least {smallest_budget(16, 0.1):g}" in message and "schedule.warmup_epochs to at most 0.62" in message
    assert plan_budget(smallest_budget(16, 0.1), fixed_probe(0.1), 8, 16).steps >= 16


# ---------------------------------------------------------------------------------------------
# (e) A noisy probe is flagged


def test_a_noisy_probe_is_flagged_in_the_record_and_warned_about_once(tmp_path, monkeypatch):
    clock = FakeClock()
    record = time_steps(clock.steps([0.2] + [0.2] * 8 + [0.4] * 2), seconds=100, max_steps=10, clock=clock)
    assert record["steps"] == 10 and record["p90_s"] == pytest.approx(0.4) and record["noisy"] is True
    clock = FakeClock()
    steady = time_steps(clock.steps([0.2] * 11), seconds=100, max_steps=10, clock=clock)
    assert steady["noisy"] is False

    use_fixed_probe(monkeypatch, fixed_probe(0.01, noisy=True))
    result = runner.invoke(app, ["run", *quick_args(tmp_path, "name=noisy", "train.time_budget=0.0048", NO_PLOTS),
                                 "-q"])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning: the step-time probe")]
    assert len(warnings) == 1 and "the plan may not fit the budget" in warnings[0]
    tb = json.loads((tmp_path / "runs" / "noisy" / "summary.json").read_text())["time_budget"]
    assert tb["probe"]["noisy"] is True and tb["planned_steps"] == 27


# ---------------------------------------------------------------------------------------------
# (f) The schema's bounds


@pytest.mark.parametrize("value", ["0", "-1", "-0.5", "inf", "-inf", "nan", "1e400", "true"])
def test_the_schema_refuses_budgets_that_are_not_positive_finite_numbers(value):
    with pytest.raises(RecipeError, match="train.time_budget"):
        load_recipe(REPO_ROOT / "recipes" / "quick_cpu.yaml", [f"train.time_budget={value}"])


def test_with_a_budget_train_epochs_does_not_bound_the_warm_up():
    quick_cpu = REPO_ROOT / "recipes" / "quick_cpu.yaml"
    with pytest.raises(RecipeError, match="schedule.warmup_epochs"):
        load_recipe(quick_cpu, ["schedule.warmup_epochs=3"])  # train.epochs is 1
    recipe = load_recipe(quick_cpu, ["schedule.warmup_epochs=3", "train.time_budget=0.5"])
    assert recipe.train.time_budget == 0.5 and load_recipe(quick_cpu).train.time_budget is None
    from finetune.recipe.schema import TrainConfig

    assert f"less a {budget.BUDGET_MARGIN:.0%} margin" in TrainConfig.model_fields["time_budget"].description


# ---------------------------------------------------------------------------------------------
# Several processes follow one plan


def test_two_processes_follow_one_plan(tmp_path):
    # Each process times steps in lockstep and plans from rank 0's measurement: a plan that differed
    # between them would leave one waiting for the other's all-reduce, not a finished run.
    result = subprocess.run([sys.executable, "-m", "finetune", "run", *quick_args(tmp_path, "name=two", NO_PLOTS,
                             "train.time_budget=0.02", "train.log_every=1"), "--nproc", "2"],
                            env=ONE_THREAD, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "two" / "summary.json").read_text())
    tb = summary["time_budget"]
    assert summary["status"] == "finished" and summary["steps"] == tb["planned_steps"] >= 1
    assert result.stdout.count("done two:") == 1 and result.stderr.count("time budget 0.02 min") == 1
