"""`bncheck fix` on Keras files: statistics from data, baked training=True calls turned into inference calls,
the written file loaded back by real Keras with safe_mode=True; code-carrying files refused."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

os.environ.setdefault("KERAS_BACKEND", "numpy")  # before keras is imported; the test extra installs keras

import keras

from bncheck.backends import BackendError
from bncheck.cli import main
from bncheck.fixing import fix

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"


def load_safe(path: str):
    return keras.saving.load_model(path, compile=False, safe_mode=True)


def bn_input_stats(model, layer: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and variance of ``layer``'s input over ``x`` (inference mode), in float64."""
    probe = keras.Model(model.inputs, model.get_layer(layer).input)
    acts = np.asarray(probe(x, training=False), dtype=np.float64)
    axes = tuple(range(acts.ndim - 1))
    return acts.mean(axis=axes), acts.var(axis=axes)


def training_flags(config: object) -> list[bool]:
    """Every explicit ``training`` kwarg recorded in a Keras config."""
    found: list[bool] = []
    if isinstance(config, dict):
        for key, value in config.items():
            if key == "training" and isinstance(value, bool):
                found.append(value)
            else:
                found += training_flags(value)
    elif isinstance(config, list):
        for value in config:
            found += training_flags(value)
    return found


def test_keras_file_fixed_with_data_loads_with_safe_mode_and_holds_the_datas_statistics(tmp_path: Path) -> None:
    calib = str(SAMPLES / "keras_calib.npy")
    out = str(tmp_path / "fixed.keras")
    report = fix(str(SAMPLES / "keras_brief_fit_drift.keras"), out, calib)
    actions = {e.layer: e.action for e in report.fix.outcome.layers}
    assert actions == {"bn_1": "recalibrated", "bn_2": "recalibrated"}
    assert report.exit_code == 0 and report.fix.after is not None
    assert [f for f in report.fix.after.findings if f.code == "BN003"] == []
    fixed = load_safe(out)
    x = np.load(calib)
    for name in ("bn_1", "bn_2"):  # bn_2's statistics are those of its input with bn_1 already repaired
        mean, var = bn_input_stats(fixed, name, x)
        layer = fixed.get_layer(name)
        np.testing.assert_allclose(np.asarray(layer.moving_mean), mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.asarray(layer.moving_variance), var, rtol=1e-4, atol=1e-5)
    assert report.fix.outcome.layers[0].uncertainty.samples == 256


def test_a_layer_that_drifted_only_under_the_layer_before_it_says_so(tmp_path: Path) -> None:
    """bn_2's moving statistics are its input's once bn_1 is repaired, not under bn_1's stale ones: the probe
    flags both, and fix recomputes bn_2 (the probe's verdict) with a reason that quotes the original drift
    beside its numbers after the repair, not "drift from the data" with numbers under the thresholds."""
    inp = keras.Input((4,), name="x")
    out = keras.layers.BatchNormalization(name="bn_2")(keras.layers.BatchNormalization(name="bn_1")(inp))
    model = keras.Model(inp, out)
    model.get_layer("bn_1").moving_mean.assign(np.full(4, 5.0, np.float32))  # the data's mean is 0
    model.get_layer("bn_2").moving_mean.assign(np.full(4, 0.01, np.float32))  # bn_1 repaired: about x's
    model.get_layer("bn_2").moving_variance.assign(np.full(4, 1.02, np.float32))
    src = str(tmp_path / "chain.keras")
    model.save(src)
    np.save(tmp_path / "calib.npy", np.random.default_rng(3).standard_normal((256, 4)).astype(np.float32))
    report = fix(src, None, str(tmp_path / "calib.npy"), dry_run=True)
    reasons = {e.layer: e.reason for e in report.fix.outcome.layers}
    assert {e.layer: e.action for e in report.fix.outcome.layers} == {"bn_1": "recalibrated", "bn_2": "recalibrated"}
    assert reasons["bn_1"].startswith("moving statistics drift from the data (median mean shift 4.9")
    assert reasons["bn_2"].startswith("BN003 drift in the original model (median mean shift 4.")
    assert "once the layers upstream are repaired" in reasons["bn_2"]
    # the probe's findings say which drift starts the cascade
    messages = {f.layer: f.message for f in report.findings if f.code == "BN003"}
    assert "layers above" not in messages["bn_1"]
    assert "; recomputing the layers above it brings it within the thresholds (median mean shift 0." in messages["bn_2"]


