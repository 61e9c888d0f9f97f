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

import numpy as np

from bncheck.checks._util import describe, shape_json
from bncheck.findings import Finding, Severity
from bncheck.model import Kind, ModelView, NormLayer, ProbeResult, TensorStats

CODE = "BN001"
SLUG = "collapse"
SEVERITY = Severity.ERROR

#: Relative spread (max - min over batch and spatial positions, over max(1, |value|)) below which a channel
#: counts as constant. The ONNX reference gives exactly the bias on a one-element set; onnxruntime's kernels
#: give it up to rounding amplified by 1/sqrt(eps) (measured: 3e-5 on a BN at batch 1, 2.3e-4 on an
#: InstanceNorm on 1x1 maps), while a working normalization spreads its output over about |gamma| x 4.
CONSTANT_TOLERANCE = 1e-3

HINT = (
    "Run the layer in inference mode with moving statistics (export with model.eval() / training=False), or "
    "normalize over more elements (LayerNorm over channels, GroupNorm with more channels per group)."
)


def collapse_condition(layer: NormLayer) -> dict[str, int] | None:
    """The condition under which ``layer``'s normalized set has one element, or None if it never does.

    ``{}`` means for every input; ``{"batch_size": 1}`` means at batch size 1; ``{"<dim>": 1}`` for another
    symbolic dimension. Unknown shapes or axes give None: the check does not guess.
    """
    if not layer.computes_statistics or not layer.centered or layer.kind is Kind.UNIT:
        return None
    if layer.axes is None or layer.input_shape is None:
        return None
    product = 1
    free: dict[str, int] = {}
    for axis in layer.axes:
        if axis >= len(layer.input_shape):
            return None
        if layer.kind is Kind.GROUP and axis == layer.channel_axis:
            continue
        dim = layer.input_shape[axis]
        if isinstance(dim, int):
            product *= dim
        elif axis == layer.batch_axis:
            free["batch_size"] = 1  # an unknown or symbolic batch dim admits 1
        elif isinstance(dim, str):
            free[dim] = 1
        else:
            return None
    if layer.kind is Kind.GROUP:
        if not layer.groups or not layer.channels:
            return None
        product *= max(layer.channels // layer.groups, 1)
    return free if product == 1 else None


def is_collapsed(inp: TensorStats | None, out: TensorStats | None, bias: np.ndarray | None = None) -> bool:
    """Output constant per channel over batch and positions (or all zero) while the input is not; or, when
    the input has a single value per channel (batch 1 on 1x1 maps) so that "varies" cannot be judged within
    the batch, output equal to the layer's ``bias`` in every channel while the input is not all zero."""
    if inp is None or out is None or out.count == 0:
        return False
    if out.total_nonfinite or inp.total_nonfinite:
        return False  # BN005's business

    def constant(stats: TensorStats) -> np.ndarray:
        spread = stats.max.astype(np.float64) - stats.min.astype(np.float64)
        scale = np.maximum(1.0, np.maximum(np.abs(stats.max), np.abs(stats.min)))
        return spread <= CONSTANT_TOLERANCE * scale

    all_zero = bool(np.all(out.zeros == out.count))
    input_all_zero = bool(np.all(inp.zeros == inp.count))
    if input_all_zero:
        return False  # a dead input makes any centred norm output its bias: the cause is upstream
    if all_zero:
        return True
    if not np.all(constant(out)):
        return False
    if not np.all(constant(inp)):
        return True
    if bias is None or np.size(bias) != out.channels:
        return False
    beta = np.asarray(bias, dtype=np.float64).ravel()
    scale = np.maximum(1.0, np.abs(beta))
    return bool(np.all(np.abs(out.max - beta) <= CONSTANT_TOLERANCE * scale)
                and np.all(np.abs(out.min - beta) <= CONSTANT_TOLERANCE * scale))


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
