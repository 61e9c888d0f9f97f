"""The ONNX probe: measure every normalization layer inside onnxruntime, returning small tensors only.

How (issue 3, section 2)
- The model is augmented in memory. For each measured tensor T (a layer's input or output) added nodes
  return, per sample and channel, the mean and the mean of squares ([N, C], float32, aggregated in float64
  in numpy) and the min and max, never the activation itself, except for tensors of at most
  ``SMALL_SAMPLE`` elements per sample, which are fetched whole (exact numpy statistics).
- Fast form (float32 NCHW tensors of rank >= 3): GlobalAveragePool(T), GlobalMaxPool(T), then
  GlobalMaxPool(-T) (-T by a depthwise 1x1 Conv with weight -1) and GlobalAveragePool(T*T), one
  temporary at a time. These are ops onnxruntime's NCHWc layout transformer keeps in its blocked layout;
  a ReduceMean would force a reorder (a full copy) of every measured tensor, and NCHWc convolutions are
  what make ORT_ENABLE_ALL about 1.6x faster than ORT_ENABLE_EXTENDED on ResNet-50 here. Exact zeros are
  not counted in this form (a second temporary per tensor): ``TensorStats.zeros_exact`` is False and
  zeros are known where min/max decide them. NaN/Inf propagate into the per-sample means: a batch where a
  fast-measured tensor is not finite switches the engine to the exact form (a new session, the old one
  freed first), so NaN/Inf counts are exact.
- Generic (exact) form, for other layouts and after NaN/Inf: ReduceMean / ReduceSumSquare / ReduceMin /
  ReduceMax over every axis but batch and channel, Equal/IsNaN/IsInf counts, at ORT_ENABLE_EXTENDED.
- Execution order PRIORITY_BASED, so that the added nodes run right after their producer instead of at
  the end of the graph with every measured activation alive (9x the memory of plain inference, issue 3).
  onnxruntime breaks priority ties by node index, and its NCHWc transformer gives the nodes it rewrites
  (our pools) new, higher indices than the model's untouched Relu/Add nodes. So the fast form is built in
  two steps (:func:`_session_statistics_first`): optimize once at ORT_ENABLE_ALL and save the optimized
  graph (weights to the temporary folder), move every added node right after its producer, and run that
  graph with optimizations off. If that fails, one session on the augmented graph is the fallback, where
  fast nodes are appended in reverse layer order (the transformer renumbers in onnxruntime's reverse-DFS
  order, which then interleaves them with their producers; ResNet-50 at batch 32: 0.95 GB peak instead of
  3.4 GB with the nodes right after their producer).
- Graph optimizations: ORT_ENABLE_ALL. It fuses Conv+BatchNormalization when only the BN output is read,
  which changes nothing measured beyond float32 rounding; ``tests/test_onnx_probe.py`` proves the
  statistics equal numpy statistics of the full tensors of a plain ORT_DISABLE_ALL run of the unaugmented
  model.
- Inference-mode BatchNormalization is an affine map per channel (y = a*x + b): its output is measured
  (which keeps Conv+BN fusion possible) and its input derived (``TensorStats.derived``).
- Train-mode BatchNormalization: onnxruntime does not follow the ONNX spec for it (DEVELOPERS.md,
  onnxruntime#29790: when B equals the running mean, or scale equals the running variance, the running
  statistics it updates share memory with that initializer and the output is corrupted). Rather than
  post-correcting numbers, the augmented copy computes every train-mode BN by the spec's own decomposition
  (ReduceMean over (0, 2, ...), population variance, normalize, scale, bias, and the running-statistic
  outputs) under the node's output names, so the layer and everything downstream follow the spec in one
  run; the original node still runs on the same input with its outputs renamed, and is measured too:
  ``LayerProbe.source == "spec"`` and ``runtime_deviation`` is the largest |runtime - spec| of its output
  statistics (per-sample means, min, max). The decomposition reads its parameters through Identity copies,
  so the runtime node's in-place writes cannot reach it; ``tests/test_onnx_probe.py`` checks it against
  ``onnx.reference``.
- Weights: no second copy in this process. The augmented model is a weight-less stub whose initializers
  point at external data: the original files when the model has external data; else the ``raw_data``
  bytes inside the model file itself, at their offsets (:func:`raw_data_offsets`); else (weights stored
  as float_data and the like) a temporary file written tensor by tensor from the loaded model.
  onnxruntime reads them itself (``session.model_external_initializers_file_folder_path``). Small
  tensors (<= 64 KiB, integer tensors) stay inline for onnxruntime's shape inference. While the batches
  run, ``run_probe`` also swaps the view's loaded ModelProto for a weight-less skeleton, reloaded from the
  file only when ``handle.model`` is next read (:func:`_release`). One session with a dynamic batch serves
  every batch size (the optimizing session is freed before it is built).
- Inference-mode BatchNormalization outputs are measured without min/max (mean and mean of squares
  only): the layer is an affine map per channel and cannot collapse, and min/max cost a depthwise Conv
  and two GlobalMaxPool per tensor (``TensorStats.minmax_measured`` is False, min/max NaN).
  ResNet-50 (benchmarks/README.md): see there for the current wall-time and peak-RSS ratios.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np

from bncheck.backends.base import BackendError, ProbeSettings
from bncheck.model import LayerProbe, ModelView, NormLayer, ProbeResult, TensorStats
from bncheck.probe_data import ProbeDataError, resolve_shape
from bncheck.probe_plan import merge_stats, run_plan, tensor_stats

if TYPE_CHECKING:
    import onnx

    from bncheck.backends.onnx_load import OnnxHandle

#: elements per sample up to which a measured tensor is fetched whole (exact statistics in numpy).
SMALL_SAMPLE = 4096
_ALIGN = 4096
#: initializers up to this size stay inside the stub (a negligible copy; shape inference needs them).
EMBED_BYTES = 64 * 1024
_SHAPE_TYPES = (6, 7)  # INT32, INT64: shapes, axes, indices
_PREFIX = "__bncheck"


@dataclass
class _Measure:
    """How one tensor is measured and where its numbers come out."""

    tensor: str
    batch_axis: int | None
    channel_axis: int | None
    mode: str  # "fast" | "generic" | "full"
    outputs: dict[str, str] = field(default_factory=dict)
    length: int | None = None  # elements per (sample, channel), when static
    # fast form only: False when min/max are not measured (the output of an inference-mode BN, which
    # cannot collapse: see _Augmenter.measure); ``group`` holds its nodes so that min/max can be added
    # when another layer measures the same tensor with them
    minmax: bool = True
    group: list[Any] | None = None
    channels: int | None = None


@dataclass
class _LayerPlan:
    layer: NormLayer
    input: _Measure | None = None
    output: _Measure | None = None
    runtime: _Measure | None = None  # train-mode BN: the runtime node's own output
    affine: tuple[np.ndarray, np.ndarray] | None = None  # inference BN: y = a*x + b per channel
    spec: bool = False  # a train-mode BN computed by the spec's decomposition
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
        return f"{_PREFIX}_{self._count}_{hint}"

    def node(self, op: str, inputs: list[str], hint: str, n_out: int = 1, **attrs: Any) -> list[str]:
        from onnx import helper

        outs = [self.name(f"{hint}_{i}" if n_out > 1 else hint) for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=outs[0], **attrs))
        return outs

    def one(self, op: str, inputs: list[str], hint: str, **attrs: Any) -> str:
        return self.node(op, inputs, hint, **attrs)[0]

    def const(self, value: np.ndarray, hint: str) -> str:
        from onnx import numpy_helper

        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def reduce(self, op: str, x: str, axes: list[int], hint: str, keepdims: int = 0) -> str:
        as_input = self.opset >= 18 or (op == "ReduceSum" and self.opset >= 13)
        if as_input:
            return self.one(op, [x, self.const(np.array(axes, np.int64), "axes")], hint, keepdims=keepdims)
        return self.one(op, [x], hint, axes=axes, keepdims=keepdims)


# --------------------------------------------------------------------------- the augmented stub


def _opset(model: "onnx.ModelProto") -> int:
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            return int(op.version)
    return 0


def _nbytes(tensor: Any) -> int:
    from onnx import helper

    count = 1
    for d in tensor.dims:
        count *= int(d)
    try:
        itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, ValueError, TypeError):
        itemsize = 8
    return count * itemsize


def _write_weights(model: "onnx.ModelProto", folder: str) -> list[Any]:
    """Stream every top-level initializer into a new ``folder/weights-N.bin``; return weight-less external
    stubs. Tensors already external (a skeleton from an earlier call) are kept as they are."""
    import onnx
    from onnx import numpy_helper

    stubs = []
    count = sum(1 for name in os.listdir(folder) if name.startswith("weights-"))
    location = f"weights-{count}.bin"
    path = os.path.join(folder, location)
    offset = 0
    with open(path, "wb") as fh:
        for tensor in model.graph.initializer:
            small = _nbytes(tensor) <= EMBED_BYTES or tensor.data_type in _SHAPE_TYPES
            if small or tensor.data_type == onnx.TensorProto.STRING or (
                tensor.HasField("data_location") and tensor.data_location == onnx.TensorProto.EXTERNAL
            ):
                # small tensors stay inline: shapes, axes and constants must be readable by
                # onnxruntime's shape inference, which does not read external data
                copy = onnx.TensorProto()
                copy.CopyFrom(tensor)
                stubs.append(copy)
                continue
            data = tensor.raw_data if tensor.HasField("raw_data") else numpy_helper.to_array(tensor).tobytes()
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


def _varint(buf: Any, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("bad varint")


def _fields(buf: Any, start: int, end: int) -> Iterable[tuple[int, int, int, int]]:
    """(field number, wire type, value start, value end) of each protobuf field in buf[start:end]; the
    value of a length-delimited field is its payload."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, after = _varint(buf, pos)
        elif wire == 1:
            after = pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            after = pos + length
        elif wire == 5:
            after = pos + 4
        else:  # groups (3, 4): not in ONNX files
            raise ValueError(f"unsupported wire type {wire}")
        if after > end:
            raise ValueError("truncated field")
        yield number, wire, pos, after
        pos = after


