"""The models onnx itself ships for its normalization ops, loaded and classified by the ONNX backend.

Two sources: the node test cases onnx ships as code (``collect_testcases()``: the op alone and its
``_expanded`` function body, whose decomposed chain must be classified like the op), and the opset-6 model
files converted from PyTorch 0.3 (``pytorch-converted/test_BatchNorm*``), which onnxruntime no longer runs but
bncheck must still read: their running statistics are exactly the initial 0 and 1 (the modules were never
trained), which is what BN003 stale-stats exists to catch.
"""

from __future__ import annotations

import glob
import os
import re
import warnings
from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from bncheck.backends.onnx import OnnxBackend
from bncheck.model import Kind

FAMILIES = {
    "test_batchnorm_": Kind.BATCH,
    "test_instancenorm_": Kind.INSTANCE,
    "test_layer_normalization_": Kind.LAYER,
    "test_group_normalization_": Kind.GROUP,
    "test_rms_normalization_": Kind.RMS,
}
PYTORCH_CONVERTED = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "pytorch-converted")


@pytest.fixture(scope="module")
def cases():
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():  # onnx's generators warn about float overflow in unrelated cases
        warnings.simplefilter("ignore")
        collected = collect_testcases(None)
    return {c.name: c for c in collected if c.name.startswith(tuple(FAMILIES)) or c.name.startswith("test_mvn")}


@pytest.fixture(scope="module")
def loaded(cases, tmp_path_factory):
    """Every case saved to a file and loaded by the real backend: name -> ModelView."""
    folder = tmp_path_factory.mktemp("onnx-node-cases")
    views = {}
    for name, case in cases.items():
        path = folder / f"{name}.onnx"
        onnx.save(case.model, str(path))
        views[name] = OnnxBackend().load(str(path))
    return views


def family(name: str) -> str:
    return next(prefix for prefix in FAMILIES if name.startswith(prefix))


def expected_axes(name: str, rank: int) -> tuple[int, ...]:
    """LayerNorm/RMSNorm tests name their axis (`axis1`, `axis_negative_2`; default -1)."""
    found = re.search(r"axis(_negative)?_?(\d+)", name)
    axis = -1 if found is None else int(found.group(2)) * (-1 if found.group(1) else 1)
    axis = axis + rank if axis < 0 else axis
    return tuple(range(axis, rank))


def test_every_family_is_present(cases):
    counts = Counter(family(n) for n in cases if not n.startswith("test_mvn"))
    assert counts["test_batchnorm_"] == 4 and counts["test_instancenorm_"] == 2
    layer_names = [n for n in cases if n.startswith("test_layer_normalization_")]
    ops = [n for n in layer_names if "_expanded" not in n]
    assert len(ops) == 19 and len(layer_names) == 3 * len(ops)  # each op, _expanded, _expanded_ver18
    assert counts["test_group_normalization_"] == 4
    assert any(n.endswith("_expanded") for n in cases if n.startswith("test_layer_normalization_"))


def test_every_case_is_one_layer_of_its_family_kind(loaded):
    for name, view in loaded.items():
        if name.startswith("test_mvn"):
            continue
        assert len(view.layers) == 1, name
        (layer,) = view.layers
        assert layer.kind is FAMILIES[family(name)], (name, layer.kind)
        assert layer.op_type == ("decomposed" if "_expanded" in name else layer.op_type)


def test_expanded_function_bodies_match_their_op(loaded):
    compared = 0
    for name, view in loaded.items():
        if "_expanded" not in name:
            continue
        op_name = re.sub(r"_expanded(_ver18)?$", "", name)
        (op_layer,), (chain,) = loaded[op_name].layers, view.layers
        assert chain.op_type == "decomposed" and op_layer.op_type != "decomposed"
        assert chain.input == op_layer.input and chain.output == op_layer.output, name
        if name.startswith("test_mvn"):  # the body has no MVN op left: moments over (0, 2, 3) = batch kind
            assert (chain.axes, chain.batch_statistics) == (op_layer.axes, op_layer.batch_statistics)
            compared += 1
            continue
        assert (chain.kind, chain.axes, chain.epsilon, chain.batch_statistics, chain.channels, chain.groups) == (
            op_layer.kind,
            op_layer.axes,
            op_layer.epsilon,
            op_layer.batch_statistics,
            op_layer.channels,
            op_layer.groups,
        ), name
        compared += 1
    assert compared == 19 * 2 + 2 + 19 + 2  # layer (2 variants each), group, rms, mvn (2 variants)


def test_layer_and_rms_axes_follow_the_axis_attribute(loaded):
    for name, view in loaded.items():
        if family(name) if not name.startswith("test_mvn") else None:
            (layer,) = view.layers
            if layer.kind in (Kind.LAYER, Kind.RMS):
                rank = len(layer.input_shape)
                assert layer.axes == expected_axes(name, rank), name
                assert layer.batch_statistics == (0 in layer.axes), name
                assert layer.channel_axis == rank - 1 and layer.channels == layer.input_shape[-1]


def test_batchnorm_cases(loaded):
    for name in ("test_batchnorm_example", "test_batchnorm_epsilon"):
        (layer,) = loaded[name].layers
        assert layer.uses_running_stats and not layer.training and layer.axes == (0, 2, 3) and layer.channels == 3
        assert layer.scale is None and layer.mean is None  # graph inputs: unknown, never guessed
    for name in ("test_batchnorm_example_training_mode", "test_batchnorm_epsilon_training_mode"):
        (layer,) = loaded[name].layers
        assert layer.training and layer.batch_statistics and not layer.uses_running_stats
    assert loaded["test_batchnorm_epsilon"].layers[0].epsilon == float(np.float32(1e-2))


