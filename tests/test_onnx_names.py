"""Layer names: the module path the user wrote, not the node name an exporter generated (PyTorch dynamo,
paddle2onnx, unnamed nodes); node names kept in ``nodes``; names unique within a model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from bncheck.backends.onnx.names import _compose_prefix, is_generated, weight_prefix
from bncheck.cli import main

RNG = np.random.default_rng(7)


def _bn(name: str, x: str, y: str, prefix: str, inits: list, stale: bool = False, scopes: list[str] | None = None):
    """A BatchNormalization reading ``prefix.weight`` ... like torch's exporters write them."""
    c = 4
    values = {
        "weight": RNG.uniform(0.5, 1.5, c),
        "bias": RNG.uniform(-0.5, 0.5, c),
        "running_mean": np.zeros(c) if stale else RNG.uniform(0.1, 0.3, c),
        "running_var": np.ones(c) if stale else RNG.uniform(0.5, 1.5, c),
    }
    names = []
    for key, value in values.items():
        tensor = f"{prefix}.{key}"
        if tensor not in {i.name for i in inits}:
            inits.append(numpy_helper.from_array(value.astype(np.float32), tensor))
        names.append(tensor)
    node = helper.make_node("BatchNormalization", [x, *names], [y], name=name)
    if scopes is not None:  # what torch.onnx.export(dynamo=True) writes
        node.metadata_props.add(key="pkg.torch.onnx.name_scopes", value=repr(scopes))
        node.metadata_props.add(
            key="namespace",
            value=": __main__.M/" + "/".join(f"{s}: torch.nn.Module" for s in scopes[1:]),
        )
    return node


def _saved_chain(path: Path, nodes: list, inits: list) -> str:
    """x[N, 4] -> ``nodes`` -> y[N, 4], saved at opset 17."""
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return str(path)


def _dynamo_like(tmp_path: Path) -> str:
    inits: list = []
    nodes = [
        _bn(
            "node__native_batch_norm_legit_no_training__0",
            "x",
            "a",
            "bn",
            inits,
            scopes=["", "bn", "_native_batch_norm_legit_no_training"],
        ),
        # the same module called a second time: same metadata, same weights
        _bn(
            "node__native_batch_norm_legit_no_training_1__0",
            "a",
            "b",
            "bn",
            inits,
            scopes=["", "bn", "_native_batch_norm_legit_no_training_1"],
        ),
        # no metadata (an older exporter, or stripped): the weight names say head.head_bn
        _bn("node__native_batch_norm_legit_no_training_2__0", "b", "c", "head.head_bn", inits, stale=True),
        # a name the user gave stays
        _bn("my_bn", "c", "y", "other", inits),
    ]
    return _saved_chain(tmp_path / "dynamo_like.onnx", nodes, inits)


def test_layers_are_named_after_module_paths_and_keep_node_names(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["inspect", _dynamo_like(tmp_path), "--format", "json"])
    assert result.exit_code == 1, result.output  # head.head_bn's running stats are 0/1 (BN003)
    doc = json.loads(result.stdout)
    assert [(layer["name"], layer["nodes"]) for layer in doc["layers"]] == [
        ("bn", ["node__native_batch_norm_legit_no_training__0"]),
        ("bn#2", ["node__native_batch_norm_legit_no_training_1__0"]),
        ("head.head_bn", ["node__native_batch_norm_legit_no_training_2__0"]),
        ("my_bn", ["my_bn"]),
    ]
    assert [(f["code"], f["layer"]) for f in doc["findings"]] == [("BN003", "head.head_bn")]


def test_probe_reports_under_the_readable_names(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["probe", _dynamo_like(tmp_path), "--format", "json", "--batch-sizes", "1,2"])
    assert result.exit_code == 1, result.output
    doc = json.loads(result.stdout)
    assert sorted(doc["probe"]["runs"][0]["layers"]) == ["bn", "bn#2", "head.head_bn", "my_bn"]


def _inspected_layers(
    path: Path,
    nodes: list,
    inits: list,
    shape: list,
    opset: int,
    ir_version: int,
    y_shape: list | None = None,
    extra_opsets: dict[str, int] | None = None,
    exit_code: int = 0,
) -> list:
    """The layers of `bncheck inspect --format json` on a graph x -> ``nodes`` -> y (of ``shape``, y of
    ``y_shape`` where given); ``extra_opsets``: other domains the nodes use, with their versions; ``exit_code``:
    the one inspect must give."""
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape if y_shape is None else y_shape)],
        initializer=inits,
    )
    domains = [helper.make_opsetid(domain, version) for domain, version in (extra_opsets or {}).items()]
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), *domains])
    model.ir_version = ir_version
    onnx.save(model, str(path))
    result = CliRunner().invoke(main, ["inspect", str(path), "--format", "json"])
    assert result.exit_code == exit_code, result.output
    return json.loads(result.stdout)["layers"]


