"""BN002 train-mode: static flags and measured batch dependence."""

from __future__ import annotations

import pytest

from bncheck import engine
from bncheck.backends import ProbeSettings
from bncheck.verdicts import COMPANION_TOLERANCE, OUTPUT_DEPENDENCE_TOLERANCE
from tests.builders import (
    batch_centering_model,
    bn_model,
    cancellation_model,
    dynamic_quant_model,
    layernorm_model,
    moments_model,
)


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


@pytest.mark.parametrize("axes_as_input", [False, True])
def test_batch_centering_without_a_norm_op_is_located_at_the_reduce_mean(tmp_path, axes_as_input):
    path = batch_centering_model(tmp_path / "m.onnx", axes_as_input=axes_as_input)
    report = engine.probe(path, ProbeSettings(batch_sizes=(1, 2, 8)))
    [finding] = [f for f in report.findings if f.code == "BN002"]
    assert finding.severity.label == "error"
    assert finding.layer == "batch_mean"
    assert finding.evidence["kind"] == "batch-dependence"
    assert finding.evidence["op_type"] == "ReduceMean" and finding.evidence["axes"] == [0]
    assert finding.evidence["tensor"] == "m" and finding.evidence["tensor_change"] > 0.1
    # one step of 2 runs, at the cut after the ReduceMean (node 3 of 5): no step compares the model's outputs
    # again, which the probe's companion run already found moving
    assert finding.evidence["located_runs"] == 2
    assert "ReduceMean over axes [0]" in finding.message
    assert report.probes[0].companion_change > COMPANION_TOLERANCE
    outputs = finding.evidence["output_effect"]["outputs"]["logits"]
    assert outputs["8"]["shift_sd"] > 0.1 and outputs["8"]["samples"] == 8
    assert outputs["8"]["top1_agreement"] < 1.0


def test_a_batch_dependence_that_starts_at_the_last_node_is_located_there(tmp_path):
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(2).normal(size=(4, 6)).astype(np.float32), "w")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Softmax", ["r"], ["y"], name="batch_softmax", axis=0),  # over the samples
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 6])],
        [w],
    )
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    [probe] = engine.probe(str(path), ProbeSettings(batch_sizes=(1, 2))).probes
    assert probe.located is not None
    assert (probe.located.node, probe.located.op_type, probe.located.tensor) == ("batch_softmax", "Softmax", "y")


def test_localisation_runs_in_the_smallest_batch_that_moves_the_outputs(tmp_path):
    report = engine.probe(batch_centering_model(tmp_path / "m.onnx"), ProbeSettings(batch_sizes=(1, 8, 2)))
    [probe] = report.probes
    assert probe.located is not None and probe.located.node == "batch_mean"
    assert probe.located.batch_size == 2  # not 8: the batch-2 run already shows the dependence


def test_clean_model_outputs_do_not_move_with_the_batch(tmp_path):
    report = engine.probe(bn_model(tmp_path / "m.onnx"), ProbeSettings(batch_sizes=(1, 2, 8)))
    [probe] = report.probes
    assert [f for f in report.findings if f.code == "BN002"] == []
    per_size = probe.output_dependence["y"]
    assert sorted(per_size) == [2, 8]
    assert all(c.shift < 1e-6 and c.samples == 4 for c in per_size.values())
    assert probe.located is None and probe.companion_change is None  # no extra run when clean
    assert not any("more sample(s) run alone" in note for note in probe.notes)


def test_train_mode_finding_carries_the_effect_on_the_outputs(tmp_path):
    path = bn_model(tmp_path / "m.onnx", training=True, channels=4, hw=(2, 2))
    report = engine.probe(path, ProbeSettings(batch_sizes=(1, 2, 8)))
    [finding] = [f for f in report.findings if f.code == "BN002"]
    effect = finding.evidence["output_effect"]
    by_size = effect["outputs"]["y"]
    # batch 1 on 2x2 maps normalizes each sample by its own statistics: against batch 8 it moves ~1 sd
    assert 0.2 < by_size["8"]["shift_sd"] < 5 and by_size["8"]["samples"] == 8
    assert 0.05 < by_size["2"]["shift_sd"] < 5 and by_size["2"]["samples"] == 4
    assert by_size["8"]["top1_agreement"] is None  # rank 4: not class scores
    assert effect["summary"].startswith("y move ")


