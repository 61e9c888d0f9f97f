"""Command line: parse, call the engine, render, exit. No analysis here.

Exit codes: 0 nothing at or above --fail-on; 1 findings at or above it; 2 could not run (usage error,
unreadable model, runtime failure: one line on stderr, the traceback only with --debug).
Heavy modules (numpy, onnx, onnxruntime, rich, keras) are imported inside the commands so that
`bncheck --help` stays instant.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import click

from bncheck import __version__
from bncheck.findings import FAIL_ON_LEVELS
from bncheck.render import FORMATS, render_error
from bncheck.render.text import literal

FORMAT_HELP = (
    "Report format on stdout: table (for people), json (the JSON document alone), sarif (SARIF 2.1.0, "
    "for code scanning), github (workflow annotations), html (a page with pictures; use -o)."
)
OUTPUT_HELP = (
    "Also write the report to this file, replaced atomically: in the --format chosen (JSON for the "
    "table); with table or github, a .json, .sarif or .html extension chooses instead. Never a file "
    "the command reads (exit 2)."
)


class BatchSizes(click.ParamType):
    """Comma-separated positive integers, e.g. 1,2,32 (parsed by bncheck.probe_data, one parser for all)."""

    name = "SIZES"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[int, ...]:
        if isinstance(value, tuple):
            return value
        from bncheck.probe_data import ProbeDataError, parse_batch_sizes

        try:
            return parse_batch_sizes(value)
        except ProbeDataError as error:
            self.fail(str(error), param, ctx)


class InputShape(click.ParamType):
    """NAME:DIMxDIM... (the non-batch dims of one input)."""

    name = "NAME:DIMxDIM"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[str, tuple[int, ...]]:
        if isinstance(value, tuple):
            return value
        from bncheck.probe_data import ProbeDataError, parse_input_shape

        try:
            return parse_input_shape(value)
        except ProbeDataError as error:
            self.fail(str(error), param, ctx)


def _common(func: Callable[..., Any]) -> Callable[..., Any]:
    """Options inspect and probe share: models, report format, CI gating, configuration, baselines."""
    options = [
        click.argument("models", nargs=-1, required=True, type=click.Path(path_type=str), metavar="MODEL..."),
        click.option(
            "--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True, help=FORMAT_HELP
        ),
        click.option(
            "--output", "-o", "output", type=click.Path(dir_okay=False, writable=True, path_type=str), help=OUTPUT_HELP
        ),
        click.option(
            "--fail-on",
            type=click.Choice(FAIL_ON_LEVELS),
            default=None,
            help="Exit 1 when a finding is at or above this severity.  [default: error]",
        ),
        click.option(
            "--select",
            multiple=True,
            metavar="CODES",
            help="Only these checks (codes or slugs, comma-separated; repeatable).",
        ),
        click.option(
            "--ignore",
            multiple=True,
            metavar="CODES",
            help="Skip these checks (codes or slugs, comma-separated; repeatable).",
        ),
        click.option(
            "--jobs",
            "-j",
            type=click.IntRange(1, 64),
            default=1,
            show_default=True,
            help="Check this many models at once, in separate processes.",
        ),
        click.option(
            "--config",
            "config_path",
            type=click.Path(dir_okay=False, path_type=str),
            help="Settings file (default: bncheck.toml or [tool.bncheck] in pyproject.toml, searched "
            "upward from the current folder). Command-line options win.",
        ),
        click.option(
            "--baseline",
            type=click.Path(dir_okay=False, path_type=str),
            help="Hide the findings recorded in this baseline; fail only on new ones.",
        ),
        click.option(
            "--write-baseline",
            type=click.Path(dir_okay=False, path_type=str),
            help="Record the current findings in this file (keyed on model file, code, layer).",
        ),
        click.option("--debug", is_flag=True, help="Show tracebacks on errors."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


class OneLineErrors(click.Group):
    """A click group whose usage errors are one line on stderr (exit 2), as the exit-code contract says.

    click's own format is three lines (usage, hint, error); CI logs and wrappers want one.
    """

    def main(
        self,
        args: Any = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        _skip_final_collection()
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as error:
            if type(error).__name__ == "NoArgsIsHelpError":  # bare `bncheck`: show the help as click does
                error.show()
                sys.exit(error.exit_code)
            command = error.ctx.command_path if error.ctx is not None else "bncheck"
            message = error.format_message()
            click.echo(literal(f"bncheck: usage error: {message} (see '{command} --help')"), err=True)
            fmt = _requested_format(sys.argv[1:] if args is None else list(args))
            if fmt is not None:
                name = error.ctx.info_name if error.ctx is not None and error.ctx.parent is not None else None
                click.echo(render_error(fmt, message, "usage", command=name), nl=False)
            sys.exit(2)
        except click.ClickException as error:
            error.show()
            sys.exit(error.exit_code)
        except click.Abort as stop:
            click.echo("Aborted!", err=True)
            if isinstance(stop.__cause__, KeyboardInterrupt):
                raise stop.__cause__ from None  # Ctrl-C: console() ends the process as interrupted, not exit 1
            sys.exit(1)
        sys.exit(result if isinstance(result, int) else 0)


def _skip_final_collection() -> None:
    """Freeze the heap at exit: the interpreter's last full collection walks every object of numpy, onnx and
    click only to free memory the process hands back anyway (docs/architecture.md has the numbers).

    atexit handlers and explicit clean-ups still run; bncheck leaves no reference cycle that needs a finalizer
    (its temporary folders are removed as soon as a model is done).
    """
    import atexit
    import gc

    atexit.unregister(gc.freeze)  # once per process, however many times the group runs (click's test runner)
    atexit.register(gc.freeze)


#: console()'s click context object: the process is bncheck's own, whose garbage collector it may tune
_OWN_PROCESS = object()


def _own_process() -> bool:
    """Whether this command runs in the console's own process (console()), which bncheck may tune and end."""
    context = click.get_current_context(silent=True)
    return context is not None and context.find_root().obj is _OWN_PROCESS


