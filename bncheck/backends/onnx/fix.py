"""`bncheck fix` for ONNX: recompute batch-norm statistics from calibration data and rewrite what is unsafe.

Repaired: inference-mode BatchNormalization with stale running statistics, train-mode BatchNormalization
(switched to inference with stored or recomputed statistics), and recognized hand-written batch-moments
chains (replaced by one inference BatchNormalization). Statistics are measured by the probe's engine, layer by
layer in topological order; everything not repaired is written back exactly as it was read. The rules
(passes, frontiers, where the statistics come from, preservation) are in docs/architecture.md, "`bncheck fix`
for ONNX".
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import numpy as np
import onnx
from onnx import TensorProto, helper

from bncheck import verdicts
from bncheck.backends.base import BackendError
from bncheck.backends.onnx import tensors
from bncheck.backends.onnx.graph import (
    VALUE_PRESERVING,
    copied,
    nested_bodies,
    node_reads,
    outer_reads,
    topological_order,
    upstream_nodes,
)
from bncheck.backends.onnx.load import OnnxHandle, relocate
from bncheck.backends.onnx.replay import PassLog, PassStats
from bncheck.fix_result import (
    MIN_SAMPLES,
    FixOutcome,
    FixRequest,
    LayerFix,
    StatsSummary,
    calibration_batch,
    calibration_batches,
    calibration_size,
    drift_after_upstream,
    drift_found_by_probe,
    drift_once_repaired,
    listing,
    uncertainty,
)
from bncheck.model import Kind, ModelView, NormLayer, TensorStats
from bncheck.outputs import replace_with
from bncheck.probe_data import sample_count
from bncheck.probe_plan import batch_axes as input_axes

#: a moments chain must agree with the batch-norm formula to this relative tolerance (float32 arithmetic).
CHAIN_TOLERANCE = 1e-4

TRAIN_MODE = "BN002"
STALE = "BN003"
REPAIRABLE = (TRAIN_MODE, STALE)

_FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)


@dataclass
class _Pending:
    """A layer that needs statistics from the data before its fate is known."""

    index: int
    layer: NormLayer
    what: str  # "train" | "stale" | "moments"
    code: str
    reason: str
    defaults: bool = False
    # a train-mode layer with sound stored statistics (--stats auto with data): keep them unless the data
    # show drift
    prefer_stored: bool = False
    # measured after a layer upstream of it was repaired (its numbers are not the original model's)
    after_repairs: bool = False


# ====================================================================== entry point


def fix_onnx(view: ModelView, request: FixRequest) -> FixOutcome:
    """Plan, measure and apply the repairs of ``view``'s model; write ``request.output`` unless a dry run
    (see :func:`repair`)."""
    outcome, fixer = repair(view, request)
    fixer.close()
    view.handle.fix_passes = None  # the passes of the probe's dry run have no other reader: their statistics go
    return outcome


def repair(view: ModelView, request: FixRequest, log: PassLog | None = None) -> tuple[FixOutcome, _Fixer]:
    """Plan, measure and apply the repairs of ``view``'s model; write ``request.output`` unless a dry run.
    Returns the outcome and the fixer, whose measuring engine the caller closes (:meth:`_Fixer.close`).

    ``request.data`` maps input names to arrays whose first axis is samples (None: train-mode layers switch
    to their stored statistics where sound, and anything that needs data is refused, or only planned in a
    dry run). ``request.flagged`` maps the layers the original model's probe reported as BN003 drift to
    that finding's evidence: they are recalibrated even when, with their upstream layers repaired, their
    drift falls under the thresholds. Raises BackendError for refusals, before anything is measured.

    ``log``: where the passes are kept and replayed from (replay.py); by default the view's own, set by
    ``OnnxBackend.check_fix`` when `fix --data` is to probe the view first, else none is kept.
    """
    # large external tensors stay in their files: every session reads them from there (instrument.stub), the
    # edits are small tensors held in memory, and the written model replays them on the file (_Fixer.write)
    plan = _prepare(view, request)
    if log is None:
        log = view.handle.fix_passes  # set by check_fix only
    fixer = _Fixer(
        view.handle,
        request.data or {},
        plan.batch,
        request.min_samples,
        request.data_label,
        request.flagged,
        fixed=plan.fixed,
        log=log,
        axes=input_axes(view),
    )
    try:
        return _repair(view, request, plan, fixer), fixer
    except BaseException:
        fixer.close()
        raise


def _repair(view: ModelView, request: FixRequest, plan: _Plan, fixer: _Fixer) -> FixOutcome:
    handle: OnnxHandle = view.handle
    data = request.data
    results = plan.results
    for layer in plan.stored:  # train-mode layers switched to inference with their own statistics
        if layer.extra.get("in_body"):
            fixer.record(_edit_body_to_inference(layer.output, fixer.opset))
        else:
            fixer.record(_edit_to_inference("out:" + layer.output, fixer.opset))
    pending = plan.pending
    if data is None:
        for p in pending:
            if p.what == "stale" and not p.defaults:
                results[p.index] = LayerFix(
                    p.layer.name,
                    "unchanged",
                    "drift from the data cannot be judged without --data",
                    old=StatsSummary.stored(p.layer),
                )
            else:
                results[p.index] = LayerFix(
                    p.layer.name,
                    "not-fixed" if not request.dry_run else _ACTION[p.what],
                    p.reason + " (without --data: new statistics not computed)",
                    p.code,
                    old=StatsSummary.stored(p.layer) if p.what != "moments" else None,
                )
    elif pending:
        ups = _upstream_masks(pending, handle)
        remaining = list(range(len(pending)))
        fixer.feedable = {p.layer.output for p in pending if _feedable(p)}
        # this pass measures the frontier alone, on a graph cut below it
        cut = _first_pass_cut(pending, ups, request.flagged, handle)
        repaired = 0  # the layers repaired in the rounds before
        while remaining:
            # one pass measures every undecided layer (a cut one, the frontier alone); a layer's numbers are
            # valid unless a layer upstream of it was repaired in this same round (then it waits for the next)
            frontier = set(_frontier_of(remaining, ups))
            measured = [k for k in remaining if k in frontier] if cut else remaining
            stats = fixer.pass_stats([pending[k].layer for k in measured], cut=cut)
            read = set(measured)
            changed = 0
            later = []
            for k in remaining:
                if ups[k] & changed or k not in read:
                    later.append(k)
                    continue
                p = pending[k]
                p.after_repairs = bool(ups[k] & repaired)
                results[p.index] = fixer.apply(p, stats.get(p.layer.name))
                if results[p.index].changed:
                    changed |= 1 << k
            repaired |= changed
            # where a repair held back every layer below the frontier, the next pass would measure them only
            # for them to wait again: it measures the next frontier alone, and computes nothing below it
            waiting = set(later)
            held = bool(changed) and bool(later) and all(k in frontier for k in remaining if k not in waiting)
            remaining = later
            # after the first pass every pass measures the frontier alone, from the tensors the passes before kept
            # (frontier.py): a pass from the model's inputs would compute every decided layer again, once per
            # pass (quadratic in the depth where decisions alternate between repaired and unchanged)
            cut = held or fixer.frontier_serves([pending[k].layer for k in _frontier_of(remaining, ups)])
    if not request.dry_run:
        fixer.close()  # the measuring session's memory back before the model is serialized
    written = [] if request.dry_run else fixer.write(request.output)  # type: ignore[arg-type]
    layers = [results[i] for i in range(len(view.layers))]
    notes = list(plan.notes)
    quantizers = _quantizers_below(handle.model.graph, [v for v, e in zip(view.layers, layers) if e.changed])
    if quantizers:
        notes.append(
            f"{len(quantizers)} quantization node(s) below the repaired layers (first: {quantizers[0]!r}) keep the "
            "scales calibrated on the old statistics: quantize the repaired float model again (or recalibrate those "
            "scales) for the accuracy quantization had"
        )
    notes += [
        f"{e.layer}: the new statistics are uncertain ({e.uncertainty.text()}); more calibration samples would pin them"
        for e in layers
        if e.uncertainty is not None and e.uncertainty.large
    ]
    return FixOutcome(layers, written, plan.samples, plan.samples, plan.batch, fixer.passes, plan.padded, notes)


def precheck(view: ModelView, request: FixRequest) -> None:
    """Every refusal that needs no execution (output, external files, stale layers without data, too few
    samples, a calibration batch over the memory budget), so that `fix` fails in a second instead of after
    probing the model."""
    plan = _prepare(view, request)
    if request.data is not None and plan.pending:
        calibration_memory(view.handle, request.data, input_axes(view), plan.batch, plan.fixed)


def calibration_memory(
    handle: OnnxHandle, data: dict[str, np.ndarray], axes: dict[str, int | None], batch: int, fixed: bool
) -> int | None:
    """Refuse a calibration batch whose run cannot fit the memory budget, before any session is built;
    else the busiest node's activation bytes (None when unknown). ``batch``: --batch-size, or the model's
    fixed batch; a free batch takes at most the data's samples."""
    from bncheck.backends.onnx import memory

    batch = calibration_size(batch, fixed, sample_count(data, axes))
    if batch < 1:
        return None
    feeds = {
        name: (batch, *a.shape[1:]) if axes.get(name, 0) is not None else tuple(a.shape)
        for name, a in data.items()
        if a.ndim
    }
    found = memory.check(
        handle.model, handle.value_shapes, handle.value_types, feeds, batch, "give a smaller --batch-size"
    )
    return found.node_bytes if found.node is not None else None


