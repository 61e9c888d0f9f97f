"""Keras 1/2 .h5 files (and the archives below) that Keras 3 misreads, loaded from a patched copy of their config;
the user's file is only read.

- A Sequential file whose first layer carries ``batch_input_shape`` (Keras 2.2-2.3 saved
  ``Sequential([Dense(..., input_shape=...)])`` so, with no InputLayer): Keras 3's legacy loader passes that
  batch-inclusive shape on as the layer's ``input_shape``, so the model asks for an extra axis ((None, None,
  68, 21) for (None, 68, 21)) and refuses the inputs the file's own Keras took, or a Conv1D's kernel refuses
  it and the file does not load at all. The copy gets an InputLayer of the declared shape first in its config,
  named as the static reader names the input, so that the model `fix` writes reads the same inputs.
- tf.keras 2 wrote ``time_major: false`` into every recurrent layer's config (LSTM, GRU, and inside
  Bidirectional), a keyword Keras 3 refuses, so no such file loaded. False is Keras 3's only layout (batch
  first), so the copy drops the key; a ``time_major: true`` layer stays, and the load's refusal with it.
- tf.keras 2.1 wrote a ``dtype`` into initializer configs (``{"class_name": "Zeros", "config": {"dtype":
  "float32"}}``), which Keras 3's initializers refuse, so the layer did not deserialize. An initializer only
  sets a new layer's first weights, which the file's stored weights replace: the copy drops the key.
- Keras before 2.2 stored a Sequential config as a bare list of layers, which Keras 3's legacy loader cannot
  read ("pop expected at most 1 argument"): the copy has the ``{"name", "layers"}`` form later versions
  write (the static reader reads that form too: ``config._sequential_as_dict``).
- Keras before 2.1.3 had GRU only in its original form, and wrote no ``reset_after``; Keras 3 takes the
  key's absence as ``reset_after=True``, another form with twice the biases, and refuses the stored weights:
  the copy says ``reset_after: false``, which is what those versions computed.
- Keras 2 wrote ``trainable`` and ``noise_shape`` into every SpatialDropout1D/2D/3D config, keywords Keras 3's
  refuse; dropout is the identity at inference, so the copy drops them.
- tf.keras 2.3 and later wrote ``groups: 1`` into every Conv1DTranspose/Conv2DTranspose/Conv3DTranspose
  config, a keyword Keras 3's transposed convolutions refuse (they have no groups): 1 is the only value they
  compute, so the copy drops it (a U-Net's or GAN's decoder: flim-fit's FLIM GAN did not load); another value
  stays, and the load's refusal with it.
- A layer wrapped by TimeDistributed or Bidirectional is written without the ``module`` a Keras 3 config
  carries, and Keras 3's legacy loader then cannot find even a built-in class ("Could not locate class
  'Dense'"): the copy names ``keras.layers`` for a wrapped layer (not a wrapped model, which loads no better).
- Keras 2 wrote a model's single output as a list of one, ``output_layers: [["out_relu", 0, 0]]``. Keras 3
  then builds a model nested in a Sequential with a list for its output, which the Sequential hands on as
  two tensors ("expects 1 named input(s) ... but it received 2 input tensors": Teachable Machine's image
  models, a MobileNetV2 and a Dense head each in a Sequential, tf.keras 2.4): the copy writes such an output
  as Keras 3 writes one, ``["out_relu", 0, 0]``.
- tf.keras 2 wrote ``groups`` and ``kernel_initializer``/``_regularizer``/``_constraint`` into every
  SeparableConv1D/2D config (from the Conv class it derives from), keywords Keras 3's separable convolutions
  refuse: they have no kernel of that name (their depthwise and pointwise kernels have keys of their own), so the
  copy drops them (Xception, tf.keras 2.13-2.15 and tf_keras: no such file loaded).
- tf.keras's applications name layers with '/' (DenseNet's ``conv1/bn``, MobileNetV3's ``Conv/BatchNorm``),
  which Keras 3 refuses in a name: the copy writes a division slash (NAME_SLASH) there and in every reference to
  the layer, and ``probe.find_layers`` reads it as '/' again, so findings name the layers as the file does.
- Keras 2 counted a nested model's calls from 1 (its node 0 linked the nested model's own input to its output),
  Keras 3 from 0, and Keras 3 reads a Keras 2 call's reference to a nested model's output as written: every
  model whose nested model feeds another layer (transfer learning's ``x = base(inputs)`` and a head, a siamese
  tower) was refused ("nodes failed to be resolved"). The copy counts those references from 0 (a Sequential's
  at the model's outputs too: there Keras 3 shifts a Functional's itself).

A .keras archive that tf.keras 2.13-2.15 or tf_keras wrote is refused by Keras 3, whose loader cannot import its
classes' modules (``keras.src.engine.functional``). Its model is built from the config without the keys that make
Keras 3 read an entry as its own, through the path Keras 3 takes for a Keras 2 .h5 file's (with the mends above),
and given the archive's weights, whose layout Keras 3 kept but for tf.keras 2.13's and 2.14's
(weights.TF_KERAS_213_LAYERS), which a copy of the weights is given first (weights.as_keras3_layout).

A Keras 3 archive whose augmentation layers hold keys an older Keras 3 wrote and the installed one refuses (Keras
3.4-3.5's RandomRotation ``value_range``) is loaded from a copy without them: those layers are the identity at
inference (AUGMENTATION).

And what Keras 3 computes differently from the Keras 1/2 that wrote a file it loads, said in a note:
``hard_sigmoid`` (Keras 2.0-2.2's default recurrent activation of LSTM and GRU) is clip(0.2 x + 0.5) in
Keras 1/2 and tf.keras 2, clip(x / 6 + 0.5) in Keras 3.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bncheck.backends.base import BackendError
from bncheck.backends.keras.archive import KerasFile
from bncheck.errors import one_line


def refusal(keras: Any, path: str, saved_by: str | None, exc: BaseException, mended: bool = False) -> BackendError:
    """The one-line refusal of a file Keras cannot load: Keras's reason, and for a Keras 1/2 file the version
    that saved it and the ways out (Keras 3 reads those files only in part)."""
    text = one_line(exc)
    major = (saved_by or "").split(".")[0]
    if major not in ("1", "2"):
        return BackendError(f"{path}: keras {keras.__version__} could not load the model ({text})")
    where = ", even from a copy whose config bncheck mended where Keras 3 misreads Keras 2's" if mended else ""
    return BackendError(
        f"{path}: keras {keras.__version__} could not load the model saved by Keras {saved_by} ({text}){where}; "
        f"Keras 3 reads files of Keras {major} only in part (bncheck inspect still reads this one): to probe it, "
        "export it to ONNX from the Keras that saved it (tf2onnx), or build the model in Keras 3 and load these weights"
    )


def load_patched(keras: Any, static: KerasFile) -> tuple[Any, str] | None:
    """The model of a Keras 1/2 .h5 file loaded from a copy with the patches above (of a tf.keras 2 .keras
    archive: see _load_keras2_archive), and a note saying what was patched; None where the file needs none or
    the copy cannot be written (the file is then loaded as it is). Raises the refusal, with Keras's reason,
    where the copy does not load either."""
    if static.format == "keras" and static.keras2:
        return _load_keras2_archive(keras, static)
    if static.format == "keras":
        return _load_without_inactive_keys(keras, static)
    if static.format != "h5" or not static.keras2:
        return None
    import h5py

    config = copy.deepcopy(static.config)  # the static read's: bare lists already in dict form
    declared = _declared_shape(static)
    found = _mended(config)
    if not (static.bare_list or declared is not None or found):
        return None

    def copied(folder: str) -> Any:
        path = os.path.join(folder, "model.h5")
        try:
            if declared is not None:
                _insert_input_layer(config, declared, static.inputs[0].name)
            shutil.copyfile(static.path, path)
            with h5py.File(path, "r+") as h5:
                h5.attrs["model_config"] = json.dumps(config)
        except Exception:  # h5py and json raise many kinds on what they cannot read: the file as it is
            return None
        return keras.saving.load_model(path, compile=False, safe_mode=True)

    model = _load_copy(keras, static, copied)
    if model is None:
        return None
    ours, theirs = keras.__version__, static.keras_version
    done = []
    if static.bare_list:
        done.append(
            f"Keras {ours} cannot read the Sequential config this Keras {theirs} file stores as a bare list of "
            "layers; bncheck loaded it with that list as the config's layers"
        )
    if declared is not None:
        shape = tuple(declared)
        done.append(
            f"Keras {ours} reads the batch_input_shape {shape} of this Keras {theirs} Sequential file's first layer "
            "as one sample's shape (an extra input axis, or a layer that refuses it); bncheck loaded it with an "
            f"input layer of {shape} in front"
        )
    return model, "; ".join(done + _mend_notes(found, ours, theirs)) + ", the file unchanged"


#: Augmentation layers, the identity at inference: a key an older Keras 3 wrote into one and the installed Keras
#: refuses (Keras 3.4-3.5's RandomRotation ``value_range``) cannot change what a probe computes. RandomCrop, which
#: crops at inference too, is not among them.
AUGMENTATION = frozenset(
    {"RandomBrightness", "RandomContrast", "RandomFlip", "RandomRotation", "RandomTranslation", "RandomZoom"}
    | {"RandomColorDegeneration", "RandomColorJitter", "RandomElasticTransform", "RandomErasing"}
    | {"RandomGaussianBlur", "RandomGrayscale", "RandomHue", "RandomInvert", "RandomPerspective"}
    | {"RandomPosterization", "RandomSaturation", "RandomSharpness", "RandomShear"}
)


def _refused_keys(keras: Any, config: Any) -> list[tuple[str, tuple[dict, list[str]]]]:
    """(layer name, (its config, the keys its class refuses)) of each augmentation layer whose config holds keys
    that neither its class nor Keras's Layer takes."""
    import inspect

    base = set(inspect.signature(keras.layers.Layer.__init__).parameters)
    found = []
    for cls, body in _class_configs(config):
        layer = getattr(keras.layers, cls, None) if cls in AUGMENTATION else None
        if layer is not None:
            refused = sorted(set(body) - base - set(inspect.signature(layer.__init__).parameters))
            if refused:
                found.append((_named(body), (body, refused)))
    return found


