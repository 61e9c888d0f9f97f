"""The ONNX backend: safe loading (onnx_load), the static walk (onnx_walk), the probe (onnx_probe)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from bncheck.backends.base import Backend, BackendError, ProbeSettings
from bncheck.model import Dim, InputSpec, ModelView, ProbeResult

if TYPE_CHECKING:
    from bncheck.fix_result import FixOutcome, FixRequest

#: `fix` keeps a model of up to this size loaded through its probe; larger ones are re-read from the file.
KEEP_WEIGHTS_BYTES = 1 << 30


class OnnxBackend(Backend):
    """ONNX files: read without executing anything; probes run in onnxruntime (see onnx_probe)."""

    format = "onnx"

    def load(self, path: str, *, weights: bool = True) -> ModelView:
        from bncheck.backends.onnx.load import load_onnx
        from bncheck.backends.onnx.walk import walk_all

        handle = load_onnx(path, weights=weights)
        layers, walk_notes, batch_ops, relaxed_ops, broken = walk_all(handle)
        assert handle.info is not None  # load_onnx always sets it
        return ModelView(
            info=handle.info,
            layers=layers,
            inputs=graph_inputs(handle),
            notes=list(handle.notes) + walk_notes,
            handle=handle,
            batch_ops=batch_ops,
            relaxed_batch_ops=relaxed_ops,
            broken_weights=broken,
            output_shapes={value.name: handle.value_shapes.get(value.name) for value in handle.model.graph.output},
            pending_sha256=handle.pending_sha256,
        )

    def probe(self, view: ModelView, settings: ProbeSettings) -> list[ProbeResult]:
        from bncheck.backends.onnx.run import quiet_onnxruntime, run_probe

        quiet_onnxruntime()
        try:
            return [run_probe(view, settings, release_weights=not view.handle.keep_weights)]
        except UnicodeDecodeError as exc:  # a string field protobuf cannot decode, met while copying the model
            raise BackendError(f"{view.info.path}: not a valid ONNX model: text that is not UTF-8 ({exc})") from exc

    def check_fix(self, view: ModelView, request: FixRequest) -> None:
        from bncheck.backends.onnx.fix import precheck

        precheck(view, request)
        # fix probes the original, then edits the same loaded model: keep its weights through the probe (one
        # read of the file) unless holding them twice would cost too much memory
        view.handle.keep_weights = view.handle.size_bytes <= KEEP_WEIGHTS_BYTES
        if request.data is not None:  # the probe's dry run of the repair (BN003's output effect) keeps its passes
            from bncheck.backends.onnx.replay import PassLog

            view.handle.fix_passes = PassLog()

    def fix(self, view: ModelView, request: FixRequest) -> FixOutcome:
        from bncheck.backends.onnx.fix import fix_onnx
        from bncheck.backends.onnx.run import quiet_onnxruntime

        quiet_onnxruntime()
        return fix_onnx(view, request)

    def input_files(self, path: str) -> list[str]:
        from bncheck.backends.onnx.load import input_files

        return input_files(path)

    def import_modules(self, command: str) -> None:
        from bncheck.backends.onnx.quick_import import import_onnx

        import_onnx()  # only ever called in a process bncheck owns (backends.frozen_imports)
        from bncheck.backends.onnx import walk  # noqa: F401

        if command != "inspect":
            import onnxruntime  # noqa: F401

            from bncheck.backends.onnx import run  # noqa: F401
        if command == "fix":
            from bncheck import fixing  # noqa: F401
            from bncheck.backends.onnx import fix  # noqa: F401


def graph_inputs(handle) -> list[InputSpec]:
    """The graph inputs the probe feeds per sample: declared inputs that are neither initializers nor
    only a norm's parameters."""
    from bncheck.backends.onnx.probe_copy import parameter_inputs
    from bncheck.backends.onnx.tensors import np_dtype

    graph = handle.model.graph
    stored = {init.name for init in graph.initializer}
    stored |= set(parameter_inputs(graph))  # fed as fixed tensors by the probe, not batched (probe_copy)
    values = [value for value in graph.input if value.name not in stored]
    shapes = [handle.value_shapes.get(value.name) for value in values]
    outputs = [handle.value_shapes.get(value.name) for value in graph.output]
    specs = []
    axes = input_batch_axes(graph.node, [v.name for v in values], shapes, outputs, handle.value_shapes.get)
    for value, shape, axis in zip(values, shapes, axes):
        elem = value.type.tensor_type.elem_type if value.type.HasField("tensor_type") else 0
        try:
            dtype = np_dtype(elem).name if elem else "unknown"
        except (KeyError, ValueError, TypeError):
            dtype = "unknown"
        fill, made_up = None, False
        if axis is None and dtype[:3] in ("int", "uin"):
            made_up = _read_as_axis(graph, value.name)
            fill = 0.0 if made_up else _compared_constant(graph, value.name)
        specs.append(InputSpec(value.name, shape, dtype, batch_axis=axis, fill=fill, fill_made_up=made_up))
    return specs


