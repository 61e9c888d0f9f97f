"""Read Keras model files without Keras: ``.keras`` archives and legacy ``.h5`` files, nothing executed.

Only zipfile, json, h5py and numpy are used, so ``bncheck inspect`` works without the ``keras`` extra and a
hostile file cannot run code: no class is instantiated, no function deserialized. What the files hold was
measured with keras 3.15 (see issue 4 and tests/test_keras_static.py):

- ``.keras`` is a zip of ``metadata.json`` (keras_version), ``config.json`` (the layer graph) and
  ``model.weights.h5``. A layer's variables sit at ``layers/<snake_class>[_<n>]/vars/<i>``: the group is a
  counter per class in ``model.layers`` order (a Sequential's InputLayer is not in ``model.layers``), not the
  layer name; the ``vars`` group carries the layer name as attribute ``name``; nested models nest the path
  (``layers/functional/layers/batch_normalization``); ``scale=False``/``center=False`` drop gamma/beta and
  shift the indices.
- legacy ``.h5`` keeps ``model_config`` (JSON) as a root attribute and the variables of top-level layer L
  under ``model_weights/L/<weight name>`` where the names are listed in L's ``weight_names`` attribute,
  e.g. ``L/gamma`` (keras 3), ``L/gamma:0`` (tf_keras), ``seq/L/gamma`` or ``inner/bn1/gamma`` (nested).
- A baked ``training=True`` is a call kwarg: ``"kwargs": {"training": true}`` in a Keras 3 inbound node,
  ``[["d1", 0, 0, {"training": true}]]`` in the tf_keras (Keras 2) node format.

The training flag's meaning depends on the Keras version that runs the file (measured with keras 3.15;
tf_keras from its documented behaviour, no TensorFlow here): in Keras 3 the outermost explicit ``training``
wins (``model.predict(x)`` and ``model(x, training=False)`` override every baked flag, a nested model called
with ``training=True`` overrides its layers' own flags), and a baked ``training=True`` stays in the call
context for every layer called after it in the same call (the context is never restored), so downstream
layers use batch statistics too; in tf_keras a layer's own baked flag wins in every call style.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import struct
import tempfile
import zipfile
from dataclasses import dataclass, field, replace
from typing import Any, Iterator

import numpy as np

from bncheck.backends.base import BackendError
from bncheck.model import Dim, InputSpec, Kind, NormLayer, Note

#: Largest uncompressed size accepted for config.json / metadata.json (a big model's config is a few MB).
MAX_JSON_BYTES = 64 * 1024**2
#: Largest uncompressed size accepted for model.weights.h5 (declared or actually read).
MAX_WEIGHTS_BYTES = 16 * 1024**3
#: Members larger than RATIO_FLOOR that inflate more than MAX_RATIO times their stored size are refused as
#: zip bombs. Keras writes members stored (ratio 1) and DEFLATE tops out near 1032:1; Keras's own loader uses
#: the same ratio (keras.src.saving.saving_lib._ZIP_MEMBER_MAX_EXPANSION = 100).
MAX_RATIO = 100
RATIO_FLOOR = 1024**2

NORM_KINDS: dict[str, Kind] = {
    "BatchNormalization": Kind.BATCH,
    "SyncBatchNormalization": Kind.BATCH,  # tf_keras; Keras 3 spells it BatchNormalization(synchronized=True)
    "LayerNormalization": Kind.LAYER,
    "GroupNormalization": Kind.GROUP,
    "UnitNormalization": Kind.UNIT,
    "RMSNormalization": Kind.RMS,
}
MODEL_CLASSES = frozenset({"Functional", "Sequential", "Model"})
#: Layers whose config carries code (Python bytecode, a wrapped module or a SavedModel): never run by bncheck.
CODE_CLASSES = frozenset({"Lambda", "TorchModuleWrapper", "JaxLayer", "FlaxLayer", "TFSMLayer", "__lambda__"})
#: Layers that keep their input's shape (used only when a file records no shapes: tf_keras .h5).
_SAME_SHAPE = frozenset(
    set(NORM_KINDS)
    | {"Activation", "ReLU", "LeakyReLU", "PReLU", "ELU", "Softmax", "Dropout", "SpatialDropout1D",
       "SpatialDropout2D", "SpatialDropout3D", "GaussianNoise", "GaussianDropout", "AlphaDropout",
       "ActivityRegularization", "Masking", "Identity", "Rescaling", "Normalization", "Add", "Subtract",
       "Multiply", "Average", "Maximum", "Minimum"}
)


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

    @property
    def keras2(self) -> bool:
        """Saved by Keras 2 / tf_keras: a baked flag wins in every call style."""
        return bool(self.keras_version) and self.keras_version.split(".")[0] in ("1", "2")

    @property
    def baked(self) -> bool:
        """Some BatchNormalization runs with a baked training=True: its own, an enclosing model's, or (Keras 3)
        one that an earlier layer, a Dropout say, left in the call context."""
        batch_norms = [layer for layer in self.layers if layer.kind is Kind.BATCH]
        if any(layer.extra.get("baked") or layer.batch_statistics for layer in batch_norms):
            return True
        # Keras 3: a flag baked anywhere may reach a BatchNormalization through the call context
        return bool(batch_norms) and bool(self.baked_layers) and not self.keras2


# --------------------------------------------------------------------------- file access


def read(path: str) -> KerasFile:
    """Read ``path`` (.keras or .h5/.hdf5) into a :class:`KerasFile`. Raises BackendError (one line)."""
    if not os.path.exists(path):
        raise BackendError(f"{path}: no such file")
    if os.path.isdir(path):
        raise BackendError(f"{path}: is a directory, not a Keras model file")
    if path.lower().endswith(".keras"):
        return _read_keras(path)
    return _read_h5(path)


def _read_keras(path: str) -> KerasFile:
    import h5py

    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise BackendError(f"{path}: not a .keras file (not a readable zip archive: {exc})") from None
    with zf:
        members = {info.filename: info for info in zf.infolist()}
        for info in members.values():
            _guard_member(path, info)
        if "config.json" not in members:
            raise BackendError(f"{path}: not a .keras file (no config.json in the archive)")
        config = _read_json_member(path, zf, members["config.json"])
        metadata = _read_json_member(path, zf, members["metadata.json"]) if "metadata.json" in members else {}
        version = metadata.get("keras_version") if isinstance(metadata, dict) else None
        weights_info = members.get("model.weights.h5")
        notes: list[Note] = []
        if weights_info is None:
            notes.append(Note("warning", "the archive has no model.weights.h5: parameters are unknown"))
            return _build(path, "keras", config, None, version, None, notes)
        with _open_member(path, zf, weights_info) as raw:
            try:
                weights = h5py.File(raw, "r")
            except Exception as exc:  # h5py raises OSError/ValueError on what is not HDF5
                raise BackendError(f"{path}: model.weights.h5 is not a readable HDF5 file ({_one_line(exc)})") from None
            with weights:
                return _build(path, "keras", config, _KerasWeights(weights), version, None, notes)


def _read_h5(path: str) -> KerasFile:
    import h5py

    try:
        handle = h5py.File(path, "r")
    except Exception as exc:
        raise BackendError(f"{path}: not a readable HDF5 file ({_one_line(exc)})") from None
    with handle:
        try:
            raw = handle.attrs.get("model_config")
            if raw is None:
                raise BackendError(
                    f"{path}: no model_config in this HDF5 file (a weights-only file?): save the whole model "
                    "with model.save()"
                )
            if isinstance(raw, bytes):
                raw = raw.decode("utf-8")
            if len(raw) > MAX_JSON_BYTES:
                raise BackendError(f"{path}: model_config is larger than {MAX_JSON_BYTES} bytes")
            config = _parse_json(path, "model_config", raw)
            version = _attr_str(handle.attrs.get("keras_version"))
            backend = _attr_str(handle.attrs.get("backend"))
            group = handle.get("model_weights")
            weights = _LegacyWeights(group) if group is not None else None
            notes = [] if weights is not None else [Note("warning", "no model_weights group: parameters are unknown")]
            return _build(path, "h5", config, weights, version, backend, notes)
        except BackendError:
            raise
        except Exception as exc:
            raise BackendError(f"{path}: damaged Keras HDF5 file ({_one_line(exc)})") from None


def _guard_member(path: str, info: zipfile.ZipInfo) -> None:
    """Refuse members that escape the archive or inflate like a zip bomb, before anything is decompressed.

    Every member is checked for its path and ratio (Keras extracts assets when it loads the file for the
    probe); the absolute size limits apply to the members bncheck reads.
    """
    name = info.filename.replace("\\", "/")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name) or ".." in name.split("/"):
        raise BackendError(f"{path}: archive member {info.filename!r} has a path that escapes the archive")
    limit = {"config.json": MAX_JSON_BYTES, "metadata.json": MAX_JSON_BYTES, "model.weights.h5": MAX_WEIGHTS_BYTES}.get(name)
    if limit is not None and info.file_size > limit:
        raise BackendError(f"{path}: archive member {info.filename!r} declares {info.file_size} bytes (limit {limit})")
    if info.file_size > RATIO_FLOOR and info.file_size > MAX_RATIO * max(info.compress_size, 1):
        raise BackendError(
            f"{path}: archive member {info.filename!r} inflates {info.compress_size} bytes to {info.file_size} "
            f"(more than {MAX_RATIO}x): refusing a possible zip bomb"
        )


def _read_json_member(path: str, zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> Any:
    try:
        with zf.open(info) as member:
            data = member.read(MAX_JSON_BYTES + 1)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
        raise BackendError(f"{path}: cannot read {info.filename} from the archive ({_one_line(exc)})") from None
    if len(data) > MAX_JSON_BYTES:
        raise BackendError(f"{path}: {info.filename} is larger than {MAX_JSON_BYTES} bytes")
    return _parse_json(path, info.filename, data)


def _parse_json(path: str, what: str, data: str | bytes) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise BackendError(f"{path}: {what} is not valid JSON ({_one_line(exc)})") from None


class _Window(io.RawIOBase):
    """A read-only, seekable view of bytes [start, start+size) of a file: a stored zip member, read in place.

    Written by hand because zipfile's own member file re-reads the member from its start on every backward
    seek before Python 3.12, and HDF5 seeks backwards constantly (quadratic on a large weights file).
    """

    def __init__(self, path: str, start: int, size: int) -> None:
        super().__init__()
        self._file = open(path, "rb")
        self._start, self._size, self._pos = start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        n = max(0, min(len(buffer), self._size - self._pos))
        if n == 0:
            return 0
        self._file.seek(self._start + self._pos)
        data = self._file.read(n)
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def close(self) -> None:
        self._file.close()
        super().close()


def _open_member(path: str, zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> io.IOBase:
    """A seekable file object over the member: in place when stored, else inflated into a capped temp file."""
    if info.compress_type == zipfile.ZIP_STORED and info.flag_bits & 0x1 == 0:
        with open(path, "rb") as f:
            f.seek(info.header_offset)
            header = f.read(30)
        if len(header) != 30 or header[:4] != b"PK\x03\x04":
            raise BackendError(f"{path}: damaged zip archive (bad local header for {info.filename})")
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        start = info.header_offset + 30 + name_len + extra_len
        if start + info.compress_size > os.path.getsize(path):
            raise BackendError(f"{path}: damaged zip archive ({info.filename} runs past the end of the file)")
        return _Window(path, start, info.compress_size)
    tmp = tempfile.TemporaryFile()
    try:
        with zf.open(info) as member:
            copied = 0
            while chunk := member.read(1 << 20):
                copied += len(chunk)
                if copied > MAX_WEIGHTS_BYTES or copied > MAX_RATIO * max(info.compress_size, 1) + RATIO_FLOOR:
                    raise BackendError(f"{path}: {info.filename} inflates past the limits: refusing a possible zip bomb")
                tmp.write(chunk)
    except BackendError:
        tmp.close()
        raise
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
        tmp.close()
        raise BackendError(f"{path}: cannot read {info.filename} from the archive ({_one_line(exc)})") from None
    tmp.seek(0)
    return tmp


def _attr_str(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]


# --------------------------------------------------------------------------- weights lookup


_VAR_NAMES = {
    Kind.BATCH: ("gamma", "beta", "moving_mean", "moving_variance"),
    Kind.LAYER: ("gamma", "beta"),
    Kind.GROUP: ("gamma", "beta"),
    Kind.RMS: ("scale",),
    Kind.UNIT: (),
}


def _expected_vars(kind: Kind, cls: str, cfg: dict[str, Any]) -> tuple[str, ...]:
    """Variable names in the order the layer creates them (absent ones dropped, so indices shift)."""
    scale, center = bool(cfg.get("scale", True)), bool(cfg.get("center", True))
    if kind is Kind.BATCH:
        return tuple(v for v, keep in zip(_VAR_NAMES[kind], (scale, center, True, True)) if keep)
    if kind is Kind.LAYER:
        rms = bool(cfg.get("rms_scaling", False))
        return tuple(v for v, keep in zip(_VAR_NAMES[kind], (scale or rms, center and not rms)) if keep)
    if kind is Kind.GROUP:
        return tuple(v for v, keep in zip(_VAR_NAMES[kind], (scale, center)) if keep)
    return _VAR_NAMES[kind]


class _KerasWeights:
    """Variables of a .keras archive, addressed by the class-counter group paths Keras writes."""

    def __init__(self, h5: Any) -> None:
        self.h5 = h5

    def child_groups(self, model_cfg: dict[str, Any], base: str) -> dict[int, str]:
        """Group path of each entry of ``model_cfg``'s layer list (by index), computed the way Keras names them."""
        sequential = model_cfg.get("class_name") == "Sequential"
        used: dict[str, int] = {}
        groups: dict[int, str] = {}
        for index, entry in enumerate(layer_entries(model_cfg)):
            if sequential and entry.get("class_name") == "InputLayer":
                continue  # Sequential.layers hides its InputLayer, so it takes no counter
            snake = _snake_case(str(entry.get("class_name", "")))
            if snake in used:
                used[snake] += 1
                name = f"{snake}_{used[snake]}"
            else:
                used[snake] = 0
                name = snake
            groups[index] = f"{base}/layers/{name}" if base else f"layers/{name}"
        return groups

    def lookup(self, group: str, layer_name: str, names: tuple[str, ...]) -> tuple[dict[str, np.ndarray], str | None]:
        try:
            return self._lookup(group, layer_name, names)
        except (OSError, KeyError, ValueError, TypeError) as exc:  # h5py on a damaged group or dataset
            return {}, f"unreadable variables in model.weights.h5 ({_one_line(exc)})"

    def _lookup(self, group: str, layer_name: str, names: tuple[str, ...]) -> tuple[dict[str, np.ndarray], str | None]:
        vars_group = self.h5.get(f"{group}/vars")
        attr = _attr_str(vars_group.attrs.get("name")) if vars_group is not None else None
        if vars_group is None or (attr is not None and attr != layer_name):
            # The counter did not land on this layer (a layer shared with another model, a class Keras names
            # differently): find the sibling group whose vars carry this layer's name, if exactly one does.
            parent = self.h5.get(group.rsplit("/", 1)[0])
            found = [
                g["vars"] for g in (parent.values() if parent is not None else [])
                if "vars" in g and _attr_str(g["vars"].attrs.get("name")) == layer_name
            ]
            if len(found) != 1:
                return {}, f"variables not found in model.weights.h5 (looked for {group}/vars)"
            vars_group = found[0]
        count = sum(1 for key in vars_group.keys() if key.isdigit())
        if count < len(names):
            return {}, f"{group}/vars holds {count} variables, expected {len(names)} ({', '.join(names)})"
        return {name: np.asarray(vars_group[str(i)][()]) for i, name in enumerate(names)}, None


