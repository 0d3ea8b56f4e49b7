"""``finetune export``: a finished run's model (its ``best/`` one when the run chose an epoch on
validation, else the final one) in eval mode, written as ONNX (``torch.onnx.export`` with the
dynamo exporter) or as a ``torch.export`` program. By default the graph takes ``uint8`` pixels and
does the run's preprocessing itself (:mod:`.graph`); its metadata says so. Before the file is
renamed into place it is checked, at batch 1 and at the largest batch, against the PyTorch model
fed by finetune's own evaluation pipeline on the run's test images."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..data.preprocess import Preprocess
from ..errors import ExportError
from ..runs.folder import preprocess_of
from ..snapshot import write_atomically, write_text_atomically
from . import runtime
from .graph import graph_module
from .metadata import FORMATS, PT2_ENTRY, SUFFIXES, ExportMeta, onnx_props, sidecar

DEFAULT_TOLERANCE = 1e-4  # largest logit difference accepted in fp32
PARITY_IMAGES = 64  # test images the exported file is checked on (its largest batch, when the batch is dynamic)
INPUTS = {"uint8": "uint8", "float": "float32"}  # --input -> the graph's input dtype


@dataclass(frozen=True)
class ExportResult:
    """What ``export_run`` wrote and how closely it matches the PyTorch model."""

    path: Path
    format: str
    meta: ExportMeta
    max_abs_diff: float  # largest |exported - PyTorch| logit over the parity images, at every batch size checked
    top1_agree: int  # parity images whose top class is the same, at the largest batch
    images: int  # parity images (the largest batch)
    tolerance: float
    batches: tuple[int, ...] = ()  # the batch sizes checked


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


def parity_inputs(run_dir: Path, model: nn.Module, pre: Preprocess, meta: ExportMeta,
                  count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``count`` of the run's own test images twice: as the graph takes them (``uint8`` at
    ``meta.graph_size``, or normalised floats), and as ``finetune eval`` feeds the model (the float
    batch an evaluation loader with ``pre`` makes from those same uint8 images)."""
    from ..data.decode import decode_images
    from ..data.load import load_eval_split
    from ..data.loader import BatchLoader
    from ..data.splits import EncodedImages, ImageTensors
    from ..recipe import load_recipe

    recipe = load_recipe(run_dir / "recipe.yaml")  # its seed also fixes synthetic data
    split, _, _ = load_eval_split(recipe.data, seed=recipe.seed, classes=model.pretrained_cfg.get("label_names"))
    split = split.take(slice(0, count))
    # The uint8 images a loader holds: a streamed split's decoded as its loader decodes them.
    images = decode_images(split.items, split.names, exif=pre.exif) if isinstance(split, EncodedImages) else split.images
    pixels = torch.stack([pre.resize_uint8(image) for image in images])  # at the stored size (a no-op when there)
    loader = BatchLoader(ImageTensors(pixels, split.labels), batch_size=len(pixels), train=False,
                         device=torch.device("cpu"), preprocess=pre)
    floats = next(iter(loader))[0]
    return (pixels if meta.graph_dtype == "uint8" else floats), floats


def export_meta(model: nn.Module, pre: Preprocess, which: str, batch: int | None, graph_dtype: str) -> ExportMeta:
    """What the exported file carries: the model's preprocessing ``pre``, its class names, and the
    input the graph takes."""
    names = model.pretrained_cfg.get("label_names") or [str(i) for i in range(model.num_classes)]
    return ExportMeta.of(pre, names, graph_dtype=graph_dtype, batch=batch,
                         arch=model.pretrained_cfg.get("architecture"), model=which)


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