def _stop_for_memory(fmt: str, command: str, output: str | None) -> None:
    """bncheck.watchdog in bncheck's own process: a model's check whose memory passes its ceiling ends as any
    failure does (the one line, the error document, the report file), with exit 2 at once."""
    if not _own_process():
        return
    import os

    from bncheck import watchdog
    from bncheck.budget import OverBudgetError

    def stop(model: str, message: str) -> NoReturn:
        with contextlib.suppress(SystemExit):  # _fail's exit, raised in the watchdog's thread
            _fail(OverBudgetError(message), False, fmt=fmt, command=command, model=model, output=output)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os._exit(2)

    watchdog.enable(stop)


def _imports_frozen(models: Sequence[str], command: str) -> None:
    """backends.frozen_imports for these model files, in bncheck's own process only (console() turned the
    collector off until then); a framework that fails to import is left for the command to report in its own
    words."""
    if not _own_process():
        return
    from bncheck.backends import frozen_imports

    frozen_imports(models, command)


def console() -> NoReturn:
    """The console script and ``python -m bncheck``: :data:`main`, then :func:`_end_process`; Ctrl-C and
    SIGTERM stop a running onnxruntime call and unwind it first, then end it as killed by the signal
    (bncheck.termination)."""
    import gc
    import signal

    from bncheck import watchdog
    from bncheck.termination import Terminated, before_forced_stop, die_of, unwind_on_sigterm, watch_stop_signals

    gc.disable()  # until the command's imports are in (_imports_frozen); commands without models end first
    unwind_on_sigterm()
    watch_stop_signals()
    before_forced_stop(watchdog.run_stop_cleanups)  # a stop no native call lets the main thread handle
    code: Any = 0
    try:
        main(obj=_OWN_PROCESS)
    except SystemExit as done:
        code = done.code
    except KeyboardInterrupt:
        _stopped()
        die_of(signal.SIGINT)
    except Terminated:
        _stopped()
        die_of(signal.SIGTERM)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # nothing is left to clean up: SIGTERM may end it at once
    _end_process(code)


