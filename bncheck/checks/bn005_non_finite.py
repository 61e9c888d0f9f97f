"""BN005 non-finite: NaN/Inf in parameters or outputs, negative variance.

What it does
    Statically, it flags NaN or Inf in any stored parameter (scale, bias, running mean, running variance),
    negative running variances, and NaN or Inf in the stored weights of a convolution or matrix product (where a
    batch norm folded into it leaves its NaN). With `probe`, it reports the first layer (in graph order) whose input or
    output holds NaN/Inf, and at which batch sizes: downstream layers inherit them and are not reported again.
    Where only some samples hold them, it counts them; on synthetic inputs that is a warning (the values of
    those samples made them, not the parameters, and random inputs may hold values the model never gets).

Why is this bad?
    A NaN parameter makes its whole channel NaN for every input; a negative running variance makes
    ``sqrt(var + eps)`` NaN at inference (training never produces one: the file was corrupted, mis-converted,
    or stores something else, such as a standard deviation minus an offset). NaN then spreads to every output.

Example
    A checkpoint saved after a diverged step; a converter that wrote ``log(var)`` into the variance slot.

Fix
    Restore the parameters from a healthy checkpoint, or recompute running statistics from data
    (``bncheck fix MODEL --data CALIB -o FIXED``); find where NaN first appears with ``bncheck probe``.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from bncheck.checks._util import NOT_LOADED, describe, keras_unloadable
from bncheck.findings import Finding, Severity, number
from bncheck.model import ModelView, NormLayer, ProbeResult
from bncheck.verdicts import non_finite_parameters

CODE = "BN005"
SLUG = "non-finite"
SEVERITY = Severity.ERROR

HINT_PARAMS = (
    "Restore the parameters from a healthy checkpoint, or recompute the running statistics from data "
    "(`bncheck fix MODEL --data CALIB -o FIXED`)."
)
#: the same where bncheck does not load the file (its config names code from outside Keras), so cannot fix it
HINT_PARAMS_KERAS = (
    f"Restore the parameters from a healthy checkpoint, or recompute the running statistics in Keras ({NOT_LOADED})."
)
HINT_WEIGHTS = (
    "Restore the weights from a healthy checkpoint and export again; a batch norm with a NaN or negative running "
    "variance folded into this op by the exporter puts NaN there (check its statistics before exporting)."
)
#: a Keras norm layer read from its stored variables alone (no config describes it): only NaN and Inf are known
HINT_VARIABLES = (
    "Restore the weights from a healthy checkpoint (a NaN or Inf gamma or beta comes from training that diverged "
    "or from an edit of the weights); no config in the file describes the layer, so bncheck checks nothing else "
    "of it."
)
HINT_SYNTHETIC = (
    "Probe with inputs the model is meant to get (`--data`): if NaN/Inf appear there too, follow the tensor "
    "upstream from this layer (log/div/sqrt of bad values, overflow in float16); an integer input such as a "
    "length or a mask may have been drawn out of its range."
)
HINT_OUTPUTS = (
    "Look for NaN/Inf in the stored weights (numpy.isnan on each initializer): a batch norm with a NaN or "
    "negative variance folded into the convolution before it puts NaN there; restore the parameters from a "
    "healthy checkpoint and export again."
)
HINT_OUTPUTS_SYNTHETIC = (
    "Probe with inputs the model is meant to get (`--data`): if every output is NaN/Inf there too, look for NaN/Inf "
    "in the stored weights (a batch norm with a NaN or negative variance folded into a convolution puts it there)."
)
HINT_OBSERVED = (
    "Follow the tensor upstream from this layer: the first NaN/Inf comes from here or from the ops just before "
    "it (log/div/sqrt of bad values, overflow in float16)."
)


def check(view: ModelView, probe: ProbeResult | None) -> Iterator[Finding]:
    flagged: set[str] = set()
    for layer in view.layers:
        params = non_finite_parameters(layer)
        if params:
            flagged.add(layer.name)
            listed = ", ".join(f"{k} ({v['nan']} NaN, {v['inf']} Inf)" for k, v in params.items())
            yield Finding(
                CODE,
                SLUG,
                SEVERITY,
                layer.name,
                f"{describe(layer)} has non-finite parameters: {listed}",
                HINT_PARAMS_KERAS if keras_unloadable(layer) else HINT_PARAMS,
                {"kind": "parameters", "parameters": params},
            )
        if layer.var is not None and layer.uses_running_stats:
            var = np.asarray(layer.var, dtype=np.float64).ravel()
            negative = var[np.isfinite(var) & (var < 0)]
            if negative.size:
                flagged.add(layer.name)
                yield Finding(
                    CODE,
                    SLUG,
                    SEVERITY,
                    layer.name,
                    f"{describe(layer)} has a negative running variance in {negative.size} channel(s) (min "
                    f"{negative.min():.3g}): sqrt(var + eps) is NaN at inference",
                    HINT_PARAMS_KERAS if keras_unloadable(layer) else HINT_PARAMS,
                    {"kind": "negative-variance", "channels": int(negative.size), "min": number(negative.min())},
                )
    for broken in view.broken_weights:
        listed = ", ".join(f"{t!r} ({nan} NaN, {inf} Inf of {size})" for t, (nan, inf, size) in broken.tensors.items())
        yield Finding(
            CODE,
            SLUG,
            SEVERITY,
            broken.name,
            f"{broken.op_type} {broken.node!r} has non-finite {broken.what}: {listed}; every output it "
            "reaches may be NaN, or wrong where a later op hides the NaN",
            HINT_VARIABLES if broken.what == "variables" else HINT_WEIGHTS,
            {
                "kind": "weights",
                "op_type": broken.op_type,
                "node": broken.node,
                "weights": {
                    t: {"nan": nan, "inf": inf, "values": size} for t, (nan, inf, size) in broken.tensors.items()
                },
            },
        )
    if view.broken_weights:
        return  # NaN/Inf met downstream come from those weights first: the layers they reach are not the source
    first = _first_observed(view, probe, flagged)
    if first is None and not flagged and probe is not None and probe.nonfinite_outputs:
        yield _outputs_finding(view, probe)
    if first is not None and probe is not None:
        layer, where, samples = first
        if layer.name not in flagged:
            sizes = list(samples)
            evidence: dict[str, object] = {"kind": "observed", "where": where, "batch_sizes": sizes}
            message = (
                f"NaN/Inf first appear at the {where} of {describe(layer)} at batch size {', '.join(map(str, sizes))}"
            )
            severity, hint = SEVERITY, HINT_OBSERVED
            if any(count < batch for batch, count in samples.items()):
                evidence["samples_nonfinite"] = {str(batch): count for batch, count in samples.items()}
                counted = ", ".join(f"{count} of {batch}" for batch, count in samples.items())
                message += f", in {counted} samples (the others finite)"
                if probe.data_source == "synthetic":
                    # some random samples only: their values, not the parameters (NaN weights reach every
                    # sample); synthetic inputs may hold what the model never gets (a sequence length of 0)
                    severity, hint = Severity.WARNING, HINT_SYNTHETIC
                    message += "; with synthetic inputs, which may hold values the model never gets"
            yield Finding(CODE, SLUG, severity, layer.name, message, hint, evidence)


def _outputs_finding(view: ModelView, probe: ProbeResult) -> Finding:
    """Every sample's outputs NaN/Inf and no normalization layer shows where they start: a BN folded into the
    convolution before it carries its NaN or negative variance there (onnxsim, tf2onnx and torch's default
    export fold them), or no layer is measured upstream. An error on the data; with synthetic inputs a warning,
    since their values may be what makes them (a log of N(0, 1) values)."""
    name, samples = next(iter(probe.nonfinite_outputs.items()))
    synthetic = probe.data_source == "synthetic"
    none_left = (
        " (the graph has no normalization layer left: one folded into a convolution carries its NaN or negative "
        "variance into the weights)"
    )
    message = (
        f"model output {name!r} holds NaN/Inf in every sample of the probe's batch of {samples}"
        f"{none_left if not view.layers else ''}, and no normalization layer shows where they start"
    )
    if synthetic:
        message += "; with synthetic inputs, which may hold values the model never gets"
    evidence = {
        "kind": "outputs",
        "outputs": sorted(probe.nonfinite_outputs),
        "samples": samples,
        "data": probe.data_source,
    }
    hint = HINT_OUTPUTS_SYNTHETIC if synthetic else HINT_OUTPUTS
    return Finding(CODE, SLUG, Severity.WARNING if synthetic else SEVERITY, name, message, hint, evidence)


def _first_observed(
    view: ModelView, probe: ProbeResult | None, flagged: set[str]
) -> tuple[NormLayer, str, dict[int, int]] | None:
    """The first layer in graph order whose input or output holds NaN/Inf in some probe batch, and how many
    samples of each such batch hold them; None where a layer ``flagged`` for its parameters that the probe
    could not measure (inside a Loop's body) comes first: what the layers after it hold may be its NaN."""
    if probe is None:
        return None
    for layer in view.layers:
        if layer.name in flagged and all(probe.at(b, layer.name) is None for b in probe.batch_sizes):
            return None
        for where in ("input", "output"):
            samples: dict[int, int] = {}
            for batch_size in probe.batch_sizes:
                seen = probe.at(batch_size, layer.name)
                stats = getattr(seen, where) if seen is not None else None
                if stats is not None and stats.total_nonfinite:
                    rows = np.asarray(stats.sample_mean)
                    # a NaN/Inf element makes its sample's channel mean non-finite
                    bad = int(np.count_nonzero(~np.isfinite(rows).all(axis=1))) if rows.ndim == 2 else batch_size
                    samples[batch_size] = bad or batch_size
            if samples:
                return layer, where, samples
    return None
