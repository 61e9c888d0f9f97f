"""onnx imported without importlib.metadata and the modules bncheck never uses, for a process bncheck owns.

onnx imports importlib.metadata (the email package, zipfile and more) only to set ``onnx.__version__``, which
bncheck never reads: a stand-in answers ``version()`` while onnx imports. onnx's ``__init__`` also imports
modules bncheck never calls (:data:`DEFERRED`); each stays a stand-in that imports the real module when a name
is first read from it (docs/architecture.md has the numbers).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
import types
from collections.abc import Iterator

_NAME = "importlib.metadata"

#: What onnx's ``__init__`` imports and bncheck never uses: model composition (with onnx.utils, which imports
#: tarfile), the generator of onnx's protobuf modules (argparse, subprocess), protobuf's JSON and text
#: formats, which onnx reads only for models saved in those formats, and protobuf's pure-Python message
#: implementation, which its descriptor pool and message builder import whatever protobuf's backend is, and
#: call only when that backend is the pure-Python one. Also onnx's dtype table and ml_dtypes, which it
#: imports for the element types numpy lacks: bncheck converts plain numeric tensors itself (tensors.py).
DEFERRED = (
    "onnx.compose",
    "onnx.utils",
    "onnx.gen_proto",
    "google.protobuf.json_format",
    "google.protobuf.text_format",
    "google.protobuf.internal.python_message",
    "onnx._mapping",
    "ml_dtypes",
)


def import_onnx() -> None:
    """Import onnx, with :func:`dist_info_version` standing in for importlib.metadata's ``version`` while it
    imports, unless either is imported already, and :data:`DEFERRED` left to their first use."""
    if "onnx" in sys.modules:
        return
    import google.protobuf.internal  # noqa: F401  (the packages of three of them; onnx's modules import both)

    for name in DEFERRED:
        _defer(name)
    with _stand_in():
        import onnx  # noqa: F401


class Deferred(types.ModuleType):
    """A module not imported yet: the first name read from it imports the real one, which then takes its
    place in ``sys.modules`` and in its package. Its ``__spec__`` is None, so an ``import`` statement of its
    name takes it as it is (a lazy loader would be loaded by that very statement)."""

    def __getattr__(self, name: str) -> object:
        if name.startswith("__") and name != "__all__":
            raise AttributeError(name)  # hasattr(module, "__file__") and the like: no reason to import it
        return getattr(_import_real(self.__name__), name)


def _defer(name: str, doc: str = "not imported yet (bncheck.backends.onnx.quick_import)") -> Deferred | None:
    """Put a :class:`Deferred` in ``sys.modules`` for ``name`` and return it, unless the module is imported
    already; also as an attribute of its package where that is imported (``import a.b.c`` then reads
    ``a.b.c``; onnx's own ``from onnx import compose`` takes it from ``sys.modules``)."""
    if name in sys.modules:
        return None
    package, _, child = name.rpartition(".")
    parent = sys.modules.get(package)
    if parent is not None and hasattr(parent, child):
        return None
    sys.modules[name] = module = Deferred(name, doc)
    if parent is not None:
        setattr(parent, child, module)
    return module


# two threads reading a Deferred at once: one real import, never two; re-entrant, because one deferred
# module's import can read another (onnx._mapping reads ml_dtypes)
_REAL_IMPORT = threading.RLock()


def _import_real(name: str) -> types.ModuleType:
    import importlib

    with _REAL_IMPORT:
        if isinstance(sys.modules.get(name), Deferred):
            del sys.modules[name]
        return importlib.import_module(name)  # which sets it as its package's attribute too


def _normalized(name: str) -> str:
    # importlib.metadata's Prepared.normalize, which it applies to the wanted name and to each folder's
    return re.sub(r"[-_.]+", "-", name).lower().replace("-", "_")


def dist_info_version(name: str) -> str | None:
    """The ``Version`` of ``name``'s METADATA where importlib.metadata finds it, or None where this cannot tell
    for sure (a zip or egg on the path, two folders of that name, another finder of distributions, no such
    folder at all), which leaves the answer to importlib.metadata."""
    # importlib.metadata asks every finder on sys.meta_path that has find_distributions; PathFinder's
    # searches the sys.path folders in order, and the first folder holding the name wins
    finders = [f for f in sys.meta_path if hasattr(f, "find_distributions")]
    if len(finders) != 1 or getattr(finders[0], "__name__", "") != "PathFinder":
        return None
    wanted = _normalized(name)
    for entry in sys.path:
        if not isinstance(entry, str):
            return None  # not a folder name: left to importlib.metadata
        folder = entry or "."
        if folder.lower().endswith(".egg") or os.path.isfile(folder):
            return None
        try:
            children = os.listdir(folder)
        except OSError:
            continue  # importlib.metadata skips what it cannot list too
        # as importlib.metadata's Lookup names each .dist-info/.egg-info folder: its text before the first "-"
        found = [
            child
            for child in children
            if child.lower().endswith((".dist-info", ".egg-info"))
            and _normalized(child.rpartition(".")[0].partition("-")[0]) == wanted
        ]
        if not found:
            continue
        if len(found) > 1 or not found[0].lower().endswith(".dist-info"):
            return None
        return _metadata_version(os.path.join(folder, found[0], "METADATA"))
    return None


def _metadata_version(path: str) -> str | None:
    """The ``Version`` header of a METADATA file (the headers end at its first empty line)."""
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if not line.strip():
                    break
                key, sep, value = line.partition(":")
                if sep and key.strip().lower() == "version":
                    return value.strip()
    except (OSError, UnicodeDecodeError):
        pass
    return None


def _version(name: str) -> str:
    found = dist_info_version(name)
    return found if found is not None else _import_real(_NAME).version(name)


@contextlib.contextmanager
def _stand_in() -> Iterator[None]:
    """importlib.metadata as a :class:`Deferred` answering ``version()`` by :func:`_version` while the block
    runs, ``importlib.metadata`` included (what ``import importlib.metadata`` reads)."""
    import importlib

    stand_in = _defer(_NAME, "importlib.metadata's version(), for onnx's import (bncheck)")
    if stand_in is None:  # imported already: the real module answers
        yield
        return
    stand_in.version = _version  # type: ignore[attr-defined]
    try:
        yield
    finally:
        if sys.modules.get(_NAME) is stand_in:
            del sys.modules[_NAME]
        if getattr(importlib, "metadata", None) is stand_in:
            del importlib.metadata  # the next import of importlib.metadata sets the real one
