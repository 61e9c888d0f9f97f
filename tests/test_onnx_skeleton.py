"""onnx.checker and shape inference run on a weight-less skeleton of the model (fast, no copy of the weights)
and still see what matters: shapes through large weights, small shape tensors' values, graph errors."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bncheck.backends.base import ProbeSettings
from bncheck.backends.onnx import OnnxBackend
from bncheck.backends.onnx.graph import copy_fields, is_repeated
from bncheck.backends.onnx.load import SKELETON_KEEP_BYTES, _skeleton, concrete_shapes, inferred_shapes, own_skeleton
from bncheck.backends.onnx.run import run_probe


def _conv_reshape_bn(path, ir_version: int = 8, bad_attribute: bool = False) -> str:
    """Two Convs with large weights, Reshape by a small shape initializer, then BatchNormalization."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((16, 8, 3, 3)).astype(np.float32)  # 4.6 KB > SKELETON_KEEP_BYTES
    big = rng.standard_normal((64, 16, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["c", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Reshape", ["c2", "shape"], ["r"], name="reshape"),
        helper.make_node(
            "BatchNormalization",
            ["r", "s", "b", "m", "v"],
            ["y"],
            name="bn",
            **({"epsilon": 1e-5} if not bad_attribute else {"epsilon": 1e-5, "spatial": 1}),
        ),
    ]
    inits = [
        numpy_helper.from_array(weight, "w"),
        numpy_helper.from_array(big, "w2"),
        numpy_helper.from_array(np.array([0, 64, 4, 16], np.int64), "shape"),
    ]
    inits += [
        numpy_helper.from_array(np.full(64, v, np.float32), n)
        for n, v in (("s", 1.0), ("b", 0.1), ("m", 0.2), ("v", 0.9))
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64, 4, 16])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)], ir_version=ir_version)
    onnx.save(model, str(path))
    return str(path)


def test_skeleton_drops_only_large_initializers(tmp_path):
    model = onnx.load(_conv_reshape_bn(tmp_path / "m.onnx"))
    skeleton = _skeleton(model)
    kept = {t.name for t in skeleton.graph.initializer}
    assert kept == {"shape", "s", "b", "m", "v"}
    assert {i.name for i in skeleton.graph.input} == {"x", "w", "w2"}
    assert all(len(t.raw_data) <= SKELETON_KEEP_BYTES for t in skeleton.graph.initializer)
    assert skeleton.ByteSize() < 4000 < model.ByteSize()


def test_shapes_are_inferred_through_large_weights_and_small_shape_tensors(tmp_path):
    view = OnnxBackend().load(_conv_reshape_bn(tmp_path / "m.onnx"))
    [layer] = view.layers
    assert layer.input_shape == ("N", 64, 4, 16)
    assert view.notes == []
    assert [i.name for i in view.inputs] == ["x"]


def test_probe_copy_shapes_are_inferred_through_large_weights_and_small_shape_tensors(tmp_path):
    # inferred_shapes (the probe copy's shapes, a relaxed batch's) runs on the skeleton as well
    model = onnx.load(_conv_reshape_bn(tmp_path / "m.onnx"))
    shapes, types = inferred_shapes(model)
    assert shapes["c2"] == ("N", 64, 8, 8)
    assert shapes["r"] == ("N", 64, 4, 16)  # the Reshape's small shape initializer read by data propagation
    assert shapes["w2"] == (64, 16, 3, 3)
    assert types["r"] == TensorProto.FLOAT
    assert len(model.graph.initializer) == 7 and len(model.graph.input) == 1  # the model itself is not edited


def test_checker_failures_are_still_reported_from_the_skeleton(tmp_path):
    view = OnnxBackend().load(_conv_reshape_bn(tmp_path / "m.onnx", bad_attribute=True))
    assert any("onnx.checker rejects" in n.message for n in view.notes)
    assert [layer.name for layer in view.layers] == ["bn"]


