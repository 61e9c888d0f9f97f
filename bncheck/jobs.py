"""One `inspect` or `probe` of one model, as the command line asks for it: options merged with the project's
configuration (the command line wins), then per-layer ignores and the baseline applied to the findings.

Module-level and picklable, so that `-j N` can run models in worker processes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from bncheck import watchdog
from bncheck.config import Config
from bncheck.model import DEFAULT_BATCH_SIZES, Note
from bncheck.report import Report


@dataclass(frozen=True)
class Options:
    """What the command line said; None / empty means "not given" (the configuration or the default applies)."""

    command: str  # "inspect" | "probe"
    select: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    fail_on: str | None = None
    batch_sizes: tuple[int, ...] | None = None
    seed: int = 0
    samples: int = 4
    input_shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()
    data: str | None = None
    provider: str = "cpu"
    all_layers: bool = False
    config: Config = field(default_factory=Config)
    baseline: frozenset[tuple[str, str, str]] | None = None
    progress: bool = False  # a progress bar for this model's probe batches (one model, at a terminal)
    process_ends_after: bool = False  # the console's one model: see ProbeSettings.process_ends_after


def resolved_fail_on(options: Options) -> str:
    return options.fail_on or options.config.fail_on or "error"


@watchdog.watched
def check_model(path: str, options: Options) -> Report:
    """Run the command on ``path`` and return its report (raises BncheckError when it cannot run); watched
    for memory where the console enabled it (bncheck.watchdog)."""
    from bncheck import engine

    cfg = options.config
    select = options.select or cfg.select
    ignore = options.ignore or cfg.ignore
    fail_on = resolved_fail_on(options)
    if options.command == "inspect":
        report = engine.inspect(path, select=select, ignore=ignore, fail_on=fail_on)
    else:
        report = _probe(path, options, select, ignore, fail_on)
    return _filtered(report, path, options)


def _probe(path: str, options: Options, select: tuple[str, ...], ignore: tuple[str, ...], fail_on: str) -> Report:
    from contextlib import AbstractContextManager, nullcontext

    from bncheck import engine
    from bncheck.model import ProbeSettings
    from bncheck.probe_data import parse_batch_sizes

    cfg = options.config
    per_model = cfg.for_model(path)
    batch_sizes = options.batch_sizes
    chosen = batch_sizes is not None
    if batch_sizes is None:
        text = (per_model.batch_sizes if per_model else None) or cfg.batch_sizes
        chosen = bool(text)
        batch_sizes = parse_batch_sizes(text) if text else DEFAULT_BATCH_SIZES
    data, shapes = configured_inputs(cfg, path, options.data, options.input_shapes)
    bar: AbstractContextManager[Callable[[int, int], None] | None] = nullcontext(None)
    if options.progress:
        from bncheck.render.progress import progress_bar

        bar = progress_bar("probing")
    with bar as progress:
        settings = ProbeSettings(
            batch_sizes=batch_sizes,
            default_sizes=not chosen,
            seed=options.seed,
            input_shapes=shapes,
            data_path=data,
            data_source=data or "synthetic",
            samples=options.samples,
            progress=progress,
            provider=options.provider,
            all_layers=options.all_layers,
            process_ends_after=options.process_ends_after,
        )
        return engine.probe(path, settings, select=select, ignore=ignore, fail_on=fail_on)


def configured_inputs(
    cfg: Config, path: str, data: str | None, input_shapes: tuple[tuple[str, tuple[int, ...]], ...]
) -> tuple[str | None, dict[str, tuple[int, ...]]]:
    """``--data`` and ``--input-shape`` for the model at ``path``: the command line's, else its per-model entry in
    the configuration (probe and fix read them alike)."""
    from bncheck.probe_data import parse_input_shape

    per_model = cfg.for_model(path)
    shapes = dict(input_shapes)
    if not shapes and per_model is not None:
        shapes = dict(parse_input_shape(spec) for spec in per_model.input_shapes)
    return data or (per_model.data if per_model else None), shapes


def _filtered(report: Report, path: str, options: Options) -> Report:
    """The report without the findings that per-layer ignores and the baseline hide, each said in a note."""
    from bncheck.checks import resolve

    cfg = options.config
    findings = report.findings
    notes = list(report.notes)
    if cfg.per_layer_ignores:
        kept = [f for f in findings if not cfg.ignored(f, resolve)]
        if len(kept) != len(findings):
            hidden = len(findings) - len(kept)
            notes.append(
                Note("info", f"{hidden} finding{'s' if hidden != 1 else ''} hidden by per-layer-ignores in {cfg.path}")
            )
        findings = kept
    if options.baseline is not None:
        from bncheck import baseline

        applied = baseline.apply(set(options.baseline), path, findings)
        findings = applied.kept
        if applied.suppressed:
            n = len(applied.suppressed)
            notes.append(Note("info", f"{n} finding{'s' if n != 1 else ''} hidden by the baseline"))
        for _, code, layer in applied.gone:
            notes.append(Note("info", f"baselined {code} on {layer!r} no longer occurs: update the baseline"))
    if findings is report.findings and notes == report.notes:
        return report
    return replace(report, findings=findings, notes=notes)