def test_group_and_instance_cases(loaded):
    for name in ("test_group_normalization_example", "test_group_normalization_epsilon_expanded"):
        (layer,) = loaded[name].layers
        assert layer.groups == 2 and layer.channels == 4 and layer.axes == (1, 2, 3) and layer.channel_axis == 1
    (layer,) = loaded["test_instancenorm_example"].layers
    assert layer.axes == (2, 3) and layer.channels == 2 and layer.input_shape == (1, 2, 1, 3)


def test_mvn_cases(loaded):
    (op,) = loaded["test_mvn"].layers
    assert op.kind is Kind.MEAN_VARIANCE and op.axes == (0, 2, 3) and op.batch_statistics and op.epsilon is None
    # the note's word on onnxruntime, which adds no epsilon: a set of equal values is NaN there
    assert "onnxruntime's kernel nothing" in op.notes[0]
    import onnxruntime as ort

    session = ort.InferenceSession(loaded["test_mvn"].info.path, providers=["CPUExecutionProvider"])
    assert np.isnan(session.run(None, {"X": np.full((3, 3, 3, 1), 2.0, np.float32)})[0]).all()
    (chain,) = loaded["test_mvn_expanded"].layers
    assert chain.kind is Kind.BATCH and chain.batch_statistics and chain.epsilon == float(np.float32(1e-9))
    assert any("standard deviation" in n for n in chain.notes)


def test_norms_over_the_batch_axis_without_stored_statistics_get_a_hint_fix_can_keep(loaded):
    """LayerNormalization with axis 0 and MVN over axes [0, 2, 3] were told to export with training off "so the
    layer uses its moving statistics" or to run `bncheck fix`, which has none to use and rewrites neither; the
    expanded MVN (epsilon added to the standard deviation) got BN004's TensorFlow/cuDNN clamp warning."""
    from bncheck.checks import bn002_train_mode, bn004_epsilon, run_checks

    for name in ("test_layer_normalization_2d_axis0", "test_layer_normalization_2d_axis0_expanded", "test_mvn"):
        (finding,) = [f for f in run_checks(loaded[name], None) if f.code == "BN002"]
        assert finding.hint == bn002_train_mode.HINT_NO_STATS, name
    findings = list(run_checks(loaded["test_mvn_expanded"], None, (bn002_train_mode, bn004_epsilon)))
    assert [(f.code, f.hint) for f in findings] == [("BN002", bn002_train_mode.HINT_NO_STATS)]
    from bncheck.fixing import fix

    # fix said the MVN over [0, 2, 3] was not "batch moments over every axis but the channel axis 1"
    (entry,) = fix(loaded["test_mvn"].info.path, None, None, dry_run=True).fix.outcome.layers
    assert entry.action == "not-fixed" and "it stores no statistics to use at inference" in entry.reason


def test_parameters_bound_as_initializers_are_read(cases, tmp_path):
    """The same cases with their input data stored as initializers: the walk reads the exact arrays."""
    for name in (
        "test_batchnorm_example",
        "test_group_normalization_example",
        "test_layer_normalization_4d_axis1",
        "test_layer_normalization_4d_axis1_expanded",
    ):
        case = cases[name]
        model = onnx.ModelProto()
        model.CopyFrom(case.model)
        inputs, _ = case.data_sets[0]
        params = {}
        for value, data in list(zip(model.graph.input, inputs))[1:]:
            model.graph.initializer.append(numpy_helper.from_array(np.asarray(data), value.name))
            params[value.name] = np.asarray(data)
        path = tmp_path / f"{name}.onnx"
        onnx.save(model, str(path))
        (layer,) = OnnxBackend().load(str(path)).layers
        names = [v.name for v in model.graph.input][1:]
        np.testing.assert_array_equal(layer.scale, params[names[0]])
        np.testing.assert_array_equal(layer.bias, params[names[1]])
        if name == "test_batchnorm_example":
            np.testing.assert_array_equal(layer.mean, params[names[2]])
            np.testing.assert_array_equal(layer.var, params[names[3]])


def test_pytorch_converted_batchnorm_models_are_read(tmp_path):
    paths = sorted(glob.glob(os.path.join(PYTORCH_CONVERTED, "test_BatchNorm*", "model.onnx")))
    assert len(paths) == 5
    for path in paths:
        view = OnnxBackend().load(path)
        assert view.info.opset == {"ai.onnx": 6} and view.info.producer == "pytorch 0.3" and view.info.ir_version == 3
        (layer,) = view.layers
        assert layer.kind is Kind.BATCH and layer.op_type == "BatchNormalization"
        assert layer.extra["is_test"] == 1 and layer.uses_running_stats and not layer.training
        assert layer.name == layer.output == "5" and layer.input == "0"
        # never trained: running mean exactly 0, running variance exactly 1, bias 0, scale random in [0, 1)
        assert np.all(layer.mean == 0.0) and np.all(layer.var == 1.0) and np.all(layer.bias == 0.0)
        assert np.all((layer.scale >= 0) & (layer.scale < 1)) and len(set(layer.scale.tolist())) == layer.channels
        momentum_case = "momentum" in path
        assert layer.epsilon == float(np.float32(1e-3 if momentum_case else 1e-5))
        if not momentum_case:
            assert layer.momentum == float(np.float32(0.9))
        assert layer.axes == (0, 2, 3)[: len(layer.input_shape) - 1] or layer.axes == (0,) + tuple(
            range(2, len(layer.input_shape))
        )
        assert view.inputs[0].name == "0" and len(view.inputs) == 1  # params are initializers (IR 3 style)