def _constant_weights(path, height: int | str = 8) -> str:
    """The same Conv + BatchNormalization with every weight in a Constant node, as older paddle2onnx writes;
    ``height`` of the input (a name leaves it open, as detectors do)."""
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((16, 8, 3, 3)).astype(np.float32)  # 4.6 KB > SKELETON_KEEP_BYTES
    params = [np.full(16, v, np.float32) for v in (1.0, 0.1, 0.2, 0.9)]
    nodes = [helper.make_node("Constant", [], ["w"], name="cw", value=numpy_helper.from_array(weight, "w"))]
    nodes += [
        helper.make_node("Constant", [], [n], name=f"c{n}", value=numpy_helper.from_array(p, n))
        for n, p in zip("sbmv", params)
    ]
    nodes += [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"], name="bn"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, height, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16, height, 8])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)]), str(path))
    return str(path)


def test_skeleton_turns_only_large_constant_nodes_into_inputs(tmp_path):
    model = onnx.load(_constant_weights(tmp_path / "c.onnx"))
    skeleton = _skeleton(model)
    assert [n.name for n in skeleton.graph.node] == ["cs", "cb", "cm", "cv", "conv", "bn"]
    assert {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in skeleton.graph.input} == {
        "x": [0, 8, 8, 8],
        "w": [16, 8, 3, 3],
    }
    assert skeleton.ByteSize() < 2000 < model.ByteSize()
    assert len(model.graph.node) == 7  # the model itself is not edited


def test_shapes_are_inferred_through_large_constant_weights(tmp_path):
    view = OnnxBackend().load(_constant_weights(tmp_path / "c.onnx"))
    [layer] = view.layers
    assert layer.input_shape == ("N", 16, 8, 8)
    assert view.handle.value_shapes["w"] == (16, 8, 3, 3)
    assert view.notes == []
    assert [i.name for i in view.inputs] == ["x"]


def test_the_skeleton_the_loader_inferred_on_gives_the_memory_check_the_same_shapes(tmp_path):
    # the probe's memory check infers the file's shapes at the fed sizes on the loader's skeleton
    view = OnnxBackend().load(_constant_weights(tmp_path / "c.onnx", height="H"))
    handle = view.handle
    spare = handle.spare_skeleton
    assert spare is not None and "w" in {i.name for i in spare.graph.input}  # weight-less: the weight is an input
    feeds = {"x": (4, 8, 8, 8)}
    fresh = concrete_shapes(handle.model, feeds)
    assert fresh[0]["c"] == (4, 16, 8, 8)
    assert concrete_shapes(handle.model, feeds, spare) == fresh


def test_a_probe_takes_the_loaders_skeleton_and_keeps_a_model_without_initializers(tmp_path):
    view = OnnxBackend().load(_constant_weights(tmp_path / "c.onnx", height="H"))
    model = view.handle.model
    run_probe(view, ProbeSettings(batch_sizes=(1, 2), input_shapes={"x": (8, 8, 8)}))
    assert view.handle.spare_skeleton is None  # used by the memory check, not held through the probe
    # every weight is in a Constant node: a weight-less skeleton would copy them all, so none is swapped in
    assert not view.handle.model_pending and view.handle.model is model


def test_own_skeleton_is_a_sorted_copy_that_both_inferences_can_share(tmp_path):
    model = onnx.load(_constant_weights(tmp_path / "c.onnx"))
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes[::-1])  # out of order, as broken files are
    skeleton = own_skeleton(model)
    names = [n.name for n in skeleton.graph.node]
    assert sorted(names) == ["bn", "cb", "cm", "conv", "cs", "cv"] and names[-1] == "bn"  # sorted, weight-less
    assert inferred_shapes(model, skeleton)[0]["c"] == ("N", 16, 8, 8)
    assert concrete_shapes(model, {"x": (2, 8, 8, 8)}, skeleton)[0]["y"] == (2, 16, 8, 8)
    assert model.graph.node[0].name == "bn" and len(model.graph.node) == 7  # the model itself is not edited


def test_tensor_sizes_come_from_dims_and_element_type_without_reading_data():
    from bncheck.backends.onnx.graph import element_size, tensor_nbytes

    # external data: no bytes in the message, so only dims and type can size it
    stub = TensorProto(name="w", data_type=TensorProto.FLOAT16, dims=[64, 16, 3, 3])
    stub.data_location = TensorProto.EXTERNAL
    assert tensor_nbytes(stub) == 64 * 16 * 3 * 3 * 2
    assert tensor_nbytes(numpy_helper.from_array(np.zeros((3, 4), np.float64))) == 96
    assert element_size(TensorProto.STRING) == 8  # numpy's object pointers
    assert element_size(TensorProto.UNDEFINED) is None
    assert tensor_nbytes(TensorProto(data_type=TensorProto.UNDEFINED, dims=[5])) == 40  # sized 8 an element


