"""SIGTERM unwinds the process as Ctrl-C does, so that its temporary folders are removed on the way out, and
both stop a long call into a native library at once.

Python's default for SIGTERM (a CI job's timeout, ``kill``) ends the process on the spot: a probe's
scratch folder in /dev/shm, which holds the optimized model's weights, would stay in RAM until a reboot.

Python runs a signal's handler only between two bytecodes of the main thread, so a stop that arrives while
the main thread is inside an onnxruntime run waits for the run to end: seconds at a large batch, more on a
large model, possibly longer than a CI runner waits before it kills. :func:`watch_stop_signals` wakes a
thread as soon as the signal arrives, which tells such a call to stop (:func:`on_stop`); the handler then
unwinds as before. A call no hook can stop (Keras's XLA computation of a 3D GAN ran on for minutes after
`timeout` sent SIGTERM) leaves the handler waiting: after :data:`STOP_GRACE` seconds the thread runs the
clean-ups given to :func:`before_forced_stop` and ends the process itself (exit status 128 + the signal).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, NoReturn

#: the signals that stop bncheck: Ctrl-C and SIGTERM
STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})
#: seconds the main thread has to start handling a stop signal before the watcher ends the process: a stopped
#: onnxruntime run returns within milliseconds, a native call nothing can stop may not for minutes
STOP_GRACE = 3.0


class Terminated(BaseException):
    """SIGTERM arrived. A BaseException, like KeyboardInterrupt: no ``except Exception`` turns it into a
    report; ``finally`` blocks and context managers run as it climbs."""


def unwind_on_sigterm() -> None:
    """From now on SIGTERM raises :class:`Terminated` in the main thread (at its next Python instruction: a
    running onnxruntime call is stopped first where :func:`watch_stop_signals` watches)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, _interrupted)


def _raise_terminated(signum: int, frame: Any) -> None:
    _watch.handled = True
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
    raise Terminated


def _interrupted(signum: int, frame: Any) -> None:
    """Python's own Ctrl-C handler (KeyboardInterrupt), noting that the main thread is handling the stop."""
    _watch.handled = True
    signal.default_int_handler(signum, frame)


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
        self.handled = False  # the main thread runs a stop signal's handler: it unwinds by itself
        self.forced: list[Callable[[], None]] = []


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


def before_forced_stop(cleanup: Callable[[], None]) -> None:
    """Run ``cleanup`` (once, from the watcher thread) before the watcher ends a process whose main thread did
    not handle a stop signal within :data:`STOP_GRACE` seconds (no ``finally`` block runs then)."""
    with _watch.lock:
        if cleanup not in _watch.forced:
            _watch.forced.append(cleanup)


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
        stops = [number for number in arrived if number in STOP_SIGNALS]
        if stops:
            with _watch.lock:
                first = not _watch.stopped
                _watch.stopped = True
                hooks = list(_watch.hooks)
            if first:
                for hook in hooks:
                    _call(hook)
                threading.Thread(target=_force_after_grace, args=(stops[0],), daemon=True).start()


def _force_after_grace(signum: int) -> None:
    """End the process where its main thread has not started handling the stop within :data:`STOP_GRACE`
    seconds: it is inside a native call nothing stopped. Not by the signal itself (only the main thread may
    restore its default action): exit status 128 + the signal, as a shell reports a death by it."""
    time.sleep(STOP_GRACE)
    if _watch.handled:
        return
    with _watch.lock:
        cleanups = list(_watch.forced)
    for cleanup in cleanups:
        _call(cleanup)
    with contextlib.suppress(OSError, ValueError):
        name = signal.Signals(signum).name
        sys.stderr.write(
            f"bncheck: stopped by {name}: a call into a native library did not return within {STOP_GRACE:g} s\n"
        )
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(128 + signum)


def _call(hook: Callable[[], None]) -> None:
    with contextlib.suppress(Exception):  # a hook's failure must not end the watch or hide the stop
        hook()
