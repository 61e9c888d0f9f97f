"""Walk a Keras model config: normalization layers, their call flags, inputs and shapes. No class is instantiated."""

from __future__ import annotations

import heapq
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from bncheck.backends.base import BackendError
from bncheck.backends.keras.weights import KerasWeights, LegacyWeights, expected_vars, layer_entries
from bncheck.backends.keras.weights_only import nested_batch_norms
from bncheck.errors import few, one_line
from bncheck.model import NO_LAYERS_NOTE, PREDICT_CALL, BrokenWeights, Dim, InputSpec, Kind, NormLayer, Note

NORM_KINDS: dict[str, Kind] = {
    "BatchNormalization": Kind.BATCH,
    "SyncBatchNormalization": Kind.BATCH,  # tf_keras; Keras 3 spells it BatchNormalization(synchronized=True)
    "LayerNormalization": Kind.LAYER,
    "GroupNormalization": Kind.GROUP,
    "UnitNormalization": Kind.UNIT,
    "RMSNormalization": Kind.RMS,
}
#: Keras 3 call styles that use the moving statistics even where a baked training=True is in force.
KERAS3_OVERRIDES = (PREDICT_CALL, "model(x, training=False)")
#: Keras 2 / tf_keras: the baked flag wins in every call style; the statistics count once it is removed.
KERAS2_AFTER_FIX = ("model(x) once the baked training=True is removed",)
MODEL_CLASSES = frozenset({"Functional", "Sequential", "Model"})
#: Layers whose config carries code (Python bytecode, a wrapped module or a SavedModel): never run by bncheck.
CODE_CLASSES = frozenset({"Lambda", "TorchModuleWrapper", "JaxLayer", "FlaxLayer", "TFSMLayer", "__lambda__"})
#: TensorFlow ops tf.keras saved as layers (``x + 1``, ``tf.nn.leaky_relu`` on a Keras tensor): Keras 3 has no
#: such layer and cannot load a file that holds one
TF_OP_CLASSES = frozenset({"TFOpLambda", "SlicingOpLambda"})
#: Keras's own initializers, regularizers and constraints, which tf.keras 2.x writes into a .h5 file with their
#: TensorFlow module (``tensorflow.python.ops.init_ops_v2`` for tf.random_normal_initializer): Keras 3's legacy
#: loader takes them by class name from its built-ins and imports nothing
_BUILTIN_OBJECTS = frozenset(
    {
        "Constant",
        "GlorotNormal",
        "GlorotUniform",
        "HeNormal",
        "HeUniform",
        "Identity",
        "LecunNormal",
        "LecunUniform",
        "Ones",
        "Orthogonal",
        "RandomNormal",
        "RandomUniform",
        "TruncatedNormal",
        "VarianceScaling",
        "Zeros",
        "L1",
        "L1L2",
        "L2",
        "MaxNorm",
        "MinMaxNorm",
        "NonNeg",
        "RadialConstraint",
        "UnitNorm",
    }
)
#: Layers that keep their input's shape (used only when a file records no shapes: tf_keras .h5).
_SAME_SHAPE = frozenset(
    set(NORM_KINDS)
    | {
        "Activation",
        "ReLU",
        "LeakyReLU",
        "PReLU",
        "ELU",
        "Softmax",
        "Dropout",
        "SpatialDropout1D",
        "SpatialDropout2D",
        "SpatialDropout3D",
        "GaussianNoise",
        "GaussianDropout",
        "AlphaDropout",
        "ActivityRegularization",
        "Masking",
        "Identity",
        "Rescaling",
        "Normalization",
        "Add",
        "Subtract",
        "Multiply",
        "Average",
        "Maximum",
        "Minimum",
    }
)


#: Deepest nesting of models in models the walk accepts (real models nest a few levels).
MAX_DEPTH = 32
#: Most layer calls the walk records, counted after identical calls of a nested model are merged (a large
#: real model has a few thousand): past it the file is refused rather than walked for minutes.
MAX_CALLS = 200_000

# --------------------------------------------------------------------------- config walk


@dataclass
class _Call:
    """One call of a layer or model.

    ``chain``: explicit training kwargs of the enclosing model calls (outermost first) and this call's own.
    ``context``: the layer whose baked training=True is certainly in Keras 3's call context when this call
    starts (it ran upstream in the same model call), or None. ``before``: the layers that certainly finished
    before it starts (upstream in the graph).
    """

    chain: tuple[bool | None, ...]
    shape: tuple[Dim, ...] | None
    inbound: tuple[tuple[str, int], ...] = ()
    context: str | None = None
    before: frozenset[str] = frozenset()  # layer paths certainly finished before this call starts
    count: int = 1  # how many calls this one stands for (identical calls of a nested model are merged)


def _entry_name(entry: dict[str, Any]) -> str:
    cfg: dict[str, Any] = entry["config"] if isinstance(entry.get("config"), dict) else {}
    return str(entry.get("name") or cfg.get("name") or entry.get("class_name", "?"))


def _shape(value: Any) -> tuple[Dim, ...] | None:
    if not isinstance(value, (list, tuple)) or not all(v is None or isinstance(v, int) for v in value):
        return None
    return tuple(value)


def node_calls(entry: dict[str, Any]) -> list[tuple[bool | None, tuple[Dim, ...] | None, tuple[tuple[str, int], ...]]]:
    """(explicit training kwarg, input shape, inbound (layer, node) refs) of each inbound node of a layer."""
    out = []
    for node in entry.get("inbound_nodes") or []:
        training, shape, refs = None, None, []
        if isinstance(node, dict):  # Keras 3: {"args": [...], "kwargs": {...}}
            kwargs = node.get("kwargs") or {}
            training = kwargs.get("training") if isinstance(kwargs, dict) else None
            if isinstance(kwargs, dict) and "training" in kwargs and training is None:
                # passed as None: Keras 3 takes it over the context a baked True set (the layer runs in inference)
                # and sets the context to it for the layers after, as an explicit False does
                training = False
            for tensor in _keras_tensors(node.get("args")):
                conf = tensor.get("config") or {}
                history = conf.get("keras_history")
                if shape is None:
                    shape = _shape(conf.get("shape"))
                if isinstance(history, list) and len(history) >= 2:
                    refs.append((str(history[0]), int(history[1])))
        elif isinstance(node, list):  # Keras 2: [[name, node_index, tensor_index, kwargs], ...]
            for item in node:
                if isinstance(item, list) and len(item) >= 3:
                    refs.append((str(item[0]), int(item[1])))
                    if len(item) >= 4 and isinstance(item[3], dict) and item[3].get("training") is not None:
                        training = item[3].get("training")
        out.append((bool(training) if isinstance(training, (bool, int)) else None, shape, tuple(refs)))
    return out


