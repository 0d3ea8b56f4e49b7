"""``finetune export``: a finished run's model as an ONNX file or a ``torch.export`` program, with
its preprocessing inside, checked against the PyTorch model on the run's test images."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from ..errors import FinetuneError
from .common import check_writable_folder, friendly_errors, out, refuse_unfinished_run


class Format(str, Enum):
    onnx = "onnx"
    pt2 = "pt2"


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
) -> None:
    """Export a run's model (its best epoch when it chose one on validation) for inference elsewhere.

    The file carries the input size, mean, std, class names and stored image size; `finetune
    predict FILE photo.jpg` reads them. Nothing is written unless the exported model gives the
    PyTorch model's logits (within --tolerance) on the run's own test images. An existing file is
    replaced only with --overwrite.

    Example: finetune export runs/deit_tiny_cifar --format onnx
    """
    from ..export.exporter import export_run

    fixed = _batch(batch)
    refuse_unfinished_run(run_dir)
    if out_file is not None:
        check_writable_folder(out_file.parent, "--out")
    result = export_run(run_dir, format.value, out=out_file, batch=fixed, opset=opset, tolerance=tolerance,
                        overwrite=overwrite)
    out.print(
        f"parity on {result.images} test images: largest logit difference {result.max_abs_diff:.3g} "
        f"(tolerance {result.tolerance:g}), top-1 agrees on {result.top1_agree}/{result.images}",
        highlight=False,
    )
    size = "x".join(map(str, result.meta.input_size))
    out.print(f"exported the {result.meta.model} model ({size}, {len(result.meta.class_names)} classes, batch "
              f"{result.meta.batch or 'dynamic'}) -> {escape(str(result.path))}", highlight=False)