def _branch_weights(path, same_name: bool = False) -> str:
    """An If whose two branches each convolve x with a large weight held by a Constant node of their own (as
    silero-vad's shipped model holds its weights); ``same_name``: both branches name their weight alike."""
    rng = np.random.default_rng(1)

    def branch(tag: str, weight_name: str) -> onnx.GraphProto:
        weight = rng.standard_normal((16, 8, 3, 3)).astype(np.float32)  # 4.6 KB > SKELETON_KEEP_BYTES
        return helper.make_graph(
            [
                helper.make_node("Constant", [], [weight_name], value=numpy_helper.from_array(weight)),
                helper.make_node("Conv", ["x", weight_name], [f"y_{tag}"], pads=[1, 1, 1, 1]),
            ],
            tag,
            [],
            [helper.make_tensor_value_info(f"y_{tag}", TensorProto.FLOAT, ["N", 16, 8, 8])],
        )

    nodes = [
        helper.make_node(
            "If",
            ["flag"],
            ["y"],
            then_branch=branch("then", "w" if same_name else "w_then"),
            else_branch=branch("else", "w" if same_name else "w_else"),
        ),
        helper.make_node("Relu", ["y"], ["z"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 8, 8]),
            helper.make_tensor_value_info("flag", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 16, 8, 8])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)]), str(path))
    return str(path)


def test_a_branchs_large_constant_weights_become_typed_inputs_of_the_skeleton(tmp_path):
    model = onnx.load(_branch_weights(tmp_path / "if.onnx"))
    skeleton = _skeleton(model)
    inputs = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in skeleton.graph.input}
    assert inputs == {"x": [0, 8, 8, 8], "flag": [], "w_then": [16, 8, 3, 3], "w_else": [16, 8, 3, 3]}
    branches = {a.name: [n.op_type for n in a.g.node] for a in skeleton.graph.node[0].attribute}
    assert branches == {"then_branch": ["Conv"], "else_branch": ["Conv"]}
    assert skeleton.ByteSize() < 2000 < model.ByteSize()
    onnx.checker.check_model(model, full_check=True)
    onnx.checker.check_model(skeleton, full_check=True)  # a branch reads the outer scope's inputs
    assert [n.op_type for n in model.graph.node[0].attribute[0].g.node] == ["Constant", "Conv"]  # not edited
    shapes, _ = inferred_shapes(model)
    assert shapes["z"] == ("N", 16, 8, 8)
    view = OnnxBackend().load(str(tmp_path / "if.onnx"))
    assert [n for n in view.notes if n.level == "warning"] == []  # checker and strict inference accept it


def test_branch_weights_named_alike_stay_in_their_branches(tmp_path):
    model = onnx.load(_branch_weights(tmp_path / "if.onnx", same_name=True))
    skeleton = _skeleton(model)
    assert [i.name for i in skeleton.graph.input] == ["x", "flag"]
    branches = [[n.op_type for n in a.g.node] for a in skeleton.graph.node[0].attribute]
    assert branches == [["Constant", "Conv"], ["Constant", "Conv"]]


def test_copy_fields_copies_repeated_and_single_fields_under_the_installed_protobuf():
    # protobuf before 6.31 tells a repeated field by its label, 7.x by is_repeated (.ci/lowest runs the former)
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="c", kernel_shape=[3, 3])
    copy = onnx.NodeProto()
    copy_fields(node, copy, skip={"name"})
    assert list(copy.input) == ["x", "w"] and list(copy.output) == ["y"]
    assert [(a.name, list(a.ints)) for a in copy.attribute] == [("kernel_shape", [3, 3])]
    assert copy.op_type == "Conv" and copy.name == ""
    fields = onnx.NodeProto.DESCRIPTOR.fields_by_name
    assert is_repeated(fields["input"]) and is_repeated(fields["attribute"]) and not is_repeated(fields["op_type"])