class _LegacyWeights:
    """Variables of a legacy .h5 file, found by name in the top-level layer's ``weight_names`` list."""

    def __init__(self, group: Any) -> None:
        self.group = group

    def lookup(self, path: tuple[str, ...], names: tuple[str, ...]) -> tuple[dict[str, np.ndarray], str | None]:
        try:
            return self._lookup(path, names)
        except (OSError, KeyError, ValueError, TypeError) as exc:  # h5py on a damaged group or dataset
            return {}, f"unreadable variables in model_weights ({_one_line(exc)})"

    def _lookup(self, path: tuple[str, ...], names: tuple[str, ...]) -> tuple[dict[str, np.ndarray], str | None]:
        top = self.group.get(path[0])
        if top is None:
            return {}, f"no model_weights/{path[0]} group"
        weight_names = [_attr_str(w) for w in top.attrs.get("weight_names", [])]
        found: dict[str, np.ndarray] = {}
        for var in names:
            candidates = []
            for weight_name in weight_names:
                parts = weight_name.split("/")
                if len(parts) >= 2 and parts[-1].split(":")[0] == var and parts[-2] == path[-1]:
                    candidates.append(parts)
            if len(candidates) > 1:  # same layer name in two nested models: the longest scope on the path wins
                fitting = [c for c in candidates if _scope_fits(c[:-2], path[:-1])]
                longest = max((len(c) for c in fitting), default=0)
                candidates = [c for c in fitting if len(c) == longest]
            if len(candidates) != 1:
                return {}, f"variable {var!r} of {'/'.join(path)} not found unambiguously in model_weights/{path[0]}"
            dataset = top.get("/".join(candidates[0]))
            if dataset is None:
                return {}, f"model_weights/{path[0]}/{'/'.join(candidates[0])} is listed but missing"
            found[var] = np.asarray(dataset[()])
        return found, None


