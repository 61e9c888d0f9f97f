"""The memory watch of bncheck's own process (bncheck.watchdog): a check whose memory grows past 1.8 times the budget,
though the estimate before the run fit, ends with exit 2 and the one-line error instead of the kernel's
out-of-memory kill. Real console processes, a real model, real onnxruntime."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import bncheck

CHAIN = 8


def _long_lived(path: Path) -> str:
    """x[N,16,64,64] -> BN -> a1..a8 (a chain of Sigmoids) -> s = a8 + a7 + ... + a0, added back in reverse:
    every a_i stays alive until its late Add, so onnxruntime holds about ten activations at once while no node
    reads and writes more than three (the memory check's lower bound): at batch 256, 0.2 GB estimated and
    0.75 GB grown."""
    inits = [
        numpy_helper.from_array(np.ones(16, np.float32), "scale"),
        numpy_helper.from_array(np.zeros(16, np.float32), "bias"),
        numpy_helper.from_array(np.full(16, 0.1, np.float32), "mean"),
        numpy_helper.from_array(np.full(16, 0.5, np.float32), "var"),
    ]
    nodes = [helper.make_node("BatchNormalization", ["x", "scale", "bias", "mean", "var"], ["a0"], name="bn")]
    nodes += [helper.make_node("Sigmoid", [f"a{i - 1}"], [f"a{i}"], name=f"act{i}") for i in range(1, CHAIN + 1)]
    previous = f"a{CHAIN}"
    for i in range(CHAIN - 1, -1, -1):
        nodes.append(helper.make_node("Add", [previous, f"a{i}"], [f"s{i}"], name=f"add{i}"))
        previous = f"s{i}"
    graph = helper.make_graph(
        nodes,
        "long_lived",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16, 64, 64])],
        [helper.make_tensor_value_info(previous, TensorProto.FLOAT, ["N", 16, 64, 64])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return str(path)


def _console(tmp_path: Path, budget: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m bncheck ARGS`` as its own process (the console enables the watch), under ``budget``, its
    scratch folders in ``tmp_path``."""
    env = {**os.environ, "BNCHECK_MEMORY_BUDGET": budget, "TMPDIR": str(tmp_path)}
    return subprocess.run(
        [sys.executable, "-m", "bncheck", *args], capture_output=True, text=True, env=env, timeout=120, check=False
    )


def _scratch_left(tmp_path: Path) -> list[str]:
    return [p.name for p in tmp_path.iterdir() if p.name.startswith("bncheck-probe-")]


def test_a_check_that_grows_past_1_8_budgets_is_stopped_with_exit_2_and_one_line(tmp_path: Path) -> None:
    model = _long_lived(tmp_path / "long_lived.onnx")
    done = _console(tmp_path, "250MB", "probe", model, "--batch-sizes", "1,2,256")
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "stopped while checking it" in lines[0] and "1.8 times the memory budget of 250 MB" in lines[0], lines[0]
    assert "--batch-sizes" in lines[0] and "BNCHECK_MEMORY_BUDGET" in lines[0]
    assert _scratch_left(tmp_path) == []  # the probe's scratch folder removed before the stop


def test_a_stopped_check_gives_the_json_error_document(tmp_path: Path) -> None:
    model = _long_lived(tmp_path / "long_lived.onnx")
    done = _console(tmp_path, "250MB", "probe", model, "--batch-sizes", "1,2,256", "--format", "json")
    assert done.returncode == 2, done.stderr
    document = json.loads(done.stdout)
    assert document["exit_code"] == 2 and document["error"]["kind"] == "runtime"
    assert "stopped while checking it" in document["error"]["message"]


def test_the_same_check_within_twice_the_budget_runs(tmp_path: Path) -> None:
    model = _long_lived(tmp_path / "long_lived.onnx")
    done = _console(tmp_path, "500MB", "probe", model, "--batch-sizes", "1,2,256", "--format", "json")
    assert done.returncode in (0, 1), done.stderr
    assert json.loads(done.stdout)["probe"]["batch_sizes"] == [1, 2, 256]


def test_the_python_api_is_never_stopped(tmp_path: Path, monkeypatch) -> None:
    """Only the console's own process is watched: a library call must not end its caller's process."""
    model = _long_lived(tmp_path / "long_lived.onnx")
    monkeypatch.setenv("BNCHECK_MEMORY_BUDGET", "250MB")
    result = bncheck.probe(model, batch_sizes=[1, 2, 256])
    assert result.exit_code in (0, 1)


def test_a_check_spawned_by_a_large_process_is_stopped_too(tmp_path: Path) -> None:
    """Linux carries a process's peak resident memory over an exec: a console spawned by a parent holding
    700 MB starts with that peak, which must not hide its own growth (a CI script, or this test suite)."""
    model = _long_lived(tmp_path / "long_lived.onnx")
    ballast = np.ones(700 * 2**20 // 8)  # touched: resident in this process when the console is spawned
    done = _console(tmp_path, "250MB", "probe", model, "--batch-sizes", "1,2,256")
    assert ballast.sum() > 0
    assert done.returncode == 2, done.stderr
    assert "stopped while checking it" in done.stderr


def test_a_fix_whose_calibration_grows_past_the_ceiling_is_stopped_too(tmp_path: Path) -> None:
    """`fix --data` runs the model over the data at --batch-size: watched as a probe is."""
    model = _long_lived(tmp_path / "long_lived.onnx")
    data = tmp_path / "calibration.npy"
    np.save(data, np.random.default_rng(0).standard_normal((256, 16, 64, 64)).astype(np.float32))
    args = ["fix", model, "--data", str(data), "--batch-size", "256", "--dry-run"]
    done = _console(tmp_path, "250MB", *args)
    assert done.returncode == 2, done.stderr
    assert "stopped while checking it" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert _console(tmp_path, "600MB", *args).returncode in (0, 1)