def _load_without_inactive_keys(keras: Any, static: KerasFile) -> tuple[Any, str] | None:
    """The model of a Keras 3 archive whose augmentation layers hold keys the installed Keras refuses (see
    AUGMENTATION), loaded from a copy without them; None where none does."""
    import zipfile

    if not _refused_keys(keras, static.config):
        return None  # the config is copied only where it is to be changed
    config = copy.deepcopy(static.config)
    sites = _refused_keys(keras, config)
    for _, (body, refused) in sites:
        for key in refused:
            body.pop(key)

    def copied(folder: str) -> Any:
        path = os.path.join(folder, "model.keras")
        with zipfile.ZipFile(static.path) as source, zipfile.ZipFile(path, "w") as target:
            for info in source.infolist():
                if info.filename == "config.json":
                    target.writestr(info, json.dumps(config))
                else:
                    with source.open(info) as data, target.open(info, "w") as out:
                        shutil.copyfileobj(data, out)
        return keras.saving.load_model(path, compile=False, safe_mode=True)

    model = _load_copy(keras, static, copied)
    if model is None:
        return None
    keys = sorted({key for _, (_, refused) in sites for key in refused})
    return model, (
        f"Keras {keras.__version__} refuses the {', '.join(keys)} that Keras {static.keras_version} wrote into "
        f"{len(sites)} augmentation layer(s) (first: {sites[0][0]!r}), which do nothing at inference; bncheck "
        "loaded it without them, the file unchanged"
    )