def test_unnamed_and_paddle_nodes_take_their_weight_prefix(tmp_path: Path) -> None:
    inits: list = []
    first = _bn("", "x", "a", "conv1_bn", inits)
    inits[:] = [numpy_helper.from_array(numpy_helper.to_array(t), t.name.replace(".", "_")) for t in inits]
    first.input[1:] = [t.name for t in inits]
    nodes = [first, _bn("p2o.BatchNormalization.3", "a", "y", "batch_norm2d_7", inits)]
    layers = _inspected_layers(tmp_path / "p2o.onnx", nodes, inits, ["N", 4, 3, 3], opset=17, ir_version=8)
    assert [(layer["name"], layer["nodes"]) for layer in layers] == [
        ("conv1_bn", ["a"]),  # unnamed node: its output was the only name it had
        ("batch_norm2d_7", ["p2o.BatchNormalization.3"]),
    ]


def test_nodes_of_a_scripted_module_without_scopes_take_their_weight_prefix(tmp_path: Path) -> None:
    """torch.jit.script'ed modules export without scopes (/BatchNormalization, /BatchNormalization_1): the
    weights name the module, and a module called in a loop is a module called again."""
    inits: list = []
    nodes = [
        _bn("/BatchNormalization", "x", "a", "bn0", inits),
        _bn("/BatchNormalization_1", "a", "b", "bn_loop", inits),
        _bn("/BatchNormalization_2", "b", "y", "bn_loop", inits),
    ]
    layers = _inspected_layers(tmp_path / "scripted.onnx", nodes, inits, ["N", 4, 3, 3], opset=17, ir_version=8)
    assert [layer["name"] for layer in layers] == ["bn0", "bn_loop", "bn_loop#2"]


def test_torchscript_scoped_nodes_take_the_module_path_their_weights_name(tmp_path: Path) -> None:
    """torch >= 1.13's exporter names a node ``/<scopes>/<op>[_N]``; a Sequential's child is scoped by its full
    path (``/features/features.1/``), a module called again ``norm_1``: the weights say the module path."""
    inits: list = []
    nodes = [
        _bn("/features/features.1/BatchNormalization", "x", "a", "features.1", inits),
        _bn("/head/norm/BatchNormalization", "a", "b", "model.head.norm", inits),
        _bn("/head/norm_1/BatchNormalization", "b", "c", "model.head.norm", inits),  # called again
        _bn("/tail/bn/BatchNormalization_3", "c", "y", "shared_stats", inits),  # weights named otherwise
    ]
    layers = _inspected_layers(tmp_path / "ts.onnx", nodes, inits, ["N", 4, 3, 3], opset=17, ir_version=8)
    assert [(layer["name"], layer["nodes"]) for layer in layers] == [
        ("features.1", ["/features/features.1/BatchNormalization"]),
        ("model.head.norm", ["/head/norm/BatchNormalization"]),
        ("model.head.norm#2", ["/head/norm_1/BatchNormalization"]),
        ("tail.bn", ["/tail/bn/BatchNormalization_3"]),
    ]


def _torchscript_like(tmp_path: Path) -> str:
    inits: list = []
    nodes = [
        _bn("/layer1/layer1.0/bn1/BatchNormalization", "x", "a", "layer1.0.bn1", inits),
        _bn("/head/bn/BatchNormalization", "a", "y", "head.bn", inits, stale=True),
    ]
    return _saved_chain(tmp_path / "torchscript_like.onnx", nodes, inits)