def raw_data_offsets(path: str) -> dict[str, tuple[int, int]] | None:
    """Byte offset and length of each top-level initializer's ``raw_data`` inside the ONNX file ``path``,
    or None when the file's layout is not the plain one (a repeated graph field, duplicate names).

    Why by hand: neither onnx nor protobuf's Python API tells where a field's bytes sit in the file, and
    with those offsets the probe's session reads the weights straight from the user's file as external
    data (``offset``/``length``), instead of this process writing a 100 MB copy first (0.15 s on
    ResNet-50). Only the wire format is walked (ModelProto.graph = 7, GraphProto.initializer = 5,
    TensorProto.name = 8, raw_data = 9); values are never decoded beyond names.
    """
    import mmap

    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size == 0:
            return None
        buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        graphs = [(a, b) for number, wire, a, b in _fields(buf, 0, size) if number == 7 and wire == 2]
        if len(graphs) != 1:
            return None  # protobuf would merge several graph fields: not worth following
        found: dict[str, tuple[int, int]] = {}
        for number, wire, a, b in _fields(buf, *graphs[0]):
            if number != 5 or wire != 2:
                continue
            name, raw = None, None
            for f_number, f_wire, fa, fb in _fields(buf, a, b):
                if f_number == 8 and f_wire == 2:
                    name = bytes(buf[fa:fb]).decode("utf-8", "replace")
                elif f_number == 9 and f_wire == 2:
                    raw = (fa, fb - fa)  # the last occurrence wins, as in protobuf
            if name is None or name in found:
                return None if name in found else found
            if raw is not None:
                found[name] = raw
        return found
    except (ValueError, IndexError):
        return None
    finally:
        buf.close()


