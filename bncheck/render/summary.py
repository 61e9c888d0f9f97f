"""The one-line summary that closes the table and the GitHub annotations."""

from __future__ import annotations

from bncheck.render.text import plural
from bncheck.report import Report


def summary_line(report: Report) -> str:
    """``3 normalization layers, 2 errors, 0 warnings, 0 info; worst: error; fails --fail-on error (exit 1)``."""
    counts = report.counts()
    parts = [plural(n, label, "info" if label == "info" else None) for label, n in counts.items()]
    worst = report.max_severity.label if report.max_severity else "none"
    verdict = "fails" if report.exit_code else "passes"
    return (
        f"{plural(len(report.layers), 'normalization layer')}, "
        + ", ".join(parts)
        + f"; worst: {worst}; {verdict} --fail-on {report.fail_on} (exit {report.exit_code})"
    )
