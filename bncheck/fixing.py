"""`bncheck fix`: diagnose, repair, write, and prove the repair by checking the written model again.

Framework-neutral orchestration through the backend interface (``Backend.check_fix`` and ``Backend.fix``);
the rewriting itself is the backend's. The model is loaded once (its view serves the plan, the probe of the
original and the repair) and the data once. The report's findings are those of the ORIGINAL model; its
``fix`` part (a :class:`~bncheck.fix_result.FixResult`) says what was done per layer and holds the re-check
of the written model with the same data, whose findings decide the exit code (as linters' fix modes do).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

from bncheck import watchdog
from bncheck.backends import ProbeSettings, backend_for
from bncheck.checks import UnknownCheckError, resolve
from bncheck.errors import BncheckError, ErrorKind, UsageError
from bncheck.fix_result import MIN_SAMPLES, FixRequest, FixResult
from bncheck.model import ModelView, Note, Progress, announce, default_batch_sizes, fixed_batch, runnable_batch
from bncheck.outputs import refuse_overwrite
from bncheck.report import Report

#: What `fix` repairs, by check code.
REPAIRABLE = ("BN002", "BN003")


@watchdog.watched
def fix(
    path: str,
    output: str | None,
    data_path: str | None,
    only: Sequence[str] = (),
    dry_run: bool = False,
    fail_on: str = "error",
    batch_size: int = 32,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    stats: str = "auto",
    min_samples: int | None = None,
    exit_non_zero_on_fix: bool = False,
    report_path: str | None = None,
    progress: Progress | None = None,
) -> Report:
    """Repair ``path`` into ``output`` (statistics stored where sound, else from ``data_path``); return the
    report (command "fix"). Refusals raise a BncheckError before anything is written. ``progress`` is told
    each stage (checking the model, repairing it, checking the written model) and the probes' steps."""
    repair = _repair_codes(only)
    if stats == "data" and data_path is None and not dry_run:
        raise UsageError("--stats data recomputes the statistics from calibration data: pass --data CALIB")
    reads = [("model", path), ("--data file", data_path)]
    if not dry_run:
        refuse_overwrite(output, "the fixed model", reads)
    refuse_overwrite(report_path, "--report", [*reads, ("fixed model", output)])
    backend = backend_for(path)
    view = backend.load(path)
    data = None
    if data_path is not None:
        from bncheck.probe_data import load_data

        data = load_data(data_path, view.inputs)
    request = FixRequest(
        output=output,
        data=data,
        repair=frozenset(repair),
        stats=stats,
        dry_run=dry_run,
        batch_size=batch_size,
        min_samples=min_samples or MIN_SAMPLES,
        data_label=data_path or "the data",
    )
    backend.check_fix(view, request)  # refusals first: a second, not a probe, before "no"
    from bncheck import engine

    settings = ProbeSettings(
        data=data,
        data_path=data_path,
        data_source=data_path or "synthetic",
        batch_sizes=_probe_batch_sizes(view, batch_size),
        input_shapes={name: tuple(int(d) for d in dims) for name, dims in (input_shapes or {}).items()},
        progress=progress,
        recalibrate_all=True,  # the repair below makes the effect's passes over all the data: they are replayed
    )
    synthetic = data is None
    announce(progress, "checking the model")
    report = _check(
        lambda: engine.probe_view(backend, view, settings, fail_on=fail_on),
        lambda: engine.inspect(path, fail_on=fail_on),
        synthetic,
    )
    flagged = {
        f.layer: dict(f.evidence) for f in report.findings if f.code == "BN003" and f.evidence.get("kind") == "drift"
    }
    announce(progress, "repairing")
    runnable = min((runnable_batch(probe, batch_size) for probe in report.probes), default=batch_size)
    if runnable != batch_size:
        report.notes.append(
            Note("info", f"calibration batches of {runnable}: the probe found that larger batches could not run")
        )
    outcome = backend.fix(view, replace(request, flagged=flagged, batch_size=runnable))
    after = None
    if outcome.written:
        assert output is not None
        written = output
        announce(progress, "checking the written model")
        after = _check(
            lambda: engine.probe(written, settings, fail_on=fail_on),
            lambda: engine.inspect(written, fail_on=fail_on),
            synthetic,
        )
    report.command = "fix"
    report.settings = dict(
        report.settings,
        output=output,
        data=data_path,
        only=sorted(repair),
        stats=stats,
        dry_run=dry_run,
        batch_size=batch_size,
        min_samples=request.min_samples,
        exit_non_zero_on_fix=exit_non_zero_on_fix,
        fail_on=fail_on,
    )
    report.fix = FixResult(
        outcome=outcome,
        output=None if dry_run else output,
        dry_run=dry_run,
        stats=stats,
        after=after,
        exit_non_zero_on_fix=exit_non_zero_on_fix,
        min_samples=request.min_samples,
    )
    return report


def _check(probe: Callable[[], Report], inspect: Callable[[], Report], synthetic: bool) -> Report:
    """Probe (with the data, or synthetic inputs); a model whose inputs synthetic data cannot fill (symbolic
    non-batch dims) is checked statically instead, and the report says so."""
    try:
        return probe()
    except BncheckError as error:
        if not synthetic or error.kind is not ErrorKind.DATA:
            raise
        report = inspect()
        report.notes.append(Note("warning", f"checked statically only, the probe could not run: {error}"))
        return report


def _probe_batch_sizes(view: ModelView, batch_size: int) -> tuple[int, ...]:
    """The probe's default batch sizes, none above ``batch_size`` (--batch-size bounds every batch fix runs,
    its probes' runs over the data too) but a fixed batch's own: a file fixed to B is checked at 1, 2 and B as
    a probe checks it, its batch relaxed for the dependence test (the repair's passes run at B)."""
    fixed = fixed_batch(view.inputs)
    if fixed is not None:
        return tuple(b for b in default_batch_sizes(fixed) if b <= batch_size or b == fixed)
    sizes = ProbeSettings().batch_sizes
    return sizes if batch_size >= max(sizes) else (*(b for b in sizes if b < batch_size), batch_size)


def _repair_codes(only: Sequence[str]) -> set[str]:
    """--only resolved to codes; only BN002 and BN003 are repairable."""
    codes = resolve(only)
    other = sorted(codes - set(REPAIRABLE))
    if other:
        raise UnknownCheckError(f"--only {', '.join(other)}: fix repairs only BN002/train-mode and BN003/stale-stats")
    return codes or set(REPAIRABLE)
