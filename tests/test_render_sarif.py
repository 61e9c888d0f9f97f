"""SARIF 2.1.0: valid against the OASIS schema, one rule per check, one result per finding, GitHub's fields."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from bncheck import engine
from bncheck.backends import ProbeSettings
from bncheck.checks import ALL_CHECKS
from bncheck.render import sarif

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"
SCHEMA_NAME = "shared/schemas/sarif-schema-2.1.0.json"


def sarif_schema_path() -> Path | None:
    """The OASIS schema next to the repository (``../shared/schemas/``; worktrees sit one level deeper).

    Not copied into the repository: the schema file carries no licence of its own.
    """
    for folder in ROOT.parents:
        if (folder / SCHEMA_NAME).is_file():
            return folder / SCHEMA_NAME
    return None


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft4Validator:
    path = sarif_schema_path()
    if path is None:
        pytest.skip(f"the SARIF schema is not at ../{SCHEMA_NAME} next to the repository")
    schema = json.loads(path.read_text(encoding="utf-8"))
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema)


def _log(report) -> dict:
    return json.loads(sarif.render(report))


@pytest.fixture(scope="module")
def findings_log() -> dict:
    return _log(engine.probe(str(SAMPLES / "collapse_1x1_train_mode.onnx"), ProbeSettings(batch_sizes=(1, 2))))


@pytest.mark.parametrize(
    "model,command",
    [
        ("collapse_1x1_train_mode.onnx", "probe"),
        ("nan_midnetwork.onnx", "probe"),
        ("epsilon_1e-8.onnx", "inspect"),
        ("clean_resnet.onnx", "inspect"),
        ("clean_resnet.onnx", "probe"),
    ],
)
def test_sarif_validates_against_the_oasis_schema(validator, model, command):
    path = str(SAMPLES / model)
    report = engine.inspect(path) if command == "inspect" else engine.probe(path, ProbeSettings(batch_sizes=(1, 2)))
    log = _log(report)
    validator.validate(log)
    assert len(log["runs"][0]["results"]) == len(report.findings)
    if model.startswith("clean"):
        assert log["runs"][0]["results"] == []


def test_one_rule_per_check_with_its_docstring_and_default_level(findings_log):
    rules = findings_log["runs"][0]["tool"]["driver"]["rules"]
    assert [(r["id"], r["name"]) for r in rules] == [(m.CODE, m.SLUG) for m in ALL_CHECKS]
    by_id = {r["id"]: r for r in rules}
    assert by_id["BN001"]["defaultConfiguration"]["level"] == "error"
    assert by_id["BN004"]["defaultConfiguration"]["level"] == "warning"
    for rule in rules:
        assert rule["shortDescription"]["text"] and rule["fullDescription"]["text"]
        assert len(rule["fullDescription"]["text"]) <= 1024  # GitHub's limit
        for heading in ("What it does", "Why is this bad?", "Example", "Fix"):
            assert heading in rule["help"]["text"] and f"**{heading}**" in rule["help"]["markdown"]
        assert "``" not in rule["help"]["markdown"]


def test_one_result_per_finding_with_file_layer_and_evidence(findings_log):
    run = findings_log["runs"][0]
    results = run["results"]
    assert [(r["ruleId"], r["level"]) for r in results] == [("BN001", "error"), ("BN002", "error")]
    for result in results:
        location = result["locations"][0]
        assert location["physicalLocation"]["artifactLocation"]["uri"] == sarif.artifact_uri(
            str(SAMPLES / "collapse_1x1_train_mode.onnx")
        )
        assert location["physicalLocation"]["region"]["startLine"] == 1  # GitHub rejects results without one
        assert location["logicalLocations"] == [{"name": "head_bn", "fullyQualifiedName": "head_bn", "kind": "module"}]
        assert result["message"]["text"].startswith("head_bn: ")
        assert result["properties"]["evidence"] and result["properties"]["hint"]
        assert result["partialFingerprints"]["primaryLocationLineHash"]
        assert run["tool"]["driver"]["rules"][result["ruleIndex"]]["id"] == result["ruleId"]
    assert results[0]["partialFingerprints"] != results[1]["partialFingerprints"]
    assert run["artifacts"][0]["hashes"]["sha-256"] and run["invocations"][0]["executionSuccessful"] is True


def test_a_relative_model_path_stays_relative_in_the_uri(tmp_path):
    assert sarif.artifact_uri("models/a b.onnx") == "models/a%20b.onnx"
    assert sarif.artifact_uri("./models/../m.onnx") == "m.onnx"
    assert sarif.artifact_uri(str(tmp_path / "m.onnx")).startswith("file:///")


def test_error_log_validates_and_carries_the_message(validator):
    log = json.loads(sarif.render_error("m.onnx: not an ONNX model", "model", command="probe", model_path="m.onnx"))
    validator.validate(log)
    invocation = log["runs"][0]["invocations"][0]
    assert invocation["executionSuccessful"] is False and invocation["exitCode"] == 2
    assert invocation["toolExecutionNotifications"][0]["message"]["text"] == "m.onnx: not an ONNX model"
    assert log["runs"][0]["results"] == []