def _keras_tensors(value: Any) -> Iterator[dict[str, Any]]:
    if isinstance(value, dict):
        if value.get("class_name") == "__keras_tensor__":
            yield value
        else:
            for v in value.values():
                yield from _keras_tensors(v)
    elif isinstance(value, list):
        for v in value:
            yield from _keras_tensors(v)


def _model_inputs(model_cfg: dict[str, Any]) -> list[InputSpec]:
    entries = layer_entries(model_cfg)
    by_name = {_entry_name(e): e for e in entries}
    cfg = model_cfg.get("config") or {}
    specs = []
    if model_cfg.get("class_name") == "Sequential":
        first = entries[0] if entries else {}
        shape = None
        if first.get("class_name") == "InputLayer":
            c = first.get("config") or {}
            shape = _shape(c.get("batch_shape") or c.get("batch_input_shape"))
        else:
            shape = _shape((first.get("config") or {}).get("batch_input_shape")) if first else None
        shape = (
            shape
            or _shape(cfg.get("build_input_shape"))
            or _shape((model_cfg.get("build_config") or {}).get("input_shape"))
        )
        return [
            InputSpec(
                _entry_name(first) if first.get("class_name") == "InputLayer" else "input",
                _symbolic(shape, "input"),
                _dtype(first.get("config")),
            )
        ]
    refs = cfg.get("input_layers") or []
    if isinstance(refs, dict):  # keras.Model({"a": in_a, ...}, ...): inputs keyed by name
        refs = list(refs.values())
    if refs and not isinstance(refs[0], list):
        refs = [refs]
    for ref in refs:
        entry = by_name.get(str(ref[0]), {}) if isinstance(ref, list) and ref else {}
        c = entry.get("config") or {}
        name = _entry_name(entry) if entry else str(ref)
        specs.append(
            InputSpec(name, _symbolic(_shape(c.get("batch_shape") or c.get("batch_input_shape")), name), _dtype(c))
        )
    return specs


def _dtype(cfg: Any) -> str:
    dtype = cfg.get("dtype") if isinstance(cfg, dict) else None
    if isinstance(dtype, dict):
        dtype = (dtype.get("config") or {}).get("name")
    if not isinstance(dtype, str) or dtype.startswith("mixed_"):
        return "float32"
    return dtype


def _symbolic(shape: tuple[Dim, ...] | None, owner: str) -> tuple[Dim, ...] | None:
    """Keras shapes use None for any free dim: the batch becomes "batch", others "<owner>_dim<i>"."""
    if shape is None:
        return None
    return tuple(("batch" if i == 0 else f"{owner}_dim{i}") if d is None else d for i, d in enumerate(shape))


@dataclass
class _Ctx:
    path: str
    weights: Any
    keras2: bool
    layers: list[NormLayer] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)
    unsafe: list[str] = field(default_factory=list)
    explicit_false: bool = False
    baked_calls: list[tuple[str, frozenset[str]]] = field(default_factory=list)  # (layer, what ran before it)
    memo: dict[Any, list[tuple[str | None, frozenset[str]]]] = field(default_factory=dict)
    ordered: bool = True  # track what ran before what (needed only when some call bakes training=True)
    calls: int = 0  # layer calls walked so far (see MAX_CALLS)
    code_layers: set[str] = field(default_factory=set)  # layers already said to carry code (once each)
    legacy: bool = False  # a .h5 file, which Keras 3 reads with its legacy loader
    tf_ops: dict[str, list[str]] = field(default_factory=dict)  # TF_OP_CLASSES class -> its layers
    broken: list[BrokenWeights] = field(default_factory=list)  # hidden norms' NaN/Inf variables (_hidden_norms)


def _sequential_as_dict(config: Any) -> Any:
    """``config`` with every Sequential model's bare list of layers (how Keras before 2.2 saved one) in the
    ``{"name", "layers"}`` form later versions write, which the walk reads; nested models too. A copy."""
    if isinstance(config, list):
        return [_sequential_as_dict(item) for item in config]
    if not isinstance(config, dict):
        return config
    found = {key: _sequential_as_dict(value) for key, value in config.items()}
    if found.get("class_name") == "Sequential" and isinstance(found.get("config"), list):
        found["config"] = {"name": found.get("name", "sequential"), "layers": found["config"]}
    return found


def build(
    path: str,
    fmt: str,
    config: Any,
    weights: Any,
    version: str | None,
    backend: str | None,
    notes: list[Note],
) -> KerasFile:
    if not isinstance(config, dict) or not isinstance(config.get("class_name"), str):
        raise BackendError(f"{path}: the model config is not a Keras model description")
    keras2 = bool(version) and str(version).split(".")[0] in ("1", "2")
    ctx = _Ctx(path, weights, keras2, notes=list(notes), legacy=fmt != "keras")
    cls = config["class_name"]
    bare_list = isinstance(config.get("config"), list)  # a Sequential as Keras before 2.2 saved it
    try:
        config = _sequential_as_dict(config)
        _scan_unsafe(config, "", ctx)
        # first, as what stops Keras 3 before anything else would
        ctx.unsafe[:0] = [
            f"{len(names)} {op} layer(s) ({few(names)}): TensorFlow ops saved by tf.keras, which Keras 3 cannot load "
            "(tf2onnx converts such a model where TensorFlow runs)"
            for op, names in ctx.tf_ops.items()
        ]
        # the order of calls matters only for a baked training=True (Keras 3 carries it on to later calls);
        # without one, the walk skips that bookkeeping, quadratic in a long chain
        ctx.ordered = re.search(r'"training": (?!false|0[,}\]]|null)', json.dumps(config)) is not None
        if cls in MODEL_CLASSES:
            _walk_model(config, (), [_Call((), None)], ctx, "" if fmt == "keras" else None)
            inputs = _model_inputs(config)
        else:
            ctx.notes.append(Note("warning", f"the top-level object is a {cls}, not a Functional or Sequential model"))
            inputs = []
    except RecursionError:
        raise BackendError(f"{path}: the model config is nested too deeply to read") from None
    except (AttributeError, TypeError, ValueError, KeyError, IndexError) as exc:
        # a field of another type than Keras writes (a bool where a dict belongs, a string for a list): the file
        # was not written by Keras as is, and no partial description of it would be trustworthy
        raise BackendError(
            f"{path}: malformed model config ({type(exc).__name__}: {one_line(exc, limit=150)})"
        ) from None
    if ctx.unsafe:
        ctx.notes.append(Note("warning", "probe refused, nothing will be executed: " + few_reasons(ctx.unsafe)))
    hidden: list[NormLayer] = []
    if isinstance(ctx.weights, (LegacyWeights, KerasWeights)) and cls in MODEL_CLASSES:
        hidden = _hidden_norms(config, ctx)
    saved = f"keras {version}" if version else "an unknown Keras version"
    ctx.notes.insert(0, Note("info", f"saved by {saved}" + (f" (backend {backend})" if backend else "")))
    layers = (_apply_leak(ctx) if not keras2 else ctx.layers) + hidden
    if ctx.unsafe:  # the probe and fix refuse the file: the checks' hints point at Keras instead of `bncheck fix`
        layers = [replace(layer, extra={**layer.extra, "unloadable": True}) for layer in layers]
    if not layers and cls in MODEL_CLASSES:  # as the ONNX walk says it: an empty report is not a silent one
        ctx.notes.append(Note("info", NO_LAYERS_NOTE.format(where="model")))
    baked_layers = sorted({source for source, _ in ctx.baked_calls})
    found = KerasFile(path, fmt, version, backend, config, layers, inputs, ctx.notes, ctx.unsafe, baked_layers)
    found.bare_list = bare_list
    found.broken_weights = ctx.broken
    return found


