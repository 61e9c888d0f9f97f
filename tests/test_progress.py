"""The probe's progress bar: on stderr only when it is a terminal, and only once a second has passed."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from bncheck import engine
from bncheck.cli import main
from bncheck.model import ProbeSettings
from bncheck.render import progress

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
SAMPLE = str(SAMPLES / "clean_resnet.onnx")
TRAIN_MODE = str(SAMPLES / "train_mode_bn.onnx")


def test_no_progress_callback_when_stderr_is_not_a_terminal():
    with progress.progress_bar("probing", enabled=None) as update:
        assert update is None  # pytest captures stderr: not a terminal


def test_probe_json_leaves_stderr_empty_without_a_terminal():
    result = CliRunner().invoke(main, ["probe", SAMPLE, "--format", "json", "--batch-sizes", "1,2"])
    assert result.exit_code == 0 and result.stderr == ""


def _terminal_stderr(code: str, *args: str) -> tuple[str, str]:
    """Run ``code`` with stderr a terminal (a pseudo-terminal): what it wrote there, and on stdout."""
    main_fd, child_fd = pty.openpty()
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], stderr=child_fd, stdout=subprocess.PIPE, timeout=120, check=False
    )
    os.close(child_fd)
    chunks = []
    while True:
        try:
            data = os.read(main_fd, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    os.close(main_fd)
    stderr = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, stderr
    return stderr, proc.stdout.decode()


def test_a_terminal_gets_a_bar_only_for_probes_longer_than_the_delay():
    code = (
        "import sys, time\n"
        "from bncheck.render import progress\n"
        "progress.DELAY_SECONDS = float(sys.argv[1])\n"
        "with progress.progress_bar('probing-bar') as update:\n"
        "    assert update is not None\n"
        "    for i in range(3):\n"
        "        update(i + 1, 3)\n"
        "        time.sleep(0.05)\n"
    )
    assert "probing-bar" in _terminal_stderr(code, "0")[0]
    assert "probing-bar" not in _terminal_stderr(code, "60")[0]


def test_the_bar_shows_once_the_delay_passes_even_while_no_step_ends():
    # loading a large model or building its session can take longer than the delay before a first step ends
    code = (
        "import time\n"
        "from bncheck.render import progress\n"
        "progress.DELAY_SECONDS = 0.2\n"
        "with progress.progress_bar('loading-bar') as update:\n"
        "    update(0, 3)\n"
        "    time.sleep(1.5)\n"
    )
    assert "loading-bar" in _terminal_stderr(code)[0]


def test_a_new_stage_shows_its_own_name():
    code = (
        "import time\n"
        "from bncheck.render import progress\n"
        "progress.DELAY_SECONDS = 0\n"
        "with progress.progress_bar('first-stage') as bar:\n"
        "    bar(2, 3)\n"
        "    time.sleep(0.3)\n"
        "    bar.stage('second-stage')\n"
        "    time.sleep(0.5)\n"
    )
    stderr = _terminal_stderr(code)[0]
    assert "first-stage" in stderr and "second-stage" in stderr
    assert stderr.index("second-stage") > stderr.index("first-stage")


def test_fix_at_a_terminal_shows_its_stages_and_writes_its_report_on_stdout(tmp_path):
    code = (
        "import sys\n"
        "from bncheck.render import progress\n"
        "progress.DELAY_SECONDS = 0\n"
        "from bncheck.cli import main\n"
        "main(sys.argv[1:], standalone_mode=False)\n"
    )
    fixed = tmp_path / "fixed.onnx"
    stderr, stdout = _terminal_stderr(code, "fix", TRAIN_MODE, "-o", str(fixed), "--format", "json")
    for stage in ("checking the model", "repairing", "checking the written model"):
        assert stage in stderr
    assert fixed.exists()
    document = json.loads(stdout)
    assert document["fix"]["written"] and document["fix"]["remaining"] == [] and document["exit_code"] == 0


def test_a_probe_with_a_bar_records_its_settings_without_the_bar():
    # the report's settings are read from the ProbeSettings, whose bar holds a lock that cannot be copied
    with progress.progress_bar("probing", enabled=True) as bar:
        assert bar is not None
        report = engine.probe(SAMPLE, ProbeSettings(batch_sizes=(1, 2), progress=bar))
    assert report.settings["batch_sizes"] == (1, 2) and "progress" not in report.settings
