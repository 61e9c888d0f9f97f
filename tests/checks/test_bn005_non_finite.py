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


def _folded_model(path, nan: bool) -> str:
    """x[N, 3, 8, 8] -> Conv (a BN folded into it, as onnxsim, tf2onnx and torch's default export fold them;
    ``nan``: its NaN variance carried into one filter's weights) -> Relu -> GlobalAveragePool -> y[N, 4, 1, 1]:
    no normalization layer left."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
    if nan:
        weights[2] = np.nan
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["y"], name="gap"),
    ]
    graph = helper.make_graph(
        nodes,
        "folded",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 1, 1])],
        [numpy_helper.from_array(weights, "w")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return str(path)


def _nan_from_the_data_model(path) -> str:
    """x[N, 3, 8, 8] -> sqrt(-|x| - 1) -> GlobalAveragePool -> y[N, 3, 1, 1]: every output NaN, no weight to read
    and no normalization layer."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("Abs", ["x"], ["a"], name="abs"),
        helper.make_node("Neg", ["a"], ["n"], name="neg"),
        helper.make_node("Sub", ["n", "one"], ["m"], name="minus_one"),
        helper.make_node("Sqrt", ["m"], ["s"], name="sqrt"),
        helper.make_node("GlobalAveragePool", ["s"], ["y"], name="gap"),
    ]
    graph = helper.make_graph(
        nodes,
        "nan_from_data",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 1, 1])],
        [numpy_helper.from_array(np.ones(1, np.float32), "one")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return str(path)


def test_outputs_nan_in_every_sample_without_a_layer_to_blame_are_reported(tmp_path, probe_findings):
    """Every output NaN, no norm layer and no weight holding NaN: a warning on synthetic inputs (their values could
    be the cause), an error on the data."""
    import numpy as np

    model = _nan_from_the_data_model(tmp_path / "m.onnx")
    [synthetic] = probe_findings(model, "BN005")
    assert (synthetic.layer, synthetic.severity.label, synthetic.evidence["kind"]) == ("y", "warning", "outputs")
    assert "no normalization layer left" in synthetic.message
    data = tmp_path / "d.npy"
    np.save(data, np.random.default_rng(1).uniform(0, 1, (16, 3, 8, 8)).astype(np.float32))
    [measured] = probe_findings(model, "BN005", data_path=str(data), data_source=str(data), data=_load(str(data)))
    assert (measured.layer, measured.severity.label, measured.evidence["samples"]) == ("y", "error", 8)


def test_a_nan_folded_into_a_convolution_is_found_in_its_weights(tmp_path, probe_findings):
    """A BN's NaN variance folded into the convolution before it: an error on that convolution's weights (it
    was a warning on the outputs with synthetic inputs, blaming no op); none on the same model without the NaN."""
    model = _folded_model(tmp_path / "m.onnx", nan=True)
    [finding] = probe_findings(model, "BN005")
    assert (finding.layer, finding.severity.label, finding.evidence["kind"]) == ("conv", "error", "weights")
    assert finding.evidence["weights"] == {"w": {"nan": 27, "inf": 0, "values": 108}}
    assert probe_findings(_folded_model(tmp_path / "ok.onnx", nan=False), "BN005") == []


def _load(path: str):
    import numpy as np

    return {"x": np.load(path)}
