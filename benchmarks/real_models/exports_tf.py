"""Keras 3 / tf2onnx exports of a small trained convnet (run by make_exports.py tf, in a venv with tensorflow).

A Conv-BN-ReLU net (NHWC) with a Dense + LayerNormalization head, fitted for two epochs on synthetic data:
  tf_convnet.onnx         tf2onnx.convert.from_keras: BN folded into Conv, LayerNorm decomposed into
                          ReduceMean/Sub/Mul/Sqrt/Reciprocal
  tf_convnet_train.onnx   tf2onnx of ``model(x, training=True)``: each BN becomes moments over axes (0, 2, 3)
                          (batch statistics at inference: defect by construction)
  tf_convnet.keras        the Keras 3 file itself (BN and LayerNormalization layers)
  tf_convnet_k3.h5        the same model saved as legacy .h5 by Keras 3
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf
import tf2onnx
from make_exports import entry

SIZE = 64


def build_and_fit() -> keras.Model:
    keras.utils.set_random_seed(0)
    inp = keras.Input((SIZE, SIZE, 3), name="x")
    h = inp
    for channels in (16, 32):
        h = keras.layers.Conv2D(channels, 3, padding="same", use_bias=False)(h)
        h = keras.layers.BatchNormalization()(h)
        h = keras.layers.ReLU()(h)
        h = keras.layers.MaxPooling2D()(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    h = keras.layers.LayerNormalization()(keras.layers.Dense(32)(h))
    model = keras.Model(inp, keras.layers.Dense(10)(h))
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, SIZE, SIZE, 3)).astype("float32") * 0.5 + 0.2
    y = np.clip((x[..., 0].mean(axis=(1, 2)) * 20).astype(int), 0, 9)
    model.fit(x, y, epochs=2, batch_size=32, verbose=0)
    return model


def export(out: Path) -> list[dict]:
    source = f"tf2onnx {tf2onnx.__version__} / tensorflow {tf.__version__}"
    model = build_and_fit()
    spec = (tf.TensorSpec((None, SIZE, SIZE, 3), tf.float32, name="x"),)
    inputs = [{"name": "x", "shape": ["B", SIZE, SIZE, 3], "dtype": "float32"}]
    entries = []

    path = out / "tf_convnet.onnx"
    tf2onnx.convert.from_keras(model, input_signature=spec, opset=17, output_path=str(path))
    entries.append(
        entry(
            source,
            "tf_convnet",
            path,
            "tf2onnx from_keras of a fitted Keras 3 model: BN folded into "
            "Conv, LayerNorm decomposed (ReduceMean/Sub/Mul/Sqrt/Reciprocal), NHWC, batch 'unk__'",
            inputs,
            [],
            [1, 2, 32],
        )
    )

    @tf.function(input_signature=spec)
    def call_training(x: tf.Tensor) -> tf.Tensor:
        return model(x, training=True)

    path = out / "tf_convnet_train.onnx"
    tf2onnx.convert.from_function(call_training, input_signature=spec, opset=17, output_path=str(path))
    entries.append(
        entry(
            source,
            "tf_convnet_train",
            path,
            "tf2onnx of model(x, training=True): BN as moments over axes (0,2,3) (defect by construction)",
            inputs,
            [],
            [1, 2, 32],
            "BN002",
        )
    )

    keras_source = f"keras {keras.__version__} save"
    for suffix, model_id in ((".keras", "tf_convnet_keras"), (".h5", "tf_convnet_k3_h5")):
        path = out / (model_id + suffix)
        model.save(str(path))
        entries.append(
            entry(
                keras_source,
                model_id,
                path,
                f"Keras 3 {suffix} file of the same fitted model (2 BatchNormalization, 1 LayerNormalization)",
                inputs,
                [],
                [1, 2, 32],
            )
        )
    return entries
