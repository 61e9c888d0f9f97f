"""The one-line summary that closes the table and the GitHub annotations."""

from __future__ import annotations

from bncheck.render.text import plural
from bncheck.report import Report, unknown_layers


def summary_line(report: Report) -> str:
    """``3 normalization layers, 2 errors, 0 warnings, 0 info; worst: error; fails --fail-on error (exit 1)``."""
    worst = report.max_severity.label if report.max_severity else "none"
    verdict = "fails" if report.exit_code else "passes"
    fix = report.fix
    if fix is not None:  # judged on the written model (linters' fix convention)
        before = f"before: {counts_text(report)}"
        if fix.after is None:
            return f"{before}; nothing written: the model as it is {verdict} --fail-on {report.fail_on} (exit {report.exit_code})"
        why = " (--exit-non-zero-on-fix: the model was changed)" if fix.exit_non_zero_on_fix and fix.changed else ""
        return (
            f"{before}; after: {counts_text(fix.after)}; {verdict} --fail-on {report.fail_on} "
            f"(exit {report.exit_code}){why}"
        )
    unknown = unknown_layers(report)
    return (
        f"{plural(len(report.layers), 'normalization layer')}"
        + (f" ({unknown} with unreadable parameters: unknown)" if unknown else "")
        + ", "
        + counts_text(report)
        + f"; worst: {worst}; {verdict} --fail-on {report.fail_on} (exit {report.exit_code})"
    )


def counts_text(report: Report) -> str:
    """``2 errors, 0 warnings, 0 info``."""
    return ", ".join(plural(n, label, "info" if label == "info" else None) for label, n in report.counts().items())
