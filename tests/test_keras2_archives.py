""".keras archives that tf.keras 2.13-2.15 and tf_keras wrote, which Keras 3 refuses: their classes' modules are
tf.keras's (``keras.src.engine.functional``), their calls in Keras 2's form. Real Keras (numpy backend): a Keras 3 model
saved as .keras, its config.json rewritten as tf.keras 2.15 wrote one (module names, Keras 2's calls with a
nested model's counted from 1, an InputLayer's ``batch_input_shape``, a BatchNormalization's axis as a list,
dtypes by name) and its metadata naming 2.15.0; the weights are left as Keras 3 wrote them, in the layout
tf.keras 2.15 wrote too (``layers/<class>/vars/<i>``, nested models' under ``layers/functional/layers``).
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

os.environ.setdefault("KERAS_BACKEND", "numpy")
keras = pytest.importorskip("keras")

from bncheck.backends.keras.archive import read
from bncheck.backends.keras.legacy import load_patched
from bncheck.cli import main
from tests.keras_files import (
    archive_members,
    as_tf_keras_213_weights,
    as_windows_paths,
    keras2_calls,
    keras2_transfer,
    probed_findings,
    write_archive,
)

TF_KERAS_MODULE = "keras.src.engine.functional"


def _as_tf_keras(node: Any, rank: int) -> None:
    """A Keras 3 config edited in place into tf.keras 2.15's form (see the module docstring)."""
    if isinstance(node, list):
        for value in node:
            _as_tf_keras(value, rank)
        return
    if not isinstance(node, dict):
        return
    if node.get("module") == "keras.src.models.functional":
        node["module"] = TF_KERAS_MODULE
    config = node.get("config")
    if isinstance(config, dict):
        if isinstance(config.get("dtype"), dict):
            config["dtype"] = config["dtype"]["config"]["name"]
        if node.get("class_name") == "InputLayer":
            config["batch_input_shape"] = config.pop("batch_shape")
            config.pop("optional", None)
        if node.get("class_name") == "BatchNormalization":
            config["axis"] = [rank - 1]
    if isinstance(node.get("inbound_nodes"), list) and node["inbound_nodes"]:
        keras2_calls(node, {"base"})
    for value in node.values():
        _as_tf_keras(value, rank)


def _tf_keras_archive(path: Path, model: keras.Model) -> str:
    model.save(path)
    members = archive_members(path)
    config = json.loads(members["config.json"])
    _as_tf_keras(config, rank=4)
    members["config.json"] = json.dumps(config).encode()
    members["metadata.json"] = json.dumps({"keras_version": "2.15.0", "date_saved": "2023-12-01@10:00:00"}).encode()
    write_archive(path, members)
    return str(path)


@pytest.mark.parametrize("calls", [1, 2])
def test_probe_loads_a_tf_keras_2_archive_and_computes_what_it_computed(tmp_path: Path, calls: int) -> None:
    model, feeds, expected = keras2_transfer(calls)
    path = _tf_keras_archive(tmp_path / "m.keras", model)
    with pytest.raises(Exception, match=f"parent module {TF_KERAS_MODULE} cannot be imported"):
        keras.saving.load_model(path, compile=False)
    patched = load_patched(keras, read(path))
    assert patched is not None
    loaded, note = patched
    np.testing.assert_allclose(np.asarray(loaded(feeds, training=False)), expected, rtol=1e-6, atol=1e-6)
    assert "cannot read the config of this .keras archive that Keras 2.15.0 wrote" in note, note
    assert "counts the calls of a nested model from 0" in note, note
    assert probed_findings(path) == [("BN003", "base/bn")]  # exit 2 before: Keras refused the file


