"""Normalization layers inside If/Loop/Scan bodies and model-local functions the loader could not inline.

The walk matches the main graph. The norm layers inside a body are found here as the walk finds the main
graph's, on an index of the body with the initializers of the scopes around it (which its nodes may read by
name), the constants the main graph computes and it reads, the values a Loop carries unchanged, and the shapes
onnx inferred: their stored parameters and attributes serve the static checks, and the probe measures what of
them the main graph holds. The norms of a function are only counted, for the walk's warning.
"""

from __future__ import annotations

from collections import ChainMap, Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from bncheck.backends.onnx.dataflow import dataflow_norms
from bncheck.backends.onnx.graph import GraphIndex, bodies
from bncheck.backends.onnx.names import readable_names
from bncheck.backends.onnx.patterns import decomposed
from bncheck.backends.onnx.tensors import from_array
from bncheck.model import Dim, NormLayer

if TYPE_CHECKING:
    import onnx

Scope = Mapping[str, "onnx.TensorProto"]
Handlers = Mapping[str, tuple[tuple[str, ...], Callable[[GraphIndex, int], tuple[NormLayer, list[int]]]]]
SpanFinder = Callable[[GraphIndex], list[tuple[int, NormLayer, list[int]]]]

#: the ops that start some layer's pattern besides the norm ops (``_NORM_OPS``): a chain's reduction, an affine
#: batch norm's 1 / sqrt
_MAY_HOLD_NORM = frozenset(
    {"ReduceMean", "ReduceSum", "ReduceSumSquare", "GlobalAveragePool", "Sqrt", "Rsqrt", "Reciprocal", "Div", "Pow"}
)
_NORM_OPS = ("Normalization", "GroupNorm")
#: the largest computed constant copied into a body's index: a norm's parameters are per channel
_COPIED_CONSTANT_BYTES = 1 << 20

#: the note of a layer read from a body (NormLayer.extra["in_body"] names the main-graph node holding it)
IN_BODY_NOTE = (
    "inside {holder} (a control-flow body): its stored parameters are checked; the probe measures only those of its "
    "tensors the main graph holds"
)


class Bodies:
    """The bodies of a main graph's nodes, however deep, each with the node holding it and the initializers of
    the scopes around it; found once, each body's index made once, on first use."""

    def __init__(self, g: GraphIndex) -> None:
        self.g = g
        self.found: list[tuple[int, onnx.GraphProto, Scope]] = []
        stack: list[tuple[int, onnx.GraphProto, Scope]] = [
            (i, body, g.initializers) for i, node in enumerate(g.nodes) for body in bodies(node)
        ]
        top = {id(graph) for _, graph, _ in stack}  # the bodies of main-graph nodes, whose inputs they bind
        self._top: set[int] = set()
        while stack:
            holder, graph, outer = stack.pop()
            if id(graph) in top:
                self._top.add(len(self.found))
            self.found.append((holder, graph, outer))
            inner = [body for node in graph.node for body in bodies(node)]
            if inner:
                scope = ChainMap({init.name: init for init in graph.initializer}, dict(outer))
                stack.extend((holder, body, scope) for body in inner)
        self._indexes: dict[int, GraphIndex] = {}

    def holder(self, k: int) -> str:
        """The main-graph node holding body ``k``, as the notes name it ("Loop '/Loop'")."""
        holder = self.found[k][0]
        return f"{self.g.nodes[holder].op_type} {self.g.node_name(holder)!r}"

    def index(self, k: int) -> GraphIndex:
        if k not in self._indexes:
            holder, graph, outer = self.found[k]
            carried = _loop_constants(self.g, self.g.nodes[holder], graph) if k in self._top else {}
            self._indexes[k] = _body_index(self.g, graph, outer, carried)
        return self._indexes[k]


def body_layers(found: Bodies, spans: SpanFinder) -> list[tuple[int, NormLayer]]:
    """Every norm layer of every body, as the walk finds them in the main graph (``spans``: ops, chains, batch
    norms left as their affine map), with the main-graph index of the node holding it; named as the walk names
    layers, on its body's index."""
    layers: list[tuple[int, NormLayer]] = []
    for k, (holder, graph, _) in enumerate(found.found):
        if not any(node.op_type in _MAY_HOLD_NORM or node.op_type.endswith(_NORM_OPS) for node in graph.node):
            continue  # no op that starts any layer's pattern: no index (silero_vad's STFT bodies)
        index, where = found.index(k), found.holder(k)
        read = sorted(((first, layer) for first, layer, _ in spans(index)), key=lambda item: item[0])
        for layer in readable_names(index, read):
            notes = (*layer.notes, IN_BODY_NOTE.format(holder=where))
            layers.append((holder, replace(layer, notes=notes, extra={**layer.extra, "in_body": where})))
    return layers


