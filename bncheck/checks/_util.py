"""Small helpers shared by the check modules (pure numpy, no framework)."""

from __future__ import annotations

from collections.abc import Mapping

from bncheck.model import NormLayer, OutputComparison, Recalibration


def describe(layer: NormLayer) -> str:
    """'BatchNormalization (batch norm)' style label for messages."""
    if layer.op_type == "decomposed" and layer.extra.get("tf_training"):
        return f"BatchNormalization written out by TensorFlow in training mode ({len(layer.nodes)} nodes)"
    if layer.op_type == "decomposed":
        return f"Hand-written {layer.kind.value} norm ({len(layer.nodes)} nodes)"
    return f"{layer.op_type} ({layer.kind.value} norm)"


def is_keras(layer: NormLayer) -> bool:
    """A layer read from a Keras file: its hints name Keras actions, not exporter or TF1 ones."""
    return layer.domain == "keras"


#: why the hints of such a layer point at Keras (:func:`keras_unloadable`)
NOT_LOADED = "bncheck does not load this file, whose config names code from outside Keras, so `bncheck fix` cannot"


def keras_unloadable(layer: NormLayer) -> bool:
    """A layer of a Keras file that bncheck does not load (its config names code from outside Keras): `bncheck
    fix` refuses it, so a hint points at Keras instead."""
    return is_keras(layer) and bool(layer.extra.get("unloadable"))


def _moved(c: OutputComparison) -> str:
    """How far an output moved: in its standard deviations, or for labels, ids and masks the share of values
    that changed (a label's numeric distance means nothing)."""
    if c.changed is None:
        return f"{c.shift:.3g} sd"
    share = f"{100 * c.changed:.2g}%" if c.changed else "none"
    return f"{share} of values changed ({c.changed_samples} of {c.samples} samples)"


def _pct(value: float) -> str:
    """A share in percent, never rounded to 100% or 0% when it is not (99.6% is a change)."""
    for digits in range(4):
        text = f"{100 * value:.{digits}f}%"
        if (text != f"{100:.{digits}f}%" or value >= 1.0) and (float(text[:-1]) != 0 or value <= 0.0):
            return text
    return text


def _compared(c: OutputComparison) -> str:
    """What a top-1 agreement counts: samples, or a sequence's positions."""
    if c.positions == 1:
        return f"{c.samples} samples"
    return f"{c.samples * c.positions} positions ({c.positions} in each of {c.samples} samples)"


def batch_effect(
    per_output: Mapping[str, Mapping[int, OutputComparison]], companions_replaced: bool = False
) -> dict[str, object] | None:
    """BN002's effect at the model's outputs: each output of a sample alone (``companions_replaced``: in its
    row of a batch) against the same sample in a batch of each size (beside other companions); ``summary`` is
    the one line the table shows (the output that moved most)."""
    if not per_output:
        return None
    reference, alone = (
        ("its row, other companions", "with other companions in") if companions_replaced else ("alone", "alone vs")
    )
    outputs = {name: {str(b): c.numbers() for b, c in per.items()} for name, per in per_output.items()}
    worst = max(
        ((c.shift, name, b) for name, per in per_output.items() for b, c in per.items() if c.shift == c.shift),
        default=None,
    )
    if worst is None:
        return {"reference": reference, "outputs": outputs, "summary": "model outputs not comparable"}
    _, name, size = worst
    per = per_output[name]
    if per[size].changed is None:
        others = ", ".join(f"{per[b].shift:.2g} at {b}" for b in sorted(per) if b != size)
        line = f"{name} move {per[size].shift:.3g} sd {alone} batch {size}" + (f" ({others})" if others else "")
    else:
        others = ", ".join(f"{100 * (per[b].changed or 0):.2g}% at {b}" for b in sorted(per) if b != size)
        line = f"{name}: {_moved(per[size])} {alone} batch {size}" + (f" ({others})" if others else "")
    scored = [(b, c) for b, c in sorted(per.items()) if c.agreement is not None]
    if scored:
        b, c = scored[-1]
        line += (
            f"; top-1 with other companions agrees on {_pct(c.agreement)} of {_compared(c)} in batch {b}"  # type: ignore[arg-type]
            if companions_replaced
            else f"; top-1 alone agrees with batch {b} on {_pct(c.agreement)} of {_compared(c)}"  # type: ignore[arg-type]
        )
    return {"reference": reference, "outputs": outputs, "summary": line}


def recalibration_effect(recal: Recalibration) -> dict[str, object]:
    """BN003's effect at the model's outputs: stored statistics against statistics recomputed from the data."""
    outputs = {name: c.numbers() for name, c in recal.outputs.items()}
    # the output whose predictions change most, where some hold class scores: a head that moves far in its
    # own spread may keep every prediction while another changes a fifth of them
    agreeing = [(c.agreement, name) for name, c in recal.outputs.items() if c.agreement is not None]
    shifted = [(c.shift, name) for name, c in recal.outputs.items() if c.shift == c.shift]
    worst = min(agreeing)[1] if agreeing else max(shifted)[1] if shifted else None
    if worst is None:
        line = "model outputs not comparable"
    else:
        c = recal.outputs[worst]
        line = (
            f"{worst} move {c.shift:.3g} sd with statistics recomputed from the data"
            if c.changed is None
            else f"{worst}: {_moved(c)} with statistics recomputed from the data"
        )
        if c.agreement is not None:
            line += f"; top-1 agrees on {_pct(c.agreement)} of {_compared(c)}"
    return {
        "reference": "statistics recomputed from the data",
        "recomputed_layers": list(recal.layers),
        "samples": recal.samples,
        "outputs": outputs,
        "summary": line,
    }
