"""The human report: a layer table that fits the terminal, a legend, the findings with their hints, a summary.

The only report renderer that imports rich (the progress bar has its own). Never parsed: CI uses json, sarif
or github. Every model-supplied string goes through ``text.literal`` and into a rich ``Text`` (never markup),
so a name such as ``[/red]`` or one holding escape sequences prints as the characters it is.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from rich import box
from rich.cells import cell_len
from rich.console import Console, Group, RenderableType
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from bncheck.findings import Finding
from bncheck.model import NormLayer, ProbeResult, median
from bncheck.render.summary import summary_line
from bncheck.render.text import literal, shorten_names
from bncheck.report import Report, layer_status, not_needed_line, probe_cell, set_sizes

if TYPE_CHECKING:
    from bncheck.fix_result import FixResult, LayerFix, StatsSummary

_STYLE = {
    "error": "bold red",
    "warning": "yellow",
    "info": "cyan",
    "ok": "green",
    "affected": "magenta",
    "unknown": "yellow",
    "not measured": "yellow",
}

#: Two spaces between columns (rich: one padding cell plus the blank divider of the SIMPLE_HEAD box).
_GAP = 2
#: Layer names get at least this many cells (or their full length when shorter) before columns are dropped.
_MIN_LAYER = 32
#: Columns dropped, in this order, when the terminal is too narrow for the layer names.
_DROPPABLE = ("ch", "eps", "kind")

#: What the table's own words mean; a legend line is printed only for the words the table shows.
LEGEND = {
    "mean / var": "medians of the stored running mean and variance",
    "set": "elements one mean/variance is taken over (N: the batch; ?: a dim the file leaves open)",
    "n=": "that set's size at this probe batch size",
    "batch!": "uses the batch's own statistics at inference",
    "constant": "output did not vary with the input (collapse)",
    "affected": "downstream of a batch-dependent layer",
    "unknown": "its parameters could not be read from the file: not checked",
}


def render(report: Report, width: int | None = None, color: bool = False) -> str:
    """The report as text, ``width`` cells wide (None: the terminal's width, ``COLUMNS``, else 80)."""
    buffer = io.StringIO()
    console = Console(
        file=buffer,
        width=width,
        force_terminal=color,
        color_system="standard" if color else None,
        no_color=None if color else True,  # None: rich honours NO_COLOR
        highlight=False,
        soft_wrap=False,
        emoji=False,
        markup=False,
    )
    width = console.width
    # one print of every part: each console.print measures and lays out anew (docs/architecture.md)
    parts: list[RenderableType] = []
    model = report.model
    producer = f", {model.producer}" if model.producer and model.producer != model.format else ""
    parts.append(Text(literal(f"bncheck {report.command}: {model.path} ({model.format}{producer})"), style="bold"))
    for note in report.notes:
        parts.append(Text(literal(f"{note.level}: {note.message}"), style=_STYLE.get(note.level, "")))
    if report.layers:
        grid = _layer_grid(report)
        parts.append(grid.table(width))
        if grid.dropped:
            parts.append(Text(f"({', '.join(grid.dropped)} hidden: terminal too narrow)", style="dim"))
        parts.extend(_legend(grid.words))
    for probe in report.probes:
        sizes = _sizes_line(probe)
        if sizes:
            parts.append(Text(literal(f"probe: {sizes}"), style="dim"))
        for name, reason in probe.unmeasured.items():
            if not any(line.startswith(f"{name}: not measured") for line in probe.notes):
                parts.append(Text(literal(f"probe: {name}: not measured ({reason})"), style="dim"))
        left_out = not_needed_line(probe)
        if left_out:
            parts.append(Text(literal(f"probe: {left_out}"), style="dim"))
        for line in probe.notes:
            parts.append(Text(literal(f"probe: {line}"), style="dim"))
    if report.findings:
        parts.append(Text("Findings", style="bold"))
        for finding in report.findings:
            parts.extend(_finding(finding, hint=True))
    if report.fix is not None:
        parts.extend(_fix(report.fix, report.fail_on, width))
    parts.append(
        Text(summary_line(report), style=_STYLE.get(report.max_severity.label if report.max_severity else "ok", ""))
    )
    console.print(Group(*parts))
    # rich pads lines to the width; trailing blanks only get in the way of copy and diff
    return "\n".join(line.rstrip() for line in buffer.getvalue().splitlines()) + "\n"


@dataclass
class _Column:
    key: str
    header: str
    justify: str = "left"
    cells: list[Text] = field(default_factory=list)

    @property
    def width(self) -> int:
        return max([cell_len(self.header)] + [c.cell_len for c in self.cells])


@dataclass
class _Grid:
    """The layer table as plain cells, laid out for a width only when printed."""

    names: list[str]
    columns: list[_Column]
    words: set[str]
    dropped: list[str] = field(default_factory=list)

    def table(self, width: int) -> Table | Text:
        columns, fits = self.layout(width)
        return _lines(columns) if fits else _rich_table(columns)

    def layout(self, width: int) -> tuple[list[_Column], bool]:
        """The columns shown at ``width``, the layer names (shortened to fit) first, and whether every cell fits."""
        longest = max(cell_len(n) for n in self.names)
        kept = self.columns
        for count in range(len(_DROPPABLE) + 1):
            kept = [c for c in self.columns if c.key not in _DROPPABLE[:count]]
            others = sum(c.width for c in kept) + _GAP * len(kept)
            if width - others >= max(len("layer"), min(longest, _MIN_LAYER)):  # the header is a floor too
                break
        self.dropped = [c.key for c in self.columns if c not in kept]
        room = max(min(longest, width - others), min(longest, 8))
        layer = _Column("layer", "layer", cells=[Text(name) for name in shorten_names(self.names, room, cell_len)])
        return [layer, *kept], layer.width + others <= width


def _rich_table(columns: list[_Column]) -> Table:
    """rich's table of the columns, for a width they do not fit: it shrinks and crops their cells."""
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, padding=(0, 1, 0, 0))
    for column in columns:
        table.add_column(column.header, justify=column.justify, no_wrap=True)  # type: ignore[arg-type]
    for row in range(len(columns[0].cells)):
        table.add_row(*(column.cells[row] for column in columns))
    return table


