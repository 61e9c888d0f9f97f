"""A BatchNormalization fed its own input's batch moments: torch's BatchNorm2d(track_running_stats=False), as its
exporters write it (tests.builders.batch_moments_bn_model). One layer using batch statistics, one BN002 on it (not
on its ReduceMeans), and `fix --data` writes an inference BatchNormalization of the data's statistics in place
of the moments."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import bncheck
from bncheck.fixing import fix
from tests.builders import batch_moments_bn_model

FORMS = ("dynamo", "torchscript")


def _data(n: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((n, 3, 6, 6)) * 1.5 + 0.5).astype(np.float32)


def _run(path: str, x: np.ndarray, output: str = "logits") -> np.ndarray:
    """``output`` for ``x``, in the file's fixed batches of 4."""
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run([output], {"input": x[i : i + 4]})[0] for i in range(0, len(x), 4)])


@pytest.mark.parametrize("hw", [6, 0], ids=["2d", "1d"])
@pytest.mark.parametrize("form", FORMS)
def test_batch_norm_fed_its_batch_moments_is_one_layer_with_one_train_mode_error(
    tmp_path: Path, form: str, hw: int
) -> None:
    path = batch_moments_bn_model(tmp_path / f"{form}.onnx", form=form, hw=hw)
    report = bncheck.inspect(path)
    (layer,) = report.layers
    assert layer.name == "1" and layer.batch_statistics and not layer.uses_running_stats
    moments = {"node_ReduceMean_1", "node_ReduceMean_5"} if form == "dynamo" else {"/1/ReduceMean", "/1/ReduceMean_2"}
    assert moments <= set(layer.nodes)
    # a BatchNorm1d on [N, C]: one value per channel at batch 1, the collapse's info beside the error
    expected = [("BN002", "1", "error")] + ([("BN001", "1", "info")] if not hw else [])
    assert [(f.code, f.layer, f.severity.label) for f in report.findings] == expected
    finding = report.findings[0]
    assert "track_running_stats" in finding.hint and "--data" in finding.hint
    assert report.exit_code == 1


@pytest.mark.parametrize("form", FORMS)
def test_probe_measures_the_batch_moments_layer_as_the_batch_dependence(tmp_path: Path, form: str) -> None:
    path = batch_moments_bn_model(tmp_path / f"{form}.onnx", form=form)
    report = bncheck.probe(path, batch_sizes=[1, 2, 4])
    assert [(f.code, f.layer) for f in report.findings] == [("BN002", "1")]
    assert report.findings[0].evidence["kind"] == "batch-dependence"


@pytest.mark.parametrize("form", FORMS)
def test_a_file_fixed_to_batch_one_reads_the_same_layer_from_both_exporters(tmp_path: Path, form: str) -> None:
    """At a fixed batch of 1 axis 0 is no batch as shipped, but it is the batch a re-export (and the probe's relaxed
    copy) feeds: the layer is the same batch-statistics layer as at batch 4, not a per-sample norm of the dynamo
    form (which read so, its ReduceMean a separate warning) beside a train-mode error for the TorchScript form."""
    path = batch_moments_bn_model(tmp_path / f"{form}.onnx", form=form, batch=1)
    report = bncheck.inspect(path)
    (layer,) = report.layers
    assert layer.kind.value == "batch" and layer.batch_statistics
    assert [(f.code, f.layer, f.severity.label) for f in report.findings] == [("BN002", "1", "error")]


def test_moments_of_another_tensor_are_no_batch_moments_of_the_layer(tmp_path: Path) -> None:
    """The BN reads the moments of -x, not of its input x: statistics it does not own, computed at run time; the
    ReduceMeans over the batch are reductions of their own, reported apart as before."""
    path = batch_moments_bn_model(tmp_path / "m.onnx", form="dynamo")
    model = onnx.load(path)
    for node in model.graph.node:
        if node.name in ("node_ReduceMean_1", "node_ReduceMean_2", "node_Sub_3"):
            node.input[0] = "negconv"
    model.graph.node.insert(1, onnx.helper.make_node("Neg", ["conv"], ["negconv"], name="/0/Neg"))
    onnx.save(model, path)
    report = bncheck.inspect(path)
    (layer,) = report.layers
    assert not layer.batch_statistics and layer.nodes == ("node__native_batch_norm_legit__0",)
    assert "node_ReduceMean_1" in {f.layer for f in report.findings if f.code == "BN002"}


@pytest.mark.parametrize("form", FORMS)
def test_fix_with_data_writes_the_data_statistics_in_place_of_the_batch_moments(tmp_path: Path, form: str) -> None:
    """The written model's outputs are the BN formula with the calibration data's moments of the BN's input (the
    truth, from the Conv's output over the data), at every batch composition; no batch reduction is left."""
    path = batch_moments_bn_model(tmp_path / f"{form}.onnx", form=form)
    calib = _data(64, seed=1)
    np.savez(tmp_path / "calib.npz", input=calib)
    out = str(tmp_path / "fixed.onnx")
    report = fix(path, out, str(tmp_path / "calib.npz"))
    expected = "replaced-moments" if form == "dynamo" else "to-inference"
    assert [(e.layer, e.action) for e in report.fix.outcome.layers] == [("1", expected)]
    fixed = onnx.load(out)
    onnx.checker.check_model(fixed, full_check=True)
    ops = [n.op_type for n in fixed.graph.node]
    assert "ReduceMean" not in ops and "Transpose" not in ops and ops.count("BatchNormalization") == 1, ops
    # the truth: the original graph's BN input over the data, and the formula with its moments
    src = onnx.load(path)
    src.graph.output.append(onnx.helper.make_tensor_value_info("conv", onnx.TensorProto.FLOAT, None))
    probe_path = str(tmp_path / "conv_out.onnx")
    onnx.save(src, probe_path)
    conv = _run(probe_path, calib, "conv").astype(np.float64)
    mean, var = conv.mean(axis=(0, 2, 3)), conv.var(axis=(0, 2, 3))
    test = _data(4, seed=9)
    h = _run(probe_path, test, "conv").astype(np.float64)
    params = {t.name: onnx.numpy_helper.to_array(t).astype(np.float64) for t in src.graph.initializer}
    shape = (1, -1, 1, 1)
    bn = (h - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + 1e-5) * params["1.weight"].reshape(shape) + params[
        "1.bias"
    ].reshape(shape)
    want = np.maximum(bn, 0).mean(axis=(2, 3)) @ params["fc.weight"] + params["fc.bias"]
    got = _run(out, test)
    assert np.max(np.abs(got - want)) <= 1e-4 * max(1.0, float(np.abs(want).max()))
    assert report.fix.after is not None and not [f for f in report.fix.after.findings if f.code == "BN002"]


def test_fix_without_data_leaves_the_batch_moments_and_asks_for_data(tmp_path: Path) -> None:
    path = batch_moments_bn_model(tmp_path / "m.onnx", form="dynamo")
    report = fix(path, None, None, dry_run=True)
    (entry,) = report.fix.outcome.layers
    assert entry.layer == "1" and entry.action == "replaced-moments" and "without --data" in entry.reason
