"""What the training loop calls at fixed points: :class:`Callback` (hooks that do nothing unless
overridden), :class:`Callbacks` (several in order) and :class:`StopRequested`, which the loop raises
at a step or epoch boundary after a stop was asked for.

The run folder's recorder, the progress bar and the TensorBoard logger are callbacks; so is anything
a test or a benchmark wants to observe, without the loop knowing about them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .state import TrainState


class Callback:
    """Hooks the loop calls; each does nothing unless a subclass overrides it."""

    def on_log(self, state: TrainState, row: dict[str, Any]) -> None:
        """Every ``train.log_every`` optimizer steps, with that interval's metrics line."""

    def on_step_end(self, state: TrainState) -> None:
        """After every optimizer step. Keep it on the host: a device sync here would cost one per
        step (the run folder's checkpoints sync, but only on the steps they are due)."""

    def on_epoch_end(self, state: TrainState, row: dict[str, Any] | None) -> None:
        """After each epoch, with its evaluation line (``None`` for an epoch not evaluated).

        ``state.progress`` already points at the next epoch, so a checkpoint taken here resumes there.
        """


class Callbacks(Callback):
    """Several callbacks called in order."""

    def __init__(self, callbacks: Sequence[Callback]):
        self.callbacks = list(callbacks)

    def on_log(self, state: TrainState, row: dict[str, Any]) -> None:
        for c in self.callbacks:
            c.on_log(state, row)

    def on_step_end(self, state: TrainState) -> None:
        for c in self.callbacks:
            c.on_step_end(state)

    def on_epoch_end(self, state: TrainState, row: dict[str, Any] | None) -> None:
        for c in self.callbacks:
            c.on_epoch_end(state, row)


class StopRequested(Exception):
    """Raised by the loop at a step or epoch boundary after ``state.stop_requested`` was set
    (SIGTERM, Ctrl-C); the callbacks have already been called for that boundary."""
