"""Where an unexplained batch dependence starts: bisection over the graph's tensors in topological order.

Called by the probe only when the model's outputs depend on a sample's batch companions and no normalization
layer explains it. The predicate bisected is "some tensor live across the cut after node i depends on the
batch" (live: produced at or before node i, read after it or a graph output). It is false before the first
batch-dependent node whose dependence reaches the outputs and true from that node on, so the smallest cut
where it holds is right after that node: its inputs (live across the previous cut, or graph inputs and
weights) do not depend on the batch, one of its outputs does. Each step builds a session of the nodes that
cut's tensors need, with them as its outputs, and runs two batches of the same size that hold the sample at
the same row, one with other samples and one with copies of it as companions: about 2 log2(nodes) runs.
Same size and row means same kernels, so a tensor that does not depend on the companions is bit-identical in
both (comparing the sample alone with the sample in a batch would mistake the rounding of
batch-size-dependent kernels, amplified by cancellations such as E[x^2] - E[x]^2, for a dependence).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from bncheck.backends.onnx.cancel import run_options
from bncheck.backends.onnx.graph import ONNX_DOMAINS, TRANSPARENT, node_reads, upstream_nodes
from bncheck.backends.onnx.instrument import keep_only, stub
from bncheck.backends.onnx.tensors import to_array
from bncheck.model import DYNAMIC_QUANT_OPS, LocatedDependence
from bncheck.probe_plan import SCALE_FLOOR, output_scale, sample_shifts

if TYPE_CHECKING:
    import onnx

    from bncheck.backends.onnx.load import OnnxHandle
    from bncheck.backends.onnx.probe_copy import ProbeCopy
    from bncheck.backends.onnx.scratch import Scratch


#: ops that keep an integer tensor's values or cut some of them out (a length's way to an LSTM's sequence_lens)
_KEEPS_VALUES = frozenset({*TRANSPARENT, "Slice", "Gather", "Expand", "Tile"})
#: domains of the dynamic quantizers (the standard op, and onnxruntime's fused kernels)
_QUANT_DOMAINS = frozenset({*ONNX_DOMAINS, "com.microsoft"})


class _Unlocatable(Exception):
    """onnxruntime cannot run a cut of the model: the dependence stays unlocated."""


def tensor_change(a: np.ndarray, b: np.ndarray, row: int, batch: int) -> float | None:
    """How much a tensor differs between two runs of the same batch size ``batch`` that hold the same sample
    at ``row``: ``a`` with other companions, ``b`` with copies of the sample. In the tensor's standard
    deviations (rms over elements); None when the two cannot be compared (not floating point, or shapes that
    differ).

    A tensor with a slice per sample compares that slice (unit: the spread across ``a``'s slices), along the
    axis that holds the samples, wherever an op moved it (an LSTM's [seq, batch, ...], a Transpose), or the
    sample's block of rows where the batch is merged into axis 0 ([batch * heads, ...]); one whose
    shape does not follow the batch (a reduction over the batch axis) is compared whole (unit: its spread)."""
    if a.dtype.kind != "f" or b.dtype.kind != "f" or a.shape != b.shape:
        return None
    axis = copies_axis(b, batch)
    if axis is not None:
        a, b = np.moveaxis(a, axis, 0), np.moveaxis(b, axis, 0)
        return float(sample_shifts(a[row : row + 1], b[row : row + 1], output_scale(a))[0])
    rows = merged_rows(b, batch)
    if rows is not None:  # [batch * rows, ...]: the sample's block of rows
        a, b = a.reshape(batch, rows, *a.shape[1:]), b.reshape(batch, rows, *b.shape[1:])
        return float(sample_shifts(a[row : row + 1], b[row : row + 1], output_scale(a))[0])
    flat = np.asarray(a, np.float64).reshape(1, -1)
    other = np.asarray(b, np.float64).reshape(1, -1)
    finite = flat[np.isfinite(flat)]
    spread = float(np.std(finite)) if finite.size else 0.0
    rms = float(np.sqrt(np.mean(finite * finite))) if finite.size else 0.0
    return float(sample_shifts(flat, other, max(spread, SCALE_FLOOR * rms) + 1e-30)[0])


def relative_change(value: float, other: float) -> float:
    """How far ``other`` is from ``value``, as a fraction of ``value``'s magnitude (inf from an exact 0)."""
    if value == other:
        return 0.0
    return abs(other - value) / abs(value) if value != 0 and math.isfinite(value) else math.inf


def copies_axis(copies: np.ndarray, batch: int) -> int | None:
    """The axis of a tensor that holds the batch's samples, read off a run whose samples are all the same one
    (``copies``): an axis of the batch's size along which every slice is equal (to float32 rounding of
    kernels that treat rows apart). Axis 0 first; None when no axis is, or the batch has one sample.
    Slice by slice, in the tensor's own type: a whole-tensor float64 copy would double the bisection's peak."""
    if batch < 2:
        return None
    for axis in sorted((k for k, n in enumerate(copies.shape) if n == batch), key=lambda k: k != 0):
        if _alike(np.moveaxis(copies, axis, 0)):
            return axis
    return None


def _alike(slices: np.ndarray) -> bool:
    """Every slice along axis 0 equal to the first, to float32 rounding of kernels that treat rows apart."""
    first = slices[0]
    finite = first[np.isfinite(first)]
    tolerance = 1e-5 * float(np.max(np.abs(finite))) if finite.size else 0.0
    return all(np.allclose(slices[k], first, rtol=0.0, atol=tolerance, equal_nan=True) for k in range(1, len(slices)))


def merged_rows(copies: np.ndarray, batch: int) -> int | None:
    """How many rows of axis 0 each sample holds where the batch is merged into it sample by sample (multi-head
    attention's [batch * heads, T, D]), read off a run of copies of one sample as :func:`copies_axis` does;
    None when axis 0 is not such a merge. Compared whole, such a tensor counts the companions' own rows as the
    sample's movement (a dynamically quantized DeBERTa's dependence was placed at the Reshape that merges)."""
    if batch < 2 or copies.ndim < 1 or copies.shape[0] <= batch or copies.shape[0] % batch:
        return None
    rows = copies.shape[0] // batch
    return rows if _alike(copies.reshape(batch, rows, *copies.shape[1:])) else None


def _axes(node: Any, constants: dict[str, np.ndarray]) -> tuple[int, ...] | None:
    from onnx import helper

    for attr in node.attribute:
        if attr.name in ("axes", "axis"):
            value = helper.get_attribute_value(attr)
            return tuple(int(a) for a in (value if isinstance(value, (list, tuple)) else [value]))
    if len(node.input) > 1 and node.input[1] in constants and node.op_type.startswith("Reduce"):
        return tuple(int(a) for a in np.asarray(constants[node.input[1]]).ravel())
    return None


def _constants(graph: Any) -> dict[str, np.ndarray]:
    """Small integer initializers and Constant outputs (reduction axes given as inputs)."""
    from onnx import helper

    found: dict[str, np.ndarray] = {}
    with contextlib.suppress(ValueError):  # raw_data of the wrong length: onnxruntime reports that tensor
        for tensor in graph.initializer:
            if tensor.data_type in (6, 7, 9) and not tensor.external_data:  # INT32, INT64, BOOL
                found[tensor.name] = to_array(tensor)
        for node in graph.node:
            if node.op_type == "Constant" and node.output:
                for attr in node.attribute:
                    if attr.name == "value":
                        found[node.output[0]] = to_array(helper.get_attribute_value(attr))
    return found


def prefix(model: onnx.ModelProto, outputs: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose outputs are ``outputs`` and whose nodes are only those they need: onnxruntime
    builds and runs every node of a graph whatever a run fetches, and a cut near the start needs few."""
    from onnx import helper

    step = type(model)()
    step.CopyFrom(model)
    del step.graph.output[:]
    step.graph.output.extend(helper.make_empty_tensor_value_info(t) for t in outputs)
    keep_only(step.graph, outputs)
    return step


def locate_dependence(
    handle: OnnxHandle,
    tmp: Scratch,
    batch: dict[str, np.ndarray],
    copies: dict[str, np.ndarray],
    row: int,
    size: int,
    base: ProbeCopy | None = None,
    suspects: Iterable[str] = (),
) -> LocatedDependence | None:
    """The first node whose output depends on the batch (see the module docstring), or None. ``batch`` holds
    ``size`` samples (along each input's own batch axis), ``copies`` the sample at ``row`` in every row; the
    caller found the model's outputs at ``row`` different between the two. ``base``: the probe's runnable
    copy (relaxed batch, upgraded opset, fixed parameter feeds) to bisect instead. ``suspects``: tensors
    written by ops known to mix the samples (the walk's reductions over the batch axis), tested first."""
    import onnxruntime as ort

    from bncheck.backends.onnx.run import new_session, prepacks, session_options
    from bncheck.verdicts import COMPANION_TOLERANCE

    shapes = handle.value_shapes if base is None else base.graph_shapes()
    if base is None:
        model, folder = stub(handle, tmp)
    else:
        model, folder = base.model, base.folder  # read only: each step's session is built on a copy
        batch, copies = {**batch, **base.fixed_feeds}, {**copies, **base.fixed_feeds}
    graph = model.graph
    nodes = list(graph.node)
    if not nodes:
        return None
    last_read: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for name in node_reads(node):  # an If/Loop body reads outer tensors by name
            last_read[name] = i
    graph_outputs = {o.name for o in graph.output}
    produced_at = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    runs = 0
    changes: dict[str, float] = {}
    relative: dict[str, float] = {}  # single-value tensors: their change as a fraction of their value
    integers: dict[str, bool] = {}  # integer tensors: whether the sample's values moved (not bisected: below)

    def live(cut: int) -> list[str]:
        return [t for t, i in produced_at.items() if i <= cut and (last_read.get(t, -1) > cut or t in graph_outputs)]

    def compare(names: list[str]) -> list[tuple[str, np.ndarray, np.ndarray]]:
        nonlocal runs
        step = prefix(model, names)
        so = session_options(ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, folder, prepacks(step.graph, shapes))
        try:
            session = new_session(step, so)
            del step
            first = session.run(names, batch, run_options())
            second = session.run(names, copies, run_options())
        except Exception as exc:  # a cut the runtime rejects (a node only the probe's rewrite made runnable)
            raise _Unlocatable from exc
        del session  # before the next step builds its own
        runs += 2
        return [(name, np.asarray(a), np.asarray(b)) for name, a, b in zip(names, first, second)]

    def dependent(cut: int) -> bool:
        names = [t for t in live(cut) if t not in changes]
        if names:
            for name, a, b in compare(names):
                if a.dtype.kind in "iu" and a.shape == b.shape:
                    integers[name] = bool(integer_moved(a, b, row, size))
                change = tensor_change(a, b, row, size)
                changes[name] = -1.0 if change is None else change
                if change is not None and np.size(a) == 1:
                    fraction = relative_change(float(np.ravel(b)[0]), float(np.ravel(a)[0]))
                    if math.isfinite(fraction):  # of a value that was 0 there is none: standard deviations stay
                        relative[name] = fraction
        return any(changes[t] > COMPANION_TOLERANCE for t in live(cut))

    # No step for the cut after the last node, whose live tensors are the model's outputs: the caller found
    # them moving between this very pair of batches (its companion run), with the same comparison.
    lo, hi = 0, len(nodes) - 1
    # The first op known to mix the samples is tested before any bisection: the cuts after it and before it
    # settle whether the dependence starts there in two steps instead of about log2(nodes).
    known = [produced_at[t] for t in suspects if t in produced_at]
    known += [i for i, node in enumerate(nodes) if node.op_type in DYNAMIC_QUANT_OPS and node.domain in _QUANT_DOMAINS]
    try:
        if known:
            first = min(known)
            if not dependent(first):
                lo = first + 1
            elif first == 0 or not dependent(first - 1):
                lo = hi = first
            else:
                hi = first - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if dependent(mid):
                hi = mid
            else:
                lo = mid + 1
        if any(t not in changes for t in nodes[lo].output if t):  # the last node: its outputs not yet compared
            dependent(lo)
        # Integer tensors are not bisected: one can move with no effect (the batch's longest sentence, padding
        # a model ignores). An integer input of the located node that moved (an LSTM's sequence_lens, sorted
        # across the batch) says where the dependence came from instead.
        node = nodes[lo]
        unseen = [t for t in dict.fromkeys(node.input) if t and t not in changes and t in produced_at]
        if unseen:
            for name, a, b in compare(unseen):
                changes[name] = -1.0
                if a.dtype.kind in "iu" and a.shape == b.shape:
                    integers[name] = bool(integer_moved(a, b, row, size))
        origin = None
        moved_inputs = [t for t in dict.fromkeys(node.input) if integers.get(t)]
        if moved_inputs:
            origin = _integer_origin(moved_inputs[0], nodes, produced_at)
    except _Unlocatable:
        return None
    moved = [(changes.get(t, -1.0), t) for t in node.output if t]
    change, tensor = max(moved)
    if not change > COMPANION_TOLERANCE:
        return None
    constants = _constants(graph)
    return LocatedDependence(
        node=node.name or node.output[0],
        op_type=node.op_type,
        tensor=tensor,
        axes=_axes(node, constants),
        change=change if math.isfinite(change) else math.inf,
        runs=runs,
        batch_size=size,
        relative_change=relative.get(tensor),
        upstream_quantizers=_upstream_quantizers(nodes, lo),
        random_sources=_random_sources(nodes, lo, constants),
        moved_integer_inputs=tuple(moved_inputs),
        integer_origin=origin,
    )


def _integer_origin(tensor: str, nodes: list[Any], produced_at: dict[str, int]) -> str | None:
    """The op that computed a moved integer tensor's values, up its chain of ops that only keep or cut them
    (Cast, Slice, Reshape, ...): "TopK 'TopK_16'" for an LSTM's sequence_lens sorted across the batch. Read
    off the graph, not compared: a sorted tensor has no row that is the sample's."""
    name = tensor
    for _ in range(32):
        node = nodes[produced_at[name]]
        if node.op_type not in _KEEPS_VALUES or not node.input or node.input[0] not in produced_at:
            return f"{node.op_type} {(node.name or node.output[0])!r}"
        name = node.input[0]
    return None


def integer_moved(a: np.ndarray, b: np.ndarray, row: int, batch: int) -> bool:
    """Whether an integer tensor's values for the sample at ``row`` differ between the two runs (exactly: no
    rounding), on its slice where it has one per sample, else anywhere."""
    axis = copies_axis(b, batch)
    if axis is not None:
        return not np.array_equal(np.take(a, [row], axis=axis), np.take(b, [row], axis=axis))
    return not np.array_equal(a, b)


#: ONNX ops that draw random numbers at every run
RANDOM_OPS = frozenset(
    {"RandomUniform", "RandomUniformLike", "RandomNormal", "RandomNormalLike", "Bernoulli", "Multinomial"}
)


def _random_sources(nodes: list[Any], index: int, constants: dict[str, np.ndarray]) -> tuple[str, ...]:
    """The ops drawing random numbers at node ``index`` or upstream of it, "RandomUniformLike 'n1'", in graph
    order; a Dropout whose training_mode is true among them (exported from a model in training mode)."""
    reached = upstream_nodes(nodes, nodes[index].input) | {index}
    return tuple(
        f"{nodes[i].op_type} {(nodes[i].name or nodes[i].output[0])!r}"
        for i in sorted(reached)
        if (nodes[i].op_type in RANDOM_OPS or _dropout_training(nodes[i], constants))
        and nodes[i].domain in ONNX_DOMAINS
    )


def _dropout_training(node: Any, constants: dict[str, np.ndarray]) -> bool:
    """A Dropout (opset 12+) whose training_mode input is a constant true: it drops units at every run."""
    if node.op_type != "Dropout" or len(node.input) < 3 or node.input[2] not in constants:
        return False
    return bool(np.asarray(constants[node.input[2]]).any())


def _upstream_quantizers(nodes: list[Any], index: int) -> tuple[str, ...]:
    """The dynamic quantizers whose outputs reach node ``index``, in graph order: whether one moves a sample
    depends on its companions (whether they change the batch's largest value), so one that the located pair
    of batches left unchanged still mixes the samples of other batches."""
    reached = upstream_nodes(nodes, nodes[index].input)
    return tuple(
        nodes[i].name or nodes[i].output[0]
        for i in sorted(reached)
        if nodes[i].op_type in DYNAMIC_QUANT_OPS and nodes[i].domain in _QUANT_DOMAINS
    )
