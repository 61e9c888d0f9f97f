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
