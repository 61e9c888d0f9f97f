"""The BatchNorm models onnx ships (pytorch-converted, opset 6, never trained) are judged stale by `inspect`."""

from __future__ import annotations

import glob
import json
import os

import onnx
import pytest
from click.testing import CliRunner

from bncheck.cli import main

PYTORCH_CONVERTED = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "pytorch-converted")
PATHS = sorted(glob.glob(os.path.join(PYTORCH_CONVERTED, "test_BatchNorm*", "model.onnx")))


def test_onnx_ships_five_pytorch_converted_batchnorm_models():
    assert len(PATHS) == 5


@pytest.mark.parametrize("path", PATHS, ids=lambda p: os.path.basename(os.path.dirname(p)))
def test_inspect_reports_their_never_updated_statistics_and_exits_1(path):
    result = CliRunner().invoke(main, ["inspect", path, "--format", "json"])
    document = json.loads(result.stdout)
    assert result.exit_code == 1
    assert [(f["code"], f["severity"], f["evidence"]["kind"]) for f in document["findings"]] == [
        ("BN003", "error", "defaults")
    ]
    assert document["model"]["opset"] == {"ai.onnx": 6}
