"""Command line: parse, call the engine, render, exit. No analysis here.

Exit codes: 0 nothing at or above --fail-on; 1 findings at or above it; 2 could not run (usage error,
unreadable model, runtime failure: one line on stderr, the traceback only with --debug).
Heavy modules (numpy, onnx, onnxruntime, rich, keras) are imported inside the commands so that
`bncheck --help` stays instant.
"""

from __future__ import annotations

import contextlib
import sys
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

import click

from bncheck import __version__
from bncheck.findings import FAIL_ON_LEVELS
from bncheck.render import FORMATS, render_error
from bncheck.render.text import literal

FORMAT_HELP = ("Report format on stdout: table (for people), json (the JSON document alone), sarif (SARIF 2.1.0, "
               "for code scanning), github (workflow annotations).")
OUTPUT_HELP = ("Also write the report to this file, replaced atomically: in the --format chosen, JSON for the "
               "table. Never a file the command reads (exit 2).")


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

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[str, tuple[int, ...]]:
        if isinstance(value, tuple):
            return value
        from bncheck.probe_data import ProbeDataError, parse_input_shape

        try:
            return parse_input_shape(value)
        except ProbeDataError as error:
            self.fail(str(error), param, ctx)


def _common(func: Callable[..., Any]) -> Callable[..., Any]:
    """Options every command shares (report format and CI gating)."""
    options = [
        click.argument("model", type=click.Path(dir_okay=True, path_type=str)),
        click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True,
                     help=FORMAT_HELP),
        click.option("--output", "-o", "output", type=click.Path(dir_okay=False, writable=True, path_type=str),
                     help=OUTPUT_HELP),
        click.option("--fail-on", type=click.Choice(FAIL_ON_LEVELS), default="error", show_default=True,
                     help="Exit 1 when a finding is at or above this severity."),
        click.option("--select", multiple=True, metavar="CODES",
                     help="Only these checks (codes or slugs, comma-separated; repeatable)."),
        click.option("--ignore", multiple=True, metavar="CODES",
                     help="Skip these checks (codes or slugs, comma-separated; repeatable)."),
        click.option("--debug", is_flag=True, help="Show tracebacks on errors."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


class OneLineErrors(click.Group):
    """A click group whose usage errors are one line on stderr (exit 2), as the exit-code contract says.

    click's own format is three lines (usage, hint, error); CI logs and wrappers want one.
    """

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
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
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(result if isinstance(result, int) else 0)


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
def inspect(model: str, fmt: str, output: str | None, fail_on: str, select: tuple[str, ...],
            ignore: tuple[str, ...], debug: bool) -> None:
    """List every normalization layer of MODEL and the findings that need no execution."""

    def run() -> Any:
        from bncheck import engine

        return engine.inspect(model, select=select, ignore=ignore, fail_on=fail_on)

    _finish(run, fmt, output, debug, command="inspect", model=model)


@main.command()
@_common
@click.option("--batch-sizes", type=BatchSizes(), default="1,2,32", show_default=True,
              help="Probe batch sizes, comma-separated.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the synthetic inputs.")
@click.option("--input-shape", "input_shapes", type=InputShape(), multiple=True,
              help="Non-batch dims of an input with symbolic dims (repeatable), e.g. input:3x224x224.")
@click.option("--data", type=click.Path(exists=True, dir_okay=False, path_type=str),
              help="Calibration data: .npy (single-input models) or .npz keyed by input name.")
@click.option("--samples", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Samples whose batch dependence is tested.")
def probe(model: str, fmt: str, output: str | None, fail_on: str, select: tuple[str, ...],
          ignore: tuple[str, ...], debug: bool, batch_sizes: tuple[int, ...], seed: int,
          input_shapes: tuple[tuple[str, tuple[int, ...]], ...], data: str | None, samples: int) -> None:
    """Run probe batches through MODEL and report collapse, batch dependence, drift and NaN/Inf per layer."""

    def run() -> Any:
        from bncheck import engine
        from bncheck.backends import ProbeSettings
        from bncheck.render.progress import progress_bar

        with progress_bar("probing") as progress:
            settings = ProbeSettings(
                batch_sizes=batch_sizes, seed=seed, input_shapes=dict(input_shapes),
                data_path=data, data_source=data or "synthetic",
                samples=samples, progress=progress,
            )
            return engine.probe(model, settings, select=select, ignore=ignore, fail_on=fail_on)

    _finish(run, fmt, output, debug, command="probe", model=model, inputs=[("--data file", data)])


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
@click.option("--output", "-o", "fixed", type=click.Path(dir_okay=False, path_type=str),
              help="Write the fixed model here (never over a file the command reads; ONNX external data is "
                   "written next to it). Required unless --dry-run.")
@click.option("--data", type=click.Path(dir_okay=False, path_type=str),
              help="Calibration data: .npy (single-input models) or .npz keyed by input name. Needed only for "
                   "layers whose stored statistics are stale, and to find drift.")
@click.option("--stats", type=click.Choice(["auto", "stored", "data"]), default="auto", show_default=True,
              help="Statistics of repaired layers: stored (the file's, where sound), data (recomputed from "
                   "--data), auto (stored where sound, data where given and needed).")
@click.option("--min-samples", type=click.IntRange(2, None), default=None, metavar="N",
              help="Fewest calibration samples accepted (default 8; fewer estimate nothing usable).")
@click.option("--only", multiple=True, metavar="CODES",
              help="Repair only these: BN002/train-mode, BN003/stale-stats (comma-separated; repeatable).")
@click.option("--dry-run", is_flag=True, help="Report what would change; write nothing.")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=32, show_default=True,
              help="Calibration batch size (a model with a fixed batch dimension uses its own).")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True,
              help=FORMAT_HELP)