def _hidden_norms(config: dict[str, Any], ctx: _Ctx) -> list[NormLayer]:
    """A warning per top-level layer that holds no normalization layer the walk found but whose variables in
    the file are named as a normalization layer's: a layer class the config does not describe layer by layer
    (dgad's TCN, a class outside Keras, builds 10 LayerNormalizations inside itself; neutrophils-classifier's
    SimCLREncoder 12 BatchNormalizations in a .keras file), whose norms go unchecked. In a .keras file whose probe
    is refused anyway, the BatchNormalizations among them are returned, read from their stored variables as a
    weights-only file's are (KerasHub's backbones: never-updated and NaN statistics were passed in silence)."""
    weights = ctx.weights
    assert isinstance(weights, (LegacyWeights, KerasWeights))
    claimed = {layer.name.split("/")[0] for layer in ctx.layers}
    groups = weights.child_groups(config, "") if isinstance(weights, KerasWeights) else {}
    read: list[NormLayer] = []
    for index, entry in enumerate(layer_entries(config)):
        name = _entry_name(entry)
        if not name or name in claimed:
            continue
        if isinstance(weights, KerasWeights):
            scopes = weights.norm_scopes(groups[index]) if index in groups else []
        else:
            scopes = weights.norm_scopes(name)
        if not scopes:
            continue
        what = f"layer {name!r} ({entry.get('class_name')}) holds the variables of"
        unchecked = "bncheck does not check them"
        if isinstance(weights, KerasWeights) and ctx.unsafe:
            found, others, broken = nested_batch_norms(weights.h5.get(groups[index]), name)
            ctx.broken += broken
            if found:
                # a call with training=True runs every BatchNormalization inside in training mode in model(x), unless
                # the layer is frozen (trainable=False: Keras 3 runs a frozen BatchNormalization in inference)
                trainable = entry.get("config", {}).get("trainable", True) is not False
                in_training = trainable and any(training for training, _, _ in node_calls(entry))
                read += [_called_in_training(layer, name) for layer in found] if in_training else found
                rest = (
                    f"; {len(others)} other normalization layer(s) ({few(others)}): only NaN and Inf in their "
                    "variables are checked"
                    if others
                    else ""
                )
                ctx.notes.append(
                    Note(
                        "warning",
                        f"{what} {len(found)} BatchNormalization layer(s) that its config does not describe: their "
                        "stored statistics are checked (never updated, non-finite or negative), their epsilon and "
                        f"calls are unknown{rest}"
                        + (
                            "; it is called with training=True, so model(x) normalizes them with batch statistics"
                            if in_training
                            else ""
                        ),
                    )
                )
                continue
            unchecked = "only NaN and Inf in their variables are checked (their axes and epsilon are unknown)"
        shown = ", ".join(scopes[:3]) + (f" and {len(scopes) - 3} more" if len(scopes) > 3 else "")
        ctx.notes.append(
            Note(
                "warning",
                f"{what} {len(scopes)} normalization layer(s) that its config does not describe ({shown}): {unchecked}",
            )
        )
    return read


def _called_in_training(layer: NormLayer, holder: str) -> NormLayer:
    """``layer``, a BatchNormalization inside ``holder``, which the model calls with training=True: Keras 3 keeps the
    flag in model(x), and predict() overrides it."""
    note = f"inside {holder!r}, which the model calls with training=True"
    return replace(
        layer,
        training=True,
        batch_statistics=True,
        uses_running_stats=False,
        running_stats_used_by=KERAS3_OVERRIDES,
        notes=layer.notes + (note,),
    )


def _scan_unsafe(obj: Any, where: str, ctx: _Ctx) -> None:
    """Record every Lambda-like layer and every object whose module or registered name is outside Keras.

    ``where`` is the path of the layer being scanned ("" for the model itself); every nested object of a
    layer's config (initializers, dtype policies, wrapped layers) is checked too.
    """
    if isinstance(obj, list):
        for item in obj:
            _scan_unsafe(item, where, ctx)
        return
    if not isinstance(obj, dict):
        return
    cls = obj.get("class_name")
    if isinstance(cls, str):
        module, registered = obj.get("module"), obj.get("registered_name")
        label = repr(where) if where else "the model"
        if cls in CODE_CLASSES:
            # a Lambda's own config holds its function as a "__lambda__" object: one layer, said once
            if where not in ctx.code_layers:
                ctx.code_layers.add(where)
                ctx.unsafe.append(
                    f"layer {label} is a {cls} (it carries code)" if where else f"the model holds a {cls}"
                )
        elif cls in TF_OP_CLASSES:
            ctx.tf_ops.setdefault(cls, []).append(where or "the model")
        elif (
            isinstance(module, str)
            and module.split(".")[0] not in ("keras", "tf_keras")
            and not (ctx.legacy and module.startswith("tensorflow.") and cls in _BUILTIN_OBJECTS)
        ):
            ctx.unsafe.append(f"{label} uses {cls} from module {module!r}, outside Keras")
        elif registered is not None and registered != cls:
            ctx.unsafe.append(f"{label} uses the registered object {registered!r}, outside Keras")
    for key, value in obj.items():
        if key == "compile_config" and not where:
            # the loss, metrics and optimizer: bncheck loads with compile=False, so none of it is ever
            # deserialized (a user's dice loss, saved as a function from 'builtins', refused whole U-Nets)
            continue
        if key == "layers" and isinstance(value, list):
            for entry in value:
                name = _entry_name(entry) if isinstance(entry, dict) else "?"
                _scan_unsafe(entry, f"{where}/{name}" if where else name, ctx)
        else:
            _scan_unsafe(value, where, ctx)


