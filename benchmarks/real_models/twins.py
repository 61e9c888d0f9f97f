"""Broken twins of the real-world models: the same trained model with one known defect written in.

- ``<id>__trainmode.onnx``: every BatchNormalization (subgraphs included) in training mode. Below opset 14
  BatchNormalization has no ``training_mode`` attribute, so the model is first converted to opset 14 with
  ``onnx.version_converter``; the node gets the running-mean and running-variance outputs, as the legacy torch
  exporter writes them (onnxruntime's shape inference rejects a training-mode node with one output).
- ``<id>__stats01.onnx``: every BatchNormalization's running mean set to 0 and variance to 1 (update ops that
  never ran). A mean or variance shared by several nodes is replaced once.
- ``<id>__stats01.h5``: the same for a Keras .h5/.hdf5 file: every ``moving_mean``/``moving_variance`` dataset.
Run by run.py with the bncheck venv's Python (onnx, numpy and h5py are bncheck's own dependencies).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

TRAIN_OPSET = 14


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            for sub in attr.graphs:
                yield from _graphs(sub)


def _bn_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for g in _graphs(model.graph) for n in g.node if n.op_type == "BatchNormalization"]


def count_bn(path: Path) -> int:
    return len(_bn_nodes(onnx.load(str(path))))


def _default_opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def train_mode_twin(src: Path, dest: Path) -> None:
    model = onnx.load(str(src))
    if _default_opset(model) < TRAIN_OPSET:
        model = onnx.version_converter.convert_version(model, TRAIN_OPSET)
    for i, node in enumerate(_bn_nodes(model)):
        kept = [a for a in node.attribute if a.name != "training_mode"]
        del node.attribute[:]
        node.attribute.extend([*kept, helper.make_attribute("training_mode", 1)])
        del node.output[1:]
        node.output.extend([f"{node.output[0]}__twin_running_mean_{i}", f"{node.output[0]}__twin_running_var_{i}"])
    onnx.save(model, str(dest))


def _constant_tensors(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Tensors by name, from initializers and Constant nodes (paddle2onnx writes statistics as either)."""
    found: dict[str, onnx.TensorProto] = {}
    for graph in _graphs(model.graph):
        for init in graph.initializer:
            found[init.name] = init
        for node in graph.node:
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.name == "value":
                        found[node.output[0]] = attr.t
    return found


def stats01_twin(src: Path, dest: Path) -> int:
    """Writes the twin; returns how many BN nodes had both statistics replaced."""
    model = onnx.load(str(src))
    tensors = _constant_tensors(model)
    reset = 0
    for node in _bn_nodes(model):
        names = node.input[3:5]
        if len(names) < 2 or not all(n in tensors for n in names):
            continue
        for name, value in zip(names, (0.0, 1.0), strict=True):
            tensor = tensors[name]
            array = numpy_helper.to_array(tensor)
            tensor.CopyFrom(numpy_helper.from_array(np.full_like(array, value), tensor.name))
        reset += 1
    onnx.save(model, str(dest))
    return reset


def keras_stats01_twin(src: Path, dest: Path) -> int:
    """Copy of a Keras .h5 with every moving mean 0 and moving variance 1; returns how many datasets changed."""
    import h5py

    shutil.copyfile(src, dest)
    changed = 0
    with h5py.File(dest, "r+") as fh:
        datasets: list[h5py.Dataset] = []
        fh["model_weights"].visititems(
            lambda _name, obj: datasets.append(obj) if isinstance(obj, h5py.Dataset) else None
        )
        for ds in datasets:
            leaf = ds.name.rsplit("/", 1)[-1]
            if leaf.startswith("moving_mean"):
                ds[...] = np.zeros(ds.shape, ds.dtype)
                changed += 1
            elif leaf.startswith("moving_variance"):
                ds[...] = np.ones(ds.shape, ds.dtype)
                changed += 1
    return changed
