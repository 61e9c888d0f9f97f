"""Three more architectures for the probe benchmark, built with onnx.helper at run time (never committed).

- ``build_mobilenet_v2``: MobileNetV2 (inverted residuals: 1x1 expand, 3x3 depthwise, 1x1 project, each
  followed by BatchNormalization, Clip(0, 6) after the first two), 224x224, 52 BN, ~3.5 M parameters;
- ``build_transformer``: a transformer encoder (6 layers, d=512, 8 heads, feed-forward 2048, post-norm
  LayerNormalization, 13 LN), float embeddings [N, 128, 512] in, mean-pooled 10-way head out, ~19 M parameters;
- ``build_conv3d``: a 3D conv net (Conv3d + BatchNormalization + Relu, 8 BN), [N, 3, 16, 112, 112] clips in,
  ~4 M parameters.

Random weights; BN running statistics near the activations' (these models are clean: the probe should find
nothing but their static traits).
"""

from __future__ import annotations

from typing import Any

import numpy as np


class _Graph:
    """Nodes and initializers of a model under construction, with unique names."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.count = 0

    def name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}_{self.count}"

    def init(self, value: np.ndarray, prefix: str) -> str:
        from onnx import numpy_helper

        name = self.name(prefix)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], prefix: str | None = None, **attrs: Any) -> str:
        from onnx import helper

        out = self.name(prefix or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def conv(
        self, x: str, cin: int, cout: int, kernel: tuple[int, ...], stride: tuple[int, ...], group: int = 1
    ) -> str:
        fan_in = cin // group * int(np.prod(kernel))
        w = self.init(
            (self.rng.standard_normal((cout, cin // group, *kernel)) * np.sqrt(2.0 / fan_in)).astype(np.float32), "w"
        )
        pads = [k // 2 for k in kernel] * 2
        return self.op("Conv", [x, w], "conv", kernel_shape=list(kernel), strides=list(stride), pads=pads, group=group)

    def bn(self, x: str, c: int) -> str:
        rng = self.rng
        names = [
            self.init(v.astype(np.float32), "bn_p")
            for v in (rng.uniform(0.5, 1.5, c), rng.normal(0, 0.1, c), rng.normal(0, 0.2, c), rng.uniform(0.5, 2.0, c))
        ]
        return self.op("BatchNormalization", [x, *names], "bn", epsilon=1e-5)

    def save(self, path: str, name: str, inputs: list[Any], outputs: list[Any], opset: int = 17) -> str:
        import onnx
        from onnx import helper

        graph = helper.make_graph(self.nodes, name, inputs, outputs, initializer=self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="bncheck-bench")
        model.ir_version = 8
        onnx.save(model, path)
        return path


def build_mobilenet_v2(path: str, seed: int = 0) -> str:
    from onnx import TensorProto, helper

    g = _Graph(seed)
    lo = g.init(np.array(0.0, np.float32), "clip_lo")
    hi = g.init(np.array(6.0, np.float32), "clip_hi")

    def relu6(x: str) -> str:
        return g.op("Clip", [x, lo, hi], "relu6")

    x = relu6(g.bn(g.conv("input", 3, 32, (3, 3), (2, 2)), 32))
    cin = 32
    # (expansion t, output channels c, repeats n, first stride s), as in the MobileNetV2 paper
    for t, c, n, s in (
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    ):
        for i in range(n):
            stride = s if i == 0 else 1
            hidden = cin * t
            y = x
            if t != 1:
                y = relu6(g.bn(g.conv(y, cin, hidden, (1, 1), (1, 1)), hidden))
            y = relu6(g.bn(g.conv(y, hidden, hidden, (3, 3), (stride, stride), group=hidden), hidden))
            y = g.bn(g.conv(y, hidden, c, (1, 1), (1, 1)), c)
            x = g.op("Add", [x, y], "add") if stride == 1 and cin == c else y
            cin = c
    x = relu6(g.bn(g.conv(x, cin, 1280, (1, 1), (1, 1)), 1280))
    x = g.op("Flatten", [g.op("GlobalAveragePool", [x], "gap")], "flatten")
    w = g.init((g.rng.standard_normal((1280, 1000)) * 0.01).astype(np.float32), "fc_w")
    b = g.init(np.zeros(1000, np.float32), "fc_b")
    g.nodes.append(helper.make_node("Gemm", [x, w, b], ["logits"], name="fc"))
    return g.save(
        path,
        "mobilenet_v2",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1000])],
    )


def build_transformer(
    path: str, seed: int = 0, layers: int = 6, d: int = 512, heads: int = 8, ff: int = 2048, seq: int = 128
) -> str:
    from onnx import TensorProto, helper

    g = _Graph(seed)
    head = d // heads

    def linear(x: str, cin: int, cout: int) -> str:
        w = g.init((g.rng.standard_normal((cin, cout)) / np.sqrt(cin)).astype(np.float32), "lin_w")
        b = g.init(np.zeros(cout, np.float32), "lin_b")
        return g.op("Add", [g.op("MatMul", [x, w], "matmul"), b], "lin")

    def layer_norm(x: str) -> str:
        scale = g.init(g.rng.uniform(0.8, 1.2, d).astype(np.float32), "ln_scale")
        bias = g.init(g.rng.normal(0, 0.05, d).astype(np.float32), "ln_bias")
        return g.op("LayerNormalization", [x, scale, bias], "ln", axis=-1, epsilon=1e-5)

    split = g.init(np.array([0, seq, heads, head], np.int64), "split_shape")
    merge = g.init(np.array([0, seq, d], np.int64), "merge_shape")
    inv_sqrt = g.init(np.array(1.0 / np.sqrt(head), np.float32), "inv_sqrt")

    def heads_first(x: str) -> str:  # [N, S, d] -> [N, H, S, d/H]
        return g.op("Transpose", [g.op("Reshape", [x, split], "split")], "heads", perm=[0, 2, 1, 3])

    x = layer_norm("input")
    for _ in range(layers):
        q, k, v = (heads_first(linear(x, d, d)) for _ in range(3))
        scores = g.op(
            "Mul", [g.op("MatMul", [q, g.op("Transpose", [k], "kT", perm=[0, 1, 3, 2])], "qk"), inv_sqrt], "scores"
        )
        ctx = g.op("MatMul", [g.op("Softmax", [scores], "softmax", axis=-1), v], "ctx")
        ctx = g.op("Reshape", [g.op("Transpose", [ctx], "merge", perm=[0, 2, 1, 3]), merge], "ctx_flat")
        x = layer_norm(g.op("Add", [x, linear(ctx, d, d)], "res1"))
        hidden = g.op("Relu", [linear(x, d, ff)], "ff_relu")
        x = layer_norm(g.op("Add", [x, linear(hidden, ff, d)], "res2"))
    pooled = g.op("ReduceMean", [x], "pool", axes=[1], keepdims=0)
    w = g.init((g.rng.standard_normal((d, 10)) / np.sqrt(d)).astype(np.float32), "cls_w")
    b = g.init(np.zeros(10, np.float32), "cls_b")
    g.nodes.append(helper.make_node("Gemm", [pooled, w, b], ["logits"], name="cls"))
    return g.save(
        path,
        "transformer_encoder",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", seq, d])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
    )


def build_conv3d(path: str, seed: int = 0, frames: int = 16, image: int = 112) -> str:
    from onnx import TensorProto, helper

    g = _Graph(seed)
    x, cin = "input", 3
    for cout, stride in (
        (32, (1, 2, 2)),
        (64, (2, 2, 2)),
        (64, (1, 1, 1)),
        (128, (2, 2, 2)),
        (128, (1, 1, 1)),
        (256, (2, 2, 2)),
        (256, (1, 1, 1)),
        (512, (1, 2, 2)),
    ):
        x = g.op("Relu", [g.bn(g.conv(x, cin, cout, (3, 3, 3), stride), cout)], "relu")
        cin = cout
    x = g.op("Flatten", [g.op("GlobalAveragePool", [x], "gap")], "flatten")
    w = g.init((g.rng.standard_normal((cin, 400)) * 0.01).astype(np.float32), "fc_w")
    b = g.init(np.zeros(400, np.float32), "fc_b")
    g.nodes.append(helper.make_node("Gemm", [x, w, b], ["logits"], name="fc"))
    return g.save(
        path,
        "conv3d",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, frames, image, image])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 400])],
    )
