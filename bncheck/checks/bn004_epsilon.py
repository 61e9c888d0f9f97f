"""BN004 epsilon: epsilon zero, below TensorFlow's 1.001e-5 clamp, or larger than some channels' variance.

What it does
    - epsilon < 0: an error (the square root of a negative number wherever a set's variance is below -epsilon).
    - epsilon == 0: an error when some channel's running variance is 0 (0/0 at inference), else a warning
      (a constant input gives 0/0).
    - 0 < epsilon < 1e-5 (beyond float32 rounding; PyTorch's and ONNX's default 1e-5 is stored as
      9.99999975e-06 and is fine) on a batch norm: a warning, with the largest relative change of the output
      that the clamp to 1.001e-5 causes on this layer's stored variances (dead channels left out).
    - epsilon >= the median variance of the sets an instance or group norm normalized at the probe's largest
      batch: info, with the damping factor (a converter's epsilon shows so).
    - epsilon >= the running variance in some live channel: info, with the number of channels and the worst
      factor ``sqrt(var / (var + eps))`` by which epsilon damps their outputs. Dead channels (output spread
      ``|gamma| * sqrt(var / (var + eps))`` at most 1e-3 of the layer's largest: variance ~1e-44 or gamma ~0)
      are left out: their output is their beta whatever epsilon is.

Why is this bad?
    TensorFlow's fused batch-norm kernel and cuDNN silently raise epsilon to 1.001e-5, so the same weights give
    different outputs in different runtimes; the difference is largest in channels of small variance. An
    epsilon of 0 divides by zero on a constant channel. An epsilon large against a channel's variance is not a
    train/inference mismatch (training normalized with the same epsilon); it is reported as info because it
    explains why the layer is not the identity at mean 0 / variance 1 (``x / sqrt(1 + eps)``) and why such
    channels are damped.

Example
    ``BatchNormalization(epsilon=1e-8)`` in Keras, converted to ONNX: onnxruntime uses 1e-8, TensorFlow 1.001e-5.

Fix
    Use epsilon >= 1.001e-5 (1e-3 is Keras's default, 1e-5 PyTorch's) when training, so that every runtime
    computes the same thing; for a trained model, keep epsilon and check the runtime you deploy to. An epsilon
    larger than some channels' variance needs no fix when the model was trained with it.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from bncheck.checks._util import describe
from bncheck.findings import Finding, Severity, number
from bncheck.model import Kind, ModelView, NormLayer, ProbeResult, set_variance
from bncheck.verdicts import (
    DOMINANCE_RATIO,
    NEGLIGIBLE_OUTPUT_RATIO,
    TF_EPSILON_CLAMP,
    below_clamp,
    clamp_effect,
    equal_sets,
    folded_stats,
    judged_running_stats,
    live_channels,
)

CODE = "BN004"
SLUG = "epsilon"
SEVERITY = Severity.WARNING


def check(view: ModelView, probe: ProbeResult | None) -> Iterator[Finding]:
    for layer in view.layers:
        if layer.epsilon is None:
            continue
        eps = float(layer.epsilon)
        var = _running_var(layer)
        if eps < 0.0:
            yield _negative(layer, eps)
            continue
        if eps == 0.0:
            yield _zero(layer, var)
            continue
        # folded statistics make epsilon the exporter's, beside a variance of 1: the clamp moves nothing; one
        # added to the standard deviation (MeanVarianceNormalization written out) is no fused kernel's epsilon
        clamped = (
            layer.kind is Kind.BATCH
            and below_clamp(eps)
            and not folded_stats(layer)
            and not layer.extra.get("eps_after_sqrt")
        )
        dominated = None if var is None else np.isfinite(var) & (var >= 0) & (eps >= DOMINANCE_RATIO * var)
        # the live channels only where a finding reads them: most layers have no channel epsilon dominates
        needed = dominated is not None and (clamped or bool(dominated.any()))
        live = live_channels(layer) if needed else None
        if clamped:
            effect = clamp_effect(eps, var, live)
            change = (
                f"; on this layer's variances the clamp changes outputs by up to {effect:.3g} (relative)"
                if effect is not None
                else ""
            )
            yield Finding(
                CODE,
                SLUG,
                SEVERITY,
                layer.name,
                f"{describe(layer)} epsilon {eps:.3g} is below 1.001e-5, the minimum TensorFlow's fused kernel "
                f"and cuDNN silently clamp to: runtimes disagree{change}",
                "Train and export with epsilon >= 1.001e-5 so every runtime computes the same output; otherwise "
                "validate the model on the runtime you deploy to.",
                {"kind": "below-clamp", "epsilon": eps, "clamp": TF_EPSILON_CLAMP, "max_relative_change": effect},
            )
        finding = _dominance(layer, eps, var, live, dominated)
        if finding is None and var is None:
            finding = _dominates_measured(layer, eps, probe)
        if finding is not None:
            yield finding


def _dominates_measured(layer: NormLayer, eps: float, probe: ProbeResult | None) -> Finding | None:
    """The info of :func:`_dominance` for an instance or group norm (no running statistics), from the variance
    of its sets measured at the probe's largest batch: where epsilon is at least the median set's variance,
    most sets' outputs are damped. Not for batch norms that compute their statistics: their sets are channels,
    and channels dead in a trained model (variance ~0) can make up the median (layout_cdla's twin)."""
    if probe is None or not probe.batch_sizes or layer.kind not in (Kind.INSTANCE, Kind.GROUP):
        return None
    largest = max(probe.batch_sizes)
    seen = probe.at(largest, layer.name)
    variance = set_variance(layer, seen)
    if variance is None or not np.isfinite(variance) or eps < DOMINANCE_RATIO * variance:
        return None
    assert seen is not None and seen.input is not None  # set_variance measured it
    if equal_sets(variance, seen.input):
        return None  # sets of equal values (one element, say): no spread for epsilon to damp; BN001's business
    factor = float(np.sqrt(variance / (variance + eps)))
    return Finding(
        CODE,
        SLUG,
        Severity.INFO,
        layer.name,
        f"{describe(layer)} epsilon {eps:.3g} is at least the variance of its normalized sets measured at batch "
        f"size {largest} (median {variance:.3g}): it damps their outputs by a factor {factor:.3g} "
        "(sqrt(var / (var + eps))); fine if the model was trained with it, else the exporter changed it",
        "Compare epsilon with the source framework's layer: a converter that writes another epsilon changes "
        "these outputs; nothing to fix if the model was trained with it.",
        {
            "kind": "dominates-measured",
            "epsilon": eps,
            "batch_size": largest,
            "median_set_variance": number(variance),
            "factor": factor,
        },
    )


def _running_var(layer: NormLayer) -> np.ndarray | None:
    if not judged_running_stats(layer) or layer.var is None:
        return None
    return np.asarray(layer.var, dtype=np.float64).ravel()


def _negative(layer: NormLayer, eps: float) -> Finding:
    return Finding(
        CODE,
        SLUG,
        Severity.ERROR,
        layer.name,
        f"{describe(layer)} epsilon {eps:.3g} is negative: every set whose variance is below {-eps:.3g} takes the "
        "square root of a negative number (NaN outputs), and sets just above it are divided by almost 0",
        "Use the epsilon the model was trained with (1e-5 or 1e-3; a converter that writes another one is the usual "
        "cause) and export again.",
        {"kind": "negative", "epsilon": eps},
    )


def _zero(layer: NormLayer, var: np.ndarray | None) -> Finding:
    zero_channels = int(np.sum(var == 0.0)) if var is not None else 0
    if zero_channels:
        return Finding(
            CODE,
            SLUG,
            Severity.ERROR,
            layer.name,
            f"{describe(layer)} epsilon is 0 and {zero_channels} channel(s) have running variance 0: "
            "division by zero at inference (NaN/Inf outputs)",
            "Set epsilon > 0 (1e-5 or 1e-3) and re-export.",
            {"kind": "zero", "epsilon": 0.0, "zero_variance_channels": zero_channels},
        )
    return Finding(
        CODE,
        SLUG,
        SEVERITY,
        layer.name,
        f"{describe(layer)} epsilon is 0: a channel whose variance is 0 divides by zero",
        "Set epsilon > 0 (1e-5 or 1e-3) and re-export.",
        {"kind": "zero", "epsilon": 0.0, "zero_variance_channels": 0},
    )


def _dominance(
    layer: NormLayer, eps: float, var: np.ndarray | None, live: np.ndarray | None, dominated: np.ndarray | None
) -> Finding | None:
    """``dominated``: the channels whose valid running variance epsilon dominates (see DOMINANCE_RATIO)."""
    if var is None or dominated is None:
        return None
    dead = int(np.sum(dominated & ~live)) if live is not None else 0
    if live is not None:
        dominated = dominated & live
    count = int(np.sum(dominated))
    if count == 0:
        return None
    factors = np.sqrt(var[dominated] / (var[dominated] + eps))
    worst = float(np.min(factors))
    skipped = f"; {dead} more where the channel is dead, left out" if dead else ""
    return Finding(
        CODE,
        SLUG,
        Severity.INFO,
        layer.name,
        f"{describe(layer)} epsilon {eps:.3g} is at least the running variance in {count} of {var.size} "
        f"channels: epsilon damps their outputs by up to a factor {worst:.3g} (sqrt(var / (var + eps))), as it "
        f"did in training; not a train/inference mismatch{skipped}",
        "Nothing to fix if the model was trained with this epsilon; a lower epsilon would change these channels' "
        "outputs.",
        {
            "kind": "dominates",
            "epsilon": eps,
            "channels": count,
            "of_channels": int(var.size),
            "dead_channels": dead,
            "negligible_output_ratio": NEGLIGIBLE_OUTPUT_RATIO,
            "worst_factor": worst,
            "min_variance": number(float(np.min(var[dominated]))),
        },
    )
