"""BN001 collapse: the layer's output is constant (its bias, often 0) because it normalizes a one-element set.

What it does
    Statically, from the layer's normalization axes and the inferred input shape, it finds layers whose
    normalized set (the elements one mean and variance are computed over) has exactly one element for some
    legal input: a train-mode BatchNormalization on 1x1 feature maps at batch size 1, an InstanceNorm on 1x1
    maps, a LayerNorm over an axis of size 1, a GroupNorm with one element per group. Only a set that has one
    element at batch size 1 whatever the input size (fixed dims: after global pooling, on a 1-D head) is an
    error statically; one that also needs a symbolic dim (a feature map's height) to be 1 is an info naming
    that condition, since the model runs at input sizes it does not fix. With `probe`, the observation at
    the shapes that ran replaces the prediction: the batch sizes at which a layer's output was constant over
    the batch and spatial positions in every channel (or all zero) while its input was not, or at which the
    measured set had one element. Where the sets that gave a constant output hold many elements, the message
    names the cause instead of a one-element set: an epsilon that swamps their measured variance (at least
    EPSILON_SWAMPS times it), else sets of equal values.

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

import re
from collections.abc import Iterator
from dataclasses import replace

from bncheck.checks._util import describe
from bncheck.findings import Finding, Severity, shape_json
from bncheck.model import (
    Dim,
    Kind,
    ModelView,
    NormLayer,
    ProbeResult,
    fixed_batch,
    observed_set_size,
    set_variance,
)
from bncheck.verdicts import (
    EPSILON_SWAMPS,
    collapse_condition,
    collapse_is_certain,
    equal_sets,
    ran_on_own_statistics,
    seen_constant,
)

CODE = "BN001"
SLUG = "collapse"
SEVERITY = Severity.ERROR

HINT = (
    "Run the layer in inference mode with moving statistics (export with model.eval() / training=False), or "
    "normalize over more elements (LayerNorm over channels, GroupNorm with more channels per group)."
)
#: for norms without moving statistics (instance, group, layer norms): inference mode changes nothing
HINT_PER_SAMPLE = (
    "Normalize over more than one value: where the size-1 axis comes from the input (a short time axis, a small "
    "image pooled to 1x1), feed larger inputs; else normalize over other axes (LayerNorm over channels, GroupNorm "
    "with more channels per group) or remove the norm."
)


def _hint(layer: NormLayer) -> str:
    return HINT if layer.kind is Kind.BATCH else HINT_PER_SAMPLE


def check(view: ModelView, probe: ProbeResult | None) -> Iterator[Finding]:
    # the first layer seen collapsing at each batch size (the layers come in graph order): everything after it
    # may get sets of equal values from it, an effect of that collapse rather than one of its own
    collapsed_at: dict[int, str] = {}
    fixed = fixed_batch(view.inputs)
    for layer in view.layers:
        condition = collapse_condition(layer)
        sizes = _observed_sizes(layer, probe)
        if condition is None and fixed is not None and fixed > 1 and not sizes:
            condition = _at_batch_1(layer, fixed)
        observed = _observed_batch_sizes(layer, probe, sizes)
        evidence: dict[str, object] = {
            "axes": list(layer.axes) if layer.axes is not None else None,
            "input_shape": shape_json(layer.input_shape),
            "predicted": condition is not None,
        }
        if sizes:
            evidence["observed_set_size"] = {str(b): n for b, n in sizes.items()}
        if condition is not None:
            evidence["condition"] = condition
        if observed:
            evidence["kind"] = "observed"
            evidence["batch_sizes"] = observed
            listed = ", ".join(str(b) for b in observed)
            larger = sorted({sizes[b] for b in observed if sizes.get(b, 1) > 1})
            hint = _hint(layer)
            if larger:  # constant over sets of many elements: not a one-element set
                cause, hint = _many_element_cause(layer, probe, observed, evidence)
                evidence["normalized_set_size"] = larger[0]
                message = (
                    f"{describe(layer)} output is {_collapsed(layer)} at batch size {listed} whatever the input, "
                    f"though each normalized set holds {_span(larger)} elements: {cause}"
                )
                upstream = {collapsed_at[b] for b in observed if b in collapsed_at}
                if (
                    evidence["cause"] == "equal-values"
                    and len(upstream) == 1
                    and all(b in collapsed_at for b in observed)
                    and probe is not None
                    and len(observed) < len(probe.batch_sizes)  # not constant where nothing upstream collapsed
                ):
                    (first,) = upstream
                    evidence["after_collapse_of"] = first
                    message += f", as the collapse of {first!r} before it (BN001) makes them"
                    yield Finding(CODE, SLUG, Severity.INFO, layer.name, message, hint, evidence)
                    continue
            else:
                evidence["normalized_set_size"] = 1
                message = (
                    f"{describe(layer)} output is {_collapsed(layer)} at batch size {listed} whatever the input: "
                    "the normalized set has one element"
                )
            for b in observed:
                collapsed_at.setdefault(b, layer.name)
            if fixed is not None and all(b < fixed for b in observed):
                # the probe ran a relaxed copy at sizes the file never runs: no defect at the file's own size
                evidence["file_batch_size"] = fixed
                message += f", a batch size this file does not run (its batch dimension is fixed to {fixed})"
                yield Finding(CODE, SLUG, Severity.INFO, layer.name, message, hint, evidence)
                continue
            yield Finding(CODE, SLUG, SEVERITY, layer.name, message, hint, evidence)
        elif condition is None:
            continue
        elif collapse_is_certain(condition):
            if "batch_size" in condition:
                if 1 in sizes:
                    continue  # probed at batch size 1 and not constant: the observation wins
                # a probe at batch size 1 measures the set instead: axis 0 may hold more than the batch (LeViT's
                # BatchNorm1d over [B*N, C], N tokens a sample)
                evidence["replaced_by_probe"] = True
            evidence["kind"] = "static"
            evidence["normalized_set_size"] = 1
            message = (
                f"{describe(layer)} normalizes over a set of one element {_where(condition)}: its output is "
                f"{_collapsed(layer, 'its bias')} for every input"
            )
            if "batch_size" in condition and fixed is not None and fixed > 1:
                evidence["file_batch_size"] = fixed
                message += f", a batch size this file does not run (its batch dimension is fixed to {fixed})"
                yield Finding(CODE, SLUG, Severity.INFO, layer.name, message, _hint(layer), evidence)
                continue
            yield Finding(CODE, SLUG, SEVERITY, layer.name, message, _hint(layer), evidence)
        elif not sizes:  # with a probe, the sizes that ran replace the prediction
            evidence["kind"] = "conditional"
            evidence["replaced_by_probe"] = True  # a probe measures the sizes that run instead
            evidence["depends_on"] = [k for k in condition if k != "batch_size"]
            message = _conditional(view, layer, condition)
            yield Finding(CODE, SLUG, Severity.INFO, layer.name, message, _hint(layer), evidence)


#: what a constant output over sets of many elements needs instead of another normalization axis
EPSILON_HINT = (
    "Use the epsilon the model was trained with (a converter that writes another one is the usual cause: "
    "compare with the source framework's layer) and export again."
)
EQUAL_VALUES_HINT = (
    "Check what feeds the layer: normalizing a set of equal values (a broadcast or upsampled constant, a map "
    "that saturates) always gives its bias."
)


def _many_element_cause(
    layer: NormLayer, probe: ProbeResult | None, observed: list[int], evidence: dict[str, object]
) -> tuple[str, str]:
    """Why an output is constant over sets of more than one element, and the hint: an epsilon that swamps the
    sets' variance (x - mean is divided by about sqrt(epsilon)), else sets of equal values."""
    seen = None if probe is None else probe.at(observed[0], layer.name)
    variance = set_variance(layer, seen)
    eps = layer.epsilon
    if variance is not None:
        evidence["median_set_variance"] = variance
    equal = variance is not None and seen is not None and seen.input is not None and equal_sets(variance, seen.input)
    if eps is not None and eps > 0 and not equal and (variance is None or eps >= EPSILON_SWAMPS * variance):
        evidence["cause"] = "epsilon"
        measured = f" (median {variance:.3g})" if variance is not None else ""
        return (
            f"its epsilon {eps:.3g} swamps the sets' variance{measured}, so (x - mean) / sqrt(var + eps) is about 0",
            EPSILON_HINT,
        )
    evidence["cause"] = "equal-values"
    return "the values within each set are equal, so x - mean is 0", EQUAL_VALUES_HINT


