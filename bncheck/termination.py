"""SIGTERM unwinds the process as Ctrl-C does, so that its temporary folders are removed on the way out, and
both stop a long call into a native library at once.

Python's default for SIGTERM (a CI job's timeout, ``kill``) ends the process on the spot: a probe's
scratch folder in /dev/shm, which holds the optimized model's weights, would stay in RAM until a reboot.

Python runs a signal's handler only between two bytecodes of the main thread, so a stop that arrives while
the main thread is inside an onnxruntime run waits for the run to end: seconds at a large batch, more on a
large model, possibly longer than a CI runner waits before it kills. :func:`watch_stop_signals` wakes a
thread as soon as the signal arrives, which tells such a call to stop (:func:`on_stop`); the handler then
unwinds as before.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any, NoReturn

#: the signals that stop bncheck: Ctrl-C and SIGTERM
STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})


class Terminated(BaseException):
    """SIGTERM arrived. A BaseException, like KeyboardInterrupt: no ``except Exception`` turns it into a
    report; ``finally`` blocks and context managers run as it climbs."""


def unwind_on_sigterm() -> None:
    """From now on SIGTERM raises :class:`Terminated` in the main thread (at its next Python instruction: a
    running onnxruntime call is stopped first where :func:`watch_stop_signals` watches)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)


def _raise_terminated(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
    raise Terminated


def die_of(signum: int) -> NoReturn:
    """End the process as the signal's default action would have: the parent sees "killed by signal N"
    (exit status 128 + N in a shell), so that a shell loop over models stops at Ctrl-C instead of going on."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    os._exit(128 + signum)  # where a process does not die of its own signal at once


class _Watch:
    """The process's stop watch: the hooks to call once a stop signal arrives, and whether one has."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.hooks: list[Callable[[], None]] = []
        self.stopped = False
        self.watching = False


_watch = _Watch()


def on_stop(hook: Callable[[], None]) -> None:
    """Call ``hook()`` from the watcher thread once a stop signal arrives, or at once if one already has
    (hooks run once; exceptions they raise are dropped). Where :func:`watch_stop_signals` was never called,
    the hooks never run and a native call finishes first, as without them."""
    with _watch.lock:
        _watch.hooks.append(hook)
        stopped = _watch.stopped
    if stopped:
        _call(hook)


def watch_stop_signals() -> None:
    """From now on a thread wakes as soon as SIGINT or SIGTERM arrives and runs the :func:`on_stop` hooks;
    the signals' Python handlers still run in the main thread as before.

    In bncheck's own processes only (the console, ``--jobs`` workers), from their main thread: the wakeup
    file descriptor (signal.set_wakeup_fd) is one per process, and the Python API leaves its caller's alone."""
    if threading.current_thread() is not threading.main_thread():
        return
    with _watch.lock:
        if _watch.watching:
            return
        _watch.watching = True
    read_end, write_end = os.pipe()
    try:
        os.set_blocking(write_end, False)  # the C-level handler must never block on a full pipe
        signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    except (AttributeError, ValueError, OSError):  # Windows: no set_blocking before 3.12, sockets only
        os.close(read_end)
        os.close(write_end)
        with _watch.lock:
            _watch.watching = False
        return
    threading.Thread(target=_wait_for_stop, args=(read_end,), name="bncheck-stop-watch", daemon=True).start()


def _wait_for_stop(read_end: int) -> None:
    while True:
        try:
            arrived = os.read(read_end, 64)
        except InterruptedError:
            continue
        except OSError:
            return
        if not arrived:
            return
        if any(number in STOP_SIGNALS for number in arrived):
            with _watch.lock:
                first = not _watch.stopped
                _watch.stopped = True
                hooks = list(_watch.hooks)
            if first:
                for hook in hooks:
                    _call(hook)


def _call(hook: Callable[[], None]) -> None:
    with contextlib.suppress(Exception):  # a hook's failure must not end the watch or hide the stop
        hook()