def hidden_norm_ops(found: Bodies, handlers: Handlers) -> tuple[int, list[str]]:
    """Norm layers the walk does not read: norm ops of a domain it does not know inside bodies, and everything
    in the model-local functions called; and the main-graph nodes and functions that hold them ("Loop 'name'")."""
    counts: Counter[str] = Counter()
    for k, (_, graph, _) in enumerate(found.found):
        counts[found.holder(k)] += sum(node.op_type in handlers and not _handled(node, handlers) for node in graph.node)
    # the functions load could not inline (functions.inline_calls), each once, with those they call in turn
    g = found.g
    functions = {(f.domain, f.name): f for f in g.model.functions}
    called = {(n.domain, n.op_type) for n in g.nodes} & set(functions)
    reached: set[tuple[str, str]] = set()
    while called:
        key = called.pop()
        reached.add(key)
        function = functions[key]
        counts[f"function {key[1]!r}"] += sum(node.op_type in handlers for node in function.node)
        if _reduces(function.node):
            counts[f"function {key[1]!r}"] += _chains_in(_index(function.node, {}, function.opset_import, {}, {}))
        called |= {(n.domain, n.op_type) for n in function.node} & set(functions) - reached
    return sum(counts.values()), sorted(holder for holder, count in counts.items() if count)


def _handled(node: onnx.NodeProto, handlers: Handlers) -> bool:
    return node.op_type in handlers and node.domain in handlers[node.op_type][0]


def _reduces(nodes: Sequence[onnx.NodeProto]) -> bool:
    """Whether a chain can start among ``nodes`` (the matchers begin at a reduction)."""
    return any(node.op_type.startswith("Reduce") or node.op_type == "GlobalAveragePool" for node in nodes)


def _loop_constants(g: GraphIndex, loop: onnx.NodeProto, body: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """The Loop body's carried values that every iteration passes on unchanged (tf2onnx carries a while loop's
    captured variables so: a Keras layer's weights), as the constants the Loop starts them from."""
    if loop.op_type != "Loop" or loop.domain not in ("", "ai.onnx"):
        return {}
    passed = {node.output[0]: node.input[0] for node in body.node if node.op_type == "Identity" and node.output}
    found: dict[str, onnx.TensorProto] = {}
    # body inputs: iteration, condition, carried...; outputs: condition, carried..., scan outputs
    for start, carried, out in zip(loop.input[2:], body.input[2:], body.output[1:]):
        if carried.name in (out.name, passed.get(out.name)):
            value = _constant(g, start)
            if value is not None:
                found[carried.name] = value
    return found


def _constant(g: GraphIndex, name: str) -> onnx.TensorProto | None:
    """The main graph's constant ``name`` as a tensor: its initializer itself (not copied: tf2onnx carries every
    captured weight through a loop), else a small one the main graph computes (through Identity, Cast...)."""
    init = g.initializers.get(name)
    if init is not None:
        return init
    value = g.param(name)
    return from_array(value, name) if value is not None and value.nbytes <= _COPIED_CONSTANT_BYTES else None


def _body_index(
    g: GraphIndex,
    graph: onnx.GraphProto,
    outer: Mapping[str, onnx.TensorProto],
    carried: Mapping[str, onnx.TensorProto],
) -> GraphIndex:
    written = {out for node in graph.node for out in node.output}
    visible = {name: outer[name] for node in graph.node for name in node.input if name in outer}
    visible.update((init.name, init) for init in graph.initializer)
    visible.update(carried)
    # the constants the main graph computes and the body reads, as initializers: torch's exporter writes a
    # parameter equal to another (a never-trained layer's) as an Identity of that one
    for node in graph.node:
        for name in node.input:
            if name and name not in written and name not in visible and (value := _constant(g, name)) is not None:
                visible[name] = value
    return _index(graph.node, visible, g.model.opset_import, g.shapes, g.types)


def _chains_in(index: GraphIndex) -> int:
    """The chains the walk's matchers find on ``index``."""
    used: set[int] = set()
    found = decomposed(index, used)
    for _, chain in found:
        used.update(chain)
    return len(found) + len(dataflow_norms(index, used))


def _index(
    nodes: Sequence[onnx.NodeProto],
    initializers: Mapping[str, onnx.TensorProto],
    opsets: Sequence[onnx.OperatorSetIdProto],
    shapes: dict[str, tuple[Dim, ...]],
    types: dict[str, int],
) -> GraphIndex:
    """A body or function as a graph of its own, with the initializers its nodes read."""
    return GraphIndex(_Body(nodes, opsets, shapes, types), initializers=initializers)


class _Body:
    """A control-flow body or function as the model GraphIndex reads, its nodes and initializers not copied (a
    ModelProto of them would copy silero_vad's If branches, which hold its weights, at every load); the shapes
    the loader kept, the main graph's and the bodies' (names are unique across scopes)."""

    def __init__(
        self,
        nodes: Sequence[onnx.NodeProto],
        opsets: Sequence[onnx.OperatorSetIdProto],
        shapes: dict[str, tuple[Dim, ...]],
        types: dict[str, int],
    ) -> None:
        graph = SimpleNamespace(node=nodes, initializer=(), input=(), output=(), name="body")
        self.model: Any = SimpleNamespace(graph=graph, opset_import=opsets, functions=(), producer_name="")
        self.value_shapes = shapes
        self.value_types = types