def _lines(columns: list[_Column]) -> Text:
    """The columns as rich prints a SIMPLE_HEAD table of them (bold header, a rule, one line per row, two
    cells between columns), written here because every cell fits its column: rich's table would measure and
    render each cell again (docs/architecture.md has the numbers)."""
    widths = [c.width for c in columns]
    lines = Text()

    def add_row(cells: list[Text], gap_style: str | None) -> None:
        for index, (cell, column, width) in enumerate(zip(cells, columns, widths)):
            if index:
                lines.append(" ", style=gap_style)  # the cell's padding (styled as the header cell)
                lines.append(" ")  # the column divider
            aligned = cell.copy()
            aligned.align(column.justify, width)  # type: ignore[arg-type]
            lines.append_text(aligned)

    add_row([Text(c.header, style="bold") for c in columns], "bold")
    lines.append("\n" + "\u2500" * (sum(widths) + _GAP * (len(widths) - 1)))
    for row in range(len(columns[0].cells)):
        lines.append("\n")
        add_row([c.cells[row] for c in columns], None)
    return lines


def _layer_grid(report: Report) -> _Grid:
    batch_sizes = sorted({b for p in report.probes for b in p.batch_sizes})
    columns = [
        _Column("kind", "kind"),
        _Column("ch", "ch", "right"),
        _Column("eps", "eps", "right"),
        _Column("mode", "mode"),
    ]
    if not batch_sizes:
        columns += [_Column("stats", "mean / var"), _Column("set", "set", "right")]
    columns += [_Column(f"b={b}", f"b={b}", "right") for b in batch_sizes]
    columns.append(_Column("status", "status"))
    by_key = {c.key: c for c in columns}
    words: set[str] = set()
    for layer in report.layers:
        status = layer_status(report, layer)
        cells: dict[str, Any] = {
            "kind": layer.kind.value,
            "ch": _num(layer.channels),
            "eps": _eps(layer.epsilon),
            "mode": _mode(layer),
            "status": Text(status, style=_STYLE.get(status, "")),
        }
        if not batch_sizes:
            cells |= {"stats": _stats(layer), "set": _set(layer)}
            words |= {"mean / var", "set"}
        sizes = set_sizes(layer, batch_sizes, report.probes)["by_batch_size"]
        for batch_size in batch_sizes:
            seen = {probe_cell(p, layer, batch_size) for p in report.probes}
            cell = "constant" if "constant" in seen else "nan/inf" if "nan/inf" in seen else seen.pop()
            size = sizes.get(str(batch_size))
            probed = any(p.at(batch_size, layer.name) is not None for p in report.probes)
            n = size if size is not None else "?" if probed else None  # ?: measured, its axes unknown
            cells[f"b={batch_size}"] = cell if n is None else f"n={n} {cell}"
            words |= {"constant"} & {cell} | ({"n="} if n is not None else set())
        words |= {w for w in ("batch!", "affected", "unknown") if w in (cells["mode"], status)}
        for key, value in cells.items():
            by_key[key].cells.append(value if isinstance(value, Text) else Text(literal(value)))
    return _Grid([literal(layer.name) for layer in report.layers], columns, words)


def _legend(words: set[str]) -> list[RenderableType]:
    shown = [(word, text) for word, text in LEGEND.items() if word in words]
    if not shown:
        return []
    grid = Table.grid(padding=(0, 2, 0, 0))
    grid.add_column(no_wrap=True, style="dim")
    grid.add_column(style="dim")
    for word, text in shown:
        grid.add_row(word, text)
    return [grid]


