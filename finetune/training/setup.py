"""From a recipe to a :class:`TrainState`: :func:`prepare` loads the data and builds the model,
checking first that the run's largest tensors can fit in memory (:func:`check_memory`), and
:func:`build` puts the model on the device and makes everything the loop needs, chosen once.

Nothing here writes a file: a recipe that cannot run is refused before any run folder exists.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data.load import load_splits
from ..data.loader import BatchLoader
from ..data.preprocess import Preprocess
from ..data.splits import DatasetSplits, ImageTensors, shard
from ..errors import DataError, FinetuneError
from ..models.build import create_model, load_model
from ..models.params import add_lora, set_trainable
from ..models.shape import ModelShape, model_shape, planned_shape
from ..models.sources import ResolvedSource, resolve_source
from ..recipe import Recipe
from .budget import BudgetPlan, check_recorded_plan, plan_budget, probe_step_time
from .components import (
    NoEma,
    build_clipper,
    build_ema,
    build_loss,
    build_mixup,
    build_optimizer,
    build_scheduler,
    choose_precision,
    warmup_steps,
)
from .device import autocast_dtype, available_memory, cpu_threads, format_bytes, resolve_device
from .distributed import SINGLE, Processes, check_batch_split, model_rng_seed
from .state import Meters, TrainState


@dataclass
class Prepared:
    """The data and the model a run trains, built and checked before any run folder is touched."""

    recipe: Recipe
    device: torch.device
    data: DatasetSplits
    model: nn.Module
    preprocess: Preprocess  # how images become the model's input: the loaders', predict's and show's

    @property
    def mean(self) -> tuple[float, ...]:
        return self.preprocess.mean

    @property
    def std(self) -> tuple[float, ...]:
        return self.preprocess.std

    @property
    def out_size(self) -> tuple[int, int]:
        return self.preprocess.size


def prepare(
    recipe: Recipe, *, model: nn.Module | None = None, processes: Processes = SINGLE, data_path: str | None = None
) -> Prepared:
    """Load the data and build the model a recipe asks for (or take ``model``, e.g. to resume).

    With several processes each loads the same data and builds the same model from the same
    seed, on its own GPU (``cuda:LOCAL_RANK``). ``data_path`` (``"in_memory"`` or ``"streamed"``,
    :attr:`~finetune.data.splits.DatasetSplits.path`): the path a resumed run took, which
    ``data.in_memory: auto`` keeps instead of choosing again from today's free memory.

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
    data = load_splits(_data_config(recipe, data_path), seed=recipe.seed)
    require_two_classes(data, recipe.data)
    num_classes = recipe.model.num_classes or len(data.classes)
    if num_classes != len(data.classes):
        raise FinetuneError(
            f"model.num_classes is {num_classes} but the dataset has {len(data.classes)} classes.",
            "Remove model.num_classes to use the dataset's count (or pick classes with data.classes).",
        )
    if model is None:
        model = build_model(recipe, num_classes, source=source)
    return Prepared(recipe, device, data, model, Preprocess.from_recipe(recipe, model))


def require_two_classes(data: DatasetSplits, cfg) -> None:
    """Refuse to train a classifier that has fewer than two classes to tell apart: every prediction
    would be right, and a run would report 100% accuracy whatever it learned.

    Raises:
        DataError: the data set (after ``data.classes``) has one class, or its training images do
            (after ``data.train_subset`` and ``data.val_split``).
    """
    classes = data.classes
    meaningless = ("so there is nothing to classify: every prediction would be right, and the run would report "
                   "100% accuracy whatever it learned.")
    if len(classes) < 2:
        if getattr(cfg, "classes", None):
            where = f"data.classes keeps one class ({', '.join(classes)})"
        elif cfg.name == "imagefolder":
            where = f"{Path(cfg.root).expanduser() / 'train'} holds one class folder ({', '.join(classes)})"
        else:
            where = f"The data set has one class ({', '.join(classes)})"
        raise DataError(
            f"{where}, {meaningless}",
            "Train on at least two classes: one folder per class under train/ for an image folder, and at least "
            "two names in data.classes if you set it.",
        )
    present = torch.unique(data.train.labels)
    if present.numel() == 0:
        raise DataError("No training image is left after data.train_subset and data.val_split.",
                        "Train on more images (a larger data.train_subset, a smaller data.val_split).")
    if present.numel() < 2:
        raise DataError(
            f"Every training image left after data.train_subset and data.val_split belongs to one class "
            f"({classes[int(present[0])]}), {meaningless}",
            "Train on more images (a larger data.train_subset), or check the labels of the data set.",
        )