def test_models_merged_by_onnx_compose_keep_their_prefixes_and_module_paths(tmp_path: Path) -> None:
    """onnx.compose.merge_models prefixes each model's names (m1/, m2/): a TorchScript node name becomes
    m1//layer1/layer1.0/bn1/BatchNormalization, a dynamo one m2/node_...; each layer is its module path under its
    model's prefix, and the same module of the two models is not a second call of one (#2)."""
    from onnx import compose

    first = compose.add_prefix(onnx.load(_torchscript_like(tmp_path)), "m1/")
    second = compose.add_prefix(onnx.load(_dynamo_like(tmp_path)), "m2/")
    merged = compose.merge_models(first, second, io_map=[("m1/y", "m2/x")])
    path = tmp_path / "merged.onnx"
    onnx.save(merged, str(path))
    result = CliRunner().invoke(main, ["inspect", str(path), "--format", "json"])
    assert result.exit_code == 1, result.output
    doc = json.loads(result.stdout)
    assert [layer["name"] for layer in doc["layers"]] == [
        "m1/layer1.0.bn1",
        "m1/head.bn",
        "m2/bn",
        "m2/bn#2",
        "m2/head.head_bn",
        "m2/my_bn",
    ]
    assert sorted((f["code"], f["layer"]) for f in doc["findings"]) == [
        ("BN003", "m1/head.bn"),
        ("BN003", "m2/head.head_bn"),
    ]


def test_torchscript_scoped_nodes_sharing_another_layers_weights_take_their_own_scope(tmp_path: Path) -> None:
    """The exporter keeps one copy of equal initializers (a fresh BN's ones and zeros, never-updated 0/1
    statistics): a BN under /layer1/layer1.0/bn2/ reads layer1.0.bn1's tensors. Each is named after its own
    scope (layer1.0.bn2), not after the weights it shares; a scope no weight names is spelled as a module path."""
    inits: list = []
    nodes = [
        _bn("/layer1/layer1.0/bn1/BatchNormalization", "x", "a", "layer1.0.bn1", inits),
        _bn("/layer1/layer1.0/bn2/BatchNormalization", "a", "b", "layer1.0.bn1", inits),  # shared
        _bn("/features/features.9/conv/conv.3/BatchNormalization", "b", "y", "features.7.conv.3", inits),
    ]
    layers = _inspected_layers(tmp_path / "shared.onnx", nodes, inits, ["N", 4, 3, 3], opset=17, ir_version=8)
    assert [layer["name"] for layer in layers] == ["layer1.0.bn1", "layer1.0.bn2", "features.9.conv.3"]


def test_torchscript_scopes_of_a_container_child_under_another_module_spell_its_path(tmp_path: Path) -> None:
    """ultralytics' RT-DETR: a decoder's ModuleList child is scoped ``layers.0`` under ``decoder`` under
    ``model.28``; with its weights shared with another layer (equal fresh ones and zeros) it was named after
    that layer (``model.11.norm1#2``), else by its scopes joined with slashes."""
    inits: list = []
    nodes = [
        _bn("/model.11/norm1/BatchNormalization", "x", "a", "model.11.norm1", inits),
        _bn("/model.28/decoder/layers.0/norm1/BatchNormalization", "a", "b", "model.11.norm1", inits),  # shared
        _bn("/model.28/decoder/layers.1/norm1/BatchNormalization", "b", "y", "model.28.decoder.layers.1.norm1", inits),
    ]
    layers = _inspected_layers(tmp_path / "rtdetr.onnx", nodes, inits, ["N", 4, 3, 3], opset=17, ir_version=8)
    assert [layer["name"] for layer in layers] == [
        "model.11.norm1",
        "model.28.decoder.layers.0.norm1",
        "model.28.decoder.layers.1.norm1",
    ]


def _lowered_group_norm(scope: str, x: str, y: str, weight: str, bias: str) -> list:
    """torch's legacy export of GroupNorm(2, 4) under ``scope``: x reshaped to [N, 2, -1], an
    InstanceNormalization of ones and zeros, reshaped back, then gamma and beta Unsqueezed to [4, 1, 1]."""
    return [
        helper.make_node("Reshape", [x, "groups_shape"], [f"{scope}/Reshape_output_0"], name=f"{scope}/Reshape"),
        helper.make_node(
            "InstanceNormalization",
            [f"{scope}/Reshape_output_0", "in_ones", "in_zeros"],
            [f"{scope}/InstanceNormalization_output_0"],
            name=f"{scope}/InstanceNormalization",
            epsilon=1e-5,
        ),
        helper.make_node("Shape", [x], [f"{scope}/Shape_output_0"], name=f"{scope}/Shape"),
        helper.make_node(
            "Reshape",
            [f"{scope}/InstanceNormalization_output_0", f"{scope}/Shape_output_0"],
            [f"{scope}/Reshape_1_output_0"],
            name=f"{scope}/Reshape_1",
        ),
        helper.make_node("Unsqueeze", [weight, "chw_axes"], [f"{scope}/Unsqueeze_output_0"], name=f"{scope}/Unsqueeze"),
        helper.make_node(
            "Mul",
            [f"{scope}/Reshape_1_output_0", f"{scope}/Unsqueeze_output_0"],
            [f"{scope}/Mul_output_0"],
            name=f"{scope}/Mul",
        ),
        helper.make_node(
            "Unsqueeze", [bias, "chw_axes"], [f"{scope}/Unsqueeze_1_output_0"], name=f"{scope}/Unsqueeze_1"
        ),
        helper.make_node("Add", [f"{scope}/Mul_output_0", f"{scope}/Unsqueeze_1_output_0"], [y], name=f"{scope}/Add"),
    ]


