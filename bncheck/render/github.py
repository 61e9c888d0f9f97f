"""GitHub Actions workflow commands: one annotation per finding, then the summary line.

``::error file=MODEL,title=BN002 train-mode::layer: message`` (warnings ``::warning``, info ``::notice``).
Escaping follows the Actions toolkit (``@actions/core`` command.ts): in the message ``%``, CR and LF are
percent-encoded; in property values also ``:`` and ``,``. Names are made one-line first (``text.literal``),
so a newline in a node name shows as ``\\n`` instead of splitting the annotation.
"""

from __future__ import annotations

from collections.abc import Sequence

from bncheck.findings import Severity
from bncheck.render.summary import summary_line
from bncheck.render.text import literal
from bncheck.report import Report

COMMANDS = {Severity.ERROR: "error", Severity.WARNING: "warning", Severity.INFO: "notice"}


def render(report: Report) -> str:
    path = report.model.path
    lines = []
    for note in report.notes:
        level = "warning" if note.level == "warning" else "notice"
        lines.append(workflow_command(level, [f"bncheck: {note.message}"], file=path, title="bncheck note"))
    for finding in report.findings:
        lines.append(
            workflow_command(
                COMMANDS[finding.severity],
                [
                    f"{finding.layer}: {finding.message}",
                    *([f"effect: {finding.effect}"] if finding.effect else []),
                    f"fix: {finding.hint}",
                ],
                file=path,
                title=f"{finding.code} {finding.check}",
            )
        )
    lines.append(literal(f"bncheck {report.command}: {path}: {summary_line(report)}"))
    return "\n".join(lines) + "\n"


def render_error(message: str, kind: str, *, command: str | None = None, model_path: str | None = None) -> str:
    """The annotation for a run that could not finish (exit 2)."""
    title = f"bncheck {command} ({kind} error)" if command else f"bncheck ({kind} error)"
    return workflow_command("error", [message], file=model_path or "", title=title) + "\n"


def workflow_command(name: str, lines: Sequence[str], **properties: str) -> str:
    """One workflow command: ``lines`` become the annotation's lines. Every string is made literal (so only
    these breaks are line breaks), then escaped for the runner."""
    props = ",".join(f"{key}={escape_property(literal(value))}" for key, value in properties.items() if value)
    message = "\n".join(literal(line) for line in lines)
    return f"::{name}{' ' + props if props else ''}::{escape_data(message)}"


def escape_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(text: str) -> str:
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")
