"""Write bncheck's ONNX sample models: one small model per defect plus clean ones.

Why a script and not hand-picked files: every sample is rebuilt byte for byte from this file (onnx.helper and
numpy with fixed seeds; no timestamps, fixed IR version and producer), so a reviewer can read exactly what each
model contains, and ``tests/test_sample_models.py`` proves the committed files are what this script writes.

Run:  python sample_models/make_onnx_samples.py [--out DIR]

What each file is, and the findings bncheck must produce on it, is in sample_models/README.md and (machine
readable) sample_models/expected.json. Node names are explicit so that layer names stay stable.

Numbers that need data (the drift pair) are computed here in float64 numpy, not with onnxruntime: numpy's
float64 arithmetic rounded to float32 gives the same bytes on any CPU, onnxruntime's float32 kernels may not.
"""

from __future__ import annotations

import argparse
import io
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SEED = 20261125
IR_VERSION = 8  # fixed, so that a newer onnx (whose make_model default differs) still writes the same bytes
PRODUCER = "bncheck-sample-models"
PRODUCER_VERSION = "1"
IMAGE = (3, 16, 16)  # C, H, W of every image model's input
EPS = 1e-5  # stored as float32 9.99999975e-06, the PyTorch/ONNX default

# The drift pair: the data distribution, how many EMA updates the stale model saw, how big the "large sample"
# for the matching model's exact statistics is, and the calibration file size.
DRIFT_MEAN = np.array([2.5, -1.5, 4.0])
DRIFT_STD = np.array([2.0, 3.0, 1.5])
DRIFT_SAMPLE_SHIFT = 0.3  # per-sample, per-channel offset (in units of DRIFT_STD): samples differ
EMA_DECAY = 0.999
EMA_STEPS = 20
EMA_BATCH = 32
LARGE_SAMPLE = 2048
CALIB_SAMPLES = 64
CALIB_FILE = "calib_drift.npz"


def rng_for(name: str) -> np.random.Generator:
    """One independent, stable stream per model: adding a model never changes another model's bytes."""
    return np.random.default_rng([SEED, zlib.crc32(name.encode())])


# --------------------------------------------------------------------------- graph building


@dataclass
class Graph:
    """A thin accumulator over onnx.helper: nodes in order, initializers, explicit names everywhere."""

    name: str
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    inits: list[onnx.TensorProto] = field(default_factory=list)

    def const(self, name: str, value: np.ndarray | list, dtype: type = np.float32) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], name: str, outputs: list[str] | None = None, **attrs) -> str:
        outs = outputs if outputs is not None else [name]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, **attrs))
        return outs[0]

    def model(
        self, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto], opset: int, doc: str
    ) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, inputs, outputs, initializer=self.inits)
        return helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", opset)],
            ir_version=IR_VERSION,
            producer_name=PRODUCER,
            producer_version=PRODUCER_VERSION,
            doc_string=doc,
        )


def image_input(name: str = "input") -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", *IMAGE])


def logits_output(classes: int = 10) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])


@dataclass
class BNParams:
    """One BatchNormalization's parameters (float32) and attributes."""

    scale: np.ndarray
    bias: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    epsilon: float = EPS
    momentum: float = 0.9
    training: bool = False


def trained_bn(rng: np.random.Generator, channels: int) -> BNParams:
    """Parameters that look trained: nothing at its initial value, variances well above epsilon.

    scale and running variance are drawn from different ranges and bias and running mean from different
    distributions, so that no two of these arrays are equal (onnxruntime's train-mode kernel misbehaves when
    bias equals running mean or scale equals running variance; DEVELOPERS.md, "Facts").
    """
    return BNParams(
        scale=rng.uniform(0.6, 1.4, channels).astype(np.float32),
        bias=rng.normal(0.05, 0.2, channels).astype(np.float32),
        mean=rng.normal(-0.1, 0.5, channels).astype(np.float32),
        var=np.exp(rng.uniform(np.log(0.3), np.log(2.5), channels)).astype(np.float32),
    )


