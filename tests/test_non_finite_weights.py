"""BN005 on NaN/Inf in the stored weights of a convolution or matrix product: where a batch norm with a NaN or
negative running variance leaves it once an exporter folds the norm into the convolution before it (torch's
exporters do by default), so that no normalization layer is left to blame."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper, save

import bncheck
from tests.builders import plain_session

RNG = np.random.default_rng(5)
F32 = TensorProto.FLOAT


def _saved(path: Path, nodes, inits, x_shape, y_shape, elem=F32) -> str:
    """x -> ``nodes`` -> y at opset 17, saved to ``path``."""
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", elem, x_shape)],
        [helper.make_tensor_value_info("y", elem, y_shape)],
        inits,
    )
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return str(path)


def _renamed_conv(path: str, renamed: dict[str, str], conv_name: str, others=None) -> None:
    """``path``'s first node (its convolution) and the weights it reads renamed as an exporter names them;
    ``others``: a name for each later node (by op type)."""
    import onnx

    model = onnx.load(path)
    for tensor in model.graph.initializer:
        tensor.name = renamed.get(tensor.name, tensor.name)
    conv = model.graph.node[0]
    conv.input[1:] = [renamed[t] for t in conv.input[1:]]
    conv.name = conv_name
    for node in model.graph.node[1:] if others else ():
        node.name = others(node.op_type)
    onnx.save(model, path)


def _folded_nan_model(path: Path, *, bn_after: bool, nan: bool = True, constant: bool = False) -> str:
    """x [N, 3, 8, 8] -> Conv "conv" (weights conv.weight, conv.bias: one output channel NaN, as a BN with a NaN
    running variance folded into it leaves them; ``constant``: the weight a Constant node's, as older exporters
    store them) -> Relu -> [BatchNormalization "bn"] -> GlobalAveragePool -> Flatten -> Gemm "head"."""
    weight = RNG.normal(size=(4, 3, 3, 3)).astype(np.float32)
    bias = RNG.normal(size=4).astype(np.float32)
    if nan:
        weight[2] = np.nan
        bias[2] = np.nan
    inits = [
        numpy_helper.from_array(weight, "conv.weight"),
        numpy_helper.from_array(bias, "conv.bias"),
        numpy_helper.from_array(RNG.normal(size=(4, 5)).astype(np.float32), "head.weight"),
        numpy_helper.from_array(np.zeros(5, np.float32), "head.bias"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv.weight", "conv.bias"], ["c"], pads=[1, 1, 1, 1], name="/conv/Conv"),
        helper.make_node("Relu", ["c"], ["r"], name="/relu/Relu"),
    ]
    if constant:
        nodes.insert(0, helper.make_node("Constant", [], ["conv.weight"], value=inits.pop(0), name="/conv/Constant"))
    pooled_from = "r"
    if bn_after:
        for name, value in (("bn.weight", 1.0), ("bn.bias", 0.0), ("bn.running_mean", 0.1), ("bn.running_var", 2.0)):
            inits.append(numpy_helper.from_array(np.full(4, value, np.float32), name))
        nodes.append(
            helper.make_node(
                "BatchNormalization",
                ["r", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"],
                ["b"],
                name="/bn/BatchNormalization",
            )
        )
        pooled_from = "b"
    nodes += [
        helper.make_node("GlobalAveragePool", [pooled_from], ["p"], name="/pool/GlobalAveragePool"),
        helper.make_node("Flatten", ["p"], ["f"], name="/Flatten"),
        helper.make_node("Gemm", ["f", "head.weight", "head.bias"], ["y"], name="/head/Gemm"),
    ]
    _saved(path, nodes, inits, ["N", 3, 8, 8], ["N", 5])
    return str(path)


def _bn005(report) -> list[tuple[str, str, str]]:
    return [(f.severity.label, f.layer, f.evidence["kind"]) for f in report.findings if f.code == "BN005"]


@pytest.mark.parametrize("constant", [False, True])
def test_nan_weights_of_a_convolution_are_an_error_of_inspect_and_probe(tmp_path, constant):
    # before: inspect exit 0; probe a warning on the outputs (synthetic inputs) blaming no layer
    path = _folded_nan_model(tmp_path / "folded.onnx", bn_after=False, constant=constant)
    session = plain_session(path)
    assert np.isnan(session.run(None, {"x": RNG.normal(size=(2, 3, 8, 8)).astype(np.float32)})[0]).all()
    inspected = bncheck.inspect(path)
    assert _bn005(inspected) == [("error", "conv", "weights")] and inspected.exit_code == 1
    (finding,) = [f for f in inspected.findings if f.code == "BN005"]
    assert finding.evidence["weights"] == {
        "conv.weight": {"nan": 27, "inf": 0, "values": 108},
        "conv.bias": {"nan": 1, "inf": 0, "values": 4},
    }
    assert finding.evidence["node"] == "/conv/Conv" and "'/conv/Conv'" in finding.message
    assert _bn005(bncheck.probe(path, batch_sizes=(1, 2))) == [("error", "conv", "weights")]


def test_a_layer_downstream_of_nan_weights_is_not_named_as_their_source(tmp_path):
    # before: "NaN/Inf first appear at the input of BatchNormalization 'bn'... from here or from the ops just
    # before it", where the convolution's weights held them
    path = _folded_nan_model(tmp_path / "folded_bn.onnx", bn_after=True)
    assert _bn005(bncheck.probe(path, batch_sizes=(1, 2))) == [("error", "conv", "weights")]


def test_finite_weights_and_an_infinite_attention_mask_are_no_finding(tmp_path):
    # an Add's constant -inf (a causal mask) is meant: only the weights of convolutions and products are read
    path = _folded_nan_model(tmp_path / "clean.onnx", bn_after=True, nan=False)
    assert bncheck.inspect(path).findings == []
    mask = np.triu(np.full((4, 4), -np.inf, np.float32), k=1)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["scores"], name="/attn/MatMul"),
        helper.make_node("Add", ["scores", "mask"], ["masked"], name="/attn/Add"),
        helper.make_node("Softmax", ["masked"], ["y"], axis=-1, name="/attn/Softmax"),
    ]
    inits = [
        numpy_helper.from_array(RNG.normal(size=(4, 4)).astype(np.float32), "attn.w"),
        numpy_helper.from_array(mask, "mask"),
    ]
    nodes[0].input[1] = "attn.w"
    masked = tmp_path / "masked.onnx"
    _saved(masked, nodes, inits, ["N", 4, 4], ["N", 4, 4])
    assert [f.code for f in bncheck.inspect(str(masked)).findings] == []


def test_nan_weights_of_a_tflite_fused_convolution_are_named_after_the_convolution(tmp_path):
    # tf2onnx from a .tflite file: the op and its weights named by every op TFLite fused ("relu;bn;...;conv")
    path = _folded_nan_model(tmp_path / "tflite.onnx", bn_after=False)
    fused = "model/re_lu/Relu;model/bn/FusedBatchNormV3;model/conv/BiasAdd;model/conv"
    _renamed_conv(path, {"conv.weight": f"{fused}/Conv2D", "conv.bias": f"{fused}/BiasAdd"}, f"{fused}/Conv2D1")
    assert _bn005(bncheck.inspect(path)) == [("error", "model/conv", "weights")]


@pytest.mark.parametrize("keras3", [False, True])
def test_nan_weights_of_a_keras_batch_norm_tf2onnx_folded_are_named_after_that_batch_norm(tmp_path, keras3):
    # tf2onnx folds a Keras BatchNormalization into the convolution before it: the kernel keeps the conv layer's
    # scope, the shift is TensorFlow's batchnorm/sub in the BN layer's. The finding named their common scope (the
    # backbone: "resnet_clf_1/resnet_1"), where the NaN or negative variance is the batch norm's
    path = _folded_nan_model(tmp_path / "tf.onnx", bn_after=False)
    s = "_1" if keras3 else ""  # Keras 3 exports through TensorFlow add "_1" to every scope
    renamed = {
        "conv.weight": f"clf{s}/net{s}/block_conv{s}/convolution/merged_input:0",
        "conv.bias": f"clf{s}/net{s}/block_bn{s}/batchnorm/sub:0",
    }
    # the later nodes scoped as the exporter scopes them
    _renamed_conv(path, renamed, "Conv__411", lambda op: f"clf{s}/net{s}/{op.lower()}{s}/{op}")
    assert _bn005(bncheck.inspect(path)) == [("error", "clf/net/block_bn", "weights")]


def test_large_finite_float16_weights_whose_sum_overflows_are_no_finding(tmp_path):
    # the scan sums each weight first: 108 float16 values of 60000 sum to Inf, yet none is
    weight = np.full((4, 3, 3, 3), 60000.0, np.float16)
    path = tmp_path / "fp16.onnx"
    _saved(
        path,
        [helper.make_node("Conv", ["x", "conv.weight"], ["y"], pads=[1, 1, 1, 1], name="/conv/Conv")],
        [numpy_helper.from_array(weight, "conv.weight")],
        ["N", 3, 8, 8],
        ["N", 4, 8, 8],
        elem=TensorProto.FLOAT16,
    )
    with np.errstate(over="ignore"):
        assert not np.isfinite(weight.sum())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nor does numpy's overflow warning reach the user
        assert [f.code for f in bncheck.inspect(str(path)).findings] == []


def test_nan_in_a_folded_per_channel_scale_is_an_error_and_an_infinite_constant_is_not(tmp_path):
    # Keras 3's ONNX export on torch writes a BatchNormalization as (x - mean) * (gamma / sqrt(var + eps)) + beta, the
    # variance folded into the scale: a NaN variance was a warning on the outputs (synthetic inputs), exit 0
    scale = np.ones((1, 4, 1, 1), np.float32)
    scale[0, 2] = np.nan
    beta = np.zeros((1, 4, 1, 1), np.float32)
    beta[0, 2] = np.nan  # an exporter that folds the mean into the shift carries the NaN there too: one finding
    inits = [
        numpy_helper.from_array(np.full((1, 4, 1, 1), 0.1, np.float32), "mean"),
        numpy_helper.from_array(scale, "scale"),
        numpy_helper.from_array(beta, "beta"),
        numpy_helper.from_array(np.full((1, 4, 1, 1), -np.inf, np.float32), "floor"),
    ]
    nodes = [
        helper.make_node("Sub", ["x", "mean"], ["centred"], name="/bn/Sub"),
        helper.make_node("Mul", ["centred", "scale"], ["scaled"], name="/bn/Mul"),
        helper.make_node("Add", ["scaled", "beta"], ["shifted"], name="/bn/Add"),
        helper.make_node("Max", ["shifted", "floor"], ["y"], name="/clip/Max"),
    ]
    path = tmp_path / "folded_scale.onnx"
    _saved(path, nodes, inits, ["N", 4, 8, 8], ["N", 4, 8, 8])
    (finding,) = [f for f in bncheck.inspect(str(path)).findings if f.code == "BN005"]
    assert finding.evidence["weights"] == {"scale": {"nan": 1, "inf": 0, "values": 4}}
    assert finding.evidence["node"] == "/bn/Mul" and "constant operands" in finding.message
    inf_add = [
        helper.make_node("Add", ["x", "floor"], ["y"], name="/mask/Add"),
    ]
    masked = tmp_path / "inf_add.onnx"
    _saved(masked, inf_add, [inits[3]], ["N", 4, 8, 8], ["N", 4, 8, 8])
    assert bncheck.inspect(str(masked)).findings == []


def test_a_nan_gamma_applied_after_a_layer_is_found_once(tmp_path):
    # a normalization of ones and zeros, reshaped back, then gamma's Mul and beta's Add (as tf2onnx writes Keras's
    # LayerNormalization): the NaN gamma is found, once, on the Mul where the layer does not read it as its own
    gamma = np.ones((1, 1, 8), np.float32)
    gamma[0, 0, 3] = np.nan
    inits = [
        numpy_helper.from_array(np.ones(8, np.float32), "ones"),
        numpy_helper.from_array(np.zeros(8, np.float32), "zeros"),
        numpy_helper.from_array(np.array([0, 0, 8], np.int64), "back"),
        numpy_helper.from_array(gamma, "model/ln/gamma"),
        numpy_helper.from_array(np.zeros((1, 1, 8), np.float32), "model/ln/beta"),
    ]
    nodes = [
        helper.make_node(
            "LayerNormalization", ["x", "ones", "zeros"], ["normed"], axis=-1, epsilon=1e-3, name="model/ln/norm"
        ),
        helper.make_node("Reshape", ["normed", "back"], ["relaid"], name="model/ln/Reshape_1"),
        helper.make_node("Mul", ["relaid", "model/ln/gamma"], ["scaled"], name="model/ln/mul"),
        helper.make_node("Add", ["scaled", "model/ln/beta"], ["y"], name="model/ln/add"),
    ]
    path = tmp_path / "ln_after.onnx"
    _saved(path, nodes, inits, ["N", 5, 8], ["N", 5, 8])
    assert [(f.evidence["kind"], f.layer) for f in bncheck.inspect(str(path)).findings if f.code == "BN005"] == [
        ("weights", "model/ln")
    ]
