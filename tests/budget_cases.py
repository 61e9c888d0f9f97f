"""Scenarios the memory-budget tests of both backends share (real CLI, real models)."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import bncheck
from bncheck.budget import OverBudgetError
from bncheck.cli import main

#: far below the inputs a refused batch would draw (0.6-2.5 GB in these tests), far above what a refusal allocates
UNDRAWN_PEAK = 256 * 10**6


def check_fix_calibration_batch(
    tmp_path: Path, monkeypatch, model: str, sample_shape: tuple[int, ...], budget: str, batch: int, refused: str
) -> None:
    """`fix --data --dry-run` on 64 random samples of ``sample_shape`` under ``budget``: at --batch-size 1 it
    recalibrates; at a larger one the calibration batch (all 64 samples) is refused with ``refused`` in the
    one-line error and the --batch-size remedy, before the probe of the original begins (no stage announced
    to the Python API's progress, where the batch that fits announces "checking the model")."""
    data = tmp_path / "d.npy"
    np.save(data, np.random.default_rng(0).standard_normal((64, *sample_shape)).astype(np.float32))
    monkeypatch.setenv("BNCHECK_MEMORY_BUDGET", budget)
    args = ["fix", model, "--data", str(data), "--dry-run", "--batch-size", str(batch), "--format", "json"]
    result = CliRunner().invoke(main, args)
    stages = _Stages()
    if batch == 1:
        assert result.exit_code in (0, 1), result.output
        assert '"recalibrated"' in result.stdout
        bncheck.fix(model, None, data=str(data), dry_run=True, batch_size=batch, progress=stages)
        assert stages.seen[0] == "checking the model", stages.seen
    else:
        assert result.exit_code == 2, result.output
        assert refused in result.stderr and "--batch-size" in result.stderr, result.stderr
        with pytest.raises(OverBudgetError, match=refused):
            bncheck.fix(model, None, data=str(data), dry_run=True, batch_size=batch, progress=stages)
        assert stages.seen == [], stages.seen


class _Stages:
    """A progress that records the stages it is told."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def __call__(self, done: int, total: int) -> None:
        pass

    def stage(self, description: str) -> None:
        self.seen.append(description)


def refusal(monkeypatch, budget: str, args: list[str]) -> tuple[str, int]:
    """The one-line exit-2 error of ``bncheck ARGS`` under ``budget``, and the peak of the memory Python and
    numpy allocated meanwhile (tracemalloc): a refusal before the inputs are drawn keeps it far below them."""
    monkeypatch.setenv("BNCHECK_MEMORY_BUDGET", budget)
    tracemalloc.start()
    try:
        result = CliRunner().invoke(main, args)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0], peak