def _at_batch_1(layer: NormLayer, fixed: int) -> dict[str, int] | None:
    """In a file whose batch is fixed to ``fixed`` (torch's export without dynamic axes writes it into every
    tensor), the condition under which the layer's set would have one element at batch size 1, or None."""
    shape = layer.input_shape
    axis = layer.batch_axis
    if shape is None or axis is None or axis >= len(shape) or shape[axis] != fixed:
        return None
    free = tuple("batch" if a == axis else d for a, d in enumerate(shape))
    return collapse_condition(replace(layer, input_shape=free))


def _span(sizes: list[int]) -> str:
    return str(sizes[0]) if len(sizes) == 1 else f"{sizes[0]} to {sizes[-1]}"


def _collapsed(layer: NormLayer, beta: str = "constant (its bias)") -> str:
    """What a one-element set makes of the output: beta, or NaN where the variance is rescaled by N/(N-1)."""
    return "NaN (zero over zero: its variance is rescaled by N/(N-1))" if layer.extra.get("rescaled") else beta


def _where(condition: dict[str, int]) -> str:
    if not condition:
        return "for every input"
    return "at batch size 1"


def _conditional(view: ModelView, layer: NormLayer, condition: dict[str, int]) -> str:
    """The condition in the model's own words: its dim names, or the axis when the name was invented."""
    shape = layer.input_shape or ()
    terms = []
    for axis in layer.axes or ():
        if layer.kind is Kind.GROUP and axis == layer.channel_axis:
            continue
        terms.append("batch" if axis == layer.batch_axis else _dim_label(shape[axis], axis))
    dims = [_dim_label(shape[a], a) for a in layer.axes or () if isinstance(shape[a], str) and a != layer.batch_axis]
    when = (["batch size 1"] if "batch_size" in condition else []) + [f"{d} = 1" for d in dims]
    inputs = "; ".join(
        f"{spec.name}: {' x '.join(_input_dim(d, i) for i, d in enumerate(spec.shape))}"
        for spec in view.inputs
        if spec.shape is not None and any(not isinstance(d, int) for d in spec.shape[1:])
    )
    inputs_text = f" (input {inputs})" if inputs else ""
    return (
        f"{describe(layer)} normalizes over {' x '.join(terms)} elements, whose size the model does not fix"
        f"{inputs_text}: a set of one element only at {' and '.join(when)}; `bncheck probe` at the input sizes "
        "you run measures it"
    )


