"""Findings: what a check reports. Ordered severities for --fail-on. Standard library only."""

from __future__ import annotations

import enum
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, SupportsFloat


class Severity(enum.IntEnum):
    """Ordered so that thresholds compare: info < warning < error."""

    INFO = 1
    WARNING = 2
    ERROR = 3

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, text: str) -> Severity:
        return cls[text.strip().upper()]


#: --fail-on values, most severe first; "never" gates on nothing.
FAIL_ON_LEVELS: tuple[str, ...] = (*(s.label for s in sorted(Severity, reverse=True)), "never")


@dataclass(frozen=True)
class Finding:
    """One problem on one layer. ``evidence`` holds numbers (JSON-safe after encoding), ``hint`` the fix."""

    code: str
    check: str
    severity: Severity
    layer: str
    message: str
    hint: str
    evidence: dict[str, Any] = field(default_factory=dict)

    @property
    def effect(self) -> str | None:
        """The one-line summary of the measured effect on the model's outputs, when the probe measured one."""
        measured = self.evidence.get("output_effect")
        if isinstance(measured, dict) and isinstance(measured.get("summary"), str):
            return str(measured["summary"])
        return None


def number(value: SupportsFloat | None) -> float | int | str | None:
    """A JSON-safe number: NaN/Inf become the strings "nan", "inf", "-inf" (JSON has no such numbers).

    numpy scalars are accepted through the numbers ABCs they register with (this module imports no numpy).
    """
    if type(value) is float:  # the common case first: the ABC checks below cost a microsecond a number
        f = value
    elif type(value) is int or value is None:
        return value
    elif isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)  # numpy integers register as Integral
    else:
        f = float(value)
    if math.isfinite(f):
        return f
    return "nan" if math.isnan(f) else ("inf" if f > 0 else "-inf")


def shape_json(shape: tuple[Any, ...] | None) -> list[Any] | None:
    """A shape for JSON: ints and dim names kept, anything else (unknown) as null."""
    return None if shape is None else [d if isinstance(d, (int, str)) else None for d in shape]