@dataclass
class _Plan:
    results: dict[int, LayerFix]  # layers decided statically
    pending: list[_Pending]  # layers that need the data
    stored: list[NormLayer]  # train-mode layers switched to their stored statistics
    batch: int
    fixed: bool  # the model's batch dimension is fixed at ``batch``
    samples: int
    padded: int
    notes: list[str]


def _prepare(view: ModelView, request: FixRequest) -> _Plan:
    """Static refusals and the static plan."""
    handle: OnnxHandle = view.handle
    src = handle.path
    output, data = request.output, request.data
    if not request.dry_run:
        check_output(src, output)
        assert output is not None  # check_output refuses a missing one
        if handle.external_data:  # a clash with the input's external files
            out_dir = os.path.dirname(os.path.abspath(output))
            _external_names(onnx.load(src, load_external_data=False), src, os.path.dirname(src), output, out_dir)
    graph = _GraphFacts(handle.model)
    results: dict[int, LayerFix] = {}
    pending: list[_Pending] = []
    stored: list[NormLayer] = []
    refused: list[str] = []
    for i, layer in enumerate(view.layers):
        planned = _plan(i, layer, graph, request)
        if isinstance(planned, _Refused):
            refused.append(f"{layer.name} ({planned.why})")
        elif isinstance(planned, LayerFix):
            results[i] = planned
            if planned.source == "stored" and planned.changed:
                stored.append(layer)
        else:
            pending.append(planned)
    shown = view.info.path  # the path as the user gave it
    if refused:
        raise BackendError(
            f"{shown}: --stats stored keeps the file's statistics, but they cannot serve in "
            f"{listing(refused)}: use --stats auto with --data CALIB to recompute them"
        )
    needs_data = [p.layer.name for p in pending if not (p.what == "stale" and not p.defaults)]
    if data is None and needs_data and not request.dry_run:
        raise BackendError(
            f"{shown}: {listing(needs_data)} need calibration data (--data CALIB): their stored "
            "statistics are stale (never updated, non-finite or negative) or absent; layers "
            "with sound statistics need none (or pass --only to skip these)"
        )
    samples = sample_count(data, input_axes(view))
    batch, fixed = calibration_batch(view.inputs, request.batch_size)
    padded = (-samples) % batch if fixed else 0
    notes: list[str] = []
    if padded:
        notes.append(
            f"the model's batch dimension is fixed at {batch}: the last batch was completed with "
            f"{padded} repeated sample(s), left out of the statistics"
        )
    if data is not None and pending and samples < request.min_samples:
        raise BackendError(
            f"{request.data_label}: {samples} sample(s) are too few to estimate the statistics of "
            f"{listing([p.layer.name for p in pending])}: at least {request.min_samples} needed "
            f"(floor {MIN_SAMPLES}; --min-samples N overrides it)"
        )
    return _Plan(results, pending, stored, batch, fixed, samples, padded, notes)


@dataclass(frozen=True)
class _Refused:
    why: str


_ACTION = {"train": "to-inference", "stale": "recalibrated", "moments": "replaced-moments"}


def check_output(src: str, output: str | None) -> None:
    """Refuse a missing output and any output that is the input model (or one of its external files)."""
    if not output:
        raise BackendError(f"{src}: no output given: pass -o FIXED.onnx (or --dry-run to write nothing)")
    if os.path.isdir(output):
        raise BackendError(f"{output}: is a directory; give the fixed model's file name")
    if os.path.splitext(output)[1].lower() in (".keras", ".h5", ".hdf5"):  # the fixed model is the input's format
        raise BackendError(f"{output}: the fixed copy of an ONNX model is an ONNX file: give it the suffix .onnx")
    if _same_file(src, output):
        raise BackendError(f"{output}: refusing to overwrite the input model; write the fixed model elsewhere")
    parent = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(parent):
        raise BackendError(f"{output}: folder {parent} does not exist")


def _same_file(a: str, b: str) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.exists(b) and os.path.samefile(a, b)
    except OSError:
        return False


# ====================================================================== static plan


class _GraphFacts:
    """Consumers (subgraphs included), graph outputs, initializers and node positions of a model."""

    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self.opset = {(op.domain or ""): int(op.version) for op in model.opset_import}
        if "ai.onnx" in self.opset:
            self.opset.setdefault("", self.opset["ai.onnx"])
        self.initializers = {t.name: t for t in graph.initializer}
        self.graph_outputs = {o.name for o in graph.output}
        self.graph_inputs = {i.name for i in graph.input}
        self.uses: Counter[str] = Counter()
        self.users: dict[str, list[str]] = {}
        for node in graph.node:
            for name in node_reads(node):
                self.uses[name] += 1
                self.users.setdefault(name, []).append(_node_key(node))
        self.by_key = {_node_key(node): node for node in graph.node}
        self.by_name: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            self.by_name.setdefault(node.name or (node.output[0] if node.output else ""), []).append(node)
        self.graph = graph
        self._live: set[str] | None = None

    def live(self, tensor: str) -> bool:
        """Whether ``tensor`` reaches a graph output through the nodes that read it."""
        if self._live is None:
            self._live = live_tensors(self.graph.node, self.graph_outputs)
        return tensor in self._live


def live_tensors(nodes: Sequence[onnx.NodeProto], outputs: set[str]) -> set[str]:
    """The tensors a graph output depends on (subgraphs' outer reads included)."""
    return outputs | {name for i in upstream_nodes(nodes, outputs) for name in node_reads(nodes[i])}


def _node_key(node: onnx.NodeProto) -> str:
    """A node's identity that survives edits: its first output (unique in SSA form), else its name."""
    for out in node.output:
        if out:
            return "out:" + out
    return "name:" + node.name


