"""Collapse (BN001) with symbolic spatial dims: a verdict about the shapes that really run.

`inspect` reports at most an info naming the condition in the model's own dim names, unless the set is one
element at batch 1 for every input size (after global pooling); `probe` replaces the prediction with what
it measured and shows n= (the normalized set's size) per layer and batch size; a missing --input-shape is
one exit-2 line naming every unsized dim once with one complete example.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from bncheck.cli import main
from tests.builders import bn_model


def _conv_bn_head(path: Path) -> str:
    """x[N, 3, H, W] -> Conv -> train-mode BN -> GlobalAveragePool -> train-mode BN (a 1x1 head)."""
    rng = np.random.default_rng(0)

    def init(name: str, value) -> onnx.TensorProto:
        return numpy_helper.from_array(np.asarray(value, np.float32), name)

    inits = [init("w", rng.normal(size=(8, 3, 3, 3)))]
    for p in ("conv_bn", "head_bn"):
        inits += [
            init(f"{p}.weight", np.ones(8)),
            init(f"{p}.bias", np.full(8, 0.1)),
            init(f"{p}.running_mean", np.full(8, 0.2)),
            init(f"{p}.running_var", np.full(8, 1.5)),
        ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node(
            "BatchNormalization",
            ["c", "conv_bn.weight", "conv_bn.bias", "conv_bn.running_mean", "conv_bn.running_var"],
            ["y", "rm", "rv"],
            name="conv_bn",
            training_mode=1,
        ),
        helper.make_node("GlobalAveragePool", ["y"], ["g"], name="gap"),
        helper.make_node(
            "BatchNormalization",
            ["g", "head_bn.weight", "head_bn.bias", "head_bn.running_mean", "head_bn.running_var"],
            ["z", "rm2", "rv2"],
            name="head_bn",
            training_mode=1,
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 8, 1, 1])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return str(path)


def _json(args: list[str], code: int) -> dict:
    result = CliRunner().invoke(main, [*args, "--format", "json", "--select", "BN001"])
    assert result.exit_code == code, result.output
    return json.loads(result.stdout)


def test_inspect_gives_an_info_in_the_models_dim_names_when_the_set_needs_symbolic_dims_of_1(tmp_path):
    doc = _json(["inspect", bn_model(tmp_path / "m.onnx", hw=("H", "W"), training=True)], 0)
    [finding] = doc["findings"]
    assert (finding["code"], finding["severity"], finding["evidence"]["kind"]) == ("BN001", "info", "conditional")
    assert "batch size 1 and 'H' = 1 and 'W' = 1" in finding["message"]
    assert "unk__" not in finding["message"]


def test_inspect_keeps_the_error_for_a_set_of_one_at_batch_1_whatever_the_input_size(tmp_path):
    doc = _json(["inspect", _conv_bn_head(tmp_path / "m.onnx")], 1)
    by_layer = {f["layer"]: f for f in doc["findings"]}
    assert (by_layer["head_bn"]["severity"], by_layer["head_bn"]["evidence"]["kind"]) == ("error", "static")
    # the conv BN's output dims are onnx's unk__N: the message names the axes and the input's own dims
    conv = by_layer["conv_bn"]
    assert conv["severity"] == "info"
    assert "axis 2 = 1 and axis 3 = 1" in conv["message"] and "x: N x 3 x H x W" in conv["message"]


def test_probe_replaces_the_prediction_with_the_observation_and_shows_n(tmp_path):
    path = _conv_bn_head(tmp_path / "m.onnx")
    doc = _json(["probe", path, "--input-shape", "x:3x20x16", "--batch-sizes", "1,2"], 1)
    assert [(f["layer"], f["severity"], f["evidence"]["kind"]) for f in doc["findings"]] == [
        ("head_bn", "error", "observed"),
    ]
    sizes = {layer["name"]: layer["normalized_set_size"]["by_batch_size"] for layer in doc["layers"]}
    assert sizes == {"conv_bn": {"1": 320, "2": 640}, "head_bn": {"1": 1, "2": 2}}
    runs = doc["probe"]["runs"][0]["layers"]
    assert {b: e["normalized_set_size"] for b, e in runs["conv_bn"]["by_batch_size"].items()} == {"1": 320, "2": 640}
    table = CliRunner().invoke(
        main, ["probe", path, "--input-shape", "x:3x20x16", "--batch-sizes", "1,2"], env={"COLUMNS": "120"}
    )
    assert "n=320 ok" in table.stdout and "n=1 constant" in table.stdout


def test_probe_with_data_takes_the_unsized_dims_from_its_shape(tmp_path):
    path = bn_model(tmp_path / "m.onnx", hw=("H", "W"), training=True)
    data = tmp_path / "x.npy"
    np.save(data, np.random.default_rng(1).normal(size=(4, 3, 5, 7)).astype(np.float32))
    doc = _json(["probe", path, "--data", str(data), "--batch-sizes", "1,2"], 0)
    assert doc["findings"] == []
    assert doc["layers"][0]["normalized_set_size"]["by_batch_size"] == {"1": 35, "2": 70}


def test_missing_input_shape_names_every_unsized_dim_once_with_one_complete_example(tmp_path):
    inits = [numpy_helper.from_array(np.ones(3, np.float32), n) for n in ("s", "b", "m", "v")]
    graph = helper.make_graph(
        [
            helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], name="bn"),
            helper.make_node("Add", ["y", "x2"], ["z"], name="add"),
        ],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"]),
            helper.make_tensor_value_info("x2", TensorProto.FLOAT, ["N", 3, "H", None]),
        ],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    path = tmp_path / "two.onnx"
    onnx.save(model, str(path))
    result = CliRunner().invoke(main, ["probe", str(path)])
    assert result.exit_code == 2
    [line] = result.stderr.strip().splitlines()
    assert line.count("'H'") == 1 and line.count("'W'") == 1 and "input 'x2' axis 3 (unnamed)" in line
    assert "--input-shape x:3x64x64 --input-shape x2:3x64x64" in line
    example = line.split("e.g. ")[1].split(" (")[0].split()
    rerun = CliRunner().invoke(main, ["probe", str(path), *example, "--batch-sizes", "1,2"])
    assert rerun.exit_code == 0, rerun.output


def _seen(batch: int, channels: int, per_sample: int):
    from bncheck.model import LayerProbe, TensorStats

    zeros = np.zeros((batch, channels))
    stats = TensorStats(
        batch,
        batch * per_sample,
        zeros,
        zeros,
        np.zeros(channels),
        np.zeros(channels),
        np.zeros(channels, np.int64),
        np.zeros(channels, np.int64),
    )
    return LayerProbe("l", batch, stats, None)


def test_observed_set_size_follows_the_layers_axes_at_the_measured_counts():
    from bncheck.model import Kind, NormLayer, observed_set_size

    def layer(kind, axes, shape, channel_axis=1, **kw):
        return NormLayer(
            "l", kind, "Op", ("l",), "x", "y", axes=axes, input_shape=shape, channel_axis=channel_axis, **kw
        )

    # batch norm over N, H, W with symbolic H, W: 2 samples of 5x7 maps
    assert observed_set_size(layer(Kind.BATCH, (0, 2, 3), ("N", 3, "H", "W")), _seen(2, 3, 35)) == 70
    # instance norm: per sample, over H, W
    assert observed_set_size(layer(Kind.INSTANCE, (2, 3), ("N", 3, "H", 7)), _seen(2, 3, 35)) == 35
    # layer norm over the last (channel) axis of [N, T, D]: T is symbolic and not in the set
    assert observed_set_size(layer(Kind.LAYER, (2,), ("N", "T", 16), channel_axis=2), _seen(2, 16, 9)) == 16
    # batch norm of unknown rank: every axis but the channel's, the count per channel
    assert observed_set_size(layer(Kind.BATCH, None, None), _seen(2, 3, 40)) == 80
    # instance norm of unknown rank (pyannote's after an If): every axis but the batch's and the channel's
    assert observed_set_size(layer(Kind.INSTANCE, None, None), _seen(2, 80, 5325)) == 5325
    # a set over H but not W, both symbolic: their sizes cannot be told apart
    assert observed_set_size(layer(Kind.MOMENTS, (2,), ("N", 3, "H", "W")), _seen(2, 3, 35)) is None


def _extremes(doc: dict, layer: str) -> set[bool]:
    """Whether the layer's min and max were measured, over every batch size and side the probe ran."""
    found = set()
    for per_size in doc["probe"]["runs"][0]["layers"][layer]["by_batch_size"].values():
        for side in ("input", "output"):
            if per_size.get(side):
                found.add(per_size[side]["min"] is not None and per_size[side]["max"] is not None)
    return found


