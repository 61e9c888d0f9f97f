"""Legacy .h5 files of weights only (``model.save_weights``): PyPI packages ship them beside the code that builds
the model (24 of the Keras files helpers downloaded: oskut's and sefr-cut's tokenizers, hotwater, phonet).
`inspect` refused them; it now finds the BatchNormalizations by their variable names and checks their stored
statistics. The files are written with h5py in the layout Keras 2 / tf_keras's ``save_weights`` writes (root
``layer_names``, each layer group's ``weight_names``, datasets under the scoped names), which needs TensorFlow
to produce itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from bncheck.cli import main

C = 4


def _write_weights(path: Path, layers: dict[str, dict[str, np.ndarray]]) -> str:
    """``layers``: group name -> {scoped weight name: value}, in save_weights's layout."""
    with h5py.File(path, "w") as h5:
        h5.attrs["layer_names"] = [name.encode() for name in layers]
        h5.attrs["keras_version"] = b"2.2.4-tf"
        h5.attrs["backend"] = b"tensorflow"
        for name, weights in layers.items():
            group = h5.create_group(name)
            group.attrs["weight_names"] = [w.encode() for w in weights]
            for weight_name, value in weights.items():
                group.create_dataset(weight_name, data=value)
    return str(path)


def _bn(scope: str, mean: np.ndarray, var: np.ndarray) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        f"{scope}/gamma:0": rng.uniform(0.5, 1.5, C).astype(np.float32),
        f"{scope}/beta:0": rng.uniform(-0.5, 0.5, C).astype(np.float32),
        f"{scope}/moving_mean:0": mean.astype(np.float32),
        f"{scope}/moving_variance:0": var.astype(np.float32),
    }


def _weights_file(path: Path, var: np.ndarray | None = None) -> str:
    """A Dense, a trained top-level BatchNormalization, and a nested model holding a trained one and one whose
    statistics were never updated (``var``: the trained nested one's variance instead)."""
    trained_mean, trained_var = np.array([0.3, -1.2, 0.05, 2.0]), np.array([0.4, 1.7, 0.02, 3.1])
    nested = {
        **_bn("model_1/conv_bn", trained_mean, trained_var if var is None else var),
        **_bn("model_1/head_bn", np.zeros(C), np.ones(C)),
        "model_1/conv/kernel:0": np.ones((3, 3, 2, C), np.float32),
    }
    return _write_weights(
        path,
        {
            "dense_1": {"dense_1/kernel:0": np.ones((8, C), np.float32), "dense_1/bias:0": np.zeros(C, np.float32)},
            "batch_normalization_1": _bn("batch_normalization_1", trained_mean + 1, trained_var * 2),
            "model_1": nested,
        },
    )


def _inspect(path: str) -> tuple[int, dict]:
    result = CliRunner().invoke(main, ["inspect", path, "--format", "json"])
    return result.exit_code, json.loads(result.stdout)


def test_inspect_finds_the_batch_norms_of_a_weights_only_file_and_their_never_updated_statistics(
    tmp_path: Path,
) -> None:
    code, document = _inspect(_weights_file(tmp_path / "w.h5"))
    assert code == 1  # exit 2 before: "no model_config in this HDF5 file"
    names = [layer["name"] for layer in document["layers"]]
    assert names == ["batch_normalization_1", "model_1/conv_bn", "model_1/head_bn"]
    assert document["layers"][1]["running_var"]["max"] == np.float32(3.1)
    assert [(f["code"], f["layer"]) for f in document["findings"]] == [("BN003", "model_1/head_bn")]
    assert any("weights-only file" in n["message"] and n["level"] == "warning" for n in document["notes"])


def test_a_negative_stored_variance_in_a_weights_only_file_is_bn005(tmp_path: Path) -> None:
    code, document = _inspect(_weights_file(tmp_path / "w.h5", var=np.array([0.4, -1.7, 0.02, 3.1])))
    assert code == 1
    assert ("BN005", "model_1/conv_bn") in {(f["code"], f["layer"]) for f in document["findings"]}


def test_probe_refuses_a_weights_only_file_in_one_line_naming_what_inspect_checks(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["probe", _weights_file(tmp_path / "w.h5")])
    assert result.exit_code == 2
    assert "weights-only file (model.save_weights) holds no model to run" in result.stderr
    assert "stored statistics of the BatchNormalization layers it holds (3)" in result.stderr


def test_fix_refuses_a_weights_only_file_saying_fix(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["fix", _weights_file(tmp_path / "w.h5"), "-o", str(tmp_path / "f.h5")])
    assert result.exit_code == 2
    assert "holds no model to run" in result.stderr and "to fix, save the whole model" in result.stderr


def test_a_weights_only_file_without_batch_norms_passes_saying_what_it_holds(tmp_path: Path) -> None:
    # EmoPy's conv weights and DELIGHT's (kernels and biases only) failed a CI loop over a models folder (exit 2)
    path = _write_weights(tmp_path / "w.h5", {"dense_1": {"dense_1/kernel:0": np.ones((8, C), np.float32)}})
    code, document = _inspect(path)
    assert code == 0 and document["layers"] == [] and document["findings"] == []
    assert any(n["message"] == "no normalization layer's variables found in the file" for n in document["notes"])


def test_gamma_without_moving_statistics_is_named_as_a_layer_that_cannot_be_checked(tmp_path: Path) -> None:
    gamma = {"ln_1/gamma:0": np.ones(C, np.float32), "ln_1/beta:0": np.zeros(C, np.float32)}
    code, document = _inspect(_write_weights(tmp_path / "w.h5", {"ln_1": gamma}))
    assert code == 0 and document["layers"] == []
    [warning] = [n for n in document["notes"] if "other normalization layer(s)" in n["message"]]
    assert warning["level"] == "warning" and "('ln_1': LayerNormalization or GroupNormalization" in warning["message"]


def test_inspect_reads_a_keras_3_weights_file_nested_models_included(tmp_path: Path) -> None:
    """Keras 3's ``model.save_weights("m.weights.h5")``: groups named after the classes, vars by position."""
    import os

    os.environ.setdefault("KERAS_BACKEND", "numpy")
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(0)
    inner = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(C), keras.layers.BatchNormalization(name="inner_bn")], name="inner"
    )
    layers = [keras.layers.Dense(C, name=f"d{i}") for i in range(11)] + [keras.layers.BatchNormalization(name="top_bn")]
    model = keras.Sequential([keras.Input((6,)), inner, *layers])
    trained = model.get_layer("top_bn")
    trained.moving_mean.assign(np.array([0.3, -1.2, 0.05, 2.0], np.float32))
    trained.moving_variance.assign(np.array([0.4, 1.7, 0.02, 3.1], np.float32))
    path = tmp_path / "m.weights.h5"
    model.save_weights(path)
    code, document = _inspect(str(path))
    assert code == 1  # exit 2 before: no model_config
    by_name = {layer["name"]: layer for layer in document["layers"]}  # groups by class: no creation order
    assert sorted(by_name) == ["inner/inner_bn", "top_bn"]
    assert by_name["top_bn"]["running_var"]["max"] == np.float32(3.1)
    assert [(f["code"], f["layer"]) for f in document["findings"]] == [("BN003", "inner/inner_bn")]
