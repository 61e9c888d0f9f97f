"""Fixed hostile inputs, one per defect the fuzzing found: built by this code (no binary files to trust).

Each builder writes its files into a workspace's model folder and returns the bncheck arguments to run.
Keras files are written with zipfile, json and h5py in the layout Keras 3 saves (see the Keras reader's
docstring), so building them needs no Keras: hostile files are exactly what Keras itself would refuse to write.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

F32 = TensorProto.FLOAT
HOSTILE_NAMES = {
    "markup": "bn[/red]",
    "osc": "bn\x1b]0;pwned\x07",
    "ansi": "bn\x1b[31mred\x1b[0m",
    "newline": "bn\nfake row",
}


# ---------------------------------------------------------------------------------------------- ONNX


def onnx_bn(
    path: Path,
    *,
    input_dims: list[int | str] | None = None,
    name: str = "bn",
    channels: int = 3,
    stats_type: int = F32,
    raw_scale: bytes | None = None,
    external: dict[str, list[tuple[str, str]]] | None = None,
    input_name: str = "x",
) -> Path:
    """x -> BatchNormalization -> y, saved without onnx.checker (the point is to be subtly invalid).

    ``external`` maps an initializer name to the external_data entries it declares instead of its bytes.
    """
    dims = input_dims if input_dims is not None else ["N", channels, 4, 4]
    rng = np.random.default_rng(0)
    np_type = helper.tensor_dtype_to_np_dtype(stats_type)
    arrays = {
        "scale": rng.uniform(0.5, 1.5, channels),
        "bias": rng.uniform(-0.5, 0.5, channels),
        "mean": rng.uniform(0.1, 0.3, channels),
        "var": rng.uniform(0.5, 1.5, channels),
    }
    inits = []
    for key, value in arrays.items():
        tensor = numpy_helper.from_array(value.astype(np_type), key)
        if key == "scale" and raw_scale is not None:
            tensor.raw_data = raw_scale
        if external and key in external:
            tensor.ClearField("raw_data")
            tensor.data_location = TensorProto.EXTERNAL
            for k, v in external[key]:
                entry = tensor.external_data.add()
                entry.key, entry.value = k, v
        inits.append(tensor)
    node = helper.make_node(
        "BatchNormalization", [input_name, "scale", "bias", "mean", "var"], ["y"], name=name, epsilon=1e-5
    )
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info(input_name, F32, dims)],
        [helper.make_tensor_value_info("y", F32, None)],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


# ---------------------------------------------------------------------------------------------- Keras


def _tensor(shape: list, history: list) -> dict:
    return {"class_name": "__keras_tensor__", "config": {"shape": shape, "dtype": "float32", "keras_history": history}}


def _bn_layer(name: str, shape: list, inbound: list[dict]) -> dict:
    return {
        "module": "keras.layers",
        "class_name": "BatchNormalization",
        "name": name,
        "registered_name": None,
        "config": {
            "name": name,
            "trainable": True,
            "axis": -1,
            "momentum": 0.99,
            "epsilon": 0.001,
            "center": True,
            "scale": True,
        },
        "build_config": {"input_shape": shape},
        "inbound_nodes": inbound,
    }


def _input_layer(batch_shape: list) -> dict:
    """Keras 3's InputLayer entry named x."""
    return {
        "module": "keras.layers",
        "class_name": "InputLayer",
        "name": "x",
        "registered_name": None,
        "config": {"batch_shape": batch_shape, "dtype": "float32", "name": "x"},
        "inbound_nodes": [],
    }


def keras_bn_config(batch_shape: list, bn_name: str = "bn") -> dict:
    """Functional [InputLayer x, BatchNormalization bn_name] as Keras 3 writes it."""
    return {
        "module": "keras.src.models.functional",
        "class_name": "Functional",
        "registered_name": "Functional",
        "config": {
            "name": "m",
            "trainable": True,
            "layers": [
                _input_layer(batch_shape),
                _bn_layer(bn_name, batch_shape, [{"args": [_tensor(batch_shape, ["x", 0, 0])], "kwargs": {}}]),
            ],
            "input_layers": [["x", 0, 0]],
            "output_layers": [[bn_name, 0, 0]],
        },
    }


def keras_weights(
    channels: int,
    bn_name: str = "bn",
    dataset: Callable[[h5py.Group, str, np.ndarray], None] | None = None,
    extra: Callable[[h5py.File], None] | None = None,
) -> bytes:
    """model.weights.h5 for :func:`keras_bn_config`; ``dataset(group, name, value)`` writes each variable
    (default: a plain dataset), ``extra(file)`` adds anything else."""
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as h5:
        h5.create_group("layers/input_layer/vars").attrs["name"] = "x"
        group = h5.create_group("layers/batch_normalization/vars")
        group.attrs["name"] = bn_name
        values = [np.ones(channels), np.zeros(channels), np.full(channels, 0.2), np.full(channels, 0.9)]
        for i, value in enumerate(values):
            (dataset or _plain)(group, str(i), value.astype(np.float32))
        h5.create_group("vars").attrs["name"] = "m"
        if extra:
            extra(h5)
    return buffer.getvalue()


def _plain(group: h5py.Group, name: str, value: np.ndarray) -> None:
    group.create_dataset(name, data=value)


