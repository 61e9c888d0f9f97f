"""onnx imported without importlib.metadata, for a process bncheck owns.

onnx imports importlib.metadata (the email package, zipfile and more) only to set ``onnx.__version__``, which
bncheck never reads: a stand-in answers ``version()`` while onnx imports (docs/architecture.md has the numbers).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import types
from collections.abc import Iterator

_NAME = "importlib.metadata"


def import_onnx() -> None:
    """Import onnx, with :func:`dist_info_version` standing in for importlib.metadata's ``version`` while it
    imports, unless either is imported already."""
    with contextlib.ExitStack() as stack:
        if "onnx" not in sys.modules and _NAME not in sys.modules:
            stack.enter_context(_stand_in())
        import onnx  # noqa: F401


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


def _real() -> types.ModuleType:
    """The real importlib.metadata, imported in place of the stand-in."""
    import importlib

    if isinstance(sys.modules.get(_NAME), _StandIn):
        del sys.modules[_NAME]
    return importlib.import_module(_NAME)


class _StandIn(types.ModuleType):
    def __getattr__(self, name: str) -> object:
        return getattr(_real(), name)


def _version(name: str) -> str:
    found = dist_info_version(name)
    return found if found is not None else _real().version(name)


@contextlib.contextmanager
def _stand_in() -> Iterator[None]:
    import importlib

    stand_in = _StandIn(_NAME, "importlib.metadata's version(), for onnx's import (bncheck)")
    stand_in.version = _version  # type: ignore[attr-defined]
    sys.modules[_NAME] = stand_in
    importlib.metadata = stand_in  # what `import importlib.metadata` then reads, as after a real import
    try:
        yield
    finally:
        if sys.modules.get(_NAME) is stand_in:
            del sys.modules[_NAME]
        if getattr(importlib, "metadata", None) is stand_in:
            del importlib.metadata  # the next import of importlib.metadata sets the real one