def _data_config(recipe: Recipe, data_path: str | None):
    """The recipe's ``data`` section, with ``in_memory: auto`` settled to ``data_path`` when given."""
    if data_path is None or recipe.data.in_memory != "auto":
        return recipe.data
    assert data_path in ("in_memory", "streamed"), f"unknown data path {data_path!r}"
    return recipe.data.model_copy(update={"in_memory": data_path == "in_memory"})


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global random generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def scratch_args(recipe: Recipe) -> dict[str, Any]:
    """``model.args`` of a from-scratch model (the recipe checked them against the bounds a saved
    model's config.json is held to: they are saved with it); empty for a pretrained source."""
    return dict(recipe.model.args) if recipe.train.mode == "scratch" else {}


def resolve_model_source(recipe: Recipe) -> ResolvedSource | None:
    """The weights and self-description of ``model.source`` (read once), or ``None`` from scratch."""
    if recipe.train.mode == "scratch":
        return None
    return resolve_source(recipe.model.source, arch=recipe.model.arch)


def planned_model_shape(recipe: Recipe, source: ResolvedSource | None) -> ModelShape | None:
    """The shape of the model :func:`build_model` will make, from a meta-device build (nothing allocated)."""
    m = recipe.model
    arch = m.arch if source is None else source.arch
    return planned_shape(arch, resolved=source, img_size=m.img_size, patch_size=m.patch_size,
                         **scratch_args(recipe), **model_kwargs(recipe))


def build_model(recipe: Recipe, num_classes: int, *, source: ResolvedSource | None = None) -> nn.Module:
    """The model a recipe asks for: a pretrained source adapted on load (``source``, when it has
    been read already), or a from-scratch preset."""
    m = recipe.model
    extra = model_kwargs(recipe)
    if recipe.train.mode == "scratch":
        return create_model(m.arch, num_classes=m.num_classes or num_classes, img_size=m.img_size,
                            patch_size=m.patch_size, **scratch_args(recipe), **extra)
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


def build(
    prepared: Prepared, processes: Processes = SINGLE, *, precision: str | None = None,
    budget: BudgetPlan | None = None,
) -> TrainState:
    """Everything the loop needs, chosen once: model on the device, loaders, optimizer, schedule,
    GradScaler, loss, mixup, EMA and gradient clipping; with several processes, the model wrapped
    in DistributedDataParallel and each evaluation split cut into one part per process.

    ``precision`` (``fp32``, ``bf16``, ``fp16``) is the one a resumed run had chosen, so that
    ``train.precision=auto`` is not measured again (and maybe decided otherwise) on resume. With
    ``train.time_budget``, ``budget`` is the plan a resumed run recorded; without one the run's
    training step is timed here and the plan made (:func:`plan_time_budget`).

    Raises:
        FinetuneError: the time budget is too short for the run (nothing is written).
        CheckpointError: ``budget`` was planned for another number of steps per epoch.
    """
    p = prepared
    r, device = p.recipe, p.device
    threads = _set_cpu_threads(r, device, processes)
    model = _adapt_model(r, p.model.to(device))
    counts = set_trainable(model, r.train.mode, last_k=r.train.last_k, bitfit_norms=r.train.bitfit_norms)
    # Called here, not deeper: its warning names the line that called build (as build_ema's does).
    amp_dtype, precision_choice = choose_precision(r, model, device, p.out_size, processes, precision)
    num_classes = model.num_classes
    train_loader, val_loader, test_loader = _build_loaders(p, processes, amp_dtype)

    steps_per_epoch = math.ceil(len(train_loader) / r.train.grad_accum)
    optimizer = build_optimizer(r, model, device)
    # One code path for every precision: a disabled scaler passes losses and steps through.
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    state = TrainState(
        recipe=r, device=device, model=model, forward=model,
        optimizer=optimizer, scheduler=None, scaler=scaler, loss_fn=build_loss(r), mixup=build_mixup(r, num_classes),
        ema=NoEma(model), clip_gradients=build_clipper(r, model, scaler, optimizer),
        train_loader=train_loader, val_loader=val_loader, test_loader=test_loader,
        classes=list(p.data.classes), amp_dtype=amp_dtype, precision_choice=precision_choice, cpu_threads=threads,
        steps_per_epoch=steps_per_epoch, counts=counts,
        mean=p.mean, std=p.std, out_size=p.out_size, meters=Meters.on(device), processes=processes,
    )
    if r.train.time_budget is not None:
        state.budget = check_recorded_plan(budget, steps_per_epoch) if budget else plan_time_budget(state)
    # The schedule and the EMA span the run's steps: the recipe's epochs, or the budget's plan.
    state.scheduler = build_scheduler(r, optimizer, steps_per_epoch, state.total_steps)
    state.ema = build_ema(r, model, state.total_steps)
    state.forward, state.no_sync = _wrap_model(model, r, device, processes)
    # Everything random that must be equal on every process is built; from here torch's random state
    # draws dropout and drop-path masks, which must differ between processes.
    torch.manual_seed(model_rng_seed(r.seed, processes.rank))
    return state


