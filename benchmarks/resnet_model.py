"""A ResNet-50-sized ONNX model built with onnx.helper (random weights, non-default BN statistics).

53 BatchNormalization nodes (stem, 16 bottlenecks x 3, 4 downsamples), 224x224 input, dynamic batch,
about 25.5 M parameters (~100 MB). Generated at run time by the benchmark; never committed.

Variants, so that no optimisation fits one graph only (``build_resnet50`` keywords):
- ``variant="b"``: built independently of the default's conventions: stride on the first 1x1 of a
  downsampling block (v1), a Reshape + MatMul + Add head instead of Flatten + Gemm, BN
  running statistics that do not match the activations (means around 1, variances 5-20 where the
  activations have unit scale);
- ``train=True``: every BatchNormalization with ``training_mode=1`` (three outputs, as onnxruntime needs);
- ``batch_mix=True``: a hidden batch dependence no normalization layer explains (the pooled features
  centred on their batch mean before the head), for the cost of the output-level test and localisation.
"""

from __future__ import annotations

import numpy as np


def build_resnet50(
    path: str,
    seed: int = 0,
    opset: int = 17,
    width: int = 64,
    image: int = 224,
    variant: str = "a",
    train: bool = False,
    batch_mix: bool = False,
) -> str:
    """Write the model to ``path`` and return it. ``width``/``image`` shrink it for quick experiments;
    ``variant``/``train``/``batch_mix``: see the module docstring."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes: list = []
    inits: list = []
    counter = {"n": 0}

    def name(prefix: str) -> str:
        counter["n"] += 1
        return f"{prefix}_{counter['n']}"

    def conv(x: str, cin: int, cout: int, k: int, stride: int) -> str:
        w = name("conv_w")
        fan_in = cin * k * k
        inits.append(
            numpy_helper.from_array(
                (rng.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / fan_in)).astype(np.float32), w
            )
        )
        out = name("conv")
        nodes.append(
            helper.make_node(
                "Conv", [x, w], [out], name=out, kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4
            )
        )
        return out

    def bn(x: str, c: int) -> str:
        base = name("bn")
        if variant == "b":  # statistics of another distribution than the activations'
            mean, var = rng.normal(1.0, 0.5, c), rng.uniform(5.0, 20.0, c)
        else:
            mean, var = rng.normal(0, 0.2, c), rng.uniform(0.5, 2.0, c)
        params = {"scale": rng.uniform(0.5, 1.5, c), "bias": rng.normal(0, 0.1, c), "mean": mean, "var": var}
        for key, value in params.items():
            inits.append(numpy_helper.from_array(value.astype(np.float32), f"{base}_{key}"))
        inputs = [x] + [f"{base}_{k}" for k in params]
        if train:
            nodes.append(
                helper.make_node(
                    "BatchNormalization",
                    inputs,
                    [base, f"{base}_rm", f"{base}_rv"],
                    name=base,
                    epsilon=1e-5,
                    training_mode=1,
                )
            )
        else:
            nodes.append(helper.make_node("BatchNormalization", inputs, [base], name=base, epsilon=1e-5))
        return base

    def relu(x: str) -> str:
        out = name("relu")
        nodes.append(helper.make_node("Relu", [x], [out], name=out))
        return out

    x = relu(bn(conv("input", 3, width, 7, 2), width))
    pooled = name("maxpool")
    nodes.append(
        helper.make_node("MaxPool", [x], [pooled], name=pooled, kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    )
    x, cin = pooled, width
    for stage, (blocks, mid) in enumerate(zip((3, 4, 6, 3), (width, width * 2, width * 4, width * 8))):
        cout = mid * 4
        for block in range(blocks):
            stride = 2 if (block == 0 and stage > 0) else 1
            first, middle = (stride, 1) if variant == "b" else (1, stride)
            y = relu(bn(conv(x, cin, mid, 1, first), mid))
            y = relu(bn(conv(y, mid, mid, 3, middle), mid))
            y = bn(conv(y, mid, cout, 1, 1), cout)
            short = bn(conv(x, cin, cout, 1, stride), cout) if block == 0 else x
            added = name("add")
            nodes.append(helper.make_node("Add", [y, short], [added], name=added))
            x, cin = relu(added), cout
    gap = name("gap")
    nodes.append(helper.make_node("GlobalAveragePool", [x], [gap], name=gap))
    flat = name("flatten")
    if variant == "b":
        inits.append(numpy_helper.from_array(np.array([-1, cin], np.int64), "flat_shape"))
        nodes.append(helper.make_node("Reshape", [gap, "flat_shape"], [flat], name=flat))
    else:
        nodes.append(helper.make_node("Flatten", [gap], [flat], name=flat))
    if batch_mix:
        centre = name("batch_mean")
        nodes.append(helper.make_node("ReduceMean", [flat], [centre], name=centre, axes=[0], keepdims=1))
        mixed = name("centred")
        nodes.append(helper.make_node("Sub", [flat, centre], [mixed], name=mixed))
        flat = mixed
    inits.append(numpy_helper.from_array((rng.standard_normal((cin, 1000)) * 0.01).astype(np.float32), "fc_w"))
    inits.append(numpy_helper.from_array(np.zeros(1000, np.float32), "fc_b"))
    if variant == "b":
        nodes.append(helper.make_node("MatMul", [flat, "fc_w"], ["fc_mm"], name="fc_mm"))
        nodes.append(helper.make_node("Add", ["fc_mm", "fc_b"], ["logits"], name="fc"))
    else:
        nodes.append(helper.make_node("Gemm", [flat, "fc_w", "fc_b"], ["logits"], name="fc"))
    graph = helper.make_graph(
        nodes,
        "resnet50",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, image, image])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1000])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="bncheck-bench")
    model.ir_version = 8
    onnx.save(model, path)
    return path
