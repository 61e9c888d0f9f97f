"""Loading ONNX files safely: one-line BackendErrors naming the file, external data confined to the model's
folder and refused before any byte is read, broken graphs still walked with the failure as a note."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from bncheck.backends.base import BackendError, ProbeSettings
from bncheck.backends.onnx import OnnxBackend
from bncheck.backends.onnx import load as onnx_load
from bncheck.backends.onnx.load import load_onnx
from bncheck.cli import main
from bncheck.model import Kind
from tests.builders import plain_session

F32 = TensorProto.FLOAT
C = 64  # channels: 256-byte parameters, large enough for onnx to store them externally


def bn_model(opset: int = 15) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    params = {
        "s": rng.uniform(0.5, 1.5, C),
        "b": rng.uniform(-0.5, 0.5, C),
        "m": rng.uniform(0.1, 0.3, C),
        "v": rng.uniform(0.5, 1.5, C),
    }
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in params.items()]
    node = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], name="bn")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", F32, ["N", C, 2, 2])],
        [helper.make_tensor_value_info("y", F32, ["N", C, 2, 2])],
        initializer=inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="bncheck-tests", producer_version="0.1"
    )
    model.ir_version = 8
    return model


def saved(tmp_path: Path, name: str = "model.onnx") -> Path:
    path = tmp_path / name
    onnx.save(bn_model(), str(path))
    return path


def assert_one_line_error(path, *words: str) -> str:
    with pytest.raises(BackendError) as info:
        load_onnx(str(path))
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}:")
    for word in words:
        assert word in message, message
    return message


# ---------------------------------------------------------------------------- bad files


def test_missing_file(tmp_path):
    assert_one_line_error(tmp_path / "nope.onnx", "no such file")


def test_directory(tmp_path):
    assert_one_line_error(tmp_path, "is a directory")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    assert_one_line_error(path, "empty")


def test_text_file(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("this is not a model\nbut some notes about one\n" * 20)
    assert_one_line_error(path, "text file")


def test_git_lfs_pointer(tmp_path):
    path = tmp_path / "lfs.onnx"
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    assert_one_line_error(path, "Git LFS pointer")


@pytest.mark.parametrize("seed", range(5))
def test_random_bytes(tmp_path, seed):
    path = tmp_path / "random.onnx"
    path.write_bytes(np.random.default_rng(seed).bytes(4096))
    assert_one_line_error(path, "not")


def test_not_a_protobuf(tmp_path):
    path = tmp_path / "image.onnx"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    assert_one_line_error(path, "not")


@pytest.mark.parametrize("fraction", [0.5, 0.9, 0.99])
def test_truncated_model(tmp_path, fraction):
    data = saved(tmp_path).read_bytes()
    path = tmp_path / "truncated.onnx"
    path.write_bytes(data[: int(len(data) * fraction)])
    assert_one_line_error(path, "truncated")


def test_backend_load_raises_the_same_one_line_error(tmp_path):
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    with pytest.raises(BackendError, match="empty"):
        OnnxBackend().load(str(path))


# ---------------------------------------------------------------------------- external data


def save_external(tmp_path: Path, location: str = "weights.bin") -> Path:
    path = tmp_path / "ext.onnx"
    onnx.save(
        bn_model(),
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=location,
        size_threshold=0,
    )
    return path


def set_location(path: Path, location: str) -> None:
    model = onnx.load(str(path), load_external_data=False)
    for init in model.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(model, str(path))


def load_returns_promptly(path: Path) -> str:
    """load_onnx in a thread: if it opened the FIFO target it would block; we require a quick refusal."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            load_onnx(str(path))
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=20)
    assert outcome, "load_onnx blocked: it opened the external data target"
    assert isinstance(outcome[0], BackendError)
    message = str(outcome[0])
    assert "\n" not in message and message.startswith(f"{path}:")
    return message


