"""The training loop in parts: ``prepare`` and ``build`` a :class:`TrainState`, ``train_one_epoch``,
``evaluate_epoch``, and ``fit``, which loops over them.

Nothing here writes files or prints. The run folder (metrics, summary, checkpoints, plots) and the
progress bar are callbacks (``finetune.recorder.RunRecorder``, ``finetune.progress.TrainProgress``)
that the loop calls at fixed points: after each log interval, after each optimizer step and after
each epoch. Everything a callback may need to save or restore is in the state, and
:meth:`TrainState.state_dict` / :meth:`TrainState.load_state_dict` turn it into nested tensors and
numbers and back, so a run resumed from a checkpoint continues exactly where it stopped.

The hot path keeps to the device: batches come from ``data.BatchLoader`` (uint8 images resident on
the device, augmented and resized there), losses and accuracy counts accumulate in device tensors,
and the host reads them once per ``train.log_every`` steps. Optional features are chosen once in
:func:`build` as objects that do nothing when off (a disabled GradScaler, an identity mixup, an EMA
that is the model itself), so the loop has no branches for them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..models.sources import ResolvedSource
from ..data.core import BatchLoader, DatasetSplits, ImageTensors, load_splits, normalisation, shard
from .distributed import SINGLE, Processes, check_batch_split, model_rng_seed
from .device import (
    autocast,
    autocast_dtype,
    available_memory,
    cpu_threads,
    format_bytes,
    measure_cpu_precision,
    precision_fallback,
    precision_name,
    resolve_device,
    synchronize,
)
from ..errors import DivergedError, FinetuneError
from .evaluate import evaluate
from ..models.build import (
    ModelShape,
    create_model,
    load_model,
    model_config,
    model_shape,
    planned_shape,
    resolve_source,
)
from ..models.params import ParamCounts, add_lora, param_groups, set_trainable
from ..recipe import Recipe, recipe_to_dict

# --------------------------------------------------------------------------------------------
# What the loop calls


class Callback:
    """Hooks the loop calls; each does nothing unless a subclass overrides it."""

    def on_log(self, state: TrainState, row: dict[str, Any]) -> None:
        """Every ``train.log_every`` optimizer steps, with that interval's metrics line."""

    def on_step_end(self, state: TrainState) -> None:
        """After every optimizer step. Keep it on the host: a device sync here would cost one per
        step (the run folder's checkpoints sync, but only on the steps they are due)."""

    def on_epoch_end(self, state: TrainState, row: dict[str, Any] | None) -> None:
        """After each epoch, with its evaluation line (``None`` for an epoch not evaluated).

        ``state.progress`` already points at the next epoch, so a checkpoint taken here resumes there.
        """


class Callbacks(Callback):
    """Several callbacks called in order."""

    def __init__(self, callbacks: Sequence[Callback]):
        self.callbacks = list(callbacks)

    def on_log(self, state: TrainState, row: dict[str, Any]) -> None:
        for c in self.callbacks:
            c.on_log(state, row)

    def on_step_end(self, state: TrainState) -> None:
        for c in self.callbacks:
            c.on_step_end(state)

    def on_epoch_end(self, state: TrainState, row: dict[str, Any] | None) -> None:
        for c in self.callbacks:
            c.on_epoch_end(state, row)


class StopRequested(Exception):
    """Raised by the loop at a step or epoch boundary after ``state.stop_requested`` was set
    (SIGTERM, Ctrl-C); the callbacks have already been called for that boundary."""


# --------------------------------------------------------------------------------------------
# Building


@dataclass
class Prepared:
    """The data and the model a run trains, built and checked before any run folder is touched."""

    recipe: Recipe
    device: torch.device
    data: DatasetSplits
    model: nn.Module
    mean: tuple[float, ...]
    std: tuple[float, ...]
    out_size: tuple[int, int]


