"""The pipeline: load -> model view -> probe -> checks -> report. No rendering, no printing.

The backend is chosen lazily by file type, so importing this module imports no framework.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields, replace
from typing import Any

from bncheck.backends import Backend, BackendError, ProbeSettings, backend_for
from bncheck.checks import run_checks, selected
from bncheck.model import ModelView, ProbeResult
from bncheck.probe_data import drawn_counts, made_up_settings
from bncheck.report import Report, merge_findings, sort_findings


def inspect(path: str, *, select: Sequence[str] = (), ignore: Sequence[str] = (), fail_on: str = "error") -> Report:
    """Static analysis: load the model, walk its normalization layers, run every selected check's static part."""
    return inspect_view(backend_for(path).load(path, weights=False), select=select, ignore=ignore, fail_on=fail_on)


def inspect_view(
    view: ModelView, *, select: Sequence[str] = (), ignore: Sequence[str] = (), fail_on: str = "error"
) -> Report:
    """`inspect` on a model already loaded."""
    checks = selected(select, ignore)
    return _report("inspect", view, [], checks, {"select": list(select), "ignore": list(ignore)}, fail_on)


def input_files(path: str) -> list[str]:
    """The files that loading the model at ``path`` reads (the model and, for ONNX, its external data)."""
    return backend_for(path).input_files(path)


def probe(
    path: str,
    settings: ProbeSettings,
    *,
    select: Sequence[str] = (),
    ignore: Sequence[str] = (),
    fail_on: str = "error",
    arrays: Any = None,
) -> Report:
    """Static analysis plus probe batches: every static finding of `inspect`, and the dynamic ones.

    ``arrays`` (the Python API) is in-memory data: one array or a mapping of input name to array."""
    backend = backend_for(path)
    view = backend.load(path, weights=False)
    if arrays is not None:
        from bncheck.probe_data import data_from_arrays

        settings = replace(settings, data=data_from_arrays(arrays, view.inputs))
    return probe_view(backend, view, settings, select=select, ignore=ignore, fail_on=fail_on)


#: ProbeSettings fields the report's settings leave out: the data (its path is data_source), how this process
#: runs the probe (progress, process_ends_after, recalibrate_all), default_sizes (the sizes are recorded) and
#: input_shapes, recorded as lists below
_UNRECORDED = frozenset(
    {"data", "data_path", "progress", "input_shapes", "default_sizes", "process_ends_after", "recalibrate_all"}
)


def probe_view(
    backend: Backend,
    view: ModelView,
    settings: ProbeSettings,
    *,
    select: Sequence[str] = (),
    ignore: Sequence[str] = (),
    fail_on: str = "error",
) -> Report:
    """`probe` on a model already loaded by ``backend`` (fix loads it once for its plan and its probe)."""
    checks = selected(select, ignore)
    if settings.data_path is not None and settings.data is None:
        from bncheck.probe_data import load_data

        settings = replace(settings, data=load_data(settings.data_path, view.inputs))
    # also without normalization layers: the probe tests the model's outputs for batch dependence
    try:
        probes = backend.probe(view, settings)
    except BackendError as exc:
        made_up = [] if settings.data is not None else [made_up_settings(view.inputs), drawn_counts(view.inputs)]
        if not any(made_up):
            raise
        # the model may have failed on the values synthetic inputs gave a setting or a length it takes: say so
        # where it stops
        raise BackendError("; ".join([str(exc), *(text for text in made_up if text)])) from exc
    # the fields read as they are: dataclasses.asdict deep-copies every one first, the calibration arrays and
    # the progress bar (its lock cannot be copied) included
    recorded: dict[str, Any] = {
        f.name: getattr(settings, f.name) for f in fields(settings) if f.name not in _UNRECORDED
    }
    if settings.default_sizes and probes and probes[0].requested_batch_sizes:
        recorded["batch_sizes"] = probes[0].requested_batch_sizes  # the default as fitted to the file
    recorded["input_shapes"] = {k: list(v) for k, v in settings.input_shapes.items()}
    recorded.update(select=list(select), ignore=list(ignore))
    return _report("probe", view, probes, checks, recorded, fail_on)


def _report(
    command: str,
    view: ModelView,
    probes: list[ProbeResult],
    checks: tuple,
    settings: dict[str, Any],
    fail_on: str,
) -> Report:
    static = list(run_checks(view, None, checks))
    per_probe = [(p.call_style, list(run_checks(view, p, checks))) for p in probes]
    findings = merge_findings(static, per_probe)
    settings["fail_on"] = fail_on
    return Report(
        command=command,
        model=view.final_info(),
        layers=list(view.layers),
        findings=sort_findings(findings, [layer.name for layer in view.layers]),
        notes=list(view.notes),
        probes=probes,
        settings=settings,
        fail_on=fail_on,
    )
