"""SIGTERM unwinds the process as Ctrl-C does, so that its temporary folders are removed on the way out.

Python's default for SIGTERM (a CI job's timeout, ``kill``) ends the process on the spot: a probe's
scratch folder in /dev/shm, which holds the optimized model's weights, would stay in RAM until a reboot.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any, NoReturn


class Terminated(BaseException):
    """SIGTERM arrived. A BaseException, like KeyboardInterrupt: no ``except Exception`` turns it into a
    report; ``finally`` blocks and context managers run as it climbs."""


def unwind_on_sigterm() -> None:
    """From now on SIGTERM raises :class:`Terminated` in the main thread (at its next Python instruction: a
    running onnxruntime call finishes first)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)


def _raise_terminated(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
    raise Terminated


def die_of_sigterm() -> NoReturn:
    """End the process as SIGTERM's default action would have (the parent sees "killed by signal 15")."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)
    os._exit(128 + signal.SIGTERM)  # where a process does not die of its own signal at once
