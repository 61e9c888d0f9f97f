"""Batch norms that onnxoptimizer's ``fuse_bn_into_conv`` folded into a convolution as ops, read back at load.

onnxoptimizer's pass (among its default passes) replaces Conv -> BatchNormalization by one Conv whose weight and
bias the graph computes from the batch norm's stored parameters, and leaves the arithmetic to a later constant
folding::

    k = gamma / Sqrt(var + Cast(eps));  W' = W * Unsqueeze(k);  b' = (Cast(b) - mean) * k + beta

The statistics stay in the file, but no node normalizes, so nothing would be checked. Each such convolution gets
W and b back, with a BatchNormalization after it that computes what the fold computes, so that the walk, the probe
and ``fix`` read it as any other inference batch norm.

torch's exporters, tf2onnx and onnxsim compute the fold instead: there the statistics are gone and nothing is left
to check. What the file still tells of such folds (:func:`torch_folds`, :func:`tf_folds`, :func:`keras_torch_folds`)
is named in the walk's model notes, with the way to a file that keeps the batch norms.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bncheck.backends.onnx.graph import (
    ONNX_DOMAINS,
    GraphIndex,
    copied,
    copy_messages,
    nested_bodies,
    other_input,
    outer_reads,
)
from bncheck.backends.onnx.names import module_path, op_name
from bncheck.model import NormLayer

if TYPE_CHECKING:  # onnx and numpy are imported lazily: `bncheck --help` must not pay for them
    import numpy as np
    import onnx

#: op types every fold needs (a file without them all holds no fold: most files)
_FOLD_OPS = frozenset({"Conv", "Sqrt", "Unsqueeze"})


@dataclass
class _Fold:
    conv: int
    weight: str
    bias: str
    gamma: str
    beta: str
    mean: str
    var: str
    epsilon: float
    nodes: list[int]  # the fold's arithmetic, dropped where nothing else reads it


def unfold_conv_batch_norms(model: onnx.ModelProto) -> list[str]:
    """Rewrite, in ``model``'s main graph, each convolution that onnxoptimizer's fold feeds as the convolution
    and an inference BatchNormalization after it (the same function); the convolutions' names, in graph order."""
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ONNX_DOMAINS), 0)
    if opset < 7 or not _FOLD_OPS.issubset(node.op_type for node in graph.node):
        return []  # before opset 7 the fold's Mul cannot broadcast: no such file runs
    facts = _Facts(graph)
    folds = [f for i, node in enumerate(graph.node) if node.op_type == "Conv" for f in [_match(facts, i)] if f]
    if not folds:
        return []
    from onnx import helper

    taken = facts.names()
    dropped: set[int] = set()
    after: dict[int, onnx.NodeProto] = {}
    convs: list[str] = []
    for fold in folds:
        conv = graph.node[fold.conv]
        convs.append(conv.name or conv.output[0])
        out = conv.output[0]
        raw = _fresh(f"{out}_before_batch_norm", taken)
        for tensor in (conv.input[1], conv.input[2]):
            facts.uses[tensor] -= 1
        conv.input[1], conv.input[2] = fold.weight, fold.bias
        facts.uses.update((fold.weight, fold.bias, fold.gamma, fold.beta, fold.mean, fold.var))
        conv.output[0] = raw
        bn = helper.make_node(
            "BatchNormalization",
            [raw, fold.gamma, fold.beta, fold.mean, fold.var],
            [out],
            name=_fresh(_bn_name(conv), taken) if conv.name else "",
            epsilon=fold.epsilon,
        )
        for prop in conv.metadata_props:  # torch's module path: the layer is named after the module it sits in
            bn.metadata_props.add(key=prop.key, value=prop.value)
        after[fold.conv] = bn
        dropped |= _unread(graph, facts, fold.nodes)
    read_by_dropped = {t for i in dropped for t in graph.node[i].input}
    written_by_dropped = {t for i in dropped for t in graph.node[i].output}
    nodes = []
    for i, node in enumerate(graph.node):
        if i not in dropped:
            nodes.append(copied(node))
        if i in after:
            nodes.append(after[i])
    del graph.node[:]
    copy_messages(graph.node, nodes)
    _drop_unread_initializers(graph, facts, read_by_dropped)
    # shapes a tool recorded for the dropped arithmetic's results (onnxsim, shape inference) would name tensors
    # no node writes any more
    for i in reversed([i for i, v in enumerate(graph.value_info) if v.name in written_by_dropped]):
        del graph.value_info[i]
    return convs