def test_a_lowered_group_norm_called_again_is_named_after_its_module_with_a_count(tmp_path: Path) -> None:
    """torchvision's RetinaNet head applies one GroupNorm to each FPN level: TorchScript scopes the later calls
    ``conv.1.1_1``; its gamma and beta, ones equal to another module's, are read through an Identity of that one
    (the exporter keeps one copy of equal weights). The later calls were named ``head.conv.1.1_1``."""
    inits = [
        numpy_helper.from_array(np.ones(4, np.float32), "backbone.bn.weight"),
        numpy_helper.from_array(np.zeros(4, np.float32), "backbone.bn.bias"),
        numpy_helper.from_array(np.array([0, 2, -1], np.int64), "groups_shape"),
        numpy_helper.from_array(np.ones(2, np.float32), "in_ones"),
        numpy_helper.from_array(np.zeros(2, np.float32), "in_zeros"),
        numpy_helper.from_array(np.array([1, 2], np.int64), "chw_axes"),
    ]
    nodes = [
        helper.make_node("Identity", ["backbone.bn.weight"], ["head.conv.1.1.weight"], name="Identity_0"),
        helper.make_node("Identity", ["backbone.bn.bias"], ["head.conv.1.1.bias"], name="Identity_1"),
        *_lowered_group_norm("/head/conv/conv.1/conv.1.1", "x", "a", "head.conv.1.1.weight", "head.conv.1.1.bias"),
        *_lowered_group_norm("/head/conv/conv.1/conv.1.1_1", "a", "y", "head.conv.1.1.weight", "head.conv.1.1.bias"),
    ]
    layers = _inspected_layers(tmp_path / "retina.onnx", nodes, inits, ["N", 4, 3, 3], opset=17, ir_version=8)
    assert [(layer["name"], layer["kind"]) for layer in layers] == [
        ("head.conv.1.1", "group"),
        ("head.conv.1.1#2", "group"),
    ]


def test_a_group_norm_inlined_from_a_module_function_is_named_by_the_call_it_came_from(tmp_path: Path) -> None:
    """torch.onnx.export(export_modules_as_functions={nn.GroupNorm}): the loader inlines the call
    /enc1/enc1.1/GroupNorm; onnx's inliner names the nodes and tensors it copies (Reshape_4__3), the call's output
    keeps its name, and gamma and beta are exporter-generated (onnx::Mul_77). It was named after that output."""
    inits = [
        numpy_helper.from_array(RNG.uniform(0.5, 1.5, (4, 1, 1)).astype(np.float32), "onnx::Mul_77"),
        numpy_helper.from_array(RNG.uniform(-0.5, 0.5, (4, 1, 1)).astype(np.float32), "onnx::Add_78"),
        numpy_helper.from_array(np.array([0, 2, -1], np.int64), "onnx::Reshape_58"),
        numpy_helper.from_array(np.ones(2, np.float32), "onnx::InstanceNormalization_60"),
        numpy_helper.from_array(np.zeros(2, np.float32), "onnx::InstanceNormalization_61"),
    ]
    nodes = [
        helper.make_node("Reshape", ["x", "onnx::Reshape_58"], ["r__3"], name="Reshape_4__3"),
        helper.make_node(
            "InstanceNormalization",
            ["r__3", "onnx::InstanceNormalization_60", "onnx::InstanceNormalization_61"],
            ["in__3"],
            name="InstanceNormalization_7__3",
            epsilon=1e-5,
        ),
        helper.make_node("Shape", ["x"], ["s__3"], name="Shape_8__3"),
        helper.make_node("Reshape", ["in__3", "s__3"], ["back__3"], name="Reshape_9__3"),
        helper.make_node("Mul", ["back__3", "onnx::Mul_77"], ["m__3"], name="Mul_10__3"),
        helper.make_node("Add", ["m__3", "onnx::Add_78"], ["/enc1/enc1.1/GroupNorm_output_0"], name="Add_11__3"),
        helper.make_node("Relu", ["/enc1/enc1.1/GroupNorm_output_0"], ["y"], name="/enc1/enc1.2/Relu"),
    ]
    layers = _inspected_layers(tmp_path / "gn.onnx", nodes, inits, ["N", 4, 3, 3], opset=17, ir_version=8)
    assert [(layer["name"], layer["kind"]) for layer in layers] == [("enc1.1", "group")]