def _load_copy(keras: Any, static: KerasFile, load: Callable[[str], Any]) -> Any:
    """What ``load`` returns, given a temporary folder for the mended copy it writes and loads (None: no copy,
    the file is loaded as it is). Where it fails, the refusal with what stopped it is raised, unless Keras reads
    the file as it is: a mend that made matters worse must not refuse such a file (None, then)."""
    with tempfile.TemporaryDirectory(prefix="bncheck-keras-") as folder:
        try:
            with warnings.catch_warnings():  # Keras's deprecation warnings belong to no one line
                warnings.simplefilter("ignore")
                return load(folder)
        except Exception as exc:  # zipfile, h5py, json and Keras raise many kinds: the refusal says which
            failed = exc
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            keras.saving.load_model(static.path, compile=False, safe_mode=True)
    except Exception:
        raise refusal(keras, static.path, static.keras_version, failed, mended=True) from None
    return None


def _mended(config: Any) -> list[tuple[_Mend, list[tuple[str, Any]]]]:
    """Every mend ``config`` needs, applied to it in place, with its sites."""
    found = [(mend, sites) for mend in _MENDS if (sites := mend.find(config))]
    for mend, sites in found:
        for _, site in sites:
            mend.apply(site)
    return found


def _mend_notes(found: list[tuple[_Mend, list[tuple[str, Any]]]], ours: str, theirs: str | None) -> list[str]:
    return [mend.note.format(ours=ours, theirs=theirs, count=len(sites), first=sites[0][0]) for mend, sites in found]