def _end_process(code: Any) -> NoReturn:
    """End the process with ``code`` as SystemExit would, without the interpreter's teardown.

    Every atexit handler still runs (anyone's, in their order) and stdout and stderr are flushed; what is
    skipped is the clearing of every module and object, memory the system takes back anyway. bncheck closes
    its sessions and files and removes its folders itself.
    """
    import atexit
    import os

    if getattr(atexit, "_run_exitfuncs", None) is None:  # CPython's; elsewhere the usual exit
        raise SystemExit(code)
    if code is None or isinstance(code, int):
        status = code or 0
    else:
        print(code, file=sys.stderr)  # sys.exit("message"): printed, status 1
        status = 1
    _run_exit_handlers()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            status = status or 120  # what the interpreter's own exit gives when stdout cannot be flushed
    os._exit(status)


def _stopped() -> None:
    """What a stop signal leaves to do before the process dies of it: the exit handlers, and the clean-ups a
    signal landing inside a ``finally`` block cut short (bncheck.watchdog.run_stop_cleanups)."""
    from bncheck import watchdog

    _run_exit_handlers()
    watchdog.run_stop_cleanups()


def _run_exit_handlers() -> None:
    """Run every atexit handler now (multiprocessing's among them, which releases what ``--jobs`` workers
    shared), where the interpreter has a way to (CPython's atexit._run_exitfuncs)."""
    import atexit

    run = getattr(atexit, "_run_exitfuncs", None)
    if run is not None:
        run()


def _requested_format(args: list[str]) -> str | None:
    """The --format value on a command line that click could not parse (the JSON reader still gets a document)."""
    for index, arg in enumerate(args):
        value = arg.split("=", 1)[1] if arg.startswith("--format=") else None
        if arg == "--format" and index + 1 < len(args):
            value = args[index + 1]
        if value in FORMATS:
            return value
    return None


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="bncheck")
def main() -> None:
    """Diagnose the normalization layers of saved ONNX and Keras models.

    \b
    Findings: BN001 collapse, BN002 train-mode, BN003 stale-stats, BN004 epsilon, BN005 non-finite.
    Exit codes: 0 clean (below --fail-on), 1 findings at or above --fail-on, 2 could not run.
    """


@main.command()
@_common
def inspect(
    models: tuple[str, ...],
    fmt: str,
    output: str | None,
    fail_on: str | None,
    select: tuple[str, ...],
    ignore: tuple[str, ...],
    jobs: int,
    config_path: str | None,
    baseline: str | None,
    write_baseline: str | None,
    debug: bool,
) -> None:
    """List every normalization layer of each MODEL (files or folders) and the findings that need no execution."""
    from bncheck.jobs import Options

    options = Options(command="inspect", select=select, ignore=ignore, fail_on=fail_on)
    _run_models(models, options, fmt, output, debug, jobs, config_path, baseline, write_baseline)


