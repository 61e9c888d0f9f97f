"""Small helpers shared by the check modules (pure numpy, no framework)."""

from __future__ import annotations

from bncheck.model import NormLayer


def describe(layer: NormLayer) -> str:
    """'BatchNormalization (batch norm)' style label for messages."""
    if layer.op_type == "decomposed":
        return f"Hand-written {layer.kind.value} norm ({len(layer.nodes)} nodes)"
    return f"{layer.op_type} ({layer.kind.value} norm)"