def check_parity(model: nn.Module, runner: runtime.Runner, graph_in: torch.Tensor, model_in: torch.Tensor,
                 batches: tuple[int, ...], tolerance: float) -> tuple[float, int]:
    """``(largest logit difference, top-1 agreements at the largest batch)`` of the exported runner
    on the first ``n`` rows of ``graph_in`` and the model on the same rows of ``model_in``, for each
    ``n`` in ``batches``; an :class:`ExportError` beyond ``tolerance``."""
    worst, agree = 0.0, 0
    for n in batches:
        with torch.no_grad():
            expected = model(model_in[:n]).float()
        got = runner(graph_in[:n]).float()
        if got.shape != expected.shape:
            raise ExportError(f"The exported model gives logits of shape {tuple(got.shape)}, the PyTorch model "
                              f"{tuple(expected.shape)}. Nothing was written.", "Report this as a bug in finetune export.")
        diff = float((got - expected).abs().max())
        agree = int((got.argmax(-1) == expected.argmax(-1)).sum())
        if not diff <= tolerance:  # also catches NaN
            raise ExportError(
                f"The exported model's logits differ from the PyTorch model's by up to {diff:.3g} (tolerance "
                f"{tolerance:g}) on {n} of the run's test images at batch {n}; top-1 agrees on {agree}/{n}. "
                "Nothing was written.",
                "Try another --opset or the other --format; pass a larger --tolerance only if you accept the difference.",
            )
        worst = max(worst, diff)
    return worst, agree


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
               opset: int | None = None, tolerance: float = DEFAULT_TOLERANCE, overwrite: bool = False,
               input: str = "uint8", on_phase: Callable[[str], None] | None = None) -> ExportResult:
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
        input: what the graph takes: ``uint8`` (raw pixels ``(B, 3, H, W)`` at the run's stored
            size; normalising and resizing happen inside the graph) or ``float`` (normalised
            float32 at the model's input size, preprocessed by the caller).
        on_phase: called with a few words on what starts next (loading, reading the test images,
            exporting, checking), e.g. for a spinner's text.

    Raises:
        ExportError: not a run, no model, a missing extra, an ``out`` that exists (without
            ``overwrite``), is a folder or has another suffix, an opset for pt2 or out of range,
            an unknown format or input, an export that fails or does not match.
    """
    phase = on_phase or (lambda text: None)
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / f"model.{fmt}"
    _check_request(fmt, input, opset, out, overwrite)
    phase("loading the run's model")
    model, which = run_model(run_dir)
    for module in ("onnx", "onnxscript", "onnxruntime") if fmt == "onnx" else ():
        runtime.require(module)  # before any work
    # The run's evaluation preprocessing, read as predict reads it (the model's pretrained_cfg;
    # summary.json's stored size for a run saved before config.json named it): the graph, its
    # metadata and the parity images all come from this one object.
    pre = preprocess_of(model, run_dir)
    meta = export_meta(model, pre, which, batch, INPUTS[input])
    graph = graph_module(model, pre, meta.graph_dtype)
    phase("reading the run's test images")
    graph_in, model_in = parity_inputs(run_dir, model, pre, meta, batch or PARITY_IMAGES)
    graph_in, model_in, batches, example = _parity_batches(graph_in, model_in, batch)
    checked: dict[str, tuple[float, int]] = {}

    def write(tmp: Path) -> None:
        phase(f"tracing the model and writing the {fmt} file")
        write_onnx(graph, example, tmp, meta, opset) if fmt == "onnx" else write_pt2(graph, example, tmp, meta)
        phase(f"checking against PyTorch at batch {' and '.join(map(str, batches))}")
        checked["parity"] = check_parity(model, runtime.open_runner(tmp, fmt), graph_in, model_in, batches, tolerance)
        if fmt == "pt2":  # the JSON copy beside the file, readable without torch
            write_text_atomically(sidecar(out), meta.to_json())

    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(out, write)
    diff, agree = checked["parity"]
    return ExportResult(out, fmt, meta, diff, agree, len(graph_in), tolerance, batches)


def _parity_batches(graph_in: torch.Tensor, model_in: torch.Tensor, batch: int | None
                    ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...], torch.Tensor]:
    """The parity images (graph's and model's) to check on, the batch sizes to check at, and the
    example to trace, for a fixed ``batch`` or (``None``) a dynamic one."""
    if batch:  # a fixed batch: check on exactly that many, repeating the test images when there are fewer
        rows = torch.arange(batch) % len(graph_in)
        graph_in, model_in = graph_in[rows], model_in[rows]
    # Checked at batch 1 (the common serving case) and at the largest; a fixed batch only at its size.
    batches = (batch,) if batch else tuple(sorted({1, len(graph_in)}))
    # The example traced: the fixed batch, or two rows (a batch of 1 would let the exporter treat it as a constant).
    example = graph_in if batch else graph_in[torch.arange(2) % len(graph_in)]
    return graph_in, model_in, batches, example


def _check_request(fmt: str, input: str, opset: int | None, out: Path, overwrite: bool) -> None:
    """Refuse, before any work, a format, input, opset or file to write that cannot be exported to."""
    if fmt not in FORMATS or input not in INPUTS:  # the CLI offers only these; a library call may not
        raise ExportError(f"Cannot export format {fmt!r} with input {input!r}.",
                          f"Pass a format from {', '.join(FORMATS)} and an input from {', '.join(INPUTS)}.")
    check_opset(opset, fmt)
    check_target(out, fmt, overwrite)
