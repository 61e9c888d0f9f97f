"""fix's cut passes for Keras files: after the first pass over the data, each pass runs only the layers between
the tensors the passes before kept and the inputs of the next layers to decide, as a Keras sub-model over
those tensors, not the model from its inputs (the ONNX backend's frontier.py, docs/architecture.md, "fix").

A cut pass measures the frontier: the layers still to decide with none of them upstream. Every layer upstream
of their inputs is decided and its statistics assigned, so the tensors computed on the way keep their values
for every later pass; :class:`Frontier` keeps, for each batch of the data, the ones that a layer not yet run
still reads on the way to a layer still to decide.

It serves a model whose layers to decide are called once each, by the model itself or by a model it calls
once on one tensor (:func:`frontier_for`); the caller runs its passes from the model's inputs for any other
model, or once the kept tensors would take more than a share of the memory budget.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import numpy as np

from bncheck import budget
from bncheck.backends.keras.probe import channel_axis_of
from bncheck.model import NormLayer, TensorStats
from bncheck.probe_plan import first_samples, tensor_stats

#: the kept tensors may take at most this share of the memory budget (bncheck.budget), as in the ONNX backend
BUDGET_SHARE = 0.25


class Unsupported(Exception):
    """The frontier cannot serve this pass: the caller measures it from the model's inputs."""


class Done(Unsupported):
    """A nested model's frontier has no layer of its model left to decide: the rest need a frontier of their
    own (frontier_for)."""


class _Graph:
    """The model's own call nodes, read from its outputs back before any sub-model exists (a sub-model adds
    nodes of its own to the layers it calls). Keras has no public API for a model's nodes: a KerasTensor's
    ``_keras_history`` names the node that made it, as Keras's own functional code reads it."""

    def __init__(self, model: Any) -> None:
        outputs = list(getattr(model, "outputs", None) or [])
        self.inputs = list(getattr(model, "inputs", None) or [])
        if not outputs or not self.inputs:
            raise Unsupported("the model has no symbolic inputs and outputs")
        self.tensors: dict[int, Any] = {}
        self.producer: dict[int, Any] = {}  # tensor id -> node (model inputs have none)
        self.readers: dict[int, list[Any]] = {}  # tensor id -> nodes reading it
        self.nodes_of: dict[int, list[Any]] = {}  # layer id -> its nodes in this model
        seen: set[int] = set()
        stack = list(outputs)
        inputs = {id(t) for t in self.inputs}
        while stack:
            tensor = stack.pop()
            self.tensors[id(tensor)] = tensor
            if id(tensor) in inputs:
                continue
            history = getattr(tensor, "_keras_history", None)
            if history is None:
                raise Unsupported("a tensor of the model has no history")
            node = history.operation._inbound_nodes[history.node_index]
            self.producer[id(tensor)] = node
            if id(node) in seen:
                continue
            seen.add(id(node))
            self.nodes_of.setdefault(id(node.operation), []).append(node)
            for source in node.input_tensors:
                self.readers.setdefault(id(source), []).append(node)
                stack.append(source)

    def upstream(self, tensors: Iterable[Any], stop: set[int]) -> tuple[list[Any], list[Any]]:
        """(nodes computing ``tensors`` from the tensors in ``stop``, the stop tensors they read)."""
        nodes: dict[int, Any] = {}
        reached: dict[int, Any] = {}
        stack = list(tensors)
        while stack:
            tensor = stack.pop()
            if id(tensor) in stop:
                reached[id(tensor)] = tensor
                continue
            node = self.producer.get(id(tensor))
            if node is None:
                raise Unsupported("a model input is not among the kept tensors")
            if id(node) not in nodes:
                nodes[id(node)] = node
                stack.extend(node.input_tensors)
        return list(nodes.values()), list(reached.values())


