"""A Keras Conv3D net on Input((None, None, None, 1)) with a BatchNormalization baked to training=True:
`inspect` gives at most an info (the set is one element only on 1x1x1 maps at batch 1), and `probe` on
real 16^3 volumes measures n = 4096 at batch 1 and reports no collapse."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

os.environ.setdefault("KERAS_BACKEND", "numpy")
keras = pytest.importorskip("keras")
from keras import layers

from bncheck.cli import main


def _conv3d(tmp_path: Path) -> str:
    inp = keras.Input((None, None, None, 1))
    x = layers.Conv3D(4, 3, padding="same", name="conv")(inp)
    x = layers.BatchNormalization(name="bn")(x, training=True)
    model = keras.Model(inp, x)
    path = tmp_path / "conv3d.keras"
    model.save(str(path))
    return str(path)


def test_keras_conv3d_train_mode_bn_on_free_dims_is_an_info_statically_and_measured_by_the_probe(tmp_path):
    path = _conv3d(tmp_path)
    result = CliRunner().invoke(main, ["inspect", path, "--format", "json", "--select", "BN001"])
    assert result.exit_code == 0, result.output
    [finding] = json.loads(result.stdout)["findings"]
    assert finding["severity"] == "info" and "axis 1 = 1 and axis 2 = 1 and axis 3 = 1" in finding["message"]
    data = tmp_path / "volumes.npy"
    np.save(data, np.random.default_rng(2).normal(size=(2, 16, 16, 16, 1)).astype(np.float32))
    result = CliRunner().invoke(
        main, ["probe", path, "--data", str(data), "--batch-sizes", "1,2", "--format", "json", "--select", "BN001"]
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["findings"] == []
    assert doc["layers"][0]["normalized_set_size"]["by_batch_size"] == {"1": 4096, "2": 8192}