#: what marks a config entry as Keras 3's (its module and registered name send Keras 3 down the new path, which
#: tf.keras 2's modules, keras.src.engine.*, fail), and what only that path reads
_KERAS3_KEYS = ("module", "registered_name", "build_config", "compile_config")


def _without_keras3_keys(node: Any) -> None:
    if isinstance(node, dict):
        for key in _KERAS3_KEYS:
            node.pop(key, None)
        node = list(node.values())
    if isinstance(node, list):
        for value in node:
            _without_keras3_keys(value)


def _load_keras2_archive(keras: Any, static: KerasFile) -> tuple[Any, str] | None:
    """The model of a .keras archive that tf.keras 2.13-2.15 or tf_keras wrote, which Keras 3 refuses (its
    classes' modules are tf.keras's): built from its config as Keras 3 builds a Keras 2 .h5 file's (the entries
    without the keys that make Keras 3 read them as its own, the mends above applied), its weights loaded from a
    copy of the archive's model.weights.h5 in Keras 3's layout. None where the config is not a model's (Keras
    loads the file as it is). Raises the refusal where that fails and Keras 3 cannot read the file as it is
    either."""
    import zipfile

    import h5py

    from bncheck.backends.keras.config import MODEL_CLASSES
    from bncheck.backends.keras.weights import as_keras3_layout, as_slash_paths, has_backslash_paths

    if static.config.get("class_name") not in MODEL_CLASSES:
        return None
    config = copy.deepcopy(static.config)
    _without_keras3_keys(config)
    found = _mended(config)

    def built(folder: str) -> tuple[Any, bool]:
        weights = os.path.join(folder, "model.weights.h5")  # Keras loads weights from a path of this ending
        with (
            zipfile.ZipFile(static.path) as archive,
            archive.open("model.weights.h5") as source,
            open(weights, "wb") as target,
        ):
            shutil.copyfileobj(source, target)
        with h5py.File(weights, "r+") as h5:  # in Keras 3's layout: Windows paths spelled, 2.13's relaid
            if has_backslash_paths(h5):
                as_slash_paths(h5)
            relaid = as_keras3_layout(h5)
        # the model's own class by its public name: Keras 3 finds no class of an entry without a module
        model = (keras.Sequential if config["class_name"] == "Sequential" else keras.Model).from_config(
            config["config"]
        )
        model.load_weights(weights)
        return model, relaid

    loaded = _load_copy(keras, static, built)
    if loaded is None:
        return None
    model, relaid = loaded
    ours, theirs = keras.__version__, static.keras_version
    done = [
        f"Keras {ours} cannot read the config of this .keras archive that Keras {theirs} wrote (its classes' "
        f"modules are tf.keras's); bncheck built the model from it as Keras {ours} builds a Keras 2 .h5 file's "
        "and loaded the archive's weights into it"
    ]
    if relaid:
        done.append(
            f"its weights are laid out as Keras {theirs} wrote them, each layer holding variables counted twice; "
            f"bncheck loaded them by their order within each class, as Keras {ours} names them"
        )
    return model, "; ".join(done + _mend_notes(found, ours, theirs)) + ", the file unchanged"


@dataclass(frozen=True)
class _Mend:
    """One config key Keras 3 misreads: where it is (layer name, the dict to edit), the edit, the note."""

    find: Callable[[Any], list[tuple[str, Any]]]
    apply: Callable[[Any], object]  # edits the site (a dict, or what holds one) in place; returns nothing used
    note: str  # formatted with ours, theirs (the Keras versions), count and first (a layer's name)


