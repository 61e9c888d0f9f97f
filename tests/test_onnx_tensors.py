"""bncheck's tensor conversions (backends/onnx/tensors.py) against onnx's own, and what they leave unimported.

onnx's numpy_helper and helper are the reference: every standard element type, in raw bytes and in the typed
fields, gives the same array or the same serialized tensor. Types numpy lacks go to onnx itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bncheck.backends.onnx import tensors

STANDARD = sorted(tensors.DTYPES)


def _sample(dtype: np.dtype) -> np.ndarray:
    """A [2, 3] array of ``dtype`` with negative, fractional and extreme values where the type has them."""
    if dtype.kind == "b":
        return np.array([[True, False, True], [False, False, True]])
    if dtype.kind == "c":
        return (np.arange(6).reshape(2, 3) - 2.5 + 1j * np.arange(6).reshape(2, 3)).astype(dtype)
    if dtype.kind == "f":
        return np.array([[-1.5, 0.0, 3.25], [np.finfo(dtype).max, np.finfo(dtype).tiny, -0.0]], dtype)
    info = np.iinfo(dtype)
    return np.array([[info.min, 0, 1], [info.max, 7, info.min + 1]], dtype)


@pytest.mark.parametrize("data_type", STANDARD, ids=[TensorProto.DataType.Name(t) for t in STANDARD])
def test_np_dtype_and_element_type_are_onnxs_mapping(data_type):
    assert tensors.np_dtype(data_type) == helper.tensor_dtype_to_np_dtype(data_type)
    assert tensors.element_type(tensors.np_dtype(data_type)) == helper.np_dtype_to_tensor_dtype(
        helper.tensor_dtype_to_np_dtype(data_type)
    )


@pytest.mark.parametrize("data_type", STANDARD, ids=[TensorProto.DataType.Name(t) for t in STANDARD])
def test_raw_tensors_convert_both_ways_as_numpy_helper_does(data_type):
    array = _sample(tensors.np_dtype(data_type))
    ours = tensors.from_array(array, "t")
    assert ours.SerializeToString() == numpy_helper.from_array(array, "t").SerializeToString()
    back = tensors.to_array(ours)
    expected = numpy_helper.to_array(ours)
    assert back.dtype == expected.dtype and back.shape == expected.shape
    assert back.tobytes() == expected.tobytes()


@pytest.mark.parametrize("data_type", STANDARD, ids=[TensorProto.DataType.Name(t) for t in STANDARD])
def test_typed_field_tensors_read_as_numpy_helper_reads_them(data_type):
    array = _sample(tensors.np_dtype(data_type))
    tensor = helper.make_tensor("t", data_type, array.shape, array.ravel().tolist(), raw=False)
    assert not tensor.HasField("raw_data")
    ours, expected = tensors.to_array(tensor), numpy_helper.to_array(tensor)
    assert ours.dtype == expected.dtype and ours.shape == expected.shape
    assert ours.tobytes() == expected.tobytes()


def test_a_type_numpy_lacks_goes_to_onnx():
    tensor = helper.make_tensor("t", TensorProto.BFLOAT16, [3], [1.0, -2.0, 0.5])
    assert tensors.to_array(tensor).tobytes() == numpy_helper.to_array(tensor).tobytes()
    assert tensors.np_dtype(TensorProto.BFLOAT16) == helper.tensor_dtype_to_np_dtype(TensorProto.BFLOAT16)
    strings = np.array(["a", "bc"], dtype=object)
    assert tensors.from_array(strings, "s") == numpy_helper.from_array(strings, "s")


def test_an_external_tensor_is_read_by_onnx_from_its_file(tmp_path, monkeypatch):
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    model = helper.make_model(
        helper.make_graph(
            [helper.make_node("Add", ["x", "w"], ["y"])],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
            [numpy_helper.from_array(array, "w")],
        )
    )
    path = tmp_path / "m.onnx"
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True, size_threshold=0)
    stub = onnx.load_model(path, load_external_data=False).graph.initializer[0]
    assert stub.data_location == TensorProto.EXTERNAL and not stub.HasField("raw_data")
    monkeypatch.chdir(tmp_path)  # onnx reads a stub's location relative to the working folder
    assert np.array_equal(tensors.to_array(stub), array)  # from the file, not from the stub's empty fields


def _fresh(code: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, check=True, timeout=120
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("training", [False, True], ids=["inference", "train-mode"])
def test_a_probe_of_a_float_model_leaves_onnxs_dtype_table_and_ml_dtypes_unimported(tmp_path, training):
    # a train-mode BN is decomposed and checked on the conformance model: constants written both ways
    from tests.builders import bn_model

    path = bn_model(tmp_path / "m.onnx", training=training)
    out = _fresh(
        f"""
        import json, sys
        from bncheck.backends.onnx.quick_import import Deferred, import_onnx
        import_onnx()
        import bncheck
        report = bncheck.probe({path!r}, batch_sizes=(1, 2))
        print(json.dumps({{
            "layers": len(report.layers),
            "probed": len(report.probes),
            "ml_dtypes": isinstance(sys.modules["ml_dtypes"], Deferred),
            "mapping": isinstance(sys.modules["onnx._mapping"], Deferred),
        }}))
        """
    )
    assert out == {"layers": 1, "probed": 1, "ml_dtypes": True, "mapping": True}


def test_reading_onnxs_dtype_table_imports_ml_dtypes_through_its_stand_in():
    # the table's import reads ml_dtypes, itself deferred: a nested first use in one thread
    out = _fresh(
        """
        import json, sys
        from bncheck.backends.onnx.quick_import import Deferred, import_onnx
        import_onnx()
        from onnx import TensorProto, helper
        bfloat16 = str(helper.tensor_dtype_to_np_dtype(TensorProto.BFLOAT16))
        print(json.dumps({"bfloat16": bfloat16, "ml_dtypes": type(sys.modules["ml_dtypes"]).__name__,
                          "mapping": type(sys.modules["onnx._mapping"]).__name__}))
        """
    )
    assert out == {"bfloat16": "bfloat16", "ml_dtypes": "module", "mapping": "module"}
