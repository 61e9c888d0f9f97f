"""The static walk: every normalization layer of an ONNX graph, in graph order, as NormLayer objects.

Two kinds of layers are found:

- normalization *ops* (BatchNormalization in all its versions, InstanceNormalization, LayerNormalization,
  GroupNormalization, RMSNormalization, MeanVarianceNormalization and the com.microsoft / NHWC contrib ops);
- *decomposed* chains ``ReduceMean -> Sub -> (Pow 2 | Mul) -> ReduceMean -> Add(eps) -> Sqrt -> (Div |
  Reciprocal, Mul)`` (and the ``E[x^2] - E[x]^2`` variant onnx's own function bodies use, the RMS chain
  without the Sub, and tf.nn.batch_normalization's ``x * inv + (beta - mean * inv)``), which exporters write
  for LayerNorm and hand-written batch norms produce. Their reduction axes decide the kind: axes including
  the batch axis are batch statistics, the train-mode defect at inference; then, by data flow
  (dataflow.py), the decomposed norms those fixed sequences miss, and the reductions over the batch axis
  that no layer holds.

The trap: PyTorch's dynamo exporter lowers InstanceNorm to a training-mode BatchNormalization on the input
reshaped to ``[1, N*C, ...]`` whose running-stat outputs nobody reads. It looks like the train-mode defect
and is not; it is reported as an INSTANCE layer with a note.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np

from bncheck.backends.onnx.affine_bn import affine_batch_norms
from bncheck.backends.onnx.control_flow import Bodies, body_layers, hidden_norm_ops
from bncheck.backends.onnx.dataflow import (
    axis0_is_batch,
    batch_moments,
    batch_reductions,
    dataflow_norms,
    fixed_to_one,
    own_moments,
)
from bncheck.backends.onnx.folded_bn import (
    in_tf_batchnorm_scope,
    keras_torch_folds,
    tf_folds,
    torch_folds,
    ultralytics_export,
)
from bncheck.backends.onnx.graph import (
    ONNX_DOMAINS,
    GraphIndex,
    as_float_array,
    node_input,
    norm_axis,
    other_input,
    shape_dim,
)
from bncheck.backends.onnx.load import OnnxHandle
from bncheck.backends.onnx.names import op_name, readable_names, unique_names
from bncheck.backends.onnx.patterns import affine_after, decomposed, pinned_by_affine, reshaped_group_norm
from bncheck.backends.onnx.tensors import to_array
from bncheck.errors import few
from bncheck.model import NO_LAYERS_NOTE, BatchOp, BrokenWeights, Kind, NormLayer, Note
from bncheck.verdicts import FOLDED_NOTE, folded_values, neutral_values, non_finite_parameters

_MS = ("com.microsoft",)
_NHWC = ("com.ms.internal.nhwc",)
MVN_SPEC_EPSILON = 1e-9


def walk(handle: OnnxHandle) -> list[NormLayer]:
    """Every normalization layer of ``handle``'s main graph and its control-flow bodies, in topological order."""
    return walk_with_notes(handle)[0]


def walk_with_notes(handle: OnnxHandle) -> tuple[list[NormLayer], list[Note]]:
    """The layers, and the model-level notes (no layer found, folded BN, norm ops the walk cannot see)."""
    layers, notes, _, _, _ = walk_all(handle)
    return layers, notes


def walk_all(
    handle: OnnxHandle,
) -> tuple[list[NormLayer], list[Note], list[BatchOp], list[BatchOp], list[BrokenWeights]]:
    """The layers, the model-level notes, the batch reductions outside every layer (dataflow.py), in a file
    that fixes the batch to 1 those a relaxed batch would reach (ModelView.relaxed_batch_ops), and the weighted
    ops whose weights hold NaN or Inf."""
    g = GraphIndex(handle, dequantized=True)
    spans = _spans(g)
    # a norm of a constant is no layer of the data: timm's weight standardization, F.batch_norm(weight, training=True)
    # folded by the exporter into a train-mode BatchNormalization of the weight, depends on no sample (nor does
    # DeBERTa's LayerNorm of its relative position embeddings)
    # (one whose stored parameters hold NaN or Inf stays, outside training mode: every output it makes is broken)
    free = [(first, layer) for first, layer, _ in spans if _of_constant(g, layer)]
    constant = readable_names(g, free) if free else []  # (names read over the whole graph: only where needed)
    dropped = {id(layer) for _, layer in free}
    spans = [span for span in spans if id(span[1]) not in dropped]
    batch_ops = batch_reductions(g, spans)
    relaxed_ops = batch_reductions(g, spans, relaxed=True) if fixed_to_one(g) else []
    found = sorted(((first, layer) for first, layer, _ in spans), key=lambda item: item[0])
    in_bodies = Bodies(g)
    layers = _with_body_layers(in_bodies, found, readable_names(g, found))
    notes = _model_notes(g, layers, in_bodies, batch_ops)
    if constant:
        notes.append(Note("info", _CONSTANT_NOTE.format(count=len(constant), first=constant[0].name)))
    # a layer's non-finite parameters are BN005 of their own: the elementwise constants that spell them (gamma's Mul,
    # inside the layer, after it or computing its scale) would be the same NaN again
    elementwise = not any(non_finite_parameters(layer) for layer in layers)
    broken = _broken_weights(g, elementwise)
    # a batch norm with a NaN variance that torch's exporter folded into a Conv inside a Loop's body
    for k, (_, graph, _) in enumerate(in_bodies.found):
        if any(node.op_type in _WEIGHTED_OPS for node in graph.node):
            broken += _broken_weights(in_bodies.index(k), elementwise)
    return layers, notes, batch_ops, relaxed_ops, broken