@main.command()
@_common
@click.option(
    "--batch-sizes",
    type=BatchSizes(),
    default=None,
    help="Probe batch sizes, comma-separated.  [default: 1,2,32; 1,2,B for an ONNX file that fixes its batch to B]",
)
@click.option(
    "--seed",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Seed of the synthetic inputs (a non-negative integer, as numpy's generator takes).",
)
@click.option(
    "--input-shape",
    "input_shapes",
    type=InputShape(),
    multiple=True,
    help="Non-batch dims of an input with symbolic dims (repeatable), e.g. input:3x224x224; "
    "with --data, its shape gives them.",
)
@click.option(
    "--data",
    type=click.Path(exists=True, dir_okay=False, path_type=str),
    help="Calibration data: .npy (single-input models; read through a memory map) or .npz keyed by input "
    "name (read whole).",
)
@click.option(
    "--samples",
    type=click.IntRange(1, 64),
    default=4,
    show_default=True,
    help="Samples whose batch dependence is tested (at most half the largest batch size).",
)
@click.option(
    "--provider",
    type=click.Choice(["cpu", "cuda", "tensorrt", "auto"]),
    default="cpu",
    show_default=True,
    help="onnxruntime execution provider for ONNX models (auto: the best this onnxruntime has; "
    "nodes a GPU provider cannot run fall back to the CPU).",
)
@click.option(
    "--all-layers",
    is_flag=True,
    help="Measure every normalization layer, also inference-mode ones no check needs without --data "
    "(slower: each measured output keeps onnxruntime from fusing it into its convolution).",
)
def probe(
    models: tuple[str, ...],
    fmt: str,
    output: str | None,
    fail_on: str | None,
    select: tuple[str, ...],
    ignore: tuple[str, ...],
    jobs: int,
    config_path: str | None,
    baseline: str | None,
    write_baseline: str | None,
    debug: bool,
    batch_sizes: tuple[int, ...] | None,
    seed: int,
    input_shapes: tuple[tuple[str, tuple[int, ...]], ...],
    data: str | None,
    samples: int,
    provider: str,
    all_layers: bool,
) -> None:
    """Run probe batches through each MODEL and report collapse, batch dependence, drift and NaN/Inf per layer."""
    from bncheck.jobs import Options

    options = Options(
        command="probe",
        select=select,
        ignore=ignore,
        fail_on=fail_on,
        batch_sizes=batch_sizes,
        seed=seed,
        samples=samples,
        input_shapes=input_shapes,
        data=data,
        provider=provider,
        all_layers=all_layers,
    )
    _run_models(
        models, options, fmt, output, debug, jobs, config_path, baseline, write_baseline, inputs=[("--data file", data)]
    )


@main.command("config")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=str),
    help="Settings file to show instead of the one found upward from the current folder.",
)
def show_config(config_path: str | None) -> None:
    """Show the settings that apply here (the file found, and what it sets)."""
    from bncheck import config

    try:
        cfg = config.discover(config_path)
    except Exception as error:
        _fail(error, debug=False)
    click.echo(literal(f"config file: {cfg.path or '(none found: defaults apply)'}"))
    click.echo(f"select: {', '.join(cfg.select) or '(all checks)'}")
    click.echo(f"ignore: {', '.join(cfg.ignore) or '(none)'}")
    click.echo(f"fail-on: {cfg.fail_on or 'error (default)'}")
    click.echo(f"batch-sizes: {cfg.batch_sizes or '1,2,32 (default; 1,2,B for a file that fixes its batch to B)'}")
    for pattern, codes in cfg.per_layer_ignores.items():
        click.echo(literal(f"per-layer-ignores: {pattern} = {', '.join(codes)}"))
    for entry in cfg.models:
        parts = [
            f"input-shape {' '.join(entry.input_shapes)}" if entry.input_shapes else "",
            f"data {entry.data}" if entry.data else "",
            f"batch-sizes {entry.batch_sizes}" if entry.batch_sizes else "",
        ]
        click.echo(literal(f"per-model: {entry.pattern}: {'; '.join(p for p in parts if p) or '(nothing)'}"))
    click.echo("command-line options override these.")


def _run_models(
    models: tuple[str, ...],
    options: Any,
    fmt: str,
    output: str | None,
    debug: bool,
    jobs: int,
    config_path: str | None,
    baseline: str | None,
    write_baseline: str | None,
    inputs: list[tuple[str, str | None]] | None = None,
) -> NoReturn:
    """One model file: its report as before. Several, or a folder: one section / document per model."""
    import dataclasses
    import os

    command = options.command
    try:
        from bncheck import config as config_module

        cfg = config_module.discover(config_path)
        recorded = None
        if baseline is not None:
            from bncheck import baseline as baseline_module

            recorded = frozenset(baseline_module.read(baseline))
        options = dataclasses.replace(options, config=cfg, baseline=recorded)
        if write_baseline:
            from bncheck.outputs import refuse_overwrite

            refuse_overwrite(write_baseline, "--write-baseline", [("model", m) for m in models] + (inputs or []))
    except Exception as error:
        _fail(error, debug, fmt=fmt, command=command, model=models[0] if len(models) == 1 else None)
    if len(models) == 1 and not os.path.isdir(models[0]):
        _imports_frozen(models, command)
        from bncheck.jobs import check_model

        single = dataclasses.replace(options, progress=command == "probe", process_ends_after=_own_process())

        def run() -> Any:
            report = check_model(models[0], single)
            _write_baseline(write_baseline, [(models[0], report)])
            return report

        _finish(run, fmt, output, debug, command=command, model=models[0], inputs=inputs)
    _finish_many(models, options, fmt, output, debug, jobs, write_baseline, inputs or [])


def _write_baseline(path: str | None, results: list[tuple[str, Any]]) -> None:
    if path:
        from bncheck import baseline as baseline_module
        from bncheck.report import Report

        pairs = [(model, result.findings) for model, result in results if isinstance(result, Report)]
        baseline_module.write(path, pairs)


