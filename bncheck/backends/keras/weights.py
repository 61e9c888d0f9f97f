"""Find a layer's variables in model.weights.h5 (.keras) or model_weights (legacy .h5)."""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from bncheck import budget
from bncheck.errors import one_line
from bncheck.model import Kind

# --------------------------------------------------------------------------- weights lookup


_VAR_NAMES = {
    Kind.BATCH: ("gamma", "beta", "moving_mean", "moving_variance"),
    Kind.LAYER: ("gamma", "beta"),
    Kind.GROUP: ("gamma", "beta"),
    Kind.RMS: ("scale",),
    Kind.UNIT: (),
}


#: the variables a BatchNormalization(renorm=True) creates after its moving statistics (Keras 3 and tf_keras)
RENORM_VARS = ("moving_stddev", "renorm_mean", "renorm_stddev")


def expected_vars(kind: Kind, cls: str, cfg: dict[str, Any]) -> tuple[str, ...]:
    """Variable names in the order the layer creates them (absent ones dropped, so indices shift)."""
    scale, center = bool(cfg.get("scale", True)), bool(cfg.get("center", True))
    if kind is Kind.BATCH:
        own = tuple(v for v, keep in zip(_VAR_NAMES[kind], (scale, center, True, True)) if keep)
        return own + (RENORM_VARS if cfg.get("renorm") else ())
    if kind is Kind.LAYER:
        rms = bool(cfg.get("rms_scaling", False))
        return tuple(v for v, keep in zip(_VAR_NAMES[kind], (scale or rms, center and not rms)) if keep)
    if kind is Kind.GROUP:
        return tuple(v for v, keep in zip(_VAR_NAMES[kind], (scale, center)) if keep)
    return _VAR_NAMES[kind]


#: the class-counter group names of Keras 3's normalization layers (batch_normalization, batch_normalization_3)
NORM_GROUPS = (
    "batch_normalization",
    "layer_normalization",
    "group_normalization",
    "rms_normalization",
    "unit_normalization",
)


#: Where tf.keras 2.13 and 2.14 wrote a model's layers in model.weights.h5 (later Keras: ``layers``). They counted
#: a layer holding variables twice (conv2d, conv2d_2, conv2d_4, beside re_lu, re_lu_1), so its groups are matched
#: to the config's layers by their order within a class, not by the names later Keras gives them.
TF_KERAS_213_LAYERS = "_layer_checkpoint_dependencies"


def counter_order(group_name: str) -> tuple[str, int]:
    """A group Keras named by its class counter as (class, counter), which sorts in creation order:
    batch_normalization, _1, _2, ..., _10 (not _1, _10, _2)."""
    stem, _, number = group_name.rpartition("_")
    return (stem, int(number)) if stem and number.isdigit() else (group_name, -1)


def by_class_order(names: list[str], snake: str) -> list[str]:
    """The ``names`` of a class's counted groups (``snake``, ``snake_1``, ...), in creation order."""
    return sorted((n for n in names if counter_order(n)[0] == snake), key=counter_order)


def counted_name(snake: str, count: int) -> str:
    """The name Keras gives the ``count``-th layer of a class (from 0): ``snake``, ``snake_1``, ``snake_2``, ..."""
    return f"{snake}_{count}" if count else snake


def as_keras3_layout(h5: Any) -> bool:
    """Rewrites a weights file in TF_KERAS_213_LAYERS's layout, open for writing, into Keras 3's: each model's
    groups under ``layers``, renamed by their order within a class (links moved, no data copied). Whether it was
    in that layout. Keras 3 reads that layout itself only where its names are Keras 3's too."""
    if "layers" in h5 or TF_KERAS_213_LAYERS not in h5:
        return False
    models = [h5]
    while models:
        model = models.pop()
        if TF_KERAS_213_LAYERS not in model or "layers" in model:
            continue
        names = list(model[TF_KERAS_213_LAYERS])
        model.create_group("layers")
        for snake in {counter_order(name)[0] for name in names}:
            for k, name in enumerate(by_class_order(names, snake)):
                model.move(f"{TF_KERAS_213_LAYERS}/{name}", f"layers/{counted_name(snake, k)}")
        models += [model["layers"][name] for name in model["layers"]]
    return True


#: What a weights file written on Windows by tf.keras 2.13-2.15 says (keras-team/keras#18528)
WINDOWS_PATHS = (
    "its weights were written on Windows, each layer's path joined with backslashes into one name "
    "('layers\\conv2d'; tf.keras 2.13-2.15)"
)


def has_backslash_paths(h5: Any) -> bool:
    """Whether a model.weights.h5 names its layers' groups as Windows paths at its root (WINDOWS_PATHS)."""
    return any("\\" in name for name in h5)


def as_slash_paths(h5: Any) -> None:
    """Rewrites such a file, open for writing, into the groups its names spell: ``layers\\conv2d`` becomes
    ``layers/conv2d`` (links moved, no data copied)."""
    # a nested model's own group before its layers', whose paths pass through it
    for name in sorted((name for name in h5 if "\\" in name), key=lambda name: name.count("\\")):
        target = name.replace("\\", "/")
        h5.require_group(target.rsplit("/", 1)[0])
        h5.move(name, target)


