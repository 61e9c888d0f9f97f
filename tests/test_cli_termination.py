"""SIGTERM (a CI job's timeout, ``kill``) and Ctrl-C: the process stops a running onnxruntime call, removes its
scratch folders and stops its workers, then ends as killed by the signal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


def _train_mode_chain(path: Path, layers: int = 200, channels: int = 8, hw: int = 16) -> str:
    """x -> (train-mode BatchNormalization -> Relu) x layers: its decomposed session takes long enough to build
    (about a second) for a signal to arrive while the probe's scratch folder exists."""
    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i in range(layers):
        for role, low, high in (("s", 0.5, 1.5), ("b", -0.5, 0.5), ("m", 0.1, 0.3), ("v", 0.5, 1.5)):
            inits.append(numpy_helper.from_array(rng.uniform(low, high, channels).astype(np.float32), f"{role}{i}"))
        bn_inputs = [prev, f"s{i}", f"b{i}", f"m{i}", f"v{i}"]
        bn_outputs = [f"t{i}", f"rm{i}", f"rv{i}"]
        nodes.append(helper.make_node("BatchNormalization", bn_inputs, bn_outputs, name=f"bn{i}", training_mode=1))
        nodes.append(helper.make_node("Relu", [f"t{i}"], [f"r{i}"], name=f"relu{i}"))
        prev = f"r{i}"
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", channels, hw, hw])
    y = helper.make_tensor_value_info(prev, TensorProto.FLOAT, None)
    model = helper.make_model(
        helper.make_graph(nodes, "chain", [x], [y], inits), opset_imports=[helper.make_opsetid("", 15)]
    )
    onnx.save(model, path)
    return str(path)


def _endless(path: Path, channels: int = 4) -> str:
    """x -> BatchNormalization -> Loop of 10^12 iterations (v + 0): a run onnxruntime never finishes unless
    it is told to stop. The BN is in train mode: the probe writes its decomposed graph to a scratch folder
    (a probe that writes no file makes none), which the tests wait for."""
    dims = ["N", channels, 8, 8]
    body = helper.make_graph(
        [helper.make_node("Add", ["v_in", "zero"], ["v_out"]), helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", TensorProto.FLOAT, dims),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, dims),
        ],
        [helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])],
    )
    inits = [
        numpy_helper.from_array(np.full(channels, value, np.float32), name)
        for name, value in (("s", 1.0), ("b", 0.0), ("m", 0.0), ("v", 1.0))
    ]
    inits += [
        helper.make_tensor("trips", TensorProto.INT64, [], [10**12]),
        helper.make_tensor("go", TensorProto.BOOL, [], [True]),
    ]
    nodes = [
        helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["t"], name="bn", training_mode=1),
        helper.make_node("Loop", ["trips", "go", "t"], ["y"], body=body, name="forever"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)
    model = helper.make_model(
        helper.make_graph(nodes, "endless", [x], [y], inits), opset_imports=[helper.make_opsetid("", 17)]
    )
    onnx.save(model, path)
    return str(path)


