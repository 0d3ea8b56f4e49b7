"""What an exported model needs to be used as the run used it (:class:`ExportMeta`): the run's
:class:`~finetune.data.preprocess.Preprocess` (input size, mean, std, the size the run stored its
images at, resize policy, interpolation), the class names, and what the graph itself takes (uint8
pixels or normalised floats, NCHW, at which size); kept in an ONNX file's ``metadata_props`` or
inside a ``.pt2`` (and in a JSON file beside it), and checked field by field when read."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..data.preprocess import INTERPOLATIONS, RESIZE_POLICIES, Preprocess
from ..errors import ExportError, excerpt
from ..runs.folder import STORED_SIDE

FORMATS = ("onnx", "pt2")
SUFFIXES = {".onnx": "onnx", ".pt2": "pt2"}
PREFIX = "finetune."  # metadata keys of an ONNX file: finetune.<field>, each value JSON
PT2_ENTRY = "finetune.json"  # the metadata's name inside a .pt2 archive (torch.export.save's extra_files)
GRAPH_DTYPES = ("uint8", "float32")  # what a graph takes: raw pixels (preprocessing inside) or normalised floats
LAYOUT = "NCHW"  # the only layout finetune exports: (batch, 3, height, width)


@dataclass(frozen=True)
class ExportMeta:
    """The preprocessing and labels an exported model travels with, and the input its graph takes."""

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
    graph_dtype: str = "float32"  # "uint8": raw pixels, normalised and resized inside; "float32": normalised input
    graph_size: tuple[int, int] | None = None  # (H, W) of the graph's input; None: as graph_dtype implies
    graph_layout: str = LAYOUT

    def __post_init__(self):
        # Written out in full, so that a reader of the file sees the graph's input without rules.
        object.__setattr__(self, "graph_size", self.graph_size or self.implied_graph_size())

    def implied_graph_size(self) -> tuple[int, int]:
        """The graph's (H, W): a uint8 graph takes images at the stored size (as the run kept
        them, or the model's size when it kept none), a float graph the model's own input."""
        return (self.stored_size or self.input_size) if self.graph_dtype == "uint8" else self.input_size

    @classmethod
    def of(cls, pre: Preprocess, class_names: Sequence[str], *, graph_dtype: str = "uint8", batch: int | None = None,
           arch: str | None = None, model: str = "final") -> ExportMeta:
        """The metadata of a graph exported from a model whose preprocessing is ``pre``."""
        return cls(input_size=pre.size, mean=pre.mean, std=pre.std, class_names=tuple(class_names),
                   stored_size=pre.load_size, resize=pre.resize, interpolation=pre.interpolation, batch=batch,
                   arch=arch, model=model, graph_dtype=graph_dtype)

    def preprocess(self) -> Preprocess:
        """The :class:`Preprocess` that makes this model's input from decoded photos, as the run's
        evaluation made it (the inverse of :meth:`of`)."""
        return Preprocess(size=self.input_size, mean=self.mean, std=self.std, load_size=self.stored_size,
                          resize=self.resize, interpolation=self.interpolation)

    @property
    def graph_torch_dtype(self) -> torch.dtype:
        return torch.uint8 if self.graph_dtype == "uint8" else torch.float32

    def graph_inputs(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """Decoded photos (``uint8 (3, H, W)``, any size) as the graph's input ``(B, 3, *graph_size)``:
        for a uint8 graph, each brought to ``graph_size`` by the run's resize policy (the rest
        happens inside the graph); for a float graph, the whole :class:`Preprocess`."""
        pre = self.preprocess()
        if self.graph_dtype == "uint8":
            return torch.stack([pre.resize_uint8(image, self.graph_size) for image in images])
        return pre(images)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, data: Any, where: Path) -> ExportMeta:
        """Metadata read from a file, checked field by field (nothing read is trusted as it stands).
        Explicit checks, not asserts: ``python -O`` must not make a damaged file usable.
        Files exported before graphs took uint8 have no ``graph_*`` fields: they take floats."""
        try:
            if not isinstance(data, dict):
                raise _Invalid(f"{excerpt(data, 40)} is not a table of fields")
            missing = [key for key in ("input_size", "mean", "std", "class_names") if key not in data]
            if missing:
                raise _Invalid(f"no {missing[0]}")
            names = data["class_names"]
            if not isinstance(names, list) or not names:
                raise _Invalid(f"class_names {excerpt(names, 40)} is not a list of names")
            meta = cls(
                input_size=_size(data["input_size"]), mean=_stats(data["mean"], "mean"), std=_stats(data["std"], "std"),
                class_names=tuple(_str(c) for c in names),
                stored_size=None if data.get("stored_size") is None else _size(data["stored_size"], STORED_SIDE),
                resize=_choice(data.get("resize", "center_crop"), RESIZE_POLICIES, "resize"),
                interpolation=_choice(data.get("interpolation", "bilinear"), INTERPOLATIONS, "interpolation"),
                batch=None if data.get("batch") is None else _positive(data["batch"]),
                arch=None if data.get("arch") is None else _str(data["arch"]), model=_str(data.get("model", "final")),
                graph_dtype=_choice(data.get("graph_dtype", "float32"), GRAPH_DTYPES, "graph_dtype"),
                graph_size=None if data.get("graph_size") is None else _size(data["graph_size"]),
                graph_layout=_choice(data.get("graph_layout", LAYOUT), (LAYOUT,), "graph_layout"),
            )
            if meta.graph_size != meta.implied_graph_size():
                raise _Invalid(f"graph_size {list(meta.graph_size)} is not the size a {meta.graph_dtype} graph of "
                               f"this model takes ({list(meta.implied_graph_size())})")
        except _Invalid as exc:
            raise ExportError(f"{where} has no usable finetune metadata ({str(exc)[:200]}).",
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


class _Invalid(ValueError):
    """One field of the metadata that is not what finetune export writes."""


def _size(value: Any, bounds: tuple[int, int] = (1, 16384)) -> tuple[int, int]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise _Invalid(f"{excerpt(value)} is not a size [height, width]")
    return _positive(value[0], bounds), _positive(value[1], bounds)


def _positive(value: Any, bounds: tuple[int, int] = (1, 65536)) -> int:
    low, high = bounds
    if type(value) is not int or not low <= value <= high:
        raise _Invalid(f"{excerpt(value)} is not a size from {low} to {high}")
    return value


def _stats(value: Any, name: str) -> tuple[float, ...]:
    """Three finite numbers (a std also above zero: it divides)."""
    numbers = isinstance(value, (list, tuple)) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    try:
        floats = tuple(float(v) for v in value) if numbers else ()
    except OverflowError:  # an integer beyond any float
        floats = ()
    if len(floats) != 3 or not all(math.isfinite(v) for v in floats):
        raise _Invalid(f"{name} {excerpt(value)} is not three finite numbers")
    if name == "std" and not all(v > 0 for v in floats):
        raise _Invalid(f"std {excerpt(value)} has a value that is not above zero")
    return floats


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"{excerpt(value)} is not a string")
    return value


def _choice(value: Any, allowed: Sequence[str], name: str) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise _Invalid(f"{name} {excerpt(value)} is not one of {', '.join(allowed)}")
    return value
