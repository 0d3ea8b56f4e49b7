"""What skipping the stored-size step costs: a run's model scored on its test images preprocessed
as finetune's evaluation does (photo -> stored size -> input size) and as timm's own transform does
from the same config.json (photo -> input size), on the images as they are and on the same images
enlarged 4x (standing in for photos larger than the stored size).

    python benchmarks/stored_size_cost.py runs/stored24 data/cifar10-jpeg \
        --classes dog,frog,horse,ship,truck --out benchmarks/results/stored-size-cost-cpu-DATE

Writes ``OUT.json`` and ``OUT.md``. The run must have saved its model and its config.json must
name a ``stored_size`` (a run with ``data.image_size`` below the model's input size).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def top1(model, batch: torch.Tensor) -> list[int]:
    with torch.no_grad():
        return model(batch).argmax(-1).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("data", type=Path, help="an image folder with test/<class>/")
    parser.add_argument("--classes", default="", help="comma-separated classes, in the run's label order")
    parser.add_argument("--enlarge", type=int, default=4)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import timm

    from finetune import load_model
    from finetune.data.preprocess import Preprocess

    model = load_model(args.run).eval()
    config = json.loads((args.run / "config.json").read_text())
    stored = config.get("stored_size")
    if not stored:
        raise SystemExit(f"{args.run}/config.json names no stored_size: nothing to compare")
    names = model.pretrained_cfg["label_names"]
    classes = args.classes.split(",") if args.classes else names
    paths = sorted(p for c in classes for p in (args.data / "test" / c).glob("*.jpg"))
    labels = [names.index(p.parent.name) for p in paths]
    pre = Preprocess.from_model(model)  # config.json's description, the stored size included
    data_config = timm.data.resolve_data_config(model=model)
    transform = timm.data.create_transform(**data_config)
    chunk = 256
    rows = {}
    started = time.time()
    for enlarge in (1, args.enlarge):
        def photo(path: Path) -> Image.Image:
            image = Image.open(path).convert("RGB")
            return image if enlarge == 1 else image.resize((image.width * enlarge, image.height * enlarge),
                                                           Image.Resampling.BICUBIC)

        ours, theirs, sizes = [], [], set()
        for i in range(0, len(paths), chunk):
            images = [photo(p) for p in paths[i:i + chunk]]
            sizes |= {(im.height, im.width) for im in images}
            ours += top1(model, pre([torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1) for im in images]))
            theirs += top1(model, torch.stack([transform(im) for im in images]))
        n = len(paths)
        rows[f"x{enlarge}"] = {
            "photo_sizes": sorted(sizes),
            "finetune_two_step_top1": sum(p == y for p, y in zip(ours, labels)) / n,
            "timm_one_step_top1": sum(p == y for p, y in zip(theirs, labels)) / n,
            "top1_agreement": sum(a == b for a, b in zip(ours, theirs)) / n,
            "images": n,
        }
    result = {
        "what": "test top-1 of one model, preprocessed finetune's way (photo -> stored_size -> input) and timm's "
                "(resolve_data_config + create_transform: photo -> input)",
        "run": str(args.run), "stored_size": stored, "input_size": data_config["input_size"],
        "interpolation": data_config["interpolation"], "rows": rows, "device": "cpu",
        "cpu": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d"),
        "seconds": round(time.time() - started, 1),
        "command": "python benchmarks/stored_size_cost.py " + " ".join(sys.argv[1:]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# What skipping the stored-size step costs ({result['date']})", "",
             f"Run `{args.run}`: input {data_config['input_size'][1:]} px, images stored at {stored} px. "
             f"Command: `{result['command']}`.", "",
             "| photos | finetune (stored size first) | timm's transform alone | same top-1 |",
             "| --- | ---: | ---: | ---: |"]
    for key, row in rows.items():
        shown = ", ".join(f"{h}x{w}" for h, w in row["photo_sizes"][:3])
        lines.append(f"| test images {key} ({shown} px), {row['images']} | "
                     f"{100 * row['finetune_two_step_top1']:.2f}% | {100 * row['timm_one_step_top1']:.2f}% | "
                     f"{100 * row['top1_agreement']:.2f}% |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
