"""The exit contract every bncheck run must keep, whatever the input, and a runner that checks it.

A run is a real ``python -m bncheck``-equivalent subprocess (bncheck's own ``main`` under an audit hook, see
``_audited_main.py``) with a wall-clock timeout and an address-space limit (RLIMIT_AS, set by the wrapper
before bncheck is imported: ``preexec_fn`` is unsafe in a process with threads). The contract:

- the exit code is 0, 1 or 2 (no signal, no other code);
- exit 2: stderr is exactly one line, ``bncheck: error: ...`` or ``bncheck: usage error: ...``, never an
  ``internal error`` and never a traceback;
- exit 0 or 1: stderr is empty (no runtime logs, no Python warnings: those become notes in the report);
- no file outside the model's folder (and the interpreter's own folders) is opened, and nothing reads the
  canary folder that hostile inputs point at;
- the run ends within the timeout and within the memory limit.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import os
import re
import struct
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
#: Address-space limit of one run. onnxruntime and numpy reserve far more address space than they touch, so
#: this is a ceiling on runaway allocations, not on the working set.
MEMORY_LIMIT = int(os.environ.get("BNCHECK_FUZZ_MEMORY", str(6 * 1024**3)))
TIMEOUT = float(os.environ.get("BNCHECK_FUZZ_TIMEOUT", "60"))

#: Folders a run may read besides the model's: the interpreter, its libraries, the temp folder, the kernel's
#: pseudo files (CPU and memory discovery by numpy, onnxruntime and psutil) and the source tree under test.
SYSTEM_DIRS = sorted(
    {
        sys.prefix,
        sys.base_prefix,
        sys.exec_prefix,
        sysconfig.get_paths()["stdlib"],
        sysconfig.get_paths()["purelib"],
        sysconfig.get_paths()["platlib"],
        str(REPO / "bncheck"),
        str(REPO / "bncheck.egg-info"),
        "/proc",
        "/sys",
        "/dev",
        "/usr/lib",
        "/usr/share",
        "/usr/local/lib",
        "/lib",
        "/etc/ld.so.cache",
        "/etc/localtime",
        # matplotlib's font cache: Keras imports matplotlib when it is installed (the html extra), a library cache
        os.environ.get("MPLCONFIGDIR")
        or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "matplotlib"),
        os.path.join(os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config"), "matplotlib"),
    }
)


@dataclass
class Run:
    args: list[str]
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    outside: list[str] = field(default_factory=list)  # files opened outside the allowed folders
    canary_opened: bool = False
    timed_out: bool = False

    def violations(self) -> list[str]:
        """Every way this run broke the contract (empty: it kept it)."""
        out: list[str] = []
        lines = self.stderr.splitlines()
        if self.timed_out:
            out.append(f"timed out after {self.seconds:.0f} s")
        elif self.returncode not in (0, 1, 2):
            out.append(f"exit code {self.returncode}")
        if self.returncode == 2:
            if len(lines) != 1:
                out.append(f"exit 2 with {len(lines)} stderr lines")
            elif not lines[0].startswith(("bncheck: error: ", "bncheck: usage error: ")):
                out.append("exit 2 with an unexpected stderr line")
        elif self.returncode in (0, 1) and self.stderr.strip():
            out.append(f"exit {self.returncode} with stderr output")
        if self.returncode in (0, 1) and "json" in self.args and self.args[self.args.index("json") - 1] == "--format":
            try:
                json.loads(self.stdout)
            except ValueError:
                out.append("--format json stdout is not one JSON document")
        elif re.search(r"[\x00-\x08\x0b-\x1f\x7f\x9b]", self.stdout):
            out.append("control characters on stdout (model-supplied text printed raw)")
        if "Traceback (most recent call last)" in self.stderr:
            out.append("traceback on stderr")
        if "internal error" in self.stderr:
            out.append("internal error")
        if self.outside:
            out.append(f"opened files outside the model's folder: {self.outside[:3]}")
        if self.canary_opened:
            out.append("read the canary file outside the model's folder")
        return out

    def describe(self) -> str:
        return (
            f"args={self.args} exit={self.returncode} {self.seconds:.1f}s\n"
            f"stderr: {self.stderr[-2000:]!r}\nstdout tail: {self.stdout[-500:]!r}"
        )


class _Inotify:
    """Records whether anything opens or reads a file in one folder (Linux inotify through ctypes: the
    stdlib has no binding, and files opened by C libraries such as HDF5 never raise Python audit events)."""

    IN_ACCESS, IN_OPEN = 0x1, 0x20

    def __init__(self, folder: str) -> None:
        self.libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0 or self.libc.inotify_add_watch(self.fd, folder.encode(), self.IN_ACCESS | self.IN_OPEN) < 0:
            raise OSError(ctypes.get_errno(), "inotify unavailable")

    def events(self) -> int:
        count = 0
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return count
            offset = 0
            while offset < len(data):
                _, _, _, length = struct.unpack_from("iIII", data, offset)
                offset += 16 + length
                count += 1

    def close(self) -> None:
        os.close(self.fd)


class Workspace:
    """A fresh folder per example: ``model/`` holds the inputs, ``outside/`` a canary the inputs may point at."""

    def __init__(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="bncheck-fuzz-")
        self.root = Path(self._tmp.name)
        self.model_dir = self.root / "model"
        self.outside = self.root / "outside"
        self.model_dir.mkdir()
        self.outside.mkdir()
        self.keras_home = self.root / "keras_home"  # Keras reads (and may write) its keras.json here
        self.canary = self.outside / "secret.bin"
        # floats 12345.0: statistics computed from these bytes are recognisable in a report
        self.canary.write_bytes(struct.pack("<f", 12345.0) * 4096)

    def __enter__(self) -> Workspace:
        return self

    def __exit__(self, *exc: object) -> None:
        self._tmp.cleanup()


#: runs forked from a fork server that has imported bncheck and its libraries (see _audited_main.run_forked)
#: instead of a new interpreter each: the long profile's default (BNCHECK_FUZZ_FORK=0 turns it off)
FORK = os.environ.get("BNCHECK_FUZZ_FORK", "1" if os.environ.get("BNCHECK_FUZZ") == "long" else "0") == "1"


@functools.cache
def _fork_context() -> Any:
    import multiprocessing

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(
        [
            "tests.fuzz._audited_main",
            "bncheck.cli",
            "bncheck.engine",
            "numpy",
            "onnx",
            "onnxruntime",
            "h5py",
            "rich.console",
        ]
    )
    return context


class _Forked:
    """A forked run with the parts of subprocess.Popen that :func:`finish` uses."""

    def __init__(self, target_args: tuple) -> None:
        from tests.fuzz._audited_main import run_forked

        self.out_path, self.err_path = target_args[4], target_args[5]
        self.process = _fork_context().Process(target=run_forked, args=target_args, daemon=True)
        self.process.start()
        self.returncode: int | None = None

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.process.join(timeout)
        if self.process.is_alive():
            raise subprocess.TimeoutExpired("bncheck", timeout or 0)
        self.returncode = self.process.exitcode
        texts = []
        for path in (self.out_path, self.err_path):
            with open(path, encoding="utf-8", errors="replace") as handle:
                texts.append(handle.read())
        return texts[0], texts[1]

    def kill(self) -> None:
        self.process.kill()
        self.process.join()


def start(ws: Workspace, args: list[str], env: dict[str, str] | None = None) -> tuple[Any, dict]:
    """Start one audited bncheck run in ``ws`` (cwd: the model folder); :func:`finish` collects it."""
    log = tempfile.NamedTemporaryFile(prefix="audit-", suffix=".json", dir=ws.root, delete=False)
    log.close()
    allowed = [str(ws.keras_home), *SYSTEM_DIRS]
    run_env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "HYPOTHESIS"))}
    run_env.update(
        {
            "BNCHECK_FUZZ_RLIMIT_AS": str(MEMORY_LIMIT),
            "PYTHONPATH": str(REPO),
            "PYTHONDONTWRITEBYTECODE": "1",
            "TMPDIR": str(ws.model_dir),
            "KERAS_HOME": str(ws.keras_home),
            "COLUMNS": "100",
        }
    )
    run_env.update(env or {})
    watch = _Inotify(str(ws.outside))
    if FORK:
        out = tempfile.NamedTemporaryFile(prefix="out-", dir=ws.root, delete=False)
        err = tempfile.NamedTemporaryFile(prefix="err-", dir=ws.root, delete=False)
        out.close()
        err.close()
        forked = _Forked((args, log.name, str(ws.model_dir), allowed, out.name, err.name, run_env))
        return forked, {"args": args, "log": log.name, "watch": watch, "start": time.monotonic()}
    process = subprocess.Popen(
        [sys.executable, str(HERE / "_audited_main.py"), log.name, str(ws.model_dir), json.dumps(allowed), "--", *args],
        cwd=ws.model_dir,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=run_env,
        text=True,
        errors="replace",
    )
    return process, {"args": args, "log": log.name, "watch": watch, "start": time.monotonic()}


def finish(process: Any, state: dict, timeout: float = TIMEOUT) -> Run:
    timed_out = False
    remaining = max(0.1, timeout - (time.monotonic() - state["start"]))
    try:
        stdout, stderr = process.communicate(timeout=remaining)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        timed_out = True
    seconds = time.monotonic() - state["start"]
    watch: _Inotify = state["watch"]
    canary = watch.events() > 0
    watch.close()
    try:
        outside = json.loads(Path(state["log"]).read_text() or "[]")
    except (OSError, ValueError):
        outside = []
    os.unlink(state["log"])
    return Run(
        state["args"], None if timed_out else process.returncode, stdout, stderr, seconds, outside, canary, timed_out
    )


def run(ws: Workspace, args: list[str], env: dict[str, str] | None = None, timeout: float = TIMEOUT) -> Run:
    process, state = start(ws, args, env)
    return finish(process, state, timeout)


def run_many(ws: Workspace, commands: list[list[str]], timeout: float = TIMEOUT) -> list[Run]:
    """Run several commands on the same workspace at once (two cores: inspect and probe side by side)."""
    return run_many_workspaces([(ws, args) for args in commands], timeout)


def run_many_workspaces(jobs: list[tuple[Workspace, list[str]]], timeout: float = TIMEOUT) -> list[Run]:
    started = [start(ws, args) for ws, args in jobs]
    return [finish(p, s, timeout) for p, s in started]