def _finish_many(
    models: tuple[str, ...],
    options: Any,
    fmt: str,
    output: str | None,
    debug: bool,
    jobs: int,
    write_baseline: str | None,
    inputs: list[tuple[str, str | None]],
) -> NoReturn:
    import functools

    from bncheck import many
    from bncheck.jobs import check_model

    command = options.command
    try:
        paths = many.expand(models)
        if not paths:
            from bncheck.errors import UsageError

            raise UsageError(many.nothing_found(models))
        if output:
            for path in paths:
                _refuse_inputs(output, path, inputs)
        _imports_frozen(paths if jobs <= 1 or len(paths) == 1 else [], command)  # with -j each worker does
        if jobs <= 1 or len(paths) == 1:
            _stop_for_memory(fmt, command, output)
        from bncheck.render.progress import progress_bar

        job = functools.partial(check_model, options=options)
        with progress_bar("models") as progress:
            results = many.run(paths, job, jobs=jobs, progress=progress, command=command)
        _write_baseline(write_baseline, list(zip(paths, results)))
        from bncheck.render import file_format
        from bncheck.render.many import render_many

        if output:
            from bncheck.outputs import write_atomic

            write_atomic(output, render_many(results, file_format(fmt, output), command))
        click.echo(render_many(results, fmt, command, color=sys.stdout.isatty()), nl=False)
        for result in results:
            if isinstance(result, many.Failure):  # the one-line-per-failure contract, on stderr
                # each line names its model: a data or usage error's message does not (the documents say it apart)
                named = result.message if result.message.startswith(result.path) else f"{result.path}: {result.message}"
                click.echo(literal(f"bncheck: error: {named}"), err=True)
    except Exception as error:
        _fail(error, debug, fmt=fmt, command=command)
    sys.exit(many.worst_exit(results))


@main.command("checks")
def list_checks() -> None:
    """List the checks: code, slug, default severity, one-line summary."""
    from bncheck.checks import ALL_CHECKS

    for module in ALL_CHECKS:
        summary = (module.__doc__ or "").strip().splitlines()[0].split(":", 1)[-1].strip()
        click.echo(f"{module.CODE}  {module.SLUG:12} {module.SEVERITY.label:8} {summary}")


@main.command()
@click.argument("check")
def explain(check: str) -> None:
    """Explain CHECK (a code or slug): what it does, why it matters, an example, the fix."""
    from bncheck.checks import ALL_CHECKS, UnknownCheckError, resolve

    try:
        [code] = resolve([check])
    except (UnknownCheckError, ValueError) as error:
        _fail(error, debug=False)
    module = next(m for m in ALL_CHECKS if code == m.CODE)
    click.echo(f"{module.CODE} {module.SLUG} (default severity: {module.SEVERITY.label})\n")
    click.echo((module.__doc__ or "").strip())