def test_external_data_inside_the_folder_loads(tmp_path):
    path = save_external(tmp_path)
    handle = load_onnx(str(path))
    assert handle.external_data
    assert handle.size_bytes == path.stat().st_size + (tmp_path / "weights.bin").stat().st_size
    (layer,) = OnnxBackend().load(str(path)).layers
    want = numpy_helper.to_array(bn_model().graph.initializer[3])
    np.testing.assert_array_equal(layer.var, want)


def test_external_data_in_a_subfolder_loads(tmp_path):
    path = save_external(tmp_path)
    (tmp_path / "data").mkdir()
    os.rename(tmp_path / "weights.bin", tmp_path / "data" / "weights.bin")
    set_location(path, "data/weights.bin")
    assert load_onnx(str(path)).external_data


def test_symlink_inside_the_folder_reads_its_real_file(tmp_path):
    # onnx >= 1.21's loader refuses every symlinked location; onnxruntime runs one whose real file stays in
    # the folder, and so does bncheck: it reads the real file (a link out of the folder is refused below)
    path = save_external(tmp_path)
    (tmp_path / "data").mkdir()
    os.rename(tmp_path / "weights.bin", tmp_path / "data" / "real.bin")
    os.symlink(tmp_path / "data" / "real.bin", tmp_path / "data" / "weights.bin")
    set_location(path, "data/weights.bin")
    (layer,) = OnnxBackend().load(str(path)).layers
    np.testing.assert_array_equal(layer.var, numpy_helper.to_array(bn_model().graph.initializer[3]))


def outside_fifo(tmp_path: Path) -> Path:
    outside = tmp_path / "outside"
    outside.mkdir()
    fifo = outside / "weights.bin"
    os.mkfifo(fifo)
    return fifo


