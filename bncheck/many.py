"""Many models per run: expand files and folders, run one command per model (optionally in processes).

A model that cannot be loaded becomes a failure entry for that model; the others are still reported.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bncheck.errors import BncheckError, ErrorKind, one_line

if TYPE_CHECKING:
    from bncheck.report import Report

MODEL_SUFFIXES = (".onnx", ".keras", ".h5", ".hdf5")
#: seconds a worker told to stop (SIGTERM) gets to remove its folders before it is killed
STOP_WAIT = 10.0
#: seconds between a worker's checks that its parent is still there
PARENT_POLL = 0.5


@dataclass(frozen=True)
class Failure:
    """A model bncheck could not check: the one line it would print, and whose side the problem is on."""

    path: str
    message: str
    kind: str


def expand(paths: Iterable[str]) -> list[str]:
    """Files as given; folders walked recursively for model files (sorted, hidden folders skipped).

    A missing path is kept, so that it is reported as a failure for that path rather than silently dropped.
    """
    found: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                found.extend(os.path.join(root, f) for f in sorted(files) if f.lower().endswith(MODEL_SUFFIXES))
        else:
            found.append(path)
    unique: dict[str, None] = dict.fromkeys(found)  # keeps order, drops repeats
    return list(unique)


def nothing_found(paths: Iterable[str]) -> str:
    """Why :func:`expand` found no model file in ``paths``, naming the folders that are TensorFlow SavedModels."""
    from bncheck.backends.file_kinds import saved_model_folder

    paths = list(paths)
    text = f"no model files ({', '.join(MODEL_SUFFIXES)}) in {', '.join(paths)}"
    saved = [(path, saved_model_folder(path)) for path in paths if os.path.isdir(path)]
    return text + "".join(f"; {path} {why}" for path, why in saved if why)


def failure(path: str, error: BaseException) -> Failure:
    kind = error.kind.value if isinstance(error, BncheckError) else ErrorKind.INTERNAL.value
    text = one_line(error, limit=2000)
    if isinstance(error, OSError) and not isinstance(error, BncheckError):
        kind, text = ErrorKind.MODEL.value, f"{path}: {error.strerror or error}"
    elif kind == ErrorKind.INTERNAL.value:
        text = f"internal error ({type(error).__name__}): {text}"
    return Failure(path=path, message=text, kind=kind)


def _guarded(job: Callable[[str], Report], path: str) -> Report | Failure:
    try:
        return job(path)
    except Exception as error:  # one model's failure must not hide the others' reports
        return failure(path, error)


def run(
    models: Sequence[str],
    job: Callable[[str], Report],
    jobs: int = 1,
    progress: Callable[[int, int], None] | None = None,
    command: str | None = None,
) -> list[Report | Failure]:
    """``job(path)`` for every model, in the order given; ``jobs`` > 1 runs them in that many processes, each
    of which imports the frameworks of ``command`` (inspect, probe, fix) as :func:`_import_frozen` says."""
    total = len(models)
    if progress:
        progress(0, total)
    if jobs <= 1 or total <= 1:
        results = []
        for done, path in enumerate(models, start=1):
            results.append(_guarded(job, path))
            if progress:
                progress(done, total)
        return results
    import concurrent.futures
    import functools
    import multiprocessing

    # spawn, not fork: onnxruntime's thread pools do not survive a fork
    context = multiprocessing.get_context("spawn")
    out: list[Report | Failure | None] = [None] * total
    workers = min(jobs, total)
    pool = concurrent.futures.ProcessPoolExecutor(
        max_workers=workers, mp_context=context, initializer=_start_worker, initargs=(os.getpid(), workers)
    )
    try:
        work = functools.partial(_in_worker, job, command)
        futures = {pool.submit(work, path): i for i, path in enumerate(models)}
        for done, future in enumerate(concurrent.futures.as_completed(futures), start=1):
            index = futures[future]
            try:
                out[index] = future.result()
            except Exception as error:  # the worker process itself died (e.g. killed for memory)
                out[index] = failure(models[index], error)
            if progress:
                progress(done, total)
    except BaseException:  # SIGTERM or Ctrl-C here: the models not started are dropped, the running ones stopped
        _stop(pool)
        raise
    pool.shutdown()
    return [r for r in out if r is not None]


def _start_worker(parent: int, workers: int) -> None:
    """In each worker: its share of the machine (share.py), :func:`_watch_parent`, and a stop that ends a
    running onnxruntime call (termination.watch_stop_signals)."""
    from bncheck import share, watchdog
    from bncheck.termination import before_forced_stop, watch_stop_signals

    share.set_workers(workers)
    _watch_parent(parent)
    watch_stop_signals()
    before_forced_stop(watchdog.run_stop_cleanups)


def _watch_parent(parent: int) -> None:
    """In each worker: once the parent is gone (killed by SIGKILL or for memory, so it could not stop its
    workers), SIGTERM this worker, which then ends as :func:`_in_worker` says. Without it a worker finished
    its model and then waited for work forever."""
    import signal
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="bncheck-parent-watch", daemon=True).start()


def _in_worker(job: Callable[[str], Report], command: str | None, path: str) -> Report | Failure:
    """:func:`_guarded` in a worker process: SIGTERM from the parent (:func:`_stop`) ends the worker once the
    model's clean-up has run; between models it ends the worker at once (nothing to clean)."""
    import signal

    from bncheck.termination import Terminated, die_of, unwind_on_sigterm

    unwind_on_sigterm()
    try:
        if command is not None:
            _import_frozen(path, command)
        return _guarded(job, path)
    except Terminated:
        from bncheck import watchdog

        watchdog.run_stop_cleanups()
        die_of(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


#: the model formats whose frameworks this worker process has imported (see _import_frozen)
_IMPORTED: set[str] = set()


def _import_frozen(path: str, command: str) -> None:
    """In a worker, before the first model of each format: its frameworks imported with the collector off and
    frozen (backends.frozen_imports), as the console's own process does. What the models before it left is
    collected first, never frozen."""
    import gc

    from bncheck.backends import backend_for, frozen_imports

    format_ = backend_for(path).format
    if format_ in _IMPORTED:
        return
    if _IMPORTED:
        gc.collect()
    _IMPORTED.add(format_)
    frozen_imports([path], command)


def _stop(pool: Any) -> None:
    """Cancel what has not started, SIGTERM the workers and wait until they are gone (their folders with them);
    a worker still there after :data:`STOP_WAIT` seconds (a call that no stop signal ends) is killed.

    ProcessPoolExecutor has no public way to stop a running call before Python 3.14's terminate_workers;
    its ``_processes`` map has been there since 3.2."""
    workers = list((getattr(pool, "_processes", None) or {}).values())  # shutdown() forgets them
    pool.shutdown(wait=False, cancel_futures=True)
    for worker in workers:
        worker.terminate()
    deadline = time.monotonic() + STOP_WAIT
    for worker in workers:
        worker.join(timeout=max(deadline - time.monotonic(), 0))
        if worker.is_alive():
            worker.kill()
            worker.join()


def worst_exit(results: Sequence[Report | Failure]) -> int:
    """2 if any model could not be checked, else the worst model's exit code."""
    codes = [2 if isinstance(r, Failure) else int(r.exit_code) for r in results]
    return max(codes, default=0)