def conv_weights(rng: np.random.Generator, cin: int, cout: int, k: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """He-initialized weights and a small bias, as an untrained but healthy conv layer would have."""
    w = rng.normal(0.0, np.sqrt(2.0 / (cin * k * k)), (cout, cin, k, k)).astype(np.float32)
    b = rng.normal(0.0, 0.05, cout).astype(np.float32)
    return w, b


def add_conv(g: Graph, x: str, name: str, w: np.ndarray, b: np.ndarray, stride: int) -> str:
    k = w.shape[2]
    pad = k // 2
    return g.op(
        "Conv",
        [x, g.const(f"{name}.weight", w), g.const(f"{name}.bias", b)],
        name,
        kernel_shape=[k, k],
        strides=[stride, stride],
        pads=[pad] * 4,
    )


def add_bn(g: Graph, x: str, name: str, p: BNParams) -> str:
    """BatchNormalization-15; a train-mode node gets its three outputs (one output fails onnxruntime's shape
    inference), the running outputs left unused as an exporter leaves them."""
    inputs = [
        x,
        g.const(f"{name}.scale", p.scale),
        g.const(f"{name}.bias", p.bias),
        g.const(f"{name}.running_mean", p.mean),
        g.const(f"{name}.running_var", p.var),
    ]
    if p.training:
        outputs = [name, f"{name}.running_mean_out", f"{name}.running_var_out"]
        return g.op(
            "BatchNormalization", inputs, name, outputs, epsilon=p.epsilon, momentum=p.momentum, training_mode=1
        )
    return g.op("BatchNormalization", inputs, name, epsilon=p.epsilon, momentum=p.momentum)


def add_head(g: Graph, x: str, rng: np.random.Generator, channels: int, classes: int = 10, pool: bool = True) -> None:
    """Global average pooling (optional), Flatten, Gemm -> "logits"."""
    if pool:
        x = g.op("GlobalAveragePool", [x], "gap")
    x = g.op("Flatten", [x], "flatten", axis=1)
    w = rng.normal(0.0, np.sqrt(1.0 / channels), (channels, classes)).astype(np.float32)
    b = rng.normal(0.0, 0.05, classes).astype(np.float32)
    g.op("Gemm", [x, g.const("fc.weight", w), g.const("fc.bias", b)], "fc", ["logits"])


# --------------------------------------------------------------------------- the Conv+BN+Relu x3 convnet

#: (name, in channels, out channels, stride): 16x16 -> 16x16 -> 8x8 -> 4x4, so every BN sees >= 4x4 maps.
CONVNET = (("1", 3, 8, 1), ("2", 8, 16, 2), ("3", 16, 16, 2))


@dataclass
class ConvNetParams:
    convs: dict[str, tuple[np.ndarray, np.ndarray]]
    bns: dict[str, BNParams]
    fc_rng: np.random.Generator


def convnet_params(rng: np.random.Generator) -> ConvNetParams:
    convs = {n: conv_weights(rng, cin, cout) for n, cin, cout, _ in CONVNET}
    bns = {n: trained_bn(rng, cout) for n, _, cout, _ in CONVNET}
    return ConvNetParams(convs, bns, rng)


def convnet(name: str, params: ConvNetParams, doc: str, opset: int = 15) -> onnx.ModelProto:
    """input[batch,3,16,16] -> (conv{i} -> bn{i} -> relu{i}) x3 -> gap -> flatten -> fc -> logits."""
    g = Graph(name)
    x = "input"
    for n, _, cout, stride in CONVNET:
        w, b = params.convs[n]
        x = add_conv(g, x, f"conv{n}", w, b, stride)
        x = add_bn(g, x, f"bn{n}", params.bns[n])
        x = g.op("Relu", [x], f"relu{n}")
    add_head(g, x, params.fc_rng, CONVNET[-1][2])
    return g.model([image_input()], [logits_output()], opset, doc)


def convnet_variant(
    name: str, doc: str, change: Callable[[ConvNetParams, np.random.Generator], None], opset: int = 15
) -> onnx.ModelProto:
    rng = rng_for(name)
    params = convnet_params(rng)
    change(params, rng)
    return convnet(name, params, doc, opset)


# --------------------------------------------------------------------------- the samples


def clean_bn_convnet() -> onnx.ModelProto:
    return convnet_variant(
        "clean_bn_convnet",
        "Clean: Conv+BN+Relu x3, inference BNs, trained-looking statistics, epsilon 1e-5.",
        lambda p, r: None,
    )


def train_mode_bn() -> onnx.ModelProto:
    def change(p: ConvNetParams, rng: np.random.Generator) -> None:
        for bn in p.bns.values():
            bn.training = True

    return convnet_variant(
        "train_mode_bn",
        "Defect: every BatchNormalization has training_mode=1 (batch "
        "statistics at inference); maps >= 4x4, so no collapse.",
        change,
    )


def stale_stats() -> onnx.ModelProto:
    def change(p: ConvNetParams, rng: np.random.Generator) -> None:
        for n in ("1", "2"):
            p.bns[n].mean = np.zeros_like(p.bns[n].mean)
            p.bns[n].var = np.ones_like(p.bns[n].var)
        # Negative control: bn3 has the initial values in only half its channels, which is not "never updated".
        half = p.bns["3"].mean.size // 2
        p.bns["3"].mean[:half] = 0.0
        p.bns["3"].var[:half] = 1.0

    return convnet_variant(
        "stale_stats",
        "Defect: bn1 and bn2 keep the initial running statistics (mean 0, "
        "var 1 in every channel: update ops never ran). bn3 has them in half its channels "
        "only (not stale).",
        change,
    )


def collapse_1x1_train_mode() -> onnx.ModelProto:
    """The seed-000 case: the last BN, in training mode, sits on 1x1 maps after global pooling."""
    name = "collapse_1x1_train_mode"
    rng = rng_for(name)
    g = Graph(name)
    x = "input"
    for n, cin, cout, stride in CONVNET[:2]:
        w, b = conv_weights(rng, cin, cout)
        x = add_conv(g, x, f"conv{n}", w, b, stride)
        x = add_bn(g, x, f"bn{n}", trained_bn(rng, cout))
        x = g.op("Relu", [x], f"relu{n}")
    x = g.op("GlobalAveragePool", [x], "gap")
    head = trained_bn(rng, 16)
    head.training = True
    x = add_bn(g, x, "head_bn", head)
    add_head(g, x, rng, 16, pool=False)
    doc = (
        "Defect (seed 000): global average pooling to 1x1, then a training_mode=1 BatchNormalization "
        "(head_bn): at batch size 1 it normalizes one value per channel, so its output is its bias for "
        "every input and the logits are constant. bn1, bn2: inference mode, clean."
    )
    return g.model([image_input()], [logits_output()], 15, doc)


def epsilon_1e_8() -> onnx.ModelProto:
    def change(p: ConvNetParams, rng: np.random.Generator) -> None:
        p.bns["2"].epsilon = 1e-8
        p.bns["2"].var[3] = 2e-4  # a low-variance channel, where TensorFlow's clamp to 1.001e-5 changes ~2.4%

    return convnet_variant(
        "epsilon_1e-8",
        "Defect: bn2 has epsilon 1e-8, below the 1.001e-5 TensorFlow/cuDNN "
        "clamp (runtimes disagree); its channel 3 has running variance 2e-4.",
        change,
    )


def epsilon_zero_zero_var() -> onnx.ModelProto:
    def change(p: ConvNetParams, rng: np.random.Generator) -> None:
        p.bns["2"].epsilon = 0.0
        p.bns["2"].var[5] = 0.0

    return convnet_variant(
        "epsilon_zero_zero_var",
        "Defect: bn2 has epsilon 0 and channel 5 has running "
        "variance exactly 0: division by zero at inference (Inf/NaN).",
        change,
    )


def nan_gamma() -> onnx.ModelProto:
    def change(p: ConvNetParams, rng: np.random.Generator) -> None:
        p.bns["2"].scale[2] = np.nan

    return convnet_variant("nan_gamma", "Defect: bn2's scale (gamma) is NaN in channel 2.", change)


def negative_variance() -> onnx.ModelProto:
    def change(p: ConvNetParams, rng: np.random.Generator) -> None:
        p.bns["2"].var[7] = -0.25

    return convnet_variant(
        "negative_variance",
        "Defect: bn2's running variance is -0.25 in channel 7 (sqrt of a negative number: NaN at inference).",
        change,
    )


def layernorm_transformer_block() -> onnx.ModelProto:
    """Pre-LN transformer block, single-head attention, [batch, 8, 32]; clean."""
    name = "layernorm_transformer_block"
    rng = rng_for(name)
    seq, d, hidden = 8, 32, 64
    g = Graph(name)

    def ln(x: str, lname: str) -> str:
        scale = g.const(f"{lname}.weight", rng.uniform(0.7, 1.3, d))
        bias = g.const(f"{lname}.bias", rng.normal(0.0, 0.1, d))
        return g.op("LayerNormalization", [x, scale, bias], lname, axis=-1, epsilon=EPS)

    def linear(x: str, lname: str, cin: int, cout: int) -> str:
        w = g.const(f"{lname}.weight", rng.normal(0.0, np.sqrt(1.0 / cin), (cin, cout)))
        b = g.const(f"{lname}.bias", rng.normal(0.0, 0.02, cout))
        return g.op("Add", [g.op("MatMul", [x, w], f"{lname}_matmul"), b], f"{lname}_add")

    h = ln("x", "ln1")
    q, k, v = (linear(h, n, d, d) for n in ("q_proj", "k_proj", "v_proj"))
    kt = g.op("Transpose", [k], "k_transpose", perm=[0, 2, 1])
    scores = g.op("MatMul", [q, kt], "scores")
    scores = g.op("Mul", [scores, g.const("attn_scale", np.float32(1.0 / np.sqrt(d)))], "scores_scaled")
    attn = g.op("Softmax", [scores], "softmax", axis=-1)
    ctx = g.op("MatMul", [attn, v], "context")
    x1 = g.op("Add", ["x", linear(ctx, "o_proj", d, d)], "residual1")
    h2 = ln(x1, "ln2")
    m = g.op("Relu", [linear(h2, "mlp_fc1", d, hidden)], "mlp_relu")
    g.op("Add", [x1, linear(m, "mlp_fc2", hidden, d)], "residual2", ["y"])
    io_ = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", seq, d]) for n in ("x", "y")]
    return g.model(
        io_[:1],
        io_[1:],
        17,
        "Clean: pre-LN transformer block with LayerNormalization (ln1, ln2; axis -1, epsilon 1e-5) on [batch, 8, 32].",
    )


def add_handwritten_bn(g: Graph, x: str, prefix: str, rng: np.random.Generator, channels: int, eps: float) -> str:
    """tf.nn.moments + tf.nn.batch_normalization as exported: moments over (0, 2, 3), i.e. over the batch."""
    axes = [0, 2, 3]
    mean = g.op("ReduceMean", [x], f"{prefix}_mean", axes=axes, keepdims=1)
    centered = g.op("Sub", [x, mean], f"{prefix}_sub")
    sq = g.op("Mul", [centered, centered], f"{prefix}_square")
    var = g.op("ReduceMean", [sq], f"{prefix}_var", axes=axes, keepdims=1)
    var_eps = g.op("Add", [var, g.const(f"{prefix}.epsilon", np.float32(eps))], f"{prefix}_add_eps")
    std = g.op("Sqrt", [var_eps], f"{prefix}_sqrt")
    normed = g.op("Div", [centered, std], f"{prefix}_div")
    gamma = g.const(f"{prefix}.gamma", rng.uniform(0.6, 1.4, (1, channels, 1, 1)))
    beta = g.const(f"{prefix}.beta", rng.normal(0.05, 0.2, (1, channels, 1, 1)))
    return g.op("Add", [g.op("Mul", [normed, gamma], f"{prefix}_gamma"), beta], f"{prefix}_beta")


def handwritten_batch_moments() -> onnx.ModelProto:
    name = "handwritten_batch_moments"
    rng = rng_for(name)
    g = Graph(name)
    w, b = conv_weights(rng, 3, 8)
    x = add_conv(g, "input", "conv1", w, b, 2)
    x = add_handwritten_bn(g, x, "hbn", rng, 8, 1e-3)
    x = g.op("Relu", [x], "relu1")
    w, b = conv_weights(rng, 8, 16)
    x = add_conv(g, x, "conv2", w, b, 2)
    x = add_bn(g, x, "bn2", trained_bn(rng, 16))
    x = g.op("Relu", [x], "relu2")
    add_head(g, x, rng, 16)
    doc = (
        "Defect: a hand-written batch norm (ReduceMean over axes 0,2,3 -> Sub -> Mul -> ReduceMean -> "
        "Add(1e-3) -> Sqrt -> Div, then gamma/beta) on 8x8 maps: batch statistics at inference, so a "
        "sample's output depends on its batch companions. bn2: inference BatchNormalization, clean."
    )
    return g.model([image_input()], [logits_output()], 15, doc)


def instancenorm_lowered_to_bn() -> onnx.ModelProto:
    """What torch.onnx (dynamo, torchlib) writes for InstanceNorm2d(affine=True): reshape to [1, N*C, H, W],
    BatchNormalization in training mode with computed running statistics and unused running outputs,
    reshape back, then the affine Mul/Add. It is an instance norm: clean."""
    name = "instancenorm_lowered_to_bn"
    rng = rng_for(name)
    g = Graph(name)
    w, b = conv_weights(rng, 3, 8)
    x = add_conv(g, "input", "conv1", w, b, 2)
    x = add_bn(g, x, "bn1", trained_bn(rng, 8))
    h = g.op("Relu", [x], "relu1")
    xr = g.op("Reshape", [h, g.const("instnorm.reshape_shape", [1, -1, 8, 8], np.int64)], "instnorm_reshape")
    axes = g.const("instnorm.axes", [0, 2, 3], np.int64)
    rmean = g.op(
        "Squeeze", [g.op("ReduceMean", [xr, axes], "instnorm_running_mean_reduce", keepdims=1)], "instnorm_running_mean"
    )
    mean = g.op("ReduceMean", [xr, axes], "instnorm_mean", keepdims=1)
    centered = g.op("Sub", [xr, mean], "instnorm_sub")
    sq = g.op("Mul", [centered, centered], "instnorm_square")
    rvar = g.op("Squeeze", [g.op("ReduceMean", [sq, axes], "instnorm_var_reduce", keepdims=1)], "instnorm_running_var")
    channels = g.op("Shape", [xr], "instnorm_channels", start=1, end=2)
    ones = g.op("Expand", [g.const("instnorm.one", [1.0]), channels], "instnorm_scale")
    zeros = g.op("Expand", [g.const("instnorm.zero", [0.0]), channels], "instnorm_bias")
    y = g.op(
        "BatchNormalization",
        [xr, ones, zeros, rmean, rvar],
        "instnorm_bn",
        ["instnorm_bn", "instnorm_bn.running_mean_out", "instnorm_bn.running_var_out"],
        epsilon=EPS,
        momentum=0.9,
        training_mode=1,
    )
    shape = g.op("Shape", [h], "instnorm_shape")
    y = g.op("Reshape", [y, shape], "instnorm_reshape_back")
    y = g.op("Mul", [y, g.const("instnorm.weight", rng.uniform(0.6, 1.4, (8, 1, 1)))], "instnorm_affine_mul")
    y = g.op("Add", [y, g.const("instnorm.bias", rng.normal(0.05, 0.2, (8, 1, 1)))], "instnorm_affine_add")
    x = g.op("Relu", [y], "relu2")
    w, b = conv_weights(rng, 8, 16)
    x = add_conv(g, x, "conv2", w, b, 2)
    x = add_bn(g, x, "bn2", trained_bn(rng, 16))
    x = g.op("Relu", [x], "relu3")
    add_head(g, x, rng, 16)
    doc = (
        "Clean (trap): InstanceNorm2d as torch.onnx's dynamo exporter lowers it: Reshape to [1, N*C, 8, 8], "
        "BatchNormalization training_mode=1 (instnorm_bn) whose running inputs are computed and running "
        "outputs unused, Reshape back, affine Mul/Add. Per-sample statistics: not a train-mode bug."
    )
    return g.model([image_input()], [logits_output()], 18, doc)


def layernorm_size1_axis() -> onnx.ModelProto:
    """LayerNorm over a feature axis of size 1: the normalized set has one element, output = bias."""
    name = "layernorm_size1_axis"
    rng = rng_for(name)
    g = Graph(name)
    x = g.op(
        "LayerNormalization",
        ["x", g.const("ln_feature.weight", [1.3]), g.const("ln_feature.bias", [0.25])],
        "ln_feature",
        axis=-1,
        epsilon=EPS,
    )
    x = g.op("MatMul", [x, g.const("proj.weight", rng.normal(0.0, 1.0, (1, 16)))], "proj")
    x = g.op("Relu", [x], "relu")
    g.op("MatMul", [x, g.const("out.weight", rng.normal(0.0, 0.25, (16, 4)))], "out", ["y"])
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8, 1])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8, 4])]
    return g.model(
        inputs,
        outputs,
        17,
        "Defect: LayerNormalization (ln_feature) over the last axis, of size 1: "
        "its output is its bias (0.25) for every input, at every batch size.",
    )