def _plan(i: int, layer: NormLayer, graph: _GraphFacts, request: FixRequest) -> LayerFix | _Pending | _Refused:
    """The static decision for one layer: a final LayerFix, a _Pending that needs the data, or _Refused
    (--stats stored on statistics that cannot serve)."""
    name = layer.name
    repair = request.repair
    old = StatsSummary.stored(layer)
    if layer.extra.get("in_body"):
        return _plan_in_body(layer, graph, request)
    if layer.extra.get("lowered_instance_norm"):
        return LayerFix(
            name,
            "unchanged",
            "lowered InstanceNorm (training-mode BatchNormalization on a "
            "[1, N*C, ...] reshape): per-sample statistics, not a defect; left as is",
        )
    if layer.kind is not Kind.BATCH:
        if layer.batch_statistics:
            return LayerFix(
                name,
                "not-fixed",
                f"{layer.op_type} {layer.kind.value} norm over axes "
                f"{list(layer.axes or [])} mixes the samples of a batch, but it stores no statistics to use at "
                "inference: bncheck rewrites only BatchNormalization and hand-written batch moments; normalize "
                "over the sample's own axes instead",
                TRAIN_MODE,
            )
        if verdicts.collapse_is_certain(verdicts.collapse_condition(layer)):  # not on sizes the model leaves free
            return LayerFix(
                name,
                "not-fixed",
                f"{layer.kind.value} norm over a set of one element (BN001 "
                "collapse): no statistics can repair it; normalize over more elements or remove "
                "the layer",
                "BN001",
            )
        return LayerFix(name, "unchanged", f"{layer.kind.value} norm: statistics per sample, nothing to recalibrate")
    # an inference BatchNormalization that reads its own input's batch moments (walk: torch's BatchNorm without
    # running statistics) is replaced with them, as hand-written moments are
    if layer.op_type == "decomposed" or (layer.extra.get("batch_moments") and not layer.training):
        what = _moments_what(layer)
        if TRAIN_MODE not in repair:
            return LayerFix(name, "not-fixed", f"{what}: BN002 not selected by --only", TRAIN_MODE)
        why = _moments_unsafe(layer, graph)
        if why:
            return LayerFix(name, "not-fixed", f"{what} left as is: {why}", TRAIN_MODE)
        return _Pending(
            i,
            layer,
            "moments",
            TRAIN_MODE,
            f"{what} over axes {list(layer.axes or [])} replaced by an inference BatchNormalization",
        )
    affine = bool(layer.extra.get("affine_batch_norm"))  # its statistics are inputs of its chain: see affine_bn
    if not affine and (layer.op_type != "BatchNormalization" or layer.domain not in ("", "ai.onnx")):
        return LayerFix(
            name,
            "not-fixed" if layer.batch_statistics else "unchanged",
            f"{layer.domain or 'ai.onnx'}.{layer.op_type} is not rewritten by bncheck",
            TRAIN_MODE if layer.batch_statistics else None,
        )
    node = graph.by_key.get("out:" + layer.output)
    if not affine and (node is None or node.op_type != "BatchNormalization"):
        return LayerFix(
            name,
            "not-fixed",
            "the BatchNormalization node could not be found by its output",
            TRAIN_MODE if layer.batch_statistics else None,
        )
    if layer.extra.get("spatial") == 0:
        return LayerFix(
            name,
            "not-fixed",
            "spatial=0 (per-activation statistics) is not recomputed",
            TRAIN_MODE if layer.batch_statistics else STALE,
        )
    if layer.batch_statistics:
        if TRAIN_MODE not in repair:
            return LayerFix(
                name, "not-fixed", "train-mode BatchNormalization: BN002 not selected by --only", TRAIN_MODE, old=old
            )
        assert node is not None  # an affine batch norm (no node) never runs in training mode
        for out in list(node.output[1:]):
            if not out:
                continue
            readers = graph.users.get(out, [])
            if out in graph.graph_outputs:
                return LayerFix(
                    name,
                    "not-fixed",
                    f"its training output {out!r} is a graph output; removing "
                    "it would change the model's interface (re-export the model in inference "
                    "mode instead)",
                    TRAIN_MODE,
                    old=old,
                )
            if readers and graph.live(out):  # nodes that lead to no output go with it (_edit_to_inference)
                return LayerFix(
                    name,
                    "not-fixed",
                    f"its training output {out!r} is read by "
                    f"{readers[0].split(':', 1)[1]!r}; an inference node has no such output "
                    "(re-export the model in inference mode instead)",
                    TRAIN_MODE,
                    old=old,
                )
        problem = verdicts.stored_stats_problem(layer)
        if problem is None and (request.stats == "stored" or (request.stats == "auto" and request.data is None)):
            return LayerFix(
                name,
                "to-inference",
                "switched to inference with its stored running statistics (sound: not 0/1, finite, variance >= 0)",
                TRAIN_MODE,
                source="stored",
                old=old,
            )
        if problem is not None and request.stats == "stored":
            return _Refused(problem)
        if problem is None and request.stats == "auto":
            return _Pending(i, layer, "train", TRAIN_MODE, "switched to inference", prefer_stored=True)
        why = f"stored statistics unusable: {problem}" if problem else "--stats data"
        return _Pending(i, layer, "train", TRAIN_MODE, f"switched to inference with statistics from the data ({why})")
    if not layer.uses_running_stats:
        return LayerFix(name, "unchanged", "does not use running statistics")
    if layer.mean is None or layer.var is None:
        return LayerFix(
            name,
            "not-fixed" if STALE in repair else "unchanged",
            "running statistics are not constants of the file (fed or computed at run time): not recomputed",
            None,
        )
    if verdicts.folded_stats(layer):
        return LayerFix(name, "unchanged", verdicts.FOLDED_NOTE, old=old)
    defaults = verdicts.has_default_stats(layer)
    # never updated, non-finite or a negative variance: unusable, recomputed from the data like defaults
    problem = verdicts.stored_stats_problem(layer)
    if STALE not in repair:
        if problem:
            return LayerFix(name, "not-fixed", f"{problem}: BN003 not selected by --only", STALE, old=old)
        return LayerFix(name, "unchanged", "stale-statistics repair (BN003) not selected by --only", old=old)
    if problem and request.stats == "stored":
        return _Refused(problem)
    if defaults:
        return _Pending(
            i,
            layer,
            "stale",
            STALE,
            f"running mean exactly 0 and variance exactly 1 in all "
            f"{layer.mean.size} channels (never updated): recomputed from the data",
            defaults=True,
        )
    if problem:
        return _Pending(i, layer, "stale", STALE, f"{problem}: recomputed from the data", defaults=True)
    if request.stats == "stored":
        return LayerFix(name, "unchanged", "--stats stored: running statistics kept as stored", old=old)
    return _Pending(i, layer, "stale", STALE, "running statistics compared with the data")


def _plan_in_body(layer: NormLayer, graph: _GraphFacts, request: FixRequest) -> LayerFix:
    """A layer inside a control-flow body (control_flow.py): a train-mode BatchNormalization switches to its
    stored statistics where they are sound; nothing is recomputed (the probe measures the main graph only)."""
    name, where, old = layer.name, layer.extra["in_body"], StatsSummary.stored(layer)
    problem = verdicts.stored_stats_problem(layer) if layer.kind is Kind.BATCH else None
    if not layer.batch_statistics:
        if problem and layer.uses_running_stats:
            return LayerFix(name, "not-fixed", f"{problem}: inside {where}, not recomputed from data", STALE, old=old)
        return LayerFix(name, "unchanged", f"inside {where}: nothing to switch", old=old)
    why = None
    if TRAIN_MODE not in request.repair:
        why = "BN002 not selected by --only"
    elif layer.op_type != "BatchNormalization" or layer.domain not in ("", "ai.onnx") or layer.kind is not Kind.BATCH:
        why = f"{layer.domain or 'ai.onnx'}.{layer.op_type} is not rewritten by bncheck"
    elif problem is not None or request.stats == "data":
        why = f"stored statistics unusable ({problem})" if problem else "--stats data"
        why += f", and inside {where} none are recomputed from data"
    else:
        why = _body_outputs_read(graph.graph, layer.output)
    if why is not None:
        return LayerFix(name, "not-fixed", f"train-mode BatchNormalization inside {where}: {why}", TRAIN_MODE, old=old)
    return LayerFix(
        name,
        "to-inference",
        f"inside {where}: switched to inference with its stored running statistics (sound: not 0/1, finite, "
        "variance >= 0)",
        TRAIN_MODE,
        source="stored",
        old=old,
    )


def _in_bodies(graph: onnx.GraphProto, output: str) -> tuple[onnx.GraphProto, onnx.NodeProto] | None:
    """The body (however deep) holding the node whose first output is ``output``, and the node."""
    for body in nested_bodies(graph):
        for node in body.node:
            if node.output and node.output[0] == output:
                return body, node
    return None


def _body_outputs_read(graph: onnx.GraphProto, output: str) -> str | None:
    """Why the body node writing ``output`` cannot lose its training outputs (read in its body, or outputs of
    the body), or None."""
    found = _in_bodies(graph, output)
    if found is None:
        return "the node could not be found by its output"
    body, node = found
    extra = {o for o in node.output[1:] if o}
    read = {o.name for o in body.output} | {name for n in body.node for name in node_reads(n)}
    taken = sorted(extra & read)
    return f"its training output {taken[0]!r} is read in the body" if taken else None


def _moments_what(layer: NormLayer) -> str:
    return "hand-written batch moments" if layer.op_type == "decomposed" else "batch moments as its statistics"


def _moments_unsafe(layer: NormLayer, graph: _GraphFacts) -> str | None:
    """Why a decomposed batch-moments chain cannot be replaced by a BatchNormalization, or None."""
    if not layer.batch_statistics or not layer.centered:
        return "not centred batch moments"
    if not layer.output:
        return "its output is in another layout than its input (a Transpose inside the chain)"
    if layer.extra.get("eps_after_sqrt"):
        return "epsilon is added to the standard deviation, which BatchNormalization cannot express"
    shape = layer.input_shape
    if shape is None or layer.axes is None:
        return "input rank or reduction axes unknown"
    rank = len(shape)
    if rank < 2 or layer.channel_axis != 1 or set(layer.axes) != set(range(rank)) - {1}:
        return (
            f"axes {list(layer.axes)} of a rank-{rank} input are not 'every axis but axis 1', the only "
            "layout BatchNormalization normalizes"
        )
    if layer.epsilon is None or not math.isfinite(layer.epsilon) or layer.epsilon < 0:
        return "epsilon unknown"
    nodes = _chain_nodes(layer, graph)
    if isinstance(nodes, str):
        return nodes
    keys = {_node_key(n) for n in nodes}
    produced = {o for n in nodes for o in n.output if o}
    for out in sorted(produced - {layer.output}):  # sorted: the same message at every run
        if out in graph.graph_outputs:
            return f"intermediate tensor {out!r} is a graph output"
        outside = [u for u in graph.users.get(out, []) if u not in keys]
        if outside:
            return f"intermediate tensor {out!r} is also read by {outside[0].split(':', 1)[1]!r}"
    if layer.output not in produced:
        return "the chain's output is not produced by its nodes"
    return None


