"""Backend selection by file type. Backend modules are imported only when chosen (lazy imports)."""

from __future__ import annotations

import os

from bncheck.backends.base import Backend, BackendError, ProbeSettings

__all__ = ["Backend", "BackendError", "ProbeSettings", "backend_for"]

_KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")


def backend_for(path: str) -> Backend:
    """The backend for ``path``, chosen by its suffix (.onnx and anything unknown: ONNX)."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix in _KERAS_SUFFIXES:
        from bncheck.backends.keras import KerasBackend

        return KerasBackend()
    from bncheck.backends.onnx import OnnxBackend

    return OnnxBackend()
