"""`bncheck fix` for Keras files (.keras, .h5): batch-norm moving statistics from the data, baked
``training=True`` calls of BatchNormalization turned into inference calls, the repaired model saved by Keras.

Safety as in the probe: a file whose config carries code (Lambda, objects from outside Keras) is refused
before keras is imported; the model is loaded with ``safe_mode=True`` only, and rebuilt from its own config
(Keras's classes only) after the training flags are edited, so nothing from the file is executed.

Statistics: measured on the inputs of the BatchNormalization layers in inference-mode passes
(``model(x, training=False)``, which in Keras 3 also overrides a baked flag), layer by layer in graph order:
the first pass measures every undecided layer, and a layer is decided from it unless a layer before it was
changed in the same pass (its input then changes; it waits). The later passes run from the model's inputs
at first, then from the tensors the passes before kept (frontier.py), each measuring the layers with no
undecided layer upstream. The rules for where the statistics come from (``--stats``), the sample floor and
the uncertainty are bncheck.fix_result's, shared with the ONNX backend.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

import numpy as np

from bncheck import verdicts
from bncheck.backends.base import BackendError
from bncheck.backends.keras.archive import KerasFile
from bncheck.errors import one_line
from bncheck.fix_result import (
    FixOutcome,
    FixRequest,
    LayerFix,
    StatsSummary,
    calibration_batch,
    calibration_batches,
    calibration_size,
    drift_after_upstream,
    listing,
    uncertainty,
)
from bncheck.model import Kind, ModelView, NormLayer, TensorStats
from bncheck.probe_data import sample_count

TRAIN_MODE = "BN002"
STALE = "BN003"
_SUFFIXES = (".keras", ".h5", ".hdf5")


def check_keras_fix(view: ModelView, static: KerasFile, request: FixRequest) -> None:
    """The refusals that need neither keras nor a forward pass."""
    from bncheck.backends.keras.probe import refuse_unsafe

    refuse_unsafe(static, "fix")
    if not request.dry_run:
        output = request.output
        if not output:
            raise BackendError(f"{view.info.path}: no output given: pass -o FIXED.keras (or --dry-run)")
        if os.path.splitext(output)[1].lower() not in _SUFFIXES:
            raise BackendError(
                f"{output}: a Keras model is written as .keras or .h5 (Keras picks the format by the suffix)"
            )
        parent = os.path.dirname(os.path.abspath(output))
        if not os.path.isdir(parent):
            raise BackendError(f"{output}: folder {parent} does not exist")
    _, pending, _ = _plan(view, request)
    if request.data is not None and pending:  # the calibration batch against the memory budget, before the probe
        from bncheck.backends.keras import memory
        from bncheck.backends.keras.probe import KerasRunner, refuse_foreign

        if static.runner is None:
            refuse_foreign(static, "fix")
            static.runner = KerasRunner(view, static)  # the probe of the original runs this loaded model
        batch, fixed = calibration_batch(view.inputs, request.batch_size)
        size = calibration_size(batch, fixed, sample_count(request.data))
        inputs = memory.fed_bytes(view.inputs, size, None, request.data)
        memory.check(static.runner.model, inputs, size, "give a smaller --batch-size")


def _training_state(static: KerasFile) -> bool:
    """Whether the file holds a compiled model's training settings or optimizer state."""
    if static.format == "keras":
        return bool(static.config.get("compile_config"))
    import h5py

    try:
        with h5py.File(static.path, "r") as h5:
            return "training_config" in h5.attrs or "optimizer_weights" in h5
    except (OSError, ValueError):
        return False


