"""`fix`'s measuring passes, kept so that a second repair of the same model with the same data replays them.

`bncheck fix --data` repairs the model twice: as a dry run inside the probe of the original (BN003's output
effect), then for real. Both take the same passes over the same data as long as the same edits precede them,
and a pass is what costs (a session, every batch). The log keeps, per pass, a key (the edits made before it,
the layers it measures and how) and the statistics the repair read; a later repair whose pass has the same key
and the same data arrays reads them again, and measures for real from its first pass that differs.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field

import numpy as np

from bncheck.model import TensorStats

#: the statistics a log may hold ([samples, channels] arrays per layer); past it the log is dropped and
#: repairs measure every pass (a repair never holds more than one pass's statistics of its own)
MAX_BYTES = 256 * 2**20

Measure = Callable[[], Mapping[str, TensorStats]]


@dataclass
class _Pass:
    key: Hashable
    data: tuple[np.ndarray, ...]  # compared by identity: the same arrays, not equal ones
    read: dict[str, TensorStats | None] = field(default_factory=dict)


@dataclass
class PassLog:
    """The passes of the last repair of one loaded model (``OnnxHandle.fix_passes``)."""

    passes: list[_Pass] = field(default_factory=list)
    nbytes: int = 0
    dropped: bool = False
    replayed: int = 0  # passes taken from the log

    def open(self, index: int, key: Hashable, data: tuple[np.ndarray, ...], measure: Measure) -> PassStats:
        """The statistics of pass ``index``: replayed when the log holds that pass with this key and data, else
        measured (and the log's later passes, another history, forgotten)."""
        if index < len(self.passes):
            kept = self.passes[index]
            if kept.key == key and len(kept.data) == len(data) and all(a is b for a, b in zip(kept.data, data)):
                self.replayed += 1
                return PassStats(self, kept, measure)
            del self.passes[index:]
        entry = _Pass(key, data)
        if not self.dropped:
            self.passes.append(entry)
        stats = PassStats(self, entry, measure)
        stats.measured = measure()
        return stats

    def _count(self, stats: TensorStats | None) -> None:
        if stats is not None:
            self.nbytes += sum(a.nbytes for a in (stats.sample_mean, stats.sample_sq, stats.min, stats.max))
        if self.nbytes > MAX_BYTES:
            self.passes.clear()
            self.dropped = True


class PassStats:
    """One pass's statistics by layer name: what the log recorded, else measured (once per pass) and recorded."""

    def __init__(self, log: PassLog, entry: _Pass, measure: Measure) -> None:
        self._log = log
        self._entry = entry
        self._measure = measure
        self.measured: Mapping[str, TensorStats] | None = None

    def get(self, name: str) -> TensorStats | None:
        if name in self._entry.read:
            return self._entry.read[name]
        if self.measured is None:  # the repair reads a layer the log's pass did not: this history differs
            self.measured = self._measure()
        found = self.measured.get(name)
        self._entry.read[name] = found
        self._log._count(found)
        return found
