"""The human report: a rich layer table, the findings with their hints, a one-line summary.

The only module that imports rich for output (the progress bar has its own). Meant to be read at 100 columns,
never parsed: CI should use --format json.
"""

from __future__ import annotations

import io

import numpy as np
from rich import box
from rich.console import Console
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from bncheck.model import NormLayer
from bncheck.report import Report, layer_status, probe_cell, set_sizes

_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan", "ok": "green", "affected": "magenta"}


def render(report: Report, width: int = 100, color: bool = False) -> str:
    buffer = io.StringIO()
    console = Console(
        file=buffer, width=width, force_terminal=color, color_system="standard" if color else None,
        no_color=not color, highlight=False, soft_wrap=False,
    )
    model = report.model
    producer = f", {model.producer}" if model.producer and model.producer != model.format else ""
    console.print(Text(f"bncheck {report.command}: {model.path} ({model.format}{producer})", style="bold"))
    for note in report.notes:
        console.print(Text(f"{note.level}: {note.message}", style=_STYLE.get(note.level, "")))
    if report.layers:
        console.print(_layer_table(report))
    for probe in report.probes:
        for line in probe.notes:
            console.print(Text(f"probe: {line}", style="dim"))
    if report.findings:
        console.print(Text("Findings", style="bold"))
        for finding in report.findings:
            label = finding.severity.label
            console.print(
                Text.assemble((f"{label.upper():7} ", _STYLE[label]), (f"{finding.code} {finding.check} ", "bold"),
                              (finding.layer, "bold"))
            )
            console.print(Padding(Text(finding.message), (0, 0, 0, 4), expand=False))
            console.print(Padding(Text("fix: " + finding.hint, style="dim"), (0, 0, 0, 4), expand=False))
    fix = report.sections.get("fix")
    if isinstance(fix, dict):
        console.print(_fix_table(fix))
        console.print(Text(f"fix: {fix.get('summary', '')}", style="bold"))
    console.print(Text(_summary_line(report), style=_STYLE.get(
        report.max_severity.label if report.max_severity else "ok", "")))
    # rich pads wrapped lines to the width; trailing blanks only get in the way of copy and diff
    return "\n".join(line.rstrip() for line in buffer.getvalue().splitlines()) + "\n"


def _layer_table(report: Report) -> Table:
    batch_sizes = sorted({b for p in report.probes for b in p.batch_sizes})
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    table.add_column("layer", overflow="fold", max_width=28)
    table.add_column("kind", no_wrap=True)
    table.add_column("ch", justify="right")
    table.add_column("eps", justify="right")
    table.add_column("mode", no_wrap=True)
    if not batch_sizes:
        table.add_column("running mean / var (median)", overflow="fold")
        table.add_column("set", justify="right")
    for batch_size in batch_sizes:
        table.add_column(f"b={batch_size}", justify="right", no_wrap=True)
    table.add_column("status", no_wrap=True)
    for layer in report.layers:
        status = layer_status(report, layer)
        row = [layer.name, layer.kind.value, _num(layer.channels), _eps(layer.epsilon), _mode(layer)]
        if not batch_sizes:
            row += [_stats(layer), _set(layer)]
        sizes = set_sizes(layer, batch_sizes)["by_batch_size"]
        for batch_size in batch_sizes:
            cells = {probe_cell(p, layer, batch_size) for p in report.probes}
            cell = "constant" if "constant" in cells else "nan/inf" if "nan/inf" in cells else cells.pop()
            size = sizes.get(str(batch_size))
            row.append(cell if size is None else f"n={size} {cell}")
        row.append(Text(status, style=_STYLE.get(status, "")))
        table.add_row(*row)
    return table


def _fix_table(fix: dict) -> Table:
    """What `bncheck fix` did per layer: action, and why (old -> new running statistics medians)."""
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, title="fix", title_justify="left")
    table.add_column("layer", overflow="fold", max_width=24)
    table.add_column("action", no_wrap=True)
    table.add_column("mean / var median: old -> new", no_wrap=True)
    table.add_column("reason", overflow="fold")
    for entry in fix.get("layers", []):
        table.add_row(entry.get("layer", "?"), entry.get("action", "?"),
                      _old_new(entry.get("old"), entry.get("new")), entry.get("reason") or "")
    return table


def _old_new(old: dict | None, new: dict | None) -> str:
    def pair(stats: dict | None) -> str:
        if not stats or not stats.get("mean") or not stats.get("var"):
            return "-"
        mean, var = stats["mean"].get("median"), stats["var"].get("median")
        return "-" if mean is None or var is None else f"{mean:.3g} / {var:.3g}"

    return "" if new is None else f"{pair(old)} -> {pair(new)}"


def _mode(layer: NormLayer) -> str:
    if layer.uses_running_stats:
        return "running"
    if layer.batch_statistics:
        return "batch!"
    return "per-sample"


def _stats(layer: NormLayer) -> str:
    if layer.mean is None or layer.var is None:
        return "-" if not layer.uses_running_stats else "unknown"
    return f"{float(np.median(layer.mean)):.3g} / {float(np.median(layer.var)):.3g}"


def _set(layer: NormLayer) -> str:
    sizes = set_sizes(layer, ())
    if sizes["static"] is not None:
        return str(sizes["static"])
    if sizes["known_factor"] is None:
        return "?"
    names = "*".join(sizes["depends_on"])
    return f"{sizes['known_factor']}*{names}" if sizes["known_factor"] != 1 else names


def _num(value: int | None) -> str:
    return "?" if value is None else str(value)


def _eps(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _summary_line(report: Report) -> str:
    counts = report.counts()
    parts = [f"{n} {label}{'s' if n != 1 and label != 'info' else ''}" for label, n in counts.items()]
    worst = report.max_severity.label if report.max_severity else "none"
    threshold = report.fail_on
    verdict = "fails" if report.exit_code else "passes"
    return (f"{len(report.layers)} normalization layer(s), " + ", ".join(parts)
            + f"; worst: {worst}; {verdict} --fail-on {threshold} (exit {report.exit_code})")