def fix_keras(view: ModelView, static: KerasFile, request: FixRequest) -> FixOutcome:
    """Plan, measure, apply and save (see the module docstring). Raises BackendError for refusals."""
    from bncheck.backends.keras.probe import KerasRunner, refuse_foreign

    check_keras_fix(view, static, request)
    if static.runner is None:
        refuse_foreign(static, "fix")
    results, pending, stored = _plan(view, request)
    data = request.data
    samples = sample_count(data)
    batch, fixed = calibration_batch(view.inputs, request.batch_size)
    padded = (-samples) % batch if fixed and samples else 0
    # the model the probe of the original loaded (its as-written calls restore the moving statistics), else
    # a fresh load: refuses unsafe files again, imports keras, loads with safe_mode=True
    runner = static.runner if static.runner is not None else KerasRunner(view, static)
    passes = 0
    if data is None:
        for p in pending:
            results[p.index] = LayerFix(
                p.layer.name,
                p.action,
                p.reason + " (without --data: new statistics not computed)",
                p.code,
                old=StatsSummary.stored(p.layer),
            )
    else:
        from bncheck.backends.keras import memory

        size = calibration_size(batch, fixed, samples)
        memory.check(runner.model, memory.fed_bytes(view.inputs, size, None, data), size, "give a smaller --batch-size")
        batches = list(calibration_batches(data, batch, fixed=fixed))
        passes = _repair(runner, pending, results, batches, request, _probed(runner, data, size, pending))
    layers = [results[i] for i in range(len(view.layers))]
    written: list[str] = []
    if not request.dry_run:
        assert request.output is not None
        baked = [p.layer.name for p in pending if p.action == "to-inference"] + [layer.name for layer in stored]
        _save(runner, baked, request.output)
        written = [request.output]
    notes = []
    if padded:
        notes.append(
            f"the model's batch dimension is fixed at {batch}: the last batch was completed with "
            f"{padded} repeated sample(s), left out of the statistics"
        )
    if written and _training_state(static):
        notes.append(
            "the written model holds none of the original's training configuration or optimizer state (bncheck "
            "loads models with compile=False): compile it again before training it further"
        )
    notes += [
        f"{e.layer}: the new statistics are uncertain ({e.uncertainty.text()}); more calibration samples would pin them"
        for e in layers
        if e.uncertainty is not None and e.uncertainty.large
    ]
    return FixOutcome(layers, written, samples, samples, batch, passes, padded, notes)


def _repair(
    runner: Any,
    pending: list[_Pending],
    results: dict[int, LayerFix],
    batches: list[tuple[dict[str, np.ndarray], int]],
    request: FixRequest,
    probed: dict[str, list[TensorStats]] | None = None,
) -> int:
    """Measure and decide the ``pending`` layers over the calibration ``batches`` into ``results``; returns
    the number of passes. The first pass runs the whole model (or is the probe's, ``probed``); the later ones
    run only the layers between the tensors the passes before them kept and their own (frontier.py), or the
    whole model again where those cannot serve."""
    from bncheck.backends.keras.frontier import Done, Frontier, Unsupported, frontier_for
    from bncheck.probe_plan import merge_stats

    passes = 0
    remaining = list(pending)
    cut: Frontier | None = None
    cut_off = False  # the kept tensors cannot serve: every later pass runs from the model's inputs
    while remaining:
        parts: dict[str, list[TensorStats]] = {}
        front: set[str] | None = None  # the layers a cut pass measured, else a pass from the inputs
        undecided = [p.layer for p in remaining]
        while passes and not cut_off and front is None:
            try:
                cut = cut if cut is not None else frontier_for(runner, batches, undecided)
                frontier = cut.first(undecided)
                parts = cut.measure(frontier, undecided)
                front = {layer.name for layer in frontier}
            except Done:  # a nested model's frontier is done with its layers: the rest get one of their own
                cut = None
            except Unsupported:
                cut_off = True
        if front is None:
            if passes == 0 and probed is not None:
                parts = probed
            else:
                parts = _full_pass(runner, batches, {p.layer.name for p in remaining})
        passes += 1
        later: list[_Pending] = []
        changed = False
        for p in remaining:
            # below a layer changed by a pass from the inputs, a layer waits: its input moved (a cut pass
            # measures only layers with none of the others upstream)
            if (front is None and changed) or (front is not None and p.layer.name not in front):
                later.append(p)
                continue
            got = parts.get(p.layer.name)
            entry = _apply(p, merge_stats(got) if got else None, runner.layers[p.layer.name], request)
            results[p.index] = entry
            changed = changed or entry.changed
        remaining = later
    return passes


