"""The in-memory copy of a model that the probe instruments, made runnable as exporters write files.

The walk and the static checks read the original; only this copy is changed, and only where a run proves the
change harmless:

- dims written as -1 or 0 become symbolic (onnxruntime takes 0 literally);
- an opset below 7 (onnxruntime has no kernel for BatchNormalization-6) is upgraded with
  ``onnx.version_converter``;
- IR < 4 lists every initializer among the graph inputs: those are weights, dropped from the copy's inputs;
- an IR version newer than the installed onnxruntime reads gets a note: ``run.new_session`` gives every
  session's bytes the newest it reads (``runtime_ir``);
- graph inputs that only feed a norm's parameters get fixed tensors (:func:`parameter_inputs`);
- a fixed batch dim (``torch.onnx.export`` without dynamic axes) is relaxed to symbolic, stale intermediate shapes
  are cleared and re-inferred, and Reshape/Expand/Resize/ConstantOfShape shape constants that bake the batch in (and
  an RNN's zero initial state folded at it) are computed from the fed batch instead. At the file's size the copy is
  the file's graph (declared shapes aside, a rewritten constant computes the file's value there), so no run of the
  original is needed; the relaxation is kept only when runs of the copy prove it: it runs at the file's size, and at
  another size every output dim that held the batch follows the fed batch and no other changes. Otherwise the probe
  runs at the fixed size. The proof's session and runs are kept for the probe (:class:`Proof`), which takes them over
  when it adds nothing to this graph; so are the session and its run at the file's size where the outputs refuse the
  relaxation, since the copy computes the file's graph there. A probe that adds to the graph (a measured layer, a
  train-mode BN replaced) proves the relaxation on its own graph instead (:attr:`ProbeCopy.pending`): its first runs
  are the proof's, and a session of the copy alone would be built and run only to be dropped. Where those runs'
  outputs refuse the relaxation and nothing was rewritten, the probe's graph keeps running at the file's size
  (:func:`keep_fixed_batch`). Where the relaxed copy's inferred shapes give an If node one condition per sample
  (:func:`branch_per_sample`), no run could prove it: it is refused before any session.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from bncheck.backends.base import BackendError
from bncheck.backends.onnx import memory
from bncheck.backends.onnx.cancel import run_options
from bncheck.backends.onnx.functions import undefined_function_op
from bncheck.backends.onnx.graph import copied, copy_messages, has_subgraphs, topological_order
from bncheck.backends.onnx.instrument import _opset, stub
from bncheck.backends.onnx.load import free_unset_dims, inferred_shapes, own_skeleton
from bncheck.backends.onnx.runtime_errors import runtime_message
from bncheck.backends.onnx.runtime_ir import runnable_ir_version
from bncheck.backends.onnx.tensors import from_array, np_dtype, to_array
from bncheck.errors import one_line
from bncheck.model import Dim, InputSpec, ModelView, ProbeSettings, fixed_batch
from bncheck.probe_data import ProbeDataError, synthetic_inputs
from bncheck.probe_plan import in_background

if TYPE_CHECKING:
    import onnx

    from bncheck.backends.onnx.load import OnnxHandle
    from bncheck.backends.onnx.scratch import Scratch

#: name of the relaxed batch dim in the copy.
BATCH = "batch"
#: onnxruntime's oldest default-domain opset; BatchNormalization-6 and older have no kernel.
MIN_RUNNABLE_OPSET = 7
#: the measuring nodes' opset (IsNaN 9, IsInf 10, Equal on floats 11): an older file is upgraded for the
#: probe, and where the converter fails from a runnable opset, run as written
MEASURING_OPSET = 11
#: targets tried in turn by the version converter (newest first: the instrumentation uses opset-11 ops).
UPGRADE_TARGETS = (13, 11, 9, 7)
#: norm ops and the input positions that hold parameters (scale, bias, running mean, running var).
_PARAMETER_SLOTS: dict[str, dict[int, float]] = {
    "BatchNormalization": {1: 1.0, 2: 0.0, 3: 0.0, 4: 1.0},
    "InstanceNormalization": {1: 1.0, 2: 0.0},
    "LayerNormalization": {1: 1.0, 2: 0.0},
    "GroupNormalization": {1: 1.0, 2: 0.0},
    "RMSNormalization": {1: 1.0},
}


#: one run of a proof: (feeds, outputs by name)
Run = tuple[dict[str, np.ndarray], dict[str, np.ndarray]]
#: runs feeds through a session, returning at least the model's outputs by name; raises when it cannot
Runs = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
#: a relaxation left to be proven by the runs of the probe's own session: its runs and drawn inputs, or why not
Pending = Callable[[Runs], "tuple[list[Run], dict[str, np.ndarray] | None] | str"]


@dataclass
class Proof:
    """The relaxed copy's session and the runs that proved it, kept for the probe: when it measures nothing
    (every layer an inference-mode BN left unmeasured) its graph is this one, and a run it repeats is not
    made twice."""

    session: Any
    runs: list[Run]
    drawn: dict[str, np.ndarray] | None = None  # its synthetic inputs (None with --data)


@dataclass
class ProbeCopy:
    """The prepared, weight-less copy: what :class:`~bncheck.backends.onnx.instrument.Augmenter` instruments."""

    model: onnx.ModelProto
    folder: str
    shapes: dict[str, tuple[Dim, ...]]
    types: dict[str, int]
    initializer_stubs: list[Any] | None
    inputs: list[InputSpec]  # the batched inputs as the plan sees them (a relaxed batch dim is symbolic)
    fixed_feeds: dict[str, np.ndarray] = field(default_factory=dict)
    batch: str | None = None  # how the batch dim was handled, for the report (None: free in the file)
    unconverted: bool = False  # an opset onnxruntime cannot run, and the converter failed
    notes: list[str] = field(default_factory=list)
    proof: Proof | None = None  # a relaxed batch's proof (_validate), for the probe engine to take over
    # a relaxed batch whose proof is left to the probe's own session (prepare's proof_by_probe); the copy is
    # relaxed only if it passes, else the probe prepares again with proof_by_probe off
    pending: Pending | None = None
    # why the probe's own runs failed that proof, when the outputs say so (see OutputsRefuse)
    refused: OutputsRefuse | None = None
    # shape constants of the relaxed copy (Reshape/Expand/Resize/ConstantOfShape) rewritten to follow the fed
    # batch (0: none, or not relaxed)
    batch_constants: int = 0
    # the synthetic inputs that proof drew (run_plan's ``drawn``; None with --data or without a proof)
    drawn: dict[str, np.ndarray] | None = None
    # the relaxed copy's shapes and types, inferred before its proof (None when the batch was not relaxed)
    relaxed_shapes: tuple[dict[str, tuple[Dim, ...]], dict[str, int]] | None = None
    # the memory check of the copy that runs at the largest batch size (its busiest node's bytes, and the
    # shapes inferred at the probe's input sizes): the relaxed copy's, before its proof, or set by the probe
    estimate: memory.Estimate | None = None

    def graph_shapes(self) -> dict[str, tuple[Dim, ...]]:
        """The shapes of this copy's graph: the relaxed copy's where its batch was relaxed, else the file's."""
        return self.relaxed_shapes[0] if self.relaxed_shapes is not None else self.shapes


