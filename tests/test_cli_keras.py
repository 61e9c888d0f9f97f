"""Keras files through the real CLI: hostile or broken files are exit 2 with one line; inspect of a Lambda
model still reports what it can read statically."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

os.environ.setdefault("KERAS_BACKEND", "numpy")  # before keras is imported; the test extra installs keras

import keras

from bncheck.cli import main
from tests.test_cli import _collections, _console, frozen_before_collecting


def _lambda_model(tmp_path) -> tuple[str, str]:
    marker = tmp_path / "ran.txt"

    def side_effect(t, path=str(marker)):
        with open(path, "w") as f:
            f.write("executed")
        return t

    inp = keras.Input((4,))
    x = keras.layers.BatchNormalization(name="bn")(inp)
    model = keras.Model(inp, keras.layers.Lambda(side_effect, name="writes_a_file")(x))
    path = tmp_path / "lambda.keras"
    model.save(path)
    marker.unlink(missing_ok=True)
    return str(path), str(marker)


def test_probe_of_a_lambda_model_is_exit_2_one_line_and_runs_nothing(tmp_path):
    path, _marker = _lambda_model(tmp_path)
    result = CliRunner().invoke(main, ["probe", path])
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "writes_a_file" in result.stderr
    assert not (tmp_path / "ran.txt").exists()


def test_inspect_of_a_lambda_model_still_lists_its_batch_norm(tmp_path):
    path, _ = _lambda_model(tmp_path)
    result = CliRunner().invoke(main, ["inspect", path, "--format", "json"])
    assert result.exit_code in (0, 1)
    assert [layer["name"] for layer in json.loads(result.stdout)["layers"]] == ["bn"]


@pytest.mark.parametrize("kind", ["not-a-zip", "zip-without-config", "broken-h5"])
def test_broken_keras_files_are_exit_2_one_line(tmp_path, kind):
    if kind == "not-a-zip":
        path = tmp_path / "model.keras"
        path.write_bytes(b"definitely not a zip archive\n" * 10)
    elif kind == "zip-without-config":
        path = tmp_path / "model.keras"
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("readme.txt", "no config here")
    else:
        path = tmp_path / "model.h5"
        path.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 64)
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and path.name in lines[0] and "Traceback" not in result.stderr


SAMPLE = str(Path(__file__).resolve().parents[1] / "sample_models" / "keras_epsilon_1e-8.keras")


def test_console_probe_of_a_keras_file_freezes_keras_before_the_collector_runs(tmp_path):
    seen, _, total = _collections(tmp_path, ["probe", "--format", "json", SAMPLE], 0)
    assert frozen_before_collecting(seen, 4, total) > 0.8


def test_console_inspect_of_a_keras_file_does_not_import_keras(tmp_path):
    _, (_, _, keras_imported), _ = _collections(tmp_path, ["inspect", "--format", "json", SAMPLE], 0)
    assert not keras_imported


def test_console_probe_with_a_keras_that_cannot_start_is_one_line_exit_2():
    # keras raises ValueError (not ImportError) for an unknown backend: the command's own error, no traceback
    proc = _console("", ["probe", SAMPLE], KERAS_BACKEND="no-such-backend")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("bncheck: ") and "no-such-backend" in proc.stderr