def input_batch_axes(
    nodes: Iterable[Any],
    names: Sequence[str],
    shapes: list[tuple[Dim, ...] | None],
    outputs: Sequence[tuple[Dim, ...] | None],
    shape_of: Any,
) -> list[int | None]:
    """:func:`batch_axes` of the graph inputs ``names`` (their ``shapes``), with what the graph's ``nodes`` tell of
    them: the RNN states and sequences they are, and the data the convolutions and norm ops see (``shape_of``: a
    tensor name -> its shape or None)."""
    nodes = list(nodes)
    states, sequences = recurrent_states(nodes), recurrent_sequences(nodes)
    recurrent = [name in states for name in names]
    firsts = sample_leading_dims(nodes, shape_of)
    return batch_axes(shapes, recurrent, outputs, firsts, [sequences.get(name) for name in names])


def recurrent_states(nodes: Iterable[Any]) -> set[str]:
    """Graph inputs read as an RNN/GRU/LSTM's initial_h or initial_c, directly or through ops that keep the
    state's axes (Identity, Cast, a Slice of its layers)."""
    nodes = list(nodes)
    source: dict[str, str] = {}
    for node in nodes:
        if node.op_type in ("Identity", "Cast", "Slice") and node.input and node.output:
            source[node.output[0]] = node.input[0]
    found: set[str] = set()
    for node in nodes:
        if node.op_type in ("RNN", "GRU", "LSTM") and node.domain in ("", "ai.onnx"):
            for name in node.input[5:7]:
                seen = 0
                while name in source and seen < 16:
                    name, seen = source[name], seen + 1
                if name:
                    found.add(name)
    return found


#: ops that leave every axis of their data input where it was: a sequence's way to an RNN (a projection, a scale)
_AXES_KEPT = frozenset(
    {"Identity", "Cast", "Dropout", "LayerNormalization", "MatMul", "Add", "Sub", "Mul", "Div", "Relu", "LeakyRelu"}
    | {"Tanh", "Sigmoid", "Elu", "Selu", "Softsign", "Softplus", "HardSigmoid", "Clip", "Abs", "Neg", "Exp", "Log"}
)
#: of those, the ops whose other inputs are parameters (a weight, a ratio), not data
_DATA_FIRST = frozenset({"Dropout", "LayerNormalization", "MatMul", "Clip"})


def recurrent_sequences(nodes: Iterable[Any]) -> dict[str, int]:
    """Graph inputs read as an RNN/GRU/LSTM's sequence X, directly or through ops that keep its axes, and the
    axis that holds the batch there: 1 in the default layout [seq, batch, features] (torch's LSTM without
    batch_first), 0 in layout 1."""
    nodes = list(nodes)
    rnns = [n for n in nodes if n.op_type in ("RNN", "GRU", "LSTM") and n.domain in ("", "ai.onnx") and n.input]
    if not rnns:
        return {}  # most graphs: no map of producers to build
    producer = {out: node for node in nodes for out in node.output if out}
    found: dict[str, int] = {}
    for node in rnns:
        layout = next((a.i for a in node.attribute if a.name == "layout"), 0)
        todo, seen = [node.input[0]], set()
        while todo:
            name = todo.pop()
            if not name or name in seen:
                continue
            seen.add(name)
            source = producer.get(name)
            if source is None:
                found.setdefault(name, 0 if layout == 1 else 1)
            elif source.op_type in _AXES_KEPT and source.domain in ("", "ai.onnx") and source.input:
                todo.extend(source.input[:1] if source.op_type in _DATA_FIRST else source.input)
    return found


def _names_batch_elsewhere(shape: tuple[Dim, ...], axis: int) -> bool:
    """Whether ``shape`` names a dim other than ``axis`` the batch ("batch", "batch_size", ...) and not that one."""
    named = [k for k, d in enumerate(shape) if isinstance(d, str) and "batch" in d.lower()]
    return bool(named) and axis not in named