def prepare(recipe: Recipe, *, model: nn.Module | None = None, processes: Processes = SINGLE) -> Prepared:
    """Load the data and build the model a recipe asks for (or take ``model``, e.g. to resume).

    With several processes each loads the same data and builds the same model from the same
    seed, on its own GPU (``cuda:LOCAL_RANK``).

    Raises:
        FinetuneError: the data, the model or their combination is wrong; nothing is written.
    """
    device = resolve_device(recipe.device)
    if device.type == "cuda" and processes.distributed:
        device = torch.device("cuda", processes.local_rank)
    # Mixup pairs the images of each process's batch: that share must be even, not just the whole.
    check_batch_split(recipe.data.batch_size, processes.world_size, pairs=recipe.train.mixing)
    seed_everything(recipe.seed)
    # The weights are read before the data: a wrong source, or a size that cannot fit, fails at once.
    source = resolve_model_source(recipe) if model is None else None
    check_memory(recipe, planned_model_shape(recipe, source) if model is None else model_shape(model), device,
                 processes)
    data = load_splits(recipe.data, seed=recipe.seed)
    num_classes = recipe.model.num_classes or len(data.classes)
    if num_classes != len(data.classes):
        raise FinetuneError(
            f"model.num_classes is {num_classes} but the dataset has {len(data.classes)} classes.",
            "Remove model.num_classes to use the dataset's count (or pick classes with data.classes).",
        )
    if model is None:
        model = build_model(recipe, num_classes, source=source)
    cfg = model.pretrained_cfg
    mean, std = normalisation(cfg, recipe.data.mean, recipe.data.std)
    out_size = tuple(model.patch_embed.img_size) if hasattr(model, "patch_embed") else tuple(cfg["input_size"][1:])
    return Prepared(recipe, device, data, model, mean, std, out_size)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class TrainingWarning(UserWarning):
    """A recipe setting that does less than it says (a precision the device cannot use, an EMA
    warm-up longer than the run). ``finetune run`` prints it as one line."""


def memory_lower_bound(
    shape: ModelShape, *, micro_batch: int, eval_batch: int, value_bytes: int, backward_blocks: int
) -> int:
    """Bytes one process needs at the least for its largest tensors, as ``shape`` runs.

    Counted: a batch of images in floats (``B x 3 x H x W``), and the tokens (``B x N x D``) that a
    training step keeps for its backward pass, one tensor per block it trains through, or that an
    evaluation pass holds (its input and output). Not counted, though real: the weights, gradients and
    optimizer state, attention scores, the MLP's wider hidden layer, and the data held in memory. So
    the true need is several times more, and a run refused by this bound could never have run.

    Args:
        shape: the model's input and width.
        micro_batch: training images per process and step.
        eval_batch: evaluation images per process and batch.
        value_bytes: bytes per activation (2 under bf16/fp16 autocast, 4 in fp32).
        backward_blocks: blocks the backward pass goes through (0 when only the head trains).
    """
    pixels = 3 * shape.img_size[0] * shape.img_size[1] * value_bytes
    tokens = shape.tokens * shape.width * value_bytes
    train = micro_batch * (pixels + tokens * (1 + backward_blocks))
    evaluate = eval_batch * (pixels + 2 * tokens)
    return max(train, evaluate)


