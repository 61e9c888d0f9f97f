"""ONNX tensors to numpy arrays and back, for the element types numpy has, without onnx's dtype table.

onnx's table (``onnx._mapping``) imports ml_dtypes at its own import, for the 8-, 6-, 4- and 2-bit floats
and bfloat16; bncheck's console leaves both to their first use (quick_import.DEFERRED), which these
functions never make for a model of plain numeric types. Any other type or storage (strings, external data,
segments, typed fields other than these, a big-endian machine) goes to onnx's own helpers, which import
the table then: they stay the authority, this module only answers the common case first.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import onnx

#: numpy's dtype of each ONNX element type numpy has natively (TensorProto's numbers), as onnx maps them
DTYPES: dict[int, np.dtype] = {
    1: np.dtype(np.float32),  # FLOAT
    2: np.dtype(np.uint8),  # UINT8
    3: np.dtype(np.int8),  # INT8
    4: np.dtype(np.uint16),  # UINT16
    5: np.dtype(np.int16),  # INT16
    6: np.dtype(np.int32),  # INT32
    7: np.dtype(np.int64),  # INT64
    9: np.dtype(np.bool_),  # BOOL
    10: np.dtype(np.float16),  # FLOAT16
    11: np.dtype(np.float64),  # DOUBLE
    12: np.dtype(np.uint32),  # UINT32
    13: np.dtype(np.uint64),  # UINT64
    14: np.dtype(np.complex64),  # COMPLEX64
    15: np.dtype(np.complex128),  # COMPLEX128
}
_TYPES = {dtype: data_type for data_type, dtype in DTYPES.items()}
#: typed fields read here: the ones that hold their type's values as they are (others hold bit patterns)
_FIELDS = {1: "float_data", 6: "int32_data", 7: "int64_data", 11: "double_data"}
_LITTLE = sys.byteorder == "little"


def np_dtype(data_type: int) -> np.dtype:
    """numpy's dtype of an ONNX element type (``onnx.helper.tensor_dtype_to_np_dtype``)."""
    found = DTYPES.get(data_type)
    if found is not None:
        return found
    from onnx import helper

    return np.dtype(helper.tensor_dtype_to_np_dtype(data_type))


def element_type(dtype: Any) -> int:
    """The ONNX element type of a numpy dtype (``onnx.helper.np_dtype_to_tensor_dtype``)."""
    found = _TYPES.get(np.dtype(dtype))
    if found is not None:
        return found
    from onnx import helper

    return int(helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))


def to_array(tensor: onnx.TensorProto) -> np.ndarray:
    """``onnx.numpy_helper.to_array(tensor)``: the same array (raw bytes are a read-only view, as there)."""
    dtype = DTYPES.get(tensor.data_type)
    if dtype is not None and _LITTLE and tensor.data_location != tensor.EXTERNAL and not tensor.HasField("segment"):
        if tensor.HasField("raw_data"):
            return np.frombuffer(tensor.raw_data, dtype=dtype).reshape(tensor.dims)
        field = _FIELDS.get(tensor.data_type)
        if field is not None:
            return np.array(getattr(tensor, field), dtype=dtype).reshape(tensor.dims)
    from onnx import numpy_helper

    return numpy_helper.to_array(tensor)


def from_array(array: np.ndarray, name: str | None = None) -> onnx.TensorProto:
    """``onnx.numpy_helper.from_array(array, name)``: the same tensor (raw little-endian bytes)."""
    data_type = _TYPES.get(array.dtype)
    if data_type is None or not _LITTLE:
        from onnx import numpy_helper

        return numpy_helper.from_array(array, name)
    import onnx

    tensor = onnx.TensorProto()
    tensor.dims.extend(array.shape)
    if name:
        tensor.name = name
    tensor.raw_data = array.tobytes()
    tensor.data_type = data_type
    return tensor
