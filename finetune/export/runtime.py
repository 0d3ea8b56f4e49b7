"""Running an exported model: an ONNX file on onnxruntime (CPU) or a ``.pt2`` program through
``torch.export.load``, each as a function from a float batch ``(B, 3, H, W)`` to logits
``(B, classes)``, with the metadata it was exported with (:func:`load_exported`)."""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

from ..errors import ExportError
from .metadata import PT2_ENTRY, SUFFIXES, ExportMeta, from_onnx_props

Runner = Callable[[torch.Tensor], torch.Tensor]


def require(module: str) -> ModuleType:
    """Import an optional dependency of ONNX export, or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExportError(
            f"ONNX export and ONNX inference need {module}, which is not installed.",
            "Install the export extra: pip install 'finetune[export]' (onnx, onnxruntime and onnxscript), "
            "or use --format pt2, which needs nothing beyond torch.",
        ) from None


def format_of(path: Path) -> str:
    """``onnx`` or ``pt2`` by the file's suffix."""
    fmt = SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise ExportError(f"{path} is neither an .onnx nor a .pt2 file.", "Pass a file that finetune export wrote.")
    return fmt


def open_runner(path: Path, fmt: str) -> Runner:
    """The exported model at ``path`` as a function of a CPU float batch, returning CPU logits."""
    if fmt == "onnx":
        ort = require("onnxruntime")
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name

        def run_onnx(batch: torch.Tensor) -> torch.Tensor:
            array = batch.detach().to("cpu", torch.float32).contiguous().numpy()
            return torch.from_numpy(session.run(None, {name: array})[0])

        return run_onnx
    with open(path, "rb") as f:  # a file object: the name may be a temporary one without the .pt2 suffix
        program = torch.export.load(f).module()

    def run_pt2(batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return program(batch.detach().to("cpu", torch.float32).contiguous())

    return run_pt2


def read_meta(path: Path, fmt: str) -> ExportMeta:
    """The metadata an exported file carries (ONNX ``metadata_props``; the archive entry of a ``.pt2``)."""
    if fmt == "onnx":
        ort = require("onnxruntime")
        try:
            props = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
        except Exception as exc:  # onnxruntime raises its own exception types for unreadable files
            raise ExportError(f"{path} cannot be read as an ONNX model ({exc}).", "Export the run again.") from None
        return from_onnx_props(dict(props), path)
    extra = {PT2_ENTRY: ""}
    try:
        with open(path, "rb") as f:
            torch.export.load(f, extra_files=extra)
        data = json.loads(extra[PT2_ENTRY])
    except (RuntimeError, ValueError, OSError) as exc:
        raise ExportError(f"{path} cannot be read as a finetune .pt2 export ({exc}).", "Export the run again.") from None
    return ExportMeta.from_dict(data, path)


def load_exported(path: str | Path) -> tuple[Runner, ExportMeta]:
    """An exported model file as ``(runner, metadata)``.

    Raises:
        ExportError: a file of another kind, one without finetune's metadata, or a missing extra.
    """
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path} does not exist.", "Pass the path of a file that finetune export wrote.")
    fmt = format_of(path)
    meta = read_meta(path, fmt)
    return open_runner(path, fmt), meta