def _chain_nodes(layer: NormLayer, graph: _GraphFacts) -> list[onnx.NodeProto] | str:
    """The chain's nodes, with the copies (Identity, Cast) between them that only the chain reads: paddle2onnx
    2.x writes an Identity after every op, which the walk passes through without naming."""
    found = []
    for name in layer.nodes:
        matches = graph.by_name.get(name, [])
        if len(matches) != 1:
            return f"node {name!r} cannot be identified uniquely"
        found.append(matches[0])
    keys = {_node_key(n) for n in found}
    copies: dict[str, onnx.NodeProto] = {}  # value-preserving nodes reached from the chain's intermediates
    pending = [out for n in found for out in n.output if out and out != layer.output]
    while pending:
        for user in graph.users.get(pending.pop(), []):
            node = graph.by_key[user]
            if (
                user not in keys
                and user not in copies
                and node.op_type in VALUE_PRESERVING
                and node.domain in ("", "ai.onnx")
            ):
                copies[user] = node
                pending.extend(out for out in node.output if out and out != layer.output)
    inside = keys | set(copies)
    while True:  # drop the copies read outside the chain, until none is
        outside = [
            key
            for key, node in copies.items()
            if any(
                not out or out in graph.graph_outputs or not set(graph.users.get(out, [])) <= inside
                for out in node.output
            )
        ]
        if not outside:
            order = {key: position for position, key in enumerate(graph.by_key)}  # graph order
            return sorted(found + list(copies.values()), key=lambda node: order[_node_key(node)])
        for key in outside:
            del copies[key]
            inside.discard(key)


def _feedable(p: _Pending) -> bool:
    """Whether the measuring engine may take this layer's statistics as graph inputs (see :meth:`_Fixer.measure`).
    Not on 4-D inputs, where fed statistics keep the BN out of onnxruntime's NCHWc layout, which costs more
    than the sessions it saves (docs/architecture.md, ``bncheck fix`` for ONNX)."""
    shape = p.layer.input_shape
    return p.what == "stale" and p.layer.op_type == "BatchNormalization" and shape is not None and len(shape) != 4


# ====================================================================== samples


# ====================================================================== order of repairs


def _upstream_masks(pending: list[_Pending], handle: OnnxHandle) -> list[int]:
    """For each pending layer, the bit set of the pending layers upstream of its input."""
    from bncheck.backends.onnx.graph import GraphIndex

    index = GraphIndex(handle)
    # each layer's nodes by position: a BatchNormalization is the node writing the layer's output; a chain's
    # nodes go by name (fix refuses a chain whose names are not unique). By name alone, a node without a name
    # goes by its output's, which may be another layer's node's name: that layer then seemed upstream of none.
    owner: dict[int, int] = {}
    named: dict[str, list[int]] | None = None
    for k, p in enumerate(pending):
        writer = index.producer.get(p.layer.output)
        if p.layer.op_type == "BatchNormalization" and writer is not None:
            owner[writer] = k
            continue
        if named is None:
            named = {}
            for idx in range(len(index.nodes)):
                named.setdefault(index.node_name(idx), []).append(idx)
        for name in p.layer.nodes:
            for idx in named.get(name, []):
                owner[idx] = k
    upstream: dict[str, int] = {}  # tensor -> bit set of the pending layers it depends on
    for idx, node in enumerate(index.nodes):
        mask = 0
        for name in node_reads(node):
            mask |= upstream.get(name, 0)
        own = owner.get(idx)
        if own is not None:
            mask |= 1 << own
        for out in node.output:
            if out:
                upstream[out] = mask
    return [upstream.get(p.layer.input, 0) & ~(1 << k) for k, p in enumerate(pending)]


def _frontier_of(remaining: list[int], ups: list[int]) -> list[int]:
    """The layers of ``remaining`` with no layer of ``remaining`` upstream of them."""
    undecided = sum(1 << k for k in remaining)
    return [k for k in remaining if not ups[k] & undecided]


def _repaired_whatever_measured(p: _Pending, flagged: dict[str, dict[str, Any]]) -> bool:
    """Whether the layer's repair edits the model whatever its pass measures (unless its input cannot give
    statistics): a train-mode layer, a moments chain, statistics never updated, drift the probe reported."""
    return not (p.what == "stale" and not p.defaults and p.layer.name not in flagged)


def _first_pass_cut(
    pending: list[_Pending], ups: list[int], flagged: dict[str, dict[str, Any]], handle: OnnxHandle
) -> bool:
    """Whether the first pass measures the frontier alone (from kept tensors, as the later cut passes): where
    a repair of the frontier holds back every other layer, measuring them on the stored model would be a pass
    over the whole graph whose numbers no decision reads. Should a repair not happen after all (NaN/Inf in
    its input), the layers below are measured by the next pass, on the same model. Not where a layer's
    statistics can be fed: there one engine serves every pass and then the effect's two runs (measure)."""
    from bncheck.backends.onnx import frontier

    if any(_feedable(p) for p in pending):
        return False
    everything = (1 << len(pending)) - 1
    first = [k for k in range(len(pending)) if not ups[k] & everything]
    repaired = sum(1 << k for k in first if _repaired_whatever_measured(pending[k], flagged))
    if not repaired or any(k not in first and not ups[k] & repaired for k in range(len(pending))):
        return False
    return frontier.supports(handle.model, [pending[k].layer for k in first])


# ====================================================================== measuring and editing


class Edit(NamedTuple):
    """A repair, replayed on the working copy and again on the file written; ``key`` tells it from any other
    (the pass log's key: two repairs that made the same edits measure the same model)."""

    apply: Callable[[onnx.ModelProto, _Sink], None]
    key: tuple[Any, ...]


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha1()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


#: one batch's feeds -> the model's outputs by name
OutputsRun = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


class _Sink:
    """Where an edit puts tensor bytes: inline in the proto, or patched into a copied external-data file."""

    def __init__(
        self,
        external: dict[str, tuple[str, int, int | None]] | None = None,
        edited: set[str] | None = None,
        index: _ModelIndex | None = None,
    ) -> None:
        self.external = external or {}  # tensor name -> (copied file path, offset, length)
        self.edited = edited  # names of the tensors set inline, whose bytes in the input file are now stale
        self._index = index  # kept across the edits of one model (the working copy's is the fixer's)

    def index(self, model: onnx.ModelProto) -> _ModelIndex:
        """The lookups of ``model`` (a new index where the one given is another model's)."""
        if self._index is None or self._index.model is not model:
            self._index = _ModelIndex(model)
        return self._index

    def set_tensor(self, tensor: TensorProto, values: np.ndarray) -> None:
        dtype = tensors.np_dtype(tensor.data_type)
        array = np.asarray(values).astype(dtype).reshape(tuple(tensor.dims))
        target = self.external.get(tensor.name)
        if target is not None and tensor.data_location == TensorProto.EXTERNAL:
            path, offset, length = target
            raw = array.tobytes()
            if length is None or length == len(raw):
                with open(path, "r+b") as fh:
                    fh.seek(offset)
                    fh.write(raw)
                for entry in tensor.external_data:
                    if entry.key == "checksum":
                        entry.value = hashlib.sha1(raw).hexdigest()
                return
        fresh = tensors.from_array(array, tensor.name)
        tensor.ClearField("external_data")
        tensor.data_location = TensorProto.DEFAULT
        for fld in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
            tensor.ClearField(fld)
        tensor.raw_data = fresh.raw_data
        if self.edited is not None:
            self.edited.add(tensor.name)


