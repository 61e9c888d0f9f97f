"""Norm layers inside model-local functions, as torch.onnx.export(export_modules_as_functions=True) writes them.

The builder below writes the file that exporter makes of a Conv+BatchNorm+Relu block called twice: the main
graph calls a function per module (``Block``, which calls ``BatchNorm2d``), the weights stay main-graph
initializers passed in as the functions' inputs, and an untrained model's equal weights are stored once and
read under each module's name through an Identity. Each test runs the CLI on the file and asserts what the
user sees.
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
TORCH = "torch.nn.modules"
RNG_SEED = 0


def _bn_values(rng: np.random.Generator, c: int, trained: bool) -> dict[str, np.ndarray]:
    if not trained:
        return {"weight": np.ones(c), "bias": np.zeros(c), "running_mean": np.zeros(c), "running_var": np.ones(c)}
    return {
        "weight": rng.uniform(0.5, 1.5, c),
        "bias": rng.uniform(-0.2, 0.2, c),
        "running_mean": rng.uniform(-0.2, 0.2, c),
        "running_var": rng.uniform(0.5, 1.5, c),
    }


def _ref(name: str, ref: str, kind: int) -> onnx.AttributeProto:
    """An attribute that takes its value from the calling node's attribute ``ref``."""
    attr = onnx.AttributeProto(name=name, ref_attr_name=ref, type=kind)
    return attr


def module_functions_model(
    path: Path, *, training: bool = False, trained: bool = True, eps: float = 1e-5, bn_opset: int = 15
) -> str:
    """x[N, 3, 8, 8] -> b1 -> b2 -> GlobalAveragePool -> y, each block a call of function ``Block`` (Conv,
    a call of ``BatchNorm2d``, Relu). ``training``: the BatchNormalization is exported in training mode;
    ``trained=False``: an untrained model's statistics (0/1), stored once as b1's weight (ones) and bias
    (zeros) and read through an Identity per other parameter, as torch exports them.
    ``eps`` reaches the BatchNormalization through two calls' attributes (Block's ``bn_eps``, BatchNorm2d's
    ``eps``); each Block call also carries its conv weight as an attribute no node reads, as torch's record.
    ``bn_opset``: the opset BatchNorm2d imports (onnx.checker refuses one other than the model's 15)."""
    rng = np.random.default_rng(RNG_SEED)
    params = ["weight", "bias", "running_mean", "running_var"]
    bn_attrs = {"training_mode": 1} if training else {}
    bn_outputs = ["y", "rm", "rv"] if training else ["y"]
    bn = helper.make_node("BatchNormalization", ["x", *params], bn_outputs, name="BatchNormalization_31", **bn_attrs)
    bn.attribute.append(_ref("epsilon", "eps", onnx.AttributeProto.FLOAT))
    bn_fn = helper.make_function(
        f"{TORCH}.batchnorm", "BatchNorm2d", ["x", *params], ["y"], [bn], [helper.make_opsetid("", bn_opset)], ["eps"]
    )
    bn_call = helper.make_node("BatchNorm2d", ["c", *params], ["b"], name="BatchNorm2d_27", domain=f"{TORCH}.batchnorm")
    bn_call.attribute.append(_ref("eps", "bn_eps", onnx.AttributeProto.FLOAT))
    block_fn = helper.make_function(
        "__main__",
        "Block",
        ["x", "conv_w", *params],
        ["y"],
        [
            helper.make_node("Conv", ["x", "conv_w"], ["c"], name="Conv_26", pads=[1, 1, 1, 1]),
            bn_call,
            helper.make_node("Relu", ["b"], ["y"], name="ReLU_28"),
        ],
        [helper.make_opsetid("", 15), helper.make_opsetid(f"{TORCH}.batchnorm", 1)],
        ["bn_eps", "conv_weight"],
    )
    inits, nodes = [], []
    for block in ("b1", "b2"):
        inits.append(
            numpy_helper.from_array(
                (rng.standard_normal((3, 3, 3, 3)) * 0.4).astype(np.float32), f"{block}.conv.weight"
            )
        )
        values = _bn_values(rng, 3, trained)
        for name in params:
            tensor = f"{block}.bn.{name}"
            stored = f"b1.bn.{'bias' if name in ('bias', 'running_mean') else 'weight'}"  # b1's zeros or ones
            if trained or tensor == stored:
                inits.append(numpy_helper.from_array(values[name].astype(np.float32), tensor))
            else:  # torch stores equal weights once and reads every other copy through an Identity
                nodes.append(helper.make_node("Identity", [stored], [tensor], name=f"Identity_{len(nodes)}"))
    weights = {t.name: t for t in inits}
    for block, (source, out) in {"b1": ("x", "h1"), "b2": ("h1", "h2")}.items():
        reads = [source, f"{block}.conv.weight", *(f"{block}.bn.{p}" for p in params)]
        call = helper.make_node("Block", reads, [out], name=f"Block_{block}", domain="__main__", bn_eps=eps)
        call.attribute.append(helper.make_attribute("conv_weight", weights[f"{block}.conv.weight"]))
        nodes.append(call)
    nodes.append(helper.make_node("GlobalAveragePool", ["h2"], ["y"], name="GlobalAveragePool_11"))
    graph = helper.make_graph(
        nodes,
        "main_graph",
        [helper.make_tensor_value_info("x", F32, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("y", F32, ["batch", 3, 1, 1])],
        initializer=inits,
    )
    opsets = [
        helper.make_opsetid("", 15),
        helper.make_opsetid("__main__", 1),
        helper.make_opsetid(f"{TORCH}.batchnorm", 1),
    ]
    model = helper.make_model(graph, opset_imports=opsets, functions=[block_fn, bn_fn], producer_name="pytorch")
    model.ir_version = 8
    if bn_opset == 15:
        onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return str(path)


def _cli(*args: str) -> tuple[int, dict]:
    result = CliRunner().invoke(main, [*args, "--format", "json"])
    assert result.exit_code in (0, 1), result.output
    return result.exit_code, json.loads(result.stdout)


def _findings(doc: dict) -> list[tuple[str, str, str]]:
    return sorted((f["code"], f["severity"], f["layer"]) for f in doc["findings"])


def test_a_train_mode_batch_norm_inside_nested_local_functions_is_a_train_mode_error(tmp_path):
    path = module_functions_model(tmp_path / "m.onnx", training=True)
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})  # a model onnxruntime runs
    code, doc = _cli("inspect", path)
    assert code == 1
    assert _findings(doc) == [("BN002", "error", "b1.bn"), ("BN002", "error", "b2.bn")]
    assert [layer["name"] for layer in doc["layers"]] == ["b1.bn", "b2.bn"]
    assert any("2 model-local function(s) are inlined" in note["message"] for note in doc["notes"])


