"""What an exported model needs to be used as the run used it: input size, mean, std, class names,
the size the run stored its images at, and the resize policy (:class:`ExportMeta`), kept in an
ONNX file's ``metadata_props`` or inside a ``.pt2`` (and in a JSON file beside it)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..data.preprocess import RESIZE_POLICIES, Preprocess
from ..errors import ExportError, excerpt
from ..runs.folder import STORED_SIDE

FORMATS = ("onnx", "pt2")
SUFFIXES = {".onnx": "onnx", ".pt2": "pt2"}
PREFIX = "finetune."  # metadata keys of an ONNX file: finetune.<field>, each value JSON
PT2_ENTRY = "finetune.json"  # the metadata's name inside a .pt2 archive (torch.export.save's extra_files)


@dataclass(frozen=True)
class ExportMeta:
    """The preprocessing and labels an exported model travels with."""

    input_size: tuple[int, int]  # (H, W) the model takes
    mean: tuple[float, ...]  # per-channel mean of x / 255
    std: tuple[float, ...]  # per-channel std of x / 255
    class_names: tuple[str, ...]  # one per logit, in logit order
    stored_size: tuple[int, int] | None  # (H, W) the run kept its images at; None: resize straight to input_size
    resize: str = "center_crop"  # how a photo of another shape is brought to stored_size
    interpolation: str = "bilinear"
    batch: int | None = None  # the fixed batch size, or None for a dynamic batch dimension
    arch: str | None = None  # timm architecture, for the reader's information
    model: str = "final"  # which of the run's models: "best" (on validation) or "final"

    def preprocess(self) -> Preprocess:
        """The :class:`Preprocess` that makes this model's input from decoded photos, as the run's
        evaluation made it."""
        return Preprocess(size=self.input_size, mean=self.mean, std=self.std, load_size=self.stored_size,
                          resize=self.resize, interpolation=self.interpolation)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, data: Any, where: Path) -> ExportMeta:
        """Metadata read from a file, checked field by field (nothing read is trusted as it stands)."""
        try:
            assert isinstance(data, dict)
            meta = cls(
                input_size=_size(data["input_size"]), mean=_floats(data["mean"]), std=_floats(data["std"]),
                class_names=tuple(_str(c) for c in data["class_names"]),
                stored_size=None if data.get("stored_size") is None else _size(data["stored_size"], STORED_SIDE),
                resize=_str(data.get("resize", "center_crop")), interpolation=_str(data.get("interpolation", "bilinear")),
                batch=None if data.get("batch") is None else _positive(data["batch"]),
                arch=None if data.get("arch") is None else _str(data["arch"]), model=_str(data.get("model", "final")),
            )
            assert meta.resize in RESIZE_POLICIES and meta.interpolation in ("bilinear", "bicubic", "nearest")
            assert len(meta.mean) == len(meta.std) == 3 and all(s > 0 for s in meta.std) and meta.class_names
        except (AssertionError, KeyError, TypeError, ValueError) as exc:
            raise ExportError(f"{where} has no usable finetune metadata ({type(exc).__name__}: {str(exc)[:200]}).",
                              "Export the run again with `finetune export RUN_DIR`.") from None
        return meta


def onnx_props(meta: ExportMeta) -> dict[str, str]:
    """The metadata as ONNX ``metadata_props``: ``finetune.<field>`` -> JSON value."""
    return {PREFIX + key: json.dumps(value) for key, value in asdict(meta).items()}


def from_onnx_props(props: dict[str, str], where: Path) -> ExportMeta:
    """The inverse of :func:`onnx_props`."""
    try:
        data = {k.removeprefix(PREFIX): json.loads(v) for k, v in props.items() if k.startswith(PREFIX)}
    except (ValueError, RecursionError):
        data = None
    return ExportMeta.from_dict(data, where)


def sidecar(path: Path) -> Path:
    """The JSON file beside an exported ``.pt2``: ``model.pt2`` -> ``model.pt2.json``."""
    return path.with_name(path.name + ".json")


def _size(value: Any, bounds: tuple[int, int] = (1, 16384)) -> tuple[int, int]:
    assert isinstance(value, (list, tuple)) and len(value) == 2, "a size is [height, width]"
    return _positive(value[0], bounds), _positive(value[1], bounds)


def _positive(value: Any, bounds: tuple[int, int] = (1, 65536)) -> int:
    low, high = bounds
    assert type(value) is int and low <= value <= high, f"{excerpt(value)} is not a size from {low} to {high}"
    return value


def _floats(value: Any) -> tuple[float, ...]:
    assert isinstance(value, (list, tuple)), f"{excerpt(value)} is not a list"
    out = tuple(float(v) for v in value if isinstance(v, (int, float)) and not isinstance(v, bool))
    assert len(out) == len(value) and all(math.isfinite(v) for v in out), f"{excerpt(value)} is not a list of numbers"
    return out


def _str(value: Any) -> str:
    assert isinstance(value, str), f"{excerpt(value)} is not a string"
    return value
