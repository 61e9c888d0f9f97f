"""The augmented copy of a model that the probe runs: weight-less stub, measuring nodes, spec-following train-mode BN."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from bncheck.backends.base import BackendError
from bncheck.backends.onnx.graph import copied, copy_messages, node_reads, tensor_nbytes, upstream_nodes
from bncheck.backends.onnx.load import external_tensors, free_unset_dims, location_of, relocate
from bncheck.backends.onnx.protobuf import raw_data_offsets
from bncheck.backends.onnx.splice import Decomposition
from bncheck.backends.onnx.tensors import from_array, to_array
from bncheck.errors import one_line
from bncheck.model import NormLayer, normalized_set_size
from bncheck.verdicts import live_channels, output_spread

if TYPE_CHECKING:
    import onnx

    from bncheck.backends.onnx.load import OnnxHandle
    from bncheck.backends.onnx.memory import ProbeShapes
    from bncheck.backends.onnx.probe_copy import ProbeCopy
    from bncheck.backends.onnx.scratch import Scratch


#: elements per sample up to which a measured tensor is fetched whole (exact statistics in numpy).
SMALL_SAMPLE = 4096
#: ranks onnxruntime's GlobalAveragePool and GlobalMaxPool take (1 to 3 spatial dims: "Unsupported pooling size"
#: at rank 6, which MobileViTV2's unoptimized dynamo export measures)
POOLED_RANKS = range(3, 6)
#: An inference BN's output whose mean square is expected to exceed its variance by more than this factor on a
#: live channel (beta large against gamma) is not where its input's statistics are derived from: in float32
#: its mean of squares keeps too few digits of that variance (a shipped recognizer's channel with gamma -0.006
#: and beta -3.19, a factor of 7e4: its input variance came out x2.3 too large). Its input is measured instead
CONDITION_LIMIT = 1e3
_ALIGN = 4096
#: initializers up to this size stay inside the stub (a negligible copy; shape inference needs them).
EMBED_BYTES = 64 * 1024
_SHAPE_TYPES = (6, 7)  # INT32, INT64: shapes, axes, indices
PREFIX = "__bncheck"


@dataclass
class Measure:
    """How one tensor is measured and where its numbers come out."""

    tensor: str
    batch_axis: int | None
    channel_axis: int | None
    mode: str  # "fast" | "generic" | "full" | "spec" (a train-mode BN's input, from its decomposition's pools)
    outputs: dict[str, str] = field(default_factory=dict)
    length: int | None = None  # elements per (sample, channel), when static
    # fast form only: False when min/max are not measured (the output of an inference-mode BN, which
    # cannot collapse: see Augmenter.measure); ``group`` holds its nodes so that min/max can be added
    # when another layer measures the same tensor with them
    minmax: bool = True
    group: list[Any] | None = None
    channels: int | None = None
    rank: int | None = None  # generic and fast forms: the tensor's rank
    as_float: str | None = None  # generic form: the tensor as float32 (a Cast for other types)


@dataclass
class LayerPlan:
    layer: NormLayer
    input: Measure | None = None
    output: Measure | None = None
    runtime: Measure | None = None  # train-mode BN: the runtime node's own output
    affine: tuple[np.ndarray, np.ndarray] | None = None  # inference BN: y = a*x + b per channel
    spec: bool = False  # a train-mode BN computed by the spec's decomposition
    # a spec layer whose output is derived from its input (mode "spec"): its scale and bias per channel
    spec_affine: tuple[np.ndarray, np.ndarray] | None = None
    note: str | None = None


# --------------------------------------------------------------------------- small graph helpers


class _Builder:
    """Adds nodes and small initializers to the stub graph; opset-aware reductions."""

    def __init__(self, opset: int) -> None:
        self.opset = opset
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self._count = 0

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{PREFIX}_{self._count}_{hint}"

    def node(self, op: str, inputs: list[str], hint: str, n_out: int = 1, **attrs: Any) -> list[str]:
        from onnx import helper

        outs = [self.name(f"{hint}_{i}" if n_out > 1 else hint) for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=outs[0], **attrs))
        return outs

    def one(self, op: str, inputs: list[str], hint: str, **attrs: Any) -> str:
        return self.node(op, inputs, hint, **attrs)[0]

    def const(self, value: np.ndarray, hint: str) -> str:
        name = self.name(hint)
        self.inits.append(from_array(np.asarray(value), name))
        return name

    def reduce(self, op: str, x: str, axes: list[int], hint: str, keepdims: int = 0) -> str:
        as_input = self.opset >= 18 or (op == "ReduceSum" and self.opset >= 13)
        if as_input:
            return self.one(op, [x, self.const(np.array(axes, np.int64), "axes")], hint, keepdims=keepdims)
        return self.one(op, [x], hint, axes=axes, keepdims=keepdims)


# --------------------------------------------------------------------------- the augmented stub


def _opset(model: onnx.ModelProto) -> int:
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            return int(op.version)
    return 0


def _write_weights(model: onnx.ModelProto, folder: str) -> list[Any]:
    """Stream every top-level initializer into a new ``folder/weights-N.bin``; return weight-less external
    stubs. Tensors already external (a skeleton from an earlier call) are kept as they are."""
    import onnx

    stubs = []
    count = sum(1 for name in os.listdir(folder) if name.startswith("weights-"))
    location = f"weights-{count}.bin"
    path = os.path.join(folder, location)
    offset = 0
    with open(path, "wb") as fh:
        for tensor in model.graph.initializer:
            small = tensor_nbytes(tensor) <= EMBED_BYTES or tensor.data_type in _SHAPE_TYPES
            if small or tensor.data_type == onnx.TensorProto.STRING or _is_external(tensor):
                # small tensors stay inline: shapes, axes and constants must be readable by
                # onnxruntime's shape inference, which does not read external data
                stubs.append(copied(tensor))
                continue
            data = tensor.raw_data if tensor.HasField("raw_data") else to_array(tensor).tobytes()
            pad = (-offset) % _ALIGN
            if pad:
                fh.write(b"\0" * pad)
                offset += pad
            fh.write(data)
            stub = onnx.TensorProto()
            stub.name = tensor.name
            stub.data_type = tensor.data_type
            stub.dims.extend(tensor.dims)
            stub.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(data)))):
                entry = stub.external_data.add()
                entry.key, entry.value = key, value
            offset += len(data)
            del data
            stubs.append(stub)
    return stubs


def _in_file_stubs(handle: OnnxHandle) -> list[Any] | None:
    """Initializer stubs whose large tensors point into the model file itself (see
    :func:`raw_data_offsets`); None when some large tensor's bytes are not found there as raw_data of the
    right length (then the probe writes a copy, :func:`_write_weights`)."""
    import onnx

    # onnxruntime follows symbolic links and refuses a location whose real path leaves the folder it reads
    # from: the stubs name the model's real file, read from its real folder (stub)
    location = os.path.basename(os.path.realpath(handle.path))
    offsets: dict[str, tuple[int, int]] | None = None
    stubs = []
    for tensor in handle.model.graph.initializer:
        small = tensor_nbytes(tensor) <= EMBED_BYTES or tensor.data_type in _SHAPE_TYPES
        external = _is_external(tensor)
        if external:
            # left in the file by the loader (named as the user named the file) or a skeleton of an earlier
            # probe (named as here): it must point into this file too
            if location_of(tensor) not in (location, os.path.basename(handle.path)):
                return None
            kept = copied(tensor)
            relocate(kept, location)
            stubs.append(kept)
            continue
        if small or tensor.data_type == onnx.TensorProto.STRING or tensor.name in handle.edited:
            stubs.append(copied(tensor))  # an edited tensor's bytes in the file are stale: inline
            continue
        if offsets is None:
            offsets = raw_data_offsets(handle.path) or {}
        found = offsets.get(tensor.name)
        if found is None or not tensor.HasField("raw_data") or found[1] != tensor_nbytes(tensor):
            return None
        stub = onnx.TensorProto()
        stub.name = tensor.name
        stub.data_type = tensor.data_type
        stub.dims.extend(tensor.dims)
        stub.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", str(found[0])), ("length", str(found[1]))):
            entry = stub.external_data.add()
            entry.key, entry.value = key, value
        stubs.append(stub)
    return stubs


def _is_external(tensor: Any) -> bool:
    import onnx

    return tensor.HasField("data_location") and tensor.data_location == onnx.TensorProto.EXTERNAL


def _skeleton(src: onnx.ModelProto, initializers: list[Any]) -> onnx.ModelProto:
    """``src`` with ``initializers`` in place of its own (the graph is copied, never the weights)."""
    import onnx

    stub = onnx.ModelProto()
    for fname in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        if src.HasField(fname):
            setattr(stub, fname, getattr(src, fname))
    copy_messages(stub.opset_import, src.opset_import)
    copy_messages(stub.metadata_props, src.metadata_props)
    copy_messages(stub.functions, src.functions)
    graph = stub.graph
    graph.name = src.graph.name
    copy_messages(graph.node, src.graph.node)
    copy_messages(graph.input, src.graph.input)
    copy_messages(graph.output, src.graph.output)
    copy_messages(graph.value_info, src.graph.value_info)
    copy_messages(graph.sparse_initializer, src.graph.sparse_initializer)
    copy_messages(graph.initializer, initializers)
    return stub


def stub(handle: OnnxHandle, tmp: Scratch) -> tuple[onnx.ModelProto, str]:
    """A ModelProto without weight bytes, and the folder its external data lives in (``tmp``'s only when the
    weights must be written out)."""
    folder = os.path.dirname(os.path.abspath(handle.path))
    if handle.external_data:
        # The model as it is in memory, edits included (fix's passes): the loader read only the small tensors
        # and the norm parameters, the large ones still point into their files (it validated every location),
        # and onnxruntime reads them from the original folder.
        skeleton = _skeleton(handle.model, [copied(t) for t in handle.model.graph.initializer])
        return skeleton, runtime_folder(skeleton, folder)
    in_file = _in_file_stubs(handle)
    if in_file is not None:  # onnxruntime reads the weights from the model file itself, in its real folder
        return _skeleton(handle.model, in_file), os.path.dirname(os.path.realpath(handle.path))
    return _skeleton(handle.model, _write_weights(handle.model, tmp.path)), tmp.path


def runtime_folder(model: onnx.ModelProto, folder: str) -> str:
    """The folder onnxruntime is to read ``model``'s external data from, ``folder`` unless a location's real
    path (symbolic links followed) leaves ``folder``'s, which onnxruntime refuses: a Hugging Face cache links
    its files into a blob store. Then every location in ``model`` is rewritten relative to a folder that holds
    all their real files (the loader validated each location), and that folder is returned."""
    tensors = external_tensors(model)
    real = os.path.realpath(folder)
    targets: dict[str, str] = {}
    for tensor in tensors:
        location = location_of(tensor)
        if location not in targets:
            targets[location] = os.path.realpath(os.path.join(folder, location))
    if all(os.path.commonpath([target, real]) == real for target in targets.values()):
        return folder
    common = os.path.commonpath([os.path.dirname(target) for target in targets.values()])
    for tensor in tensors:
        relocate(tensor, os.path.relpath(targets[location_of(tensor)], common))
    return common


def feed_statistics(model: onnx.ModelProto, outputs: set[str]) -> dict[str, tuple[str, str]]:
    """Make the running mean and variance of the BatchNormalization nodes writing ``outputs`` graph inputs,
    where both are initializers; returns output -> (mean input, variance input). One session then serves
    successive values of them: fix's passes, each of which recomputes the statistics of layers whose
    upstream was repaired in the pass before, would otherwise build a session per pass."""
    from onnx import helper

    if not outputs:
        return {}
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    fed: dict[str, tuple[str, str]] = {}
    for node in graph.node:
        if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx") or len(node.input) < 5:
            continue
        if not node.output or node.output[0] not in outputs or node.output[0] in fed:
            continue
        mean, var = inits.get(node.input[3]), inits.get(node.input[4])
        if mean is None or var is None:
            continue
        names = (f"{PREFIX}_fed_{len(fed)}_mean", f"{PREFIX}_fed_{len(fed)}_var")
        for position, name, tensor in zip((3, 4), names, (mean, var)):
            graph.input.append(helper.make_tensor_value_info(name, tensor.data_type, list(tensor.dims)))
            node.input[position] = name
        fed[node.output[0]] = names
    return fed


def keep_only(graph: Any, outputs: Iterable[str]) -> None:
    """Leave in ``graph`` only the nodes that ``outputs`` need, and only those as its outputs: onnxruntime
    computes every node of a graph whatever a run fetches."""
    wanted = set(outputs)
    nodes = list(graph.node)
    needed = upstream_nodes(nodes, wanted)
    del graph.node[:]
    copy_messages(graph.node, (node for i, node in enumerate(nodes) if i in needed))
    kept = [value for value in graph.output if value.name in wanted]
    del graph.output[:]
    copy_messages(graph.output, kept)


def release(handle: OnnxHandle, stubs: list[Any] | None):
    """Swap ``handle.model`` for a weight-less skeleton for the duration of a probe; return the restorer.

    The probe's own session reads the weights from files, so the ModelProto the loader filled would be a
    second copy of every weight in this process.
    The skeleton keeps the graph; its initializers point at the files (the original external data, the
    model file itself, or the copy this probe wrote). The restorer makes the reload lazy (:meth:`OnnxHandle.defer_model`): the model
    is reloaded from ``handle.path`` with the loader's own validation, exactly as ``load_onnx`` produced
    it, when someone next reads ``handle.model`` (``bncheck probe`` never does). The skeleton's external references may point into the probe's temporary folder, which is
    gone by then; a reader gets the reloaded model, never the skeleton.
    """
    import onnx

    from bncheck.backends.onnx import load as onnx_load

    if handle.external_data:
        skeleton = onnx.load(handle.path, load_external_data=False)
    else:
        # the external stubs of the weights this probe already wrote; a later stub copies them as they
        # are, so the skeleton also serves the exact form's second session. Without initializers (older
        # paddle2onnx keeps every weight in Constant nodes) a skeleton would copy the weights too.
        if stubs is None or not handle.model.graph.initializer:
            return lambda: None
        skeleton = _skeleton(handle.model, stubs)
    kept = handle.model
    handle.model = skeleton
    del kept

    def reload() -> onnx.ModelProto:
        try:
            model = onnx_load._parse(handle.path)
            if handle.external_data:
                onnx_load._validate_external(handle.path, model)
                onnx_load._load_view_weights(handle.path, model)  # as load_onnx reads it: large ones stay
        except BackendError:
            raise
        except Exception as exc:
            raise BackendError(f"{handle.path}: cannot reload the model after probing: {one_line(exc)}") from exc
        return model

    return lambda: handle.defer_model(skeleton, reload)


class Augmenter:
    """Builds the instrumented stub for a list of layers."""

    def __init__(
        self,
        handle: OnnxHandle,
        layers: list[NormLayer],
        tmp: Scratch,
        exact: bool,
        inputs_only: bool,
        keep_runtime: bool = True,
        base: ProbeCopy | None = None,
        fed: Iterable[str] = (),
    ):
        """``base``: the prepared copy (probe_copy.prepare) to instrument instead of the handle's model.
        ``fed``: outputs of BatchNormalization nodes whose running mean and variance become graph inputs
        (:attr:`fed_inputs`), fed at each run."""
        self.handle = handle
        self.keep_runtime = keep_runtime
        self.exact = exact
        self.inputs_only = inputs_only
        self.untouched = False
        if base is None:
            self.model, self.folder = stub(handle, tmp)
            free_unset_dims(self.model.graph)  # a batch written as 0 would be a literal 0 to onnxruntime
            self.initializer_stubs = None if handle.external_data else [copied(t) for t in self.model.graph.initializer]
            self.shapes = dict(handle.value_shapes)
            self.types = dict(handle.value_types)
        else:
            # a copy only where something is added: no layer measured, no statistics fed and no train-mode
            # BN to decompose leaves the prepared copy as it is (the usual inference-mode probe)
            self.untouched = not layers and not fed and not _has_train_batch_norm(base.model)
            if self.untouched:
                self.model = base.model
            else:
                self.model = type(base.model)()
                self.model.CopyFrom(base.model)  # weight-less: a cheap copy, edited below
            self.folder = base.folder
            self.initializer_stubs = base.initializer_stubs
            self.shapes = dict(base.shapes)
            self.types = dict(base.types)
        self.concrete = base.estimate.concrete if base is not None and base.estimate is not None else None
        self.fed_inputs = feed_statistics(self.model, set(fed))
        self.opset = _opset(self.model)
        self.b = _Builder(self.opset)
        self.measures: dict[tuple[str, int | None, int | None], Measure] = {}
        self.after: dict[str, list[Any]] = {}  # producer output -> measure nodes to place after it
        self.tail: list[list[Any]] = []  # fast-form node groups, appended in reverse
        self.replaced: dict[int, list[Any]] = {}  # node index -> nodes replacing/following it
        self.outputs: list[str] = []
        # every train-mode BN follows the spec, measured or not: layers downstream depend on it
        self.decomposed: dict[str, str] = {}  # spec output name -> runtime node's renamed output
        self.runtime_protos: dict[str, Any] = {}  # spec output name -> the node as the model wrote it
        # spec output name -> its decomposition's per-sample pools of x and of (x - mean)^2, batch mean and
        # variance ([1, C, 1, ...]): the layer's statistics without a kernel of their own (_spec_measure)
        self.spec_pools: dict[str, dict[str, str]] = {}
        # the decompositions the statistics-first session splices in after optimizing (splice.py)
        self.decompositions: list[Decomposition] = []
        self.read: set[str] = set()
        self.known: set[str] = set()
        self.plans: list[LayerPlan] = []
        if self.untouched:
            return
        graph = self.model.graph
        self.read = {o.name for o in graph.output} | {n for node in graph.node for n in node_reads(node)}
        for idx, node in enumerate(list(graph.node)):
            if self._is_train_bn(node):
                y = node.output[0]
                self.runtime_protos[y] = copied(node)
                if self._decompose(idx):
                    self.decomposed[y] = graph.node[idx].output[0]
        self.known = {v.name for v in graph.input} | {t.name for t in graph.initializer}
        self.known |= {out for node in graph.node for out in node.output if out}
        self.known |= {out for nodes in self.replaced.values() for node in nodes for out in node.output if out}
        self.plans = [self._plan(layer) for layer in layers]

    # ------------------------------------------------------------ measuring one tensor

    def _static_length(self, tensor: str, batch_axis: int | None, channel_axis: int | None) -> int | None:
        shape = self.shapes.get(tensor)
        if shape is None:
            return None
        total = 1
        for axis, dim in enumerate(shape):
            if axis in (batch_axis, channel_axis):
                continue
            if not isinstance(dim, int):
                return None
            total *= dim
        return total

    def measure(
        self, tensor: str, batch_axis: int | None, channel_axis: int | None, minmax: bool = True
    ) -> Measure | None:
        """How ``tensor`` is measured. ``minmax=False`` lets the fast form skip the per-channel min and max
        (two GlobalMaxPool and a depthwise Conv for -t: ~40% of the added kernel time on ResNet-50); the
        other forms measure them anyway (fetched whole, or reduced exactly)."""
        shape = self.shapes.get(tensor)
        rank = None if shape is None else len(shape)
        if rank is not None:
            batch_axis = None if batch_axis is None or rank == 0 else batch_axis % rank
            channel_axis = None if channel_axis is None or rank == 0 else channel_axis % rank
        key = (tensor, batch_axis, channel_axis)
        if key in self.measures:
            m = self.measures[key]
            if minmax and not m.minmax:
                self._add_extremes(m)
            return m
        if not tensor or tensor not in self.known:
            return None  # not a tensor of the main graph (e.g. inside a subgraph): not measurable
        per_sample = _per_sample(shape, batch_axis)
        elem = self.types.get(tensor, 1)
        start = len(self.b.nodes)
        length = self._static_length(tensor, batch_axis, channel_axis)
        m = Measure(tensor, batch_axis, channel_axis, "full", length=length)
        if per_sample is not None and per_sample <= SMALL_SAMPLE:
            m.mode = "full"
            m.outputs["full"] = tensor
        elif rank is None:
            return self._measure_flat(key, minmax)
        elif (
            not self.exact
            and elem == 1
            and rank in POOLED_RANKS
            and batch_axis == 0
            and channel_axis == 1
            and shape is not None
            and isinstance(shape[1], int)
        ):
            m.mode = "fast"
            m.minmax = minmax
            m.rank = rank
            m.channels = int(shape[1])
            self._fast(m, m.channels)
        else:
            m.mode = "generic"
            m.minmax = minmax or self.exact
            self._generic(m, rank, elem)
        group = self.b.nodes[start:]
        del self.b.nodes[start:]
        if m.mode == "fast":
            m.group = group
            self.tail.append(group)
        else:
            self.after.setdefault(tensor, []).extend(group)
        self.outputs.extend(o for o in m.outputs.values() if o not in self.outputs)
        self.measures[key] = m
        return m

    def _measure_flat(self, key: tuple[str, int | None, int | None], minmax: bool) -> Measure | None:
        """A tensor without a static rank (after a Reshape whose target is computed at run time): measured
        through Reshape(t, [0, -1]) (batch axis 0, no channel axis) or [0, 0, -1] (channel axis 1), a view
        of known rank whose per-(sample, channel) statistics are those of ``t``; the reduction needs no rank."""
        tensor, batch_axis, channel_axis = key
        if batch_axis != 0 or channel_axis not in (None, 1):
            return None  # a channel axis counted from the end would need the rank
        target = [0, -1] if channel_axis is None else [0, 0, -1]
        start = len(self.b.nodes)
        view = self.b.one("Reshape", [tensor, self.b.const(np.array(target, np.int64), "flat_shape")], "flat")
        reshape = self.b.nodes[start:]
        del self.b.nodes[start:]
        self.known.add(view)
        self.shapes[view] = (None,) * len(target)
        self.types[view] = self.types.get(tensor, 1)
        m = self.measure(view, batch_axis, channel_axis, minmax)
        if m is None:
            return None
        # the tensor's own dims at run time: its layer's set size, which no static shape gives
        start = len(self.b.nodes)
        m.outputs["source_shape"] = self.b.one("Shape", [tensor], "source_shape")
        shape = self.b.nodes[start:]
        del self.b.nodes[start:]
        self.outputs.append(m.outputs["source_shape"])
        # the view's own measuring nodes follow the Reshape, right after the tensor's producer
        self.after.setdefault(tensor, []).extend([*reshape, *self.after.pop(view, []), *shape])
        self.measures[key] = m
        return m

    def _fast(self, m: Measure, channels: int) -> None:
        """NCHWc-native statistics: mean of t and of t^2; with ``m.minmax`` also max of t and of -t."""
        b, t = self.b, m.tensor
        m.outputs["mean"] = b.one("GlobalAveragePool", [t], "mean")
        if m.minmax:
            self._fast_minmax(m, channels)
        # Mul(t, t): NCHWc-native (Pow is not: a reorder per tensor); added after the min, so that -t is
        # freed before t^2 exists: one temporary at a time
        square = b.one("Mul", [t, t], "square")
        m.outputs["sq"] = b.one("GlobalAveragePool", [square], "sq")
        if m.length is None:  # symbolic spatial dims: the runtime shape sizes the counts
            m.outputs["shape"] = b.one("Shape", [t], "shape")

    def _add_extremes(self, m: Measure) -> None:
        """Min/max (and the generic form's zero and NaN/Inf counts) for a tensor first measured without them."""
        start = len(self.b.nodes)
        if m.mode == "fast" and m.group is not None and m.channels is not None:
            self._fast_minmax(m, m.channels)
            m.group.extend(self.b.nodes[start:])
        elif m.mode == "generic" and m.rank is not None and "mean" in m.outputs:
            self._generic_extremes(m, m.rank)
            self.after.setdefault(m.tensor, []).extend(self.b.nodes[start:])
        else:
            return
        del self.b.nodes[start:]
        m.minmax = True
        self.outputs.extend(o for o in m.outputs.values() if o not in self.outputs)

    def _fast_minmax(self, m: Measure, channels: int) -> None:
        """Max of t, and max of -t: on 4-D maps a depthwise 1x1 Conv with weight -1 (NCHWc-native, unlike
        Neg); on other ranks, which have no NCHWc form, Neg."""
        b, t = self.b, m.tensor
        m.outputs["max"] = b.one("GlobalMaxPool", [t], "max")
        if m.rank == 4:
            neg_w = b.const(-np.ones((channels, 1, 1, 1), np.float32), "neg_w")
            negated = b.one("Conv", [t, neg_w], "neg", group=channels, kernel_shape=[1, 1])
        else:
            negated = b.one("Neg", [t], "neg")
        m.outputs["negmin"] = b.one("GlobalMaxPool", [negated], "negmin")

    def _generic(self, m: Measure, rank: int, elem: int) -> None:
        """Mean and sum of squares over the other axes; with ``m.minmax`` also the extremes and counts
        (:meth:`_generic_extremes`). Without them a NaN/Inf still shows in its sample's mean (_needs_exact)."""
        import onnx

        b, t = self.b, m.tensor
        m.rank = rank
        if elem != onnx.TensorProto.FLOAT:
            t = b.one("Cast", [t], "as_float", to=onnx.TensorProto.FLOAT)
        m.as_float = t
        keep = [a for a in (m.batch_axis, m.channel_axis) if a is not None]
        spatial = [a for a in range(rank) if a not in keep]
        if spatial:
            m.outputs["mean"] = b.reduce("ReduceMean", t, spatial, "mean")
            m.outputs["sumsq"] = b.reduce("ReduceSumSquare", t, spatial, "sumsq")
        else:
            m.outputs["full"] = t
            m.minmax = True
            return
        m.outputs["shape"] = b.one("Shape", [m.tensor], "shape")
        if m.minmax:
            self._generic_extremes(m, rank)

    def _generic_extremes(self, m: Measure, rank: int) -> None:
        import onnx

        b, t = self.b, m.as_float or m.tensor
        keep = [a for a in (m.batch_axis, m.channel_axis) if a is not None]
        spatial = [a for a in range(rank) if a not in keep]
        zero = b.const(np.zeros((), np.float32), "zero")
        is_zero = b.one("Cast", [b.one("Equal", [t, zero], "eq0")], "eq0f", to=onnx.TensorProto.FLOAT)
        m.outputs["zeros"] = b.reduce("ReduceSum", is_zero, spatial, "zeros")
        nonfinite = b.one("Or", [b.one("IsNaN", [t], "isnan"), b.one("IsInf", [t], "isinf")], "nonfinite")
        m.outputs["nonfinite"] = b.reduce(
            "ReduceSum", b.one("Cast", [nonfinite], "nonfinite_f", to=onnx.TensorProto.FLOAT), spatial, "nfcount"
        )
        # NaN-free extremes: ReduceMin/Max propagate NaN, the numpy reference ignores it
        is_nan = b.one("IsNaN", [t], "isnan_x")
        low = b.one("Where", [is_nan, b.const(np.array(np.inf, np.float32), "inf"), t], "nonan_lo")
        high = b.one("Where", [is_nan, b.const(np.array(-np.inf, np.float32), "ninf"), t], "nonan_hi")
        m.outputs["min"] = b.reduce("ReduceMin", low, spatial, "min")
        m.outputs["max"] = b.reduce("ReduceMax", high, spatial, "max")

    # ------------------------------------------------------------ per layer

    def _is_train_bn(self, node: Any) -> bool:
        return is_train_batch_norm(node, self.opset)

    def _plan(self, layer: NormLayer) -> LayerPlan:
        plan = LayerPlan(layer)
        if layer.op_type == "BatchNormalization" and layer.training:
            runtime_out = self.decomposed.get(layer.output)
            extremes = can_collapse(layer, self.concrete)
            if runtime_out is not None:
                plan.spec = True
                derived = self._spec_measure(layer, extremes)
                if derived is not None:
                    # input from the decomposition's own pools, output derived from it (run._derive_spec_output)
                    plan.input = derived
                    if not self.inputs_only:
                        plan.spec_affine = (np.asarray(layer.scale, np.float64), np.asarray(layer.bias, np.float64))
                    if self.keep_runtime and not self.inputs_only:
                        plan.runtime = self.measure(runtime_out, layer.batch_axis, layer.channel_axis, extremes)
                    return plan
                plan.input = self.measure(layer.input, layer.batch_axis, layer.channel_axis, extremes)
                if not self.inputs_only:
                    plan.output = self.measure(layer.output, layer.batch_axis, layer.channel_axis, extremes)
                    if self.keep_runtime:
                        plan.runtime = self.measure(runtime_out, layer.batch_axis, layer.channel_axis, extremes)
                return plan
            plan.note = f"{layer.name}: train-mode BatchNormalization measured as onnxruntime computes it"
        affine = _inference_affine(layer)
        if affine is not None and not self.exact and not self.inputs_only:
            # An inference BN is an affine map per channel: its output is constant (or zero) exactly when
            # its input is, so it cannot collapse (BN001 judges layers that compute statistics only) and
            # its min/max are not needed: mean and mean of squares only. NaN/Inf still show: one
            # non-finite element makes its sample's mean non-finite (see _needs_exact).
            plan.affine = affine
            # one side measured, the other derived: the output (Conv+BN fusion survives) unless deriving from
            # it loses the input's variance, or where the output is no tensor of the main graph (a layer inside a
            # control-flow body that reads an outer tensor); measured before the BN runs, the input then costs no
            # more memory
            side = layer.input if _output_ill_conditioned(layer) or layer.output not in self.known else layer.output
            measured = self.measure(side, layer.batch_axis, layer.channel_axis, minmax=False)
            if side == layer.input:
                plan.input = measured
            else:
                plan.output = measured
            return plan
        extremes = can_collapse(layer, self.concrete)
        plan.input = self.measure(layer.input, layer.batch_axis, layer.channel_axis, extremes)
        if not self.inputs_only and layer.output:
            plan.output = self.measure(layer.output, layer.batch_axis, layer.channel_axis, extremes)
        return plan

    def _spec_measure(self, layer: NormLayer, extremes: bool) -> Measure | None:
        """A train-mode BN's input measured by its decomposition's per-sample pools, where the fast form would
        measure it (the output is then derived, exactly as the spec computes it: y = (x - mean) * g + bias per
        channel within the batch). Saves a Mul and a pool of x and a Mul and two pools of y per layer."""
        pools = self.spec_pools.get(layer.output)
        shape = self.shapes.get(layer.input)
        if pools is None or self.exact or shape is None or layer.scale is None or layer.bias is None:
            return None
        if len(shape) < 3 or layer.batch_axis != 0 or layer.channel_axis != 1 or not isinstance(shape[1], int):
            return None
        per_sample = _per_sample(shape, 0)
        small = per_sample is not None and per_sample <= SMALL_SAMPLE
        if small or np.size(layer.scale) != shape[1] or np.size(layer.bias) != shape[1]:
            return None  # small tensors are fetched whole (exact counts); parameters of another size: measure
        m = Measure(layer.input, 0, 1, "spec", length=self._static_length(layer.input, 0, 1))
        m.outputs.update(pools)
        m.channels = int(shape[1])
        m.minmax = extremes
        start = len(self.b.nodes)
        if extremes:
            self._fast_minmax(m, m.channels)
        if m.length is None:
            m.outputs["shape"] = self.b.one("Shape", [layer.input], "shape")
        group = self.b.nodes[start:]
        del self.b.nodes[start:]
        if group:
            self.tail.append(group)
        self.outputs.extend(o for o in m.outputs.values() if o not in self.outputs)
        return m

    def _decompose(self, idx: int) -> bool:
        """Replace a train-mode BN by the spec's decomposition; keep the original node on renamed outputs."""
        import onnx

        node = self.model.graph.node[idx]
        if len(node.input) < 5 or not all(node.input[:5]):
            return False
        x = node.input[0]
        shape = self.shapes.get(x)
        elem = self.types.get(x, onnx.TensorProto.FLOAT)
        if shape is None or len(shape) < 2 or elem != onnx.TensorProto.FLOAT:
            return False
        rank = len(shape)
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        spatial_mode = int(attrs.get("spatial", 1)) if self.opset < 9 else 1
        eps = float(attrs.get("epsilon", 1e-5))
        momentum = float(attrs.get("momentum", 0.9))
        axes = [0] if spatial_mode == 0 else [0] + list(range(2, rank))
        b = self.b
        start = len(b.nodes)
        outputs = list(node.output)
        # the updated running statistics only where something reads them: exporters write these outputs
        # and leave them unused, and their 8 nodes per layer cost onnxruntime's optimizer time
        updated = [pos for pos in (1, 2) if pos < len(outputs) and outputs[pos] and outputs[pos] in self.read]
        roles = {"scale", "bias"} | {role for pos, role in ((1, "mean"), (2, "var")) if pos in updated}
        params = {}
        for role, name in zip(("scale", "bias", "mean", "var"), node.input[1:5]):
            if role not in roles:
                continue
            # private copies beside the runtime's own train-mode node only: it may write the running
            # statistics into a buffer it shares with an equal initializer (onnxruntime#29790); without it
            # the copies cost onnxruntime's optimizer time (a Constant node's copy is folded into a new one)
            params[role] = b.one("Identity", [name], f"spec_{role}") if self.keep_runtime else name
        c = shape[1] if isinstance(shape[1], int) else None
        per_channel = all(self.shapes.get(name) == (c,) for name in node.input[1:3])  # scale and bias
        # (BatchNormalization-6 would need is_test: an opset the probe copy converts before it runs)
        one_kernel = spatial_mode == 1 and c is not None and per_channel and not self.keep_runtime and self.opset >= 7
        pooled = spatial_mode == 1 and rank in POOLED_RANKS
        if pooled:
            # the mean over (0, 2, ...) as the batch mean of per-sample GlobalAveragePools: onnxruntime keeps
            # those in its NCHWc layout, where a ReduceMean over (0, 2, 3) reorders the whole tensor first
            gap = b.one("GlobalAveragePool", [x], "spec_gap")
            mean = b.reduce("ReduceMean", gap, [0], "spec_mean", keepdims=1)
            centered = b.one("Sub", [x, mean], "spec_centered")
            sq = b.one("GlobalAveragePool", [b.one("Mul", [centered, centered], "spec_sq")], "spec_gapsq")
            # the one-kernel form below reads the variance as [C]: reduced straight to it, no Reshape node
            var = b.reduce("ReduceMean", sq, axes if one_kernel else [0], "spec_var", keepdims=0 if one_kernel else 1)
            self.spec_pools[node.output[0]] = {"mean": gap, "centered_sq": sq, "batch_mean": mean, "batch_var": var}
        else:
            mean = b.reduce("ReduceMean", x, axes, "spec_mean", keepdims=1)
            centered = b.one("Sub", [x, mean], "spec_centered")
            var = b.reduce("ReduceMean", b.one("Mul", [centered, centered], "spec_sq"), axes, "spec_var", keepdims=1)
        y_spec = outputs[0]
        flat = b.const(np.array([-1], np.int64), "spec_flat")
        if one_kernel:
            # the centred input through an inference-mode BatchNormalization with mean 0 and the batch's
            # variance: one kernel for the spec's (x - mean) / sqrt(var + eps) * scale + bias, and a centred
            # value of exactly 0 (a one-element set) still gives exactly the bias. Not beside the runtime's
            # node: onnxruntime merges equal [C] initializers, which that node's in-place writes then corrupt
            assert c is not None  # one_kernel
            channels = var if pooled else b.one("Reshape", [var, flat], "spec_var_c")
            zero = b.const(np.zeros(c, np.float32), "spec_mean0")
            b.nodes.append(
                onnx.helper.make_node(
                    "BatchNormalization",
                    [centered, params["scale"], params["bias"], zero, channels],
                    [y_spec],
                    name=b.name("spec_y"),
                    epsilon=eps,
                )
            )
        else:
            # beside the runtime's node, parameters of another size than the channels, or per activation
            # (spatial=0): broadcast as written
            eps_c = b.const(np.array(eps, np.float32), "spec_eps")
            std = b.one("Sqrt", [b.one("Add", [var, eps_c], "spec_vareps")], "spec_std")
            if spatial_mode == 0:
                scale_r, bias_r = params["scale"], params["bias"]
            else:
                shape_c = b.const(np.array([-1] + [1] * (rank - 2), np.int64), "spec_cshape")
                scale_r = b.one("Reshape", [params["scale"], shape_c], "spec_scale_r")
                bias_r = b.one("Reshape", [params["bias"], shape_c], "spec_bias_r")
            # scale / std first: one full-size Mul instead of a Div and a Mul (a centred value of exactly 0
            # still gives exactly the bias)
            scaled = b.one("Mul", [centered, b.one("Div", [scale_r, std], "spec_gain")], "spec_scaled")
            b.nodes.append(onnx.helper.make_node("Add", [scaled, bias_r], [y_spec], name=b.name("spec_y")))
        keep = 1.0 - momentum
        for pos, (stat, role) in enumerate(((mean, "mean"), (var, "var")), start=1):
            if pos in updated:
                running = params[role]
                cur = b.one("Reshape", [stat, flat], "spec_cur")
                mom = b.const(np.array(momentum, np.float32), "spec_mom")
                kp = b.const(np.array(keep, np.float32), "spec_keep")
                b.nodes.append(
                    onnx.helper.make_node(
                        "Add",
                        [b.one("Mul", [running, mom], "spec_run"), b.one("Mul", [cur, kp], "spec_new")],
                        [outputs[pos]],
                        name=b.name("spec_running"),
                    )
                )
        spec_nodes = b.nodes[start:]
        del b.nodes[start:]
        # the runtime's own node, on renamed outputs; three outputs so that onnxruntime's shape
        # inference accepts training_mode=1 (DEVELOPERS.md)
        renamed = [self.b.name("runtime_y")]
        want = max(len(outputs), 3) if attrs.get("training_mode", 0) else len(outputs)
        for pos in range(1, want):
            renamed.append(self.b.name(f"runtime_out{pos}") if pos < 3 or pos >= len(outputs) else outputs[pos])
        del node.output[:]
        node.output.extend(renamed)
        if pooled and one_kernel:
            # for the optimizing build: the node itself (writing y, and the running statistics where read)
            # beside the pool of x, the decomposition's only node that onnxruntime rewrites (NCHWc)
            written = copied(node)
            written.output[0] = y_spec
            for pos in updated:
                written.output[pos] = outputs[pos]
            assert spec_nodes[0].output[0] == gap  # pooled
            self.decompositions.append(Decomposition(written, [n.name for n in spec_nodes[1:]], list(node.input[:5])))
        self.shapes[renamed[0]] = shape
        self.types[renamed[0]] = elem
        self.replaced[idx] = spec_nodes
        return True

    # ------------------------------------------------------------ assembling

    def finish(self) -> onnx.ModelProto:
        from onnx import helper

        if self.untouched:
            return self.model
        graph = self.model.graph
        original = list(graph.node)
        ordered: list[Any] = []
        placed: set[str] = set()

        def place_after(outputs: Iterable[str]) -> None:
            for out in outputs:
                if out in self.after and out not in placed:
                    placed.add(out)
                    ordered.extend(self.after[out])

        place_after(v.name for v in graph.input)
        place_after(t.name for t in graph.initializer)
        for i, node in enumerate(original):
            if i in self.replaced and not self.keep_runtime:
                pass  # the runtime's own train-mode node cannot run: the spec's decomposition replaces it
            else:
                ordered.append(node)
                place_after(node.output)
            for extra in self.replaced.get(i, []):
                ordered.append(extra)
                place_after(extra.output)
        leftover = [g for t, g in self.after.items() if t not in placed]
        for group in leftover:
            ordered.extend(group)
        for group in reversed(self.tail):
            ordered.extend(group)
        del graph.node[:]
        copy_messages(graph.node, ordered)
        copy_messages(graph.initializer, self.b.inits)
        existing = {o.name for o in graph.output}
        for name in self.outputs:
            if name not in existing:
                graph.output.append(helper.make_empty_tensor_value_info(name))
                existing.add(name)
        return self.model


def _has_train_batch_norm(model: onnx.ModelProto) -> bool:
    opset = _opset(model)
    return any(is_train_batch_norm(node, opset) for node in model.graph.node)


def is_train_batch_norm(node: Any, opset: int) -> bool:
    """A BatchNormalization node in training mode: ``training_mode`` 1, or before opset 14 any output past
    the first."""
    if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
        return False
    for attr in node.attribute:
        if attr.name == "training_mode":
            return bool(attr.i)
    return opset < 14 and any(o for o in node.output[1:])


def _per_sample(shape: tuple[Any, ...] | None, batch_axis: int | None) -> int | None:
    """Elements per sample of a tensor of ``shape`` (None when a dim other than the batch is not known)."""
    if shape is None:
        return None
    count = 1
    for axis, dim in enumerate(shape):
        if axis != batch_axis:
            if not isinstance(dim, int):
                return None
            count *= dim
    return count


def can_collapse(layer: NormLayer, concrete: ProbeShapes | None = None) -> bool:
    """Whether a normalized set of ``layer`` may hold a single element at some batch size (its shape or axes
    unknown, or its known dims multiplying to 1). Only then are a tensor's min, max and zero count measured:
    BN001 reads them, and a LayerNorm over 512 features or a BN over 7x7 maps cannot collapse.

    ``concrete``: shapes inferred at the sizes the probe feeds, and the batch size they were inferred at
    (the memory check's, where the file leaves H and W open). They decide a set whose size the file leaves
    open, as a file with those sizes written in would, where the layer's batch axis is symbolic in the file
    and holds that batch size there: the other dims then do not depend on the batch."""
    known, _ = normalized_set_size(layer, batch=1)
    if known is not None and known >= 2:
        return False
    if concrete is None or layer.input_shape is None or layer.batch_axis is None:
        return True
    shapes, batch = concrete
    shape, axis = shapes.get(layer.input), layer.batch_axis
    if shape is None or len(shape) != len(layer.input_shape) or not 0 <= axis < len(shape):
        return True
    if isinstance(layer.input_shape[axis], int) or shape[axis] != batch:
        return True
    known, symbolic = normalized_set_size(replace(layer, input_shape=shape), batch=1)
    return known is None or bool(symbolic) or known < 2


def _output_ill_conditioned(layer: NormLayer) -> bool:
    """An inference BN whose output's float32 mean of squares would lose its input's variance where its input's
    would not: on inputs of its running statistics, a live channel's mean square over :data:`CONDITION_LIMIT`
    times its variance at the output (beta^2 against gamma^2 var / (var + eps)) and under it at the input
    (mean^2 against var) on every live channel (dead ones carry nothing to derive)."""
    spread, live = output_spread(layer), live_channels(layer)
    if spread is None or live is None or layer.bias is None or layer.mean is None or layer.var is None:
        return False
    beta, mean, var = (np.asarray(p, np.float64).ravel() for p in (layer.bias, layer.mean, layer.var))
    if not beta.size == mean.size == var.size == spread.size:
        return False
    with np.errstate(all="ignore"):
        at_output = (beta * beta + spread * spread) / (spread * spread)
        at_input = (mean * mean + var) / var
    live &= np.isfinite(at_output) & np.isfinite(at_input)
    return bool(np.any(at_output[live] > CONDITION_LIMIT) and np.all(at_input[live] <= CONDITION_LIMIT))


def _inference_affine(layer: NormLayer) -> tuple[np.ndarray, np.ndarray] | None:
    """y = a*x + b per channel for an inference-mode BatchNormalization whose parameters are known."""
    if layer.op_type != "BatchNormalization" or layer.training or not layer.uses_running_stats:
        return None
    if layer.domain not in ("", "ai.onnx") or layer.channel_axis != 1 or layer.batch_axis != 0:
        return None
    if any(p is None for p in (layer.scale, layer.bias, layer.mean, layer.var)) or layer.epsilon is None:
        return None
    params = [np.asarray(p, np.float64).ravel() for p in (layer.scale, layer.bias, layer.mean, layer.var)]
    if len({p.size for p in params}) != 1 or (layer.extra.get("spatial", 1) == 0):
        return None
    scale, bias, mean, var = params
    with np.errstate(all="ignore"):
        a = scale / np.sqrt(var + np.float64(np.float32(layer.epsilon)))
        b = bias - mean * a
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b)) and np.all(a != 0)):
        return None
    return a, b