def _layer_norm_chain(names: list[str], weight: str, bias: str, square: str, out: str = "y") -> tuple[list, list]:
    """A LayerNorm over the last axis of x written out op by op, its nine nodes named ``names`` in order (mean,
    shift, square by ``square``, variance, epsilon, root, divide, scale, bias), its output ``out``."""
    inits = [
        numpy_helper.from_array(RNG.uniform(0.5, 1.5, 8).astype(np.float32), weight),
        numpy_helper.from_array(RNG.uniform(-0.5, 0.5, 8).astype(np.float32), bias),
        numpy_helper.from_array(np.array(2.0, np.float32), "two"),
        numpy_helper.from_array(np.array(1e-5, np.float32), "eps"),
    ]
    squared = ["d", "two"] if square == "Pow" else ["d", "d"]
    steps = [
        ("ReduceMean", ["x"], "m", {"axes": [-1]}),
        ("Sub", ["x", "m"], "d", {}),
        (square, squared, "d2", {}),
        ("ReduceMean", ["d2"], "v", {"axes": [-1]}),
        ("Add", ["v", "eps"], "ve", {}),
        ("Sqrt", ["ve"], "sd", {}),
        ("Div", ["d", "sd"], "n", {}),
        ("Mul", ["n", weight], "g", {}),
        ("Add", ["g", bias], out, {}),
    ]
    nodes = [helper.make_node(op, ins, [o], name=name, **attrs) for (op, ins, o, attrs), name in zip(steps, names)]
    return nodes, inits


def test_a_torchscript_decomposed_layer_norm_takes_its_module_path(tmp_path: Path) -> None:
    """openWakeWord's heads (torch 2.x, opset 13): LayerNorm decomposed, the chain named after its mean's
    node ``/blocks.0/layer_norm/ReduceMean``; its affine reads ``blocks.0.layer_norm.weight``."""
    scope = "/blocks.0/layer_norm/"
    names = ["ReduceMean", "Sub", "Pow", "ReduceMean_1", "Add", "Sqrt", "Div", "Mul", "Add_1"]
    nodes, inits = _layer_norm_chain(
        [scope + n for n in names], "blocks.0.layer_norm.weight", "blocks.0.layer_norm.bias", square="Pow"
    )
    [layer] = _inspected_layers(tmp_path / "ln.onnx", nodes, inits, ["N", 16, 8], opset=13, ir_version=8)
    assert layer["name"] == "blocks.0.layer_norm" and layer["kind"] == "layer"


@pytest.mark.parametrize("alone", [True, False], ids=["scope-of-its-own", "scope-shared"])
def test_a_keras2onnx_layer_norm_chain_takes_the_scope_that_holds_it_alone(tmp_path: Path, alone: bool) -> None:
    """DTLN (keras2onnx): the chain of its custom InstantLayerNormalization named after its mean's node,
    ``model_2/instant_layer_normalization_1/Mean_reduce_min`` ("reduce_min" is the converter's suffix for a mean):
    the layer is the scope that holds the chain's nodes and nothing else; a scope other nodes share keeps the name."""
    scope = "model_2/instant_layer_normalization_1/"
    names = ["Mean_reduce_min", "sub", "Square", "Mean_1_reduce_min", "add", "Sqrt", "truediv", "mul", "add_1"]
    nodes, inits = _layer_norm_chain(
        [scope + n for n in names],
        scope + "mul/ReadVariableOp/resource:0",
        scope + "add_1/ReadVariableOp/resource:0",
        square="Mul",
        out="h",
    )
    nodes.append(helper.make_node("Relu", ["h"], ["y"], name="model_2/relu" if alone else scope + "relu"))
    [layer] = _inspected_layers(tmp_path / "dtln_ln.onnx", nodes, inits, ["N", 16, 8], opset=11, ir_version=6)
    assert layer["name"] == ("model_2/instant_layer_normalization_1" if alone else scope + "Mean_reduce_min")