def _in_file_stubs(handle: "OnnxHandle") -> list[Any] | None:
    """Initializer stubs whose large tensors point into the model file itself (see
    :func:`raw_data_offsets`); None when some large tensor's bytes are not found there as raw_data of the
    right length (then the probe writes a copy, :func:`_write_weights`)."""
    import onnx

    location = os.path.basename(handle.path)
    offsets: dict[str, tuple[int, int]] | None = None
    stubs = []
    for tensor in handle.model.graph.initializer:
        small = _nbytes(tensor) <= EMBED_BYTES or tensor.data_type in _SHAPE_TYPES
        external = tensor.HasField("data_location") and tensor.data_location == onnx.TensorProto.EXTERNAL
        if external:
            # a skeleton from an earlier probe: it must point into this file too
            where = {entry.key: entry.value for entry in tensor.external_data}
            if where.get("location") != location:
                return None
            stubs.append(_copy(tensor))
            continue
        if small or tensor.data_type == onnx.TensorProto.STRING:
            stubs.append(_copy(tensor))
            continue
        if offsets is None:
            offsets = raw_data_offsets(handle.path) or {}
        found = offsets.get(tensor.name)
        if found is None or not tensor.HasField("raw_data") or found[1] != _nbytes(tensor):
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


def _copy(tensor: Any) -> Any:
    import onnx

    copy = onnx.TensorProto()
    copy.CopyFrom(tensor)
    return copy


def _skeleton(src: "onnx.ModelProto", initializers: list[Any]) -> "onnx.ModelProto":
    """``src`` with ``initializers`` in place of its own (the graph is copied, never the weights)."""
    import onnx

    stub = onnx.ModelProto()
    for fname in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        if src.HasField(fname):
            setattr(stub, fname, getattr(src, fname))
    stub.opset_import.extend(src.opset_import)
    stub.metadata_props.extend(src.metadata_props)
    stub.functions.extend(src.functions)
    graph = stub.graph
    graph.name = src.graph.name
    graph.node.extend(src.graph.node)
    graph.input.extend(src.graph.input)
    graph.output.extend(src.graph.output)
    graph.value_info.extend(src.graph.value_info)
    graph.sparse_initializer.extend(src.graph.sparse_initializer)
    graph.initializer.extend(initializers)
    return stub


def _stub(handle: "OnnxHandle", tmp: str) -> tuple["onnx.ModelProto", str]:
    """A ModelProto without weight bytes, and the folder its external data lives in."""
    import onnx

    folder = os.path.dirname(os.path.abspath(handle.path))
    if handle.external_data:
        # The graph and the external-data references, re-read without weights (the loader already
        # validated every location); onnxruntime reads the weights from the original folder.
        return onnx.load(handle.path, load_external_data=False), folder
    in_file = _in_file_stubs(handle)
    if in_file is not None:  # onnxruntime reads the weights from the model file itself
        return _skeleton(handle.model, in_file), folder
    return _skeleton(handle.model, _write_weights(handle.model, tmp)), tmp


def _release(handle: "OnnxHandle", stubs: list[Any] | None):
    """Swap ``handle.model`` for a weight-less skeleton for the duration of a probe; return the restorer.

    The probe's own session reads the weights from files, so the ModelProto the loader filled would be a
    second copy of every weight in this process (102 MB on ResNet-50, 0.19x of plain inference's peak).
    The skeleton keeps the graph; its initializers point at the files (the original external data, the
    model file itself, or the copy this probe wrote). The restorer makes the reload lazy (:meth:`OnnxHandle.defer_model`): the model
    is reloaded from ``handle.path`` with the loader's own validation, exactly as ``load_onnx`` produced
    it, when someone next reads ``handle.model`` (``bncheck probe`` never does: 0.15 s saved on
    ResNet-50). The skeleton's external references may point into the probe's temporary folder, which is
    gone by then; a reader gets the reloaded model, never the skeleton.
    """
    import onnx

    from bncheck.backends import onnx_load

    if handle.external_data:
        skeleton = onnx.load(handle.path, load_external_data=False)
    else:
        # the external stubs of the weights this probe already wrote; a later _stub copies them as they
        # are, so the skeleton also serves the exact form's second session
        if stubs is None:
            return lambda: None
        skeleton = _skeleton(handle.model, stubs)
    kept = handle.model
    handle.model = skeleton
    del kept

    def reload() -> "onnx.ModelProto":
        try:
            model = onnx_load._parse(handle.path)
            if handle.external_data:
                onnx_load._validate_external(handle.path, model)
                onnx_load._load_weights(handle.path, model)
        except BackendError:
            raise
        except Exception as exc:  # noqa: BLE001 - the file changed under us: say so in one line
            raise BackendError(f"{handle.path}: cannot reload the model after probing: {_line(exc)}") from exc
        return model

    return lambda: handle.defer_model(skeleton, reload)


