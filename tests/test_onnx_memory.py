"""The memory check before onnxruntime runs a batch (bncheck.backends.onnx.memory): a lower bound from the
static shapes, compared with the budget before any session is built. Real models, real CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from bncheck.backends.base import ProbeSettings
from bncheck.backends.onnx import OnnxBackend
from bncheck.backends.onnx.memory import estimate
from bncheck.cli import main
from bncheck.probe_data import probe_feeds
from tests.budget_cases import UNDRAWN_PEAK, check_fix_calibration_batch, refusal

F32 = TensorProto.FLOAT


def _wide_conv(path: Path, hw: int = 224, stale: bool = False, batch: int | str = "N", open_hw: bool = False) -> str:
    """x[N,3,hw,hw] -> Conv 3x3 (64 channels, full resolution) -> BN -> Relu -> GlobalAveragePool; ``stale``:
    the BN's moving statistics never updated (mean 0, variance 1), which `fix --data` recomputes; an int
    ``batch`` fixes the batch dim in the file (as torch.onnx.export without dynamic axes writes it);
    ``open_hw``: height and width declared symbolic (x[N,3,H,W], as paddle2onnx writes detectors)."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array((rng.standard_normal((64, 3, 3, 3)) * 0.1).astype(np.float32), "w"),
        numpy_helper.from_array(np.ones(64, np.float32), "scale"),
        numpy_helper.from_array(np.zeros(64, np.float32), "bias"),
        numpy_helper.from_array(np.full(64, 0.0 if stale else 0.1, np.float32), "mean"),
        numpy_helper.from_array(np.full(64, 1.0 if stale else 0.5, np.float32), "var"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["b"], name="bn"),
        helper.make_node("Relu", ["b"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["y"], name="pool"),
    ]
    x = helper.make_tensor_value_info("x", F32, [batch, 3, "H", "W"] if open_hw else [batch, 3, hw, hw])
    return _write(path, nodes, inits, x, helper.make_tensor_value_info("y", F32, [batch, 64, 1, 1]))


def _write(path: Path, nodes: list, inits: list, x: Any, y: Any) -> str:
    """The graph of ``nodes`` with input ``x`` and output ``y`` (value infos), opset 15, checked by
    onnx.checker, saved at ``path``."""
    graph = helper.make_graph(nodes, path.stem, [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return str(path)


def _save(path: Path, nodes: list, inits: list, x: tuple[str, list[int]], y: tuple[str, list[int]]) -> str:
    """One input and one output, both [N, *dims] float; checked by onnx.checker, saved."""
    return _write(
        path,
        nodes,
        inits,
        helper.make_tensor_value_info(x[0], F32, ["N", *x[1]]),
        helper.make_tensor_value_info(y[0], F32, ["N", *y[1]]),
    )


def _mixed(path: Path) -> str:
    """x[N,3,8,8] -> Pad 1 -> Conv 3x3 (4 ch) -> c; Relu(c) -> r; Concat(r, c) -> k[N,8,8,8]."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array((rng.standard_normal((4, 3, 3, 3)) * 0.1).astype(np.float32), "w"),
        numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads"),
    ]
    nodes = [
        helper.make_node("Pad", ["x", "pads"], ["p"], name="pad"),
        helper.make_node("Conv", ["p", "w"], ["c"], name="conv"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Concat", ["r", "c"], ["k"], name="concat", axis=1),
    ]
    return _save(path, nodes, inits, ("x", [3, 8, 8]), ("k", [8, 8, 8]))


def test_estimate_of_a_known_graph_equals_the_hand_computed_bytes(tmp_path: Path) -> None:
    view = OnnxBackend().load(_mixed(tmp_path / "m.onnx"))
    handle = view.handle
    feeds = probe_feeds(view.inputs, 5, {})
    assert feeds == {"x": (5, 3, 8, 8)}
    found = estimate(handle.model.graph, handle.value_shapes, handle.value_types, feeds)
    # inputs: 5*3*8*8 floats. Busiest node: Concat reads r and c and writes k (never in place):
    # 5*4*64 + 5*4*64 + 5*8*64 floats. The Pad writes 5*3*10*10 (fewer bytes); the Conv reads the Pad's
    # input (a graph input, counted once) and writes c; Relu may run in place (max, not sum).
    assert found.inputs == 5 * 3 * 64 * 4
    assert found.node_bytes == (5 * 4 * 64 + 5 * 4 * 64 + 5 * 8 * 64) * 4
    assert found.node == "'concat' (Concat)"
    assert found.total == 5 * 3 * 64 * 4 + 5 * 16 * 64 * 4


def _bottleneck(path: Path) -> str:
    """x[N,8,8,8] -> Relu -> a; a -> Conv 1x1 (2 ch) -> s -> Conv 1x1 (8 ch) -> c -> BN -> e; Add(e, a) -> y."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array((rng.standard_normal((2, 8, 1, 1)) * 0.1).astype(np.float32), "w1"),
        numpy_helper.from_array((rng.standard_normal((8, 2, 1, 1)) * 0.1).astype(np.float32), "w2"),
        *(
            numpy_helper.from_array(np.full(8, v, np.float32), n)
            for n, v in (("g", 1), ("b", 0), ("m", 0.1), ("v", 0.5))
        ),
    ]
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="relu"),
        helper.make_node("Conv", ["a", "w1"], ["s"], name="reduce"),
        helper.make_node("Conv", ["s", "w2"], ["c"], name="expand"),
        helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["e"], name="bn"),
        helper.make_node("Add", ["e", "a"], ["y"], name="add"),
    ]
    return _save(path, nodes, inits, ("x", [8, 8, 8]), ("y", [8, 8, 8]))


