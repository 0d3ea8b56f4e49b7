"""``finetune export``: a finished run's model (its ``best/`` one when the run chose an epoch on
validation, else the final one) in eval mode, written as ONNX (``torch.onnx.export`` with the
dynamo exporter) or as a ``torch.export`` program, with its preprocessing in the file, and checked
against the PyTorch model on the run's own test images before it is renamed into place."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import ExportError
from ..snapshot import write_atomically, write_text_atomically
from . import runtime
from .metadata import FORMATS, PT2_ENTRY, SUFFIXES, ExportMeta, onnx_props, sidecar

DEFAULT_TOLERANCE = 1e-4  # largest logit difference accepted in fp32
PARITY_IMAGES = 64  # test images the exported file is checked on


@dataclass(frozen=True)
class ExportResult:
    """What ``export_run`` wrote and how closely it matches the PyTorch model."""

    path: Path
    format: str
    meta: ExportMeta
    max_abs_diff: float  # largest |exported - PyTorch| logit over the parity images
    top1_agree: int  # parity images whose top class is the same
    images: int  # parity images
    tolerance: float


def run_model(run_dir: Path) -> tuple[nn.Module, str]:
    """The run's model to export, in eval mode, and which one it is (``best`` or ``final``)."""
    from ..models.build import load_model
    from ..runs.folder import BEST_DIR, check_links, is_run_folder, read_summary

    if not run_dir.is_dir() or not is_run_folder(run_dir):
        raise ExportError(f"{run_dir} is not a run folder.", "Pass a folder that finetune run wrote (runs/<name>).")
    check_links(run_dir)  # its model, recipe and summary are its own files, never others through a link
    summary = read_summary(run_dir) or {}
    best = run_dir / BEST_DIR
    which, folder = ("best", best) if summary.get("selection") == "val" and (best / "config.json").is_file() else ("final", run_dir)
    if not (folder / "config.json").is_file():
        raise ExportError(f"The run {run_dir} has no saved model (no {folder / 'config.json'}).",
                          "Train it to the end with output.save_model=true, then export it.")
    model = load_model(folder).eval()
    adapters = [name for name, _ in model.named_parameters() if "lora_" in name or "base_model" in name]
    if adapters:  # a run folder's model.safetensors has LoRA merged; anything else is not a finetune model
        raise ExportError(f"{folder} holds unmerged LoRA adapters ({adapters[0]}).",
                          "Export the run folder's merged model.safetensors, as finetune run saves it.")
    return model, which


def parity_batch(run_dir: Path, model: nn.Module, images: int) -> torch.Tensor:
    """Up to ``images`` of the run's own test images, loaded as ``finetune eval`` loads them."""
    from ..data.load import load_eval_split
    from ..data.loader import BatchLoader
    from ..data.preprocess import Preprocess
    from ..recipe import load_recipe

    recipe = load_recipe(run_dir / "recipe.yaml")  # its seed also fixes synthetic data
    split, _, _ = load_eval_split(recipe.data, seed=recipe.seed, classes=model.pretrained_cfg.get("label_names"))
    loader = BatchLoader(split, batch_size=images, train=False, device=torch.device("cpu"),
                         preprocess=Preprocess.from_model(model))
    return next(iter(loader))[0]


def export_meta(run_dir: Path, model: nn.Module, which: str, batch: int | None) -> ExportMeta:
    """The preprocessing the run evaluated with, as the exported file will carry it."""
    from ..data.preprocess import Preprocess
    from ..runs.folder import stored_size

    pre = Preprocess.from_model(model)
    stored = stored_size(run_dir, model)
    names = model.pretrained_cfg.get("label_names") or [str(i) for i in range(model.num_classes)]
    return ExportMeta(input_size=pre.size, mean=pre.mean, std=pre.std, class_names=tuple(names),
                      stored_size=stored, resize=pre.resize, interpolation=pre.interpolation,
                      batch=batch, arch=model.pretrained_cfg.get("architecture"), model=which)


