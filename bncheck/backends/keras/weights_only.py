"""A .h5 file of weights only (``model.save_weights``): no model config, so no layer classes, calls or epsilon.

Keras 2 / tf_keras list each layer's variables by name in its group, and a variable scope holding
``moving_mean`` and ``moving_variance`` is a BatchNormalization's (no other Keras layer keeps both). Keras 3
(``*.weights.h5``) names a layer's group after its class (``layers/batch_normalization_3/vars/0..3``, the
layer's own name in the ``vars`` group's ``name`` attribute): a BatchNormalization's last two variables are its
moving mean and variance whatever ``center`` and ``scale`` drop. Those layers' stored statistics are what inspect
can check: never updated (BN003) and non-finite or negative (BN005).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from bncheck.backends.keras.weights import (
    NORM_GROUPS,
    RENORM_VARS,
    TF_KERAS_213_LAYERS,
    attr_str,
    by_class_order,
    counted_name,
    counter_order,
    read_dataset,
)
from bncheck.errors import few
from bncheck.model import BrokenWeights, Kind, NormLayer, Note

#: the variables a BatchNormalization keeps, in the order it creates them (gamma and beta are optional)
_BN_VARIABLES = ("gamma", "beta", "moving_mean", "moving_variance")


def weights_only_layers(root: Any) -> tuple[list[NormLayer], list[str], list[BrokenWeights]] | None:
    """The BatchNormalization layers of a weights-only file's root group, the names of the layers that hold a
    gamma (a LayerNormalization or GroupNormalization, which the variables alone cannot tell apart or check but
    for NaN and Inf), and those of them whose variables hold NaN or Inf; None where the root lists no layers
    (not a Keras weights file)."""
    if "layer_names" not in root.attrs:
        layers_group = _layers_of(root)
        if layers_group is None:
            return None
        others: list[str] = []
        broken: list[BrokenWeights] = []
        return _keras3_layers(layers_group, (), others, broken), others, broken
    names = [attr_str(n) or "" for n in root.attrs.get("layer_names", [])]
    layers, gammas = [], []
    for group_name in names:
        group = root.get(group_name)
        if group is None:
            continue
        scopes: dict[str, dict[str, str]] = {}
        for weight_name in (attr_str(w) or "" for w in group.attrs.get("weight_names", [])):
            scope, _, variable = weight_name.rpartition("/")
            scopes.setdefault(scope, {})[variable.split(":")[0]] = weight_name
        found = [(scope, held) for scope, held in scopes.items() if {"moving_mean", "moving_variance"} <= held.keys()]
        for scope, held in found:
            name = group_name if len(found) == 1 else f"{group_name}/{scope.rpartition('/')[2]}"
            values = {var: read_dataset(group[held[var]]) for var in _BN_VARIABLES if var in held}
            layers.append(_layer(name, values))
        gammas += [
            scope or group_name for scope, held in scopes.items() if "gamma" in held and "moving_mean" not in held
        ]
    return layers, gammas, []


#: Keras 3's group names of the other normalization classes (their variables carry no names to check them by)
_OTHER_NORMS = NORM_GROUPS[1:]
_CLASSES = dict(
    zip(_OTHER_NORMS, ("LayerNormalization", "GroupNormalization", "RMSNormalization", "UnitNormalization"))
)


def _nonfinite_variables(variables: Any, path: str) -> dict[str, tuple[int, int, int]]:
    """Each variable of ``variables`` (a layer's vars group) that holds NaN or Inf: its path -> (NaN, Inf, values)."""
    bad = {}
    for key in sorted((k for k in variables if k.isdigit()), key=int):
        values = read_dataset(variables[key])
        if values.dtype.kind == "f":
            nan, inf = int(np.isnan(values).sum()), int(np.isinf(values).sum())
            if nan or inf:
                bad[f"{path}/vars/{key}"] = (nan, inf, int(values.size))
    return bad


def _keras3_layers(
    layers_group: Any, prefix: tuple[str, ...], others: list[str], broken: list[BrokenWeights]
) -> list[NormLayer]:
    """The BatchNormalizations under a Keras 3 weights file's ``layers`` group, nested models' included; the
    paths of the other normalization layers are added to ``others``, and those whose variables hold NaN or Inf
    to ``broken``."""
    found = []
    # tf.keras 2.13/2.14 counted a layer holding variables twice: named by its order as later Keras names it
    counted = str(getattr(layers_group, "name", "")).rsplit("/", 1)[-1] == TF_KERAS_213_LAYERS  # an h5py group
    names = list(layers_group)
    label = {n: _by_order(n, names) if counted else n for n in names}
    for group_name, group in sorted(layers_group.items(), key=lambda item: counter_order(item[0])):
        variables = group.get("vars")
        name = (attr_str(variables.attrs.get("name")) if variables is not None else None) or label[group_name]
        # a sub-layer kept as an attribute is stored under the attribute's name, its own (generated) in its vars
        if (group_name.startswith("batch_normalization") or name.startswith("batch_normalization")) and variables:
            count = sum(1 for key in variables if key.isdigit())
            # 2 to 4 variables (gamma and beta optional), 3 more after them with renorm=True (RENORM_VARS)
            own = count - len(RENORM_VARS) if count > 4 else count
            if own >= 2:
                values = {
                    "moving_mean": read_dataset(variables[str(own - 2)]),
                    "moving_variance": read_dataset(variables[str(own - 1)]),
                }
                if own == 4:
                    values |= {"gamma": read_dataset(variables["0"]), "beta": read_dataset(variables["1"])}
                found.append(_layer("/".join(prefix + (name,)), values))
        elif group_name.startswith(_OTHER_NORMS) or name.startswith(_OTHER_NORMS):
            path = "/".join(prefix + (name,))
            others.append(path)
            bad = _nonfinite_variables(variables, path) if variables is not None else {}
            if bad:
                kind = next(c for c in _OTHER_NORMS if group_name.startswith(c) or name.startswith(c))
                broken.append(BrokenWeights(path, path, _CLASSES[kind], bad, "variables"))
        inner = _layers_of(group)
        if inner is not None and hasattr(inner, "items"):
            found.extend(_keras3_layers(inner, prefix + (name,), others, broken))
        # a subclassed layer's own sub-layers are stored under their attribute names, beside its vars
        # (neutrophils-classifier's sim_clr_encoder/feature_extractor/layers/batch_normalization...)
        kept = ("vars", "layers", TF_KERAS_213_LAYERS)
        attributes = {k: v for k, v in group.items() if k not in kept and hasattr(v, "items")}
        if attributes:
            found.extend(_keras3_layers(attributes, prefix + (name,), others, broken))
    return found


def nested_batch_norms(group: Any, name: str) -> tuple[list[NormLayer], list[str], list[BrokenWeights]]:
    """The BatchNormalizations stored under ``group``, the weights of a layer named ``name`` whose config does not
    describe its own layers (a class from outside Keras: KerasHub's backbones), read from their variables as a
    weights-only file's are and named under ``name``; and the paths of the other normalization layers there."""
    others: list[str] = []
    broken: list[BrokenWeights] = []
    try:
        found = _keras3_layers({name: group}, (), others, broken)
    except (OSError, KeyError, ValueError, TypeError):  # h5py on a damaged group
        return [], [], []
    # the config's name is what the user wrote (the group's own vars may name the layer otherwise)
    return [_nested(layer, name) for layer in found], others, broken


def _nested(layer: NormLayer, name: str) -> NormLayer:
    """``layer`` of a weights-only read, as a layer of ``name`` in a file with a config."""
    path = f"{name}/{layer.name.partition('/')[2]}" if "/" in layer.name else name
    return replace(
        layer,
        name=path,
        nodes=(path,),
        input=f"{path}:input",
        output=f"{path}:output",
        notes=(f"read from its stored variables: {name!r} does not describe its layers in the config",),
        extra={**layer.extra, "path": [path]},
    )


def _layers_of(group: Any) -> Any:
    """A weights file's group of a model's layers: ``layers``, or tf.keras 2.13/2.14's TF_KERAS_213_LAYERS."""
    found = group.get("layers")
    return found if found is not None else group.get(TF_KERAS_213_LAYERS)


def _by_order(name: str, names: list[str]) -> str:
    """``name``'s group as later Keras names it: by its order among the groups of its class."""
    snake = counter_order(name)[0]
    return counted_name(snake, by_class_order(names, snake).index(name))


def weights_only_notes(count: int, others: list[str]) -> list[Note]:
    """What a weights-only file's report can and cannot say."""
    notes = [
        Note(
            "warning" if count or others else "info",
            f"a weights-only file (model.save_weights: no model config): {count} BatchNormalization layer(s) found "
            "by their variable names; their epsilon, axes and calls are unknown, so only their stored statistics "
            "are checked (never updated, non-finite or negative); a probe needs the whole model (model.save)",
        )
    ]
    if others:
        notes.append(
            Note(
                "warning",
                f"{len(others)} other normalization layer(s) ({few(others)}: LayerNormalization or GroupNormalization "
                "by their variables) cannot be checked without the model config",
            )
        )
    elif not count:
        notes.append(Note("info", "no normalization layer's variables found in the file"))
    return notes


def _layer(name: str, values: dict[str, np.ndarray]) -> NormLayer:
    mean = values["moving_mean"]
    return NormLayer(
        name=name,
        kind=Kind.BATCH,
        op_type="BatchNormalization",
        nodes=(name,),
        input=f"{name}:input",
        output=f"{name}:output",
        domain="keras",
        channel_axis=None,
        channels=int(mean.size) if mean.ndim == 1 else None,
        uses_running_stats=True,
        scale=values.get("gamma"),
        bias=values.get("beta"),
        mean=mean,
        var=values["moving_variance"],
        notes=("from a weights-only file: found by its variable names, its config unknown",),
        extra={"path": [name], "weights_only": True},
    )
