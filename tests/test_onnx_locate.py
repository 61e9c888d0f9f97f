"""Which axis of a tensor holds the samples: the locator's (read off the run of copies) and the output test's
(the axis that follows the batch against a run of one sample); the graph each localisation step runs."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from bncheck.backends.onnx.locate import copies_axis, prefix, relative_change, tensor_change
from bncheck.probe_plan import sample_axis as output_sample_axis
from tests.builders import plain_session


def _runs(axis: int, batch: int = 4, row: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """A per-sample tensor [batch, 5, 3] moved so that its samples sit on ``axis``: one run with four
    different samples, one whose samples are all copies of the one at ``row``."""
    rng = np.random.default_rng(0)
    samples = rng.normal(size=(batch, 5, 3)).astype(np.float32)
    copies = np.repeat(samples[row : row + 1], batch, axis=0)
    return np.moveaxis(samples, 0, axis), np.moveaxis(copies, 0, axis)


def test_the_samples_axis_is_found_wherever_a_transpose_put_it():
    for axis in (0, 1, 2):
        _, copies = _runs(axis)
        assert copies_axis(copies, 4) == axis


def test_a_tensor_that_moved_its_samples_is_not_taken_for_a_batch_dependence():
    # the same sample at the same row in both runs: its slice is the same, whatever its companions
    batch, copies = _runs(axis=1)
    assert tensor_change(batch, copies, row=1, batch=4) == 0.0


def test_a_tensor_without_an_axis_per_sample_is_compared_whole():
    # a statistic over the batch (here the max of the whole tensor): no axis of the batch's size
    batch, copies = _runs(axis=0)
    assert copies_axis(np.max(copies, keepdims=True), 4) is None
    assert tensor_change(np.max(batch, keepdims=True), np.max(copies, keepdims=True), row=1, batch=4) > 0


def test_a_batch_merged_with_heads_into_axis_0_compares_the_samples_rows_only():
    # multi-head attention's Reshape [B, H, T, D] -> [B * H, T, D]: the sample's H rows are the same whatever its
    # companions; compared whole, the companions' own rows counted as its movement (livekit's turn detector)
    batch, copies = _runs(axis=0)
    merged_batch, merged_copies = batch.reshape(4 * 5, 3), copies.reshape(4 * 5, 3)
    assert copies_axis(merged_copies, 4) is None
    assert tensor_change(merged_batch, merged_copies, row=1, batch=4) == 0.0
    moved = merged_batch.copy()
    moved[5:10] += 1.0  # the rows of the sample at row 1
    assert tensor_change(moved, merged_copies, row=1, batch=4) > 0


def test_a_dynamic_quantizer_after_a_merge_of_the_batch_is_located_there_not_at_the_merge(tmp_path):
    from bncheck import engine
    from bncheck.backends import ProbeSettings

    inits = [
        helper.make_tensor("rows", TensorProto.INT64, [2], [-1, 3]),
        helper.make_tensor("back", TensorProto.INT64, [3], [-1, 2, 3]),
    ]
    nodes = [
        helper.make_node("Reshape", ["x", "rows"], ["heads"], name="merge_heads"),
        helper.make_node("DynamicQuantizeLinear", ["heads"], ["q", "qs", "qz"], name="quantize"),
        helper.make_node("DequantizeLinear", ["q", "qs", "qz"], ["dq"], name="dequantize"),
        helper.make_node("Reshape", ["dq", "back"], ["y"], name="split_heads"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 3])],
        inits,
    )
    path = str(tmp_path / "merged.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    [finding] = [f for f in engine.probe(path, ProbeSettings(batch_sizes=(1, 2, 8))).findings if f.code == "BN002"]
    assert finding.layer == "quantize" and "dynamic quantization" in finding.message


def test_a_dependence_that_only_an_if_body_reads_is_located_where_it_starts_not_at_the_if(tmp_path):
    """A softmax over the batch (the samples moved to axis 1) whose result only an If's branch reads, by name
    from the outer scope: the dependence starts at the softmax, and the If passes it on."""
    from bncheck import engine
    from bncheck.backends import ProbeSettings

    branch = helper.make_graph(
        [helper.make_node("Identity", ["mixed"], ["out"])],
        "branch",
        [],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 3])],
    )
    # per-sample work between the softmax and the If: the bisection's first cuts fall there
    side = [helper.make_node("Relu" if i % 2 else "Neg", [f"s{i}"], [f"s{i + 1}"], name=f"side{i}") for i in range(8)]
    nodes = [
        helper.make_node("Transpose", ["x"], ["samples_last"], name="to_columns", perm=[1, 0]),
        helper.make_node("Softmax", ["samples_last"], ["weights"], name="over_the_batch", axis=1),
        helper.make_node("Transpose", ["weights"], ["mixed"], name="to_rows", perm=[1, 0]),
        helper.make_node("Identity", ["x"], ["s0"], name="side_start"),
        *side,
        helper.make_node("If", ["always"], ["picked"], name="branch", then_branch=branch, else_branch=branch),
        helper.make_node("Add", ["picked", "s8"], ["y"], name="plus_side"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor("always", TensorProto.BOOL, [], [True])],
    )
    path = str(tmp_path / "branch.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    [finding] = [f for f in engine.probe(path, ProbeSettings(batch_sizes=(1, 2, 8))).findings if f.code == "BN002"]
    assert finding.layer == "over_the_batch"


def test_an_output_follows_the_batch_on_the_axis_that_is_1_alone():
    assert output_sample_axis((8, 5), (1, 5), 8) == 0
    assert output_sample_axis((32, 8, 100), (32, 1, 100), 8) == 1  # a CTC head's [T, N, C]
    assert output_sample_axis((2, 2, 100), (2, 1, 100), 2) == 1  # T happens to equal the batch
    assert output_sample_axis((5,), (5,), 8) is None  # one value per channel: not per sample
    assert output_sample_axis((8, 8), None, 8) == 0  # no run of one sample (a fixed batch): axis 0 first


def test_relative_change_is_a_fraction_of_the_reference_value():
    assert relative_change(2.0, 2.5) == 0.25
    assert relative_change(-4.0, -3.0) == 0.25
    assert relative_change(1.5, 1.5) == 0.0
    assert relative_change(0.0, 1e-9) == float("inf")


def _branching_model() -> onnx.ModelProto:
    """x -> Relu -> Neg -> Exp (output y), and x -> Abs (output z)."""
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="relu"),
        helper.make_node("Neg", ["a"], ["b"], name="neg"),
        helper.make_node("Exp", ["b"], ["y"], name="exp"),
        helper.make_node("Abs", ["x"], ["z"], name="abs"),
    ]
    value = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", 3])
    graph = helper.make_graph(nodes, "branches", [value("x")], [value("y"), value("z")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_a_localisation_step_runs_only_the_nodes_its_cut_needs_and_leaves_the_model_as_it_was():
    model = _branching_model()
    before = model.SerializeToString()
    step = prefix(model, ["b"])
    assert [node.name for node in step.graph.node] == ["relu", "neg"]
    assert [value.name for value in step.graph.output] == ["b"]
    assert model.SerializeToString() == before
    x = np.array([[-1.0, 0.5, 2.0], [3.0, -4.0, 0.0]], np.float32)
    session = plain_session(step)
    np.testing.assert_array_equal(session.run(["b"], {"x": x})[0], -np.maximum(x, 0))


def test_an_op_reading_lengths_sorted_across_the_batch_names_its_integer_input_and_where_it_was_computed(tmp_path):
    # pythainlp's thai2rom encoder: a TopK sorts the batch's lengths into an LSTM's sequence_lens; the LSTM was
    # named "while its inputs did not" move, its integer input left out of the comparison
    from bncheck import engine
    from bncheck.backends import ProbeSettings

    nodes = [
        helper.make_node("Shape", ["lengths"], ["count"], name="count"),
        helper.make_node("TopK", ["lengths", "count"], ["sorted", "order"], name="sort_lengths"),
        helper.make_node("Cast", ["sorted"], ["sorted_f"], to=TensorProto.FLOAT, name="as_float"),
        helper.make_node("Unsqueeze", ["sorted_f", "one"], ["column"], name="column"),
        helper.make_node("Mul", ["x", "column"], ["y"], name="scaled"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("lengths", TensorProto.INT64, ["N"]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor("one", TensorProto.INT64, [1], [1])],
    )
    path = str(tmp_path / "sorted_lengths.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    [finding] = [f for f in engine.probe(path, ProbeSettings(batch_sizes=(1, 2, 8))).findings if f.code == "BN002"]
    assert finding.layer == "as_float" and finding.evidence["moved_integer_inputs"] == ["sorted"]
    assert finding.evidence["integer_origin"] == "TopK 'sort_lengths'"
    assert "floating-point inputs did not; its integer input(s) 'sorted' (computed by TopK" in finding.message
    assert "Follow the integer input upstream" in finding.hint


def test_a_located_op_in_a_model_whose_inputs_are_rank_1_says_axis_0_may_be_a_sequence(tmp_path):
    # typeseg's mamba: one token sequence [T] per run, a Conv over its positions; axis 0 is taken as the batch, so
    # the Conv was named as mixing samples with nothing saying why that may not be a batch at all
    from bncheck import engine
    from bncheck.backends import ProbeSettings

    nodes = [
        helper.make_node("Unsqueeze", ["ids", "axes01"], ["row"], name="as_row"),
        helper.make_node("Conv", ["row", "kernel"], ["mixed"], pads=[1, 1], name="time_conv"),
        helper.make_node("Squeeze", ["mixed", "axes01"], ["y"], name="as_sequence"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.FLOAT, ["T"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T"])],
        [
            helper.make_tensor("axes01", TensorProto.INT64, [2], [0, 1]),
            helper.make_tensor("kernel", TensorProto.FLOAT, [1, 1, 3], [0.25, 0.5, 0.25]),
        ],
    )
    path = str(tmp_path / "sequence.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    [finding] = [f for f in engine.probe(path, ProbeSettings(batch_sizes=(1, 2, 8))).findings if f.code == "BN002"]
    assert finding.layer == "time_conv" and finding.evidence["inputs_rank_1"] is True
    assert (
        "Every input of this model that can carry a batch is rank 1" in finding.hint
        and "--ignore BN002" in finding.hint
    )