def instancenorm_1x1() -> onnx.ModelProto:
    name = "instancenorm_1x1"
    rng = rng_for(name)
    g = Graph(name)
    x = "input"
    for n, cin, cout, stride in CONVNET[:2]:
        w, b = conv_weights(rng, cin, cout)
        x = add_conv(g, x, f"conv{n}", w, b, stride)
        x = add_bn(g, x, f"bn{n}", trained_bn(rng, cout))
        x = g.op("Relu", [x], f"relu{n}")
    x = g.op("GlobalAveragePool", [x], "gap")
    x = g.op(
        "InstanceNormalization",
        [x, g.const("in_gap.scale", rng.uniform(0.6, 1.4, 16)), g.const("in_gap.bias", rng.normal(0.05, 0.2, 16))],
        "in_gap",
        epsilon=EPS,
    )
    add_head(g, x, rng, 16, pool=False)
    return g.model(
        [image_input()],
        [logits_output()],
        15,
        "Defect: InstanceNormalization (in_gap) on 1x1 maps "
        "after global pooling: one element per instance and channel, output = its bias for every "
        "input. bn1, bn2: inference mode, clean.",
    )


def nan_midnetwork() -> onnx.ModelProto:
    """NaN made by the graph itself (a Log of a negative value), upstream of bn2; bn3 only inherits it."""
    name = "nan_midnetwork"
    rng = rng_for(name)
    params = convnet_params(rng)
    g = Graph(name)
    x = "input"
    for n, _, cout, stride in CONVNET:
        w, b = params.convs[n]
        x = add_conv(g, x, f"conv{n}", w, b, stride)
        x = add_bn(g, x, f"bn{n}", params.bns[n])
        x = g.op("Relu", [x], f"relu{n}")
        if n == "1":
            shift = np.ones((1, 8, 1, 1), np.float32)
            shift[0, 4] = -5.0  # log(relu + 1) everywhere except channel 4: log(relu - 5) is NaN where relu < 5
            x = g.op("Add", [x, g.const("log_shift", shift)], "log_shift_add")
            x = g.op("Log", [x], "log")
    add_head(g, x, params.fc_rng, 16)
    return g.model(
        [image_input()],
        [logits_output()],
        15,
        "Defect: a Log of a negative value after relu1 makes "
        "NaN mid-network; bn2 is the first normalization layer that sees it (bn3 inherits it). "
        "Every parameter is finite.",
    )


