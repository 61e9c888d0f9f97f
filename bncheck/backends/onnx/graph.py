"""An indexed, read-only view of an ONNX graph for the walk: producers, consumers, constants, shapes.

Built once per model (linear time), so that every lookup the pattern matchers make is O(1) and the walk of
a ResNet-50-sized graph stays linear. Constant folding here is deliberately tiny (only what reduction axes
and parameters need: Constant, Identity, Cast, shape-only ops, and Shape/Size/Range/Concat on known
shapes); onnx's own folding lives in onnx.reference, which would need the model's inputs.
"""

from __future__ import annotations

import functools
import heapq
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np

from bncheck.backends.onnx.tensors import np_dtype, to_array
from bncheck.model import Dim

if TYPE_CHECKING:
    import onnx

#: the default ONNX operator domain, as exporters spell it.
ONNX_DOMAINS = ("", "ai.onnx")
#: ops whose output holds the same values as their (first) input, possibly reshaped or re-typed.
TRANSPARENT = frozenset({"Identity", "Cast", "Reshape", "Flatten", "Squeeze", "Unsqueeze"})
#: domains of QuantizeLinear / DequantizeLinear (onnxruntime's contrib copies too)
QUANT_DOMAINS = ("", "ai.onnx", "com.microsoft")
#: ops that keep values and layout (a tensor and its copy through them are the same data).
VALUE_PRESERVING = frozenset({"Identity", "Cast"})
#: most elements a ConstantOfShape with a constant shape is expanded to when read as a parameter
MAX_FILLED_ELEMENTS = 1 << 20


M = TypeVar("M")


def copied(message: M) -> M:
    """A detached copy of a protobuf message (a node, tensor or value info)."""
    copy = type(message)()
    copy.CopyFrom(message)  # type: ignore[attr-defined]
    return copy


def copy_messages(target: Any, messages: Iterable[Any]) -> None:
    """Append a copy of each of ``messages`` to the repeated message field ``target``, as ``target.extend``
    does: upb's extend merges each message into a new element, which takes about twice as long as a copy
    (benchmarks/HISTORY.md)."""
    add = target.add
    for message in messages:
        add().CopyFrom(message)


def is_repeated(descriptor: Any) -> bool:
    """Whether a protobuf field is repeated, under every protobuf onnx admits: releases before 6.31 have only
    ``label``, 7.x only ``is_repeated``."""
    repeated = getattr(descriptor, "is_repeated", None)
    if repeated is None:
        return bool(descriptor.label == descriptor.LABEL_REPEATED)
    return bool(repeated)


def copy_fields(source: Any, target: Any, skip: set[str]) -> None:
    """Copy every set field of a protobuf message but those named in ``skip`` (CopyFrom would copy the weights
    too)."""
    for descriptor, value in source.ListFields():
        if descriptor.name in skip:
            continue
        repeated = is_repeated(descriptor)
        if repeated and descriptor.message_type is not None:
            copy_messages(getattr(target, descriptor.name), value)
        elif repeated:
            getattr(target, descriptor.name).extend(value)
        elif descriptor.message_type is not None:
            getattr(target, descriptor.name).CopyFrom(value)
        else:
            setattr(target, descriptor.name, value)


@functools.cache  # thousands of tensors of a few types, and onnx's lookup builds a numpy dtype each time
def element_size(data_type: int) -> int | None:
    """Bytes per element of an ONNX tensor type (8 for strings: numpy's object pointers), None for a type numpy
    has no dtype for (UNDEFINED, unknown numbers)."""
    try:
        return int(np_dtype(data_type).itemsize)
    except (KeyError, TypeError, ValueError):
        return None


def tensor_nbytes(tensor: onnx.TensorProto) -> int:
    """Size of a tensor from its dims and element type, without touching its data (reading raw_data or asking
    for ByteSize would copy or walk the bytes: 25 ms on a ResNet-50); an element type numpy cannot size counts
    8 bytes an element."""
    count = 1
    for dim in tensor.dims:
        count *= dim
    size = element_size(tensor.data_type)
    return count * (8 if size is None else size)


