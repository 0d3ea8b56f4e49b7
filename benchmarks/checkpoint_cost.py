"""What a checkpoint costs: seconds to write one, against the time of one CIFAR-10 training epoch.

For each model the engine's ``TrainState`` is built from a recipe on synthetic CIFAR-sized data,
a few training steps are timed (median), and then the run folder's recorder writes the full
checkpoint (finiteness check, state dict, one safetensors file written, flushed and renamed, and
the summary) several times (median). The share is ``checkpoint_s / epoch_s`` with ``epoch_s`` =
steps per 50,000-image epoch x median step time: the cost of the default ``output.checkpoint_every: 1``.

Models: DeiT-tiny (5.7M parameters) fine-tuned in full at 224 px, and ``vit_cifar_s`` (4.2M) from
scratch at 32 px, both with AdamW (two moments per weight: the checkpoint is about 3x the model).
DeiT-tiny is built with random weights (train.mode=scratch): the checkpoint's size and cost do not
depend on where the weights came from.

Usage::

    PYTHONPATH=. python benchmarks/checkpoint_cost.py                 # CPU here, CUDA when present
    PYTHONPATH=. python benchmarks/checkpoint_cost.py --device cpu --steps 3 --batch 32
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from finetune.training.callbacks import Callback
from finetune.training.loop import train_one_epoch
from finetune.training.setup import build, prepare
from finetune.training.device import synchronize
from finetune.recipe import recipe_from_dict
from finetune.runs.recorder import RunRecorder
from finetune.runs.folder import CHECKPOINT
from finetune.runs.rundir import RunDir

EPOCH_IMAGES = 50_000  # CIFAR-10's training set

MODELS = {
    "deit_tiny": {"arch": "deit_tiny_patch16_224", "img_size": 224, "lr": 5e-4},
    "vit_cifar_s": {"arch": "vit_cifar_s", "img_size": 32, "lr": 1e-3},
}


def recipe_for(name: str, device: str, batch: int, workdir: Path):
    m = MODELS[name]
    return recipe_from_dict({
        "name": name,
        "device": device,
        "model": {"arch": m["arch"], "img_size": m["img_size"]},
        "train": {"mode": "scratch", "epochs": 1, "precision": "bf16", "log_every": 1000},
        "optim": {"name": "adamw", "lr": m["lr"]},
        "schedule": {"name": "constant"},
        "data": {"name": "synthetic", "synthetic_train": batch * 4, "synthetic_test": batch, "synthetic_size": 32,
                 "batch_size": batch, "mean": [0.5] * 3, "std": [0.5] * 3},
        "output": {"dir": str(workdir), "plots": False},
    })


class _Enough(Exception):
    """Raised from a callback to end the timed part of an epoch early."""


def measure(name: str, device: str, batch: int, steps: int, repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        recipe = recipe_for(name, device, batch, Path(tmp))
        state = build(prepare(recipe))
        step_times = []

        class Timer(Callback):
            def on_step_end(self, s):
                synchronize(s.device)
                now = time.perf_counter()
                step_times.append(now - self.last)
                self.last = now
                if len(step_times) >= steps + 1:
                    raise _Enough  # no need for the rest of the epoch

        timer = Timer()
        timer.last = time.perf_counter()
        state.meters.reset_epoch()
        try:
            train_one_epoch(state, timer)
        except _Enough:
            pass
        step_s = statistics.median(step_times[1:])  # the first step carries warm-up costs

        rundir = RunDir.create(Path(tmp) / name, recipe, {"status": "running"}, overwrite=False)
        recorder = RunRecorder(rundir, {"status": "running"})
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            recorder.checkpoint(state)
            times.append(time.perf_counter() - start)
        size = (rundir.path / CHECKPOINT).stat().st_size
        rundir.close()
    params = sum(p.numel() for p in state.model.parameters())
    epoch_s = EPOCH_IMAGES // batch * step_s
    checkpoint_s = statistics.median(times)
    return {
        "model": name, "arch": MODELS[name]["arch"], "img_size": MODELS[name]["img_size"], "params": params,
        "batch_size": batch, "step_s_median": step_s, "steps_timed": len(step_times) - 1,
        "epoch_s_estimate": epoch_s, "checkpoint_s_median": checkpoint_s, "checkpoint_s_all": times,
        "checkpoint_mb": size / 2**20, "share_of_epoch": checkpoint_s / epoch_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4, help="training steps timed per model (after one warm-up)")
    parser.add_argument("--repeats", type=int, default=3, help="checkpoints written per model")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()

    rows = [measure(name, args.device, args.batch, args.steps, args.repeats) for name in MODELS]
    device = torch.device(args.device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    date = datetime.date.today().isoformat()
    results = {
        "what": "checkpoint cost per epoch (output.checkpoint_every: 1) as a share of one CIFAR-10 epoch",
        "date": date, "device": device_name, "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "torch": torch.__version__, "precision": "fp32 on a CPU, bf16 autocast on a GPU", "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"checkpoint-cost-{device.type}-{date}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        f"# Checkpoint cost, {device_name}, {date}", "",
        f"`{results['command']}`, torch {torch.__version__}; medians of {args.repeats} checkpoints and "
        f"{args.steps} steps (batch {args.batch}); epoch = {EPOCH_IMAGES:,} images.", "",
        "| model | params | checkpoint | write time | step time | epoch time (est.) | share of epoch |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} ({r['img_size']} px) | {r['params'] / 1e6:.1f}M | {r['checkpoint_mb']:.0f} MB | "
            f"{r['checkpoint_s_median']:.2f} s | {r['step_s_median']:.3f} s | {r['epoch_s_estimate']:.0f} s | "
            f"{100 * r['share_of_epoch']:.3f}% |"
        )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
