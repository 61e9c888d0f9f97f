"""Renderers: one module per report format, each turning a Report into text.

Modules are imported when their format is asked for, so that only the table loads rich.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bncheck.report import Report

#: The values of --format, defined once for every command.
FORMATS: tuple[str, ...] = ("table", "json", "sarif", "github", "html")

#: What a report file (-o) holds for each --format: a table is for reading, so its file gets the JSON.
FILE_FORMATS: dict[str, str] = {"table": "json", "json": "json", "sarif": "sarif", "github": "github", "html": "html"}
#: With --format table or github (read by people or by the CI log), the file's extension may name the file's
#: format instead: `--format github -o bncheck.sarif` annotates the log and writes SARIF for code scanning.
_EXTENSIONS = {".sarif": "sarif", ".json": "json", ".html": "html", ".htm": "html"}


def file_format(fmt: str, path: str) -> str:
    """The format of the report file ``path`` written next to ``fmt`` on stdout."""
    if fmt in ("table", "github"):
        name = path.lower()
        for suffix, named in _EXTENSIONS.items():
            if name.endswith(suffix) or name.endswith(suffix + ".json"):
                return named
    return FILE_FORMATS[fmt]


def render(report: Report, fmt: str, *, color: bool = False) -> str:
    """``report`` in format ``fmt`` (the table at the terminal's width)."""
    if fmt == "table":
        from bncheck.render import table

        return table.render(report, color=color)
    return str(import_module(f"bncheck.render.{fmt}").render(report))


def render_error(
    fmt: str, message: str, kind: str, *, command: str | None = None, model_path: str | None = None
) -> str:
    """What a run that could not finish (exit 2) prints in ``fmt`` besides its stderr line ("" for the table)."""
    if fmt == "table":
        return ""
    module = import_module(f"bncheck.render.{fmt}")
    return str(module.render_error(message, kind, command=command, model_path=model_path))