def _declared_shape(static: KerasFile) -> list[Any] | None:
    """The ``batch_input_shape`` of a Sequential file's first layer where no InputLayer precedes it."""
    from bncheck.backends.keras.weights import layer_entries

    if static.config.get("class_name") != "Sequential":
        return None
    entries = layer_entries(static.config)
    first = entries[0] if entries else {}
    declared = (first.get("config") or {}).get("batch_input_shape")
    if first.get("class_name") == "InputLayer" or not isinstance(declared, list) or not declared:
        return None
    return declared


def _insert_input_layer(config: dict, declared: list[Any], name: str) -> None:
    body = config["config"]
    layers = body["layers"] if isinstance(body, dict) else body
    first = layers[0].setdefault("config", {})
    first.pop("batch_input_shape", None)
    entry = {"batch_input_shape": declared, "dtype": first.get("dtype", "float32"), "sparse": False, "name": name}
    layers.insert(0, {"class_name": "InputLayer", "config": entry})


def _class_configs(node: Any):
    """(class name, config) of every object in a model config, nested models' and wrapped layers' included."""
    if isinstance(node, dict):
        if isinstance(node.get("class_name"), str) and isinstance(node.get("config"), dict):
            yield node["class_name"], node["config"]
        for value in node.values():
            yield from _class_configs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _class_configs(value)


def _layer_configs(node: Any):
    """Every layer entry's config in a model config, nested models' and wrapped layers' included."""
    return (config for _, config in _class_configs(node))


def _named(config: dict) -> str:
    return str(config.get("name", "?"))


def _time_major_layers(config: dict) -> list[tuple[str, dict]]:
    """The layers whose config says ``time_major: false``; none if any says true (a layout Keras 3 cannot run,
    whose refusal stands)."""
    found = [c for c in _layer_configs(config) if "time_major" in c]
    if any(c["time_major"] is not False for c in found):
        return []
    return [(_named(c), c) for c in found]


def _typed_initializers(config: dict) -> list[tuple[str, dict]]:
    """The configs of initializers (a layer config's ``*_initializer`` entries) that carry a ``dtype``."""
    found = []
    for layer in _layer_configs(config):
        for key, value in layer.items():
            inner = value.get("config") if key.endswith("_initializer") and isinstance(value, dict) else None
            if isinstance(inner, dict) and "dtype" in inner:
                found.append((_named(layer), inner))
    return found


def semantic_notes(keras: Any, static: KerasFile) -> list[str]:
    """Notes on what Keras 3 computes differently from the Keras 1/2 that wrote ``static`` (module docstring)."""
    if not static.keras2:
        return []
    hard = [
        str(layer.get("name", "?"))
        for layer in _layer_configs(static.config)
        if "hard_sigmoid" in (layer.get("activation"), layer.get("recurrent_activation"))
    ]
    if not hard:
        return []
    return [
        f"{len(hard)} layer(s) (first: {hard[0]!r}) use hard_sigmoid, which Keras {static.keras_version} computed as "
        f"clip(0.2 x + 0.5, 0, 1) and Keras {keras.__version__} computes as clip(x / 6 + 0.5, 0, 1): the probe runs "
        "Keras 3's model, so the statistics after them are not quite the file's own Keras's (nor the outputs of "
        "a model `fix` writes)"
    ]


#: the keys under which a wrapper's config holds the layers it wraps
_WRAPPED_KEYS = ("layer", "forward_layer", "backward_layer")


def _unplaced_wrapped(config: dict) -> list[tuple[str, dict]]:
    """(wrapper name, wrapped layer entry) of every wrapped layer, not a model, whose entry names no module."""
    from bncheck.backends.keras.config import MODEL_CLASSES

    found = []
    for layer in _layer_configs(config):
        for key in _WRAPPED_KEYS:
            inner = layer.get(key)
            if (
                isinstance(inner, dict)
                and isinstance(inner.get("class_name"), str)
                and "module" not in inner
                and inner["class_name"] not in MODEL_CLASSES
            ):
                found.append((str(layer.get("name", "?")), inner))
    return found


