"""A rich progress bar on stderr for commands that take longer than a second; silent when stderr is no terminal."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

DELAY_SECONDS = 1.0


class Bar:
    """What :func:`progress_bar` yields at a terminal: called with ``(done, total)`` steps, and told each new
    stage of a command by :meth:`stage`. It shows once :data:`DELAY_SECONDS` have passed since it was made,
    whether or not a step has ended by then (loading a large model or building its session can take longer
    than the first step), and shows the latest stage and steps from then on."""

    def __init__(self, description: str) -> None:
        self._description = description
        self._done = 0
        self._total: int | None = None  # unknown until the stage's first steps: an indeterminate bar
        self._lock = threading.Lock()  # the timer's thread shows the bar, the command's thread updates it
        self._bar: Any = None  # rich.progress.Progress once shown
        self._task: Any = None
        self._closed = False
        self._timer = threading.Timer(DELAY_SECONDS, self._show)
        self._timer.daemon = True
        self._timer.start()

    def __call__(self, done: int, total: int) -> None:
        with self._lock:
            self._done, self._total = done, total
            self._refresh()

    def stage(self, description: str) -> None:
        """A new stage: its description, its steps unknown until it reports some, its time from now."""
        with self._lock:
            self._description, self._done, self._total = description, 0, None
            if self._bar is not None:  # a new task: rich keeps a known total once set
                self._bar.remove_task(self._task)
                self._task = self._bar.add_task(description, total=None)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._timer.cancel()
            if self._bar is not None:
                self._bar.stop()

    def _show(self) -> None:
        with self._lock:
            if self._closed or self._bar is not None:
                return
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

            from bncheck import watchdog

            bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),  # pulses while the stage's steps are unknown
                TaskProgressColumn(text_format="{task.completed:.0f}/{task.total:.0f}", text_format_no_percentage=""),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            bar.start()
            watchdog.at_stop(bar.stop)  # the terminal's cursor back before a stop for memory ends the process
            self._bar, self._task = bar, bar.add_task(self._description, total=self._total, completed=self._done)

    def _refresh(self) -> None:  # with the lock held
        if self._bar is not None:
            self._bar.update(self._task, description=self._description, completed=self._done, total=self._total)


@contextmanager
def progress_bar(description: str, enabled: bool | None = None) -> Iterator[Bar | None]:
    """Yield a :class:`Bar`, or None when stderr is not a terminal (CI logs stay clean). Nothing shows when
    the block ends within :data:`DELAY_SECONDS`, so quick commands print nothing."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        yield None
        return
    bar = Bar(description)
    try:
        yield bar
    finally:
        bar.close()