def _finding(finding: Finding, hint: bool) -> list[RenderableType]:
    """``ERROR   BN001 collapse LAYER``, then the message (and the hint) indented under it."""
    label = finding.severity.label
    parts: list[RenderableType] = [
        Text.assemble(
            (f"{label.upper():7} ", _STYLE[label]),
            (f"{finding.code} {finding.check} ", "bold"),
            (literal(finding.layer), "bold"),
        ),
        Padding(Text(literal(finding.message)), (0, 0, 0, 4), expand=False),
    ]
    if finding.effect:
        parts.append(Padding(Text(literal(f"effect: {finding.effect}")), (0, 0, 0, 4), expand=False))
    if hint:
        parts.append(Padding(Text(literal("fix: " + finding.hint), style="dim"), (0, 0, 0, 4), expand=False))
    return parts


def _fix(fix: FixResult, fail_on: str, width: int) -> list[RenderableType]:
    """What `bncheck fix` did per layer, the notes, the written model's remaining findings, one summary."""
    # no layer to act on (a model without normalization layers): no header over an empty table
    parts: list[RenderableType] = [_fix_table(fix, width)] if fix.outcome.layers else []
    for note in fix.outcome.notes:
        parts.append(Text(literal(f"fix: {note}"), style="yellow" if "uncertain" in note else "dim"))
    left = fix.remaining(fail_on)
    if left:
        parts.append(Text(literal(f"Remaining in {fix.output} (at or above --fail-on {fail_on})"), style="bold"))
        for finding in left:
            parts.extend(_finding(finding, hint=False))
    parts.append(Text(literal(f"fix: {fix.summary(fail_on)}"), style="bold"))
    return parts


def _fix_table(fix: FixResult, width: int) -> Table:
    """Per layer: action, where the statistics come from (old -> new medians), their uncertainty, and why."""
    entries = fix.outcome.layers
    names = [literal(e.layer) for e in entries]
    room = min(max((cell_len(n) for n in names), default=5), max(12, width // 4))
    table = Table(
        box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, padding=(0, 1, 0, 0), title="fix", title_justify="left"
    )
    table.add_column("layer", no_wrap=True)
    table.add_column("action", no_wrap=True)
    table.add_column("mean / var median", overflow="fold")
    table.add_column("reason", overflow="fold")
    for name, entry in zip(shorten_names(names, room, cell_len), entries):
        reason = entry.reason
        if entry.uncertainty is not None:
            reason += f" [{entry.uncertainty.text()}]"
        table.add_row(Text(name), Text(entry.action), Text(_old_new(entry)), Text(literal(reason)))
    return table


def _old_new(entry: LayerFix) -> str:
    def pair(stats: StatsSummary | None) -> str:
        mean, var = stats.medians() if stats is not None else (None, None)
        return "-" if mean is None or var is None else f"{mean:.3g} / {var:.3g}"

    if entry.source == "stored":
        return f"kept {pair(entry.old)}"
    return "" if entry.new is None else f"{pair(entry.old)} -> {pair(entry.new)}"


def _sizes_line(probe: ProbeResult) -> str | None:
    """Which batch sizes ran and how a fixed batch dim was handled; None when all asked for ran as written."""
    requested = tuple(probe.requested_batch_sizes) or tuple(probe.batch_sizes)
    if probe.batch_handling is None and requested == tuple(probe.batch_sizes):
        return None
    text = f"ran at batch size(s) {','.join(map(str, probe.batch_sizes))}"
    if requested != tuple(probe.batch_sizes):
        text += f" (requested {','.join(map(str, requested))})"
    if probe.batch_handling:
        text += f"; batch dimension {probe.batch_handling}"
    return text


def _mode(layer: NormLayer) -> str:
    if layer.uses_running_stats:
        return "running"
    if layer.batch_statistics:
        return "batch!"
    return "per-sample"


def _stats(layer: NormLayer) -> str:
    if layer.mean is None or layer.var is None:
        return "-" if not layer.uses_running_stats else "unknown"
    if np.size(layer.mean) == 0 or np.size(layer.var) == 0:
        return "empty"
    return f"{median(layer.mean):.3g} / {median(layer.var):.3g}"


def _set(layer: NormLayer) -> str:
    sizes = set_sizes(layer, ())
    if sizes["static"] is not None:
        return str(sizes["static"])
    if sizes["known_factor"] is None:
        return "?"
    shape, axis = layer.input_shape or (), layer.batch_axis
    batch = shape[axis] if axis is not None and axis < len(shape) else None
    # exporters' generated names (unk__12, p2o.DynamicDimension.0) would fill the column: the batch is N,
    # another open dim keeps a short name (H, W, seq) and is ? otherwise; JSON keeps the names
    names = "*".join("N" if n == batch else literal(str(n)) if len(str(n)) <= 4 else "?" for n in sizes["depends_on"])
    return f"{sizes['known_factor']}*{names}" if sizes["known_factor"] != 1 else names


def _num(value: int | None) -> str:
    return "?" if value is None else str(value)


def _eps(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"