def test_float32_rounding_between_batch_sizes_is_not_a_batch_dependence(tmp_path):
    # ReduceSum adds in another order at batch 1 than in a batch, and E[h^2] - E[h]^2 amplifies it
    report = engine.probe(cancellation_model(tmp_path / "m.onnx"), ProbeSettings())
    [probe] = report.probes
    worst = max(c.max_shift for c in probe.output_dependence["y"].values())
    assert worst > OUTPUT_DEPENDENCE_TOLERANCE  # alone vs in a batch: the outputs do differ
    assert probe.companion_change == 0.0  # same size, other companions: bit-identical
    assert [f for f in report.findings if f.code == "BN002"] == [] and probe.located is None
    assert any("not a batch dependence" in note for note in probe.notes)


def test_large_outputs_are_compared_on_a_regular_subset(tmp_path):
    # 4 x 160 x 160 = 102400 elements per sample: kept as every 2nd element (OUTPUT_ELEMENTS = 65536)
    path = bn_model(tmp_path / "m.onnx", training=True, channels=4, hw=(160, 160))
    report = engine.probe(path, ProbeSettings(batch_sizes=(1, 2, 8)))
    [finding] = [f for f in report.findings if f.code == "BN002"]
    by_size = finding.evidence["output_effect"]["outputs"]["y"]
    # 25600 positions per channel and sample: a sample's own moments are close to the batch's, so the move
    # is small but real (the companion run confirms it)
    assert OUTPUT_DEPENDENCE_TOLERANCE < by_size["8"]["shift_sd"] < 0.5 and by_size["8"]["samples"] == 8
    assert report.probes[0].companion_change > COMPANION_TOLERANCE


def test_dynamic_quantization_behind_a_transpose_is_located_at_the_quantizer(tmp_path):
    """The samples sit on axis 1 after the Transpose: the locator compares each tensor along the axis that
    holds them, so the Transpose (which moves them) is not taken for the op that mixes them."""
    report = engine.probe(dynamic_quant_model(tmp_path / "m.onnx"), ProbeSettings(batch_sizes=(1, 2, 8)))
    [finding] = [f for f in report.findings if f.code == "BN002"]
    assert finding.layer == "quantize"
    assert finding.evidence["op_type"] == "DynamicQuantizeLinear"
    assert "dynamic quantization" in finding.message
    assert "static quantization" in finding.hint


def test_a_dependence_in_a_time_major_output_is_measured_on_its_samples_axis(tmp_path):
    """A CTC head's [T, N, C]: the output test compares each sample's slice on axis 1 (it skipped such outputs,
    so a dynamically quantized OCR model passed as batch-invariant)."""
    path = dynamic_quant_model(tmp_path / "m.onnx", time_major_output=True)
    report = engine.probe(path, ProbeSettings(batch_sizes=(1, 2, 8)))
    [finding] = [f for f in report.findings if f.code == "BN002"]
    assert finding.severity.label == "error"
    assert finding.evidence["op_type"] == "DynamicQuantizeLinear"
    [probe] = report.probes
    assert set(probe.output_dependence["y"]) == {2, 8}


def test_a_dependence_measured_on_the_relaxed_copy_of_a_batch_of_one_file_is_a_warning(tmp_path):
    path = dynamic_quant_model(tmp_path / "m.onnx", batch=1)
    report = engine.probe(path, ProbeSettings(batch_sizes=(1, 2)))
    [finding] = [f for f in report.findings if f.code == "BN002"]
    assert finding.severity.label == "warning"
    assert finding.evidence["file_batch_size"] == 1
    assert "as shipped a sample never has companions" in finding.message
    assert report.exit_code == 0
