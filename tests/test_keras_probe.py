"""The Keras probe: refusal before execution, the runner's statistics, call styles, and the Keras samples.

Real Keras (numpy backend, small models), real files; the statistics are compared with numpy statistics of
the layer tensors that Keras itself computes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

os.environ.setdefault("KERAS_BACKEND", "numpy")
keras = pytest.importorskip("keras")
from keras import layers

import bncheck
from bncheck import engine
from bncheck.backends.base import BackendError, ProbeSettings
from bncheck.backends.keras import KerasBackend
from bncheck.backends.keras.probe import AS_WRITTEN, PREDICT, KerasRunner, pool
from bncheck.cli import main
from bncheck.probe_plan import NOT_NEEDED, tensor_stats
from bncheck.report import probe_cell
from tests.keras_files import bn_model_with_config_field

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
SCRIPT = SAMPLES / "make_keras_samples.py"
#: every layer measured: the tests below are about the measuring (a default probe leaves inference BNs out)
FAST = ProbeSettings(batch_sizes=(1, 2, 8), samples=2, all_layers=True)


def _save(model, path: Path) -> str:
    model.save(path)
    return str(path)


def _assert_stats_equal(got, x: np.ndarray, channel_axis: int, what: str) -> None:
    want = tensor_stats(x, channel_axis)
    assert got.batch_size == want.batch_size and got.count == want.count, what
    for field in ("sample_mean", "sample_sq", "min", "max", "zeros", "nonfinite"):
        np.testing.assert_allclose(
            getattr(got, field), getattr(want, field), rtol=1e-6, atol=1e-7, err_msg=f"{what}.{field}"
        )


# --------------------------------------------------------------------------- refusal


def test_lambda_layer_probe_is_refused_and_nothing_is_executed(tmp_path):
    marker = tmp_path / "lambda_ran.txt"

    def side_effect(t, path=str(marker)):
        with open(path, "w") as f:  # runs whenever Keras executes the lambda
            f.write("executed")
        return t * 2.0

    inp = keras.Input((4,))
    x = layers.BatchNormalization(name="bn")(inp)
    model = keras.Model(inp, layers.Lambda(side_effect, name="writes_a_file")(x))
    path = _save(model, tmp_path / "lambda.keras")
    marker.unlink()  # building the model traced the lambda once; from here on nothing may run it
    view = KerasBackend().load(path)
    with pytest.raises(BackendError) as info:
        KerasBackend().probe(view, FAST)
    message = str(info.value)
    assert "\n" not in message and "'writes_a_file'" in message and "Lambda" in message
    assert "nothing was executed" in message
    assert not marker.exists()


def test_fix_of_a_lambda_file_is_refused_as_fix_and_nothing_is_executed(tmp_path):
    # the refusal said "refusing to probe" to a user who had asked for fix
    marker = tmp_path / "lambda_ran.txt"

    def side_effect(t, path=str(marker)):
        with open(path, "w") as f:
            f.write("executed")
        return t * 2.0

    inp = keras.Input((4,))
    model = keras.Model(inp, layers.Lambda(side_effect, name="writes_a_file")(layers.BatchNormalization()(inp)))
    path = _save(model, tmp_path / "lambda.keras")
    marker.unlink()
    result = CliRunner().invoke(main, ["fix", path, "-o", str(tmp_path / "fixed.keras")])
    assert result.exit_code == 2
    assert "refusing to fix, nothing was executed" in result.stderr and "'writes_a_file'" in result.stderr
    assert not marker.exists() and not (tmp_path / "fixed.keras").exists()


def test_a_model_compiled_with_a_users_loss_function_is_probed(tmp_path):
    # ai-isometric-extractor's U-Net and fimep: compile_config names a plain function from 'builtins' as the loss;
    # bncheck loads with compile=False, so that code never runs, but the whole file was refused
    def dice_loss(y_true, y_pred):
        return 1 - (2 * keras.ops.sum(y_true * y_pred) + 1) / (keras.ops.sum(y_true) + keras.ops.sum(y_pred) + 1)

    inp = keras.Input((4,))
    model = keras.Model(inp, layers.Dense(2)(layers.BatchNormalization(name="bn")(inp)))
    model.compile(optimizer="adam", loss=dice_loss)
    path = _save(model, tmp_path / "compiled.keras")
    with zipfile.ZipFile(path) as archive:
        loss = json.loads(archive.read("config.json"))["compile_config"]["loss"]
    assert loss["module"] == "builtins"  # what was refused
    view = KerasBackend().load(path)
    assert view.handle.unsafe == []
    [result] = KerasBackend().probe(view, FAST)
    assert result.at(1, "bn") is not None


def test_object_from_outside_keras_probe_is_refused(tmp_path):
    path = bn_model_with_config_field(tmp_path, "registered_name", "my_package>TrojanNorm")
    with pytest.raises(BackendError, match="my_package>TrojanNorm"):
        KerasBackend().probe(KerasBackend().load(path), FAST)


def test_a_synchronized_batch_norm_off_tensorflow_is_refused_with_the_backend_it_needs(tmp_path):
    """Keras 3 builds BatchNormalization(synchronized=True) on its TensorFlow backend only; the file (written
    here as Keras on TensorFlow writes it: the flag in the layer's config) is refused naming layer and backend."""
    path = _save(keras.Sequential([keras.Input((3,)), layers.BatchNormalization(name="bn")]), tmp_path / "sync.keras")
    with zipfile.ZipFile(path) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    config = json.loads(members["config.json"])
    config["config"]["layers"][1]["config"]["synchronized"] = True
    members["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    # read statically whatever the backend (a fresh model: never-updated statistics)
    assert [f.code for f in bncheck.inspect(path).findings] == ["BN003"]
    with pytest.raises(BackendError, match=r"synchronized=True\) \('bn'\) loads only on Keras's TensorFlow backend"):
        KerasBackend().probe(KerasBackend().load(path), FAST)


def _subprocess(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_probe_without_keras_says_which_extra_to_install():
    path = str(SAMPLES / "keras_epsilon_1e-8.keras")
    code = (
        "import sys; sys.modules['keras'] = None\n"  # keras not importable, as without the extra
        "from bncheck.backends.keras import KerasBackend\n"
        "from bncheck.backends.base import BackendError, ProbeSettings\n"
        f"view = KerasBackend().load({path!r})\n"
        "try:\n    KerasBackend().probe(view, ProbeSettings())\n"
        "except BackendError as e:\n    print(e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    out = _subprocess(code, env)
    assert out.returncode == 0, out.stderr
    assert "pip install 'keras>=3.12' jax" in out.stdout and path in out.stdout


def test_keras_backend_defaults_to_numpy_when_unset():
    path = str(SAMPLES / "keras_epsilon_1e-8.keras")
    code = (
        "from bncheck.backends.keras import KerasBackend\n"
        "from bncheck.backends.base import ProbeSettings\n"
        f"view = KerasBackend().load({path!r})\n"
        "KerasBackend().probe(view, ProbeSettings(batch_sizes=(1,), samples=1))\n"
        "import keras; print(keras.backend.backend())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    out = _subprocess(code, env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "numpy"


# --------------------------------------------------------------------------- the runner's numbers


def test_probe_statistics_equal_numpy_statistics_of_the_layer_tensors_keras_computes(tmp_path):
    seq = keras.Sequential(
        [keras.Input((4, 4, 6)), layers.BatchNormalization(name="s_bn"), layers.GroupNormalization(3, name="s_gn")],
        name="block",
    )
    inp = keras.Input((4, 4, 3), name="img")
    conv = layers.Conv2D(6, 3, padding="same", name="conv")(inp)
    bn_out = layers.BatchNormalization(name="bn")(conv)
    block_out = seq(bn_out)
    ln_out = layers.LayerNormalization(name="ln")(block_out)
    model = keras.Model(inp, ln_out)
    rng = np.random.default_rng(0)
    for var in model.weights:
        var.assign(rng.uniform(0.5, 1.5, tuple(var.shape)).astype("float32"))
    path = _save(model, tmp_path / "stats.keras")

    x = rng.normal(size=(5, 4, 4, 3)).astype("float32")
    # What Keras computes, layer by layer, in inference mode
    tensors = keras.Model(inp, [conv, bn_out, block_out])(x, training=False)
    conv_t, bn_t, block_t = (np.asarray(t) for t in tensors)
    s_bn_t = np.asarray(seq.get_layer("s_bn")(bn_t, training=False))
    s_gn_t = np.asarray(seq.get_layer("s_gn")(s_bn_t))
    ln_t = np.asarray(model.get_layer("ln")(block_t))

    view = KerasBackend().load(path)
    runner = KerasRunner(view, view.handle)
    got = runner.run({"img": x}, PREDICT)
    assert set(got) == {"bn", "block/s_bn", "block/s_gn", "ln"}
    for name, tin, tout in [
        ("bn", conv_t, bn_t),
        ("block/s_bn", bn_t, s_bn_t),
        ("block/s_gn", s_bn_t, s_gn_t),
        ("ln", block_t, ln_t),
    ]:
        _assert_stats_equal(got[name].input, tin, 3, f"{name}.input")
        _assert_stats_equal(got[name].output, tout, 3, f"{name}.output")


def test_shared_layer_pools_every_call(tmp_path):
    inp = keras.Input((3,))
    shared = layers.BatchNormalization(name="shared")
    first = shared(inp)
    second = shared(layers.Dense(3, name="d")(first))
    model = keras.Model(inp, second)
    rng = np.random.default_rng(1)
    for var in model.weights:
        var.assign(rng.uniform(0.5, 1.5, tuple(var.shape)).astype("float32"))
    path = _save(model, tmp_path / "shared.keras")
    x = rng.normal(size=(4, 3)).astype("float32")
    mid = np.asarray(model.get_layer("d")(np.asarray(shared(x, training=False))))
    out_a, out_b = np.asarray(shared(x, training=False)), np.asarray(shared(mid, training=False))

    view = KerasBackend().load(path)
    runner = KerasRunner(view, view.handle)
    got = runner.run({view.inputs[0].name: x}, PREDICT)["shared"]
    want_in = pool([tensor_stats(x, 1), tensor_stats(mid, 1)])
    want_out = pool([tensor_stats(out_a, 1), tensor_stats(out_b, 1)])
    np.testing.assert_allclose(got.input.sample_mean, want_in.sample_mean, rtol=1e-6)
    np.testing.assert_allclose(got.output.sample_sq, want_out.sample_sq, rtol=1e-6)
    assert got.output.count == 2 * 4 and "shared" in runner.shared
    [result] = KerasBackend().probe(view, FAST)
    assert any("shared is called more than once" in note for note in result.notes)


def test_an_outputs_only_run_gives_the_same_outputs_without_statistics_and_keeps_the_skipped_set(tmp_path):
    inp = keras.Input((3,), name="x")
    model = keras.Model(inp, layers.Dense(2, name="d")(layers.LayerNormalization(name="ln")(inp)))
    path = _save(model, tmp_path / "ln.keras")
    view = KerasBackend().load(path)
    runner = KerasRunner(view, view.handle)
    run = runner.runner(PREDICT)
    x = {"x": np.random.default_rng(2).normal(size=(4, 3)).astype("float32")}
    full, lean = run(x), run(x, False)
    assert set(full.layers) == {"ln"} and lean.layers == {}
    assert full.outputs.keys() == lean.outputs.keys()
    assert all(np.array_equal(full.outputs[k], lean.outputs[k]) for k in full.outputs)
    assert runner.capture.skip == set() and set(run(x).layers) == {"ln"}


# --------------------------------------------------------------------------- call styles


def test_baked_flag_model_runs_both_call_styles_and_collapses_to_beta_only_as_written():
    view = KerasBackend().load(str(SAMPLES / "keras_baked_training_1d.keras"))
    results = KerasBackend().probe(view, FAST)
    assert [r.call_style for r in results] == [AS_WRITTEN, PREDICT]
    beta = view.layer("logits_bn").bias
    as_written = results[0].at(1, "logits_bn").output
    predict = results[1].at(1, "logits_bn").output
    np.testing.assert_array_equal(as_written.min, beta)
    np.testing.assert_array_equal(as_written.max, beta)
    assert not np.allclose(predict.mean, beta, atol=1e-3)
    assert results[0].dependence["logits_bn"].output_change > 0.1
    assert results[1].dependence["logits_bn"].output_change < 1e-4
    # the verdicts say so: constant at batch 1 as written only (predict runs on the moving statistics)
    layer = view.layer("logits_bn")
    assert [probe_cell(r, layer, 1) for r in results] == ["constant", "ok"]
    report = bncheck.probe(str(SAMPLES / "keras_baked_training_1d.keras"), batch_sizes=(1, 2))
    (collapse,) = [f for f in report.findings if f.code == "BN001"]
    assert collapse.evidence["call_styles"] == [AS_WRITTEN]


def test_model_without_a_baked_flag_is_probed_in_predict_style_only():
    view = KerasBackend().load(str(SAMPLES / "keras_epsilon_1e-8.keras"))
    assert [r.call_style for r in KerasBackend().probe(view, FAST)] == [PREDICT]


def test_keras3_baked_flag_reaches_downstream_layers_as_written_as_the_static_reader_predicts(tmp_path):
    keras.utils.set_random_seed(0)  # the Dense weights; b's collapsed output is beta up to float32 rounding
    inp = keras.Input((4,))
    a = layers.BatchNormalization(name="a", beta_initializer=keras.initializers.Constant(0.5))(inp, training=True)
    b = layers.BatchNormalization(name="b", beta_initializer=keras.initializers.Constant(0.25))(
        layers.Dense(4, name="d")(a)
    )
    path = _save(keras.Model(inp, b), tmp_path / "leak.keras")
    view = KerasBackend().load(path)
    assert view.layer("b").batch_statistics and not view.layer("b").training
    as_written, predict = KerasBackend().probe(view, FAST)
    # b collapsed to its beta too, to float32 rounding (0.2500009 seen unseeded: 32 ulps, over rtol 1e-6)
    np.testing.assert_allclose(as_written.at(1, "b").output.max, 0.25, atol=1e-5)
    np.testing.assert_allclose(as_written.at(1, "b").output.min, 0.25, atol=1e-5)
    assert not np.allclose(predict.at(1, "b").output.mean, 0.25)


# --------------------------------------------------------------------------- the samples


def _load_script():
    """The sample script as a module (it imports keras only inside its builders, so this is side-effect free)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_keras_samples", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SAMPLES


EXPECTED = _load_script()


def _codes(report) -> list[list[str]]:
    return sorted({(f.code, f.severity.label, f.layer) for f in report.findings})


def _expected(view, value):
    if isinstance(value, str):  # "every BN: BN003 error" (the untrained MobileNetV2-style model)
        return sorted(("BN003", "error", layer.name) for layer in view.layers)
    return sorted(tuple(item) for item in value)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_keras_sample_gives_exactly_its_intended_findings(name):
    path = str(SAMPLES / name)
    _, _, inspect_expected, probe_expected, data_expected = EXPECTED[name]
    view = KerasBackend().load(path)
    assert _codes(engine.inspect(path)) == _expected(view, inspect_expected)
    probe_expected = inspect_expected if probe_expected == "same" else probe_expected
    assert _codes(engine.probe(path, FAST)) == _expected(view, probe_expected)
    if data_expected is not None:
        data = {view.inputs[0].name: np.load(SAMPLES / "keras_calib.npy")}
        settings = ProbeSettings(batch_sizes=(1, 2, 8), samples=2, data=data, data_source="keras_calib.npy")
        assert _codes(engine.probe(path, settings)) == _expected(view, data_expected)


def test_keras_samples_are_small():
    for name in EXPECTED:
        assert (SAMPLES / name).stat().st_size < 1024**2, name


UNTRAINED = [
    "keras_baked_training_1d.keras",
    "keras_mobilenetv2_untrained.keras",
    "keras_legacy_convnet.h5",
    "keras_epsilon_1e-8.keras",
    "keras_nested.keras",
]


def test_untrained_keras_samples_are_what_the_script_writes(tmp_path):
    """Byte for byte. The two fitted samples depend on XLA's float arithmetic: their claims (statistics that
    match, or drift from, keras_calib.npy) are checked through their findings above instead. The bytes hold
    Keras's version and config layout, so another Keras version writes other bytes: then this is skipped."""
    with zipfile.ZipFile(SAMPLES / UNTRAINED[0]) as zf:
        written_by = json.loads(zf.read("metadata.json"))["keras_version"]
    if written_by != keras.__version__:
        pytest.skip(f"samples written by keras {written_by}, this is keras {keras.__version__}")
    env = dict(os.environ)
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path), "--only", *UNTRAINED],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    for name in UNTRAINED:
        assert (tmp_path / name).read_bytes() == (SAMPLES / name).read_bytes(), name


def test_static_batch_statistics_prediction_matches_keras_as_written_at_batch_1(tmp_path):
    """Nested, Sequential and shared layers around a baked flag: every BatchNormalization the static reader
    marks as using batch statistics collapses to its beta at batch 1 in model(x); every one it does not
    mark (and gives no execution-order caveat) does not."""

    def bn(name, beta):
        return layers.BatchNormalization(name=name, beta_initializer=keras.initializers.Constant(beta))

    i_in = keras.Input((6,))
    inner = keras.Model(i_in, bn("bn1", 0.1)(layers.Dense(6, name="d")(i_in)), name="inner")
    seq = keras.Sequential([keras.Input((6,)), bn("bn1", 0.2), layers.Dense(6, name="sd")], name="seq")
    inp = keras.Input((6,))
    x = bn("bn0", 0.3)(inp)
    x = inner(x, training=True)
    x = seq(x)
    x = inner(x)  # second call of the nested model, no flag of its own
    shared = bn("shared_bn", 0.4)
    model = keras.Model(inp, shared(shared(x)))
    path = _save(model, tmp_path / "graph.keras")
    view = KerasBackend().load(path)
    runner = KerasRunner(view, view.handle)
    x1 = np.random.default_rng(2).normal(size=(1, 6)).astype("float32") * 3.0
    seen = runner.run({view.inputs[0].name: x1}, AS_WRITTEN)
    verdicts = {}
    for layer in view.layers:
        out = seen[layer.name].output
        collapsed = bool(np.allclose(out.min, layer.bias, atol=1e-4) and np.allclose(out.max, layer.bias, atol=1e-4))
        verdicts[layer.name] = (layer.batch_statistics, collapsed)
    assert verdicts == {
        "bn0": (False, False),
        "inner/bn1": (True, True),
        "seq/bn1": (True, True),
        "shared_bn": (True, True),
    }


def test_models_with_dict_inputs_and_embedding_inputs_are_probed_with_valid_indices(tmp_path):
    a = keras.Input((4,), name="a")
    tok = keras.Input((5,), dtype="int32", name="tok")
    emb = layers.GlobalAveragePooling1D(name="pool")(layers.Embedding(1000, 4, name="emb")(tok))
    out = layers.BatchNormalization(name="bn")(layers.Concatenate(name="cat")([a, emb]))
    path = _save(keras.Model({"a": a, "tok": tok}, out), tmp_path / "dict_inputs.keras")
    view = KerasBackend().load(path)
    assert [(s.name, s.dtype) for s in view.inputs] == [("a", "float32"), ("tok", "int32")]
    from bncheck.backends.keras.probe import embedding_bounds

    assert embedding_bounds(view.handle.config, ["a", "tok"]) == {"tok": 1000}
    [result] = KerasBackend().probe(view, FAST)
    assert result.at(8, "bn").output.total_nonfinite == 0


def test_baked_dropout_training_flag_turns_a_later_batchnorm_to_batch_statistics_in_keras3(tmp_path):
    """Monte-Carlo dropout written as Dropout(...)(x, training=True): Keras 3 keeps training=True in the call
    context, so the BatchNormalization after it uses batch statistics in model(x). Both call styles run."""
    inp = keras.Input((6,))
    x = layers.Dropout(0.2, name="mc_dropout")(layers.Dense(6, name="d")(inp), training=True)
    out = layers.BatchNormalization(name="bn", beta_initializer=keras.initializers.Constant(0.5))(x)
    path = _save(keras.Model(inp, out), tmp_path / "mc_dropout.keras")
    view = KerasBackend().load(path)
    bn = view.layer("bn")
    assert bn.batch_statistics and not bn.training
    assert any("mc_dropout's baked training=True" in note for note in bn.notes)
    as_written, predict = KerasBackend().probe(view, FAST)
    assert (as_written.call_style, predict.call_style) == (AS_WRITTEN, PREDICT)
    np.testing.assert_allclose(as_written.at(1, "bn").output.max, 0.5, atol=1e-4)
    np.testing.assert_allclose(as_written.at(1, "bn").output.min, 0.5, atol=1e-4)


# --------------------------------------------------------------------------- drift: effect on the outputs


def _briefly_fitted_classifier(tmp_path: Path, momentum: float = 0.99, steps: int = 10):
    """Dense-BN-ReLU x2 -> 10 logits whose moving statistics are what ``steps`` fit updates at ``momentum``
    leave (m <- momentum * m + (1 - momentum) * batch statistic, from 0/1; weights untrained, batches the
    whole data). Returns the file, the data, and the logits with exact statistics computed in numpy."""
    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(0)
    inp = keras.Input((8,), name="features")
    x = layers.ReLU()(layers.BatchNormalization(momentum=momentum, name="bn_1")(layers.Dense(32, name="dense_1")(inp)))
    x = layers.ReLU()(layers.BatchNormalization(momentum=momentum, name="bn_2")(layers.Dense(32, name="dense_2")(x)))
    model = keras.Model(inp, layers.Dense(10, name="logits")(x))
    data = (rng.normal(size=(256, 8)) * np.linspace(0.5, 3, 8) + np.linspace(-2, 4, 8)).astype(np.float32)
    keep = momentum**steps
    h = data.astype(np.float64)
    for dense, bn in (("dense_1", "bn_1"), ("dense_2", "bn_2")):
        kernel, bias = (np.asarray(w, np.float64) for w in model.get_layer(dense).get_weights())
        h = h @ kernel + bias
        layer = model.get_layer(bn)
        mean, var = h.mean(axis=0), h.var(axis=0)
        layer.moving_mean.assign((1 - keep) * mean.astype(np.float32))
        layer.moving_variance.assign((keep + (1 - keep) * var).astype(np.float32))
        gamma, beta = (np.asarray(w).astype(np.float64) for w in (layer.gamma, layer.beta))
        h = np.maximum((h - mean) / np.sqrt(var + layer.epsilon) * gamma + beta, 0.0)
    kernel, bias = (np.asarray(w, np.float64) for w in model.get_layer("logits").get_weights())
    exact = h @ kernel + bias
    path = _save(model, tmp_path / "brief.keras")
    np.save(tmp_path / "data.npy", data)
    return path, str(tmp_path / "data.npy"), data, model, exact


def test_a_keras_sequence_model_agrees_per_position_and_its_logit_per_position_gets_no_top1(tmp_path):
    """The built model's output shapes tell the class axis, as an ONNX file's declared dims do: [batch, seq, 6]
    tags agree per position; [batch, seq], one logit per position, has no class axis (not an arg-max over the
    positions). The sequence's length is free, as a tagger's is (a fixed one reads as a fixed grid)."""
    inp = keras.Input((None, 4), name="x")
    h = layers.BatchNormalization(name="bn")(layers.Dense(8, name="embed")(inp))
    tags = layers.Dense(6, name="tags")(h)
    presence = layers.Reshape((-1,), name="presence")(layers.Dense(1, name="presence_head")(h))
    path = _save(keras.Model(inp, [tags, presence]), tmp_path / "tagger.keras")
    report = engine.probe(path, ProbeSettings(batch_sizes=(1, 2, 8), input_shapes={"x": (12, 4)}))
    outputs = report.probes[0].output_dependence
    assert outputs["tags"][8].positions == 12 and outputs["tags"][8].agreement == 1.0
    assert outputs["presence"][8].agreement is None and outputs["presence"][8].samples == 4


def test_briefly_fitted_classifier_drift_is_an_error_with_its_output_effect(tmp_path):
    path, data_path, data, model, exact = _briefly_fitted_classifier(tmp_path)
    # the case to catch: predict() agrees with exact statistics on well under half of the training samples
    stored = np.asarray(model.predict(data, verbose=0))
    agreement = float(np.mean(np.argmax(stored, axis=1) == np.argmax(exact, axis=1)))
    assert 0.2 < agreement < 0.6
    report = engine.probe(
        path, ProbeSettings(batch_sizes=(1, 2, 8), samples=2, data_path=data_path, data_source=data_path)
    )
    drift = [f for f in report.findings if f.code == "BN003"]
    assert {f.layer for f in drift} == {"bn_1", "bn_2"} and {f.severity.label for f in drift} == {"error"}
    effect = drift[0].evidence["output_effect"]
    logits = effect["outputs"]["logits"]
    assert logits["samples"] == 256 and effect["recomputed_layers"] == ["bn_1", "bn_2"]
    assert logits["top1_agreement"] == pytest.approx(agreement, abs=1.5 / 256)  # numpy's exact statistics agree
    assert logits["shift_sd"] > 0.5
    assert "top-1 agrees on" in effect["summary"]


def test_the_keras_effect_needs_the_samples_fix_needs(tmp_path):
    """deepcon: three samples drew BN003 errors through an effect of statistics recomputed from them, which
    `fix` refuses to do from fewer than 8; the drift stays, a warning, and the effect says why it is absent."""
    path, _, data, _, _ = _briefly_fitted_classifier(tmp_path)
    few = tmp_path / "few.npy"
    np.save(few, data[:3])
    report = engine.probe(path, ProbeSettings(batch_sizes=(1, 2), samples=1, data_path=str(few), data_source=str(few)))
    drift = [f for f in report.findings if f.code == "BN003"]
    assert drift and {f.severity.label for f in drift} == {"warning"}
    assert any(
        "output effect of the drifting statistics not measured: 3 sample(s) are too few" in note
        for note in report.probes[0].notes
    )


def test_the_keras_effect_is_left_out_where_its_one_batch_would_likely_not_fit(tmp_path, monkeypatch):
    """deepcon and rbm3: the effect's one batch of every sample passed the lower-bound check, then Keras's
    numpy backend held 15 times it, until the watchdog stopped bncheck at 22 GB. The effect is left out (the
    drift stays a warning) where 16 times the bound exceeds the budget; the probe's own runs keep the bound."""
    path, data_path, _, _, _ = _briefly_fitted_classifier(tmp_path)
    monkeypatch.setenv("BNCHECK_MEMORY_BUDGET", "500kB")  # the bound at 256 samples is about 73 kB
    report = engine.probe(
        path, ProbeSettings(batch_sizes=(1, 2, 8), samples=2, data_path=data_path, data_source=data_path)
    )
    drift = [f for f in report.findings if f.code == "BN003"]
    assert {f.layer for f in drift} == {"bn_1", "bn_2"} and {f.severity.label for f in drift} == {"warning"}
    [note] = [n for n in report.probes[-1].notes if n.startswith("output effect of the drifting statistics not")]
    assert "one batch of 256 samples would likely need about" in note and "over the memory budget of 500 kB" in note


def test_the_keras_effect_recomputes_only_the_layers_fix_would(tmp_path):
    """BN003's output effect is what `fix` would write: the drifting layer recomputed, a layer whose statistics
    are near the data's (under BN003's thresholds) kept. Recomputing every layer (tempocnn's fcn: only its last
    BN drifted, all ten were recomputed) called an error what fix's own repair moved by a warning's amount."""
    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(0)
    inp = keras.Input((8,), name="features")
    x = layers.ReLU()(layers.BatchNormalization(name="bn_1")(layers.Dense(16, name="dense_1")(inp)))
    x = layers.ReLU()(layers.BatchNormalization(name="bn_2")(layers.Dense(16, name="dense_2")(x)))
    model = keras.Model(inp, layers.Dense(10, name="logits")(x))
    data = rng.normal(size=(256, 8)).astype(np.float32)
    h = data.astype(np.float64)
    # bn_1 0.3 sd and x1.5 off the data (under 0.5 sd and x2), bn_2 2 sd and x6 off
    for dense, bn, shift, ratio in (("dense_1", "bn_1", 0.3, 1.5), ("dense_2", "bn_2", 2.0, 6.0)):
        kernel, bias = (np.asarray(w, np.float64) for w in model.get_layer(dense).get_weights())
        h = h @ kernel + bias
        layer = model.get_layer(bn)
        mean, var = h.mean(axis=0) + shift * h.std(axis=0), h.var(axis=0) * ratio
        layer.moving_mean.assign(mean.astype(np.float32))
        layer.moving_variance.assign(var.astype(np.float32))
        gamma, beta = (np.asarray(w).astype(np.float64) for w in (layer.gamma, layer.beta))
        h = np.maximum((h - mean) / np.sqrt(var + layer.epsilon) * gamma + beta, 0.0)
    path = _save(model, tmp_path / "one_drifts.keras")
    np.save(tmp_path / "data.npy", data)
    data_path = str(tmp_path / "data.npy")
    report = engine.probe(path, ProbeSettings(batch_sizes=(1, 2, 8), data_path=data_path, data_source=data_path))
    [finding] = [f for f in report.findings if f.code == "BN003"]
    assert finding.layer == "bn_2" and finding.evidence["output_effect"]["recomputed_layers"] == ["bn_2"]


def test_keras_effect_passes_measure_no_layer(tmp_path):
    """The effect's two passes over the data read the model's outputs only: no layer's statistics are computed
    on the data's one batch (they were half of a probe's time on fer's 500 samples)."""
    from bncheck.backends.keras.probe import recalibration

    path, _, data, _, exact = _briefly_fitted_classifier(tmp_path)
    view = KerasBackend().load(path)
    runner = KerasRunner(view, view.handle)
    found = recalibration(runner, {"features": data})
    assert not isinstance(found, str) and found.outputs["logits"].samples == 256
    assert runner.capture.seen == {} and runner.capture.recompute == {}


def test_keras_effect_takes_the_stored_outputs_the_probes_runs_over_the_data_kept(tmp_path):
    """The predict-style runs over the data keep the model's outputs on the effect's samples (run_plan's
    keep_outputs, in batches of 8): the stored model's side of the effect, which then makes one pass, not
    two. They agree with one batch of those samples to float rounding; outputs it is given are what it reads."""
    from bncheck.backends.keras.probe import recalibration
    from bncheck.probe_plan import run_plan

    path, _, data, _, _ = _briefly_fitted_classifier(tmp_path)
    view = KerasBackend().load(path)
    runner = KerasRunner(view, view.handle)
    settings = ProbeSettings(batch_sizes=(1, 2, 8), samples=2, data={"features": data})
    kept = run_plan(view, settings, runner.runner(PREDICT), keep_outputs=100).data_outputs
    assert kept is not None and kept["logits"].shape == (100, *kept["logits"].shape[1:])
    whole = runner.observe({"features": data[:100]}, PREDICT, layers=False).outputs
    np.testing.assert_allclose(kept["logits"], whole["logits"], rtol=1e-5, atol=1e-6)
    ran = recalibration(runner, {"features": data[:100]})
    given = recalibration(runner, {"features": data[:100]}, kept)
    assert not isinstance(ran, str) and not isinstance(given, str)
    assert given.outputs["logits"].shift == pytest.approx(ran.outputs["logits"].shift, rel=1e-4)
    moved = {"logits": kept["logits"] + 3.0 * float(np.std(kept["logits"]))}
    shifted = recalibration(runner, {"features": data[:100]}, moved)
    assert not isinstance(shifted, str) and shifted.outputs["logits"].shift > ran.outputs["logits"].shift + 1.0


def test_keras_runs_over_the_data_measure_the_layers_inputs_only(tmp_path):
    """A run over the data that is neither a probe nor a dependence run is read for its layers' input
    statistics alone (ProbeResult.data): the runner is asked for those and leaves the outputs' out; the probe
    runs keep both, and the data's statistics are those of every sample."""
    from bncheck.probe_plan import run_plan

    path, _, data, _, _ = _briefly_fitted_classifier(tmp_path)
    view = KerasBackend().load(path)
    runner = KerasRunner(view, view.handle)
    inner = runner.runner(PREDICT)
    calls = []

    def recording(feeds, layers=True, *, inputs_only=False):
        got = inner(feeds, layers, inputs_only=inputs_only)
        # what the wrapped layers computed in this call: no output statistics at all on a data run
        computed = {n: all(y is None for _, y in pairs) for n, pairs in runner.capture.seen.items()}
        assert computed == {n: p.output is None for n, p in got.layers.items()}
        calls.append((len(feeds["features"]), inputs_only, computed))
        return got

    result = run_plan(view, ProbeSettings(batch_sizes=(1, 2, 8), samples=2, data={"features": data}), recording)
    data_only = [c for c in calls if c[1]]
    # 256 samples in runs of 8: the first is the probe run at 8 (both measured), the 31 others data runs only
    assert len(data_only) == 31 and all(size == 8 and all(c.values()) for size, _, c in data_only)
    assert all(not any(c.values()) for _, only, c in calls if not only) and len(calls) > len(data_only)
    assert result.data is not None and result.data["bn_1"].batch_size == 256 and result.data["bn_2"].count == 256
    assert result.at(8, "bn_1").output is not None and result.at(8, "bn_1").output.batch_size == 8


def test_brief_fit_sample_drift_is_an_error_and_the_matching_one_stays_clean():
    data = str(SAMPLES / "keras_calib.npy")
    settings = ProbeSettings(batch_sizes=(1, 2, 8), samples=2, data_path=data, data_source=data)
    drift = engine.probe(str(SAMPLES / "keras_brief_fit_drift.keras"), settings)
    [probe] = drift.probes
    assert probe.recalibration is not None and probe.recalibration.outputs["out"].shift > 0.5
    assert {(f.code, f.severity.label) for f in drift.findings} == {("BN003", "error")}
    clean = engine.probe(str(SAMPLES / "keras_trained_matching.keras"), settings)
    assert clean.findings == [] and clean.probes[0].recalibration is None  # no drift: nothing recomputed


def test_keras_effect_recomputes_statistics_from_the_datas_first_samples_past_the_bound(monkeypatch):
    from bncheck import probe_data

    monkeypatch.setattr(probe_data, "RECALIBRATION_ELEMENTS", 40 * 8)  # keras_calib.npy: 256 samples of 8 values
    data = str(SAMPLES / "keras_calib.npy")
    settings = ProbeSettings(batch_sizes=(1, 2, 8), samples=2, data_path=data, data_source=data)
    [probe] = engine.probe(str(SAMPLES / "keras_brief_fit_drift.keras"), settings).probes
    assert probe.recalibration is not None and probe.recalibration.samples == 40
    assert any("recomputed from the first 40 of the data's 256 samples" in note for note in probe.notes)


def test_keras_effect_batch_is_bounded_by_its_busiest_layer(monkeypatch):
    """The effect's one batch takes no more samples than RECALIBRATION_LAYER_BYTES allow at the busiest layer
    (Keras holds the whole batch's activations at once), with the note's reason; the element bound is wider."""
    from bncheck.backends.keras import memory
    from bncheck.backends.keras import probe as keras_probe

    path = str(SAMPLES / "keras_brief_fit_drift.keras")
    per_sample, _ = memory.busiest_layer(keras.saving.load_model(path), 1)
    assert per_sample > 0
    monkeypatch.setattr(keras_probe, "RECALIBRATION_LAYER_BYTES", 48 * per_sample + per_sample // 2)
    data = str(SAMPLES / "keras_calib.npy")
    settings = ProbeSettings(batch_sizes=(1, 2, 8), samples=2, data_path=data, data_source=data)
    [probe] = engine.probe(path, settings).probes
    assert probe.recalibration is not None and probe.recalibration.samples == 48
    assert any(
        "recomputed from the first 48 of the data's 256 samples (as many as one batch holds with" in note
        for note in probe.notes
    )


def test_a_default_keras_probe_leaves_inference_bns_out_unless_the_outputs_hold_nan(tmp_path):
    inp = keras.Input((3,))
    out = layers.BatchNormalization(name="bn")(layers.Dense(3, name="d")(inp))
    view = KerasBackend().load(_save(keras.Model(inp, out), tmp_path / "clean.keras"))
    [result] = KerasBackend().probe(view, ProbeSettings(batch_sizes=(1, 2), samples=2))
    assert result.at(2, "bn") is None and result.not_needed == {"bn": NOT_NEEDED} and "bn" not in result.dependence
    # a Dense whose weights hold NaN: the outputs show it, and the layer is measured so that BN005 can name it
    nan_model = keras.Model(inp, out)
    nan_model.get_layer("d").kernel.assign(np.full((3, 3), np.nan, "float32"))
    nan_view = KerasBackend().load(_save(nan_model, tmp_path / "nan.keras"))
    [nan_result] = KerasBackend().probe(nan_view, ProbeSettings(batch_sizes=(1, 2), samples=2))
    assert not nan_result.not_needed and nan_result.at(2, "bn").input.total_nonfinite > 0
    assert any(note.startswith("every normalization layer measured") for note in nan_result.notes)
