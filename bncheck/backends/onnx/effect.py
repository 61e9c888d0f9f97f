"""The model run with its batch-norm statistics recomputed from the data (`fix`'s own computation, in memory)
against the model as stored: what BN003's severity follows."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from bncheck.backends.base import BackendError
from bncheck.backends.onnx import custom_ops
from bncheck.backends.onnx.cancel import run_options
from bncheck.backends.onnx.runtime_errors import runtime_message
from bncheck.budget import OverBudgetError
from bncheck.errors import one_line
from bncheck.fix_result import calibration_batches
from bncheck.model import ProbeResult, Recalibration, runnable_batch
from bncheck.probe_plan import batch_axes, compare_recalibrated, first_outputs, joined_samples
from bncheck.verdicts import Drift

if TYPE_CHECKING:
    from bncheck.backends.onnx.fix import OutputsRun
    from bncheck.backends.onnx.replay import PassLog

#: samples of the data fed for the output comparison (all of them up to this; its outputs are held in memory)
MAX_SAMPLES = 1024


def outputs_reached(graph: Any, tensors: dict[str, str]) -> dict[str, frozenset[str]] | None:
    """For each layer (name -> its output tensor), the graph outputs computed from it: a two-headed model's
    branch reaches one head, and recomputing its statistics moves no other. None where a node holds a
    subgraph (an If's branches read outer tensors that are none of its inputs)."""
    # a plain walk over consumers: a GraphIndex would read shapes and constants this does not need
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        if any(attr.type in (5, 10) for attr in node.attribute):  # GRAPH, GRAPHS
            return None
        for name in node.input:
            if name:
                consumers.setdefault(name, []).append(node)
    finals = {o.name for o in graph.output}
    reached: dict[str, frozenset[str]] = {}
    for layer, tensor in tensors.items():
        seen, todo, found = {tensor}, [tensor], set()
        while todo:
            current = todo.pop()
            if current in finals:
                found.add(current)
            for node in consumers.get(current, ()):
                for out in node.output:
                    if out and out not in seen:
                        seen.add(out)
                        todo.append(out)
        reached[layer] = frozenset(found)
    return reached


def _batches(
    data: Mapping[str, np.ndarray], batch: int, usable: int, axes: Mapping[str, int | None]
) -> Iterator[dict[str, np.ndarray]]:
    """The data's first ``usable`` samples in consecutive batches (fix's batching, which lets a mapped .npy's
    pages go after each; ``usable`` holds whole batches where the model's batch is fixed). ``axes``: each
    input's batch axis (None: fed whole, as every batch takes it)."""
    first = {name: array if axes.get(name, 0) is None else array[:usable] for name, array in data.items()}
    return (feeds for feeds, _ in calibration_batches(first, batch, axes=axes))


def _outputs(run: OutputsRun, batches: Iterator[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Each output over every batch, samples first; outputs without an axis per sample are left out."""
    parts: dict[str, list[np.ndarray]] = {}
    rows: list[int] = []
    for feeds in batches:
        rows.append(len(next(iter(feeds.values()))))  # the data hold their samples on axis 0 (_batches)
        for name, value in run(feeds).items():
            parts.setdefault(name, []).append(np.asarray(value))
    joined = {name: joined_samples(chunks, rows, rows) for name, chunks in parts.items()}
    return {name: value for name, value in joined.items() if value is not None}


def _session_run(session: Any) -> OutputsRun:
    names = [o.name for o in session.get_outputs()]
    return lambda feeds: dict(zip(names, session.run(names, feeds, run_options())))


def recalibration(
    path: str,
    data: Mapping[str, np.ndarray],
    flagged: dict[str, dict[str, Any]],
    log: PassLog | None = None,
    stored: Mapping[str, np.ndarray] | None = None,
    probe: ProbeResult | None = None,
) -> Recalibration | str:
    """Recompute the statistics `fix` would (layers ``flagged`` by the probe's drift, and those never updated)
    on a fresh copy of the model, and compare its outputs on the data with the stored model's.

    Returns a reason (str) when it cannot be measured (e.g. too few samples for `fix`'s rule). ``log``: where the
    dry run's passes are kept (the probed view's, so that `fix` of that view replays them). ``data``: what the
    statistics are recomputed from (probe_data.recalibration_data bounds it). ``stored``: the stored model's
    outputs on the data's first samples, samples first (the probe's own runs over the data gave them); they
    are not run again where they cover the samples compared. ``probe``: the probe's result, whose batch sizes
    that could not run bound the passes' batch (model.runnable_batch)."""
    import onnxruntime as ort

    from bncheck.backends.onnx import OnnxBackend
    from bncheck.backends.onnx.fix import repair
    from bncheck.backends.onnx.instrument import stub
    from bncheck.backends.onnx.run import new_session, prepacks, session_options, trim_heap
    from bncheck.backends.onnx.scratch import Scratch
    from bncheck.fix_result import FixRequest

    view = OnnxBackend().load(path)
    declared = view.output_shapes
    request = FixRequest(output=None, data=dict(data), repair=frozenset({"BN003"}), dry_run=True, flagged=flagged)
    if probe is not None:
        request = replace(request, batch_size=runnable_batch(probe, request.batch_size))
    try:
        outcome, fixer = repair(view, request, log)  # a dry run edits the loaded copy in memory and writes nothing
    except OverBudgetError as exc:  # its remedy names fix's --batch-size, which a probe does not have
        return exc.summary
    except BackendError as exc:
        return one_line(exc)
    try:
        changed = tuple(entry.layer for entry in outcome.layers if entry.action == "recalibrated")
        if not changed:
            return Recalibration((), {}, 0)
        # fix's reason "drift_after_upstream": numbers measured with the layers above recomputed
        settled = {
            e.layer: Drift.from_evidence(e.evidence) for e in outcome.layers if "original_drift" in (e.evidence or {})
        }
        settled_by_upstream = {name: d.evidence() for name, d in settled.items() if d is not None}
        reaches = outputs_reached(view.handle.model.graph, {lay.name: lay.output or lay.input for lay in view.layers})
        axes = batch_axes(view)
        batch = outcome.batch_size
        usable = min(outcome.samples, MAX_SAMPLES)
        if any(spec.batch_dim == batch for spec in view.inputs):
            usable -= usable % batch  # a fixed batch dimension takes whole batches only
        if not usable:
            return f"fewer samples than the model's fixed batch size {batch}"
        given = first_outputs(stored, usable)
        # where fix's passes fed every changed layer's statistics to one session, that session gives both
        runs = fixer.stored_and_recomputed()
        if runs is not None:
            stored_run, recomputed = runs
            try:
                before = given if given is not None else _outputs(stored_run, _batches(data, batch, usable, axes))
                after = _outputs(recomputed, _batches(data, batch, usable, axes))
            except BackendError as exc:
                return f"onnxruntime could not run the model with recomputed statistics: {runtime_message(exc)}"
            found = compare_recalibrated(changed, before, after, declared)
            return replace(found, reaches=reaches, settled_by_upstream=settled_by_upstream)
        # where fix's last passes ran from kept tensors (frontier.py), the nodes below them give the outputs
        recomputed_outputs = fixer.recomputed_outputs(usable)
    finally:
        fixer.close()
    # One session at a time, each reading the weights from files: the edited model's weight-less stub (its
    # large tensors in their files, as fix's own sessions read them), then the stored model. Serializing the
    # edited model with its weights would hold them twice, and fails above protobuf's 2 GB.
    handle = view.handle
    # both sessions below run the file's graph (the edits changed parameters only): one packing decision
    packing = prepacks(handle.model.graph, handle.value_shapes)
    libraries = custom_ops.libraries(handle.model)  # the stored model's session opens the file by its path
    del view
    tmp = Scratch(handle.size_bytes)
    try:
        try:
            if recomputed_outputs is None:
                stubbed, folder = stub(handle, tmp)
                del handle  # a model without external data holds its weights until here; the stub holds none
                trim_heap()
                so = session_options(ort.GraphOptimizationLevel.ORT_ENABLE_ALL, folder, packing)
                recomputed = new_session(stubbed, so)
                del stubbed
                after = _outputs(_session_run(recomputed), _batches(data, batch, usable, axes))
                del recomputed
            else:
                after = recomputed_outputs
                del handle
            if given is not None:
                before = given
            else:
                trim_heap()  # freed weights back to the OS before the stored model's session reads them again
                # no folder: onnxruntime reads a model opened by its path as plain inference does (its own
                # folder rule, which a linked model's data needs)
                so = session_options(ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "", packing)
                before = _outputs(
                    _session_run(new_session(path, so, libraries=libraries)), _batches(data, batch, usable, axes)
                )
        except Exception as exc:  # onnxruntime raises its own exception types
            return f"onnxruntime could not run the model with recomputed statistics: {runtime_message(exc)}"
    finally:
        tmp.remove()
    found = compare_recalibrated(changed, before, after, declared)
    return replace(found, reaches=reaches, settled_by_upstream=settled_by_upstream)