def _spans(g: GraphIndex) -> list[tuple[int, NormLayer, list[int]]]:
    """Every norm layer of ``g``'s nodes: ops, chains the fixed patterns and the data flow find, and batch norms
    left as their affine map; each with its first node's position and its nodes'."""
    spans: list[tuple[int, NormLayer, list[int]]] = []
    used: set[int] = set()
    for idx, node in enumerate(g.nodes):
        handler = _OP_HANDLERS.get(node.op_type)
        if handler is None:
            continue
        domains, fn = handler
        if node.domain not in domains:
            continue
        layer, nodes = fn(g, idx)
        used.update(nodes)
        spans.append((min(nodes), layer, nodes))
    for layer, nodes in decomposed(g, used):
        used.update(nodes)
        spans.append((min(nodes), layer, nodes))
    spans.extend((min(nodes), layer, nodes) for layer, nodes in dataflow_norms(g, used))
    taken = used.union(*(nodes for _, _, nodes in spans))
    spans.extend((min(nodes), layer, nodes) for layer, nodes in affine_batch_norms(g, taken))
    return spans


def _data_spans(g: GraphIndex) -> list[tuple[int, NormLayer, list[int]]]:
    """:func:`_spans` without the norms of constants (as walk_all leaves them out of the main graph's layers)."""
    return [span for span in _spans(g) if not _of_constant(g, span[1])]


def _of_constant(g: GraphIndex, layer: NormLayer) -> bool:
    """A norm of a constant, no layer of the data (see walk_all), unless its stored parameters are broken."""
    return g.data_free(layer.input) and not _broken_constant(layer)


def _with_body_layers(in_bodies: Bodies, found: list[tuple[int, NormLayer]], named: list[NormLayer]) -> list[NormLayer]:
    """The main graph's layers with those of the bodies (control_flow.py), each after the layers before the
    node holding it; names unique over all of them (a module called in the graph and in a Loop)."""
    inside = body_layers(in_bodies, _data_spans)
    if not inside:
        return named
    order = sorted(
        [(first, 0, layer) for (first, _), layer in zip(found, named)] + [(at, 1, layer) for at, layer in inside],
        key=lambda item: item[:2],
    )
    layers = [layer for _, _, layer in order]
    names = unique_names([layer.name for layer in layers])
    return [layer if name == layer.name else replace(layer, name=name) for layer, name in zip(layers, names)]


#: ops whose constant operands are learned weights, where NaN or Inf is never meant (an Add's or a Where's
#: constant may be a -inf attention mask): the convolution a batch norm with NaN statistics was folded into
_WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
#: elementwise ops whose constant operand NaN, not Inf, is never meant either: a batch norm folded into a per-channel
#: scale and shift (Keras 3's ONNX export on torch: x - mean, times gamma / sqrt(var + eps), plus beta)
_ELEMENTWISE_OPS = frozenset({"Mul", "Add", "Sub", "Div"})
_FLOATS = frozenset({1, 10, 11})  # TensorProto's FLOAT, FLOAT16, DOUBLE (onnx is not imported here)


