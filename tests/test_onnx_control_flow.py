"""Norm layers inside If/Loop bodies, as torch.onnx.export writes a torch.jit.script'ed module with a loop and a
branch in its forward.

The builder below writes that file: a Conv + BatchNorm in the main graph, a Loop whose body runs a residual
Conv + BatchNorm (``bn_loop``) + Relu block twice, and an If on the input ``flag`` whose then-branch holds a
BatchNorm (``bn_if``) of the Loop's output. Like torch's exporter, the bodies read the weights from the main
graph by name, and an untrained layer's parameters, equal to another's, are read through an Identity of that
one. Each test runs the CLI on the file and asserts what the user sees.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from bncheck.cli import main

F32 = TensorProto.FLOAT
C, HW = 4, 6


def _vinfo(name: str, dims: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, F32, dims)


def control_flow_model(
    path: Path,
    *,
    loop_state: str = "trained",
    loop_training: bool = False,
    read_running_mean: bool = False,
    if_layer: str = "bn_if",
) -> str:
    """x[N, 4, 6, 6], flag -> Conv, bn0 -> Loop (2 x: h + Relu(bn_loop(Conv(h)))) -> If flag: bn_if -> y.

    ``loop_state``: bn_loop's parameters, "trained", "never" (weight 1, bias 0, mean 0, variance 1, read through
    Identity nodes of shared "ones"/"zeros" initializers, as torch stores equal tensors once), "eps0" (epsilon
    0), "nan" (a NaN running variance) or "nan_conv" (a NaN in the body's Conv weights). ``loop_training``: bn_loop exported in training mode
    (training_mode=1, its running statistics as outputs); ``read_running_mean``: the body hands that output on
    as a Loop output (read in the body); ``if_layer``: the module whose parameters the If's BatchNorm reads
    ("bn0": the main graph's module called again)."""
    rng = np.random.default_rng(0)
    inits = []
    for conv in ("conv", "conv_loop"):
        weight = rng.normal(0, 0.3, (C, C, 3, 3)).astype(np.float32)
        if conv == "conv_loop" and loop_state == "nan_conv":
            weight[0, 0, 0, 0] = np.nan  # a batch norm with a NaN variance folded into the body's Conv
        inits.append(numpy_helper.from_array(weight, f"{conv}.weight"))
        inits.append(numpy_helper.from_array(rng.normal(0, 0.1, C).astype(np.float32), f"{conv}.bias"))
    nodes = []
    for layer in ("bn0", "bn_if", "bn_loop"):
        values = {
            "weight": rng.uniform(0.5, 1.5, C),
            "bias": rng.uniform(-0.2, 0.2, C),
            "running_mean": rng.uniform(-0.2, 0.2, C),
            "running_var": rng.uniform(0.5, 1.5, C),
        }
        if layer == "bn_loop" and loop_state == "never":
            for key, shared in (
                ("weight", "ones"),
                ("bias", "zeros"),
                ("running_mean", "zeros"),
                ("running_var", "ones"),
            ):
                nodes.append(helper.make_node("Identity", [shared], [f"{layer}.{key}"], name=f"Identity_{key}"))
            inits += [
                numpy_helper.from_array(np.ones(C, np.float32), "ones"),
                numpy_helper.from_array(np.zeros(C, np.float32), "zeros"),
            ]
            continue
        if layer == "bn_loop" and loop_state == "nan":
            values["running_var"][1] = np.nan
        inits += [numpy_helper.from_array(v.astype(np.float32), f"{layer}.{k}") for k, v in values.items()]

    def bn(layer: str, x: str, y: str, name: str, **attrs) -> onnx.NodeProto:
        params = [f"{layer}.{k}" for k in ("weight", "bias", "running_mean", "running_var")]
        return helper.make_node(
            "BatchNormalization", [x, *params], [y] if isinstance(y, str) else y, name=name, **attrs
        )

    eps = 0.0 if loop_state == "eps0" else 1e-5
    loop_attrs = {"epsilon": eps, "training_mode": 1} if loop_training else {"epsilon": eps}
    loop_bn_out = ["/BatchNormalization_1_output_0", "rm", "rv"] if loop_training else "/BatchNormalization_1_output_0"
    body_outputs = [
        helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
        _vinfo("h_out", ["N", C, HW, HW]),
    ]
    if read_running_mean:
        body_outputs.append(_vinfo("rm", [C]))
    body = helper.make_graph(
        [
            helper.make_node(
                "Conv", ["h", "conv_loop.weight", "conv_loop.bias"], ["/Conv_1_output_0"], name="/Conv_1", pads=[1] * 4
            ),
            bn("bn_loop", "/Conv_1_output_0", loop_bn_out, "/BatchNormalization_1", **loop_attrs),
            helper.make_node("Relu", ["/BatchNormalization_1_output_0"], ["/Relu_1_output_0"], name="/Relu_1"),
            helper.make_node("Add", ["h", "/Relu_1_output_0"], ["h_out"], name="/Add_1"),
            helper.make_node("Identity", ["cond_in"], ["cond_out"], name="/Identity"),
        ],
        "loop_body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            _vinfo("h", ["N", C, HW, HW]),
        ],
        body_outputs,
    )
    then_branch = helper.make_graph(
        [bn(if_layer, "/Loop_output_0", "/BatchNormalization_2_output_0", "/BatchNormalization_2")],
        "then",
        [],
        [_vinfo("/BatchNormalization_2_output_0", ["N", C, HW, HW])],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Identity", ["/Loop_output_0"], ["/Identity_1_output_0"], name="/Identity_1")],
        "else",
        [],
        [_vinfo("/Identity_1_output_0", ["N", C, HW, HW])],
    )
    inits += [
        numpy_helper.from_array(np.array(2, np.int64), "trips"),
        numpy_helper.from_array(np.array(True), "true"),
    ]
    loop_outputs = ["/Loop_output_0", "/Loop_output_1"] if read_running_mean else ["/Loop_output_0"]
    nodes += [
        helper.make_node("Conv", ["x", "conv.weight", "conv.bias"], ["/Conv_output_0"], name="/Conv", pads=[1] * 4),
        bn("bn0", "/Conv_output_0", "/BatchNormalization_output_0", "/BatchNormalization"),
        helper.make_node(
            "Loop", ["trips", "true", "/BatchNormalization_output_0"], loop_outputs, name="/Loop", body=body
        ),
        helper.make_node(
            "If", ["flag"], ["/If_output_0"], name="/If", then_branch=then_branch, else_branch=else_branch
        ),
        helper.make_node("GlobalAveragePool", ["/If_output_0"], ["/pool"], name="/GlobalAveragePool"),
        helper.make_node("Flatten", ["/pool"], ["y"], name="/Flatten"),
    ]
    graph = helper.make_graph(
        nodes,
        "scripted",
        [_vinfo("x", ["N", C, HW, HW]), helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [_vinfo("y", ["N", C])],
        initializer=inits,
    )
    return _save(graph, path, 15, "pytorch")


def _save(graph: onnx.GraphProto, path: Path, opset: int, producer: str) -> str:
    """The model of ``graph`` at ``opset``, IR 8, checked by onnx.checker, written to ``path``."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name=producer)
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return str(path)


def _run(*args: str) -> tuple[int, dict]:
    result = CliRunner().invoke(main, [*args, "--format", "json"])
    return result.exit_code, json.loads(result.output)


def _findings(document: dict) -> list[tuple[str, str, str]]:
    return [(f["code"], f["severity"], f["layer"]) for f in document["findings"]]


def test_a_never_updated_batch_norm_inside_a_loop_body_is_a_bn003_error(tmp_path):
    """Its parameters, read through the main graph's Identity nodes of shared initializers, are 0/1 exactly:
    BN003 on bn_loop, named as the module, and no warning that something was left uninspected."""
    code, document = _run("inspect", control_flow_model(tmp_path / "m.onnx", loop_state="never"))
    assert code == 1
    assert _findings(document) == [("BN003", "error", "bn_loop")]
    assert [layer["name"] for layer in document["layers"]] == ["bn0", "bn_loop", "bn_if"]
    loop_layer = document["layers"][1]
    assert any("inside Loop '/Loop'" in note for note in loop_layer["notes"])
    assert not [note for note in document["notes"] if note["level"] == "warning"]


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        ("eps0", [("BN004", "warning", "bn_loop")]),
        ("nan", [("BN005", "error", "bn_loop")]),
        ("nan_conv", [("BN005", "error", "conv_loop")]),
    ],
)
def test_epsilon_zero_and_nan_parameters_inside_a_loop_body_are_found(tmp_path, state, expected):
    _, document = _run("inspect", control_flow_model(tmp_path / "m.onnx", loop_state=state))
    assert _findings(document) == expected


def test_a_trained_model_with_norms_in_its_bodies_passes(tmp_path):
    code, document = _run("inspect", control_flow_model(tmp_path / "m.onnx"))
    assert code == 0 and document["findings"] == []
    assert [layer["name"] for layer in document["layers"]] == ["bn0", "bn_loop", "bn_if"]


def test_probe_puts_bn002_on_the_train_mode_layer_inside_the_loop_and_measures_what_the_main_graph_holds(tmp_path):
    """The output-level test finds the outputs batch-dependent; the static BN002 on bn_loop explains it (no
    BN002 placed on the Loop or the If). bn_loop's tensors live in the body: not measured, with the reason;
    bn_if reads the Loop's output from the main graph, which the probe measures."""
    code, document = _run(
        "probe", control_flow_model(tmp_path / "m.onnx", loop_training=True), "--all-layers", "--batch-sizes", "1,2,8"
    )
    assert code == 1
    assert _findings(document) == [("BN002", "error", "bn_loop")]
    (run,) = document["probe"]["runs"]
    assert "inside Loop '/Loop', a control-flow body" in run["layers"]["bn_loop"]["not_measured"]
    assert run["layers"]["bn_if"]["by_batch_size"]["8"]["input"]["count_per_channel"] == 8 * HW * HW


def test_fix_switches_a_train_mode_batch_norm_inside_a_loop_to_its_stored_statistics(tmp_path):
    """The written model computes what the same model exported in inference mode computes, alone or in a batch."""
    src = control_flow_model(tmp_path / "train.onnx", loop_training=True)
    eval_model = control_flow_model(tmp_path / "eval.onnx")
    fixed = str(tmp_path / "fixed.onnx")
    code, document = _run("fix", src, "-o", fixed)
    assert code == 0, document
    (entry,) = [e for e in document["fix"]["layers"] if e["layer"] == "bn_loop"]
    assert entry["action"] == "to-inference"
    x = np.random.default_rng(1).normal(size=(5, C, HW, HW)).astype(np.float32)
    feeds = {"x": x, "flag": np.array(True)}
    want = ort.InferenceSession(eval_model, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    session = ort.InferenceSession(fixed, providers=["CPUExecutionProvider"])
    got = session.run(None, feeds)[0]
    alone = np.concatenate([session.run(None, {"x": x[i : i + 1], "flag": np.array(True)})[0] for i in range(5)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(alone, got, rtol=1e-5, atol=1e-6)


def test_fix_leaves_a_body_batch_norm_whose_running_mean_output_the_body_hands_on(tmp_path):
    src = control_flow_model(tmp_path / "train.onnx", loop_training=True, read_running_mean=True)
    code, document = _run("fix", src, "-o", str(tmp_path / "fixed.onnx"))
    assert code == 1
    (entry,) = [e for e in document["fix"]["layers"] if e["layer"] == "bn_loop"]
    assert entry["action"] == "not-fixed" and "'rm' is read in the body" in entry["reason"]


def test_a_module_called_in_the_main_graph_and_in_a_body_is_named_apart(tmp_path):
    _, document = _run("inspect", control_flow_model(tmp_path / "m.onnx", if_layer="bn0"))
    assert [layer["name"] for layer in document["layers"]] == ["bn0", "bn_loop", "bn0#2"]


def test_a_nan_variance_inside_a_loop_body_is_the_one_bn005_of_a_probe(tmp_path):
    """The NaN it puts into the Loop's output reaches bn_if's input, which the probe measures: bn_loop, unmeasured
    but first in graph order, is where it starts, not bn_if."""
    code, document = _run("probe", control_flow_model(tmp_path / "m.onnx", loop_state="nan"), "--all-layers")
    assert code == 1
    assert _findings(document) == [("BN005", "error", "bn_loop")]


def tf_while_model(path: Path, *, never_trained: bool) -> str:
    """A Keras BatchNormalization called inside tf.while_loop, as tf2onnx writes it: a Loop whose body computes
    tf.nn.batch_normalization's x * k + (beta - mean * k), k = gamma / sqrt(var + eps), from the layer's
    variables, which the Loop carries from the main graph's initializers and passes on unchanged (an
    Identity each iteration). NHWC maps of 8 channels."""
    rng = np.random.default_rng(3)
    c = 8
    stats = {
        "gamma": np.ones(c) if never_trained else rng.uniform(0.5, 1.5, c),
        "beta": np.zeros(c) if never_trained else rng.uniform(-0.2, 0.2, c),
        "mean": np.zeros(c) if never_trained else rng.uniform(-0.2, 0.2, c),
        "var": np.ones(c) if never_trained else rng.uniform(0.5, 1.5, c),
    }
    carried = [f"while_bn_loop_1_{k}_readvariableop_resource_0:0" for k in stats]
    b = "while/bn_loop_1/batchnorm/"
    body = helper.make_graph(
        [
            helper.make_node("Add", [carried[3], "eps"], ["ve"], name=b + "add"),
            helper.make_node("Sqrt", ["ve"], ["std"], name=b + "Rsqrt"),
            helper.make_node("Reciprocal", ["std"], ["inv"], name=b + "Rsqrt__27"),
            helper.make_node("Mul", ["inv", carried[0]], ["k"], name=b + "mul"),
            helper.make_node("Mul", [carried[2], "k"], ["mk"], name=b + "mul_2"),
            helper.make_node("Sub", [carried[1], "mk"], ["shift"], name=b + "sub"),
            helper.make_node("Mul", ["h", "k"], ["hk"], name=b + "mul_1"),
            helper.make_node("Add", ["hk", "shift"], ["h_out"], name=b + "add_1"),
            helper.make_node("Identity", ["cond_in"], ["cond_out"], name="while/Identity"),
            *[
                helper.make_node("Identity", [v], [v + "_next"], name=f"while/Identity_{i}")
                for i, v in enumerate(carried)
            ],
        ],
        "while_body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            _vinfo("h", ["N", 6, 6, c]),
            *[_vinfo(v, [c]) for v in carried],
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            _vinfo("h_out", ["N", 6, 6, c]),
            *[_vinfo(v + "_next", [c]) for v in carried],
        ],
        initializer=[numpy_helper.from_array(np.float32(1e-3), "eps")],
    )
    inits = [numpy_helper.from_array(v.astype(np.float32), f"bn_loop/{k}:0") for k, v in stats.items()]
    inits += [numpy_helper.from_array(np.array(2, np.int64), "trips"), numpy_helper.from_array(np.array(True), "true")]
    loop_out = ["while_loop:1", *[f"while_loop:{i + 2}" for i in range(4)]]
    graph = helper.make_graph(
        [
            helper.make_node(
                "Loop",
                ["trips", "true", "x", *[f"bn_loop/{k}:0" for k in stats]],
                loop_out,
                name="while_loop",
                body=body,
            ),
            helper.make_node("ReduceMean", ["while_loop:1"], ["y"], name="Mean", axes=[1, 2], keepdims=0),
        ],
        "tf_function",
        [_vinfo("x", ["N", 6, 6, c])],
        [_vinfo("y", ["N", c])],
        initializer=inits,
    )
    return _save(graph, path, 17, "tf2onnx")


@pytest.mark.parametrize("never_trained", [True, False])
def test_a_batch_norm_written_out_in_a_tf_while_loop_is_read_from_the_variables_the_loop_carries(
    tmp_path, never_trained
):
    path = tf_while_model(tmp_path / "m.onnx", never_trained=never_trained)
    x = np.random.default_rng(4).normal(size=(2, 6, 6, 8)).astype(np.float32)
    ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})  # a model onnxruntime runs
    code, document = _run("inspect", path)
    (layer,) = document["layers"]
    assert layer["name"] == "while/bn_loop_1" and layer["channels"] == 8 and layer["epsilon"] == pytest.approx(1e-3)
    assert _findings(document) == ([("BN003", "error", "while/bn_loop_1")] if never_trained else [])
    assert code == (1 if never_trained else 0)


def test_a_norm_of_a_constant_inside_a_branch_is_no_layer(tmp_path):
    """As in the main graph (timm's weight standardization): a LayerNormalization of a stored weight inside an
    If branch depends on no sample."""
    w = numpy_helper.from_array(np.random.default_rng(5).normal(size=(4, 6)).astype(np.float32), "w")
    then_branch = helper.make_graph(
        [
            helper.make_node("LayerNormalization", ["w", "g", "b"], ["w_std"], name="/std/LayerNormalization"),
            helper.make_node("MatMul", ["x", "w_std"], ["y_then"], name="/MatMul"),
        ],
        "then",
        [],
        [_vinfo("y_then", ["N", 6])],
    )
    else_branch = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y_else"], name="/MatMul_1")], "else", [], [_vinfo("y_else", ["N", 6])]
    )
    graph = helper.make_graph(
        [helper.make_node("If", ["flag"], ["y"], name="/If", then_branch=then_branch, else_branch=else_branch)],
        "g",
        [_vinfo("x", ["N", 4]), helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [_vinfo("y", ["N", 6])],
        initializer=[
            w,
            numpy_helper.from_array(np.ones(6, np.float32), "g"),
            numpy_helper.from_array(np.zeros(6, np.float32), "b"),
        ],
    )
    path = _save(graph, tmp_path / "m.onnx", 17, "")
    x = np.ones((2, 4), np.float32)
    ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x, "flag": np.array(True)})
    code, document = _run("inspect", path)
    assert code == 0 and document["layers"] == [] and document["findings"] == []
