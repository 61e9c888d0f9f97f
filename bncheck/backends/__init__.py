"""Backend selection by file type. Backend modules are imported only when chosen (lazy imports)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable

from bncheck.backends.base import Backend, BackendError, ProbeSettings

__all__ = ["Backend", "BackendError", "ProbeSettings", "backend_for", "frozen_imports", "import_for"]

_KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")
#: allocations between two young collections in a process bncheck owns, once its imports are frozen (CPython's
#: default is 700): a probe's objects die by reference count; the 19-68 collections of a probe freed 0-900 objects
YOUNG_COLLECTION_THRESHOLD = 20_000


def backend_for(path: str) -> Backend:
    """The backend for ``path``, chosen by its suffix (.onnx and anything unknown: ONNX)."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix in _KERAS_SUFFIXES:
        from bncheck.backends.keras import KerasBackend

        return KerasBackend()
    from bncheck.backends.onnx import OnnxBackend

    return OnnxBackend()


def import_for(paths: Iterable[str], command: str) -> None:
    """Import up front what ``command`` (inspect, probe, fix) imports on its way for these model files: the
    pipeline, and each of their backends' modules (Backend.import_modules). A framework that fails to import
    is left for the command to meet again, where its errors are reported."""
    backends = {backend.format: backend for backend in map(backend_for, filter(os.path.isfile, paths))}
    if not backends:
        return
    from bncheck import engine  # noqa: F401

    for backend in backends.values():
        with contextlib.suppress(Exception):
            backend.import_modules(command)


def frozen_imports(paths: Iterable[str], command: str) -> None:
    """:func:`import_for` with the cyclic garbage collector off, then every object so far frozen (gc.freeze)
    and the collector back on, its young generation collected every :data:`YOUNG_COLLECTION_THRESHOLD`
    allocations: modules live to the end of the process, and the collector would otherwise scan each of their
    objects as it ages (docs/architecture.md has the numbers). Only for a process bncheck owns: the console
    script's, or a worker of ``-j``."""
    import gc

    gc.disable()
    try:
        import_for(paths, command)
    finally:
        gc.freeze()
        young, older, oldest = gc.get_threshold()
        gc.set_threshold(max(young, YOUNG_COLLECTION_THRESHOLD), older, oldest)
        gc.enable()