def _broken_weights(g: GraphIndex, with_elementwise: bool) -> list[BrokenWeights]:
    """Each weighted op whose stored weights (the initializers it reads, as the loader holds them: not those left
    in external files) hold NaN or Inf; the elementwise ops' constants only ``with_elementwise``."""
    found = []
    broken_outputs: set[str] = set()
    for idx, node in enumerate(g.nodes):
        elementwise = node.op_type in _ELEMENTWISE_OPS
        if elementwise and not with_elementwise:
            continue
        if (node.op_type not in _WEIGHTED_OPS and not elementwise) or node.domain not in ONNX_DOMAINS:
            continue
        bad = {}
        for t in node.input if elementwise else node.input[1:]:
            init = g.stored_tensor(t)
            if init is None or init.data_type not in _FLOATS or init.data_location == init.EXTERNAL:
                continue
            if elementwise and all(d == 1 for d in init.dims):
                continue  # a scalar: a folded scale and shift holds one value per channel
            values = to_array(init)
            # one sum reaches NaN or Inf wherever an element holds one (a float16 sum may overflow: then counted)
            with np.errstate(over="ignore", invalid="ignore"):
                total = values.sum()
            if np.isfinite(total):
                continue
            nan, inf = int(np.isnan(values).sum()), 0 if elementwise else int(np.isinf(values).sum())
            if nan or inf:
                bad[t] = (nan, inf, int(values.size))
        if bad and not (elementwise and any(t in broken_outputs for t in node.input)):
            what = "constant operands" if elementwise else "weights"
            found.append(BrokenWeights(op_name(g, idx, list(bad)), g.node_name(idx), node.op_type, bad, what))
        if bad:  # a folded scale's NaN reaches its shift: one finding for the two
            broken_outputs.update(node.output)
    return found


def _broken_constant(layer: NormLayer) -> bool:
    """A norm of a constant outside training mode whose stored parameters hold NaN or Inf (BN005 judges it)."""
    return not layer.training and bool(non_finite_parameters(layer))


#: the note of norms whose input is a constant (weight standardization), left out of the layers
_CONSTANT_NOTE = (
    "{count} normalization node(s) (first: {first!r}) normalize a constant, not the data (a weight standardized, as "
    "in NF-Nets, or a stored table, as DeBERTa's relative position embeddings): the same output for every input, "
    "no layer of the data; not checked"
)


# ====================================================================== helpers


def _eps(attrs: dict, default: float = 1e-5) -> float:
    """The epsilon attribute as stored (float32), the spec default rounded the same way when absent."""
    return float(np.float32(attrs.get("epsilon", default)))


def _params(g: GraphIndex, node, *positions: int):
    return tuple(as_float_array(g.param(node_input(node, i))) for i in positions)


def _trailing(axis: int | None, rank: int | None) -> tuple[int, ...] | None:
    if axis is None or rank is None:
        return None
    return tuple(range(axis, rank))


def _channels(g: GraphIndex, x: str, channel_axis: int | None, *params) -> int | None:
    dim = shape_dim(g, x, channel_axis)
    if dim is not None:
        return dim
    for p in params:
        if p is not None and p.ndim == 1:
            return int(p.size)
    return None


def _base(g: GraphIndex, idx: int, **fields) -> NormLayer:
    node = g.nodes[idx]
    x = node_input(node, 0)
    return NormLayer(
        name=g.node_name(idx),
        op_type=node.op_type,
        domain=node.domain,
        nodes=(g.node_name(idx),),
        input=x,
        output=node.output[0] if node.output else "",
        inputs=tuple(node.input),
        outputs=tuple(node.output),
        input_shape=g.shape(x),
        **fields,
    )


# ====================================================================== ops


