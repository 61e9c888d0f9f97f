"""Small helpers shared by the check modules (pure numpy, no framework)."""

from __future__ import annotations

from bncheck.model import NormLayer


def describe(layer: NormLayer) -> str:
    """'BatchNormalization (batch norm)' style label for messages."""
    if layer.op_type == "decomposed":
        return f"Hand-written {layer.kind.value} norm ({len(layer.nodes)} nodes)"
    return f"{layer.op_type} ({layer.kind.value} norm)"


def is_keras(layer: NormLayer) -> bool:
    """A layer read from a Keras file: its hints name Keras actions, not exporter or TF1 ones."""
    return layer.domain == "keras"
