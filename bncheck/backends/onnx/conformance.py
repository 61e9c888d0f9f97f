"""onnxruntime's own train-mode BatchNormalization against the ONNX spec, per layer and batch size.

The probe computes every train-mode BN by the spec's decomposition (onnxruntime's CPU kernel deviates from
the spec for some parameters). Whether the runtime's kernel deviates, and by how much, is measured here on
one small model: a copy of each such node with the layer's own parameters and attributes, fed at each probed
batch size with small maps drawn around its running statistics, and compared with the spec's formula. The
probe's own graph then no longer carries the runtime's node beside the decomposition in every batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from bncheck.backends.onnx.cancel import run_options
from bncheck.backends.onnx.runtime_errors import runtime_message
from bncheck.backends.onnx.runtime_ir import runnable_ir_version
from bncheck.backends.onnx.tensors import from_array
from bncheck.model import NormLayer
from bncheck.share import runtime_threads

#: each spatial dim of the conformance input at most this (a 1x1 map stays 1x1: the one-element set case)
SPATIAL = 2
#: largest conformance batch: the deviation depends on the layer's parameters, not on the batch (onnxruntime#29790),
#: and 8 samples of 2x2 maps give each channel 32 elements at half the cost of 32 samples
BATCH = 8
#: the probe's note when onnxruntime refuses the nodes themselves
REFUSED = (
    "onnxruntime cannot run the train-mode BatchNormalization node(s) as written; they are measured by "
    "the ONNX spec only (no runtime deviation)"
)


@dataclass
class RuntimeNode:
    """A train-mode BN node as the model writes it (before the probe replaced it) and its layer."""

    layer: NormLayer
    node: Any  # onnx.NodeProto, a copy
    opset: int
    ir_version: int


def _params(layer: NormLayer) -> list[np.ndarray] | None:
    values = [layer.scale, layer.bias, layer.mean, layer.var]
    if any(v is None for v in values) or layer.epsilon is None or layer.extra.get("spatial", 1) == 0:
        return None
    arrays = [np.asarray(v, np.float32).ravel() for v in values]
    return arrays if len({a.size for a in arrays}) == 1 and arrays[0].size > 0 else None


def _spatial(layer: NormLayer) -> tuple[int, ...] | None:
    shape = layer.input_shape
    if shape is None or len(shape) < 2 or layer.channel_axis != 1 or layer.batch_axis != 0:
        return None
    return tuple(min(d, SPATIAL) if isinstance(d, int) and d > 0 else SPATIAL for d in shape[2:])


def _model(entries: list[tuple[int, RuntimeNode, list[np.ndarray], tuple[int, ...]]]) -> Any:
    import onnx
    from onnx import helper

    nodes: list[Any] = []
    inputs: list[Any] = []
    outputs: list[Any] = []
    inits: list[Any] = []
    for i, entry, params, spatial in entries:
        node = onnx.NodeProto()
        node.CopyFrom(entry.node)
        names = [f"x{i}", *(f"p{i}_{k}" for k in range(4))]
        del node.input[:]
        node.input.extend(names)
        count = len(node.output)
        training = any(a.name == "training_mode" and a.i for a in node.attribute)
        count = max(count, 3) if training else count
        del node.output[:]
        node.output.extend([f"y{i}", *(f"y{i}_{k}" for k in range(1, count))])
        nodes.append(node)
        channels = params[0].size
        inputs.append(helper.make_tensor_value_info(f"x{i}", onnx.TensorProto.FLOAT, ["N", channels, *spatial]))
        outputs.append(helper.make_tensor_value_info(f"y{i}", onnx.TensorProto.FLOAT, None))
        inits.extend(from_array(p, n) for p, n in zip(params, names[1:]))
    graph = helper.make_graph(nodes, "bncheck_conformance", inputs, outputs, inits)
    first = entries[0][1]
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", first.opset)])
    # IR 3 would want every initializer as a graph input; one newer than the runtime reads is refused
    model.ir_version = runnable_ir_version(max(first.ir_version, 4))
    return model


def _spec(x: np.ndarray, params: list[np.ndarray], epsilon: float | np.ndarray) -> np.ndarray:
    """The spec's train-mode output, in float64 (its formula in numpy: onnx.reference's import alone costs
    about 0.1 s per probe); ``epsilon`` is the layer's, or one per channel."""
    per_channel = (1, -1, *([1] * (x.ndim - 2)))
    scale, bias = (p.astype(np.float64).reshape(per_channel) for p in params[:2])
    eps = np.asarray(epsilon, np.float32).astype(np.float64)  # the float32 attribute, as the runtime reads it
    eps = eps.reshape(per_channel) if eps.ndim else eps
    axes = (0, *range(2, x.ndim))
    wide = x.astype(np.float64)
    mean = wide.mean(axis=axes, keepdims=True)
    var = wide.var(axis=axes, keepdims=True)
    return (wide - mean) / np.sqrt(var + eps) * scale + bias


