"""Models with onnxruntime-extensions' custom ops (the ai.onnx.contrib domain: tokenizers, audio and image
pre-processing): probed, fixed and re-checked with that library registered; without the package, the refusal
names it. Real models, real onnxruntime and onnxruntime-extensions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from bncheck.cli import main

CHANNELS = 4


def _contrib_model(path: Path, *, train: bool = False, moving: tuple[float, float] = (0.05, 1.1)) -> str:
    """x[N,4,3,3] -> BatchNormalization -> ai.onnx.contrib NegPos (the negative and positive parts) -> pos - neg
    (|h|) -> y; ``train``: the BN in training mode (batch statistics at inference); ``moving``: its stored
    mean and variance."""
    rng = np.random.default_rng(0)
    mean, var = moving
    inits = [
        numpy_helper.from_array(rng.uniform(0.5, 1.5, CHANNELS).astype(np.float32), "g"),
        numpy_helper.from_array(rng.uniform(0.2, 0.4, CHANNELS).astype(np.float32), "b"),
        numpy_helper.from_array(np.full(CHANNELS, mean, np.float32), "m"),
        numpy_helper.from_array(np.full(CHANNELS, var, np.float32), "v"),
    ]
    outputs = ["h", "rm", "rv"] if train else ["h"]
    nodes = [
        helper.make_node("BatchNormalization", ["x", "g", "b", "m", "v"], outputs, name="bn", training_mode=int(train)),
        helper.make_node("NegPos", ["h"], ["neg", "pos"], domain="ai.onnx.contrib", name="negpos"),
        helper.make_node("Sub", ["pos", "neg"], ["y"], name="magnitude"),
    ]
    graph = helper.make_graph(
        nodes,
        "contrib",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", CHANNELS, 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", CHANNELS, 3, 3])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 15), helper.make_opsetid("ai.onnx.contrib", 1)]
    )
    onnx.save(model, path)
    return str(path)


def _text_model(path: Path) -> str:
    """texts[N] (strings) -> ai.onnx.contrib StringLength -> float [N, 1] * w[1, 4] -> BatchNormalization in
    training mode -> y[N, 4]: a sample's output depends on the lengths of its companions."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(np.array([0], np.int64), "axis"),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, (1, CHANNELS)).astype(np.float32), "w"),
        numpy_helper.from_array(np.ones(CHANNELS, np.float32), "g"),
        numpy_helper.from_array(np.zeros(CHANNELS, np.float32), "b"),
        numpy_helper.from_array(np.full(CHANNELS, 40.0, np.float32), "m"),
        numpy_helper.from_array(np.full(CHANNELS, 100.0, np.float32), "v"),
    ]
    nodes = [
        helper.make_node("StringLength", ["texts"], ["length"], domain="ai.onnx.contrib", name="length"),
        helper.make_node("Cast", ["length"], ["n"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["n", "axis"], ["column"]),
        helper.make_node("MatMul", ["column", "w"], ["h"], name="dense"),
        helper.make_node(
            "BatchNormalization", ["h", "g", "b", "m", "v"], ["y", "rm", "rv"], name="bn", training_mode=1
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "text",
        [helper.make_tensor_value_info("texts", TensorProto.STRING, ["N"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", CHANNELS])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 15), helper.make_opsetid("ai.onnx.contrib", 1)]
    )
    onnx.save(model, path)
    return str(path)


def _findings(result) -> list[tuple[str, str, str]]:
    return [(f["code"], f["severity"], f["layer"]) for f in json.loads(result.stdout)["findings"]]


def test_a_train_mode_layer_beside_extensions_ops_is_found_by_the_probe(tmp_path: Path) -> None:
    model = _contrib_model(tmp_path / "train.onnx", train=True)
    result = CliRunner().invoke(main, ["probe", model, "--format", "json"])
    assert result.exit_code == 1, result.output
    assert ("BN002", "error", "bn") in _findings(result)


def test_fix_switches_the_layer_and_its_written_model_runs_with_the_extensions_ops(tmp_path: Path) -> None:
    model = _contrib_model(tmp_path / "train.onnx", train=True)
    fixed = tmp_path / "fixed.onnx"
    result = CliRunner().invoke(main, ["fix", model, "-o", str(fixed), "--format", "json"])
    assert result.exit_code == 0, result.output
    after = CliRunner().invoke(main, ["probe", str(fixed), "--format", "json"])
    assert after.exit_code == 0 and _findings(after) == [], after.output


def test_a_drift_beside_extensions_ops_is_measured_on_the_outputs(tmp_path: Path) -> None:
    """Stored statistics (mean 5, variance 0.01) far from the data's N(0, 1): BN003 with its effect on y, which
    runs the stored model's own session (opened by its path) with the library registered."""
    model = _contrib_model(tmp_path / "drift.onnx", moving=(5.0, 0.01))
    data = tmp_path / "d.npy"
    np.save(data, np.random.default_rng(1).standard_normal((64, CHANNELS, 3, 3)).astype(np.float32))
    result = CliRunner().invoke(main, ["probe", model, "--data", str(data), "--format", "json"])
    assert result.exit_code == 1, result.output
    (finding,) = [f for f in json.loads(result.stdout)["findings"] if f["code"] == "BN003"]
    assert finding["evidence"]["kind"] == "drift"
    assert finding["evidence"]["output_effect"]["outputs"]["y"]["shift_sd"] > 1, finding["evidence"]


def test_without_onnxruntime_extensions_the_refusal_names_the_package(tmp_path: Path) -> None:
    """The package made unimportable in a child process (None in sys.modules is how Python marks a module
    absent): exit 2, one line naming onnxruntime-extensions."""
    model = _contrib_model(tmp_path / "train.onnx", train=True)
    code = (
        "import sys; sys.modules['onnxruntime_extensions'] = None; "
        "from bncheck.cli import console; sys.argv = ['bncheck', 'probe', sys.argv[1]]; console()"
    )
    done = subprocess.run([sys.executable, "-c", code, model], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert "ai.onnx.contrib" in line and "pip install onnxruntime-extensions" in line, line


def test_a_string_input_is_fed_made_up_sentences(tmp_path: Path) -> None:
    """No --data: the probe draws sentences for the string input, runs the graph's StringLength and finds the
    train-mode layer after it."""
    model = _text_model(tmp_path / "text.onnx")
    result = CliRunner().invoke(main, ["probe", model, "--format", "json"])
    assert result.exit_code == 1, result.output
    assert ("BN002", "error", "bn") in _findings(result)


def test_text_data_saved_as_a_unicode_array_feeds_a_string_input(tmp_path: Path) -> None:
    """--data: numpy's unicode array (np.save of a list of str, no pickle) feeds the string input; a float
    array for it is refused in one line naming the input."""
    model = _text_model(tmp_path / "text.onnx")
    texts = tmp_path / "texts.npy"
    np.save(texts, np.array([("word " * (1 + i % 7)).strip() for i in range(40)]))
    result = CliRunner().invoke(main, ["probe", model, "--data", str(texts), "--format", "json"])
    assert result.exit_code == 1, result.output
    assert json.loads(result.stdout)["settings"]["data_source"] == str(texts)
    assert ("BN002", "error", "bn") in _findings(result)
    floats = tmp_path / "floats.npy"
    np.save(floats, np.zeros(40, np.float32))
    refused = CliRunner().invoke(main, ["probe", model, "--data", str(floats)])
    assert refused.exit_code == 2
    assert "input 'texts' takes strings" in refused.stderr, refused.stderr