#: ops whose data input carries the batch on axis 0 as the graph runs it (:func:`sample_leading_dims`)
_BATCH_FIRST_OPS = frozenset(
    {"Conv", "ConvTranspose", "BatchNormalization", "InstanceNormalization", "LayerNormalization", "GroupNormalization"}
)


def sample_leading_dims(nodes: Iterable[Any], shape_of: Any) -> list[Dim]:
    """Axis 0 of each convolution's or norm op's data input whose shape ``shape_of`` (a tensor name -> shape or
    None) knows, except where a Reshape writes that input: a lowered instance or group norm folds the batch into
    [1, N*C, ...]."""
    nodes = list(nodes)
    reshaped = {name for node in nodes if node.op_type == "Reshape" for name in node.output}
    dims: list[Dim] = []
    for node in nodes:
        if node.op_type in _BATCH_FIRST_OPS and node.domain in ("", "ai.onnx") and node.input and node.input[0]:
            shape = shape_of(node.input[0])
            if shape and node.input[0] not in reshaped:
                dims.append(shape[0])
    return dims


def batch_axes(
    shapes: list[tuple[Dim, ...] | None],
    recurrent: Sequence[bool] = (),
    outputs: Sequence[tuple[Dim, ...] | None] = (),
    sample_dims: Sequence[Dim] = (),
    sequences: Sequence[int | None] = (),
) -> list[int | None]:
    """Each input's batch axis, from the dims the inputs declare (None: fed as is, the same in every batch),
    and, where ``recurrent`` (one flag per input) says an input is an RNN's initial state
    (:func:`recurrent_states`), from its use.

    The batch is the dim the inputs name on axis 0 (the most common name there). An input that names it on
    another axis carries it there (a recurrent state [layers, batch, hidden]). An input whose axis 0 is a
    fixed size, while another input's is free, carries the batch at its only free dim when that dim is
    unnamed (exporters that name no dim), and has none when every dim is fixed (a parameter-like tensor).
    A scalar has none. Where every input fixes its dims, one of rank 1 longer than 1 has none (a vector),
    and where the others' axes 0 disagree, an input whose axis 0 differs from the first one's has none
    (GTCRN's caches). Where the inputs name different dims on axis 0 and the graph's ``outputs`` (their
    shapes) carry exactly one of those names on axis 0, that one is the batch, and an input whose axis 0 is
    another of them, which no output carries, has none: a single image [height, width, 3] beside the face
    boxes [batch_size, 4] cut from it. Where the convolutions' and norm ops' inputs all hold 1 on axis 0
    (``sample_dims``, :func:`sample_leading_dims`), an input whose axis 0 is a fixed size above 1 that no
    output carries on axis 0 has none: one image [3, H, W] that the graph makes a batch of 1 (torchvision's
    detectors). An input that an RNN reads as its sequence (``sequences``, one batch axis or None per input,
    :func:`recurrent_sequences`) carries the batch where the RNN's layout puts it, and its dim there names the
    batch: [seq, batch, features] for torch's LSTM without batch_first; not where the file names another of its
    dims the batch ([batch, seq, features] fed to such an LSTM, which recurs across the samples). Anything else
    keeps axis 0.
    """
    firsts = [s[0] for s in shapes if s and isinstance(s[0], str)]
    name = Counter(firsts).most_common(1)[0][0] if firsts else None
    shared: set[str] = set()  # axis-0 names of inputs that are one sample for every output row
    carried = set(firsts) & {s[0] for s in outputs if s and isinstance(s[0], str)}
    if len(set(firsts)) > 1 and len(carried) == 1:
        name = carried.pop()
        # a name the outputs carry on another axis keeps its batch (a gallery's [faces, templates] scores)
        shared = set(firsts) - {name} - {d for s in outputs if s for d in s}
    # an RNN's sequence input is read off the op, not guessed from the dims: its batch is where the layout says,
    # unless the file names another of its dims the batch (torch's LSTM without batch_first, fed [batch, seq,
    # features]: it recurs across the samples, which the probe is to see)
    sequence = [
        a if a is not None and s and len(s) == 3 and not _names_batch_elsewhere(s, a) else None
        for s, a in zip(shapes, sequences)
    ]
    named = [d for s, a in zip(shapes, sequence) if s and a is not None for d in [s[a]] if isinstance(d, str)]
    if named:
        name = named[0]
    batch_free = any(s is None or (s and not isinstance(s[0], int)) for s in shapes)
    axes: list[int | None] = []
    for shape, read in zip(shapes, sequence + [None] * (len(shapes) - len(sequence))):
        if read is not None:
            axes.append(read)
        elif shape is None:
            axes.append(0)
        elif not shape:
            axes.append(None)
        elif name is not None and name in shape:
            axes.append(shape.index(name))
        elif shape[0] in shared:
            axes.append(None)
        elif not isinstance(shape[0], int) or not batch_free:
            axes.append(0)
        else:
            free = [axis for axis, dim in enumerate(shape) if not isinstance(dim, int)]
            if not free:
                axes.append(None)
            elif len(free) == 1 and shape[free[0]] is None:
                axes.append(free[0])
            else:
                axes.append(0)
    if not batch_free:
        # every input fixes its dims. One of rank 1 longer than 1 is a vector (a frame of 512 audio samples, a
        # flat state): a batch of 512 values would leave no axis for a sample (dfnstream's denoiser was told
        # its frame energy mixes 512 samples). Where the axes 0 of the others disagree (a streaming model's
        # caches [2, 1, ...] beside its audio [1, ...]), the first one's is the batch and an input with another
        # is fed as declared.
        axes = [None if s is not None and len(s) == 1 and s[0] != 1 else axis for s, axis in zip(shapes, axes)]
        leading = [s[0] for s, axis in zip(shapes, axes) if s and axis == 0]
        if len(set(leading)) > 1:
            axes = [None if s and axis == 0 and s[0] != leading[0] else axis for s, axis in zip(shapes, axes)]
    if sample_dims and set(sample_dims) == {1}:
        # the layers see one sample per run: a fixed axis 0 that reaches neither them nor the outputs' axis 0
        # is a sample's own (an image's colour planes), which a probe of "batch 3" would swap between runs
        output_firsts = {s[0] for s in outputs if s}
        axes = [
            None if axis == 0 and s and isinstance(s[0], int) and s[0] > 1 and s[0] not in output_firsts else axis
            for s, axis in zip(shapes, axes)
        ]
    if any(recurrent):
        # a recurrent state [directions or layers, batch, hidden] carries the batch on axis 1, which its shape
        # alone cannot say: livekit's hush GRUs take h [1, 1, 256] beside features [1, 1, S, 32], and the
        # relaxed copy put the batch on its axis 0
        dims = {s[a] for s, a, r in zip(shapes, axes, recurrent) if s and a is not None and not r}
        axes = [1 if r and s and len(s) == 3 and s[1] in dims else a for s, a, r in zip(shapes, axes, recurrent)]
    return axes


