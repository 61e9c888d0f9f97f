"""One self-contained HTML page per report: findings, layers, and pictures of what the statistics do.

Pictures are matplotlib figures written as inline SVG (the ``html`` extra): no script, style or font is
fetched, so the page opens offline and in CI artifacts. Every model-supplied string is HTML-escaped.
"""

from __future__ import annotations

import html
import io
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from bncheck.errors import UsageError
from bncheck.findings import Finding
from bncheck.model import NormLayer, ProbeResult
from bncheck.render.summary import counts_text
from bncheck.report import Report, layer_status, not_needed_line, probe_cell, set_sizes
from bncheck.verdicts import OUTPUT_TOLERANCE, dependence_verdict, outputs_cleared

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: the html extra's package by name: `pip install 'bncheck[html]'` would fetch whatever holds the name bncheck
#: on the package index (no release of this project is published there)
INSTALL_HINT = "pip install 'matplotlib>=3.7'"
_COLORS = {"error": "#c62828", "warning": "#ef6c00", "info": "#1565c0", "ok": "#2e7d32", "affected": "#8e24aa"}

_STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1180px;padding:16px 24px;color:#212121}
h1{font-size:22px;margin:8px 0}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd}h3{font-size:15px;margin:16px 0 4px}
table{border-collapse:collapse;width:100%;margin:8px 0}th,td{padding:4px 8px;border-bottom:1px solid #eee;text-align:left;vertical-align:top}
th{background:#fafafa}td.num{text-align:right;font-variant-numeric:tabular-nums}code{font-size:13px}
.sev{font-weight:600;text-transform:uppercase;font-size:12px}.muted{color:#757575}.finding{margin:10px 0;padding:8px 12px;border-left:4px solid #999;background:#fafafa}
.figure{margin:8px 0}.figure svg{max-width:100%;height:auto}.grid{display:flex;flex-wrap:wrap;gap:12px}.grid .figure{flex:1 1 360px}
"""


def render(report: Report) -> str:
    """The whole page for ``report`` (inspect, probe or fix)."""
    _pyplot()  # fail before any work when the extra is missing
    return _page(f"bncheck {report.command}: {report.model.path}", _body(report))


def render_many(results: Sequence[Any], command: str, summary: str) -> str:
    """One page for several models (``results`` holds reports and many.Failure entries)."""
    _pyplot()
    parts = [f"<h1>bncheck {_e(command)}: {len(results)} models</h1><p>{_e(summary)}</p>"]
    for result in results:
        if isinstance(result, Report):
            parts.append(f"<section>{_body(result)}</section>")
        else:
            parts.append(
                f"<section><h1>bncheck {_e(command)}: <code>{_e(result.path)}</code></h1>"
                f'<div class="finding" style="border-color:{_COLORS["error"]}">could not be checked '
                f"({_e(result.kind)}): {_e(result.message)}</div></section>"
            )
    return _page(f"bncheck {command}: {len(results)} models", "\n".join(parts))


def render_error(message: str, kind: str, *, command: str | None = None, model_path: str | None = None) -> str:
    """A page saying the run could not finish (exit 2): a report file never shows an older run's success."""
    what = f"bncheck {command}" if command else "bncheck"
    where = f": <code>{_e(model_path)}</code>" if model_path else ""
    body = (
        f'<h1>{_e(what)}{where}</h1><div class="finding" style="border-color:{_COLORS["error"]}">'
        f"could not run ({_e(kind)}): {_e(message)}</div><p>exit 2</p>"
    )
    return _page(f"{what}: error", body)


def _page(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>\n{body}\n</body></html>\n"
    )


def _body(report: Report) -> str:
    parts = [_header(report), _findings(report.findings), _layers(report)]
    if report.probes:
        parts.append(_probe_pictures(report))
    if report.fix is not None:
        parts.append(_fix_section(report))
    if report.notes:
        parts.append(
            "<h2>Notes</h2><ul>" + "".join(f"<li>{_e(n.level)}: {_e(n.message)}</li>" for n in report.notes) + "</ul>"
        )
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------- text parts


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _header(report: Report) -> str:
    counts = report.counts()
    code = int(report.exit_code)
    verdict = "fails" if code else "passes"
    summary = ", ".join(f"{n} {label}{'' if n == 1 or label == 'info' else 's'}" for label, n in counts.items())
    return (
        f"<h1>bncheck {_e(report.command)}: <code>{_e(report.model.path)}</code></h1>"
        f"<p>{_e(report.model.format)} · {len(report.layers)} normalization layer{'s' if len(report.layers) != 1 else ''}"
        f" · {summary} · {verdict} --fail-on {_e(report.fail_on)} (exit {code})</p>"
    )


def _findings(findings: Sequence[Finding]) -> str:
    if not findings:
        return "<h2>Findings</h2><p>No findings.</p>"
    items = []
    for f in findings:
        color = _COLORS.get(f.severity.label, "#999")
        evidence = ", ".join(
            f"{_e(k)}={_e(_short(v))}" for k, v in f.evidence.items() if not isinstance(v, (dict, list))
        )
        items.append(
            f'<div class="finding" style="border-color:{color}"><span class="sev" style="color:{color}">'
            f"{_e(f.severity.label)}</span> <b>{_e(f.code)} {_e(f.check)}</b> <code>{_e(f.layer)}</code>"
            f'<div>{_e(f.message)}</div><div class="muted">fix: {_e(f.hint)}</div>'
            + (f"<div><b>effect on the outputs:</b> {_e(f.effect)}</div>" if f.effect else "")
            + (f'<div class="muted">evidence: {evidence}</div>' if evidence else "")
            + "</div>"
        )
    return "<h2>Findings</h2>" + "".join(items)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _layers(report: Report) -> str:
    batch_sizes = sorted({b for p in report.probes for b in p.batch_sizes})
    head = (
        "<tr><th>layer</th><th>kind</th><th>ch</th><th>eps</th><th>mode</th>"
        + "".join(f"<th>batch {b}</th>" for b in batch_sizes)
        + "<th>status</th></tr>"
    )
    rows = []
    for layer in report.layers:
        status = layer_status(report, layer)
        cells = "".join(f"<td>{_e(_cell(report.probes, layer, b))}</td>" for b in batch_sizes)
        rows.append(
            f"<tr><td><code>{_e(layer.name)}</code></td><td>{_e(layer.kind.value)}</td>"
            f'<td class="num">{_e(layer.channels if layer.channels is not None else "?")}</td>'
            f'<td class="num">{_e(_short(layer.epsilon) if layer.epsilon is not None else "?")}</td>'
            f"<td>{'batch statistics' if layer.batch_statistics else 'running statistics' if layer.uses_running_stats else 'per sample'}</td>"
            f'{cells}<td style="color:{_COLORS.get(status, "#212121")}">{_e(status)}</td></tr>'
        )
    left = [f'<p class="muted">{_e(line)}</p>' for line in map(not_needed_line, report.probes) if line]
    return f"<h2>Layers</h2><table>{head}{''.join(rows)}</table>{''.join(left)}"


def _cell(probes: Iterable[ProbeResult], layer: NormLayer, batch: int) -> str:
    for probe in probes:
        if batch in probe.batch_sizes and probe.at(batch, layer.name) is not None:
            size = set_sizes(layer, [batch], [probe])["by_batch_size"].get(str(batch))
            return f"n={size if size is not None else '?'} {probe_cell(probe, layer, batch)}"
    return "-"


# ---------------------------------------------------------------------------------------------- pictures


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise UsageError(f"--format html needs matplotlib: {INSTALL_HINT}") from None
    matplotlib.use("Agg", force=True)
    matplotlib.rcParams.update({"svg.hashsalt": "bncheck", "svg.fonttype": "none", "font.size": 9})
    import matplotlib.pyplot as plt

    return plt


def _svg(fig: Figure, figure_id: str, caption: str) -> str:
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None, "Creator": None})
    _pyplot().close(fig)
    svg = buffer.getvalue()
    svg = svg[svg.index("<svg") :]  # drop the XML prolog and DOCTYPE: the SVG is inline
    return f'<div class="figure" id="{_e(figure_id)}">{svg}<div class="muted">{_e(caption)}</div></div>'


def _probe_pictures(report: Report) -> str:
    parts = ["<h2>What the probe saw</h2>"]
    for probe in report.probes:
        style = f" ({probe.call_style})" if probe.call_style else ""
        if probe.dependence:
            parts.append(_dependence_plot(report.layers, probe, style))
        parts.append(_set_size_plot(report.layers, probe, style))
        if probe.data:
            parts.append(
                f"<h3>Stored vs observed statistics{_e(style)} ({_e(probe.data_source)}, {probe.data_samples} samples)</h3>"
            )
            figures = [_stats_scatter(layer, probe) for layer in report.layers]
            parts.append('<div class="grid">' + "".join(f for f in figures if f) + "</div>")
    return "".join(parts)


def _dependence_plot(layers: Sequence[NormLayer], probe: ProbeResult, style: str) -> str:
    plt = _pyplot()
    measured = [layer for layer in layers if layer.name in probe.dependence]
    names = [layer.name for layer in measured]
    values, colors = [], []
    cleared = outputs_cleared(probe)
    for layer in measured:
        dep = probe.dependence[layer.name]
        verdict = dependence_verdict(dep, cleared, layer)
        # a log axis cannot show 0: changes below a hundredth of the tolerance are drawn at that floor
        values.append(max(dep.output_change, OUTPUT_TOLERANCE / 100) if np.isfinite(dep.output_change) else np.nan)
        colors.append(
            _COLORS["error"] if verdict == "culprit" else _COLORS["affected"] if verdict == "affected" else "#9e9e9e"
        )
    fig, ax = plt.subplots(figsize=(min(max(6.0, 2 + 0.35 * len(names)), 14), 3.2))
    ax.bar(range(len(names)), values, color=colors)
    ax.axhline(OUTPUT_TOLERANCE, color="#616161", linestyle="--", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_ylim(bottom=OUTPUT_TOLERANCE / 200)
    ax.set_ylabel("output change (sd)")
    ax.set_xticks(range(len(names)), [_tick(n) for n in names], rotation=60, ha="right")
    ax.set_title(f"Batch dependence per layer{style}: red = culprit, purple = affected, grey = independent")
    return _svg(
        fig,
        f"dependence{style.strip(' ()')}",
        "How far each layer's per-sample output moves (in its "
        "standard deviations) when the sample's batch companions change; the dashed line is the tolerance.",
    )


def _set_size_plot(layers: Sequence[NormLayer], probe: ProbeResult, style: str) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(min(max(6.0, 2 + 0.35 * len(layers)), 14), 3.2))
    for batch in probe.batch_sizes:
        xs, ys, collapsed = [], [], []
        for i, layer in enumerate(layers):
            size = set_sizes(layer, [batch], [probe])["by_batch_size"].get(str(batch))
            if size is None:
                continue
            xs.append(i)
            ys.append(size)
            if probe_cell(probe, layer, batch) == "constant" or size == 1:
                collapsed.append((i, size))
        ax.plot(xs, ys, marker="o", markersize=3, linewidth=1, label=f"batch {batch}")
        if collapsed:
            ax.scatter(
                [c[0] for c in collapsed], [c[1] for c in collapsed], marker="x", s=60, color=_COLORS["error"], zorder=3
            )
    ax.set_yscale("log")
    ax.set_ylabel("normalized set size n")
    ax.set_xticks(range(len(layers)), [_tick(layer.name) for layer in layers], rotation=60, ha="right")
    ax.legend(fontsize=8)
    ax.set_title(f"Normalized-set size per layer and batch size{style}: x = one element or constant output")
    return _svg(
        fig,
        f"set-size{style.strip(' ()')}",
        "n is the number of values each statistic is computed over; "
        "a set of one element makes the output its bias (collapse).",
    )


def _stats_scatter(layer: NormLayer, probe: ProbeResult) -> str | None:
    observed = probe.data.get(layer.name) if probe.data else None
    if observed is None or layer.mean is None or layer.var is None:
        return None
    stored_mean = np.asarray(layer.mean, dtype=np.float64).ravel()
    stored_var = np.asarray(layer.var, dtype=np.float64).ravel()
    if stored_mean.size != observed.channels or stored_var.size != observed.channels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(6.4, 3))
    for ax, stored, seen, label in (
        (axes[0], stored_mean, observed.mean, "mean"),
        (axes[1], stored_var, observed.var, "variance"),
    ):
        ax.scatter(stored, seen, s=10, color=_COLORS["info"])
        finite = np.concatenate([stored[np.isfinite(stored)], np.asarray(seen)[np.isfinite(seen)]])
        if finite.size:
            lo, hi = float(finite.min()), float(finite.max())
            ax.plot([lo, hi], [lo, hi], color="#616161", linewidth=0.8, linestyle="--")
        ax.set_xlabel(f"stored {label}")
        ax.set_ylabel(f"observed {label}")
    fig.suptitle(_tick(layer.name, 60))
    return _svg(
        fig,
        f"stats-{layer.name}",
        f"{layer.name}: per-channel running statistics against the data's; points on the dashed line agree.",
    )


