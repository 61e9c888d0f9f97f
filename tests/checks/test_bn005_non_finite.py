"""BN005 non-finite: NaN/Inf parameters, negative variances, NaN seen in probes."""

from __future__ import annotations

from tests.builders import bn_model


def test_nan_in_scale_is_an_error_naming_the_parameter(tmp_path, inspect_findings):
    [finding] = inspect_findings(bn_model(tmp_path / "m.onnx", scale=[1.0, float("nan"), 1.0]), "BN005")
    assert finding.evidence == {"kind": "parameters", "parameters": {"scale": {"nan": 1, "inf": 0}}}


def test_negative_running_variance_is_an_error(tmp_path, inspect_findings):
    [finding] = inspect_findings(bn_model(tmp_path / "m.onnx", var=[1.0, -0.5, 1.0]), "BN005")
    assert finding.evidence["kind"] == "negative-variance"
    assert finding.evidence["channels"] == 1


def test_finite_parameters_are_clean(tmp_path, inspect_findings):
    assert inspect_findings(bn_model(tmp_path / "m.onnx"), "BN005") == []


def test_probe_reports_where_nan_first_appears(tmp_path, probe_findings):
    path = bn_model(tmp_path / "m.onnx", epsilon=0.0, var=[0.0, 1.0, 1.0])
    [finding] = probe_findings(path, "BN005", batch_sizes=(1, 2))
    assert finding.evidence == {"kind": "observed", "where": "output", "batch_sizes": [1, 2]}


def test_probe_on_clean_model_sees_no_nan(tmp_path, probe_findings):
    assert probe_findings(bn_model(tmp_path / "m.onnx"), "BN005") == []
