"""Every JSON report validates against the schema shipped in the package."""

from __future__ import annotations

import json
from importlib import resources

import jsonschema
import pytest

from bncheck import engine
from bncheck.backends import ProbeSettings
from bncheck.render import json as json_render
from tests.builders import bn_model, layernorm_model, moments_model


@pytest.fixture(scope="module")
def schema() -> dict:
    text = resources.files("bncheck").joinpath("schema/report.schema.json").read_text()
    schema = json.loads(text)
    jsonschema.Draft202012Validator.check_schema(schema)
    return schema


@pytest.mark.parametrize(
    "builder,kwargs",
    [
        (bn_model, {}),
        (bn_model, {"scale": [float("nan"), 1, 1], "var": [1, -1, 1]}),
        (bn_model, {"training": True, "hw": (1, 1)}),
        (layernorm_model, {}),
        (moments_model, {}),
    ],
)
def test_inspect_and_probe_reports_validate(schema, tmp_path, builder, kwargs):
    path = builder(tmp_path / "m.onnx", **kwargs)
    for report in (engine.inspect(path), engine.probe(path, ProbeSettings(batch_sizes=(1, 2)))):
        document = json.loads(json_render.render(report))
        jsonschema.validate(document, schema)


def test_nan_evidence_is_encoded_as_strings(schema, tmp_path):
    path = bn_model(tmp_path / "m.onnx", scale=[float("nan"), 1, 1])
    document = json.loads(json_render.render(engine.inspect(path)))
    assert document["layers"][0]["scale"]["nonfinite"] == 1
    jsonschema.validate(document, schema)
    document = json.loads(json_render.render(engine.inspect(path)))
    assert document["layers"][0]["scale"]["nonfinite"] == 1
    jsonschema.validate(document, schema)


@pytest.mark.parametrize("kind", ["usage", "model", "data", "runtime", "internal"])
def test_exit_2_error_documents_validate(schema, kind):
    document = json.loads(json_render.render_error("m.onnx: something", kind, command="probe"))
    jsonschema.validate(document, schema)
    assert document["exit_code"] == 2 and document["error"] == {"message": "m.onnx: something", "kind": kind}


def test_a_document_without_error_must_be_a_full_report(schema):
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"schema_version": 1, "tool": {"name": "bncheck", "version": "0"}, "exit_code": 2}, schema)
