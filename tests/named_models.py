"""ONNX models whose node names are what a test needs: long exporter paths, or hostile strings."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

#: Names as PyTorch's exporter writes them (module path, then the op type).
TORCH_NAMES = (
    "/layer1/layer1.0/bn1/BatchNormalization",
    "/layer1/layer1.0/bn2/BatchNormalization",
    "/layer2/layer2.0/downsample/downsample.1/BatchNormalization",
    "/layer4/layer4.0/bn2/BatchNormalization",
    "/layer4/layer4.1/bn2/BatchNormalization",
)

#: long module paths, as the table shows a TorchScript export's layers (a node named
#: /encoder/stages.0/.../batch_norm_1/BatchNormalization takes its weights' module path)
LONG_MODULE_NAMES = (
    "encoder.stages.0.blocks.0.residual.conv_block.batch_norm_1",
    "encoder.stages.0.blocks.0.residual.conv_block.batch_norm_2",
    "encoder.stages.1.blocks.0.downsample.projection.batch_norm",
    "encoder.stages.3.blocks.0.residual.conv_block.batch_norm_2",
    "encoder.stages.3.blocks.1.residual.conv_block.batch_norm_2",
)

#: Rich markup, an OSC terminal-title sequence, a newline, a CSI colour, a bidi override.
HOSTILE_NAMES = ("[/red]", "\x1b]0;title\x07", "row\nbreak", "\x1b[31mred", "a\u202eb")


def bn_chain_model(
    path: Path, names: Sequence[str], *, channels: int = 4, hw: Sequence[int] = (2, 2), stale: bool = False
) -> str:
    """x -> BatchNormalization (one per name, node and output tensor both named after it) -> y.

    ``stale``: running mean 0 and variance 1 everywhere (a BN003 error on every layer).
    """
    rng = np.random.default_rng(0)
    nodes, initializers = [], []
    previous = "x"
    for index, name in enumerate(names):
        params = {
            "scale": rng.uniform(0.5, 1.5, channels),
            "bias": rng.uniform(-0.5, 0.5, channels),
            "mean": np.zeros(channels) if stale else rng.uniform(0.1, 0.3, channels),
            "var": np.ones(channels) if stale else rng.uniform(0.5, 1.5, channels),
        }
        inputs = [previous]
        for key, value in params.items():
            inputs.append(f"p{index}.{key}")
            initializers.append(numpy_helper.from_array(value.astype(np.float32), inputs[-1]))
        output = f"{name}:out"
        nodes.append(helper.make_node("BatchNormalization", inputs, [output], name=name, epsilon=1e-5))
        previous = output
    shape = ["N", channels, *hw]
    graph = helper.make_graph(
        nodes,
        "named",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(previous, TensorProto.FLOAT, shape)],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return str(path)
