"""``finetune export``: a finished run's model as an ONNX file or a ``torch.export`` program, with
its preprocessing inside, checked against the PyTorch model on the run's test images."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from ..errors import FinetuneError
from .common import check_writable_folder, err, friendly_errors, out, refuse_unfinished_run


class Format(str, Enum):
    onnx = "onnx"
    pt2 = "pt2"


class Input(str, Enum):
    uint8 = "uint8"
    float = "float"


def _batch(value: str) -> int | None:
    """``dynamic`` -> None; a positive number -> that fixed batch size."""
    if value == "dynamic":
        return None
    if value.isdigit() and 0 < int(value) <= 65536:
        return int(value)
    raise FinetuneError(f"--batch {value!r} is neither 'dynamic' nor a batch size.", "Pass --batch dynamic or, e.g., --batch 1.")


@friendly_errors
def export(
    run_dir: Annotated[Path, typer.Argument(help="A finished run folder.")],
    format: Annotated[Format, typer.Option("--format", help="onnx (onnxruntime; needs the export extra) or pt2 (torch.export).")] = Format.onnx,
    out_file: Annotated[Path | None, typer.Option("--out", help="File to write; default RUN_DIR/model.onnx or model.pt2.")] = None,
    batch: Annotated[str, typer.Option(help="'dynamic' (any batch size) or a fixed batch size.")] = "dynamic",
    opset: Annotated[int | None, typer.Option(help="ONNX opset (ONNX only); default: the exporter's.")] = None,
    tolerance: Annotated[float, typer.Option(help="Largest logit difference from PyTorch accepted on the run's test images.", min=0.0)] = 1e-4,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the file at --out if it exists.")] = False,
    input: Annotated[Input, typer.Option("--input", help="What the graph takes: uint8 (raw pixels, NCHW, at the run's "
                                         "stored image size; it normalises and resizes inside) or float (normalised "
                                         "float32 at the model's input size, preprocessed by the caller).")] = Input.uint8,
) -> None:
    """Export a run's model (its best epoch when it chose one on validation) for inference elsewhere.

    By default the graph takes uint8 pixels (B, 3, H, W) at the run's stored image size and does
    the normalisation and the resize to the model's size itself, so onnxruntime alone can run it;
    --input float exports the model alone, on normalised input. The file also carries the input
    size, mean, std, class names and stored image size; `finetune predict FILE photo.jpg` reads
    them. Nothing is written unless the exported model gives the PyTorch model's logits (within
    --tolerance) on the run's own test images, at batch 1 and at the largest batch. An existing
    file is replaced only with --overwrite.

    Example: finetune export runs/deit_tiny_cifar --format onnx
    """
    from ..export.exporter import export_run
    from ..training.activity import Activity

    fixed = _batch(batch)
    refuse_unfinished_run(run_dir)
    if out_file is not None:
        check_writable_folder(out_file.parent, "--out")
    # Tracing, writing and the parity runs take minutes on a CPU: say so before, not after, and
    # on a terminal show which of them is under way.
    line = (f"exporting {run_dir} as {format.value} (trace, write, then check against PyTorch on "
            "the run's test images; this can take a few minutes on a CPU) ...")
    with Activity(line, "starting", console=err) as shown, shown.decoding():
        result = export_run(run_dir, format.value, out=out_file, batch=fixed, opset=opset, tolerance=tolerance,
                            overwrite=overwrite, input=input.value, on_phase=shown.update)
    meta = result.meta
    out.print(
        f"parity at batch {' and '.join(map(str, result.batches))} on the run's test images: largest logit "
        f"difference {result.max_abs_diff:.3g} (tolerance {result.tolerance:g}), top-1 agrees on "
        f"{result.top1_agree}/{result.images}",
        highlight=False,
    )
    size, taken = ("x".join(map(str, s)) for s in (meta.input_size, meta.graph_size))
    takes = (f"takes uint8 NCHW images at {taken}, normalised and resized to {size} inside" if meta.graph_dtype == "uint8"
             else f"takes normalised float32 NCHW input at {size}")
    out.print(f"exported the {meta.model} model ({takes}; {len(meta.class_names)} classes, batch "
              f"{meta.batch or 'dynamic'}) -> {escape(str(result.path))}", highlight=False)
