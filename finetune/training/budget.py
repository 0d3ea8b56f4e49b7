"""Training to a time budget (``train.time_budget``): the start-up probe that times the run's real
training step (:func:`probe_step_time`, timed by :func:`time_steps`), the plan made from it
(:func:`plan_budget`, a :class:`BudgetPlan`), and what a run reports about it (:func:`budget_record`,
:func:`describe_plan`, :func:`describe_budget_use`).

The plan fixes the number of optimizer steps so that the whole schedule, warm-up and decay to
``schedule.min_lr``, ends inside the budget less :data:`BUDGET_MARGIN`; ``train.epochs`` is then
ignored and the last epoch is cut short at the planned step. A checkpoint carries the plan, so a
resumed run follows it exactly and measures nothing again.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import CheckpointError, FinetuneError
from ..recipe import Recipe
from .components import build_clipper, build_ema, build_scheduler, warmup_steps
from .device import synchronize
from .loop import _optimizer_step, train_micro_batch
from .state import Meters, Progress, TrainState, capture_rng, restore_rng

# The probe calls the loop's own step functions, so it times exactly what training runs; bound at
# import, so a test that patches ``loop._optimizer_step`` to watch a run's steps never sees the probe's.

BUDGET_MARGIN = 0.05
"""Share of the budget the plan leaves unused: room for what the probe does not see (the run's
first step, metrics lines, checkpoints within epochs, a machine a little busier than at start-up)."""
PROBE_SECONDS = 5.0
"""Seconds the probe may take, its untimed warm-up step included (passed by at most the step under
way; one step is always timed after the warm-up, however long that took)."""
PROBE_MAX_STEPS = 50
"""Timed steps after which the probe stops even within :data:`PROBE_SECONDS` (fast steps)."""
NOISE_RATIO = 1.25
"""A probe whose 90th-percentile step is more than this many times its median is ``noisy``: the
plan is made anyway, with a warning that it may not fit."""
FRACTIONS = (0.25, 0.5, 0.75, 1.0)
"""Shares of the budget at which ``summary.json`` reports the latest evaluation done by then."""


@dataclass(frozen=True)
class BudgetPlan:
    """How a budgeted run trains: its optimizer steps and epochs, and the measurement behind them.

    Attributes:
        minutes: the budget asked for (``train.time_budget``).
        step_s: median seconds of one optimizer step in the probe.
        p90_s: 90th-percentile seconds of a probe step (nearest rank).
        probe_steps: steps the probe timed (its warm-up step not counted).
        probe_s: seconds the probe took, warm-up included (not part of the budget).
        noisy: the probe's steps spread beyond :data:`NOISE_RATIO`.
        steps: optimizer steps of the whole run; the schedule ends at the last one.
        epochs: ``ceil(steps / steps_per_epoch)``; the last one stops at ``steps``.
        steps_per_epoch: optimizer steps of a whole epoch.
        warmup_steps: steps of the linear warm-up (``schedule.warmup_epochs`` through steps_per_epoch).
        margin: share of the budget left unused (:data:`BUDGET_MARGIN`).
    """

    minutes: float
    step_s: float
    p90_s: float
    probe_steps: int
    probe_s: float
    noisy: bool
    steps: int
    epochs: int
    steps_per_epoch: int
    warmup_steps: int
    margin: float = BUDGET_MARGIN

    @property
    def last_epoch_steps(self) -> int:
        """Optimizer steps of the last epoch (all of ``steps_per_epoch`` unless cut short)."""
        return self.steps - (self.epochs - 1) * self.steps_per_epoch

    def to_dict(self) -> dict[str, Any]:
        """The plan as plain numbers, for a checkpoint."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> BudgetPlan:
        """The plan a checkpoint recorded (:meth:`to_dict`)."""
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})


# ---- the probe ----------------------------------------------------------------------------


