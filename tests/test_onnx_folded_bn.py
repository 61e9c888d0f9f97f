"""Batch norms onnxoptimizer's ``fuse_bn_into_conv`` folded into convolutions as ops (tests.builders.folded_conv_bn_model,
the form onnxoptimizer 0.4.2 writes): read back at load as a BatchNormalization after each convolution, so that
their stored statistics are checked and repaired as the unprocessed file's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper

import bncheck
from bncheck.backends.onnx.load import load_onnx
from bncheck.cli import main
from tests.builders import folded_conv_bn_model, graph_file, tf2onnx_folded_model, torch_folded_model


def _data(n: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((n, 3, 8, 8)) * 1.5 + 0.5).astype(np.float32)


def _run(model: str | bytes, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input": x})[0]


@pytest.mark.parametrize(
    "options",
    [{}, {"opset": 11}, {"conv_bias": False}, {"opset": 7, "ir3": True}],
    ids=["opset17", "opset11-axes-attribute", "no-conv-bias", "ir3-initializers-as-inputs"],
)
def test_folded_batch_norms_are_layers_named_after_their_convolutions(tmp_path: Path, options: dict) -> None:
    path = folded_conv_bn_model(tmp_path / "folded.onnx", **options)
    report = bncheck.inspect(path)
    assert [(layer.name, layer.op_type, layer.uses_running_stats) for layer in report.layers] == [
        ("conv1", "BatchNormalization", True),
        ("conv2", "BatchNormalization", True),
    ]
    assert any("fuse_bn_into_conv" in note.message for note in report.notes)
    assert report.findings == [] and report.exit_code == 0


def test_never_updated_statistics_in_a_fold_fail_the_gate(tmp_path: Path) -> None:
    path = folded_conv_bn_model(tmp_path / "stale.onnx", stale=True)
    result = CliRunner().invoke(main, ["inspect", path, "--format", "json"])
    assert result.exit_code == 1
    findings = json.loads(result.output)["findings"]
    assert [(f["code"], f["layer"], f["severity"]) for f in findings] == [("BN003", "conv2", "error")]


def test_the_fold_gets_the_findings_of_the_file_before_it(tmp_path: Path) -> None:
    data = tmp_path / "calib.npy"
    np.save(data, _data(64, 1))
    reports = [
        bncheck.probe(folded_conv_bn_model(tmp_path / f"{folded}.onnx", stale=True, folded=folded), data=str(data))
        for folded in (False, True)
    ]
    before, after = ([(f.code, f.severity.label, f.message) for f in r.findings] for r in reports)
    assert before and [code for code, _, _ in before] == ["BN003", "BN003"]
    assert after == before


@pytest.mark.parametrize("opset", [17, 11])
def test_the_graph_read_back_computes_what_the_fold_computes(tmp_path: Path, opset: int) -> None:
    path = folded_conv_bn_model(tmp_path / "folded.onnx", opset=opset)
    # with the shapes a tool records (onnxsim, shape inference) for the fold's results too
    onnx.save(onnx.shape_inference.infer_shapes(onnx.load(path)), path)
    handle = load_onnx(path)
    ops = [node.op_type for node in handle.model.graph.node]
    assert ops[:3] == ["Conv", "BatchNormalization", "Relu"] and "Sqrt" not in ops
    # the fold's epsilon and axes go with the arithmetic that read them: no initializer is left unread
    read = {t for node in handle.model.graph.node for t in node.input}
    assert {t.name for t in handle.model.graph.initializer} <= read
    # and no recorded shape names a tensor no node writes any more
    written = {t for node in handle.model.graph.node for t in node.output}
    assert {v.name for v in handle.model.graph.value_info} <= written
    x = _data(6, 2)
    expected = _run(path, x)
    got = _run(handle.model.SerializeToString(), x)
    assert np.max(np.abs(got - expected)) <= 1e-5 * np.max(np.abs(expected))


def test_fix_repairs_the_fold_as_it_repairs_the_file_before_it(tmp_path: Path) -> None:
    data = tmp_path / "calib.npy"
    np.save(data, _data(64, 1))
    outputs = []
    for folded in (False, True):
        path = folded_conv_bn_model(tmp_path / f"{folded}.onnx", stale=True, folded=folded)
        fixed = str(tmp_path / f"{folded}_fixed.onnx")
        report = bncheck.fix(path, fixed, data=str(data))
        assert report.exit_code == 0 and Path(fixed).exists()
        onnx.checker.check_model(onnx.load(fixed))
        outputs.append(_run(fixed, _data(8, 3)))
    unprocessed, fold = outputs
    assert np.max(np.abs(fold - unprocessed)) <= 1e-5 * np.max(np.abs(unprocessed))
    # and the repaired fold passes the probe it failed
    assert bncheck.probe(str(tmp_path / "True_fixed.onnx"), data=str(data)).exit_code == 0


def test_a_fold_whose_weights_another_node_reads_stays_as_written(tmp_path: Path) -> None:
    path = folded_conv_bn_model(tmp_path / "shared.onnx", shared_weight=True)
    report = bncheck.inspect(path)
    # conv2's folded weight also feeds /side/Conv: that fold is left, conv1's is read back
    assert [layer.name for layer in report.layers] == ["conv1"]
    x = _data(4, 2)
    handle = load_onnx(path)
    assert np.allclose(_run(handle.model.SerializeToString(), x), _run(path, x), rtol=1e-5, atol=1e-6)


def test_batch_norms_torchs_optimizer_folded_are_named_in_a_warning(tmp_path: Path) -> None:
    report = bncheck.inspect(torch_folded_model(tmp_path / "dynamo.onnx", exporter="dynamo"))
    assert report.layers == [] and report.exit_code == 0
    (note,) = [n for n in report.notes if "folded" in n.message]
    assert note.level == "warning"
    assert "2 BatchNorm(s) ('1', '5')" in note.message and "optimize=False" in note.message


def test_a_convolution_of_weights_constant_folding_computed_gets_the_export_option(tmp_path: Path) -> None:
    report = bncheck.inspect(torch_folded_model(tmp_path / "ts.onnx", exporter="torchscript"))
    (note,) = [n for n in report.notes if "constant folding" in n.message]
    assert note.level == "info" and "'/0/Conv'" in note.message and "do_constant_folding=False" in note.message


def test_a_plain_export_gets_no_fold_note(tmp_path: Path) -> None:
    report = bncheck.inspect(torch_folded_model(tmp_path / "plain.onnx", exporter="plain"))
    assert not [n for n in report.notes if "fold" in n.message or "fuse" in n.message]


def test_an_ultralytics_export_says_its_batch_norms_were_fused_before_the_export(tmp_path: Path) -> None:
    metadata = {"author": "Ultralytics", "version": "8.2.46", "task": "detect", "stride": "32"}
    path = torch_folded_model(tmp_path / "yolo.onnx", exporter="plain", metadata=metadata)
    (note,) = [n for n in bncheck.inspect(path).notes if "Ultralytics" in n.message]
    assert note.level == "info" and "Ultralytics 8.2.46" in note.message and "model.fuse()" in note.message


def test_keras_batch_norms_tf2onnx_folded_are_named_in_a_warning(tmp_path: Path) -> None:
    report = bncheck.inspect(tf2onnx_folded_model(tmp_path / "tf.onnx"))
    assert report.layers == [] and report.exit_code == 0
    (note,) = [n for n in report.notes if "tf2onnx" in n.message]
    assert note.level == "warning"
    assert "2 Keras BatchNormalization layer(s) ('functional/bn_c1', 'functional/bn_fc')" in note.message
    assert "Keras file" in note.message


def test_a_keras_batch_norm_the_walk_found_is_not_called_folded(tmp_path: Path) -> None:
    report = bncheck.inspect(tf2onnx_folded_model(tmp_path / "tf.onnx", found=True))
    assert len(report.layers) == 1
    (note,) = [n for n in report.notes if "tf2onnx" in n.message]
    assert "1 Keras BatchNormalization layer(s) ('functional/bn_fc')" in note.message


@pytest.mark.parametrize("scope", ["functional_1/bn_dw_1/batchnorm/", "scale_"], ids=["keras-scope", "no-scope"])
def test_a_per_channel_mul_of_a_keras_batch_norm_scope_is_named_once(tmp_path: Path, scope: str) -> None:
    """tf2onnx leaves a depthwise convolution's BatchNormalization as a per-channel Mul and Add in the layer's
    ``batchnorm`` scope: its note names the Keras layer, and the per-channel-Mul note did the same fold a
    second time. A per-channel Mul outside such a scope keeps that note."""
    rng = np.random.default_rng(5)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, (4, 1, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, (1, 4, 1, 1)).astype(np.float32), f"{scope}mul:0"),
        numpy_helper.from_array(rng.normal(0, 0.1, (1, 4, 1, 1)).astype(np.float32), f"{scope}sub:0"),
    ]
    nodes = [
        helper.make_node(
            "Conv", ["input", "w"], ["dw"], group=4, pads=[1, 1, 1, 1], name="functional_1/dw_1/depthwise"
        ),
        helper.make_node("Mul", ["dw", f"{scope}mul:0"], ["scaled"], name=f"{scope}mul_1"),
        helper.make_node("Add", ["scaled", f"{scope}sub:0"], ["logits"], name=f"{scope}add_1"),
    ]
    io = (("input", ["N", 4, 8, 8]), ("logits", ["N", 4, 8, 8]))
    report = bncheck.inspect(graph_file(tmp_path / "dw.onnx", nodes, inits, io, opset=13, producer="tf2onnx"))
    notes = [n.message for n in report.notes]
    per_channel = [n for n in notes if "followed by a per-channel Mul" in n]
    keras = [n for n in notes if "Keras BatchNormalization layer(s)" in n]
    if scope == "scale_":
        assert len(per_channel) == 1 and keras == []
    else:
        assert per_channel == [] and len(keras) == 1 and "'functional/bn_dw'" in keras[0]


@pytest.mark.parametrize("with_add", [True, False], ids=["batch-norm-map", "input-normalization"])
def test_a_batch_norm_whose_variance_torch_folded_is_named(tmp_path: Path, with_add: bool) -> None:
    """Keras 3's ONNX export on the torch backend writes a BatchNormalization as ``(x - mean) * k + beta`` (its
    ``batch_normalization``), k = gamma * rsqrt(var + eps) folded into one constant by torch's exporter, channels
    last after the convolution (the form of such an export, names and all): a note names it, where the walk found
    nothing and said only that. ``(x - mean) * k`` with no shift (an input's normalization) gets none."""
    rng = np.random.default_rng(6)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "onnx::Conv_143"),
        numpy_helper.from_array(rng.normal(0, 0.1, (1, 1, 1, 8)).astype(np.float32), "onnx::Sub_169"),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, (1, 1, 1, 8)).astype(np.float32), "onnx::Mul_178"),
        numpy_helper.from_array(rng.normal(0, 0.1, (1, 1, 1, 8)).astype(np.float32), "onnx::Add_172"),
    ]
    nodes = [
        helper.make_node("Transpose", ["input"], ["nchw"], perm=[0, 3, 1, 2], name="/Transpose"),
        helper.make_node("Conv", ["nchw", "onnx::Conv_143"], ["conv"], pads=[1, 1, 1, 1], name="/Conv"),
        helper.make_node("Transpose", ["conv"], ["nhwc"], perm=[0, 2, 3, 1], name="/Transpose_1"),
        helper.make_node("Sub", ["nhwc", "onnx::Sub_169"], ["centred"], name="/Sub"),
        helper.make_node("Mul", ["centred", "onnx::Mul_178"], ["scaled" if with_add else "logits"], name="/Mul"),
    ]
    if with_add:
        nodes.append(helper.make_node("Add", ["scaled", "onnx::Add_172"], ["logits"], name="/Add_1"))
    else:
        inits.pop()
    io = (("input", ["N", 8, 8, 3]), ("logits", ["N", 8, 8, 8]))
    report = bncheck.inspect(graph_file(tmp_path / "kt.onnx", nodes, inits, io, opset=17, producer="pytorch"))
    notes = [n for n in report.notes if "(x - c) * k + b" in n.message]
    assert report.layers == [] and report.exit_code == 0
    if with_add:
        (note,) = notes
        assert note.level == "info" and "1 per-channel map(s)" in note.message and "('/Sub')" in note.message
        assert "Keras file" in note.message
    else:
        assert notes == []