def _listed_single_outputs(config: Any) -> list[tuple[str, dict]]:
    """The configs of the models in a Sequential's layers whose one output is written as a list of one."""
    from bncheck.backends.keras.config import MODEL_CLASSES

    found = []
    for cls, body in _class_configs(config):
        layers = body.get("layers") if cls == "Sequential" else None
        for entry in layers if isinstance(layers, list) else ():
            inner = entry.get("config") if isinstance(entry, dict) else None
            if not isinstance(inner, dict) or entry.get("class_name") not in MODEL_CLASSES:
                continue
            outputs = inner.get("output_layers")
            if isinstance(outputs, list) and len(outputs) == 1 and isinstance(outputs[0], list):
                found.append((_named(inner), inner))
    return found


def _nested_model_refs(config: Any) -> list[tuple[str, list[list]]]:
    """(nested model name, the references to its outputs) in every model of the config that counts the nested
    model's calls from 1, as Keras 2 did (its node 0 linked the nested model's own input to its output)."""
    from bncheck.backends.keras.config import MODEL_CLASSES

    found: list[tuple[str, list[list]]] = []
    for _, body in _class_configs(config):
        entries = body.get("layers")
        if not isinstance(entries, list):
            continue
        entries = [e for e in entries if isinstance(e, dict)]
        for nested in entries:
            name, calls = nested.get("name"), len(_legacy_calls(nested))
            if nested.get("class_name") not in MODEL_CLASSES or not calls:
                continue
            refs = [ref for entry in entries for call in _legacy_calls(entry) for ref in _call_refs(call, name)]
            if nested.get("class_name") == "Sequential":  # at the outputs Keras 3 counts a Functional's from 1 itself
                refs += [ref for ref in _output_refs(body) if ref[0] == name]
            if refs and all(isinstance(ref[1], int) and 1 <= ref[1] <= calls for ref in refs):
                found.append((str(name), refs))
    return found


#: What '/' in a layer's name becomes in the copy: Keras 3 refuses it in a name (tf.keras applications'
#: DenseNet ``conv1/bn``, MobileNetV3's ``Conv/BatchNorm``); a division slash looks the same and maps back exactly.
NAME_SLASH = "\u2215"


def _slashed_names(config: Any) -> list[tuple[str, tuple[dict, dict]]]:
    """(name, (its entry, its model's config)) of every layer whose name holds '/'."""
    found = []
    for _, body in _class_configs(config):
        entries = body.get("layers")
        for entry in entries if isinstance(entries, list) else ():
            if isinstance(entry, dict) and isinstance(entry.get("name"), str) and "/" in entry["name"]:
                found.append((entry["name"], (entry, body)))
    return found


def _without_slash(site: tuple[dict, dict]) -> None:
    """The layer renamed with NAME_SLASH for '/', and every reference to it in its model."""
    entry, body = site
    old = entry["name"]
    new = old.replace("/", NAME_SLASH)
    entry["name"] = new
    if isinstance(entry.get("config"), dict) and entry["config"].get("name") == old:
        entry["config"]["name"] = new
    stack: list[Any] = [e.get("inbound_nodes") for e in body["layers"] if isinstance(e, dict)]
    stack += [body.get("input_layers"), body.get("output_layers")]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            if len(node) >= 3 and node[0] == old and isinstance(node[1], int) and isinstance(node[2], int):
                node[0] = new  # [layer, node, tensor]: a call's input, a keras_history, a model's input or output
            stack.extend(node)


def _call_refs(call: list, name: Any) -> list[list]:
    """The references to ``name``'s outputs in a Keras 2 call: its inputs and its keyword arguments' tensors."""
    found = []
    for item in call:
        if _tensor_ref(item[:3], {name}):
            found.append(item)
        kwargs = item[3] if len(item) > 3 and isinstance(item[3], dict) else {}
        found += [value for value in kwargs.values() if _tensor_ref(value, {name})]
    return found


def _output_refs(body: dict) -> list[list]:
    outputs = body.get("output_layers")
    if not isinstance(outputs, list) or not outputs:
        return []
    return [outputs] if not isinstance(outputs[0], list) else [o for o in outputs if isinstance(o, list)]


def _classes(config: Any, wanted: Callable[[str, dict], bool]) -> list[tuple[str, dict]]:
    """The configs of the layers (wrapped ones too) of the classes ``wanted`` takes."""
    return [(_named(c), c) for cls, c in _class_configs(config) if wanted(cls, c)]