def parameter_inputs(graph: Any) -> dict[str, float]:
    """Graph inputs (not initializers) read only as a norm's parameters, with the neutral value each gets
    (scale 1, bias 0, mean 0, variance 1). Such inputs (onnx's backend test models declare scale, bias,
    mean and variance so) carry no batch axis and are not samples."""
    stored = {t.name for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    candidates = {v.name for v in graph.input if v.name not in stored and v.name not in outputs}
    value: dict[str, float] = {}
    other: set[str] = set()
    for node in graph.node:
        slots = _PARAMETER_SLOTS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        for pos, name in enumerate(node.input):
            if name not in candidates:
                continue
            if slots is not None and pos in slots and value.get(name, slots[pos]) == slots[pos]:
                value[name] = slots[pos]
            else:
                other.add(name)
        if has_subgraphs(node):  # read inside a subgraph: not only a parameter
            other |= candidates
        if len(other) == len(candidates):  # every input is read as data (the usual case, at its first reader)
            return {}
    return {name: v for name, v in value.items() if name not in other}


def _fixed_feeds(graph: Any, names: dict[str, float]) -> dict[str, np.ndarray]:
    feeds: dict[str, np.ndarray] = {}
    for info in graph.input:
        if info.name not in names:
            continue
        tt = info.type.tensor_type
        dims = [int(d.dim_value) for d in tt.shape.dim if d.HasField("dim_value") and d.dim_value > 0]
        if len(dims) != len(tt.shape.dim):
            continue  # unknown size: left unfed, onnxruntime names it
        dtype = np_dtype(tt.elem_type) if tt.elem_type else np.dtype(np.float32)
        feeds[info.name] = np.full(dims, names[info.name], dtype=dtype)
    return feeds


def _upgrade(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    """The copy at a runnable opset (``onnx.version_converter``), or unchanged with the reason it failed."""
    from onnx import version_converter

    source = _opset(model)
    reason = ""
    for target in UPGRADE_TARGETS:
        if target <= source:
            break
        try:
            return version_converter.convert_version(model, target), None
        except Exception as exc:  # the converter raises plain RuntimeErrors from C++ assertions
            reason = reason or one_line(RuntimeError(str(exc).split(" failed: ", 1)[-1]), 160)
    return model, reason or "no conversion target"


def _drop_initializer_inputs(model: onnx.ModelProto) -> None:
    """IR < 4 lists every initializer among the inputs; they are weights (constants), not inputs."""
    from onnx import helper

    stored = {t.name for t in model.graph.initializer}
    kept = [v for v in model.graph.input if v.name not in stored]
    if len(kept) != len(model.graph.input):
        del model.graph.input[:]
        model.graph.input.extend(kept)
    try:
        needed = int(helper.find_min_ir_version_for(list(model.opset_import)))
    except ValueError:  # an opset onnx has no IR version for (a local function domain, a future version)
        needed = 4
    model.ir_version = max(int(model.ir_version), needed, 4)


# --------------------------------------------------------------------------- batch relaxation


def _relaxed(model: onnx.ModelProto, batched: dict[str, int], fixed: int) -> onnx.ModelProto:
    """A copy whose batched inputs (name -> batch axis; and outputs whose first dim is ``fixed``) have a
    symbolic batch dim, with every intermediate shape cleared (stale: they were inferred for the fixed
    batch)."""
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    for info in graph.input:
        if info.name in batched:
            dim = info.type.tensor_type.shape.dim[batched[info.name]]
            dim.Clear()
            dim.dim_param = BATCH
    for info in graph.output:
        dims = info.type.tensor_type.shape.dim
        if len(dims) and dims[0].HasField("dim_value") and dims[0].dim_value == fixed:
            dims[0].Clear()
            dims[0].dim_param = BATCH
    del graph.value_info[:]
    return copy


def _constant_values(graph: Any) -> dict[str, tuple[np.ndarray, Any]]:
    """Integer constants (initializers and Constant nodes) by name, with the proto holding them."""

    def values(tensor: Any) -> np.ndarray | None:
        try:
            return to_array(tensor)
        except ValueError:  # raw_data of the wrong length: no shape to rewrite (onnxruntime reports the tensor)
            return None

    found: dict[str, tuple[np.ndarray, Any]] = {}
    for tensor in graph.initializer:
        if tensor.data_type == 7 and len(tensor.dims) == 1:  # INT64, 1-D: a shape
            array = values(tensor)
            if array is not None:
                found[tensor.name] = (array, tensor)
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type == 7 and len(attr.t.dims) == 1:
                    array = values(attr.t)
                    if array is not None:
                        found[node.output[0]] = (array, node)
                elif attr.name == "value_ints":  # the torch exporter's form
                    found[node.output[0]] = (np.asarray(attr.ints, np.int64), node)
        elif node.op_type == "Concat" and node.input and all(i in found for i in node.input):
            # the torch exporter writes view(8, -1)'s target as Concat(Constant [8], Constant [-1])
            found[node.output[0]] = (np.concatenate([found[i][0] for i in node.input]), node)
    return found


def _batch_fed(graph: Any, batched: dict[str, int]) -> set[str]:
    """Tensors computed from a batched input (a Reshape of a parameter bakes no batch)."""
    reached = set(batched)
    for node in graph.node:  # graphs are topologically sorted (the loader warns when not)
        if any(name in reached for name in node.input):
            reached.update(o for o in node.output if o)
    return reached


def _rewrite_batch_constants(
    model: onnx.ModelProto,
    batched: dict[str, int],
    fixed: int,
    shapes: dict[str, tuple[Dim, ...]],
    rows: frozenset[str] = frozenset(),
) -> int:
    """Reshape/Expand targets and Resize sizes whose element at the batch's axis (the first batched input's: 0,
    or 1 for a sequence an RNN reads) is the fixed batch, on a batch-fed tensor whose dim there (in the file's
    ``shapes``; any dim, where the axis is 1) is that batch or unknown, and the shapes of ConstantOfShape
    whose output meets a batch-fed tensor in a node (tf2onnx pads channels by a Concat with zeros shaped
    [1, C, H, W]), become ``Concat(Shape(input)[axis:axis+1], rest)``: the fed batch instead of the baked
    one. ``rows`` are a norm's input and output whose axis 0 is a fixed 1 and no batch (the batch is folded into
    their rows, as in tf's fused LayerNormalization): a Reshape making one to ``[1, M, ...]`` becomes ``[1, -1,
    ...]`` instead, and a Reshape of one back to the fixed batch holds the batch. An RNN's zero initial state
    that holds the fixed batch follows the fed one (:func:`_uniform_states`, :func:`_uniform_initial_states`).
    Returns how many."""
    from onnx import helper

    graph = model.graph
    constants = _constant_values(graph)
    fed = _batch_fed(graph, batched)

    # where the inputs hold the batch: 0 if one does, else 1 for a sequence [seq, batch, ...] that an RNN reads,
    # whose tensors keep that layout up to the RNN's outputs (torch's Reshape of them to [seq, batch, hidden])
    source, axis = _batch_source(batched)

    def may_hold_batch(name: str) -> bool:
        # a quantized model's bias [24], reshaped to [1, -1, 1, 1], is computed from the batch (its scale is
        # dynamic) but holds none: rewriting it fails the proof and costs a session (ddddocr_old_quant)
        shape = shapes.get(name) or (None,)
        if axis:
            return fixed in shape or not all(isinstance(d, int) for d in shape)
        return not isinstance(shape[0], int) or shape[0] == fixed or name in rows

    # the input holding the output's shape: Resize's sizes (its fourth input, from opset 11) as Reshape's target
    where = {"Reshape": 1, "Expand": 1, "Resize": 3}
    sites = [
        (i, node, where[node.op_type])
        for i, node in enumerate(graph.node)
        if node.op_type in where
        and node.domain in ("", "ai.onnx")
        and len(node.input) > where[node.op_type]
        and node.input[0] in fed
        and _rows_target(node, constants, fed, rows) is None
        and node.input[where[node.op_type]] in constants
        and constants[node.input[where[node.op_type]]][0].size > axis
        and int(constants[node.input[where[node.op_type]]][0][axis]) == fixed
        and may_hold_batch(node.input[0])
    ]
    meets = {name for node in graph.node if any(i in fed for i in node.input) for name in node.input}
    sites += [
        (i, node, 0)
        for i, node in enumerate(graph.node)
        if node.op_type == "ConstantOfShape"
        and node.domain in ("", "ai.onnx")
        and node.input
        and node.output[0] in meets
        and node.input[0] in constants
        and constants[node.input[0]][0].size >= max(2, axis + 1)  # a rank-1 fill is a vector, not a batch
        and int(constants[node.input[0]][0][axis]) == fixed
    ]
    sites.sort(key=lambda site: site[0])  # the Concats are inserted before their nodes in this order
    count = _uniform_states(graph, fed, fixed)
    states = _uniform_initial_states(graph, fixed)
    if not sites and not states:
        return count + _fold_batch_into_rows(graph, constants, fed, rows)
    prefix = "__bncheck_batch"
    zero = from_array(np.array([axis], np.int64), f"{prefix}_index")
    graph.initializer.append(zero)
    source_shape = helper.make_node("Shape", [source], [f"{prefix}_shape"], name=f"{prefix}_shape")
    batch = helper.make_node(
        "Gather", [f"{prefix}_shape", zero.name], [f"{prefix}_size"], name=f"{prefix}_size", axis=0
    )

    def following(value: np.ndarray, position: int, name: str) -> Any:
        """A Concat of ``value`` (a shape) with the fed batch in place of its element at ``position``."""

        def constant(piece: np.ndarray, end: str) -> list[str]:
            if not piece.size:
                return []
            graph.initializer.append(from_array(piece.astype(np.int64), f"{name}_{end}"))
            return [f"{name}_{end}"]

        parts = [*constant(value[:position], "head"), batch.output[0], *constant(value[position + 1 :], "rest")]
        return helper.make_node("Concat", parts, [name], name=name, axis=0)

    before: dict[int, list[Any]] = {}  # the nodes added before the node at each index, in order
    for n, (i, node, k) in enumerate(sites):
        before.setdefault(i, []).append(following(constants[node.input[k]][0], axis, f"{prefix}_target_{n}"))
        node.input[k] = before[i][-1].output[0]
    for n, (i, readers, dims, value, position) in enumerate(states):
        name = f"__bncheck_initial_{n}"
        graph.initializer.append(from_array(value, f"{name}_value"))
        before.setdefault(i, []).extend(
            [
                following(np.array(dims, np.int64), position, f"{name}_shape"),
                helper.make_node("Expand", [f"{name}_value", f"{name}_shape"], [name], name=name),
            ]
        )
        for node, k in readers:
            node.input[k] = name
    nodes = [new for i, node in enumerate(graph.node) for new in (*before.get(i, ()), node)]
    del graph.node[:]
    copy_messages(graph.node, [source_shape, batch, *nodes])
    return len(sites) + count + len(states) + _fold_batch_into_rows(graph, constants, fed, rows)


def _batch_source(batched: dict[str, int]) -> tuple[str, int]:
    """The input whose Shape gives the fed batch, and its batch axis: one batched on axis 0 where there is one
    (a recurrent state's axis 1 beside it says nothing of the graph's other tensors)."""
    return min(batched.items(), key=lambda item: item[1])


def _uniform_initial_states(
    graph: Any, fixed: int
) -> list[tuple[int, list[tuple[Any, int]], tuple[int, ...], np.ndarray, int]]:
    """The RNN/GRU/LSTM initial_h and initial_c that are a constant of one value holding the fixed batch where
    the layout puts it (torch's dynamo exporter folds the zero state to [layers, batch, hidden]), each once: the
    index of its first reader, its readers (node, input position), its dims, its value (:func:`_one_value`)
    and the batch's position."""
    initializers = {t.name: t for t in graph.initializer if not t.data_location}
    found: dict[str, tuple[int, list[tuple[Any, int]], tuple[int, ...], np.ndarray, int]] = {}
    for i, node in enumerate(graph.node):
        if node.op_type not in ("RNN", "GRU", "LSTM") or node.domain not in ("", "ai.onnx"):
            continue
        where = 0 if next((a.i for a in node.attribute if a.name == "layout"), 0) == 1 else 1
        for k in (5, 6):
            name = node.input[k] if len(node.input) > k else ""
            if name in found:
                found[name][1].append((node, k))
                continue
            tensor = initializers.get(name)
            if tensor is None or len(tensor.dims) != 3 or tensor.dims[where] != fixed:
                continue
            one = _one_value(tensor)
            if one is not None:
                found[name] = (i, [(node, k)], tuple(tensor.dims), one, where)
    return list(found.values())


def _one_value(tensor: Any) -> np.ndarray | None:
    """A constant whose elements all hold one value, as that one element at the constant's rank (an Expand
    broadcasts it back); None where they differ or the tensor cannot be read (left for onnxruntime to report)."""
    try:
        array = to_array(tensor)
    except ValueError:  # raw_data of the wrong length
        return None
    if not array.size or not (array == array.flat[0]).all():
        return None
    return array.reshape(-1)[:1].reshape((1,) * array.ndim)


def _uniform_states(graph: Any, fed: set[str], fixed: int) -> int:
    """Expands of a constant of one value whose dims hold the fixed batch, to a target that follows the fed
    batch: torch's zero initial state of an RNN, [layers, batch, hidden], folded at the file's batch, which an
    Expand to [layers, Shape(x)[1], hidden] keeps at that batch whatever is fed. The constant becomes a single
    element of the same rank, which the Expand broadcasts to the target. Returns how many."""
    if fixed < 2:
        return 0  # an Expand broadcasts a dim of 1 to the fed batch already
    initializers = {t.name: t for t in graph.initializer if not t.data_location}  # in-file: a stub holds no values
    values: dict[str, Any] = {}
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            values.update((node.output[0], a.t) for a in node.attribute if a.name == "value")
    count = 0
    for node in graph.node:
        if node.op_type != "Expand" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        tensor = values.get(node.input[0], initializers.get(node.input[0]))
        if tensor is None or node.input[1] not in fed or fixed not in tensor.dims:
            continue
        one = _one_value(tensor)
        if one is None:  # one element already broadcasts: fixed >= 2 is among its dims, so it has more
            continue
        name = f"__bncheck_state_{count}"
        graph.initializer.append(from_array(one, name))
        node.input[0] = name
        count += 1
    return count


def _rows_target(
    node: Any, constants: dict[str, tuple[np.ndarray, Any]], fed: set[str], rows: frozenset[str]
) -> np.ndarray | None:
    """The constant target ``[1, M, ...]`` (no -1) of a batch-fed Reshape making one of ``rows``, else None."""
    if node.op_type != "Reshape" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
        return None
    target = constants.get(node.input[1], (None,))[0]
    if (
        node.output[0] in rows
        and node.input[0] in fed
        and target is not None
        and target.ndim == 1
        and target.size >= 2
        and int(target[0]) == 1
        and not (target == -1).any()
    ):
        return target
    return None


def _fold_batch_into_rows(
    graph: Any, constants: dict[str, tuple[np.ndarray, Any]], fed: set[str], rows: frozenset[str]
) -> int:
    """Each Reshape :func:`_rows_target` finds gets the target ``[1, -1, ...]``, which computes M at the file's
    size and folds a fed batch into it; a BatchNormalization of its rows whose parameters are constants of one
    value over the M rows (tf2onnx folds the fused LayerNormalization's ones and zeros at a fixed batch) gets
    them expanded to the rows' count. Returns how many Reshapes."""
    from onnx import helper

    nodes: list[Any] = []
    folded: set[str] = set()
    weights: dict[str, Any] | None = None  # the initializers by name, read where such a norm is found
    for node in graph.node:  # sorted: a Reshape comes before the BatchNormalization of its rows
        target = _rows_target(node, constants, fed, rows)
        if target is not None:
            name = f"__bncheck_rows_target_{len(folded)}"
            graph.initializer.append(from_array(np.array([1, -1, *target[2:]], np.int64), name))
            node.input[1] = name
            folded.add(node.output[0])
        elif node.op_type == "BatchNormalization" and node.input and node.input[0] in folded:
            # (in-file ones: a large weight's stub holds no values)
            weights = weights if weights is not None else {t.name: t for t in graph.initializer if not t.data_location}
            for k in range(1, min(len(node.input), 5)):
                value = to_array(weights[node.input[k]]) if node.input[k] in weights else None
                if value is None or value.ndim != 1 or value.size < 2 or not (value == value[0]).all():
                    continue
                prefix = f"__bncheck_rows_{len(nodes)}_{k}"
                one = from_array(value[:1].copy(), f"{prefix}_value")
                axis = from_array(np.array([1], np.int64), f"{prefix}_axis")
                graph.initializer.extend([one, axis])
                nodes += [
                    helper.make_node("Shape", [node.input[0]], [f"{prefix}_shape"], name=f"{prefix}_shape"),
                    helper.make_node("Gather", [f"{prefix}_shape", axis.name], [f"{prefix}_m"], name=f"{prefix}_m"),
                    helper.make_node("Expand", [one.name, f"{prefix}_m"], [prefix], name=prefix),
                ]
                node.input[k] = prefix
        nodes.append(node)
    if len(nodes) > len(graph.node):
        nodes = [copied(n) for n in nodes]
        del graph.node[:]
        copy_messages(graph.node, nodes)
    return len(folded)


def _session(model: onnx.ModelProto, folder: str, shapes: Mapping[str, tuple[Dim, ...]], arena: bool = True):
    import onnxruntime as ort

    # the probe engine's own options (its log level 4 too: a failing validation run is expected, its reason
    # is returned), so that the engine can take this session over (Proof)
    from bncheck.backends.onnx.run import new_session, prepacks, session_options

    so = session_options(ort.GraphOptimizationLevel.ORT_ENABLE_ALL, folder, prepacks(model.graph, shapes))
    so.enable_cpu_mem_arena = arena
    return new_session(model, so)


def _quiet():
    options = run_options()
    options.log_severity_level = 4
    return options


def _session_runs(session: Any, names: list[str]) -> Runs:
    """:data:`Runs` of ``session`` fetching ``names``; ``session`` may be the exception its build raised."""

    def run(fed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if isinstance(session, Exception):
            raise session
        return dict(zip(names, session.run(names, fed, _quiet())))

    return run


def _validate(
    names: list[str],
    run: Runs,
    inputs: list[InputSpec],
    fixed: int,
    others: list[int],
    settings: ProbeSettings,
    fixed_feeds: dict[str, np.ndarray],
    draw: Callable[[], dict[str, np.ndarray]] | None,
) -> tuple[list[Run], dict[str, np.ndarray] | None] | str:
    """The runs that prove the relaxed copy (see the module docstring) on the model's outputs ``names`` and
    the synthetic inputs drawn for them (None with --data), or why it fails (one line). ``run`` runs the
    copy, or the probe's graph built on it; ``draw`` gives the synthetic inputs (None with --data)."""
    from bncheck.probe_plan import _take

    inputs = [s.with_batch_dim(None) for s in inputs]
    axes = {s.name: s.batch_axis if s.batched else None for s in inputs}
    drawn: dict[str, np.ndarray] = {}

    def feeds(n: int) -> dict[str, np.ndarray]:
        if draw is None:  # --data also supplies dims the model leaves symbolic
            pool = dict(settings.data or {})
            size = next((len(v) for k, v in pool.items() if axes.get(k, 0) is not None), 1)
            return {**_take(pool, tuple(i % size for i in range(n)), axes), **fixed_feeds}
        if not drawn:
            drawn.update(draw())
        return {**_take(drawn, tuple(range(n)), axes), **fixed_feeds}

    try:
        feeds(1)
    except ProbeDataError as exc:
        return f"no inputs to prove it with: {exc}"
    runs: list[Run] = []
    try:
        fed = feeds(fixed)
        at_fixed = run(fed)
        runs.append((fed, at_fixed))
    except Exception as exc:
        return f"the relaxed copy does not run at batch size {fixed}: {runtime_message(exc, 160)}"
    pool = drawn if draw is not None else None
    if not any(fixed in np.shape(at_fixed[n]) for n in names):
        return OutputsRefuse(f"no output has a dim of the batch size {fixed}", runs[0], pool)
    for size in others:
        try:
            fed = feeds(size)
            values = run(fed)
            runs.append((fed, values))
        except Exception as exc:
            return f"the relaxed copy fails at batch size {size}: {runtime_message(exc, 160)}"
        followed = False
        for name in names:
            # only dims that were the batch may change, and only to the fed batch (CTC heads put it on axis 1)
            was, now = np.shape(at_fixed[name]), np.shape(values[name])
            changed = [axis for axis, (a, b) in enumerate(zip(was, now)) if a != b]
            if len(was) != len(now) or any(was[a] != fixed or now[a] != size for a in changed):
                why = f"output {name!r} has shape {now} at batch size {size} (at {fixed}: {was})"
                return OutputsRefuse(why, runs[0], pool)
            followed = followed or bool(changed)
        if not followed:
            return OutputsRefuse(f"no output follows the fed batch (batch size {size})", runs[0], pool)
    return runs, pool


class OutputsRefuse(str):
    """Why a proof failed, read off the model's outputs at sizes that ran (not a run's error): a copy of the
    same graph without the probe's additions, whose outputs are the same, fails it again. ``at_fixed``: the
    proof's run at the file's own size, where the copy computes the file's graph; ``drawn``: its synthetic
    inputs (None with --data); ``session``: the session of the copy alone that made them (None where the
    probe's own graph did)."""

    at_fixed: Run | None
    drawn: dict[str, np.ndarray] | None
    session: Any = None

    def __new__(
        cls, why: str, at_fixed: Run | None = None, drawn: dict[str, np.ndarray] | None = None
    ) -> OutputsRefuse:
        refusal = super().__new__(cls, why)
        refusal.at_fixed, refusal.drawn = at_fixed, drawn
        return refusal


def keep_fixed_batch(copy: ProbeCopy, inputs: list[InputSpec], why: str) -> None:
    """The batch stays as the file fixes it in ``inputs`` (the file's own), because ``why``: the report's batch
    handling, and for a batch of 1 how to re-export."""
    fixed = fixed_batch(inputs)
    copy.inputs = list(inputs)
    copy.batch_constants = 0
    copy.batch = f"fixed to {fixed} in the file; cannot be relaxed ({why})"
    if fixed != 1:
        return
    branch = branch_on_inputs(copy.model.graph)
    if branch is not None:  # re-exporting would not help: the graph itself takes one sample per run
        # the reason is in the batch handling (copy.batch): the notes do not repeat it
        copy.notes.append(
            "relaxing the fixed batch dimension of 1 failed; the graph branches on a value computed from "
            f"its inputs (If node {branch!r}), so it runs one sample at a time whatever the export"
        )
        return
    first, axis = next((s.name, int(s.batch_axis)) for s in inputs if s.shape and s.batched)  # type: ignore[arg-type]
    copy.notes.append(
        "relaxing the fixed batch dimension of 1 failed; to test batch dependence, re-export "
        "with a dynamic batch dimension (torch.onnx.export(..., dynamic_axes="
        f"{{{first!r}: {{{axis}: 'batch'}}}}) or dynamic_shapes=...; tf2onnx/paddle2onnx: a None/-1 "
        "batch in the input signature)"
    )


def branch_on_inputs(graph: onnx.GraphProto) -> str | None:
    """The first If node whose condition is computed from the graph's fed inputs, or None: such a graph
    decides per run, which a batch of samples cannot share. One pass in topological order, as
    dataflow.batch_reductions follows an input's values."""
    computed = {value.name for value in graph.input} - {init.name for init in graph.initializer}
    nodes = list(graph.node)
    for node in (nodes[i] for i in topological_order(nodes)):
        if node.op_type == "If" and node.input and node.input[0] in computed:
            return node.name or node.output[0]
        if any(name in computed for name in node.input if name):
            computed.update(name for name in node.output if name)
    return None


def branch_per_sample(graph: onnx.GraphProto, shapes: Mapping[str, tuple[Dim, ...]]) -> str | None:
    """Why the relaxed ``graph`` cannot run a batch, where its inferred ``shapes`` give an If node one condition
    per sample (onnxruntime takes exactly one): a proof's sessions and runs would only fail; else None."""
    for node in graph.node:
        shape = shapes.get(node.input[0]) if node.op_type == "If" and node.input else None
        if shape is not None and BATCH in shape:
            dims = ", ".join(str(d) for d in shape)
            name = node.name or node.output[0]
            return f"If node {name!r} would get one condition per sample (shape [{dims}]); an If takes exactly one"
    return None


def relaxes(inputs: list[InputSpec], batch_sizes: Iterable[int]) -> bool:
    """Whether the probe tries to relax the batch of these inputs: the file fixes it and other sizes are
    asked for."""
    fixed = fixed_batch(inputs)
    return fixed is not None and not set(batch_sizes) <= {fixed}


def _relax(
    copy: ProbeCopy,
    model: onnx.ModelProto,
    settings: ProbeSettings,
    int_high: dict[str, int],
    proof_by_probe: bool = False,
    refused: OutputsRefuse | None = None,
    takes_proof: bool = True,
    rows: frozenset[str] = frozenset(),
) -> onnx.ModelProto:
    """Relax a fixed batch dim if a run proves it harmless (see the module docstring); updates ``copy``.
    ``proof_by_probe``: leave the proof to the probe's own session (:attr:`ProbeCopy.pending`). ``refused``:
    why the probe's own runs of the rewritten copy failed the proof. ``takes_proof``: the probe takes a proof's
    session over (it adds nothing to the graph), so the session is kept for it, also where the outputs refuse
    the relaxation; else it is freed here. ``rows``: norm inputs whose axis 0 is no batch (see
    _rewrite_batch_constants)."""
    fixed = fixed_batch(copy.inputs)
    if fixed is None or not relaxes(copy.inputs, settings.batch_sizes):
        if fixed is not None:
            copy.batch = f"fixed to {fixed} in the file"
        return model
    batched = {s.name: int(s.batch_axis) for s in copy.inputs if s.shape and s.batched}  # type: ignore[arg-type]
    # the proof runs the file's size as well (--batch-sizes 1,2 on a file fixed to 8)
    largest = max(fixed, *settings.batch_sizes)
    # one other size proves the outputs follow the batch; larger sizes run the same graph (a size the probe
    # then cannot run is a note), and validating at the largest would double its most expensive run
    others = [min(b for b in settings.batch_sizes if b != fixed)]
    how = f"fixed to {fixed} in the file; relaxed to symbolic, validated"
    # A Reshape/Expand constant holding the batch (torch's x.view(x.size(0), -1) exported at a fixed batch)
    # makes the plain relaxed copy fail its proof: where there is one, the rewritten copy is proven first
    # (one session and proof less on such files), and the plain copy only if that proof fails.
    rewritten = _relaxed(model, batched, fixed)
    count = _rewrite_batch_constants(rewritten, batched, fixed, copy.shapes, rows)
    proof: Proof | str | None = "not tried"  # None: left to the probe's own session
    settled = False  # refused by the plain relaxed copy's shapes: no run needed to confirm it
    relaxed = model
    outputs = [o.name for o in model.graph.output]
    relaxed_inputs = [s.with_batch_dim(BATCH) if s.name in batched else s for s in copy.inputs]
    draw: Callable[[], dict[str, np.ndarray]] | None = None
    inputs = list(copy.inputs)

    def ready(candidate: onnx.ModelProto) -> str | None:
        """The candidate's shapes, memory check and inputs made ready for its proof; or why no run can prove it."""
        nonlocal draw
        # its shapes first, while no session holds memory: shape inference's transient heap is then reused by
        # the proof's sessions instead of adding to the probe's peak
        skeleton = own_skeleton(candidate)  # both inferences below read it (the memory check's edits it)
        copy.relaxed_shapes = shapes, types = inferred_shapes(candidate, skeleton)
        per_sample = branch_per_sample(candidate.graph, shapes)
        if per_sample is not None:
            return per_sample
        # the largest size before any input is drawn: the proof's other size may be it (--batch-sizes 1,4096)
        copy.estimate = memory.check_probe(
            candidate, {**copy.shapes, **shapes}, {**copy.types, **types}, relaxed_inputs, settings, largest, skeleton
        )
        if draw is None and settings.data is None:  # drawn on the other core while the session is built
            specs = [s.with_batch_dim(None) for s in inputs]
            size = max(fixed, *others)
            draw = in_background(lambda: synthetic_inputs(specs, size, settings.seed, settings.input_shapes, int_high))
        return None

    def validate(run: Runs) -> tuple[list[Run], dict[str, np.ndarray] | None] | str:
        return _validate(outputs, run, inputs, fixed, others, settings, copy.fixed_feeds, draw)

    def prove(candidate: onnx.ModelProto) -> Proof | str:
        per_sample = ready(candidate)
        if per_sample is not None:
            return per_sample
        try:  # built while the inputs are drawn; its error is reported after theirs
            # the shapes ready() just inferred, which the engine reads too: both decide alike
            session: Any = _session(candidate, copy.folder, copy.graph_shapes())
        except Exception as exc:
            session = exc
        found = validate(_session_runs(session, outputs))
        if isinstance(found, OutputsRefuse):
            found.session = session
        return found if isinstance(found, str) else Proof(session, *found)

    if refused is not None:
        proof = refused
    elif proof_by_probe:
        copy.batch_constants = count
        # the rewritten copy, as below; one that fails the probe's runs is prepared again, proven here
        per_sample = ready(rewritten)
        if per_sample is None:
            copy.pending = validate
            proof, relaxed = None, rewritten
        elif not count:  # the plain relaxed copy itself: no session of it can run another size
            proof, settled = per_sample, True
    elif count:
        proof = prove(rewritten)
        relaxed = rewritten if isinstance(proof, Proof) else model
    if count and relaxed is rewritten:
        how += f" ({count} shape constant(s) holding the batch now follow the fed batch)"
    # with nothing rewritten the copy already is the plain relaxed one, whose runs on the probe's graph
    # failed the proof on their outputs (``refused``): no proof of it on its own
    # where constants were rewritten, the rewritten copy's failure is the one to report: the plain copy fails
    # first at a node the rewrite handles (a Reshape to [1, ...]), which would hide the real obstacle
    rewritten_failure = proof if count and isinstance(proof, str) and not isinstance(proof, OutputsRefuse) else None
    if isinstance(proof, str) and not settled and (refused is None or count):
        relaxed = _relaxed(model, batched, fixed) if count else rewritten
        del rewritten
        proof = prove(relaxed)
    if isinstance(proof, str):
        keep_fixed_batch(copy, inputs, rewritten_failure or proof)
        if (
            takes_proof
            and isinstance(proof, OutputsRefuse)
            and proof.session is not None
            and proof.at_fixed is not None
        ):
            # the plain relaxed copy, proven last: at the file's size it is the file's graph, so its session and
            # its run there serve the probe as a proof's do, instead of a session of the file built after it
            copy.proof, copy.drawn = Proof(proof.session, [proof.at_fixed], proof.drawn), proof.drawn
            return relaxed
        copy.relaxed_shapes, copy.estimate = None, None
        return model
    copy.batch = how
    copy.inputs = relaxed_inputs
    if proof is not None:  # its session kept only for a probe that takes it over, its inputs for any
        copy.proof, copy.drawn = proof if takes_proof else None, proof.drawn
    return relaxed


# --------------------------------------------------------------------------- entry point


def prepare(
    handle: OnnxHandle,
    view: ModelView,
    settings: ProbeSettings,
    tmp: Scratch,
    int_high: dict[str, int] | None = None,
    stubbed: Callable[[list[Any] | None], None] | None = None,
    proof_by_probe: bool = False,
    refused: OutputsRefuse | None = None,
    takes_proof: bool = True,
) -> ProbeCopy:
    """The probe's copy of ``handle``'s model for ``settings`` (see the module docstring). ``stubbed`` is
    called with the weights' external stubs once they are in ``tmp``, before any session is built.
    ``proof_by_probe``: a relaxed batch is proven by the probe's own session (:attr:`ProbeCopy.pending`);
    ``refused``: why those runs failed it, from the outputs (no second proof of the same graph);
    ``takes_proof``: the probe adds nothing to the graph and takes a proof's session over (see _relax)."""
    model, folder = stub(handle, tmp)
    stubs = None if handle.external_data else [copied(t) for t in model.graph.initializer]
    if stubbed is not None:
        stubbed(stubs)
    free_unset_dims(model.graph)
    copy = ProbeCopy(model, folder, dict(handle.value_shapes), dict(handle.value_types), stubs, list(view.inputs))
    changed = False
    # onnx's converter leaves model-local functions behind (onnxruntime then finds no such op): from a runnable
    # opset such a file runs as written, and so does one without layers (no measuring node is added)
    measured = bool(view.layers) and not model.functions
    if _opset(model) < MIN_RUNNABLE_OPSET or (_opset(model) < MEASURING_OPSET and measured):
        upgraded, why = _upgrade(model)
        if why is None:
            copy.notes.append(
                f"opset {_opset(model)} upgraded to {_opset(upgraded)} for the probe "
                "(onnx.version_converter; the static checks read the file as written)"
            )
            model, changed = upgraded, True
        elif _opset(model) < MIN_RUNNABLE_OPSET:  # from 7 on onnxruntime runs the file as written
            copy.unconverted = True
            copy.notes.append(
                f"opset {_opset(model)} could not be upgraded to one onnxruntime runs (onnx.version_converter: {why})"
            )
    if model.ir_version < 4:
        _drop_initializer_inputs(model)
        changed = True
    runnable = runnable_ir_version(int(model.ir_version))
    if runnable < model.ir_version:  # run.new_session gives every session's bytes that version
        copy.notes.append(
            f"IR version {model.ir_version} lowered to {runnable} for the probe: this onnxruntime reads up to "
            f"{runnable} and refuses the file as written (its graph and opsets unchanged)"
        )
    undefined = undefined_function_op(model)
    if undefined is not None:
        raise BackendError(f"cannot run the model: {undefined}")
    params = parameter_inputs(model.graph)
    fed = {s.name for s in view.inputs}
    copy.fixed_feeds = _fixed_feeds(model.graph, {k: v for k, v in params.items() if k not in fed})
    if copy.fixed_feeds:
        listed = ", ".join(repr(n) for n in copy.fixed_feeds)
        copy.notes.append(
            f"input(s) {listed} only feed normalization parameters: fed as fixed tensors (scale 1, "
            "bias 0, mean 0, variance 1), not batched"
        )
    # a norm over every axis but 1 that holds no batch: axis 0 of its input and output is a fixed 1, their rows
    # hold the batch
    rows = frozenset(
        name
        for layer in view.layers
        if layer.batch_axis is None and layer.axes and 0 in layer.axes
        for name in (layer.input, layer.output)
    )
    relaxed = _relax(copy, model, settings, dict(int_high or {}), proof_by_probe, refused, takes_proof, rows)
    if relaxed is not model:
        model, changed = relaxed, True
    copy.model = model
    if changed:
        shapes, types = copy.relaxed_shapes or inferred_shapes(model)  # set only when the copy is the relaxed one
        copy.shapes.update(shapes)
        copy.types.update(types)
    return copy
