"""The committed ONNX sample models are what their script writes, are valid, run, and are what they claim to be.

These tests check the samples themselves (bytes, validity, the numbers that make each one a defect or clean),
with onnxruntime and onnx.reference, never bncheck's findings: those are compared with
sample_models/expected.json by the check and CLI tests. Train-mode BatchNormalization claims use
onnx.reference (the spec), since onnxruntime's kernel does not follow it in some cases (DEVELOPERS.md, Facts).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

SAMPLES_DIR = Path(__file__).resolve().parent.parent / "sample_models"
SCRIPT = SAMPLES_DIR / "make_onnx_samples.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("make_onnx_samples", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gen = _load_script()
SAMPLE_FILES = sorted(gen.SAMPLES)
#: Samples whose defect is NaN/Inf at run time: they run, but their outputs are not finite.
NONFINITE_AT_RUNTIME = {"epsilon_zero_zero_var.onnx", "nan_gamma.onnx", "negative_variance.onnx", "nan_midnetwork.onnx"}


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("samples")
    gen.write_all(out)
    return out


def _session(model: onnx.ModelProto | Path) -> ort.InferenceSession:
    """No graph optimizations: intermediate tensors are exactly the ones in the file (no Conv+BN fusion)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _with_outputs(name: str, tensors: list[str]) -> onnx.ModelProto:
    """The sample with intermediate tensors added as graph outputs."""
    model = onnx.load(SAMPLES_DIR / name)
    for tensor in tensors:
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(tensor))
    return model


def _inputs(model_input, batch: int, seed: int = 0) -> np.ndarray:
    shape = [batch if isinstance(d, str) or d is None else d for d in model_input.shape]
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _initializers(name: str) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(SAMPLES_DIR / name).graph.initializer}


def _attribute(name: str, node_name: str, attr: str):
    node = next(n for n in onnx.load(SAMPLES_DIR / name).graph.node if n.name == node_name)
    return next(onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == attr)


# --------------------------------------------------------------------------- the script and the files


def test_script_regenerates_committed_files_byte_for_byte(regenerated: Path) -> None:
    written = sorted(p.name for p in regenerated.iterdir())
    assert written == sorted([*SAMPLE_FILES, gen.CALIB_FILE])
    # Every committed ONNX sample comes from this script (Keras samples have their own script and suffixes).
    assert sorted(p.name for p in SAMPLES_DIR.glob("*.onnx")) == SAMPLE_FILES
    for filename in written:
        assert (regenerated / filename).read_bytes() == (SAMPLES_DIR / filename).read_bytes(), filename


def test_samples_are_small() -> None:
    sizes = {name: (SAMPLES_DIR / name).stat().st_size for name in [*SAMPLE_FILES, gen.CALIB_FILE]}
    assert all(size < 1_000_000 for size in sizes.values()), sizes
    assert sum(sizes.values()) < 1_000_000


def test_expected_json_lists_every_sample_and_only_known_codes() -> None:
    expected = json.loads((SAMPLES_DIR / "expected.json").read_text())
    assert sorted(k for k in expected if k.endswith(".onnx")) == SAMPLE_FILES
    codes = {"BN001", "BN002", "BN003", "BN004", "BN005"}
    for filename in SAMPLE_FILES:
        entry = expected[filename]
        for key in ("inspect", "probe", "probe_with_data"):
            for code, severity, layer in entry[key] or []:
                assert code in codes and severity in {"error", "warning", "info"}
                assert layer in entry["layers"], (filename, layer)
        assert (entry["data"] is None) == (entry["probe_with_data"] is None)
        node_names = {n.name for n in onnx.load(SAMPLES_DIR / filename).graph.node}
        assert set(entry["layers"]) <= node_names, filename


@pytest.mark.parametrize("filename", SAMPLE_FILES)
def test_sample_passes_onnx_full_check(filename: str) -> None:
    onnx.checker.check_model(onnx.load(SAMPLES_DIR / filename), full_check=True)


@pytest.mark.parametrize("filename", SAMPLE_FILES)
def test_sample_runs_in_onnxruntime_at_batch_1_2_32(filename: str) -> None:
    session = _session(SAMPLES_DIR / filename)
    model_input = session.get_inputs()[0]
    assert model_input.shape[0] == "batch"
    for batch in (1, 2, 32):
        (out,) = session.run(None, {model_input.name: _inputs(model_input, batch)})
        assert out.shape[0] == batch
        # The NaN/Inf samples run, and their defect is exactly that the output is not finite.
        assert bool(np.isfinite(out).all()) == (filename not in NONFINITE_AT_RUNTIME)


# --------------------------------------------------------------------------- static numbers


def test_stale_stats_bn1_bn2_hold_initial_values_in_every_channel_bn3_in_half() -> None:
    init = _initializers("stale_stats.onnx")
    for layer in ("bn1", "bn2"):
        assert np.all(init[f"{layer}.running_mean"] == 0) and np.all(init[f"{layer}.running_var"] == 1)
    mean, var = init["bn3.running_mean"], init["bn3.running_var"]
    defaults = (mean == 0) & (var == 1)
    assert defaults.sum() == mean.size // 2 and not defaults.all()