def write_keras(path: Path, config: dict, weights: bytes | None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("metadata.json", json.dumps({"keras_version": "3.15.1"}))
        zf.writestr("config.json", json.dumps(config))
        if weights is not None:
            zf.writestr("model.weights.h5", weights)
    return path


def write_legacy_h5(
    path: Path,
    config: dict,
    dataset: Callable[[h5py.Group, str, np.ndarray], None] | None = None,
    bn_group: Callable[[h5py.Group, str], None] | None = None,
    channels: int = 4,
) -> Path:
    """A legacy .h5 (model_config attribute, model_weights group) for :func:`keras_bn_config`."""
    with h5py.File(path, "w") as h5:
        h5.attrs["model_config"] = json.dumps(config)
        h5.attrs["keras_version"] = "3.15.1"
        weights = h5.create_group("model_weights")
        weights.create_group("x").attrs["weight_names"] = np.array([], dtype="S1")
        names = ["gamma", "beta", "moving_mean", "moving_variance"]
        if bn_group is not None:
            bn_group(weights, "bn")
        else:
            top = weights.create_group("bn")
            top.attrs["weight_names"] = [f"bn/{n}".encode() for n in names]
            inner = top.create_group("bn")
            values = [np.ones(channels), np.zeros(channels), np.full(channels, 0.2), np.full(channels, 0.9)]
            for name, value in zip(names, values):
                (dataset or _plain)(inner, name, value.astype(np.float32))
    return path


def external_storage(canary: Path) -> Callable[[h5py.Group, str, np.ndarray], None]:
    """Datasets whose bytes live in ``canary`` (HDF5 external storage), as h5py ``external=`` writes them."""

    def write(group: h5py.Group, name: str, value: np.ndarray) -> None:
        group.create_dataset(name, shape=value.shape, dtype=value.dtype, external=[(str(canary), 0, value.nbytes)])

    return write


def virtual_dataset(source: Path) -> Callable[[h5py.Group, str, np.ndarray], None]:
    """Datasets that are virtual mappings of dataset ``data`` in the HDF5 file ``source``."""

    def write(group: h5py.Group, name: str, value: np.ndarray) -> None:
        layout = h5py.VirtualLayout(shape=value.shape, dtype=value.dtype)
        layout[:] = h5py.VirtualSource(str(source), "data", shape=value.shape)
        group.create_virtual_dataset(name, layout, fillvalue=0)

    return write


def outside_h5(path: Path, channels: int = 4) -> Path:
    """An HDF5 file outside the model's folder holding ``data`` and a whole BN variable group."""
    with h5py.File(path, "w") as h5:
        h5.create_dataset("data", data=np.full(channels, 12345.0, dtype=np.float32))
        group = h5.create_group("vars")
        group.attrs["name"] = "bn"
        for i in range(4):
            group.create_dataset(str(i), data=np.full(channels, 12345.0, dtype=np.float32))
        legacy = h5.create_group("bn")
        legacy.attrs["weight_names"] = [f"bn/{n}".encode() for n in ("gamma", "beta", "moving_mean", "moving_variance")]
        for n in ("gamma", "beta", "moving_mean", "moving_variance"):
            legacy.create_dataset(f"bn/{n}", data=np.full(channels, 12345.0, dtype=np.float32))
    return path


def huge_fill_value(group: h5py.Group, name: str, value: np.ndarray) -> None:
    """A dataset declaring 2**31 float64 values (16 GiB) that are never written: reading it materializes the
    fill value for all of them."""
    group.create_dataset(name, shape=(2**31,), dtype=np.float64, fillvalue=0.5)


def nested_fanout_config(fan: int = 30, depth: int = 5) -> dict:
    """Functional models nested ``depth`` deep, each calling its inner model ``fan`` times (one BN at the bottom)."""
    shape = [None, 4]
    inner = keras_bn_config(shape, "bn")
    for level in range(depth):
        name = f"m{level}"
        inner["name"] = inner["config"]["name"] = f"inner{level}"
        layers = [_input_layer(shape)]
        calls = [
            {"args": [_tensor(shape, ["x", 0, 0] if i == 0 else [inner["config"]["name"], i - 1, 0])], "kwargs": {}}
            for i in range(fan)
        ]
        layers.append({**inner, "inbound_nodes": calls})
        inner = {
            "module": "keras.src.models.functional",
            "class_name": "Functional",
            "registered_name": "Functional",
            "name": name,
            "config": {
                "name": name,
                "trainable": True,
                "layers": layers,
                "input_layers": [["x", 0, 0]],
                "output_layers": [[layers[-1]["config"]["name"], fan - 1, 0]],
            },
        }
    return inner


def reversed_chain_config(length: int = 2000) -> dict:
    """A Functional chain x -> d0 -> d1 -> ... whose layers are listed last first (legal JSON, hostile order)."""
    shape = [None, 4]
    layers = [_input_layer(shape)]
    previous = "x"
    for i in range(length):
        name = f"bn{i}" if i % 10 == 0 else f"act{i}"
        inbound = [{"args": [_tensor(shape, [previous, 0, 0])], "kwargs": {}}]
        if name.startswith("bn"):
            layers.append(_bn_layer(name, shape, inbound))
        else:
            layers.append(
                {
                    "module": "keras.layers",
                    "class_name": "Activation",
                    "name": name,
                    "registered_name": None,
                    "config": {"name": name, "activation": "relu"},
                    "inbound_nodes": inbound,
                }
            )
        previous = name
    layers = [layers[0]] + layers[:0:-1]
    return {
        "module": "keras.src.models.functional",
        "class_name": "Functional",
        "registered_name": "Functional",
        "config": {
            "name": "chain",
            "trainable": True,
            "layers": layers,
            "input_layers": [["x", 0, 0]],
            "output_layers": [[previous, 0, 0]],
        },
    }