def test_estimate_skips_the_conv_output_that_conv_add_fusion_never_materializes(tmp_path: Path) -> None:
    view = OnnxBackend().load(_bottleneck(tmp_path / "m.onnx"))
    handle = view.handle
    found = estimate(handle.model.graph, handle.value_shapes, handle.value_types, probe_feeds(view.inputs, 3, {}))
    full = 3 * 8 * 64 * 4  # one [3,8,8,8] float tensor
    # onnxruntime folds the BN into "expand" and adds into a: e never exists, so the Add holds a and y (one
    # buffer when in place), not e + a (2 * full). The busiest node is then "reduce": a + s.
    assert found.node == "'reduce' (Conv)"
    assert found.node_bytes == full + full // 4
    assert found.total == 2 * full + full // 4


def test_huge_batch_is_refused_with_the_estimate_before_any_session(tmp_path: Path, monkeypatch) -> None:
    model = _wide_conv(tmp_path / "wide.onnx")
    line, peak = refusal(monkeypatch, "4GB", ["probe", model, "--batch-sizes", "1,2,4096"])
    # 4096 * (3 + 64) * 224 * 224 floats: the inputs plus the Conv's output
    expected = 4096 * (3 + 64) * 224 * 224 * 4
    assert f"{expected / 1e9:.3g} GB" in line, line
    assert "batch size 4096" in line and "--batch-sizes" in line and "BNCHECK_MEMORY_BUDGET" in line
    assert "4 GB" in line
    # the refusal comes before the inputs are drawn (2.5 GB)
    assert peak < UNDRAWN_PEAK, peak


