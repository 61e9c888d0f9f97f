"""paddle2onnx export of a small trained convnet (run by make_exports.py paddle, in a venv with paddlepaddle).

Conv-BN-ReLU x2 and a Linear head, trained for 30 SGD steps on synthetic data, saved with
``paddle.jit.save`` (PIR json + pdiparams, batch and H/W symbolic) and converted by ``paddle2onnx.export``
at opset 13 (BatchNormalization without training_mode; dims named DynamicDimension.N).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import paddle
import paddle2onnx
from make_exports import entry

SIZE = 64


class Net(paddle.nn.Layer):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.c1 = paddle.nn.Conv2D(3, 16, 3, padding=1, bias_attr=False)
        self.b1 = paddle.nn.BatchNorm2D(16)
        self.c2 = paddle.nn.Conv2D(16, 32, 3, padding=1, bias_attr=False)
        self.b2 = paddle.nn.BatchNorm2D(32)
        self.fc = paddle.nn.Linear(32, 10)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        f = paddle.nn.functional
        x = f.max_pool2d(f.relu(self.b1(self.c1(x))), 2)
        x = f.max_pool2d(f.relu(self.b2(self.c2(x))), 2)
        return self.fc(x.mean(axis=[2, 3]))


def export(out: Path) -> list[dict]:
    paddle.seed(0)
    net = Net()
    opt = paddle.optimizer.SGD(0.05, parameters=net.parameters())
    rng = np.random.default_rng(0)
    net.train()
    for _ in range(30):
        x = rng.standard_normal((32, 3, SIZE, SIZE)).astype("float32") * 0.5 + 0.2
        y = np.clip((x[:, 0].mean(axis=(1, 2)) * 20).astype("int64"), 0, 9)
        loss = paddle.nn.functional.cross_entropy(net(paddle.to_tensor(x)), paddle.to_tensor(y))
        loss.backward()
        opt.step()
        opt.clear_grad()
    net.eval()
    path = out / "paddle_convnet.onnx"
    with tempfile.TemporaryDirectory() as tmp:
        prefix = str(Path(tmp) / "model")
        spec = [paddle.static.InputSpec([None, 3, None, None], "float32", "x")]
        paddle.jit.save(net, prefix, input_spec=spec)
        paddle2onnx.export(prefix + ".json", prefix + ".pdiparams", str(path), opset_version=13)
    source = f"paddle2onnx {paddle2onnx.__version__} / paddlepaddle {paddle.__version__}"
    inputs = [{"name": "x", "shape": ["B", 3, SIZE, SIZE], "dtype": "float32"}]
    return [
        entry(
            source,
            "paddle_convnet",
            path,
            "paddle2onnx 2.x of a trained Paddle 3 net: 2 BN unfolded, "
            "opset 13, batch and H/W named DynamicDimension.N",
            inputs,
            ["--input-shape", f"x:3x{SIZE}x{SIZE}"],
            [1, 2, 32],
        )
    ]
