"""BN002 train-mode: static flags and measured batch dependence."""

from __future__ import annotations

from tests.builders import bn_model, layernorm_model, moments_model


def test_training_mode_bn_is_an_error(tmp_path, inspect_findings):
    [finding] = inspect_findings(bn_model(tmp_path / "m.onnx", training=True), "BN002")
    assert finding.severity.label == "error"
    assert finding.evidence["training_flag"] is True
    assert "training mode" in finding.message


def test_inference_bn_is_not_train_mode(tmp_path, inspect_findings):
    assert inspect_findings(bn_model(tmp_path / "m.onnx"), "BN002") == []


def test_handwritten_moments_over_the_batch_axis_are_batch_statistics(tmp_path, inspect_findings):
    [finding] = inspect_findings(moments_model(tmp_path / "m.onnx", axes=(0, 2, 3)), "BN002")
    assert finding.evidence["axes"] == [0, 2, 3]
    assert "batch axis" in finding.message


def test_handwritten_moments_over_spatial_axes_are_not(tmp_path, inspect_findings):
    assert inspect_findings(moments_model(tmp_path / "m.onnx", axes=(2, 3)), "BN002") == []


def test_probe_measures_batch_dependence_of_handwritten_moments(tmp_path, probe_findings):
    [finding] = probe_findings(moments_model(tmp_path / "m.onnx", axes=(0, 2, 3)), "BN002")
    assert finding.evidence["kind"] == "batch-dependence"
    assert finding.evidence["output_change"] > 1e-2
    assert finding.evidence["input_change"] <= 1e-4


def test_probe_finds_no_batch_dependence_in_layernorm(tmp_path, probe_findings):
    assert probe_findings(layernorm_model(tmp_path / "m.onnx"), "BN002") == []


def test_probe_finds_no_batch_dependence_in_inference_bn(tmp_path, probe_findings):
    assert probe_findings(bn_model(tmp_path / "m.onnx"), "BN002") == []
