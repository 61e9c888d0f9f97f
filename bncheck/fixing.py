"""`bncheck fix`: diagnose, repair, write, and prove the repair by probing the written model again.

Framework-neutral orchestration; the rewriting itself is the backend's (bncheck.backends.onnx.fix). The
report's findings are those of the ORIGINAL model (so the exit code means what it means for inspect/probe:
the file given has problems); the ``fix`` section says what was done per layer and holds the re-probe of
the fixed model with the same data, which is the proof.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bncheck.backends import BackendError, ProbeSettings, backend_for
from bncheck.checks import UnknownCheckError, resolve
from bncheck.model import ModelView
from bncheck.report import Report

#: What `fix` repairs, by check code.
REPAIRABLE = ("BN002", "BN003")
#: Findings that must be absent from the re-probe of a fixed model (the proof).
PROOF_CODES = ("BN001", "BN002", "BN003")


def fix(
    path: str,
    output: str | None,
    data_path: str | None,
    only: Sequence[str] = (),
    dry_run: bool = False,
    fail_on: str = "error",
    batch_size: int = 32,
) -> Report:
    """Repair ``path`` into ``output`` with statistics from ``data_path``; return the report (command "fix").

    Refusals (no output, output is the input, no data, too few samples, unsupported format) raise
    BackendError before anything is written.
    """
    repair = _repair_codes(only)
    backend = backend_for(path)
    if backend.format != "onnx":
        raise BackendError(f"{path}: `bncheck fix` rewrites ONNX models only ({backend.format} given)")
    from bncheck.backends.onnx.fix import check_output, fix_onnx, precheck

    if not dry_run:
        check_output(path, output)
        if data_path is None:
            raise BackendError(
                f"{path}: fix needs calibration data (--data CALIB): statistics are recomputed from data, "
                "and drifting statistics can only be found with data (no data, no honest statistics)"
            )
    from bncheck import engine

    view = backend.load(path)
    data = None
    if data_path is not None:
        from bncheck.probe_data import load_data

        data = load_data(data_path, view.inputs)
    label = data_path or "the data"
    precheck(view, output, data, repair, dry_run=dry_run, batch_size=batch_size, data_label=label)
    settings = ProbeSettings(data_path=data_path, data_source=data_path or "synthetic",
                             batch_sizes=_probe_batch_sizes(view))
    del view  # one copy of the weights at a time: the probes load the model themselves
    if data_path is not None:
        report = engine.probe(path, settings, fail_on=fail_on)
    else:
        report = engine.inspect(path, fail_on=fail_on)
    flagged = {f.layer: dict(f.evidence) for f in report.findings
               if f.code == "BN003" and f.evidence.get("kind") == "drift"}
    outcome = fix_onnx(backend.load(path), output, data, repair, dry_run=dry_run, batch_size=batch_size,
                       data_label=label, flagged=flagged)
    reprobe = None
    if outcome.written and data_path is not None:
        from bncheck.render.json import to_document

        assert output is not None
        fixed = engine.probe(output, settings, fail_on=fail_on)
        reprobe = to_document(fixed)
    layers = [entry.as_dict() for entry in outcome.layers]
    report.command = "fix"
    report.settings = dict(report.settings, output=output, data=data_path, only=sorted(repair),
                           dry_run=dry_run, batch_size=batch_size, fail_on=fail_on)
    report.sections["fix"] = {
        "output": None if dry_run else output,
        "dry_run": dry_run,
        "written": [] if dry_run else outcome.written,
        "samples": outcome.samples,
        "samples_used": outcome.samples_used,
        "batch_size": outcome.batch_size,
        "passes": outcome.passes,
        "notes": outcome.notes,
        "layers": layers,
        "summary": _summary(layers, output, dry_run, reprobe),
        "reprobe": reprobe,
    }
    return report


def _probe_batch_sizes(view: ModelView) -> tuple[int, ...]:
    """The probe's default batch sizes, or the model's own when its batch dimension is fixed."""
    fixed = {spec.shape[0] for spec in view.inputs if spec.shape and isinstance(spec.shape[0], int)}
    return (fixed.pop(),) if len(fixed) == 1 else ProbeSettings().batch_sizes


def _repair_codes(only: Sequence[str]) -> set[str]:
    """--only resolved to codes; only BN002 and BN003 are repairable."""
    codes = resolve(only)
    other = sorted(codes - set(REPAIRABLE))
    if other:
        raise UnknownCheckError(
            f"--only {', '.join(other)}: fix repairs only BN002/train-mode and BN003/stale-stats"
        )
    return codes or set(REPAIRABLE)


def _listing(layers: list[str], shown: int = 4) -> str:
    """'a, b, c' or 'a, b, c, d and 7 more': the summary stays one readable line on big models."""
    head = ", ".join(layers[:shown])
    return head if len(layers) <= shown else f"{head} and {len(layers) - shown} more"


def _summary(layers: list[dict[str, Any]], output: str | None, dry_run: bool, reprobe: dict | None) -> str:
    names: dict[str, list[str]] = {}
    for entry in layers:
        names.setdefault(entry["action"], []).append(entry["layer"])
    order = ("to-inference", "recalibrated", "replaced-moments", "not-fixed")
    done = "; ".join(f"{a} {_listing(names[a])}" for a in order if names.get(a)) or "nothing to repair"
    if dry_run:
        return f"dry run, nothing written; would do: {done}"
    text = f"wrote {output}: {done}"
    if reprobe is not None:
        left = [f for f in reprobe["findings"]
                if f["code"] in PROOF_CODES and f["severity"] in ("error", "warning")]
        if left:
            names = ", ".join(sorted({f"{f['code']} {f['layer']}" for f in left}))
            text += f"; re-probe still finds {len(left)} collapse/train-mode/stale-stats finding(s): {names}"
        else:
            counts_after = reprobe["summary"]["findings"]
            text += (f"; re-probe: no collapse, train-mode or stale-stats finding ({counts_after['error']} error(s), "
                     f"{counts_after['warning']} warning(s) left)")
    return text
