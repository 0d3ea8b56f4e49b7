"""Running an exported model: an ONNX file on onnxruntime (CPU) or a ``.pt2`` program through
``torch.export.load`` (once :mod:`.archive` found nothing in it that loading would run), each as a
function from the batch its graph takes (``uint8`` pixels or normalised floats, ``(B, 3, H, W)``)
to logits ``(B, classes)``, with the metadata it was exported with (:func:`load_exported`),
checked against the graph's own input dtype and shape and its output shape."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

from ..errors import ExportError, excerpt
from .archive import check_pt2
from .metadata import SUFFIXES, ExportMeta, from_onnx_props

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
    """The exported model at ``path`` as a function of a CPU batch of what its graph takes (see
    :func:`_as_taken`), returning CPU logits."""
    return _open(path, fmt)[0]


def _open(path: Path, fmt: str) -> tuple[Runner, ExportMeta]:
    """Read an exported file once: its metadata, and its model after every check that needs no
    inference (for a ``.pt2``, :func:`.archive.check_pt2` before torch loads anything)."""
    if fmt == "onnx":
        session = _onnx_session(path)
        meta = from_onnx_props(dict(session.get_modelmeta().custom_metadata_map), path)
        if len(session.get_inputs()) != 1 or len(session.get_outputs()) != 1:  # ours: images in, logits out
            raise ExportError(f"{path} takes {len(session.get_inputs())} inputs and gives {len(session.get_outputs())} "
                              "outputs; a finetune export takes one batch of images and gives one of logits.",
                              "Export the run again with `finetune export RUN_DIR`.")
        node = session.get_inputs()[0]
        _check_shapes(path, meta, tuple(node.shape), tuple(session.get_outputs()[0].shape))
        _check_dtype(path, meta, _ONNX_TYPES.get(node.type, node.type))

        def run_onnx(batch: torch.Tensor) -> torch.Tensor:
            array = _as_taken(batch, meta).numpy()
            return torch.from_numpy(session.run(None, {node.name: array})[0])

        return run_onnx, meta
    data = _read(path)  # checked and loaded from these bytes: the file is read once
    text = check_pt2(data, path)
    try:
        meta = ExportMeta.from_dict(json.loads(text), path)
    except (ValueError, RecursionError):
        raise ExportError(f"{path} has no usable finetune metadata (not JSON).", "Export the run again.") from None
    try:
        with _quiet_torch_export():
            exported = torch.export.load(io.BytesIO(data))
            program = exported.module()
        values = {node.name: node.meta.get("val") for node in exported.graph.nodes}
        signature = exported.graph_signature
        (inputs,), (outputs,) = ([values[name] for name in names]  # one image batch in, one logit batch out
                                 for names in (signature.user_inputs, signature.user_outputs))
        dtype, inputs, outputs = str(inputs.dtype).removeprefix("torch."), inputs.shape, outputs.shape
    except Exception as exc:  # torch's deserializer raises many types for a file it cannot use
        raise ExportError(f"{path} cannot be read as a finetune .pt2 export ({type(exc).__name__}: "
                          f"{excerpt(exc, 160)}).", "Export the run again.") from None
    _check_shapes(path, meta, tuple(inputs), tuple(outputs))
    _check_dtype(path, meta, dtype)

    def run_pt2(batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return program(_as_taken(batch, meta))

    return run_pt2, meta


_ONNX_TYPES = {"tensor(uint8)": "uint8", "tensor(float)": "float32"}


def _as_taken(batch: torch.Tensor, meta: ExportMeta) -> torch.Tensor:
    """A batch as the graph takes it: a CPU, contiguous copy; float32 for a float graph. A uint8
    graph takes uint8 pixels only: a float batch cast to uint8 would be silently wrong."""
    if meta.graph_dtype == "uint8" and batch.dtype != torch.uint8:
        raise ExportError(f"This exported model takes uint8 pixels (NCHW, {meta.graph_size[0]}x{meta.graph_size[1]}), "
                          f"not {batch.dtype} values.", "Pass the decoded images themselves (ExportMeta.graph_inputs).")
    return batch.detach().to("cpu", meta.graph_torch_dtype).contiguous()


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ExportError(f"Could not read {path}: {exc.strerror or exc}.", "Check that the file is readable.") from None


def _onnx_session(path: Path):
    """An onnxruntime session on the file, once it looks like an ONNX model (so that a file of
    another kind is named as such, not as a missing onnxruntime)."""
    with open(path, "rb") as f:
        head = f.read(2)
    # An ONNX file is a ModelProto, whose first field is ir_version: tag 0x08, then a small varint.
    if len(head) < 2 or head[0] != 0x08 or not 0 < head[1] < 0x80:
        raise ExportError(f"{path} cannot be read as an ONNX model: it does not start as one (another kind of file).",
                          "Pass a file that finetune export wrote.")
    ort = require("onnxruntime")
    try:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable files
        raise ExportError(f"{path} cannot be read as an ONNX model ({excerpt(exc, 200)}).",
                          "Export the run again (another --opset, if onnxruntime is older than the exporter).") from None


def _check_shapes(path: Path, meta: ExportMeta, inputs: tuple, outputs: tuple) -> None:
    """The graph takes ``(batch, 3, *meta.graph_size)`` and gives one logit per class name: checked
    before any photo is run, since a mismatch would fail inside the model or mislabel classes."""
    def fixed(dim: object) -> int | None:
        return dim if isinstance(dim, int) else None  # a symbolic (pt2) or named (ONNX) dimension: None

    taken = tuple(fixed(d) for d in inputs)
    if len(taken) != 4 or taken[1:] != (3, *meta.graph_size) or taken[0] != meta.batch:
        raise ExportError(
            f"{path}'s model takes inputs of shape {_shape(inputs)}, but its metadata says "
            f"{_shape((meta.batch or 'batch', 3, *meta.graph_size))}; photos would be prepared for another model.",
            "Export the run again with `finetune export RUN_DIR`.",
        )
    if len(outputs) != 2 or fixed(outputs[1]) != len(meta.class_names):
        raise ExportError(
            f"{path}'s model gives logits of shape {_shape(outputs)}, but its metadata names "
            f"{len(meta.class_names)} classes; every logit needs exactly one class name.",
            "Export the run again with `finetune export RUN_DIR`.",
        )


def _check_dtype(path: Path, meta: ExportMeta, dtype: str) -> None:
    """The graph takes the dtype its metadata names: uint8 pixels fed to a float graph (or floats to
    a uint8 one) would fail inside onnxruntime, or be normalised twice."""
    if dtype != meta.graph_dtype:
        raise ExportError(f"{path}'s model takes {excerpt(dtype)} inputs, but its metadata says {meta.graph_dtype}.",
                          "Export the run again with `finetune export RUN_DIR`.")


def _shape(dims: tuple) -> str:
    return "(" + ", ".join(str(d) if isinstance(d, int) else "batch" for d in dims) + ")"


@contextlib.contextmanager
def _quiet_torch_export():
    """Hold back torch.export's log lines while it loads: a file it cannot read is reported as one
    ExportError, not as its warning with a traceback followed by ours."""
    logger = logging.getLogger("torch.export")
    previous = logger.level
    logger.setLevel(logging.ERROR + 1)
    try:
        yield
    finally:
        logger.setLevel(previous)


def load_exported(path: str | Path) -> tuple[Runner, ExportMeta]:
    """An exported model file as ``(runner, metadata)``, checked before anything in it is loaded.

    Raises:
        ExportError: a file of another kind, one without finetune's metadata, one whose model does
            not match its metadata, one that loading would run code from, or a missing extra.
    """
    path = Path(path)
    if not path.exists():
        raise ExportError(f"{path} does not exist.", "Pass the path of a file that finetune export wrote.")
    if not path.is_file():  # by stat, never opened: a FIFO would wait for a writer forever
        raise ExportError(f"{path} is not a regular file.", "Pass the path of a file that finetune export wrote.")
    return _open(path, format_of(path))
