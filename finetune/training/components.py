"""The parts of a training step, each chosen once from the recipe before the loop starts: the
optimizer (with the fused-kernel choice) and its schedule, the weight EMA, Mixup/CutMix and the
loss, gradient clipping, and the precision to compute in.

An optional feature that is off is an object that does nothing (:class:`NoEma`, :func:`no_mixup`,
a clipper that returns at once), so the loop in :mod:`.loop` has no branches for it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FinetuneError
from ..models.params import param_groups
from ..recipe import Recipe
from .device import PRECISION_PROBE_BATCH, autocast_dtype, measure_cpu_precision, precision_fallback
from .distributed import Processes


class TrainingWarning(UserWarning):
    """A recipe setting that does less than it says (a precision the device cannot use, an EMA
    warm-up longer than the run). ``finetune run`` prints it as one line."""


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


def warmup_steps(recipe: Recipe, steps_per_epoch: int) -> int:
    """Optimizer steps of the linear warm-up: ``schedule.warmup_epochs`` through steps_per_epoch."""
    return round(recipe.schedule.warmup_epochs * steps_per_epoch)


def build_scheduler(
    recipe: Recipe, optimizer: torch.optim.Optimizer, steps_per_epoch: int, total_steps: int | None = None
):
    """A timm scheduler stepped per optimizer update (``t_in_epochs=False``) over ``total_steps``
    updates (default ``train.epochs * steps_per_epoch``; a budgeted run's plan gives its own): the
    warm-up, then the cosine reaches ``schedule.min_lr`` at the last one."""
    from timm.scheduler import CosineLRScheduler, StepLRScheduler

    s = recipe.schedule
    total = max(1, recipe.train.epochs * steps_per_epoch if total_steps is None else total_steps)
    warmup = warmup_steps(recipe, steps_per_epoch)
    common = dict(warmup_t=warmup, warmup_lr_init=s.warmup_lr, t_in_epochs=False)
    if s.name == "cosine":
        # The cosine starts after the warmup (warmup_prefix), so the peak lr is reached.
        return CosineLRScheduler(
            optimizer, t_initial=max(1, total - warmup), lr_min=s.min_lr, warmup_prefix=True, **common
        )
    if s.name == "step":
        return StepLRScheduler(optimizer, decay_t=s.step_epochs * steps_per_epoch, decay_rate=s.step_gamma, **common)
    return StepLRScheduler(optimizer, decay_t=total + 1, decay_rate=1.0, **common)  # constant


def base_lr(optimizer: torch.optim.Optimizer) -> float:
    """The unscaled lr: with layer decay, groups carry lr * lr_scale and the head's scale is 1."""
    return max(group["lr"] / group.get("lr_scale", 1.0) for group in optimizer.param_groups)


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


def build_ema(recipe: Recipe, model: nn.Module, total_steps: int, *, note: bool = True) -> Any:
    """timm's ModelEmaV3 of ``model`` when ``train.ema`` is on, :class:`NoEma` otherwise.

    With ``note``, warns (:class:`TrainingWarning`, at the caller of :func:`.setup.build`) what the
    opt-in warm-up does to a run of ``total_steps`` optimizer steps.
    """
    r = recipe
    if not r.train.ema:
        return NoEma(model)
    from timm.utils import ModelEmaV3

    # ema_decay from the second step on: timm's first update (step 1) copies the weights, so the
    # average never leans on the starting weights. The warm-up is opt-in: its ramp reaches 0.9998
    # only after 354,000 steps, so on by default it would make ema_decay mean almost nothing.
    ema = ModelEmaV3(model, decay=r.train.ema_decay, use_warmup=r.train.ema_warmup)
    if r.train.ema_warmup and note:
        warnings.warn(ema_warmup_note(r.train.ema_decay, total_steps), TrainingWarning, stacklevel=3)
    return ema


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


def no_mixup(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch as it is: what the loop calls instead of Mixup/CutMix when both are off."""
    return x, y


def build_mixup(
    recipe: Recipe, num_classes: int
) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """timm's Mixup/CutMix (which also smooths the labels) when either alpha is set, else :func:`no_mixup`."""
    r = recipe
    if not (r.train.mixup_alpha or r.train.cutmix_alpha):
        return no_mixup
    from timm.data import Mixup

    return Mixup(
        mixup_alpha=r.train.mixup_alpha, cutmix_alpha=r.train.cutmix_alpha,
        label_smoothing=r.train.label_smoothing, num_classes=num_classes,
    )


def build_loss(recipe: Recipe) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Cross-entropy in fp32, chosen once: soft targets with Mixup/CutMix (which already applied the
    label smoothing), label-smoothed hard targets otherwise."""
    if recipe.train.mixup_alpha or recipe.train.cutmix_alpha:
        from timm.loss import SoftTargetCrossEntropy

        soft = SoftTargetCrossEntropy()
        return lambda logits, target: soft(logits.float(), target)
    smoothing = recipe.train.label_smoothing
    return lambda logits, target: F.cross_entropy(logits.float(), target, label_smoothing=smoothing)


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


def choose_precision(
    r: Recipe, model: nn.Module, device: torch.device, size: tuple[int, int], processes: Processes, chosen: str | None
) -> tuple[torch.dtype | None, dict[str, Any] | None]:
    """The autocast dtype to train in, and the measurement behind it when there was one.

    ``chosen`` (a resumed run's) wins. ``auto`` on a CPU is measured (:func:`measure_cpu_precision`,
    a few seconds at most) on this process's batch (at most :data:`PRECISION_PROBE_BATCH` images),
    on the main process only, and shared, so every process computes alike. ``fp32`` or ``bf16``
    asked for explicitly measures nothing.
    """
    if chosen is not None:
        return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[chosen], None
    if r.train.precision == "auto" and device.type == "cpu":
        batch = max(1, r.data.batch_size // processes.world_size)
        choice = measure_cpu_precision(model, min(batch, PRECISION_PROBE_BATCH), size) if processes.is_main else None
        choice = processes.broadcast_object(choice)
        return (torch.bfloat16 if choice["chosen"] == "bf16" else None), choice
    fallback = precision_fallback(r.train.precision, device)
    if fallback is not None:
        warnings.warn(fallback, TrainingWarning, stacklevel=3)
    return autocast_dtype(r.train.precision, device), None