def _tick(name: str, width: int = 28) -> str:
    return name if len(name) <= width else name[: width // 2 - 1] + "…" + name[-(width // 2) :]


# ---------------------------------------------------------------------------------------------- fix


def _fix_section(report: Report) -> str:
    fix = report.fix
    assert fix is not None
    rows = []
    for entry in fix.outcome.layers:
        old = entry.old.mean.get("median") if entry.old and entry.old.mean else None
        new = entry.new.mean.get("median") if entry.new and entry.new.mean else None
        rows.append(
            f"<tr><td><code>{_e(entry.layer)}</code></td><td>{_e(entry.action)}</td><td>{_e(entry.source or '')}</td>"
            f'<td class="num">{_e(_short(old) if old is not None else "-")}</td>'
            f'<td class="num">{_e(_short(new) if new is not None else "-")}</td><td>{_e(entry.reason)}</td></tr>'
        )
    after = counts_text(fix.after) if fix.after is not None else None
    compare = (
        f"<p>Findings before: {_e(counts_text(report))}; after (the written model re-checked): {_e(after)}</p>"
        if after is not None
        else "<p>Nothing written (dry run or nothing to repair).</p>"
    )
    return (
        f"<h2>Fix: {_e(fix.summary(report.fail_on))}</h2>{compare}<table><tr><th>layer</th><th>action</th>"
        "<th>statistics from</th><th>old mean (median)</th><th>new mean (median)</th><th>why</th></tr>"
        + "".join(rows)
        + "</table>"
        + (
            _findings(fix.after.findings).replace("<h2>Findings</h2>", "<h3>Findings of the written model</h3>")
            if fix.after
            else ""
        )
    )