@click.option("--report", "report_path", type=click.Path(dir_okay=False, writable=True, path_type=str),
              help=OUTPUT_HELP.replace("this file", "this file (not the fixed model: that is -o)"))
@click.option("--fail-on", type=click.Choice(FAIL_ON_LEVELS), default="error", show_default=True,
              help="Exit 1 when the WRITTEN model has a finding at or above this severity.")
@click.option("--exit-non-zero-on-fix", is_flag=True,
              help="Exit 1 whenever the model was changed, even when nothing remains.")
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
def fix(model: str, fixed: str | None, data: str | None, stats: str, min_samples: int | None,
        only: tuple[str, ...], dry_run: bool, batch_size: int, fmt: str, report_path: str | None, fail_on: str,
        exit_non_zero_on_fix: bool, debug: bool) -> None:
    """Write a repaired copy of MODEL (ONNX or Keras): train-mode batch norms switched to inference, stale
    statistics recomputed from --data.

    The findings listed are the ORIGINAL model's; the written model is checked again with the same data.
    Exit codes as linters' fix modes: 0 when the written model has no finding at or above --fail-on, 1 when
    some remain (listed under "Remaining"), 2 when nothing could be done.

    \b
    Examples:
      bncheck fix train_mode.onnx -o fixed.onnx            # stored statistics, no data needed
      bncheck fix model.onnx --data calib.npz -o fixed.onnx
      bncheck fix model.keras --data calib.npy -o fixed.keras
    """

    def run() -> Any:
        from bncheck import fixing

        return fixing.fix(model, fixed, data, only=only, dry_run=dry_run, fail_on=fail_on,
                          batch_size=batch_size, stats=stats, min_samples=min_samples,
                          exit_non_zero_on_fix=exit_non_zero_on_fix, report_path=report_path)

    inputs = [("--data file", data), ("fixed model", fixed)]
    _finish(run, fmt, report_path, debug, command="fix", model=model, inputs=inputs)


def _finish(run: Callable[[], Any], fmt: str, output: str | None, debug: bool, *, command: str, model: str,
            inputs: list[tuple[str, str | None]] | None = None) -> NoReturn:
    """Run the command, render its report, exit with its code.

    Any failure is exit 2 with one line on stderr and, in the machine formats, the error document on stdout
    and in the report file. The report file is checked against the command's inputs before anything runs.
    """
    from bncheck.render import FILE_FORMATS, render

    checked = None
    try:
        if output:
            _refuse_inputs(output, model, inputs or [])
            checked = output
        report = run()
        if output:
            from bncheck.outputs import refuse_overwrite, write_atomic

            written = report.fix.outcome.written if report.fix is not None else []
            refuse_overwrite(output, "the report", [("fixed model's external data", path) for path in written])
            write_atomic(output, render(report, FILE_FORMATS[fmt]))
        click.echo(render(report, fmt, color=sys.stdout.isatty()), nl=False)
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


def _fail(error: BaseException, debug: bool, *, fmt: str = "table", command: str | None = None,
          model: str | None = None, output: str | None = None) -> NoReturn:
    """Exit 2: one line on stderr (model-supplied text made literal), the error document for machine formats."""
    from bncheck.errors import BncheckError, ErrorKind, one_line

    if debug:
        traceback.print_exc()
    if isinstance(error, BncheckError):
        kind, text = error.kind.value, one_line(error, limit=2000)
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
        from bncheck.render import FILE_FORMATS

        # so that a gate reading the file sees this failure, not the previous run's report; if even that cannot
        # be written, the one line above already says what failed (a second line would break the contract)
        with contextlib.suppress(BncheckError):
            write_atomic(output, render_error(FILE_FORMATS[fmt], text, kind, command=command, model_path=model))
    sys.exit(2)


if __name__ == "__main__":
    main()
