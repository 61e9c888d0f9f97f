"""BN001 collapse: the layer's output is constant (its bias, often 0) because it normalizes a one-element set.

What it does
    Statically, from the layer's normalization axes and the inferred input shape, it finds layers whose
    normalized set (the elements one mean and variance are computed over) has exactly one element for some
    legal input: a train-mode BatchNormalization on 1x1 feature maps at batch size 1, an InstanceNorm on 1x1
    maps, a LayerNorm over an axis of size 1, a GroupNorm with one element per group. With `probe`, it also
    reports the batch sizes at which a layer's output was observed constant over the batch and spatial
    positions in every channel (or all zero) while its input was not.

Why is this bad?
    With one element, x - mean(x) = 0 and the normalized value is 0 whatever the input; the layer outputs its
    bias (beta) for every input. Everything downstream is then input-independent: the "all logits are zero at
    batch size 1" bug. Statistics over batch and spatial axes together (batch size 1 on 3D volumes, say) do
    not collapse: only a set of exactly one element does.

Example
    A convnet exported in training mode whose last BatchNormalization follows global average pooling (1x1
    maps): at batch 1, every prediction is the same.

Fix
    Run the layer in inference mode (moving statistics), so its output no longer depends on the statistics of
    a single element; or normalize over more elements (LayerNorm over the channel axis, GroupNorm with more
    channels per group); or remove the normalization after global pooling.
"""

from __future__ import annotations

from collections.abc import Iterator

from bncheck.checks._util import describe
from bncheck.findings import Finding, Severity, shape_json
from bncheck.model import ModelView, NormLayer, ProbeResult
from bncheck.verdicts import collapse_condition, is_collapsed

CODE = "BN001"
SLUG = "collapse"
SEVERITY = Severity.ERROR

HINT = (
    "Run the layer in inference mode with moving statistics (export with model.eval() / training=False), or "
    "normalize over more elements (LayerNorm over channels, GroupNorm with more channels per group)."
)


def check(view: ModelView, probe: ProbeResult | None) -> Iterator[Finding]:
    for layer in view.layers:
        condition = collapse_condition(layer)
        observed = _observed_batch_sizes(layer, probe)
        if not observed and condition is None:
            continue
        evidence: dict[str, object] = {
            "axes": list(layer.axes) if layer.axes is not None else None,
            "input_shape": shape_json(layer.input_shape),
            "predicted": condition is not None,
        }
        if condition is not None:
            evidence["condition"] = condition
            evidence["normalized_set_size"] = 1
        where = _where(condition)
        if observed:
            evidence["kind"] = "observed"
            evidence["batch_sizes"] = observed
            sizes = ", ".join(str(b) for b in observed)
            message = (
                f"{describe(layer)} output is constant (its bias) at batch size {sizes} whatever the input: "
                "the normalized set has one element"
            )
        else:
            evidence["kind"] = "static"
            message = (
                f"{describe(layer)} normalizes over a set of one element {where}: its output is its bias "
                "for every input"
            )
        yield Finding(CODE, SLUG, SEVERITY, layer.name, message, HINT, evidence)


def _where(condition: dict[str, int] | None) -> str:
    if not condition:
        return "for every input"
    parts = [("batch size 1" if k == "batch_size" else f"{k} = 1") for k in condition]
    return "at " + " and ".join(parts)


def _observed_batch_sizes(layer: NormLayer, probe: ProbeResult | None) -> list[int]:
    if probe is None:
        return []
    sizes = []
    for batch_size in probe.batch_sizes:
        seen = probe.at(batch_size, layer.name)
        bias = layer.bias if layer.computes_statistics else None
        if seen is not None and is_collapsed(seen.input, seen.output, bias):
            sizes.append(batch_size)
    return sizes
