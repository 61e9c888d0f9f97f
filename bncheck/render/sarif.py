"""SARIF 2.1.0 (OASIS), for GitHub code scanning and other SARIF viewers.

One rule per check (its docstring is the rule's help), one result per finding. The model file is the
result's physical location and the layer its logical location. GitHub needs a region even for a binary
file, so results point at line 1 (as Trivy does for images); ``partialFingerprints`` is filled here because
upload-sarif would otherwise hash "lines" of the model file.
"""

from __future__ import annotations

import hashlib
import json
import os
import textwrap
from types import ModuleType
from typing import Any
from urllib.parse import quote

from bncheck import __version__
from bncheck.checks import ALL_CHECKS
from bncheck.findings import Finding, Severity
from bncheck.render.json import jsonable
from bncheck.report import Report

SCHEMA_URI = "https://json.schemastore.org/sarif-2.1.0.json"
#: SARIF levels; GitHub accepts note, warning and error as a rule's default level.
LEVELS = {Severity.ERROR: "error", Severity.WARNING: "warning", Severity.INFO: "note"}
#: GitHub's problem.severity for non-security rules.
PROBLEM_SEVERITY = {Severity.ERROR: "error", Severity.WARNING: "warning", Severity.INFO: "recommendation"}
#: GitHub truncates descriptions at 1024 characters.
DESCRIPTION_LIMIT = 1024
#: A region for a file that has no lines (the model is binary); GitHub rejects results without one.
WHOLE_FILE = {"startLine": 1, "startColumn": 1, "endLine": 1, "endColumn": 1}


def render(report: Report) -> str:
    return _dump(to_log(report))


def to_log(report: Report) -> dict[str, Any]:
    uri = artifact_uri(report.model.path)
    rule_index = {module.CODE: i for i, module in enumerate(ALL_CHECKS)}
    nodes = {layer.name: list(layer.nodes) for layer in report.layers}
    notes = [
        {"level": "warning" if n.level == "warning" else "note", "message": {"text": n.message}} for n in report.notes
    ]
    notes += [{"level": "note", "message": {"text": f"probe: {line}"}} for p in report.probes for line in p.notes]
    run: dict[str, Any] = {
        "tool": {"driver": _driver()},
        "artifacts": [
            {
                "location": {"uri": uri},
                "hashes": {"sha-256": report.model.sha256},
                "properties": {"format": report.model.format},
            }
        ],
        "invocations": [
            {
                "executionSuccessful": True,
                "exitCode": report.exit_code,
                "toolExecutionNotifications": notes,
                "properties": {"command": report.command, "failOn": report.fail_on},
            }
        ],
        "results": [_result(f, uri, rule_index, nodes.get(f.layer, [])) for f in report.findings],
        "columnKind": "unicodeCodePoints",
    }
    return _log(run)


def render_error(message: str, kind: str, *, command: str | None = None, model_path: str | None = None) -> str:
    """A log for a run that could not finish (exit 2): no results, the error as a tool notification."""
    notification: dict[str, Any] = {
        "level": "error",
        "message": {"text": message},
        "properties": {"kind": kind, **({"command": command} if command else {})},
    }
    if model_path:
        notification["locations"] = [{"physicalLocation": {"artifactLocation": {"uri": artifact_uri(model_path)}}}]
    run = {
        "tool": {"driver": _driver()},
        "invocations": [{"executionSuccessful": False, "exitCode": 2, "toolExecutionNotifications": [notification]}],
        "results": [],
        "columnKind": "unicodeCodePoints",
    }
    return _dump(_log(run))


def artifact_uri(path: str) -> str:
    """The model path as a URI reference: relative paths stay relative (GitHub resolves them against the
    repository root), absolute ones become file URIs; separators are forward slashes, other reserved
    characters percent-encoded."""
    if os.path.isabs(path):
        from pathlib import Path

        return Path(path).as_uri()
    posix = os.path.normpath(path).replace(os.sep, "/")
    return quote(posix, safe="/")


def _log(run: dict[str, Any]) -> dict[str, Any]:
    return {"$schema": SCHEMA_URI, "version": "2.1.0", "runs": [run]}


def _dump(log: dict[str, Any]) -> str:
    return json.dumps(log, indent=2, sort_keys=False, allow_nan=False) + "\n"


def _driver() -> dict[str, Any]:
    return {
        "name": "bncheck",
        "version": __version__,
        "semanticVersion": __version__,
        "rules": [_rule(module) for module in ALL_CHECKS],
    }


def _rule(module: ModuleType) -> dict[str, Any]:
    summary, sections = _doc_sections(module.__doc__ or "")
    severity: Severity = module.SEVERITY
    full = " ".join(sections.get("What it does", summary).split())
    return {
        "id": module.CODE,
        "name": module.SLUG,
        "shortDescription": {"text": _limit(summary)},
        "fullDescription": {"text": _limit(full)},
        "help": {
            "text": "\n\n".join(f"{heading}\n{body}" for heading, body in sections.items()),
            "markdown": "\n\n".join(f"**{heading}**\n\n{body}" for heading, body in sections.items()),
        },
        "defaultConfiguration": {"level": LEVELS[severity]},
        "properties": {
            "tags": ["normalization", module.SLUG],
            "precision": "high",
            "problem.severity": PROBLEM_SEVERITY[severity],
        },
    }


def _result(finding: Finding, uri: str, rule_index: dict[str, int], nodes: list[str]) -> dict[str, Any]:
    result: dict[str, Any] = {
        "ruleId": finding.code,
        "level": LEVELS[finding.severity],
        "message": {
            "text": f"{finding.layer}: {finding.message}" + (f" (effect: {finding.effect})" if finding.effect else "")
        },
        "locations": [
            {
                "physicalLocation": {"artifactLocation": {"uri": uri, "index": 0}, "region": dict(WHOLE_FILE)},
                "logicalLocations": [{"name": finding.layer, "fullyQualifiedName": finding.layer, "kind": "module"}],
            }
        ],
        "partialFingerprints": {"primaryLocationLineHash": _fingerprint(finding)},
        "properties": {
            "check": finding.check,
            "severity": finding.severity.label,
            "hint": finding.hint,
            "nodes": nodes,
            "evidence": jsonable(finding.evidence),
        },
    }
    if finding.code in rule_index:
        result["ruleIndex"] = rule_index[finding.code]
    return result


def _fingerprint(finding: Finding) -> str:
    """Stable across runs for the same check on the same layer (GitHub adds the file path itself)."""
    digest = hashlib.sha256(f"{finding.code}\0{finding.layer}".encode("utf-8", "surrogatepass")).hexdigest()
    return f"{digest[:16]}:1"


def _doc_sections(doc: str) -> tuple[str, dict[str, str]]:
    """A check docstring's summary (after ``BN00x slug:``) and its headed sections, dedented, with reST's
    double backquotes as single ones (Markdown's code spans)."""
    lines = doc.strip().splitlines()
    first = lines[0].split(":", 1)[-1].strip() if lines else ""
    summary = first[:1].upper() + first[1:]
    sections: dict[str, list[str]] = {}
    heading = None
    for line in lines[1:]:
        if line and not line[0].isspace():
            heading = line.strip()
            sections[heading] = []
        elif heading is not None:
            sections[heading].append(line)
    return summary, {h: textwrap.dedent("\n".join(body)).strip().replace("``", "`") for h, body in sections.items()}


def _limit(text: str) -> str:
    return text if len(text) <= DESCRIPTION_LIMIT else text[: DESCRIPTION_LIMIT - 3] + "..."