class Frontier:
    """The kept tensors of a fix over ``batches`` of the data (``feeds``, real samples) and the cut passes
    that run from them, over the loaded model or, given ``model`` and its ``inputs`` (per input, per batch),
    over a model it calls (:func:`frontier_for`)."""

    def __init__(
        self,
        runner: Any,
        batches: list[tuple[dict[str, np.ndarray], int]],
        model: Any = None,
        inputs: list[list[np.ndarray]] | None = None,
    ) -> None:
        model = runner.model if model is None else model
        self.nested = model is not runner.model
        if isinstance(getattr(model, "input", None), dict):
            raise Unsupported("the model takes a dict of inputs")
        self.runner = runner
        self.graph = _Graph(model)
        if inputs is None:
            if len(self.graph.inputs) != len(runner.input_names):
                raise Unsupported("the model's inputs do not match the file's")
            inputs = [[feeds[name] for feeds, _ in batches] for name in runner.input_names]
        self.real = [real for _, real in batches]
        # the data's own arrays (or the nested model's inputs, computed once): model inputs stay kept
        self.kept: dict[int, list[np.ndarray]] = {id(t): values for t, values in zip(self.graph.inputs, inputs)}
        self.inputs = set(self.kept)
        self.ran: set[int] = set()  # ids of the nodes cut passes have run
        self.limit = int(budget.budget() * BUDGET_SHARE)
        self.segment_nodes = 0
        self.above: dict[str, set[str]] = {}  # layer name -> the measured layers upstream of it
        self.named = {id(layer): name for name, layer in runner.layers.items()}
        # keras builds a sub-model over intermediate tensors by recording the calls again on the layers (they
        # would pile up, a set per segment) and, where the model's own inputs are among them, on those inputs
        # too, which breaks the model's get_config ("could not find node key"): each build is undone on the
        # model once made
        self.calls = [(op, len(op._inbound_nodes), len(op._outbound_nodes)) for op in _operations(runner.model)]
        self.history = [(tensor, tensor._keras_history) for tensor in self.graph.tensors.values()]

    def node(self, norm: NormLayer) -> Any:
        """The one node calling ``norm``'s live layer in this model, with one input tensor."""
        nodes = self.graph.nodes_of.get(id(self.runner.layers[norm.name]), [])
        if len(nodes) != 1 or len(nodes[0].input_tensors) != 1:
            raise Unsupported(f"{norm.name} is not called once on one tensor by the model itself")
        return nodes[0]

    def serves(self, norm: NormLayer) -> bool:
        """Whether ``norm`` is a layer of this frontier's model (a nested model's frontier serves its own)."""
        return id(self.runner.layers[norm.name]) in self.graph.nodes_of

    def _own(self, undecided: list[NormLayer]) -> list[NormLayer]:
        """The layers of ``undecided`` this frontier measures: all of them, or a nested model's own."""
        return [norm for norm in undecided if self.serves(norm)] if self.nested else undecided

    def first(self, undecided: list[NormLayer]) -> list[NormLayer]:
        """The layers of ``undecided`` with none of them upstream. A nested model's frontier takes its own
        layers (every other one is below the model: frontier_for); with none left it raises Done."""
        undecided = self._own(undecided)
        if not undecided:
            raise Done("the nested model's layers are decided")
        names = {norm.name for norm in undecided}
        front = [norm for norm in undecided if not self._above(norm) & names]
        if not front:  # a cycle through the layers: keras's graphs have none, and the caller's loop would not end
            raise Unsupported("every layer to decide has another upstream")
        return front

    def _above(self, norm: NormLayer) -> set[str]:
        """The names of the measured layers upstream of ``norm`` in the whole graph (read once a layer)."""
        if norm.name not in self.above:
            nodes, _ = self.graph.upstream(self.node(norm).input_tensors, self.inputs)
            self.above[norm.name] = {self.named[id(n.operation)] for n in nodes if id(n.operation) in self.named}
        return self.above[norm.name]

    def measure(self, front: list[NormLayer], undecided: list[NormLayer]) -> dict[str, list[TensorStats]]:
        """Per batch, the statistics of the inputs of ``front`` (samples past a batch's real ones left out),
        computed from the kept tensors; keeps what the layers of ``undecided`` still need."""
        undecided = self._own(undecided)
        targets = [self.node(norm).input_tensors[0] for norm in front]
        nodes, sources = self.graph.upstream(targets, set(self.kept))
        # every tensor the segment makes that a node not yet run reads on the way to a layer still to decide
        need = self._needed(undecided, {id(n) for n in nodes})
        made = [t for n in nodes for t in n.outputs if id(t) in self.graph.tensors]
        keep = [t for t in made if any(id(r) in need for r in self.graph.readers.get(id(t), []))]
        wanted = {id(t): t for t in [*targets, *keep] if id(t) not in self.kept}
        outputs = list(wanted.values())
        sub = self._segment(sources, outputs) if outputs else None
        new: dict[int, list[np.ndarray]] = {id(t): [] for t in outputs}
        found: dict[str, list[TensorStats]] = {norm.name: [] for norm in front}
        for i, real in enumerate(self.real):
            if sub is not None:
                values = self._run(sub, [self.kept[id(t)][i] for t in sources])
                for tensor, value in zip(outputs, values):
                    new[id(tensor)].append(value)
                if i == 0:
                    self._check_bytes(new, keep)
            for norm, tensor in zip(front, targets):
                x = self.kept[id(tensor)][i] if id(tensor) in self.kept else new[id(tensor)][i]
                axis = channel_axis_of(norm, self.runner.layers[norm.name], x.ndim)
                found[norm.name].append(first_samples(tensor_stats(x, axis), real))
        self.ran.update(id(n) for n in nodes)
        self.segment_nodes += len(nodes)
        for key, values in new.items():
            self.kept[key] = values
        self._let_go(undecided, front)
        return found

    def values_of(self, tensor: Any) -> list[np.ndarray]:
        """``tensor``'s values per batch, computed from the kept tensors (held against the limit)."""
        nodes, sources = self.graph.upstream([tensor], set(self.kept))
        sub = self._segment(sources, [tensor])
        values = []
        for i in range(len(self.real)):
            values.append(self._run(sub, [self.kept[id(t)][i] for t in sources])[0])
            if i == 0 and values[0].nbytes * len(self.real) > self.limit:
                raise Unsupported(f"the nested model's input would exceed {budget.format_size(self.limit)}")
        self.segment_nodes += len(nodes)
        return values

    def _needed(self, undecided: list[NormLayer], running: set[int]) -> set[int]:
        """Ids of the nodes not yet run (nor run by this segment) that lead to a layer of ``undecided``, itself
        included."""
        need: set[int] = set()
        stack = [self.node(norm) for norm in undecided]
        while stack:
            node = stack.pop()
            if id(node) in need or id(node) in self.ran or id(node) in running:
                continue
            need.add(id(node))
            for source in node.input_tensors:
                producer = self.graph.producer.get(id(source))
                if producer is not None:
                    stack.append(producer)
        return need

    def _let_go(self, undecided: list[NormLayer], front: list[NormLayer]) -> None:
        """Drop the kept tensors no layer still to decide needs (model inputs stay: they are the data)."""
        names = {norm.name for norm in front}
        rest = [norm for norm in undecided if norm.name not in names]
        need = self._needed(rest, set()) if rest else set()
        for key in list(self.kept):
            if key in self.inputs:
                continue
            if not any(id(r) in need for r in self.graph.readers.get(key, [])):
                del self.kept[key]

    def _check_bytes(self, new: dict[int, list[np.ndarray]], keep: list[Any]) -> None:
        """After the first batch: the kept tensors' bytes over all batches, against the limit."""
        batches = len(self.real)
        kept = {id(t) for t in keep}
        adding = sum(values[0].nbytes for key, values in new.items() if key in kept) * batches
        free = set() if self.nested else self.inputs  # the data's own arrays; a nested model's input was computed
        holding = sum(sum(v.nbytes for v in values) for key, values in self.kept.items() if key not in free)
        if adding + holding > self.limit:
            raise Unsupported(
                f"the kept tensors would exceed {budget.format_size(self.limit)} "
                f"({BUDGET_SHARE:.0%} of the memory budget)"
            )

    def _segment(self, sources: list[Any], outputs: list[Any]) -> Any:
        capture = self.runner.capture
        kept, capture.skip = capture.skip, set(self.runner.layers)  # keras calls the layers on symbolic tensors
        try:
            return self.runner.keras.Model(sources, outputs)
        except Exception as exc:  # keras refuses a graph it cannot cut there (ValueError and others)
            raise Unsupported(f"keras could not build the segment ({type(exc).__name__})") from None
        finally:
            capture.skip = kept
            for op, inbound, outbound in self.calls:
                del op._inbound_nodes[inbound:]
                del op._outbound_nodes[outbound:]
            for tensor, history in self.history:
                tensor._keras_history = history

    def _run(self, sub: Any, values: list[np.ndarray]) -> list[np.ndarray]:
        capture = self.runner.capture
        kept, capture.skip = capture.skip, set(self.runner.layers)  # the segment's own layers: no statistics
        convert = self.runner.keras.ops.convert_to_numpy
        try:
            # NaN/Inf are measured and reported; numpy's warnings would litter stderr (as in the probe's runs)
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = sub(values if len(values) > 1 else values[0], training=False)
        except Exception as exc:  # any failure: the caller's passes from the inputs report it as the probe does
            raise Unsupported(f"keras failed to run the segment ({type(exc).__name__})") from None
        finally:
            capture.skip = kept
        items = list(result) if isinstance(result, (list, tuple)) else [result]
        return [v if isinstance(v, np.ndarray) else np.asarray(convert(v)) for v in items]


