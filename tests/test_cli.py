"""The CLI contract: exit codes 0/1/2, JSON alone on stdout, one-line errors, select/ignore, lazy imports."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from bncheck.cli import main
from tests.builders import bn_model


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def clean(tmp_path) -> str:
    return bn_model(tmp_path / "clean.onnx")


@pytest.fixture
def stale(tmp_path) -> str:
    return bn_model(tmp_path / "stale.onnx", mean=[0, 0, 0], var=[1, 1, 1])


@pytest.fixture
def low_eps(tmp_path) -> str:
    return bn_model(tmp_path / "eps.onnx", epsilon=1e-8)


def test_clean_model_exits_0(runner, clean):
    result = runner.invoke(main, ["inspect", clean])
    assert result.exit_code == 0, result.output
    assert "0 errors" in result.stdout


def test_error_finding_exits_1(runner, stale):
    assert runner.invoke(main, ["inspect", stale]).exit_code == 1


def test_warning_exits_0_by_default_and_1_with_fail_on_warning(runner, low_eps):
    assert runner.invoke(main, ["inspect", low_eps]).exit_code == 0
    assert runner.invoke(main, ["inspect", low_eps, "--fail-on", "warning"]).exit_code == 1


def test_fail_on_never_exits_0_with_errors(runner, stale):
    assert runner.invoke(main, ["inspect", stale, "--fail-on", "never"]).exit_code == 0


def test_json_stdout_is_the_document_alone(runner, stale):
    result = runner.invoke(main, ["inspect", stale, "--format", "json"])
    document = json.loads(result.stdout)
    assert document["findings"][0]["code"] == "BN003"
    assert document["exit_code"] == result.exit_code == 1
    assert result.stderr == ""


def test_output_file_gets_the_json_while_stdout_gets_the_table(runner, stale, tmp_path):
    out = tmp_path / "report.json"
    result = runner.invoke(main, ["inspect", stale, "--output", str(out)])
    assert "BN003" in result.stdout and not result.stdout.lstrip().startswith("{")
    assert json.loads(out.read_text())["summary"]["findings"]["error"] == 1


def test_ignore_by_slug_drops_the_finding(runner, stale):
    result = runner.invoke(main, ["inspect", stale, "--ignore", "stale-stats", "--format", "json"])
    assert json.loads(result.stdout)["findings"] == []
    assert result.exit_code == 0


def test_select_by_code_keeps_only_that_check(runner, tmp_path):
    path = bn_model(tmp_path / "two.onnx", mean=[0, 0, 0], var=[1, 1, 1], epsilon=1e-8)
    result = runner.invoke(main, ["inspect", path, "--select", "BN004", "--format", "json"])
    assert [f["code"] for f in json.loads(result.stdout)["findings"]] == ["BN004"]


def test_unknown_check_name_is_exit_2_one_line(runner, clean):
    result = runner.invoke(main, ["inspect", clean, "--select", "BN999"])
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "BN999" in result.stderr


def _unreadable(tmp_path: Path, kind: str) -> str:
    path = tmp_path / f"{kind}.onnx"
    if kind == "missing":
        return str(path)
    if kind == "directory":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is not a model\n")
    elif kind == "random":
        path.write_bytes(os.urandom(4096))
    elif kind == "truncated":
        full = Path(bn_model(tmp_path / "full.onnx")).read_bytes()
        path.write_bytes(full[: len(full) // 2])
    return str(path)


@pytest.mark.parametrize("kind", ["missing", "directory", "empty", "text", "random", "truncated"])
def test_unreadable_model_is_exit_2_one_line_naming_the_file(runner, tmp_path, kind):
    path = _unreadable(tmp_path, kind)
    result = runner.invoke(main, ["inspect", path])
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert Path(path).name in lines[0]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_debug_shows_the_traceback(runner, tmp_path):
    path = _unreadable(tmp_path, "text")
    result = runner.invoke(main, ["inspect", path, "--debug"])
    assert result.exit_code == 2
    assert "Traceback" in result.stderr


def test_bad_batch_sizes_are_a_usage_error(runner, clean):
    result = runner.invoke(main, ["probe", clean, "--batch-sizes", "1,zero"])
    assert result.exit_code == 2
    assert "batch" in result.stderr.lower()


def test_bad_input_shape_syntax_is_a_usage_error(runner, clean):
    assert runner.invoke(main, ["probe", clean, "--input-shape", "x:3xfour"]).exit_code == 2


def test_help_lists_the_commands(runner):
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0
    assert "inspect" in result.stdout and "probe" in result.stdout


def test_help_imports_no_framework():
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from bncheck.cli import main\n"
        "CliRunner().invoke(main, ['--help'])\n"
        "heavy = [m for m in ('onnx', 'onnxruntime', 'keras', 'numpy', 'rich') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ""


def test_installed_console_script_runs_with_real_exit_code(stale):
    script = shutil.which("bncheck", path=os.path.dirname(sys.executable))
    assert script, "the bncheck console script is not installed next to this Python"
    proc = subprocess.run([script, "inspect", stale, "--format", "json"], capture_output=True, text=True)
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["findings"][0]["check"] == "stale-stats"


def test_cli_process_freezes_its_heap_at_exit_and_still_runs_earlier_exit_handlers(clean, tmp_path):
    # registered before the CLI's own handler, so it runs after it (atexit is last in, first out)
    seen = tmp_path / "frozen.txt"
    code = (
        "import atexit, gc, sys\n"
        f"atexit.register(lambda: open({str(seen)!r}, 'w').write(str(gc.get_freeze_count())))\n"
        "from bncheck.cli import main\n"
        f"sys.argv = ['bncheck', 'probe', '--format', 'json', {clean!r}]\n"
        "main()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["command"] == "probe"
    assert int(seen.read_text()) > 1000


def _console(prelude: str, argv: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    """A real process through the console script's entry (bncheck.cli.console), after ``prelude``; stdout
    block-buffered as a pipe is by default."""
    code = f"import sys\n{prelude}from bncheck.cli import console\nsys.argv = {['bncheck', *argv]!r}\nconsole()\n"
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"} | env
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environ)


def test_console_probe_never_imports_importlib_metadata_or_the_deferred_modules(tmp_path):
    # onnx is imported through backends/onnx/quick_import.py; atexit handlers run before the console ends
    path = bn_model(tmp_path / "clean.onnx")
    prelude = (
        "import atexit\n"
        "from bncheck.backends.onnx.quick_import import DEFERRED, Deferred\n"
        "real = lambda: [n for n in DEFERRED if n in sys.modules and not isinstance(sys.modules[n], Deferred)]\n"
        "atexit.register(lambda: sys.stderr.write('metadata imported: %s' % ('importlib.metadata' in sys.modules)))\n"
        "atexit.register(lambda: sys.stderr.write('deferred imported: %s; ' % real()))\n"
    )
    proc = _console(prelude, ["probe", path, "--format", "json"])
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["findings"] == []
    assert proc.stderr.strip().endswith("deferred imported: []; metadata imported: False")


def test_console_probe_without_data_never_imports_the_effect_measurement(tmp_path):
    # BN003's output effect needs --data: without it neither effect.py nor fix's result types are imported
    path = bn_model(tmp_path / "clean.onnx")
    prelude = (
        "import atexit\n"
        "names = ('bncheck.backends.onnx.effect', 'bncheck.fix_result')\n"
        "atexit.register(lambda: sys.stderr.write('imported: %s' % [n for n in names if n in sys.modules]))\n"
    )
    proc = _console(prelude, ["probe", path, "--format", "json"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().endswith("imported: []")


def test_console_entry_runs_earlier_exit_handlers_flushes_stdout_and_keeps_the_exit_code(stale):
    # the handler's text stays in stdout's buffer (a pipe, no newline): only a flush after it shows it
    prelude = "import atexit\natexit.register(lambda: sys.stdout.write('handler ran'))\n"
    proc = _console(prelude, ["inspect", "--format", "json", stale])
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.endswith("handler ran")
    assert json.loads(proc.stdout.removesuffix("handler ran"))["findings"][0]["check"] == "stale-stats"


def test_console_entry_usage_error_is_exit_2_with_its_line_on_stderr(clean):
    proc = _console("", ["probe", "--no-such-option", clean])
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("bncheck: usage error:")


def test_console_entry_leaves_no_temporary_folder(tmp_path):
    # a train-mode layer gets the statistics-first session, whose optimized graph goes to a scratch folder
    model = bn_model(tmp_path / "train.onnx", training=True)
    private = tmp_path / "tmp"
    private.mkdir()
    made = tmp_path / "made.txt"
    prelude = (
        "import bncheck.backends.onnx.scratch as scratch\n"
        "_scratch = scratch.scratch_folder\n"
        "def scratch_folder(size, **options):\n"
        "    folder = _scratch(size, **options)\n"
        f"    open({str(made)!r}, 'a').write(folder + '\\n')\n"
        "    return folder\n"
        "scratch.scratch_folder = scratch_folder\n"
    )
    proc = _console(prelude, ["probe", "--format", "json", model], TMPDIR=str(private))
    assert proc.returncode == 1, proc.stderr
    assert "train-mode" in {f["check"] for f in json.loads(proc.stdout)["findings"]}
    folders = made.read_text().split()
    assert folders and all(os.path.dirname(f) == str(private) for f in folders)
    assert not any(os.path.exists(f) for f in folders)


#: at exit, how many onnxruntime sessions the probe left for the process's exit to free
_LEFT_TO_EXIT = (
    "import atexit\n"
    "left = lambda: len(getattr(sys.modules.get('bncheck.backends.onnx.run'), '_LEFT_TO_EXIT', ()))\n"
    "atexit.register(lambda: sys.stderr.write('left to the exit: %d' % left()))\n"
)


def test_console_probe_of_one_model_leaves_its_session_to_the_exit_and_reports_the_same(runner, stale):
    proc = _console(_LEFT_TO_EXIT, ["probe", "--format", "json", stale])
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip() == "left to the exit: 1"
    in_process = runner.invoke(main, ["probe", "--format", "json", stale])  # not the console's own process
    assert json.loads(proc.stdout) == json.loads(in_process.stdout)


def test_console_probe_with_data_or_of_two_models_frees_its_sessions(tmp_path, stale, clean):
    # --data may build sessions after the probe's (BN003's output effect); a folder's models run one by one
    data = tmp_path / "x.npy"
    np.save(data, np.random.default_rng(0).normal(size=(8, 3, 4, 4)).astype(np.float32))
    for argv in (
        ["probe", "--format", "json", "--data", str(data), stale],
        ["probe", "--format", "json", stale, clean],
    ):
        proc = _console(_LEFT_TO_EXIT, argv)
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr.strip().endswith("left to the exit: 0"), argv


def test_a_probe_through_the_api_or_click_frees_its_sessions(runner, stale):
    import bncheck
    from bncheck.backends.onnx import run

    bncheck.probe(stale)
    assert runner.invoke(main, ["probe", "--format", "json", stale]).exit_code == 1
    assert run._LEFT_TO_EXIT == []


#: records, for every collection the process runs and every gc.freeze, ("collect", the objects frozen when it
#: starts) or ("freeze", the objects frozen after it), with which frameworks were imported; at exit, that list, the
#: frameworks imported by then and the objects frozen (the CLI freezes all at exit)
_COLLECTIONS = (
    "import atexit, gc\n"
    "seen = []\n"
    "imported = lambda: tuple(m in sys.modules for m in ('onnx', 'onnxruntime', 'keras'))\n"
    "gc.callbacks.append(\n"
    "    lambda phase, info: phase == 'start' and seen.append(('collect', gc.get_freeze_count(), *imported()))\n"
    ")\n"
    "_freeze = gc.freeze\n"
    "def freeze():\n"
    "    _freeze()\n"
    "    seen.append(('freeze', gc.get_freeze_count(), *imported()))\n"
    "gc.freeze = freeze\n"
    "atexit.register(lambda: open({out!r}, 'w').write(repr((seen, imported(), gc.get_freeze_count()))))\n"
)


def _collections(tmp_path, argv: list[str], code: int) -> tuple[list[tuple[int, ...]], tuple[bool, ...], int]:
    out = tmp_path / "collections.txt"
    proc = _console(_COLLECTIONS.format(out=str(out)), argv)
    assert proc.returncode == code, proc.stderr
    return ast.literal_eval(out.read_text())


def frozen_before_collecting(seen: list[tuple[Any, ...]], framework: int, total: int) -> float:
    """The share of the process's objects frozen when, with ``framework`` (2: onnx, 3: onnxruntime, 4: keras)
    imported, the collector first ran or the heap was first frozen, whichever came first: the framework's own
    objects and the imports before it count only where the collector stayed off through them."""
    after = [s for s in seen if s[framework]]
    assert after, "neither a collection nor a freeze once the framework was in"
    return after[0][1] / total


def came_in_after_a_collection(seen: list[tuple[Any, ...]]) -> bool:
    """Whether the collector ran with onnx imported but onnxruntime not yet."""
    return any(kind == "collect" and onnx and not runtime for kind, _, onnx, runtime, _ in seen)


def test_console_probe_freezes_onnx_and_onnxruntime_before_the_collector_runs(tmp_path, clean):
    seen, (_, runtime, _), total = _collections(tmp_path, ["probe", "--format", "json", clean], 0)
    assert runtime
    assert not came_in_after_a_collection(seen), "onnxruntime came in after a collection"
    assert frozen_before_collecting(seen, 2, total) > 0.8


def test_console_probe_of_a_small_model_runs_no_collection_once_its_imports_are_frozen(tmp_path, clean):
    # a probe's objects die by reference count: the young generation's collections would find next to nothing
    seen, _, _ = _collections(tmp_path, ["probe", "--format", "json", clean], 0)
    first_freeze = next(i for i, (kind, *_) in enumerate(seen) if kind == "freeze")
    assert seen[first_freeze][3], "the first freeze came before onnxruntime's import"
    assert [s for s in seen[first_freeze:] if s[0] == "collect"] == []


def test_console_inspect_freezes_onnx_without_importing_the_runtime(tmp_path, clean):
    seen, (onnx, runtime, _), total = _collections(tmp_path, ["inspect", "--format", "json", clean], 0)
    assert onnx and not runtime
    assert frozen_before_collecting(seen, 2, total) > 0.8


def test_console_probe_of_a_missing_file_imports_no_framework_before_its_error(tmp_path):
    _, (onnx, runtime, _), _ = _collections(tmp_path, ["probe", str(tmp_path / "missing.onnx")], 2)
    assert not onnx and not runtime


def test_console_probe_with_worker_processes_imports_no_framework_in_the_parent(tmp_path, clean, stale):
    _, imported, _ = _collections(tmp_path, ["probe", "--format", "json", "-j", "2", clean, stale], 1)
    assert not any(imported)


def test_console_probe_of_a_folder_freezes_onnx_and_onnxruntime_before_the_collector_runs(tmp_path, clean, stale):
    folder = tmp_path / "models"
    folder.mkdir()
    for path in (clean, stale):
        shutil.copy(path, folder)
    seen, (_, runtime, _), total = _collections(tmp_path, ["probe", "--format", "json", str(folder)], 1)
    assert runtime
    assert not came_in_after_a_collection(seen), "onnxruntime came in after a collection"
    assert frozen_before_collecting(seen, 2, total) > 0.8


def test_a_worker_freezes_its_first_models_frameworks_before_the_collector_runs(tmp_path, clean, stale):
    # what a -j worker process runs for each model it is given (bncheck.many._in_worker), in a fresh process
    out = tmp_path / "collections.txt"
    worker = (
        "from bncheck import many\n"
        "from bncheck.jobs import Options, check_model\n"
        "job = functools.partial(check_model, options=Options('probe'))\n"
        f"reports = [many._in_worker(job, 'probe', path) for path in {[clean, stale]!r}]\n"
        "assert [r.exit_code for r in reports] == [0, 1], reports\n"
    )
    code = "import functools, gc, sys\n" + _COLLECTIONS.format(out=str(out)) + worker
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    seen, (_, runtime, _), frozen = ast.literal_eval(out.read_text())
    assert runtime
    assert not came_in_after_a_collection(seen), "onnxruntime came in after a collection"
    assert frozen_before_collecting(seen, 2, frozen) > 0.8


def test_python_dash_m_runs_the_cli(clean):
    proc = subprocess.run([sys.executable, "-m", "bncheck", "inspect", clean], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_checks_lists_every_code_with_its_default_severity(runner):
    result = runner.invoke(main, ["checks"])
    assert result.exit_code == 0
    lines = result.stdout.strip().splitlines()
    assert [line.split()[:3] for line in lines] == [
        ["BN001", "collapse", "error"],
        ["BN002", "train-mode", "error"],
        ["BN003", "stale-stats", "error"],
        ["BN004", "epsilon", "warning"],
        ["BN005", "non-finite", "error"],
    ]


def test_explain_prints_the_check_docstring_by_slug(runner):
    result = runner.invoke(main, ["explain", "collapse"])
    assert result.exit_code == 0
    assert "Why is this bad?" in result.stdout and "BN001" in result.stdout


def test_explain_unknown_check_is_exit_2(runner):
    result = runner.invoke(main, ["explain", "BN999"])
    assert result.exit_code == 2 and "BN999" in result.stderr


def _conv_only(tmp_path) -> str:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("Mul", ["c", "s"], ["m"], name="scale"),
        helper.make_node("Add", ["m", "b"], ["y"], name="shift"),
    ]
    inits = [
        numpy_helper.from_array(np.ones((4, 3, 1, 1), np.float32), "w"),
        numpy_helper.from_array(np.full((1, 4, 1, 1), 2.0, np.float32), "s"),
        numpy_helper.from_array(np.full((1, 4, 1, 1), 0.5, np.float32), "b"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 4, 4])],
        initializer=inits,
    )
    path = tmp_path / "conv_only.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)]), str(path))
    return str(path)


@pytest.mark.parametrize("command", ["inspect", "probe"])
def test_model_without_normalization_layers_exits_0_saying_so(runner, tmp_path, command):
    result = runner.invoke(main, [command, _conv_only(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "no normalization layer" in result.stdout
    assert "folded" in result.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["probe", "MODEL", "--batch-sizes", "0,2"],
        ["inspect"],
        ["inspect", "MODEL", "--format", "xml"],
        ["inspect", "MODEL", "--fail-on", "sometimes"],
        ["nosuch"],
    ],
)
def test_usage_errors_are_exit_2_with_one_line_on_stderr(runner, clean, args):
    result = runner.invoke(main, [clean if a == "MODEL" else a for a in args])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bncheck: usage error:"), result.stderr
    assert result.stdout == ""


def test_usage_error_exit_code_is_2_in_a_real_process(clean):
    proc = subprocess.run(
        [sys.executable, "-m", "bncheck", "probe", clean, "--batch-sizes", "x"], capture_output=True, text=True
    )
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1


def test_probe_at_batch_size_1_only_says_dependence_was_not_tested(runner, clean):
    result = runner.invoke(main, ["probe", str(clean), "--batch-sizes", "1", "--format", "json"])
    assert result.exit_code == 0, result.output
    runs = json.loads(result.stdout)["probe"]["runs"]
    assert "batch dependence not tested: it needs a batch size above 1" in runs[0]["notes"]


def test_all_layers_measures_the_inference_bns_a_default_probe_leaves_unmeasured(runner, clean):
    def layers(*extra: str) -> dict:
        result = runner.invoke(main, ["probe", clean, "--format", "json", "--batch-sizes", "1,2", *extra])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)["probe"]["runs"][0]["layers"]

    [default] = layers().values()
    assert default["by_batch_size"] == {} and default["not_measured"].startswith("in inference mode: an affine map")
    [every] = layers("--all-layers").values()
    assert set(every["by_batch_size"]) == {"1", "2"} and "not_measured" not in every


def test_python_warnings_become_report_notes_but_deprecations_do_not():
    import types
    import warnings

    from bncheck.cli import _warnings_to_notes

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.warn("__array__ implementation doesn't accept a copy keyword", DeprecationWarning, stacklevel=1)
        warnings.warn("going away", PendingDeprecationWarning, stacklevel=1)
        warnings.warn("the model's file is odd", UserWarning, stacklevel=1)
    report = types.SimpleNamespace(notes=[])
    _warnings_to_notes(report, caught)
    assert [(n.level, n.message) for n in report.notes] == [("warning", "UserWarning: the model's file is odd")]
