"""BN003 stale-stats: moving statistics never updated, or far from the data's.

What it does
    Statically, it flags inference-mode batch norms whose running mean is exactly 0 and running variance
    exactly 1 in every channel: the initial values, so the update ops never ran. A layer with only some
    channels at those values is not stale (a dead channel can legitimately have mean 0), nor one whose zeros
    include -0.0, which no initializer writes: an exporter folded its statistics into scale and bias. With
    ``probe --data``, it compares each layer's observed input statistics (all calibration samples, inference
    mode) with the stored ones and reports a layer when the median over channels of the standardized mean
    shift ``|m - mu| / sqrt(var + eps)`` exceeds 0.5, or the median of ``|ln((v + eps) / (var + eps))|``
    exceeds ln 2 (variance off by a factor of 2); channels whose output is negligible both on the stored
    statistics and on the data (dead, or gamma near 0) are left out of the medians. One channel the medians
    outvote is reported too, when on the data its normalized output ``(x - mu) / sqrt(var + eps)`` has a root
    mean square above 10 (about 1 where the statistics fit). Its severity follows
    the effect on the model's outputs: the probe runs the model with the statistics recomputed from the data
    (what `fix` computes) and compares outputs with the stored-statistics model; an error when, on the
    outputs the layer reaches, top-1 agrees on fewer than 95% of the samples or outputs move by more than 0.5
    output standard deviations, else a warning (only layer statistics moved).

Why is this bad?
    At inference a batch norm normalizes with its moving averages. If they never moved (TF1 update ops not in
    the train op's control dependencies; a layer frozen too early) or moved too little (decay 0.999 needs
    thousands of steps), or were accumulated on other data, every activation is mis-scaled and shifted: the
    model works in training mode and fails in inference mode. A Keras layer called with a baked
    ``training=True`` is judged too: Keras 3's ``model.predict(x)`` overrides the flag and uses these
    statistics (Keras 2, where the flag wins everywhere: they count once the flag is removed). At the initial values the layer is not even the identity: it computes ``x / sqrt(1 + eps)``.

Example
    ``tf.contrib.layers.batch_norm(x, is_training=True)`` trained without running ``tf.GraphKeys.UPDATE_OPS``:
    moving_mean stays 0, moving_variance stays 1.

Fix
    Recompute the statistics from representative data: ``bncheck fix MODEL --data CALIB -o FIXED`` (ONNX); in
    Keras, run ``model(x, training=True)`` over representative batches with each BatchNormalization's
    ``momentum`` lowered so the averages converge, then save. When training a TF1 graph, make the update ops
    run (``tf.control_dependencies(update_ops)``) and train long enough for the decay.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import replace

import numpy as np

from bncheck.checks._util import NOT_LOADED, describe, is_keras, keras_unloadable, recalibration_effect
from bncheck.findings import Finding, Severity
from bncheck.model import ModelView, NormLayer, OutputComparison, ProbeResult, Recalibration
from bncheck.verdicts import (
    CHANNEL_RMS_THRESHOLD,
    EFFECT_AGREEMENT_ERROR,
    EFFECT_SHIFT_ERROR,
    LOG_VAR_RATIO_THRESHOLD,
    MEAN_SHIFT_THRESHOLD,
    Drift,
    changes_predictions,
    default_stats_output,
    drift,
    drift_text,
    drifts,
    folded_stats,
    frozen_with_stats,
    has_default_stats,
    judged_running_stats,
    narrower,
    shown,
    silent_in_both,
)

CODE = "BN003"
SLUG = "stale-stats"
SEVERITY = Severity.ERROR

HINT_DEFAULTS = (
    "The moving averages never moved: recompute them from representative data "
    "(`bncheck fix MODEL --data CALIB -o FIXED`); when training a TF1 graph, make the update ops run "
    "(tf.control_dependencies(UPDATE_OPS))."
)
#: drift is judged against the data given: data unlike the training inputs drift every layer, and statistics
#: recomputed from them break a sound model (a trained OCR classifier 98.4% -> 55.5% from standard-normal data);
#: so do data of one class (a splice-site model's donor-only sequences: x2.95 where a mix gave x1.16)
DATA_CAVEAT = (
    " First check that the data are preprocessed as the training inputs were (scale, normalization, channel "
    "order) and cover what the model meets in use (every class and condition, not one): from other or narrower "
    "data layers drift, and statistics recomputed from them break a sound model."
)
HINT_DRIFT = (
    "Recompute the moving statistics on representative data (`bncheck fix MODEL --data CALIB -o FIXED`), or "
    "train longer / with a smaller momentum decay so the averages converge." + DATA_CAVEAT
)
#: a frozen layer's drift (Capricorn's DenseNet backbone, frozen under a trained head, fed /255 inputs: the
#: statistics of ImageNet's preprocessing, x33 off at the first layer; recomputed, 21 of 32 tiles moved from
#: one tissue class to another) is the data's difference from what the head was trained with
HINT_FROZEN = (
    "The layer was saved frozen (trainable: false): if the layers after it were trained while it was frozen "
    "(transfer learning), they were fit on these statistics, and `fix` keeps them (--stats data recomputes "
    "them). Check that the data are preprocessed as in that training (the backbone's preprocess_input, scale, "
    "channel order); recompute the statistics only to adapt the model to new data, then retrain the layers "
    "after it."
)
#: Keras has no update ops to forget (fit updates the averages): recompute the statistics, by bncheck or in Keras.
HINT_KERAS = (
    "Recompute the moving statistics: `bncheck fix MODEL --data CALIB -o FIXED`, or in Keras run "
    "model(x, training=True) over representative batches with each BatchNormalization's momentum lowered (0.0 "
    "for one large batch, or enough batches for the default 0.99 to converge: a few hundred), then save."
)


#: the same where bncheck does not load the file (its config names code from outside Keras), so cannot fix it
HINT_KERAS_UNLOADABLE = (
    f"Recompute the moving statistics in Keras ({NOT_LOADED}): run model(x, training=True) over representative "
    "batches with each BatchNormalization's momentum lowered (0.0 for one large batch, or enough batches for the "
    "default 0.99 to converge: a few hundred), then save."
)


def check(view: ModelView, probe: ProbeResult | None) -> Iterator[Finding]:
    for layer in view.layers:
        if not judged_running_stats(layer):
            continue  # train-mode layers that no call style runs with their running statistics: BN002's
        if folded_stats(layer):
            continue  # an affine map: its 0/1 are the exporter's, not statistics of its input (the layer's note)
        if has_default_stats(layer):
            yield _defaults_finding(layer)
            continue
        finding = _drift_finding(layer, probe)
        if finding is not None:
            yield finding


def _channel_message(
    layer: NormLayer,
    found: Drift,
    data_mean: np.ndarray,
    data_var: np.ndarray,
    medians: str,
    evidence: dict[str, object],
) -> str:
    """The message of a layer with a channel past CHANNEL_RMS_THRESHOLD, with that channel's four numbers (the
    medians may agree: one channel in many does not move them), and its evidence."""
    channel = found.worst
    assert channel is not None and layer.mean is not None and layer.var is not None
    i = channel.channel
    numbers = [float(np.ravel(a)[i]) for a in (layer.mean, layer.var, data_mean, data_var)]
    evidence.update(found.evidence())
    evidence.update(
        channel_rms_threshold=CHANNEL_RMS_THRESHOLD,
        channel_running_mean=numbers[0],
        channel_running_var=numbers[1],
        channel_data_mean=numbers[2],
        channel_data_var=numbers[3],
    )
    stored, data = ", ".join(f"{x:.3g}" for x in numbers[:2]), ", ".join(f"{x:.3g}" for x in numbers[2:])
    past = f"; {channel.past} channels past it" if channel.past > 1 else ""
    detail = (
        f"channel {i} (mean, variance {stored}; the data's {data}) is normalized on the data to an rms of "
        f"{shown(channel.rms, CHANNEL_RMS_THRESHOLD)} where its statistics would give about 1 (threshold "
        f"{CHANNEL_RMS_THRESHOLD:g}{past})"
    )
    if drifts(found._replace(worst=None)):
        return f"{describe(layer)} moving statistics are far from the data's: {medians}; {detail}{_used_by(layer)}"
    # a few channels in many do not move the medians
    some = "one channel" if channel.past == 1 else f"{channel.past} channels, the furthest"
    return (
        f"{describe(layer)} moving statistics are far from the data's in {some}: {detail}; the medians "
        f"agree: {medians}{_used_by(layer)}"
    )


def _used_by(layer: NormLayer) -> str:
    if layer.uses_running_stats or not layer.running_stats_used_by:
        return ""
    return (
        f" (used by {' and '.join(layer.running_stats_used_by)}, although the layer's own call uses batch statistics)"
    )


def _defaults_finding(layer: NormLayer) -> Finding:
    channels = int(layer.mean.size)  # type: ignore[union-attr]
    evidence: dict[str, object] = {"kind": "defaults", "channels": channels}
    output = default_stats_output(layer)
    effect = ""
    if output is not None:
        evidence["output_factor"] = output[1]
        effect = f"; at these values the layer computes {output[0]}: epsilon keeps it from being the identity"
    if layer.running_stats_used_by and not layer.uses_running_stats:
        evidence["used_by"] = list(layer.running_stats_used_by)
    return Finding(
        CODE,
        SLUG,
        SEVERITY,
        layer.name,
        f"{describe(layer)} running mean is exactly 0 and running variance exactly 1 in all {channels} channels"
        f"{_used_by(layer)}: the moving averages were never updated{effect}",
        HINT_KERAS_UNLOADABLE if keras_unloadable(layer) else HINT_KERAS if is_keras(layer) else HINT_DEFAULTS,
        evidence,
    )


def _drift_finding(layer: NormLayer, probe: ProbeResult | None) -> Finding | None:
    if probe is None or probe.data is None or layer.mean is None or layer.var is None:
        return None
    seen = probe.data.get(layer.name)
    if seen is None or seen.total_nonfinite:
        return None
    if seen.channels != layer.mean.size:
        return None
    found = drift(layer, seen.mean, seen.var)
    if not drifts(found):
        return None
    shift, log_ratio = found.shift, found.log_ratio
    silent = int(np.sum(silent_in_both(layer, seen.var)))
    # BN004 counts the dead among its epsilon-dominated channels, from the stored statistics alone
    left_out = f"; {silent} channel(s) silent in the model and on the data left out" if silent else ""
    smaller, judged = narrower(layer, seen.mean, seen.var)
    if smaller in (0, judged):
        ratio, direction = "variance ratio", f"the data's {'smaller' if smaller else 'larger'} in {judged}"
    else:  # the median is of |log ratio|: with channels going both ways it is a change, not a ratio one way
        ratio, direction = (
            "variance change (either way)",
            f"the data's larger in {judged - smaller}, smaller in {smaller}",
        )
    medians = (
        f"median mean shift {shown(shift, MEAN_SHIFT_THRESHOLD)} standard deviations, median {ratio} "
        f"x{shown(math.exp(log_ratio), math.exp(LOG_VAR_RATIO_THRESHOLD))} ({direction} of {judged} channels; "
        f"thresholds {MEAN_SHIFT_THRESHOLD}, x{math.exp(LOG_VAR_RATIO_THRESHOLD):.0f}{left_out})"
    )
    evidence: dict[str, object] = {
        "kind": "drift",
        "median_mean_shift": shift,
        "median_log_var_ratio": log_ratio,
        "mean_shift_threshold": MEAN_SHIFT_THRESHOLD,
        "log_var_ratio_threshold": LOG_VAR_RATIO_THRESHOLD,
        "samples": probe.data_samples,
        "data": probe.data_source,
        "channels_data_var_smaller": smaller,
        "channels_judged": judged,
    }
    if found.worst is None:
        message = f"{describe(layer)} moving statistics are far from the data's: {medians}{_used_by(layer)}"
    else:
        message = _channel_message(layer, found, seen.mean, seen.var, medians, evidence)
    if silent:  # dead in the model and on the data, or scaled away by gamma: not in the medians
        evidence["dead_channels"] = silent
    settled = probe.recalibration.settled_by_upstream.get(layer.name) if probe.recalibration else None
    after = Drift.from_evidence(settled) if settled else None
    if after is not None:  # which of a cascade of drifting layers start it: those this clause leaves out
        evidence["drift_after_upstream"] = settled
        message += f"; recomputing the layers above it brings it within the thresholds ({drift_text(after)})"
    # severity follows the effect on the model's outputs, when the probe could measure it
    severity = Severity.WARNING
    recal = _reached(probe.recalibration, layer.name)
    # a layer that reaches some of several outputs is judged on those, and says so
    some = (
        probe.recalibration is not None and recal is not None and len(recal.outputs) < len(probe.recalibration.outputs)
    )
    if recal is not None and recal.outputs:
        effect = recalibration_effect(recal)
        effect.update(error_shift_sd=EFFECT_SHIFT_ERROR, error_top1_agreement=EFFECT_AGREEMENT_ERROR)
        evidence["output_effect"] = effect
        if any(changes_predictions(*_judged(c)) for c in recal.outputs.values()):
            severity = Severity.ERROR
            message += _error_effect(recal, some)
        else:
            message += _small_effect(recal, some)
    elif recal is not None and probe.recalibration is not None and probe.recalibration.outputs:
        message += "; it reaches none of the outputs the recomputed statistics were compared on"
    hint = HINT_KERAS + DATA_CAVEAT if is_keras(layer) else HINT_DRIFT
    if frozen_with_stats(layer):
        # what fix keeps is not an error of the model: the data differ from what its later layers learned on
        evidence["trainable"] = False
        severity = Severity.WARNING
        message += (
            "; the layer is frozen (trainable: false), so the layers after it may have been trained on these statistics"
        )
        hint = HINT_FROZEN
    return Finding(CODE, SLUG, severity, layer.name, message, hint, evidence)


def _reached(recal: Recalibration | None, layer: str) -> Recalibration | None:
    """The effect on the outputs ``layer`` reaches: a head it does not feed moves with other layers' statistics
    only (openspindlenet's segmentation layers were errors by the detection head's 0.60 sd)."""
    if recal is None or recal.reaches is None or layer not in recal.reaches:
        return recal
    reached = recal.reaches[layer]
    return replace(recal, outputs={name: c for name, c in recal.outputs.items() if name in reached})


def _judged(c: OutputComparison) -> tuple[float, float | None]:
    """The shift and agreement an output's comparison is judged by: a label output's (integer: classes, ids,
    masks) numeric distance means nothing, so its share of unchanged values stands for the agreement."""
    if c.changed is not None:
        return 0.0, 1.0 - c.changed
    return c.shift, c.agreement


def _outputs_named(recal: Recalibration, some: bool) -> str:
    """ "the model's outputs", or where the layer reaches only some of them, those by name."""
    if not some:
        return "the model's outputs"
    return f"the output{'s' if len(recal.outputs) > 1 else ''} it reaches ({', '.join(repr(n) for n in recal.outputs)})"


def _small_effect(recal: Recalibration, some: bool = False) -> str:
    """The effect under both error thresholds, in numbers (a shift of 0.43 sd is not "no change")."""
    scored = [c for c in recal.outputs.values() if c.changed is None]
    shifts = [c.shift for c in scored if c.shift == c.shift]  # NaN: outputs not comparable
    agreements = [c.agreement for c in scored if c.agreement is not None]
    labels = [c.changed for c in recal.outputs.values() if c.changed is not None]
    one = some and len(recal.outputs) == 1  # "the output it reaches ('x') moves"
    move, keep, their = ("moves", "keeps", "its") if one else ("move", "keep", "their")
    parts = [f"{move} by {max(shifts):.2f} output standard deviations"] if shifts else []
    if agreements:
        parts.append(f"{keep} {their} top-1 class on {min(agreements):.0%} of the samples")
    if labels:
        parts.append(f"{keep} {1 - max(labels):.1%} of {their} label values")
    if not parts:
        return "; the model's outputs with recomputed statistics cannot be compared with the stored model's"
    return (
        f"; with recomputed statistics {_outputs_named(recal, some)} {' and '.join(parts)} (errors from "
        f"{EFFECT_SHIFT_ERROR} sd or under {EFFECT_AGREEMENT_ERROR:.0%})"
    )


def _error_effect(recal: Recalibration, some: bool = False) -> str:
    """Which of the effect's error thresholds the outputs cross: the top-1 agreement where it falls below
    its threshold, else the shift alone (a shift just past it with every prediction kept is no change of
    predictions)."""
    judged = [_judged(c) for c in recal.outputs.values()]
    if any(agreement is not None and agreement < EFFECT_AGREEMENT_ERROR for _, agreement in judged):
        return "; this changes the model's predictions (see the output effect)"
    shifts = [(c.shift, name) for name, c in recal.outputs.items() if c.shift == c.shift and c.changed is None]
    if not shifts:
        return "; the model's outputs with recomputed statistics cannot be compared with the stored model's"
    shift, name = max(shifts)
    # named where the model has several outputs: the effect line below may quote another one
    which = f"the model's output {name!r}" if len(recal.outputs) > 1 or some else "the model's outputs"
    return (
        f"; this moves {which} by {shown(shift, EFFECT_SHIFT_ERROR)} output standard deviations "
        f"(an error above {EFFECT_SHIFT_ERROR}; see the output effect)"
    )