def test_nodes_onnxruntime_fused_take_the_module_path_of_the_node_they_started_from(tmp_path: Path) -> None:
    """A model saved after onnxruntime's optimizer: a fused LayerNormalization named
    ``/layers.0/ln1/Mul/LayerNormFusion/`` (its weights layers.0.ln1.*), a SkipLayerNormalization named
    ``SkipLayerNormalization_token_266`` (an invented name: its weights' prefix instead)."""
    c = 8
    inits, nodes = [], []
    fused = [("ln1", "x", "h", "/layers.0/ln1/Mul/LayerNormFusion/"), ("ln2", "h", "y", "LayerNormalization_token_266")]
    for module, x, y, name in fused:
        inits.append(numpy_helper.from_array(RNG.uniform(0.5, 1.5, c).astype(np.float32), f"layers.0.{module}.weight"))
        inits.append(numpy_helper.from_array(RNG.uniform(-0.5, 0.5, c).astype(np.float32), f"layers.0.{module}.bias"))
        ins = [x, f"layers.0.{module}.weight", f"layers.0.{module}.bias"]
        nodes.append(helper.make_node("LayerNormalization", ins, [y], axis=-1, name=name))
    layers = _inspected_layers(tmp_path / "fused.onnx", nodes, inits, ["N", 16, c], opset=17, ir_version=8)
    assert [layer["name"] for layer in layers] == ["layers.0.ln1", "layers.0.ln2"]
    assert is_generated("SkipLayerNormalization_token_266", "SkipLayerNormalization")


def test_nodes_onnxruntime_fused_after_generated_names_take_their_gamma_and_beta_prefix(tmp_path: Path) -> None:
    """onnxruntime.transformers' SkipLayerNorm_AddBias_0 reads input, skip, gamma (ln2.weight), beta (ln2.bias)
    and the Linear's bias before it (fc.bias): named ln2 after gamma and beta alone (the three share no
    prefix); a LayerNormalization fused from paddle2onnx's p2o.Mul.178 is named after its weights."""
    c = 8
    inits = [
        numpy_helper.from_array(RNG.uniform(0.5, 1.5, c).astype(np.float32), name)
        for name in ("ln2.weight", "ln2.bias", "fc.bias", "layer_norm_43.w_0", "layer_norm_43.b_0")
    ]
    nodes = [
        helper.make_node(
            "SkipLayerNormalization",
            ["x", "x", "ln2.weight", "ln2.bias", "fc.bias"],
            ["h"],
            name="SkipLayerNorm_AddBias_0",
            domain="com.microsoft",
        ),
        helper.make_node(
            "LayerNormalization",
            ["h", "layer_norm_43.w_0", "layer_norm_43.b_0"],
            ["y"],
            axis=-1,
            name="p2o.Mul.178/LayerNormFusion/",
        ),
    ]
    layers = _inspected_layers(
        tmp_path / "fused.onnx", nodes, inits, ["N", 16, c], opset=17, ir_version=8, extra_opsets={"com.microsoft": 1}
    )
    assert [layer["name"] for layer in layers] == ["ln2", "layer_norm_43"]


def test_generated_names_and_weight_prefixes() -> None:
    for name in (
        "",
        "node_bn_3",
        "BatchNormalization_12",
        "p2o.BatchNormalization.3",
        "BatchNormalization@0",
        "batchnormalization__7",
        "/BatchNormalization_1",  # TorchScript, in a scripted module: no scope
    ):
        assert is_generated(name, "BatchNormalization"), name
    for name in ("bn1", "/layer1/bn1/BatchNormalization", "model/bn/FusedBatchNormV3", "stem_bn"):
        assert not is_generated(name, "BatchNormalization"), name
    assert weight_prefix(["head_bn.weight", "head_bn.running_mean"]) == "head_bn"
    # onnx.compose's prefixes, and TorchScript scopes that only look like one
    assert _compose_prefix("m1//layer1/layer1.0/bn1/BatchNormalization") == "m1/"
    assert _compose_prefix("a/b/node_layer_norm_1") == "a/b/"
    assert _compose_prefix("/encoder/node_mlp/bn/BatchNormalization") == ""
    assert _compose_prefix("node_layer_norm") == _compose_prefix("model/bn/FusedBatchNormV3") == ""
    assert weight_prefix(["ln.weight"]) == "ln"
    assert weight_prefix(["model/bn/gamma:0", "model/bn/beta:0"]) == "model/bn"
    assert weight_prefix(["conv1_bn_scale", "conv1_bn_offset"]) == "conv1_bn"
    assert weight_prefix(["bn.weight", "blocks.1.weight"]) is None
    assert weight_prefix(["onnx::BatchNormalization_12", "val_3"]) is None


