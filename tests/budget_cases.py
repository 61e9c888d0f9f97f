"""Scenarios the memory-budget tests of both backends share (real CLI, real models)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from bncheck.cli import main


def check_fix_calibration_batch(
    tmp_path: Path, monkeypatch, model: str, sample_shape: tuple[int, ...], budget: str, batch: int, refused: str
) -> None:
    """`fix --data --dry-run` on 64 random samples of ``sample_shape`` under ``budget``: at --batch-size 1 it
    recalibrates; at a larger one the calibration batch (all 64 samples) is refused with ``refused`` in the
    one-line error and the --batch-size remedy."""
    data = tmp_path / "d.npy"
    np.save(data, np.random.default_rng(0).standard_normal((64, *sample_shape)).astype(np.float32))
    monkeypatch.setenv("BNCHECK_MEMORY_BUDGET", budget)
    args = ["fix", model, "--data", str(data), "--dry-run", "--batch-size", str(batch), "--format", "json"]
    result = CliRunner().invoke(main, args)
    if batch == 1:
        assert result.exit_code in (0, 1), result.output
        assert '"recalibrated"' in result.stdout
    else:
        assert result.exit_code == 2, result.output
        assert refused in result.stderr and "--batch-size" in result.stderr, result.stderr


def refusal(monkeypatch, budget: str, args: list[str]) -> tuple[str, float]:
    """The one-line exit-2 error of ``bncheck ARGS`` under ``budget``, and the seconds it took."""
    monkeypatch.setenv("BNCHECK_MEMORY_BUDGET", budget)
    start = time.perf_counter()
    result = CliRunner().invoke(main, args)
    elapsed = time.perf_counter() - start
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0], elapsed