def test_h5_file_fixed_with_data_loads_with_safe_mode(tmp_path: Path) -> None:
    x = np.random.default_rng(5).normal(1.0, 2.0, (48, 8, 8, 3)).astype(np.float32)
    np.save(tmp_path / "calib.npy", x)
    out = str(tmp_path / "fixed.h5")
    report = fix(str(SAMPLES / "keras_legacy_convnet.h5"), out, str(tmp_path / "calib.npy"), stats="data")
    entries = {e.layer: e for e in report.fix.outcome.layers}
    assert entries["head_bn"].action == "to-inference" and entries["head_bn"].source == "data"
    assert h5py.is_hdf5(out)
    fixed = load_safe(out)
    assert training_flags(fixed.get_config()) == []
    mean, var = bn_input_stats(fixed, "head_bn", x)
    np.testing.assert_allclose(np.asarray(fixed.get_layer("head_bn").moving_mean), mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(fixed.get_layer("head_bn").moving_variance), var, rtol=1e-4, atol=1e-5)
    assert report.exit_code == 0, [f.message for f in report.fix.remaining("error")]


def test_baked_training_call_becomes_an_inference_call_without_data(tmp_path: Path) -> None:
    src = str(SAMPLES / "keras_baked_training_1d.keras")
    with zipfile.ZipFile(src) as archive:
        assert True in training_flags(json.loads(archive.read("config.json")))
    out = str(tmp_path / "fixed.keras")
    result = CliRunner().invoke(main, ["fix", src, "-o", out, "--format", "json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert [(e["layer"], e["action"], e["source"]) for e in doc["fix"]["layers"]] == [
        ("logits_bn", "to-inference", "stored")
    ]
    with zipfile.ZipFile(out) as archive:
        assert training_flags(json.loads(archive.read("config.json"))) == []
    original, fixed = load_safe(src), load_safe(out)
    x = np.random.default_rng(3).normal(size=(6, *original.input_shape[1:])).astype(np.float32)
    for i in range(len(x)):  # batch 1: the fixed model as written = the original in inference mode
        np.testing.assert_allclose(
            np.asarray(fixed(x[i : i + 1])), np.asarray(original(x[i : i + 1], training=False)), rtol=1e-6, atol=1e-6
        )
    assert doc["fix"]["reprobe"]["findings"] == []


@pytest.mark.parametrize("wrapped", ["time_distributed", "nested_model"])
def test_a_baked_training_call_of_a_wrapper_or_nested_model_is_removed(tmp_path: Path, wrapped: str) -> None:
    """The flag sits on the call of the TimeDistributed or of the nested model, which bakes it into the
    BatchNormalization inside: that call is the one fix edits."""
    from keras import layers

    keras.utils.set_random_seed(0)
    if wrapped == "time_distributed":
        inp = keras.Input((5, 3), name="x")
        out = layers.TimeDistributed(layers.BatchNormalization(name="frame_bn"), name="td")(inp, training=True)
    else:
        inner_in = keras.Input((3,))
        encoder = keras.Model(
            inner_in, layers.BatchNormalization(name="enc_bn")(layers.Dense(3)(inner_in)), name="encoder"
        )
        inp = keras.Input((3,), name="x")
        out = encoder(inp, training=True)
    model = keras.Model(inp, layers.Dense(2, name="head")(out))
    for var in model.non_trainable_variables:  # trained-looking moving statistics
        var.assign(np.random.default_rng(1).uniform(0.5, 1.5, tuple(var.shape)).astype("float32"))
    src, out_path = str(tmp_path / "baked.keras"), str(tmp_path / "fixed.keras")
    model.save(src)
    result = CliRunner().invoke(main, ["fix", src, "-o", out_path, "--format", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["fix"]["reprobe"]["findings"] == []
    with zipfile.ZipFile(out_path) as archive:
        assert training_flags(json.loads(archive.read("config.json"))) == []
    fixed = load_safe(out_path)
    x = np.random.default_rng(3).normal(size=(8, *model.input_shape[1:])).astype(np.float32)
    alone = np.concatenate([np.asarray(fixed(x[i : i + 1])) for i in range(len(x))])
    np.testing.assert_allclose(alone, np.asarray(fixed(x)), rtol=1e-5, atol=1e-6)


def test_stale_keras_statistics_without_data_are_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match=r"bn_Conv1, .* need calibration data \(--data CALIB\)"):
        fix(str(SAMPLES / "keras_mobilenetv2_untrained.keras"), str(tmp_path / "f.keras"), None)
    assert not (tmp_path / "f.keras").exists()


def test_keras_file_with_a_lambda_is_refused_and_nothing_runs(tmp_path: Path) -> None:
    marker = tmp_path / "ran.txt"

    def side_effect(t, path=str(marker)):
        with open(path, "w") as f:
            f.write("executed")
        return t

    inp = keras.Input((4,))
    x = keras.layers.BatchNormalization(name="bn")(inp, training=True)
    model = keras.Model(inp, keras.layers.Lambda(side_effect, name="writes_a_file")(x))
    src = str(tmp_path / "lambda.keras")
    model.save(src)
    marker.unlink(missing_ok=True)
    result = CliRunner().invoke(main, ["fix", src, "-o", str(tmp_path / "f.keras")])
    assert result.exit_code == 2 and "writes_a_file" in result.stderr
    assert not marker.exists() and not (tmp_path / "f.keras").exists()


def test_fix_without_keras_is_exit_2_with_the_install_hint(tmp_path: Path) -> None:
    import subprocess
    import sys

    src = str(SAMPLES / "keras_baked_training_1d.keras")
    code = (
        "import sys; sys.modules['keras'] = None\n"  # keras not importable, as without the extra
        "from bncheck.cli import main\n"
        f"main(['fix', {src!r}, '-o', {str(tmp_path / 'f.keras')!r}])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "pip install 'keras>=3.12' jax" in out.stderr
    assert not (tmp_path / "f.keras").exists()


def test_probing_as_written_leaves_the_loaded_moving_statistics_alone() -> None:
    """Keras 3 updates a BatchNormalization's moving statistics in a training=True call: the as-written probe
    style must not leave those updates behind for the predict style (or fix) to read."""
    from bncheck.backends.keras import KerasBackend
    from bncheck.backends.keras.probe import AS_WRITTEN, KerasRunner

    path = str(SAMPLES / "keras_baked_training_1d.keras")
    view = KerasBackend().load(path)
    runner = KerasRunner(view, view.handle)
    layer = runner.layers["logits_bn"]
    before = np.array(layer.moving_mean)
    x = np.random.default_rng(0).normal(size=(32, *runner.model.input_shape[1:])).astype(np.float32)
    runner.run({view.inputs[0].name: x}, AS_WRITTEN)
    np.testing.assert_array_equal(np.array(layer.moving_mean), before)


@pytest.mark.parametrize("batch_size", [32, 64], ids=["the-probes-batches", "other-batches"])
def test_fix_takes_its_first_pass_from_the_probes_runs_over_the_same_data(
    monkeypatch, tmp_path: Path, batch_size: int
) -> None:
    """bn_2 follows bn_1. The probe of the original runs keras_calib.npy's 256 samples in batches of 32,
    measuring every layer's input: fix's first pass in batches of 32 would measure the same, so it takes the
    probe's numbers and runs no batch of its own; bn_1 changes, and the second pass measures bn_2's input
    again from tensors it kept (no run of the whole model). In batches of 64 the first pass is its own. No
    pass computes an output's statistics, and the written statistics are the data's either way."""
    from bncheck.backends.keras.probe import KerasRunner

    measured: list[dict[str, bool]] = []
    observe = KerasRunner.observe

    def recording(self, feeds, style, layers=True, inputs_only=False):
        got = observe(self, feeds, style, layers, inputs_only)
        if inputs_only:  # fix's passes, and the probes' runs over the data that are not probe runs
            measured.append({name: seen.output is None for name, seen in got.layers.items()})
        return got

    monkeypatch.setattr(KerasRunner, "observe", recording)
    out = str(tmp_path / "fixed.keras")
    report = fix(
        str(SAMPLES / "keras_brief_fit_drift.keras"), out, str(SAMPLES / "keras_calib.npy"), batch_size=batch_size
    )
    assert report.fix.outcome.passes == 2 and report.fix.outcome.batch_size == batch_size
    both = {"bn_1": True, "bn_2": True}
    # the probes of the original and of the written model run 7 of the 8 batches of 32 over the data beside
    # their probe run of 32; fix's own first pass, 4 batches of 64
    assert measured == [both] * 7 + ([both] * 4 if batch_size == 64 else []) + [both] * 7
    x = np.load(SAMPLES / "keras_calib.npy")
    original, fixed = load_safe(str(SAMPLES / "keras_brief_fit_drift.keras")), load_safe(out)
    for name, model in (("bn_1", original), ("bn_2", fixed)):  # bn_2's input is the repaired bn_1's
        mean, var = bn_input_stats(model, name, x)
        np.testing.assert_allclose(np.array(fixed.get_layer(name).moving_mean), mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.array(fixed.get_layer(name).moving_variance), var, rtol=1e-4, atol=1e-5)


def _branching_net(tmp_path: Path, fixed_batch: int | None = None, nested: bool = False) -> str:
    """Conv1D blocks with fresh (never updated) BNs: bn1, then two branches bn2a and bn2b that an Add joins
    with relu1, then bn3 on that and the model's input, in a residual block. ``nested``: the branches inside
    a model of their own."""
    layers = keras.layers
    keras.utils.set_random_seed(3)
    inp = keras.Input((16, 4), batch_size=fixed_batch, name="x")
    relu1 = layers.ReLU(name="relu1")(layers.BatchNormalization(name="bn1")(layers.Conv1D(6, 3, padding="same")(inp)))

    def branches(t):
        a = layers.BatchNormalization(name="bn2a")(layers.Conv1D(6, 3, padding="same", name="conv2a")(t))
        b = layers.BatchNormalization(name="bn2b")(layers.Conv1D(6, 1, name="conv2b")(t))
        return layers.Add(name="join")([a, b, t])

    if nested:
        inner_in = keras.Input((16, 6))
        joined = keras.Model(inner_in, branches(inner_in), name="inner")(relu1)
    else:
        joined = branches(relu1)
    relu2 = layers.ReLU(name="relu2")(joined)
    wide = layers.Concatenate(name="wide")([relu2, inp])  # the model's input, read again two passes later
    bn3 = layers.BatchNormalization(name="bn3")(layers.Conv1D(6, 3, padding="same", name="conv3")(wide))
    out = layers.Dense(2, name="head")(layers.GlobalAveragePooling1D()(layers.Add()([bn3, relu2])))
    path = tmp_path / "branching.keras"
    keras.Model(inp, out).save(path)
    return str(path)


def _layers_config(archive: zipfile.ZipFile) -> object:
    """A .keras archive's model config, without the ids of shared objects (other in each process that saves)."""

    def without_ids(value: object) -> object:
        if isinstance(value, dict):
            return {k: without_ids(v) for k, v in value.items() if k != "shared_object_id"}
        return [without_ids(v) for v in value] if isinstance(value, list) else value

    return without_ids(json.loads(archive.read("config.json"))["config"])


def _same_statistics(kept: Path, full: Path, count: int) -> dict[str, np.ndarray]:
    """The moving statistics of two fixed files, equal to float32 rounding: ``count`` arrays (mean and variance
    per BN). Returns the first file's."""
    a, b = _moving_statistics(str(kept)), _moving_statistics(str(full))
    assert a.keys() == b.keys() and len(a) == count
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6, err_msg=name)
    return a


def _moving_statistics(path: str) -> dict[str, np.ndarray]:
    found: dict[str, np.ndarray] = {}

    def walk(container) -> None:
        for layer in container.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                found[f"{layer.name}.mean"] = np.array(layer.moving_mean)
                found[f"{layer.name}.var"] = np.array(layer.moving_variance)
            if hasattr(layer, "layers"):
                walk(layer)

    walk(load_safe(path))
    return found


def _fix_counting_full_passes(monkeypatch, src: str, out: str, calib: str, segments: list[int] | None = None):
    """fix's outcome and how many batches it ran through the whole model (its passes from the inputs);
    ``segments`` gets the number of layer calls each cut pass ran."""
    from bncheck.backends.keras import fix as keras_fix
    from bncheck.backends.keras.frontier import Frontier

    batches = 0
    full_pass, measure = keras_fix._full_pass, Frontier.measure

    def counting(runner, feeds, undecided):
        nonlocal batches
        batches += len(feeds)
        return full_pass(runner, feeds, undecided)

    def measuring(self, front, undecided):
        before = self.segment_nodes
        found = measure(self, front, undecided)
        if segments is not None:
            segments.append(self.segment_nodes - before)
        return found

    monkeypatch.setattr(keras_fix, "_full_pass", counting)
    monkeypatch.setattr(Frontier, "measure", measuring)
    report = fix(src, out, calib, batch_size=8)
    monkeypatch.setattr(keras_fix, "_full_pass", full_pass)
    monkeypatch.setattr(Frontier, "measure", measure)
    return report.fix.outcome, batches


@pytest.mark.parametrize("fixed_batch", [None, 8], ids=["free-batch", "batch-fixed-to-8"])
def test_passes_after_the_first_run_from_kept_tensors_with_the_statistics_of_full_passes(
    tmp_path: Path, monkeypatch, fixed_batch: int | None
) -> None:
    """The first pass repairs bn1; the next two run from the tensors kept before them (keras sub-models):
    bn2a and bn2b together (neither is upstream of the other), then bn3, relu1 kept for the Add one pass
    later, so that no layer call runs twice in them; the model written after them is the model Keras loaded
    (its config unchanged by the sub-models). The written statistics are those of passes from the model's
    inputs (what a memory budget too small for the kept tensors falls back to, one layer a pass below a
    repair), and the data's: 20 samples by 8, a fixed batch's 4 repeats counting in neither."""
    from bncheck.backends.keras import frontier

    src = _branching_net(tmp_path, fixed_batch)
    x = np.random.default_rng(7).normal(size=(20, 16, 4)).astype(np.float32)
    np.save(tmp_path / "calib.npy", x)
    calib = str(tmp_path / "calib.npy")
    segments: list[int] = []
    kept, full_batches = _fix_counting_full_passes(monkeypatch, src, str(tmp_path / "kept.keras"), calib, segments)
    # the first pass is the probe's runs over the data, which took the same batches (of --batch-size 8, or the
    # batch the file fixes to 8)
    assert kept.passes == 3 and full_batches == 0
    # conv1, bn1, relu1, conv2a, conv2b; then bn2a, bn2b, join, relu2, wide, conv3: no call twice (from the
    # inputs: 5 + 11)
    assert segments == [5, 6]
    assert {e.layer: e.action for e in kept.layers} == dict.fromkeys(["bn1", "bn2a", "bn2b", "bn3"], "recalibrated")
    monkeypatch.setattr(frontier, "BUDGET_SHARE", 0.0)
    full, full_batches = _fix_counting_full_passes(monkeypatch, src, str(tmp_path / "full.keras"), calib)
    assert full.passes == 4 and full_batches == 9
    assert [(e.layer, e.action) for e in kept.layers] == [(e.layer, e.action) for e in full.layers]
    a = _same_statistics(tmp_path / "kept.keras", tmp_path / "full.keras", 8)
    with zipfile.ZipFile(src) as before, zipfile.ZipFile(tmp_path / "kept.keras") as after:
        assert _layers_config(after) == _layers_config(before)
    fixed = load_safe(str(tmp_path / "kept.keras"))
    for layer in ("bn1", "bn2a", "bn2b", "bn3"):
        probe = keras.Model(fixed.inputs, fixed.get_layer(layer).input)
        acts = np.concatenate([np.asarray(probe(x[i : i + 8], training=False)) for i in range(0, 20, 8)])
        np.testing.assert_allclose(a[f"{layer}.mean"], acts.mean(axis=(0, 1)), rtol=1e-4, atol=1e-5, err_msg=layer)
        np.testing.assert_allclose(a[f"{layer}.var"], acts.var(axis=(0, 1)), rtol=1e-4, atol=1e-5, err_msg=layer)


def test_layers_inside_a_nested_model_run_from_its_input_computed_once(tmp_path: Path, monkeypatch) -> None:
    """bn2a and bn2b are called by a nested model (as a base model is in transfer learning): once bn1 above it
    is repaired, the nested model's input is computed once and its layers measured by sub-models of it;
    bn3, below it, by a sub-model of the whole model. The statistics are those of passes from the model's
    inputs, and the written config the source's."""
    from bncheck.backends.keras import frontier

    src = _branching_net(tmp_path, nested=True)
    np.save(tmp_path / "calib.npy", np.random.default_rng(7).normal(size=(20, 16, 4)).astype(np.float32))
    calib = str(tmp_path / "calib.npy")
    segments: list[int] = []
    kept, full_batches = _fix_counting_full_passes(monkeypatch, src, str(tmp_path / "kept.keras"), calib, segments)
    names = ["bn1", "inner/bn2a", "inner/bn2b", "bn3"]
    assert {e.layer: e.action for e in kept.layers} == dict.fromkeys(names, "recalibrated")
    # the first pass alone ran the whole model; then conv2a and conv2b inside the nested model, from its input
    # (conv1, bn1, relu1 computed once); then bn3's input from the model's: conv1, bn1, relu1, the nested
    # model, relu2, wide, conv3
    assert kept.passes == 3 and full_batches == 0 and segments == [2, 7]  # the first pass: the probe's runs
    monkeypatch.setattr(frontier, "BUDGET_SHARE", 0.0)
    full, full_batches = _fix_counting_full_passes(monkeypatch, src, str(tmp_path / "full.keras"), calib)
    assert full.passes == 4 and full_batches == 9
    _same_statistics(tmp_path / "kept.keras", tmp_path / "full.keras", 8)
    with zipfile.ZipFile(src) as before, zipfile.ZipFile(tmp_path / "kept.keras") as after:
        assert _layers_config(after) == _layers_config(before)


def test_a_base_model_inside_a_sequential_runs_its_later_passes_from_kept_tensors(tmp_path: Path, monkeypatch) -> None:
    """Sequential([Input, base, pooling, head]), as Keras's transfer-learning guides write it, its base a
    functional model of two Conv+BN blocks never updated: after the first pass, the base's second layer is
    measured from the base's input (the data) by a sub-model of the base, with the statistics of passes from
    the model's inputs."""
    from bncheck.backends.keras import frontier

    layers = keras.layers
    keras.utils.set_random_seed(5)
    inner_in = keras.Input((16, 4))
    x = layers.ReLU()(layers.BatchNormalization(name="bn_a")(layers.Conv1D(6, 3, padding="same")(inner_in)))
    x = layers.BatchNormalization(name="bn_b")(layers.Conv1D(6, 3, padding="same")(x))
    base = keras.Model(inner_in, x, name="base")
    model = keras.Sequential([keras.Input((16, 4)), base, layers.GlobalAveragePooling1D(), layers.Dense(2)])
    src = str(tmp_path / "seq.keras")
    model.save(src)
    np.save(tmp_path / "calib.npy", np.random.default_rng(3).normal(size=(20, 16, 4)).astype(np.float32))
    calib = str(tmp_path / "calib.npy")
    segments: list[int] = []
    kept, full_batches = _fix_counting_full_passes(monkeypatch, src, str(tmp_path / "kept.keras"), calib, segments)
    assert {e.layer: e.action for e in kept.layers} == dict.fromkeys(["base/bn_a", "base/bn_b"], "recalibrated")
    assert kept.passes == 2 and full_batches == 0 and segments == [4]  # conv, bn_a, relu, conv: from the base input
    monkeypatch.setattr(frontier, "BUDGET_SHARE", 0.0)
    full, full_batches = _fix_counting_full_passes(monkeypatch, src, str(tmp_path / "full.keras"), calib)
    assert full.passes == 2 and full_batches == 3
    _same_statistics(tmp_path / "kept.keras", tmp_path / "full.keras", 4)


def _frozen_backbone_under_a_head(tmp_path: Path) -> tuple[str, str]:
    """Dense -> BatchNormalization saved frozen (trainable=False), its moving statistics 2 sd and x6 off the
    data's, under a trained-looking head: transfer learning's frozen backbone fed other preprocessing."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    inp = keras.Input((8,), name="features")
    bn = keras.layers.BatchNormalization(name="backbone_bn", trainable=False)
    x = keras.layers.ReLU()(bn(keras.layers.Dense(16, name="backbone")(inp)))
    model = keras.Model(inp, keras.layers.Dense(5, name="head")(x))
    data = rng.normal(size=(128, 8)).astype(np.float32)
    mean, var = bn_input_stats(model, "backbone_bn", data)
    bn.moving_mean.assign((mean + 2.0 * np.sqrt(var)).astype(np.float32))
    bn.moving_variance.assign((6.0 * var).astype(np.float32))
    path = str(tmp_path / "frozen.keras")
    model.save(path)
    np.save(tmp_path / "data.npy", data)
    return path, str(tmp_path / "data.npy")


def test_a_frozen_layers_drift_is_a_warning_and_fix_keeps_its_statistics_unless_told(tmp_path: Path) -> None:
    # the layers after a frozen one were trained on its statistics (Capricorn's frozen DenseNet under its head:
    # recomputed from its tiles, predictions moved to another tissue class); --stats data still recomputes them
    path, data = _frozen_backbone_under_a_head(tmp_path)
    result = CliRunner().invoke(main, ["probe", path, "--data", data, "--format", "json"])
    assert result.exit_code == 0, result.output
    [finding] = [f for f in json.loads(result.stdout)["findings"] if f["code"] == "BN003"]
    assert finding["layer"] == "backbone_bn" and finding["severity"] == "warning"
    assert finding["evidence"]["trainable"] is False and "frozen" in finding["message"]
    assert "--stats data" in finding["hint"]
    kept = fix(path, str(tmp_path / "kept.keras"), data)
    [entry] = [e for e in kept.fix.outcome.layers if e.layer == "backbone_bn"]
    assert entry.action == "unchanged" and "frozen" in entry.reason
    recomputed = fix(path, str(tmp_path / "recomputed.keras"), data, stats="data")
    [entry] = [e for e in recomputed.fix.outcome.layers if e.layer == "backbone_bn"]
    assert entry.action == "recalibrated"


def test_a_fixed_file_says_the_training_state_it_leaves_behind(tmp_path: Path) -> None:
    # the written file had silently lost the original's training_config and optimizer_weights
    x = np.random.default_rng(5).normal(1.0, 2.0, (16, 8, 8, 3)).astype(np.float32)
    np.save(tmp_path / "calib.npy", x)
    src = tmp_path / "compiled.h5"
    src.write_bytes((SAMPLES / "keras_legacy_convnet.h5").read_bytes())
    said = "holds none of the original's training configuration or optimizer state"
    report = fix(str(src), str(tmp_path / "a.h5"), str(tmp_path / "calib.npy"), stats="data")
    assert not any(said in n for n in report.fix.outcome.notes)  # nothing to leave behind
    with h5py.File(src, "r+") as h5:
        h5.attrs["training_config"] = json.dumps({"loss": "mse", "optimizer_config": {"class_name": "Adam"}})
    report = fix(str(src), str(tmp_path / "b.h5"), str(tmp_path / "calib.npy"), stats="data")
    assert any(said in n for n in report.fix.outcome.notes)
    with h5py.File(tmp_path / "b.h5", "r") as h5:
        assert "training_config" not in h5.attrs  # what the note says