def test_probe_skips_min_and_max_where_the_input_shape_makes_every_set_larger_than_one(tmp_path):
    # the file leaves H and W open; at 20x16 the conv BN normalizes 320 elements per sample: it cannot
    # collapse, as in a file with 20x16 written in. The 1x1 head can, and keeps its min and max.
    path = _conv_bn_head(tmp_path / "m.onnx")
    doc = _json(["probe", path, "--input-shape", "x:3x20x16", "--batch-sizes", "1,2"], 1)
    assert _extremes(doc, "conv_bn") == {False}
    assert _extremes(doc, "head_bn") == {True}


def test_probe_measures_min_and_max_where_the_input_shape_leaves_a_set_of_one(tmp_path):
    path = _conv_bn_head(tmp_path / "m.onnx")
    doc = _json(["probe", path, "--input-shape", "x:3x1x1", "--batch-sizes", "1,2"], 1)
    assert _extremes(doc, "conv_bn") == {True}
    observed = {f["layer"] for f in doc["findings"] if f["evidence"]["kind"] == "observed"}
    assert observed == {"conv_bn", "head_bn"}


def test_can_collapse_decides_an_open_set_from_the_probes_shapes_only_where_the_batch_axis_is_symbolic():
    from bncheck.backends.onnx.instrument import can_collapse
    from bncheck.model import Kind, NormLayer

    def layer(shape):
        return NormLayer("l", Kind.BATCH, "BatchNormalization", ("l",), "x", "y", axes=(0, 2, 3), input_shape=shape)

    open_hw = layer(("N", 8, "unk__1", "unk__2"))
    assert can_collapse(open_hw)  # the file alone leaves it open
    assert not can_collapse(open_hw, ({"x": (32, 8, 20, 16)}, 32))
    assert can_collapse(open_hw, ({"x": (32, 8, 1, 1)}, 32))
    assert can_collapse(open_hw, ({"x": (32, 8, 20, "unk__3")}, 32))  # still open at the probe's sizes
    assert can_collapse(open_hw, ({"y": (32, 8, 20, 16)}, 32))  # the input's shape not inferred
    # axis 0 fixed in the file, or not the batch the shapes were inferred at: its other dims may hold it
    assert can_collapse(layer((1, 8, "unk__1", "unk__2")), ({"x": (1, 8, 20, 16)}, 1))
    assert can_collapse(open_hw, ({"x": (64, 8, 20, 16)}, 32))