@main.command()
@click.argument("model", type=click.Path(dir_okay=True, path_type=str))
@click.option(
    "--output",
    "-o",
    "fixed",
    type=click.Path(dir_okay=False, path_type=str),
    help="Write the fixed model here (never over a file the command reads; ONNX external data is "
    "written next to it). Required unless --dry-run.",
)
@click.option(
    "--data",
    type=click.Path(dir_okay=False, path_type=str),
    help="Calibration data: .npy (single-input models; read through a memory map) or .npz keyed by input "
    "name (read whole). Needed only for layers whose stored statistics are stale, and to find drift.",
)
@click.option(
    "--stats",
    type=click.Choice(["auto", "stored", "data"]),
    default="auto",
    show_default=True,
    help="Statistics of repaired layers: stored (the file's, where sound), data (recomputed from "
    "--data), auto (stored where sound, data where given and needed).",
)
@click.option(
    "--min-samples",
    type=click.IntRange(2, None),
    default=None,
    metavar="N",
    help="Fewest calibration samples accepted (default 8; fewer estimate nothing usable).",
)
@click.option(
    "--only",
    multiple=True,
    metavar="CODES",
    help="Repair only these: BN002/train-mode, BN003/stale-stats (comma-separated; repeatable).",
)
@click.option(
    "--dry-run", is_flag=True, help="Report what would change; write nothing (the exit code judges the model as it is)."
)
@click.option(
    "--batch-size",
    type=click.IntRange(1, 4096),
    default=32,
    show_default=True,
    help="Calibration batch size (a model with a fixed batch dimension uses its own).",
)
@click.option(
    "--input-shape",
    "input_shapes",
    type=InputShape(),
    multiple=True,
    help="Non-batch dims of an input with symbolic dims (repeatable), e.g. input:3x224x224, for the probes "
    "that check the model before and after without --data.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    default="table",
    show_default=True,
    help=FORMAT_HELP.replace("use -o", "use --report"),
)
@click.option(
    "--report",
    "report_path",
    type=click.Path(dir_okay=False, writable=True, path_type=str),
    help=OUTPUT_HELP.replace("this file", "this file (not the fixed model: that is -o)"),
)
@click.option(
    "--fail-on",
    type=click.Choice(FAIL_ON_LEVELS),
    default=None,
    help="Exit 1 when the WRITTEN model (with --dry-run: the model as it is) has a finding at or above this "
    "severity (default: the configuration's fail-on, else error).",
)
@click.option(
    "--exit-non-zero-on-fix", is_flag=True, help="Exit 1 whenever the model was changed, even when nothing remains."
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=str),
    help="Settings file (bncheck.toml or pyproject.toml) instead of the one found upward from the current "
    "folder: its fail-on, and its per-model data and input-shape.",
)
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
def fix(
    model: str,
    fixed: str | None,
    data: str | None,
    stats: str,
    min_samples: int | None,
    only: tuple[str, ...],
    dry_run: bool,
    batch_size: int,
    input_shapes: tuple[tuple[str, tuple[int, ...]], ...],
    fmt: str,
    report_path: str | None,
    fail_on: str | None,
    exit_non_zero_on_fix: bool,
    config_path: str | None,
    debug: bool,
) -> None:
    """Write a repaired copy of MODEL (ONNX or Keras): train-mode batch norms switched to inference (with
    their stored statistics where sound: no data needed), stale or drifting statistics recomputed from --data.

    The findings listed are the ORIGINAL model's; the written model is checked again with the same data.
    Exit codes as linters' fix modes: 0 when the written model has no finding at or above --fail-on, 1 when
    some remain (listed under "Remaining"), 2 when nothing could be done. --dry-run writes nothing and is
    judged on the model as it is.

    \b
    Examples:
      bncheck fix train_mode.onnx -o fixed.onnx            # stored statistics, no data needed
      bncheck fix model.onnx --data calib.npz -o fixed.onnx
      bncheck fix model.keras --data calib.npy -o fixed.keras
    """

    try:  # the project's settings, as inspect and probe read them (the command line wins)
        from bncheck import config
        from bncheck.jobs import configured_inputs

        cfg = config.discover(config_path)
        fail_on = fail_on or cfg.fail_on or "error"
        data, shapes = configured_inputs(cfg, model, data, input_shapes)
    except Exception as error:
        _fail(error, debug, fmt=fmt, command="fix", model=model)

    def run() -> Any:
        from bncheck import fixing
        from bncheck.render.progress import progress_bar

        with progress_bar("loading the model") as progress:
            return fixing.fix(
                model,
                fixed,
                data,
                only=only,
                dry_run=dry_run,
                fail_on=fail_on or "error",
                batch_size=batch_size,
                input_shapes=shapes,
                stats=stats,
                min_samples=min_samples,
                exit_non_zero_on_fix=exit_non_zero_on_fix,
                report_path=report_path,
                progress=progress,
            )

    inputs = [("--data file", data), ("fixed model", fixed)]
    _imports_frozen([model], "fix")
    _finish(run, fmt, report_path, debug, command="fix", model=model, inputs=inputs)