def clean_resnet() -> onnx.ModelProto:
    """ResNet-like: stem, one identity block, one downsampling block with a projection shortcut."""
    name = "clean_resnet"
    rng = rng_for(name)
    g = Graph(name)

    def conv_bn(x: str, prefix: str, cin: int, cout: int, stride: int, k: int = 3, relu: bool = True) -> str:
        w, b = conv_weights(rng, cin, cout, k)
        x = add_conv(g, x, f"{prefix}_conv", w, b, stride)
        x = add_bn(g, x, f"{prefix}_bn", trained_bn(rng, cout))
        return g.op("Relu", [x], f"{prefix}_relu") if relu else x

    x = conv_bn("input", "stem", 3, 8, 1)
    y = conv_bn(conv_bn(x, "b1_1", 8, 8, 1), "b1_2", 8, 8, 1, relu=False)
    x = g.op("Relu", [g.op("Add", [x, y], "b1_add")], "b1_relu")
    y = conv_bn(conv_bn(x, "b2_1", 8, 16, 2), "b2_2", 16, 16, 1, relu=False)
    short = conv_bn(x, "b2_down", 8, 16, 2, k=1, relu=False)
    x = g.op("Relu", [g.op("Add", [short, y], "b2_add")], "b2_relu")
    add_head(g, x, rng, 16)
    return g.model(
        [image_input()],
        [logits_output()],
        15,
        "Clean: ResNet-like (stem, identity block, "
        "downsampling block with projection shortcut), random weights, trained-looking statistics.",
    )


