"""The command line over several models, with configuration files and baselines (real files, real runs)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from click.testing import CliRunner

from bncheck.cli import main
from tests.test_render_sarif import sarif_schema_path

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"


@pytest.fixture()
def models(tmp_path) -> Path:
    folder = tmp_path / "models"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(SAMPLES / "clean_bn_convnet.onnx", folder / "clean.onnx")
    shutil.copy(SAMPLES / "stale_stats.onnx", folder / "sub" / "stale.onnx")
    return folder


def _invoke(*args: str, cwd: Path | None = None):
    if cwd is None:
        return CliRunner().invoke(main, list(args))
    import os

    before = os.getcwd()
    os.chdir(cwd)  # the configuration is searched from the current folder
    try:
        return CliRunner().invoke(main, list(args))
    finally:
        os.chdir(before)


def test_a_folder_is_one_json_document_with_a_report_per_model_and_the_worst_exit(models):
    result = _invoke("inspect", str(models), "--format", "json")
    assert result.exit_code == 1
    document = json.loads(result.stdout)
    assert [Path(m["model"]["path"]).name for m in document["models"]] == ["clean.onnx", "stale.onnx"]
    assert document["exit_code"] == 1 and document["totals"]["errors"] == 2


def test_a_broken_model_is_an_error_entry_while_the_others_are_reported(models):
    (models / "broken.onnx").write_bytes(b"\x08\x07not a model")
    result = _invoke("inspect", str(models), "--format", "json")
    assert result.exit_code == 2
    document = json.loads(result.stdout)
    entries = {Path(m["model"]["path"] if "model" in m else m["model_path"]).name: m for m in document["models"]}
    assert entries["broken.onnx"]["error"]["kind"] == "model"
    assert entries["stale.onnx"]["exit_code"] == 1 and entries["clean.onnx"]["exit_code"] == 0
    assert result.stderr.count("\n") == 1 and "broken.onnx" in result.stderr


def test_table_has_a_section_per_model_and_a_closing_line(models):
    result = _invoke("inspect", str(models / "clean.onnx"), str(models / "sub"))
    assert result.stdout.count("bncheck inspect:") == 2
    assert result.stdout.rstrip().endswith(
        "2 models: 1 with findings at or above --fail-on, 0 could not be checked; exit 1"
    )


def test_parallel_jobs_give_the_same_document(models):
    serial = _invoke("inspect", str(models), "--format", "json")
    parallel = _invoke("inspect", str(models), "--format", "json", "-j", "2")
    assert json.loads(serial.stdout) == json.loads(parallel.stdout)


def test_sarif_for_many_models_is_valid_against_the_sarif_schema(models):
    schema = sarif_schema_path()
    if schema is None:  # a clone without the workplace's ../shared next to it, as the other SARIF tests
        pytest.skip("the SARIF schema is not at ../shared/schemas next to the repository")
    log = json.loads(_invoke("inspect", str(models), "--format", "sarif").stdout)
    jsonschema.Draft4Validator(json.loads(schema.read_text())).validate(log)


def test_sarif_for_many_models_is_one_run_over_every_artifact(models):
    log = json.loads(_invoke("inspect", str(models), "--format", "sarif").stdout)
    (run,) = log["runs"]
    uris = [a["location"]["uri"] for a in run["artifacts"]]
    assert [Path(u).name for u in uris] == ["clean.onnx", "stale.onnx"]
    for found in run["results"]:
        location = found["locations"][0]["physicalLocation"]["artifactLocation"]
        assert uris[location["index"]] == location["uri"]


def test_github_format_with_a_sarif_file_annotates_and_writes_sarif(models, tmp_path):
    out = tmp_path / "bncheck.sarif"
    result = _invoke("inspect", str(models), "--format", "github", "-o", str(out))
    assert result.stdout.count("::error ") == 2
    assert json.loads(out.read_text())["version"] == "2.1.0"


def test_config_file_found_upward_sets_fail_on_and_per_layer_ignores(models, tmp_path):
    (tmp_path / "pyproject.toml").write_text(
        '[tool.bncheck]\nfail-on = "never"\n[tool.bncheck.per-layer-ignores]\n"bn1" = ["stale-stats"]\n'
    )
    work = tmp_path / "deep" / "er"
    work.mkdir(parents=True)
    result = _invoke("inspect", str(models / "sub" / "stale.onnx"), "--format", "json", cwd=work)
    document = json.loads(result.stdout)
    assert result.exit_code == 0  # fail-on never from the file
    assert [(f["code"], f["layer"]) for f in document["findings"]] == [("BN003", "bn2")]
    assert any("per-layer-ignores" in n["message"] for n in document["notes"])
    overridden = _invoke("inspect", str(models / "sub" / "stale.onnx"), "--fail-on", "error", cwd=work)
    assert overridden.exit_code == 1  # the command line wins


def test_config_command_shows_what_applies(tmp_path):
    (tmp_path / "bncheck.toml").write_text('select = ["BN002"]\nbatch-sizes = [1, 8]\n')
    result = _invoke("config", cwd=tmp_path)
    assert result.exit_code == 0
    assert "bncheck.toml" in result.stdout and "select: BN002" in result.stdout and "batch-sizes: 1,8" in result.stdout


def test_bad_config_is_exit_2_with_one_line(tmp_path):
    (tmp_path / "bncheck.toml").write_text("fail-on = 3\nbogus = 1\n")
    result = _invoke("inspect", str(SAMPLES / "clean_bn_convnet.onnx"), cwd=tmp_path)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "bogus" in result.stderr


def test_baseline_hides_known_findings_and_fails_only_on_new_ones(models, tmp_path):
    base = tmp_path / "baseline.json"
    first = _invoke("inspect", str(models), "--write-baseline", str(base))
    assert first.exit_code == 1 and base.exists()
    again = _invoke("inspect", str(models), "--baseline", str(base), "--format", "json")
    assert again.exit_code == 0
    shutil.copy(SAMPLES / "train_mode_bn.onnx", models / "new.onnx")
    new = _invoke("inspect", str(models), "--baseline", str(base), "--format", "json")
    document = json.loads(new.stdout)
    assert new.exit_code == 1
    assert {f["code"] for m in document["models"] for f in m["findings"]} == {"BN002"}


def test_baseline_says_when_a_recorded_finding_is_gone(models, tmp_path):
    base = tmp_path / "baseline.json"
    _invoke("inspect", str(models), "--write-baseline", str(base))
    shutil.copy(SAMPLES / "clean_bn_convnet.onnx", models / "sub" / "stale.onnx")  # repaired
    result = _invoke("inspect", str(models / "sub" / "stale.onnx"), "--baseline", str(base), "--format", "json")
    notes = [n["message"] for n in json.loads(result.stdout)["notes"]]
    assert sum("no longer occurs" in n for n in notes) == 2


def test_folder_without_models_is_a_usage_error(tmp_path):
    result = _invoke("inspect", str(tmp_path), "--format", "json")
    assert result.exit_code == 2 and json.loads(result.stdout)["error"]["kind"] == "usage"


def test_html_format_writes_a_page_for_many_models(models, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "report.html"
    result = _invoke("probe", str(models), "--batch-sizes", "1,2", "--format", "html", "-o", str(out))
    assert result.exit_code == 1
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and page.count("<section>") == 2


def test_the_github_action_script_runs_locally(models, tmp_path):
    env = {
        "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin",
        "PYTHONPATH": str(ROOT),  # this checkout's bncheck, whatever the venv's editable install points at
        "BNCHECK_MODELS": str(models),
        "BNCHECK_COMMAND": "inspect",
        "BNCHECK_FAIL_ON": "error",
        "BNCHECK_SARIF": "true",
        "GITHUB_OUTPUT": str(tmp_path / "github_output"),
    }
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "github_action.sh")], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 1
    assert done.stdout.count("::error ") == 2
    assert json.loads((tmp_path / "bncheck.sarif").read_text())["runs"][0]["results"]
    assert (tmp_path / "github_output").read_text() == "exit-code=1\n"
    # no fail-on input: the project's configuration decides, as on the command line (it was always error)
    (tmp_path / "bncheck.toml").write_text('fail-on = "never"\n')
    env["BNCHECK_FAIL_ON"] = ""
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "github_action.sh")], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0 and done.stdout.count("::error ") == 2, done.stderr


def test_many_model_document_and_its_error_entries_validate_against_the_schema(models):
    from importlib import resources

    schema = json.loads(resources.files("bncheck").joinpath("schema/report.schema.json").read_text())
    (models / "broken.onnx").write_bytes(b"\x08\x07not a model")
    document = json.loads(_invoke("inspect", str(models), "--format", "json").stdout)
    jsonschema.Draft202012Validator(schema).validate(document)
    assert [m["exit_code"] for m in document["models"]] == [2, 0, 1]
    bad = dict(document, totals={"models": "three"})
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(schema).validate(bad)


def test_each_error_line_of_a_folder_run_names_its_model(models, tmp_path):
    # a data error's message names the data file only: two identical lines said nothing of which model failed
    bad = tmp_path / "bad.npz"
    np.savez(bad, nope=np.zeros((4, 3), np.float32))
    result = _invoke("probe", str(models), "--data", str(bad))
    lines = result.stderr.splitlines()
    assert result.exit_code == 2 and len(lines) == 2
    assert lines[0].startswith(f"bncheck: error: {models / 'clean.onnx'}: {bad}: unknown key(s) 'nope'")
    assert lines[1].startswith(f"bncheck: error: {models / 'sub' / 'stale.onnx'}: {bad}: unknown key(s)")
