"""A lower bound of the memory one Keras forward pass needs at a batch size, from the layers' symbolic shapes.

As for ONNX (``backends/onnx/memory.py``): the fed inputs plus, over layers, the most bytes one layer reads
and writes, since an eager call holds a layer's inputs and its output at once. Shapes are the functional
graph's (each layer's ``input`` and ``output`` KerasTensors, nested models included), with the batch dim set
to the batch size. Where the model's inputs leave another dim open (a sequence length, an image's height
and width), those shapes size nothing, so the layers are sized by Keras's own shape computation for one
sample as fed (:func:`sample_calls`). A tensor with a dim still unknown counts 0, and so does a layer called
more than once outside :func:`sample_calls` (Keras then gives no single ``input``/``output``). So the figure
never exceeds what the run needs (a false refusal is worse than a late one).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from bncheck import budget
from bncheck.model import InputSpec
from bncheck.probe_data import probe_feeds

Described = tuple[tuple[Any, ...], str]  # a tensor's shape (batch dim None) and dtype name


def _described(tensor: Any) -> Described:
    return tuple(getattr(tensor, "shape", None) or ()), str(getattr(tensor, "dtype", ""))


def _bytes(described: Described, batch: int) -> int:
    """Bytes of a described tensor with its batch dim (None) set to ``batch``; 0 when a size is unknown."""
    shape, dtype = described
    if not shape:
        return 0
    sizes = [batch if i == 0 and d is None else d for i, d in enumerate(shape)]
    if any(not isinstance(s, int) or s < 0 for s in sizes):
        return 0
    try:
        itemsize = np.dtype(dtype).itemsize
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


Calls = dict[int, list[list[Described]]]  # layer id -> per call: the tensors it reads and writes


def _leaves(model: Any) -> list[Any]:
    """The layers that compute, nested models' included (a nested model's own tensors are its layers')."""
    found, stack = [], list(getattr(model, "layers", []))
    while stack:
        layer = stack.pop()
        if hasattr(layer, "layers"):
            stack.extend(layer.layers)
        else:
            found.append(layer)
    return found


def open_dims(model: Any) -> bool:
    """Whether an input of ``model`` leaves a dim other than the batch unknown (a sequence length, an image's
    height and width): then the functional graph's shapes cannot size the layers (see :func:`sample_calls`)."""
    try:
        inputs = _tensors(model.inputs)
    except (AttributeError, ValueError):
        return False
    return any(getattr(t, "shape", None) is not None and None in tuple(t.shape)[1:] for t in inputs)