def frontier_for(runner: Any, batches: list[tuple[dict[str, np.ndarray], int]], undecided: list[NormLayer]) -> Frontier:
    """A frontier for the passes over ``undecided``: over the loaded model where the first of them is its
    own layer, else over the nested model holding it (a base model called once on one tensor, as in transfer
    learning), whose input is computed once from the data where no layer still to decide is upstream of it."""
    top = Frontier(runner, batches)
    first = undecided[0]
    if top.serves(first):
        return top
    parts = first.name.split("/")  # bncheck's path of a layer in a nested model (probe.find_layers)
    holder = next((layer for layer in runner.model.layers if layer.name == parts[0]), None)
    nodes = top.graph.nodes_of.get(id(holder), [])
    if holder is None or len(parts) != 2 or len(nodes) != 1 or len(nodes[0].input_tensors) != 1:
        raise Unsupported(f"{first.name} is not in a model the loaded one calls once on one tensor")
    source = nodes[0].input_tensors[0]
    above, _ = top.graph.upstream([source], top.inputs)
    names = {norm.name for norm in undecided}
    if any(top.named.get(id(node.operation)) in names for node in above):
        raise Unsupported(f"a layer to decide is upstream of {holder.name}")
    values = top.kept.get(id(source))
    if values is None:
        values = top.values_of(source)
    nested = Frontier(runner, batches, holder, [values])
    if not nested.serves(first):  # not on the nested model's way to its outputs: no frontier would take it
        raise Unsupported(f"{first.name} is not computed by {holder.name}")
    return nested


def _operations(model: Any) -> list[Any]:
    """Every layer of ``model``, nested models' included, with the model itself (Keras's own walk,
    ``_flatten_layers``, is private; probe.find_layers walks the same way but for the norm layers by path)."""
    found: dict[int, Any] = {}
    stack = [model]
    while stack:
        op = stack.pop()
        if id(op) in found or not hasattr(op, "_inbound_nodes"):
            continue
        found[id(op)] = op
        stack.extend(getattr(op, "layers", None) or [])
    return list(found.values())
