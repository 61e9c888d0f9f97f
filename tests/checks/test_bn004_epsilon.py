"""BN004 epsilon: zero, below the TensorFlow clamp, dominating the variance."""

from __future__ import annotations

import numpy as np
import pytest

from tests.builders import bn_model, fed_instancenorm_model, layernorm_model


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
    assert "1.001e-5" in finding.message and "clamp" in finding.message


def test_clamp_effect_leaves_dead_channels_out(tmp_path, inspect_findings):
    # the dead channel's relative change would be 97%, of an output that is its beta anyway
    path = bn_model(tmp_path / "m.onnx", channels=4, epsilon=1e-8, var=[1e-44, 1e-4, 1.0, 2.0])
    [finding] = inspect_findings(path, "BN004")
    assert finding.severity.label == "warning" and finding.evidence["kind"] == "below-clamp"
    expected = 1 - np.sqrt((1e-4 + 1e-8) / (1e-4 + 1.001e-5))
    assert abs(finding.evidence["max_relative_change"] - expected) < 1e-4


def test_epsilon_zero_with_a_zero_variance_channel_is_an_error(tmp_path, inspect_findings):
    [finding] = inspect_findings(bn_model(tmp_path / "m.onnx", epsilon=0.0, var=[0.0, 1.0, 2.0]), "BN004")
    assert finding.severity.label == "error"
    assert finding.evidence["zero_variance_channels"] == 1


def test_epsilon_zero_without_zero_variance_is_a_warning(tmp_path, inspect_findings):
    [finding] = inspect_findings(bn_model(tmp_path / "m.onnx", epsilon=0.0, var=[0.5, 1.0, 2.0]), "BN004")
    assert finding.severity.label == "warning"


def test_epsilon_dominating_small_variances_is_info_with_channels_and_factor(tmp_path, inspect_findings):
    path = bn_model(tmp_path / "m.onnx", epsilon=1e-3, var=[1e-3, 0.5, 1.0])
    [finding] = inspect_findings(path, "BN004")
    assert finding.severity.label == "info"
    assert finding.evidence["kind"] == "dominates"
    assert finding.evidence["channels"] == 1
    assert abs(finding.evidence["worst_factor"] - np.sqrt(0.5)) < 1e-4
    assert "not a train/inference mismatch" in finding.message


def test_epsilon_a_tenth_of_the_variance_damps_by_five_percent_and_is_not_reported(tmp_path, inspect_findings):
    path = bn_model(tmp_path / "m.onnx", epsilon=1e-5, var=[1e-4, 0.5, 1.0])
    assert inspect_findings(path, "BN004") == []


def test_trained_like_model_with_dead_channels_gets_no_epsilon_finding(tmp_path, inspect_findings):
    # as in trained models shipped in public packages: a channel whose variance decayed to a float32
    # denormal, and one whose filter was switched off (gamma ~ 0) with a variance below epsilon
    path = bn_model(
        tmp_path / "m.onnx", channels=4, epsilon=1e-5, var=[1e-44, 4e-6, 0.7, 1.3], scale=[1.0, 1e-9, 0.9, 1.1]
    )
    assert inspect_findings(path, "BN004") == []


def test_a_live_channel_next_to_dead_ones_is_still_reported_and_the_dead_ones_counted(tmp_path, inspect_findings):
    path = bn_model(
        tmp_path / "m.onnx", channels=4, epsilon=1e-3, var=[1e-44, 5e-4, 0.7, 1.3], scale=[1.0, 1.0, 0.9, 1.1]
    )
    [finding] = inspect_findings(path, "BN004")
    assert finding.severity.label == "info"
    assert (finding.evidence["channels"], finding.evidence["dead_channels"]) == (1, 1)
    assert abs(finding.evidence["worst_factor"] - np.sqrt(5e-4 / 1.5e-3)) < 1e-4


def test_layernorm_epsilon_below_clamp_is_not_a_batch_norm_clamp_issue(tmp_path, inspect_findings):
    assert inspect_findings(layernorm_model(tmp_path / "m.onnx", epsilon=1e-6), "BN004") == []


def test_dominated_dead_channels_are_counted_apart_from_the_live_ones(tmp_path, inspect_findings):
    # "9 dead channel(s) left out" read as a contradiction beside BN003's count of silent channels, taken over
    # every channel: these are the epsilon-dominated channels that are dead, beside the live ones reported
    path = bn_model(tmp_path / "m.onnx", channels=4, epsilon=1e-3, var=[1e-44, 1e-4, 1.0, 2.0])
    [finding] = inspect_findings(path, "BN004")
    assert finding.evidence["channels"] == 1 and finding.evidence["dead_channels"] == 1
    assert "in 1 of 4 channels" in finding.message
    assert finding.message.endswith("; 1 more where the channel is dead, left out")


def test_a_negative_epsilon_is_an_error(tmp_path, inspect_findings):
    """paddle2onnx 2.1 wrote -9.87e27 for a GroupNorm's 1e-5: the square root of a negative number."""
    (finding,) = inspect_findings(fed_instancenorm_model(tmp_path / "m.onnx", epsilon=-1e-3), "BN004")
    assert finding.severity.label == "error" and finding.evidence["kind"] == "negative"
    assert "negative" in finding.message


def test_epsilon_above_the_measured_set_variance_of_an_instance_norm_is_info(tmp_path, probe_findings):
    """Sets of variance 0.0025 (x * 0.05) under epsilon 2: info with the measured variance and the damping
    factor sqrt(var / (var + eps)); the same layer with epsilon 1e-5 has no BN004 finding."""
    (finding,) = probe_findings(fed_instancenorm_model(tmp_path / "big.onnx", epsilon=2.0, feed="scaled"), "BN004")
    assert finding.severity.label == "info" and finding.evidence["kind"] == "dominates-measured"
    variance = finding.evidence["median_set_variance"]
    assert 0.0015 < variance < 0.0035
    assert finding.evidence["factor"] == pytest.approx(np.sqrt(variance / (variance + 2.0)), rel=1e-6)
    assert probe_findings(fed_instancenorm_model(tmp_path / "ok.onnx", epsilon=1e-5, feed="scaled"), "BN004") == []


def test_a_train_mode_batch_norm_gets_no_measured_variance_info(tmp_path, probe_findings):
    """A batch norm computing its statistics normalizes per channel: channels dead in a trained model make up
    the median of tiny variances (layout_cdla's twin), so the measured-variance info is for instance and
    group norms only: a BN in training mode with epsilon 1e3 on inputs of variance 1 gets none."""
    model = bn_model(tmp_path / "m.onnx", hw=(8, 8), epsilon=1e3, training=True)
    assert [f.evidence["kind"] for f in probe_findings(model, "BN004")] == []