def test_clean_and_defect_samples_have_non_default_statistics_elsewhere() -> None:
    for filename in (
        "clean_bn_convnet.onnx",
        "train_mode_bn.onnx",
        "clean_resnet.onnx",
        "stale_drift.onnx",
        "trained_matching.onnx",
    ):
        init = _initializers(filename)
        for key in [k for k in init if k.endswith(".running_var")]:
            mean, var = init[key.replace("running_var", "running_mean")], init[key]
            assert np.all(mean != 0) and np.all(var != 1), (filename, key)
            assert np.all(var > 1e-3), (filename, key)  # so epsilon 1e-5 never dominates


def test_train_mode_nodes_avoid_the_onnxruntime_equal_initializer_bug() -> None:
    for filename in ("train_mode_bn.onnx", "collapse_1x1_train_mode.onnx"):
        model = onnx.load(SAMPLES_DIR / filename)
        init = _initializers(filename)
        train = [
            n
            for n in model.graph.node
            if n.op_type == "BatchNormalization" and any(a.name == "training_mode" and a.i == 1 for a in n.attribute)
        ]
        assert train
        for node in train:
            assert len(node.output) == 3
            scale, bias, mean, var = (init[i] for i in node.input[1:])
            assert np.all(bias != mean) and np.all(scale != var)


def test_epsilon_samples_store_the_claimed_values() -> None:
    assert _attribute("epsilon_1e-8.onnx", "bn2", "epsilon") == pytest.approx(1e-8, rel=1e-6)
    assert _attribute("epsilon_1e-8.onnx", "bn1", "epsilon") == np.float32(1e-5)
    assert _attribute("epsilon_zero_zero_var.onnx", "bn2", "epsilon") == 0.0
    assert np.sum(_initializers("epsilon_zero_zero_var.onnx")["bn2.running_var"] == 0) == 1
    assert np.sum(np.isnan(_initializers("nan_gamma.onnx")["bn2.scale"])) == 1
    assert np.sum(_initializers("negative_variance.onnx")["bn2.running_var"] < 0) == 1


# --------------------------------------------------------------------------- run-time claims


def test_collapse_head_bn_outputs_its_bias_at_batch_1_per_spec_and_not_at_batch_2() -> None:
    model = _with_outputs("collapse_1x1_train_mode.onnx", ["head_bn"])
    bias = _initializers("collapse_1x1_train_mode.onnx")["head_bn.bias"].reshape(1, -1, 1, 1)
    ref = ReferenceEvaluator(model)
    for seed in range(3):
        x = np.random.default_rng(seed).standard_normal((1, 3, 16, 16)).astype(np.float32)
        (out,) = ref.run(["head_bn"], {"input": x})
        np.testing.assert_array_equal(out, bias)
    x = np.random.default_rng(7).standard_normal((2, 3, 16, 16)).astype(np.float32)
    (out,) = ref.run(["head_bn"], {"input": x})
    assert np.abs(out - bias).max() > 0.1


def _shape(name: str) -> list:
    dims = onnx.load(SAMPLES_DIR / name).graph.input[0].type.tensor_type.shape.dim
    return [d.dim_param or d.dim_value for d in dims]


@pytest.mark.parametrize(
    ("filename", "layer"), [("instancenorm_1x1.onnx", "in_gap"), ("layernorm_size1_axis.onnx", "ln_feature")]
)
def test_one_element_norm_outputs_its_bias_at_every_batch_size(filename: str, layer: str) -> None:
    model = _with_outputs(filename, [layer])
    bias = _initializers(filename)[f"{layer}.bias"]
    if filename.startswith("instancenorm"):
        bias = bias.reshape(1, -1, 1, 1)
    ref, session = ReferenceEvaluator(model), _session(model)
    name = model.graph.input[0].name
    for batch in (1, 2, 32):
        x = 3 * np.random.default_rng(batch).standard_normal([batch, *_shape(filename)[1:]]).astype(np.float32)
        (spec,) = ref.run([layer], {name: x})
        np.testing.assert_array_equal(spec, np.broadcast_to(bias, spec.shape))
        # onnxruntime agrees up to rounding that 1/sqrt(eps) amplifies (measured: < 3e-4).
        (runtime,) = session.run([layer], {name: x})
        np.testing.assert_allclose(runtime, spec, atol=1e-3)


def _sample_alone_and_in_batch(run, seed: int = 3) -> float:
    """Largest change of sample 0's output between running it alone and inside a batch of 8."""
    batch = np.random.default_rng(seed).standard_normal((8, 3, 16, 16)).astype(np.float32)
    alone = run(batch[:1])[0]
    together = run(batch)[0]
    return float(np.abs(alone - together).max())


def test_handwritten_moments_output_depends_on_batch_companions_in_onnxruntime() -> None:
    session = _session(SAMPLES_DIR / "handwritten_batch_moments.onnx")
    assert _sample_alone_and_in_batch(lambda x: session.run(None, {"input": x})[0]) > 0.05


