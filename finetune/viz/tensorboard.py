"""Live training curves and pictures in TensorBoard (``output.tensorboard: true``).

A callback of the training loop, like the run folder's recorder: every log line's loss, learning
rate and throughput, every evaluated epoch's accuracies and losses, and at the end the training
samples and the most confident mistakes, all under ``RUN_FOLDER/tensorboard``. Watch with
``tensorboard --logdir runs``. TensorBoard is an optional extra: ``pip install "finetune[tensorboard]"``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..training.callbacks import Callback
from ..training.state import TrainState
from ..errors import FinetuneError
from ..runs.folder import WRITE_ERRORS, write_error

if TYPE_CHECKING:  # an annotation only: viz reads no more of runs than its folder helpers
    from ..runs.rundir import RunDir

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

    Args:
        log_dir: where the event files go (``RUN_FOLDER/tensorboard``).
        rundir: the run folder; a failed write (a full disk) is its :class:`RunDirError`, which
            says that the last checkpoint is intact.

    Raises:
        FinetuneError: the ``tensorboard`` package is not installed.
    """

    def __init__(self, log_dir: str | Path, *, rundir: RunDir | None = None):
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self._writing = rundir.writing if rundir is not None else _writing
        with self._writing(f"write TensorBoard events to {self.log_dir}"):
            self.writer = SummaryWriter(log_dir=str(log_dir))

    def on_log(self, state: TrainState, row: dict[str, Any]) -> None:
        step = row["step"]
        with self._writing(f"write TensorBoard events to {self.log_dir}"):
            self.writer.add_scalar("train/loss", row["loss"], step)
            self.writer.add_scalar("train/lr", row["lr"], step)
            self.writer.add_scalar("train/images_per_s", row["images_per_s"], step)

    def on_epoch_end(self, state: TrainState, row: dict[str, Any] | None) -> None:
        if row is None:
            return
        pictures = None
        if state.progress.epoch > state.recipe.train.epochs:  # the last epoch: the pictures too
            from .visual import run_pictures

            pictures = run_pictures(state)
        with self._writing(f"write TensorBoard events to {self.log_dir}"):
            for key, tag in _EPOCH_SCALARS.items():
                if row.get(key) is not None:
                    self.writer.add_scalar(tag, row[key], row["epoch"])
            if pictures is not None:
                self.writer.add_images("samples/training_inputs", pictures.samples, row["epoch"], dataformats="NCHW")
                mistakes = pictures.mistakes[0]
                if len(mistakes):
                    self.writer.add_images("test/most_confident_mistakes", mistakes, row["epoch"], dataformats="NCHW")
            self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file; closing twice does nothing."""
        if self.writer is None:
            return
        writer, self.writer = self.writer, None
        with self._writing(f"write TensorBoard events to {self.log_dir}"):
            writer.close()


@contextlib.contextmanager
def _writing(action: str) -> Iterator[None]:
    """Without a run folder: a failed write is a :class:`RunDirError` naming what failed."""
    try:
        yield
    except WRITE_ERRORS as exc:
        raise write_error(action, exc) from None
