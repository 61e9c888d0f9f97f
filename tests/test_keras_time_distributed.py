"""Normalization layers wrapped by TimeDistributed, alone or inside a wrapped model (a CNN run on every frame
of a video before an LSTM: vvadlrs3's 27 BatchNormalizations). The config walk did not look inside the
wrapper: `.keras` files reported no normalization layer at all, legacy `.h5` files a warning that the config
does not describe them. Real Keras (numpy backend) builds and runs every model; parameters are compared with
what Keras holds, verdicts with what Keras computes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

os.environ.setdefault("KERAS_BACKEND", "numpy")
keras = pytest.importorskip("keras")

from bncheck.backends.keras import KerasBackend
from bncheck.cli import main
from bncheck.model import normalized_set_size

FRAMES, FEATURES = 5, 16


def _td_bn(path: Path, baked: bool = False) -> keras.Model:
    """Dense -> TimeDistributed(BatchNormalization) -> Dense on [batch, 5 frames, 16]; ``baked``: called with
    training=True. Its moving statistics stay as initialized (never updated)."""
    keras.utils.set_random_seed(0)
    x = keras.Input((FRAMES, FEATURES))
    y = keras.layers.Dense(FEATURES, name="d1")(x)
    td = keras.layers.TimeDistributed(keras.layers.BatchNormalization(name="bn"), name="td")
    y = td(y, training=True) if baked else td(y)
    model = keras.Model(x, keras.layers.Dense(2, name="out")(keras.layers.Flatten()(y)))
    model.save(path)
    return model


def _td_model(path: Path) -> keras.Model:
    """A frame CNN with a BatchNormalization (a Functional model) wrapped by TimeDistributed, then an LSTM;
    every variable distinct."""
    keras.utils.set_random_seed(0)
    frame = keras.Input((8, 8, 3))
    f = keras.layers.Conv2D(4, 3, name="conv")(frame)
    f = keras.layers.BatchNormalization(name="inner_bn")(f)
    frame_net = keras.Model(frame, keras.layers.Flatten(name="flat")(f), name="frame_net")
    x = keras.Input((FRAMES, 8, 8, 3))
    y = keras.layers.TimeDistributed(frame_net, name="td")(x)
    model = keras.Model(x, keras.layers.Dense(2, name="out")(keras.layers.LSTM(4, name="lstm")(y)))
    rng = np.random.default_rng(1)
    for var in model.weights:
        var.assign(rng.uniform(0.5, 1.5, tuple(var.shape)).astype("float32"))
    model.save(path)
    return model


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_the_walk_finds_the_layers_of_a_wrapped_model_with_their_parameters(tmp_path: Path, suffix: str) -> None:
    model = _td_model(tmp_path / f"m{suffix}")
    view = KerasBackend().load(str(tmp_path / f"m{suffix}"))
    (layer,) = view.layers
    assert layer.name == "td/frame_net/inner_bn" and layer.input_shape == ("batch", 6, 6, 4)
    bn = model.get_layer("td").layer.get_layer("inner_bn")
    for got, variable in zip((layer.scale, layer.bias, layer.mean, layer.var), bn.weights):
        np.testing.assert_array_equal(got, np.asarray(variable.numpy()))
    assert any("called by TimeDistributed 'td' once per frame (5 frames)" in n for n in layer.notes)
    assert not [n for n in view.notes if "does not describe" in n.message]  # the legacy reader's warning


def test_inspect_finds_never_updated_statistics_inside_the_wrapper(tmp_path: Path) -> None:
    _td_bn(tmp_path / "m.keras")
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "m.keras"), "--format", "json"])
    assert result.exit_code == 1, result.output  # exit 0 before: "no normalization layer found"
    assert [(f["code"], f["layer"]) for f in json.loads(result.stdout)["findings"]] == [("BN003", "td/bn")]


def test_probe_sees_a_baked_training_flag_through_the_wrapper(tmp_path: Path) -> None:
    model = _td_bn(tmp_path / "m.keras", baked=True)
    x = np.random.default_rng(2).standard_normal((4, FRAMES, FEATURES)).astype(np.float32)
    alone, within = np.asarray(model(x[:1])), np.asarray(model(x))[:1]
    assert np.abs(alone - within).max() > 0.1  # Keras itself: a sample's output depends on its companions
    result = CliRunner().invoke(main, ["probe", str(tmp_path / "m.keras"), "--format", "json"])
    assert result.exit_code == 1, result.output
    found = {(f["code"], f["severity"]) for f in json.loads(result.stdout)["findings"] if f["layer"] == "td/bn"}
    assert ("BN002", "error") in found
    # Keras 3 calls the wrapped layer once per frame on that frame's batch: at batch 1 it normalizes a set of
    # one element per channel, so its output is beta whatever the input
    bn = model.get_layer("td").layer
    frame_batch = np.random.default_rng(3).standard_normal((1, FEATURES)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(bn(frame_batch, training=True))[0], np.asarray(bn.beta.numpy()), atol=1e-6)
    assert ("BN001", "error") in found


def test_a_keras_2_file_counts_the_frames_in_the_normalized_set(tmp_path: Path) -> None:
    """Keras 1/2 reshape the frames into the batch axis and call the wrapped layer once: a baked train-mode
    BN there normalizes batch x frames elements per channel, 5 at batch 1, where Keras 3's per-frame calls
    normalize 1."""
    _td_bn(tmp_path / "m3.h5", baked=True)
    keras3 = KerasBackend().load(str(tmp_path / "m3.h5")).layers[0]
    assert normalized_set_size(keras3, batch=1) == (1, ())
    path = tmp_path / "m2.h5"
    path.write_bytes((tmp_path / "m3.h5").read_bytes())
    with h5py.File(path, "r+") as h5:
        h5.attrs["keras_version"] = "2.4.0"
    keras2 = KerasBackend().load(str(path)).layers[0]
    assert keras2.name == "td/bn" and normalized_set_size(keras2, batch=1) == (FRAMES, ())
    assert any("Keras 3, which the probe runs, calls it once per frame" in n for n in keras2.notes)