def time_steps(
    step: Callable[[], None], *, seconds: float = PROBE_SECONDS, max_steps: int = PROBE_MAX_STEPS,
    clock: Callable[[], float] = time.perf_counter, agree: Callable[[bool], bool] = lambda done: done,
) -> dict[str, Any]:
    """Time ``step()``: one untimed warm-up call, then timed calls until ``seconds`` have passed
    since the start (checked before each call, after the first timed one) or ``max_steps`` are timed.

    Args:
        step: one optimizer step of training, finished when it returns (synchronized on a GPU).
        seconds: time bound of the timed part; the warm-up's time counts towards it.
        max_steps: timed steps after which it stops.
        clock: seconds, monotonic (a fake one in tests).
        agree: turns "this process is done" into the decision of every process (several
            processes must run the same number of steps, as each step waits for all of them).

    Returns:
        ``{"median_s", "p90_s", "steps", "seconds", "noisy"}``: the median and 90th-percentile
        (nearest rank) step time, the steps timed, the seconds taken warm-up included, and whether
        the 90th percentile exceeds :data:`NOISE_RATIO` times the median.
    """
    start = clock()
    step()  # warm-up: caches, the allocator, autotuning, compilation
    times: list[float] = []
    while len(times) < max_steps and not agree(bool(times) and clock() - start >= seconds):
        began = clock()
        step()
        times.append(clock() - began)
    median = statistics.median(times)
    p90 = sorted(times)[math.ceil(0.9 * len(times)) - 1]
    return {"median_s": median, "p90_s": p90, "steps": len(times), "seconds": clock() - start,
            "noisy": p90 > NOISE_RATIO * median}


def probe_step_time(state: TrainState, wrap: Callable[..., tuple[Any, Any]], **timing: Any) -> dict[str, Any]:
    """Time the run's real training step on a copy: its model, batch size, data path, precision,
    Mixup, EMA, clipping, gradient accumulation and optimizer, with :func:`time_steps`.

    Nothing of the run moves: the model and optimizer are deep copies (the EMA, when on, averages
    the copy); the batches are the first epoch's, drawn from the run's loader, whose batches depend
    only on the seed, the epoch and their index, so drawing them here changes no batch of the run;
    every global random state (torch, CUDA, NumPy, Python) is put back afterwards.

    Args:
        state: the run's state, built but not yet trained (its schedule need not exist).
        wrap: ``setup._wrap_model``: the copy is wrapped as the run's model is (DDP, compile).
        **timing: passed to :func:`time_steps` (``seconds``, ``max_steps``, ``clock``).
    """
    rng = capture_rng(state.device)
    probe = _probe_state(state, wrap)
    batches = _batches(state.train_loader, state.progress.epoch)
    accum = state.recipe.train.grad_accum

    def step() -> None:
        for k in range(accum):
            x, y = next(batches)
            train_micro_batch(probe, x, y, group_size=accum, sync=k == accum - 1)
        _optimizer_step(probe)
        synchronize(probe.device)

    try:
        probe.model.train()
        return time_steps(step, agree=lambda done: state.processes.any(done, state.device), **timing)
    finally:
        batches.close()
        restore_rng(rng, state.device)


def _probe_state(state: TrainState, wrap: Callable[..., tuple[Any, Any]]) -> TrainState:
    """A copy of ``state`` to time steps on: copied model and optimizer (one deep copy, so the
    optimizer steps the copied weights), its own scaler, clipper, schedule and EMA, fresh meters."""
    r = state.recipe
    model, optimizer = copy.deepcopy((state.model, state.optimizer))
    scaler = torch.amp.GradScaler(state.device.type, enabled=state.scaler.is_enabled())
    forward, no_sync = wrap(model, r, state.device, state.processes)
    return dataclasses.replace(
        state, model=model, forward=forward, no_sync=no_sync, optimizer=optimizer, scaler=scaler,
        # The warm-up then an epoch of decay: train.epochs means nothing before the plan, and a
        # schedule sized by it (1 epoch of warm-up in 1 epoch) would be an empty cosine.
        scheduler=build_scheduler(r, optimizer, state.steps_per_epoch,
                                  warmup_steps(r, state.steps_per_epoch) + state.steps_per_epoch),
        ema=build_ema(r, model, 1, note=False), clip_gradients=build_clipper(r, model, scaler, optimizer),
        progress=Progress(), meters=Meters.on(state.device), stop_requested=None, budget=None,
    )