class KerasWeights:
    """Variables of a .keras archive, addressed by the class-counter group paths Keras writes."""

    def __init__(self, h5: Any) -> None:
        self.h5 = h5
        self.layers_key = TF_KERAS_213_LAYERS if "layers" not in h5 and TF_KERAS_213_LAYERS in h5 else "layers"

    def norm_scopes(self, group: str) -> list[str]:
        """The groups under ``group`` that hold a normalization layer's variables (named by its class counter,
        at any depth: a subclassed layer keeps its sub-layers under their attribute names), in file order;
        none where the group cannot be read."""
        found: list[str] = []

        def visit(name: str, item: Any) -> None:
            last = name.rsplit("/", 1)[-1]
            if not hasattr(item, "keys") or "vars" not in item:
                return
            # a sub-layer kept as an attribute is stored under the attribute's name (MiT's norm1): its own
            # name, in its vars' attribute, is the class's where Keras generated it (layer_normalization_18)
            own = attr_str(item["vars"].attrs.get("name")) or ""
            if last.startswith(NORM_GROUPS) or own.startswith(NORM_GROUPS):
                found.append(name)

        try:
            top = self.h5.get(group)
            if top is not None and hasattr(top, "visititems"):
                top.visititems(visit)
        except (OSError, KeyError, ValueError, TypeError):  # h5py on a damaged group
            return []
        return found

    def child_groups(self, model_cfg: dict[str, Any], base: str) -> dict[int, str]:
        """Group path of each entry of ``model_cfg``'s layer list (by index), computed the way Keras names them."""
        sequential = model_cfg.get("class_name") == "Sequential"
        parent = f"{base}/{self.layers_key}" if base else self.layers_key
        stored = self._children(parent) if self.layers_key != "layers" else []
        used: dict[str, int] = {}
        groups: dict[int, str] = {}
        for index, entry in enumerate(layer_entries(model_cfg)):
            if sequential and entry.get("class_name") == "InputLayer":
                continue  # Sequential.layers hides its InputLayer, so it takes no counter
            snake = _snake_case(str(entry.get("class_name", "")))
            used[snake] = used.get(snake, -1) + 1
            if self.layers_key == "layers":
                groups[index] = f"{parent}/{counted_name(snake, used[snake])}"
                continue
            ordered = by_class_order(stored, snake)
            if used[snake] < len(ordered):
                groups[index] = f"{parent}/{ordered[used[snake]]}"
        return groups

    def _children(self, path: str) -> list[str]:
        try:
            group = self.h5.get(path)
            return list(group.keys()) if group is not None and hasattr(group, "keys") else []
        except (OSError, KeyError, ValueError, TypeError):  # h5py on a damaged group
            return []

    def lookup(self, group: str, layer_name: str, names: tuple[str, ...]) -> tuple[dict[str, np.ndarray], str | None]:
        try:
            return self._lookup(group, layer_name, names)
        except (OSError, KeyError, ValueError, TypeError) as exc:  # h5py on a damaged group or dataset
            return {}, f"unreadable variables in model.weights.h5 ({one_line(exc)})"

    def _lookup(self, group: str, layer_name: str, names: tuple[str, ...]) -> tuple[dict[str, np.ndarray], str | None]:
        vars_group = self.h5.get(f"{group}/vars")
        attr = attr_str(vars_group.attrs.get("name")) if vars_group is not None else None
        if vars_group is None or (attr is not None and attr != layer_name):
            # The counter did not land on this layer (a layer shared with another model, a class Keras names
            # differently): find the sibling group whose vars carry this layer's name, if exactly one does.
            parent = self.h5.get(group.rsplit("/", 1)[0])
            found = [
                g["vars"]
                for g in (parent.values() if parent is not None else [])
                if "vars" in g and attr_str(g["vars"].attrs.get("name")) == layer_name
            ]
            if len(found) != 1:
                return {}, f"variables not found in model.weights.h5 (looked for {group}/vars)"
            vars_group = found[0]
        count = sum(1 for key in vars_group if key.isdigit())
        if count < len(names):
            return {}, f"{group}/vars holds {count} variables, expected {len(names)} ({', '.join(names)})"
        return {name: read_dataset(vars_group[str(i)]) for i, name in enumerate(names)}, None


