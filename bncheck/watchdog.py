"""Stops bncheck's own process with exit 2 before the system runs out of memory while it checks a model.

The memory check before a run (budget.check) compares a lower bound with the budget, and a runtime can hold
several times that bound: every activation alive at once, or a framework's own copies (Keras's numpy backend,
through jax, held 8.5 times it on a shipped CNN). So while a model is checked, a thread reads the process's
peak resident memory every :data:`POLL_SECONDS`; once it has grown by :data:`CEILING_FACTOR` times the budget
since the model began (by default, 90% of the memory that was available), the thread runs the clean-ups and
calls the stop function the console gave it, which reports the one-line error and ends the process at once:
the main thread may be inside a runtime call that would not return before the kernel's out-of-memory killer.

Only the console's own process enables it: the Python API never ends its caller's process, and ``-j`` workers
do not (their parent could not tell the stop from a crash). Standard library only.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Concatenate, NoReturn, ParamSpec, TypeVar

from bncheck import budget
from bncheck.errors import BncheckError

#: seconds between two reads of the peak memory; at the few GB/s a process can fault pages in, the growth
#: between two reads stays within the tenth of the available memory that CEILING_FACTOR leaves
POLL_SECONDS = 0.02
#: growth, in budgets, at which a model's check is stopped: with the default budget (half the available
#: memory) 90% of the memory that was available, so a run is stopped only where the system was about to run out
CEILING_FACTOR = 1.8

Stop = Callable[[str, str], NoReturn]  # (model, one-line message) -> ends the process


class _State:
    """The process's watch: the console's stop function, and the model being checked (model, resident bytes
    at its start, the ceiling, the budget)."""

    def __init__(self) -> None:
        self.stop: Stop | None = None
        self.watched: tuple[str, int, int, int] | None = None
        self.cleanups: list[Callable[[], None]] = []


_state = _State()
_lock = threading.Lock()


def enable(stop: Stop) -> None:
    """From now on :func:`watching` watches, and a model's check past its ceiling ends in ``stop``."""
    with _lock:
        first = _state.stop is None
        _state.stop = stop
    if first and resident_bytes() is not None:
        threading.Thread(target=_watch, name="bncheck-memory-watch", daemon=True).start()


@contextlib.contextmanager
def watching(model: str) -> Iterator[None]:
    """The check of ``model`` runs inside this block: watched where :func:`enable` was called, else as is."""
    start = resident_bytes() if _state.stop is not None else None
    try:
        limit = budget.budget() if start is not None else None
    except BncheckError:  # a malformed budget: the check itself reports it
        limit = None
    if start is None or limit is None:
        yield
        return
    _state.watched = (model, start, start + int(CEILING_FACTOR * limit), limit)
    try:
        yield
    finally:
        _state.watched = None


P = ParamSpec("P")
R = TypeVar("R")


def watched(check: Callable[Concatenate[str, P], R]) -> Callable[Concatenate[str, P], R]:
    """``check(model, ...)`` run inside :func:`watching` of its model."""

    @functools.wraps(check)
    def run(model: str, /, *args: P.args, **kwargs: P.kwargs) -> R:
        with watching(model):
            return check(model, *args, **kwargs)

    return run


def at_stop(cleanup: Callable[[], None]) -> None:
    """Run ``cleanup`` before the process is stopped (no ``finally`` runs then); once, however often given."""
    if cleanup not in _state.cleanups:
        _state.cleanups.append(cleanup)


def run_stop_cleanups() -> None:
    """Run the :func:`at_stop` clean-ups now: a stop signal that lands inside a ``finally`` block's clean-up
    (or before the code knows the folder it made) cuts it short, and the process is about to die of it."""
    for cleanup in list(_state.cleanups):
        with contextlib.suppress(Exception):
            cleanup()


def resident_bytes() -> int | None:
    """This process's resident memory (Linux's /proc/self/statm); None where the system does not tell it."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _peak_bytes() -> int:
    """The process's peak resident memory so far, by one getrusage call, which keeps the GIL: reading
    /proc/self/statm at every poll (open, read, close) handed it back and forth with a busy main thread three
    times and cost a small model's probe 10% of its time. Linux carries a parent's peak over an exec, so
    this peak can be the spawning process's: only past the ceiling is the resident memory itself read."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def _watch() -> None:
    while True:
        time.sleep(POLL_SECONDS)
        watched = _state.watched
        if watched is None:
            continue
        model, start, ceiling, limit = watched
        if _peak_bytes() <= ceiling:  # the resident memory never passed the ceiling
            continue
        used = resident_bytes()
        if used is None or used <= ceiling:
            continue
        run_stop_cleanups()
        assert _state.stop is not None  # set before any model is watched
        grown, allowed = budget.format_sizes(used - start, limit)
        _state.stop(
            model,
            f"{model}: stopped while checking it, before the system ran out of memory: bncheck's memory grew by "
            f"{grown}, past {CEILING_FACTOR:g} times the memory budget of {allowed} ({budget.source()}), though "
            f"the estimate before the run was within the budget; give smaller --batch-sizes (fix: --batch-size), "
            f"or {budget.CHANGE}",
        )
