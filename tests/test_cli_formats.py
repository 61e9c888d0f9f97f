"""The CLI's formats and report files: --format table|json|sarif|github, the exit-2 error document, and -o that
never replaces a file the command reads and is written atomically."""

from __future__ import annotations

import importlib.util
import json
import os
import stat
import subprocess
import sys
from importlib import resources
from pathlib import Path

import jsonschema
import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from bncheck.cli import main
from bncheck.render import FORMATS
from tests.builders import bn_model
from tests.named_models import HOSTILE_NAMES, LONG_MODULE_NAMES, bn_chain_model
from tests.test_render_sarif import sarif_schema_path

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture(scope="module")
def report_schema() -> dict:
    return json.loads(resources.files("bncheck").joinpath("schema/report.schema.json").read_text())


@pytest.fixture
def stale(tmp_path) -> str:
    return bn_model(tmp_path / "stale.onnx", mean=[0, 0, 0], var=[1, 1, 1])


def _one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_runs_inspect_and_probe_with_the_exit_code(runner, stale, fmt):
    missing_extra = fmt == "html" and importlib.util.find_spec("matplotlib") is None
    for args in (["inspect"], ["probe", "--batch-sizes", "1,2"]):
        result = runner.invoke(main, [*args, stale, "--format", fmt])
        if missing_extra:  # the html extra is optional: without it, a one-line exit 2 naming it
            assert result.exit_code == 2 and "pip install 'matplotlib" in _one_line(result.stderr)
            continue
        assert result.exit_code == 1, (fmt, args, result.stderr)
        assert "BN003" in result.stdout and result.stderr == ""


def test_sarif_on_stdout_validates_for_a_model_with_findings_and_a_clean_one(runner, stale, tmp_path):
    path = sarif_schema_path()
    if path is None:
        pytest.skip("the SARIF schema is not at ../shared/schemas next to the repository")
    validator = jsonschema.Draft4Validator(json.loads(path.read_text(encoding="utf-8")))
    clean = bn_model(tmp_path / "clean.onnx")
    for model, results in ((stale, 1), (clean, 0)):
        result = runner.invoke(main, ["probe", model, "--format", "sarif", "--batch-sizes", "1,2"])
        log = json.loads(result.stdout)
        validator.validate(log)
        assert len(log["runs"][0]["results"]) == results and result.exit_code == results


def test_github_format_prints_annotations_then_the_summary(runner):
    model = str(SAMPLES / "epsilon_1e-8.onnx")
    result = runner.invoke(main, ["inspect", model, "--format", "github", "--fail-on", "warning"])
    lines = result.stdout.splitlines()
    assert result.exit_code == 1
    assert lines[0].startswith("::warning file=") and "title=BN004 epsilon::bn2: " in lines[0]
    assert lines[-1].endswith("fails --fail-on warning (exit 1)")


