"""The memory check before Keras runs a batch (bncheck.backends.keras.memory): a lower bound from the loaded
model's layer shapes, compared with the budget before any batch runs. Real Keras (numpy backend), real CLI."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

os.environ.setdefault("KERAS_BACKEND", "numpy")
keras = pytest.importorskip("keras")

from bncheck.backends.keras import memory
from bncheck.cli import main
from tests.budget_cases import UNDRAWN_PEAK, check_fix_calibration_batch, refusal


def _wide_conv(path: Path, hw: int | None, stale: bool = False, moving: tuple[float, float] = (0.1, 0.5)) -> str:
    """x[N,hw,hw,3] -> Conv2D 3x3 (64 channels, full resolution) -> BN -> ReLU -> global average pool;
    ``stale``: the BN's moving statistics as initialized (mean 0, variance 1), which `fix --data` recomputes;
    else ``moving`` (mean, variance) in every channel. ``hw`` None: height and width left open."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((hw, hw, 3), name="x")
    h = keras.layers.Conv2D(64, 3, padding="same", name="conv")(inp)
    bn = keras.layers.BatchNormalization(name="bn")
    h = keras.layers.ReLU(name="relu")(bn(h))
    model = keras.Model(inp, keras.layers.GlobalAveragePooling2D(name="pool")(h))
    if not stale:
        bn.moving_mean.assign(np.full(64, moving[0], np.float32))
        bn.moving_variance.assign(np.full(64, moving[1], np.float32))
    model.save(path)
    return str(path)


def test_busiest_layer_is_the_hand_computed_bytes_of_its_input_and_output(tmp_path: Path) -> None:
    model = keras.saving.load_model(_wide_conv(tmp_path / "wide.keras", hw=32), compile=False)
    node_bytes, where = memory.busiest_layer(model, 10)
    # Conv2D reads 3 channels and writes 64; BatchNormalization and ReLU read and write 64: the largest
    assert node_bytes == 2 * 10 * 32 * 32 * 64 * 4
    assert where in ("'bn' (BatchNormalization)", "'relu' (ReLU)")


def test_huge_batch_is_refused_with_the_estimate_before_any_run(tmp_path: Path, monkeypatch) -> None:
    model = _wide_conv(tmp_path / "wide.keras", hw=224)
    line, peak = refusal(monkeypatch, "4GB", ["probe", model, "--batch-sizes", "1,2,4096"])
    # the inputs (4096 x 224 x 224 x 3 floats) plus a layer reading and writing 64 channels at full resolution
    expected = 4096 * 224 * 224 * (3 + 2 * 64) * 4
    assert f"{expected / 1e9:.3g} GB" in line, line
    assert "keras at batch size 4096" in line and "--batch-sizes" in line and "4 GB" in line
    # before drawing the inputs (2.5 GB)
    assert peak < UNDRAWN_PEAK, peak


def test_open_height_and_width_are_sized_from_the_input_shape(tmp_path: Path, monkeypatch) -> None:
    """With H and W open (None), the graph's shapes size no layer, so the bound held the inputs alone (38.5
    MB at batch 64) and the probe ran past a 500 MB budget; sized for the fed shape, it refuses."""
    model = _wide_conv(tmp_path / "open.keras", hw=None)
    args = ["probe", model, "--input-shape", "x:224x224x3", "--batch-sizes", "1,2,64"]
    line, _ = refusal(monkeypatch, "500MB", args)
    expected = 64 * 224 * 224 * (3 + 2 * 64) * 4
    assert f"needs at least {expected / 1e9:.3g} GB" in line and "keras at batch size 64" in line, line
    fits = CliRunner().invoke(main, [*args[:-1], "1,2,4"])
    assert fits.exit_code == 0, fits.output


def test_same_model_at_a_batch_that_fits_runs(tmp_path: Path, monkeypatch) -> None:
    model = _wide_conv(tmp_path / "wide.keras", hw=32)
    monkeypatch.setenv("BNCHECK_MEMORY_BUDGET", "100MB")  # batch 32: 2 x 8.4 MB at the busiest layer
    result = CliRunner().invoke(main, ["probe", model, "--batch-sizes", "1,2,32", "--format", "json"])
    assert result.exit_code == 0, result.output
    assert '"findings": []' in result.stdout


