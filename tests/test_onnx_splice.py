"""Train-mode decompositions spliced into onnxruntime's optimized graph (backends/onnx/splice.py): the optimizing
build sees each train-mode BN as the model wrote it, and the probe's session runs the same kernels, with the same
numbers, as when the whole decomposed graph is optimized."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx.reference import ReferenceEvaluator

from bncheck.backends.onnx import OnnxBackend
from bncheck.backends.onnx.graph import copied
from bncheck.backends.onnx.instrument import Augmenter
from bncheck.backends.onnx.run import _Engine, _session_statistics_first
from bncheck.backends.onnx.scratch import Scratch
from bncheck.backends.onnx.splice import Splice
from tests.builders import bn_model, plain_session, train_bn_stack_model

#: bias == running mean and scale == running variance: onnxruntime's optimizer shares the equal constants, so
#: the BN node it writes reads other names than the model's
_EQUAL_PARAMS = {"bias": [0.0] * 3, "mean": [0.0] * 3, "var": [1.0] * 3, "scale": [1.0] * 3}


def _augmented(path: str, scratch: Scratch) -> tuple[onnx.ModelProto, Augmenter]:
    view = OnnxBackend().load(path)
    aug = Augmenter(view.handle, view.layers, scratch, exact=False, inputs_only=False, keep_runtime=False)
    return aug.finish(), aug


def _node_set(graph: onnx.GraphProto) -> list[bytes]:
    return sorted(node.SerializeToString() for node in graph.node)


@pytest.mark.parametrize("opset", [15, 18])  # from 18 the reductions read their axes from constants
@pytest.mark.parametrize("hw", [(4, 4), (1, 1)])
@pytest.mark.parametrize("params", [{}, _EQUAL_PARAMS], ids=["trained", "equal_constants"])
def test_the_spliced_session_computes_the_onnx_spec(tmp_path, hw, params, opset):
    path = bn_model(tmp_path / "t.onnx", channels=3, hw=hw, training=True, opset=opset, **params)
    view = OnnxBackend().load(path)
    engine = _Engine(view.handle, view.layers)
    try:
        assert engine.statistics_first and engine.spliced
        x = np.random.default_rng(0).standard_normal((4, 3, *hw), dtype=np.float32)
        names = ["y", "running_mean", "running_var"]
        values = engine._run({"x": x})
        reference = ReferenceEvaluator(onnx.load(path)).run(names, {"x": x})
        for name, expected in zip(names, reference):
            np.testing.assert_allclose(values[name], expected, rtol=1e-5, atol=1e-6)
    finally:
        engine.close()


def test_a_spliced_stack_computes_exactly_what_the_whole_decomposed_graph_optimized_does(tmp_path, scratch):
    # four train-mode BNs, each read by the next layer's Conv (which onnxruntime runs NCHWc), the last one the
    # model's output: the same kernels, so the same numbers to the last bit
    path = train_bn_stack_model(tmp_path / "stack.onnx", widths=(3, 5, 1, 4), hw=(24, 24))
    model, aug = _augmented(path, scratch)
    assert len(aug.decompositions) == 4
    main = {"bn3"}
    sessions = []
    for decompositions in (None, aug.decompositions):
        folder = Scratch(0)
        try:
            session, spliced = _session_statistics_first(copied(model), aug.folder, folder, main, decompositions)
        finally:
            folder.remove()
        assert spliced == (decompositions is not None)
        sessions.append(session)
    names = sorted(o.name for o in model.graph.output)
    x = np.random.default_rng(1).normal(0.3, 2.0, (3, 3, 24, 24)).astype(np.float32)
    whole, spliced_run = (s.run(names, {"x": x}) for s in sessions)
    for name, a, b in zip(names, whole, spliced_run):
        np.testing.assert_array_equal(a, b, err_msg=name)


def test_the_optimizing_build_sees_each_train_mode_bn_as_the_model_wrote_it(tmp_path, scratch):
    path = train_bn_stack_model(tmp_path / "stack.onnx", widths=(3, 5), hw=(8, 8))
    model, aug = _augmented(path, scratch)
    Splice(model, aug.decompositions)
    batch_norms = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    modes = [next((a.i for a in n.attribute if a.name == "training_mode"), 0) for n in batch_norms]
    assert [n.output[0] for n in batch_norms] == ["bn0", "bn1"] and modes == [1, 1]
    # beside each BN, the one node of its decomposition that onnxruntime rewrites: the pool of its input
    assert sorted(n.op_type for n in model.graph.node if n.name.startswith("__bncheck")) == ["GlobalAveragePool"] * 2
    # and the graph's outputs are only what its nodes write (or its input, measured whole)
    produced = {out for node in model.graph.node for out in node.output} | {"x"}
    assert {o.name for o in model.graph.output} <= produced


def test_splicing_back_into_the_edited_model_restores_the_decomposed_graph(tmp_path, scratch):
    path = train_bn_stack_model(tmp_path / "stack.onnx", widths=(3, 5, 2), hw=(8, 8))
    model, aug = _augmented(path, scratch)
    before = copied(model)
    splice = Splice(model, aug.decompositions)
    assert _node_set(model.graph) != _node_set(before.graph)
    assert splice.apply(model.graph)
    assert _node_set(model.graph) == _node_set(before.graph)
    assert sorted(o.SerializeToString() for o in model.graph.output) == sorted(
        o.SerializeToString() for o in before.graph.output
    )
    assert {t.name for t in before.graph.initializer} <= {t.name for t in model.graph.initializer}


def test_a_graph_without_the_bn_node_is_left_unchanged(tmp_path, scratch):
    # what the optimizer might write if it rewrote a train-mode BN: nothing is spliced, the caller optimizes the
    # whole decomposed graph instead
    path = train_bn_stack_model(tmp_path / "stack.onnx", widths=(3, 5), hw=(8, 8))
    model, aug = _augmented(path, scratch)
    splice = Splice(model, aug.decompositions)
    other = copied(model)
    renamed = next(n for n in other.graph.node if n.op_type == "BatchNormalization" and n.output[0] == "bn1")
    renamed.op_type = "InstanceNormalization"
    untouched = other.SerializeToString()
    assert not splice.apply(other.graph)
    assert other.SerializeToString() == untouched


def test_the_spliced_graph_lists_every_node_after_the_nodes_it_reads(tmp_path, scratch):
    # onnxruntime writes each pool of x after the BN it belongs to; the decomposition put in the BN's place
    # reads it, so the pool moves forward with it (the statistics-first order keeps the model's own order)
    path = train_bn_stack_model(tmp_path / "stack.onnx", widths=(3, 5, 4), hw=(24, 24))
    model, aug = _augmented(path, scratch)
    splice = Splice(model, aug.decompositions)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    plain_session(model, options)
    graph = onnx.load(str(tmp_path / "optimized.onnx")).graph
    assert splice.apply(graph)
    available = {v.name for v in graph.input} | {t.name for t in graph.initializer} | {""}
    for node in graph.node:
        assert set(node.input) <= available, node.name
        available.update(node.output)