def _walk_model(
    model_cfg: dict[str, Any],
    prefix: tuple[str, ...],
    calls: list[_Call],
    ctx: _Ctx,
    group: str | None,
    collect: bool = True,
) -> list[tuple[str | None, frozenset[str]]]:
    """Walk one Functional/Sequential level; return, per call of this model, the baked layer whose
    training=True is in the call context when the call returns (Keras 3 never restores it) or None, and the
    layers that have finished when it returns.

    A shared layer's calls sit at one place in the config but run at different times, so the contexts are
    computed by repeated passes until they settle; norm layers are recorded in a last pass (``collect``).
    """
    # Passes that only compute contexts are memoized: without it, nested models would be re-walked
    # 3**depth times (a deeply nested hostile config would never finish).
    if len(prefix) > MAX_DEPTH:
        raise BackendError(f"{ctx.path}: models nested more than {MAX_DEPTH} deep in the config: refusing to walk it")
    key = (id(model_cfg), prefix, tuple((c.chain, c.shape, c.inbound, c.context, c.before, c.count) for c in calls))
    if not collect and key in ctx.memo:
        return ctx.memo[key]
    emitted: dict[tuple[int, str, int], tuple[str | None, frozenset[str]]] = {}
    entries = layer_entries(model_cfg)
    # layers in graph order: one pass then settles every context, except around layers called several times
    order = list(range(len(entries))) if model_cfg.get("class_name") == "Sequential" else _graph_order(entries)
    for _ in range(len(entries) + 1):
        before = dict(emitted)
        _walk_pass(model_cfg, prefix, calls, ctx, group, emitted, order, collect=False)
        if emitted == before:
            break
    result = _walk_pass(model_cfg, prefix, calls, ctx, group, emitted, order, collect=collect)
    ctx.memo[key] = result
    return result