def as_float_array(value: np.ndarray | None) -> np.ndarray | None:
    """Parameters as float numpy arrays: float32/float64 stay as stored, float16/bfloat16 widen to float32,
    integers to float64; anything else (strings) is unknown."""
    if value is None:
        return None
    arr = np.asarray(value)
    if arr.dtype in (np.float32, np.float64):
        return arr
    try:
        return arr.astype(np.float32 if arr.dtype.kind in "fV" else np.float64)
    except (TypeError, ValueError):
        return None


def topological_order(nodes: list[onnx.NodeProto]) -> list[int]:
    """Kahn's algorithm, stable in file order. ONNX requires sorted graphs; broken files are not."""
    produced_by: dict[str, int] = {}
    for idx, node in enumerate(nodes):
        for out in node.output:
            if out:
                produced_by[out] = idx
    reads = [node.input for node in nodes]
    # a sorted graph (most files) comes out of Kahn's algorithm below unchanged: checked in one pass
    if all(produced_by.get(name, -1) <= idx for idx, names in enumerate(reads) for name in names):
        return list(range(len(nodes)))
    indegree = [0] * len(nodes)
    users: list[list[int]] = [[] for _ in nodes]
    for idx, names in enumerate(reads):
        deps = {produced_by[i] for i in names if i in produced_by and produced_by[i] != idx}
        indegree[idx] = len(deps)
        for dep in deps:
            users[dep].append(idx)
    ready = [i for i, d in enumerate(indegree) if d == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        idx = heapq.heappop(ready)
        order.append(idx)
        for user in users[idx]:
            indegree[user] -= 1
            if indegree[user] == 0:
                heapq.heappush(ready, user)
    if len(order) < len(nodes):  # a cycle: keep the rest in file order rather than drop nodes
        seen = set(order)
        order.extend(i for i in range(len(nodes)) if i not in seen)
    return order


class GraphSource(Protocol):
    """What the index reads of a loaded model (the loader's handle provides it; no import of the loader here)."""

    @property
    def model(self) -> onnx.ModelProto: ...

    value_shapes: dict[str, tuple[Dim, ...]]
    value_types: dict[str, int]


class GraphIndex:
    """Producers, consumers and topological positions of one graph's nodes."""

    def __init__(
        self,
        handle: GraphSource,
        dequantized: bool = False,
        initializers: Mapping[str, onnx.TensorProto] | None = None,
    ) -> None:
        """``dequantized``: read fake quantization as the float values it rounds (:meth:`_dequantized_nodes`),
        for the walk's pattern matching; the nodes keep their positions and names. ``initializers``: those the
        graph reads, where they are not its own (a control-flow body's, with the enclosing scopes': not copied
        into a model of the body)."""
        from onnx import helper

        self._helper = helper
        model = handle.model
        graph = model.graph
        self.model = model
        self.shapes = handle.value_shapes
        self.types = handle.value_types
        self.opset = {(op.domain or ""): int(op.version) for op in model.opset_import}
        if "ai.onnx" in self.opset:
            self.opset.setdefault("", self.opset["ai.onnx"])
        self.initializers = (
            {init.name: init for init in graph.initializer} if initializers is None else dict(initializers)
        )
        self.graph_inputs = [i.name for i in graph.input if i.name not in self.initializers]
        self.graph_input_set = set(self.graph_inputs)
        self.graph_outputs = {o.name for o in graph.output}
        nodes = list(graph.node)
        self._index([nodes[i] for i in topological_order(nodes)])
        # the graph inputs' shapes and batch axes, once (dataflow asks at every reduction it judges)
        self.input_axes: tuple[list[Any], list[int | None]] | None = None
        # analyses of the whole graph that more than one matcher reads (dataflow's forms), made once
        self.derived: dict[str, Any] = {}
        if dequantized and any(node.op_type == "DequantizeLinear" for node in self.nodes):
            self._index(self._dequantized_nodes())

    def _index(self, nodes: list[onnx.NodeProto]) -> None:
        self.nodes = nodes
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = {}
        for idx, node in enumerate(self.nodes):
            for out in node.output:
                if out:
                    self.producer[out] = idx
            for inp in node.input:
                if inp:
                    self.consumers.setdefault(inp, []).append(idx)
        self._attrs: dict[int, dict[str, Any]] = {}
        self._schema_types: dict[tuple[str, str], dict[str, int]] = {}
        self._const: dict[str, np.ndarray | None] = {}

    def _dequantized_nodes(self) -> list[onnx.NodeProto]:
        """The nodes as if quantize_static's QDQ pairs, which interrupt a decomposed norm's chain between every
        two ops, were not there: a node reading a QuantizeLinear -> DequantizeLinear pair's output reads the
        float tensor the pair rounds, and a DequantizeLinear of stored values is an Identity of their float
        values (an epsilon, a gamma), kept as an initializer here. Positions and node names are kept: a
        bypassed pair stays as two nodes without inputs."""
        from onnx import numpy_helper

        nodes = list(self.nodes)
        rounded: dict[str, str] = {}  # a pair's output -> the tensor it rounds
        for idx, node in enumerate(self.nodes):
            if node.op_type != "DequantizeLinear" or node.domain not in QUANT_DOMAINS or not node.output:
                continue
            quantizer = self.produced_by(node_input(node, 0), "QuantizeLinear")
            # a pair only: a quantizer that an integer op also reads (QLinearConv) keeps its place
            if quantizer is not None and self.nodes[quantizer].input and self._dequantized_only(quantizer):
                source = self.nodes[quantizer].input[0]
                rounded[node.output[0]] = rounded.get(source, source)
                for bypassed in (quantizer, idx):
                    kept = self.nodes[bypassed]
                    nodes[bypassed] = self._helper.make_node(kept.op_type, [], list(kept.output), name=kept.name)
                continue
            value = self._dequantize(idx)
            if value is None:
                continue
            # under the stored tensor's own name where only this node reads it: the layer is named after its
            # weights (names.weight_prefix)
            stored = node_input(node, 0)
            if stored not in self.initializers or self.users(stored) != [idx]:
                stored = node.output[0] + ":dequantized"
            self.initializers[stored] = numpy_helper.from_array(value, stored)
            nodes[idx] = self._helper.make_node("Identity", [stored], [node.output[0]], name=node.name)
        if rounded:
            for idx, node in enumerate(nodes):
                if any(name in rounded for name in node.input):
                    copy = self._helper.make_node(
                        node.op_type,
                        [rounded.get(name, name) for name in node.input],
                        list(node.output),
                        name=node.name,
                        domain=node.domain,
                    )
                    copy.attribute.extend(node.attribute)
                    copy.metadata_props.extend(node.metadata_props)  # the dynamo exporter's module path
                    nodes[idx] = copy
        return nodes

    def _dequantized_only(self, idx: int) -> bool:
        """Whether DequantizeLinear nodes are all that read node ``idx``'s outputs."""
        return all(
            self.nodes[user].op_type == "DequantizeLinear" for out in self.nodes[idx].output for user in self.users(out)
        )

    def _dequantize(self, idx: int) -> np.ndarray | None:
        """A DequantizeLinear of stored values, computed: (x - zero_point) * scale, per tensor or along
        ``axis`` (by hand: onnx.reference would need a model around it); blocked scales are left unread."""
        node = self.nodes[idx]
        attrs = self.attrs(idx)
        x, scale = self.param(node_input(node, 0)), self.param(node_input(node, 1))
        point = self.param(node_input(node, 2)) if node_input(node, 2) else None
        if x is None or scale is None or attrs.get("block_size") or x.dtype.kind not in "iu":
            return None
        shift = np.zeros(1) if point is None else point.astype(np.float64)
        factor = scale.astype(np.float64)
        if factor.size > 1:  # one scale per slice along the axis
            axis = int(attrs.get("axis", 1))
            if factor.ndim != 1 or not -x.ndim <= axis < x.ndim or x.shape[axis] != factor.size:
                return None
            along = [1] * x.ndim
            along[axis] = factor.size
            factor = factor.reshape(along)
            shift = shift.reshape(along) if shift.size == factor.size else shift
        return ((x.astype(np.float64) - shift) * factor).astype(scale.dtype)

    # ------------------------------------------------------------------ structure

    def node_name(self, idx: int) -> str:
        node = self.nodes[idx]
        if node.name:
            return node.name
        for out in node.output:
            if out:
                return out
        return f"{node.op_type}_{idx}"

    def attrs(self, idx: int) -> dict[str, Any]:
        """The node's attributes by name. One stored with another type than its operator's schema declares
        (an epsilon written as a string, a training_mode as a float) is left out, so readers see the default:
        onnx.checker reports such a model, and the walk must still describe it."""
        cached = self._attrs.get(idx)
        if cached is None:
            node = self.nodes[idx]
            declared = self._attribute_types(node)
            cached = {}
            for attribute in node.attribute:
                if attribute.name in declared and attribute.type != declared[attribute.name]:
                    continue
                try:
                    cached[attribute.name] = self._helper.get_attribute_value(attribute)
                except (ValueError, TypeError):  # an attribute without a value onnx can decode
                    continue
            self._attrs[idx] = cached
        return cached

    def _attribute_types(self, node: onnx.NodeProto) -> dict[str, int]:
        """Attribute name -> AttributeProto type: the operator's schema at the model's opset, over its latest one
        (readers also look for attributes a later opset added, such as training_mode; {} if onnx has none)."""
        import onnx

        domain = "" if node.domain == "ai.onnx" else node.domain
        cached = self._schema_types.get((node.op_type, domain))
        if cached is not None:  # a graph repeats few operators, and each lookup crosses into onnx's C++
            return cached
        types: dict[str, int] = {}
        for version in (None, self.opset.get(domain, 1)):
            try:
                schema = (
                    onnx.defs.get_schema(node.op_type, domain)
                    if version is None
                    else onnx.defs.get_schema(node.op_type, version, domain)
                )
            except Exception:  # onnx.defs.SchemaError: unknown operator, or not defined at this opset
                continue
            # a pybind enum: int() works, the stub omits __int__
            types.update({name: int(attr.type) for name, attr in schema.attributes.items()})  # type: ignore[call-overload]
        self._schema_types[(node.op_type, domain)] = types
        return types

    def op(self, idx: int) -> str:
        return self.nodes[idx].op_type

    def produced_by(self, tensor: str, *ops: str) -> int | None:
        idx = self.producer.get(tensor)
        if idx is None or (ops and self.nodes[idx].op_type not in ops):
            return None
        return idx

    def users(self, tensor: str, *ops: str) -> list[int]:
        found = self.consumers.get(tensor, [])
        if not ops:
            return list(found)
        return [i for i in found if self.nodes[i].op_type in ops]

    def is_used(self, tensor: str) -> bool:
        return bool(tensor) and (tensor in self.graph_outputs or bool(self.consumers.get(tensor)))

    def shape(self, tensor: str) -> tuple[Dim, ...] | None:
        return self.shapes.get(tensor)

    def rank(self, tensor: str) -> int | None:
        shape = self.shapes.get(tensor)
        return None if shape is None else len(shape)

    def root(self, tensor: str) -> tuple[str, list[int]]:
        """Back through Identity/Cast to the tensor whose values these are, with the nodes passed."""
        passed: list[int] = []
        while True:
            idx = self.produced_by(tensor, *VALUE_PRESERVING)
            if idx is None or not self.nodes[idx].input:
                return tensor, passed
            passed.append(idx)
            tensor = self.nodes[idx].input[0]

    def same(self, a: str, b: str) -> bool:
        return a == b or self.root(a)[0] == self.root(b)[0]

    def aliases(self, tensor: str, depth: int = 5) -> dict[str, list[int]]:
        """Tensors holding ``tensor``'s values (forward through transparent ops), with the nodes passed; tf2onnx
        relays a [N, 1, 1, C] mean to NCHW by Unsqueeze, Reshape, Squeeze, Reshape."""
        found: dict[str, list[int]] = {tensor: []}
        frontier = [tensor]
        for _ in range(depth):
            nxt = []
            for t in frontier:
                for user in self.users(t, *TRANSPARENT):
                    node = self.nodes[user]
                    if node.input[0] != t or not node.output or not node.output[0]:
                        continue
                    out = node.output[0]
                    if out not in found:
                        found[out] = found[t] + [user]
                        nxt.append(out)
            frontier = nxt
        return found

    # ------------------------------------------------------------------ constants

    def stored_tensor(self, tensor: str) -> Any:
        """The TensorProto stored as ``tensor``: its initializer, or the value of the Constant node that writes it
        (older exporters keep weights so); None for anything else."""
        init = self.initializers.get(tensor)
        if init is not None:
            return init
        idx = self.producer.get(tensor)
        if idx is None or self.nodes[idx].op_type != "Constant" or self.nodes[idx].domain not in ("", "ai.onnx"):
            return None
        return self.attrs(idx).get("value")

    def param(self, tensor: str) -> np.ndarray | None:
        """The stored value of ``tensor`` if it is a constant reachable through Identity/Constant/Cast and
        shape-only ops; None when it is a graph input or computed (unknown, never guessed)."""
        if not tensor:
            return None
        if tensor in self._const:
            return self._const[tensor]
        self._const[tensor] = None  # cycle guard
        value = self._param(tensor)
        self._const[tensor] = value
        return value

    def _param(self, tensor: str) -> np.ndarray | None:
        init = self.initializers.get(tensor)
        if init is not None:
            if init.data_location == init.EXTERNAL:  # left in its file (external data): unknown here, never read
                return None
            try:
                return to_array(init)
            except Exception:
                return None
        idx = self.producer.get(tensor)
        if idx is None:
            return None
        node = self.nodes[idx]
        op = node.op_type
        attrs = self.attrs(idx)
        if op == "Constant" and node.domain in ("", "ai.onnx"):
            for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
                if key in attrs:
                    val = attrs[key]
                    if key == "value":
                        try:
                            return to_array(val)
                        except Exception:
                            return None
                    dtype = np.float32 if key.startswith("value_float") else np.int64
                    return np.asarray(val, dtype=dtype)
            return None
        if op == "ConstantOfShape" and node.domain in ("", "ai.onnx") and node.input:
            return self._filled(self.param(node.input[0]), attrs.get("value"))
        if op in ("CastLike", "Expand") and node.domain in ("", "ai.onnx") and len(node.input) == 2:
            # torch's dynamo exporter unoptimized: a GroupNorm's ones CastLike'd to x's type, Expanded to the groups
            return self._cast_like(node) if op == "CastLike" else self._expanded(node)
        if op not in TRANSPARENT or not node.input:
            return None
        src = self.param(node.input[0])
        if src is None:
            return None
        if op == "Identity":
            return src
        if op == "Cast":
            try:
                return src.astype(np_dtype(int(attrs["to"])))
            except Exception:
                return None
        if op == "Flatten":
            axis = int(attrs.get("axis", 1))
            axis = axis + src.ndim if axis < 0 else axis
            lead = int(np.prod(src.shape[:axis])) if axis else 1
            return src.reshape(lead, -1)
        shape = self.shape(tensor)
        dims = [d for d in shape if isinstance(d, int)] if shape is not None else []
        if shape is not None and len(dims) == len(shape):
            try:
                return src.reshape(dims)
            except ValueError:
                return None
        return src  # reshape target unknown: the values are still the stored ones

    def _cast_like(self, node: onnx.NodeProto) -> np.ndarray | None:
        """CastLike(constant, t): the constant in t's element type (as stored where that type is unknown)."""
        src = self.param(node.input[0])
        elem = self.types.get(node.input[1])
        dtype = None if src is None or elem is None else np_dtype(elem)
        return src if dtype is None else src.astype(dtype)  # type: ignore[union-attr]

    def _expanded(self, node: onnx.NodeProto) -> np.ndarray | None:
        """Expand(constant, constant shape), broadcast (None past MAX_FILLED_ELEMENTS)."""
        src, shape = self.param(node.input[0]), self.ints(node.input[1])
        if src is None or shape is None or shape.ndim != 1 or np.any(shape < 0):
            return None
        try:
            dims = np.broadcast_shapes(src.shape, tuple(int(d) for d in shape))
        except ValueError:
            return None
        if int(np.prod(dims, dtype=np.int64)) > MAX_FILLED_ELEMENTS:
            return None
        return np.broadcast_to(src, dims).copy()

    def _filled(self, shape: np.ndarray | None, value: Any) -> np.ndarray | None:
        """ConstantOfShape's output for a constant ``shape``: ``value`` (a one-element tensor; float 0 when
        absent) repeated; None for a shape that is not a constant 1-D integer one, or too large."""
        if shape is None or shape.ndim != 1 or shape.dtype.kind not in "iu" or np.any(shape < 0):
            return None
        dims = tuple(int(d) for d in shape)
        if int(np.prod(dims, dtype=np.int64)) > MAX_FILLED_ELEMENTS:
            return None
        try:
            fill = to_array(value).reshape(-1) if value is not None else np.zeros(1, np.float32)
        except Exception:
            return None
        return np.full(dims, fill[0], dtype=fill.dtype) if fill.size == 1 else None

    def stored_source(self, tensor: str) -> str:
        """The constant a parameter operand was reshaped/cast from, so it is reported as stored (a
        LayerNorm scale flattened to [1, D] by an exporter is still the [D] or [H, W] array in the file)."""
        for _ in range(8):
            idx = self.producer.get(tensor)
            op = None if idx is None else self.nodes[idx].op_type
            if idx is None or (op not in TRANSPARENT and op != "CastLike") or not self.nodes[idx].input:
                return tensor
            src = self.nodes[idx].input[0]
            if self.param(src) is None:
                return tensor
            tensor = src
        return tensor

    def ints(self, tensor: str) -> np.ndarray | None:
        """An integer tensor's value (axes, shapes), folding Shape/Size/Range/Concat over known shapes."""
        value = self.param(tensor)
        if value is not None:
            return np.asarray(value).astype(np.int64)
        idx = self.producer.get(tensor)
        if idx is None:
            return None
        node = self.nodes[idx]
        op = node.op_type
        attrs = self.attrs(idx)
        if op in {"Identity", "Cast"}:
            return self.ints(node.input[0])
        if op == "Shape":
            shape = self.shape(node.input[0])
            if shape is None:
                return None
            part = shape[slice(attrs.get("start", 0), attrs.get("end"))]
            if all(isinstance(d, int) for d in part):
                return np.asarray(part, dtype=np.int64)
            return None
        if op == "Size":
            src = self.produced_by(node.input[0], "Shape")
            if src is not None and not self.attrs(src):
                rank = self.rank(self.nodes[src].input[0])
                return None if rank is None else np.asarray(rank, dtype=np.int64)
            shape = self.shape(node.input[0])
            if shape is not None and all(isinstance(d, int) for d in shape):
                return np.asarray(math.prod(int(d) for d in shape if isinstance(d, int)), dtype=np.int64)
            return None
        if op == "Range" and len(node.input) == 3:
            parts = [self.ints(t) for t in node.input]
            if any(p is None or p.size != 1 for p in parts):
                return None
            start, limit, delta = (int(p.ravel()[0]) for p in parts)  # type: ignore[union-attr]
            if delta == 0:
                return None
            return np.arange(start, limit, delta, dtype=np.int64)
        if op == "Concat":
            parts = [self.ints(t) for t in node.input]
            if any(p is None for p in parts):
                return None
            return np.concatenate([np.atleast_1d(p) for p in parts])  # type: ignore[arg-type]
        if op in ("Add", "Sub", "Mul") and len(node.input) == 2:
            a, b = self.ints(node.input[0]), self.ints(node.input[1])
            if a is None or b is None:
                return None
            return {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply}[op](a, b)
        if op == "Neg":
            negated = self.ints(node.input[0])
            return None if negated is None else -negated
        if op in ("Unsqueeze", "Squeeze", "Reshape"):
            values = self.ints(node.input[0])
            return None if values is None else values.ravel()
        return None

    def scalar(self, tensor: str) -> float | None:
        """A constant holding one number (a scalar or any shape of size 1), as a Python float."""
        value = self.param(tensor)
        if value is None:
            return None
        arr = np.asarray(value)
        if arr.size != 1:
            return None
        try:
            return float(arr.ravel()[0])
        except (TypeError, ValueError):
            return None

    def data_free(self, tensor: str) -> bool:
        """True when ``tensor`` is computed from initializers and Constant nodes only: the same whatever the
        inputs. A graph input, an outer scope's tensor (a subgraph's reads) or a random op make it data. Searched
        upwards one input at a time, stopping at the first that is data (a layer's input reaches a graph input
        along its first inputs), and remembered for the index."""
        memo: dict[str, bool] = self.derived.setdefault("data_free", {})
        stack = [tensor]
        while stack:
            t = stack[-1]
            if t in memo:
                stack.pop()
                continue
            idx = self.producer.get(t)
            node = None if idx is None else self.nodes[idx]
            if t in self.initializers or (node is not None and node.op_type == "Constant"):
                memo[t] = True
            elif node is None or not node.input or node.op_type in _RANDOM_OPS or node.op_type in _SUBGRAPH_OPS:
                memo[t] = False  # a graph input, an outer scope's name, drawn afresh, or a body that reads data
            else:
                inputs = [name for name in node.input if name]
                if any(memo.get(name) is False for name in inputs):
                    memo[t] = False
                else:
                    pending = next((name for name in inputs if name not in memo), None)
                    if pending is not None:
                        stack.append(pending)
                        continue
                    memo[t] = True
            stack.pop()
        return memo[tensor]

    def is_param_like(self, tensor: str) -> bool:
        """True when ``tensor`` does not depend on the data: a constant, or a graph input (a weight fed at
        run time) reached through shape-only ops. Used to tell an affine Mul/Add from other arithmetic."""
        seen = 0
        while seen < 8:
            if tensor in self.initializers or tensor in self.graph_input_set:
                return True
            idx = self.producer.get(tensor)
            if idx is None:
                return False
            node = self.nodes[idx]
            if node.op_type == "Constant":
                return True
            if node.op_type not in TRANSPARENT and node.op_type not in ("Expand", "CastLike"):
                return False
            tensor = node.input[0]
            seen += 1
        return False


#: ops with bodies (If, Loop, Scan), which read outer tensors by name beside their inputs
_SUBGRAPH_OPS = frozenset({"If", "Loop", "Scan"})
#: ops whose output is drawn afresh at every run, from no input or from a shape only
_RANDOM_OPS = frozenset(
    {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}
)


def shape_dim(g: GraphIndex, tensor: str, axis: int | None) -> int | None:
    shape = g.shape(tensor)
    if shape is None or axis is None or not -len(shape) <= axis < len(shape):
        return None
    dim = shape[axis]
    return dim if isinstance(dim, int) else None


def has_subgraphs(node: onnx.NodeProto) -> bool:
    """Whether ``node`` carries a graph attribute (If/Loop/Scan bodies), which may read outer tensors by name."""
    return any(attr.type in (5, 10) for attr in node.attribute)  # AttributeProto.GRAPH, GRAPHS


def bodies(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The If/Loop/Scan bodies ``node`` holds (its GRAPH and GRAPHS attributes)."""
    found: list[onnx.GraphProto] = []
    for attr in node.attribute:
        if attr.type == 5:  # AttributeProto.GRAPH
            found.append(attr.g)
        elif attr.type == 10:  # GRAPHS
            found.extend(attr.graphs)
    return found


def nested_bodies(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """Every If/Loop/Scan body inside ``graph``, however deep."""
    for node in graph.node:
        for body in bodies(node):
            yield body
            yield from nested_bodies(body)


def node_reads(node: onnx.NodeProto) -> Iterator[str]:
    """Every tensor a node reads: its inputs and the outer-scope names its subgraphs (If/Loop/Scan) use."""
    for name in node.input:
        if name:
            yield name
    yield from outer_reads(node)


#: AttributeProto types that may hold a subgraph: GRAPH, GRAPHS, and UNDEFINED (IR 1 wrote no type)
_MAY_HOLD_GRAPHS = (5, 10, 0)


def outer_reads(node: onnx.NodeProto) -> Iterator[str]:
    """The outer-scope names a node's subgraphs (If/Loop/Scan bodies) read: what it reads besides its inputs."""
    for attr in node.attribute:
        if attr.type not in _MAY_HOLD_GRAPHS:
            continue  # most nodes' attributes are numbers: no field lookups for them
        subgraphs = [attr.g] if attr.HasField("g") else list(attr.graphs)
        for sub in subgraphs:
            local = {t.name for t in sub.initializer} | {i.name for i in sub.input}
            for inner in sub.node:
                local.update(o for o in inner.output if o)
            for inner in sub.node:
                for name in node_reads(inner):
                    if name not in local:
                        yield name


def upstream_nodes(
    nodes: Sequence[onnx.NodeProto],
    outputs: Iterable[str],
    reads: Callable[[onnx.NodeProto], Iterable[str]] = node_reads,
) -> set[int]:
    """Indices of the ``nodes`` that ``outputs`` depend on, following what each node ``reads``."""
    producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    return walk_upstream(producer, lambda i: reads(nodes[i]), outputs)


def walk_upstream(
    producer: Mapping[str, int], reads: Callable[[int], Iterable[str]], outputs: Iterable[str]
) -> set[int]:
    """Indices of the nodes ``outputs`` depend on, given which node writes each tensor and what node ``i``
    reads (a caller that indexed the graph once walks it without indexing it again)."""
    found: set[int] = set()
    stack = [producer[name] for name in outputs if name in producer]
    while stack:
        i = stack.pop()
        if i not in found:
            found.add(i)
            stack.extend(producer[name] for name in reads(i) if name in producer)
    return found


#: ops whose onnxruntime CPU kernels pack their constant weight (input 1, MLAS's GEMM layout) into a copy of
#: their own when the session is built
PREPACKING_OPS = frozenset({"Gemm", "MatMul"})


def _packed_weights(graph: onnx.GraphProto) -> tuple[dict[str, list[Any]], dict[str, int]]:
    """The constant weights onnxruntime packs when it builds a session of ``graph``: each prepacking node's
    input 1, read directly or through Identity nodes, with the nodes that read it, and the bytes of each."""
    nodes = list(graph.node)
    identity = {node.output[0]: node.input[0] for node in nodes if node.op_type == "Identity" and node.input}
    readers: dict[str, list[Any]] = {}
    for node in nodes:
        if node.op_type in PREPACKING_OPS and len(node.input) > 1:
            name = node.input[1]
            for _ in range(len(identity)):  # a chain of Identity nodes (bounded: a cycle is malformed)
                if name not in identity:
                    break
                name = identity[name]
            readers.setdefault(name, []).append(node)
    if not readers:
        return {}, {}
    sizes = {t.name: tensor_nbytes(t) for t in graph.initializer if t.name in readers}
    for node in nodes:
        if node.op_type == "Constant" and node.output and node.output[0] in readers:
            sizes.update((node.output[0], tensor_nbytes(a.t)) for a in node.attribute if a.name == "value")
    return readers, sizes


def unpaid_packing_bytes(graph: onnx.GraphProto, shapes: Mapping[str, tuple[Dim, ...]]) -> int:
    """Bytes onnxruntime would pack when building a session of ``graph`` that a probe's few dozen samples
    cannot pay back: the copies beyond the first of a weight that several prepacking nodes read (each is packed
    for its node alone: an unrolled recurrence, layers sharing weights), and the one copy of a weight whose
    every reader multiplies a single row per sample (its input ``[batch, K]`` in ``shapes``, the batch a graph
    input's symbolic first dim): packing reorders a weight for reuse across many rows, and a matrix-vector
    product per sample has few."""
    readers, sizes = _packed_weights(graph)
    batch = {dims[0] for v in graph.input if (dims := shapes.get(v.name)) and isinstance(dims[0], str)}

    def one_row(node: Any) -> bool:
        dims = shapes.get(node.input[0])
        return dims is not None and len(dims) == 2 and dims[0] in batch

    unpaid = 0
    for name, size in sizes.items():
        unpaid += size * (len(readers[name]) - 1)
        if all(one_row(node) for node in readers[name]):
            unpaid += size
    return unpaid


def node_input(node, i: int) -> str:
    return node.input[i] if len(node.input) > i else ""


def norm_axis(axis: int, rank: int | None) -> int | None:
    if axis >= 0:
        return axis
    return None if rank is None else axis + rank


def other_input(node, tensor: str) -> str | None:
    if len(node.input) != 2:
        return None
    if node.input[0] == tensor:
        return node.input[1]
    if node.input[1] == tensor:
        return node.input[0]
    return None