def _probed(
    runner: Any, data: dict[str, np.ndarray], size: int, pending: list[_Pending]
) -> dict[str, list[TensorStats]] | None:
    """The first pass's statistics as the probe of the original measured them over the same data, where it
    ran it as this pass would (predict style, consecutive batches of at most ``size`` samples, so the same
    ones) and measured every layer to decide; else None. The probe merged the batches' statistics as the pass
    does (probe_plan.run_plan)."""
    if runner.data_probe is None:
        return None
    given, result = runner.data_probe
    if given is not data or result.data_batch != size or result.data is None:
        return None
    found = {p.layer.name: [result.data[p.layer.name]] for p in pending if p.layer.name in result.data}
    return found if len(found) == len(pending) else None


def _full_pass(
    runner: Any, batches: list[tuple[dict[str, np.ndarray], int]], undecided: set[str]
) -> dict[str, list[TensorStats]]:
    """Per batch, the input statistics of the layers ``undecided``, from passes of the whole model (no other
    layer's statistics are computed)."""
    from bncheck.backends.keras.probe import PREDICT
    from bncheck.probe_plan import first_samples

    parts: dict[str, list[TensorStats]] = {}
    runner.capture.skip = {name for name in runner.layers if name not in undecided}
    try:
        for feeds, real in batches:
            for name, seen in runner.observe(feeds, PREDICT, inputs_only=True).layers.items():
                if seen.input is not None:
                    parts.setdefault(name, []).append(first_samples(seen.input, real))
    finally:
        runner.capture.skip = set()
    return parts


class _Pending:
    def __init__(
        self,
        index: int,
        layer: NormLayer,
        action: str,
        code: str,
        reason: str,
        *,
        prefer_stored: bool = False,
        check_drift: bool = False,
    ) -> None:
        self.index, self.layer, self.action, self.code, self.reason = index, layer, action, code, reason
        self.prefer_stored = prefer_stored  # baked layer with sound statistics (--stats auto with data)
        self.check_drift = check_drift  # inference layer with updated statistics: recompute only if they drift