def test_a_refusal_just_over_the_budget_shows_two_different_sizes(tmp_path: Path, monkeypatch) -> None:
    """Need and budget 0.01% apart: at three figures both read 55.1 GB, so the message gives more figures
    until the need reads larger than the budget."""
    model = _wide_conv(tmp_path / "wide.onnx")
    need = 4096 * (3 + 64) * 224 * 224 * 4
    line, _ = refusal(monkeypatch, str(need - need // 10000), ["probe", model, "--batch-sizes", "1,4096"])
    assert f"needs at least {need / 1e9:.4g} GB" in line, line
    assert f"memory budget of {(need - need // 10000) / 1e9:.4g} GB" in line, line


@pytest.mark.parametrize("sizes", ["1,4096", "1,2,4096"])
def test_huge_batch_of_a_fixed_batch_model_is_refused_before_its_relaxation_is_proven(
    tmp_path: Path, monkeypatch, sizes: str
) -> None:
    """A file that fixes its batch to 1 is relaxed for the other sizes, and the relaxation is proven by runs
    of the copy at the smallest other size: 4096 at "1,4096". The memory check comes before those runs
    (and before their inputs are drawn: 2.5 GB), not after them."""
    model = _wide_conv(tmp_path / "wide.onnx", batch=1)
    line, peak = refusal(monkeypatch, "4GB", ["probe", model, "--batch-sizes", sizes])
    expected = 4096 * (3 + 64) * 224 * 224 * 4
    assert f"{expected / 1e9:.3g} GB" in line and "batch size 4096" in line, line
    assert peak < UNDRAWN_PEAK, peak


def test_a_fixed_batch_above_the_requested_sizes_is_checked_before_the_proof_runs_it(
    tmp_path: Path, monkeypatch
) -> None:
    """--batch-sizes 1,2 on a file that fixes its batch to 1024: the proof of the relaxed copy runs the file's
    own size first, so the check covers 1024, not only the largest requested size."""
    model = _wide_conv(tmp_path / "wide.onnx", batch=1024)
    line, peak = refusal(monkeypatch, "4GB", ["probe", model, "--batch-sizes", "1,2"])
    expected = 1024 * (3 + 64) * 224 * 224 * 4
    assert f"{expected / 1e9:.3g} GB" in line and "batch size 1024" in line, line
    assert peak < UNDRAWN_PEAK, peak  # the proof's run at 1024 would draw 0.6 GB of inputs


def test_open_height_and_width_are_sized_from_the_input_shape_before_the_check(tmp_path: Path, monkeypatch) -> None:
    """With H and W symbolic, onnx's inference leaves every Conv output's H and W unnamed, so the bound held
    the inputs alone (38.5 MB at batch 64) and the probe ran 1.7 GB past a 500 MB budget. Inferred with the
    inputs concrete, the bound has the Conv's output too, and refuses."""
    model = _wide_conv(tmp_path / "open.onnx", open_hw=True)
    args = ["probe", model, "--input-shape", "x:3x224x224", "--batch-sizes", "1,2,64"]
    line, _ = refusal(monkeypatch, "500MB", args)
    expected = 64 * (3 + 64) * 224 * 224 * 4  # the inputs plus the Conv's output
    assert f"needs at least {expected / 1e6:.3g} MB" in line and "at node 'conv' (Conv)" in line, line
    fits = CliRunner().invoke(main, [*args[:-1], "1,2,4"])
    assert fits.exit_code in (0, 1), fits.output


def _computed_reshape(path: Path) -> str:
    """x[N,3,224,224] -> Reshape to [3N,1,224,224], its target computed from Shape(x) (Gather, Mul, Concat:
    how jax2tf and tf2onnx write a reshape by the batch) -> Conv 3x3 (64 channels) -> BN -> GlobalAveragePool.
    onnx's symbolic inference leaves the Reshape's first dim unnamed, so the Conv's output has no size until
    the batch is known."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(np.array([0], np.int64), "zero"),
        numpy_helper.from_array(np.array([3], np.int64), "three"),
        numpy_helper.from_array(np.array([1, 224, 224], np.int64), "rest"),
        numpy_helper.from_array((rng.standard_normal((64, 1, 3, 3)) * 0.1).astype(np.float32), "w"),
        numpy_helper.from_array(np.ones(64, np.float32), "scale"),
        numpy_helper.from_array(np.zeros(64, np.float32), "bias"),
        numpy_helper.from_array(np.full(64, 0.1, np.float32), "mean"),
        numpy_helper.from_array(np.full(64, 0.5, np.float32), "var"),
    ]
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"], name="shape"),
        helper.make_node("Gather", ["shape", "zero"], ["n"], name="batch", axis=0),
        helper.make_node("Mul", ["n", "three"], ["planes_n"], name="times3"),
        helper.make_node("Concat", ["planes_n", "rest"], ["target"], name="target", axis=0),
        helper.make_node("Reshape", ["x", "target"], ["planes"], name="planes"),
        helper.make_node("Conv", ["planes", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["b"], name="bn"),
        helper.make_node("GlobalAveragePool", ["b"], ["y"], name="pool"),
    ]
    x = helper.make_tensor_value_info("x", F32, ["N", 3, 224, 224])
    return _write(path, nodes, inits, x, helper.make_tensor_value_info("y", F32, [None, 64, 1, 1]))


def test_a_tensor_sized_only_once_the_batch_is_known_counts_in_the_check(tmp_path: Path, monkeypatch) -> None:
    """Only the batch is open in the file, but the Conv's output has no size in onnx's symbolic inference: the
    bound used to count it 0 and the probe ran a 636 MB batch under a 300 MB budget (basic-pitch's shipped
    model: 0.7 GB counted at batch 4096, killed by the kernel at over 20 GB). Inferred with the batch known,
    the bound has the Conv's output, and refuses before any session; batch 2 still runs."""
    model = _computed_reshape(tmp_path / "reshaped.onnx")
    line, _ = refusal(monkeypatch, "300MB", ["probe", model, "--batch-sizes", "1,2,16"])
    # the inputs, plus what the Conv reads (the reshaped planes, as large) and writes
    expected = 2 * 16 * 3 * 224 * 224 * 4 + 16 * 3 * 64 * 224 * 224 * 4
    assert f"needs at least {expected / 1e6:.3g} MB" in line and "at node 'conv' (Conv)" in line, line
    fits = CliRunner().invoke(main, ["probe", model, "--batch-sizes", "1,2", "--format", "json"])
    assert fits.exit_code in (0, 1), fits.output
    assert '"findings"' in fits.stdout


def test_same_model_at_a_batch_that_fits_runs(tmp_path: Path, monkeypatch) -> None:
    model = _wide_conv(tmp_path / "wide.onnx")
    monkeypatch.setenv("BNCHECK_MEMORY_BUDGET", "4GB")
    result = CliRunner().invoke(main, ["probe", model, "--batch-sizes", "1,2,32", "--format", "json"])
    assert result.exit_code in (0, 1), result.stderr
    assert '"findings"' in result.stdout


@pytest.mark.parametrize("open_hw", [False, True])
@pytest.mark.parametrize("batch", [1, 4096])
def test_fix_calibration_batch_is_checked_too(tmp_path: Path, monkeypatch, batch: int, open_hw: bool) -> None:
    """`fix --data` recomputing stale statistics from 64 samples of 3x64x64: at --batch-size 1 it runs; at
    4096 (all 64 samples in one batch: 64 * 67 * 64 * 64 floats, 70 MB) the calibration batch is refused
    under a 50 MB budget, in which the probe of the original at 1, 2, 32 (35 MB) still runs; also when the
    model declares H and W symbolic (sized from the data)."""
    model = _wide_conv(tmp_path / "wide.onnx", hw=64, stale=True, open_hw=open_hw)
    check_fix_calibration_batch(tmp_path, monkeypatch, model, (3, 64, 64), "50MB", batch, "batch size 64")


def _wide_mlp(path: Path) -> str:
    """x[N,1024] -> MatMul 1024x1024 (4 MB of weights) -> BatchNormalization -> y: activations are tiny."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal((1024, 1024)) * 0.03).astype(np.float32), "w")]
    inits += [
        numpy_helper.from_array(np.full(1024, v, np.float32), n) for n, v in (("g", 1), ("b", 0), ("m", 0), ("v", 1))
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="dense"),
        helper.make_node("BatchNormalization", ["h", "g", "b", "m", "v"], ["y"], name="bn"),
    ]
    return _save(path, nodes, inits, ("x", [1024]), ("y", [1024]))


def test_the_statistics_first_session_is_skipped_only_for_large_weights_with_small_activations(tmp_path: Path):
    from bncheck.backends.onnx.run import REORDER_WEIGHTS_FLOOR, worth_reordering

    estimates = {}
    for build in (_wide_mlp, _bottleneck):
        view = OnnxBackend().load(build(tmp_path / f"{build.__name__}.onnx"))
        handle = view.handle
        found = estimate(handle.model.graph, handle.value_shapes, handle.value_types, probe_feeds(view.inputs, 32, {}))
        estimates[build.__name__] = found.node_bytes
        # small weights: always used, whatever the estimate; the probe runs and measures the layer
        assert worth_reordering(found.node_bytes, handle.size_bytes)
        assert OnnxBackend().probe(view, ProbeSettings(batch_sizes=(1, 2, 32), all_layers=True))[0].at(32, "bn")
    big = REORDER_WEIGHTS_FLOOR * 10  # the same activations next to 2.6 GB of weights (bench_large's MLP)
    assert not worth_reordering(estimates["_wide_mlp"], big)  # 256 kB against 2.6 GB: not worth it
    assert worth_reordering(estimates["_wide_mlp"] * 10**5, big)
    assert worth_reordering(None, big)  # unknown activations: the default path
