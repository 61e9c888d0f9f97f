"""inspect and probe load a large ONNX file without its large weights: they stay in the file, named as its
external data (onnxruntime reads them there), and the file is hashed in a thread. The reports are those of a
load that reads every weight; fix, which rewrites weights, still reads them all."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import bncheck
from bncheck import engine
from bncheck.backends.base import HASH_WINDOW, BackendError, sha256_of
from bncheck.backends.onnx import OnnxBackend
from bncheck.backends.onnx import load as onnx_load
from bncheck.backends.onnx.load import load_onnx
from bncheck.backends.onnx.protobuf import without_large_weights
from bncheck.model import DEFAULT_BATCH_SIZES, ProbeSettings
from bncheck.render.json import to_document

F32 = TensorProto.FLOAT
WIDE = 270_000  # a BatchNormalization whose parameters exceed VIEW_LOAD_BYTES (1.08 MB each)


def large_model(path: Path) -> str:
    """A 15 MB MLP: two MatMul weights over 1 MB (1.2 MB, 9.6 MB), a BatchNormalization between them whose
    running statistics are stale (never updated: mean 0, variance 1), and a second input normalized by a
    BatchNormalization with 1 MB parameters."""
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((512, 600)) / 20).astype(np.float32)
    w2 = (rng.standard_normal((600, 4000)) / 25).astype(np.float32)
    wide = {
        "s2": rng.uniform(0.5, 1.5, WIDE),
        "b2": rng.uniform(-0.5, 0.5, WIDE),
        "m2": rng.uniform(-0.1, 0.1, WIDE),
        "v2": rng.uniform(0.5, 1.5, WIDE),
    }
    inits = [
        numpy_helper.from_array(w1, "w1"),
        numpy_helper.from_array(np.ones(600, np.float32), "s1"),
        numpy_helper.from_array(np.zeros(600, np.float32), "b1"),
        numpy_helper.from_array(np.zeros(600, np.float32), "m1"),
        numpy_helper.from_array(np.ones(600, np.float32), "v1"),
        numpy_helper.from_array(w2, "w2"),
        *(numpy_helper.from_array(v.astype(np.float32), k) for k, v in wide.items()),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h1"], name="fc1"),
        helper.make_node("BatchNormalization", ["h1", "s1", "b1", "m1", "v1"], ["n1"], name="bn1"),
        helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
        helper.make_node("MatMul", ["r1", "w2"], ["y"], name="fc2"),
        helper.make_node("BatchNormalization", ["x2", "s2", "b2", "m2", "v2"], ["y2"], name="bn_wide"),
    ]
    graph = helper.make_graph(
        nodes,
        "large",
        [helper.make_tensor_value_info("x", F32, ["N", 512]), helper.make_tensor_value_info("x2", F32, ["N", WIDE])],
        [helper.make_tensor_value_info("y", F32, ["N", 4000]), helper.make_tensor_value_info("y2", F32, ["N", WIDE])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)], producer_name="bncheck-tests")
    model.ir_version = 8
    onnx.save(model, str(path))
    assert os.path.getsize(path) >= onnx_load.LEAVE_WEIGHTS_MIN_BYTES
    return str(path)


@pytest.fixture(scope="module")
def large(tmp_path_factory: pytest.TempPathFactory) -> str:
    return large_model(tmp_path_factory.mktemp("large") / "mlp.onnx")


def _without_timing(document: dict) -> dict:
    document.pop("timing", None)
    return document


def test_probe_without_the_weights_reports_what_a_full_load_reports(large: str):
    settings = ProbeSettings(batch_sizes=DEFAULT_BATCH_SIZES, default_sizes=True, all_layers=True)
    full = engine.probe_view(OnnxBackend(), OnnxBackend().load(large, weights=True), settings)
    left = engine.probe(large, settings)
    assert _without_timing(to_document(left)) == _without_timing(to_document(full))
    # the stale statistics were measured against the data, through the weights read from the file
    assert any(f.code == "BN003" and f.layer == "bn1" for f in left.findings)


def test_inspect_without_the_weights_reports_what_a_full_load_reports(large: str):
    full = engine.inspect_view(OnnxBackend().load(large, weights=True))
    assert to_document(bncheck.inspect(large)) == to_document(full)


def test_large_float_weights_stay_in_the_file_and_norm_parameters_are_read(large: str):
    handle = load_onnx(large, weights=False)
    tensors = {t.name: t for t in handle.model.graph.initializer}
    reference = {t.name: t for t in onnx.load(large).graph.initializer}
    for name in ("w1", "w2"):  # over VIEW_LOAD_BYTES: named as external data in the model file itself
        where = {e.key: e.value for e in tensors[name].external_data}
        assert tensors[name].data_location == TensorProto.EXTERNAL and not tensors[name].raw_data
        assert where["location"] == os.path.basename(large)
        read = numpy_helper.to_array(tensors[name], os.path.dirname(large))
        assert np.array_equal(read, numpy_helper.to_array(reference[name]))
    for name in ("s2", "b2", "m2", "v2", "s1"):  # a norm's parameters, whatever their size, and small tensors
        assert tensors[name].data_location == TensorProto.DEFAULT
        assert np.array_equal(numpy_helper.to_array(tensors[name]), numpy_helper.to_array(reference[name]))
    assert not handle.external_data  # the file has none: the probe reads its weights from the file itself


def test_report_sha256_is_the_files_once_hashed_in_the_background(large: str):
    expected = hashlib.sha256(Path(large).read_bytes()).hexdigest()
    view = OnnxBackend().load(large, weights=False)
    assert view.info.sha256 == "" and view.pending_sha256 is not None  # still hashing, or not yet asked
    assert view.final_info().sha256 == expected and view.pending_sha256 is None
    assert view.handle.info.sha256 == expected  # the backend's own record is completed too
    assert bncheck.inspect(large).model.sha256 == expected


@pytest.mark.parametrize("size", [0, 1, HASH_WINDOW, 2 * HASH_WINDOW + 123])
def test_a_file_hashed_one_window_at_a_time_gets_hashlibs_sha256(tmp_path: Path, size: int):
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    assert sha256_of(str(path)) == hashlib.sha256(data).hexdigest()


def test_fix_loads_every_weight(large: str):
    handle = load_onnx(large)
    assert all(t.data_location == TensorProto.DEFAULT for t in handle.model.graph.initializer)
    assert handle.pending_sha256 is None and handle.info is not None and len(handle.info.sha256) == 64


def test_truncated_large_file_fails_as_a_full_load_does(large: str, tmp_path: Path):
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(Path(large).read_bytes()[: 12 << 20])
    with pytest.raises(BackendError) as full:
        load_onnx(str(cut))
    with pytest.raises(BackendError) as left:
        load_onnx(str(cut), weights=False)
    assert str(left.value) == str(full.value) and "truncated or corrupt" in str(full.value)


def test_small_file_is_read_whole(tmp_path: Path):
    model = helper.make_model(
        helper.make_graph(
            [helper.make_node("MatMul", ["x", "w"], ["y"])],
            "small",
            [helper.make_tensor_value_info("x", F32, ["N", 600])],
            [helper.make_tensor_value_info("y", F32, ["N", 600])],
            initializer=[numpy_helper.from_array(np.ones((600, 600), np.float32), "w")],  # 1.4 MB, file < 8 MB
        )
    )
    onnx.save(model, str(tmp_path / "small.onnx"))
    handle = load_onnx(str(tmp_path / "small.onnx"), weights=False)
    assert handle.model.graph.initializer[0].data_location == TensorProto.DEFAULT
    assert handle.pending_sha256 is None


def _serialized(*initializers: TensorProto) -> bytes:
    graph = helper.make_graph(
        [helper.make_node("Identity", [t.name], [f"{t.name}_out"]) for t in initializers],
        "g",
        [],
        [helper.make_tensor_value_info(f"{t.name}_out", t.data_type, list(t.dims)) for t in initializers],
        initializer=list(initializers),
    )
    return helper.make_model(graph, producer_name="bncheck-tests", doc_string="kept").SerializeToString()


def test_without_large_weights_cuts_only_large_raw_data():
    big = numpy_helper.from_array(np.arange(300_000, dtype=np.float32), "big")
    big.doc_string = "kept too"
    small = numpy_helper.from_array(np.arange(10, dtype=np.float32), "small")
    data = _serialized(small, big)
    cut = without_large_weights(data, len(data), "m.onnx", 1 << 20, {TensorProto.FLOAT})
    assert cut is not None
    rebuilt, offsets = cut
    model = onnx.ModelProto()
    model.ParseFromString(bytes(rebuilt))
    original = onnx.ModelProto()
    original.ParseFromString(data)
    assert model.graph.initializer[0] == original.graph.initializer[0]  # small: byte for byte
    stub = model.graph.initializer[1]
    assert (stub.name, list(stub.dims), stub.doc_string) == ("big", [300_000], "kept too")
    offset, length = offsets["big"]
    assert data[offset : offset + length] == original.graph.initializer[1].raw_data
    assert {e.key: e.value for e in stub.external_data} == {
        "location": "m.onnx",
        "offset": str(offset),
        "length": str(length),
    }
    for message in (model, original):
        del message.graph.initializer[:]
    assert model == original  # nodes, inputs, outputs, producer, doc string: unchanged


def test_without_large_weights_declines_other_layouts():
    big = numpy_helper.from_array(np.zeros(300_000, np.float32), "big")
    nothing_large = _serialized(numpy_helper.from_array(np.zeros(10, np.float32), "small"))
    assert without_large_weights(nothing_large, len(nothing_large), "m.onnx", 1 << 20, {TensorProto.FLOAT}) is None
    twice = _serialized(big, big)
    assert without_large_weights(twice, len(twice), "m.onnx", 1 << 20, {TensorProto.FLOAT}) is None
    external = TensorProto()
    external.CopyFrom(big)
    external.data_location = TensorProto.EXTERNAL
    entry = external.external_data.add()
    entry.key, entry.value = "location", "w.bin"
    data = _serialized(external)
    assert without_large_weights(data, len(data), "m.onnx", 1 << 20, {TensorProto.FLOAT}) is None


def test_large_integer_tensors_stay_in_memory(tmp_path: Path):
    path = tmp_path / "ints.onnx"
    table = numpy_helper.from_array(np.arange(200_000, dtype=np.int64), "table")  # 1.6 MB of int64
    path.write_bytes(_serialized(table))
    parsed = onnx_load._parse_without_large_weights(str(path))
    assert parsed is None  # nothing left in the file: the caller reads it whole


def test_weight_left_in_the_file_is_unknown_to_the_walk_wherever_bncheck_runs(
    large: str, monkeypatch: pytest.MonkeyPatch
):
    from bncheck.backends.onnx.graph import GraphIndex

    monkeypatch.chdir(os.path.dirname(large))  # where onnx's to_array would find the file by its bare name
    g = GraphIndex(load_onnx(large, weights=False))
    assert g.param("w2") is None  # left in the file: never read here, as a computed tensor is not
    assert g.param("s2") is not None and g.param("s2").size == WIDE  # a norm parameter, read at load