def _plan(view: ModelView, request: FixRequest) -> tuple[dict[int, LayerFix], list[_Pending], list[NormLayer]]:
    """(decided layers, layers needing the data, baked layers switched to their stored statistics)."""
    results: dict[int, LayerFix] = {}
    pending: list[_Pending] = []
    stored: list[NormLayer] = []
    refused: list[str] = []
    needs_data: list[str] = []
    for i, layer in enumerate(view.layers):
        old = StatsSummary.stored(layer)
        if layer.kind is not Kind.BATCH or layer.op_type != "BatchNormalization":
            results[i] = LayerFix(
                layer.name,
                "unchanged",
                f"{layer.op_type}: statistics per sample, nothing to recalibrate"
                if not layer.batch_statistics
                else f"{layer.op_type} is not rewritten by bncheck",
            )
            continue
        if layer.mean is None or layer.var is None:
            results[i] = LayerFix(layer.name, "not-fixed", "moving statistics unreadable in the file", None)
            continue
        problem = verdicts.stored_stats_problem(layer)
        if layer.extra.get("baked"):
            if TRAIN_MODE not in request.repair:
                results[i] = LayerFix(
                    layer.name, "not-fixed", "baked training=True: BN002 not selected by --only", TRAIN_MODE, old=old
                )
                continue
            base = "baked training=True removed (an inference call)"
            if problem is None and (request.stats == "stored" or (request.stats == "auto" and request.data is None)):
                results[i] = LayerFix(
                    layer.name,
                    "to-inference",
                    f"{base} with its stored moving statistics (sound: not 0/1, finite, variance >= 0)",
                    TRAIN_MODE,
                    source="stored",
                    old=old,
                )
                stored.append(layer)
            elif problem is not None and request.stats == "stored":
                refused.append(f"{layer.name} ({problem})")
            elif problem is None and request.stats == "auto":
                pending.append(_Pending(i, layer, "to-inference", TRAIN_MODE, base, prefer_stored=True))
            else:
                why = f"stored statistics unusable: {problem}" if problem else "--stats data"
                pending.append(
                    _Pending(i, layer, "to-inference", TRAIN_MODE, f"{base} with statistics from the data ({why})")
                )
                needs_data.append(layer.name)
            continue
        if STALE not in request.repair:
            results[i] = LayerFix(
                layer.name, "unchanged", "stale-statistics repair (BN003) not selected by --only", old=old
            )
            continue
        if problem is not None:
            if request.stats == "stored":
                refused.append(f"{layer.name} ({problem})")
                continue
            pending.append(_Pending(i, layer, "recalibrated", STALE, f"{problem}: recomputed from the data"))
            needs_data.append(layer.name)
        elif verdicts.folded_stats(layer):
            results[i] = LayerFix(layer.name, "unchanged", verdicts.FOLDED_NOTE, old=old)
        elif request.stats == "stored":
            results[i] = LayerFix(layer.name, "unchanged", "--stats stored: moving statistics kept as stored", old=old)
        elif request.data is None:
            results[i] = LayerFix(
                layer.name, "unchanged", "drift from the data cannot be judged without --data", old=old
            )
        elif request.stats == "auto" and verdicts.frozen_with_stats(layer):
            results[i] = LayerFix(
                layer.name,
                "unchanged",
                "frozen (trainable: false): the layers after it may have been trained on its moving statistics, "
                "kept (--stats data recomputes them where they drift)",
                old=old,
            )
        else:
            pending.append(
                _Pending(i, layer, "recalibrated", STALE, "moving statistics compared with the data", check_drift=True)
            )
    path = view.info.path
    if refused:
        raise BackendError(
            f"{path}: --stats stored keeps the file's statistics, but they cannot serve in "
            f"{listing(refused)}: use --stats auto with --data CALIB to recompute them"
        )
    if request.data is None and needs_data and not request.dry_run:
        raise BackendError(
            f"{path}: {listing(needs_data)} need calibration data (--data CALIB): their stored "
            "statistics are stale (never updated, non-finite or negative); layers with sound "
            "statistics need none (or pass --only to skip these)"
        )
    samples = sample_count(request.data)
    if request.data is not None and pending and samples < request.min_samples:
        raise BackendError(
            f"{request.data_label}: {samples} sample(s) are too few to estimate the statistics of "
            f"{listing([p.layer.name for p in pending])}: at least {request.min_samples} needed "
            "(--min-samples N overrides the floor)"
        )
    return results, pending, stored


def _apply(p: _Pending, stats: TensorStats | None, live: Any, request: FixRequest) -> LayerFix:
    """Decide one measured layer; assign its new moving statistics on the live Keras layer."""
    layer = p.layer
    old = StatsSummary.stored(layer)
    if stats is None:
        return LayerFix(layer.name, "not-fixed", "its input could not be measured", p.code, old=old)
    samples = int(stats.sample_mean.shape[0])
    evidence: dict[str, Any] = {"samples": samples, "values_per_channel": int(stats.count)}
    if stats.total_nonfinite:
        return LayerFix(
            layer.name,
            "not-fixed",
            f"its input holds {stats.total_nonfinite} NaN/Inf value(s) on the calibration data: no honest statistics",
            p.code,
            old=old,
            evidence=evidence,
        )
    mean = np.asarray(stats.mean, dtype=np.float64)
    var = np.asarray(stats.var, dtype=np.float64)
    if layer.mean is not None and mean.shape != np.shape(layer.mean):
        return LayerFix(
            layer.name,
            "not-fixed",
            f"measured {mean.size} channels, the layer has {np.size(layer.mean)}",
            p.code,
            old=old,
            evidence=evidence,
        )
    if p.prefer_stored or p.check_drift:
        found = verdicts.drift(layer, mean, var)
        evidence.update(found.evidence())
        now = verdicts.drift_text(found)
        drifts = verdicts.drifts(found)
        flagged = request.flagged.get(layer.name)
        if not drifts and flagged is None:
            if p.prefer_stored:
                return LayerFix(
                    layer.name,
                    "to-inference",
                    f"{p.reason} with its stored moving statistics, which agree with the data ({now})",
                    p.code,
                    source="stored",
                    old=old,
                    evidence=evidence,
                )
            return LayerFix(
                layer.name,
                "unchanged",
                f"moving statistics agree with the data ({now}; {verdicts.DRIFT_THRESHOLDS})",
                old=old,
                evidence=evidence,
            )
        if p.prefer_stored:
            reason = f"{p.reason} with statistics from the data (the stored ones drift from it: {now})"
        elif drifts or flagged is None:
            reason = f"moving statistics drift from the data ({now}): recomputed from the data"
        else:
            evidence["original_drift"] = flagged
            reason = drift_after_upstream(flagged, now)
    else:
        reason = p.reason
    dtype = np.asarray(live.moving_mean.numpy() if hasattr(live.moving_mean, "numpy") else live.moving_mean).dtype
    live.moving_mean.assign(mean.astype(dtype))
    live.moving_variance.assign(var.astype(dtype))
    return LayerFix(
        layer.name,
        p.action,
        reason,
        p.code,
        source="data",
        old=old,
        new=StatsSummary.of(mean, var),
        uncertainty=uncertainty(stats),
        evidence=evidence,
    )