def _finish(
    run: Callable[[], Any],
    fmt: str,
    output: str | None,
    debug: bool,
    *,
    command: str,
    model: str,
    inputs: list[tuple[str, str | None]] | None = None,
) -> NoReturn:
    """Run the command, render its report, exit with its code.

    Any failure is exit 2 with one line on stderr and, in the machine formats, the error document on stdout
    and in the report file. The report file is checked against the command's inputs before anything runs.
    """
    from bncheck.render import file_format, render

    checked = None
    try:
        if output:
            _refuse_inputs(output, model, inputs or [])
            checked = output
        _stop_for_memory(fmt, command, checked)
        # stderr holds nothing but the one-line error: a library's Python warning becomes a note of the report
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report = run()
        _warnings_to_notes(report, caught)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the report is final: a warning from rendering it has nowhere to go
            if output:
                from bncheck.outputs import refuse_overwrite, write_atomic

                written = report.fix.outcome.written if report.fix is not None else []
                refuse_overwrite(output, "the report", [("fixed model's external data", path) for path in written])
                write_atomic(output, render(report, file_format(fmt, output)))
            text = render(report, fmt, color=sys.stdout.isatty())
        click.echo(text, nl=False)
    except click.exceptions.Exit:
        raise
    except Exception as error:  # every failure is exit 2 with one line: the contract CI relies on
        _fail(error, debug, fmt=fmt, command=command, model=model, output=checked)
    sys.exit(report.exit_code)


def _refuse_inputs(output: str, model: str, inputs: list[tuple[str, str | None]]) -> None:
    """UsageError when the report file is the model, one of ``inputs`` or a data file the model names."""
    import os

    from bncheck.outputs import refuse_overwrite

    def external_files() -> list[tuple[str, str | None]]:
        # a model's data files lie in its folder (the loader refuses others): parse it only for a target there
        folder = os.path.realpath(os.path.dirname(os.path.abspath(model)))
        if os.path.commonpath([os.path.realpath(output), folder]) != folder:
            return []
        from bncheck import engine

        return [("model's external data file", path) for path in engine.input_files(model)[1:]]

    refuse_overwrite(output, "the report", [("model", model), *inputs], external_files)


def _warnings_to_notes(report: Any, caught: list[warnings.WarningMessage]) -> None:
    from bncheck.model import Note

    # deprecations speak to the code that calls a library (numpy's, inside Keras), not to the user about a model:
    # Python's own default filters hide them too
    caught = [w for w in caught if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning))]
    texts = list(dict.fromkeys(f"{w.category.__name__}: {' '.join(str(w.message).split())[:300]}" for w in caught))
    for text in texts[:5]:
        report.notes.append(Note("warning", text))
    if len(texts) > 5:
        report.notes.append(Note("warning", f"and {len(texts) - 5:,} more Python warnings"))


def _fail(
    error: BaseException,
    debug: bool,
    *,
    fmt: str = "table",
    command: str | None = None,
    model: str | None = None,
    output: str | None = None,
) -> NoReturn:
    """Exit 2: one line on stderr (model-supplied text made literal), the error document for machine formats."""
    from bncheck.errors import BncheckError, ErrorKind, one_line

    if debug:
        import traceback

        traceback.print_exc()
    if isinstance(error, BncheckError):
        kind, text = error.kind.value, one_line(error, limit=2000)
        line = f"bncheck: error: {text}"
    elif isinstance(error, MemoryError):  # an allocation the budget's estimates did not foresee
        kind, text = (
            ErrorKind.RUNTIME.value,
            (f"out of memory ({one_line(error, limit=200)}); try smaller --batch-sizes or --input-shape"),
        )
        line = f"bncheck: error: {text}"
    elif isinstance(error, OSError):
        where = getattr(error, "filename", None) or ""
        kind, text = ErrorKind.MODEL.value, f"{where}: {error.strerror or error}".removeprefix(": ")
        line = f"bncheck: error: {text}"
    else:
        kind, text = ErrorKind.INTERNAL.value, f"internal error ({type(error).__name__}): {one_line(error, limit=2000)}"
        line = f"bncheck: {text}" + ("" if debug else " (run with --debug for the traceback)")
    click.echo(literal(line), err=True)
    document = render_error(fmt, text, kind, command=command, model_path=model)
    if document:
        click.echo(document, nl=False)
    if output:
        from bncheck.outputs import write_atomic
        from bncheck.render import file_format

        # so that a gate reading the file sees this failure, not the previous run's report; if even that cannot
        # be written, the one line above already says what failed (a second line would break the contract)
        with contextlib.suppress(BncheckError):
            write_atomic(output, render_error(file_format(fmt, output), text, kind, command=command, model_path=model))
    sys.exit(2)


if __name__ == "__main__":
    main()
