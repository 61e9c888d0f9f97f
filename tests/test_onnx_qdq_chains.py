"""Hand-written norms in models quantized by onnxruntime's quantize_static (QDQ form): a QuantizeLinear ->
DequantizeLinear pair sits between every two ops of the chain, and its epsilon, gamma and beta are read through
DequantizeLinear. The walk reads through them: the same layers, names and verdicts as the float model. Real
models made by onnxruntime.quantization, real onnxruntime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

from bncheck.cli import main


def _layer_norm_model(path: Path, width: int, module: str | None = None) -> str:
    """x[N, 4] -> MatMul -> [N, 8 / width, width] -> LayerNorm over the last axis written op by op
    (ReduceMean, Sub, Pow, ReduceMean, Add eps, Sqrt, Div, Mul ln.weight, Add ln.bias; nodes unnamed, so the
    layer is named after its weights) -> MatMul -> y[N, 3].
    ``width`` 1: the normalized set has one element, so the layer outputs ln.bias whatever x is (BN001).
    ``module``: the chain's nodes are named as the dynamo exporter names them (node_...), and its first two
    carry the module path in its metadata."""
    rng = np.random.default_rng(0)
    groups = 8 // width
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 8)).astype(np.float32), "w_in"),
        numpy_helper.from_array(np.array([-1, groups, width], np.int64), "grouped"),
        numpy_helper.from_array(np.array([2.0], np.float32), "two"),
        numpy_helper.from_array(np.array([1e-5], np.float32), "eps"),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, width).astype(np.float32), "ln.weight"),
        numpy_helper.from_array(rng.uniform(0.1, 0.4, width).astype(np.float32), "ln.bias"),
        numpy_helper.from_array(np.array([-1, 8], np.int64), "flat"),
        numpy_helper.from_array(rng.standard_normal((8, 3)).astype(np.float32), "w_out"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w_in"], ["h"], name="proj"),
        helper.make_node("Reshape", ["h", "grouped"], ["h3"], name="to_groups"),
        helper.make_node("ReduceMean", ["h3"], ["mu"], axes=[-1], keepdims=1),
        helper.make_node("Sub", ["h3", "mu"], ["dev"]),
        helper.make_node("Pow", ["dev", "two"], ["sq"]),
        helper.make_node("ReduceMean", ["sq"], ["var"], axes=[-1], keepdims=1),
        helper.make_node("Add", ["var", "eps"], ["ve"]),
        helper.make_node("Sqrt", ["ve"], ["sd"]),
        helper.make_node("Div", ["dev", "sd"], ["normalized"]),
        helper.make_node("Mul", ["normalized", "ln.weight"], ["scaled"]),
        helper.make_node("Add", ["scaled", "ln.bias"], ["ln_out"]),
        helper.make_node("Reshape", ["ln_out", "flat"], ["f"], name="to_flat"),
        helper.make_node("MatMul", ["f", "w_out"], ["y"], name="head"),
    ]
    if module is not None:
        for node in nodes[2:11]:
            node.name = f"node_{node.op_type.lower()}_{node.output[0]}"
        for node in nodes[2:4]:  # those that read the reshaped input, which quantize_static rounds in a pair
            scopes = repr(["", module, f"aten_{node.op_type.lower()}"])
            node.metadata_props.add(key="pkg.torch.onnx.name_scopes", value=scopes)
    graph = helper.make_graph(
        nodes,
        "hand_written_layer_norm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), path)
    return str(path)


class _Calibration(CalibrationDataReader):
    def __init__(self, shape: tuple[int, ...] = (1, 4)) -> None:
        rng = np.random.default_rng(1)
        self._batches = iter([{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(8)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def _quantized(source: str, path: Path) -> str:
    quantize_static(source, str(path), _Calibration(), quant_format=QuantFormat.QDQ)
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # the chain is interrupted as the test says
    return str(path)


def _report(command: str, model: str) -> tuple[int, dict]:
    result = CliRunner().invoke(main, [command, model, "--format", "json"])
    return result.exit_code, json.loads(result.stdout)


def test_a_quantized_hand_written_layer_norm_keeps_its_name_and_parameters(tmp_path: Path) -> None:
    """The float model's layer (named after its weights, gamma and beta read) is the quantized model's too."""
    source = _layer_norm_model(tmp_path / "ln.onnx", width=8)
    quantized = _quantized(source, tmp_path / "ln.qdq.onnx")
    _, before = _report("inspect", source)
    code, after = _report("inspect", quantized)
    assert code == 0
    assert [layer["name"] for layer in after["layers"]] == [layer["name"] for layer in before["layers"]] == ["ln"]
    (layer,) = after["layers"]
    assert layer["kind"] == "layer" and layer["channels"] == 8
    assert layer["epsilon"] == pytest.approx(1e-5, rel=0.01)  # read through its DequantizeLinear


def test_shapes_run_through_onnxruntimes_quantized_operators_so_no_collapse_is_suspected(tmp_path: Path) -> None:
    """quantize_static in QOperator format writes com.microsoft QLinearMul and QLinearAdd, which onnx's shape
    inference does not know: the instance norm after them normalizes 16 elements (4x4) as in the float model,
    not a set of a size "the model does not fix" (a BN001 info)."""
    rng = np.random.default_rng(3)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "conv.weight"),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, (4, 1, 1)).astype(np.float32), "gain"),
        numpy_helper.from_array(rng.uniform(-0.5, 0.5, (4, 1, 1)).astype(np.float32), "shift"),
        numpy_helper.from_array(np.ones(4, np.float32), "in.weight"),
        numpy_helper.from_array(np.zeros(4, np.float32), "in.bias"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv.weight"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["c", "gain"], ["m"], name="gain"),
        helper.make_node("Add", ["m", "shift"], ["a"], name="shift"),
        helper.make_node("MaxPool", ["a"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("InstanceNormalization", ["p", "in.weight", "in.bias"], ["y"], name="norm"),
    ]
    graph = helper.make_graph(
        nodes,
        "qop",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 4, 4])],
        inits,
    )
    source = tmp_path / "net.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), source)
    quantized = tmp_path / "net.qop.onnx"
    quantize_static(str(source), str(quantized), _Calibration((1, 3, 8, 8)), quant_format=QuantFormat.QOperator)
    model = onnx.load(str(quantized))
    assert {"QLinearMul", "QLinearAdd"} <= {node.op_type for node in model.graph.node}
    # quantize_static copies the float model's value_info; shapes must come from inference (a graph whose norm
    # reads a tensor the float model's value_info did not hold, as a lowered group norm's reshape does)
    del model.graph.value_info[:]
    onnx.save(model, str(quantized))
    for model in (source, quantized):
        code, report = _report("inspect", str(model))
        assert code == 0 and report["findings"] == []
        assert [layer["normalized_set_size"]["static"] for layer in report["layers"]] == [16]


def test_a_quantized_chain_keeps_the_module_path_its_nodes_carry(tmp_path: Path) -> None:
    """quantize_static's pairs are read through by copies of the chain's nodes: those keep the metadata the
    dynamo exporter names the module by."""
    source = _layer_norm_model(tmp_path / "ln.onnx", width=8, module="encoder.norm")
    quantized = _quantized(source, tmp_path / "ln.qdq.onnx")
    names = [[layer["name"] for layer in _report("inspect", model)[1]["layers"]] for model in (source, quantized)]
    assert names == [["encoder.norm"], ["encoder.norm"]]


@pytest.mark.parametrize("command", ["inspect", "probe"])
def test_a_collapse_survives_quantization_and_is_still_found(tmp_path: Path, command: str) -> None:
    """LayerNorm over a size-1 axis: y is the same for every input before and after quantize_static, and
    BN001 names the same layer in both."""
    source = _layer_norm_model(tmp_path / "ln1.onnx", width=1)
    quantized = _quantized(source, tmp_path / "ln1.qdq.onnx")
    found = []
    for model in (source, quantized):
        code, report = _report(command, model)
        assert code == 1, report
        found.append([(f["code"], f["severity"], f["layer"]) for f in report["findings"]])
    assert found[0] == found[1] and [(code, severity) for code, severity, _ in found[1]] == [("BN001", "error")]