def _save(runner: Any, baked: list[str], output: str) -> None:
    """Rebuild the model from its own config with the baked BatchNormalization flags removed (Keras's classes
    only: safe mode refused everything else at load), copy the weights, and let Keras write the file. The
    loaded model itself is not saved: it carries the measuring call wrappers."""
    model = runner.model
    config = model.get_config()
    # the flag may sit on the call of a wrapper or a nested model on the layer's path (TimeDistributed(bn)(x,
    # training=True), encoder(x, training=True)), which bakes it into the layers inside
    _drop_training(config, {part for name in baked for part in name.split("/")})
    tmp = _temp_name(output)
    # Keras's deprecation notes (legacy .h5: a Python warning and an absl log line) would litter stderr
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            fresh = type(model).from_config(config)
            fresh.set_weights(model.get_weights())
            fresh.save(tmp)
            os.replace(tmp, output)  # a failed write leaves no half model behind
        except Exception as exc:  # keras raises ValueError/TypeError/OSError on what it cannot rebuild or write
            text = one_line(exc)
            raise BackendError(f"{output}: keras could not write the fixed model ({text})") from None
        finally:
            absl.setLevel(level)
            if os.path.exists(tmp):
                os.unlink(tmp)


def _temp_name(output: str) -> str:
    folder, base = os.path.split(os.path.abspath(output))
    stem, suffix = os.path.splitext(base)
    return os.path.join(folder, f".{stem}.bncheck-tmp{suffix}")  # Keras picks the format by the suffix


def _drop_training(config: Any, names: set[str]) -> int:
    """Remove ``training=True`` from the recorded calls of the layers called ``names`` (nested models
    included); returns how many calls were edited."""
    edited = 0
    if isinstance(config, dict):
        layers = config.get("layers")
        if isinstance(layers, list):
            for entry in layers:
                if not isinstance(entry, dict):
                    continue
                name = entry.get("name") or (entry.get("config") or {}).get("name")
                if name in names:
                    edited += _drop_in_nodes(entry)
                inner = entry.get("config")
                if isinstance(inner, dict):
                    edited += _drop_training(inner, names)
    return edited


def _drop_in_nodes(entry: dict[str, Any]) -> int:
    edited = 0
    for node in entry.get("inbound_nodes") or []:
        if isinstance(node, dict):  # Keras 3: {"args": [...], "kwargs": {...}}
            kwargs = node.get("kwargs")
            if isinstance(kwargs, dict) and kwargs.get("training") is True:
                del kwargs["training"]
                edited += 1
        elif isinstance(node, list):  # Keras 2: [[name, node_index, tensor_index, kwargs], ...]
            for item in node:
                if (
                    isinstance(item, list)
                    and len(item) >= 4
                    and isinstance(item[3], dict)
                    and item[3].get("training") is True
                ):
                    del item[3]["training"]
                    edited += 1
    return edited
