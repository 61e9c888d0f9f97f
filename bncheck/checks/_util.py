"""Small helpers shared by the check modules (pure numpy, no framework)."""

from __future__ import annotations

from typing import Any

import numpy as np

from bncheck.model import NormLayer


def number(value: float | int | np.floating | None) -> float | int | str | None:
    """A JSON-safe number: NaN/Inf become the strings "nan", "inf", "-inf" (JSON has no such numbers)."""
    if value is None:
        return None
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    f = float(value)
    if np.isnan(f):
        return "nan"
    if np.isinf(f):
        return "inf" if f > 0 else "-inf"
    return f


def shape_json(shape: tuple[Any, ...] | None) -> list[Any] | None:
    return None if shape is None else [d if isinstance(d, (int, str)) else None for d in shape]


def describe(layer: NormLayer) -> str:
    """'BatchNormalization (batch norm)' style label for messages."""
    if layer.op_type == "decomposed":
        return f"Hand-written {layer.kind.value} norm ({len(layer.nodes)} nodes)"
    return f"{layer.op_type} ({layer.kind.value} norm)"