class _Augmenter:
    """Builds the instrumented stub for a list of layers."""

    def __init__(
        self,
        handle: "OnnxHandle",
        layers: list[NormLayer],
        tmp: str,
        exact: bool,
        inputs_only: bool,
        keep_runtime: bool = True,
    ):
        self.handle = handle
        self.keep_runtime = keep_runtime
        self.exact = exact
        self.inputs_only = inputs_only
        self.model, self.folder = _stub(handle, tmp)
        self.initializer_stubs = None if handle.external_data else [_copy(t) for t in self.model.graph.initializer]
        self.opset = _opset(self.model)
        self.b = _Builder(self.opset)
        self.shapes = dict(handle.value_shapes)
        self.types = dict(handle.value_types)
        self.measures: dict[tuple[str, int | None, int | None], _Measure] = {}
        self.after: dict[str, list[Any]] = {}  # producer output -> measure nodes to place after it
        self.tail: list[list[Any]] = []  # fast-form node groups, appended in reverse
        self.replaced: dict[int, list[Any]] = {}  # node index -> nodes replacing/following it
        self.outputs: list[str] = []
        # every train-mode BN follows the spec, measured or not: layers downstream depend on it
        self.decomposed: dict[str, str] = {}  # spec output name -> runtime node's renamed output
        for idx, node in enumerate(list(self.model.graph.node)):
            if self._is_train_bn(node):
                y = node.output[0]
                if self._decompose(idx):
                    self.decomposed[y] = self.model.graph.node[idx].output[0]
        graph = self.model.graph
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
    ) -> _Measure | None:
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
            if minmax and not m.minmax and m.group is not None and m.channels is not None:
                start = len(self.b.nodes)
                self._fast_minmax(m, m.channels)
                m.group.extend(self.b.nodes[start:])
                del self.b.nodes[start:]
                m.minmax = True
                self.outputs.extend(o for o in m.outputs.values() if o not in self.outputs)
            return m
        if not tensor or tensor not in self.known:
            return None  # not a tensor of the main graph (e.g. inside a subgraph): not measurable
        per_sample = 1
        if shape is not None:
            for axis, dim in enumerate(shape):
                if axis == batch_axis:
                    continue
                per_sample = per_sample * dim if isinstance(dim, int) and per_sample is not None else None
        else:
            per_sample = None
        elem = self.types.get(tensor, 1)
        start = len(self.b.nodes)
        length = self._static_length(tensor, batch_axis, channel_axis)
        m = _Measure(tensor, batch_axis, channel_axis, "full", length=length)
        if per_sample is not None and per_sample <= SMALL_SAMPLE:
            m.mode = "full"
            m.outputs["full"] = tensor
        elif rank is None:
            return None
        elif (
            not self.exact
            and elem == 1
            and rank >= 3
            and batch_axis == 0
            and channel_axis == 1
            and isinstance(shape[1], int)
        ):
            m.mode = "fast"
            m.minmax = minmax
            m.channels = int(shape[1])
            self._fast(m, m.channels)
        else:
            m.mode = "generic"
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

    def _fast(self, m: _Measure, channels: int) -> None:
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

    def _fast_minmax(self, m: _Measure, channels: int) -> None:
        """Max of t, and max of -t (a depthwise 1x1 Conv with weight -1: NCHWc-native, unlike Neg)."""
        b, t = self.b, m.tensor
        m.outputs["max"] = b.one("GlobalMaxPool", [t], "max")
        neg_w = b.const(-np.ones((channels, 1, 1, 1), np.float32), "neg_w")
        negated = b.one("Conv", [t, neg_w], "neg", group=channels, kernel_shape=[1, 1])
        m.outputs["negmin"] = b.one("GlobalMaxPool", [negated], "negmin")

    def _generic(self, m: _Measure, rank: int, elem: int) -> None:
        import onnx

        b, t = self.b, m.tensor
        if elem != onnx.TensorProto.FLOAT:
            t = b.one("Cast", [t], "as_float", to=onnx.TensorProto.FLOAT)
        keep = [a for a in (m.batch_axis, m.channel_axis) if a is not None]
        spatial = [a for a in range(rank) if a not in keep]
        if spatial:
            m.outputs["mean"] = b.reduce("ReduceMean", t, spatial, "mean")
            m.outputs["sumsq"] = b.reduce("ReduceSumSquare", t, spatial, "sumsq")
        else:
            m.outputs["full"] = t
            return
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
        m.outputs["shape"] = b.one("Shape", [m.tensor], "shape")

    # ------------------------------------------------------------ per layer

    def _is_train_bn(self, node: Any) -> bool:
        if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
            return False
        for attr in node.attribute:
            if attr.name == "training_mode":
                return bool(attr.i)
        return self.opset < 14 and any(o for o in node.output[1:])

    def _plan(self, layer: NormLayer) -> _LayerPlan:
        plan = _LayerPlan(layer)
        if layer.op_type == "BatchNormalization" and layer.training:
            runtime_out = self.decomposed.get(layer.output)
            if runtime_out is not None:
                plan.spec = True
                plan.input = self.measure(layer.input, layer.batch_axis, layer.channel_axis)
                if not self.inputs_only:
                    plan.output = self.measure(layer.output, layer.batch_axis, layer.channel_axis)
                    if self.keep_runtime:
                        plan.runtime = self.measure(runtime_out, layer.batch_axis, layer.channel_axis)
                return plan
            plan.note = f"{layer.name}: train-mode BatchNormalization measured as onnxruntime computes it"
        affine = _inference_affine(layer)
        if affine is not None and not self.exact and not self.inputs_only:
            # An inference BN is an affine map per channel: its output is constant (or zero) exactly when
            # its input is, so it cannot collapse (BN001 judges layers that compute statistics only) and
            # its min/max are not needed: mean and mean of squares only. NaN/Inf still show: one
            # non-finite element makes its sample's mean non-finite (see _needs_exact).
            plan.affine = affine
            plan.output = self.measure(layer.output, layer.batch_axis, layer.channel_axis, minmax=False)
            return plan
        plan.input = self.measure(layer.input, layer.batch_axis, layer.channel_axis)
        if not self.inputs_only and layer.output:
            plan.output = self.measure(layer.output, layer.batch_axis, layer.channel_axis)
        return plan

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
        params = {}
        for role, name in zip(("scale", "bias", "mean", "var"), node.input[1:5]):
            # private copies: onnxruntime's train-mode kernel may write the running statistics into a
            # buffer it shares with an equal initializer (onnxruntime#29790)
            params[role] = b.one("Identity", [name], f"spec_{role}")
        mean = b.reduce("ReduceMean", x, axes, "spec_mean", keepdims=1)
        centered = b.one("Sub", [x, mean], "spec_centered")
        var = b.reduce("ReduceMean", b.one("Mul", [centered, centered], "spec_sq"), axes, "spec_var", keepdims=1)
        eps_c = b.const(np.array(eps, np.float32), "spec_eps")
        std = b.one("Sqrt", [b.one("Add", [var, eps_c], "spec_vareps")], "spec_std")
        normed = b.one("Div", [centered, std], "spec_norm")
        if spatial_mode == 0:
            scale_r, bias_r = params["scale"], params["bias"]
        else:
            shape_c = b.const(np.array([-1] + [1] * (rank - 2), np.int64), "spec_cshape")
            scale_r = b.one("Reshape", [params["scale"], shape_c], "spec_scale_r")
            bias_r = b.one("Reshape", [params["bias"], shape_c], "spec_bias_r")
        outputs = list(node.output)
        y_spec = outputs[0]
        scaled = b.one("Mul", [normed, scale_r], "spec_scaled")
        b.nodes.append(onnx.helper.make_node("Add", [scaled, bias_r], [y_spec], name=b.name("spec_y")))
        flat = b.const(np.array([-1], np.int64), "spec_flat")
        keep = 1.0 - momentum
        for pos, (stat, running) in enumerate(((mean, params["mean"]), (var, params["var"])), start=1):
            if pos < len(outputs) and outputs[pos]:
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
        self.shapes[renamed[0]] = shape
        self.types[renamed[0]] = elem
        self.replaced[idx] = spec_nodes
        return True

    # ------------------------------------------------------------ assembling

    def finish(self) -> "onnx.ModelProto":
        from onnx import helper

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
        graph.node.extend(ordered)
        graph.initializer.extend(self.b.inits)
        existing = {o.name for o in graph.output}
        for name in self.outputs:
            if name not in existing:
                graph.output.append(helper.make_empty_tensor_value_info(name))
                existing.add(name)
        return self.model


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


