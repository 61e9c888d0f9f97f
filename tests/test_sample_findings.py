"""Every committed sample model gives exactly its intended findings and no others (sample_models/expected.json),
and its inspect JSON report equals the golden file in tests/golden/ (compared as dicts).

Regenerate the golden files only on request: BNCHECK_UPDATE_GOLDEN=1 pytest tests/test_sample_findings.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bncheck import engine
from bncheck.backends import ProbeSettings
from bncheck.render import json as json_render

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"
GOLDEN = Path(__file__).resolve().parent / "golden"
EXPECTED = json.loads((SAMPLES / "expected.json").read_text())


def _found(report) -> set[tuple[str, str, str]]:
    return {(f.code, f.severity.label, f.layer) for f in report.findings}


def _expected(entry) -> set[tuple[str, str, str]]:
    return {tuple(item) for item in entry}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_inspect_gives_exactly_the_intended_findings(name):
    report = engine.inspect(str(SAMPLES / name))
    assert [layer.name for layer in report.layers] == EXPECTED[name]["layers"]
    assert _found(report) == _expected(EXPECTED[name]["inspect"])


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_probe_gives_exactly_the_intended_findings(name):
    report = engine.probe(str(SAMPLES / name), ProbeSettings(batch_sizes=(1, 2, 32)))
    assert _found(report) == _expected(EXPECTED[name]["probe"])


@pytest.mark.parametrize("name", sorted(n for n in EXPECTED if EXPECTED[n]["data"]))
def test_probe_with_data_gives_exactly_the_intended_findings(name):
    data = str(SAMPLES / EXPECTED[name]["data"])
    report = engine.probe(str(SAMPLES / name), ProbeSettings(batch_sizes=(1, 2, 32), data_path=data, data_source=data))
    assert _found(report) == _expected(EXPECTED[name]["probe_with_data"])


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_inspect_json_matches_golden(name, monkeypatch):
    monkeypatch.chdir(ROOT)  # the report keeps the path as given: relative, so golden files are portable
    document = json.loads(json_render.render(engine.inspect(f"sample_models/{name}")))
    golden = GOLDEN / (Path(name).stem + ".json")
    if os.environ.get("BNCHECK_UPDATE_GOLDEN") == "1":
        golden.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    assert golden.exists(), f"no golden file {golden.name}: run with BNCHECK_UPDATE_GOLDEN=1 once, then review it"
    assert document == json.loads(golden.read_text())
