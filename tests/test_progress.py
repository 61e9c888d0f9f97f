"""The probe's progress bar: on stderr only when it is a terminal, and only once a second has passed."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from bncheck.cli import main
from bncheck.render import progress

SAMPLE = str(Path(__file__).resolve().parent.parent / "sample_models" / "clean_resnet.onnx")


def test_no_progress_callback_when_stderr_is_not_a_terminal():
    with progress.progress_bar("probing", enabled=None) as update:
        assert update is None  # pytest captures stderr: not a terminal


def test_probe_json_leaves_stderr_empty_without_a_terminal():
    result = CliRunner().invoke(main, ["probe", SAMPLE, "--format", "json", "--batch-sizes", "1,2"])
    assert result.exit_code == 0 and result.stderr == ""


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
    outputs = {}
    for delay in ("0", "60"):
        main_fd, child_fd = pty.openpty()
        proc = subprocess.run(
            [sys.executable, "-c", code, delay], stderr=child_fd, stdout=subprocess.DEVNULL, timeout=60
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
        assert proc.returncode == 0
        outputs[delay] = b"".join(chunks).decode(errors="replace")
    assert "probing-bar" in outputs["0"]
    assert "probing-bar" not in outputs["60"]
