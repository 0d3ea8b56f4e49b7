"""Training throughput of the course lab's from-scratch ViT on a CPU: the lab's loop, a timm-style loop
and finetune, timed in one process, on the same data, in one run.

Run from the repository root (the harness imports ``finetune`` from the checkout)::

    PYTHONPATH=. python benchmarks/cpu_lab.py --data data/cifar10-jpeg   # the real CIFAR-10 JPEG copy
    PYTHONPATH=. python benchmarks/cpu_lab.py                            # synthetic JPEGs in a temp folder
    PYTHONPATH=. python benchmarks/cpu_lab.py --tiny                     # seconds-long smoke run

Paths (see ``benchmarks/README.md``, "CPU: the course lab's ViT"):

* ``lab``: the lab notebook's loop, in our own words: a hand-written ViT (width 64, depth 12, 8 heads,
  4-px patches, 32 px), torchvision ``ToTensor`` + ``Normalize(0.5)`` per image over the JPEG files,
  ``DataLoader(batch_size=32, shuffle=True, num_workers=2)``, Adam lr 1e-3, cross-entropy, fp32.
* ``timm``: a ``timm/train.py``-style loop on finetune's ``vit_lab`` preset: ``create_optimizer_v2``,
  a timm scheduler stepped per update, the same per-image transforms and DataLoader; at batch 32 and
  at the best batch of a short sweep.
* ``finetune``: ``finetune.runs.run.run`` on ``recipes/vit_lab_cifar.yaml``: at the lab's settings
  (batch 32) and at the best settings of a short sweep (batch, fused or for-loop optimizer step,
  bf16, ``torch.compile``).

Also measured in the same process: the machine's fp32 (and bf16) matmul peak, a model-only step
(no data loading) per batch size in fp32 and under bf16 autocast, the optimizer implementations
alone, and a profile of one model step. images/s = batch / the median step time after warm-up
(finetune: the median of its ``metrics.jsonl`` intervals, the warm-up intervals dropped).
Results go to ``<out>/cpu-lab-<date>.json`` and ``.md``; a run never overwrites another.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import json
import math
import os
import shlex
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import torch
import torch.nn.functional as F
import torchvision
import typer
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench.py beside this file: shared helpers
from bench import (  # noqa: E402
    CIFAR10_TRAIN_IMAGES,
    cpu_count,
    device_name,
    endless,
    flops_per_image,
    step_time_stats,
    synthetic_images,
    versions,
    write_imagefolder,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
LAB_RECIPE = REPO_ROOT / "recipes" / "vit_lab_cifar.yaml"
LAB_BATCH = 32  # the lab's batch size
LAB_WORKERS = 2  # the lab's DataLoader workers
LAB_MEAN = LAB_STD = (0.5, 0.5, 0.5)  # the lab's normalisation (also vit_lab's pretrained_cfg)


# --------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class Settings:
    """What the run was asked to do; recorded verbatim in the results.

    Attributes:
        seconds: timed seconds per headline path (lab, timm, finetune rows).
        sweep_seconds: timed seconds per sweep point (batch sizes, optimizer, compile).
        batches: batch sizes the sweeps try.
        compile: try ``train.compile=true`` in the finetune sweep (a cold compile takes a minute or more).
        tiny: batch 8, a few steps, small data, no compile: a smoke run whose figures mean nothing.
        data: ImageFolder copy of CIFAR-10 (``train/<class>/*.jpg``); ``None``: synthetic JPEGs.
        out: results folder.
    """

    seconds: float
    sweep_seconds: float
    batches: tuple[int, ...]
    compile: bool
    tiny: bool
    data: Path | None
    out: Path

    @property
    def lab_batch(self) -> int:
        return 8 if self.tiny else LAB_BATCH

    @property
    def workers(self) -> int:
        return 1 if self.tiny else LAB_WORKERS

    def warmup_steps(self, batch: int) -> int:
        """Untimed steps before a hand-timed loop (DataLoader start, allocator warm-up): about 256 images."""
        return 1 if self.tiny else max(2, min(8, 256 // batch))

    def min_steps(self, batch: int) -> int:
        """Timed steps at least, however long they take: 10 at the lab's batch, 3 at batch 512."""
        return 3 if self.tiny else max(3, min(10, 1536 // batch))


# --------------------------------------------------------------------------------------------
# The lab's model, written from the lab's description (background.md), not copied


class LabAttention(nn.Module):
    """Multi-head self-attention as the lab writes it: one qkv projection, explicit ``q @ k^T``.

    The lab divides by sqrt(d) after the softmax; here the scores are scaled before it (correct
    attention). The matrix products, and so the cost, are the same.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # (B, H, N, d/H)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)  # (B, H, N, N)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))


class LabBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), LabAttention(dim, heads)
        hidden = int(dim * mlp_ratio)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class LabViT(nn.Module):
    """The lab's ViT: conv patch embedding, cls token, learned positions, pre-norm blocks, and a
    LayerNorm + Linear head on the mean of the patch tokens. Width 64, depth 12: 0.6M parameters."""

    def __init__(
        self, *, img_size: int = 32, patch: int = 4, dim: int = 64, depth: int = 12, heads: int = 8,
        mlp_ratio: float = 4.0, num_classes: int = 10,
    ) -> None:
        super().__init__()
        assert img_size % patch == 0, f"img_size {img_size} must be a multiple of patch {patch}"
        tokens = (img_size // patch) ** 2
        self.patch_embed = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + tokens, dim) * 0.02)
        self.blocks = nn.Sequential(*(LabBlock(dim, heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, H*W, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed  # (B, 1 + H*W, D)
        x = self.blocks(x)
        return self.head(self.norm(x[:, 1:].mean(dim=1)))  # mean of the patch tokens; slot 0 is cls


# --------------------------------------------------------------------------------------------
# Measuring


def matmul_peak(n: int, dtype: torch.dtype, repeats: int = 5) -> dict[str, Any]:
    """GFLOP/s of an ``n x n @ n x n`` matmul: best and median of ``repeats`` after one warm-up."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(dtype)
    b = torch.randn(n, n, generator=gen).to(dtype)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    flops = 2 * n**3
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "repeats": repeats,
            "best_gflops": flops / min(times) / 1e9, "median_gflops": flops / statistics.median(times) / 1e9}


def timed_loop(
    loader: Iterable[Any], step: Callable[[Any], None], s: Settings, seconds: float, batch: int
) -> list[float]:
    """Per-step wall times, from asking the loader for a batch to the end of ``step`` (the optimizer
    step), so data loading counts; ``warmup_steps`` untimed first, then until ``seconds`` have passed."""
    batches = endless(loader)
    times: list[float] = []
    try:
        for _ in range(s.warmup_steps(batch)):
            step(next(batches))
        begin = time.perf_counter()
        while len(times) < s.min_steps(batch) or time.perf_counter() - begin < seconds:
            start = time.perf_counter()
            step(next(batches))
            times.append(time.perf_counter() - start)
    finally:
        batches.close()  # shuts the DataLoader's workers down
    return times


def model_step_ips(model: nn.Module, batch: int, *, bf16: bool, seconds: float, s: Settings) -> dict[str, Any]:
    """A model-only training step (forward, cross-entropy, backward, Adam) on one resident batch: the
    ceiling any loop can reach with this model and optimizer, data loading excluded."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=True)
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def step(_: Any) -> None:
        with amp:
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = timed_loop([None], step, s, seconds, batch)
    return step_time_stats(times, batch)


def optimizer_step_ms(model: nn.Module, s: Settings) -> dict[str, float]:
    """Milliseconds of one Adam step alone, per implementation (gradients set, nothing else)."""
    found = {}
    for label, kwargs in (("for-loop (torch's CPU default)", {"foreach": False}), ("foreach", {"foreach": True}),
                          ("fused", {"fused": True})):
        params = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer = torch.optim.Adam(params, lr=1e-3, **kwargs)
        times = []
        for i in range(3 + (5 if s.tiny else 30)):
            start = time.perf_counter()
            optimizer.step()
            if i >= 3:
                times.append(time.perf_counter() - start)
        found[label] = 1e3 * statistics.median(times)
    return found


def profile_step(model: nn.Module, batch: int, top: int = 10) -> list[dict[str, Any]]:
    """The ops that take the most self CPU time in three fp32 training steps of ``model``."""
    from torch.profiler import ProfilerActivity, profile

    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=True)

    def step() -> None:
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return [{"op": e.key, "self_ms_per_step": e.self_cpu_time_total / 3e3, "share": e.self_cpu_time_total / total,
             "calls_per_step": e.count / 3} for e in events[:top]]


# --------------------------------------------------------------------------------------------
# The paths


@dataclass
class Context:
    settings: Settings
    workdir: Path
    train_root: Path  # the ImageFolder's train/ folder
    data_root: Path  # its parent (finetune's data.root)
    synthetic: bool
    train_images: int
    peak_gflops: float
    flops_lab: float  # per training image (forward + loss + backward)
    flops_timm: float


def finish(ctx: Context, row: dict[str, Any], flops: float, timing: dict[str, Any]) -> dict[str, Any]:
    """Add throughput, epoch time, achieved GFLOP/s and the share of the matmul peak to a row."""
    row.update(timing)
    ips = row["images_per_s"]
    row["epoch_s"] = CIFAR10_TRAIN_IMAGES / ips
    row["flops_per_image"] = flops
    row["gflops"] = ips * flops / 1e9
    row["share_of_peak"] = row["gflops"] / ctx.peak_gflops
    return row


def image_folder(ctx: Context, mean: tuple[float, ...], std: tuple[float, ...]) -> torchvision.datasets.ImageFolder:
    """The training JPEGs, each opened, decoded and normalised per image as the lab does."""
    import torchvision.transforms as T

    transform = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
    return torchvision.datasets.ImageFolder(str(ctx.train_root), transform=transform)


def bench_lab(ctx: Context, name: str = "lab", seconds: float | None = None) -> dict[str, Any]:
    """The lab notebook's loop. Its fp16 autocast + GradScaler apply only on a GPU (``torch.autocast``
    for CUDA does nothing to CPU tensors), so on the CPU it trains in fp32."""
    s = ctx.settings
    batch = s.lab_batch
    dataset = image_folder(ctx, LAB_MEAN, LAB_STD)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=s.workers)
    torch.manual_seed(0)
    model = LabViT()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    criterion = nn.CrossEntropyLoss()
    model.train()

    def step(batch_xy: tuple[torch.Tensor, torch.Tensor]) -> None:
        images, labels = batch_xy
        optimizer.zero_grad()
        loss = criterion(model(images), labels)
        loss.backward()
        optimizer.step()

    times = timed_loop(loader, step, s, s.seconds if seconds is None else seconds, batch)
    row = {
        "name": name, "path": "lab", "model": "LabViT (hand-written)",
        "params": sum(p.numel() for p in model.parameters()), "batch_size": batch, "precision": "fp32",
        "compile": False, "optimizer": "torch.optim.Adam(lr=1e-3), torch's CPU default (for-loop)",
        "settings": {
            "data": "torchvision ImageFolder over the JPEG files; ToTensor, Normalize(0.5, 0.5) per image",
            "loader": f"DataLoader(batch_size={batch}, shuffle=True, num_workers={s.workers})",
            "loss": "nn.CrossEntropyLoss()", "attention": "explicit q @ k^T, softmax, @ v",
            "note": "the lab's fp16 autocast + GradScaler apply only on a GPU; on the CPU it trains in fp32",
        },
    }
    return finish(ctx, row, ctx.flops_lab, step_time_stats(times, batch))


def bench_timm(ctx: Context, batch: int, name: str, seconds: float) -> dict[str, Any]:
    """A ``timm/train.py``-style loop on the ``vit_lab`` preset, data as the lab reads it."""
    import timm
    import timm.data
    import timm.optim
    import timm.scheduler

    import finetune.models.presets  # noqa: F401  (registers vit_lab with timm)

    s = ctx.settings
    torch.manual_seed(0)
    model = timm.create_model("vit_lab", num_classes=10)
    cfg = timm.data.resolve_data_config(model=model)  # mean/std 0.5 from the preset's pretrained_cfg
    dataset = image_folder(ctx, cfg["mean"], cfg["std"])
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=s.workers,
                                         drop_last=True)
    optimizer = timm.optim.create_optimizer_v2(model, opt="adam", lr=1e-3, weight_decay=0.0)
    updates_per_epoch = max(1, len(loader))
    scheduler, _ = timm.scheduler.create_scheduler_v2(
        optimizer, sched="cosine", num_epochs=20, step_on_epochs=False, updates_per_epoch=updates_per_epoch
    )
    criterion = nn.CrossEntropyLoss()
    model.train()
    num_updates = 0

    def step(batch_xy: tuple[torch.Tensor, torch.Tensor]) -> None:
        nonlocal num_updates
        x, y = batch_xy
        loss = criterion(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        num_updates += 1
        scheduler.step_update(num_updates=num_updates)

    times = timed_loop(loader, step, s, seconds, batch)
    row = {
        "name": name, "path": "timm", "model": "vit_lab (timm VisionTransformer)",
        "params": sum(p.numel() for p in model.parameters()), "batch_size": batch, "precision": "fp32",
        "compile": False, "optimizer": "timm create_optimizer_v2('adam', lr=1e-3, wd 0): torch Adam, CPU default",
        "settings": {
            "data": "torchvision ImageFolder over the JPEG files; ToTensor, Normalize(timm data config) per image",
            "loader": f"DataLoader(batch_size={batch}, shuffle=True, num_workers={s.workers}, drop_last=True)",
            "scheduler": "timm create_scheduler_v2('cosine', 20 epochs), step_update per optimizer step",
            "attention": "timm fused_attn: F.scaled_dot_product_attention",
        },
    }
    return finish(ctx, row, ctx.flops_timm, step_time_stats(times, batch))


def bench_finetune(
    ctx: Context, name: str, batch: int, *, seconds: float, est_ips: float, real: bool,
    compile: bool = False, fused: bool | None = None, precision: str | None = None,
) -> dict[str, Any]:
    """``finetune.runs.run.run`` on the lab recipe for about ``seconds`` of timed steps.

    ``precision`` None keeps the recipe's (fp16, which finetune runs in fp32 on a CPU, with a warning).
    ``real``: the ImageFolder (decoded once into memory; the decode cache lives in the temp folder);
    else finetune's synthetic uint8 images, which take the same in-memory path without the 10,000-
    image test set being evaluated at the end.
    """
    from finetune.recipe import load_recipe, recipe_to_dict
    from finetune.runs.run import run, run_dir_for

    s = ctx.settings
    timed_steps = max(s.min_steps(batch), math.ceil(seconds * est_ips / batch))
    log_every = max(1, timed_steps // 12)
    warmup_intervals = 2 if compile else 1  # the first holds step 1 (and compilation); compile may recompile once
    timed_steps = math.ceil(timed_steps / log_every) * log_every
    total = warmup_intervals * log_every + timed_steps
    overrides = [
        f"name={name}", "device=cpu", f"output.dir={ctx.workdir / 'runs'}", "output.plots=false",
        "output.save_model=false", "output.checkpoint_every=0", "train.epochs=1", f"train.log_every={log_every}",
        f"data.batch_size={batch}", f"train.compile={str(compile).lower()}",
    ]
    if fused is not None:
        overrides.append(f"optim.fused={str(fused).lower()}")
    if precision is not None:
        overrides.append(f"train.precision={precision}")
    if real and total * batch <= ctx.train_images:
        overrides += ["data.name=imagefolder", f"data.root={ctx.data_root}", f"data.train_subset={total * batch}"]
    elif real:  # more steps than one pass over the train set: whole epochs (the last partial batch is dropped)
        epochs = math.ceil(total / (ctx.train_images // batch))
        overrides += ["data.name=imagefolder", f"data.root={ctx.data_root}", f"train.epochs={epochs}"]
    else:
        overrides += ["data.name=synthetic", f"data.synthetic_train={total * batch}", f"data.synthetic_test={batch}"]
    recipe = load_recipe(LAB_RECIPE, overrides)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = run(recipe, quiet=True)
    wall = time.perf_counter() - start
    lines = (run_dir_for(recipe) / "metrics.jsonl").read_text().splitlines()
    intervals = [row for row in map(json.loads, lines) if row["kind"] == "step"]
    timed = [row for row in intervals if row["step"] > warmup_intervals * log_every]
    if not timed:
        raise RuntimeError(f"{name}: no interval after the warm-up; raise --seconds")
    times = [batch / row["images_per_s"] for row in timed]
    timing = step_time_stats(times, batch)
    timing["step_time_s"]["n_intervals"] = timing["step_time_s"].pop("n")
    timing["step_time_s"]["steps_per_interval"] = log_every
    # What the run stepped with: summary.json records it (runs from before the fused CPU default, which
    # do not, stepped with torch's loop unless optim.fused was set).
    kernel = summary.get("optimizer_kernel") or ("fused" if recipe.optim.fused else "for-loop")
    row = {
        "name": name, "path": "finetune", "model": "vit_lab (finetune preset)",
        "params": summary["params_total"], "batch_size": batch, "precision": summary["precision"],
        "precision_asked": recipe.train.precision, "compile": recipe.train.compile,
        "optimizer": f"Adam(lr={recipe.optim.lr:g}), "
                     + ("fused" if kernel == "fused" else f"{kernel} (torch's own CPU default)"),
        "wall_s": wall,
        "warnings": sorted({str(w.message) for w in caught}),
        "settings": {
            "data": ("ImageFolder JPEGs decoded once to uint8 in memory" if real else
                     "finetune synthetic uint8 images in memory (same path after decoding)"),
            "loader": f"finetune BatchLoader(batch_size={batch}), in memory, normalise per batch, no workers",
            "overrides": overrides, "engine_steps": summary.get("steps"), "log_every": log_every,
            "recipe": recipe_to_dict(recipe),
        },
    }
    return finish(ctx, row, ctx.flops_timm, timing)


def guarded(name: str, rows: list[dict[str, Any]], fn: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
    """Run one measurement; a failure becomes an error row and the run goes on."""
    print(f"[cpu_lab] {name} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        row = fn()
        row["status"] = "ok"
        row.setdefault("wall_s", time.perf_counter() - start)
        print(f"[cpu_lab] {name}: {row['images_per_s']:,.0f} img/s ({time.perf_counter() - start:.0f} s)",
              file=sys.stderr, flush=True)
    except Exception as exc:  # noqa: BLE001  (recorded; the other paths still run)
        row = {"name": name, "status": "error", "error": f"{type(exc).__name__}: {exc}",
               "traceback": traceback.format_exc()}
        print(f"[cpu_lab] {name} failed: {row['error']}", file=sys.stderr, flush=True)
    finally:
        with contextlib.suppress(Exception):
            torch._dynamo.reset()
        gc.collect()
    rows.append(row)
    return row if row["status"] == "ok" else None


def best(rows: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    ok = [r for r in rows if r is not None]
    return max(ok, key=lambda r: r["images_per_s"]) if ok else None


# --------------------------------------------------------------------------------------------
# The run


def machine() -> dict[str, Any]:
    flags = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line
                break
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16") if f" {f}" in flags]
    return {"cpu": device_name(torch.device("cpu")).removeprefix("CPU "), "cores": cpu_count(),
            "torch_threads": torch.get_num_threads(), "isa": isa}


def command_line(s: Settings) -> str:
    args = ["python", "benchmarks/cpu_lab.py", "--seconds", f"{s.seconds:g}", "--sweep-seconds",
            f"{s.sweep_seconds:g}", "--batches", ",".join(map(str, s.batches)), "--out", str(s.out)]
    args.append("--compile" if s.compile else "--no-compile")
    if s.data is not None:
        args += ["--data", str(s.data)]
    if s.tiny:
        args.append("--tiny")
    return "PYTHONPATH=. " + shlex.join(args)


def results_stem(out: Path, date: str) -> Path:
    """``out/cpu-lab-<date>``, with ``-2``, ``-3``... when that day's files exist: runs never overwrite."""
    stem, n = out / f"cpu-lab-{date}", 2
    while stem.with_suffix(".json").exists() or stem.with_suffix(".md").exists():
        stem, n = out / f"cpu-lab-{date}-{n}", n + 1
    return stem


@contextlib.contextmanager
def environment(**values: str):
    """Set environment variables for the run and put the old values back afterwards."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def prepare_data(s: Settings, workdir: Path) -> tuple[Path, bool, int]:
    """``(root, synthetic, train images)``: ``--data``, else synthetic JPEGs written to ``workdir``."""
    if s.data is not None:
        if not (s.data / "train").is_dir() or not (s.data / "test").is_dir():
            raise typer.BadParameter(f"--data {s.data}: expected an ImageFolder copy with train/ and test/ folders")
        return s.data.resolve(), False, sum(1 for p in (s.data / "train").rglob("*") if p.is_file())
    n = 256 if s.tiny else 5000
    images, labels = synthetic_images(n, seed=0)
    root = workdir / "imagefolder"
    write_imagefolder(root, images, labels)
    test_images, test_labels = synthetic_images(64, seed=1)
    write_imagefolder(root / "_test", test_images, test_labels)
    (root / "_test" / "train").rename(root / "test")  # test/<class>/*.jpg beside train/
    (root / "_test").rmdir()
    return root, True, n


def run_benchmark(s: Settings) -> tuple[dict[str, Any], Path]:
    import timm

    import finetune.models.presets  # noqa: F401
    from finetune.training.device import precision_fallback

    now = datetime.datetime.now().astimezone()
    start_load = os.getloadavg()
    results: dict[str, Any] = {
        "format": "finetune-cpu-lab/1", "date": now.date().isoformat(), "timestamp": now.isoformat(timespec="seconds"),
        "command": command_line(s), "argv": list(sys.argv), "machine": machine(), "versions": versions(),
        "settings": {"seconds": s.seconds, "sweep_seconds": s.sweep_seconds, "batches": list(s.batches),
                     "compile": s.compile, "tiny": s.tiny, "warmup_steps": {b: s.warmup_steps(b) for b in s.batches},
                     "epoch_images": CIFAR10_TRAIN_IMAGES},
        "rows": [],
    }
    rows: list[dict[str, Any]] = results["rows"]
    wall_start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="finetune-cpu-lab-")))
        # Caches the engine and the compiler write go to the temp folder: nothing outside it is touched,
        # and every compile in this run is cold, as a user's first run would be.
        stack.enter_context(environment(FINETUNE_CACHE_DIR=str(workdir / "finetune-cache"),
                                        TORCHINDUCTOR_CACHE_DIR=str(workdir / "inductor-cache")))
        root, synthetic, n_train = prepare_data(s, workdir)
        results["data"] = {"source": "synthetic JPEGs (q95) in a temp folder" if synthetic else str(s.data),
                           "train_images": n_train}

        # 1. The machine's peak, and FLOPs per training image (eager fp32, explicit attention).
        n = 256 if s.tiny else 4096
        peak = matmul_peak(n, torch.float32)
        results["peak"] = {"fp32": peak, "bf16": matmul_peak(n, torch.bfloat16)}
        torch.manual_seed(0)
        timm_model = timm.create_model("vit_lab", num_classes=10)
        ctx = Context(s, workdir, root / "train", root, synthetic, n_train, peak["best_gflops"],
                      flops_per_image(LabViT(), 32), flops_per_image(timm_model, 32))

        # 2. The headline paths at the lab's batch, back to back.
        lab = guarded("lab", rows, lambda: bench_lab(ctx))
        timm32 = guarded(f"timm-b{s.lab_batch}", rows, lambda: bench_timm(ctx, s.lab_batch, f"timm-b{s.lab_batch}", s.seconds))
        est = (timm32 or lab or {"images_per_s": 100.0})["images_per_s"]
        ft32 = guarded(f"finetune-b{s.lab_batch}-lab-settings", rows, lambda: bench_finetune(
            ctx, f"finetune-b{s.lab_batch}-lab-settings", s.lab_batch, seconds=s.seconds, est_ips=est, real=True))

        # 3. Model-only ceiling: fp32 and bf16 autocast per batch, optimizer alone, one profile.
        probes: dict[str, dict[str, Any]] = {}
        for b in s.batches:
            for bf16 in (False, True):
                label = f"b{b}-{'bf16' if bf16 else 'fp32'}"
                with contextlib.suppress(Exception):
                    probes[label] = model_step_ips(timm_model, b, bf16=bf16, seconds=s.sweep_seconds / 3, s=s)
                    probes[label]["gflops"] = probes[label]["images_per_s"] * ctx.flops_timm / 1e9
                    print(f"[cpu_lab] model step {label}: {probes[label]['images_per_s']:,.0f} img/s", file=sys.stderr)
        results["model_step"] = probes
        results["optimizer_step_ms"] = optimizer_step_ms(timm_model, s)

        # 4. Sweeps: timm over batch sizes; finetune over batch, then optimizer and compile at its best batch.
        timm_sweep = [timm32] + [
            guarded(f"timm-sweep-b{b}", rows, lambda b=b: bench_timm(ctx, b, f"timm-sweep-b{b}", s.sweep_seconds))
            for b in s.batches if b != s.lab_batch
        ]
        ft_sweep = []
        for b in s.batches:
            est_b = probes.get(f"b{b}-fp32", {"images_per_s": est})["images_per_s"]
            ft_sweep.append(guarded(f"finetune-sweep-b{b}", rows, lambda b=b, e=est_b: bench_finetune(
                ctx, f"finetune-sweep-b{b}", b, seconds=s.sweep_seconds, est_ips=e, real=False, precision="fp32")))
        top = best(ft_sweep)
        if top is not None:
            b = top["batch_size"]
            # finetune steps fused by default; the per-parameter loop torch uses on a CPU, for comparison.
            ft_sweep.append(guarded(f"finetune-sweep-b{b}-forloop", rows, lambda: bench_finetune(
                ctx, f"finetune-sweep-b{b}-forloop", b, seconds=s.sweep_seconds, est_ips=top["images_per_s"],
                real=False, precision="fp32", fused=False)))
            top = best(ft_sweep)
            fused = top["optimizer"].endswith("fused")
            # bf16 autocast through finetune: the row's precision says what it really ran (finetune
            # versions that fall back to fp32 on a CPU record fp32 and a warning).
            ft_sweep.append(guarded(f"finetune-sweep-b{b}-bf16", rows, lambda: bench_finetune(
                ctx, f"finetune-sweep-b{b}-bf16", b, seconds=s.sweep_seconds, est_ips=top["images_per_s"],
                real=False, precision="bf16", fused=fused)))
            top = best(ft_sweep)
            if s.compile:
                fused, prec = top["optimizer"].endswith("fused"), top["precision"]
                ft_sweep.append(guarded(f"finetune-sweep-b{b}-compile", rows, lambda: bench_finetune(
                    ctx, f"finetune-sweep-b{b}-compile", b, seconds=s.sweep_seconds, est_ips=top["images_per_s"],
                    real=False, precision=prec, fused=fused, compile=True)))
                top = best(ft_sweep)

        # 5. The headline rows at the best settings found, on the real data, then the lab again (drift).
        timm_top = best(timm_sweep)
        timm_best = None
        if timm_top is not None:
            tb = timm_top["batch_size"]
            timm_best = guarded(f"timm-best-b{tb}", rows, lambda: bench_timm(ctx, tb, f"timm-best-b{tb}", s.seconds))
        ft_best = None
        if top is not None:
            fb, fused, comp, prec = top["batch_size"], top["optimizer"].endswith("fused"), top["compile"], top["precision"]
            name = f"finetune-best-b{fb}-{prec}" + ("-fused" if fused else "") + ("-compile" if comp else "")
            ft_best = guarded(name, rows, lambda: bench_finetune(
                ctx, name, fb, seconds=s.seconds, est_ips=top["images_per_s"], real=True, precision=prec,
                fused=fused, compile=comp))
        lab_again = guarded("lab-again", rows, lambda: bench_lab(ctx, "lab-again", s.seconds / 2))

        profile_batch = ft_best["batch_size"] if ft_best else s.lab_batch
        with contextlib.suppress(Exception):
            results["profile"] = {"batch": profile_batch, "top_ops": profile_step(timm_model, profile_batch)}
        results["peak_end"] = {"fp32": matmul_peak(n, torch.float32)}

    def ips(row: dict[str, Any] | None) -> float | None:
        return row["images_per_s"] if row else None

    def ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> float | None:
        return ips(a) / ips(b) if a and b else None

    results["headline"] = {
        "lab": lab and lab["name"], "timm_b32": timm32 and timm32["name"], "timm_best": timm_best and timm_best["name"],
        "finetune_lab_settings": ft32 and ft32["name"], "finetune_best": ft_best and ft_best["name"],
        "lab_again": lab_again and lab_again["name"],
    }
    results["ratios"] = {
        "finetune_best / lab": ratio(ft_best, lab),
        "finetune_best / timm_best": ratio(ft_best, timm_best),
        "finetune_lab_settings / lab": ratio(ft32, lab),
        "finetune_lab_settings / timm_b32": ratio(ft32, timm32),
        "lab_again / lab (drift)": ratio(lab_again, lab),
    }
    results["finetune_cpu_precision"] = {
        "bf16": precision_fallback("bf16", torch.device("cpu")),
        "fp16": precision_fallback("fp16", torch.device("cpu")),
    }
    results["loadavg"] = {"start": list(start_load), "end": list(os.getloadavg())}
    results["wall_s"] = time.perf_counter() - wall_start
    s.out.mkdir(parents=True, exist_ok=True)
    stem = results_stem(s.out, results["date"])
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown_report(results))
    return results, stem


# --------------------------------------------------------------------------------------------
# Report


def _f(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| row | batch | precision | compile | optimizer | images/s | s / CIFAR-10 epoch | GFLOP/s | share of peak "
        "| step p10 / median / p90 (ms) |",
        "|---|---:|---|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['name']} | error: {r['error'].splitlines()[0][:120].replace('|', '/')} | | | | | | | | |")
            continue
        st = r["step_time_s"]
        lines.append(
            f"| {r['name']} | {r['batch_size']} | {r['precision']} | {'yes' if r['compile'] else 'no'} "
            f"| {r['optimizer']} | {r['images_per_s']:,.0f} | {r['epoch_s']:,.0f} | {r['gflops']:.1f} "
            f"| {100 * r['share_of_peak']:.1f}% | {st['p10'] * 1e3:.0f} / {st['median'] * 1e3:.0f} / {st['p90'] * 1e3:.0f} |"
        )
    return "\n".join(lines) + "\n"


def markdown_report(res: dict[str, Any]) -> str:
    m, peak = res["machine"], res["peak"]
    by_name = {r["name"]: r for r in res["rows"]}
    head = [by_name[n] for n in res["headline"].values() if n and n in by_name]
    sweeps = [r for r in res["rows"] if r["name"] not in res["headline"].values()]
    parts = [
        f"# The course lab's ViT on a CPU: lab loop vs timm-style loop vs finetune, {res['date']}\n",
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads; {', '.join(m['isa'])}).  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in res["versions"].items() if v) + ".  ",
        f"Command: `{res['command']}`  ",
        f"Data: {res['data']['source']} ({res['data']['train_images']:,} train images). "
        f"Whole run: {res['wall_s'] / 60:.1f} min; load average {res['loadavg']['start'][0]:.2f} at the start, "
        f"{res['loadavg']['end'][0]:.2f} at the end (other processes share these cores).\n",
        f"Peak: fp32 matmul {peak['fp32']['n']}x{peak['fp32']['n']}: {peak['fp32']['best_gflops']:.0f} GFLOP/s best of "
        f"{peak['fp32']['repeats']} (median {peak['fp32']['median_gflops']:.0f}; at the end of the run "
        f"{res['peak_end']['fp32']['best_gflops']:.0f}); bf16: {peak['bf16']['best_gflops']:.0f} GFLOP/s. "
        "Share of peak = achieved GFLOP/s / the fp32 best. FLOPs per training image (forward + cross-entropy + "
        f"backward, FlopCounterMode): {head[0]['flops_per_image'] / 1e6:.1f} MFLOP.\n" if head else "",
        "## Headline\n\nOrder run: lab, timm at the lab's batch, finetune at the lab's settings, model-step probes, "
        "the timm batch sweep, the finetune sweep (batch; then the for-loop Adam against the fused default, bf16, compile at its best batch), "
        "timm at its best batch, finetune at its best settings, the lab loop again (drift check).\n",
        markdown_table(head),
        "Ratios (images/s): " + "; ".join(f"{k} = {_f(v, '.2f')}" for k, v in res["ratios"].items()) + ".\n",
        "## Sweeps (finetune sweeps on its synthetic in-memory images: the same uint8 path the decoded JPEGs take)\n",
        markdown_table(sweeps),
        "## Model step alone (timm vit_lab, one resident batch, Adam foreach; no data loading)\n",
        "| batch | fp32 images/s | fp32 GFLOP/s | bf16 autocast images/s | bf16 / fp32 |",
        "|---:|---:|---:|---:|---:|",
    ]
    probes = res["model_step"]
    for b in res["settings"]["batches"]:
        f32, b16 = probes.get(f"b{b}-fp32"), probes.get(f"b{b}-bf16")
        if f32 and b16:
            parts.append(f"| {b} | {f32['images_per_s']:,.0f} | {f32['gflops']:.1f} | {b16['images_per_s']:,.0f} "
                         f"| {b16['images_per_s'] / f32['images_per_s']:.2f} |")
    parts.append("\nAdam step alone (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in res["optimizer_step_ms"].items()) + ".\n")
    if "profile" in res:
        parts.append(f"## Where a model step's time goes (fp32, batch {res['profile']['batch']}, self CPU time)\n")
        parts.append("| op | ms / step | share | calls / step |\n|---|---:|---:|---:|")
        for op in res["profile"]["top_ops"]:
            parts.append(f"| `{op['op']}` | {op['self_ms_per_step']:.1f} | {100 * op['share']:.1f}% | {op['calls_per_step']:.0f} |")
    parts.append("\n## Notes\n")
    parts.append("- images/s = batch / median step time after warm-up. lab and timm rows: each step timed from asking "
                 "the DataLoader for a batch to the end of `optimizer.step()` (data loading counts). finetune rows: "
                 "median of the `images_per_s` of its `metrics.jsonl` intervals, the warm-up intervals dropped; "
                 "its one-off JPEG decode (once per run) and final evaluation are outside the figure.")
    for prec, why in res["finetune_cpu_precision"].items():
        parts.append(f"- finetune's train.precision={prec} on a CPU: " + (f"falls back: {why}" if why else "applies as asked"))
    for r in head:
        for w in r.get("warnings", []):
            parts.append(f"- warning in {r['name']}: {w}")
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------------------------
# Command line

app = typer.Typer(add_completion=False, help=__doc__.split("\n\n")[0])


@app.command()
def main(
    data: Annotated[Path | None, typer.Option(help="ImageFolder copy of CIFAR-10 (train/<class>/*.jpg, test/).")] = None,
    out: Annotated[Path, typer.Option(help="Results folder.")] = Path("benchmarks/results"),
    seconds: Annotated[float | None, typer.Option(help="Timed seconds per headline row [default: 40; 0.3 with --tiny].")] = None,
    sweep_seconds: Annotated[float | None, typer.Option(help="Timed seconds per sweep point [default: 10; 0.2 with --tiny].")] = None,
    batches: Annotated[str | None, typer.Option(help="Batch sizes to sweep [default: 32,64,128,256,512; 8 with --tiny].")] = None,
    compile: Annotated[bool, typer.Option(help="Try train.compile=true in the finetune sweep (off with --tiny).")] = True,
    tiny: Annotated[bool, typer.Option(help="Batch 8, a few steps, small synthetic data: a seconds-long smoke run.")] = False,
) -> None:
    """Time the lab loop, a timm-style loop and finetune on vit_lab; write JSON + Markdown results."""
    try:
        sizes = tuple(int(b) for b in (batches or ("8" if tiny else "32,64,128,256,512")).split(",") if b.strip())
    except ValueError:
        raise typer.BadParameter(f"{batches!r}: comma-separated integers, e.g. 32,128,512", param_hint="--batches") from None
    settings = Settings(
        seconds=seconds if seconds is not None else (0.3 if tiny else 40.0),
        sweep_seconds=sweep_seconds if sweep_seconds is not None else (0.2 if tiny else 10.0),
        batches=sizes, compile=compile and not tiny, tiny=tiny, data=data, out=out,
    )
    results, stem = run_benchmark(settings)
    by_name = {r["name"]: r for r in results["rows"]}
    typer.echo(markdown_table([by_name[n] for n in results["headline"].values() if n and n in by_name]))
    typer.echo(f"Results: {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")
    if any(r["status"] != "ok" for r in results["rows"]):
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