def _cpu_seconds(pid: int) -> float:
    """User and system CPU time of process ``pid`` and its threads, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _folders(where: Path) -> list[str]:
    return sorted(n for n in os.listdir(where) if n.startswith("bncheck-"))


#: ``python -m bncheck`` as a terminal's foreground process, where Ctrl-C reaches it: a shell starts background
#: jobs (a test run among them) with SIGINT ignored, which Python, and so bncheck, then keeps ignoring
_AT_A_TERMINAL = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.executable, [sys.executable, '-m', 'bncheck', *sys.argv[1:]])"
)


def _terminated_once(
    where: Path, args: list[str], folders: int, sig: int = signal.SIGTERM, busy: float = 0.0
) -> subprocess.Popen[bytes]:
    """``python -m bncheck args`` (the console entry) with TMPDIR=where, sent ``sig`` once ``folders`` scratch
    folders exist and then each process that made one (the console, or its workers) used ``busy`` more seconds
    of CPU (inside a run that does not end); waited for, and killed if it is still there after two minutes."""
    env = {**os.environ, "TMPDIR": str(where)}
    log = where.parent / "stderr.txt"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", _AT_A_TERMINAL, *args], env=env, stdout=subprocess.DEVNULL, stderr=err
        )
    deadline = time.monotonic() + 120
    try:
        while len(_folders(where)) < folders:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "no scratch folder appeared"
            time.sleep(0.01)
        if busy:
            running = [int(name.split("-")[3]) for name in _folders(where)]  # bncheck-probe-<ns>-<pid>-...
            start = {pid: _cpu_seconds(pid) for pid in running}
            while any(_cpu_seconds(pid) < start[pid] + busy for pid in running):
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, "the processes never got busy"
                time.sleep(0.05)
    except BaseException:  # a failed wait must not leave a run that never ends behind the test
        proc.kill()
        proc.wait()
        raise
    proc.send_signal(sig)
    try:
        proc.wait(timeout=120)  # not communicate(): workers left alive would hold its pipes open
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return proc


def _workers_with(where: Path) -> list[int]:
    """Live worker processes (multiprocessing's spawn_main) whose environment names ``where`` as TMPDIR."""
    needle = f"TMPDIR={where}".encode()
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in environ.split(b"\0") and b"spawn_main" in cmdline and state != "Z":
            found.append(int(pid))
    return found


def test_sigterm_during_a_probe_removes_its_scratch_folder_and_ends_as_killed_by_it(tmp_path):
    model = _train_mode_chain(tmp_path / "chain.onnx")
    where = tmp_path / "tmp"
    where.mkdir()
    proc = _terminated_once(where, ["probe", "--format", "json", model], folders=1)
    assert proc.returncode == -signal.SIGTERM
    assert _folders(where) == []


@pytest.fixture
def parallel(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[list[str], Path]]:
    """``probe --jobs 2`` over two copies of a model (the chain, or the builder the test passes indirectly), and
    a TMPDIR of its own; workers a failing test left behind are killed after it."""
    if not os.path.isdir("/proc"):
        pytest.skip("finds the workers through /proc")
    build = getattr(request, "param", _train_mode_chain)
    first = build(tmp_path / "a.onnx")
    second = tmp_path / "b.onnx"
    second.write_bytes(Path(first).read_bytes())
    where = tmp_path / "tmp"
    where.mkdir()
    yield ["probe", "--jobs", "2", "--format", "json", first, str(second)], where
    for pid in _workers_with(where):
        os.kill(pid, signal.SIGKILL)


def test_sigterm_during_parallel_probes_stops_the_workers_and_removes_their_folders(parallel):
    args, where = parallel
    proc = _terminated_once(where, args, folders=2)
    assert proc.returncode == -signal.SIGTERM
    assert _workers_with(where) == []
    assert _folders(where) == []


def test_workers_of_a_killed_parent_end_and_remove_their_folders(parallel):
    # SIGKILL (or the kernel's OOM killer) gives the parent no chance to stop its workers: they notice it is gone
    args, where = parallel
    proc = _terminated_once(where, args, folders=2, sig=signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 30
    while (_workers_with(where) or _folders(where)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _workers_with(where) == []
    assert _folders(where) == []


def test_a_probe_killed_outright_leaves_its_folder_to_the_next_run(tmp_path):
    model = _train_mode_chain(tmp_path / "chain.onnx")
    where = tmp_path / "tmp"
    where.mkdir()
    proc = _terminated_once(where, ["probe", "--format", "json", model], folders=1, sig=signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert len(_folders(where)) == 1  # nothing runs in a process killed outright
    small = _train_mode_chain(tmp_path / "small.onnx", layers=1)
    env = {**os.environ, "TMPDIR": str(where)}
    after = subprocess.run(
        [sys.executable, "-m", "bncheck", "probe", "--format", "json", small], env=env, capture_output=True
    )
    assert after.returncode == 1, after.stderr
    assert _folders(where) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_stop_signal_ends_a_run_that_would_never_finish_and_removes_the_folder(tmp_path, sig):
    # Python runs a signal's handler only once onnxruntime's call returns: this one never would
    if not os.path.isdir("/proc"):
        pytest.skip("waits for the run through /proc")
    model = _endless(tmp_path / "endless.onnx")
    where = tmp_path / "tmp"
    where.mkdir()
    proc = _terminated_once(where, ["probe", "--format", "json", model], folders=1, sig=sig, busy=1.0)
    assert proc.returncode == -sig  # Ctrl-C too: never exit 1, which says "findings"
    assert _folders(where) == []
    if sig == signal.SIGINT:
        assert (tmp_path / "stderr.txt").read_text().strip() == "Aborted!"


@pytest.mark.parametrize("parallel", [_endless], indirect=True)
def test_sigterm_stops_the_workers_runs_so_that_they_remove_their_folders(parallel):
    # without the stop, a worker inside a run is killed after many.STOP_WAIT and its folder stays behind
    args, where = parallel
    proc = _terminated_once(where, args, folders=2, busy=1.0)
    assert proc.returncode == -signal.SIGTERM
    assert _workers_with(where) == []
    assert _folders(where) == []


def _with_scratch(code: str, tmpdir: Path) -> subprocess.CompletedProcess[str]:
    """``code`` in a fresh interpreter with ``scratch_folder`` imported and ``tmpdir`` as TMPDIR (where its
    scratch folders go)."""
    prelude = "from bncheck.backends.onnx.scratch import scratch_folder\n"
    env = dict(os.environ, TMPDIR=str(tmpdir))
    return subprocess.run(
        [sys.executable, "-c", prelude + code], env=env, capture_output=True, text=True, timeout=120, check=False
    )


def test_a_stop_that_cuts_a_clean_up_short_still_removes_the_workers_scratch_folder(tmp_path: Path) -> None:
    """A SIGTERM that lands while a model's ``finally`` removes its scratch folder (or before the probe holds
    the folder it made) cuts that removal short: the worker removes the scratch folders of its own that are
    left before it dies of the signal. Here the job makes a folder and is stopped before any removal."""
    code = (
        "from bncheck import many\n"
        "from bncheck.termination import Terminated\n"
        "def job(path):\n"
        "    print(scratch_folder(1), flush=True)\n"
        "    raise Terminated\n"
        "many._in_worker(job, None, 'model.onnx')\n"
    )
    proc = _with_scratch(code, tmp_path)
    assert proc.returncode == -signal.SIGTERM, proc.stderr
    folder = proc.stdout.strip()
    assert folder.startswith(str(tmp_path)) and os.path.basename(folder).startswith("bncheck-")
    assert not os.path.exists(folder)


def test_the_consoles_stop_path_removes_the_scratch_folders_a_signal_left(tmp_path: Path) -> None:
    """In the console's own process, Ctrl-C or SIGTERM ends in ``_stopped`` before the process dies of it:
    a scratch folder whose removal the signal cut short is removed there."""
    code = (
        "import os\n"
        "from bncheck import cli\n"
        "folder = scratch_folder(1)\n"
        "cli._stopped()\n"
        "print(folder, os.path.exists(folder))\n"
    )
    folder, exists = _with_scratch(code, tmp_path).stdout.split()
    assert folder.startswith(str(tmp_path)) and exists == "False"


_UNSTOPPABLE = """
import hashlib, os, signal, sys
from bncheck import termination, watchdog

# Ctrl-C as a terminal's process has it: a suite started in the background (`cmd &` without job control) hands
# its children SIGINT ignored, and this child then ignored the Ctrl-C under test
signal.signal(signal.SIGINT, signal.default_int_handler)
termination.unwind_on_sigterm()
termination.watch_stop_signals()
folder = sys.argv[1]
os.mkdir(folder)
watchdog.at_stop(lambda: os.rmdir(folder))
termination.before_forced_stop(watchdog.run_stop_cleanups)
print("ready", flush=True)
try:
    # minutes in OpenSSL with the GIL released, and no hook can stop it (as Keras's XLA computation of a 3D GAN)
    hashlib.pbkdf2_hmac("sha256", b"p", b"s", 2**31 - 1)
finally:
    print("unwound", flush=True)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_stop_a_native_call_keeps_from_its_handler_ends_the_process_after_the_grace(tmp_path, sig):
    # `timeout 300 bncheck probe` on flim-fit's GAN ran on for 17 minutes: the handler waits for the call to return
    from bncheck.termination import STOP_GRACE

    folder = tmp_path / "scratch"
    proc = subprocess.Popen(
        [sys.executable, "-c", _UNSTOPPABLE, str(folder)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        time.sleep(0.5)  # into the hashing: a signal between two bytecodes before it is handled at once
        sent = time.monotonic()
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=STOP_GRACE + 30)
    finally:
        proc.kill()  # a failing check must not leave the hashing running
    assert proc.returncode == 128 + sig and time.monotonic() - sent >= STOP_GRACE
    assert "unwound" not in out and not folder.exists()
    assert (
        err.strip()
        == f"bncheck: stopped by {signal.Signals(sig).name}: a call into a native library did not return within {STOP_GRACE:g} s"
    )
