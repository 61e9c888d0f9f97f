"""Keras 1/2 Sequential files whose first layer carries ``batch_input_shape`` (no InputLayer in the config, as
Keras 2.2-2.3 saved a Sequential built with ``input_shape=``): Keras 3 loads them with that shape taken as one
sample's, an extra axis, and refused the inputs of the file's own shape; bncheck rebuilds them on the declared
shape. Real Keras (numpy backend): the file is saved by Keras 3 as a legacy .h5 and its config rewritten with
h5py to the Keras 2 layout (inaSpeechSegmenter 0.5.1's models, Keras 2.3.1, carry it).
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

from bncheck.cli import main
from bncheck.errors import one_line

FEATURES = 6


def _keras2_sequential(path: Path, stale: bool, conv: bool = False) -> str:
    """Dense(8) -> BatchNormalization -> Dense(3) on 6 features (``conv``: Conv1D(8, 3) -> BatchNormalization
    -> GlobalAveragePooling1D -> Dense(3) on 6 steps of 2 channels), saved with the first layer's
    batch_input_shape and no InputLayer, as Keras 2.2-2.3 wrote it; ``stale``: the BN's moving statistics as
    initialized (mean 0, variance 1), else set to the statistics of the first layer's output on standard-normal
    inputs."""
    keras.utils.set_random_seed(0)
    bn = keras.layers.BatchNormalization(name="bn")
    if conv:
        head = [keras.Input((FEATURES, 2)), keras.layers.Conv1D(8, 3, name="c1")]
        tail = [bn, keras.layers.GlobalAveragePooling1D(name="pool"), keras.layers.Dense(3, name="d2")]
    else:
        head = [keras.Input((FEATURES,)), keras.layers.Dense(8, name="d1")]
        tail = [bn, keras.layers.Dense(3, name="d2")]
    model = keras.Sequential([*head, *tail])
    if not stale:
        sample = (4096, FEATURES, 2) if conv else (4096, FEATURES)
        hidden = np.asarray(model.layers[0](np.random.default_rng(1).standard_normal(sample, np.float32)))
        axes = tuple(range(hidden.ndim - 1))
        bn.moving_mean.assign(hidden.mean(axis=axes))
        bn.moving_variance.assign(hidden.var(axis=axes))
    model.save(path)
    with h5py.File(path, "r+") as h5:
        config = json.loads(h5.attrs["model_config"])
        layers = [entry for entry in config["config"]["layers"] if entry["class_name"] != "InputLayer"]
        layers[0]["config"]["batch_input_shape"] = [None, FEATURES, 2] if conv else [None, FEATURES]
        config["config"]["layers"] = layers
        config["config"].pop("build_input_shape", None)
        h5.attrs["model_config"] = json.dumps(config)
        h5.attrs["keras_version"] = "2.2.4"
    return str(path)


def test_keras3_itself_loads_such_a_file_with_an_extra_input_axis_or_not_at_all(tmp_path: Path) -> None:
    """The defect bncheck works around (Keras 3.15): if Keras fixes it, loading a patched copy is not needed."""
    loaded = keras.saving.load_model(_keras2_sequential(tmp_path / "m.h5", stale=False), compile=False)
    assert tuple(loaded.input_shape) == (None, None, FEATURES)
    with pytest.raises(ValueError, match="kernel"):  # a Conv1D's kernel refuses the extra axis
        keras.saving.load_model(_keras2_sequential(tmp_path / "c.h5", stale=False, conv=True), compile=False)


@pytest.mark.parametrize("conv", [False, True])
def test_probe_loads_the_file_on_its_declared_input_shape_and_says_so(tmp_path: Path, conv: bool) -> None:
    model = _keras2_sequential(tmp_path / "m.h5", stale=True, conv=conv)
    before = Path(model).read_bytes()
    result = CliRunner().invoke(main, ["probe", model, "--format", "json"])
    assert result.exit_code == 1, result.output  # exit 2 before: Keras refused the inputs, or the file
    document = json.loads(result.stdout)
    assert [(f["code"], f["layer"]) for f in document["findings"]] == [("BN003", "bn")]  # never updated
    notes = [n for run in document["probe"]["runs"] for n in run["notes"]]
    shape = (None, FEATURES, 2) if conv else (None, FEATURES)
    assert any(
        f"reads the batch_input_shape {shape} of this Keras 2.2.4 Sequential file's first layer" in n
        and f"loaded it with an input layer of {shape} in front, the file unchanged" in n
        for n in notes
    ), notes
    assert Path(model).read_bytes() == before


def test_fix_writes_a_model_on_the_declared_input_shape_that_probes_clean(tmp_path: Path) -> None:
    model = _keras2_sequential(tmp_path / "m.h5", stale=True)
    data = tmp_path / "x.npy"
    np.save(data, np.random.default_rng(2).standard_normal((256, FEATURES)).astype(np.float32))
    written = tmp_path / "fixed.h5"
    result = CliRunner().invoke(main, ["fix", model, "--data", str(data), "-o", str(written), "--format", "json"])
    assert result.exit_code == 0, result.output
    fixed = keras.saving.load_model(written, compile=False)
    assert tuple(fixed.input_shape) == (None, FEATURES)
    again = CliRunner().invoke(main, ["probe", str(written), "--data", str(data), "--format", "json"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["findings"] == []


def test_a_keras_error_is_one_line_without_terminal_escapes_or_the_printed_input() -> None:
    """Keras sets key phrases in bold and prints the whole input it refuses before the shape it expected."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((FEATURES,)), keras.layers.Dense(2)])
    with pytest.raises(Exception) as caught:
        model(np.random.default_rng(0).standard_normal((4, 5, 7)).astype(np.float32))
    assert "\x1b[" in str(caught.value) and len(str(caught.value)) > 300
    text = one_line(caught.value)
    assert "\x1b" not in text and "\n" not in text and len(text) <= 300
    assert "[...]" in text and "Expected shape (None, 6)" in text, text
