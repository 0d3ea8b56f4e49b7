"""The training engine behind ``finetune run``: one recipe in, one self-describing run directory out.

The hot path keeps to the GPU: batches come from ``data.BatchLoader`` (uint8 images resident on
the device, augmented and resized there), losses and accuracy counts accumulate in device tensors,
and the host reads them once per ``train.log_every`` steps.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import random
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import BatchLoader, DatasetSplits, load_splits
from .errors import FinetuneError
from .models import create_model, load_model, save_model
from .params import param_groups, set_trainable
from .recipe import Recipe, dump_recipe_yaml


class RunDirError(FinetuneError):
    """The output folder of a run already exists (and overwrite is off)."""


# --------------------------------------------------------------------------------------------
# Setup


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then the CPU; anything else is taken as given."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FinetuneError(
            f"The recipe asks for device '{name}', but this machine has no CUDA GPU.",
            "Use device=auto (falls back to the CPU) or device=cpu.",
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise FinetuneError(
            f"The recipe asks for device '{name}', but this machine has {torch.cuda.device_count()} GPU(s).",
            "Use device=cuda (the first GPU) or a smaller index.",
        )
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision on a device; ``None`` means plain fp32.

    CPUs run bf16/fp16 matmuls slowly or not at all, so both fall back to fp32 there.
    """
    if device.type == "cpu" or precision == "fp32":
        return None
    return torch.bfloat16 if precision == "bf16" else torch.float16


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_dir_for(recipe: Recipe) -> Path:
    """``output.dir / name``."""
    return Path(recipe.output.dir).expanduser() / (recipe.name or "run")


def check_run_dir(path: Path, overwrite: bool) -> None:
    """Refuse to touch an existing, non-empty run folder unless told to overwrite it."""
    if path.exists() and not path.is_dir():
        raise RunDirError(
            f"The run folder {path} is a file.", "Pick another name (name=...) or output.dir, or move the file."
        )
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise RunDirError(
            f"The run folder {path} already exists; finetune never overwrites an earlier run.",
            "Pick another name (name=my_run_2 or output.dir=...), or pass output.overwrite=true to replace it.",
        )


def build_model(recipe: Recipe, num_classes: int) -> nn.Module:
    """The model a recipe asks for: a pretrained source adapted on load, or a from-scratch preset."""
    m = recipe.model
    extra: dict[str, Any] = {}
    if m.drop_path_rate:
        extra["drop_path_rate"] = m.drop_path_rate
    if recipe.train.mode == "scratch":
        return create_model(
            m.arch, num_classes=m.num_classes or num_classes, img_size=m.img_size, patch_size=m.patch_size, **extra
        )
    return load_model(
        m.source,
        num_classes=m.num_classes or num_classes,
        img_size=m.img_size,
        patch_size=m.patch_size,
        pos_embed_mode=m.pos_embed_mode,
        arch=m.arch,
        strict=m.strict,
        **extra,
    )


