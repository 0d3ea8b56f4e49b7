"""Terminal progress for the long steps outside the training loop: decoding images, scoring a
test set, exporting, drawing a report.

:class:`Activity` is a context manager that the commands wrap such a step in. On a terminal it
shows a rich progress bar while the step knows how many things it has to do (images, batches,
runs) and a spinner with a text saying what it is doing while it does not, updated through
:meth:`Activity.update` (which the step's callback calls). Off a terminal (a log, CI, a pipe) it
prints at most one plain line, when it starts, and nothing per item. It writes to stderr only:
stdout carries the commands' results. On the way out, normally or not (an exception, Ctrl-C,
SIGTERM), the bar is taken down and the cursor shown again.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from ..data.decode import decode_progress
from .progress import console as stderr_console


class _WhenCounted(ProgressColumn):
    """A column shown only while the step knows its total; blank under a spinner."""

    def __init__(self, column: ProgressColumn):
        super().__init__()
        self.column = column

    def render(self, task: Task) -> Any:
        return self.column.render(task) if task.total is not None else Text("")


class Activity:
    """A progress bar or a spinner on stderr for one long step, or one plain line off a terminal.

    Args:
        line: printed first, on a terminal or not (``None``: nothing), as plain text: the
            "doing X ..." line a command announces its step with.
        text: what the spinner (or the bar) says until :meth:`update` says otherwise.
        total: how many things there are to do, when known from the start (a bar); ``None``: a
            spinner.
        quiet: show and print nothing.
        console: where to draw (default: stderr's, shared with the training bar).
        on_update: show nothing until the first :meth:`update` (for a step that may turn out to
            be quick, such as images that come from the decode cache).
    """

    def __init__(self, line: str | None = None, text: str = "", *, total: int | None = None, quiet: bool = False,
                 console: Console | None = None, on_update: bool = False):
        self.console = console or stderr_console
        self.quiet = quiet
        self.line = line
        self.live = not quiet and self.console.is_terminal
        self._text, self._total = text, total
        self._wait = on_update
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._previous_sigterm: Any = None
        self._closed = False

    def __enter__(self) -> Activity:
        if self.line is not None and not self.quiet:
            self.console.print(self.line, highlight=False, markup=False, emoji=False)
        if self.live and not self._wait:
            self._start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Take the bar down and put back the SIGTERM handler; safe to call twice."""
        self._closed = True
        progress, self._progress = self._progress, None
        try:
            if progress is not None:
                progress.stop()
        finally:
            if self._previous_sigterm is not None:
                signal.signal(signal.SIGTERM, self._previous_sigterm)
                self._previous_sigterm = None

    def update(self, text: str | None = None, done: int = 0, total: int | None = None) -> None:
        """Say where the step is: ``done`` of ``total`` things (a bar), or only what it is doing
        (``total`` ``None``: a spinner). ``text`` ``None`` keeps the current text. A new text or
        total starts the bar's clock again; the same ones only move it. Does nothing off a terminal."""
        if not self.live or self._closed:
            return
        text = self._text if text is None else text
        if self._progress is None:
            self._text, self._total = text, total
            self._start()
        assert self._progress is not None and self._task is not None
        if (text, total) != (self._text, self._total):
            self._text, self._total = text, total
            self._progress.remove_task(self._task)
            self._task = self._progress.add_task(text, total=total)
        self._progress.update(self._task, completed=done)

    @contextlib.contextmanager
    def decoding(self) -> Iterator[None]:
        """Within the block, images being decoded into memory (and into the decode cache) move
        the bar: ``decoding N images``, per chunk of files."""
        with decode_progress(lambda decoded, total: self.update(f"decoding {total:,} images", decoded, total)):
            yield

    def _start(self) -> None:
        """Start drawing; while drawing, SIGTERM (when nothing else handles it) stops the step as
        Ctrl-C does, so that the terminal is left clean and the command says it was interrupted."""
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}", markup=False),
            _WhenCounted(BarColumn()),
            _WhenCounted(MofNCompleteColumn()),
            TimeElapsedColumn(),
            _WhenCounted(TimeRemainingColumn()),
            console=self.console,
            transient=True,  # the "doing X ..." line stays; the results follow it
            redirect_stdout=False,  # stdout is the results': never drawn over or captured
        )
        self._task = self._progress.add_task(self._text, total=self._total)
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            self._previous_sigterm = signal.signal(signal.SIGTERM, _interrupt)
        try:
            self._progress.start()
        except BaseException:
            self.close()
            raise


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")