def sample_calls(keras: Any, model: Any, arguments: Any) -> Calls | None:
    """Each leaf layer's calls for one sample of concrete shape (``arguments``: KerasTensors shaped as the
    model's call takes them), from Keras's own shape computation (``compute_output_spec``, which runs no
    batch: a layer without a shape rule is traced on one sample); the batch dim is left None. None when
    Keras cannot compute them."""
    calls: Calls = {}
    layers = _leaves(model)

    def recording(layer: Any) -> Any:
        original = layer.compute_output_spec

        def spec(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            read = [t for t in keras.tree.flatten((args, kwargs)) if isinstance(t, keras.KerasTensor)]
            written = [t for t in keras.tree.flatten(out) if isinstance(t, keras.KerasTensor)]
            tensors = {id(t): _described(t) for t in read + written}.values()
            calls.setdefault(id(layer), []).append([((None, *shape[1:]), dtype) for shape, dtype in tensors])
            return out

        return spec

    for layer in layers:  # on the instance, as the probe wraps call; removed below
        object.__setattr__(layer, "compute_output_spec", recording(layer))
    try:
        model.compute_output_spec(arguments)
    except Exception:  # a layer Keras cannot size symbolically: the graph's own shapes only
        return None
    finally:
        for layer in layers:
            object.__delattr__(layer, "compute_output_spec")
    return calls


def busiest_layer(model: Any, batch: int, calls: Calls | None = None) -> tuple[int, str | None]:
    """The most bytes one layer reads and writes at ``batch`` and "'name' (Class)", nested models included;
    (0, None) when no layer's tensors have a known size. From ``calls`` (:func:`sample_calls`) where given,
    else from the functional graph's own tensors."""
    best, where = 0, None
    for layer in _leaves(model):
        if calls is not None:
            per_call = calls.get(id(layer), [])
        else:
            try:
                tensors = _tensors(layer.input) + _tensors(layer.output)
            except (AttributeError, ValueError, RuntimeError):  # called several times, or never: unknown
                continue
            per_call = [[_described(t) for t in {id(t): t for t in tensors}.values()]]
        for tensors in per_call:
            live = sum(_bytes(t, batch) for t in tensors)
            if live > best:
                best, where = live, f"{layer.name!r} ({type(layer).__name__})"
    return best, where


def fed_bytes(
    inputs: list[InputSpec],
    batch: int,
    overrides: Mapping[str, tuple[int, ...]] | None,
    data: Mapping[str, Any] | None = None,
) -> int:
    """Bytes of the inputs fed at ``batch`` (probe_data.probe_feeds' shapes, the data's dtypes or the
    declared ones); an input whose shape or dtype cannot be told counts 0."""
    shapes = probe_feeds(inputs, batch, overrides, data)
    total = 0
    for spec in inputs:
        dtype = data[spec.name].dtype if data is not None and spec.name in data else spec.dtype
        if spec.name in shapes:
            total += _bytes((shapes[spec.name], str(dtype)), batch)
    return total


#: How many times the lower bound Keras's numpy backend was seen to hold (jax's XLA convolutions and their
#: copies): 8.5 on a shipped CNN, about 15 on deepcon's 256x256x441 contact predictor (3.8 GB a sample where the
#: bound is about 0.25 GB). The probe's own runs keep the lower bound (a false refusal is worse than a late
#: one, and the watchdog stops a run past the budget); what bncheck adds on its own, the output effect's one
#: batch of the data, is left out where this many times the bound would not fit the budget.
HELD_FACTOR = 16


def likely_over_budget(bound: int, batch: int) -> str | None:
    """Why a pass of ``batch`` samples whose lower bound is ``bound`` (:func:`lower_bound`) would likely not fit
    the memory budget once Keras holds :data:`HELD_FACTOR` times it, or None where it would."""
    limit = budget.budget()
    if HELD_FACTOR * bound <= limit:
        return None
    need, allowed = budget.format_sizes(HELD_FACTOR * bound, limit)
    return (
        f"one batch of {batch} samples would likely need about {need} ({HELD_FACTOR} times its lower bound "
        f"{budget.format_size(bound)}: Keras's numpy backend holds that much on large convolutions), over the "
        f"memory budget of {allowed}"
    )


def lower_bound(model: Any, inputs_bytes: int, batch: int, calls: Calls | None = None) -> tuple[int, str]:
    """The bytes a forward pass at ``batch`` needs at least (the fed ``inputs_bytes`` and the busiest layer),
    and what they are in words; ``calls`` are the layers sized for concrete inputs (:func:`sample_calls`)
    where the graph leaves dims open."""
    node_bytes, where = busiest_layer(model, batch, calls)
    parts = [f"inputs {budget.format_size(inputs_bytes)}"]
    if where is not None:
        parts.append(f"{budget.format_size(node_bytes)} at layer {where}")
    return inputs_bytes + node_bytes, f"keras at batch size {batch} ({' + '.join(parts)})"


def check(model: Any, inputs_bytes: int, batch: int, remedy: str | None, calls: Calls | None = None) -> None:
    """Refuse (budget.OverBudgetError, exit 2) a forward pass at ``batch`` whose :func:`lower_bound` exceeds the
    memory budget; ``remedy`` says which option lowers the batch size."""
    need, what = lower_bound(model, inputs_bytes, batch, calls)
    budget.check(need, what, remedy=remedy, lower_bound=True)
