"""A rich progress bar on stderr for probes that take longer than a second; silent when stderr is no terminal."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

DELAY_SECONDS = 1.0


@contextmanager
def progress_bar(description: str, enabled: bool | None = None) -> Iterator[Callable[[int, int], None] | None]:
    """Yield a ``(done, total)`` callback, or None when stderr is not a terminal (CI logs stay clean).

    The bar appears only once a second has passed, so quick probes print nothing.
    """
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import Progress, TaskID

    from bncheck import watchdog

    start = time.monotonic()
    bar: Progress | None = None
    task: TaskID | None = None

    def update(done: int, total: int) -> None:
        nonlocal bar, task
        if bar is None:
            if time.monotonic() - start < DELAY_SECONDS:
                return
            bar = Progress(console=Console(stderr=True), transient=True)
            bar.start()
            watchdog.at_stop(bar.stop)  # the terminal's cursor back before a stop for memory ends the process
            task = bar.add_task(description, total=total)
        assert task is not None
        bar.update(task, completed=done, total=total)

    try:
        yield update
    finally:
        if bar is not None:
            bar.stop()
