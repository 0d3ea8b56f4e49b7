"""Live training curves and pictures in TensorBoard (``output.tensorboard: true``).

A callback of the training loop, like the run folder's recorder: every log line's loss, learning
rate and throughput, every evaluated epoch's accuracies and losses, and at the end the training
samples and the most confident mistakes, all under ``RUN_FOLDER/tensorboard``. Watch with
``tensorboard --logdir runs``. TensorBoard is an optional extra: ``pip install "finetune[tensorboard]"``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .engine import Callback, TrainState
from .errors import FinetuneError

_EPOCH_SCALARS = {
    "train_loss": "train/epoch_loss", "train_acc1": "train/acc1", "test_acc1": "test/acc1",
    "test_acc5": "test/acc5", "test_loss": "test/loss", "val_acc1": "val/acc1", "val_loss": "val/loss",
}


def require_tensorboard() -> None:
    """Raise a :class:`FinetuneError` unless the ``tensorboard`` package is installed."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise FinetuneError(
            "output.tensorboard is true, but the tensorboard package is not installed.",
            'Install it (pip install "finetune[tensorboard]", or pip install tensorboard), or set '
            "output.tensorboard=false.",
        ) from None


class TensorBoardLogger(Callback):
    """Writes a run's metrics and pictures for TensorBoard.

    Raises:
        FinetuneError: the ``tensorboard`` package is not installed.
    """

    def __init__(self, log_dir: str | Path):
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def on_log(self, state: TrainState, row: dict[str, Any]) -> None:
        step = row["step"]
        self.writer.add_scalar("train/loss", row["loss"], step)
        self.writer.add_scalar("train/lr", row["lr"], step)
        self.writer.add_scalar("train/images_per_s", row["images_per_s"], step)

    def on_epoch_end(self, state: TrainState, row: dict[str, Any] | None) -> None:
        if row is None:
            return
        for key, tag in _EPOCH_SCALARS.items():
            if row.get(key) is not None:
                self.writer.add_scalar(tag, row[key], row["epoch"])
        if state.progress.epoch > state.recipe.train.epochs:  # the last epoch: the pictures too
            from .visual import run_pictures

            pictures = run_pictures(state)
            self.writer.add_images("samples/training_inputs", pictures.samples, row["epoch"], dataformats="NCHW")
            mistakes = pictures.mistakes[0]
            if len(mistakes):
                self.writer.add_images("test/most_confident_mistakes", mistakes, row["epoch"], dataformats="NCHW")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
