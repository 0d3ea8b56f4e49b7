"""Terminal progress for a training run: a rich progress bar plus one line per evaluated epoch.

:class:`TrainProgress` is a callback of the training loop (``finetune.training.callbacks.Callback``).
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .callbacks import Callback
from .state import TrainState, throughput

console = Console(stderr=True, soft_wrap=True)  # epoch lines stay one line in logs


class TrainProgress(Callback):
    """Progress bar over optimizer steps showing loss and images/s.

    Values are shown as of the last log interval: reading them more often would force a host
    sync on every step. Images/s is the run's so far, measured as ``summary.json``'s
    (:func:`~.state.throughput`: after the first step, training time only), so that the bar ends
    on the figure the summary states.

    Args:
        total_steps: optimizer steps of the whole run.
        completed: steps already taken (a resumed run).
        quiet: show nothing.
    """

    def __init__(self, total_steps: int, *, completed: int = 0, quiet: bool = False):
        self.quiet = quiet
        self._progress = Progress(
            TextColumn("epoch {task.fields[epoch]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[ips]} img/s"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=quiet,
            transient=False,
        )
        self._task = self._progress.add_task("train", total=total_steps, completed=completed, epoch=1, loss="-", ips="-")

    def __enter__(self) -> TrainProgress:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._progress.__exit__(*exc)

    def note(self, text: str) -> None:
        """Print a line above the bar (unless quiet)."""
        if not self.quiet:
            self._progress.console.print(text, highlight=False, markup=False)

    def on_step_end(self, state: TrainState) -> None:
        p = state.progress
        self._progress.update(self._task, completed=p.step, epoch=p.epoch)

    def on_log(self, state: TrainState, row: dict[str, Any]) -> None:
        self._progress.update(self._task, loss=f"{row['loss']:.4f}", ips=f"{throughput(state.progress, row['time_s']):,.0f}")

    def on_epoch_end(self, state: TrainState, row: dict[str, Any] | None) -> None:
        if row is not None:  # the epoch's end is the training time the summary counts at the finish
            p = state.progress
            self._progress.update(self._task, ips=f"{throughput(p, p.train_time_s):,.0f}")
        if self.quiet or row is None:
            return
        parts = [f"epoch {row['epoch']}", f"train loss {row['train_loss']:.4f}"]
        if row.get("train_acc1") is not None:
            parts.append(f"train acc {100 * row['train_acc1']:.2f}%")
        parts.append(f"test acc {100 * row['test_acc1']:.2f}% (top-5 {100 * row['test_acc5']:.2f}%)")
        parts.append(f"test loss {row['test_loss']:.4f}")
        if row.get("val_acc1") is not None:
            parts.append(f"val acc {100 * row['val_acc1']:.2f}%")
        parts.append(f"{row['time_s']:.1f} s")
        self._progress.console.print(" | ".join(parts))
