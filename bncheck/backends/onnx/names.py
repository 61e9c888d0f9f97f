"""Layer names people recognise: the module path the user wrote, not the name an exporter generated.

PyTorch's dynamo exporter names a BatchNormalization node ``node__native_batch_norm_legit_no_training_3__0``
and keeps the module path (``head.head_bn``) in the node's metadata (``pkg.torch.onnx.name_scopes``,
``namespace``) and in the weight names (``head.head_bn.weight``, ``head.head_bn.running_mean``). paddle2onnx
writes ``p2o.BatchNormalization.3``, other exporters ``BatchNormalization_12`` or nothing at all. A layer is
named after the metadata's module path when there is one; the TorchScript exporter's scoped node names
(``/features/features.1/BatchNormalization``) by the module path a weight of the layer carries
(``features.1``); else, when its node name is empty or generated, after the common prefix of its weight
names; the node names stay in ``NormLayer.nodes``.
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import replace

from bncheck.backends.onnx.graph import GraphIndex
from bncheck.model import NormLayer

#: metadata_props keys the PyTorch exporter writes (torch >= 2.5)
NAME_SCOPES = "pkg.torch.onnx.name_scopes"
NAMESPACE = "namespace"
#: characters that separate the components of a module path or a weight name
_SEPARATORS = "./:"
#: exporter prefixes and suffixes around an op type in generated node names (p2o.BatchNormalization.3,
#: BatchNormalization_12, BatchNormalization@0, BatchNormalization__7; TorchScript's /BatchNormalization_1 for
#: a torch.jit.script'ed module, which keeps no scope)
_DECOR = r"/?(?:p2o\.)?{op}(?:_token)?(?:[._@#:-]*\d+)*"
#: weight names that exporters invent themselves (they say nothing about the user's module)
#: (paddle2onnx 2.x names the tensors it makes, folded weights too, after their op: ``Reshape.2``)
_GENERATED_WEIGHT = re.compile(
    r"^(?:onnx::.*|val_\d+|_v_\d+|const.*|\d+|helper\.\w+\.\d+|(?-i:[A-Z][A-Za-z]+\.\d+))$", re.IGNORECASE
)
#: paddle's name for a layer's intermediate result (``group_norm_0.tmp_2``; its weights ``group_norm_0.w_0``)
_PADDLE_TEMP = re.compile(r"\.tmp_\d+$")
#: a tensor torch's TorchScript exporter names after its node (``/enc1/enc1.1/GroupNorm_output_0``)
_TORCH_OUTPUT = re.compile(r"(/(?:[^/]+/)+([A-Za-z]\w*?))_output_\d+")


def readable_names(g: GraphIndex, found: Iterable[tuple[int, NormLayer]]) -> list[NormLayer]:
    """``found`` (main node index, layer) pairs renamed as the module docstring says; names unique."""
    pairs = list(found)
    by_name = {g.node_name(i): i for i in range(len(g.nodes))}
    scopes: list[Counter[str]] = []  # nodes per name scope, counted at the first chain that asks
    names = [_readable(g, idx, layer, by_name, scopes) for idx, layer in pairs]
    if _keras3_scoped(g):
        names = [_without_keras3_suffixes(name) for name in names]
    unique = unique_names(names)
    return [layer if name == layer.name else replace(layer, name=name) for (_, layer), name in zip(pairs, unique)]


def _readable(g: GraphIndex, idx: int, layer: NormLayer, by_name: dict[str, int], scopes: list[Counter[str]]) -> str:
    indices = [idx] + [by_name[n] for n in layer.nodes if n in by_name and by_name[n] != idx]
    composed = _compose_prefix(g.nodes[idx].name)
    for i in indices:
        path = module_path(g.nodes[i])
        if path:
            return composed + path
    scope = _torch_scope(g.nodes[idx].name.removeprefix(composed), g.nodes[idx].op_type)
    if scope is not None:
        weights = [w.removeprefix(composed) for w in _weights(g, layer, indices)]
        return composed + _torch_module(scope, weights)
    if not is_generated(g.nodes[idx].name.removeprefix(composed), g.nodes[idx].op_type):
        if layer.extra.get("affine_batch_norm"):  # tf.nn.batch_normalization's nodes: named by the layer's scope
            return _tf_chain_scope(layer) or layer.name
        if layer.op_type != "decomposed":
            return _tf_op_scope(layer.name)
        scoped = _tf_layer_scope(_tf_op_scope(layer.name))  # a fused BN tf2onnx wrote out: named after it
        if scoped == layer.name:
            scoped = _tf_chain_scope(layer) or scoped
        return scoped if scoped != layer.name else _own_scope(layer, by_name, scopes) or layer.name
    prefix = weight_prefix(_weights(g, layer, indices))
    if prefix:
        return _without_function_scope(prefix) or layer.name
    # paddle2onnx names a hand-written chain's nodes after their op types and its weights helper.reshape.N,
    # but the chain's result after the layer op it came from (p2o.pd_op.layer_norm.0.0): the last such name
    named = [t for i in indices for t in g.nodes[i].output if "norm" in t.lower() and not _generated_tensor(g, i, t)]
    if not named:
        return layer.name
    # a call of a module torch exported as a function, inlined at load: its nodes' names are the inliner's, its
    # output the call's (/enc1/enc1.1/GroupNorm_output_0)
    called = _TORCH_OUTPUT.fullmatch(named[-1])
    scope = _torch_scope(called.group(1), called.group(2)) if called else None
    return (_scope_path(scope) if scope else None) or _PADDLE_TEMP.sub("", named[-1])


#: TensorFlow's scopes around a Keras layer's own: the traced function's, and tf.nn.moments' inside the layer
_TF_FUNCTION_SCOPE = "StatefulPartitionedCall/"
# (a layer called again in one scope, as TimeDistributed calls its norm per frame, gets moments_2, moments_3...)
_TF_MOMENTS = re.compile(r"/(?:moments(?:_\d+)?/(?:mean|Mean)|weighted_moments(?:_\d+)?/weighted_input_sum)(?:_\d+)?$")
#: the nodes of tf.nn.batch_normalization's scope inside a Keras layer's (its normalization after the moments)
_TF_BATCHNORM_OPS = re.compile(r"/batchnorm(?:_\d+)?/[^/]+$")
_TF_FUSED_BN = re.compile(r"/FusedBatchNorm(?:V2|V3)?(?:_?\d+)?$")  # tflite's: FusedBatchNormV35
#: onnxruntime's fused node named after the node the fusion started from: "<that node>/LayerNormFusion/"
_ORT_FUSION = re.compile(r"(.*/([A-Za-z]+)(?:_\d+)?)/\w+Fusion/?")
#: jax2tf's scopes around a flax module's path: the converted function's and each jitted call's
_JAX2TF_SCOPES = re.compile(r"^jax2tf_[^/]*/(?:pjit_[^/]*/)*")


def op_name(g: GraphIndex, idx: int, weights: list[str]) -> str:
    """The name the user wrote for the module of node ``idx`` (a convolution, say), which reads ``weights``: the
    dynamo exporter's module path, TorchScript's scopes, the weights' common prefix, else the node's name."""
    node = g.nodes[idx]
    composed = _compose_prefix(node.name)
    path = module_path(node)
    if path:
        return composed + path
    scope = _torch_scope(node.name.removeprefix(composed), node.op_type)
    if scope is not None:
        return composed + _torch_module(scope, [w.removeprefix(composed) for w in weights])
    # a Keras BatchNormalization that tf2onnx folded into this op: its shift is TensorFlow's batchnorm/sub, named
    # in the layer's scope, and that layer is where a NaN or negative variance came from
    folded = [w.split("/batchnorm/")[0] for w in weights if "/batchnorm/" in w]
    name = _without_function_scope(folded[0]) if folded else weight_prefix(weights) or _tf_op_scope(g.node_name(idx))
    # TFLite names a fused op, and its weights, by every op it fused, the op itself last: "relu;bn/...;conv"
    name = name.rsplit(";", 1)[-1]
    return _without_keras3_suffixes(name) if _keras3_scoped(g) else name


def _compose_prefix(name: str) -> str:
    """The prefix onnx.compose.add_prefix (merge_models: one per model) put before a torch exporter's node name
    ``name``, "" for none: before the "/" a TorchScript name starts with (m1//layer1/bn1/BatchNormalization), or
    before a dynamo name, which holds no "/" (m1/node_layer_norm)."""
    if name.startswith("/"):
        return ""  # TorchScript's own
    if "//" in name:
        return name[: name.index("//") + 1]
    head, _, last = name.rpartition("/")
    return head + "/" if head and last.startswith("node_") else ""


def _keras3_scoped(g: GraphIndex) -> bool:
    """Keras 3 on TensorFlow (``model.export(format="onnx")``, a SavedModel through tf2onnx) names every layer's
    scope with a "_1" that TensorFlow appends (``plain_1/ln_a_1/moments/mean`` for layer ``ln_a`` of model
    ``plain``): every scoped node name's first component, and its second where it has three, ends in "_1"."""
    cached = g.derived.get("keras3_scoped")
    if cached is None:
        scoped = [_without_function_scope(node.name).split("/") for node in g.nodes if "/" in node.name]
        cached = bool(scoped) and all(
            parts[0].endswith("_1") and (len(parts) < 3 or parts[1].endswith("_1")) for parts in scoped
        )
        g.derived["keras3_scoped"] = cached
    return bool(cached)


def _without_keras3_suffixes(name: str) -> str:
    """``plain_1/ln_a_1`` -> ``plain/ln_a``: each scope's "_1" that TensorFlow appended (a layer named ``x_1``
    is scoped ``x_1_1``)."""
    return "/".join(part[:-2] if part.endswith("_1") and len(part) > 2 else part for part in name.split("/"))


def _torch_scope(name: str, op_type: str) -> list[str] | None:
    """The module scopes of a node that torch's TorchScript exporter (torch >= 1.13) named
    ``/encoder/layer.0/norm/ReduceMean_1``: ["encoder", "layer.0", "norm"]; None for any other name. A node
    onnxruntime's optimizer fused is named after the one it started from (``/embed_norm/Mul/LayerNormFusion/``)."""
    fused = _ORT_FUSION.fullmatch(name)
    if fused:
        name, op_type = fused.group(1), fused.group(2)
    match = re.fullmatch(r"/((?:[^/]+/)*[^/]+)/" + re.escape(op_type) + r"(?:_\d+)?", name)
    return match.group(1).split("/") if match else None


def _torch_module(scope: list[str], weights: list[str]) -> str:
    """The module path of the layer in scope ``scope``: from a weight it reads whose name ends in that
    module's (``features.1.weight`` under ``/features/features.1/``: ``features.1``), else the scopes
    joined (the exporter's scopes name a Sequential's children by their full path, so they cannot be
    joined into one reliably). A module called again is scoped ``norm1_1``: its weights are ``norm1``'s, and
    the name it gets here is made unique as every repeated call's is (``#2``)."""
    prefixes = [re.sub(r":\d+$", "", weight).rpartition(".")[0] for weight in weights]
    path = _scope_path(scope)
    matched = [
        prefix
        for module in dict.fromkeys((scope[-1], re.sub(r"_\d+$", "", scope[-1])))
        for prefix in prefixes
        if prefix == module or prefix.endswith("." + module)
    ]
    if path is not None:
        # a weight shared with another layer (the exporter keeps one copy of equal initializers, a fresh BN's
        # ones and zeros) carries that layer's path: only one under this node's own scope names it
        paths = dict.fromkeys((path, re.sub(r"_\d+$", "", path)))  # a module called again: norm_1
        own = [prefix for prefix in matched for p in paths if prefix == p or prefix.endswith("." + p)]
        return own[0] if own else path
    return matched[0] if matched else "/".join(scope)


def _scope_path(scope: list[str]) -> str | None:
    """The module path the exporter's scopes spell: a scope that extends the one before it by ".name" (a
    Sequential's child, ``features`` then ``features.9``) replaces it, any other is appended (``layer1``,
    ``layer1.0``, ``bn2``: ``layer1.0.bn2``; a container's child under another module, ultralytics' RT-DETR
    ``model.28``, ``decoder``, ``layers.0``, ``norm1``: ``model.28.decoder.layers.0.norm1``)."""
    parts: list[str] = []
    for entry in scope:
        if parts and entry.startswith(parts[-1] + "."):
            parts[-1] = entry
        else:
            parts.append(entry)
    return ".".join(parts) or None


def _tf_layer_scope(name: str) -> str:
    """A tf2onnx chain named after its mean's node (``StatefulPartitionedCall/model/encoder_0/ln/moments/mean``)
    by the Keras layer's path (``model/encoder_0/ln``), a jax2tf one
    (``jax2tf_f_/pjit_f_/Model/LayerNorm_0/Sum``) by the flax module's (``Model/LayerNorm_0``); other names as
    they are."""
    bare = _without_function_scope(name)  # a SavedModel's (tf2onnx --saved-model)
    jax_scopes = _JAX2TF_SCOPES.match(bare)
    if jax_scopes and "/" in bare[jax_scopes.end() :]:
        # newer jax puts the op's own pjit scopes inside the module's (Model/LayerNorm_0/pjit__mean_/Sum)
        parts = bare[jax_scopes.end() :].split("/")[:-1]
        while len(parts) > 1 and parts[-1].startswith("pjit_"):
            parts.pop()
        return "/".join(parts)
    return _cut(name, _TF_MOMENTS)


def _tf_chain_scope(layer: NormLayer) -> str | None:
    """The Keras layer's path of a chain whose first node is no moments' mean (a mixed-precision layer's input
    Cast, a synchronized one's Square): the first of its nodes in TensorFlow's moments or batchnorm scope, cut
    there; None where none is."""
    for node in layer.nodes:
        for scope in (_TF_MOMENTS, _TF_BATCHNORM_OPS):
            if scope.search(node):
                return _cut(node, scope)
    return None


def _tf_op_scope(name: str) -> str:
    """A tf2onnx BatchNormalization named after TensorFlow's op (``model/block1_bn/FusedBatchNormV3``, a fused
    LayerNormalization's too) by the Keras layer's path (``model/block1_bn``); other names as they are."""
    return _cut(name, _TF_FUSED_BN)


def _cut(name: str, op_scope: re.Pattern[str]) -> str:
    """``name`` without the TensorFlow op scope ``op_scope`` matches at its end, nor the traced function's scope;
    as it is where ``op_scope`` does not match."""
    if not op_scope.search(name):
        return name
    return _without_function_scope(op_scope.sub("", name)) or name


def _without_function_scope(name: str) -> str:
    """``name`` without TensorFlow's traced function's scopes (StatefulPartitionedCall/), no part of a layer's."""
    while name.startswith(_TF_FUNCTION_SCOPE):
        name = name[len(_TF_FUNCTION_SCOPE) :]
    return name


def _own_scope(layer: NormLayer, by_name: dict[str, int], scopes: list[Counter[str]]) -> str | None:
    """The name scope that holds a hand-written chain's nodes and nothing else (keras2onnx names DTLN's
    ``model_2/instant_layer_normalization_1/Mean_reduce_min``, a mean it suffixes "reduce_min": the layer is
    ``model_2/instant_layer_normalization_1``); None where the nodes share no scope or it holds other nodes (a
    flat graph's ``model/Mean_3`` would name every layer ``model``)."""
    names = [n for n in layer.nodes if n in by_name]
    if len(names) < 2 or not all("/" in n for n in names):
        return None
    common: list[str] = []  # the leading "/" segments every node's scope shares
    for segments in zip(*(n.rpartition("/")[0].split("/") for n in names)):
        if len(set(segments)) > 1:
            break
        common.append(segments[0])
    scope = "/".join(common)
    if not scope.strip("/"):
        return None
    if not scopes:
        scopes.append(Counter(name[:k] for name in by_name for k, c in enumerate(name) if c == "/"))
    if scopes[0][scope] != len(set(names)):  # other nodes under it: not the layer's own scope
        return None
    return _without_function_scope(scope) or None


def _generated_tensor(g: GraphIndex, index: int, tensor: str) -> bool:
    return _GENERATED_WEIGHT.match(tensor) is not None or is_generated(tensor, g.nodes[index].op_type)


def module_path(node) -> str | None:
    """The module path of a node exported by PyTorch's dynamo exporter, from its metadata (None if absent).

    ``name_scopes`` is a Python list literal, e.g. ``['', 'head', 'head.head_bn', '_native_batch_norm_...']``:
    the last entry is the traced op, the one before it the module that called it. ``namespace`` says the same
    as ``': __main__.M/head: __main__.Head/head.head_bn: torch...BatchNorm1d/_native_batch_norm_...: aten...'``.
    """
    props = {p.key: p.value for p in node.metadata_props}
    scopes = props.get(NAME_SCOPES)
    if scopes:
        try:
            parsed = ast.literal_eval(scopes)
        except (ValueError, SyntaxError):
            parsed = None
        if isinstance(parsed, (list, tuple)) and all(isinstance(s, str) for s in parsed):
            named = [s for s in parsed[:-1] if s]
            if named:
                return named[-1]
    namespace = props.get(NAMESPACE)
    if namespace:
        segments = [s.split(":", 1)[0].strip() for s in namespace.split("/")[:-1]]
        named = [s for s in segments if s]
        if named:
            return named[-1]
    return None


def is_generated(name: str, op_type: str) -> bool:
    """True when ``name`` is empty or an exporter's invention rather than something the user named: also the
    names onnxruntime gives the nodes it fuses (``SkipLayerNorm_AddBias_0``, or ``<start node>/LayerNormFusion/``
    after a start node whose own name was generated, paddle2onnx's ``p2o.Mul.178``)."""
    if not name or name.startswith("node_"):  # dynamo names every node node_<fx name>
        return True
    if _ORT_FUSED_NAME.fullmatch(name):
        return True
    fused = re.fullmatch(r"(.*?)(?:_\d+)?/\w+Fusion/?", name)
    if fused:
        start = fused.group(1)
        op = re.search(r"([A-Za-z]+)(?:[._@#:-]*\d+)*$", start)
        return op is not None and is_generated(start, op.group(1))
    return re.fullmatch(_DECOR.format(op=re.escape(op_type)), name, flags=re.IGNORECASE) is not None


#: node names onnxruntime.transformers' fusions create (fusion_skiplayernorm.py, fusion_layernorm.py, ...)
_ORT_FUSED_NAME = re.compile(r"(?:Skip)?(?:Simplified)?(?:Embed)?LayerNorm(?:alization)?(?:_AddBias)?_\d+")


def weight_prefix(names: Iterable[str]) -> str | None:
    """The common leading components of weight names (``head_bn.weight``, ``head_bn.running_mean`` ->
    ``head_bn``; a single ``ln.weight`` -> ``ln``), or None when they share none or are generated."""
    # TensorFlow's ":0" output suffix is not a component of the name
    usable = sorted({re.sub(r":\d+$", "", n) for n in names if n and not _GENERATED_WEIGHT.match(n)})
    if not usable:
        return None
    first, last = usable[0], usable[-1]  # the common prefix of a sorted list is that of its extremes
    common = 0
    while common < min(len(first), len(last)) and first[common] == last[common]:
        common += 1
    prefix = first[:common]
    # cut at the last component boundary: a path separator when there is one (head_bn.weight), else an
    # underscore (paddle's conv1_bn_scale, conv1_bn_mean -> conv1_bn)
    cut = max(prefix.rfind(c) for c in _SEPARATORS)
    if cut < 0:
        cut = prefix.rfind("_")
    if cut <= 0:
        return None
    return prefix[:cut]


def _weights(g: GraphIndex, layer: NormLayer, indices: list[int]) -> list[str]:
    """The stored tensors the layer's nodes read, apart from the normalized input; for a hand-written chain
    only the non-scalar ones (its scale and bias, not the axes and epsilon constants)."""
    chain = layer.op_type == "decomposed"
    # torch's legacy export of a GroupNorm (an InstanceNormalization of ones and zeros between Reshapes): its
    # gamma and beta are the Mul and Add after it, read through Unsqueezes
    lowered = bool(layer.extra.get("reshaped_to_groups"))
    tensors = [t for i in indices for t in g.nodes[i].input] if chain or lowered else list(layer.inputs)
    if layer.op_type in _SKIP_NORMS:  # gamma and beta only: a fused skip norm also reads the Linear's bias
        tensors = tensors[2:4]
    found: list[str] = []
    scalars: list[str] = []
    for tensor in tensors:
        if not tensor or tensor == layer.input:
            continue
        source = g.stored_source(tensor)
        stored = source in g.initializers or g.produced_by(source, "Constant") is not None
        if stored and lowered:
            source = _named_copy(g, tensor, source)
        elif stored and _module_copy(g, tensor, source):
            source = tensor
        value = g.param(source) if stored else None
        if value is None or (lowered and (value.dtype.kind != "f" or value.size <= 1)):
            continue
        (scalars if chain and value.size <= 1 else found).append(source)
    # a LayerNorm over an axis of size 1 (the BN001 case) has one-element gamma and beta: named by them where the
    # chain reads no larger weight (not by its epsilon or exponent)
    affine = {g.stored_source(t) for t in layer.extra.get("affine_tensors", ())}
    return found or [t for t in scalars if t in affine]


def _named_copy(g: GraphIndex, tensor: str, source: str) -> str:
    """The first tensor on the way from ``tensor`` up to its stored ``source`` that bears a weight's name: torch's
    exporter keeps one copy of equal weights (an untrained model's ones) and reads it under each module's name
    through an Identity (``head.conv.1.1.weight = Identity(backbone.layer1.0.bn3.weight)``)."""
    for _ in range(8):
        if tensor == source or (not tensor.startswith("/") and not _GENERATED_WEIGHT.match(tensor)):
            return tensor
        idx = g.producer.get(tensor)
        if idx is None or not g.nodes[idx].input:
            return source
        tensor = g.nodes[idx].input[0]
    return source


def _module_copy(g: GraphIndex, tensor: str, source: str) -> bool:
    """Whether ``tensor`` is torch's copy of a stored weight under its own module's name: the exporter keeps one
    copy of equal weights (an untrained model's ones and zeros) and reads it through an Identity per module
    (``layer1.0.bn1.running_mean = Identity(bn1.bias)``), while the module it is named after reads it directly.
    A stored tensor only an Identity reads is the graph index's dequantized constant, named as stored."""
    idx = g.produced_by(tensor, "Identity")
    return idx is not None and g.nodes[idx].input[0] == source and len(g.users(source)) > 1


#: onnxruntime's fused norms whose inputs are (input, skip, gamma, beta, bias)
_SKIP_NORMS = frozenset({"SkipLayerNormalization", "SkipSimplifiedLayerNormalization"})


def unique_names(names: list[str]) -> list[str]:
    """Later layers that share a name (a module called twice) get ``#2``, ``#3``... in graph order."""
    taken = set(names)
    seen: set[str] = set()
    out = []
    for name in names:
        if name not in seen:
            seen.add(name)
            out.append(name)
            continue
        k = 2
        while f"{name}#{k}" in taken or f"{name}#{k}" in seen:
            k += 1
        seen.add(f"{name}#{k}")
        out.append(f"{name}#{k}")
    return out
