"""Property-based fuzzing of the CLI: every drawn input keeps the exit contract (tests/fuzz/contract.py).

Each example runs two real CLI subprocesses side by side (two cores): ``inspect`` and ``probe`` of a drawn
model, or a drawn command line. The quick profile's example counts are per test (see conftest.py); a
failing example prints its recipe, and ``corpus.py`` is where it goes once fixed.
"""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import given, settings

from tests.fuzz import contract, strategies
from tests.fuzz.contract import Workspace

QUICK = os.environ.get("BNCHECK_FUZZ") != "long"


def _check(runs: list[contract.Run]) -> None:
    log = os.environ.get("BNCHECK_FUZZ_LOG")  # one line per example, to count a long run while it goes
    if log:
        with open(log, "a", encoding="utf-8") as handle:
            handle.write(
                json.dumps(
                    {
                        "args": [r.args[:2] for r in runs],
                        "exit": [r.returncode for r in runs],
                        "seconds": [round(r.seconds, 2) for r in runs],
                        "violations": [v for r in runs for v in r.violations()],
                    }
                )
                + "\n"
            )
    for run in runs:
        assert not run.violations(), "\n".join(run.violations() + [run.describe()])


@settings(max_examples=30) if QUICK else settings()
@given(strategies.onnx_recipes(), strategies.FORMATS_AND_SIZES)
def test_random_onnx_graphs_keep_the_contract(recipe: dict, options: tuple[str, str]) -> None:
    fmt, sizes = options
    with Workspace() as ws:
        strategies.build_onnx(recipe, ws.model_dir, ws.canary)
        _check(
            contract.run_many(
                ws,
                [
                    ["inspect", "m.onnx", "--format", fmt],
                    ["probe", "m.onnx", "--format", fmt, "--batch-sizes", sizes, *strategies.probe_options(recipe)],
                ],
            )
        )


@settings(max_examples=15) if QUICK else settings()  # Keras probes cost seconds each in a fresh interpreter
@given(strategies.mutated_files(), strategies.FORMATS_AND_SIZES)
def test_mutated_sample_models_keep_the_contract(recipe: dict, options: tuple[str, str]) -> None:
    fmt, sizes = options
    with Workspace() as ws:
        path = strategies.build_mutated(recipe, ws.model_dir)
        _check(
            contract.run_many(
                ws,
                [
                    ["inspect", path.name, "--format", fmt],
                    ["probe", path.name, "--format", fmt, "--batch-sizes", sizes],
                ],
            )
        )


@settings(max_examples=25) if QUICK else settings()
@given(strategies.option_recipes(), strategies.option_recipes())
def test_option_values_keep_the_contract(first: dict, second: dict) -> None:
    with Workspace() as ws, Workspace() as other:
        _check(
            contract.run_many_workspaces(
                [
                    (ws, strategies.build_options(first, ws.model_dir)),
                    (other, strategies.build_options(second, other.model_dir)),
                ]
            )
        )


@pytest.mark.parametrize("name", ["clean_bn_convnet.onnx", "keras_legacy_convnet.h5", "keras_nested.keras"])
def test_harness_accepts_a_clean_run(name: str) -> None:
    """The contract check itself: an unmodified sample keeps it (a harness that flags everything finds nothing)."""
    with Workspace() as ws:
        (ws.model_dir / name).write_bytes((strategies.SAMPLES / name).read_bytes())
        runs = contract.run_many(ws, [["inspect", name], ["inspect", name, "--format", "json"]])
        _check(runs)
        assert runs[0].returncode == runs[1].returncode in (0, 1)


def test_harness_detects_a_read_outside_the_model_folder() -> None:
    """The canary watch sees a file opened outside the model's folder (here: a --data file placed there)."""
    import numpy as np

    with Workspace() as ws:
        (ws.model_dir / "m.onnx").write_bytes((strategies.SAMPLES / "clean_bn_convnet.onnx").read_bytes())
        np.save(ws.outside / "d.npy", np.zeros((2, 3, 16, 16), np.float32))
        run = contract.run(ws, ["probe", "m.onnx", "--data", str(ws.outside / "d.npy")])
        assert run.canary_opened or run.outside
