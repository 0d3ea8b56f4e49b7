"""The module an export traces: the model alone (it takes normalised float input), or the model
behind the run's own preprocessing (:class:`WithPreprocess`: it takes raw ``uint8`` pixels), so
that a runtime outside finetune (plain onnxruntime, TensorRT, a browser) needs nothing but the file."""

from __future__ import annotations

import torch
from torch import nn

from ..data.preprocess import Preprocess


class WithPreprocess(nn.Module):
    """``uint8 (B, 3, H, W)`` NCHW images at the stored size -> logits ``(B, classes)``.

    The steps are :class:`Preprocess`'s own, in the order an evaluation loader takes them on the
    device (:meth:`Preprocess.normalize`, then :meth:`Preprocess.resize_batch` to the model's size:
    F.interpolate with the run's interpolation, ``align_corners=False``, antialiased only when
    shrinking), so the traced graph computes what ``finetune eval`` fed the model. Every size is
    fixed when tracing: only the batch dimension is free.
    """

    def __init__(self, model: nn.Module, preprocess: Preprocess):
        super().__init__()
        self.model = model
        self.preprocess = preprocess  # a frozen dataclass, not a module: its fields are constants to the tracer
        mean, std = preprocess.stats(torch.device("cpu"))
        # Buffers, so the exported file holds them as weights (raw tensors); clones, since the
        # tensors Preprocess caches are shared with every loader.
        self.register_buffer("mean", mean.clone())  # (1, 3, 1, 1)
        self.register_buffer("std", std.clone())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pre = self.preprocess
        x = pre.to_layout(pre.normalize(images, stats=(self.mean, self.std)))  # (B, 3, H, W) float32
        return self.model(pre.finish(pre.resize_batch(x)))  # resized to (B, 3, *pre.size) first


def graph_module(model: nn.Module, preprocess: Preprocess, graph_dtype: str) -> nn.Module:
    """What to trace for a graph that takes ``graph_dtype`` (``uint8``: raw pixels, preprocessing
    inside; ``float32``: the model alone, on normalised input at its size), in eval mode."""
    return (WithPreprocess(model, preprocess) if graph_dtype == "uint8" else model).eval()
