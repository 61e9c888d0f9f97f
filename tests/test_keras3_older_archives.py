""".keras archives of older Keras 3 releases that the installed Keras refuses: Keras 3.4-3.5 wrote a
``value_range`` into RandomRotation's config (the TensorFlow tutorials' augmentation block; 2 of 28 Keras 3 files in
a sweep of public repositories), which Keras 3.15 does not take. Real Keras (numpy backend): a Keras 3 model saved
as .keras, its config given the key as those releases wrote it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "numpy")
keras = pytest.importorskip("keras")

from bncheck.backends.keras.archive import read
from bncheck.backends.keras.legacy import load_patched
from tests.keras_files import archive_members, probed_findings, write_archive


def _augmented(path: Path) -> tuple[str, np.ndarray, np.ndarray]:
    """RandomFlip -> RandomRotation -> Conv2D -> BatchNormalization (never updated) -> pooling, saved as Keras 3.5.0
    wrote it (RandomRotation's ``value_range``); with inputs and the model's outputs (augmentation is the identity
    at inference)."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            keras.layers.RandomFlip(name="flip"),
            keras.layers.RandomRotation(0.2, name="rotate"),
            keras.layers.Conv2D(4, 3, name="conv"),
            keras.layers.BatchNormalization(name="bn"),
            keras.layers.GlobalAveragePooling2D(name="pool"),
        ]
    )
    x = np.random.default_rng(1).standard_normal((8, 6, 6, 2)).astype(np.float32)
    expected = np.asarray(model(x, training=False))
    model.save(path)
    members = archive_members(path)
    config = json.loads(members["config.json"])
    (rotate,) = [entry["config"] for entry in config["config"]["layers"] if entry["config"]["name"] == "rotate"]
    rotate["value_range"] = [0, 255]
    members["config.json"] = json.dumps(config).encode()
    members["metadata.json"] = json.dumps({"keras_version": "3.5.0", "date_saved": "2024-08-01@10:00:00"}).encode()
    write_archive(path, members)
    return str(path), x, expected


def test_probe_loads_an_archive_whose_augmentation_layer_holds_a_key_keras_no_longer_takes(tmp_path: Path) -> None:
    path, x, expected = _augmented(tmp_path / "m.keras")
    with pytest.raises(Exception, match="Unrecognized keyword arguments passed to RandomRotation"):
        keras.saving.load_model(path, compile=False)
    patched = load_patched(keras, read(path))
    assert patched is not None
    model, note = patched
    np.testing.assert_allclose(np.asarray(model(x, training=False)), expected, rtol=1e-6, atol=1e-6)
    assert "refuses the value_range that Keras 3.5.0 wrote into 1 augmentation layer(s) (first: 'rotate')" in note
    assert probed_findings(path) == [("BN003", "bn")]  # exit 2 before: Keras refused the file


def test_an_archive_keras_reads_as_it_is_is_loaded_as_it_is(tmp_path: Path) -> None:
    """No copy, no note, where no augmentation layer holds a key the installed Keras refuses."""
    path = tmp_path / "m.keras"
    keras.Sequential(
        [keras.Input((6, 6, 2)), keras.layers.RandomRotation(0.2), keras.layers.BatchNormalization()]
    ).save(path)
    assert load_patched(keras, read(str(path))) is None