# --------------------------------------------------------------------------- session and decoding


def _options(level: Any, folder: str) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    so.graph_optimization_level = level
    so.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
    # CPU arena on (onnxruntime's default, as in plain inference). Measured on ResNet-50 once inference
    # BNs stopped measuring min/max: 0.16 s faster over the whole probe (without it every activation is
    # a fresh mmap whose pages fault in again), peak 650 MB in 10 of 12 runs (1.26x plain; outliers 711
    # and 723); without it 593-604 MB in about half the runs and 680-712 MB in the others (glibc).
    so.enable_cpu_mem_arena = True
    return so


def _session(model: "onnx.ModelProto", folder: str, exact: bool):
    """One session on the augmented stub: ORT_ENABLE_ALL (fast form) or ORT_ENABLE_EXTENDED (exact form)."""
    import onnxruntime as ort

    level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED if exact else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so = _options(level, folder)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _statistics_first(graph: Any, main_outputs: set[str]) -> None:
    """Order ``graph.node`` so that every added node runs as soon as its inputs exist, before the next
    node of the model itself; the model's own nodes keep their (topological) order."""
    import heapq
    import re

    nodes = list(graph.node)
    producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    main: set[int] = set()
    stack = [producer[o] for o in main_outputs if o in producer]
    while stack:
        i = stack.pop()
        if i not in main:
            main.add(i)
            stack.extend(producer[t] for t in nodes[i].input if t in producer)

    def key(i: int) -> tuple[int, int]:
        found = re.search(rf"{_PREFIX}_(\d+)_", nodes[i].name)
        return (int(found.group(1)) if found else 1 << 40, i)

    # Kahn's algorithm for the added nodes, smallest construction number first, drained after each
    # model node (linear in the graph size: large transformers have thousands of nodes)
    available = {t.name for t in graph.initializer} | {v.name for v in graph.input} | {""}
    missing: dict[int, int] = {}
    waiting: dict[str, list[int]] = {}
    ready: list[tuple[tuple[int, int], int]] = []
    for i in range(len(nodes)):
        if i in main:
            continue
        needed = {t for t in nodes[i].input if t not in available}
        missing[i] = len(needed)
        for t in needed:
            waiting.setdefault(t, []).append(i)
        if not needed:
            heapq.heappush(ready, (key(i), i))
    order: list[int] = []

    def produce(i: int) -> None:
        order.append(i)
        for out in nodes[i].output:
            if out and out not in available:
                available.add(out)
                for j in waiting.pop(out, []):
                    missing[j] -= 1
                    if missing[j] == 0:
                        heapq.heappush(ready, (key(j), j))

    def drain() -> None:
        while ready:
            produce(heapq.heappop(ready)[1])

    drain()
    for i in range(len(nodes)):
        if i in main:
            produce(i)
            drain()
    if len(order) != len(nodes):
        raise ValueError("added nodes depend on tensors no node produces")
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)