def _three_blocks() -> tuple[keras.Model, np.ndarray, np.ndarray]:
    """A functional base of three Conv2D -> BatchNormalization -> ReLU blocks nested in a model with a head,
    every BN's moving statistics those of one batch (momentum 0), so that each BN's differ from the others'."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 6, 2), name="image")
    x = inputs
    for i in range(3):
        x = keras.layers.Conv2D(4, 3, padding="same", name=f"conv{i}")(x)
        x = keras.layers.BatchNormalization(momentum=0.0, name=f"bn{i}")(x)
        x = keras.layers.ReLU(name=f"relu{i}")(x)
    base = keras.Model(inputs, x, name="base")
    image = keras.Input((6, 6, 2), name="image0")
    model = keras.Model(image, keras.layers.Dense(3, name="scores")(keras.layers.GlobalAveragePooling2D()(base(image))))
    x = np.random.default_rng(1).standard_normal((32, 6, 6, 2)).astype(np.float32)
    model(x, training=True)  # momentum 0: the moving statistics become this batch's
    return model, x, np.asarray(model(x, training=False))


def test_a_tf_keras_2_13_archive_is_read_and_probed_with_its_layers_weights(tmp_path: Path) -> None:
    """tf.keras 2.13 and 2.14 wrote model.weights.h5 with each model's layers under
    ``_layer_checkpoint_dependencies`` and counted a layer holding variables twice (conv2d, conv2d_2, conv2d_4):
    `inspect` found no BN's variables (parameters unknown, nothing checked) and Keras 3 loads only the layers
    whose names it gives the same."""
    model, x, expected = _three_blocks()
    path = _tf_keras_archive(tmp_path / "m.keras", model)
    _with_weights(path, as_tf_keras_213_weights, tmp_path)

    static = read(path)
    stored = {layer.name: (layer.mean, layer.var) for layer in static.layers}
    for i in range(3):
        bn = model.get_layer("base").get_layer(f"bn{i}")
        mean, var = stored[f"base/bn{i}"]
        np.testing.assert_array_equal(mean, np.asarray(bn.moving_mean))
        np.testing.assert_array_equal(var, np.asarray(bn.moving_variance))
    patched = load_patched(keras, static)
    assert patched is not None
    loaded, note = patched
    np.testing.assert_allclose(np.asarray(loaded(x, training=False)), expected, rtol=1e-6, atol=1e-6)
    assert "each layer holding variables counted twice" in note, note
    result = CliRunner().invoke(main, ["probe", path, "--format", "json"])
    assert result.exit_code == 0, result.output
    assert [layer["name"] for layer in json.loads(result.stdout)["layers"]] == ["base/bn0", "base/bn1", "base/bn2"]


def _with_weights(path: str, edit: Callable[[Path], None], folder: Path) -> None:
    """The archive at ``path`` with its model.weights.h5 edited in place by ``edit``."""
    members = archive_members(path)
    weights = folder / "w.h5"
    weights.write_bytes(members["model.weights.h5"])
    edit(weights)
    members["model.weights.h5"] = weights.read_bytes()
    write_archive(path, members)


def test_a_tf_keras_2_archive_written_on_windows_is_read_and_probed(tmp_path: Path) -> None:
    """tf.keras 2.13-2.15 on Windows joined each layer's path with backslashes into one group name at the root
    of model.weights.h5 (keras-team/keras#18528; 10 of 16 such files in a sweep of public repositories):
    `inspect` found no BN's variables, and the probe, like TensorFlow itself on Linux, refused the file."""
    model, feeds, expected = keras2_transfer()
    path = _tf_keras_archive(tmp_path / "m.keras", model)
    _with_weights(path, as_windows_paths, tmp_path)
    with zipfile.ZipFile(path) as archive, h5py.File(io.BytesIO(archive.read("model.weights.h5"))) as h5:
        assert "layers\\functional\\layers\\batch_normalization" in h5  # as Windows wrote it
    patched = load_patched(keras, read(path))
    assert patched is not None
    np.testing.assert_allclose(np.asarray(patched[0](feeds, training=False)), expected, rtol=1e-6, atol=1e-6)
    for command in ("inspect", "probe"):
        result = CliRunner().invoke(main, [command, path, "--format", "json"])
        assert result.exit_code == 1, result.output  # inspect: the BN's parameters unknown before; probe: exit 2
        document = json.loads(result.stdout)
        assert [(f["code"], f["layer"]) for f in document["findings"]] == [("BN003", "base/bn")]
        assert any("written on Windows" in note["message"] for note in document["notes"])


@pytest.mark.parametrize("layout", [as_tf_keras_213_weights, as_windows_paths])
def test_a_tf_keras_2_weights_only_file_is_read_in_the_layouts_it_was_written_in(
    tmp_path: Path, layout: Callable[[Path], None]
) -> None:
    """``save_weights`` of tf.keras 2.13-2.14 wrote the archives' weights layout, and on Windows the backslashed
    one: `inspect` refused both ("no model_config ... a weights-only file?"). Their BNs are now found and named as
    Keras 3 names them (by their order within their class), their statistics the model's."""
    model, _, _ = _three_blocks()
    path = tmp_path / "m.weights.h5"
    model.save_weights(path)
    layout(path)
    static = read(str(path))
    assert [layer.name for layer in static.layers] == [
        "functional/batch_normalization",
        "functional/batch_normalization_1",
        "functional/batch_normalization_2",
    ]
    for i, layer in enumerate(static.layers):
        np.testing.assert_array_equal(layer.mean, np.asarray(model.get_layer("base").get_layer(f"bn{i}").moving_mean))
    result = CliRunner().invoke(main, ["inspect", str(path), "--format", "json"])
    assert result.exit_code == 0, result.output


def test_a_tf_keras_2_archive_whose_weights_do_not_fit_its_config_is_refused_with_keras_reason(
    tmp_path: Path,
) -> None:
    """A layer's variables missing from model.weights.h5: the probe refuses the file in one line, with Keras's
    reason, instead of running a layer whose weights were never loaded."""
    model, _, _ = keras2_transfer()
    path = _tf_keras_archive(tmp_path / "m.keras", model)

    def without_the_heads_bias(weights: Path) -> None:
        with h5py.File(weights, "r+") as h5:
            del h5["layers/dense/vars/1"]

    _with_weights(path, without_the_heads_bias, tmp_path)
    result = CliRunner().invoke(main, ["probe", path])
    assert result.exit_code == 2, result.output
    assert "could not load the model saved by Keras 2.15.0" in result.stderr
    assert "could not be loaded" in result.stderr and "Traceback" not in result.stderr