class _ModelIndex:
    """What fix's edits of one model look up again and again: each node's position by its key, how often each
    name is read, each initializer's position, the names taken. A scan of the graph for each edit made a
    repair of a deep model quadratic in its size.

    Positions are checked at each use and read again where the graph moved; the read counts and taken names
    are kept in step by the statistics edits, and :meth:`names_dropped` / :meth:`reset` are called by the
    edits that remove names or move nodes."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self._nodes: dict[str, int] | None = None
        self._initializers: dict[str, int] | None = None
        self._initializer_count = 0
        self._reads: Counter[str] | None = None
        # every initializer, graph input, node output and node name, counted: a name is taken while its count is
        # above zero, so that dropping one use of a name leaves it taken where another use remains
        self._taken: Counter[str] | None = None

    def reset(self) -> None:
        self._nodes = self._initializers = None
        self._reads = self._taken = None

    def node(self, key: str) -> tuple[int, onnx.NodeProto]:
        """The first node whose key (:func:`_node_key`) is ``key``, and its position."""
        nodes = self.model.graph.node
        pos = self._nodes.get(key) if self._nodes is not None else None
        if pos is None or pos >= len(nodes) or _node_key(nodes[pos]) != key:
            self._nodes = self._index_nodes()
            pos = self._nodes.get(key)
            if pos is None:
                raise BackendError(f"internal: node {key} vanished while editing")  # pragma: no cover
        return pos, nodes[pos]

    def _index_nodes(self) -> dict[str, int]:
        positions: dict[str, int] = {}
        for i, node in enumerate(self.model.graph.node):
            positions.setdefault(_node_key(node), i)
        return positions

    def initializer(self, name: str) -> TensorProto | None:
        """The first initializer called ``name``, as the graph holds it (edits write into it)."""
        inits = self.model.graph.initializer
        if self._initializers is None or self._initializer_count != len(inits):
            self._index_initializers()
        assert self._initializers is not None
        pos = self._initializers.get(name)
        if pos is not None and inits[pos].name != name:  # the list changed under the same length: read again
            self._index_initializers()
            pos = self._initializers.get(name)
        return inits[pos] if pos is not None else None

    def _index_initializers(self) -> None:
        inits = self.model.graph.initializer
        self._initializers = {}
        for i, tensor in enumerate(inits):
            self._initializers.setdefault(tensor.name, i)
        self._initializer_count = len(inits)

    def add_initializer(self, tensor: TensorProto) -> None:
        inits = self.model.graph.initializer
        inits.append(tensor)
        if self._initializers is not None and self._initializer_count == len(inits) - 1:
            self._initializers.setdefault(tensor.name, len(inits) - 1)
            self._initializer_count = len(inits)

    def reads(self, name: str) -> int:
        """How often the graph's nodes read ``name`` (as _GraphFacts.uses counts)."""
        if self._reads is None:
            self._reads = self._count_reads()
        return self._reads[name]

    def _count_reads(self) -> Counter[str]:
        reads: Counter[str] = Counter()
        for node in self.model.graph.node:
            reads.update(node.input)
            if node.attribute:
                reads.update(outer_reads(node))
        return reads

    def rewired(self, old: str, new: str) -> None:
        """A node input changed from ``old`` (empty: none) to ``new``."""
        if self._reads is not None:
            if old:
                self._reads[old] -= 1
            self._reads[new] += 1

    def unique(self, base: str) -> str:
        """``base``, or ``base_2``, ``base_3``, ... : the first name not taken; it is taken from then on (the
        caller gives it to a new initializer or node)."""
        if self._taken is None:
            self._taken = self._count_names()
        name, k = base, 1
        while self._taken[name] > 0:
            k += 1
            name = f"{base}_{k}"
        self._taken[name] += 1
        return name

    def _count_names(self) -> Counter[str]:
        graph = self.model.graph
        taken = Counter(t.name for t in graph.initializer)
        taken.update(i.name for i in graph.input)
        for node in graph.node:
            taken.update(node.output)
            taken[node.name] += 1
        return taken

    def names_dropped(self, names: Iterable[str]) -> None:
        """Node outputs ``names`` were removed (their nodes stay where they are)."""
        if self._taken is not None:
            self._taken.subtract(names)


def _set_stat_input(
    model: onnx.ModelProto, sink: _Sink, node_key: str, position: int, values: np.ndarray, dtype: int, label: str
) -> None:
    """Give input ``position`` of a node new constant values: in place when only this node reads that
    initializer, else through a new initializer (so every other reader keeps its bytes)."""
    index = sink.index(model)
    _, node = index.node(node_key)
    current = node.input[position] if len(node.input) > position else ""
    graph = model.graph
    init = index.initializer(current) if current else None
    if (
        init is not None
        and init.data_type in _FLOAT_TYPES
        and int(np.prod(init.dims)) == values.size
        and all(current != value.name for value in (*graph.output, *graph.input))
        and index.reads(current) == 1
    ):
        sink.set_tensor(init, values.reshape(tuple(init.dims)))
        return
    # named after the tensor it replaces where there is one: a layer named by its weights' common prefix
    # (paddle2onnx's batch_norm2d_2.w_1 in a Constant node) keeps its name in the written model
    name = index.unique(f"{current or node.name or node.output[0]}.{label}")
    index.add_initializer(tensors.from_array(values.astype(tensors.np_dtype(dtype)), name))
    while len(node.input) <= position:
        node.input.append("")
    index.rewired(node.input[position], name)
    node.input[position] = name


def _edit_stats(node_key: str, mean: np.ndarray, var: np.ndarray, dtype: int) -> Edit:
    def edit(model: onnx.ModelProto, sink: _Sink) -> None:
        _set_stat_input(model, sink, node_key, 3, mean, dtype, "running_mean")
        _set_stat_input(model, sink, node_key, 4, var, dtype, "running_var")

    return Edit(edit, ("stats", node_key, _digest(mean, var), dtype))


def _edit_read_stats(
    reads: list[tuple[str, str, int, tuple[int, ...]]], mean: np.ndarray, var: np.ndarray, types: dict[str, Any]
) -> Edit:
    """New running statistics for a batch norm written out as its affine map (``affine_bn``): each input of its
    chain that reads the mean or the variance (``reads``: which, the reading node's output, the input's position,
    the shape it reads) gets the new values, in that shape and the type it had."""

    def edit(model: onnx.ModelProto, sink: _Sink) -> None:
        index = sink.index(model)
        for which, out, pos, shape in reads:
            _, node = index.node("out:" + out)
            stored = types.get(node.input[pos])
            dtype = int(stored) if stored in _FLOAT_TYPES else TensorProto.FLOAT
            values = (mean if which == "mean" else var).reshape(shape)
            _set_stat_input(model, sink, "out:" + out, pos, values, dtype, f"running_{which}")

    key = tuple((which, out, pos) for which, out, pos, _ in reads)
    return Edit(edit, ("read-stats", key, _digest(mean, var)))


def _edit_to_inference(node_key: str, opset: int) -> Edit:
    def edit(model: onnx.ModelProto, sink: _Sink) -> None:
        index = sink.index(model)
        _, node = index.node(node_key)
        removed = {o for o in node.output[1:] if o}
        index.names_dropped(list(node.output[1:]))
        del node.output[1:]
        _switch_to_inference(node, opset)
        # the nodes below the training outputs lead to no graph output (the plan refuses otherwise): a
        # quantizer's or a Cast's that a tool hung there
        below = _nodes_below(model.graph.node, removed)
        if below:
            read = {name for n in below for name in node_reads(n)}
            removed |= {o for n in below for o in n.output}
            gone = {_node_key(n) for n in below}
            _delete_where(model.graph.node, lambda n: _node_key(n) in gone)
            _drop_dead_sources(model, read - removed)
            index.reset()
        _delete_where(model.graph.value_info, lambda v: v.name in removed)

    return Edit(edit, ("inference", node_key, opset))


def _edit_body_to_inference(output: str, opset: int) -> Edit:
    """A body's train-mode BatchNormalization switched to inference; its training outputs, which nothing
    reads (the plan checked), dropped."""

    def edit(model: onnx.ModelProto, sink: _Sink) -> None:
        found = _in_bodies(model.graph, output)
        if found is None:
            raise BackendError(f"internal: node of {output!r} vanished while editing")  # pragma: no cover
        body, node = found
        removed = {o for o in node.output[1:] if o}
        del node.output[1:]
        _switch_to_inference(node, opset)
        _delete_where(body.value_info, lambda v: v.name in removed)

    return Edit(edit, ("body-inference", output, opset))


def _switch_to_inference(node: onnx.NodeProto, opset: int) -> None:
    for attr in node.attribute:
        if attr.name == "training_mode":
            attr.i = 0
        if attr.name == "is_test":
            attr.i = 1
    if opset < 7 and not any(a.name == "is_test" for a in node.attribute):
        node.attribute.append(helper.make_attribute("is_test", 1))


def _quantizers_below(graph: onnx.GraphProto, changed: list[NormLayer]) -> list[str]:
    """The static quantizers (QuantizeLinear, com.microsoft's QLinear ops: stored scales) that read what a
    changed layer computes, directly or through other nodes; their names."""
    if not changed or not any(_static_quantizer(node) for node in graph.node):
        return []
    nodes = [graph.node[i] for i in topological_order(list(graph.node))]
    outputs = {layer.output for layer in changed if layer.output}
    return [node.name or node.output[0] for node in _nodes_below(nodes, outputs) if _static_quantizer(node)]


def _static_quantizer(node: onnx.NodeProto) -> bool:
    return node.domain in ("", "ai.onnx", "com.microsoft") and (
        node.op_type == "QuantizeLinear" or node.op_type.startswith("QLinear")
    )


def _nodes_below(nodes: Iterable[onnx.NodeProto], tensors: set[str]) -> list[onnx.NodeProto]:
    """The nodes that read ``tensors``, directly or through each other (``nodes`` sorted)."""
    reached = set(tensors)
    below = []
    for node in nodes:
        if any(name in reached for name in node_reads(node)):
            below.append(node)
            reached.update(o for o in node.output if o)
    return below