def _tensor_kwargs(config: Any) -> list[tuple[str, tuple[dict, set[str]]]]:
    """(layer name, (its entry, its model's layer names)) of every functional layer called with a tensor among
    its keyword arguments, written as Keras 2 wrote one: ``[layer, node index, tensor index]``."""
    found: list[tuple[str, tuple[dict, set[str]]]] = []
    stack: list[Any] = [config]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        inner = node.get("config")
        entries = inner.get("layers") if isinstance(inner, dict) else None
        if isinstance(entries, list):
            names = {str(e.get("name")) for e in entries if isinstance(e, dict)}
            for entry in entries:
                if isinstance(entry, dict) and any(_refs(call, names) for call in _legacy_calls(entry)):
                    found.append((str(entry.get("name", "?")), (entry, names)))
            stack.extend(entries)
    return found


def _legacy_calls(entry: dict) -> list[list]:
    """A layer entry's inbound nodes in Keras 2's form: one list of [layer, node, tensor(, kwargs)] each."""
    nodes = entry.get("inbound_nodes")
    return [n for n in nodes if isinstance(n, list) and n and all(isinstance(i, list) for i in n)] if nodes else []


def _tensor_ref(value: Any, names: set[str]) -> bool:
    return (
        isinstance(value, list) and len(value) == 3 and value[0] in names and all(isinstance(i, int) for i in value[1:])
    )


def _refs(call: list, names: set[str]) -> bool:
    kwargs = call[0][3] if len(call[0]) > 3 and isinstance(call[0][3], dict) else {}
    return any(_tensor_ref(v, names) for v in kwargs.values())


def _keras_tensor(history: list) -> dict:
    # a placeholder Keras 3 replaces by the tensor its history names (functional.deserialize_node)
    return {"class_name": "__keras_tensor__", "config": {"shape": [], "dtype": "float32", "keras_history": history}}


def _as_keras3_calls(site: tuple[dict, set[str]]) -> None:
    """Keras 3 passes a Keras 2 call's keyword arguments on as written, a tensor's reference as a list: its
    calls with one are rewritten in Keras 3's form, where such a reference is a tensor."""
    entry, names = site
    calls = []
    for call in entry["inbound_nodes"]:
        if isinstance(call, list) and call and all(isinstance(i, list) for i in call) and _refs(call, names):
            tensors = [_keras_tensor(list(i[:3])) for i in call]
            kwargs = {k: _keras_tensor(v) if _tensor_ref(v, names) else v for k, v in call[0][3].items()}
            call = {"args": [tensors[0] if len(tensors) == 1 else tensors], "kwargs": kwargs}
        calls.append(call)
    entry["inbound_nodes"] = calls


#: what tf.keras wrote into a SeparableConv's config from the Conv it derives from, and Keras 3 refuses
SEPARABLE_KEYS = frozenset({"groups", "kernel_initializer", "kernel_regularizer", "kernel_constraint"})