def _graph_order(entries: list[dict[str, Any]]) -> list[int]:
    """Indices of a Functional model's layer entries in dependency order (producers first, file order among
    equals): Kahn's algorithm, linear in the config. Entries on a cycle (a shared layer feeding itself) follow
    in file order; the repeated passes settle them."""
    index = {_entry_name(e): i for i, e in enumerate(entries)}
    users: list[list[int]] = [[] for _ in entries]
    waiting = [0] * len(entries)
    for i, entry in enumerate(entries):
        producers = {index[ref] for _, _, refs in node_calls(entry) for ref, _ in refs if ref in index} - {i}
        waiting[i] = len(producers)
        for producer in producers:
            users[producer].append(i)
    ready = [i for i, n in enumerate(waiting) if n == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for user in users[i]:
            waiting[user] -= 1
            if waiting[user] == 0:
                heapq.heappush(ready, user)
    placed = set(order)
    return order + [i for i in range(len(entries)) if i not in placed]


def _merge_calls(calls: list[_Call]) -> tuple[list[_Call], list[int]]:
    """Identical calls (same flags, shape, inbound refs and context) merged into one that stands for all of
    them (``count``), finished-before sets intersected (what certainly ran before each); and, per original
    call, the index of its merged call. A model called n times inside a model called m times is then walked
    for its distinct calls, not m * n times (fan-out nesting would otherwise grow exponentially)."""
    merged: list[_Call] = []
    where: dict[Any, int] = {}
    index: list[int] = []
    for call in calls:
        key = (call.chain, call.shape, call.inbound, call.context)
        if key in where:
            i = where[key]
            old = merged[i]
            merged[i] = replace(old, before=old.before & call.before, count=old.count + call.count)
        else:
            where[key] = len(merged)
            merged.append(call)
        index.append(where[key])
    return merged, index


def _walk_pass(
    model_cfg: dict[str, Any],
    prefix: tuple[str, ...],
    calls: list[_Call],
    ctx: _Ctx,
    group: str | None,
    emitted: dict[tuple[int, str, int], tuple[str | None, frozenset[str]]],
    order: list[int],
    collect: bool,
) -> list[tuple[str | None, frozenset[str]]]:
    """One pass over a model level; ``emitted[(model call, layer, node)]`` is the context a layer call leaves
    and the layers finished when it returns.

    Input shapes come from the file (Keras 3 records them per call and in build_config); where it records
    none (tf_keras .h5, Sequential in legacy .h5) they are propagated through the common layers.
    """
    entries = layer_entries(model_cfg)
    sequential = model_cfg.get("class_name") == "Sequential"
    groups = ctx.weights.child_groups(model_cfg, group or "") if isinstance(ctx.weights, KerasWeights) else {}
    last: dict[int, tuple[str | None, frozenset[str]]] = {
        k: (call.context, call.before) for k, call in enumerate(calls)
    }
    out_shapes: dict[tuple[int, str, int], tuple[Dim, ...] | None] = {}
    seq_shape: dict[int, tuple[Dim, ...] | None] = {
        k: call.shape or _shape((model_cfg.get("config") or {}).get("build_input_shape"))
        for k, call in enumerate(calls)
    }
    for index in order:
        entry = entries[index]
        cls = str(entry.get("class_name", ""))
        cfg: dict[str, Any] = entry["config"] if isinstance(entry.get("config"), dict) else {}
        name = _entry_name(entry)
        layer_path = prefix + (name,)
        if cls == "InputLayer":
            shape = _shape(cfg.get("batch_shape") or cfg.get("batch_input_shape"))
            for k in range(len(calls)):
                out_shapes[(k, name, 0)] = shape
                emitted[(k, name, 0)] = (None, calls[k].before)
                if sequential:
                    seq_shape[k] = shape or seq_shape[k]
            continue
        own = node_calls(entry)
        if any(t is False for t, _, _ in own):
            ctx.explicit_false = True
        if sequential or not own:
            own = [(None, None, ())]
        recorded = _shape((entry.get("build_config") or {}).get("input_shape"))
        layer_calls: list[_Call] = []
        keys: list[tuple[int, str, int]] = []
        for k, parent in enumerate(calls):
            for node_index, (training, shape, refs) in enumerate(own):
                if sequential:
                    context, before = last[k]
                    shape = shape or recorded or seq_shape[k] or _shape(cfg.get("batch_input_shape"))
                else:
                    upstream = [emitted[(k, ref, idx)] for ref, idx in refs if (k, ref, idx) in emitted]
                    context = parent.context or next((c for c, _ in upstream if c), None)
                    before = parent.before.union(*(done for _, done in upstream)) if ctx.ordered else frozenset()
                    shape = shape or recorded or _inbound_shape(cls, [out_shapes.get((k, r, i)) for r, i in refs])
                layer_calls.append(_Call(parent.chain + (training,), shape, refs, context, before, parent.count))
                keys.append((k, name, node_index))
        ctx.calls += len(layer_calls)
        if ctx.calls > MAX_CALLS:
            raise BackendError(
                f"{ctx.path}: the model config has more than {MAX_CALLS:,} layer calls: refusing to walk it"
            )
        wrapped = _time_distributed(entry)
        if cls in MODEL_CLASSES:
            merged, merged_index = _merge_calls(layer_calls)
            inner_merged = _walk_model(entry, layer_path, merged, ctx, groups.get(index), collect)
            inner = [inner_merged[i] for i in merged_index]
        elif wrapped is not None:
            inner = _walk_time_distributed(wrapped, layer_path, layer_calls, ctx, groups.get(index), collect)
        else:
            inner = [(None, frozenset())] * len(layer_calls)
            if cls in NORM_KINDS and collect:
                ctx.layers.append(_norm_layer(entry, cls, cfg, layer_path, layer_calls, ctx, groups.get(index)))
        path_text = "/".join(layer_path)
        for call, key, (inner_context, inner_done) in zip(layer_calls, keys, inner):
            own_flag = path_text if call.chain[-1] is True else None
            if own_flag and collect:
                ctx.baked_calls.append((own_flag, call.before))
            done = call.before | inner_done | {path_text} if ctx.ordered else frozenset()
            emitted[key] = (call.context or own_flag or inner_context, done)
            last[key[0]] = (emitted[key][0] or last[key[0]][0], last[key[0]][1] | done if ctx.ordered else frozenset())
            if cls == "Concatenate" and len(call.inbound) > 1:  # the only layer here whose shape needs every input's
                joined = [out_shapes.get((key[0], ref, idx)) for ref, idx in call.inbound]
                out = _concatenated(joined, cfg.get("axis", -1))
            else:
                out = (
                    _output_shape(cls, cfg, call.shape) if call.shape is not None and cls not in MODEL_CLASSES else None
                )
            out_shapes[key] = out
            if sequential:
                seq_shape[key[0]] = out
    return [last[k] for k in range(len(calls))]


def _time_distributed(entry: dict[str, Any]) -> dict[str, Any] | None:
    """The layer a TimeDistributed entry wraps, where it is a normalization layer or a model."""
    cfg = entry.get("config")
    inner = cfg.get("layer") if entry.get("class_name") == "TimeDistributed" and isinstance(cfg, dict) else None
    if not isinstance(inner, dict) or not isinstance(inner.get("config"), dict):
        return None
    return inner if inner.get("class_name") in NORM_KINDS or inner.get("class_name") in MODEL_CLASSES else None


def _walk_time_distributed(
    inner: dict[str, Any],
    td_path: tuple[str, ...],
    calls: list[_Call],
    ctx: _Ctx,
    group: str | None,
    collect: bool,
) -> list[tuple[str | None, frozenset[str]]]:
    """A TimeDistributed layer's wrapped norm layer or model, walked as a level of its own on one frame's
    shape, the wrapper's training flag reaching it. Keras 3 calls it once per frame on the batch's samples at
    that frame; Keras 1/2 reshape the frames into the batch axis (batch x frames) and call it once."""
    frames = [c.shape[1] if c.shape is not None and len(c.shape) >= 2 else None for c in calls]
    per_frame = [
        replace(c, shape=c.shape[:1] + c.shape[2:] if c.shape is not None and len(c.shape) >= 2 else None)
        for c in calls
    ]
    path = td_path + (_entry_name(inner),)
    inner_group = f"{group}/layer" if group else None
    cls = str(inner.get("class_name"))
    first = len(ctx.layers)
    if cls in MODEL_CLASSES:
        merged, merged_index = _merge_calls(per_frame)
        inner_merged = _walk_model(inner, path, merged, ctx, inner_group, collect)
        result = [inner_merged[i] for i in merged_index]
    else:
        result = [(None, frozenset())] * len(calls)
        if collect:
            # a legacy .h5 keeps the wrapped layer's weights in the wrapper's group, in creation order
            by_position = td_path if len(td_path) == 1 else path
            ctx.layers.append(_norm_layer(inner, cls, inner["config"], path, per_frame, ctx, inner_group, by_position))
    if collect:
        known = {f for f in frames if f is not None}
        count: Dim = known.pop() if len(known) == 1 and None not in frames else "T"
        where = "/".join(td_path)
        if ctx.keras2:
            note = (
                f"called by TimeDistributed {where!r} on its {count} frames at once, which Keras 1/2 reshape into "
                f"the batch axis (batch x {count}); Keras 3, which the probe runs, calls it once per frame"
            )
            extra: dict[str, Any] = {"time_distributed": where, "frames": count}
        else:
            note = f"called by TimeDistributed {where!r} once per frame ({count} frames) on the batch at that frame"
            extra = {"time_distributed": where}
        for k in range(first, len(ctx.layers)):
            layer = ctx.layers[k]
            ctx.layers[k] = replace(layer, notes=layer.notes + (note,), extra={**layer.extra, **extra})
    return result


def _effective(chain: tuple[bool | None, ...], keras2: bool) -> bool | None:
    """The training value a call runs with when the user leaves ``training`` unset (see module docstring)."""
    order = reversed(chain) if keras2 else iter(chain)
    return next((v for v in order if v is not None), None)


def _norm_layer(
    entry: dict[str, Any],
    cls: str,
    cfg: dict[str, Any],
    path: tuple[str, ...],
    calls: list[_Call],
    ctx: _Ctx,
    group: str | None,
    weights_path: tuple[str, ...] | None = None,
) -> NormLayer:
    kind = NORM_KINDS[cls]
    name = "/".join(path)
    notes: list[str] = []
    if kind is Kind.LAYER and cfg.get("rms_scaling"):
        kind = Kind.RMS
    shape = next((c.shape for c in calls if c.shape is not None), None)
    rank = len(shape) if shape is not None else None
    axis_cfg = cfg.get("axis", -1)
    axis_list = [axis_cfg] if isinstance(axis_cfg, int) else list(axis_cfg) if isinstance(axis_cfg, list) else []
    axes: tuple[int, ...] | None = None
    channel_axis: int | None = None
    if rank is not None and axis_list and all(isinstance(a, int) and -rank <= a < rank for a in axis_list):
        norm_axes = sorted({a % rank for a in axis_list})
        if kind is Kind.BATCH:
            channel_axis = norm_axes[-1]
            axes = tuple(i for i in range(rank) if i not in norm_axes)
        elif kind is Kind.GROUP:
            channel_axis = norm_axes[0]
            axes = tuple(range(1, rank))
        else:
            channel_axis = norm_axes[-1]
            axes = tuple(norm_axes)
    elif rank is None:
        notes.append("input shape not recorded in the file: axes unknown")
    # Parameters
    names = expected_vars(NORM_KINDS[cls], cls, cfg)  # by class: LayerNormalization(rms_scaling) keeps gamma
    params: dict[str, np.ndarray] = {}
    problem = None
    if names and ctx.weights is not None:
        if isinstance(ctx.weights, KerasWeights):
            params, problem = ctx.weights.lookup(group, path[-1], names) if group else ({}, "no weights group")
        else:
            params, problem = ctx.weights.lookup(weights_path or path, names)
    if problem:
        ctx.notes.append(Note("warning", f"{name}: {problem}; its parameters are unknown"))
    channels = None
    for key in ("gamma", "beta", "moving_mean", "moving_variance", "scale"):
        if key in params and params[key].ndim == 1:
            channels = int(params[key].shape[0])
            break
    if channels is None and shape is not None and channel_axis is not None:
        dim = shape[channel_axis]
        channels = dim if isinstance(dim, int) else None
    # Training flag
    effective = [_effective(c.chain, ctx.keras2) for c in calls]
    counts = [c.count for c in calls]
    baked = any(v is True for v in effective)
    trainable = cfg.get("trainable", True) is not False
    # batch renormalization without clipping corrects the batch's moments by r and d back to its renorm
    # statistics: (x - mean) / std * r + d = (x - renorm_mean) / renorm_std, the same whatever the batch
    unclipped_renorm = bool(cfg.get("renorm")) and not cfg.get("renorm_clipping")
    batch_statistics = kind is Kind.BATCH and baked and trainable and not unclipped_renorm
    if kind is Kind.BATCH and baked:
        notes.append(_baked_note(ctx.keras2, effective, counts, trainable))
    if kind is Kind.BATCH and cfg.get("renorm"):
        notes.append(
            "batch renormalization without clipping: a training=True call normalizes by its renorm statistics, "
            "not the batch's"
            if baked and unclipped_renorm
            else "batch renormalization"
        )
    if cls == "SyncBatchNormalization" or cfg.get("synchronized"):
        notes.append("synchronized across replicas in training")
    eps = cfg.get("epsilon")
    momentum = cfg.get("momentum") if kind is Kind.BATCH else None
    return NormLayer(
        name=name,
        kind=kind,
        op_type=cls,
        nodes=(name,),
        input=f"{name}:input",
        output=f"{name}:output",
        inputs=(f"{name}:input",),
        outputs=(f"{name}:output",),
        domain="keras",
        axes=axes,
        channel_axis=channel_axis,
        channels=channels,
        groups=int(cfg["groups"]) if kind is Kind.GROUP and isinstance(cfg.get("groups"), int) else None,
        epsilon=float(eps) if isinstance(eps, (int, float)) else (1e-12 if kind is Kind.UNIT else None),
        momentum=float(momentum) if isinstance(momentum, (int, float)) else None,
        training=kind is Kind.BATCH and baked,
        batch_statistics=batch_statistics,
        uses_running_stats=kind is Kind.BATCH and not batch_statistics,
        # Keras 3's predict() and training=False override a baked flag: the moving statistics still count
        running_stats_used_by=(KERAS2_AFTER_FIX if ctx.keras2 else KERAS3_OVERRIDES) if batch_statistics else (),
        # the layer subtracts its mean whatever `center` says (which only adds beta): x - mean is 0 over one element
        centered=kind in (Kind.BATCH, Kind.LAYER, Kind.GROUP),
        scale=params.get("gamma", params.get("scale")),
        bias=params.get("beta"),
        mean=params.get("moving_mean"),
        var=params.get("moving_variance"),
        input_shape=_symbolic(shape, name) if shape is not None else None,
        batch_axis=0,
        notes=tuple(notes),
        unreadable=problem or ("the file holds no weights" if names and ctx.weights is None else None),
        extra={
            "path": list(path),
            "calls": sum(counts),
            "baked": baked,
            "baked_calls": sum(n for n, v in zip(counts, effective) if v is True),
            "trainable": trainable,
            "inbound": [list(r) for c in calls for r in c.inbound],
            "leak_from": next((c.context for c, v in zip(calls, effective) if c.context and v is not True), None),
            "synchronized": bool(cls == "SyncBatchNormalization" or cfg.get("synchronized")),
        },
    )


def _baked_note(keras2: bool, effective: list[bool | None], counts: list[int], trainable: bool) -> str:
    count = sum(n for n, v in zip(counts, effective) if v is True)
    which = "" if count == sum(counts) else f" on {count:,} of {sum(counts):,} calls"
    if not trainable:
        return (
            f"baked training=True{which}, but the layer is not trainable, so it uses its moving statistics in "
            "every call style"
        )
    if keras2:
        return (
            f"baked training=True{which}; saved by Keras 2/tf_keras, where the baked flag wins in every call style, "
            "model.predict(x) and model(x, training=False) included"
        )
    return (
        f"baked training=True{which}; Keras 3 keeps it in model(x) but model.predict(x) and "
        "model(x, training=False) override it"
    )


def _apply_leak(ctx: _Ctx) -> list[NormLayer]:
    """Keras 3: a baked training=True stays in the call context for the layers called after it.

    The layers that certainly run after a baked call are its downstream layers in the graph (recorded per call
    as ``leak_from`` during the walk); when no call in the file has an explicit ``training=False`` (which would
    reset the context), those BatchNormalization layers use batch statistics in ``model(x)`` as well. Other
    layers may or may not, depending on Keras's execution order: they get a note, and the probe's as-written
    run measures them.
    """
    if not ctx.baked_calls:
        return ctx.layers
    out = []
    for layer in ctx.layers:
        if layer.kind is not Kind.BATCH or layer.extra.get("baked"):
            out.append(layer)
            continue
        source = layer.extra.get("leak_from")
        runs_first = layer.extra.get("calls") == 1 and all(layer.name in before for _, before in ctx.baked_calls)
        if runs_first and not source:
            out.append(layer)  # upstream of every baked call: it has finished before any of them starts
        elif source and not ctx.explicit_false and layer.extra.get("trainable", True):
            note = (
                f"no baked flag of its own, but it runs after {source}'s baked training=True in the same call and "
                "Keras 3 keeps that value for later layers: batch statistics in model(x); model.predict(x) and "
                "model(x, training=False) override it"
            )
            out.append(
                replace(
                    layer,
                    batch_statistics=True,
                    uses_running_stats=False,
                    running_stats_used_by=KERAS3_OVERRIDES,
                    notes=layer.notes + (note,),
                )
            )
        else:
            note = (
                "Keras 3 keeps a baked training=True for the layers called after it in model(x); whether this "
                "layer runs after one depends on the execution order (the probe's as-written run measures it)"
            )
            out.append(replace(layer, notes=layer.notes + (note,)))
    return out


# --------------------------------------------------------------------------- shapes for files without them


def _concatenated(shapes: list[tuple[Dim, ...] | None], axis: Any) -> tuple[Dim, ...] | None:
    """A Concatenate's output shape from its inputs' (None where one is unknown or the ranks differ)."""
    if not shapes or any(s is None for s in shapes) or not isinstance(axis, int):
        return None
    known = [s for s in shapes if s is not None]
    rank = len(known[0])
    if any(len(s) != rank for s in known) or not -rank <= axis < rank:
        return None
    axis %= rank
    sizes = [s[axis] for s in known]
    out = list(known[0])
    out[axis] = sum(d for d in sizes if isinstance(d, int)) if all(isinstance(d, int) for d in sizes) else None
    return tuple(out)


#: merge layers whose inputs all have the output's shape: any input's known shape is theirs
_ELEMENTWISE_MERGES = frozenset({"Add", "Subtract", "Multiply", "Average", "Maximum", "Minimum"})


def _inbound_shape(cls: str, shapes: list[tuple[Dim, ...] | None]) -> tuple[Dim, ...] | None:
    """A layer call's input shape from its inbound tensors' shapes: the first one's, or for an elementwise
    merge the most complete of them (ResMiCo's Add takes a Cropping1D's output first)."""
    if not shapes:
        return None
    if cls not in _ELEMENTWISE_MERGES:
        return shapes[0]
    known = [s for s in shapes if s is not None]
    return max(known, key=lambda s: sum(isinstance(d, int) for d in s), default=None)


def _output_shape(cls: str, c: dict[str, Any], shape: tuple[Dim, ...]) -> tuple[Dim, ...] | None:
    if cls in _SAME_SHAPE:
        return shape
    if cls == "Dense" and isinstance(c.get("units"), int):
        return shape[:-1] + (c["units"],)
    if cls == "Flatten":
        rest = shape[1:]
        sizes = [d for d in rest if isinstance(d, int)]
        return (shape[0], math.prod(sizes) if len(sizes) == len(rest) else None)
    if cls == "Reshape" and isinstance(c.get("target_shape"), list):
        return (shape[0],) + tuple(c["target_shape"])
    if cls == "Lambda" and c.get("output_shape_type", "raw") == "raw" and isinstance(c.get("output_shape"), list):
        # a Lambda's declared output shape, stored without the batch (Keras 2: "raw", facenet_keras's 21
        # scaled residuals [17, 17, 256]; Keras 3 writes the list alone); a function or none says nothing
        stored = c["output_shape"]
        if all(isinstance(d, int) or d is None for d in stored):
            return (shape[0], *stored)
    first = c.get("data_format") == "channels_first"
    if cls.startswith("Global") and "Pooling" in cls:
        channels = shape[1] if first else shape[-1]
        if c.get("keepdims"):
            return (
                (shape[0], channels) + (1,) * (len(shape) - 2)
                if first
                else (shape[0],) + (1,) * (len(shape) - 2) + (channels,)
            )
        return (shape[0], channels)
    conv = re.fullmatch(r"(Conv|SeparableConv|DepthwiseConv|MaxPooling|AveragePooling)([123])D", cls)
    if conv:
        n = int(conv.group(2))
        pooling = "Pooling" in cls
        kernel = c.get("pool_size" if pooling else "kernel_size")
        strides = c.get("strides") or kernel if pooling else c.get("strides", 1)
        dilation = c.get("dilation_rate", 1)
        as_tuple = lambda v: tuple(v) if isinstance(v, list) else (v,) * n
        kernel, strides, dilation = as_tuple(kernel), as_tuple(strides), as_tuple(dilation)
        spatial = shape[2:] if first else shape[1:-1]
        if len(spatial) != n:
            return None
        out: list[Dim] = []
        for size, k, s, d in zip(spatial, kernel, strides, dilation):
            if not isinstance(size, int) or not all(isinstance(v, int) for v in (k, s, d)):
                out.append(None)
            elif c.get("padding") == "same":
                out.append(-(-size // s))
            else:
                out.append(max(0, -(-(size - (k - 1) * d) // s)))
        channels = shape[1] if first else shape[-1]
        if not pooling:
            if cls.startswith("DepthwiseConv"):
                mult = c.get("depth_multiplier", 1)
                channels = channels * mult if isinstance(channels, int) and isinstance(mult, int) else None
            else:
                channels = c.get("filters")
        return (shape[0], channels, *out) if first else (shape[0], *out, channels)
    up = re.fullmatch(r"UpSampling([123])D", cls)
    if up:  # a U-Net's decoder (rbm3's UpSampling3D): each spatial dim times its size
        n = int(up.group(1))
        size = c.get("size", 2)
        factors = tuple(size) if isinstance(size, list) else (size,) * n
        spatial = shape[2:] if first else shape[1:-1]
        if len(spatial) != n or len(factors) != n:
            return None
        grown = [d * f if isinstance(d, int) and isinstance(f, int) else None for d, f in zip(spatial, factors)]
        return (shape[0], shape[1], *grown) if first else (shape[0], *grown, shape[-1])
    transposed = re.fullmatch(r"Conv([123])DTranspose", cls)
    if transposed and c.get("output_padding") is None and c.get("dilation_rate", 1) in (1, [1] * 2, [1] * 3, [1]):
        n = int(transposed.group(1))
        as_tuple = lambda v: tuple(v) if isinstance(v, list) else (v,) * n
        kernel, strides = as_tuple(c.get("kernel_size")), as_tuple(c.get("strides", 1))
        spatial = shape[2:] if first else shape[1:-1]
        if len(spatial) != n or len(kernel) != n or len(strides) != n:
            return None
        same = c.get("padding") == "same"
        widened: list[Dim] = [
            (d * s if same else d * s + max(k - s, 0)) if all(isinstance(v, int) for v in (d, k, s)) else None
            for d, k, s in zip(spatial, kernel, strides)
        ]
        filters = c.get("filters")
        return (shape[0], filters, *widened) if first else (shape[0], *widened, filters)
    if cls == "Embedding" and isinstance(c.get("output_dim"), int):
        return shape + (c["output_dim"],)
    if cls in _RECURRENT or cls == "Bidirectional":
        return _recurrent_shape(cls, c, shape)
    cropping = re.fullmatch(r"Cropping([123])D", cls)
    if cropping:  # a ResNet's shortcut or a U-Net's skip cut to the other branch's length
        return _cropped(int(cropping.group(1)), c.get("cropping"), shape, first)
    if cls.startswith("ZeroPadding") and isinstance(c.get("padding"), list) and not first:
        pads = c["padding"]
        padded: list[Dim] = list(shape[1:-1])
        for i, p in enumerate(pads[: len(padded)]):
            total = sum(p) if isinstance(p, list) else 2 * p
            size = padded[i]
            padded[i] = size + total if isinstance(size, int) else None
        return (shape[0], *padded, shape[-1])
    return None


_RECURRENT = frozenset({"LSTM", "GRU", "SimpleRNN", "CuDNNLSTM", "CuDNNGRU"})


def _cropped(n: int, cropping: Any, shape: tuple[Dim, ...], first: bool) -> tuple[Dim, ...] | None:
    """A CroppingND's output: each spatial dim less what is cut from its two ends (an int cuts it from both,
    a pair per end; Cropping1D's own pair is its one dim's two ends)."""
    if isinstance(cropping, int):
        pairs: list[Any] = [(cropping, cropping)] * n
    elif isinstance(cropping, list) and n == 1 and len(cropping) == 2 and all(isinstance(v, int) for v in cropping):
        pairs = [cropping]
    elif isinstance(cropping, list) and len(cropping) == n:
        pairs = [(v, v) if isinstance(v, int) else v for v in cropping]
    else:
        return None
    spatial = shape[2:] if first else shape[1:-1]
    if len(spatial) != n or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in pairs):
        return None
    cut = [
        d - p[0] - p[1] if isinstance(d, int) and all(isinstance(v, int) for v in p) else None
        for d, p in zip(spatial, pairs)
    ]
    return (shape[0], shape[1], *cut) if first else (shape[0], *cut, shape[-1])


def _recurrent_shape(cls: str, c: dict[str, Any], shape: tuple[Dim, ...]) -> tuple[Dim, ...] | None:
    """[B, T, F] in, [B, T, units] (return_sequences) or [B, units] out; a Bidirectional's two directions
    concatenated (twice the units; sum, mul and ave keep them). Other merge modes and returned states: unknown."""
    inner = c
    factor = 1
    if cls == "Bidirectional":
        wrapped = c.get("layer")
        inner = wrapped.get("config") if isinstance(wrapped, dict) else None  # type: ignore[assignment]
        mode = c.get("merge_mode", "concat")
        factor = 2 if mode == "concat" else 1 if mode in ("sum", "mul", "ave") else 0
    if not isinstance(inner, dict) or not factor or inner.get("return_state") or len(shape) != 3:
        return None
    units = inner.get("units")
    if not isinstance(units, int):
        return None
    return (shape[0], shape[1], units * factor) if inner.get("return_sequences") else (shape[0], units * factor)


@dataclass
class KerasFile:
    """What the static reader found. ``unsafe`` lists, per layer path, why the probe must refuse the file."""

    path: str
    format: str  # "keras" | "h5"
    keras_version: str | None
    backend: str | None
    config: dict[str, Any]
    layers: list[NormLayer]
    inputs: list[InputSpec]
    notes: list[Note] = field(default_factory=list)
    unsafe: list[str] = field(default_factory=list)
    baked_layers: list[str] = field(default_factory=list)  # layers (any kind) called with training=True
    weights_only: bool = False  # model.save_weights: layers found by their variable names, nothing to run
    # norm layers read from their variables alone (no config describes them) whose variables hold NaN or Inf
    broken_weights: list[BrokenWeights] = field(default_factory=list)
    bare_list: bool = False  # the file's top-level config is a bare list of layers (``config`` holds the dict form)
    # the probe's loaded model (a KerasRunner), kept so that `fix` runs the same model instead of loading it again
    runner: Any = field(default=None, repr=False, compare=False)

    @property
    def keras2(self) -> bool:
        """Saved by Keras 2 / tf_keras: a baked flag wins in every call style."""
        version = self.keras_version
        return bool(version) and version is not None and version.split(".")[0] in ("1", "2")

    @property
    def baked(self) -> bool:
        """Some BatchNormalization runs with a baked training=True: its own, an enclosing model's, or (Keras 3)
        one that an earlier layer, a Dropout say, left in the call context."""
        batch_norms = [layer for layer in self.layers if layer.kind is Kind.BATCH]
        if any(layer.extra.get("baked") or layer.batch_statistics for layer in batch_norms):
            return True
        # Keras 3: a flag baked anywhere may reach a BatchNormalization through the call context
        return bool(batch_norms) and bool(self.baked_layers) and not self.keras2


def few_reasons(reasons: list[str], limit: int = 3) -> str:
    """The first few reasons a probe is refused, and how many more (a hostile config may give thousands); each
    said once (one layer may use the same outside function twice)."""
    reasons = list(dict.fromkeys(reasons))
    rest = len(reasons) - limit
    return "; ".join(reasons[:limit]) + (f"; and {rest:,} more" if rest > 0 else "")
