"""Findings: what a check reports. Ordered severities for --fail-on. Standard library only."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class Severity(enum.IntEnum):
    """Ordered so that thresholds compare: info < warning < error."""

    INFO = 1
    WARNING = 2
    ERROR = 3

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, text: str) -> "Severity":
        return cls[text.strip().upper()]


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

    def sort_key(self) -> tuple[int, str, str]:
        return (-int(self.severity), self.code, self.layer)