def check_memory(
    recipe: Recipe, shape: ModelShape | None, device: torch.device, processes: Processes = SINGLE
) -> None:
    """Refuse, before any data loads, a run whose largest tensors cannot fit in the memory there is
    (see :func:`memory_lower_bound`): it would otherwise load its data and then fail in the
    allocator with a traceback (``model.img_size=100000`` asked for 3.8 TB).

    Raises:
        FinetuneError: naming the size, the tokens, the memory needed and available, and what fits.
    """
    have = available_memory(device)
    if shape is None or have is None:
        return
    if device.type == "cpu":
        have //= processes.world_size  # the processes of a CPU run share the machine's memory
    r = recipe
    micro = r.data.batch_size // processes.world_size
    evals = r.data.eval_batch_size or 2 * r.data.batch_size
    mode = r.train.mode
    blocks = 0 if mode == "head" else min(r.train.last_k, shape.depth) if mode == "last_k" else shape.depth
    value_bytes = 4 if autocast_dtype(r.train.precision, device) is None else 2
    need = memory_lower_bound(shape, micro_batch=micro, eval_batch=evals, value_bytes=value_bytes,
                              backward_blocks=blocks)
    if need <= have:
        return
    (h, w), (ph, pw) = shape.img_size, shape.patch_size
    # The need grows with the image's area: this side would just meet the bound (the real limit is lower).
    side = int(min(h, w) * math.sqrt(have / need)) // max(ph, pw) * max(ph, pw)
    where = "per process " if processes.distributed else ""
    raise FinetuneError(
        f"An input of {h}x{w} px in {ph}x{pw}-px patches makes {shape.tokens:,} tokens per image; at "
        f"{micro} training and {evals} evaluation images {where}per batch the run needs at least {format_bytes(need)} "
        f"of memory on the {device.type.upper()} for its images and activations alone, and {format_bytes(have)} "
        "is available. No data was loaded.",
        (f"Use a smaller model.img_size (below {side} px, the size that meets this bound)" if side >= max(ph, pw)
         else "Use a much smaller model.img_size")
        + ", a smaller data.batch_size or data.eval_batch_size, or a larger model.patch_size.",
    )


def model_kwargs(recipe: Recipe) -> dict[str, Any]:
    """Constructor arguments that shape training but not the weights' layout (not in config.json)."""
    return {"drop_path_rate": recipe.model.drop_path_rate} if recipe.model.drop_path_rate else {}


def resolve_model_source(recipe: Recipe) -> ResolvedSource | None:
    """The weights and self-description of ``model.source`` (read once), or ``None`` from scratch."""
    if recipe.train.mode == "scratch":
        return None
    return resolve_source(recipe.model.source, arch=recipe.model.arch)


def planned_model_shape(recipe: Recipe, source: ResolvedSource | None) -> ModelShape | None:
    """The shape of the model :func:`build_model` will make, from a meta-device build (nothing allocated)."""
    m = recipe.model
    arch = m.arch if source is None else source.arch
    return planned_shape(arch, resolved=source, img_size=m.img_size, patch_size=m.patch_size, **model_kwargs(recipe))


def build_model(recipe: Recipe, num_classes: int, *, source: ResolvedSource | None = None) -> nn.Module:
    """The model a recipe asks for: a pretrained source adapted on load (``source``, when it has
    been read already), or a from-scratch preset."""
    m = recipe.model
    extra = model_kwargs(recipe)
    if recipe.train.mode == "scratch":
        return create_model(
            m.arch, num_classes=m.num_classes or num_classes, img_size=m.img_size, patch_size=m.patch_size, **extra
        )
    return load_model(
        source if source is not None else m.source,
        num_classes=m.num_classes or num_classes,
        img_size=m.img_size,
        patch_size=m.patch_size,
        pos_embed_mode=m.pos_embed_mode,
        arch=m.arch,
        strict=m.strict,
        **extra,
    )


# Where torch has fused Adam/AdamW/SGD kernels (the CPU ones since torch 2.4).
FUSED_DEVICES = ("cuda", "cpu")


def optimizer_kernel(optimizer: torch.optim.Optimizer) -> str:
    """How ``optimizer`` steps: ``fused``, ``foreach`` or ``for-loop`` (what summary.json records)."""
    group = optimizer.param_groups[0]
    if group.get("fused"):
        return "fused"
    return "foreach" if group.get("foreach") else "for-loop"


