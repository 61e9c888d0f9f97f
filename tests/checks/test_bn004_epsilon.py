"""BN004 epsilon: zero, below the TensorFlow clamp, dominating the variance."""

from __future__ import annotations

import numpy as np

from tests.builders import bn_model, layernorm_model


def test_float32_default_1e_5_is_not_flagged(tmp_path, inspect_findings):
    path = bn_model(tmp_path / "m.onnx", epsilon=1e-5)
    assert inspect_findings(path, "BN004") == []


def test_epsilon_1e_8_is_below_the_clamp_with_its_output_change(tmp_path, inspect_findings):
    path = bn_model(tmp_path / "m.onnx", epsilon=1e-8, var=[1e-4, 1.0, 2.0])
    [finding] = inspect_findings(path, "BN004")
    assert finding.severity.label == "warning"
    assert finding.evidence["kind"] == "below-clamp"
    expected = 1 - np.sqrt((1e-4 + 1e-8) / (1e-4 + 1.001e-5))
    assert abs(finding.evidence["max_relative_change"] - expected) < 1e-4


def test_epsilon_zero_with_a_zero_variance_channel_is_an_error(tmp_path, inspect_findings):
    [finding] = inspect_findings(bn_model(tmp_path / "m.onnx", epsilon=0.0, var=[0.0, 1.0, 2.0]), "BN004")
    assert finding.severity.label == "error"
    assert finding.evidence["zero_variance_channels"] == 1


def test_epsilon_zero_without_zero_variance_is_a_warning(tmp_path, inspect_findings):
    [finding] = inspect_findings(bn_model(tmp_path / "m.onnx", epsilon=0.0, var=[0.5, 1.0, 2.0]), "BN004")
    assert finding.severity.label == "warning"


def test_epsilon_dominating_small_variances_reports_channels_and_factor(tmp_path, inspect_findings):
    path = bn_model(tmp_path / "m.onnx", epsilon=1e-3, var=[1e-3, 0.5, 1.0])
    [finding] = inspect_findings(path, "BN004")
    assert finding.evidence["kind"] == "dominates"
    assert finding.evidence["channels"] == 1
    assert abs(finding.evidence["worst_factor"] - np.sqrt(0.5)) < 1e-4


def test_layernorm_epsilon_below_clamp_is_not_a_batch_norm_clamp_issue(tmp_path, inspect_findings):
    assert inspect_findings(layernorm_model(tmp_path / "m.onnx", epsilon=1e-6), "BN004") == []
