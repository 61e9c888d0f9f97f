"""A lower bound of the memory one Keras forward pass needs at a batch size, from the layers' symbolic shapes.

As for ONNX (``backends/onnx/memory.py``): the fed inputs plus, over layers, the most bytes one layer reads
and writes, since an eager call holds a layer's inputs and its output at once. Shapes are the functional
graph's (each layer's ``input`` and ``output`` KerasTensors, nested models included): the batch dim is the
batch size, any other unknown dim makes the tensor count 0, and so does a layer called more than once (Keras
then gives no single ``input``/``output``). So the figure never exceeds what the run needs (a false refusal
is worse than a late one).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from bncheck import budget
from bncheck.model import InputSpec
from bncheck.probe_data import ProbeDataError, resolve_shape


def _bytes(tensor: Any, batch: int) -> int:
    shape = getattr(tensor, "shape", None)
    if shape is None or not len(shape):
        return 0
    sizes = [batch if i == 0 and d is None else d for i, d in enumerate(shape)]
    if any(not isinstance(s, int) or s < 0 for s in sizes):
        return 0
    try:
        itemsize = np.dtype(str(getattr(tensor, "dtype", ""))).itemsize
    except TypeError:  # bfloat16 and other names numpy does not know: unknown, counted 0
        return 0
    return math.prod(sizes) * itemsize


def _tensors(value: Any) -> list[Any]:
    """The KerasTensors of a layer's ``input``/``output`` (one, a list, a tuple or a dict of them)."""
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return [value]


def busiest_layer(model: Any, batch: int) -> tuple[int, str | None]:
    """The most bytes one layer reads and writes at ``batch`` and "'name' (Class)", nested models included;
    (0, None) when no layer's tensors have a known size."""
    best, where = 0, None
    stack = list(getattr(model, "layers", []))
    while stack:
        layer = stack.pop()
        stack.extend(getattr(layer, "layers", []))
        if hasattr(layer, "layers"):  # a nested model's own input/output are its first and last layers'
            continue
        try:
            tensors = _tensors(layer.input) + _tensors(layer.output)
        except (AttributeError, ValueError, RuntimeError):  # called several times, or never: unknown
            continue
        live = sum(_bytes(t, batch) for t in {id(t): t for t in tensors}.values())
        if live > best:
            best, where = live, f"{layer.name!r} ({type(layer).__name__})"
    return best, where


def fed_bytes(
    inputs: list[InputSpec],
    batch: int,
    overrides: Mapping[str, tuple[int, ...]] | None,
    data: Mapping[str, Any] | None = None,
) -> int:
    """Bytes of the inputs fed at ``batch``: the data's arrays when given, else the synthetic inputs' shapes;
    an input whose shape or dtype cannot be told counts 0."""
    total = 0
    for spec in inputs:
        if data is not None:
            array = data.get(spec.name)
            if array is None or not getattr(array, "ndim", 0):
                continue
            count = batch * math.prod(array.shape[1:]) if spec.batched else math.prod(array.shape)
            total += count * array.dtype.itemsize
            continue
        try:
            total += math.prod(resolve_shape(spec, batch, overrides)) * np.dtype(spec.dtype).itemsize
        except (ProbeDataError, TypeError):
            continue
    return total


def check(model: Any, inputs_bytes: int, batch: int, remedy: str | None) -> None:
    """Refuse (budget.OverBudgetError, exit 2) a forward pass at ``batch`` whose lower bound exceeds the
    memory budget; ``inputs_bytes`` are the fed inputs, ``remedy`` says which option lowers the batch size."""
    node_bytes, where = busiest_layer(model, batch)
    parts = [f"inputs {budget.format_size(inputs_bytes)}"]
    if where is not None:
        parts.append(f"{budget.format_size(node_bytes)} at layer {where}")
    budget.check(
        inputs_bytes + node_bytes,
        f"keras at batch size {batch} ({' + '.join(parts)})",
        remedy=remedy,
        lower_bound=True,
    )