def _trim() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it otherwise); a no-op elsewhere."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _session_statistics_first(model: "onnx.ModelProto", folder: str, tmp: str, main_outputs: set[str]):
    """Fast-form session whose added nodes run right after their producers, even after NCHWc rewriting.

    onnxruntime breaks PRIORITY_BASED ties by node index, and the nodes its layout transformer creates
    (NCHWc pools for our statistics) get new, higher indices than the model's own untouched nodes (its
    Relu, Add), which then run first and keep an extra activation alive. So: optimize once at
    ORT_ENABLE_ALL and save the optimized graph (weights to the temporary folder), put every added node
    right after its producer, and run that graph with optimizations off. Measured on ResNet-50 at batch
    32: peak -115 MB during the run, -40 MB of session state; +0.2 s of session creation.
    """
    import onnx
    import onnxruntime as ort

    optimized = os.path.join(tmp, "optimized.onnx")
    so = _options(ort.GraphOptimizationLevel.ORT_ENABLE_ALL, folder)
    so.optimized_model_filepath = optimized
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.bin")
    so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", str(EMBED_BYTES))
    # this session only writes the optimized graph and never runs: packing weights for its kernels is waste
    so.add_session_config_entry("session.disable_prepacking", "1")
    first = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    del first
    # no malloc_trim here: the running session's creation reuses these freed pages without faulting them
    # in again (ResNet-50: 0.07 s), and run_probe trims once the view's weights are released (same peak)
    graph_only = onnx.load(optimized, load_external_data=False)
    _statistics_first(graph_only.graph, main_outputs)
    so = _options(ort.GraphOptimizationLevel.ORT_DISABLE_ALL, tmp)
    return ort.InferenceSession(graph_only.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _decode(m: _Measure, values: dict[str, np.ndarray]) -> TensorStats:
    if "full" in m.outputs:
        return tensor_stats(values[m.outputs["full"]], m.channel_axis, m.batch_axis)
    if m.mode == "fast":
        mean = np.asarray(values[m.outputs["mean"]], np.float64)
        n, c = mean.shape[0], mean.shape[1]
        mean = mean.reshape(n, c)
        sq = np.asarray(values[m.outputs["sq"]], np.float64).reshape(n, c)
        length = m.length
        if length is None:
            length = int(np.prod([int(d) for d in values[m.outputs["shape"]]][2:]))
        if "max" in m.outputs:
            lo = -np.asarray(values[m.outputs["negmin"]], np.float64).reshape(n, c).max(axis=0)
            hi = np.asarray(values[m.outputs["max"]], np.float64).reshape(n, c).max(axis=0)
        else:  # not measured (an inference BN's output): NaN, flagged by minmax_measured=False
            lo = hi = np.full(c, np.nan)
        # zeros are not counted in the fast form (it would cost a full-size temporary per tensor): exact
        # where min/max decide it, else 0 (a lower bound), flagged by zeros_exact=False
        zeros = np.where((lo == 0) & (hi == 0), n * length, 0).astype(np.int64)
        # NaN/Inf: none here; a non-finite element makes its sample's mean non-finite, and such a batch is
        # re-run in the exact form, which counts them (_needs_exact)
        nonfinite = np.zeros(c, np.int64)
        return TensorStats(n, n * length, mean, sq, lo, hi, zeros, nonfinite, zeros_exact=False,
                           minmax_measured="max" in m.outputs)
    # generic: reductions keep batch and channel axes in their original order
    def nc(name: str) -> np.ndarray:
        arr = np.asarray(values[m.outputs[name]], np.float64)
        if m.batch_axis is None and m.channel_axis is None:
            return arr.reshape(1, 1)
        if m.batch_axis is None:
            return arr.reshape(1, -1)
        if m.channel_axis is None:
            return arr.reshape(-1, 1)
        return arr.T if m.channel_axis < m.batch_axis else arr

    shape = [int(d) for d in values[m.outputs["shape"]]]
    length = 1
    for axis, dim in enumerate(shape):
        if axis not in (m.batch_axis, m.channel_axis):
            length *= dim
    mean = nc("mean")
    n = mean.shape[0]
    sq = nc("sumsq") / max(length, 1)
    mn = np.fmin.reduce(nc("min"), axis=0)
    mx = np.fmax.reduce(nc("max"), axis=0)
    mn = np.where(np.isposinf(mn) & (nc("nonfinite").sum(axis=0) > 0), np.nan, mn)
    mx = np.where(np.isneginf(mx) & (nc("nonfinite").sum(axis=0) > 0), np.nan, mx)
    zeros = np.rint(nc("zeros").sum(axis=0)).astype(np.int64)
    nonfinite = np.rint(nc("nonfinite").sum(axis=0)).astype(np.int64)
    return TensorStats(n, n * length, mean, sq, mn, mx, zeros, nonfinite)


def _needs_exact(m: _Measure, stats: TensorStats) -> bool:
    """A fast-form tensor whose numbers are not finite: NaN/Inf counts need the exact form.

    The per-sample means alone decide it (also where min/max are not measured): a NaN or Inf element makes
    its sample's mean (a sum) non-finite; so does a finite square overflowing float32, which the exact
    form then measures correctly."""
    return m.mode == "fast" and not (
        np.all(np.isfinite(stats.sample_mean)) and np.all(np.isfinite(stats.sample_sq))
    )


def _derive_input(out: TensorStats, a: np.ndarray, b: np.ndarray) -> TensorStats:
    """Input statistics of y = a*x + b from the output's: x = (y - b) / a per channel."""
    with np.errstate(all="ignore"):
        mean = (out.sample_mean - b) / a
        sq = (out.sample_sq - 2.0 * b * out.sample_mean + b * b) / (a * a)
    if not out.minmax_measured:  # nothing to map (the usual case: 53 layers x 7 runs on ResNet-50)
        c = out.min.shape[0]
        return TensorStats(out.batch_size, out.count, mean, sq, np.full(c, np.nan), np.full(c, np.nan),
                           np.zeros(c, np.int64), out.nonfinite.copy(), derived=True, zeros_exact=False,
                           minmax_measured=False)
    with np.errstate(all="ignore"):
        lo = (out.min - b) / a
        hi = (out.max - b) / a
    lo, hi = np.where(a > 0, lo, hi), np.where(a > 0, hi, lo)
    zero_range = (lo == 0) & (hi == 0)
    zeros = np.where(zero_range, out.count, 0).astype(np.int64)  # count is per channel
    return TensorStats(out.batch_size, out.count, mean, sq, lo, hi, zeros, out.nonfinite.copy(), derived=True,
                       zeros_exact=False, minmax_measured=out.minmax_measured)


def _deviation(runtime: TensorStats, spec: TensorStats) -> float:
    worst = 0.0
    for r, s in ((runtime.sample_mean, spec.sample_mean), (runtime.min, spec.min), (runtime.max, spec.max)):
        r = np.asarray(r, np.float64)
        s = np.asarray(s, np.float64)
        if r.shape != s.shape:
            return math.inf
        both = np.isfinite(r) & np.isfinite(s)
        if np.any(np.isfinite(r) != np.isfinite(s)):
            worst = math.inf
        if both.any():
            worst = max(worst, float(np.max(np.abs(r[both] - s[both]))))
    return worst


class _Engine:
    """Owns the augmented session(s) for one model; turns feeds into per-layer statistics."""

    def __init__(self, handle: "OnnxHandle", layers: list[NormLayer], inputs_only: bool = False) -> None:
        self.handle = handle
        self.layers = layers
        self.inputs_only = inputs_only
        self.tmp = tempfile.mkdtemp(prefix="bncheck-probe-")
        self.exact = False
        self.decomposed: dict[str, str] = {}
        self.initializer_stubs: list[Any] | None = None  # the weights this engine wrote, as external stubs
        self.notes: list[str] = []
        try:
            self._open(exact=False)
        except BaseException:
            self.close()  # no temporary weights left behind when the model cannot run
            raise

    def _open(self, exact: bool) -> None:
        self.session = None  # free the previous session (and its weights) first
        try:
            self._build(exact, keep_runtime=True)
        except BackendError:
            if not self.decomposed:
                raise
            # onnxruntime rejects a train-mode node itself (e.g. an opset-9 node with 3 outputs): probe by
            # the spec alone, without the runtime's deviation
            self._build(exact, keep_runtime=False)
            self.notes.append(
                "onnxruntime cannot run the train-mode BatchNormalization node(s) as written; they are "
                "measured by the ONNX spec only (no runtime deviation)"
            )
        self.exact = exact
        for plan in self.plans:
            if plan.input is None and plan.output is None:
                plan.note = (f"{plan.layer.name}: not measured (its tensors have no known rank or are not in the "
                             "main graph)")
            if plan.note and plan.note not in self.notes:
                self.notes.append(plan.note)

    def _build(self, exact: bool, keep_runtime: bool) -> None:
        self.session = None
        try:
            aug = _Augmenter(self.handle, self.layers, self.tmp, exact, self.inputs_only, keep_runtime)
            if self.initializer_stubs is None:
                self.initializer_stubs = aug.initializer_stubs
            self.decomposed = dict(aug.decomposed)
            model = aug.finish()
            self.plans = aug.plans
            self.output_names = list(aug.outputs)
            main_outputs = {o.name for o in self.handle.model.graph.output}
            folder = aug.folder
            del aug
            self.session = None
            self.statistics_first = False
            if not exact:
                try:
                    self.session = _session_statistics_first(model, folder, self.tmp, main_outputs)
                    self.statistics_first = True
                except Exception:  # noqa: BLE001 - an optimization of memory only: fall back to one pass
                    self.session = None
            if self.session is None:
                self.session = _session(model, folder, exact)
            del model
        except BackendError:
            raise
        except Exception as exc:  # noqa: BLE001 - any runtime failure is one line for the user
            raise BackendError(
                f"{self.handle.path}: onnxruntime cannot run the instrumented model: {_line(exc)}"
            ) from exc

    def close(self) -> None:
        self.session = None
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            values = self.session.run(self.output_names, feeds)
        except Exception as exc:  # noqa: BLE001
            raise BackendError(f"{self.handle.path}: onnxruntime failed: {_line(exc)}") from exc
        return dict(zip(self.output_names, values))

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, LayerProbe]:
        values = self._run(feeds)
        decoded: dict[int, TensorStats] = {}
        for plan in self.plans:
            for m in (plan.input, plan.output, plan.runtime):
                if m is not None and id(m) not in decoded:
                    stats = _decode(m, values)
                    if not self.exact and _needs_exact(m, stats):
                        self.notes.append("NaN/Inf seen: statistics measured with exact counts (slower)")
                        self._open(exact=True)
                        return self(feeds)
                    decoded[id(m)] = stats
        probes: dict[str, LayerProbe] = {}
        for plan in self.plans:
            get = lambda m: decoded.get(id(m)) if m is not None else None  # noqa: E731
            inp, out = get(plan.input), get(plan.output)
            if plan.affine is not None and out is not None:
                inp = _derive_input(out, *plan.affine)
            batch = (out or inp).batch_size if (out or inp) else 0
            if plan.spec and out is not None:
                runtime = get(plan.runtime)
                dev = _deviation(runtime, out) if runtime is not None else None
                probes[plan.layer.name] = LayerProbe(plan.layer.name, batch, inp, out, "spec", dev)
            elif inp is not None or out is not None:
                probes[plan.layer.name] = LayerProbe(plan.layer.name, batch, inp, out)
        return probes


