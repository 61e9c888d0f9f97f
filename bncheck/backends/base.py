"""The interface every model format implements (Polygraphy style: several backends behind one interface).

A backend turns a file into a :class:`~bncheck.model.ModelView` and runs probes on it. It is the only place
that imports a framework. Any failure it cannot recover from is raised as :class:`BackendError`, whose
message is the one line the CLI prints (exit 2).
"""

from __future__ import annotations

import abc

from bncheck.errors import BncheckError, ErrorKind
from bncheck.model import ModelView, ProbeResult, ProbeSettings


class BackendError(BncheckError):
    """The model cannot be loaded or run. The message is one line, for the user."""

    kind = ErrorKind.MODEL


class Backend(abc.ABC):
    """Load a model into a view; probe it."""

    format: str = ""

    @abc.abstractmethod
    def load(self, path: str) -> ModelView:
        """Read the file (no execution of model code) and walk its normalization layers."""

    @abc.abstractmethod
    def probe(self, view: ModelView, settings: ProbeSettings) -> list[ProbeResult]:
        """Run probe batches; one result per call style (ONNX has one, Keras may have two)."""
