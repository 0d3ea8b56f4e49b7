"""How fast the input pipeline feeds a model, with no model: images/s of finetune's data paths at
the model's input size, and the decode cache's start-up time.

Rows (each over ``--batches`` batches after one warm-up batch, training augmentation on, resized to
``--out-size``):

* ``in-memory``: the decoded uint8 set on the device; pad-crop, flip, normalise and resize per batch.
* ``stream-cpu``: images kept encoded and decoded per batch by ``--workers`` CPU threads, each
  resized to ``--image-size`` (default: the model's), then pad-crop, flip and resize per batch.
* ``stream-cpu-rrc``: the same with random resized crops (cut from the image at its stored size, as in
  memory).
* ``stream-gpu`` (CUDA only): JPEGs decoded on the GPU in one batched call per batch.

Start-up: seconds until the training and test splits are ready (listing and decoding, after the
imports), with the decode cache cold (first run) and warm (second run), each in a fresh process.

Usage::

    PYTHONPATH=. python benchmarks/data_throughput.py --data data/cifar10-jpeg
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from finetune.data.load import load_splits
from finetune.data.loader import BatchLoader
from finetune.recipe import AugmentConfig, DataConfig

READY_SCRIPT = """
import sys, time
from finetune.data.load import load_splits
from finetune.recipe import DataConfig
t = time.perf_counter()  # after the imports: the time the data itself takes
load_splits(DataConfig(name="imagefolder", root=sys.argv[1]), seed=0)
print(time.perf_counter() - t)
"""


def throughput(split, *, device: torch.device, out: int, batch: int, batches: int, workers: int, rrc: bool) -> float:
    augment = AugmentConfig(hflip=True, crop_padding=4, random_resized_crop=rrc)
    loader = BatchLoader(split, batch_size=batch, train=True, device=device, out_size=(out, out), mean=(0.5,) * 3,
                         std=(0.5,) * 3, augment=augment, workers=workers, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    it = iter(loader)
    next(it)  # warm-up: thread pools, allocator, first decode
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start, seen = time.perf_counter(), 0
    for _ in range(batches):
        x, _ = next(it)
        seen += x.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return seen / (time.perf_counter() - start)


def ready_time(root: Path, cache: Path) -> float:
    env = {**os.environ, "FINETUNE_CACHE_DIR": str(cache), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", READY_SCRIPT, str(root)], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="an ImageFolder root (train/ and test/)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--image-size", type=int, default=None,
                        help="data.image_size while streaming: what each image is resized to when decoded (default: the model's size)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    device = torch.device(args.device)
    common = dict(device=device, out=args.out_size, batch=args.batch, batches=args.batches, workers=args.workers)

    with tempfile.TemporaryDirectory() as cache:
        cold, warm = ready_time(args.data, Path(cache)), ready_time(args.data, Path(cache))
    rows = {"start-up, decode cache cold (s)": cold, "start-up, decode cache warm (s)": warm}
    memory = load_splits(DataConfig(name="imagefolder", root=str(args.data), in_memory=True, cache=False), seed=0)
    streamed = load_splits(DataConfig(name="imagefolder", root=str(args.data), in_memory=False, image_size=args.image_size), seed=0)
    rows["in-memory (img/s)"] = throughput(memory.train, rrc=False, **common)
    cpu = dict(common, device=torch.device("cpu")) if device.type == "cuda" else common
    rows["stream-cpu (img/s)"] = throughput(streamed.train, rrc=False, **cpu)
    rows["stream-cpu-rrc (img/s)"] = throughput(streamed.train, rrc=True, **cpu)
    if device.type == "cuda":
        rows["stream-gpu (img/s)"] = throughput(streamed.train, rrc=False, **common)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    date = datetime.date.today().isoformat()
    command = " ".join(["data_throughput.py", *sys.argv[1:]])
    result = {"date": date, "device": name, "command": command, "torch": torch.__version__, "data": str(args.data),
              "image_size": args.image_size,
              "train_images": len(memory.train), "out_size": args.out_size, "batch": args.batch,
              "batches": args.batches, "workers": args.workers, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"data-{device.type}-{date}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Data pipeline, {name}, {date}", "",
             f"`{command}`, torch {torch.__version__}: {len(memory.train):,} training images, batches of "
             f"{args.batch} at {args.out_size} px, {args.batches} timed batches, {args.workers} decode threads, "
             f"streamed images resized to {args.image_size or args.out_size} px when decoded.", "",
             "| measure | value |", "| --- | ---: |"]
    lines += [f"| {k} | {v:,.2f} |" if "(s)" in k else f"| {k} | {v:,.0f} |" for k, v in rows.items()]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