def _batch_norm(g: GraphIndex, idx: int) -> tuple[NormLayer, list[int]]:
    node = g.nodes[idx]
    attrs = g.attrs(idx)
    nhwc = node.domain in _NHWC
    version = g.opset.get(node.domain, g.opset.get("", 0))
    x = node_input(node, 0)
    rank = g.rank(x)
    scale, bias, mean, var = _params(g, node, 1, 2, 3, 4)
    extra_outputs = [o for o in node.output[1:] if o]
    notes: list[str] = []
    extra: dict = {"opset": version}
    if "training_mode" in attrs or version >= 14:
        training = bool(attrs.get("training_mode", 0))
        extra["training_mode"] = int(attrs.get("training_mode", 0))
    else:
        training = bool(extra_outputs)
        if extra_outputs:
            notes.append(
                f"opset {version}: {len(extra_outputs)} extra output(s) (running/saved statistics) mean training mode"
            )
    if version < 7 and not nhwc:
        is_test = int(attrs.get("is_test", 0))
        extra["is_test"] = is_test
        if is_test:
            training = False
            notes = [n for n in notes if "extra output" not in n]
        elif not training:
            training = True
            notes.append(
                "opset < 7 with is_test=0: training mode per the spec (batch statistics); "
                "runtimes that ignore is_test with a single output use the running statistics"
            )
    spatial = int(attrs.get("spatial", 1)) if version < 9 else 1
    if nhwc:
        channel_axis = None if rank is None else rank - 1
        axes = None if rank is None else tuple(range(rank - 1))
    else:
        channel_axis = 1
        axes = (0,) if spatial == 0 else (None if rank is None else (0,) + tuple(range(2, rank)))
    if spatial == 0:
        extra["spatial"] = 0
        notes.append("spatial=0: per-activation statistics over the batch axis only")
    common = {
        "channel_axis": channel_axis,
        "channels": _channels(g, x, channel_axis, scale, mean),
        "epsilon": _eps(attrs),
        "momentum": float(np.float32(attrs.get("momentum", 0.9))),
        "scale": scale,
        "bias": bias,
    }
    if training and _is_lowered_instance_norm(g, idx):
        reshape = g.produced_by(x, "Reshape")
        extra.update(lowered_instance_norm=True, unused_running_mean=mean, unused_running_var=var)
        source = g.nodes[reshape].input[0] if reshape is not None else None
        if source:
            extra["source"] = source
        note = (
            "lowered InstanceNorm (PyTorch dynamo export): training-mode BatchNormalization on the input "
            "reshaped to [1, N*C, ...]; each sample's channel is normalized over its own spatial axes, "
            "the running-statistic outputs are unused; not batch statistics"
        )
        return _per_sample(g, idx, Kind.INSTANCE, axes, True, notes + [note], extra, common), [idx]
    # moments of the batch as its statistics: no stored ones (None above), and no reduction of its own to report
    moments = batch_moments(g, idx) if mean is None and var is None else None
    computed = not training and (mean is None or var is None)
    if moments is None and computed and own_moments(g, idx) and not axis0_is_batch(g, x):
        return _per_sample_moments(g, idx, axes, notes, extra, common), [idx]  # moments of no batch
    if moments is not None:
        extra["batch_moments"] = True
        notes.append(BATCH_MOMENTS_NOTE)
    if not training and mean is not None and var is not None and folded_values(mean, var):
        notes.append(FOLDED_NOTE)
    elif (
        not training
        and g.model.producer_name == "keras2onnx"
        and mean is not None
        and var is not None
        and neutral_values(mean, var)
    ):
        # keras2onnx's BatchNormalization converter folds the statistics into scale and bias and writes mean
        # 0 * mean (+0.0 where the mean was >= 0), variance 1 + 0 * var and epsilon x1e-3, whatever the model
        extra["folded_by"] = "keras2onnx"
        notes.append(KERAS2ONNX_FOLDED_NOTE)
    layer = _base(
        g,
        idx,
        kind=Kind.BATCH,
        axes=axes,
        training=training,
        batch_statistics=training or moments is not None,
        uses_running_stats=not training and moments is None,
        mean=mean,
        var=var,
        notes=tuple(notes),
        extra=extra,
        unreadable=None
        if training or moments is not None or (mean is not None and var is not None)
        else "running statistics not stored in the file (graph inputs or computed)",
        **common,
    )
    if moments is None:
        return layer, [idx]
    held = sorted([idx, *moments])
    return replace(layer, nodes=tuple(g.node_name(i) for i in held)), held


def _per_sample(
    g: GraphIndex, idx: int, kind: Kind, axes, training: bool, notes: list[str], extra: dict, common: dict
) -> NormLayer:
    """A BatchNormalization of its input reshaped to [1, M, ...], the batch folded into M: per-sample sets, no
    batch statistics, no running ones (``training``: its flag as written)."""
    return _base(
        g,
        idx,
        kind=kind,
        axes=axes,
        training=training,
        batch_statistics=False,
        uses_running_stats=False,
        batch_axis=None,
        notes=tuple(notes),
        extra=extra,
        **common,
    )