@pytest.mark.parametrize("reshaped", [False, True], ids=["read-as-is", "reshaped-after"])
def test_a_paddle2onnx_layer_norm_chain_is_named_after_its_layer_norm_result(tmp_path: Path, reshaped: bool) -> None:
    # paddle2onnx 2.x: nodes named after their op types, weights helper.reshape.N, the chain's result written
    # by an Identity as the layer op's output (PP-OCRv5's recognizer); not "helper.reshape". Reshaped after:
    # the encoder's last LayerNorm in PP-OCRv6's recognizer, whose input comes through two Identities too; the
    # Reshape to another shape is the next layer's, and the copies before it are still the LayerNorm's
    c = 8
    constant = lambda name, value: numpy_helper.from_array(np.asarray(value, np.float32), name)
    inits = [
        constant("helper.constant.8", 2.0),
        constant("helper.constant.7", 1e-6),
        constant("helper.reshape.0", RNG.uniform(0.5, 1.5, c)),
        constant("helper.reshape.1", RNG.uniform(-0.5, 0.5, c)),
    ]
    chain = [
        *([("Identity.194", "Identity", ["x"], "p2o.pd_op.add.77.0")] if reshaped else []),
        ("Identity.179", "Identity", ["p2o.pd_op.add.77.0" if reshaped else "x"], "auto.cast.32"),
        ("ReduceMean.0", "ReduceMean", ["auto.cast.32"], "ReduceMean.1"),
        ("Sub.0", "Sub", ["auto.cast.32", "ReduceMean.1"], "Sub.1"),
        ("Pow.0", "Pow", ["Sub.1", "helper.constant.8"], "Pow.1"),
        ("ReduceMean.2", "ReduceMean", ["Pow.1"], "ReduceMean.3"),
        ("Add.178", "Add", ["ReduceMean.3", "helper.constant.7"], "Add.179"),
        ("Sqrt.0", "Sqrt", ["Add.179"], "Sqrt.1"),
        ("Div.0", "Div", ["Sub.1", "Sqrt.1"], "Div.1"),
        ("Mul.146", "Mul", ["Div.1", "helper.reshape.0"], "Mul.147"),
        ("Add.180", "Add", ["Mul.147", "helper.reshape.1"], "Add.181"),
        ("Identity.182", "Identity", ["Add.181"], "p2o.pd_op.layer_norm.0.0"),
        ("Reshape.73", "Reshape", ["p2o.pd_op.layer_norm.0.0", "flat"], "y")
        if reshaped
        else ("Relu.0", "Relu", ["p2o.pd_op.layer_norm.0.0"], "y"),
    ]
    inits.append(numpy_helper.from_array(np.array([0, -1], np.int64), "flat"))
    nodes = [
        helper.make_node(op, inputs, [out], name=name, **({"axes": [-1]} if op == "ReduceMean" else {}))
        for name, op, inputs, out in chain
    ]
    y_shape = ["N", 16 * c] if reshaped else None
    path = tmp_path / "p2o_ln.onnx"
    [layer] = _inspected_layers(path, nodes, inits, ["N", 16, c], opset=11, ir_version=7, y_shape=y_shape)
    assert layer["name"] == "p2o.pd_op.layer_norm.0.0"
    assert layer["output"] == "p2o.pd_op.layer_norm.0.0"
    assert "Identity.182" in layer["nodes"] and "Reshape.73" not in layer["nodes"]