def build_optimizer(recipe: Recipe, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """SGD (plain momentum, as in the course) or Adam/AdamW over ``param_groups``.

    Norms, biases and pos/cls/dist tokens get no weight decay; ``layer_decay`` scales the lr per
    block (applied by the timm scheduler through each group's ``lr_scale``). The fused kernels are
    used on CUDA and on the CPU unless the recipe says otherwise: on a CPU torch's own default is
    a Python loop over the parameters, ~4x slower than the fused step for the lab's ViT on an
    idle 2-core machine and ~70x slower when another process shares the cores (``optimizer_kernel``).
    """
    o = recipe.optim
    groups = param_groups(model, weight_decay=o.weight_decay, layer_decay=o.layer_decay)
    if not groups:
        raise FinetuneError("Nothing to train: every parameter is frozen.", "Check train.mode.")
    fused = o.fused if o.fused is not None else device.type in FUSED_DEVICES
    kwargs: dict[str, Any] = {"lr": o.lr}
    if fused:
        kwargs["fused"] = True
    if o.name == "sgd":
        return torch.optim.SGD(groups, momentum=o.momentum, **kwargs)
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    return cls(groups, betas=tuple(o.betas), **kwargs)


def build_scheduler(recipe: Recipe, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """A timm scheduler stepped per optimizer update (``t_in_epochs=False``)."""
    from timm.scheduler import CosineLRScheduler, StepLRScheduler

    s = recipe.schedule
    total = max(1, recipe.train.epochs * steps_per_epoch)
    warmup = int(round(s.warmup_epochs * steps_per_epoch))
    common = dict(warmup_t=warmup, warmup_lr_init=s.warmup_lr, t_in_epochs=False)
    if s.name == "cosine":
        # The cosine starts after the warmup (warmup_prefix), so the peak lr is reached.
        return CosineLRScheduler(
            optimizer, t_initial=max(1, total - warmup), lr_min=s.min_lr, warmup_prefix=True, **common
        )
    if s.name == "step":
        return StepLRScheduler(optimizer, decay_t=s.step_epochs * steps_per_epoch, decay_rate=s.step_gamma, **common)
    return StepLRScheduler(optimizer, decay_t=total + 1, decay_rate=1.0, **common)  # constant


class NoEma:
    """Stands in for the weight EMA when it is off: the "average" is the model itself."""

    def __init__(self, model: nn.Module):
        self.module = model

    def update(self, model: nn.Module, step: int | None = None) -> None:
        pass

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        pass


def _no_mixup(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x, y


def build_loss(recipe: Recipe) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Cross-entropy in fp32, chosen once: soft targets with Mixup/CutMix (which already applied the
    label smoothing), label-smoothed hard targets otherwise."""
    if recipe.train.mixup_alpha or recipe.train.cutmix_alpha:
        from timm.loss import SoftTargetCrossEntropy

        soft = SoftTargetCrossEntropy()
        return lambda logits, target: soft(logits.float(), target)
    smoothing = recipe.train.label_smoothing
    return lambda logits, target: F.cross_entropy(logits.float(), target, label_smoothing=smoothing)


def _on_device(in_memory: bool | str, data: DatasetSplits, device: torch.device) -> bool:
    """Whether decoded images live on the device (``data.in_memory`` true, or ``auto`` when they
    take at most half its free memory) rather than in host memory, copied over per batch."""
    if in_memory != "auto" or device.type != "cuda":
        return bool(in_memory) or device.type != "cuda"
    splits = [s for s in (data.train, data.val, data.test) if s is not None and isinstance(s, ImageTensors)]
    decoded = sum(s.images.numel() for s in splits)
    return decoded <= torch.cuda.mem_get_info(device)[0] // 2


def build_clipper(
    recipe: Recipe, model: nn.Module, scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer
) -> Callable[[], None]:
    """Gradient-norm clipping as one call, chosen once: a call that does nothing when
    ``train.clip_grad`` is null."""
    max_norm = recipe.train.clip_grad
    if max_norm is None:
        return lambda: None
    trainable = [q for q in model.parameters() if q.requires_grad]

    def clip() -> None:
        scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
        nn.utils.clip_grad_norm_(trainable, max_norm)

    return clip


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
        epoch: the epoch in progress, from 1; ``train.epochs + 1`` once training is done.
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


@dataclass
class TrainState:
    """Everything a run trains with, and where it is. Built by :func:`build`."""

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
        return self.mixup is not _no_mixup

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


def _choose_precision(
    r: Recipe, model: nn.Module, device: torch.device, size: tuple[int, int], processes: Processes, chosen: str | None
) -> tuple[torch.dtype | None, dict[str, Any] | None]:
    """The autocast dtype to train in, and the measurement behind it when there was one.

    ``chosen`` (a resumed run's) wins. ``auto`` on a CPU is measured (:func:`measure_cpu_precision`)
    on this process's batch, on the main process only, and shared, so every process computes alike.
    """
    if chosen is not None:
        return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[chosen], None
    if r.train.precision == "auto" and device.type == "cpu":
        batch = max(1, r.data.batch_size // processes.world_size)
        choice = measure_cpu_precision(model, min(batch, 64), size, steps=2) if processes.is_main else None
        choice = processes.broadcast_object(choice)
        return (torch.bfloat16 if choice["chosen"] == "bf16" else None), choice
    fallback = precision_fallback(r.train.precision, device)
    if fallback is not None:
        warnings.warn(fallback, TrainingWarning, stacklevel=3)
    return autocast_dtype(r.train.precision, device), None


def build(prepared: Prepared, processes: Processes = SINGLE, *, precision: str | None = None) -> TrainState:
    """Everything the loop needs, chosen once: model on the device, loaders, optimizer, schedule,
    GradScaler, loss, mixup, EMA and gradient clipping; with several processes, the model wrapped
    in DistributedDataParallel and each evaluation split cut into one part per process.

    ``precision`` (``fp32``, ``bf16``, ``fp16``) is the one a resumed run had chosen, so that
    ``train.precision=auto`` is not measured again (and maybe decided otherwise) on resume.
    """
    p = prepared
    r, device = p.recipe, p.device
    threads = None
    if device.type == "cpu":
        # Physical cores, shared among this machine's processes: hardware threads of one core add
        # nothing to small matrix products and oversubscription slows every process down. One
        # process keeps torch's own count (its physical cores) unless train.cpu_threads says otherwise.
        local = int(os.environ.get("LOCAL_WORLD_SIZE", processes.world_size))
        if r.train.cpu_threads is not None or local > 1:
            torch.set_num_threads(cpu_threads(r.train.cpu_threads, local))
        threads = torch.get_num_threads()
    model = p.model.to(device)
    if r.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if r.train.mode == "lora":
        lora = r.train.lora
        model = add_lora(model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout, target_modules=lora.target_modules)
    counts = set_trainable(model, r.train.mode, last_k=r.train.last_k, bitfit_norms=r.train.bitfit_norms)
    amp_dtype, precision_choice = _choose_precision(r, model, device, p.out_size, processes, precision)
    num_classes = model.num_classes

    loader_args = dict(
        device=device, out_size=p.out_size, mean=p.mean, std=p.std, channels_last=r.train.channels_last,
        in_memory=_on_device(r.data.in_memory, p.data, device), seed=r.seed, workers=r.data.workers,
        dtype=amp_dtype or torch.float32,  # autocast casts the input anyway; half the bytes at 224 px
    )
    train_loader = BatchLoader(p.data.train, batch_size=r.data.batch_size, train=True, augment=r.data.augment,
                               rank=processes.rank, world_size=processes.world_size, **loader_args)
    eval_bs = r.data.eval_batch_size or 2 * r.data.batch_size

    def eval_loader(split):
        part = shard(split, processes.rank, processes.world_size)
        return BatchLoader(part, batch_size=eval_bs, train=False, **loader_args)

    test_loader = eval_loader(p.data.test)
    val_loader = eval_loader(p.data.val) if p.data.val is not None else None

    steps_per_epoch = math.ceil(len(train_loader) / r.train.grad_accum)
    optimizer = build_optimizer(r, model, device)
    scheduler = build_scheduler(r, optimizer, steps_per_epoch)
    # One code path for every precision: a disabled scaler passes losses and steps through.
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    mixup = _no_mixup
    if r.train.mixup_alpha or r.train.cutmix_alpha:
        from timm.data import Mixup

        mixup = Mixup(
            mixup_alpha=r.train.mixup_alpha, cutmix_alpha=r.train.cutmix_alpha,
            label_smoothing=r.train.label_smoothing, num_classes=num_classes,
        )
    ema: Any = NoEma(model)
    if r.train.ema:
        from timm.utils import ModelEmaV3

        # ema_decay from the second step on: timm's first update (step 1) copies the weights, so the
        # average never leans on the starting weights. The warm-up is opt-in: its ramp reaches 0.9998
        # only after 354,000 steps, so on by default it would make ema_decay mean almost nothing.
        ema = ModelEmaV3(model, decay=r.train.ema_decay, use_warmup=r.train.ema_warmup)
        if r.train.ema_warmup:
            warnings.warn(ema_warmup_note(r.train.ema_decay, r.train.epochs * steps_per_epoch), TrainingWarning,
                          stacklevel=2)

    forward: Any = model
    no_sync = contextlib.nullcontext
    if processes.distributed:
        from torch.nn.parallel import DistributedDataParallel

        # Built from the same seed everywhere; DDP also broadcasts rank 0's weights to be sure.
        forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        no_sync = forward.no_sync
    if r.train.compile:
        forward = torch.compile(forward)
    # Everything random that must be equal on every process is built; from here torch's random state
    # draws dropout and drop-path masks, which must differ between processes.
    torch.manual_seed(model_rng_seed(r.seed, processes.rank))
    return TrainState(
        recipe=r, device=device, model=model, forward=forward,
        optimizer=optimizer, scheduler=scheduler, scaler=scaler, loss_fn=build_loss(r), mixup=mixup, ema=ema,
        clip_gradients=build_clipper(r, model, scaler, optimizer),
        train_loader=train_loader, val_loader=val_loader, test_loader=test_loader,
        classes=list(p.data.classes), amp_dtype=amp_dtype, precision_choice=precision_choice, cpu_threads=threads,
        steps_per_epoch=steps_per_epoch, counts=counts,
        mean=p.mean, std=p.std, out_size=p.out_size, meters=Meters.on(device), processes=processes, no_sync=no_sync,
    )


def ema_warmup_decay(decay: float, step: int) -> float:
    """The decay timm's ModelEmaV3 warm-up uses at optimizer step ``step`` (from 1): 0 at step 1
    (the average becomes the weights), then ``min(decay, 1 - step^(-2/3))``."""
    return 0.0 if step <= 1 else min(decay, 1 - step ** (-2 / 3))


def ema_warmup_note(decay: float, total_steps: int) -> str:
    """What the EMA warm-up does to a run of ``total_steps`` optimizer steps, in one sentence."""
    reached = math.ceil((1 - decay) ** -1.5)  # the first step whose warm-up decay is ``decay``
    final = ema_warmup_decay(decay, total_steps)
    if total_steps >= reached:
        return (f"train.ema_warmup ramps the EMA decay up to train.ema_decay={decay:g} by step {reached:,} of this "
                f"run's {total_steps:,}; before that the average spans fewer steps.")
    return (f"train.ema_warmup ramps the EMA decay up from 0: this run's {total_steps:,} steps end at decay "
            f"{final:.5f} (an average over about {1 / (1 - final):,.0f} steps), short of train.ema_decay={decay:g}, "
            f"which the ramp reaches only at step {reached:,}. Set train.ema_warmup=false for ema_decay from the "
            "start.")


# --------------------------------------------------------------------------------------------
# Random states


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
    torch.set_rng_state(rng["torch"])
    n = rng["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    random.setstate(rng["python"])
    if device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], device)


# --------------------------------------------------------------------------------------------
# The loop


def fit(state: TrainState, callbacks: Callback) -> None:
    """Train from ``state.progress`` to the last epoch, evaluating as the recipe says.

    Raises:
        DivergedError: the training loss stopped being a finite number.
        StopRequested: ``state.stop_requested`` was set; the run stopped at a step or epoch
            boundary after the callbacks had their say (a checkpoint, in a run folder).
    """
    r, p = state.recipe, state.progress
    while p.epoch <= r.train.epochs:
        if p.batch == 0:
            state.meters.reset_epoch()
        train_one_epoch(state, callbacks)
        evaluated = p.epoch % r.train.eval_every == 0 or p.epoch == r.train.epochs
        row = evaluate_epoch(state) if evaluated else None
        p.epoch, p.batch = p.epoch + 1, 0
        state.stopping = state.agree_to_stop(synced=True)
        callbacks.on_epoch_end(state, row)
        if state.stopping and p.epoch <= r.train.epochs:
            raise StopRequested(_stopped_by(state))


def train_one_epoch(state: TrainState, callbacks: Callback) -> None:
    """Train the rest of epoch ``state.progress.epoch``, from micro-batch ``progress.batch`` on.

    Raises:
        DivergedError: a log interval's or the epoch's mean loss is not finite.
        StopRequested: ``state.stop_requested`` is set at a step boundary.
    """
    r, p, m = state.recipe, state.progress, state.meters
    loader, accum = state.train_loader, r.train.grad_accum
    n = len(loader)
    loader.set_epoch(p.epoch)
    state.model.train()
    state.segment_start = time.perf_counter()
    world = state.processes.world_size
    for i, (x, y) in enumerate(loader.iter_from(p.batch), start=p.batch):
        x, target = state.mixup(x, y)
        last_micro = (i + 1) % accum == 0 or i + 1 == n
        # Under DDP the gradients of the micro-batches before the last one stay local (no_sync):
        # one all-reduce per optimizer step.
        with contextlib.nullcontext() if last_micro else state.no_sync():
            with autocast(state.device, state.amp_dtype):
                logits = state.forward(x)
                loss = state.loss_fn(logits, target)
            # Average over the micro-batches of this optimizer step; the last group of an epoch
            # may be shorter than grad_accum.
            group_size = min(accum, n - (i - i % accum))
            state.scaler.scale(loss / group_size).backward()
        m.add(loss, logits, y)
        p.images_seen += x.shape[0] * world  # every process trains an equal part of the batch
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
    g = state.global_meters()
    p.train_loss = _finite_mean(state, g.epoch_loss, g.epoch_images, f"the mean training loss of epoch {p.epoch}")
    p.train_acc1 = float(g.epoch_correct) / max(g.epoch_images, 1)
    synchronize(state.device)
    p.train_time_s = state.train_time()
    state.segment_start = None


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
    return row


def base_lr(optimizer: torch.optim.Optimizer) -> float:
    """The unscaled lr: with layer decay, groups carry lr * lr_scale and the head's scale is 1."""
    return max(group["lr"] / group.get("lr_scale", 1.0) for group in optimizer.param_groups)


def throughput(progress: Progress, seconds: float) -> float:
    """Images per second after the first step; over the whole run when that leaves nothing."""
    warm_s, warm_images = progress.warmup_mark
    images = progress.images_seen
    if images > warm_images and seconds > warm_s:
        return (images - warm_images) / (seconds - warm_s)
    return images / max(seconds, 1e-9)

