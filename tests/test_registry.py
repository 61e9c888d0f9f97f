"""The check registry: stable unique codes and slugs, file names that match, the four docstring headings."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bncheck.checks import ALL_CHECKS, UnknownCheckError, resolve, selected
from bncheck.findings import Severity

CONTRACT = {
    "BN001": "collapse",
    "BN002": "train-mode",
    "BN003": "stale-stats",
    "BN004": "epsilon",
    "BN005": "non-finite",
}


def test_codes_and_slugs_follow_the_findings_contract():
    assert {m.CODE: m.SLUG for m in ALL_CHECKS} == CONTRACT


def test_module_file_names_match_code_and_slug():
    for module in ALL_CHECKS:
        expected = f"{module.CODE.lower()}_{module.SLUG.replace('-', '_')}.py"
        assert Path(module.__file__).name == expected


@pytest.mark.parametrize("module", ALL_CHECKS, ids=lambda m: m.CODE)
def test_docstring_has_the_four_headings_in_order(module):
    doc = module.__doc__ or ""
    positions = [doc.find(f"\n{h}\n") for h in ("What it does", "Why is this bad?", "Example", "Fix")]
    assert all(p > 0 for p in positions), positions
    assert positions == sorted(positions)
    assert re.match(rf"{module.CODE} {module.SLUG}:", doc)


@pytest.mark.parametrize("module", ALL_CHECKS, ids=lambda m: m.CODE)
def test_default_severity_is_a_severity(module):
    assert isinstance(module.SEVERITY, Severity)


def test_check_modules_import_no_framework():
    for module in ALL_CHECKS:
        source = Path(module.__file__).read_text()
        assert not re.search(r"^\s*(import|from)\s+(onnx|onnxruntime|keras|tensorflow|torch)\b", source, re.M)


def test_resolve_accepts_codes_and_slugs_in_any_case_and_comma_lists():
    assert resolve(["bn001,Stale-Stats", "BN005"]) == {"BN001", "BN003", "BN005"}


def test_resolve_rejects_unknown_names_naming_them():
    with pytest.raises(UnknownCheckError, match="'BN999'"):
        resolve(["BN999"])


def test_select_then_ignore():
    assert [m.CODE for m in selected(["BN001,BN002"], ["train-mode"])] == ["BN001"]
    assert len(selected()) == 5
