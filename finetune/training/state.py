"""A training run in memory: :class:`TrainState` (everything it trains with), :class:`Progress`
(where it is and what it found), :class:`Meters` (the running sums, kept on the device), and the
global random states a checkpoint captures and a resume restores.

:meth:`TrainState.state_dict` and :meth:`TrainState.load_state_dict` turn the state into nested
tensors and numbers and back, so that a run resumed from a checkpoint continues exactly where it
stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ..data.loader import BatchLoader
from ..models.saving import model_config
from ..models.params import ParamCounts
from ..recipe import Recipe, recipe_to_dict
from .components import no_mixup
from .device import precision_name
from .distributed import SINGLE, Processes, model_rng_seed

if TYPE_CHECKING:
    from .budget import BudgetPlan


@dataclass
class Meters:
    """Running sums of the epoch in progress and of the current log interval.

    The losses and the correct count stay on the device; the host reads them once per log
    interval (and once per epoch).
    """

    epoch_loss: torch.Tensor
    epoch_correct: torch.Tensor
    interval_loss: torch.Tensor
    epoch_images: int = 0
    interval_images: int = 0

    @classmethod
    def on(cls, device: torch.device) -> Meters:
        return cls(
            epoch_loss=torch.zeros((), device=device),
            epoch_correct=torch.zeros((), dtype=torch.long, device=device),
            interval_loss=torch.zeros((), device=device),
        )

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        batch = labels.shape[0]
        summed = loss.detach().float() * batch
        self.epoch_loss += summed
        self.interval_loss += summed
        self.epoch_correct += (logits.detach().argmax(1) == labels).sum()
        self.epoch_images += batch
        self.interval_images += batch

    def reset_epoch(self) -> None:
        self.epoch_loss.zero_()
        self.epoch_correct.zero_()
        self.epoch_images = 0

    def reset_interval(self) -> None:
        self.interval_loss.zero_()
        self.interval_images = 0


@dataclass
class Progress:
    """Where the run is, and what it has found so far; saved in every checkpoint.

    Attributes:
        epoch: the epoch in progress, from 1; :attr:`TrainState.epochs` + 1 once training is done.
        batch: micro-batches of ``epoch`` already trained (a checkpoint is always at a step boundary).
        step: optimizer steps taken.
        images_seen: training images seen.
        train_time_s: seconds spent training (not evaluating) up to the last epoch boundary or checkpoint.
        interval_mark_s: ``train_time_s`` when the current log interval began (intervals run across
            epoch boundaries and resumes, so their images/s counts training time only).
        warmup_mark: ``(train_time_s, images_seen)`` at the end of the first step, from which
            throughput is measured (the first step carries compilation and allocator warm-up).
        lr: the base learning rate of the last step.
        best: ``{"epoch", "val_acc1", "test_acc1"}`` of the epoch with the best validation top-1;
            ``None`` without a validation split.
        peak_test: ``{"epoch", "test_acc1"}`` of the best test top-1 over epochs. Selected on the
            test set, so an optimistic figure: reported as such, never used to rank or select.
        last_eval: the last evaluated epoch's test result (``EvalResult.to_dict()``).
        last_val_acc1: the last evaluated epoch's validation top-1, when there is a validation split.
        train_loss: mean training loss of the last finished epoch.
        train_acc1: training top-1 of the last finished epoch (meaningless with Mixup/CutMix).
        eval_time_s: seconds spent evaluating, apart from ``train_time_s``.
        evaluations: ``{"epoch", "time_s", "val_acc1", "test_acc1"}`` of every evaluation so far,
            ``time_s`` being the training seconds at its epoch's end.
    """

    epoch: int = 1
    batch: int = 0
    step: int = 0
    images_seen: int = 0
    train_time_s: float = 0.0
    interval_mark_s: float = 0.0
    warmup_mark: tuple[float, int] = (0.0, 0)
    lr: float = 0.0
    best: dict[str, Any] | None = None
    peak_test: dict[str, Any] | None = None
    last_eval: dict[str, Any] | None = None
    last_val_acc1: float | None = None
    train_loss: float | None = None
    train_acc1: float | None = None
    eval_time_s: float = 0.0
    evaluations: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class TrainState:
    """Everything a run trains with, and where it is. Built by :func:`.setup.build`."""

    recipe: Recipe
    device: torch.device
    model: nn.Module
    forward: Callable[[torch.Tensor], torch.Tensor]  # the model, or its torch.compile wrapper
    optimizer: torch.optim.Optimizer
    scheduler: Any  # a timm scheduler, stepped per optimizer update
    scaler: torch.amp.GradScaler  # disabled (a pass-through) unless fp16
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    mixup: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    ema: Any  # timm's ModelEmaV3, or NoEma
    clip_gradients: Callable[[], None]
    train_loader: BatchLoader
    val_loader: BatchLoader | None
    test_loader: BatchLoader
    classes: list[str]
    amp_dtype: torch.dtype | None
    steps_per_epoch: int
    counts: ParamCounts
    mean: tuple[float, ...]
    std: tuple[float, ...]
    out_size: tuple[int, int]
    processes: Processes = SINGLE
    no_sync: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext  # DDP: hold the all-reduce
    progress: Progress = field(default_factory=Progress)
    meters: Meters | None = None
    stop_requested: str | None = None  # set (to the signal's name) by a signal handler
    stopping: bool = False  # every process agreed to stop at this step or epoch boundary
    segment_start: float | None = None  # perf_counter() when the current stretch of training began
    pictures: Any = None  # visual.RunPictures, made once at the end for the run folder and TensorBoard
    precision_choice: dict[str, Any] | None = None  # train.precision=auto on a CPU: the measurement behind it
    cpu_threads: int | None = None  # threads per process on a CPU
    budget: BudgetPlan | None = None  # train.time_budget: the plan (from the start-up probe, or the checkpoint)

    @property
    def epochs(self) -> int:
        """Epochs of the run: the budget plan's, else ``train.epochs``."""
        return self.budget.epochs if self.budget is not None else self.recipe.train.epochs

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole run, over which the schedule runs."""
        return self.budget.steps if self.budget is not None else self.recipe.train.epochs * self.steps_per_epoch

    @property
    def step_limit(self) -> int | None:
        """The step a budgeted run stops at, in its last epoch; ``None``: every epoch runs whole."""
        return self.budget.steps if self.budget is not None else None

    @property
    def precision(self) -> str:
        """What the run computes in: ``fp32``, ``bf16`` or ``fp16``."""
        return precision_name(self.amp_dtype)

    @property
    def eval_model(self) -> nn.Module:
        """The model that is evaluated and saved: the EMA when there is one."""
        return self.ema.module

    @property
    def mixing(self) -> bool:
        """True when targets are mixed (Mixup/CutMix), so there is no training top-1."""
        return self.mixup is not no_mixup

    def train_time(self) -> float:
        """Seconds of training so far, including the stretch in progress."""
        running = time.perf_counter() - self.segment_start if self.segment_start is not None else 0.0
        return self.progress.train_time_s + running

    def agree_to_stop(self, synced: bool) -> bool:
        """Whether to stop now, after a stop request (a signal). One process stops at the next step;
        several decide together, at the next point they sync anyway (a log line, an epoch's end),
        so that none stops while the others wait for it."""
        if not self.processes.distributed:
            return self.stop_requested is not None
        return synced and self.processes.any(self.stop_requested is not None, self.device)

    def global_meters(self) -> Meters:
        """The running sums over every process (a copy; one collective)."""
        m = self.meters
        counts = torch.tensor([m.epoch_images, m.interval_images], dtype=torch.float64, device=self.device)
        sums = Meters(m.epoch_loss.clone(), m.epoch_correct.clone(), m.interval_loss.clone())
        self.processes.sum_(sums.epoch_loss, sums.epoch_correct, sums.interval_loss, counts)
        sums.epoch_images, sums.interval_images = (int(c) for c in counts.tolist())
        return sums

    # ---- checkpoints ---------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly from here, as nested tensors and numbers.

        Taken at a step or epoch boundary. Includes the model's ``config.json`` (so a resumed run
        rebuilds the model without its pretrained source) and every random state.
        """
        progress = dataclasses.replace(self.progress, train_time_s=self.train_time())
        m = self.global_meters()  # sums over every process: a resume may use another number of them
        return {
            "recipe": recipe_to_dict(self.recipe),
            "model_config": model_config(self.model),
            "normalisation": {"mean": list(self.mean), "std": list(self.std)},
            "progress": dataclasses.asdict(progress),
            "meters": {
                "epoch_loss": m.epoch_loss, "epoch_correct": m.epoch_correct, "interval_loss": m.interval_loss,
                "epoch_images": m.epoch_images, "interval_images": m.interval_images,
            },
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": capture_rng(self.device),
            "precision": self.precision,
            "data_path": "streamed" if self.train_loader.streaming else "in_memory",
            "time_budget": self.budget.to_dict() if self.budget is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`'s output (of a state built from the same recipe)."""
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        fields = dict(state["progress"])
        fields["warmup_mark"] = tuple(fields["warmup_mark"])
        self.progress = Progress(**fields)
        m = state["meters"]
        self.meters = Meters.on(self.device)
        if self.processes.is_main:  # the saved sums are global: one process carries them on
            self.meters.epoch_loss.copy_(m["epoch_loss"])
            self.meters.epoch_correct.copy_(m["epoch_correct"])
            self.meters.interval_loss.copy_(m["interval_loss"])
            self.meters.epoch_images, self.meters.interval_images = m["epoch_images"], m["interval_images"]
        restore_rng(state["rng"], self.device)
        if self.processes.rank:
            # The checkpoint holds process 0's random state; the others draw masks of their own again,
            # offset by the step so that a resumed process does not replay those of the run's start.
            torch.manual_seed(model_rng_seed(self.recipe.seed, self.processes.rank) + self.progress.step * 1_000_003)


def throughput(progress: Progress, seconds: float) -> float:
    """Images per second after the first step; over the whole run when that leaves nothing."""
    warm_s, warm_images = progress.warmup_mark
    images = progress.images_seen
    if images > warm_images and seconds > warm_s:
        return (images - warm_images) / (seconds - warm_s)
    return images / max(seconds, 1e-9)


def capture_rng(device: torch.device) -> dict[str, Any]:
    """The global random states training draws from: torch's (dropout, drop path), CUDA's,
    NumPy's (timm's Mixup) and Python's. The loader's own streams need none: they are derived
    from the seed, the epoch and the batch."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    rng: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def restore_rng(rng: dict[str, Any], device: torch.device) -> None:
    """Set the global random states back to what :func:`capture_rng` took."""
    torch.set_rng_state(rng["torch"])
    n = rng["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    random.setstate(rng["python"])
    if device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], device)