@pytest.mark.parametrize("batch", [1, 4096])
def test_fix_calibration_batch_is_checked_too(tmp_path: Path, monkeypatch, batch: int) -> None:
    """`fix --data` recomputing stale statistics from 64 samples of 64x64x3: at --batch-size 1 it runs; at 4096
    (all 64 samples in one batch: 2 x 64 x 64 x 64 x 64 floats at the busiest layer, 134 MB) the calibration
    batch is refused under a 100 MB budget, in which the probe of the original at 1, 2, 32 (67 MB) still runs."""
    model = _wide_conv(tmp_path / "wide.keras", hw=64, stale=True)
    check_fix_calibration_batch(tmp_path, monkeypatch, model, (64, 64, 3), "100MB", batch, "keras at batch size 64")


@pytest.mark.parametrize("budget", ["50MB", "2GB"])
def test_output_effect_of_drifting_statistics_is_left_unmeasured_over_the_budget(
    tmp_path: Path, monkeypatch, budget: str
) -> None:
    """BN003 with --data measures its output effect on the data's first samples in one batch, as many as hold
    RECALIBRATION_LAYER_BYTES at the busiest layer (2 x 32 x 32 x 64 floats a sample: 122 of the 256 samples,
    64 MB): over a 50 MB budget, in which the probe at 1,2,8 runs, a note says why it is not measured (the drift
    is then a warning: no measured effect on predictions); under 2 GB, more than HELD_FACTOR times that batch's
    lower bound, it is measured, and the drift that changes predictions is an error."""
    from bncheck.backends.keras.probe import RECALIBRATION_LAYER_BYTES

    batch = RECALIBRATION_LAYER_BYTES // (2 * 32 * 32 * 64 * 4)
    model = _wide_conv(tmp_path / "drift.keras", hw=32, moving=(5.0, 0.01))
    data = tmp_path / "d.npy"
    np.save(data, np.random.default_rng(0).standard_normal((256, 32, 32, 3)).astype(np.float32))
    monkeypatch.setenv("BNCHECK_MEMORY_BUDGET", budget)
    args = ["probe", model, "--data", str(data), "--batch-sizes", "1,2,8", "--format", "json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == (0 if budget == "50MB" else 1), result.output
    assert '"BN003"' in result.stdout
    skipped = f"output effect of the drifting statistics not measured: one batch of {batch} samples would likely need"
    assert (skipped in result.stdout) == (budget == "50MB"), result.stdout
    assert "to change the budget" not in result.stdout  # the note says what and how much, not a CLI remedy


def _budget_between(monkeypatch, model, batch: int, factor: int) -> int:
    """A budget of ``factor`` times the lower bound of a batch of ``batch``: the up-front check passes, and
    the predict style's batch is likely over it (HELD_FACTOR times the bound)."""
    need, _ = memory.lower_bound(model, memory.fed_bytes(_inputs(model), batch, None), batch)
    monkeypatch.setenv("BNCHECK_MEMORY_BUDGET", str(factor * need))
    return need


def _inputs(model):
    from bncheck.model import InputSpec

    return [InputSpec(name="x", shape=(None, *model.inputs[0].shape[1:]), dtype="float32")]


def test_predict_batch_likely_over_the_budget_runs_in_pieces_with_the_same_statistics(
    tmp_path: Path, monkeypatch
) -> None:
    """Under a budget of 4 times batch 32's lower bound (HELD_FACTOR 16 times it would not fit) the batch of 32
    runs as 4 batches of 8, whose appended statistics and outputs are the whole batch's."""
    from bncheck.backends.base import ProbeSettings
    from bncheck.backends.keras import KerasBackend

    path = _wide_conv(tmp_path / "wide.keras", hw=32)
    settings = ProbeSettings(batch_sizes=(1, 2, 32), all_layers=True)
    whole = KerasBackend().probe(KerasBackend().load(path), settings)[0]
    _budget_between(monkeypatch, keras.saving.load_model(path, compile=False), 32, 4)
    pieces = KerasBackend().probe(KerasBackend().load(path), settings)[0]
    assert [n for n in pieces.notes if "ran as" in n] == [
        next(n for n in pieces.notes if n.startswith("batch size 32 ran as 4 batches of 8 samples: one batch"))
    ]
    assert not any("ran as" in n for n in whole.notes)
    for side in ("input", "output"):
        got, want = getattr(pieces.at(32, "bn"), side), getattr(whole.at(32, "bn"), side)
        assert got.batch_size == want.batch_size == 32 and got.count == want.count
        for field in ("sample_mean", "sample_sq", "min", "max", "zeros", "nonfinite"):
            np.testing.assert_allclose(getattr(got, field), getattr(want, field), rtol=1e-6, err_msg=field)
    assert pieces.output_dependence.keys() == whole.output_dependence.keys() and whole.output_dependence
    for name, by_batch in whole.output_dependence.items():
        assert pieces.output_dependence[name].keys() == by_batch.keys()
        for batch, want in by_batch.items():
            assert pieces.output_dependence[name][batch].max_shift == pytest.approx(want.max_shift, abs=1e-6)


def test_as_written_batch_of_a_baked_training_flag_is_never_run_in_pieces(tmp_path: Path, monkeypatch) -> None:
    """A baked training=True normalizes over the batch: its batch of 32 runs whole (its statistics would not be
    the batch's in pieces), while the predict style's runs in pieces under the same budget."""
    from bncheck.backends.base import ProbeSettings
    from bncheck.backends.keras import KerasBackend
    from bncheck.backends.keras.probe import AS_WRITTEN, PREDICT

    keras.utils.set_random_seed(0)
    inp = keras.Input((16, 16, 3), name="x")
    h = keras.layers.Conv2D(32, 3, padding="same", name="conv")(inp)
    h = keras.layers.BatchNormalization(name="bn")(h, training=True)
    path = str(tmp_path / "baked.keras")
    keras.Model(inp, keras.layers.GlobalAveragePooling2D(name="pool")(h)).save(path)
    settings = ProbeSettings(batch_sizes=(1, 2, 32), all_layers=True)
    whole = {r.call_style: r for r in KerasBackend().probe(KerasBackend().load(path), settings)}
    _budget_between(monkeypatch, keras.saving.load_model(path, compile=False), 32, 4)
    split = {r.call_style: r for r in KerasBackend().probe(KerasBackend().load(path), settings)}
    assert any(n.startswith("batch size 32 ran as") for n in split[PREDICT].notes)
    assert not any("ran as" in n for n in split[AS_WRITTEN].notes)
    # batch statistics over the 32 samples: each sample's output mean over its companions is the beta, 0
    got, want = split[AS_WRITTEN].at(32, "bn").output, whole[AS_WRITTEN].at(32, "bn").output
    np.testing.assert_allclose(got.sample_mean, want.sample_mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got.mean, 0.0, atol=1e-5)


@pytest.mark.parametrize(
    ("batch", "fits_up_to", "expected"),
    [
        (32, 5, [4, 5, 4, 5, 4, 5, 5]),
        (32, 8, [8, 8, 8, 8]),
        (32, 32, [32]),
        (32, 0, [2] * 16),
        (2, 0, [2]),
        (3, 2, [3]),
        (7, 3, [2, 2, 3]),
    ],
)
def test_pieces_are_as_few_as_fit_evened_out_and_never_under_two_samples(
    batch: int, fits_up_to: int, expected: list[int]
) -> None:
    """32 where 5 fit: 7 pieces of 4-5 (not six of 5 and one of 2); nothing fits: pieces of 2, and a batch of 2
    or 3 stays whole, so that every sample has a companion for the batch-dependence test."""
    from bncheck.backends.keras.pieces import piece_sizes

    sizes, why = piece_sizes(batch, lambda b: None if b <= fits_up_to else f"{b} over")
    assert sizes == expected
    assert why == (None if len(expected) == 1 else f"{batch} over")