@pytest.mark.parametrize("kind", ["missing", "corrupt"])
def test_json_error_document_on_stdout_when_the_model_cannot_be_read(runner, tmp_path, report_schema, kind):
    path = tmp_path / "model.onnx"
    if kind == "corrupt":
        full = Path(bn_model(tmp_path / "full.onnx")).read_bytes()
        path.write_bytes(full[: len(full) // 2])
    result = runner.invoke(main, ["probe", str(path), "--format", "json"])
    assert result.exit_code == 2
    line = _one_line(result.stderr)
    document = json.loads(result.stdout)
    jsonschema.validate(document, report_schema)
    assert document["exit_code"] == 2 and document["error"]["kind"] == "model"
    assert document["error"]["message"] in line and "model.onnx" in document["error"]["message"]
    assert document["command"] == "probe"


def test_json_error_document_for_a_usage_error(runner, stale, report_schema):
    result = runner.invoke(main, ["probe", stale, "--format", "json", "--batch-sizes", "0,x"])
    assert result.exit_code == 2 and _one_line(result.stderr).startswith("bncheck: usage error:")
    document = json.loads(result.stdout)
    jsonschema.validate(document, report_schema)
    assert document["error"]["kind"] == "usage"


def test_the_report_schema_rejects_an_error_document_with_exit_code_0(report_schema):
    bad = {
        "schema_version": 1,
        "tool": {"name": "bncheck", "version": "0"},
        "error": {"message": "x", "kind": "model"},
        "exit_code": 0,
    }
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, report_schema)


def test_sarif_and_github_formats_report_a_failed_run_too(runner, tmp_path):
    missing = str(tmp_path / "missing.onnx")
    sarif = runner.invoke(main, ["inspect", missing, "--format", "sarif"])
    assert sarif.exit_code == 2
    invocation = json.loads(sarif.stdout)["runs"][0]["invocations"][0]
    assert invocation["executionSuccessful"] is False
    github = runner.invoke(main, ["inspect", missing, "--format", "github"])
    assert github.exit_code == 2 and github.stdout.startswith("::error file=")


def test_table_format_prints_nothing_on_stdout_when_it_fails(runner, tmp_path):
    result = runner.invoke(main, ["inspect", str(tmp_path / "missing.onnx")])
    assert result.exit_code == 2 and result.stdout == ""


# ---------------------------------------------------------------------------------------------- width


@pytest.mark.parametrize("columns", [60, 80, 120, 200])
def test_table_follows_the_COLUMNS_of_the_terminal(runner, tmp_path, columns):
    model = bn_chain_model(tmp_path / "long.onnx", LONG_MODULE_NAMES)
    result = runner.invoke(main, ["probe", model, "--batch-sizes", "1,2,32"], env={"COLUMNS": str(columns)})
    assert result.exit_code == 0, result.stderr
    widths = [len(line) for line in result.stdout.splitlines()]
    assert max(widths) <= columns
    assert (LONG_MODULE_NAMES[2] in result.stdout) == (columns >= 120)


def test_hostile_names_reach_the_terminal_as_visible_text(runner, tmp_path):
    model = bn_chain_model(tmp_path / "hostile.onnx", HOSTILE_NAMES, stale=True)
    result = runner.invoke(main, ["inspect", model], env={"COLUMNS": "100"})
    assert result.exit_code == 1, result.stderr
    assert "\x1b" not in result.stdout and "\x07" not in result.stdout
    assert "\\x1b]0;title\\x07" in result.stdout and "[/red]" in result.stdout


def test_the_error_line_shows_control_characters_in_a_path_literally(runner, tmp_path):
    result = runner.invoke(main, ["inspect", str(tmp_path / "m\x1b]0;pwned\x07.onnx")])
    line = _one_line(result.stderr)
    assert result.exit_code == 2 and "\x1b" not in result.stderr and "\\x1b]0;pwned\\x07" in line


# ---------------------------------------------------------------------------------------------- report files


def test_probe_refuses_to_write_the_report_over_the_model(runner, stale):
    before = Path(stale).read_bytes()
    result = runner.invoke(main, ["probe", stale, "-o", stale])
    assert result.exit_code == 2
    assert "refusing to overwrite the input model" in _one_line(result.stderr)
    assert Path(stale).read_bytes() == before


def test_the_model_is_recognized_through_a_symlink_and_a_hard_link(runner, stale, tmp_path):
    before = Path(stale).read_bytes()
    (tmp_path / "link.onnx").symlink_to(stale)
    os.link(stale, tmp_path / "hard.onnx")
    for target in ("link.onnx", "hard.onnx"):
        result = runner.invoke(main, ["inspect", stale, "-o", str(tmp_path / target), "--format", "json"])
        assert result.exit_code == 2, target
        assert json.loads(result.stdout)["error"]["kind"] == "usage"
    assert Path(stale).read_bytes() == before


def test_probe_refuses_to_write_the_report_over_its_data_file(runner, stale, tmp_path):
    data = tmp_path / "calib.npz"
    np.savez(data, x=np.random.default_rng(0).normal(size=(8, 3, 4, 4)).astype(np.float32))
    before = data.read_bytes()
    result = runner.invoke(main, ["probe", stale, "--data", str(data), "-o", str(data)])
    assert result.exit_code == 2 and data.read_bytes() == before


def test_probe_refuses_to_write_the_report_over_the_models_external_data(runner, tmp_path):
    model = onnx.load(bn_model(tmp_path / "full.onnx"))
    path = tmp_path / "ext.onnx"
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="ext.onnx.data",
        size_threshold=0,
    )
    data = tmp_path / "ext.onnx.data"
    before = data.read_bytes()
    result = runner.invoke(main, ["probe", str(path), "-o", str(data), "--batch-sizes", "1,2"])
    assert result.exit_code == 2 and "external data" in _one_line(result.stderr)
    assert data.read_bytes() == before


