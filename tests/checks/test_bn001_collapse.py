"""BN001 collapse: static prediction from axes and shapes; observation in probe batches."""

from __future__ import annotations

import pytest

from tests.builders import bn_model, fed_instancenorm_model, instancenorm_model, layernorm_model


def test_train_mode_bn_on_1x1_maps_is_predicted_to_collapse_at_batch_size_1(tmp_path, inspect_findings):
    path = bn_model(tmp_path / "m.onnx", hw=(1, 1), training=True)
    [finding] = inspect_findings(path, "BN001")
    assert finding.severity.label == "error"
    assert finding.layer == "bn"
    assert finding.evidence["kind"] == "static"
    assert finding.evidence["condition"] == {"batch_size": 1}
    assert "batch size 1" in finding.message


def test_train_mode_bn_on_2x2_maps_does_not_collapse(tmp_path, inspect_findings):
    assert inspect_findings(bn_model(tmp_path / "m.onnx", hw=(2, 2), training=True), "BN001") == []


def test_inference_bn_on_1x1_maps_does_not_collapse(tmp_path, inspect_findings):
    assert inspect_findings(bn_model(tmp_path / "m.onnx", hw=(1, 1)), "BN001") == []


def test_instancenorm_on_1x1_maps_collapses_for_every_input(tmp_path, inspect_findings):
    [finding] = inspect_findings(instancenorm_model(tmp_path / "m.onnx", hw=(1, 1)), "BN001")
    assert finding.evidence["condition"] == {}
    assert "for every input" in finding.message


def test_layernorm_over_an_axis_of_size_1_collapses(tmp_path, inspect_findings):
    [finding] = inspect_findings(layernorm_model(tmp_path / "m.onnx", shape=("N", 4, 1)), "BN001")
    assert finding.layer == "ln"


def test_layernorm_over_8_features_does_not_collapse(tmp_path, inspect_findings):
    assert inspect_findings(layernorm_model(tmp_path / "m.onnx", shape=("N", 4, 8)), "BN001") == []


def test_probe_observes_collapse_at_batch_1_only(tmp_path, probe_findings):
    path = bn_model(tmp_path / "m.onnx", hw=(1, 1), training=True, bias=[0.5, -0.25, 1.0])
    [finding] = probe_findings(path, "BN001", batch_sizes=(1, 2, 8))
    assert finding.evidence["kind"] == "observed"
    assert finding.evidence["batch_sizes"] == [1]
    assert finding.evidence["predicted"] is True


def test_probe_observes_no_collapse_on_instancenorm_4x4(tmp_path, probe_findings):
    assert probe_findings(instancenorm_model(tmp_path / "m.onnx", hw=(4, 4)), "BN001") == []


def test_a_constant_output_over_large_sets_names_the_epsilon_that_swamps_them(tmp_path, probe_findings):
    """InstanceNormalization with epsilon 1e13 (a converter's garbage) on 8x8 maps: the output is its bias at
    every batch size, but each set holds 64 elements: the message and evidence say epsilon, not one element."""
    from bncheck.checks.bn001_collapse import EPSILON_HINT

    (finding,) = probe_findings(fed_instancenorm_model(tmp_path / "m.onnx", epsilon=1e13), "BN001")
    assert finding.severity.label == "error"
    assert finding.evidence["normalized_set_size"] == 64 and finding.evidence["cause"] == "epsilon"
    assert "holds 64 elements" in finding.message and "epsilon 1e+13 swamps" in finding.message
    assert "one element" not in finding.message and finding.hint == EPSILON_HINT


def test_a_constant_output_over_sets_of_equal_values_says_so(tmp_path, probe_findings):
    """Each channel's mean broadcast back over 8x8 before an InstanceNormalization: every set holds 64 equal
    values, so the output is the bias; the cause named is equal values, not epsilon (1e-5)."""
    (finding,) = probe_findings(fed_instancenorm_model(tmp_path / "m.onnx", epsilon=1e-5, feed="broadcast"), "BN001")
    assert finding.evidence["cause"] == "equal-values" and finding.evidence["normalized_set_size"] == 64
    assert "values within each set are equal" in finding.message


@pytest.mark.parametrize("case", [{"scale": [0.0, 0.0, 0.0]}, {"epsilon": 1e10}])
def test_an_inference_batch_norm_with_a_constant_output_is_no_collapse(tmp_path, probe_findings, case):
    """gamma 0 (torchvision's zero_init_residual) or an epsilon far above the variance make an inference-mode
    batch norm's output constant, measured with --all-layers; it normalizes nothing at inference (an affine
    map per channel), so no BN001."""
    model = bn_model(tmp_path / "m.onnx", hw=(8, 8), **case)
    assert probe_findings(model, "BN001", all_layers=True) == []