def _per_sample_moments(g: GraphIndex, idx: int, axes, notes: list[str], extra: dict, common: dict) -> NormLayer:
    """An inference-mode BatchNormalization fed the moments of its own input over [1, M, ...] (its axis 0 is no
    batch): each of the M rows is normalized over its own elements, as the layer the exporter lowered does."""
    x = node_input(g.nodes[idx], 0)
    # tf's fused LayerNormalization reshapes to [1, M, K, 1], K the normalized elements; other layouts are read
    # as a lowered instance norm's [1, N*C, H, W]
    kind = Kind.LAYER if g.rank(x) == 4 and shape_dim(g, x, 3) == 1 else Kind.INSTANCE
    extra["own_moments"] = True
    reshape = g.produced_by(x, "Reshape")
    if reshape is not None and g.nodes[reshape].input:
        extra["source"] = g.nodes[reshape].input[0]
    note = (
        "mean and variance computed in the graph from its own input over every axis but 1 (tf2onnx's fused "
        "LayerNormalization: the input reshaped to [1, M, K, 1]): each row is normalized over its own elements, "
        "no stored statistics"
    )
    layer = _per_sample(g, idx, kind, axes, False, notes + [note], extra, common)
    gamma, beta = affine_after(g, layer.output)
    if layer.scale is None and layer.bias is None and (gamma is not None or beta is not None):
        # the BatchNormalization's own are ones and zeros of a computed shape: the Keras layer's gamma and beta
        # follow the reshape back (BN005 reads them)
        layer = replace(layer, scale=gamma, bias=beta)
    shape = layer.input_shape
    k = next((p.size for p in (gamma, beta) if p is not None and p.size > 1), None)
    if kind is Kind.LAYER and shape is not None and not isinstance(shape[2], int) and k is not None:
        # a reshape target computed from the input's shape leaves K open to onnx's inference; Keras's gamma and
        # beta have the shape of the normalized axes (a scalar one, a constant factor after a LayerNormalization
        # without its own affine, says nothing)
        layer = replace(layer, input_shape=(*shape[:2], int(k), *shape[3:]))
    return layer


#: a BatchNormalization fed the moments of its own input over the batch (dataflow.batch_moments)
BATCH_MOMENTS_NOTE = (
    "mean and variance computed in the graph as the moments of its own input over the batch and spatial axes, "
    "as torch writes BatchNorm with track_running_stats=False: it normalizes with the current batch's "
    "statistics and stores none"
)

#: why a keras2onnx layer's 0 and 1 are not statistics (see _batch_norm)
KERAS2ONNX_FOLDED_NOTE = (
    "running mean 0 and variance 1 written by keras2onnx, which folds the statistics into scale and bias (and "
    "epsilon x1e-3) for every BatchNormalization: an affine map whose 0/1 are not statistics of its input (not "
    "judged by BN003 or BN004's clamp, not recomputed by fix)"
)


def _is_lowered_instance_norm(g: GraphIndex, idx: int) -> bool:
    """X comes from a Reshape to [1, ...] and the running-statistic outputs are not read."""
    node = g.nodes[idx]
    x = node_input(node, 0)
    reshape = g.produced_by(x, "Reshape")
    if reshape is None:
        return False
    target = g.ints(node_input(g.nodes[reshape], 1))
    leading_one = (target is not None and target.size > 0 and int(target.ravel()[0]) == 1) or (shape_dim(g, x, 0) == 1)
    running_unused = not any(g.is_used(o) for o in node.output[1:3])
    return leading_one and running_unused


def _instance_norm(g: GraphIndex, idx: int) -> tuple[NormLayer, list[int]]:
    grouped = reshaped_group_norm(g, idx, _eps(g.attrs(idx)))
    if grouped is not None:
        return grouped
    node = g.nodes[idx]
    x = node_input(node, 0)
    rank = g.rank(x)
    scale, bias = _params(g, node, 1, 2)
    layer = _base(
        g,
        idx,
        kind=Kind.INSTANCE,
        axes=None if rank is None else tuple(range(2, rank)),
        channel_axis=1,
        channels=_channels(g, x, 1, scale, bias),
        epsilon=_eps(g.attrs(idx)),
        scale=scale,
        bias=bias,
    )
    return layer, [idx]


def _trailing_norm(
    g: GraphIndex, idx: int, kind: Kind, scale_at: int, bias_at: int | None, centered: bool, default_axis: int = -1
) -> tuple[NormLayer, list[int]]:
    """LayerNormalization, RMSNormalization and their contrib cousins: statistics over axis..r-1."""
    node = g.nodes[idx]
    attrs = g.attrs(idx)
    x = node_input(node, 0)
    rank = g.rank(x)
    scale = as_float_array(g.param(node_input(node, scale_at)))
    bias = as_float_array(g.param(node_input(node, bias_at))) if bias_at is not None else None
    raw_axis = int(attrs.get("axis", default_axis))
    axis = norm_axis(raw_axis, rank)
    axes = _trailing(axis, rank)
    channel_axis = None if rank is None else rank - 1
    batch_stats = axes is not None and 0 in axes
    notes: tuple[str, ...] = ()
    if batch_stats:
        notes = (f"axis={raw_axis} includes the batch axis: a sample's output depends on its batch companions",)
    layer = _base(
        g,
        idx,
        kind=kind,
        axes=axes,
        channel_axis=channel_axis,
        channels=_channels(g, x, channel_axis, scale),
        epsilon=_eps(attrs),
        scale=scale,
        bias=bias,
        centered=centered,
        batch_statistics=batch_stats,
        notes=notes,
        extra={"axis": raw_axis},
    )
    pinned = pinned_by_affine(layer.input_shape, axes, scale if scale is not None else bias)
    if pinned != layer.input_shape:
        layer = replace(layer, input_shape=pinned)
    return layer, [idx]