def write_onnx(model: nn.Module, example: torch.Tensor, path: Path, meta: ExportMeta, opset: int | None) -> None:
    """``model`` as an ONNX file at ``path`` with ``meta`` in its ``metadata_props``."""
    for module in ("onnx", "onnxscript"):
        runtime.require(module)
    dynamic = None if meta.batch else ({0: torch.export.Dim("batch", min=1, max=65536)},)
    kwargs = {"opset_version": opset} if opset else {}
    try:
        program = torch.onnx.export(model, (example,), dynamo=True, dynamic_shapes=dynamic, input_names=["images"],
                                    output_names=["logits"], verbose=False, **kwargs)
    except Exception as exc:  # the exporter's own error types vary by version
        raise ExportError(f"torch.onnx.export could not export this model ({type(exc).__name__}: {exc}).",
                          "Try another --opset, or --format pt2.") from None
    program.model.metadata_props.update(onnx_props(meta))
    program.save(str(path))


def write_pt2(model: nn.Module, example: torch.Tensor, path: Path, meta: ExportMeta) -> None:
    """``model`` as a ``torch.export`` program at ``path`` with ``meta`` inside the archive."""
    dynamic = None if meta.batch else ({0: torch.export.Dim("batch", min=1, max=65536)},)
    try:
        program = torch.export.export(model, (example,), dynamic_shapes=dynamic)
    except Exception as exc:  # torch.export raises several error types for untraceable code
        raise ExportError(f"torch.export could not export this model ({type(exc).__name__}: {exc}).",
                          "Try --format onnx, or a fixed --batch.") from None
    with open(path, "wb") as f:  # a file object: torch.export names archives by suffix, and path is a temporary name
        torch.export.save(program, f, extra_files={PT2_ENTRY: meta.to_json()})


def check_parity(model: nn.Module, runner: runtime.Runner, batch: torch.Tensor, tolerance: float) -> tuple[float, int]:
    """``(largest logit difference, top-1 agreements)`` of the exported runner and the model on
    ``batch``; an :class:`ExportError` beyond ``tolerance``."""
    with torch.no_grad():
        expected = model(batch).float()
    got = runner(batch).float()
    if got.shape != expected.shape:
        raise ExportError(f"The exported model gives logits of shape {tuple(got.shape)}, the PyTorch model "
                          f"{tuple(expected.shape)}. Nothing was written.", "Report this as a bug in finetune export.")
    diff = float((got - expected).abs().max())
    agree = int((got.argmax(-1) == expected.argmax(-1)).sum())
    if not diff <= tolerance:  # also catches NaN
        raise ExportError(
            f"The exported model's logits differ from the PyTorch model's by up to {diff:.3g} (tolerance "
            f"{tolerance:g}) on {len(batch)} of the run's test images; top-1 agrees on {agree}/{len(batch)}. "
            "Nothing was written.",
            "Try another --opset or the other --format; pass a larger --tolerance only if you accept the difference.",
        )
    return diff, agree


def check_target(out: Path, fmt: str, overwrite: bool) -> None:
    """Refuse, before any work, a file to export to that ``predict`` would not read as ``fmt`` (its
    suffix), that is a folder, or that exists already (unless ``overwrite``)."""
    for path in (out, sidecar(out)) if fmt == "pt2" else (out,):
        if path.is_dir():
            raise ExportError(f"{path} is a folder; an export is written as a file.",
                              f"Pass --out a file name, e.g. {path / f'model.{fmt}'}.")
    if out.suffix.lower() != f".{fmt}":
        other = SUFFIXES.get(out.suffix.lower())
        raise ExportError(f"--out {out} does not end in .{fmt}; predict tells formats apart by suffix, so it "
                          f"would not read a {fmt} file by this name.",
                          f"Name it {out.stem}.{fmt}" + (f", or pass --format {other}." if other else "."))
    for path in (out, sidecar(out)) if fmt == "pt2" else (out,):
        if (path.exists() or path.is_symlink()) and not overwrite:
            raise ExportError(f"{path} exists already; finetune export does not replace a file unless asked.",
                              "Pass --overwrite to replace it, or --out another file.")


