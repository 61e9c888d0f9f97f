"""BN003 stale-stats: exact initial values statically; drift against --data."""

from __future__ import annotations

import numpy as np

from tests.builders import bn_model


def test_mean_0_var_1_in_every_channel_is_stale(tmp_path, inspect_findings):
    [finding] = inspect_findings(bn_model(tmp_path / "m.onnx", mean=[0, 0, 0], var=[1, 1, 1]), "BN003")
    assert finding.severity.label == "error"
    assert finding.evidence == {"kind": "defaults", "channels": 3}


def test_some_channels_at_defaults_are_not_stale(tmp_path, inspect_findings):
    path = bn_model(tmp_path / "m.onnx", mean=[0, 0, 0.2], var=[1, 1, 1])
    assert inspect_findings(path, "BN003") == []


def test_train_mode_layers_are_not_reported_stale(tmp_path, inspect_findings):
    path = bn_model(tmp_path / "m.onnx", mean=[0, 0, 0], var=[1, 1, 1], training=True)
    assert inspect_findings(path, "BN003") == []


def _calibration(tmp_path, mean: float, std: float) -> str:
    rng = np.random.default_rng(1)
    path = tmp_path / "calib.npy"
    np.save(path, (rng.standard_normal((64, 3, 4, 4)) * std + mean).astype(np.float32))
    return str(path)


def test_statistics_far_from_the_data_drift(tmp_path, probe_findings):
    model = bn_model(tmp_path / "m.onnx", mean=[0.1, 0.1, 0.1], var=[1, 1, 1])
    data = _calibration(tmp_path, mean=3.0, std=2.0)
    [finding] = probe_findings(model, "BN003", data_path=data, data_source=data)
    assert finding.severity.label == "warning"
    assert finding.evidence["kind"] == "drift"
    assert finding.evidence["median_mean_shift"] > 2.5


def test_statistics_matching_the_data_do_not_drift(tmp_path, probe_findings):
    model = bn_model(tmp_path / "m.onnx", mean=[3.0, 3.0, 3.0], var=[4.0, 4.0, 4.0])
    data = _calibration(tmp_path, mean=3.0, std=2.0)
    assert probe_findings(model, "BN003", data_path=data, data_source=data) == []


def test_no_drift_judgement_without_data(tmp_path, probe_findings):
    model = bn_model(tmp_path / "m.onnx", mean=[0.1, 0.1, 0.1], var=[1, 1, 1])
    assert probe_findings(model, "BN003") == []