def _line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]


def _gather_tables(handle: "OnnxHandle") -> dict[str, int]:
    """Rows of the table each integer graph input indexes through a Gather (its valid range)."""
    graph = handle.model.graph
    inits = {t.name: t for t in graph.initializer}
    highs: dict[str, int] = {}
    for node in graph.node:
        if node.op_type == "Gather" and len(node.input) >= 2 and node.input[0] in inits:
            axis = 0
            for attr in node.attribute:
                if attr.name == "axis":
                    axis = int(attr.i)
            dims = list(inits[node.input[0]].dims)
            if dims:
                rows = int(dims[axis % len(dims)])
                name = node.input[1]
                highs[name] = min(highs.get(name, rows), rows)
    return highs


def _check_inputs(view: ModelView, settings: ProbeSettings) -> None:
    """Fail on bad --input-shape / unresolvable dims before any session is built (ProbeDataError)."""
    names = {spec.name for spec in view.inputs}
    for name in settings.input_shapes:
        if name not in names:
            raise ProbeDataError(
                f"--input-shape {name}: the model has no input of that name (inputs: {', '.join(sorted(names))})"
            )
    if settings.data is None:
        for spec in view.inputs:
            fixed = spec.shape[0] if spec.shape and isinstance(spec.shape[0], int) else 1
            resolve_shape(spec, fixed, settings.input_shapes)