def test_an_epsilon_passed_down_two_calls_reaches_the_layer(tmp_path):
    path = module_functions_model(tmp_path / "m.onnx", eps=1e-3)
    code, doc = _cli("inspect", path)
    assert code == 0
    assert [layer["name"] for layer in doc["layers"]] == ["b1.bn", "b2.bn"]
    assert [layer["epsilon"] for layer in doc["layers"]] == pytest.approx([1e-3, 1e-3])


def test_a_function_at_another_opset_than_the_models_is_left_and_its_norms_counted(tmp_path):
    """onnx.checker refuses such a file, and onnx's inliner leaves its calls: the calls stay as written, and
    the warning counts the BatchNormalization inside as not inspected."""
    path = module_functions_model(tmp_path / "m.onnx", training=True, bn_opset=14)
    code, doc = _cli("inspect", path)
    assert code == 0 and doc["layers"] == []
    warnings = [note["message"] for note in doc["notes"] if note["level"] == "warning"]
    assert any(m.startswith("1 normalization layer(s) inside control-flow subgraphs or model-local") for m in warnings)


def test_untrained_statistics_read_through_identity_copies_are_named_after_each_module(tmp_path):
    path = module_functions_model(tmp_path / "m.onnx", trained=False)
    code, doc = _cli("inspect", path)
    assert code == 1
    assert _findings(doc) == [("BN003", "error", "b1.bn"), ("BN003", "error", "b2.bn")]


def test_the_probe_measures_a_train_mode_layer_inside_a_local_function(tmp_path):
    path = module_functions_model(tmp_path / "m.onnx", training=True)
    code, doc = _cli("probe", path, "--batch-sizes", "1,2,8")
    assert code == 1
    first = next(f for f in doc["findings"] if f["layer"] == "b1.bn")
    assert first["code"] == "BN002" and "measured:" in first["message"]
    measured = doc["probe"]["runs"][0]["layers"]
    assert set(measured) == {"b1.bn", "b2.bn"}
    assert measured["b1.bn"]["batch_dependence"]["verdict"] == "culprit"
    assert all(
        measured["b2.bn"]["by_batch_size"][size]["normalized_set_size"] == 64 * int(size) for size in ("1", "2", "8")
    )


def test_fix_writes_the_model_inlined_with_the_layers_on_their_stored_statistics(tmp_path):
    path = module_functions_model(tmp_path / "m.onnx", training=True)
    out = tmp_path / "fixed.onnx"
    result = CliRunner().invoke(main, ["fix", path, "-o", str(out)])
    assert result.exit_code == 0, result.output
    fixed = onnx.load(str(out))
    assert not fixed.functions
    bns = [n for n in fixed.graph.node if n.op_type == "BatchNormalization"]
    assert len(bns) == 2 and all(len(n.output) == 1 for n in bns)
    # the same model in inference mode, the function calls as written: what fix must compute
    eval_path = module_functions_model(tmp_path / "eval.onnx", training=False)
    x = np.random.default_rng(2).standard_normal((5, 3, 8, 8)).astype(np.float32)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    want = ort.InferenceSession(eval_path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("broken", ["Block", "BatchNorm2d"])
def test_norms_in_functions_that_cannot_be_inlined_are_counted_in_the_warning(tmp_path, broken):
    """A function calling an op its opset does not define is left as written (the probe refuses the file),
    and the BatchNormalizations its functions hold, however deep, are counted as not inspected."""
    path = module_functions_model(tmp_path / "m.onnx", training=True)
    model = onnx.load(path)
    function = next(f for f in model.functions if f.name == broken)
    function.node.append(helper.make_node("NoSuchOp", ["x"], ["unused"]))
    onnx.save(model, path)
    code, doc = _cli("inspect", path)
    assert code == 0 and doc["findings"] == []
    warnings = [note["message"] for note in doc["notes"] if note["level"] == "warning"]
    assert any(
        m.startswith("1 normalization layer(s) inside control-flow subgraphs or model-local functions")
        and m.endswith(": in function 'BatchNorm2d'")
        for m in warnings
    ), warnings


def test_the_attributes_a_function_reads_are_those_its_ops_or_its_callees_refer_to(tmp_path):
    """The record torch writes on each call (a module's weights as an attribute) is read by no node, so the
    inliner's copy goes without it; the epsilon Block passes on to BatchNorm2d is read."""
    from bncheck.backends.onnx.functions import _attributes_read

    model = onnx.load(module_functions_model(tmp_path / "m.onnx"))
    assert _attributes_read(model.functions) == {
        ("__main__", "Block"): {"bn_eps"},
        (f"{TORCH}.batchnorm", "BatchNorm2d"): {"eps"},
    }