# --------------------------------------------------------------------------- the drift pair (numpy, float64)


def drift_samples(rng: np.random.Generator, n: int) -> np.ndarray:
    """The data distribution the drift pair's statistics refer to (float32, as a model would be fed)."""
    noise = rng.standard_normal((n, *IMAGE))
    shift = DRIFT_SAMPLE_SHIFT * rng.standard_normal((n, IMAGE[0], 1, 1))
    x = DRIFT_MEAN[None, :, None, None] + DRIFT_STD[None, :, None, None] * (noise + shift)
    return x.astype(np.float32)


def np_conv(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int) -> np.ndarray:
    """Conv2d (same padding, odd kernel) in float64: the upstream of a BN, for exact statistics."""
    k = w.shape[2]
    xp = np.pad(x, ((0, 0), (0, 0), (k // 2, k // 2), (k // 2, k // 2)))
    win = np.lib.stride_tricks.sliding_window_view(xp, (k, k), axis=(2, 3))[:, :, ::stride, ::stride]
    n, c, h, wd = win.shape[:4]
    cols = np.ascontiguousarray(win.transpose(0, 2, 3, 1, 4, 5)).reshape(n * h * wd, c * k * k)
    y = cols @ w.reshape(w.shape[0], -1).astype(np.float64).T + b.astype(np.float64)
    return y.reshape(n, h, wd, -1).transpose(0, 3, 1, 2)


def np_bn(x: np.ndarray, p: BNParams, mean: np.ndarray, var: np.ndarray) -> np.ndarray:
    shape = (1, -1, 1, 1)
    scale = p.scale.astype(np.float64).reshape(shape)
    return (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + p.epsilon) * scale + p.bias.astype(
        np.float64
    ).reshape(shape)


def bn_input_moments(params: ConvNetParams, x: np.ndarray, layer: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and population variance of bn{layer}'s input, upstream BNs in inference mode with
    their stored statistics (what an inference-mode probe observes)."""
    h = x.astype(np.float64)
    for n, _, _, stride in CONVNET:
        h = np_conv(h, *params.convs[n], stride)
        if n == layer:
            return h.mean(axis=(0, 2, 3)), h.var(axis=(0, 2, 3))
        p = params.bns[n]
        h = np.maximum(np_bn(h, p, p.mean.astype(np.float64), p.var.astype(np.float64)), 0.0)
    raise KeyError(layer)


def drift_base() -> ConvNetParams:
    """The weights both drift models share (only the BN statistics and the momentum attribute differ)."""
    return convnet_params(rng_for("drift_pair"))


def calibrate_exact(params: ConvNetParams, data: np.ndarray, chunk: int = 256) -> None:
    """Set every BN's running statistics to the exact statistics of its input over ``data``, layer by layer
    (each layer measured with the upstream layers already set), as a model trained to convergence has."""
    assert len(data) % chunk == 0, "equal chunks, so that chunk moments average to the whole's"
    for n, _, _, _ in CONVNET:
        moments = [bn_input_moments(params, data[start : start + chunk], n) for start in range(0, len(data), chunk)]
        mean = np.mean([m for m, _ in moments], axis=0)
        mean_sq = np.mean([v + m * m for m, v in moments], axis=0)
        params.bns[n].mean = mean.astype(np.float32)
        params.bns[n].var = (mean_sq - mean * mean).astype(np.float32)


def ema_updates(params: ConvNetParams, rng: np.random.Generator) -> None:
    """A few training steps' worth of EMA updates from the initial (0, 1), with decay EMA_DECAY.

    In training every BN normalizes with its batch's statistics; a train-mode BN on a batch is an inference
    BN whose running statistics are that batch's, which is how the upstream is computed here.
    """
    running = {n: (np.zeros(cout), np.ones(cout)) for n, _, cout, _ in CONVNET}
    for _ in range(EMA_STEPS):
        batch = drift_samples(rng, EMA_BATCH).astype(np.float64)
        h = batch
        for n, _, _, stride in CONVNET:
            h = np_conv(h, *params.convs[n], stride)
            m, v = h.mean(axis=(0, 2, 3)), h.var(axis=(0, 2, 3))
            rm, rv = running[n]
            running[n] = (EMA_DECAY * rm + (1 - EMA_DECAY) * m, EMA_DECAY * rv + (1 - EMA_DECAY) * v)
            h = np.maximum(np_bn(h, params.bns[n], m, v), 0.0)
    for n, (rm, rv) in running.items():
        params.bns[n].mean = rm.astype(np.float32)
        params.bns[n].var = rv.astype(np.float32)
        params.bns[n].momentum = EMA_DECAY


def drift_metrics(params: ConvNetParams, data: np.ndarray) -> dict[str, tuple[float, float]]:
    """Per BN: median over channels of |m - mu| / sqrt(var + eps) and of |log(v / var)|, m, v observed on
    ``data`` in inference mode, mu, var stored. The quantities bncheck's drift check is specified on."""
    out = {}
    for n, _, _, _ in CONVNET:
        p = params.bns[n]
        m, v = bn_input_moments(params, data, n)
        mu, var = p.mean.astype(np.float64), p.var.astype(np.float64)
        shift = np.abs(m - mu) / np.sqrt(var + p.epsilon)
        ratio = np.abs(np.log(v / var))
        out[f"bn{n}"] = (float(np.median(shift)), float(np.median(ratio)))
    return out


def calib_data() -> np.ndarray:
    return drift_samples(rng_for("calib_drift"), CALIB_SAMPLES)


def trained_matching_params() -> ConvNetParams:
    params = drift_base()
    calibrate_exact(params, drift_samples(rng_for("trained_matching_large_sample"), LARGE_SAMPLE))
    return params


def stale_drift_params() -> ConvNetParams:
    params = drift_base()
    ema_updates(params, rng_for("stale_drift_training_batches"))
    return params


def trained_matching() -> onnx.ModelProto:
    return convnet(
        "trained_matching",
        trained_matching_params(),
        "Clean with its data: running statistics "
        f"computed exactly (layer by layer, {LARGE_SAMPLE} samples) from the distribution "
        f"{CALIB_FILE} is drawn from. Same weights as stale_drift.onnx.",
    )


def stale_drift() -> onnx.ModelProto:
    return convnet(
        "stale_drift",
        stale_drift_params(),
        f"Defect visible with data: running statistics after "
        f"{EMA_STEPS} EMA updates (decay {EMA_DECAY}) from (0, 1): far from the statistics of "
        f"{CALIB_FILE}'s distribution. Same weights as trained_matching.onnx.",
    )


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An .npz (what numpy.load reads) with fixed zip timestamps: numpy.savez stamps the current time."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for key, array in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)
            zf.writestr(zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0)), member.getvalue())
    return buf.getvalue()


# --------------------------------------------------------------------------- writing

SAMPLES: dict[str, Callable[[], onnx.ModelProto]] = {
    "clean_bn_convnet.onnx": clean_bn_convnet,
    "train_mode_bn.onnx": train_mode_bn,
    "stale_stats.onnx": stale_stats,
    "collapse_1x1_train_mode.onnx": collapse_1x1_train_mode,
    "epsilon_1e-8.onnx": epsilon_1e_8,
    "epsilon_zero_zero_var.onnx": epsilon_zero_zero_var,
    "nan_gamma.onnx": nan_gamma,
    "negative_variance.onnx": negative_variance,
    "layernorm_transformer_block.onnx": layernorm_transformer_block,
    "handwritten_batch_moments.onnx": handwritten_batch_moments,
    "instancenorm_lowered_to_bn.onnx": instancenorm_lowered_to_bn,
    "layernorm_size1_axis.onnx": layernorm_size1_axis,
    "instancenorm_1x1.onnx": instancenorm_1x1,
    "nan_midnetwork.onnx": nan_midnetwork,
    "clean_resnet.onnx": clean_resnet,
    "stale_drift.onnx": stale_drift,
    "trained_matching.onnx": trained_matching,
}


def write_all(out: Path) -> list[Path]:
    """Write every sample and the calibration file into ``out``; return the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, build in SAMPLES.items():
        path = out / filename
        path.write_bytes(build().SerializeToString())
        written.append(path)
    path = out / CALIB_FILE
    path.write_bytes(npz_bytes({"input": calib_data()}))
    written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent,
        help="directory to write into (default: this script's directory)",
    )
    args = parser.parse_args(argv)
    for path in write_all(args.out):
        print(f"{path}  {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
