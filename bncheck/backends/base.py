"""The interface every model format implements (Polygraphy style: several backends behind one interface).

A backend turns a file into a :class:`~bncheck.model.ModelView` and runs probes on it. It is the only place
that imports a framework. Any failure it cannot recover from is raised as :class:`BackendError`, whose
message is the one line the CLI prints (exit 2).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from bncheck.model import ModelView, ProbeResult


class BackendError(Exception):
    """The model cannot be loaded or run. The message is one line, for the user."""


@dataclass(frozen=True)
class ProbeSettings:
    """What `bncheck probe` asks of a backend.

    ``data`` maps input name to an array whose first axis is samples (None: synthetic inputs from ``seed``).
    ``input_shapes`` fixes symbolic non-batch dims per input. ``samples`` is K, the number of samples whose
    batch dependence is tested. ``progress`` is called with (done, total) steps, or None.
    """

    batch_sizes: tuple[int, ...] = (1, 2, 32)
    seed: int = 0
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    data: dict[str, np.ndarray] | None = None
    data_path: str | None = None  # --data; the engine reads it into ``data`` once the model's inputs are known
    data_source: str = "synthetic"
    samples: int = 4
    progress: Callable[[int, int], None] | None = None


class Backend(abc.ABC):
    """Load a model into a view; probe it."""

    format: str = ""

    @abc.abstractmethod
    def load(self, path: str) -> ModelView:
        """Read the file (no execution of model code) and walk its normalization layers."""

    @abc.abstractmethod
    def probe(self, view: ModelView, settings: ProbeSettings) -> list[ProbeResult]:
        """Run probe batches; one result per call style (ONNX has one, Keras may have two)."""