def _scope_fits(scope: list[str], model_path: tuple[str, ...]) -> bool:
    """Every scope component names a model on the layer's path (tf_keras prefixes some names with the model)."""
    return all(part in model_path for part in scope)


def _snake_case(name: str) -> str:
    """keras.src.utils.naming.to_snake_case, copied (the static reader must not import keras)."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


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


def layer_entries(model_cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """The layer configs of a Functional/Sequential config (``[]`` for anything else)."""
    cfg = model_cfg.get("config")
    entries = cfg.get("layers") if isinstance(cfg, dict) else None
    return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []


def _entry_name(entry: dict[str, Any]) -> str:
    cfg = entry.get("config") if isinstance(entry.get("config"), dict) else {}
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
        shape = shape or _shape(cfg.get("build_input_shape")) or _shape((model_cfg.get("build_config") or {}).get("input_shape"))
        return [InputSpec(_entry_name(first) if first.get("class_name") == "InputLayer" else "input",
                          _symbolic(shape, "input"), _dtype(first.get("config")))]
    refs = cfg.get("input_layers") or []
    if isinstance(refs, dict):  # keras.Model({"a": in_a, ...}, ...): inputs keyed by name
        refs = list(refs.values())
    if refs and not isinstance(refs[0], list):
        refs = [refs]
    for ref in refs:
        entry = by_name.get(str(ref[0]), {}) if isinstance(ref, list) and ref else {}
        c = entry.get("config") or {}
        name = _entry_name(entry) if entry else str(ref)
        specs.append(InputSpec(name, _symbolic(_shape(c.get("batch_shape") or c.get("batch_input_shape")), name), _dtype(c)))
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


def _build(
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
    ctx = _Ctx(path, weights, keras2, notes=list(notes))
    cls = config["class_name"]
    try:
        _scan_unsafe(config, "", ctx)
        if cls in MODEL_CLASSES:
            _walk_model(config, (), [_Call((), None)], ctx, "" if fmt == "keras" else None)
            inputs = _model_inputs(config)
        else:
            ctx.notes.append(Note("warning", f"the top-level object is a {cls}, not a Functional or Sequential model"))
            inputs = []
    except RecursionError:
        raise BackendError(f"{path}: the model config is nested too deeply to read") from None
    if ctx.unsafe:
        ctx.notes.append(Note("warning", "probe refused, nothing will be executed: " + "; ".join(ctx.unsafe)))
    saved = f"keras {version}" if version else "an unknown Keras version"
    ctx.notes.insert(0, Note("info", f"saved by {saved}" + (f" (backend {backend})" if backend else "")))
    layers = _apply_leak(ctx) if not keras2 else ctx.layers
    baked_layers = sorted({source for source, _ in ctx.baked_calls})
    return KerasFile(path, fmt, version, backend, config, layers, inputs, ctx.notes, ctx.unsafe, baked_layers)


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
            ctx.unsafe.append(f"layer {label} is a {cls} (it carries code)" if where else f"the model holds a {cls}")
        elif isinstance(module, str) and module.split(".")[0] not in ("keras", "tf_keras"):
            ctx.unsafe.append(f"{label} uses {cls} from module {module!r}, outside Keras")
        elif registered is not None and registered != cls:
            ctx.unsafe.append(f"{label} uses the registered object {registered!r}, outside Keras")
    for key, value in obj.items():
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
    key = (id(model_cfg), prefix, tuple((c.chain, c.shape, c.inbound, c.context, c.before) for c in calls))
    if not collect and key in ctx.memo:
        return ctx.memo[key]
    emitted: dict[tuple[int, str, int], tuple[str | None, frozenset[str]]] = {}
    entries = layer_entries(model_cfg)
    for _ in range(len(entries) + 1):
        before = dict(emitted)
        _walk_pass(model_cfg, prefix, calls, ctx, group, emitted, collect=False)
        if emitted == before:
            break
    result = _walk_pass(model_cfg, prefix, calls, ctx, group, emitted, collect=collect)
    ctx.memo[key] = result
    return result


def _walk_pass(
    model_cfg: dict[str, Any],
    prefix: tuple[str, ...],
    calls: list[_Call],
    ctx: _Ctx,
    group: str | None,
    emitted: dict[tuple[int, str, int], tuple[str | None, frozenset[str]]],
    collect: bool,
) -> list[tuple[str | None, frozenset[str]]]:
    """One pass over a model level; ``emitted[(model call, layer, node)]`` is the context a layer call leaves
    and the layers finished when it returns.

    Input shapes come from the file (Keras 3 records them per call and in build_config); where it records
    none (tf_keras .h5, Sequential in legacy .h5) they are propagated through the common layers.
    """
    entries = layer_entries(model_cfg)
    sequential = model_cfg.get("class_name") == "Sequential"
    groups = ctx.weights.child_groups(model_cfg, group) if isinstance(ctx.weights, _KerasWeights) else {}
    last: dict[int, tuple[str | None, frozenset[str]]] = {k: (call.context, call.before) for k, call in enumerate(calls)}
    out_shapes: dict[tuple[int, str, int], tuple[Dim, ...] | None] = {}
    seq_shape: dict[int, tuple[Dim, ...] | None] = {
        k: call.shape or _shape((model_cfg.get("config") or {}).get("build_input_shape")) for k, call in enumerate(calls)
    }
    for index, entry in enumerate(entries):
        cls = str(entry.get("class_name", ""))
        cfg = entry.get("config") if isinstance(entry.get("config"), dict) else {}
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
                    before = parent.before.union(*(done for _, done in upstream))
                    shape = shape or recorded or (out_shapes.get((k, refs[0][0], refs[0][1])) if refs else None)
                layer_calls.append(_Call(parent.chain + (training,), shape, refs, context, before))
                keys.append((k, name, node_index))
        if cls in MODEL_CLASSES:
            inner = _walk_model(entry, layer_path, layer_calls, ctx, groups.get(index), collect)
        else:
            inner = [(None, frozenset())] * len(layer_calls)
            if cls in NORM_KINDS and collect:
                ctx.layers.append(_norm_layer(entry, cls, cfg, layer_path, layer_calls, ctx, groups.get(index)))
        path_text = "/".join(layer_path)
        for call, key, (inner_context, inner_done) in zip(layer_calls, keys, inner):
            own_flag = path_text if call.chain[-1] is True else None
            if own_flag and collect:
                ctx.baked_calls.append((own_flag, call.before))
            done = call.before | inner_done | {path_text}
            emitted[key] = (call.context or own_flag or inner_context, done)
            last[key[0]] = (emitted[key][0] or last[key[0]][0], last[key[0]][1] | done)
            out = _output_shape(cls, cfg, call.shape) if call.shape is not None and cls not in MODEL_CLASSES else None
            out_shapes[key] = out
            if sequential:
                seq_shape[key[0]] = out
    return [last[k] for k in range(len(calls))]


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
    names = _expected_vars(NORM_KINDS[cls], cls, cfg)  # by class: LayerNormalization(rms_scaling) keeps gamma
    params: dict[str, np.ndarray] = {}
    problem = None
    if names and ctx.weights is not None:
        if isinstance(ctx.weights, _KerasWeights):
            params, problem = ctx.weights.lookup(group, path[-1], names) if group else ({}, "no weights group")
        else:
            params, problem = ctx.weights.lookup(path, names)
    if problem:
        ctx.notes.append(Note("warning", f"{name}: {problem}; its parameters are unknown"))
    channels = None
    for key in ("gamma", "beta", "moving_mean", "moving_variance", "scale"):
        if key in params and params[key].ndim == 1:
            channels = int(params[key].shape[0])
            break
    if channels is None and shape is not None and channel_axis is not None and isinstance(shape[channel_axis], int):
        channels = shape[channel_axis]
    # Training flag
    effective = [_effective(c.chain, ctx.keras2) for c in calls]
    baked = any(v is True for v in effective)
    trainable = cfg.get("trainable", True) is not False
    batch_statistics = kind is Kind.BATCH and baked and trainable
    if kind is Kind.BATCH and baked:
        notes.append(_baked_note(ctx.keras2, effective, trainable))
    if kind is Kind.BATCH and cfg.get("renorm"):
        notes.append("batch renormalization")
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
        centered=kind in (Kind.BATCH, Kind.LAYER, Kind.GROUP) and bool(cfg.get("center", True)),
        scale=params.get("gamma", params.get("scale")),
        bias=params.get("beta"),
        mean=params.get("moving_mean"),
        var=params.get("moving_variance"),
        input_shape=_symbolic(shape, name) if shape is not None else None,
        batch_axis=0,
        notes=tuple(notes),
        extra={
            "path": list(path),
            "calls": len(calls),
            "baked": baked,
            "baked_calls": sum(1 for v in effective if v is True),
            "trainable": trainable,
            "inbound": [list(r) for c in calls for r in c.inbound],
            "leak_from": next((c.context for c, v in zip(calls, effective) if c.context and v is not True), None),
        },
    )


def _baked_note(keras2: bool, effective: list[bool | None], trainable: bool) -> str:
    count = sum(1 for v in effective if v is True)
    which = "" if count == len(effective) else f" on {count} of {len(effective)} calls"
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
            out.append(replace(layer, batch_statistics=True, uses_running_stats=False, notes=layer.notes + (note,)))
        else:
            note = (
                "Keras 3 keeps a baked training=True for the layers called after it in model(x); whether this "
                "layer runs after one depends on the execution order (the probe's as-written run measures it)"
            )
            out.append(replace(layer, notes=layer.notes + (note,)))
    return out


# --------------------------------------------------------------------------- shapes for files without them


def _output_shape(cls: str, c: dict[str, Any], shape: tuple[Dim, ...]) -> tuple[Dim, ...] | None:
    if cls in _SAME_SHAPE:
        return shape
    if cls == "Dense" and isinstance(c.get("units"), int):
        return shape[:-1] + (c["units"],)
    if cls == "Flatten":
        rest = shape[1:]
        return (shape[0], math.prod(rest) if all(isinstance(d, int) for d in rest) else None)
    if cls == "Reshape" and isinstance(c.get("target_shape"), list):
        return (shape[0],) + tuple(c["target_shape"])
    first = c.get("data_format") == "channels_first"
    if cls.startswith("Global") and "Pooling" in cls:
        channels = shape[1] if first else shape[-1]
        if c.get("keepdims"):
            return (shape[0], channels) + (1,) * (len(shape) - 2) if first else (shape[0],) + (1,) * (len(shape) - 2) + (channels,)
        return (shape[0], channels)
    conv = re.fullmatch(r"(Conv|SeparableConv|DepthwiseConv|MaxPooling|AveragePooling)([123])D", cls)
    if conv:
        n = int(conv.group(2))
        pooling = "Pooling" in cls
        kernel = c.get("pool_size" if pooling else "kernel_size")
        strides = c.get("strides") or kernel if pooling else c.get("strides", 1)
        dilation = c.get("dilation_rate", 1)
        as_tuple = lambda v: tuple(v) if isinstance(v, list) else (v,) * n  # noqa: E731
        kernel, strides, dilation = as_tuple(kernel), as_tuple(strides), as_tuple(dilation)
        spatial = shape[2:] if first else shape[1:-1]
        if len(spatial) != n:
            return None
        out = []
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
    if cls.startswith("ZeroPadding") and isinstance(c.get("padding"), list) and not first:
        pads = c["padding"]
        spatial = list(shape[1:-1])
        for i, p in enumerate(pads[: len(spatial)]):
            total = sum(p) if isinstance(p, list) else 2 * p
            spatial[i] = spatial[i] + total if isinstance(spatial[i], int) else None
        return (shape[0], *spatial, shape[-1])
    return None
