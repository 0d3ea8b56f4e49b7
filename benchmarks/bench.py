"""Training throughput of three ways to fine-tune DeiT-tiny on CIFAR-10, timed in one process.

Run from the repository root (the harness imports ``finetune`` from the checkout)::

    PYTHONPATH=. python benchmarks/bench.py                       # every pipeline, on the GPU
    PYTHONPATH=. python benchmarks/bench.py --pipelines course,timm --steps 200
    PYTHONPATH=. python benchmarks/bench.py --tiny --device cpu   # seconds-long smoke run

Pipelines (see ``benchmarks/README.md``):

* ``course``: the course notebook's loop: a torchvision dataset decoded and upsampled to 224 px
  per image on the CPU, ``DataLoader(num_workers=2)``, batch 128, fp32, SGD.
* ``timm``: timm's own data pipeline (``create_dataset`` / ``create_loader`` with its CUDA
  prefetcher), bf16 autocast, channels-last, batch 256, one worker per core.
* ``finetune``: ``finetune.runs.run.run`` at its best settings: uint8 images resident on the device,
  augmentation and the 32 -> 224 resize on the device, bf16, ``torch.compile``, fused optimizer,
  channels-last.
* ``finetune32``: the same engine fine-tuning at CIFAR's native 32 px with 4-px patches.
* ``scratch``: the same engine training the from-scratch presets ``vit_lab`` and ``vit_cifar_s``.

Every pipeline is timed after warm-up; the figure reported is the median of per-step times (the
engine's: of its per-interval ``images_per_s``), never a mean that includes warm-up. Results go
to ``<out>/<device-slug>-<date>.json`` and ``.md``.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import json
import math
import os
import pickle
import platform
import re
import shlex
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
import typer
from torch import nn

from finetune.training.device import reset_peak_memory, synchronize

CIFAR10_TRAIN_IMAGES = 50_000  # one CIFAR-10 epoch, for the seconds-per-epoch column
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # DeiT's normalisation, as the course notebook uses
IMAGENET_STD = (0.229, 0.224, 0.225)
DEIT = "deit_tiny_patch16_224"
PIPELINES = ("course", "timm", "finetune", "finetune32", "scratch")
SCRATCH_PRESETS = ("vit_lab", "vit_cifar_s")

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendors' data sheets. Matched
# as substrings of torch.cuda.get_device_name in this order, so the specific names come first
# ("H100 PCIe" before "H100", "A100" before "A10").
PEAK_BF16_TFLOPS: tuple[tuple[str, float, str], ...] = (
    ("H100 PCIe", 756.0, "H100 PCIe, dense bf16"),
    ("H100 NVL", 835.0, "H100 NVL, dense bf16"),
    ("H200", 989.0, "H200, dense bf16"),
    ("H100", 989.0, "H100 SXM, dense bf16"),
    ("A100", 312.0, "A100, dense bf16"),
    ("L40S", 362.0, "L40S, dense bf16"),
    ("L40", 181.0, "L40, dense bf16"),
    ("L4", 121.0, "L4, dense bf16"),
    ("A10", 125.0, "A10, dense bf16"),
)


# --------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class BenchSettings:
    """What the whole run was asked to do; recorded verbatim in the results.

    Attributes:
        pipelines: pipeline names, in the order they run.
        steps: timed steps per pipeline, after warm-up.
        warmup: untimed steps first (DataLoader start, cuDNN autotuning, torch.compile).
        batch_scale: multiplies every pipeline's batch size.
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        tiny: shrink models, images and workers so the whole run takes seconds on a CPU.
        data: an ImageFolder copy of CIFAR-10 (``train/<class>/*.jpg``) to read instead of writing
            synthetic data; ``None``: synthetic.
        out: results folder.
    """

    pipelines: tuple[str, ...]
    steps: int
    warmup: int
    batch_scale: float
    device: str
    tiny: bool
    data: Path | None
    out: Path

    @property
    def image_size(self) -> int:
        """Input size of the 224-px pipelines (the course upsamples CIFAR to DeiT's size)."""
        return 32 if self.tiny else 224

    @property
    def scratch_image_size(self) -> int:
        """Input size of the from-scratch presets: CIFAR's 32 px; 16 px (a quarter of the tokens) for ``--tiny``."""
        return 16 if self.tiny else 32

    @property
    def deit_kwargs(self) -> dict[str, Any]:
        """timm constructor arguments that shrink DeiT-tiny for ``--tiny``: one block."""
        return {"depth": 1} if self.tiny else {}

    def batch(self, full_size: int) -> int:
        """A pipeline's batch size: its full-size value (8 with ``--tiny``) times ``batch_scale``."""
        base = 8 if self.tiny else full_size
        return max(2, int(round(base * self.batch_scale)))

    def workers(self, full_size: int) -> int:
        """DataLoader workers: the pipeline's own count, at most one with ``--tiny``."""
        return min(1, full_size) if self.tiny else full_size


def cpu_count() -> int:
    """Cores this process may use (the affinity mask, which containers often narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


# --------------------------------------------------------------------------------------------
# Device facts


def resolve_device(name: str) -> torch.device:
    """``auto``: the first CUDA GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise typer.BadParameter(f"--device {name}: this machine has no CUDA GPU; use auto or cpu")
    if device.type not in ("cuda", "cpu"):
        raise typer.BadParameter(f"--device {name}: only cpu, cuda and cuda:N are benchmarked")
    return device


def device_name(device: torch.device) -> str:
    """The GPU's marketing name, or the CPU's model name from /proc/cpuinfo."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return "CPU " + line.split(":", 1)[1].strip()
    return "CPU " + (platform.processor() or platform.machine() or "unknown")


def slugify(text: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def peak_tflops(name: str, device_type: str = "cuda") -> tuple[float | None, str | None]:
    """Dense bf16 peak of a GPU from ``PEAK_BF16_TFLOPS``; ``(None, None)`` for CPUs and unknown GPUs."""
    if device_type != "cuda":
        return None, None
    for key, tflops, label in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return tflops, label
    return None, None


def peak_memory_mib(device: torch.device) -> float | None:
    """Peak memory allocated by tensors since the last reset; ``None`` off the GPU."""
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


# --------------------------------------------------------------------------------------------
# FLOPs and timing


def flops_per_image(model: nn.Module, image_size: int, *, batch: int = 2) -> float:
    """FLOPs of one training step (forward + cross-entropy + backward) per image.

    Counted by ``torch.utils.flop_counter.FlopCounterMode`` on the model as given; the harness
    passes each eager fp32 model on the CPU before training moves it, so the figure does not
    depend on the device, dtype or compiler. Matmuls, convolutions and attention are counted,
    forward and backward (the input needs no gradient, so the first layer's input gradient is
    not). A multiply-add counts as 2 FLOPs.

    Attention is counted on timm's explicit path (``q @ k.T``, softmax, ``attn @ v``): with
    ``fused_attn`` on, torch dispatches to a kernel chosen by device and version, and
    FlopCounterMode has no formula for some of them (torch 2.14's
    ``_scaled_dot_product_flash_attention_for_cpu``), which silently drops attention from the
    count. Both paths do the same matrix products, so the explicit one counts what the fused
    one runs.

    Args:
        model: takes ``(B, 3, image_size, image_size)`` and returns ``(B, classes)`` logits. Its
            gradients are cleared afterwards; its weights are not changed.
        image_size: square input size in pixels.
        batch: images in the counted step (the count is divided by it).
    """
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.train()
    # A private generator: counting must not move the global RNG that seeds training afterwards.
    x = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(batch, dtype=torch.long)
    fused = [m for m in model.modules() if getattr(m, "fused_attn", False)]
    for module in fused:
        module.fused_attn = False
    try:
        with FlopCounterMode(display=False) as counter:
            F.cross_entropy(model(x), y).backward()
    finally:
        for module in fused:
            module.fused_attn = True
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return counter.get_total_flops() / batch


def step_time_stats(times: list[float], batch: int) -> dict[str, Any]:
    """Median, spread and throughput of per-step wall times (seconds)."""
    ordered = sorted(times)
    n = len(ordered)
    median = statistics.median(ordered)
    return {
        "images_per_s": batch / median,
        "step_time_s": {
            "median": median,
            "p10": ordered[int(0.1 * (n - 1))],
            "p90": ordered[int(math.ceil(0.9 * (n - 1)))],
            "n": n,
        },
        # Throughput over the whole timed window, stalls included; the median ignores rare stalls.
        "window_images_per_s": batch * n / sum(ordered),
    }


def time_steps(
    loader: Iterable[Any], step: Callable[[Any], None], *, warmup: int, steps: int, device: torch.device
) -> list[float]:
    """Wall time of each of ``steps`` training steps after ``warmup`` untimed ones.

    A step's time runs from asking the loader for a batch to the end of the GPU work of the update
    (one synchronize per step), so data stalls count: waiting for CPU workers is the course loop's
    bottleneck. The loader is cycled over as many epochs as it takes, and its workers are shut
    down at the end.
    """
    reset_peak_memory(device)
    batches = endless(loader)
    times = []
    try:
        for i in range(warmup + steps):
            start = time.perf_counter()
            step(next(batches))
            synchronize(device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    finally:
        batches.close()
    return times


def endless(loader: Iterable[Any]) -> Iterator[Any]:
    """Batches of ``loader`` over as many epochs as it takes."""
    while True:
        yield from loader


# --------------------------------------------------------------------------------------------
# Data on disk


@dataclass
class DiskData:
    """CIFAR-shaped training images on disk, in the layouts the pipelines read.

    Attributes:
        imagefolder: folder holding ``train/<class>/*.jpg`` (timm reads it; the engine too with
            ``--data``).
        cifar_pickle: folder holding ``cifar-10-batches-py/`` (torchvision's CIFAR10 reads it), or
            ``None`` for a user's ImageFolder copy, which the course pipeline then reads as an
            ImageFolder.
        train_images: images in the train split.
        synthetic: whether the images were generated here.
    """

    imagefolder: Path
    cifar_pickle: Path | None
    train_images: int
    synthetic: bool

    def describe(self) -> dict[str, Any]:
        return {
            "source": "synthetic" if self.synthetic else str(self.imagefolder),
            "imagefolder": str(self.imagefolder),
            "cifar_pickle": str(self.cifar_pickle) if self.cifar_pickle else None,
            "train_images": self.train_images,
        }


def synthetic_images(num_images: int, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Smooth random 32x32 RGB images and labels: ``uint8 (N, 32, 32, 3)``, ``int64 (N,)``.

    Upsampled 8x8 noise plus fine grain, so JPEG files and decode times resemble photos more
    than pure noise (which compresses badly) or flat colour (which compresses to nothing).
    """
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(num_images, 3, 8, 8, generator=gen) * 255
    images = F.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False)
    images = images + torch.randn(images.shape, generator=gen) * 8
    pixels = images.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    labels = torch.randint(0, len(CIFAR10_CLASSES), (num_images,), generator=gen).numpy()
    return pixels, labels


def write_imagefolder(root: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """``root/train/<class>/<index>.jpg``, the layout of the CIFAR-10 JPEG copy."""
    from PIL import Image

    for name in CIFAR10_CLASSES:
        (root / "train" / name).mkdir(parents=True, exist_ok=True)
    for i, (pixels, label) in enumerate(zip(images, labels)):
        Image.fromarray(pixels).save(root / "train" / CIFAR10_CLASSES[label] / f"{i:05d}.jpg", quality=95)


def write_cifar_pickle(root: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """``root/cifar-10-batches-py/`` as the CIFAR-10 python release lays it out.

    Five ``data_batch_*`` pickles of ``{"data": uint8 (n, 3072) in CHW order, "labels": [...]}``,
    a ``test_batch`` and ``batches.meta``; torchvision's ``CIFAR10`` reads them as it reads the
    real files.
    """
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # (N, 3*32*32), CHW like the release
    parts = np.array_split(np.arange(len(images)), 5)
    for k, part in enumerate(parts, start=1):
        batch = {"batch_label": f"training batch {k} of 5", "data": rows[part], "labels": labels[part].tolist()}
        (folder / f"data_batch_{k}").write_bytes(pickle.dumps(batch))
    test = {"batch_label": "testing batch 1 of 1", "data": rows[:10], "labels": labels[:10].tolist()}
    (folder / "test_batch").write_bytes(pickle.dumps(test))
    meta = {"label_names": list(CIFAR10_CLASSES), "num_cases_per_batch": len(parts[0]), "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))


def prepare_disk_data(settings: BenchSettings, workdir: Path, num_images: int) -> DiskData:
    """Write ``num_images`` synthetic images in both layouts, or point at ``--data``."""
    if settings.data is not None:
        train = settings.data / "train"
        if not train.is_dir():
            raise typer.BadParameter(f"--data {settings.data}: expected an ImageFolder copy with a train/ folder")
        count = sum(1 for p in train.rglob("*") if p.is_file())
        return DiskData(settings.data, None, count, synthetic=False)
    images, labels = synthetic_images(num_images, seed=0)
    write_imagefolder(workdir / "imagefolder", images, labels)
    write_cifar_pickle(workdir / "cifar10", images, labels)
    return DiskData(workdir / "imagefolder", workdir / "cifar10", num_images, synthetic=True)


class SyntheticCIFAR10(torchvision.datasets.CIFAR10):
    """torchvision's CIFAR10 over generated files in the release layout.

    torchvision checks each file against the real release's md5 sum, which generated files cannot
    match; with the sums set to ``None`` it checks only that the files exist. Reading (unpickling,
    ``Image.fromarray`` and the transform per item) is CIFAR10's own.
    """

    train_list = [[name, None] for name, _ in torchvision.datasets.CIFAR10.train_list]
    test_list = [[name, None] for name, _ in torchvision.datasets.CIFAR10.test_list]
    meta = {**torchvision.datasets.CIFAR10.meta, "md5": None}


def course_dataset(data: DiskData, transform: Callable) -> torch.utils.data.Dataset:
    """torchvision's CIFAR10 over the pickles (as the course does), or an ImageFolder for ``--data``."""
    if data.cifar_pickle is None:
        return torchvision.datasets.ImageFolder(str(data.imagefolder / "train"), transform=transform)

    return SyntheticCIFAR10(str(data.cifar_pickle), train=True, download=False, transform=transform)


# --------------------------------------------------------------------------------------------
# Pipelines. Each returns one or more result rows; ``run_pipeline`` adds status and errors.


@dataclass
class Context:
    """What every pipeline gets: the settings, the device and the data on disk."""

    settings: BenchSettings
    device: torch.device
    disk: DiskData
    workdir: Path
    peak: float | None


def finish_row(ctx: Context, row: dict[str, Any], flops: float, timing: dict[str, Any]) -> dict[str, Any]:
    """Add throughput, epoch time, FLOPs and MFU to a result row."""
    ips = timing["images_per_s"]
    row.update(timing)
    row["epoch_s"] = CIFAR10_TRAIN_IMAGES / ips
    row["flops_per_image"] = flops
    row["achieved_tflops"] = ips * flops / 1e12
    row["mfu"] = ips * flops / (ctx.peak * 1e12) if ctx.peak else None
    return row


def bench_course(ctx: Context) -> list[dict[str, Any]]:
    """The course notebook's loop: per-image CPU upsampling, 2 workers, fp32, SGD."""
    import timm
    import torchvision.transforms as T

    s, device = ctx.settings, ctx.device
    batch, workers = s.batch(128), s.workers(2)
    transform = T.Compose([T.Resize(s.image_size), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    dataset = course_dataset(ctx.disk, transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True)
    torch.manual_seed(0)
    model = timm.create_model(DEIT, pretrained=False, num_classes=10, img_size=s.image_size, **s.deit_kwargs)
    flops = flops_per_image(model, s.image_size)
    model = model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    criterion = nn.CrossEntropyLoss()

    def step(batch_xy: tuple[torch.Tensor, torch.Tensor]) -> None:
        x, y = batch_xy
        x, y = x.to(device), y.to(device)
        optimizer.zero_grad()
        loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()

    times = time_steps(loader, step, warmup=s.warmup, steps=s.steps, device=device)
    row = {
        "name": "course",
        "model": DEIT,
        "params": sum(p.numel() for p in model.parameters()),
        "image_size": s.image_size,
        "batch_size": batch,
        "precision": "fp32",
        "compile": False,
        "peak_memory_mib": peak_memory_mib(device),
        "settings": {
            "dataset": "torchvision CIFAR10 (pickle batches)" if ctx.disk.cifar_pickle else "torchvision ImageFolder",
            "transform": f"Resize({s.image_size}), ToTensor(), Normalize(ImageNet) per image on the CPU",
            "augmentation": "none",
            "loader": f"DataLoader(batch_size={batch}, shuffle=True, num_workers={workers}, pin_memory=False)",
            "optimizer": "SGD(lr=1e-3, momentum=0.9), torch defaults (foreach)",
            "memory_format": "contiguous",
            "model_kwargs": s.deit_kwargs,
            "dataset_images": len(dataset),
        },
    }
    return [finish_row(ctx, row, flops, step_time_stats(times, batch))]


def bench_timm(ctx: Context) -> list[dict[str, Any]]:
    """timm's data pipeline and a plain AMP loop, as ``timm/train.py`` runs with default flags."""
    import timm
    import timm.data
    import timm.optim

    s, device = ctx.settings, ctx.device
    cuda = device.type == "cuda"
    batch, workers = s.batch(256), s.workers(cpu_count())
    torch.manual_seed(0)
    model = timm.create_model(DEIT, pretrained=False, num_classes=10, img_size=s.image_size, **s.deit_kwargs)
    flops = flops_per_image(model, s.image_size)
    model = model.to(device).to(memory_format=torch.channels_last)
    cfg = timm.data.resolve_data_config(model=model)
    dataset = timm.data.create_dataset("", root=str(ctx.disk.imagefolder), split="train", is_training=True)
    loader = timm.data.create_loader(
        dataset,
        input_size=(3, s.image_size, s.image_size),
        batch_size=batch,
        is_training=True,  # RandomResizedCrop + hflip + colour jitter 0.4, timm's training defaults
        interpolation=cfg["interpolation"],
        mean=cfg["mean"],
        std=cfg["std"],
        num_workers=workers,
        pin_memory=cuda,
        device=device,
        use_prefetcher=cuda,  # normalises and casts on the GPU; on a CPU the workers do it
    )
    optimizer = timm.optim.create_optimizer_v2(model, opt="sgd", lr=1e-2, momentum=0.9, weight_decay=0.0)
    criterion = nn.CrossEntropyLoss()
    # bf16 autocast on the GPU; on a CPU, bf16 matmuls are slow, so the smoke run stays fp32.
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    def step(batch_xy: tuple[torch.Tensor, torch.Tensor]) -> None:
        x, y = batch_xy
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        y = y.to(device, non_blocking=True)
        with amp:
            loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = time_steps(loader, step, warmup=s.warmup, steps=s.steps, device=device)
    row = {
        "name": "timm",
        "model": DEIT,
        "params": sum(p.numel() for p in model.parameters()),
        "image_size": s.image_size,
        "batch_size": batch,
        "precision": "bf16" if cuda else "fp32",
        "compile": False,
        "peak_memory_mib": peak_memory_mib(device),
        "settings": {
            "dataset": "timm.data.create_dataset('', split='train') over JPEG files",
            "transform": "timm training transforms: RandomResizedCrop(scale 0.08-1), hflip, ColorJitter(0.4)",
            "augmentation": "random resized crop, hflip, colour jitter (per image, CPU workers)",
            "loader": f"timm.data.create_loader(batch_size={batch}, num_workers={workers}, "
            f"use_prefetcher={cuda}, pin_memory={cuda}, persistent_workers=True)",
            "optimizer": "timm create_optimizer_v2('sgd', lr=1e-2, momentum=0.9): torch SGD, nesterov",
            "memory_format": "channels_last",
            "model_kwargs": s.deit_kwargs,
            "dataset_images": len(dataset),
        },
    }
    return [finish_row(ctx, row, flops, step_time_stats(times, batch))]


def engine_steps(settings: BenchSettings) -> tuple[int, int, int]:
    """``(log_every, warmup_steps, total_steps)`` for an engine run.

    The engine reports throughput once per ``log_every`` steps; warm-up and timed steps are
    rounded up to whole intervals so the first intervals (compile time) can be dropped whole and
    about ten remain for the median.
    """
    log_every = max(1, min(10, settings.steps // 10))
    warmup = math.ceil(settings.warmup / log_every) * log_every
    timed = math.ceil(settings.steps / log_every) * log_every
    return log_every, warmup, warmup + timed


def pretend_pretrained(ctx: Context) -> Path:
    """A DeiT-tiny checkpoint folder in finetune's save format, with random weights.

    Throughput does not depend on the weights, and random ones keep the benchmark offline;
    loading from a folder still takes the engine's fine-tuning path (exact load, new head, and for
    ``finetune32`` the patch-kernel and position-embedding resampling).
    """
    from finetune.models.build import create_model
    from finetune.models.saving import save_model

    folder = ctx.workdir / "pretend_deit_tiny"
    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        save_model(create_model(DEIT, num_classes=1000, **ctx.settings.deit_kwargs), folder)
    return folder


def engine_recipe(
    ctx: Context, name: str, model: dict[str, Any], mode: str, optim: dict[str, Any], batch: int
) -> dict[str, Any]:
    """The raw recipe of one engine pipeline: fast settings, one epoch that is exactly long enough."""
    s, device = ctx.settings, ctx.device
    log_every, _, total = engine_steps(s)
    needed = total * batch
    if s.data is None:
        data: dict[str, Any] = {"name": "synthetic", "synthetic_train": needed, "synthetic_test": batch}
        epochs = 1
    else:
        # A real copy: as many epochs as the steps need (the engine drops the last partial batch).
        per_epoch = max(1, ctx.disk.train_images // batch)
        epochs = math.ceil(total / per_epoch)
        data = {"name": "imagefolder", "root": str(s.data), "train_subset": min(needed, ctx.disk.train_images)}
    return {
        "name": name,
        "seed": 0,
        "device": str(device),
        "model": model,
        "train": {
            "mode": mode,
            "epochs": epochs,
            "precision": "bf16",  # the engine falls back to fp32 on a CPU
            "compile": device.type == "cuda",  # compiling on a CPU takes minutes for a smoke run
            "channels_last": True,
            "log_every": log_every,
        },
        "optim": {**optim, "fused": device.type == "cuda"},
        "schedule": {"name": "constant", "warmup_epochs": 0.0},
        "data": {**data, "batch_size": batch, "augment": {"hflip": True, "crop_padding": 4}},
        "output": {"dir": str(ctx.workdir / "runs"), "overwrite": True, "save_model": False, "plots": False},
    }


def bench_engine(ctx: Context, raw: dict[str, Any]) -> dict[str, Any]:
    """Run ``finetune.runs.run.run`` on a recipe; read steady-state throughput from its metrics."""
    from finetune.recipe import recipe_from_dict, recipe_to_dict
    from finetune.runs.run import prepare, run, run_dir_for

    recipe = recipe_from_dict(raw, where=f"bench pipeline {raw['name']}")
    log_every, warmup, _ = engine_steps(ctx.settings)
    prepared = prepare(recipe)  # data and model, built once; FLOPs are counted on the model that trains
    image_size = int(prepared.out_size[0])
    flops = flops_per_image(prepared.model, image_size)
    params = sum(p.numel() for p in prepared.model.parameters())

    summary = run(recipe, quiet=True, prepared=prepared)
    del prepared
    lines = (run_dir_for(recipe) / "metrics.jsonl").read_text().splitlines()
    intervals = [row for row in map(json.loads, lines) if row["kind"] == "step"]
    # Intervals that hold warm-up steps (the first includes torch.compile) are dropped whole.
    timed = [row for row in intervals if row["step"] > warmup]
    if not timed:
        raise RuntimeError(f"the engine logged no interval after step {warmup}; raise --steps")
    batch = recipe.data.batch_size
    # Each interval's mean step time, from its throughput.
    times = [batch / row["images_per_s"] for row in timed]
    timing = step_time_stats(times, batch)
    timing["step_time_s"]["n_intervals"] = timing["step_time_s"].pop("n")
    timing["step_time_s"]["steps_per_interval"] = log_every
    row = {
        "name": raw["name"],
        "model": recipe.model.arch or DEIT,
        "params": params,
        "image_size": image_size,
        "batch_size": batch,
        "precision": summary["precision"],
        "compile": recipe.train.compile,
        "peak_memory_mib": round(summary["peak_memory_mb"], 1) if ctx.device.type == "cuda" else None,
        "settings": {
            "dataset": "ImageFolder decoded once to uint8" if ctx.settings.data else "synthetic uint8 in memory",
            "transform": "uint8 on the device; pad-crop, hflip, normalise and resize per batch on the device",
            "augmentation": "pad 4 + random crop, hflip (whole batches, on the device)",
            "loader": f"finetune BatchLoader(batch_size={batch}, in_memory=True), no workers",
            "optimizer": f"{recipe.optim.name}(lr={recipe.optim.lr}), fused={recipe.optim.fused}",
            "memory_format": "channels_last",
            "engine_steps": summary["steps"],
            "log_every": log_every,
            "recipe": recipe_to_dict(recipe),
        },
    }
    return finish_row(ctx, row, flops, timing)


def bench_finetune(ctx: Context) -> list[dict[str, Any]]:
    """The engine fine-tuning DeiT-tiny at 224 px (32 px with ``--tiny``), data upsampled on the device."""
    s = ctx.settings
    model = {"source": str(pretend_pretrained(ctx)), "num_classes": 10, "img_size": s.image_size}
    optim = {"name": "sgd", "lr": 1e-2, "momentum": 0.9, "weight_decay": 0.0}
    return [bench_engine(ctx, engine_recipe(ctx, "finetune", model, "full", optim, s.batch(256)))]


def bench_finetune32(ctx: Context) -> list[dict[str, Any]]:
    """The engine fine-tuning DeiT-tiny at native 32 px: 4-px patches, bicubic-resized positions."""
    s = ctx.settings
    model = {
        "source": str(pretend_pretrained(ctx)),
        "num_classes": 10,
        "img_size": 32,
        "patch_size": 4,
        "pos_embed_mode": "bicubic",
    }
    optim = {"name": "sgd", "lr": 1e-2, "momentum": 0.9, "weight_decay": 0.0}
    return [bench_engine(ctx, engine_recipe(ctx, "finetune32", model, "full", optim, s.batch(512)))]


def bench_scratch(ctx: Context) -> list[dict[str, Any]]:
    """The engine training the from-scratch presets; one row each, each failing on its own."""
    rows = []
    for preset in SCRATCH_PRESETS:
        name = f"scratch-{preset}"
        raw = engine_recipe(
            ctx,
            name,
            {"arch": preset, "num_classes": 10, "img_size": ctx.settings.scratch_image_size},
            "scratch",
            {"name": "adamw", "lr": 1e-3, "weight_decay": 0.05},  # as the presets' shipped recipes
            ctx.settings.batch(512),
        )
        rows += run_pipeline(ctx, name, lambda raw=raw: [bench_engine(ctx, raw)])
    return rows


BENCHES: dict[str, Callable[[Context], list[dict[str, Any]]]] = {
    "course": bench_course,
    "timm": bench_timm,
    "finetune": bench_finetune,
    "finetune32": bench_finetune32,
    "scratch": bench_scratch,
}


def release_memory(device: torch.device) -> None:
    """Drop compiled graphs and cached blocks so one pipeline's memory does not burden the next."""
    with contextlib.suppress(Exception):
        torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_pipeline(ctx: Context, name: str, bench: Callable[[], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Run one pipeline; a failure becomes a row with its error, so the others still run."""
    print(f"[bench] {name} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        rows = bench()
        for row in rows:
            row.setdefault("status", "ok")
            row.setdefault("error", None)
    except Exception as exc:  # noqa: BLE001  (recorded, and the next pipeline runs)
        error = f"{type(exc).__name__}: {exc}"
        rows = [{"name": name, "status": "error", "error": error, "traceback": traceback.format_exc()}]
        print(f"[bench] {name} failed: {rows[0]['error']}", file=sys.stderr, flush=True)
    finally:
        release_memory(ctx.device)
    wall = time.perf_counter() - start
    for row in rows:
        row.setdefault("wall_s", wall)
    return rows


# --------------------------------------------------------------------------------------------
# Environment


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda": torch.version.cuda,
        "cudnn": str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else None,
    }
    for package in ("timm", "finetune", "pydantic"):
        try:
            found[package] = __import__(package).__version__
        except Exception:  # noqa: BLE001  (a missing package is a fact to record, not a failure)
            found[package] = None
    return found


def _tree_bytes(path: Path) -> int:
    """Bytes of the files under ``path``; symlinks are not followed (hub snapshots link to blobs)."""
    if path.is_symlink() or path.is_file():
        return path.lstat().st_size
    total = 0
    for folder, _, files in os.walk(path):
        total += sum((Path(folder) / f).lstat().st_size for f in files)
    return total


def scan_caches() -> list[dict[str, Any]]:
    """What the Hugging Face and torch caches hold: entries and their sizes, nothing read.

    ``hub`` and ``checkpoints`` folders are listed entry by entry (one ``models--org--name`` per
    hub repository, one file per torch checkpoint); other entries are summed. Credential files
    (``token``, ``stored_tokens``) are skipped, not even listed.
    """
    hf_home = Path(os.environ.get("HF_HOME", "~/.cache/huggingface")).expanduser()
    roots = {"huggingface": hf_home, "torch": Path(os.environ.get("TORCH_HOME", "~/.cache/torch")).expanduser()}
    if os.environ.get("HF_HUB_CACHE"):
        roots["huggingface_hub_cache"] = Path(os.environ["HF_HUB_CACHE"]).expanduser()
    skip = {"token", "stored_tokens"}

    def entries(folder: Path, prefix: str) -> list[dict[str, Any]]:
        found = []
        for child in sorted(folder.iterdir()):
            if child.name in skip:
                continue
            rel = f"{prefix}{child.name}"
            if child.is_dir() and not child.is_symlink() and child.name in ("hub", "checkpoints"):
                found += entries(child, rel + "/")
            else:
                found.append({"path": rel, "bytes": _tree_bytes(child)})
        return found

    report = []
    for label, root in roots.items():
        listed = entries(root, "") if root.is_dir() else []
        total = sum(e["bytes"] for e in listed)
        exists = root.is_dir()
        report.append({"cache": label, "path": str(root), "exists": exists, "total_bytes": total, "entries": listed})
    return report


# --------------------------------------------------------------------------------------------
# Results


def results_stem(out: Path, slug: str, date: str) -> Path:
    """``out/<slug>-<date>``, with ``-2``, ``-3``... when that day's file exists: runs never overwrite."""
    stem = out / f"{slug}-{date}"
    n = 2
    while stem.with_suffix(".json").exists() or stem.with_suffix(".md").exists():
        stem = out / f"{slug}-{date}-{n}"
        n += 1
    return stem


def _fmt(value: float | None, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    header = (
        "| pipeline | model | input px | batch | precision | compile | images/s | s / CIFAR-10 epoch "
        "| GFLOP / image | MFU | peak GPU MiB |\n"
        "|---|---|---:|---:|---|---|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for r in rows:
        if r["status"] != "ok":
            error = r["error"].replace("|", "\\|").splitlines()[0][:160]
            lines.append(f"| {r['name']} | error: {error} |  |  |  |  |  |  |  |  |  |")
            continue
        mfu = None if r["mfu"] is None else 100 * r["mfu"]
        lines.append(
            f"| {r['name']} | {r['model']} | {r['image_size']} | {r['batch_size']} | {r['precision']} "
            f"| {'yes' if r['compile'] else 'no'} | {r['images_per_s']:,.0f} | {r['epoch_s']:,.1f} "
            f"| {r['flops_per_image'] / 1e9:.3f} | {_fmt(mfu, '.1f')}{'%' if mfu is not None else ''} "
            f"| {_fmt(r['peak_memory_mib'], ',.0f')} |"
        )
    return header + "\n".join(lines) + "\n"


def markdown_report(results: dict[str, Any]) -> str:
    dev = results["device"]
    peak = f"{dev['peak_tflops']:g} TFLOP/s ({dev['peak_source']})" if dev["peak_tflops"] else "none (MFU not computed)"
    parts = [
        f"# Training throughput on {dev['name']}, {results['date']}\n",
        f"Command: `{results['command']}`  \n"
        f"Steps: {results['settings']['warmup']} warm-up + {results['settings']['steps']} timed per pipeline; "
        f"images/s = batch / median step time (engine: median of its logged intervals).  \n"
        f"MFU peak: {peak}. Versions: "
        + ", ".join(f"{k} {v}" for k, v in results["versions"].items() if v)
        + "\n",
        markdown_table(results["pipelines"]),
        "## Settings\n",
    ]
    for r in results["pipelines"]:
        if r["status"] != "ok":
            parts.append(f"- **{r['name']}**: failed: `{r['error'].splitlines()[0]}`")
            continue
        st = r["step_time_s"]
        shown = {k: v for k, v in r["settings"].items() if k != "recipe"}
        parts.append(
            f"- **{r['name']}**: step median {st['median'] * 1e3:.1f} ms (p10 {st['p10'] * 1e3:.1f}, "
            f"p90 {st['p90'] * 1e3:.1f}); " + "; ".join(f"{k}: {v}" for k, v in shown.items())
        )
    parts.append("\n## Cached hub weights\n")
    for cache in results["hub_caches"]:
        if not cache["exists"]:
            parts.append(f"- {cache['cache']}: `{cache['path']}` does not exist")
            continue
        listed = ", ".join(f"`{e['path']}` ({e['bytes'] / 2**20:.1f} MiB)" for e in cache["entries"]) or "empty"
        parts.append(f"- {cache['cache']}: `{cache['path']}`: {listed}")
    return "\n".join(parts) + "\n"


def command_line(settings: BenchSettings) -> str:
    """The command that repeats this run, every option spelled out."""
    args = ["python", "benchmarks/bench.py", "--pipelines", ",".join(settings.pipelines)]
    args += ["--steps", str(settings.steps), "--warmup", str(settings.warmup)]
    args += ["--batch-scale", f"{settings.batch_scale:g}", "--device", settings.device, "--out", str(settings.out)]
    if settings.data is not None:
        args += ["--data", str(settings.data)]
    if settings.tiny:
        args.append("--tiny")
    return "PYTHONPATH=. " + shlex.join(args)


def run_benchmark(settings: BenchSettings) -> tuple[dict[str, Any], Path]:
    """Run the pipelines, write ``<stem>.json`` and ``<stem>.md``; return the results and the stem."""
    device = torch.device(settings.device)
    name = device_name(device)
    peak, peak_source = peak_tflops(name, device.type)
    now = datetime.datetime.now().astimezone()
    results: dict[str, Any] = {
        "format": "finetune-bench/1",
        "date": now.date().isoformat(),
        "timestamp": now.isoformat(timespec="seconds"),
        "command": command_line(settings),
        "argv": list(sys.argv),
        "device": {
            "type": device.type,
            "name": name,
            "slug": slugify(name),
            "peak_tflops": peak,
            "peak_source": peak_source,
            "cpu_cores": cpu_count(),
        },
        "versions": versions(),
        "settings": {
            "pipelines": list(settings.pipelines),
            "steps": settings.steps,
            "warmup": settings.warmup,
            "batch_scale": settings.batch_scale,
            "tiny": settings.tiny,
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "epoch_images": CIFAR10_TRAIN_IMAGES,
        },
        "hub_caches": scan_caches(),
        "pipelines": [],
    }
    with tempfile.TemporaryDirectory(prefix="finetune-bench-") as tmp:
        workdir = Path(tmp)
        disk_needed = (settings.warmup + settings.steps) * max(settings.batch(128), settings.batch(256))
        needs_disk = any(p in ("course", "timm") for p in settings.pipelines) or settings.data is not None
        if needs_disk:
            start = time.perf_counter()
            disk = prepare_disk_data(settings, workdir, disk_needed)
            print(f"[bench] data: {disk.train_images} images ({time.perf_counter() - start:.1f} s)", file=sys.stderr)
        else:
            disk = DiskData(workdir, None, 0, synthetic=True)
        results["data"] = disk.describe() if needs_disk else {"source": "synthetic (engine, in memory)"}
        ctx = Context(settings, device, disk, workdir, peak)
        for pipeline in settings.pipelines:
            results["pipelines"] += run_pipeline(ctx, pipeline, lambda p=pipeline: BENCHES[p](ctx))

    settings.out.mkdir(parents=True, exist_ok=True)
    stem = results_stem(settings.out, results["device"]["slug"], results["date"])
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown_report(results))
    return results, stem


# --------------------------------------------------------------------------------------------
# Command line

app = typer.Typer(add_completion=False, help=__doc__.split("\n\n")[0])


@app.command()
def main(
    pipelines: Annotated[str, typer.Option(help=f"Comma-separated: {', '.join(PIPELINES)}.")] = ",".join(PIPELINES),
    steps: Annotated[
        int | None, typer.Option(min=1, help="Timed steps per pipeline [default: 100, or 4 with --tiny].")
    ] = None,
    warmup: Annotated[int | None, typer.Option(min=0, help="Untimed steps first [default: 20; 1 with --tiny].")] = None,
    batch_scale: Annotated[float, typer.Option(min=0.01, help="Multiply every pipeline's batch size.")] = 1.0,
    device: Annotated[str, typer.Option(help="auto (CUDA when present), cuda, cuda:N or cpu.")] = "auto",
    out: Annotated[Path, typer.Option(help="Results folder.")] = Path("benchmarks/results"),
    data: Annotated[
        Path | None, typer.Option(help="ImageFolder copy of CIFAR-10 (train/<class>/*.jpg) instead of synthetic data.")
    ] = None,
    tiny: Annotated[bool, typer.Option(help="Tiny models, 32 px, batch 8, a few steps: a CPU smoke run.")] = False,
) -> None:
    """Time each pipeline, write JSON + Markdown results and print the table."""
    names = tuple(p.strip() for p in pipelines.split(",") if p.strip())
    unknown = [p for p in names if p not in PIPELINES]
    if unknown or not names:
        raise typer.BadParameter(
            f"unknown pipeline(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(PIPELINES)}",
            param_hint="--pipelines",
        )
    settings = BenchSettings(
        pipelines=names,
        steps=steps if steps is not None else (4 if tiny else 100),
        warmup=warmup if warmup is not None else (1 if tiny else 20),
        batch_scale=batch_scale,
        device=str(resolve_device(device)),
        tiny=tiny,
        data=data,
        out=out,
    )
    results, stem = run_benchmark(settings)
    typer.echo(markdown_table(results["pipelines"]))
    typer.echo(f"Results: {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")
    if all(r["status"] != "ok" for r in results["pipelines"]):
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
