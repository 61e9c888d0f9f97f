"""A lower bound of the memory onnxruntime needs to run a model at one batch size, from the static shapes.

onnxruntime holds at least the fed inputs, and while a node runs, the tensors it reads and writes. So the
estimate is the bytes of the graph inputs at that batch plus, over all nodes, the most bytes one node reads
and writes, counting only tensors onnxruntime allocates (not initializers, Constant outputs or graph
inputs). Dims come from onnx shape inference (the handle's ``value_shapes``); symbolic dims are bound from
the fed inputs' shapes, and a tensor with a dim still unknown counts 0, so the figure never exceeds what
the run needs (a false refusal is worse than a late one).

Three refinements keep it a lower bound of what onnxruntime actually allocates, whose optimizer fuses
nodes: a node may write its output in place of an input (Relu, Add, Reshape ...), so outside the ops that
never do, a node counts max(read, written) rather than their sum; a Pad that onnxruntime folds into the
next Conv or pool never materializes, so that consumer reads the Pad's input instead; and in an Add, an
operand that only a Conv writes for it never materializes either (the Conv+Add fusion adds into the other
operand), so that Add does not read it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from bncheck import budget
from bncheck.backends.onnx.graph import element_size
from bncheck.backends.onnx.load import concrete_shapes
from bncheck.model import Dim, InputSpec, ProbeSettings
from bncheck.probe_data import probe_feeds

#: ops whose onnxruntime CPU kernels never write an output into an input's buffer: read + written both live.
_NOT_IN_PLACE = frozenset(
    {
        "Conv",
        "ConvTranspose",
        "ConvInteger",
        "QLinearConv",
        "MatMul",
        "MatMulInteger",
        "QLinearMatMul",
        "Gemm",
        "MaxPool",
        "AveragePool",
        "LpPool",
        "Concat",
        "Resize",
        "Upsample",
    }
)
#: consumers onnxruntime's Pad fusion folds a preceding Pad into.
_PAD_FUSED = frozenset({"Conv", "MaxPool", "AveragePool"})


#: shapes onnx inferred with the inputs at the sizes a probe feeds, and the batch size they were inferred at
ProbeShapes = tuple[Mapping[str, tuple[Dim, ...]], int]


@dataclass(frozen=True)
class Estimate:
    """Bytes onnxruntime needs at least: ``inputs`` fed, plus ``node_bytes`` at the busiest ``node``."""

    inputs: int
    node_bytes: int
    node: str | None  # "'name' (OpType)"; None when no node's tensors have a known size
    # the shapes inferred with the inputs concrete (see check), None when the file's shapes sufficed
    concrete: ProbeShapes | None = field(default=None, compare=False, repr=False)

    @property
    def busiest(self) -> int | None:
        """The busiest node's bytes (a lower bound), None when no node's tensors have a known size."""
        return self.node_bytes if self.node is not None else None

    @property
    def total(self) -> int:
        return self.inputs + self.node_bytes


def _itemsize(elem_type: int | None) -> int:
    # types numpy has no dtype for: unknown, counted 0 (strings count numpy's 8-byte object pointers)
    size = element_size(elem_type) if elem_type else None
    return 0 if size is None else size


def _bind(declared: Iterable[tuple[Dim, ...] | None], fed: Iterable[tuple[int, ...]]) -> dict[str, int]:
    """Symbolic dim name -> size, from the inputs' declared dims and the shapes fed; a name fed two sizes
    keeps the smaller (lower bound)."""
    symbols: dict[str, int] = {}
    for dims, shape in zip(declared, fed):
        if dims is None or len(dims) != len(shape):
            continue
        for dim, size in zip(dims, shape):
            if isinstance(dim, str):
                symbols[dim] = min(symbols.get(dim, size), size)
    return symbols


def _symbols(shapes: Mapping[str, tuple[Dim, ...]], feeds: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """The symbolic dims the fed inputs bind (:func:`_bind`)."""
    names = [name for name in feeds if name in shapes]
    return _bind((shapes[n] for n in names), (feeds[n] for n in names))


def estimate(
    graph: Any,
    shapes: Mapping[str, tuple[Dim, ...]],
    types: Mapping[str, int],
    feeds: Mapping[str, tuple[int, ...]],
) -> Estimate:
    """The lower bound (see the module docstring) for ``graph`` run on inputs of the concrete ``feeds``
    shapes (input name -> shape as fed, model axis order)."""
    symbols = _symbols(shapes, feeds)
    # each node's fields read once: every protobuf read builds a new Python object (thousands of nodes)
    nodes = [(node.op_type, list(node.input), list(node.output), node.name) for node in graph.node]
    constant = {t.name for t in graph.initializer} | {"", *feeds}
    constant |= {out for op, _, outs, _ in nodes if op == "Constant" for out in outs}

    @functools.cache  # a tensor is read by one node and written by another: sized once
    def size(name: str) -> int:
        dims = shapes.get(name)
        if name in constant or dims is None:
            return 0
        bound = [d if isinstance(d, int) else symbols.get(d) if isinstance(d, str) else None for d in dims]
        if any(s is None or s < 0 for s in bound):
            return 0
        return math.prod(bound) * _itemsize(types.get(name))  # type: ignore[arg-type]

    pad_input = {outs[0]: ins[0] for op, ins, outs, _ in nodes if op == "Pad" and outs}
    readers: dict[str, int] = {}
    for _, ins, _, _ in nodes:
        for name in set(ins):
            readers[name] = readers.get(name, 0) + 1
    # outputs of a Conv (and of the BatchNormalization folded into it) read by one node only: fusable
    conv_only_summed: set[str] = set()
    for op, ins, outs, _ in nodes:  # topological order (an ONNX requirement)
        if not outs or readers.get(outs[0]) != 1:
            continue
        if op == "Conv" or (op == "BatchNormalization" and len(outs) == 1 and ins[0] in conv_only_summed):
            conv_only_summed.add(outs[0])
    best, where = 0, None
    for op, ins, outs, node_name in nodes:
        read = list(dict.fromkeys(ins))
        if op in _PAD_FUSED:
            read = [pad_input.get(name, name) for name in read]
        if op in ("Add", "Sum"):
            fused = [name for name in read if name in conv_only_summed]
            if fused:
                read.remove(max(fused, key=size))
        read_bytes = sum(size(name) for name in read)
        written = sum(size(name) for name in dict.fromkeys(outs))
        live = read_bytes + written if op in _NOT_IN_PLACE else max(read_bytes, written)
        if live > best:
            best, where = live, f"{node_name or (outs[0] if outs else '?')!r} ({op})"
    fed = 0
    for name, shape in feeds.items():
        fed += math.prod(shape) * _itemsize(types.get(name))
    return Estimate(fed, best, where)


def open_dims(shapes: Mapping[str, tuple[Dim, ...]], feeds: Mapping[str, tuple[int, ...]], batch: int) -> bool:
    """Whether a fed input leaves a dim open that is not its batch (two symbolic or unknown dims, or one fed
    another size than ``batch``, or an unknown rank): then only concrete inputs tell the intermediate sizes."""
    for name, shape in feeds.items():
        declared = shapes.get(name)
        if declared is None or len(declared) != len(shape):
            return True
        open_sizes = [size for dim, size in zip(declared, shape) if not isinstance(dim, int)]
        if len(open_sizes) > 1 or any(size != batch for size in open_sizes):
            return True
    return False


def unsized(graph: Any, shapes: Mapping[str, tuple[Dim, ...]], feeds: Mapping[str, tuple[int, ...]]) -> bool:
    """Whether a node writes a tensor whose size the shapes leave open at these feeds: no shape, or a dim no
    fed input binds (a Reshape to dims computed from the batch, as jax2tf and tf2onnx write). The estimate
    counts such a tensor 0."""
    symbols = _symbols(shapes, feeds)
    for node in graph.node:
        if node.op_type == "Constant":
            continue
        for out in node.output:
            dims = shapes.get(out) if out else ()
            if dims is None or any(not isinstance(d, int) and d not in symbols for d in dims):
                return True
    return False


def check(
    model: Any,
    shapes: Mapping[str, tuple[Dim, ...]],
    types: Mapping[str, int],
    feeds: Mapping[str, tuple[int, ...]],
    batch: int,
    remedy: str,
    skeleton: Any = None,
) -> Estimate:
    """Refuse (budget.OverBudgetError, exit 2) a run of ``model`` (a ModelProto) whose lower bound exceeds
    the memory budget; ``remedy`` says which option lowers the batch size. Returns the estimate.

    Where an input leaves dims open (:func:`open_dims`), or a node's output size is open at these feeds
    (:func:`unsized`), the shapes are inferred again with the inputs concrete (one more shape inference, on
    the weight-less skeleton); without it a detector with open H and W would count a few kB of activations
    at any batch size, and basic-pitch's model 0.7 GB at batch 4096, where onnxruntime needs over 20 GB.
    ``skeleton``: the model's skeleton for that inference, if one is built already (see concrete_shapes)."""
    concrete: ProbeShapes | None = None
    inputs_open = open_dims(shapes, feeds, batch)
    if inputs_open or unsized(model.graph, shapes, feeds):
        inferred, inferred_types = concrete_shapes(model, feeds, skeleton)
        shapes, types = {**shapes, **inferred}, {**types, **inferred_types}
        # kept for the instrumentation only where the inputs' dims were open: else it keeps the file's shapes
        concrete = (inferred, batch) if inputs_open else None
    found = replace(estimate(model.graph, shapes, types, feeds), concrete=concrete)
    parts = [f"inputs {budget.format_size(found.inputs)}"]
    if found.node is not None:
        parts.append(f"{budget.format_size(found.node_bytes)} at node {found.node}")
    budget.check(
        found.total,
        f"onnxruntime at batch size {batch} ({' + '.join(parts)})",
        remedy=remedy,
        lower_bound=True,
    )
    return found


def check_probe(
    model: Any,
    shapes: Mapping[str, tuple[Dim, ...]],
    types: Mapping[str, int],
    inputs: list[InputSpec],
    settings: ProbeSettings,
    batch: int,
    skeleton: Any = None,
) -> Estimate:
    """Refuse, before any session runs it, a probe batch of ``batch`` of ``model`` that cannot fit the memory
    budget; else the estimate (its busiest node's activations, and the shapes inferred at the probe's input
    sizes where the file leaves dims open)."""
    feeds = probe_feeds(inputs, batch, settings.input_shapes, settings.data)
    return check(model, shapes, types, feeds, batch, "give smaller --batch-sizes", skeleton)
