"""Probing ONNX files as exporters write them: batch dims written as -1/0 or fixed, old opsets and IR
versions, parameters declared as graph inputs, layers without a static rank, sizes that cannot run.

Each fixture is built here with onnx.helper in the shape a real exporter writes it (torch.onnx.export without
dynamic axes bakes the batch into the flatten's Reshape constant; older paddle2onnx/tf2onnx write -1). Each test
runs the CLI and asserts what the user sees: exit code, findings, notes, the batch sizes that ran.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from bncheck.cli import main

F32 = TensorProto.FLOAT


def _probe_json(path: str, *args: str) -> tuple[int, dict]:
    result = CliRunner().invoke(main, ["probe", path, "--format", "json", *args])
    assert result.exit_code in (0, 1), result.output
    return result.exit_code, json.loads(result.stdout)


def _run(doc: dict) -> dict:
    return doc["probe"]["runs"][0]


def _convnet(
    path: Path,
    batch,
    *,
    flatten=None,
    head_training: bool = False,
    opset: int = 17,
) -> str:
    """x[batch, 3, 8, 8] -> Conv -> BN -> Relu -> GlobalAveragePool -> Reshape(flatten) -> MatMul -> BN (1-d
    head) -> y[batch, 5]: the net torch.onnx.export writes for ``x.view(x.size(0), -1)``. ``flatten`` is the
    Reshape's constant (default ``[batch, -1]`` for a fixed batch, ``[0, -1]`` otherwise)."""
    rng = np.random.default_rng(0)
    fixed = isinstance(batch, int) and batch > 0
    if flatten is None:
        flatten = [batch, -1] if fixed else [0, -1]

    def bn_params(prefix: str, c: int) -> list:
        return [numpy_helper.from_array(a.astype(np.float32), f"{prefix}.{n}") for a, n in
                ((rng.uniform(0.5, 1.5, c), "weight"), (rng.uniform(-0.2, 0.2, c), "bias"),
                 (rng.uniform(-0.2, 0.2, c), "running_mean"), (rng.uniform(0.5, 1.5, c), "running_var"))]

    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.3, "conv.weight"),
        numpy_helper.from_array(np.asarray(flatten, np.int64), "flat_shape"),
        numpy_helper.from_array(rng.standard_normal((4, 5)).astype(np.float32), "fc.weight"),
        *bn_params("bn", 4), *bn_params("head_bn", 5),
    ]
    head_attrs = {"training_mode": 1} if head_training else {}
    head_outputs = ["y", "head_rm", "head_rv"] if head_training else ["y"]
    nodes = [
        helper.make_node("Conv", ["x", "conv.weight"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"],
                         ["b"], name="bn"),
        helper.make_node("Relu", ["b"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
        helper.make_node("Reshape", ["p", "flat_shape"], ["f"], name="flatten"),
        helper.make_node("MatMul", ["f", "fc.weight"], ["h"], name="fc"),
        helper.make_node("BatchNormalization", ["h", "head_bn.weight", "head_bn.bias", "head_bn.running_mean",
                                                "head_bn.running_var"], head_outputs, name="head_bn", **head_attrs),
    ]
    outputs = [helper.make_tensor_value_info("y", F32, [batch, 5])]
    if head_training:
        outputs += [helper.make_tensor_value_info(n, F32, [5]) for n in head_outputs[1:]]
    graph = helper.make_graph(nodes, "net", [helper.make_tensor_value_info("x", F32, [batch, 3, 8, 8])], outputs,
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.save(model, str(path))
    return str(path)


# --------------------------------------------------------------------------- batch dim written as -1 or 0


@pytest.mark.parametrize("written", [-1, 0])
def test_a_batch_dim_written_as_minus_one_or_zero_is_symbolic(tmp_path, written):
    path = _convnet(tmp_path / "m.onnx", written)
    code, doc = _probe_json(path, "--batch-sizes", "1,2,32")
    assert code == 0 and doc["probe"]["batch_sizes"] == [1, 2, 32]
    assert _run(doc)["layers"]["bn"]["batch_dependence"]["verdict"] == "independent"
    result = CliRunner().invoke(main, ["inspect", path, "--format", "json"])
    set_size = json.loads(result.stdout)["layers"][0]["normalized_set_size"]
    assert set_size["known_factor"] == 64 and set_size["depends_on"] == ["batch"]