def test_fix_refuses_a_report_path_that_is_the_fixed_model(runner, stale, tmp_path):
    data = tmp_path / "calib.npz"
    np.savez(data, x=np.random.default_rng(0).normal(size=(8, 3, 4, 4)).astype(np.float32))
    fixed = tmp_path / "fixed.onnx"
    result = runner.invoke(main, ["fix", stale, "--data", str(data), "-o", str(fixed), "--report", str(fixed)])
    assert result.exit_code == 2 and "refusing to overwrite the fixed model with" in _one_line(result.stderr)
    assert not fixed.exists()  # it said "the input fixed model" before


def test_report_replaces_the_old_file_atomically_keeping_its_mode_and_link(runner, stale, tmp_path):
    real = tmp_path / "reports" / "report.json"
    real.parent.mkdir()
    real.write_text("old")
    real.chmod(0o640)
    link = tmp_path / "latest.json"
    link.symlink_to(real)
    result = runner.invoke(main, ["inspect", stale, "-o", str(link)])
    assert result.exit_code == 1
    assert link.is_symlink() and json.loads(real.read_text())["findings"][0]["code"] == "BN003"
    assert stat.S_IMODE(real.stat().st_mode) == 0o640
    assert sorted(p.name for p in real.parent.iterdir()) == ["report.json"]  # no temporary file left


@pytest.mark.parametrize(
    "fmt,check",
    [
        ("table", lambda text: json.loads(text)["summary"]),  # a table is for reading: its file gets the JSON
        ("json", lambda text: json.loads(text)["summary"]),
        ("sarif", lambda text: json.loads(text)["runs"][0]["results"]),
        ("github", lambda text: text.startswith("::error file=")),
    ],
)
def test_the_report_file_holds_the_selected_format(runner, stale, tmp_path, fmt, check):
    out = tmp_path / "report.out"
    result = runner.invoke(main, ["inspect", stale, "--format", fmt, "-o", str(out)])
    assert result.exit_code == 1 and check(out.read_text())


def test_a_failed_run_replaces_an_old_report_with_the_error_document(runner, tmp_path, report_schema):
    out = tmp_path / "report.json"
    out.write_text(json.dumps({"exit_code": 0}))
    result = runner.invoke(main, ["inspect", str(tmp_path / "missing.onnx"), "-o", str(out)])
    assert result.exit_code == 2 and result.stdout == ""
    document = json.loads(out.read_text())
    jsonschema.validate(document, report_schema)
    assert document["exit_code"] == 2


def test_report_over_the_model_in_a_real_process_exits_2_and_keeps_the_model(stale):
    before = Path(stale).read_bytes()
    proc = subprocess.run(
        [sys.executable, "-m", "bncheck", "probe", stale, "-o", stale, "--format", "json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert json.loads(proc.stdout)["error"]["kind"] == "usage"
    assert Path(stale).read_bytes() == before


def test_a_single_data_sample_is_one_sample_in_the_probe_note(runner, stale, tmp_path):
    data = tmp_path / "one.npz"
    np.savez(data, x=np.random.default_rng(0).normal(size=(1, 3, 4, 4)).astype(np.float32))
    result = runner.invoke(main, ["probe", stale, "--data", str(data), "--batch-sizes", "1,2"], env={"COLUMNS": "200"})
    assert "the data holds 1 sample; batches larger" in result.stdout, result.stdout