def _inputs(params: list[np.ndarray], spatial: tuple[int, ...], batch: int, rng: np.random.Generator) -> np.ndarray:
    """Maps around the layer's running statistics, so that the numbers have the magnitudes it sees."""
    mean, var = params[2], params[3]
    per_channel = (1, -1, *([1] * len(spatial)))
    with np.errstate(invalid="ignore"):
        loc = np.where(np.isfinite(mean), mean, 0).astype(np.float32).reshape(per_channel)
        spread = np.where(np.isfinite(var) & (var > 0), np.sqrt(np.abs(var)), 1).astype(np.float32).reshape(per_channel)
    draw = rng.standard_normal((batch, mean.size, *spatial), dtype=np.float32)
    return draw * spread + loc


def largest_difference(pairs: Iterable[tuple[np.ndarray, np.ndarray]]) -> float:
    """Largest |a - b| over the finite entries of each pair; inf where the shapes differ or one side is
    finite and the other is not."""
    worst = 0.0
    for a, b in pairs:
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if a.shape != b.shape or np.any(np.isfinite(a) != np.isfinite(b)):
            return math.inf
        both = np.isfinite(a) & np.isfinite(b)
        if both.any():
            worst = max(worst, float(np.max(np.abs(a[both] - b[both]))))
    return worst


def runtime_deviations(
    nodes: list[RuntimeNode], batch_sizes: tuple[int, ...], seed: int = 0
) -> tuple[dict[str, dict[int, float]], str | None]:
    """Largest |runtime - spec| of each layer's output (see :func:`_deviations`) per layer name and batch
    size (at most :data:`BATCH` samples run); a note when onnxruntime refuses the nodes (then no numbers)."""
    entries = []
    for i, entry in enumerate(nodes):
        params, spatial = _params(entry.layer), _spatial(entry.layer)
        if params is not None and spatial is not None:
            entries.append((i, entry, params, spatial))
    if not entries:
        return {}, None
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # a refusal is expected and becomes the note; nothing on stderr
    options.intra_op_num_threads = runtime_threads()
    try:
        session = ort.InferenceSession(_model(entries).SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception:
        return {}, REFUSED
    found: dict[str, dict[int, float]] = {}
    rng = np.random.default_rng(seed)
    for batch in batch_sizes:
        feeds = {f"x{i}": _inputs(params, spatial, min(batch, BATCH), rng) for i, _, params, spatial in entries}
        try:
            values = session.run([f"y{i}" for i, *_ in entries], feeds, run_options())
        except Exception as exc:
            return {}, f"{REFUSED}: {runtime_message(exc)}"
        with np.errstate(all="ignore"):
            deviations = _deviations([feeds[f"x{i}"] for i, *_ in entries], [np.asarray(v) for v in values], entries)
        for (_, entry, _, _), deviation in zip(entries, deviations):
            found.setdefault(entry.layer.name, {})[batch] = deviation
    return found, None


def _deviations(xs: list[np.ndarray], runtimes: list[np.ndarray], entries: list[Any]) -> list[float]:
    """Each layer's largest |runtime - spec| of the per-sample channel means and the channel min and max (the
    numbers the probe's statistics hold; inf where one side is finite and the other is not, or the shapes
    differ). The layers of one spatial shape are computed side by side on the channel axis: the spec and the
    summaries are per channel, so one set of numpy calls serves them all (a call per layer cost a 49-layer
    model 40 ms per probe)."""
    out = [math.inf] * len(entries)  # stays for a runtime output of another shape than its input
    groups: dict[tuple[int, ...], list[int]] = {}
    for k, (x, runtime) in enumerate(zip(xs, runtimes)):
        if runtime.shape == x.shape:
            groups.setdefault(x.shape[2:], []).append(k)
    for members in groups.values():
        sizes = [xs[k].shape[1] for k in members]
        eps = np.repeat([entries[k][1].layer.epsilon or 0.0 for k in members], sizes)
        params = [np.concatenate([entries[k][2][j] for k in members]) for j in (0, 1)]
        spec = _spec(np.concatenate([xs[k] for k in members], axis=1), params, eps)
        runtime = np.concatenate([runtimes[k] for k in members], axis=1).astype(np.float64)
        worst, mismatch = _per_channel(runtime, spec)
        starts = np.cumsum([0, *sizes[:-1]])
        for k, w, bad in zip(members, np.maximum.reduceat(worst, starts), np.logical_or.reduceat(mismatch, starts)):
            out[k] = math.inf if bad else float(w)
    return out


def _per_channel(runtime: np.ndarray, spec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per channel: the largest |runtime - spec| over the summaries (0 where no entry is finite on both
    sides), and whether one side is finite where the other is not."""
    n, c = spec.shape[:2]
    worst = np.zeros(c)
    mismatch = np.zeros(c, bool)
    for a, b in zip(_summary(runtime, n, c), _summary(spec, n, c)):
        a, b = np.atleast_2d(a), np.atleast_2d(b)  # the [c] min and max as one row
        fa, fb = np.isfinite(a), np.isfinite(b)
        worst = np.maximum(worst, np.where(fa & fb, np.abs(a - b), 0.0).max(axis=0))
        mismatch |= (fa != fb).any(axis=0)
    return worst, mismatch


def _summary(a: np.ndarray, n: int, c: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The per-sample channel means ([n, c]) and the channel min and max ([c]) of a [n, c, ...] tensor."""
    per_sample = a.reshape(n, c, -1)
    per_channel = np.ascontiguousarray(per_sample.transpose(1, 0, 2)).reshape(c, -1)
    return per_sample.mean(axis=2), per_channel.min(axis=1), per_channel.max(axis=1)