def build_optimizer(recipe: Recipe, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """SGD (plain momentum, as in the course) or Adam/AdamW over ``param_groups``.

    Norms, biases and pos/cls/dist tokens get no weight decay; ``layer_decay`` scales the lr per
    block (applied by the timm scheduler through each group's ``lr_scale``). The fused kernels are
    used on CUDA unless the recipe says otherwise.
    """
    o = recipe.optim
    groups = param_groups(model, weight_decay=o.weight_decay, layer_decay=o.layer_decay)
    if not groups:
        raise FinetuneError("Nothing to train: every parameter is frozen.", "Check train.mode.")
    fused = o.fused if o.fused is not None else device.type == "cuda"
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


# --------------------------------------------------------------------------------------------
# Evaluation


@dataclass
class EvalResult:
    acc1: float
    acc5: float
    loss: float
    per_class_acc: list[float]
    confusion: list[list[int]]
    images: int

    def as_dict(self, prefix: str) -> dict[str, Any]:
        return {f"{prefix}_acc1": self.acc1, f"{prefix}_acc5": self.acc5, f"{prefix}_loss": self.loss}


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: BatchLoader, num_classes: int, *, amp_dtype: torch.dtype | None = None
) -> EvalResult:
    """Top-1, top-5, mean cross-entropy, per-class accuracy and the confusion matrix.

    Everything accumulates on the device; the host reads the totals once at the end.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.long, device=device)
    loss_sum = torch.zeros((), dtype=torch.float32 if device.type == "mps" else torch.float64, device=device)
    top5_hits = torch.zeros((), dtype=torch.long, device=device)
    k = min(5, num_classes)
    for x, y in loader:
        with _autocast(device, amp_dtype):
            logits = model(x)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        top = logits.topk(k, dim=1).indices  # (B, k)
        top5_hits += (top == y[:, None]).any(dim=1).sum()
        confusion += torch.bincount(y * num_classes + top[:, 0], minlength=num_classes * num_classes)
    model.train(was_training)
    matrix = confusion.view(num_classes, num_classes).cpu()
    n = int(matrix.sum())
    per_class = (matrix.diag().double() / matrix.sum(1).clamp(min=1)).tolist()
    return EvalResult(
        acc1=float(matrix.diag().sum()) / max(n, 1),
        acc5=float(top5_hits) / max(n, 1),
        loss=float(loss_sum) / max(n, 1),
        per_class_acc=per_class,
        confusion=matrix.tolist(),
        images=n,
    )


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# --------------------------------------------------------------------------------------------
# Run directory


class RunWriter:
    """Writes the run directory: recipe, metrics lines, summary, model and plots."""

    def __init__(self, path: Path, recipe: Recipe):
        self.path = path
        self.recipe = recipe
        self._metrics = None

    def start(self, overwrite: bool) -> None:
        check_run_dir(self.path, overwrite)
        if self.path.exists() and overwrite:
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "recipe.yaml").write_text(dump_recipe_yaml(self.recipe))
        self._metrics = open(self.path / "metrics.jsonl", "a", buffering=1)

    def log(self, row: dict[str, Any]) -> None:
        self._metrics.write(json.dumps(row) + "\n")

    def write_summary(self, summary: dict[str, Any]) -> None:
        tmp = self.path / ".summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        os.replace(tmp, self.path / "summary.json")

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None


def environment(device: torch.device) -> dict[str, Any]:
    """Device and library versions for the summary."""
    import timm
    import torchvision

    from . import __version__

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {
        "device": str(device),
        "device_name": name,
        "versions": {
            "finetune": __version__,
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "timm": timm.__version__,
            "cuda": torch.version.cuda,
        },
    }


def _peak_memory_mb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    except ImportError:  # pragma: no cover - Windows
        return None


# --------------------------------------------------------------------------------------------
# The run


@dataclass
class Prepared:
    """Everything a run needs, built and checked before the run folder is touched."""

    recipe: Recipe
    device: torch.device
    data: DatasetSplits
    model: nn.Module
    mean: tuple[float, ...]
    std: tuple[float, ...]
    out_size: tuple[int, int]


def prepare(recipe: Recipe) -> Prepared:
    """Check the run folder, load the data and build the model; raise before writing anything."""
    check_run_dir(run_dir_for(recipe), recipe.output.overwrite)
    device = resolve_device(recipe.device)
    if (recipe.train.mixup_alpha or recipe.train.cutmix_alpha) and recipe.data.batch_size % 2:
        raise FinetuneError(
            f"Mixup/CutMix pair images within a batch, so data.batch_size must be even (got {recipe.data.batch_size}).",
            "Use an even batch size, or set train.mixup_alpha and train.cutmix_alpha to 0.",
        )
    seed_everything(recipe.seed)
    data = load_splits(recipe.data, seed=recipe.seed)
    num_classes = recipe.model.num_classes or len(data.classes)
    if num_classes != len(data.classes):
        raise FinetuneError(
            f"model.num_classes is {num_classes} but the dataset has {len(data.classes)} classes.",
            "Remove model.num_classes to use the dataset's count (or pick classes with data.classes).",
        )
    model = build_model(recipe, num_classes)
    cfg = model.pretrained_cfg
    mean = tuple(recipe.data.mean or cfg.get("mean") or (0.5, 0.5, 0.5))
    std = tuple(recipe.data.std or cfg.get("std") or (0.5, 0.5, 0.5))
    out_size = tuple(model.patch_embed.img_size) if hasattr(model, "patch_embed") else tuple(cfg["input_size"][1:])
    return Prepared(recipe, device, data, model, mean, std, out_size)


def run(
    recipe: Recipe,
    *,
    recipe_path: str | None = None,
    quiet: bool = False,
    prepared: Prepared | None = None,
) -> dict[str, Any]:
    """Train and evaluate as the recipe says; write the run directory; return the summary.

    Raises:
        FinetuneError: anything wrong with the recipe's data, model or output folder, raised before
            the run folder is created.
    """
    p = prepared or prepare(recipe)
    r, device = p.recipe, p.device
    model = p.model.to(device)
    if r.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    counts = set_trainable(model, r.train.mode, last_k=r.train.last_k)
    amp_dtype = autocast_dtype(r.train.precision, device)
    num_classes = model.num_classes

    loader_args = dict(
        device=device, out_size=p.out_size, mean=p.mean, std=p.std, channels_last=r.train.channels_last,
        in_memory=r.data.in_memory, seed=r.seed,
        dtype=amp_dtype or torch.float32,  # autocast casts the input anyway; half the bytes at 224 px
    )
    train_loader = BatchLoader(p.data.train, batch_size=r.data.batch_size, train=True, augment=r.data.augment, **loader_args)
    eval_bs = r.data.eval_batch_size or 2 * r.data.batch_size
    test_loader = BatchLoader(p.data.test, batch_size=eval_bs, train=False, **loader_args)
    val_loader = BatchLoader(p.data.val, batch_size=eval_bs, train=False, **loader_args) if p.data.val is not None else None

    steps_per_epoch = math.ceil(len(train_loader) / r.train.grad_accum)
    optimizer = build_optimizer(r, model, device)
    scheduler = build_scheduler(r, optimizer, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    mixup = None
    if r.train.mixup_alpha or r.train.cutmix_alpha:
        from timm.data import Mixup

        mixup = Mixup(
            mixup_alpha=r.train.mixup_alpha, cutmix_alpha=r.train.cutmix_alpha,
            label_smoothing=r.train.label_smoothing, num_classes=num_classes,
        )
    ema = None
    if r.train.ema:
        from timm.utils import ModelEmaV3

        # Warm the decay up from 0 (timm's use_warmup): with a fixed 0.9998 from step 1 the average
        # would stay close to the random or pretrained starting weights for thousands of steps.
        ema = ModelEmaV3(model, decay=r.train.ema_decay, use_warmup=True)
    forward = torch.compile(model) if r.train.compile else model

    writer = RunWriter(run_dir_for(r), r)
    writer.start(r.output.overwrite)
    env = environment(device)
    summary: dict[str, Any] = {
        "name": r.name,
        "status": "running",
        "error": None,
        "recipe_path": recipe_path,
        "mode": r.train.mode,
        "arch": getattr(model, "finetune_spec", {}).get("arch"),
        "source": r.model.source,
        "epochs": r.train.epochs,
        "train_images": len(p.data.train),
        "test_images": len(p.data.test),
        "params_trainable": counts.trainable,
        "params_total": counts.total,
        "img_size": list(p.out_size),
        "precision": "fp32" if amp_dtype is None else r.train.precision,
        "classes": p.data.classes,
        **env,
    }
    if getattr(model, "load_report", None) is not None:
        summary["load_report"] = model.load_report.summary()
    writer.write_summary(summary)

    from .progress import TrainProgress

    progress = TrainProgress(total_steps=steps_per_epoch * r.train.epochs, quiet=quiet)
    train_time = 0.0
    images_seen = 0
    step = 0
    best = (-1.0, 0)
    warmup_mark = (0.0, 0)  # (training seconds, images) at the end of the first optimizer step
    last_eval: EvalResult | None = None
    wall_start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with progress, _sigterm_as_interrupt():
            for epoch in range(1, r.train.epochs + 1):
                model.train()
                train_loader.set_epoch(epoch)
                epoch_loss = torch.zeros((), device=device)
                epoch_correct = torch.zeros((), dtype=torch.long, device=device)
                epoch_images = 0
                interval_loss = torch.zeros((), device=device)
                interval_images = 0
                interval_start = time.perf_counter()
                epoch_start = interval_start
                for i, (x, y) in enumerate(train_loader):
                    target = y
                    if mixup is not None:
                        x, target = mixup(x, y)
                    with _autocast(device, amp_dtype):
                        logits = forward(x)
                        loss = _loss(logits, target, r.train.label_smoothing)
                    # Average over the micro-batches of this optimizer step; the last group of
                    # an epoch may be shorter than grad_accum.
                    group_start = i - i % r.train.grad_accum
                    group_size = min(r.train.grad_accum, len(train_loader) - group_start)
                    loss_for_backward = loss / group_size
                    if scaler is not None:
                        scaler.scale(loss_for_backward).backward()
                    else:
                        loss_for_backward.backward()
                    last_micro = (i + 1) % r.train.grad_accum == 0 or i + 1 == len(train_loader)
                    if last_micro:
                        step_lr = _base_lr(optimizer)  # the lr this step uses, before the scheduler moves it
                        if r.train.clip_grad is not None:
                            if scaler is not None:
                                scaler.unscale_(optimizer)
                            nn.utils.clip_grad_norm_(model.parameters(), r.train.clip_grad)
                        if scaler is not None:
                            scaler.step(optimizer)
                            scaler.update()
                        else:
                            optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                        step += 1
                        if step == 1:
                            # The first step carries one-off costs (allocator warm-up, autotuning,
                            # compilation); throughput is measured from the end of it.
                            if device.type == "cuda":
                                torch.cuda.synchronize(device)
                            warmup_mark = (train_time + time.perf_counter() - epoch_start, images_seen + epoch_images + x.shape[0])
                        scheduler.step_update(num_updates=step)
                        if ema is not None:
                            ema.update(model, step=step)
                    batch = x.shape[0]
                    detached = loss.detach().float() * batch
                    epoch_loss += detached
                    interval_loss += detached
                    if mixup is None:
                        epoch_correct += (logits.detach().argmax(1) == y).sum()
                    epoch_images += batch
                    interval_images += batch
                    if last_micro and step % r.train.log_every == 0:
                        # One host sync per log interval.
                        mean_loss = float(interval_loss) / interval_images
                        now = time.perf_counter()
                        ips = interval_images / max(now - interval_start, 1e-9)
                        row = {
                            "kind": "step", "epoch": epoch, "step": step,
                            "time_s": round(train_time + now - epoch_start, 4),
                            "loss": mean_loss, "lr": step_lr, "images_per_s": ips,
                        }
                        writer.log(row)
                        progress.update(step, epoch, loss=mean_loss, images_per_s=ips)
                        interval_loss.zero_()
                        interval_images = 0
                        interval_start = now
                    elif last_micro:
                        progress.advance(step, epoch)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                train_time += time.perf_counter() - epoch_start
                images_seen += epoch_images
                if epoch % r.train.eval_every and epoch != r.train.epochs:
                    continue
                eval_model = ema.module if ema is not None else model
                last_eval = evaluate(eval_model, test_loader, num_classes, amp_dtype=amp_dtype)
                row = {
                    "kind": "epoch", "epoch": epoch, "step": step, "time_s": round(train_time, 4),
                    "train_loss": float(epoch_loss) / max(epoch_images, 1),
                    "train_acc1": float(epoch_correct) / max(epoch_images, 1) if mixup is None else None,
                    **last_eval.as_dict("test"),
                    "val_acc1": None,
                    "lr": step_lr,
                    "per_class_acc": last_eval.per_class_acc,
                }
                if val_loader is not None:
                    val = evaluate(eval_model, val_loader, num_classes, amp_dtype=amp_dtype)
                    row.update(val.as_dict("val"))
                writer.log(row)
                progress.epoch_done(epoch, row)
                if last_eval.acc1 > best[0]:
                    best = (last_eval.acc1, epoch)
        writer.close()
        final_model = ema.module if ema is not None else model
        # Record the normalisation this run trained with (data.mean/std may override the model's),
        # so eval and predict feed the saved model what it learned on.
        final_model.pretrained_cfg = dict(final_model.pretrained_cfg, mean=list(p.mean), std=list(p.std))
        if r.output.save_model:
            save_model(final_model, writer.path, class_names=p.data.classes)
        if r.output.plots:
            from .report import plot_confusion, plot_curves

            plot_curves(writer.path / "metrics.jsonl", writer.path / "curves.png", title=r.name)
            plot_confusion(last_eval.confusion, p.data.classes, writer.path / "confusion_matrix.png")
    except KeyboardInterrupt:
        summary.update(status="interrupted", error="interrupted (Ctrl-C or SIGTERM)", wall_time_s=time.perf_counter() - wall_start)
        writer.write_summary(summary)
        writer.close()
        raise
    except Exception as exc:
        summary.update(status="failed", error=f"{type(exc).__name__}: {exc}", wall_time_s=time.perf_counter() - wall_start)
        writer.write_summary(summary)
        writer.close()
        raise

    # "finished" is written last: a run folder that says so has its model and plots.
    summary.update(
        status="finished",
        best_acc1=best[0],
        best_epoch=best[1],
        final_acc1=last_eval.acc1,
        final_acc5=last_eval.acc5,
        final_loss=last_eval.loss,
        per_class_acc=last_eval.per_class_acc,
        confusion_matrix=last_eval.confusion,
        steps=step,
        train_time_s=train_time,
        wall_time_s=time.perf_counter() - wall_start,
        images_per_s=_throughput(images_seen, train_time, warmup_mark),
        peak_memory_mb=_peak_memory_mb(device),
        peak_memory_kind="cuda" if device.type == "cuda" else "process_rss",
    )
    writer.write_summary(summary)
    return summary


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """Treat SIGTERM (``kill``, a job scheduler's stop) like Ctrl-C while training, so the run
    folder says "interrupted" instead of "running" forever."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _base_lr(optimizer: torch.optim.Optimizer) -> float:
    """The unscaled lr: with layer decay, groups carry lr * lr_scale and the head's scale is 1."""
    return max(group["lr"] / group.get("lr_scale", 1.0) for group in optimizer.param_groups)


def _throughput(images: int, seconds: float, warmup_mark: tuple[float, int]) -> float:
    """Images per second after the first step; over the whole run when that leaves nothing."""
    warm_s, warm_images = warmup_mark
    if images > warm_images and seconds > warm_s:
        return (images - warm_images) / (seconds - warm_s)
    return images / max(seconds, 1e-9)


def _loss(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Cross-entropy in fp32; soft targets come from timm's Mixup, which already applied smoothing."""
    from timm.loss import SoftTargetCrossEntropy

    logits = logits.float()
    if target.dtype.is_floating_point:
        return SoftTargetCrossEntropy()(logits, target)
    return F.cross_entropy(logits, target, label_smoothing=label_smoothing)
