"""Reports of several models in one run: each format's single-model output, combined as its users expect.

table: one section per model and a closing line; json: one document with a list of per-model documents;
sarif: one run whose artifacts and results span the models; github: the annotations of every model; html:
one page with a section per model. A model that could not be checked is an entry of its own in each.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from bncheck import __version__
from bncheck.many import Failure, worst_exit
from bncheck.report import SCHEMA_VERSION, Report

Result = Report | Failure


def render_many(results: Sequence[Result], fmt: str, command: str, *, color: bool = False) -> str:
    return {
        "table": _table,
        "json": _json,
        "sarif": _sarif,
        "github": _github,
        "html": _html,
    }[fmt](results, command, color)


def summary_line(results: Sequence[Result]) -> str:
    failed = sum(isinstance(r, Failure) for r in results)
    reports = [r for r in results if isinstance(r, Report)]
    gating = sum(int(r.exit_code) == 1 for r in reports)
    n = len(results)
    return (
        f"{n} model{'s' if n != 1 else ''}: {gating} with findings at or above --fail-on, "
        f"{failed} could not be checked; exit {worst_exit(results)}"
    )


def _table(results: Sequence[Result], command: str, color: bool) -> str:
    from bncheck.render import table
    from bncheck.render.text import literal

    sections = []
    for result in results:
        if isinstance(result, Failure):
            sections.append(
                literal(f"bncheck {command}: {result.path}")
                + "\n"
                + literal(f"error ({result.kind}): {result.message}")
                + "\n"
            )
        else:
            sections.append(table.render(result, color=color))
    return "\n".join(sections) + "\n" + summary_line(results) + "\n"


def _json(results: Sequence[Result], command: str, color: bool) -> str:
    from bncheck.render.json import render_error, to_document

    models: list[dict[str, Any]] = []
    for result in results:
        if isinstance(result, Failure):
            document = json.loads(render_error(result.message, result.kind, command=command))
            document["model_path"] = result.path  # no "model" object: it could not be read
            models.append(document)
        else:
            models.append(to_document(result))
    document = {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "bncheck", "version": __version__},
        "command": command,
        "models": models,
        "exit_code": worst_exit(results),
        "totals": {
            "models": len(results),
            "failed": sum(isinstance(r, Failure) for r in results),
            "errors": sum(r.counts()["error"] for r in results if isinstance(r, Report)),
            "warnings": sum(r.counts()["warning"] for r in results if isinstance(r, Report)),
            "info": sum(r.counts()["info"] for r in results if isinstance(r, Report)),
        },
    }
    return json.dumps(document, sort_keys=True, allow_nan=False, indent=2) + "\n"


def _sarif(results: Sequence[Result], command: str, color: bool) -> str:
    from bncheck.render import sarif

    merged: dict[str, Any] | None = None
    failures: list[dict[str, Any]] = []
    for result in results:
        if isinstance(result, Failure):
            failures.append(
                {
                    "level": "error",
                    "message": {"text": result.message},
                    "locations": [{"physicalLocation": {"artifactLocation": {"uri": sarif.artifact_uri(result.path)}}}],
                    "properties": {"kind": result.kind},
                }
            )
            continue
        run = sarif.to_log(result)["runs"][0]
        if merged is None:
            merged = run
            continue
        offset = len(merged["artifacts"])
        merged["artifacts"].extend(run["artifacts"])
        for found in run["results"]:
            for location in found.get("locations", []):
                artifact = location.get("physicalLocation", {}).get("artifactLocation", {})
                if "index" in artifact:
                    artifact["index"] += offset
        merged["results"].extend(run["results"])
        merged["invocations"][0]["toolExecutionNotifications"].extend(
            run["invocations"][0]["toolExecutionNotifications"]
        )
    if merged is None:  # every model failed: the error log of the first, with the others' notifications
        first = results[0]
        assert isinstance(first, Failure)
        log = json.loads(sarif.render_error(first.message, first.kind, command=command, model_path=first.path))
        merged = log["runs"][0]
        failures = failures[1:]
    invocation = merged["invocations"][0]
    invocation["toolExecutionNotifications"].extend(failures)
    invocation["exitCode"] = worst_exit(results)
    invocation["executionSuccessful"] = not any(isinstance(r, Failure) for r in results)
    return (
        json.dumps({"$schema": sarif.SCHEMA_URI, "version": "2.1.0", "runs": [merged]}, indent=2, allow_nan=False)
        + "\n"
    )


def _github(results: Sequence[Result], command: str, color: bool) -> str:
    from bncheck.render import github

    parts = []
    for result in results:
        if isinstance(result, Failure):
            parts.append(github.render_error(result.message, result.kind, command=command, model_path=result.path))
        else:
            parts.append(github.render(result))
    return "".join(parts) + summary_line(results) + "\n"


def _html(results: Sequence[Result], command: str, color: bool) -> str:
    from bncheck.render import html

    return html.render_many(results, command, summary_line(results))