def _layer_norm(g, idx):
    return _trailing_norm(g, idx, Kind.LAYER, 1, 2, True)


def _rms_norm(g, idx):
    return _trailing_norm(g, idx, Kind.RMS, 1, None, False)


def _skip_layer_norm(g, idx):
    # inputs: input, skip, gamma, beta?, bias?; the normalized tensor is input + skip (+ bias)
    layer, nodes = _trailing_norm(g, idx, Kind.LAYER, 2, 3, True)
    return _with_skip_note(layer), nodes


def _skip_simplified_layer_norm(g, idx):
    layer, nodes = _trailing_norm(g, idx, Kind.RMS, 2, None, False)
    return _with_skip_note(layer), nodes


def _with_skip_note(layer: NormLayer) -> NormLayer:
    note = "normalizes input + skip (+ bias), over the last axis"
    # the probe measures ``input`` alone: a moved skip moves the output while the measured input stays
    return replace(layer, notes=layer.notes + (note,), extra={**layer.extra, "summed_input": True})


def _embed_layer_norm(g: GraphIndex, idx: int) -> tuple[NormLayer, list[int]]:
    """com.microsoft EmbedLayerNormalization (onnxruntime.transformers' BERT embeddings): a LayerNorm over the
    hidden axis of the sum of word, position and segment embeddings looked up from token ids. That sum is no
    tensor of the graph unless the node writes it (its third output), so the layer is read from its gamma
    (input 5), beta (input 6) and epsilon, and measured only through that output when there is one."""
    node = g.nodes[idx]
    attrs = g.attrs(idx)
    scale, bias = _params(g, node, 5, 6)
    summed = node.output[2] if len(node.output) > 2 else ""
    output = node.output[0] if node.output else ""
    layer = NormLayer(
        name=g.node_name(idx),
        op_type=node.op_type,
        domain=node.domain,
        nodes=(g.node_name(idx),),
        input=summed,
        output=output,
        inputs=tuple(node.input),
        outputs=tuple(node.output),
        input_shape=g.shape(summed) if summed else g.shape(output),
        kind=Kind.LAYER,
        axes=(2,),
        channel_axis=2,
        channels=int(scale.size) if scale is not None else shape_dim(g, output, 2),
        epsilon=_eps(attrs, 1e-12),
        scale=scale,
        bias=bias,
        notes=("normalizes the sum of the word, position and segment embeddings its token ids look up",),
    )
    return layer, [idx]


def _group_norm(g: GraphIndex, idx: int) -> tuple[NormLayer, list[int]]:
    node = g.nodes[idx]
    attrs = g.attrs(idx)
    x = node_input(node, 0)
    rank = g.rank(x)
    scale, bias = _params(g, node, 1, 2)
    version = g.opset.get(node.domain, 0)
    groups = int(attrs.get("num_groups", 0)) or None
    extra = {"opset": version}
    notes: tuple[str, ...] = ()
    channels = shape_dim(g, x, 1)
    if version < 21:
        extra["per_group_scale"] = True
        notes = ("opset 18 GroupNormalization: scale and bias are per group, not per channel",)
    elif channels is None and scale is not None:
        channels = int(scale.size)
    layer = _base(
        g,
        idx,
        kind=Kind.GROUP,
        axes=None if rank is None else tuple(range(1, rank)),
        channel_axis=1,
        channels=channels,
        groups=groups,
        epsilon=_eps(attrs),
        scale=scale,
        bias=bias,
        notes=notes,
        extra=extra,
    )
    return layer, [idx]


def _ms_group_norm(g: GraphIndex, idx: int) -> tuple[NormLayer, list[int]]:
    """com.microsoft GroupNorm / SkipGroupNorm: NHWC by default (channels_last=1)."""
    node = g.nodes[idx]
    attrs = g.attrs(idx)
    x = node_input(node, 0)
    rank = g.rank(x)
    scale, bias = _params(g, node, 1, 2)
    channels_last = int(attrs.get("channels_last", 1))
    channel_axis = (None if rank is None else rank - 1) if channels_last else 1
    layer = _base(
        g,
        idx,
        kind=Kind.GROUP,
        axes=None if rank is None else tuple(range(1, rank)),
        channel_axis=channel_axis,
        channels=_channels(g, x, channel_axis, scale),
        groups=int(attrs.get("groups", 0)) or None,
        epsilon=_eps(attrs),
        scale=scale,
        bias=bias,
        extra={"channels_last": channels_last, "activation": int(attrs.get("activation", 0))},
    )
    return layer, [idx]


