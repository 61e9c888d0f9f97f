"""The interface every model format implements (Polygraphy style: several backends behind one interface).

A backend turns a file into a :class:`~bncheck.model.ModelView` and runs probes on it. It is the only place
that imports a framework. Any failure it cannot recover from is raised as :class:`BackendError`, whose
message is the one line the CLI prints (exit 2).
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING

from bncheck.errors import BncheckError, ErrorKind
from bncheck.model import ModelView, ProbeResult, ProbeSettings

if TYPE_CHECKING:
    from bncheck.fix_result import FixOutcome, FixRequest


#: bytes of a file mapped at a time while it is hashed (a multiple of mmap.ALLOCATIONGRANULARITY)
HASH_WINDOW = 16 << 20


def sha256_of(path: str) -> str:
    """The file's sha256, one ``update`` per :data:`HASH_WINDOW` of its mapping (hashlib releases the GIL for
    each, where a loop of small reads waits for the GIL between chunks). One window is mapped at a time: a whole
    mapping counts in the process's resident memory beside onnxruntime's mapping of the same bytes."""
    import hashlib
    import mmap
    import os

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        for start in range(0, size, HASH_WINDOW):
            length = min(HASH_WINDOW, size - start)
            try:
                mapped = mmap.mmap(fh.fileno(), length, access=mmap.ACCESS_READ, offset=start)
            except (OSError, ValueError):  # no mmap here: read it
                fh.seek(start)
                digest.update(fh.read(length))
                continue
            with mapped, memoryview(mapped) as data:
                digest.update(data)
    return digest.hexdigest()


class BackendError(BncheckError):
    """The model cannot be loaded or run. The message is one line, for the user."""

    kind = ErrorKind.MODEL


class Backend(abc.ABC):
    """Load a model into a view; probe it; write a repaired copy of it."""

    format: str = ""

    @abc.abstractmethod
    def load(self, path: str, *, weights: bool = True) -> ModelView:
        """Read the file (no execution of model code) and walk its normalization layers. ``weights=False``:
        large weights no check reads may stay in the file (inspect and probe; fix rewrites them)."""

    @abc.abstractmethod
    def probe(self, view: ModelView, settings: ProbeSettings) -> list[ProbeResult]:
        """Run probe batches; one result per call style (ONNX has one, Keras may have two)."""

    def check_fix(self, view: ModelView, request: FixRequest) -> None:
        """Every refusal of ``fix`` that needs no execution (raise BackendError), before any probe runs."""
        raise BackendError(f"{view.info.path}: `bncheck fix` does not rewrite {self.format} models")

    def fix(self, view: ModelView, request: FixRequest) -> FixOutcome:
        """Repair ``view``'s model into ``request.output`` (nothing written in a dry run)."""
        raise BackendError(f"{view.info.path}: `bncheck fix` does not rewrite {self.format} models")

    def input_files(self, path: str) -> list[str]:
        """Every file that loading ``path`` reads: the model, plus any data files it names (ONNX)."""
        return [path]

    def import_modules(self, command: str) -> None:
        """Import the modules ``command`` (inspect, probe, fix) imports lazily on this backend, for callers
        that import up front (backends.import_for); raises whatever importing them raises. None by default."""
        return None
