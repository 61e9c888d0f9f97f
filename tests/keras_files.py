"""Keras files edited after saving, shared by the Keras tests (needs keras; KERAS_BACKEND set by the caller)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from click.testing import CliRunner

from bncheck.cli import main


def bn_model_with_config_field(tmp_path: Path, field: str, value: str) -> str:
    """A saved Sequential([Input, BatchNormalization]) whose BN config entry ``field`` is rewritten to
    ``value`` (e.g. a module or registered_name from outside Keras)."""
    import keras

    model = keras.Sequential([keras.Input((3,)), keras.layers.BatchNormalization(name="bn")])
    path = tmp_path / "foreign.keras"
    model.save(path)
    members = archive_members(path)
    config = json.loads(members["config.json"])
    config["config"]["layers"][1][field] = value
    members["config.json"] = json.dumps(config).encode()
    write_archive(path, members)
    return str(path)


def archive_members(path: Path | str) -> dict[str, bytes]:
    """Every member of a .keras archive by name."""
    with zipfile.ZipFile(path) as zf:
        return {n: zf.read(n) for n in zf.namelist()}


def write_archive(path: Path | str, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def keras2_calls(entry: dict, counted_from_1: set[str]) -> None:
    """A Keras 3 layer entry's calls rewritten as Keras 2 wrote them, ``[[layer, node, tensor, kwargs], ...]``,
    the calls of the nested models ``counted_from_1`` counted from 1 as Keras 2 counted them."""
    calls = []
    for call in entry["inbound_nodes"]:
        args = call["args"][0]
        tensors = args if isinstance(args, list) else [args]
        histories = [t["config"]["keras_history"] for t in tensors]
        calls.append([[name, node + (name in counted_from_1), index, {}] for name, node, index in histories])
    entry["inbound_nodes"] = calls


def keras2_transfer(calls: int = 1) -> tuple[Any, list[np.ndarray], np.ndarray]:
    """A functional base (Conv2D -> BatchNormalization, never updated -> ReLU) nested in a model that calls it
    on its input and pools and scores what it returns, as transfer learning builds one (``calls=2``: on two
    inputs, a siamese model); with inputs and Keras 3's outputs for them."""
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 6, 2), name="image")
    x = keras.layers.BatchNormalization(name="bn")(keras.layers.Conv2D(4, 3, name="conv")(inputs))
    base = keras.Model(inputs, keras.layers.ReLU(name="relu")(x), name="base")
    images = [keras.Input((6, 6, 2), name=f"image{i}") for i in range(calls)]
    pooled = [keras.layers.GlobalAveragePooling2D(name=f"pool{i}")(base(image)) for i, image in enumerate(images)]
    joined = pooled[0] if calls == 1 else keras.layers.Concatenate(name="join")(pooled)
    model = keras.Model(images, keras.layers.Dense(3, name="scores")(joined), name="transfer")
    rng = np.random.default_rng(1)
    feeds = [rng.standard_normal((8, 6, 6, 2)).astype(np.float32) for _ in range(calls)]
    return model, feeds, np.asarray(model(feeds, training=False))


def as_tf_keras_213_weights(path: Path | str) -> None:
    """A model.weights.h5 Keras 3 wrote, rewritten in place into tf.keras 2.13's layout: each model's layers under
    ``_layer_checkpoint_dependencies``, a layer holding variables counted twice (conv2d, conv2d_2; re_lu, re_lu_1),
    its vars naming no layer (tf.keras 2 wrote no ``name`` attribute there)."""
    import h5py

    _without_vars_names(path)
    with h5py.File(path, "r+") as h5:
        models = [h5]
        while models:
            model = models.pop()
            if "layers" not in model:
                continue
            model.create_group("_layer_checkpoint_dependencies")
            used: dict[str, int] = {}
            for snake, _, name in sorted(_counted(name) for name in model["layers"]):
                count = used.get(snake, 0)
                used[snake] = count + (2 if len(model["layers"][name].get("vars", {})) else 1)
                model.move(
                    f"layers/{name}",
                    f"_layer_checkpoint_dependencies/{snake}_{count}"
                    if count
                    else f"_layer_checkpoint_dependencies/{snake}",
                )
            del model["layers"]
            models += [model["_layer_checkpoint_dependencies"][n] for n in model["_layer_checkpoint_dependencies"]]


def _counted(name: str) -> tuple[str, int, str]:
    """(class snake, counter, name) of a group Keras named by its class counter: conv2d_2 -> conv2d, 2."""
    import re

    found = re.fullmatch(r"(.+?)(?:_(\d+))?", name)
    assert found is not None
    return found.group(1), int(found.group(2) or 0), name


def as_windows_paths(path: Path | str) -> None:
    """A model.weights.h5 Keras 3 wrote, rewritten in place as tf.keras 2.13-2.15 wrote one on Windows: each group
    holding ``vars`` moved to the root under its path joined with backslashes (``layers\\functional\\layers\\conv2d``),
    its vars naming no layer."""
    import h5py

    _without_vars_names(path)
    with h5py.File(path, "r+") as h5:
        holders: list[str] = []
        h5.visititems(lambda name, item: holders.append(name) if hasattr(item, "keys") and "vars" in item else None)
        for name in sorted(holders, key=lambda name: -name.count("/")):  # the deepest first: their parents stay
            h5.move(name, name.replace("/", "\\"))
        for name in [n for n in h5 if "\\" not in n and n not in ("vars", "optimizer", "metrics")]:
            del h5[name]  # the emptied containers (layers/...)


def probed_findings(path: str, exit_code: int = 1) -> list[tuple[str, str]]:
    """(code, layer) of each finding of ``bncheck probe PATH --format json``, asserting its exit code."""
    result = CliRunner().invoke(main, ["probe", path, "--format", "json"])
    assert result.exit_code == exit_code, result.output
    return [(f["code"], f["layer"]) for f in json.loads(result.stdout)["findings"]]


def _without_vars_names(path: Path | str) -> None:
    """Every ``vars`` group of a weights file without the layer's ``name``, which Keras 3 writes and tf.keras 2 did not."""
    import h5py

    with h5py.File(path, "r+") as h5:
        named: list[str] = []
        h5.visititems(lambda name, item: named.append(name) if name.endswith("vars") and "name" in item.attrs else None)
        for name in named:
            del h5[name].attrs["name"]
