"""The training loop: :func:`fit` loops over epochs, each one :func:`train_one_epoch` and (when due)
:func:`evaluate_epoch`; a loss or a weight that is no longer a finite number stops the run as
diverged (:func:`check_finite`, :func:`diverged_error`).

Nothing here writes files or prints. The run folder (metrics, summary, checkpoints, plots) and the
progress bar are callbacks (``finetune.runs.recorder.RunRecorder``,
``finetune.training.progress.TrainProgress``) that the loop calls at fixed points: after each log
interval, after each optimizer step and after each epoch.

The hot path keeps to the device: batches come from ``BatchLoader`` (uint8 images resident on the
device, augmented and resized there), losses and accuracy counts accumulate in device tensors, and
the host reads them once per ``train.log_every`` steps. Optional features were chosen once in
:func:`.setup.build` as objects that do nothing when off, so the loop has no branches for them.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any

import torch

from ..errors import DivergedError
from .callbacks import Callback, StopRequested
from .components import base_lr
from .device import autocast, synchronize
from .evaluate import evaluate
from .state import TrainState


def fit(state: TrainState, callbacks: Callback) -> None:
    """Train from ``state.progress`` to the last epoch (``state.epochs``: the recipe's, or a budgeted
    run's plan), evaluating as the recipe says.

    Raises:
        DivergedError: the training loss stopped being a finite number.
        StopRequested: ``state.stop_requested`` was set; the run stopped at a step or epoch
            boundary after the callbacks had their say (a checkpoint, in a run folder).
    """
    r, p, epochs = state.recipe, state.progress, state.epochs
    while p.epoch <= epochs:
        if p.batch == 0:
            state.meters.reset_epoch()
        train_one_epoch(state, callbacks)
        evaluated = p.epoch % r.train.eval_every == 0 or p.epoch == epochs
        began = time.perf_counter()
        row = evaluate_epoch(state) if evaluated else None
        p.eval_time_s += time.perf_counter() - began  # reported apart from the training time
        p.epoch, p.batch = p.epoch + 1, 0
        state.stopping = state.agree_to_stop(synced=True)
        callbacks.on_epoch_end(state, row)
        if state.stopping and p.epoch <= epochs:
            raise StopRequested(_stopped_by(state))


def train_one_epoch(state: TrainState, callbacks: Callback) -> None:
    """Train the rest of epoch ``state.progress.epoch``, from micro-batch ``progress.batch`` on.

    Raises:
        DivergedError: a log interval's or the epoch's mean loss is not finite.
        StopRequested: ``state.stop_requested`` is set at a step boundary.
    """
    r, p = state.recipe, state.progress
    loader, accum, limit = state.train_loader, r.train.grad_accum, state.step_limit
    n = len(loader)
    loader.set_epoch(p.epoch)
    state.model.train()
    state.segment_start = time.perf_counter()
    world = state.processes.world_size
    # A budgeted run stops at its planned step, in its last epoch (and trains nothing more when it
    # resumes from a checkpoint taken at that step).
    batches = loader.iter_from(p.batch) if limit is None or p.step < limit else iter(())
    for i, (x, y) in enumerate(batches, start=p.batch):
        last_micro = (i + 1) % accum == 0 or i + 1 == n
        # Average over the micro-batches of this optimizer step; the last group of an epoch
        # may be shorter than grad_accum.
        images = train_micro_batch(state, x, y, group_size=min(accum, n - (i - i % accum)), sync=last_micro)
        p.images_seen += images * world  # every process trains an equal part of the batch
        if not last_micro:
            continue
        _optimizer_step(state)
        p.batch = i + 1
        if p.step == 1:
            # Throughput is measured from the end of the first step, which carries one-off costs
            # (allocator warm-up, autotuning, compilation).
            synchronize(state.device)
            p.warmup_mark = (state.train_time(), p.images_seen)
        logged = p.step % r.train.log_every == 0
        if logged:
            callbacks.on_log(state, _interval_row(state))  # the one host sync
        state.stopping = state.agree_to_stop(synced=logged)
        callbacks.on_step_end(state)
        if state.stopping:
            raise StopRequested(_stopped_by(state))
        if p.step == limit:
            break
    g = state.global_meters()
    p.train_loss = _finite_mean(state, g.epoch_loss, g.epoch_images, f"the mean training loss of epoch {p.epoch}")
    p.train_acc1 = float(g.epoch_correct) / max(g.epoch_images, 1)
    synchronize(state.device)
    p.train_time_s = state.train_time()
    state.segment_start = None


def train_micro_batch(state: TrainState, x: torch.Tensor, y: torch.Tensor, *, group_size: int, sync: bool) -> int:
    """Forward and backward of one micro-batch (Mixup, autocast, loss, scaled backward), its loss
    and accuracy added to the meters; returns its images.

    Args:
        group_size: micro-batches of this optimizer step; the loss is averaged over them.
        sync: the step's last micro-batch: under DDP its backward all-reduces the gradients (the
            others' stay local, ``no_sync``), one all-reduce per optimizer step.
    """
    x, target = state.mixup(x, y)
    with contextlib.nullcontext() if sync else state.no_sync():
        with autocast(state.device, state.amp_dtype):
            logits = state.forward(x)
            loss = state.loss_fn(logits, target)
        state.scaler.scale(loss / group_size).backward()
    state.meters.add(loss, logits, y)
    return x.shape[0]


def _optimizer_step(state: TrainState) -> None:
    """Clip (if asked), step, zero the gradients, then move the schedule and the EMA on."""
    p = state.progress
    p.lr = base_lr(state.optimizer)  # the lr this step uses, before the scheduler moves it
    state.clip_gradients()
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.optimizer.zero_grad(set_to_none=True)
    p.step += 1
    state.scheduler.step_update(num_updates=p.step)
    state.ema.update(state.model, step=p.step)


def _interval_row(state: TrainState) -> dict[str, Any]:
    """The metrics line of the log interval that just ended, over every process; reads the loss
    (one host sync)."""
    p, g = state.progress, state.global_meters()
    first = p.step - state.recipe.train.log_every + 1
    mean_loss = _finite_mean(state, g.interval_loss, g.interval_images, f"the mean training loss over steps {first}-{p.step}")
    now = state.train_time()
    row = {
        "kind": "step", "epoch": p.epoch, "step": p.step, "time_s": round(now, 4),
        "loss": mean_loss, "lr": p.lr, "images_per_s": g.interval_images / max(now - p.interval_mark_s, 1e-9),
    }
    state.meters.reset_interval()
    p.interval_mark_s = now
    return row


def _stopped_by(state: TrainState) -> str:
    return state.stop_requested or "a signal to another process of this run"


def _finite_mean(state: TrainState, total: torch.Tensor, count: int, what: str) -> float:
    """``total / count`` as a float; a NaN or infinite value stops the run as diverged."""
    mean = float(total) / max(count, 1)
    if not math.isfinite(mean):
        raise diverged_error(state, f"{what} is {mean}")
    return mean


def check_finite(state: TrainState) -> None:
    """Raise :class:`DivergedError` unless the training losses since the last log line and of the
    epoch so far, and the trained weights after the last step, are all finite. Syncs with the
    device: for checkpoints, which sync anyway, not for every step."""
    m, p = state.global_meters(), state.progress
    _finite_mean(state, m.interval_loss, m.interval_images, "the mean training loss since the last log line")
    _finite_mean(state, m.epoch_loss, m.epoch_images, f"the mean training loss of epoch {p.epoch} so far")
    trained = [q for q in state.model.parameters() if q.requires_grad]
    if trained and not torch.stack([q.isfinite().all() for q in trained]).all():
        raise diverged_error(state, f"a weight after step {p.step} is not a finite number")


def diverged_error(state: TrainState, what: str) -> DivergedError:
    """The one-paragraph error for a run whose loss or weights are no longer finite numbers."""
    p, r = state.progress, state.recipe
    lr = p.lr
    hints = [f"lower optim.lr (e.g. optim.lr={lr / 10:g})"]
    if r.train.clip_grad is None:
        hints.append("clip the gradient norm (train.clip_grad=1.0)")
    if state.amp_dtype == torch.float16:
        hints.append("train in bf16 or fp32 (train.precision=bf16), as fp16 overflows easily")
    return DivergedError(
        f"Training diverged: {what} (epoch {p.epoch}, step {p.step}, learning rate {lr:g}). The run "
        "stopped and is marked diverged; no model was saved from it.",
        "Try again with a smaller step: " + ", or ".join(hints) + ".",
    )


def evaluate_epoch(state: TrainState) -> dict[str, Any]:
    """Score the finished epoch on the test set (and the validation set, if any); return its
    metrics line, and update the best epoch (chosen on validation) and the test peak."""
    p = state.progress
    model, num_classes = state.eval_model, state.model.num_classes
    test = evaluate(model, state.test_loader, num_classes, amp_dtype=state.amp_dtype, processes=state.processes)
    if not math.isfinite(test.loss):  # the model's outputs are no longer numbers
        raise diverged_error(state, f"the test loss after epoch {p.epoch} is {test.loss}")
    row = {
        "kind": "epoch", "epoch": p.epoch, "step": p.step, "time_s": round(p.train_time_s, 4),
        "train_loss": p.train_loss,
        "train_acc1": None if state.mixing else p.train_acc1,
        **test.as_dict("test"),
        "val_acc1": None,
        "lr": p.lr,
        "per_class_acc": test.per_class_acc,
    }
    p.last_eval = test.to_dict()
    if state.val_loader is not None:
        val = evaluate(model, state.val_loader, num_classes, amp_dtype=state.amp_dtype, processes=state.processes)
        row.update(val.as_dict("val"))
        p.last_val_acc1 = val.acc1
        if p.best is None or val.acc1 > p.best["val_acc1"]:  # ties keep the earlier epoch
            p.best = {"epoch": p.epoch, "val_acc1": val.acc1, "test_acc1": test.acc1}
    if p.peak_test is None or test.acc1 > p.peak_test["test_acc1"]:
        p.peak_test = {"epoch": p.epoch, "test_acc1": test.acc1}
    p.evaluations.append({"epoch": p.epoch, "time_s": p.train_time_s, "val_acc1": row["val_acc1"],
                          "test_acc1": test.acc1})
    return row
