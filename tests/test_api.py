"""The Python API: bncheck.inspect/probe/fix return the typed report the CLI renders."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import bncheck

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"


def test_inspect_returns_typed_findings():
    report = bncheck.inspect(str(SAMPLES / "stale_stats.onnx"))
    codes = {(f.code, f.severity.label, f.layer) for f in report.findings}
    assert ("BN003", "error", "bn1") in codes and ("BN003", "error", "bn2") in codes
    assert report.exit_code == 1 and report.exit_code(fail_on="never") == 0


def test_exit_code_can_be_asked_for_another_threshold():
    report = bncheck.inspect(str(SAMPLES / "epsilon_1e-8.onnx"))
    assert {f.severity.label for f in report.findings} == {"warning"}
    assert report.exit_code == 0
    assert report.exit_code(fail_on="warning") == 1 and report.exit_code(fail_on="error") == 0


def test_to_json_is_the_cli_document():
    from click.testing import CliRunner

    from bncheck.cli import main

    path = str(SAMPLES / "clean_bn_convnet.onnx")
    cli = CliRunner().invoke(main, ["inspect", path, "--format", "json"])
    assert json.loads(bncheck.inspect(path).to_json()) == json.loads(cli.stdout)


def test_probe_accepts_in_memory_arrays_like_a_data_file():
    with np.load(SAMPLES / "calib_drift.npz") as archive:
        arrays = {k: archive[k] for k in archive.files}
    for model in ("trained_matching.onnx", "stale_drift.onnx"):
        from_file = bncheck.probe(str(SAMPLES / model), batch_sizes=[1, 2], data=str(SAMPLES / "calib_drift.npz"))
        in_memory = bncheck.probe(str(SAMPLES / model), batch_sizes=[1, 2], data=arrays)
        assert [(f.code, f.layer) for f in in_memory.findings] == [(f.code, f.layer) for f in from_file.findings]
        assert in_memory.probes[0].data_samples == from_file.probes[0].data_samples > 0
    assert any(f.code == "BN003" for f in in_memory.findings)  # stale_drift, the last one


def test_probe_rejects_arrays_that_do_not_fit_the_inputs():
    from bncheck.errors import BncheckError

    with pytest.raises(BncheckError, match="do not match"):
        bncheck.probe(str(SAMPLES / "clean_bn_convnet.onnx"), data={"nope": np.zeros((2, 3, 16, 16), np.float32)})


def test_probe_finds_train_mode_from_python():
    report = bncheck.probe(str(SAMPLES / "train_mode_bn.onnx"), batch_sizes=[1, 2, 32])
    assert any(f.code == "BN002" and f.severity.label == "error" for f in report.findings)


def test_importing_bncheck_imports_no_framework():
    code = "import sys, bncheck; print(sorted(m for m in ('numpy','onnx','onnxruntime','keras','rich') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_probe_without_batch_sizes_fits_the_default_to_a_file_fixed_to_batch_1(tmp_path):
    """batch_sizes=None is the default (1,2 for a file that fixes its batch to 1); a list runs as given."""
    from tests.test_onnx_exports import _convnet

    path = _convnet(tmp_path / "m.onnx", 1)
    assert bncheck.probe(path).probes[0].batch_sizes == (1, 2)
    assert bncheck.probe(path, batch_sizes=[1, 2, 32]).probes[0].batch_sizes == (1, 2, 32)
