"""Models reached through symbolic links, as a Hugging Face cache stores them (a snapshot folder of links into
a blob store) or as a user links a model into a folder of models: bncheck reports on them what it reports on
the same files reached directly, and refuses what onnxruntime would refuse."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from bncheck.backends.base import BackendError
from bncheck.backends.onnx.instrument import EMBED_BYTES
from bncheck.backends.onnx.load import load_onnx
from bncheck.cli import main

F32 = TensorProto.FLOAT
C_IN, C_MID, HW, CLASSES = 3, 64, 8, 4


def convnet() -> onnx.ModelProto:
    """input[N,3,8,8] -> conv1 -> conv2 (a 147 kB weight, above the size the probe keeps inline) -> bn ->
    relu -> GAP -> gemm -> logits. The BN's running mean has drifted 2.0 from its input's."""
    rng = np.random.default_rng(3)
    weights = {
        "conv1.w": rng.normal(0, 0.3, (C_MID, C_IN, 3, 3)),
        "conv2.w": rng.normal(0, 1 / np.sqrt(C_MID * 9), (C_MID, C_MID, 3, 3)),
        "bn.scale": rng.uniform(0.6, 1.4, C_MID),
        "bn.bias": rng.uniform(-0.2, 0.2, C_MID) + 0.5,
        "bn.mean": rng.uniform(-0.3, 0.3, C_MID) + 2.0,
        "bn.var": rng.uniform(0.5, 2.0, C_MID),
        "fc.w": rng.normal(0, 0.5, (C_MID, CLASSES)),
        "fc.b": rng.normal(0, 0.1, CLASSES),
    }
    nodes = [
        helper.make_node("Conv", ["input", "conv1.w"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["c1", "conv2.w"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c2", "bn.scale", "bn.bias", "bn.mean", "bn.var"], ["n"], name="bn"),
        helper.make_node("Relu", ["n"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["logits"], name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "linked",
        [helper.make_tensor_value_info("input", F32, ["N", C_IN, HW, HW])],
        [helper.make_tensor_value_info("logits", F32, ["N", CLASSES])],
        initializer=[numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)], producer_name="bncheck-tests")
    model.ir_version = 8
    assert weights["conv2.w"].size * 4 > EMBED_BYTES
    return model


def in_one_file(folder: Path) -> Path:
    folder.mkdir()
    path = folder / "model.onnx"
    onnx.save(convnet(), str(path))
    return path


def with_external_data(folder: Path) -> Path:
    folder.mkdir()
    path = folder / "model.onnx"
    onnx.save(convnet(), str(path), save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    return path


def hub_cache(root: Path) -> Path:
    """The layout huggingface_hub writes: snapshots/<rev>/<name> are relative links to blobs/<hash>."""
    (root / "blobs").mkdir(parents=True)
    snapshot = root / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    source = with_external_data(root / "download")
    for name, blob in (("model.onnx", "9f1e"), ("model.onnx.data", "77aa")):
        os.rename(source.parent / name, root / "blobs" / blob)
        (snapshot / name).symlink_to(Path("..") / ".." / "blobs" / blob)
    return snapshot / "model.onnx"


@pytest.fixture(scope="module")
def calib(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("calib") / "calib.npz"
    np.savez(path, input=np.random.default_rng(1).normal(0, 1, (64, C_IN, HW, HW)).astype(np.float32))
    return str(path)


def document(*args: str) -> dict:
    result = CliRunner().invoke(main, [*args, "--format", "json"])
    doc = json.loads(result.stdout)
    assert result.exit_code in (0, 1), doc
    for key in ("path", "sha256"):  # the path as given; a layout's files differ in name, not in content
        doc["model"].pop(key)
    doc.pop("timing", None)
    return doc


def test_a_model_linked_from_another_folder_probes_as_the_file_itself(tmp_path: Path):
    real = in_one_file(tmp_path / "store")
    (tmp_path / "models").mkdir()
    link = tmp_path / "models" / "linked.onnx"
    link.symlink_to(real)
    direct = document("probe", str(real))
    assert direct["summary"]["layers"] == 1
    assert document("probe", str(link)) == direct


def test_a_folder_of_linked_models_probes_every_one(tmp_path: Path):
    real = in_one_file(tmp_path / "store")
    (tmp_path / "models").mkdir()
    for name in ("a.onnx", "b.onnx"):
        (tmp_path / "models" / name).symlink_to(real)
    result = CliRunner().invoke(main, ["probe", str(tmp_path / "models"), "--format", "json"])
    assert result.exit_code in (0, 1), result.stderr
    models = json.loads(result.stdout)["models"]
    assert len(models) == 2 and all("error" not in m and m["probe"]["batch_sizes"] for m in models)


@pytest.mark.parametrize("command", ["inspect", "probe"])
def test_a_hugging_face_cache_layout_reads_as_a_plain_copy(tmp_path: Path, command: str):
    plain = with_external_data(tmp_path / "plain")
    assert document(command, str(hub_cache(tmp_path / "hub"))) == document(command, str(plain))


def test_the_norm_parameters_of_a_cached_model_are_read_from_its_blobs(tmp_path: Path):
    handle = load_onnx(str(hub_cache(tmp_path / "hub")))
    mean = next(t for t in handle.model.graph.initializer if t.name == "bn.mean")
    expected = next(t for t in convnet().graph.initializer if t.name == "bn.mean")
    np.testing.assert_array_equal(numpy_helper.to_array(mean), numpy_helper.to_array(expected))


def test_probe_data_measures_the_output_effect_of_a_cached_model(tmp_path: Path, calib: str):
    plain = with_external_data(tmp_path / "plain")
    effects = []
    for path in (hub_cache(tmp_path / "hub"), plain):
        doc = document("probe", str(path), "--data", calib)
        assert not [n for n in doc["notes"] if "not measured" in n["message"]]
        [effect] = [f["evidence"]["output_effect"] for f in doc["findings"] if f["code"] == "BN003"]
        effects.append(effect)
    assert effects[0] == effects[1] and effects[0]["recomputed_layers"] == ["bn"]


def test_fix_repairs_a_cached_model_into_a_folder_of_its_own(tmp_path: Path, calib: str):
    fixed = tmp_path / "out" / "fixed.onnx"
    fixed.parent.mkdir()
    result = CliRunner().invoke(main, ["fix", str(hub_cache(tmp_path / "hub")), "--data", calib, "-o", str(fixed)])
    assert result.exit_code == 0, result.stderr
    assert not fixed.is_symlink()
    assert not [f for f in document("probe", str(fixed), "--data", calib)["findings"] if f["code"] == "BN003"]


def test_a_data_link_out_of_both_folders_is_still_refused(tmp_path: Path):
    # the model is linked from the snapshot into the store, its data link leaves both
    (tmp_path / "elsewhere").mkdir()
    store = with_external_data(tmp_path / "store")
    os.rename(store.parent / "model.onnx.data", tmp_path / "elsewhere" / "secret")
    (store.parent / "model.onnx.data").symlink_to(tmp_path / "elsewhere" / "secret")
    (tmp_path / "snapshot").mkdir()
    (tmp_path / "snapshot" / "model.onnx").symlink_to(store)
    (tmp_path / "snapshot" / "model.onnx.data").symlink_to(tmp_path / "elsewhere" / "secret")
    with pytest.raises(BackendError, match="outside the model's folder"):
        load_onnx(str(tmp_path / "snapshot" / "model.onnx"))