def test_train_mode_bn_output_depends_on_batch_companions_per_spec() -> None:
    ref = ReferenceEvaluator(onnx.load(SAMPLES_DIR / "train_mode_bn.onnx"))
    assert _sample_alone_and_in_batch(lambda x: ref.run(None, {"input": x})[0]) > 0.05


@pytest.mark.parametrize("filename", ["clean_bn_convnet.onnx", "instancenorm_lowered_to_bn.onnx", "clean_resnet.onnx"])
def test_clean_sample_output_does_not_depend_on_batch_companions(filename: str) -> None:
    session = _session(SAMPLES_DIR / filename)
    ref = ReferenceEvaluator(onnx.load(SAMPLES_DIR / filename))
    assert _sample_alone_and_in_batch(lambda x: session.run(None, {"input": x})[0]) < 1e-4
    assert _sample_alone_and_in_batch(lambda x: ref.run(None, {"input": x})[0]) < 1e-4


def test_lowered_instancenorm_equals_a_per_sample_instance_norm() -> None:
    name = "instancenorm_lowered_to_bn.onnx"
    model = _with_outputs(name, ["relu1", "instnorm_affine_add"])
    init = _initializers(name)
    x = np.random.default_rng(5).standard_normal((4, 3, 16, 16)).astype(np.float32)
    for run in (_session(model).run, ReferenceEvaluator(model).run):
        h, y = run(["relu1", "instnorm_affine_add"], {"input": x})
        h = h.astype(np.float64)
        norm = (h - h.mean(axis=(2, 3), keepdims=True)) / np.sqrt(h.var(axis=(2, 3), keepdims=True) + 1e-5)
        expected = norm * init["instnorm.weight"][None] + init["instnorm.bias"][None]
        np.testing.assert_allclose(y, expected, atol=1e-4)


@pytest.mark.parametrize(
    ("filename", "first_bad"),
    [
        ("nan_midnetwork.onnx", "bn2"),
        ("nan_gamma.onnx", "bn2"),
        ("negative_variance.onnx", "bn2"),
        ("epsilon_zero_zero_var.onnx", "bn2"),
    ],
)
def test_first_nonfinite_normalization_layer_is_the_claimed_one(filename: str, first_bad: str) -> None:
    """bn1's input and output are finite; the first non-finite value is in bn2 (input for nan_midnetwork,
    output for the parameter defects); bn2's input is finite unless the NaN comes from upstream."""
    tensors = ["conv1", "bn1", "conv2", first_bad]
    session = _session(_with_outputs(filename, tensors))
    x = _inputs(session.get_inputs()[0], 32)
    conv1, bn1, conv2, bad = session.run(tensors, {"input": x})
    assert np.isfinite(conv1).all() and np.isfinite(bn1).all()
    assert not np.isfinite(bad).all()
    assert np.isfinite(conv2).all() == (filename != "nan_midnetwork.onnx")


# --------------------------------------------------------------------------- the drift pair


def test_calibration_file_holds_64_samples_keyed_by_input_name() -> None:
    with np.load(SAMPLES_DIR / "calib_drift.npz") as data:
        assert list(data.keys()) == ["input"]
        assert data["input"].shape == (64, 3, 16, 16) and data["input"].dtype == np.float32


def _drift(filename: str) -> dict[str, tuple[float, float]]:
    """Per BN: medians over channels of |m - mu| / sqrt(var + eps) and |log(v / var)|, with m, v the input
    statistics onnxruntime produces on the calibration data and mu, var the stored running statistics."""
    layers = ["bn1", "bn2", "bn3"]
    convs = [f"conv{layer[-1]}" for layer in layers]
    init = _initializers(filename)
    with np.load(SAMPLES_DIR / "calib_drift.npz") as data:
        x = data["input"]
    outs = _session(_with_outputs(filename, convs)).run(convs, {"input": x})
    result = {}
    for layer, out in zip(layers, outs):
        out = out.astype(np.float64)
        m, v = out.mean(axis=(0, 2, 3)), out.var(axis=(0, 2, 3))
        mu, var = init[f"{layer}.running_mean"], init[f"{layer}.running_var"]
        eps = _attribute(filename, layer, "epsilon")
        result[layer] = (
            float(np.median(np.abs(m - mu) / np.sqrt(var + eps))),
            float(np.median(np.abs(np.log(v / var)))),
        )
    return result


def test_trained_matching_statistics_match_the_calibration_data() -> None:
    for layer, (shift, log_ratio) in _drift("trained_matching.onnx").items():
        assert shift < 0.1 and log_ratio < 0.1, (layer, shift, log_ratio)


def test_stale_drift_statistics_are_far_from_the_calibration_data() -> None:
    for layer, (shift, log_ratio) in _drift("stale_drift.onnx").items():
        assert shift > 1.0 and log_ratio > 1.0, (layer, shift, log_ratio)
    assert _attribute("stale_drift.onnx", "bn1", "momentum") == pytest.approx(0.999)