#: the mends, in the order their notes are said
_MENDS = (
    _Mend(
        _time_major_layers,
        lambda c: c.pop("time_major"),
        "Keras {ours} refuses the time_major=False that Keras {theirs} wrote in {count} recurrent layer(s) "
        "(first: {first!r}); bncheck loaded it without that key, batch-first as Keras 3 always runs",
    ),
    _Mend(
        _typed_initializers,
        lambda c: c.pop("dtype"),
        "Keras {ours} refuses the dtype that Keras {theirs} wrote into {count} initializer config(s); bncheck "
        "loaded it without them (an initializer only sets weights the file's replace)",
    ),
    _Mend(
        lambda config: _classes(config, lambda cls, c: cls == "GRU" and "reset_after" not in c),
        lambda c: c.update(reset_after=False),
        "{count} GRU layer(s) of this Keras {theirs} file say nothing of reset_after, which Keras {ours} takes as "
        "true; bncheck loaded them with reset_after=False, the only GRU of the Keras that wrote them",
    ),
    _Mend(
        lambda config: _classes(
            config, lambda cls, c: cls.startswith("SpatialDropout") and ("trainable" in c or "noise_shape" in c)
        ),
        lambda c: [c.pop(key, None) for key in ("trainable", "noise_shape")],
        "Keras {ours} refuses the trainable and noise_shape this Keras {theirs} file wrote into {count} "
        "SpatialDropout layer(s); bncheck loaded it without them (dropout does nothing at inference)",
    ),
    _Mend(
        lambda config: _classes(
            config,
            lambda cls, c: (
                ((cls.startswith("Conv") and cls.endswith("Transpose")) or cls.startswith("DepthwiseConv"))
                and c.get("groups") == 1
            ),
        ),
        lambda c: c.pop("groups"),
        "Keras {ours} refuses the groups=1 this Keras {theirs} file wrote into {count} transposed or depthwise "
        "convolution(s) (tf.keras MobileNetV2, EfficientNet); bncheck loaded it without that key (1 is the only "
        "value they compute)",
    ),
    _Mend(
        lambda config: _classes(
            config,
            lambda cls, c: (
                cls.startswith("SeparableConv") and c.get("groups", 1) == 1 and bool(SEPARABLE_KEYS & set(c))
            ),
        ),
        lambda c: [c.pop(key, None) for key in SEPARABLE_KEYS],
        "Keras {ours} refuses the groups=1 and kernel_initializer, kernel_regularizer and kernel_constraint that this "
        "Keras {theirs} file wrote into {count} separable convolution(s) (tf.keras Xception), which have no kernel "
        "of that name (their depthwise and pointwise kernels are their own keys); bncheck loaded it without them",
    ),
    _Mend(
        _nested_model_refs,
        lambda refs: [ref.__setitem__(1, ref[1] - 1) for ref in refs],
        "Keras {ours} counts the calls of a nested model from 0, this Keras {theirs} file from 1 (its node 0 "
        "linked the nested model's own input to its output), in {count} nested model(s) (first: {first!r}); "
        "bncheck loaded it with those calls counted from 0",
    ),
    _Mend(
        _tensor_kwargs,
        _as_keras3_calls,
        "Keras {ours} passes on as written the tensors that this Keras {theirs} file names among the keyword "
        "arguments of {count} layer call(s) (first: {first!r}, a mask, say); bncheck loaded it with them "
        "written as Keras {ours} writes a tensor",
    ),
    _Mend(
        _listed_single_outputs,
        lambda c: c.update(output_layers=c["output_layers"][0]),
        "Keras {ours} takes the single output that this Keras {theirs} file writes as a list of one, in {count} "
        "model(s) nested in a Sequential (first: {first!r}), for a list the Sequential passes on as two tensors; "
        "bncheck loaded it with that output written as Keras {ours} writes one",
    ),
    _Mend(
        _slashed_names,
        _without_slash,
        "Keras {ours} refuses a '/' in a layer's name, which this Keras {theirs} file holds in {count} name(s) "
        "(first: {first!r}; tf.keras applications' DenseNet and MobileNetV3); bncheck loaded it with a division "
        "slash (\u2215) there, which its findings write as '/' again",
    ),
    _Mend(
        _unplaced_wrapped,
        lambda inner: inner.update(module="keras.layers"),
        "Keras {ours} cannot find the classes of the {count} layer(s) wrapped by TimeDistributed or Bidirectional "
        "in this Keras {theirs} file (first: {first!r}), whose configs name no module; bncheck loaded it with "
        "keras.layers named",
    ),
)


def foreign_classes(keras: Any, static: KerasFile) -> list[str]:
    """The layer classes of a Keras 1/2 file that Keras does not have (its configs name no module, so the
    static reader cannot tell a custom class from Keras's own): custom code the file does not carry, which
    the load would trip over after whatever else it reads first."""
    if not static.keras2:
        return []
    from bncheck.backends.keras.config import MODEL_CLASSES

    known = set(dir(keras.layers)) | set(MODEL_CLASSES)
    found: dict[str, None] = {}
    stack: list[Any] = [static.config]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            config = node.get("config")
            if isinstance(config, dict):
                for entry in config.get("layers") or []:
                    stack.append(entry)
                wrapped = [config.get(key) for key in _WRAPPED_KEYS]
                stack.extend(w for w in wrapped if isinstance(w, dict))
                cls = node.get("class_name")
                if isinstance(cls, str) and cls not in known and "layers" not in config:
                    found[cls] = None
    return list(found)