#: ops and the input positions that hold an axis or axes (opset 13+ for Squeeze/Unsqueeze, 18+ for Reduce*)
_AXIS_INPUTS = {
    "CumSum": 1,
    "Squeeze": 1,
    "Unsqueeze": 1,
    "Slice": 3,
    "Pad": 3,
    **dict.fromkeys(("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2"), 1),
    **dict.fromkeys(("ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"), 1),
}


def _read_as_axis(graph: Any, name: str) -> bool:
    """Input ``name`` is an axis a node takes (CumSum's, a Reduce's axes): fed 0, valid at every rank, where the
    integer setting's 1 is out of range for a vector (onnx's test_cumsum_1d)."""
    return any(
        node.op_type in _AXIS_INPUTS
        and len(node.input) > _AXIS_INPUTS[node.op_type]
        and node.input[_AXIS_INPUTS[node.op_type]] == name
        for node in graph.node
        if node.domain in ("", "ai.onnx")
    )


def _compared_constant(graph: Any, name: str) -> float | None:
    """A constant the graph tests input ``name`` against with Equal (a sample rate selecting a branch):
    the value a synthetic feed of it gets, so that the model takes a branch it was built for."""
    from bncheck.backends.onnx.tensors import to_array

    constants = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value":
                    constants[node.output[0]] = attr.t
    for node in graph.node:
        if node.op_type == "Equal" and name in node.input:
            other = [i for i in node.input if i != name]
            tensor = constants.get(other[0]) if other else None
            if tensor is not None and tensor.data_location != tensor.EXTERNAL:  # a weight left in its file
                try:
                    array = to_array(tensor)
                except ValueError:  # raw_data of the wrong length: not a usable constant
                    continue
                if array.size == 1 and array.dtype.kind in "iu":
                    return float(array.reshape(()))
    return None
