"""A rich progress bar on stderr for probes that take longer than a second; silent when stderr is no terminal."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

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
    from rich.progress import Progress

    start = time.monotonic()
    state: dict[str, Any] = {"progress": None, "task": None}

    def update(done: int, total: int) -> None:
        if state["progress"] is None:
            if time.monotonic() - start < DELAY_SECONDS:
                return
            state["progress"] = Progress(console=Console(stderr=True), transient=True)
            state["progress"].start()
            state["task"] = state["progress"].add_task(description, total=total)
        state["progress"].update(state["task"], completed=done, total=total)

    try:
        yield update
    finally:
        if state["progress"] is not None:
            state["progress"].stop()
