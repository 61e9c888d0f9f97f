"""fix's cut passes from kept activations: each pass runs only the nodes between the last pass's layers and
its own, not the model from its inputs.

A cut pass measures the frontier: the layers with no undecided layer upstream. Every layer upstream of
their inputs is decided and its repair already written into the model, so the tensors computed on the way
to those inputs keep their values for every later pass. :class:`Frontier` keeps, for each batch of the
data, the ones that a node not yet run still reads; the next pass feeds them to a model of the nodes in
between (a segment). A chain of k drifting layers then costs about one forward pass of the data instead of
k passes of growing depth (docs/architecture.md, "fix").

The segment's outputs are the layers' inputs themselves, so their statistics are computed here in numpy,
in float64, from the whole tensors (the probe's reference form, :func:`bncheck.probe_plan.tensor_stats`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from bncheck import budget
from bncheck.backends.onnx.cancel import run_options
from bncheck.backends.onnx.graph import copied, has_subgraphs, node_reads, walk_upstream
from bncheck.backends.onnx.instrument import _opset, is_train_batch_norm, stub
from bncheck.backends.onnx.run import _without_extremes, new_session, prepacks, session_options
from bncheck.backends.onnx.runtime_errors import runtime_message
from bncheck.backends.onnx.scratch import Scratch
from bncheck.backends.onnx.tensors import element_type
from bncheck.model import NormLayer, TensorStats
from bncheck.probe_data import release_mapped
from bncheck.probe_plan import first_samples, joined_samples, kept_rows, merge_stats

if TYPE_CHECKING:
    import onnx

    from bncheck.backends.onnx.load import OnnxHandle

#: the kept tensors may take at most this share of the memory budget (bncheck.budget); past it the repair
#: measures the rest of its passes from the model's inputs, as without them
BUDGET_SHARE = 0.25
#: float64 bytes input_stats converts at once
CHUNK_BYTES = 8 << 20


#: what a let-go batch value becomes (its tensor is dropped after the pass)
_SPENT = np.empty(0, np.float32)


class Unsupported(Exception):
    """The frontier cannot serve this pass (a layer or graph it does not handle, too many bytes kept):
    the caller measures it the usual way."""


def supports(model: onnx.ModelProto, layers: Iterable[NormLayer]) -> bool:
    """Whether a cut pass over ``layers`` can run from kept tensors: BatchNormalization layers only (their
    input is one tensor with the batch on axis 0 and the channels on axis 1), in a graph without model-local
    functions (a segment would have to carry them)."""
    if model.functions:
        return False
    return all(
        layer.op_type == "BatchNormalization" and layer.batch_axis == 0 and layer.channel_axis == 1 for layer in layers
    )


def input_stats(x: np.ndarray, real: int, fed: int | None = None) -> TensorStats:
    """Per-sample, per-channel mean and mean of squares of an [N, C, ...] tensor in float64, over its first
    ``real`` samples (a fixed batch's repeats left out). min, max and zeros are not counted: fix reads the
    moments and the NaN/Inf count only. Why not tensor_stats: it makes two float64 copies of the whole batch
    (the tensor and its square, 411 MB for 32 maps of 64 x 112 x 112); this converts a few samples at a time."""
    n, c = int(x.shape[0]), int(x.shape[1])
    flat = x.reshape(n, c, -1)
    length = flat.shape[2]
    mean = np.zeros((n, c))
    sq = np.zeros((n, c))
    nonfinite = np.zeros(c, np.int64)
    # samples converted together: one sample a time cost more in numpy's calls than in its loops on small maps
    step = max(1, CHUNK_BYTES // max(8 * c * length, 1))
    with np.errstate(invalid="ignore", over="ignore"):
        for start in range(0, n if length else 0, step):
            part = flat[start : start + step].astype(np.float64)
            mean[start : start + step] = part.mean(axis=2)
            sq[start : start + step] = np.einsum("ncl,ncl->nc", part, part) / length
        finite = np.asarray(np.isfinite(mean).all(axis=1) & np.isfinite(sq).all(axis=1))
        for i in np.flatnonzero(~finite[: kept_rows(n, real, fed)]):
            nonfinite += (~np.isfinite(flat[i])).sum(axis=1)
    return first_samples(_without_extremes(n, n * length, mean, sq, nonfinite), real, fed)


def _read_once(x: np.ndarray, real: int, fed: int) -> TensorStats:
    """input_stats of one batch; where it is a mapped .npy's (a layer reading a graph input), its pages leave
    the process after it (the page cache keeps them)."""
    found = input_stats(x, real, fed)
    release_mapped({"batch": x})
    return found


class Frontier:
    """The tensors that fix's cut passes so far computed and later nodes still read, per batch of the data.

    ``batches`` are the calibration batches (feeds, real samples), the graph inputs' values. Valid for one
    repair: its edits must only ever touch the layers being decided (fix's rule), never a node upstream of
    a kept tensor.
    """

    def __init__(self, handle: OnnxHandle, batches: list[tuple[dict[str, np.ndarray], int]]) -> None:
        self.handle = handle
        self.real = [real for _, real in batches]
        # samples fed per batch, a fixed batch's repeats included (the data hold their samples on axis 0)
        self.rows = [len(next(iter(feeds.values()))) for feeds, _ in batches]
        self.values: dict[str, list[np.ndarray]] = {
            name: [feeds[name] for feeds, _ in batches] for name in batches[0][0]
        }
        self.computed: set[str] = set(self.values)  # tensors with known values (kept now or already read)
        self._graph: _Structure | None = None
        self.limit = int(budget.budget() * BUDGET_SHARE)
        self._stubs: dict[str, Any] | None = None
        self._folder: str | None = None
        self._tmp: Scratch | None = None
        self.segments = 0  # sessions run (a pass whose inputs are all kept runs none)
        self.nodes_run = 0  # nodes of those sessions: each node of the model at most once over a repair

    def nbytes(self) -> int:
        return sum(a.nbytes for arrays in self.values.values() for a in arrays)

    def measure(self, layers: list[NormLayer]) -> dict[str, TensorStats]:
        """The input statistics of ``layers`` (a frontier: nothing undecided upstream of them) over the data,
        the model as edited so far; raises :class:`Unsupported` when this pass cannot run from here."""
        self._advance([layer.input for layer in layers])
        return {
            layer.name: merge_stats(
                _read_once(a, real, fed) for a, real, fed in zip(self.values[layer.input], self.real, self.rows)
            )
            for layer in layers
        }

    def outputs(self, names: list[str]) -> dict[str, np.ndarray]:
        """The tensors ``names`` (the model's outputs, once every layer is decided) over the data's samples,
        the repeats of a fixed batch left out; raises :class:`Unsupported` as :meth:`measure`."""
        self._advance(names)
        if any(name not in self.values for name in names):
            raise Unsupported("an output is not computed by the graph's nodes")
        # samples first; an output without an axis per sample is left out
        joined = {name: joined_samples(self.values[name], self.rows, self.real) for name in names}
        return {name: value for name, value in joined.items() if value is not None}

    def _advance(self, wanted: list[str]) -> None:
        """Run the nodes between the kept tensors and ``wanted``, keep what later nodes read (and ``wanted``)."""
        model = self.handle.model
        nodes = list(model.graph.node)
        if self._graph is None or self._graph.count != len(nodes):
            self._graph = _Structure(nodes, self.computed)
        graph = self._graph
        targets = list(dict.fromkeys(wanted))
        missing = [t for t in targets if t not in self.values]
        unknown = [t for t in missing if t not in graph.producer]
        if unknown:
            raise Unsupported(f"{unknown[0]!r} is neither computed nor kept")
        # the walk stops at kept tensors; a read neither kept nor stored is refused by _run
        ordered = sorted(graph.upstream(missing, self.values))  # graph order is topological (an ONNX requirement)
        opset = _opset(model)
        if any(is_train_batch_norm(nodes[i], opset) for i in ordered):
            # the measuring engine computes it by the spec's decomposition; onnxruntime's own kernel deviates
            # from the spec for some parameters (docs/architecture.md, train-mode BatchNormalization)
            raise Unsupported("a train-mode BatchNormalization is left upstream")
        if any(has_subgraphs(nodes[i]) for i in ordered):
            # If/Loop/Scan bodies read outer tensors by name and may hold norm layers of their own: a node
            # downstream of every layer (a decoder loop) never joins a segment; one upstream stops them here
            raise Unsupported("a node with subgraphs is upstream")
        written = [out for i in ordered for out in graph.writes[i]]
        self.computed.update(written)
        graph.ran(ordered)
        # what the nodes not run yet read: those tensors are kept, all others dropped
        wanted_now = set(targets)

        def kept(name: str) -> bool:
            return graph.read_later(name) or name in wanted_now

        fetch = [name for name in dict.fromkeys(written) if kept(name)]
        spent = [name for name in self.values if not kept(name)]
        if ordered:
            self._run(model, [nodes[i] for i in ordered], fetch, spent)
        for name in spent:
            del self.values[name]

    def _run(self, model: onnx.ModelProto, nodes: list[onnx.NodeProto], fetch: list[str], spent: list[str]) -> None:
        """Run ``nodes`` on every batch, from the kept tensors they read, and keep ``fetch``; a batch's values
        of ``spent`` (read by these nodes last) are let go once it ran, so that the old frontier and the new
        are not both whole in memory."""
        import onnxruntime as ort
        from onnx import helper

        produced = {out for node in nodes for out in node.output if out}
        # an initializer that a graph input of the same name overrides is fed, as in the model
        stored = {t.name for t in model.graph.initializer} - set(self.values)
        reads = [name for node in nodes for name in node_reads(node) if name not in produced and name not in stored]
        sources = [name for name in dict.fromkeys(reads) if name]
        missing = [name for name in sources if name not in self.values]
        if missing:
            raise Unsupported(f"{missing[0]!r} is read but not kept")
        self._within_limit(0)
        types = self.handle.value_types
        if any(not types.get(name) for name in fetch):
            raise Unsupported("a tensor to keep has no known type")
        graph = helper.make_graph(
            nodes,  # make_graph copies them into the segment
            "segment",
            [_declared(name, self.values[name]) for name in sources],
            [helper.make_tensor_value_info(name, int(types[name]), None) for name in fetch],
            initializer=self._initializers({name for node in nodes for name in node_reads(node)} & stored),
        )
        segment = helper.make_model(graph, opset_imports=list(model.opset_import))
        segment.ir_version = max(int(model.ir_version), 4)  # IR < 4 would want the weights listed as inputs
        level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options = session_options(level, self._folder or "", prepacks(segment.graph, self.handle.value_shapes))
        # no arena: a session per pass, each with its own arena beside the kept tensors, raised the peak
        options.enable_cpu_mem_arena = False
        kept: dict[str, list[np.ndarray]] = {name: [] for name in fetch}
        try:
            session = new_session(segment, options)
            del segment, graph
            self.segments += 1
            self.nodes_run += len(nodes)
            for b in range(len(self.real)):
                feeds = {name: self.values[name][b] for name in sources}
                outputs = session.run(fetch, feeds, run_options())
                release_mapped(feeds)  # a graph input's batch from a mapped .npy: its pages, read, leave the process
                for name in spent:
                    self.values[name][b] = _SPENT
                for name, value in zip(fetch, outputs):
                    kept[name].append(value)
                self._within_limit(sum(a.nbytes for arrays in kept.values() for a in arrays))
        except Unsupported:
            raise
        except Exception as exc:  # the passes from the model's inputs run it, and say what fails there
            raise Unsupported(f"a segment of the graph does not run: {runtime_message(exc)}") from exc
        self.values.update(kept)

    def _within_limit(self, more: int) -> None:
        if self.nbytes() + more > self.limit:
            raise Unsupported(
                f"the kept tensors would exceed {budget.format_size(self.limit)} ({BUDGET_SHARE:.0%} of the memory budget)"
            )

    def _initializers(self, names: set[str]) -> list[Any]:
        """The segment's weights: weight-less stubs pointing at the same bytes as the probe's (the model file
        itself, or a copy written once), inline copies of what fix edited."""
        if self._stubs is None:
            self._tmp = Scratch(self.handle.size_bytes)
            skeleton, self._folder = stub(self.handle, self._tmp)
            self._stubs = {t.name: t for t in skeleton.graph.initializer}
        current = {t.name: t for t in self.handle.model.graph.initializer if t.name in names}
        return [
            copied(tensor) if name in self.handle.edited or name not in self._stubs else self._stubs[name]
            for name, tensor in current.items()
        ]

    def close(self) -> None:
        self.values.clear()
        if self._tmp is not None:
            self._tmp.remove()
            self._tmp = None


class _Structure:
    """What each node writes and reads as Python tuples, which node writes each tensor, and how many nodes not
    run yet read each tensor, read once per repair: reading every node's protobuf fields at each pass made a
    repair of a deep graph quadratic in its size. Valid while the node count holds (:meth:`Frontier._advance`
    checks it): the edits made while tensors are kept set statistics or switch a layer to inference; a
    moments chain is measured, and replaced, only by passes from the model's inputs, which let the kept
    tensors go first."""

    def __init__(self, nodes: list[onnx.NodeProto], computed: set[str]) -> None:
        self.count = len(nodes)
        self.writes = [tuple(out for out in node.output if out) for node in nodes]
        self.reads = [tuple(node_reads(node)) for node in nodes]
        self.producer = {out: i for i, outs in enumerate(self.writes) for out in outs}
        self.done = {i for i, outs in enumerate(self.writes) if all(out in computed for out in outs)}
        self.readers: dict[str, int] = {}
        for i, names in enumerate(self.reads):
            if i not in self.done:
                for name in names:
                    self.readers[name] = self.readers.get(name, 0) + 1

    def upstream(self, outputs: list[str], kept: Mapping[str, Any]) -> set[int]:
        """The nodes ``outputs`` depend on, the walk stopping at ``kept`` tensors."""
        return walk_upstream(self.producer, lambda i: (n for n in self.reads[i] if n not in kept), outputs)

    def ran(self, indices: list[int]) -> None:
        """Count the nodes ``indices`` as run: what they read is no longer kept for them."""
        for i in indices:
            if i not in self.done:
                self.done.add(i)
                for name in self.reads[i]:
                    self.readers[name] -= 1

    def read_later(self, name: str) -> bool:
        """Whether a node not run yet reads ``name``."""
        return self.readers.get(name, 0) > 0


def _declared(name: str, arrays: list[np.ndarray]) -> Any:
    """A graph input for a kept tensor: its type, each dim fixed where every batch has the same size."""
    from onnx import helper

    first = arrays[0]
    dims: list[int | str] = [
        int(size) if all(a.shape[axis] == size for a in arrays) else f"{name}_dim{axis}"
        for axis, size in enumerate(first.shape)
    ]
    return helper.make_tensor_value_info(name, element_type(first.dtype), dims)