class _Facts:
    """Who writes and how many read each tensor of the main graph (a read from a body counts, as any other)."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.producer = {out: i for i, node in enumerate(graph.node) for out in node.output if out}
        self.uses: Counter[str] = Counter(t for node in graph.node for t in node.input if t)
        for node in graph.node:
            self.uses.update(outer_reads(node))
        self.uses.update(o.name for o in graph.output)
        self.initializers = {t.name: t for t in graph.initializer}
        self.inputs = {i.name for i in graph.input}

    def names(self) -> set[str]:
        found = set(self.producer) | set(self.initializers) | self.inputs
        for body in nested_bodies(self.graph):
            found.update(o for node in body.node for o in node.output)
        found.update(node.name for node in self.graph.node)
        return found

    def op(self, tensor: str, op_type: str, inputs: tuple[int, ...] = (2,)) -> int | None:
        """The node of ``op_type`` (ONNX domain) with one of ``inputs`` input counts writing ``tensor``."""
        idx = self.producer.get(tensor)
        if idx is None:
            return None
        node = self.graph.node[idx]
        ours = node.op_type == op_type and node.domain in ONNX_DOMAINS and len(node.input) in inputs
        return idx if ours else None

    def stored(self, tensor: str) -> bool:
        """``tensor`` is an initializer (also where IR 3 lists it among the inputs, as GraphIndex reads it)."""
        return tensor in self.initializers

    def channels(self, tensor: str) -> int | None:
        dims = self.initializers[tensor].dims
        return int(dims[0]) if len(dims) == 1 else None


def _match(f: _Facts, conv: int) -> _Fold | None:
    node = f.graph.node[conv]
    if node.domain not in ONNX_DOMAINS or len(node.input) != 3 or len(node.output) != 1:
        return None
    w_in, b_in = node.input[1], node.input[2]
    if f.uses[w_in] != 1 or f.uses[b_in] != 1:
        return None  # another reader needs the folded weights as they are
    weight = _scaled_weight(f, w_in)
    bias = _shifted_bias(f, b_in)
    if weight is None or bias is None or weight[1] != bias[1]:
        return None
    w, k, w_nodes = weight
    conv_bias, _, beta, mean, b_nodes = bias
    scale = _scale(f, k)
    if scale is None:
        return None
    gamma, var, epsilon, k_nodes = scale
    dims = f.initializers[w].dims
    params = (gamma, beta, mean, var)
    if len(dims) < 3 or any(f.channels(p) != dims[0] for p in params):
        return None
    if not _same_type(f, w, *params) or (f.stored(conv_bias) and not _same_type(f, w, conv_bias)):
        return None
    return _Fold(conv, w, conv_bias, gamma, beta, mean, var, epsilon, sorted({*w_nodes, *b_nodes, *k_nodes}))


def _scaled_weight(f: _Facts, tensor: str) -> tuple[str, str, list[int]] | None:
    """``tensor`` as Mul(W, Unsqueeze(k, axes 1..rank-1)): (W, k, nodes)."""
    mul = f.op(tensor, "Mul")
    if mul is None:
        return None
    for w, u in (f.graph.node[mul].input, f.graph.node[mul].input[::-1]):
        unsq = f.op(u, "Unsqueeze", (1, 2)) if f.stored(w) else None
        if unsq is not None and _axes(f, unsq) == list(range(1, len(f.initializers[w].dims))):
            return w, f.graph.node[unsq].input[0], [mul, unsq]
    return None


def _shifted_bias(f: _Facts, tensor: str) -> tuple[str, str, str, str, list[int]] | None:
    """``tensor`` as Add(Mul(Sub(Cast(b), mean), k), beta): (b or its Cast's output, k, beta, mean, nodes)."""
    add = f.op(tensor, "Add")
    if add is None:
        return None
    for scaled, beta in (f.graph.node[add].input, f.graph.node[add].input[::-1]):
        mul = f.op(scaled, "Mul") if f.stored(beta) else None
        sub = None if mul is None else f.op(f.graph.node[mul].input[0], "Sub")
        if mul is None or sub is None:
            continue
        b, mean = f.graph.node[sub].input
        if not f.stored(mean):
            continue
        cast = f.op(b, "Cast", (1,))
        nodes = [add, mul, sub]
        if cast is not None and f.stored(f.graph.node[cast].input[0]):
            # onnxoptimizer's Cast to the statistics' type: the stored bias itself where it has that type already
            source = f.graph.node[cast].input[0]
            if _same_type(f, source, mean):
                b = source
                nodes.append(cast)
        elif not f.stored(b):
            continue
        return b, f.graph.node[mul].input[1], beta, mean, nodes
    return None


def _scale(f: _Facts, k: str) -> tuple[str, str, float, list[int]] | None:
    """``k`` as Div(gamma, Sqrt(Add(var, Cast(eps)))): (gamma, var, eps, nodes)."""
    div = f.op(k, "Div")
    if div is None:
        return None
    gamma, root = f.graph.node[div].input
    sqrt = f.op(root, "Sqrt", (1,))
    add = None if sqrt is None else f.op(f.graph.node[sqrt].input[0], "Add")
    if not f.stored(gamma) or sqrt is None or add is None:
        return None
    for var, e in (f.graph.node[add].input, f.graph.node[add].input[::-1]):
        cast = f.op(e, "Cast", (1,))
        source = f.graph.node[cast].input[0] if cast is not None else e
        epsilon = _scalar(f, source)
        if f.stored(var) and epsilon is not None:
            return gamma, var, epsilon, [div, sqrt, add, *([cast] if cast is not None else [])]
    return None


def _axes(f: _Facts, unsq: int) -> list[int] | None:
    node = f.graph.node[unsq]
    if len(node.input) > 1:
        values = _stored_values(f, node.input[1])
        return None if values is None else [int(a) for a in values.ravel()]
    attr = next((a for a in node.attribute if a.name == "axes"), None)
    return None if attr is None else list(attr.ints)


def _scalar(f: _Facts, tensor: str) -> float | None:
    """The one value an initializer held in the file holds (None: not one, or in external data)."""
    values = _stored_values(f, tensor)
    return float(values.ravel()[0]) if values is not None and values.size == 1 else None


def _stored_values(f: _Facts, tensor: str) -> np.ndarray | None:
    """A small initializer's values (None: not an initializer, in external data, or over 64 elements)."""
    t = f.initializers.get(tensor)
    if t is None or t.data_location == 1 or math.prod(t.dims) > 64:  # 1: TensorProto.EXTERNAL
        return None
    from onnx import numpy_helper

    try:
        return numpy_helper.to_array(t)
    except Exception:  # a tensor onnx cannot decode is no epsilon or axes bncheck can read
        return None


def _same_type(f: _Facts, *tensors: str) -> bool:
    return len({f.initializers[t].data_type for t in tensors}) == 1


def _unread(graph: onnx.GraphProto, f: _Facts, nodes: list[int]) -> set[int]:
    """Of the fold's ``nodes``, those nothing reads any more (their reads counted off, so that a node read only by
    dropped ones goes too)."""
    dropped: set[int] = set()
    changed = True
    while changed:
        changed = False
        for i in nodes:
            if i not in dropped and all(f.uses[o] == 0 for o in graph.node[i].output if o):
                dropped.add(i)
                changed = True
                for t in graph.node[i].input:
                    if t:
                        f.uses[t] -= 1
    return dropped


def _drop_unread_initializers(graph: onnx.GraphProto, f: _Facts, candidates: set[str]) -> None:
    """Of ``candidates`` (what the dropped arithmetic read), the initializers nothing reads any more: the fold's
    epsilon and axes (onnxruntime warns of unread initializers)."""
    unread = {name for name in candidates if name in f.initializers and f.uses[name] <= 0 and name not in f.inputs}
    for i in reversed([i for i, t in enumerate(graph.initializer) if t.name in unread]):
        del graph.initializer[i]  # by position: the weights are not copied


def _bn_name(conv: onnx.NodeProto) -> str:
    """TorchScript's ``/conv1/Conv`` -> ``/conv1/BatchNormalization`` (its scope names the layer); else the
    convolution's name with a suffix."""
    head, sep, tail = conv.name.rpartition("/")
    if sep and tail.startswith("Conv"):
        return f"{head}/BatchNormalization{tail[len('Conv') :]}"
    return f"{conv.name}/BatchNormalization"


def _fresh(name: str, taken: set[str]) -> str:
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{name}_{n}"
    taken.add(candidate)
    return candidate


#: the metadata key onnxscript's rewriter (torch's dynamo exporter, ``optimize=True`` by default) stamps on the node a
#: rule made, and the rules that fold an eval-mode BatchNorm into the Conv, ConvTranspose or Gemm before it
_RULE_NAME = "pkg.onnxscript.rewriter.rule_name"
_TORCH_FUSIONS = ("FuseBatchNormIntoConv", "FuseBatchNormIntoConvTranspose", "FuseBatchNormIntoGemm")
#: a tensor TorchScript's exporter computed by constant folding (a parameter keeps its module's name)
_TORCH_FOLDED_WEIGHT = re.compile(r"onnx::(?:Conv|ConvTranspose)_\d+")


def torch_folds(g: GraphIndex) -> tuple[list[str], list[str]]:
    """Batch norms torch's exporters folded into the op before them, their statistics gone from the file:
    (the modules the dynamo exporter's rewriter folded, by the module path it records on the fused node; the
    TorchScript-named convolutions whose weight and bias constant folding computed, as it does folding a BatchNorm)."""
    dynamo: list[str] = []
    computed: list[str] = []
    for i, node in enumerate(g.nodes):
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm") or node.domain not in ONNX_DOMAINS:
            continue
        rules = next((p.value for p in node.metadata_props if p.key == _RULE_NAME), "")
        if any(rule.strip() in _TORCH_FUSIONS for rule in rules.split(",")):  # one entry per rule that touched it
            dynamo.append(module_path(node) or g.node_name(i))
        elif node.name.startswith("/") and len(node.input) == 3 and all(_computed(g, t) for t in node.input[1:]):
            # both computed: a folded BatchNorm writes a new bias too (weight_norm and weight standardization
            # compute the weight alone)
            computed.append(node.name)
    return dynamo, computed


#: the scope of TensorFlow's ``tf.nn.batch_normalization`` inside a Keras BatchNormalization layer's
_TF_BATCHNORM = "/batchnorm/"


def in_tf_batchnorm_scope(name: str) -> bool:
    """A node or tensor name inside a Keras BatchNormalization's ``batchnorm`` scope (TensorFlow's names)."""
    return _TF_BATCHNORM in name


def tf_folds(g: GraphIndex, layers: list[NormLayer]) -> list[str]:
    """Keras BatchNormalization layers tf2onnx folded away, by the layer's scope (as the walk names tf2onnx's
    layers): a node or constant of its ``batchnorm`` scope is left, merged into the convolution's weights and bias
    or a per-channel multiply, its statistics gone. In graph order, each once; none of ``layers`` (a batch norm
    the walk found, through the nodes of that scope or by name)."""
    if not any(in_tf_batchnorm_scope(node.name) for node in g.nodes) and not any(
        in_tf_batchnorm_scope(t) for t in g.initializers
    ):
        return []  # most files: no TensorFlow scope at all
    read = {n.split(_TF_BATCHNORM)[0] for layer in layers for n in layer.nodes if in_tf_batchnorm_scope(n)}
    read |= {layer.name for layer in layers}
    found: dict[str, None] = {}
    for i, node in enumerate(g.nodes):
        for name in (node.name, *node.input):
            if not in_tf_batchnorm_scope(name) or (name != node.name and name not in g.initializers):
                continue
            shown = op_name(g, i, [name])
            if name.split(_TF_BATCHNORM)[0] not in read and shown not in read:
                found.setdefault(shown, None)
    return list(found)


def keras_torch_folds(g: GraphIndex, layers: list[NormLayer]) -> list[str]:
    """The Subs of each ``Sub(x, c) -> Mul(k) -> Add(b)`` on data ``x`` with constants of one per-channel size: an
    inference batch norm as Keras 3's torch backend computes it, ``(x - mean) * (gamma * rsqrt(var + eps)) + beta``,
    whose middle factor torch's exporter folds into one constant. No node of ``layers``."""
    taken = {name for layer in layers for name in layer.nodes}
    found = []
    for idx, node in enumerate(g.nodes):
        if node.op_type != "Sub" or node.domain not in ONNX_DOMAINS or len(node.input) != 2 or not node.output:
            continue
        mean = g.param(node.input[1])
        if mean is None or mean.size < 2 or g.node_name(idx) in taken:
            continue
        tensor = node.output[0]
        for op in ("Mul", "Add"):  # each read by exactly one node of the chain, with a constant of the mean's size
            users = g.users(tensor, op)
            other = other_input(g.nodes[users[0]], tensor) if len(users) == 1 else None
            value = g.param(other) if other is not None else None
            if value is None or value.size != mean.size or not g.nodes[users[0]].output:
                break
            tensor = g.nodes[users[0]].output[0]
        else:
            if not g.data_free(node.input[0]):
                found.append(g.node_name(idx))
    return found


def ultralytics_export(model: onnx.ModelProto) -> str | None:
    """The Ultralytics version that exported ``model`` (its metadata's author and version), "" where it gives none;
    None for a file Ultralytics did not write. Its exporter fuses every Conv's BatchNorm into the Conv in torch
    before the export (``model.fuse()``): the file keeps no statistics and no trace of the fold."""
    props = {p.key: p.value for p in model.metadata_props}
    return props.get("version", "") if props.get("author") == "Ultralytics" else None


def _computed(g: GraphIndex, tensor: str) -> bool:
    return tensor in g.initializers and _TORCH_FOLDED_WEIGHT.fullmatch(tensor) is not None
