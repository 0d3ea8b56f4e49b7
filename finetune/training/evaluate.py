"""Scoring a model on one split: top-1, top-5, loss, per-class accuracy and the confusion matrix.

Used by the training engine after each evaluated epoch and by ``finetune eval``; it does not import
the training loop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.loader import BatchLoader
from .device import autocast
from .distributed import SINGLE, Processes


@dataclass
class EvalResult:
    """What :func:`evaluate` measured.

    Attributes:
        acc1: top-1 accuracy, 0..1.
        acc5: top-5 accuracy (top-k for fewer than 5 classes), 0..1.
        loss: mean cross-entropy.
        per_class_acc: top-1 accuracy of each true class; ``None`` for a class with no images in
            the split (not 0: nothing was misclassified).
        confusion: ``confusion[true][predicted]`` image counts.
        images: images scored.
    """

    acc1: float
    acc5: float
    loss: float
    per_class_acc: list[float | None]
    confusion: list[list[int]]
    images: int

    def as_dict(self, prefix: str) -> dict[str, Any]:
        """``{prefix}_acc1``, ``{prefix}_acc5`` and ``{prefix}_loss``, for a metrics line."""
        return {f"{prefix}_acc1": self.acc1, f"{prefix}_acc5": self.acc5, f"{prefix}_loss": self.loss}

    def to_dict(self) -> dict[str, Any]:
        """Every field, as plain JSON types."""
        return dataclasses.asdict(self)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: BatchLoader,
    num_classes: int,
    *,
    amp_dtype: torch.dtype | None = None,
    processes: Processes = SINGLE,
    on_batch: Callable[[int, int], None] | None = None,
) -> EvalResult:
    """Top-1, top-5, mean cross-entropy, per-class accuracy and the confusion matrix.

    Everything accumulates on the device; the host reads the totals once at the end. With several
    processes each scores its own part of the split and the counts are summed across them, so the
    result is the whole split's, exactly (no image padded in or counted twice).

    ``on_batch(done, total)`` is called after each batch is queued, with this process's batches
    scored so far and its total (``len(loader)``), e.g. to move a progress bar; it reads nothing
    back from the device, so calling it costs no wait.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.long, device=device)
    loss_sum = torch.zeros((), dtype=torch.float32 if device.type == "mps" else torch.float64, device=device)
    top5_hits = torch.zeros((), dtype=torch.long, device=device)
    k = min(5, num_classes)
    total = len(loader) if on_batch is not None else 0
    for done, (x, y) in enumerate(loader, start=1):
        with autocast(device, amp_dtype):
            logits = model(x)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        top = logits.topk(k, dim=1).indices  # (B, k)
        top5_hits += (top == y[:, None]).any(dim=1).sum()
        confusion += torch.bincount(y * num_classes + top[:, 0], minlength=num_classes * num_classes)
        if on_batch is not None:
            on_batch(done, total)
    model.train(was_training)
    processes.sum_(confusion, loss_sum, top5_hits)
    matrix = confusion.view(num_classes, num_classes).cpu()
    n = int(matrix.sum())
    totals = matrix.sum(1)
    per_class = [float(hits) / int(total) if total else None for hits, total in zip(matrix.diag(), totals)]
    return EvalResult(
        acc1=float(matrix.diag().sum()) / max(n, 1),
        acc5=float(top5_hits) / max(n, 1),
        loss=float(loss_sum) / max(n, 1),
        per_class_acc=per_class,
        confusion=matrix.tolist(),
        images=n,
    )
