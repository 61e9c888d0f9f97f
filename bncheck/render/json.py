"""The JSON document (schema v1, bncheck/schema/report.schema.json). Sorted keys, no timestamps, no NaN.

A new field is an addition (consumers ignore unknown fields); renaming, removing or retyping one bumps
SCHEMA_VERSION.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import numpy as np

from bncheck import __version__
from bncheck.findings import Finding, number, shape_json
from bncheck.model import NormLayer, OutputComparison, ProbeResult, TensorStats, observed_set_size, summarize
from bncheck.report import SCHEMA_VERSION, Report, layer_status, probe_cell, set_sizes, unknown_layers
from bncheck.verdicts import dependence_verdict, outputs_cleared

if TYPE_CHECKING:
    from bncheck.fix_result import FixResult, LayerFix


def render(report: Report) -> str:
    return _dump(to_document(report))


def render_error(message: str, kind: str, *, command: str | None = None, model_path: str | None = None) -> str:
    """The document of a run that could not finish (exit 2), so that a gate reading stdout or the report file
    never takes empty input, or an old report, for success."""
    doc: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "bncheck", "version": __version__},
        "error": {"message": message, "kind": kind},
        "exit_code": 2,
    }
    if command is not None:
        doc["command"] = command
    return _dump(doc)


def _dump(doc: dict[str, Any]) -> str:
    return json.dumps(doc, sort_keys=True, allow_nan=False, indent=2) + "\n"


def to_document(report: Report) -> dict[str, Any]:
    batch_sizes = sorted({b for p in report.probes for b in p.batch_sizes})
    doc: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "bncheck", "version": __version__},
        "model": {
            "path": report.model.path,
            "format": report.model.format,
            "sha256": report.model.sha256,
            "opset": report.model.opset,
            "producer": report.model.producer,
            "ir_version": report.model.ir_version,
            "framework_version": report.model.framework_version,
        },
        "command": report.command,
        "settings": jsonable(report.settings),
        "layers": [_layer(report, layer, batch_sizes) for layer in report.layers],
        "findings": [_finding(f) for f in report.findings],
        "notes": [{"level": n.level, "message": n.message} for n in report.notes],
        "summary": {
            "layers": len(report.layers),
            "unknown": unknown_layers(report),
            "findings": report.counts(),
            "max_severity": report.max_severity.label if report.max_severity else None,
        },
        "exit_code": report.exit_code,
    }
    if report.probes:
        doc["probe"] = {
            "batch_sizes": batch_sizes,
            "runs": [_probe(p, report.layers) for p in report.probes],
        }
    for name, section in report.sections.items():
        doc[name] = jsonable(section)
    if report.fix is not None:
        doc["fix"] = _fix(report.fix, report.fail_on)
    return doc


def _fix(fix: FixResult, fail_on: str) -> dict[str, Any]:
    outcome = fix.outcome
    return {
        "output": fix.output,
        "dry_run": fix.dry_run,
        "stats": fix.stats,
        "min_samples": fix.min_samples,
        "written": list(outcome.written),
        "changed": fix.changed,
        "samples": outcome.samples,
        "samples_used": outcome.samples_used,
        "padded": outcome.padded,
        "batch_size": outcome.batch_size,
        "passes": outcome.passes,
        "notes": list(outcome.notes),
        "layers": [_layer_fix(entry) for entry in outcome.layers],
        "summary": fix.summary(fail_on),
        "remaining": [_finding(f) for f in fix.remaining(fail_on)],
        "reprobe": to_document(fix.after) if fix.after is not None else None,
    }


def _layer_fix(entry: LayerFix) -> dict[str, Any]:
    spread = entry.uncertainty
    return {
        "layer": entry.layer,
        "action": entry.action,
        "reason": entry.reason,
        "code": entry.code,
        "source": entry.source,
        "old": jsonable(asdict(entry.old)) if entry.old is not None else None,
        "new": jsonable(asdict(entry.new)) if entry.new is not None else None,
        "uncertainty": None
        if spread is None
        else {
            "samples": spread.samples,
            "values_per_channel": spread.values_per_channel,
            "mean_se_sd": number(spread.mean_se_sd),
            "mean_se_sd_max": number(spread.mean_se_sd_max),
            "var_rel_error": number(spread.var_rel_error),
            "var_rel_error_max": number(spread.var_rel_error_max),
            "large": spread.large,
        },
        "evidence": jsonable(entry.evidence),
    }


def _layer(report: Report, layer: NormLayer, batch_sizes: list[int]) -> dict[str, Any]:
    return {
        "name": layer.name,
        "nodes": list(layer.nodes),
        "kind": layer.kind.value,
        "op_type": layer.op_type,
        "domain": layer.domain,
        "inputs": list(layer.inputs),
        "outputs": list(layer.outputs),
        "input": layer.input,
        "output": layer.output,
        "axes": list(layer.axes) if layer.axes is not None else None,
        "channel_axis": layer.channel_axis,
        "channels": layer.channels,
        "groups": layer.groups,
        "epsilon": number(layer.epsilon),
        "momentum": number(layer.momentum),
        "training": layer.training,
        "batch_statistics": layer.batch_statistics,
        "uses_running_stats": layer.uses_running_stats,
        "input_shape": shape_json(layer.input_shape),
        "normalized_set_size": set_sizes(layer, batch_sizes, report.probes),
        "scale": jsonable(summarize(layer.scale)),
        "bias": jsonable(summarize(layer.bias)),
        "running_mean": jsonable(summarize(layer.mean)),
        "running_var": jsonable(summarize(layer.var)),
        "notes": list(layer.notes),
        "status": layer_status(report, layer),
        "findings": sorted({f.code for f in report.findings_for(layer.name)}),
    }


def _finding(finding: Finding) -> dict[str, Any]:
    return {
        "code": finding.code,
        "check": finding.check,
        "severity": finding.severity.label,
        "layer": finding.layer,
        "message": finding.message,
        "evidence": jsonable(finding.evidence),
        "hint": finding.hint,
    }


def _probe(probe: ProbeResult, layers: list[NormLayer]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "call_style": probe.call_style,
        "batch_sizes": list(probe.batch_sizes),
        "seed": probe.seed,
        "data": probe.data_source,
        "data_samples": probe.data_samples,
        "notes": list(probe.notes),
        "requested_batch_sizes": list(probe.requested_batch_sizes or probe.batch_sizes),
        "batch_handling": probe.batch_handling,
        "layers": {},
    }
    cleared = outputs_cleared(probe)  # the layers' changes are then the rounding of batch-size kernels
    for layer in layers:
        entry: dict[str, Any] = {"by_batch_size": {}}
        for batch_size in probe.batch_sizes:
            seen = probe.at(batch_size, layer.name)
            if seen is None:
                continue
            entry["by_batch_size"][str(batch_size)] = {
                "status": probe_cell(probe, layer, batch_size),
                "normalized_set_size": observed_set_size(layer, seen),
                "source": seen.source,
                "runtime_deviation": number(seen.runtime_deviation),
                "input": _stats(seen.input),
                "output": _stats(seen.output),
            }
        dep = probe.dependence.get(layer.name)
        if dep is not None:
            entry["batch_dependence"] = {
                "input_change": number(dep.input_change),
                "output_change": number(dep.output_change),
                "samples": dep.samples,
                "batch_sizes": list(dep.batch_sizes),
                "worst_batch_size": dep.worst_batch_size,
                "verdict": dependence_verdict(dep, cleared, layer),
            }
        if not entry["by_batch_size"]:
            entry["not_measured"] = probe.unmeasured.get(
                layer.name, probe.not_needed.get(layer.name, "no statistics came out of the probe runs")
            )
        if probe.data is not None and layer.name in probe.data:
            entry["data_input"] = _stats(probe.data[layer.name])
        out["layers"][layer.name] = entry
    # the model's outputs, each sample alone against the same sample in a batch of each size
    out["outputs"] = {
        name: {str(b): _comparison(c) for b, c in per.items()} for name, per in probe.output_dependence.items()
    }
    if probe.located is not None:
        found = probe.located
        out["located"] = {
            "node": found.node,
            "op_type": found.op_type,
            "tensor": found.tensor,
            "axes": list(found.axes) if found.axes is not None else None,
            "change": number(found.change),
            "runs": found.runs,
        }
        if found.relative_change is not None:
            out["located"]["relative_change"] = number(found.relative_change)
    if probe.recalibration is not None:
        out["recalibration"] = {
            "layers": list(probe.recalibration.layers),
            "samples": probe.recalibration.samples,
            "outputs": {n: _comparison(c) for n, c in probe.recalibration.outputs.items()},
        }
    return out


def _comparison(c: OutputComparison) -> dict[str, Any]:
    return jsonable(c.numbers())


def _stats(stats: TensorStats | None) -> dict[str, Any] | None:
    """Channel-averaged summary of a tensor's per-channel statistics (the per-channel arrays stay internal)."""
    if stats is None:
        return None
    channels = stats.channels
    # np.mean's, np.min's and np.max's reductions called directly: the same numbers without a Python wrapper
    # per call (a document of a hundred layers computes thousands)
    with np.errstate(invalid="ignore"):
        mean = np.add.reduce(stats.mean) / channels
        std = np.add.reduce(np.sqrt(stats.var)) / channels
        # null when not measured (TensorStats.minmax_measured: an inference BN, a layer that cannot collapse)
        low = number(float(np.minimum.reduce(stats.min))) if stats.minmax_measured else None
        high = number(float(np.maximum.reduce(stats.max))) if stats.minmax_measured else None
    return {
        "count_per_channel": stats.count,
        "channels": channels,
        "mean": number(float(mean)),
        "std": number(float(std)),
        "min": low,
        "max": high,
        "zeros": stats.total_zeros,
        "nonfinite": stats.total_nonfinite,
    }


def jsonable(value: Any) -> Any:
    """Make evidence JSON-safe: numpy scalars/arrays to Python, NaN/Inf to strings, tuples to lists."""
    kind = type(value)
    if kind is str or value is None:  # the common cases first (a document holds thousands of values)
        return value
    if kind is float or kind is int:
        return number(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return [jsonable(v) for v in value.tolist()]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, float, np.integer, np.floating)):
        return number(value)
    return value