def _edit_replace_chain(
    keys: list[str], output: str, x: str, eps: float, name: str, params: dict[str, np.ndarray], dtype: int, opset: int
) -> Edit:
    def edit(model: onnx.ModelProto, sink: _Sink) -> None:
        graph = model.graph
        index = sink.index(model)
        positions = {}
        for key in keys:
            pos, _ = index.node(key)
            positions[key] = pos
        anchor = positions.get("out:" + output, max(positions.values()))  # where the chain's output was made
        np_dtype = tensors.np_dtype(dtype)
        names = {}
        for label in ("scale", "bias", "mean", "var"):
            names[label] = index.unique(f"{name}.{label}")
            index.add_initializer(tensors.from_array(params[label].astype(np_dtype), names[label]))
        attrs: dict[str, Any] = {"epsilon": float(eps)}
        if opset < 7:
            attrs["is_test"] = 1
        old = [copied(n) for n in graph.node]  # detached copies: the repeated field is cleared below
        drop = set(positions.values())
        kept_names = {n.name for pos, n in enumerate(old) if pos not in drop}
        node_name, k = name, 1
        while node_name in kept_names:
            k += 1
            node_name = f"{name}_{k}"
        bn = helper.make_node(
            "BatchNormalization",
            [x, names["scale"], names["bias"], names["mean"], names["var"]],
            [output],
            name=node_name,
            **attrs,
        )
        new_nodes = []
        for pos, node in enumerate(old):
            if pos == anchor:
                new_nodes.append(bn)
            elif pos not in drop:
                new_nodes.append(node)
        read = {name for pos in drop for name in node_reads(old[pos])}
        del graph.node[:]
        graph.node.extend(new_nodes)
        _drop_dead_sources(model, read)
        index.reset()  # nodes moved, names and reads dropped
        removed_values = {o for pos in drop for o in old[pos].output if o and o != output}
        _delete_where(graph.value_info, lambda v: v.name in removed_values)

    labels = ("scale", "bias", "mean", "var")
    return Edit(edit, ("chain", tuple(keys), output, x, eps, name, _digest(*(params[k] for k in labels)), dtype, opset))


def _drop_dead_sources(model: onnx.ModelProto, read: set[str]) -> None:
    """Drop the initializers among ``read`` that nothing reads any more, and the nodes that wrote them once none
    of their outputs is read, then what those read, and so on (a removed chain's epsilon, axes, gamma, beta;
    statistics an edit replaced, with the Reshape that read them or the moments that computed them); anything
    else, used or not, stays as it was."""
    graph = model.graph
    facts = _GraphFacts(model)  # read once: each dropped writer's reads are counted off as it goes
    uses, kept = facts.uses, facts.graph_outputs | facts.graph_inputs
    writer = {out: node for node in graph.node for out in node.output if out}
    dead_values: set[str] = set()
    dropped: set[str] = set()
    while read:
        dead = {name for name in read if not uses[name] and name not in kept}
        dead_values |= dead
        writers = {
            _node_key(node): node
            for name in dead
            if (node := writer.get(name)) is not None
            and _node_key(node) not in dropped
            and _writer_of_dead(node, uses, facts.graph_outputs)
        }
        dropped.update(writers)
        read = set()
        for node in writers.values():
            for name in node_reads(node):
                uses[name] -= 1
                read.add(name)
    if not dead_values:
        return
    gone = {out for node in graph.node if _node_key(node) in dropped for out in node.output if out}
    _delete_where(graph.node, partial(_keyed_in, keys=dropped))
    _delete_where(graph.initializer, partial(_named_in, names=dead_values))
    _delete_where(graph.value_info, partial(_named_in, names=gone))


def _writer_of_dead(node: onnx.NodeProto, uses: Counter[str], outputs: set[str]) -> bool:
    """Nothing reads any of ``node``'s outputs (an ONNX op: no custom op's side effects)."""
    return node.domain in ("", "ai.onnx") and all(not uses[o] and o not in outputs for o in node.output if o)


def _keyed_in(node: onnx.NodeProto, keys: set[str]) -> bool:
    return _node_key(node) in keys


def _named_in(tensor: TensorProto, names: set[str]) -> bool:
    return tensor.name in names


def _delete_where(repeated: Any, condition: Callable[[Any], bool]) -> None:
    """Delete matching entries of a protobuf repeated field in place (no copies of the others: weights)."""
    for i in reversed(range(len(repeated))):
        if condition(repeated[i]):
            del repeated[i]


