"""onnxruntime runs that a stop signal ends at their next node, not after the whole run.

Every session run of bncheck's passes options from :func:`run_options`; once SIGINT or SIGTERM arrives,
bncheck.termination's watcher sets their ``terminate`` flag, the run returns an error within a node's time
(a Loop's iterations included), and the signal's handler then unwinds the process through its clean-ups.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

from bncheck import termination


class _Live:
    """The run options handed out and not yet freed, and whether a stop has arrived."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.options: weakref.WeakSet[Any] = weakref.WeakSet()
        self.stopped = False


_live = _Live()


def run_options() -> Any:
    """New onnxruntime RunOptions that a stop signal terminates (already terminated after one)."""
    import onnxruntime as ort

    options = ort.RunOptions()
    with _live.lock:
        options.terminate = _live.stopped
        _live.options.add(options)
    return options


def _stop_all() -> None:
    with _live.lock:
        _live.stopped = True
        for options in list(_live.options):
            options.terminate = True


termination.on_stop(_stop_all)