def _batches(loader: Any, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The training batches of ``epoch``, over and over, leaving the loader on its own epoch."""
    while True:
        saved = loader.epoch
        loader.set_epoch(epoch)
        batches = loader.iter_from(0)
        try:
            first = next(batches)  # the epoch is read when iteration starts
        finally:
            loader.set_epoch(saved)
        with contextlib.closing(batches):
            yield first
            yield from batches


# ---- the plan -----------------------------------------------------------------------------


def plan_budget(
    minutes: float, probe: dict[str, Any], steps_per_epoch: int, warmup_steps: int, *,
    margin: float = BUDGET_MARGIN,
) -> BudgetPlan:
    """The plan for a budget of ``minutes`` from a probe's step time (:func:`time_steps`'s record).

    ``steps = floor(minutes * 60 * (1 - margin) / median step)``, ``epochs = ceil(steps /
    steps_per_epoch)``.

    Raises:
        FinetuneError: the budget leaves no step, or fewer steps than the warm-up needs (the
            learning rate would never reach optim.lr); the message names the smallest budget that works.
    """
    step_s = probe["median_s"]
    usable_s = minutes * 60 * (1 - margin)
    steps = math.floor(usable_s / step_s + 1e-9)  # a rounding error never drops a step
    if steps < 1:
        raise FinetuneError(
            f"train.time_budget={minutes:g} (minutes) is too short for one training step: the start-up probe "
            f"measured {step_s:.3g} s per optimizer step (median of {probe['steps']}), and the plan keeps "
            f"{margin:.0%} of the budget as a margin. Nothing was trained and no run folder was written.",
            f"Set train.time_budget to at least {smallest_budget(1, step_s, margin):g}, or make a step cheaper "
            "(a smaller data.batch_size or model).",
        )
    if warmup_steps > steps:
        longest = math.floor(100 * steps / steps_per_epoch) / 100
        raise FinetuneError(
            f"The warm-up is {warmup_steps:,} optimizer steps (schedule.warmup_epochs at {steps_per_epoch:,} steps "
            f"per epoch), more than the {steps:,} steps train.time_budget={minutes:g} (minutes) allows at the measured "
            f"{step_s:.3g} s per step, so the learning rate would never reach optim.lr. Nothing was trained and no "
            "run folder was written.",
            f"Set train.time_budget to at least {smallest_budget(warmup_steps, step_s, margin):g}"
            + (f", or schedule.warmup_epochs to at most {longest:g}." if longest > 0 else "."),
        )
    return BudgetPlan(
        minutes=minutes, step_s=step_s, p90_s=probe["p90_s"], probe_steps=probe["steps"],
        probe_s=probe["seconds"], noisy=bool(probe["noisy"]), steps=steps,
        epochs=math.ceil(steps / steps_per_epoch), steps_per_epoch=steps_per_epoch, warmup_steps=warmup_steps,
        margin=margin,
    )


def smallest_budget(steps: int, step_s: float, margin: float = BUDGET_MARGIN) -> float:
    """The smallest ``train.time_budget`` (minutes, rounded up to two significant digits) whose
    plan has ``steps`` steps of ``step_s`` seconds."""
    minutes = steps * step_s / (1 - margin) / 60
    scale = 10.0 ** (math.floor(math.log10(minutes)) - 1)
    return round(math.ceil(minutes / scale * (1 - 1e-12)) * scale, 12)


def recorded_plan(recipe: Recipe, checkpoint: dict[str, Any]) -> BudgetPlan | None:
    """The plan a budgeted run's checkpoint holds, for its resume (``None`` without a budget).

    Raises:
        CheckpointError: a budgeted run's checkpoint without a plan.
    """
    if recipe.train.time_budget is None:
        return None
    values = checkpoint.get("time_budget")
    if not isinstance(values, dict):
        raise CheckpointError(
            "The checkpoint of this budgeted run (train.time_budget) holds no plan, so it cannot continue the run "
            "as it was planned.", "Start the run again with output.overwrite=true.",
        )
    return BudgetPlan.from_dict(values)


def check_recorded_plan(plan: BudgetPlan, steps_per_epoch: int) -> BudgetPlan:
    """``plan``, once it is known to fit the resumed run's epochs.

    Raises:
        CheckpointError: the plan was made for another number of steps per epoch.
    """
    if plan.steps_per_epoch != steps_per_epoch:
        raise CheckpointError(
            f"The checkpoint's time-budget plan is for {plan.steps_per_epoch:,} steps per epoch, but the resumed run "
            f"has {steps_per_epoch:,} (has the data changed?), so it cannot continue the run as it was planned.",
            "Restore the data the run started with, or start the run again with output.overwrite=true.",
        )
    return plan


# ---- what a run reports -------------------------------------------------------------------


def budget_record(plan: BudgetPlan, progress: Progress, train_time_s: float, done: bool) -> dict[str, Any]:
    """``summary.json``'s ``time_budget``: the budget, the probe, the plan, the training time used
    (evaluation apart) and, for each of :data:`FRACTIONS` of the budget, the latest evaluation
    done by then. ``within_budget`` is ``None`` until training is done."""
    budget_s = plan.minutes * 60
    return {
        "minutes": plan.minutes,
        "margin": plan.margin,
        "probe": {"median_step_s": plan.step_s, "p90_step_s": plan.p90_s, "steps": plan.probe_steps,
                  "seconds": plan.probe_s, "noisy": plan.noisy},
        "planned_steps": plan.steps,
        "planned_epochs": plan.epochs,
        "steps_per_epoch": plan.steps_per_epoch,
        "last_epoch_steps": plan.last_epoch_steps,
        "warmup_steps": plan.warmup_steps,
        "train_time_s": train_time_s,
        "eval_time_s": progress.eval_time_s,
        "within_budget": train_time_s <= budget_s if done else None,
        "at_fractions": [_latest_by(progress.evaluations, share, budget_s) for share in FRACTIONS],
    }


def _latest_by(evaluations: list[dict[str, Any]], share: float, budget_s: float) -> dict[str, Any]:
    """The latest evaluation done within ``share`` of the budget, in training time."""
    done = [e for e in evaluations if e["time_s"] <= share * budget_s]
    last = done[-1] if done else {}
    return {"fraction": share, "budget_s": share * budget_s, "epoch": last.get("epoch"),
            "train_time_s": last.get("time_s"), "val_acc1": last.get("val_acc1"), "test_acc1": last.get("test_acc1")}


def describe_plan(plan: BudgetPlan, recipe: Recipe) -> str:
    """One line on the probe and the plan, printed when a budgeted run starts."""
    ignored = (f"; train.epochs={recipe.train.epochs} is ignored" if "epochs" in recipe.train.model_fields_set
               else "")
    last = f", the last cut to {plan.last_epoch_steps:,}" if plan.last_epoch_steps < plan.steps_per_epoch else ""
    return (f"time budget {plan.minutes:g} min: a training step takes {plan.step_s:.3g} s (median of "
            f"{plan.probe_steps} timed in {plan.probe_s:.1f} s, p90 {plan.p90_s:.3g} s); planned {plan.steps:,} steps, "
            f"{plan.epochs:,} epoch(s) of {plan.steps_per_epoch:,}{last}, the schedule ending by "
            f"{_minutes(plan.steps * plan.step_s / 60)} min ({plan.margin:.0%} margin){ignored}")


def noisy_warning(plan: BudgetPlan) -> str:
    """The one warning line of a noisy probe."""
    return (f"warning: the step-time probe was noisy (p90 {plan.p90_s:.3g} s is {plan.p90_s / plan.step_s:.2f}x the "
            f"median {plan.step_s:.3g} s; is another process using this machine?): the plan may not fit the budget.")


def describe_budget_use(record: dict[str, Any]) -> str:
    """``planned 1,234 steps for 30 min from a 0.21 s step; used 29.4 min`` from :func:`budget_record`."""
    used = record["train_time_s"] / 60
    over = " (over the budget)" if record.get("within_budget") is False else ""
    return (f"planned {record['planned_steps']:,} steps for {record['minutes']:g} min from a "
            f"{record['probe']['median_step_s']:.2g} s step; used {_minutes(used)} min{over}")


def _minutes(value: float) -> str:
    """Minutes to one decimal, or two significant digits below one minute (``29.4``, ``0.057``)."""
    return f"{value:.1f}" if value >= 1 else f"{value:.2g}"