def _mvn(g: GraphIndex, idx: int) -> tuple[NormLayer, list[int]]:
    node = g.nodes[idx]
    x = node_input(node, 0)
    rank = g.rank(x)
    raw = [int(a) for a in g.attrs(idx).get("axes", [0, 2, 3])]
    axes = None
    if rank is not None or all(a >= 0 for a in raw):
        normalized = [norm_axis(a, rank) for a in raw]
        axes = tuple(sorted({a for a in normalized if a is not None}))
    kept = None if axes is None or rank is None else [a for a in range(rank) if a not in axes]
    channel_axis = kept[0] if kept is not None and len(kept) == 1 else None
    batch_stats = axes is not None and 0 in axes
    notes = [
        f"no epsilon attribute: the ONNX spec adds {MVN_SPEC_EPSILON:g} to the standard deviation, onnxruntime's "
        "kernel nothing (a set of equal values is NaN there, 0 by the spec)"
    ]
    if batch_stats:
        notes.append("axes include the batch axis: statistics mix the samples of a batch")
    layer = _base(
        g,
        idx,
        kind=Kind.MEAN_VARIANCE,
        axes=axes,
        channel_axis=channel_axis,
        channels=shape_dim(g, x, channel_axis),
        epsilon=None,
        batch_statistics=batch_stats,
        notes=tuple(notes),
        extra={"spec_epsilon": MVN_SPEC_EPSILON},
    )
    return layer, [idx]


_OP_HANDLERS: dict[str, tuple[tuple[str, ...], Callable[[GraphIndex, int], tuple[NormLayer, list[int]]]]] = {
    "BatchNormalization": (ONNX_DOMAINS + _NHWC, _batch_norm),
    "InstanceNormalization": (ONNX_DOMAINS, _instance_norm),
    "LayerNormalization": (ONNX_DOMAINS + _MS, _layer_norm),
    "GroupNormalization": (ONNX_DOMAINS, _group_norm),
    "RMSNormalization": (ONNX_DOMAINS, _rms_norm),
    "MeanVarianceNormalization": (ONNX_DOMAINS, _mvn),
    # onnxruntime registers SimplifiedLayerNormalization in the ONNX domain, the others in com.microsoft
    "SimplifiedLayerNormalization": (ONNX_DOMAINS + _MS, _rms_norm),
    "SkipLayerNormalization": (_MS, _skip_layer_norm),
    "SkipSimplifiedLayerNormalization": (_MS, _skip_simplified_layer_norm),
    "EmbedLayerNormalization": (_MS, _embed_layer_norm),
    "GroupNorm": (_MS, _ms_group_norm),
    "SkipGroupNorm": (_MS, _ms_group_norm),
}


# ====================================================================== model notes


_NORM_OPS = frozenset(_OP_HANDLERS)


def _model_notes(
    g: GraphIndex, layers: list[NormLayer], in_bodies: Bodies, batch_ops: Sequence[BatchOp] = ()
) -> list[Note]:
    notes: list[Note] = []
    folded = []
    for idx, node in enumerate(g.nodes):
        if node.op_type not in ("Conv", "ConvTranspose") or not node.output:
            continue
        # a BatchNorm left as its affine map scales per channel: a per-channel Add alone is the conv's bias,
        # which exporters such as paddle2onnx write as its own node; the bias may come before the scale
        outputs = [node.output[0]] + [g.nodes[a].output[0] for a in _per_channel_users(g, node.output[0], "Add")]
        muls = [g.nodes[m].name for out in outputs for m in _per_channel_users(g, out, "Mul")]
        # a Mul of a Keras layer's batchnorm scope: tf2onnx's fold, which its own note names by the layer
        if muls and not all(in_tf_batchnorm_scope(name) for name in muls):
            folded.append((g.node_name(idx), node.op_type))
    if not layers and batch_ops:
        count = len(batch_ops)
        notes.append(
            Note(
                "info",
                f"no normalization layer found in the graph, but {count} "
                f"reduction{'s' if count > 1 else ''} over the batch axis (BN002)",
            )
        )
    elif not layers:
        # not "nothing to check": a probe still runs the output-level test, and its BN002 would contradict it
        notes.append(Note("info", NO_LAYERS_NOTE.format(where="graph")))
    if folded:
        ops = "/".join(sorted({op for _, op in folded}))  # Conv, ConvTranspose or both
        notes.append(
            Note(
                "info",
                f"{len(folded)} {ops} node(s) (first: {folded[0][0]!r}) are followed by a per-channel Mul (and Add) "
                f"with constant operands: BatchNorm may have been folded into the {ops} weights; folded statistics cannot "
                "be checked",
            )
        )
    notes += _torch_fold_notes(g) + _tf_fold_notes(g, layers) + _ultralytics_note(g)
    notes += _keras_torch_fold_note(g, layers)
    hidden, holders = hidden_norm_ops(in_bodies, _OP_HANDLERS)
    if hidden:
        notes.append(
            Note(
                "warning",
                f"{hidden} normalization layer(s) inside control-flow subgraphs or model-local functions "
                f"were not inspected (ops, or chains written out op by op): in {', '.join(holders[:3])}"
                + (f" and {len(holders) - 3:,} more" if len(holders) > 3 else ""),
            )
        )
    return notes