def check_opset(opset: int | None, fmt: str) -> None:
    """Refuse an opset for a ``.pt2`` (it has none), or one outside those torch.onnx exports."""
    if opset is None:
        return
    if fmt != "onnx":
        raise ExportError(f"--opset {opset} applies to ONNX files only; a {fmt} program has no opset.",
                          "Leave --opset out, or pass --format onnx.")
    from torch.onnx import _constants  # torch.onnx's own highest opset, so it follows the installed torch

    # 18: the lowest opset the dynamo exporter has implementations for; below it, torch converts the
    # written model down and, failing that (as for LayerNorm below 17), keeps 18 with a logged traceback.
    low, high = 18, _constants.ONNX_MAX_OPSET
    if not low <= opset <= high:
        raise ExportError(f"--opset {opset} is outside the ONNX opsets this torch exports ({low} to {high}).",
                          f"Pass --opset between {low} and {high}, or leave it out for the exporter's default.")


def export_run(run_dir: str | Path, fmt: str = "onnx", *, out: str | Path | None = None, batch: int | None = None,
               opset: int | None = None, tolerance: float = DEFAULT_TOLERANCE, overwrite: bool = False) -> ExportResult:
    """Export a finished run's model and check it against PyTorch before it appears at ``out``.

    Args:
        run_dir: a finished run folder.
        fmt: ``onnx`` or ``pt2``.
        out: the file to write (default ``RUN_DIR/model.<fmt>``), named ``.<fmt>``; a ``.pt2`` also
            gets ``<out>.json``.
        batch: a fixed batch size; ``None`` exports a dynamic batch dimension.
        opset: ONNX opset (default: the exporter's); ONNX only.
        tolerance: the largest logit difference accepted on the run's test images.
        overwrite: replace ``out`` when it exists (else refused).

    Raises:
        ExportError: not a run, no model, a missing extra, an ``out`` that exists (without
            ``overwrite``), is a folder or has another suffix, an opset for pt2 or out of range,
            an export that fails or does not match.
    """
    assert fmt in FORMATS, f"format must be one of {FORMATS}, got {fmt!r}"
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / f"model.{fmt}"
    check_opset(opset, fmt)
    check_target(out, fmt, overwrite)
    model, which = run_model(run_dir)
    for module in ("onnx", "onnxscript", "onnxruntime") if fmt == "onnx" else ():
        runtime.require(module)  # before any work
    meta = export_meta(run_dir, model, which, batch)
    images = parity_batch(run_dir, model, batch or PARITY_IMAGES)
    if batch:  # a fixed batch: check on exactly that many, repeating the test images when there are fewer
        images = images.repeat((batch + len(images) - 1) // len(images), 1, 1, 1)[:batch]
    # The example traced: the fixed batch, or two rows (a batch of 1 would let the exporter treat it as a constant).
    example = images if batch else images[:2].repeat(2 if len(images) == 1 else 1, 1, 1, 1)
    checked: dict[str, tuple[float, int]] = {}

    def write(tmp: Path) -> None:
        write_onnx(model, example, tmp, meta, opset) if fmt == "onnx" else write_pt2(model, example, tmp, meta)
        checked["parity"] = check_parity(model, runtime.open_runner(tmp, fmt), images, tolerance)
        if fmt == "pt2":  # the JSON copy beside the file, readable without torch
            write_text_atomically(sidecar(out), meta.to_json())

    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(out, write)
    diff, agree = checked["parity"]
    return ExportResult(out, fmt, meta, diff, agree, len(images), tolerance)