def run_probe(view: ModelView, settings: ProbeSettings, release_weights: bool = True) -> ProbeResult:
    """Probe every normalization layer of an ONNX model (see the module docstring).

    With ``release_weights`` (default), ``view.handle.model`` is a weight-less skeleton while the batches
    run and is reloaded from ``view.handle.path`` when next read (see :func:`_release`); pass False when
    the handle's model carries in-memory edits that are not in the file.
    """
    handle = view.handle
    if not view.layers:
        return ProbeResult(batch_sizes=tuple(settings.batch_sizes), layers={b: {} for b in settings.batch_sizes},
                           data_source=settings.data_source, seed=settings.seed,
                           notes=["no normalization layer to probe"])
    _check_inputs(view, settings)
    int_high = _gather_tables(handle)
    engines: list[_Engine] = []
    restorers: list[Any] = []

    def open_engine() -> _Engine:
        # built inside run_plan, while it draws the synthetic inputs in a worker thread
        engine = _Engine(handle, view.layers)
        engines.append(engine)
        if release_weights:
            restorers.append(_release(handle, engine.initializer_stubs))
        _trim()
        return engine

    try:
        result = run_plan(view, settings, None, open_runner=open_engine, int_high=int_high)
        result.notes.extend(n for n in engines[0].notes if n not in result.notes)
        return result
    finally:
        for engine in engines:
            engine.close()
        for restore in restorers:
            restore()  # lazy: the weights are reloaded when handle.model is next read


def measure_inputs(
    handle: "OnnxHandle", layers: list[NormLayer], batches: Iterable[dict[str, np.ndarray]]
) -> dict[str, TensorStats]:
    """Each layer's input statistics accumulated over all ``batches`` (inference mode, model as is)."""
    engine = _Engine(handle, layers, inputs_only=True)
    _trim()  # the optimizing session's freed heap back to the OS
    try:
        parts: dict[str, list[TensorStats]] = {}
        for feeds in batches:
            for name, probe in engine(feeds).items():
                if probe.input is not None:
                    parts.setdefault(name, []).append(probe.input)
        return {name: merge_stats(items) for name, items in parts.items()}
    finally:
        engine.close()