def plan_time_budget(state: TrainState, **timing: Any) -> BudgetPlan:
    """Time the run's training step (:func:`.budget.probe_step_time`, on a copy, before the run's
    model is wrapped for DDP) and plan its steps within ``train.time_budget``.

    Every process times steps in lockstep (under DDP each step waits for the slowest process), and
    every one plans from rank 0's measurement, so all of them follow one plan.

    Raises:
        FinetuneError: the budget leaves no step, or less than the warm-up (on every process).
    """
    r = state.recipe
    probe = state.processes.broadcast_object(probe_step_time(state, _wrap_model, **timing))
    return plan_budget(r.train.time_budget, probe, state.steps_per_epoch, warmup_steps(r, state.steps_per_epoch))


def _set_cpu_threads(r: Recipe, device: torch.device, processes: Processes) -> int | None:
    """On a CPU, set torch's thread count for this process and return it; ``None`` on a GPU."""
    if device.type != "cpu":
        return None
    # Physical cores, shared among this machine's processes: hardware threads of one core add
    # nothing to small matrix products and oversubscription slows every process down. One
    # process keeps torch's own count (its physical cores) unless train.cpu_threads says otherwise.
    local = int(os.environ.get("LOCAL_WORLD_SIZE", processes.world_size))
    if r.train.cpu_threads is not None or local > 1:
        torch.set_num_threads(cpu_threads(r.train.cpu_threads, local))
    return torch.get_num_threads()


def _adapt_model(r: Recipe, model: nn.Module) -> nn.Module:
    """The model (already on its device) in the memory format and with the adapters the recipe asks for."""
    if r.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if r.train.mode == "lora":
        lora = r.train.lora
        model = add_lora(model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout, target_modules=lora.target_modules)
    return model


def _build_loaders(
    p: Prepared, processes: Processes, amp_dtype: torch.dtype | None
) -> tuple[BatchLoader, BatchLoader | None, BatchLoader]:
    """The training loader (each process draws its part of every batch) and the evaluation
    loaders (each process scores its own part of the split): ``(train, val or None, test)``."""
    r, device = p.recipe, p.device
    # autocast casts the input anyway: batches in its dtype are half the bytes at 224 px
    preprocess = dataclasses.replace(p.preprocess, dtype=amp_dtype or torch.float32)
    loader_args = dict(device=device, preprocess=preprocess, in_memory=_on_device(r.data.in_memory, p.data, device),
                       seed=r.seed, workers=r.data.workers)
    train_loader = BatchLoader(p.data.train, batch_size=r.data.batch_size, train=True, augment=r.data.augment,
                               rank=processes.rank, world_size=processes.world_size, **loader_args)
    eval_bs = r.data.eval_batch_size or 2 * r.data.batch_size

    def eval_loader(split):
        part = shard(split, processes.rank, processes.world_size)
        return BatchLoader(part, batch_size=eval_bs, train=False, **loader_args)

    test_loader = eval_loader(p.data.test)
    val_loader = eval_loader(p.data.val) if p.data.val is not None else None
    return train_loader, val_loader, test_loader


def _on_device(in_memory: bool | str, data: DatasetSplits, device: torch.device) -> bool:
    """Whether decoded images live on the device (``data.in_memory`` true, or ``auto`` when they
    take at most half its free memory) rather than in host memory, copied over per batch."""
    if in_memory != "auto" or device.type != "cuda":
        return bool(in_memory) or device.type != "cuda"
    splits = [s for s in (data.train, data.val, data.test) if s is not None and isinstance(s, ImageTensors)]
    decoded = sum(s.images.numel() for s in splits)
    return decoded <= torch.cuda.mem_get_info(device)[0] // 2


def _wrap_model(
    model: nn.Module, r: Recipe, device: torch.device, processes: Processes
) -> tuple[Any, Callable[[], contextlib.AbstractContextManager]]:
    """What the loop calls forward through, and how it holds back DDP's gradient all-reduce:
    ``model`` itself and a null context on one process, else DistributedDataParallel and its
    ``no_sync``; compiled when ``train.compile`` is on."""
    forward: Any = model
    no_sync = contextlib.nullcontext
    if processes.distributed:
        from torch.nn.parallel import DistributedDataParallel

        # Built from the same seed everywhere; DDP also broadcasts rank 0's weights to be sure.
        forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        no_sync = forward.no_sync
    if r.train.compile:
        forward = torch.compile(forward)
    return forward, no_sync