@pytest.mark.parametrize(
    "weights, result, features, expected",
    [
        # paddle2onnx 1.2.11, LayerNorm over an axis of size 1 (the BN001 case): one-element gamma and beta
        (("layer_norm_0.w_0", "layer_norm_0.b_0"), "Add.5", 1, "layer_norm_0"),
        # paddle2onnx 2.x with weights folded (polygraphy) into tensors named after the op that made them
        (("Reshape.2", "Reshape.4"), "p2o.pd_op.layer_norm.0.0", 8, "p2o.pd_op.layer_norm.0.0"),
        # generated weights and the layer's result under paddle's own name: its ".tmp_N" is no part of the layer's
        (("helper.reshape.0", "helper.reshape.1"), "layer_norm_0.tmp_2", 8, "layer_norm_0"),
    ],
    ids=["old-size-1", "folded-weights", "paddle-temp-name"],
)
def test_a_paddle_layer_norm_chain_is_named_after_its_layer(
    tmp_path: Path, weights: tuple[str, str], result: str, features: int, expected: str
) -> None:
    constant = lambda name, value: numpy_helper.from_array(np.asarray(value, np.float32), name)
    inits = [
        constant("helper.constant.1", 2.0),
        constant("helper.constant.0", 1e-5),
        constant(weights[0], RNG.uniform(0.5, 1.5, features)),
        constant(weights[1], RNG.uniform(-0.5, 0.5, features)),
    ]
    chain = [
        ("ReduceMean.0", "ReduceMean", ["x"], "ReduceMean.1"),
        ("Sub.0", "Sub", ["x", "ReduceMean.1"], "Sub.1"),
        ("Pow.0", "Pow", ["Sub.1", "helper.constant.1"], "Pow.1"),
        ("ReduceMean.2", "ReduceMean", ["Pow.1"], "ReduceMean.3"),
        ("Add.2", "Add", ["ReduceMean.3", "helper.constant.0"], "Add.3"),
        ("Sqrt.0", "Sqrt", ["Add.3"], "Sqrt.1"),
        ("Div.0", "Div", ["Sub.1", "Sqrt.1"], "Div.1"),
        ("Mul.0", "Mul", ["Div.1", weights[0]], "Mul.1"),
        ("Add.4", "Add", ["Mul.1", weights[1]], result),
        ("Relu.0", "Relu", [result], "y"),
    ]
    nodes = [
        helper.make_node(op, inputs, [out], name=name, **({"axes": [-1]} if op == "ReduceMean" else {}))
        for name, op, inputs, out in chain
    ]
    path = tmp_path / "p2o_ln.onnx"
    collapses = int(features == 1)  # BN001: the layer's name is what the error names
    [layer] = _inspected_layers(path, nodes, inits, ["N", 16, features], opset=11, ir_version=7, exit_code=collapses)
    assert layer["name"] == expected


@pytest.mark.parametrize("keras3", [True, False], ids=["keras3-scopes", "tf-keras-scopes"])
def test_keras_3_exports_through_tensorflow_are_named_without_the_scopes_1(tmp_path: Path, keras3: bool) -> None:
    """Keras 3's model.export(format="onnx") on TensorFlow scopes layer ``head_bn`` of model ``plain`` as
    ``plain_1/head_bn_1``: every layer was named with TensorFlow's "_1". tf.keras's own scopes (``model_1`` beside
    ``model_1/dense``) keep theirs."""
    c = 8
    top, bn, dense = ("plain_1", "head_bn_1", "d1_1") if keras3 else ("model_1", "head_bn_1", "dense")
    constant = lambda name, value: numpy_helper.from_array(np.asarray(value, np.float32), name)
    inits = [
        constant(f"{top}/{bn}/gamma:0", RNG.uniform(0.5, 1.5, c)),
        constant(f"{top}/{bn}/beta:0", RNG.uniform(-0.5, 0.5, c)),
        constant(f"{top}/{bn}/mean:0", RNG.uniform(-0.5, 0.5, c)),
        constant(f"{top}/{bn}/var:0", RNG.uniform(0.5, 1.5, c)),
        constant(f"{top}/{dense}/kernel:0", RNG.normal(size=(c, c))),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", f"{top}/{dense}/kernel:0"], ["h"], name=f"{top}/{dense}/MatMul"),
        helper.make_node(
            "BatchNormalization",
            ["h", *(f"{top}/{bn}/{p}:0" for p in ("gamma", "beta", "mean", "var"))],
            ["y"],
            name=f"{top}/{bn}/FusedBatchNormV3",
        ),
    ]
    layers = _inspected_layers(tmp_path / "k.onnx", nodes, inits, ["N", c], opset=13, ir_version=8)
    assert [layer["name"] for layer in layers] == (["plain/head_bn"] if keras3 else ["model_1/head_bn_1"])
