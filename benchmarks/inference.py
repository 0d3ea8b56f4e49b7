"""Inference speed of an exported model against PyTorch: images/s and latency at batch 1 and 64.

For each model, four ways of running it on the same random input: PyTorch eager, ``torch.compile``
(inductor), the ONNX file ``finetune export`` writes run on onnxruntime (CPU execution provider), and
the ``torch.export`` program (``.pt2``) loaded back. Models: the from-scratch presets ``vit_lab`` and
``vit_cifar_s`` at 32 px and DeiT-tiny at 224 px, all with random weights (speed does not depend on
them; nothing is downloaded) and a 10-class head, in eval mode, fp32.

Each figure is the median of timed calls after warm-up calls (at least ``--min-calls``, and more
until ``--seconds`` have passed, at most ``--max-calls``); latency is the median time of one call,
images/s is the batch over that median; the fastest call is given too, as the CPU may be shared
(another process's work lengthens some calls, never shortens one). ``torch.compile``'s compile time is not in its figures.

Usage::

    PYTHONPATH=. python benchmarks/inference.py                       # CPU; writes benchmarks/results/
    PYTHONPATH=. python benchmarks/inference.py --models vit_lab --batches 1 --seconds 0.5
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

from finetune import create_model
from finetune.export import runtime
from finetune.export.exporter import write_onnx, write_pt2
from finetune.export.metadata import ExportMeta

MODELS = {"vit_lab": 32, "vit_cifar_s": 32, "deit_tiny_patch16_224": 224}  # name -> input size


def timed(fn, x: torch.Tensor, args) -> tuple[float, float, int]:
    """Median and fastest seconds of one call of ``fn(x)`` after warm-up, and the calls timed."""
    with torch.no_grad():
        for _ in range(2):
            fn(x)
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < args.max_calls and (len(times) < args.min_calls or time.perf_counter() - start < args.seconds):
            t0 = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times), len(times)


def runners(model: torch.nn.Module, size: int, workdir: Path) -> dict:
    """Each backend as a function that builds it (dynamic batch; compile's time left out). Built one
    at a time, onnxruntime last: its idle threads spin for a while after each call and would slow
    whatever ran next on the same cores."""
    meta = ExportMeta(input_size=(size, size), mean=(0.5,) * 3, std=(0.5,) * 3,
                      class_names=tuple(map(str, range(10))), stored_size=None)
    example = torch.randn(2, 3, size, size)
    write_onnx(model, example, workdir / "m.onnx", meta, None)
    write_pt2(model, example, workdir / "m.pt2", meta)
    return {
        "eager": lambda: model,
        "compile": lambda: torch.compile(model),
        "pt2": lambda: runtime.open_runner(workdir / "m.pt2", "pt2"),
        "onnxruntime": lambda: runtime.open_runner(workdir / "m.onnx", "onnx"),
    }


def measure(name: str, size: int, args, workdir: Path) -> list[dict]:
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, img_size=size).eval()
    params = sum(p.numel() for p in model.parameters())
    rows = []
    for backend, build in runners(model, size, workdir).items():
        fn = build()
        for batch in args.batches:
            x = torch.randn(batch, 3, size, size)
            try:
                latency, fastest, calls = timed(fn, x, args)
            except Exception as exc:  # a backend that cannot run here is reported, not fatal
                rows.append({"model": name, "img_size": size, "backend": backend, "batch": batch, "error": repr(exc)[:300]})
                continue
            rows.append({"model": name, "img_size": size, "params": params, "backend": backend, "batch": batch,
                         "latency_ms": 1000 * latency, "fastest_ms": 1000 * fastest, "images_per_s": batch / latency,
                         "calls": calls})
            print(f"{name:24s} {backend:12s} batch {batch:3d}: {1000 * latency:9.2f} ms  {batch / latency:9.1f} img/s", flush=True)
    return rows


def write(rows: list[dict], args, started: float) -> None:
    import onnxruntime

    date = datetime.date.today().isoformat()
    device = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    results = {
        "what": "inference latency and images/s: PyTorch eager, torch.compile, ONNX on onnxruntime (CPU), torch.export .pt2",
        "date": date, "device": device, "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "precision": "fp32",
        "note": args.note,
        "wall_s": round(time.perf_counter() - started, 1), "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"inference-cpu-{date}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [f"# Inference, {device}, {date}", "",
             f"`{results['command']}`; torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, fp32, random "
             f"weights; medians of at least {args.min_calls} calls after 2 warm-up calls. {results['note'][0].upper() + results['note'][1:]}.", "",
             "| model | px | backend | batch | latency (median) | fastest call | images/s (median) |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        figures = (f"{r['latency_ms']:.2f} ms | {r['fastest_ms']:.2f} ms | {r['images_per_s']:,.0f}" if "error" not in r
                   else f"failed: {r['error'][:80]} | |")
        lines.append(f"| {r['model']} | {r['img_size']} | {r['backend']} | {r['batch']} | {figures} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--seconds", type=float, default=2.0, help="time each figure at least this long")
    parser.add_argument("--min-calls", type=int, default=3)
    parser.add_argument("--max-calls", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--note", default="measured on an otherwise idle machine",
                        help="how the machine was used while measuring, written into the results")
    args = parser.parse_args()
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            rows += measure(name, MODELS[name], args, Path(tmp))
    write(rows, args, started)


if __name__ == "__main__":
    main()