#: dim names the tools invent for dims the file leaves unnamed (onnx shape inference's unk__N, the Keras
#: reader's <layer>_dim<i>): not the model's own, so the message names the axis instead
_INVENTED = re.compile(r"unk__\d+|.+_dim\d+")


def _dim_label(dim: Dim, axis: int) -> str:
    if isinstance(dim, int):
        return str(dim)
    if isinstance(dim, str) and not _INVENTED.fullmatch(dim):
        return repr(dim)
    return f"axis {axis}"


def _input_dim(dim: Dim, axis: int) -> str:
    if isinstance(dim, int):
        return str(dim)
    if isinstance(dim, str) and not _INVENTED.fullmatch(dim):
        return dim
    return "batch" if axis == 0 else "?"


def _observed_sizes(layer: NormLayer, probe: ProbeResult | None) -> dict[int, int]:
    """Batch size -> elements in one normalized set at the shapes the probe ran."""
    if probe is None:
        return {}
    found = {}
    for batch_size in probe.batch_sizes:
        size = observed_set_size(layer, probe.at(batch_size, layer.name))
        if size is not None:
            found[batch_size] = size
    return found


def _observed_batch_sizes(layer: NormLayer, probe: ProbeResult | None, sizes: dict[int, int]) -> list[int]:
    """Batch sizes at which the output was seen constant, or the measured set had one element in a layer
    that centres on its own statistics (x - mean(x) = 0 exactly, whatever the input)."""
    if probe is None or not ran_on_own_statistics(layer, probe):
        # an inference-mode batch norm is an affine map per channel: a constant output there is a gamma of 0
        # (torchvision's zero_init_residual) or an epsilon far above the variance (BN004), not a collapse
        return []
    found = []
    for batch_size in probe.batch_sizes:
        seen = probe.at(batch_size, layer.name)
        if seen is None:
            continue
        if seen_constant(layer, seen, statistics=True):
            found.append(batch_size)
    return found