class LegacyWeights:
    """Variables of a legacy .h5 file, found by name in the top-level layer's ``weight_names`` list."""

    def __init__(self, group: Any) -> None:
        self.group = group

    def norm_scopes(self, layer: str) -> list[str]:
        """The scopes under top-level layer ``layer`` whose variables are named as a normalization layer's
        (gamma and beta, or moving_mean and moving_variance: ``tcn/residual_block_0/norm_0``), in file order;
        none where the group cannot be read."""
        try:
            top = self.group.get(layer)
            names = [attr_str(w) or "" for w in top.attrs.get("weight_names", [])] if top is not None else []
        except (OSError, KeyError, ValueError, TypeError):  # h5py on a damaged group
            return []
        found: dict[str, set[str]] = {}
        for name in names:
            scope, _, var = name.rpartition("/")
            found.setdefault(scope, set()).add(var.split(":")[0])
        pairs = ({"gamma", "beta"}, {"moving_mean", "moving_variance"})
        return [scope for scope, held in found.items() if scope and any(pair <= held for pair in pairs)]

    def lookup(self, path: tuple[str, ...], names: tuple[str, ...]) -> tuple[dict[str, np.ndarray], str | None]:
        try:
            return self._lookup(path, names)
        except (OSError, KeyError, ValueError, TypeError) as exc:  # h5py on a damaged group or dataset
            return {}, f"unreadable variables in model_weights ({one_line(exc)})"

    def _lookup(self, path: tuple[str, ...], names: tuple[str, ...]) -> tuple[dict[str, np.ndarray], str | None]:
        top = self.group.get(path[0])
        if top is None:
            return {}, f"no model_weights/{path[0]} group"
        weight_names = [attr_str(w) or "" for w in top.attrs.get("weight_names", [])]
        if len(path) == 1:
            return _by_position(top, path[0], weight_names, names)
        found: dict[str, np.ndarray] = {}
        for var in names:
            candidates = _named(weight_names, var, path[-1])
            if not candidates:  # Keras 2.0 scopes: batch_normalization_1_1/gamma:0 for layer batch_normalization_1
                candidates = _named(weight_names, var, path[-1], renamed=True)
            if len(candidates) > 1:  # same layer name in two nested models: the longest scope on the path wins
                fitting = [c for c in candidates if _scope_fits(c[:-2], path[:-1])]
                longest = max((len(c) for c in fitting), default=0)
                candidates = [c for c in fitting if len(c) == longest]
            if len(candidates) != 1:
                return {}, f"variable {var!r} of {'/'.join(path)} not found unambiguously in model_weights/{path[0]}"
            dataset = top.get("/".join(candidates[0]))
            if dataset is None:
                return {}, f"model_weights/{path[0]}/{'/'.join(candidates[0])} is listed but missing"
            found[var] = read_dataset(dataset)
        return found, None


def _by_position(
    top: Any, layer: str, weight_names: list[str], names: tuple[str, ...]
) -> tuple[dict[str, np.ndarray], str | None]:
    """A top-level layer's group holds its own weights in creation order; Keras assigns them by position
    (legacy_h5_format.load_weights_from_hdf5_group), whatever scope the names carry (Keras 2.0 wrote
    ``batch_normalization_1_1/gamma:0`` in group ``batch_normalization_1``)."""
    if len(weight_names) != len(names):
        return {}, (
            f"model_weights/{layer} lists {len(weight_names)} weight(s), the layer has {len(names)} "
            f"({', '.join(names)})"
        )
    found: dict[str, np.ndarray] = {}
    for var, weight_name in zip(names, weight_names):
        dataset = top.get(weight_name)
        if dataset is None:
            return {}, f"model_weights/{layer}/{weight_name} is listed but missing"
        found[var] = read_dataset(dataset)
    return found, None


def _named(weight_names: list[str], var: str, layer: str, renamed: bool = False) -> list[list[str]]:
    """Weight names ``.../<layer>/<var>:0`` as [scope parts..., layer, var]; ``layer`` may hold '/' itself
    (tf.keras applications: MobileNetV3's ``Conv/BatchNorm``, DenseNet's ``conv1/bn``); ``renamed`` also accepts
    ``<layer>_<k>`` scopes."""
    found = []
    for weight_name in weight_names:
        head, _, last = weight_name.rpartition("/")
        if not head or last.split(":")[0] != var:
            continue
        if head == layer or head.endswith("/" + layer):
            scope = head[: -len(layer)].rstrip("/")
            found.append([*(scope.split("/") if scope else []), layer, last])
        elif renamed and re.fullmatch(re.escape(layer) + r"_\d+", head.rpartition("/")[2]):
            found.append(weight_name.split("/"))
    return found


def read_dataset(dataset: Any) -> np.ndarray:
    """A dataset's values, after checking its declared size against the memory budget: an HDF5 dataset can
    declare billions of never-written values (read as its fill value) or inflate from a few compressed bytes."""
    shape = getattr(dataset, "shape", None)
    if shape:  # a Dataset (h5py hands back groups and links as other types, which fail below as before)
        need = math.prod(int(d) for d in shape) * int(dataset.dtype.itemsize)
        budget.check(need, f"reading HDF5 dataset {dataset.name!r} (shape {tuple(shape)}, {dataset.dtype})")
    return np.asarray(dataset[()])


def _scope_fits(scope: list[str], model_path: tuple[str, ...]) -> bool:
    """Every scope component names a model on the layer's path (tf_keras prefixes some names with the model)."""
    return all(part in model_path for part in scope)


def _snake_case(name: str) -> str:
    """keras.src.utils.naming.to_snake_case, copied (the static reader must not import keras)."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def attr_str(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def layer_entries(model_cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """The layer configs of a Functional/Sequential config (``[]`` for anything else)."""
    cfg = model_cfg.get("config")
    entries = cfg.get("layers") if isinstance(cfg, dict) else None
    return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []
