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
    # it has no moving statistics: the batch norm's "run it in inference mode" would change nothing
    assert "inference mode" not in finding.hint and "more than one value" in finding.hint


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


def _collapse_then_instance_norm(path) -> str:
    """x [N, 4, 3, 3] -> GlobalAveragePool -> BatchNormalization "bn" in training mode (beta 0.01: its output at
    batch size 1) -> (b - 0.01) * a [1, 4, 2, 2] pattern + 0.01 + 3e-7 steps (an upsampling of b, with the
    rounding such a map carries: 3e-5 of its values) -> InstanceNormalization "inorm" -> y: at batch size 1
    "bn"'s sets have one element and "inorm"'s four values are equal up to that rounding; at larger batches
    the pattern spreads them."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    values = {
        "bn.scale": np.full(4, 1.5),
        "bn.bias": np.full(4, 0.01),
        "bn.mean": np.zeros(4),
        "bn.var": np.ones(4),
        "beta": np.full((1, 4, 1, 1), 0.01),
        "pattern": np.tile([1.0, -1.0, 2.0, 0.5], 4).reshape(1, 4, 2, 2),
        "offset": 0.01 + 3e-7 * np.arange(16).reshape(1, 4, 2, 2),
        "inorm.scale": np.ones(4),
        "inorm.bias": np.full(4, 0.5),
    }
    inits = [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in values.items()]
    nodes = [
        helper.make_node("GlobalAveragePool", ["x"], ["p"], name="pool"),
        helper.make_node(
            "BatchNormalization", ["p", "bn.scale", "bn.bias", "bn.mean", "bn.var"], ["b"], training_mode=1, name="bn"
        ),
        helper.make_node("Sub", ["b", "beta"], ["centred"], name="centred"),
        helper.make_node("Mul", ["centred", "pattern"], ["spread"], name="spread"),
        helper.make_node("Add", ["spread", "offset"], ["up"], name="up"),
        helper.make_node("InstanceNormalization", ["up", "inorm.scale", "inorm.bias"], ["y"], name="inorm"),
    ]
    graph = helper.make_graph(
        nodes,
        "cascade",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 2, 2])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)]), path)
    return str(path)


def test_a_norm_of_the_equal_values_a_collapse_upstream_makes_is_an_info_naming_it(tmp_path, probe_findings):
    # MONAI's UNet exported in training mode: the layer after two collapsed 1x1x1 ones got an error of its own,
    # its cause "epsilon 1e-05 swamps the sets' variance (median 2.62e-14)": the rounding of equal values
    findings = {f.layer: f for f in probe_findings(_collapse_then_instance_norm(tmp_path / "m.onnx"), "BN001")}
    assert findings["bn"].severity.label == "error" and findings["bn"].evidence["normalized_set_size"] == 1
    after = findings["inorm"]
    assert after.severity.label == "info" and after.evidence["cause"] == "equal-values"
    assert after.evidence["after_collapse_of"] == "bn" and "the collapse of 'bn' before it" in after.message


def test_a_train_mode_bn_on_1x1_maps_in_a_file_fixed_to_batch_2_is_an_info_of_inspect(tmp_path, inspect_findings):
    # torch's export without dynamic axes writes the batch into every shape: the set of 2 at the file's batch was
    # no finding, where the README promises an info (and probe, relaxing the batch, measured one)
    import onnx

    path = bn_model(tmp_path / "m.onnx", hw=(1, 1), training=True)
    model = onnx.load(path)
    for value in (*model.graph.input, model.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_value = 2
    onnx.save(model, path)
    [finding] = inspect_findings(path, "BN001")
    assert finding.severity.label == "info" and finding.evidence["file_batch_size"] == 2
    assert finding.evidence["condition"] == {"batch_size": 1} and "fixed to 2" in finding.message