class _Fixer:
    """The working copy (weights loaded, edited as repairs are decided) and the edits to replay."""

    def __init__(
        self,
        handle: OnnxHandle,
        data: dict[str, np.ndarray],
        batch: int,
        min_samples: int,
        data_label: str,
        flagged: dict[str, dict[str, Any]],
        fixed: bool = False,
        log: PassLog | None = None,
        axes: dict[str, int | None] | None = None,
    ) -> None:
        self.handle = handle
        self.axes = axes or {}  # each input's batch axis: None feeds it whole in every batch
        self.log = log if log is not None else PassLog(dropped=True)  # none given: nothing kept
        self.passes = 0  # passes over the data so far (measured or replayed)
        self.fixed = fixed  # the model's batch dimension is fixed: every batch must be full
        self.data = data
        self.batch = batch
        self.min_samples = min_samples
        self.data_label = data_label
        self.edits: list[Edit] = []
        # the statistics inputs the edits replace: a Constant node's the new initializer leaves unread is
        # dropped from the written model (onnxruntime warns of each at every load)
        self.replaced: set[str] = set()
        self.opset = _GraphFacts(handle.model).opset.get("", 0)
        self.flagged = dict(flagged)
        # outputs of the stale inference BNs, whose statistics a kept engine takes as inputs (measure)
        self.feedable: set[str] = set()
        self._engine: Any = None  # run._Engine, kept across passes while only fed statistics change
        self._fed_like: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # the fed statistics as first read
        self._engine_on_stored = False  # the kept engine was built before any edit
        self._frontier: Any = None  # frontier.Frontier: the cut passes' kept tensors
        self.frontier_off: str | None = None  # why the cut passes stopped running from kept tensors
        self.segments = 0  # segment sessions the cut passes ran from kept tensors
        self.segment_nodes = 0  # the nodes those sessions ran
        self._index: _ModelIndex | None = None  # the working copy's lookups (_model_index)

    # ------------------------------------------------------------------ statistics

    def measure(self, layers: list[NormLayer], cut: bool = False) -> dict[str, TensorStats]:
        """``layers``' input statistics over the data, the model as edited so far. One engine serves every pass
        whose layers it measures, as long as only fed statistics were edited since it was built (a session
        per pass reads and optimizes every weight again). ``cut``: a new engine computes only what these
        layers' inputs need."""
        from bncheck.backends.onnx.run import measure_with

        names = {layer.name for layer in layers}
        served = self._engine_serves(layers)
        # a kept engine runs a pass without a session build, and a segment's session beside it would hold
        # a second copy of its weights: the kept tensors serve only passes that would build their own
        if cut and not served:
            found = self._from_frontier(layers)
            if found is not None:
                return found
        if not served:
            self._open_engine(layers, cut)
        self._feed(self._statistics_now(list(self._engine.fed_inputs)))
        batches = calibration_batches(self.data, self.batch, fixed=self.fixed, axes=self.axes)
        return {name: stats for name, stats in measure_with(self._engine, batches).items() if name in names}

    def _from_frontier(self, layers: list[NormLayer]) -> dict[str, TensorStats] | None:
        """A cut pass's statistics from the tensors earlier cut passes kept (frontier.py); None when it cannot
        run so (then it never tries again in this repair, but for a pass of layers it does not handle)."""
        from bncheck.backends.onnx import frontier

        if self.frontier_off is not None or not frontier.supports(self.handle.model, layers):
            return None
        if self._frontier is None:
            batches = list(calibration_batches(self.data, self.batch, fixed=self.fixed, axes=self.axes))
            if not batches:
                return None
            self._frontier = frontier.Frontier(self.handle, batches)
        if self._engine is not None:  # an engine of other layers: its session's weights are let go first
            self._engine.close()
            self._engine = None
        try:
            return self._frontier.measure(layers)
        except frontier.Unsupported as exc:
            self.frontier_off = str(exc)
            self.drop_frontier()
            return None

    def frontier_serves(self, layers: list[NormLayer]) -> bool:
        """Whether a cut pass over ``layers`` may run from kept tensors (frontier.py): not once they failed in this
        repair, nor where the kept engine measures these layers (it runs a pass without a session build)."""
        from bncheck.backends.onnx import frontier

        if not layers or self.frontier_off is not None or self._engine_serves(layers):
            return False
        return frontier.supports(self.handle.model, layers)

    def _engine_serves(self, layers: list[NormLayer]) -> bool:
        """Whether the kept engine measures every one of ``layers``."""
        return self._engine is not None and {layer.name for layer in layers} <= {
            layer.name for layer in self._engine.layers
        }

    def recomputed_outputs(self, samples: int) -> dict[str, np.ndarray] | None:
        """The model's outputs with every repair made, on the whole data, run on from the tensors the cut
        passes kept (the nodes below the last layers only); None when none are kept or ``samples`` is not the
        whole data. The kept tensors are let go either way."""
        from bncheck.backends.onnx import frontier

        total = sample_count(self.data, self.axes)
        try:
            if self._frontier is None or samples != total:
                return None
            return self._frontier.outputs([o.name for o in self.handle.model.graph.output])
        except frontier.Unsupported as exc:
            self.frontier_off = str(exc)
            return None
        finally:
            self.drop_frontier()

    def drop_frontier(self) -> None:
        if self._frontier is not None:
            self.segments += self._frontier.segments
            self.segment_nodes += self._frontier.nodes_run
            self._frontier.close()
        self._frontier = None

    def pass_stats(self, layers: list[NormLayer], cut: bool = False) -> PassStats:
        """:meth:`measure` for the next pass, replayed from the log where an earlier repair made this same pass."""
        names = sorted(self.data)
        key = (
            tuple(edit.key for edit in self.edits),
            tuple(layer.name for layer in layers),
            cut,
            self.batch,
            self.fixed,
            tuple(names),
        )
        data = tuple(self.data[name] for name in names)
        stats = self.log.open(self.passes, key, data, lambda: self.measure(layers, cut))
        self.passes += 1
        return stats

    def _feed(self, statistics: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
        """Set the kept engine's fed statistics (BN output -> mean, variance), in the types and shapes it declares.
        Every fed layer is there: record() drops the engine when a fed layer's statistics move elsewhere."""
        values: dict[str, np.ndarray] = {}
        for output, (mean_name, var_name) in self._engine.fed_inputs.items():
            like_mean, like_var = self._fed_like[output]
            values[mean_name] = statistics[output][0].astype(like_mean.dtype).reshape(like_mean.shape)
            values[var_name] = statistics[output][1].astype(like_var.dtype).reshape(like_var.shape)
        self._engine.fed_values = values

    def _open_engine(self, layers: list[NormLayer], cut: bool) -> None:
        from bncheck.backends.onnx.run import inputs_engine

        self.close()
        work = OnnxHandle(
            path=self.handle.path,
            model=self.handle.model,
            external_data=self.handle.external_data,  # then its large tensors are read from their files
            value_shapes=self.handle.value_shapes,
            value_types=self.handle.value_types,
            size_bytes=self.handle.size_bytes,
            info=self.handle.info,
            notes=[],
            edited=self.handle.edited,
        )
        activations = calibration_memory(self.handle, self.data, self.axes, self.batch, self.fixed)
        self._fed_like = self._statistics_now([layer.output for layer in layers if layer.output in self.feedable])
        self._engine = inputs_engine(work, layers, activations, fed=list(self._fed_like), cut=cut)
        # a cut graph computes no model output: it cannot run the stored and the recomputed model
        self._engine_on_stored = not self.edits and not cut

    def stored_and_recomputed(self) -> tuple[OutputsRun, OutputsRun] | None:
        """Runs of the model's outputs through the kept engine (no session of its own), with the statistics as
        stored and as recomputed; None when that engine cannot give both: it was built on an edited model, or
        none is kept (an edit other than a fed layer's statistics closed it)."""
        if self._engine is None or not self._engine_on_stored:
            return None
        engine = self._engine

        def with_statistics(statistics: dict[str, tuple[np.ndarray, np.ndarray]]) -> OutputsRun:
            def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
                self._feed(statistics)
                return engine.observe(feeds, layers=False).outputs

            return run

        return with_statistics(self._fed_like), with_statistics(self._statistics_now(list(engine.fed_inputs)))

    def _statistics_now(self, outputs: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """The running mean and variance of the BatchNormalization nodes writing ``outputs``, as edited so far,
        where both are initializers held in memory."""
        graph = self.handle.model.graph
        inits = {t.name: t for t in graph.initializer}
        writers = {node.output[0]: node for node in graph.node if node.output}
        found: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for output in outputs:
            node = writers.get(output)
            if node is None or node.op_type != "BatchNormalization" or len(node.input) < 5:
                continue
            mean, var = inits.get(node.input[3]), inits.get(node.input[4])
            if mean is None or var is None or TensorProto.EXTERNAL in (mean.data_location, var.data_location):
                continue
            found[output] = (tensors.to_array(mean), tensors.to_array(var))
        return found

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
        self._engine = None
        self.drop_frontier()

    # ------------------------------------------------------------------ decisions

    def record(self, edit: Edit, fed: str | None = None) -> None:
        """Apply ``edit`` and keep it for :meth:`write`; ``fed``: the output of the BN whose statistics alone
        it sets (the kept engine reads them at its next pass when it feeds them; else it is rebuilt)."""
        edit.apply(self.handle.model, _Sink(edited=self.handle.edited, index=self._model_index()))
        self.edits.append(edit)
        if self._engine is not None and (fed is None or fed not in self._engine.fed_inputs):
            self.close()  # its graph holds what this edit changed: the next pass builds its own

    def _model_index(self) -> _ModelIndex:
        """The working copy's lookups, kept across its edits."""
        model = self.handle.model
        if self._index is None or self._index.model is not model:
            self._index = _ModelIndex(model)
        return self._index

    def apply(self, p: _Pending, stats: TensorStats | None) -> LayerFix:
        layer = p.layer
        old = StatsSummary.stored(layer) if p.what != "moments" else None
        if stats is None:
            return LayerFix(layer.name, "not-fixed", "its input could not be measured", p.code, old=old)
        samples = int(stats.sample_mean.shape[0])
        if samples < self.min_samples:  # the static check saw the data's size; this is the measured one
            raise BackendError(
                f"{self.data_label}: {samples} sample(s) reached layer {layer.name!r}: at least "
                f"{self.min_samples} needed (--min-samples N overrides the floor)"
            )
        spread = uncertainty(stats)
        evidence: dict[str, Any] = {"samples": samples, "values_per_channel": int(stats.count)}
        if stats.total_nonfinite:
            return LayerFix(
                layer.name,
                "not-fixed",
                f"its input holds {stats.total_nonfinite} NaN/Inf value(s) "
                "on the calibration data: no honest statistics",
                p.code,
                old=old,
                evidence=evidence,
            )
        channels = layer.channels or (layer.mean.size if layer.mean is not None else None)
        if channels is not None and stats.channels != channels:
            return LayerFix(
                layer.name,
                "not-fixed",
                f"measured {stats.channels} channels, the layer has {channels}",
                p.code,
                old=old,
                evidence=evidence,
            )
        mean = np.asarray(stats.mean, dtype=np.float64)
        var = np.asarray(stats.var, dtype=np.float64)
        new = StatsSummary.of(mean, var)
        key = "out:" + layer.output
        if p.what == "train" and p.prefer_stored:
            found = verdicts.drift(layer, mean, var)
            evidence.update(found.evidence())
            now = verdicts.drift_text(found)
            if not verdicts.drifts(found):
                self.record(_edit_to_inference(key, self.opset))
                return LayerFix(
                    layer.name,
                    "to-inference",
                    f"{p.reason} with its stored running statistics, which agree with the data ({now})",
                    p.code,
                    source="stored",
                    old=old,
                    evidence=evidence,
                )
            reason = f"{p.reason} with statistics from the data (the stored ones drift from it: {now})"
        elif p.what == "stale" and not p.defaults:
            found = verdicts.drift(layer, mean, var)
            evidence.update(found.evidence())
            drifts = verdicts.drifts(found)
            before = self.flagged.get(layer.name)
            now = verdicts.drift_text(found)
            if not drifts and before is None:
                return LayerFix(
                    layer.name,
                    "unchanged",
                    f"running statistics agree with the data ({now}; {verdicts.DRIFT_THRESHOLDS})",
                    old=old,
                    evidence=evidence,
                )
            if drifts and p.after_repairs:
                reason = drift_once_repaired(now, before)
            elif drifts or before is None:
                reason = f"running statistics drift from the data ({now}): recomputed from the data"
            elif p.after_repairs:
                evidence["original_drift"] = before
                reason = drift_after_upstream(before, now)
            else:  # the same data, a pass summing them in another order: at the threshold
                evidence["probe_drift"] = before
                reason = drift_found_by_probe(before, now)
        else:
            reason = p.reason
        if p.layer.extra.get("affine_batch_norm"):
            reads = p.layer.extra["stat_reads"]
            index = self._model_index()
            self.replaced.update(index.node("out:" + out)[1].input[pos] for _, out, pos, _ in reads)
            edits = [_edit_read_stats(reads, mean, var, self.handle.value_types)]
        elif p.what in ("stale", "train"):
            _, node = self._model_index().node(key)
            # new statistics tensors take the stored statistics' type (opset 15 lets it differ from X's)
            stored = self.handle.value_types.get(node.input[3]) if len(node.input) > 3 else None
            dtype = int(stored) if stored in _FLOAT_TYPES else self._value_type(node.input[0])
            self.replaced.update(name for name in node.input[3:5] if name)
            edits = [_edit_stats(key, mean, var, dtype)]
            if p.what == "train":
                edits.insert(0, _edit_to_inference(key, self.opset))
        else:
            built = self._moments_edit(layer, mean, var)
            if isinstance(built, str):
                return LayerFix(
                    layer.name,
                    "not-fixed",
                    f"{_moments_what(layer)} left as is: {built}",
                    p.code,
                    evidence=evidence,
                )
            edits = [built]
        for edit in edits:
            self.record(edit, layer.output if p.what == "stale" else None)
        return LayerFix(
            layer.name,
            _ACTION[p.what],
            reason,
            p.code,
            source="data",
            old=old,
            new=new,
            uncertainty=spread,
            evidence=evidence,
        )

    def _value_type(self, name: str) -> int:
        t = self.handle.value_types.get(name)
        return int(t) if t in _FLOAT_TYPES else TensorProto.FLOAT

    def _moments_edit(self, layer: NormLayer, mean: np.ndarray, var: np.ndarray) -> Edit | str:
        facts = _GraphFacts(self.handle.model)
        nodes = _chain_nodes(layer, facts)
        if isinstance(nodes, str):
            return nodes
        in_type = self.handle.value_types.get(layer.input)
        out_type = self.handle.value_types.get(layer.output)
        if in_type not in _FLOAT_TYPES or (out_type is not None and out_type != in_type):
            return "input and output types differ or are not floating point"
        c = mean.size
        # a BatchNormalization's own scale and bias are [C] vectors: per channel as a rank-2 broadcast reads them
        rank = 2 if layer.op_type == "BatchNormalization" else len(layer.input_shape or ())
        scale = _per_channel(layer.scale, c, rank, 1.0)
        bias = _per_channel(layer.bias, c, rank, 0.0)
        if isinstance(scale, str) or isinstance(bias, str):
            return scale if isinstance(scale, str) else bias  # type: ignore[return-value]
        external = _external_inputs(nodes, layer.input)
        g = _graph_index(self.handle)
        for name in external:
            if g.param(name) is None:
                return f"the chain reads {name!r}, which is not a constant"
        problem = _verify_chain(self.handle, g, nodes, layer, scale, bias, external)
        if problem:
            return problem
        params = {"scale": scale, "bias": bias, "mean": mean, "var": var}
        return _edit_replace_chain(
            [_node_key(n) for n in nodes],
            layer.output,
            layer.input,
            float(layer.epsilon or 0.0),
            layer.name,
            params,
            int(in_type),
            self.opset,
        )

    # ------------------------------------------------------------------ writing

    def write(self, output: str) -> list[str]:
        """Write the repaired model; returns the files written (the model first).

        Without external data the working copy is the file as parsed, edits applied: it is written as is.
        With external data the working copy holds the weights in memory, so the edits are replayed on the
        file parsed without its weights, and the external files are copied next to the output (same
        offsets) and patched where a repaired tensor lives.
        """
        if not self.handle.external_data:
            _drop_dead_sources(self.handle.model, self.replaced)
            replace_with(output, self.handle.model.SerializeToString())
            return [output]
        src = self.handle.path
        model = onnx.load(src, load_external_data=False)
        out_dir = os.path.dirname(os.path.abspath(output))
        src_dir = os.path.dirname(os.path.abspath(src))
        written: list[str] = []
        mapping = _external_names(model, src, src_dir, output, out_dir)
        sink_targets: dict[str, tuple[str, int, int | None]] = {}
        for location, new_location in mapping.items():
            target = os.path.join(out_dir, new_location)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copyfile(os.path.join(src_dir, location), target)
            written.append(os.path.join(os.path.dirname(output), new_location))  # as the user wrote the path
        for tensor, (location, offset, length) in _iter_external(model):
            new_location = mapping[location]
            relocate(tensor, new_location)
            sink_targets[tensor.name] = (os.path.join(out_dir, new_location), offset, length)
        sink = _Sink(sink_targets)
        for edit in self.edits:
            edit.apply(model, sink)
        _drop_dead_sources(model, self.replaced)
        replace_with(output, model.SerializeToString())
        return [output] + written


def _graph_index(handle: OnnxHandle):
    from bncheck.backends.onnx.graph import GraphIndex

    return GraphIndex(handle)


def _per_channel(values: np.ndarray | None, channels: int, rank: int, default: float) -> np.ndarray | str:
    """A chain's gamma/beta as a [C] vector (absent: ``default``), or why it is not per channel."""
    if values is None:
        return np.full(channels, default)
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 1:
        return np.full(channels, float(arr.ravel()[0]))
    if arr.ndim > rank:
        return f"parameter of shape {list(arr.shape)} does not broadcast per channel"
    padded = (1,) * (rank - arr.ndim) + tuple(arr.shape)
    if any(d != 1 for axis, d in enumerate(padded) if axis != 1) or padded[1] != channels:
        return f"parameter of shape {list(arr.shape)} is not per channel"
    return arr.reshape(channels)


def _external_inputs(nodes: list[onnx.NodeProto], x: str) -> list[str]:
    produced = {o for n in nodes for o in n.output if o}
    seen: list[str] = []
    for n in nodes:
        for name in n.input:
            if name and name not in produced and name != x and name not in seen:
                seen.append(name)
    return seen


def _verify_chain(
    handle: OnnxHandle,
    g,
    nodes: list[onnx.NodeProto],
    layer: NormLayer,
    scale: np.ndarray,
    bias: np.ndarray,
    external: list[str],
) -> str | None:
    """Run the chain alone (onnx.reference) on random input and compare with the batch-norm formula."""
    from onnx.reference import ReferenceEvaluator

    shape = [d if isinstance(d, int) else (4 if axis == 0 else 3) for axis, d in enumerate(layer.input_shape or ())]
    in_type = handle.value_types.get(layer.input, TensorProto.FLOAT)
    np_dtype = tensors.np_dtype(in_type)
    inits = [tensors.from_array(np.asarray(g.param(name)), name) for name in external]
    graph = helper.make_graph(
        [copied(n) for n in nodes],
        "chain",
        [helper.make_tensor_value_info(layer.input, in_type, shape)],
        [helper.make_tensor_value_info(layer.output, in_type, None)],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=list(handle.model.opset_import))
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * 2.0 + 0.5).astype(np_dtype)
    try:
        (got,) = ReferenceEvaluator(model).run(None, {layer.input: x})
    except Exception as exc:
        return f"the chain could not be evaluated on its own ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
    axes = tuple(a for a in range(len(shape)) if a != 1)
    xd = x.astype(np.float64)
    m = xd.mean(axis=axes, keepdims=True)
    v = xd.var(axis=axes, keepdims=True)
    bshape = [1] * len(shape)
    bshape[1] = -1
    want = (xd - m) / np.sqrt(v + float(layer.epsilon or 0.0)) * scale.reshape(bshape) + bias.reshape(bshape)
    got = np.asarray(got, dtype=np.float64)
    if got.shape != want.shape:
        return f"the chain's output shape {list(got.shape)} differs from its input's {list(want.shape)}"
    tol = CHAIN_TOLERANCE if np_dtype != np.float16 else 1e-2
    err = float(np.max(np.abs(got - want) / np.maximum(1.0, np.abs(want))))
    if not err <= tol:
        return (
            f"the chain does not compute the batch-norm formula (largest relative difference {err:.3g} on a "
            "random input); it is left alone"
        )
    return None


# ====================================================================== external data


def _all_tensors(model: onnx.ModelProto) -> list[TensorProto]:
    from onnx import external_data_helper

    return list(external_data_helper._get_all_tensors(model))  # onnx's own enumeration (see onnx_load)


def _iter_external(model: onnx.ModelProto) -> Iterator[tuple[TensorProto, tuple[str, int, int | None]]]:
    for tensor in _all_tensors(model):
        if tensor.HasField("data_location") and tensor.data_location == TensorProto.EXTERNAL:
            entries = {e.key: e.value for e in tensor.external_data}
            offset = int(entries.get("offset", 0) or 0)
            length = int(entries["length"]) if entries.get("length") else None
            yield tensor, (entries.get("location", ""), offset, length)


def _external_names(model: onnx.ModelProto, src: str, src_dir: str, output: str, out_dir: str) -> dict[str, str]:
    """Where each external-data file of the input goes next to the output: named after the output's file, in
    any folder, so that neither the input's files nor another written model's in that folder (a --stats
    stored and a --stats data copy, say) are overwritten.
    """
    locations: list[str] = []
    for _, (location, _, _) in _iter_external(model):
        if location not in locations:
            locations.append(location)
    if not locations:
        return {}
    base = os.path.basename(output)
    mapping: dict[str, str] = {}
    protected = {os.path.realpath(src)} | {os.path.realpath(os.path.join(src_dir, loc)) for loc in locations}
    if os.path.realpath(output) in protected:
        raise BackendError(f"{output}: refusing to overwrite the input model's external data file")
    for location in locations:
        new = f"{base}.data" if len(locations) == 1 else f"{base}.{location.replace('/', '_')}"
        target = os.path.realpath(os.path.join(out_dir, new))
        if (
            target in protected
            or target == os.path.realpath(output)
            or any(os.path.exists(target) and os.path.exists(p) and os.path.samefile(target, p) for p in protected)
        ):
            raise BackendError(
                f"{output}: writing external data {new!r} would overwrite a file of the input "
                "model; write the fixed model into another folder"
            )
        mapping[location] = new
    return mapping