def _torch_fold_notes(g: GraphIndex) -> list[Note]:
    """What torch's exporters folded away: eval-mode BatchNorms merged into the Conv or Gemm before them, whose
    statistics no check can read, and the export option that keeps them."""
    dynamo, computed = torch_folds(g)
    notes = []
    if dynamo:
        notes.append(
            Note(
                "warning",
                f"{len(dynamo)} BatchNorm(s) ({few(dynamo)}) were folded into the convolution or linear layer before "
                "them by torch.onnx.export's optimizer (onnxscript's FuseBatchNormInto* rules, its default "
                "optimize=True): their statistics are not in the file and are not checked; export with "
                "optimize=False to check them",
            )
        )
    if computed:
        notes.append(
            Note(
                "info",
                f"{len(computed)} convolution(s) ({few(computed)}) read a weight and bias that torch.onnx.export "
                "computed by constant folding, as it does when it folds an eval-mode BatchNorm into the convolution "
                "before it: folded statistics cannot be checked; export with do_constant_folding=False to keep the "
                "BatchNorms",
            )
        )
    return notes


def _named_note(level: str, names: list[str], text: str) -> list[Note]:
    """A note on ``names`` (``text`` with their {count} and a few of their {names}), none where there are none."""
    return [Note(level, text.format(count=len(names), names=few(names)))] if names else []


def _tf_fold_notes(g: GraphIndex, layers: list[NormLayer]) -> list[Note]:
    """Keras BatchNormalization layers tf2onnx merged into the ops before them (those not found as layers)."""
    return _named_note(
        "warning",
        tf_folds(g, layers),
        "{count} Keras BatchNormalization layer(s) ({names}) were folded into the ops before them by the "
        "conversion (tf2onnx): their statistics are not in the file and are not checked; check the Keras file "
        "itself (bncheck reads .keras and .h5 files)",
    )


def _keras_torch_fold_note(g: GraphIndex, layers: list[NormLayer]) -> list[Note]:
    """Batch norms Keras 3's torch backend wrote as ``(x - mean) * k + beta``, their variance folded into k."""
    return _named_note(
        "info",
        keras_torch_folds(g, layers),
        "{count} per-channel map(s) (x - c) * k + b of constant c, k and b ({names}) look like batch norms whose "
        "variance an exporter folded into k (Keras 3's ONNX export on the torch backend writes BatchNormalization "
        "so): not checked; check the Keras file itself (bncheck reads .keras and .h5 files)",
    )


def _ultralytics_note(g: GraphIndex) -> list[Note]:
    version = ultralytics_export(g.model)
    if version is None:
        return []
    by = f"Ultralytics {version}" if version else "Ultralytics"
    return [
        Note(
            "info",
            f"exported by {by}, whose export fuses each convolution's BatchNorm into it before writing the file "
            "(model.fuse()): those statistics are not in the file and are not checked",
        )
    ]


def _per_channel_users(g: GraphIndex, tensor: str, op_type: str) -> list[int]:
    """The ``op_type`` nodes reading ``tensor`` with a constant of more than one value: per channel, as a
    BatchNorm's scale and shift are (a scalar, such as PP-LCNetV3's learnable affine block or a residual
    scale, is no BatchNorm)."""
    found = []
    for user in g.users(tensor, op_type):
        other = other_input(g.nodes[user], tensor)
        value = g.param(other) if other is not None else None
        if value is not None and np.size(value) > 1 and g.nodes[user].output:
            found.append(user)
    return found