def test_absolute_location_refused_before_reading(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    path = save_external(model_dir)
    fifo = outside_fifo(tmp_path)
    set_location(path, str(fifo))
    message = load_returns_promptly(path)
    assert "refused" in message and "absolute" in message


def test_dotdot_location_refused_before_reading(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    path = save_external(model_dir)
    outside_fifo(tmp_path)
    set_location(path, "../outside/weights.bin")
    message = load_returns_promptly(path)
    assert "refused" in message and "'..'" in message


def test_symlink_out_of_the_folder_refused_before_reading(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    path = save_external(model_dir)
    os.remove(model_dir / "weights.bin")
    fifo = outside_fifo(tmp_path)
    os.symlink(fifo, model_dir / "weights.bin")
    message = load_returns_promptly(path)
    assert "refused" in message and "outside the model's folder" in message


def test_fifo_inside_the_folder_refused_before_reading(tmp_path):
    path = save_external(tmp_path)
    os.remove(tmp_path / "weights.bin")
    os.mkfifo(tmp_path / "weights.bin")
    message = load_returns_promptly(path)
    assert "not a regular file" in message


def test_missing_external_file_is_named(tmp_path):
    path = save_external(tmp_path, location="params.data")
    os.remove(tmp_path / "params.data")
    assert_one_line_error(path, "missing external data file", "params.data")


def test_external_data_out_of_bounds_is_one_line(tmp_path):
    path = save_external(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"\0" * 10)  # shorter than the offsets recorded
    assert_one_line_error(path, "external data")


def _wide_external(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """x[N, 512] -> MatMul (a 2 MiB weight) -> BatchNormalization(1024) -> y, every tensor external."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(512, 1024)).astype(np.float32)
    params = [
        numpy_helper.from_array(v.astype(np.float32), n)
        for n, v in (
            ("s", rng.uniform(0.5, 1.5, 1024)),
            ("b", np.zeros(1024)),
            ("m", np.zeros(1024)),
            ("v", np.ones(1024)),
        )
    ]
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
            helper.make_node("BatchNormalization", ["h", "s", "b", "m", "v"], ["y"], name="bn"),
        ],
        "wide",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 512])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1024])],
        [numpy_helper.from_array(w, "w"), *params],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    path = tmp_path / "wide.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="weights.bin", size_threshold=0)
    return path, w


def test_load_reads_norm_parameters_but_leaves_large_weights_in_their_file(tmp_path):
    path, w = _wide_external(tmp_path)
    handle = load_onnx(str(path))
    inits = {t.name: t for t in handle.model.graph.initializer}
    assert inits["w"].data_location == TensorProto.EXTERNAL and not inits["w"].raw_data  # 2 MiB: not read
    assert all(inits[n].data_location != TensorProto.EXTERNAL for n in "sbmv")
    (layer,) = OnnxBackend().load(str(path)).layers
    assert layer.scale is not None and layer.scale.shape == (1024,)
    view = OnnxBackend().load(str(path))
    [probe] = OnnxBackend().probe(view, ProbeSettings(batch_sizes=(1, 2), all_layers=True))  # ort reads the file
    assert probe.layers[2]["bn"].output is not None


def test_large_model_path_is_checked_and_inferred_by_path(tmp_path, monkeypatch):
    # the threshold is the only thing lowered: checker and shape inference really run on the files
    monkeypatch.setattr(onnx_load, "PROTOBUF_LIMIT", 100)
    path = save_external(tmp_path)
    handle = load_onnx(str(path))
    assert handle.size_bytes > 100 and handle.notes == []
    assert handle.value_shapes["y"] == ("N", C, 2, 2)
    (layer,) = OnnxBackend().load(str(path)).layers
    assert layer.var is not None and layer.var.shape == (C,)


# ---------------------------------------------------------------------------- broken but walkable graphs


def test_checker_failure_is_a_warning_note_and_the_graph_is_walked(tmp_path):
    model = bn_model()
    model.graph.node.append(helper.make_node("NoSuchOp", ["y"], ["z"], name="bogus"))
    model.graph.output.append(helper.make_tensor_value_info("z", F32, None))
    path = tmp_path / "bad.onnx"
    onnx.save(model, str(path))
    view = OnnxBackend().load(str(path))
    assert [l.name for l in view.layers] == ["bn"]
    assert any(n.level == "warning" and "onnx.checker" in n.message for n in view.notes)


def test_the_checkers_whole_message_is_kept_where_it_breaks_lines(tmp_path):
    """onnx.checker names the misplaced node on the lines after its first (imgly's ISNet ships out of order)."""
    model = bn_model()
    model.graph.node.append(helper.make_node("Relu", ["y"], ["z"], name="late_relu"))
    model.graph.output.append(helper.make_tensor_value_info("z", F32, ["N", C, 2, 2]))
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(reversed(nodes))
    path = tmp_path / "unsorted.onnx"
    onnx.save(model, str(path))
    view = OnnxBackend().load(str(path))
    [note] = [n for n in view.notes if "onnx.checker" in n.message]
    assert "late_relu" in note.message and "\n" not in note.message  # the node, on the note's one line
    assert [l.name for l in view.layers] == ["bn"]


def test_strict_shape_inference_failure_is_a_warning_note(tmp_path):
    model = bn_model()
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("y", F32, ["N", C + 1, 2, 2]))  # wrong channels
    path = tmp_path / "bad_shape.onnx"
    onnx.save(model, str(path))
    view = OnnxBackend().load(str(path))
    assert [l.name for l in view.layers] == ["bn"]
    assert any(n.level == "warning" and "shape inference" in n.message for n in view.notes)


def test_custom_domain_op_does_not_stop_loading(tmp_path):
    model = bn_model()
    model.graph.node.append(helper.make_node("MyOp", ["y"], ["z"], name="custom", domain="com.example"))
    model.graph.output.append(helper.make_tensor_value_info("z", F32, None))
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    path = tmp_path / "custom.onnx"
    onnx.save(model, str(path))
    view = OnnxBackend().load(str(path))
    assert [(l.name, l.kind) for l in view.layers] == [("bn", Kind.BATCH)]


# ---------------------------------------------------------------------------- what the handle says


def test_model_info_and_shapes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    saved(tmp_path, "m.onnx")
    handle = load_onnx("m.onnx")
    info = handle.info
    assert info.path == "m.onnx" and handle.path == str(tmp_path / "m.onnx")
    assert info.format == "onnx" and info.opset == {"ai.onnx": 15} and info.ir_version == 8
    assert info.producer == "bncheck-tests 0.1"
    assert info.sha256 == hashlib.sha256((tmp_path / "m.onnx").read_bytes()).hexdigest()
    assert handle.value_shapes["x"] == ("N", C, 2, 2) and handle.value_shapes["y"] == ("N", C, 2, 2)
    assert handle.value_shapes["s"] == (C,) and handle.value_types["y"] == TensorProto.FLOAT
    assert not handle.external_data and handle.notes == []
    view = OnnxBackend().load("m.onnx")
    assert view.info == info and [(i.name, i.shape, i.dtype) for i in view.inputs] == [("x", ("N", C, 2, 2), "float32")]


def test_dims_onnx_invents_stay_symbolic_and_declared_names_are_kept(tmp_path):
    node = helper.make_node("NonZero", ["x"], ["nz"], name="nz")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", F32, ["batch", 3])],
        [helper.make_tensor_value_info("nz", TensorProto.INT64, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = tmp_path / "nz.onnx"
    onnx.save(model, str(path))
    handle = load_onnx(str(path))
    assert handle.value_shapes["x"] == ("batch", 3)
    assert handle.value_shapes["nz"][0] == 2 and handle.value_shapes["nz"][1].startswith("unk__")


@pytest.mark.parametrize("level", ["ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL"])
def test_shapes_pass_the_convolutions_onnxruntime_fused_so_inspect_sees_a_collapse(tmp_path: Path, level: str) -> None:
    """A model saved by onnxruntime's optimizer (SessionOptions.optimized_model_filepath): its convolutions are
    com.microsoft FusedConv (EXTENDED) or NCHWc ops (ALL), which onnx's shape inference does not know. The
    instance norm after global pooling normalizes one element per channel: inspect's BN001, as on the file
    before optimization."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((16, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(np.zeros(16, np.float32), "b"),
        numpy_helper.from_array(np.ones(16, np.float32), "scale"),
        numpy_helper.from_array(np.full(16, 0.1, np.float32), "bias"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="gap"),
        helper.make_node("InstanceNormalization", ["p", "scale", "bias"], ["y"], name="in_gap"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16, 1, 1])],
        inits,
    )
    source = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), source)
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    plain_session(source, options)
    domains = {node.domain for node in onnx.load(options.optimized_model_filepath).graph.node}
    assert domains & {"com.microsoft", "com.microsoft.nchwc"}, domains  # the file the test is about
    for path in (str(source), options.optimized_model_filepath):
        result = CliRunner().invoke(main, ["inspect", path, "--format", "json"])
        findings = [(f["code"], f["severity"], f["layer"]) for f in json.loads(result.stdout)["findings"]]
        assert findings == [("BN001", "error", "in_gap")], (path, findings)


def test_a_graph_of_another_tools_ops_is_refused_naming_what_it_lacks_and_its_ops(tmp_path):
    # pnnx's *.pnnx.onnx: a well-formed protobuf with a graph of PyTorch ops, no IR version, no opset
    model = onnx.ModelProto()
    model.graph.name = "pnnx"
    for i, op in enumerate(("pnnx.Input", "nn.Conv2d", "nn.BatchNorm2d", "F.relu")):
        model.graph.node.append(helper.make_node(op, [f"t{i}"], [f"t{i + 1}"], name=f"op_{i}"))
    path = tmp_path / "model.pnnx.onnx"
    path.write_bytes(model.SerializeToString())
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 2
    assert "no IR version and no opset" in result.stderr and "nn.BatchNorm2d" in result.stderr
    assert "truncated" not in result.stderr  # it is not: the graph parsed
