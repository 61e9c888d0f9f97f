"""The static Keras reader: every layout Keras 3.15 writes, tf_keras's legacy layout, hostile files.

Models are built here with the installed Keras (numpy backend: the fastest to import, and nothing here
trains), saved to tmp_path, and read back by bncheck without Keras; parameters are compared with what Keras
itself holds. The tf_keras (Keras 2) .h5 layout cannot be written here (it needs TensorFlow): that file is
assembled with h5py following the layout tf_keras writes (root ``model_config``, ``model_weights/<layer>/
<layer>/<var>:0``, old-style inbound nodes ``[[["d1", 0, 0, {"training": true}]]]``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import h5py
import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "numpy")
keras = pytest.importorskip("keras")
from keras import layers

import bncheck
from bncheck.backends.base import BackendError
from bncheck.backends.keras import KerasBackend
from bncheck.backends.keras.archive import MAX_RATIO, read
from bncheck.model import Kind
from tests.keras_files import bn_model_with_config_field

C = keras.initializers.Constant


def _randomize(model: keras.Model, seed: int = 0) -> None:
    """Distinct values in every variable, so a mix-up of gamma/beta/mean/var shows."""
    rng = np.random.default_rng(seed)
    for var in model.weights:
        value = rng.uniform(0.5, 1.5, tuple(var.shape)).astype("float32")
        var.assign(value)


def _keras_layer(model: keras.Model, path: str):
    layer = model
    for part in path.split("/"):
        layer = layer.get_layer(part)
    return layer


def _assert_params_match(model: keras.Model, view) -> None:
    for norm in view.layers:
        layer = _keras_layer(model, norm.name)
        expected = {v.path.split("/")[-1]: np.asarray(v.numpy()) for v in layer.weights}
        got = {"gamma": norm.scale, "beta": norm.bias, "moving_mean": norm.mean, "moving_variance": norm.var}
        if norm.op_type == "RMSNormalization":
            got = {"scale": norm.scale}
        for key, value in got.items():
            if key in expected:
                np.testing.assert_array_equal(value, expected[key], err_msg=f"{norm.name}.{key}")
            else:
                assert value is None, f"{norm.name}.{key} should be absent"


def _all_kinds_model() -> keras.Model:
    inp = keras.Input((6,), name="x")
    x = layers.Dense(8, name="d")(inp)
    x = layers.BatchNormalization(name="bn_full")(x)
    x = layers.BatchNormalization(scale=False, name="bn_noscale")(x)
    x = layers.BatchNormalization(center=False, name="bn_nocenter")(x)
    x = layers.BatchNormalization(center=False, scale=False, name="bn_bare")(x)
    x = layers.LayerNormalization(name="ln")(x)
    x = layers.LayerNormalization(rms_scaling=True, name="ln_rms")(x)
    x = layers.UnitNormalization(name="unit")(x)
    x = layers.Reshape((2, 4), name="reshape")(x)
    x = layers.GroupNormalization(groups=2, name="gn")(x)
    x = layers.RMSNormalization(name="rms")(x)
    model = keras.Model(inp, x, name="kinds")
    _randomize(model)
    return model


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_every_norm_kind_reads_the_parameters_keras_holds_including_scale_and_center_false(tmp_path, suffix):
    model = _all_kinds_model()
    path = str(tmp_path / f"kinds{suffix}")
    model.save(path)
    view = KerasBackend().load(path)
    assert [layer.name for layer in view.layers] == [
        "bn_full",
        "bn_noscale",
        "bn_nocenter",
        "bn_bare",
        "ln",
        "ln_rms",
        "unit",
        "gn",
        "rms",
    ]
    _assert_params_match(model, view)
    kinds = {layer.name: layer.kind for layer in view.layers}
    assert kinds["bn_full"] is Kind.BATCH and kinds["ln"] is Kind.LAYER and kinds["gn"] is Kind.GROUP
    assert kinds["ln_rms"] is Kind.RMS and kinds["rms"] is Kind.RMS and kinds["unit"] is Kind.UNIT
    assert view.info.format == suffix[1:] and view.info.framework_version == keras.__version__
    assert len(view.info.sha256) == 64


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_a_norm_without_beta_over_one_element_is_a_collapse_to_zero(tmp_path, suffix):
    """center=False only drops beta: x - mean(x) over one element is still 0, whatever x (Keras's own output)."""
    inp = keras.Input((6, 1), name="x")
    out = layers.LayerNormalization(axis=-1, center=False, name="ln1")(layers.Dense(1, name="proj")(inp))
    model = keras.Model(inp, layers.Flatten(name="flat")(out))
    x = np.random.default_rng(0).normal(size=(4, 6, 1)).astype("float32")
    assert np.all(np.asarray(model(x)) == 0)
    path = str(tmp_path / f"ln{suffix}")
    model.save(path)
    report = bncheck.inspect(path)
    assert [(f.code, f.severity.label, f.layer) for f in report.findings] == [("BN001", "error", "ln1")]


def _renorm_model(clipping: dict | None = None, baked: bool = False) -> keras.Model:
    """Dense -> BatchNormalization(renorm=True): three variables more (moving_stddev, renorm_mean,
    renorm_stddev) after the moving statistics; each variable distinct."""
    inp = keras.Input((6,), name="x")
    bn = layers.BatchNormalization(renorm=True, renorm_clipping=clipping, name="bn")
    out = bn(layers.Dense(4, name="d")(inp), training=True) if baked else bn(layers.Dense(4, name="d")(inp))
    model = keras.Model(inp, out)
    _randomize(model)
    return model


@pytest.mark.parametrize("suffix", [".keras", ".h5", ".weights.h5"])
def test_a_batch_renormalization_reads_its_own_statistics_not_the_renorm_ones(tmp_path, suffix):
    model = _renorm_model()
    path = str(tmp_path / f"renorm{suffix}")
    model.save_weights(path) if suffix == ".weights.h5" else model.save(path)
    (layer,) = KerasBackend().load(path).layers
    bn = model.get_layer("bn")
    assert layer.unreadable is None
    np.testing.assert_array_equal(layer.mean, np.asarray(bn.moving_mean))
    np.testing.assert_array_equal(layer.var, np.asarray(bn.moving_variance))
    np.testing.assert_array_equal(layer.scale, np.asarray(bn.gamma))


def test_a_training_call_of_a_batch_renormalization_without_clipping_does_not_depend_on_the_batch(tmp_path):
    """r and d bring the batch's moments back to the renorm statistics: Keras's own outputs of a sample alone
    and in a batch agree, and the baked flag is an info, not BN002 (nor BN001). With clipping they bind: errors."""
    x = np.random.default_rng(0).normal(size=(8, 6)).astype("float32")
    results = {}
    for clipping in (None, {"rmax": 1.5, "rmin": 0.7, "dmax": 0.2}):
        model = _renorm_model(clipping, baked=True)
        state = [v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables]
        together = np.asarray(model.stateless_call(*state, x)[0])
        alone = np.asarray(model.stateless_call(*state, x[:1])[0])
        path = str(tmp_path / f"renorm_{clipping is None}.keras")
        model.save(path)
        results[clipping is None] = (
            float(np.abs(together[:1] - alone).max()),
            [(f.code, f.severity.label) for f in bncheck.inspect(path).findings],
        )
    assert results[True][0] < 1e-5 and results[True][1] == [("BN002", "info")]
    # clipped, a sample alone is a set of one element: (x - mean) / std is 0, and the output the clipped d
    assert results[False][0] > 1e-3 and sorted(results[False][1]) == [("BN001", "error"), ("BN002", "error")]


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_a_model_without_norm_layers_says_so_instead_of_an_empty_report(tmp_path, suffix):
    inp = keras.Input((8,), name="x")
    model = keras.Model(inp, layers.Dense(2, name="head")(layers.Dense(4, activation="relu")(inp)))
    path = str(tmp_path / f"plain{suffix}")
    model.save(path)
    view = KerasBackend().load(path)
    assert view.layers == []
    assert any(n.level == "info" and "no normalization layer found" in n.message for n in view.notes)


def test_axes_are_in_the_input_rank_with_channels_last_or_first(tmp_path):
    inp = keras.Input((5, 5, 3), name="img")
    a = layers.BatchNormalization(name="last")(inp)
    b = layers.BatchNormalization(axis=1, name="first")(inp)
    g = layers.GroupNormalization(groups=3, name="gn")(inp)
    n = layers.LayerNormalization(axis=[1, 2], name="ln")(inp)
    model = keras.Model(inp, [a, b, g, n])
    path = str(tmp_path / "axes.keras")
    model.save(path)
    view = KerasBackend().load(path)
    last, first, gn, ln = (view.layer(n) for n in ("last", "first", "gn", "ln"))
    assert (last.axes, last.channel_axis, last.channels) == ((0, 1, 2), 3, 3)
    assert (first.axes, first.channel_axis, first.channels) == ((0, 2, 3), 1, 5)
    assert (gn.axes, gn.channel_axis, gn.groups) == ((1, 2, 3), 3, 3)
    assert ln.axes == (1, 2)
    assert last.input_shape == ("batch", 5, 5, 3)
    assert view.inputs[0].name == "img" and view.inputs[0].shape == ("batch", 5, 5, 3)


def _nested_model() -> keras.Model:
    f_in = keras.Input((4,))
    f = layers.BatchNormalization(name="bn")(layers.Dense(4, name="d")(f_in))
    inner = keras.Model(f_in, f, name="inner")
    seq = keras.Sequential(
        [keras.Input((4,)), layers.Dense(4, name="d"), layers.BatchNormalization(name="bn")], name="seq"
    )
    deep_in = keras.Input((4,))
    deep = keras.Model(deep_in, seq(inner(deep_in)), name="deep")
    inp = keras.Input((4,))
    x = layers.BatchNormalization(name="bn")(inp)
    model = keras.Model(inp, deep(x), name="outer")
    _randomize(model, seed=1)
    return model


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_nested_functional_and_sequential_layers_are_named_by_path_with_their_own_weights(tmp_path, suffix):
    model = _nested_model()
    path = str(tmp_path / f"nested{suffix}")
    model.save(path)
    view = KerasBackend().load(path)
    assert [layer.name for layer in view.layers] == ["bn", "deep/inner/bn", "deep/seq/bn"]
    _assert_params_match(model, view)  # three layers named "bn": each got its own variables


def test_keras_weights_group_is_a_class_counter_and_vars_carry_the_layer_name(tmp_path):
    """The layout the reader relies on, as Keras 3 writes it (guards against a Keras change)."""
    model = _nested_model()
    path = tmp_path / "nested.keras"
    model.save(path)
    with zipfile.ZipFile(path) as zf:
        assert set(zf.namelist()) == {"metadata.json", "config.json", "model.weights.h5"}
        (tmp_path / "w.h5").write_bytes(zf.read("model.weights.h5"))
    with h5py.File(tmp_path / "w.h5") as f:
        assert f["layers/batch_normalization/vars"].attrs["name"] == "bn"
        assert f["layers/functional/layers/functional/layers/batch_normalization/vars"].attrs["name"] == "bn"
        assert f["layers/functional/layers/sequential/layers/batch_normalization/vars"].attrs["name"] == "bn"
        assert sorted(f["layers/batch_normalization/vars"].keys()) == ["0", "1", "2", "3"]


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_baked_training_flag_is_read_in_both_formats_with_keras3_call_style_notes(tmp_path, suffix):
    inp = keras.Input((4,))
    x = layers.BatchNormalization(name="baked")(inp, training=True)
    y = layers.BatchNormalization(name="plain")(inp)
    model = keras.Model(inp, [x, y])
    path = str(tmp_path / f"baked{suffix}")
    model.save(path)
    view = KerasBackend().load(path)
    baked, plain = view.layer("baked"), view.layer("plain")
    assert baked.training and baked.batch_statistics and not baked.uses_running_stats
    assert any("model.predict(x)" in note and "override" in note for note in baked.notes)
    assert not plain.training and plain.uses_running_stats
    assert view.handle.baked


def test_baked_flag_on_a_non_trainable_layer_is_a_flag_without_batch_statistics(tmp_path):
    inp = keras.Input((4,))
    bn = layers.BatchNormalization(name="frozen")
    bn.trainable = False
    model = keras.Model(inp, bn(inp, training=True))
    path = str(tmp_path / "frozen.keras")
    model.save(path)
    layer = KerasBackend().load(path).layer("frozen")
    assert layer.training and not layer.batch_statistics and layer.uses_running_stats


def test_keras3_baked_flag_marks_downstream_batchnorm_as_batch_statistics(tmp_path):
    inp = keras.Input((4,))
    a = layers.BatchNormalization(name="a")(inp, training=True)
    b = layers.BatchNormalization(name="b")(layers.Dense(4, name="d")(a))
    model = keras.Model(inp, b)
    path = str(tmp_path / "leak.keras")
    model.save(path)
    b_layer = KerasBackend().load(path).layer("b")
    assert not b_layer.training and b_layer.batch_statistics
    assert any("runs after a's baked training=True" in note for note in b_layer.notes)
    # ... which is what Keras 3 does: at batch 1, b's output is its beta in model(x)
    x1 = np.random.default_rng(0).normal(size=(1, 4)).astype("float32")
    beta = model.get_layer("b").beta.numpy()
    np.testing.assert_allclose(np.asarray(model(x1))[0], beta, atol=1e-6)


def test_keras3_explicit_training_none_after_a_baked_flag_runs_in_inference(tmp_path):
    # a builder that passes training=None on: Keras 3 takes the explicit None over the context a baked True set,
    # so b normalizes with its moving statistics (bncheck called it a collapse and a train-mode error)
    keras.utils.set_random_seed(0)  # the Dense weights
    inp = keras.Input((4,))
    a = layers.BatchNormalization(name="a", beta_initializer=keras.initializers.Constant(0.5))(inp, training=True)
    b_norm = layers.BatchNormalization(name="b", beta_initializer=keras.initializers.Constant(0.25))
    model = keras.Model(inp, b_norm(layers.Dense(4, name="d")(a), training=None))
    path = str(tmp_path / "none.keras")
    model.save(path)
    b_layer = KerasBackend().load(path).layer("b")
    assert not b_layer.training and not b_layer.batch_statistics and b_layer.uses_running_stats
    # Keras itself: at batch 1, a's one-element sets give its beta, d a constant; b in training mode would give its
    # beta 0.25, and gives d's constant through its moving statistics instead
    x1 = np.random.default_rng(0).normal(size=(1, 4)).astype("float32")
    d = np.asarray(keras.Model(inp, model.get_layer("d").output)(x1))[0]
    out = np.asarray(model(x1))[0]
    np.testing.assert_allclose(out, d / np.sqrt(1 + b_norm.epsilon) + 0.25, rtol=1e-5)
    assert not np.allclose(out, 0.25, atol=1e-3)


def test_nested_model_called_with_training_true_bakes_its_layers(tmp_path):
    f_in = keras.Input((4,))
    inner = keras.Model(f_in, layers.BatchNormalization(name="bn")(f_in), name="inner")
    inp = keras.Input((4,))
    model = keras.Model(inp, inner(inp, training=True))
    path = str(tmp_path / "nested_baked.h5")
    model.save(path)
    layer = KerasBackend().load(path).layer("inner/bn")
    assert layer.training and layer.batch_statistics


def _tf_keras_h5(path, *, training: bool = True, second_bn: bool = False) -> dict:
    """A Functional model as tf_keras 2.15 writes it to .h5 (Dense -> BatchNormalization on 1-D features)."""
    rng = np.random.default_rng(3)
    kwargs = {"training": True} if training else {}
    config = {
        "class_name": "Functional",
        "config": {
            "name": "model",
            "trainable": True,
            "layers": [
                {
                    "class_name": "InputLayer",
                    "name": "input_1",
                    "inbound_nodes": [],
                    "config": {
                        "batch_input_shape": [None, 4],
                        "dtype": "float32",
                        "sparse": False,
                        "ragged": False,
                        "name": "input_1",
                    },
                },
                {
                    "class_name": "Dense",
                    "name": "d1",
                    "inbound_nodes": [[["input_1", 0, 0, {}]]],
                    "config": {
                        "name": "d1",
                        "trainable": True,
                        "dtype": "float32",
                        "units": 6,
                        "activation": "linear",
                        "use_bias": True,
                    },
                },
                {
                    "class_name": "BatchNormalization",
                    "name": "bn",
                    "inbound_nodes": [[["d1", 0, 0, kwargs]]],
                    "config": {
                        "name": "bn",
                        "trainable": True,
                        "dtype": "float32",
                        "axis": [1],
                        "momentum": 0.99,
                        "epsilon": 0.001,
                        "center": True,
                        "scale": True,
                    },
                },
            ],
            "input_layers": [["input_1", 0, 0]],
            "output_layers": [["bn", 0, 0]],
        },
    }
    if second_bn:  # a BatchNormalization after the baked one, without a flag of its own
        config["config"]["layers"].append(
            {
                "class_name": "BatchNormalization",
                "name": "bn_after",
                "inbound_nodes": [[["bn", 0, 0, {}]]],
                "config": {
                    "name": "bn_after",
                    "trainable": True,
                    "dtype": "float32",
                    "axis": [1],
                    "momentum": 0.99,
                    "epsilon": 0.001,
                    "center": True,
                    "scale": True,
                },
            }
        )
        config["config"]["output_layers"] = [["bn_after", 0, 0]]
    values = {
        "d1": {"kernel:0": rng.normal(size=(4, 6)), "bias:0": rng.normal(size=6)},
        "bn": {
            "gamma:0": rng.uniform(0.5, 1.5, 6),
            "beta:0": rng.normal(size=6),
            "moving_mean:0": rng.normal(size=6),
            "moving_variance:0": rng.uniform(0.5, 1.5, 6),
        },
    }
    if second_bn:
        values["bn_after"] = {k: v + 1.0 for k, v in values["bn"].items()}
    with h5py.File(path, "w") as f:
        f.attrs["keras_version"] = "2.15.0"
        f.attrs["backend"] = "tensorflow"
        f.attrs["model_config"] = json.dumps(config)
        weights = f.create_group("model_weights")
        weights.attrs["layer_names"] = np.array([b"input_1", *(name.encode() for name in values)])
        weights.attrs["keras_version"] = "2.15.0"
        weights.attrs["backend"] = "tensorflow"
        weights.create_group("input_1").attrs["weight_names"] = np.array([], dtype="S1")
        for layer, variables in values.items():
            group = weights.create_group(layer)
            group.attrs["weight_names"] = np.array([f"{layer}/{v}".encode() for v in variables])
            for var, value in variables.items():
                group.create_dataset(f"{layer}/{var}", data=value.astype("float32"))
    return values


def test_tf_keras_legacy_h5_layout_is_read_and_its_baked_flag_wins_in_every_call_style(tmp_path):
    path = str(tmp_path / "tf_keras.h5")
    values = _tf_keras_h5(path)
    view = KerasBackend().load(path)
    bn = view.layer("bn")
    np.testing.assert_array_equal(bn.scale, values["bn"]["gamma:0"].astype("float32"))
    np.testing.assert_array_equal(bn.var, values["bn"]["moving_variance:0"].astype("float32"))
    assert (bn.axes, bn.channel_axis, bn.input_shape) == ((0,), 1, ("batch", 6))  # shape propagated via Dense
    assert bn.training and bn.batch_statistics
    assert any("every call style" in note and "model.predict(x)" in note for note in bn.notes)
    assert view.info.framework_version == "2.15.0" and view.handle.keras2


def test_tf_keras_baked_layer_with_initial_statistics_is_stale_once_the_flag_is_removed(tmp_path):
    from bncheck import engine

    path = str(tmp_path / "tf_keras_fresh.h5")
    _tf_keras_h5(path)
    with h5py.File(path, "r+") as f:  # the moving statistics as Keras creates them: never updated
        f["model_weights/bn/bn/moving_mean:0"][...] = 0.0
        f["model_weights/bn/bn/moving_variance:0"][...] = 1.0
    [finding] = [f for f in engine.inspect(path).findings if f.code == "BN003"]
    assert finding.layer == "bn" and finding.evidence["used_by"] == ["model(x) once the baked training=True is removed"]
    assert "UPDATE_OPS" not in finding.hint


def test_lambda_layer_is_recorded_for_the_probe_to_refuse_while_inspect_still_reads_the_norm_layers(tmp_path):
    inp = keras.Input((4,))
    x = layers.BatchNormalization(name="bn")(inp)
    x = layers.Lambda(lambda t: t * 2.0, name="double")(x)
    model = keras.Model(inp, x)
    path = str(tmp_path / "lambda.keras")
    model.save(path)
    view = KerasBackend().load(path)
    assert [layer.name for layer in view.layers] == ["bn"]
    assert any("'double'" in item and "Lambda" in item for item in view.handle.unsafe)
    assert any("probe refused" in note.message for note in view.notes)
    # its config holds the function as a "__lambda__" object: still one layer, said once (faceverifyai)
    assert len([item for item in view.handle.unsafe if "'double'" in item]) == 1


def test_a_keras_2_lambdas_declared_output_shape_sizes_the_layers_after_it(tmp_path):
    """facenet_keras (Keras 2.1): 100 of its 112 BNs, after its 21 scaled-residual Lambdas, showed set "?",
    although each Lambda stores its output shape ([17, 17, 256], "raw"); a Keras 2 file has no other shapes."""

    def entry(cls, name, source, config):
        return {"class_name": cls, "name": name, "inbound_nodes": [[[source, 0, 0, {}]]], "config": config}

    crop = {"name": "crop", "function": ["4wEAAAA=", None, None], "function_type": "lambda"}
    crop |= {"output_shape": [4, 4, 3], "output_shape_type": "raw", "arguments": {}}
    bn = {"name": "bn", "axis": -1, "momentum": 0.99, "epsilon": 0.001, "center": True, "scale": True}
    layers_cfg = [
        {
            "class_name": "InputLayer",
            "name": "x",
            "inbound_nodes": [],
            "config": {"batch_input_shape": [None, 8, 8, 3], "name": "x"},
        },
        entry("Lambda", "crop", "x", crop),
        entry("BatchNormalization", "bn", "crop", bn),
    ]
    config = {
        "class_name": "Model",
        "config": {"name": "m", "layers": layers_cfg, "input_layers": [["x", 0, 0]], "output_layers": [["bn", 0, 0]]},
    }
    path = tmp_path / "lambda_shape.h5"
    with h5py.File(path, "w") as f:
        f.attrs["keras_version"] = "2.1.2"
        f.attrs["model_config"] = json.dumps(config)
        weights = f.create_group("model_weights")
        weights.attrs["layer_names"] = np.array([b"x", b"crop", b"bn"])
        for layer in ("x", "crop"):
            weights.create_group(layer).attrs["weight_names"] = np.array([], dtype="S1")
        group = weights.create_group("bn")
        names = ("gamma:0", "beta:0", "moving_mean:0", "moving_variance:0")
        group.attrs["weight_names"] = np.array([f"bn/{v}".encode() for v in names])
        for var in names:
            group.create_dataset(f"bn/{var}", data=np.ones(3, np.float32))
    [layer] = read(str(path)).layers
    assert layer.input_shape is not None and layer.input_shape[1:] == (4, 4, 3)


def test_foreign_module_in_config_is_recorded_as_unsafe(tmp_path):
    path = bn_model_with_config_field(tmp_path, "module", "evil_package.layers")
    static = read(path)
    assert any("evil_package.layers" in item and "'bn'" in item for item in static.unsafe)
    assert [layer.name for layer in static.layers] == ["bn"]


def test_static_load_does_not_import_keras(tmp_path):
    model = _all_kinds_model()
    path = str(tmp_path / "kinds.keras")
    model.save(path)
    code = (
        "import sys; from bncheck.backends.keras import KerasBackend; "
        f"v = KerasBackend().load({path!r}); assert len(v.layers) == 9; "
        "assert not any(m == 'keras' or m.startswith(('keras.', 'jax', 'tensorflow')) for m in sys.modules), "
        "sorted(m for m in sys.modules if 'keras' in m)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- hostile files


def _assert_one_line_error(path, *fragments):
    with pytest.raises(BackendError) as info:
        KerasBackend().load(str(path))
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_zip_bomb_member_is_refused_before_inflating(tmp_path):
    path = tmp_path / "bomb.keras"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("metadata.json", "{}")
        zf.writestr("config.json", "{}")
        zf.writestr("model.weights.h5", b"\0" * (16 * 1024**2))  # 16 MiB of zeros deflate ~1000:1
    info = zipfile.ZipFile(path).getinfo("model.weights.h5")
    assert info.file_size > MAX_RATIO * info.compress_size
    _assert_one_line_error(path, "zip bomb")


def test_member_declaring_more_than_the_limit_is_refused(tmp_path, monkeypatch):
    import bncheck.backends.keras.archive as ks

    path = tmp_path / "big.keras"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("config.json", json.dumps({"class_name": "Sequential", "config": {"layers": []}}))
    monkeypatch.setattr(ks, "MAX_JSON_BYTES", 10)
    _assert_one_line_error(path, "config.json", "limit 10")


def test_non_zip_keras_file_is_refused(tmp_path):
    path = tmp_path / "text.keras"
    path.write_text("this is not a zip archive\n")
    _assert_one_line_error(path, "not a .keras file")


def test_truncated_keras_archive_is_refused(tmp_path):
    model = _all_kinds_model()
    path = tmp_path / "whole.keras"
    model.save(path)
    cut = tmp_path / "cut.keras"
    cut.write_bytes(path.read_bytes()[:-500])
    _assert_one_line_error(cut)


def test_member_path_escaping_the_archive_is_refused(tmp_path):
    path = tmp_path / "escape.keras"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("config.json", "{}")
        zf.writestr("../../etc/evil", "x")
    _assert_one_line_error(path, "escapes the archive")


def test_broken_hdf5_file_is_refused(tmp_path):
    path = tmp_path / "broken.h5"
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + os.urandom(2000))
    _assert_one_line_error(path, "not a readable HDF5 file")


def test_truncated_legacy_h5_is_refused(tmp_path):
    model = _all_kinds_model()
    whole = tmp_path / "whole.h5"
    model.save(whole)
    cut = tmp_path / "cut.h5"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    _assert_one_line_error(cut)


def test_broken_weights_inside_a_keras_archive_is_refused(tmp_path):
    path = tmp_path / "badweights.keras"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("config.json", json.dumps({"class_name": "Sequential", "config": {"layers": []}}))
        zf.writestr("model.weights.h5", b"garbage" * 100)
    _assert_one_line_error(path, "model.weights.h5")


def test_a_weights_only_file_gives_its_batch_norms_statistics_whatever_center_and_scale_drop(tmp_path):
    """A Keras 3 weights file names no variable: a BatchNormalization's moving mean and variance are its last
    two, behind gamma and beta where ``scale`` and ``center`` keep them; the other kinds cannot be told."""
    model = _all_kinds_model()
    path = tmp_path / "only.weights.h5"
    model.save_weights(path)
    view = KerasBackend().load(str(path))
    assert [layer.name for layer in view.layers] == ["bn_full", "bn_noscale", "bn_nocenter", "bn_bare"]
    for layer in view.layers:
        bn = model.get_layer(layer.name)
        np.testing.assert_array_equal(layer.mean, np.asarray(bn.moving_mean.numpy()))
        np.testing.assert_array_equal(layer.var, np.asarray(bn.moving_variance.numpy()))
    assert any("weights-only file" in note.message for note in view.notes)


def test_config_that_is_not_a_model_is_refused(tmp_path):
    path = tmp_path / "notmodel.keras"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("config.json", "[1, 2, 3]")
    _assert_one_line_error(path, "not a Keras model")


def test_recompressed_keras_archive_reads_the_same_parameters(tmp_path):
    """Keras stores members uncompressed (read in place); a user's re-zip with DEFLATE goes through a
    capped temporary copy and must give the same view."""
    model = _all_kinds_model()
    stored = tmp_path / "stored.keras"
    model.save(stored)
    deflated = tmp_path / "deflated.keras"
    with zipfile.ZipFile(stored) as src, zipfile.ZipFile(deflated, "w", compression=zipfile.ZIP_DEFLATED) as dst:
        for name in src.namelist():
            dst.writestr(name, src.read(name))
    assert zipfile.ZipFile(deflated).getinfo("model.weights.h5").compress_type == zipfile.ZIP_DEFLATED
    view = KerasBackend().load(str(deflated))
    _assert_params_match(model, view)
    assert [layer.name for layer in view.layers] == [layer.name for layer in KerasBackend().load(str(stored)).layers]


def test_deeply_nested_models_are_walked_in_linear_time_with_their_weights(tmp_path):
    model = keras.Sequential([keras.Input((4,)), layers.BatchNormalization(name="bn")], name="m0")
    for i in range(1, 20):
        inp = keras.Input((4,))
        model = keras.Model(inp, layers.BatchNormalization(name="bn")(model(inp)), name=f"m{i}")
    path = str(tmp_path / "deep.keras")
    model.save(path)
    view = KerasBackend().load(path)  # without memoized passes this walk takes 3**19 passes
    assert len(view.layers) == 20 and view.layers[0].name == "/".join(f"m{i}" for i in range(18, -1, -1)) + "/bn"
    assert all(layer.var is not None for layer in view.layers)
    assert not [n for n in view.notes if n.level == "warning"]


def test_tf_keras_baked_flag_does_not_reach_later_layers(tmp_path):
    """Keras 2 restores the call context after each layer: only the layer with the flag trains."""
    path = str(tmp_path / "tf_keras_two.h5")
    values = _tf_keras_h5(path, second_bn=True)
    view = KerasBackend().load(path)
    after = view.layer("bn_after")
    assert not after.batch_statistics and after.uses_running_stats and after.notes == ()
    np.testing.assert_array_equal(after.mean, values["bn_after"]["moving_mean:0"].astype("float32"))


def test_norm_variables_inside_a_layer_the_config_does_not_describe_are_warned_about(tmp_path):
    """dgad's TCN (Keras 2.4, a class outside Keras) builds 10 LayerNormalizations inside itself: its config
    describes none, so inspect found no normalization layer and passed in silence. The file's variables named as
    a normalization layer's (gamma and beta, moving_mean and moving_variance) under a layer that holds no layer
    the walk found give a warning naming them; a layer the walk describes gives none."""
    inp = keras.Input((8,))
    out = layers.Dense(2, name="head")(layers.BatchNormalization(name="inner_bn")(layers.Dense(4, name="d")(inp)))
    path = tmp_path / "hidden.h5"
    keras.Model(inp, out).save(path)
    described = KerasBackend().load(str(path))
    assert [layer.name for layer in described.layers] == ["inner_bn"]
    assert not [n for n in described.notes if "holds the variables" in n.message]
    with h5py.File(path, "r+") as h5:  # the same file, the BN's class one the reader does not know
        config = json.loads(h5.attrs["model_config"])
        for entry in config["config"]["layers"]:
            if entry["class_name"] == "BatchNormalization":
                entry["class_name"] = "ResidualStack"
        h5.attrs["model_config"] = json.dumps(config)
    view = KerasBackend().load(str(path))
    assert view.layers == []
    [note] = [n for n in view.notes if "holds the variables" in n.message]
    assert note.level == "warning"
    assert note.message.startswith("layer 'inner_bn' (ResidualStack) holds the variables of 1 normalization layer(s)")


def _encoder_with_inner_norms(path, training=None, nan=False):
    """A subclassed layer holding a Sequential of Dense + BatchNormalization as an attribute, as
    neutrophils-classifier's SimCLREncoder holds 12 and KerasHub's backbones hold theirs (Keras 3 stores them
    under the attribute's name). ``training``: the encoder's call's flag; ``nan``: a NaN in the second
    BatchNormalization's moving variance."""

    @keras.saving.register_keras_serializable(package="bncheck_tests")
    class Encoder(layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.feature_extractor = keras.Sequential(
                [layers.Dense(4), layers.BatchNormalization(), layers.Dense(4), layers.BatchNormalization()]
            )

        def call(self, x, training=None):
            return self.feature_extractor(x, training=training)

    inp = keras.Input((6,))
    encoder = Encoder(name="encoder")
    hidden = encoder(inp) if training is None else encoder(inp, training=training)
    model = keras.Model(inp, layers.Dense(2, name="head")(hidden))
    model(np.zeros((1, 6), np.float32))
    if nan:
        bn = encoder.feature_extractor.layers[3]
        bn.moving_variance.assign(np.array([1.0, np.nan, 1.0, 1.0], np.float32))
    model.save(path)
    return model


def _inner_norm_names(model) -> list[str]:
    """The encoder's BatchNormalizations by their Keras paths (the names Keras gave them when built)."""
    inner = model.get_layer("encoder").feature_extractor
    return [f"encoder/{inner.name}/{layer.name}" for layer in inner.layers if "normalization" in layer.name]


def test_norms_inside_a_custom_layer_of_a_keras_3_file_are_checked_from_their_variables(tmp_path):
    """A class outside Keras describes no layers in the config, and bncheck refuses to load it: its norms went
    unchecked (a warning), and KerasHub backbones never updated or holding NaN passed with exit 0."""
    path = tmp_path / "encoder.keras"
    names = _inner_norm_names(_encoder_with_inner_norms(path))
    view = KerasBackend().load(str(path))
    assert [layer.name for layer in view.layers] == names and len(names) == 2
    [note] = [n for n in view.notes if "holds the variables" in n.message]
    assert note.level == "warning" and note.message.startswith("layer 'encoder' (Encoder) holds the variables of 2")
    assert "their stored statistics are checked" in note.message
    findings = bncheck.inspect(str(path)).findings  # never trained: the moving averages are 0 and 1
    assert [(f.code, f.severity.label) for f in findings] == [("BN003", "error")] * 2
    assert all("bncheck does not load this file" in f.hint for f in findings)

    path = tmp_path / "nan.keras"
    names = _inner_norm_names(_encoder_with_inner_norms(path, nan=True))
    findings = bncheck.inspect(str(path)).findings
    assert ("BN005", "error", names[1]) in [(f.code, f.severity.label, f.layer) for f in findings]


def test_a_custom_layer_called_with_training_true_runs_its_hidden_norms_on_batch_statistics(tmp_path):
    path = tmp_path / "baked.keras"
    model = _encoder_with_inner_norms(path, training=True)
    x = np.random.default_rng(0).normal(size=(8, 6)).astype(np.float32)
    # what the finding says: in model(x) a sample's output depends on its companions
    assert not np.allclose(np.asarray(model(x[:1])), np.asarray(model(x))[:1], atol=1e-4)
    findings = bncheck.inspect(str(path)).findings
    bn002 = [f for f in findings if f.code == "BN002"]
    assert [f.layer for f in bn002] == _inner_norm_names(model)
    assert all(f.severity.label == "error" and "which the model calls with training=True" in f.message for f in bn002)


def test_a_keras_3_weights_file_finds_the_norms_a_custom_layer_keeps_under_an_attribute(tmp_path):
    model = _encoder_with_inner_norms(tmp_path / "encoder.keras")
    path = tmp_path / "encoder.weights.h5"
    model.save_weights(path)
    view = KerasBackend().load(str(path))
    assert len(view.layers) == 2 and all(layer.var is not None for layer in view.layers)


def test_norms_a_custom_layer_keeps_as_attributes_are_found_by_their_own_names(tmp_path):
    """KerasHub's MiT keeps its LayerNormalizations as attributes (``norm1``), stored under the attribute's name
    with the generated name in their vars: the note counted 2 of 10, and a BatchNormalization kept so went
    unread."""

    @keras.saving.register_keras_serializable(package="bncheck_tests")
    class Block(layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.proj = layers.Dense(4)
            self.norm1 = layers.LayerNormalization()
            self.bn = layers.BatchNormalization()

        def call(self, x):
            return self.bn(self.norm1(self.proj(x)))

    inp = keras.Input((6,))
    block = Block(name="block")
    model = keras.Model(inp, layers.Dense(2, name="head")(block(inp)))
    model(np.zeros((1, 6), np.float32))
    path = tmp_path / "block.keras"
    model.save(path)
    view = KerasBackend().load(str(path))
    assert [layer.name for layer in view.layers] == [f"block/{block.bn.name}"]
    [note] = [n for n in view.notes if "holds the variables" in n.message]
    assert "1 other normalization layer(s)" in note.message  # the LayerNormalization: no config to check it by
    assert [(f.code, f.layer) for f in bncheck.inspect(str(path)).findings] == [("BN003", f"block/{block.bn.name}")]


def test_a_nan_in_a_norm_that_no_config_describes_is_an_error_in_the_file_and_its_weights(tmp_path):
    """KerasHub's MiT with a NaN LayerNormalization gamma passed inspect with exit 0 in its .keras and its
    .weights.h5: the layer's variables alone cannot say its axes or epsilon, but they can say NaN."""

    @keras.saving.register_keras_serializable(package="bncheck_tests")
    class NormBlock(layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.proj = layers.Dense(4)
            self.norm1 = layers.LayerNormalization()

        def call(self, x):
            return self.norm1(self.proj(x))

    inp = keras.Input((6,))
    block = NormBlock(name="block")
    model = keras.Model(inp, layers.Dense(2, name="head")(block(inp)))
    model(np.zeros((1, 6), np.float32))
    block.norm1.gamma.assign(np.array([1.0, np.nan, 1.0, 1.0], np.float32))
    model.save(tmp_path / "block.keras")
    model.save_weights(tmp_path / "block.weights.h5")
    [note] = [n for n in KerasBackend().load(str(tmp_path / "block.keras")).notes if "holds the variables" in n.message]
    assert note.message.endswith("only NaN and Inf in their variables are checked (their axes and epsilon are unknown)")
    for name in ("block.keras", "block.weights.h5"):
        findings = bncheck.inspect(str(tmp_path / name)).findings
        assert [(f.code, f.severity.label, f.layer) for f in findings] == [
            ("BN005", "error", f"block/{block.norm1.name}")
        ], name
        assert findings[0].message.startswith(f"LayerNormalization 'block/{block.norm1.name}' has non-finite variables")
        assert "(1 NaN, 0 Inf of 4)" in findings[0].message
